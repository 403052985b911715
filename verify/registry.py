"""The checks `kvproof prove` runs: one entry per (protocol, variant, property, params), collected explicitly.

Nothing registers itself on import. A check module exposes its checks as a
module-level `CHECKS` list or a `checks()` function; `collect()` reads either,
`all_checks()` collects the package's modules, and `kvproof prove PATH.py`
collects a user's module the same way (`verify/loader.py`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from kvproof.verify.verdict import Status, Verdict, make_check_id


@dataclass(frozen=True)
class Check:
    """A named, runnable check whose expected outcome is stated up front.

    `spec` is the protocol class when the check is about a spec-layer protocol: `prove` then
    runs its sanity search (dead actions, vacuous properties) and withdraws empty proofs."""

    protocol: str
    variant: str
    property: str
    params: dict[str, Any]
    expected: Status
    run: Callable[[], Verdict] = field(compare=False, repr=False)
    spec: Any = field(default=None, compare=False, repr=False)

    @property
    def check_id(self) -> str:
        """Same id the resulting Verdict carries."""
        return make_check_id(self.protocol, self.variant, self.property, self.params)


# The package's check modules, one per protocol; each exposes `checks()`.
CHECK_MODULES: tuple[str, ...] = (
    "kvproof.verify.checks_kv_slot",
    "kvproof.verify.checks_kv_page",
    "kvproof.verify.checks_streams",
    "kvproof.verify.checks_monitor",
    "kvproof.verify.checks_layersplit",
)


def collect(module: ModuleType) -> list[Check]:
    """The checks a module declares: its `CHECKS` list, or what its `checks()` returns."""
    if hasattr(module, "checks") and callable(module.checks):
        found = module.checks()
    elif hasattr(module, "CHECKS"):
        found = module.CHECKS
    else:
        raise ValueError(f"{module.__name__}: declares no checks; expected a module-level CHECKS list "
                         f"or a checks() function returning kvproof.verify.Check objects")
    out = list(found)
    for c in out:
        if not isinstance(c, Check):
            raise ValueError(f"{module.__name__}: {c!r} is not a kvproof.verify.Check")
    return out


def unique(checks: list[Check]) -> list[Check]:
    """The checks unchanged; a repeated check id raises ValueError naming it."""
    seen: set[str] = set()
    for c in checks:
        if c.check_id in seen:
            raise ValueError(f"duplicate check id {c.check_id!r}")
        seen.add(c.check_id)
    return checks


def all_checks() -> list[Check]:
    """Every check of the package's protocols."""
    return unique([c for name in CHECK_MODULES for c in collect(importlib.import_module(name))])
