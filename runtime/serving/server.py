"""OpenAI-compatible HTTP server (aiohttp) in front of any `Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming or not), GET /v1/models,
GET /v1/models/{id}, POST /v1/abort/{request_id}, GET /health, GET /metrics (Prometheus).
Requests are pydantic models (`openai_protocol`): every OpenAI field is honoured or refused with a
400 naming it. Errors never escape: a middleware turns every one (aiohttp's 404/405/413 too,
internal errors) into OpenAI's `{"error": {"message", "type", "param", "code"}}` and counts it in
`http_errors_total`. Bodies are read with a size limit and parsed in a worker thread, so /health
keeps answering. A client that disconnects has its engine requests aborted (one log line).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web, web_protocol
from prometheus_client import CollectorRegistry, generate_latest

from kvproof.runtime.serving.engine_api import STOP_STRING, Engine, GenerationRequest, TokenEvent
from kvproof.runtime.serving.openai_protocol import RequestError, parse_body
from kvproof.runtime.serving.server_choices import (ChoiceState, Plan, chat_logprobs, completion_logprobs, plan,
                                            token_text)
from kvproof.runtime.serving.server_metrics import EngineCollector, RequestHistograms

log = logging.getLogger("kvproof.server")
# a body up to this size is parsed and tokenised on the loop (well under a millisecond); a larger one
# in a worker thread, so /health and the streams keep answering (two thread hops cost a request's TTFT)
INLINE_BODY_BYTES = 32 << 10
MAX_BODY_BYTES = 16 << 20             # a full context of token ids is < 100 kB; a batch of them fits easily
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
__all__ = ["RequestError", "Server", "start_server", "token_text"]


class Server:
    """The aiohttp application around one engine."""

    def __init__(self, engine: Engine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.engine, self.api_key = engine, api_key
        self.http: dict[str, dict[str, float]] = {"route": {}, "status": {}, "disconnects": {}}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine, self.http))
        self.hist = RequestHistograms(self.registry, engine.model_name)
        self.running: dict[str, list[str]] = {}          # response id -> its engine request ids
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors, self._auth])
        self.app.add_routes([web.get("/health", self.health), web.get("/v1/models", self.models),
                             web.get("/v1/models/{model_id:.+}", self.model),
                             web.get("/metrics", self.metrics),
                             web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat_completions),
                             web.post("/v1/abort/{request_id}", self.abort)])

    def _count(self, table: str, key: str) -> None:
        d = self.http[table]
        d[key] = d.get(key, 0) + 1

    # ------------------------------------------------------------ middleware
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as OpenAI-shaped JSON, counted by status."""
        try:
            resp = await handler(request)
        except RequestError as e:
            resp = web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            allow = e.headers.get("Allow")
            msg = f"{request.method} {request.path}: {e.reason}" + (f"; allowed: {allow}" if allow else "")
            if e.status == 413:
                msg += f" (the body limit is {request.app._client_max_size} bytes)"
            err = RequestError(e.status, msg, code=e.reason.lower().replace(" ", "_"))
            resp = web.json_response(err.body(), status=e.status, headers={"Allow": allow} if allow else None)
        except asyncio.CancelledError:
            raise
        except Exception as e:                               # a bug: log it, answer JSON
            log.exception("internal error on %s %s", request.method, request.path)
            resp = web.json_response(RequestError(500, f"internal error: {type(e).__name__}: {e}").body(),
                                     status=500)
        if resp.status >= 400:
            self._count("status", str(resp.status))
        return resp

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """With an API key, /v1/* needs `Authorization: Bearer <key>` (health and metrics stay open)."""
        if self.api_key is not None and request.path.startswith("/v1/"):
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
                raise RequestError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                   code="invalid_api_key")
        return await handler(request)

    # ------------------------------------------------------------ simple routes
    async def health(self, request: web.Request) -> web.Response:
        """Liveness: 200 while the engine runs."""
        err = getattr(self.engine, "error", None)
        if err is not None:
            return web.json_response({"status": "error", "error": repr(err)}, status=503)
        return web.json_response({"status": "ok", "model": self.engine.model_name})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.engine.model_name, "object": "model", "created": 0, "owned_by": "kvproof",
                "max_model_len": self.engine.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        """The one served model."""
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: the model card, or 404."""
        mid = request.match_info["model_id"]
        if mid != self.engine.model_name:
            raise RequestError(404, f"model {mid!r} does not exist; this server serves {self.engine.model_name!r}",
                               "model", "model_not_found")
        return web.json_response(self._model_card())

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text exposition (the engine's counters refreshed first where it can)."""
        refresh = getattr(self.engine, "refresh_stats", None)
        if refresh is not None:
            await refresh()
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def abort(self, request: web.Request) -> web.Response:
        """POST /v1/abort/{request_id}: abort a running request (the id of its response)."""
        rid = request.match_info["request_id"]
        subs = self.running.get(rid)
        if subs is None:
            raise RequestError(404, f"no running request {rid!r}", "request_id", "request_not_found")
        aborted = sum(self.engine.abort(s, "client") for s in subs)
        return web.json_response({"id": rid, "aborted": aborted > 0})

    # ------------------------------------------------------------ generation
    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0 = time.perf_counter()
        self._count("route", request.path)
        raw = await request.read()                     # 413 past the body limit (the middleware answers)
        loop = asyncio.get_running_loop()
        inline = len(raw) <= INLINE_BODY_BYTES
        req = parse_body(raw, chat) if inline else await loop.run_in_executor(None, parse_body, raw, chat)
        if req.model is not None and req.model != self.engine.model_name:
            raise RequestError(404, f"model {req.model!r} does not exist; this server serves "
                                    f"{self.engine.model_name!r}", "model", "model_not_found")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        p = plan(req, self.engine, rid) if inline else await loop.run_in_executor(None, plan, req, self.engine, rid)
        streams = self._submit(p)
        self.running[rid] = [s.engine_id for s in p.subs]
        states = [ChoiceState(s, self.engine.tokenizer, p.stop) for s in p.subs]
        try:
            if p.stream:
                return await self._stream(request, rid, p, states, streams, t0)
            return await self._complete(rid, p, states, streams, t0)
        except (asyncio.CancelledError, ConnectionError) as e:
            self._count("disconnects", "n")
            for st in states:
                if not st.finished:
                    self.engine.abort(st.sub.engine_id, "disconnect")
            log.info("client disconnected: %s (%s), its %d engine request(s) aborted", rid,
                     type(e).__name__, sum(not st.finished for st in states))
            if isinstance(e, asyncio.CancelledError):
                raise
            return web.Response(status=499)            # nobody reads it; ends the handler quietly
        finally:
            self.running.pop(rid, None)
            for ev in streams:
                aclose = getattr(ev, "aclose", None)   # async generators: run their cleanup now
                if aclose is not None:
                    await aclose()

    def _submit(self, p: Plan) -> list[AsyncIterator[TokenEvent]]:
        streams: list[AsyncIterator[TokenEvent]] = []
        try:
            for s in p.subs:
                streams.append(self.engine.generate(GenerationRequest(s.engine_id, s.prompt, s.params)))
        except (ValueError, RuntimeError) as e:
            for s in p.subs[: len(streams)]:
                self.engine.abort(s.engine_id, "client")
            if isinstance(e, ValueError):
                raise RequestError(400, str(e), "messages" if p.chat else "prompt") from None
            raise RequestError(503, str(e), code="engine_unavailable") from None
        return streams

    async def _events(self, states: list[ChoiceState], streams: list[AsyncIterator[TokenEvent]],
                      t0: float) -> AsyncIterator[tuple[int, str, list, list[int]]]:
        """(choice, new text, new logprob pairs, new token ids) as events arrive from every engine request."""
        tasks: list[asyncio.Task] = []
        if len(streams) == 1:                              # the common case: no merging task, no queue
            async def one() -> AsyncIterator[tuple[int, TokenEvent]]:
                async for ev in streams[0]:
                    yield 0, ev
            source = one()
        else:
            q: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()

            async def pump(i: int, it: AsyncIterator[TokenEvent]) -> None:
                async for ev in it:
                    await q.put((i, ev))
                    if ev.finished:
                        break

            async def merged() -> AsyncIterator[tuple[int, TokenEvent]]:
                while True:
                    yield await q.get()
            tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
            source = merged()
        last = [t0] * len(states)
        hist = self.hist
        try:
            left = len(states)
            async for i, ev in source:
                st = states[i]
                now = time.perf_counter()
                if ev.queue_s is not None:
                    hist.queue.observe(ev.queue_s)
                if ev.tokens:
                    if st.tokens == 0:
                        hist.ttft.observe(now - t0)
                    else:
                        gap = (now - last[i]) / len(ev.tokens)
                        for _ in ev.tokens:
                            hist.itl.observe(gap)
                    last[i] = now
                text, lps, ids = st.feed(ev)
                if st.wants_abort:
                    st.abort_sent = True
                    self.engine.abort(st.sub.engine_id, STOP_STRING)
                if ev.finished:
                    left -= 1
                    hist.e2e.observe(now - t0)
                yield i, text, lps, ids
                if not left:
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _choice_index(self, p: Plan, st: ChoiceState) -> int:
        return st.sub.prompt_index * p.n + st.sub.sample_index

    def _usage(self, p: Plan, states: list[ChoiceState]) -> dict[str, int]:
        prompt = sum(len(x) for x in p.prompts)
        done = sum(st.tokens for st in states)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _logprobs(self, p: Plan, pairs: list, offset: int) -> dict[str, Any] | None:
        if not p.want_logprobs:
            return None
        tok = self.engine.tokenizer
        return chat_logprobs(tok, pairs) if p.chat else completion_logprobs(tok, pairs, offset)

    async def _complete(self, rid: str, p: Plan, states: list[ChoiceState], streams: list, t0: float
                        ) -> web.Response:
        async for _ in self._events(states, streams, t0):
            pass
        keep = states
        if len(states) > p.n * len(p.prompts):                   # best_of: the n most likely per prompt
            keep = []
            for pi in range(len(p.prompts)):
                mine = sorted((s for s in states if s.sub.prompt_index == pi), key=lambda s: -s.cum_logprob)
                keep += sorted(mine[: p.n], key=lambda s: s.sub.sample_index)
        choices = []
        tok = self.engine.tokenizer
        for k, st in enumerate(keep):
            idx = k if len(keep) != len(states) else self._choice_index(p, st)
            echo = tok.decode(list(p.prompts[st.sub.prompt_index])) if p.echo else ""
            c: dict[str, Any] = {"index": idx, "finish_reason": st.finish_reason,
                                 "logprobs": self._logprobs(p, st.logprobs, len(echo)), "kvproof": st.extra()}
            if p.chat:
                c["message"] = {"role": "assistant", "content": st.text.text}
            else:
                c["text"] = echo + st.text.text
            if p.token_ids:
                c["token_ids"] = st.ids
            choices.append(c)
        choices.sort(key=lambda c: c["index"])
        return web.json_response({"id": rid, "object": "chat.completion" if p.chat else "text_completion",
                                  "created": int(time.time()), "model": self.engine.model_name,
                                  "choices": choices, "usage": self._usage(p, states),
                                  "kvproof": choices[0]["kvproof"]})

    async def _stream(self, request: web.Request, rid: str, p: Plan, states: list[ChoiceState], streams: list,
                      t0: float) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created, obj = int(time.time()), "chat.completion.chunk" if p.chat else "text_completion"
        tok = self.engine.tokenizer
        offsets = [0] * len(states)

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            msg = {"id": rid, "object": obj, "created": created, "model": self.engine.model_name,
                   "choices": choices, **extra}
            if p.include_usage and "usage" not in msg:
                msg["usage"] = None
            await resp.write(b"data: " + json.dumps(msg).encode() + b"\n\n")

        def choice(st: ChoiceState, text: str | None, lps: list, reason: str | None, first: bool = False,
                   ids: list[int] | None = None) -> dict[str, Any]:
            idx = self._choice_index(p, st)
            lp = self._logprobs(p, lps, offsets[idx]) if lps else None
            if p.chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                c = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                c = {"index": idx, "text": text or "", "logprobs": lp, "finish_reason": reason}
            if p.token_ids:
                c["token_ids"] = ids or []
            return c

        for st in states:
            if p.chat:
                await send([choice(st, None, [], None, first=True)])
            elif p.echo:
                echo = tok.decode(list(p.prompts[st.sub.prompt_index]))
                offsets[self._choice_index(p, st)] = len(echo)
                await send([choice(st, echo, [], None)])
        try:
            async for i, text, lps, ids in self._events(states, streams, t0):
                st = states[i]
                if text or lps or (ids and p.token_ids):
                    await send([choice(st, text, lps, None, ids=ids)])
                    offsets[self._choice_index(p, st)] += len(text)
                if st.finished:
                    await send([choice(st, None, [], st.finish_reason)], kvproof=st.extra())
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:                       # headers are sent: report it in the stream, then end
            log.exception("internal error while streaming %s", rid)
            self._count("status", "500")
            await resp.write(b"data: " + json.dumps(RequestError(500, f"internal error: {e}").body()).encode()
                             + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
            return resp
        if p.include_usage:                          # OpenAI: a chunk of its own, no choices
            await send([], usage=self._usage(p, states))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


class _JsonErrorHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering what never reaches the app (unparsable HTTP) in JSON too."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The error as OpenAI-shaped JSON (aiohttp's default is plain text)."""
        plain = super().handle_error(request, status, exc, message)     # logs it (debug for non-HTTP bytes)
        count = getattr(self._manager, "on_error", None)             # the _JsonErrorServer's
        if count is not None:
            count(status)
        why = f"malformed HTTP request: {exc}" if exc is not None and status < 500 else plain.reason
        resp = web.json_response(RequestError(status, why, code="bad_http" if status < 500 else None).body(),
                                 status=status)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


async def start_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, manage_engine: bool = True,
                       api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
                       ) -> tuple[web.AppRunner, str]:
    """Start the engine (when manage_engine) and the HTTP server; returns (runner, base url)."""
    if manage_engine:
        await engine.start()
    server = Server(engine, api_key, max_body_bytes)
    runner = web.AppRunner(server.app, handler_cancellation=True, access_log=None)
    await runner.setup()
    assert isinstance(runner.server, web.Server)
    runner.server.__class__ = _JsonErrorServer                  # bad HTTP bytes get JSON errors too
    runner.server.on_error = lambda status: server._count("status", str(status))  # type: ignore[attr-defined]
    site = web.TCPSite(runner, host, port)
    await site.start()
    sock = site._server.sockets[0]          # the bound port when port=0
    return runner, f"http://{host}:{sock.getsockname()[1]}"
