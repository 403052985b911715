"""`kvproof audit --streams PLAN_OR_TRACE`: race audit of a plan file or a recorded trace."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvproof.spec.stream_json import PlanFormatError, plan_loads_lines
from kvproof.spec.streams import PROPERTIES, Plan
from kvproof.verify.race import RaceReport, audit_plan, unresolved_waits

FORMATS = ("text", "json", "sarif")
EXIT_OK, EXIT_RACES, EXIT_BAD_INPUT = 0, 1, 2

_RULES = {
    "no_read_before_ready": "A read must be ordered after the write that produces what it reads.",
    "no_write_after_read": "A write must not overtake a pending read of the same region (buffer reuse).",
    "no_unordered_writes": "Two writes to the same region must be ordered.",
}


def audit_streams(path: str, fmt: str = "text") -> tuple[int, str]:
    """Audit a plan (JSON) or trace (JSON Lines): exit code 0 clean, 1 races, 2 bad input; and the output."""
    if fmt not in FORMATS:
        return EXIT_BAD_INPUT, f"error: --format {fmt!r} is not one of {', '.join(FORMATS)}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        return EXIT_BAD_INPUT, f"error: cannot read {path}: {e.strerror or e}"
    except UnicodeDecodeError as e:
        return EXIT_BAD_INPUT, (f"error: {path} is not a UTF-8 text file (byte {e.start}: {e.reason}); "
                                f"expected a stream plan (JSON) or trace (JSON Lines)")
    try:
        plan, lines = plan_loads_lines(text, source=path)
    except PlanFormatError as e:
        return EXIT_BAD_INPUT, f"error: {e}"
    reports = audit_plan(plan)
    code = EXIT_RACES if reports else EXIT_OK
    times = recorded_times(text, lines)
    if fmt == "json":
        return code, json.dumps(_json(path, plan, lines, reports, times), indent=2)
    if fmt == "sarif":
        return code, json.dumps(_sarif(path, plan, lines, reports), indent=2)
    return code, _text(path, plan, lines, reports, times)


def recorded_times(text: str, lines: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """(t_start, t_end) per instruction of a recorded trace, where the trace has them."""
    rows, out = text.splitlines(), {}
    for i, n in enumerate(lines):
        if n < 1:
            continue
        try:
            obj = json.loads(rows[n - 1])
        except ValueError:            # a one-document plan: its lines are not whole objects
            continue
        if isinstance(obj, dict) and isinstance(obj.get("t_start"), (int, float)) \
                and isinstance(obj.get("t_end"), (int, float)):
            out[i] = (float(obj["t_start"]), float(obj["t_end"]))
    return out


def observed(r: RaceReport, times: dict[int, tuple[float, float]]) -> bool | None:
    """Whether the recording shows the race happening (the later op started before the other ended)."""
    v = r.violation
    if v.before not in times or v.after not in times:
        return None
    return times[v.after][0] < times[v.before][1]


def _summary(plan: Plan) -> str:
    ops = sum(1 for i in plan.instrs if i.__class__.__name__ == "Op")
    return f"{plan.name}: {len(plan.instrs)} instructions, {ops} ops on {len(plan.streams)} streams"


def _text(path: str, plan: Plan, lines: tuple[int, ...], reports: list[RaceReport],
          times: dict[int, tuple[float, float]]) -> str:
    out = [_summary(plan)]
    for i in unresolved_waits(plan):
        out.append(f"warning: {path}:{lines[i]}: waits on an event never recorded before it (a no-op)")
    if not reports:
        out.append(f"no races: every dependency is ordered by happens-before ({', '.join(PROPERTIES)})")
        return "\n".join(out)
    out.append(f"{len(reports)} race(s):")
    for k, r in enumerate(reports, 1):
        v = r.violation
        seen = observed(r, times)
        out += ["", f"[{k}] {v.property} at {path}:{lines[v.after]}", f"    {v.message}"]
        if seen is not None:
            out.append("    the recording shows it happening" if seen else
                       "    not seen in this recording (latent: another schedule exhibits it)")
        out.append("    witness schedule (Z3):")
        out += ["      " + ln for ln in r.timeline().splitlines()]
    return "\n".join(out)


def _json(path: str, plan: Plan, lines: tuple[int, ...], reports: list[RaceReport],
          times: dict[int, tuple[float, float]]) -> dict[str, Any]:
    races = []
    for r in reports:
        j = r.to_json()
        j["line"] = lines[r.violation.after]
        j["before"]["line"] = lines[r.violation.before]
        j["observed"] = observed(r, times)
        races.append(j)
    return {"file": path, "plan": plan.name, "streams": list(plan.streams), "instructions": len(plan.instrs),
            "ok": not reports, "unresolved_waits": [lines[i] for i in unresolved_waits(plan)], "races": races}


def _sarif(path: str, plan: Plan, lines: tuple[int, ...], reports: list[RaceReport]) -> dict[str, Any]:
    results = []
    for r in reports:
        v = r.violation
        loc = {"physicalLocation": {"artifactLocation": {"uri": path},
                                    "region": {"startLine": max(1, lines[v.after])}}}
        rel = {"id": 1, "message": {"text": f"overtaken write/read: {plan.instrs[v.before].name}"},  # type: ignore[union-attr]
               "physicalLocation": {"artifactLocation": {"uri": path},
                                    "region": {"startLine": max(1, lines[v.before])}}}
        results.append({"ruleId": v.property, "ruleIndex": PROPERTIES.index(v.property), "level": "error",
                        "message": {"text": f"{v.message}. Witness:\n{r.timeline()}"},
                        "locations": [loc], "relatedLocations": [rel],
                        "properties": {"plan": plan.name, "region": v.region,
                                       "schedule": r.schedule.to_json(plan)}})
    rules = [{"id": p, "name": p, "shortDescription": {"text": _RULES[p]},
              "defaultConfiguration": {"level": "error"}} for p in PROPERTIES]
    return {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
            "runs": [{"tool": {"driver": {"name": "kvproof", "rules": rules}},
                      "artifacts": [{"location": {"uri": path}}], "results": results}]}
