"""Mooncake transport: writes land byte-exact through the Transfer Engine, in the TCP transport's
frames; bytes a foreign engine puts into the staging ring never land (MAC); out-of-region writes
are refused alone; faults (delays, drops) behave as on TCP."""
from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest

from kvproof.runtime.transport import (
    FaultConfig, Status, TcpListener, TransportClosed, TransportUnavailable, make_transport,
)

try:
    from kvproof.runtime.transport.mooncake import MooncakeTransport, mooncake_engine_class
    mooncake_engine_class()
    HAVE = True
except TransportUnavailable as e:  # pragma: no cover - the Makefile installs the extra
    HAVE, WHY = False, str(e)

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not HAVE, reason="mooncake-transfer-engine-non-cuda (or libibverbs1) is not "
                                                  "installed: `make venv` installs both where it can")]


def _pair(**kw_a) -> tuple[MooncakeTransport, MooncakeTransport]:
    box: dict = {}
    with TcpListener() as lst:
        th = threading.Thread(target=lambda: box.setdefault("b", make_transport("mooncake", listener=lst,
                                                                                key=b"k" * 32)))
        th.start()
        a = make_transport("mooncake", connect=lst.address, key=b"k" * 32, **kw_a)
        th.join(10)
    return a, box["b"]


def test_writes_land_byte_exact_under_delays_with_tags_and_completions():
    a, b = _pair(faults=FaultConfig(delay_ms=1.0, seed=3))
    try:
        dst = bytearray(256 * 1024)
        b.register(dst, region_id=0)
        landed = []
        b.on_land = lambda tag, region, off, n: landed.append((tag, off, n))
        src = np.random.default_rng(0).integers(0, 256, len(dst), dtype=np.uint8)
        for i in range(32):
            a.post_write(memoryview(src[i * 8192:(i + 1) * 8192]), 0, i * 8192, tag=(i, 7))
        done = []
        while len(done) < 32:
            done += a.poll(timeout=5)
        assert all(c.ok for c in done) and sorted(c.tag for c in done) == [(i, 7) for i in range(32)]
        assert bytes(dst) == src.tobytes() and sorted(landed) == sorted(((i, 7), i * 8192, 8192) for i in range(32))
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_foreign_bytes_in_the_staging_ring_never_land():
    """Another engine (no secret) overwrites the ring between the real write and its descriptor."""
    a, b = _pair()
    intruder = mooncake_engine_class()()
    assert intruder.initialize("127.0.0.1:0", "P2PHANDSHAKE", "tcp", "") == 0
    junk = np.full(4096, 0xEE, dtype=np.uint8)
    intruder.register_memory(junk.ctypes.data, junk.nbytes)
    rpc, ring, _ = b.staging_address
    real_te_write = a._te_write

    def raced(w):                       # the intruder wins the race for this one write
        real_te_write(w)
        assert intruder.transfer_sync_write(rpc, junk.ctypes.data, ring + w.off, w.hdr.length) == 0

    try:
        dst = bytearray(8192)
        b.register(dst, region_id=0)
        a._te_write = raced
        a.post_write(b"\x01" * 4096, 0, 0)
        (c,) = a.poll(timeout=5)
        assert c.status is Status.ERROR and "MAC mismatch" in c.error
        assert dst == bytearray(8192) and b.refused_writes == {"bad_mac": 1} and not b.is_dead
        a._te_write = real_te_write     # the connection lives on: the next write lands
        a.post_write(b"\x02" * 100, 0, 10)
        (c,) = a.poll(timeout=5)
        assert c.ok and dst[10:110] == b"\x02" * 100 and dst[:10] == bytes(10)
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_out_of_region_write_is_refused_and_counted_connection_lives():
    a, b = _pair()
    try:
        dst = bytearray(64)
        b.register(dst, region_id=0)
        a.post_write(b"x" * 16, 0, 60)
        (c,) = a.poll(timeout=5)
        assert c.status is Status.ERROR and "out of bounds" in c.error
        assert b.refused_writes == {"out_of_bounds": 1} and not a.is_dead and not b.is_dead
        assert dst == bytearray(64)
        with pytest.raises(ValueError, match="at most the staging ring"):
            a.post_write(bytes(64 << 20), 0, 0)
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_drop_fault_fails_outstanding_writes_and_kills_both_ends():
    a, b = _pair(faults=FaultConfig(drop_after_writes=3))
    try:
        dst = bytearray(4096)
        b.register(dst, region_id=0)
        for i in range(6):
            a.post_write(b"y" * 64, 0, i * 64)
        done = []
        while len(done) < 6:
            done += a.poll(timeout=5)
        # ERROR means "not known to have landed" (an ACK may be lost with the connection); nothing
        # after the drop point goes out
        assert sum(c.ok for c in done) <= 3 and a.is_dead and "fault injection" in a.dead_reason
        assert dst[3 * 64:] == bytes(4096 - 3 * 64)
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_ring_wraps_many_times_under_backpressure():
    a, b = _pair()
    try:
        dst = bytearray(1 << 20)
        b.register(dst, region_id=0)
        block = np.arange(256 * 1024, dtype=np.uint8)
        n = 3 * (16 << 20) // block.nbytes              # 3 x the ring: every byte of it reused
        for i in range(n):
            a.post_write(memoryview(block), 0, (i % 4) * block.nbytes, tag=(i,))
        done = []
        while len(done) < n:
            done += a.poll(timeout=10)
        assert all(c.ok for c in done) and bytes(dst[:block.nbytes]) == block.tobytes()
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_close_and_drain_destroys_the_engine_not_a_later_garbage_collection():
    """An engine's destructor holds the GIL for about a second: left to the cyclic collector it stalled
    another transport's run (tcp at 0.0003x a plain socket after a few closed mooncake pairs)."""
    gc.disable()  # only reference counting may free the engines here
    try:
        a, b = _pair()
        b.register(bytearray(4096), region_id=0)
        a.post_write(b"z" * 100, 0, 0)
        assert a.poll(timeout=5)[0].ok
        engines = [weakref.ref(a._te), weakref.ref(b._te)]
        a.close_and_drain()
        b.close_and_drain()
        assert [e() for e in engines] == [None, None]
        b.close_and_drain()  # a second close is a no-op
        with pytest.raises(TransportClosed, match="engine destroyed"):
            b.staging_address
        transports = [weakref.ref(a), weakref.ref(b)]
        del a, b
        assert [t() for t in transports] == [None, None]
    finally:
        gc.enable()
