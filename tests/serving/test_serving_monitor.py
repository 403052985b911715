"""The anomaly rule: the runtime monitor (unit), the spec's properties (Z3), and KV corruption firing it."""
from __future__ import annotations

import pytest

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
from kvproof.runtime.serving.monitor import MonitorConfig, RequestMonitor
from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.spec.core import ProtocolViolation
from kvproof.spec.instance import Instance
from kvproof.spec.specdec_monitor import PROPERTIES, AcceptMonitor, Phase, monitor_protocol
from kvproof.verify.checks_monitor import _check
from kvproof.verify.verdict import Status


def _run(mon: RequestMonitor, accepted: int, drafted: int, steps: int) -> tuple[int, str | None]:
    """Feed identical steps until the rule fires; (steps taken, reason)."""
    for i in range(steps):
        why = mon.step(accepted, drafted)
        if why:
            return i + 1, why
    return steps, None


def test_low_accept_fires_only_after_min_tokens() -> None:
    mon = RequestMonitor(MonitorConfig())
    n, why = _run(mon, 0, 2, 500)               # accept length 1.0: one token per step
    assert why == "low_accept_length" and n == 129, "fires on the first step past 128 generated tokens"
    assert mon.aborted and mon.accept_length == 1.0


def test_healthy_and_boundary_rates_do_not_fire() -> None:
    assert _run(RequestMonitor(MonitorConfig()), 1, 2, 1000)[1] is None       # length 2.0, rate 0.5
    # exactly 1.4 is not below 1.4: 2 accepted of 5 steps
    mon = RequestMonitor(MonitorConfig())
    for _ in range(60):
        for a in (1, 1, 0, 0, 0):
            assert mon.step(a, 2) is None
    assert mon.accept_length == pytest.approx(1.4)


def test_degenerate_fires_above_max_rate() -> None:
    n, why = _run(RequestMonitor(MonitorConfig()), 2, 2, 500)  # every draft accepted: rate 1.0
    assert why == "degenerate_accept_rate" and 3 * n > 128 >= 3 * (n - 1)


def test_thresholds_come_from_the_spec_per_model() -> None:
    """The default model's greedy loops look like corruption to the accept-length rule (see THRESHOLDS), so
    on it only the degenerate rule is armed; other models get the post-mortem rule."""
    from kvproof.spec.specdec_monitor import THRESHOLDS
    assert RequestMonitor(MonitorConfig(), model="tiny").cfg == MonitorConfig(True, 128, 1.0, 0.96)
    assert RequestMonitor(MonitorConfig(), model="glm5").cfg == MonitorConfig(True, 128, 1.4, 0.96)
    assert _run(RequestMonitor(MonitorConfig(), model="tiny"), 0, 2, 1000)[1] is None      # accept length 1.0
    assert _run(RequestMonitor(MonitorConfig(), model="tiny"), 2, 2, 500)[1] == "degenerate_accept_rate"
    assert RequestMonitor(MonitorConfig(min_accept_length=1.2), model="tiny").cfg.min_accept_length == 1.2
    assert set(THRESHOLDS) >= {"post_mortem", "tiny"}


def test_thresholds_are_configurable_and_disable() -> None:
    cfg = MonitorConfig(min_tokens=10, min_accept_length=2.5, max_accept_rate=0.99)
    n, why = _run(RequestMonitor(cfg), 1, 2, 100)             # length 2.0 < 2.5
    assert why == "low_accept_length" and n == 6              # 12 generated > 10
    assert _run(RequestMonitor(MonitorConfig(enabled=False)), 0, 2, 500)[1] is None
    with pytest.raises(ValueError, match="max_accept_rate"):
        MonitorConfig(max_accept_rate=1.5)


def test_spec_refuses_a_step_past_a_crossing() -> None:
    """The runtime cannot keep generating after the rule crossed without flagging first."""
    inst = Instance(monitor_protocol(min_tokens=2), "fixed", {}, actor="monitor")
    for _ in range(3):
        inst.fire("step", accepted=0, drafted=1)
    with pytest.raises(ProtocolViolation, match="no_step_past_threshold"):
        inst.fire("step", accepted=0, drafted=1)
    inst.fire("flag_low_accept")
    assert inst.get("phase") == Phase.ABORTED_LOW_ACCEPT and not inst.violated_invariants()
    with pytest.raises(ProtocolViolation, match="accepted_le_drafted"):
        Instance(AcceptMonitor, "fixed", {}, actor="monitor").fire("step", accepted=3, drafted=2)


@pytest.mark.parametrize("variant", AcceptMonitor.variants)
@pytest.mark.parametrize("prop", PROPERTIES)
def test_spec_properties(variant: str, prop: str) -> None:
    v = _check(variant, prop)
    assert v.ok, f"{v.check_id}: {v.status} ({v.detail})"
    if v.status == Status.REFUTED:                            # naive: aborts after one unlucky step
        assert [s.action for s in v.counterexample][-1].startswith("flag_")
        assert len(v.counterexample) == 2


def test_kv_corruption_fires_the_rule_on_the_affected_requests() -> None:
    """Flip bytes in the KV of every third request: those (and only those) change, and the rule aborts them."""
    tok = ByteTokenizer()
    # (the seeded tiny model falls into attention-driven loops on some prompts, which its
    # token-path MTP head cannot predict; this prompt family keeps clear of them)
    prompts = [tok.encode(f"prompt number {i}: def f(x): return x*{i}\n") for i in range(12)]
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    def run(corrupt: set[int]) -> dict[int, list]:
        core = EngineCore(EngineConfig(monitor=MonitorConfig.of("post_mortem")))   # the tiny model's own: rule off
        ev: dict[int, list] = {i: [] for i in range(len(prompts))}
        for i, p in enumerate(prompts):
            core.add(GenerationRequest(str(i), tuple(p), params), ev[i].append)
            if i in corrupt:
                core.corrupt_after_prefill.add(str(i))
        while core.step():
            pass
        assert core.pool.num_free == core.pool.num_pages
        return {i: e[-1] for i, e in ev.items()}

    affected = {0, 3, 6, 9}
    clean, dirty = run(set()), run(affected)
    for i in affected:
        assert dirty[i].finish_reason == "anomaly" and dirty[i].detail in ("low_accept_length",
                                                                          "degenerate_accept_rate"), dirty[i]
        assert dirty[i].completion_tokens <= 140, "aborted soon after the rule is armed"
    for i in set(range(len(prompts))) - affected:
        assert dirty[i] == clean[i], f"request {i} was not corrupted and must be unaffected"
    healthy = [i for i in clean if clean[i].finish_reason == "length"]
    assert len(healthy) >= 9, f"the seeded model's MTP head should be healthy on most prompts: {healthy}"
