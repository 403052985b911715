"""DSA lightning indexer: per-query token scores over a paged fp8 key cache, then top-k.

score[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h] . k_fp8[s])   for s < q_len[t]
(equal to sum_h w * relu(q . dequant(k)) because scales are positive), -inf beyond.

One query row t belongs to request q_req[t] (a page-table row) and sees its first
q_len[t] cached keys: decode is one query per request with q_len = seq_len; causal
prefill is many queries with q_len = position + 1 (see `common.prefill_queries`).
The scores are computed by a Triton kernel; the top-k selection uses torch.topk by
default, or the Triton radix-select kernel of topk.py with method="triton".

Top-k convention, no sentinels: `indices` int32 [T, k] and `counts` int32 [T];
indices[t, :counts[t]] are distinct valid key positions (order unspecified),
indices[t, counts[t]:] are 0 and must be ignored; counts[t] = min(k, q_len[t]).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (DEFAULT_TOPK, FP8_DTYPE, FP8_MAX, check_int_vector, check_page_table, dequantize_fp8,
                      dot_in_fp32, indexer_views)
from .topk import radix_topk

# ---------------------------------------------------------------------------------
# torch reference (float64)
# ---------------------------------------------------------------------------------


def indexer_scores_ref(q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor,
                       page_table: torch.Tensor, q_req: torch.Tensor, q_len: torch.Tensor,
                       page_size: int, max_len: int) -> torch.Tensor:
    """Reference scores in float64: [T, max_len], -inf at positions >= q_len."""
    T, H, D = q.shape
    keys, scales = indexer_views(cache, page_size, D)                     # [P, S, D], [P, S, 1]
    out = torch.full((T, max_len), float("-inf"), dtype=torch.float64, device=q.device)
    for t in range(T):
        n = int(q_len[t])
        pos = torch.arange(n, device=q.device)
        pages = page_table[int(q_req[t]), pos // page_size].long()
        k = dequantize_fp8(keys[pages, pos % page_size], scales[pages, pos % page_size]).double()  # [n, D]
        s = torch.relu(q[t].double() @ k.T)                               # [H, n]
        out[t, :n] = (weights[t].double()[:, None] * s).sum(0)
    return out


def indexer_topk_ref(scores: torch.Tensor, q_len: torch.Tensor, topk: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference top-k over reference scores, same (indices, counts) convention."""
    T = scores.shape[0]
    idx = torch.zeros(T, topk, dtype=torch.int32, device=scores.device)
    counts = torch.clamp(q_len, max=topk).int()
    for t in range(T):
        c = int(counts[t])
        idx[t, :c] = torch.topk(scores[t, : int(q_len[t])], c).indices.int()
    return idx, counts


# ---------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------


@triton.jit
def indexer_scores_kernel(
    # pointers
    q_ptr, w_ptr, k_ptr, ks_ptr, table_ptr, q_req_ptr, q_len_ptr, tile_start_ptr, tile_rows_ptr, out_ptr,
    # sizes
    max_len,
    # strides (elements)
    stride_qt, stride_qh, stride_wt, stride_kp, stride_kt, stride_sp, stride_st,
    stride_tr, stride_ot,
    # constexpr
    H: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, N_PER_PROG: tl.constexpr, DOT_F32: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program scores N_PER_PROG keys for a tile of up to BLOCK_M queries of one request.

    The tile's BLOCK_M * H (query, head) rows share every key block, so one key load
    feeds an [BLOCK_M * H, BLOCK_N] tensor-core product (decode uses BLOCK_M = 1).
    """
    start = tl.program_id(1) * N_PER_PROG
    t0 = tl.load(tile_start_ptr + tl.program_id(0)).to(tl.int64)
    rows = tl.load(tile_rows_ptr + tl.program_id(0))
    req = tl.load(q_req_ptr + t0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    qlen = tl.load(q_len_ptr + t0 + offs_m, mask=row_ok, other=0)                 # [BM]
    qlen_max = tl.max(qlen, axis=0)
    offs_r = tl.arange(0, BLOCK_M * H)                                             # row = m * H + h
    t_r = t0 + offs_r // H
    ok_r = (offs_r // H) < rows
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + t_r[:, None] * stride_qt + (offs_r % H)[:, None] * stride_qh + offs_d[None, :],
                mask=ok_r[:, None], other=0.0)                                     # [BM*H, D]
    w = tl.load(w_ptr + t_r * stride_wt + offs_r % H, mask=ok_r, other=0.0).to(tl.float32)  # [BM*H]
    if DOT_F32:
        q = q.to(tl.float32)
    # Keys this tile can see: [start, hi). The loop bound, not an `if` around the loads, skips
    # the rest, so the software pipeline (NUM_STAGES key blocks in flight) covers every load.
    hi = tl.minimum(start + N_PER_PROG, qlen_max)
    for n0 in tl.range(start, hi, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        # BLOCK_N divides PAGE_SIZE, so the whole block sits in one page.
        page = tl.load(table_ptr + req * stride_tr + n0 // PAGE_SIZE).to(tl.int64)
        slot = n0 % PAGE_SIZE + tl.arange(0, BLOCK_N)
        key_ok = offs_n < qlen_max
        k = tl.load(k_ptr + page * stride_kp + slot[:, None] * stride_kt + offs_d[None, :],
                    mask=key_ok[:, None], other=0.0)                              # [BN, D] fp8
        ks = tl.load(ks_ptr + page * stride_sp + slot * stride_st, mask=key_ok, other=0.0)  # [BN]
        s = tl.dot(q, tl.trans(k.to(q.dtype)))                                    # [BM*H, BN] fp32
        s = tl.maximum(s, 0.0) * w[:, None]
        s = tl.sum(tl.reshape(s, [BLOCK_M, H, BLOCK_N]), axis=1) * ks[None, :]      # [BM, BN]
        scores = tl.where(offs_n[None, :] < qlen[:, None], s, float("-inf"))
        tl.store(out_ptr + (t0 + offs_m)[:, None] * stride_ot + offs_n[None, :], scores,
                 mask=row_ok[:, None] & (offs_n < max_len)[None, :])
    # Positions no query of the tile sees: -inf, without touching the cache.
    neg = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    first_dead = start + tl.cdiv(tl.maximum(hi - start, 0), BLOCK_N) * BLOCK_N
    for n0 in range(first_dead, start + N_PER_PROG, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tl.store(out_ptr + (t0 + offs_m)[:, None] * stride_ot + offs_n[None, :], neg,
                 mask=row_ok[:, None] & (offs_n < max_len)[None, :])


# ---------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor,
                   page_table: torch.Tensor, q_req: torch.Tensor, q_len: torch.Tensor,
                   page_size: int, max_len: int | None = None, out: torch.Tensor | None = None,
                   block_n: int | None = None, n_per_prog: int | None = None,
                   block_m: int | None = None, tiles: tuple[torch.Tensor, torch.Tensor] | None = None,
                   q_fp8: bool | None = None) -> torch.Tensor:
    """Indexer scores fp32 [T, max_len] of each query over its request's cached keys.

    q_fp8: quantise q per (query, head) to fp8 and fold its scale into the weights
    (quantize_indexer_q), so the dots are fp8 x fp8 at twice the bf16 tensor-core rate, as
    DeepGEMM's fp8_mqa_logits; None turns it on for 64+ heads on CUDA.

    tiles: query_tiles(q_req, block_m) built once by the caller (no host sync per call).

    block_m queries of one request share each key load (prefill); None picks 4 when most
    neighbouring queries share a request, else 1. Host syncs: max_len=None, block_m=None,
    block_m > 1 (tile list); decode callers pass max_len and block_m=1 to avoid them.
    """
    assert q.dim() == 3 and q.dtype in (torch.bfloat16, torch.float16, torch.float32), (
        f"q must be [T, H, D] bf16/fp16/fp32, got {q.dtype} {tuple(q.shape)}")
    T, H, D = q.shape
    assert q.stride(2) == 1, "q must be contiguous in its last dim"
    assert H & (H - 1) == 0 and D & (D - 1) == 0 and H >= 16 and 16 <= D <= 128, (
        f"q heads {H} and dim {D} must be powers of two, heads >= 16 and 16 <= dim <= 128 "
        "(one fp32 scale per key)")
    assert weights.shape == (T, H) and weights.stride(1) == 1, (
        f"weights must be [T={T}, H={H}] contiguous per row, got {tuple(weights.shape)}")
    check_page_table(page_table)
    check_int_vector(q_req, "q_req", T)
    check_int_vector(q_len, "q_len", T)
    keys, scales = indexer_views(cache, page_size, D)                     # [P, S, D], [P, S, 1]
    if q_fp8 is None:
        q_fp8 = H >= 64 and q.device.type == "cuda"
    if q_fp8:
        q, weights = quantize_indexer_q(q, weights)
    if max_len is None:
        max_len = int(q_len.max()) if T else 0                            # one host sync
    block_n = block_n or min(64, page_size)
    assert block_n >= 16 and page_size % block_n == 0 and block_n & (block_n - 1) == 0, (
        f"block_n {block_n} must be a power of two >= 16 dividing page_size {page_size}")
    if n_per_prog is None:
        # Up to 2048 keys per program (16 per query at 32k: 1,024 CTAs for a batch of 64, the q
        # tile loaded once per 2048 keys), fewer when that would leave SMs idle (small batches).
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 132
        fill = triton.next_power_of_2(max(1, T * max_len // (2 * sms)))
        n_per_prog = max(block_n, min(2048, fill))
    assert n_per_prog % block_n == 0, f"n_per_prog {n_per_prog} must be a multiple of block_n {block_n}"
    if out is None:
        out = torch.empty(T, max_len, dtype=torch.float32, device=q.device)
    assert out.shape == (T, max_len) and out.dtype == torch.float32 and out.stride(1) == 1, (
        f"out must be fp32 [{T}, {max_len}] contiguous per row, got {out.dtype} {tuple(out.shape)}")
    if T == 0 or max_len == 0:
        return out
    if block_m is None:
        block_m = 1 if T == 1 else (4 if (q_req[1:] == q_req[:-1]).float().mean() >= 0.5 else 1)
    tile_start, tile_rows = tiles if tiles is not None else query_tiles(q_req, block_m)
    grid = (tile_start.shape[0], triton.cdiv(max_len, n_per_prog))
    indexer_scores_kernel[grid](
        q, weights, keys, scales, page_table, q_req, q_len, tile_start, tile_rows, out,
        max_len,
        q.stride(0), q.stride(1), weights.stride(0), keys.stride(0), keys.stride(1),
        scales.stride(0), scales.stride(1), page_table.stride(0), out.stride(0),
        H=H, D=D, PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n, N_PER_PROG=n_per_prog,
        DOT_F32=dot_in_fp32(q), NUM_STAGES=3,
        # a [256, BLOCK_N] fp32 score tile (4 queries x 64 heads) spills at 4 warps on sm_100
        num_warps=8 if block_m * H >= 256 else 4,
    )
    return out


def quantize_indexer_q(q: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D] -> (fp8 q, weights * per-(query, head) scale): scores are unchanged up to fp8
    rounding of q, because relu(s * a) = s * relu(a) for the positive scale s."""
    scale = (q.float().abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-8)             # [T, H]
    q8 = (q.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q8, (weights.float() * scale).contiguous()


def query_tiles(q_req: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of at most block_m consecutive queries of one request: (first row, rows) int32 [NT]."""
    assert block_m >= 1 and block_m & (block_m - 1) == 0, f"block_m must be a power of two, got {block_m}"
    T, dev = q_req.shape[0], q_req.device
    if block_m == 1:
        return torch.arange(T, dtype=torch.int32, device=dev), torch.ones(T, dtype=torch.int32, device=dev)
    change = torch.ones(T, dtype=torch.bool, device=dev)
    change[1:] = q_req[1:] != q_req[:-1]
    run_start = torch.nonzero(change).flatten()                                    # [R]
    run_len = torch.diff(run_start, append=torch.tensor([T], device=dev))
    n_tiles = (run_len + block_m - 1) // block_m
    run = torch.repeat_interleave(torch.arange(run_start.shape[0], device=dev), n_tiles)  # [NT]
    j = torch.arange(run.shape[0], device=dev) - (torch.cumsum(n_tiles, 0) - n_tiles)[run]
    start = run_start[run] + j * block_m
    return start.int(), torch.clamp(run_len[run] - j * block_m, max=block_m).int()


def select_topk(scores: torch.Tensor, q_len: torch.Tensor, topk: int = DEFAULT_TOPK
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k key positions per row of scores (torch.topk): (indices int32 [T, k], counts int32 [T]).

    Expects scores as indexer_scores writes them: -inf at positions >= q_len.
    """
    assert topk > 0, f"topk must be positive, got {topk}"
    T, n = scores.shape
    check_int_vector(q_len, "q_len", T)
    counts = torch.clamp(q_len, max=topk)                                  # [T]
    cols = torch.arange(topk, device=scores.device)                       # [k]
    idx = cols.expand(T, topk).to(torch.int32).clone()                   # short rows: all their keys
    k_eff = min(topk, n)
    if k_eff > 0:
        # Rows with more than k keys hold only finite scores in their top k, so order is free.
        top = torch.topk(scores, k_eff, dim=1, sorted=False).indices.int()  # [T, k_eff]
        long_rows = (q_len > topk)[:, None]
        idx[:, :k_eff] = torch.where(long_rows, top, idx[:, :k_eff])
    idx.masked_fill_(cols[None, :] >= counts[:, None], 0)
    return idx, counts


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, cache: torch.Tensor,
                 page_table: torch.Tensor, q_req: torch.Tensor, q_len: torch.Tensor,
                 page_size: int, topk: int = DEFAULT_TOPK, max_len: int | None = None,
                 method: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning indexer: the top-k cached key positions of each query, (indices [T, k], counts [T]).

    method "torch" selects with torch.topk, "triton" with the radix-select kernel (topk.py).
    """
    assert method in ("torch", "triton"), f"method must be 'torch' or 'triton', got {method!r}"
    scores = indexer_scores(q, weights, cache, page_table, q_req, q_len, page_size, max_len)
    if method == "triton":
        return radix_topk(scores, q_len, topk)
    return select_topk(scores, q_len, topk)
