"""The cases of the kernel benchmark: each kernel at its shapes beside a vectorised torch version.

Each `bench_*(spec, device, run_kernels, timer)` returns result rows; bench.py runs them one
case at a time. Work lists, query tiles and page tables are built before any timing.
"""
from __future__ import annotations

import math

import torch

from .bench_timing import rotations as _rotations, row as _row
from .common import dequantize_kv_fp8, indexer_fp8_layout, indexer_views, kv_bf16_layout, quantize_kv_fp8
from .indexer import indexer_scores, query_tiles, select_topk
from .paged_copy import gather_pages, page_work_list, scatter_pages
from .sparse_mla import dense_mla_attention, sparse_mla_attention
from .topk import COOP_MIN_LEN, radix_topk

IDX_H, IDX_D, DL, DR, HEADS, PAGE = 32, 128, 512, 64, 64, 64


def _table(B: int, ctx: int, dev: str, spare: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random distinct pages for B requests of ctx tokens (last page partial when ctx % PAGE)."""
    per = math.ceil(ctx / PAGE)
    num_pages = B * per + spare
    table = torch.randperm(num_pages, device=dev)[: B * per].view(B, per).int()
    return table, torch.full((B,), ctx, dtype=torch.int32, device=dev), num_pages


# ---- vectorised torch versions of the same ops (the speed baselines) -------------------


def _torch_gather(u8: torch.Tensor, layout, tok: tuple[torch.Tensor, torch.Tensor],
                  layers: range) -> torch.Tensor:
    S, parts = layout.page_size, []
    for i, w in enumerate(layout.plane_bytes):
        off = layout.plane_offset(i)
        plane = u8[layers.start: layers.stop, :, off: off + S * w].unflatten(-1, (S, w))  # [nL, P, S, w]
        parts.append(plane[:, tok[0], tok[1]])                                     # [nL, T, w]
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _torch_scatter(buf: torch.Tensor, u8: torch.Tensor, layout, tok: tuple[torch.Tensor, torch.Tensor],
                   layers: range) -> None:
    S = layout.page_size
    for i, w in enumerate(layout.plane_bytes):
        off, col = layout.plane_offset(i), layout.column_offset(i)
        plane = u8[layers.start: layers.stop, :, off: off + S * w].unflatten(-1, (S, w))  # [nL, P, S, w]
        plane[:, tok[0], tok[1]] = buf[..., col: col + w]


def _tok_pages(table: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(int(lens.max()), device=table.device)
    valid = pos[None, :] < lens[:, None].long()                                    # [B, max_len]
    return table[:, pos // PAGE].long()[valid], (pos % PAGE).expand_as(valid)[valid]


def _torch_indexer(q, w, cache, table, q_len, max_len) -> torch.Tensor:
    keys, scales = indexer_views(cache, PAGE, IDX_D)
    pos = torch.arange(max_len, device=q.device)
    pages = table[:, pos // PAGE].long()                                           # [B, N]
    k = keys[pages, pos % PAGE].to(torch.bfloat16)                                # [B, N, D]
    s = torch.einsum("bhd,bnd->bhn", q, k).float().relu_()                        # [B, H, N]
    s = torch.einsum("bhn,bh->bn", s, w) * scales[pages, pos % PAGE, 0]
    return s.masked_fill_(pos[None, :] >= q_len[:, None], float("-inf"))


def _torch_mla(qn, qp, kv, table, pos, scale) -> torch.Tensor:
    rows = kv[table.gather(1, pos // PAGE).long(), pos % PAGE]                    # [B, K, DL + DR]
    if rows.dtype == torch.uint8:                                                 # fp8 layout rows
        rows = torch.cat(dequantize_kv_fp8(rows, DL), dim=-1).to(qn.dtype)
    s = (torch.einsum("bhd,bkd->bhk", qn, rows[..., :DL]) +
         torch.einsum("bhd,bkd->bhk", qp, rows[..., DL:])).float() * scale
    return torch.einsum("bhk,bkd->bhd", torch.softmax(s, -1).to(rows.dtype), rows[..., :DL])


# ---- cases -----------------------------------------------------------------------------


def bench_copy(spec, dev, run_kernels, timer) -> list[dict]:
    """Paged gather and scatter of the KV and indexer layouts vs advanced indexing."""
    rows = []
    for B, ctx, n_layers in spec["copy"]:
        for layout in (kv_bf16_layout(PAGE), indexer_fp8_layout(PAGE)):
            table, lens, num_pages = _table(B, ctx, dev)
            pool = torch.randint(0, 256, (n_layers, num_pages, layout.page_bytes), dtype=torch.uint8, device=dev)
            work = page_work_list(table, lens, PAGE, num_pages)
            buf = torch.empty(n_layers, B * ctx, layout.token_bytes, dtype=torch.uint8, device=dev)
            moved = 2.0 * buf.numel()
            tok = _tok_pages(table, lens)
            shape = dict(layout=layout.name, requests=B, ctx=ctx, layers=n_layers)
            t_torch = timer(lambda: _torch_gather(pool, layout, tok, range(n_layers)), [()])
            g = s = diff = None
            if run_kernels:
                g = timer(lambda: gather_pages(pool, layout, table, lens, out=buf, work=work), [()])
                s = timer(lambda: scatter_pages(buf, pool, layout, table, lens, work=work), [()])
                diff = 0.0 if torch.equal(buf, _torch_gather(pool, layout, tok, range(n_layers))) else float("inf")
            rows.append(_row("paged_copy.gather", shape, g, moved, 0, t_torch, diff))
            t_scatter = timer(lambda: _torch_scatter(buf, pool, layout, tok, range(n_layers)), [()])
            rows.append(_row("paged_copy.scatter", shape, s, moved, 0, t_scatter))
            del pool, buf
    return rows


def bench_indexer(spec, dev, run_kernels, timer) -> list[dict]:
    """Indexer scores (decode, prefill) vs a batched einsum, Triton radix top-k vs torch.topk."""
    rows = []
    layout = indexer_fp8_layout(PAGE)
    for mode in ("idx_decode", "idx_prefill"):
        for T, ctx in spec[mode]:
            B = T if mode == "idx_decode" else 1
            table, lens, num_pages = _table(B, ctx, dev)
            cache = torch.randint(0, 120, (num_pages, layout.page_bytes), dtype=torch.uint8, device=dev)
            cache.view(torch.float32)[:, PAGE * IDX_D // 4:] = 0.01                # sane scales
            if mode == "idx_decode":
                q_req, q_len = torch.arange(B, dtype=torch.int32, device=dev), lens
            else:                                  # the last T queries of one request, causal
                q_req = torch.zeros(T, dtype=torch.int32, device=dev)
                q_len = torch.arange(ctx - T + 1, ctx + 1, dtype=torch.int32, device=dev)
            ws = T * IDX_H * IDX_D * 2 + T * 4 * IDX_H
            n_rot = _rotations(ws + B * ctx * 132, dev)
            ins = [((torch.randn(T, IDX_H, IDX_D, device=dev) / 8).to(torch.bfloat16),
                    torch.rand(T, IDX_H, device=dev)) for _ in range(n_rot)]
            out = torch.empty(T, ctx, dtype=torch.float32, device=dev)
            keys = float(q_len.sum())
            nbytes = keys * 132 + T * ctx * 4 + ws
            flops = 2.0 * IDX_H * IDX_D * keys
            shape = dict(queries=T, ctx=ctx, heads=IDX_H, dim=IDX_D)
            t_torch = ms = diff = None
            torch_bytes = T * ctx * (IDX_H * 4 + IDX_D * 2)              # its [B, H, N] and [B, N, D]
            with_torch = mode == "idx_decode" and torch_bytes < (8 << 30 if dev == "cuda" else 1 << 28)
            if with_torch:
                t_torch = timer(lambda q, w: _torch_indexer(q, w, cache, table, q_len, ctx), ins)
            if run_kernels:
                block_m = 1 if mode == "idx_decode" else 4
                tiles = query_tiles(q_req, block_m)                      # built once, outside the timing
                ms = timer(lambda q, w: indexer_scores(q, w, cache, table, q_req, q_len, PAGE, ctx, out=out,
                                                       block_m=block_m, tiles=tiles), ins)
            if run_kernels and with_torch:
                got = indexer_scores(q_req=q_req, q_len=q_len, q=ins[0][0], weights=ins[0][1], cache=cache,
                                     page_table=table, page_size=PAGE, max_len=ctx, block_m=1)
                want = _torch_indexer(*ins[0], cache, table, q_len, ctx)
                fin = torch.isfinite(want)
                diff = float((got[fin] - want[fin]).abs().max()) if fin.any() else 0.0
            rows.append(_row(f"indexer.scores.{mode.split('_')[1]}", shape, ms, nbytes, flops, t_torch, diff))
            del cache, out
    for B, ctx, k in spec["topk"]:
        scores = torch.randn(B, ctx, device=dev)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        t_torch = timer(lambda: select_topk(scores, lens, k), [()])
        rows.append(_row("indexer.topk.torch", dict(rows=B, ctx=ctx, k=k), t_torch, B * ctx * 4.0, 0, None))
        ms = diff = None
        if run_kernels:
            ms = timer(lambda: radix_topk(scores, lens, k), [()])
            same = torch.equal(radix_topk(scores, lens, k)[0].sort(1).values,
                               select_topk(scores, lens, k)[0].sort(1).values)
            diff = 0.0 if same else float("inf")
        reads = 2 if ctx > COOP_MIN_LEN else 4                   # cooperative: histogram + compaction
        rows.append(_row("indexer.topk.triton_radix", dict(rows=B, ctx=ctx, k=k), ms, B * ctx * 4.0 * reads, 0,
                         t_torch, diff))
    return rows


def bench_mla(spec, dev, run_kernels, timer) -> list[dict]:
    """Sparse (bf16 and fp8 KV) and dense MLA decode vs a gathered-rows einsum attention."""
    rows = []
    scale = 192 ** -0.5
    cases_by_kind = (("sparse", spec["sparse"]), ("sparse_fp8", spec["sparse_fp8"]),
                     ("dense", [(B, c, c) for B, c in spec["dense"]]))
    for name, cases in cases_by_kind:
        for B, ctx, k in cases:
            table, lens, num_pages = _table(B, ctx, dev)
            kv = torch.randn(num_pages, PAGE, DL + DR, device=dev, dtype=torch.bfloat16)
            if name == "sparse_fp8":
                kv = quantize_kv_fp8(kv[..., :DL], kv[..., DL:])                 # [P, S, 656] uint8
            H = HEADS if dev == "cuda" else 16
            q_req = torch.arange(B, dtype=torch.int32, device=dev)
            counts = torch.full((B,), k, dtype=torch.int32, device=dev)
            ws = B * k * kv.shape[-1] * kv.element_size() + B * H * (DL + DR) * 2 * 2
            n_rot = _rotations(ws, dev)
            ins = []
            for _ in range(n_rot):
                pos = (torch.rand(B, ctx, device=dev).argsort(1)[:, :k] if name.startswith("sparse")
                       else torch.arange(k, device=dev).expand(B, k)).int().contiguous()
                ins.append((torch.randn(B, H, DL, device=dev, dtype=torch.bfloat16),
                            torch.randn(B, H, DR, device=dev, dtype=torch.bfloat16), pos))
            nbytes = ws
            flops = 2.0 * B * H * k * (DL + DR + DL)
            # flash-decoding splits so that small batches still fill ~2 waves of 132 SMs
            splits = None               # the launcher's choice: enough splits to fill the SMs

            def torch_fn(qn, qp, pos):
                return _torch_mla(qn, qp, kv, table, pos.long(), scale)

            def kernel_fn(qn, qp, pos, block_h=None):
                if name.startswith("sparse"):
                    return sparse_mla_attention(qn, qp, kv, table, q_req, pos, counts, scale,
                                                num_splits=splits, block_h=block_h)[0]
                return dense_mla_attention(qn, qp, kv, table, q_req, lens, scale, num_splits=splits,
                                           block_h=block_h)[0]

            t_torch = timer(torch_fn, ins)
            # heads per program is untuned: the plain sparse rows sweep it; the fp8 rows compare
            # the staged 64-head program (Hopper's default) with 4 x 16-head programs
            sweep = dict(sparse=spec["mla_block_h"], sparse_fp8=spec.get("mla_fp8_block_h", [None]))
            for block_h in sweep.get(name, (None,)):
                ms = diff = None
                if run_kernels:
                    ms = timer(lambda qn, qp, pos: kernel_fn(qn, qp, pos, block_h), ins)
                    diff = float((kernel_fn(*ins[0], block_h).float() - torch_fn(*ins[0]).float()).abs().max())
                shape = dict(batch=B, heads=H, ctx=ctx, tokens_attended=k, splits="auto", block_h=block_h or "auto")
                rows.append(_row(f"mla.{name}.decode", shape, ms, nbytes, flops, t_torch, diff))
            del kv
    return rows
