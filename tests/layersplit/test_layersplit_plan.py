"""The LayerSplit plan: ownership, shape, fixed race-free, unfixed refuted, the window proof's lemmas."""
from __future__ import annotations

import pytest

from kvproof.spec.layersplit_plan import (DELIVERY, OWNERSHIPS, VARIANTS, LayerSplitShape, delivery_errors,
                                          layersplit_plan, owned_layers, owner_of, rank_plan)
from kvproof.spec.stream_machine import explore
from kvproof.spec.streams import Op, Plan, Wait, check_plan, dependencies
from kvproof.verify.checks_layersplit import CHECK_VARIANTS, shape_of, sweep_shapes, window_of, window_proof, windows
from kvproof.verify.race import schedule_errors, witness_schedule

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("ranks,layers", [(1, 5), (3, 8), (4, 78), (8, 78), (8, 96), (8, 5)])
def test_contiguous_ownership_first_ranks_one_extra(ranks: int, layers: int) -> None:
    counts = [len(owned_layers(r, ranks, layers)) for r in range(ranks)]
    base, extra = divmod(layers, ranks)
    assert counts == [base + 1] * extra + [base] * (ranks - extra)
    flat = [l for r in range(ranks) for l in owned_layers(r, ranks, layers)]
    assert flat == list(range(layers))                 # contiguous blocks, in rank order


def test_round_robin_and_bad_inputs() -> None:
    assert [owner_of(l, 3, 7, "round_robin") for l in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="layer 7 out of range"):
        owner_of(7, 3, 7)
    with pytest.raises(ValueError, match="ranks must be a positive int"):
        LayerSplitShape(0, 4)
    with pytest.raises(ValueError, match="unknown ownership 'striped'"):
        LayerSplitShape(2, 4, ownership="striped")
    with pytest.raises(ValueError, match="unknown LayerSplit variant"):
        LayerSplitShape(2, 4, variant="broken")


@pytest.mark.parametrize("ownership", OWNERSHIPS)
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fixed_is_race_free_and_delivers(ownership: str, ranks: int, depth: int) -> None:
    for layers in range(1, 13):
        shape = LayerSplitShape(ranks, layers, depth, ownership)
        assert check_plan(layersplit_plan(shape)) == ()
        assert delivery_errors(shape) == []


def test_prefix_refuted_with_a_valid_witness() -> None:
    plan = layersplit_plan(LayerSplitShape(2, 3, 2, "round_robin", "unfixed"))
    vs = check_plan(plan)
    assert vs and {v.property for v in vs} == {"no_write_after_read"}
    v = vs[0]
    assert plan.instrs[v.after].name.startswith("recv_") and v.region.startswith("recv.")
    sched = witness_schedule(plan, v)
    assert schedule_errors(plan, sched) == []
    a, b = sched.times[v.before], sched.times[v.after]
    assert b[1] <= a[0]                                # the overwrite ends before the read starts


def test_unfixed_is_race_free_without_buffer_reuse() -> None:
    # contiguous R=2, L=3: rank 1 receives layers 0 and 1 only -- no buffer is reused
    assert check_plan(layersplit_plan(LayerSplitShape(2, 3, 2, "contiguous", "unfixed"))) == ()


def test_tiny_plan_exhaustive_search_agrees() -> None:
    """The state machine's search and the HB check agree (rank 1 receives layers 0 and 1 into one buffer)."""
    fixed = layersplit_plan(LayerSplitShape(2, 3, 1, "contiguous", "fixed"))
    ex = explore(fixed)
    assert ex.complete and ex.deadlocks == 0 and not ex.races
    assert ex.states == 112_433          # pinned: an unintended change to the plan or the machine fails loudly
    unfixed = layersplit_plan(LayerSplitShape(2, 3, 1, "contiguous", "unfixed"))
    ex = explore(unfixed, max_states=60_000)             # search partially: races show up early
    found = {(v.property, v.before, v.after) for v in check_plan(unfixed)}
    assert ex.races and set(ex.races) <= found


def test_delivery_catches_a_misrouted_receive() -> None:
    shape = LayerSplitShape(2, 4, 2, "round_robin")
    plan = layersplit_plan(shape)
    bad = tuple(Op(i.stream, i.name, ("wire.kv[0]",), i.writes, i.kind) if isinstance(i, Op)
                and i.name == "recv_kv[2]@r1" else i for i in plan.instrs)
    errs = delivery_errors(shape, Plan("bad", plan.streams, bad))
    assert errs and "attention[2]@r1" in errs[0] and "kv[0]@r0" in errs[0]


def test_rank_plan_keeps_own_streams_and_drops_cross_rank_waits() -> None:
    plan = layersplit_plan(LayerSplitShape(3, 6))
    rp = rank_plan(plan, 1)
    assert set(rp.streams) == {"comm@r1", "compute@r1"}
    assert all(i.stream in rp.streams for i in rp.instrs)
    assert not any(isinstance(i, Wait) and i.event.startswith("sent_") for i in rp.instrs)
    assert check_plan(rp) == ()


@pytest.mark.parametrize("variant", sorted(CHECK_VARIANTS))
def test_every_dependency_has_a_window(variant: str) -> None:
    """Lemma 2 of the window proof, on every plan up to R=5, L=14, both ownerships."""
    kinds = set()
    for ownership in OWNERSHIPS:
        for ranks in range(1, 6):
            for layers in range(1, 15):
                plan = layersplit_plan(shape_of(variant, ranks, layers, ownership))
                kinds |= {window_of(plan, d)[0] for d in dependencies(plan)}
    assert kinds == {"same_stream", "one_layer", "buffer_reuse"}


@pytest.mark.parametrize("ownership", OWNERSHIPS)
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_writeback_is_race_free_and_delivers(ownership: str, ranks: int) -> None:
    for depth in (1, 2):
        for layers in range(1, 10):
            shape = LayerSplitShape(ranks, layers, depth, ownership, writeback=True)
            assert check_plan(layersplit_plan(shape)) == ()
            assert delivery_errors(shape) == []


def test_writeback_writes_the_regions_it_reads_and_the_owner_waits_its_sends() -> None:
    shape = LayerSplitShape(2, 2, 2, "contiguous", writeback=True)     # rank 0 owns layer 0, rank 1 layer 1
    plan = layersplit_plan(shape)
    assert plan.name == "layersplit/fixed+writeback/R=2/L=2/depth=2/contiguous"
    ops = {i.name: i for i in plan.instrs if isinstance(i, Op)}
    assert ops["indexer[0]@r0"].writes == ("topk[0]@r0", "idx[0]@r0")            # the owner: its stored layer
    assert ops["attention[0]@r1"].writes == ("hidden[1]@r1", "recv.kv[0]@r1")    # a receiver: its buffer
    mine = [i for i in plan.instrs if i.stream == "compute@r0" and not isinstance(i, Op)]
    assert Wait("compute@r0", "sent_idx[0]") in mine and Wait("compute@r0", "sent_kv[0]") in mine
    assert layersplit_plan(LayerSplitShape(2, 2)).name == "layersplit/fixed/R=2/L=2/depth=2/contiguous"
    with pytest.raises(ValueError, match="owner_wait=False only means something with writeback=True"):
        LayerSplitShape(2, 2, owner_wait=False)


def test_writeback_without_the_owner_wait_is_a_write_after_read_race() -> None:
    """Drop the owner's wait on its own send: its compute may overwrite the layer the send still reads."""
    plan = layersplit_plan(LayerSplitShape(2, 3, 2, "contiguous", writeback=True, owner_wait=False))
    vs = check_plan(plan)
    assert vs and {v.property for v in vs} == {"no_write_after_read"}
    assert {(plan.instrs[v.before].name, plan.instrs[v.after].name) for v in vs} == {
        ("send_idx[0]", "indexer[0]@r0"), ("send_kv[0]", "attention[0]@r0"),
        ("send_idx[1]", "indexer[1]@r0"), ("send_kv[1]", "attention[1]@r0"),
        ("send_idx[2]", "indexer[2]@r1"), ("send_kv[2]", "attention[2]@r1")}
    v = vs[0]
    sched = witness_schedule(plan, v)
    assert schedule_errors(plan, sched) == []
    assert sched.times[v.after][0] < sched.times[v.before][1]        # the write starts before the send ended
    assert delivery_errors(LayerSplitShape(2, 3, 2, writeback=True, owner_wait=False)) == []   # routing is fine


def test_window_proof() -> None:
    assert len(windows("fixed")) > 10
    for prop in ("no_read_before_ready", "no_write_after_read", "no_unordered_writes"):
        assert window_proof("fixed", prop)[0]
    ok, why = window_proof("unfixed", "no_write_after_read")
    assert not ok and "may overtake" in why
    assert len(windows("writeback")) == len(windows("fixed")) + 1        # plus the window owned by rank 0
    for prop in ("no_read_before_ready", "no_write_after_read", "no_unordered_writes"):
        assert window_proof("writeback", prop)[0]
    ok, why = window_proof("writeback-without-owner_wait", "no_write_after_read")
    assert not ok and "may overtake send_" in why


def test_sweep_covers_every_rank_count_and_96_layers() -> None:
    shapes = sweep_shapes("fixed")
    assert {s.ranks for s in shapes} == set(range(1, 9))
    assert any(s.layers == 96 and s.ownership == "round_robin" for s in shapes)
    # round-robin plans are prefix-closed: the L=96 plan starts with every smaller plan
    big = layersplit_plan(LayerSplitShape(3, 20, 2, "round_robin"))
    for layers in (1, 7, 19):
        small = layersplit_plan(LayerSplitShape(3, layers, 2, "round_robin"))
        assert big.instrs[:len(small.instrs)] == small.instrs


def test_registered_checks_have_the_expected_outcomes() -> None:
    from kvproof.verify.registry import all_checks
    checks = [c for c in all_checks() if c.protocol == "layersplit"]
    assert {(c.variant, c.property) for c in checks} >= {(v, DELIVERY) for v in VARIANTS}
    for c in checks:
        v = c.run()
        assert v.ok, (v.check_id, v.status, v.detail)
        if v.status.value == "refuted":
            assert v.counterexample and "RACE" in " ".join(s.note for s in v.counterexample)
            owned = "without-owner_wait" in c.variant          # the owner's compute overwrites its stored layer
            assert ("<-- writes idx[0]@r0" if owned else "<-- writes recv.") in v.witness["timeline"]


def test_regions_are_typed_and_read_as_their_names() -> None:
    import json
    import pickle
    from kvproof.spec.layersplit_plan import op_role
    from kvproof.spec.streams import Region
    r = Region("recv.kv", 5, 1, slot=1)
    assert (r, r.kind, r.layer, r.rank, r.slot) == ("recv.kv[1]@r1", "recv.kv", 5, 1, 1)
    assert r == Region("recv.kv", 3, 1, slot=1) and json.dumps([r]) == '["recv.kv[1]@r1"]'   # one buffer, one region
    assert pickle.loads(pickle.dumps(r)).layer == 5
    with pytest.raises(AttributeError, match="immutable"):
        r.rank = 2                                                                           # type: ignore[misc]
    shape = LayerSplitShape(ranks=3, layers=5, depth=2)
    roles = {(ins.name.split("[")[0], op_role(ins)) for ins in layersplit_plan(shape).instrs if isinstance(ins, Op)}
    by_name = {(name, role) for name, (role, _) in roles}
    assert by_name == {("send_idx", "send"), ("send_kv", "send"), ("recv_idx", "recv"), ("recv_kv", "recv"),
                       ("indexer", "indexer"), ("attention", "attention")}
    assert all(int(n.split("[")[1].split("]")[0]) == l for ins in layersplit_plan(shape).instrs if isinstance(ins, Op)
               for n, (_, l) in [(ins.name, op_role(ins))])
    with pytest.raises(TypeError, match="not a typed Region"):
        op_role(Op("s", "x[0]", ("kv[0]@r0",), ()))


def test_dispatch_builds_one_impl_per_op_by_role_and_names_a_missing_role() -> None:
    from kvproof.runtime.streams.executor import dispatch
    from kvproof.spec.layersplit_plan import op_role
    plan = layersplit_plan(LayerSplitShape(ranks=2, layers=3))
    seen: list[tuple[str, int]] = []
    make = {r: (lambda ins, l, r=r: seen.append((r, l)) or (lambda: None)) for r in ("send", "recv", "indexer", "attention")}
    impls = dispatch(plan, op_role, make)
    assert set(impls) == {i.name for i in plan.instrs if isinstance(i, Op)}
    assert ("recv", 2) in seen and ("attention", 0) in seen
    with pytest.raises(KeyError, match="role 'send', no implementation"):
        dispatch(plan, op_role, {"indexer": make["indexer"]})
