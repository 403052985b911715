"""The load generator as a plain OpenAI client: against a fake server that streams the OpenAI way (usage in
its own chunk with `choices: []`, tokens unlike bytes) and against kvproof's own server."""
from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

from serving_testing import serving, wait_for
from kvproof.runtime.tools.loadgen import add_loadgen_args, run_loadgen


def _args(url: str, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_loadgen_args(p)
    return p.parse_args(["--url", url, *extra])


async def _fake_openai_server(bodies: list[dict]) -> tuple[web.AppRunner, str]:
    """Streams like OpenAI / vLLM: 2-character tokens, 3 tokens a chunk, a finish chunk, then usage alone."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        n = body["max_tokens"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = 0
        while sent < n:
            k = min(3, n - sent)
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": "fake-model",
                     "choices": [{"index": 0, "text": "ab" * k, "logprobs": None, "finish_reason": None}]}
            if body.get("return_token_ids"):
                chunk["choices"][0]["token_ids"] = list(range(sent, sent + k))
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.002)
            sent += k
        fin = {"id": "cmpl-1", "object": "text_completion", "model": "fake-model",
               "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}
        usage = {"id": "cmpl-1", "object": "text_completion", "model": "fake-model", "choices": [],
                 "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}}
        for m in (fin, usage):
            await resp.write(b"data: " + json.dumps(m).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.add_routes([web.get("/v1/models", models), web.post("/v1/completions", completions)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def test_loadgen_against_a_server_that_streams_the_openai_way() -> None:
    async def main() -> None:
        bodies: list[dict] = []
        runner, url = await _fake_openai_server(bodies)
        try:
            rep = await run_loadgen(_args(url, "--requests", "12", "--concurrency", "4", "--max-tokens", "10",
                                          "--min-max-tokens", "7", "--abort-fraction", "0", "--ignore-eos",
                                          "--min-tokens", "8", "--json"))
            expected = sum(b["max_tokens"] for b in bodies)
            assert rep["errors"] == 0 and rep["completed"] == 12 and rep["usage_missing"] == 0, rep
            assert rep["output_tokens"] == expected, "tokens come from usage (2 characters a token here)"
            chunks = sum(-(-b["max_tokens"] // 3) for b in bodies)
            assert all(b["ignore_eos"] is True and b["min_tokens"] == min(8, b["max_tokens"]) for b in bodies)
            assert all(b["stream_options"] == {"include_usage": True} and b["model"] == "fake-model" for b in bodies)
            itl_per_chunk = rep["itl_ms"]
            bodies.clear()
            rep2 = await run_loadgen(_args(url, "--requests", "12", "--concurrency", "4", "--max-tokens", "10",
                                           "--min-max-tokens", "7", "--abort-fraction", "0", "--token-ids"))
            assert rep2["output_tokens"] == sum(b["max_tokens"] for b in bodies)
            assert rep2["itl_samples"] == sum(b["max_tokens"] - min(3, b["max_tokens"]) for b in bodies)
            assert rep["itl_samples"] == chunks - 12                 # one sample per chunk after the first
            assert itl_per_chunk["p50"] is not None
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_loadgen_report_against_kvproof() -> None:
    async def main() -> None:
        async with serving() as (engine, url):
            args = _args(url, "--requests", "30", "--concurrency", "8", "--prefix-chars", "200",
                         "--max-tokens", "12", "--min-max-tokens", "4", "--abort-fraction", "0.2", "--token-ids")
            rep = await run_loadgen(args)
            await wait_for(lambda: engine.stats()["kv_pages{state}"]["used"] == 0, what="pages freed")
            await engine.refresh_stats()
            st = engine.stats()
        assert rep["errors"] == 0 and rep["completed"] + rep["client_aborts"] == 30 and rep["usage_missing"] == 0
        assert rep["client_aborts"] > 0 and rep["output_tokens"] > 0 and rep["output_tokens_per_s"] > 0
        assert rep["ttft_ms"]["p50"] is not None and rep["itl_ms"]["p99"] >= rep["itl_ms"]["p50"]
        assert st["requests_total"] == 30 and st["cache_hit_rate"] > 0
        # the completed requests' usage adds up to what the engine generated for them (aborted ones: theirs)
        assert rep["output_tokens"] <= st["generation_tokens_total"]

    asyncio.run(main())
