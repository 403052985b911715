"""Paged KV copy: gather the pages of a set of requests from a paged pool into a packed
buffer, and scatter a packed buffer back into the pool.

Pool: any tensor [L, P, ...] whose trailing dims hold one page of one layer
contiguously in the byte layout of a `PagedLayout` (KV bf16, KV fp8 or the fp8
indexer cache; see `common.py`). Packed buffer: uint8 [n_layers, T, token_bytes]
with T = sum(seq_lens), tokens request-major in position order, each row the
token's bytes of every plane side by side (for the indexer: 128 B keys | 4 B scale).
Only valid tokens move: the tail of a partial last page is neither read nor written.
Used by the transport (pack for one-sided writes), HiCache swap and LayerSplit.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import PagedLayout, check_int_vector, check_page_table, pool_bytes, token_pages

# ---------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------


def _plane_views(u8: torch.Tensor, layout: PagedLayout) -> list[torch.Tensor]:
    S = layout.page_size
    return [u8[..., layout.plane_offset(i): layout.plane_offset(i) + S * w].unflatten(-1, (S, w))
            for i, w in enumerate(layout.plane_bytes)]                       # each [nL, P, S, w]


def gather_pages_ref(pool: torch.Tensor, layout: PagedLayout, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, layers: range) -> torch.Tensor:
    """Torch reference of gather_pages: uint8 [n_layers, T, token_bytes]."""
    planes = _plane_views(pool_bytes(pool, layout)[layers.start: layers.stop], layout)
    rows = []
    for r in range(seq_lens.shape[0]):
        pages, slots = token_pages(page_table, seq_lens, r, layout.page_size)
        rows.append(torch.cat([p[:, pages, slots] for p in planes], dim=-1))  # [nL, n, token_bytes]
    if not rows:
        return torch.empty(len(layers), 0, layout.token_bytes, dtype=torch.uint8, device=pool.device)
    return torch.cat(rows, dim=1)


def scatter_pages_ref(buf: torch.Tensor, pool: torch.Tensor, layout: PagedLayout,
                      page_table: torch.Tensor, seq_lens: torch.Tensor, layers: range) -> None:
    """Torch reference of scatter_pages (writes into pool in place)."""
    planes = _plane_views(pool_bytes(pool, layout)[layers.start: layers.stop], layout)
    t0 = 0
    for r in range(seq_lens.shape[0]):
        pages, slots = token_pages(page_table, seq_lens, r, layout.page_size)
        n = pages.shape[0]
        for i, p in enumerate(planes):
            c = layout.column_offset(i)
            p[:, pages, slots] = buf[:, t0: t0 + n, c: c + layout.plane_bytes[i]]
        t0 += n


# ---------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------


@triton.jit
def _paged_copy_kernel(
    # pointers (pool and buffer in the same word type)
    pool_ptr, buf_ptr, page_ids_ptr, ntok_ptr, dst_tok_ptr,
    # sizes / offsets, in words: each plane's offset in a page and column in a buffer row
    layer0, n_work, off0, off1, off2, col0, col1, col2,
    # strides, in words
    stride_pl, stride_pp, stride_bl, stride_bt,
    # constexpr
    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, NUM_PLANES: tl.constexpr, PAGES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, FLAT: tl.constexpr, SCATTER: tl.constexpr,
):
    """One program copies the valid tokens of PAGES consecutive work pages of one layer, every plane
    (up to 3; plane i has W<i> words per token, constexpr so the row loads vectorise)."""
    layer = tl.program_id(1).to(tl.int64)
    for j in range(PAGES):
        work = tl.program_id(0) * PAGES + j
        if work < n_work:
            page = tl.load(page_ids_ptr + work).to(tl.int64)
            n = tl.load(ntok_ptr + work)
            t0 = tl.load(dst_tok_ptr + work).to(tl.int64)
            for i in tl.static_range(NUM_PLANES):
                if i == 0:
                    W = W0          # a constexpr: plain assignment, re-bound per unrolled plane
                    off, col = off0, col0
                elif i == 1:
                    W = W1          # a constexpr: plain assignment, re-bound per unrolled plane
                    off, col = off1, col1
                else:
                    W = W2          # a constexpr: plain assignment, re-bound per unrolled plane
                    off, col = off2, col2
                pool_base = pool_ptr + (layer0 + layer) * stride_pl + page * stride_pp + off
                buf_base = buf_ptr + layer * stride_bl + t0 * stride_bt + col
                if FLAT:
                    # Buffer rows are exactly the plane's token rows: one contiguous run of n * W words.
                    for start in range(0, n * W, BLOCK_T * BLOCK_W):
                        offs = start + tl.arange(0, BLOCK_T * BLOCK_W)
                        mask = offs < n * W
                        if SCATTER:
                            tl.store(pool_base + offs, tl.load(buf_base + offs, mask=mask), mask=mask)
                        else:
                            tl.store(buf_base + offs, tl.load(pool_base + offs, mask=mask), mask=mask)
                else:
                    offs_w = tl.arange(0, BLOCK_W)
                    for ts in range(0, n, BLOCK_T):
                        offs_t = ts + tl.arange(0, BLOCK_T)
                        mask = (offs_t < n)[:, None] & (offs_w < W)[None, :]
                        p_off = offs_t[:, None] * W + offs_w[None, :]                    # [BLOCK_T, BLOCK_W]
                        b_off = offs_t[:, None] * stride_bt + offs_w[None, :]
                        if SCATTER:
                            tl.store(pool_base + p_off, tl.load(buf_base + b_off, mask=mask), mask=mask)
                        else:
                            tl.store(buf_base + b_off, tl.load(pool_base + p_off, mask=mask), mask=mask)


# ---------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------

_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def page_work_list(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                   num_pages: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per copied page: (page id, valid tokens, first packed row), each int32 [N].

    Reads a few scalars back to the host (two syncs with num_pages, one without): build it
    once per page table and pass it as `work=` to every layer range and direction.
    """
    check_page_table(page_table)
    check_int_vector(seq_lens, "seq_lens", page_table.shape[0])
    dev = page_table.device
    lens = seq_lens.long()
    n_pages = (lens + page_size - 1) // page_size                                   # [R]
    if lens.numel():
        shortest, worst, total = torch.stack([lens.min(), n_pages.max(), n_pages.sum()]).tolist()
        assert shortest >= 0, f"seq_lens must be >= 0, got {seq_lens.tolist()}"
        assert worst <= page_table.shape[1], (
            f"seq_lens needs {worst} pages but page_table has {page_table.shape[1]} columns")
    else:
        total = 0
    req = torch.repeat_interleave(torch.arange(lens.shape[0], device=dev), n_pages,
                                  output_size=total)                                # [N]
    first = torch.cumsum(n_pages, 0) - n_pages
    j = torch.arange(req.shape[0], device=dev) - first[req]
    page_ids = page_table[req, j]
    if num_pages is not None and page_ids.numel():
        lo, hi = torch.stack([page_ids.min(), page_ids.max()]).tolist()
        assert 0 <= lo and hi < num_pages, (
            f"page_table holds page ids in [{lo}, {hi}], pool has pages [0, {num_pages})")
    ntok = torch.clamp(lens[req] - j * page_size, max=page_size)
    dst = (torch.cumsum(lens, 0) - lens)[req] + j * page_size
    return page_ids.int().contiguous(), ntok.int(), dst.int()


def _layer_range(layers: range | int | None, num_layers: int) -> range:
    if layers is None:
        layers = range(num_layers)
    elif isinstance(layers, int):
        layers = range(layers, layers + 1)
    assert isinstance(layers, range) and layers.step == 1, f"layers must be a contiguous range, got {layers}"
    assert 0 <= layers.start <= layers.stop <= num_layers, (
        f"layers {layers} out of the pool's [0, {num_layers})")
    return layers


def _launch(u8: torch.Tensor, buf: torch.Tensor, layout: PagedLayout, work: tuple, layers: range,
            scatter: bool, pages_per_prog: int | None = None) -> None:
    page_ids, ntok, dst = work
    n_work = page_ids.shape[0]
    if n_work == 0 or len(layers) == 0:
        return
    # Widest word dividing every byte offset and stride touched, so GPUs move 8 B lanes where
    # they can; one word size for all planes, so one launch copies every plane.
    offs = [layout.plane_offset(i) for i in range(len(layout.plane_bytes))]
    cols = [layout.column_offset(i) for i in range(len(layout.plane_bytes))]
    g = math.gcd(*layout.plane_bytes, *offs, *cols, layout.page_bytes, layout.token_bytes, u8.stride(0),
                 buf.stride(0), u8.data_ptr(), buf.data_ptr())
    size, dtype = next((s, d) for s, d in _WORDS if g % s == 0)
    pool_w, buf_w = u8.view(dtype), buf.view(dtype)
    P = len(layout.plane_bytes)
    assert P <= 3, f"layout {layout.name} has {P} planes; the copy kernel takes up to 3"
    words = [w // size for w in layout.plane_bytes] + [1] * (3 - P)
    offs_w = [o // size for o in offs] + [0] * (3 - P)
    cols_w = [c // size for c in cols] + [0] * (3 - P)
    flat = len(layout.plane_bytes) == 1
    if flat:                     # one contiguous run per page: 1-D blocks of 1024 words
        BLOCK_T, BLOCK_W = 1, 1024
    else:
        BLOCK_W = triton.next_power_of_2(max(layout.plane_bytes) // size)
        BLOCK_T = max(1, min(triton.next_power_of_2(layout.page_size), 2048 // BLOCK_W))
    assert pages_per_prog is None or pages_per_prog >= 1, f"pages_per_prog must be >= 1, got {pages_per_prog}"
    if pages_per_prog is None:
        # Several pages per program while the grid still gives every SM ~4 programs.
        pages_per_prog = max(1, min(8, n_work * len(layers) // (4 * 132)))
    grid = (triton.cdiv(n_work, pages_per_prog), len(layers))
    _paged_copy_kernel[grid](
        pool_w, buf_w, page_ids, ntok, dst,
        layers.start, n_work, *offs_w, *cols_w,
        pool_w.stride(0), pool_w.stride(1), buf_w.stride(0), buf_w.stride(1),
        W0=words[0], W1=words[1], W2=words[2], NUM_PLANES=P, PAGES=pages_per_prog, BLOCK_T=BLOCK_T, BLOCK_W=BLOCK_W,
        FLAT=flat, SCATTER=scatter,
    )


def _check_buf(buf: torch.Tensor, n_layers: int, n_tokens: int, layout: PagedLayout) -> None:
    want = (n_layers, n_tokens, layout.token_bytes)
    assert buf.dtype == torch.uint8 and tuple(buf.shape) == want, (
        f"buf must be uint8 {want}, got {buf.dtype} {tuple(buf.shape)}")
    assert buf.stride(2) == 1 and buf.stride(1) == layout.token_bytes, (
        f"buf rows must be contiguous, got stride {buf.stride()}")


def gather_pages(pool: torch.Tensor, layout: PagedLayout, page_table: torch.Tensor,
                 seq_lens: torch.Tensor, layers: range | int | None = None,
                 out: torch.Tensor | None = None, work: tuple | None = None,
                 pages_per_prog: int | None = None) -> torch.Tensor:
    """Pack the valid tokens of the given requests and layers into uint8 [n_layers, T, token_bytes]."""
    u8 = pool_bytes(pool, layout)                                                 # [L, P, page_bytes]
    layers = _layer_range(layers, u8.shape[0])
    # Without a prebuilt work list the token count is checked (host syncs happen anyway);
    # with work= and out= the call makes no host sync and out's row count is trusted.
    n_tokens = None if work is not None and out is not None else int(seq_lens.sum())
    work = work or page_work_list(page_table, seq_lens, layout.page_size, u8.shape[1])
    if out is None:
        out = torch.empty(len(layers), n_tokens, layout.token_bytes, dtype=torch.uint8, device=pool.device)
    _check_buf(out, len(layers), out.shape[1] if n_tokens is None and out.dim() == 3 else n_tokens, layout)
    assert out.device == pool.device, f"out is on {out.device}, pool on {pool.device}"
    _launch(u8, out, layout, work, layers, scatter=False, pages_per_prog=pages_per_prog)
    return out


def scatter_pages(buf: torch.Tensor, pool: torch.Tensor, layout: PagedLayout,
                  page_table: torch.Tensor, seq_lens: torch.Tensor,
                  layers: range | int | None = None, work: tuple | None = None,
                  pages_per_prog: int | None = None) -> None:
    """Write a packed buffer uint8 [n_layers, T, token_bytes] back into the pool's pages."""
    u8 = pool_bytes(pool, layout)
    layers = _layer_range(layers, u8.shape[0])
    n_tokens = buf.shape[1] if work is not None and buf.dim() == 3 else int(seq_lens.sum())
    work = work or page_work_list(page_table, seq_lens, layout.page_size, u8.shape[1])
    _check_buf(buf, len(layers), n_tokens, layout)
    assert buf.device == pool.device, f"buf is on {buf.device}, pool on {pool.device}"
    _launch(u8, buf, layout, work, layers, scatter=True, pages_per_prog=pages_per_prog)
