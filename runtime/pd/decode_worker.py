"""The decode side: scheduler and KV slot table, driven only by firing the KV slot spec.

`DecodeWorker` is the protocol logic of the decode process, free of threads and
sockets so tests can drive it step by step: the process loop (pd/decode_process.py)
calls `submit`, `abort`, `on_message`, `rank_dead` and `tick` from one thread,
and the transports' receive threads call `on_land`. Slot state lives in the spec
`Instance` (actor "decode"); this module keeps only derived indexes (a free-slot
deque, request <-> slot maps, timers) and counters.

Request path: submit -> alloc (Alloc to every rank) -> on_done per rank ->
start_decode -> decode reads the slot (`KVPool.bad_bytes`; real-KV mode: the `read` hook imports it
into the model) -> finish.
Termination: client abort -> abort; transfer timeout -> timeout; a rank whose
connection died -> its transport is closed and drained by the caller, then
abort of its requests and on_peer_dead for every aborting slot; reclaim when
every rank is safe. In the `unfixed` variant abort/timeout free the slot at once.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import IO, Any, Callable

from kvproof.runtime.pd.kv_pool import KVPool
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import Abort, Alloc, Done, Message, Result, Safe, from_emission
from kvproof.runtime.transport.messages import receive_args
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.core import ProtocolViolation
from kvproof.spec.instance import Instance
from kvproof.spec.machine import Emission, Firing

SendFn = Callable[[int, Message], None]       # (rank, message)
ReportFn = Callable[[Result], None]
ReadFn = Callable[[int, "Request"], int]      # decode's read of a READY slot -> bad bytes (real-KV mode)


@dataclass
class Request:
    """A client request as decode tracks it (bookkeeping only; slot state is in the spec instance)."""

    rid: int
    n_tokens: int
    submitted: float
    slot: int | None = None
    epoch: int | None = None
    extra: dict[str, Any] | None = None     # real-KV mode: Alloc payload (prompt tokens, fault flag)
    allocated: float | None = None          # when it got its slot (its queue time ends)
    hidden: str | None = None               # real-KV mode: the prompt's last hidden state, from an accepted Done


class DecodeWorker:
    """The decode process's slot table and scheduler: every state change is a fired spec action."""

    def __init__(self, cfg: PDConfig, pool: KVPool, send: SendFn, report: ReportFn,
                 trace: IO[str] | str | None = None, clock: Callable[[], float] = time.monotonic,
                 auto: bool = True, read: ReadFn | None = None) -> None:
        # auto=False: each event handler fires only its own action and the caller fires the
        # follow-ups (start_decode, finish, peer_dead, reclaim) one step at a time (model-based tests)
        self.cfg, self.pool, self._send, self._report, self.clock = cfg, pool, send, report, clock
        self.auto = auto
        self.read = read                                    # None: synthetic KV, compared by KVPool
        # decode checks "connection_drained" itself: rank_dead reports the drained connection (observe kill)
        self.inst = Instance(KVSlot, cfg.variant, cfg.spec_params, actor="decode", trace=trace,
                             env_checked=("connection_drained",))
        self.free: deque[int] = deque(range(cfg.slots))    # candidates; the spec decides
        self.waiting: deque[Request] = deque()
        self.by_rid: dict[int, Request] = {}
        self.by_slot: dict[int, Request] = {}
        self.why_dead: dict[int, str] = {}                  # rank -> why its connection died (text only)
        self.aborted_at: dict[int, float] = {}              # slot -> when it entered ABORTING
        self._timers: list[tuple[float, int, str, int, int]] = []
        self._seq = itertools.count()
        self.reclaim_latency_s: list[float] = []
        self.stats: Counter[str] = Counter()
        self.bytes_landed = [0] * cfg.writers               # one counter per receive thread
        self.foreign_landings = [0] * cfg.writers
        self.foreign_slots: set[int] = set()                # slots a write of another epoch landed in

    # ------------------------------------------------------------ client side
    def submit(self, rid: int, n_tokens: int, extra: dict[str, Any] | None = None) -> None:
        """Queue a new request (extra: fields Alloc carries to the ranks); it gets a slot when the spec allows."""
        if rid in self.by_rid:
            raise ValueError(f"submit: rid={rid} is already in flight")
        if not 1 <= n_tokens <= self.cfg.tokens_per_slot:
            raise ValueError(f"submit: n_tokens={n_tokens}, expected 1..{self.cfg.tokens_per_slot}")
        req = Request(rid, n_tokens, self.clock(), extra=extra)
        self.stats["submitted"] += 1
        if self.why_dead:
            self._result(req, "failed", self._dead_reason())
            return
        self.by_rid[rid] = req
        self.waiting.append(req)
        self._schedule()

    def abort(self, rid: int, reason: str = "client abort") -> None:
        """The client aborted or disconnected: abort the request wherever it is."""
        req = self.by_rid.get(rid)
        if req is None:
            self.stats["abort_after_end"] += 1
            return
        if req.slot is None:
            self.waiting.remove(req)
            self._result(req, "aborted", reason + " (before a slot was allocated)")
            return
        self._abort_request(req, "abort", "aborted", reason)

    # ------------------------------------------------------------ prefill side
    def on_message(self, rank: int, msg: Message) -> None:
        """A protocol message from prefill rank `rank`; stale or duplicate ones are ignored."""
        if isinstance(msg, (Done, Safe)) and msg.writer != rank:
            raise ValueError(f"{msg.TYPE} from rank {rank} names writer={msg.writer}")
        if isinstance(msg, Done):
            if not self._try("on_done", **receive_args(msg, "on_done")):
                return
            req = self.by_slot.get(msg.slot)               # the spec took this epoch's Done: its request's
            if req is not None and req.hidden is None:
                req.hidden = msg.hidden
            if self.auto:
                self._after_start(msg.slot, bool(self._emit(self.inst.try_fire("start_decode", s=msg.slot))))
        elif isinstance(msg, Safe):
            if self._try("on_safe", **receive_args(msg, "on_safe")) and self.auto:
                self._maybe_reclaim(msg.slot)
        else:
            raise ValueError(f"decode: unexpected {msg.TYPE} message from prefill rank {rank}")

    def on_land(self, tag: tuple[int, ...], region: int, offset: int, length: int) -> None:
        """Transport receive-thread hook: a write landed (traced; the bytes are already placed)."""
        s, w, e = tag[0], tag[1], tag[2]
        self.inst.record("land", s=s, w=w, e=e)
        self.bytes_landed[w] += length
        if self.inst.holds("lands_foreign", s=s, e=e):
            self.foreign_landings[w] += 1
            self.foreign_slots.add(s)

    def rank_dead(self, rank: int, reason: str) -> None:
        """Rank `rank`'s connection is closed AND drained by the caller: none of its writes can land."""
        if self.is_dead(rank):
            return
        self.why_dead[rank] = reason
        self.inst.observe("kill", w=rank)
        if not self.auto:
            return
        why = self._dead_reason()
        for req in [r for r in self.by_slot.values() if self.inst.holds("waiting_for_kv", s=r.slot)]:
            self._abort_request(req, "abort", "failed", why)
        self._schedule()                                    # fails every waiting request
        for s in range(self.cfg.slots):
            self._peer_dead(s)

    # ------------------------------------------------------------ single steps
    def alloc(self, s: int, req: Request) -> None:
        """Give free slot s to request req (a fresh epoch); Alloc goes to every rank."""
        self._allocated(s, req, self._fire("alloc", s=s, extra={"rid": req.rid, "n_tokens": req.n_tokens,
                                                                 **(req.extra or {})}))

    def _allocated(self, s: int, req: Request, _ems: list[Emission]) -> None:
        req.slot, req.epoch = s, self.inst.get("epoch", s)
        req.allocated = self.clock()
        self.by_rid[req.rid] = req
        self.by_slot[s] = req
        self._timer(self.cfg.transfer_timeout_s, "timeout", s, req.epoch)

    def start_decode(self, s: int) -> None:
        """Every rank's KV landed: decode starts reading slot s (and finishes now or after decode_ms)."""
        self._fire("start_decode", s=s)
        self._after_start(s, True)

    def _after_start(self, s: int, started: bool) -> None:
        """Decoding of slot s started: finish it now or after decode_ms."""
        if not started or not self.auto:
            return
        if self.cfg.decode_ms > 0:
            self._timer(self.cfg.decode_ms / 1000, "decoded", s, self.inst.get("epoch", s))
        else:
            self.finish(s)

    def finish(self, s: int) -> None:
        """Decode reads slot s (synthetic: compares with the expected KV; real: imports it) and frees it."""
        req = self.by_slot[s]
        bad = self.read(s, req) if self.read else self.pool.bad_bytes(s, req.rid, req.n_tokens)
        self._fire("finish", s=s)
        del self.by_slot[s]
        self._result(req, "corrupt" if bad else "served", "foreign KV bytes in the slot" if bad else None, bad)
        self._freed(s)

    def timeout(self, s: int) -> None:
        """The transfer into slot s took too long: terminate its request."""
        self._abort_request(self.by_slot[s], "timeout", "failed",
                        f"transfer timeout: KV not complete after {self.cfg.transfer_timeout_s} s")

    def peer_dead(self, s: int, w: int) -> None:
        """Rank w (already declared dead and drained) can write nothing more into aborting slot s."""
        f = self.inst.try_fire("on_peer_dead", s=s, w=w)
        if f.guard == "connection_drained":
            raise ValueError(f"peer_dead: rank {w} was not declared dead (rank_dead) and drained")
        if not f:
            raise ProtocolViolation(KVSlot.name, "on_peer_dead", {"s": s, "w": w}, f.guard)
        self._emit(f)

    def reclaim(self, s: int) -> None:
        """Return aborted slot s to the free pool."""
        self._fire("reclaim", s=s)
        self._reclaimed(s)

    def _reclaimed(self, s: int) -> None:
        self.stats["slots_reclaimed"] += 1
        self.reclaim_latency_s.append(self.clock() - self.aborted_at.pop(s))
        self._freed(s)

    # ------------------------------------------------------------ timers
    def tick(self) -> float | None:
        """Fire due timers (transfer timeouts, end of decoding); returns seconds to the next one."""
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, s, e = heapq.heappop(self._timers)
            req = self.by_slot.get(s)
            if req is None or req.epoch != e:
                continue                                    # that request is gone already
            if kind == "timeout" and self.inst.enabled("timeout", s=s):
                self.timeout(s)
            elif kind == "decoded" and self.inst.enabled("finish", s=s):
                self.finish(s)
        return max(0.0, self._timers[0][0] - now) if self._timers else None

    # ------------------------------------------------------------ queries
    def idle(self) -> bool:
        """No request in flight and every slot back in the free pool."""
        return not self.by_rid and self._free_slots() == self.cfg.slots

    def summary(self) -> dict[str, Any]:
        """Counters for the stress report."""
        return {**self.stats, "slots": self.cfg.slots,
                "slots_free": self._free_slots(),
                "bytes_landed": sum(self.bytes_landed), "foreign_landings": sum(self.foreign_landings),
                "reclaim_latency_s": list(self.reclaim_latency_s), "dead_ranks": self.dead}

    @property
    def dead(self) -> dict[int, str]:
        """Ranks whose connection is closed and drained (the spec's `dead`), with why."""
        return {w: self.why_dead.get(w, "dead") for w in range(self.cfg.writers) if self.is_dead(w)}

    def is_dead(self, w: int) -> bool:
        """Whether rank w's connection is closed and drained, as the spec instance records it."""
        return self.inst.holds("drained", w=w)

    def _free_slots(self) -> int:
        return sum(self.inst.holds("slot_free", s=s) for s in range(self.cfg.slots))

    # ------------------------------------------------------------ internals
    def _schedule(self) -> None:
        if self.why_dead:
            while self.waiting:
                self._result(self.waiting.popleft(), "failed", self._dead_reason())
            return
        while self.waiting and self.free:
            s = self.free.pop()                             # most recently freed first (warm slot)
            req = self.waiting[0]
            f = self.inst.try_fire("alloc", s=s)
            if not f:
                continue                                    # stale candidate; the spec says no
            self.waiting.popleft()
            self._allocated(s, req, self._emit(f, {"rid": req.rid, "n_tokens": req.n_tokens, **(req.extra or {})}))

    def _abort_request(self, req: Request, action: str, status: str, reason: str) -> None:
        s = req.slot
        assert s is not None and self.by_slot.get(s) is req
        self._fire(action, s=s)
        del self.by_slot[s]
        self._result(req, status, reason)
        if self.inst.holds("slot_free", s=s):               # unfixed: freed at once
            self.stats["slots_reclaimed"] += 1
            self.reclaim_latency_s.append(0.0)
            self._freed(s)
        else:
            self.aborted_at[s] = self.clock()
            if self.auto:
                self._peer_dead(s)

    def _peer_dead(self, s: int) -> None:
        for w in range(self.cfg.writers):                   # the spec's guard picks the dead, unsafe ones
            self._emit(self.inst.try_fire("on_peer_dead", s=s, w=w))
        self._maybe_reclaim(s)

    def _maybe_reclaim(self, s: int) -> None:
        if self._emit(self.inst.try_fire("reclaim", s=s)):
            self._reclaimed(s)

    def _freed(self, s: int) -> None:
        """Keep the derived free deque in step with the spec after a firing that freed s."""
        assert self.inst.holds("slot_free", s=s), s
        self.free.append(s)
        if self.auto:
            self._schedule()

    def _result(self, req: Request, status: str, reason: str | None, bad: int = 0) -> None:
        self.by_rid.pop(req.rid, None)
        self.stats[status] += 1
        self._report(Result(req.rid, status, reason, req.slot, self.clock() - req.submitted, bad))

    def _timer(self, delay: float, kind: str, s: int, e: int) -> None:
        heapq.heappush(self._timers, (self.clock() + delay, next(self._seq), kind, s, e))

    def _try(self, action: str, **args: int) -> bool:
        """Fire a receive action if enabled; a stale or duplicate message is counted and ignored."""
        f = self._emit(self.inst.try_fire(action, **args))
        if not f:
            self.stats[f"ignored_{action}"] += 1
        return bool(f)

    def _fire(self, action: str, extra: dict[str, int] | None = None, **args: int) -> list[Emission]:
        f = self.inst.try_fire(action, **args)
        if not f:
            raise ProtocolViolation(KVSlot.name, action, args, f.guard)
        self._emit(f, extra)
        return f.emissions

    def _emit(self, f: Firing, extra: dict[str, Any] | None = None) -> Firing:
        """Count a firing and send its messages (a dead rank gets none); passes `f` through."""
        if not f:
            return f
        self.stats["fired"] += 1
        for em in f.emissions:
            msg = from_emission(em, **(extra or {})) if em.fields["channel"] == "alloc" else from_emission(em)
            assert isinstance(msg, (Alloc, Abort))
            if self.is_dead(msg.writer):
                self.stats["sends_to_dead_rank"] += 1
            else:
                self._send(msg.writer, msg)
        return f

    def _dead_reason(self) -> str:
        return "; ".join(f"prefill rank {w} dead: {why}" for w, why in sorted(self.why_dead.items()))
