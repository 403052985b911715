"""EngineCore alone under the serving bench's load: python scripts/profile/core_serve.py [DTYPE] [PROFILE(0|1)] [PART/PARTS].

The same request mix as `kvproof bench serving` (loadgen's prompts, 200 requests, 32 in flight, max_tokens
16..64, ignore_eos), replayed in a closed loop straight into EngineCore.step (no HTTP, no second process):
the model + scheduler share of a served token. Prints tok/s (wall), CPU ms per token (steadier on a shared box), steps by kind and ms per step; with PROFILE=1
the top of a cProfile of the run. PART/PARTS: every PARTS-th request from PART, 32/PARTS in flight (one
of PARTS data-parallel cores).
"""
import argparse
import cProfile
import collections
import pstats
import sys
import time

from kvproof.runtime.model.config import preset
from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
from kvproof.runtime.tools.loadgen import _mix, add_loadgen_args

dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
prof = len(sys.argv) > 2 and sys.argv[2] == "1"
p = argparse.ArgumentParser()
add_loadgen_args(p)
mix = _mix(p.parse_args(["--abort-fraction", "0", "--seed", "0"]))
part, parts = (int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "0/1").split("/"))   # this share of the mix
mix = mix[part::parts]
inflight = 32 // parts
tok = ByteTokenizer()
core = EngineCore(EngineConfig(model=preset("tiny").replace(dtype=dtype)))
todo = collections.deque(enumerate(mix))
live: set[str] = set()


def add() -> None:
    i, r = todo.popleft()
    rid = f"r{i}"
    live.add(rid)

    def sink(ev, rid=rid):
        if ev.finished:
            live.discard(rid)
    core.add(GenerationRequest(rid, tuple(tok.encode(r["prompt"])),
                               SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, seed=r["seed"])), sink)


times = {"with prefill": [0.0, 0], "decode only": [0.0, 0]}
pr = cProfile.Profile()
if prof:
    pr.enable()
t0, c0 = time.perf_counter(), time.process_time()
while todo or live:
    while todo and len(live) < inflight:
        add()
    kind = "with prefill" if core.scheduler.waiting else "decode only"
    s = time.perf_counter()
    core.step()
    times[kind][0] += time.perf_counter() - s
    times[kind][1] += 1
el, cpu = time.perf_counter() - t0, time.process_time() - c0
if prof:
    pr.disable()
n = core.totals["generation_tokens_total"]
print(dtype, "elapsed %.2f s tokens %d tok/s %.0f; CPU %.2f s: %.3f ms/token, %.0f tok per CPU-s"
      % (el, n, n / el, cpu, 1000 * cpu / n, n / cpu),
      {k: {"s": round(v[0], 2), "steps": v[1], "ms/step": round(1000 * v[0] / max(v[1], 1), 2)}
       for k, v in times.items()})
if prof:
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
