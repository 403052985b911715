"""Typed control messages: spec channels' messages derived from the spec, one encoder and one validator.

A protocol message is not written by hand. `spec_message(KVSlot, "done")` is the class
of the spec channel `done`: its fields are the channel's index names and the epoch
every message carries (what `View.send` emits), plus the payload a runtime adds for
its receiver (`spec_message(KVSlot, "alloc", rid=int, ...)`). The same channel with
the same payload is the same class wherever it is asked for, so two runtimes speaking
one protocol share its messages. Process plumbing (hello, stats, ...) is a plain
frozen dataclass with a `TYPE` tag.

A `MessageSet` is what one control channel carries. It is the one codec of every
message: `from_emission` (spec Emission -> message), `encode` (message -> the JSON
object a frame carries), `decode` (a received object -> message: type tag, exact
field set, every field's type, checked here and nowhere else) and, for a received
spec message, `receive_args(msg, action)`: the arguments of the spec action that receives it.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar, Literal, Union

from kvproof.spec.core import Protocol
from kvproof.spec.machine import Emission


class MessageError(ValueError):
    """A control message is malformed: unknown type, missing/extra field or a wrong field type."""


class SpecMessage:
    """Base of the message classes derived from a spec channel (see `spec_message`)."""

    TYPE: ClassVar[str]
    PROTOCOL: ClassVar[type[Protocol]]
    INDEX: ClassVar[tuple[str, ...]]          # the channel's index names, the message's first fields


_NO_DEFAULT = object()


@functools.lru_cache(maxsize=None)
def _spec_message(protocol: type[Protocol], channel: str, payload: tuple[tuple[str, Any, Any], ...]) -> type:
    ch = protocol.channels.get(channel)
    if ch is None:
        raise MessageError(f"{protocol.name} has no channel {channel!r}; expected one of {sorted(protocol.channels)}")
    own = (*ch.index, "epoch")
    clash = sorted(set(own) & {name for name, _, _ in payload})
    if clash:
        raise MessageError(f"{protocol.name}.{channel}: payload fields {clash} are the channel's own fields {own}")
    fields: list[Any] = [(name, int) for name in own]
    fields += [(name, t) if d is _NO_DEFAULT else (name, t, dataclasses.field(default=d)) for name, t, d in payload]
    doc = f"{ch.src} -> {ch.dst}: {ch.doc} ({protocol.name} channel {channel!r}, index {list(ch.index)}, epoch)."
    cls = dataclasses.make_dataclass(
        channel.title().replace("_", ""), fields, bases=(SpecMessage,), frozen=True,
        namespace={"TYPE": channel, "PROTOCOL": protocol, "INDEX": tuple(ch.index), "__doc__": doc})
    cls.__module__ = __name__
    return cls


def spec_message(protocol: type[Protocol], channel: str, **payload: Any) -> type:
    """The message class of `protocol`'s channel: its index fields and epoch, then `payload`
    (name=type, or name=(type, default)); one class per (protocol, channel, payload)."""
    spec = tuple((name, *(p if isinstance(p, tuple) else (p, _NO_DEFAULT))) for name, p in payload.items())
    return _spec_message(protocol, channel, spec)


# ------------------------------------------------------------------ validation
def _allowed(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def _check(tname: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise MessageError unless `value` is one of the `allowed` types (ints are >= 0)."""
    for t in allowed:
        if t is type(None) and value is None:
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise MessageError(f"{tname} message: field {name!r}={value!r}, expected an int >= 0")
            return
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if t in (str, list, dict) and isinstance(value, t):
            return
        if typing.get_origin(t) is Literal and value in typing.get_args(t):
            return
    want = " or ".join("null" if t is type(None) else f"one of {typing.get_args(t)}"
                       if typing.get_origin(t) is Literal else t.__name__ for t in allowed)
    raise MessageError(f"{tname} message: field {name!r}={value!r}, expected {want}")


@dataclasses.dataclass(frozen=True)
class _Schema:
    """What `decode` checks for one message class, worked out once."""

    cls: type
    names: tuple[str, ...]                               # every field, in order
    required: frozenset[str]
    allowed: dict[str, tuple[Any, ...]]                  # field -> the types it may hold

    @classmethod
    def of(cls, mcls: type) -> "_Schema":
        """The schema of a frozen message dataclass with a TYPE tag."""
        if not (dataclasses.is_dataclass(mcls) and isinstance(getattr(mcls, "TYPE", None), str)):
            raise TypeError(f"{mcls!r} is not a message class: expected a dataclass with a str TYPE")
        hints = typing.get_type_hints(mcls)
        fs = dataclasses.fields(mcls)
        return cls(mcls, tuple(f.name for f in fs),
                   frozenset(f.name for f in fs if f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING),
                   {f.name: _allowed(hints[f.name]) for f in fs})


class MessageSet:
    """The message types one control channel carries, and the one codec for them."""

    def __init__(self, name: str, *classes: type) -> None:
        self.name = name
        self._schemas: dict[str, _Schema] = {}
        for c in classes:
            s = _Schema.of(c)
            if c.TYPE in self._schemas:
                raise TypeError(f"{name}: two message classes with TYPE {c.TYPE!r}")
            self._schemas[c.TYPE] = s
        self.types: dict[str, type] = {t: s.cls for t, s in self._schemas.items()}

    def encode(self, msg: Any) -> dict[str, Any]:
        """The JSON object for one message of this set (what Channel.send takes)."""
        s = self._schemas.get(getattr(msg, "TYPE", None))  # type: ignore[arg-type]
        if s is None or s.cls is not type(msg):
            raise MessageError(f"encode: {type(msg).__name__} is not a {self.name} control message type")
        d = {"type": msg.TYPE}
        d.update(vars(msg))                     # shallow: fields hold JSON values, nothing to convert
        return d

    def decode(self, raw: Any) -> Any:
        """Parse and validate one received JSON object into its message: type tag, field set, field types."""
        if not isinstance(raw, dict):
            raise MessageError(f"control message is a {type(raw).__name__}, expected a JSON object")
        tname = raw.get("type")
        s = self._schemas.get(tname) if isinstance(tname, str) else None
        if s is None:
            raise MessageError(f"control message type={tname!r}, expected one of {sorted(self._schemas)}")
        got = raw.keys() - {"type"}
        if not (s.required <= got and got <= s.allowed.keys()):
            raise MessageError(f"{tname} message: missing fields {sorted(s.required - got)}, unexpected fields "
                               f"{sorted(got - s.allowed.keys())}; expected {list(s.names)}")
        for name in got:
            _check(tname, name, raw[name], s.allowed[name])
        return s.cls(**{k: raw[k] for k in got})

    def from_emission(self, em: Emission, **payload: Any) -> Any:
        """The message of a spec `send` emission (index and epoch) in this set; payload fills the rest."""
        cls = self.types.get(em.fields.get("channel")) if em.kind == "send" else None
        if cls is None or not issubclass(cls, SpecMessage):
            spec = sorted(t for t, c in self.types.items() if issubclass(c, SpecMessage))
            raise MessageError(f"emission {em!r} is not a send on one of {spec}")
        return cls(*em.fields["index"], em.fields["epoch"], **payload)


def receive_args(msg: SpecMessage, action: str) -> dict[str, int]:
    """The arguments of spec action `action`, which receives `msg`: its index parameters
    from the message's index fields, its epoch parameter from the epoch."""
    return {p: getattr(msg, f) for p, f in _receive_params(type(msg), action)}


@functools.lru_cache(maxsize=None)
def _receive_params(cls: type, action: str) -> tuple[tuple[str, str], ...]:
    """(action parameter, message field) pairs of the spec action receiving messages of class `cls`."""
    adef = cls.PROTOCOL.actions.get(action)
    if adef is None or adef.receives != cls.TYPE:
        raise MessageError(f"{cls.PROTOCOL.name} action {action!r} does not receive {cls.TYPE!r} messages")
    out = tuple((p.name, p.index if p.index is not None else "epoch") for p in adef.params)
    if not {f for _, f in out} <= {*cls.INDEX, "epoch"}:
        raise MessageError(f"{action}'s parameters {[p.name for p in adef.params]} are not the index "
                           f"{list(cls.INDEX)} and epoch of its channel {cls.TYPE!r}")
    return out
