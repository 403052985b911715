"""The race audit: HB graph, Z3 witnesses consistent with the plan, parametric proof, prove checks."""
from __future__ import annotations

import importlib

import networkx as nx
import pytest
from hypothesis import given, settings

from stream_plans import tiny_plans
from kvproof.spec.hicache_plan import STREAMS, VARIANTS, hicache_plan, layer_block, layer_template
from kvproof.spec.streams import PROPERTIES, Op, Plan, check_plan, happens_before
from kvproof.verify import registry
from kvproof.verify.race import (Schedule, audit_plan, hb_graph, prove_template, render_timeline, schedule_errors,
                                 waits_needed, witness_schedule)
from kvproof.verify.verdict import Status


def _assert_witness(plan: Plan) -> None:
    for r in audit_plan(plan):
        assert schedule_errors(plan, r.schedule) == [], r.timeline()
        a, b = r.violation.before, r.violation.after
        # the bad interleaving happens: the later op runs entirely before the op it depends on
        assert r.schedule.times[b][1] <= r.schedule.times[a][0]
        assert r.schedule.times[b][1] < r.schedule.times[a][1]


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_prefix_witnesses_are_executions_with_the_race(layers: int) -> None:
    plan = hicache_plan(layers, "unfixed")
    reports = audit_plan(plan)
    assert len(reports) == layers
    _assert_witness(plan)
    text = reports[0].timeline()
    assert "indexer[0]" in text and "load_idx[0]" in text and "reads dev.idx[0]" in text


@settings(max_examples=60, deadline=None)
@given(tiny_plans())
def test_witnesses_consistent_on_random_plans(plan: Plan) -> None:
    _assert_witness(plan)


def test_schedule_errors_detects_a_broken_order() -> None:
    plan = hicache_plan(1, "fixed")
    serial = {i: (2 * i, 2 * i + (1 if isinstance(ins, Op) else 0)) for i, ins in enumerate(plan.instrs)}
    assert schedule_errors(plan, Schedule(serial)) == []      # issue order, one at a time: always legal
    serial[plan.op_index("indexer[0]")] = (0, 1)              # indexer before its idx_ready wait
    assert any("wait" in e or "stream" in e for e in schedule_errors(plan, Schedule(serial)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_hb_graph_matches_bitset_closure(variant: str) -> None:
    plan = hicache_plan(3, variant)
    g, hb = hb_graph(plan), happens_before(plan)
    assert nx.is_directed_acyclic_graph(g)
    ops = [i for i, ins in enumerate(plan.instrs) if isinstance(ins, Op)]
    for a in ops:
        for b in ops:
            if a != b:
                assert hb.ordered(a, b) == nx.has_path(g, ("end", a), ("start", b))


@pytest.mark.parametrize("prop", PROPERTIES)
def test_parametric_proof(prop: str) -> None:
    fixed = prove_template(layer_template("fixed"), STREAMS, prop, lambda l: layer_block(l, "fixed"))
    assert fixed.proven and fixed.span == 1, fixed.detail
    unfixed = prove_template(layer_template("unfixed"), STREAMS, prop, lambda l: layer_block(l, "unfixed"))
    assert unfixed.proven == (prop != "no_read_before_ready"), unfixed.detail


def test_every_wait_of_the_fixed_plan_is_needed() -> None:
    res = waits_needed(hicache_plan(3, "fixed", batches=2))
    assert [w for w, _ in res] == ["pages_free", "idx_ready", "kv_ready"] and all(n for _, n in res)


def test_prove_checks_have_expected_outcomes() -> None:
    checks = [c for c in registry.collect(importlib.import_module("kvproof.verify.checks_streams"))
              if c.protocol == "hicache"]
    assert len(checks) == 2 * len(PROPERTIES) + 1
    verdicts = [c.run() for c in checks]
    for c, v in zip(checks, verdicts):
        assert v.check_id == c.check_id and v.ok, (v.check_id, v.status, v.detail)
    refuted = [v for v in verdicts if v.status is Status.REFUTED]
    assert [v.check_id for v in refuted] == ["hicache/unfixed/no_read_before_ready[layers=1..64]"]
    v = refuted[0]
    assert v.witness["read"] == "indexer[0]" and v.witness["overtaken"] == "load_idx[0]"
    assert any("RACE" in s.note and s.action == "indexer[0]" for s in v.counterexample)
    fixed = next(v for v in verdicts if v.check_id.startswith("hicache/fixed/no_read_before_ready"))
    assert "every L >= 1" in fixed.method and "1..64" in fixed.method
    assert all(v.to_json()["ok"] for v in verdicts)


def test_timeline_marks_both_ops() -> None:
    plan = hicache_plan(1, "unfixed")
    v = check_plan(plan)[0]
    text = render_timeline(plan, witness_schedule(plan, v), v)
    assert "<-- reads dev.idx[0]" in text and "<-- overtaken" in text
