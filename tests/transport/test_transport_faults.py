"""Fault injection: late-landing writes, reordering, writes landing after control messages, drops."""

from __future__ import annotations

import threading

import pytest

from kvproof.runtime.transport.control import Channel
from kvproof.runtime.transport import FaultConfig, Status, TcpListener, TcpTransport
from kvproof.runtime.transport.faults import FaultInjector

from .conftest import wait_until

pytestmark = pytest.mark.timeout(30)


def _landing_log(t: TcpTransport) -> list:
    log: list = []
    lock = threading.Lock()

    def hook(tag, region, offset, length):
        with lock:
            log.append(tag)

    t.on_land = hook
    return log


def test_delayed_writes_land_after_later_ones_within_a_connection():
    a, b = TcpTransport.pair(faults=FaultConfig(delay_ms=20, delay_dist="exponential", seed=3))
    try:
        log = _landing_log(b)
        dst = bytearray(64 * 40)
        b.register(dst)
        for i in range(40):
            a.post_write(bytes([i]) * 64, 0, 64 * i, tag=(i,))
        assert a.wait_idle(10)
        assert all(c.ok for c in a.poll())
        order = [t[0] for t in log]
        assert sorted(order) == list(range(40)) and order != list(range(40)), "expected reordering"
        assert dst == b"".join(bytes([i]) * 64 for i in range(40))
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_preserve_order_keeps_post_order_despite_delays():
    a, b = TcpTransport.pair(faults=FaultConfig(delay_ms=5, seed=3, preserve_order=True))
    try:
        log = _landing_log(b)
        b.register(bytearray(64))
        for i in range(30):
            a.post_write(bytes([i]), 0, i, tag=(i,))
        assert a.wait_idle(10)
        assert [t[0] for t in log] == list(range(30))
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_reordering_across_connections_last_write_wins_is_not_post_order():
    """A slow connection's write lands after a fast connection's later write to the same bytes."""
    with TcpListener() as lst:
        slow = TcpTransport.connect(lst.address, faults=FaultConfig(delay_ms=150, delay_dist="fixed"))
        slow_rx = lst.accept()
        fast = TcpTransport.connect(lst.address)
        fast_rx = lst.accept()
    dst = bytearray(16)
    # two connections into the same memory, as two prefill ranks writing one decode pool
    slow_rx.register(dst, region_id=0)
    fast_rx.register(memoryview(dst), region_id=0)
    try:
        slow.post_write(b"OLD-REQUEST-KV!!", 0, 0)
        fast.post_write(b"new-request-kv..", 0, 0)
        assert fast.poll(timeout=5)[0].ok
        assert dst == b"new-request-kv.."
        assert slow.poll(timeout=5)[0].ok
        assert dst == b"OLD-REQUEST-KV!!", "the stale write landed last and overwrote the new data"
    finally:
        for t in (slow, slow_rx, fast, fast_rx):
            t.close_and_drain()


def test_write_lands_after_a_control_message_sent_later():
    """The race under study: decode learns 'done' on the channel before the KV bytes arrive."""
    a, b = TcpTransport.pair(faults=FaultConfig(delay_ms=200, delay_dist="fixed"))
    ca, cb = Channel.pair()
    try:
        dst = bytearray(8)
        b.register(dst)
        a.post_write(b"KVKVKVKV", 0, 0, tag=(5, 1, 0))
        ca.send({"type": "transfer_done", "slot": 5})
        assert cb.recv(timeout=5) == {"type": "transfer_done", "slot": 5}
        assert dst == bytearray(8), "the write must still be in flight when the message arrives"
        wait_until(lambda: dst == b"KVKVKVKV", what="late landing")
    finally:
        ca.close()
        cb.close()
        a.close_and_drain()
        b.close_and_drain()


def test_drop_after_n_writes():
    a, b = TcpTransport.pair(faults=FaultConfig(drop_after_writes=3))
    try:
        dst = bytearray(24)
        b.register(dst)
        wr = [a.post_write(bytes([i + 1]) * 4, 0, 4 * i) for i in range(6)]
        wait_until(lambda: a.outstanding() == 0, what="all completions")
        done = {c.wr_id: c for c in a.poll()}
        assert [done[w].status for w in wr[3:]] == [Status.ERROR] * 3
        assert "dropped by fault injection after 3 writes" in a.dead_reason
        wait_until(lambda: b.is_dead, what="peer sees the drop")
        # the first three went on the wire and landed (even if their ACKs were lost); the rest never did
        assert dst == b"\x01" * 4 + b"\x02" * 4 + b"\x03" * 4 + bytes(12)
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_drop_probability_one_drops_the_first_write():
    a, b = TcpTransport.pair(faults=FaultConfig(drop_prob=1.0, seed=0))
    try:
        b.register(bytearray(8))
        a.post_write(b"x", 0, 0)
        (c,) = a.poll(timeout=5)
        assert c.status is Status.ERROR and "dropped by fault injection after 0 writes" in c.error
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_fault_config_validation_and_sampling():
    with pytest.raises(ValueError, match="delay_prob=1.5"):
        FaultConfig(delay_ms=1, delay_prob=1.5)
    with pytest.raises(ValueError, match="delay_dist='gauss'"):
        FaultConfig(delay_ms=1, delay_dist="gauss")
    with pytest.raises(ValueError, match="drop_after_writes=-1"):
        FaultConfig(drop_after_writes=-1)
    assert not FaultConfig().active
    inj = FaultInjector(FaultConfig(delay_ms=10, delay_dist="uniform", seed=1))
    delays = [inj.due_time(100.0) - 100.0 for _ in range(500)]
    assert 0 <= min(delays) and max(delays) <= 0.02 and 0.008 < sum(delays) / 500 < 0.012
    never = FaultInjector(FaultConfig(delay_ms=10, delay_prob=0.0))
    assert never.due_time(5.0) == 5.0
