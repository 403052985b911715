"""The engine interface the HTTP server talks to, and its single-process implementation.

`Engine` is what a serving backend offers: `generate(request)` streams `TokenEvent`s,
`abort(request_id)` terminates a request (client abort, disconnect), `stats()` feeds
/metrics. `LocalEngine` runs the whole model in this process with continuous
batching, chunked prefill, MTP speculative decoding and the anomaly monitor; it is
also the reference that end-to-end integrity tests compare against. `kvproof serve --engine
local` runs the same EngineCore in a process of its own (`engine_proc.ProcessEngine`). The PD engine
(prefill and decode processes) implements the same interface. The interface types live in
`engine_api`, the core and its config in `engine_core`; both are re-exported here.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

from kvproof.runtime.serving.engine_api import (STOP_STRING, Engine, GenerationRequest,  # noqa: F401 (re-exported)
                                                SamplingParams, StreamingMixin, TokenEvent)
from kvproof.runtime.serving.engine_core import EngineConfig, EngineCore, context_limit  # noqa: F401 (re-exported)
from kvproof.runtime.model.tokenizer import ByteTokenizer


class LocalEngine(StreamingMixin):
    """EngineCore on a background thread, with an asyncio front (the Engine interface)."""

    def __init__(self, cfg: EngineConfig | None = None, model_name: str | None = None) -> None:
        self.cfg = cfg or EngineConfig()
        self.model_name = model_name or f"kvproof-{self.cfg.model.name}"
        self.tokenizer = ByteTokenizer()
        self.core: EngineCore | None = None
        self._inbox: list[tuple] = []
        self._mu = threading.Lock()            # guards _inbox and _active only (never held during a step)
        self._active: set[str] = set()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stats: dict = {}
        self._snapshots = 0                    # snapshots taken (refresh_stats waits for the next one)
        self.error: BaseException | None = None

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output one request may have."""
        assert self.core is not None, "LocalEngine.start() was not called"
        return self.core.max_model_len

    def start_sync(self) -> None:
        """Build the model and start the engine thread (blocking)."""
        if self.core is None:
            self.core = EngineCore(self.cfg)
            self._stats = self.core.stats()
            self._thread = threading.Thread(target=self._loop, name="kvproof-engine", daemon=True)
            self._thread.start()

    async def start(self) -> None:
        """Build the model and start the engine thread."""
        await asyncio.get_running_loop().run_in_executor(None, self.start_sync)

    def stop_sync(self) -> None:
        """Abort everything pending and stop the engine thread (blocking)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    async def stop(self) -> None:
        """Abort everything pending and stop the engine thread."""
        await asyncio.get_running_loop().run_in_executor(None, self.stop_sync)

    def submit(self, req: GenerationRequest, sink: Callable[[TokenEvent], None]) -> None:
        """Queue a request whose events go to `sink` (engine thread); ValueError if invalid, RuntimeError if stopped."""
        if self.error is not None or self._thread is None or self._stop:
            raise RuntimeError(f"engine is not running ({self.error!r})" if self.error else "engine is not running")
        n, limit = len(req.prompt_tokens), self.max_model_len
        if n == 0 or n + req.params.max_tokens > limit:
            raise ValueError(f"prompt of {n} tokens + max_tokens {req.params.max_tokens} exceeds the "
                             f"model's context of {limit} tokens")
        vocab = self.core.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_tokens):
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        with self._mu:
            if req.request_id in self._active:
                raise ValueError(f"request_id {req.request_id!r} is already running")
            self._active.add(req.request_id)

            def done_sink(ev: TokenEvent) -> None:
                if ev.finished:
                    with self._mu:
                        self._active.discard(ev.request_id)
                sink(ev)
            self._inbox.append(("add", req, done_sink))
        self._wake.set()

    def abort(self, request_id: str, cause: str = "client") -> bool:
        """Abort a request; False when it is unknown or already finished."""
        with self._mu:
            if request_id not in self._active:
                return False
            self._inbox.append(("abort", request_id, cause))
        self._wake.set()
        return True

    def inject_kv_corruption(self, request_id: str) -> None:
        """Fault injection: flip bytes of this request's KV cache right after its prefill."""
        with self._mu:
            self._inbox.append(("corrupt", request_id, None))
        self._wake.set()

    def stats(self) -> dict:
        """The latest snapshot of the engine's counters and gauges."""
        return self._stats

    async def refresh_stats(self, timeout_s: float = 1.0) -> bool:
        """Wait for a snapshot taken after this call (a /metrics scrape: every counter current); False on timeout."""
        seen = self._snapshots
        self._wake.set()
        end = time.monotonic() + timeout_s
        while self._snapshots == seen and self._thread is not None:
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.002)
        return True

    def _drain_inbox(self, core: EngineCore) -> None:
        with self._mu:
            items, self._inbox = self._inbox, []
        for kind, a, b in items:
            if kind == "add":
                core.add(a, b)
            elif kind == "abort":
                core.abort(a, b)
            else:
                core.corrupt_after_prefill.add(a)

    def _loop(self) -> None:
        core = self.core
        assert core is not None
        try:
            while not self._stop:
                self._wake.clear()
                self._drain_inbox(core)
                busy = core.step()
                self._stats = core.stats()
                self._snapshots += 1
                if not busy:
                    self._wake.wait(0.05)
        except BaseException as e:             # surface model errors to every waiting request
            self.error = e
            raise
        finally:
            self._drain_inbox(core)
            for rid in list(core.seqs):
                core.abort(rid, "shutdown")
            self._stats = core.stats()
            core.close()


def generate_reference(cfg: EngineConfig, prompts: list[list[int]], params: SamplingParams
                       ) -> list[list[int]]:
    """Run each prompt alone, to completion, in a fresh single-threaded core: the reference outputs."""
    core = EngineCore(cfg)
    out = []
    try:
        for i, p in enumerate(prompts):
            events: list[TokenEvent] = []
            core.add(GenerationRequest(f"ref-{i}", tuple(p), params), events.append)
            while core.step():
                pass
            out.append([t for ev in events for t in ev.tokens])
    finally:
        core.close()
    return out
