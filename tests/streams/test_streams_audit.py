"""`kvproof audit --streams`: text, JSON and SARIF output; exit codes; malformed files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvproof.spec.hicache_plan import hicache_plan
from kvproof.spec.stream_json import plan_dumps, trace_dumps
from kvproof.verify.stream_audit import audit_streams


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for variant in ("fixed", "unfixed"):
        p = tmp_path / f"{variant}.json"
        p.write_text(plan_dumps(hicache_plan(2, variant)))
        out[variant] = str(p)
        t = tmp_path / f"{variant}.jsonl"
        t.write_text("\n".join(trace_dumps(hicache_plan(2, variant))) + "\n")
        out[variant + "_trace"] = str(t)
    return out


def test_text(files: dict[str, str]) -> None:
    code, out = audit_streams(files["fixed"])
    assert code == 0 and "no races" in out
    code, out = audit_streams(files["unfixed_trace"])
    assert code == 1 and "2 race(s)" in out and "witness schedule" in out
    assert f"{files['unfixed_trace']}:8" in out          # line of indexer[0] in the trace (header is line 1)


def test_json(files: dict[str, str]) -> None:
    code, out = audit_streams(files["unfixed"], "json")
    doc = json.loads(out)
    assert code == 1 and not doc["ok"] and len(doc["races"]) == 2
    r = doc["races"][0]
    assert r["after"]["op"] == "indexer[0]" and r["before"]["op"] == "load_idx[0]" and r["line"] == 8
    assert r["schedule"] and "timeline" in r


def test_sarif(files: dict[str, str]) -> None:
    code, out = audit_streams(files["unfixed"], "sarif")
    doc = json.loads(out)
    assert code == 1 and doc["version"] == "2.1.0"
    run = doc["runs"][0]
    assert [r["id"] for r in run["tool"]["driver"]["rules"]] == [
        "no_read_before_ready", "no_write_after_read", "no_unordered_writes"]
    assert len(run["results"]) == 2
    res = run["results"][0]
    assert res["ruleId"] == "no_read_before_ready" and res["level"] == "error"
    assert res["locations"][0]["physicalLocation"]["region"]["startLine"] == 8
    assert json.loads(audit_streams(files["fixed"], "sarif")[1])["runs"][0]["results"] == []


def test_malformed_and_missing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"op": "a", "stream": "s"}\n{"wait": "e", "stream": ["s"]}\n')
    code, out = audit_streams(str(bad))
    assert code == 2 and f"{bad} line 2: field 'stream'" in out
    code, out = audit_streams(str(tmp_path / "nope.json"))
    assert code == 2 and "cannot read" in out
    code, out = audit_streams(str(bad), "xml")
    assert code == 2 and "'xml'" in out


def test_unresolved_wait_is_warned(tmp_path: Path) -> None:
    p = tmp_path / "early.jsonl"
    p.write_text('{"op": "w", "stream": "a", "writes": ["x"]}\n{"wait": "e", "stream": "b"}\n'
                 '{"record": "e", "stream": "a"}\n{"op": "r", "stream": "b", "reads": ["x"]}\n')
    code, out = audit_streams(str(p))
    assert code == 1 and f"{p}:2: waits on an event never recorded" in out


def test_recorded_times_say_whether_the_race_happened(tmp_path: Path) -> None:
    plan = hicache_plan(1, "unfixed")
    i_read, i_write = plan.op_index("indexer[0]"), plan.op_index("load_idx[0]")
    for times, seen, words in [({i_write: (0, 5), i_read: (1, 2)}, True, "shows it happening"),
                               ({i_write: (0, 1), i_read: (2, 3)}, False, "latent")]:
        p = tmp_path / f"t{seen}.jsonl"
        p.write_text("\n".join(trace_dumps(plan, times)) + "\n")
        code, out = audit_streams(str(p), "json")
        assert code == 1 and json.loads(out)["races"][0]["observed"] is seen
        assert words in audit_streams(str(p))[1]
