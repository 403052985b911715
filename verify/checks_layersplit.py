"""Checks of the LayerSplit broadcast plan for `kvproof prove`: fixed proven, unfixed refuted.

Two methods, reported together:

- **HB sweep** (exact, per plan): round-robin plans are prefix-closed in L (block l
  depends only on l, its owner and R, and a plan's prefix has exactly the prefix's
  dependencies and orderings), so the R in 1..8, L = 96 plans cover every R <= 8 and
  L <= 96; contiguous ownership (the default) for every R <= 8 and L in
  ``CONTIGUOUS_LAYERS`` (the whole range would take ~7 s; the window proof covers it).
- **Z3 window proof** (any R, any L, any ownership). Lemma 1 (sub-plans): in a plan
  without host syncs whose events are recorded once, a sub-sequence of its
  instructions orders no pair the whole plan leaves unordered (stream edges become
  chains, waits resolve to the same record or to none). Lemma 2 (locality, checked
  on every swept plan by ``window_of``): each dependency is on one stream, or lies in
  the blocks of one layer (wire and receive-buffer reads), or is the reuse of a
  receive buffer: ``recv[z]@r`` after a read at layer a = z - k*depth, whose window
  is the blocks {a, z - prefetch, z} restricted to rank r and the owners' sends.
  Every such window is, up to renaming ranks and layers, one of the few built here
  (r = 0, owners among 1..3, k in 1..2), and Z3 shows each of its dependencies ordered.

Check variants: the plan variants ``fixed`` and ``unfixed``, ``writeback`` (the
serving forward: compute ops also write the new tokens' rows, the owner's compute
waits its own sends first; proven the same two ways, with a smaller contiguous
sweep) and ``writeback-without-owner_wait`` (the owner's wait dropped: refuted).
With write-back a dependency may also lie in one layer on the owner (its send reads
the stored layer its compute then writes), so the windows gain the one-layer window
owned by rank 0, and a buffer reuse may be a write after a write.
"""
from __future__ import annotations

import functools
import itertools
import re
import time
from dataclasses import dataclass
from functools import partial

import z3

from kvproof.spec.layersplit_plan import (DELIVERY, VARIANTS, LayerSplitShape, comm, compute,
                                          delivery_errors, layer_block, layersplit_plan)
from kvproof.spec.streams import (PROPERTIES, Dependency, Op, Plan, Record, Violation, check_plan,
                                  dependencies, happens_before)
from kvproof.verify.race import render_timeline, waits_needed, witness_schedule, witness_steps
from kvproof.verify.registry import Check
from kvproof.verify.verdict import Status, Verdict

PROTOCOL = "layersplit"
MAX_RANKS, MAX_LAYERS, DEPTH = 8, 96, 2
CONTIGUOUS_LAYERS = tuple(range(1, 49)) + (64, 78, 96)     # every L <= 48, GLM-5's 78, and 96
WRITEBACK_CONTIGUOUS_LAYERS = tuple(range(1, 17)) + (78, 96)   # write-back: a smaller sweep (prove time)
PARAMS = {"ranks": f"1..{MAX_RANKS}", "layers": f"1..{MAX_LAYERS}", "depth": DEPTH}
_LAYER = re.compile(r"\[(\d+)\]")
# check variant -> LayerSplitShape fields (besides ranks, layers, depth, ownership)
CHECK_VARIANTS: dict[str, dict[str, object]] = {
    "fixed": {"variant": "fixed"},
    "unfixed": {"variant": "unfixed"},
    "writeback": {"variant": "fixed", "writeback": True},
    "writeback-without-owner_wait": {"variant": "fixed", "writeback": True, "owner_wait": False},
}


def shape_of(variant: str, ranks: int, layers: int, ownership: str, depth: int = DEPTH) -> LayerSplitShape:
    """The plan shape of a check variant (``fixed``, ``unfixed``, ``writeback``, ...)."""
    if variant not in CHECK_VARIANTS:
        raise ValueError(f"unknown LayerSplit check variant {variant!r}; expected one of {sorted(CHECK_VARIANTS)}")
    return LayerSplitShape(ranks, layers, depth, ownership, **CHECK_VARIANTS[variant])  # type: ignore[arg-type]


def contiguous_layers(variant: str) -> tuple[int, ...]:
    """Layer counts of the contiguous-ownership part of the sweep."""
    return WRITEBACK_CONTIGUOUS_LAYERS if CHECK_VARIANTS[variant].get("writeback") else CONTIGUOUS_LAYERS


def sweep_shapes(variant: str) -> list[LayerSplitShape]:
    """Plans of the HB sweep, smallest first (a refutation is then a small plan)."""
    contiguous = [shape_of(variant, r, l, "contiguous") for l in contiguous_layers(variant)
                  for r in range(1, MAX_RANKS + 1)]
    # round-robin: the L = 96 plan's prefixes are the plans of every smaller L
    rr = [shape_of(variant, r, l, "round_robin") for l in (3, MAX_LAYERS) for r in range(1, MAX_RANKS + 1)]
    return sorted(contiguous + rr, key=lambda s: (s.layers * s.ranks, s.ownership))


@dataclass(frozen=True)
class Found:
    """First plan of the sweep where a property fails: the shape and the violation (None: delivery)."""

    shape: LayerSplitShape
    violation: Violation | None
    count: int
    detail: str


def _delivery_shape(shape: LayerSplitShape) -> bool:
    return shape.ownership == "round_robin" or shape.layers <= 24


@functools.lru_cache(maxsize=8)
def sweep(variant: str, props: tuple[str, ...]) -> tuple[dict[str, Found], int, float]:
    """Check the sweep's plans until every property in ``props`` has failed or all plans passed.

    Delivery (issue-order dataflow) is checked on the round-robin plans and contiguous L <= 24.
    """
    t0, found, plans = time.perf_counter(), {}, 0
    hb_props = [p for p in props if p in PROPERTIES]
    for shape in sweep_shapes(variant):
        todo_hb = [p for p in hb_props if p not in found]
        todo_dl = DELIVERY in props and DELIVERY not in found and _delivery_shape(shape)
        if not todo_hb and not todo_dl:
            if all(p in found for p in props):
                break
            continue
        plan = layersplit_plan.__wrapped__(shape)       # no caching of a thousand large plans
        plans += 1
        if todo_hb:
            vs = check_plan.__wrapped__(plan)
            for p in todo_hb:
                bad = [v for v in vs if v.property == p]
                if bad:
                    found[p] = Found(shape, bad[0], len(bad), bad[0].message)
        if todo_dl:
            errs = delivery_errors(shape, plan)
            if errs:
                found[DELIVERY] = Found(shape, None, len(errs), errs[0])
    return found, plans, time.perf_counter() - t0


# ---------------------------------------------------------------- window proof
def _layer(name: str) -> int:
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"instruction {name!r} carries no layer")
    return int(m.group(1))


def window_of(plan: Plan, dep: Dependency) -> tuple[str, tuple[int, ...]]:
    """Lemma 2: the kind of a dependency and the layers of its window; ValueError if it has none."""
    a, b = plan.instrs[dep.before], plan.instrs[dep.after]
    assert isinstance(a, Op) and isinstance(b, Op)
    la, lb = _layer(a.name), _layer(b.name)
    if a.stream == b.stream:
        return "same_stream", ()
    # wire and receive buffers; with write-back also the owner's stored layer (its send, then its compute)
    if la == lb and dep.region.startswith(("wire.", "recv.", "idx[", "kv[")):
        return "one_layer", (la,)
    if dep.property in ("no_write_after_read", "no_unordered_writes") and dep.region.startswith("recv.") \
            and b.name.startswith("recv_"):
        return "buffer_reuse", (la, lb)
    raise ValueError(f"dependency {dep} ({a.name} -> {b.name}) fits no window kind")


def _sub_plan(shape: LayerSplitShape, layers_owners: tuple[tuple[int, int], ...]) -> Plan:
    """Blocks of the given (layer, owner) pairs, keeping rank 0's streams and the owners' sends."""
    mine = (comm(0), compute(0))
    keep = tuple(i for l, o in layers_owners for i in layer_block(shape, l, o)
                 if i.stream in mine or (isinstance(i, Op) and i.name.startswith("send_"))
                 or (isinstance(i, Record) and i.event.startswith("sent_")))
    streams = tuple(dict.fromkeys(i.stream for i in keep))
    return Plan(f"window/{shape.variant}/" + ",".join(f"{l}:r{o}" for l, o in layers_owners), streams, keep)


def windows(variant: str, depth: int = DEPTH) -> list[Plan]:
    """Every window kind up to renaming, receiver rank 0, owners among ranks 1..3 (write-back: also 0)."""
    shape = shape_of(variant, 4, 4 * depth + 4, "round_robin", depth)
    pf, out = shape.prefetch, []
    for o in range(0 if shape.writeback else 1, 4):         # one layer, received (write-back: or owned)
        out.append(_sub_plan(shape, ((pf + depth, o),)))
    for k in (1, 2):                                         # buffer reuse after k*depth layers
        z = pf + k * depth
        a, m = z - k * depth, z - pf
        for oa, om, oz in itertools.product(range(1, 4), range(4), range(1, 4)):
            owners = {a: oa, m: om, z: oz}
            if a == m and oa != om:
                continue
            out.append(_sub_plan(shape, tuple(sorted(owners.items()))))
    return out


def _ordered_z3(plan: Plan, prop: str) -> tuple[int, str | None]:
    """Z3: each ``prop`` dependency of the plan is ordered (race query UNSAT); else the first that is not."""
    hb = happens_before(plan)
    t = [z3.Int(f"t{n}") for n in range(len(hb.nodes))]
    s = z3.Solver()
    s.add(*[x >= 0 for x in t])
    s.add(*[t[v] >= t[u] + (1 if why == "op" else 0) for u, v, why in hb.edges])
    deps = [d for d in dependencies(plan) if d.property == prop]
    for d in deps:
        if s.check(t[hb.first(d.after)] < t[hb.last(d.before)]) != z3.unsat:
            return len(deps), f"{plan.instrs[d.after].name} may overtake {plan.instrs[d.before].name} in {plan.name}"
    return len(deps), None


@functools.lru_cache(maxsize=16)
def window_proof(variant: str, prop: str, depth: int = DEPTH) -> tuple[bool, str]:
    """Lemma 1 + 2 + Z3 on every window: (holds for every R, L and ownership, detail)."""
    ws, total = windows(variant, depth), 0
    for w in ws:
        if prop == DELIVERY:
            continue
        n, bad = _ordered_z3(w, prop)
        total += n
        if bad:
            return False, f"window counterexample: {bad}"
    if prop == DELIVERY:
        return True, "not a race property: checked on the sweep's plans"
    return True, (f"Z3: all {total} {prop} dependencies of the {len(ws)} window kinds are ordered (race UNSAT); "
                  f"by the sub-plan and locality lemmas the plan is race-free for every R, L and ownership")


# ---------------------------------------------------------------- checks
def _check(variant: str, prop: str, expected: Status) -> Verdict:
    """Sweep + window proof for one (variant, property)."""
    t0 = time.perf_counter()
    # fixed, writeback: one sweep for all properties; the others: sweep only to find the refutation
    # (and delivery)
    props = tuple(PROPERTIES) + (DELIVERY,) if variant in ("fixed", "writeback") else \
        ((prop,) if prop in ("no_write_after_read", DELIVERY) else ())
    found, plans, _ = sweep(variant, props) if props else ({}, 0, 0.0)
    f = found.get(prop)
    if f is not None and f.violation is not None:
        plan, v = layersplit_plan(f.shape), f.violation
        sched = witness_schedule(plan, v)
        return Verdict(PROTOCOL, variant, prop, PARAMS, Status.REFUTED, expected,
                       method=f"HB sweep (first violation at R={f.shape.ranks}, L={f.shape.layers}, "
                              f"{f.shape.ownership}) + Z3 witness schedule",
                       detail=f"{v.message}; {f.count} such race(s) in {plan.name}",
                       counterexample=witness_steps(plan, sched, v),
                       witness={"plan": plan.name, "ranks": f.shape.ranks, "layers": f.shape.layers,
                                "ownership": f.shape.ownership, "timeline": render_timeline(plan, sched, v),
                                "schedule": sched.to_json(plan), "region": v.region,
                                "write": plan.instrs[v.after].name, "overtaken": plan.instrs[v.before].name},
                       seconds=time.perf_counter() - t0)
    if f is not None:
        return Verdict(PROTOCOL, variant, prop, PARAMS, Status.REFUTED, expected, method="issue-order dataflow",
                       detail=f.detail, seconds=time.perf_counter() - t0)
    ok, why = window_proof(variant, prop)
    cl = contiguous_layers(variant)
    n = max(k for k in range(len(cl) + 1) if cl[:k] == tuple(range(1, k + 1)))     # cl = 1..n, then the rest
    sweep_txt = (f"HB sweep of {plans} plans (round-robin: R <= {MAX_RANKS} at L = {MAX_LAYERS}, prefix-closed, "
                 f"so every L <= {MAX_LAYERS}; contiguous: every R <= {MAX_RANKS}, L <= {n} and "
                 f"L = {', '.join(str(l) for l in cl[n:])})")
    if prop == DELIVERY:
        sweep_txt = (f"issue-order dataflow on {plans} plans (round-robin R <= {MAX_RANKS} at L = {MAX_LAYERS}, "
                     f"prefix-closed; contiguous L <= {min(24, n)})")
    elif not props:
        sweep_txt = "no sweep (window proof only)"
    method = f"Z3 window proof (every R, L, ownership) + {sweep_txt}" if ok and prop != DELIVERY else sweep_txt
    detail = why if ok else f"no violation in the sweep; window proof inconclusive: {why}"
    return Verdict(PROTOCOL, variant, prop, PARAMS, Status.PROVEN, expected, method=method, detail=detail,
                   seconds=time.perf_counter() - t0)


def _check_waits_needed(shape: LayerSplitShape) -> Verdict:
    """Guard necessity: dropping the waits of any one event family of the fixed plan creates a race."""
    t0 = time.perf_counter()
    res = waits_needed(layersplit_plan(shape))
    spare = [w for w, needed in res if not needed]
    return Verdict(PROTOCOL, "fixed", "every_wait_needed", {"ranks": shape.ranks, "layers": shape.layers,
                                                            "ownership": shape.ownership},
                   Status.PROVEN if not spare else Status.REFUTED, Status.PROVEN,
                   method="HB-graph with each wait family removed in turn",
                   detail=(f"each wait family ({', '.join(w for w, _ in res)}) is needed" if not spare
                           else f"redundant waits: {', '.join(spare)}"),
                   seconds=time.perf_counter() - t0)


def checks() -> list[Check]:
    """The checks `kvproof prove` runs for this protocol (collected explicitly; importing registers nothing)."""
    out: list[Check] = []
    for variant in VARIANTS + ("writeback",):
        for prop in PROPERTIES + (DELIVERY,):
            expected = Status.REFUTED if (variant, prop) == ("unfixed", "no_write_after_read") else Status.PROVEN
            out.append(Check(PROTOCOL, variant, prop, PARAMS, expected, partial(_check, variant, prop, expected)))
    unwaited = "writeback-without-owner_wait"
    out.append(Check(PROTOCOL, unwaited, "no_write_after_read", PARAMS, Status.REFUTED,
                   partial(_check, unwaited, "no_write_after_read", Status.REFUTED)))
    guard = LayerSplitShape(2, 4, DEPTH, "round_robin")
    out.append(Check(PROTOCOL, "fixed", "every_wait_needed", {"ranks": 2, "layers": 4, "ownership": "round_robin"},
                   Status.PROVEN, partial(_check_waits_needed, guard)))
    return out
