"""Promela from a protocol's own action bodies: guards and effects per action instance, for SPIN.

Each action instance (index arguments and data arguments fixed) runs once over
expression objects, as for the compiled search (spec/compiled.py), and its
guard and effects are written out as one `d_step` option of a `do` loop. The
model is therefore generated from the definition, never written by hand, and
its states are exactly the Python search's states: one Promela variable per
state position, the loop head the only control location.

Two shapes: `safety` (one process; assertions for the properties, a `timeout`
option that asserts quiescence for deadlocks) and `liveness` (one process per
action instance, so that SPIN's weak fairness `-f` is fairness per action
instance, with a never claim per leads-to goal instance).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from kvproof.spec.core import NAT_PROPERTY, ActionDef, Bool, EnumT, Layout, Nat, Protocol
from kvproof.spec.machine import Ops, View, data_domain, holds, receive_guard
from kvproof.spec.traced import TracedExpr


class PExpr(TracedExpr):
    """A Promela expression built by running an action body; remembers the positions it reads."""

    __slots__ = ("reads",)

    def __init__(self, src: str, reads: frozenset[int] = frozenset()) -> None:
        super().__init__(src)
        self.reads = reads

    @classmethod
    def literal(cls, v: Any) -> str:
        """Promela source of a constant: a bool or an int (IntEnum members too: Promela sees their value)."""
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(int(v))
        raise TypeError(f"cannot translate {v!r} ({type(v).__name__}) to Promela; expected a state "
                        f"value, a bool, an int or an IntEnum member")

    def _node(self, src: str, *operands: Any) -> "PExpr":
        return PExpr(src, self.reads.union(*map(_reads, operands)))


_src = PExpr.text


def _reads(v: Any) -> frozenset[int]:
    return v.reads if isinstance(v, PExpr) else frozenset()


class PromelaOps(Ops):
    """Operators that build Promela expressions (guards are collected, not checked)."""

    symbolic = True

    def ite(self, c: Any, a: Any, b: Any) -> Any:
        """Conditional expression."""
        return PExpr(f"({_src(c)} -> {_src(a)} : {_src(b)})", _reads(c) | _reads(a) | _reads(b))

    def all(self, xs: Any) -> Any:
        """Conjunction."""
        xs = list(xs)
        if not xs:
            return True
        return PExpr("(" + " && ".join(_src(x) for x in xs) + ")", frozenset().union(*map(_reads, xs)))

    def any(self, xs: Any) -> Any:
        """Disjunction."""
        xs = list(xs)
        if not xs:
            return False
        return PExpr("(" + " || ".join(_src(x) for x in xs) + ")", frozenset().union(*map(_reads, xs)))

    def not_(self, x: Any) -> Any:
        """Negation."""
        return PExpr(f"(!{_src(x)})", _reads(x))

    def implies(self, a: Any, b: Any) -> Any:
        """Implication."""
        return PExpr(f"((!{_src(a)}) || {_src(b)})", _reads(a) | _reads(b))


PROMELA = PromelaOps()


@dataclass(frozen=True)
class Option:
    """One action instance with every argument fixed, as one line of the generated model."""

    action: str
    args: dict[str, int]
    guard: str
    effects: str
    line: int = 0
    temps: int = 0


@dataclass
class Model:
    """A generated Promela model and how to map its line numbers back to action instances."""

    protocol: type[Protocol]
    variant: str
    params: dict[str, int]
    layout: Layout
    text: str
    options: list[Option] = field(default_factory=list)
    deadlock_line: int | None = None
    property_instances: list[tuple[str, dict[str, int]]] = field(default_factory=list)
    goal_instances: list[dict[str, int]] = field(default_factory=list)

    def option_at(self, line: int) -> Option | None:
        """The action instance whose option is on `line`, if any."""
        for o in self.options:
            if o.line == line:
                return o
        return None


def _names(layout: Layout) -> list[str]:
    out, seen = [], set()
    for pos in range(len(layout)):
        n = "v_" + re.sub(r"\W+", "_", layout.label(pos)).strip("_")
        while n in seen:
            n += "_"
        seen.add(n)
        out.append(n)
    return out


def _ptype(t: Any) -> str:
    if isinstance(t, Bool):
        return "bool"
    if isinstance(t, EnumT):
        return "byte" if min(map(int, t.enum)) >= 0 and max(map(int, t.enum)) < 256 else "int"
    return "short"          # naturals: signed, so that a wrong decrement shows as in Python (negative)


def _option(layout: Layout, params: dict[str, int], adef: ActionDef, args: dict[str, int],
            variant: str, dropped: frozenset[str], names: list[str], lat_bound: dict[int, int]) -> Option:
    st = [PExpr(names[i], frozenset({i})) for i in range(len(layout))]
    m = View(layout, st, PROMELA, variant, dropped)
    if adef.receives is not None:
        receive_guard(m, adef, args)
    adef.body(layout.protocol, m, **args)
    conds = [_src(c) for _, _, c in m.guards]
    for pos, val in m.writes.items():      # a write past a search bound disables the step (as in Python)
        t = layout.vars[layout.names[pos][0]].type
        if isinstance(t, Nat) and t.bound is not None:
            conds.append(f"({_src(val)} <= {params[t.bound]})")
    written = set(m.writes)
    pre, post = [], []
    for pos, val in m.writes.items():
        if _reads(val) & written:           # reads a position this step writes: go through a temporary
            k = len(pre)
            pre.append(f"t{k} = {_src(val)}")
            post.append(f"{names[pos]} = t{k}")
        else:
            post.append(f"{names[pos]} = {_src(val)}")
    checks = [f"assert({names[pos]} <= {lat_bound[pos]})" for pos in m.writes if pos in lat_bound]
    resets = [f"t{k} = 0" for k in range(len(pre))]
    effects = "; ".join(pre + post + resets + checks) or "skip"
    return Option(adef.name, dict(args), " && ".join(conds) or "true", effects, temps=len(pre))


def _lat_bounds(layout: Layout, params: dict[str, int]) -> dict[int, int]:
    """Channel epoch positions read by a receive with a bounded epoch parameter: that bound.

    Promela options enumerate a receive's epoch over its bound; an epoch beyond it would be a
    message that Python's search delivers and SPIN's does not, so it is asserted never to occur."""
    out: dict[int, int] = {}
    for adef in layout.protocol.actions.values():
        if adef.receives is None:
            continue
        b = min(len(r) for r in data_domain(params, adef).values()) - 1
        for (v, idx), pos in layout.slots.items():
            if v == f"{adef.receives}.lat":
                out[pos] = min(out.get(pos, b), b)
    return out


def _c(src: str) -> str:
    """A Promela expression over the state variables as C over pan's state vector `now`."""
    src = re.sub(r"\bv_(\w+)", r"now.v_\1", src).replace("->", "?")
    return re.sub(r"\btrue\b", "1", re.sub(r"\bfalse\b", "0", src))


# How the generated pan reports: every property instance violated after some step sets a bit
# (`kvproof: violated ...` printed at exit), every deadlock state counts once (each stored
# state's `timeout` option runs once). KVPROOF_TARGET=k makes property k an error (k = -1: a
# deadlock; a comma-separated list for several), so that pan stops there and, searching breadth-first, writes its shortest trail.
_C_RUNTIME = r"""c_decl {
unsigned char kvp_target[KVP_N + 2];
unsigned char kvp_seen[KVP_N + 1];
long kvp_deadlocks = 0;
static void kvp_report(void) {
  int k; printf("kvproof: deadlocks %ld violated", kvp_deadlocks);
  for (k = 0; k < KVP_N; k++) if (kvp_seen[k]) printf(" %d", k);
  printf("\n");
}
__attribute__((constructor)) static void kvp_init(void) {
  char *t = getenv("KVPROOF_TARGET"), *e; long k;
  while (t && *t) { k = strtol(t, &e, 10); if (e == t) break; if (k >= -1 && k < KVP_N) kvp_target[k + 1] = 1;
                    t = (*e == ',') ? e + 1 : e; }
  atexit(kvp_report);
}
}
#define KVP_HIT(k) { kvp_seen[k] = 1; if (kvp_target[k + 1]) uerror("kvproof property violated"); }"""


def _c_checks(inv_src: list[str], quiet: str) -> list[str]:
    # Spin runs the C preprocessor over the whole model, so these macros expand inside c_code.
    checks = " ".join(f"if (!({_c(s)})) KVP_HIT({k})" for k, s in enumerate(inv_src))
    return [f"#define KVP_N {max(len(inv_src), 1)}", *_C_RUNTIME.splitlines(),
            f"#define KVP_CHECK {{ {checks} }}",
            f"#define KVP_DEADLOCK if (!({_c(quiet)})) {{ kvp_deadlocks++; "
            "if (kvp_target[0]) uerror(\"kvproof deadlock\"); }"]


def generate(protocol: type[Protocol], variant: str, params: dict[str, int],
             dropped: frozenset[str] = frozenset(), shape: str = "safety",
             goal: str | None = None) -> Model:
    """Promela for one instance: `safety` (properties and deadlocks) or `liveness` (one leads-to goal)."""
    full = {**protocol.bounds, **params}
    layout = Layout.build(protocol, full)
    names = _names(layout)
    lat_bound = _lat_bounds(layout, full)
    groups: list[list[Option]] = []
    for adef in protocol.actions.values():
        idx_params = tuple(p for p in adef.params if p.index is not None)
        doms = data_domain(full, adef)
        for iargs in layout.instances(idx_params):
            group = []
            for combo in itertools.product(*doms.values()):
                args = {**iargs, **dict(zip(doms, combo))}
                group.append(_option(layout, full, adef, args, variant, dropped, names, lat_bound))
            groups.append(group)
    st = [PExpr(n, frozenset({i})) for i, n in enumerate(names)]
    props = [(name, args) for name, inv in protocol.invariants.items() if not inv.strengthening
             for args in layout.instances(inv.params)]
    inv_src = [_src(holds(layout, st, protocol.invariants[name].body, args, PROMELA, variant))
               for name, args in props]
    # A negative natural is the type property (NAT_PROPERTY): such a state has no successors.
    nats_ok = " && ".join(f"({names[p]} >= 0)" for p in layout.nat_positions()) or "true"
    props.append((NAT_PROPERTY, {}))
    inv_src.append(nats_ok)
    quiet = _src(protocol.quiescent(View(layout, st, PROMELA, variant)))
    ntemps = max((o.temps for g in groups for o in g), default=0)
    lines = [f"/* {protocol.name}/{variant} {full}: generated by kvproof.verify.promela */"]
    # Global, not hidden (breadth-first pan allows none), and always reset to 0: no state differs.
    if ntemps:
        lines.append("int " + ", ".join(f"t{k}" for k in range(ntemps)) + ";")
    for pos, n in enumerate(names):
        t = layout.vars[layout.names[pos][0]].type
        lines.append(f"{_ptype(t)} {n} = {_src(layout.initial()[pos])};")
    model = Model(protocol, variant, full, layout, "", property_instances=props)
    lines.append(f"#define NATS_OK ({nats_ok})")
    if shape == "safety":
        lines += _c_checks(inv_src, f"!({nats_ok}) || ({quiet})")
        lines.append("active proctype main() {")
        lines.append("end: do")
        for g in groups:
            for o in g:
                lines.append(f"  :: d_step {{ NATS_OK && {o.guard} -> {o.effects}; c_code {{ KVP_CHECK; }} }}")
                model.options.append(Option(o.action, o.args, o.guard, o.effects, len(lines)))
        lines.append("  :: d_step { timeout -> c_code { KVP_DEADLOCK; } }")
        model.deadlock_line = len(lines)
        lines.append("od }")
    elif shape == "liveness":
        if goal is None or goal not in protocol.goals:
            raise ValueError(f"the liveness shape needs a goal, one of {sorted(protocol.goals)}; got {goal!r}")
        ldef = protocol.goals[goal]
        for k, g in enumerate(groups):
            lines.append(f"active proctype a{k}() {{ /* {g[0].action}{tuple(g[0].args.values())} */")
            lines.append("end: do")
            for o in g:
                lines.append(f"  :: d_step {{ NATS_OK && {o.guard} -> {o.effects} }}")
                model.options.append(Option(o.action, o.args, o.guard, o.effects, len(lines)))
            lines.append("od }")
        # Some instance is pending, and from then on never done: a violation of PENDING ~> DONE.
        model.goal_instances = list(layout.instances(ldef.params))
        stay = []
        for k, gargs in enumerate(model.goal_instances):
            pending = _src(holds(layout, st, ldef.pending, gargs, PROMELA, variant))
            done = _src(holds(layout, st, ldef.done, gargs, PROMELA, variant))
            lines.append(f"#define PENDING{k} ({pending})")
            lines.append(f"#define DONE{k} ({done})")
            stay.append(f"  accept_g{k}: do :: (!DONE{k}) od;")
        lines.append("never { T0: do :: true " + " ".join(
            f":: (PENDING{k} && !DONE{k}) -> goto accept_g{k}" for k in range(len(stay))) + " od;")
        lines += stay
        lines.append("}")
    else:
        raise ValueError(f"unknown Promela shape {shape!r}; expected 'safety' or 'liveness'")
    if any("\n" in ln for ln in lines):
        raise AssertionError("one list item per line: option line numbers map trails back")
    model.text = "\n".join(lines) + "\n"
    return model
