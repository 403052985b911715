"""The runtime anomaly monitor: fires the spec'd monitor protocol (spec/specdec_monitor.py) per request.

Its thresholds default to the spec's per-model table (`THRESHOLDS`, checked by `kvproof prove`).

The decisions are the spec's: the runtime fires `step` after each verification step and
then tries the spec's suspicion actions (its actions tagged "suspicion"). A suspicion is
settled by evidence: the request's `audit` (the engine binds `kv_audit.kv_error` on the
request's cached KV) measures how far the cache is from a recomputation, and the monitor
tries the spec's audit outcomes (tagged "audit_outcome") with that error: the spec enables
`clear` (the request goes on) for a finite error within its `audit_rtol`, else `flag_*`,
which is the only way a monitored request becomes aborted.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from kvproof.spec.compiled import FastInstance
from kvproof.spec.specdec_monitor import (AUDIT_OUTCOME, SUSPICION, Phase, audit_error, monitor_protocol,
                                          thresholds_for)


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the anomaly rule; None takes the spec's value for the served model (`THRESHOLDS`)."""

    enabled: bool = True
    min_tokens: int | None = None              # rule armed only after more than this many generated tokens
    min_accept_length: float | None = None     # suspect below this mean accept length (bonus token included)
    max_accept_rate: float | None = None       # suspect above this accept rate (degenerate repetition)

    def __post_init__(self) -> None:
        if self.min_tokens is not None and self.min_tokens < 0:
            raise ValueError(f"MonitorConfig.min_tokens={self.min_tokens}; expected >= 0")
        if self.min_accept_length is not None and self.min_accept_length < 1:
            raise ValueError(f"MonitorConfig.min_accept_length={self.min_accept_length}; expected >= 1")
        if self.max_accept_rate is not None and not 0 < self.max_accept_rate <= 1:
            raise ValueError(f"MonitorConfig.max_accept_rate={self.max_accept_rate}; expected in (0, 1]")

    @classmethod
    def of(cls, model: str, enabled: bool = True) -> "MonitorConfig":
        """The spec's thresholds for `model` (a THRESHOLDS key such as "post_mortem" or "tiny")."""
        t = thresholds_for(model)
        return cls(enabled, t.min_tokens, float(t.min_accept_length), float(t.max_accept_rate))

    def resolved(self, model: str) -> "MonitorConfig":
        """Every None filled in from the spec's thresholds for `model`."""
        d = MonitorConfig.of(model)
        return MonitorConfig(self.enabled, d.min_tokens if self.min_tokens is None else self.min_tokens,
                             d.min_accept_length if self.min_accept_length is None else self.min_accept_length,
                             d.max_accept_rate if self.max_accept_rate is None else self.max_accept_rate)


# the abort reason each aborted phase reports (the rule whose suspicion the KV audit confirmed)
_REASONS = {Phase.ABORTED_LOW_ACCEPT: "low_accept_length", Phase.ABORTED_DEGENERATE: "degenerate_accept_rate"}


class RequestMonitor:
    """Accept statistics of one generation, kept in a spec instance; audits the KV on a suspicion, says when to abort.

    `audit` returns the KV audit's error (`kv_audit.kv_error` of this request); the spec's audit outcomes compare
    it with the model's `audit_rtol`. A monitor without an audit has no evidence to act on: it refuses to run
    enabled (`post_mortem_audit` gives the post-mortem's abort-on-statistics semantics explicitly).
    """

    def __init__(self, cfg: MonitorConfig, variant: str = "fixed", model: str = "post_mortem",
                 audit: Callable[[], float] | None = None) -> None:
        self.cfg = cfg = cfg.resolved(model)
        assert cfg.min_tokens is not None and cfg.min_accept_length is not None and cfg.max_accept_rate is not None
        if cfg.enabled and audit is None:
            raise ValueError("RequestMonitor: an enabled monitor needs an `audit` (the request's KV audit) "
                             "to settle a suspicion; expected a callable returning the KV error")
        self.audit = audit
        # the audit tolerance is the spec's, for the model: a protocol constant its outcome guards compare with
        proto = monitor_protocol(cfg.min_tokens, Fraction(cfg.min_accept_length).limit_denominator(1000),
                                 Fraction(cfg.max_accept_rate).limit_denominator(1000),
                                 thresholds_for(model).audit_rtol)
        # what to try after a step, and after an audit: the spec's actions of those roles
        self._suspicions, self._outcomes = proto.tagged(SUSPICION), proto.tagged(AUDIT_OUTCOME)
        # rule disabled: the naive variant's `step` has no threshold guard, so the instance only
        # keeps the statistics (its suspicions are never asked)
        self.inst = FastInstance(proto, variant if cfg.enabled else "naive", {}, actor="monitor")  # per token: compiled
        self.last_error: float | None = None      # the latest audit's KV error (None before any audit)

    @property
    def steps(self) -> int:
        """Verification steps in the current window."""
        return self.inst.get("steps")

    @property
    def accepted(self) -> int:
        """Accepted drafts in the current window."""
        return self.inst.get("accepted")

    @property
    def drafted(self) -> int:
        """Proposed drafts in the current window."""
        return self.inst.get("drafted")

    @property
    def audits(self) -> int:
        """KV audits that found the cache intact (each cleared a suspicion)."""
        return self.inst.get("audits")

    @property
    def reason(self) -> str | None:
        """Why the request was aborted (from the spec's phase), or None while it is not."""
        return _REASONS.get(Phase(self.inst.get("phase")))

    @property
    def accept_length(self) -> float:
        """Mean tokens per verification step of the whole generation, bonus token included (0 before any step)."""
        s = self.inst.get("all_steps")
        return (self.inst.get("all_accepted") + s) / s if s else 0.0

    @property
    def accept_rate(self) -> float:
        """Accepted / drafted over the whole generation (0 before any draft)."""
        d = self.inst.get("all_drafted")
        return self.inst.get("all_accepted") / d if d else 0.0

    def step(self, accepted: int, drafted: int) -> str | None:
        """Record one verification step, audit the KV on a suspicion; the abort reason when confirmed, else None."""
        inst = self.inst
        inst.fire("step", accepted=accepted, drafted=drafted)
        if not self.cfg.enabled:           # statistics only
            return None
        for a in self._suspicions:         # a compiled refusal is cheap: no `enabled` pre-check
            if inst.try_fire(a):
                break
        else:
            return None
        assert self.audit is not None
        self.last_error = err = self.audit()
        evidence = audit_error(err)
        for a in self._outcomes:           # the spec enables one: clear (reason None) or the suspicion's flag
            if inst.try_fire(a, **evidence):
                return self.reason
        raise AssertionError(f"a suspect monitor settles its audit (error {err!r}) by one of {self._outcomes} "
                             f"(spec/specdec_monitor.py): {[inst.why_disabled(a, **evidence) for a in self._outcomes]}")

    @property
    def aborted(self) -> bool:
        """Whether the rule fired and the audit confirmed it."""
        return self.inst.holds("aborted")


def post_mortem_audit() -> float:
    """An audit that always reports corruption: every suspicion aborts (the post-mortem's rule, for comparisons)."""
    return float("inf")
