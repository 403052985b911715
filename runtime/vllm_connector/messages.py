"""Control messages of the vLLM connector: the KV slot spec's channels plus the connection hello.

Each is a frozen dataclass; `encode` gives the JSON object the control channel
(runtime/channel.py) carries and `decode` checks the type tag and the exact
field set, naming what was wrong.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Union


class MessageError(ValueError):
    """A control message is malformed."""


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
SPEC_CHANNELS = {"alloc": Alloc, "abort": Abort, "done": Done, "safe": Safe}


def encode(msg: Message) -> dict[str, Any]:
    """The JSON object for one message."""
    return {"type": msg.TYPE, **asdict(msg)}


def decode(raw: Any) -> Message:
    """Parse and check one received JSON object."""
    if not isinstance(raw, dict) or raw.get("type") not in TYPES:
        raise MessageError(f"control message {raw!r}: expected an object with type in {sorted(TYPES)}")
    cls = TYPES[raw["type"]]
    names = {f.name: f.type for f in fields(cls)}
    got = set(raw) - {"type"}
    if got != set(names):
        raise MessageError(f"{raw['type']} message: fields {sorted(got)}, expected {sorted(names)}")
    for name, typ in names.items():
        want = {"int": int, "str": str, "list": list}[typ]
        v = raw[name]
        if not isinstance(v, want) or isinstance(v, bool):
            raise MessageError(f"{raw['type']} message: field {name!r}={v!r}, expected {typ}")
    return cls(**{k: raw[k] for k in names})


def from_emission(em: Any, **extra: Any) -> Alloc | Abort | Done | Safe:
    """The message for a spec `send` emission (index [slot, writer], epoch); extra adds Alloc's payload."""
    s, w = em.fields["index"]
    return SPEC_CHANNELS[em.fields["channel"]](slot=s, writer=w, epoch=em.fields["epoch"], **extra)
