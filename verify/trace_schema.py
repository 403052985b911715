"""The JSON Schema of trace records (docs/schema/trace.schema.json) and a small checker for it.

The checker covers the schema keywords the trace schema uses (type, const,
required, properties, additionalProperties, minimum, oneOf), so traces can be
checked without the jsonschema package; tests cross-check it with jsonschema
where that is installed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "schema" / "trace.schema.json"
_TYPES = {"object": dict, "string": str, "integer": int, "array": list, "null": type(None), "boolean": bool}


def load_schema() -> dict[str, Any]:
    """The trace record schema."""
    return json.loads(SCHEMA_PATH.read_text())


def errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Every violation of `schema` by `value`, each naming the JSON path and what was expected."""
    out: list[str] = []
    if "oneOf" in schema:
        per = [errors(value, s, path) for s in schema["oneOf"]]
        ok = [i for i, e in enumerate(per) if not e]
        if len(ok) != 1:
            titles = [s.get("title", str(i)) for i, s in enumerate(schema["oneOf"])]
            best = min(per, key=len)
            out.append(f"{path}: matches {len(ok)} of {titles}, expected exactly one"
                       + (f" ({'; '.join(best)})" if best else ""))
        return out
    if "const" in schema and value != schema["const"]:
        return [f"{path}: {value!r}, expected {schema['const']!r}"]
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(isinstance(value, _TYPES[t]) and not (t == "integer" and isinstance(value, bool))
                   for t in types):
            return [f"{path}: {value!r}, expected {' or '.join(types)}"]
    if "minimum" in schema and isinstance(value, int) and value < schema["minimum"]:
        out.append(f"{path}: {value}, expected >= {schema['minimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{path}: missing required field {k!r}" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                out += errors(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}: unexpected field {k!r}; expected some of {sorted(props)}")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += errors(v, schema["additionalProperties"], f"{path}.{k}")
    return out


def check_file(path: Path) -> list[str]:
    """Schema violations of every line of a JSON Lines trace file, prefixed with file:line."""
    schema, out = load_schema(), []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            out += [f"{path}:{n}: {e}" for e in errors(json.loads(line), schema)]
    return out
