"""Who may read what: the ownership rules every protocol is checked against when its class is defined.

An action of actor A describes one step of one process, so it may only use what
that process can know. Each action body is traced once per variant (the same
restricted style `spec/compiled.py` compiles) on a two-per-index layout, and
every guard, written value, sent epoch and emitted field is checked:

* `m.require(...)` guards and values written to A's variables read only A's
  variables and the received message (the action's data parameters);
* `m.env(...)` facts (what the environment guarantees: a message delivered, a
  connection drained) may also read `net` variables;
* values written to `net` variables (handing a write to the transport, sending
  a message) read only A's and `net`'s variables; an action of A never writes
  another actor's variable;
* `ghost` (history) variables are read only by properties and by updates of
  ghost variables; anything may flow into a ghost;
* A sends only on channels whose source is A and receives only on channels
  whose destination is A;
* `net` actions (the transport, the environment) may read every non-ghost
  variable (a NIC lands a write whatever the slot's state; the counting
  abstraction relates in-flight writes to the sender's epoch) but write only
  `net` and `ghost` variables.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvproof.spec.core import ActionDef, Layout, Protocol

_POS = re.compile(r"st\[(\d+)\]")
GHOST, NET = "ghost", "net"


def _read_vars(layout: "Layout", value: Any) -> set[str]:
    """Variables a traced expression reads."""
    from kvproof.spec.compiled import source
    return {layout.names[int(p)][0] for p in _POS.findall(source(value))}


def _owner(layout: "Layout", var: str) -> str:
    return layout.vars[var].owner


def _bad_reads(layout: "Layout", reads: set[str], allowed: set[str]) -> list[tuple[str, str]]:
    return sorted((v, _owner(layout, v)) for v in reads if _owner(layout, v) not in allowed)


def _trace(layout: "Layout", adef: "ActionDef", args: dict[str, Any], variant: str) -> Any:
    from kvproof.spec.compiled import TRACE, Expr
    from kvproof.spec.machine import View, receive_guard
    st = [Expr(f"st[{i}]") for i in range(len(layout))]
    full = {**args, **{p.name: Expr(f"arg_{p.name}") for p in adef.params if p.index is None}}
    m = View(layout, st, TRACE, variant)
    if adef.receives is not None:
        receive_guard(m, adef, full)
    adef.body(layout.protocol, m, **full)
    return m


def action_violations(protocol: type["Protocol"], layout: "Layout", adef: "ActionDef",
                      variant: str) -> list[str]:
    """Ownership violations of one action in one variant (empty when it is implementable)."""
    A = adef.actor
    who = f"{protocol.__name__}.{adef.name} (actor {A!r}, variant {variant!r})"
    out: list[str] = []
    if adef.receives is not None and A != NET:
        ch = protocol.channels[adef.receives]
        if ch.dst != A:
            out.append(f"{who} receives on channel {adef.receives!r}, whose destination is {ch.dst!r}")
    idx = tuple(p for p in adef.params if p.index is not None)
    for args in layout.instances(idx):
        m = _trace(layout, adef, args, variant)
        own = {A}
        for kind, gname, cond in m.guards:
            if A == NET:
                allowed = {o for o in _owners(protocol) if o != GHOST}
            else:
                allowed = {A, NET} if kind == "env" else own
            for v, o in _bad_reads(layout, _read_vars(layout, cond), allowed):
                out.append(f"{who}: guard {gname!r} reads {v!r}, owned by {o!r}" + _hint(A, o))
        for pos, val in m.writes.items():
            target = layout.names[pos][0]
            tgt_owner = _owner(layout, target)
            if tgt_owner == GHOST:
                continue            # history: anything may flow into a ghost
            if A == NET:
                if tgt_owner != NET:
                    out.append(f"{who}: writes {target!r}, owned by {tgt_owner!r}; the network writes "
                               f"only 'net' and 'ghost' variables")
                    continue
                allowed = {o for o in _owners(protocol) if o != GHOST}
            elif tgt_owner == A:
                allowed = own
            elif tgt_owner == NET:
                allowed = {A, NET}
            else:
                out.append(f"{who}: writes {target!r}, owned by {tgt_owner!r}; an action writes only its "
                           f"own actor's, 'net' and 'ghost' variables (send a message instead)")
                continue
            for v, o in _bad_reads(layout, _read_vars(layout, val), allowed):
                out.append(f"{who}: the value written to {target!r} reads {v!r}, owned by {o!r}" + _hint(A, o))
        for em in m.emissions:
            if em.kind == "send":
                ch = protocol.channels[em.fields["channel"]]
                if A != NET and ch.src != A:
                    out.append(f"{who} sends on channel {em.fields['channel']!r}, whose source is {ch.src!r}")
            allowed = {A} if A != NET else {o for o in _owners(protocol) if o != GHOST}
            for f, val in em.fields.items():
                for v, o in _bad_reads(layout, _read_vars(layout, val), allowed):
                    out.append(f"{who}: {em.kind} field {f!r} reads {v!r}, owned by {o!r}" + _hint(A, o))
    return sorted(set(out), key=out.index)


def _owners(protocol: type["Protocol"]) -> set[str]:
    return {v.owner for v in protocol.all_vars().values()} | set(protocol.actors) | {NET, GHOST}


def _hint(actor: str, owner: str) -> str:
    if owner == GHOST:
        return "; ghost variables may be read only by properties (and ghost updates)"
    if owner == NET:
        return "; 'net' state may be read only in m.env(...) facts"
    return f"; {actor} cannot see {owner}'s state: have {owner} send a message"


def check_ownership(protocol: type["Protocol"]) -> list[str]:
    """Every ownership violation of a protocol's actions, over all its variants."""
    from kvproof.spec.core import Layout
    out: list[str] = []
    for name, var in protocol.all_vars().items():
        if var.owner not in protocol.actors and var.owner not in (NET, GHOST):
            out.append(f"{protocol.__name__}: variable {name!r} is owned by unknown actor {var.owner!r}; "
                       f"expected one of {sorted(set(protocol.actors) | {NET, GHOST})}")
    if out or not protocol.actions:
        return out
    layout = Layout.build(protocol, {p: 2 for p in protocol.indices.values()})
    for variant in protocol.variants or ("",):
        for adef in protocol.actions.values():
            for v in action_violations(protocol, layout, adef, variant):
                if v not in out:
                    out.append(v)
    return out
