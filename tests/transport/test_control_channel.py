"""Control channel: message round trips, thread-safe send, framing errors, peer death, heartbeats."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

from kvproof.runtime.transport.control import (
    HEADER, Channel, ChannelClosed, ChannelConfig, ChannelError, ChannelListener, Kind, encode_frame,
)

from .conftest import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def chan_pair():
    a, b = Channel.pair()
    yield a, b
    a.close()
    b.close()


def test_messages_round_trip_in_order(chan_pair):
    a, b = chan_pair
    msgs = [{"type": "abort", "slot": 17, "epoch": 3}, {"type": "safe_to_recycle", "slot": 17, "ok": True},
            {"type": "x", "nested": {"l": [1, 2.5, None, "s"]}}]
    for m in msgs:
        a.send(m)
    assert [b.recv(timeout=5) for _ in msgs] == msgs
    b.send({"type": "reply"})
    assert a.recv(timeout=5) == {"type": "reply"}


def test_callback_mode_delivers_on_receive_thread():
    got, seen_threads = [], set()
    done = threading.Event()

    def on_message(m):
        got.append(m)
        seen_threads.add(threading.current_thread().name)
        if len(got) == 3:
            done.set()

    a, b = Channel.pair(on_message=on_message)
    try:
        for i in range(3):
            a.send({"type": "t", "i": i})
        assert done.wait(5)
        assert [m["i"] for m in got] == [0, 1, 2] and all(n.endswith("-recv") for n in seen_threads)
    finally:
        a.close()
        b.close()


def test_concurrent_senders_never_interleave_frames(chan_pair):
    a, b = chan_pair
    payload = "p" * 5000  # larger than one segment, so interleaving would corrupt frames

    def sender(k):
        for i in range(100):
            a.send({"type": "m", "k": k, "i": i, "p": payload})

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    got = [b.recv(timeout=5) for _ in range(400)]
    for k in range(4):
        assert [m["i"] for m in got if m["k"] == k] == list(range(100))  # per-sender order kept
    assert not b.is_dead


def test_send_rejects_invalid_messages(chan_pair):
    a, _ = chan_pair
    with pytest.raises(ChannelError, match="string 'type' field"):
        a.send({"slot": 1})
    with pytest.raises(ChannelError, match="string 'type' field"):
        a.send({"type": 5})
    with pytest.raises(ChannelError, match="'abort' is not JSON-encodable"):
        a.send({"type": "abort", "x": object()})
    small_a, small_b = Channel.pair(config=ChannelConfig(max_frame_bytes=64))
    with pytest.raises(ChannelError, match="max_frame_bytes=64"):
        small_a.send({"type": "big", "p": "x" * 100})
    small_a.close()
    small_b.close()
    assert not a.is_dead


@pytest.mark.parametrize("raw, expected", [
    (struct.pack("<4sBBHI", b"NOPE", 1, 1, 0, 2) + b"{}", "magic=b'NOPE'"),
    (struct.pack("<4sBBHI", b"KVCH", 2, 1, 0, 2) + b"{}", "version=2"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 9, 0, 2) + b"{}", "kind=9"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 1, 4, 2) + b"{}", "flags=0x4"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 1, 0, 2**31), "length=2147483648"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 2, 0, 3) + b"abc", "for a HEARTBEAT frame"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 1, 0, 5) + b"{oops", "not UTF-8 JSON"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 1, 0, 2) + b"[]", "JSON list, expected an object"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 1, 0, 10) + b'{"slot":1}', "field 'type'=None"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 1, 0, 0), "not UTF-8 JSON"),
    (b"KVC", "EOF after 3 of 12 header bytes"),
    (struct.pack("<4sBBHI", b"KVCH", 1, 1, 0, 40) + b'{"type":', "EOF after 8 of 40 payload bytes"),
])
def test_malformed_or_truncated_frames_raise_channel_error(raw, expected):
    lst = ChannelListener()
    peer = socket.create_connection(lst.address)
    chan = lst.accept()
    lst.close()
    try:
        peer.sendall(encode_frame(Kind.MSG, {"type": "fine"}) + raw)
        peer.shutdown(socket.SHUT_WR)  # truncated cases end with EOF mid-frame
        assert chan.recv(timeout=5) == {"type": "fine"}  # frames before the bad one are delivered
        with pytest.raises(ChannelClosed, match=expected.replace("[", r"\[").replace("(", r"\(")):
            chan.recv(timeout=5)
        assert chan.is_dead
    finally:
        peer.close()
        chan.close()


def test_peer_close_and_eof_are_detected(chan_pair):
    a, b = chan_pair
    a.send({"type": "last"})
    a.close()
    assert b.recv(timeout=5) == {"type": "last"}  # queued messages survive the peer's death
    with pytest.raises(ChannelClosed, match="peer closed the channel"):
        b.recv(timeout=5)
    with pytest.raises(ChannelClosed, match="dead channel"):
        b.send({"type": "too late"})


def test_abrupt_socket_close_is_eof():
    lst = ChannelListener()
    peer = socket.create_connection(lst.address)
    dead = []
    chan = lst.accept(on_dead=dead.append)
    lst.close()
    peer.close()
    wait_until(lambda: bool(dead), what="on_dead callback")
    assert dead == ["peer closed the channel (EOF)"] and chan.is_dead
    chan.close()


def test_missed_heartbeats_declare_the_peer_dead():
    cfg = ChannelConfig(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3)
    lst = ChannelListener()
    silent_peer = socket.create_connection(lst.address)  # connected, but never says anything
    chan = lst.accept(config=cfg)
    lst.close()
    try:
        t0 = time.monotonic()
        wait_until(lambda: chan.is_dead, timeout=5, what="heartbeat timeout")
        assert time.monotonic() - t0 >= 0.25
        assert "missed heartbeats" in chan.dead_reason and "heartbeat_timeout_s=0.3" in chan.dead_reason
    finally:
        silent_peer.close()
        chan.close()


def test_heartbeats_keep_an_idle_channel_alive():
    a, b = Channel.pair(config=ChannelConfig(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3))
    try:
        time.sleep(0.8)
        assert not a.is_dead and not b.is_dead
    finally:
        a.close()
        b.close()


def test_callback_exception_kills_the_channel_loudly():
    def on_message(m):
        raise RuntimeError("bug in handler")

    a, b = Channel.pair(on_message=on_message)
    try:
        a.send({"type": "boom"})
        wait_until(lambda: b.is_dead, what="callback failure")
        assert "bug in handler" in b.dead_reason
    finally:
        a.close()
        b.close()


def test_config_and_header_validation():
    with pytest.raises(ValueError, match="both be set or both be None"):
        ChannelConfig(heartbeat_interval_s=None)
    with pytest.raises(ValueError, match="heartbeat_interval_s=3"):
        ChannelConfig(heartbeat_interval_s=3, heartbeat_timeout_s=2)
    assert HEADER.size == 12
    frame = encode_frame(Kind.MSG, {"type": "t"})
    assert json.loads(frame[HEADER.size:]) == {"type": "t"}
