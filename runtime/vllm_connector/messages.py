"""Control messages of the vLLM connector: the KV slot spec's channels plus the connection hello.

Each is a frozen dataclass; `encode` gives the JSON object the control channel
(runtime/transport/control.py) carries and `decode` checks the type tag, the exact
field set and the field types, naming what was wrong -- both are runtime/pd/messages.py's,
over this module's message set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Union

from kvproof.runtime.pd import messages as pd_messages
from kvproof.runtime.pd.messages import MessageError  # noqa: F401  (re-exported: one error for every control message)


@dataclass(frozen=True)
class Hello:
    """decode -> prefill rank, once per connection: the slot table and the KV layout to write into."""

    TYPE: ClassVar[str] = "hello"
    variant: str
    slots: int
    writers: int
    rank: int
    layers: list                    # one LayerLayout.to_json() per layer: where decode's blocks lie


@dataclass(frozen=True)
class Alloc:
    """decode -> prefill rank: `slot` at `epoch` receives request `req` (prefill's id) into `blocks`."""

    TYPE: ClassVar[str] = "alloc"
    slot: int
    writer: int
    epoch: int
    req: str
    blocks: list


@dataclass(frozen=True)
class Abort:
    """decode -> prefill rank: the request in `slot` at `epoch` was terminated."""

    TYPE: ClassVar[str] = "abort"
    slot: int
    writer: int
    epoch: int


@dataclass(frozen=True)
class Done:
    """prefill rank -> decode: every write of this rank for `slot` at `epoch` landed."""

    TYPE: ClassVar[str] = "done"
    slot: int
    writer: int
    epoch: int


@dataclass(frozen=True)
class Safe:
    """prefill rank -> decode: no write of this rank for `slot` at `epoch` can land any more."""

    TYPE: ClassVar[str] = "safe"
    slot: int
    writer: int
    epoch: int


Message = Union[Hello, Alloc, Abort, Done, Safe]
TYPES: dict[str, type] = {c.TYPE: c for c in (Hello, Alloc, Abort, Done, Safe)}


def encode(msg: Message) -> dict[str, Any]:
    """The JSON object for one message."""
    return pd_messages.encode(msg, TYPES)


def decode(raw: Any) -> Message:
    """Parse and check one received JSON object (type tag, exact field set, field types)."""
    return pd_messages.decode_message(raw, TYPES)


def from_emission(em: Any, **extra: Any) -> Alloc | Abort | Done | Safe:
    """The message for a spec `send` emission (index [slot, writer], epoch); extra adds Alloc's payload."""
    return pd_messages.from_emission(em, TYPES, **extra)
