"""Trace validation: per-process traces of a run replayed against the spec."""
import json
import random

import pytest

from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.core import Layout
from kvproof.spec.instance import Instance
from kvproof.spec.machine import successors
from kvproof.verify.trace_audit import TraceFormatError, audit


def _simulate(tmp_path, variant, steps, seed, prefer=None):
    """A distributed run (no crashes): decode and prefill trace what they fire; decode traces landings."""
    params = {"slots": 2, "writers": 1, "max_epoch": 6, "max_chunks": 3}
    sizes = {"slots": 2, "writers": 1}
    d = Instance(KVSlot, variant, sizes, actor="decode", trace=str(tmp_path / "decode.jsonl"))
    p = Instance(KVSlot, variant, sizes, actor="prefill", trace=str(tmp_path / "prefill0.jsonl"))
    lay = Layout.build(KVSlot, params)
    state, rng = lay.initial(), random.Random(seed)
    for _ in range(steps):
        opts = [o for o in successors(lay, params, state, variant) if o[0] != "kill"]
        if not opts:
            break
        if prefer:
            pick = [o for o in opts if o[0] in prefer]
            opts = pick or opts
        action, args, state = rng.choice(opts)
        actor = KVSlot.actions[action].actor
        if actor == "decode":
            d.fire(action, **args)
        elif actor == "prefill":
            p.fire(action, **args)
        else:
            d.record(action, **args)
    d.close(), p.close()
    return [tmp_path / "decode.jsonl", tmp_path / "prefill0.jsonl"]


def test_a_valid_run_passes_with_a_summary(tmp_path):
    _simulate(tmp_path, "fixed", 300, seed=1)
    res = audit([str(tmp_path)])
    assert res.ok, res.text()
    assert res.events > 100 and set(res.actors) >= {"decode", "prefill", "net"}
    assert "VALID" in res.text()


def test_a_damaged_trace_fails_at_the_damaged_line(tmp_path):
    files = _simulate(tmp_path, "fixed", 300, seed=2)
    lines = files[1].read_text().splitlines()
    idx = next(i for i, ln in enumerate(lines) if '"p_on_alloc"' in ln and i > 5)
    rec = json.loads(lines[idx])
    rec["params"]["e"] += 7                       # an epoch the decode side never allocated
    lines[idx] = json.dumps(rec)
    files[1].write_text("\n".join(lines) + "\n")
    res = audit([str(f) for f in files])
    assert not res.ok
    assert res.at.file.endswith("prefill0.jsonl") and res.at.line == idx + 1
    assert "alloc_delivered" in res.error or "epochs_ordered" in res.error
    assert res.context and f"prefill0.jsonl:{idx + 1}" in res.text()


def test_prefix_run_with_a_stale_write_is_reported_at_the_landing(tmp_path):
    for seed in range(40):
        sub = tmp_path / f"run{seed}"
        sub.mkdir()
        _simulate(sub, "unfixed", 200, seed=seed, prefer={"alloc", "abort", "p_on_alloc", "p_post", "land"})
        res = audit([str(sub)])
        if not res.ok:
            break
    assert not res.ok and res.at.action == "land"
    assert "no_cross_request_write" in res.error or "no_write_into_free_slot" in res.error


@pytest.mark.parametrize("damage,expect", [
    (lambda t: t[: len(t) - 9], "truncated record"),
    (lambda t: t.replace('"kind": "fire"', '"kind": "fyre"', 1), "unknown record kind 'fyre'"),
    (lambda t: "\n".join(t.splitlines()[1:]) + "\n", "event before the header"),
    (lambda t: (lambda ls: "\n".join(ls[:1] + [ls[1].replace('"t_ns": ', '"t_ns": "x", "was": ', 1)]
                                     + ls[2:]) + "\n")(t.splitlines()), "decode.jsonl:2: field 't_ns'"),
])
def test_malformed_traces_name_file_and_line(tmp_path, damage, expect):
    files = _simulate(tmp_path, "fixed", 50, seed=3)
    files[0].write_text(damage(files[0].read_text()))
    with pytest.raises(TraceFormatError, match=expect) as e:
        audit([str(f) for f in files])
    assert "decode.jsonl" in str(e.value)


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(TraceFormatError, match="no such file"):
        audit([str(tmp_path / "nope.jsonl")])
    with pytest.raises(TraceFormatError, match="no \\*.jsonl"):
        audit([str(tmp_path)])
