"""MLA attention in the weight-absorbed form over a paged latent KV cache, sparse and dense.

Each query t (request q_req[t]) attends, with all H heads, to a set of cached tokens:
  sparse: positions indices[t, :counts[t]] chosen by the indexer (see indexer.py);
  dense:  positions 0 .. q_len[t]-1 (short contexts, causal prefill with q_len = pos + 1).
Queries are already absorbed into latent space: q_nope [T, H, 512], q_pe [T, H, 64].
The cache row of a token is [latent c (512) | rope r (64)] in bf16 (kv_bf16 layout), or
uint8 [512 fp8 | 4 fp32 scales | 64 bf16] (kv_fp8 layout, 656 B; c is dequantised to bf16):
  s = (q_nope . c + q_pe . r) * sm_scale,  p = softmax(s) in fp32,  out = sum p * c.
Output [T, H, 512] bf16 in latent space (the caller applies W_UV), plus the natural-log
sum-exp [T, H] fp32 for merging partial attentions. A query with no tokens gets out = 0
and lse = -inf.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import (FP8_BLOCK, KV_LATENT_DIM, check_int_vector, check_page_table, dequantize_kv_fp8,
                      dot_in_fp32, kv_fp8_token_bytes)

# ---------------------------------------------------------------------------------
# torch reference (float64)
# ---------------------------------------------------------------------------------


def mla_attention_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                      page_table: torch.Tensor, q_req: torch.Tensor, counts: torch.Tensor,
                      sm_scale: float, indices: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (out [T, H, DL] float64, lse [T, H] float64); dense when indices is None."""
    T, H, DL = q_nope.shape
    S = kv.shape[1]
    if kv.dtype == torch.uint8:                                 # fp8 layout: dequantise once
        c, r = dequantize_kv_fp8(kv, DL)
        kv = torch.cat([c, r], dim=-1)                          # [P, S, DL + DR] fp32
    out = torch.zeros(T, H, DL, dtype=torch.float64, device=q_nope.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float64, device=q_nope.device)
    for t in range(T):
        n = int(counts[t])
        if n == 0:
            continue
        pos = indices[t, :n].long() if indices is not None else torch.arange(n, device=kv.device)
        rows = kv[page_table[int(q_req[t]), pos // S].long(), pos % S].double()   # [n, DL + DR]
        s = (q_nope[t].double() @ rows[:, :DL].T + q_pe[t].double() @ rows[:, DL:].T) * sm_scale  # [H, n]
        lse[t] = torch.logsumexp(s, dim=-1)
        out[t] = torch.softmax(s, dim=-1) @ rows[:, :DL]
    return out, lse


# ---------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------


@triton.jit
def _mla_attn_kernel(
    # pointers
    qn_ptr, qp_ptr, c_ptr, r_ptr, sc_ptr, table_ptr, q_req_ptr, tok_ptr, count_ptr, out_ptr, lse_ptr,
    # sizes / scalars
    H, sm_scale,
    # strides (elements of each pointer's own type)
    stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_tr, stride_it, stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    # constexpr: the cache row strides are constants of the layout, so the compiler sees that
    # every row (and the fp8 row's rope at byte 528) is 16-byte aligned and vectorises its loads
    ROW_C: tl.constexpr, ROW_R: tl.constexpr, ROW_S: tl.constexpr,
    DL: tl.constexpr, DR: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SPARSE: tl.constexpr, KV_FP8: tl.constexpr,
    QBLOCK: tl.constexpr, DOT_F32: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program: one query, BLOCK_H heads (all of them up to 64), one of NUM_SPLITS token slices.

    Sparse programs read pre-resolved cache rows (tok = page * PAGE_SIZE + slot, built once by
    the launcher), so the row loads do not wait on a page-table load. Each selected row is read
    and (fp8) dequantised once per program, i.e. once per query for H <= 64. With NUM_SPLITS > 1
    (flash-decoding) out/lse are fp32 partials per split, merged by _mla_combine_kernel.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    # The head blocks of one query are neighbouring programs: they run together and the
    # second read of each selected row hits L2.
    head_progs = tl.cdiv(H, BLOCK_H)
    t = (tl.program_id(0) // head_progs).to(tl.int64)
    offs_h = (tl.program_id(0) % head_progs) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_l = tl.arange(0, DL)
    offs_r = tl.arange(0, DR)
    qn = tl.load(qn_ptr + t * stride_qnt + offs_h[:, None] * stride_qnh + offs_l[None, :],
                 mask=hmask[:, None], other=0.0)                                      # [BH, DL]
    qp = tl.load(qp_ptr + t * stride_qpt + offs_h[:, None] * stride_qph + offs_r[None, :],
                 mask=hmask[:, None], other=0.0)                                      # [BH, DR]
    if DOT_F32:
        qn = qn.to(tl.float32)
        qp = qp.to(tl.float32)
    req = tl.load(q_req_ptr + t).to(tl.int64)
    count = tl.load(count_ptr + t)
    split = tl.program_id(1)
    chunk = tl.cdiv(tl.cdiv(count, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, count)
    m = tl.full([BLOCK_H], -1.0e30, tl.float32)     # finite: no inf - inf when a row is empty
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DL], tl.float32)
    qk_scale = sm_scale * LOG2E
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < hi
        if SPARSE:
            tok = tl.load(tok_ptr + t * stride_it + offs_n, mask=valid, other=0).to(tl.int64)
        else:
            page = tl.load(table_ptr + req * stride_tr + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
            tok = page * PAGE_SIZE + offs_n % PAGE_SIZE
        c = tl.load((c_ptr + tok * ROW_C)[:, None] + offs_l[None, :], mask=valid[:, None], other=0.0)  # [BN, DL]
        r = tl.load((r_ptr + tok * ROW_R)[:, None] + offs_r[None, :], mask=valid[:, None], other=0.0)  # [BN, DR]
        if KV_FP8:
            offs_b = tl.arange(0, DL // QBLOCK)
            sc = tl.load((sc_ptr + tok * ROW_S)[:, None] + offs_b[None, :],
                         mask=valid[:, None], other=0.0)                              # [BN, DL/QBLOCK]
            c = tl.reshape(tl.reshape(c.to(tl.float32), [BLOCK_N, DL // QBLOCK, QBLOCK]) * sc[:, :, None],
                           [BLOCK_N, DL])                                             # [BN, DL] fp32
            if not DOT_F32:
                c = c.to(r.dtype)             # bf16 for the tensor cores (the interpreter stays fp32)
        if DOT_F32:
            s = tl.dot(qn, tl.trans(c.to(tl.float32))) + tl.dot(qp, tl.trans(r.to(tl.float32)))
        else:
            s = tl.dot(qn, tl.trans(c)) + tl.dot(qp, tl.trans(r))                      # [BH, BN] fp32
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])                                               # [BH, BN]
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        p = p.to(c.dtype)                                 # bf16 P @ V as in flash attention
        if DOT_F32:
            pv = tl.dot(p.to(tl.float32), c.to(tl.float32))
        else:
            pv = tl.dot(p, c)
        acc = acc * alpha[:, None] + pv                                               # [BH, DL]
        m = m_new
    nonempty = l_sum > 0
    out = acc / tl.where(nonempty, l_sum, 1.0)[:, None]
    tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + split * stride_os + offs_l[None, :],
             out.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    lse = tl.where(nonempty, (m + tl.log2(tl.where(nonempty, l_sum, 1.0))) / LOG2E, float("-inf"))
    tl.store(lse_ptr + t * stride_lt + offs_h * stride_lh + split, lse, mask=hmask)


@triton.jit
def _mla_combine_kernel(
    # pointers
    part_ptr, plse_ptr, out_ptr, lse_ptr,
    # strides (elements)
    stride_pt, stride_ph, stride_ps, stride_qt, stride_qh, stride_ot, stride_oh, stride_lt,
    # constexpr
    DL: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program merges the split partials of one (query, head) by their log-sum-exp."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_l = tl.arange(0, DL)
    smask = offs_s < NUM_SPLITS
    lse_s = tl.load(plse_ptr + t * stride_qt + h * stride_qh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m)                                                       # [BS], 0 for empty
    total = tl.sum(w, axis=0)
    part = tl.load(part_ptr + t * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_l[None, :],
                   mask=smask[:, None], other=0.0)                              # [BS, DL]
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_l, out.to(out_ptr.dtype.element_ty))
    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + t * stride_lt + h, lse)


# ---------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------


def mla_num_splits(T: int, head_programs: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """Flash-decoding splits: enough programs for one wave of the SMs, at least 8 key blocks per
    split (each split writes an fp32 [heads, 512] partial, as large as 128 bf16 rows), no host sync."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = sms // max(1, T * head_programs)
    return int(max(1, min(want, max_tokens // (8 * block_n))))


def mla_block_h(H: int, block_h: int | None, kv_fp8: bool) -> int:
    """Heads per program: 32 for bf16 KV, 16 for fp8 KV (tl.dot's minimum), fewer when H is smaller.

    The largest that compile without register spills on sm_90 (kvproof bench kernels
    --compile-report): 64 heads hold a [64, 512] fp32 accumulator plus the [64, 512] query
    and spill (255 registers, 44 spill stores bf16 / 91 fp8 at 8 warps; 101 / 232 at 16);
    fp8 dequantisation needs a [BLOCK_N, 512] fp32 tile, so fp8 spills at 32 heads.
    """
    block_h = block_h or min(16 if kv_fp8 else 32, max(16, triton.next_power_of_2(H)))
    assert block_h in (16, 32, 64), f"block_h must be 16, 32 or 64, got {block_h}"
    return block_h


def _mla_launch(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, page_table: torch.Tensor,
                q_req: torch.Tensor, counts: torch.Tensor, sm_scale: float,
                indices: torch.Tensor | None, out: torch.Tensor | None, block_n: int | None,
                num_splits: int | None, block_h: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    assert q_nope.dim() == 3 and q_nope.stride(2) == 1, (
        f"q_nope must be [T, H, latent] contiguous in latent, got {tuple(q_nope.shape)}")
    T, H, DL = q_nope.shape
    assert q_pe.dim() == 3 and q_pe.shape[:2] == (T, H) and q_pe.stride(2) == 1, (
        f"q_pe must be [T={T}, H={H}, rope] contiguous in rope, got {tuple(q_pe.shape)}")
    DR = q_pe.shape[2]
    kv_fp8 = kv.dtype == torch.uint8
    if kv_fp8:
        assert q_pe.dtype == q_nope.dtype == torch.bfloat16, (
            f"with an fp8 kv cache q_nope and q_pe must be bf16, got {q_nope.dtype}, {q_pe.dtype}")
        width = kv_fp8_token_bytes(DL, DR)
    else:
        assert q_pe.dtype == q_nope.dtype == kv.dtype, (
            f"q_nope, q_pe and kv must share a dtype, got {q_nope.dtype}, {q_pe.dtype}, {kv.dtype}")
        width = DL + DR
    assert kv.dim() == 3 and kv.shape[2] == width and kv.is_contiguous(), (
        f"kv must be one contiguous layer [pages, page_size, {width}] ({'fp8' if kv_fp8 else 'bf16'} "
        f"layout), got {kv.dtype} {tuple(kv.shape)}")
    for d, name in ((DL, "latent dim"), (DR, "rope dim")):
        assert d >= 16 and d & (d - 1) == 0, f"{name} {d} must be a power of two >= 16"
    check_page_table(page_table)
    check_int_vector(q_req, "q_req", T)
    check_int_vector(counts, "counts" if indices is not None else "q_len", T)
    if indices is not None:
        assert indices.dim() == 2 and indices.shape[0] == T and indices.dtype == torch.int32 \
            and indices.stride(1) == 1, (
                f"indices must be int32 [T={T}, k] contiguous per row, got {indices.dtype} "
                f"{tuple(indices.shape)}")
    assert math.isfinite(sm_scale) and sm_scale > 0, f"sm_scale must be a positive number, got {sm_scale}"
    BLOCK_H = mla_block_h(H, block_h, kv_fp8)
    block_n = block_n or 32
    assert block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n must be a power of two >= 16, got {block_n}"
    S = kv.shape[1]
    max_tokens = indices.shape[1] if indices is not None else page_table.shape[1] * S
    if num_splits is None:
        num_splits = mla_num_splits(T, triton.cdiv(H, BLOCK_H), max_tokens, block_n, q_nope.device)
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"
    if out is None:
        out = torch.empty(T, H, DL, dtype=q_nope.dtype, device=q_nope.device)
    assert out.shape == (T, H, DL) and out.stride(2) == 1, (
        f"out must be [T={T}, H={H}, {DL}] contiguous in latent, got {tuple(out.shape)}")
    lse = torch.empty(T, H, dtype=torch.float32, device=q_nope.device)
    if T == 0 or H == 0:
        return out, lse
    if indices is not None:
        # Pre-resolved cache rows (as FlashMLA takes them): one gather here, no page-table
        # load on the kernel's critical path. Padding entries (index 0) are never read.
        # Entries past counts[t] are ignored by contract whatever they hold: clamp them into the
        # table so the gather itself never goes out of bounds.
        pos = indices.clamp(0, page_table.shape[1] * S - 1)
        tok = (page_table[q_req.long()[:, None], (pos // S).long()] * S + pos % S).int()
    else:
        tok = counts                                     # unread placeholder when dense
    if num_splits == 1:
        part, plse = out, lse.unsqueeze(-1)                                      # written directly
    else:
        part = torch.empty(T, H, num_splits, DL, dtype=torch.float32, device=q_nope.device)
        plse = torch.empty(T, H, num_splits, dtype=torch.float32, device=q_nope.device)
    if kv_fp8:      # typed views of the same bytes: latent fp8, scales fp32, rope bf16
        nb = DL // FP8_BLOCK
        c = kv.view(torch.float8_e4m3fn).view(-1, width)
        sc = kv.view(torch.float32).view(-1, width // 4)[:, DL // 4:]
        r = kv.view(torch.bfloat16).view(-1, width // 2)[:, (DL + 4 * nb) // 2:]
    else:
        c = kv.view(-1, width)
        r, sc = c[:, DL:], c
    grid = (T * triton.cdiv(H, BLOCK_H), num_splits)
    _mla_attn_kernel[grid](
        q_nope, q_pe, c, r, sc, page_table, q_req, tok, counts, part, plse,
        H, sm_scale,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        page_table.stride(0), tok.stride(0), part.stride(0), part.stride(1),
        part.stride(2) if num_splits > 1 else 0, plse.stride(0), plse.stride(1),
        ROW_C=c.stride(0), ROW_R=r.stride(0), ROW_S=sc.stride(0),
        DL=DL, DR=DR, PAGE_SIZE=S, BLOCK_H=BLOCK_H, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        SPARSE=indices is not None, KV_FP8=kv_fp8, QBLOCK=FP8_BLOCK, DOT_F32=dot_in_fp32(q_nope),
        NUM_STAGES=2, num_warps=8 if DL >= KV_LATENT_DIM else 4,
    )
    if num_splits > 1:
        _mla_combine_kernel[(T, H)](
            part, plse, out, lse,
            part.stride(0), part.stride(1), part.stride(2), plse.stride(0), plse.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            DL=DL, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
        )
    return out, lse


def sparse_mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                         page_table: torch.Tensor, q_req: torch.Tensor, indices: torch.Tensor,
                         counts: torch.Tensor, sm_scale: float, out: torch.Tensor | None = None,
                         block_n: int | None = None, num_splits: int | None = None,
                        block_h: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its indexer-selected tokens: (out [T, H, DL], lse [T, H])."""
    return _mla_launch(q_nope, q_pe, kv, page_table, q_req, counts, sm_scale, indices, out, block_n,
                       num_splits, block_h)


def dense_mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                        page_table: torch.Tensor, q_req: torch.Tensor, q_len: torch.Tensor,
                        sm_scale: float, out: torch.Tensor | None = None,
                        block_n: int | None = None, num_splits: int | None = None,
                        block_h: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its first q_len cached tokens: (out [T, H, DL], lse [T, H])."""
    return _mla_launch(q_nope, q_pe, kv, page_table, q_req, q_len, sm_scale, None, out, block_n,
                       num_splits, block_h)
