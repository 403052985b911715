"""Loadgen before and after, on both engines, in one run: the server of a base commit against this tree's.

    python scripts/loadgen_ab.py [--base REV] [--rounds 2] [--requests 200] [--concurrency 32]

The base commit's tree is exported to a temporary directory and made importable as `kvproof` through a
shim (its top-level folders linked under kvproof/, as pyproject's package-dir maps them); PYTHONPATH
puts it ahead of this checkout's editable install. For each round and engine (pd, local) it starts the
base server, then this tree's, each fresh on a free port, runs the same `kvproof loadgen --json` load
(this tree's client: it reads usage from either server), and stops it. Prints JSON: every run, and per
engine the median output tok/s of each side and their ratio, and the servers' CPU time per output token
(server process and its workers; on a shared box far steadier than tok/s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shim(rev: str, tmp: Path) -> Path:
    """Export `rev` and lay it out as an importable `kvproof` package; returns the PYTHONPATH entry."""
    src = tmp / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    tar = tmp / "base.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(src)
    shim = tmp / "shim"
    pkg = shim / "kvproof"
    shutil.copytree(src / "kvproof", pkg)
    for name in ("spec", "verify", "runtime", "kernels"):
        (pkg / name).symlink_to(src / name)
    return shim


def _serve(engine: str, pythonpath: str | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.Popen([sys.executable, "-m", "kvproof", "serve", "--engine", engine, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            cwd=pythonpath or str(ROOT))
    line = proc.stdout.readline() if proc.stdout else ""
    if " on " not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.split(" on ", 1)[1].split(" ", 1)[0]


def _cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by process `root` and its descendants (Linux /proc)."""
    stats = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                stats[int(d)] = (int(parts[1]), int(parts[11]) + int(parts[12]))
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == p and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return sum(stats[p][1] for p in tree if p in stats) / os.sysconf("SC_CLK_TCK")


def _loadgen(url: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, "-m", "kvproof", "loadgen", "--url", url, "--requests", str(args.requests),
                          "--concurrency", str(args.concurrency), "--json"], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=900)
    return json.loads(out.stdout)


def main() -> int:
    """Run the comparison; prints the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="fc5dfbf", help="the 'before' commit (default: before issue #17's work)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--engines", default="pd,local")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="kvproof-ab-") as d:
        shim = str(_shim(args.base, Path(d)))
        for rnd in range(args.rounds):
            for engine in args.engines.split(","):
                for side, pp in (("before", shim), ("after", None)):
                    proc, url = _serve(engine, pp)
                    try:
                        time.sleep(1.0)
                        cpu0 = _cpu_s(proc.pid)
                        rep = _loadgen(url, args)
                        cpu = _cpu_s(proc.pid) - cpu0
                    finally:
                        proc.send_signal(signal.SIGINT)
                        try:
                            proc.wait(60)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                    # CPU time per token: much less sensitive than tok/s to other jobs on a shared box
                    runs.append({"round": rnd, "engine": engine, "side": side, "server_cpu_s": round(cpu, 2),
                                 "server_cpu_ms_per_token": round(1000 * cpu / max(1, rep["output_tokens"]), 3),
                                 **{k: rep[k] for k in ("completed", "errors", "output_tokens", "output_tokens_per_s",
                                                        "requests_per_s", "ttft_ms", "itl_ms")}})
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {}
    for engine in args.engines.split(","):
        tps = {side: statistics.median(r["output_tokens_per_s"] for r in runs
                                       if r["engine"] == engine and r["side"] == side) for side in ("before", "after")}
        cpu = {side: statistics.median(r["server_cpu_ms_per_token"] for r in runs
                                       if r["engine"] == engine and r["side"] == side) for side in ("before", "after")}
        summary[engine] = {"before_tok_s": tps["before"], "after_tok_s": tps["after"],
                           "ratio": round(tps["after"] / tps["before"], 3),
                           "before_cpu_ms_per_token": cpu["before"], "after_cpu_ms_per_token": cpu["after"],
                           "cpu_ratio": round(cpu["after"] / cpu["before"], 3)}
    print(json.dumps({"base": args.base, "requests": args.requests, "concurrency": args.concurrency,
                      "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
