"""The registered checks of the KV page lifecycle protocol (spec/kv_page.py)."""
from __future__ import annotations

import functools
import time

from kvproof.spec.kv_page import KVPage
from kvproof.verify.bmc import InductionResult, bmc, induction
from kvproof.verify.checks_kv_slot import cex_verdict_fields
from kvproof.verify.explore import Exploration, explore, fair_liveness_violations, path_steps, render_state
from kvproof.verify.locality import slot_locality
from kvproof.verify.registry import Check
from kvproof.verify.verdict import Status, Verdict

PROTOCOL = KVPage.name
PROPERTIES = [n for n, i in KVPage.invariants.items() if not i.strengthening]
STRENGTHENING = [n for n, i in KVPage.invariants.items() if i.strengthening]
PROOF_PAGES = (1, 2, 3)
BMC_DEPTH = 10
# Each pre-fix variant and the property its bug breaks (plus the free-list property all three break).
BUGS = {"evict_locked": "reads_own_content",
        "free_while_loading": "no_load_into_foreign_content",
        "reuse_before_writeback": "host_copy_intact"}
# Guards of `fixed` whose removal must break a property: (guard, property it protects).
ESSENTIAL_GUARDS = [("no_lock_references", "reads_own_content"),
                    ("no_load_in_flight", "no_load_into_foreign_content"),
                    ("load_landed", "reads_own_content"),
                    ("page_free", "reads_own_content")]
# Explicit-state instances for liveness and deadlock freedom (bounded epochs, holders, copies).
SEARCH_PARAMS = [{"pages": 1, "max_epoch": 4, "max_refs": 3},
                 {"pages": 2, "max_epoch": 2, "max_refs": 2}]


@functools.lru_cache(maxsize=None)
def _induction(variant: str, pages: int) -> tuple[InductionResult, float]:
    t0 = time.perf_counter()
    r = induction(KVPage, variant, {"pages": pages}, list(KVPage.invariants), k=1)
    return r, time.perf_counter() - t0


_TIMED: set[tuple[str, int]] = set()


def _proof(variant: str, prop: str, pages: int) -> Verdict:
    r, secs = _induction(variant, pages)
    if (variant, pages) in _TIMED:
        secs = 0.0          # one proof covers every property of these parameters; count its time once
    _TIMED.add((variant, pages))
    params = {"pages": pages}
    if r.proven:
        return Verdict(PROTOCOL, variant, prop, params, Status.PROVEN, Status.PROVEN,
                       "inductive invariant (k-induction, k=1)",
                       f"holds initially and is preserved by every action for any number of requests "
                       f"(holders are counted, unbounded) and unbounded content epochs; strengthened by "
                       f"{', '.join(STRENGTHENING)}", seconds=secs)
    return Verdict(PROTOCOL, variant, prop, params, Status.UNKNOWN, Status.PROVEN,
                   "inductive invariant (k-induction, k=1)",
                   f"not inductive: {r.failed} fails after {r.cti['action'] if r.cti else '?'}", seconds=secs)


@functools.lru_cache(maxsize=None)
def _locality(variant: str) -> tuple[tuple[str, ...], float]:
    t0 = time.perf_counter()
    return tuple(slot_locality(KVPage, variant, {"pages": 2}, index="page")), time.perf_counter() - t0


def _any_pages(variant: str, prop: str) -> Verdict:
    """Every page count: page locality (checked) lifts the one-page inductive proof."""
    problems, t_loc = _locality(variant)
    params = {"pages": "any", "requests": "any"}
    if problems:
        return Verdict(PROTOCOL, variant, prop, params, Status.UNKNOWN, Status.PROVEN, "page locality",
                       f"not page-local: {problems[0]} (+{len(problems) - 1} more)", seconds=t_loc)
    one = _proof(variant, prop, 1)
    return Verdict(PROTOCOL, variant, prop, params, one.status, Status.PROVEN,
                   "page locality (checked on the encoding) + " + one.method,
                   "every action reads and writes one page's variables and every property reads one page, "
                   "so each page's projection of an N-page run is a one-page run; requests are counted per "
                   "page, so the one-page proof already covers any number of them; " + one.detail,
                   seconds=t_loc + one.seconds)


def _refutation(variant: str, prop: str, dropped: frozenset[str] = frozenset(), label: str | None = None
                ) -> Verdict:
    t0 = time.perf_counter()
    cex = bmc(KVPage, variant, {"pages": 1}, [prop], BMC_DEPTH, dropped)
    status = Status.REFUTED if cex else Status.UNKNOWN
    detail = (f"shortest counterexample: {len(cex.steps)} steps" if cex
              else f"no counterexample up to depth {BMC_DEPTH}")
    if dropped:
        detail = f"guard {', '.join(sorted(dropped))} removed; " + detail
    return Verdict(PROTOCOL, label or variant, prop, {"pages": 1}, status, Status.REFUTED,
                   f"BMC (shortest counterexample, depth <= {BMC_DEPTH})", detail,
                   seconds=time.perf_counter() - t0, **cex_verdict_fields(cex))


@functools.lru_cache(maxsize=None)
def _search(key: tuple) -> Exploration:
    return explore(KVPage, "fixed", dict(key), symmetry="page")


def _liveness(params: dict[str, int]) -> Verdict:
    t0 = time.perf_counter()
    ex = _search(tuple(sorted(params.items())))
    bad = fair_liveness_violations(ex, "page_returns_free")
    steps = witness = None
    if bad:
        steps = path_steps(ex, bad[0]["state"])
        witness = {"kind": bad[0]["kind"], "state": render_state(ex.layout, bad[0]["state"])}
    return Verdict(PROTOCOL, "fixed", "page_returns_free", params,
                   Status.REFUTED if bad else Status.PROVEN, Status.PROVEN,
                   "explicit-state search + fair-cycle analysis (strong fairness)",
                   f"{ex.states} states, {ex.edges} transitions (page symmetry reduced); no fair cycle or "
                   f"dead end keeps a page out of the free list", steps, witness, time.perf_counter() - t0)


def _deadlock(params: dict[str, int]) -> Verdict:
    t0 = time.perf_counter()
    ex = _search(tuple(sorted(params.items())))
    steps = witness = None
    if ex.deadlocks:
        steps = path_steps(ex, ex.deadlocks[0])
        witness = {"state": render_state(ex.layout, ex.deadlocks[0])}
    return Verdict(PROTOCOL, "fixed", "no_deadlock", params,
                   Status.REFUTED if ex.deadlocks or ex.violations else Status.PROVEN, Status.PROVEN,
                   "exhaustive explicit-state search",
                   f"{ex.states} states; every state has a successor unless all pages are free; "
                   f"properties hold in every reachable state", steps, witness, time.perf_counter() - t0)


def checks() -> list[Check]:
    """Every check of the KV page protocol, with its expected outcome."""
    out = []
    for pages in PROOF_PAGES:
        for prop in PROPERTIES:
            out.append(Check(PROTOCOL, "fixed", prop, {"pages": pages}, Status.PROVEN,
                             functools.partial(_proof, "fixed", prop, pages)))
    for prop in PROPERTIES:
        out.append(Check(PROTOCOL, "fixed", prop, {"pages": "any", "requests": "any"}, Status.PROVEN,
                         functools.partial(_any_pages, "fixed", prop)))
    for variant, prop in BUGS.items():
        for p in (prop, "free_only_when_unused"):
            out.append(Check(PROTOCOL, variant, p, {"pages": 1}, Status.REFUTED,
                             functools.partial(_refutation, variant, p)))
    for guard, prop in ESSENTIAL_GUARDS:
        label = f"fixed-without-{guard}"
        out.append(Check(PROTOCOL, label, prop, {"pages": 1}, Status.REFUTED,
                         functools.partial(_refutation, "fixed", prop, frozenset({guard}), label)))
    for params in SEARCH_PARAMS:
        out.append(Check(PROTOCOL, "fixed", "page_returns_free", params, Status.PROVEN,
                         functools.partial(_liveness, params)))
        out.append(Check(PROTOCOL, "fixed", "no_deadlock", params, Status.PROVEN,
                         functools.partial(_deadlock, params)))
    return out

