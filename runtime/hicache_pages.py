"""One tier (device or host) of HiCache's pages, driven only by firing the KV page spec (spec/kv_page.py).

Which pages are free, who holds them (a batch using a radix node holds its pages:
the radix tree's lock references) and whether a copy into or out of them is in
flight all live in a `LocalInstance` of `KVPage`; this class keeps only the
free list as a derived index (allocation candidates, in order).
"""
from __future__ import annotations

from collections import deque

from kvproof.spec.kv_page import KVPage
from kvproof.spec.local import LocalInstance


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

    def hold(self, p: int) -> int:
        """One more holder of cached page p (a batch uses its node); returns the epoch held."""
        self.table.fire("lock", p)
        return self.table.get("tag", p)

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

    def start_load(self, p: int) -> None:
        """The holder of fresh page p starts loading content into it."""
        self.table.fire("load_start", p)

    def landed(self, p: int) -> None:
        """The load into p has landed (or, its batch having failed, will never land)."""
        self.table.fire("land", p, self.table.get("tag", p))

    def loaded(self, p: int) -> None:
        """The load into p landed: p is a cached page (still held by the loader)."""
        self.landed(p)
        self.table.fire("load_done", p)

    def abandon(self, p: int) -> None:
        """The sole holder of a fresh (or fully loaded-into but unpublished) page gives it up: p is free."""
        self.table.fire("free", p)
        self._free.append(p)
