"""Top-k of each row of indexer scores in Triton, by radix select over order-preserving keys.

Each fp32 score maps to a uint32 key whose unsigned order is the float order. Three
passes of 11-bit histograms (11 + 11 + 10 bits) over the row's first q_len[t] scores find
the k-th largest key T; a last pass writes every position with key > T, then positions with key == T
in ascending order until k are taken (deterministic ties). Long rows are cooperative: several
CTAs per row add their chunks' top-digit histograms into one per-row histogram (atomics), then
each compacts the positions at or above the k-th key's top digit into its chunk's slots, and
one CTA per row runs the passes above over those candidates only (about k + n/2048 of them
unless the row is heavily tied), so the row itself is read twice, in parallel. Same convention as
indexer.select_topk: indices int32 [T, k] with counts int32 [T] = min(k, q_len);
indices[t, counts[t]:] are 0. Rows with q_len <= k take positions 0 .. q_len-1 in order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_int_vector

# Bits per radix digit: 11 gives 3 histogram passes over the row (11 + 11 + 10) instead of 4
# with 8-bit digits; a 2048-bin histogram is 16 registers per thread at 4 warps.
RADIX_BITS = 11
# Rows longer than this take the cooperative path, COOP_CHUNK scores per CTA: a 32k-token
# decode row is 8 CTAs instead of one, and the single-CTA pass reads ~k + n/2048 candidates.
COOP_MIN_LEN = 8192
COOP_CHUNK = 4096

# ---------------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------------


def topk_ref(scores: torch.Tensor, q_len: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: torch.topk over each row's valid prefix, zero padding, counts = min(k, q_len)."""
    T = scores.shape[0]
    idx = torch.zeros(T, k, dtype=torch.int32, device=scores.device)
    counts = torch.clamp(q_len, max=k).int()
    for t in range(T):
        n, c = int(q_len[t]), int(counts[t])
        idx[t, :c] = torch.arange(n).int() if n <= k else torch.topk(scores[t, :n], c).indices.int()
    return idx, counts


# ---------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------


@triton.jit
def _sortable_key(x):
    """fp32 -> uint32 whose unsigned order is the float order."""
    u = x.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) != 0, ~u, u | 0x80000000)


@triton.jit
def _row_out(q_len_ptr, count_ptr, idx_ptr, stride_it, t, K: tl.constexpr):
    """Row t's valid length n and its output row; records how many positions it selects (min(n, K))."""
    n = tl.load(q_len_ptr + t)
    tl.store(count_ptr + t, tl.minimum(n, K))
    return n, idx_ptr + t * stride_it


@triton.jit
def _fill_all(out, n, K: tl.constexpr, BLOCK: tl.constexpr):
    """A row with at most K valid scores: its top-k is every position (the rest of the K padded with 0)."""
    offs = tl.arange(0, BLOCK)
    for s0 in range(0, K, BLOCK):
        o = s0 + offs
        tl.store(out + o, tl.where(o < n, o, 0), mask=o < K)


@triton.jit
def _digit_hist(key, valid, prefix, P: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of digit P (11-bit digits from the top, the last one shorter) of the valid keys whose
    bits above that digit equal `prefix`'s."""
    HIGH = 32 - BITS * P                    # constexpr arithmetic: digit P covers bits [SHIFT, HIGH)
    SHIFT = (HIGH - BITS) * (HIGH > BITS)   # max(HIGH - BITS, 0)
    match = valid
    if P > 0:
        match = match & ((key >> HIGH) == (prefix >> HIGH))
    digit = tl.where(match, (key >> SHIFT) & ((1 << (HIGH - SHIFT)) - 1), 0).to(tl.int32)
    miss = BLOCK - tl.sum(match.to(tl.int32), axis=0)     # non-matching lanes were counted in bin 0
    bins = tl.arange(0, 1 << BITS)
    return tl.histogram(digit, 1 << BITS) - tl.where(bins == 0, miss, 0)


@triton.jit
def _kth_digit(hist, k_rem, BITS: tl.constexpr):
    """The digit b holding the k_rem-th largest key, and how many keys have a digit above b."""
    bins = tl.arange(0, 1 << BITS)
    suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist          # count in bins >= b
    b = tl.max(tl.where(suffix >= k_rem, bins, 0), axis=0)
    return b, tl.sum(tl.where(bins > b, hist, 0), axis=0)


@triton.jit
def _narrow(hist, k_rem, prefix, P: tl.constexpr, BITS: tl.constexpr):
    """After digit P's histogram: (keys still to place at the new prefix, the prefix with digit P set)."""
    HIGH = 32 - BITS * P
    SHIFT = (HIGH - BITS) * (HIGH > BITS)
    b, above = _kth_digit(hist, k_rem, BITS)
    return k_rem - above, prefix | (b.to(tl.uint32) << SHIFT)


@triton.jit
def _emit(out, key, valid, pos, prefix, n_gt, k_rem, gt_base, eq_base):
    """Store, in position order, the valid keys above the k-th key and the first k_rem equal to it;
    returns the new (greater, equal) counts."""
    gt = valid & (key > prefix)
    eq = valid & (key == prefix)
    g_pos = gt_base + tl.cumsum(gt.to(tl.int32), axis=0) - 1
    e_pos = eq_base + tl.cumsum(eq.to(tl.int32), axis=0) - 1
    tl.store(out + g_pos, pos, mask=gt)
    tl.store(out + n_gt + e_pos, pos, mask=eq & (e_pos < k_rem))
    return gt_base + tl.sum(gt.to(tl.int32), axis=0), eq_base + tl.sum(eq.to(tl.int32), axis=0)


@triton.jit
def _radix_topk_kernel(
    # pointers
    scores_ptr, q_len_ptr, idx_ptr, count_ptr,
    # strides (elements)
    stride_st, stride_it,
    # constexpr
    K: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, PASSES: tl.constexpr,
):
    """One program selects the top K positions of one row."""
    t = tl.program_id(0).to(tl.int64)
    n, out = _row_out(q_len_ptr, count_ptr, idx_ptr, stride_it, t, K)
    row = scores_ptr + t * stride_st
    offs = tl.arange(0, BLOCK)
    if n <= K:
        _fill_all(out, n, K, BLOCK)
    else:
        prefix = (n * 0).to(tl.uint32)          # bits of the k-th key found so far
        k_rem = n * 0 + K                       # how many of the k are still to place at `prefix`
        for p in tl.static_range(PASSES):
            hist = tl.zeros([1 << BITS], tl.int32)
            for s0 in range(0, n, BLOCK):
                o = s0 + offs
                key = _sortable_key(tl.load(row + o, mask=o < n, other=0.0))
                hist += _digit_hist(key, o < n, prefix, p, BITS, BLOCK)
            k_rem, prefix = _narrow(hist, k_rem, prefix, p, BITS)
        n_gt = K - k_rem
        gt_base = n * 0
        eq_base = n * 0
        for s0 in range(0, n, BLOCK):
            o = s0 + offs
            key = _sortable_key(tl.load(row + o, mask=o < n, other=0.0))
            gt_base, eq_base = _emit(out, key, o < n, o, prefix, n_gt, k_rem, gt_base, eq_base)


@triton.jit
def _topk_hist_kernel(
    # pointers
    scores_ptr, q_len_ptr, hist_ptr,
    # strides (elements)
    stride_st, stride_ht,
    # constexpr
    K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
):
    """Cooperative pass 1: one program adds its chunk's histogram of top digits to the row's."""
    t = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * CHUNK
    n = tl.load(q_len_ptr + t)
    if (n > K) & (c0 < n):
        row = scores_ptr + t * stride_st
        offs = tl.arange(0, BLOCK)
        bins = tl.arange(0, 1 << BITS)
        hist = tl.zeros([1 << BITS], tl.int32)
        top = (n * 0).to(tl.uint32)             # digit 0 has no bits above it
        for s0 in tl.range(c0, tl.minimum(c0 + CHUNK, n), BLOCK, num_stages=2):
            o = s0 + offs
            key = _sortable_key(tl.load(row + o, mask=o < n, other=0.0))
            hist += _digit_hist(key, o < n, top, 0, BITS, BLOCK)
        tl.atomic_add(hist_ptr + t * stride_ht + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _topk_compact_kernel(
    # pointers
    scores_ptr, q_len_ptr, hist_ptr, cand_ptr, ccount_ptr,
    # strides (elements)
    stride_st, stride_ht, stride_ct, stride_nt,
    # constexpr
    K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
):
    """Cooperative pass 2: the top digit b of the k-th key, from the row's histogram; one program
    writes the positions of its chunk whose top digit is >= b, ascending, to the chunk's own slots."""
    t = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    c0 = chunk * CHUNK
    n = tl.load(q_len_ptr + t)
    if (n > K) & (c0 < n):
        bins = tl.arange(0, 1 << BITS)
        hist = tl.load(hist_ptr + t * stride_ht + bins)
        b, _ = _kth_digit(hist, K, BITS)
        b = b.to(tl.uint32)
        row = scores_ptr + t * stride_st
        cand = cand_ptr + t * stride_ct + c0
        offs = tl.arange(0, BLOCK)
        base = n * 0
        for s0 in tl.range(c0, tl.minimum(c0 + CHUNK, n), BLOCK, num_stages=2):
            o = s0 + offs
            key = _sortable_key(tl.load(row + o, mask=o < n, other=0.0))
            keep = (o < n) & ((key >> (32 - BITS)) >= b)
            slot = base + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(cand + slot, o, mask=keep)
            base += tl.sum(keep.to(tl.int32), axis=0)
        tl.store(ccount_ptr + t * stride_nt + chunk, base)


@triton.jit
def _topk_select_kernel(
    # pointers
    scores_ptr, q_len_ptr, cand_ptr, ccount_ptr, idx_ptr, count_ptr,
    # sizes
    n_chunks,
    # strides (elements)
    stride_st, stride_ct, stride_nt, stride_it,
    # constexpr
    K: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, PASSES: tl.constexpr,
):
    """Cooperative pass 3: one program per row finishes the radix select over the candidates only
    (chunk by chunk, so in ascending position order: ties are taken lowest position first)."""
    t = tl.program_id(0).to(tl.int64)
    n, out = _row_out(q_len_ptr, count_ptr, idx_ptr, stride_it, t, K)
    row = scores_ptr + t * stride_st
    cand = cand_ptr + t * stride_ct
    offs = tl.arange(0, BLOCK)
    if n <= K:
        _fill_all(out, n, K, BLOCK)
    else:
        used = tl.cdiv(n, CHUNK)
        # pass 0 over the candidates gives the top digit again (every candidate has digit >= b)
        prefix = (n * 0).to(tl.uint32)
        k_rem = n * 0 + K
        for p in tl.static_range(PASSES):
            hist = tl.zeros([1 << BITS], tl.int32)
            for c in range(0, used):
                cnt = tl.load(ccount_ptr + t * stride_nt + c)
                for s0 in range(0, cnt, BLOCK):
                    j = s0 + offs
                    pos = tl.load(cand + c * CHUNK + j, mask=j < cnt, other=0)
                    key = _sortable_key(tl.load(row + pos, mask=j < cnt, other=0.0))
                    hist += _digit_hist(key, j < cnt, prefix, p, BITS, BLOCK)
            k_rem, prefix = _narrow(hist, k_rem, prefix, p, BITS)
        n_gt = K - k_rem
        gt_base = n * 0
        eq_base = n * 0
        for c in range(0, used):
            cnt = tl.load(ccount_ptr + t * stride_nt + c)
            for s0 in range(0, cnt, BLOCK):
                j = s0 + offs
                pos = tl.load(cand + c * CHUNK + j, mask=j < cnt, other=0)
                key = _sortable_key(tl.load(row + pos, mask=j < cnt, other=0.0))
                gt_base, eq_base = _emit(out, key, j < cnt, pos, prefix, n_gt, k_rem, gt_base, eq_base)


# ---------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------


def radix_topk(scores: torch.Tensor, q_len: torch.Tensor, k: int, block: int = 1024,
               out: torch.Tensor | None = None, chunk: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k positions of each row's first q_len scores: (indices int32 [T, k], counts int32 [T]).

    chunk: scores per CTA of the cooperative path (several CTAs per row: a shared histogram of
    the top digit, then a compaction to the candidates at or above the k-th key's top digit, then
    one CTA per row over the candidates only). None: cooperative for rows longer than
    COOP_MIN_LEN, one CTA per row (four reads of the row) otherwise. No host sync either way.
    """
    assert scores.dim() == 2 and scores.dtype == torch.float32 and scores.stride(1) == 1, (
        f"scores must be fp32 [T, N] contiguous per row, got {scores.dtype} {tuple(scores.shape)}")
    T, N = scores.shape
    check_int_vector(q_len, "q_len", T)
    assert k > 0, f"k must be positive, got {k}"
    assert block >= 256 and block & (block - 1) == 0, f"block must be a power of two >= 256, got {block}"
    if chunk is None and N > COOP_MIN_LEN:
        chunk = COOP_CHUNK
    assert chunk is None or (chunk >= block and chunk % block == 0), (
        f"chunk must be a multiple of block={block}, got {chunk}")
    idx = torch.empty(T, k, dtype=torch.int32, device=scores.device) if out is None else out
    assert idx.shape == (T, k) and idx.dtype == torch.int32 and idx.stride(1) == 1, (
        f"out must be int32 [{T}, {k}] contiguous per row, got {idx.dtype} {tuple(idx.shape)}")
    counts = torch.empty(T, dtype=torch.int32, device=scores.device)
    passes = -(-32 // RADIX_BITS)
    if T and chunk is None:
        _radix_topk_kernel[(T,)](scores, q_len, idx, counts, scores.stride(0), idx.stride(0), K=k, BLOCK=block,
                                 BITS=RADIX_BITS, PASSES=passes)
    elif T:
        n_chunks = triton.cdiv(max(N, 1), chunk)
        hist = torch.zeros(T, 1 << RADIX_BITS, dtype=torch.int32, device=scores.device)
        cand = torch.empty(T, n_chunks * chunk, dtype=torch.int32, device=scores.device)
        ccount = torch.empty(T, n_chunks, dtype=torch.int32, device=scores.device)
        _topk_hist_kernel[(T, n_chunks)](scores, q_len, hist, scores.stride(0), hist.stride(0),
                                         K=k, CHUNK=chunk, BLOCK=block, BITS=RADIX_BITS)
        _topk_compact_kernel[(T, n_chunks)](scores, q_len, hist, cand, ccount, scores.stride(0), hist.stride(0),
                                            cand.stride(0), ccount.stride(0), K=k, CHUNK=chunk, BLOCK=block,
                                            BITS=RADIX_BITS)
        _topk_select_kernel[(T,)](scores, q_len, cand, ccount, idx, counts, n_chunks, scores.stride(0),
                                  cand.stride(0), ccount.stride(0), idx.stride(0), K=k, CHUNK=chunk,
                                  BLOCK=block, BITS=RADIX_BITS, PASSES=passes)
    return idx, counts
