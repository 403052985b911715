"""An in-process stand-in for the parts of pyverbs that verbs.py uses: a software "NIC".

It follows the real API's shapes (constructor arguments, properties, CQ polling,
work-request fields) and the semantics that matter to the transport: an RDMA
WRITE copies bytes into the remote memory behind an rkey after checking the key
and bounds, WRITE_WITH_IMM consumes a receive WR at the responder, a bad rkey
fails the work request and moves the QP to the error state, a QP in the error
state accepts nothing. It only executes the verbs transport's logic; it cannot
prove that real hardware behaves the same (docs/transports.md says how to run
on hardware).
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import threading
import types
from collections import deque
from types import SimpleNamespace

# -- enums (values as in rdma-core) ----------------------------------------------
ENUMS = dict(
    IBV_QPT_RC=2, IBV_QPS_RESET=0, IBV_QPS_INIT=1, IBV_QPS_RTR=2, IBV_QPS_RTS=3, IBV_QPS_ERR=6,
    IBV_QP_STATE=1, IBV_ACCESS_LOCAL_WRITE=1, IBV_ACCESS_REMOTE_WRITE=2, IBV_ACCESS_MW_BIND=16,
    IBV_MW_TYPE_2=2, IBV_WR_RDMA_WRITE=0, IBV_WR_RDMA_WRITE_WITH_IMM=1, IBV_WR_LOCAL_INV=7,
    IBV_WR_BIND_MW=8, IBV_SEND_SIGNALED=2, IBV_WC_SUCCESS=0, IBV_WC_REM_ACCESS_ERR=10,
    IBV_WC_RETRY_EXC_ERR=12, IBV_WC_RNR_RETRY_EXC_ERR=13, IBV_WC_WR_FLUSH_ERR=5,
    IBV_WC_RDMA_WRITE=1, IBV_WC_RECV_RDMA_WITH_IMM=129,
)
E = SimpleNamespace(**ENUMS)


class PyverbsRDMAError(Exception):
    pass


class Fabric:
    """Every QP and memory key of the fake NIC, shared by all contexts in the process."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.qps: dict[int, "QP"] = {}
        self.keys: dict[int, tuple[int, int]] = {}  # rkey -> (address, length), remotely writable
        self.ids = itertools.count(0x100)
        self.device_names = ["fake_rxe0"]


FABRIC = Fabric()


def get_device_list():
    return [SimpleNamespace(name=n.encode()) for n in FABRIC.device_names]


class Context:
    def __init__(self, name: str) -> None:
        self.name = name

    def query_port(self, port: int):
        return SimpleNamespace(lid=7)

    def query_gid(self, port: int, index: int):
        return "fe80:0000:0000:0000:0000:0000:0000:0001"

    def close(self) -> None:
        pass


class PD:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx


class CQ:
    def __init__(self, ctx, cqe, cq_context, channel, comp_vector) -> None:
        self._q: deque = deque()
        self._lock = threading.Lock()

    def push(self, **wc) -> None:
        with self._lock:
            self._q.append(SimpleNamespace(**{"vendor_err": 0, "imm_data": 0, "byte_len": 0, **wc}))

    def poll(self, num_entries: int = 1):
        with self._lock:
            out = [self._q.popleft() for _ in range(min(num_entries, len(self._q)))]
        return len(out), out


class MR:
    def __init__(self, pd, length=0, access=0, address=None) -> None:
        if not address:
            self._own = ctypes.create_string_buffer(length)
            address = ctypes.addressof(self._own)
        self.buf, self.length, self.access = address, length, access
        self.lkey = self.rkey = next(FABRIC.ids)
        if access & E.IBV_ACCESS_REMOTE_WRITE:
            with FABRIC.lock:
                FABRIC.keys[self.rkey] = (address, length)

    def close(self) -> None:
        with FABRIC.lock:
            FABRIC.keys.pop(self.rkey, None)


class MW:
    def __init__(self, pd, mw_type) -> None:
        self.rkey = next(FABRIC.ids) << 8

    def close(self) -> None:
        pass


class MWBindInfo:
    def __init__(self, mr, addr, length, mw_access_flags) -> None:
        self.mr, self.addr, self.length = mr, addr, length


class SGE:
    def __init__(self, addr, length, lkey) -> None:
        self.addr, self.length, self.lkey = addr, length, lkey


class RecvWR:
    def __init__(self, wr_id=0, num_sge=0, sg=None) -> None:
        if num_sge < 1 or sg is None:
            raise ValueError("A WR needs at least one SGE")  # as pyverbs does
        self.wr_id = wr_id


class SendWR:
    def __init__(self, wr_id=0, opcode=0, num_sge=0, imm_data=0, sg=None, send_flags=2) -> None:
        if opcode not in (E.IBV_WR_LOCAL_INV, E.IBV_WR_BIND_MW) and (num_sge < 1 or sg is None):
            raise ValueError("A WR needs at least one SGE")
        self.wr_id, self.opcode, self.imm_data, self.sg = wr_id, opcode, imm_data, sg
        self.remote = None
        self.bind = None

    def set_wr_rdma(self, rkey, addr) -> None:
        self.remote = (rkey, addr)

    def set_bind_wr(self, mw, bind_info) -> None:
        self.bind = (mw, bind_info)
        self.rkey = mw.rkey + 1  # the next key of the window, as inc_rkey does


class QPCap:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


QPInitAttr = QPCap


class QPAttr:
    def __init__(self, qp_state=0, cur_qp_state=0) -> None:
        self.qp_state = qp_state


class GID:
    def __init__(self, val=None) -> None:
        self.val = val


class GlobalRoute:
    def __init__(self, dgid=None, sgid_index=0) -> None:
        self.dgid, self.sgid_index = dgid, sgid_index


class AHAttr:
    def __init__(self, port_num=1, is_global=0, grh=None, dlid=0) -> None:
        self.port_num, self.dlid = port_num, dlid


class QP:
    def __init__(self, pd, init_attr) -> None:
        self.qp_num = next(FABRIC.ids)
        self.state, self.dest = E.IBV_QPS_RESET, None
        self.scq, self.rcq = init_attr.scq, init_attr.rcq
        self.recv_wrs: deque = deque()
        with FABRIC.lock:
            FABRIC.qps[self.qp_num] = self

    def to_init(self, attr) -> None:
        self.state = E.IBV_QPS_INIT

    def to_rtr(self, attr) -> None:
        self.dest, self.state = attr.dest_qp_num, E.IBV_QPS_RTR

    def to_rts(self, attr) -> None:
        self.state = E.IBV_QPS_RTS

    def modify(self, attr, mask) -> None:
        self.state = attr.qp_state

    def post_recv(self, wr) -> None:
        self.recv_wrs.append(wr)

    def post_send(self, wr) -> None:
        with FABRIC.lock:
            if self.state == E.IBV_QPS_ERR:
                status = E.IBV_WC_WR_FLUSH_ERR  # an errored QP flushes whatever is posted
            elif self.state != E.IBV_QPS_RTS:
                raise PyverbsRDMAError(f"post_send on a QP in state {self.state}")
            else:
                status = self._execute(wr)
        self.scq.push(wr_id=wr.wr_id, status=status, opcode=E.IBV_WC_RDMA_WRITE)
        if status != E.IBV_WC_SUCCESS:
            self.state = E.IBV_QPS_ERR

    def _execute(self, wr) -> int:
        if wr.opcode == E.IBV_WR_BIND_MW:
            mw, info = wr.bind
            FABRIC.keys[wr.rkey] = (info.addr, info.length)
            mw.rkey = wr.rkey
            return E.IBV_WC_SUCCESS
        if wr.opcode == E.IBV_WR_LOCAL_INV:
            return E.IBV_WC_SUCCESS if FABRIC.keys.pop(wr.imm_data, None) else E.IBV_WC_REM_ACCESS_ERR
        peer = FABRIC.qps.get(self.dest)
        if peer is None or peer.state not in (E.IBV_QPS_RTR, E.IBV_QPS_RTS):
            return E.IBV_WC_RETRY_EXC_ERR  # nobody answers: the requester retries, then gives up
        rkey, addr = wr.remote
        (src,) = wr.sg
        base, length = FABRIC.keys.get(rkey, (None, 0))
        if base is None or not (base <= addr and addr + src.length <= base + length):
            peer.state = E.IBV_QPS_ERR
            return E.IBV_WC_REM_ACCESS_ERR
        if wr.opcode == E.IBV_WR_RDMA_WRITE_WITH_IMM and not peer.recv_wrs:
            return E.IBV_WC_RNR_RETRY_EXC_ERR
        ctypes.memmove(addr, src.addr, src.length)
        if wr.opcode == E.IBV_WR_RDMA_WRITE_WITH_IMM:
            rwr = peer.recv_wrs.popleft()
            peer.rcq.push(wr_id=rwr.wr_id, status=E.IBV_WC_SUCCESS, opcode=E.IBV_WC_RECV_RDMA_WITH_IMM,
                          imm_data=wr.imm_data, byte_len=src.length)
        return E.IBV_WC_SUCCESS

    def close(self) -> None:
        with FABRIC.lock:
            FABRIC.qps.pop(self.qp_num, None)


def install(monkeypatch) -> Fabric:
    """Put the fake into sys.modules under the pyverbs names (undone by monkeypatch)."""
    global FABRIC
    FABRIC = Fabric()
    pkg = types.ModuleType("pyverbs")
    parts = {
        "device": dict(get_device_list=get_device_list, Context=Context),
        "pd": dict(PD=PD), "cq": dict(CQ=CQ), "mr": dict(MR=MR, MW=MW, MWBindInfo=MWBindInfo),
        "wr": dict(SGE=SGE, SendWR=SendWR, RecvWR=RecvWR),
        "qp": dict(QP=QP, QPCap=QPCap, QPInitAttr=QPInitAttr, QPAttr=QPAttr),
        "addr": dict(AHAttr=AHAttr, GlobalRoute=GlobalRoute, GID=GID),
        "enums": ENUMS, "pyverbs_error": dict(PyverbsRDMAError=PyverbsRDMAError),
    }
    monkeypatch.setitem(sys.modules, "pyverbs", pkg)
    for name, attrs in parts.items():
        mod = types.ModuleType(f"pyverbs.{name}")
        mod.__dict__.update(attrs)
        setattr(pkg, name, mod)
        monkeypatch.setitem(sys.modules, f"pyverbs.{name}", mod)
    return FABRIC
