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


def test_a_failing_case_is_reported_and_the_rest_still_written(tmp_path, monkeypatch):
    from kvproof.kernels import bench

    def broken(*a, **kw):
        raise RuntimeError("copy kernel exploded")
    monkeypatch.setattr(bench, "_bench_copy", broken)
    monkeypatch.setitem(bench.SHAPES, "cpu", dict(bench.SHAPES["cpu"], sparse=[], sparse_fp8=[], dense=[],
                                                  idx_prefill=[]))
    out = tmp_path / "bench.json"
    report = bench.bench_kernels(device="cpu", out_path=str(out))
    failed = [r for r in report["rows"] if r.get("error")]
    assert [r["kernel"] for r in failed] == ["copy"] and "exploded" in failed[0]["error"]
    assert {"indexer.scores.decode", "indexer.topk.torch"} <= {r["kernel"] for r in report["rows"]}
    on_disk = json.loads(out.read_text())
    assert on_disk["complete"] and on_disk["rows"] == json.loads(json.dumps(report["rows"], default=str))
