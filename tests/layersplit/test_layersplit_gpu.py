"""GPU: the checked plan on CUDA streams, and the KV-copy / indexer overlap measurement."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no NVIDIA GPU here)")]


def test_overlap_measurement_reports_a_hidden_fraction() -> None:
    from kvproof.runtime.tools.layersplit_bench import bench_overlap
    r = bench_overlap(quick=True)
    assert 0.0 <= r["hidden_fraction"] <= 1.0
    assert min(r["t_both_s"], r["t_copy_s"], r["t_indexer_s"]) > 0     # the speed itself is a benchmark figure


def test_one_rank_pool_on_cuda_matches_itself_on_cuda_streams() -> None:
    from kvproof.runtime.layersplit.pool import LayerSplitConfig, LayerSplitPool, make_queries
    cfg = LayerSplitConfig(layers=4, tokens=256, page_size=64, idx_heads=16, idx_dim=64, topk=64, device="cuda")
    pool = LayerSplitPool(cfg)
    q = make_queries(cfg, 16)
    a, b = pool.forward(q), pool.forward(q)
    assert torch.isfinite(a.float()).all() and torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for an NCCL group")
def test_two_gpu_group_matches_unsplit() -> None:
    from kvproof.runtime.layersplit.pool import LayerSplitConfig
    from kvproof.runtime.layersplit.group import run_group, run_unsplit
    cfg = LayerSplitConfig(layers=4, tokens=256, page_size=64, idx_heads=16, idx_dim=64, topk=64, device="cuda")
    assert torch.equal(run_group(cfg, 2, 16)["out"], run_unsplit(cfg, 16)["out"])
