"""Stream ordering: in-order device streams, events, host syncs, and the races between them.

A *plan* is what a host thread issues, in order: operations enqueued on streams
(each reads and writes named buffer regions, e.g. ``dev.kv[3]``), event
records, stream waits on events, and host synchronisations. The semantics
follow CUDA: a stream runs its items one at a time in issue order; a record
completes when everything before it on its stream has; a wait blocks its stream
until the *latest record of that event issued before the wait* has completed
(a wait on a never-recorded event is a no-op, as ``cudaStreamWaitEvent`` is);
a host sync blocks further issue until its stream or event has completed.

The same semantics are given twice and the tests check they agree:
- as a state machine (host issue counter, per-stream program counter, one
  in-flight flag per stream) with an enumerative successor function, so tiny
  plans can be explored exhaustively and emulators can execute plans by firing
  its transitions (``spec/stream_machine.py``);
- as a happens-before DAG over op start/end points; ``check_plan`` uses it.

Properties (ids): ``no_read_before_ready`` (a read starts after the write that
produced what it reads has ended), ``no_write_after_read`` (a write to a region
starts after earlier reads of it ended: buffer reuse), ``no_unordered_writes``
(two writes to a region are ordered). "Earlier" means earlier in issue order,
which states what the program meant. Regions are atomic names: two different
names never overlap. Modelled on CUDA stream/event semantics; the HiCache plans
that use it are in ``spec/hicache_plan.py``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Union


PROPERTIES: tuple[str, ...] = ("no_read_before_ready", "no_write_after_read", "no_unordered_writes")
OP_KINDS: tuple[str, ...] = ("copy", "compute")


class Region(str):
    """A buffer region with typed parts: ``kind`` (``kv``, ``recv.idx``, ``wire.kv``...), ``layer``, ``rank``, ``slot``.

    It *is* its name (``recv.kv[1]@r0``: the slot, else the layer, in brackets) for equality, hashing
    and JSON, so the race check, stream_json and every verdict see the same atomic names as before;
    executors read the typed fields instead of parsing the name. ``slot`` is a receive buffer's index
    (two layers sharing a slot are one region); ``layer`` is the layer the op that names it moves.
    """

    kind: str
    layer: int
    rank: int | None
    slot: int | None

    def __new__(cls, kind: str, layer: int, rank: int | None = None, slot: int | None = None) -> "Region":
        """The region ``kind[slot or layer]@r<rank>``."""
        name = f"{kind}[{layer if slot is None else slot}]" + ("" if rank is None else f"@r{rank}")
        self = super().__new__(cls, name)
        for k, v in (("kind", kind), ("layer", layer), ("rank", rank), ("slot", slot)):
            object.__setattr__(self, k, v)
        return self

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError(f"Region {str(self)!r} is immutable")

    def __reduce__(self) -> tuple:
        return (Region, (self.kind, self.layer, self.rank, self.slot))


@dataclass(frozen=True)
class Op:
    """An asynchronous operation enqueued on ``stream``; reads and writes named regions."""

    stream: str
    name: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    kind: str = "compute"

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise ValueError(f"op {self.name!r}: kind {self.kind!r} is not one of {OP_KINDS}")


@dataclass(frozen=True)
class Record:
    """Record ``event`` on ``stream``: it completes when all earlier work on the stream has."""

    stream: str
    event: str


@dataclass(frozen=True)
class Wait:
    """Make ``stream`` wait for the latest record of ``event`` issued before this wait."""

    stream: str
    event: str


@dataclass(frozen=True)
class HostSync:
    """Block the host until ``stream`` (all work issued so far) or ``event`` has completed."""

    stream: str | None = None
    event: str | None = None

    def __post_init__(self) -> None:
        if (self.stream is None) == (self.event is None):
            raise ValueError(f"HostSync needs exactly one of stream/event, got {self!r}")


Instr = Union[Op, Record, Wait, HostSync]


@dataclass(frozen=True)
class Plan:
    """A host program over streams: the instructions in issue order."""

    name: str
    streams: tuple[str, ...]
    instrs: tuple[Instr, ...]

    def __post_init__(self) -> None:
        if len(set(self.streams)) != len(self.streams):
            raise ValueError(f"plan {self.name!r}: duplicate stream in {self.streams}")
        names: set[str] = set()
        for i, ins in enumerate(self.instrs):
            s = ins.stream
            if s is not None and s not in self.streams:
                raise ValueError(f"plan {self.name!r}: instrs[{i}] uses unknown stream {s!r}; "
                                 f"expected one of {list(self.streams)}")
            if isinstance(ins, Op):
                if ins.name in names:
                    raise ValueError(f"plan {self.name!r}: instrs[{i}] repeats op name {ins.name!r}")
                names.add(ins.name)

    def op_index(self, name: str) -> int:
        """Issue index of the op called ``name``."""
        for i, ins in enumerate(self.instrs):
            if isinstance(ins, Op) and ins.name == name:
                return i
        raise KeyError(f"plan {self.name!r} has no op {name!r}")


def resolve_waits(plan: Plan) -> dict[int, int | None]:
    """Map each wait / event sync to the record it waits for (latest earlier record), or None."""
    latest: dict[str, int] = {}
    out: dict[int, int | None] = {}
    for i, ins in enumerate(plan.instrs):
        if isinstance(ins, Record):
            latest[ins.event] = i
        elif isinstance(ins, Wait) or (isinstance(ins, HostSync) and ins.event is not None):
            out[i] = latest.get(ins.event)
    return out


# ---------------------------------------------------------------- dependencies
@dataclass(frozen=True)
class Dependency:
    """``before`` must end before ``after`` starts, because both touch ``region``."""

    property: str
    region: str
    before: int
    after: int


def dependencies(plan: Plan) -> list[Dependency]:
    """The orderings issue order asks for: RAW, WAR and WAW pairs per region."""
    last_write: dict[str, int] = {}
    reads_since: dict[str, list[int]] = {}
    deps: list[Dependency] = []
    for i, ins in enumerate(plan.instrs):
        if not isinstance(ins, Op):
            continue
        for r in ins.reads:
            w = last_write.get(r)
            if w is not None and w != i:
                deps.append(Dependency("no_read_before_ready", r, w, i))
        for r in ins.writes:
            deps += [Dependency("no_write_after_read", r, j, i) for j in reads_since.get(r, []) if j != i]
            w = last_write.get(r)
            if w is not None and w != i:
                deps.append(Dependency("no_unordered_writes", r, w, i))
        for r in ins.reads:
            reads_since.setdefault(r, []).append(i)
        for r in ins.writes:
            last_write[r], reads_since[r] = i, []
    return deps


# ---------------------------------------------------------------- happens-before
@dataclass(frozen=True)
class HappensBefore:
    """The happens-before DAG: nodes are (point, instr), point start/end (ops), done, or sync."""

    plan: Plan
    nodes: tuple[tuple[str, int], ...]
    edges: tuple[tuple[int, int, str], ...]      # (u, v, why): why in op/stream/wait/sync
    ancestors: tuple[int, ...]                   # bitset of strict ancestors per node
    firsts: tuple[int, ...]                      # per instruction: the node where it begins
    lasts: tuple[int, ...]                       # per instruction: the node where it has completed

    def first(self, i: int) -> int:
        """Node at which instruction i begins."""
        return self.firsts[i]

    def last(self, i: int) -> int:
        """Node at which instruction i has completed."""
        return self.lasts[i]

    def ordered(self, before: int, after: int) -> bool:
        """True when instruction ``before`` ends before ``after`` starts in every execution."""
        return bool(self.ancestors[self.firsts[after]] >> self.lasts[before] & 1)


def happens_before(plan: Plan) -> HappensBefore:
    """Build the happens-before DAG of a plan (nodes are created in a topological order)."""
    nodes: list[tuple[str, int]] = []
    edges: list[tuple[int, int, str]] = []
    waits = resolve_waits(plan)
    last_on: dict[str, int] = {}           # stream -> its last node so far
    last_sync: int | None = None
    last_node: dict[int, int] = {}
    firsts: list[int] = []
    for i, ins in enumerate(plan.instrs):
        if isinstance(ins, Op):
            nodes += [("start", i), ("end", i)]
            first, last = len(nodes) - 2, len(nodes) - 1
            edges.append((first, last, "op"))
        else:
            nodes.append(("sync" if isinstance(ins, HostSync) else "done", i))
            first = last = len(nodes) - 1
        if isinstance(ins, HostSync):
            target = last_on.get(ins.stream) if ins.stream is not None else \
                (None if waits[i] is None else last_node[waits[i]])
            if target is not None:
                edges.append((target, first, "sync"))
            if last_sync is not None:
                edges.append((last_sync, first, "sync"))
            last_sync = first
        else:
            if ins.stream in last_on:
                edges.append((last_on[ins.stream], first, "stream"))
            if last_sync is not None:
                edges.append((last_sync, first, "sync"))
            if isinstance(ins, Wait) and waits[i] is not None:
                edges.append((last_node[waits[i]], first, "wait"))
            last_on[ins.stream] = last
        last_node[i] = last
        firsts.append(first)
    preds: list[list[int]] = [[] for _ in nodes]
    for u, v, _ in edges:
        preds[v].append(u)
    anc: list[int] = []
    for v in range(len(nodes)):
        a = 0
        for u in preds[v]:
            a |= anc[u] | (1 << u)
        anc.append(a)
    lasts = tuple(last_node[i] for i in range(len(plan.instrs)))
    return HappensBefore(plan, tuple(nodes), tuple(edges), tuple(anc), tuple(firsts), lasts)


@dataclass(frozen=True)
class Violation:
    """A dependency the happens-before relation does not enforce."""

    property: str
    region: str
    before: int
    after: int
    message: str


def describe(plan: Plan, dep: Dependency) -> str:
    """One sentence naming the two ops, their streams and the region."""
    a, b = plan.instrs[dep.before], plan.instrs[dep.after]
    assert isinstance(a, Op) and isinstance(b, Op)
    what = {"no_read_before_ready": f"reads {dep.region} but may start before {a.name} ({a.stream}) "
                                    f"that writes it has ended",
            "no_write_after_read": f"writes {dep.region} but may start before {a.name} ({a.stream}) "
                                   f"that reads it has ended",
            "no_unordered_writes": f"writes {dep.region} unordered with {a.name} ({a.stream}) "
                                   f"that also writes it"}[dep.property]
    return f"{b.name} ({b.stream}) {what}"


@functools.lru_cache(maxsize=256)
def check_plan(plan: Plan) -> tuple[Violation, ...]:
    """Every dependency of the plan that its happens-before relation leaves unordered."""
    hb = happens_before(plan)
    return tuple(Violation(d.property, d.region, d.before, d.after, describe(plan, d))
                 for d in dependencies(plan) if not hb.ordered(d.before, d.after))
