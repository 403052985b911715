"""The engine interface the HTTP server talks to: requests, sampling parameters, token events.

`runtime.serving.engine` re-exports every name here (`from kvproof.runtime.serving.engine import ...` keeps working).
"""
from __future__ import annotations

from dataclasses import dataclass
import asyncio
import threading
import weakref
from typing import AsyncIterator, Callable, Protocol

from kvproof.runtime.model.tokenizer import ByteTokenizer


STOP_STRING = "stop_string"   # abort cause of a request the server stopped at a stop string: finishes as "stop"


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: greedy when temperature is 0; `seed` makes sampling reproducible.

    Logit processing (in this order, on the model's logits): `logit_bias`, `min_tokens` (EOS and
    `stop_token_ids` masked until that many tokens), repetition penalty (prompt and output tokens),
    frequency and presence penalties (output tokens); then greedy argmax, or temperature, `top_k`,
    `top_p`, `min_p` and one draw. `logprobs=k` returns, per output token, its log-probability and
    the k most likely alternatives (of the processed logits, before temperature).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_k: int | None = None                       # None: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None                    # None: no logprobs; k: the token's and k alternatives

    def __post_init__(self) -> None:
        # JSON round trips (the PD engine's Submit) turn tuples into lists: normalise
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}; expected an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature={self.temperature!r}; expected 0 <= temperature <= 100")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r}; expected 0 < top_p <= 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k!r}; expected None (off) or an integer >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p!r}; expected 0 <= min_p <= 1")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r}; expected > 0")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens!r}; expected 0 <= min_tokens <= max_tokens")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs!r}; expected None (off) or an integer >= 0")

    @property
    def processed(self) -> bool:
        """Whether any logit processing or logprobs is asked for (the per-row slow path)."""
        return bool(self.top_k is not None or self.min_p or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias or self.min_tokens
                    or self.logprobs is not None)


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
    # per token of `tokens` when SamplingParams.logprobs is set: (logprob, ((token, logprob), ...))
    logprobs: tuple | None = None
    queue_s: float | None = None           # on the first event: seconds from arrival to first scheduled


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


class LoopPost:
    """Hands token events from engine threads to one asyncio loop: one wake-up per burst, not per event.

    `call_soon_threadsafe` writes the loop's self-pipe on every call; a decode step that emits
    for 32 requests would cost 32 syscalls and 32 loop wake-ups. Events keep their order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, TokenEvent]] = []
        self._mu = threading.Lock()
        self._scheduled = False

    def post(self, q: "asyncio.Queue[TokenEvent]", ev: TokenEvent) -> None:
        """Queue `ev` for `q` (any thread); wakes the loop only if no drain is pending."""
        with self._mu:
            self._items.append((q, ev))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._mu:
            items, self._items, self._scheduled = self._items, [], False
        for q, ev in items:
            q.put_nowait(ev)


_POSTS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopPost]" = weakref.WeakKeyDictionary()


def loop_post(loop: asyncio.AbstractEventLoop) -> LoopPost:
    """The LoopPost of this loop (one per loop, made on first use from the loop's thread)."""
    post = _POSTS.get(loop)
    if post is None:
        post = _POSTS[loop] = LoopPost(loop)
    return post


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
        post = loop_post(loop).post
        self.submit(request, lambda ev: post(q, ev))
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
