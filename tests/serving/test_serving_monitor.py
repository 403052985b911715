"""The anomaly rule: the runtime monitor (unit), the spec's properties (Z3), the KV audit, KV corruption firing it."""
from __future__ import annotations

from fractions import Fraction

import pytest

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams
from kvproof.runtime.serving.kv_audit import kv_error
from kvproof.runtime.serving.monitor import MonitorConfig, RequestMonitor, post_mortem_audit
from kvproof.runtime.tools.monitor_bench import _prompts
from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.spec.core import ProtocolViolation, SpecError
from kvproof.spec.instance import Instance
from kvproof.spec.specdec_monitor import (AUDIT_OUTCOME, PROPERTIES, SUSPICION, AcceptMonitor, Phase, audit_error,
                                          monitor_protocol)
from kvproof.verify.checks_monitor import _check, _settles
from kvproof.verify.verdict import Status


def _corrupt(cfg: MonitorConfig = MonitorConfig(), model: str = "post_mortem") -> RequestMonitor:
    """A monitor whose KV audit always finds corruption: every suspicion aborts (the post-mortem's rule)."""
    return RequestMonitor(cfg, model=model, audit=post_mortem_audit)


def _run(mon: RequestMonitor, accepted: int, drafted: int, steps: int) -> tuple[int, str | None]:
    """Feed identical steps until the rule fires; (steps taken, reason)."""
    for i in range(steps):
        why = mon.step(accepted, drafted)
        if why:
            return i + 1, why
    return steps, None


def test_low_accept_fires_only_after_min_tokens() -> None:
    mon = _corrupt()
    n, why = _run(mon, 0, 2, 500)               # accept length 1.0: one token per step
    assert why == "low_accept_length" and n == 129, "fires on the first step past 128 generated tokens"
    assert mon.aborted and mon.accept_length == 1.0


def test_healthy_and_boundary_rates_do_not_fire() -> None:
    assert _run(_corrupt(), 1, 2, 1000)[1] is None       # length 2.0, rate 0.5
    # exactly 1.4 is not below 1.4: 2 accepted of 5 steps
    mon = _corrupt()
    for _ in range(60):
        for a in (1, 1, 0, 0, 0):
            assert mon.step(a, 2) is None
    assert mon.accept_length == pytest.approx(1.4)


def test_degenerate_fires_above_max_rate() -> None:
    n, why = _run(_corrupt(), 2, 2, 500)  # every draft accepted: rate 1.0
    assert why == "degenerate_accept_rate" and 3 * n > 128 >= 3 * (n - 1)


def test_thresholds_come_from_the_spec_per_model() -> None:
    """The default model has its own calibrated entry (see THRESHOLDS); a model without one gets the post-mortem's."""
    from kvproof.spec.specdec_monitor import THRESHOLDS
    assert _corrupt(model="tiny").cfg == MonitorConfig(True, 128, 1.2, 0.96)
    assert _corrupt(model="glm5").cfg == MonitorConfig(True, 128, 1.4, 0.96)
    assert _run(_corrupt(model="tiny"), 1, 2, 1000)[1] is None                  # length 2.0: healthy
    assert _run(_corrupt(model="tiny"), 0, 2, 1000)[1] == "low_accept_length"
    assert _run(_corrupt(model="tiny"), 2, 2, 500)[1] == "degenerate_accept_rate"
    assert _corrupt(MonitorConfig(min_accept_length=1.3), model="tiny").cfg.min_accept_length == 1.3
    assert set(THRESHOLDS) >= {"post_mortem", "tiny"}
    assert all(t.audit_rtol <= Fraction(1, 2) for t in THRESHOLDS.values()), "foreign KV (error ~1.4) never passes"


def test_an_intact_kv_clears_the_suspicion_and_rearms_the_rule() -> None:
    """A suspicion without evidence aborts nothing: the audit runs once per armed window, and the window restarts."""
    calls: list[int] = []
    mon = RequestMonitor(MonitorConfig(), audit=lambda: calls.append(1) or 1e-9)
    assert _run(mon, 0, 2, 1000) == (1000, None)               # accept length 1.0 for 1000 steps
    mon.step(2, 2)
    assert len(calls) == mon.audits == 1000 // 129, "one audit per 129 tokens: the window restarted each time"
    assert not mon.aborted and mon.steps == 1000 % 129 + 1
    assert (mon.accept_length, mon.accept_rate) == (1003 / 1001, 2 / 2002), "a request's statistics span its windows"
    # the same statistics with a corrupted KV: the first audit aborts
    bad = RequestMonitor(MonitorConfig(), audit=lambda: 0.6)   # above the post-mortem's audit_rtol 1/2
    assert _run(bad, 0, 2, 1000) == (129, "low_accept_length") and bad.aborted and bad.audits == 0
    assert _run(RequestMonitor(MonitorConfig(), audit=lambda: float("nan")), 2, 2, 500)[1] == "degenerate_accept_rate"


def test_an_enabled_monitor_needs_an_audit() -> None:
    with pytest.raises(ValueError, match="audit"):
        RequestMonitor(MonitorConfig())
    assert RequestMonitor(MonitorConfig(enabled=False)).step(0, 2) is None   # statistics only: no evidence needed


def test_thresholds_are_configurable_and_disable() -> None:
    cfg = MonitorConfig(min_tokens=10, min_accept_length=2.5, max_accept_rate=0.99)
    n, why = _run(_corrupt(cfg), 1, 2, 100)             # length 2.0 < 2.5
    assert why == "low_accept_length" and n == 6              # 12 generated > 10
    assert _run(RequestMonitor(MonitorConfig(enabled=False)), 0, 2, 500)[1] is None
    with pytest.raises(ValueError, match="max_accept_rate"):
        MonitorConfig(max_accept_rate=1.5)


def test_spec_refuses_a_step_past_a_crossing() -> None:
    """The runtime cannot keep generating after the rule crossed without settling the suspicion first."""
    inst = Instance(monitor_protocol(min_tokens=2), "fixed", {}, actor="monitor")
    for _ in range(3):
        inst.fire("step", accepted=0, drafted=1)
    with pytest.raises(ProtocolViolation, match="no_step_past_threshold"):
        inst.fire("step", accepted=0, drafted=1)
    with pytest.raises(ProtocolViolation, match="suspect_low_accept"):
        inst.fire("flag_low_accept", **audit_error(float("inf")))   # no abort without a suspicion first
    inst.fire("suspect_low_accept")
    assert inst.get("phase") == Phase.SUSPECT_LOW_ACCEPT and not inst.violated_invariants()
    with pytest.raises(ProtocolViolation, match="running"):
        inst.fire("step", accepted=0, drafted=1)              # nor a step while the audit is pending
    corrupted, intact = audit_error(0.6), audit_error(1e-9)   # beyond / within the default audit_rtol 1/2
    with pytest.raises(ProtocolViolation, match="audit_error_within_rtol"):
        inst.fire("clear", **corrupted)                       # no resuming on a corrupted KV
    with pytest.raises(ProtocolViolation, match="audit_error_beyond_rtol"):
        inst.fire("flag_low_accept", **intact)                # nor an abort on an intact one
    inst.fire("clear", **intact)                              # the audit found the KV intact
    assert (inst.get("phase"), inst.get("steps"), inst.get("generated"), inst.get("audits")) == (Phase.RUNNING, 0, 0, 1)
    for _ in range(3):
        inst.fire("step", accepted=0, drafted=1)
    inst.fire("suspect_low_accept")
    inst.fire("flag_low_accept", **corrupted)                 # the audit found it corrupted
    assert inst.get("phase") == Phase.ABORTED_LOW_ACCEPT and inst.holds("aborted") and not inst.violated_invariants()
    with pytest.raises(ProtocolViolation, match="accepted_le_drafted"):
        Instance(AcceptMonitor, "fixed", {}, actor="monitor").fire("step", accepted=3, drafted=2)


@pytest.mark.parametrize("err,intact", [(0.0, True), (1e-300, True), (0.5, True), (0.5000000000000001, False),
                                        (1.4, False), (float("inf"), False), (float("nan"), False)])
def test_the_spec_settles_an_audit_exactly_at_its_tolerance(err: float, intact: bool) -> None:
    """The outcome is the spec's exact comparison with audit_rtol (1/2): the float's own value, inf/NaN corrupted."""
    inst = Instance(monitor_protocol(min_tokens=0), "fixed", {}, actor="monitor")
    inst.fire("step", accepted=0, drafted=1)
    inst.fire("suspect_low_accept")
    enabled = [a for a in AcceptMonitor.tagged(AUDIT_OUTCOME) if inst.enabled(a, **audit_error(err))]
    assert enabled == (["clear"] if intact else ["flag_low_accept"])
    mon = RequestMonitor(MonitorConfig(min_tokens=0), audit=lambda: err)
    assert mon.step(0, 1) == (None if intact else "low_accept_length") and mon.aborted is not intact


def test_audit_error_encodes_the_float_exactly_and_refuses_a_negative() -> None:
    e = audit_error(0.1)
    assert Fraction(e["error_num"], e["error_den"]) == Fraction(0.1) and e["error_den"] >= 1
    assert audit_error(float("inf"))["error_den"] == audit_error(float("nan"))["error_den"] == 0
    with pytest.raises(ValueError, match="expected a relative difference >= 0"):
        audit_error(-0.5)


def test_the_monitor_tries_the_spec_actions_of_each_role() -> None:
    """The runtime's lists are the spec's tags: a renamed or added suspicion needs no runtime edit."""
    mon = RequestMonitor(MonitorConfig(), audit=post_mortem_audit)
    assert mon._suspicions == AcceptMonitor.tagged(SUSPICION) == ("suspect_low_accept", "suspect_degenerate")
    assert mon._outcomes == AcceptMonitor.tagged(AUDIT_OUTCOME) == ("clear", "flag_low_accept", "flag_degenerate")
    with pytest.raises(SpecError, match="no action is tagged 'nope'.*audit_outcome"):
        AcceptMonitor.tagged("nope")


@pytest.mark.parametrize("variant", AcceptMonitor.variants)
def test_every_suspicion_settles_by_exactly_one_outcome(variant: str) -> None:
    """Z3: the runtime's loop over the audit outcomes always fires one, and one only; without a guard of the
    decision two are enabled at once (so the check can fail)."""
    assert _settles(variant).status == Status.PROVEN
    for guard in ("audit_error_beyond_rtol", "audit_error_within_rtol", "audit_error_finite"):
        v = _settles(variant, dropped=frozenset({guard}))
        assert v.status == Status.REFUTED and "both enabled" in v.detail, (guard, v.detail)


@pytest.mark.parametrize("variant", AcceptMonitor.variants)
@pytest.mark.parametrize("prop", PROPERTIES)
def test_spec_properties(variant: str, prop: str) -> None:
    v = _check(variant, prop)
    assert v.ok, f"{v.check_id}: {v.status} ({v.detail})"
    if v.status == Status.REFUTED:                            # naive: suspects after one unlucky step
        assert [s.action for s in v.counterexample][-1].startswith("suspect_")
        assert len(v.counterexample) == 2


def test_kv_audit_measures_corruption() -> None:
    """The audit's error is ~0 for a sequence's own cache, large for flipped bytes and for another prompt's KV."""
    core = EngineCore(EngineConfig(monitor=MonitorConfig(enabled=False)))
    try:
        for i, text in enumerate(("def f(x): return x * 2\n", "class A:\n    pass\n")):
            core.add(GenerationRequest(str(i), tuple(ByteTokenizer().encode(text)), SamplingParams(max_tokens=40)),
                     lambda ev: None)
        for _ in range(6):                                    # prefill and a few decode steps
            core.step()
        a, b = core.seqs["0"], core.seqs["1"]
        assert a.output and a.num_cached > len(a.prompt), "decode steps cached output positions too"
        assert core._kv_error(a) < 1e-9
        n = min(a.num_cached, b.num_cached)
        foreign = core.export_tokens(b.pages, n)
        assert kv_error(core.model, foreign, a.tokens[:n]) > 1.0, "another prompt's KV is not this one's"
        core.cache.corrupt(a.pages, a.num_cached, seed=1)
        assert core._kv_error(a) > 1.0 and core._kv_error(b) < 1e-9
    finally:
        core.close()


def test_kv_corruption_fires_the_rule_on_the_affected_requests() -> None:
    """Flip bytes in the KV of every third request: those (and only those) change, and the rule aborts them."""
    tok = ByteTokenizer()
    prompts = [tok.encode(f"prompt number {i}: def f(x): return x*{i}\n") for i in range(12)]
    params = SamplingParams(max_tokens=200, ignore_eos=True)

    def run(corrupt: set[int]) -> dict[int, list]:
        core = EngineCore(EngineConfig())                     # the default model's own thresholds
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
    assert all(clean[i].finish_reason == "length" for i in clean), "no clean request is aborted"


def test_a_clean_greedy_loop_is_audited_not_aborted() -> None:
    """The default model loops on this prompt (accept length 1.0 from the start, like corrupted KV): the rule
    suspects it, the KV audit finds the cache intact, and the request runs to its length."""
    core = EngineCore(EngineConfig())
    ev: list = []
    core.add(GenerationRequest("loop", tuple(_prompts(1, 7)[0]), SamplingParams(max_tokens=400)), ev.append)
    mon = core.seqs["loop"].monitor
    assert mon is not None
    while core.step():
        pass
    assert ev[-1].finish_reason == "length" and ev[-1].completion_tokens == 400
    assert mon.audits >= 2 and mon.last_error is not None and mon.last_error < 1e-9
