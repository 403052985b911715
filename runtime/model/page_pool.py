"""The engine's device page pool, driven only by firing the KV page spec (spec/kv_page.py).

Every page's state, holders (reference counts) and content epoch live in one
`LocalInstance` of `KVPage` (one compiled one-page machine per page; page
locality is what `kvproof prove` checks). This module keeps only derived
indexes: the allocation candidates in LRU order and the prefix-cache map
(content hash <-> page). A full page of prompt tokens is published under a hash
of all tokens up to its end; a later sequence with the same prefix shares it
(`lock`) instead of recomputing it. Pages nobody holds keep their content and
hash until they are handed out again (oldest first); then their content is
written back to the host tier (`on_evict(page, hash)` between `evict_start` and
`wb_done`) or dropped.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import IO, Callable

from kvproof.spec.kv_page import KVPage
from kvproof.spec.local import LocalInstance
from kvproof.spec.machine import CONCRETE, holds


class PagePool:
    """Free pages, holders and the prefix cache of full pages; every change is a fired spec action."""

    def __init__(self, num_pages: int, on_evict: Callable[[int, bytes], None] | None = None,
                 variant: str = "fixed", trace: IO[str] | str | None = None) -> None:
        if not isinstance(num_pages, int) or num_pages < 1:
            raise ValueError(f"num_pages={num_pages!r}; expected an int >= 1")
        self.num_pages = num_pages
        self.table = LocalInstance(KVPage, variant, "page", num_pages, trace)
        # Derived index: pages an allocation may take (no holder), least recently used first.
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self.on_evict = on_evict
        self.ops = 0                        # page actions fired
        self.op_seconds = 0.0               # time spent firing them (the spec's cost)

    def _fire(self, action: str, p: int, *data: int) -> None:
        t0 = time.perf_counter()
        self.table.fire(action, p, *data)
        self.op_seconds += time.perf_counter() - t0
        self.ops += 1

    def _try(self, action: str, p: int, *data: int) -> bool:
        t0 = time.perf_counter()
        ok = self.table.try_fire(action, p, *data)
        self.op_seconds += time.perf_counter() - t0
        self.ops += ok
        return ok

    @property
    def num_free(self) -> int:
        """Pages not held by any sequence (cached or not)."""
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        """Whether `n` pages are free."""
        return n <= len(self._free)

    def tag(self, p: int) -> int:
        """The content epoch of page p (what a holder remembers and reads with)."""
        return self.table.get("tag", p)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages for new content (one holder each), evicting their cached content."""
        if n > len(self._free):
            raise RuntimeError(f"page pool exhausted: asked for {n} pages, {len(self._free)} free")
        out = []
        for _ in range(n):
            p = next(iter(self._free))                  # least recently used
            if self.begin_evict(p):
                self.end_evict(p)                       # the host copy is synchronous
            self._free.pop(p)
            self._fire("alloc", p)
            out.append(p)
        return out

    def begin_evict(self, p: int) -> bool:
        """Evict unheld page p's cached content: write it back to the host tier (True: `end_evict`
        follows) or drop it; a page without cached content is left as it is (False)."""
        if not self.table.enabled("drop", p):           # no cached content, or someone holds it
            return False
        h = self._hash_of.pop(p, None)
        if h is not None:
            del self._by_hash[h]
        if h is None or self.on_evict is None:
            self._fire("drop", p)
            return False
        self._fire("evict_start", p)
        self._free.pop(p)                               # not reusable before the write-back completes
        self.on_evict(p, h)
        return True

    def end_evict(self, p: int) -> None:
        """The write-back of page p completed: it is free, and the next page handed out."""
        self._fire("wb_done", p)
        self._free[p] = None
        self._free.move_to_end(p, last=False)

    def free(self, pages: list[int], tags: list[int] | None = None) -> None:
        """Drop one holder of each page (with the epochs the holder read, if given); unheld pages become free."""
        for k, p in enumerate(pages):
            e = self.tag(p) if tags is None else tags[k]
            if not self._try("free", p) and not self._try("unlock", p, e):
                # neither applies: raise with the guard of the one meant (a private page: free)
                private = self.table.why_disabled("unlock", p, e) == "not_sole_owner"
                if private:
                    self.table.fire("free", p)
                self.table.fire("unlock", p, e)
            if self.table.enabled("drop", p) or self.table.enabled("alloc", p):
                self._free[p] = None

    def read(self, pages: list[int], tags: list[int]) -> None:
        """A batch reads these pages with the epochs its sequence holds (ProtocolViolation if foreign)."""
        t0 = time.perf_counter()
        self.table.fire_each("read", pages, tags)
        self.op_seconds += time.perf_counter() - t0
        self.ops += len(pages)

    def lookup(self, h: bytes) -> int | None:
        """The page holding the prefix with hash `h`, if cached."""
        return self._by_hash.get(h)

    def cached(self) -> dict[bytes, int]:
        """Prefix hash -> page of every cached page (held or free)."""
        return dict(self._by_hash)

    def share(self, p: int) -> None:
        """Take one more holder of a cached page (a prefix hit)."""
        self._fire("lock", p)
        self._free.pop(p, None)

    def publish(self, p: int, h: bytes) -> None:
        """Page `p` (held, full) holds the prefix with hash `h`: enter it in the prefix cache."""
        if h in self._by_hash or p in self._hash_of:
            return                                      # the same content is cached already
        self._fire("publish", p)
        self._by_hash[h], self._hash_of[p] = p, h

    # ------------------------------------------------------------ host tier reload
    def start_load(self, p: int) -> None:
        """The owner of fresh page p starts loading a host copy into it."""
        self._fire("load_start", p)

    def landed(self, p: int) -> None:
        """The load into page p has landed (the copy stream finished it)."""
        self._fire("land", p, self.tag(p))

    def loaded(self, p: int, h: bytes) -> None:
        """Page p's load is complete: it becomes a cached page under hash `h` (if not cached already)."""
        self._fire("load_done", p)
        if h not in self._by_hash and p not in self._hash_of:
            self._by_hash[h], self._hash_of[p] = p, h

    def check(self) -> list[str]:
        """Properties of the spec the pool's state violates, and derived indexes out of step with it."""
        out = []
        lay = self.table.layout
        for name, inv in KVPage.invariants.items():
            for p in range(self.num_pages):
                if not holds(lay, self.table.local_state(p), inv.body, {"p": 0}, CONCRETE, self.table.variant):
                    out.append(f"{name}(p={p})")
        for p in range(self.num_pages):
            unheld = self.table.enabled("drop", p) or self.table.enabled("alloc", p)
            if unheld != (p in self._free):
                out.append(f"free index: page {p} unheld={unheld} but listed={p in self._free}")
        return out

    def us_per_op(self) -> float | None:
        """Mean microseconds per fired page action so far (None before the first)."""
        return self.op_seconds / self.ops * 1e6 if self.ops else None
