"""vLLM NixlConnector (pull): prefill holds finished blocks for decode's reads, until a read-done or a lease expiry.

Source (public descriptions): in vLLM's NixlConnector, decode *reads* (one-sided
NIXL READ) the KV blocks of a finished prefill. `request_finished` on prefill
returns `delay_free_blocks=True` and the blocks stay allocated until decode
notifies that it has read them, or until a timeout (VLLM_NIXL_ABORT_REQUEST_TIMEOUT,
PR #20139; later a `kv_lease_duration`) frees them so an aborted or lost request
cannot pin them forever. The mirror image of the push-side reuse race, vLLM issue
#21570 (open): prefill frees (and reuses) blocks whose lease expired while decode's
read is still in flight; a public deployment report (aws-samples/aws-do-eks PR #84)
saw "Releasing expired KV blocks ... retrieved by 0 remote worker(s) before lease
expired" followed by "Potentially invalid KV blocks ... were retrieved by a decode
worker", with the requests still answered 200.

Model: one prefill block set (per request generation `epoch`) read by `readers`
decode workers (TP ranks each reading their share). Prefill finishes a request,
holds its blocks and tells decode where they are; each reader posts reads that
complete later (the transport returns the bytes present *at completion*); a reader
that got every read reports read-done. Prefill frees the blocks on every reader's
read-done, or when the lease expires; a freed block set is reused by the next request.

Variants:
- `lease`: lease expiry frees the blocks while reads may be in flight (as shipped).
- `fenced`: freeing the blocks first revokes decode's access to them (NIXL/RDMA:
  deregister the region / invalidate its remote key); a read of freed blocks then
  completes with an error, which decode treats as a failed transfer (recompute or
  fail the request) instead of using the bytes.

Run: `kvproof prove docs/audits/vllm_nixl_lease.py`.
"""
from __future__ import annotations

import enum

from kvproof.spec import Bool, Channel, EnumT, Nat, Protocol, Var, action, invariant
from kvproof.verify import check


class Blocks(enum.IntEnum):
    """Prefill-side state of the block set."""

    FREE = 0        # in prefill's pool (maybe reused by the next request)
    HELD = 1        # finished request's KV, held for decode's reads


class Reader(enum.IntEnum):
    """A decode reader's state for the request it serves."""

    IDLE = 0
    READING = 1     # reads posted / in flight for r_epoch
    DONE = 2        # every read completed successfully; read-done sent
    FAILED = 3      # a read failed (access revoked): the request is recomputed or failed


class NixlLease(Protocol):
    """Pull-based KV transfer with delayed free and a lease on prefill's blocks."""

    name = "vllm_nixl_lease"
    variants = ("fenced", "lease")
    actors = ("prefill", "decode")
    indices = {"reader": "readers"}
    bounds = {"readers": 2, "max_epoch": 2}
    sanity_bounds = {"readers": 1}
    vars = {
        "blocks": Var(EnumT(Blocks), (), "prefill", doc="prefill's block set"),
        "epoch": Var(Nat("max_epoch"), (), "prefill", doc="request generation owning the blocks"),
        "read_done": Var(Bool(), ("reader",), "prefill", doc="read-done received from this reader"),
        "r_state": Var(EnumT(Reader), ("reader",), "decode"),
        "r_epoch": Var(Nat(), ("reader",), "decode", doc="request the reader is reading"),
        "rd_n": Var(Nat(), ("reader",), "net", doc="reads of the reader's epoch in flight (0 or 1)"),
        "cq_ok": Var(Bool(), ("reader",), "net", doc="a successful read completion awaits polling"),
        "cq_err": Var(Bool(), ("reader",), "net", doc="a failed read completion awaits polling"),
        "foreign": Var(Bool(), ("reader",), "ghost", doc="a read returned bytes of another request"),
        "used_foreign": Var(Bool(), ("reader",), "ghost", doc="decode accepted a foreign read as its KV"),
    }
    channels = {
        "ready": Channel("prefill", "decode", ("reader",), "blocks of request e are ready to read"),
        "done": Channel("decode", "prefill", ("reader",), "reader finished reading request e"),
    }

    # ------------------------------------------------------------ prefill
    @action("prefill")
    def finish_prefill(P, m):
        """A request's prefill finished: hold its blocks (delay_free_blocks) and tell decode."""
        m.require(m.blocks[()] == Blocks.FREE, "blocks_free")
        m.blocks[()] = Blocks.HELD
        m.epoch[()] = m.epoch[()] + 1
        for r in m.range("reader"):
            m.read_done[r] = False
            m.send("ready", (r,), m.epoch[()] + 1)

    @action("prefill", receives="done", r="reader", e="data:max_epoch")
    def on_read_done(P, m, r, e):
        """A reader reports its reads of the current request complete."""
        m.require(m.blocks[()] == Blocks.HELD, "held")
        m.require(e == m.epoch[()], "done_epoch_current")
        m.read_done[r] = True

    @action("prefill")
    def free_after_reads(P, m):
        """Every reader has read: free the blocks."""
        m.require(m.blocks[()] == Blocks.HELD, "held")
        m.require(m.all(m.read_done[r] for r in m.range("reader")), "all_readers_done")
        m.blocks[()] = Blocks.FREE

    @action("prefill")
    def lease_expired(P, m):
        """The lease ran out before every read-done arrived: free the blocks."""
        m.require(m.blocks[()] == Blocks.HELD, "held")
        # `fenced`: the blocks' remote key is invalidated before they return to the pool, so a
        # read of them fails from now on (modelled in read_lands); `lease` frees them as they are.
        m.blocks[()] = Blocks.FREE

    # ------------------------------------------------------------ decode
    @action("decode", receives="ready", r="reader", e="data:max_epoch")
    def start_read(P, m, r, e):
        """A reader learns where request e's blocks are and posts its read."""
        m.require(e > m.r_epoch[r], "ready_epoch_newer")
        m.r_epoch[r] = e
        m.r_state[r] = Reader.READING
        m.rd_n[r] = 1
        m.cq_ok[r] = False
        m.cq_err[r] = False

    @action("decode", r="reader")
    def poll_ok(P, m, r):
        """The read completed: accept the bytes as the request's KV, report read-done."""
        m.env(m.cq_ok[r], "read_completed")
        m.require(m.r_state[r] == Reader.READING, "reading")
        m.r_state[r] = Reader.DONE
        m.cq_ok[r] = False
        m.send("done", (r,), m.r_epoch[r])

    @action("decode", r="reader")
    def poll_err(P, m, r):
        """The read failed (access revoked): the request's KV is not used."""
        m.env(m.cq_err[r], "read_failed")
        m.require(m.r_state[r] == Reader.READING, "reading")
        m.r_state[r] = Reader.FAILED
        m.cq_err[r] = False

    # ------------------------------------------------------------ transport
    @action("net", r="reader")
    def read_lands(P, m, r):
        """A read completes; it returns whatever the blocks hold now (or fails if revoked)."""
        m.env(m.rd_n[r] > 0, "read_in_flight")
        m.rd_n[r] = m.rd_n[r] - 1
        valid = m.all([m.blocks[()] == Blocks.HELD, m.epoch[()] == m.r_epoch[r]])
        if m.variant == "fenced":        # the key of freed blocks is invalid: the read fails
            m.cq_ok[r] = valid
            m.cq_err[r] = m.not_(valid)
        else:                            # the read returns whatever the (reused) blocks hold
            m.cq_ok[r] = True
            m.foreign[r] = m.any([m.foreign[r], m.not_(valid)])

    # ------------------------------------------------------------ properties
    @invariant(r="reader")
    def decode_reads_own_kv(P, m, r):
        """A read that decode accepts returned the bytes of its own request."""
        return m.implies(m.r_state[r] == Reader.DONE, m.not_(m.foreign[r]))

    @classmethod
    def quiescent(cls, m):
        """Nothing left to do is fine once the blocks are free."""
        return m.blocks[()] == Blocks.FREE


def checks() -> list:
    """Verdicts for the audit page: the lease as shipped is refuted, the fenced lease holds."""
    prop = "decode_reads_own_kv"
    return [
        check(NixlLease, prop, "lease", {"readers": 1}, expect="refuted", depth=8),
        check(NixlLease, prop, "fenced", {"readers": 1}, method="search"),
        check(NixlLease, prop, "fenced", {"readers": 2}, method="search"),
        check(NixlLease, "no_deadlock", "fenced", {"readers": 2}),
    ]
