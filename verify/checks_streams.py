"""Checks of the HiCache stream plans for `kvproof prove`: fixed proven for every L, unfixed refuted."""
from __future__ import annotations

import time
from functools import partial

from kvproof.spec.hicache_plan import PROLOGUE, STREAMS, VARIANTS, hicache_plan, layer_block, layer_template
from kvproof.spec.streams import PROPERTIES, check_plan
from kvproof.verify.race import prove_template, render_timeline, waits_needed, witness_schedule, witness_steps
from kvproof.verify.registry import Check
from kvproof.verify.verdict import Status, Verdict

MAX_LAYERS = 64
BATCHES = (1, 2)          # two back-to-back batches expose cross-batch page reuse (write-after-read)
PROTOCOL = "hicache"


def _check_property(variant: str, prop: str, expected: Status) -> Verdict:
    """Sweep L = 1..MAX_LAYERS on the HB graph; Z3 witness for the first violation, else a parametric proof."""
    t0 = time.perf_counter()
    params = {"layers": f"1..{MAX_LAYERS}"}
    for layers, batches in ((l, b) for l in range(1, MAX_LAYERS + 1) for b in BATCHES):
        plan = hicache_plan(layers, variant, batches)
        bad = [v for v in check_plan(plan) if v.property == prop]
        if bad:
            v = bad[0]
            sched = witness_schedule(plan, v)
            return Verdict(PROTOCOL, variant, prop, params, Status.REFUTED, expected,
                           method=f"HB-graph (first violation at L={layers}, {batches} batch(es)) "
                                  f"+ Z3 witness schedule",
                           detail=f"{v.message}; {len(bad)} such race(s) at L={layers}",
                           counterexample=witness_steps(plan, sched, v),
                           witness={"layers": layers, "batches": batches, "plan": plan.name, "timeline": render_timeline(plan, sched, v),
                                    "schedule": sched.to_json(plan), "read": plan.instrs[v.after].name,
                                    "overtaken": plan.instrs[v.before].name, "region": v.region},
                           seconds=time.perf_counter() - t0)
    par = prove_template(layer_template(variant), STREAMS, prop, partial(layer_block, variant=variant), PROLOGUE)
    sweep = f"HB-graph for every L in 1..{MAX_LAYERS} (1 and 2 back-to-back batches)"
    if par.proven:
        method = f"Z3 parametric (induction over a {par.span + 1}-layer window, every L >= 1) + {sweep}"
        detail = par.detail
    else:
        method = sweep
        detail = f"no violation for L <= {MAX_LAYERS}; parametric argument inconclusive: {par.detail}"
    return Verdict(PROTOCOL, variant, prop, params, Status.PROVEN, expected, method=method, detail=detail,
                   seconds=time.perf_counter() - t0)


def _check_waits_needed(layers: int, batches: int) -> Verdict:
    """Guard necessity: dropping the waits of any one event family of the fixed plan creates a race."""
    t0 = time.perf_counter()
    res = waits_needed(hicache_plan(layers, "fixed", batches))
    spare = [w for w, needed in res if not needed]
    status = Status.PROVEN if not spare else Status.REFUTED
    detail = (f"each wait family ({', '.join(w for w, _ in res)}) is needed: removing it creates a race"
              if not spare else f"redundant waits: {', '.join(spare)}")
    return Verdict(PROTOCOL, "fixed", "every_wait_needed", {"layers": layers, "batches": batches}, status,
                   Status.PROVEN, method="HB-graph with each wait family removed in turn", detail=detail,
                   seconds=time.perf_counter() - t0)


def checks() -> list[Check]:
    """The checks `kvproof prove` runs for this protocol (collected explicitly; importing registers nothing)."""
    out: list[Check] = []
    for variant in VARIANTS:
        for prop in PROPERTIES:
            expected = Status.REFUTED if (variant, prop) == ("unfixed", "no_read_before_ready") else Status.PROVEN
            out.append(Check(PROTOCOL, variant, prop, {"layers": f"1..{MAX_LAYERS}"}, expected,
                           partial(_check_property, variant, prop, expected)))
    out.append(Check(PROTOCOL, "fixed", "every_wait_needed", {"layers": 2, "batches": 2}, Status.PROVEN,
                   partial(_check_waits_needed, 2, 2)))
    return out
