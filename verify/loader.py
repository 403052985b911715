"""Load a user's protocol module from a path: its protocols and its checks, without editing the package.

`kvproof prove path/to/module.py` (and `guards`, `explore`, `audit --protocol`)
execute the file as a fresh module named after it. The module defines protocols
with `kvproof.spec` and declares checks with `kvproof.verify.check` (or any
`kvproof.verify.Check`) in a module-level `CHECKS` list or a `checks()` function.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from kvproof.spec.core import Protocol
from kvproof.verify.registry import Check, collect


class LoadError(ValueError):
    """A protocol module could not be loaded or declares nothing usable."""


@dataclass
class UserModule:
    """What a loaded module offers: its protocol classes by name and its checks."""

    path: Path
    module: ModuleType
    protocols: dict[str, type[Protocol]]
    checks: list[Check]


def is_module_path(arg: str) -> bool:
    """True when a command-line argument names a Python file (rather than a protocol name)."""
    return arg.endswith(".py") or "/" in arg


def load(path: str | Path) -> UserModule:
    """Execute the module at `path`; its protocols are the Protocol subclasses it holds (not the package's)."""
    p = Path(path)
    if not p.is_file():
        raise LoadError(f"{path}: no such file; expected a Python module defining kvproof protocols")
    name = f"kvproof_user_{abs(hash(str(p.resolve())))}_{p.stem}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise LoadError(f"{path}: not a loadable Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses and pickling look the module up by name
    sys.path.insert(0, str(p.resolve().parent))      # sibling helper modules import normally
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(p.resolve().parent))
    # Its protocols: every Protocol subclass it holds at module level, defined there or imported
    # from a helper of the user's; the package's own protocols (a base to extend) are not its.
    protocols = {v.name: v for v in vars(mod).values()
                 if isinstance(v, type) and issubclass(v, Protocol) and v is not Protocol
                 and not v.__module__.startswith("kvproof.")}
    has_checks = hasattr(mod, "CHECKS") or callable(getattr(mod, "checks", None))
    checks = collect(mod) if has_checks else []
    if not protocols and not checks:
        raise LoadError(f"{path}: defines no Protocol subclass and no CHECKS / checks()")
    return UserModule(p, mod, protocols, checks)


def protocol_from(arg: str) -> type[Protocol]:
    """A protocol by catalog name, or from a module: `path.py` (its only protocol) or `path.py:name`."""
    from kvproof.spec.catalog import protocol_named
    path, _, which = arg.partition(".py:")
    if not is_module_path(arg):
        return protocol_named(arg)
    um = load(path + ".py" if which else arg)
    if which:
        found = um.protocols.get(which) or next((p for p in um.protocols.values() if p.__name__ == which), None)
        if found is None:
            raise LoadError(f"{arg}: no protocol {which!r}; the module defines {sorted(um.protocols)}")
        return found
    if len(um.protocols) != 1:
        raise LoadError(f"{arg}: defines {len(um.protocols)} protocols ({', '.join(sorted(um.protocols))}); "
                        f"name one as PATH.py:NAME")
    return next(iter(um.protocols.values()))
