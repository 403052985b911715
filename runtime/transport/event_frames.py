"""Binary token-event frames: one decode step's events for many requests, struct-packed, checked once.

The PD decode process streams every request's new tokens to the router after each step. As JSON
control messages that cost a deep copy, an encode, a parse and a per-field validation of every
event on both sides; this frame packs the step's events into one buffer that the receiving
channel thread checks in one pass (sizes, counts, codes) and hands on as an `EventBatch`.

Payload of a control-channel EVENTS frame (little endian):

    count u32 | count x event
    event:  rid u32 | ntok u16 | flags u8 | reason u8 | prompt_tokens u32 | completion_tokens u32 |
            accept_length f64 | accept_rate f64 | queue_s f64 | ntok x token u32 |
            [ext_len u32 | ext_len bytes of UTF-8 JSON {"detail": str, "logprobs": list|null,
                                                        "finish_reason": str}]   (flags & EXT)

flags: 1 finished, 2 queue_s present, 4 EXT present. reason: an index into REASONS (0: none);
REASON_EXT means "the finish_reason string is in the extension". Anything else is refused with a
`EventFrameError` naming the event and field that is wrong and what was expected.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from array import array
from typing import Any, Iterable, NamedTuple

EVENT = struct.Struct("<IHBBIIddd")
COUNT = struct.Struct("<I")
EXT_LEN = struct.Struct("<I")
FINISHED, HAS_QUEUE, HAS_EXT = 1, 2, 4
KNOWN_FLAGS = FINISHED | HAS_QUEUE | HAS_EXT
REASONS = (None, "stop", "length", "abort", "anomaly")
REASON_EXT = 255
_REASON_CODE = {r: i for i, r in enumerate(REASONS)}
MAX_TOKENS = 0xFFFF
_SWAP = sys.byteorder != "little"          # token arrays are little endian on the wire
assert array("I").itemsize == 4


class EventFrameError(ValueError):
    """A token-event frame is malformed; the message names the event, the field and what was expected."""


class WireEvent(NamedTuple):
    """One request's token event as it crossed the wire (the TokenEvent fields, rid for request_id)."""

    rid: int
    tokens: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    detail: str
    prompt_tokens: int
    completion_tokens: int
    accept_length: float
    accept_rate: float
    logprobs: list | None
    queue_s: float | None


class EventBatch(list):
    """The events of one EVENTS frame, each a WireEvent, already checked (what the channel delivers)."""


def encode_events(events: Iterable[tuple[int, Any]]) -> bytes:
    """Pack (rid, event) pairs; an event has TokenEvent's attributes. ValueError names a bad field."""
    parts: list[bytes] = []
    n = 0
    for rid, ev in events:
        tokens = ev.tokens
        if len(tokens) > MAX_TOKENS:
            raise EventFrameError(f"event for rid {rid}: {len(tokens)} tokens, expected <= {MAX_TOKENS}")
        reason = ev.finish_reason
        code = _REASON_CODE.get(reason, REASON_EXT)
        ext: dict[str, Any] = {}
        if ev.detail:
            ext["detail"] = ev.detail
        if ev.logprobs is not None:
            ext["logprobs"] = ev.logprobs
        if code == REASON_EXT:
            ext["finish_reason"] = reason
        flags = (FINISHED if ev.finished else 0) | (HAS_QUEUE if ev.queue_s is not None else 0) \
            | (HAS_EXT if ext else 0)
        try:
            parts.append(EVENT.pack(rid, len(tokens), flags, code, ev.prompt_tokens, ev.completion_tokens,
                                    ev.accept_length, ev.accept_rate, ev.queue_s or 0.0))
            toks = array("I", tokens)
            if _SWAP:
                toks.byteswap()
            parts.append(toks.tobytes())
        except (struct.error, OverflowError, TypeError) as e:
            raise EventFrameError(f"event for rid {rid}: cannot pack ({e})") from None
        if ext:
            raw = json.dumps(ext, separators=(",", ":"), allow_nan=False).encode()
            parts += [EXT_LEN.pack(len(raw)), raw]
        n += 1
    return COUNT.pack(n) + b"".join(parts)


def decode_events(payload: bytes | bytearray | memoryview) -> EventBatch:
    """Unpack and check an EVENTS payload; EventFrameError says which event and field is wrong."""
    size = len(payload)
    if size < COUNT.size:
        raise EventFrameError(f"malformed events frame: {size} bytes, expected >= {COUNT.size} (the count)")
    (count,) = COUNT.unpack_from(payload, 0)
    pos, out = COUNT.size, EventBatch()
    for i in range(count):
        if pos + EVENT.size > size:
            raise EventFrameError(f"malformed events frame: event {i} of {count} is truncated "
                                  f"({size - pos} bytes left, expected >= {EVENT.size})")
        rid, ntok, flags, code, prompt, completion, acc_len, acc_rate, queue_s = EVENT.unpack_from(payload, pos)
        pos += EVENT.size
        if flags & ~KNOWN_FLAGS:
            raise EventFrameError(f"malformed events frame: event {i}: flags={flags:#x}, "
                                  f"expected a subset of {KNOWN_FLAGS:#x}")
        if code >= len(REASONS) and code != REASON_EXT:
            raise EventFrameError(f"malformed events frame: event {i}: reason code={code}, expected "
                                  f"0..{len(REASONS) - 1} or {REASON_EXT}")
        if not (math.isfinite(acc_len) and math.isfinite(acc_rate) and math.isfinite(queue_s)):
            raise EventFrameError(f"malformed events frame: event {i}: accept_length={acc_len}, "
                                  f"accept_rate={acc_rate}, queue_s={queue_s}, expected finite numbers")
        end = pos + 4 * ntok
        if end > size:
            raise EventFrameError(f"malformed events frame: event {i}: {ntok} tokens need {4 * ntok} bytes, "
                                  f"{size - pos} left")
        toks = array("I")
        toks.frombytes(payload[pos:end])
        if _SWAP:
            toks.byteswap()
        pos = end
        ext: dict[str, Any] = {}
        if flags & HAS_EXT:
            ext, pos = _ext(payload, pos, i)
        reason = ext.get("finish_reason") if code == REASON_EXT else REASONS[code]
        if code == REASON_EXT and not isinstance(reason, str):
            raise EventFrameError(f"malformed events frame: event {i}: reason code {REASON_EXT} needs a string "
                                  f"'finish_reason' in its extension, got {reason!r}")
        if flags & FINISHED and reason is None:
            raise EventFrameError(f"malformed events frame: event {i}: finished without a finish_reason, "
                                  f"expected one of {list(REASONS[1:])} or an extension's")
        out.append(WireEvent(rid, tuple(toks), bool(flags & FINISHED), reason, ext.get("detail", ""), prompt,
                             completion, acc_len, acc_rate, ext.get("logprobs"),
                             queue_s if flags & HAS_QUEUE else None))
    if pos != size:
        raise EventFrameError(f"malformed events frame: {size - pos} bytes after the {count} events, expected none")
    return out


def _ext(payload: bytes | bytearray | memoryview, pos: int, i: int) -> tuple[dict[str, Any], int]:
    """The JSON extension of event i at pos, checked; (fields, position after it)."""
    if pos + EXT_LEN.size > len(payload):
        raise EventFrameError(f"malformed events frame: event {i}: extension length is truncated")
    (n,) = EXT_LEN.unpack_from(payload, pos)
    pos += EXT_LEN.size
    if pos + n > len(payload):
        raise EventFrameError(f"malformed events frame: event {i}: extension of {n} bytes, "
                              f"{len(payload) - pos} left")
    try:
        ext = json.loads(bytes(payload[pos:pos + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EventFrameError(f"malformed events frame: event {i}: extension is not UTF-8 JSON ({e})") from None
    if not isinstance(ext, dict) or set(ext) - {"detail", "logprobs", "finish_reason"}:
        raise EventFrameError(f"malformed events frame: event {i}: extension {ext!r}, expected an object with "
                              f"only 'detail', 'logprobs', 'finish_reason'")
    if not isinstance(ext.get("detail", ""), str):
        raise EventFrameError(f"malformed events frame: event {i}: detail={ext['detail']!r}, expected a string")
    if not isinstance(ext.get("logprobs", []), list):
        raise EventFrameError(f"malformed events frame: event {i}: logprobs={ext['logprobs']!r}, expected a list")
    return ext, pos + n
