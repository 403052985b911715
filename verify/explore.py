"""Explicit-state search: the reachable graph (networkx), invariants, deadlocks, fair liveness."""
from __future__ import annotations

import enum
import operator
import time
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from kvproof.spec.core import NAT_PROPERTY, Layout, Protocol, variant_name
from kvproof.spec.compiled import Compiled
from kvproof.spec.machine import CONCRETE, evaluate, holds
from kvproof.verify.verdict import Step


@dataclass
class Exploration:
    """The reachable state graph of one instance, with what the search found."""

    protocol: type[Protocol]
    variant: str
    params: dict[str, int]
    layout: Layout
    graph: nx.DiGraph
    initial: tuple
    seconds: float
    symmetric: bool
    violations: dict[str, tuple] = field(default_factory=dict)   # property -> first violating state
    deadlocks: list[tuple] = field(default_factory=list)
    dropped: frozenset[str] = frozenset()                         # guards removed for this search
    symmetry_note: str = ""        # why a requested symmetry reduction was not used (empty: used or not asked)

    @property
    def states(self) -> int:
        """Number of reachable (canonical) states."""
        return self.graph.number_of_nodes()

    @property
    def edges(self) -> int:
        """Number of transitions between them."""
        return self.graph.number_of_edges()

    def path_to(self, target: tuple) -> list[tuple[str, dict[str, Any], tuple]]:
        """Shortest (action, args, state) path from the initial state to `target`."""
        nodes = nx.shortest_path(self.graph, self.initial, target)
        return [(self.graph.edges[a, b]["action"], self.graph.edges[a, b]["args"], b)
                for a, b in zip(nodes, nodes[1:])]


def _slot_canonical(layout: Layout, index: str) -> Any:
    """A function mapping a state to its representative under permutation of `index` values."""
    n = layout.sizes[index]
    groups = [[pos for pos, (v, idx) in enumerate(layout.names)
               if index in layout.vars[v].index and idx[layout.vars[v].index.index(index)] == i]
              for i in range(n)]
    if n == 1 or any(len(g) != len(groups[0]) for g in groups):
        return lambda st: st

    getters = [operator.itemgetter(*g) for g in groups]

    def canon(st: tuple) -> tuple:
        blocks = [get(st) for get in getters]
        ordered = sorted(blocks)
        if ordered == blocks:
            return st
        out = list(st)
        for g, blk in zip(groups, ordered):
            for p, v in zip(g, blk):
                out[p] = v
        return tuple(out)
    return canon


def explore(protocol: type[Protocol], variant: str, params: dict[str, int],
            dropped: frozenset[str] = frozenset(), symmetry: str | None = None,
            max_states: int = 2_000_000) -> Exploration:
    """Breadth-first search of every state reachable within the instance's bounds."""
    variant = variant_name(variant)
    full = {**protocol.bounds, **params}
    layout = Layout.build(protocol, full)
    note = ""
    if symmetry is not None and layout.sizes.get(symmetry, 1) > 1:
        # Reduce only by a symmetry Z3 has checked: an asymmetric protocol would hide states.
        from kvproof.verify.symmetry import asymmetry
        why = asymmetry(protocol, variant, full, symmetry, dropped)
        if why is not None:
            note = f"{symmetry} symmetry reduction NOT used: {why}"
            symmetry = None
    canon = _slot_canonical(layout, symmetry) if symmetry in layout.sizes else (lambda st: st)
    t0 = time.perf_counter()
    init = canon(layout.initial())
    g = nx.DiGraph()
    g.add_node(init)
    frontier = [init]
    ex = Exploration(protocol, variant, full, layout, g, init, 0.0, symmetry is not None, dropped=dropped,
                     symmetry_note=note)
    comp = Compiled(protocol, full, variant, dropped)
    step, label, violated = comp.step, comp.label, comp.violated
    has_node, add_node, has_edge, add_edge = g.__contains__, g.add_node, g.has_edge, g.add_edge
    while frontier:
        nxt_frontier = []
        for st in frontier:
            bad = violated(st)
            for name, _ in bad:
                ex.violations.setdefault(name, st)
            if bad and bad[0][0] == NAT_PROPERTY:
                continue            # ill-typed: the runtime rejects this state, so it has no successors
            succ = step(st)
            for k, data, nxt in succ:
                nxt = canon(nxt)
                if not has_node(nxt):
                    add_node(nxt)
                    nxt_frontier.append(nxt)
                    if len(g) > max_states:
                        raise RuntimeError(f"more than {max_states} states; lower the bounds {full}")
                if not has_edge(st, nxt):
                    action, args = label(k, data)
                    add_edge(st, nxt, action=action, args=args)
            if not succ and not protocol.quiescent(_view(layout, st, variant)):
                ex.deadlocks.append(st)
        frontier = nxt_frontier
    ex.seconds = time.perf_counter() - t0
    return ex


def _view(layout: Layout, st: tuple, variant: str) -> Any:
    from kvproof.spec.machine import View
    return View(layout, st, CONCRETE, variant)


def fair_liveness_violations(ex: Exploration, goal: str) -> list[dict[str, Any]]:
    """Cycles (SCCs) in which a goal stays pending forever although every action that is
    enabled in the cycle could be taken inside it (strong fairness), plus pending dead ends."""
    ldef = ex.protocol.goals[goal]
    out = []
    for args in ex.layout.instances(ldef.params):
        pend = [n for n in ex.graph if holds(ex.layout, n, ldef.pending, args, CONCRETE, ex.variant)
                and not holds(ex.layout, n, ldef.done, args, CONCRETE, ex.variant)]
        sub = ex.graph.subgraph(pend)
        for comp in nx.strongly_connected_components(sub):
            if len(comp) == 1:
                (n,) = comp
                if ex.graph.out_degree(n) == 0:
                    out.append({"args": args, "kind": "dead end", "state": n})
                    continue
                if not sub.has_edge(n, n):
                    continue
            inside = {(d["action"], tuple(sorted(d["args"].items())))
                      for a, b, d in sub.subgraph(comp).edges(data=True)}
            enabled = {(d["action"], tuple(sorted(d["args"].items())))
                       for a in comp for _, b, d in ex.graph.out_edges(a, data=True)}
            if enabled <= inside:       # nothing enabled is forced to leave: a fair cycle
                out.append({"args": args, "kind": "fair cycle", "state": next(iter(comp)),
                            "size": len(comp)})
    return out


def path_steps(ex: Exploration, target: tuple) -> list[Step]:
    """The shortest run to `target` as counterexample steps (changes and messages sent included)."""
    steps, prev = [], ex.initial
    for i, (action, args, nxt) in enumerate(ex.path_to(target), 1):
        adef = ex.protocol.actions[action]
        changes = {ex.layout.label(p): getattr(v, "name", v) for p, v in enumerate(nxt) if v != prev[p]}
        sent = [f"{e.fields['channel']}{tuple(e.fields['index'])}@{e.fields['epoch']}" for e in evaluate(
            ex.layout, prev, adef, args, CONCRETE, ex.variant, ex.dropped).emissions if e.kind == "send"]
        steps.append(Step(i, adef.actor, action, args, changes, note="sends " + ", ".join(sent) if sent else ""))
        prev = nxt
    return steps


def render_state(layout: Layout, st: tuple) -> dict[str, Any]:
    """A state as {label: value} with enum names."""
    return {layout.label(p): (v.name if isinstance(v, enum.Enum) else v) for p, v in enumerate(st)}
