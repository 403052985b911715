"""/metrics: parses with prometheus_client, has the latency histograms, follows the naming conventions
(units last, _total counters, HELP saying what it measures, model_name on every sample), and the PD
engine's counters are current when scraped right after a response."""
from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving_testing import serving
from kvproof.runtime.serving.engine import EngineConfig, EngineCore
from kvproof.runtime.serving.server import start_server
from kvproof.runtime.serving.server_metrics import describe

MODEL = "kvproof-tiny"
HISTOGRAMS = ("kvproof_time_to_first_token_seconds", "kvproof_inter_token_latency_seconds",
              "kvproof_e2e_request_latency_seconds", "kvproof_request_queue_time_seconds")
UNITS = ("seconds", "bytes", "tokens", "ratio")


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _check_conventions(fams: dict) -> None:
    for name, f in fams.items():
        assert name.startswith("kvproof_") and re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert f.documentation and not f.documentation.startswith("engine stat"), (name, f.documentation)
        assert "no HELP yet" not in f.documentation, (name, "add it to server_metrics.METRICS")
        for unit in UNITS:                      # a unit is the last word (before _total for counters)
            assert f"_{unit}_" not in name + "_" or name.endswith(f"_{unit}"), (name, unit)
        for s in f.samples:
            assert s.labels.get("model_name") == MODEL, (s.name, s.labels)
            if f.type == "counter":
                assert s.name.endswith(("_total", "_created")), s.name
        if f.type == "histogram":
            assert name.endswith("_seconds"), name


def test_metrics_histograms_and_conventions() -> None:
    async def main() -> None:
        async with serving() as (engine, url), aiohttp.ClientSession() as s:
            for i in range(3):
                async with s.post(f"{url}/v1/completions", json={"prompt": f"p{i}", "max_tokens": 6,
                                                                  "ignore_eos": True, "temperature": 0}) as r:
                    assert r.status == 200
            text = await (await s.get(f"{url}/metrics")).text()
        fams = _families(text)
        _check_conventions(fams)
        for h in HISTOGRAMS:
            assert fams[h].type == "histogram", h
            count = [x.value for x in fams[h].samples if x.name == h + "_count"][0]
            assert count == {"kvproof_inter_token_latency_seconds": 3 * 5}.get(h, 3), (h, count)
        val = {s.name: s.value for f in fams.values() for s in f.samples if len(s.labels) == 1}
        assert val["kvproof_generation_tokens_total"] == 18

    asyncio.run(main())


def test_every_engine_stat_has_a_name_and_help() -> None:
    core = EngineCore(EngineConfig(host_cache_pages=64, num_pages=64))
    keys = {k.partition("{")[0] for k in core.stats()}
    for k in keys:
        name, doc = describe(k)
        assert name and len(doc) > 15, k
    with pytest.raises(KeyError, match="no entry"):
        describe("made_up_stat_total")


@pytest.mark.timeout(300)
def test_pd_metrics_are_current_when_scraped() -> None:
    from kvproof.runtime.pd.engine import PDEngine, PDEngineConfig

    async def main() -> None:
        engine = PDEngine(EngineConfig(), PDEngineConfig(slots=4, writers=1))
        runner, url = await start_server(engine, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as s:
                for i in range(1, 4):
                    async with s.post(f"{url}/v1/completions", json={"prompt": f"hello {i}", "max_tokens": 7,
                                                                      "ignore_eos": True, "temperature": 0}) as r:
                        assert r.status == 200
                    text = await (await s.get(f"{url}/metrics")).text()      # at once: no waiting for a report
                    fams = _families(text)
                    val = {s.name: s.value for f in fams.values() for s in f.samples if len(s.labels) == 1}
                    assert val["kvproof_generation_tokens_total"] == 7 * i, val["kvproof_generation_tokens_total"]
                    assert val["kvproof_prefill_requests_total"] == i
                    assert val["kvproof_kv_transfers_total"] == i
                    assert val["kvproof_requests_total"] == i
            _check_conventions(fams)
            assert fams["kvproof_kv_slot_reclaim_latency_seconds"].type == "histogram"
            for h in HISTOGRAMS:
                assert fams[h].type == "histogram"
        finally:
            await runner.cleanup()
            await engine.stop()

    asyncio.run(main())
