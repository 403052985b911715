"""Timing for the kernel benchmark: device-event medians with a cold L2, this GPU's ceilings, rows.

Used by bench.py (the driver) and bench_cases.py (the cases).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

H100_HBM_GBPS = 2950.0       # H100 HBM3 ceiling measured once (read + write); CPU runs report against it
H100_BF16_TFLOPS = 767.0     # H100 dense bf16 tensor-core ceiling measured once
L2_BYTES = 50 << 20


_FLUSH: list[torch.Tensor] = []


def flush_l2() -> None:
    """Overwrite 2x L2 so the next timed call starts cold (outside the timed events)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(2 * L2_BYTES // 4, dtype=torch.int32, device="cuda"))
    _FLUSH[0].zero_()


def median_ms(fn: Callable, inputs: list[tuple], device: str, warmup: int, reps: int) -> float:
    """Median time of fn(*inputs[i % len]) in ms; on CUDA device events around the call only,
    L2 flushed before each call and no host sync between them (work lists are built before)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    if device == "cuda":
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (a, b) in enumerate(ev):
            flush_l2()
            a.record()
            fn(*inputs[i % len(inputs)])
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in ev)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(*inputs[i % len(inputs)])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(reps: int = 20) -> dict:
    """This GPU's ceilings, measured in this run: a 1 GiB device-to-device copy (bytes read + written)
    and an 8192^3 bf16 matrix product on random data; device events, median after warm-up."""
    src = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), [()], "cuda", 3, reps)
    del src, dst
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = median_ms(lambda: a @ b, [()], "cuda", 3, max(5, reps // 2))
    return dict(hbm_gbps=2 * (1 << 30) / copy_ms / 1e6, bf16_tflops=2 * 8192 ** 3 / mm_ms / 1e9,
                gpu=torch.cuda.get_device_name(), source="measured in this run")


def rotations(working_set: int, device: str) -> int:
    """Copies of the inputs needed so consecutive runs do not hit in L2."""
    return 1 if device != "cuda" else max(1, min(8, math.ceil(4 * L2_BYTES / max(working_set, 1))))


def row(name: str, shape: dict, ms: float | None, nbytes: float, flops: float,
        torch_ms: float | None, diff: float | None = None) -> dict:
    """One result row: times, bytes, FLOPs, achieved GB/s and TFLOP/s, speed-up over torch."""
    row = dict(kernel=name, shape=shape, ms=ms, torch_ms=torch_ms, bytes=int(nbytes), flops=int(flops),
               max_abs_diff_vs_torch=diff)
    if ms:
        row["gbps"] = nbytes / ms / 1e6
        row["tflops"] = flops / ms / 1e9
    if ms and torch_ms:
        row["speedup_vs_torch"] = torch_ms / ms
    return row
