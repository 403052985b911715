"""Trace records against docs/schema/trace.schema.json: real traces pass, malformed records are named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.instance import Instance
from kvproof.verify.trace_audit import audit
from kvproof.verify.trace_schema import check_file, errors, load_schema


def _run(tmp_path: Path) -> list[Path]:
    """A short real run: a decode and a prefill instance writing their traces, one slot allocated and done."""
    d = Instance(KVSlot, "fixed", {"slots": 2, "writers": 1}, actor="decode", trace=str(tmp_path / "decode.jsonl"))
    p = Instance(KVSlot, "fixed", {"slots": 2, "writers": 1}, actor="prefill", trace=str(tmp_path / "prefill.jsonl"))
    d.fire("alloc", s=0)
    p.fire("p_on_alloc", s=0, w=0, e=1)
    p.fire("p_post", s=0, w=0)
    d.record("land", s=0, w=0, e=1)
    p.fire("p_complete", s=0, w=0, e=1)
    p.fire("p_finish", s=0, w=0)
    d.fire("on_done", s=0, w=0, e=1)
    d.fire("start_decode", s=0)
    d.fire("finish", s=0)
    d.close()
    p.close()
    return [tmp_path / "decode.jsonl", tmp_path / "prefill.jsonl"]


def test_real_traces_match_schema_and_audit_valid(tmp_path: Path) -> None:
    files = _run(tmp_path)
    assert [check_file(f) for f in files] == [[], []]
    assert audit([str(tmp_path)]).ok


@pytest.mark.parametrize("rec, want", [
    ({"kind": "fire", "t_ns": 1, "actor": "decode", "action": "alloc"}, "missing required field 'params'"),
    ({"kind": "fire", "t_ns": "1", "actor": "decode", "action": "alloc", "params": {}}, "expected integer"),
    ({"kind": "fire", "t_ns": 1, "actor": "decode", "action": "alloc", "params": {"s": -1}}, "expected >= 0"),
    ({"kind": "fire", "t_ns": 1, "actor": "decode", "action": "alloc", "params": {}, "x": 1}, "unexpected field 'x'"),
    ({"kind": "header", "protocol": "kv_slot", "variant": "fixed"}, "missing required field 'params'"),
    ({"kind": "event"}, "matches 0 of ['header', 'fire']"),
])
def test_malformed_records_are_named(rec: dict, want: str) -> None:
    errs = errors(rec, load_schema())
    assert errs and want in " ".join(errs), errs


def test_checker_agrees_with_jsonschema(tmp_path: Path) -> None:
    """Where the jsonschema package is installed (vllm brings it), it gives the same verdicts."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed (it comes with kvproof[vllm])")
    schema = load_schema()
    recs = [json.loads(x) for f in _run(tmp_path) for x in f.read_text().splitlines()]
    recs += [{"kind": "fire", "t_ns": 1, "actor": "d", "action": "a", "params": {"s": True}},
             {"kind": "header", "protocol": "kv_slot", "variant": "fixed", "params": {"slots": 0}}]
    v = jsonschema.Draft202012Validator(schema)
    assert [not errors(r, schema) for r in recs] == [v.is_valid(r) for r in recs]
