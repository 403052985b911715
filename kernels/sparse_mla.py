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
from dataclasses import dataclass

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
def _latent_part(c_row, s_row, valid, COL0: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr,
                 QBLOCK: tl.constexpr, KV_FP8: tl.constexpr, DOT_F32: tl.constexpr, QDT: tl.constexpr):
    """Columns COL0 .. COL0+W of BLOCK_N cache rows as a dot operand, fp8 dequantised.

    A part no wider than a scale block (W <= QBLOCK) has one fp8 scale per row, a [BLOCK_N, 1]
    broadcast; a wider part is reshaped into its scale blocks.
    """
    offs = COL0 + tl.arange(0, W)
    c = tl.load(c_row + offs[None, :], mask=valid[:, None], other=0.0)              # [BN, W]
    if KV_FP8:
        if W <= QBLOCK:
            sc = tl.load(s_row + COL0 // QBLOCK, mask=valid, other=0.0)              # [BN] fp32
            c = c.to(tl.float32) * sc[:, None]
        else:
            offs_b = COL0 // QBLOCK + tl.arange(0, W // QBLOCK)
            sc = tl.load(s_row[:, None] + offs_b[None, :], mask=valid[:, None], other=0.0)  # [BN, W/QB]
            c = tl.reshape(tl.reshape(c.to(tl.float32), [BLOCK_N, W // QBLOCK, QBLOCK]) * sc[:, :, None],
                           [BLOCK_N, W])
    if DOT_F32:
        c = c.to(tl.float32)
    else:
        c = c.to(QDT)                # bf16 for the tensor cores (the interpreter stays fp32)
    return c


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
    QBLOCK: tl.constexpr, DOT_F32: tl.constexpr, NUM_STAGES: tl.constexpr, ACC_SPLIT: tl.constexpr,
):
    """One program: one query, BLOCK_H heads (all of them up to 64), one of NUM_SPLITS token slices.

    ACC_SPLIT=4 (Hopper): the latent is handled in four column quarters of DL/4, as FlashMLA
    splits its output: four [BLOCK_H, DL/4] fp32 accumulators, so the wgmma tiles of a
    64-head program spread the [64, 512] accumulator over both warpgroups without spills.
    ACC_SPLIT=1 (Blackwell): one [BLOCK_H, DL] accumulator; tcgen05 keeps the products in
    tensor memory, which separate quarter accumulators would overflow. Each selected row is
    loaded and (fp8) dequantised once per program. Sparse programs read pre-resolved cache rows
    (tok = page * PAGE_SIZE + slot, built once by the launcher). With NUM_SPLITS > 1
    (flash-decoding) out/lse are fp32 partials per split, merged by _mla_combine_kernel.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    QW: tl.constexpr = DL // ACC_SPLIT
    head_progs = tl.cdiv(H, BLOCK_H)
    t = (tl.program_id(0) // head_progs).to(tl.int64)
    offs_h = (tl.program_id(0) % head_progs) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = offs_h < H
    offs_w = tl.arange(0, QW)
    offs_r = tl.arange(0, DR)
    q_row = qn_ptr + t * stride_qnt + offs_h[:, None] * stride_qnh + offs_w[None, :]
    q0 = tl.load(q_row, mask=hmask[:, None], other=0.0)                                # [BH, QW]
    qp = tl.load(qp_ptr + t * stride_qpt + offs_h[:, None] * stride_qph + offs_r[None, :],
                 mask=hmask[:, None], other=0.0)                                      # [BH, DR]
    if DOT_F32:
        q0, qp = q0.to(tl.float32), qp.to(tl.float32)
    acc0 = tl.zeros([BLOCK_H, QW], tl.float32)
    if ACC_SPLIT == 4:
        q1 = tl.load(q_row + QW, mask=hmask[:, None], other=0.0)
        q2 = tl.load(q_row + 2 * QW, mask=hmask[:, None], other=0.0)
        q3 = tl.load(q_row + 3 * QW, mask=hmask[:, None], other=0.0)
        if DOT_F32:
            q1, q2, q3 = q1.to(tl.float32), q2.to(tl.float32), q3.to(tl.float32)
        acc1 = tl.zeros([BLOCK_H, QW], tl.float32)
        acc2 = tl.zeros([BLOCK_H, QW], tl.float32)
        acc3 = tl.zeros([BLOCK_H, QW], tl.float32)
    req = tl.load(q_req_ptr + t).to(tl.int64)
    count = tl.load(count_ptr + t)
    split = tl.program_id(1)
    chunk = tl.cdiv(tl.cdiv(count, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, count)
    m = tl.full([BLOCK_H], -1.0e30, tl.float32)     # finite: no inf - inf when a row is empty
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    qk_scale = sm_scale * LOG2E
    for n0 in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < hi
        if SPARSE:
            tok = tl.load(tok_ptr + t * stride_it + offs_n, mask=valid, other=0).to(tl.int64)
        else:
            page = tl.load(table_ptr + req * stride_tr + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
            tok = page * PAGE_SIZE + offs_n % PAGE_SIZE
        c_row = (c_ptr + tok * ROW_C)[:, None]
        s_row = sc_ptr + tok * ROW_S
        r = tl.load((r_ptr + tok * ROW_R)[:, None] + offs_r[None, :], mask=valid[:, None], other=0.0)
        if DOT_F32:
            r = r.to(tl.float32)
        c0 = _latent_part(c_row, s_row, valid, 0, QW, BLOCK_N, QBLOCK, KV_FP8, DOT_F32, qp.dtype)  # [BN, QW]
        s = tl.dot(qp, tl.trans(r)) + tl.dot(q0, tl.trans(c0))                        # [BH, BN] fp32
        if ACC_SPLIT == 4:
            c1 = _latent_part(c_row, s_row, valid, QW, QW, BLOCK_N, QBLOCK, KV_FP8, DOT_F32, qp.dtype)
            c2 = _latent_part(c_row, s_row, valid, 2 * QW, QW, BLOCK_N, QBLOCK, KV_FP8, DOT_F32, qp.dtype)
            c3 = _latent_part(c_row, s_row, valid, 3 * QW, QW, BLOCK_N, QBLOCK, KV_FP8, DOT_F32, qp.dtype)
            s += tl.dot(q1, tl.trans(c1)) + tl.dot(q2, tl.trans(c2)) + tl.dot(q3, tl.trans(c3))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])                                               # [BH, BN] fp32
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        pc = p.to(c0.dtype)                                # bf16 P @ V as in flash attention
        acc0 = acc0 * alpha[:, None] + tl.dot(pc, c0)                                 # [BH, QW]
        if ACC_SPLIT == 4:
            acc1 = acc1 * alpha[:, None] + tl.dot(pc, c1)
            acc2 = acc2 * alpha[:, None] + tl.dot(pc, c2)
            acc3 = acc3 * alpha[:, None] + tl.dot(pc, c3)
        m = m_new
    nonempty = l_sum > 0
    inv = (1.0 / tl.where(nonempty, l_sum, 1.0))[:, None]
    o_row = out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + split * stride_os + offs_w[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(o_row, (acc0 * inv).to(ty), mask=hmask[:, None])
    if ACC_SPLIT == 4:
        tl.store(o_row + QW, (acc1 * inv).to(ty), mask=hmask[:, None])
        tl.store(o_row + 2 * QW, (acc2 * inv).to(ty), mask=hmask[:, None])
        tl.store(o_row + 3 * QW, (acc3 * inv).to(ty), mask=hmask[:, None])
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


# Heads per program with fp8 KV, {Hopper: ..., Blackwell: ...}: the dequantisation's fp32 tile
# costs registers that 64 heads do not leave (compile report: 255 registers and 65 / 26 spill
# stores at 64 heads), so fp8 runs the largest head block that compiles without spills.
MLA_FP8_BLOCK_H = {False: 16, True: 16}


@dataclass(frozen=True)
class MlaConfig:
    """Launch configuration of _mla_attn_kernel: heads and tokens per program step, warps, accumulator split."""

    block_h: int
    block_n: int
    num_warps: int
    acc_split: int          # 4: the latent in four column quarters (Hopper), 1: one accumulator


def target_arch(device: torch.device) -> int:
    """The CUDA architecture a launch compiles for (sm_XY as XY); 90 off the GPU (interpreter, meta)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def mla_config(H: int, DL: int, kv_fp8: bool, arch: int, block_h: int | None = None,
               block_n: int | None = None, acc_split: int | None = None) -> MlaConfig:
    """Default MLA launch configuration for H heads on sm_<arch> (the explicit arguments win).

    From the compile report (kvproof bench kernels --compile-report), the largest head blocks
    that compile without register spills: bf16 KV takes all heads up to 64 in one program
    (Hopper: 4 accumulator quarters, 8 warps, 16 tokens a step, 247 registers; Blackwell:
    one accumulator, tcgen05 products in tensor memory, 214 registers). fp8 KV: see
    MLA_FP8_BLOCK_H. 128 heads are two neighbouring programs of 64 (a [128, 512] fp32
    accumulator is the whole register file of an SM).
    """
    want_h = min(64, max(16, triton.next_power_of_2(H)))
    block_h = block_h or (min(want_h, MLA_FP8_BLOCK_H[arch >= 100]) if kv_fp8 else want_h)
    assert block_h in (16, 32, 64), f"block_h must be 16, 32 or 64, got {block_h}"
    wide = block_h == 64
    if acc_split is None:
        acc_split = 1 if (arch >= 100 and wide) or DL < 64 else 4
    assert acc_split in (1, 4) and DL // acc_split >= 16, (
        f"acc_split must be 1 or 4 with latent dim / acc_split >= 16, got {acc_split} for latent {DL}")
    block_n = block_n or (16 if wide else 32)
    assert block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n must be a power of two >= 16, got {block_n}"
    return MlaConfig(block_h, block_n, 8 if DL >= KV_LATENT_DIM else 4, acc_split)


def _mla_launch(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, page_table: torch.Tensor,
                q_req: torch.Tensor, counts: torch.Tensor, sm_scale: float,
                indices: torch.Tensor | None, out: torch.Tensor | None, block_n: int | None,
                num_splits: int | None, block_h: int | None, acc_split: int | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
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
    cfg = mla_config(H, DL, kv_fp8, target_arch(q_nope.device), block_h, block_n, acc_split)
    S = kv.shape[1]
    max_tokens = indices.shape[1] if indices is not None else page_table.shape[1] * S
    if num_splits is None:
        num_splits = mla_num_splits(T, triton.cdiv(H, cfg.block_h), max_tokens, cfg.block_n, q_nope.device)
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
    grid = (T * triton.cdiv(H, cfg.block_h), num_splits)
    _mla_attn_kernel[grid](
        q_nope, q_pe, c, r, sc, page_table, q_req, tok, counts, part, plse,
        H, sm_scale,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        page_table.stride(0), tok.stride(0), part.stride(0), part.stride(1),
        part.stride(2) if num_splits > 1 else 0, plse.stride(0), plse.stride(1),
        ROW_C=c.stride(0), ROW_R=r.stride(0), ROW_S=sc.stride(0),
        DL=DL, DR=DR, PAGE_SIZE=S, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, NUM_SPLITS=num_splits,
        SPARSE=indices is not None, KV_FP8=kv_fp8, QBLOCK=FP8_BLOCK, DOT_F32=dot_in_fp32(q_nope),
        NUM_STAGES=2, ACC_SPLIT=cfg.acc_split, num_warps=cfg.num_warps,
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
                         block_h: int | None = None, acc_split: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its indexer-selected tokens: (out [T, H, DL], lse [T, H])."""
    return _mla_launch(q_nope, q_pe, kv, page_table, q_req, counts, sm_scale, indices, out, block_n,
                       num_splits, block_h, acc_split)


def dense_mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                        page_table: torch.Tensor, q_req: torch.Tensor, q_len: torch.Tensor,
                        sm_scale: float, out: torch.Tensor | None = None,
                        block_n: int | None = None, num_splits: int | None = None,
                        block_h: int | None = None, acc_split: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its first q_len cached tokens: (out [T, H, DL], lse [T, H])."""
    return _mla_launch(q_nope, q_pe, kv, page_table, q_req, q_len, sm_scale, None, out, block_n,
                       num_splits, block_h, acc_split)
