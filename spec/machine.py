"""Evaluating a protocol's actions: the view `m` that action bodies see, and the three ways to run it.

* concrete: `spec.instance.Instance` holds the state of one protocol instance; `fire()` is
  the only way to change it (the runtime's fast path), `enabled()` the query half.
* enumerative: `successors()` yields every enabled action instance of a state.
* symbolic: verify/ passes an `Ops` backend whose values are Z3 terms to `evaluate()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from kvproof.spec.core import ActionDef, Layout, Nat, SpecError


class Ops:
    """Concrete operators; verify/ supplies a subclass whose values are Z3 terms."""

    symbolic = False

    def ite(self, c: Any, a: Any, b: Any) -> Any:
        """If-then-else."""
        return a if c else b

    def all(self, xs: Any) -> Any:
        """Conjunction."""
        return all(xs)

    def any(self, xs: Any) -> Any:
        """Disjunction."""
        return any(xs)

    def not_(self, x: Any) -> Any:
        """Negation."""
        return not x

    def implies(self, a: Any, b: Any) -> Any:
        """Implication."""
        return (not a) or b


CONCRETE = Ops()


class GuardFailed(Exception):
    """A named guard of an action was false (raised by concrete evaluation)."""

    def __init__(self, guard: str) -> None:
        super().__init__(guard)
        self.guard = guard


@dataclass(frozen=True)
class Emission:
    """An I/O effect of a fired action: a message to send or a transfer to post."""

    kind: str                 # "send" or an emit kind such as "post_write"
    fields: dict[str, Any]


@dataclass(frozen=True)
class Firing:
    """What `Instance.try_fire` did: fired (true, with its emissions), or not (the first false guard)."""

    guard: str | None                   # None: it fired
    emissions: list[Emission]

    def __bool__(self) -> bool:
        return self.guard is None


class _Ref:
    """A variable (family) as seen from an action body: m.var[i] reads, m.var[i] = x writes."""

    __slots__ = ("_m", "_name")

    def __init__(self, m: "View", name: str) -> None:
        self._m, self._name = m, name

    def __getitem__(self, idx: Any) -> Any:
        return self._m._read(self._name, idx if isinstance(idx, tuple) else (idx,))

    def __setitem__(self, idx: Any, value: Any) -> None:
        self._m._write(self._name, idx if isinstance(idx, tuple) else (idx,), value)


class View:
    """What an action body or invariant sees as `m`: reads the pre-state, buffers writes."""

    def __init__(self, layout: Layout, state: Any, ops: Ops, variant: str,
                 dropped: frozenset[str] = frozenset(), local: bool = False,
                 track: set[str] | None = None, env_checked: frozenset[str] = frozenset()) -> None:
        self._layout, self._state, self.ops, self.variant = layout, state, ops, variant
        self._dropped, self._local, self._track = dropped, local, track
        self._env_checked = env_checked
        self.writes: dict[int, Any] = {}
        self.guards: list[tuple[str, str, Any]] = []        # (kind, name, condition) when symbolic
        self.emissions: list[Emission] = []
        self._vars = layout.vars

    # state access ------------------------------------------------------
    def __getattr__(self, name: str) -> _Ref:
        if name.startswith("_") or name not in self._vars:
            raise AttributeError(f"{self._layout.protocol.name}: no state variable {name!r}")
        return _Ref(self, name)

    def var(self, name: str) -> _Ref:
        """Access a variable whose name is not an identifier (e.g. 'safe.has')."""
        if name not in self._vars:
            raise SpecError(f"{self._layout.protocol.name}: no state variable {name!r}")
        return _Ref(self, name)

    def _pos(self, name: str, idx: tuple) -> int:
        try:
            return self._layout.slots[(name, idx)]
        except KeyError:
            raise SpecError(f"{self._layout.protocol.name}: {name}{list(idx)} is out of range "
                            f"(index sets {self._vars[name].index}, sizes {self._layout.sizes})") from None

    def _read(self, name: str, idx: tuple) -> Any:
        if self._track is not None:
            self._track.add(name)
        return self._state[self._pos(name, idx)]

    def _write(self, name: str, idx: tuple, value: Any) -> None:
        pos = self._pos(name, idx)
        if pos in self.writes:
            raise SpecError(f"{self._layout.protocol.name}: {name}{list(idx)} assigned twice in one action")
        self.writes[pos] = value

    # helpers -------------------------------------------------------------
    def range(self, index: str) -> range:
        """The values of an index set."""
        return self._layout.range(index)

    def ite(self, c: Any, a: Any, b: Any) -> Any:
        """If-then-else that also works on symbolic values."""
        return self.ops.ite(c, a, b)

    def all(self, xs: Any) -> Any:
        """Conjunction over an iterable."""
        return self.ops.all(list(xs))

    def any(self, xs: Any) -> Any:
        """Disjunction over an iterable."""
        return self.ops.any(list(xs))

    def not_(self, x: Any) -> Any:
        """Negation."""
        return self.ops.not_(x)

    def implies(self, a: Any, b: Any) -> Any:
        """Implication."""
        return self.ops.implies(a, b)

    # guards and effects ---------------------------------------------------
    def require(self, cond: Any, name: str) -> None:
        """A guard the acting process evaluates on its own state."""
        self._guard("local", name, cond)

    def env(self, cond: Any, name: str) -> None:
        """A guard the environment guarantees (message delivered, connection drained)."""
        # an actor-local instance checks only the environment facts it is told (Instance.observe)
        if not self._local or name in self._env_checked:
            self._guard("env", name, cond)

    def _guard(self, kind: str, name: str, cond: Any) -> None:
        if name in self._dropped:
            return
        if self.ops.symbolic:
            self.guards.append((kind, name, cond))
        elif not cond:
            raise GuardFailed(name)

    def send(self, channel: str, idx: tuple, epoch: Any) -> None:
        """Send a message tagged with `epoch` on `channel` at index `idx`."""
        has, lat, old = (self.var(f"{channel}.{f}") for f in ("has", "lat", "old"))
        prev_has, prev_lat, prev_old = has[idx], lat[idx], old[idx]
        has[idx] = True
        lat[idx] = epoch
        old[idx] = self.ops.any([prev_old, self.ops.all([prev_has, prev_lat != epoch])])
        self.emissions.append(Emission("send", {"channel": channel, "index": list(idx), "epoch": epoch}))

    def emit(self, kind: str, **fields: Any) -> None:
        """Record an I/O effect (e.g. post a write) for the runtime to carry out."""
        self.emissions.append(Emission(kind, fields))


def receive_guard(m: View, adef: ActionDef, args: dict[str, Any]) -> None:
    """Guard of a receiving action: a message tagged with the given epoch is on its channel."""
    ch = m._layout.protocol.channels[adef.receives]
    by_index = {p.index: args[p.name] for p in adef.params if p.index is not None}
    idx = tuple(by_index[i] for i in ch.index)
    e = args["e"]
    has, lat, old = (m.var(f"{adef.receives}.{f}")[idx] for f in ("has", "lat", "old"))
    m.env(m.any([m.all([has, lat == e]), m.all([old, e < lat])]), f"{adef.receives}_delivered")


def evaluate(layout: Layout, state: Any, adef: ActionDef, args: dict[str, Any], ops: Ops,
             variant: str, dropped: frozenset[str] = frozenset(), local: bool = False,
             track: set[str] | None = None, env_checked: frozenset[str] = frozenset()) -> View:
    """Run one action body against `state`; concretely raises GuardFailed on a false guard."""
    m = View(layout, state, ops, variant, dropped, local, track, env_checked)
    if adef.receives is not None:
        receive_guard(m, adef, args)
    adef.body(layout.protocol, m, **args)
    return m


def holds(layout: Layout, state: Any, fn: Any, args: dict[str, Any], ops: Ops, variant: str) -> Any:
    """Evaluate a predicate (invariant or liveness predicate) on a state."""
    m = View(layout, state, ops, variant)
    return fn(layout.protocol, m, **args)


def data_domain(layout_params: dict[str, int], adef: ActionDef) -> dict[str, range]:
    """Finite domains of an action's data parameters for explicit-state search."""
    out = {}
    for p in adef.params:
        if p.index is None:
            if p.bound is None or p.bound not in layout_params:
                raise SpecError(f"{adef.name}: data parameter {p.name} needs a bound parameter")
            out[p.name] = range(layout_params[p.bound] + 1)
    return out


def deliverable_epochs(layout: Layout, state: tuple, adef: ActionDef, args: dict[str, Any]) -> list[int]:
    """Epochs the channel a receive action reads from can deliver now (the newest, then older ones)."""
    ch = layout.protocol.channels[adef.receives]
    by_index = {p.index: args[p.name] for p in adef.params if p.index is not None}
    idx = tuple(by_index[i] for i in ch.index)
    has, lat, old = (state[layout.slots[(f"{adef.receives}.{f}", idx)]] for f in ("has", "lat", "old"))
    return ([lat] if has else []) + (list(range(lat)) if old else [])


def _candidate_args(layout: Layout, params: dict[str, int], state: tuple, adef: ActionDef
                    ) -> Iterator[dict[str, Any]]:
    """Argument tuples worth trying; for a receive, only epochs the channel can deliver."""
    if adef.receives is None:
        yield from layout.instances(adef.params, data_domain(params, adef))
        return
    for args in layout.instances(tuple(p for p in adef.params if p.index is not None)):
        for e in deliverable_epochs(layout, state, adef, args):
            yield {**args, "e": e}


def _within_bounds(layout: Layout, params: dict[str, int], writes: dict[int, Any]) -> bool:
    allv = layout.vars
    for pos, val in writes.items():
        t = allv[layout.names[pos][0]].type
        if isinstance(t, Nat) and t.bound is not None and val > params[t.bound]:
            return False
    return True


def successors(layout: Layout, params: dict[str, int], state: tuple, variant: str,
               dropped: frozenset[str] = frozenset()
               ) -> Iterator[tuple[str, dict[str, Any], tuple]]:
    """Every (action, args, next state) enabled in `state`, within the search bounds."""
    for name, adef in layout.protocol.actions.items():
        for args in _candidate_args(layout, params, state, adef):
            try:
                m = evaluate(layout, state, adef, args, CONCRETE, variant, dropped)
            except GuardFailed:
                continue
            if not _within_bounds(layout, params, m.writes):
                continue
            nxt = list(state)
            for pos, val in m.writes.items():
                nxt[pos] = val
            yield name, args, tuple(nxt)
