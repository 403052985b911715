"""LayerSplit: layer-sharded KV across the ranks of a group, as one stream plan over all ranks.

Each of R ranks stores only the KV cache and Indexer cache of the layers it owns.
Before layer l runs, its owner broadcasts them to the other ranks, which receive
into one of ``depth`` receive buffers (double buffering by default; buffer
``l % depth``). Every rank has a ``comm@r<k>`` and a ``compute@r<k>`` stream. Per
layer l, with owner o and buffer b = l % depth (SGLang PR #29421's pipeline):

- owner o, comm stream: send the Indexer cache of l, record ``sent_idx[l]``;
  send the KV of l, record ``sent_kv[l]``;
- every other rank r, comm stream: wait ``released[l-prefetch]@r`` (the buffer is
  reused only after the attention that read it has finished), wait ``sent_idx[l]``,
  receive into ``recv.idx[b]@r``, record ``idx_ready[l]@r``; wait ``sent_kv[l]``,
  receive into ``recv.kv[b]@r``, record ``kv_ready[l]@r``;
- every rank, compute stream: (non-owners: wait ``idx_ready[l]@r``) ``indexer[l]``;
  (wait ``kv_ready[l]@r``) ``attention[l]`` -- the KV receive overlaps the indexer;
  record ``released[l]@r``. The owner reads its own ``kv[l]@r<o>`` directly.

A broadcast is modelled as a send half on the owner (reads the stored cache,
writes the ``wire.*[l]`` mailbox, records ``sent_*[l]``) and a receive half on
each other rank that waits on that cross-rank event: the receiver's NCCL/gloo
kernel cannot finish before the owner's data has left. This allows *more*
schedules than a real rendezvous (the send may finish before anyone receives),
so a plan proven race-free here is race-free under the stricter collective.

Variants: ``fixed`` waits ``released[l-depth]`` (prefetch = depth); ``unfixed``
prefetches one layer too deep (waits ``released[l-depth-1]``): the receive of
layer l overwrites buffer l % depth while ``attention[l-depth]`` may still read
it, a write-after-read race that ``verify/checks_layersplit.py`` must refute.

Ownership: ``contiguous`` (default, as SGLang: rank k owns a block of layers, the
first L mod R ranks one extra) or ``round_robin`` (layer l on rank l mod R).

Write-back (``writeback=True``, what a serving forward needs): the batch's new
tokens write their Indexer keys and KV rows of layer l into the region the layer
reads -- ``indexer[l]`` also writes the idx region it reads, ``attention[l]`` the kv
region. On a receiver that is its receive buffer (after the receive landed); on
the owner it is the stored layer, which its own ``send_*[l]`` reads, so the owner's
compute stream first waits ``sent_idx[l]`` / ``sent_kv[l]``. Without that wait
(``owner_wait=False``) the send may read a half-written layer: a write-after-read
race the checks refute.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from kvproof.spec.core import variant_name
from kvproof.spec.streams import Instr, Op, Plan, Record, Wait

VARIANTS: tuple[str, ...] = ("fixed", "unfixed")
OWNERSHIPS: tuple[str, ...] = ("contiguous", "round_robin")
DELIVERY = "every_layer_delivered"


@dataclass(frozen=True)
class LayerSplitShape:
    """Everything a LayerSplit plan depends on (plans carry no token counts or addresses)."""

    ranks: int
    layers: int
    depth: int = 2
    ownership: str = "contiguous"
    variant: str = "fixed"
    writeback: bool = False        # compute ops also write the new tokens' rows of the regions they read
    owner_wait: bool = True        # writeback: the owner's compute waits its own sends first (False: the race)

    def __post_init__(self) -> None:
        for name in ("ranks", "layers", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LayerSplitShape.{name} must be a positive int, got {v!r}")
        if self.ownership not in OWNERSHIPS:
            raise ValueError(f"unknown ownership {self.ownership!r}; expected one of {OWNERSHIPS}")
        object.__setattr__(self, "variant", variant_name(self.variant))
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown LayerSplit variant {self.variant!r}; expected one of {VARIANTS}")
        if not self.owner_wait and not self.writeback:
            raise ValueError("LayerSplitShape.owner_wait=False only means something with writeback=True")

    @property
    def name(self) -> str:
        """The plan's name: variant (``+writeback``, ``-unwaited``), ranks, layers, depth, ownership."""
        wb = ("+writeback" if self.writeback else "") + ("" if self.owner_wait else "-unwaited")
        return f"layersplit/{self.variant}{wb}/R={self.ranks}/L={self.layers}/depth={self.depth}/{self.ownership}"

    @property
    def prefetch(self) -> int:
        """How many layers ahead a receive may run: the distance of the ``released`` wait."""
        return self.depth if self.variant == "fixed" else self.depth + 1


def owner_of(layer: int, ranks: int, layers: int, ownership: str = "contiguous") -> int:
    """The rank that stores ``layer``."""
    if not 0 <= layer < layers:
        raise ValueError(f"layer {layer} out of range 0..{layers - 1}")
    if ownership == "round_robin":
        return layer % ranks
    if ownership != "contiguous":
        raise ValueError(f"unknown ownership {ownership!r}; expected one of {OWNERSHIPS}")
    base, extra = divmod(layers, ranks)            # the first `extra` ranks own base + 1 layers
    cut = extra * (base + 1)
    return layer // (base + 1) if layer < cut else extra + (layer - cut) // base


def owned_layers(rank: int, ranks: int, layers: int, ownership: str = "contiguous") -> tuple[int, ...]:
    """The layers ``rank`` stores, ascending."""
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} out of range 0..{ranks - 1}")
    return tuple(l for l in range(layers) if owner_of(l, ranks, layers, ownership) == rank)


def comm(rank: int) -> str:
    """Name of a rank's communication stream."""
    return f"comm@r{rank}"


def compute(rank: int) -> str:
    """Name of a rank's compute stream."""
    return f"compute@r{rank}"


def shape_owner(shape: LayerSplitShape, layer: int) -> int:
    """The owner of ``layer`` under the shape's ownership rule."""
    return owner_of(layer, shape.ranks, shape.layers, shape.ownership)


def kv_source(shape: LayerSplitShape, layer: int, rank: int, owner: int | None = None) -> str:
    """The region ``attention[layer]`` reads on ``rank``: its own store or a receive buffer."""
    o = shape_owner(shape, layer) if owner is None else owner
    return f"kv[{layer}]@r{o}" if o == rank else f"recv.kv[{layer % shape.depth}]@r{rank}"


def idx_source(shape: LayerSplitShape, layer: int, rank: int, owner: int | None = None) -> str:
    """The region ``indexer[layer]`` reads on ``rank``."""
    o = shape_owner(shape, layer) if owner is None else owner
    return f"idx[{layer}]@r{o}" if o == rank else f"recv.idx[{layer % shape.depth}]@r{rank}"


def layer_block(shape: LayerSplitShape, layer: int, owner: int | None = None) -> tuple[Instr, ...]:
    """The instructions every rank issues for one layer (owner's sends first, then receivers).

    ``owner`` overrides the shape's ownership rule (window proofs over arbitrary ownership).
    """
    l, o = layer, shape_owner(shape, layer) if owner is None else owner
    if not 0 <= o < shape.ranks:
        raise ValueError(f"owner {o} of layer {layer} out of range 0..{shape.ranks - 1}")
    out: list[Instr] = []
    if shape.ranks > 1:
        out += [Op(comm(o), f"send_idx[{l}]", (f"idx[{l}]@r{o}",), (f"wire.idx[{l}]",), "copy"),
                Record(comm(o), f"sent_idx[{l}]"),
                Op(comm(o), f"send_kv[{l}]", (f"kv[{l}]@r{o}",), (f"wire.kv[{l}]",), "copy"),
                Record(comm(o), f"sent_kv[{l}]")]
    for r in range(shape.ranks):
        if r == o:
            continue
        b, c = l % shape.depth, comm(r)
        if l - shape.prefetch >= 0:        # the buffer's previous reader must have finished
            out.append(Wait(c, f"released[{l - shape.prefetch}]@r{r}"))
        out += [Wait(c, f"sent_idx[{l}]"),
                Op(c, f"recv_idx[{l}]@r{r}", (f"wire.idx[{l}]",), (f"recv.idx[{b}]@r{r}",), "copy"),
                Record(c, f"idx_ready[{l}]@r{r}"),
                Wait(c, f"sent_kv[{l}]"),
                Op(c, f"recv_kv[{l}]@r{r}", (f"wire.kv[{l}]",), (f"recv.kv[{b}]@r{r}",), "copy"),
                Record(c, f"kv_ready[{l}]@r{r}")]
    wb = shape.writeback
    own_wait = wb and shape.owner_wait and shape.ranks > 1
    for r in range(shape.ranks):
        s, remote = compute(r), r != o
        idx, kv = idx_source(shape, l, r, o), kv_source(shape, l, r, o)
        out += [Wait(s, f"idx_ready[{l}]@r{r}")] if remote else [Wait(s, f"sent_idx[{l}]")] if own_wait else []
        out.append(Op(s, f"indexer[{l}]@r{r}", (idx, f"hidden[{l}]@r{r}"),
                      (f"topk[{l}]@r{r}",) + ((idx,) if wb else ())))
        out += [Wait(s, f"kv_ready[{l}]@r{r}")] if remote else [Wait(s, f"sent_kv[{l}]")] if own_wait else []
        out += [Op(s, f"attention[{l}]@r{r}", (kv, f"topk[{l}]@r{r}", f"hidden[{l}]@r{r}"),
                   (f"hidden[{l + 1}]@r{r}",) + ((kv,) if wb else ())),
                Record(s, f"released[{l}]@r{r}")]
    return tuple(out)


@functools.lru_cache(maxsize=64)
def layersplit_plan(shape: LayerSplitShape) -> Plan:
    """The forward pass of one batch over all layers and ranks, as one plan."""
    streams = tuple(s for r in range(shape.ranks) for s in (comm(r), compute(r)))
    instrs = tuple(i for l in range(shape.layers) for i in layer_block(shape, l))
    return Plan(shape.name, streams, instrs)


def rank_plan(plan: Plan, rank: int) -> Plan:
    """What one rank issues: its streams' instructions, without waits on other ranks' events.

    A cross-rank wait (``sent_*``) is what the collective itself enforces at run time.
    """
    mine = (comm(rank), compute(rank))
    recorded = {i.event for i in plan.instrs if isinstance(i, Record) and i.stream in mine}
    keep = tuple(i for i in plan.instrs if i.stream in mine and not (isinstance(i, Wait) and i.event not in recorded))
    return Plan(f"{plan.name}@r{rank}", mine, keep)


def delivery_errors(shape: LayerSplitShape, plan: Plan | None = None) -> list[str]:
    """Readers that would not see the owner's cache of their layer, following copies in issue order.

    A copy (one read region) passes its source's value on; any other op writes a new value.
    Together with no_read_before_ready and no_write_after_read this shows every layer's
    KV and Indexer cache reaches every rank that needs it, intact.
    """
    plan = plan or layersplit_plan(shape)
    value: dict[str, str] = {}
    errs: list[str] = []
    want = {}
    for l in range(shape.layers):
        o = shape_owner(shape, l)
        for r in range(shape.ranks):
            want[f"indexer[{l}]@r{r}"] = (idx_source(shape, l, r), f"idx[{l}]@r{o}")
            want[f"attention[{l}]@r{r}"] = (kv_source(shape, l, r), f"kv[{l}]@r{o}")
    seen = set()
    for ins in plan.instrs:
        if not isinstance(ins, Op):
            continue
        if ins.name in want:
            region, expected = want[ins.name]
            got = value.get(region, region)
            if region not in ins.reads or got != expected:
                errs.append(f"{ins.name} reads {region} holding {got}, expected {expected}")
            seen.add(ins.name)
        for w in ins.writes:
            value[w] = value.get(ins.reads[0], ins.reads[0]) if ins.kind == "copy" and len(ins.reads) == 1 \
                else ins.name
    errs += [f"{name} is missing from the plan" for name in want if name not in seen]
    return errs
