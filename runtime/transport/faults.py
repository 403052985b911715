"""Fault injection for the TCP transport: late-landing writes, reordering, connection drops.

Faults are applied at the sender, before a write goes on the wire, so a delayed
write really lands later than writes and control messages sent after it. Each
connection owns its own random stream, so two connections with delays reorder
relative to each other as well as within themselves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

DelayDist = Literal["fixed", "exponential", "uniform"]


@dataclass(frozen=True)
class FaultConfig:
    """What to inject on one connection. The default injects nothing."""

    delay_ms: float | None = None  # mean delay of a delayed write; None: no delay
    delay_dist: DelayDist = "exponential"  # uniform means U(0, 2*delay_ms)
    delay_prob: float = 1.0  # fraction of writes that get a delay
    preserve_order: bool = False  # True: delays never reorder writes of this connection (RC QP order)
    drop_after_writes: int | None = None  # drop the connection once this many writes were sent
    drop_prob: float = 0.0  # per-write probability to drop the connection instead of sending
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay_ms is not None and not self.delay_ms >= 0:
            raise ValueError(f"delay_ms={self.delay_ms!r}, expected None or >= 0")
        if self.delay_dist not in ("fixed", "exponential", "uniform"):
            raise ValueError(f"delay_dist={self.delay_dist!r}, expected fixed|exponential|uniform")
        for name in ("delay_prob", "drop_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p!r}, expected a probability in [0, 1]")
        if self.drop_after_writes is not None and self.drop_after_writes < 0:
            raise ValueError(f"drop_after_writes={self.drop_after_writes!r}, expected None or >= 0")

    @property
    def active(self) -> bool:
        """Whether any fault is configured."""
        return self.delay_ms is not None or self.drop_after_writes is not None or self.drop_prob > 0


class FaultInjector:
    """The per-connection state of a FaultConfig: its random stream and counters."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._sent = 0
        self._last_due = 0.0

    def due_time(self, now: float) -> float:
        """The monotonic time at which a write posted at `now` may go on the wire."""
        c = self.config
        due = now
        if c.delay_ms is not None and self._rng.random() < c.delay_prob:
            mean = c.delay_ms / 1000.0
            if c.delay_dist == "fixed":
                due += mean
            elif c.delay_dist == "exponential":
                due += self._rng.expovariate(1.0 / mean) if mean > 0 else 0.0
            else:
                due += self._rng.uniform(0.0, 2 * mean)
        if c.preserve_order:
            due = max(due, self._last_due)
            self._last_due = due
        return due

    def drop_now(self) -> bool:
        """Called as a write is about to be sent: True means drop the connection instead."""
        c = self.config
        if c.drop_after_writes is not None and self._sent >= c.drop_after_writes:
            return True
        if c.drop_prob and self._rng.random() < c.drop_prob:
            return True
        self._sent += 1
        return False
