"""Every spec-layer protocol by name: what `prove`, `guards`, `explore`, `audit` and the docs look up."""
from __future__ import annotations

from kvproof.spec.core import Protocol
from kvproof.spec.kv_page import KVPage
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.specdec_monitor import AcceptMonitor

PROTOCOLS: dict[str, type[Protocol]] = {p.name: p for p in (KVSlot, KVPage, AcceptMonitor)}


def protocol_named(name: str) -> type[Protocol]:
    """The protocol called `name`; a clear error lists the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise KeyError(f"unknown protocol {name!r}; expected one of: {', '.join(sorted(PROTOCOLS))}") from None
