"""The OpenAI-compatible server: completions, chat, streaming, errors, disconnects, metrics."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving_testing import alive, children, serving, wait_for
from kvproof.runtime.serving.engine import EngineConfig, SamplingParams, generate_reference
from kvproof.runtime.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MODEL = "kvproof-tiny"


async def _sse(resp: aiohttp.ClientResponse) -> list[dict]:
    out, done = [], False
    async for line in resp.content:
        line = line.strip()
        if not line:
            continue
        assert line.startswith(b"data: "), line
        if line == b"data: [DONE]":
            done = True
            continue
        out.append(json.loads(line[6:]))
    assert done, "stream must end with data: [DONE]"
    return out


def test_completions_greedy_streaming_and_sampled() -> None:
    prompt = "def fib(n):"
    ref = TOK.decode(generate_reference(EngineConfig(), [TOK.encode(prompt)], SamplingParams(max_tokens=24))[0])

    async def main() -> None:
        async with serving() as (engine, url), aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0}
            r = await s.post(f"{url}/v1/completions", json=body)
            data = await r.json()
            assert r.status == 200 and data["object"] == "text_completion"
            assert data["choices"][0]["text"] == ref
            assert data["usage"] == {"prompt_tokens": len(TOK.encode(prompt)), "completion_tokens": 24,
                                     "total_tokens": len(TOK.encode(prompt)) + 24}
            r = await s.post(f"{url}/v1/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}})
            assert r.headers["Content-Type"].startswith("text/event-stream")
            chunks = await _sse(r)
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24   # OpenAI's usage chunk
            assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == ref
            assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["usage"] is None
            sampled = {"prompt": prompt, "max_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 7}
            texts = [(await (await s.post(f"{url}/v1/completions", json=sampled)).json())["choices"][0]["text"]
                     for _ in range(2)]
            assert texts[0] == texts[1] != ref
            stop = ref[5:7]
            r = await s.post(f"{url}/v1/completions", json={**body, "stop": [stop]})
            data = await r.json()
            assert data["choices"][0]["text"] == ref[: ref.index(stop)]
            assert data["choices"][0]["finish_reason"] == "stop"
            r = await s.get(f"{url}/v1/models")
            assert (await r.json())["data"][0]["id"] == MODEL
            assert (await (await s.get(f"{url}/health")).json())["status"] == "ok"

    asyncio.run(main())


def test_openai_client_completions_and_chat() -> None:
    openai = pytest.importorskip("openai")

    async def main() -> None:
        async with serving() as (engine, url):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
            c = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
            assert c.choices[0].text and c.usage.completion_tokens == 12
            msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
            chat = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
            text = chat.choices[0].message.content
            assert chat.choices[0].message.role == "assistant" and text
            stream = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10,
                                                          temperature=0, stream=True)
            parts = [ch.choices[0].delta.content or "" async for ch in stream]
            assert "".join(parts) == text
            with pytest.raises(openai.NotFoundError):
                await client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
            with pytest.raises(openai.BadRequestError, match="temperature"):
                await client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-1)
            await client.close()

    asyncio.run(main())


BAD = [  # (body, status, param named in the error)
    ("{not json", 400, None),
    ([1, 2], 400, None),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x" * 2000, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "7"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": [["a"]]}, 400, "prompt"),
    ({"prompt": "x", "top_k": "bogus"}, 400, "top_k"),
    ({"prompt": "x", "no_such_field": 1}, 400, "no_such_field"),
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
]


@pytest.mark.parametrize("core", ["thread", "process"])
def test_bad_requests_get_4xx_and_the_server_stays_up(core: str) -> None:
    async def main() -> None:
        async with serving(core=core) as (engine, url), aiohttp.ClientSession() as s:
            for body, status, param in BAD:
                route = "chat/completions" if isinstance(body, dict) and "messages" in body else "completions"
                kw = {"data": body} if isinstance(body, str) else {"json": body}
                r = await s.post(f"{url}/v1/{route}", **kw)
                err = (await r.json())["error"]
                assert r.status == status, (body, r.status, err)
                assert err["param"] == param and err["message"], (body, err)
            r = await s.post(f"{url}/v1/completions", json={"prompt": "still up", "max_tokens": 3, "temperature": 0})
            assert r.status == 200
            assert engine.stats()["requests_total"] == 1

    asyncio.run(main())


@pytest.mark.parametrize("core", ["thread", "process"])
def test_client_disconnect_aborts_the_request(core: str) -> None:
    async def main() -> None:
        cfg = EngineConfig(num_pages=256)
        async with serving(cfg, core) as (engine, url):
            async with aiohttp.ClientSession() as s:           # streaming: read one chunk, hang up
                r = await s.post(f"{url}/v1/completions", json={"prompt": "long", "max_tokens": 900,
                                                                 "ignore_eos": True, "temperature": 0,
                                                                 "stream": True})
                await r.content.readline()
                r.close()
            await wait_for(lambda: engine.stats()["aborts_total{cause}"].get("disconnect", 0) >= 1,
                           what="a disconnect abort (streaming)")

            async def blocking() -> None:                      # non-streaming: cancel mid-generation
                async with aiohttp.ClientSession() as s2:
                    await s2.post(f"{url}/v1/completions", json={"prompt": "long", "max_tokens": 900,
                                                                  "ignore_eos": True, "temperature": 0})
            task = asyncio.create_task(blocking())
            await wait_for(lambda: engine.stats()["queue_depth{queue}"]["running"] >= 1, what="running")
            task.cancel()
            await wait_for(lambda: engine.stats()["aborts_total{cause}"].get("disconnect", 0) >= 2,
                           what="a disconnect abort (non-streaming)")
            await wait_for(lambda: engine.stats()["kv_pages{state}"]["used"] == 0, what="pages freed")
            assert engine.stats()["generation_tokens_total"] < 2 * 900

    asyncio.run(main())


@pytest.mark.parametrize("core", ["thread", "process"])
def test_metrics_parse_and_add_up(core: str) -> None:
    async def main() -> None:
        async with serving(core=core) as (engine, url), aiohttp.ClientSession() as s:
            for i in range(3):
                await s.post(f"{url}/v1/completions", json={"prompt": f"p{i}", "max_tokens": 5, "temperature": 0})
            await s.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
            await wait_for(lambda: engine.stats()["queue_depth{queue}"]["running"] == 0, what="idle")
            text = await (await s.get(f"{url}/metrics")).text()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert all(s.labels.get("model_name") == MODEL for f in fams.values() for s in f.samples)
        val = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
               for f in fams.values() for s in f.samples}
        assert val[("kvproof_requests_total", ())] == 3
        assert val[("kvproof_requests_finished_total", (("reason", "length"),))] == 3
        assert val[("kvproof_generation_tokens_total", ())] == 15
        assert val[("kvproof_http_errors_total", (("status", "404"),))] == 1
        assert val[("kvproof_kv_pages", (("state", "used"),))] == 0
        for name in ("kvproof_queue_depth_requests", "kvproof_spec_accept_length_tokens", "kvproof_spec_accept_ratio",
                     "kvproof_aborts", "kvproof_anomaly_aborts", "kvproof_prefix_cache_hit_ratio"):
            assert name in fams, name

    asyncio.run(main())


def test_serve_cli_arguments() -> None:
    import argparse

    from kvproof.runtime.serving.serve_cli import add_serve_args, build_engine, engine_config
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args([])
    assert (args.host, args.port, args.model, args.engine) == ("127.0.0.1", 8000, "tiny", "pd")
    from kvproof.runtime.serving.engine import LocalEngine
    from kvproof.runtime.pd.engine import PDEngine
    eng = build_engine(args)          # the default: a router plus one prefill and one decode worker
    assert isinstance(eng, PDEngine) and eng.pd_cfg.writers == 1 and eng.cluster is None
    from kvproof.runtime.serving.engine_proc import ProcessEngine
    assert isinstance(build_engine(p.parse_args(["--engine", "local"])), ProcessEngine)   # core in its own process
    assert isinstance(build_engine(p.parse_args(["--engine", "local", "--local-core", "thread"])), LocalEngine)
    cfg = engine_config(p.parse_args(["--num-drafts", "3", "--monitor-min-tokens", "64", "--no-monitor"]))
    assert cfg.num_drafts == 3 and cfg.monitor.min_tokens == 64 and not cfg.monitor.enabled
    eng = build_engine(p.parse_args(["--engine", "pd", "--writers", "2", "--slots", "4", "--protocol", "unfixed"]))
    assert isinstance(eng, PDEngine) and eng.pd_cfg.writers == 2 and eng.pd_cfg.variant == "unfixed"
    with pytest.raises(ValueError, match="writers=3"):               # 640-byte KV token: not 3 x 8-byte words
        build_engine(p.parse_args(["--engine", "pd", "--writers", "3"]))


@pytest.mark.timeout(120)
def test_main_command_serves_curl_and_openai_client_on_the_embedded_defaults() -> None:
    """`kvproof serve` as the README runs it (`make serve`): default PD engine, tiny seeded model.
    The README's curl body gets a completion, the openai client a chat completion; Ctrl-C stops
    the router and its worker processes."""
    import signal
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "kvproof", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "engine pd" in line, line
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        body = json.dumps({"model": MODEL, "prompt": "def fib(n):", "max_tokens": 16}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            doc = json.loads(r.read())
        assert doc["choices"][0]["finish_reason"] == "length" and doc["usage"]["completion_tokens"] == 16
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content and chat.usage.completion_tokens == 8
        client.close()
        workers = children(proc.pid)
        assert len(workers) >= 2, "a prefill and a decode worker process"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert not [w for w in workers if alive(w)], "worker processes outlived the server"
