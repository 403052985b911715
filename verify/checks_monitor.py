"""Checks of the speculative-decoding anomaly monitor for `kvproof prove`.

`fixed`: every property proven by 1-induction of their conjunction (unbounded: the
counters and the audit's error num/den are unbounded integers in Z3; `clear` resets the
window, `flag_*` only follow a suspicion, and which of them settles it is the audit error's
comparison with `audit_rtol`, inf/NaN as corrupted). `naive` (no min-tokens guard): the verifier
refutes `never_aborts_before_min_tokens` with a shortest trace; the rest still hold.
Guard removals (`fixed-without-G`): without each guard of the audit's decision the verifier
finds the property it protects violated (an abort on an intact audit, a resumption on a
corrupted one, or on an infinite/NaN error), so the audit properties are not vacuous.
`audit_settles_once` (Z3, per variant and threshold set): in every suspected state, for every
audit error num/den >= 0, exactly one of the actions tagged "audit_outcome" is enabled, so the
runtime, which tries them in turn, always settles a suspicion, and by one outcome only.
"""
from __future__ import annotations

import dataclasses
import time
from functools import partial

import z3

from kvproof.spec.core import Protocol
from kvproof.spec.machine import View, evaluate
from kvproof.spec.specdec_monitor import AUDIT_OUTCOME, PROPERTIES, THRESHOLDS, AcceptMonitor
from kvproof.verify.bmc import bmc, induction
from kvproof.verify.registry import Check
from kvproof.verify.symbolic import Z3, Encoding
from kvproof.verify.verdict import Status, Verdict

PROTOCOL = "specdec_monitor"
BMC_DEPTH = 6
PARAMS = {"min_tokens": AcceptMonitor.MIN_TOKENS,
          "min_accept_length": f"{AcceptMonitor.LEN_NUM}/{AcceptMonitor.LEN_DEN}",
          "max_accept_rate": f"{AcceptMonitor.RATE_NUM}/{AcceptMonitor.RATE_DEN}",
          "audit_rtol": f"{AcceptMonitor.RTOL_NUM}/{AcceptMonitor.RTOL_DEN}"}


# guard of the audit's decision -> the property its removal breaks
AUDIT_GUARDS = {"audit_error_beyond_rtol": "aborts_only_on_audit_evidence",
                "audit_error_within_rtol": "resumes_only_on_intact_audit",
                "audit_error_finite": "resumes_only_on_intact_audit"}


def _expected(variant: str, prop: str) -> Status:
    return Status.REFUTED if (variant, prop) == ("naive", "never_aborts_before_min_tokens") else Status.PROVEN


def _check(variant: str, prop: str, proto: type[Protocol] = AcceptMonitor, params: dict | None = None) -> Verdict:
    """BMC for a shortest counterexample, then 1-induction of the properties expected to hold."""
    AcceptMonitor, PARAMS = proto, params if params is not None else globals()["PARAMS"]  # noqa: N806
    t0 = time.perf_counter()
    expected = _expected(variant, prop)
    cex = bmc(AcceptMonitor, variant, {}, [prop], BMC_DEPTH)
    if cex is not None:
        return Verdict(PROTOCOL, variant, prop, PARAMS, Status.REFUTED, expected,
                       method=f"BMC (shortest counterexample, {len(cex.steps)} steps)",
                       detail=f"{prop} fails after {len(cex.steps)} steps", counterexample=cex.steps,
                       seconds=time.perf_counter() - t0)
    held = [p for p in PROPERTIES if _expected(variant, p) == Status.PROVEN]
    res = induction(AcceptMonitor, variant, {}, held, k=1)
    if res.proven:
        return Verdict(PROTOCOL, variant, prop, PARAMS, Status.PROVEN, expected,
                       method="k-induction (k=1), unbounded counters",
                       detail=f"inductive together with {', '.join(p for p in held if p != prop)}",
                       seconds=time.perf_counter() - t0)
    return Verdict(PROTOCOL, variant, prop, PARAMS, Status.UNKNOWN, expected,
                   method=f"BMC to depth {BMC_DEPTH}; 1-induction failed",
                   detail=f"no counterexample up to depth {BMC_DEPTH}; induction failed on {res.failed}",
                   seconds=time.perf_counter() - t0)


SETTLES = "audit_settles_once"


def _settles(variant: str, proto: type[Protocol] = AcceptMonitor, params: dict | None = None,
             dropped: frozenset[str] = frozenset()) -> Verdict:
    """Z3: from any suspected state (any counters), any audit error enables exactly one audit outcome."""
    params = params if params is not None else PARAMS
    t0 = time.perf_counter()
    enc = Encoding(proto, variant, {})
    st = enc.state(0)
    num, den = z3.Ints("error_num error_den")
    outcomes = proto.tagged(AUDIT_OUTCOME)
    enabled = {a: z3.And(*[c for _, _, c in evaluate(enc.layout, st, proto.actions[a],
                                                      {"error_num": num, "error_den": den}, Z3, enc.variant,
                                                      dropped).guards])
               for a in outcomes}
    given = [enc.domain(0), proto.suspected(View(enc.layout, st, Z3, enc.variant)), num >= 0, den >= 0]
    for what, bad in [("none enabled", z3.Not(z3.Or(*enabled.values())))] + [
            (f"{a} and {b} both enabled", z3.And(enabled[a], enabled[b]))
            for i, a in enumerate(outcomes) for b in outcomes[i + 1:]]:
        s = z3.Solver()
        s.add(*given, bad)
        if s.check() == z3.sat:
            mdl = s.model()
            return Verdict(PROTOCOL, variant, SETTLES, params, Status.REFUTED, Status.PROVEN, "Z3 (validity)",
                           f"{what} in {enc.value(mdl, 0)} with error {mdl.eval(num)}/{mdl.eval(den)}",
                           seconds=time.perf_counter() - t0)
    return Verdict(PROTOCOL, variant, SETTLES, params, Status.PROVEN, Status.PROVEN, "Z3 (validity), unbounded",
                   f"exactly one of {', '.join(outcomes)} is enabled in every suspected state for every error",
                   seconds=time.perf_counter() - t0)


def _guard_removal(guard: str, prop: str) -> Verdict:
    """BMC of `fixed` without `guard`: the shortest trace that breaks `prop`."""
    t0 = time.perf_counter()
    label = f"fixed-without-{guard}"
    cex = bmc(AcceptMonitor, "fixed", {}, [prop], BMC_DEPTH, frozenset({guard}))
    if cex is None:
        return Verdict(PROTOCOL, label, prop, PARAMS, Status.UNKNOWN, Status.REFUTED,
                       method=f"BMC to depth {BMC_DEPTH}", detail=f"guard {guard} removed; no counterexample",
                       seconds=time.perf_counter() - t0)
    return Verdict(PROTOCOL, label, prop, PARAMS, Status.REFUTED, Status.REFUTED,
                   method=f"BMC (shortest counterexample, {len(cex.steps)} steps)",
                   detail=f"guard {guard} removed; {prop} fails after {len(cex.steps)} steps",
                   counterexample=cex.steps, seconds=time.perf_counter() - t0)


def checks() -> list[Check]:
    """The checks `kvproof prove` runs for this protocol (collected explicitly; importing registers nothing)."""
    out: list[Check] = []
    for variant in AcceptMonitor.variants:
        for prop in PROPERTIES:
            out.append(Check(PROTOCOL, variant, prop, PARAMS, _expected(variant, prop),
                           partial(_check, variant, prop)))
        out.append(Check(PROTOCOL, variant, SETTLES, PARAMS, Status.PROVEN, partial(_settles, variant)))
    for guard, prop in AUDIT_GUARDS.items():
        out.append(Check(PROTOCOL, f"fixed-without-{guard}", prop, PARAMS, Status.REFUTED,
                         partial(_guard_removal, guard, prop)))
    out = [dataclasses.replace(c, spec=AcceptMonitor) for c in out]
    # every other per-model threshold set of the spec (the runtime's defaults for those models)
    for model, t in THRESHOLDS.items():
        proto = t.protocol()
        if proto is AcceptMonitor:
            continue                                        # the checks above (monitor_protocol is cached)
        mt, length, rate, rtol = t.min_tokens, t.min_accept_length, t.max_accept_rate, t.audit_rtol
        params = {"model": model, "min_tokens": mt, "min_accept_length": f"{length.numerator}/{length.denominator}",
                  "max_accept_rate": f"{rate.numerator}/{rate.denominator}",
                  "audit_rtol": f"{rtol.numerator}/{rtol.denominator}"}
        out += [dataclasses.replace(Check(PROTOCOL, variant, prop, params, _expected(variant, prop),
                                          partial(_check, variant, prop, proto, params)), spec=proto)
                for variant in proto.variants for prop in PROPERTIES]
        out += [dataclasses.replace(Check(PROTOCOL, variant, SETTLES, params, Status.PROVEN,
                                          partial(_settles, variant, proto, params)), spec=proto)
                for variant in proto.variants]
    return out
