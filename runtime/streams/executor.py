"""Executing checked stream plans: a CPU stream emulator and CUDA streams/events.

An op's implementation is two-phase: calling it *starts* the op (it reads its
inputs now) and returns a commit that *ends* it (its writes land then), or
None when the work was simply enqueued (CUDA). The CPU emulator fires the
transitions of ``spec.stream_machine.Machine`` in an order the happens-before relation
allows, chosen at random (seeded) or adversarially (writes delayed as long as
possible), so a read that is not ordered after its write sees stale data,
exactly as on a GPU whose load stream is late. ``run_sync`` is the synchronous
reference. ``run_host`` issues a plan whose copies are asynchronous collectives on the
host (LayerSplit on CPU/gloo). ``CudaExecutor`` issues the plan on ``torch.cuda`` streams
and events. ``execute`` is the one entry that picks among them.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from kvproof.spec.stream_machine import Machine, Transition
from kvproof.spec.streams import Dependency, HostSync, Op, Plan, Record, Wait

Commit = Callable[[], None]
OpImpl = Callable[[], "Commit | None"]
POLICIES: tuple[str, ...] = ("eager", "random", "adversarial")


@dataclass
class ExecResult:
    """What an execution did: the transitions fired, broken dependencies seen, per-op (start, end) ticks."""

    order: list[Transition] = field(default_factory=list)
    races: list[Dependency] = field(default_factory=list)
    times: dict[int, tuple[float, float]] = field(default_factory=dict)


def _missing(plan: Plan, impls: Mapping[str, OpImpl]) -> None:
    absent = [i.name for i in plan.instrs if isinstance(i, Op) and i.name not in impls]
    if absent:
        raise KeyError(f"plan {plan.name!r}: no implementation for op(s) {absent}")


def _rank(plan: Plan, t: Transition, policy: str) -> int:
    """Adversarial priority (lower fires first): start readers early, land writes late."""
    if t.kind in ("issue", "sync", "record", "wait"):
        return 1
    ins = plan.instrs[t.instr]
    assert isinstance(ins, Op)
    if t.kind == "start":
        return 0 if ins.kind == "compute" else 2
    return 3 if ins.kind == "compute" else 4


def emulate(plan: Plan, impls: Mapping[str, OpImpl], policy: str = "random", seed: int = 0,
            ahead: str | None = None) -> ExecResult:
    """Run a plan on CPU tensors in one order the happens-before relation allows; with `ahead`
    (a stream name) the order is fixed instead: host issues first, then that stream as far as its
    waits allow (a fast interconnect prefetching), then the rest."""
    if policy not in POLICIES:
        raise ValueError(f"unknown schedule policy {policy!r}; expected one of {POLICIES}")
    _missing(plan, impls)
    m, rng, res = Machine(plan), random.Random(seed), ExecResult()
    st, pending, tick = m.initial(), {}, 0
    while not m.is_final(st):
        ts = m.enabled(st)
        if not ts:
            raise RuntimeError(f"plan {plan.name!r} deadlocked at {st}")
        if ahead is not None:
            t = min(ts, key=lambda x: 0 if x.kind in ("issue", "sync") else
                    1 if plan.instrs[x.instr].stream == ahead else 2)
        elif policy == "eager":
            t = ts[0]
        elif policy == "random":
            t = rng.choice(ts)
        else:
            best = min(_rank(plan, x, policy) for x in ts)
            t = rng.choice([x for x in ts if _rank(plan, x, policy) == best])
        res.races += m.races_at(st, t)
        if t.kind == "start":
            pending[t.instr] = (impls[plan.instrs[t.instr].name](), tick)  # type: ignore[union-attr]
        elif t.kind == "end":
            commit, t0 = pending.pop(t.instr)
            if commit is not None:
                commit()
            res.times[t.instr] = (t0, tick)
        res.order.append(t)
        st = m.fire(st, t, check=False)     # chosen among the enabled ones
        tick += 1
    return res


def dispatch(plan: Plan, role: Callable[[Op], tuple[str, int]],
             make: Mapping[str, Callable[[Op, int], OpImpl]]) -> dict[str, OpImpl]:
    """Each op's implementation, built by ``make[r]`` for the (role r, layer) that ``role`` reads off the op's
    typed regions: the one op dispatcher, so no executor parses op or region names."""
    impls: dict[str, OpImpl] = {}
    for ins in plan.instrs:
        if isinstance(ins, Op):
            r, layer = role(ins)
            if r not in make:
                raise KeyError(f"plan {plan.name!r}: op {ins.name!r} has role {r!r}, no implementation; "
                               f"expected one of {sorted(make)}")
            impls[ins.name] = make[r](ins, layer)
    return impls


def run_sync(plan: Plan, impls: Mapping[str, OpImpl]) -> ExecResult:
    """The reference: every op runs to completion in issue order."""
    _missing(plan, impls)
    res = ExecResult()
    for i, ins in enumerate(plan.instrs):
        if isinstance(ins, Op):
            commit = impls[ins.name]()
            if commit is not None:
                commit()
            res.times[i] = (float(i), float(i) + 1)
    return res


def run_host(plan: Plan, comm_stream: str, impls: Mapping[str, OpImpl], works: list) -> None:
    """Issue one rank's plan on CPU (the ``host`` schedule): ops in issue order on the host.

    A collective's op appends its asynchronous work (anything with ``wait()``) to ``works``,
    so its transfer overlaps the host's compute; a record on ``comm_stream`` stands for the
    works issued so far and a wait on it waits them; compute ops ran on the host, so their
    records are complete when issued. All works are waited at the end.
    """
    events: dict[str, list] = {}
    for ins in plan.instrs:
        if isinstance(ins, Op):
            commit = impls[ins.name]()
            if commit is not None:
                commit()
        elif isinstance(ins, Record):
            # comm: the works issued so far on the stream; compute ran on the host, already complete
            events[ins.event] = list(works) if ins.stream == comm_stream else []
        elif isinstance(ins, Wait):
            for w in events.get(ins.event, []):   # a never-recorded event is a no-op, as in CUDA
                w.wait()
        elif isinstance(ins, HostSync):
            raise ValueError(f"plan {plan.name!r}: run_host issues collectives and host-ordered compute, "
                             f"not host syncs (instr {ins!r})")
    for w in works:
        w.wait()


def execute(plan: Plan, impls: Mapping[str, OpImpl], schedule: str, seed: int = 0,
            cuda: "CudaExecutor | None" = None, timing: bool = False, ahead: str | None = None) -> ExecResult:
    """Run a checked plan the way its owner is configured: on CUDA streams when `cuda` is given, else
    synchronously in issue order (`schedule` "sync"), else emulated on CPU (a POLICIES schedule, `seed`)."""
    if cuda is not None:
        return cuda.run(plan, impls, timing=timing)
    if schedule == "sync":
        return run_sync(plan, impls)
    return emulate(plan, impls, schedule, seed, ahead=ahead)


class CudaExecutor:
    """Issues plans on CUDA streams and events; the stream named ``main`` is the current stream."""

    def __init__(self, device: torch.device | str = "cuda", main: str = "forward") -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CudaExecutor needs CUDA; use stream_exec.emulate on CPU")
        self.device = torch.device(device)
        self.main = main
        self.streams: dict[str, torch.cuda.Stream] = {}
        self.events: dict[str, torch.cuda.Event] = {}

    def _stream(self, name: str) -> torch.cuda.Stream:
        if name not in self.streams:
            self.streams[name] = torch.cuda.current_stream(self.device) if name == self.main \
                else torch.cuda.Stream(self.device)
        return self.streams[name]

    def run(self, plan: Plan, impls: Mapping[str, OpImpl], timing: bool = False) -> ExecResult:
        """Issue every instruction in order (non-blocking); with ``timing``, time ops with events and sync."""
        _missing(plan, impls)
        res, marks = ExecResult(), {}
        for i, ins in enumerate(plan.instrs):
            if isinstance(ins, HostSync):
                if ins.stream is not None:
                    self._stream(ins.stream).synchronize()
                elif ins.event in self.events:
                    self.events[ins.event].synchronize()
                continue
            s = self._stream(ins.stream)
            if isinstance(ins, Record):
                if ins.event not in self.events:
                    self.events[ins.event] = torch.cuda.Event()
                self.events[ins.event].record(s)      # re-recording: later waits see the latest
            elif isinstance(ins, Wait):
                if ins.event in self.events:     # CUDA: waiting on a never-recorded event is a no-op
                    s.wait_event(self.events[ins.event])
            else:
                with torch.cuda.stream(s):
                    if timing:
                        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        a.record(s)
                    commit = impls[ins.name]()
                    if commit is not None:
                        commit()
                    if timing:
                        b.record(s)
                        marks[i] = (a, b)
        if timing:
            torch.cuda.synchronize(self.device)
            base = next(iter(marks.values()))[0] if marks else None
            res.times = {i: (base.elapsed_time(a), base.elapsed_time(b)) for i, (a, b) in marks.items()}
        return res

    def synchronize(self) -> None:
        """Wait for every stream this executor used."""
        for s in self.streams.values():
            s.synchronize()


def wall(fn: Callable[[], object], sync: bool) -> float:
    """Seconds one call of ``fn`` takes (synchronising CUDA around it when ``sync``)."""
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t0
