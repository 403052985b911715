"""Slot locality: the premise that lets a one-slot proof cover every slot count.

If every action reads and writes the variables of at most one slot (its own),
writes no slot-independent variable from slot state, and an action without a
slot parameter treats each slot's variables independently of the others; and
every property reads one slot; then the projection of any N-slot run onto one
slot is a run of the one-slot instance, so a property proven for one slot
holds for every N. This module checks that premise on the Z3 encoding of the
two-slot instance, term by term.
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


def slot_locality(protocol: type[Protocol], variant: str, params: dict[str, int],
                  index: str = "slot") -> list[str]:
    """Violations of slot locality (empty when the one-slot proof generalises)."""
    enc = Encoding(protocol, variant, {**params, "slots": max(2, params.get("slots", 2))})
    where = _slot_of_positions(enc, index)
    problems = []
    for inst in enc.instances:
        own = next((inst.args[p.name] for p in inst.adef.params if p.index == index), None)
        _, m = enc.step(inst, 0)
        for kind, name, cond in m.guards:
            read = _slots_read(cond, where)
            if (own is None and read) or (own is not None and read - {own}):
                problems.append(f"{inst.label}: guard {name} reads slots {sorted(read)}")
        for pos, val in m.writes.items():
            target = where[str(enc.state(0)[pos])]
            read = _slots_read(val, where)
            label = enc.layout.label(pos)
            if target is None and read:
                problems.append(f"{inst.label}: writes slot-independent {label} from slot state {sorted(read)}")
            elif target is not None and (read - {target} or (own is not None and target != own)):
                problems.append(f"{inst.label}: writes {label} of slot {target} using slots {sorted(read)}")
    for name, inv in protocol.invariants.items():
        for args in enc.layout.instances(inv.params):
            own = next((args[p.name] for p in inv.params if p.index == index), None)
            read = _slots_read(holds(enc.layout, enc.state(0), inv.body, args, Z3, variant), where)
            if own is None or read - {own}:
                problems.append(f"property {name}{tuple(args.values())} reads slots {sorted(read)}")
    return problems
