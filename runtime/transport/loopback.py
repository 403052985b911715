"""In-process loopback transport for unit and model-based tests.

Two endpoints share one process. In immediate mode a write lands and completes
inside post_write. In controllable mode writes wait on the sender's "wire"
until the test lands them (`land`, `land_next`, `land_all`) or fails them
(`fail`), in any order it likes; landing and completing can be split
(`land(wr_id, complete=False)` then `complete(wr_id)`) to model a write that
landed while its ACK is still on the way. The source is read at landing time,
as a NIC reads it when the write goes on the wire.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from dataclasses import dataclass

from .base import (
    Completion, LandHook, RecvEvent, Status, Tag, Transport, TransportClosed, TransportError, check_bounds,
)


@dataclass(frozen=True)
class PendingWrite:
    """A posted write of a controllable loopback that has not completed."""

    wr_id: int
    tag: Tag
    region: int
    offset: int
    length: int
    imm: int | None
    landed: bool = False


class LoopbackTransport(Transport):
    """One endpoint of an in-process connection; see loopback_pair."""

    name = "loopback"

    def __init__(self, *, controllable: bool = False, on_land: LandHook | None = None,
                 peer: "LoopbackTransport | None" = None) -> None:
        super().__init__(on_land)
        self.controllable = controllable
        self._peer: LoopbackTransport | None = None
        self._lock = threading.RLock()  # shared with the peer once connected
        self._wr_ids = itertools.count(1)
        self._queue: dict[int, tuple[PendingWrite, memoryview]] = {}  # insertion order = post order
        if peer is not None:
            self.connect(peer)

    def connect(self, peer: "LoopbackTransport") -> None:
        """Join this endpoint to peer (both directions)."""
        if self._peer is not None or peer._peer is not None:
            raise TransportError("connect: an endpoint is already connected")
        if peer is self:
            raise ValueError("connect: peer is this endpoint, expected another LoopbackTransport")
        self._peer, peer._peer = peer, self
        peer._lock = self._lock

    # -- posting ---------------------------------------------------------------
    def _post(self, mv: memoryview, region: int, offset: int, length: int, tag: Tag, imm: int | None) -> int:
        """Queue a checked write to the peer's region at offset; returns its wr_id."""
        with self._lock:
            self._check_postable()
            if self._peer is None:
                raise TransportClosed("post_write: loopback endpoint has no peer; call connect(peer) first")
            wr_id = next(self._wr_ids)
            self._queue[wr_id] = (PendingWrite(wr_id, tag, region, offset, length, imm), mv[:length])
            if not self.controllable:
                self.land(wr_id)
        return wr_id

    def outstanding(self) -> int:
        """Number of posted writes without a completion yet."""
        with self._lock:
            return len(self._queue)

    # -- test control (controllable mode) ---------------------------------------
    def pending(self) -> list[PendingWrite]:
        """Writes posted here and not completed, in post order."""
        with self._lock:
            return [pw for pw, _ in self._queue.values()]

    def land(self, wr_id: int, complete: bool = True) -> Completion | None:
        """Land write wr_id in the peer's memory (and complete it unless complete=False)."""
        with self._lock:
            pw, mv = self._take(wr_id)
            if pw.landed:
                raise ValueError(f"land: wr_id={wr_id} already landed; call complete({wr_id})")
            peer = self._peer
            assert peer is not None
            error = peer._place(pw, mv)
            if error is not None:
                # the NIC refused it: the connection breaks on both sides, as an RC QP would
                del self._queue[wr_id]
                self._finish(pw, error)
                self._die(f"peer rejected write wr_id={wr_id}: {error}")
                peer._die(error)
                return None
            self._queue[wr_id] = (dataclasses.replace(pw, landed=True), mv)
            return self.complete(wr_id) if complete else None

    def complete(self, wr_id: int) -> Completion:
        """Deliver the completion of a write that already landed."""
        with self._lock:
            pw, _ = self._take(wr_id)
            if not pw.landed:
                raise ValueError(f"complete: wr_id={wr_id} has not landed yet; call land({wr_id}) first")
            del self._queue[wr_id]
            return self._finish(pw, None)

    def land_next(self) -> Completion | None:
        """Land and complete the oldest write that has not landed."""
        with self._lock:
            for pw, _ in self._queue.values():
                if not pw.landed:
                    return self.land(pw.wr_id)
        raise ValueError("land_next: no write waiting to land")

    def land_all(self) -> list[Completion]:
        """Land and complete every waiting write in post order."""
        out = []
        for pw in self.pending():
            if not self._dead_reason:
                c = self.land(pw.wr_id) if not pw.landed else self.complete(pw.wr_id)
                if c is not None:
                    out.append(c)
        return out

    def fail(self, wr_id: int, reason: str = "failed by test") -> Completion:
        """Complete a write with an error without landing it (if it has not landed)."""
        with self._lock:
            pw, _ = self._take(wr_id)
            del self._queue[wr_id]
            return self._finish(pw, reason)

    def kill(self, reason: str = "peer killed by test") -> None:
        """Break the connection: both endpoints dead, waiting writes fail unlanded."""
        with self._lock:
            self._die(reason)
            if self._peer is not None:
                self._peer._die(reason)

    # -- internals ---------------------------------------------------------------
    def _take(self, wr_id: int) -> tuple[PendingWrite, memoryview]:
        if wr_id not in self._queue:
            raise KeyError(f"wr_id={wr_id} is not a pending write of this endpoint (pending: {list(self._queue)})")
        return self._queue[wr_id]

    def _finish(self, pw: PendingWrite, error: str | None) -> Completion:
        c = Completion(pw.wr_id, pw.tag, pw.length, Status.ERROR if error else Status.OK, error)
        self._cq.put(c)
        return c

    def _place(self, pw: PendingWrite, src: memoryview) -> str | None:
        """Receiver side: copy into the region; returns an error text if refused."""
        if self._closed or self._dead_reason is not None:
            return f"receiver is {'closed' if self._closed else 'dead'}"
        found = self._lookup(pw.region)
        if found is None:
            return f"region={pw.region} is not registered (registered: {sorted(r.id for r in self.regions())})"
        region, mem = found
        try:
            check_bounds(region, pw.offset, pw.length)
        except ValueError as e:
            return str(e)
        mem[pw.offset : pw.offset + pw.length] = src
        if self.on_land is not None:
            self.on_land(pw.tag, pw.region, pw.offset, pw.length)
        if pw.imm is not None:
            self._push_recv(RecvEvent(pw.imm, pw.length, pw.region, pw.offset, pw.tag))
        return None

    def _die(self, reason: str) -> None:
        if self._dead_reason is None:
            self._dead_reason = reason
        for wr_id in list(self._queue):
            pw, _ = self._queue.pop(wr_id)
            self._finish(pw, f"connection dead: {self._dead_reason}")

    def close_and_drain(self, timeout: float = 5.0) -> None:
        """Close; on return no write can land here (lands are refused under the shared lock)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._dead_reason = self._dead_reason or "closed locally (close_and_drain)"
            for wr_id in list(self._queue):
                pw, _ = self._queue.pop(wr_id)
                self._finish(pw, "transport closed before the write completed")
            if self._peer is not None:
                self._peer._die("peer closed the connection")


def loopback_pair(controllable: bool = False) -> tuple[LoopbackTransport, LoopbackTransport]:
    """Two connected in-process endpoints."""
    a = LoopbackTransport(controllable=controllable)
    b = LoopbackTransport(controllable=controllable, peer=a)
    return a, b
