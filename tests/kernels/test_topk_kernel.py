"""Radix top-k (Triton) vs a stable torch sort: ties, signs, short and empty rows."""
from __future__ import annotations

import pytest
import torch

from kvproof.kernels.indexer import select_topk
from kvproof.kernels.topk import radix_topk, topk_ref

from kernel_testing import DEVICE


def _expected_sets(scores: torch.Tensor, q_len: torch.Tensor, k: int) -> list[set[int]]:
    """Top k by value, ties broken by the lower position (a stable descending sort)."""
    out = []
    for t in range(scores.shape[0]):
        n = int(q_len[t])
        order = torch.sort(-scores[t, :n].double(), stable=True).indices
        out.append(set(order[: min(k, n)].tolist()))
    return out


# chunk=None: one CTA per row; chunk=256: the cooperative path, two chunks per 300-score row.
@pytest.mark.parametrize("k,chunk", [(1, None), (7, None), (40, None), (7, 256), (40, 256)])
def test_radix_topk_matches_stable_sort(k, chunk, gen):
    T, N = 6, 300
    ties = torch.randint(-3, 4, (T, N), generator=gen).float()             # heavy ties
    fine = torch.randn(T, N, generator=gen) * 1e3
    scores = torch.where(torch.arange(T)[:, None] % 2 == 0, ties, fine)
    scores[1, :5] = torch.tensor([float("inf"), -0.0, 0.0, -float("inf"), 1e-40])
    q_len = torch.tensor([300, 257, 0, 1, 40, 41], dtype=torch.int32)
    scores, q_len = scores.to(DEVICE), q_len.to(DEVICE)
    poison = torch.full((T, k), 0x7FFF_FFFF, dtype=torch.int32, device=DEVICE)
    got, counts = radix_topk(scores, q_len, k, block=256, out=poison, chunk=chunk)
    assert got.data_ptr() == poison.data_ptr()
    assert counts.tolist() == torch.clamp(q_len, max=k).tolist()
    for t, want in enumerate(_expected_sets(scores, q_len, k)):
        c = int(counts[t])
        assert set(got[t, :c].tolist()) == want, f"row {t}"
        assert torch.all(got[t, c:] == 0), f"row {t}: padding must be 0"


def test_radix_topk_agrees_with_torch_topk(gen):
    scores = torch.randn(4, 1000, generator=gen).to(DEVICE)
    q_len = torch.tensor([1000, 999, 600, 3], dtype=torch.int32, device=DEVICE)
    got, counts = radix_topk(scores, q_len, 64)
    want, want_counts = topk_ref(scores, q_len, 64)
    assert torch.equal(counts, want_counts)
    for t in range(4):
        assert set(got[t].tolist()) == set(want[t].tolist())
    beyond = torch.arange(1000, device=DEVICE)[None, :] >= q_len[:, None]
    sel, _ = select_topk(scores.masked_fill(beyond, float("-inf")), q_len, 64)   # its precondition
    for t in range(4):
        assert set(sel[t].tolist()) == set(want[t].tolist())


def test_bad_arguments_are_named():
    s = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(AssertionError, match="scores"):
        radix_topk(s.double(), torch.zeros(2, dtype=torch.int32, device=DEVICE), 4)
    with pytest.raises(AssertionError, match="q_len"):
        radix_topk(s, torch.zeros(3, dtype=torch.int32, device=DEVICE), 4)
    with pytest.raises(AssertionError, match="block"):
        radix_topk(s, torch.zeros(2, dtype=torch.int32, device=DEVICE), 4, block=100)
    with pytest.raises(AssertionError, match="chunk"):
        radix_topk(s, torch.zeros(2, dtype=torch.int32, device=DEVICE), 4, block=256, chunk=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for production shapes")
def test_production_shape_topk():
    gen = torch.Generator(device="cuda").manual_seed(3)
    scores = torch.randn(64, 131_072, device="cuda", generator=gen)
    q_len = torch.randint(1, 131_072, (64,), device="cuda", generator=gen).int()
    got, counts = radix_topk(scores, q_len, 2048)
    want, want_counts = topk_ref(scores, q_len, 2048)
    assert torch.equal(counts, want_counts)
    assert torch.equal(got.sort(1).values, want.sort(1).values)


def test_cooperative_rows_over_many_chunks_with_ties_across_chunks(gen):
    # 5 chunks of 256 per row; the k-th value is tied across chunk boundaries, so the chunks'
    # candidate lists must be merged in position order (lowest tied positions win).
    k, N = 24, 1200
    scores = torch.randint(0, 6, (3, N), generator=gen).float()
    scores[1] = torch.randn(N, generator=gen)
    q_len = torch.tensor([1200, 1100, 513], dtype=torch.int32)
    scores, q_len = scores.to(DEVICE), q_len.to(DEVICE)
    got, counts = radix_topk(scores, q_len, k, block=256, chunk=256)
    one, _ = radix_topk(scores, q_len, k, block=256)                         # one CTA per row
    for t, want in enumerate(_expected_sets(scores, q_len, k)):
        assert set(got[t].tolist()) == want == set(one[t].tolist()), f"row {t}"


@pytest.mark.parametrize("fill,chunk", [(float("-inf"), None), (0.25, None), (float("-inf"), 256), (0.25, 256)])
def test_all_minus_inf_and_fully_tied_rows_take_the_first_k(fill, chunk):
    # Every score equal (all -inf: a query whose keys all scored -inf; or one finite value):
    # the k-th key is the common one and ties go to the lowest positions.
    k, N = 16, 300
    scores = torch.full((3, N), fill, device=DEVICE)
    q_len = torch.tensor([300, 17, 100], dtype=torch.int32, device=DEVICE)
    got, counts = radix_topk(scores, q_len, k, block=256, chunk=chunk)
    assert counts.tolist() == [16, 16, 16]
    for t in range(3):
        assert got[t].tolist() == list(range(k)), f"row {t}"


@pytest.mark.parametrize("chunk", [None, 256])
def test_k_larger_than_the_valid_tokens(chunk):
    scores = torch.randn(3, 50, device=DEVICE)
    q_len = torch.tensor([50, 7, 0], dtype=torch.int32, device=DEVICE)
    got, counts = radix_topk(scores, q_len, 64, block=256, chunk=chunk)
    assert counts.tolist() == [50, 7, 0]
    assert got[0, :50].sort().values.tolist() == list(range(50)) and torch.all(got[0, 50:] == 0)
    assert got[1, :7].tolist() == list(range(7)) and torch.all(got[1, 7:] == 0)
    assert torch.all(got[2] == 0)
