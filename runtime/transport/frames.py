"""Wire format of the TCP transport: a fixed binary header, then an optional payload.

Header (little endian, 76 bytes):
    magic 4s "KVTP" | version u8 | type u8 | flags u16 | wr_id u64 | region u32 |
    offset u64 | length u64 | imm u32 | ntag u8 | pad 3 | tag 4 x i64

WRITE carries `length` payload bytes destined for (region, offset); ACK carries
`length` / 8 little-endian u64 wr_ids of writes that landed (batched: one ACK
frame per burst, not per write); NAK reports that write wr_id was rejected,
with a UTF-8 reason of `length` bytes; CLOSE announces an orderly close.
"""

from __future__ import annotations

import enum
import socket
import struct
from typing import Callable, NamedTuple

from .base import TAG_MAX_LEN, Tag, TransportError

MAGIC = b"KVTP"
VERSION = 1
HEADER = struct.Struct("<4sBBHQIQQIB3x4q")
FLAG_IMM = 0x1
KNOWN_FLAGS = FLAG_IMM
MAX_REASON = 64 * 1024  # a NAK reason longer than this is a malformed frame
MAX_ACKS = 4096  # wr_ids per ACK frame


class FrameType(enum.IntEnum):
    WRITE = 1
    ACK = 2
    NAK = 3
    CLOSE = 4


class FrameError(TransportError):
    """A received frame is malformed; `field` names the offending header field."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        super().__init__(f"malformed frame: {field}={value!r}, expected {expected}")
        self.field = field
        self.value = value


class Header(NamedTuple):
    """A decoded frame header (a NamedTuple: it is built twice per write on the hot path)."""

    type: FrameType
    wr_id: int
    region: int = 0
    offset: int = 0
    length: int = 0
    imm: int | None = None
    tag: Tag = ()


def encode_header(h: Header) -> bytes:
    """Pack a header into its 76-byte wire form."""
    tag = tuple(h.tag) + (0,) * (TAG_MAX_LEN - len(h.tag))
    flags = FLAG_IMM if h.imm is not None else 0
    return HEADER.pack(
        MAGIC, VERSION, int(h.type), flags, h.wr_id, h.region, h.offset, h.length,
        h.imm or 0, len(h.tag), *tag,
    )


def decode_header(raw: bytes | bytearray | memoryview) -> Header:
    """Unpack and validate a header; raises FrameError naming the bad field."""
    if len(raw) != HEADER.size:
        raise FrameError("header", f"{len(raw)} bytes", f"{HEADER.size} bytes")
    magic, version, ftype, flags, wr_id, region, offset, length, imm, ntag, *tag = HEADER.unpack(raw)
    if magic != MAGIC:
        raise FrameError("magic", bytes(magic), repr(MAGIC))
    if version != VERSION:
        raise FrameError("version", version, str(VERSION))
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise FrameError("type", ftype, "one of " + ", ".join(f"{t.value} ({t.name})" for t in FrameType)) from None
    if flags & ~KNOWN_FLAGS:
        raise FrameError("flags", hex(flags), f"a subset of {hex(KNOWN_FLAGS)}")
    if ntag > TAG_MAX_LEN:
        raise FrameError("ntag", ntag, f"<= {TAG_MAX_LEN}")
    if ftype is FrameType.NAK and length > MAX_REASON:
        raise FrameError("length", length, f"<= {MAX_REASON} for a NAK reason")
    if ftype is FrameType.ACK and (length % 8 or not 0 < length <= 8 * MAX_ACKS):
        raise FrameError("length", length, f"a multiple of 8 in [8, {8 * MAX_ACKS}] for an ACK frame")
    if ftype is FrameType.CLOSE and length != 0:
        raise FrameError("length", length, "0 for a CLOSE frame")
    return Header(
        type=ftype, wr_id=wr_id, region=region, offset=offset, length=length,
        imm=imm if flags & FLAG_IMM else None, tag=tuple(tag[:ntag]),
    )


def encode_acks(wr_ids: list[int]) -> tuple[bytes, bytes]:
    """Header and payload of one ACK frame for up to MAX_ACKS landed writes."""
    assert 0 < len(wr_ids) <= MAX_ACKS, len(wr_ids)
    return encode_header(Header(FrameType.ACK, 0, length=8 * len(wr_ids))), struct.pack(f"<{len(wr_ids)}Q", *wr_ids)


def decode_acks(payload: bytes | bytearray) -> tuple[int, ...]:
    """The wr_ids of an ACK payload."""
    return struct.unpack(f"<{len(payload) // 8}Q", payload)


class SocketReader:
    """Reads a socket through a small buffer, so a burst of ACKs costs one syscall, while the
    bulk of a large payload is received straight into its destination, never staged."""

    def __init__(self, sock: socket.socket, size: int = 4096) -> None:
        self._sock, self._buf = sock, memoryview(bytearray(size))
        self._lo = self._hi = 0
        self._direct = size // 4  # reads at least this large bypass the buffer

    def buffered(self) -> bool:
        """Whether bytes are waiting in the buffer."""
        return self._hi > self._lo

    def read_into(self, dst: memoryview, before_recv: Callable[[], None]) -> bool:
        """Fill dst exactly, calling before_recv before every socket read; False on EOF.

        The hook is an argument, not an attribute: a reader holding its owner's bound method would put
        the owner in a reference cycle, freed only by the cyclic garbage collector at an arbitrary moment."""
        k = min(self._hi - self._lo, dst.nbytes)
        if k:
            dst[:k] = self._buf[self._lo : self._lo + k]
            self._lo += k
            dst = dst[k:]
        while dst.nbytes:  # the buffer is empty here
            before_recv()
            if dst.nbytes >= self._direct:
                n = self._sock.recv_into(dst)
                if n == 0:
                    return False
                dst = dst[n:]
                continue
            n = self._sock.recv_into(self._buf)
            if n == 0:
                return False
            k = min(n, dst.nbytes)
            dst[:k] = self._buf[:k]
            self._lo, self._hi = k, n
            dst = dst[k:]
        return True
