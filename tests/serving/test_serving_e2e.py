"""End to end: 200+ concurrent HTTP requests with aborts and disconnects, against the single-process
engine and the PD engine (the `kvproof serve` default); every completed greedy output equals the
single-request reference, no page or slot leaks, and the metrics add up."""
from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest

from serving_testing import serving, wait_for
from kvproof.runtime.serving.engine import EngineConfig, SamplingParams, generate_reference
from kvproof.runtime.pd.engine import PDEngine, PDEngineConfig, wait_idle
from kvproof.runtime.serving.server import start_server
from kvproof.runtime.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
N_REQUESTS = 240
MAX_TOKENS = 20
SHARED = "You are a coding agent. Repository context follows.\n" + "".join(
    f"def helper_{i}(x):\n    return x + {i}\n" for i in range(8))        # ~270-byte shared prefix
Plan = list[tuple[int, int, bool, str]]      # (prompt, max_tokens, stream, fault) per request


def _prompts() -> list[str]:
    short = [f"q{i}: sort a list of {i} ints" for i in range(12)]
    agent = [SHARED + f"# task {i}: fix the bug in helper_{i % 8}\n" for i in range(12)]
    return short + agent


def _plan(n_prompts: int, seed: int) -> Plan:
    rng = random.Random(seed)
    return [(rng.randrange(n_prompts), rng.randint(4, MAX_TOKENS), rng.random() < 0.5,
             rng.choice(["none"] * 6 + ["disconnect_stream", "cancel"])) for _ in range(N_REQUESTS)]


async def _load(url: str, prompts: list[str], plan: Plan, seed: int) -> list:
    """Send every request of the plan at once; 'cancel' cancels the client task at a random time,
    'disconnect_stream' closes the connection after the first streamed chunk."""
    rng = random.Random(seed)

    async def one(s: aiohttp.ClientSession, i: int) -> tuple[str, str | None]:
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

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        tasks = [asyncio.create_task(one(s, i)) for i in range(N_REQUESTS)]
        for i, t in enumerate(tasks):
            if plan[i][3] == "cancel":
                asyncio.get_running_loop().call_later(0.05 + rng.random(), t.cancel)
        return await asyncio.gather(*tasks, return_exceptions=True)


def _check_outputs(results: list, plan: Plan, ref_tokens: list[list[int]]) -> int:
    """Every request that completed equals the reference; returns how many completed."""
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
    return done


def _reference(prompts: list[str]) -> list[list[int]]:
    return generate_reference(EngineConfig(num_drafts=0), [TOK.encode(p) for p in prompts],
                              SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))


def _check_request_counts(st: dict, plan: Plan, done: int) -> None:
    cancels = sum(1 for x in plan if x[3] == "cancel")          # some never reach the server
    assert N_REQUESTS - cancels <= st["requests_total"] <= N_REQUESTS
    fin = st["requests_finished_total{reason}"]
    assert sum(fin.values()) == st["requests_total"] and fin.get("length", 0) >= done


@pytest.mark.parametrize("core", ["thread", "process"])
def test_concurrent_load_matches_reference(core: str) -> None:
    """The local engine with its EngineCore on a thread of the server, and in its own process
    (`kvproof serve --engine local`'s default)."""
    prompts, plan = _prompts(), _plan(len(_prompts()), 0)
    ref_tokens = _reference(prompts)
    cfg = EngineConfig(num_pages=90, max_prefill_tokens=384)        # tight pool: preemptions happen

    async def main() -> tuple[list, dict]:
        async with serving(cfg, core) as (engine, url):
            results = await _load(url, prompts, plan, 0)
            await wait_for(lambda: engine.stats()["queue_depth{queue}"] == {"waiting": 0, "prefilling": 0,
                                                                           "running": 0}, what="idle engine")
            return results, engine.stats()

    results, st = asyncio.run(main())
    print({k: st[k] for k in ("preemptions_total", "cache_hit_rate", "generation_tokens_total")})
    done = _check_outputs(results, plan, ref_tokens)
    assert st["kv_pages{state}"]["used"] == 0, "page leak"
    _check_request_counts(st, plan, done)
    assert st["requests_finished_total{reason}"].get("abort", 0) == st["aborts_total{cause}"].get("disconnect", 0) > 0
    assert st["preemptions_total"] > 0, "the tight pool should force preemptions"
    assert st["cache_hit_rate"] > 0.3, "agent prompts share their prefix pages"


def test_concurrent_load_with_heavy_eviction_matches_reference() -> None:
    """The same load on a device pool a fraction of the working set, over the host tier: prefix pages
    are evicted to the host, reloaded and reused all the time, every page change a fired kv_page action."""
    prompts, plan = _prompts(), _plan(len(_prompts()), 2)
    ref_tokens = _reference(prompts)
    cfg = EngineConfig(num_pages=48, max_prefill_tokens=384, host_cache_pages=256,
                       host_cache_schedule="adversarial")

    async def main() -> tuple[list, dict, object]:
        async with serving(cfg) as (engine, url):
            results = await _load(url, prompts, plan, 2)
            await wait_for(lambda: engine.stats()["queue_depth{queue}"] == {"waiting": 0, "prefilling": 0,
                                                                           "running": 0}, what="idle engine")
            return results, engine.stats(), engine.core

    results, st, core = asyncio.run(main())
    print({k: st[k] for k in ("preemptions_total", "cache_hit_rate", "hicache_evictions_total",
                              "hicache_swap_ins_total", "hicache_host_hits_total")})
    done = _check_outputs(results, plan, ref_tokens)
    assert st["kv_pages{state}"]["used"] == 0, "page leak"
    _check_request_counts(st, plan, done)
    assert st["hicache_evictions_total"] > 100 and st["hicache_swap_ins_total"] > 50, "heavy eviction and reload"
    assert st["hicache_stale_indexer_reads_total"] == 0
    assert core.pool.check() == [] and core.host.pins == {}


@pytest.mark.timeout(180)
def test_concurrent_load_matches_reference_on_the_pd_engine() -> None:
    """The same load through `kvproof serve`'s default engine: KV through 8 slots of the verified
    slot protocol from one prefill rank, disconnects aborting through the protocol."""
    prompts, plan = _prompts(), _plan(len(_prompts()), 1)
    ref_tokens = _reference(prompts)

    async def main() -> tuple[list, dict, str]:
        engine = PDEngine(EngineConfig(), PDEngineConfig(slots=8, max_prompt_tokens=512, delay_ms=20.0))
        runner, url = await start_server(engine, "127.0.0.1", 0)
        try:
            results = await _load(url, prompts, plan, 1)
            st = await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine, 60.0)
            async with aiohttp.ClientSession() as s:
                metrics = await (await s.get(f"{url}/metrics")).text()
            return results, st, metrics
        finally:
            await runner.cleanup()
            await engine.stop()

    results, st, metrics = asyncio.run(main())
    print({k: st[k] for k in ("kv_transfers_total", "slots_reclaimed_total", "aborts_total{cause}",
                              "cache_hit_rate")})
    done = _check_outputs(results, plan, ref_tokens)
    assert st["slots{state}"] == {"FREE": 8, "WAIT": 0, "READY": 0, "ABORTING": 0}, "slot leak"
    assert st["kv_foreign_landings_total"] == 0
    assert st["reclaim_latency_seconds_count"] == st["slots_reclaimed_total"]
    _check_request_counts(st, plan, done)
    assert st["aborts_total{cause}"].get("disconnect", 0) > 0
    assert st["kv_transfers_total"] >= done
    assert st["cache_hit_rate"] > 0.3, "the prefill rank's prefix cache: agent prompts share their prefix pages"
    assert st["prefix_cache_hit_tokens_total"] > 0
    assert 'kvproof_kv_slots{model_name="kvproof-tiny",state="FREE"} 8.0' in metrics
    assert "kvproof_kv_transfers_total" in metrics
