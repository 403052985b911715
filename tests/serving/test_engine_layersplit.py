"""LayerSplit in the serving engine: R gloo ranks, each storing its share of the KV layers, token-identical."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import multiprocessing

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving_testing import MODEL4, layersplit_cfg, serving, shared_prefix_prompts, wait_for
from kvproof.runtime.serving.engine import (EngineConfig, EngineCore, GenerationRequest, LocalEngine, SamplingParams,
                                    TokenEvent, generate_reference)
from kvproof.runtime.layersplit.pool import PlanRaceError
from kvproof.runtime.layersplit.split_cache import engine_shape
from kvproof.runtime.model.tokenizer import ByteTokenizer

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)




@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    return generate_reference(layersplit_cfg(), shared_prefix_prompts(6), PARAMS)


def _followers(engine: LocalEngine) -> list[multiprocessing.Process]:
    assert engine.core is not None and engine.core.group is not None
    return list(engine.core.group.procs.processes)


async def _generate(engine: LocalEngine, prompts: list[list[int]], ks: range, abort: int | None = None
                    ) -> dict[str, list[int]]:
    """Requests r<k> for k in ks, concurrently; r<abort> is aborted after its first tokens."""
    out: dict[str, list[int]] = {}

    async def one(k: int) -> None:
        async for ev in engine.generate(GenerationRequest(f"r{k}", tuple(prompts[k]), PARAMS)):
            out.setdefault(f"r{k}", []).extend(ev.tokens)
            if k == abort and not ev.finished:
                engine.abort(f"r{k}")
    await asyncio.gather(*(one(k) for k in ks))
    return out


# Each (ranks, depth) makes every rank receive more layers than it has buffers, so a buffer is reused
# within a forward and a rank cannot get by on the rows it wrote itself in earlier steps: every
# old token's KV must come from its owner's broadcast (test_a_receive_that_lands_nothing_is_visible).
@pytest.mark.timeout(90)
@pytest.mark.parametrize("ranks,depth", [(2, 1), (4, 2)])
def test_layersplit_engine_is_token_identical_to_one_process(reference: list[list[int]], ranks: int,
                                                             depth: int) -> None:
    prompts = shared_prefix_prompts(6)

    async def main() -> tuple[dict, dict, list]:
        engine = LocalEngine(layersplit_cfg(layersplit=ranks, layersplit_depth=depth))
        await engine.start()
        try:
            procs = _followers(engine)
            assert len(procs) == ranks - 1 and all(p.is_alive() for p in procs)
            out = await _generate(engine, prompts, range(1))                # warms the prefix cache
            out |= await _generate(engine, prompts, range(1, len(prompts)), abort=3)
            await wait_for(lambda: engine.stats()["kv_pages{state}"]["used"] == 0, what="pages freed")
            return out, engine.stats(), procs
        finally:
            await engine.stop()

    out, st, procs = asyncio.run(main())
    for k, ref in enumerate(reference):
        got = out.get(f"r{k}", [])
        if k == 3:                                                           # aborted
            assert got == ref[:len(got)] and len(got) < len(ref)
        else:
            assert got == ref, k
    assert st["prefix_cache_hit_tokens_total"] > 0 and st["aborts_total{cause}"] == {"client": 1}
    assert st["layersplit_ranks"] == ranks and st["layersplit_forwards_total"] > 0
    assert st["layersplit_broadcast_bytes_total"] > 0
    # each rank holds ~1/R of the unsplit KV + Indexer cache, plus `depth` one-layer receive buffers
    unsplit, L = st["layersplit_unsplit_kv_bytes"], MODEL4.n_layers
    assert sum(st["layersplit_layers_owned{rank}"].values()) == L
    for r in map(str, range(ranks)):
        owned = st["layersplit_layers_owned{rank}"][r]
        assert st["layersplit_kv_bytes{rank}"][r] == owned * unsplit // L <= math.ceil(L / ranks) * unsplit // L
        assert st["layersplit_staging_bytes{rank}"][r] == depth * unsplit // L
    for p in procs:                                                          # stopped with the engine
        p.join(10)
        assert not p.is_alive() and p.exitcode == 0


@pytest.mark.timeout(60)
def test_three_ranks_round_robin_one_buffer_and_the_core_api(reference: list[list[int]]) -> None:
    """EngineCore directly: batched prefill of every prompt, depth 1, round-robin; rank 0's real tensors."""
    core = EngineCore(layersplit_cfg(layersplit=3, layersplit_ownership="round_robin", layersplit_depth=1))
    try:
        out: dict[str, list[int]] = {}

        def sink(ev: TokenEvent) -> None:
            out.setdefault(ev.request_id, []).extend(ev.tokens)
        for k, p in enumerate(shared_prefix_prompts(6)):
            core.add(GenerationRequest(f"r{k}", tuple(p), PARAMS), sink)
        while core.step():
            pass
        assert [out[f"r{k}"] for k in range(len(reference))] == reference
        mem = core.cache.memory()
        assert core.cache.owned == (0, 3) and mem["layers_owned"] == 2
        assert mem["kv_bytes"] == core.cache.store.kv.numel() * 8 == 2 * mem["unsplit_kv_bytes"] // 4
        assert mem["staging_bytes"] == (mem["unsplit_kv_bytes"] + mem["unsplit_indexer_bytes"]) // 4
        procs = list(core.group.procs.processes)
        for c in core.group.conns:              # the engine process "dies": its pipe ends close
            c.close()
        for p in procs:
            p.join(10)
            assert not p.is_alive() and p.exitcode == 0
        core.add(GenerationRequest("late", tuple(shared_prefix_prompts(6)[0]), PARAMS), sink)
        with pytest.raises(RuntimeError, match=r"LayerSplit rank 1 \(pid \d+\) exited with code 0"):
            core.step()                         # a dead rank is named, not waited for
    finally:
        core.close()


@pytest.mark.timeout(120)
def test_triton_backend_with_layersplit_broadcasts_the_fp8_indexer_pages() -> None:
    """The Triton kernels (interpreter on CPU) read the fp8 Indexer cache: it travels with the float keys."""
    cfg = layersplit_cfg(backend="triton", num_pages=16, num_drafts=1)
    # long enough that a stale fp8 page changes the output (checked by dropping the fp8 receive on rank 0)
    prompts, params = [list(range(40, 100))], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = generate_reference(cfg, prompts, params)
    assert generate_reference(dataclasses.replace(cfg, layersplit=2, layersplit_depth=1), prompts, params) == ref


@pytest.mark.timeout(60)
def test_a_receive_that_lands_nothing_is_visible(reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    """The tests above are sensitive: if rank 0's receives never land, its outputs change."""
    from kvproof.runtime.layersplit import split_cache

    def lands_nothing(self: object) -> None:
        if self.work is not None:                                            # type: ignore[attr-defined]
            self.work.wait()                                                 # type: ignore[attr-defined]
            self.work = None                                                 # type: ignore[attr-defined]
    monkeypatch.setattr(split_cache._Landing, "wait", lands_nothing)
    got = generate_reference(layersplit_cfg(layersplit=2, layersplit_depth=1), shared_prefix_prompts(6)[:2], PARAMS)
    assert got != reference[:2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("variant,race", [("unfixed", "recv_idx[2]@r1"), ("no_owner_wait", "indexer[0]@r0")])
def test_racy_plans_are_refused_before_any_rank_starts(variant: str, race: str) -> None:
    before = set(multiprocessing.active_children())
    with pytest.raises(PlanRaceError, match=rf"refusing plan layersplit/.*R=2/L=4.*{race.replace('[', '.')}"):
        EngineCore(layersplit_cfg(layersplit=2, layersplit_variant=variant, layersplit_ownership="round_robin"))
    assert set(multiprocessing.active_children()) == before


@pytest.mark.timeout(30)
def test_bad_layersplit_settings_name_the_problem() -> None:
    from kvproof.runtime.serving.serve_cli import add_serve_args, engine_config
    assert engine_shape(layersplit_cfg(), 4) is None
    shape = engine_shape(layersplit_cfg(layersplit=2), 4)
    assert shape is not None and shape.writeback and shape.owner_wait and shape.variant == "fixed"
    for kw, msg in [({"layersplit": 0}, "layersplit=0: expected an int >= 1"),
                    ({"layersplit": 5}, "layersplit=5 ranks > the model's 4 layers"),
                    ({"layersplit": 2, "host_cache_pages": 8}, "not supported yet"),
                    ({"layersplit": 2, "device": "cuda"}, "CPU \\(gloo\\) only"),
                    ({"layersplit": 2, "layersplit_variant": "nope"}, "layersplit_variant='nope'")]:
        with pytest.raises(ValueError, match=msg):
            engine_shape(layersplit_cfg(**kw), 4)
    p = argparse.ArgumentParser()
    add_serve_args(p)
    assert engine_config(p.parse_args(["--engine", "local", "--layersplit", "2"])).layersplit == 2
    assert engine_config(p.parse_args([])).layersplit == 1
    for args, msg in [(["--engine", "local", "--layersplit", "0"], "--layersplit 0: expected >= 1"),
                      (["--engine", "local", "--layersplit", "3"], "3 ranks > the model's 2 layers"),
                      (["--engine", "pd", "--layersplit", "3"], "3 ranks > the model's 2 layers"),
                      (["--engine", "local", "--layersplit", "2", "--host-cache-pages", "4"], "host_cache_pages")]:
        with pytest.raises(ValueError, match=msg):
            engine_config(p.parse_args(args))


@pytest.mark.timeout(60)
def test_server_with_layersplit_two() -> None:
    """`kvproof serve --engine local --layersplit 2`: completions match the one-process engine; /metrics."""
    cfg = EngineConfig(layersplit=2)
    prompt = "def fib(n):"
    ref = generate_reference(EngineConfig(), [ByteTokenizer().encode(prompt)], PARAMS)[0]

    async def main() -> None:
        async with serving(cfg) as (engine, url), aiohttp.ClientSession() as s:
            r = await s.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                             "ignore_eos": True})
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["text"] == ByteTokenizer().decode(ref)
            text = await (await s.get(f"{url}/metrics")).text()
            got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name.startswith("kvproof_layersplit")}
            assert got["kvproof_layersplit_ranks"] == 2 and got["kvproof_layersplit_forwards_total"] > 0
            assert "kvproof_layersplit_kv_bytes" in got and "kvproof_layersplit_staging_bytes" in got
            procs = _followers(engine)
        for p in procs:
            p.join(10)
            assert not p.is_alive() and p.exitcode == 0
    asyncio.run(main())
