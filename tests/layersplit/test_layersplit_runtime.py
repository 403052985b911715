"""LayerSplit on gloo: 2 and 4 ranks give the unsplit pool's results and hold ~1/R of its KV."""
from __future__ import annotations

import math

import pytest
import torch

from kvproof.runtime.layersplit.pool import (LayerSplitConfig, LayerSplitPool, PlanRaceError, checked_plan,
                                        make_queries)
from kvproof.runtime.layersplit.group import run_group, run_groups, run_unsplit

CFG = LayerSplitConfig(layers=6, tokens=100, page_size=16, topk=24)
QUERIES = 8


@pytest.fixture(scope="module")
def unsplit() -> dict:
    return run_unsplit(CFG, QUERIES)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ranks", [2, 4])
def test_group_matches_unsplit_and_splits_memory(unsplit: dict, ranks: int) -> None:
    got = run_group(CFG, ranks, QUERIES)
    out, ref = got["out"], unsplit["out"]
    assert torch.isfinite(ref).all()
    assert torch.equal(out, ref)                       # bit for bit: same data, same kernels
    full = unsplit["memory"][0]
    layer_kv, layer_idx = full["kv_bytes"] // CFG.layers, full["indexer_bytes"] // CFG.layers
    assert sum(m["layers_owned"] for m in got["memory"]) == CFG.layers
    for m in got["memory"]:
        assert m["kv_bytes"] == m["layers_owned"] * layer_kv
        assert m["kv_bytes"] <= math.ceil(CFG.layers / ranks) * layer_kv      # ~ 1/R of the unsplit KV
        assert m["indexer_bytes"] == m["layers_owned"] * layer_idx
        assert m["staging_bytes"] == CFG.depth * (layer_kv + layer_idx)        # the stated staging
        assert m["unsplit_kv_bytes"] == full["kv_bytes"]


@pytest.mark.timeout(30)
def test_unsplit_pool_owns_everything_and_has_no_staging(unsplit: dict) -> None:
    m = unsplit["memory"][0]
    assert m["layers_owned"] == CFG.layers and m["staging_bytes"] == 0
    assert unsplit["out"].shape == (CFG.layers, QUERIES, CFG.heads, CFG.kv_latent)


@pytest.mark.timeout(30)
def test_prefix_plan_is_refused_before_it_runs() -> None:
    bad = LayerSplitConfig(layers=6, tokens=32, variant="unfixed", ownership="round_robin")
    with pytest.raises(PlanRaceError, match="refusing plan layersplit/unfixed/R=2.*recv"):
        checked_plan(bad.shape(2))
    assert checked_plan(bad.shape(2), allow_races=True).name.startswith("layersplit/unfixed")
    checked_plan(bad.shape(1))                         # one rank: nothing to receive, nothing to race


@pytest.mark.timeout(30)
def test_pool_errors_name_the_bad_input() -> None:
    with pytest.raises(ValueError, match="rank 2 must be in 0..ranks-1"):
        LayerSplitPool(CFG, rank=2, ranks=2)
    with pytest.raises(ValueError, match="LayerSplitConfig.schedule must be one of"):
        LayerSplitConfig(layers=2, tokens=4, schedule="fast")
    with pytest.raises(ValueError, match="LayerSplitConfig.tokens must be a positive int"):
        LayerSplitConfig(layers=2, tokens=0)
    with pytest.raises(ValueError, match="count must be in 1..100"):
        make_queries(CFG, 101)
    pool = LayerSplitPool(CFG)
    with pytest.raises(KeyError, match="not on rank 0"):
        pool.region("kv[0]@r1")
    assert pool.region("kv[3]@r0") is pool.kv[3]


@pytest.mark.timeout(30)
def test_query_shards_reassemble() -> None:
    q = make_queries(CFG, QUERIES)
    parts = [q.shard(r, 3) for r in range(3)]
    assert sum(p.q_len.shape[0] for p in parts) == QUERIES
    assert torch.equal(parts[1].q_nope, q.q_nope[:, 1::3])


@pytest.mark.timeout(60)
def test_triton_kernel_path_matches_the_references() -> None:
    """The GPU code path (Triton kernels: native on a GPU, the interpreter on CPU) agrees with the
    torch references (bf16 KV on a GPU, fp32 on the CPU)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LayerSplitConfig(layers=2, tokens=64, page_size=16, idx_heads=16, idx_dim=32, topk=64, device=dev)
    ref_cfg = LayerSplitConfig(**{**cfg.__dict__, "kernels": "torch"})
    tri = LayerSplitConfig(**{**cfg.__dict__, "kernels": "triton"})
    q = make_queries(cfg, 4)
    ref, got = LayerSplitPool(ref_cfg).forward(q), LayerSplitPool(tri).forward(q)
    assert got.dtype == cfg.dtype
    tol = 1e-4 if dev == "cpu" else 2e-2
    torch.testing.assert_close(got.double().cpu(), ref.cpu(), rtol=tol, atol=tol)


@pytest.mark.timeout(120)
def test_unfixed_plan_visibly_corrupts_when_the_comm_stream_runs_ahead() -> None:
    """Two-phase emulation on the spec machine: fixed stays exact under every schedule, unfixed does not."""
    base = LayerSplitConfig(layers=6, tokens=64, ownership="round_robin", topk=24, allow_races=True)
    ref = run_unsplit(base, 4)["out"]
    cfgs = [LayerSplitConfig(**{**base.__dict__, "variant": v, "schedule": s})
            for v, s in (("fixed", "comm_ahead"), ("fixed", "random"), ("unfixed", "comm_ahead"))]
    fixed_ahead, fixed_random, unfixed_ahead = (r["out"] for r in run_groups(cfgs, 2, 4))
    assert torch.equal(fixed_ahead, ref) and torch.equal(fixed_random, ref)
    bad = [l for l in range(base.layers) if not torch.equal(unfixed_ahead[l], ref[l])]
    # each receive of layer l + 2 lands in the buffer before attention[l] on the receiver reads it
    assert bad == [0, 1, 2, 3]


def test_rendezvous_follows_torch_distributed_settings() -> None:
    """The group meets where MASTER_ADDR/MASTER_PORT or an init method say, loopback by default."""
    from kvproof.runtime.layersplit.group import rendezvous

    assert rendezvous({"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"}) == ("10.1.2.3", 29500)
    assert rendezvous({"KVPROOF_LAYERSPLIT_INIT_METHOD": "tcp://10.9.9.9:1234",
                       "MASTER_ADDR": "10.1.2.3"}) == ("10.9.9.9", 1234)
    host, port = rendezvous({})
    assert host == "127.0.0.1" and 0 < port < 65536
    with pytest.raises(ValueError, match="expected tcp://HOST:PORT"):
        rendezvous({"KVPROOF_LAYERSPLIT_INIT_METHOD": "env://"})
    with pytest.raises(ValueError, match="MASTER_PORT='x'"):
        rendezvous({"MASTER_PORT": "x"})
