"""`kvproof bench monitor`: the anomaly monitor's false-positive rate on ordinary requests, and its catch rate.

Runs `requests` greedy completions of `max_tokens` tokens (prompts of the loadgen's coding-agent mix)
on the default model with the monitor recording only, plus `corrupted` requests whose KV is garbled
after prefill; then replays each request's verification steps through the spec'd monitor
(`RequestMonitor`, the same firing the engine does) under each threshold set: the model's own
(spec `THRESHOLDS`) and the post-mortem's. False positive = a clean request the rule would abort.
"""
from __future__ import annotations

import random
import time
from typing import Any

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
from kvproof.runtime.serving.monitor import MonitorConfig, RequestMonitor
from kvproof.runtime.model.tokenizer import ByteTokenizer

WORDS = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "data", "result",
         "config", "test", "assert", "None", "True", "list", "dict"]


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng, tok = random.Random(seed), ByteTokenizer()

    def text(k: int) -> str:
        out = ""
        while len(out) < k:
            out += rng.choice(WORDS) + rng.choice([" ", " ", "(", ")\n", ": ", ", "])
        return out[:k]
    return [tok.encode(text(rng.randint(20, 200))) for _ in range(n)]


def _trajectories(prompts: list[list[int]], corrupt: bool, max_tokens: int) -> list[list[tuple[int, int]]]:
    """(accepted, drafted) of every verification step of each request (monitor recording only)."""
    core = EngineCore(EngineConfig(monitor=MonitorConfig(enabled=False)))
    steps: dict[str, list[tuple[int, int]]] = {}
    try:
        for i, p in enumerate(prompts):
            rid = f"{'c' if corrupt else 'h'}{i}"
            core.add(GenerationRequest(rid, tuple(p), SamplingParams(max_tokens=max_tokens)), lambda ev: None)
            if corrupt:
                core.corrupt_after_prefill.add(rid)
            mon = core.seqs[rid].monitor
            assert mon is not None
            steps[rid] = []
            orig = mon.step
            mon.step = lambda a, d, _orig=orig, _rec=steps[rid]: (_rec.append((a, d)), _orig(a, d))[1]  # type: ignore
        while core.step():
            pass
    finally:
        core.close()
    return list(steps.values())


def _fires(traj: list[tuple[int, int]], cfg: MonitorConfig, model: str) -> str | None:
    mon = RequestMonitor(cfg, model=model)
    for a, d in traj:
        why = mon.step(a, d)
        if why is not None:
            return why
    return None


def bench_monitor(requests: int = 1000, corrupted: int = 100, max_tokens: int = 400, seed: int = 0) -> dict[str, Any]:
    """Run the requests, replay them under each threshold set; the report (rates and counts)."""
    t0 = time.perf_counter()
    clean = _trajectories(_prompts(requests, seed), False, max_tokens)
    bad = _trajectories(_prompts(corrupted, seed + 1), True, max_tokens) if corrupted else []
    gen_s = time.perf_counter() - t0
    model = EngineConfig().model.name
    out: dict[str, Any] = {"model": model, "requests": requests, "corrupted_requests": corrupted,
                           "max_tokens": max_tokens, "greedy": True, "generate_s": round(gen_s, 1),
                           "accept_length_p50": _p50([(sum(a for a, _ in t) + len(t)) / len(t) for t in clean if t]),
                           "thresholds": {}}
    for name, cfg, mdl in ((f"{model} (the default)", MonitorConfig(), model),
                           ("post_mortem", MonitorConfig.of("post_mortem"), model)):
        fp = [w for w in (_fires(t, cfg, mdl) for t in clean) if w]
        tp = [w for w in (_fires(t, cfg, mdl) for t in bad) if w]
        r = RequestMonitor(cfg, model=mdl).cfg
        out["thresholds"][name] = {
            "min_tokens": r.min_tokens, "min_accept_length": r.min_accept_length, "max_accept_rate": r.max_accept_rate,
            "false_positives": len(fp), "false_positive_rate": round(len(fp) / max(1, len(clean)), 4),
            "false_positive_rules": {k: fp.count(k) for k in sorted(set(fp))},
            "corrupted_caught": len(tp), "catch_rate": round(len(tp) / max(1, len(bad)), 4) if bad else None}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _p50(xs: list[float]) -> float | None:
    return round(sorted(xs)[len(xs) // 2], 3) if xs else None
