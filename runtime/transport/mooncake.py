"""Mooncake Transfer Engine transport: bulk bytes by the engine SGLang uses for PD, MAC-checked landing.

Mooncake's Transfer Engine (PyPI `mooncake-transfer-engine-non-cuda`; TCP here, RDMA in
production) writes into any buffer registered with it, for anyone who can reach its RPC port: it
has no notion of a peer's identity. So the engine never writes into a slot directly. Each endpoint
registers a *staging* ring with its engine; a write goes

    sender: copy src into its own registered mirror of the peer's ring at the slot the sender
            allocated -> `transfer_sync_write` into the peer's ring -> on the (authenticated)
            TCP connection, a WRITE frame whose payload is a descriptor: ring offset + HMAC-SHA256
            of (wr_id, region, offset, length, imm, tag, bytes) under the connection key
    receiver: check the MAC with the connection key (from the auth handshake), check region and
            bounds, copy ring -> region (that is the landing: on_land, ACK)

Foreign bytes written into the ring by someone else fail the MAC and are refused (counted in
`refused_writes["bad_mac"]`); they never reach a slot. The engine also serves *reads* of
registered memory to anyone who reaches it, so the staged KV bytes are readable from its port:
keep the engines' ports on the deployment's fabric (firewalled), as with Mooncake anywhere. Everything else — framing, ACK/NAK,
fault injection (delays, drops), death detection, close_and_drain — is the TCP transport's: this
class only moves the payload differently, so the protocol code cannot tell the two apart.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import os
import secrets
import socket
import struct
import time
from collections import deque
from typing import Any

import numpy as np

from .base import Tag, TransportClosed, TransportError, TransportUnavailable
from .frames import MAX_ACKS, FrameType, Header, encode_acks, encode_header
from .tcp import BATCH_BUFS, TcpTransport

HOWTO = ("Mooncake's Transfer Engine is not importable: `pip install 'kvproof[mooncake]'` "
         "(PyPI mooncake-transfer-engine-non-cuda) and `apt-get install libibverbs1` (needed even for TCP)")
DESC = struct.Struct("<Q32s")          # ring offset, MAC
STAGING_BYTES = 16 << 20               # per direction and connection


def mooncake_engine_class() -> Any:
    """Import Mooncake's TransferEngine or raise TransportUnavailable saying how to install it."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # the engine logs every connection at INFO otherwise
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise TransportUnavailable(f"{HOWTO} ({e})") from None
    return TransferEngine


class _Ring:
    """Sender-side allocator of the peer's staging ring: FIFO, freed as writes complete."""

    def __init__(self, size: int) -> None:
        self.size, self.head = size, 0
        self.live: deque[list[int]] = deque()   # [wr_id, start, end, done]
        self.index: dict[int, list[int]] = {}

    def alloc(self, wr_id: int, n: int) -> int | None:
        """Start of n free bytes for write wr_id, or None while the ring is full."""
        if not self.live:
            self.head = 0
            start = 0
        else:
            tail = self.live[0][1]
            if self.head >= tail and self.size - self.head >= n:
                start = self.head
            elif self.head >= tail and n <= tail:
                start = 0
            elif self.head < tail and tail - self.head >= n:
                start = self.head
            else:
                return None
        entry = [wr_id, start, start + n, 0]
        self.live.append(entry)
        self.index[wr_id] = entry
        self.head = start + n
        return start

    def release(self, wr_id: int) -> None:
        """Write wr_id completed (ACK, NAK or failure): its bytes may be reused once older ones are."""
        entry = self.index.pop(wr_id, None)
        if entry is not None:
            entry[3] = 1
        while self.live and self.live[0][3]:
            self.live.popleft()


class _TeWrite:
    """A bulk copy the wire thread performs before the descriptor frame that announces it."""

    __slots__ = ("hdr", "payload", "off", "desc")

    def __init__(self, hdr: Header, payload: memoryview, off: int, desc: bytearray) -> None:
        self.hdr, self.payload, self.off, self.desc = hdr, payload, off, desc


class MooncakeTransport(TcpTransport):
    """One endpoint: Transfer Engine for the bytes, the TCP transport's frames for everything else."""

    name = "mooncake"

    def __init__(self, sock: socket.socket, *, key: bytes | None = None, staging_bytes: int = STAGING_BYTES,
                 timeout: float = 10.0, **kw: Any) -> None:
        engine_cls = mooncake_engine_class()
        if staging_bytes < 4096:
            raise ValueError(f"staging_bytes={staging_bytes}, expected >= 4096")
        host = sock.getsockname()[0]                 # the address the peer already reaches us on
        self._te = engine_cls()
        if self._te.initialize(f"{host}:0", "P2PHANDSHAKE", "tcp", "") != 0:
            raise TransportError(f"mooncake: TransferEngine.initialize({host}:0, P2PHANDSHAKE, tcp) failed")
        # incoming ring (the peer writes here) and the outgoing mirror (our source buffer, registered as
        # RDMA needs it): both owned by numpy so they live as long as this object
        self._in = np.zeros(staging_bytes, dtype=np.uint8)
        self._out = np.zeros(staging_bytes, dtype=np.uint8)
        for arr in (self._in, self._out):
            if self._te.register_memory(arr.ctypes.data, arr.nbytes) != 0:
                raise TransportError(f"mooncake: register_memory of {arr.nbytes} bytes failed")
        nonce = secrets.token_bytes(16)
        mine = {"rpc": f"{host}:{self._te.get_rpc_port()}", "ring": self._in.ctypes.data, "size": staging_bytes,
                "nonce": nonce.hex()}
        peer = _exchange(sock, mine, timeout)
        self._peer_rpc, self._peer_ring = str(peer["rpc"]), int(peer["ring"])
        self._ring = _Ring(min(int(peer["size"]), staging_bytes))
        nonces = b"".join(sorted([nonce, bytes.fromhex(peer["nonce"])]))
        # with the auth handshake's key only deployment members can MAC; without one (tests) the key is
        # still private to the two ends of this connection
        self._mac_key = hashlib.blake2b(nonces, key=(key or b"")[:64], digest_size=32).digest()
        self._ring_full = False
        super().__init__(sock, **kw)

    # -- sender ---------------------------------------------------------------------
    def _post(self, mv: memoryview, region: int, offset: int, length: int, tag: Tag, imm: int | None) -> int:
        """Post a checked write (see Transport.post_write); at most the staging ring's size."""
        if length > self._ring.size:
            raise ValueError(f"write of {length} bytes: a mooncake write is at most the staging ring, "
                             f"{self._ring.size} bytes")
        return super()._post(mv, region, offset, length, tag, imm)

    def _take_ready(self) -> tuple[list[Any], bool]:
        bufs: list[Any] = []
        now = time.monotonic()
        if self._acks:
            bufs += map(memoryview, encode_acks(self._acks[:MAX_ACKS]))
            del self._acks[:MAX_ACKS]
        self._ring_full = False
        while self._wire and (self._finishing or self._wire[0][0] <= now) and len(bufs) < BATCH_BUFS:
            _, _, hdr, payload = self._wire[0]
            if hdr.type is FrameType.WRITE:
                off = self._ring.alloc(hdr.wr_id, hdr.length)
                if off is None:                      # wait for ACKs to free the peer's ring
                    self._ring_full = True
                    break
                heapq.heappop(self._wire)
                if self._faults and self._faults.drop_now():
                    return bufs, True
                desc = bytearray(DESC.size)
                bufs += [_TeWrite(hdr, payload, off, desc), memoryview(encode_header(hdr)), memoryview(desc)]
            else:
                heapq.heappop(self._wire)
                bufs.append(memoryview(encode_header(hdr)))
                if payload is not None and payload.nbytes:
                    bufs.append(payload)
        if not bufs and self._ring_full:
            self._lock.wait(0.002)                   # released by _complete's notify
        return bufs, False

    def _send(self, bufs: list[Any]) -> None:
        run: list[memoryview] = []
        for b in bufs:
            if isinstance(b, _TeWrite):
                if run:
                    super()._send(run)
                    run = []
                self._te_write(b)
            else:
                run.append(b)
        if run:
            super()._send(run)

    def _te_write(self, w: _TeWrite) -> None:
        n = w.hdr.length
        if n:
            self._out[w.off : w.off + n] = np.frombuffer(w.payload, dtype=np.uint8, count=n)
            rc = self._te.transfer_sync_write(self._peer_rpc, self._out.ctypes.data + w.off, self._peer_ring + w.off, n)
            if rc != 0:
                raise OSError(f"mooncake transfer_sync_write of {n} bytes to {self._peer_rpc} failed (rc {rc})")
        DESC.pack_into(w.desc, 0, w.off, self._mac(w.hdr, w.payload[:n]))

    def _mac(self, hdr: Header, data: Any) -> bytes:
        h = hmac.new(self._mac_key, digestmod=hashlib.sha256)  # SHA-256 runs ~1.7x BLAKE2b here (SHA-NI)
        h.update(struct.pack("<QIQQq4q", hdr.wr_id, hdr.region, hdr.offset, hdr.length,
                             -1 if hdr.imm is None else hdr.imm, *(tuple(hdr.tag) + (0,) * (4 - len(hdr.tag)))))
        h.update(data)
        return h.digest()

    def _complete(self, wr_id: int, error: str | None) -> None:
        super()._complete(wr_id, error)
        with self._lock:
            self._ring.release(wr_id)
            self._lock.notify_all()

    # -- receiver -------------------------------------------------------------------
    def _place(self, hdr: Header) -> bool:
        desc = bytearray(DESC.size)
        if not self._recv_exact(memoryview(desc)):
            self._die(f"peer closed the connection (EOF) inside write wr_id={hdr.wr_id}")
            return False
        off, mac = DESC.unpack(desc)
        if off + hdr.length > self._in.nbytes:
            self._reject(hdr.wr_id, f"malformed frame: ring offset {off} + length {hdr.length} beyond the "
                                    f"staging ring of {self._in.nbytes} bytes")
            return False
        data = memoryview(self._in)[off : off + hdr.length]
        if not hmac.compare_digest(mac, self._mac(hdr, data)):
            self._refusal = ("bad_mac", f"write wr_id={hdr.wr_id}: MAC mismatch, the staged bytes are not the "
                                        f"peer's (foreign or corrupted)")
            return self._refuse_write(hdr, 0)
        found = self._target(hdr)
        if found is None:
            return self._refuse_write(hdr, 0)
        _, mem = found
        mem[hdr.offset : hdr.offset + hdr.length] = data
        self._landed(hdr)
        return True

    def close_and_drain(self, timeout: float = 5.0) -> None:
        """Close (see TcpTransport.close_and_drain), then unregister the staging buffers and destroy the engine."""
        super().close_and_drain(timeout)  # raises, keeping the engine, if a thread that may use it still runs
        te, self._te = self._te, None
        if te is None:  # closed before
            return
        for arr in (self._in, self._out):
            te.unregister_memory(arr.ctypes.data)
        # The engine's destructor holds the GIL for about a second (Mooncake 0.3.13: it stops its
        # handshake server). Here the caller of close pays it; left to the cyclic garbage collector
        # (a transport is in reference cycles through its hooks' owners) it stalled whichever
        # thread collected, e.g. another transport's in the middle of a transfer.
        del te

    @property
    def staging_address(self) -> tuple[str, int, int]:
        """(engine rpc address, ring address, ring bytes) of this endpoint's incoming ring (for tests)."""
        if self._te is None:
            raise TransportClosed(f"{self.label}: staging_address of a closed mooncake transport (engine destroyed)")
        return f"{self._sock.getsockname()[0]}:{self._te.get_rpc_port()}", self._in.ctypes.data, self._in.nbytes


def _exchange(sock: socket.socket, mine: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Swap one JSON line of set-up data with the peer over the connection."""
    sock.settimeout(timeout)
    try:
        sock.sendall(json.dumps(mine).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise TransportError("mooncake: peer closed the connection during set-up")
            buf += chunk
            if len(buf) > 4096:
                raise TransportError("mooncake: set-up line longer than 4096 bytes")
    except socket.timeout:
        raise TransportError(f"mooncake: no set-up data from the peer within {timeout} s") from None
    finally:
        sock.settimeout(None)
    try:
        peer = json.loads(buf)
        for k in ("rpc", "ring", "size", "nonce"):
            peer[k]
    except (ValueError, KeyError, TypeError) as e:
        raise TransportError(f"mooncake: malformed set-up data from the peer: {e!r}") from None
    return peer
