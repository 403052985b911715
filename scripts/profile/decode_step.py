"""CPU time of one decode forward of the bench mix's batch: python scripts/profile/decode_step.py [N] [DTYPE].

Fills a core with 32 requests of `kvproof bench serving`'s mix (prefill + a few decode steps), then times
N decode forwards of that batch (layout + model forward + logits; they rewrite the same KV slots, so the
state does not move) in CPU seconds — steadier than wall time on a shared box. Prints ms per forward.
"""
import argparse
import sys
import time

import torch

from kvproof.runtime.model.config import preset
from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
from kvproof.runtime.tools.loadgen import _mix, add_loadgen_args

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
p = argparse.ArgumentParser()
add_loadgen_args(p)
mix = _mix(p.parse_args(["--abort-fraction", "0", "--seed", "0"]))[:32]
tok = ByteTokenizer()
core = EngineCore(EngineConfig(model=preset("tiny").replace(dtype=dtype)))
for i, r in enumerate(mix):
    core.add(GenerationRequest(f"r{i}", tuple(tok.encode(r["prompt"])), SamplingParams(max_tokens=64, ignore_eos=True)),
             lambda ev: None)
while core.scheduler.waiting:
    core.step()
for _ in range(3):
    core.step()
seqs = list(core.scheduler.running)
runner, k = core.runner, core.cfg.num_drafts
ctx = [s.num_tokens for s in seqs]


def forward() -> None:
    toks = torch.tensor([[s.tokens[-1]] * (k + 1) for s in seqs]).view(-1)
    b = runner._layout(seqs, [s.num_tokens - 1 for s in seqs], [k + 1] * len(seqs))
    runner.model.logits(runner._forward(toks, b))


forward()
c0, t0 = time.process_time(), time.perf_counter()
for _ in range(n):
    forward()
cpu, wall = time.process_time() - c0, time.perf_counter() - t0
print(f"{len(seqs)} seqs, context {min(ctx)}..{max(ctx)}: {1000 * cpu / n:.2f} ms CPU, {1000 * wall / n:.2f} ms wall "
      f"per decode forward ({dtype}, {n} runs)")
