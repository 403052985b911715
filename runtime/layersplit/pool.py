"""LayerSplit KV pool: each rank stores only its layers' KV and Indexer cache; owners broadcast.

The pool executes ``spec.layersplit_plan``'s plan, checked once per plan shape
with ``spec.streams.check_plan`` (and the plan's delivery check) before it runs;
the ``unfixed`` plan is refused unless ``allow_races``. Each op of the rank's part
of the plan names the regions it touches (``kv[3]@r1``, ``recv.kv[1]@r0``) and
the pool maps those names to its tensors, so what runs is the checked plan:

- broadcasts go through ``torch.distributed`` (gloo on CPU, NCCL on GPUs), one
  collective per (layer, cache) with the owner as source;
- on CUDA (``CudaExecutor``) the rank's ``comm`` stream issues the collectives and
  ``compute`` is the current stream, with one event per record of the plan;
- on CPU, collectives are asynchronous gloo works (their transfers overlap the
  host's compute), compute ops run in issue order on the host, a record on the
  comm stream stands for the works issued so far and a wait on it waits them;
- on CPU with ``schedule="comm_ahead"`` or ``"random"`` the rank fires the
  transitions of ``spec.stream_machine.Machine`` itself: ops are two-phase (a compute op
  reads its inputs when it starts, a receive's data lands when it ends), so an
  unordered read sees whatever the schedule put there -- ``comm_ahead`` is the
  fast interconnect that prefetches as deep as the plan lets it, which is what
  corrupts the ``unfixed`` plan.

The attention path is the DSA one of ``kernels/``: the indexer's top-k over the
fp8 Indexer cache, then sparse MLA attention over the latent KV (torch references
on CPU, Triton kernels on CUDA). A one-rank pool owns every layer and has no
receive buffers: that is the unsplit pool the tests compare against.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kvproof.kernels.common import indexer_fp8_layout, write_indexer_keys
from kvproof.kernels.indexer import indexer_scores_ref, indexer_topk, indexer_topk_ref
from kvproof.kernels.sparse_mla import mla_attention_ref, sparse_mla_attention
from kvproof.runtime.streams.executor import Commit, CudaExecutor, OpImpl, dispatch, execute, run_host
from kvproof.spec.core import variant_name
from kvproof.spec.layersplit_plan import (LayerSplitShape, comm, compute, delivery_errors, layersplit_plan, op_role,
                                          owned_layers, owner_of, rank_plan)
from kvproof.runtime.streams.gate import PlanRaceError  # noqa: F401  (re-exported: the one refusal class)
from kvproof.runtime.streams.gate import checked_plan as gate
from kvproof.spec.streams import Op, Plan, Region


SCHEDULES: tuple[str, ...] = ("host", "comm_ahead", "random")


@dataclass(frozen=True)
class LayerSplitConfig:
    """Shapes of one LayerSplit pool (one request's cached context) and its pipeline."""

    layers: int
    tokens: int                       # cached context tokens
    page_size: int = 16
    kv_latent: int = 64               # GLM-5: 512
    kv_rope: int = 16                 # GLM-5: 64
    heads: int = 4                    # attention heads of the (absorbed) queries
    idx_heads: int = 16               # GLM-5: 32
    idx_dim: int = 32                 # GLM-5: 128
    topk: int = 32                    # GLM-5: 2048
    depth: int = 2                    # receive buffers per rank (double buffering)
    ownership: str = "contiguous"
    variant: str = "fixed"
    allow_races: bool = False
    kernels: str = "auto"             # "torch" references, "triton" kernels, "auto": Triton on CUDA only
    schedule: str = "host"            # CPU: "host" (gloo overlap), "comm_ahead" / "random" (spec machine)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", variant_name(self.variant))
        for name in ("layers", "tokens", "page_size", "kv_latent", "kv_rope", "heads", "idx_heads", "idx_dim",
                     "topk", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LayerSplitConfig.{name} must be a positive int, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"LayerSplitConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"LayerSplitConfig.kernels must be 'auto', 'torch' or 'triton', got {self.kernels!r}")

    @property
    def pages(self) -> int:
        """Pages holding the context."""
        return math.ceil(self.tokens / self.page_size)

    @property
    def dtype(self) -> torch.dtype:
        """KV element type: bf16 on CUDA, fp32 on CPU (gloo and the references)."""
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32

    @property
    def triton(self) -> bool:
        """Whether the attention path runs the Triton kernels (else the torch references)."""
        return self.kernels == "triton" or (self.kernels == "auto" and self.device.startswith("cuda"))

    def shape(self, ranks: int) -> LayerSplitShape:
        """The plan shape for a group of ``ranks``."""
        return LayerSplitShape(ranks, self.layers, self.depth, self.ownership, self.variant)


@functools.lru_cache(maxsize=64)
def checked_plan(shape: LayerSplitShape, allow_races: bool = False) -> Plan:
    """The plan of ``shape``, checked once; PlanRaceError names the first race unless ``allow_races``."""
    plan = layersplit_plan(shape)
    return gate(plan, allow_races=allow_races, misrouted=delivery_errors(shape, plan))


def _gen(cfg: LayerSplitConfig, layer: int, what: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + layer * 17 + what)


def page_table(cfg: LayerSplitConfig) -> torch.Tensor:
    """The request's page table: int32 [1, pages], pages in order."""
    return torch.arange(cfg.pages, dtype=torch.int32, device=cfg.device)[None, :]


def layer_cache(cfg: LayerSplitConfig, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored caches of one layer: (KV [pages, page_size, latent + rope], Indexer uint8 [pages, bytes])."""
    kv = torch.zeros(cfg.pages, cfg.page_size, cfg.kv_latent + cfg.kv_rope)
    kv.view(-1, kv.shape[-1])[: cfg.tokens] = torch.randn(cfg.tokens, kv.shape[-1], generator=_gen(cfg, layer, 0))
    layout = indexer_fp8_layout(cfg.page_size, cfg.idx_dim)
    idx = torch.zeros(cfg.pages, layout.page_bytes, dtype=torch.uint8)
    write_indexer_keys(idx, page_table(cfg).cpu(), 0, torch.randn(cfg.tokens, cfg.idx_dim, generator=_gen(cfg, layer, 1)),
                       cfg.page_size)
    return kv.to(cfg.device, cfg.dtype), idx.to(cfg.device)


@dataclass(frozen=True)
class Queries:
    """Queries of every layer: the last ``T`` context tokens attend causally to the cache."""

    q_idx: torch.Tensor        # [L, T, idx_heads, idx_dim]
    w_idx: torch.Tensor        # [L, T, idx_heads]
    q_nope: torch.Tensor       # [L, T, H, latent]
    q_pe: torch.Tensor         # [L, T, H, rope]
    q_len: torch.Tensor        # int32 [T]

    def shard(self, rank: int, ranks: int) -> "Queries":
        """Rows ``rank::ranks`` (context parallelism: each rank computes its share of the queries)."""
        sl = slice(rank, None, ranks)
        return Queries(self.q_idx[:, sl], self.w_idx[:, sl], self.q_nope[:, sl], self.q_pe[:, sl], self.q_len[sl])


def make_queries(cfg: LayerSplitConfig, count: int) -> Queries:
    """Deterministic queries for the last ``count`` tokens of the context."""
    if not 1 <= count <= cfg.tokens:
        raise ValueError(f"count must be in 1..{cfg.tokens} (the context), got {count}")
    g = torch.Generator().manual_seed(cfg.seed + 7)
    L, T, d = cfg.layers, count, cfg.device
    q_len = torch.arange(cfg.tokens - T + 1, cfg.tokens + 1, dtype=torch.int32)
    return Queries(torch.randn(L, T, cfg.idx_heads, cfg.idx_dim, generator=g).to(d),
                   torch.rand(L, T, cfg.idx_heads, generator=g).to(d),
                   torch.randn(L, T, cfg.heads, cfg.kv_latent, generator=g).to(d, cfg.dtype),
                   torch.randn(L, T, cfg.heads, cfg.kv_rope, generator=g).to(d, cfg.dtype), q_len.to(d))


def layer_attention(cfg: LayerSplitConfig, idx: torch.Tensor, kv: torch.Tensor, q: Queries, layer: int,
                    topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
    """Indexer top-k (when ``topk`` is None) or sparse MLA attention over it: the two compute ops."""
    table = page_table(cfg)
    T = q.q_len.shape[0]
    q_req = torch.zeros(T, dtype=torch.int32, device=cfg.device)
    if topk is None:
        if cfg.triton:
            return indexer_topk(q.q_idx[layer].to(torch.bfloat16), q.w_idx[layer], idx, table, q_req, q.q_len,
                                cfg.page_size, cfg.topk, max_len=cfg.tokens)
        scores = indexer_scores_ref(q.q_idx[layer], q.w_idx[layer], idx, table, q_req, q.q_len, cfg.page_size,
                                    cfg.tokens)
        return indexer_topk_ref(scores, q.q_len, cfg.topk)
    indices, counts = topk
    scale = 1.0 / math.sqrt(cfg.kv_latent + cfg.kv_rope)
    if cfg.triton:
        return sparse_mla_attention(q.q_nope[layer], q.q_pe[layer], kv, table, q_req, indices, counts, scale)[0]
    return mla_attention_ref(q.q_nope[layer], q.q_pe[layer], kv, table, q_req, counts, scale, indices)[0]


class LayerSplitPool:
    """One rank's share of a LayerSplit KV pool: owned layers, receive buffers, the checked plan."""

    def __init__(self, cfg: LayerSplitConfig, rank: int = 0, ranks: int = 1,
                 group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(ranks, int) or ranks < 1 or not 0 <= rank < ranks:
            raise ValueError(f"rank {rank!r} must be in 0..ranks-1 with ranks >= 1, got ranks={ranks!r}")
        if ranks > 1 and not dist.is_initialized():
            raise RuntimeError(f"a {ranks}-rank LayerSplit pool needs torch.distributed initialised")
        self.cfg, self.rank, self.ranks, self.group = cfg, rank, ranks, group
        self.shape = cfg.shape(ranks)
        self.plan = checked_plan(self.shape, cfg.allow_races)     # whole group's plan, checked once per shape
        self.my_plan = rank_plan(self.plan, rank)
        self.owned = owned_layers(rank, ranks, cfg.layers, cfg.ownership)
        self.kv: dict[int, torch.Tensor] = {}
        self.idx: dict[int, torch.Tensor] = {}
        for l in self.owned:
            self.kv[l], self.idx[l] = layer_cache(cfg, l)
        kv0, idx0 = layer_cache(cfg, 0) if not self.owned else (self.kv[self.owned[0]], self.idx[self.owned[0]])
        n_buf = cfg.depth if ranks > 1 else 0
        # Poisoned (NaN as float, as fp8 and as fp32 scale): a broadcast that silently does nothing
        # (SGLang's disabled-communicator bug) shows up as NaN outputs, not as plausible stale data.
        self.recv_kv = [torch.full_like(kv0, float("nan")) for _ in range(n_buf)]
        self.recv_idx = [torch.full_like(idx0, 0xFF) for _ in range(n_buf)]
        self._layer_kv_bytes = kv0.numel() * kv0.element_size()
        self._layer_idx_bytes = idx0.numel() * idx0.element_size()

    def region(self, r: Region) -> torch.Tensor:
        """The tensor behind a plan region of this rank (``kv[3]@r1``, ``recv.idx[0]@r2``)."""
        table = {"kv": self.kv, "idx": self.idx, "recv.kv": self.recv_kv,
                 "recv.idx": self.recv_idx}.get(r.kind) if isinstance(r, Region) else None
        if table is None or r.rank != self.rank:
            raise KeyError(f"region {r!r} is not a cache region of rank {self.rank}")
        return table[r.layer if r.slot is None else r.slot]

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds: KV and Indexer cache of its layers, staging (receive buffers)."""
        kv = sum(t.numel() * t.element_size() for t in self.kv.values())
        idx = sum(t.numel() * t.element_size() for t in self.idx.values())
        staging = sum(t.numel() * t.element_size() for t in self.recv_kv + self.recv_idx)
        return {"rank": self.rank, "ranks": self.ranks, "layers_owned": len(self.owned), "kv_bytes": kv,
                "indexer_bytes": idx, "staging_bytes": staging, "total_bytes": kv + idx + staging,
                "unsplit_kv_bytes": self.cfg.layers * self._layer_kv_bytes,
                "unsplit_indexer_bytes": self.cfg.layers * self._layer_idx_bytes}

    def _impls(self, q: Queries, out: torch.Tensor, works: list, staged: bool) -> dict[str, OpImpl]:
        """Two-phase implementations of this rank's ops: a call starts the op, its commit ends it.

        ``staged`` (the CPU emulator): a receive lands in a private buffer and is copied into the
        receive buffer at its end, so the emulator decides when the write lands.
        """
        topk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        cuda = self.cfg.device.startswith("cuda")

        def bcast(ins: Op, l: int) -> OpImpl:
            recv = op_role(ins)[0] == "recv"
            t, src = self.region(ins.writes[0] if recv else ins.reads[0]), \
                owner_of(l, self.ranks, self.cfg.layers, self.cfg.ownership)

            def start() -> Commit | None:
                buf = torch.empty_like(t) if staged and recv else t
                w = dist.broadcast(buf, src=src, group=self.group, async_op=True)
                if cuda:
                    w.wait()                 # makes the comm stream (current here) wait for NCCL's
                elif staged:
                    def land() -> None:
                        w.wait()
                        if recv:
                            t.copy_(buf)     # the receive's write lands when the emulator ends it
                    return land
                else:
                    works.append(w)
                return None
            return start

        def index(ins: Op, l: int) -> OpImpl:
            def start() -> Commit:
                res = layer_attention(self.cfg, self.region(ins.reads[0]), None, q, l)   # type: ignore[arg-type]
                return lambda: topk.__setitem__(l, res)
            return start

        def attend(ins: Op, l: int) -> OpImpl:
            def start() -> Commit:
                res = layer_attention(self.cfg, None, self.region(ins.reads[0]), q, l, topk.pop(l))  # type: ignore[arg-type]
                return lambda: out[l].copy_(res)
            return start

        return dispatch(self.my_plan, op_role, {"send": bcast, "recv": bcast, "indexer": index, "attention": attend})

    def forward(self, q: Queries) -> torch.Tensor:
        """Attention outputs of every layer for these queries: [L, T, H, latent] (fp64 from the references)."""
        T = q.q_len.shape[0]
        out = torch.empty(self.cfg.layers, T, self.cfg.heads, self.cfg.kv_latent,
                          dtype=self.cfg.dtype if self.cfg.triton else torch.float64,
                          device=self.cfg.device)
        works: list = []
        impls = self._impls(q, out, works, staged=self.cfg.schedule != "host")
        if self.cfg.schedule == "host" and not self.cfg.device.startswith("cuda"):
            run_host(self.my_plan, comm(self.rank), impls, works)   # collectives overlap host-ordered compute
            return out
        # CUDA streams, or the spec machine's transitions on CPU: ``comm_ahead`` runs the comm stream
        # as far as its waits allow, ``random`` picks among the enabled ones
        cuda = CudaExecutor(self.cfg.device, main=compute(self.rank)) if self.cfg.device.startswith("cuda") else None
        execute(self.my_plan, impls, "random", self.cfg.seed, cuda=cuda,
                ahead=comm(self.rank) if self.cfg.schedule == "comm_ahead" else None)
        if cuda is not None:
            cuda.synchronize()
        return out
