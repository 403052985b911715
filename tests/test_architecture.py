"""The design rules, checked on the source: data flows spec -> verify and spec -> runtime only,
and the runtime changes protocol state only by firing spec actions."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(folder):
    return [p for p in sorted((ROOT / folder).rglob("*.py"))]


def _imports(path):
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_spec_is_pure_python():
    for p in _modules("spec"):
        bad = {m for m in _imports(p) if m.split(".")[0] in ("torch", "z3", "triton")
               or m.startswith(("kvproof.verify", "kvproof.runtime", "kvproof.kernels"))}
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}: spec/ must stay pure Python"


def test_runtime_and_kernels_never_import_verify():
    for folder in ("runtime", "kernels"):
        for p in _modules(folder):
            bad = {m for m in _imports(p) if m.startswith("kvproof.verify")}
            assert not bad, f"{p.relative_to(ROOT)} imports {bad}: the runtime never reaches into verify/"


def test_runtime_never_writes_protocol_state_directly():
    """grep for state assignments outside the spec and find none."""
    offenders = []
    for p in _modules("runtime"):
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                # x.state[...] = ... or x.inst.state = ...: a spec instance's state vector written by hand
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "state":
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}")
                if isinstance(t, ast.Attribute) and t.attr == "state" and "inst" in ast.unparse(t.value):
                    offenders.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"direct writes to a spec instance's state: {offenders}"


def test_runtime_fires_the_kv_slot_spec():
    text = "\n".join(p.read_text() for p in (ROOT / "runtime").glob("*_worker.py"))
    assert "Instance(" in text and ".fire(" in text
