"""The runtime anomaly monitor: fires the spec'd monitor protocol (spec/specdec_monitor.py) per request.

Its thresholds default to the spec's per-model table (`THRESHOLDS`, checked by `kvproof prove`).

The decision to abort is the spec's: the runtime fires `step` after each verification
step and then asks whether `flag_low_accept` / `flag_degenerate` is enabled; firing it
is the only way a monitored request becomes aborted.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from kvproof.spec.compiled import FastInstance
from kvproof.spec.specdec_monitor import Phase, monitor_protocol, thresholds_for


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the anomaly rule; None takes the spec's value for the served model (`THRESHOLDS`)."""

    enabled: bool = True
    min_tokens: int | None = None              # rule armed only after more than this many generated tokens
    min_accept_length: float | None = None     # abort below this mean accept length (bonus token included)
    max_accept_rate: float | None = None       # abort above this accept rate (degenerate repetition)

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
        mt, length, rate = thresholds_for(model)
        return cls(enabled, mt, float(length), float(rate))

    def resolved(self, model: str) -> "MonitorConfig":
        """Every None filled in from the spec's thresholds for `model`."""
        d = MonitorConfig.of(model)
        return MonitorConfig(self.enabled, d.min_tokens if self.min_tokens is None else self.min_tokens,
                             d.min_accept_length if self.min_accept_length is None else self.min_accept_length,
                             d.max_accept_rate if self.max_accept_rate is None else self.max_accept_rate)


# the abort reason each aborted phase reports
_REASONS = {Phase.ABORTED_LOW_ACCEPT: "low_accept_length", Phase.ABORTED_DEGENERATE: "degenerate_accept_rate"}


class RequestMonitor:
    """Accept statistics of one generation, kept in a spec instance; says when to abort."""

    def __init__(self, cfg: MonitorConfig, variant: str = "fixed", model: str = "post_mortem") -> None:
        self.cfg = cfg = cfg.resolved(model)
        assert cfg.min_tokens is not None and cfg.min_accept_length is not None and cfg.max_accept_rate is not None
        proto = monitor_protocol(cfg.min_tokens, Fraction(cfg.min_accept_length).limit_denominator(1000),
                                 Fraction(cfg.max_accept_rate).limit_denominator(1000))
        # rule disabled: the naive variant's `step` has no threshold guard, so the instance only
        # keeps the statistics (its flags are never asked)
        self.inst = FastInstance(proto, variant if cfg.enabled else "naive", {}, actor="monitor")  # per token: compiled

    @property
    def steps(self) -> int:
        """Verification steps so far."""
        return self.inst.get("steps")

    @property
    def accepted(self) -> int:
        """Accepted drafts so far."""
        return self.inst.get("accepted")

    @property
    def drafted(self) -> int:
        """Proposed drafts so far."""
        return self.inst.get("drafted")

    @property
    def reason(self) -> str | None:
        """Why the rule fired (from the spec's phase), or None while running."""
        return _REASONS.get(Phase(self.inst.get("phase")))

    @property
    def accept_length(self) -> float:
        """Mean tokens per verification step, bonus token included (0 before any step)."""
        s = self.steps
        return (self.accepted + s) / s if s else 0.0

    @property
    def accept_rate(self) -> float:
        """Accepted / drafted (0 before any draft)."""
        d = self.drafted
        return self.accepted / d if d else 0.0

    def step(self, accepted: int, drafted: int) -> str | None:
        """Record one verification step; returns the abort reason when the rule fires, else None."""
        self.inst.fire("step", accepted=accepted, drafted=drafted)
        if not self.cfg.enabled:           # statistics only
            return None
        for action in ("flag_low_accept", "flag_degenerate"):
            # `enabled` first: a refused try_fire re-runs the body interpreted to name the guard (per token)
            if self.inst.enabled(action) and self.inst.try_fire(action):
                return self.reason
        return None

    @property
    def aborted(self) -> bool:
        """Whether the rule fired."""
        return not self.inst.holds("running")
