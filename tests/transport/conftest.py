"""Shared helpers for the transport and channel tests."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import pytest

from kvproof.runtime.transport import TcpTransport


def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll pred until true; fail the test with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[TcpTransport, TcpTransport]]:
    """A connected (writer, receiver) pair, closed after the test."""
    a, b = TcpTransport.pair()
    yield a, b
    a.close_and_drain()
    b.close_and_drain()
