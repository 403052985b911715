"""LayerSplit in the serving engine: the model forward on a group of R gloo ranks, KV layers sharded.

`EngineConfig(layersplit=R)` (`kvproof serve --layersplit R`): rank 0 is the engine process,
ranks 1..R-1 are spawned follower processes (127.0.0.1, a free port, a private gloo group).
Each rank's `SplitKVCache` stores, for every page of the pool, only the layers it owns
(`spec.layersplit_plan.owned_layers`, contiguous by default) plus `depth` receive buffers of
one layer's pages each -- about R times the unsplit KV capacity per rank.

Compute is replicated: every rank runs the same decoder forward over the same batch. Per
step rank 0 sends each follower a small header over a pipe (the batch's sizes; the pipe
lets an idle follower wait without a gloo timeout and see EOF if the engine dies), then
broadcasts one int64 tensor holding the tokens, the `AttnBatch` tensors and the batch's
pages. The MTP draft head, the logits and sampling read no cache and run on rank 0 only.

Each forward executes this rank's part of the checked plan (`spec.layersplit_plan` with
`writeback=True`, checked once per shape by `layersplit.checked_plan`; a plan with a race --
the `prefix` variant, or write-back without the owner's wait -- is refused unless
`layersplit_allow_races`). Its ops map to: `send_*[l]` (owner: gather the batch's pages of
its stored layer, asynchronous broadcast), `recv_*[l]` (the broadcast into a private buffer,
scattered into receive buffer l % depth when it lands), `indexer[l]` (`DecoderLayer.index`:
writes the new tokens' indexer keys into the region it reads, top-k) and `attention[l]`
(`DecoderLayer.attend`: writes their KV rows into the region it reads, sparse MLA, MLP).
Issued with `layersplit.run_host`: collectives overlap the host's compute, waits wait them.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from kvproof.runtime.layersplit_group import broadcast, free_port, gloo_group, start_ranks
from kvproof.runtime.model import AttnBatch, DSAModel
from kvproof.runtime.model_cache import KVCache
from kvproof.runtime.model_config import ModelConfig
from kvproof.runtime.stream_exec import OpImpl
from kvproof.spec.layersplit_plan import LayerSplitShape, comm, owned_layers, owner_of, rank_plan
from kvproof.spec.streams import Op, Plan

# engine variant -> plan shape fields: fixed, the too-deep prefetch, write-back without the owner's wait
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {"fixed": {}, "prefix": {"variant": "prefix"},
                                              "no_owner_wait": {"owner_wait": False}}
_REGION = re.compile(r"^(kv|idx|recv\.kv|recv\.idx)\[(\d+)\]@r(\d+)$")
GLOO_TIMEOUT_S = 60.0             # a collective that takes longer fails (a rank died mid-step)
_FIELDS = ("positions", "slots", "q_index", "q_mask", "key_slots", "ctx_lens", "page_table", "tok_seq")


def engine_shape(cfg: Any, n_layers: int) -> LayerSplitShape | None:
    """The write-back plan shape of an engine config (fields layersplit*), None when layersplit is 1.

    ValueError names a bad value or an unsupported combination.
    """
    r = getattr(cfg, "layersplit", 1)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"layersplit={r!r}: expected an int >= 1 (the number of ranks; 1 disables LayerSplit)")
    if r == 1:
        return None
    if r > n_layers:
        raise ValueError(f"layersplit={r} ranks > the model's {n_layers} layers: every rank must own a layer")
    if cfg.host_cache_pages:
        raise ValueError("layersplit with host_cache_pages (--host-cache-pages) is not supported yet: "
                         "use one or the other")
    if not str(cfg.device).startswith("cpu"):
        raise ValueError(f"layersplit runs on CPU (gloo) only for now, got device={cfg.device!r}")
    if cfg.layersplit_variant not in ENGINE_VARIANTS:
        raise ValueError(f"layersplit_variant={cfg.layersplit_variant!r}; expected one of {sorted(ENGINE_VARIANTS)}")
    return LayerSplitShape(r, n_layers, cfg.layersplit_depth, cfg.layersplit_ownership, writeback=True,
                           **ENGINE_VARIANTS[cfg.layersplit_variant])


class SplitKVCache:
    """One rank's share of the engine's paged cache: its layers of every page, plus receive buffers.

    `store` holds the owned layers (position i = `owned[i]`), `recv` the `depth` receive
    buffers (poisoned: NaN, fp8 0xFF, so a broadcast that silently does nothing shows up as
    NaN). `kv` is the store's tensor (the runner reads its device); `corrupt` (fault
    injection) flips bytes of this rank's stored layers only.
    """

    def __init__(self, cfg: ModelConfig, num_pages: int, device: torch.device | str, fp8_indexer: bool,
                 shape: LayerSplitShape, rank: int) -> None:
        self.cfg, self.shape, self.rank = cfg, shape, rank
        self.owned = owned_layers(rank, shape.ranks, shape.layers, shape.ownership)
        self._pos = {l: i for i, l in enumerate(self.owned)}
        dev = torch.device(device)
        self.store = KVCache(cfg, num_pages, dev, fp8_indexer, layers=len(self.owned))
        self.recv = KVCache(cfg, num_pages, dev, fp8_indexer, layers=shape.depth if shape.ranks > 1 else 0)
        self.recv.kv.fill_(float("nan"))
        self.recv.ik.fill_(float("nan"))
        if self.recv.ik_fp8 is not None:
            self.recv.ik_fp8.fill_(0xFF)
        self.kv = self.store.kv
        self._layer = KVCache(cfg, num_pages, torch.device("meta"), fp8_indexer, layers=1).nbytes()

    def region(self, name: str) -> tuple[torch.Tensor, ...]:
        """The tensors behind a plan region of this rank: ``kv[3]@r1`` -> (kv,), ``recv.idx[0]@r1`` -> (ik[, fp8])."""
        m = _REGION.match(name)
        if m is None or int(m.group(3)) != self.rank:
            raise KeyError(f"region {name!r} is not a cache region of rank {self.rank}")
        stem, i = m.group(1), int(m.group(2))
        cache, at = (self.recv, i) if stem.startswith("recv.") else (self.store, self._pos[i])
        if stem.endswith("kv"):
            return (cache.kv[at],)
        return (cache.ik[at],) + (() if cache.ik_fp8 is None else (cache.ik_fp8[at],))

    def corrupt(self, pages: list[int], n_tokens: int, seed: int = 0) -> int:
        """Fault injection on this rank's stored layers (see KVCache.corrupt)."""
        return self.store.corrupt(pages, n_tokens, seed)

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds (as `LayerSplitPool.memory`): its layers, staging, and the unsplit sizes."""
        st, rv, L = self.store.nbytes(), self.recv.nbytes(), self.shape.layers
        staging = rv["kv_bytes"] + rv["indexer_bytes"]
        return {"rank": self.rank, "ranks": self.shape.ranks, "layers_owned": len(self.owned),
                "kv_bytes": st["kv_bytes"], "indexer_bytes": st["indexer_bytes"], "staging_bytes": staging,
                "total_bytes": st["kv_bytes"] + st["indexer_bytes"] + staging,
                "unsplit_kv_bytes": L * self._layer["kv_bytes"], "unsplit_indexer_bytes": L * self._layer["indexer_bytes"]}

    def page_bytes(self) -> int:
        """Bytes of one page of one layer (KV + indexer keys): what a broadcast moves per page."""
        return (self._layer["kv_bytes"] + self._layer["indexer_bytes"]) // self.store.num_pages


class _Landing:
    """A receive in flight: the broadcast's work, then the pages scattered into the receive buffer (once)."""

    def __init__(self, work: Any, dst: torch.Tensor, pages: torch.Tensor, buf: torch.Tensor) -> None:
        self.work, self.dst, self.pages, self.buf = work, dst, pages, buf

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.dst.index_copy_(0, self.pages, self.buf)
            self.work = None


def split_forward(model: DSAModel, cache: SplitKVCache, plan: Plan, group: Any, tokens: torch.Tensor,
                  b: AttnBatch, pages: torch.Tensor) -> torch.Tensor:
    """This rank's part of the plan over one batch: tokens [T] -> last hidden states [T, D].

    ``plan`` is the rank's plan (`rank_plan`); ``pages`` [N] every page the batch reads.
    """
    from kvproof.runtime.layersplit import run_host          # (imports the kernels: not at engine import)
    shape, rank, backend = cache.shape, cache.rank, model.backend
    hidden: dict[int, torch.Tensor] = {0: model.embed(tokens)}
    indexed: dict[int, Any] = {}
    works: list[Any] = []
    impls: dict[str, OpImpl] = {}

    def send(regions: tuple[torch.Tensor, ...]) -> OpImpl:
        def start() -> None:                        # gathers the pages now: what the plan's send reads
            works.extend(broadcast(group, t.index_select(0, pages), rank) for t in regions)
        return start

    def recv(regions: tuple[torch.Tensor, ...], src: int) -> OpImpl:
        def start() -> None:
            for t in regions:
                buf = torch.empty((pages.numel(),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
                works.append(_Landing(broadcast(group, buf, src), t, pages, buf))
        return start

    def indexer(l: int, region: str) -> OpImpl:
        def start() -> None:
            ik, *fp8 = cache.region(region)
            indexed[l] = model.layers[l].index(hidden[l], b, ik, fp8[0] if fp8 else None, backend)
        return start

    def attention(l: int, region: str) -> OpImpl:
        def start() -> None:
            (kv,) = cache.region(region)
            hidden[l + 1] = model.layers[l].attend(hidden.pop(l), indexed.pop(l), b, kv, backend)
        return start

    for ins in plan.instrs:
        if not isinstance(ins, Op):
            continue
        l = int(ins.name.split("[", 1)[1].split("]", 1)[0])
        if ins.name.startswith("send_"):
            impls[ins.name] = send(cache.region(ins.reads[0]))
        elif ins.name.startswith("recv_"):
            impls[ins.name] = recv(cache.region(ins.writes[0]), owner_of(l, shape.ranks, shape.layers, shape.ownership))
        elif ins.name.startswith("indexer"):
            impls[ins.name] = indexer(l, ins.reads[0])
        else:
            impls[ins.name] = attention(l, ins.reads[0])
    run_host(plan, comm(rank), impls, works)
    return hidden[shape.layers]


# ---------------------------------------------------------------- the batch on the wire
@dataclass(frozen=True)
class BatchSizes:
    """The header of one step: sizes of the tokens, the AttnBatch tensors and the page list."""

    tokens: int
    seqs: int
    queries: int
    keys: int
    max_pages: int
    pages: int

    def lengths(self) -> tuple[int, ...]:
        """Element counts of tokens, the AttnBatch fields (in `_FIELDS` order) and pages."""
        T, B, Q, K, M = self.tokens, self.seqs, self.queries, self.keys, self.max_pages
        return (T, T, T, B * Q, B * Q, B * K, B, B * M, T, self.pages)


def encode_batch(tokens: torch.Tensor, b: AttnBatch, pages: torch.Tensor) -> tuple[torch.Tensor, BatchSizes]:
    """One int64 tensor holding tokens, the AttnBatch and pages, and its header."""
    B, Q = b.q_index.shape
    sizes = BatchSizes(tokens.numel(), B, Q, b.key_slots.shape[1], b.page_table.shape[1], pages.numel())
    parts = [tokens] + [getattr(b, f) for f in _FIELDS] + [pages]
    return torch.cat([p.reshape(-1).to(torch.int64) for p in parts]), sizes


def decode_batch(payload: torch.Tensor, sizes: BatchSizes) -> tuple[torch.Tensor, AttnBatch, torch.Tensor]:
    """Inverse of encode_batch: (tokens [T], AttnBatch, pages [N])."""
    T, B, Q, K, M = sizes.tokens, sizes.seqs, sizes.queries, sizes.keys, sizes.max_pages
    parts = list(torch.split(payload, list(sizes.lengths())))
    tokens, pages = parts[0], parts[-1]
    pos, slots, q_index, q_mask, key_slots, ctx, table, tok_seq = parts[1:-1]
    b = AttnBatch(pos, slots, q_index.view(B, Q), q_mask.view(B, Q).bool(), key_slots.view(B, K), ctx,
                  table.view(B, M).to(torch.int32), tok_seq.to(torch.int32))
    return tokens, b, pages


# ---------------------------------------------------------------- the group
class LayerSplitGroup:
    """Rank 0 of the engine's LayerSplit group: spawns the followers, broadcasts each batch, runs its share.

    The plan is checked (`checked_plan`) before anything is spawned, so a refused plan costs
    no processes. `close()` stops the followers (also when the engine is garbage collected).
    """

    def __init__(self, cfg: Any, model: DSAModel, shape: LayerSplitShape, cache: SplitKVCache) -> None:
        from kvproof.runtime.layersplit import checked_plan
        self.cfg, self.model, self.shape, self.cache = cfg, model, shape, cache
        self.plan = rank_plan(checked_plan(shape, cfg.layersplit_allow_races), 0)
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(shape.ranks - 1)]      # (follower's end, ours)
        self.conns = [w for _, w in pipes]
        port = free_port()
        self.procs = start_ranks(_follower, (shape.ranks, port, cfg, [r for r, _ in pipes]), shape.ranks - 1)
        for r, _ in pipes:
            r.close()
        self._finalizer = weakref.finalize(self, _shutdown, self.conns, self.procs)
        try:
            self.group = gloo_group(0, shape.ranks, port, GLOO_TIMEOUT_S, check=lambda: self.procs.join(0))
        except BaseException:
            self.close()
            raise
        self.memory = [cache.memory()] + [
            SplitKVCache(model.cfg, cache.store.num_pages, "meta", cache.store.ik_fp8 is not None, shape, k).memory()
            for k in range(1, shape.ranks)]
        self.counts = {"forwards": 0, "broadcast_bytes": 0}

    def forward(self, tokens: torch.Tensor, b: AttnBatch) -> torch.Tensor:
        """The model forward on every rank (tokens [T] -> rank 0's last hidden states [T, D])."""
        for k, p in enumerate(self.procs.processes, start=1):
            if not p.is_alive():
                raise RuntimeError(f"LayerSplit rank {k} (pid {p.pid}) exited with code {p.exitcode}")
        pages = torch.unique(b.page_table.to(torch.int64))
        payload, sizes = encode_batch(tokens, b, pages)
        for c in self.conns:
            c.send(("forward", sizes))
        with torch.inference_mode():
            broadcast(self.group, payload, 0).wait()
            h = split_forward(self.model, self.cache, self.plan, self.group, tokens, b, pages)
        self.counts["forwards"] += 1
        self.counts["broadcast_bytes"] += self.shape.layers * pages.numel() * self.cache.page_bytes()
        return h

    def stats(self) -> dict:
        """LayerSplit gauges and counters for /metrics (bytes per rank, forwards, broadcast bytes)."""
        m = self.memory
        return {"layersplit_ranks": self.shape.ranks,
                "layersplit_layers_owned{rank}": {str(x["rank"]): x["layers_owned"] for x in m},
                "layersplit_kv_bytes{rank}": {str(x["rank"]): x["kv_bytes"] + x["indexer_bytes"] for x in m},
                "layersplit_staging_bytes{rank}": {str(x["rank"]): x["staging_bytes"] for x in m},
                "layersplit_unsplit_kv_bytes": m[0]["unsplit_kv_bytes"] + m[0]["unsplit_indexer_bytes"],
                "layersplit_forwards_total": self.counts["forwards"],
                "layersplit_broadcast_bytes_total": self.counts["broadcast_bytes"]}

    def close(self) -> None:
        """Stop the followers and wait for them (idempotent)."""
        self._finalizer()


def _shutdown(conns: list[Any], procs: Any, timeout_s: float = 10.0) -> None:
    for c in conns:
        try:
            c.send(("stop", None))
        except (BrokenPipeError, OSError):
            pass                                   # that follower is gone already
        c.close()
    for p in procs.processes:
        p.join(timeout_s)
        if p.is_alive():
            p.terminate()
            p.join(timeout_s)


def _follower(index: int, ranks: int, port: int, cfg: Any, conns: list[Any]) -> None:
    """Rank index + 1: build the model and this rank's cache share, then run forwards until told to stop."""
    from kvproof.runtime.checkpoint import load_model
    from kvproof.runtime.layersplit import checked_plan
    rank, conn = index + 1, conns[index]
    for k, c in enumerate(conns):
        if k != index:
            c.close()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_model(cfg.checkpoint, cfg.model, cfg.device, cfg.backend)
    shape = engine_shape(cfg, model.cfg.n_layers)
    assert shape is not None
    plan = rank_plan(checked_plan(shape, cfg.layersplit_allow_races), rank)
    cache = SplitKVCache(model.cfg, cfg.num_pages, cfg.device, cfg.backend == "triton", shape, rank)
    group = gloo_group(rank, ranks, port, GLOO_TIMEOUT_S)
    while True:
        try:
            kind, sizes = conn.recv()
        except EOFError:                           # the engine process is gone
            return
        if kind == "stop":
            return
        payload = torch.empty(sum(sizes.lengths()), dtype=torch.int64)
        with torch.inference_mode():
            broadcast(group, payload, 0).wait()
            tokens, b, pages = decode_batch(payload, sizes)
            split_forward(model, cache, plan, group, tokens, b, pages)
