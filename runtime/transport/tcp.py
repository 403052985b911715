"""The TCP transport: one-sided writes over a loopback socket, the embedded default.

Two threads per connection. The receive thread (tcp_receive.py) reads frames, places each
WRITE payload into its region, calls on_land and queues an ACK; it only queues, never sends.
The wire thread sends queued frames in order of their due time, so a write delayed by fault
injection goes on the wire, and lands, after writes and control messages sent later.

An ERROR completion means "not known to have landed": a write whose ACK was
lost with the connection may still have landed. Only close_and_drain at the
receiver guarantees that nothing lands any more.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections import Counter
from typing import Any

from .base import Completion, LandHook, Status, Tag, Transport, TransportError
from .endpoint import SocketEndpoint, SocketListener
from .faults import FaultConfig, FaultInjector
from .frames import MAX_ACKS, FrameType, Header, SocketReader, encode_acks, encode_header
from .tcp_receive import MAX_DISCARD, FrameReceiver

__all__ = ["BATCH_BUFS", "MAX_DISCARD", "TcpListener", "TcpTransport"]

BATCH_BUFS, _BATCH_BYTES = 128, 4 * 1024 * 1024  # per sendmsg; IOV_MAX is 1024


class TcpListener(SocketListener):
    """A listening socket that accepts TcpTransport connections."""

    def accept(self, timeout: float | None = 5.0, **kw: Any) -> "TcpTransport":
        """Accept one connection and wrap it; kw go to TcpTransport."""
        return TcpTransport(self.accept_socket(timeout), **kw)


class TcpTransport(FrameReceiver, Transport, SocketEndpoint):
    """One endpoint of a TCP connection carrying one-sided writes."""

    name = "tcp"

    def __init__(
        self,
        sock: socket.socket,
        *,
        faults: FaultConfig | None = None,
        on_land: LandHook | None = None,
        label: str = "",
    ) -> None:
        super().__init__(on_land)
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"sock type {sock.type!r}, expected a connected SOCK_STREAM socket")
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ACKs are tiny; don't let Nagle hold them
        self._sock = sock
        self._reader = SocketReader(sock)
        self.label = label or f"tcp{sock.fileno()}"
        self._faults = FaultInjector(faults) if faults is not None and faults.active else None
        self._lock = threading.Condition()  # guards everything below and the wire heap
        self._pending: dict[int, tuple[Tag, int]] = {}
        self._wr_ids = itertools.count(1)
        self._seq = itertools.count()
        self._wire: list[tuple[float, int, Header, memoryview | None]] = []
        self._acks: list[int] = []  # landed writes to acknowledge, sent batched ahead of everything else
        self._ack_since = 0.0
        self._acks_held = False  # ACKs queued without waking the wire thread (more frames were readable)
        self._finishing = False  # the wire thread sends remaining control frames, then stops
        self._refusal = ("", "")  # (counter label, NAK text) of the write _target just refused
        self.refused_writes: Counter[str] = Counter()  # writes refused here (NAK) by reason
        self._recv_thread = threading.Thread(target=self._recv_loop, name=f"{self.label}-recv", daemon=True)
        self._wire_thread = threading.Thread(target=self._wire_loop, name=f"{self.label}-wire", daemon=True)
        self._recv_thread.start()
        self._wire_thread.start()

    @classmethod
    def _listener(cls) -> TcpListener:
        return TcpListener()

    # -- posting ---------------------------------------------------------------
    def _post(self, mv: memoryview, region: int, offset: int, length: int, tag: Tag, imm: int | None) -> int:
        """Queue a checked write to the peer's region at offset; returns its wr_id."""
        now = time.monotonic()
        with self._lock:
            self._check_postable()
            wr_id = next(self._wr_ids)
            self._pending[wr_id] = (tag, length)
            due = self._faults.due_time(now) if self._faults else now
            hdr = Header(FrameType.WRITE, wr_id, region, offset, length, imm, tag)
            heapq.heappush(self._wire, (due, next(self._seq), hdr, mv[:length]))
            self._lock.notify_all()
        return wr_id

    def outstanding(self) -> int:
        """Number of posted writes without a completion yet."""
        with self._lock:
            return len(self._pending)

    def _queue_control(self, hdr: Header, payload: bytes | None = None) -> None:
        # due 0.0: control frames overtake delayed writes, like a NIC's ACKs
        with self._lock:
            heapq.heappush(self._wire, (0.0, next(self._seq), hdr, memoryview(payload) if payload else None))
            self._lock.notify_all()

    # -- failure ---------------------------------------------------------------
    def _die(self, reason: str) -> None:
        """Mark the connection dead and fail every write without a completion."""
        with self._lock:
            if self._dead_reason is None:
                self._dead_reason = reason
            self._flush_pending(f"connection dead: {self._dead_reason}")
            self._finishing = True
            self._lock.notify_all()

    def _flush_pending(self, why: str) -> None:
        for wr_id, (tag, length) in sorted(self._pending.items()):
            self._cq.put(Completion(wr_id, tag, length, Status.ERROR, why))
        self._pending.clear()
        # unsent writes will never go out; keep only control frames (a NAK or CLOSE)
        self._wire = [item for item in self._wire if item[2].type is not FrameType.WRITE]
        heapq.heapify(self._wire)

    # -- wire thread -------------------------------------------------------------
    def _wire_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while True:
                        if self._acks or (self._wire and (self._finishing or self._wire[0][0] <= time.monotonic())):
                            break
                        if self._finishing:
                            return
                        wait = self._wire[0][0] - time.monotonic() if self._wire else None
                        self._lock.wait(wait)
                    bufs, drop = self._take_ready()
                self._send(bufs)
                if drop:
                    with self._lock:
                        sent = self._faults._sent if self._faults else 0  # noqa: SLF001 - reason text only
                        self._dead_reason = self._dead_reason or (
                            f"connection dropped by fault injection after {sent} writes")
                        self._flush_pending(f"connection dead: {self._dead_reason}")
                        self._finishing = True
                    return
        except OSError as e:
            if not self._closed:
                self._die(f"send failed: {e!r}")
        finally:
            # wake the peer and our own receive thread; closing the fd is close_and_drain's job
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _take_ready(self) -> tuple[list[memoryview], bool]:
        """Pop the frames that are due, as one batch to save syscalls; True if a fault drops the connection."""
        bufs: list[memoryview] = []
        now, nbytes = time.monotonic(), 0
        if self._acks:
            bufs += map(memoryview, encode_acks(self._acks[:MAX_ACKS]))
            del self._acks[:MAX_ACKS]
        while self._wire and (self._finishing or self._wire[0][0] <= now) and len(bufs) < BATCH_BUFS \
                and nbytes < _BATCH_BYTES:
            _, _, hdr, payload = heapq.heappop(self._wire)
            if hdr.type is FrameType.WRITE and self._faults and self._faults.drop_now():
                return bufs, True  # what was taken before the drop point still goes out
            bufs.append(memoryview(encode_header(hdr)))
            if payload is not None and payload.nbytes:
                bufs.append(payload)
                nbytes += payload.nbytes
        return bufs, False

    def _send(self, bufs: list[memoryview]) -> None:
        while bufs:
            n = self._sock.sendmsg(bufs)
            i = 0
            while i < len(bufs) and n >= bufs[i].nbytes:
                n -= bufs[i].nbytes
                i += 1
            bufs = bufs[i:]
            if n:
                bufs[0] = bufs[0][n:]

    # -- close -----------------------------------------------------------------
    def close_and_drain(self, timeout: float = 5.0) -> None:
        """Close; on return the receive thread is joined and the socket closed, so nothing lands here."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._flush_pending("transport closed before the write completed")
            if self._dead_reason is None and not self._finishing:
                self._queue_control(Header(FrameType.CLOSE, 0))  # lets the peer report an orderly close
            self._dead_reason = self._dead_reason or "closed locally (close_and_drain)"
            self._finishing = True
            self._lock.notify_all()
        self._wire_thread.join(timeout / 2)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        deadline = time.monotonic() + timeout / 2
        for t in (self._wire_thread, self._recv_thread):
            if t is not threading.current_thread():  # called from on_land: the loop stops on _closed
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    raise TransportError(f"{self.label}: thread {t.name} did not stop within {timeout} s")
        self._sock.close()
