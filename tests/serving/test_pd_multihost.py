"""PD across hosts: router, decode and prefill each in a network namespace of their own, started
per role (`kvproof serve --role ...`), linked by two veth pairs with addresses only inside the
namespaces: router <-> decode (10.231.A.0/30) and decode <-> prefill (10.231.B.0/30); the router and
the prefill rank cannot reach each other at all. The README's curl request and the 240-request
end-to-end load give the reference's outputs; SIGTERM stops every role with exit code 0."""
from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from kvproof.runtime.serving.engine import EngineConfig, SamplingParams, generate_reference
from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.runtime.transport.auth import Secret
from serving_testing import metric

TOK = ByteTokenizer()
CLONE_NEWNET = 0x40000000
COMMON = ["--slots", "8", "--max-prompt-tokens", "512", "--writers", "1"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netns_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "network namespaces need Linux and root"
    name = f"kvpt{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"cannot create a network namespace here: {getattr(e, 'stderr', e)}"
    return None


class Hosts:
    """Three namespaces r, d, p with veth links r-d and d-p; removed on close."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = {h: f"kvpt-{h}-{tag}" for h in "rdp"}
        a, b = 1 + os.getpid() % 250, 1 + (os.getpid() // 250) % 250
        self.addr = {"r": f"10.231.{a}.1", "d_r": f"10.231.{a}.2", "d_p": f"10.232.{b}.1", "p": f"10.232.{b}.2"}
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        self._link(f"kr{tag}", "r", self.addr["r"], f"kdr{tag}", "d", self.addr["d_r"])
        self._link(f"kdp{tag}", "d", self.addr["d_p"], f"kp{tag}", "p", self.addr["p"])

    def _link(self, n1: str, h1: str, a1: str, n2: str, h2: str, a2: str) -> None:
        _ip("link", "add", n1, "type", "veth", "peer", "name", n2)
        for n, h, a in ((n1, h1, a1), (n2, h2, a2)):
            _ip("link", "set", n, "netns", self.ns[h])
            _ip("-n", self.ns[h], "addr", "add", f"{a}/30", "dev", n)
            _ip("-n", self.ns[h], "link", "set", n, "up")

    def popen(self, host: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start argv inside host's namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def run_in(self, host: str, fn):
        """Run fn() on a thread that has joined host's namespace (its sockets live there)."""
        box: dict = {}

        def body() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{self.ns[host]}") as f:
                if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    box["err"] = OSError(ctypes.get_errno(), "setns")
                    return
            try:
                box["out"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                box["err"] = e

        t = threading.Thread(target=body)
        t.start()
        t.join()
        if "err" in box:
            raise box["err"]
        return box["out"]

    def close(self) -> None:
        """Delete the namespaces (their veth ends go with them)."""
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def hosts():
    why = _netns_reason()
    if why:
        pytest.skip(why)
    h = Hosts()
    try:
        yield h
    finally:
        h.close()


def _wait_up(proc: subprocess.Popen, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    lines = []
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "kvproof serve:" in line and " on http" in line:
            return line.split(" on ", 1)[1].split(" ", 1)[0]
    raise AssertionError(f"router did not come up: {''.join(lines)[-3000:]}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["tcp", "mooncake"])
def test_router_decode_prefill_in_three_namespaces(hosts: Hosts, tmp_path: Path, transport: str) -> None:
    if transport == "mooncake":
        from kvproof.runtime.transport import TransportUnavailable, check_available
        try:
            check_available("mooncake")
        except TransportUnavailable as e:
            pytest.skip(str(e))
    secret_file = tmp_path / "secret"
    Secret.generate().write_file(str(secret_file))
    env = {**os.environ, "KVPROOF_SECRET_FILE": str(secret_file)}
    py = [sys.executable, "-m", "kvproof", "serve", *COMMON, "--transport", transport]
    a = hosts.addr
    router = hosts.popen("r", [*py, "--role", "router", "--host", a["r"], "--port", "8000",
                               "--pd-listen", f"{a['r']}:7000"], env)
    decode = hosts.popen("d", [*py, "--role", "decode", "--router", f"{a['r']}:7000",
                               "--pd-listen", f"{a['d_p']}:7100"], env)
    prefill = hosts.popen("p", [*py, "--role", "prefill", "--rank", "0", "--decode", f"{a['d_p']}:7100"], env)
    procs = {"router": router, "decode": decode, "prefill": prefill}
    try:
        url = _wait_up(router)
        assert url == f"http://{a['r']}:8000"
        # the README's curl request (plus temperature 0, so it has one right answer), by curl in the router's host
        body = {"model": "kvproof-tiny", "prompt": "def fib(n):", "max_tokens": 16, "temperature": 0}
        out = subprocess.run(["ip", "netns", "exec", hosts.ns["r"], "curl", "-s", f"{url}/v1/completions",
                              "-H", "content-type: application/json", "-d", json.dumps(body)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        ref = generate_reference(EngineConfig(num_drafts=0), [TOK.encode("def fib(n):")],
                                 SamplingParams(max_tokens=16, ignore_eos=True))[0]
        assert json.loads(out)["choices"][0]["text"] == TOK.decode(ref), out
        # the router's host cannot reach the prefill rank: the roles talk only along their links
        def reach_prefill() -> str:
            try:
                socket.create_connection((a["p"], 7100), timeout=2).close()
                return "connected"
            except OSError as e:
                return type(e).__name__
        assert hosts.run_in("r", reach_prefill) != "connected"
        if transport == "tcp":
            _e2e_load(hosts, url)
    finally:
        router.send_signal(signal.SIGTERM)
        codes = {}
        for name in ("router", "decode", "prefill"):
            try:
                procs[name].wait(60)
            except subprocess.TimeoutExpired:
                procs[name].kill()
                procs[name].wait(5)
            codes[name] = procs[name].returncode
    logs = {k: p.stdout.read()[-2000:] for k, p in procs.items()}
    assert codes == {"router": 0, "decode": 0, "prefill": 0}, (codes, logs)


def _e2e_load(hosts: Hosts, url: str) -> None:
    """tests/serving/test_serving_e2e.py's 240-request load with aborts and disconnects, from the router's host."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_serving_e2e as e2e

    prompts, plan = e2e._prompts(), e2e._plan(len(e2e._prompts()), 1)
    ref_tokens = e2e._reference(prompts)
    results = hosts.run_in("r", lambda: asyncio.run(e2e._load(url, prompts, plan, 1)))
    done = e2e._check_outputs(results, plan, ref_tokens)
    assert done >= 150, done

    def metrics() -> str:
        deadline = time.monotonic() + 60
        while True:
            text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
            if (metric(text, "kvproof_kv_slots", state="FREE") == 8
                    and metric(text, "kvproof_queue_depth_requests", queue="router") == 0):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"slots not all free after the load: {text[:3000]}")
            time.sleep(0.5)

    text = hosts.run_in("r", metrics)
    assert metric(text, "kvproof_kv_foreign_landings_total") == 0
    assert metric(text, "kvproof_pd_worker_up", role="decode") == 1
