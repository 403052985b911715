"""The stream-ordering spec: JSON form, pinned state counts, and HB check == exhaustive exploration."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings

from stream_plans import tiny_plans
from kvproof.spec.hicache_plan import VARIANTS, drop_wait, hicache_plan
from kvproof.spec.core import ProtocolViolation
from kvproof.spec.stream_json import PlanFormatError, plan_dumps, plan_loads, plan_loads_lines, trace_dumps
from kvproof.spec.stream_machine import Machine, Transition, explore
from kvproof.spec.streams import HostSync, Op, Plan, Record, Wait, check_plan


@pytest.mark.parametrize("variant", VARIANTS)
def test_json_round_trip(variant: str) -> None:
    plan = hicache_plan(3, variant)
    assert plan_loads(plan_dumps(plan)) == plan
    traced = plan_loads("\n".join(trace_dumps(plan, {0: (0.0, 1.0)})))
    assert traced.instrs == plan.instrs and traced.streams == plan.streams


def test_json_lines_are_reported() -> None:
    plan, lines = plan_loads_lines(plan_dumps(hicache_plan(1, "fixed")))
    assert lines[0] == 2 and list(lines) == list(range(2, 2 + len(plan.instrs)))


@pytest.mark.parametrize("text, needle", [
    ("", "empty file"),
    ('{"instrs": [\n{"op": "a", "stream": "s"},\n{"op": "b" "stream": "s"}]}', "line 3 column"),
    ('{"streams": ["s"], "instrs": [\n{"op": "a", "stream": "s"},\n{"op": "b", "stream": "t"}]}',
     "line 3: instrs[1]: field 'stream': unknown stream 't'"),
    ('{"instrs": [\n{"op": "a", "stream": "s", "reads": "x"}]}', "line 2: instrs[0]: field 'reads'"),
    ('{"instrs": [\n{"op": "a", "stream": "s", "kind": "dma"}]}', "field 'kind'"),
    ('{"instrs": [\n{"op": "a", "stream": "s", "colour": 1}]}', "unknown field(s) ['colour']"),
    ('{"instrs": [\n{"op": "a", "wait": "e", "stream": "s"}]}', "exactly one of"),
    ('{"instrs": [\n{"op": "a", "stream": "s"},\n{"op": "a", "stream": "s"}]}', "op name 'a' repeats the op at p.json line 2: instrs[0]"),
    ('{"op": "a", "stream": "s"}\n{"op": "b", "stream": 3}\n', "line 2: field 'stream'"),
    ('{"op": "a", "stream": "s"}\n{"op": "b", "stream": "s"\n', "line 2 column"),
    ('[1, 2]', "expected an object with 'instrs'"),
    ('{"kvproof_plan": 2, "instrs": []}', "field 'kvproof_plan': expected version 1"),
    ('{"op": "a", "stream": "s"}\n{"kvproof_trace": 1}\n', "line 2: the trace header must be the first line"),
    ('{"op": "a", "stream": "s"}\n{"op": "a", "stream": "s"}\n', "line 2: op name 'a' repeats the op at p.json line 1"),
    ('{"kvproof_trace": 1, "streams": ["s"]}\n{"sync_stream": "t"}\n', "line 2: field 'sync_stream': unknown stream"),
])
def test_malformed_input_names_line_and_field(text: str, needle: str) -> None:
    with pytest.raises(PlanFormatError) as e:
        plan_loads(text, source="p.json")
    assert needle in str(e.value) and "p.json" in str(e.value)


def test_firing_a_disabled_transition_names_the_guard() -> None:
    m = Machine(hicache_plan(1, "fixed"))
    st = m.initial()
    with pytest.raises(ProtocolViolation, match="host has issued it"):
        m.fire(st, Transition("start", m.plan.op_index("load_idx[0]")))
    st = m.fire(st, Transition("issue", 0))
    with pytest.raises(ProtocolViolation, match="host issues in order"):
        m.fire(st, Transition("issue", 5))
    while st.host < len(m.plan.instrs):
        st = m.fire(st, Transition("issue", st.host))
    st = m.fire(st, Transition("record", 0))          # forward: record pages_free (the prologue)
    with pytest.raises(ProtocolViolation, match="awaited event has completed"):
        m.fire(st, Transition("wait", next(i for i, x in enumerate(m.plan.instrs) if isinstance(x, Wait)
                                           and x.event == "idx_ready[0]")))


def test_plan_validation() -> None:
    with pytest.raises(ValueError, match="unknown stream 'x'"):
        Plan("p", ("s",), (Op("x", "a"),))
    with pytest.raises(ValueError, match="exactly one of stream/event"):
        HostSync()
    with pytest.raises(ValueError, match="kind 'dma'"):
        Op("s", "a", kind="dma")


# Pinned reachable-state counts: an unintended change to the semantics fails loudly.
@pytest.mark.parametrize("layers, variant, states", [
    (1, "fixed", 114), (1, "unfixed", 113), (2, "fixed", 630), (2, "unfixed", 559)])
def test_pinned_state_counts(layers: int, variant: str, states: int) -> None:
    ex = explore(hicache_plan(layers, variant))
    assert ex.complete and ex.deadlocks == 0
    assert ex.states == states


@pytest.mark.parametrize("layers", [1, 2, 5, 16, 64])
def test_hicache_fixed_clean_prefix_races_every_layer(layers: int) -> None:
    assert check_plan(hicache_plan(layers, "fixed")) == ()
    bad = check_plan(hicache_plan(layers, "unfixed"))
    assert [(v.property, v.region) for v in bad] == [("no_read_before_ready", f"dev.idx[{l}]") for l in range(layers)]
    assert all("indexer" in v.message and "load_idx" in v.message for v in bad)


def test_dropping_the_kv_wait_races_attention() -> None:
    bad = check_plan(drop_wait(hicache_plan(2, "fixed"), "kv_ready"))
    assert {v.region for v in bad} == {"dev.kv[0]", "dev.kv[1]"}


def test_page_reuse_across_batches_needs_the_prologue_wait() -> None:
    assert check_plan(hicache_plan(3, "fixed", batches=2)) == ()
    bad = check_plan(drop_wait(hicache_plan(3, "fixed", batches=2), "pages_free"))
    assert {v.property for v in bad} == {"no_write_after_read"}
    assert any("load_idx[0]@b1" in v.message and "indexer[0]@b0" in v.message for v in bad)


def test_cuda_wait_semantics() -> None:
    # A wait issued before the record is a no-op (cudaStreamWaitEvent semantics): the read races.
    early = Plan("early", ("a", "b"), (Op("a", "w", (), ("x",)), Wait("b", "e"), Record("a", "e"),
                                       Op("b", "r", ("x",), ())))
    assert [v.property for v in check_plan(early)] == ["no_read_before_ready"]
    late = Plan("late", ("a", "b"), (Op("a", "w", (), ("x",)), Record("a", "e"), Wait("b", "e"),
                                     Op("b", "r", ("x",), ())))
    assert check_plan(late) == ()
    synced = Plan("sync", ("a", "b"), (Op("a", "w", (), ("x",)), HostSync(stream="a"), Op("b", "r", ("x",), ())))
    assert check_plan(synced) == ()


def test_buffer_reuse_and_write_order() -> None:
    reuse = Plan("reuse", ("a", "b"), (Op("a", "r", ("stage",), ()), Op("b", "w", (), ("stage",)),
                                       Op("b", "w2", (), ("stage",))))
    assert [v.property for v in check_plan(reuse)] == ["no_write_after_read"]
    waw = Plan("waw", ("a", "b"), (Op("a", "w1", (), ("x",)), Op("b", "w2", (), ("x",))))
    assert [v.property for v in check_plan(waw)] == ["no_unordered_writes"]


@settings(max_examples=150, deadline=None)
@given(tiny_plans())
def test_hb_check_agrees_with_exhaustive_exploration(plan: Plan) -> None:
    """The HB DAG and the state machine are two semantics of one model: they find the same races."""
    ex = explore(plan)
    assert ex.complete and ex.deadlocks == 0
    assert ex.races == {(v.property, v.before, v.after) for v in check_plan(plan)}


def test_spec_imports_neither_torch_nor_z3() -> None:
    code = ("import sys, kvproof.spec.streams, kvproof.spec.hicache_plan; "
            "bad = [m for m in ('torch', 'z3', 'kvproof.verify') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
