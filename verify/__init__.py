"""The public verification API: `check`, `bmc`, `induction`, `explore`, and what they return.

Names are imported on first use, so `import kvproof.verify.x` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "check": "kvproof.verify.api", "Check": "kvproof.verify.registry",
    "Status": "kvproof.verify.verdict", "Verdict": "kvproof.verify.verdict", "Step": "kvproof.verify.verdict",
    "bmc": "kvproof.verify.bmc", "induction": "kvproof.verify.bmc", "Counterexample": "kvproof.verify.bmc",
    "explore": "kvproof.verify.explore", "fair_liveness_violations": "kvproof.verify.explore",
    "sanity": "kvproof.verify.sanity", "slot_locality": "kvproof.verify.locality",
    "asymmetry": "kvproof.verify.symmetry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvproof.verify' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
