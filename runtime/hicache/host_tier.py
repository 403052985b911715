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
  Indexer-cache pages, records `idx_ready[l]`, then its KV pages and `kv_ready[l]`; the forward stream runs the model layer by layer — `indexer[l]` reads
  the layer's Indexer cache, `attention[l]` runs the decoder layer on what the indexer read and
  on the KV. The `fixed` plan waits for both events; the plan is checked with
  `spec.streams.check_plan` (once per shape) and a racy plan (`unfixed`) is refused unless
  `allow_races`. CPU: the stream emulator (`schedule`: eager / random / adversarial); CUDA:
  `CudaExecutor`, pinned host memory.

Host pages, write-back and the checked swap-in are the HiCache core (`hicache.core.HostPages`), the
one the standalone `hicache.cache.HiCache` is built on too; this module adds the engine's policy
(hash-indexed LRU host pages, pins of pending swaps) and the decoder's forward as the plan's ops.
"""
from __future__ import annotations

from collections import Counter, OrderedDict

import torch

from kvproof.runtime.hicache.core import HostPages
from kvproof.runtime.model.cache import KVCache
from kvproof.runtime.model.cache import PagePool
from kvproof.runtime.streams.executor import POLICIES
from kvproof.spec.core import variant_name
from kvproof.spec.hicache_plan import VARIANTS
from kvproof.spec.streams import Plan, Violation

SCHEDULES: tuple[str, ...] = POLICIES + ("sync",)


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
        self.cuda = cache.kv.device.type == "cuda"
        self.idx_tensors = [cache.ik] + ([cache.ik_fp8] if cache.ik_fp8 is not None else [])
        # Host pages follow the same page protocol as device pages (write-back = new content, a
        # pending swap's pin = a holder, dropping = evicting without a copy), in the HiCache core;
        # by_hash is a derived index.
        self.core = HostPages(cache.kv, self.idx_tensors, pages, variant, allow_races, schedule, seed)
        self.host_kv, self.host_idx, self.plan = self.core.host_kv, self.core.host_idx, self.core.plan
        self.by_hash: OrderedDict[bytes, int] = OrderedDict()    # least recently used first
        self.counts: Counter[str] = Counter()
        self.last: dict | None = None                            # the last swap-in batch (tests, audits)
        pool.on_evict = self.evict

    # ------------------------------------------------------------ host pages
    def check(self, plan: Plan) -> tuple[Violation, ...]:
        """The plan's races (spec.streams.check_plan), checked once per plan shape."""
        return self.core.check(plan)

    @property
    def pins(self) -> dict[int, int]:
        """Host page -> pending swaps that read it (pages with none are left out)."""
        return {hp: n for hp in range(self.num_pages) if (n := self.core.pages.holders(hp))}

    def _alloc_host(self) -> int | None:
        pages = self.core.pages
        if not pages.can_allocate():
            drop = next((h for h, hp in self.by_hash.items() if pages.try_drop(hp)), None)   # LRU first;
            if drop is None:                                                                 # a pinned page refuses
                return None
            del self.by_hash[drop]
            self.counts["dropped"] += 1
        return pages.allocate()

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
        self.core.write_back(page, hp)                           # cached on the host, held by nobody
        self.by_hash[h] = hp
        self.counts["evictions"] += 1
        self.counts["writebacks"] += 1

    def reserve(self, h: bytes) -> tuple[int, int] | None:
        """For a prefix page found on the host only: (host page, fresh device page) to swap, or None."""
        hp = self.by_hash.get(h)
        if hp is None or not self.pool.can_allocate(1):
            return None
        self.by_hash.move_to_end(h)
        self.core.pages.hold(hp)                                 # pinned: allocating may evict to the host
        return hp, self.pool.allocate(1)[0]

    def release(self, hp: int) -> None:
        """A reserved swap is done or abandoned: its host page may be dropped again."""
        self.core.pages.unhold(hp, self.core.pages.epoch(hp))

    def count_match(self, device_hits: int, host_hits: int, considered: int) -> None:
        """Record one prefix match: pages hit on the device, on the host, and pages considered."""
        self.counts["device_hits"] += device_hits
        self.counts["host_hits"] += host_hits
        self.counts["misses"] += considered - device_hits - host_hits

    # ------------------------------------------------------------ the swap-in batch
    def forward(self, model: torch.nn.Module, tokens: torch.Tensor, batch: object,
                swaps: list[tuple[int, int]]) -> torch.Tensor:
        """Model forward (tokens [T] -> hidden [T, D]) of a batch that first swaps `swaps` [(host, device)] in."""
        cache, L = self.cache, len(model.layers)
        dst = torch.tensor([d for _, d in swaps], dtype=torch.long, device=cache.kv.device)
        with torch.inference_mode():
            hidden: dict[int, torch.Tensor] = {0: model.embed(tokens)}
            reads: dict[int, list[torch.Tensor]] = {}

            def indexer(l: int):
                def start():                                     # the Indexer cache as the indexer sees it
                    reads[l] = [t[l].index_select(0, dst) for t in self.idx_tensors]
                    return None
                return start

            def attention(l: int):
                def start():                                     # the layer on the indexer's view + the KV now
                    mine = [t[l].index_select(0, dst) for t in self.idx_tensors]
                    for t, r in zip(self.idx_tensors, reads[l]):
                        t[l].index_copy_(0, dst, r)
                    y = model.layers[l](hidden[l], batch, cache, model.backend)
                    for t, r in zip(self.idx_tensors, mine):
                        t[l].index_copy_(0, dst, r)
                    return lambda: hidden.__setitem__(l + 1, y)
                return start

            res = self.core.swap_in(swaps, self.pool, indexer, attention)
        self.counts["swap_ins"] += len(swaps)
        self.counts["swap_batches"] += 1
        self.last = {"swaps": list(swaps), "indexer_reads": reads, "exec": res}
        if not self.cuda:
            src = torch.tensor([s for s, _ in swaps], dtype=torch.long)
            stale = sum(not torch.equal(reads[l][0], self.host_idx[0][l].index_select(0, src)) for l in range(L))
            self.last["stale_layers"] = stale
            self.counts["stale_indexer_reads"] += stale
        return hidden[L]

    def stats(self) -> dict:
        """Counters for /metrics (pages unless named otherwise)."""
        c = self.counts
        out = {f"hicache_{k}_total": c[k] for k in (
            "device_hits", "host_hits", "misses", "evictions", "writebacks", "swap_ins", "swap_batches",
            "dropped", "stale_indexer_reads")} | {"hicache_plans_checked_total": self.core.gate.checked}
        used = len(self.core.pages.used)
        out["hicache_host_pages{state}"] = {"used": used, "free": self.num_pages - used}
        return out


def host_tier(cfg: object, cache: KVCache, pool: PagePool) -> HostTier | None:
    """The engine config's host tier (fields host_cache_*), or None when host_cache_pages is 0."""
    pages = getattr(cfg, "host_cache_pages", 0)
    if not pages:
        return None
    return HostTier(cache, pool, pages, cfg.host_cache_variant, cfg.host_cache_schedule,  # type: ignore[attr-defined]
                    cfg.host_cache_allow_races)  # type: ignore[attr-defined]
