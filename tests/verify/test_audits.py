"""docs/audits/ run through the CLI as an auditor runs them, and a protocol module outside the package."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

AUDITS = Path(__file__).resolve().parents[2] / "docs" / "audits"

EXPECTED = {
    "sglang_abort_ack.py": {
        "sglang_abort_ack/fixed/no_write_after_release[ranks=1]": "proven",
        "sglang_abort_ack/fixed/no_write_after_release[ranks=2]": "proven",
        "sglang_abort_ack/fixed/no_deadlock[ranks=2]": "proven",
        "sglang_abort_ack/one_ack/no_write_after_release[ranks=1]": "proven",
        "sglang_abort_ack/one_ack/no_write_after_release[ranks=2]": "refuted",
        "sglang_abort_ack/timeout/no_write_after_release[ranks=1]": "refuted",
    },
    "vllm_nixl_lease.py": {
        "vllm_nixl_lease/lease/decode_reads_own_kv[readers=1]": "refuted",
        "vllm_nixl_lease/fenced/decode_reads_own_kv[readers=1]": "proven",
        "vllm_nixl_lease/fenced/decode_reads_own_kv[readers=2]": "proven",
        "vllm_nixl_lease/fenced/no_deadlock[readers=2]": "proven",
    },
    "vllm_async_load_abort.py": {
        "vllm_async_load_abort/unfixed/no_load_into_reused_blocks[]": "refuted",
        "vllm_async_load_abort/first_draft/no_load_into_reused_blocks[]": "proven",
        "vllm_async_load_abort/first_draft/held_blocks_freed[]": "refuted",
        "vllm_async_load_abort/fixed/no_load_into_reused_blocks[]": "proven",
        "vllm_async_load_abort/fixed/held_blocks_freed[]": "proven",
        "vllm_async_load_abort/fixed/no_deadlock[]": "proven",
    },
}


def kvproof(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "kvproof", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_audit_module_verdicts(module):
    r = kvproof("prove", str(AUDITS / module), "--json")
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    doc = json.loads(r.stdout)
    assert {v["id"]: v["status"] for v in doc["verdicts"]} == EXPECTED[module]
    assert all(v["counterexample"] for v in doc["verdicts"] if v["status"] == "refuted")
    assert {s["variant"] for s in doc["sanity"]} and all(s["empty"] is None for s in doc["sanity"])


def test_each_audit_has_its_page():
    for module in EXPECTED:
        page = (AUDITS / module.replace(".py", ".md")).read_text()
        assert "## Verdicts" in page and "## What it means" in page and f"kvproof prove docs/audits/{module}" in page


def test_the_lease_audit_names_the_read_that_cannot_fail():
    r = kvproof("prove", str(AUDITS / "vllm_nixl_lease.py"), "--variant", "lease")
    assert "DEAD" in r.stdout and "poll_err never fires" in r.stdout


MY_PROTOCOL = '''
    """A two-step handshake of my own: the writer must stop before the owner frees."""
    import enum
    from kvproof.spec import Bool, Channel, EnumT, Nat, Protocol, Var, action, invariant
    from kvproof.verify import check

    class St(enum.IntEnum):
        FREE = 0
        USED = 1

    class Handshake(Protocol):
        name = "handshake"
        variants = ("fixed", "unfixed")
        actors = ("owner", "writer")
        bounds = {"max_epoch": 2}
        vars = {"st": Var(EnumT(St), (), "owner"), "epoch": Var(Nat("max_epoch"), (), "owner"),
                "stopped": Var(Bool(), (), "owner"), "writing": Var(Bool(), (), "writer"),
                "w_epoch": Var(Nat(), (), "writer"), "bad": Var(Bool(), (), "ghost")}
        channels = {"go": Channel("owner", "writer", ()), "stop": Channel("writer", "owner", ())}

        @action("owner")
        def use(P, m):
            m.require(m.st[()] == St.FREE, "free")
            m.st[()] = St.USED
            m.epoch[()] = m.epoch[()] + 1
            m.stopped[()] = False
            m.send("go", (), m.epoch[()] + 1)

        @action("writer", receives="go", e="data:max_epoch")
        def on_go(P, m, e):
            m.require(e > m.w_epoch[()], "go_newer")
            m.w_epoch[()] = e
            m.writing[()] = True

        @action("writer")
        def stop(P, m):
            m.require(m.writing[()], "writing")
            m.writing[()] = False
            m.send("stop", (), m.w_epoch[()])

        @action("owner", receives="stop", e="data:max_epoch")
        def on_stop(P, m, e):
            m.require(e == m.epoch[()], "stop_current")
            m.stopped[()] = True

        @action("owner")
        def free(P, m):
            m.require(m.st[()] == St.USED, "used")
            if m.variant == "fixed":
                m.require(m.stopped[()], "writer_stopped")
            m.st[()] = St.FREE

        @action("net")
        def lands(P, m):
            m.env(m.writing[()], "write_in_flight")
            m.bad[()] = m.any([m.bad[()], m.st[()] == St.FREE])

        @invariant
        def no_write_into_free(P, m):
            return m.not_(m.bad[()])

    CHECKS = [check(Handshake, "no_write_into_free", "unfixed", expect="refuted"),
              check(Handshake, "no_write_into_free", "fixed", method="search")]
'''


def test_prove_runs_a_protocol_module_outside_the_package(tmp_path):
    """From a directory that is not the repository, on a file the package has never seen."""
    mod = tmp_path / "elsewhere" / "my_protocol.py"
    mod.parent.mkdir()
    mod.write_text(textwrap.dedent(MY_PROTOCOL))
    r = kvproof("prove", str(mod), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = {v["id"]: v["status"] for v in json.loads(r.stdout)["verdicts"]}
    assert got == {"handshake/unfixed/no_write_into_free[]": "refuted",
                   "handshake/fixed/no_write_into_free[]": "proven"}
    r = kvproof("guards", "--protocol", str(mod), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {g["guard"]: g["needed"] for g in json.loads(r.stdout)}["writer_stopped"] is True
    r = kvproof("explore", "--protocol", f"{mod}:handshake", "--variant", "unfixed", "--json", cwd=tmp_path)
    assert r.returncode == 1 and "no_write_into_free" in json.loads(r.stdout)["violations"]


def test_bad_modules_are_clear_errors(tmp_path):
    r = kvproof("prove", str(tmp_path / "missing.py"))
    assert r.returncode == 2 and "no such file" in r.stderr
    empty = tmp_path / "nothing.py"
    empty.write_text("x = 1\n")
    r = kvproof("prove", str(empty))
    assert r.returncode == 2 and "defines no Protocol subclass and no CHECKS" in r.stderr


def test_importing_a_check_module_registers_nothing():
    import importlib

    from kvproof.verify import registry
    before = [c.check_id for c in registry.all_checks()]
    importlib.import_module("kvproof.verify.checks_kv_slot")
    assert [c.check_id for c in registry.all_checks()] == before
    assert not hasattr(registry, "register") and not hasattr(registry, "_CHECKS")
