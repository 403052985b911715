"""End to end: 200+ concurrent HTTP requests with aborts and disconnects; every completed greedy
output equals the single-request reference, no page leaks, and the metrics add up."""
from __future__ import annotations

import asyncio
import json
import random

import aiohttp

from serving_testing import serving, wait_for
from kvproof.runtime.engine import EngineConfig, SamplingParams, generate_reference
from kvproof.runtime.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
N_REQUESTS = 240
MAX_TOKENS = 20
SHARED = "You are a coding agent. Repository context follows.\n" + "".join(
    f"def helper_{i}(x):\n    return x + {i}\n" for i in range(8))        # ~270-byte shared prefix


def _prompts() -> list[str]:
    short = [f"q{i}: sort a list of {i} ints" for i in range(12)]
    agent = [SHARED + f"# task {i}: fix the bug in helper_{i % 8}\n" for i in range(12)]
    return short + agent


def test_concurrent_load_matches_reference() -> None:
    prompts = _prompts()
    cfg = EngineConfig(num_pages=90, max_prefill_tokens=384)        # tight pool: preemptions happen
    ref_tokens = generate_reference(EngineConfig(num_drafts=0), [TOK.encode(p) for p in prompts],
                                    SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    rng = random.Random(0)
    plan = [(rng.randrange(len(prompts)), rng.randint(4, MAX_TOKENS), rng.random() < 0.5,
             rng.choice(["none"] * 6 + ["disconnect_stream", "cancel"])) for _ in range(N_REQUESTS)]

    async def one(s: aiohttp.ClientSession, url: str, i: int) -> tuple[str, str | None]:
        p, mt, stream, fault = plan[i]
        body = {"prompt": prompts[p], "max_tokens": mt, "temperature": 0, "ignore_eos": True,
                "stream": stream or fault == "disconnect_stream"}
        if fault == "cancel":
            await asyncio.sleep(rng.random() * 0.5)
        r = await s.post(f"{url}/v1/completions", json=body)
        assert r.status == 200, await r.text()
        if fault == "disconnect_stream":
            await r.content.readline()
            r.close()
            return "aborted", None
        if not body["stream"]:
            data = await r.json()
            return data["choices"][0]["finish_reason"], data["choices"][0]["text"]
        text, reason = "", None
        async for line in r.content:
            if line.startswith(b"data: {"):
                ch = json.loads(line[6:])["choices"][0]
                text += ch["text"]
                reason = ch["finish_reason"] or reason
        return reason, text

    async def main() -> None:
        async with serving(cfg) as (engine, url):
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn) as s:
                tasks = [asyncio.create_task(one(s, url, i)) for i in range(N_REQUESTS)]
                for i, t in enumerate(tasks):
                    if plan[i][3] == "cancel":
                        asyncio.get_running_loop().call_later(0.05 + rng.random(), t.cancel)
                results = await asyncio.gather(*tasks, return_exceptions=True)
            await wait_for(lambda: engine.stats()["queue_depth{queue}"] == {"waiting": 0, "prefilling": 0,
                                                                           "running": 0}, what="idle engine")
            st = engine.stats()
        print({k: st[k] for k in ("preemptions_total", "cache_hit_rate", "generation_tokens_total")})
        done = 0
        for i, res in enumerate(results):
            if isinstance(res, asyncio.CancelledError):
                continue
            assert not isinstance(res, BaseException), f"request {i}: {res!r}"
            reason, text = res
            if reason == "aborted":
                continue
            p, mt = plan[i][:2]
            assert reason == "length", (i, reason)
            assert text == TOK.decode(ref_tokens[p][:mt]), f"request {i} (prompt {p}) differs from the reference"
            done += 1
        faults = sum(1 for x in plan if x[3] != "none")
        assert done >= N_REQUESTS - faults and faults > 20
        assert st["kv_pages{state}"]["used"] == 0, "page leak"
        cancels = sum(1 for x in plan if x[3] == "cancel")          # some never reach the server
        assert N_REQUESTS - cancels <= st["requests_total"] <= N_REQUESTS
        fin = st["requests_finished_total{reason}"]
        assert sum(fin.values()) == st["requests_total"] and fin.get("length", 0) >= done
        assert fin.get("abort", 0) == st["aborts_total{cause}"].get("disconnect", 0) > 0
        assert st["preemptions_total"] > 0, "the tight pool should force preemptions"
        assert st["cache_hit_rate"] > 0.3, "agent prompts share their prefix pages"

    asyncio.run(main())
