"""What every connection endpoint shares: liveness (is_dead / dead_reason), listening and dialing over TCP."""
from __future__ import annotations

import socket
from typing import Any, Protocol, TypeVar

Address = tuple[str, int]
E = TypeVar("E", bound="SocketEndpoint")
L = TypeVar("L", bound="SocketListener")


class Liveness:
    """A connection that can die: `_dead_reason` is None while alive, else why it died or was closed."""

    _dead_reason: str | None = None

    @property
    def is_dead(self) -> bool:
        """Whether the connection failed (peer gone, malformed traffic, drop) or was closed locally."""
        return self._dead_reason is not None

    @property
    def dead_reason(self) -> str | None:
        """Why the connection is dead, or None while it is alive."""
        return self._dead_reason


class SocketListener:
    """A listening TCP socket; a subclass's `accept` wraps `accept_socket()` in its endpoint class."""

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

    @property
    def sock(self) -> socket.socket:
        """The listening socket (for an authenticating accept loop)."""
        return self._sock

    def close(self) -> None:
        """Stop listening."""
        self._sock.close()

    def __enter__(self: L) -> L:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Listener(Protocol):
    """A listening socket whose accept wraps the other end of a pair."""

    @property
    def address(self) -> Address: ...
    def accept(self, timeout: float | None = 5.0, **kw: Any) -> Any: ...
    def close(self) -> None: ...


class SocketEndpoint(Liveness):
    """An endpoint built on a connected socket: `cls(sock, **kw)`; `_listener()` accepts what `connect` dials."""

    @classmethod
    def _listener(cls) -> Listener:
        raise NotImplementedError(f"{cls.__name__} names no listener class")

    @classmethod
    def connect(cls: type[E], address: Address, timeout: float = 5.0, **kw: Any) -> E:
        """Connect to a listener at address; kw go to the endpoint's constructor."""
        sock = socket.create_connection(address, timeout=timeout)
        sock.settimeout(None)
        return cls(sock, **kw)  # type: ignore[call-arg]

    @classmethod
    def pair(cls: type[E], **kw: Any) -> tuple[E, Any]:
        """Two connected endpoints over loopback TCP (for tests and benchmarks)."""
        lst = cls._listener()
        try:
            a = cls.connect(lst.address, **kw)
            return a, lst.accept(**kw)
        finally:
            lst.close()
