"""`kvproof bench monitor`: the anomaly monitor's false-positive rate on ordinary requests, and its catch rate.

Runs `requests` greedy completions of `max_tokens` tokens (prompts of the loadgen's coding-agent mix)
on the default model with its default monitor (the spec's thresholds for the model, suspicions settled
by the KV audit, exactly as served), plus `corrupted` requests whose KV is garbled after prefill.
False positive = a clean request the monitor aborted; caught = a corrupted request it aborted. It also
replays each request's verification steps through the spec'd monitor with an audit that always reports
corruption (`post_mortem_audit`: abort on the statistics alone, the post-mortem's rule) under the model's
thresholds and the post-mortem's, to show what the audit is for.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
from kvproof.runtime.serving.monitor import MonitorConfig, RequestMonitor, post_mortem_audit
from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.spec.specdec_monitor import thresholds_for

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


def _run(prompts: list[list[int]], corrupt: bool, max_tokens: int) -> list[dict[str, Any]]:
    """Serve the prompts with the default monitor; per request its end, audits and verification steps."""
    core = EngineCore(EngineConfig())
    recs: dict[str, dict[str, Any]] = {}
    try:
        for i, p in enumerate(prompts):
            rid = f"{'c' if corrupt else 'h'}{i}"
            rec: dict[str, Any] = {"steps": [], "audit_s": [], "audit_err": [], "end": None}
            recs[rid] = rec
            core.add(GenerationRequest(rid, tuple(p), SamplingParams(max_tokens=max_tokens)),
                     lambda ev, _rec=rec: _rec.__setitem__("end", ev) if ev.finished else None)
            if corrupt:
                core.corrupt_after_prefill.add(rid)
            mon = core.seqs[rid].monitor
            assert mon is not None and mon.audit is not None
            step, audit = mon.step, mon.audit
            # record the (accepted, drafted) of each verification step and time each audit
            mon.step = lambda a, d, _f=step, _r=rec: (_r["steps"].append((a, d)), _f(a, d))[1]  # type: ignore
            mon.audit = lambda _f=audit, _r=rec: _timed(_f, _r)                              # type: ignore
        while core.step():
            pass
    finally:
        core.close()
    return list(recs.values())


def _timed(f: Any, rec: dict[str, Any]) -> float:
    t = time.perf_counter()
    err = f()
    rec["audit_s"].append(time.perf_counter() - t)
    rec["audit_err"].append(err)
    return err


def _statistics_alone(traj: list[tuple[int, int]], cfg: MonitorConfig, model: str) -> str | None:
    """The abort reason when every suspicion aborts (no audit: the post-mortem's rule), else None."""
    mon = RequestMonitor(cfg, model=model, audit=post_mortem_audit)
    for a, d in traj:
        why = mon.step(a, d)
        if why is not None:
            return why
    return None


def _upper95(k: int, n: int) -> float:
    """One-sided 95% upper bound on a rate with k of n observed (Wilson score; 3/n, the rule of three, at k=0)."""
    if n == 0:
        return 1.0
    if k == 0:
        return 3 / n
    z, p = 1.645, k / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


def bench_monitor(requests: int = 1000, corrupted: int = 100, max_tokens: int = 400, seed: int = 0) -> dict[str, Any]:
    """Serve the requests with the default monitor, replay them on the statistics alone; the report."""
    t0 = time.perf_counter()
    clean = _run(_prompts(requests, seed), False, max_tokens)
    bad = _run(_prompts(corrupted, seed + 1), True, max_tokens) if corrupted else []
    gen_s = time.perf_counter() - t0
    model = EngineConfig().model.name
    t = thresholds_for(model)
    fp = [r for r in clean if r["end"].finish_reason == "anomaly"]
    tp = [r for r in bad if r["end"].finish_reason == "anomaly"]
    audits = [len(r["audit_s"]) for r in clean]
    audit_s = sum(sum(r["audit_s"]) for r in clean)
    out: dict[str, Any] = {
        "model": model, "requests": requests, "corrupted_requests": corrupted, "max_tokens": max_tokens,
        "greedy": True, "prompt_seed": seed, "generate_s": round(gen_s, 1),
        "accept_length_p50": _p50([(sum(a for a, _ in r["steps"]) + len(r["steps"])) / len(r["steps"])
                                   for r in clean if r["steps"]]),
        "default_monitor": {
            "min_tokens": t.min_tokens, "min_accept_length": str(t.min_accept_length),
            "max_accept_rate": str(t.max_accept_rate), "audit_rtol": str(t.audit_rtol),
            "false_positives": len(fp), "false_positive_rate": round(len(fp) / max(1, requests), 4),
            "false_positive_rate_upper95": round(_upper95(len(fp), requests), 4),
            "corrupted_caught": len(tp), "detection_rate": round(len(tp) / len(bad), 4) if bad else None,
            "detection_rate_lower95": round(1 - _upper95(len(bad) - len(tp), len(bad)), 4) if bad else None,
            "tokens_before_abort_max": max((r["end"].completion_tokens for r in tp), default=None),
            "clean_requests_audited": sum(1 for a in audits if a), "clean_audits": sum(audits),
            "clean_audit_s": round(audit_s, 2),
            "clean_audit_ms_mean": round(1000 * audit_s / sum(audits), 1) if sum(audits) else None,
            # the audit's margin: the largest KV error of a clean request vs the smallest of a corrupted one
            "clean_kv_error_max": max((e for r in clean for e in r["audit_err"]), default=None),
            "corrupted_kv_error_min": min((e for r in bad for e in r["audit_err"]), default=None),
        },
        "statistics_alone": {},
    }
    for name in (model, "post_mortem"):
        cfg = MonitorConfig.of(name)
        fps = [w for w in (_statistics_alone(r["steps"], cfg, model) for r in clean) if w]
        tps = [w for w in (_statistics_alone(r["steps"], cfg, model) for r in bad) if w]
        out["statistics_alone"][name] = {
            "min_tokens": cfg.min_tokens, "min_accept_length": cfg.min_accept_length,
            "max_accept_rate": cfg.max_accept_rate,
            "false_positives": len(fps), "false_positive_rate": round(len(fps) / max(1, requests), 4),
            "false_positive_rules": {k: fps.count(k) for k in sorted(set(fps))},
            "corrupted_caught": len(tps), "detection_rate": round(len(tps) / len(bad), 4) if bad else None}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _p50(xs: list[float]) -> float | None:
    return round(sorted(xs)[len(xs) // 2], 3) if xs else None
