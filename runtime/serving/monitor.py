"""The runtime anomaly monitor: fires the spec'd monitor protocol (spec/specdec_monitor.py) per request.

The decision to abort is the spec's: the runtime fires `step` after each verification
step and then asks whether `flag_low_accept` / `flag_degenerate` is enabled; firing it
is the only way a monitored request becomes aborted.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from kvproof.spec.machine import Instance
from kvproof.spec.specdec_monitor import Phase, monitor_protocol


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of the anomaly rule (defaults from the post-mortem)."""

    enabled: bool = True
    min_tokens: int = 128              # rule armed only after more than this many generated tokens
    min_accept_length: float = 1.4     # abort below this mean accept length (bonus token included)
    max_accept_rate: float = 0.96      # abort above this accept rate (degenerate repetition)

    def __post_init__(self) -> None:
        if self.min_tokens < 0:
            raise ValueError(f"MonitorConfig.min_tokens={self.min_tokens}; expected >= 0")
        if self.min_accept_length < 1:
            raise ValueError(f"MonitorConfig.min_accept_length={self.min_accept_length}; expected >= 1")
        if not 0 < self.max_accept_rate <= 1:
            raise ValueError(f"MonitorConfig.max_accept_rate={self.max_accept_rate}; expected in (0, 1]")


class RequestMonitor:
    """Accept statistics of one generation, kept in a spec instance; says when to abort."""

    def __init__(self, cfg: MonitorConfig, variant: str = "fixed") -> None:
        self.cfg = cfg
        proto = monitor_protocol(cfg.min_tokens, Fraction(cfg.min_accept_length).limit_denominator(1000),
                                 Fraction(cfg.max_accept_rate).limit_denominator(1000))
        self.inst = Instance(proto, variant, {}, actor="monitor")
        self.reason: str | None = None
        self._plain = [0, 0, 0]            # steps, accepted, drafted when the rule is disabled

    @property
    def steps(self) -> int:
        """Verification steps so far."""
        return self.inst.get("steps") if self.cfg.enabled else self._plain[0]

    @property
    def accepted(self) -> int:
        """Accepted drafts so far."""
        return self.inst.get("accepted") if self.cfg.enabled else self._plain[1]

    @property
    def drafted(self) -> int:
        """Proposed drafts so far."""
        return self.inst.get("drafted") if self.cfg.enabled else self._plain[2]

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
        if not self.cfg.enabled:           # statistics only; the spec instance stays idle
            self._plain = [self._plain[0] + 1, self._plain[1] + accepted, self._plain[2] + drafted]
            return None
        self.inst.fire("step", accepted=accepted, drafted=drafted)
        for action, reason in (("flag_low_accept", "low_accept_length"),
                               ("flag_degenerate", "degenerate_accept_rate")):
            if self.inst.enabled(action):
                self.inst.fire(action)
                self.reason = reason
                return reason
        return None

    @property
    def aborted(self) -> bool:
        """Whether the rule fired."""
        return self.inst.get("phase") != Phase.RUNNING
