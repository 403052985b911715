"""Control channel: typed protocol messages between prefill and decode processes.

A message is a JSON object with a string `type` field; what the types mean is
the protocol's business, not the channel's. Frames are length-prefixed:

    magic 4s "KVCH" | version u8 | kind u8 (1 MSG, 2 HEARTBEAT, 3 BYE, 4 EVENTS) | flags u16 (0) |
    length u32 | payload

EVENTS is the per-step fast path of token events (`event_frames`: struct-packed, checked once per
frame by the receiving thread, delivered as an `EventBatch` instead of a dict).

The channel is separate from the data plane on purpose: a KV write may land
after a control message sent later, and the protocol has to cope with that.
Peer death is EOF, a reset, a malformed frame, or silence longer than the
heartbeat timeout; after it `recv` raises ChannelClosed naming the reason.
"""

from __future__ import annotations

import enum
import json
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .endpoint import SocketEndpoint, SocketListener
from .event_frames import EventBatch, EventFrameError, decode_events, encode_events

MAGIC = b"KVCH"
VERSION = 1
HEADER = struct.Struct("<4sBBHI")

Message = dict[str, Any]


class Kind(enum.IntEnum):
    MSG = 1
    HEARTBEAT = 2
    BYE = 3
    EVENTS = 4


class ChannelError(Exception):
    """A malformed or truncated frame, an invalid message, or a channel failure."""


class ChannelClosed(ChannelError):
    """The channel is closed or its peer is dead; the message says why."""


@dataclass(frozen=True)
class ChannelConfig:
    """Liveness and size limits of a channel."""

    heartbeat_interval_s: float | None = 0.2  # None: send no heartbeats and expect none
    heartbeat_timeout_s: float | None = 2.0  # silence longer than this means the peer is dead
    max_frame_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if (self.heartbeat_interval_s is None) != (self.heartbeat_timeout_s is None):
            raise ValueError("heartbeat_interval_s and heartbeat_timeout_s must both be set or both be None")
        if self.heartbeat_interval_s is not None and not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError(f"heartbeat_interval_s={self.heartbeat_interval_s}, expected 0 < interval < "
                             f"heartbeat_timeout_s={self.heartbeat_timeout_s}")
        if self.max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes={self.max_frame_bytes}, expected > 0")


def encode_frame(kind: Kind, msg: Mapping[str, Any] | None = None) -> bytes:
    """One wire frame; a MSG must be a JSON-encodable mapping with a string `type`."""
    payload = b""
    if kind is Kind.MSG:
        if not isinstance(msg, Mapping) or not isinstance(msg.get("type"), str):
            raise ChannelError(f"message {msg!r}: expected a mapping with a string 'type' field")
        try:
            payload = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ChannelError(f"message of type {msg['type']!r} is not JSON-encodable: {e}") from e
    return HEADER.pack(MAGIC, VERSION, int(kind), 0, len(payload)) + payload


def decode_header(raw: bytes, max_frame_bytes: int) -> tuple[Kind, int]:
    """(kind, payload length) of a frame header; ChannelError names the bad field."""
    magic, version, kind, flags, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ChannelError(f"malformed frame: magic={bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ChannelError(f"malformed frame: version={version}, expected {VERSION}")
    if kind not in Kind._value2member_map_:
        raise ChannelError(f"malformed frame: kind={kind}, expected one of {[int(k) for k in Kind]}")
    if flags != 0:
        raise ChannelError(f"malformed frame: flags={flags:#x}, expected 0")
    if length > max_frame_bytes:
        raise ChannelError(f"malformed frame: length={length}, expected <= max_frame_bytes={max_frame_bytes}")
    if Kind(kind) not in (Kind.MSG, Kind.EVENTS) and length:
        raise ChannelError(f"malformed frame: length={length}, expected 0 for a {Kind(kind).name} frame")
    return Kind(kind), length


def decode_message(payload: bytes) -> Message:
    """A message from a MSG payload; ChannelError says what was wrong."""
    try:
        msg = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChannelError(f"malformed message: payload is not UTF-8 JSON ({e})") from None
    if not isinstance(msg, dict):
        raise ChannelError(f"malformed message: payload is a JSON {type(msg).__name__}, expected an object")
    if not isinstance(msg.get("type"), str):
        raise ChannelError(f"malformed message: field 'type'={msg.get('type')!r}, expected a string")
    return msg


class ChannelListener(SocketListener):
    """A listening socket that accepts Channel connections."""

    def accept(self, timeout: float | None = 5.0, **kw: Any) -> "Channel":
        """Accept one peer; kw go to Channel."""
        return Channel(self.accept_socket(timeout), **kw)


class Channel(SocketEndpoint):
    """A framed, heartbeated, thread-safe message channel over one stream socket."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        config: ChannelConfig = ChannelConfig(),
        on_message: Callable[[Message | EventBatch], None] | None = None,
        on_dead: Callable[[str], None] | None = None,
        label: str = "",
    ) -> None:
        self._sock, self.config, self.label = sock, config, label or f"chan{sock.fileno()}"
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._on_message, self._on_dead = on_message, on_dead
        self._inbox: queue.Queue[Message | EventBatch] = queue.Queue()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._dead_reason: str | None = None
        self._closed = False
        self._stop = threading.Event()
        self.last_heard = time.monotonic()
        self._threads = [threading.Thread(target=self._recv_loop, name=f"{self.label}-recv", daemon=True)]
        if config.heartbeat_interval_s is not None:
            self._threads.append(threading.Thread(target=self._heartbeat_loop, name=f"{self.label}-hb", daemon=True))
        for t in self._threads:
            t.start()

    @classmethod
    def _listener(cls) -> ChannelListener:
        return ChannelListener()

    # -- sending -----------------------------------------------------------------
    def send(self, msg: Mapping[str, Any]) -> None:
        """Send one message (a mapping with a string `type`); thread-safe."""
        frame = encode_frame(Kind.MSG, msg)
        if len(frame) - HEADER.size > self.config.max_frame_bytes:
            raise ChannelError(f"message of type {msg['type']!r} is {len(frame) - HEADER.size} bytes, "
                               f"expected <= max_frame_bytes={self.config.max_frame_bytes}")
        self._send_frame(frame)

    def send_events(self, events: Any) -> None:
        """Send (rid, event) pairs as one binary EVENTS frame (`event_frames`); thread-safe."""
        try:
            payload = encode_events(events)
        except EventFrameError as e:
            raise ChannelError(str(e)) from None
        if len(payload) > self.config.max_frame_bytes:
            raise ChannelError(f"events frame is {len(payload)} bytes, expected <= "
                               f"max_frame_bytes={self.config.max_frame_bytes}")
        self._send_frame(HEADER.pack(MAGIC, VERSION, int(Kind.EVENTS), 0, len(payload)) + payload)

    def _send_frame(self, frame: bytes) -> None:
        if self._closed or self._dead_reason is not None:
            raise ChannelClosed(f"{self.label}: send on a {'closed' if self._closed else 'dead'} channel"
                                + (f" ({self._dead_reason})" if self._dead_reason else ""))
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as e:
            self._die(f"send failed: {e!r}")
            raise ChannelClosed(f"{self.label}: send failed, peer dead ({e!r})") from e

    # -- receiving ---------------------------------------------------------------
    def recv(self, timeout: float | None = None) -> Message | EventBatch:
        """The next message (queue mode: a dict, or an EventBatch for an EVENTS frame); ChannelClosed once
        the channel is dead and drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._inbox.get(timeout=0.05)
            except queue.Empty:
                if self._dead_reason is not None and self._inbox.empty():
                    raise ChannelClosed(f"{self.label}: {self._dead_reason}") from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.label}: no message within timeout={timeout} s") from None

    def _recv_exact(self, n: int, what: str) -> bytes | None:
        buf = bytearray(n)
        mv, got = memoryview(buf), 0
        while got < n:
            k = self._sock.recv_into(mv[got:])
            if k == 0:
                if got == 0 and what == "header":
                    return None  # clean EOF between frames
                raise ChannelError(f"truncated frame: EOF after {got} of {n} {what} bytes")
            got += k
            self.last_heard = time.monotonic()
        return bytes(buf)

    def _recv_loop(self) -> None:
        try:
            while not self._stop.is_set():
                raw = self._recv_exact(HEADER.size, "header")
                if raw is None:
                    self._die("peer closed the channel (EOF)")
                    return
                kind, length = decode_header(raw, self.config.max_frame_bytes)
                if kind is Kind.BYE:
                    self._die("peer closed the channel")
                    return
                if kind is Kind.HEARTBEAT:
                    continue
                payload = self._recv_exact(length, "payload") or b""
                msg: Message | EventBatch
                if kind is Kind.EVENTS:
                    try:
                        msg = decode_events(payload)
                    except EventFrameError as e:
                        raise ChannelError(str(e)) from None
                else:
                    msg = decode_message(payload)
                if self._on_message is not None:
                    self._on_message(msg)
                else:
                    self._inbox.put(msg)
        except ChannelError as e:
            self._die(str(e))
        except OSError as e:
            self._die(f"receive failed: {e!r}")
        except Exception as e:  # noqa: BLE001 - a callback bug must surface, not kill the thread silently
            self._die(f"on_message callback raised {e!r}")

    def _heartbeat_loop(self) -> None:
        interval, limit = self.config.heartbeat_interval_s, self.config.heartbeat_timeout_s
        assert interval is not None and limit is not None
        while not self._stop.wait(interval):
            silent = time.monotonic() - self.last_heard
            if silent > limit:
                self._die(f"missed heartbeats: nothing heard for {silent:.2f} s (heartbeat_timeout_s={limit})")
                return
            try:
                self._send_frame(encode_frame(Kind.HEARTBEAT))
            except ChannelClosed:
                return

    # -- liveness and close (is_dead / dead_reason: Liveness) -----------------------
    def _die(self, reason: str) -> None:
        with self._state_lock:
            if self._dead_reason is not None:
                return
            self._dead_reason = reason
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the peer sees EOF at once, not after its timeout
        except OSError:
            pass
        if self._on_dead is not None and not self._closed:
            self._on_dead(reason)

    def close(self, timeout: float = 2.0) -> None:
        """Say goodbye, stop the threads and close the socket."""
        if self._closed:
            return
        if self._dead_reason is None:
            try:
                self._send_frame(encode_frame(Kind.BYE))
            except ChannelClosed:
                pass
        self._closed = True
        self._die("closed locally")
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
        self._sock.close()

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
