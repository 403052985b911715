"""Decode and prefill logic in one process over controllable loopback: aborts, timeouts, peer death.

The test plays network: it decides when each control message is delivered and
when each KV write lands, so every abort point and the slot-reuse race are
reproduced deterministically.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvproof.runtime.pd.decode_worker import DecodeWorker
from kvproof.runtime.pd.kv_pool import POOL_REGION, KVPool
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import Message, Result
from kvproof.runtime.pd.prefill_worker import PrefillRank
from kvproof.runtime.transport import loopback_pair
from kvproof.spec.kv_slot import DState


class Rig:
    """A decode worker and its prefill ranks; messages and writes move only when the test says so."""

    def __init__(self, variant: str = "fixed", slots: int = 2, writers: int = 2, **kw: Any) -> None:
        self.cfg = PDConfig(variant=variant, slots=slots, writers=writers, layers=2, tokens_per_slot=4,
                            bytes_per_token=16 * writers, delay_ms=None, transport="loopback", **kw)
        self.now = 0.0
        self.results: dict[int, Result] = {}
        self.to_prefill: list[list[Message]] = [[] for _ in range(writers)]
        self.to_decode: list[list[Message]] = [[] for _ in range(writers)]
        self.pool = KVPool(self.cfg)
        self.decode = DecodeWorker(self.cfg, self.pool, lambda w, m: self.to_prefill[w].append(m),
                                   lambda r: self.results.__setitem__(r.rid, r), clock=lambda: self.now)
        self.links = [loopback_pair(controllable=True) for _ in range(writers)]
        self.ranks = []
        for w, (pend, dend) in enumerate(self.links):
            dend.register(self.pool.buffer, region_id=POOL_REGION)
            dend.on_land = self.decode.on_land
            self.ranks.append(PrefillRank(self.cfg, w, pend, lambda m, w=w: self.to_decode[w].append(m)))

    def deliver(self) -> None:
        """Deliver every queued control message (both directions) and let prefill post."""
        while any(self.to_prefill) or any(self.to_decode):
            for w in range(self.cfg.writers):
                msgs, self.to_prefill[w] = self.to_prefill[w], []
                for m in msgs:
                    self.ranks[w].on_message(m)
                self.ranks[w].pump()
                msgs, self.to_decode[w] = self.to_decode[w], []
                for m in msgs:
                    self.decode.on_message(w, m)
        for r in self.ranks:
            r.pump()

    def complete(self) -> None:
        """Hand every completion to its rank."""
        for w, (pend, _) in enumerate(self.links):
            for c in pend.poll():
                self.ranks[w].on_completion(c)

    def land(self, w: int, which: Any = None) -> int:
        """Land (and complete) rank w's pending writes matching `which(tag)`; returns how many."""
        pend = self.links[w][0]
        todo = [p for p in pend.pending() if not p.landed and (which is None or which(p.tag))]
        for p in todo:
            pend.land(p.wr_id)
        return len(todo)

    def settle(self) -> None:
        """Run the network to quiescence: deliver, land, complete, repeat."""
        for _ in range(100):
            self.deliver()
            landed = sum(self.land(w) for w in range(self.cfg.writers) if not self.links[w][0].is_dead)
            self.complete()
            self.deliver()
            if not landed and not any(self.to_prefill) and not any(self.to_decode):
                return
        raise AssertionError("rig did not settle")

    def free(self) -> int:
        """Slots in the free pool, per the spec instance."""
        return self.decode.inst.count("d_state", DState.FREE)


def test_happy_path_serves_bit_exact() -> None:
    """Requests flow alloc -> push -> done -> decode read -> finish; every slot comes back."""
    rig = Rig()
    for rid in range(5):
        rig.decode.submit(rid, 1 + rid % 4)
    rig.settle()
    assert {r.status for r in rig.results.values()} == {"served"} and len(rig.results) == 5
    assert rig.free() == 2 and rig.decode.idle()


def test_abort_before_a_slot() -> None:
    """A request still queued for a slot is dropped without any spec action."""
    rig = Rig(slots=1)
    rig.decode.submit(1, 2)
    rig.decode.submit(2, 2)
    fired = rig.decode.stats["fired"]
    rig.decode.abort(2)
    assert rig.results[2].status == "aborted" and "before a slot" in rig.results[2].reason
    assert rig.decode.stats["fired"] == fired
    rig.settle()
    assert rig.results[1].status == "served" and rig.free() == 1


@pytest.mark.parametrize("variant", ["fixed", "unfixed"])
def test_abort_before_prefill_heard(variant: str) -> None:
    """Abort while Alloc is still on the wire: the rank answers safe at once (p_on_alloc then p_on_abort)."""
    rig = Rig(variant)
    rig.decode.submit(1, 3)
    rig.decode.abort(1)
    assert rig.results[1].status == "aborted"
    assert rig.free() == (1 if variant == "fixed" else 2)
    rig.settle()
    assert rig.free() == 2 and rig.decode.idle()


def test_abort_with_writes_in_flight_waits_for_safe() -> None:
    """Fixed: an aborted slot with writes in flight is not reused until they land and every rank is safe."""
    rig = Rig("fixed", slots=1)
    rig.decode.submit(1, 4)
    rig.deliver()                                   # both ranks posted layer 0 and 1
    assert all(len(p.pending()) == 2 for p, _ in rig.links)
    rig.decode.abort(1)
    rig.decode.submit(2, 4)                         # must wait: the only slot is aborting
    rig.deliver()
    assert rig.decode.inst.get("d_state", 0) == DState.ABORTING and 2 not in rig.results
    assert rig.ranks[0].stats["fired"] and rig.decode.stats.get("slots_reclaimed", 0) == 0
    rig.land(0)
    rig.complete()
    rig.deliver()
    assert rig.decode.inst.get("d_state", 0) == DState.ABORTING     # rank 1 still has writes in flight
    rig.settle()
    assert rig.results[2].status == "served" and rig.results[2].bad_bytes == 0
    assert rig.decode.stats["slots_reclaimed"] == 1 and rig.free() == 1


@pytest.mark.parametrize("variant,corrupt", [("unfixed", True), ("fixed", False)])
def test_slot_reuse_race(variant: str, corrupt: bool) -> None:
    """The post-mortem race: a stale write of an aborted request lands after the slot's next owner's KV."""
    rig = Rig(variant, slots=1, writers=1)
    rig.decode.submit(1, 4)
    rig.deliver()                                   # rank 0 posted both layers of request 1 (epoch 1)
    rig.decode.abort(1)
    rig.decode.submit(2, 4)
    rig.deliver()
    # the new owner's writes (epoch 2) land first, the stale epoch-1 writes after them, before decode reads
    assert rig.land(0, lambda tag: tag[2] == 2) == (2 if corrupt else 0)
    rig.land(0, lambda tag: tag[2] == 1)
    rig.complete()
    rig.settle()
    assert rig.results[2].status == ("corrupt" if corrupt else "served")
    assert (rig.results[2].bad_bytes > 0) == corrupt
    assert (rig.decode.foreign_slots == {0}) == corrupt
    assert rig.free() == 1


def test_abort_while_decoding() -> None:
    """Abort of a READY request (decode_ms > 0): every rank is done, so safe comes at once."""
    rig = Rig("fixed", decode_ms=50.0)
    rig.decode.submit(1, 2)
    rig.settle()
    s = next(iter(rig.decode.by_slot))
    assert rig.decode.inst.get("d_state", s) == DState.READY
    rig.decode.abort(1)
    rig.settle()
    assert rig.results[1].status == "aborted" and rig.free() == 2


def test_abort_after_one_rank_done() -> None:
    """Abort when rank 0 reported done and rank 1 still has writes in flight."""
    rig = Rig("fixed")
    rig.decode.submit(1, 4)
    rig.deliver()
    rig.land(0)
    rig.complete()
    rig.deliver()
    assert rig.decode.inst.get("done_from", 1, 0) or rig.decode.inst.get("done_from", 0, 0)
    rig.decode.abort(1)
    rig.settle()
    assert rig.results[1].status == "aborted" and rig.free() == 2 and rig.decode.idle()


def test_decode_timeout_then_late_writes() -> None:
    """A transfer timeout fails the request; the slot is reclaimed only after the late writes complete."""
    rig = Rig("fixed", slots=1, transfer_timeout_s=1.0)
    rig.decode.submit(1, 4)
    rig.deliver()
    rig.now = 2.0
    rig.decode.tick()
    assert rig.results[1].status == "failed" and "transfer timeout" in rig.results[1].reason
    rig.deliver()
    assert rig.decode.inst.get("d_state", 0) == DState.ABORTING
    rig.settle()
    assert rig.free() == 1 and rig.decode.reclaim_latency_s == [0.0]


def test_rank_death_fails_requests_and_loses_no_slot() -> None:
    """A rank dies with writes in flight: after drain its requests fail with the reason; every slot returns."""
    rig = Rig("fixed", slots=2)
    rig.decode.submit(1, 4)
    rig.decode.submit(2, 4)
    rig.deliver()
    pend, dend = rig.links[0]
    pend.kill("prefill rank 0 crashed")
    dend.close_and_drain()
    rig.decode.rank_dead(0, dend.dead_reason or "dead")
    for rid in (1, 2):
        assert rig.results[rid].status == "failed" and "prefill rank 0 dead" in rig.results[rid].reason
    rig.settle()
    assert rig.free() == 2
    rig.decode.submit(3, 1)
    assert rig.results[3].status == "failed"
    with pytest.raises(ValueError, match="not declared dead"):
        rig.decode.peer_dead(0, 1)


def test_stale_and_duplicate_messages_are_ignored() -> None:
    """A duplicate Done and a Safe for a slot not aborting change nothing and are counted."""
    rig = Rig("fixed", slots=1, writers=1)
    rig.decode.submit(1, 1)
    rig.deliver()
    rig.land(0)
    rig.complete()
    done = list(rig.to_decode[0])
    rig.deliver()
    for m in done:
        rig.decode.on_message(0, m)
    assert rig.decode.stats["ignored_on_done"] == 1
    assert rig.results[1].status == "served" and rig.free() == 1
