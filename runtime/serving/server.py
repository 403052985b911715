"""OpenAI-compatible HTTP server (aiohttp) in front of any `Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming or not),
GET /v1/models, GET /health, GET /metrics (Prometheus). A client that disconnects
mid-generation has its request aborted through `engine.abort`. Bad requests get an
OpenAI-style error body `{"error": {"message", "type", "param", "code"}}` and a 4xx.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvproof.runtime.serving.engine import Engine, GenerationRequest, SamplingParams, TokenEvent


class RequestError(Exception):
    """A client error: HTTP status, message and the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> web.Response:
        """The OpenAI-style error response."""
        kind = {404: "not_found_error", 503: "service_unavailable"}.get(self.status, "invalid_request_error")
        return web.json_response({"error": {"message": self.message, "type": kind, "param": self.param,
                                             "code": self.code}}, status=self.status)


@dataclass(frozen=True)
class ParsedRequest:
    """A validated completion or chat request."""

    chat: bool
    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    stream: bool
    stop: tuple[str, ...]
    include_usage: bool


def _num(body: dict, key: str, default: Any, lo: float, hi: float, integer: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}' must be {kind} in [{lo}, {hi}], got {v!r}", key)
    return v


def parse_request(body: Any, chat: bool, engine: Engine) -> ParsedRequest:
    """Validate an OpenAI request body; RequestError names the bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != engine.model_name:
        raise RequestError(404, f"model {model!r} does not exist; this server serves {engine.model_name!r}",
                           "model", "model_not_found")
    tok = engine.tokenizer
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        try:
            prompt = tok.chat(msgs if all(isinstance(m, dict) for m in msgs) else [{}])
        except ValueError as e:
            raise RequestError(400, str(e), "messages") from None
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            prompt = tok.encode(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            prompt = list(p)
        else:
            raise RequestError(400, "'prompt' must be a string or a non-empty list of token ids "
                                    "(batched prompts are not supported)", "prompt")
    if body.get("n", 1) != 1:
        raise RequestError(400, f"'n' must be 1, got {body.get('n')!r}", "n")
    mt_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _num(body, mt_key, 16, 1, 1 << 20, integer=True)
    temperature = float(_num(body, "temperature", 1.0, 0.0, 2.0))          # OpenAI's default
    top_p = float(_num(body, "top_p", 1.0, 1e-9, 1.0))
    seed = _num(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop):
        stop = tuple(stop)
    else:
        raise RequestError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    limit = engine.max_model_len
    if len(prompt) + max_tokens > limit:
        raise RequestError(400, f"prompt of {len(prompt)} tokens + {mt_key} {max_tokens} exceeds the "
                                f"model's context of {limit} tokens", "messages" if chat else "prompt",
                           "context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            seed=None if seed is None else seed % (1 << 63),
                            ignore_eos=bool(body.get("ignore_eos", False)))
    return ParsedRequest(chat, tuple(prompt), params, stream, stop, bool(opts.get("include_usage")))


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


class EngineCollector:
    """Exports engine.stats() as Prometheus metrics: '*_total' as counters, 'name{label}' as labelled."""

    def __init__(self, engine: Engine, http: dict[str, dict[str, float]]) -> None:
        self.engine, self.http = engine, http

    def collect(self) -> Any:
        """Yield one metric family per stats key."""
        stats = dict(self.engine.stats())
        stats["http_requests_total{route}"] = self.http["route"]
        stats["http_errors_total{status}"] = self.http["status"]
        stats["client_disconnects_total"] = self.http["disconnects"].get("n", 0)
        for key, val in stats.items():
            name, _, label = key.partition("{")
            label = label.rstrip("}")
            counter = name.endswith("_total")
            base = "kvproof_" + (name[: -len("_total")] if counter else name)
            fam_cls = CounterMetricFamily if counter else GaugeMetricFamily
            doc = f"engine stat {key}"
            if isinstance(val, dict):
                fam = fam_cls(base, doc, labels=[label or "key"])
                for lv, v in val.items():
                    fam.add_metric([str(lv)], float(v))
            else:
                fam = fam_cls(base, doc, value=float(val))
            yield fam


def _usage(ev: TokenEvent) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _extra(ev: TokenEvent) -> dict[str, Any]:
    return {"accept_length": round(ev.accept_length, 4), "accept_rate": round(ev.accept_rate, 4),
            "abort_reason": ev.detail or None}


def _finish_reason(ev: TokenEvent, ts: TextStream) -> str:
    if ts.stopped or ev.finish_reason == "stop":
        return "stop"
    return "length" if ev.finish_reason == "length" else "abort"


class Server:
    """The aiohttp application around one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.http: dict[str, dict[str, float]] = {"route": {}, "status": {}, "disconnects": {}}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine, self.http))
        self.app = web.Application(client_max_size=64 << 20)
        self.app.add_routes([web.get("/health", self.health), web.get("/v1/models", self.models),
                             web.get("/metrics", self.metrics),
                             web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions)])

    def _count(self, table: str, key: str) -> None:
        d = self.http[table]
        d[key] = d.get(key, 0) + 1

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: 200 while the engine runs."""
        err = getattr(self.engine, "error", None)
        if err is not None:
            return web.json_response({"status": "error", "error": repr(err)}, status=503)
        return web.json_response({"status": "ok", "model": self.engine.model_name})

    async def models(self, request: web.Request) -> web.Response:
        """The one served model."""
        return web.json_response({"object": "list", "data": [{
            "id": self.engine.model_name, "object": "model", "created": 0, "owned_by": "kvproof",
            "max_model_len": self.engine.max_model_len}]})

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition."""
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._count("route", request.path)
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"malformed JSON body: {e}") from None
            req = parse_request(body, chat, self.engine)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            try:
                events = self.engine.generate(GenerationRequest(rid, req.prompt_tokens, req.params))
            except ValueError as e:
                raise RequestError(400, str(e), "prompt") from None
            except RuntimeError as e:                    # the engine died or is shutting down
                raise RequestError(503, str(e), code="engine_unavailable") from None
        except RequestError as e:
            self._count("status", str(e.status))
            return e.response()
        try:
            if req.stream:
                return await self._stream(request, rid, req, events)
            return await self._complete(request, rid, req, events)
        except (asyncio.CancelledError, ConnectionError):
            self._count("disconnects", "n")
            self.engine.abort(rid, "disconnect")
            raise
        finally:
            aclose = getattr(events, "aclose", None)     # async generators: run their cleanup now
            if aclose is not None:
                await aclose()

    async def _complete(self, request: web.Request, rid: str, req: ParsedRequest, events: Any) -> web.Response:
        ts, created = TextStream(req.stop), int(time.time())
        async for ev in events:
            ts.feed(self.engine.tokenizer.decode_bytes(list(ev.tokens)), final=ev.finished)
            if ts.stopped and not ev.finished:
                self.engine.abort(rid, "stop_string")
            if ev.finished:
                break
        text, reason = ts.text, _finish_reason(ev, ts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if req.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response({"id": rid, "object": "chat.completion" if req.chat else "text_completion",
                                  "created": created, "model": self.engine.model_name, "choices": [choice],
                                  "usage": _usage(ev), "kvproof": _extra(ev)})

    async def _stream(self, request: web.Request, rid: str, req: ParsedRequest, events: Any
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        ts, created = TextStream(req.stop), int(time.time())
        obj = "chat.completion.chunk" if req.chat else "text_completion"

        def chunk(text: str | None, reason: str | None, first: bool = False) -> bytes:
            if req.chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {} if text is None else {"content": text})
                c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                c = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            return b"data: " + json.dumps({"id": rid, "object": obj, "created": created,
                                           "model": self.engine.model_name, "choices": [c]}).encode() + b"\n\n"

        if req.chat:
            await resp.write(chunk(None, None, first=True))
        async for ev in events:
            text = ts.feed(self.engine.tokenizer.decode_bytes(list(ev.tokens)), final=ev.finished)
            if ts.stopped and not ev.finished:
                self.engine.abort(rid, "stop_string")
            if text:
                await resp.write(chunk(text, None))
            if ev.finished:
                break
        final = json.loads(chunk(None, _finish_reason(ev, ts))[6:])
        final["kvproof"] = _extra(ev)
        if req.include_usage:
            final["usage"] = _usage(ev)
        await resp.write(b"data: " + json.dumps(final).encode() + b"\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def start_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                       manage_engine: bool = True) -> tuple[web.AppRunner, str]:
    """Start the engine (when manage_engine) and the HTTP server; returns (runner, base url)."""
    if manage_engine:
        await engine.start()
    server = Server(engine)
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sock = site._server.sockets[0]          # the bound port when port=0
    return runner, f"http://{host}:{sock.getsockname()[1]}"
