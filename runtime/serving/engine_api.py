"""The engine interface the HTTP server talks to: requests, sampling parameters, token events.

`runtime.serving.engine` re-exports every name here (`from kvproof.runtime.serving.engine import ...` keeps working).
"""
from __future__ import annotations

from dataclasses import dataclass
import asyncio
from typing import AsyncIterator, Callable, Protocol

from kvproof.runtime.model.tokenizer import ByteTokenizer


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: greedy when temperature is 0; `seed` makes sampling reproducible."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}; expected an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature!r}; expected 0 <= temperature <= 100")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}; expected 0 < top_p <= 1")


@dataclass(frozen=True)
class GenerationRequest:
    """A request to generate from prompt token ids."""

    request_id: str
    prompt_tokens: tuple[int, ...]
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of a request; the last event has finished=True and a finish_reason."""

    request_id: str
    tokens: tuple[int, ...]
    finished: bool = False
    finish_reason: str | None = None       # "stop", "length", "abort", "anomaly"
    detail: str = ""                       # why it was aborted
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accept_length: float = 0.0
    accept_rate: float = 0.0


class Engine(Protocol):
    """What the HTTP server needs from a serving backend (LocalEngine, the PD engine)."""

    model_name: str
    max_model_len: int
    tokenizer: ByteTokenizer

    async def start(self) -> None:
        """Start serving (load the model, spawn workers)."""

    async def stop(self) -> None:
        """Stop serving; pending requests finish with reason 'abort'."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit a request and stream its tokens."""

    def abort(self, request_id: str, cause: str = "client") -> bool:
        """Abort a request; False when it is unknown or already finished."""

    def stats(self) -> dict:
        """Counters and gauges for /metrics: name -> number, or 'name{label}' -> {label value: number}."""


class StreamingMixin:
    """`generate` on top of an engine's `submit(request, sink)` and `abort(request_id, cause)`."""

    def submit(self, request: GenerationRequest, sink: Callable[[TokenEvent], None]) -> None:
        """Queue a request whose token events go to `sink` (from any thread)."""
        raise NotImplementedError

    def abort(self, request_id: str, cause: str = "client") -> bool:
        """Abort a request; False when it is unknown or already finished."""
        raise NotImplementedError

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit a request (ValueError now if invalid) and stream its tokens."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.submit(request, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        return self._events(request.request_id, q)

    async def _events(self, rid: str, q: "asyncio.Queue[TokenEvent]") -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while not finished:
                ev = await q.get()
                finished = ev.finished
                yield ev
        finally:
            if not finished:                   # the consumer went away: free the request
                self.abort(rid, "disconnect")
