"""The load generator against an in-process server: the report adds up, aborts are seen by the server."""
from __future__ import annotations

import argparse
import asyncio

from serving_testing import serving, wait_for
from kvproof.runtime.tools.loadgen import add_loadgen_args, run_loadgen


def test_loadgen_report() -> None:
    async def main() -> None:
        async with serving() as (engine, url):
            p = argparse.ArgumentParser()
            add_loadgen_args(p)
            args = p.parse_args(["--url", url, "--requests", "30", "--concurrency", "8", "--prefix-chars", "200",
                                 "--max-tokens", "12", "--min-tokens", "4", "--abort-fraction", "0.2"])
            rep = await run_loadgen(args)
            await wait_for(lambda: engine.stats()["kv_pages{state}"]["used"] == 0, what="pages freed")
            st = engine.stats()
        assert rep["errors"] == 0 and rep["completed"] + rep["client_aborts"] == 30
        assert rep["client_aborts"] > 0 and rep["output_tokens"] > 0 and rep["output_tokens_per_s"] > 0
        assert rep["ttft_ms"]["p50"] is not None and rep["itl_ms"]["p99"] >= rep["itl_ms"]["p50"]
        assert st["requests_total"] == 30 and st["cache_hit_rate"] > 0

    asyncio.run(main())
