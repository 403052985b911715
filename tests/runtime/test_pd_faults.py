"""Issue #13 under `kvproof stress`: nothing private on worker command lines, the mooncake transport
under the protocol (unfixed corrupts, fixed does not), and kills of decode and prefill: no hang, no
zombie, clear exit codes and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from kvproof.runtime.pd.cluster import PDCluster
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.tools.stress import run_stress

HOT = dict(requests=1000, abort_rate=0.3, delay_ms=5.0, concurrency=24, slots=16, writers=2)


def _mooncake() -> str | None:
    try:
        from kvproof.runtime.transport import check_available
        check_available("mooncake")
        return None
    except Exception as e:  # noqa: BLE001 - the reason is the skip message
        return str(e)


def survivors(mark: str) -> list[int]:
    """Pids of live processes whose environment carries `mark` (the run's workers inherit it)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if mark.encode() in open(f"/proc/{d}/environ", "rb").read():
                    found.append(int(d))
            except OSError:
                pass
    return found


@pytest.mark.timeout(60)
def test_worker_command_lines_and_environment_carry_nothing_private() -> None:
    with PDCluster(PDConfig(delay_ms=None, writers=1)) as c:
        secret = c.secret.hex()
        procs = [c.decode, *c.prefill]
        for p in procs:
            argv = open(f"/proc/{p.pid}/cmdline", "rb").read().split(b"\0")[:-1]
            assert argv[1:3] == [b"-m", b"kvproof.runtime.pd.process"] and argv[4:] == [b"--stdin"], argv
            assert secret.encode() not in open(f"/proc/{p.pid}/environ", "rb").read()
        c.submit(1, 8)
        r = c.next_result(timeout=10)
        assert r is not None and r.status == "served"
        st = c.shutdown()
    assert st["rejected_connections_total{reason}"] == {}


@pytest.mark.timeout(120)
@pytest.mark.skipif(_mooncake() is not None, reason=f"mooncake transport unavailable: {_mooncake()}")
def test_stress_on_mooncake_unfixed_corrupts_fixed_does_not() -> None:
    pre = run_stress(protocol="unfixed", seed=1, transport="mooncake", **HOT)
    fix = run_stress(protocol="fixed", seed=1, transport="mooncake", **HOT)
    assert pre["transport"] == fix["transport"] == "mooncake"
    assert pre["corrupted"] > 0 and pre["foreign_landings"] > 0, pre
    assert fix["corrupted"] == 0 and fix["foreign_landings"] == 0 and fix["all_slots_free"], fix
    assert fix["served"] + fix["aborted"] + fix["failed"] == HOT["requests"] and fix["bytes_transferred"] > 0


def _stress_cli(*args: str, timeout: float = 60) -> tuple[int, dict, float, int]:
    """Run `kvproof stress ... --json` as a subprocess: (exit code, JSON, seconds, surviving workers)."""
    t = time.monotonic()
    mark = f"KVPROOF_TEST_RUN={os.getpid()}-{time.monotonic_ns()}"
    p = subprocess.Popen([sys.executable, "-m", "kvproof", "stress", "--json", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, mark.split("=")[0]: mark.split("=")[1]})
    out, err = p.communicate(timeout=timeout)
    return p.returncode, json.loads(out), time.monotonic() - t, len(survivors(mark))


@pytest.mark.timeout(90)
def test_stress_decode_kill_ends_the_run_at_once_with_json_and_exit_3() -> None:
    rc, out, wall, left = _stress_cli("--requests", "100000", "--kill", "decode@1.5")
    assert rc == 3, out
    assert out["dead_role"] == "decode" and "decode process exited with code -9" in out["error"]
    assert out["results"] < 100000 and out["run_s"] < 5.0, out   # seconds after the kill, not the 600 s timeout
    assert left == 0


@pytest.mark.timeout(90)
def test_stress_prefill_kill_and_connection_drop_fail_requests_cleanly() -> None:
    rc, out, wall, left = _stress_cli("--requests", "3000", "--kill", "prefill-1@1.0", "--delay-ms", "1")
    assert rc == 0, out                                    # fixed: nothing corrupted, every slot free
    assert out["killed"].startswith("prefill-1 killed") and "1" in out["dead_ranks"]
    assert out["corrupted"] == 0 and out["all_slots_free"] and out["failed"] > 0
    r = run_stress(protocol="fixed", requests=600, abort_rate=0.1, delay_ms=1.0, seed=2, drop=(0, 300))
    assert "0" in r["dead_ranks"] and r["corrupted"] == 0 and r["all_slots_free"], r
    assert r["dropped"] == "prefill-0 data connection after 300 writes"


def test_bad_fault_options_are_named() -> None:
    from kvproof.runtime.tools.stress import parse_kill
    with pytest.raises(ValueError, match="ROLE@SECONDS"):
        parse_kill("router@1")
    with pytest.raises(ValueError, match="drop_rank=5"):
        PDConfig(writers=2, drop_rank=5, drop_after_writes=1)
    with pytest.raises(ValueError, match="transport='ib'"):
        PDConfig(transport="ib")


def test_verbs_transport_without_a_device_is_a_clear_error(capsys) -> None:
    """`--transport verbs` reaches the transport check before anything starts: exit 2, the reason in JSON."""
    import argparse

    from kvproof.runtime.tools.stress_cli import add_stress_args, stress_main
    from kvproof.runtime.transport import TransportUnavailable, check_available
    try:
        check_available("verbs")
    except TransportUnavailable as e:
        why = str(e)
    ap = argparse.ArgumentParser()
    add_stress_args(ap)
    assert stress_main(ap.parse_args(["--transport", "verbs", "--requests", "10", "--json"])) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["error"] == why and ("pyverbs" in why or "RDMA device" in why or "landing hook" in why)
