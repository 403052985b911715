"""Decode's model in real-KV mode: READY slots into its EngineCore, first tokens at once, token events out.

`DecodeModel` is what `pd.decode_process.run_decode` drives: `on_submit` keeps a prompt until its
slot is READY; `read` (DecodeWorker's read of the slot, on the rank channel's thread as the last
`Done` arrives) copies the KV out, samples the first token from the hidden state the `Done` carried
and sends it; `step` (the loop thread) admits started sequences into the core and runs one model
step, sending its events as one frame.
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import fields
from typing import Any, Callable

import numpy as np
import torch

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams, TokenEvent
from kvproof.runtime.pd.kv_pool import KVPool
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import Event, Events, Message, Result, Stats, Submit
from kvproof.runtime.pd.kv_export import hidden_from_wire
from kvproof.runtime.serving.scheduler import Sequence
from kvproof.runtime.serving.server_metrics import histogram
from kvproof.spec.kv_slot import DState

STATS_INTERVAL_S = 0.2
_EVENT_FIELDS = tuple(f.name for f in fields(TokenEvent))


def _refused(greq: GenerationRequest, why: str, sent: int) -> TokenEvent:
    """The final event of a request decode cannot take (after `sent` tokens were delivered)."""
    return TokenEvent(greq.request_id, (), True, "abort", why, len(greq.prompt_tokens), sent)


class DecodeModel:
    """Decode's model: imports READY slots into its KV pages, decodes, streams Events, reports stats."""

    def __init__(self, ecfg: EngineConfig, pd: PDConfig) -> None:
        self.core = EngineCore(ecfg)
        self.pd = pd
        self.pending: dict[int, GenerationRequest] = {}    # rid -> request, until its slot is read
        # (rid, request, started sequence, its KV bytes): first token sent, not yet in the core
        self._started: deque[tuple[int, GenerationRequest, Sequence, np.ndarray]] = deque()
        self.pool: KVPool | None = None
        self._send: Callable[[Message], None] | None = None
        self._send_events: Callable[[list], None] | None = None
        self._batch: list[tuple[int, TokenEvent]] | None = None    # (rid, event) pairs of the step running now
        self._next_stats = 0.0
        self.imported_tokens = 0
        self.security: Callable[[], dict[str, Any]] = dict   # run_decode: refused connections and writes
        self.rank_stats: dict[int, dict[str, Any]] = {}    # prefill rank -> its latest live counters
        self._lock: Any = contextlib.nullcontext()

    def on_rank_stats(self, rank: int, data: dict[str, Any]) -> None:
        """A prefill rank's live counters (its prefix cache: where PD's cache hits happen)."""
        self.rank_stats[rank] = data

    def attach(self, pool: KVPool, send: Callable[[Message], None],
               send_events: Callable[[list], None] | None = None, lock: Any = None) -> None:
        """Called by run_decode: the slot pool to read from, the client channel's send, its send_events
        ((rid, TokenEvent) pairs as one binary frame; None: as Event/Events messages) and the lock
        that guards the slot worker (held for the live snapshot; None: no other thread uses it)."""
        self.pool, self._send, self._send_events = pool, send, send_events
        if lock is not None:
            self._lock = lock

    def on_submit(self, msg: Submit) -> None:
        """Remember a request's prompt and sampling parameters until its KV arrives."""
        if msg.tokens is None or msg.params is None:
            raise ValueError(f"submit rid {msg.rid}: real-KV mode needs 'tokens' and 'params'")
        if len(msg.tokens) != msg.n_tokens or not msg.tokens:
            raise ValueError(f"submit rid {msg.rid}: n_tokens={msg.n_tokens}, expected len(tokens) >= 1")
        p = dict(msg.params)
        p["stop_token_ids"] = tuple(p.get("stop_token_ids", ()))
        self.pending[msg.rid] = GenerationRequest(str(msg.rid), tuple(msg.tokens), SamplingParams(**p))

    def on_result(self, r: Result) -> None:
        """A request's slot life ended; forget it unless its KV was read (then the core owns it)."""
        if r.status != "served":
            self.pending.pop(r.rid, None)

    def read(self, s: int, req: Any) -> int:
        """DecodeWorker's read of READY slot s: copy its KV out, sample the first token from the hidden state
        the last Done carried and send it at once; the loop thread admits the sequence before its next step.

        Runs where the Done is handled: on a rank channel's thread, beside a model step, so it touches no
        queue, page or counter of the core (`EngineCore.start`) and sends its event itself."""
        assert self.pool is not None
        greq = self.pending.pop(req.rid)
        n, rid = len(greq.prompt_tokens), req.rid
        try:
            if req.hidden is None:
                raise ValueError("done: no 'hidden' (real-KV mode needs the prompt's last hidden state)")
            hidden = hidden_from_wire(req.hidden, self.core.model.cfg).to(self.core.cache.kv.device)
            # PD's queue: from the Submit until decode allocated its KV slot (prefill starts then)
            times = (req.submitted, req.allocated if req.allocated is not None else req.submitted)
            seq, ev = self.core.start(greq, hidden, times)
        except ValueError as e:                             # the router validates; never strand the slot
            self._flush([(rid, _refused(greq, f"decode refused: {e}", 0))])
            return 0
        raw = self.pool.array[s, :, :, :n]                                   # [W, L, n, Bw]
        data = np.ascontiguousarray(raw.transpose(1, 2, 0, 3)).reshape(self.pd.layers, n, -1)   # the slot is freed next
        self._flush([(rid, ev)])                            # the first token now, not with a step's events
        self._started.append((rid, greq, seq, data))
        return 0

    def _admit(self) -> None:
        """Loop thread: the started sequences' KV into model pages, the sequences into the core."""
        core = self.core
        while self._started:
            rid, greq, seq, data = self._started.popleft()
            n = len(greq.prompt_tokens)
            need = -(-n // core.model.cfg.page_size)
            if not core.pool.can_allocate(need):
                self._event(rid, _refused(greq, "decode out of KV pages", 1))
                continue
            pages = core.pool.allocate(need)
            core.cache.import_tokens(pages, torch.from_numpy(data).to(core.cache.kv.device))
            self.imported_tokens += n
            try:
                core.add(greq, lambda ev, rid=rid: self._event(rid, ev), prefilled=(pages, n), started=seq)
            except ValueError as e:
                core.pool.free(pages)
                self._event(rid, _refused(greq, f"decode refused: {e}", 1))

    def abort(self, rid: int, cause: str = "client") -> None:
        """The router aborted rid: stop it if it is decoding (the slot side is DecodeWorker.abort's)."""
        self.pending.pop(rid, None)
        self._admit()                                       # a started request is in the core before it aborts
        self.core.abort(str(rid), cause)

    def send_stats(self, worker: Any, nonce: int) -> None:
        """A live Stats snapshot now, tagged with the router's nonce (its /metrics scrape waits for it)."""
        self._send_msg(Stats({**self.snapshot(worker), "nonce": nonce}))

    def step(self, worker: Any) -> bool:
        """One model step (if any work) and, now and then, a live Stats snapshot; True when busy."""
        # the step's events go out in one frame: one send, one router wake-up per step, not per request
        self._batch = []
        try:
            with torch.no_grad():
                self._admit()
                busy = self.core.step()
        finally:
            batch, self._batch = self._batch, None
            if batch:
                self._flush(batch)
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + STATS_INTERVAL_S
            with self._lock:                                # the client thread may be submitting
                snap = self.snapshot(worker)
            self._send_msg(Stats(snap))
        return busy

    def snapshot(self, worker: Any) -> dict[str, Any]:
        """Model counters plus the slot table's: what the router's stats() shows."""
        out = self.core.stats()
        ws = worker.stats
        lat = worker.reclaim_latency_s
        out.update({
            "live": 1,
            "slots{state}": {st.name: worker.inst.count("d_state", st) for st in DState},
            "kv_transfers_total": ws["served"] + ws["corrupt"],
            "kv_transfer_failures_total": ws["failed"],
            "kv_requests_aborted_total": ws["aborted"],
            "slots_reclaimed_total": ws["slots_reclaimed"],
            **histogram("reclaim_latency_seconds", lat),
            "kv_transferred_bytes_total": sum(worker.bytes_landed),
            "kv_foreign_landings_total": sum(worker.foreign_landings),
            "kv_imported_tokens_total": self.imported_tokens,
            "pd_waiting_for_slot": len(worker.waiting),
            **self.security(),
        })
        # In PD mode prompts are prefilled on the prefill ranks, so their prefix caches give the hit
        # rate (decode imports each prompt's KV and has no prefix hits of its own).
        ranks: dict[str, float] = {}
        for r in self.rank_stats.values():                  # summed over the prefill ranks
            for k, v in r.items():
                if k.startswith("prefill_") and isinstance(v, (int, float)):
                    ranks[k] = ranks.get(k, 0) + v
        out.update(ranks)
        asked, hits = ranks.get("prefill_prompt_tokens_total", 0), ranks.get("prefill_prefix_hit_tokens_total", 0)
        out["prefix_cache_hit_tokens_total"] = hits
        out["cache_hit_rate"] = hits / asked if asked else 0.0
        return out

    def _event(self, rid: int, ev: TokenEvent) -> None:
        if self._batch is not None:
            self._batch.append((rid, ev))
        else:
            self._flush([(rid, ev)])

    def _flush(self, batch: list[tuple[int, TokenEvent]]) -> None:
        """A step's events to the router: one binary EVENTS frame (or JSON Event/Events without one)."""
        if self._send_events is not None:
            self._send_events(batch)
            return
        items = []
        for rid, ev in batch:
            d = {f: getattr(ev, f) for f in _EVENT_FIELDS}     # shallow: asdict's deep copy costs ~10x
            d["tokens"] = list(ev.tokens)
            items.append([rid, d])
        self._send_msg(Event(*items[0]) if len(items) == 1 else Events(items))

    def _send_msg(self, msg: Message) -> None:
        if self._send is not None:
            self._send(msg)
