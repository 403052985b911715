"""Capacity and throughput model of LayerSplit for a long-context coding-agent workload.

One prefill group of R GPUs (context-parallel prefill, as in SGLang PR #29421)
serves multi-turn agent sessions. Each request of context C reuses the session's
earlier turns: a fraction ``hit_rate`` of its tokens is a prefix the cache *could*
hold (the published setting: 90 %). Whether it *does* depends on capacity:

- without LayerSplit every rank holds the KV and Indexer cache of every layer of
  every cached token (the CP ranks replicate the cache), so the group caches
  ``pool / (L * (kv + idx))`` tokens;
- with LayerSplit each rank holds 1/R of the layers, so the group caches R times
  as many tokens, less ``depth`` receive buffers of the longest context.

Sessions compete for the cache as in an LRU cache under Che's approximation
(Che et al. 2002; Fricker et al. 2012): with S active sessions of size C and
per-session turn rates lambda_i, the characteristic time T solves
``sum_i C * (1 - exp(-lambda_i T)) = capacity`` and session i hits with
``1 - exp(-lambda_i T)``. Sessions are of two kinds (agents in a tool loop come
back fast; sessions waiting on a person come back slowly), which is what makes
the hit rate fall gradually, not as a cliff, once the working set outgrows the cache.

A request's time is its prefill compute (uncached tokens x per-token cost, the
per-token cost growing with C through the indexer), plus, with LayerSplit, the
exposed communication per layer: the Indexer-cache broadcast (synchronous) and
whatever part of the KV broadcast the indexer does not hide. Misses are recomputed
(no host tier); see ``host_tier_gbps`` for the HiCache alternative.
Throughput = 1 / request time (the group prefills one request at a time; prefill
at these lengths is compute-bound). Every number is a named parameter with its source.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

LENGTHS: tuple[int, ...] = (40_000, 60_000, 80_000, 100_000, 120_000)
PUBLISHED_GAIN: dict[int, float] = {40_000: 0.10, 120_000: 1.32}    # GLM-5 post-mortem, 90 % hit rate


@dataclass(frozen=True)
class SimParams:
    """Every assumption of the model; SOURCES says where each number comes from."""

    layers: int = 78
    kv_bytes: int = 656
    idx_bytes: int = 132
    ranks: int = 8
    depth: int = 2
    hbm_bytes: float = 80e9
    weights_bytes: float = 46.5e9
    reserve_bytes: float = 10e9
    hbm_bw: float = 2.95e12
    bcast_bw: float = 350e9
    active_params: float = 40e9
    attn_heads: int = 64
    kv_latent: int = 512
    kv_rope: int = 64
    topk: int = 2048
    idx_heads: int = 32
    idx_dim: int = 128
    peak_bf16: float = 989e12
    peak_fp8: float = 1979e12
    mfu: float = 0.40
    mfu_indexer: float = 0.50
    hit_rate: float = 0.90
    sessions: float = 10.24
    fast_fraction: float = 0.5
    slow_factor: float = 10.0
    host_tier_gbps: float = 0.0


SOURCES: dict[str, str] = {
    "layers": "GLM-5 config: 78 layers (3 dense + 75 MoE)",
    "kv_bytes": "GLM-5 latent KV per token per layer in the fp8 layout (512 fp8 + 4 fp32 scales + 64 bf16 RoPE); "
                "1152 B in bf16",
    "idx_bytes": "GLM-5 Indexer cache per token per layer: 128 fp8 keys + 1 fp32 scale",
    "ranks": "one 8-GPU NVLink node as the LayerSplit / prefill-CP group (SGLang PR #29421 splits over the CP group)",
    "depth": "receive buffers per rank (double buffering, spec/layersplit_plan.py)",
    "hbm_bytes": "H100 SXM: 80 GB HBM3",
    "weights_bytes": "assumption: GLM-5 ~744B parameters in FP8 spread over a 16-GPU EP prefill instance (~46.5 GB/GPU)",
    "reserve_bytes": "assumption: activations, CUDA graphs, NCCL buffers (SGLang mem_fraction_static ~0.88 leaves ~10 GB)",
    "hbm_bw": "H100 SXM achievable HBM bandwidth ~2.95 TB/s (peak 3.35 TB/s): the memory floor of the "
              "sparse attention (top-k KV rows) and of the indexer (one cache read per 64-query tile)",
    "bcast_bw": "assumption: NCCL broadcast ~350 GB/s algorithm bandwidth on 8xH100 NVLink4 (450 GB/s per direction "
                "per GPU peak; nccl-tests reach ~350-370 GB/s bus bandwidth)",
    "active_params": "assumption: GLM-5 ~40B active parameters per token (2 FLOP per parameter per token)",
    "attn_heads": "GLM-5: 64 heads", "kv_latent": "GLM-5: KV latent 512", "kv_rope": "GLM-5: RoPE 64",
    "topk": "GLM-5 DSA: top-k 2048 tokens per query", "idx_heads": "GLM-5 indexer: 32 heads",
    "idx_dim": "GLM-5 indexer: 128 dims",
    "peak_bf16": "H100 SXM dense BF16 989 TFLOP/s", "peak_fp8": "H100 SXM dense FP8 1979 TFLOP/s",
    "mfu": "assumption: 40 % model FLOP utilisation for large-MoE prefill",
    "mfu_indexer": "assumption: 50 % of FP8 peak for the lightning indexer (a dense GEMM-like scan)",
    "hit_rate": "published setting: 90 % prefix-cache hit rate (tokens of a turn already seen in the session)",
    "sessions": "calibrated (not published): active agent sessions whose prefixes compete for one group's cache, "
                "chosen by calibrate_sessions() so that the 40k gain equals the published +10 %; the other "
                "lengths are then predictions",
    "fast_fraction": "assumption: half the sessions are in a tool loop (next turn soon)",
    "slow_factor": "assumption: the other half come back 10x less often (waiting on a person or a long tool)",
    "host_tier_gbps": "0 = misses are recomputed; > 0 = a HiCache host tier loads them at this PCIe rate per GPU "
                      "(H100 PCIe Gen5 x16 ~50 GB/s achievable), overlapped with compute",
}


def token_bytes(p: SimParams) -> float:
    """Bytes one cached token takes over all layers (KV + Indexer cache)."""
    return p.layers * (p.kv_bytes + p.idx_bytes)


def capacity_tokens(p: SimParams, layersplit: bool, context: int) -> float:
    """Tokens the group can cache: replicated per rank without LayerSplit, split by layer with it."""
    pool = p.hbm_bytes - p.weights_bytes - p.reserve_bytes
    if pool <= 0:
        raise ValueError(f"no KV pool left: hbm {p.hbm_bytes} - weights {p.weights_bytes} - reserve {p.reserve_bytes}")
    if not layersplit:
        return pool / token_bytes(p)
    staging = p.depth * context * (p.kv_bytes + p.idx_bytes)
    return p.ranks * (pool - staging) / token_bytes(p)


def che_hit_fraction(p: SimParams, capacity: float, context: int) -> float:
    """Fraction of reusable prefixes still cached (Che's approximation, two session classes)."""
    n_fast = p.sessions * p.fast_fraction
    classes = [(n_fast, 1.0), (p.sessions - n_fast, 1.0 / p.slow_factor)]      # (sessions, turn rate)
    if capacity >= p.sessions * context:
        return 1.0
    occupancy = lambda t: sum(n * context * (1 - math.exp(-rate * t)) for n, rate in classes)  # noqa: E731
    lo, hi = 0.0, 1.0
    while occupancy(hi) < capacity:
        hi *= 2
    for _ in range(100):                                    # bisection on the characteristic time
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if occupancy(mid) < capacity else (lo, mid)
    t = (lo + hi) / 2
    requests = sum(n * rate for n, rate in classes)
    return sum(n * rate * (1 - math.exp(-rate * t)) for n, rate in classes) / requests


QUERY_TILE = 64     # queries sharing one read of the Indexer cache in the indexer kernel


def indexer_seconds(p: SimParams, queries: float, context: int) -> float:
    """One GPU's lightning indexer for ``queries`` new tokens over ``context`` keys, one layer (roofline)."""
    flops = queries * context * p.idx_heads * p.idx_dim * 2
    reads = math.ceil(queries / QUERY_TILE) * context * p.idx_bytes
    return max(flops / (p.peak_fp8 * p.mfu_indexer), reads / p.hbm_bw)


def per_token_seconds(p: SimParams, context: int) -> float:
    """Group seconds per uncached token: dense/MoE + sparse attention + indexer over the context (roofline)."""
    dense = 2 * p.active_params / (p.ranks * p.peak_bf16 * p.mfu)
    attn_flops = p.layers * p.topk * p.attn_heads * 2 * (p.kv_latent + p.kv_rope + p.kv_latent)
    attn_bytes = p.layers * p.topk * p.kv_bytes                  # the top-k KV rows each query gathers
    attn = max(attn_flops / (p.ranks * p.peak_bf16 * p.mfu), attn_bytes / (p.ranks * p.hbm_bw))
    indexer = p.layers * indexer_seconds(p, QUERY_TILE, context) / (QUERY_TILE * p.ranks)
    return dense + attn + indexer


def layer_comm(p: SimParams, context: int, new_tokens: float) -> dict[str, float]:
    """Per-layer seconds on one rank: KV and Indexer-cache broadcasts vs the indexer that hides the KV one."""
    kv = context * p.kv_bytes / p.bcast_bw
    idx = context * p.idx_bytes / p.bcast_bw
    indexer = indexer_seconds(p, new_tokens / p.ranks, context)
    return {"kv_bcast_s": kv, "idx_bcast_s": idx, "indexer_s": indexer,
            "exposed_s": idx + max(0.0, kv - indexer), "hidden_fraction": min(1.0, indexer / kv) if kv else 1.0}


def simulate(context: int, layersplit: bool, params: SimParams | None = None) -> dict[str, Any]:
    """One configuration at one request length: hit rate achieved, request time, throughput."""
    p = params or SimParams()
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive int (tokens), got {context!r}")
    cap = capacity_tokens(p, layersplit, context)
    cached = che_hit_fraction(p, cap, context)
    hit = p.hit_rate * cached
    new = context * (1 - p.hit_rate)
    uncached = context * (1 - hit)
    compute = uncached * per_token_seconds(p, context)
    host = 0.0
    if p.host_tier_gbps > 0:                 # misses of reusable tokens come from host memory, not recompute
        compute = new * per_token_seconds(p, context)
        load = (context * p.hit_rate * (1 - cached)) * token_bytes(p) / (p.host_tier_gbps * 1e9)
        load /= p.ranks if layersplit else 1
        host = max(0.0, load - compute)
    comm = layer_comm(p, context, uncached)
    exposed = p.layers * comm["exposed_s"] if layersplit and p.ranks > 1 else 0.0
    t = compute + host + exposed
    return {"context": context, "layersplit": layersplit, "capacity_tokens": round(cap),
            "sessions_cached_fraction": round(cached, 4), "hit_rate_achieved": round(hit, 4),
            "uncached_tokens": round(uncached), "compute_s": compute, "host_load_exposed_s": host,
            "comm_exposed_s": exposed, "request_s": t, "throughput_rps": 1 / t,
            "kv_per_gpu_gb": round(cap * token_bytes(p) / (p.ranks if layersplit else 1) / 1e9, 2),
            "layer": comm}


def bench_layersplit(params: SimParams | None = None, lengths: tuple[int, ...] = LENGTHS) -> dict[str, Any]:
    """`kvproof bench layersplit --simulate`: throughput with and without LayerSplit for 40k..120k."""
    p = params or SimParams()
    rows = []
    for c in lengths:
        off, on = simulate(c, False, p), simulate(c, True, p)
        rows.append({"context": c, "hit_rate_off": off["hit_rate_achieved"], "hit_rate_on": on["hit_rate_achieved"],
                     "throughput_off_rps": round(off["throughput_rps"], 4),
                     "throughput_on_rps": round(on["throughput_rps"], 4),
                     "gain": round(on["throughput_rps"] / off["throughput_rps"] - 1, 4),
                     "published_gain": PUBLISHED_GAIN.get(c),
                     "comm_exposed_ms": round(on["comm_exposed_s"] * 1e3, 2),
                     "kv_bcast_hidden_fraction": round(on["layer"]["hidden_fraction"], 3),
                     "capacity_tokens_off": off["capacity_tokens"], "capacity_tokens_on": on["capacity_tokens"],
                     "implied_hit_rate_off": _implied_hit(p, c, on["request_s"], PUBLISHED_GAIN.get(c))})
    return {"mode": "simulate", "params": asdict(p), "sources": SOURCES, "rows": rows,
            "note": "gain = throughput with LayerSplit / without - 1; published: +10 % at 40k, +132 % at 120k"}




def _implied_hit(p: SimParams, context: int, t_on: float, gain: float | None) -> float | None:
    """The hit rate without LayerSplit that would reproduce a published gain (misses recomputed)."""
    if gain is None or p.host_tier_gbps > 0:
        return None
    uncached = (1 + gain) * t_on / per_token_seconds(p, context)
    return round(1 - uncached / context, 4)


def calibrate_sessions(context: int = 40_000, target: float = PUBLISHED_GAIN[40_000],
                       params: SimParams | None = None) -> float:
    """The session count at which the gain at ``context`` equals ``target`` (bisection; the gain grows with it)."""
    base = params or SimParams()
    gain = lambda n: bench_layersplit(replace(base, sessions=n), (context,))["rows"][0]["gain"]  # noqa: E731
    lo, hi = 1.0, 1.0
    while gain(hi) < target:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no session count reaches a gain of {target} at {context} tokens")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gain(mid) < target else (lo, mid)
    return round(hi, 2)


def sensitivity(name: str, values: tuple[float, ...], lengths: tuple[int, ...] = LENGTHS) -> dict[float, list[float]]:
    """Gain per length for each value of one parameter (the others at their defaults)."""
    if name not in SimParams.__dataclass_fields__:
        raise ValueError(f"unknown parameter {name!r}; expected one of {sorted(SimParams.__dataclass_fields__)}")
    out = {}
    for v in values:
        p = replace(SimParams(), **{name: v})
        out[v] = [r["gain"] for r in bench_layersplit(p, lengths)["rows"]]
    return out


MIX_FAST = (0.5, 0.2, 0.1)          # fraction of sessions in a tool loop (next turn soon)
MIX_SLOW = (10.0, 30.0, 100.0)      # how much less often the other sessions come back


def mix_sensitivity(fast_fractions: tuple[float, ...] = MIX_FAST, slow_factors: tuple[float, ...] = MIX_SLOW,
                    lengths: tuple[int, ...] = LENGTHS) -> list[dict[str, Any]]:
    """Gains per length for each session mix, every mix calibrated to the published 40k point.

    The mix (how revisit rates spread over sessions) sets how gradually the unsplit cache's hit
    rate falls as contexts grow, so it decides the long-context predictions; it is not published.
    """
    rows = []
    for ff in fast_fractions:
        for sf in slow_factors:
            p = replace(SimParams(), fast_fraction=ff, slow_factor=sf)
            p = replace(p, sessions=calibrate_sessions(params=p))
            rows.append({"fast_fraction": ff, "slow_factor": sf, "sessions": p.sessions,
                         "gains": [r["gain"] for r in bench_layersplit(p, lengths)["rows"]]})
    return rows


def mix_table_markdown(rows: list[dict[str, Any]], lengths: tuple[int, ...] = LENGTHS) -> str:
    """``mix_sensitivity``'s rows as the Markdown table docs/layersplit.md shows."""
    head = ("| fast sessions | slower by | sessions (calibrated) | "
            + " | ".join(f"{c // 1000}k" for c in lengths) + " |\n|---|---|---|" + "---|" * len(lengths))
    body = [f"| {r['fast_fraction']:.0%} | {r['slow_factor']:.0f}× | {r['sessions']:.2f} | "
            + " | ".join(f"{g * 100:+.0f} %" for g in r["gains"]) + " |" for r in rows]
    return "\n".join([head, *body])


def table_markdown(result: dict[str, Any]) -> str:
    """The rows of ``bench_layersplit`` as the Markdown table docs/layersplit.md shows."""
    head = ("| context | hit rate off | hit rate on | req/s off | req/s on | gain | published | "
            "exposed comm / request | KV broadcast hidden |\n|---|---|---|---|---|---|---|---|---|")
    pub = lambda g: "" if g is None else f"{g * 100:+.0f} %"  # noqa: E731
    rows = [f"| {r['context'] // 1000}k | {r['hit_rate_off']:.3f} | {r['hit_rate_on']:.3f} | "
            f"{r['throughput_off_rps']:.3f} | {r['throughput_on_rps']:.3f} | {r['gain'] * 100:+.0f} % | "
            f"{pub(r['published_gain'])} | {r['comm_exposed_ms']:.1f} ms | {r['kv_bcast_hidden_fraction']:.2f} |"
            for r in result["rows"]]
    return "\n".join([head, *rows])
