"""Paged copy kernel vs its torch reference: layouts, partial pages, layer ranges, round trips."""
from __future__ import annotations

import pytest
import torch

from kvproof.kernels.common import (indexer_fp8_layout, indexer_views, kv_bf16_layout, kv_fp8_layout,
                                     write_indexer_keys)
from kvproof.kernels.paged_copy import gather_pages, gather_pages_ref, scatter_pages, scatter_pages_ref

from kernel_testing import DEVICE, random_page_table

LAYOUTS = {"kv_bf16": kv_bf16_layout, "kv_fp8": kv_fp8_layout, "indexer_fp8": indexer_fp8_layout}
CASES = [
    [5],                       # one partial page
    [0, 1, 4, 9],              # empty, single token, exact page, page + 1
    [13, 0, 7, 3],
]


def _random_pool(layout, num_layers: int, num_pages: int, gen: torch.Generator) -> torch.Tensor:
    raw = torch.randint(0, 256, (num_layers, num_pages, layout.page_bytes), dtype=torch.uint8, generator=gen)
    return raw.to(DEVICE)                                                   # [L, P, page_bytes]


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("lens", CASES)
@pytest.mark.parametrize("layers", [None, 1, range(1, 3)])
def test_gather_scatter_match_reference(name, lens, layers, gen):
    page_size = 4
    layout = LAYOUTS[name](page_size)
    table, seq_lens, num_pages = random_page_table(lens, page_size, gen)
    pool = _random_pool(layout, 3, num_pages, gen)
    rng = range(3) if layers is None else (range(layers, layers + 1) if isinstance(layers, int) else layers)

    want = gather_pages_ref(pool, layout, table, seq_lens, rng)
    out = torch.full_like(want, 0xFF)                                      # poison: unwritten bytes show
    pages = 3 if isinstance(layers, range) else None          # several pages per program, a partial last group
    got = gather_pages(pool, layout, table, seq_lens, layers, out=out, pages_per_prog=pages)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    # Scatter a fresh payload through a different page table (the receiving side).
    table2, _, _ = random_page_table(lens, page_size, gen, spare_pages=3)
    payload = torch.randint(0, 256, want.shape, dtype=torch.uint8, generator=gen).to(DEVICE)
    dst = _random_pool(layout, 3, num_pages, gen)
    dst_ref = dst.clone()
    scatter_pages(payload, dst, layout, table2, seq_lens, layers, pages_per_prog=pages)
    scatter_pages_ref(payload, dst_ref, layout, table2, seq_lens, rng)
    assert torch.equal(dst, dst_ref), "scatter touched bytes outside the valid tokens or missed some"


def test_bf16_kv_pool_roundtrip_keeps_values(gen):
    """A typed [L, P, S, 576] bf16 pool survives gather -> scatter into another page table."""
    page_size, lens = 8, [17, 1, 8]
    layout = kv_bf16_layout(page_size)
    table, seq_lens, num_pages = random_page_table(lens, page_size, gen)
    pool = torch.randn(2, num_pages, page_size, 576, generator=gen).to(torch.bfloat16).to(DEVICE)
    buf = gather_pages(pool, layout, table, seq_lens)
    rows = buf.view(torch.bfloat16)                                         # [2, T, 576]
    first = pool[1, table[0, 2].long(), 0]                                  # token 16 of request 0
    assert torch.equal(rows[1, 16], first)
    table2, _, _ = random_page_table(lens, page_size, gen)
    back = torch.zeros_like(pool)
    scatter_pages(buf, back, layout, table2, seq_lens)
    assert torch.equal(gather_pages(back, layout, table2, seq_lens), buf)


def test_indexer_rows_hold_fp8_keys_and_scales(gen):
    """Packed indexer rows are [128 B fp8 key | 4 B fp32 scale] of each token."""
    page_size, n = 4, 6
    layout = indexer_fp8_layout(page_size)
    table, seq_lens, num_pages = random_page_table([n], page_size, gen)
    pool = torch.zeros(1, num_pages, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    k = torch.randn(n, 128, generator=gen).to(DEVICE)
    write_indexer_keys(pool[0], table, 0, k, page_size)
    buf = gather_pages(pool, layout, table, seq_lens)[0]                   # [n, 132]
    keys = buf[:, :128].contiguous().view(torch.float8_e4m3fn).float()
    scale = buf[:, 128:].contiguous().view(torch.float32)                  # [n, 1]
    torch.testing.assert_close(keys * scale, k, rtol=0.07, atol=1e-3)
    kv, sv = indexer_views(pool[0], page_size)
    assert torch.equal(scale[5, 0], sv[table[0, 1].long(), 1, 0])


def test_bad_arguments_are_named(gen):
    layout = kv_bf16_layout(4)
    table, seq_lens, num_pages = random_page_table([5], 4, gen)
    pool = torch.zeros(1, num_pages, layout.page_bytes, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(AssertionError, match="seq_lens"):
        gather_pages(pool, layout, table, seq_lens.long())
    with pytest.raises(AssertionError, match="layout kv_bf16"):
        gather_pages(pool[..., :-1], layout, table, seq_lens)
    with pytest.raises(AssertionError, match="page_table"):
        gather_pages(pool, layout, table, torch.tensor([9], dtype=torch.int32, device=DEVICE))
    with pytest.raises(AssertionError, match="layers"):
        gather_pages(pool, layout, table, seq_lens, layers=range(0, 2))
    bad = table.clone()
    bad[0, 0] = num_pages
    with pytest.raises(AssertionError, match="page ids"):
        gather_pages(pool, layout, bad, seq_lens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for production shapes")
def test_production_shape_gather_scatter():
    gen = torch.Generator().manual_seed(7)
    lens = [40_000, 1, 4_097, 17_000]
    for layout in (kv_bf16_layout(), indexer_fp8_layout()):
        table, seq_lens, num_pages = random_page_table(lens, layout.page_size, gen)
        pool = torch.randint(0, 256, (4, num_pages, layout.page_bytes), dtype=torch.uint8, device="cuda")
        buf = gather_pages(pool, layout, table, seq_lens)
        assert torch.equal(buf, gather_pages_ref(pool, layout, table, seq_lens, range(4)))
        back = torch.zeros_like(pool)
        scatter_pages(buf, back, layout, table, seq_lens)
        assert torch.equal(gather_pages(back, layout, table, seq_lens), buf)
