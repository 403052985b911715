"""Helpers shared by the kernel tests (imported by name, so no clash with other conftest.py)."""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_page_table(lens: list[int], page_size: int, gen: torch.Generator,
                      spare_pages: int = 3) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Distinct random pages per request; unused columns hold out-of-range ids (must never be read)."""
    need = [(n + page_size - 1) // page_size for n in lens]
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=gen)
    width = max(need + [1])
    table = torch.full((len(lens), width), num_pages + 10_000, dtype=torch.int32)
    at = 0
    for r, k in enumerate(need):
        table[r, :k] = perm[at: at + k].int()
        at += k
    return table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE), num_pages


def build_indexer_cache(lens: list[int], page_size: int, dim: int, gen: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer of fp8 indexer cache holding random keys for each request, poisoned elsewhere."""
    from kvproof.kernels.common import indexer_fp8_layout, write_indexer_keys

    layout = indexer_fp8_layout(page_size, dim)
    table, seq_lens, num_pages = random_page_table(lens, page_size, gen)
    # 0xFF is NaN in e4m3fn and in fp32: any read of an unwritten slot poisons the scores.
    cache = torch.full((num_pages, layout.page_bytes), 0xFF, dtype=torch.uint8, device=DEVICE)
    for r, n in enumerate(lens):
        write_indexer_keys(cache, table, r, torch.randn(n, dim, generator=gen).to(DEVICE), page_size)
    return cache, table, seq_lens


def build_kv_cache(lens: list[int], page_size: int, dl: int, dr: int, gen: torch.Generator,
                   fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer of latent KV, bf16 [P, S, dl + dr] or fp8-layout uint8 rows; NaN where unwritten."""
    from kvproof.kernels.common import kv_fp8_token_bytes, quantize_kv_fp8

    table, seq_lens, num_pages = random_page_table(lens, page_size, gen)
    if fp8:      # 0xFF is NaN as fp8, as fp32 scale and as bf16
        kv = torch.full((num_pages, page_size, kv_fp8_token_bytes(dl, dr)), 0xFF, dtype=torch.uint8)
    else:
        kv = torch.full((num_pages, page_size, dl + dr), float("nan"), dtype=torch.bfloat16)
    for r, n in enumerate(lens):
        pos = torch.arange(n)
        rows = torch.randn(n, dl + dr, generator=gen)
        rows = quantize_kv_fp8(rows[:, :dl], rows[:, dl:]) if fp8 else rows.to(torch.bfloat16)
        kv[table[r, pos // page_size].long().cpu(), pos % page_size] = rows
    return kv.to(DEVICE), table, seq_lens
