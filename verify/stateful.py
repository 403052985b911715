"""Hypothesis stateful tests generated from a spec: one rule per action, invariants after every step.

`machine_for(KVSlot, "fixed", params)` returns a `RuleBasedStateMachine` class.
Each rule fires one enabled instance of its action on the model (a global spec
instance, environment included). With a system under test (`sut_factory`), the
same step is applied to the real system and the two are compared after every
rule, in the style of Hypothesis's own stateful testing.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol as TypingProtocol

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvproof.spec.core import Layout, Protocol
from kvproof.spec.compiled import Compiled
from kvproof.spec.machine import CONCRETE, Emission, evaluate, holds


class SystemUnderTest(TypingProtocol):
    """What a real implementation offers to be driven beside the model."""

    def apply(self, action: str, args: dict[str, Any], emissions: list[Emission]) -> None:
        """Carry out the step the model just took (fire it in the runtime, land a write, ...)."""

    def can_apply(self, action: str, args: dict[str, Any]) -> bool:
        """Optional: whether the real system can take this step now (e.g. the message was sent)."""

    def mismatch(self, model_state: dict[str, Any]) -> str | None:
        """None when the real system's state equals the model's, else what differs."""

    def close(self) -> None:
        """Release resources."""


def machine_for(protocol: type[Protocol], variant: str, params: dict[str, int],
                dropped: frozenset[str] = frozenset(),
                sut_factory: Callable[[], SystemUnderTest] | None = None,
                include_strengthening: bool = True) -> type[RuleBasedStateMachine]:
    """Build a RuleBasedStateMachine class that explores `protocol` (and drives a SUT, if given)."""
    full = {**protocol.bounds, **params}
    layout = Layout.build(protocol, full)
    compiled = Compiled(protocol, full, variant, dropped)
    invs = [(name, inv, list(layout.instances(inv.params))) for name, inv in protocol.invariants.items()
            if include_strengthening or not inv.strengthening]

    def enabled_of(self: Any, action: str) -> list[tuple[dict[str, Any], tuple]]:
        if action in self.muted:
            return []
        if self._succ is None or self._succ[0] != self.state:
            by_action: dict[str, list] = {}
            for a, args, nxt in compiled.successors(self.state):
                by_action.setdefault(a, []).append((args, nxt))
            self._succ = (self.state, by_action)
        found = self._succ[1].get(action, [])
        can = getattr(self.sut, "can_apply", None)
        # The model's channels over-approximate (an "older" message may carry any older epoch,
        # even one never sent); a real system can only replay what really happened.
        return [(a, n) for a, n in found if can(action, a)] if can else found

    body: dict[str, Any] = {}

    def init(self: Any) -> None:
        RuleBasedStateMachine.__init__(self)
        self.state = layout.initial()
        self.steps = 0
        self._succ = None
        self.muted: frozenset[str] = frozenset()
        self.sut = sut_factory() if sut_factory else None

    body["__init__"] = init

    # Swarm testing: each run mutes a random subset of actions, so runs that never abort,
    # never kill a rank or never time out reach deep states that uniform choice rarely does.
    @initialize(muted=st.frozensets(st.sampled_from(sorted(protocol.actions))))
    def swarm(self: Any, muted: frozenset[str]) -> None:
        self.muted = muted

    body["swarm"] = swarm

    def make_rule(action: str) -> Callable:
        def fire(self: Any, data: Any) -> None:
            choices = enabled_of(self, action)
            args = data.draw(st.sampled_from([a for a, _ in choices]), label=f"{action} args")
            nxt = next(n for a, n in choices if a == args)
            emissions = evaluate(layout, self.state, protocol.actions[action], args, CONCRETE,
                                 variant, dropped).emissions
            self.state = nxt
            self.steps += 1
            if self.sut is not None:
                self.sut.apply(action, args, emissions)
        fire.__name__ = fire.__qualname__ = action
        return precondition(lambda self: bool(enabled_of(self, action)))(rule(data=st.data())(fire))

    for name in protocol.actions:
        body[name] = make_rule(name)

    @invariant()
    def properties_hold(self: Any) -> None:
        for name, inv, instances in invs:
            for args in instances:
                assert holds(layout, self.state, inv.body, args, CONCRETE, variant), (
                    f"{protocol.name}/{variant}: property {name}{tuple(args.values())} violated "
                    f"after {self.steps} steps")

    body["properties_hold"] = properties_hold

    @rule()
    def stutter(self: Any) -> None:
        """Do nothing (keeps a run going once the search bounds leave no action enabled)."""

    body["stutter"] = stutter

    @invariant()
    def system_matches_model(self: Any) -> None:
        if self.sut is not None:
            labelled = {layout.label(p): v for p, v in enumerate(self.state)}
            diff = self.sut.mismatch(labelled)
            assert diff is None, f"runtime differs from the spec model after {self.steps} steps: {diff}"

    body["system_matches_model"] = system_matches_model

    def teardown(self: Any) -> None:
        if self.sut is not None:
            self.sut.close()

    body["teardown"] = teardown
    cls_name = f"{protocol.__name__}_{variant}_Machine".replace("-", "_")
    return type(cls_name, (RuleBasedStateMachine,), body)
