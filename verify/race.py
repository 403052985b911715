"""Race audit of stream plans and recorded traces: happens-before graph, Z3 witnesses, timelines.

``spec.streams.check_plan`` decides which dependencies the happens-before
relation leaves unordered (the runtime uses it directly). This module adds what
a person needs to believe the answer: the graph as networkx, a concrete witness
schedule from Z3 for each violation (integer start/end times consistent with
stream order, event waits and host syncs, in which the later op runs entirely
before the one it depends on), a text timeline, and a parametric proof that a
per-layer plan template is race-free for every layer count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import z3

from kvproof.spec.hicache_plan import drop_wait, event_stem, offset_of
from kvproof.spec.streams import (HappensBefore, HostSync, Instr, Op, Plan, Record, Violation, Wait,
                                  check_plan, dependencies, happens_before, resolve_waits)
from kvproof.verify.verdict import Status, Step, Verdict


def hb_graph(plan: Plan) -> nx.DiGraph:
    """The happens-before DAG as networkx; nodes are (point, instr) with a readable label."""
    hb = happens_before(plan)
    g = nx.DiGraph(plan=plan.name)
    for point, i in hb.nodes:
        ins = plan.instrs[i]
        g.add_node((point, i), label=f"{point} {_name(ins)}", stream=ins.stream)
    for u, v, why in hb.edges:
        g.add_edge(hb.nodes[u], hb.nodes[v], why=why)
    return g


def _name(ins: Instr) -> str:
    if isinstance(ins, Op):
        return ins.name
    if isinstance(ins, Record):
        return f"record {ins.event}"
    if isinstance(ins, Wait):
        return f"wait {ins.event}"
    return f"host sync {ins.stream or ins.event}"


@dataclass(frozen=True)
class Schedule:
    """Integer times per instruction: (start, end); records, waits and syncs have start == end."""

    times: dict[int, tuple[int, int]]

    def to_json(self, plan: Plan) -> list[dict[str, Any]]:
        """Rows ordered by start time."""
        return [{"instr": i, "name": _name(plan.instrs[i]), "stream": plan.instrs[i].stream or "host",
                 "start": s, "end": e} for i, (s, e) in sorted(self.times.items(), key=lambda kv: (kv[1], kv[0]))]


def _encode(hb: HappensBefore, ctx: z3.Context | None = None) -> tuple[list[z3.ArithRef], list[z3.BoolRef]]:
    t = [z3.Int(f"t{n}", ctx) for n in range(len(hb.nodes))]
    cs = [x >= 0 for x in t]
    for u, v, why in hb.edges:
        cs.append(t[v] >= t[u] + (1 if why == "op" else 0))   # every op lasts at least one tick
    return t, cs


def witness_schedule(plan: Plan, violation: Violation) -> Schedule:
    """A schedule allowed by the plan in which ``after`` runs entirely before ``before`` (Z3)."""
    hb = happens_before(plan)
    t, cs = _encode(hb)
    a, b = violation.before, violation.after
    opt = z3.Optimize()
    opt.add(*cs, t[hb.last(b)] <= t[hb.first(a)])
    span = z3.Int("span")
    opt.add(*[span >= x for x in t])
    opt.minimize(span)
    if opt.check() != z3.sat:
        raise ValueError(f"no witness: {violation.message} is ordered after all")
    m = opt.model()
    val = lambda n: m.eval(t[n], model_completion=True).as_long()  # noqa: E731
    return Schedule({i: (val(hb.first(i)), val(hb.last(i))) for i in range(len(plan.instrs))})


def schedule_errors(plan: Plan, sched: Schedule) -> list[str]:
    """Why ``sched`` is not an execution of ``plan`` ([] when it is one)."""
    errs: list[str] = []
    hb = happens_before(plan)
    pt = {}
    for (point, i), n in ((k, n) for n, k in enumerate(hb.nodes)):
        s, e = sched.times[i]
        pt[n] = e if point == "end" else s
    for u, v, why in hb.edges:
        gap = 1 if why == "op" else 0
        if pt[v] < pt[u] + gap:
            errs.append(f"{why} edge {hb.nodes[u]} -> {hb.nodes[v]} broken: {pt[u]} then {pt[v]}")
    return errs


def render_timeline(plan: Plan, sched: Schedule, violation: Violation | None = None) -> str:
    """A text Gantt chart of the ops, marking the two that race."""
    ops = [(i, plan.instrs[i]) for i in sched.times if isinstance(plan.instrs[i], Op)]
    ops.sort(key=lambda x: (plan.streams.index(x[1].stream), sched.times[x[0]]))
    horizon = max(e for _, e in sched.times.values()) or 1
    w = max(len(o.name) for _, o in ops)
    sw = max(len(s) for s in plan.streams)
    lines = [f"{'':{sw}}  {'':{w}}  " + "".join(str(k % 10) for k in range(horizon))]
    for i, o in ops:
        s, e = sched.times[i]
        bar = "".join("#" if s <= k < e else "." for k in range(horizon))
        mark = ""
        if violation is not None and i == violation.after:
            mark = f"  <-- {'reads' if violation.property == 'no_read_before_ready' else 'writes'} {violation.region}"
        elif violation is not None and i == violation.before:
            mark = f"  <-- overtaken: {violation.property}"
        lines.append(f"{o.stream:{sw}}  {o.name:{w}}  {bar}  [{s},{e}){mark}")
    if violation is not None:
        lines.append(f"race: {violation.message}")
    return "\n".join(lines)


def witness_steps(plan: Plan, sched: Schedule, violation: Violation) -> list[Step]:
    """The witness as counterexample steps (one per instruction, in start-time order)."""
    steps = []
    for k, row in enumerate(sched.to_json(plan)):
        i = row["instr"]
        note = ""
        if i == violation.after:
            note = f"RACE: {violation.message}"
        elif i == violation.before:
            note = f"overtaken by {_name(plan.instrs[violation.after])}"
        ins = plan.instrs[i]
        changes = {r: "written" for r in ins.writes} if isinstance(ins, Op) else {}
        steps.append(Step(k, row["stream"], row["name"], {"start": row["start"], "end": row["end"]},
                          changes, note))
    return steps


@dataclass(frozen=True)
class RaceReport:
    """One violation with its Z3 witness schedule."""

    plan: Plan
    violation: Violation
    schedule: Schedule

    def timeline(self) -> str:
        """The text rendering."""
        return render_timeline(self.plan, self.schedule, self.violation)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        v, p = self.violation, self.plan
        return {"property": v.property, "region": v.region, "message": v.message,
                "before": {"instr": v.before, "op": _name(p.instrs[v.before]), "stream": p.instrs[v.before].stream},
                "after": {"instr": v.after, "op": _name(p.instrs[v.after]), "stream": p.instrs[v.after].stream},
                "schedule": self.schedule.to_json(p), "timeline": self.timeline()}


def audit_plan(plan: Plan, witnesses: bool = True) -> list[RaceReport]:
    """Every violation of the plan, each with a witness schedule."""
    return [RaceReport(plan, v, witness_schedule(plan, v) if witnesses else Schedule({}))
            for v in check_plan(plan)]


# ---------------------------------------------------------------- parametric proof
@dataclass(frozen=True)
class ParametricResult:
    """Outcome of the for-every-L argument over a per-layer template."""

    proven: bool
    dependencies: int
    span: int
    detail: str


def _names(ins: Instr) -> list[str]:
    if isinstance(ins, Op):
        return [ins.name, *ins.reads, *ins.writes]
    if isinstance(ins, (Record, Wait)):
        return [ins.event]
    return []


def prove_template(template: tuple[Instr, ...], streams: tuple[str, ...], prop: str,
                   instantiate_block: Any, prologue: tuple[Instr, ...] = ()) -> ParametricResult:
    """Prove that the plans prologue + block(0)..block(L-1) satisfy ``prop`` for every L >= 1.

    (1) Every name (region, event) carries a layer offset 0..D; Z3 shows that two
    blocks touching the same name are at most D apart (for symbolic l, l', L).
    (2) Each event is recorded once per block, and no host sync occurs, so a
    window of D+1 consecutive blocks has a subset of the constraints it has in
    any longer plan and contains every dependency between its blocks.
    (3) For each dependency of ``prop`` in the window, Z3 shows "after starts before
    before ends" is unsatisfiable under the window's stream/event constraints.
    A prologue without ops and without the template's events only adds constraints.
    """
    if any(isinstance(i, (Op, HostSync)) for i in prologue):
        return ParametricResult(False, 0, 0, "prologue contains an op or a host sync")
    offsets = []
    for ins in template:
        if isinstance(ins, HostSync):
            return ParametricResult(False, 0, 0, "template contains a host sync")
        for n in _names(ins):
            o = offset_of(n)
            if o is None:
                return ParametricResult(False, 0, 0, f"name {n!r} has no layer placeholder")
            offsets.append(o)
    recorded = [offset_of(i.event)[0] for i in template if isinstance(i, Record)]  # type: ignore[index]
    if len(recorded) != len(set(recorded)):
        return ParametricResult(False, 0, 0, "an event is recorded twice in one block")
    stems = {offset_of(n)[0].split("[")[0] for i in template for n in _names(i)}  # type: ignore[index]
    if any(isinstance(i, (Record, Wait)) and event_stem(i.event) in stems for i in prologue):
        return ParametricResult(False, 0, 0, "the prologue uses an event of the template")
    span = max(o for _, o in offsets) - min(o for _, o in offsets)
    # (1) aliasing lemma: same stem, offsets a, b, layers l, l2 in [0, L) => |l - l2| <= span
    s = z3.Solver()
    l1, l2, L = z3.Ints("l l2 L")
    for stem_a, a in set(offsets):
        for stem_b, b in set(offsets):
            if stem_a != stem_b:
                continue
            s.push()
            s.add(0 <= l1, l1 < L, 0 <= l2, l2 < L, l1 + a == l2 + b, z3.Or(l1 - l2 > span, l2 - l1 > span))
            if s.check() != z3.unsat:
                return ParametricResult(False, 0, span, f"{stem_a}: blocks more than {span} apart alias")
            s.pop()
    # (2)+(3) the window of span+1 blocks
    window = Plan("window", streams, tuple(i for l in range(span + 1) for i in instantiate_block(l)))
    hb = happens_before(window)
    t, cs = _encode(hb)
    deps = [d for d in dependencies(window) if d.property == prop]
    s = z3.Solver()
    s.add(*cs)
    for d in deps:
        if s.check(t[hb.first(d.after)] < t[hb.last(d.before)]) != z3.unsat:
            a, b = window.instrs[d.before], window.instrs[d.after]
            return ParametricResult(False, len(deps), span,
                                    f"in the {span + 1}-layer window {_name(b)} may overtake {_name(a)}")
    return ParametricResult(True, len(deps), span,
                            f"Z3: layer template touches names at offsets within {span}; in the {span + 1}-layer "
                            f"window all {len(deps)} {prop} dependencies are ordered (race UNSAT), "
                            f"so the one-batch plan (prologue + L layers) is race-free for every L >= 1")


def waits_needed(plan: Plan) -> list[tuple[str, bool]]:
    """Guard necessity: for each event family waited on, whether dropping those waits creates races."""
    base = len(check_plan(plan))
    stems = dict.fromkeys(event_stem(i.event) for i in plan.instrs if isinstance(i, Wait))
    return [(stem, len(check_plan(drop_wait(plan, stem))) > base) for stem in stems]


def unresolved_waits(plan: Plan) -> list[int]:
    """Waits (and event syncs) on an event with no earlier record: no-ops under CUDA semantics."""
    return [i for i, r in resolve_waits(plan).items() if r is None]


def race_refutation(check: tuple[str, str, str, dict[str, Any], Status], plan: Plan, v: Violation, method: str,
                    detail: str, witness: dict[str, Any], seconds: float) -> Verdict:
    """The REFUTED verdict of a stream-plan race: a Z3 witness schedule, its steps and timeline.
    check = (protocol, variant, property, params, expected)."""
    sched = witness_schedule(plan, v)
    return Verdict(*check[:4], Status.REFUTED, check[4], method=method + " + Z3 witness schedule", detail=detail,
                   counterexample=witness_steps(plan, sched, v),
                   witness={**witness, "plan": plan.name, "timeline": render_timeline(plan, sched, v),
                            "schedule": sched.to_json(plan), "region": v.region,
                            "overtaken": plan.instrs[v.before].name},
                   seconds=seconds)
