"""Fast successor generation: each action instance, traced once, compiled to a Python function.

The action body runs once per (action, index arguments) over expression
objects instead of values (the same restricted style that makes Z3 evaluation
possible), and the resulting guard and effect expressions are emitted as
Python source over the state tuple. Explicit-state search then evaluates a few
comparisons per action instead of re-running the body through the view.
Behaviour is identical to `machine.successors` (a test checks it).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from kvproof.spec.core import NAT_PROPERTY, ActionDef, Layout, Nat, Protocol, ProtocolViolation, variant_name
from kvproof.spec.instance import Instance
from kvproof.spec.machine import Emission, Firing, Ops, data_domain, receive_guard
from kvproof.spec.traced import TracedExpr


class Expr(TracedExpr):
    """A node of a traced expression; renders to Python source."""

    __slots__ = ()

    @classmethod
    def literal(cls, v: Any) -> str:
        """Python source of a constant: bools, None and ints as themselves, other objects as C[i]."""
        if isinstance(v, bool) or v is None or type(v) is int:
            return repr(v)
        _CONSTS.append(v)                  # IntEnum members etc.: keep the object, not just its value
        return f"C[{len(_CONSTS) - 1}]"


_CONSTS: list[Any] = []
_src = Expr.text


def source(v: Any) -> str:
    """Python source of a traced expression or constant (`spec/ownership.py` reads positions from it); constants render as C[i] into `constants()`."""
    return _src(v)


def constants() -> list[Any]:
    """A snapshot of the constant table that traced sources index as C[i]."""
    return list(_CONSTS)


class TraceOps(Ops):
    """Operators that build expressions (guards are collected, not checked)."""

    symbolic = True

    def ite(self, c: Any, a: Any, b: Any) -> Any:
        """Conditional expression."""
        return Expr(f"({_src(a)} if {_src(c)} else {_src(b)})")

    def all(self, xs: Any) -> Any:
        """Conjunction."""
        xs = list(xs)
        return Expr("(" + " and ".join(_src(x) for x in xs) + ")") if xs else True

    def any(self, xs: Any) -> Any:
        """Disjunction."""
        xs = list(xs)
        return Expr("(" + " or ".join(_src(x) for x in xs) + ")") if xs else False

    def not_(self, x: Any) -> Any:
        """Negation."""
        return Expr(f"(not {_src(x)})")

    def implies(self, a: Any, b: Any) -> Any:
        """Implication."""
        return Expr(f"((not {_src(a)}) or {_src(b)})")


TRACE = TraceOps()


def _fragment(layout: Layout, params: dict[str, int], adef: ActionDef, args: dict[str, int], variant: str,
              dropped: frozenset[str]) -> tuple[str, list[str], list[str]]:
    """(guard, assignments to `n`, bound checks on `n`) of one action instance, as Python source."""
    from kvproof.spec.machine import View
    st = [Expr(f"st[{i}]") for i in range(len(layout))]
    data = [p.name for p in adef.params if p.index is None]
    full = {**args, **{d: Expr(d) for d in data}}
    m = View(layout, st, TRACE, variant, dropped)
    if adef.receives is not None:
        receive_guard(m, adef, full)
    adef.body(layout.protocol, m, **full)
    guard = " and ".join(_src(c) for _, _, c in m.guards) or "True"
    bounds = [f"n[{pos}] <= {params[t.bound]}" for pos in m.writes
              for t in [layout.vars[layout.names[pos][0]].type] if isinstance(t, Nat) and t.bound is not None]
    return guard, [f"n[{pos}] = {_src(v)}" for pos, v in m.writes.items()], bounds


def _successor_function(layout: Layout, params: dict[str, int], entries: list, variant: str,
                        dropped: frozenset[str]) -> Callable[[tuple], list]:
    """One generated function: every enabled (entry, data values, next state) of a state.

    All action instances inline, in declaration order; a receive loops only over the epochs its
    channel can deliver, any other data parameter over its search domain."""
    out = ["def succ(st, C=C, list=list, tuple=tuple, range=range):", "    out = []", "    ap = out.append"]
    for k, (name, args, adef, _, data) in enumerate(entries):
        guard, assigns, bounds = _fragment(layout, params, adef, args, variant, dropped)
        ind = "    "
        if adef.receives is not None:
            ch = layout.protocol.channels[adef.receives]
            by_index = {p.index: args[p.name] for p in adef.params if p.index is not None}
            idx = tuple(by_index[i] for i in ch.index)
            has, lat, old = (layout.slots[(f"{adef.receives}.{f}", idx)] for f in ("has", "lat", "old"))
            out.append(f"{ind}for {data[0]} in (([st[{lat}]] if st[{has}] else []) + "
                       f"(list(range(st[{lat}])) if st[{old}] else [])):")
            ind += "    "
        else:
            doms = data_domain(params, adef)
            for d in data:
                out.append(f"{ind}for {d} in range({len(doms[d])}):")
                ind += "    "
        out.append(f"{ind}if {guard}:")
        out.append(f"{ind}    n = list(st)")
        out += [f"{ind}    {a}" for a in assigns]
        key = "(" + "".join(f"{d}, " for d in data) + ")"
        push = f"ap(({k}, {key}, tuple(n)))"
        out.append(f"{ind}    if {' and '.join(bounds)}: {push}" if bounds else f"{ind}    {push}")
    out.append("    return out")
    ns: dict[str, Any] = {"C": list(_CONSTS)}
    exec(compile("\n".join(out) + "\n", f"<successors of {layout.protocol.name}/{variant}>", "exec"), ns)
    return ns["succ"]


def compile_predicate(layout: Layout, fn: Callable, args: dict[str, int], variant: str) -> Callable:
    """A predicate (an invariant's body with its index arguments) as a fast function of the state tuple."""
    from kvproof.spec.machine import View
    st = [Expr(f"st[{i}]") for i in range(len(layout))]
    body = _src(fn(layout.protocol, View(layout, st, TRACE, variant), **args))
    ns: dict[str, Any] = {"C": list(_CONSTS)}
    exec(compile(f"def f(st, C=C):\n    return bool({body})\n", "<predicate>", "exec"), ns)
    return ns["f"]


def _compile_conjunction(layout: Layout, preds: list[tuple[Callable, dict[str, int]]], variant: str) -> Callable:
    from kvproof.spec.machine import View
    st = [Expr(f"st[{i}]") for i in range(len(layout))]
    body = " and ".join(f"({_src(fn(layout.protocol, View(layout, st, TRACE, variant), **args))})"
                        for fn, args in preds) or "True"
    ns: dict[str, Any] = {"C": list(_CONSTS)}
    exec(compile(f"def f(st, C=C):\n    return bool({body})\n", "<all properties>", "exec"), ns)
    return ns["f"]


class Compiled:
    """All action instances of one (protocol, sizes, variant, dropped guards), compiled."""

    def __init__(self, protocol: type[Protocol], params: dict[str, int], variant: str,
                 dropped: frozenset[str] = frozenset(), properties: list[str] | None = None) -> None:
        """`properties`: the user properties `violated` checks (default: all of them)."""
        variant = variant_name(variant)
        self.layout = Layout.build(protocol, params)
        self.params = params
        self.entries: list[tuple[str, dict[str, int], ActionDef, None, list[str]]] = []
        for name, adef in protocol.actions.items():
            idx_params = tuple(p for p in adef.params if p.index is not None)
            for args in self.layout.instances(idx_params):
                self.entries.append((name, args, adef, None, [p.name for p in adef.params if p.index is None]))
        self.step = _successor_function(self.layout, params, self.entries, variant, dropped)
        self._args: dict[tuple[int, tuple], dict[str, Any]] = {}
        self._nats = self.layout.nat_positions()
        props = [(name, inv) for name, inv in protocol.invariants.items() if not inv.strengthening
                 and (properties is None or name in properties)]
        self.invariants = [(name, args, compile_predicate(self.layout, inv.body, args, variant))
                           for name, inv in props for args in self.layout.instances(inv.params)]
        # One call for the common case (every property holds) instead of one per property instance.
        self._all_hold = _compile_conjunction(self.layout, [
            (inv.body, args) for _, inv in props for args in self.layout.instances(inv.params)], variant)

    def violated(self, state: tuple) -> list[tuple[str, dict[str, int]]]:
        """(property, args) of the user properties `state` violates (NAT_PROPERTY: a negative Nat)."""
        if any(state[p] < 0 for p in self._nats):
            return [(NAT_PROPERTY, {})]     # the runtime rejects this state; nothing else is meaningful
        if self._all_hold(state):
            return []
        return [(name, args) for name, args, f in self.invariants if not f(state)]

    def label(self, k: int, data: tuple) -> tuple[str, dict[str, Any]]:
        """(action, arguments) of entry k with data values `data` (shared dicts: do not mutate)."""
        args = self._args.get((k, data))
        if args is None:
            name, iargs, _, _, names = self.entries[k]
            args = self._args[(k, data)] = {**iargs, **dict(zip(names, data))}
        return self.entries[k][0], args

    def successors(self, state: tuple) -> Iterator[tuple[str, dict[str, Any], tuple]]:
        """Same as machine.successors, much faster."""
        for k, data, nxt in self.step(state):
            name, args = self.label(k, data)
            yield name, dict(args), nxt


def _compile_fire(layout: Layout, adef: ActionDef, args: dict[str, int], variant: str, local: bool,
                  env_checked: frozenset[str]) -> tuple[Callable[..., list | str], list[int]] | None:
    """One action instance as `f(state, args) -> next state | name of the first false guard`, for a live instance.

    `args` is the firing's argument dict (its data values are read by name). The guards are tested
    one by one in the order the body states them, which is the order the interpreted view checks
    them in (the restricted style has no branch on state), so a refusal names the guard `Instance`
    would name. Unlike `_compile` (search), no search bounds are applied, as `Instance.fire` applies
    none; an actor-local instance (`local`) keeps no 'net' writes (`Instance._kept`). Also returns
    the Nat positions written, which `fire` checks for negatives. None when the action receives or
    emits: those effects need the interpreted view.
    """
    from kvproof.spec.machine import View
    if adef.receives is not None:
        return None
    st = [Expr(f"st[{i}]") for i in range(len(layout))]
    data = [p.name for p in adef.params if p.index is None]
    m = View(layout, st, TRACE, variant, frozenset(), local, None, env_checked)   # as Instance._eval sees it
    adef.body(layout.protocol, m, **{**args, **{d: Expr(d) for d in data}})
    if m.emissions:
        return None
    reads = "".join(f"    {d} = a[{d!r}]\n" for d in data)
    # a guard's name is a str (the refusal), a next state a list: callers tell them apart by type
    tests = "".join(f"    if not ({_src(c)}):\n        return {name!r}\n" for _, name, c in m.guards)
    writes = {p: v for p, v in m.writes.items()
              if not local or layout.vars[layout.names[p][0]].owner != "net"}
    assigns = "".join(f"    n[{pos}] = {_src(v)}\n" for pos, v in writes.items())
    src = f"def f(st, a, C=C):\n{reads}{tests}    n = list(st)\n{assigns}    return n\n"
    ns: dict[str, Any] = {"C": list(_CONSTS)}
    exec(compile(src, f"<fire {adef.name}{tuple(args.values())}>", "exec"), ns)
    nats = [p for p in writes if isinstance(layout.vars[layout.names[p][0]].type, Nat)]
    return ns["f"], nats


# (names of all its parameters, compiled fn or None, Nat positions written) of one action instance
_Fast = tuple[frozenset[str], "Callable[..., list | str] | None", list[int]]
# (protocol, params, variant, local, env_checked, action, index args) -> _Fast; shared by every
# instance of one protocol class, so a per-request instance compiles nothing after the first
_FIRE_CACHE: dict[tuple, _Fast] = {}
_NONE: _Fast = (frozenset(), None, [])


class FastInstance(Instance):
    """An `Instance` whose emission-free actions run compiled from the same spec (traced once).

    Same behaviour as `Instance` (a test compares them): a false guard raises the same
    ProtocolViolation, and `try_fire` / `why_disabled` name the same guard, straight from the
    compiled function (no interpreted re-run); tracing, receiving or emitting actions, wrong
    arguments, and a firing that would make a Nat negative take the interpreted path (which
    names the error). For per-token firings (the anomaly monitor).
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._unindexed: dict[str, _Fast] = {}     # per action without index parameters: no key to build

    def _fast(self, action: str, args: dict[str, Any]) -> _Fast:
        """The compiled form of `action(args)`, or `_NONE` where the interpreted path must run."""
        hit = self._unindexed.get(action)
        if hit is None:
            adef = self._adef(action)
            idx = tuple((p.name, args.get(p.name)) for p in adef.params if p.index is not None)
            key = (self.protocol, tuple(sorted(self.params.items())), self.variant, self.actor is not None,
                   self.env_checked, action, idx)
            hit = _FIRE_CACHE.get(key)
            if hit is None:
                if any(v is None for _, v in idx):
                    return _NONE                                # an index missing: the interpreted error
                fn = _compile_fire(self.layout, adef, dict(idx), self.variant, self.actor is not None,
                                   self.env_checked)
                hit = _FIRE_CACHE[key] = (frozenset(p.name for p in adef.params), *fn) if fn else _NONE
            if not idx:
                self._unindexed[action] = hit
        # exactly the action's parameters, else the interpreted path names the error (a TypeError)
        return hit if args.keys() == hit[0] else _NONE

    def why_disabled(self, action: str, **args: Any) -> str | None:
        """The first false guard of `action(args)`, or None when it is enabled."""
        fn = self._fast(action, args)[1]
        if fn is None:
            return super().why_disabled(action, **args)
        r = fn(self.state, args)
        return r if type(r) is str else None

    def enabled(self, action: str, **args: Any) -> bool:
        """Whether `action(args)` may fire now."""
        return self.why_disabled(action, **args) is None

    def _fast_fire(self, action: str, args: dict[str, Any]) -> bool | str | None:
        """Fire through the compiled function where it applies: True when it fired, the first false
        guard's name when refused; None when it did nothing and the interpreted path must decide (it
        does not apply, or a Nat would become negative, which the interpreted path names)."""
        _, fn, nats = self._fast(action, args)
        if fn is None or self._trace is not None:
            return None
        with self._lock:
            nxt = fn(self.state, args)
            if type(nxt) is str:
                return nxt
            for p in nats:
                if nxt[p] < 0:
                    return None
            self.state[:] = nxt
            return True

    def fire(self, action: str, **args: Any) -> list[Emission]:
        """Fire `action(args)` (see Instance.fire); compiled when it neither traces, receives nor emits."""
        r = self._fast_fire(action, args)
        if r is True:
            return []
        if r is None:
            return super().fire(action, **args)
        raise ProtocolViolation(self.protocol.name, action, args, r)

    def try_fire(self, action: str, **args: Any) -> Firing:
        """Fire `action(args)` if enabled (see Instance.try_fire); compiled as `fire` is, a refusal named by it."""
        r = self._fast_fire(action, args)
        if r is None:
            return super().try_fire(action, **args)
        return Firing(None if r is True else r, [])
