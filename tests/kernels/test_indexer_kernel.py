"""Lightning indexer scores (Triton) and top-k vs the float64 torch reference."""
from __future__ import annotations

import pytest
import torch

from kvproof.kernels.common import decode_queries, prefill_queries
from kvproof.kernels.indexer import (indexer_scores, indexer_scores_ref, indexer_topk, query_tiles,
                                     select_topk)

from kernel_testing import DEVICE, build_indexer_cache


def _queries(T: int, H: int, D: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randn(T, H, D, generator=gen).to(torch.bfloat16).to(DEVICE)          # [T, H, D]
    w = (torch.rand(T, H, generator=gen) / H ** 0.5).to(DEVICE)                   # [T, H]
    return q, w


def _assert_scores_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert not torch.isnan(got).any(), "NaN in scores: an unwritten element or a poisoned key was read"
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "-inf mask differs from the reference"
    tol = 1e-4 * float(want[fin].abs().max()) if fin.any() else 0.0
    torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-4, atol=tol)


def _assert_topk_valid(idx, counts, q_len, ref_scores, topk) -> None:
    assert idx.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(counts, torch.clamp(q_len, max=topk))
    for t in range(idx.shape[0]):
        c, n = int(counts[t]), int(q_len[t])
        sel = idx[t, :c].long()
        assert torch.all(idx[t, c:] == 0), "padding beyond counts must be 0"
        assert sel.unique().numel() == c and (c == 0 or int(sel.max()) < n), f"row {t}: bad indices"
        if c:
            kth = torch.topk(ref_scores[t, :n], c).values[-1]
            slack = 1e-4 * float(ref_scores[t, :n].abs().max())
            assert float(ref_scores[t, sel].min()) >= float(kth) - slack, f"row {t}: not the top {c}"


@pytest.mark.parametrize("H,D", [(16, 32), (32, 128)])
@pytest.mark.parametrize("lens", [[1, 37, 0, 16], [70]])
def test_decode_scores_and_topk(H, D, lens, gen):
    page_size, topk = 16, 20
    cache, table, seq_lens = build_indexer_cache(lens, page_size, D, gen)
    q_req, q_len = decode_queries(seq_lens)
    q, w = _queries(len(lens), H, D, gen)
    max_len = max(lens)
    out = torch.full((len(lens), max_len), float("nan"), device=DEVICE)     # poison
    got = indexer_scores(q, w, cache, table, q_req, q_len, page_size, out=out, n_per_prog=32)
    want = indexer_scores_ref(q, w, cache, table, q_req, q_len, page_size, max_len)
    _assert_scores_close(got, want)
    idx, counts = select_topk(got, q_len, topk)
    _assert_topk_valid(idx, counts, q_len, want, topk)


@pytest.mark.parametrize("block_m,method", [(None, "torch"), (1, "triton"), (2, "torch"), (4, "triton")])
def test_prefill_causal(block_m, method, gen):
    page_size, H, D, topk = 16, 16, 32, 8
    prefix, extend = [0, 21, 5], [3, 6, 1]
    lens = [p + e for p, e in zip(prefix, extend)]
    cache, table, _ = build_indexer_cache(lens, page_size, D, gen)
    q_req, q_len = prefill_queries(torch.tensor(prefix, dtype=torch.int32, device=DEVICE),
                                   torch.tensor(extend, dtype=torch.int32, device=DEVICE))
    assert q_len.tolist() == [1, 2, 3, 22, 23, 24, 25, 26, 27, 6]
    q, w = _queries(q_req.shape[0], H, D, gen)
    idx, counts = indexer_topk(q, w, cache, table, q_req, q_len, page_size, topk=topk, method=method)
    want = indexer_scores_ref(q, w, cache, table, q_req, q_len, page_size, max(lens))
    _assert_topk_valid(idx, counts, q_len, want, topk)
    out = torch.full((q_req.shape[0], max(lens)), float("nan"), device=DEVICE)     # poison
    got = indexer_scores(q, w, cache, table, q_req, q_len, page_size, out=out, block_m=block_m, n_per_prog=16)
    _assert_scores_close(got, want)


def test_query_tiles_split_runs_of_one_request():
    q_req = torch.tensor([0, 0, 0, 0, 0, 2, 2, 1, 0], dtype=torch.int32, device=DEVICE)
    start, rows = query_tiles(q_req, 4)
    assert start.tolist() == [0, 4, 5, 7, 8] and rows.tolist() == [4, 1, 2, 1, 1]
    start, rows = query_tiles(q_req, 1)
    assert start.tolist() == list(range(9)) and rows.tolist() == [1] * 9


def test_topk_larger_than_context_and_empty_rows():
    scores = torch.tensor([[3.0, 1.0, 2.0, float("-inf")], [float("-inf")] * 4, [0.5, 4.0, 1.0, 2.0]])
    q_len = torch.tensor([3, 0, 4], dtype=torch.int32)
    idx, counts = select_topk(scores, q_len, topk=6)
    assert counts.tolist() == [3, 0, 4]
    assert idx.tolist() == [[0, 1, 2, 0, 0, 0], [0] * 6, [0, 1, 2, 3, 0, 0]]
    idx, counts = select_topk(scores, q_len, topk=2)
    assert counts.tolist() == [2, 0, 2]
    assert sorted(idx[0].tolist()) == [0, 2] and sorted(idx[2].tolist()) == [1, 3]


def test_bad_arguments_are_named(gen):
    cache, table, seq_lens = build_indexer_cache([5], 16, 32, gen)
    q_req, q_len = decode_queries(seq_lens)
    q, w = _queries(1, 16, 32, gen)
    with pytest.raises(AssertionError, match="weights"):
        indexer_scores(q, w[:, :8], cache, table, q_req, q_len, 16)
    with pytest.raises(AssertionError, match="q_len"):
        indexer_scores(q, w, cache, table, q_req, q_len.long(), 16)
    with pytest.raises(AssertionError, match="indexer cache"):
        indexer_scores(q, w, cache[:, :-4], table, q_req, q_len, 16)
    with pytest.raises(AssertionError, match="heads"):
        indexer_scores(q[:, :12], w[:, :12], cache, table, q_req, q_len, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for production shapes")
@pytest.mark.parametrize("H", [32, 64])
def test_production_shape_decode(H):
    # 64 heads run fp8 x fp8 dots on CUDA: compared with the reference on the quantised q.
    from kvproof.kernels.indexer import quantize_indexer_q
    gen = torch.Generator().manual_seed(11)
    lens = [8192, 3000, 1, 20_000]
    cache, table, seq_lens = build_indexer_cache(lens, 64, 128, gen)
    q_req, q_len = decode_queries(seq_lens)
    q, w = _queries(len(lens), H, 128, gen)
    got = indexer_scores(q, w, cache, table, q_req, q_len, 64)
    qr, wr = (q, w) if H < 64 else quantize_indexer_q(q, w)
    want = indexer_scores_ref(qr.float() if H >= 64 else qr, wr, cache, table, q_req, q_len, 64, max(lens))
    _assert_scores_close(got, want)
    idx, counts = select_topk(got, q_len, 2048)
    _assert_topk_valid(idx, counts, q_len, want, 2048)


@pytest.mark.parametrize("n_per_prog", [None, 64])
def test_context_not_a_multiple_of_the_page_size(n_per_prog, gen):
    # 150 and 33 keys on pages of 16: partial last pages, programs whose keys end mid-block,
    # and (n_per_prog=64) programs past a short row that only write -inf.
    page_size, H, D = 16, 16, 32
    lens = [150, 33, 1]
    cache, table, seq_lens = build_indexer_cache(lens, page_size, D, gen)
    q_req, q_len = decode_queries(seq_lens)
    q, w = _queries(len(lens), H, D, gen)
    out = torch.full((len(lens), 160), float("nan"), device=DEVICE)
    got = indexer_scores(q, w, cache, table, q_req, q_len, page_size, max_len=160, out=out,
                         n_per_prog=n_per_prog, block_m=1)
    _assert_scores_close(got, indexer_scores_ref(q, w, cache, table, q_req, q_len, page_size, 160))


def test_fp8_queries_fold_their_scale_into_the_weights(gen):
    # q_fp8: q quantised per (query, head), scale folded into w; the kernel must equal the
    # reference on the dequantised q, and stay near the bf16 scores (fp8 rounding of q only).
    from kvproof.kernels.indexer import quantize_indexer_q
    page_size, H, D = 16, 64, 128
    lens = [70, 5]
    cache, table, seq_lens = build_indexer_cache(lens, page_size, D, gen)
    q_req, q_len = decode_queries(seq_lens)
    q, w = _queries(len(lens), H, D, gen)
    got = indexer_scores(q, w, cache, table, q_req, q_len, page_size, max_len=70, block_m=1, q_fp8=True)
    q8, w8 = quantize_indexer_q(q, w)
    assert q8.dtype == torch.float8_e4m3fn and torch.all(w8 >= 0)
    _assert_scores_close(got, indexer_scores_ref(q8.float(), w8, cache, table, q_req, q_len, page_size, 70))
    exact = indexer_scores_ref(q, w, cache, table, q_req, q_len, page_size, 70)
    fin = torch.isfinite(exact)
    assert float((got[fin].double() - exact[fin]).abs().max()) < 0.1 * float(exact[fin].abs().max())
