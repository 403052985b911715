"""Real-KV prefill ranks compute the Allocs that arrived in batches: served bit-exact, bad prompts and
aborts of pending prompts handled, and the PD processes' CPU layout."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pytest

from kvproof.runtime.pd.cpus import CpuLayout, format_cpus, parse_cpus, pin_process, plan_layout
from kvproof.runtime.pd.kv_pool import expected_kv
from kvproof.runtime.pd.messages import Abort, Alloc
from kvproof.runtime.pd.prefill_worker import Prefilled, PrefillRank

from .test_pd_workers import Rig


class Model:
    """A compute hook that takes at most `per_call` prompts and returns the synthetic KV (so decode can check it)."""

    def __init__(self, rig: Rig, per_call: int, bad: set[int] = frozenset(), shape_off: set[int] = frozenset()) -> None:
        self.cfg, self.per_call, self.bad, self.shape_off = rig.cfg, per_call, bad, shape_off
        self.calls: list[list[int]] = []

    def __call__(self, allocs: list[Alloc]) -> list[Any]:
        self.calls.append([a.rid for a in allocs])
        out: list[Any] = []
        for a in allocs[: self.per_call]:
            if a.rid in self.bad:
                out.append(ValueError(f"alloc for rid {a.rid}: no prompt"))
                continue
            kv = expected_kv(a.rid, a.n_tokens + (a.rid in self.shape_off), self.cfg)    # [W, L, n, bw]
            out.append(Prefilled(np.ascontiguousarray(kv.transpose(1, 2, 0, 3)).reshape(self.cfg.layers, kv.shape[2], -1)))
        return out


def _batched(rig: Rig, model: Model) -> Rig:
    """The rig's ranks with the compute hook; each pump computes one pending batch first, as the process loop does."""
    for w, r in enumerate(rig.ranks):
        rank = PrefillRank(rig.cfg, w, r.transport, r._send, compute=model)
        pump = rank.pump
        rank.pump = lambda *a, rank=rank, pump=pump: (rank.compute_pending(), pump(*a))[1]   # type: ignore
        rig.ranks[w] = rank
    return rig


def test_pending_prompts_are_computed_in_batches_and_served_bit_exact() -> None:
    rig = Rig(slots=4, writers=2)
    model = Model(rig, per_call=2)
    _batched(rig, model)
    for rid in range(1, 6):
        rig.decode.submit(rid, 1 + rid % 4)
    rig.settle()
    assert {r: x.status for r, x in rig.results.items()} == {r: "served" for r in range(1, 6)}
    assert all(x.bad_bytes == 0 for x in rig.results.values())
    # 4 slots: each rank's first call sees the 4 Allocs that arrived together and takes 2, its next the
    # other 2; request 5 gets a slot once one is free (the hook is shared: rank 0's call, then rank 1's)
    assert model.calls == [[1, 2, 3, 4], [1, 2, 3, 4], [3, 4], [3, 4], [5], [5]], model.calls
    assert rig.free() == 4 and rig.decode.idle()


def test_a_bad_prompt_is_dropped_alone_and_times_out() -> None:
    rig = Rig(slots=3, writers=1, transfer_timeout_s=1.0)
    model = Model(rig, per_call=3, bad={2}, shape_off={3})
    _batched(rig, model)
    for rid in (1, 2, 3):
        rig.decode.submit(rid, 3)
    rig.settle()
    rank = rig.ranks[0]
    assert rig.results[1].status == "served" and 2 not in rig.results and 3 not in rig.results
    assert rank.stats["compute_errors"] == 2 and not rank.has_work()
    rig.now += 2.0
    rig.decode.tick()
    rig.settle()
    assert rig.results[2].status == "failed" and "transfer timeout" in rig.results[2].reason
    assert rig.results[3].status == "failed" and rig.free() == 3


def test_store_computed_names_a_wrong_shape_and_a_wrong_count() -> None:
    rig = Rig(slots=2, writers=1)
    model = Model(rig, per_call=2, shape_off={1})
    _batched(rig, model)
    rig.decode.submit(1, 2)
    rank = rig.ranks[0]
    rank.on_message(rig.to_prefill[0].pop())
    pending = rank.take_pending()
    assert [j.rid for _, j in pending] == [1]
    errors = rank.store_computed(pending, model([j.alloc for _, j in pending]))
    assert len(errors) == 1 and "shape (2, 3, 16), expected (2, 2, 16)" in errors[0]
    with pytest.raises(ValueError, match="0 results for 1 prompts"):
        rank.store_computed([(0, pending[0][1])], [])


def test_an_abort_before_the_forward_drops_the_pending_prompt() -> None:
    rig = Rig(slots=1, writers=1)
    model = Model(rig, per_call=4)
    _batched(rig, model)
    rig.decode.submit(1, 3)
    rank = rig.ranks[0]
    alloc = rig.to_prefill[0].pop()
    rank.on_message(alloc)
    assert rank.has_work() and [j.rid for _, j in rank.take_pending()] == [1]
    rank.on_message(Abort(alloc.slot, 0, alloc.epoch))
    assert not rank.has_work() and rank.take_pending() == [] and rank.compute_pending() == []
    assert model.calls == []


def test_cpu_layout_plans() -> None:
    assert plan_layout("auto", {0, 1}) == CpuLayout(frozenset({1}), frozenset({0}))
    assert plan_layout("auto", {0, 2, 5, 7}) == CpuLayout(frozenset({7}), frozenset({0, 2, 5}))
    assert plan_layout("auto", {3}) is None and plan_layout("off", {0, 1}) is None
    with pytest.raises(ValueError, match="cpu_layout='fast', expected one of"):
        plan_layout("fast", {0, 1})
    from kvproof.runtime.pd.engine import PDEngine, PDEngineConfig
    from kvproof.runtime.serving.engine import EngineConfig
    with pytest.raises(ValueError, match="cpu_layout='pinned', expected one of"):
        PDEngine(EngineConfig(), PDEngineConfig(cpu_layout="pinned"))           # refused before any process starts
    assert parse_cpus(format_cpus({4, 0, 2})) == {0, 2, 4}
    for bad in ("", "a,b", "-1"):
        with pytest.raises(ValueError, match="--cpus"):
            parse_cpus(bad)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs at least two CPUs to move threads between")
def test_pin_process_moves_every_thread_and_gives_back() -> None:
    before = os.sched_getaffinity(0)
    stop, started = threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (started.set(), stop.wait(10)))
    t.start()
    started.wait(5)
    try:
        one = {min(before)}
        pin_process(one)
        assert os.sched_getaffinity(0) == one and os.sched_getaffinity(t.native_id) == one
    finally:
        pin_process(before)
        stop.set()
        t.join()
    assert os.sched_getaffinity(0) == before
