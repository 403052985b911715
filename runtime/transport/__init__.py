"""KV transports: one-sided writes into a peer's registered memory (see docs/transports.md).

    loopback  in-process, with a controllable mode for model-based tests
    tcp       real sockets, the embedded default; fault injection in faults.py
    verbs     RDMA RC through pyverbs, the production path
    mooncake  Mooncake's Transfer Engine (SGLang's PD engine) for the bytes, MAC-checked landing
"""

from __future__ import annotations

import socket
from typing import Any

from .base import (
    Completion, LandHook, RecvEvent, Region, Status, Tag, Transport, TransportClosed,
    TransportError, TransportUnavailable,
)
from .faults import FaultConfig
from .frames import FrameError
from .loopback import LoopbackTransport, PendingWrite, loopback_pair
from .tcp import TcpListener, TcpTransport

TRANSPORTS = ("tcp", "loopback", "verbs", "mooncake")

__all__ = [
    "Completion", "FaultConfig", "FrameError", "LandHook", "LoopbackTransport", "PendingWrite",
    "RecvEvent", "Region", "Status", "Tag", "TcpListener", "TcpTransport", "Transport",
    "TransportClosed", "TransportError", "TransportUnavailable", "TRANSPORTS", "PROCESS_TRANSPORTS",
    "check_available", "loopback_pair", "make_transport",
]

PROCESS_TRANSPORTS = ("tcp", "mooncake", "verbs")  # what a PD deployment of processes can run on


def check_available(name: str) -> None:
    """Raise ValueError (unknown name) or TransportUnavailable (library or device missing, saying how
    to get it) before a deployment on transport `name` starts."""
    if name not in PROCESS_TRANSPORTS:
        raise ValueError(f"transport={name!r}, expected one of {', '.join(PROCESS_TRANSPORTS)}")
    if name == "mooncake":
        from .mooncake import mooncake_engine_class

        mooncake_engine_class()
    elif name == "verbs":
        from .verbs_device import load_pyverbs, rdma_devices

        load_pyverbs(), rdma_devices()
        raise TransportUnavailable(
            "verbs: an RDMA device is present, but the PD runtime's decode needs a landing hook per write "
            "(on_land: slot, writer, epoch, layer) and a NIC places bytes without software; use "
            "--transport mooncake (its RDMA protocol) or tcp")


def _endpoint_socket(name: str, kw: dict[str, Any]) -> socket.socket:
    """Pop exactly one of sock= / connect= / listener= from kw and return a connected socket."""
    given = [k for k in ("sock", "connect", "listener") if kw.get(k) is not None]
    if len(given) != 1:
        raise ValueError(f"make_transport({name!r}): pass exactly one of sock=, connect=(host, port) "
                         f"or listener=TcpListener, got {given or 'none'}")
    timeout = kw.pop("timeout", 5.0)
    sock, connect, listener = kw.pop("sock", None), kw.pop("connect", None), kw.pop("listener", None)
    if sock is not None:
        return sock
    if connect is not None:
        s = socket.create_connection(tuple(connect), timeout=timeout)
        s.settimeout(None)
        return s
    return listener.accept_socket(timeout)


def make_transport(name: str, **kw: Any) -> Transport:
    """Create a transport endpoint by name: tcp | loopback | verbs | mooncake.

    key= (the auth handshake's connection key) MACs every write where the transport checks MACs
    (mooncake); the others ride on the authenticated socket itself."""
    key = kw.pop("key", None)
    if name == "loopback":
        return LoopbackTransport(**kw)
    if name == "mooncake":
        from .mooncake import MooncakeTransport, mooncake_engine_class

        mooncake_engine_class()  # a clear TransportUnavailable before any socket is touched
        return MooncakeTransport(_endpoint_socket(name, kw), key=key, **kw)
    if name == "tcp":
        return TcpTransport(_endpoint_socket(name, kw), **kw)
    if name == "verbs":
        from .verbs import VerbsTransport, load_pyverbs, rdma_devices

        load_pyverbs(), rdma_devices()  # a clear TransportUnavailable before any socket is touched
        return VerbsTransport(_endpoint_socket(name, kw), **kw)
    raise ValueError(f"unknown transport name={name!r}, expected one of {', '.join(TRANSPORTS)}")
