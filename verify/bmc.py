"""Bounded model checking (shortest counterexamples) and k-induction over the Z3 encoding."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import z3

from kvproof.spec.core import NAT_PROPERTY, Protocol
from kvproof.spec.machine import CONCRETE, GuardFailed, evaluate
from kvproof.verify.symbolic import Encoding
from kvproof.verify.verdict import Step


@dataclass
class Counterexample:
    """A path from the initial state to a state violating `property`."""

    property: str
    steps: list[Step]
    final_state: dict[str, Any]


def _render(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.name
    return v


def extract(enc: Encoding, model: z3.ModelRef, depth: int, prop: str) -> Counterexample:
    """Turn a Z3 model of a path into readable steps, re-checked against the concrete semantics."""
    steps = []
    state = enc.value(model, 0)
    for k in range(depth):
        inst, data = enc.which(model, k)
        args = {**inst.args, **data}
        try:    # the concrete evaluator must agree with the symbolic one: one definition
            m = evaluate(enc.layout, state, inst.adef, args, CONCRETE, enc.variant, enc.dropped)
        except GuardFailed as g:
            raise AssertionError(f"symbolic/concrete mismatch at step {k}: guard {g.guard}") from None
        nxt = list(state)
        for pos, val in m.writes.items():
            nxt[pos] = val
        changes = {enc.layout.label(p): _render(nxt[p]) for p in range(len(nxt)) if nxt[p] != state[p]}
        sends = [f"{e.fields['channel']}{tuple(e.fields['index'])}@{e.fields['epoch']}"
                 for e in m.emissions if e.kind == "send"]
        steps.append(Step(k + 1, inst.adef.actor, inst.adef.name, args, changes,
                          note="sends " + ", ".join(sends) if sends else ""))
        state = tuple(nxt)
    final = {enc.layout.label(p): _render(v) for p, v in enumerate(state)}
    return Counterexample(prop, steps, final)


def _check(s: z3.Solver) -> z3.CheckSatResult:
    """s.check(), refusing "unknown" (it must never read as "no counterexample")."""
    r = s.check()
    if r == z3.unknown:
        raise RuntimeError(f"Z3 could not decide a BMC query: {s.reason_unknown()}")
    return r


def bmc(protocol: type[Protocol], variant: str, params: dict[str, int], props: list[str],
        max_depth: int, dropped: frozenset[str] = frozenset()) -> Counterexample | None:
    """Search for the shortest path (up to max_depth steps) to a state violating any of `props`."""
    enc = Encoding(protocol, variant, params, dropped)
    s = z3.SolverFor("QF_LIA")      # the encoding is linear integer arithmetic: its own solver, 1.7x faster
    s.add(enc.init(), enc.domain(0))
    props = [NAT_PROPERTY] + [p for p in props if p != NAT_PROPERTY]   # types first: every step checks them
    for d in range(max_depth + 1):
        # One query per depth for "some property fails" (most depths have none); only on a hit,
        # one query per property, in the caller's order, to name the first that fails.
        s.push()
        s.add(z3.Or(*[z3.Not(enc.prop(p, d)) for p in props]))
        hit = _check(s) == z3.sat
        s.pop()
        for p in props if hit else ():
            s.push()
            s.add(z3.Not(enc.prop(p, d)))
            if _check(s) == z3.sat:
                cex = extract(enc, s.model(), d, p)
                s.pop()
                return cex
            s.pop()
        s.add(enc.domain(d), enc.trans(d))       # domain(d) was just shown; assuming it helps the solver
    return None


@dataclass
class InductionResult:
    """Outcome of a k-induction attempt."""

    proven: bool
    k: int
    cti: dict[str, Any] | None = None       # a counterexample to induction, when not proven
    failed: str | None = None               # which conjunct failed to be preserved


def induction(protocol: type[Protocol], variant: str, params: dict[str, int], props: list[str],
              k: int = 1, dropped: frozenset[str] = frozenset()) -> InductionResult:
    """Check that the conjunction of `props` holds initially and is k-inductive.

    Never 'proven' for nothing: a protocol without actions or an empty property list fails
    with the reason in `failed` (an empty conjunction is trivially inductive)."""
    if not protocol.actions:
        return InductionResult(False, k, failed=f"vacuous: {protocol.name} has no actions")
    if not props:
        return InductionResult(False, k, failed=f"vacuous: no properties of {protocol.name} to prove")
    enc = Encoding(protocol, variant, params, dropped)
    inv = lambda i: z3.And(*[enc.prop(p, i) for p in props])   # noqa: E731
    s = z3.Solver()
    # base: the first k states of every path satisfy the invariant
    s.add(enc.init(), enc.domain(0))
    for i in range(k):
        s.push()
        s.add(z3.Not(z3.And(inv(i), enc.domain(i))))
        if s.check() == z3.sat:
            return InductionResult(False, k, failed="base case")
        s.pop()
        s.add(enc.domain(i), enc.trans(i))
    # step: k consecutive invariant states are followed by an invariant state
    t = z3.Solver()
    for i in range(k):
        t.add(enc.domain(i), inv(i), enc.trans(i))
    # The types of the state after the step are an obligation, not an assumption (a Nat the
    # runtime can drive negative must show up here); once shown they may be assumed.
    for p in [NAT_PROPERTY] + [p for p in props if p != NAT_PROPERTY]:
        t.push()
        t.add(z3.Not(enc.prop(p, k)))
        if t.check() == z3.sat:
            model = t.model()
            pre = {enc.layout.label(pos): _render(v) for pos, v in enumerate(enc.value(model, k - 1))}
            inst, data = enc.which(model, k - 1)
            cti = {"pre_state": pre, "action": inst.label, "data": data}
            return InductionResult(False, k, cti=cti, failed=p)
        t.pop()
        if p == NAT_PROPERTY:
            t.add(enc.domain(k))
    return InductionResult(True, k)
