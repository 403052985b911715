"""RDMA RC transport through pyverbs (rdma-core's Python bindings), the production path.

pyverbs is imported lazily (verbs_device.py): without it, or without an RDMA device,
constructing a VerbsTransport raises TransportUnavailable saying how to get one. The
connection is bootstrapped over a TCP socket that stays open: it carries the
queue-pair handshake, region announcements (id, address, rkey, length) and an
orderly close, and its EOF is how peer death is noticed besides QP errors.

Differences from the TCP transport, all forced by the hardware:
- the NIC places bytes without software, so there is no on_land hook; a
  WRITE_WITH_IMM produces a RecvEvent (imm, length) at the receiver;
- a write's source must lie inside memory registered here (it needs an lkey),
  so register the buffers you write from as well as those you write into;
- the tag stays at the sender (it comes back in the completion).

Memory windows (optional hardware fence): `bind_window` exposes a sub-range of
a region under its own rkey and `invalidate_window` revokes it with a local
invalidate. After a decode worker invalidates the window of a reclaimed slot,
a late write aimed at it fails with a remote access error at the writer (whose
QP then enters the error state) instead of landing in the next request's KV.
It turns a protocol bug into a loud failure; it is not a substitute for the
safe-to-recycle handshake.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from typing import Any

from .base import (
    Buffer, Completion, LandHook, Region, RecvEvent, Status, Tag, Transport,
    TransportError, TransportUnavailable, check_bounds,
)
from .verbs_device import Bootstrap, VerbsConfig, address_of, connect_qp, load_pyverbs, rdma_devices

CTL_BIT = 1 << 63  # marks the wr_id of a memory-window work request


class VerbsTransport(Transport):
    """One endpoint of an RDMA RC connection."""

    name = "verbs"

    def __init__(self, bootstrap: socket.socket, *, config: VerbsConfig = VerbsConfig(),
                 on_land: LandHook | None = None) -> None:
        pv = load_pyverbs()
        names = rdma_devices()
        if on_land is not None:
            raise TransportError("verbs: on_land cannot be observed (the NIC places bytes without software); "
                                 "use WRITE_WITH_IMM and poll_recv()")
        super().__init__(None)
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPCap, QPInitAttr

        e = pv.enums
        self._e, self.config = e, config
        dev = config.device or names[0]
        if dev not in names:
            raise TransportUnavailable(f"device={dev!r} not found, expected one of {names}")
        self._ctx = Context(name=dev)
        self._pd = PD(self._ctx)
        self._send_cq = CQ(self._ctx, config.cq_depth, None, None, 0)
        self._recv_cq = CQ(self._ctx, config.cq_depth, None, None, 0)
        cap = QPCap(max_send_wr=config.max_send_wr, max_recv_wr=config.max_recv_wr, max_send_sge=1, max_recv_sge=1)
        self._qp = QP(self._pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self._send_cq, rcq=self._recv_cq, cap=cap))
        self._mrs: dict[int, Any] = {}  # region id -> MR
        self._windows: dict[int, tuple[Any, int]] = {}  # window id -> (MW, rkey)
        self._ctl: dict[int, tuple[threading.Event, list[int]]] = {}  # memory-window WRs in flight
        self._pending: dict[int, tuple[Tag, int]] = {}
        self._lock = threading.Lock()
        self._wr_ids = itertools.count(1)
        self._boot = Bootstrap(bootstrap, self._lock)
        self._remote = self._boot.remote  # peer region id -> (addr, rkey, length), as announced
        self._recv_mr = MR(self._pd, 64, e.IBV_ACCESS_LOCAL_WRITE)  # the SGE receive WRs must carry
        connect_qp(e, config, self._ctx, self._qp, self._boot.send, self._boot.recv, self._post_recv)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, name=f"verbs-{n}", daemon=True)
                         for n, f in (("poll", self._poll_loop), ("boot", self._boot_loop))]
        for t in self._threads:
            t.start()

    @classmethod
    def connect(cls, address: tuple[str, int], timeout: float = 10.0, **kw: Any) -> "VerbsTransport":
        """Bootstrap over TCP to a peer accepting at address."""
        load_pyverbs(), rdma_devices()  # fail fast, before touching the network
        sock = socket.create_connection(address, timeout=timeout)
        sock.settimeout(None)
        return cls(sock, **kw)

    def _boot_loop(self) -> None:
        self._boot.serve(self._stop, self._die, lambda: self._closed)

    def wait_remote_region(self, region: int, timeout: float = 5.0) -> None:
        """Block until the peer has announced region (registration is asynchronous)."""
        self._boot.wait_region(region, timeout)

    # -- memory ----------------------------------------------------------------------
    def register(self, buf: Buffer, region_id: int | None = None) -> Region:
        """Register memory with the NIC (as a write source and destination) and announce it."""
        from pyverbs.mr import MR

        e = self._e
        region = super().register(buf, region_id)
        _, mv = self._lookup(region.id)  # type: ignore[misc]
        addr = address_of(mv)
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_MW_BIND
        self._mrs[region.id] = MR(self._pd, region.length, access, address=addr)
        self._boot.announce(region.id, addr, self._mrs[region.id].rkey, region.length)
        return region

    def deregister(self, region_id: int) -> None:
        """Withdraw a region: the peer forgets it and the NIC rejects writes to it."""
        super().deregister(region_id)
        self._boot.withdraw(region_id)
        self._mrs.pop(region_id).close()

    def bind_window(self, region_id: int, offset: int, length: int, window_id: int) -> None:
        """Expose [offset, offset+length) of a region to the peer as region window_id (type-2 MW)."""
        from pyverbs.mr import MW, MWBindInfo
        from pyverbs.wr import SendWR

        e = self._e
        region, mv = self._lookup(region_id) or (None, None)
        if region is None:
            raise KeyError(f"region_id={region_id} is not registered here")
        check_bounds(region, offset, length)
        if window_id in self._windows:
            raise ValueError(f"window_id={window_id} is already bound; invalidate it first")
        mw = MW(self._pd, e.IBV_MW_TYPE_2)
        wr = SendWR(opcode=e.IBV_WR_BIND_MW, send_flags=e.IBV_SEND_SIGNALED)
        addr = address_of(mv) + offset
        wr.set_bind_wr(mw, MWBindInfo(self._mrs[region_id], addr, length, e.IBV_ACCESS_REMOTE_WRITE))
        rkey = wr.rkey  # set_bind_wr derives the window's next rkey; the peer must use this one
        self._post_and_wait(wr, f"bind window {window_id}")
        self._windows[window_id] = (mw, rkey)
        # announced only once the bind completed, so the peer never writes through an unbound rkey
        self._boot.announce(window_id, addr, rkey, length)

    def invalidate_window(self, window_id: int) -> None:
        """Revoke a window's rkey: later writes through it fail at the writer instead of landing."""
        from pyverbs.wr import SendWR

        if window_id not in self._windows:
            raise KeyError(f"window_id={window_id} is not bound here (bound: {sorted(self._windows)})")
        mw, rkey = self._windows.pop(window_id)
        # invalidate_rkey shares a union with imm_data in ibv_send_wr; pyverbs exposes only the latter
        wr = SendWR(opcode=self._e.IBV_WR_LOCAL_INV, imm_data=rkey, send_flags=self._e.IBV_SEND_SIGNALED)
        self._post_and_wait(wr, f"invalidate window {window_id}")  # on return the fence is in place
        self._boot.withdraw(window_id)
        mw.close()

    def _post_and_wait(self, wr: Any, what: str, timeout: float = 5.0) -> None:
        """Post a memory-window work request and wait for its completion."""
        done = threading.Event()
        with self._lock:
            wr.wr_id = next(self._wr_ids) | CTL_BIT
            self._ctl[wr.wr_id] = (done, [])
        self._qp.post_send(wr)
        if not done.wait(timeout):
            raise TransportError(f"verbs: {what} did not complete within {timeout} s")
        status = self._ctl.pop(wr.wr_id)[1]
        if status != [self._e.IBV_WC_SUCCESS]:
            raise TransportError(f"verbs: {what} failed with wc status {status}")

    def _source(self, mv: memoryview) -> tuple[int, int]:
        """(address, lkey) of a source inside a locally registered region."""
        addr = address_of(mv) if not mv.readonly else None
        if addr is not None:
            for rid, mr in self._mrs.items():
                base = address_of(self._lookup(rid)[1])  # type: ignore[index]
                if base <= addr and addr + mv.nbytes <= base + mr.length:
                    return addr, mr.lkey
        raise ValueError("src is not inside a region registered on this endpoint; "
                         "verbs writes need a registered source (call register() on it)")

    # -- writes ----------------------------------------------------------------------
    def _post(self, mv: memoryview, region: int, offset: int, length: int, tag: Tag, imm: int | None) -> int:
        """Post a checked RDMA WRITE (WRITE_WITH_IMM if imm is given); returns its wr_id."""
        from pyverbs.wr import SGE, SendWR

        e = self._e
        addr, lkey = self._source(mv)
        with self._lock:
            self._check_postable()
            if region not in self._remote:
                raise ValueError(f"region={region} is not announced by the peer (known: {sorted(self._remote)})")
            raddr, rkey, rlen = self._remote[region]
            check_bounds(Region(region, rlen), offset, length)
            wr_id = next(self._wr_ids)
            op = e.IBV_WR_RDMA_WRITE if imm is None else e.IBV_WR_RDMA_WRITE_WITH_IMM
            wr = SendWR(wr_id=wr_id, opcode=op, num_sge=1, sg=[SGE(addr, length, lkey)],
                        send_flags=e.IBV_SEND_SIGNALED, imm_data=socket.htonl(imm or 0))
            wr.set_wr_rdma(rkey, raddr + offset)
            self._pending[wr_id] = (tag, length)
            self._qp.post_send(wr)
        return wr_id

    def outstanding(self) -> int:
        """Number of posted writes without a completion yet."""
        with self._lock:
            return len(self._pending)

    def _post_recv(self) -> None:
        from pyverbs.wr import SGE, RecvWR

        # WRITE_WITH_IMM consumes a receive WR; its buffer stays untouched but pyverbs demands one SGE
        sge = SGE(self._recv_mr.buf, self._recv_mr.length, self._recv_mr.lkey)
        self._qp.post_recv(RecvWR(wr_id=0, num_sge=1, sg=[sge]))

    def _poll_loop(self) -> None:
        e = self._e
        while not self._stop.is_set():
            busy = False
            n, wcs = self._send_cq.poll(num_entries=64)
            for wc in wcs[:n]:
                busy = True
                if wc.wr_id & CTL_BIT:  # a memory-window bind or invalidate
                    done, status = self._ctl.get(wc.wr_id, (None, []))
                    status.append(wc.status)
                    if done is not None:
                        done.set()
                    continue
                with self._lock:
                    entry = self._pending.pop(wc.wr_id, None)
                if entry is None:
                    continue
                ok = wc.status == e.IBV_WC_SUCCESS
                err = None if ok else f"wc status {wc.status} (vendor_err {wc.vendor_err})"
                self._cq.put(Completion(wc.wr_id, entry[0], entry[1], Status.OK if ok else Status.ERROR, err))
                if not ok:
                    self._die(f"write wr_id={wc.wr_id} failed: {err}; the QP is in the error state")
            n, wcs = self._recv_cq.poll(num_entries=64)
            for wc in wcs[:n]:
                busy = True
                if wc.status == e.IBV_WC_SUCCESS and wc.opcode == e.IBV_WC_RECV_RDMA_WITH_IMM:
                    self._push_recv(RecvEvent(socket.ntohl(wc.imm_data), wc.byte_len))
                    self._post_recv()
            if not busy:
                time.sleep(0.0002)  # busy-polling a CQ from Python would starve other threads

    def _die(self, reason: str) -> None:
        with self._lock:
            if self._dead_reason is None:
                self._dead_reason = reason
            pending, self._pending = self._pending, {}
        for wr_id, (tag, length) in sorted(pending.items()):
            self._cq.put(Completion(wr_id, tag, length, Status.ERROR, f"connection dead: {reason}"))

    def close_and_drain(self, timeout: float = 5.0) -> None:
        """Close; on return the QP is in the error state and every MR deregistered, so nothing lands here."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._boot.send({"op": "close"})
        except OSError:
            pass
        from pyverbs.qp import QPAttr

        # QP -> ERR stops the responder: no inbound RDMA is accepted after this returns
        self._qp.modify(QPAttr(qp_state=self._e.IBV_QPS_ERR), self._e.IBV_QP_STATE)
        for mw, _ in list(self._windows.values()):
            mw.close()
        self._windows.clear()
        for mr in list(self._mrs.values()):
            mr.close()  # deregistration: the NIC no longer translates the rkey
        self._mrs.clear()
        self._stop.set()
        try:
            self._boot.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout)
        self._die("transport closed")
        self._ctx.close()  # closes the QP, CQs, PD and anything left registered under it
        self._boot.sock.close()

