"""Tiny random plans for Hypothesis (a plain module: a second conftest.py could shadow it)."""
from __future__ import annotations

from hypothesis import strategies as st

from kvproof.spec.streams import HostSync, Op, Plan, Record, Wait

STREAMS = ("s0", "s1")
REGIONS = ("a", "b")
EVENTS = ("e0", "e1")


@st.composite
def tiny_plans(draw: st.DrawFn, max_instrs: int = 6) -> Plan:
    """A random plan over two streams, two regions and two events (small enough to explore fully)."""
    n = draw(st.integers(1, max_instrs))
    instrs = []
    for k in range(n):
        kind = draw(st.sampled_from(("op", "op", "op", "record", "wait", "sync")))
        s = draw(st.sampled_from(STREAMS))
        if kind == "op":
            reads = tuple(draw(st.lists(st.sampled_from(REGIONS), max_size=1, unique=True)))
            writes = tuple(draw(st.lists(st.sampled_from(REGIONS), max_size=1, unique=True)))
            instrs.append(Op(s, f"op{k}", reads, writes, draw(st.sampled_from(("copy", "compute")))))
        elif kind == "record":
            instrs.append(Record(s, draw(st.sampled_from(EVENTS))))
        elif kind == "wait":
            instrs.append(Wait(s, draw(st.sampled_from(EVENTS))))
        elif draw(st.booleans()):
            instrs.append(HostSync(stream=s))
        else:
            instrs.append(HostSync(event=draw(st.sampled_from(EVENTS))))
    return Plan("tiny", STREAMS, tuple(instrs))
