"""HiCache layer-wise swap-in: the per-batch stream plan, fixed and pre-fix.

Two streams. The ``load`` stream copies, per layer l, the host pages of the
Indexer cache into device memory and records ``idx_ready[l]``, then the KV
pages and records ``kv_ready[l]`` (Indexer first: it is small and the indexer
can then run while the KV copy is still in flight). The ``forward`` stream runs, per layer,
``indexer[l]`` (reads the Indexer cache of l and the layer input) and
``attention[l]`` (reads the KV of l and the indexer's top-k, writes the next
layer's input).

- ``fixed``: the forward stream waits ``idx_ready[l]`` before ``indexer[l]``
  and ``kv_ready[l]`` before ``attention[l]``: it computes only on ready data.
- ``unfixed``: no wait before the indexer, as before the GLM-5 fix (SGLang PR
  #22811: Indexer-cache accessors skipped the per-layer ``wait_until(layer)``
  the KV accessors did), so the indexer can read a half-loaded Indexer cache.

A batch's plan is a prologue (the load stream waits for the forward stream's
earlier work before it overwrites device pages: SGLang's
``load_stream.wait_stream(current_stream)``) followed by one per-layer
*template* instantiated at l = 0..L-1; names carry ``{l}`` or ``{l+1}``.
That shape is what lets ``verify/race.py`` prove the fixed plan for every L.
"""
from __future__ import annotations

import functools
import re

from kvproof.spec.core import variant_name
from kvproof.spec.streams import Instr, Op, Plan, Record, Wait

VARIANTS: tuple[str, ...] = ("fixed", "unfixed")
STREAMS: tuple[str, ...] = ("load", "forward")
LOAD, FORWARD = STREAMS


def layer_template(variant: str) -> tuple[Instr, ...]:
    """The instructions issued for one layer, with ``{l}`` / ``{l+1}`` placeholders in names."""
    variant = variant_name(variant)
    if variant not in VARIANTS:
        raise ValueError(f"unknown HiCache variant {variant!r}; expected one of {VARIANTS}")
    # The Indexer cache (~1/8 of the KV bytes) goes first so indexer[l] can overlap the KV copy.
    load = (
        Op(LOAD, "load_idx[{l}]", ("host.idx[{l}]",), ("dev.idx[{l}]",), "copy"),
        Record(LOAD, "idx_ready[{l}]"),
        Op(LOAD, "load_kv[{l}]", ("host.kv[{l}]",), ("dev.kv[{l}]",), "copy"),
        Record(LOAD, "kv_ready[{l}]"),
    )
    wait_idx = (Wait(FORWARD, "idx_ready[{l}]"),) if variant == "fixed" else ()
    forward = wait_idx + (
        Op(FORWARD, "indexer[{l}]", ("dev.idx[{l}]", "hidden[{l}]"), ("topk[{l}]",)),
        Wait(FORWARD, "kv_ready[{l}]"),
        Op(FORWARD, "attention[{l}]", ("dev.kv[{l}]", "topk[{l}]", "hidden[{l}]"), ("hidden[{l+1}]",)),
    )
    return load + forward


_PLACEHOLDER = re.compile(r"\{l(?:\+(\d+))?\}")


def offset_of(name: str) -> tuple[str, int] | None:
    """Split a template name into (stem, layer offset); None when it has no placeholder."""
    m = _PLACEHOLDER.search(name)
    if m is None:
        return None
    return name[:m.start()] + "{}" + name[m.end():], int(m.group(1) or 0)


def instantiate(ins: Instr, layer: int) -> Instr:
    """One template instruction with ``{l}`` / ``{l+k}`` replaced for ``layer``."""
    sub = lambda s: _PLACEHOLDER.sub(lambda m: str(layer + int(m.group(1) or 0)), s)  # noqa: E731
    if isinstance(ins, Op):
        return Op(ins.stream, sub(ins.name), tuple(map(sub, ins.reads)), tuple(map(sub, ins.writes)), ins.kind)
    if isinstance(ins, (Record, Wait)):
        return type(ins)(ins.stream, sub(ins.event))
    return ins


def layer_block(layer: int, variant: str) -> tuple[Instr, ...]:
    """The instructions of one layer."""
    return tuple(instantiate(i, layer) for i in layer_template(variant))


# Before a batch overwrites device pages, the load stream waits for the forward stream's earlier
# work: the previous batch may still be reading pages this batch reuses (write-after-read).
PROLOGUE: tuple[Instr, ...] = (Record(FORWARD, "pages_free"), Wait(LOAD, "pages_free"))


def hicache_plan(layers: int, variant: str = "fixed", batches: int = 1) -> Plan:
    """The swap-in + forward plan of ``batches`` back-to-back batches over ``layers`` layers."""
    return _hicache_plan(layers, variant_name(variant), batches)


@functools.lru_cache(maxsize=64)
def _hicache_plan(layers: int, variant: str, batches: int) -> Plan:
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    if not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive int, got {batches!r}")
    instrs: list[Instr] = []
    for b in range(batches):
        for ins in PROLOGUE + tuple(i for l in range(layers) for i in layer_block(l, variant)):
            if batches > 1 and isinstance(ins, Op):    # op names are unique within a plan
                ins = Op(ins.stream, f"{ins.name}@b{b}", ins.reads, ins.writes, ins.kind)
            instrs.append(ins)
    name = f"hicache/{variant}/L={layers}" + (f"/B={batches}" if batches > 1 else "")
    return Plan(name, STREAMS, tuple(instrs))


def event_stem(event: str) -> str:
    """The event family: ``kv_ready[3]`` -> ``kv_ready``."""
    return event.split("[", 1)[0]


def drop_wait(plan: Plan, stem: str) -> Plan:
    """The plan without its waits on the event family ``stem`` (guard-necessity analysis)."""
    keep = tuple(i for i in plan.instrs if not (isinstance(i, Wait) and event_stem(i.event) == stem))
    return Plan(f"{plan.name}-{stem}", plan.streams, keep)
