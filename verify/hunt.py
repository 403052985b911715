"""Bug-hunting Hypothesis machines generated from a spec: rare actions weighted up, swarm, targeting.

`hunter_for(protocol, variant, params)` returns a `RuleBasedStateMachine` whose
one rule fires an enabled action instance, chosen with weights derived from the
spec so that multi-step, multi-writer bugs are reached in few examples:

* rarity: an action enabled in few reachable states of the instance (measured by
  a bounded breadth-first search of the compiled spec) weighs more, so runs do
  not drown in the always-enabled ones (alloc, post, land);
* novelty: within a run, an action weighs less each time it fires, so a run
  reaches the end of a handshake instead of repeating its start;
* swarm testing: each run leaves out a random subset of the actions;
* `hypothesis.target`: the number of strengthening-invariant instances a run
  broke, since a pre-fix variant breaks these before it breaks a property.

The per-action machine of `verify/stateful.py` stays the one that drives a
system under test; this one only looks for violations of the properties.
"""
from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis import target
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvproof.spec.compiled import Compiled, compile_predicate
from kvproof.spec.core import Protocol, variant_name

_RESOLUTION = 1 << 16           # weighted choice: one integer draw, shrinking towards the first action


def enabled_fractions(comp: Compiled, actions: list[str], cap: int = 4000) -> dict[str, float]:
    """For each action, the fraction of the first `cap` breadth-first states in which it is enabled."""
    seen = {comp.layout.initial()}
    frontier, counts, n = [comp.layout.initial()], dict.fromkeys(actions, 0), 0
    while frontier and n < cap:
        nxt_frontier = []
        for s in frontier:
            n += 1
            names = set()
            for k, _, nxt in comp.step(s):
                names.add(comp.entries[k][0])
                if nxt not in seen and len(seen) < cap:
                    seen.add(nxt)
                    nxt_frontier.append(nxt)
            for a in names:
                counts[a] += 1
        frontier = nxt_frontier
    return {a: counts[a] / max(n, 1) for a in actions}


def rarity_weights(fractions: dict[str, float]) -> dict[str, float]:
    """Weight of an action: the inverse of how often it is enabled (never-seen ones as the rarest)."""
    seen = [f for f in fractions.values() if f > 0]
    floor = min(seen) if seen else 1.0
    return {a: 1.0 / max(f, floor) for a, f in fractions.items()}


def hunter_for(protocol: type[Protocol], variant: str, params: dict[str, int],
               dropped: frozenset[str] = frozenset(),
               properties: list[str] | None = None) -> type[RuleBasedStateMachine]:
    """A RuleBasedStateMachine that hunts violations of `properties` (default: every user property)."""
    variant = variant_name(variant)
    full = {**protocol.bounds, **params}
    user = [n for n, i in protocol.invariants.items() if not i.strengthening]
    unknown = sorted(set(properties or ()) - set(user))
    if unknown:
        raise ValueError(f"{protocol.name}: no property {unknown[0]!r}; expected one of {', '.join(user)}")
    comp = Compiled(protocol, full, variant, dropped, properties)
    actions = list(protocol.actions)
    weights = rarity_weights(enabled_fractions(comp, actions))
    helpers = [f for name, inv in protocol.invariants.items() if inv.strengthening
               for f in (compile_predicate(comp.layout, inv.body, args, variant)
                         for args in comp.layout.instances(inv.params))]

    class Hunter(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.state = comp.layout.initial()
            self.history: list[str] = []
            self.fired = dict.fromkeys(actions, 0)
            self.muted: frozenset[str] = frozenset()
            self.broken = 0

        @initialize(muted=st.frozensets(st.sampled_from(actions)))
        def swarm(self, muted: frozenset[str]) -> None:
            self.muted = muted

        @rule(data=st.data())
        def step(self, data: Any) -> None:
            by_action: dict[str, list] = {}
            for k, d, nxt in comp.step(self.state):
                by_action.setdefault(comp.entries[k][0], []).append((k, d, nxt))
            live = [a for a in actions if a in by_action and a not in self.muted] or \
                [a for a in actions if a in by_action]
            if not live:
                return                          # nothing enabled within the bounds: stutter
            ws = [weights[a] / (1 + self.fired[a]) for a in live]
            x = data.draw(st.integers(0, _RESOLUTION - 1), label="action") * sum(ws) / _RESOLUTION
            pick = live[-1]
            for a, w in zip(live, ws):
                if x < w:
                    pick = a
                    break
                x -= w
            choices = by_action[pick]
            k, d, nxt = choices[data.draw(st.integers(0, len(choices) - 1), label="instance")]
            name, args = comp.label(k, d)
            self.history.append(f"{name}({', '.join(f'{a}={v}' for a, v in args.items())})")
            self.fired[pick] += 1
            self.state = nxt

        @invariant()
        def properties_hold(self) -> None:
            bad = comp.violated(self.state)
            assert not bad, (f"{protocol.name}/{variant}: property {bad[0][0]}{tuple(bad[0][1].values())} "
                             f"violated after {len(self.history)} steps: {' -> '.join(self.history)}")
            self.broken = max(self.broken, sum(1 for f in helpers if not f(self.state)))

        def teardown(self) -> None:
            if helpers:
                target(float(self.broken), label="strengthening invariants broken")

    Hunter.__name__ = Hunter.__qualname__ = f"{protocol.__name__}_{variant}_Hunter".replace("-", "_")
    return Hunter
