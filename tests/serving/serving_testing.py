"""Helpers of the serving tests: an engine + HTTP server on a free port, run inside asyncio.run."""
from __future__ import annotations

import asyncio
import contextlib
import os
from typing import AsyncIterator, Callable

from kvproof.runtime.engine import EngineConfig, LocalEngine
from kvproof.runtime.server import start_server


@contextlib.asynccontextmanager
async def serving(cfg: EngineConfig | None = None) -> AsyncIterator[tuple[LocalEngine, str]]:
    """A LocalEngine behind the HTTP server on 127.0.0.1:<free port>; yields (engine, base url)."""
    engine = LocalEngine(cfg or EngineConfig())
    runner, url = await start_server(engine, "127.0.0.1", 0)
    try:
        yield engine, url
    finally:
        await runner.cleanup()
        await engine.stop()


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll pred() until true; AssertionError naming `what` after timeout seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def children(pid: int) -> list[int]:
    """Child process ids of `pid` (Linux /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    """The command line of process `pid` (arguments joined by spaces; '' if gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
