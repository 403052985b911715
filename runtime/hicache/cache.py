"""HiCache: a two-tier KV cache (device pool over a larger host pool) for a DSA-style model.

Per layer, a page holds ``page_size`` tokens of KV (``kv_dim``) and of Indexer
cache (``idx_dim``). A radix index over token pages finds prefix hits; the
device tier evicts least-recently-used pages to the host (write-back, the host
copy is kept after a swap-in so a second eviction is free); a batch whose
prefix is partly on the host swaps it in layer by layer on a load stream with
one event per layer for the Indexer cache and one for the KV.

Host pages, write-back and the layer-wise swap-in are the HiCache core
(``hicache.core.HostPages``, which the serving engine's host tier is built on too):
every batch executes the plan of ``spec.hicache_plan`` (load + toy forward), checked
by ``spec.streams.check_plan`` when the cache is made and gated before each batch.
The pre-fix ``unfixed`` plan only runs with ``allow_races``. On CPU the plan runs on
the stream emulator; with CUDA on streams and events. This module adds the radix
index, the device tier and its eviction policy, and the toy DSA forward.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Sequence

import torch

from kvproof.runtime.hicache.core import HostPages
from kvproof.runtime.hicache.pages import BatchResult, CacheFullError, HiCacheConfig, TierPages
from kvproof.runtime.model.radix import RadixIndex, RadixNode
from kvproof.runtime.streams.executor import OpImpl
from kvproof.spec.stream_json import trace_dumps
from kvproof.spec.streams import Plan, Violation


class HiCache:
    """Two-tier paged KV + Indexer cache with a prefix index and checked layer-wise swap-in."""

    def __init__(self, cfg: HiCacheConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError("HiCacheConfig.device is cuda but CUDA is not available")
        L, P = cfg.layers, cfg.page_size
        dev = dict(device=self.device, dtype=cfg.dtype)
        self.dev_kv = torch.zeros(L, cfg.device_pages, P, cfg.kv_dim, **dev)    # [L, pages, P, D]
        self.dev_idx = torch.zeros(L, cfg.device_pages, P, cfg.idx_dim, **dev)  # [L, pages, P, I]
        self.host = HostPages(self.dev_kv, [self.dev_idx], cfg.host_pages, cfg.variant, cfg.allow_races,
                              cfg.schedule, cfg.seed)
        self.host_kv, self.host_idx = self.host.host_kv, self.host.host_idx[0]  # [L, host pages, P, D / I]
        self.index = RadixIndex(P)
        self.dev_pool = TierPages(cfg.device_pages, "device")
        self.host_pool = self.host.pages
        self._stats: Counter[str] = Counter()
        self._last: tuple[Plan, dict[int, tuple[float, float]]] | None = None

    # ------------------------------------------------------------ pages
    def is_locked(self, node: RadixNode) -> bool:
        """Whether a batch holds the node's pages (the radix lock reference, kept by the page spec)."""
        return ((node.device_page is not None and self.dev_pool.held(node.device_page))
                or (node.host_page is not None and self.host_pool.held(node.host_page)))

    def hold(self, nodes: list[RadixNode]) -> list[tuple[TierPages, int, int]]:
        """Hold every node's resident page (device, else host) for a batch: (tier, page, epoch) each."""
        out = []
        for n in nodes:
            tier, p = (self.dev_pool, n.device_page) if n.device_page is not None else (self.host_pool, n.host_page)
            if p is not None:
                out.append((tier, p, tier.hold(p)))
        return out

    @staticmethod
    def unhold(held: list[tuple[TierPages, int, int]]) -> None:
        """Release what `hold` (or a fresh allocation) took."""
        for tier, p, e in held:
            tier.unhold(p, e)

    def _alloc_device_page(self) -> int:
        if not self.dev_pool.can_allocate():
            self._evict_one()
        return self.dev_pool.allocate()

    def _alloc_host_page(self) -> int:
        if not self.host_pool.can_allocate():
            leaf = self.index.lru_host_leaf(self.is_locked)
            if leaf is None:
                raise CacheFullError(f"host pool: all {self.cfg.host_pages} pages in use and none droppable")
            self.host_pool.drop(leaf.host_page)  # type: ignore[arg-type]
            leaf.host_page = None
            self.index.remove(leaf)
            self._stats["dropped"] += 1
        return self.host_pool.allocate()

    def _evict_one(self) -> None:
        """Free one device page: write it back to the host, or drop it if the host is full and it is a leaf."""
        for node in self.index.device_candidates(self.is_locked):
            dp = node.device_page
            assert dp is not None
            if node.host_page is None:                       # write back; kept copies need no copy
                try:
                    hp = self._alloc_host_page()
                except CacheFullError:
                    if node.children:                        # dropping it would orphan its subtree
                        continue
                    self._release_device(node)
                    self.index.remove(node)
                    self._stats["dropped"] += 1
                    return
                self.dev_pool.write_back(dp)
                self.host.write_back(dp, hp)
                node.host_page = hp
                self._poison(dp)
                self.dev_pool.written_back(dp)
                node.device_page = None
            else:
                self._release_device(node)
            self._stats["evictions"] += 1
            return
        raise CacheFullError(f"device pool: all {self.cfg.device_pages} pages are locked by the batch "
                             f"or cannot be written back")

    def _poison(self, dp: int) -> None:
        if self.cfg.poison is not None:
            self.dev_kv[:, dp].fill_(self.cfg.poison)
            self.dev_idx[:, dp].fill_(self.cfg.poison)

    def _release_device(self, node: RadixNode) -> None:
        dp = node.device_page
        assert dp is not None
        self._poison(dp)
        node.device_page = None
        self.dev_pool.drop(dp)

    def evict(self, pages: int | None = None) -> int:
        """Move up to ``pages`` (default: all unlocked) device pages to the host, LRU first."""
        n = 0
        while (pages is None or n < pages) and self.index.lru_device(self.is_locked) is not None:
            try:
                self._evict_one()
            except CacheFullError:                   # nothing more can leave the device
                break
            n += 1
        return n

    # ------------------------------------------------------------ API
    def insert(self, tokens: Sequence[int], kv: torch.Tensor, idx: torch.Tensor) -> int:
        """Cache the full pages of ``tokens`` (kv [L, T, D], idx [L, T, I]); returns pages added."""
        L, P = self.cfg.layers, self.cfg.page_size
        if kv.shape[0] != L or kv.shape[2] != self.cfg.kv_dim or idx.shape[0] != L or idx.shape[2] != self.cfg.idx_dim:
            raise ValueError(f"insert: kv {tuple(kv.shape)} / idx {tuple(idx.shape)} do not match "
                             f"[{L}, T, {self.cfg.kv_dim}] / [{L}, T, {self.cfg.idx_dim}]")
        if kv.shape[1] < len(tokens) - len(tokens) % P or idx.shape[1] != kv.shape[1]:
            raise ValueError(f"insert: {len(tokens)} tokens but kv has {kv.shape[1]}, idx {idx.shape[1]} positions")
        path, new = self.index.insert(tokens)
        held = self.hold(path)                              # new nodes have no page yet
        try:
            pos = {id(n): k for k, n in enumerate(path)}
            for node in new:
                k = pos[id(node)]
                node.device_page = dp = self._alloc_device_page()
                self.dev_kv[:, dp].copy_(kv[:, k * P:(k + 1) * P])
                self.dev_idx[:, dp].copy_(idx[:, k * P:(k + 1) * P])
                self.dev_pool.publish(dp)
                held.append((self.dev_pool, dp, self.dev_pool.epoch(dp)))
        except CacheFullError:
            self.unhold(held)
            for node in reversed(new):                      # new nodes form a chain: drop it leaf first
                if node.device_page is not None:
                    self._release_device(node)
                self.index.remove(node)
            raise
        self.unhold(held)
        self._stats["inserted"] += len(new)
        return len(new)

    def match(self, tokens: Sequence[int]) -> list[RadixNode]:
        """The cached prefix of ``tokens`` (nodes on device or host)."""
        return self.index.match(tokens)

    def check(self, plan: Plan) -> tuple[Violation, ...]:
        """The plan's races, checked once per plan shape (plans carry no page data)."""
        return self.host.check(plan)

    def load(self, tokens: Sequence[int], q: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
             compute: bool = True, schedule: str | None = None) -> BatchResult:
        """Swap the cached prefix of ``tokens`` in and run the toy forward (q [L, I], hidden [D])."""
        cfg = self.cfg
        nodes = self.index.match(tokens)
        total = len(self.index.pages(tokens))
        self._stats["hits"] += len(nodes)
        self._stats["misses"] += total - len(nodes)
        held = self.hold(nodes)
        swapped: list[RadixNode] = []
        try:
            swaps = []
            for n in nodes:
                if n.device_page is None:
                    n.device_page = dp = self._alloc_device_page()
                    swapped.append(n)
                    swaps.append((n.host_page, dp))
            self._stats["swap_ins"] += len(swaps)
            q = q if q is not None else torch.linspace(-1, 1, cfg.layers * cfg.idx_dim).view(cfg.layers, -1)
            h0 = hidden if hidden is not None else torch.ones(cfg.kv_dim)
            indexer, attention, out = self._forward([n.device_page for n in nodes], q.to(self.device, cfg.dtype),
                                                    h0.to(self.device, cfg.dtype), compute)
            res = self.host.swap_in(swaps, self.dev_pool, indexer, attention, schedule, timing=cfg.record_times)
        except BaseException:
            if self.cuda:
                torch.cuda.synchronize(self.device)     # no copy may still land in a page given up
            for n in swapped:                       # pages never loaded must not look resident
                dp = n.device_page
                assert dp is not None
                if not self.dev_pool.table.enabled("free", dp):     # its load was started and did not land:
                    self.dev_pool.landed(dp)                         # nothing is in flight once execution returned
                self.dev_pool.abandon(dp)
                n.device_page = None
            self.unhold(held)
            raise
        for n in swapped:                           # the plan ran to the end: every load landed
            self.dev_pool.load_done(n.device_page)  # type: ignore[arg-type]
            held.append((self.dev_pool, n.device_page, self.dev_pool.epoch(n.device_page)))  # type: ignore[arg-type]
        self.unhold(held)
        self._last = (self.host.plan, res.times)
        return BatchResult(self.host.plan, len(nodes), len(swaps), [out["scores"].get(l) for l in range(cfg.layers)],
                           out["hidden"][cfg.layers], res)

    def gather(self, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached prefix's KV [L, T, D] and Indexer cache [L, T, I], swapped in if needed."""
        self.load(tokens, compute=False)
        pages = [n.device_page for n in self.index.match(tokens)]
        L = self.cfg.layers
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return (self.dev_kv[:, pages].reshape(L, -1, self.cfg.kv_dim).clone(),
                self.dev_idx[:, pages].reshape(L, -1, self.cfg.idx_dim).clone())

    @property
    def last_trace(self) -> list[str]:
        """JSON Lines trace of the last batch's plan (auditable with `kvproof audit --streams`)."""
        return [] if self._last is None else list(trace_dumps(*self._last))

    def stats(self) -> dict[str, int]:
        """Counters: hits/misses (pages), evictions, swap_ins, dropped, batches, plan checks and cache hits."""
        keys = ("hits", "misses", "evictions", "swap_ins", "dropped", "inserted")
        return {k: self._stats[k] for k in keys} | {"batches": self.host.batches,
            "plans_checked": self.host.gate.checked, "plan_cache_hits": self.host.gate.hits,
            "device_pages_used": len(self.dev_pool.used), "host_pages_used": len(self.host_pool.used)}

    # ------------------------------------------------------------ the toy forward
    def _forward(self, dev_pages: list[int | None], q: torch.Tensor, h0: torch.Tensor, compute: bool
                 ) -> tuple[Callable[[int], OpImpl], Callable[[int], OpImpl], dict]:
        """The forward stream's two-phase ops per layer (read at start, write at end), and their outputs."""
        cfg = self.cfg
        pages = torch.tensor(dev_pages, dtype=torch.long, device=self.device)
        out: dict = {"scores": {}, "topk": {}, "hidden": {0: h0}}

        def indexer(l: int) -> OpImpl:
            def start():
                keys = self.dev_idx[l].index_select(0, pages).reshape(-1, cfg.idx_dim)   # [T, I]
                s = torch.relu(keys @ q[l])                                      # [T]
                top = s.topk(min(cfg.topk, s.numel())).indices
                def commit() -> None:
                    out["scores"][l], out["topk"][l] = s, top
                return commit
            return start

        def attention(l: int) -> OpImpl:
            def start():
                h = out["hidden"][l]
                kv = self.dev_kv[l].index_select(0, pages).reshape(-1, cfg.kv_dim)[out["topk"][l]]  # [k, D]
                w = torch.softmax(kv @ h / math.sqrt(cfg.kv_dim), dim=0)             # [k]
                h2 = h + w @ kv
                def commit() -> None:
                    out["hidden"][l + 1] = h2
                return commit
            return start

        def noop():
            return None

        def keep(l: int) -> OpImpl:
            def start():
                out["hidden"][l + 1] = out["hidden"][l]
                return None
            return start

        if not compute:
            return (lambda l: noop), keep, out
        return indexer, attention, out


def reference_forward(kv: torch.Tensor, idx: torch.Tensor, q: torch.Tensor, hidden: torch.Tensor,
                      topk: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The toy forward on plain tensors (kv [L, T, D], idx [L, T, I]): per-layer scores, final hidden."""
    scores, h = [], hidden
    for l in range(kv.shape[0]):
        s = torch.relu(idx[l] @ q[l])
        top = s.topk(min(topk, s.numel())).indices
        sel = kv[l][top]
        h = h + torch.softmax(sel @ h / math.sqrt(kv.shape[2]), dim=0) @ sel
        scores.append(s)
    return scores, h
