"""Model-based test: the spec's Hypothesis machine drives the real decode and prefill logic.

`kvproof.verify.stateful.machine_for` picks every step from the KV slot spec
(environment included: which message is delivered, which write lands, when a
rank dies). The system under test is the runtime's `DecodeWorker` and one
`PrefillRank` per writer, wired through controllable loopback transports (the
test lands each write when the model says so) and message logs (the test
delivers a message when the model says so). After every step the runtime's
state, its transports' in-flight and completed writes, and which slots received
a foreign write must equal the model's.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import precondition

from kvproof.runtime.pd.decode_worker import DecodeWorker, Request
from kvproof.runtime.pd.kv_pool import POOL_REGION, KVPool
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import Abort, Alloc, Done, Message, Result, Safe
from kvproof.runtime.pd.prefill_worker import PrefillRank
from kvproof.runtime.transport import Completion, Status, loopback_pair
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.machine import Emission

stateful = pytest.importorskip("kvproof.verify.stateful")

_DECODE_VARS = ("d_state", "epoch", "done_from", "safe_from")
_PREFILL_VARS = ("p_state", "p_epoch", "posted", "completed")


class RuntimeSUT:
    """The real decode worker and prefill ranks, stepped by the model."""

    def __init__(self, variant: str, slots: int, writers: int, chunks: int = 1) -> None:
        self.cfg = PDConfig(variant=variant, slots=slots, writers=writers, layers=chunks,
                            tokens_per_slot=2, bytes_per_token=8 * writers, delay_ms=None, transport="loopback")
        self.pool = KVPool(self.cfg)
        self.sent: dict[tuple[str, int, int, int], Message] = {}   # (channel, slot, writer, epoch)
        self.last_sends: list[tuple[str, int, int, int]] = []
        self.results: list[Result] = []
        self.decode = DecodeWorker(self.cfg, self.pool, lambda w, m: self._log(m), self.results.append, auto=False)
        self.links = [loopback_pair(controllable=True) for _ in range(writers)]   # (prefill end, decode end)
        self.ranks = []
        for w, (pend, dend) in enumerate(self.links):
            dend.register(self.pool.buffer, region_id=POOL_REGION)
            dend.on_land = self.decode.on_land
            self.ranks.append(PrefillRank(self.cfg, w, pend, self._log, auto=False))
        self.cq: list[list[Completion]] = [[] for _ in range(writers)]  # polled, not yet given to the rank
        self.next_rid = 0

    def _log(self, m: Message) -> None:
        key = (m.TYPE, m.slot, m.writer, m.epoch)
        self.sent[key] = m
        self.last_sends.append(key)

    def _poll(self, w: int) -> None:
        self.cq[w] += [c for c in self.links[w][0].poll() if c.ok]

    def can_apply(self, action: str, a: dict[str, Any]) -> bool:
        """A delivery is possible only for a message the runtime really sent."""
        channel = {"on_done": "done", "on_safe": "safe", "p_on_alloc": "alloc", "p_on_abort": "abort",
                   "p_on_abort_busy": "abort", "p_on_abort_unseen": "abort"}.get(action)
        return channel is None or (channel, a["s"], a["w"], a["e"]) in self.sent

    def apply(self, action: str, a: dict[str, Any], emissions: list[Emission]) -> None:
        """Carry out the model's step in the runtime; its sends and posts must be the model's."""
        self.last_sends = []
        s, w, e = a.get("s"), a.get("w"), a.get("e")
        posted_before = [len(p.pending()) for p, _ in self.links]
        d, r = self.decode, (self.ranks[w] if w is not None else None)
        if action == "alloc":
            d.alloc(s, Request(self.next_rid, self.cfg.tokens_per_slot, 0.0))
            self.next_rid += 1
        elif action in ("on_done", "on_safe"):
            d.on_message(w, self.sent[(action[3:], s, w, e)])
        elif action in ("start_decode", "finish", "timeout", "reclaim"):
            getattr(d, action)(s)
        elif action == "abort":
            d.abort(d.by_slot[s].rid)
        elif action == "on_peer_dead":
            d.peer_dead(s, w)
        elif action == "p_on_alloc":
            r.on_message(self.sent[("alloc", s, w, e)])
        elif action.startswith("p_on_abort"):
            r.on_message(self.sent[("abort", s, w, e)])
        elif action == "p_post":
            r.post(s)
        elif action == "p_complete":
            self._poll(w)
            match = [c for c in self.cq[w] if tuple(c.tag[:3]) == (s, w, e)]
            if match:
                self.cq[w].remove(match[0])
                r.on_completion(match[0])
            else:                                  # an older epoch's completion: a no-op in the spec
                r.on_completion(Completion(0, (s, w, e, 0), 0, Status.OK))
        elif action == "p_finish":
            r.finish(s)
        elif action == "p_answer_safe":
            r.answer_safe(s)
        elif action == "land":
            pend = self.links[w][0]
            pe = r.inst.get("p_epoch", s, w)   # the model counts older writes together (fl_old)
            wr = next(p for p in pend.pending() if not p.landed and p.tag[0] == s
                      and (p.tag[2] == e if e == pe else p.tag[2] < pe))
            pend.land(wr.wr_id)
        elif action == "kill":
            pend, dend = self.links[w]
            pend.kill("killed by the model")
            dend.close_and_drain()
            d.rank_dead(w, "killed by the model")
        else:
            raise AssertionError(f"no runtime step for action {action}")
        want = sorted((em.fields["channel"], *em.fields["index"], em.fields["epoch"]) for em in emissions
                      if em.kind == "send" and em.fields["index"][1] not in d.dead)  # a dead rank gets nothing
        assert sorted(self.last_sends) == want, f"{action}{a}: runtime sent {self.last_sends}, spec {want}"
        posts = [em for em in emissions if em.kind == "post_write"]
        if posts:
            pw = self.links[w][0].pending()[-1]
            f = posts[0].fields
            assert len(self.links[w][0].pending()) == posted_before[w] + 1
            assert pw.tag == (f["slot"], f["writer"], f["epoch"], f["chunk"]), (pw.tag, f)

    def mismatch(self, model: dict[str, Any]) -> str | None:
        """First difference between the runtime and the model state, or None."""
        S, W = self.cfg.slots, self.cfg.writers
        for s in range(S):
            for v in _DECODE_VARS:
                idx = [(s,)] if v in ("d_state", "epoch") else [(s, w) for w in range(W)]
                for i in idx:
                    got, want = self.decode.inst.get(v, *i), model[_label(v, i)]
                    if got != want:
                        return f"decode {_label(v, i)}: runtime {got}, model {want}"
            foreign = model[f"corrupt[{s}]"] or model[f"into_free[{s}]"]
            if (s in self.decode.foreign_slots) != bool(foreign):
                return f"slot {s}: runtime foreign landing {s in self.decode.foreign_slots}, model {foreign}"
            for w in range(W):
                for v in _PREFILL_VARS:
                    got, want = self.ranks[w].inst.get(v, s, w), model[_label(v, (s, w))]
                    if got != want:
                        return f"prefill rank {w} {_label(v, (s, w))}: runtime {got}, model {want}"
                self._poll(w)
                pe = model[_label("p_epoch", (s, w))]
                pend = [p for p in self.links[w][0].pending() if p.tag[0] == s and not p.landed]
                counts = {"fl_n": sum(p.tag[2] == pe for p in pend), "fl_old": sum(p.tag[2] < pe for p in pend),
                          "cq_n": sum(c.tag[0] == s and c.tag[2] == pe for c in self.cq[w])}
                for v, got in counts.items():
                    if got != model[_label(v, (s, w))]:
                        return f"transport {_label(v, (s, w))}: runtime {got}, model {model[_label(v, (s, w))]}"
        return None

    def close(self) -> None:
        """Close every endpoint and trace."""
        for pend, dend in self.links:
            pend.close_and_drain()
            dend.close_and_drain()


def _label(v: str, idx: tuple) -> str:
    return v + "[" + ",".join(map(str, idx)) + "]"


SETTINGS = settings(max_examples=80, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck))


def _machine(variant: str, slots: int, writers: int, chunks: int) -> Any:
    """The spec's machine with the SUT; disruptive steps are rationed so happy paths get explored too."""
    params = {"slots": slots, "writers": writers, "max_chunks": chunks, "max_epoch": 3}
    base = stateful.machine_for(KVSlot, variant, params, include_strengthening=False,
                                sut_factory=lambda: RuntimeSUT(variant, slots, writers, chunks))
    body: dict[str, Any] = {
        "kill": precondition(lambda self: self.steps >= 30)(base.kill),
        "abort": precondition(lambda self: self.steps % 3 == 2)(base.abort),
        "timeout": precondition(lambda self: self.steps % 5 == 4)(base.timeout),
    }
    if variant == "unfixed":                      # the unfixed variant violates the properties by design
        body["properties_hold"] = lambda self: None
    cls = type(f"{base.__name__}_Rationed", (base,), body)
    cls.TestCase.settings = SETTINGS
    return cls


@pytest.mark.timeout(180)
@pytest.mark.parametrize("slots,writers,chunks", [(1, 1, 2), (1, 2, 1), (2, 1, 1)])
def test_runtime_matches_spec_fixed(slots: int, writers: int, chunks: int) -> None:
    """Fixed variant: the runtime follows the model step for step, and the properties hold."""
    _machine("fixed", slots, writers, chunks).TestCase().runTest()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("slots,writers,chunks", [(1, 1, 2), (2, 1, 1)])
def test_runtime_matches_spec_prefix(slots: int, writers: int, chunks: int) -> None:
    """Prefix variant: the runtime agrees with the model, including which slots get foreign writes."""
    _machine("unfixed", slots, writers, chunks).TestCase().runTest()


def test_sut_rejects_unknown_message_kind() -> None:
    """Decode refuses a prefill-bound message from a rank, naming it."""
    sut = RuntimeSUT("fixed", 1, 1)
    try:
        with pytest.raises(ValueError, match="unexpected alloc"):
            sut.decode.on_message(0, Alloc(0, 0, 1, 0, 1))
        with pytest.raises(ValueError, match="names writer"):
            sut.decode.on_message(0, Done(0, 1, 1))
        assert isinstance(Safe(0, 0, 1), Safe) and isinstance(Abort(0, 0, 1), Abort)
    finally:
        sut.close()
