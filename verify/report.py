"""Rendering verdicts: step tables, Mermaid sequence diagrams, JSON, JUnit XML and SARIF."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from typing import Any, Iterable

from kvproof.verify.verdict import Status, Step, Verdict

_ACTOR_OF_CHANNEL = {"alloc": "prefill", "abort": "prefill", "done": "decode", "safe": "decode"}


def step_table(steps: list[Step]) -> str:
    """A counterexample as a fixed-width text table."""
    rows = [("#", "actor", "action", "changes")]
    for s in steps:
        args = ", ".join(f"{k}={v}" for k, v in s.params.items())
        ch = ", ".join(f"{k}={v}" for k, v in s.changes.items())
        rows.append((str(s.index), s.actor, f"{s.action}({args})", ch + (f"  [{s.note}]" if s.note else "")))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:>{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip() for r in rows)


def _participant(actor: str, params: dict[str, Any]) -> str:
    if actor == "prefill" and "w" in params:
        return f"prefill{params['w']}"
    return actor


def mermaid(steps: list[Step]) -> str:
    """A counterexample as a Mermaid sequence diagram (decode, prefill ranks, network)."""
    actors = list(dict.fromkeys(s.actor for s in steps))
    base = ["decode", "net"] if set(actors) & {"decode", "prefill"} or not actors else actors
    lines = ["sequenceDiagram"] + [f"    participant {a}" for a in base]
    ranks = sorted({s.params["w"] for s in steps if "w" in s.params})
    for w in ranks:
        lines.insert(2, f"    participant prefill{w}")
    for s in steps:
        src = _participant(s.actor, s.params)
        args = ", ".join(f"{k}={v}" for k, v in s.params.items())
        sends = re.findall(r"(\w+)\((\d+), (\d+)\)@(\d+)", s.note)
        if sends:
            for ch, slot, w, e in sends:
                dst = "decode" if _ACTOR_OF_CHANNEL.get(ch) == "decode" else f"prefill{w}"
                lines.append(f"    {src}->>{dst}: {s.index}. {s.action}: {ch}(slot={slot}, epoch={e})")
        elif s.actor == "net" and "w" in s.params:
            lines.append(f"    net->>decode: {s.index}. {s.action}({args})")
        else:
            lines.append(f"    Note over {src}: {s.index}. {s.action}({args})")
    return "\n".join(lines)


def verdict_text(v: Verdict, verbose: bool = False) -> str:
    """A verdict for people: one status line, and the counterexample when there is one."""
    mark = {Status.PROVEN: "PROVEN ", Status.REFUTED: "REFUTED", Status.UNKNOWN: "UNKNOWN"}[v.status]
    exp = "" if v.ok else f"  <-- expected {v.expected.value}"
    out = [f"{mark} {v.check_id}  ({v.method}, {v.seconds:.2f}s){exp}"]
    if verbose or not v.ok or v.status == Status.REFUTED:
        if v.detail:
            out.append(f"        {v.detail}")
        if v.counterexample:
            out.append("\n".join("        " + ln for ln in step_table(v.counterexample).splitlines()))
        if v.witness and "timeline" in v.witness:
            out.append("\n".join("        " + ln for ln in str(v.witness["timeline"]).splitlines()))
    return "\n".join(out)


def to_json(verdicts: list[Verdict], seconds: float) -> dict[str, Any]:
    """The whole run as one JSON document."""
    bad = [v for v in verdicts if not v.ok]
    return {"tool": "kvproof", "ok": not bad, "checks": len(verdicts), "mismatches": len(bad),
            "seconds": round(seconds, 3), "verdicts": [
                {**v.to_json(), "mermaid": mermaid(v.counterexample) if v.counterexample and
                 v.protocol == "kv_slot" else None} for v in verdicts]}


def to_junit(verdicts: list[Verdict], seconds: float) -> str:
    """JUnit XML: one testcase per check; a mismatch with its expectation is a failure."""
    suite = ET.Element("testsuite", name="kvproof prove", tests=str(len(verdicts)),
                       failures=str(sum(not v.ok for v in verdicts)), time=f"{seconds:.3f}")
    for v in verdicts:
        case = ET.SubElement(suite, "testcase", classname=f"{v.protocol}.{v.variant}",
                             name=f"{v.property}[{','.join(f'{k}={x}' for k, x in sorted(v.params.items()))}]",
                             time=f"{v.seconds:.3f}")
        body = f"{v.status.value} via {v.method}. {v.detail}"
        if v.counterexample:
            body += "\n" + step_table(v.counterexample)
        if not v.ok:
            f = ET.SubElement(case, "failure", message=f"expected {v.expected.value}, got {v.status.value}")
            f.text = body
        else:
            ET.SubElement(case, "system-out").text = body
    return ET.tostring(suite, encoding="unicode")


_SARIF_LEVEL = {True: "note", False: "error"}


def to_sarif(verdicts: list[Verdict], spec_files: dict[str, str] | None = None) -> dict[str, Any]:
    """SARIF 2.1.0: one rule per property, one result per check (errors for mismatches)."""
    spec_files = spec_files or {}
    rules: dict[str, dict[str, Any]] = {}
    results = []
    for v in verdicts:
        rid = f"{v.protocol}/{v.property}"
        rules.setdefault(rid, {"id": rid, "name": v.property,
                               "shortDescription": {"text": f"{v.protocol}: {v.property}"}})
        msg = f"{v.check_id}: {v.status.value} (expected {v.expected.value}) via {v.method}. {v.detail}"
        if v.counterexample:
            msg += " Counterexample: " + " -> ".join(
                f"{s.action}({', '.join(f'{k}={x}' for k, x in s.params.items())})" for s in v.counterexample)
        res: dict[str, Any] = {"ruleId": rid, "level": _SARIF_LEVEL[v.ok], "message": {"text": msg},
                               "properties": {"status": v.status.value, "expected": v.expected.value,
                                              "params": v.params, "variant": v.variant}}
        uri = spec_files.get(v.protocol)
        if uri:
            res["locations"] = [{"physicalLocation": {"artifactLocation": {"uri": uri}}}]
        results.append(res)
    return {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
            "runs": [{"tool": {"driver": {"name": "kvproof", "informationUri": "https://example.invalid/kvproof",
                                          "rules": list(rules.values())}}, "results": results}]}


def dump_json(doc: Any) -> str:
    """Stable JSON text."""
    return json.dumps(doc, indent=2, sort_keys=False, default=str)


def summary_line(verdicts: Iterable[Verdict]) -> str:
    """'N checks: a proven, b refuted, c unknown; all as expected' (or how many are not)."""
    vs = list(verdicts)
    n = {s: sum(v.status == s for v in vs) for s in Status}
    bad = sum(not v.ok for v in vs)
    tail = "all as expected" if not bad else f"{bad} NOT as expected"
    return (f"{len(vs)} checks: {n[Status.PROVEN]} proven, {n[Status.REFUTED]} refuted, "
            f"{n[Status.UNKNOWN]} unknown; {tail}")
