"""The TCP transport: one-sided writes over a loopback socket, the embedded default.

Two threads per connection. The receive thread reads frames and copies each
WRITE payload into the destination region (the bulk by recv_into straight into
it; only bytes that arrived with the header pass through a 4 KiB buffer), calls
on_land, then queues an ACK. It checks only that the region
exists and the bytes fit, as a NIC checks an rkey and bounds; it never looks at
protocol state. The wire thread sends queued frames in order of their due time,
so a write delayed by fault injection goes on the wire, and lands, after
writes and control messages sent later. The receive thread never sends itself:
it only queues, so two peers writing at each other cannot deadlock on full
socket buffers.

An ERROR completion means "not known to have landed": a write whose ACK was
lost with the connection may still have landed. Only close_and_drain at the
receiver guarantees that nothing lands any more.
"""

from __future__ import annotations

import heapq
import itertools
import select
import socket
import threading
import time
from collections import Counter
from typing import Any

from .base import (
    Buffer, Completion, LandHook, RecvEvent, Region, Status, Tag, Transport, TransportError, check_bounds, check_imm,
    check_tag, check_write_args,
)
from .faults import FaultConfig, FaultInjector
from .frames import (
    HEADER, MAX_ACKS, MAX_REASON, FrameError, FrameType, Header, SocketReader, decode_acks, decode_header,
    encode_acks, encode_header,
)

Address = tuple[str, int]
BATCH_BUFS, _BATCH_BYTES = 128, 4 * 1024 * 1024  # per sendmsg; IOV_MAX is 1024
_ACK_BATCH, _ACK_HOLD_S = 256, 0.0005  # ACKs are held back at most this many / this long
MAX_DISCARD = 64 << 20  # a refused write up to this long is skipped; a longer one drops the connection


class TcpListener:
    """A listening socket that accepts TcpTransport connections."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, backlog: int = 16) -> None:
        self._sock = socket.create_server((host, port), backlog=backlog)

    @property
    def address(self) -> Address:
        """The (host, port) peers connect to."""
        host, port = self._sock.getsockname()[:2]
        return host, port

    def accept_socket(self, timeout: float | None = 5.0) -> socket.socket:
        """Accept one connection and return its blocking socket."""
        self._sock.settimeout(timeout)
        try:
            conn, _ = self._sock.accept()
        except socket.timeout:
            raise TimeoutError(f"no peer connected to {self.address} within timeout={timeout} s") from None
        conn.settimeout(None)
        return conn

    def accept(self, timeout: float | None = 5.0, **kw: Any) -> "TcpTransport":
        """Accept one connection and wrap it; kw go to TcpTransport."""
        return TcpTransport(self.accept_socket(timeout), **kw)

    @property
    def sock(self) -> socket.socket:
        """The listening socket (for an authenticating accept loop)."""
        return self._sock

    def close(self) -> None:
        """Stop listening."""
        self._sock.close()

    def __enter__(self) -> "TcpListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpTransport(Transport):
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
        self._reader = SocketReader(sock, self._before_recv)
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
    def connect(cls, address: Address, timeout: float = 5.0, **kw: Any) -> "TcpTransport":
        """Connect to a TcpListener at address; kw go to TcpTransport."""
        sock = socket.create_connection(address, timeout=timeout)
        sock.settimeout(None)
        return cls(sock, **kw)

    @classmethod
    def pair(cls, **kw: Any) -> tuple["TcpTransport", "TcpTransport"]:
        """Two connected endpoints over loopback TCP (for tests and benchmarks)."""
        with TcpListener() as lst:
            a = cls.connect(lst.address, **kw)
            b = lst.accept(**kw)
        return a, b

    # -- posting ---------------------------------------------------------------
    def post_write(
        self,
        src: Buffer,
        region: int,
        offset: int,
        length: int | None = None,
        *,
        tag: Tag = (),
        imm: int | None = None,
    ) -> int:
        """Post a one-sided write of src[:length] to the peer's region at offset; returns its wr_id."""
        mv, length = check_write_args(src, region, offset, length)
        tag, imm = check_tag(tag), check_imm(imm)
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

    # -- receive thread ------------------------------------------------------------
    def _recv_exact(self, mv: memoryview) -> bool:
        """Fill mv from the socket; False on EOF."""
        return self._reader.read_into(mv)

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
