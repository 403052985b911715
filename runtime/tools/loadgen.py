"""`kvproof loadgen`: a configurable request mix against a running OpenAI-compatible server.

The mix models coding-agent traffic: most requests share one of a few long prefixes
(repository context) followed by a short task, the rest are short chat-style prompts;
a fraction of clients disconnect mid-stream. Reports throughput, TTFT and inter-token
latency percentiles, aborts and errors (rich progress display, or `--json`).

It is a plain OpenAI client, for kvproof, vLLM, SGLang or any compatible server: output tokens are
the server's `usage` (its final chunk with `choices: []`, from `stream_options.include_usage`),
inter-token latency is one sample per streamed chunk (per token with `--token-ids`, where the server
returns each chunk's token ids), and `--ignore-eos` / `--min-tokens` make every server produce the
same lengths.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


def add_loadgen_args(parser: argparse.ArgumentParser) -> None:
    """Add the `loadgen` options to a parser."""
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default=None, help="model name (default: the server's first model)")
    parser.add_argument("--requests", type=int, default=200, help="requests to send")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--agent-fraction", type=float, default=0.7,
                        help="fraction of requests with a long shared prefix (coding agent)")
    parser.add_argument("--num-prefixes", type=int, default=4, help="distinct shared prefixes")
    parser.add_argument("--prefix-chars", type=int, default=600, help="length of each shared prefix")
    parser.add_argument("--suffix-chars", type=int, default=40, help="length of the per-request part")
    parser.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens of a request")
    parser.add_argument("--min-max-tokens", type=int, default=16,
                        help="smallest max_tokens of a request (max_tokens is uniform in this..--max-tokens)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos: every request runs to its max_tokens (same lengths on any server)")
    parser.add_argument("--min-tokens", type=int, default=None,
                        help="send min_tokens (capped at each request's max_tokens): no end before that many")
    parser.add_argument("--token-ids", action="store_true",
                        help="send return_token_ids (vLLM, kvproof): inter-token latency per token, not per chunk")
    parser.add_argument("--abort-fraction", type=float, default=0.05,
                        help="fraction of clients that disconnect mid-stream")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (no progress display)")


@dataclass
class Result:
    """What one request measured."""

    ok: bool
    aborted: bool = False                  # the client disconnected on purpose
    server_abort: str | None = None        # anomaly abort reason reported by the server
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)     # seconds between streamed chunks (per token with ids)
    tokens: int = 0                        # completion tokens, from the server's usage
    usage_seen: bool = False


def _mix(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "data",
             "result", "config", "test", "assert", "None", "True", "list", "dict"]

    def text(n: int) -> str:
        out = ""
        while len(out) < n:
            out += rng.choice(words) + rng.choice([" ", " ", "(", ")\n", ": ", ", "])
        return out[:n]

    prefixes = [f"# repository context {k}\n" + text(args.prefix_chars) for k in range(args.num_prefixes)]
    reqs = []
    for i in range(args.requests):
        agent = rng.random() < args.agent_fraction
        prompt = (rng.choice(prefixes) + "\n# task: " if agent else "") + text(args.suffix_chars)
        reqs.append({"prompt": prompt, "max_tokens": rng.randint(args.min_max_tokens, args.max_tokens),
                     "abort_after": rng.randint(1, 4) if rng.random() < args.abort_fraction else None,
                     "seed": rng.randrange(1 << 31)})
    return reqs


def _body(model: str, r: dict, args: argparse.Namespace) -> dict[str, Any]:
    body = {"model": model, "prompt": r["prompt"], "max_tokens": r["max_tokens"], "stream": True,
            "temperature": args.temperature, "seed": r["seed"], "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.min_tokens is not None:
        body["min_tokens"] = min(args.min_tokens, r["max_tokens"])
    if args.token_ids:
        body["return_token_ids"] = True
    return body


async def _one(s: aiohttp.ClientSession, url: str, model: str, r: dict, args: argparse.Namespace) -> Result:
    """One streamed completion, read the OpenAI way: text chunks, a finish chunk, a usage chunk (`choices: []`)."""
    t0 = time.perf_counter()
    res = Result(ok=False)
    try:
        async with s.post(f"{url}/v1/completions", json=_body(model, r, args),
                          timeout=aiohttp.ClientTimeout(total=args.timeout)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            last, chunks = None, 0
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:                      # an error reported inside the stream
                    res.error = f"stream error: {str(msg['error'])[:200]}"
                    return res
                if msg.get("usage"):                    # the usage chunk (or usage on any chunk)
                    res.tokens, res.usage_seen = int(msg["usage"].get("completion_tokens") or 0), True
                for choice in msg.get("choices") or ():
                    ids = choice.get("token_ids")
                    n = len(ids) if isinstance(ids, list) else (1 if choice.get("text") else 0)
                    now = time.perf_counter()
                    if n:
                        chunks += 1
                        if last is None:
                            res.ttft = now - t0
                        else:                           # per chunk, or per token when ids say how many
                            res.itl.extend([(now - last) / n] * n if isinstance(ids, list) else [now - last])
                        last = now
                        if r["abort_after"] is not None and chunks >= r["abort_after"]:
                            res.aborted = True
                            return res          # leaving the context manager drops the connection
                    if choice.get("finish_reason") == "abort":
                        res.server_abort = (msg.get("kvproof") or {}).get("abort_reason") or "abort"
            res.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _pct(xs: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    if not xs:
        return {f"p{p}": None for p in ps} | {"mean": None}
    xs = sorted(xs)
    out = {f"p{p}": round(1000 * xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 3) for p in ps}
    return out | {"mean": round(1000 * sum(xs) / len(xs), 3)}


def report(results: list[Result], wall: float, args: argparse.Namespace) -> dict[str, Any]:
    """Aggregate per-request results into the report dict (latencies in ms)."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    anomalies: dict[str, int] = {}
    for r in ok:
        if r.server_abort:
            anomalies[r.server_abort] = anomalies.get(r.server_abort, 0) + 1
    return {"url": args.url, "requests": len(results), "completed": len(ok),
            "client_aborts": sum(r.aborted for r in results), "server_aborts": anomalies,
            "errors": sum(1 for r in results if r.error), "first_errors": [r.error for r in results if r.error][:5],
            "concurrency": args.concurrency, "wall_s": round(wall, 3),
            "output_tokens": tokens, "output_tokens_per_s": round(tokens / wall, 2) if wall else None,
            "usage_missing": sum(1 for r in ok if not r.usage_seen),
            "requests_per_s": round(len(ok) / wall, 3) if wall else None,
            "ttft_ms": _pct([r.ttft for r in results if r.ttft is not None]),
            "itl_ms": _pct([x for r in ok for x in r.itl]), "itl_samples": sum(len(r.itl) for r in ok)}


async def run_loadgen(args: argparse.Namespace, progress: Any = None) -> dict[str, Any]:
    """Send the mix with bounded concurrency; returns the report."""
    url = args.url.rstrip("/")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        model = args.model
        if model is None:
            async with s.get(f"{url}/v1/models") as r:
                model = (await r.json())["data"][0]["id"]
        sem = asyncio.Semaphore(args.concurrency)
        results: list[Result] = []

        async def guarded(r: dict) -> None:
            async with sem:
                results.append(await _one(s, url, model, r, args))
            if progress is not None:
                progress(results)

        t0 = time.perf_counter()
        await asyncio.gather(*(guarded(r) for r in _mix(args)))
        return report(results, time.perf_counter() - t0, args)


def loadgen_main(args: argparse.Namespace) -> int:
    """Run the load generator; prints the report; exit code 1 when a request failed."""
    for name in ("requests", "concurrency", "max_tokens", "min_max_tokens"):
        if getattr(args, name) < 1:
            print(f"kvproof loadgen: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.json:
        rep = asyncio.run(run_loadgen(args))
        print(json.dumps(rep, indent=2))
        return 1 if rep["errors"] else 0
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    console = Console()
    with Progress(TextColumn("loadgen"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console) as prog:
        task = prog.add_task("requests", total=args.requests, info="")
        t0 = time.perf_counter()

        def update(results: list[Result]) -> None:
            toks = sum(r.tokens for r in results)
            errs = sum(1 for r in results if r.error)
            prog.update(task, completed=len(results),
                        info=f"{toks / max(1e-9, time.perf_counter() - t0):.0f} tok/s, {errs} errors")
        rep = asyncio.run(run_loadgen(args, update))
    table = Table(title=f"kvproof loadgen: {rep['requests']} requests, concurrency {rep['concurrency']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("completed", "client_aborts", "server_aborts", "errors", "usage_missing", "wall_s", "output_tokens",
              "output_tokens_per_s", "requests_per_s", "ttft_ms", "itl_ms"):
        v = rep[k]
        table.add_row(k, ", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else str(v))
    console.print(table)
    for e in rep["first_errors"]:
        console.print(f"[red]error[/red] {e}")
    return 1 if rep["errors"] else 0
