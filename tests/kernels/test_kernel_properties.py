"""Property tests (Hypothesis): paged copy round trips and radix top-k over random shapes."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvproof.kernels.common import PagedLayout
from kvproof.kernels.paged_copy import gather_pages, gather_pages_ref, scatter_pages
from kvproof.kernels.topk import radix_topk

from kernel_testing import DEVICE, random_page_table

SETTINGS = settings(max_examples=20, deadline=None, database=None, derandomize=True)


@SETTINGS
@given(lens=st.lists(st.integers(0, 20), min_size=1, max_size=4),
       page_size=st.sampled_from([1, 2, 4, 8]),
       planes=st.lists(st.integers(1, 24), min_size=1, max_size=3),
       layers=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       seed=st.integers(0, 2**31 - 1))
def test_paged_copy_round_trip(lens, page_size, planes, layers, seed):
    gen = torch.Generator().manual_seed(seed)
    layout = PagedLayout("random", page_size, tuple(planes))
    table, seq_lens, num_pages = random_page_table(lens, page_size, gen)
    pool = torch.randint(0, 256, (3, num_pages, layout.page_bytes), dtype=torch.uint8, generator=gen).to(DEVICE)
    rng = range(min(layers), max(layers) + 1)
    buf = gather_pages(pool, layout, table, seq_lens, rng)
    assert torch.equal(buf, gather_pages_ref(pool, layout, table, seq_lens, rng))
    table2, _, _ = random_page_table(lens, page_size, gen)
    dst = torch.zeros_like(pool)
    scatter_pages(buf, dst, layout, table2, seq_lens, rng)
    assert torch.equal(gather_pages(dst, layout, table2, seq_lens, rng), buf)
    untouched = torch.ones(3, dtype=torch.bool)
    untouched[rng.start: rng.stop] = False
    assert not dst[untouched.to(DEVICE)].any(), "scatter wrote outside its layer range"


@SETTINGS
@given(rows=st.lists(st.lists(st.integers(-4, 4), min_size=1, max_size=300), min_size=1, max_size=3),
       k=st.integers(1, 40), data=st.data())
def test_radix_topk_takes_the_k_largest(rows, k, data):
    width = max(map(len, rows))
    scores = torch.full((len(rows), width), float("nan"))           # NaN past q_len: never read
    q_len = []
    for t, row in enumerate(rows):
        scores[t, : len(row)] = torch.tensor(row, dtype=torch.float32) * 0.5
        q_len.append(data.draw(st.integers(0, len(row))))
    q_len = torch.tensor(q_len, dtype=torch.int32)
    idx, counts = radix_topk(scores.to(DEVICE), q_len.to(DEVICE), k, block=256)
    for t in range(len(rows)):
        n, c = int(q_len[t]), int(counts[t])
        assert c == min(k, n)
        sel = idx[t, :c].long().cpu()
        assert sel.unique().numel() == c and bool(torch.all(idx[t, c:] == 0))
        if c:
            kth = torch.topk(scores[t, :n], c).values[-1]
            assert bool(torch.all(scores[t, sel] >= kth))
            assert int((scores[t, :n] > kth).sum()) <= c


def test_empty_batches_launch_nothing_and_return_empty(gen):
    from kvproof.kernels.common import kv_bf16_layout
    from kvproof.kernels.indexer import indexer_topk
    from kvproof.kernels.sparse_mla import sparse_mla_attention

    from kernel_testing import build_indexer_cache, build_kv_cache

    layout = kv_bf16_layout(4)
    table, seq_lens, num_pages = random_page_table([0, 0], 4, gen)
    pool = torch.zeros(2, num_pages, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    assert gather_pages(pool, layout, table, seq_lens).shape == (2, 0, layout.token_bytes)
    none = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    cache, table, _ = build_indexer_cache([3], 16, 32, gen)
    q = torch.zeros(0, 16, 32, dtype=torch.bfloat16, device=DEVICE)
    idx, counts = indexer_topk(q, torch.zeros(0, 16, device=DEVICE), cache, table, none, none, 16, topk=4)
    assert idx.shape == (0, 4) and counts.shape == (0,)
    kv, table, _ = build_kv_cache([3], 16, 64, 16, gen)
    out, lse = sparse_mla_attention(torch.zeros(0, 16, 64, dtype=torch.bfloat16, device=DEVICE),
                                    torch.zeros(0, 16, 16, dtype=torch.bfloat16, device=DEVICE), kv, table,
                                    none, torch.zeros(0, 4, dtype=torch.int32, device=DEVICE), none, 0.1)
    assert out.shape == (0, 16, 64) and lse.shape == (0, 16)
    idx, counts = radix_topk(torch.zeros(0, 8, device=DEVICE), none, 3)
    assert idx.shape == (0, 3)
