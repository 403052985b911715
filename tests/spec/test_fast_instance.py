"""FastInstance (compiled firings) behaves as the interpreted Instance: same states, same refusals."""
from __future__ import annotations

import random
from fractions import Fraction

import pytest

from kvproof.spec.compiled import FastInstance
from kvproof.spec.core import ProtocolViolation, SpecError
from kvproof.spec.instance import Instance
from kvproof.spec.specdec_monitor import monitor_protocol


@pytest.mark.parametrize("variant", ["fixed", "naive"])
def test_monitor_runs_identically_compiled_and_interpreted(variant: str) -> None:
    proto = monitor_protocol(8, Fraction(7, 5), Fraction(24, 25))
    rng = random.Random(1)
    fired: set[str] = set()
    for run in range(6):                                    # a few runs: an abort ends one
        slow, fast = (cls(proto, variant, {}, actor="monitor") for cls in (Instance, FastInstance))
        for _ in range(200):
            action = rng.choice(["step", "step", "step", "step", "suspect_low_accept", "suspect_degenerate",
                                 "clear", "clear", "flag_low_accept"])
            d = rng.randrange(4)                            # runs of rejected, and of all-accepted, drafts
            a = rng.choice([0, 0, 0, d, d, rng.randrange(4)]) if run % 2 else rng.choice([d, d, d, 0, rng.randrange(4)])
            args = {"accepted": a, "drafted": d} if action == "step" else {}
            assert fast.enabled(action, **args) == slow.enabled(action, **args)
            before = repr(fast.state)
            if rng.random() < 0.3:                          # try_fire: the same firing or the same guard
                assert fast.try_fire(action, **args).guard == slow.try_fire(action, **args).guard
            else:
                outcomes = []
                for inst in (slow, fast):
                    try:
                        inst.fire(action, **args)
                        outcomes.append(None)
                    except ProtocolViolation as e:
                        outcomes.append(e.guard)
                assert outcomes[0] == outcomes[1]            # a refusal names the same guard
            assert fast.state == slow.state
            if repr(fast.state) != before:
                fired.add(action)
    assert fired == {"step", "suspect_low_accept", "suspect_degenerate", "clear", "flag_low_accept"}, fired


def test_unknown_action_and_wrong_arguments_are_errors_as_before() -> None:
    fast = FastInstance(monitor_protocol(), "fixed", {}, actor="monitor")
    with pytest.raises(SpecError, match="unknown action"):
        fast.fire("nope")
    with pytest.raises(TypeError):
        fast.fire("step", accepted=1)                       # drafted missing: the interpreted path's error
