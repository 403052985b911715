"""One live protocol instance, the runtime's API to a spec: fire / try_fire / enabled / holds / observe, traced.

The runtime's slot tables and page tables *are* such instances: firing is the only way to
change their state. Each firing evaluates the action body once through `spec.machine`'s view
(guards concretely, writes buffered) and appends a JSON Lines trace record when tracing.
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import IO, Any

from kvproof.spec.core import (NAT_PROPERTY, ActionDef, Layout, Nat, Protocol, ProtocolViolation, SpecError,
                                variant_name)
from kvproof.spec.machine import CONCRETE, Emission, Firing, GuardFailed, View, evaluate, holds


class Instance:
    """One live protocol instance: the runtime's slot table *is* this object."""

    def __init__(self, protocol: type[Protocol], variant: str, params: dict[str, int],
                 actor: str | None = None, trace: IO[str] | str | None = None,
                 env_checked: tuple[str, ...] = ()) -> None:
        # env_checked: environment guards this actor-local instance checks itself, on the
        # environment facts the runtime reports with `observe` (e.g. "connection_drained")
        variant = variant_name(variant)
        if variant not in protocol.variants:
            raise SpecError(f"{protocol.name}: unknown variant {variant!r}; "
                            f"expected one of {', '.join(protocol.variants)}")
        if actor is not None and actor not in protocol.actors:
            raise SpecError(f"{protocol.name}: unknown actor {actor!r}; expected one of {protocol.actors}")
        self.protocol, self.variant, self.params, self.actor = protocol, variant, dict(params), actor
        self.env_checked = frozenset(env_checked)
        self.layout = Layout.build(protocol, params)
        self.state = list(self.layout.initial())
        self._lock = threading.Lock()
        self._seq = 0
        self._trace = open(trace, "a") if isinstance(trace, str) else trace
        if self._trace is not None:
            self._write_trace({"kind": "header", "protocol": protocol.name, "variant": variant,
                               "params": self.params, "actor": actor})

    def _adef(self, action: str) -> ActionDef:
        try:
            adef = self.protocol.actions[action]
        except KeyError:
            raise SpecError(f"{self.protocol.name}: unknown action {action!r}") from None
        if self.actor is not None and adef.actor != self.actor:
            raise SpecError(f"{self.protocol.name}: action {action} belongs to actor "
                            f"{adef.actor!r}, not to this {self.actor!r} instance")
        return adef

    def _eval(self, adef: ActionDef, args: dict[str, Any]) -> View:
        return evaluate(self.layout, self.state, adef, args, CONCRETE, self.variant,
                        local=self.actor is not None, env_checked=self.env_checked)

    def _apply(self, adef: ActionDef, action: str, args: dict[str, Any]) -> Firing:
        """Evaluate once and, if every guard holds, apply and trace (the caller holds the lock)."""
        try:
            m = self._eval(adef, args)
        except GuardFailed as g:
            return Firing(g.guard, [])
        writes = self._kept(m.writes)
        neg = [self.layout.label(p) for p, v in writes.items()
               if isinstance(self.layout.vars[self.layout.names[p][0]].type, Nat) and v < 0]
        if neg:
            raise ProtocolViolation(self.protocol.name, action, args, NAT_PROPERTY,
                                    f"{', '.join(neg)} would become negative: a Nat is never < 0")
        for pos, val in writes.items():
            self.state[pos] = val
        if self._trace is not None:
            self._write_trace({"kind": "fire", "actor": adef.actor, "action": action,
                               "params": _jsonable(args)})
        return Firing(None, m.emissions)

    def _kept(self, writes: dict[int, Any]) -> dict[int, Any]:
        """The writes this instance maintains: an actor's own instance does not keep 'net' state,
        which its process cannot observe (ownership: it reads net state only in env facts, which
        an actor-local instance evaluates only for `env_checked` guards, fed by `observe`)."""
        if self.actor is None:
            return writes
        return {p: v for p, v in writes.items() if self.layout.vars[self.layout.names[p][0]].owner != "net"}

    def why_disabled(self, action: str, **args: Any) -> str | None:
        """The first false guard of `action(args)`, or None when it is enabled."""
        try:
            self._eval(self._adef(action), args)
        except GuardFailed as g:
            return g.guard
        return None

    def enabled(self, action: str, **args: Any) -> bool:
        """Whether `action(args)` may fire now."""
        return self.why_disabled(action, **args) is None

    def fire(self, action: str, **args: Any) -> list[Emission]:
        """Fire `action(args)`: apply its effect, trace it, return its I/O effects."""
        adef = self._adef(action)
        with self._lock:
            f = self._apply(adef, action, args)
        if f.guard is not None:
            raise ProtocolViolation(self.protocol.name, action, args, f.guard)
        return f.emissions

    def try_fire(self, action: str, **args: Any) -> Firing:
        """Fire `action(args)` if it is enabled, evaluating its guards once; falsy with the guard if not."""
        adef = self._adef(action)
        with self._lock:
            return self._apply(adef, action, args)

    def observe(self, action: str, **args: Any) -> None:
        """Apply an environment action this process observed (e.g. `kill`: a connection drained)
        to an actor-local instance, so the guards in `env_checked` see the fact; traced."""
        adef = self.protocol.actions.get(action)
        if adef is None or adef.actor in self.protocol.actors:
            envs = sorted(a for a, d in self.protocol.actions.items() if d.actor not in self.protocol.actors)
            raise SpecError(f"{self.protocol.name}: observe({action!r}): expected an environment action, "
                            f"one of {envs}")
        with self._lock:
            m = evaluate(self.layout, self.state, adef, args, CONCRETE, self.variant, local=True)
            for pos, val in m.writes.items():
                self.state[pos] = val
            if self._trace is not None:
                self._write_trace({"kind": "fire", "actor": adef.actor, "action": action,
                                   "params": _jsonable(args)})

    def holds(self, predicate: str, **args: Any) -> bool:
        """Evaluate a named predicate of the protocol (a staticmethod over `m`) on the current state."""
        fn = getattr(self.protocol, predicate, None)
        if predicate.startswith("_") or not callable(fn) or predicate in self.protocol.actions:
            raise SpecError(f"{self.protocol.name}: no predicate {predicate!r}")
        with self._lock:
            return bool(fn(View(self.layout, self.state, CONCRETE, self.variant), **args))

    def record(self, action: str, **args: Any) -> None:
        """Trace an environment event this process observed (e.g. a write landing) without firing it."""
        if action not in self.protocol.actions:
            raise SpecError(f"{self.protocol.name}: unknown action {action!r}")
        if self._trace is not None:
            with self._lock:
                self._write_trace({"kind": "fire", "actor": self.protocol.actions[action].actor,
                                   "action": action, "params": _jsonable(args)})

    def get(self, var: str, *idx: int) -> Any:
        """Read one state value."""
        return self.state[self.layout.slots[(var, tuple(idx))]]

    def count(self, var: str, value: Any) -> int:
        """How many positions of a family hold `value` (e.g. slots by state)."""
        return sum(1 for (v, _), x in zip(self.layout.names, self.state) if v == var and x == value)

    def violated_invariants(self, strengthening: bool = False) -> list[str]:
        """Names (with indices) of the properties the current state violates (and, if asked,
        of the strengthening invariants, which only the verified variant must satisfy)."""
        out = []
        for inv in self.protocol.invariants.values():
            if inv.strengthening and not strengthening:
                continue
            for args in self.layout.instances(inv.params):
                if not holds(self.layout, self.state, inv.body, args, CONCRETE, self.variant):
                    out.append(inv.name + str(tuple(args.values())))
        return out

    def _write_trace(self, rec: dict[str, Any]) -> None:
        self._seq += 1
        rec = {"seq": self._seq, "t_ns": time.monotonic_ns(), "pid": os.getpid(), **rec}
        self._trace.write(json.dumps(rec) + "\n")
        self._trace.flush()

    def close(self) -> None:
        """Close the trace file, if this instance opened one."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    return {k: int(v) if isinstance(v, (bool, int)) and not isinstance(v, bool) else v
            for k, v in args.items()}
