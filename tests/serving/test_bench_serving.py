"""`kvproof bench serving`: the kvproof-only path on a tiny load, vLLM's skip reason, bad engine names."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvproof.runtime.tools.bench_serving import add_bench_serving_args, load_args, ratios, run_bench
from kvproof.runtime.tools.loadgen import _mix


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_serving_args(p)
    return p.parse_args(list(argv))


def test_local_engine_runs_the_load_and_vllm_is_skipped_with_a_reason(tmp_path: Path) -> None:
    # a --vllm-python that cannot import vllm: the row is skipped with the reason
    args = _args("--requests", "3", "--concurrency", "2", "--max-tokens", "6", "--engines", "local,vllm",
                 "--vllm-python", str(tmp_path / "no-python"), "--start-timeout", "120")
    res = run_bench(args)
    rep = res["servers"]["local"]
    assert "error" not in rep, rep
    assert rep["completed"] == 3 and rep["errors"] == 0
    # ignore_eos: every request produced exactly its max_tokens, counted from the usage chunk
    expected = sum(r["max_tokens"] for r in _mix(load_args("http://x", args)))
    assert rep["output_tokens"] == expected
    assert rep["usage_missing"] == 0 and rep["ttft_ms"]["p50"] > 0
    assert "cannot run --vllm-python" in res["skipped"]["vllm"]
    assert res["ratios_vs_vllm"] == {}


def test_ratios_divide_kvproof_by_vllm() -> None:
    kv = {"output_tokens_per_s": 300.0, "ttft_ms": {"p50": 10.0, "p90": 40.0}, "itl_ms": {"p50": 4.0}}
    ref = {"output_tokens_per_s": 200.0, "ttft_ms": {"p50": 20.0, "p90": 20.0}, "itl_ms": {"p50": 8.0}}
    assert ratios(kv, ref) == {"output_tok_s": 1.5, "ttft_p50": 0.5, "ttft_p90": 2.0, "itl_p50": 0.5}


def test_unknown_engine_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="sglang"):
        run_bench(_args("--engines", "local,sglang"))
