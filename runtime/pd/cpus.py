"""Where the PD processes run: the decode process alone on one CPU, the router and prefill ranks on the rest.

Decode's model step is the serial bottleneck of a PD deployment: every output token comes out of
it, one batch at a time. On a small box the router's channel thread, the prefill ranks' forwards
and the HTTP loop otherwise preempt it (a woken thread preempts the one that woke it on a busy
CPU), and every such preemption stretches the step for all 32 sequences. With `cpu_layout="auto"`
(the one-command launch) and at least two CPUs in this process's affinity, decode gets the last
of them to itself and everything else keeps the others; with one CPU, or `"off"`, nothing moves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CPU_LAYOUTS = ("auto", "off")


@dataclass(frozen=True)
class CpuLayout:
    """CPU sets of the roles: decode's, and the one the router, prefill ranks and followers share."""

    decode: frozenset[int]
    others: frozenset[int]


def plan_layout(mode: str, cpus: set[int] | None = None) -> CpuLayout | None:
    """The layout for `mode` over `cpus` (default: this process's affinity); None when nothing moves."""
    if mode not in CPU_LAYOUTS:
        raise ValueError(f"cpu_layout={mode!r}, expected one of {list(CPU_LAYOUTS)}")
    if cpus is None:
        cpus = affinity()
    if mode == "off" or cpus is None or len(cpus) < 2:
        return None
    mine = max(cpus)
    return CpuLayout(frozenset({mine}), frozenset(cpus - {mine}))


def affinity() -> set[int] | None:
    """This process's CPUs, or None where the platform cannot say (no sched_getaffinity)."""
    get = getattr(os, "sched_getaffinity", None)
    return set(get(0)) if get is not None else None


def pin_process(cpus: frozenset[int] | set[int]) -> None:
    """Move every thread of this process onto `cpus` (threads started later inherit it)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:                                 # no /proc: at least the calling thread
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:                             # a thread that just exited
            pass


def parse_cpus(text: str) -> frozenset[int]:
    """'0,3' -> {0, 3}; ValueError names a malformed list."""
    try:
        out = frozenset(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--cpus {text!r}: expected comma-separated CPU numbers, e.g. 0,1") from None
    if not out or min(out) < 0:
        raise ValueError(f"--cpus {text!r}: expected one or more CPU numbers >= 0")
    return out


def format_cpus(cpus: frozenset[int] | set[int]) -> str:
    """{0, 3} -> '0,3' (what parse_cpus reads)."""
    return ",".join(str(c) for c in sorted(cpus))
