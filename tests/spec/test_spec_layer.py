"""The spec layer: firing, guards, traces, and agreement of its three evaluations."""
import json

import pytest
import z3

from kvproof.spec.core import Layout, ProtocolViolation, SpecError
from kvproof.spec.kv_slot import DState, KVSlot, PState
from kvproof.spec.instance import Instance
from kvproof.spec.machine import CONCRETE, evaluate, successors
from kvproof.verify.explore import explore
from kvproof.verify.symbolic import Z3, Encoding


def test_disabled_action_names_action_params_and_guard():
    inst = Instance(KVSlot, "fixed", {"slots": 2, "writers": 1})
    with pytest.raises(ProtocolViolation) as e:
        inst.fire("start_decode", s=1)
    msg = str(e.value)
    assert "start_decode(s=1)" in msg and "waiting_for_kv" in msg
    assert e.value.guard == "waiting_for_kv" and e.value.params == {"s": 1}


def test_fire_changes_state_and_returns_io_effects():
    inst = Instance(KVSlot, "fixed", {"slots": 1, "writers": 2})
    out = inst.fire("alloc", s=0)
    assert inst.get("d_state", 0) == DState.WAIT and inst.get("epoch", 0) == 1
    assert [(e.kind, e.fields["channel"], e.fields["index"]) for e in out] == [
        ("send", "alloc", [0, 0]), ("send", "alloc", [0, 1])]
    assert inst.count("d_state", DState.FREE) == 0


def test_local_instance_skips_environment_guards_but_not_local_ones():
    p = Instance(KVSlot, "fixed", {"slots": 1, "writers": 1}, actor="prefill")
    p.fire("p_on_alloc", s=0, w=0, e=1)           # delivery is the network's business
    assert p.get("p_state", 0, 0) == PState.SENDING
    with pytest.raises(ProtocolViolation, match="alloc_epoch_newer"):
        p.fire("p_on_alloc", s=0, w=0, e=1)       # a duplicate is refused by the local guard
    with pytest.raises(SpecError, match="belongs to actor 'decode'"):
        p.fire("alloc", s=0)
    g = Instance(KVSlot, "fixed", {"slots": 1, "writers": 1})
    with pytest.raises(ProtocolViolation, match="alloc_delivered"):
        g.fire("p_on_alloc", s=0, w=0, e=1)       # the global model has no such message yet


def test_bad_instance_parameters_are_named():
    with pytest.raises(SpecError, match="unknown variant 'nope'"):
        Instance(KVSlot, "nope", {"slots": 1, "writers": 1})
    with pytest.raises(SpecError, match="slots=0"):
        Instance(KVSlot, "fixed", {"slots": 0, "writers": 1})
    with pytest.raises(SpecError, match="missing instance parameter 'writers'"):
        Instance(KVSlot, "fixed", {"slots": 1})


def test_trace_is_json_lines_with_header(tmp_path):
    path = tmp_path / "t.jsonl"
    inst = Instance(KVSlot, "fixed", {"slots": 1, "writers": 1}, actor="decode", trace=str(path))
    inst.fire("alloc", s=0)
    inst.record("land", s=0, w=0, e=1)
    inst.close()
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert recs[0]["kind"] == "header" and recs[0]["variant"] == "fixed"
    assert [(r["actor"], r["action"]) for r in recs[1:]] == [("decode", "alloc"), ("net", "land")]
    assert recs[1]["t_ns"] <= recs[2]["t_ns"]


def test_concrete_and_symbolic_evaluation_agree_on_every_reachable_state():
    """One definition, two evaluations: Z3's guard verdict equals the concrete one."""
    params = {"slots": 1, "writers": 1, "max_epoch": 1, "max_chunks": 1}
    ex = explore(KVSlot, "fixed", params)
    enc = Encoding(KVSlot, "fixed", params)
    layout = enc.layout
    states = list(ex.graph.nodes)
    checked = 0
    for st in states:
        concrete = {(a, tuple(sorted(args.items()))) for a, args, _ in successors(layout, params, st, "fixed")}
        for inst in enc.instances:
            for e in ([None] if all(p.index for p in inst.adef.params) else range(params["max_epoch"] + 1)):
                args = dict(inst.args) if e is None else {**inst.args, "e": e}
                m = evaluate(layout, st, inst.adef, args, Z3, "fixed")
                g = z3.simplify(z3.And(*[c for _, _, c in m.guards]) if m.guards else z3.BoolVal(True))
                assert z3.is_true(g) or z3.is_false(g)
                in_bounds = (inst.adef.name, tuple(sorted(args.items()))) in concrete
                if z3.is_true(g) and not in_bounds:
                    # enabled but pruned by the search bound on epochs / chunks
                    assert inst.adef.name in ("alloc", "p_post")
                else:
                    assert z3.is_true(g) == in_bounds, (inst.label, args, st)
                checked += 1
    assert checked > 2000


@pytest.mark.parametrize("params,variant,expected", [
    ({"slots": 1, "writers": 1, "max_epoch": 1, "max_chunks": 1}, "fixed", 112),
    ({"slots": 2, "writers": 1, "max_epoch": 1, "max_chunks": 1}, "fixed", 3336),
    ({"slots": 1, "writers": 1, "max_epoch": 2, "max_chunks": 1}, "unfixed", 1132),
])
def test_pinned_reachable_state_counts(params, variant, expected):
    """Stateright-style: an unintended change to the model changes these numbers loudly."""
    assert explore(KVSlot, variant, params, symmetry="slot").states == expected


def test_symmetry_reduction_preserves_verdicts():
    p = {"slots": 2, "writers": 1, "max_epoch": 1, "max_chunks": 1}
    full, sym = explore(KVSlot, "unfixed", p), explore(KVSlot, "unfixed", p, symmetry="slot")
    assert sym.states < full.states
    assert set(full.violations) == set(sym.violations) == {"no_write_into_free_slot"}


def test_layout_labels_and_initial_state():
    lay = Layout.build(KVSlot, {"slots": 2, "writers": 2})
    labels = [lay.label(i) for i in range(len(lay))]
    assert "d_state[1]" in labels and "fl_n[1,0]" in labels and "safe.lat[0,1]" in labels
    init = dict(zip(labels, lay.initial()))
    assert init["d_state[0]"] == DState.FREE and init["p_state[1,1]"] == PState.IDLE
    assert evaluate(lay, lay.initial(), KVSlot.actions["alloc"], {"s": 0}, CONCRETE, "fixed").writes


@pytest.mark.parametrize("variant", ["fixed", "unfixed"])
def test_compiled_successors_equal_the_interpreted_ones(variant):
    """The compiled fast path is the same definition: identical successors on every reachable state."""
    from kvproof.spec.compiled import Compiled
    params = {"slots": 2, "writers": 1, "max_epoch": 1, "max_chunks": 1}
    full = {**KVSlot.bounds, **params}
    comp = Compiled(KVSlot, full, variant)
    ex = explore(KVSlot, variant, params)
    for st in list(ex.graph.nodes)[::5]:
        slow = sorted((a, tuple(sorted(x.items())), n) for a, x, n in successors(comp.layout, full, st, variant))
        fast = sorted((a, tuple(sorted(x.items())), n) for a, x, n in comp.successors(st))
        assert slow == fast


def test_actions_are_selected_by_their_role_tags():
    """`tags` on an action are roles the runtime selects by; a malformed tag list or unknown role is named."""
    from kvproof.spec.core import EnumT, Protocol, Var, action
    from kvproof.spec.kv_slot import DState as S

    class Tagged(Protocol):
        name = "tagged"
        variants = ("fixed",)
        actors = ("a",)
        vars = {"x": Var(EnumT(S), (), "a")}

        @action("a", tags=("go", "any"))
        def go(P, m):
            m.x[()] = S.WAIT

        @action("a", tags=("any",))
        def stop(P, m):
            m.x[()] = S.FREE

        @action("a")
        def idle(P, m):
            m.require(True, "always")

    assert Tagged.tagged("any") == ("go", "stop") and Tagged.tagged("go") == ("go",)
    assert Tagged.actions["idle"].tags == frozenset()
    with pytest.raises(SpecError, match=r"no action is tagged 'nope'; expected one of \['any', 'go'\]"):
        Tagged.tagged("nope")
    with pytest.raises(SpecError, match="expected a tuple of role names"):
        action("a", tags="go")
