"""`kvproof bench eviction`: a device page pool far below the working set, over the host tier.

A coding-agent-like load (long shared prefixes revisited in rounds, several
requests in flight, some aborted part-way) runs on the engine with a device
pool under 25% of the working set, so pages are evicted to the host, reloaded
and reused all the time, every change fired through the page spec. Every
finished output is compared token by token with the single-request reference;
the JSON reports corrupted outputs, leaked pages (device and host, plus any
spec property or derived index out of step), the prefix hit rate and the cost
of firing through the spec in microseconds per page operation.
"""
from __future__ import annotations

import random
import time
from typing import Any

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams, generate_reference
from kvproof.spec.kv_page import KVPage
from kvproof.spec.local import LocalInstance


def agent_workload(docs: int, rounds: int, doc_len: int, seed: int = 0) -> list[list[int]]:
    """Prompts: `docs` long shared prefixes, each revisited once per round with a fresh suffix."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(32, 127) for _ in range(doc_len)] for _ in range(docs)]
    order = [d for _ in range(rounds) for d in rng.sample(range(docs), docs)]
    return [prefixes[d] + [rng.randrange(32, 127) for _ in range(3 + rng.randrange(8))] for d in order]


def fire_cost_us(pages: int = 4096, n: int = 100_000) -> float:
    """Microseconds per page action on the compiled per-page fast path (lock + unlock of a cached page)."""
    t = LocalInstance(KVPage, "fixed", "page", pages)
    for p in range(pages):
        t.fire("alloc", p)
        t.fire("publish", p)
    t0 = time.perf_counter()
    for i in range(n):
        p = i % pages
        t.fire("lock", p)
        t.fire("unlock", p, 1)
    return (time.perf_counter() - t0) / (2 * n) * 1e6


def run_eviction(docs: int, rounds: int, doc_len: int, wave: int, max_tokens: int, abort_every: int,
                 pool_fraction: float, seed: int = 0) -> dict[str, Any]:
    """Run the load with a device pool of `pool_fraction` of the working set; the report (JSON-able)."""
    prompts = agent_workload(docs, rounds, doc_len, seed)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    base = EngineConfig(num_drafts=0)
    S = base.model.page_size
    working_set = docs * (doc_len // S) + sum(-(-(len(p) - doc_len + max_tokens) // S) for p in prompts)
    num_pages = max(int(working_set * pool_fraction), wave * -(-(doc_len + 16 + max_tokens) // S))
    ref = generate_reference(base, prompts, params)
    core = EngineCore(EngineConfig(num_drafts=0, num_pages=num_pages, host_cache_pages=working_set,
                                   host_cache_schedule="adversarial"))
    out: dict[str, list[int]] = {}
    aborted: set[str] = set()
    t0 = time.perf_counter()
    for start in range(0, len(prompts), wave):
        ids = [f"r{k}" for k in range(start, min(start + wave, len(prompts)))]
        for rid in ids:
            core.add(GenerationRequest(rid, tuple(prompts[int(rid[1:])]), params),
                     lambda ev: out.setdefault(ev.request_id, []).extend(ev.tokens))
        steps = 0
        while core.step():
            steps += 1
            victim = ids[0]
            if abort_every and start // wave % abort_every == 0 and steps == 2 and core.abort(victim):
                aborted.add(victim)                     # an abort part-way: its pages go back early
    secs = time.perf_counter() - t0
    done = [k for k in range(len(prompts)) if f"r{k}" not in aborted]
    corrupted = sum(out.get(f"r{k}", []) != ref[k] for k in done)
    host = core.host
    assert host is not None
    c = host.counts
    considered = c["device_hits"] + c["host_hits"] + c["misses"]
    problems = core.pool.check()
    return {
        "requests": len(prompts), "finished": len(done), "aborted": len(aborted),
        "device_pages": num_pages, "working_set_pages": working_set,
        "pool_fraction_of_working_set": round(num_pages / working_set, 3),
        "corrupted_outputs": corrupted,
        "leaked_pages": core.pool.num_pages - core.pool.num_free,
        "pinned_host_pages": len(host.pins),
        "spec_problems": problems[:5],
        "hit_rate": round((c["device_hits"] + c["host_hits"]) / considered, 4) if considered else None,
        "device_hits": c["device_hits"], "host_hits": c["host_hits"], "misses": c["misses"],
        "evictions": c["evictions"], "writebacks": c["writebacks"], "swap_ins": c["swap_ins"],
        "host_dropped": c["dropped"], "preemptions": core.scheduler.preemptions,
        "page_ops": core.pool.ops, "us_per_page_op_in_engine": round(core.pool.us_per_op() or 0.0, 3),
        "seconds": round(secs, 2),
    }


def bench_eviction(quick: bool = False) -> dict[str, Any]:
    """The eviction run (quick: a smaller load) plus the isolated firing cost."""
    if quick:
        run = run_eviction(docs=12, rounds=2, doc_len=96, wave=2, max_tokens=6, abort_every=3, pool_fraction=0.2)
    else:
        run = run_eviction(docs=16, rounds=3, doc_len=112, wave=3, max_tokens=8, abort_every=3, pool_fraction=0.2)
    return {"eviction": run, "us_per_page_op_fast_path": round(fire_cost_us(n=20_000 if quick else 200_000), 3)}
