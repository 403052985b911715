"""EngineCore: one process's model, KV page pool, scheduler and sampler, stepped by its owner.

`EngineCore.step()` runs one scheduled batch (prefill chunks and/or a decode step with MTP drafts and
verification) and delivers each request's `TokenEvent`s to its sink; `add` queues a request (with
`prefilled` KV written by someone else: a PD prefill rank), `start` samples a request's first token
from its prompt's last hidden state outside the core's queues (PD decode, on a channel thread).
Its owners: `engine.LocalEngine` (a thread), `engine_proc` (a process of its own), the PD processes
(`pd.model_worker`). `EngineConfig` is the serving configuration they all take.
"""
from __future__ import annotations

import functools
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvproof.runtime.serving.engine_api import STOP_STRING, GenerationRequest, TokenEvent
from kvproof.runtime.model.cache import KVCache, PagePool
from kvproof.runtime.model.config import ModelConfig, preset
from kvproof.runtime.hicache.host_tier import host_tier
from kvproof.runtime.layersplit.split_cache import SplitKVCache, engine_shape
from kvproof.runtime.layersplit.engine_group import LayerSplitGroup
from kvproof.runtime.serving.model_runner import ModelRunner
from kvproof.runtime.serving.kv_audit import kv_error
from kvproof.runtime.serving.monitor import MonitorConfig, RequestMonitor
from kvproof.runtime.serving.scheduler import Scheduler, Sequence


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the single-process engine."""

    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    checkpoint: str | None = None          # a checkpoint directory; None: seeded weights
    backend: str = "torch"                 # attention: "torch" or "triton" (the project's kernels)
    num_pages: int = 2048
    max_batch: int = 256
    max_prefill_tokens: int = 512
    num_drafts: int = 2                    # MTP drafts per step; 0 disables speculative decoding
    monitor: MonitorConfig = MonitorConfig()
    device: str = "cpu"
    threads: int | None = 1                # torch intra-op threads (process-wide; None: leave as is).
                                           # 1 suits the tiny model: more threads only add overhead
    host_cache_pages: int = 0              # host tier (HiCache) pages under the device pool; 0: off
    host_cache_variant: str = "fixed"      # swap-in plan: fixed, or unfixed (the pre-fix race; allow_races)
    host_cache_schedule: str = "random"    # CPU stream emulator policy: eager, random, adversarial, sync
    host_cache_allow_races: bool = False   # run a plan the checker refutes (demonstrations only)
    layersplit: int = 1                    # LayerSplit ranks (processes) sharding the KV layers; 1: off
    layersplit_depth: int = 2              # receive buffers per rank (double buffering)
    layersplit_ownership: str = "contiguous"   # or round_robin
    layersplit_variant: str = "fixed"      # fixed; unfixed / no_owner_wait: racy plans (refused unless allowed)
    layersplit_allow_races: bool = False   # run a plan the checker refutes (demonstrations only)
    max_model_len: int | None = None       # cap on prompt + output tokens; None: what the model and pool allow
    mixed_steps: bool = False              # prefill chunks ride in the decode step (more tok/s, later first
                                           # token); False: a prefill step runs alone first (TTFT)


class EngineCore:
    """One step of the engine: schedule, run the model, deliver tokens, apply the monitor."""

    def __init__(self, cfg: EngineConfig) -> None:
        from kvproof.runtime.model.checkpoint import load_model
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = load_model(cfg.checkpoint, cfg.model, cfg.device, cfg.backend)
        mc = self.model.cfg
        split = engine_shape(cfg, mc.n_layers)                          # None unless layersplit > 1
        fp8 = cfg.backend == "triton"
        self.group: LayerSplitGroup | None = None
        if split is None:
            self.cache: KVCache | SplitKVCache = KVCache(mc, cfg.num_pages, torch.device(cfg.device), fp8_indexer=fp8)
        else:                                                           # rank 0 of the group; spawns the others
            self.cache = SplitKVCache(mc, cfg.num_pages, cfg.device, fp8, split, rank=0)
            self.group = LayerSplitGroup(cfg, self.model, split, self.cache)
        self.pool = PagePool(cfg.num_pages)
        self.host = host_tier(cfg, self.cache, self.pool)               # None unless host_cache_pages
        self.runner = ModelRunner(self.model, self.cache, cfg.num_drafts, self.host,
                                  forward=self.group.forward if self.group is not None else None)
        self.scheduler = Scheduler(self.pool, mc.page_size, cfg.max_batch, cfg.max_prefill_tokens,
                                   1 + cfg.num_drafts, self.host, mixed=cfg.mixed_steps)
        self.seqs: dict[str, Sequence] = {}
        self.sinks: dict[str, Callable[[TokenEvent], None]] = {}
        self.corrupt_after_prefill: set[str] = set()     # fault injection (tests)
        self.counters: dict[str, dict[str, float]] = {
            "requests_finished_total{reason}": {}, "aborts_total{cause}": {},
            "anomaly_aborts_total{rule}": {}, "steps_total{kind}": {"prefill": 0, "decode": 0}}
        self.totals = {"requests_total": 0, "prompt_tokens_total": 0, "generation_tokens_total": 0,
                       "spec_steps_total": 0, "spec_drafted_total": 0, "spec_accepted_total": 0}

    def close(self) -> None:
        """Release what outlives a step: the LayerSplit followers (idempotent; a no-op without LayerSplit)."""
        if self.group is not None:
            self.group.close()

    def export_tokens(self, pages: list[int], n_tokens: int) -> torch.Tensor:
        """A sequence's first n positions, every layer, as KV bytes uint8 [L, n, token_bytes] (the PD transfer).

        With LayerSplit rank 0 holds only its layers: the others come from their owners (`LayerSplitGroup.export_tokens`).
        """
        if self.group is not None:
            return self.group.export_tokens(pages, n_tokens)
        assert isinstance(self.cache, KVCache)
        return self.cache.export_tokens(pages, n_tokens)

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output one request may have."""
        # a decode step writes 1 + num_drafts positions past the last token
        return context_limit(self.cfg, self.model.cfg)

    def add(self, req: GenerationRequest, sink: Callable[[TokenEvent], None],
            prefilled: tuple[list[int], int] | None = None, started: Sequence | None = None,
            times: tuple[float, float] | None = None) -> None:
        """Queue a request; its events go to `sink` (called on the engine thread).

        `prefilled=(pages, n)`: someone else (a PD prefill worker) already wrote the KV of the
        first n prompt positions into these pages of this core's pool. n < prompt length: the core
        computes the rest; n = prompt length: `started` is the sequence `start` made (its first token
        already delivered), which decodes from the next step on.
        `times=(arrival, scheduled)`: when the request arrived and first got compute elsewhere (PD's queue).
        """
        seq = started if started is not None else self._sequence(req, times)
        if req.request_id in self.seqs:
            raise ValueError(f"request_id {req.request_id!r} is already running")
        n = len(req.prompt_tokens)
        if prefilled is not None:
            pages, cached = prefilled
            if not 0 <= cached <= n or (cached == n) != (started is not None) \
                    or cached > len(pages) * self.model.cfg.page_size:
                raise ValueError(f"prefilled: {cached} cached positions must be < the prompt's {n} (or all "
                                 f"{n}, started) and fit in {len(pages)} pages")
            seq.pages, seq.num_cached = list(pages), cached
            seq.page_tags = [self.pool.tag(p) for p in seq.pages]
        elif started is not None:
            raise ValueError("started: a started sequence needs its whole prompt prefilled")
        if self.cfg.num_drafts:
            seq.monitor = RequestMonitor(self.cfg.monitor, model=self.model.cfg.name,
                                         audit=functools.partial(self._kv_error, seq))
        self.seqs[req.request_id], self.sinks[req.request_id] = seq, sink
        self.scheduler.add(seq)
        self.totals["requests_total"] += 1
        self.totals["prompt_tokens_total"] += n
        if started is not None:                 # the prompt is computed and its first token delivered
            self.scheduler.promote(seq)
            self.totals["generation_tokens_total"] += len(seq.output)
            reason = self._stop_reason(seq, seq.output[-1])
            if reason:
                self._finish(seq, reason)

    def start(self, req: GenerationRequest, hidden: torch.Tensor,
              times: tuple[float, float] | None = None) -> tuple[Sequence, TokenEvent]:
        """A request whose whole prompt was computed elsewhere (a PD prefill rank): its first token, sampled
        from the prompt's last hidden state [D], and the event that delivers it. Touches none of the core's
        queues or counters, so it may run beside a step on another thread; `add(started=seq)` admits it."""
        seq = self._sequence(req, times)
        if tuple(hidden.shape) != (self.model.cfg.hidden,):
            raise ValueError(f"hidden of shape {tuple(hidden.shape)}, expected ({self.model.cfg.hidden},)")
        with torch.no_grad():                   # no_grad is per thread
            tok, lp = self.runner.first_token(seq, hidden)
        seq.hidden, seq.first_token_at = hidden, time.monotonic()
        seq.output.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        ev = TokenEvent(seq.request_id, (tok,), logprobs=self._logprobs(seq), queue_s=self._queue_s(seq))
        seq.sent = 1
        return seq, ev

    def _sequence(self, req: GenerationRequest, times: tuple[float, float] | None) -> Sequence:
        """A new request's sequence (its prompt and max_tokens checked against the context)."""
        n = len(req.prompt_tokens)
        if n == 0 or n + req.params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt of {n} tokens + max_tokens {req.params.max_tokens} must be in "
                             f"1..{self.max_model_len} tokens")
        seq = Sequence(req.request_id, list(req.prompt_tokens), req.params)
        if times is not None:
            seq.arrival, seq.scheduled_at = times
        return seq

    def _kv_error(self, seq: Sequence) -> float:
        """The anomaly monitor's evidence: how far the sequence's cached KV is from a recomputation."""
        n = seq.num_cached
        return kv_error(self.model, self.export_tokens(seq.pages, n), seq.tokens[:n])

    def abort(self, request_id: str, cause: str = "client") -> bool:
        """Abort a request now (engine thread only); False when unknown.

        Cause STOP_STRING (the server found a stop string in the text) ends it with reason "stop",
        not as an abort."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return False
        if cause == STOP_STRING:
            self._finish(seq, "stop")
            return True
        _bump(self.counters["aborts_total{cause}"], cause)
        self._finish(seq, "abort", detail=cause)
        return True

    def _finish(self, seq: Sequence, reason: str, detail: str = "") -> None:
        self.scheduler.finish(seq)
        del self.seqs[seq.request_id]
        sink = self.sinks.pop(seq.request_id)
        _bump(self.counters["requests_finished_total{reason}"], reason)
        mon = seq.monitor
        sink(TokenEvent(seq.request_id, tuple(seq.output[seq.sent:]), True, reason, detail,
                        len(seq.prompt), len(seq.output), mon.accept_length if mon else 0.0,
                        mon.accept_rate if mon else 0.0, self._logprobs(seq), self._queue_s(seq)))

    @staticmethod
    def _logprobs(seq: Sequence) -> tuple | None:
        return tuple(seq.logprobs[seq.sent:]) if seq.params.logprobs is not None else None

    @staticmethod
    def _queue_s(seq: Sequence) -> float | None:
        """On a request's first event only: seconds from arrival to its first scheduled step."""
        if seq.sent or seq.scheduled_at is None:
            return None
        return max(0.0, seq.scheduled_at - seq.arrival)

    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list | None = None) -> bool:
        """Append tokens (and their logprob entries) up to a stop condition; True when the sequence finished."""
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        reason = None
        for i, t in enumerate(tokens):
            seq.output.append(t)
            if logprobs is not None:
                seq.logprobs.append(logprobs[i])
            self.totals["generation_tokens_total"] += 1
            reason = self._stop_reason(seq, t)
            if reason:
                break
        if reason:
            self._finish(seq, reason)
            return True
        self.sinks[seq.request_id](TokenEvent(seq.request_id, tuple(seq.output[seq.sent:]),
                                              logprobs=self._logprobs(seq), queue_s=self._queue_s(seq)))
        seq.sent = len(seq.output)
        return False

    def _stop_reason(self, seq: Sequence, t: int) -> str | None:
        """Why the sequence ends with its latest token t: "stop", "length", or None while it goes on."""
        p = seq.params
        if (t == self.model.cfg.eos_id and not p.ignore_eos) or t in p.stop_token_ids:
            return "stop"
        if len(seq.output) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def step(self) -> bool:
        """Run one scheduled batch; False when there was nothing to do."""
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        self.scheduler.reads(batch)            # every page read is held at its sequence's content (spec)
        kinds = self.counters["steps_total{kind}"]
        if batch.prefill:
            kinds["prefill"] += 1
        if batch.decode:
            kinds["decode"] += 1
        if batch.decode:
            verified, hidden = self.runner.step(batch.decode, batch.prefill, batch.chunks)
        else:                                  # prefill alone (also the host tier's checked load path)
            verified, hidden = [], self.runner.prefill(batch.prefill, batch.chunks)
        for seq, v in zip(batch.decode, verified):
            if v.drafted:
                self.totals["spec_steps_total"] += 1
                self.totals["spec_drafted_total"] += v.drafted
                self.totals["spec_accepted_total"] += v.accepted
            if self._emit(seq, v.tokens, v.logprobs):
                continue
            why = seq.monitor.step(v.accepted, v.drafted) if seq.monitor and v.drafted else None
            if why is not None:
                _bump(self.counters["anomaly_aborts_total{rule}"], why)
                _bump(self.counters["aborts_total{cause}"], "anomaly")
                self._finish(seq, "anomaly", detail=why)
        for seq, h in zip(batch.prefill, hidden):
            self.scheduler.prefilled(seq)
            if seq.num_cached < seq.prefill_target:
                continue                                                    # more chunks to go
            seq.hidden = h
            self.scheduler.promote(seq)
            if seq.request_id in self.corrupt_after_prefill:
                self.cache.corrupt(seq.pages, seq.num_cached, seed=zlib.crc32(seq.request_id.encode()))
            if not seq.output:
                tok, lp = self.runner.first_token(seq, h)
                self._emit(seq, [tok], None if lp is None else [lp])
        return True

    def stats(self) -> dict:
        """Counters and gauges (see Engine.stats)."""
        c = self.scheduler.counts()
        t = self.totals
        steps = t["spec_steps_total"]
        out: dict = dict(t)
        out.update({k: dict(v) for k, v in self.counters.items()})
        out["queue_depth{queue}"] = {q: c[q] for q in ("waiting", "prefilling", "running")}
        out["kv_pages{state}"] = {"free": c["pages_free"], "used": c["pages_total"] - c["pages_free"]}
        out["preemptions_total"] = c["preemptions"]
        out["spec_accept_length"] = (t["spec_accepted_total"] + steps) / steps if steps else 0.0
        out["spec_accept_rate"] = t["spec_accepted_total"] / t["spec_drafted_total"] if steps else 0.0
        q = c["prefix_query_tokens"]
        out["cache_hit_rate"] = c["prefix_hit_tokens"] / q if q else 0.0
        out["prefix_cache_hit_tokens_total"] = c["prefix_hit_tokens"]
        return (out | (self.host.stats() if self.host is not None else {})
                | (self.group.stats() if self.group is not None else {}))


def context_limit(cfg: EngineConfig, mc: ModelConfig) -> int:
    """Longest prompt + output: the model's, the page pool's (a decode step writes 1 + num_drafts
    positions past the last token) and --max-model-len's, whichever is smallest."""
    limit = min(mc.max_seq_len, cfg.num_pages * mc.page_size - 1 - cfg.num_drafts)
    return limit if cfg.max_model_len is None else min(limit, cfg.max_model_len)


def _bump(d: dict[str, float], key: str, by: float = 1) -> None:
    d[key] = d.get(key, 0) + by
