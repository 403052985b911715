"""Wire formats: header round trips, and arbitrary bytes decode to a frame or a named error, nothing else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvproof.runtime.transport import control
from kvproof.runtime.transport.frames import (
    HEADER, MAX_ACKS, FrameError, FrameType, Header, decode_acks, decode_header, encode_acks, encode_header,
)

u32, u64, i64 = st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(wr_id=u64, region=u32, offset=u64, length=u64, imm=st.none() | u32, tag=st.lists(i64, max_size=4))
def test_write_header_round_trips(wr_id, region, offset, length, imm, tag):
    h = Header(FrameType.WRITE, wr_id, region, offset, length, imm, tuple(tag))
    assert decode_header(encode_header(h)) == h


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, HEADER.size - 1), st.integers(0, 255)), min_size=1, max_size=3),
       ftype=st.sampled_from(list(FrameType)))
def test_corrupted_header_decodes_or_raises_frame_error(edits, ftype):
    raw = bytearray(encode_header(Header(ftype, 1, 0, 0, 8 if ftype is FrameType.ACK else 0)))
    for pos, byte in edits:
        raw[pos] = byte
    try:
        decode_header(raw)
    except FrameError as e:
        assert e.field in {"magic", "version", "type", "flags", "ntag", "length"}


@given(ids=st.lists(u64, min_size=1, max_size=MAX_ACKS))
def test_ack_payload_round_trips(ids):
    hdr, payload = encode_acks(ids)
    assert decode_header(hdr).length == len(payload) and list(decode_acks(payload)) == ids


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=control.HEADER.size, max_size=control.HEADER.size), payload=st.binary(max_size=64))
def test_random_channel_bytes_decode_or_raise_channel_error(raw, payload):
    try:
        control.decode_header(raw, 1024)
        control.decode_message(payload)
    except control.ChannelError as e:
        assert str(e).startswith(("malformed frame:", "malformed message:"))


@given(msg=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5) | st.none(), max_size=4))
def test_channel_message_round_trips(msg):
    msg = {**msg, "type": "t"}
    frame = control.encode_frame(control.Kind.MSG, msg)
    kind, length = control.decode_header(frame[: control.HEADER.size], 1 << 20)
    assert kind is control.Kind.MSG and control.decode_message(frame[control.HEADER.size :]) == msg
