"""vLLM scheduler: freeing the blocks of a request aborted while its KV is still being loaded (PR #32255).

Source (public descriptions): vllm-project/vllm PR #32255 "[BugFix] scheduler: Delay
freeing blocks of aborted async loads" (merged). A decode request in
WAITING_FOR_REMOTE_KVS has blocks allocated that a KV connector (NIXL: reads pulled
from prefill) is still writing. Before the fix, `finish_requests` freed those
blocks at once on abort, so a load still in flight could land in blocks already
given to the next request (cross-request KV corruption). The fix delays the free
until the worker reports `finished_recving` for the request. A review comment on
the PR's first version (cursor bot) points out that when `finished_recving` has
already arrived, no further signal comes, so delaying the free then holds the
blocks forever; the merged version delays only when the request is not yet in
`finished_recving_kv_req_ids`.

Model: one block set of decode, loaded by one async load per request generation
(`epoch`); the load lands later and its completion (`finished_recving`) is then
reported to the scheduler. Variants:
- `unfixed`: abort in WAITING_FOR_REMOTE_KVS frees the blocks at once.
- `first_draft`: abort in WAITING_FOR_REMOTE_KVS always delays the free until finished_recving.
- `fixed`: delays only when finished_recving has not arrived yet (the merged PR).

Run: `kvproof prove docs/audits/vllm_async_load_abort.py`.
"""
from __future__ import annotations

import enum

from kvproof.spec import Bool, EnumT, Nat, Protocol, Var, action, invariant, liveness
from kvproof.verify import check


class Req(enum.IntEnum):
    """The scheduler's view of the request holding the block set."""

    FREE = 0        # blocks in the free pool
    WAITING = 1     # WAITING_FOR_REMOTE_KVS: the async load writes into the blocks
    RUNNING = 2     # KV loaded, request decoding
    HELD = 3        # aborted while loading: blocks held until finished_recving


class AsyncLoadAbort(Protocol):
    """Delayed free of an aborted async load's blocks (vLLM scheduler + KV connector)."""

    name = "vllm_async_load_abort"
    variants = ("fixed", "first_draft", "unfixed")
    actors = ("scheduler",)
    indices = {}
    bounds = {"max_epoch": 2}
    vars = {
        "req": Var(EnumT(Req), (), "scheduler", doc="state of the request owning the blocks"),
        "epoch": Var(Nat("max_epoch"), (), "scheduler", doc="request generation owning the blocks"),
        "recvd": Var(Bool(), (), "scheduler", doc="finished_recving arrived for the current request"),
        "ld_n": Var(Nat(), (), "net", doc="loads of the current request in flight"),
        "ld_old": Var(Nat(), (), "net", doc="loads of earlier requests in flight"),
        "cq": Var(Bool(), (), "net", doc="a finished_recving awaits the scheduler"),
        "foreign": Var(Bool(), (), "ghost", doc="a load landed in blocks not owned by its request"),
    }

    @action("scheduler")
    def alloc(P, m):
        """A new request gets the blocks and its KV load starts (async, lands later)."""
        m.require(m.req[()] == Req.FREE, "blocks_free")
        m.req[()] = Req.WAITING
        m.epoch[()] = m.epoch[()] + 1
        m.recvd[()] = False
        m.ld_old[()] = m.ld_old[()] + m.ld_n[()]
        m.ld_n[()] = 1
        m.cq[()] = False

    @action("scheduler")
    def on_finished_recving(P, m):
        """The worker reports the load finished; held blocks of an aborted request are freed now."""
        m.env(m.cq[()], "finished_recving_reported")
        m.cq[()] = False
        m.recvd[()] = True
        m.req[()] = m.ite(m.req[()] == Req.HELD, Req.FREE, m.req[()])

    @action("scheduler")
    def schedule(P, m):
        """The KV is in: the request starts decoding."""
        m.require(m.all([m.req[()] == Req.WAITING, m.recvd[()]]), "kv_loaded")
        m.req[()] = Req.RUNNING

    @action("scheduler")
    def finish(P, m):
        """The request finishes (or is aborted while decoding): free the blocks."""
        m.require(m.req[()] == Req.RUNNING, "running")
        m.req[()] = Req.FREE

    @action("scheduler")
    def abort_waiting(P, m):
        """The client aborts while the request waits for remote KV."""
        m.require(m.req[()] == Req.WAITING, "waiting_for_remote_kvs")
        if m.variant == "unfixed":
            m.req[()] = Req.FREE
        elif m.variant == "first_draft":
            m.req[()] = Req.HELD
        else:
            m.req[()] = m.ite(m.recvd[()], Req.FREE, Req.HELD)

    @action("net", e="data:max_epoch")
    def load_lands(P, m, e):
        """The load of request e lands in the blocks (whoever holds them now) and completes."""
        cur = e == m.epoch[()]
        m.env(m.ite(cur, m.ld_n[()] > 0, m.all([e < m.epoch[()], m.ld_old[()] > 0])), "load_in_flight")
        m.ld_n[()] = m.ld_n[()] - m.ite(cur, 1, 0)
        m.ld_old[()] = m.ld_old[()] - m.ite(cur, 0, 1)
        m.cq[()] = m.any([m.cq[()], cur])
        m.foreign[()] = m.any([m.foreign[()], m.not_(cur), m.req[()] == Req.FREE])

    @invariant
    def no_load_into_reused_blocks(P, m):
        """No load lands in blocks that were freed or given to another request."""
        return m.not_(m.foreign[()])

    @classmethod
    def quiescent(cls, m):
        """Idle with free blocks is fine."""
        return m.req[()] == Req.FREE

    def _held(P, m):
        return m.req[()] == Req.HELD

    def _not_held(P, m):
        return m.req[()] != Req.HELD

    @liveness("_held", "_not_held")
    def held_blocks_freed(P):
        """Blocks held for an aborted load are eventually freed (no leak)."""


def checks() -> list:
    """Verdicts: unfixed corrupts, the first draft leaks, the merged fix does neither."""
    prop, live = "no_load_into_reused_blocks", "held_blocks_freed"
    return [
        check(AsyncLoadAbort, prop, "unfixed", expect="refuted", depth=8),
        check(AsyncLoadAbort, prop, "first_draft", method="search"),
        check(AsyncLoadAbort, live, "first_draft", expect="refuted"),
        check(AsyncLoadAbort, prop, "fixed", method="search"),
        check(AsyncLoadAbort, live, "fixed"),
        check(AsyncLoadAbort, "no_deadlock", "fixed"),
    ]
