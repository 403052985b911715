"""Stream plans as a state machine: the second statement of ``spec/streams.py``'s semantics.

State: the host issue counter, per stream its program counter and whether its current op is
running. ``Machine`` gives the enabled transitions (issue, sync, start, end, record, wait) and
fires them (``ProtocolViolation`` naming the failing guard); emulators execute plans by firing
them (``runtime/streams/executor.py``), and ``explore`` searches every interleaving of a tiny plan.
The tests check that the races this machine can exhibit are exactly the ones
``streams.check_plan`` (the happens-before graph) reports.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvproof.spec.core import ProtocolViolation
from kvproof.spec.streams import Dependency, HostSync, Op, Plan, Record, dependencies, resolve_waits

@dataclass(frozen=True)
class State:
    """Host issue counter; per stream: position in its item list and whether that op is running."""

    host: int
    pcs: tuple[int, ...]
    running: tuple[bool, ...]


@dataclass(frozen=True)
class Transition:
    """One step: kind in issue/sync (host) or start/end/record/wait (a stream), on instr ``instr``."""

    kind: str
    instr: int


class Machine:
    """The plan's semantics as a state machine with an enumerative successor function."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.lanes: list[list[int]] = [[i for i, ins in enumerate(plan.instrs)
                                        if ins.stream == s and not isinstance(ins, HostSync)]
                                       for s in plan.streams]
        self.lane_of = {i: (k, p) for k, lane in enumerate(self.lanes) for p, i in enumerate(lane)}
        self.waits = resolve_waits(plan)
        self.deps_after: dict[int, list[Dependency]] = {}
        for d in dependencies(plan):
            self.deps_after.setdefault(d.after, []).append(d)

    def initial(self) -> State:
        """Nothing issued, every stream idle at its first item."""
        n = len(self.plan.streams)
        return State(0, (0,) * n, (False,) * n)

    def done(self, st: State, i: int) -> bool:
        """True when instruction i has completed in ``st``."""
        k, p = self.lane_of[i]
        return st.pcs[k] > p

    def _stream_idle(self, st: State, stream: str, upto: int) -> bool:
        k = self.plan.streams.index(stream)
        return all(self.done(st, i) for i in self.lanes[k] if i < upto)

    def enabled(self, st: State) -> list[Transition]:
        """Transitions that can fire in ``st`` (host first, then streams in plan order)."""
        out: list[Transition] = []
        if st.host < len(self.plan.instrs):
            ins = self.plan.instrs[st.host]
            if not isinstance(ins, HostSync):
                out.append(Transition("issue", st.host))
            elif ins.stream is not None and self._stream_idle(st, ins.stream, st.host):
                out.append(Transition("sync", st.host))
            elif ins.event is not None and (self.waits[st.host] is None or self.done(st, self.waits[st.host])):
                out.append(Transition("sync", st.host))
        for k, lane in enumerate(self.lanes):
            if st.pcs[k] >= len(lane) or lane[st.pcs[k]] >= st.host:
                continue
            i = lane[st.pcs[k]]
            ins = self.plan.instrs[i]
            if isinstance(ins, Op):
                out.append(Transition("end" if st.running[k] else "start", i))
            elif isinstance(ins, Record):
                out.append(Transition("record", i))
            elif self.waits[i] is None or self.done(st, self.waits[i]):
                out.append(Transition("wait", i))
        return out

    def fire(self, st: State, t: Transition, check: bool = True) -> State:
        """The state after ``t``; ProtocolViolation (naming the failing guard) if ``t`` is disabled."""
        if check and t not in self.enabled(st):
            raise ProtocolViolation(self.plan.name, t.kind, {"instr": t.instr, "what": _label(self.plan, t.instr)},
                                    self._guard(st, t))
        if t.kind in ("issue", "sync"):
            return State(st.host + 1, st.pcs, st.running)
        k, _ = self.lane_of[t.instr]
        pcs, running = list(st.pcs), list(st.running)
        if t.kind == "start":
            running[k] = True
        else:
            running[k] = False
            pcs[k] += 1
        return State(st.host, tuple(pcs), tuple(running))

    def _guard(self, st: State, t: Transition) -> str:
        if not 0 <= t.instr < len(self.plan.instrs):
            return f"instruction {t.instr} exists"
        if t.kind in ("issue", "sync"):
            return "host issues in order" if t.instr != st.host else "sync target has completed"
        if t.instr not in self.lane_of:
            return f"instruction {t.instr} is a {t.kind!r} on a stream"
        k, p = self.lane_of[t.instr]
        if t.instr >= st.host:
            return "host has issued it"
        if st.pcs[k] != p:
            return "stream runs its items in order"
        return {"start": "op not yet started", "end": "op is running"}.get(t.kind, "awaited event has completed")

    def successors(self, st: State) -> list[tuple[Transition, State]]:
        """Every (transition, next state) pair from ``st``."""
        return [(t, self.fire(st, t, check=False)) for t in self.enabled(st)]

    def races_at(self, st: State, t: Transition) -> list[Dependency]:
        """Dependencies broken if ``t`` fires now: an op starting before what it must follow ended."""
        if t.kind != "start":
            return []
        return [d for d in self.deps_after.get(t.instr, []) if not self.done(st, d.before)]

    def is_final(self, st: State) -> bool:
        """Everything issued and completed."""
        return st.host == len(self.plan.instrs) and all(p == len(l) for p, l in zip(st.pcs, self.lanes))


def _label(plan: Plan, i: int) -> str:
    ins = plan.instrs[i] if 0 <= i < len(plan.instrs) else None
    return getattr(ins, "name", None) or getattr(ins, "event", None) or repr(ins)


@dataclass(frozen=True)
class Exploration:
    """Result of exhaustive search: reachable states and the races some schedule exhibits."""

    states: int
    races: frozenset[tuple[str, int, int]]     # (property, before, after)
    deadlocks: int
    complete: bool


def explore(plan: Plan, max_states: int = 200_000) -> Exploration:
    """Breadth-first search of every interleaving of a (tiny) plan."""
    m = Machine(plan)
    seen = {m.initial()}
    frontier = [m.initial()]
    races: set[tuple[str, int, int]] = set()
    deadlocks = 0
    while frontier and len(seen) < max_states:
        nxt: list[State] = []
        for st in frontier:
            succ = m.successors(st)
            if not succ and not m.is_final(st):
                deadlocks += 1
            for t, s2 in succ:
                races.update((d.property, d.before, d.after) for d in m.races_at(st, t))
                if s2 not in seen:
                    seen.add(s2)
                    nxt.append(s2)
        frontier = nxt
    return Exploration(len(seen), frozenset(races), deadlocks, not frontier)
