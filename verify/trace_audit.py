"""Trace validation: replay runtime traces (JSON Lines, one file per process) against the spec.

The runtime's processes each trace the actions they fired and the environment
events they observed. Merged by their monotonic timestamps (one host) the
traces form one run of the whole protocol, replayed here on a global instance
where environment guards (message delivered, write in flight, connection
drained) are checked too. The first illegal step, or the first step after
which a property fails, is reported with its file and line.
"""
from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvproof.spec.catalog import PROTOCOLS
from kvproof.spec.core import Protocol, ProtocolViolation, SpecError
from kvproof.spec.instance import Instance


class TraceFormatError(ValueError):
    """A trace file is malformed: names the file, the line and what was expected."""


@dataclass(frozen=True)
class Event:
    """One traced firing, with where it came from."""

    t_ns: int
    file: str
    line: int
    actor: str
    action: str
    params: dict[str, Any]


@dataclass
class AuditResult:
    """Verdict of a trace audit."""

    ok: bool
    protocol: str
    variant: str
    params: dict[str, Any]
    events: int
    actors: dict[str, int]
    slots: int
    error: str | None = None
    at: Event | None = None
    context: list[Event] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        ev = (lambda e: {"file": e.file, "line": e.line, "actor": e.actor, "action": e.action,
                         "params": e.params})
        return {"ok": self.ok, "verdict": "valid" if self.ok else "invalid", "protocol": self.protocol,
                "variant": self.variant, "params": self.params, "events": self.events,
                "actors": self.actors, "slots_touched": self.slots, "error": self.error,
                "at": ev(self.at) if self.at else None, "context": [ev(e) for e in self.context],
                "state": self.state}

    def text(self) -> str:
        """For people."""
        head = (f"{self.protocol} ({self.variant}, {', '.join(f'{k}={v}' for k, v in self.params.items())}): "
                f"{self.events} events, actors {dict(self.actors)}, {self.slots} slots touched")
        if self.ok:
            return head + "\nverdict: VALID - every step is legal and every property holds"
        lines = [head, f"verdict: INVALID at {self.at.file}:{self.at.line}: {self.error}"]
        if self.context:
            lines.append("preceding steps:")
            lines += [f"  {e.file}:{e.line}  {e.actor}.{e.action}({_args(e.params)})" for e in self.context]
        lines.append(f"  {self.at.file}:{self.at.line}  {self.at.actor}.{self.at.action}"
                     f"({_args(self.at.params)})  <-- here")
        if self.state:
            lines.append("relevant state before the step: " + ", ".join(f"{k}={v}" for k, v in self.state.items()))
        return "\n".join(lines)


def _args(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def _need(rec: dict[str, Any], key: str, typ: type | tuple, where: str) -> Any:
    if key not in rec:
        raise TraceFormatError(f"{where}: missing field {key!r}")
    if not isinstance(rec[key], typ) or isinstance(rec[key], bool) and typ is int:
        raise TraceFormatError(f"{where}: field {key!r} is {rec[key]!r}; expected {getattr(typ, '__name__', typ)}")
    return rec[key]


def load_trace(path: Path) -> tuple[dict[str, Any], list[Event]]:
    """Parse one trace file into its header and events; malformed input raises TraceFormatError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise TraceFormatError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); expected a trace "
                               f"in JSON Lines") from None
    lines = text.split("\n")
    header: dict[str, Any] | None = None
    events = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            last = n == len(lines) or (n == len(lines) - 1 and lines[-1] == "")
            kind = "truncated record (file ends mid-line)" if last and not text.endswith("\n") else "invalid JSON"
            raise TraceFormatError(f"{where}: {kind}: {e.msg} at column {e.colno}") from None
        if not isinstance(rec, dict):
            raise TraceFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        kind = _need(rec, "kind", str, where)
        if kind == "header":
            if header is not None:
                raise TraceFormatError(f"{where}: a second header")
            header = {"protocol": _need(rec, "protocol", str, where), "variant": _need(rec, "variant", str, where),
                      "params": _need(rec, "params", dict, where), "actor": rec.get("actor")}
        elif kind == "fire":
            if header is None:
                raise TraceFormatError(f"{where}: event before the header line")
            params = _need(rec, "params", dict, where)
            events.append(Event(_need(rec, "t_ns", int, where), str(path), n,
                                _need(rec, "actor", str, where), _need(rec, "action", str, where), params))
        else:
            raise TraceFormatError(f"{where}: unknown record kind {kind!r}; expected 'header' or 'fire'")
    if header is None:
        raise TraceFormatError(f"{path}: no header line (empty trace?)")
    return header, events


def trace_files(paths: list[str]) -> list[Path]:
    """Expand directories to their *.jsonl files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise TraceFormatError(f"{p}: directory holds no *.jsonl trace files")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise TraceFormatError(f"{p}: no such file or directory")
    return out


def audit(paths: list[str], context: int = 5,
          protocols: dict[str, type[Protocol]] | None = None) -> AuditResult:
    """Merge the traces and replay them against the spec; stop at the first illegal step.

    `protocols` adds protocols by name to the catalog's (e.g. from `--protocol PATH.py`)."""
    headers, events = [], []
    for f in trace_files(paths):
        h, evs = load_trace(f)
        headers.append((f, h))
        events += evs
    f0, h0 = headers[0]
    for f, h in headers[1:]:
        for k in ("protocol", "variant", "params"):
            if h[k] != h0[k]:
                raise TraceFormatError(f"{f}: header {k}={h[k]!r} differs from {f0}'s {h0[k]!r}")
    known = {**PROTOCOLS, **(protocols or {})}
    proto = known.get(h0["protocol"])
    if proto is None:
        raise TraceFormatError(f"{f0}: unknown protocol {h0['protocol']!r}; expected one of {sorted(known)} "
                               f"(a protocol of your own: --protocol PATH.py)")
    try:
        inst = Instance(proto, h0["variant"], h0["params"])
    except SpecError as e:
        raise TraceFormatError(f"{f0}: header: {e}") from None
    events.sort(key=lambda e: (e.t_ns, e.file, e.line))
    recent: deque[Event] = deque(maxlen=context)
    actors: Counter[str] = Counter()
    slots: set[Any] = set()
    res = AuditResult(True, proto.name, h0["variant"], h0["params"], len(events), {}, 0)
    for ev in events:
        actors[ev.actor] += 1
        if "s" in ev.params:
            slots.add(ev.params["s"])
        error = None
        adef = proto.actions.get(ev.action)
        if adef is None:
            error = f"unknown action {ev.action!r}"
        elif adef.actor != ev.actor:
            error = f"action {ev.action} belongs to actor {adef.actor!r}, traced by {ev.actor!r}"
        else:
            before = _relevant(inst, ev.params)
            try:
                inst.fire(ev.action, **ev.params)
            except ProtocolViolation as e:
                error = f"illegal step: guard '{e.guard}' of {ev.action}({_args(ev.params)}) is false"
            except (SpecError, TypeError) as e:
                error = f"malformed step: {e}"
            else:
                bad = inst.violated_invariants()
                if bad:
                    error = f"property violated after this step: {', '.join(bad)}"
            if error:
                res.state = before
        if error:
            res.ok, res.error, res.at, res.context = False, error, ev, list(recent)
            break
        recent.append(ev)
    res.actors, res.slots = dict(actors), len(slots)
    return res


def _relevant(inst: Instance, params: dict[str, Any]) -> dict[str, Any]:
    """State values indexed by the event's slot/writer, for the error context."""
    want = {k: params[k] for k in ("s", "w") if k in params}
    out = {}
    for pos, (var, idx) in enumerate(inst.layout.names):
        ixs = inst.layout.vars[var].index
        if not ixs or "." in var:
            continue
        if all(want.get({"slot": "s", "writer": "w"}[i]) == v for i, v in zip(ixs, idx) if i in ("slot", "writer")
               ) and any({"slot": "s", "writer": "w"}[i] in want for i in ixs):
            v = inst.state[pos]
            out[inst.layout.label(pos)] = getattr(v, "name", v)
    return out
