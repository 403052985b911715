"""Protocol pages generated from spec/: states, variables, actions with guards, properties, diagrams."""
from __future__ import annotations

import inspect
from pathlib import Path

from kvproof.spec.core import EnumT, Nat, Protocol
from kvproof.spec.kv_page import KVPage
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.machine import successors
from kvproof.verify.explore import explore, path_steps
from kvproof.verify.guards import guards_of
from kvproof.verify.report import mermaid, step_table
from kvproof.verify.verdict import Step

PAGES: dict[str, type[Protocol]] = {"kv_slot": KVSlot, "kv_page": KVPage}
# Per protocol: the small instance the diagrams and shortest runs come from, and the pre-fix bugs
# shown as (variant, property) with their shortest violating run.
SMALL: dict[str, dict[str, int]] = {"kv_slot": {"slots": 1, "writers": 1, "max_epoch": 2, "max_chunks": 1},
                                    "kv_page": {"pages": 1, "max_epoch": 2, "max_refs": 2}}
BUGS: dict[str, list[tuple[str, str]]] = {
    "kv_slot": [("unfixed", "no_cross_request_write")],
    "kv_page": [("evict_locked", "reads_own_content"), ("free_while_loading", "no_load_into_foreign_content"),
                ("reuse_before_writeback", "host_copy_intact")]}


def _type(v) -> str:
    t = v.type
    if isinstance(t, EnumT):
        return " \\| ".join(m.name for m in t.enum)
    if isinstance(t, Nat):
        return "natural" + (f" (search bound `{t.bound}`)" if t.bound else "")
    return "bool"


def _state_edges(proto: type[Protocol], variant: str, var: str) -> set[tuple[str, str, str]]:
    """(from, to, action) for every reachable change of `var` at index 0 (small instance)."""
    ex = explore(proto, variant, SMALL[proto.name])
    idx = tuple(0 for _ in proto.vars[var].index)
    pos = ex.layout.slots[(var, idx)]
    return {(st[pos].name, nxt[pos].name, action) for st in ex.graph
            for action, _, nxt in successors(ex.layout, ex.params, st, variant) if st[pos] != nxt[pos]}


def _state_diagram(proto: type[Protocol], var: str) -> list[str]:
    """A Mermaid state diagram of one enum variable, computed from the reachable graph."""
    first = next(iter(proto.vars[var].type.enum)).name
    fixed = _state_edges(proto, proto.variants[0], var)
    out = ["```mermaid", "stateDiagram-v2", f"    [*] --> {first}"]
    out += [f"    {a} --> {b}: {n}" for a, b, n in sorted(fixed)]
    out.append("```")
    for v in proto.variants[1:]:
        extra = _state_edges(proto, v, var) - fixed
        if extra:
            out += ["", f"Only in variant `{v}`: " + "; ".join(f"{a} → {b} by `{n}`" for a, b, n in sorted(extra))
                    + "."]
    return out


def _shortest_violation(proto: type[Protocol], variant: str, prop: str) -> list[Step]:
    """A shortest violating run found by breadth-first search (deterministic, unlike a Z3 model)."""
    ex = explore(proto, variant, SMALL[proto.name])
    return path_steps(ex, ex.violations[prop]) if prop in ex.violations else []


def protocol_page(proto: type[Protocol]) -> str:
    """The Markdown page of one protocol."""
    doc = inspect.getmodule(proto).__doc__ or ""
    params = {k: v for k, v in SMALL[proto.name].items() if k in proto.indices.values()}
    lines = [f"# Protocol `{proto.name}`", "", "_Generated from `spec/` by `python -m kvproof.verify.docgen`; "
             "do not edit by hand._", "", doc.strip(), "",
             f"Variants: {', '.join(f'`{v}`' for v in proto.variants)}. Actors: "
             f"{', '.join(f'`{a}`' for a in proto.actors)} and the environment `net`.", "",
             "## State", "", "| variable | indexed by | owner | values | meaning |", "|---|---|---|---|---|"]
    for name, v in proto.vars.items():
        lines.append(f"| `{name}` | {', '.join(v.index) or '-'} | {v.owner} | {_type(v)} | {v.doc} |")
    if proto.channels:
        lines += ["", "Channels (each message carries an epoch; delayed, duplicated and reordered):", ""]
    lines += [f"- `{c}`: {ch.src} → {ch.dst}, per ({', '.join(ch.index)}): {ch.doc}"
              for c, ch in proto.channels.items()]
    for var, v in proto.vars.items():
        if isinstance(v.type, EnumT):
            lines += ["", f"### `{var}`", ""] + _state_diagram(proto, var)
    guards = guards_of(proto, proto.variants[0], params)
    lines += ["", "## Actions", "", "| action | actor | parameters | receives | guards | what it does |",
              "|---|---|---|---|---|---|"]
    for name, a in proto.actions.items():
        gs = [g for g, (_, acts) in guards.items() if name in acts]
        ps = ", ".join(p.name + (f": {p.index}" if p.index else ": epoch") for p in a.params)
        lines.append(f"| `{name}` | {a.actor} | {ps} | {a.receives or '-'} | "
                     f"{', '.join(f'`{g}`' for g in gs)} | {a.doc} |")
    lines += ["", "## Properties", ""]
    for name, inv in proto.invariants.items():
        kind = "strengthening invariant" if inv.strengthening else "property"
        lines.append(f"- `{name}` ({kind}): {inv.doc}")
    for name, g in proto.goals.items():
        lines.append(f"- `{name}` (liveness, under strong fairness): {g.doc}")
    for variant, prop in BUGS.get(proto.name, []):
        steps = _shortest_violation(proto, variant, prop)
        if steps:
            lines += ["", f"## Pre-fix variant `{variant}`, as the verifier finds it", "",
                      f"The shortest run of variant `{variant}` that violates `{prop}` "
                      f"({len(steps)} steps; `kvproof prove` finds one of the same length with Z3):", "",
                      "```", step_table(steps), "```", "", "```mermaid", mermaid(steps), "```"]
    return "\n".join(lines) + "\n"


def write_pages(root: Path) -> list[Path]:
    """Write every protocol page under root/docs/protocols/."""
    out = []
    for name, proto in PAGES.items():
        path = root / "docs" / "protocols" / f"{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(protocol_page(proto))
        out.append(path)
    return out


STRUCTURE_DIRS = ("kvproof", "spec", "verify", "runtime", "kernels")


def structure_page(root: Path) -> str:
    """docs/structure.md: one line per module, its docstring's first line."""
    import ast
    lines = ["# Module map", "", "_One line per module (its docstring's first line); regenerate with "
             "`python -m kvproof.verify.docgen`._", ""]
    for d in STRUCTURE_DIRS:
        lines += [f"## `{d}/`", ""]
        for p in sorted((root / d).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(p.read_text())) or ""
            first = doc.strip().splitlines()[0] if doc.strip() else "(entry point)"
            if p.name != "__init__.py":
                lines.append(f"- `{p.relative_to(root)}`: {first}")
            elif p.parent != root / d and doc.strip():      # a sub-package: what it holds
                lines.append(f"- `{p.parent.relative_to(root)}/` (package): {first}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for p in write_pages(root):
        print(p)
    (root / "docs" / "structure.md").write_text(structure_page(root))
    print(root / "docs" / "structure.md")
