"""Every kernel compiles for Hopper (and Blackwell) on the CPU, in the configurations its launchers pick.

No GPU: Triton compiles to a cubin for sm_90 / sm_100 and the wheel's cuobjdump reads it back.
The report is built once per session (a subprocess without TRITON_INTERPRET, since interpreted
kernels cannot be compiled) and every test below reads it.
"""
from __future__ import annotations

import pytest

from kvproof.kernels.compile_report import compile_report


def _have_cuda_tools() -> bool:
    try:
        from kvproof.kernels.compile_target import cuda_tool
        cuda_tool("cuobjdump")
        return True
    except (AssertionError, ImportError):
        return False


pytestmark = pytest.mark.skipif(not _have_cuda_tools(), reason="this Triton wheel ships no cuobjdump/ptxas")


@pytest.fixture(scope="module")
def report() -> dict:
    return compile_report((90, 100), scope="ci")


def _rows(report: dict, **match) -> list[dict]:
    return [r for r in report["rows"] if all(s in r[k] for k, s in match.items())]


def test_every_configuration_compiles(report):
    assert report["rows"] and report["summary"]["failed"] == []
    kernels = {r["kernel"] for r in report["rows"]}
    assert kernels == {"indexer_scores_kernel", "_radix_topk_kernel", "_topk_hist_kernel", "_topk_compact_kernel",
                       "_topk_select_kernel", "mla_attn_kernel", "mla_attn_fp8_staged_kernel", "mla_combine_kernel",
                       "_paged_copy_kernel"}


def test_production_shapes_are_compiled_for_hopper_and_blackwell(report):
    for arch in ("sm_90", "sm_100"):
        assert _rows(report, config="indexer H=64 D=128 q=fp8", arch=arch)
        assert _rows(report, config="topk k=2048", arch=arch)
        for kv in ("bf16", "fp8"):
            assert _rows(report, config=f"mla sparse kv={kv} H=128", arch=arch)
    for H in (16, 32, 64, 128):
        assert _rows(report, config=f"mla sparse kv=fp8 H={H} ", arch="sm_90")


def test_no_spills_in_default_configurations(report):
    assert report["summary"]["spills_in_defaults"] == []
    assert all(r["local_bytes"] == 0 for r in report["rows"] if r["default"])


def test_no_kernel_is_compiled_to_a_trap(report):
    # An over-allocation of tensor memory (sm_100) or another invalid lowering compiles
    # "successfully" to a kernel that only traps; the report counts PTX traps.
    assert report["summary"]["traps"] == []
    assert all(r["ptx_traps"] == 0 for r in report["rows"])


def test_mla_production_defaults_hold_64_heads_on_tensor_cores(report):
    # bf16 KV, 64 heads: one program per query (Hopper wgmma needs M = 64), no spills.
    rows = _rows(report, config="mla sparse kv=bf16 H=64 splits=1", kernel="mla_attn_kernel")
    assert {r["arch"] for r in rows} == {"sm_90", "sm_100"}
    for r in rows:
        assert r["spill_stores"] == 0 and r["local_bytes"] == 0
        assert set(r["tensor_core_ops"]) & {"HGMMA", "UTCHMMA"}, r


def test_fp8_64_heads_are_one_staged_program_on_hopper(report):
    # fp8 KV, 64 and 128 heads on sm_90: 64 heads a program, each row dequantised once per query
    # into the staging slot, wgmma and no spills (dequantising through registers in the 64-head
    # loop spilled 56-70 stores). sm_100 keeps 16-head programs (the staged kernel spills there).
    for H in (64, 128):
        for kind in ("sparse", "dense"):
            rows = _rows(report, config=f"mla {kind} kv=fp8 H={H} splits", arch="sm_90")
            assert rows and {r["kernel"] for r in rows} == {"mla_attn_fp8_staged_kernel", "mla_combine_kernel"}
            for r in rows:
                if r["kernel"] == "mla_attn_fp8_staged_kernel":
                    assert r["spill_stores"] == 0 and r["local_bytes"] == 0, r["config"]
                    assert "HGMMA" in r["tensor_core_ops"], r["config"]
    assert {r["kernel"] for r in _rows(report, config="mla sparse kv=fp8 H=128", arch="sm_100")} == {
        "mla_attn_kernel", "mla_combine_kernel"}


def test_shared_memory_within_the_architecture_limit(report):
    assert report["summary"]["over_shared_limit"] == []
    assert all(0 <= r["shared_bytes"] <= r["shared_limit"] for r in report["rows"])


def test_dots_run_on_tensor_cores(report):
    dots = [r for r in report["rows"] if r["has_dot"]]
    assert {r["kernel"] for r in dots} == {"indexer_scores_kernel", "mla_attn_kernel", "mla_attn_fp8_staged_kernel"}
    assert report["summary"]["dot_without_tensor_cores"] == []
    for r in dots:
        want = {"sm_90": {"HGMMA", "QGMMA", "HMMA"}, "sm_100": {"UTCHMMA", "UTCQMMA", "HMMA", "QMMA"}}[r["arch"]]
        assert set(r["tensor_core_ops"]) & want, r["config"]


def test_fp8_rope_loads_are_vectorised(report):
    # The fp8 row's rope sits at byte 528 of a 656 B row: 16-byte aligned, so no 2-byte loads.
    for r in _rows(report, config="mla sparse kv=fp8", kernel="mla_attn_kernel"):
        assert r["ptx_scalar_b16_loads"] == 0, r["config"]
