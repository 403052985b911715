"""Shared helpers of the serving tests: an engine + HTTP server on a free port, run inside asyncio.run."""
from __future__ import annotations

import asyncio
import contextlib
import os
from typing import AsyncIterator

import torch

# Triton reads this when a kernel module is first imported (the triton-backend test).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvproof.runtime.engine import EngineConfig, LocalEngine  # noqa: E402
from kvproof.runtime.server import start_server  # noqa: E402


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


async def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll pred() until true; AssertionError naming `what` after timeout seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
