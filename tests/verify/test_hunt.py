"""Generated bug-hunting machines find every registered pre-fix variant in a few hundred examples."""
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.specdec_monitor import AcceptMonitor
from kvproof.verify.hunt import enabled_fractions, hunter_for, rarity_weights
from kvproof.spec.compiled import Compiled

UNFIXED = "unfixed"      # the pre-fix variant
W2 = {"slots": 1, "writers": 2, "max_epoch": 2, "max_chunks": 2}

# Deterministic (derandomized, no example database) and cheap: no shrinking, a modest budget.
BUDGET = settings(max_examples=300, stateful_step_count=40, deadline=None, derandomize=True, database=None,
                  print_blob=False, phases=[Phase.generate, Phase.target], suppress_health_check=list(HealthCheck))

CASES = [
    # the registered pre-fix variants, with two writers (one and two slots)
    pytest.param(KVSlot, UNFIXED, W2, frozenset(), None, "no_write_into_free_slot", id="kv_slot-unfixed-w2"),
    pytest.param(KVSlot, UNFIXED, {**W2, "slots": 2}, frozenset(), ["no_cross_request_write"],
                 "no_cross_request_write", id="kv_slot-unfixed-s2w2-cross-request"),
    pytest.param(AcceptMonitor, "naive", {}, frozenset(), None, "never_aborts_before_min_tokens",
                 id="monitor-naive"),
    # the handshake guard whose counterexample needs eight steps and a write still in flight (the search
    # watches the cross-request property only: a write landing in the then-free slot is found first
    # otherwise, depending on what ran before in the process)
    pytest.param(KVSlot, "fixed", W2, frozenset({"all_started_writes_completed"}), ["no_cross_request_write"],
                 "no_cross_request_write", id="kv_slot-fixed-w2-without-all_started_writes_completed"),
]


@pytest.mark.parametrize("proto,variant,params,dropped,props,expect", CASES)
def test_hunter_finds_the_bug(proto, variant, params, dropped, props, expect):
    M = hunter_for(proto, variant, params, dropped, props)
    with pytest.raises(AssertionError, match=f"property {expect}"):
        run_state_machine_as_test(M, settings=BUDGET)


def test_hunter_raises_no_false_alarm_on_the_fixed_protocol():
    run_state_machine_as_test(hunter_for(KVSlot, "fixed", W2), settings=settings(BUDGET, max_examples=60))


def test_rare_actions_weigh_more():
    comp = Compiled(KVSlot, {**KVSlot.bounds, **W2}, "fixed")
    fr = enabled_fractions(comp, list(KVSlot.actions))
    w = rarity_weights(fr)
    # reading a slot needs every rank done; polling a completion is possible almost always
    assert 0 < fr["start_decode"] < fr["p_complete"] and w["start_decode"] > w["p_complete"]
    assert all(x > 0 for x in fr.values())      # every action fires somewhere in the instance


def test_unknown_property_is_a_clear_error():
    with pytest.raises(ValueError, match="no property 'nope'.*no_cross_request_write"):
        hunter_for(KVSlot, "fixed", W2, properties=["nope"])
