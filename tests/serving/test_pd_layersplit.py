"""LayerSplit on the PD engine's prefill ranks: each prefill rank is rank 0 of its own LayerSplit group
and gathers every layer for the KV export; decode runs unsplit. Greedy outputs equal the one-process
reference, slots end FREE, and the followers (grandchildren of the router) exit with the engine."""
from __future__ import annotations

import argparse
import asyncio
import time

import pytest
import torch

from serving_testing import MODEL4, alive, children, cmdline, layersplit_cfg, shared_prefix_prompts, wait_for
from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams, generate_reference
from kvproof.runtime.model.cache import KVCache
from kvproof.runtime.pd.engine import PDEngine, PDEngineConfig, wait_idle
from kvproof.runtime.serving.scheduler import Sequence

PARAMS = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)




def _prefill_and_export(cfg: EngineConfig, prompt: list[int]) -> tuple[torch.Tensor, dict]:
    """Prefill one prompt in a fresh core (as PrefillModel does) and export its KV; (bytes, group stats)."""
    core = EngineCore(cfg)
    try:
        seq = Sequence("x", list(prompt), SamplingParams())
        seq.pages = core.pool.allocate(-(-len(prompt) // core.model.cfg.page_size))
        with torch.no_grad():
            core.runner.prefill([seq], [len(prompt)])
        return core.export_tokens(seq.pages, len(prompt)), core.group.stats() if core.group else {}
    finally:
        core.close()


@pytest.mark.timeout(60)
def test_split_export_equals_the_unsplit_kv_cache_export() -> None:
    """Rank 0 stores only its layers; the export gathers the rest from their owners, byte for byte."""
    prompt = shared_prefix_prompts(1)[0] + list(range(60, 70))                     # 53 tokens: a partial last page
    ref, _ = _prefill_and_export(layersplit_cfg(num_pages=8), prompt)
    tb = KVCache(MODEL4, 1).token_bytes
    assert ref.shape == (4, len(prompt), tb) and ref.dtype == torch.uint8
    for kw, remote_layers in [({"layersplit": 2, "layersplit_depth": 1}, 2),
                              ({"layersplit": 3, "layersplit_ownership": "round_robin", "layersplit_depth": 1}, 2)]:
        got, st = _prefill_and_export(layersplit_cfg(num_pages=8, **kw), prompt)
        assert torch.equal(got, ref), kw
        assert st["layersplit_exports_total"] == 1
        assert st["layersplit_export_bytes_total"] == remote_layers * len(prompt) * tb


def _worker_tree(engine: PDEngine) -> dict[str, list[int]]:
    """The PD worker processes and their spawned children (LayerSplit followers), by role."""
    cl = engine.cluster
    assert cl is not None and cl.decode is not None
    tree = {}
    for name, pid in [("decode", cl.decode.pid)] + [(f"prefill-{i}", p.pid) for i, p in enumerate(cl.prefill)]:
        tree[name] = [c for c in children(pid) if "multiprocessing.spawn" in cmdline(c)]
    return tree


@pytest.mark.timeout(90)
def test_pd_engine_with_layersplit_prefill_ranks_equals_reference() -> None:
    """2 prefill ranks, each a LayerSplit group of 2 (depth 1: old tokens' KV must come through the
    broadcasts), concurrent greedy requests sharing a prefix -> the reference; slots FREE; no leftovers."""
    prompts = shared_prefix_prompts(5)
    ref = generate_reference(layersplit_cfg(num_drafts=0), prompts, PARAMS)

    async def one(engine: PDEngine, k: int) -> list[int]:
        out: list[int] = []
        async for ev in engine.generate(GenerationRequest(f"r{k}", tuple(prompts[k]), PARAMS)):
            out += ev.tokens
            if ev.finished:
                assert ev.finish_reason == "length", ev
        return out

    async def main() -> tuple[list[list[int]], dict, dict[str, list[int]]]:
        engine = PDEngine(layersplit_cfg(layersplit=2, layersplit_depth=1),
                          PDEngineConfig(slots=3, writers=2, max_prompt_tokens=96))
        await engine.start()
        try:
            tree = _worker_tree(engine)
            outs = [await one(engine, 0)]                                  # warms the prefill ranks' prefix caches
            outs += await asyncio.gather(*(one(engine, k) for k in range(1, len(prompts))))
            await asyncio.get_running_loop().run_in_executor(None, wait_idle, engine, 30.0)
            # the prefill ranks report their counters to decode every 0.2 s: wait for both ranks' last export
            await wait_for(lambda: engine.stats().get("prefill_layersplit_exports_total") == 2 * len(prompts),
                           what="both prefill ranks' export counters")
            return outs, engine.stats(), tree
        finally:
            await engine.stop()

    outs, st, tree = asyncio.run(main())
    assert outs == ref
    assert st["slots{state}"] == {"FREE": 3, "WAIT": 0, "READY": 0, "ABORTING": 0}
    assert st["kv_foreign_landings_total"] == 0
    # every prefill rank (2) exported every prompt through its group; hits on the shared prefix
    assert st["prefill_layersplit_exports_total"] == 2 * len(prompts)
    # a rank batches the prompts that arrived together into one forward: the warm-up's, then 1..4 more
    assert 2 * 2 <= st["prefill_layersplit_forwards_total"] <= 2 * len(prompts)
    assert st["prefill_prefix_hit_tokens_total"] >= 2 * 32 * (len(prompts) - 1)
    assert tree["decode"] == [], "decode runs unsplit: no followers"
    followers = [p for name, ps in tree.items() if name != "decode" for p in ps]
    assert [len(tree[f"prefill-{i}"]) for i in range(2)] == [1, 1], tree
    end = time.monotonic() + 10
    while any(alive(p) for p in followers) and time.monotonic() < end:
        time.sleep(0.05)
    assert not [p for p in followers if alive(p)], "LayerSplit followers outlived the PD engine"


@pytest.mark.timeout(30)
def test_layersplit_settings_with_the_pd_engine() -> None:
    """`kvproof serve --layersplit 2` selects the PD engine; unsupported combinations are named."""
    from kvproof.runtime.serving.serve_cli import add_serve_args, build_engine
    p = argparse.ArgumentParser()
    add_serve_args(p)
    engine = build_engine(p.parse_args(["--layersplit", "2"]))
    assert isinstance(engine, PDEngine) and engine.cfg.layersplit == 2 and engine.cluster is None
    for kw, msg in [({"layersplit": 2, "host_cache_pages": 8}, "host_cache_pages"),
                    ({"layersplit": 5}, "layersplit=5 ranks > the model's 4 layers")]:
        with pytest.raises(ValueError, match=msg):
            PDEngine(layersplit_cfg(**kw))
