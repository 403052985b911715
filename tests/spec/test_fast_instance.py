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
    slow, fast = (cls(proto, variant, {}, actor="monitor") for cls in (Instance, FastInstance))
    rng = random.Random(1)
    for _ in range(300):
        action = rng.choice(["step", "step", "step", "flag_low_accept", "flag_degenerate"])
        args = {"accepted": rng.randrange(4), "drafted": rng.randrange(4)} if action == "step" else {}
        assert fast.enabled(action, **args) == slow.enabled(action, **args)
        if rng.random() < 0.3:                              # try_fire: the same firing or the same guard
            assert fast.try_fire(action, **args).guard == slow.try_fire(action, **args).guard
            assert fast.state == slow.state
            continue
        outcomes = []
        for inst in (slow, fast):
            try:
                inst.fire(action, **args)
                outcomes.append(None)
            except ProtocolViolation as e:
                outcomes.append(e.guard)
        assert outcomes[0] == outcomes[1]                    # a refusal names the same guard
        assert fast.state == slow.state
    assert fast.get("steps") > 0


def test_unknown_action_and_wrong_arguments_are_errors_as_before() -> None:
    fast = FastInstance(monitor_protocol(), "fixed", {}, actor="monitor")
    with pytest.raises(SpecError, match="unknown action"):
        fast.fire("nope")
    with pytest.raises(TypeError):
        fast.fire("step", accepted=1)                       # drafted missing: the interpreted path's error
