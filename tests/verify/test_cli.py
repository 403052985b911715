"""The kvproof command line, run as users run it."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET


def kvproof(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvproof", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_prove_json_junit_sarif(tmp_path):
    r = kvproof("prove", "--json", "--protocol", "kv_slot", "--variant", "unfixed",
                "--junit", str(tmp_path / "j.xml"), "--sarif", str(tmp_path / "s.sarif"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["checks"] == 2
    v = doc["verdicts"][0]
    assert v["status"] == "refuted" and v["counterexample"] and v["mermaid"].startswith("sequenceDiagram")
    assert ET.parse(tmp_path / "j.xml").getroot().get("failures") == "0"
    assert json.loads((tmp_path / "s.sarif").read_text())["version"] == "2.1.0"


def test_prove_text_shows_the_counterexample():
    r = kvproof("prove", "--protocol", "kv_slot", "--variant", "unfixed")
    assert r.returncode == 0
    assert "REFUTED kv_slot/unfixed/no_cross_request_write" in r.stdout and "land(s=0, w=0" in r.stdout


def test_unknown_names_are_clear_errors():
    r = kvproof("prove", "--protocol", "nope")
    assert r.returncode == 2 and "unknown protocol 'nope'" in r.stderr and "kv_slot" in r.stderr
    r = kvproof("prove", "--protocol", "kv_slot", "--variant", "fixd")
    assert r.returncode == 2 and "unknown variant 'fixd'" in r.stderr


def test_audit_exit_codes(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "header"')
    r = kvproof("audit", str(bad))
    assert r.returncode == 2 and "bad.jsonl:1" in r.stderr


def test_explore_and_bench_verify():
    r = kvproof("explore", "--param", "slots=1", "--param", "writers=1", "--param", "max_epoch=1",
                "--param", "max_chunks=1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["states"] == 112
    r = kvproof("bench", "verify", "--quick", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [x["slots"] for x in rows] == [2, 3, 4] and all(x["proven"] for x in rows)
    assert all(x["states_per_second"] > 0 for x in rows)


def test_bench_layersplit_measured_mode_runs_on_a_gpu_and_says_what_it_needs_elsewhere():
    import torch
    r = kvproof("bench", "layersplit", "--json", timeout=300)
    if torch.cuda.is_available():
        assert r.returncode == 0, r.stderr
        assert 0.0 <= json.loads(r.stdout)["hidden_fraction"] <= 1.0
    else:
        assert r.returncode == 2 and "needs CUDA" in r.stderr and "--simulate" in r.stderr
        assert "Traceback" not in r.stderr
