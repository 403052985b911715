"""MLA attention over an fp8 KV cache with all 64 heads of a query in one program (Triton).

mla_attn_fp8_staged_kernel dequantises each selected cache row once per query: a chunk of
rows at a time goes fp8 -> bf16 into the program's own slot of a global staging buffer (a
few tens of KB, written and re-read while it sits in L2), then the proven bf16 64-head loop
(the pipelined loads of sparse_mla_kernels.mla_attn_kernel) runs over the slot. Dequantising
into shared memory through registers inside that loop costs what a 64-head program has not
got (docs/kernels.md: 56-70 spill stores); the staged rows reach shared memory by the same
asynchronous copies as bf16 rows, so the loop compiles as the bf16 one does.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .sparse_mla_kernels import program_queries, softmax_step, split_state, store_out


@triton.jit
def _block_id(AXIS: tl.constexpr, NATIVE: tl.constexpr):
    """tl.program_id(AXIS), re-read where it is used when compiled for the GPU.

    At 253-255 registers the values derived from the program id before the token loop
    (output rows, head masks, the staging slot) are what spilled; an opaque read of the
    special register at the point of use keeps the compiler from holding them across the loop.
    The interpreter runs no asm: there it is tl.program_id.
    """
    if NATIVE:
        if AXIS == 0:
            pid = tl.inline_asm_elementwise("mov.u32 $0, %ctaid.x;", "=r", [], dtype=tl.int32,
                                            is_pure=False, pack=1)
        else:
            pid = tl.inline_asm_elementwise("mov.u32 $0, %ctaid.y;", "=r", [], dtype=tl.int32,
                                            is_pure=False, pack=1)
    else:
        pid = tl.program_id(AXIS)
    return pid


@triton.jit
def _stage_rows(c_ptr, r_ptr, sc_ptr, table_ptr, q_req_ptr, tok_ptr, slot, t, head_progs, stride_tr,
                stride_it, c0, n_rows, hi, ROW_C: tl.constexpr, ROW_R: tl.constexpr, ROW_S: tl.constexpr,
                DL: tl.constexpr, DR: tl.constexpr, PAGE_SIZE: tl.constexpr, SPARSE: tl.constexpr,
                QBLOCK: tl.constexpr, DQ_ROWS: tl.constexpr, NATIVE: tl.constexpr, STAGE_ROWS: tl.constexpr):
    """Rows c0 .. c0+n_rows of the query's selection (of rows < hi), dequantised into
    slot[0 .. n_rows) as [latent | rope] in the slot's dtype (bf16 on the GPU, fp32 under the
    interpreter)."""
    ROW: tl.constexpr = DL + DR
    ty = slot.dtype.element_ty
    offs_d = tl.arange(0, DQ_ROWS)
    offs_q = tl.arange(0, QBLOCK)
    offs_r = tl.arange(0, DR)
    for d0 in range(0, n_rows, DQ_ROWS):
        offs_n = c0 + d0 + offs_d
        valid = d0 + offs_d < n_rows
        if SPARSE:
            tok = tl.load(tok_ptr + t * stride_it + offs_n, mask=valid, other=0).to(tl.int64)
        else:
            # the request row is loaded here, not kept from before the loop (a register less)
            req = tl.load(q_req_ptr + _block_id(0, NATIVE) // head_progs).to(tl.int64)
            page = tl.load(table_ptr + req * stride_tr + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
            tok = page * PAGE_SIZE + offs_n % PAGE_SIZE
        c_row = (c_ptr + tok * ROW_C)[:, None]
        s_row = sc_ptr + tok * ROW_S
        if NATIVE and SPARSE:
            # The same rows of the next chunk into L2 (8 addresses hit the up to 7 lines of 128 B
            # a 656 B row touches),
            # so that chunk's loads wait on L2, not HBM: the conversion loop is not pipelined.
            nxt = offs_n + STAGE_ROWS
            nv = nxt < hi
            tok2 = tl.load(tok_ptr + t * stride_it + nxt, mask=nv, other=0).to(tl.int64)
            lines = tl.minimum(tl.arange(0, 8) * 128, ROW_C - 1)
            addr = tl.where(nv[:, None], (c_ptr + tok2 * ROW_C)[:, None] + lines[None, :], c_ptr)
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [addr],
                                      dtype=tl.int32, is_pure=False, pack=1)
        dst = slot + (d0 + offs_d)[:, None] * ROW
        for b in tl.static_range(DL // QBLOCK):          # one fp32 scale per row and 128-column block
            c = tl.load(c_row + b * QBLOCK + offs_q[None, :], mask=valid[:, None], other=0.0)
            sc = tl.load(s_row + b, mask=valid, other=0.0)
            tl.store(dst + b * QBLOCK + offs_q[None, :], (c.to(tl.float32) * sc[:, None]).to(ty),
                     mask=valid[:, None])
        r = tl.load((r_ptr + tok * ROW_R)[:, None] + offs_r[None, :], mask=valid[:, None], other=0.0)
        tl.store(dst + DL + offs_r[None, :], r.to(ty), mask=valid[:, None])


@triton.jit
def mla_attn_fp8_staged_kernel(
    # pointers
    qn_ptr, qp_ptr, c_ptr, r_ptr, sc_ptr, table_ptr, q_req_ptr, tok_ptr, count_ptr, out_ptr, lse_ptr, stage_ptr,
    # sizes / scalars
    H, sm_scale,
    # strides (elements of each pointer's own type)
    stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_tr, stride_it, stride_ot, stride_oh, stride_os,
    stride_lt, stride_lh,
    # constexpr (as mla_attn_kernel; STAGE_ROWS rows are dequantised per chunk, DQ_ROWS at a time)
    ROW_C: tl.constexpr, ROW_R: tl.constexpr, ROW_S: tl.constexpr,
    DL: tl.constexpr, DR: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, SPARSE: tl.constexpr,
    QBLOCK: tl.constexpr, DOT_F32: tl.constexpr, NUM_STAGES: tl.constexpr, ACC_SPLIT: tl.constexpr,
    STAGE_ROWS: tl.constexpr, DQ_ROWS: tl.constexpr, NATIVE: tl.constexpr,
):
    """One program: one query, BLOCK_H (64) heads, one of NUM_SPLITS token slices, fp8 KV.

    Per chunk of STAGE_ROWS selected rows: dequantise them once into this program's staging
    slot (stage_ptr + slot * STAGE_ROWS * (DL + DR)), barrier, then the online-softmax loop of
    mla_attn_kernel over the slot with pipelined loads (ACC_SPLIT 4: four [64, DL/4]
    accumulator quarters, Hopper; 1: one accumulator, Blackwell), barrier. The barriers are
    __syncthreads, which orders a CTA's global writes before its later reads.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    QW: tl.constexpr = DL // ACC_SPLIT
    ROW: tl.constexpr = DL + DR
    t, offs_h, hmask, q0, q1, q2, q3, qp, acc0, acc1, acc2, acc3 = program_queries(
        qn_ptr, qp_ptr, H, stride_qnt, stride_qnh, stride_qpt, stride_qph, BLOCK_H, QW, DR, ACC_SPLIT, DOT_F32)
    head_progs = tl.cdiv(H, BLOCK_H)
    offs_w = tl.arange(0, QW)
    offs_r = tl.arange(0, DR)
    lo, hi, m, l_sum = split_state(count_ptr, t, NUM_SPLITS, BLOCK_N, BLOCK_H)
    qk_scale = sm_scale * LOG2E
    for c0 in range(lo, hi, STAGE_ROWS):
        n_rows = tl.minimum(hi - c0, STAGE_ROWS)
        slot_id = _block_id(0, NATIVE) * NUM_SPLITS + _block_id(1, NATIVE)
        slot = stage_ptr + slot_id.to(tl.int64) * (STAGE_ROWS * ROW)
        tl.debug_barrier()                       # every warp is done reading the previous chunk
        _stage_rows(c_ptr, r_ptr, sc_ptr, table_ptr, q_req_ptr, tok_ptr, slot, t, head_progs, stride_tr,
                    stride_it, c0, n_rows, hi, ROW_C, ROW_R, ROW_S, DL, DR, PAGE_SIZE, SPARSE, QBLOCK, DQ_ROWS,
                    NATIVE, STAGE_ROWS)
        tl.debug_barrier()                       # the chunk's rows are in the slot for every warp
        for n0 in tl.range(0, n_rows, BLOCK_N, num_stages=NUM_STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < n_rows
            row = slot + offs_n[:, None] * ROW
            r = tl.load(row + DL + offs_r[None, :], mask=valid[:, None], other=0.0)
            c0_ = tl.load(row + offs_w[None, :], mask=valid[:, None], other=0.0)        # [BN, QW]
            if DOT_F32:
                r, c0_ = r.to(tl.float32), c0_.to(tl.float32)
            s = tl.dot(qp, tl.trans(r)) + tl.dot(q0, tl.trans(c0_))                    # [BH, BN] fp32
            if ACC_SPLIT == 4:
                c1_ = tl.load(row + QW + offs_w[None, :], mask=valid[:, None], other=0.0)
                c2_ = tl.load(row + 2 * QW + offs_w[None, :], mask=valid[:, None], other=0.0)
                c3_ = tl.load(row + 3 * QW + offs_w[None, :], mask=valid[:, None], other=0.0)
                if DOT_F32:
                    c1_, c2_, c3_ = c1_.to(tl.float32), c2_.to(tl.float32), c3_.to(tl.float32)
                s += tl.dot(q1, tl.trans(c1_)) + tl.dot(q2, tl.trans(c2_)) + tl.dot(q3, tl.trans(c3_))
            if ACC_SPLIT == 4:
                m, l_sum, acc0, acc1, acc2, acc3 = softmax_step(s, valid, qk_scale, m, l_sum, acc0, acc1, acc2,
                                                                 acc3, c0_, c1_, c2_, c3_, ACC_SPLIT)
            else:
                m, l_sum, acc0, _, _, _ = softmax_step(s, valid, qk_scale, m, l_sum, acc0, acc0, acc0, acc0,
                                                        c0_, c0_, c0_, c0_, ACC_SPLIT)
    pid0 = _block_id(0, NATIVE)                   # re-read: see _block_id
    t = (pid0 // head_progs).to(tl.int64)
    offs_h = (pid0 % head_progs) * BLOCK_H + tl.arange(0, BLOCK_H)
    if ACC_SPLIT == 4:
        store_out(out_ptr, lse_ptr, t, offs_h, offs_h < H, _block_id(1, NATIVE), stride_ot, stride_oh, stride_os,
                   stride_lt, stride_lh, m, l_sum, acc0, acc1, acc2, acc3, QW, ACC_SPLIT)
    else:
        store_out(out_ptr, lse_ptr, t, offs_h, offs_h < H, _block_id(1, NATIVE), stride_ot, stride_oh, stride_os,
                   stride_lt, stride_lh, m, l_sum, acc0, acc0, acc0, acc0, QW, ACC_SPLIT)
