"""A hostile client: deep JSON, huge bodies, wrong methods, unknown routes, garbage bytes. Every error is
OpenAI-shaped JSON and counted, /health keeps answering meanwhile, and the server keeps serving."""
from __future__ import annotations

import asyncio
import logging
import os
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving_testing import serving, wait_for
from kvproof.runtime.serving.engine import EngineConfig

MODEL = "kvproof-tiny"


def _is_openai_error(doc: object) -> bool:
    return (isinstance(doc, dict) and set(doc) == {"error"}
            and {"message", "type", "param", "code"} <= set(doc["error"]) and bool(doc["error"]["message"]))


def test_hostile_client_gets_json_errors_and_health_keeps_answering() -> None:
    async def main() -> None:
        async with serving() as (engine, url), aiohttp.ClientSession() as s:
            lat: list[float] = []
            stop = asyncio.Event()

            async def probe() -> None:                      # /health every 10 ms on its own connection
                async with aiohttp.ClientSession() as h:
                    while not stop.is_set():
                        t = time.perf_counter()
                        async with h.get(f"{url}/health") as r:
                            assert r.status == 200
                        lat.append(time.perf_counter() - t)
                        await asyncio.sleep(0.01)

            prober = asyncio.create_task(probe())
            await wait_for(lambda: len(lat) >= 3, what="health probes")
            deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            big_prompt = b'{"prompt": "' + b"x" * (15 << 20) + b'", "max_tokens": 4}'   # under the 16 MiB limit
            cases = [  # (method, path, body, expected status, what)
                ("POST", "/v1/completions", deep, 400, "JSON nested 100,000 deep"),
                ("POST", "/v1/completions", b"{" * 70_000_000, 413, "a 70 MB body"),
                ("POST", "/v1/completions", big_prompt, 400, "a 15 MB prompt (parsed off the event loop)"),
                ("POST", "/v1/completions", os.urandom(4096), 400, "garbage bytes"),
                ("POST", "/v1/chat/completions", b"\xff\xfe{\"messages\": 1}", 400, "invalid UTF-8"),
                ("GET", "/v1/completions", None, 405, "wrong method"),
                ("DELETE", "/health", None, 405, "wrong method on /health"),
                ("GET", "/v1/nope", None, 404, "unknown route"),
                ("POST", "/v1/abort/cmpl-unknown", None, 404, "abort of an unknown request"),
                ("GET", "/v1/models/gpt-4", None, 404, "an unknown model"),
            ]
            statuses: dict[str, int] = {}
            for method, path, body, status, what in cases:
                t = time.perf_counter()
                async with s.request(method, f"{url}{path}", data=body,
                                     headers={"Content-Type": "application/json"}) as r:
                    doc = await r.json(content_type=None)
                    assert r.status == status, (what, r.status, doc)
                    assert r.headers["Content-Type"].startswith("application/json"), (what, r.headers)
                    assert _is_openai_error(doc), (what, doc)
                print(f"{what}: HTTP {status} in {1000 * (time.perf_counter() - t):.0f} ms: "
                      f"{doc['error']['message'][:90]}")
                statuses[str(status)] = statuses.get(str(status), 0) + 1
            host, port = url[len("http://"):].split(":")           # bytes that are not HTTP at all
            rd, wr = await asyncio.open_connection(host, int(port))
            wr.write(b"\x16\x03\x01 not http\r\n\r\n")
            await wr.drain()
            head, _, body = (await asyncio.wait_for(rd.read(4096), 10)).partition(b"\r\n\r\n")
            wr.close()
            import json
            assert head.split()[1] == b"400" and b"application/json" in head and _is_openai_error(json.loads(body))
            statuses["400"] += 1
            n_during = len(lat)
            stop.set()
            await prober
            lat_ms = sorted(1000 * x for x in lat)
            print(f"/health during the hostile requests: {n_during} answers, p50 {lat_ms[len(lat_ms) // 2]:.1f} ms, "
                  f"max {lat_ms[-1]:.1f} ms")
            # the server keeps serving
            async with s.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 3,
                                                              "temperature": 0}) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3
            text = await (await s.get(f"{url}/metrics")).text()
        errs = {smp.labels["status"]: smp.value for f in text_string_to_metric_families(text)
                for smp in f.samples if smp.name == "kvproof_http_errors_total"}
        assert errs == statuses, (errs, statuses)

    asyncio.run(main())


def test_api_key() -> None:
    async def main() -> None:
        from kvproof.runtime.serving.engine import LocalEngine
        from kvproof.runtime.serving.server import start_server
        engine = LocalEngine(EngineConfig())
        runner, url = await start_server(engine, "127.0.0.1", 0, api_key="s3cret")
        try:
            async with aiohttp.ClientSession() as s:
                body = {"prompt": "x", "max_tokens": 2}
                for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                    async with s.post(f"{url}/v1/completions", json=body, headers=hdr) as r:
                        doc = await r.json()
                        assert r.status == 401 and doc["error"]["code"] == "invalid_api_key", (hdr, doc)
                async with s.post(f"{url}/v1/completions", json=body,
                                  headers={"Authorization": "Bearer s3cret"}) as r:
                    assert r.status == 200
                async with s.get(f"{url}/health") as r:                 # liveness and metrics stay open
                    assert r.status == 200
        finally:
            await runner.cleanup()
            await engine.stop()

    asyncio.run(main())


def test_client_disconnect_logs_one_line_and_abort_endpoint() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    handler, old = Keep(level=logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)

    async def main() -> None:
        async with serving(EngineConfig(num_pages=256)) as (engine, url):
            async with aiohttp.ClientSession() as s:
                r = await s.post(f"{url}/v1/completions", json={"prompt": "long", "max_tokens": 900, "stream": True,
                                                                 "ignore_eos": True, "temperature": 0})
                await r.content.readline()
                r.close()
            await wait_for(lambda: engine.stats()["aborts_total{cause}"].get("disconnect", 0) >= 1, what="abort")
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as s:                 # the abort endpoint, by response id
                r = await s.post(f"{url}/v1/completions", json={"prompt": "long", "max_tokens": 900, "stream": True,
                                                                 "ignore_eos": True, "temperature": 0})
                import json
                first = json.loads((await r.content.readline())[6:])
                async with s.post(f"{url}/v1/abort/{first['id']}") as a:
                    assert a.status == 200 and (await a.json())["aborted"] is True
                chunks = [json.loads(line[6:]) async for line in r.content if line.startswith(b"data: {")]
                assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
                assert chunks[-1]["kvproof"]["abort_reason"] == "client"

    try:
        asyncio.run(main())
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    mine = [r for r in records if "disconnect" in r.getMessage()]
    assert len(mine) == 1 and "\n" not in mine[0].getMessage(), [r.getMessage() for r in mine]
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records if r.exc_info]


def test_serve_flags_api_key_env_log_level_and_max_model_len(monkeypatch) -> None:
    import argparse

    from kvproof.runtime.serving.serve_cli import add_serve_args, engine_config
    monkeypatch.setenv("KVPROOF_API_KEY", "from-env")
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--max-model-len", "64", "--log-level", "warning"])
    assert args.api_key == "from-env" and args.log_level == "warning"
    assert p.parse_args(["--api-key", "flag"]).api_key == "flag"
    cfg = engine_config(args)
    assert cfg.max_model_len == 64
    with pytest.raises(ValueError, match="--max-model-len 1"):
        engine_config(p.parse_args(["--max-model-len", "1"]))

    async def main() -> None:
        async with serving(cfg) as (engine, url), aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v1/models/{MODEL}") as r:
                assert r.status == 200 and (await r.json())["max_model_len"] == 64
            async with s.post(f"{url}/v1/completions", json={"prompt": "x" * 40, "max_tokens": 30}) as r:
                doc = await r.json()
                assert r.status == 400 and doc["error"]["code"] == "context_length_exceeded", doc
            async with s.post(f"{url}/v1/completions", json={"prompt": "x" * 40, "max_tokens": 20}) as r:
                assert r.status == 200

    asyncio.run(main())
