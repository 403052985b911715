"""HiCache's building blocks: its configuration, the page pool of one tier, a batch's result.

A tier's pages (`TierPages`) are driven only by firing the KV page spec (spec/kv_page.py): which pages
are free, who holds them (a batch using a radix node holds its pages: the radix tree's lock
references) and whether a copy into or out of them is in flight live in a `LocalInstance` of
`KVPage`; the free list is a derived index.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from kvproof.runtime.streams.executor import POLICIES, ExecResult
from kvproof.runtime.streams.gate import PlanRaceError  # noqa: F401  (re-exported: the one refusal class)
from kvproof.spec.core import variant_name
from kvproof.spec.hicache_plan import VARIANTS
from kvproof.spec.kv_page import KVPage
from kvproof.spec.local import LocalInstance
from kvproof.spec.streams import Plan


class CacheFullError(RuntimeError):
    """No page can be freed: every candidate is locked by the running batch."""


@dataclass(frozen=True)
class HiCacheConfig:
    """Shapes and policies of one HiCache instance."""

    layers: int = 4
    page_size: int = 4
    kv_dim: int = 16
    idx_dim: int = 8
    device_pages: int = 16
    host_pages: int = 64
    topk: int = 8
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    variant: str = "fixed"
    allow_races: bool = False          # needed to run the pre-fix plan (demonstrations only)
    schedule: str = "random"           # CPU emulator policy: eager / random / adversarial
    seed: int = 0
    poison: float | None = None        # fill freed device pages with this value (a debugging aid)
    record_times: bool = False         # CUDA: time every op with events (syncs per batch) for the trace

    def __post_init__(self) -> None:
        for name in ("layers", "page_size", "kv_dim", "idx_dim", "device_pages", "host_pages", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"HiCacheConfig.{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "variant", variant_name(self.variant))
        if self.variant not in VARIANTS:
            raise ValueError(f"HiCacheConfig.variant {self.variant!r} is not one of {VARIANTS}")
        if self.schedule not in POLICIES:
            raise ValueError(f"HiCacheConfig.schedule {self.schedule!r} is not one of {POLICIES}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"HiCacheConfig.device {self.device!r}: expected 'cpu' or 'cuda[:n]'")


class TierPages:
    """A tier's page table: allocate, hold / unhold, copy out (evict) and in (load), release."""

    def __init__(self, n: int, tier: str) -> None:
        self.tier, self.n = tier, n
        self.table = LocalInstance(KVPage, "fixed", "page", n)
        self._free: deque[int] = deque(range(n))

    @property
    def used(self) -> set[int]:
        """Pages not on the free list (held, cached or being copied)."""
        return {p for p in range(self.n) if not self.table.enabled("alloc", p)}

    def can_allocate(self) -> bool:
        """True when a page is free."""
        return bool(self._free)

    def allocate(self) -> int:
        """Take a free page for new content; the caller holds it until `publish` + `unhold`."""
        p = self._free.popleft()
        self.table.fire("alloc", p)
        return p

    def publish(self, p: int) -> None:
        """The new content of p is complete: it is a cached page (still held by its writer)."""
        self.table.fire("publish", p)

    def store(self, p: int) -> None:
        """The writer of fresh page p is done: p is a cached page nobody holds (`publish` + `unhold`)."""
        self.table.fire("publish", p)
        self.table.fire("unlock", p, self.epoch(p))

    def epoch(self, p: int) -> int:
        """The epoch of p's current content (what a holder passes to `unhold`)."""
        return self.table.get("tag", p)

    def holders(self, p: int) -> int:
        """How many holders p has."""
        return self.table.get("refs", p)

    def hold(self, p: int) -> int:
        """One more holder of cached page p (a batch uses its node); returns the epoch held."""
        self.table.fire("lock", p)
        return self.epoch(p)

    def unhold(self, p: int, epoch: int) -> None:
        """A holder of p (at `epoch`) is done with it."""
        self.table.fire("unlock", p, epoch)

    def held(self, p: int) -> bool:
        """Whether any batch holds p (or a copy into it is under way): it must not be evicted."""
        return not self.table.enabled("drop", p)

    def write_back(self, p: int) -> None:
        """Start copying p's content out (eviction with a host copy); `written_back` ends it."""
        self.table.fire("evict_start", p)

    def written_back(self, p: int) -> None:
        """The copy out of p completed: p is free."""
        self.table.fire("wb_done", p)
        self._free.append(p)

    def drop(self, p: int) -> None:
        """Discard cached, unheld p without a copy: p is free."""
        self.table.fire("drop", p)
        self._free.append(p)

    def try_drop(self, p: int) -> bool:
        """`drop` p if the page spec allows it now (cached and unheld); whether it did."""
        if not self.table.try_fire("drop", p):
            return False
        self._free.append(p)
        return True

    def start_load(self, p: int) -> None:
        """The holder of fresh page p starts loading content into it."""
        self.table.fire("load_start", p)

    def landed(self, p: int) -> None:
        """The load into p has landed (or, its batch having failed, will never land)."""
        self.table.fire("land", p, self.epoch(p))

    def load_done(self, p: int) -> None:
        """The load into p landed (`landed`): p is a cached page (still held by the loader)."""
        self.table.fire("load_done", p)

    def abandon(self, p: int) -> None:
        """The sole holder of a fresh (or fully loaded-into but unpublished) page gives it up: p is free."""
        self.table.fire("free", p)
        self._free.append(p)


@dataclass
class BatchResult:
    """One batch: prefix pages hit, pages swapped in, per-layer indexer scores, final hidden state."""

    plan: Plan
    prefix_pages: int
    swapped: int
    scores: list[torch.Tensor]       # per layer: [T] relu(idx_keys @ q[l])
    hidden: torch.Tensor             # [kv_dim]
    exec: ExecResult
