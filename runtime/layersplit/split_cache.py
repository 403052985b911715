"""LayerSplit in the serving engine: one rank's share of the KV layers and its part of the checked plan.

`EngineConfig(layersplit=R)` (`kvproof serve --layersplit R`): rank 0 is the engine process (with
`--engine pd`: each prefill rank), ranks 1..R-1 are spawned follower processes (127.0.0.1, a
free port, a private gloo group; the group, the batch on the wire and the KV export are
`layersplit.engine_group`'s). Each rank's `SplitKVCache` stores, for every page of the pool,
only the layers it owns (`spec.layersplit_plan.owned_layers`, contiguous by default) plus
`depth` receive buffers of one layer's pages each -- about R times the unsplit KV capacity per rank.

Compute is replicated: every rank runs the same decoder forward over the same batch.
Each forward executes this rank's part of the checked plan (`spec.layersplit_plan` with
`writeback=True`, checked once per shape by `layersplit.pool.checked_plan`; a plan with a race --
the `unfixed` variant, or write-back without the owner's wait -- is refused unless
`layersplit_allow_races`). Its ops map to: `send_*[l]` (owner: gather the batch's pages of
its stored layer, asynchronous broadcast), `recv_*[l]` (the broadcast into a private buffer,
scattered into receive buffer l % depth when it lands), `indexer[l]` (`DecoderLayer.index`:
writes the new tokens' indexer keys into the region it reads, top-k) and `attention[l]`
(`DecoderLayer.attend`: writes their KV rows into the region it reads, sparse MLA, MLP).
Issued with `streams.executor.run_host`: collectives overlap the host's compute, waits wait them.
"""
from __future__ import annotations

from typing import Any

import torch

from kvproof.runtime.layersplit.group import broadcast
from kvproof.runtime.model.decoder import AttnBatch, DSAModel
from kvproof.runtime.model.cache import KVCache
from kvproof.runtime.model.config import ModelConfig
from kvproof.runtime.streams.executor import OpImpl, dispatch, run_host
from kvproof.spec.core import variant_name
from kvproof.spec.layersplit_plan import LayerSplitShape, comm, op_role, owned_layers, owner_of
from kvproof.spec.streams import Op, Plan, Region

# engine variant -> plan shape fields: fixed, the too-deep prefetch, write-back without the owner's wait
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {"fixed": {}, "unfixed": {"variant": "unfixed"},
                                              "no_owner_wait": {"owner_wait": False}}
_CACHE_KINDS = ("kv", "idx", "recv.kv", "recv.idx")


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
    variant = variant_name(cfg.layersplit_variant)
    if variant not in ENGINE_VARIANTS:
        raise ValueError(f"layersplit_variant={cfg.layersplit_variant!r}; expected one of {sorted(ENGINE_VARIANTS)}")
    return LayerSplitShape(r, n_layers, cfg.layersplit_depth, cfg.layersplit_ownership, writeback=True,
                           **ENGINE_VARIANTS[variant])


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

    def region(self, r: Region) -> tuple[torch.Tensor, ...]:
        """The tensors behind a plan region of this rank: ``kv[3]@r1`` -> (kv,), ``recv.idx[0]@r1`` -> (ik[, fp8])."""
        if not isinstance(r, Region) or r.rank != self.rank or r.kind not in _CACHE_KINDS:
            raise KeyError(f"region {r!r} is not a cache region of rank {self.rank}")
        cache, at = (self.recv, r.slot) if r.kind.startswith("recv.") else (self.store, self._pos[r.layer])
        if r.kind.endswith("kv"):
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

    def export_owned(self, pages: list[int], n_tokens: int) -> torch.Tensor:
        """This rank's layers of a sequence's first n tokens in the export format: uint8 [owned, n, token_bytes]."""
        return self.store.export_tokens(pages, n_tokens)

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
    shape, rank, backend = cache.shape, cache.rank, model.backend
    hidden: dict[int, torch.Tensor] = {0: model.embed(tokens)}
    indexed: dict[int, Any] = {}
    works: list[Any] = []

    def send(ins: Op, l: int) -> OpImpl:
        regions = cache.region(ins.reads[0])

        def start() -> None:                        # gathers the pages now: what the plan's send reads
            works.extend(broadcast(group, t.index_select(0, pages), rank) for t in regions)
        return start

    def recv(ins: Op, l: int) -> OpImpl:
        regions, src = cache.region(ins.writes[0]), owner_of(l, shape.ranks, shape.layers, shape.ownership)

        def start() -> None:
            for t in regions:
                buf = torch.empty((pages.numel(),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
                works.append(_Landing(broadcast(group, buf, src), t, pages, buf))
        return start

    def indexer(ins: Op, l: int) -> OpImpl:
        def start() -> None:
            ik, *fp8 = cache.region(ins.reads[0])
            indexed[l] = model.layers[l].index(hidden[l], b, ik, fp8[0] if fp8 else None, backend)
        return start

    def attention(ins: Op, l: int) -> OpImpl:
        def start() -> None:
            (kv,) = cache.region(ins.reads[0])
            hidden[l + 1] = model.layers[l].attend(hidden.pop(l), indexed.pop(l), b, kv, backend)
        return start

    impls = dispatch(plan, op_role, {"send": send, "recv": recv, "indexer": indexer, "attention": attention})
    run_host(plan, comm(rank), impls, works)
    return hidden[shape.layers]
