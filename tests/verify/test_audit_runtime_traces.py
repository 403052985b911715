"""Traces recorded by the real PD runtime (separate processes) pass or fail `kvproof audit`."""
import json

import pytest

from kvproof.runtime.tools.stress import run_stress
from kvproof.verify.trace_audit import audit


@pytest.mark.timeout(120)
def test_fixed_stress_trace_passes_and_a_damaged_copy_fails_at_the_damaged_line(tmp_path):
    rep = run_stress("fixed", requests=150, abort_rate=0.2, seed=5, slots=4, writers=2,
                     trace_dir=str(tmp_path))
    assert rep["corrupted"] == 0
    res = audit([str(tmp_path)])
    assert res.ok, res.text()
    assert res.events > 500 and {"decode", "prefill", "net"} <= set(res.actors)

    # Damage: a prefill rank claims an allocation decode never made (a future epoch).
    files = sorted(tmp_path.glob("*.jsonl"))
    victim = next(f for f in files if '"p_on_alloc"' in f.read_text())
    lines = victim.read_text().splitlines()
    idx = [i for i, ln in enumerate(lines) if '"p_on_alloc"' in ln][3]
    rec = json.loads(lines[idx])
    rec["params"]["e"] += 1000
    lines[idx] = json.dumps(rec)
    victim.write_text("\n".join(lines) + "\n")
    bad = audit([str(tmp_path)])
    assert not bad.ok
    assert bad.at.file == str(victim) and bad.at.line == idx + 1
    assert "alloc_delivered" in bad.error


@pytest.mark.timeout(120)
def test_unfixed_stress_trace_fails_at_a_foreign_landing(tmp_path):
    rep = run_stress("unfixed", requests=400, abort_rate=0.3, seed=3, slots=4, writers=1,
                     trace_dir=str(tmp_path))
    res = audit([str(tmp_path)])
    if rep["corrupted"] or rep.get("foreign_landings"):
        assert not res.ok and res.at.action == "land"
    assert not res.ok, "a prefix run with aborts under delay lands a write in a freed slot"
