"""cProfile of EngineCore.step alone: python scripts/profile/core_step.py DTYPE N_REQUESTS PROFILE(0|1)."""
import cProfile, pstats, sys, time, random
from kvproof.runtime.serving.engine import EngineCore, EngineConfig, GenerationRequest, SamplingParams
from kvproof.runtime.model.config import preset
dtype, nreq, prof = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
core = EngineCore(EngineConfig(model=preset("tiny").replace(dtype=dtype)))
rng = random.Random(0)
for i in range(nreq):
    p = tuple(rng.randrange(256) for _ in range(rng.randrange(40, 120)))
    core.add(GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=64, ignore_eos=True)), lambda ev: None)
times = {"prefill": [0.0, 0], "decode": [0.0, 0]}
pr = cProfile.Profile()
if prof: pr.enable()
t0 = time.perf_counter()
while True:
    kind = "prefill" if core.scheduler.counts()["waiting"] or core.scheduler.counts()["prefilling"] else "decode"
    s = time.perf_counter()
    if not core.step(): break
    times[kind][0] += time.perf_counter() - s; times[kind][1] += 1
el = time.perf_counter() - t0
if prof: pr.disable()
tok = core.totals["generation_tokens_total"]
print(dtype, "elapsed %.2f s tokens %d tok/s %.0f" % (el, tok, tok / el), {k: (round(v[0], 2), v[1], round(1000 * v[0] / max(v[1], 1), 2)) for k, v in times.items()})
if prof:
    st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(22)
