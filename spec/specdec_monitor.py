"""The speculative-decoding anomaly monitor of one generation, as a protocol.

Source: the GLM-5 production post-mortem (online anomaly detection). Speculative
decoding statistics expose KV corruption: when the KV a request reads is foreign
or garbage, the MTP drafts stop matching the model (low accept length); when the
output degenerates into a loop, every draft matches (accept rate near 1). The
post-mortem's rule: abort a generation when, after more than `min_tokens` generated
tokens, the mean accept length (bonus token included) falls below 1.4, or the accept
rate exceeds 0.96.

A statistic is a symptom, not evidence: a correct generation can loop too (a model's
greedy output often does), and aborting it is a false positive. So a crossing makes
the request a *suspect*, and the monitor then needs evidence: the runtime audits the
request's cached KV against a recomputation from its tokens (`runtime/serving/kv_audit.py`).
A mismatch is corruption, and only then is the generation aborted (`flag_*`); an intact
cache clears the suspicion and restarts the statistics window (`clear`), so the rule
re-arms after another `min_tokens` tokens.

The audit's outcome is decided here too: `clear` and `flag_*` take the audit's error as an
exact rational `error_num / error_den` (`audit_error(err)` encodes a float; `error_den = 0`
stands for no finite value, an infinite or NaN error) and compare it with the protocol's
`audit_rtol`: within it (and finite) only `clear` is enabled, beyond it only `flag_*`. The
runtime tries the actions by their role (`Protocol.tagged`: "suspicion", "audit_outcome"),
never by a list of its own.

The spec layer works on integers, so the thresholds are rationals compared by
cross-multiplication over the running totals of the window: `steps` verification
steps, `accepted` drafts and `drafted` drafts:

    mean accept length = (accepted + steps) / steps < LEN_NUM / LEN_DEN
                         <=>  LEN_DEN * (accepted + steps) < LEN_NUM * steps
    accept rate        = accepted / drafted > RATE_NUM / RATE_DEN
                         <=>  RATE_DEN * accepted > RATE_NUM * drafted

    audit error within rtol  <=>  error_den >= 1  and  RTOL_DEN * error_num <= RTOL_NUM * error_den

Actor: `monitor` (the decode scheduler's per-request monitor). `step` is disabled
once a rule is crossed, so the runtime cannot keep generating past a crossing
without raising the suspicion and settling it by an audit first (it gets a
ProtocolViolation instead).

Variants: `fixed` checks the rule only after `min_tokens`; `naive` suspects as soon as
the ratio crosses, which audits (and, on the post-mortem's semantics, aborted) healthy
requests whose first few steps were unlucky (the verifier refutes
`never_aborts_before_min_tokens` with a two-step trace). Thresholds are parameters:
`monitor_protocol(...)` builds the class for other values; `THRESHOLDS` holds them per model.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

from kvproof.spec.core import EnumT, Nat, Protocol, Var, action, invariant


class Phase(enum.IntEnum):
    """Where a monitored generation stands."""

    RUNNING = 0
    ABORTED_LOW_ACCEPT = 1      # low accept length, and the audit found the KV corrupted
    ABORTED_DEGENERATE = 2      # accept rate above the threshold, and the audit found the KV corrupted
    SUSPECT_LOW_ACCEPT = 3      # mean accept length below the threshold: KV audit pending
    SUSPECT_DEGENERATE = 4      # accept rate above the threshold: KV audit pending


def _low(P: Any, m: Any) -> Any:
    return P.LEN_DEN * (m.accepted[()] + m.steps[()]) < P.LEN_NUM * m.steps[()]


def _degenerate(P: Any, m: Any) -> Any:
    return P.RATE_DEN * m.accepted[()] > P.RATE_NUM * m.drafted[()]


def _armed(P: Any, m: Any) -> Any:
    return m.generated[()] > P.MIN_TOKENS


def _intact(P: Any, m: Any, num: Any, den: Any) -> Any:
    """The audit error num/den is finite (den >= 1) and within audit_rtol (cross-multiplied, as den > 0)."""
    return m.all([den >= 1, P.RTOL_DEN * num <= P.RTOL_NUM * den])


def _suspect(m: Any) -> Any:
    """A suspicion is raised and its KV audit pending (a predicate: `Instance.holds("suspected")`)."""
    return m.any([m.phase[()] == Phase.SUSPECT_LOW_ACCEPT, m.phase[()] == Phase.SUSPECT_DEGENERATE])


def _step(P: Any, m: Any, accepted: Any, drafted: Any) -> None:
    """One verification step: `drafted` tokens were proposed, the first `accepted` matched."""
    m.require(m.phase[()] == Phase.RUNNING, "running")
    m.require(drafted >= 1, "drafted_some")
    m.require(accepted <= drafted, "accepted_le_drafted")
    if m.variant == "fixed":
        m.require(m.not_(m.all([_armed(P, m), m.any([_low(P, m), _degenerate(P, m)])])),
                  "no_step_past_threshold")
    m.steps[()] = m.steps[()] + 1
    m.accepted[()] = m.accepted[()] + accepted
    m.drafted[()] = m.drafted[()] + drafted
    m.generated[()] = m.generated[()] + accepted + 1          # the drafts it kept plus the bonus token
    m.all_steps[()] = m.all_steps[()] + 1                     # the whole generation's (never reset)
    m.all_accepted[()] = m.all_accepted[()] + accepted
    m.all_drafted[()] = m.all_drafted[()] + drafted


def _suspect_low_accept(P: Any, m: Any) -> None:
    """Suspect KV corruption: the mean accept length fell below the threshold (audit the KV next)."""
    m.require(m.phase[()] == Phase.RUNNING, "running")
    if m.variant == "fixed":
        m.require(_armed(P, m), "past_min_tokens")
    m.require(_low(P, m), "accept_length_below_threshold")
    m.phase[()] = Phase.SUSPECT_LOW_ACCEPT


def _suspect_degenerate(P: Any, m: Any) -> None:
    """Suspect KV corruption: the accept rate rose above the threshold (audit the KV next)."""
    m.require(m.phase[()] == Phase.RUNNING, "running")
    if m.variant == "fixed":
        m.require(_armed(P, m), "past_min_tokens")
    m.require(_degenerate(P, m), "accept_rate_above_threshold")
    m.phase[()] = Phase.SUSPECT_DEGENERATE


def _record_audit(m: Any, error_num: Any, error_den: Any) -> None:
    m.last_error_num[()] = error_num
    m.last_error_den[()] = error_den


def _clear(P: Any, m: Any, error_num: Any, error_den: Any) -> None:
    """The audit's error is finite and within audit_rtol, the cached KV intact: resume, restart the window."""
    m.require(_suspect(m), "suspect")
    m.require(error_den >= 1, "audit_error_finite")
    m.require(P.RTOL_DEN * error_num <= P.RTOL_NUM * error_den, "audit_error_within_rtol")
    _record_audit(m, error_num, error_den)
    m.phase[()] = Phase.RUNNING
    m.steps[()] = 0
    m.accepted[()] = 0
    m.drafted[()] = 0
    m.generated[()] = 0
    m.audits[()] = m.audits[()] + 1


def _flag_low_accept(P: Any, m: Any, error_num: Any, error_den: Any) -> None:
    """Abort: low accept length, and the audit's error (infinite, NaN or beyond audit_rtol) shows corrupted KV."""
    m.require(m.phase[()] == Phase.SUSPECT_LOW_ACCEPT, "suspect_low_accept")
    m.require(m.not_(_intact(P, m, error_num, error_den)), "audit_error_beyond_rtol")
    _record_audit(m, error_num, error_den)
    m.phase[()] = Phase.ABORTED_LOW_ACCEPT


def _flag_degenerate(P: Any, m: Any, error_num: Any, error_den: Any) -> None:
    """Abort: degenerate accept rate, and the audit's error (infinite, NaN or beyond audit_rtol) shows corrupted KV."""
    m.require(m.phase[()] == Phase.SUSPECT_DEGENERATE, "suspect_degenerate")
    m.require(m.not_(_intact(P, m, error_num, error_den)), "audit_error_beyond_rtol")
    _record_audit(m, error_num, error_den)
    m.phase[()] = Phase.ABORTED_DEGENERATE


def _never_aborts_before_min_tokens(P: Any, m: Any) -> Any:
    """A generation is suspected (so audited or aborted) only after more than min_tokens tokens of its window."""
    return m.implies(m.phase[()] != Phase.RUNNING, _armed(P, m))


def _aborts_only_on_threshold(P: Any, m: Any) -> Any:
    """Each suspicion and abort reason holds of the window totals it was taken on."""
    low = m.any([m.phase[()] == Phase.SUSPECT_LOW_ACCEPT, m.phase[()] == Phase.ABORTED_LOW_ACCEPT])
    deg = m.any([m.phase[()] == Phase.SUSPECT_DEGENERATE, m.phase[()] == Phase.ABORTED_DEGENERATE])
    return m.all([m.implies(low, _low(P, m)), m.implies(deg, _degenerate(P, m))])


def _counts_consistent(P: Any, m: Any) -> Any:
    """Totals add up: accepted <= drafted, generated = accepted + steps, steps <= drafted; window <= whole."""
    return m.all([m.accepted[()] <= m.drafted[()], m.generated[()] == m.accepted[()] + m.steps[()],
                  m.steps[()] <= m.drafted[()], m.implies(m.steps[()] == 0, m.drafted[()] == 0),
                  m.all_accepted[()] <= m.all_drafted[()], m.steps[()] <= m.all_steps[()],
                  m.accepted[()] <= m.all_accepted[()], m.drafted[()] <= m.all_drafted[()]])


def _no_abort_while_healthy(P: Any, m: Any) -> Any:
    """With no verification step in the window the monitor is running (no spurious suspicion)."""
    return m.implies(m.steps[()] == 0, m.phase[()] == Phase.RUNNING)


def _aborts_only_on_audit_evidence(P: Any, m: Any) -> Any:
    """An aborted generation's last audit found an infinite, NaN or beyond-audit_rtol KV error."""
    return m.implies(_aborted(m), m.not_(_intact(P, m, m.last_error_num[()], m.last_error_den[()])))


def _resumes_only_on_intact_audit(P: Any, m: Any) -> Any:
    """A running generation that was audited had its last audit's KV error finite and within audit_rtol."""
    return m.implies(m.all([m.phase[()] == Phase.RUNNING, m.audits[()] > 0]),
                     _intact(P, m, m.last_error_num[()], m.last_error_den[()]))


def _running(m: Any) -> Any:
    """The generation is not suspected or aborted (a predicate the runtime asks through Instance.holds)."""
    return m.phase[()] == Phase.RUNNING


def _aborted(m: Any) -> Any:
    """The generation was aborted: a suspicion the KV audit confirmed."""
    return m.any([m.phase[()] == Phase.ABORTED_LOW_ACCEPT, m.phase[()] == Phase.ABORTED_DEGENERATE])


# roles of actions (Protocol.tagged): what the runtime tries after a step, and after a KV audit
SUSPICION, AUDIT_OUTCOME = "suspicion", "audit_outcome"
_AUDIT_ARGS = {"error_num": "data:max_audit", "error_den": "data:max_audit"}


def audit_error(err: float) -> dict[str, int]:
    """A KV audit's error as the audit-outcome actions' arguments: exact num/den; den 0 for inf or NaN."""
    if not math.isfinite(err):
        return {"error_num": 1, "error_den": 0}
    if err < 0:
        raise ValueError(f"KV audit error {err!r}; expected a relative difference >= 0 (or inf/NaN)")
    num, den = float(err).as_integer_ratio()
    return {"error_num": num, "error_den": den}


PROPERTIES = ("never_aborts_before_min_tokens", "aborts_only_on_threshold", "counts_consistent",
              "no_abort_while_healthy", "aborts_only_on_audit_evidence", "resumes_only_on_intact_audit")


def monitor_protocol(min_tokens: int = 128, min_accept_length: Fraction = Fraction(7, 5),
                     max_accept_rate: Fraction = Fraction(24, 25), audit_rtol: Fraction = Fraction(1, 2)
                     ) -> type[Protocol]:
    """The monitor protocol class for these thresholds (cached: one class per setting, however passed)."""
    return _monitor_protocol(int(min_tokens), Fraction(min_accept_length), Fraction(max_accept_rate),
                             Fraction(audit_rtol))


@lru_cache(maxsize=None)
def _monitor_protocol(min_tokens: int, min_accept_length: Fraction, max_accept_rate: Fraction,
                      audit_rtol: Fraction) -> type[Protocol]:
    if min_tokens < 0:
        raise ValueError(f"min_tokens={min_tokens}; expected >= 0")
    if not 1 <= min_accept_length:
        raise ValueError(f"min_accept_length={min_accept_length}; expected >= 1")
    if not 0 < max_accept_rate <= 1:
        raise ValueError(f"max_accept_rate={max_accept_rate}; expected in (0, 1]")
    if audit_rtol < 0:
        raise ValueError(f"audit_rtol={audit_rtol}; expected >= 0")
    ns: dict[str, Any] = {
        "__doc__": __doc__.split("\n\n")[0],
        "__module__": __name__,
        "name": "specdec_monitor",
        "variants": ("fixed", "naive"),
        "actors": ("monitor",),
        "indices": {},
        # max_audit: the audit error's numerator and denominator in explicit search (0..2 each: finite
        # errors on both sides of any audit_rtol in (0, 2), and den 0, an infinite or NaN error)
        "bounds": {"max_draft": 3, "max_audit": 2},
        "sanity_depth": 16,
        "sanity_method": "bmc",         # unbounded counters: the sanity search is BMC, not exhaustive

        "vars": {
            "phase": Var(EnumT(Phase), (), "monitor", doc="running, suspected (audit pending) or why aborted"),
            "steps": Var(Nat(), (), "monitor", doc="verification steps in the window"),
            "accepted": Var(Nat(), (), "monitor", doc="drafts accepted in the window"),
            "drafted": Var(Nat(), (), "monitor", doc="drafts proposed in the window"),
            "generated": Var(Nat(), (), "monitor", doc="tokens generated by the window's steps"),
            "audits": Var(Nat(), (), "monitor", doc="KV audits that found the cache intact"),
            "all_steps": Var(Nat(), (), "monitor", doc="verification steps of the whole generation"),
            "all_accepted": Var(Nat(), (), "monitor", doc="drafts accepted, whole generation"),
            "all_drafted": Var(Nat(), (), "monitor", doc="drafts proposed, whole generation"),
            "last_error_num": Var(Nat(), (), "ghost", doc="the last KV audit's error, numerator"),
            "last_error_den": Var(Nat(), (), "ghost", doc="the last KV audit's error, denominator (0: inf or NaN)"),
        },
        "MIN_TOKENS": int(min_tokens),
        "LEN_NUM": min_accept_length.numerator, "LEN_DEN": min_accept_length.denominator,
        "RATE_NUM": max_accept_rate.numerator, "RATE_DEN": max_accept_rate.denominator,
        "RTOL_NUM": audit_rtol.numerator, "RTOL_DEN": audit_rtol.denominator,
        "step": action("monitor", accepted="data:max_draft", drafted="data:max_draft")(_step),
        # the runtime tries these by role (Protocol.tagged): after each step the suspicions, after an
        # audit its outcomes with the audit's error (`audit_error`)
        "suspect_low_accept": action("monitor", tags=(SUSPICION,))(_suspect_low_accept),
        "suspect_degenerate": action("monitor", tags=(SUSPICION,))(_suspect_degenerate),
        "clear": action("monitor", tags=(AUDIT_OUTCOME,), **_AUDIT_ARGS)(_clear),
        "flag_low_accept": action("monitor", tags=(AUDIT_OUTCOME,), **_AUDIT_ARGS)(_flag_low_accept),
        "flag_degenerate": action("monitor", tags=(AUDIT_OUTCOME,), **_AUDIT_ARGS)(_flag_degenerate),
        "running": staticmethod(_running),
        "suspected": staticmethod(_suspect),
        "aborted": staticmethod(_aborted),
    }
    for prop in PROPERTIES:
        ns[prop] = invariant(globals()["_" + prop])
    name = f"AcceptMonitor_{min_tokens}_{min_accept_length.numerator}_{min_accept_length.denominator}" \
           f"_{max_accept_rate.numerator}_{max_accept_rate.denominator}_{audit_rtol.numerator}_{audit_rtol.denominator}"
    cls = type(name, (Protocol,), ns)
    # A suspicion needs > min_tokens tokens (about 92 steps for a low accept length at 128): the sanity
    # search (verify/sanity.py) runs on the same monitor with min_tokens=4, within its reach.
    cls.sanity_instance = monitor_protocol(4, min_accept_length, max_accept_rate, audit_rtol) \
        if min_tokens > 4 else None
    return cls


AcceptMonitor = monitor_protocol()


@dataclass(frozen=True)
class Thresholds:
    """The monitor's settings for one served model."""

    min_tokens: int                  # a rule is armed after more than this many tokens of the window
    min_accept_length: Fraction      # suspect below this mean accept length (bonus token included)
    max_accept_rate: Fraction        # suspect above this accept rate
    audit_rtol: Fraction             # KV audit: the largest relative difference (per layer and position)
                                     # between a cached KV row and its recomputation that counts as intact

    def protocol(self) -> type[Protocol]:
        """The monitor protocol class of these thresholds."""
        return monitor_protocol(self.min_tokens, self.min_accept_length, self.max_accept_rate, self.audit_rtol)


# The thresholds per served model. The runtime takes its defaults from here (`thresholds_for`), and
# `kvproof prove` checks every entry. A model missing here gets the post-mortem's rule, calibrated on
# GLM-5's MTP head. An abort needs the KV audit's evidence, so the statistics thresholds set how often
# a clean request pays for an audit and how much corruption is caught, not the false-positive rate.
THRESHOLDS: dict[str, Thresholds] = {
    # audit_rtol 1/2 (both entries): a correct recomputation differs from the incrementally cached rows by
    # rounding (~1e-16 in float64; ~1e-2 expected in bf16, not measured here) and, past the first layer,
    # where the indexer's top-k picks differently in another batch layout (the Triton backend's fp8
    # indexer: up to 0.11 on a few positions, measured on the tiny model); foreign KV (another request's
    # rows) differs by ~1.4, the injected bit flips by ~27.
    "post_mortem": Thresholds(128, Fraction(7, 5), Fraction(24, 25), Fraction(1, 2)),
    # The embedded seeded model (`tiny`, float64): its greedy output falls into attention-driven loops its
    # token-path MTP head cannot predict on ~15% of coding-agent prompts (accept length 1.00-1.4 after 128
    # tokens), or into loops along the token path (accept rate 1.0), and KV corruption lands at 1.00-1.15.
    # Calibrated on 300 clean + 100 corrupted requests of 400 greedy tokens (prompt seed 7, not the
    # bench's): 1.2 suspects every corrupted request in its first window and ~17% of clean ones (about one
    # audit per three requests).
    "tiny": Thresholds(128, Fraction(6, 5), Fraction(24, 25), Fraction(1, 2)),
}


def thresholds_for(model: str) -> Thresholds:
    """The monitor thresholds of a served model (by its config name): its entry, else the post-mortem's."""
    return THRESHOLDS.get(model, THRESHOLDS["post_mortem"])
