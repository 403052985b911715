"""`kvproof vllm-proxy`: disaggregated serving in front of a prefill and a decode vLLM instance.

Each completion request goes first to prefill with max_tokens=1 and
kv_transfer_params {"do_remote_decode": true}; prefill's response carries the
kv_transfer_params decode needs (prefill's request id and ports); the request
then goes to decode with those params, and decode's response (streamed or not)
is the client's. A client that disconnects closes the decode request, which
vLLM aborts: the connector then holds the blocks until every prefill rank
answered safe.
"""
from __future__ import annotations

import argparse
import itertools
from typing import Any

import aiohttp
from aiohttp import web


class Proxy:
    """Round-robin over prefill and decode instances (OpenAI /v1/completions)."""

    def __init__(self, prefill: list[str], decode: list[str]) -> None:
        if not prefill or not decode:
            raise ValueError(f"vllm-proxy: need at least one prefill and one decode URL, got {prefill}, {decode}")
        self.prefill, self.decode = itertools.cycle(prefill), itertools.cycle(decode)
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        """Open the upstream session."""
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def stop(self, app: web.Application) -> None:
        """Close the upstream session."""
        if self.session is not None:
            await self.session.close()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """Prefill (one token, remote decode), then decode with prefill's kv_transfer_params."""
        try:
            body: dict[str, Any] = await request.json()
        except ValueError:
            return web.json_response({"error": "request body is not JSON"}, status=400)
        if not isinstance(body, dict) or "prompt" not in body:
            return web.json_response({"error": "expected a JSON object with a 'prompt'"}, status=400)
        assert self.session is not None
        pre = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
        pre.pop("stream_options", None)
        async with self.session.post(next(self.prefill) + "/v1/completions", json=pre) as r:
            if r.status != 200:
                return web.Response(status=r.status, body=await r.read(), content_type="application/json")
            params = (await r.json()).get("kv_transfer_params")
        if not params:
            return web.json_response({"error": "prefill returned no kv_transfer_params; is it a kv_producer?"},
                                     status=502)
        dec = {**body, "kv_transfer_params": params}
        async with self.session.post(next(self.decode) + "/v1/completions", json=dec) as r:
            resp = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get(
                "Content-Type", "application/json")})
            await resp.prepare(request)
            async for chunk in r.content.iter_any():
                await resp.write(chunk)             # a client gone raises here: the decode request closes
            await resp.write_eof()
            return resp


def make_app(prefill: list[str], decode: list[str]) -> web.Application:
    """The proxy's aiohttp application."""
    proxy = Proxy(prefill, decode)
    app = web.Application()
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_post("/v1/completions", proxy.completions)
    return app


def add_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kvproof vllm-proxy`."""
    p.add_argument("--prefill", action="append", required=True, help="prefill vLLM base URL (repeatable)")
    p.add_argument("--decode", action="append", required=True, help="decode vLLM base URL (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)


def main(args: argparse.Namespace) -> int:
    """Run the proxy until interrupted."""
    # handler_cancellation: a client that disconnects cancels its handler at once, which closes
    # the decode request mid-transfer (vLLM aborts it) instead of after the first token
    web.run_app(make_app(args.prefill, args.decode), host=args.host, port=args.port, print=None,
                handler_cancellation=True)
    return 0
