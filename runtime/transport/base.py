"""The transport API: one-sided writes into a peer's registered memory.

A transport is one endpoint of a reliable connection, modelled on an RDMA RC
queue pair. Each side registers memory regions; the peer writes into them by
region id and byte offset. A write *lands* when its bytes are in the remote
region and *completes* later, at the sender, when the sender learns that it
landed (a completion with status OK). A write that cannot land completes with
status ERROR. Nothing at the receiver consults protocol state before placing
bytes, exactly as a NIC would: keeping a slot safe from late writes is the job
of the protocol, not of the transport.
"""

from __future__ import annotations

import enum
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Union

from .endpoint import Liveness

# An opaque label carried with a write, e.g. (slot, epoch, chunk).
Tag = tuple[int, ...]
TAG_MAX_LEN = 4
_I64 = (-(2**63), 2**63 - 1)
IMM_MAX = 2**32 - 1

# on_land(tag, region, offset, length): called right after the bytes were placed.
LandHook = Callable[[Tag, int, int, int], None]

Buffer = Union[bytes, bytearray, memoryview, Any]  # Any: a torch.Tensor


class TransportError(Exception):
    """A transport was misused or its connection failed."""


class TransportUnavailable(TransportError):
    """The requested transport cannot run here (missing library or device)."""


class TransportClosed(TransportError):
    """The operation needs an open, live connection and this one is closed or dead."""


class Status(enum.Enum):
    OK = "ok"
    ERROR = "error"


@dataclass(frozen=True)
class Region:
    """A registered local memory region the peer may write into."""

    id: int
    length: int

    def __post_init__(self) -> None:
        assert self.id >= 0 and self.length >= 0, self


@dataclass(frozen=True)
class Completion:
    """Sender-side outcome of one write: OK means the bytes landed remotely."""

    wr_id: int
    tag: Tag
    length: int
    status: Status
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the write landed."""
        return self.status is Status.OK


@dataclass(frozen=True)
class RecvEvent:
    """Receiver-side notice of a WRITE_WITH_IMM that landed."""

    imm: int
    length: int
    region: int | None = None  # None where the hardware does not report it (verbs)
    offset: int | None = None
    tag: Tag | None = None


def check_tag(tag: Tag) -> Tag:
    """Validate a tag (at most TAG_MAX_LEN signed 64-bit ints) and return it as a tuple."""
    tag = tuple(tag)
    if len(tag) > TAG_MAX_LEN:
        raise ValueError(f"tag={tag!r} has {len(tag)} elements, expected at most {TAG_MAX_LEN}")
    for x in tag:
        if not isinstance(x, int) or isinstance(x, bool) or not _I64[0] <= x <= _I64[1]:
            raise ValueError(f"tag={tag!r}: element {x!r} is not a signed 64-bit int")
    return tag


def check_imm(imm: int | None) -> int | None:
    """Validate an optional 32-bit immediate."""
    if imm is not None and (not isinstance(imm, int) or not 0 <= imm <= IMM_MAX):
        raise ValueError(f"imm={imm!r}, expected None or an int in [0, {IMM_MAX}]")
    return imm


def as_bytes_view(buf: Buffer, what: str = "buffer") -> memoryview:
    """A flat, byte-format memoryview over bytes, bytearray, memoryview or a contiguous CPU tensor."""
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    if torch is not None and isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu":
            raise ValueError(f"{what}: tensor on device {buf.device}, expected a CPU tensor")
        if not buf.is_contiguous():
            raise ValueError(f"{what}: tensor with strides {buf.stride()} is not contiguous")
        flat = buf.detach().reshape(-1).view(torch.uint8)
        return memoryview(flat.numpy()).cast("B")
    if isinstance(buf, (bytes, bytearray, memoryview)):
        mv = memoryview(buf)
        if not mv.contiguous:
            raise ValueError(f"{what}: memoryview is not contiguous")
        return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    raise TypeError(
        f"{what}: got {type(buf).__name__}, expected bytes, bytearray, memoryview or a CPU torch.Tensor"
    )


def writable_view(buf: Buffer, what: str = "region") -> memoryview:
    """Like as_bytes_view, but the memory must be writable (it is a write destination)."""
    mv = as_bytes_view(buf, what)
    if mv.readonly:
        raise ValueError(f"{what}: {type(buf).__name__} is read-only, expected writable memory")
    return mv


def check_write_args(src: Buffer, region: int, offset: int, length: int | None) -> tuple[memoryview, int]:
    """Validate post_write arguments; returns the source view and the byte count."""
    mv = as_bytes_view(src, "src")
    if length is None:
        length = mv.nbytes
    if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= mv.nbytes:
        raise ValueError(f"length={length!r}, expected an int in [0, {mv.nbytes}] (the size of src)")
    if not isinstance(region, int) or not 0 <= region < 2**32:
        raise ValueError(f"region={region!r}, expected an int in [0, 2**32)")
    if not isinstance(offset, int) or not 0 <= offset < 2**64 - length:
        raise ValueError(f"offset={offset!r}, expected an int >= 0")
    return mv, length


def check_bounds(region: Region, offset: int, length: int) -> None:
    """Raise if [offset, offset+length) does not fit inside the region."""
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset={offset!r}, expected an int >= 0")
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length={length!r}, expected an int >= 0")
    if offset + length > region.length:
        raise ValueError(
            f"offset={offset} length={length} ends at {offset + length}, "
            f"beyond region {region.id} of {region.length} bytes"
        )


class CompletionQueue:
    """Thread-safe sender-side completion queue with blocking waits."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._done: deque[Completion] = deque()

    def put(self, c: Completion) -> None:
        """Append one completion and wake waiters."""
        with self._cv:
            self._done.append(c)
            self._cv.notify_all()

    def poll(self, max_n: int | None = None, timeout: float | None = 0.0) -> list[Completion]:
        """Take up to max_n completions, waiting up to timeout seconds (None: no limit) for the first."""
        with self._cv:
            if not self._done and timeout != 0:  # None waits without limit
                self._cv.wait_for(lambda: bool(self._done), timeout)
            n = len(self._done) if max_n is None else min(max_n, len(self._done))
            return [self._done.popleft() for _ in range(n)]


class Transport(Liveness, ABC):
    """One endpoint of a connection with one-sided remote writes."""

    name: str = "abstract"

    def __init__(self, on_land: LandHook | None = None) -> None:
        self.on_land = on_land
        self._regions: dict[int, tuple[Region, memoryview]] = {}
        self._region_lock = threading.Lock()
        self._next_region = 0
        self._cq = CompletionQueue()
        self._recv_q: deque[RecvEvent] = deque()
        self._recv_cv = threading.Condition()
        self._dead_reason: str | None = None
        self._closed = False

    # -- memory registration ------------------------------------------------
    def register(self, buf: Buffer, region_id: int | None = None) -> Region:
        """Register writable memory the peer may write into; returns its region."""
        mv = writable_view(buf, "register(buf)")
        with self._region_lock:
            if region_id is None:
                while self._next_region in self._regions:
                    self._next_region += 1
                region_id = self._next_region
            if not isinstance(region_id, int) or not 0 <= region_id < 2**32:
                raise ValueError(f"region_id={region_id!r}, expected None or an int in [0, 2**32)")
            if region_id in self._regions:
                raise ValueError(f"region_id={region_id} is already registered")
            region = Region(region_id, mv.nbytes)
            self._regions[region_id] = (region, mv)
        return region

    def deregister(self, region_id: int) -> None:
        """Refuse later writes into a region (they fail and break the connection).

        A write already being copied when this is called may still finish; only
        close_and_drain guarantees that nothing lands any more.
        """
        with self._region_lock:
            if self._regions.pop(region_id, None) is None:
                raise KeyError(f"region_id={region_id} is not registered here")

    def regions(self) -> list[Region]:
        """The currently registered local regions."""
        with self._region_lock:
            return [r for r, _ in self._regions.values()]

    def _lookup(self, region_id: int) -> tuple[Region, memoryview] | None:
        with self._region_lock:
            return self._regions.get(region_id)

    # -- writes and completions ----------------------------------------------
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
        """Post a one-sided write of src[:length] to the peer's region at offset; returns its wr_id.

        The source is read when the write goes on the wire, at any time before its
        completion; do not modify it until then (as with RDMA). Bad arguments raise
        here, for every transport, before the transport's `_post` sees them.
        """
        mv, length = check_write_args(src, region, offset, length)
        return self._post(mv, region, offset, length, check_tag(tag), check_imm(imm))

    @abstractmethod
    def _post(self, mv: memoryview, region: int, offset: int, length: int, tag: Tag, imm: int | None) -> int:
        """Post a write whose arguments post_write has checked; returns its wr_id."""

    def poll(self, max_n: int | None = None, timeout: float | None = 0.0) -> list[Completion]:
        """Take completed writes (landed or failed), waiting up to timeout for the first."""
        return self._cq.poll(max_n, timeout)

    @abstractmethod
    def outstanding(self) -> int:
        """Number of posted writes without a completion yet."""

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no write is outstanding; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.outstanding():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def poll_recv(self, max_n: int | None = None, timeout: float | None = 0.0) -> list[RecvEvent]:
        """Take receiver-side notices of WRITE_WITH_IMM writes that landed here."""
        with self._recv_cv:
            if not self._recv_q and timeout != 0:
                self._recv_cv.wait_for(lambda: bool(self._recv_q), timeout)
            n = len(self._recv_q) if max_n is None else min(max_n, len(self._recv_q))
            return [self._recv_q.popleft() for _ in range(n)]

    def _push_recv(self, ev: RecvEvent) -> None:
        with self._recv_cv:
            self._recv_q.append(ev)
            self._recv_cv.notify_all()

    # -- liveness (is_dead / dead_reason: Liveness) ------------------------------
    def _check_postable(self) -> None:
        if self._closed:
            raise TransportClosed(f"{self.name}: post_write on a closed transport")
        if self._dead_reason is not None:
            raise TransportClosed(f"{self.name}: post_write on a dead connection ({self._dead_reason})")

    @abstractmethod
    def close_and_drain(self, timeout: float = 5.0) -> None:
        """Close; on return no write can land in local memory any more."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_and_drain()
