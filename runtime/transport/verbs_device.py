"""RDMA device set-up for the verbs transport: pyverbs loading, devices, QP settings, the bootstrap channel and QP handshake.

pyverbs is imported lazily: without it, or without an RDMA device, the calls here raise
TransportUnavailable saying how to get one (see verbs.py for the transport itself).
`Bootstrap` is the TCP side channel a connection keeps open: JSON lines carrying the QP
handshake (`connect_qp`), the peer's region announcements and the orderly close.
"""

from __future__ import annotations

import ctypes
import json
import random
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .base import TransportError, TransportUnavailable

HOWTO = (
    "pyverbs (rdma-core's Python bindings) is not importable. On Debian/Ubuntu: "
    "`apt-get install python3-pyverbs`, then make it visible to the venv, e.g. "
    "`ln -s /usr/lib/python3/dist-packages/pyverbs .venv/lib/python3.X/site-packages/` "
    "(the Python minor version must match the system one); or build rdma-core "
    "(https://github.com/linux-rdma/rdma-core, `./build.sh`, then add build/python to PYTHONPATH). "
    "See docs/transports.md."
)
MTU = {256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}  # enum ibv_mtu


@dataclass(frozen=True)
class VerbsConfig:
    """Device and queue-pair settings."""

    device: str | None = None  # None: the first device listed
    port: int = 1
    gid_index: int | None = None  # None: InfiniBand (LID routing); RoCE needs a GID index (often 1 or 3)
    path_mtu: int = 1024
    max_send_wr: int = 1024
    max_recv_wr: int = 256
    cq_depth: int = 4096
    timeout: int = 14  # local ACK timeout exponent (4.096 us * 2**timeout)
    retry_cnt: int = 7
    rnr_retry: int = 7

    def __post_init__(self) -> None:
        if self.path_mtu not in MTU:
            raise ValueError(f"path_mtu={self.path_mtu}, expected one of {sorted(MTU)}")


def load_pyverbs() -> Any:
    """Import pyverbs or raise TransportUnavailable with instructions."""
    try:
        import pyverbs.device  # noqa: F401
        import pyverbs.enums  # noqa: F401
        import pyverbs.pyverbs_error  # noqa: F401
    except ImportError as e:
        raise TransportUnavailable(f"{HOWTO} (import error: {e})") from e
    return sys.modules["pyverbs"]


def rdma_devices() -> list[str]:
    """Names of the RDMA devices present; raises TransportUnavailable if none."""
    pv = load_pyverbs()
    try:
        devs = pv.device.get_device_list()
    except pv.pyverbs_error.PyverbsRDMAError as e:
        raise TransportUnavailable(f"no RDMA device found: get_device_list() failed ({e}); "
                                   "is an RDMA NIC present and its kernel driver (ib_uverbs) loaded?") from e
    names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devs]
    if not names:
        raise TransportUnavailable("no RDMA device found: get_device_list() returned no devices "
                                   "(check `ibv_devices`; for a software device try `rdma link add rxe0 type rxe netdev eth0`)")
    return names


def address_of(mv: memoryview) -> int:
    """The address of a writable buffer's first byte (what an MR or SGE needs)."""
    return ctypes.addressof(ctypes.c_ubyte.from_buffer(mv))



def connect_qp(e: Any, c: VerbsConfig, ctx: Any, qp: Any, send_boot: Callable[[dict], None],
               recv_boot: Callable[[], dict | None], post_recv: Callable[[], None]) -> None:
    """Exchange QP numbers, PSNs and addresses over the bootstrap socket and bring the RC QP to RTS."""
    from pyverbs.addr import AHAttr, GlobalRoute
    from pyverbs.qp import QPAttr

    port = ctx.query_port(c.port)
    gid = str(ctx.query_gid(c.port, c.gid_index)) if c.gid_index is not None else None
    psn = random.getrandbits(24)
    send_boot({"op": "hello", "qpn": qp.qp_num, "psn": psn, "lid": port.lid, "gid": gid})
    peer = recv_boot()
    if peer is None or peer.get("op") != "hello":
        raise TransportError(f"verbs bootstrap: expected a hello message from the peer, got {peer!r}")
    attr = QPAttr(qp_state=e.IBV_QPS_INIT)
    attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
    attr.port_num = c.port
    qp.to_init(attr)
    for _ in range(c.max_recv_wr):  # before RTR: a WRITE_WITH_IMM must never find the queue empty
        post_recv()
    attr = QPAttr(qp_state=e.IBV_QPS_RTR)
    attr.path_mtu, attr.dest_qp_num, attr.rq_psn = MTU[c.path_mtu], peer["qpn"], peer["psn"]
    attr.max_dest_rd_atomic, attr.min_rnr_timer = 1, 12
    if peer["gid"] is not None:
        from pyverbs.addr import GID
        gr = GlobalRoute(dgid=GID(peer["gid"]), sgid_index=c.gid_index)
        attr.ah_attr = AHAttr(port_num=c.port, is_global=1, grh=gr, dlid=peer["lid"])
    else:
        attr.ah_attr = AHAttr(port_num=c.port, dlid=peer["lid"])
    qp.to_rtr(attr)
    attr.qp_state, attr.sq_psn = e.IBV_QPS_RTS, psn
    attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.max_rd_atomic = c.timeout, c.retry_cnt, c.rnr_retry, 1
    qp.to_rts(attr)


class Bootstrap:
    """The TCP side channel of one verbs connection: JSON lines, and the regions the peer announced."""

    def __init__(self, sock: socket.socket, lock: threading.Lock) -> None:
        # lock: the transport's, so a post sees the peer's regions consistently with its own state
        self.sock = sock
        self._rx = sock.makefile("rb")
        self._send_lock = threading.Lock()
        self.remote: dict[int, tuple[int, int, int]] = {}       # peer region id -> (addr, rkey, length)
        self.remote_cv = threading.Condition(lock)

    def send(self, msg: dict) -> None:
        """Send one message (a JSON object); thread-safe."""
        with self._send_lock:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def recv(self) -> dict | None:
        """The next message, or None at EOF."""
        line = self._rx.readline()
        return json.loads(line) if line else None

    def announce(self, region: int, addr: int, rkey: int, length: int) -> None:
        """Tell the peer it may write into `region` at (addr, rkey, length)."""
        self.send({"op": "region", "id": region, "addr": addr, "rkey": rkey, "length": length})

    def withdraw(self, region: int) -> None:
        """Tell the peer to forget `region`."""
        self.send({"op": "deregister", "id": region})

    def serve(self, stop: threading.Event, on_dead: Callable[[str], None], closed: Callable[[], bool]) -> None:
        """Receive until `stop`: record the peer's announcements; EOF, a close or a failure calls on_dead."""
        try:
            while not stop.is_set():
                msg = self.recv()
                if msg is None or msg.get("op") == "close":
                    on_dead("peer closed the connection" + (" (EOF)" if msg is None else ""))
                    return
                with self.remote_cv:
                    if msg["op"] == "region":
                        self.remote[msg["id"]] = (msg["addr"], msg["rkey"], msg["length"])
                    elif msg["op"] == "deregister":
                        self.remote.pop(msg["id"], None)
                    self.remote_cv.notify_all()
        except (OSError, ValueError, KeyError) as exc:
            if not closed():
                on_dead(f"bootstrap channel failed: {exc!r}")

    def wait_region(self, region: int, timeout: float) -> None:
        """Block until the peer has announced `region`; TimeoutError names it."""
        with self.remote_cv:
            if not self.remote_cv.wait_for(lambda: region in self.remote, timeout):
                raise TimeoutError(f"peer did not announce region={region} within {timeout} s")
