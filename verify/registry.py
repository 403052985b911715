"""The registry of checks that `kvproof prove` runs: one entry per (protocol, variant, property, params)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from kvproof.verify.verdict import Status, Verdict, make_check_id


@dataclass(frozen=True)
class Check:
    """A named, runnable check whose expected outcome is stated up front."""

    protocol: str
    variant: str
    property: str
    params: dict[str, Any]
    expected: Status
    run: Callable[[], Verdict] = field(compare=False, repr=False)

    @property
    def check_id(self) -> str:
        """Same id the resulting Verdict carries."""
        return make_check_id(self.protocol, self.variant, self.property, self.params)


_CHECKS: list[Check] = []

# Modules that register checks when imported. Each owns the checks of one protocol.
CHECK_MODULES: tuple[str, ...] = (
    "kvproof.verify.checks_kv_slot",
    "kvproof.verify.checks_kv_page",
    "kvproof.verify.checks_streams",
    "kvproof.verify.checks_monitor",
    "kvproof.verify.checks_layersplit",
)


def register(check: Check) -> None:
    """Add a check; ids must be unique."""
    if any(c.check_id == check.check_id for c in _CHECKS):
        raise ValueError(f"duplicate check id {check.check_id!r}")
    _CHECKS.append(check)


def all_checks() -> list[Check]:
    """Every registered check, importing the check modules on first use."""
    for name in CHECK_MODULES:      # idempotent: a module registers its checks on first import
        importlib.import_module(name)
    return list(_CHECKS)
