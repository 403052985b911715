"""Proofs and refutations of the KV page lifecycle protocol (spec/kv_page.py)."""
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from kvproof.spec.kv_page import KVPage, PState
from kvproof.spec.instance import Instance
from kvproof.spec.core import ProtocolViolation
from kvproof.verify.bmc import bmc, induction
from kvproof.verify.locality import slot_locality
from kvproof.verify.prove import run_checks, select
from kvproof.verify.registry import all_checks
from kvproof.verify.stateful import machine_for
from kvproof.verify.verdict import Status

import pytest

PROPS = [n for n, i in KVPage.invariants.items() if not i.strengthening]


def test_every_kv_page_check_meets_its_expectation():
    verdicts = run_checks(select(all_checks(), ["kv_page"], None))
    bad = [v.check_id for v in verdicts if not v.ok]
    assert not bad, bad
    unbounded = [v for v in verdicts if v.params.get("pages") == "any"]
    assert {v.property for v in unbounded} == set(PROPS)
    assert all(v.status is Status.PROVEN and "locality" in v.method for v in unbounded)
    for variant in ("evict_locked", "free_while_loading", "reuse_before_writeback"):
        refuted = [v for v in verdicts if v.variant == variant]
        assert refuted and all(v.status is Status.REFUTED and 0 < len(v.counterexample) <= 10 for v in refuted)


def test_fixed_is_inductive_only_with_its_strengthening():
    assert induction(KVPage, "fixed", {"pages": 1}, list(KVPage.invariants)).proven
    assert not induction(KVPage, "fixed", {"pages": 1}, PROPS).proven


def test_page_locality_holds_and_is_checked_per_page():
    assert slot_locality(KVPage, "fixed", {"pages": 2}, index="page") == []


def test_evicting_a_locked_page_hands_its_reader_foreign_content():
    cex = bmc(KVPage, "evict_locked", {"pages": 1}, ["reads_own_content"], 10)
    acts = [s.action for s in cex.steps]
    assert "unlock" not in acts and {"drop", "evict_start"} & set(acts[:-1])
    assert acts[-1] == "read" and cex.final_state["bad_read[0]"] is True


def test_freeing_a_loading_page_lets_the_load_land_in_the_next_content():
    cex = bmc(KVPage, "free_while_loading", {"pages": 1}, ["no_load_into_foreign_content"], 10)
    assert [s.action for s in cex.steps] == ["alloc", "load_start", "free", "land"]


def test_reuse_before_writeback_corrupts_the_host_copy():
    cex = bmc(KVPage, "reuse_before_writeback", {"pages": 1}, ["host_copy_intact"], 10)
    acts = [s.action for s in cex.steps]
    assert acts[-1] == "wb_done" and acts.index("evict_start") < max(
        i for i, a in enumerate(acts) if a in ("alloc", "load_start"))


def test_firing_refuses_a_double_free_and_an_early_eviction():
    inst = Instance(KVPage, "fixed", {"pages": 2})
    inst.fire("alloc", p=0)
    inst.fire("free", p=0)
    with pytest.raises(ProtocolViolation, match="owned_or_loading"):
        inst.fire("free", p=0)                     # the abort that races a finish
    inst.fire("alloc", p=1)
    inst.fire("publish", p=1)
    with pytest.raises(ProtocolViolation, match="no_lock_references"):
        inst.fire("evict_start", p=1)              # its owner still holds it
    inst.fire("unlock", p=1, e=inst.get("tag", 1))
    inst.fire("evict_start", p=1)
    assert inst.get("st", 1) == PState.EVICTING
    with pytest.raises(ProtocolViolation, match="page_free"):
        inst.fire("alloc", p=1)                    # not before the write-back completed
    inst.fire("wb_done", p=1)
    inst.fire("alloc", p=1)
    assert inst.violated_invariants(strengthening=True) == []


def test_generated_machine_keeps_every_property():
    cls = machine_for(KVPage, "fixed", {"pages": 2, "max_epoch": 3, "max_refs": 2})
    run_state_machine_as_test(cls, settings=settings(max_examples=30, stateful_step_count=30, deadline=None))
