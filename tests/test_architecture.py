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
    text = "\n".join(p.read_text() for p in (ROOT / "runtime" / "pd").glob("*_worker.py"))
    assert "Instance(" in text and ".fire(" in text


# The modules that own KV pages: the engine's page pool, HiCache's tiers, the engine's host tier.
PAGE_OWNERS = ("runtime/model/page_pool.py", "runtime/hicache/pages.py", "runtime/hicache/host_tier.py")
# Names of hand-kept page bookkeeping the page spec (spec/kv_page.py) holds instead.
PAGE_COUNTERS = {"ref", "refs", "refcount", "refcounts", "pin", "pins", "locks", "used"}


def test_page_owners_fire_the_kv_page_spec():
    for rel in PAGE_OWNERS:
        text = (ROOT / rel).read_text()
        assert "LocalInstance(KVPage" in text and ".fire(" in text, f"{rel} does not drive its pages by the spec"


def test_runtime_changes_page_state_only_through_the_spec():
    """No hand-kept reference count, pin or lock count, used set or page-state comparison in runtime/:
    holders, locks and residency are the page spec's state, changed by firing and read by queries."""
    offenders = []
    for p in _modules("runtime"):
        page_states = "kvproof.spec.kv_page" in _imports(p)        # its PState is the page state
        for node in ast.walk(ast.parse(p.read_text())):
            where = f"{p.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                base = t.value if isinstance(t, ast.Subscript) else t
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                counted = isinstance(node, ast.AugAssign) or isinstance(t, ast.Subscript) or isinstance(t, ast.Attribute)
                if counted and PAGE_COUNTERS & set(name.lower().strip("_").split("_")):
                    offenders.append(f"{where} writes {ast.unparse(t)}")
            if page_states and isinstance(node, ast.Compare):
                if any(isinstance(x, ast.Attribute) and isinstance(x.value, ast.Name) and x.value.id == "PState"
                       for x in [node.left, *node.comparators]):
                    offenders.append(f"{where} compares a page state by hand: {ast.unparse(node)}")
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if node.target.id in ("locks", "refs", "pins") and p.name == "radix.py":
                    offenders.append(f"{where} declares a {node.target.id} field")
    assert not offenders, f"page bookkeeping outside the spec: {offenders}"


def _module_name(path):
    rel = path.relative_to(ROOT / "runtime").with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["kvproof.runtime", *parts])


def _runtime_import_graph():
    """Module -> the kvproof.runtime modules it imports (a package import counts as its __init__)."""
    mods = {_module_name(p): p for p in _modules("runtime")}
    graph = {}
    for name, p in mods.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:         # relative: from .x import y
                base = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
                target = ".".join([base, node.module]) if node.module else base
            elif isinstance(node, ast.ImportFrom) and node.module:
                target = node.module
            elif isinstance(node, ast.Import):
                target = None
                for a in node.names:
                    if a.name in mods:
                        graph[name].add(a.name)
            else:
                continue
            if target:
                names = [target] + [f"{target}.{a.name}" for a in node.names]
                graph[name] |= {t for t in names if t in mods and t != name}
    return graph


def test_runtime_has_no_import_cycle():
    import networkx as nx
    g = nx.DiGraph([(a, b) for a, bs in _runtime_import_graph().items() for b in bs])
    cycles = list(nx.simple_cycles(g))
    assert not cycles, f"import cycles in runtime/: {cycles}"


def test_nothing_in_runtime_imports_the_tools():
    """Benches, the stress harness, the load generator and the simulator sit at the edge: only the CLI and tests
    import them, and a bench is imported by nothing but the CLI."""
    for name, deps in _runtime_import_graph().items():
        tools = {d for d in deps if d.startswith("kvproof.runtime.tools.")}
        if not name.startswith("kvproof.runtime.tools."):
            assert not tools, f"{name} imports {tools}: runtime/tools/ sits at the edge"
        benches = {d for d in tools if "bench" in d.rsplit(".", 1)[1]}
        assert not benches, f"{name} imports the bench {benches}: move the shared code out of the bench"


def test_no_private_name_crosses_modules():
    """`from x import _y` reaches into another module's private names; such a name should be public."""
    offenders = []
    for folder in ("spec", "verify", "runtime", "kernels"):
        for p in _modules(folder):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.ImportFrom):
                    mod = node.module or ""
                    if any(part.startswith("_") and not part.startswith("__") for part in mod.split(".")):
                        offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} imports module {mod}")
                    offenders += [f"{p.relative_to(ROOT)}:{node.lineno} imports {a.name} from {mod}"
                                  for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders
