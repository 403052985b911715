"""The PD engine: the model disaggregated over the PD runtime (prefill-rank processes -> KV slots ->
decode process). Greedy outputs equal the single-process reference under concurrency with aborts
and disconnects, no slot leaks, /metrics through the server, and corrupted KV trips the monitor."""
from __future__ import annotations

import asyncio
import json
import os
import random

import aiohttp
import pytest

from serving_testing import wait_for
from kvproof.runtime.serving.engine import EngineConfig, GenerationRequest, SamplingParams, generate_reference
from kvproof.runtime.pd.engine import PDEngine, PDEngineConfig, wait_idle
from kvproof.runtime.serving.server import start_server
from kvproof.runtime.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
MAX_TOKENS = 16
SHARED = "You are a coding agent. Repository context follows.\n" + "".join(
    f"def helper_{i}(x):\n    return x + {i}\n" for i in range(8))


def _prompts() -> list[str]:
    short = [f"q{i}: sort a list of {i} ints" for i in range(8)] + ["x"]     # "x": one token, no KV
    agent = [SHARED + f"# task {i}: fix the bug in helper_{i % 8}\n" for i in range(6)]
    return short + agent


async def _collect(engine: PDEngine, rid: str, prompt: list[int], params: SamplingParams,
                   fault: str, start_s: float = 0.0) -> tuple[str | None, list[int]]:
    """Run one request from start_s on; 'disconnect' leaves after the first event, 'abort' aborts it soon."""
    await asyncio.sleep(start_s)
    out: list[int] = []
    reason = None
    if fault == "abort":
        asyncio.get_running_loop().call_later(random.Random(rid).random() * 1.0, engine.abort, rid, "client")
    gen = engine.generate(GenerationRequest(rid, tuple(prompt), params))
    async for ev in gen:
        out += ev.tokens
        reason = ev.finish_reason if ev.finished else reason
        if fault == "disconnect":
            await gen.aclose()                                  # the consumer goes away -> abort
            return "disconnected", out
    return reason, out


@pytest.mark.timeout(90)
def test_pd_engine_concurrent_greedy_equals_reference_no_slot_leaks() -> None:
    """40 concurrent requests (some aborted or disconnected mid-way) over 2 prefill ranks and 6 slots."""
    prompts = _prompts()
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    ref = generate_reference(EngineConfig(num_drafts=0), [TOK.encode(p) for p in prompts], params)
    rng = random.Random(1)
    plan = [(rng.randrange(len(prompts)), rng.choice(["none"] * 5 + ["abort", "disconnect"])) for _ in range(40)]

    before = os.sched_getaffinity(0)

    async def main() -> dict:
        engine = PDEngine(EngineConfig(), PDEngineConfig(slots=6, writers=2, delay_ms=15.0, max_prompt_tokens=512))
        runner, url = await start_server(engine, "127.0.0.1", 0)
        try:
            cpus = sorted(os.sched_getaffinity(engine.cluster.decode.pid))
            if len(before) >= 2:                                    # cpu_layout auto: decode alone on one CPU
                assert cpus == [max(before)] and os.sched_getaffinity(0) == before - {max(before)}
                assert all(max(before) not in os.sched_getaffinity(p.pid) for p in engine.cluster.prefill)
            res = await asyncio.gather(*[_collect(engine, f"r{i}", TOK.encode(prompts[p]), params, f, 0.02 * i)
                                         for i, (p, f) in enumerate(plan)])
            done = 0
            for i, ((p, fault), (reason, out)) in enumerate(zip(plan, res)):
                if reason == "length":
                    assert out == ref[p], f"request {i} (prompt {p}, fault {fault}) differs from the reference"
                    done += 1
                else:
                    assert fault != "none", f"request {i} ended with {reason} without a fault"
                    assert out == ref[p][:len(out)], f"aborted request {i}: its tokens so far must match"
            assert done >= 25, done
            st = await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine, 30.0)
            assert st["slots{state}"] == {"FREE": 6, "WAIT": 0, "READY": 0, "ABORTING": 0}
            assert st["kv_foreign_landings_total"] == 0
            assert st["reclaim_latency_seconds_count"] == st["slots_reclaimed_total"]
            assert sum(st["requests_finished_total{reason}"].values()) == len(plan)
            # prefill computed every whole prompt: decode sampled each first token from the hidden state
            # Done carried, so it ran no prefill step of its own
            assert st["steps_total{kind}"].get("prefill", 0) == 0 and st["steps_total{kind}"]["decode"] > 0
            async with aiohttp.ClientSession() as s:               # the HTTP path and /metrics
                r = await s.post(f"{url}/v1/completions", json={"prompt": prompts[0], "max_tokens": MAX_TOKENS,
                                                                "temperature": 0, "ignore_eos": True})
                assert r.status == 200, await r.text()
                assert (await r.json())["choices"][0]["text"] == TOK.decode(ref[0])
                r = await s.post(f"{url}/v1/completions", json={"prompt": "y" * 600, "max_tokens": 4})
                assert r.status == 400 and "KV slot" in (await r.json())["error"]["message"]
                r = await s.post(f"{url}/v1/completions", json={"prompt": prompts[1], "max_tokens": 8,
                                                                "stream": True, "temperature": 0})
                await r.content.readline()
                r.close()                                           # client disconnect while streaming
                await wait_for(lambda: engine.stats()["queue_depth{queue}"]["router"] == 0, what="disconnect")
                await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine, 30.0)
                metrics = await (await s.get(f"{url}/metrics")).text()
            for needle in ('kvproof_kv_slots{model_name="kvproof-tiny",state="FREE"} 6', "kvproof_kv_transfers_total",
                           "kvproof_kv_slot_reclaim_latency_seconds_sum",
                           'kvproof_aborts_total{cause="disconnect",model_name="kvproof-tiny"}'):
                assert needle in metrics, needle
            return st
        finally:
            await runner.cleanup()
            await engine.stop()

    st = asyncio.run(main())
    assert os.sched_getaffinity(0) == before                        # the router's CPUs are given back at stop
    print({k: st[k] for k in ("kv_transfers_total", "kv_requests_aborted_total", "slots_reclaimed_total",
                              "reclaim_latency_seconds_sum", "aborts_total{cause}")})


@pytest.mark.timeout(90)
def test_pd_engine_corrupted_kv_transfer_fires_the_monitor() -> None:
    """Flip bytes in the prefill's exported KV of every third request: the rule aborts exactly those."""
    # the prompt family of test_kv_corruption_fires_the_rule_on_the_affected_requests
    prompts = [TOK.encode(f"prompt number {i}: def f(x): return x*{i}\n") for i in range(12)]
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    cfg = EngineConfig()          # the default model's own monitor: suspicion, then the decode side's KV audit
    ref = generate_reference(cfg, prompts, params)
    affected = {0, 3, 6, 9}

    async def main() -> list:
        engine = PDEngine(cfg, PDEngineConfig(slots=4, writers=1))
        await engine.start()
        try:
            for i in affected:
                engine.inject_kv_corruption(f"c{i}")

            async def one(i: int) -> tuple:
                toks, last = [], None
                async for ev in engine.generate(GenerationRequest(f"c{i}", tuple(prompts[i]), params)):
                    toks += ev.tokens
                    last = ev
                return toks, last

            res = await asyncio.gather(*[one(i) for i in range(len(prompts))])
            await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine, 30.0)
            assert engine.stats()["anomaly_aborts_total{rule}"], "the rule fired and was counted"
            return res
        finally:
            await engine.stop()

    res = asyncio.run(main())
    for i, (toks, last) in enumerate(res):
        if i in affected:
            assert last.finish_reason == "anomaly", (i, last)
            assert last.detail in ("low_accept_length", "degenerate_accept_rate"), last
            assert last.completion_tokens <= 140, "aborted soon after the rule is armed"
        else:
            assert toks == ref[i], f"request {i} was not corrupted and must equal the reference"
    print(json.dumps({i: res[i][1].finish_reason for i in range(len(res))}))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("protocol", ["fixed", "unfixed"])
def test_pd_engine_slot_reuse_race_garbles_outputs_only_in_unfixed(protocol: str) -> None:
    """The post-mortem's bug with the real model: aborts while KV is in flight (20 ms mean write delay),
    two slots reused at once. unfixed: late writes land in the next owner's slot and garble its output;
    fixed: every completed output equals the reference."""
    prompts = [TOK.encode(f"prompt number {i}: def f(x): return x*{i}\n" * 3) for i in range(10)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ref = generate_reference(EngineConfig(num_drafts=0), prompts, params)
    rng = random.Random(0)

    async def main() -> tuple[int, int, dict]:
        engine = PDEngine(EngineConfig(), PDEngineConfig(slots=2, writers=1, protocol=protocol, delay_ms=20.0))
        await engine.start()
        try:
            sem = asyncio.Semaphore(3)

            async def one(i: int) -> tuple[int, str | None, list[int]]:
                async with sem:
                    p = i % len(prompts)
                    if i % 2 == 0:                                   # abort while queued / KV in flight / decoding
                        asyncio.get_running_loop().call_later(rng.random() * 0.04, engine.abort, f"x{i}")
                    out, last = [], None
                    async for ev in engine.generate(GenerationRequest(f"x{i}", tuple(prompts[p]), params)):
                        out += ev.tokens
                        last = ev
                    return p, last.finish_reason if last else None, out

            res = await asyncio.gather(*[one(i) for i in range(240)])
            st = await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine, 30.0)
        finally:
            await engine.stop()
        done = [(p, out) for p, reason, out in res if reason == "length"]
        return len(done), sum(out != ref[p] for p, out in done), st

    done, garbled, st = asyncio.run(main())
    print(protocol, {"completed": done, "garbled": garbled, "foreign_landings": st["kv_foreign_landings_total"],
                     "slots_reclaimed": st["slots_reclaimed_total"]})
    assert st["slots{state}"]["FREE"] == 2 and done >= 80
    if protocol == "fixed":
        assert garbled == 0 and st["kv_foreign_landings_total"] == 0
        assert st["slots_reclaimed_total"] >= 1 and st["reclaim_latency_seconds_sum"] > 0
    else:
        assert st["kv_foreign_landings_total"] > 0 and garbled >= 1, "unfixed frees slots with writes in flight"


@pytest.mark.timeout(60)
def test_pd_engine_prefill_rank_death_ends_requests_and_sets_error() -> None:
    """SIGKILL of the prefill rank mid-transfer: pending requests end with the reason, the engine
    reports the error (/health 503) and refuses new requests; stop() still shuts everything down."""
    params = SamplingParams(max_tokens=50, ignore_eos=True)

    async def main() -> list:
        engine = PDEngine(EngineConfig(), PDEngineConfig(slots=2, writers=1, delay_ms=500.0))
        await engine.start()
        try:
            async def one(i: int) -> tuple:
                last = None
                async for ev in engine.generate(GenerationRequest(f"d{i}", tuple(TOK.encode("hello")), params)):
                    last = ev
                return last.finish_reason, last.detail

            tasks = [asyncio.create_task(one(i)) for i in range(4)]
            await asyncio.sleep(0.3)
            assert engine.cluster is not None
            engine.cluster.kill_prefill(0)
            res = await asyncio.wait_for(asyncio.gather(*tasks), 15)
            await wait_for(lambda: engine.error is not None, what="engine.error")
            with pytest.raises(RuntimeError, match="prefill-0 process exited"):
                engine.generate(GenerationRequest("late", (1, 2), params))
            return res
        finally:
            await engine.stop()

    for reason, detail in asyncio.run(main()):
        assert reason == "abort" and "prefill rank 0 dead" in detail, (reason, detail)


@pytest.mark.timeout(90)
def test_pd_engine_with_a_host_tier_evicts_reloads_and_matches_reference() -> None:
    """The PD path with HiCache (`kvproof serve --host-cache-pages N`): the prefill rank's small
    device pool evicts long shared prefixes to its host tier and reloads them through the checked
    plan under the adversarial emulator; every output equals the reference, and /metrics counts
    the prefill rank's hits, evictions and swap-ins."""
    rng = random.Random(3)
    docs = ["".join(chr(rng.randrange(32, 127)) for _ in range(150)) for _ in range(4)]   # 9 full pages each
    prompts = [docs[d] + f" round {r}" for r in range(3) for d in range(4)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ref = generate_reference(EngineConfig(num_drafts=0), [TOK.encode(p) for p in prompts], params)
    tiered = EngineConfig(num_pages=24, host_cache_pages=64, host_cache_schedule="adversarial")

    async def main() -> dict:
        engine = PDEngine(tiered, PDEngineConfig(slots=2, max_prompt_tokens=256))
        runner, url = await start_server(engine, "127.0.0.1", 0)
        try:
            for i, p in enumerate(prompts):         # one at a time: a 24-page pool holds 2 prefixes
                reason, out = await _collect(engine, f"h{i}", TOK.encode(p), params, "none")
                assert reason == "length" and out == ref[i], f"request {i} differs from the reference"
            await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine, 30.0)
            asked = sum(len(TOK.encode(p)) for p in prompts)      # the rank's live report catches up
            await wait_for(lambda: engine.stats().get("prefill_prompt_tokens_total") == asked,
                           what="the prefill rank's live stats")
            async with aiohttp.ClientSession() as s:
                metrics = await (await s.get(f"{url}/metrics")).text()
            return {**engine.stats(), "metrics": metrics}
        finally:
            await runner.cleanup()
            await engine.stop()

    st = asyncio.run(main())
    assert st["prefill_hicache_evictions_total"] > 0 and st["prefill_hicache_swap_ins_total"] > 0
    assert st["prefill_hicache_host_hits_total"] == st["prefill_hicache_swap_ins_total"]
    assert st["prefill_hicache_stale_indexer_reads_total"] == 0
    assert 0 < st["cache_hit_rate"] < 1
    assert "kvproof_prefill_hicache_swap_ins_total" in st["metrics"]
