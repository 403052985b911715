"""Every OpenAI completions and chat-completions field: honoured (checked by behaviour) or refused with a
400 naming it. The case tables cover the request models' field sets exactly, so a field added to a
model without a check fails here. The sampling checks run on both engines (local and PD)."""
from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable, Callable

import aiohttp
import pytest

from serving_testing import serving
from kvproof.runtime.serving.engine import EngineConfig
from kvproof.runtime.serving.openai_protocol import ChatRequest, CompletionRequest
from kvproof.runtime.serving.server import start_server

MODEL = "kvproof-tiny"
P = "def fib(n):"
MSGS = [{"role": "user", "content": "hi there"}]


class Client:
    """POSTs to one server; remembers the greedy references."""

    def __init__(self, s: aiohttp.ClientSession, url: str) -> None:
        self.s, self.url = s, url

    async def cmpl(self, **body: Any) -> tuple[int, dict]:
        body = {"model": MODEL, "prompt": P, "max_tokens": 12, "temperature": 0, **body}
        async with self.s.post(f"{self.url}/v1/completions", json=body) as r:
            return r.status, await r.json()

    async def chat(self, **body: Any) -> tuple[int, dict]:
        body = {"model": MODEL, "messages": MSGS, "max_tokens": 12, "temperature": 0, **body}
        async with self.s.post(f"{self.url}/v1/chat/completions", json=body) as r:
            return r.status, await r.json()

    async def text(self, **body: Any) -> str:
        st, d = await self.cmpl(**body)
        assert st == 200, d
        return d["choices"][0]["text"]

    async def stream(self, chat: bool, **body: Any) -> list[dict]:
        base = {"model": MODEL, "max_tokens": 12, "temperature": 0, "stream": True,
                **({"messages": MSGS} if chat else {"prompt": P})}
        route = "chat/completions" if chat else "completions"
        out = []
        async with self.s.post(f"{self.url}/v1/{route}", json={**base, **body}) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if line.startswith(b"data: {"):
                    import json
                    out.append(json.loads(line[6:]))
        return out


async def refused(c: Client, field: str, value: Any, chat: bool) -> None:
    st, d = await (c.chat if chat else c.cmpl)(**{field: value})
    assert st == 400 and d["error"]["param"] == field, (field, value, st, d)
    assert field in d["error"]["message"] and d["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------ completions
async def c_model(c: Client) -> None:
    assert (await c.cmpl())[0] == 200
    st, d = await c.cmpl(model="gpt-4")
    assert st == 404 and d["error"]["param"] == "model"


async def c_prompt(c: Client) -> None:
    one, two = await c.text(prompt="abc"), await c.text(prompt="xyz")
    st, d = await c.cmpl(prompt=["abc", "xyz"])                    # batched prompts: one choice each, in order
    assert st == 200 and [ch["text"] for ch in d["choices"]] == [one, two]
    assert [ch["index"] for ch in d["choices"]] == [0, 1]
    ids = [256] + list(b"abc")                                     # token ids, and a batch of them
    assert await c.text(prompt=ids) == one
    st, d = await c.cmpl(prompt=[ids, [256] + list(b"xyz")])
    assert [ch["text"] for ch in d["choices"]] == [one, two]
    assert d["usage"]["prompt_tokens"] == 8


async def c_max_tokens(c: Client) -> None:
    st, d = await c.cmpl(max_tokens=5, ignore_eos=True)
    assert d["usage"]["completion_tokens"] == 5 and d["choices"][0]["finish_reason"] == "length"


async def c_temperature(c: Client) -> None:
    g = await c.text()
    assert await c.text(temperature=1.5, seed=1) != g


async def c_top_p(c: Client) -> None:
    assert await c.text(temperature=1.0, top_p=1e-9, seed=3) == await c.text()   # a nucleus of one token


async def c_n(c: Client) -> None:
    st, d = await c.cmpl(n=3, temperature=1.2, seed=5, ignore_eos=True)
    texts = [ch["text"] for ch in d["choices"]]
    assert [ch["index"] for ch in d["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert d["usage"]["completion_tokens"] == 3 * 12
    st, again = await c.cmpl(n=3, temperature=1.2, seed=5, ignore_eos=True)
    assert [ch["text"] for ch in again["choices"]] == texts                        # seeded choices reproduce


async def c_stream(c: Client) -> None:
    chunks = await c.stream(False)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == await c.text()


async def c_stream_options(c: Client) -> None:
    chunks = await c.stream(False, stream_options={"include_usage": True})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert all(ch["usage"] is None for ch in chunks[:-1])
    st, d = await c.cmpl(stream=True, stream_options={"continuous_usage_stats": True})
    assert st == 400 and d["error"]["param"] == "continuous_usage_stats"


async def c_stop(c: Client) -> None:
    g = await c.text(max_tokens=24)
    stop = g[6:8]
    st, d = await c.cmpl(max_tokens=24, stop=[stop])
    ch = d["choices"][0]
    cut = g.index(stop)
    assert ch["text"] == g[:cut] and ch["finish_reason"] == "stop"
    # the tokens up to the one that completed the stop string (byte tokens), not what the engine ran on to
    assert d["usage"]["completion_tokens"] == len((g[:cut] + stop).encode())
    assert d["kvproof"]["abort_reason"] is None


async def c_seed(c: Client) -> None:
    a, b, other = [await c.text(temperature=1.0, seed=s) for s in (11, 11, 12)]
    assert a == b != other


async def _penalty(c: Client, field: str, value: float, seen: str = "") -> None:
    """A penalty can change greedy output only where the greedy token was seen before: the outputs agree up
    to the first such position and differ there."""
    g = await c.text(max_tokens=40, ignore_eos=True)
    pen = await c.text(max_tokens=40, ignore_eos=True, **{field: value})
    k = next(i for i, ch in enumerate(g) if ch in seen + g[:i])
    assert pen[:k] == g[:k] and pen[k] != g[k], (field, k, g, pen)


async def c_presence_penalty(c: Client) -> None:
    await _penalty(c, "presence_penalty", 2.0)


async def c_frequency_penalty(c: Client) -> None:
    await _penalty(c, "frequency_penalty", 2.0)


async def c_repetition_penalty(c: Client) -> None:
    await _penalty(c, "repetition_penalty", 3.0, seen=P)          # the prompt's tokens count too


async def c_logit_bias(c: Client) -> None:
    assert await c.text(logit_bias={"65": 100}, max_tokens=6) == "AAAAAA"
    st, d = await c.cmpl(logit_bias={"99999": 1})
    assert st == 400 and d["error"]["param"] == "logit_bias"


async def c_user(c: Client) -> None:
    assert await c.text(user="alice") == await c.text()


async def c_top_k(c: Client) -> None:
    assert await c.text(temperature=1.0, top_k=1, seed=4) == await c.text()        # top_k=1 is greedy
    assert await c.text(temperature=1.0, top_k=-1, seed=4) == await c.text(temperature=1.0, seed=4)  # -1: off


async def c_min_p(c: Client) -> None:
    assert await c.text(temperature=1.0, min_p=1.0, seed=4) == await c.text()      # only the most likely token


EOS = {"257": 100}                                 # bias the model to end at once


async def c_ignore_eos(c: Client) -> None:
    st, d = await c.cmpl(logit_bias=EOS, max_tokens=6)
    assert d["choices"][0]["finish_reason"] == "stop" and d["usage"]["completion_tokens"] == 1
    st, d = await c.cmpl(logit_bias=EOS, max_tokens=6, ignore_eos=True)
    assert d["choices"][0]["finish_reason"] == "length" and d["usage"]["completion_tokens"] == 6


async def c_min_tokens(c: Client) -> None:
    st, d = await c.cmpl(logit_bias=EOS, max_tokens=10, min_tokens=4)
    assert d["choices"][0]["finish_reason"] == "stop" and d["usage"]["completion_tokens"] == 5


async def c_stop_token_ids(c: Client) -> None:
    st, d = await c.cmpl(logit_bias={"65": 100}, stop_token_ids=[65], max_tokens=6)
    assert d["choices"][0]["finish_reason"] == "stop" and d["usage"]["completion_tokens"] == 1


async def c_best_of(c: Client) -> None:
    st, four = await c.cmpl(n=4, temperature=1.5, seed=9, logprobs=0)
    sums = [sum(ch["logprobs"]["token_logprobs"]) for ch in four["choices"]]
    st, best = await c.cmpl(best_of=4, temperature=1.5, seed=9)
    assert len(best["choices"]) == 1
    assert best["choices"][0]["text"] == four["choices"][max(range(4), key=sums.__getitem__)]["text"]
    st, d = await c.cmpl(best_of=1, n=2)
    assert st == 400 and d["error"]["param"] == "best_of"


async def c_echo(c: Client) -> None:
    assert await c.text(echo=True) == P + await c.text()
    chunks = await c.stream(False, echo=True)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == P + await c.text()
    st, d = await c.cmpl(echo=True, logprobs=1)                    # prompt logprobs: refused by name
    assert st == 400 and d["error"]["param"] == "echo"


async def c_logprobs(c: Client) -> None:
    st, d = await c.cmpl(logprobs=3, max_tokens=10, ignore_eos=True)
    lp = d["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == d["usage"]["completion_tokens"] == 10
    assert "".join(lp["tokens"]) == d["choices"][0]["text"]
    for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and max(top, key=top.get) == tok and top[tok] == pytest.approx(val)  # greedy = top-1
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-9
    st, d = await c.cmpl(logprobs=2, temperature=1.0, seed=2, max_tokens=10, ignore_eos=True)
    lp = d["choices"][0]["logprobs"]                                # sampled: each token's logprob, <= top-1's
    assert all(v <= max(top.values()) + 1e-12 for v, top in zip(lp["token_logprobs"], lp["top_logprobs"]))
    chunks = await c.stream(False, logprobs=1)
    assert sum(len(ch["choices"][0]["logprobs"]["tokens"]) for ch in chunks if ch["choices"][0]["logprobs"]) == 12


async def c_suffix(c: Client) -> None:
    await refused(c, "suffix", "tail", False)


COMPLETION_CASES: dict[str, Callable[[Client], Awaitable[None]]] = {
    "model": c_model, "prompt": c_prompt, "max_tokens": c_max_tokens, "temperature": c_temperature,
    "top_p": c_top_p, "n": c_n, "stream": c_stream, "stream_options": c_stream_options, "stop": c_stop,
    "seed": c_seed, "presence_penalty": c_presence_penalty, "frequency_penalty": c_frequency_penalty,
    "logit_bias": c_logit_bias, "user": c_user, "top_k": c_top_k, "min_p": c_min_p,
    "repetition_penalty": c_repetition_penalty, "ignore_eos": c_ignore_eos, "min_tokens": c_min_tokens,
    "stop_token_ids": c_stop_token_ids, "best_of": c_best_of, "echo": c_echo, "logprobs": c_logprobs,
    "suffix": c_suffix, "return_token_ids": None,   # set below
}


async def c_return_token_ids(c: Client) -> None:
    st, d = await c.cmpl(return_token_ids=True, max_tokens=8, ignore_eos=True)
    ids = d["choices"][0]["token_ids"]
    assert len(ids) == 8 and bytes(ids).decode() == d["choices"][0]["text"]
    chunks = await c.stream(False, return_token_ids=True)
    assert [t for ch in chunks for t in ch["choices"][0]["token_ids"]] == list((await c.text()).encode())


COMPLETION_CASES["return_token_ids"] = c_return_token_ids


# ------------------------------------------------------------ chat
async def h_messages(c: Client) -> None:
    st, d = await c.chat()
    assert st == 200 and d["choices"][0]["message"]["role"] == "assistant"
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    st, d2 = await c.chat(messages=parts)                          # content parts join to the same text
    assert d2["choices"][0]["message"]["content"] == d["choices"][0]["message"]["content"]
    st, d = await c.chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert st == 400 and d["error"]["param"] == "messages"


async def h_max_completion_tokens(c: Client) -> None:
    st, d = await c.chat(max_tokens=None, max_completion_tokens=4, ignore_eos=True)
    assert d["usage"]["completion_tokens"] == 4


async def h_logprobs(c: Client) -> None:
    st, d = await c.chat(logprobs=True, top_logprobs=2, ignore_eos=True)
    content = d["choices"][0]["logprobs"]["content"]
    assert len(content) == d["usage"]["completion_tokens"] == 12
    assert "".join(x["token"] for x in content) == d["choices"][0]["message"]["content"]
    for x in content:
        assert len(x["top_logprobs"]) == 2 and x["top_logprobs"][0]["token"] == x["token"]
        assert x["top_logprobs"][0]["logprob"] == pytest.approx(x["logprob"]) and bytes(x["bytes"]).decode() == x["token"]
    st, d = await c.chat(logprobs=True)
    assert all(x["top_logprobs"] == [] for x in d["choices"][0]["logprobs"]["content"])


async def h_top_logprobs(c: Client) -> None:
    st, d = await c.chat(top_logprobs=2)                            # without logprobs: refused
    assert st == 400 and d["error"]["param"] == "top_logprobs"


async def h_response_format(c: Client) -> None:
    st, d = await c.chat(response_format={"type": "text"})
    assert st == 200
    st, d = await c.chat(response_format={"type": "json_object"})
    assert st == 400 and d["error"]["param"] == "response_format" and "json_object" in d["error"]["message"]


def _neutral(field: str, ok: Any, bad: Any) -> Callable[[Client], Awaitable[None]]:
    async def check(c: Client) -> None:
        if ok is not _NONE:
            st, d = await c.chat(**{field: ok})
            assert st == 200 and d["choices"][0]["message"]["content"] == (await c.chat())[1]["choices"][0][
                "message"]["content"], (field, ok)
        await refused(c, field, bad, True)
    return check


_NONE = object()
TOOL = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
CHAT_CASES: dict[str, Callable[[Client], Awaitable[None]]] = {
    "messages": h_messages, "max_completion_tokens": h_max_completion_tokens, "logprobs": h_logprobs,
    "top_logprobs": h_top_logprobs, "response_format": h_response_format,
    "tools": _neutral("tools", [], TOOL), "tool_choice": _neutral("tool_choice", "none", "required"),
    "parallel_tool_calls": _neutral("parallel_tool_calls", True, "yes"),
    "functions": _neutral("functions", [], [{"name": "f"}]), "function_call": _neutral("function_call", "none", {"name": "f"}),
    "audio": _neutral("audio", _NONE, {"voice": "alloy", "format": "wav"}),
    "modalities": _neutral("modalities", ["text"], ["text", "audio"]),
    "prediction": _neutral("prediction", _NONE, {"type": "content", "content": "x"}),
    "metadata": _neutral("metadata", _NONE, {"k": "v"}), "store": _neutral("store", False, True),
    "service_tier": _neutral("service_tier", "default", "flex"),
    "reasoning_effort": _neutral("reasoning_effort", _NONE, "high"),
    "web_search_options": _neutral("web_search_options", _NONE, {}),
}
SHARED = set(CompletionRequest.model_fields) & set(ChatRequest.model_fields)


async def h_shared(c: Client) -> None:
    """The fields both APIs share, on chat: greedy, seeded, penalties, top_k=1, stop, n, stream."""
    g = (await c.chat())[1]["choices"][0]["message"]["content"]
    for kw in ({"temperature": 1.0, "top_k": 1, "seed": 1}, {"temperature": 1.0, "min_p": 1.0, "seed": 1},
               {"user": "u"}, {"top_p": 1e-9, "temperature": 1.0}):
        assert (await c.chat(**kw))[1]["choices"][0]["message"]["content"] == g, kw
    st, d = await c.chat(n=2, temperature=1.0, seed=3)
    assert [ch["index"] for ch in d["choices"]] == [0, 1]
    chunks = await c.stream(True, stream_options={"include_usage": True})
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"]) == g
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_case_tables_cover_every_field() -> None:
    assert set(COMPLETION_CASES) == set(CompletionRequest.model_fields)
    assert set(CHAT_CASES) | SHARED == set(ChatRequest.model_fields)


async def _run_all(url: str, which: list[str] | None = None) -> None:
    async with aiohttp.ClientSession() as s:
        c = Client(s, url)
        for name, check in COMPLETION_CASES.items():
            if which is None or name in which:
                try:
                    await check(c)
                except AssertionError as e:
                    raise AssertionError(f"completions field {name!r}: {e}") from e
        if which is None:
            for name, check in CHAT_CASES.items():
                try:
                    await check(c)
                except AssertionError as e:
                    raise AssertionError(f"chat field {name!r}: {e}") from e
            await h_shared(c)


def test_every_field_local_engine() -> None:
    async def main() -> None:
        async with serving() as (engine, url):
            await _run_all(url)
    asyncio.run(main())


@pytest.mark.timeout(300)
def test_sampling_fields_pd_engine() -> None:
    """PD decode samples in its own process: the sampling fields behave the same there."""
    from kvproof.runtime.pd.engine import PDEngine, PDEngineConfig

    async def main() -> None:
        engine = PDEngine(EngineConfig(), PDEngineConfig(slots=4, writers=1))
        runner, url = await start_server(engine, "127.0.0.1", 0)
        try:
            await _run_all(url, ["n", "stop", "seed", "presence_penalty", "repetition_penalty", "logit_bias",
                                 "top_k", "min_tokens", "best_of", "logprobs", "prompt"])
        finally:
            await runner.cleanup()
            await engine.stop()
    asyncio.run(main())
