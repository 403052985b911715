"""Proofs and refutations of the KV slot protocol, guard necessity, liveness."""
import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from kvproof.spec.core import Bool, Protocol, Var, action, invariant, liveness
from kvproof.spec.kv_slot import KVSlot
from kvproof.verify.bmc import bmc, induction
from kvproof.verify.explore import explore, fair_liveness_violations
from kvproof.verify.guards import necessity
from kvproof.verify.prove import run_checks, select
from kvproof.verify.registry import all_checks
from kvproof.verify.report import mermaid, step_table, to_junit, to_sarif
from kvproof.verify.stateful import machine_for
from kvproof.verify.verdict import Status

PROPS = [n for n, i in KVSlot.invariants.items() if not i.strengthening]


def test_every_kv_slot_check_meets_its_expectation():
    verdicts = run_checks(select(all_checks(), ["kv_slot"], None))
    assert len(verdicts) >= 30
    bad = [v.check_id for v in verdicts if not v.ok]
    assert not bad, bad
    fixed = [v for v in verdicts if v.variant == "fixed" and v.property == "no_cross_request_write"]
    assert {v.params["slots"] for v in fixed} >= {1, 2, 3, 4}


def test_fixed_is_inductive_only_with_its_strengthening():
    params = {"slots": 1, "writers": 2}
    assert induction(KVSlot, "fixed", params, list(KVSlot.invariants)).proven
    bare = induction(KVSlot, "fixed", params, PROPS)
    assert not bare.proven and bare.cti is not None   # the properties alone are not inductive


def test_prefix_counterexample_reads_as_the_post_mortem_bug():
    cex = bmc(KVSlot, "unfixed", {"slots": 1, "writers": 1}, ["no_cross_request_write"], 10)
    assert cex is not None and len(cex.steps) <= 8
    acts = [s.action for s in cex.steps]
    # abort frees the slot, the slot is reused, then the stale write lands
    i_abort = acts.index("abort")
    i_reuse = acts.index("alloc", i_abort)
    assert acts[-1] == "land" and i_reuse < len(acts) - 1
    assert cex.steps[-1].params["e"] < cex.final_state["epoch[0]"]
    assert cex.final_state["corrupt[0]"] is True
    table, diagram = step_table(cex.steps), mermaid(cex.steps)
    assert "abort(s=0)" in table and diagram.startswith("sequenceDiagram")
    assert "net->>decode" in diagram


@pytest.mark.parametrize("guard", ["all_started_writes_completed", "no_post_after_abort"])
def test_removing_a_handshake_guard_breaks_no_cross_request_write(guard):
    cex = bmc(KVSlot, "fixed", {"slots": 1, "writers": 1}, ["no_cross_request_write"], 12, frozenset({guard}))
    assert cex is not None and cex.steps[-1].action == "land"


def test_guard_necessity_report_classifies_guards():
    res = {r.guard: r for r in necessity(KVSlot, "fixed", {"slots": 1, "writers": 1}, depth=10,
                                         only=["all_started_writes_completed", "writes_in_flight",
                                               "all_writers_safe"])}
    assert res["all_started_writes_completed"].needed
    assert res["all_writers_safe"].needed
    assert not res["writes_in_flight"].needed and res["writes_in_flight"].still_inductive


def test_guards_bmc_cannot_settle_are_searched_exhaustively():
    """`sending` is not needed for any property in the whole reachable space of the instance (1,856
    states, pinned), though the strengthened invariant needs it; a guard whose counterexample is
    longer than the BMC bound is still classified NEEDED, with the shortest counterexample."""
    res = {r.guard: r for r in necessity(KVSlot, "fixed", {"slots": 1, "writers": 1}, depth=4,
                                         only=["sending", "safe_epoch_current"])}
    s = res["sending"]
    assert not s.needed and not s.still_inductive and s.exhaustive_states == 1856
    e = res["safe_epoch_current"]
    assert e.needed and e.exhaustive_states is None and len(e.counterexample.steps) == 12
    assert e.broken == "no_write_into_free_slot"


def test_liveness_holds_for_fixed():
    ex = explore(KVSlot, "fixed", {"slots": 1, "writers": 1, "max_epoch": 2, "max_chunks": 1})
    assert not fair_liveness_violations(ex, "aborted_slot_reclaimed")
    assert not ex.deadlocks


class _Stuck(Protocol):
    """A toy protocol whose 'answer' can be lost forever: the liveness checker must say so."""
    name = "stuck"
    variants = ("lossy",)
    actors = ("a",)
    indices = {"slot": "slots"}
    bounds = {"slots": 1}
    vars = {"waiting": Var(Bool(), ("slot",), "a"), "lost": Var(Bool(), ("slot",), "a")}

    @action("a", s="slot")
    def start(P, m, s):
        m.require(m.not_(m.waiting[s]), "idle")
        m.waiting[s] = True

    @action("a", s="slot")
    def lose(P, m, s):
        m.require(m.waiting[s], "waiting")
        m.lost[s] = True

    @action("a", s="slot")
    def answer(P, m, s):
        m.require(m.all([m.waiting[s], m.not_(m.lost[s])]), "not_lost")
        m.waiting[s] = False

    @invariant(s="slot")
    def trivially(P, m, s):
        return True

    def _pending(P, m, s):
        return m.waiting[s]

    def _done(P, m, s):
        return m.not_(m.waiting[s])

    @liveness("_pending", "_done", s="slot")
    def answered(P):
        """Every start is eventually answered."""


def test_liveness_checker_finds_a_lost_answer():
    ex = explore(_Stuck, "lossy", {"slots": 1})
    bad = fair_liveness_violations(ex, "answered")
    assert bad and bad[0]["state"] == (True, True)      # waiting, answer lost: never answered


def test_generated_stateful_machine_passes_on_fixed():
    M = machine_for(KVSlot, "fixed", {"slots": 2, "writers": 2, "max_epoch": 3, "max_chunks": 2})
    run_state_machine_as_test(M, settings=settings(max_examples=40, stateful_step_count=30, deadline=None))


@pytest.mark.parametrize("guard", ["no_post_after_abort", "all_writers_safe"])
def test_generated_stateful_machine_fails_without_a_guard(guard):
    M = machine_for(KVSlot, "fixed", {"slots": 1, "writers": 1, "max_epoch": 3, "max_chunks": 2},
                    dropped=frozenset({guard}), include_strengthening=False)
    with pytest.raises(AssertionError, match="property no_"):
        run_state_machine_as_test(M, settings=settings(max_examples=1000, stateful_step_count=30,
                                                      deadline=None, print_blob=False, derandomize=True,
                                                      database=None))


def test_machine_readable_reports():
    verdicts = run_checks(select(all_checks(), ["kv_slot"], ["unfixed"]))
    xml = to_junit(verdicts, 1.0)
    assert "<testsuite" in xml and 'failures="0"' in xml
    sarif = to_sarif(verdicts, {"kv_slot": "spec/kv_slot.py"})
    assert sarif["version"] == "2.1.0" and len(sarif["runs"][0]["results"]) == len(verdicts)
    assert all(v.status == Status.REFUTED for v in verdicts)


class _Neighbourly(Protocol):
    """A toy protocol whose action peeks at another slot: one-slot proofs must not generalise."""
    name = "neighbourly"
    variants = ("v",)
    actors = ("a",)
    indices = {"slot": "slots"}
    bounds = {"slots": 2}
    vars = {"busy": Var(Bool(), ("slot",), "a")}

    @action("a", s="slot")
    def take(P, m, s):
        m.require(m.not_(m.busy[(s + 1) % 2]), "neighbour_idle")
        m.busy[s] = True

    @invariant(s="slot")
    def fine(P, m, s):
        return True


def test_slot_locality_holds_for_kv_slot_and_fails_for_a_nonlocal_protocol():
    from kvproof.verify.locality import slot_locality
    assert slot_locality(KVSlot, "fixed", {"writers": 2}) == []
    problems = slot_locality(_Neighbourly, "v", {})
    assert problems and "guard neighbour_idle reads slots [1]" in problems[0]
