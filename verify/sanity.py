"""Vacuity and sanity of a protocol: empty protocols, dead actions, properties that hold only vacuously.

A proof says nothing when nothing can happen. Before `prove` calls a property of a
protocol proven, this module searches one small instance of each variant: every
action must fire somewhere (a *dead* action is reported), and every property must
hold for a reason (a property *holds only vacuously* when each of its implications
has an antecedent no reachable state satisfies, or when no action fires at all).
Finite instances are searched exhaustively (explicit state); protocols with
unbounded counters fall back to bounded model checking to `BMC_DEPTH` steps (or the
protocol's `sanity_depth`), and say so.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import z3

from kvproof.spec.core import Protocol
from kvproof.spec.machine import Ops, holds
from kvproof.verify.symbolic import Encoding, Z3Ops

MAX_STATES = 30_000
BMC_DEPTH = 8


@dataclass
class Sanity:
    """What one variant's sanity search found."""

    protocol: str
    variant: str
    params: dict[str, int]
    method: str
    empty: str | None = None                                  # why no proof can mean anything
    dead_actions: list[str] = field(default_factory=list)
    vacuous: dict[str, str] = field(default_factory=dict)     # property -> why

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"protocol": self.protocol, "variant": self.variant, "params": self.params,
                "method": self.method, "empty": self.empty, "dead_actions": self.dead_actions,
                "vacuous": self.vacuous}

    def lines(self) -> list[str]:
        """Human-readable findings (empty when there is nothing to say)."""
        who = f"{self.protocol}/{self.variant}"
        out = [f"EMPTY    {who}: {self.empty}"] if self.empty else []
        out += [f"DEAD     {who}: action {a} never fires ({self.method})" for a in self.dead_actions]
        out += [f"VACUOUS  {who}: {p} holds only vacuously: {why}" for p, why in self.vacuous.items()]
        return out


class _Recording(Ops):
    """Concrete operators that remember, per call, whether an implication's antecedent held."""

    def __init__(self) -> None:
        self.log: list[bool] = []

    def implies(self, a: Any, b: Any) -> Any:
        self.log.append(bool(a))
        return (not a) or b


class _RecordingZ3(Z3Ops):
    """Z3 operators that collect implication antecedents as terms."""

    def __init__(self) -> None:
        self.antecedents: list[Any] = []

    def implies(self, a: Any, b: Any) -> Any:
        self.antecedents.append(a)
        return super().implies(a, b)


def user_properties(protocol: type[Protocol]) -> list[str]:
    """The properties a user asked for (strengthening invariants are proof aids, not claims)."""
    return [n for n, i in protocol.invariants.items() if not i.strengthening]


def sanity_params(protocol: type[Protocol]) -> dict[str, int]:
    """The instance searched: the protocol's bounds, index sets of size one unless it says otherwise."""
    small = {p: 1 for p in protocol.indices.values()}
    return {**protocol.bounds, **small, **getattr(protocol, "sanity_bounds", {})}


@functools.lru_cache(maxsize=None)
def sanity(protocol: type[Protocol], variant: str) -> Sanity:
    """Dead actions and vacuous properties of one variant on a small instance."""
    small = getattr(protocol, "sanity_instance", None)
    if small is not None and small is not protocol:
        # The protocol names a scaled-down copy of itself (same actions, smaller constants) whose
        # interesting states are within reach of the search; say which one was searched.
        out = sanity(small, variant)
        return Sanity(protocol.name, variant, out.params, f"{out.method}, on {small.__name__}",
                      out.empty, out.dead_actions, out.vacuous)
    params = sanity_params(protocol)
    props = user_properties(protocol)
    if not protocol.actions:
        return Sanity(protocol.name, variant, params, "definition", empty="the protocol has no actions",
                      vacuous={p: "no action exists" for p in props})
    if not props:
        return Sanity(protocol.name, variant, params, "definition", empty="the protocol has no properties")
    from kvproof.verify.explore import explore
    if getattr(protocol, "sanity_method", "search") == "bmc":     # declared infinite: no search
        return _by_bmc(protocol, variant, params, props)
    try:
        ex = explore(protocol, variant, params, max_states=MAX_STATES)
    except RuntimeError:
        return _by_bmc(protocol, variant, params, props)
    method = f"exhaustive search, {ex.states} states of {params}"
    from kvproof.spec.compiled import Compiled
    comp = Compiled(protocol, ex.params, variant)       # the graph keeps one label per edge: re-enumerate
    fired = {a for st in ex.graph for a, _, _ in comp.successors(st)}
    out = Sanity(protocol.name, variant, params, method,
                 dead_actions=[a for a in protocol.actions if a not in fired])
    if not fired:
        out.empty = "no action ever fires: only the initial state is reachable"
        out.vacuous = {p: "only the initial state is reachable" for p in props}
        return out
    for p in props:
        inv = protocol.invariants[p]
        seen: dict[tuple, list[bool]] = {}
        for args in ex.layout.instances(inv.params):
            key = tuple(args.items())
            for st in ex.graph:
                rec = _Recording()
                holds(ex.layout, st, inv.body, args, rec, variant)
                prev = seen.setdefault(key, [False] * len(rec.log))
                seen[key] = [a or b for a, b in zip(prev, rec.log)] if len(prev) == len(rec.log) else prev
        logs = [v for v in seen.values() if v]
        if logs and not any(any(v) for v in logs):
            out.vacuous[p] = "the antecedent of every implication in it is false in every reachable state"
    return out


def _by_bmc(protocol: type[Protocol], variant: str, params: dict[str, int], props: list[str]) -> Sanity:
    """Sanity by BMC when the instance is not finite: what can happen within BMC_DEPTH steps."""
    enc = Encoding(protocol, variant, params)
    pending_actions = {a: [i for i in enc.instances if i.adef.name == a] for a in protocol.actions}
    s = z3.Solver()
    s.add(enc.init(), enc.domain(0))
    seen_action: set[str] = set()
    seen_prop: set[str] = set()
    has_impl: set[str] = set()
    depth = getattr(protocol, "sanity_depth", BMC_DEPTH)
    for d in range(depth + 1):
        for p in props:
            if p in seen_prop:
                continue
            inv = protocol.invariants[p]
            rz = _RecordingZ3()
            for args in enc.layout.instances(inv.params):
                holds(enc.layout, enc.state(d), inv.body, args, rz, variant)
            if rz.antecedents:
                has_impl.add(p)
                s.push()
                s.add(z3.Or(*rz.antecedents))
                if s.check() == z3.sat:
                    seen_prop.add(p)
                s.pop()
        if len(seen_action) == len(pending_actions) and seen_prop == has_impl and d >= 1:
            break           # everything witnessed: deeper search cannot change the findings
        if d == depth:
            break
        for a, insts in pending_actions.items():
            if a in seen_action:
                continue
            s.push()
            s.add(z3.Or(*[enc.step(i, d)[0] for i in insts]))
            if s.check() == z3.sat:
                seen_action.add(a)
            s.pop()
        s.add(enc.domain(d), enc.trans(d))
    out = Sanity(protocol.name, variant, params, f"BMC to depth {d} (the instance is not finite)",
                 dead_actions=[a for a in protocol.actions if a not in seen_action])
    if not seen_action:
        out.empty = f"no action can fire within {depth} steps"
    for p in props:
        if p in has_impl and p not in seen_prop:
            out.vacuous[p] = f"no implication's antecedent is reachable within {depth} steps"
    return out
