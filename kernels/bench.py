"""Benchmark of the DSA kernels against vectorised torch versions of the same ops.

GPU: device-event timing, median of many runs after warm-up, inputs rotated so small
working sets do not sit in L2; achieved GB/s and TFLOP/s are reported against this
GPU's ceilings measured in the same run (a 1 GiB device-to-device copy, an 8192^3 bf16
matmul). CPU: tiny shapes only, so the CLI works anywhere; kernels are timed only under
the Triton interpreter (meaningless numbers, a smoke test) and the result says so.
Run: `python -m kvproof.kernels.bench [--quick]`.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from typing import Callable

import torch

from .common import dequantize_kv_fp8, indexer_fp8_layout, indexer_views, kv_bf16_layout, quantize_kv_fp8
from .indexer import indexer_scores, indexer_scores_kernel, query_tiles, select_topk
from .paged_copy import gather_pages, page_work_list, scatter_pages
from .sparse_mla import dense_mla_attention, sparse_mla_attention
from .topk import radix_topk

H100_HBM_GBPS = 2950.0       # H100 HBM3 ceiling measured once (read + write); CPU runs report against it
H100_BF16_TFLOPS = 767.0     # H100 dense bf16 tensor-core ceiling measured once
L2_BYTES = 50 << 20
IDX_H, IDX_D, DL, DR, HEADS, PAGE = 32, 128, 512, 64, 64, 64

# Shapes per mode. ctx: tokens per request; B: requests (decode queries).
SHAPES = {
    "cpu": dict(copy=[(2, 40, 2)], idx_decode=[(2, 150)], idx_prefill=[(8, 150)],
                topk=[(2, 300, 16)], sparse=[(2, 300, 16)], sparse_fp8=[(2, 300, 16)], dense=[(2, 100)],
                mla_block_h=[None], reps=2, warmup=1),
    "quick": dict(copy=[(8, 16_384, 1)], idx_decode=[(64, 8_192), (64, 32_768)],
                  idx_prefill=[(1_024, 32_768)], topk=[(64, 32_768, 2048)],
                  sparse=[(4, 32_768, 2048), (64, 32_768, 2048)], sparse_fp8=[(64, 32_768, 2048)],
                  dense=[(64, 2_048)], mla_block_h=[None], reps=10, warmup=3),
    "full": dict(copy=[(8, 16_384, 1), (8, 16_384, 8), (32, 4_000, 78)],
                 idx_decode=[(64, 8_192), (64, 32_768), (128, 32_768), (64, 131_072), (128, 131_072)],
                 idx_prefill=[(2_048, 32_768), (4_096, 131_072)],
                 topk=[(64, 32_768, 2048), (128, 131_072, 2048)],
                 sparse=[(4, 32_768, 2048), (64, 32_768, 2048), (128, 32_768, 2048), (64, 131_072, 2048)],
                 sparse_fp8=[(64, 32_768, 2048), (128, 32_768, 2048)],
                 dense=[(64, 2_048), (64, 8_192)], mla_block_h=[None, 16, 64], reps=50, warmup=5),
}


_FLUSH: list[torch.Tensor] = []


def _flush_l2() -> None:
    """Overwrite 2x L2 so the next timed call starts cold (outside the timed events)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(2 * L2_BYTES // 4, dtype=torch.int32, device="cuda"))
    _FLUSH[0].zero_()


def _median_ms(fn: Callable, inputs: list[tuple], device: str, warmup: int, reps: int) -> float:
    """Median time of fn(*inputs[i % len]) in ms; on CUDA device events around the call only,
    L2 flushed before each call and no host sync between them (work lists are built before)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    if device == "cuda":
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (a, b) in enumerate(ev):
            _flush_l2()
            a.record()
            fn(*inputs[i % len(inputs)])
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in ev)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(*inputs[i % len(inputs)])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(reps: int = 20) -> dict:
    """This GPU's ceilings, measured in this run: a 1 GiB device-to-device copy (bytes read + written)
    and an 8192^3 bf16 matrix product on random data; device events, median after warm-up."""
    src = torch.randint(0, 256, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), [()], "cuda", 3, reps)
    del src, dst
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = _median_ms(lambda: a @ b, [()], "cuda", 3, max(5, reps // 2))
    return dict(hbm_gbps=2 * (1 << 30) / copy_ms / 1e6, bf16_tflops=2 * 8192 ** 3 / mm_ms / 1e9,
                gpu=torch.cuda.get_device_name(), source="measured in this run")


def _rotations(working_set: int, device: str) -> int:
    """Copies of the inputs needed so consecutive runs do not hit in L2."""
    return 1 if device != "cuda" else max(1, min(8, math.ceil(4 * L2_BYTES / max(working_set, 1))))


def _row(name: str, shape: dict, ms: float | None, nbytes: float, flops: float,
         torch_ms: float | None, diff: float | None = None) -> dict:
    row = dict(kernel=name, shape=shape, ms=ms, torch_ms=torch_ms, bytes=int(nbytes), flops=int(flops),
               max_abs_diff_vs_torch=diff)
    if ms:
        row["gbps"] = nbytes / ms / 1e6
        row["tflops"] = flops / ms / 1e9
    if ms and torch_ms:
        row["speedup_vs_torch"] = torch_ms / ms
    return row


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


def _bench_copy(spec, dev, run_kernels, timer) -> list[dict]:
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


def _bench_indexer(spec, dev, run_kernels, timer) -> list[dict]:
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
        rows.append(_row("indexer.topk.triton_radix", dict(rows=B, ctx=ctx, k=k), ms, B * ctx * 4.0 * 5, 0,
                         t_torch, diff))
    return rows


def _bench_mla(spec, dev, run_kernels, timer) -> list[dict]:
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
            # heads per program is untuned: the plain sparse rows sweep it
            for block_h in spec["mla_block_h"] if name == "sparse" else (None,):
                ms = diff = None
                if run_kernels:
                    ms = timer(lambda qn, qp, pos: kernel_fn(qn, qp, pos, block_h), ins)
                    diff = float((kernel_fn(*ins[0], block_h).float() - torch_fn(*ins[0]).float()).abs().max())
                shape = dict(batch=B, heads=H, ctx=ctx, tokens_attended=k, splits="auto", block_h=block_h or "auto")
                rows.append(_row(f"mla.{name}.decode", shape, ms, nbytes, flops, t_torch, diff))
            del kv
    return rows


def bench_kernels(quick: bool = False, device: str | None = None, out_path: str | None = None) -> dict:
    """Time every kernel and its torch counterpart; a JSON-able dict of rows and notes.

    With out_path the JSON is rewritten there after every case (complete=False until the end).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    assert device in ("cuda", "cpu"), f"device must be 'cuda' or 'cpu', got {device!r}"
    assert device == "cpu" or torch.cuda.is_available(), "device 'cuda' requested but CUDA is not available"
    interpreted = type(indexer_scores_kernel).__name__ == "InterpretedFunction"
    run_kernels = device == "cuda" or interpreted
    mode = "cpu" if device == "cpu" else ("quick" if quick else "full")
    spec = SHAPES[mode]
    notes = []
    if device == "cpu":
        notes.append("cpu: tiny shapes only; GB/s and TFLOP/s are not meaningful here and the "
                     "ceilings are the H100's")
        notes.append("kernels timed under the Triton interpreter (a smoke test, not a measurement)"
                     if interpreted else "kernels not run: Triton needs CUDA or TRITON_INTERPRET=1; "
                     "only the torch versions were timed")
    torch.manual_seed(0)
    ceilings = measure_ceilings() if device == "cuda" else dict(
        hbm_gbps=H100_HBM_GBPS, bf16_tflops=H100_BF16_TFLOPS, gpu="H100", source="measured once, not here")

    def timer(fn, inputs):
        return _median_ms(fn, inputs, device, spec["warmup"], spec["reps"])

    header = dict(device=device, device_name="cpu" if device == "cpu" else torch.cuda.get_device_name(),
                  mode=mode, kernels_run=run_kernels, interpreter=interpreted, ceilings=ceilings)

    rows: list[dict] = []
    groups = (("copy", _bench_copy), ("idx_decode", _bench_indexer), ("idx_prefill", _bench_indexer),
              ("topk", _bench_indexer), ("sparse", _bench_mla), ("sparse_fp8", _bench_mla), ("dense", _bench_mla))
    empty = {k: [] for k, _ in groups}
    with torch.no_grad():
        for key, fn in groups:
            for case in spec[key]:
                # Each case alone: a failing one is reported as a row and the others still run.
                try:
                    new_rows = fn({**spec, **empty, key: [case]}, device, run_kernels, timer)
                except Exception as e:              # noqa: BLE001 (reported in the JSON, not hidden)
                    new_rows = [dict(kernel=key, shape=list(case), ms=None, torch_ms=None,
                                     error=f"{type(e).__name__}: {str(e)[:500]}")]
                    if device == "cuda":
                        torch.cuda.empty_cache()
                for row in new_rows:
                    if row.get("ms"):
                        row["pct_hbm_ceiling"] = 100 * row["gbps"] / ceilings["hbm_gbps"]
                        row["pct_bf16_ceiling"] = 100 * row["tflops"] / ceilings["bf16_tflops"]
                rows += new_rows
                if out_path:                        # the file holds every row completed so far
                    _write(out_path, header, rows, notes)
    if out_path:
        _write(out_path, header, rows, notes, complete=True)
    return dict(header, rows=rows, notes=notes, complete=True)


def _write(path: str, header: dict, rows: list[dict], notes: list[str], complete: bool = False) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(header, rows=rows, notes=notes, complete=complete), f, indent=1, default=str)
    import os
    os.replace(tmp, path)


if __name__ == "__main__":
    print(json.dumps(bench_kernels(quick="--quick" in sys.argv), indent=2))
