"""`kvproof.verify.check`: one call that turns (protocol, property, variant, params) into a runnable check.

The check picks its method from the property: an invariant is proven by
1-induction (with the protocol's strengthening invariants) and otherwise refuted
by BMC with a shortest counterexample; `no_deadlock` and liveness goals are
decided by exhaustive explicit-state search. `any_size_of="slot"` lifts a
one-slot proof to every slot count when slot locality holds (and says so when it
does not). `kvproof prove` also sanity-searches the protocol (verify/sanity.py).
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any

from kvproof.spec.core import Protocol
from kvproof.verify.registry import Check
from kvproof.verify.verdict import Status, Verdict

DEADLOCK = "no_deadlock"


def check(protocol: type[Protocol], property: str, variant: str | None = None,
          params: dict[str, int] | None = None, expect: str = "proven", depth: int = 12,
          any_size_of: str | None = None, label: str | None = None,
          dropped: frozenset[str] = frozenset(), method: str = "auto") -> Check:
    """A check of one property of one variant; `expect` is 'proven' or 'refuted'.

    method 'auto': 1-induction, else BMC; 'search': exhaustive explicit-state search of the
    bounded instance (`params` over the protocol's `bounds`), the claim limited to it."""
    variant = variant if variant is not None else (protocol.variants[0] if protocol.variants else "")
    if protocol.variants and variant not in protocol.variants:
        raise ValueError(f"{protocol.name}: unknown variant {variant!r}; expected one of {protocol.variants}")
    known = set(protocol.invariants) | set(protocol.goals) | {DEADLOCK}
    if property not in known:
        raise ValueError(f"{protocol.name}: unknown property {property!r}; expected one of {sorted(known)}")
    try:
        expected = Status(expect)
    except ValueError:
        raise ValueError(f"expect={expect!r}; expected 'proven' or 'refuted'") from None
    if method not in ("auto", "search"):
        raise ValueError(f"method={method!r}; expected 'auto' or 'search'")
    if any_size_of is not None and any_size_of not in protocol.indices:
        raise ValueError(f"{protocol.name}: any_size_of={any_size_of!r}; expected one of {sorted(protocol.indices)}")
    params = dict(params or {})
    shown = dict(params)
    if any_size_of is not None:
        shown[protocol.indices[any_size_of]] = "any"
    run = partial(_run, protocol, property, variant, params, expected, depth, any_size_of, label, dropped, shown,
                  method)
    return Check(protocol.name, label or variant, property, shown, expected, run, spec=protocol)


def _verdict(protocol: type[Protocol], prop: str, label: str, shown: dict[str, Any], status: Status,
             expected: Status, method: str, detail: str, t0: float, **kw: Any) -> Verdict:
    return Verdict(protocol.name, label, prop, shown, status, expected, method, detail,
                   seconds=time.perf_counter() - t0, **kw)


def _run(protocol: type[Protocol], prop: str, variant: str, params: dict[str, int], expected: Status,
         depth: int, any_size_of: str | None, label: str | None, dropped: frozenset[str],
         shown: dict[str, Any], method: str = "auto") -> Verdict:
    t0 = time.perf_counter()
    label = label or variant
    full = {**protocol.bounds, **params}
    if prop == DEADLOCK or prop in protocol.goals:
        return _search(protocol, prop, variant, full, expected, label, dropped, shown, t0)
    if method == "search":
        return _search_invariant(protocol, prop, variant, full, expected, label, dropped, shown, t0)
    lift = ""
    if any_size_of is not None:
        from kvproof.verify.locality import slot_locality
        problems = slot_locality(protocol, variant, full, index=any_size_of)
        if problems:
            return _verdict(protocol, prop, label, shown, Status.UNKNOWN, expected, f"{any_size_of} locality",
                            f"claim for every {any_size_of} count withdrawn: not {any_size_of}-local: "
                            f"{problems[0]} (+{len(problems) - 1} more)", t0)
        full[protocol.indices[any_size_of]] = 1
        lift = (f"{any_size_of} locality (checked on the encoding) lifts the one-{any_size_of} proof to "
                f"every {any_size_of} count; ")
    from kvproof.verify.bmc import bmc, induction
    strengthening = [n for n, i in protocol.invariants.items() if i.strengthening]
    for props in (list(protocol.invariants), [prop] + strengthening):
        r = induction(protocol, variant, full, props, 1, dropped)
        if r.proven:
            sizes = ", ".join(f"{k}={v}" for k, v in full.items() if k in protocol.indices.values())
            return _verdict(protocol, prop, label, shown, Status.PROVEN, expected,
                            (f"{any_size_of} locality + " if lift else "") + "inductive invariant (1-induction)",
                            lift + f"inductive together with {', '.join(p for p in props if p != prop) or 'nothing else'}"
                            f" ({sizes}); unbounded in every counter", t0)
    cex = bmc(protocol, variant, full, [prop], depth, dropped)
    if cex is not None:
        return _verdict(protocol, prop, label, shown, Status.REFUTED, expected,
                        f"BMC (shortest counterexample, {len(cex.steps)} steps)",
                        f"{cex.property} fails after {len(cex.steps)} steps", t0,
                        counterexample=cex.steps, witness={"final_state": cex.final_state})
    return _verdict(protocol, prop, label, shown, Status.UNKNOWN, expected, f"BMC to depth {depth}",
                    f"not inductive ({r.failed} fails after {r.cti['action'] if r.cti else '?'}); "
                    f"no counterexample up to depth {depth}", t0)


def _search_invariant(protocol: type[Protocol], prop: str, variant: str, full: dict[str, int],
                      expected: Status, label: str, dropped: frozenset[str], shown: dict[str, Any],
                      t0: float) -> Verdict:
    from kvproof.verify.explore import explore, path_steps, render_state
    sym = next(iter(protocol.indices), None)
    ex = explore(protocol, variant, full, dropped, symmetry=sym)
    how = (f"{ex.states} states of {full}" + (f", {sym} symmetry reduced (checked)" if ex.symmetric and ex.layout.sizes.get(sym, 1) > 1 else "")
           + (f"; {ex.symmetry_note}" if ex.symmetry_note else ""))
    bad = ex.violations.get(prop)
    if bad is None:
        return _verdict(protocol, prop, label, shown, Status.PROVEN, expected,
                        "exhaustive explicit-state search (bounded instance)",
                        f"holds in every reachable state: {how}; the claim is for this instance only", t0)
    steps = path_steps(ex, bad)
    return _verdict(protocol, prop, label, shown, Status.REFUTED, expected,
                    f"explicit-state search (shortest counterexample, {len(steps)} steps)",
                    f"{prop} fails after {len(steps)} steps ({how})", t0, counterexample=steps,
                    witness={"final_state": render_state(ex.layout, bad)})


def _search(protocol: type[Protocol], prop: str, variant: str, full: dict[str, int], expected: Status,
            label: str, dropped: frozenset[str], shown: dict[str, Any], t0: float) -> Verdict:
    from kvproof.verify.explore import explore, fair_liveness_violations, path_steps, render_state
    sym = next(iter(protocol.indices), None)
    ex = explore(protocol, variant, full, dropped, symmetry=sym)
    how = f"{ex.states} states" + (f", {sym} symmetry reduced" if ex.symmetric and ex.layout.sizes.get(sym, 1) > 1 else "")
    if prop == DEADLOCK:
        bad = ex.deadlocks[0] if ex.deadlocks else next(iter(ex.violations.values()), None)
        if bad is None:
            return _verdict(protocol, prop, label, shown, Status.PROVEN, expected, "exhaustive explicit-state search",
                            f"{how}; every state has a successor unless quiescent; every property holds", t0)
        kind = "deadlock" if ex.deadlocks else f"violation of {next(iter(ex.violations))}"
        return _verdict(protocol, prop, label, shown, Status.REFUTED, expected, "exhaustive explicit-state search",
                        f"{how}; shortest run to a {kind}", t0, counterexample=path_steps(ex, bad),
                        witness={"state": render_state(ex.layout, bad)})
    bad = fair_liveness_violations(ex, prop)
    if not bad:
        return _verdict(protocol, prop, label, shown, Status.PROVEN, expected,
                        "explicit-state search + fair-cycle analysis (strong fairness)",
                        f"{how}; no fair cycle or dead end keeps the goal pending", t0)
    return _verdict(protocol, prop, label, shown, Status.REFUTED, expected,
                    "explicit-state search + fair-cycle analysis (strong fairness)",
                    f"{how}; a {bad[0]['kind']} keeps the goal pending", t0,
                    counterexample=path_steps(ex, bad[0]["state"]),
                    witness={"kind": bad[0]["kind"], "state": render_state(ex.layout, bad[0]["state"])})
