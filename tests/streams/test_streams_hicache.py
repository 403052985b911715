"""HiCache: prefix hits, LRU eviction to host, bit-identical reload, checked plans, the pre-fix bug."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvproof.runtime.hicache.cache import HiCache, reference_forward
from kvproof.runtime.hicache.pages import CacheFullError, HiCacheConfig, PlanRaceError
from kvproof.spec.stream_json import plan_loads

L, P, D, I = 3, 4, 16, 8


def _cfg(**kw) -> HiCacheConfig:
    base = dict(layers=L, page_size=P, kv_dim=D, idx_dim=I, device_pages=8, host_pages=32, topk=6)
    return HiCacheConfig(**(base | kw))


def _seq(start: int, n: int, seed: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(range(start, start + n)), torch.randn(L, n, D, generator=g), torch.randn(L, n, I, generator=g)


def test_hit_evict_reload_is_bit_identical() -> None:
    c = HiCache(_cfg())
    toks, kv, idx = _seq(0, 6 * P, 1)
    assert c.insert(toks, kv, idx) == 6
    assert c.evict() == 6 and c.stats()["device_pages_used"] == 0
    kv2, idx2 = c.gather(toks)
    assert torch.equal(kv2, kv) and torch.equal(idx2, idx)
    s = c.stats()
    assert (s["hits"], s["misses"], s["evictions"], s["swap_ins"]) == (6, 0, 6, 6)
    c.evict()                                    # host copy kept: second eviction copies nothing
    kv3, _ = c.gather(toks)
    assert torch.equal(kv3, kv) and c.stats()["host_pages_used"] == 6


def test_partial_prefix_hit_counts_misses() -> None:
    c = HiCache(_cfg())
    toks, kv, idx = _seq(0, 3 * P, 2)
    c.insert(toks, kv, idx)
    r = c.load(toks + [999] * (2 * P) + [5])     # 3 pages hit, 2 full pages miss, a partial page ignored
    assert (r.prefix_pages, r.swapped) == (3, 0)
    assert (c.stats()["hits"], c.stats()["misses"]) == (3, 2)
    assert len(c.match([1] + toks)) == 0


def test_lru_evicts_least_recently_used_to_host() -> None:
    c = HiCache(_cfg(device_pages=4))
    a, b, x = _seq(0, 2 * P, 3), _seq(100, 2 * P, 4), _seq(200, 2 * P, 5)
    c.insert(*a)
    c.insert(*b)
    c.load(a[0])                                 # touch a: b is now least recently used
    c.insert(*x)
    assert all(n.device_page is not None for n in c.match(a[0]))
    assert all(n.device_page is None and n.host_page is not None for n in c.match(b[0]))
    assert c.stats()["evictions"] == 2


def test_full_host_pool_drops_lru_leaves() -> None:
    c = HiCache(_cfg(device_pages=2, host_pages=2))
    for k in range(3):
        c.insert(*_seq(100 * k, 2 * P, k))
    s = c.stats()
    assert s["dropped"] == 2 and s["evictions"] == 4
    assert len(c.match(list(range(2 * P)))) == 0         # the first sequence is gone
    assert len(c.match(list(range(200, 200 + 2 * P)))) == 2


def test_batch_larger_than_device_pool() -> None:
    c = HiCache(_cfg(device_pages=2))
    with pytest.raises(CacheFullError, match="locked"):
        c.insert(*_seq(0, 3 * P, 0))


def test_failed_insert_and_load_roll_back() -> None:
    c = HiCache(_cfg(device_pages=3))
    a = _seq(0, 3 * P, 1)
    c.insert(*a)
    c.evict()
    b = _seq(500, 2 * P, 2)
    c.insert(*b)
    held = c.hold(c.match(b[0]))                 # as if another batch were using b's pages
    with pytest.raises(CacheFullError):
        c.load(a[0])
    assert all(n.device_page is None for n in c.match(a[0]))
    assert len(c.dev_pool.used) == 2
    with pytest.raises(CacheFullError):
        c.insert(*_seq(900, 2 * P, 3))
    assert c.match(list(range(900, 900 + 2 * P))) == [] and len(c.dev_pool.used) == 2
    c.unhold(held)
    kv, idx = c.gather(a[0])
    assert torch.equal(kv, a[1]) and torch.equal(idx, a[2])


def test_plan_checked_once_per_shape() -> None:
    c = HiCache(_cfg())
    toks, kv, idx = _seq(0, 2 * P, 6)
    c.insert(toks, kv, idx)
    for _ in range(3):
        c.load(toks)
    s = c.stats()
    # checked when the cache is made, then a verdict-cache hit in front of each batch
    assert (s["plans_checked"], s["plan_cache_hits"], s["batches"]) == (1, 3, 3)


@pytest.mark.parametrize("schedule", ["adversarial", "random", "eager"])
@pytest.mark.parametrize("seed", range(3))
def test_fixed_forward_matches_reference_after_swap_in(schedule: str, seed: int) -> None:
    c = HiCache(_cfg(schedule=schedule, seed=seed))
    toks, kv, idx = _seq(0, 8 * P, seed)
    other = _seq(1000, 8 * P, 50 + seed)
    c.insert(toks, kv, idx)
    c.evict()
    c.insert(*other)                             # device pages now hold another prefix
    c.evict()
    q, h = torch.randn(L, I), torch.randn(D)
    r = c.load(toks, q, h)
    ref_s, ref_h = reference_forward(kv, idx, q, h, 6)
    assert r.swapped == 8 and r.exec.races == []
    assert all(torch.equal(a, b) for a, b in zip(r.scores, ref_s)) and torch.equal(r.hidden, ref_h)


def test_prefix_variant_is_refused_unless_allowed_and_then_corrupts() -> None:
    with pytest.raises(PlanRaceError, match="indexer\\[0\\].*load_idx\\[0\\]"):
        HiCache(_cfg(variant="unfixed")).load([1, 2, 3, 4])
    c = HiCache(_cfg(variant="unfixed", allow_races=True, schedule="adversarial", poison=float("nan")))
    toks, kv, idx = _seq(0, 8 * P, 9)
    c.insert(toks, kv, idx)
    c.evict()
    q, h = torch.randn(L, I), torch.randn(D)
    r = c.load(toks, q, h)
    ref_s, _ = reference_forward(kv, idx, q, h, 6)
    assert sum(not torch.equal(a, b) for a, b in zip(r.scores, ref_s)) >= 1
    assert r.exec.races


def test_last_trace_parses_as_a_plan() -> None:
    c = HiCache(_cfg())
    c.insert(*_seq(0, P, 0))
    c.load(list(range(P)))
    plan = plan_loads("\n".join(c.last_trace))
    assert plan.name == "hicache/fixed/L=3" and len(plan.instrs) == 2 + 8 * L


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="HiCacheConfig.layers"):
        _cfg(layers=0)
    with pytest.raises(ValueError, match="HiCacheConfig.variant 'old'"):
        _cfg(variant="old")
    with pytest.raises(ValueError, match="do not match"):
        HiCache(_cfg()).insert([1] * P, torch.zeros(L, P, D + 1), torch.zeros(L, P, I))


def test_runtime_never_imports_verify() -> None:
    code = ("import sys, kvproof.runtime.hicache.cache, kvproof.runtime.streams.executor, kvproof.runtime.tools.hicache_bench; "
            "bad = [m for m in sys.modules if m.startswith('kvproof.verify') or m == 'z3']; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_quick_runs_on_cpu() -> None:
    from kvproof.runtime.tools.hicache_bench import bench_hicache
    r = bench_hicache(quick=True)
    if not torch.cuda.is_available():
        assert r["device"] == "cpu" and r["hidden_fraction"] == 0.0
    assert r["swap_in_gbps"] > 0 and r["plain_copy_gbps"] > 0 and r["plan_checks"] == 1


def test_direct_copy_path_used_on_cuda_is_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA copy code (pinned runs -> staging -> index_copy_), run eagerly on CPU tensors."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    c = HiCache(_cfg(device_pages=6, schedule="eager"))
    a, b = _seq(0, 6 * P, 1), _seq(100, 4 * P, 2)
    c.insert(*a)
    c.evict()
    c.insert(*b)                                 # scramble which device pages are free
    monkeypatch.setattr(c, "cuda", True)
    kv, idx = c.gather(a[0])
    assert torch.equal(kv, a[1]) and torch.equal(idx, a[2])
