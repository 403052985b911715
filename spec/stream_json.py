"""Plans and stream traces as JSON / JSON Lines: writing them, and reading them with clear errors."""
from __future__ import annotations

import json
import re
from typing import Any, Iterator

from kvproof.spec.streams import (HostSync, Instr, OP_KINDS, Op, Plan, Record, Wait)


class PlanFormatError(ValueError):
    """A plan or trace file that does not parse; the message names line and field."""


_TRACE_EXTRA = ("t", "t_start", "t_end", "seq", "note")


def instr_to_json(ins: Instr) -> dict[str, Any]:
    """Plain-JSON form of one instruction."""
    if isinstance(ins, Op):
        return {"op": ins.name, "stream": ins.stream, "kind": ins.kind,
                "reads": list(ins.reads), "writes": list(ins.writes)}
    if isinstance(ins, Record):
        return {"record": ins.event, "stream": ins.stream}
    if isinstance(ins, Wait):
        return {"wait": ins.event, "stream": ins.stream}
    return {"sync_stream": ins.stream} if ins.stream is not None else {"sync_event": ins.event}


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """Plain-JSON form of a plan."""
    return {"kvproof_plan": 1, "name": plan.name, "streams": list(plan.streams),
            "instrs": [instr_to_json(i) for i in plan.instrs]}


def plan_dumps(plan: Plan) -> str:
    """JSON text with one instruction per line (so errors can name lines)."""
    head = json.dumps({k: v for k, v in plan_to_json(plan).items() if k != "instrs"})[:-1]
    body = ",\n".join("  " + json.dumps(instr_to_json(i)) for i in plan.instrs)
    return f'{head}, "instrs": [\n{body}\n]}}\n'


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v:
        raise PlanFormatError(f"{where}: field {key!r}: expected a non-empty string, got {v!r}")
    return v


def _strs(obj: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    v = obj.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise PlanFormatError(f"{where}: field {key!r}: expected a list of region names, got {v!r}")
    return tuple(v)


def instr_from_json(obj: Any, where: str, trace: bool = False) -> Instr:
    """Parse one instruction; errors name ``where`` (e.g. 'line 7' or 'instrs[5]')."""
    if not isinstance(obj, dict):
        raise PlanFormatError(f"{where}: expected an object, got {type(obj).__name__}")
    tags = [k for k in ("op", "record", "wait", "sync_stream", "sync_event") if k in obj]
    if len(tags) != 1:
        raise PlanFormatError(f"{where}: expected exactly one of op/record/wait/sync_stream/sync_event, "
                              f"got keys {sorted(obj)}")
    allowed = {"op": {"op", "stream", "kind", "reads", "writes"}, "record": {"record", "stream"},
               "wait": {"wait", "stream"}, "sync_stream": {"sync_stream"}, "sync_event": {"sync_event"}}[tags[0]]
    extra = set(obj) - allowed - (set(_TRACE_EXTRA) if trace else set())
    if extra:
        raise PlanFormatError(f"{where}: unknown field(s) {sorted(extra)} for a {tags[0]!r} entry")
    tag = tags[0]
    if tag == "op":
        kind = obj.get("kind", "compute")
        if kind not in OP_KINDS:
            raise PlanFormatError(f"{where}: field 'kind': expected one of {list(OP_KINDS)}, got {kind!r}")
        return Op(_str(obj, "stream", where), _str(obj, "op", where), _strs(obj, "reads", where),
                  _strs(obj, "writes", where), kind)
    if tag in ("record", "wait"):
        cls = Record if tag == "record" else Wait
        return cls(_str(obj, "stream", where), _str(obj, tag, where))
    if tag == "sync_stream":
        return HostSync(stream=_str(obj, tag, where))
    return HostSync(event=_str(obj, tag, where))


def _item_lines(text: str, key: str) -> list[int]:
    """1-based line of each element of the top-level array ``key`` (best effort, [] if unsure)."""
    m = re.search(r'"%s"\s*:\s*\[' % re.escape(key), text)
    if not m:
        return []
    dec, pos, lines = json.JSONDecoder(), m.end(), []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return lines
        lines.append(text.count("\n", 0, pos) + 1)
        try:
            _, pos = dec.raw_decode(text, pos)
        except ValueError:
            return lines


def _checked_plan(name: str, streams: list[str] | None, instrs: list[Instr], wheres: list[str]) -> Plan:
    """Build the plan, naming the line of an unknown stream or a repeated op name."""
    seen: dict[str, str] = {}
    for ins, where in zip(instrs, wheres):
        if streams is not None and ins.stream is not None and ins.stream not in streams:
            field = "stream" if not isinstance(ins, HostSync) else "sync_stream"
            raise PlanFormatError(f"{where}: field {field!r}: unknown stream {ins.stream!r}; expected one of {streams}")
        if isinstance(ins, Op):
            if ins.name in seen:
                raise PlanFormatError(f"{where}: op name {ins.name!r} repeats the op at {seen[ins.name]}")
            seen[ins.name] = where
    if streams is None:
        streams = list(dict.fromkeys(i.stream for i in instrs if i.stream is not None))
    return Plan(name, tuple(streams), tuple(instrs))


def _header(obj: dict[str, Any], where: str, version_key: str) -> tuple[str | None, list[str] | None]:
    if obj.get(version_key, 1) != 1:
        raise PlanFormatError(f"{where}: field {version_key!r}: expected version 1, got {obj[version_key]!r}")
    name, streams = obj.get("name"), obj.get("streams")
    if name is not None and not isinstance(name, str):
        raise PlanFormatError(f"{where}: field 'name': expected a string, got {name!r}")
    if streams is not None and not (isinstance(streams, list) and all(isinstance(x, str) and x for x in streams)):
        raise PlanFormatError(f"{where}: field 'streams': expected a list of stream names, got {streams!r}")
    return name, streams


def plan_loads_lines(text: str, source: str = "<plan>") -> tuple[Plan, tuple[int, ...]]:
    """Parse a plan (one JSON document) or a trace (JSON Lines); also the line of each instruction."""
    if not text.strip():
        raise PlanFormatError(f"{source}: empty file; expected a plan (JSON) or a trace (JSON Lines)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise PlanFormatError(f"{source} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
        return _trace_loads(text, source)
    if isinstance(doc, dict) and "instrs" not in doc and any(
            k in doc for k in ("op", "record", "wait", "sync_stream", "sync_event", "kvproof_trace")):
        return _trace_loads(text, source)
    if not isinstance(doc, dict) or "instrs" not in doc:
        raise PlanFormatError(f"{source}: expected an object with 'instrs' (a plan) or JSON Lines (a trace)")
    name, streams = _header(doc, source, "kvproof_plan")
    raw = doc["instrs"]
    if not isinstance(raw, list):
        raise PlanFormatError(f"{source}: field 'instrs': expected a list, got {type(raw).__name__}")
    found = _item_lines(text, "instrs")
    lines = [found[k] if k < len(found) else 0 for k in range(len(raw))]
    wheres = [f"{source}{f' line {n}' if n else ''}: instrs[{k}]" for k, n in enumerate(lines)]
    instrs = [instr_from_json(o, w) for o, w in zip(raw, wheres)]
    return _checked_plan(name or source, streams, instrs, wheres), tuple(lines)


def _trace_loads(text: str, source: str) -> tuple[Plan, tuple[int, ...]]:
    name, streams, instrs, lines, wheres = None, None, [], [], []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"{source} line {n} column {e.colno}: invalid JSON: {e.msg}") from None
        if isinstance(obj, dict) and "kvproof_trace" in obj:
            if instrs or name is not None:
                raise PlanFormatError(f"{source} line {n}: the trace header must be the first line")
            name, streams = _header(obj, f"{source} line {n}", "kvproof_trace")
            name = name or source
            continue
        wheres.append(f"{source} line {n}")
        instrs.append(instr_from_json(obj, wheres[-1], trace=True))
        lines.append(n)
    return _checked_plan(name or source, streams, instrs, wheres), tuple(lines)


def plan_loads(text: str, source: str = "<plan>") -> Plan:
    """Parse a plan (JSON) or a recorded trace (JSON Lines); PlanFormatError names line and field."""
    return plan_loads_lines(text, source)[0]


def trace_dumps(plan: Plan, times: dict[int, tuple[float, float]] | None = None) -> Iterator[str]:
    """JSON Lines of a recorded trace: a header, then one issued instruction per line."""
    yield json.dumps({"kvproof_trace": 1, "name": plan.name, "streams": list(plan.streams)})
    for i, ins in enumerate(plan.instrs):
        obj = instr_to_json(ins)
        if times and i in times:
            obj["t_start"], obj["t_end"] = times[i]
        yield json.dumps(obj)
