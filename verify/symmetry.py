"""Is a protocol symmetric in an index set? Checked with Z3 before explicit search reduces by it.

Symmetry reduction (one canonical state per orbit of index permutations) is sound
only when permuting the index values maps the initial state to itself, every
action instance to an action instance with the same guard and effect, and every
property (and liveness predicate, and `quiescent`) to itself. The transpositions
(0 i) generate every permutation, so checking them suffices; for each, Z3 checks
that the guard and every written value of `a(args)` on a state equal those of
`a(pi(args))` on the permuted state, for every state and data argument.
"""
from __future__ import annotations

import functools
from typing import Any

import z3

from kvproof.spec.core import Layout, Protocol
from kvproof.spec.machine import evaluate, holds
from kvproof.verify.symbolic import Z3, Encoding


def _perm_positions(layout: Layout, index: str, i: int, j: int) -> list[int]:
    """sigma: position p of a state -> position of the same variable with index values i, j swapped."""
    out = []
    for var, idx in layout.names:
        ixs = layout.vars[var].index
        new = tuple((j if v == i else i if v == j else v) if ix == index else v for ix, v in zip(ixs, idx))
        out.append(layout.slots[(var, new)])
    return out


def _valid(s: z3.Solver, claim: Any) -> bool:
    s.push()
    s.add(z3.Not(claim))
    ok = s.check() == z3.unsat
    s.pop()
    return ok


@functools.lru_cache(maxsize=None)
def _asymmetry(protocol: type[Protocol], variant: str, params_key: tuple, index: str,
               dropped: frozenset[str]) -> str | None:
    enc = Encoding(protocol, variant, dict(params_key), dropped)
    lay = enc.layout
    x = enc.state(0)
    s = z3.Solver()
    s.add(enc.domain(0))
    init = lay.initial()
    for j in range(1, lay.sizes[index]):
        sig = _perm_positions(lay, index, 0, j)
        px = [None] * len(x)
        for p, q in enumerate(sig):
            px[q] = x[p]
        if any(init[sig[p]] != init[p] for p in range(len(x))):
            return f"the initial state is not symmetric under swapping {index} 0 and {j}"

        def swap(args: dict[str, Any], ps: tuple) -> dict[str, Any]:
            return {k: ((j if v == 0 else 0 if v == j else v) if any(p.name == k and p.index == index for p in ps)
                        else v) for k, v in args.items()}
        for adef in protocol.actions.values():
            idx = tuple(p for p in adef.params if p.index is not None)
            data = {p.name: z3.Int(f"data.{p.name}") for p in adef.params if p.index is None}
            s.push()
            s.add(*[d >= 0 for d in data.values()])
            for args in lay.instances(idx):
                m = evaluate(lay, x, adef, {**args, **data}, Z3, variant, dropped)
                pm = evaluate(lay, px, adef, {**swap(args, adef.params), **data}, Z3, variant, dropped)
                g, pg = z3.And(*[c for _, _, c in m.guards]), z3.And(*[c for _, _, c in pm.guards])
                label = f"{adef.name}({', '.join(f'{k}={v}' for k, v in args.items())})"
                if not _valid(s, g == pg):
                    s.pop()
                    return (f"{label}'s guard differs from its image under swapping {index} 0 and {j} "
                            f"(the protocol treats {index} values differently)")
                for p in range(len(x)):
                    a, b = m.writes.get(p, x[p]), pm.writes.get(sig[p], px[sig[p]])
                    if not _valid(s, z3.Implies(g, a == b)):
                        s.pop()
                        return (f"{label}'s effect on {lay.label(p)} differs from its image under swapping "
                                f"{index} 0 and {j}")
            s.pop()
        preds = [(f"property {n}", inv.body, inv.params) for n, inv in protocol.invariants.items()]
        preds += [(f"liveness {n}", f, g.params) for n, g in protocol.goals.items() for f in (g.pending, g.done)]
        for label, fn, ps in preds:
            for args in lay.instances(ps):
                a = holds(lay, x, fn, args, Z3, variant)
                b = holds(lay, px, fn, swap(args, ps), Z3, variant)
                if not _valid(s, a == b):
                    return f"{label}{tuple(args.values())} is not symmetric under swapping {index} 0 and {j}"
        q = lambda st: protocol.quiescent(_View(lay, st, variant))     # noqa: E731
        if not _valid(s, _b(q(x)) == _b(q(px))):
            return f"quiescent() is not symmetric under swapping {index} 0 and {j}"
    return None


def _b(v: Any) -> Any:
    return v if z3.is_expr(v) else z3.BoolVal(bool(v))


def _View(lay: Layout, st: Any, variant: str) -> Any:
    from kvproof.spec.machine import View
    return View(lay, st, Z3, variant)


def asymmetry(protocol: type[Protocol], variant: str, params: dict[str, int], index: str,
              dropped: frozenset[str] = frozenset()) -> str | None:
    """Why the protocol is not symmetric in `index` for these sizes, or None when it is."""
    if index not in protocol.indices:
        return f"{protocol.name} has no index set {index!r}"
    full = {**protocol.bounds, **params}
    return _asymmetry(protocol, variant, tuple(sorted(full.items())), index, dropped)
