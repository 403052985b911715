"""The per-index fast path (spec/local.py) behaves exactly like a global Instance of the same protocol."""
import io
import json
import random

import pytest

from kvproof.spec.core import ProtocolViolation, SpecError
from kvproof.spec.kv_page import KVPage, PState
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.local import LocalInstance
from kvproof.spec.instance import Instance


def _random_walk(steps: int, seed: int) -> tuple[LocalInstance, Instance, int]:
    """Try the same random actions on both; return them and how many fired."""
    rng = random.Random(seed)
    fast, ref = LocalInstance(KVPage, "fixed", "page", 3), Instance(KVPage, "fixed", {"pages": 3})
    fired = 0
    for _ in range(steps):
        action = rng.choice(sorted(KVPage.actions))
        p = rng.randrange(3)
        data = [max(0, ref.get("tag", p) - rng.randrange(2))] if any(q.index is None for q in KVPage.actions[action].params) else []
        args = {"p": p, **({"e": data[0]} if data else {})}
        assert fast.enabled(action, p, *data) == ref.enabled(action, **args), (action, args)
        ok = fast.try_fire(action, p, *data)
        assert ok == ref.enabled(action, **args)
        if ok:
            ref.fire(action, **args)
            fired += 1
        assert fast.labelled() == {ref.layout.label(i): v for i, v in enumerate(ref.state)}
    return fast, ref, fired


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_guards_and_effects_as_a_global_instance(seed):
    _, ref, fired = _random_walk(400, seed)
    assert fired > 50 and ref.violated_invariants(strengthening=True) == []


def test_disabled_action_names_the_guard_and_leaves_state_alone():
    t = LocalInstance(KVPage, "fixed", "page", 2)
    t.fire("alloc", 1)
    before = list(t.state)
    with pytest.raises(ProtocolViolation) as e:
        t.fire("evict_start", 1)
    assert e.value.guard == "cached" and e.value.params == {"p": 1} and t.state == before
    assert t.why_disabled("publish", 1) is None and t.get("st", 1) == PState.OWNED
    assert t.count("st", PState.FREE) == 1


def test_trace_lines_replay_on_a_global_instance():
    buf = io.StringIO()
    t = LocalInstance(KVPage, "fixed", "page", 2, trace=buf)
    t.fire("alloc", 0)
    t.fire("publish", 0)
    t.fire("unlock", 0, 1)
    recs = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert recs[0]["kind"] == "header" and recs[0]["params"] == {"pages": 2}
    ref = Instance(KVPage, "fixed", recs[0]["params"])
    for r in recs[1:]:
        ref.fire(r["action"], **r["params"])
    assert t.labelled() == {ref.layout.label(i): v for i, v in enumerate(ref.state)}


def test_bad_input_is_named():
    with pytest.raises(SpecError, match="not local in 'slot'"):
        LocalInstance(KVSlot, "fixed", "slot", 2)          # writer-indexed variables: not slot-local
    with pytest.raises(SpecError, match="expected an int >= 1"):
        LocalInstance(KVPage, "fixed", "page", 0)
    with pytest.raises(SpecError, match="out of range"):
        LocalInstance(KVPage, "fixed", "page", 2).fire("alloc", 2)
    with pytest.raises(SpecError, match="unknown variant"):
        LocalInstance(KVPage, "nope", "page", 2)


def test_fire_each_is_fire_in_a_loop_and_stops_at_the_first_refusal():
    """`fire_each` (a batch's page reads): the same effects and trace as `fire` per index, and the first
    disabled index raises naming its guard after the ones before it fired."""
    buf_a, buf_b = io.StringIO(), io.StringIO()
    a = LocalInstance(KVPage, "fixed", "page", 4, trace=buf_a)
    b = LocalInstance(KVPage, "fixed", "page", 4, trace=buf_b)
    for t in (a, b):
        for p in range(3):
            t.fire("alloc", p)
    tags = [a.get("tag", p) for p in range(3)]
    a.fire_each("read", [0, 1, 2], tags)
    for p in range(3):
        b.fire("read", p, tags[p])
    assert a.state == b.state
    strip = lambda buf: [{k: v for k, v in json.loads(x).items() if k != "t_ns"} for x in buf.getvalue().splitlines()]
    assert strip(buf_a) == strip(buf_b)
    with pytest.raises(ProtocolViolation) as e:
        a.fire_each("read", [0, 3, 1], [tags[0], 0, tags[1]])      # page 3 was never allocated: no holder
    assert e.value.guard == "holder_exists" and e.value.params == {"p": 3, "e": 0}
    with pytest.raises(SpecError, match="out of range"):
        a.fire_each("read", [9], [0])
    with pytest.raises(ValueError):
        a.fire_each("read", [0, 1], [tags[0]])                      # one epoch short
