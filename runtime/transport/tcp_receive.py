"""The TCP transport's receive thread: frames off the socket, WRITE payloads into regions, ACKs batched.

It reads frames and copies each WRITE payload into the destination region (the bulk by
recv_into straight into it; only bytes that arrived with the header pass through a 4 KiB
buffer), calls on_land, then queues an ACK. It checks only that the region exists and the
bytes fit, as a NIC checks an rkey and bounds; it never looks at protocol state. It never sends
itself: it only queues for the wire thread, so two peers writing at each other cannot deadlock
on full socket buffers. ACKs are held back while the next frame is already readable (one
wake-up of the wire thread per burst, not per write), and released before any read that
could block.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter
from typing import Callable

from .base import (
    Completion, CompletionQueue, LandHook, RecvEvent, Region, Status, Tag, TransportError, check_bounds,
)
from .frames import HEADER, MAX_REASON, FrameError, FrameType, Header, SocketReader, decode_acks, decode_header

_ACK_BATCH, _ACK_HOLD_S = 256, 0.0005  # ACKs are held back at most this many / this long
MAX_DISCARD = 64 << 20  # a refused write up to this long is skipped; a longer one drops the connection


class FrameReceiver:
    """The receive half of TcpTransport (a mixin: the transport supplies the state named below)."""

    # supplied by TcpTransport / Transport
    _sock: socket.socket
    _reader: SocketReader
    _lock: threading.Condition
    _pending: dict[int, tuple[Tag, int]]
    _acks: list[int]
    _ack_since: float
    _acks_held: bool
    _refusal: tuple[str, str]
    refused_writes: Counter[str]
    _cq: CompletionQueue
    _closed: bool
    _dead_reason: str | None
    on_land: LandHook | None
    _die: Callable[[str], None]
    _queue_control: Callable[..., None]
    _push_recv: Callable[[RecvEvent], None]
    _lookup: Callable[[int], tuple[Region, memoryview] | None]
    regions: Callable[[], list[Region]]

    def _recv_exact(self, mv: memoryview) -> bool:
        """Fill mv from the socket; False on EOF."""
        return self._reader.read_into(mv, self._before_recv)

    def _recv_loop(self) -> None:
        hbuf = memoryview(bytearray(HEADER.size))
        try:
            while not self._closed:
                if not self._recv_exact(hbuf):
                    self._die("peer closed the connection (EOF)")
                    return
                hdr = decode_header(hbuf)
                if hdr.type is FrameType.WRITE:
                    if not self._place(hdr):
                        return
                elif hdr.type is FrameType.ACK:
                    ids = bytearray(hdr.length)
                    if not self._recv_exact(memoryview(ids)):
                        self._die("peer closed the connection (EOF) inside an ACK frame")
                        return
                    for wr_id in decode_acks(ids):
                        self._complete(wr_id, None)
                elif hdr.type is FrameType.NAK:
                    reason = bytearray(hdr.length)
                    self._recv_exact(memoryview(reason))
                    text = reason.decode("utf-8", "replace")
                    # a refused write fails alone; the peer drops the connection itself if it must
                    self._complete(hdr.wr_id, f"peer refused write wr_id={hdr.wr_id}: {text}")
                else:  # CLOSE
                    self._die("peer closed the connection")
                    return
        except TransportError as e:  # FrameError included: malformed traffic from the peer
            self._reject(0, str(e))
        except OSError as e:
            if not self._closed:
                self._die(f"receive failed: {e!r}")
        except BaseException as e:  # noqa: BLE001 - a hook bug must not leave a silent half-dead connection
            self._die(f"receive thread failed: {e!r}")

    def _place(self, hdr: Header) -> bool:
        """Copy one WRITE payload into its region; False if the frame was rejected."""
        found = self._target(hdr)
        if found is None:
            return self._refuse_write(hdr, hdr.length)
        region, mem = found
        # straight into registered memory, no protocol state consulted (as a NIC would)
        if not self._recv_exact(mem[hdr.offset : hdr.offset + hdr.length]):
            self._die(f"peer closed the connection (EOF) inside write wr_id={hdr.wr_id}")
            return False
        self._landed(hdr)
        return True

    def _landed(self, hdr: Header) -> None:
        """A write's bytes are in place: the land hook, the receiver-side notice, the (batched) ACK."""
        if self.on_land is not None:
            self.on_land(hdr.tag, hdr.region, hdr.offset, hdr.length)
        if hdr.imm is not None:
            self._push_recv(RecvEvent(hdr.imm, hdr.length, hdr.region, hdr.offset, hdr.tag))
        with self._lock:
            self._acks.append(hdr.wr_id)
            self._acks_held = self._more_coming(len(self._acks))
            if not self._acks_held:
                self._lock.notify_all()

    def _target(self, hdr: Header) -> tuple[Region, memoryview] | None:
        """The region a WRITE lands in, or None (after noting why) when it is unknown or out of bounds."""
        found = self._lookup(hdr.region)
        if found is None:
            known = sorted(r.id for r in self.regions())
            self._refusal = ("unknown_region", str(FrameError("region", hdr.region, f"a registered region id {known}")))
            return None
        try:
            check_bounds(found[0], hdr.offset, hdr.length)
        except ValueError as e:
            field = "length" if hdr.offset <= found[0].length else "offset"
            self._refusal = ("out_of_bounds", f"malformed frame: {field} out of bounds: {e}")
            return None
        return found

    def _refuse_write(self, hdr: Header, skip: int) -> bool:
        """Refuse one write (NAK, counted) and skip its `skip` payload bytes; the connection lives on.

        A length beyond MAX_DISCARD cannot be skipped in reasonable time: that frame is malformed
        and drops the connection. Returns whether the connection is still usable."""
        label, reason = self._refusal
        if skip > MAX_DISCARD:
            self._reject(hdr.wr_id, reason)
            return False
        sink = memoryview(bytearray(min(skip, 1 << 16) or 1))
        while skip:
            n = min(skip, sink.nbytes)
            if not self._recv_exact(sink[:n]):
                self._die(f"peer closed the connection (EOF) inside refused write wr_id={hdr.wr_id}")
                return False
            skip -= n
        self.refused_writes[label] += 1
        self._queue_control(Header(FrameType.NAK, hdr.wr_id, length=len(reason.encode()[:MAX_REASON])),
                            reason.encode()[:MAX_REASON])
        return True

    def _more_coming(self, n_acks: int) -> bool:
        """Whether to hold ACKs back because the next frame is already readable (saves a wake-up per write)."""
        now = time.monotonic()
        if n_acks == 1:
            self._ack_since = now
        if n_acks >= _ACK_BATCH or now - self._ack_since > _ACK_HOLD_S:
            return False
        return self._reader.buffered() or self._readable()

    def _readable(self) -> bool:
        return bool(select.select([self._sock], [], [], 0)[0])

    def _before_recv(self) -> None:
        """Called by the reader before a socket read: held ACKs go out before the thread could block."""
        if self._acks_held and not self._readable():
            with self._lock:
                self._acks_held = False
                self._lock.notify_all()

    def _reject(self, wr_id: int, reason: str) -> None:
        """Refuse malformed traffic: tell the peer why, then drop the connection."""
        self._queue_control(Header(FrameType.NAK, wr_id, length=len(reason.encode()[:MAX_REASON])),
                            reason.encode()[:MAX_REASON])
        self._die(reason)

    def _complete(self, wr_id: int, error: str | None) -> None:
        with self._lock:
            entry = self._pending.pop(wr_id, None)
        if entry is None:
            # after a local close or drop the pending set was flushed; late ACKs are expected then
            if error is None and not self._closed and self._dead_reason is None:
                raise FrameError("wr_id", wr_id, "the id of a write awaiting completion")
            return
        tag, length = entry
        self._cq.put(Completion(wr_id, tag, length, Status.ERROR if error else Status.OK, error))
