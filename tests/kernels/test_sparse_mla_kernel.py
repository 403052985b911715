"""Sparse and dense MLA attention (Triton) vs the float64 torch reference."""
from __future__ import annotations

import pytest
import torch

from kvproof.kernels.common import decode_queries, prefill_queries
from kvproof.kernels.sparse_mla import (MLA_FP8_BLOCK_H, MlaConfig, dense_mla_attention, mla_attention_ref,
                                        mla_config, sparse_mla_attention)

from kernel_testing import DEVICE, build_kv_cache

BF16_TOL = dict(rtol=2e-2, atol=2e-2)      # bf16 output and bf16 P in P @ V
LSE_TOL = dict(rtol=1e-4, atol=1e-3)       # fp32 statistics
# fp8 KV on a GPU: the dequantised latent is rounded to bf16 before the scores (the
# interpreter keeps fp32, so there the tight tolerance still holds).
LSE_TOL_FP8 = LSE_TOL if DEVICE == "cpu" else dict(rtol=1e-3, atol=2e-2)


def _q(T: int, H: int, dl: int, dr: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qn = torch.randn(T, H, dl, generator=gen).to(torch.bfloat16).to(DEVICE)      # [T, H, DL]
    qp = torch.randn(T, H, dr, generator=gen).to(torch.bfloat16).to(DEVICE)      # [T, H, DR]
    return qn, qp


def _random_indices(q_len: torch.Tensor, topk: int, pad_with: torch.Tensor, gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct random positions per row; the padding points at poisoned (NaN) cache slots."""
    T = q_len.shape[0]
    counts = torch.clamp(q_len, max=topk)
    idx = pad_with[:, None].expand(T, topk).clone().int()
    for t in range(T):
        c = int(counts[t])
        idx[t, :c] = torch.randperm(int(q_len[t]), generator=gen)[:c].int()
    return idx.to(DEVICE), counts


def _check(out, lse, want_out, want_lse, fp8: bool = False) -> None:
    assert not torch.isnan(out).any(), "NaN in out: unwritten output or a poisoned token was read"
    torch.testing.assert_close(out.double(), want_out, **BF16_TOL)
    torch.testing.assert_close(lse.double(), want_lse, **(LSE_TOL_FP8 if fp8 else LSE_TOL))


# acc_split 4: the Hopper path (latent in four accumulator quarters); 1: one accumulator (Blackwell).
@pytest.mark.parametrize("H,dl,dr,splits,fp8,acc_split", [
    (20, 64, 16, 1, False, 4), (20, 64, 16, 3, False, 1), (16, 512, 64, 1, False, 4),
    (20, 128, 16, 2, True, 4), (16, 512, 64, 1, True, 1), (16, 512, 64, 2, True, 4)])
def test_sparse_decode(H, dl, dr, splits, fp8, acc_split, gen):
    page_size, topk = 16, 24
    lens = [37, 1, 0, 20, 45]                       # partial last pages: slot `len` is NaN
    kv, table, seq_lens = build_kv_cache(lens, page_size, dl, dr, gen, fp8=fp8)
    q_req, q_len = decode_queries(seq_lens)
    idx, counts = _random_indices(q_len, topk, pad_with=q_len, gen=gen)
    idx[2] = 0                                      # empty request: nothing valid at all
    qn, qp = _q(len(lens), H, dl, dr, gen)
    scale = (dl + dr) ** -0.5
    out = torch.full((len(lens), H, dl), float("nan"), dtype=torch.bfloat16, device=DEVICE)  # poison
    got, lse = sparse_mla_attention(qn, qp, kv, table, q_req, idx, counts, scale, out=out, block_n=16,
                                    num_splits=splits, acc_split=acc_split)
    assert got.data_ptr() == out.data_ptr()
    want, want_lse = mla_attention_ref(qn, qp, kv, table, q_req, counts, scale, indices=idx)
    _check(got, lse, want, want_lse, fp8)
    assert torch.all(got[2] == 0) and torch.all(torch.isneginf(lse[2])), "empty query: out 0, lse -inf"


@pytest.mark.parametrize("splits,block_h,acc_split", [(1, 16, 1), (2, 32, 4)])
def test_dense_prefill_causal(splits, block_h, acc_split, gen):
    page_size, H, dl, dr = 16, 16, 64, 16
    prefix, extend = [0, 30], [3, 4]
    lens = [p + e for p, e in zip(prefix, extend)]
    kv, table, _ = build_kv_cache(lens, page_size, dl, dr, gen)
    q_req, q_len = prefill_queries(torch.tensor(prefix, dtype=torch.int32, device=DEVICE),
                                   torch.tensor(extend, dtype=torch.int32, device=DEVICE))
    qn, qp = _q(q_req.shape[0], H, dl, dr, gen)
    got, lse = dense_mla_attention(qn, qp, kv, table, q_req, q_len, 0.1, block_n=16, num_splits=splits,
                                   block_h=block_h, acc_split=acc_split)
    want, want_lse = mla_attention_ref(qn, qp, kv, table, q_req, q_len, 0.1)
    _check(got, lse, want, want_lse)


@pytest.mark.parametrize("fp8", [False, True])
def test_all_heads_of_a_query_in_one_program(fp8, gen):
    # 40 heads in one 64-head program (the default block for bf16 from 33 heads), four
    # accumulator quarters; k (24) above the valid tokens of some rows, contexts that end
    # mid-page (page 16), an empty query, and more splits than some rows have token blocks.
    page_size, topk, H, dl, dr = 16, 24, 40, 128, 16
    lens = [21, 0, 50, 5]
    kv, table, seq_lens = build_kv_cache(lens, page_size, dl, dr, gen, fp8=fp8)
    q_req, q_len = decode_queries(seq_lens)
    idx, counts = _random_indices(q_len, topk, pad_with=q_len, gen=gen)
    qn, qp = _q(len(lens), H, dl, dr, gen)
    got, lse = sparse_mla_attention(qn, qp, kv, table, q_req, idx, counts, 0.1, block_h=64, block_n=16,
                                    num_splits=3, acc_split=4)
    want, want_lse = mla_attention_ref(qn, qp, kv, table, q_req, counts, 0.1, indices=idx)
    _check(got, lse, want, want_lse, fp8)
    assert torch.all(got[1] == 0) and torch.all(torch.isneginf(lse[1])), "empty query: out 0, lse -inf"


@pytest.mark.parametrize("sparse,splits,stage_rows", [(True, 1, 16), (True, 2, 32), (False, 3, 16)])
def test_fp8_64_heads_dequantise_each_row_once(sparse, splits, stage_rows, gen):
    # fp8 KV, 48 heads in one 64-head staged program (16 masked heads): each selected row is
    # dequantised once into the program's staging slot, stage_rows at a time (several chunks
    # per split here, the last one partial), then attended by all heads. Contexts end mid-page
    # (slot `len` is poisoned NaN), one query is empty, one has fewer rows than a chunk.
    page_size, topk, H, dl, dr = 16, 72, 48, 128, 16
    lens = [70, 0, 9, 100]
    kv, table, seq_lens = build_kv_cache(lens, page_size, dl, dr, gen, fp8=True)
    q_req, q_len = decode_queries(seq_lens)
    qn, qp = _q(len(lens), H, dl, dr, gen)
    assert mla_config(H, dl, True, 90, stage_rows=stage_rows).stage_rows == stage_rows
    if sparse:
        idx, counts = _random_indices(q_len, topk, pad_with=q_len, gen=gen)
        got, lse = sparse_mla_attention(qn, qp, kv, table, q_req, idx, counts, 0.1, num_splits=splits,
                                        stage_rows=stage_rows)
        want, want_lse = mla_attention_ref(qn, qp, kv, table, q_req, counts, 0.1, indices=idx)
    else:
        got, lse = dense_mla_attention(qn, qp, kv, table, q_req, q_len, 0.1, num_splits=splits,
                                       stage_rows=stage_rows)
        want, want_lse = mla_attention_ref(qn, qp, kv, table, q_req, q_len, 0.1)
    _check(got, lse, want, want_lse, fp8=True)
    assert torch.all(got[1] == 0) and torch.all(torch.isneginf(lse[1])), "empty query: out 0, lse -inf"


def test_fp8_128_heads_run_as_two_64_head_staged_programs(gen, monkeypatch):
    # Default configuration (Hopper off the GPU): 128 fp8 heads are two 64-head staged programs
    # per query (each dequantises the query's rows once), not eight 16-head programs.
    from kvproof.kernels import sparse_mla
    seen = []
    real = sparse_mla.mla_attn_fp8_staged_kernel

    class Spy:
        def __getitem__(self, grid):
            seen.append(grid)
            return real[grid]
    monkeypatch.setattr(sparse_mla, "mla_attn_fp8_staged_kernel", Spy())
    kv, table, seq_lens = build_kv_cache([40, 17], 16, 128, 16, gen, fp8=True)
    q_req, q_len = decode_queries(seq_lens)
    qn, qp = _q(2, 128, 128, 16, gen)
    got, lse = dense_mla_attention(qn, qp, kv, table, q_req, q_len, 0.1, num_splits=1)
    assert seen == [(2 * 2, 1)], "128 fp8 heads: two 64-head staged programs per query"
    want, want_lse = mla_attention_ref(qn, qp, kv, table, q_req, q_len, 0.1)
    _check(got, lse, want, want_lse, fp8=True)
    # a launch whose staging buffer would pass the cap runs 16-head programs instead
    monkeypatch.setattr(sparse_mla, "MLA_FP8_STAGE_MAX_BYTES", 2 * 2 * 64 * 144 * 2 - 1)
    got2, lse2 = dense_mla_attention(qn, qp, kv, table, q_req, q_len, 0.1, num_splits=1)
    assert len(seen) == 1, "over the staging cap: no staged launch"
    _check(got2, lse2, want, want_lse, fp8=True)


def test_default_configurations_hold_all_heads_of_a_query():
    # bf16 KV: every head of a query in one program up to 64 heads, 128 heads in two; Hopper
    # splits the accumulator in four quarters, Blackwell keeps one (tensor memory).
    assert mla_config(64, 512, False, 90) == MlaConfig(block_h=64, block_n=16, num_warps=8, acc_split=4)
    assert mla_config(128, 512, False, 90).block_h == 64
    assert mla_config(64, 512, False, 100) == MlaConfig(block_h=64, block_n=16, num_warps=8, acc_split=1)
    assert mla_config(16, 512, False, 90) == MlaConfig(block_h=16, block_n=32, num_warps=8, acc_split=4)
    assert mla_config(16, 512, False, 100).acc_split == 4            # warp MMA below 64 heads: quarters
    for arch in (90, 100):
        assert mla_config(64, 512, True, arch).block_h == MLA_FP8_BLOCK_H[arch >= 100]
        assert mla_config(32, 512, True, arch).block_h == 16 and mla_config(32, 512, True, arch).stage_rows is None
    # fp8 KV on Hopper: all 64 heads in one staged program, each row dequantised once a query
    assert mla_config(64, 512, True, 90) == MlaConfig(block_h=64, block_n=16, num_warps=8, acc_split=4,
                                                      stage_rows=64)
    assert mla_config(128, 512, True, 90).block_h == 64
    with pytest.raises(AssertionError, match="stage_rows"):
        mla_config(16, 512, True, 90, stage_rows=64)
    with pytest.raises(AssertionError, match="stage_rows"):
        mla_config(64, 512, True, 90, stage_rows=24)
    with pytest.raises(AssertionError, match="acc_split"):
        mla_config(64, 32, False, 90, acc_split=4)


def test_sparse_with_all_tokens_equals_dense(gen):
    page_size, H, dl, dr = 16, 16, 64, 16
    lens = [19, 33]
    kv, table, seq_lens = build_kv_cache(lens, page_size, dl, dr, gen)
    q_req, q_len = decode_queries(seq_lens)
    qn, qp = _q(2, H, dl, dr, gen)
    idx = torch.zeros(2, 40, dtype=torch.int32, device=DEVICE)
    for t, n in enumerate(lens):
        idx[t, :n] = torch.randperm(n, generator=gen).int()   # order must not matter
    dense, dlse = dense_mla_attention(qn, qp, kv, table, q_req, q_len, 0.125)
    sparse, slse = sparse_mla_attention(qn, qp, kv, table, q_req, idx, q_len, 0.125)
    torch.testing.assert_close(sparse, dense, **BF16_TOL)
    torch.testing.assert_close(slse, dlse, **LSE_TOL)


def test_bad_arguments_are_named(gen):
    kv, table, seq_lens = build_kv_cache([5], 16, 64, 16, gen)
    q_req, q_len = decode_queries(seq_lens)
    qn, qp = _q(1, 16, 64, 16, gen)
    with pytest.raises(AssertionError, match="q_pe"):
        dense_mla_attention(qn, qp[:, :8], kv, table, q_req, q_len, 0.1)
    with pytest.raises(AssertionError, match="fp8 KV latent dim"):
        dense_mla_attention(qn, qp, torch.zeros(2, 16, 80, dtype=torch.uint8, device=DEVICE), table,
                            q_req, q_len, 0.1)
    with pytest.raises(AssertionError, match="kv must be one"):
        dense_mla_attention(qn, qp, kv[..., :70], table, q_req, q_len, 0.1)
    with pytest.raises(AssertionError, match="indices"):
        sparse_mla_attention(qn, qp, kv, table, q_req, q_len[:, None].long(), q_len, 0.1)
    with pytest.raises(AssertionError, match="sm_scale"):
        dense_mla_attention(qn, qp, kv, table, q_req, q_len, 0.0)
    with pytest.raises(AssertionError, match="block_h"):
        dense_mla_attention(qn, qp, kv, table, q_req, q_len, 0.1, block_h=8)
    with pytest.raises(AssertionError, match="num_splits"):
        dense_mla_attention(qn, qp, kv, table, q_req, q_len, 0.1, num_splits=0)
    with pytest.raises(AssertionError, match="share a dtype"):
        dense_mla_attention(qn.float(), qp, kv, table, q_req, q_len, 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for production shapes")
@pytest.mark.parametrize("fp8", [False, True])
def test_production_shape_sparse_decode(fp8):
    gen = torch.Generator().manual_seed(5)
    lens = [9000, 2048, 3, 5000]
    kv, table, seq_lens = build_kv_cache(lens, 64, 512, 64, gen, fp8=fp8)
    q_req, q_len = decode_queries(seq_lens)
    idx, counts = _random_indices(q_len, 2048, pad_with=torch.zeros_like(q_len), gen=gen)
    qn, qp = _q(len(lens), 64, 512, 64, gen)
    got, lse = sparse_mla_attention(qn, qp, kv, table, q_req, idx, counts, 192 ** -0.5)
    want, want_lse = mla_attention_ref(qn, qp, kv, table, q_req, counts, 192 ** -0.5, indices=idx)
    _check(got, lse, want, want_lse, fp8)
