"""Binary token-event frames: round trips, every malformed field refused by name, the channel's EVENTS kind."""

from __future__ import annotations

import math
import socket
import struct

import pytest

from kvproof.runtime.serving.engine_api import TokenEvent
from kvproof.runtime.transport.control import HEADER, Channel, ChannelClosed, ChannelListener, Kind, encode_frame
from kvproof.runtime.transport.event_frames import (
    COUNT, EVENT, EventBatch, EventFrameError, WireEvent, decode_events, encode_events,
)

pytestmark = pytest.mark.timeout(30)

EVENTS = [
    (7, TokenEvent("x", (1, 2, 259), queue_s=0.25)),
    (8, TokenEvent("y", (), True, "abort", "decode out of KV pages", 40)),
    (2**32 - 1, TokenEvent("z", (65,), True, "length", "", 12, 64, 1.75, 0.375, None, None)),
    (9, TokenEvent("w", (3,), True, "stop_string_custom", "", 5, 1, logprobs=((-0.5, ((3, -0.5), (4, -1.25))),))),
    (10, TokenEvent("v", tuple(range(256)), logprobs=())),
]


def _wire(rid: int, ev: TokenEvent) -> WireEvent:
    lp = None if ev.logprobs is None else [[a, [list(p) for p in alts]] for a, alts in ev.logprobs]
    return WireEvent(rid, ev.tokens, ev.finished, ev.finish_reason, ev.detail, ev.prompt_tokens,
                     ev.completion_tokens, ev.accept_length, ev.accept_rate, lp, ev.queue_s)


def test_events_round_trip_field_for_field() -> None:
    got = decode_events(encode_events(EVENTS))
    assert isinstance(got, EventBatch) and got == [_wire(r, e) for r, e in EVENTS]
    assert decode_events(encode_events([])) == []


def test_wire_event_fields_are_token_event_fields() -> None:
    """The router rebuilds TokenEvent(request_id, *wire[1:]): the field order must match."""
    from dataclasses import fields
    assert list(WireEvent._fields[1:]) == [f.name for f in fields(TokenEvent)][1:]


def _one(**over: object) -> bytes:
    base = dict(rid=1, ntok=1, flags=0, code=0, prompt=0, completion=0, al=0.0, ar=0.0, q=0.0)
    base.update(over)
    return EVENT.pack(*base.values())


@pytest.mark.parametrize("payload, expected", [
    (b"\x01\x00", "2 bytes, expected >= 4"),
    (COUNT.pack(2) + _one() + b"\x05\x00\x00\x00", "event 1 of 2 is truncated"),
    (COUNT.pack(1) + _one(flags=0x10) + b"\x00" * 4, "flags=0x10"),
    (COUNT.pack(1) + _one(code=9) + b"\x00" * 4, "reason code=9, expected 0..4 or 255"),
    (COUNT.pack(1) + _one(ntok=3) + b"\x00" * 4, "3 tokens need 12 bytes, 4 left"),
    (COUNT.pack(1) + _one(al=math.nan) + b"\x00" * 4, "expected finite numbers"),
    (COUNT.pack(1) + _one() + b"\x00" * 4 + b"xx", "2 bytes after the 1 events"),
    (COUNT.pack(1) + _one(flags=1) + b"\x00" * 4, "finished without a finish_reason"),
    (COUNT.pack(1) + _one(flags=4) + b"\x00" * 4 + struct.pack("<I", 2) + b"{x", "not UTF-8 JSON"),
    (COUNT.pack(1) + _one(flags=4) + b"\x00" * 4 + struct.pack("<I", 9), "extension of 9 bytes, 0 left"),
    (COUNT.pack(1) + _one(flags=4) + b"\x00" * 4 + struct.pack("<I", 9) + b'{"bad":1}', "only 'detail'"),
    (COUNT.pack(1) + _one(flags=4) + b"\x00" * 4 + struct.pack("<I", 12) + b'{"detail":1}', "detail=1"),
    (COUNT.pack(1) + _one(flags=4) + b"\x00" * 4 + struct.pack("<I", 14) + b'{"logprobs":2}', "logprobs=2"),
    (COUNT.pack(1) + _one(flags=5, code=255) + b"\x00" * 4 + struct.pack("<I", 2) + b"{}",
     "needs a string 'finish_reason'"),
])
def test_malformed_payloads_name_what_is_wrong(payload: bytes, expected: str) -> None:
    with pytest.raises(EventFrameError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        decode_events(payload)


def test_encode_refuses_what_the_frame_cannot_carry() -> None:
    with pytest.raises(EventFrameError, match="70000 tokens, expected <= 65535"):
        encode_events([(1, TokenEvent("a", (0,) * 70000))])
    with pytest.raises(EventFrameError, match="rid -1: cannot pack"):
        encode_events([(-1, TokenEvent("a", (1,)))])


def test_channel_delivers_an_events_frame_as_a_batch() -> None:
    a, b = Channel.pair()
    try:
        a.send({"type": "before"})
        a.send_events(EVENTS)
        a.send({"type": "after"})
        assert b.recv(timeout=5) == {"type": "before"}
        assert b.recv(timeout=5) == [_wire(r, e) for r, e in EVENTS]
        assert b.recv(timeout=5) == {"type": "after"}
    finally:
        a.close()
        b.close()


def test_a_malformed_events_frame_kills_the_channel_naming_the_field() -> None:
    lst = ChannelListener()
    peer = socket.create_connection(lst.address)
    chan = lst.accept()
    lst.close()
    try:
        bad = COUNT.pack(1) + _one(code=42) + b"\x00" * 4
        peer.sendall(encode_frame(Kind.MSG, {"type": "fine"})
                     + HEADER.pack(b"KVCH", 1, int(Kind.EVENTS), 0, len(bad)) + bad)
        assert chan.recv(timeout=5) == {"type": "fine"}
        with pytest.raises(ChannelClosed, match="event 0: reason code=42"):
            chan.recv(timeout=5)
        assert chan.is_dead
    finally:
        peer.close()
        chan.close()
