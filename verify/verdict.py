"""Verdicts: what one check of (protocol, variant, property, parameters) concluded."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


def make_check_id(protocol: str, variant: str, prop: str, params: dict[str, Any]) -> str:
    """Stable identifier of a check, used in JUnit/SARIF output and test ids."""
    ps = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{protocol}/{variant}/{prop}[{ps}]"


class Status(enum.Enum):
    """Outcome of one check."""

    PROVEN = "proven"
    REFUTED = "refuted"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Step:
    """One step of a counterexample: which actor fired which action, and what changed."""

    index: int
    actor: str
    action: str
    params: dict[str, Any]
    changes: dict[str, Any] = field(default_factory=dict)   # variable -> new value
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"index": self.index, "actor": self.actor, "action": self.action,
                "params": self.params, "changes": self.changes, "note": self.note}


@dataclass
class Verdict:
    """The result of one registered check, with how it was reached."""

    protocol: str
    variant: str
    property: str
    params: dict[str, Any]
    status: Status
    expected: Status
    method: str                      # e.g. "k-induction (k=1)", "BMC to depth 12", "exhaustive BFS"
    detail: str = ""                 # one human sentence: bound reached, invariant used, ...
    counterexample: list[Step] | None = None
    witness: dict[str, Any] | None = None   # extra evidence, e.g. a schedule timeline
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the outcome is the one this variant is expected to have."""
        return self.status == self.expected

    @property
    def check_id(self) -> str:
        """Stable identifier used in JUnit/SARIF output and test ids."""
        return make_check_id(self.protocol, self.variant, self.property, self.params)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "id": self.check_id, "protocol": self.protocol, "variant": self.variant,
            "property": self.property, "params": self.params, "status": self.status.value,
            "expected": self.expected.value, "ok": self.ok, "method": self.method,
            "detail": self.detail, "seconds": round(self.seconds, 4),
            "counterexample": None if self.counterexample is None
            else [s.to_json() for s in self.counterexample],
            "witness": self.witness,
        }
