"""The public verification API: `check`, `bmc`, `induction`, `explore`, and what they return.

`from kvproof.verify import check` in a protocol module of your own; `kvproof prove
that_module.py` runs the checks it declares (see docs/adding_a_protocol.md).
"""
# The functions are bound after their submodules load, so the names mean the functions
# (a submodule of the same name, e.g. kvproof.verify.explore, stays importable by path).
from kvproof.verify.verdict import Status, Step, Verdict  # noqa: I001
from kvproof.verify.registry import Check
from kvproof.verify.bmc import Counterexample, bmc, induction
from kvproof.verify.explore import explore, fair_liveness_violations
from kvproof.verify.sanity import sanity
from kvproof.verify.locality import slot_locality
from kvproof.verify.symmetry import asymmetry
from kvproof.verify.api import check

__all__ = ["Check", "Counterexample", "Status", "Step", "Verdict", "asymmetry", "bmc", "check", "explore",
           "fair_liveness_violations", "induction", "sanity", "slot_locality"]
