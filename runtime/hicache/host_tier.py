"""The serving engine's host tier: HiCache beneath the engine's page pool.

The engine keeps its device pages (`model.cache.KVCache`, `PagePool` with the prefix cache of
full prompt pages keyed by a blake2b chain hash). `HostTier` adds the larger host pool below
it, in the same page layout (`[layer, page, page_size, width]` for the KV rows, the indexer
keys and, with the Triton backend, the fp8 indexer pages):

- eviction: when the pool hands a cached page out again, `evict(page, hash)` writes it back to
  the host (or keeps the host copy it already has) instead of dropping it; a full host pool
  drops its least recently used unpinned page;
- reload: the scheduler's prefix match finds a hash on the host (`reserve`), takes a fresh
  device page and records the swap on the sequence; the prefill batch that first reads the page
  runs as the HiCache stream plan (`spec.hicache_plan`): the load stream copies each layer's
  Indexer-cache pages, records `idx_ready[l]`, then its KV pages and `kv_ready[l]`
  (`hicache.pages.layer_copy`); the forward stream runs the model layer by layer — `indexer[l]` reads
  the layer's Indexer cache, `attention[l]` runs the decoder layer on what the indexer read and
  on the KV. The `fixed` plan waits for both events; the plan is checked with
  `spec.streams.check_plan` (once per shape) and a racy plan (`unfixed`) is refused unless
  `allow_races`. CPU: the stream emulator (`schedule`: eager / random / adversarial); CUDA:
  `CudaExecutor`, pinned host memory.
"""
from __future__ import annotations

from collections import Counter, OrderedDict, deque

import torch

from kvproof.runtime.hicache.pages import PlanRaceError, layer_copy
from kvproof.runtime.model.cache import KVCache
from kvproof.runtime.model.cache import PagePool
from kvproof.runtime.streams.executor import POLICIES, CudaExecutor, ExecResult, OpImpl, emulate, run_sync
from kvproof.spec.core import variant_name
from kvproof.spec.kv_page import KVPage, PState
from kvproof.spec.local import LocalInstance
from kvproof.spec.hicache_plan import VARIANTS, hicache_plan
from kvproof.spec.streams import Plan, Violation, check_plan

SCHEDULES: tuple[str, ...] = POLICIES + ("sync",)


def _both(impls: list[OpImpl]) -> OpImpl:
    """One op made of several two-phase parts (started together, committed together)."""
    def start():
        commits = [c for c in (f() for f in impls) if c is not None]
        return (lambda: [c() for c in commits]) if commits else None
    return start


class HostTier:
    """Host pool under the engine's device pages: write-back eviction and checked layer-wise swap-in."""

    def __init__(self, cache: KVCache, pool: PagePool, pages: int, variant: str = "fixed",
                 schedule: str = "random", allow_races: bool = False, seed: int = 0) -> None:
        if not isinstance(pages, int) or pages < 1:
            raise ValueError(f"host_cache_pages={pages!r}; expected an int >= 1")
        variant = variant_name(variant)
        if variant not in VARIANTS:
            raise ValueError(f"host_cache_variant={variant!r}; expected one of {VARIANTS}")
        if schedule not in SCHEDULES:
            raise ValueError(f"host_cache_schedule={schedule!r}; expected one of {SCHEDULES}")
        self.cache, self.pool, self.num_pages = cache, pool, pages
        self.variant, self.schedule, self.allow_races, self.seed = variant, schedule, allow_races, seed
        dev = cache.kv.device
        self.cuda = dev.type == "cuda"
        self.idx_tensors = [cache.ik] + ([cache.ik_fp8] if cache.ik_fp8 is not None else [])

        def host_like(t: torch.Tensor) -> torch.Tensor:          # [L, pages, ...], pinned with CUDA
            return torch.zeros((t.shape[0], pages) + tuple(t.shape[2:]), dtype=t.dtype, pin_memory=self.cuda)
        self.host_kv = host_like(cache.kv)
        self.host_idx = [host_like(t) for t in self.idx_tensors]
        # Host pages follow the same page protocol as device pages (write-back = new content,
        # a pending swap's pin = a holder, dropping = evicting without a copy): state, pins and
        # residency live in this instance; free_pages and by_hash are derived indexes.
        self.table = LocalInstance(KVPage, "fixed", "page", pages)
        self.free_pages: deque[int] = deque(range(pages))
        self.by_hash: OrderedDict[bytes, int] = OrderedDict()    # least recently used first
        self.counts: Counter[str] = Counter()
        self._verdicts: dict[str, tuple[Violation, ...]] = {}
        self._executor = CudaExecutor(dev) if self.cuda else None
        self.last: dict | None = None                            # the last swap-in batch (tests, audits)
        self.plan = hicache_plan(cache.cfg.n_layers, variant)
        races = self.check(self.plan)                            # fail fast, before serving
        if races and not allow_races:
            raise PlanRaceError(f"refusing HiCache plan {self.plan.name}: {races[0].message} "
                                f"(and {len(races) - 1} more); set allow_races only to demonstrate the bug")
        pool.on_evict = self.evict

    # ------------------------------------------------------------ host pages
    def check(self, plan: Plan) -> tuple[Violation, ...]:
        """The plan's races (spec.streams.check_plan), checked once per plan shape."""
        if plan.name not in self._verdicts:
            self._verdicts[plan.name] = check_plan(plan)
            self.counts["plans_checked"] += 1
        return self._verdicts[plan.name]

    @property
    def pins(self) -> dict[int, int]:
        """Host page -> pending swaps that read it (pages with none are left out)."""
        return {hp: n for hp in range(self.num_pages) if (n := self.table.get("refs", hp))}

    def _alloc_host(self) -> int | None:
        if self.free_pages:
            hp = self.free_pages.popleft()
            self.table.fire("alloc", hp)
            return hp
        for h, hp in self.by_hash.items():                       # LRU first; a pinned page refuses
            if self.table.try_fire("drop", hp):
                del self.by_hash[h]
                self.counts["dropped"] += 1
                self.table.fire("alloc", hp)
                return hp
        return None

    def evict(self, page: int, h: bytes) -> None:
        """Device page `page` (prefix hash `h`) is about to be reused: keep its content on the host."""
        if h in self.by_hash:                                    # the host copy from its swap-in
            self.by_hash.move_to_end(h)
            self.counts["evictions"] += 1
            return
        hp = self._alloc_host()
        if hp is None:                                           # every host page is pinned
            self.counts["dropped"] += 1
            return
        self.host_kv[:, hp].copy_(self.cache.kv[:, page])
        for host, dev in zip(self.host_idx, self.idx_tensors):
            host[:, hp].copy_(dev[:, page])
        self.table.fire("publish", hp)                           # written: cached on the host
        self.table.fire("unlock", hp, self.table.get("tag", hp))  # and held by nobody
        self.by_hash[h] = hp
        self.counts["evictions"] += 1
        self.counts["writebacks"] += 1

    def reserve(self, h: bytes) -> tuple[int, int] | None:
        """For a prefix page found on the host only: (host page, fresh device page) to swap, or None."""
        hp = self.by_hash.get(h)
        if hp is None or not self.pool.can_allocate(1):
            return None
        self.by_hash.move_to_end(h)
        self.table.fire("lock", hp)                              # pinned: allocating may evict to the host
        return hp, self.pool.allocate(1)[0]

    def release(self, hp: int) -> None:
        """A reserved swap is done or abandoned: its host page may be dropped again."""
        self.table.fire("unlock", hp, self.table.get("tag", hp))

    def count_match(self, device_hits: int, host_hits: int, considered: int) -> None:
        """Record one prefix match: pages hit on the device, on the host, and pages considered."""
        self.counts["device_hits"] += device_hits
        self.counts["host_hits"] += host_hits
        self.counts["misses"] += considered - device_hits - host_hits

    # ------------------------------------------------------------ the swap-in batch
    def forward(self, model: torch.nn.Module, tokens: torch.Tensor, batch: object,
                swaps: list[tuple[int, int]]) -> torch.Tensor:
        """Model forward (tokens [T] -> hidden [T, D]) of a batch that first swaps `swaps` [(host, device)] in."""
        races = self.check(self.plan)
        if races and not self.allow_races:
            raise PlanRaceError(f"refusing HiCache plan {self.plan.name}: {races[0].message}")
        cache, L = self.cache, len(model.layers)
        for _, p in swaps:
            self.pool.start_load(p)
        dst = torch.tensor([d for _, d in swaps], dtype=torch.long, device=cache.kv.device)
        emulated = not self.cuda
        with torch.inference_mode():
            hidden: dict[int, torch.Tensor] = {0: model.embed(tokens)}
            reads: dict[int, list[torch.Tensor]] = {}
            impls: dict[str, OpImpl] = {}

            def indexer(l: int) -> OpImpl:
                def start():                                     # the Indexer cache as the indexer sees it
                    reads[l] = [t[l].index_select(0, dst) for t in self.idx_tensors]
                    return None
                return start

            def attention(l: int) -> OpImpl:
                def start():                                     # the layer on the indexer's view + the KV now
                    mine = [t[l].index_select(0, dst) for t in self.idx_tensors]
                    for t, r in zip(self.idx_tensors, reads[l]):
                        t[l].index_copy_(0, dst, r)
                    y = model.layers[l](hidden[l], batch, cache, model.backend)
                    for t, r in zip(self.idx_tensors, mine):
                        t[l].index_copy_(0, dst, r)
                    return lambda: hidden.__setitem__(l + 1, y)
                return start

            for l in range(L):
                impls[f"load_idx[{l}]"] = _both([layer_copy(h, d, l, swaps, emulated)
                                                 for h, d in zip(self.host_idx, self.idx_tensors)])
                impls[f"load_kv[{l}]"] = layer_copy(self.host_kv, cache.kv, l, swaps, emulated)
                impls[f"indexer[{l}]"] = indexer(l)
                impls[f"attention[{l}]"] = attention(l)
            res = self._execute(impls)
        for _, p in swaps:                                       # the plan ran to the end: every load landed
            self.pool.landed(p)
        self.counts["swap_ins"] += len(swaps)
        self.counts["swap_batches"] += 1
        self.last = {"swaps": list(swaps), "indexer_reads": reads, "exec": res}
        if emulated:
            src = torch.tensor([s for s, _ in swaps], dtype=torch.long)
            stale = sum(not torch.equal(reads[l][0], self.host_idx[0][l].index_select(0, src)) for l in range(L))
            self.last["stale_layers"] = stale
            self.counts["stale_indexer_reads"] += stale
        return hidden[L]

    def _execute(self, impls: dict[str, OpImpl]) -> ExecResult:
        if self._executor is not None:
            return self._executor.run(self.plan, impls)
        if self.schedule == "sync":
            return run_sync(self.plan, impls)
        return emulate(self.plan, impls, self.schedule, self.seed + self.counts["swap_batches"])

    def stats(self) -> dict:
        """Counters for /metrics (pages unless named otherwise)."""
        c = self.counts
        out = {f"hicache_{k}_total": c[k] for k in (
            "device_hits", "host_hits", "misses", "evictions", "writebacks", "swap_ins", "swap_batches",
            "dropped", "plans_checked", "stale_indexer_reads")}
        free = self.table.count("st", PState.FREE)
        out["hicache_host_pages{state}"] = {"used": self.num_pages - free, "free": free}
        return out


def host_tier(cfg: object, cache: KVCache, pool: PagePool) -> HostTier | None:
    """The engine config's host tier (fields host_cache_*), or None when host_cache_pages is 0."""
    pages = getattr(cfg, "host_cache_pages", 0)
    if not pages:
        return None
    return HostTier(cache, pool, pages, cfg.host_cache_variant, cfg.host_cache_schedule,  # type: ignore[attr-defined]
                    cfg.host_cache_allow_races)  # type: ignore[attr-defined]
