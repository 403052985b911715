"""The LayerSplit capacity/throughput model: sane shapes, named assumptions, calibration."""
from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

from kvproof.runtime.tools.layersplit_sim import (LENGTHS, SOURCES, SimParams, bench_layersplit, calibrate_sessions,
                                            capacity_tokens, layer_comm, sensitivity, simulate, token_bytes)

pytestmark = pytest.mark.timeout(60)


def test_every_parameter_has_a_source() -> None:
    assert {f.name for f in fields(SimParams)} == set(SOURCES)


def test_table_covers_40k_to_120k_and_gain_grows_with_length() -> None:
    rows = bench_layersplit()["rows"]
    assert [r["context"] for r in rows] == list(LENGTHS)
    gains = [r["gain"] for r in rows]
    assert gains == sorted(gains) and gains[-1] > gains[0] > 0
    assert all(r["hit_rate_on"] >= r["hit_rate_off"] for r in rows)
    assert all(r["kv_bcast_hidden_fraction"] == 1.0 for r in rows)    # the indexer hides the KV broadcast


def test_default_is_calibrated_to_the_published_40k_point() -> None:
    assert abs(bench_layersplit()["rows"][0]["gain"] - 0.10) < 0.02
    assert abs(calibrate_sessions() - SimParams().sessions) < 0.1


def test_capacity_is_r_times_larger_less_staging() -> None:
    p = SimParams()
    off, on = capacity_tokens(p, False, 120_000), capacity_tokens(p, True, 120_000)
    assert 0.98 * p.ranks * off < on < p.ranks * off
    assert token_bytes(p) == 78 * (656 + 132)


def test_layersplit_costs_only_the_indexer_broadcast_when_everything_fits() -> None:
    p = replace(SimParams(), sessions=1.0)
    off, on = simulate(40_000, False, p), simulate(40_000, True, p)
    assert off["hit_rate_achieved"] == on["hit_rate_achieved"] == 0.9
    c = layer_comm(p, 40_000, on["uncached_tokens"])
    assert on["request_s"] - off["request_s"] == pytest.approx(p.layers * c["idx_bcast_s"])
    assert c["idx_bcast_s"] / c["kv_bcast_s"] == pytest.approx(132 / 656)


def test_errors_and_sensitivity() -> None:
    with pytest.raises(ValueError, match="context must be a positive int"):
        simulate(0, True)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        sensitivity("nope", (1.0,))
    with pytest.raises(ValueError, match="no KV pool left"):
        simulate(40_000, False, replace(SimParams(), weights_bytes=80e9))
    s = sensitivity("sessions", (5.0, 20.0))
    assert s[20.0][-1] > s[5.0][-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_measure_mode_needs_cuda() -> None:
    from kvproof.runtime.tools.layersplit_bench import bench_overlap
    with pytest.raises(RuntimeError, match="needs CUDA"):
        bench_overlap()


def test_docs_table_is_the_simulators_output() -> None:
    from pathlib import Path

    from kvproof.runtime.tools.layersplit_sim import table_markdown
    docs = Path(__file__).resolve().parents[2] / "docs" / "layersplit.md"
    assert table_markdown(bench_layersplit()) in docs.read_text()


def test_session_mix_spans_the_published_120k_point_and_the_docs_show_it() -> None:
    from pathlib import Path

    from kvproof.runtime.tools.layersplit_sim import PUBLISHED_GAIN, mix_sensitivity, mix_table_markdown
    rows = mix_sensitivity()
    assert all(abs(r["gains"][0] - PUBLISHED_GAIN[40_000]) < 0.02 for r in rows)     # each calibrated at 40k
    at_120k = [r["gains"][-1] for r in rows]
    assert min(at_120k) < PUBLISHED_GAIN[120_000] < max(at_120k)
    docs = Path(__file__).resolve().parents[2] / "docs" / "layersplit.md"
    assert mix_table_markdown(rows) in docs.read_text()
