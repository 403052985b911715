"""Loopback transport: immediate mode, the controllable wire, and a model-based test against it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvproof.runtime.transport import (
    LoopbackTransport, Status, TransportClosed, TransportError, loopback_pair, make_transport,
)


def test_immediate_mode_lands_and_completes_inside_post_write():
    a, b = loopback_pair()
    landed = []
    b.on_land = lambda *x: landed.append(x)
    dst = torch.zeros(32, dtype=torch.uint8)
    b.register(dst)
    wr = a.post_write(torch.full((8,), 7, dtype=torch.uint8), 0, 4, tag=(1, 2), imm=9)
    assert dst[4:12].tolist() == [7] * 8 and dst[:4].sum() == 0 and dst[12:].sum() == 0
    assert landed == [((1, 2), 0, 4, 8)]
    (c,) = a.poll()
    assert (c.wr_id, c.status, c.tag) == (wr, Status.OK, (1, 2))
    assert b.poll_recv()[0].imm == 9


def test_controllable_mode_lands_when_and_in_what_order_the_test_says():
    a, b = loopback_pair(controllable=True)
    dst = bytearray(8)
    b.register(dst)
    w1 = a.post_write(b"AAAA", 0, 0, tag=(1,))
    w2 = a.post_write(b"BBBB", 0, 2, tag=(2,))
    assert [p.wr_id for p in a.pending()] == [w1, w2] and dst == bytearray(8) and a.poll() == []
    a.land(w2)
    assert dst == b"\0\0BBBB\0\0"
    a.land(w1, complete=False)  # landed, ACK still on the way: the older write overwrote the newer
    assert dst == b"AAAABB\0\0"
    assert [c.wr_id for c in a.poll()] == [w2] and a.outstanding() == 1 and a.pending()[0].landed
    with pytest.raises(ValueError, match=f"wr_id={w1} already landed"):
        a.land(w1)
    assert a.complete(w1).ok and a.outstanding() == 0


def test_land_next_land_all_and_fail():
    a, b = loopback_pair(controllable=True)
    dst = bytearray(4)
    b.register(dst)
    ws = [a.post_write(bytes([i]), 0, i) for i in range(4)]
    assert a.land_next().wr_id == ws[0]
    c = a.fail(ws[1], "lost in flight")
    assert c.status is Status.ERROR and c.error == "lost in flight"
    assert [c.wr_id for c in a.land_all()] == ws[2:]
    assert dst == b"\x00\x00\x02\x03"
    with pytest.raises(ValueError, match="no write waiting"):
        a.land_next()
    with pytest.raises(KeyError, match="wr_id=99"):
        a.land(99)


def test_receiver_close_and_drain_refuses_later_landings():
    a, b = loopback_pair(controllable=True)
    dst = bytearray(4)
    b.register(dst)
    w = a.post_write(b"late", 0, 0)
    b.close_and_drain()
    assert dst == bytearray(4)
    (c,) = a.poll()
    assert c.wr_id == w and c.status is Status.ERROR and "peer closed" in c.error
    assert a.is_dead
    with pytest.raises(TransportClosed, match="dead connection"):
        a.post_write(b"x", 0, 0)


def test_bad_region_or_bounds_breaks_both_ends_with_a_named_error():
    a, b = loopback_pair()
    b.register(bytearray(4))
    a.post_write(b"12345", 0, 0)
    (c,) = a.poll()
    assert c.status is Status.ERROR and "ends at 5, beyond region 0 of 4 bytes" in c.error
    assert a.is_dead and b.is_dead
    a2, b2 = loopback_pair()
    a2.post_write(b"1", 3, 0)
    assert "region=3 is not registered" in a2.poll()[0].error


def test_kill_fails_waiting_writes_and_factory():
    a, b = loopback_pair(controllable=True)
    b.register(bytearray(4))
    a.post_write(b"x", 0, 0)
    a.kill("test kill")
    assert a.poll()[0].error == "connection dead: test kill" and b.dead_reason == "test kill"
    solo = make_transport("loopback", controllable=True)
    assert isinstance(solo, LoopbackTransport)
    with pytest.raises(TransportClosed, match="no peer"):
        solo.post_write(b"x", 0, 0)
    with pytest.raises(TransportError, match="already connected"):
        solo.connect(a)


REGION = 16


class LoopbackModel(RuleBasedStateMachine):
    """The controllable loopback against a trivial model: memory = writes applied in landing order."""

    @initialize()
    def setup(self) -> None:
        self.a, self.b = loopback_pair(controllable=True)
        self.mem = bytearray(REGION)
        self.b.register(self.mem)
        self.model = bytearray(REGION)
        self.waiting: dict[int, tuple[int, bytes]] = {}  # wr_id -> (offset, data), not landed
        self.landed_unacked: set[int] = set()
        self.completed: dict[int, Status] = {}

    @rule(offset=st.integers(0, REGION - 1), data=st.binary(min_size=0, max_size=REGION))
    def post(self, offset: int, data: bytes) -> None:
        data = data[: REGION - offset]
        wr = self.a.post_write(data, 0, offset, tag=(offset, len(data)))
        self.waiting[wr] = (offset, data)

    @precondition(lambda self: bool(self.waiting))
    @rule(pick=st.integers(0, 10**6), ack=st.booleans())
    def land(self, pick: int, ack: bool) -> None:
        wr = sorted(self.waiting)[pick % len(self.waiting)]
        offset, data = self.waiting.pop(wr)
        self.a.land(wr, complete=ack)
        self.model[offset : offset + len(data)] = data
        if ack:
            self.completed[wr] = Status.OK
        else:
            self.landed_unacked.add(wr)

    @precondition(lambda self: bool(self.landed_unacked))
    @rule()
    def ack(self) -> None:
        wr = min(self.landed_unacked)
        self.landed_unacked.discard(wr)
        self.a.complete(wr)
        self.completed[wr] = Status.OK

    @precondition(lambda self: bool(self.waiting))
    @rule()
    def fail_oldest(self) -> None:
        wr = min(self.waiting)
        del self.waiting[wr]
        self.a.fail(wr)
        self.completed[wr] = Status.ERROR

    @invariant()
    def memory_matches_model(self) -> None:
        assert self.mem == self.model

    @invariant()
    def completions_match(self) -> None:
        for c in self.a.poll():
            assert self.completed.pop(c.wr_id) is c.status
        assert not self.completed
        assert self.a.outstanding() == len(self.waiting) + len(self.landed_unacked)


TestLoopbackModel = LoopbackModel.TestCase
TestLoopbackModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_post_write_argument_errors_are_raised_at_post_time():
    a, b = loopback_pair(controllable=True)
    with pytest.raises(ValueError, match="offset=-1"):
        a.post_write(b"x", 0, -1)
    with pytest.raises(ValueError, match="region=None"):
        a.post_write(b"x", None, 0)
    with pytest.raises(ValueError, match="length=2"):
        a.post_write(b"x", 0, 0, 2)
    assert a.pending() == [] and not a.is_dead
