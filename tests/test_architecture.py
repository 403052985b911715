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
    assert "Instance(" in text and "fire(" in text


# The modules that own KV pages: the engine's page pool and HiCache's tier pages (under both the
# standalone HiCache and the engine's host tier, through hicache/core.py).
PAGE_OWNERS = ("runtime/model/page_pool.py", "runtime/hicache/pages.py")
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


def _spec_enum_vars():
    """Names of the enum-typed state variables of every catalogued protocol (d_state, p_state, phase)."""
    from kvproof.spec.catalog import PROTOCOLS
    from kvproof.spec.core import EnumT
    return {n for p in PROTOCOLS.values() for n, v in p.vars.items() if isinstance(v.type, EnumT)}


def _spec_enums(tree):
    """Names bound by `from kvproof.spec... import X` where X is an Enum class (DState, PState, Phase)."""
    import enum
    import importlib
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvproof.spec"):
            mod = importlib.import_module(node.module)
            out |= {a.asname or a.name for a in node.names
                    if isinstance(getattr(mod, a.name, None), type) and issubclass(getattr(mod, a.name), enum.Enum)}
    return out


def _spec_state_reads(source):
    """Line numbers where runtime code reads protocol state by hand instead of asking the spec:
    a comparison against a spec enum member, an enum-typed variable read with `.get("x_state", ...)` and
    compared, a `*_state` name compared with an ALL-CAPS state, or an instance's `.state` vector touched."""
    tree = ast.parse(source)
    enums, enum_vars, lines = _spec_enums(tree), _spec_enum_vars(), []

    def is_enum_member(n):          # DState.READY (but not DState.READY.name, which is a label)
        return isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in enums

    def is_state_get(n):            # inst.get("d_state", s)
        return (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get"
                and n.args and isinstance(n.args[0], ast.Constant) and n.args[0].value in enum_vars)

    def is_state_name(n):           # d_state, self.p_state
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else ""
        return name.endswith("_state") or name in enum_vars

    def is_caps(n):                 # READY, State.READY
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else ""
        return len(name) > 1 and name.isupper()

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            ops = [node.left, *node.comparators]
            if (any(is_enum_member(o) or is_state_get(o) for o in ops)
                    or (any(is_state_name(o) for o in ops) and any(is_caps(o) for o in ops))):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr in ("state", "layout") \
                and "inst" in ast.unparse(node.value):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_state_read_check_flags_reintroduced_comparisons():
    """The check below is not vacuous: each way of reading spec state by hand is caught, the spec API is not."""
    bad = [
        "from kvproof.spec.kv_slot import DState\nif self.inst.get('d_state', s) == DState.READY:\n    pass\n",
        "d_state = inst.get('d_state', s)\nok = d_state == READY\n",
        "ok = self.inst.get('p_state', s, w) != 1\n",
        "from kvproof.spec.specdec_monitor import Phase\nok = phase is Phase.RUNNING\n",
        "ok = self.inst.state[3] == 2\n",
    ]
    for src in bad:
        assert _spec_state_reads(src), f"not flagged: {src!r}"
    good = ("from kvproof.spec.kv_slot import DState\n"
            "ok = self.inst.enabled('finish', s=s) and self.inst.holds('slot_free', s=s)\n"
            "names = {st.name: 0 for st in DState}\nfree = st[DState.FREE.name] == 3\n")
    assert _spec_state_reads(good) == []


def test_runtime_never_reads_protocol_state_by_hand():
    """runtime/ asks the spec (enabled, try_fire, holds) instead of comparing its state."""
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in _modules("runtime") for n in _spec_state_reads(p.read_text())]
    assert not offenders, f"spec state read by hand (ask enabled/try_fire/holds instead): {offenders}"


def test_one_hicache_core():
    """The standalone HiCache and the engine's host tier are built on one core (runtime/hicache/core.py):
    neither builds, gates or executes the swap-in plan, copies pages or keeps a page table itself."""
    core = (ROOT / "runtime/hicache/core.py").read_text()
    for call in ("hicache_plan(", "PlanGate(", "execute(", "def layer_copy(", "TierPages("):
        assert call in core, f"hicache/core.py lost {call}"
    for rel in ("runtime/hicache/cache.py", "runtime/hicache/host_tier.py"):
        text = (ROOT / rel).read_text()
        assert "HostPages(" in text, f"{rel} is not built on the HiCache core"
        for call in ("hicache_plan(", "PlanGate(", "execute(", "layer_copy(", "LocalInstance(", ".copy_(self.dev"):
            assert call not in text, f"{rel} calls {call}: that is the HiCache core's (hicache/core.py)"


def test_protocol_messages_are_derived_from_the_spec():
    """No runtime module hand-writes a message class for a spec channel (TYPE = a channel name): the
    wire classes of protocol messages come from runtime/transport/messages.spec_message."""
    from kvproof.spec.catalog import PROTOCOLS
    channels = {c for proto in PROTOCOLS.values() for c in getattr(proto, "channels", {})}
    offenders = []
    for p in _modules("runtime"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                for st in node.body:
                    value = st.value if isinstance(st, (ast.Assign, ast.AnnAssign)) else None
                    names = [t.id for t in (st.targets if isinstance(st, ast.Assign) else [st.target])
                             if isinstance(t, ast.Name)] if value is not None else []
                    if "TYPE" in names and isinstance(value, ast.Constant) and value.value in channels:
                        offenders.append(f"{p.relative_to(ROOT)}:{node.lineno} class {node.name} (TYPE={value.value!r})")
    assert not offenders, f"hand-kept copies of spec channel messages (use spec_message): {offenders}"
