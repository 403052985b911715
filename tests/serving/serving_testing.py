"""Helpers of the serving tests: an engine + HTTP server on a free port, run inside asyncio.run."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
from typing import Any, AsyncIterator, Callable

from kvproof.runtime.serving.engine import EngineConfig, LocalEngine
from kvproof.runtime.serving.engine_proc import ProcessEngine
from kvproof.runtime.model.config import preset
from kvproof.runtime.serving.server import start_server

# The LayerSplit tests' model: four layers, so 2, 3 or 4 ranks each own a share (2 ranks: 2 + 2,
# 3 ranks: 2 + 1 + 1).
MODEL4 = dataclasses.replace(preset("tiny"), n_layers=4)


def layersplit_cfg(**kw: object) -> EngineConfig:
    """An EngineConfig of MODEL4 on 48 pages, with overrides."""
    return EngineConfig(**({"model": MODEL4, "num_pages": 48} | kw))


def shared_prefix_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """A shared 40-token prefix (two full pages: prefix-cache hits) plus distinct tails."""
    rng = random.Random(seed)
    prefix = [rng.randrange(32, 127) for _ in range(40)]
    return [prefix + [rng.randrange(32, 127) for _ in range(3 + 5 * i)] for i in range(n)]


@contextlib.asynccontextmanager
async def serving(cfg: EngineConfig | None = None, core: str = "thread") -> AsyncIterator[tuple[Any, str]]:
    """The local engine behind the HTTP server on 127.0.0.1:<free port>; yields (engine, base url).

    core="thread": LocalEngine (EngineCore on a thread here); "process": ProcessEngine (`kvproof serve`'s default)."""
    if core == "process":
        engine: Any = ProcessEngine(cfg or EngineConfig())
    elif core == "thread":
        engine = LocalEngine(cfg or EngineConfig())
    else:
        raise ValueError(f"core={core!r}; expected 'thread' or 'process'")
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


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of `name` in a /metrics exposition whose labels include `labels` (None: absent).

    Parsed with prometheus_client's own parser, so label order and extra labels (model_name) don't matter.
    """
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
