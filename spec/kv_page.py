"""The lifecycle of every device KV page: allocation, prefix sharing, eviction to host, reload, free.

Source: the page pool, prefix (radix) cache and host tier of a serving engine,
and the production bug classes they are known for: a prefix page evicted while
a running request still reads it (lock references not checked); a page freed
while its host->device load is still in flight (the copy lands in the page's
next owner); a page reused before its write-back to host finished (the host
copy gets the next owner's content); a double free when an abort races a finish.

One index set, `page` (a device page frame). Requests are not an index set:
the requests holding a page are *counted* per content epoch. `tag[p]` is the
page's content epoch (like the KV slot's epoch): it grows whenever the page
gets new content (allocated to a request, or filled from the host). A request
remembers the epoch of every page it holds and reads with it; `refs[p]`
counts holders of the current content, `stale[p]` holders of an older content
(a page taken away from under them; only the pre-fix variants make any). So
the model covers any number of requests, and every action touches one page:
the proof for one page lifts to any number of pages (page locality, checked).

Page states: FREE (on the free list, no content), OWNED (allocated to one
request, being written, not yet in the prefix index), CACHED (full page in the
prefix index; SHARED while `refs` > 0, evictable at 0), EVICTING (write-back to
host in flight; the content then lives ON_HOST, which is a state of the content,
not of this frame), LOADING (a host copy is being loaded into it for the request
that reserved and owns it). Copies are asynchronous: a load's writes land (`land`) some
time after `load_start`, a write-back completes (`wb_done`) after `evict_start`.

Variants: `fixed`; `evict_locked` (eviction ignores lock references);
`free_while_loading` (an aborted request frees its page with the load still in
flight); `reuse_before_writeback` (eviction frees the frame at once, before the
write-back to host completed).
"""
from __future__ import annotations

import enum

from kvproof.spec.core import Bool, EnumT, Nat, Protocol, Var, action, invariant, liveness


class PState(enum.IntEnum):
    """State of one device page frame."""

    FREE = 0        # on the free list; no content
    OWNED = 1       # allocated to one request, being written; not in the prefix index
    CACHED = 2      # full page in the prefix index: SHARED while refs > 0, evictable at 0
    EVICTING = 3    # write-back to host in flight; frame not reusable yet
    LOADING = 4     # host -> device load in flight for the request that reserved it


VARIANTS = ("fixed", "evict_locked", "free_while_loading", "reuse_before_writeback")


class KVPage(Protocol):
    """Device KV pages shared by a prefix index, written back to a host tier and reloaded."""

    name = "kv_page"
    variants = VARIANTS
    actors = ("pool",)
    indices = {"page": "pages"}
    bounds = {"pages": 1, "max_epoch": 3, "max_refs": 2, "max_copies": 1}
    vars = {
        "st": Var(EnumT(PState), ("page",), "pool", doc="state of the page frame"),
        "tag": Var(Nat("max_epoch"), ("page",), "pool", doc="content epoch: grows with every new content"),
        "refs": Var(Nat("max_refs"), ("page",), "pool", doc="requests holding the current content"),
        "stale": Var(Nat(), ("page",), "pool", doc="requests still holding an older content of the frame"),
        "wb_fl": Var(Bool(), ("page",), "net", doc="a write-back (device -> host copy) is in flight"),
        "wb_e": Var(Nat(), ("page",), "net", doc="content epoch the in-flight write-back copies"),
        "ld_fl": Var(Nat("max_copies"), ("page",), "net", doc="load writes in flight for the current content"),
        "ld_old": Var(Nat(), ("page",), "net", doc="load writes in flight for an older content"),
        # history (ghost) variables for the properties
        "bad_read": Var(Bool(), ("page",), "ghost", doc="a request read content that is not its own"),
        "bad_land": Var(Bool(), ("page",), "ghost", doc="a load landed in another content of the frame"),
        "bad_host": Var(Bool(), ("page",), "ghost", doc="a write-back copied content it was not for"),
    }

    # ------------------------------------------------------------ allocation and sharing
    @action("pool", p="page")
    def alloc(P, m, p):
        """Give a free page to a request that writes new content into it (a fresh epoch)."""
        m.require(m.st[p] == PState.FREE, "page_free")
        m.st[p] = PState.OWNED
        m.tag[p] = m.tag[p] + 1
        P._new_content(m, p)

    @staticmethod
    def _new_content(m, p):
        # Holders a pre-fix eviction ignored still believe they hold the page: their content is gone.
        m.stale[p] = m.stale[p] + m.refs[p]
        m.refs[p] = 1

    @action("pool", p="page")
    def publish(P, m, p):
        """The owner filled the page: it enters the prefix index (the owner keeps holding it)."""
        m.require(m.st[p] == PState.OWNED, "owned")
        m.st[p] = PState.CACHED

    @action("pool", p="page")
    def lock(P, m, p):
        """A prefix match hits this cached page: one more request holds its current content."""
        m.require(m.st[p] == PState.CACHED, "cached")
        m.refs[p] = m.refs[p] + 1

    @action("pool", p="page", e="data:max_epoch")
    def unlock(P, m, p, e):
        """A request holding content epoch e of a cached page ends (finish, abort, preemption)."""
        cur = e == m.tag[p]
        m.require(m.ite(cur, m.refs[p] > 0, m.all([e < m.tag[p], m.stale[p] > 0])), "holder_exists")
        m.require(m.ite(cur, m.all([m.st[p] != PState.OWNED, m.st[p] != PState.LOADING]), True),
                  "not_sole_owner")
        m.refs[p] = m.refs[p] - m.ite(cur, 1, 0)
        m.stale[p] = m.stale[p] - m.ite(cur, 0, 1)

    @action("pool", p="page", e="data:max_epoch")
    def read(P, m, p, e):
        """A request holding content epoch e reads the page (attention over its prefix)."""
        cur = e == m.tag[p]
        m.require(m.ite(cur, m.refs[p] > 0, m.all([e < m.tag[p], m.stale[p] > 0])), "holder_exists")
        m.require(m.ite(cur, m.any([m.st[p] == PState.OWNED, m.st[p] == PState.CACHED]), True), "page_ready")
        m.bad_read[p] = m.any([m.bad_read[p], m.not_(cur), m.ld_fl[p] > 0,
                               m.all([m.st[p] != PState.OWNED, m.st[p] != PState.CACHED])])

    @action("pool", p="page")
    def free(P, m, p):
        """The sole holder of an unpublished or loading page ends: the frame goes back to the free list."""
        m.require(m.any([m.st[p] == PState.OWNED, m.st[p] == PState.LOADING]), "owned_or_loading")
        m.require(m.refs[p] == 1, "sole_holder")
        if m.variant != "free_while_loading":
            m.require(m.ld_fl[p] == 0, "no_load_in_flight")
        m.st[p] = PState.FREE
        m.refs[p] = 0
        # Load writes still in flight stay in flight, now foreign to the frame's next content.
        m.ld_old[p] = m.ld_old[p] + m.ld_fl[p]
        m.ld_fl[p] = 0

    # ------------------------------------------------------------ host tier
    @action("pool", p="page")
    def drop(P, m, p):
        """Drop a cached page without keeping its content (no host tier, or the host is full)."""
        m.require(m.st[p] == PState.CACHED, "cached")
        if m.variant != "evict_locked":
            m.require(m.refs[p] == 0, "no_lock_references")
        m.st[p] = PState.FREE

    @action("pool", p="page")
    def evict_start(P, m, p):
        """Evict a cached page: start writing its content back to the host."""
        m.require(m.st[p] == PState.CACHED, "cached")
        if m.variant != "evict_locked":
            m.require(m.refs[p] == 0, "no_lock_references")
        # Pre-fix: the frame is free at once; the copy still reads it.
        m.st[p] = PState.FREE if m.variant == "reuse_before_writeback" else PState.EVICTING
        m.wb_fl[p] = True
        m.wb_e[p] = m.tag[p]

    @action("net", p="page")
    def wb_done(P, m, p):
        """The write-back completes: the host copy holds whatever the frame holds now."""
        m.env(m.wb_fl[p], "writeback_in_flight")
        m.bad_host[p] = m.any([m.bad_host[p], m.wb_e[p] != m.tag[p]])
        m.wb_fl[p] = False
        m.st[p] = m.ite(m.st[p] == PState.EVICTING, PState.FREE, m.st[p])

    @action("pool", p="page")
    def load_start(P, m, p):
        """The owner of a fresh page starts loading a host copy into it (a prefix hit on the host)."""
        m.require(m.st[p] == PState.OWNED, "owned")
        m.st[p] = PState.LOADING
        m.ld_fl[p] = m.ld_fl[p] + 1

    @action("net", p="page", e="data:max_epoch")
    def land(P, m, p, e):
        """A load's writes for content epoch e land in the frame; the copy engine does not look at its state."""
        cur = e == m.tag[p]
        m.env(m.ite(cur, m.ld_fl[p] > 0, m.all([e < m.tag[p], m.ld_old[p] > 0])), "load_in_flight")
        m.ld_fl[p] = m.ld_fl[p] - m.ite(cur, 1, 0)
        m.ld_old[p] = m.ld_old[p] - m.ite(cur, 0, 1)
        m.bad_land[p] = m.any([m.bad_land[p], m.not_(cur)])

    @action("pool", p="page")
    def load_done(P, m, p):
        """Every load write landed: the page is ready and enters the prefix index."""
        m.require(m.st[p] == PState.LOADING, "loading")
        m.require(m.ld_fl[p] == 0, "load_landed")
        m.st[p] = PState.CACHED

    # ------------------------------------------------------------ properties
    @invariant(p="page")
    def reads_own_content(P, m, p):
        """A request reads a page only while it holds the page's current, ready content."""
        return m.not_(m.bad_read[p])

    @invariant(p="page")
    def no_load_into_foreign_content(P, m, p):
        """No host->device load lands in a frame that moved on to other content."""
        return m.not_(m.bad_land[p])

    @invariant(p="page")
    def host_copy_intact(P, m, p):
        """A write-back copies exactly the content it was started for."""
        return m.not_(m.bad_host[p])

    @invariant(p="page")
    def free_only_when_unused(P, m, p):
        """A free page is held by no request and no copy into or out of it is in flight."""
        return m.implies(m.st[p] == PState.FREE, m.all([
            m.refs[p] == 0, m.stale[p] == 0, m.ld_fl[p] == 0, m.ld_old[p] == 0, m.not_(m.wb_fl[p])]))

    @invariant(p="page")
    def no_leak(P, m, p):
        """A frame out of the free list is held by exactly its owner, cached (evictable), or being copied."""
        sole = m.any([m.st[p] == PState.OWNED, m.st[p] == PState.LOADING])
        return m.all([m.implies(sole, m.refs[p] == 1),
                      m.implies(m.st[p] == PState.EVICTING, m.wb_fl[p])])

    # Strengthening invariants: with the properties they are inductive for `fixed`.
    @invariant(strengthening=True, p="page")
    def nothing_stale(P, m, p):
        """No request holds an older content and no load for an older content is in flight."""
        return m.all([m.stale[p] == 0, m.ld_old[p] == 0])

    @invariant(strengthening=True, p="page")
    def copies_match_state(P, m, p):
        """Loads are in flight only into a LOADING frame, write-backs only out of an EVICTING one."""
        return m.all([m.implies(m.ld_fl[p] > 0, m.st[p] == PState.LOADING),
                      m.implies(m.st[p] == PState.EVICTING, m.refs[p] == 0),
                      m.implies(m.wb_fl[p], m.all([m.st[p] == PState.EVICTING, m.wb_e[p] == m.tag[p]]))])

    @classmethod
    def quiescent(cls, m):
        """Nothing left to do is fine once every page is free."""
        return m.all(m.st[p] == PState.FREE for p in m.range("page"))

    # ------------------------------------------------------------ liveness
    def _in_use(P, m, p):
        return m.st[p] != PState.FREE

    def _free(P, m, p):
        return m.st[p] == PState.FREE

    @liveness("_in_use", "_free", p="page")
    def page_returns_free(P):
        """Every page is free again once its requests end and its copies complete (strong fairness)."""
