"""The real deployment: decode and prefill ranks as OS processes, TCP on loopback with delayed writes."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from kvproof.runtime.pd.cluster import PDCluster
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.tools.stress import run_stress
from kvproof.runtime.tools.stress_cli import add_stress_args, stress_main

# A small, hot configuration: many aborts and long write delays make the unfixed race show up in 1000 requests.
HOT = dict(requests=1000, abort_rate=0.3, delay_ms=5.0, concurrency=24, slots=16, writers=2)


@pytest.mark.timeout(60)
def test_stress_unfixed_corrupts() -> None:
    """Pre-fix protocol: freed-at-abort slots receive stale writes, and decode reads foreign KV."""
    r = run_stress(protocol="unfixed", seed=1, **HOT)
    assert r["corrupted"] > 0 and r["corrupted_bytes"] > 0, r
    assert r["foreign_landings"] > 0
    assert r["served"] + r["corrupted"] + r["aborted"] + r["failed"] == HOT["requests"]


@pytest.mark.timeout(60)
def test_stress_fixed_is_clean_and_reclaims_every_slot() -> None:
    """Fixed protocol under the same load: no corrupted result, no foreign landing, every slot back."""
    r = run_stress(protocol="fixed", seed=1, **HOT)
    assert r["corrupted"] == 0 and r["foreign_landings"] == 0, r
    assert r["all_slots_free"] and r["slots_free_end"] == r["slots_initial"] == HOT["slots"]
    assert r["aborted"] > 0 and r["slots_reclaimed"] > 0 and r["reclaim_latency_ms"]["p50"] > 0
    assert r["served"] + r["aborted"] + r["failed"] == HOT["requests"]


@pytest.mark.timeout(60)
def test_killing_a_prefill_process_loses_no_slot() -> None:
    """SIGKILL prefill rank 0 mid-run: its requests fail with a reason, nothing corrupts, no slot leaks."""
    r = run_stress(protocol="fixed", requests=600, abort_rate=0.1, delay_ms=2.0, seed=3, kill_rank=0, kill_after=200)
    assert r["corrupted"] == 0 and r["all_slots_free"], r
    assert "0" in r["dead_ranks"] or 0 in r["dead_ranks"]
    assert r["served"] > 0 and r["failed"] > 0
    assert all("prefill rank 0 dead" in reason for reason in r["failure_reasons"]), r["failure_reasons"]


@pytest.mark.timeout(60)
def test_traces_are_json_lines_per_process(tmp_path: Path) -> None:
    """With a trace dir every process writes its own JSON Lines trace: a header, then firings."""
    r = run_stress(protocol="fixed", requests=60, abort_rate=0.2, seed=2, trace_dir=str(tmp_path))
    assert r["corrupted"] == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["decode.jsonl", "prefill-0.jsonl", "prefill-1.jsonl"]
    actions: set[str] = set()
    for name in files:
        lines = (tmp_path / name).read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        assert recs[0]["kind"] == "header" and recs[0]["protocol"] == "kv_slot" and recs[0]["variant"] == "fixed"
        assert all(rec["kind"] == "fire" for rec in recs[1:]) and len(recs) > 10
        actions |= {rec["action"] for rec in recs[1:]}
    assert {"alloc", "on_done", "start_decode", "finish", "land", "p_on_alloc", "p_post", "p_complete",
            "p_finish"} <= actions


@pytest.mark.timeout(60)
def test_malformed_client_messages_are_counted_and_ignored() -> None:
    """Decode survives malformed control messages, counts them, and keeps serving."""
    with PDCluster(PDConfig(delay_ms=None)) as c:
        assert c._client is not None
        c._client.send({"type": "submit", "rid": -1, "n_tokens": 1})
        c._client.send({"type": "nonsense"})
        c._client.send({"type": "client_abort"})
        c.submit(7, 3)
        res = c.next_result(timeout=10)
        assert res is not None and res.rid == 7 and res.status == "served"
        stats = c.shutdown()
    assert stats["malformed_messages"] == 3 and stats["slots_free"] == stats["slots"]


@pytest.mark.timeout(60)
def test_decode_crash_stops_the_prefill_ranks() -> None:
    """Killing decode: every prefill rank sees its channel die and exits on its own."""
    c = PDCluster(PDConfig(delay_ms=None, heartbeat_timeout_s=2.0)).start()
    try:
        c.submit(1, 4)
        assert c.next_result(timeout=10) is not None
        assert c.decode is not None
        c.decode.kill()
        deadline = time.monotonic() + 15
        while any(p.poll() is None for p in c.prefill) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(p.poll() is not None for p in c.prefill)
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_stress_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    """add_stress_args + stress_main: --json prints the report; exit 0 for a clean fixed run."""
    ap = argparse.ArgumentParser()
    add_stress_args(ap)
    args = ap.parse_args(["--protocol", "fixed", "--requests", "150", "--abort-rate", "0.2", "--json"])
    assert stress_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == "fixed" and out["requests"] == 150 and out["corrupted"] == 0
    for key in ("served", "aborted", "failed", "slots_reclaimed", "slots_free_end", "bytes_transferred",
                "transfer_mb_s", "reclaim_latency_ms", "wall_s"):
        assert key in out
    assert os.cpu_count()


@pytest.mark.timeout(90)
def test_compare_runs_both_protocols_in_halves() -> None:
    """run_compare: unfixed and fixed reports (two halves each, merged) and the throughput ratio."""
    from kvproof.runtime.tools.stress import run_compare

    out = run_compare(requests=201, abort_rate=0.2, seed=5)
    assert out["unfixed"]["requests"] == out["fixed"]["requests"] == 201
    assert out["fixed"]["corrupted"] == 0 and out["fixed"]["all_slots_free"]
    assert out["unfixed"]["seed"] == out["fixed"]["seed"] == [5, 6]
    assert out["throughput_ratio_fixed_over_unfixed"] > 0
    assert out["fixed"]["reclaim_latency_ms"]["n"] == out["fixed"]["slots_reclaimed"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["fixed", "unfixed"])
def test_transfer_timeouts_alone(protocol: str) -> None:
    """Decode-side timeouts with slow writes and no client aborts: failed with the reason; only unfixed corrupts."""
    r = run_stress(protocol=protocol, requests=400, abort_rate=0.0, delay_ms=20.0, transfer_timeout_s=0.05, seed=4)
    assert r["failed"] > 0 and all(k.startswith("transfer timeout") for k in r["failure_reasons"]), r
    assert r["all_slots_free"] and r["slots_reclaimed"] == r["failed"]
    if protocol == "fixed":
        assert r["corrupted"] == 0 and r["foreign_landings"] == 0
    else:
        assert r["foreign_landings"] > 0      # the timeout path is itself a reuse window
