"""The local engine's core in its own process (ProcessEngine): shutdown, a dying core, a dying server, start-up errors."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp
import pytest

from serving_testing import alive, children, cmdline, metric, serving, wait_for
from kvproof.runtime.serving.engine import EngineConfig, GenerationRequest, SamplingParams
from kvproof.runtime.serving.engine_proc import ProcessEngine

LONG = {"prompt": "long", "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": True}


async def _first_chunk(s: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    r = await s.post(f"{url}/v1/completions", json=LONG)
    assert r.status == 200
    await r.content.readline()
    return r


def test_stop_aborts_pending_requests_and_reaps_the_core() -> None:
    async def main() -> None:
        engine = ProcessEngine(EngineConfig(num_pages=256))
        await engine.start()
        pid = engine.proc.pid
        assert pid in children(os.getpid()) and alive(pid)
        events = []

        async def consume() -> None:
            async for ev in engine.generate(GenerationRequest("a", (1, 2, 3), SamplingParams(max_tokens=900,
                                                                                          ignore_eos=True))):
                events.append(ev)
        task = asyncio.create_task(consume())
        await wait_for(lambda: len(events) >= 1, what="a first token")
        await engine.stop()
        await asyncio.wait_for(task, 10)
        assert events[-1].finished and events[-1].finish_reason == "abort" and events[-1].detail == "shutdown"
        assert not alive(pid), "the core process must be reaped"
        with pytest.raises(RuntimeError, match="not running"):
            engine.submit(GenerationRequest("b", (1,)), lambda ev: None)

    asyncio.run(main())


def test_a_dead_core_fails_pending_requests_and_health_turns_503() -> None:
    async def main() -> None:
        async with serving(EngineConfig(num_pages=256), core="process") as (engine, url), \
                aiohttp.ClientSession() as s:
            r = await _first_chunk(s, url)
            os.kill(engine.proc.pid, signal.SIGKILL)
            rest = (await r.read()).decode()
            assert '"finish_reason":"abort"' in rest.replace(" ", ""), rest[-300:]
            await wait_for(lambda: engine.error is not None, what="engine.error")
            assert "engine core process exited" in str(engine.error)
            h = await s.get(f"{url}/health")
            assert h.status == 503
            r = await s.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status == 503 and "not running" in (await r.json())["error"]["message"]

    asyncio.run(main())


def test_abort_and_metrics_are_current_when_scraped() -> None:
    async def main() -> None:
        async with serving(EngineConfig(num_pages=256), core="process") as (engine, url), \
                aiohttp.ClientSession() as s:
            r = await _first_chunk(s, url)
            rid = None
            async for line in r.content:                      # the response id from the next chunk
                if line.startswith(b"data: {"):
                    rid = line.split(b'"id":')[1].split(b'"')[1].decode()
                    break
            a = await s.post(f"{url}/v1/abort/{rid}")
            assert a.status == 200 and (await a.json())["aborted"]
            rest = (await r.read()).decode()
            assert "abort" in rest
            text = await (await s.get(f"{url}/metrics")).text()        # refreshed by the scrape itself
            assert metric(text, "kvproof_aborts_total", cause="client") == 1
            assert metric(text, "kvproof_requests_finished_total", reason="abort") == 1
            st = engine.stats()
            assert st["aborts_total{cause}"] == {"client": 1} and st["queue_depth{queue}"]["running"] == 0
            assert st["kv_pages{state}"]["used"] == 0

    asyncio.run(main())


def test_a_bad_model_fails_start_with_the_cores_error() -> None:
    async def main() -> None:
        engine = ProcessEngine(EngineConfig(checkpoint="/nonexistent/checkpoint"), start_timeout_s=120)
        with pytest.raises(RuntimeError, match="engine core failed to start.*nonexistent"):
            await engine.start()
        assert engine.proc is None

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_the_core_exits_when_its_server_is_killed() -> None:
    """`kvproof serve --engine local`: SIGKILL the server (no clean-up runs): its core notices the closed
    pipe and exits, no orphan left."""
    import socket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "-m", "kvproof", "serve", "--engine", "local", "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and srv.poll() is None, "server did not come up"
            time.sleep(0.3)
        kids = children(srv.pid)                  # the core (and multiprocessing's resource tracker)
        assert sum("spawn_main" in cmdline(c) for c in kids) == 1, [cmdline(c) for c in kids]
        srv.kill()
        srv.wait(10)
        deadline = time.monotonic() + 20
        while any(alive(c) for c in kids):
            assert time.monotonic() < deadline, f"outlived its server: {[cmdline(c) for c in kids if alive(c)]}"
            time.sleep(0.1)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait(10)


def test_an_exception_in_the_core_fails_pending_requests_with_its_message(caplog: pytest.LogCaptureFixture) -> None:
    """The core raises (here: a malformed message, as a bug would): it reports the error before exiting,
    pending requests end as aborts naming it, the traceback is in the server's log, submit refuses,
    and stop() still reaps the process."""
    async def main() -> None:
        engine = ProcessEngine(EngineConfig(num_pages=256))
        await engine.start()
        pid = engine.proc.pid
        try:
            events = []

            async def consume() -> None:
                async for ev in engine.generate(GenerationRequest("a", (1, 2, 3),
                                                                  SamplingParams(max_tokens=900, ignore_eos=True))):
                    events.append(ev)
            task = asyncio.create_task(consume())
            await wait_for(lambda: len(events) >= 1, what="a first token")
            engine._send(("corrupt", ["unhashable"]))                 # TypeError inside the core's loop
            await asyncio.wait_for(task, 10)
            assert events[-1].finish_reason == "abort" and "engine core failed: TypeError" in events[-1].detail
            assert "engine core failed: TypeError" in str(engine.error)
            with pytest.raises(RuntimeError, match="not running"):
                engine.submit(GenerationRequest("b", (1,)), lambda ev: None)
        finally:
            await engine.stop()
        assert not alive(pid), "stop() reaps a failed core"

    with caplog.at_level("ERROR", logger="kvproof.engine"):
        asyncio.run(main())
    assert "Traceback" in caplog.text and "TypeError" in caplog.text
