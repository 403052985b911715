"""The SPIN engine (generated Promela) agrees with the Python search: states, verdicts, trails."""
import enum
import json
import subprocess
import sys

import pytest

from kvproof.spec.core import Bool, EnumT, Protocol, Var, action, invariant, liveness
from kvproof.spec.kv_slot import KVSlot
from kvproof.verify.explore import explore, fair_liveness_violations, path_steps
from kvproof.verify.spin import explore_spin, spin_available

pytestmark = pytest.mark.skipif(spin_available() is not None, reason=spin_available() or "")

UNFIXED = "unfixed"      # the pre-fix variant

SMALL = [
    {"slots": 1, "writers": 1, "max_epoch": 2, "max_chunks": 1},
    {"slots": 2, "writers": 1, "max_epoch": 1, "max_chunks": 1},
    {"slots": 1, "writers": 2, "max_epoch": 1, "max_chunks": 1},
]


def _agree(proto, variant, params, dropped=frozenset(), live=False):
    spin = explore_spin(proto, variant, params, dropped, liveness=live)
    py = explore(proto, variant, params, dropped, symmetry=None)     # SPIN has no symmetry reduction
    assert spin.states == py.states
    assert spin.deadlocks == len(py.deadlocks)
    assert set(spin.violations) == set(py.violations)
    for prop, steps in spin.violations.items():     # both breadth-first: equally short counterexamples
        assert len(steps) == len(path_steps(py, py.violations[prop]))
    if live:
        for goal in proto.goals:
            assert (spin.liveness[goal] is not None) == bool(fair_liveness_violations(py, goal))
    return spin, py


@pytest.mark.parametrize("params", SMALL, ids=lambda p: "s{slots}w{writers}e{max_epoch}".format(**p))
@pytest.mark.parametrize("variant", ["fixed", UNFIXED])
def test_kv_slot_both_engines_agree(variant, params):
    spin, _ = _agree(KVSlot, variant, params, live=(params == SMALL[0]))
    if variant == "fixed":
        assert not spin.violations and spin.deadlocks == 0
    else:       # the slot-reuse race needs a second request in the slot; a free slot, one
        assert "no_write_into_free_slot" in spin.violations
        assert ("no_cross_request_write" in spin.violations) == (params["max_epoch"] > 1)


def test_spin_trail_is_a_step_table_of_the_bug():
    spin = explore_spin(KVSlot, UNFIXED, SMALL[0], liveness=False)
    steps = spin.violations["no_cross_request_write"]
    acts = [s.action for s in steps]
    assert acts[0] == "alloc" and acts[-1] == "land" and "abort" in acts + ["timeout"]
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    assert steps[-1].changes["corrupt[0]"] is True
    assert spin.final_states["no_cross_request_write"]["corrupt[0]"] is True


def test_a_dropped_guard_is_found_by_both():
    _agree(KVSlot, "fixed", SMALL[0], dropped=frozenset({"no_post_after_abort"}))


class Phase(enum.IntEnum):
    """Phases of the toy below."""

    IDLE = 0
    BUSY = 1
    STUCK = 2


class _Toy(Protocol):
    """A toy with a deadlock (both STUCK), a property violation (jam) and a fair busy cycle."""

    name = "toy"
    variants = ("v",)
    actors = ("a",)
    indices = {"slot": "slots"}
    bounds = {"slots": 2}
    vars = {"ph": Var(EnumT(Phase), ("slot",), "a"), "flag": Var(Bool(), ("slot",), "a")}

    @action("a", s="slot")
    def start(P, m, s):
        m.require(m.ph[s] == Phase.IDLE, "idle")
        m.ph[s] = Phase.BUSY

    @action("a", s="slot")
    def spin_around(P, m, s):
        m.require(m.ph[s] == Phase.BUSY, "busy")
        m.flag[s] = m.not_(m.flag[s])

    @action("a", s="slot")
    def jam(P, m, s):
        m.require(m.ph[s] == Phase.IDLE, "idle")
        m.ph[s] = Phase.STUCK
        m.flag[s] = True

    @invariant(s="slot")
    def never_stuck_flagged(P, m, s):
        return m.not_(m.all([m.ph[s] == Phase.STUCK, m.flag[s]]))

    def _busy(P, m, s):
        return m.ph[s] == Phase.BUSY

    def _not_busy(P, m, s):
        return m.ph[s] != Phase.BUSY

    @liveness("_busy", "_not_busy", s="slot")
    def busy_ends(P):
        """A busy slot eventually stops being busy."""


def test_toy_deadlocks_violations_and_liveness_agree():
    spin, py = _agree(_Toy, "v", {"slots": 2}, live=True)
    assert spin.deadlocks > 0 and spin.violations.keys() == {"never_stuck_flagged"}
    assert spin.liveness["busy_ends"] is not None      # spin_around forever is weakly fair


def test_cli_explore_engine_spin_json():
    args = ["--param", "slots=2", "--param", "writers=1", "--param", "max_epoch=1", "--param", "max_chunks=1"]
    r = subprocess.run([sys.executable, "-m", "kvproof", "explore", "--engine", "spin", "--json", *args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    py = explore(KVSlot, "fixed", {k: int(v) for k, _, v in (a.partition("=") for a in args[1::2])})
    assert doc["engine"] == "spin" and doc["states"] == py.states and doc["states_per_second"] > 0
    assert doc["violations"] == {} and doc["deadlocks"] == 0 and doc["liveness_violations"] == {
        "aborted_slot_reclaimed": 0}
