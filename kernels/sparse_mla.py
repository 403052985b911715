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

from .common import (FP8_BLOCK, KV_LATENT_DIM, check_int_vector, check_page_table, dequantize_kv_fp8,
                      dot_in_fp32, kv_fp8_token_bytes)
from .sparse_mla_fp8 import mla_attn_fp8_staged_kernel
from .sparse_mla_kernels import mla_attn_kernel, mla_combine_kernel

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
# launchers
# ---------------------------------------------------------------------------------


def mla_num_splits(T: int, head_programs: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """Flash-decoding splits: enough programs for one wave of the SMs, at least 8 key blocks per
    split (each split writes an fp32 [heads, 512] partial: 128 KB at 64 heads), no host sync."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = sms // max(1, T * head_programs)
    return int(max(1, min(want, max_tokens // (8 * block_n))))


# Heads per program with fp8 KV from 33 heads, {Hopper: ..., Blackwell: ...}. Hopper: 64, in
# mla_attn_fp8_staged_kernel (sparse_mla_fp8.py), each row dequantised once per query into a
# staging slot (253-255 registers, no spills; dequantising through registers inside the
# 64-head loop spills 56-70 stores). Blackwell: the staged kernel spills (36-41 stores; 1-4
# with a single loop, whose loads are then not pipelined), so 16 heads a program, 4 programs
# per 64-head query.
MLA_FP8_BLOCK_H = {False: 64, True: 16}
# Below 33 heads, and on Blackwell: mla_attn_kernel dequantising through registers, 16 heads a
# program (172-180 registers; 32 heads fall back to warp MMA with the query in registers and
# spill 6-166 stores over 4-16 warps and 16-128 rows a step).
MLA_FP8_SMALL_BLOCK_H = 16
# Rows dequantised per chunk into a 64-head fp8 program's staging slot (bf16 [rows, 576]:
# 72 KiB a program at 64 rows), and how many at a time (16 rows compile without spills).
MLA_FP8_STAGE_ROWS = 64
MLA_FP8_DQ_ROWS = 16
# Largest staging buffer a launch allocates (one slot per program: 72 KiB, so about 900
# programs, e.g. B = 450 decode queries at 2 splits); a default launch that would need more
# runs 16-head programs instead.
MLA_FP8_STAGE_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class MlaConfig:
    """Launch configuration of the MLA attention kernel: heads and tokens per program step, warps,
    accumulator split, and (fp8 KV, 64 heads: mla_attn_fp8_staged_kernel) rows staged per chunk."""

    block_h: int
    block_n: int
    num_warps: int
    acc_split: int          # 4: the latent in four column quarters (Hopper), 1: one accumulator
    stage_rows: int | None = None   # fp8 64-head programs: rows dequantised once per chunk (staged)


def target_arch(device: torch.device) -> int:
    """The CUDA architecture a launch compiles for (sm_XY as XY); 90 off the GPU (interpreter, meta)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def mla_config(H: int, DL: int, kv_fp8: bool, arch: int, block_h: int | None = None,
               block_n: int | None = None, acc_split: int | None = None,
               stage_rows: int | None = None) -> MlaConfig:
    """Default MLA launch configuration for H heads on sm_<arch> (the explicit arguments win).

    From the compile report (kvproof bench kernels --compile-report), the largest head blocks
    that compile without register spills: bf16 KV takes all heads up to 64 in one program
    (Hopper: 4 accumulator quarters, wgmma, 8 warps, 16 tokens a step, 238-250 registers;
    Blackwell: one accumulator, tcgen05, 214-236 registers; four separate quarters would
    over-allocate tensor memory and compile to a trap). fp8 KV (MLA_FP8_BLOCK_H): Hopper takes
    64 heads a program from 33 heads, staged (each row dequantised once per query,
    `stage_rows` at a time, then the same loop; 253-255 registers); Blackwell and fewer heads
    16. 128 heads are two neighbouring programs of 64 (a [128, 512] fp32 accumulator is an
    SM's whole register file).
    """
    want_h = min(64, max(16, triton.next_power_of_2(H)))
    if kv_fp8:
        want_h = MLA_FP8_BLOCK_H[arch >= 100] if want_h == 64 else MLA_FP8_SMALL_BLOCK_H
    block_h = block_h or want_h
    assert block_h in (16, 32, 64), f"block_h must be 16, 32 or 64, got {block_h}"
    wide = block_h == 64
    if kv_fp8 and wide:
        stage_rows = stage_rows or MLA_FP8_STAGE_ROWS
        assert stage_rows >= MLA_FP8_DQ_ROWS and stage_rows & (stage_rows - 1) == 0, (
            f"stage_rows must be a power of two >= {MLA_FP8_DQ_ROWS}, got {stage_rows}")
    else:
        assert stage_rows is None, "stage_rows applies to fp8 KV with 64 heads a program only"
    if acc_split is None:
        acc_split = 1 if (arch >= 100 and wide) or DL < 64 else 4
    assert acc_split in (1, 4) and DL // acc_split >= 16, (
        f"acc_split must be 1 or 4 with latent dim / acc_split >= 16, got {acc_split} for latent {DL}")
    block_n = block_n or (16 if wide else 32)
    assert block_n >= 16 and block_n & (block_n - 1) == 0, f"block_n must be a power of two >= 16, got {block_n}"
    return MlaConfig(block_h, block_n, 8 if DL >= KV_LATENT_DIM else 4, acc_split, stage_rows)


def _mla_launch(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, page_table: torch.Tensor,
                q_req: torch.Tensor, counts: torch.Tensor, sm_scale: float,
                indices: torch.Tensor | None, out: torch.Tensor | None, block_n: int | None,
                num_splits: int | None, block_h: int | None, acc_split: int | None,
                stage_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    arch = target_arch(q_nope.device)
    cfg = mla_config(H, DL, kv_fp8, arch, block_h, block_n, acc_split, stage_rows)
    S = kv.shape[1]
    max_tokens = indices.shape[1] if indices is not None else page_table.shape[1] * S
    auto_splits = num_splits is None
    splits = mla_num_splits(T, triton.cdiv(H, cfg.block_h), max_tokens, cfg.block_n, q_nope.device) \
        if auto_splits else num_splits
    if (cfg.stage_rows is not None and block_h is None
            and T * triton.cdiv(H, cfg.block_h) * splits * cfg.stage_rows * (DL + DR) * 2 > MLA_FP8_STAGE_MAX_BYTES):
        # a large batch (long prefill): 16-head programs rather than a staging buffer that grows with it
        cfg = mla_config(H, DL, kv_fp8, arch, MLA_FP8_SMALL_BLOCK_H, block_n, acc_split)
        if auto_splits:
            splits = mla_num_splits(T, triton.cdiv(H, cfg.block_h), max_tokens, cfg.block_n, q_nope.device)
    num_splits = splits
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
    args = (q_nope, q_pe, c, r, sc, page_table, q_req, tok, counts, part, plse)
    sizes_strides = (
        H, sm_scale,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        page_table.stride(0), tok.stride(0), part.stride(0), part.stride(1),
        part.stride(2) if num_splits > 1 else 0, plse.stride(0), plse.stride(1))
    consts = dict(
        ROW_C=c.stride(0), ROW_R=r.stride(0), ROW_S=sc.stride(0),
        DL=DL, DR=DR, PAGE_SIZE=S, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, NUM_SPLITS=num_splits,
        SPARSE=indices is not None, QBLOCK=FP8_BLOCK, DOT_F32=dot_in_fp32(q_nope),
        NUM_STAGES=2, ACC_SPLIT=cfg.acc_split, num_warps=cfg.num_warps)
    if cfg.stage_rows is not None:
        # One staging slot per program: [stage_rows, DL + DR], bf16 as the tensor cores take it
        # (fp32 under the interpreter, which keeps dequantised latents exact; see dot_in_fp32).
        # `meta` (the compile report) stands for the GPU.
        interpreted = q_nope.device.type == "cpu"
        stage = torch.empty(grid[0] * num_splits, cfg.stage_rows, DL + DR, device=q_nope.device,
                            dtype=torch.float32 if interpreted else torch.bfloat16)
        mla_attn_fp8_staged_kernel[grid](
            *args, stage, *sizes_strides, **consts, STAGE_ROWS=cfg.stage_rows, DQ_ROWS=MLA_FP8_DQ_ROWS,
            NATIVE=not interpreted)
    else:
        mla_attn_kernel[grid](*args, *sizes_strides, **consts, KV_FP8=kv_fp8)
    if num_splits > 1:
        mla_combine_kernel[(T, H)](
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
                         block_h: int | None = None, acc_split: int | None = None,
                         stage_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its indexer-selected tokens: (out [T, H, DL], lse [T, H])."""
    return _mla_launch(q_nope, q_pe, kv, page_table, q_req, counts, sm_scale, indices, out, block_n,
                       num_splits, block_h, acc_split, stage_rows)


def dense_mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor,
                        page_table: torch.Tensor, q_req: torch.Tensor, q_len: torch.Tensor,
                        sm_scale: float, out: torch.Tensor | None = None,
                        block_n: int | None = None, num_splits: int | None = None,
                        block_h: int | None = None, acc_split: int | None = None,
                        stage_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its first q_len cached tokens: (out [T, H, DL], lse [T, H])."""
    return _mla_launch(q_nope, q_pe, kv, page_table, q_req, q_len, sm_scale, None, out, block_n,
                       num_splits, block_h, acc_split, stage_rows)
