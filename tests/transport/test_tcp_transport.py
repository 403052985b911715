"""TCP transport: byte-exact landing, completions, malformed frames, peer death, close_and_drain."""

from __future__ import annotations

import gc
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
import torch

from kvproof.runtime.transport import (
    FaultConfig, Status, TcpListener, TcpTransport, TransportClosed, TransportError, make_transport,
)
from kvproof.runtime.transport.frames import HEADER, FrameType, Header, decode_acks, decode_header, encode_header

from .conftest import wait_until

pytestmark = pytest.mark.timeout(30)


def test_write_lands_byte_exact_with_tag_imm_and_completion(tcp_pair):
    a, b = tcp_pair
    landed = []
    b.on_land = lambda tag, region, off, n: landed.append((tag, region, off, n))
    dst = torch.zeros(4096, dtype=torch.uint8)
    region = b.register(dst)
    src = torch.arange(256, dtype=torch.uint8).repeat(2)  # [512]
    wr = a.post_write(src, region.id, 1000, 300, tag=(17, 3, 0), imm=0xDEADBEEF)
    (c,) = a.poll(timeout=5)
    assert (c.wr_id, c.tag, c.length, c.status, c.error) == (wr, (17, 3, 0), 300, Status.OK, None)
    assert torch.equal(dst[1000:1300], src[:300])
    assert not dst[:1000].any() and not dst[1300:].any()
    assert landed == [((17, 3, 0), region.id, 1000, 300)]
    (ev,) = b.poll_recv(timeout=5)
    assert (ev.imm, ev.length, ev.region, ev.offset, ev.tag) == (0xDEADBEEF, 300, region.id, 1000, (17, 3, 0))
    assert a.outstanding() == 0


def test_many_overlapping_writes_apply_in_post_order_without_faults(tcp_pair):
    a, b = tcp_pair
    rng = random.Random(7)
    dst, model = bytearray(2048), bytearray(2048)
    region = b.register(dst, region_id=5)
    for _ in range(300):
        off = rng.randrange(2048)
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 2048 - off + 1)))
        a.post_write(data, region.id, off, tag=(off,))
        model[off : off + len(data)] = data
    assert a.wait_idle(10)
    done = a.poll()
    assert len(done) == 300 and all(c.ok for c in done)
    assert dst == model


def test_tensor_view_source_and_bytearray_destination(tcp_pair):
    a, b = tcp_pair
    kv = torch.randn(4, 8, 16)  # [layers, tokens, dim] float32
    dst = bytearray(kv[2].numel() * 4)
    region = b.register(dst)
    a.post_write(kv[2], region.id, 0)
    assert a.poll(timeout=5)[0].ok
    assert torch.equal(torch.frombuffer(dst, dtype=torch.float32).view(8, 16), kv[2])


def test_post_write_argument_errors_name_the_argument(tcp_pair):
    a, b = tcp_pair
    with pytest.raises(ValueError, match="length=9"):
        a.post_write(b"12345678", 0, 0, 9)
    with pytest.raises(ValueError, match="offset=-1"):
        a.post_write(b"x", 0, -1)
    with pytest.raises(ValueError, match="region=-2"):
        a.post_write(b"x", -2, 0)
    with pytest.raises(ValueError, match="tag=.*at most 4"):
        a.post_write(b"x", 0, 0, tag=(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="imm=4294967296"):
        a.post_write(b"x", 0, 0, imm=2**32)
    with pytest.raises(ValueError, match="not contiguous"):
        a.post_write(torch.zeros(4, 4).t(), 0, 0)
    with pytest.raises(TypeError, match="got list"):
        a.post_write([1, 2], 0, 0)
    with pytest.raises(ValueError, match="read-only"):
        b.register(b"immutable")
    b.register(bytearray(8), region_id=3)
    with pytest.raises(ValueError, match="region_id=3 is already registered"):
        b.register(bytearray(8), region_id=3)
    with pytest.raises(KeyError, match="region_id=9"):
        b.deregister(9)
    assert not a.is_dead  # argument errors are caught before anything is sent


def test_header_roundtrip():
    h = Header(FrameType.WRITE, 9, 3, 1 << 40, 4096, 7, (1, -2, 3))
    assert decode_header(encode_header(h)) == h


# -- malformed traffic from a raw peer -------------------------------------------------

GUARD = 0xA5


@pytest.fixture
def raw_peer():
    """(raw socket, receiving transport, whole buffer, region) where the region is buf[64:192]."""
    with TcpListener() as lst:
        raw = socket.create_connection(lst.address)
        t = lst.accept()
    buf = torch.full((256,), GUARD, dtype=torch.uint8)
    region = t.register(buf[64:192])
    yield raw, t, buf, region
    raw.close()
    t.close_and_drain()


def _frame(**over) -> bytes:
    fields = dict(magic=b"KVTP", version=1, type=1, flags=0, wr_id=1, region=0, offset=0, length=16,
                  imm=0, ntag=0, tag=(0, 0, 0, 0))
    fields.update(over)
    f = fields
    return HEADER.pack(f["magic"], f["version"], f["type"], f["flags"], f["wr_id"], f["region"],
                       f["offset"], f["length"], f["imm"], f["ntag"], *f["tag"])


@pytest.mark.parametrize("over, field", [
    (dict(magic=b"XXXX"), "magic"),
    (dict(version=9), "version"),
    (dict(type=77), "type"),
    (dict(flags=0x80), "flags"),
    (dict(ntag=5), "ntag"),
    (dict(length=2**40), "length"),  # too long even to skip
    (dict(type=2, length=4), "length"),  # an ACK carries whole u64 wr_ids
    (dict(type=4, length=8), "length"),  # a CLOSE carries nothing
])
def test_malformed_frame_names_field_and_corrupts_nothing(raw_peer, over, field):
    raw, t, buf, _ = raw_peer
    raw.sendall(_frame(**over) + b"\x11" * 16)
    wait_until(lambda: t.is_dead, what="receiver marks the connection dead")
    assert field in t.dead_reason and "malformed frame" in t.dead_reason
    assert (buf == GUARD).all(), "no byte may change, inside or outside the region"
    raw.settimeout(5)
    nak = decode_header(raw.recv(HEADER.size, socket.MSG_WAITALL))  # the peer is told why
    assert nak.type is FrameType.NAK and field in raw.recv(nak.length, socket.MSG_WAITALL).decode()


@pytest.mark.parametrize("over, field, label", [
    (dict(region=4), "region", "unknown_region"),
    (dict(offset=200), "offset", "out_of_bounds"),
    (dict(offset=120, length=16), "length", "out_of_bounds"),
])
def test_write_outside_region_is_refused_counted_and_connection_lives(raw_peer, over, field, label):
    raw, t, buf, region = raw_peer
    raw.sendall(_frame(**over) + b"\x11" * 16)
    raw.settimeout(5)
    nak = decode_header(raw.recv(HEADER.size, socket.MSG_WAITALL))  # the peer is told why
    assert nak.type is FrameType.NAK and field in raw.recv(nak.length, socket.MSG_WAITALL).decode()
    assert (buf == GUARD).all(), "no byte may change, inside or outside the region"
    assert not t.is_dead and t.refused_writes == {label: 1}
    raw.sendall(_frame(wr_id=2, region=region.id, offset=8, length=4) + b"\x22" * 4)  # a good write still lands
    ack = decode_header(raw.recv(HEADER.size, socket.MSG_WAITALL))
    assert ack.type is FrameType.ACK and decode_acks(raw.recv(ack.length, socket.MSG_WAITALL)) == (2,)
    assert (buf[72:76] == 0x22).all() and (buf[:72] == GUARD).all() and (buf[76:] == GUARD).all()


def test_eof_inside_payload_stays_inside_region(raw_peer):
    raw, t, buf, _ = raw_peer
    raw.sendall(_frame(offset=100, length=28) + b"\x11" * 10)
    raw.shutdown(socket.SHUT_WR)
    wait_until(lambda: t.is_dead, what="EOF detection")
    assert "(EOF) inside write wr_id=1" in t.dead_reason
    assert (buf[:164] == GUARD).all() and (buf[164:174] == 0x11).all() and (buf[174:] == GUARD).all()


def test_unknown_ack_is_a_protocol_error(raw_peer):
    raw, t, _, _ = raw_peer
    raw.sendall(_frame(type=2, length=8) + struct.pack("<Q", 42))
    wait_until(lambda: t.is_dead, what="receiver rejects the ACK")
    assert "wr_id=42" in t.dead_reason


def test_write_to_deregistered_region_fails_alone(tcp_pair):
    a, b = tcp_pair
    region = b.register(bytearray(64))
    b.deregister(region.id)
    a.post_write(b"abc", region.id, 0)
    (c,) = a.poll(timeout=5)
    assert c.status is Status.ERROR and f"region={region.id}" in c.error and "refused" in c.error
    assert not a.is_dead and not b.is_dead and b.refused_writes == {"unknown_region": 1}
    other = bytearray(8)
    b.register(other, region_id=7)
    a.post_write(b"xyz", 7, 2)
    (c,) = a.poll(timeout=5)
    assert c.ok and other[2:5] == b"xyz"


# -- peer death and close_and_drain ---------------------------------------------------------

def test_peer_close_is_detected_and_pending_writes_fail(tcp_pair):
    a, b = tcp_pair
    b.register(bytearray(64))
    b.close_and_drain()
    wait_until(lambda: a.is_dead, what="writer notices the close")
    assert a.dead_reason == "peer closed the connection"  # the orderly CLOSE frame, not just EOF
    with pytest.raises(TransportClosed):
        a.post_write(b"x", 0, 0)


def test_close_and_drain_guarantees_nothing_lands_afterwards():
    a, b = TcpTransport.pair(faults=FaultConfig(delay_ms=150, delay_dist="fixed"))
    dst = bytearray(64)
    b.register(dst)
    for i in range(4):
        a.post_write(bytes([i + 1]) * 16, 0, 16 * i, tag=(i,))
    b.close_and_drain()  # the writes are still sitting in the writer's delay queue
    assert not any(t.is_alive() for t in (b._recv_thread, b._wire_thread))
    time.sleep(0.3)
    assert dst == bytearray(64)
    wait_until(lambda: a.outstanding() == 0, what="writer flushes its writes")
    done = a.poll()
    assert len(done) == 4 and all(c.status is Status.ERROR for c in done)
    a.close_and_drain()
    with pytest.raises(TransportClosed, match="closed transport"):
        a.post_write(b"x", 0, 0)


def test_close_from_inside_on_land_does_not_deadlock(tcp_pair):
    a, b = tcp_pair
    b.register(bytearray(16))
    b.on_land = lambda *_: b.close_and_drain()
    a.post_write(b"x" * 4, 0, 0)
    wait_until(lambda: b._closed and not b._recv_thread.is_alive(), what="close from the hook")



def test_a_closed_transport_is_freed_without_the_cyclic_garbage_collector():
    """Dropping a closed pair frees it at once: nothing of it (regions, buffers, a subclass's engine)
    waits for a collection that runs later, in whichever thread allocates then."""
    gc.disable()  # only reference counting may free them here
    try:
        a, b = TcpTransport.pair()
        b.register(bytearray(64))
        a.post_write(b"x" * 8, 0, 0)
        assert a.poll(timeout=5)[0].ok
        a.close_and_drain()
        b.close_and_drain()
        refs = [weakref.ref(a), weakref.ref(b)]
        del a, b
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()

_RECEIVER = textwrap.dedent("""
    import sys, time
    from kvproof.runtime.transport import TcpTransport
    t = TcpTransport.connect(("127.0.0.1", int(sys.argv[1])))
    t.register(bytearray(1 << 20))
    print("ready", flush=True)
    time.sleep(60)
""")


def test_killed_subprocess_peer_is_detected():
    with TcpListener() as lst:
        proc = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(lst.address[1])],
                                stdout=subprocess.PIPE, text=True)
        try:
            a = lst.accept(timeout=20)
            assert proc.stdout.readline().strip() == "ready"
            a.post_write(b"\x01" * 4096, 0, 0)
            assert a.poll(timeout=5)[0].ok
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
            wait_until(lambda: a.is_dead, what="death of the killed peer")
            assert "EOF" in a.dead_reason or "reset" in a.dead_reason.lower()
            a.close_and_drain()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_make_transport_tcp_and_argument_errors():
    with TcpListener() as lst:
        a = make_transport("tcp", connect=lst.address)
        b = make_transport("tcp", listener=lst)
    b.register(bytearray(8))
    a.post_write(b"12345678", 0, 0)
    assert a.poll(timeout=5)[0].ok
    a.close_and_drain()
    b.close_and_drain()
    with pytest.raises(ValueError, match="exactly one of sock=, connect="):
        make_transport("tcp")
    with pytest.raises(ValueError, match="unknown transport name='rdma'"):
        make_transport("rdma")
    with pytest.raises(TransportError):
        raise TransportClosed("TransportClosed is a TransportError")


def test_frame_constants_are_stable():
    assert HEADER.size == 76 and struct.calcsize("<4sBBHQIQQIB3x4q") == 76


def test_both_directions_at_once_do_not_deadlock():
    """Full socket buffers both ways: receive threads only queue ACKs, so neither side stalls."""
    a, b = TcpTransport.pair()
    try:
        da, db = bytearray(1 << 20), bytearray(1 << 20)
        a.register(da)
        b.register(db)
        pa, pb = bytes(range(256)) * 1024, bytes(reversed(range(256))) * 1024  # 256 KiB each
        for i in range(40):
            a.post_write(pa, 0, (i % 4) * len(pa), tag=(i,))
            b.post_write(pb, 0, (i % 4) * len(pb), tag=(i,))
        assert a.wait_idle(20) and b.wait_idle(20)
        assert all(c.ok for c in a.poll() + b.poll())
        assert db == pa * 4 and da == pb * 4
    finally:
        a.close_and_drain()
        b.close_and_drain()


def test_small_writes_in_bursts_all_complete_both_ways(tcp_pair):
    """ACKs held back while more frames are readable must still go out when the stream pauses."""
    a, b = tcp_pair
    a.register(bytearray(64))
    b.register(bytearray(64))
    for burst in range(20):
        for i in range(burst % 7 + 1):
            a.post_write(b"ab", 0, 2 * i)
            b.post_write(b"ba", 0, 2 * i)
        assert a.wait_idle(5) and b.wait_idle(5), f"completions stuck in burst {burst}"
        time.sleep(0.002)
    assert all(c.ok for c in a.poll() + b.poll())


_WRITER = textwrap.dedent("""
    import sys, time
    from kvproof.runtime.transport import TcpTransport, TransportClosed
    t = TcpTransport.connect(("127.0.0.1", int(sys.argv[1])))
    sys.stdin.readline()  # the receiver has registered its region
    i = 0
    while True:
        try:
            t.post_write(bytes([i % 250 + 1]) * 4096, 0, (i % 16) * 4096)
        except TransportClosed:
            time.sleep(0.01)
        t.poll()
        i += 1
        time.sleep(0.0005)
""")


def test_close_and_drain_while_a_live_subprocess_keeps_writing():
    with TcpListener() as lst:
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(lst.address[1])],
                                stdin=subprocess.PIPE, text=True)
        try:
            b = lst.accept(timeout=20)
            dst = torch.zeros(16 * 4096, dtype=torch.uint8)
            b.register(dst)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            wait_until(lambda: bool(dst.any()), what="the first landing")
            b.close_and_drain()
            snapshot = dst.clone()
            time.sleep(0.3)  # the writer keeps posting the whole time
            assert torch.equal(dst, snapshot), "a write landed after close_and_drain returned"
            assert proc.poll() is None  # the peer was alive throughout
        finally:
            proc.kill()
            proc.wait(5)
