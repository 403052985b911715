"""The kernel benchmark runs on the CPU in quick mode and returns a JSON-able report."""
from __future__ import annotations

import json

import pytest
import torch

from kvproof.kernels.bench import bench_kernels


def test_cpu_quick_bench_reports_every_kernel():
    report = bench_kernels(quick=True, device="cpu")
    json.dumps(report)                                         # the CLI prints it as JSON
    assert report["device"] == "cpu" and report["mode"] == "cpu" and report["notes"]
    names = {row["kernel"] for row in report["rows"]}
    assert {"paged_copy.gather", "paged_copy.scatter", "indexer.scores.decode", "indexer.scores.prefill",
            "mla.sparse.decode", "mla.dense.decode"} <= names
    assert all(row["torch_ms"] is None or row["torch_ms"] > 0 for row in report["rows"])
    if report["interpreter"]:
        assert all(row["ms"] > 0 for row in report["rows"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to time kernels on a GPU")
def test_gpu_quick_bench():
    report = bench_kernels(quick=True)
    assert report["device"] == "cuda" and report["kernels_run"]
    assert all(row["ms"] > 0 for row in report["rows"])
    c = report["ceilings"]
    assert c["source"] == "measured in this run" and c["hbm_gbps"] > 500 and c["bf16_tflops"] > 50
    assert all(0 < row["pct_hbm_ceiling"] for row in report["rows"])
