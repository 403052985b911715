"""The CPU stream emulator: adversarial schedules corrupt the pre-fix plan, never the fixed one."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from stream_plans import tiny_plans
from kvproof.runtime.streams.executor import emulate, run_sync
from kvproof.spec.hicache_plan import hicache_plan
from kvproof.spec.streams import Op, Plan, check_plan

LAYERS, T, I = 4, 16, 8


def _toy(plan: Plan, seed: int = 0) -> tuple[dict, dict]:
    """Per-layer host Indexer cache, a stale device copy, and q.relu sum scores as the toy indexer."""
    g = torch.Generator().manual_seed(seed)
    host = {l: torch.randn(T, I, generator=g) for l in range(LAYERS)}
    dev = {l: torch.full((T, I), 7.0) for l in range(LAYERS)}          # stale: last batch's pages
    q = torch.randn(LAYERS, I, generator=g)
    out: dict = {}

    def load(l: int):
        def start():
            snap = host[l].clone()
            return lambda: dev[l].copy_(snap)
        return start

    def indexer(l: int):
        def start():
            s = torch.relu(dev[l] @ q[l]).sum()
            return lambda: out.__setitem__(l, s)
        return start

    impls = {}
    for ins in plan.instrs:
        if isinstance(ins, Op):
            l = int(ins.name.split("[")[1].rstrip("]"))
            impls[ins.name] = load(l) if ins.name.startswith("load_idx") else \
                indexer(l) if ins.name.startswith("indexer") else (lambda: None)
    ref = {l: torch.relu(host[l] @ q[l]).sum() for l in range(LAYERS)}
    return impls, {"out": out, "ref": ref}


@pytest.mark.parametrize("seed", range(5))
def test_prefix_plan_adversarial_reads_stale_indexer_cache(seed: int) -> None:
    plan = hicache_plan(LAYERS, "unfixed")
    impls, d = _toy(plan, seed)
    res = emulate(plan, impls, "adversarial", seed)
    wrong = [l for l in range(LAYERS) if not torch.equal(d["out"][l], d["ref"][l])]
    assert wrong, "the adversary should make at least one indexer read stale data"
    assert {plan.instrs[r.after].name for r in res.races} >= {f"indexer[{l}]" for l in wrong}


@pytest.mark.parametrize("policy", ["adversarial", "random", "eager"])
@pytest.mark.parametrize("seed", range(6))
def test_fixed_plan_always_matches_reference(policy: str, seed: int) -> None:
    plan = hicache_plan(LAYERS, "fixed")
    impls, d = _toy(plan, seed)
    res = emulate(plan, impls, policy, seed)
    assert res.races == []
    for l in range(LAYERS):
        assert torch.equal(d["out"][l], d["ref"][l]), l


def test_sync_reference_matches() -> None:
    plan = hicache_plan(LAYERS, "unfixed")
    impls, d = _toy(plan)
    run_sync(plan, impls)
    assert all(torch.equal(d["out"][l], d["ref"][l]) for l in range(LAYERS))


def test_random_schedules_eventually_expose_prefix() -> None:
    plan = hicache_plan(LAYERS, "unfixed")
    seen = 0
    for seed in range(20):
        impls, d = _toy(plan, seed)
        emulate(plan, impls, "random", seed)
        seen += any(not torch.equal(d["out"][l], d["ref"][l]) for l in range(LAYERS))
    assert seen > 0


def test_missing_impl_and_bad_policy_are_named() -> None:
    plan = hicache_plan(1, "fixed")
    with pytest.raises(KeyError, match="load_idx"):
        emulate(plan, {}, "random")
    with pytest.raises(ValueError, match="'lazy'"):
        emulate(plan, {}, "lazy")


@settings(max_examples=60, deadline=None)
@given(tiny_plans())
def test_emulator_races_are_reported_by_the_checker(plan: Plan) -> None:
    impls = {i.name: (lambda: None) for i in plan.instrs if isinstance(i, Op)}
    static = {(v.property, v.before, v.after) for v in check_plan(plan)}
    for seed in range(3):
        res = emulate(plan, impls, "random", seed)
        assert {(d.property, d.before, d.after) for d in res.races} <= static
