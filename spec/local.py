"""The runtime's fast path for an index-local protocol: one compiled one-index machine, applied per index.

When every variable of a protocol is a family over one index set and every action
has one parameter of that set (the premise the page-locality check in verify/
proves term by term on the Z3 encoding), an N-index instance is N independent
one-index instances. `LocalInstance` stores them in one flat list (stride = the
number of variables) and fires each action through a function compiled once from
the action body for one index (spec/compiled.py's tracing), mutating that
index's slice in place: a firing costs a few comparisons, not a re-run of the
body through the view, and nothing is copied. A disabled action raises the same
`ProtocolViolation` as `Instance.fire`, naming the failing guard (found by
re-evaluating the body on the slow path, only on that error path).
"""
from __future__ import annotations

import json
import os
import time
from typing import IO, Any, Callable, Sequence

from kvproof.spec.compiled import TRACE, Expr, constants, source
from kvproof.spec.core import ActionDef, Layout, Protocol, ProtocolViolation, SpecError, variant_name
from kvproof.spec.machine import CONCRETE, GuardFailed, View, evaluate


def _compile_local(layout: Layout, adef: ActionDef, arg: str, variant: str) -> Callable[..., bool]:
    """f(st, b, *data) -> False when a guard fails, else applies the effect to st[b:b+K] in place."""
    st = [Expr(f"st[b + {i}]") for i in range(len(layout))]
    data = [p.name for p in adef.params if p.index is None]
    m = View(layout, st, TRACE, variant)
    adef.body(layout.protocol, m, **{arg: 0}, **{d: Expr(d) for d in data})
    guard = " and ".join(source(c) for _, _, c in m.guards) or "True"
    # Evaluate every new value from the pre-state first, then store (an effect reads the pre-state).
    vals = "\n".join(f"    v{k} = {source(v)}" for k, v in enumerate(m.writes.values()))
    stores = "\n".join(f"    st[b + {pos}] = v{k}" for k, pos in enumerate(m.writes))
    src = (f"def f(st, b, {', '.join(data + [''])}C=C):\n"
           f"    if not ({guard}):\n        return False\n"
           f"{vals or '    pass'}\n{stores or '    pass'}\n    return True\n")
    ns: dict[str, Any] = {"C": constants()}
    exec(compile(src, f"<local {adef.name}>", "exec"), ns)
    return ns["f"]


_CACHE: dict[tuple[type[Protocol], str, str], dict[str, tuple[Callable[..., bool], tuple[str, ...], str]]] = {}


def _compiled(protocol: type[Protocol], variant: str, index: str
              ) -> dict[str, tuple[Callable[..., bool], tuple[str, ...], str]]:
    """action -> (compiled one-index function, data parameter names, index parameter name), once per process."""
    key = (protocol, variant, index)
    if key not in _CACHE:
        layout = Layout.build(protocol, {**protocol.bounds, protocol.indices[index]: 1})
        fns = {}
        for name, adef in protocol.actions.items():
            arg = next(p.name for p in adef.params if p.index == index)
            data = tuple(p.name for p in adef.params if p.index is None)
            fns[name] = (_compile_local(layout, adef, arg, variant), data, arg)
        _CACHE[key] = fns
    return _CACHE[key]


class LocalInstance:
    """N independent copies of a one-index protocol instance; the runtime's page table is one."""

    def __init__(self, protocol: type[Protocol], variant: str, index: str, n: int,
                 trace: IO[str] | str | None = None) -> None:
        variant = variant_name(variant)
        if variant not in protocol.variants:
            raise SpecError(f"{protocol.name}: unknown variant {variant!r}; "
                            f"expected one of {', '.join(protocol.variants)}")
        if index not in protocol.indices:
            raise SpecError(f"{protocol.name}: no index set {index!r}; expected one of {list(protocol.indices)}")
        if not isinstance(n, int) or n < 1:
            raise SpecError(f"{protocol.name}: {index} count {n!r}; expected an int >= 1")
        bad = [v for v, var in protocol.all_vars().items() if var.index != (index,)]
        bad += [a for a, ad in protocol.actions.items() if [p.index for p in ad.params if p.index] != [index]]
        if bad:
            raise SpecError(f"{protocol.name} is not local in {index!r}: {', '.join(bad)} "
                            f"(every variable must be a family over it and every action take one)")
        self.protocol, self.variant, self.index, self.n = protocol, variant, index, n
        self.layout = Layout.build(protocol, {**protocol.bounds, protocol.indices[index]: 1})
        self.stride = len(self.layout)
        self.state: list[Any] = list(self.layout.initial()) * n
        self._pos = {name: pos for (name, _), pos in self.layout.slots.items()}
        self._fns = _compiled(protocol, variant, index)
        self._trace = open(trace, "a") if isinstance(trace, str) else trace
        self._seq = 0
        if self._trace is not None:
            self._write({"kind": "header", "protocol": protocol.name, "variant": variant,
                         "params": {protocol.indices[index]: n}, "actor": None})

    def _fn(self, action: str) -> tuple[Callable[..., bool], tuple[str, ...], str]:
        try:
            return self._fns[action]
        except KeyError:
            raise SpecError(f"{self.protocol.name}: unknown action {action!r}") from None

    def _check(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise SpecError(f"{self.protocol.name}: {self.index} {i!r} out of range 0..{self.n - 1}")
        return i * self.stride

    def try_fire(self, action: str, i: int, *data: Any) -> bool:
        """Fire `action` on index i (data parameters positionally) if enabled; whether it fired."""
        f, names, arg = self._fn(action)
        if len(data) != len(names):
            raise SpecError(f"{self.protocol.name}: {action} takes data {names}, got {data!r}")
        if not f(self.state, self._check(i), *data):
            return False
        if self._trace is not None:
            self._write({"kind": "fire", "actor": self.protocol.actions[action].actor, "action": action,
                         "params": {arg: i, **dict(zip(names, data))}})
        return True

    def fire(self, action: str, i: int, *data: Any) -> None:
        """Fire `action` on index i; a disabled action raises ProtocolViolation naming the guard."""
        if not self.try_fire(action, i, *data):
            _, names, arg = self._fn(action)
            raise ProtocolViolation(self.protocol.name, action, {arg: i, **dict(zip(names, data))},
                                    self.why_disabled(action, i, *data) or "?")

    def fire_each(self, action: str, indices: Sequence[int], *data: Sequence[Any]) -> None:
        """Fire `action` on each index in turn, data parameters per index (`fire` in a loop, without its
        per-call overhead: a batch's page reads); the first disabled one raises ProtocolViolation
        naming its guard, after the ones before it have fired."""
        f, names, _ = self._fn(action)
        if len(data) != len(names):
            raise SpecError(f"{self.protocol.name}: {action} takes data {names}, got {len(data)} sequences")
        st, stride, n = self.state, self.stride, self.n
        for i, *d in zip(indices, *data, strict=True):
            if not (0 <= i < n and f(st, i * stride, *d)):
                self.fire(action, i, *d)                 # raises: out of range, or the failing guard
            elif self._trace is not None:
                self._write({"kind": "fire", "actor": self.protocol.actions[action].actor, "action": action,
                             "params": {self._fns[action][2]: i, **dict(zip(names, d))}})

    def why_disabled(self, action: str, i: int, *data: Any) -> str | None:
        """The first false guard of `action` on index i, or None when it is enabled (slow path)."""
        _, names, arg = self._fn(action)
        b = self._check(i)
        try:
            evaluate(self.layout, self.state[b:b + self.stride], self.protocol.actions[action],
                     {arg: 0, **dict(zip(names, data))}, CONCRETE, self.variant)
        except GuardFailed as g:
            return g.guard
        return None

    def enabled(self, action: str, i: int, *data: Any) -> bool:
        """Whether `action` may fire on index i now (no effect)."""
        f, names, _ = self._fn(action)
        b = self._check(i)
        return f(self.state[b:b + self.stride], 0, *data)

    def get(self, var: str, i: int) -> Any:
        """One state value of index i."""
        return self.state[self._check(i) + self._pos[var]]

    def count(self, var: str, value: Any) -> int:
        """How many indices hold `value` in `var`."""
        k = self._pos[var]
        return sum(1 for x in self.state[k::self.stride] if x == value)

    def local_state(self, i: int) -> tuple:
        """Index i's slice, as a state of the one-index instance (for the properties)."""
        b = self._check(i)
        return tuple(self.state[b:b + self.stride])

    def labelled(self) -> dict[str, Any]:
        """Every value under its N-index label, e.g. 'refs[3]' (what a global Instance would show)."""
        names = [name for name, _ in self.layout.names]
        return {f"{names[k]}[{i}]": self.state[i * self.stride + k]
                for i in range(self.n) for k in range(self.stride)}

    def _write(self, rec: dict[str, Any]) -> None:
        self._seq += 1
        self._trace.write(json.dumps({"seq": self._seq, "t_ns": time.monotonic_ns(), "pid": os.getpid(), **rec})
                          + "\n")
        self._trace.flush()

    def close(self) -> None:
        """Close the trace file, if this instance opened one."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None
