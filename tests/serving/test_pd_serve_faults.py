"""`kvproof serve` when a worker dies: SIGKILL of decode or of the prefill rank. The router reaps
every exited worker (no zombie; with decode dead it stops the ranks), /metrics names the dead role (pd_worker_up{role} 0) instead of freezing,
/health turns 503, and SIGTERM still exits 0 with no worker left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from serving_testing import metric


def _children(pid: int) -> list[int]:
    """Child processes of pid, whichever of its threads started them."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def _state(pid: int) -> str | None:
    """The process state letter (Z: zombie), None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _role_of(pid: int) -> str:
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    return argv[3].decode() if len(argv) > 3 else "?"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("victim", ["decode", "prefill"])
def test_serve_survives_a_dead_worker_reaps_all_and_sigterm_exits_0(victim: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "kvproof", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "engine pd" in line, line
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        workers = {_role_of(p): p for p in _children(proc.pid)}
        assert set(workers) == {"decode", "prefill"}, workers
        status, text = _get(f"{url}/metrics")
        assert metric(text, "kvproof_pd_worker_up", role="decode") == 1
        assert metric(text, "kvproof_pd_worker_up", role="prefill-0") == 1
        os.kill(workers[victim], signal.SIGKILL)
        dead = "decode" if victim == "decode" else "prefill-0"
        end = time.monotonic() + 20
        while True:
            status, text = _get(f"{url}/metrics")
            states = {r: _state(p) for r, p in workers.items()}
            # the victim is reaped; with decode gone the ranks are stopped and reaped too; nothing is a zombie
            want_gone = set(workers) if victim == "decode" else {victim}
            if (metric(text, "kvproof_pd_worker_up", role=dead) == 0 and metric(text, "kvproof_pd_engine_failed") == 1
                    and all(states[r] is None for r in want_gone) and "Z" not in states.values()):
                break
            assert time.monotonic() < end, (text[-1500:], {p: _state(p) for p in workers.values()})
            time.sleep(0.3)
        assert _get(f"{url}/health")[0] == 503
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
