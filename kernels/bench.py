"""Benchmark of the DSA kernels against vectorised torch versions of the same ops.

GPU: device-event timing, median of many runs after warm-up, inputs rotated so small
working sets do not sit in L2; achieved GB/s and TFLOP/s are reported against this
GPU's ceilings measured in the same run (a 1 GiB device-to-device copy, an 8192^3 bf16
matmul). CPU: tiny shapes only, so the CLI works anywhere; kernels are timed only under
the Triton interpreter (meaningless numbers, a smoke test) and the result says so.
Run: `python -m kvproof.kernels.bench [--quick]`.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from .bench_cases import bench_copy as _bench_copy, bench_indexer as _bench_indexer, bench_mla as _bench_mla
from .bench_timing import H100_BF16_TFLOPS, H100_HBM_GBPS, measure_ceilings, median_ms
from .indexer import indexer_scores_kernel

# Shapes per mode. ctx: tokens per request; B: requests (decode queries).
SHAPES = {
    "cpu": dict(copy=[(2, 40, 2)], idx_decode=[(2, 150)], idx_prefill=[(8, 150)],
                topk=[(2, 300, 16)], sparse=[(2, 300, 16)], sparse_fp8=[(2, 300, 16)], dense=[(2, 100)],
                mla_block_h=[None], mla_fp8_block_h=[None], reps=2, warmup=1),
    "quick": dict(copy=[(8, 16_384, 1)], idx_decode=[(64, 8_192), (64, 32_768)],
                  idx_prefill=[(1_024, 32_768)], topk=[(64, 32_768, 2048)],
                  sparse=[(4, 32_768, 2048), (64, 32_768, 2048)], sparse_fp8=[(64, 32_768, 2048)],
                  dense=[(64, 2_048)], mla_block_h=[None], mla_fp8_block_h=[None, 16], reps=10, warmup=3),
    "full": dict(copy=[(8, 16_384, 1), (8, 16_384, 8), (32, 4_000, 78)],
                 idx_decode=[(64, 8_192), (64, 32_768), (128, 32_768), (64, 131_072), (128, 131_072)],
                 idx_prefill=[(2_048, 32_768), (4_096, 131_072)],
                 topk=[(64, 32_768, 2048), (128, 131_072, 2048)],
                 sparse=[(4, 32_768, 2048), (64, 32_768, 2048), (128, 32_768, 2048), (64, 131_072, 2048)],
                 sparse_fp8=[(64, 32_768, 2048), (128, 32_768, 2048)],
                 dense=[(64, 2_048), (64, 8_192)], mla_block_h=[None, 16, 32], mla_fp8_block_h=[None, 16],
                 reps=50, warmup=5),
}


def bench_kernels(quick: bool = False, device: str | None = None, out_path: str | None = None) -> dict:
    """Time every kernel and its torch counterpart; a JSON-able dict of rows and notes.

    With out_path the JSON is rewritten there after every case (complete=False until the end).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    assert device in ("cuda", "cpu"), f"device must be 'cuda' or 'cpu', got {device!r}"
    assert device == "cpu" or torch.cuda.is_available(), "device 'cuda' requested but CUDA is not available"
    interpreted = type(indexer_scores_kernel).__name__ == "InterpretedFunction"
    run_kernels = device == "cuda" or interpreted
    mode = "cpu" if device == "cpu" else ("quick" if quick else "full")
    spec = SHAPES[mode]
    notes = []
    if device == "cpu":
        notes.append("cpu: tiny shapes only; GB/s and TFLOP/s are not meaningful here and the "
                     "ceilings are the H100's")
        notes.append("kernels timed under the Triton interpreter (a smoke test, not a measurement)"
                     if interpreted else "kernels not run: Triton needs CUDA or TRITON_INTERPRET=1; "
                     "only the torch versions were timed")
    torch.manual_seed(0)
    ceilings = measure_ceilings() if device == "cuda" else dict(
        hbm_gbps=H100_HBM_GBPS, bf16_tflops=H100_BF16_TFLOPS, gpu="H100", source="measured once, not here")

    def timer(fn, inputs):
        return median_ms(fn, inputs, device, spec["warmup"], spec["reps"])

    header = dict(device=device, device_name="cpu" if device == "cpu" else torch.cuda.get_device_name(),
                  mode=mode, kernels_run=run_kernels, interpreter=interpreted, ceilings=ceilings)

    rows: list[dict] = []
    groups = (("copy", _bench_copy), ("idx_decode", _bench_indexer), ("idx_prefill", _bench_indexer),
              ("topk", _bench_indexer), ("sparse", _bench_mla), ("sparse_fp8", _bench_mla), ("dense", _bench_mla))
    empty = {k: [] for k, _ in groups}
    with torch.no_grad():
        for key, fn in groups:
            for case in spec[key]:
                # Each case alone: a failing one is reported as a row and the others still run.
                try:
                    new_rows = fn({**spec, **empty, key: [case]}, device, run_kernels, timer)
                except Exception as e:              # noqa: BLE001 (reported in the JSON, not hidden)
                    new_rows = [dict(kernel=key, shape=list(case), ms=None, torch_ms=None,
                                     error=f"{type(e).__name__}: {str(e)[:500]}")]
                    if device == "cuda":
                        torch.cuda.empty_cache()
                for row in new_rows:
                    if row.get("ms"):
                        row["pct_hbm_ceiling"] = 100 * row["gbps"] / ceilings["hbm_gbps"]
                        row["pct_bf16_ceiling"] = 100 * row["tflops"] / ceilings["bf16_tflops"]
                rows += new_rows
                if out_path:                        # the file holds every row completed so far
                    _write(out_path, header, rows, notes)
    if out_path:
        _write(out_path, header, rows, notes, complete=True)
    return dict(header, rows=rows, notes=notes, complete=True)


def _write(path: str, header: dict, rows: list[dict], notes: list[str], complete: bool = False) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(header, rows=rows, notes=notes, complete=complete), f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    print(json.dumps(bench_kernels(quick="--quick" in sys.argv), indent=2))
