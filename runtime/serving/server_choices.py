"""From a validated OpenAI request to engine requests, and from token events back to choices.

`plan(req, chat, engine, rid)` fans a request out: one engine request per (prompt, sample) —
batched prompts times `best_of` (or `n`) — each with its `SamplingParams` (seed + sample index,
so n seeded choices differ yet reproduce). `ChoiceState` turns one engine request's events into
text (incremental UTF-8, stop strings), logprobs in OpenAI's completions or chat shape, a finish
reason and its token count: a request ended by a stop string counts the tokens up to the one that
completed the stop string, not the ones generated before the engine saw the abort.
"""
from __future__ import annotations

import codecs
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvproof.runtime.serving.engine_api import SamplingParams, TokenEvent
from kvproof.runtime.serving.openai_protocol import ChatRequest, CompletionRequest, RequestError
from kvproof.runtime.model.tokenizer import ByteTokenizer

SPECIAL = {256: "<|bos|>", 257: "<|eos|>", 258: "<|user|>", 259: "<|assistant|>"}


def token_text(tok: ByteTokenizer, t: int) -> str:
    """A token as logprobs show it: its character, a \\xNN escape for a partial UTF-8 byte, or its marker."""
    if t in SPECIAL:
        return SPECIAL[t]
    return bytes([t]).decode("utf-8", errors="backslashreplace") if 0 <= t < 256 else f"<|{t}|>"


@dataclass(frozen=True)
class SubRequest:
    """One engine request of a client request: which prompt, which sample, its tokens and parameters."""

    engine_id: str
    prompt_index: int
    sample_index: int
    prompt: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class Plan:
    """A client request fanned out: its engine requests and how to answer."""

    subs: tuple[SubRequest, ...]
    chat: bool
    n: int
    stream: bool
    stop: tuple[str, ...]
    include_usage: bool
    echo: bool
    want_logprobs: bool
    prompts: tuple[tuple[int, ...], ...]
    token_ids: bool = False


class TextStream:
    """Incremental UTF-8 decoding with stop strings; holds back text that may start a stop string."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop, self.text, self.sent = stop, "", 0
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def feed(self, data: bytes, final: bool = False) -> str:
        """Add bytes; returns the text that may be sent now."""
        if self.stopped:
            return ""
        self.text += self._dec.decode(data, final=final)
        for s in self.stop:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                self.text, self.stopped, final = self.text[:i], True, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


def _prompts(req: CompletionRequest | ChatRequest, tok: ByteTokenizer) -> list[list[int]]:
    if isinstance(req, ChatRequest):
        msgs = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return [tok.chat(msgs)]
    p = req.prompt
    if isinstance(p, str):
        return [tok.encode(p)]
    if all(isinstance(x, str) for x in p):
        return [tok.encode(x) for x in p]                      # type: ignore[arg-type]
    if all(isinstance(x, int) for x in p):
        return [list(p)]                                        # type: ignore[arg-type]
    out = [list(x) for x in p]                                  # type: ignore[union-attr]
    if not all(out):
        raise RequestError(400, "'prompt': a batched token-id prompt is empty", "prompt")
    return out


def plan(req: CompletionRequest | ChatRequest, engine: Any, rid: str) -> Plan:
    """Fan a validated request out into engine requests; RequestError names a value the engine cannot take."""
    chat = isinstance(req, ChatRequest)
    tok = engine.tokenizer
    vocab = tok.vocab_size
    prompts = _prompts(req, tok)
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise RequestError(400, f"'prompt': token id {bad[0]} is outside the vocabulary 0..{vocab - 1}", "prompt")
    mt_key = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
    max_tokens = (req.max_completion_tokens if mt_key == "max_completion_tokens" else req.max_tokens) or 16
    for p in prompts:
        if len(p) + max_tokens > engine.max_model_len:
            raise RequestError(400, f"prompt of {len(p)} tokens + {mt_key} {max_tokens} exceeds the model's "
                                    f"context of {engine.max_model_len} tokens", "messages" if chat else "prompt",
                               "context_length_exceeded")
    bias = []
    for k, v in (req.logit_bias or {}).items():
        if not k.lstrip("-").isdigit() or not 0 <= int(k) < vocab or not -100 <= v <= 100:
            raise RequestError(400, f"'logit_bias': key {k!r} must be a token id in 0..{vocab - 1} and its "
                                    f"bias in [-100, 100], got {v!r}", "logit_bias")
        bias.append((int(k), float(v)))
    stop_ids = tuple(req.stop_token_ids or ())
    if any(not 0 <= t < vocab for t in stop_ids):
        raise RequestError(400, f"'stop_token_ids' must be token ids in 0..{vocab - 1}", "stop_token_ids")
    if chat:
        want = req.logprobs
        k_lp = (req.top_logprobs or 0) if want else None
        echo, samples = False, req.n
    else:
        want = req.logprobs is not None
        k_lp, echo = req.logprobs, req.echo
        samples = req.best_of or req.n
    if samples > req.n and k_lp is None:
        k_lp = 0                                   # best_of ranks samples by their cumulative logprob
    top_k = req.top_k if req.top_k not in (None, -1, 0) else None
    base = SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p, stop_token_ids=stop_ids,
                          ignore_eos=req.ignore_eos, top_k=top_k, min_p=req.min_p or 0.0,
                          presence_penalty=req.presence_penalty or 0.0,
                          frequency_penalty=req.frequency_penalty or 0.0,
                          repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                          logit_bias=tuple(bias), min_tokens=min(req.min_tokens, max_tokens), logprobs=k_lp)
    subs = []
    for pi, p in enumerate(prompts):
        for j in range(samples):
            seed = None if req.seed is None else (req.seed + j) % (1 << 63)
            params = dataclasses.replace(base, seed=seed)
            subs.append(SubRequest(f"{rid}-{pi}-{j}", pi, j, tuple(p), params))
    stops = () if req.stop is None else ((req.stop,) if isinstance(req.stop, str) else tuple(req.stop))
    opts = req.stream_options
    return Plan(tuple(subs), chat, req.n, req.stream, stops, bool(opts and opts.include_usage), echo, want,
                tuple(tuple(p) for p in prompts), req.return_token_ids)


@dataclass
class ChoiceState:
    """One engine request's progress as one OpenAI choice."""

    sub: SubRequest
    tok: ByteTokenizer
    stop: tuple[str, ...]
    text: TextStream = field(init=False)
    tokens: int = 0                    # completion tokens counted (up to a stop string's last token)
    logprobs: list = field(default_factory=list)     # (token, entry) of the counted tokens
    ids: list[int] = field(default_factory=list)     # the counted tokens
    cum_logprob: float = 0.0
    finished: bool = False
    finish_reason: str | None = None
    last: TokenEvent | None = None
    abort_sent: bool = False

    def __post_init__(self) -> None:
        self.text = TextStream(self.stop)

    def feed(self, ev: TokenEvent) -> tuple[str, list, list[int]]:
        """Consume an event: (new text, new (token, logprob entry) pairs, new token ids counted)."""
        out, new_lps, new_ids = [], [], []
        lps = ev.logprobs or ()
        for i, t in enumerate(ev.tokens):
            if self.text.stopped:
                break                          # generated after the stop string: not the client's
            self.tokens += 1
            new_ids.append(t)
            if i < len(lps):
                entry = lps[i]
                self.cum_logprob += entry[0]
                new_lps.append((t, entry))
            last_of_event = ev.finished and i == len(ev.tokens) - 1
            out.append(self.text.feed(self.tok.decode_bytes([t]), final=last_of_event))
        if ev.finished and not ev.tokens:
            out.append(self.text.feed(b"", final=True))
        self.logprobs.extend(new_lps)
        self.ids.extend(new_ids)
        if ev.finished:
            self.finished, self.last = True, ev
            self.finish_reason = _finish_reason(ev, self.text.stopped)
        return "".join(out), new_lps, new_ids

    @property
    def wants_abort(self) -> bool:
        """A stop string ended the text while the engine is still generating."""
        return self.text.stopped and not self.finished and not self.abort_sent

    def extra(self) -> dict[str, Any]:
        """kvproof's per-choice extension: accept statistics and why the engine aborted it (None if it did not)."""
        ev = self.last
        if ev is None:
            return {"accept_length": 0.0, "accept_rate": 0.0, "abort_reason": None}
        aborted = self.finish_reason == "abort"
        return {"accept_length": round(ev.accept_length, 4), "accept_rate": round(ev.accept_rate, 4),
                "abort_reason": (ev.detail or ev.finish_reason) if aborted else None}


def _finish_reason(ev: TokenEvent, stopped: bool) -> str:
    if stopped or ev.finish_reason == "stop":
        return "stop"
    return "length" if ev.finish_reason == "length" else "abort"


def completion_logprobs(tok: ByteTokenizer, pairs: list, offset: int) -> dict[str, Any]:
    """OpenAI's completions logprobs object for (token, entry) pairs whose text starts at char `offset`."""
    toks, lps, tops, offs = [], [], [], []
    for t, (lp, alts) in pairs:
        s = token_text(tok, t)
        toks.append(s)
        lps.append(lp)
        tops.append({token_text(tok, a): v for a, v in alts})
        offs.append(offset)
        offset += len(tok.decode([t]))
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def chat_logprobs(tok: ByteTokenizer, pairs: list) -> dict[str, Any]:
    """OpenAI's chat logprobs object (`content` list) for (token, entry) pairs."""
    def one(t: int, lp: float) -> dict[str, Any]:
        return {"token": token_text(tok, t), "logprob": lp, "bytes": list(tok.decode_bytes([t]))}
    return {"content": [{**one(t, lp), "top_logprobs": [one(a, v) for a, v in alts]} for t, (lp, alts) in pairs],
            "refusal": None}

