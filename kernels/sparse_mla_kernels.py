"""Triton kernels of the MLA attention (sparse_mla.py holds the reference and the launchers).

mla_attn_kernel: one program per (query, head block, token split), online softmax over the
selected cache rows; mla_combine_kernel: merges the split partials by log-sum-exp.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
def softmax_step(s, valid, qk_scale, m, l_sum, acc0, acc1, acc2, acc3, c0, c1, c2, c3, ACC_SPLIT: tl.constexpr):
    """One online-softmax step: scores s [BH, BN] (before qk_scale) of rows `valid` into the
    running max m, sum l_sum and accumulators (acc1-3 and c1-3 unused when ACC_SPLIT is 1)."""
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])                                                   # [BH, BN] fp32
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    pc = p.to(c0.dtype)                                    # bf16 P @ V as in flash attention
    acc0 = acc0 * alpha[:, None] + tl.dot(pc, c0)                                     # [BH, QW]
    if ACC_SPLIT == 4:
        acc1 = acc1 * alpha[:, None] + tl.dot(pc, c1)
        acc2 = acc2 * alpha[:, None] + tl.dot(pc, c2)
        acc3 = acc3 * alpha[:, None] + tl.dot(pc, c3)
    return m_new, l_sum, acc0, acc1, acc2, acc3


@triton.jit
def program_queries(qn_ptr, qp_ptr, H, stride_qnt, stride_qnh, stride_qpt, stride_qph, BLOCK_H: tl.constexpr,
                    QW: tl.constexpr, DR: tl.constexpr, ACC_SPLIT: tl.constexpr, DOT_F32: tl.constexpr):
    """The program's query t and heads (offs_h, hmask), the query's latent part in ACC_SPLIT column
    quarters and its rope part (fp32 when DOT_F32), and zeroed accumulators: (t, offs_h, hmask, q0, q1,
    q2, q3, qp, acc0, acc1, acc2, acc3); the unused quarters are q0 / acc0 when ACC_SPLIT is 1."""
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
    q1, q2, q3, acc1, acc2, acc3 = q0, q0, q0, acc0, acc0, acc0
    if ACC_SPLIT == 4:
        q1 = tl.load(q_row + QW, mask=hmask[:, None], other=0.0)
        q2 = tl.load(q_row + 2 * QW, mask=hmask[:, None], other=0.0)
        q3 = tl.load(q_row + 3 * QW, mask=hmask[:, None], other=0.0)
        if DOT_F32:
            q1, q2, q3 = q1.to(tl.float32), q2.to(tl.float32), q3.to(tl.float32)
        acc1 = tl.zeros([BLOCK_H, QW], tl.float32)
        acc2 = tl.zeros([BLOCK_H, QW], tl.float32)
        acc3 = tl.zeros([BLOCK_H, QW], tl.float32)
    return t, offs_h, hmask, q0, q1, q2, q3, qp, acc0, acc1, acc2, acc3


@triton.jit
def split_state(count_ptr, t, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's slice [lo, hi) of query t's selected rows (split program_id(1) of NUM_SPLITS, in
    whole BLOCK_N blocks) and an empty online-softmax state: (lo, hi, m, l_sum)."""
    count = tl.load(count_ptr + t)
    chunk = tl.cdiv(tl.cdiv(count, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = tl.program_id(1) * chunk
    hi = tl.minimum(lo + chunk, count)
    m = tl.full([BLOCK_H], -1.0e30, tl.float32)     # finite: no inf - inf when a row is empty
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    return lo, hi, m, l_sum


@triton.jit
def store_out(out_ptr, lse_ptr, t, offs_h, hmask, split, stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
              m, l_sum, acc0, acc1, acc2, acc3, QW: tl.constexpr, ACC_SPLIT: tl.constexpr):
    """Normalised output rows (or split partials) and the natural-log lse; 0 and -inf when empty."""
    LOG2E: tl.constexpr = 1.4426950408889634
    nonempty = l_sum > 0
    inv = (1.0 / tl.where(nonempty, l_sum, 1.0))[:, None]
    offs_w = tl.arange(0, QW)
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
def mla_attn_kernel(
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
    (flash-decoding) out/lse are fp32 partials per split, merged by mla_combine_kernel.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    QW: tl.constexpr = DL // ACC_SPLIT
    t, offs_h, hmask, q0, q1, q2, q3, qp, acc0, acc1, acc2, acc3 = program_queries(
        qn_ptr, qp_ptr, H, stride_qnt, stride_qnh, stride_qpt, stride_qph, BLOCK_H, QW, DR, ACC_SPLIT, DOT_F32)
    offs_w = tl.arange(0, QW)
    offs_r = tl.arange(0, DR)
    req = tl.load(q_req_ptr + t).to(tl.int64)
    lo, hi, m, l_sum = split_state(count_ptr, t, NUM_SPLITS, BLOCK_N, BLOCK_H)
    split = tl.program_id(1)
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
        if ACC_SPLIT == 4:
            m, l_sum, acc0, acc1, acc2, acc3 = softmax_step(s, valid, qk_scale, m, l_sum, acc0, acc1, acc2, acc3,
                                                             c0, c1, c2, c3, ACC_SPLIT)
        else:
            m, l_sum, acc0, _, _, _ = softmax_step(s, valid, qk_scale, m, l_sum, acc0, acc0, acc0, acc0,
                                                    c0, c0, c0, c0, ACC_SPLIT)
    if ACC_SPLIT == 4:
        store_out(out_ptr, lse_ptr, t, offs_h, hmask, split, stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
                   m, l_sum, acc0, acc1, acc2, acc3, QW, ACC_SPLIT)
    else:
        store_out(out_ptr, lse_ptr, t, offs_h, hmask, split, stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
                   m, l_sum, acc0, acc0, acc0, acc0, QW, ACC_SPLIT)


@triton.jit
def mla_combine_kernel(
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
