"""SGLang PD: deferred decode-side KV release on abort (PR #35049), and the gaps PR #38961 names.

Source (public descriptions): sgl-project/sglang PR #35049 "Deferred decode-side KV
release for aborts mid-transfer" (env-gated by SGLANG_DISAGGREGATION_DEFERRED_DECODE_KV_RELEASE):
on abort, decode keeps an in-flight request's KV pages until the prefill confirms
its transfer drained (ABORT_ACK) or a timeout fires. PR #38961 (open) reviews it:
the prefill's ack target can be dropped before the drain so "the decode waits the
full timeout and releases anyway. The timeout path is the common path, and it is
itself a use-after-free window", and "one ack target per room": with several ranks
sending to one room, only one ever gets an ack.

Model: one decode room (its KV pages) written by `ranks` prefill ranks with
one-sided writes (Mooncake / RDMA) that land later. Decode allocates the room for a
request (a new epoch) and may abort it; the room is released (pages back to the
pool) by `release` or by `timeout_release`. Each rank posts chunks while sending,
stops posting on ABORT, and answers ABORT_ACK once every write it posted has
completed. Channels delay, duplicate and reorder; every message carries the epoch.

Variants:
- `one_ack`: decode releases on the first ABORT_ACK of the room (one ack target per room);
  its timeout is as safe as `fixed`'s, to isolate the ack-counting gap.
- `timeout`: decode waits for every rank's ack, but a timeout releases the pages anyway.
- `fixed`: every rank's ack, and a timeout releases only a rank whose connection the
  transport has closed and drained (no write of it can land any more).

Run: `kvproof prove docs/audits/sglang_abort_ack.py`.
"""
from __future__ import annotations

import enum

from kvproof.spec import Bool, Channel, EnumT, Nat, Protocol, Var, action, invariant
from kvproof.verify import check


class Room(enum.IntEnum):
    """Decode-side state of the room's KV pages."""

    FREE = 0        # pages in the free pool
    WAIT = 1        # allocated to a request; prefill ranks write into them
    HELD = 2        # request aborted; pages held until it is safe to release


class Rank(enum.IntEnum):
    """A prefill rank's sender state for the room."""

    IDLE = 0
    SENDING = 1     # posting chunks for p_epoch
    ABORTED = 2     # ABORT seen: posts nothing more for p_epoch
    ACKED = 3       # ABORT_ACK sent for p_epoch


class AbortAck(Protocol):
    """Deferred KV release with ABORT_ACK, one room, several prefill ranks."""

    name = "sglang_abort_ack"
    variants = ("fixed", "one_ack", "timeout")
    actors = ("decode", "prefill")
    indices = {"rank": "ranks"}
    bounds = {"ranks": 2, "max_epoch": 2, "max_chunks": 1}
    sanity_bounds = {"ranks": 1}
    vars = {
        "room": Var(EnumT(Room), (), "decode", doc="decode-side page state"),
        "epoch": Var(Nat("max_epoch"), (), "decode", doc="request generation of the room"),
        "acked": Var(Bool(), ("rank",), "decode", doc="ABORT_ACK received from this rank"),
        "gone": Var(Bool(), ("rank",), "decode", doc="this rank's connection is known drained"),
        "p_state": Var(EnumT(Rank), ("rank",), "prefill"),
        "p_epoch": Var(Nat(), ("rank",), "prefill", doc="epoch the rank serves"),
        "posted": Var(Nat("max_chunks"), ("rank",), "prefill", doc="chunks posted this epoch"),
        "completed": Var(Nat(), ("rank",), "prefill", doc="completions polled this epoch"),
        "fl_n": Var(Nat(), ("rank",), "net", doc="writes of the rank's epoch in flight"),
        "fl_old": Var(Nat(), ("rank",), "net", doc="writes of older epochs in flight"),
        "cq_n": Var(Nat(), ("rank",), "net", doc="completions not yet polled"),
        "dead": Var(Bool(), ("rank",), "net", doc="connection closed and drained"),
        "corrupt": Var(Bool(), (), "ghost", doc="a write landed in pages not held for its request"),
    }
    channels = {
        "transfer": Channel("decode", "prefill", ("rank",), "room allocated: KV destination"),
        "abort": Channel("decode", "prefill", ("rank",), "request aborted"),
        "ack": Channel("prefill", "decode", ("rank",), "ABORT_ACK: transfer drained"),
    }

    # ------------------------------------------------------------ decode
    @action("decode")
    def alloc(P, m):
        """Give the room's pages to a new request and tell every rank where to write."""
        m.require(m.room[()] == Room.FREE, "room_free")
        m.room[()] = Room.WAIT
        m.epoch[()] = m.epoch[()] + 1
        for r in m.range("rank"):
            m.acked[r] = False
            m.send("transfer", (r,), m.epoch[()] + 1)

    @action("decode")
    def abort(P, m):
        """The client aborts mid-transfer: hold the pages, send ABORT to every rank."""
        m.require(m.room[()] == Room.WAIT, "transferring")
        m.room[()] = Room.HELD
        for r in m.range("rank"):
            m.send("abort", (r,), m.epoch[()])

    @action("decode", receives="ack", r="rank", e="data:max_epoch")
    def on_ack(P, m, r, e):
        """An ABORT_ACK for the current request."""
        m.require(m.room[()] == Room.HELD, "held")
        m.require(e == m.epoch[()], "ack_epoch_current")
        m.acked[r] = True

    @action("decode", r="rank")
    def on_drained(P, m, r):
        """The transport closed and drained a rank's connection: none of its writes can land."""
        m.env(m.dead[r], "connection_drained")
        m.gone[r] = True

    @action("decode")
    def release(P, m):
        """Return the held pages to the pool."""
        m.require(m.room[()] == Room.HELD, "held")
        if m.variant == "one_ack":
            m.require(m.any(m.acked[r] for r in m.range("rank")), "some_rank_acked")
        else:
            m.require(m.all(m.acked[r] for r in m.range("rank")), "every_rank_acked")
        m.room[()] = Room.FREE

    @action("decode")
    def timeout_release(P, m):
        """The ack wait timed out: release anyway (`timeout`), or only ranks known drained."""
        m.require(m.room[()] == Room.HELD, "held")
        if m.variant != "timeout":
            m.require(m.all(m.any([m.acked[r], m.gone[r]]) for r in m.range("rank")),
                      "unacked_ranks_drained")
        m.room[()] = Room.FREE

    # ------------------------------------------------------------ prefill
    @staticmethod
    def _switch(m, r, e, state):
        m.p_epoch[r] = e
        m.p_state[r] = state
        m.posted[r] = 0
        m.completed[r] = 0
        m.fl_old[r] = m.fl_old[r] + m.fl_n[r]
        m.fl_n[r] = 0
        m.cq_n[r] = 0

    @action("prefill", receives="transfer", r="rank", e="data:max_epoch")
    def p_on_transfer(P, m, r, e):
        """A rank learns the destination of a new request and starts sending."""
        m.env(m.not_(m.dead[r]), "rank_alive")
        m.require(e > m.p_epoch[r], "transfer_epoch_newer")
        P._switch(m, r, e, Rank.SENDING)

    @action("prefill", r="rank")
    def p_post(P, m, r):
        """Post the next chunk (batch_transfer): a write that lands later."""
        m.env(m.not_(m.dead[r]), "rank_alive")
        m.require(m.p_state[r] == Rank.SENDING, "no_post_after_abort")
        m.posted[r] = m.posted[r] + 1
        m.fl_n[r] = m.fl_n[r] + 1

    @action("prefill", r="rank")
    def p_complete(P, m, r):
        """Poll one completion of the current epoch's writes."""
        m.env(m.all([m.not_(m.dead[r]), m.cq_n[r] > 0]), "completion_available")
        m.completed[r] = m.completed[r] + 1
        m.cq_n[r] = m.cq_n[r] - 1

    @action("prefill", receives="abort", r="rank", e="data:max_epoch")
    def p_on_abort(P, m, r, e):
        """ABORT for the request being sent: post nothing more."""
        m.env(m.not_(m.dead[r]), "rank_alive")
        m.require(e == m.p_epoch[r], "abort_epoch_current")
        m.require(m.p_state[r] == Rank.SENDING, "sending")
        m.p_state[r] = Rank.ABORTED

    @action("prefill", receives="abort", r="rank", e="data:max_epoch")
    def p_on_abort_unseen(P, m, r, e):
        """ABORT for a request this rank never started: nothing was posted, ack at once."""
        m.env(m.not_(m.dead[r]), "rank_alive")
        m.require(e > m.p_epoch[r], "abort_epoch_newer")
        P._switch(m, r, e, Rank.ACKED)
        m.send("ack", (r,), e)

    @action("prefill", r="rank")
    def p_ack_drained(P, m, r):
        """Every posted write of the aborted request completed: send ABORT_ACK."""
        m.env(m.not_(m.dead[r]), "rank_alive")
        m.require(m.p_state[r] == Rank.ABORTED, "aborted")
        m.require(m.completed[r] == m.posted[r], "all_writes_completed")
        m.p_state[r] = Rank.ACKED
        m.send("ack", (r,), m.p_epoch[r])

    # ------------------------------------------------------------ transport
    @action("net", r="rank", e="data:max_epoch")
    def land(P, m, r, e):
        """A write of epoch e lands in the room's pages; the NIC does not look at decode's state."""
        cur = e == m.p_epoch[r]
        m.env(m.ite(cur, m.fl_n[r] > 0, m.all([e < m.p_epoch[r], m.fl_old[r] > 0])), "write_in_flight")
        m.fl_n[r] = m.fl_n[r] - m.ite(cur, 1, 0)
        m.fl_old[r] = m.fl_old[r] - m.ite(cur, 0, 1)
        m.cq_n[r] = m.cq_n[r] + m.ite(cur, 1, 0)
        m.corrupt[()] = m.any([m.corrupt[()], e != m.epoch[()], m.room[()] == Room.FREE])

    @action("net", r="rank")
    def kill(P, m, r):
        """A rank's connection dies; the transport drains it (no write of it lands afterwards)."""
        m.env(m.not_(m.dead[r]), "rank_alive")
        m.dead[r] = True
        m.fl_n[r] = 0
        m.fl_old[r] = 0
        m.cq_n[r] = 0

    # ------------------------------------------------------------ property
    @invariant
    def no_write_after_release(P, m):
        """No prefill write lands in pages released to the pool or reused by a later request."""
        return m.not_(m.corrupt[()])

    @classmethod
    def quiescent(cls, m):
        """Nothing left to do is fine once the pages are back in the pool."""
        return m.room[()] == Room.FREE


def checks() -> list:
    """Verdicts for the audit page: the fixed design holds; both shipped gaps are refuted."""
    prop = "no_write_after_release"
    return [
        check(AbortAck, prop, "fixed", {"ranks": 1}, method="search"),
        check(AbortAck, prop, "fixed", {"ranks": 2}, method="search"),
        check(AbortAck, "no_deadlock", "fixed", {"ranks": 2}),
        check(AbortAck, prop, "one_ack", {"ranks": 2}, expect="refuted", depth=10),
        check(AbortAck, prop, "one_ack", {"ranks": 1}, method="search"),
        check(AbortAck, prop, "timeout", {"ranks": 1}, expect="refuted", depth=10),
    ]
