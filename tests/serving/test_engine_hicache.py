"""The serving engine's HiCache host tier: eviction to host, checked layer-wise reload, the pre-fix race."""
from __future__ import annotations

import argparse
import asyncio
import random

import aiohttp
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from serving_testing import serving, wait_for
from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams, generate_reference
from kvproof.runtime.hicache.pages import PlanRaceError

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


def _workload(docs: int = 3, rounds: int = 3, doc_len: int = 100, seed: int = 0) -> list[list[int]]:
    """Coding-agent-like prompts: `docs` long shared prefixes (6+ pages), each revisited every round."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(32, 127) for _ in range(doc_len)] for _ in range(docs)]
    return [prefixes[d] + [rng.randrange(32, 127) for _ in range(5 + r)] for r in range(rounds) for d in range(docs)]


def _run(core: EngineCore, prompts: list[list[int]], wave: int = 3) -> list[list[int]]:
    """Submit `wave` requests at a time and step the core until idle; the tokens of each request."""
    out: dict[str, list[int]] = {}
    for start in range(0, len(prompts), wave):
        for k in range(start, min(start + wave, len(prompts))):
            core.add(GenerationRequest(f"r{k}", tuple(prompts[k]), PARAMS),
                     lambda ev: out.setdefault(ev.request_id, []).extend(ev.tokens))
        while core.step():
            pass
    return [out[f"r{k}"] for k in range(len(prompts))]


def _tiered(**kw: object) -> EngineConfig:
    """A tiny device pool (20 pages of 16 tokens: about three prompts) over a 64-page host tier."""
    return EngineConfig(**({"num_pages": 20, "host_cache_pages": 64, "host_cache_schedule": "adversarial"} | kw))


@pytest.fixture(scope="module")
def reference() -> tuple[list[list[int]], list[list[int]]]:
    prompts = _workload()
    return prompts, generate_reference(EngineConfig(num_drafts=0), prompts, PARAMS)


@pytest.mark.timeout(60)
def test_eviction_to_host_and_reload_match_reference(reference: tuple) -> None:
    prompts, ref = reference
    for schedule in ("adversarial", "random"):
        core = EngineCore(_tiered(host_cache_schedule=schedule))
        assert _run(core, prompts) == ref, schedule
        st = core.stats()
        assert st["hicache_evictions_total"] > 0 and st["hicache_writebacks_total"] > 0
        assert st["hicache_swap_ins_total"] > 0 and st["hicache_host_hits_total"] == st["hicache_swap_ins_total"]
        assert st["hicache_swap_batches_total"] > 0 and st["hicache_plans_checked_total"] == 1
        assert st["hicache_misses_total"] > 0 and st["hicache_stale_indexer_reads_total"] == 0
        assert st["kv_pages{state}"]["used"] == 0 and core.host.pins == {}       # nothing leaked
        assert core.host.last["stale_layers"] == 0


@pytest.mark.timeout(60)
def test_without_host_tier_nothing_changes(reference: tuple) -> None:
    prompts, ref = reference
    assert EngineConfig().host_cache_pages == 0
    core = EngineCore(EngineConfig(num_pages=20))
    assert core.host is None and _run(core, prompts) == ref
    assert not any(k.startswith("hicache_") for k in core.stats())


@pytest.mark.timeout(60)
def test_evict_and_reload_is_bit_identical(reference: tuple) -> None:
    prompts, ref = reference
    core = EngineCore(_tiered(num_pages=40))
    assert _run(core, prompts[:1]) == ref[:1]
    cached = core.pool.cached()                                   # hash -> device page
    assert len(cached) == 6
    before = {h: (core.cache.kv[:, p].clone(), core.cache.ik[:, p].clone()) for h, p in cached.items()}
    taken = core.pool.allocate(core.pool.num_free)                # pressure: every cached page is reused
    assert core.pool.cached() == {} and core.stats()["hicache_writebacks_total"] == 6
    for h, (kv, ik) in before.items():                            # the host copies are exact
        hp = core.host.by_hash[h]
        assert torch.equal(core.host.host_kv[:, hp], kv) and torch.equal(core.host.host_idx[0][:, hp], ik)
    core.cache.kv[:, taken] = 7.0                                 # what the reused pages now hold
    core.cache.ik[:, taken] = -3.0
    core.pool.free(taken)
    assert _run(core, [prompts[0]]) == ref[:1]                    # the same prompt again: reloaded
    st = core.stats()
    assert st["hicache_swap_ins_total"] == 6 and st["hicache_device_hits_total"] == 0
    after = core.pool.cached()
    assert set(after) == set(before)
    for h, (kv, ik) in before.items():
        assert torch.equal(core.cache.kv[:, after[h]], kv) and torch.equal(core.cache.ik[:, after[h]], ik), h
    taken = core.pool.allocate(core.pool.num_free)                # a second eviction keeps the host copy
    core.pool.free(taken)
    assert core.stats()["hicache_writebacks_total"] == 6 and core.stats()["hicache_evictions_total"] == 12


@pytest.mark.timeout(60)
def test_prefix_plan_reads_stale_indexer_cache(reference: tuple) -> None:
    prompts, ref = reference
    with pytest.raises(PlanRaceError, match="no_read_before_ready|indexer"):
        EngineCore(_tiered(host_cache_variant="unfixed"))          # refused without allow_races
    core = EngineCore(_tiered(host_cache_variant="unfixed", host_cache_allow_races=True))
    out = _run(core, prompts)
    st = core.stats()
    assert st["hicache_swap_ins_total"] > 0
    # the indexer read the device pages before the load stream had written them (foreign KV)
    assert st["hicache_stale_indexer_reads_total"] > 0
    assert sum(o != r for o, r in zip(out, ref)) >= 1             # and greedy outputs are garbled


@pytest.mark.timeout(60)
def test_host_tier_metrics_and_cli() -> None:
    from kvproof.runtime.serving.serve_cli import add_serve_args, engine_config
    p = argparse.ArgumentParser()
    add_serve_args(p)
    assert engine_config(p.parse_args([])).host_cache_pages == 0
    assert engine_config(p.parse_args(["--host-cache-pages", "64"])).host_cache_pages == 64
    with pytest.raises(ValueError, match="--host-cache-pages -1"):
        engine_config(p.parse_args(["--host-cache-pages", "-1"]))
    with pytest.raises(ValueError, match="host_cache_variant='nope'"):
        EngineCore(_tiered(host_cache_variant="nope"))
    prompts = _workload(rounds=2)

    async def main() -> None:
        async with serving(_tiered()) as (engine, url), aiohttp.ClientSession() as s:
            for pr in prompts:
                r = await s.post(f"{url}/v1/completions", json={"prompt": bytes(pr).decode(), "max_tokens": 4,
                                                                 "temperature": 0})
                assert r.status == 200, await r.text()
            await wait_for(lambda: engine.stats()["queue_depth{queue}"]["running"] == 0, what="idle")
            text = await (await s.get(f"{url}/metrics")).text()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        val = {(x.name, tuple(sorted((k, v) for k, v in x.labels.items() if k != "model_name"))): x.value
               for f in fams.values() for x in f.samples}
        assert fams["kvproof_hicache_swap_ins"].type == "counter"
        assert val[("kvproof_hicache_swap_ins_total", ())] > 0
        assert val[("kvproof_hicache_evictions_total", ())] > 0
        assert ("kvproof_hicache_host_pages", (("state", "used"),)) in val

    asyncio.run(main())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [1, 2, 8])
def test_random_aborts_chunking_and_host_drops(seed: int) -> None:
    """Random arrivals and aborts (also of requests whose swap is reserved but not run), chunked prefill,
    preemption, a host pool that must drop pages: completed outputs equal the reference, nothing leaks."""
    rng = random.Random(seed)
    docs = [[rng.randrange(32, 127) for _ in range(rng.randrange(40, 140))] for _ in range(4)]
    prompts = [rng.choice(docs) + [rng.randrange(32, 127) for _ in range(rng.randrange(1, 20))] for _ in range(24)]
    params = SamplingParams(max_tokens=rng.randrange(3, 12), ignore_eos=True)
    ref = generate_reference(EngineConfig(num_drafts=0), prompts, params)
    core = EngineCore(EngineConfig(num_pages=rng.randrange(14, 40), host_cache_pages=rng.randrange(4, 40),
                                   host_cache_schedule=rng.choice(["random", "adversarial", "eager", "sync"]),
                                   max_prefill_tokens=rng.choice([64, 128, 512])))
    out: dict[str, list[int]] = {}
    fin: dict[str, str] = {}

    def sink(ev: object) -> None:
        out.setdefault(ev.request_id, []).extend(ev.tokens)                   # type: ignore[attr-defined]
        if ev.finished:                                                       # type: ignore[attr-defined]
            fin[ev.request_id] = ev.finish_reason                             # type: ignore[attr-defined]
    pending = list(range(len(prompts)))
    while pending or not core.scheduler.is_idle():
        r = rng.random()
        if pending and r < 0.3:
            k = pending.pop(0)
            core.add(GenerationRequest(f"r{k}", tuple(prompts[k]), params), sink)
        elif r < 0.35 and core.seqs:
            core.abort(rng.choice(sorted(core.seqs)))
        else:
            core.step()
    for k in range(len(prompts)):
        got = out.get(f"r{k}", [])
        assert got == (ref[k] if fin[f"r{k}"] == "length" else ref[k][:len(got)]), k
    st = core.stats()
    assert st["hicache_swap_ins_total"] > 0 and st["hicache_stale_indexer_reads_total"] == 0
    assert st["kv_pages{state}"]["used"] == 0 and core.host.pins == {}


@pytest.mark.timeout(60)
def test_pd_prefill_side_exports_identical_kv(reference: tuple) -> None:
    """The PD prefill rank's core (prefix cache + host tier) exports the same KV bytes as without a host tier."""
    from kvproof.runtime.pd.config import PDConfig
    from kvproof.runtime.pd.messages import Alloc
    from kvproof.runtime.pd.model_worker import PrefillModel
    prompts, _ = reference

    def export(ecfg: EngineConfig) -> tuple[list, dict]:
        pm = PrefillModel(ecfg, PDConfig())
        return [pm(Alloc(0, 0, 1, i, len(p), p)).kv for i, p in enumerate(prompts)], pm.core.stats()
    plain, _ = export(EngineConfig())
    tiered, st = export(_tiered(num_pages=12))
    assert st["hicache_swap_ins_total"] > 0 and st["hicache_evictions_total"] > 0
    assert all((a == b).all() for a, b in zip(plain, tiered))
