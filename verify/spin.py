"""SPIN as a second explicit-state engine: generated Promela, compiled pan, trails as step tables.

Safety: one breadth-first pan run over the whole state space counts the states
and records which property instances some reachable state violates and how
many states deadlock (see `promela._C_RUNTIME`); for each violated property a
second run stops at its first violation and writes the shortest trail, which
is replayed through the concrete semantics into kvproof's step table (the same
format as the Python search's counterexamples). Liveness: per leads-to goal, a
nested-depth-first acceptance-cycle search under SPIN's weak fairness (`-a -f`),
one process per action instance.

States are counted without symmetry reduction (SPIN has none): compare with
the Python search run with `symmetry=None`.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvproof.spec.compiled import Compiled
from kvproof.spec.core import Layout, Protocol, variant_name
from kvproof.spec.machine import CONCRETE, evaluate
from kvproof.verify.explore import render_state
from kvproof.verify.promela import Model, generate
from kvproof.verify.verdict import Step

# Breadth-first (shortest trails), exact state counts (no partial-order reduction: one process
# anyway), safety only; memory capped so that a too-large instance fails cleanly.
# -O1: as fast a search as -O2 for these generated models, at half the compile time.
SAFETY_FLAGS = ("-O1", "-DBFS", "-DSAFETY", "-DNOREDUCE", "-DMEMLIM=4096")
LIVENESS_FLAGS = ("-O1", "-DNOREDUCE", "-DMEMLIM=4096")


class SpinUnavailable(RuntimeError):
    """SPIN or a C compiler is missing: says what to install."""


class SpinError(RuntimeError):
    """pan failed, ran out of memory, or disagreed with the generated model's assumptions."""


def spin_tools() -> tuple[str, str]:
    """Paths of `spin` and a C compiler, or SpinUnavailable naming what is missing."""
    spin, cc = shutil.which("spin"), shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    missing = [n for n, p in (("spin (Debian: apt-get install spin)", spin), ("a C compiler (cc/gcc)", cc))
               if p is None]
    if missing:
        raise SpinUnavailable("the SPIN engine needs " + " and ".join(missing))
    return spin, cc  # type: ignore[return-value]


@dataclass
class SpinRun:
    """The parsed output of one pan run."""

    states: int
    transitions: int
    errors: int
    seconds: float                     # wall time of the pan run (pan's own clock has 10 ms steps)
    cpu_seconds: float                 # its CPU time: the rate on a shared machine
    deadlocks: int
    violated: list[int]                # property-instance indices some reachable state violates
    out: str


@dataclass
class SpinExploration:
    """What SPIN found for one instance: the same questions the Python search answers."""

    protocol: type[Protocol]
    variant: str
    params: dict[str, int]
    layout: Layout
    states: int
    transitions: int                   # pan's stored + matched (not the Python graph's edge count)
    search_seconds: float              # wall time of the safety run (the whole state space)
    search_cpu_seconds: float          # its CPU time
    seconds: float                     # everything: generate, compile, every run, replay
    compile_seconds: float
    violations: dict[str, list[Step]] = field(default_factory=dict)      # property -> shortest trail
    final_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    deadlocks: int = 0
    liveness: dict[str, list[Step] | None] = field(default_factory=dict)  # goal -> lasso, None: holds
    dropped: frozenset[str] = frozenset()

    @property
    def states_per_second(self) -> float | None:
        """Search rate: states stored per second of the safety run's wall time."""
        return self.states / self.search_seconds if self.search_seconds > 0 else None

    @property
    def states_per_cpu_second(self) -> float | None:
        """Search rate per CPU second (steadier than wall time on a busy machine)."""
        return self.states / self.search_cpu_seconds if self.search_cpu_seconds > 0 else None


_STORED = re.compile(r"^\s*(\d+) states, stored", re.M)
_TRANS = re.compile(r"^\s*(\d+) transitions \(=", re.M)
_ERRORS = re.compile(r"errors: (\d+)")
_REPORT = re.compile(r"^kvproof: deadlocks (\d+) violated([\d -]*)$", re.M)


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise SpinError(f"{' '.join(cmd[:2])} failed (exit {p.returncode}): {(p.stderr or p.stdout)[-2000:]}")
    return p.stdout


def _compile(model: Model, work: Path, name: str, flags: tuple[str, ...]) -> Path:
    spin, cc = spin_tools()
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.pml").write_text(model.text)
    _run([spin, "-a", "model.pml"], d)
    _run([cc, *flags, "-w", "-o", "pan", "pan.c"], d)
    return d


def _pan(d: Path, args: list[str], target: str | None = None, timeout: float | None = None,
         full: bool = False) -> SpinRun:
    """Run pan; `full`: the run must search every state (not stop at a targeted error)."""
    env = dict(os.environ)
    env.pop("KVPROOF_TARGET", None)
    if target is not None:
        env["KVPROOF_TARGET"] = target
    t0, c0 = time.perf_counter(), _child_cpu()
    out = _run(["./pan", *args], d, env, timeout)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if "MEMLIM bound" in out or "out of memory" in out or (full and "Search not completed" in out):
        raise SpinError(f"pan ran out of memory ({[f for f in SAFETY_FLAGS if 'MEMLIM' in f][0]} MB) before "
                        f"searching every state: lower the bounds\n{out[-600:]}")
    if not (_STORED.search(out) and _TRANS.search(out) and _ERRORS.search(out)):
        raise SpinError(f"unexpected pan output (no state count):\n{out[-800:]}")
    rep = _REPORT.search(out)
    return SpinRun(int(_STORED.search(out).group(1)), int(_TRANS.search(out).group(1)),
                   int(_ERRORS.search(out).group(1)), wall, cpu,
                   int(rep.group(1)) if rep else 0,
                   [int(x) for x in rep.group(2).split()] if rep else [], out)


_TRAIL_LINE = re.compile(r"^\s*(\d+):\s+proc\s+\d+ \(\w+:\d+\) model\.pml:(\d+) ", re.M)


def trail_options(model: Model, d: Path) -> tuple[list[tuple[str, dict[str, int]]], int | None]:
    """The (action, args) sequence of pan's trail in `d`, and where its cycle starts (liveness)."""
    spin, _ = spin_tools()
    out = _run([spin, "-t", "-p", "-k", "model.pml.trail", "model.pml"], d)
    steps, seen, cycle = [], set(), None
    for line in out.splitlines():
        if "START OF CYCLE" in line:
            cycle = len(steps)
            continue
        mt = _TRAIL_LINE.match(line)
        if not mt or mt.group(1) in seen:
            continue
        opt = model.option_at(int(mt.group(2)))
        if opt is None:
            continue                     # the never claim's own moves, the deadlock self-loop
        seen.add(mt.group(1))
        steps.append((opt.action, opt.args))
    return steps, cycle


def replay(protocol: type[Protocol], variant: str, layout: Layout, run: list[tuple[str, dict[str, int]]],
           dropped: frozenset[str] = frozenset()) -> tuple[list[Step], tuple]:
    """Fire a trail through the concrete semantics: kvproof's step table and the final state."""
    state, steps = layout.initial(), []
    for i, (action, args) in enumerate(run, 1):
        adef = protocol.actions[action]
        m = evaluate(layout, state, adef, args, CONCRETE, variant, dropped)   # raises if SPIN disagrees
        nxt = list(state)
        for pos, val in m.writes.items():
            nxt[pos] = val
        changes = {layout.label(p): getattr(v, "name", v) for p, v in enumerate(nxt) if v != state[p]}
        sent = [f"{e.fields['channel']}{tuple(e.fields['index'])}@{e.fields['epoch']}"
                for e in m.emissions if e.kind == "send"]
        steps.append(Step(i, adef.actor, action, args, changes, note="sends " + ", ".join(sent) if sent else ""))
        state = tuple(nxt)
    return steps, state


def explore_spin(protocol: type[Protocol], variant: str, params: dict[str, int],
                 dropped: frozenset[str] = frozenset(), liveness: bool = True,
                 workdir: str | Path | None = None, timeout: float | None = None) -> SpinExploration:
    """Every reachable state of the instance, searched by SPIN: properties, deadlocks, fair liveness."""
    t0 = time.perf_counter()
    variant = variant_name(variant)
    full = {**protocol.bounds, **params}
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="kvproof-spin-")
    work = Path(workdir if workdir is not None else tmp.name)  # type: ignore[union-attr]
    try:
        model = generate(protocol, variant, full, dropped, "safety")
        tc = time.perf_counter()
        d = _compile(model, work, "safety", SAFETY_FLAGS)
        t_compile = time.perf_counter() - tc
        run = _pan(d, ["-c0"], timeout=timeout, full=True)
        if run.errors:                   # only the channel-epoch assertions are plain SPIN errors
            raise SpinError("a message carries an epoch beyond the receive's bound (the generated "
                            f"model would deliver fewer messages than the Python search)\n{run.out[-800:]}")
        ex = SpinExploration(protocol, variant, full, model.layout, run.states, run.transitions,
                             run.seconds, run.cpu_seconds, 0.0, t_compile, dropped=dropped, deadlocks=run.deadlocks)
        comp = Compiled(protocol, full, variant, dropped)
        init_bad = {name for name, _ in comp.violated(model.layout.initial())}
        for name in init_bad:            # pan checks after each step; the initial state is checked here
            ex.violations[name], ex.final_states[name] = [], render_state(model.layout, model.layout.initial())
        by_prop: dict[str, list[int]] = {}
        for k in run.violated:
            by_prop.setdefault(model.property_instances[k][0], []).append(k)
        for name, ks in by_prop.items():
            if name in ex.violations:
                continue
            _pan(d, ["-c1"], target=",".join(map(str, ks)), timeout=timeout)
            steps, final = replay(protocol, variant, model.layout, trail_options(model, d)[0], dropped)
            bad = {n for n, _ in comp.violated(final)}
            if name not in bad:
                raise SpinError(f"SPIN's trail for {name} replays to a state that satisfies it")
            ex.violations[name], ex.final_states[name] = steps, render_state(model.layout, final)
        if liveness:
            for goal in protocol.goals:
                ex.liveness[goal] = _liveness(protocol, variant, full, dropped, goal, work, timeout)
        ex.seconds = time.perf_counter() - t0
        return ex
    finally:
        if tmp is not None:
            tmp.cleanup()


def _liveness(protocol: type[Protocol], variant: str, full: dict[str, int], dropped: frozenset[str],
              goal: str, work: Path, timeout: float | None) -> list[Step] | None:
    """None when the goal holds under weak fairness, else the lasso (stem, then cycle) as steps."""
    model = generate(protocol, variant, full, dropped, "liveness", goal=goal)
    nprocs = model.text.count("active proctype") + 1              # the never claim counts too
    nfair = (nprocs + 2 + 3) // 4 + 1       # pan's weak fairness handles 4 * NFAIR - 2 processes
    d = _compile(model, work, f"live_{goal}", (*LIVENESS_FLAGS, f"-DNFAIR={nfair}"))
    run = _pan(d, ["-a", "-f", "-c1", "-m1000000"], timeout=timeout)
    if run.errors == 0:
        return None
    opts, _ = trail_options(model, d)
    steps, _ = replay(protocol, variant, model.layout, opts, dropped)
    return steps


def spin_available() -> str | None:
    """None when the SPIN engine can run here, else why not."""
    try:
        spin_tools()
    except SpinUnavailable as e:
        return str(e)
    return None

