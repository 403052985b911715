"""Slot locality: the premise that lets a one-slot proof cover every slot count.

If every action reads and writes the variables of at most one slot (its own),
an action with a slot parameter writes no slot-independent variable, an action
without one writes slot-independent variables from slot-independent state only
and treats each slot's variables independently of the others; and every
property reads one slot; then the projection of any N-slot run onto one slot
(plus the slot-independent state) is a run of the one-slot instance, so a
property proven for one slot holds for every N. This module checks that
premise on the Z3 encoding of the two-slot instance, term by term.

Interference freedom: a slot-local action may still write a slot-independent
variable that nothing observes (no guard, no property, no value written to
another variable reads it), since dropping that variable from the projection
leaves a run of the one-slot instance. Any other shared write (a generation
counter every slot's alloc bumps and reads, say) is a violation: with two
slots, one slot's steps change what another slot's actions see.
"""
from __future__ import annotations

from typing import Any

import z3
from z3.z3util import get_vars

from kvproof.spec.core import Protocol
from kvproof.spec.machine import holds
from kvproof.verify.symbolic import Z3, Encoding


def _slot_of_positions(enc: Encoding, index: str) -> dict[str, int | None]:
    """Z3 constant name (step 0) -> the index value it belongs to, or None if not indexed by it."""
    out: dict[str, int | None] = {}
    for pos, (var, idx) in enumerate(enc.layout.names):
        ixs = enc.layout.vars[var].index
        out[str(enc.state(0)[pos])] = idx[ixs.index(index)] if index in ixs else None
    return out


def _slots_read(term: Any, where: dict[str, int | None]) -> set[int]:
    if not z3.is_expr(term):
        return set()
    return {where[str(v)] for v in get_vars(term) if str(v) in where and where[str(v)] is not None}


def _observed_shared(enc: Encoding, where: dict[str, int | None], variant: str) -> dict[int, str]:
    """Index-independent positions something observes: position -> first reader (guard, property,
    or a value written to another position)."""
    shared = {str(x): p for p, x in enumerate(enc.state(0)) if where[str(x)] is None}
    out: dict[int, str] = {}

    def note(term: Any, who: str, exclude: int | None = None) -> None:
        if z3.is_expr(term):
            for v in get_vars(term):
                p = shared.get(str(v))
                if p is not None and p != exclude:
                    out.setdefault(p, who)
    for inst in enc.instances:
        _, m = enc.step(inst, 0)
        for _, name, cond in m.guards:
            note(cond, f"guard {name} of {inst.adef.name}")
        for pos, val in m.writes.items():
            note(val, f"the value {inst.adef.name} writes to {enc.layout.label(pos)}", exclude=pos)
    for name, inv in enc.protocol.invariants.items():
        for args in enc.layout.instances(inv.params):
            note(holds(enc.layout, enc.state(0), inv.body, args, Z3, variant), f"property {name}")
    return out


def slot_locality(protocol: type[Protocol], variant: str, params: dict[str, int],
                  index: str = "slot") -> list[str]:
    """Violations of slot locality (empty when the one-slot proof generalises)."""
    size = protocol.indices.get(index)
    if size is None:
        return [f"{protocol.name} has no index set {index!r}"]
    enc = Encoding(protocol, variant, {**protocol.bounds, **params, size: max(2, params.get(size, 2))})
    where = _slot_of_positions(enc, index)
    problems = []
    observed = _observed_shared(enc, where, variant)
    for inst in enc.instances:
        own = next((inst.args[p.name] for p in inst.adef.params if p.index == index), None)
        _, m = enc.step(inst, 0)
        for kind, name, cond in m.guards:
            read = _slots_read(cond, where)
            if (own is None and read) or (own is not None and read - {own}):
                problems.append(f"{inst.label}: guard {name} reads {index}s {sorted(read)}")
        for pos, val in m.writes.items():
            target = where[str(enc.state(0)[pos])]
            read = _slots_read(val, where)
            label = enc.layout.label(pos)
            if target is None and own is not None and pos in observed:
                problems.append(f"{inst.label}: writes {label}, which is not indexed by {index!r} and is "
                                f"read by {observed[pos]} (shared between every {index}: not {index}-local)")
            elif target is None and read:
                problems.append(f"{inst.label}: writes {index}-independent {label} from {index} state {sorted(read)}")
            elif target is not None and (read - {target} or (own is not None and target != own)):
                problems.append(f"{inst.label}: writes {label} of {index} {target} using {index}s {sorted(read)}")
    for name, inv in protocol.invariants.items():
        for args in enc.layout.instances(inv.params):
            own = next((args[p.name] for p in inv.params if p.index == index), None)
            read = _slots_read(holds(enc.layout, enc.state(0), inv.body, args, Z3, variant), where)
            if own is None or read - {own}:
                problems.append(f"property {name}{tuple(args.values())} reads {index}s {sorted(read)}")
    return problems
