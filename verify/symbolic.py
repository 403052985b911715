"""Symbolic evaluation of a protocol: the same action bodies, evaluated to Z3 terms."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import z3

from kvproof.spec.core import NAT_PROPERTY, ActionDef, Bool, EnumT, Layout, Nat, Protocol, variant_name
from kvproof.spec.machine import Ops, View, evaluate, holds


class Z3Ops(Ops):
    """Operators over Z3 terms."""

    symbolic = True

    def ite(self, c: Any, a: Any, b: Any) -> Any:
        """z3.If."""
        return z3.If(c, a, b)

    def all(self, xs: Any) -> Any:
        """z3.And (True when empty)."""
        xs = list(xs)
        return z3.And(*xs) if xs else z3.BoolVal(True)

    def any(self, xs: Any) -> Any:
        """z3.Or (False when empty)."""
        xs = list(xs)
        return z3.Or(*xs) if xs else z3.BoolVal(False)

    def not_(self, x: Any) -> Any:
        """z3.Not."""
        return z3.Not(x)

    def implies(self, a: Any, b: Any) -> Any:
        """z3.Implies."""
        return z3.Implies(a, b)


Z3 = Z3Ops()


@dataclass(frozen=True)
class ActionInstance:
    """One action with its index parameters fixed (data parameters stay symbolic)."""

    adef: ActionDef
    args: dict[str, int]

    @property
    def label(self) -> str:
        """e.g. 'p_post(s=0, w=1)'."""
        return f"{self.adef.name}({', '.join(f'{k}={v}' for k, v in self.args.items())})"


class Encoding:
    """Z3 encoding of one protocol instance: state copies per step, init, transition, invariants."""

    def __init__(self, protocol: type[Protocol], variant: str, params: dict[str, int],
                 dropped: frozenset[str] = frozenset()) -> None:
        self.protocol, self.variant, self.dropped = protocol, variant_name(variant), dropped
        self.layout = Layout.build(protocol, params)
        self.instances = [ActionInstance(a, args) for a in protocol.actions.values()
                          for args in self.layout.instances(tuple(p for p in a.params if p.index))]
        self._states: dict[int, list[Any]] = {}

    def state(self, k: int) -> list[Any]:
        """The Z3 constants of the state after k steps."""
        if k not in self._states:
            out = []
            for pos, (vname, _) in enumerate(self.layout.names):
                t = self.layout.vars[vname].type
                nm = f"{self.layout.label(pos)}@{k}"
                out.append(z3.Bool(nm) if isinstance(t, Bool) else z3.Int(nm))
            self._states[k] = out
        return self._states[k]

    def domain(self, k: int) -> Any:
        """Type constraints of step k's state (naturals >= 0, enums in range).

        Assumed of the initial state and of induction hypotheses only: after a step it is
        checked (NAT_PROPERTY), because the runtime can reach a negative counter that an
        assumed type would silently rule out."""
        cs = []
        for pos, (vname, _) in enumerate(self.layout.names):
            t, x = self.layout.vars[vname].type, self.state(k)[pos]
            if isinstance(t, Nat):
                cs.append(x >= 0)
            elif isinstance(t, EnumT):
                vals = [int(v) for v in t.enum]
                cs.append(z3.And(x >= min(vals), x <= max(vals)))
        return z3.And(*cs)

    def init(self) -> Any:
        """The initial-state predicate on step 0."""
        return z3.And(*[x == v for x, v in zip(self.state(0), self.layout.initial())])

    def data_vars(self, inst: ActionInstance, k: int) -> dict[str, Any]:
        """Fresh data parameters (epochs) of an action instance at step k."""
        return {p.name: z3.Int(f"{inst.label}.{p.name}@{k}") for p in inst.adef.params if p.index is None}

    def step(self, inst: ActionInstance, k: int, local_only: bool = False) -> tuple[Any, View]:
        """Formula: `inst` fires between step k and k+1 (guards and frame)."""
        data = self.data_vars(inst, k)
        cur, nxt = self.state(k), self.state(k + 1)
        m = evaluate(self.layout, cur, inst.adef, {**inst.args, **data}, Z3, self.variant, self.dropped)
        guards = [c for kind, _, c in m.guards if not (local_only and kind == "env")]
        frame = [nxt[i] == m.writes.get(i, cur[i]) for i in range(len(cur))]
        dom = [d >= 0 for d in data.values()]
        return z3.And(*dom, *guards, *frame), m

    def trans(self, k: int) -> Any:
        """Some action instance fires between step k and k+1."""
        return z3.Or(*[self.step(i, k)[0] for i in self.instances])

    def prop(self, name: str, k: int) -> Any:
        """A named invariant, quantified over its indices, at step k (NAT_PROPERTY: the types)."""
        if name == NAT_PROPERTY:
            return self.domain(k)
        inv = self.protocol.invariants[name]
        return z3.And(*[holds(self.layout, self.state(k), inv.body, args, Z3, self.variant)
                        for args in self.layout.instances(inv.params)])

    def value(self, model: z3.ModelRef, k: int) -> tuple:
        """The concrete state at step k under a model."""
        out = []
        for pos, x in enumerate(self.state(k)):
            v = model.eval(x, model_completion=True)
            t = self.layout.vars[self.layout.names[pos][0]].type
            if isinstance(t, Bool):
                out.append(z3.is_true(v))
            elif isinstance(t, EnumT):
                out.append(t.enum(v.as_long()))
            else:
                out.append(v.as_long())
        return tuple(out)

    def which(self, model: z3.ModelRef, k: int) -> tuple[ActionInstance, dict[str, int]]:
        """The action instance (with its data arguments) that fired at step k under a model."""
        for inst in self.instances:
            f, _ = self.step(inst, k)
            if z3.is_true(model.eval(f, model_completion=True)):
                data = {n: model.eval(v, model_completion=True).as_long()
                        for n, v in self.data_vars(inst, k).items()}
                return inst, data
        raise RuntimeError(f"no action explains step {k} of the model")
