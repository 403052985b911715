"""How much firing through the spec costs: transitions per second and microseconds per firing.

One request's worth of firings per actor, repeated: decode fires
alloc, on_done x writers, start_decode, finish; a prefill rank fires
p_on_alloc, (p_post, p_complete) x layers, p_finish. Measured with the guard
queries the runtime makes (`enabled` before a receive) and without tracing,
plus once with a JSON Lines trace to a temporary file.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.instance import Instance


def _decode_cycle(inst: Instance, s: int, writers: int) -> int:
    inst.fire("alloc", s=s)
    e = inst.get("epoch", s)
    for w in range(writers):
        if inst.enabled("on_done", s=s, w=w, e=e):
            inst.fire("on_done", s=s, w=w, e=e)
    inst.fire("start_decode", s=s)
    inst.fire("finish", s=s)
    return 3 + writers


def _prefill_cycle(inst: Instance, s: int, e: int, layers: int) -> int:
    inst.fire("p_on_alloc", s=s, w=0, e=e)
    for _ in range(layers):
        inst.fire("p_post", s=s, w=0)
    for _ in range(layers):
        inst.fire("p_complete", s=s, w=0, e=e)
    inst.fire("p_finish", s=s, w=0)
    return 2 + 2 * layers


def _measure(actor: str, slots: int, writers: int, layers: int, cycles: int, trace: str | None) -> dict[str, float]:
    inst = Instance(KVSlot, "fixed", {"slots": slots, "writers": writers}, actor=actor, trace=trace)
    try:
        n = 0
        t0 = time.perf_counter()
        for i in range(cycles):
            s = i % slots
            n += (_decode_cycle(inst, s, writers) if actor == "decode"
                  else _prefill_cycle(inst, s, i // slots + 1, layers))
        dt = time.perf_counter() - t0
    finally:
        inst.close()
    return {"firings": n, "seconds": round(dt, 4), "transitions_per_s": round(n / dt, 1),
            "us_per_firing": round(dt / n * 1e6, 3)}


def bench_transitions(slots: int = 64, writers: int = 2, layers: int = 4, cycles: int = 2000) -> dict[str, Any]:
    """Firing cost through the spec for the decode and prefill actors, without and with a trace file."""
    out: dict[str, Any] = {"params": {"slots": slots, "writers": writers, "layers": layers, "cycles": cycles}}
    with tempfile.TemporaryDirectory() as d:
        for actor in ("decode", "prefill"):
            out[actor] = _measure(actor, slots, writers, layers, cycles, None)
            out[f"{actor}_traced"] = _measure(actor, slots, writers, layers, cycles, os.path.join(d, f"{actor}.jsonl"))
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_transitions(), indent=2))
