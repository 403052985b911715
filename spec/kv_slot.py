"""The PD-disaggregation KV slot lifecycle, with the abort-safe recycling handshake.

Source: the GLM-5 production post-mortem (KV slot reuse race). The decode side
owns a pool of KV slots; for each request it allocates a slot, tells every
prefill rank (tensor/context-parallel writers of disjoint parts of the slot)
the slot and its epoch (generation), and the prefill ranks push the KV with
chunked one-sided writes (RDMA WRITE) that land later. When a request is
terminated, the pre-fix decode freed the slot at once (variant `unfixed`); a
prefill write still in flight then landed in the slot's next owner: garbled
output. The fix (variant `fixed`): decode notifies every prefill rank; a rank
answers "safe to recycle" only if no write has started or all started writes
have completed, and posts nothing for that epoch afterwards; decode reclaims
the slot only with a safe answer from every rank, or once the transport
declares the rank's connection dead *and drained* (a timeout alone proves
nothing about writes still in flight).

Actors: `decode` (scheduler and slot table), `prefill` (one per writer rank,
per slot), `net` (the transport: writes land, completions appear, connections
die). Every message and write carries the slot's epoch; channels delay,
duplicate and reorder messages, so every receiver checks the epoch.

Modelling choice: in-flight writes of one (slot, writer) are counted in two
buckets, those of the prefill rank's current epoch (`fl_n`) and older ones
(`fl_old`). Decode's epoch is never behind a prefill rank's, so an older write
is always foreign to the slot's current owner: the counting is exact for the
properties below while keeping the state finite per epoch.
"""
from __future__ import annotations

import enum

from kvproof.spec.core import Bool, Channel, EnumT, Nat, Protocol, Var, action, invariant, liveness


class DState(enum.IntEnum):
    """Decode-side state of a KV slot."""

    FREE = 0        # in the free pool
    WAIT = 1        # allocated to a request; waiting for its KV from every prefill rank
    READY = 2       # all KV landed; decode reads it
    ABORTING = 3    # request terminated; waiting until no write can land any more


class PState(enum.IntEnum):
    """Prefill-rank state of its transfer into one decode slot."""

    IDLE = 0            # no transfer for this slot yet
    SENDING = 1         # posting chunked writes for epoch p_epoch
    DONE = 2            # every chunk posted and completed; 'done' sent
    ABORT_PENDING = 3   # abort received while writes were in flight; posts nothing more
    ABORTED = 4         # 'safe to recycle' answered for p_epoch


class KVSlot(Protocol):
    """The KV slot lifecycle between decode, prefill ranks and the transport."""

    name = "kv_slot"
    variants = ("fixed", "unfixed")
    actors = ("decode", "prefill")
    indices = {"slot": "slots", "writer": "writers"}
    bounds = {"slots": 1, "writers": 2, "max_epoch": 2, "max_chunks": 2}
    # Two requests per slot (the reuse race needs a second epoch), one chunk, one writer: two
    # slots are then 135k states (68k up to slot symmetry); two writers at two slots are 5.7M.
    search_bounds = {"writers": 1, "max_epoch": 2, "max_chunks": 1}
    vars = {
        # decode scheduler / slot table
        "d_state": Var(EnumT(DState), ("slot",), "decode", doc="decode-side slot state"),
        "epoch": Var(Nat("max_epoch"), ("slot",), "decode", doc="generation of the slot's owner"),
        "done_from": Var(Bool(), ("slot", "writer"), "decode", doc="transfer done from this rank"),
        "safe_from": Var(Bool(), ("slot", "writer"), "decode", doc="safe-to-recycle from this rank"),
        # prefill ranks
        "p_state": Var(EnumT(PState), ("slot", "writer"), "prefill"),
        "p_epoch": Var(Nat(), ("slot", "writer"), "prefill", doc="epoch the rank is serving"),
        "posted": Var(Nat("max_chunks"), ("slot", "writer"), "prefill", doc="writes posted this epoch"),
        "completed": Var(Nat(), ("slot", "writer"), "prefill", doc="write completions polled"),
        # transport
        "fl_n": Var(Nat(), ("slot", "writer"), "net", doc="in-flight writes of the rank's epoch"),
        "fl_old": Var(Nat(), ("slot", "writer"), "net", doc="in-flight writes of older epochs"),
        "cq_n": Var(Nat(), ("slot", "writer"), "net", doc="completions not yet polled"),
        "dead": Var(Bool(), ("writer",), "net", doc="connection closed and drained"),
        # history (ghost) variables for the properties
        "corrupt": Var(Bool(), ("slot",), "ghost", doc="a write landed in another request's slot"),
        "into_free": Var(Bool(), ("slot",), "ghost", doc="a write landed in a free slot"),
        "owners": Var(Nat(), ("slot",), "ghost", doc="requests holding the slot"),
    }
    channels = {
        "alloc": Channel("decode", "prefill", ("slot", "writer"), "slot allocated for a request"),
        "abort": Channel("decode", "prefill", ("slot", "writer"), "request terminated"),
        "done": Channel("prefill", "decode", ("slot", "writer"), "every chunk landed"),
        "safe": Channel("prefill", "decode", ("slot", "writer"), "safe to recycle"),
    }

    # ------------------------------------------------------------ decode
    @action("decode", s="slot")
    def alloc(P, m, s):
        """Give a free slot to a new request (a fresh epoch) and tell every prefill rank."""
        m.require(m.d_state[s] == DState.FREE, "slot_free")
        e = m.epoch[s] + 1
        m.d_state[s] = DState.WAIT
        m.epoch[s] = e
        m.owners[s] = m.owners[s] + 1
        for w in m.range("writer"):
            m.done_from[s, w] = False
            m.safe_from[s, w] = False
            m.send("alloc", (s, w), e)

    @action("decode", receives="done", s="slot", w="writer", e="data:max_epoch")
    def on_done(P, m, s, w, e):
        """A prefill rank reports its part of the slot transferred."""
        m.require(m.d_state[s] == DState.WAIT, "waiting_for_kv")
        m.require(e == m.epoch[s], "done_epoch_current")
        m.done_from[s, w] = True

    @action("decode", s="slot")
    def start_decode(P, m, s):
        """Every rank's KV landed: decode may read the slot."""
        m.require(m.d_state[s] == DState.WAIT, "waiting_for_kv")
        m.require(m.all(m.done_from[s, w] for w in m.range("writer")), "all_ranks_done")
        m.d_state[s] = DState.READY

    @action("decode", s="slot")
    def finish(P, m, s):
        """The request finished normally: nothing is in flight, free the slot."""
        m.require(m.d_state[s] == DState.READY, "decoding")
        m.d_state[s] = DState.FREE
        m.owners[s] = m.owners[s] - 1

    @staticmethod
    def _abort_slot(m, s):
        if m.variant == "unfixed":
            # Pre-fix behaviour: free the slot at once; prefill is told but not waited for.
            m.d_state[s] = DState.FREE
            m.owners[s] = m.owners[s] - 1
        else:
            m.d_state[s] = DState.ABORTING
        for w in m.range("writer"):
            m.send("abort", (s, w), m.epoch[s])

    @action("decode", s="slot")
    def abort(P, m, s):
        """Terminate the request (client abort, disconnect, anomaly) at any point."""
        m.require(m.any([m.d_state[s] == DState.WAIT, m.d_state[s] == DState.READY]), "slot_in_use")
        P._abort_slot(m, s)

    @action("decode", s="slot")
    def timeout(P, m, s):
        """The transfer took too long: terminate it. Proves nothing about writes in flight."""
        m.require(m.d_state[s] == DState.WAIT, "waiting_for_kv")
        P._abort_slot(m, s)

    @action("decode", receives="safe", s="slot", w="writer", e="data:max_epoch")
    def on_safe(P, m, s, w, e):
        """A prefill rank answers that no write of this epoch can land any more."""
        m.require(m.d_state[s] == DState.ABORTING, "aborting")
        m.require(e == m.epoch[s], "safe_epoch_current")
        m.safe_from[s, w] = True

    @action("decode", s="slot", w="writer")
    def on_peer_dead(P, m, s, w):
        """The connection to a rank was closed and drained: none of its writes can land."""
        m.env(m.dead[w], "connection_drained")
        m.require(m.d_state[s] == DState.ABORTING, "aborting")
        m.require(m.not_(m.safe_from[s, w]), "not_yet_safe")
        m.safe_from[s, w] = True

    @action("decode", s="slot")
    def reclaim(P, m, s):
        """Return an aborted slot to the free pool."""
        m.require(m.d_state[s] == DState.ABORTING, "aborting")
        m.require(m.all(m.safe_from[s, w] for w in m.range("writer")), "all_writers_safe")
        m.d_state[s] = DState.FREE
        m.owners[s] = m.owners[s] - 1

    # ------------------------------------------------------------ prefill
    @action("prefill", receives="alloc", s="slot", w="writer", e="data:max_epoch")
    def p_on_alloc(P, m, s, w, e):
        """A rank learns of a new request in slot s and starts its transfer."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        m.require(e > m.p_epoch[s, w], "alloc_epoch_newer")
        P._switch_epoch(m, s, w, e, PState.SENDING)

    @staticmethod
    def _switch_epoch(m, s, w, e, state):
        m.p_epoch[s, w] = e
        m.p_state[s, w] = state
        m.posted[s, w] = 0
        m.completed[s, w] = 0
        # Writes still in flight for the previous epoch stay in flight, now foreign.
        m.fl_old[s, w] = m.fl_old[s, w] + m.fl_n[s, w]
        m.fl_n[s, w] = 0
        m.cq_n[s, w] = 0

    @action("prefill", s="slot", w="writer")
    def p_post(P, m, s, w):
        """Post the next chunk as a one-sided write tagged with the epoch."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        m.require(m.p_state[s, w] == PState.SENDING, "no_post_after_abort")
        m.posted[s, w] = m.posted[s, w] + 1
        m.fl_n[s, w] = m.fl_n[s, w] + 1
        m.emit("post_write", slot=s, writer=w, epoch=m.p_epoch[s, w], chunk=m.posted[s, w])

    @action("prefill", s="slot", w="writer", e="data:max_epoch")
    def p_complete(P, m, s, w, e):
        """Poll one write completion (it has landed); completions of older epochs are ignored."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        cur = e == m.p_epoch[s, w]
        m.env(m.ite(cur, m.cq_n[s, w] > 0, e < m.p_epoch[s, w]), "completion_available")
        m.completed[s, w] = m.completed[s, w] + m.ite(cur, 1, 0)
        m.cq_n[s, w] = m.cq_n[s, w] - m.ite(cur, 1, 0)

    @action("prefill", s="slot", w="writer")
    def p_finish(P, m, s, w):
        """Every chunk posted has completed: report the transfer done."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        m.require(m.p_state[s, w] == PState.SENDING, "sending")
        m.require(m.completed[s, w] == m.posted[s, w], "done_only_when_all_landed")
        m.p_state[s, w] = PState.DONE
        m.send("done", (s, w), m.p_epoch[s, w])

    @action("prefill", receives="abort", s="slot", w="writer", e="data:max_epoch")
    def p_on_abort_unseen(P, m, s, w, e):
        """Abort for a request this rank never started: no write started, answer safe."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        m.require(e > m.p_epoch[s, w], "abort_epoch_newer")
        P._switch_epoch(m, s, w, e, PState.ABORTED)
        m.send("safe", (s, w), e)

    @action("prefill", receives="abort", s="slot", w="writer", e="data:max_epoch")
    def p_on_abort(P, m, s, w, e):
        """Abort with every started write completed: stop and answer safe."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        m.require(e == m.p_epoch[s, w], "abort_epoch_current")
        m.require(m.any([m.p_state[s, w] == PState.SENDING, m.p_state[s, w] == PState.DONE]),
                  "transfer_active")
        m.require(m.completed[s, w] == m.posted[s, w], "all_started_writes_completed")
        m.p_state[s, w] = PState.ABORTED
        m.send("safe", (s, w), e)

    @action("prefill", receives="abort", s="slot", w="writer", e="data:max_epoch")
    def p_on_abort_busy(P, m, s, w, e):
        """Abort while writes are in flight: post nothing more; answer once they complete."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        m.require(e == m.p_epoch[s, w], "abort_epoch_current")
        m.require(m.p_state[s, w] == PState.SENDING, "sending")
        m.require(m.completed[s, w] < m.posted[s, w], "writes_in_flight")
        m.p_state[s, w] = PState.ABORT_PENDING

    @action("prefill", s="slot", w="writer")
    def p_answer_safe(P, m, s, w):
        """The last started write of an aborted transfer completed: answer safe."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        m.require(m.p_state[s, w] == PState.ABORT_PENDING, "abort_pending")
        m.require(m.completed[s, w] == m.posted[s, w], "all_started_writes_completed")
        m.p_state[s, w] = PState.ABORTED
        m.send("safe", (s, w), m.p_epoch[s, w])

    # ------------------------------------------------------------ transport
    @action("net", s="slot", w="writer", e="data:max_epoch")
    def land(P, m, s, w, e):
        """A write tagged with epoch e lands in slot s; the NIC does not look at slot state."""
        cur = e == m.p_epoch[s, w]
        m.env(m.ite(cur, m.fl_n[s, w] > 0, m.all([e < m.p_epoch[s, w], m.fl_old[s, w] > 0])),
              "write_in_flight")
        m.fl_n[s, w] = m.fl_n[s, w] - m.ite(cur, 1, 0)
        m.fl_old[s, w] = m.fl_old[s, w] - m.ite(cur, 0, 1)
        m.cq_n[s, w] = m.cq_n[s, w] + m.ite(cur, 1, 0)
        m.corrupt[s] = m.any([m.corrupt[s], P.lands_in_other_owner(m, s, e)])
        m.into_free[s] = m.any([m.into_free[s], P.slot_free(m, s)])

    @action("net", w="writer")
    def kill(P, m, w):
        """A rank's connection dies (crash or link loss); the transport drains it."""
        m.env(m.not_(m.dead[w]), "rank_alive")
        m.dead[w] = True
        for s in m.range("slot"):
            m.fl_n[s, w] = 0        # drained: every write either landed before or never will
            m.fl_old[s, w] = 0

    # ------------------------------------------------------------ predicates
    # Conditions the runtime asks by name (Instance.holds) instead of restating them.
    @staticmethod
    def slot_free(m, s):
        """The slot is in the free pool."""
        return m.d_state[s] == DState.FREE

    @staticmethod
    def drained(m, w):
        """Rank w's connection is closed and drained: none of its writes can land any more."""
        return m.dead[w]

    @staticmethod
    def waiting_for_kv(m, s):
        """The slot is allocated and waits for KV from the prefill ranks."""
        return m.d_state[s] == DState.WAIT

    @staticmethod
    def lands_in_other_owner(m, s, e):
        """A write of epoch e landing now would hit another request's slot (ghost `corrupt`)."""
        return e != m.epoch[s]

    @staticmethod
    def lands_foreign(m, s, e):
        """A write of epoch e landing now is foreign: another owner's slot or a free one."""
        return m.any([KVSlot.lands_in_other_owner(m, s, e), KVSlot.slot_free(m, s)])

    # ------------------------------------------------------------ properties
    @invariant(s="slot")
    def no_cross_request_write(P, m, s):
        """No write ever lands in a slot whose current owner (epoch) is not the write's."""
        return m.not_(m.corrupt[s])

    @invariant(s="slot")
    def no_write_into_free_slot(P, m, s):
        """No write lands in a slot that is back in the free pool."""
        return m.not_(m.into_free[s])

    @invariant(s="slot")
    def no_read_before_landed(P, m, s):
        """Decode reads a slot only after every chunk of its epoch landed and none can follow."""
        return m.implies(m.d_state[s] == DState.READY, m.all(
            m.any([m.dead[w], m.all([m.p_epoch[s, w] == m.epoch[s], m.p_state[s, w] == PState.DONE,
                                     m.fl_n[s, w] == 0])])
            for w in m.range("writer")))

    @invariant(s="slot")
    def one_owner(P, m, s):
        """A slot is held by exactly one request unless free."""
        return m.owners[s] == m.ite(m.d_state[s] == DState.FREE, 0, 1)

    # Strengthening invariants: together with the properties they are inductive
    # for the fixed variant (checked by `kvproof prove`).
    @invariant(strengthening=True, s="slot", w="writer")
    def epochs_ordered(P, m, s, w):
        """A rank never runs ahead of decode; no message carries a future epoch."""
        return m.all([m.p_epoch[s, w] <= m.epoch[s]] +
                     [m.var(f"{c}.lat")[s, w] <= m.epoch[s] for c in P.channels])

    @invariant(strengthening=True, s="slot", w="writer")
    def rank_in_step(P, m, s, w):
        """A live rank is at decode's epoch, or one behind and finished while decode waits."""
        behind = m.all([m.p_epoch[s, w] + 1 == m.epoch[s], m.d_state[s] != DState.FREE,
                        m.any([m.p_state[s, w] == PState.DONE, m.p_state[s, w] == PState.ABORTED,
                               m.p_state[s, w] == PState.IDLE])])
        return m.implies(m.not_(m.dead[w]), m.any([m.p_epoch[s, w] == m.epoch[s], behind]))

    @invariant(strengthening=True, s="slot", w="writer")
    def writes_conserved(P, m, s, w):
        """Every posted write of the current epoch is in flight, unpolled or completed."""
        return m.implies(m.not_(m.dead[w]),
                         m.posted[s, w] == m.completed[s, w] + m.cq_n[s, w] + m.fl_n[s, w])

    @invariant(strengthening=True, s="slot", w="writer")
    def quiet_unless_owner(P, m, s, w):
        """A rank's writes can be in flight only for the slot's live owner."""
        live = m.all([m.p_epoch[s, w] == m.epoch[s], m.d_state[s] != DState.FREE])
        busy = m.any([m.fl_n[s, w] > 0, m.all([m.not_(m.dead[w]), m.any(
            [m.p_state[s, w] == PState.SENDING, m.p_state[s, w] == PState.ABORT_PENDING])])])
        return m.all([m.fl_old[s, w] == 0, m.implies(busy, live)])

    @invariant(strengthening=True, s="slot", w="writer")
    def answers_are_true(P, m, s, w):
        """'done' and 'safe' for the current epoch imply the rank really is quiet."""
        cur = m.epoch[s]
        quiet_done = m.all([m.p_epoch[s, w] == cur, m.fl_n[s, w] == 0, m.any(
            [m.p_state[s, w] == PState.DONE, m.p_state[s, w] == PState.ABORTED])])
        quiet_safe = m.all([m.p_epoch[s, w] == cur, m.fl_n[s, w] == 0,
                            m.p_state[s, w] == PState.ABORTED])
        done_msg = m.all([m.var("done.has")[s, w], m.var("done.lat")[s, w] == cur])
        safe_msg = m.all([m.var("safe.has")[s, w], m.var("safe.lat")[s, w] == cur])
        return m.all([
            m.implies(m.any([done_msg, m.done_from[s, w]]), m.any([m.dead[w], quiet_done])),
            m.implies(m.any([safe_msg, m.safe_from[s, w]]), m.any([m.dead[w], quiet_safe])),
            m.implies(m.d_state[s] == DState.FREE, m.any([m.dead[w], m.all(
                [m.p_epoch[s, w] == cur, m.fl_n[s, w] == 0, m.p_state[s, w] != PState.SENDING,
                 m.p_state[s, w] != PState.ABORT_PENDING])])),
            m.implies(m.dead[w], m.all([m.fl_n[s, w] == 0, m.fl_old[s, w] == 0])),
        ])

    @invariant(strengthening=True, s="slot", w="writer")
    def finished_means_quiet(P, m, s, w):
        """A rank that is done or aborted has every write completed and polled."""
        fin = m.any([m.p_state[s, w] == PState.DONE, m.p_state[s, w] == PState.ABORTED])
        return m.implies(m.all([fin, m.not_(m.dead[w])]), m.all([m.completed[s, w] == m.posted[s, w], m.fl_n[s, w] == 0,
                                     m.cq_n[s, w] == 0]))

    @invariant(strengthening=True, s="slot", w="writer")
    def aborted_only_when_terminated(P, m, s, w):
        """A rank aborted the current epoch only after decode terminated its request."""
        stopped = m.any([m.p_state[s, w] == PState.ABORTED, m.p_state[s, w] == PState.ABORT_PENDING])
        return m.implies(m.all([stopped, m.p_epoch[s, w] == m.epoch[s]]),
                         m.any([m.d_state[s] == DState.ABORTING, m.d_state[s] == DState.FREE]))

    @invariant(strengthening=True, s="slot", w="writer")
    def abort_only_when_terminated(P, m, s, w):
        """An abort for the current epoch exists only once decode terminated the request."""
        return m.implies(m.all([m.var("abort.has")[s, w], m.var("abort.lat")[s, w] == m.epoch[s]]),
                         m.any([m.d_state[s] == DState.ABORTING, m.d_state[s] == DState.FREE]))

    @classmethod
    def quiescent(cls, m):
        """Nothing left to do is fine once every slot is back in the free pool."""
        return m.all(m.d_state[s] == DState.FREE for s in m.range("slot"))

    # ------------------------------------------------------------ liveness
    def _aborting(P, m, s):
        return m.d_state[s] == DState.ABORTING

    def _reclaimed(P, m, s):
        return m.d_state[s] != DState.ABORTING

    @liveness("_aborting", "_reclaimed", s="slot")
    def aborted_slot_reclaimed(P):
        """Every aborted slot is eventually reclaimed (no leak, no deadlock) under fair scheduling."""
