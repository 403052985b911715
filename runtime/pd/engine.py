"""The PD-disaggregated engine: the model runs in prefill-rank processes and a decode process.

`PDEngine` implements the `Engine` interface for the HTTP server. It is the router: it starts a
`ModelCluster` (the PD runtime's processes in real-KV mode, `pd.model_worker`) and, per request,
sends `Submit(rid, n, prompt, params)` to decode. Decode allocates a KV slot by firing the
spec's `alloc`; the `Alloc` carries the prompt to every prefill rank, which runs its copy of the
model on the whole prompt and posts its share of the exported KV bytes into the slot as one-sided
writes (one per layer, tagged with the epoch), then `done` with the prompt's last hidden state;
after every rank's `done` decode fires `start_decode`, samples and sends the first token, imports
the slot into its model KV cache, frees the slot (`finish`) and decodes, streaming `Event`s
(TokenEvents) back here. With `layersplit=R` each prefill rank runs its forward on
a LayerSplit group of its own (R-1 follower processes, KV layers sharded) and gathers every layer for
the export; decode runs unsplit. `abort` sends `ClientAbort`: the spec's `abort` while the
slot is WAIT/READY (handshake in `fixed`, immediate free in `unfixed`), else the model's abort.
"""
from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Callable

from kvproof.runtime.serving.engine import STOP_STRING, EngineConfig, GenerationRequest, TokenEvent, context_limit
from kvproof.runtime.serving.engine_api import StreamingMixin
from kvproof.runtime.layersplit.split_cache import engine_shape
from kvproof.runtime.pd.cluster import ClusterError
from kvproof.runtime.pd.cpus import affinity, pin_process, plan_layout
from kvproof.runtime.pd.messages import Event, Result, Submit
from kvproof.runtime.pd.model_cluster import (  # noqa: F401 (PDEngineConfig: re-exported)
    ModelCluster, PDEngineConfig, model_config_of,
)
from kvproof.runtime.serving.server_metrics import histogram
from kvproof.runtime.transport.event_frames import EventBatch
from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.spec.kv_slot import DState

Sink = Callable[[TokenEvent], None]


class PDEngine(StreamingMixin):
    """The Engine interface over the PD runtime: router here, model in prefill and decode processes."""

    def __init__(self, cfg: EngineConfig | None = None, pd: PDEngineConfig | None = None,
                 model_name: str | None = None, secret: Any = None) -> None:
        self.cfg, self.pd = cfg or EngineConfig(), pd or PDEngineConfig()
        self.secret = secret                               # None: a fresh one (one-command launch)
        self.pd_cfg = self.pd.pd_config(self.cfg)          # ValueError names a bad option now
        mc = model_config_of(self.cfg)
        engine_shape(self.cfg, mc.n_layers)                # LayerSplit of the prefill ranks: checked here too
        self.model_cfg = mc
        self.model_name = model_name or f"kvproof-{mc.name}"
        self.tokenizer = ByteTokenizer()
        self.max_model_len = context_limit(self.cfg, mc)
        self.max_prompt_tokens = self.pd_cfg.tokens_per_slot
        self.cluster: ModelCluster | None = None
        self.error: BaseException | None = None
        self._mu = threading.Lock()
        self._rids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._by_rid: dict[int, tuple[str, Sink, int]] = {}  # rid -> (request_id, sink, prompt tokens)
        self._by_id: dict[str, int] = {}
        self._corrupt: set[str] = set()
        self._aborting: set[int] = set()                   # rids a ClientAbort was sent for
        self._counters: dict[str, dict[str, float]] = {"aborts_total{cause}": {},
                                                       "requests_finished_total{reason}": {}}
        self._totals = {"requests_total": 0, "prompt_tokens_total": 0}
        self._watch: threading.Thread | None = None
        self._stopping = threading.Event()
        self._cpus_before: set[int] | None = None          # this process's CPUs before cpu_layout moved it

    # ------------------------------------------------------------ lifecycle
    def start_sync(self) -> None:
        """Start decode and the prefill ranks (each loads the model); blocking."""
        if self.cluster is not None:
            return
        # a one-command launch owns its host's CPUs; per-role processes are placed by whoever starts them
        cpus = plan_layout(self.pd.cpu_layout) if self.pd.listen is None else None
        if cpus is not None:
            self._cpus_before = affinity()                 # given back at stop (tests run engines in-process)
            pin_process(cpus.others)                       # the router (HTTP loop, channel thread) too
        cl = ModelCluster(self.pd_cfg, self.cfg, self._on_event, self._on_result, self.pd.start_timeout_s,
                          on_events=self._on_events, listen=self.pd.listen, secret=self.secret, cpus=cpus)
        try:
            cl.start()
        except BaseException:
            if self._cpus_before:
                pin_process(self._cpus_before)
                self._cpus_before = None
            raise
        self.cluster = cl
        self._watch = threading.Thread(target=self._watchdog, name="pd-engine-watch", daemon=True)
        self._watch.start()

    async def start(self) -> None:
        """Start the PD processes."""
        await asyncio.get_running_loop().run_in_executor(None, self.start_sync)

    def stop_sync(self) -> None:
        """Abort everything pending, drain the slots, stop every process (blocking)."""
        self._stopping.set()
        cl, self.cluster = self.cluster, None
        with self._mu:
            pending = list(self._by_rid)
        for rid in pending:
            self._finish_abort(rid, "shutdown")
            if cl is not None:
                try:
                    cl.abort(rid)
                except ClusterError:
                    pass
        if cl is None:
            return
        try:
            if self.error is not None:                  # a role is gone: no orderly drain is possible
                raise ClusterError(str(self.error))
            cl.shutdown(timeout_s=self.pd_cfg.drain_timeout_s + 10.0)
        except ClusterError as e:
            print(f"pd engine: shutdown without draining: {e}", file=sys.stderr)
        finally:
            cl.close()
        if self._watch is not None:
            self._watch.join(2.0)
        if self._cpus_before:
            pin_process(self._cpus_before)
            self._cpus_before = None

    async def stop(self) -> None:
        """Stop serving; pending requests finish with reason 'abort'."""
        await asyncio.get_running_loop().run_in_executor(None, self.stop_sync)

    def _watchdog(self) -> None:
        while not self._stopping.wait(0.5):
            cl = self.cluster
            why = cl.alive() if cl is not None else None
            if why is not None and self.error is None:
                self.error = RuntimeError(why)
                with self._mu:
                    pending = list(self._by_rid)
                for rid in pending:
                    self._finish_abort(rid, f"engine failed: {why}")
                if cl is not None and why.startswith("decode"):
                    # nothing can be served without decode: stop the prefill ranks now, not at SIGTERM
                    cl.live = {}
                    for p in cl.prefill:
                        if p.poll() is None:
                            p.terminate()
            if cl is not None:
                cl.workers()                              # reap whoever exited

    # ------------------------------------------------------------ requests
    def submit(self, req: GenerationRequest, sink: Sink) -> None:
        """Route a request to the PD processes; ValueError if invalid, RuntimeError if not running."""
        if self.error is not None or self.cluster is None:
            raise RuntimeError(f"engine is not running ({self.error})" if self.error else "engine is not running")
        n = len(req.prompt_tokens)
        if n == 0 or n + req.params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {n} tokens + max_tokens {req.params.max_tokens} exceeds the "
                             f"model's context of {self.max_model_len} tokens")
        if n > self.max_prompt_tokens:
            raise ValueError(f"prompt of {n} tokens is longer than a KV slot ({self.max_prompt_tokens} "
                             f"tokens; --max-prompt-tokens)")
        vocab = self.model_cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_tokens):
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        params = asdict(req.params)
        params["stop_token_ids"] = list(req.params.stop_token_ids)
        with self._mu:
            if req.request_id in self._by_id:
                raise ValueError(f"request_id {req.request_id!r} is already running")
            rid = next(self._rids)
            self._by_id[req.request_id] = rid
            self._by_rid[rid] = (req.request_id, sink, n)
            self._totals["requests_total"] += 1
            self._totals["prompt_tokens_total"] += n
            corrupt = int(req.request_id in self._corrupt)
            self._corrupt.discard(req.request_id)
        self.cluster.submit_request(Submit(rid, n, list(req.prompt_tokens), params, corrupt))

    def abort(self, request_id: str, cause: str = "client") -> bool:
        """Abort a request through the protocol (ClientAbort -> spec abort); False when unknown."""
        with self._mu:
            rid = self._by_id.get(request_id)
            if rid is None:
                return False
            if rid in self._aborting:                       # e.g. server disconnect + stream close
                return True
            self._aborting.add(rid)
            if cause != STOP_STRING:                        # a stop string ends it as "stop", not an abort
                _bump(self._counters["aborts_total{cause}"], cause)
        cl = self.cluster
        if cl is not None:
            try:
                cl.abort(rid, cause)
            except ClusterError:
                return False
        return True

    async def refresh_stats(self, timeout_s: float = 1.0) -> bool:
        """Have decode send a snapshot now and wait for it (a /metrics scrape): False if it did not come in time.

        Decode answers after its current step, and its snapshot holds the prefill ranks' counters as of
        their last change (a rank reports each change at once), so every counter is current."""
        cl = self.cluster
        if cl is None:
            return False
        nonce = next(self._nonces)
        try:
            cl.request_stats(nonce)
        except ClusterError:
            return False
        end = time.monotonic() + timeout_s
        while cl.live_nonce < nonce:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.002)
        return True

    def inject_kv_corruption(self, request_id: str) -> None:
        """Fault injection: the prefill ranks flip bytes of this request's exported KV (call before generate)."""
        with self._mu:
            self._corrupt.add(request_id)

    # ------------------------------------------------------------ from decode (channel thread)
    def _on_event(self, msg: Event) -> None:
        d = dict(msg.event)
        d["tokens"] = tuple(d["tokens"])
        with self._mu:
            entry = self._by_rid.get(msg.rid)
            if entry is None:
                return
            request_id, sink, _ = entry
            if d["finished"]:
                self._forget(msg.rid, request_id, d["finish_reason"])
                if d["finish_reason"] == "anomaly":
                    _bump(self._counters["aborts_total{cause}"], "anomaly")
        d["request_id"] = request_id
        sink(TokenEvent(**d))

    def _on_events(self, batch: EventBatch) -> None:
        """A decode step's events (one binary frame): to each request's sink, under one lock acquisition."""
        out = []
        with self._mu:
            for w in batch:
                entry = self._by_rid.get(w.rid)
                if entry is None:
                    continue                                # ended here already (an abort raced the step)
                request_id, sink, _ = entry
                if w.finished:
                    self._forget(w.rid, request_id, w.finish_reason)
                    if w.finish_reason == "anomaly":
                        _bump(self._counters["aborts_total{cause}"], "anomaly")
                out.append((sink, TokenEvent(request_id, *w[1:])))
        for sink, ev in out:
            sink(ev)

    def _on_result(self, r: Result) -> None:
        if r.status in ("aborted", "failed"):
            self._finish_abort(r.rid, r.reason or r.status)

    def _finish_abort(self, rid: int, detail: str) -> None:
        with self._mu:
            entry = self._by_rid.get(rid)
            if entry is None:
                return
            request_id, sink, n = entry
            self._forget(rid, request_id, "abort")
        sink(TokenEvent(request_id, (), True, "abort", detail, n))

    def _forget(self, rid: int, request_id: str, reason: str) -> None:
        del self._by_rid[rid]
        self._by_id.pop(request_id, None)
        self._aborting.discard(rid)
        _bump(self._counters["requests_finished_total{reason}"], reason)

    # ------------------------------------------------------------ metrics
    def stats(self) -> dict:
        """Decode's live snapshot (model, slots by state, transfers, reclaim latency) plus the router's."""
        cl = self.cluster
        live = dict(cl.live) if cl is not None else {}
        live.pop("live", None)
        out: dict = {"slots{state}": {st.name: 0 for st in DState} | {DState.FREE.name: self.pd.slots},
                     "kv_transfers_total": 0, **histogram("reclaim_latency_seconds", [])}
        out.update(live)
        out.pop("nonce", None)
        with self._mu:
            out.update(self._totals)
            for k, v in self._counters.items():
                out[k] = dict(v)
            in_flight = len(self._by_rid)
        q = dict(out.get("queue_depth{queue}", {}))
        q["router"] = in_flight
        out["queue_depth{queue}"] = q
        out["pd_writers"] = self.pd.writers
        if cl is not None:
            # 1 while a role's process runs, 0 once it exited: a dead role shows here, not as frozen counters
            out["pd_worker_up{role}"] = {k: int(v is None) for k, v in cl.workers().items()}
            if cl._client is not None:
                out["pd_worker_up{role}"].setdefault("decode", int(not cl._client.is_dead))
        out["pd_engine_failed"] = int(self.error is not None)
        return out


def _bump(d: dict[str, float], key: str, by: float = 1) -> None:
    d[key] = d.get(key, 0) + by


def wait_idle(engine: PDEngine, timeout_s: float = 30.0) -> dict:
    """Poll until no request is in flight and every slot is FREE; returns the stats (TimeoutError otherwise)."""
    end = time.monotonic() + timeout_s
    quiet_since: float | None = None
    while True:
        st = engine.stats()
        cl = engine.cluster
        if st["queue_depth{queue}"].get("router", 0) != 0:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        fresh = cl is not None and quiet_since is not None and cl.live_at > quiet_since
        if fresh and st["slots{state}"].get(DState.FREE.name) == engine.pd.slots:
            return st
        if time.monotonic() > end:
            raise TimeoutError(f"PD engine not idle after {timeout_s} s: {st['slots{state}']}, "
                               f"{st['queue_depth{queue}']}")
        time.sleep(0.05)
