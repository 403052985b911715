"""GPU overlap of LayerSplit's KV broadcast with the indexer: how much of the copy the indexer hides.

On one GPU the broadcast of layer l's KV is stood in for by a copy of the same
size (context x 656 B, the fp8 layout) on a communication stream, while the
lightning-indexer kernel (``kernels.indexer.indexer_scores``, GLM-5's 32 heads x
128 dims, fp8 keys) scores this rank's share of the new tokens against the whole
context on the compute stream. ``hidden_fraction`` = (t_copy + t_indexer - t_both)
/ t_copy: 1 means the copy is free. A device-to-device copy competes with the
indexer for HBM bandwidth as an NVLink broadcast would for SMs and HBM, so this is
an estimate of the hiding, not a multi-GPU measurement.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

KV_FP8_BYTES, IDX_HEADS, IDX_DIM, PAGE = 656, 32, 128, 64


def _median_s(fn: Callable[[], object], reps: int, inner: int = 10) -> float:
    """Median seconds of one ``fn()``, timed with CUDA events around ``inner`` back-to-back calls.

    ``fn`` must leave the current stream waiting for any side stream it used, so the end
    event covers all of its work. Events, not the host clock: one copy takes tens of us.
    """
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(out)


def bench_overlap(context: int = 131_072, queries: int = 512, reps: int = 20, quick: bool = False) -> dict[str, Any]:
    """Measure the KV-sized copy on a side stream against the indexer kernel on the current stream."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_overlap needs CUDA (an NVIDIA GPU); the simulator is `kvproof bench layersplit --simulate`")
    from kvproof.kernels.common import indexer_fp8_layout, write_indexer_keys
    from kvproof.kernels.indexer import indexer_scores

    if quick:
        context, queries, reps = 16_384, 128, 5
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    pages = context // PAGE
    table = torch.arange(pages, dtype=torch.int32, device=dev)[None, :]
    cache = torch.zeros(pages, indexer_fp8_layout(PAGE, IDX_DIM).page_bytes, dtype=torch.uint8, device=dev)
    write_indexer_keys(cache, table, 0, torch.randn(context, IDX_DIM, generator=g).to(dev), PAGE)
    q = torch.randn(queries, IDX_HEADS, IDX_DIM, generator=g).to(dev, torch.bfloat16)
    w = torch.rand(queries, IDX_HEADS, generator=g).to(dev)
    q_req = torch.zeros(queries, dtype=torch.int32, device=dev)
    q_len = torch.full((queries,), context, dtype=torch.int32, device=dev)
    out = torch.empty(queries, context, dtype=torch.float32, device=dev)
    src = torch.empty(context * KV_FP8_BYTES, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    comm = torch.cuda.Stream(dev)

    def indexer() -> None:
        indexer_scores(q, w, cache, table, q_req, q_len, PAGE, max_len=context, out=out, block_m=4)

    def copy() -> None:            # on the comm stream, ordered after and before the current stream's work
        comm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(comm):
            dst.copy_(src, non_blocking=True)
        torch.cuda.current_stream().wait_stream(comm)

    def both() -> None:            # the copy on the comm stream runs beside the indexer on the current one
        comm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(comm):
            dst.copy_(src, non_blocking=True)
        indexer()
        torch.cuda.current_stream().wait_stream(comm)

    for f in (indexer, copy, both):            # warm-up (Triton compile, allocator)
        f()
    t_idx, t_copy, t_both = _median_s(indexer, reps), _median_s(copy, reps), _median_s(both, reps)
    hidden = max(0.0, min(1.0, (t_idx + t_copy - t_both) / t_copy)) if t_copy > 0 else 1.0
    return {"mode": "measure", "device": torch.cuda.get_device_name(), "context": context, "queries": queries,
            "copy_bytes": src.numel(), "t_copy_s": t_copy, "t_indexer_s": t_idx, "t_both_s": t_both,
            "copy_gbps": round(src.numel() / t_copy / 1e9, 1), "hidden_fraction": round(hidden, 3),
            "note": "copy on a side stream stands in for the NCCL broadcast of one layer's fp8 KV"}
