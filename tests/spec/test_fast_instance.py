"""FastInstance (compiled firings) behaves as the interpreted Instance: same states, same refusals (same guard)."""
from __future__ import annotations

import random
from fractions import Fraction
from typing import Any

import pytest

from kvproof.spec.catalog import PROTOCOLS
from kvproof.spec.compiled import Compiled, FastInstance
from kvproof.spec.core import Protocol, ProtocolViolation, SpecError
from kvproof.spec.instance import Instance
from kvproof.spec.specdec_monitor import Phase, audit_error, monitor_protocol


def _audit_args(rng: random.Random) -> dict[str, int]:
    """An audit's error: intact (tiny), corrupted (large), at the tolerance's edge, infinite or NaN."""
    err = rng.choice([1e-12, 0.0, 0.5, 0.5000001, 0.11, 1.4, 27.0, float("inf"), float("nan")])
    return audit_error(err) if rng.random() < 0.8 else {"error_num": rng.randrange(4), "error_den": rng.randrange(4)}


@pytest.mark.parametrize("variant", ["fixed", "naive"])
def test_monitor_runs_identically_compiled_and_interpreted(variant: str) -> None:
    proto = monitor_protocol(8, Fraction(7, 5), Fraction(24, 25))
    rng, audits = random.Random(1), random.Random(2)       # audits: its own stream, so the actions' stays
    fired: set[str] = set()
    for run in range(6):                                    # a few runs: an abort ends one
        slow, fast = (cls(proto, variant, {}, actor="monitor") for cls in (Instance, FastInstance))
        for _ in range(200):
            action = rng.choice(["step", "step", "step", "step", "suspect_low_accept", "suspect_degenerate",
                                 "clear", "clear", "flag_low_accept"])
            d = rng.randrange(4)                            # runs of rejected, and of all-accepted, drafts
            a = rng.choice([0, 0, 0, d, d, rng.randrange(4)]) if run % 2 else rng.choice([d, d, d, 0, rng.randrange(4)])
            args = ({"accepted": a, "drafted": d} if action == "step" else
                    _audit_args(audits) if action in ("clear", "flag_low_accept") else {})
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


def _outcome(inst: Instance, how: str, action: str, args: dict[str, Any]) -> tuple[str, Any]:
    """What one call did: its result (a try_fire's guard, why_disabled's answer) or the error it raised."""
    try:
        if how == "try_fire":
            return "guard", inst.try_fire(action, **args).guard
        if how == "fire":
            inst.fire(action, **args)
            return "fired", None
        return "why", inst.why_disabled(action, **args)
    except ProtocolViolation as e:
        return "violation", e.guard
    except (SpecError, TypeError) as e:
        return type(e).__name__, str(e)


def _compare(proto: type[Protocol], variant: str, params: dict[str, int], actor: str | None,
             states: list[tuple], calls: list[tuple[str, dict[str, Any]]], rng: random.Random) -> set[str]:
    """Each call from random states on both instances: the same outcome, the same state after; the guards seen."""
    slow = Instance(proto, variant, params, actor=actor)
    fast = FastInstance(proto, variant, params, actor=actor)
    refusals: set[str] = set()
    for action, args in calls:
        st = list(rng.choice(states))
        slow.state[:], fast.state[:] = st, st
        how = rng.choice(["try_fire", "fire", "why"])
        got = _outcome(fast, how, action, args)
        assert got == _outcome(slow, how, action, args), (action, args, how, st)
        assert fast.state == slow.state, (action, args, how, st)
        assert fast.enabled(action, **args) == slow.enabled(action, **args)
        if got[0] in ("guard", "violation", "why") and got[1] is not None:
            refusals.add(got[1])
    return refusals


@pytest.mark.parametrize("variant", ["fixed", "naive"])
@pytest.mark.parametrize("thresholds", [(8, Fraction(7, 5), Fraction(24, 25), Fraction(1, 2)),
                                        (0, Fraction(6, 5), Fraction(1), Fraction(0)),
                                        (128, Fraction(3, 2), Fraction(2, 3), Fraction(1, 1000))])
def test_monitor_refusals_name_the_same_guard_from_random_states(variant: str, thresholds: tuple) -> None:
    """Arbitrary (not only reachable) monitor states and arguments, including out-of-domain ones."""
    proto = monitor_protocol(*thresholds)
    rng = random.Random(f"{variant}{thresholds}")       # str seeds are deterministic
    layout = FastInstance(proto, variant, {}, actor="monitor").layout

    def state() -> tuple:
        return tuple(rng.choice([Phase.RUNNING, *Phase]) if v == "phase" else      # running: the most guards to pass
                     rng.choice([0, 1, 2, 3, rng.randrange(300), rng.randrange(300)]) for v, _ in layout.names)

    def args(action: str) -> dict[str, Any]:
        if action == "step":
            return {"accepted": rng.randrange(-1, 5), "drafted": rng.randrange(-1, 5)}
        return _audit_args(rng) if "error_num" in {p.name for p in proto.actions[action].params} else {}
    states = [state() for _ in range(500)]
    calls = [(a, args(a)) for a in (rng.choice(list(proto.actions)) for _ in range(1500))]
    refusals = _compare(proto, variant, {}, "monitor", states, calls, rng)
    # every guard of the protocol was the refusing one somewhere (a nat_nonnegative refusal: a negative step)
    guards = {"running", "drafted_some", "accepted_le_drafted", "past_min_tokens", "accept_length_below_threshold",
              "accept_rate_above_threshold", "suspect", "audit_error_finite", "audit_error_within_rtol",
              "suspect_low_accept", "suspect_degenerate", "audit_error_beyond_rtol"}
    if variant == "fixed":
        guards |= {"no_step_past_threshold"}
    else:
        guards -= {"past_min_tokens"}
    assert guards <= refusals, guards - refusals


@pytest.mark.parametrize("name", sorted(set(PROTOCOLS) - {"specdec_monitor"}))
def test_other_protocols_refusals_name_the_same_guard(name: str) -> None:
    """The same mechanism on the other catalog protocols, per actor, from states of a random walk."""
    proto = PROTOCOLS[name]
    rng = random.Random(7)
    params = {**proto.bounds}
    variant = "fixed" if "fixed" in proto.variants else proto.variants[0]
    comp = Compiled(proto, params, variant)
    st, states = comp.layout.initial(), []
    for _ in range(400):                                   # a random walk, restarted at dead ends
        nxt = list(comp.successors(st))
        st = rng.choice(nxt)[2] if nxt else comp.layout.initial()
        states.append(st)
    refused = 0
    for actor in proto.actors:
        actions = [a for a, d in proto.actions.items() if d.actor == actor]
        calls = []
        for _ in range(300):
            a = rng.choice(actions)
            adef = proto.actions[a]
            calls.append((a, {p.name: rng.choice(list(comp.layout.range(p.index))) if p.index else
                              rng.randrange(params[p.bound] + 2) for p in adef.params}))
        refused += len(_compare(proto, variant, params, actor, states, calls, rng))
    assert refused > 3, "the comparison saw refusals"


def test_a_compiled_refusal_does_not_run_the_interpreted_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """try_fire, fire and why_disabled name a refusing guard from the compiled function alone."""
    fast = FastInstance(monitor_protocol(), "fixed", {}, actor="monitor")
    fast.try_fire("step", accepted=1, drafted=2)                 # compiled once, before the interpreter is cut off

    def no_interpreter(*_: Any, **__: Any) -> None:
        raise AssertionError("the interpreted path ran")
    monkeypatch.setattr(Instance, "_eval", no_interpreter)
    assert fast.try_fire("suspect_low_accept").guard == "past_min_tokens"
    assert fast.why_disabled("clear", error_num=0, error_den=1) == "suspect"
    with pytest.raises(ProtocolViolation, match="'drafted_some'"):
        fast.fire("step", accepted=0, drafted=0)
    assert fast.try_fire("step", accepted=2, drafted=2) and fast.get("accepted") == 3


def test_unknown_action_and_wrong_arguments_are_errors_as_before() -> None:
    fast = FastInstance(monitor_protocol(), "fixed", {}, actor="monitor")
    with pytest.raises(SpecError, match="unknown action"):
        fast.fire("nope")
    with pytest.raises(TypeError):
        fast.fire("step", accepted=1)                       # drafted missing: the interpreted path's error
    fast.fire("step", accepted=1, drafted=2)                # compiled now
    with pytest.raises(TypeError):
        fast.try_fire("step", accepted=1, drafted=2, extra=0)   # an unexpected argument, even once compiled
    with pytest.raises(TypeError):
        fast.why_disabled("clear")                          # the audit's error missing
