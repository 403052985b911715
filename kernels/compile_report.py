"""Every kernel in every configuration its launcher can choose, compiled for sm_90 (and sm_100).

`compile_report()` runs each launcher on `meta` tensors at the production shapes (indexer
32 and 64 heads x 128 fp8 keys, top-k 2048; MLA 512 + 64 latent, 16-128 heads, bf16 and fp8
KV; paged copy of the three layouts) and at the small shapes the tests use, records the
launches, compiles each distinct one on the CPU and reports registers, spills, shared memory
and the tensor-core instructions of its SASS. Run: `kvproof bench kernels --compile-report
--json` or `python -m kvproof.kernels.compile_report`. Under TRITON_INTERPRET=1 the kernels
are interpreted objects, so the report runs itself in a subprocess without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable
from unittest import mock

import torch

from .compile_target import Launch, compile_launch, recording

KERNELS = {
    "kvproof.kernels.indexer": ["indexer_scores_kernel"],
    "kvproof.kernels.topk": ["_radix_topk_kernel", "_topk_hist_kernel", "_topk_compact_kernel",
                             "_topk_select_kernel"],
    "kvproof.kernels.sparse_mla": ["mla_attn_kernel", "mla_attn_fp8_staged_kernel", "mla_combine_kernel"],
    "kvproof.kernels.paged_copy": ["_paged_copy_kernel"],
}
META = torch.device("meta")


def _i32(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.int32, device=META)


def _indexer_cases() -> list[tuple[str, bool, Callable[[], None]]]:
    from . import indexer
    from .common import indexer_fp8_layout
    cases = []
    for H in (32, 64):
        for dt, dname in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32"),
                          (torch.float8_e4m3fn, "fp8")):
            for block_m in (1, 4):
                T, P, page = 64, 4096, 64

                def run(H=H, dt=dt, block_m=block_m, T=T, P=P, page=page) -> None:
                    fp8 = dt == torch.float8_e4m3fn             # q_fp8=True: the launcher quantises q
                    q = torch.empty(T, H, 128, dtype=torch.bfloat16 if fp8 else dt, device=META)
                    w = torch.empty(T, H, dtype=torch.float32, device=META)
                    cache = torch.empty(P, indexer_fp8_layout(page).page_bytes, dtype=torch.uint8, device=META)
                    with mock.patch.object(indexer, "query_tiles", lambda q_req, bm: (_i32(T), _i32(T))):
                        indexer.indexer_scores(q, w, cache, _i32(T, 512), _i32(T), _i32(T), page, 32_768,
                                               out=torch.empty(T, 32_768, device=META), block_m=block_m,
                                               q_fp8=fp8)
                name = f"indexer H={H} D=128 q={dname} block_m={block_m}"
                # defaults: bf16 q below 64 heads, fp8 q from 64 heads (the launcher's choice on CUDA)
                cases.append((name, dname == ("fp8" if H >= 64 else "bf16"), run))
    return cases


def _topk_cases() -> list[tuple[str, bool, Callable[[], None]]]:
    from .topk import radix_topk
    cases = []
    for k, n in ((2048, 32_768), (16, 32_768), (2048, 4096)):   # cooperative above 8192 scores a row
        def run(k=k, n=n) -> None:
            radix_topk(torch.empty(64, n, device=META), _i32(64), k)
        cases.append((f"topk k={k} n={n}", True, run))
    return cases


def _mla_cases() -> list[tuple[str, bool, Callable[[], None]]]:
    from .sparse_mla import dense_mla_attention, sparse_mla_attention
    from .common import kv_fp8_token_bytes
    cases = []
    for kv_kind in ("bf16", "fp8"):
        for H, block_h in ((16, None), (32, None), (64, None), (128, None), (64, 16), (64, 64)):
            if block_h and kv_kind == "bf16":
                continue                    # bf16 takes 64 heads per program by default
            # fp8: block_h=16 is the 4 x 16-head layout (Blackwell's default), block_h=64 the
            # staged program (Hopper's default); each is the other architecture's alternative
            for sparse in (True, False):
                for splits in (1, 4):
                    def run(kv_kind=kv_kind, H=H, sparse=sparse, splits=splits, block_h=block_h) -> None:
                        T, P = 8, 1024
                        qn = torch.empty(T, H, 512, dtype=torch.bfloat16, device=META)
                        qp = torch.empty(T, H, 64, dtype=torch.bfloat16, device=META)
                        kv = (torch.empty(P, 64, 576, dtype=torch.bfloat16, device=META) if kv_kind == "bf16"
                              else torch.empty(P, 64, kv_fp8_token_bytes(), dtype=torch.uint8, device=META))
                        if sparse:
                            sparse_mla_attention(qn, qp, kv, _i32(T, 512), _i32(T), _i32(T, 2048), _i32(T),
                                                 0.07, num_splits=splits, block_h=block_h)
                        else:
                            dense_mla_attention(qn, qp, kv, _i32(T, 512), _i32(T), _i32(T), 0.07,
                                                num_splits=splits, block_h=block_h)
                    name = (f"mla {'sparse' if sparse else 'dense'} kv={kv_kind} H={H} splits={splits}"
                            + (f" block_h={block_h}" if block_h else ""))
                    cases.append((name, block_h is None, run))
    return cases


def _copy_cases() -> list[tuple[str, bool, Callable[[], None]]]:
    from .common import indexer_fp8_layout, kv_bf16_layout, kv_fp8_layout
    from .paged_copy import gather_pages, scatter_pages
    cases = []
    for layout in (kv_bf16_layout(), kv_fp8_layout(), indexer_fp8_layout()):
        for scatter, pages in ((False, None), (True, None), (False, 4)):
            def run(layout=layout, scatter=scatter, pages=pages) -> None:
                pool = torch.empty(4, 256, layout.page_bytes, dtype=torch.uint8, device=META)
                work = (_i32(64), _i32(64), _i32(64))
                buf = torch.empty(4, 64 * 64, layout.token_bytes, dtype=torch.uint8, device=META)
                lens, table = _i32(8), _i32(8, 8)
                if scatter:
                    scatter_pages(buf, pool, layout, table, lens, work=work, pages_per_prog=pages)
                else:
                    gather_pages(pool, layout, table, lens, out=buf, work=work, pages_per_prog=pages)
            name = (f"paged_copy {'scatter' if scatter else 'gather'} {layout.name}"
                    + (f" pages={pages}" if pages else ""))
            cases.append((name, pages is None, run))
    return cases


def launch_matrix(arch: int = 90) -> list[tuple[str, bool, Launch]]:
    """(configuration name, is a default configuration, recorded launch) for every kernel launch,
    as the launchers configure them for sm_<arch>."""
    out = []
    for group in (_indexer_cases, _topk_cases, _mla_cases, _copy_cases):
        for name, default, run in group():
            with recording(KERNELS) as sink, mock.patch("kvproof.kernels.sparse_mla.target_arch",
                                                       lambda device: arch):
                run()
            assert sink, f"{name}: the launcher launched nothing"
            for launch in sink:
                out.append((f"{name} :: {launch.kernel.__name__}", default, launch))
    return out


def _key(launch: Launch) -> str:
    from .compile_target import source_of
    return source_of(launch, dict(DOT_F32=False) if "DOT_F32" in launch.args else None).hash() \
        + repr(sorted(launch.options.items()))


def compile_report(archs: tuple[int, ...] = (90, 100), scope: str = "full") -> dict[str, Any]:
    """Compile the launch matrix for each arch; one row per (configuration, arch).

    scope "full": every configuration on every arch (the bench report). "ci": the default
    configurations on the first arch and the production ones (indexer 64 heads, MLA 64/128
    heads, top-k 2048) on the others, to keep the test at about a minute on two cores.
    """
    assert scope in ("full", "ci"), f"scope must be 'full' or 'ci', got {scope!r}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _in_subprocess(archs, scope)
    rows, seen, t0 = [], {}, time.time()
    for j, arch in enumerate(archs):
        for name, default, launch in launch_matrix(arch):
            if scope == "ci" and not (default if j == 0 else default and _production(name)):
                continue
            # GPU launches pass DOT_F32=False (dot_in_fp32 is False on CUDA); meta tensors say True.
            over = dict(DOT_F32=False) if "DOT_F32" in launch.args else None
            key = (arch, _key(launch))
            if key not in seen:             # identical launches (same specialisation) compile once
                seen[key] = compile_launch(launch, arch, over)
            rows.append(dict(kernel=launch.kernel.__name__, config=name, arch=f"sm_{arch}", default=default,
                             **seen[key]))
    return dict(triton=__import__("triton").__version__, archs=[f"sm_{a}" for a in archs], scope=scope,
                distinct_compiles=len(seen), seconds=round(time.time() - t0, 1), rows=rows,
                summary=summarise(rows))


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Counts a reader checks first: failures, spills in defaults, dots without tensor cores."""
    ok = [r for r in rows if r["ok"]]
    return dict(
        rows=len(rows), failed=[r["config"] + " @ " + r["arch"] for r in rows if not r["ok"]],
        spills_in_defaults=[r["config"] + " @ " + r["arch"] for r in ok if r["default"] and r["spill_stores"]],
        over_shared_limit=[r["config"] + " @ " + r["arch"] for r in ok if r["shared_bytes"] > r["shared_limit"]],
        dot_without_tensor_cores=[r["config"] + " @ " + r["arch"] for r in ok
                                  if r["has_dot"] and not r["tensor_core_ops"]],
        # a kernel the compiler reduced to a trap (e.g. tensor memory over-allocated on sm_100)
        traps=[r["config"] + " @ " + r["arch"] for r in ok if r["ptx_traps"]],
        max_registers=max((r["registers"] for r in ok), default=0),
    )


def _production(name: str) -> bool:
    return "block_h=" not in name and any(s in name for s in (
        "indexer H=64 D=128 q=fp8", "mla sparse kv=bf16 H=64", "mla sparse kv=fp8 H=64", "H=128", "topk k=2048"))


def _in_subprocess(archs: tuple[int, ...], scope: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kvproof.kernels.compile_report", "--archs", ",".join(map(str, archs)),
           "--scope", scope]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"compile report subprocess failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout)


if __name__ == "__main__":
    archs = (90, 100)
    if "--archs" in sys.argv:
        archs = tuple(int(a) for a in sys.argv[sys.argv.index("--archs") + 1].split(","))
    scope = sys.argv[sys.argv.index("--scope") + 1] if "--scope" in sys.argv else "full"
    print(json.dumps(compile_report(archs, scope), indent=1))
