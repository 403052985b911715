"""Control messages between the client, the decode process and the prefill ranks.

Each message is a frozen dataclass with an explicit `encode()` to the JSON
object the control channel carries and a `decode_message()` that checks the
type tag, the exact field set and every field's type; anything else raises
MessageError naming the message type and field.

Protocol messages (one per KV-slot spec channel, carrying its index and epoch):
    Alloc   decode -> prefill   slot allocated for request rid (n_tokens of prompt)
    Abort   decode -> prefill   request terminated
    Done    prefill -> decode   every chunk of this rank landed
    Safe    prefill -> decode   safe to recycle: no write of this epoch can land any more
Process plumbing: Hello, Ready, Up, Submit, ClientAbort, Result, Shutdown, Stats, Event (real-KV mode).
"""

from __future__ import annotations

import functools
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, Mapping, Union

from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.machine import Emission


class MessageError(ValueError):
    """A control message is malformed: unknown type, missing/extra field or a wrong field type."""


@dataclass(frozen=True)
class Alloc:
    """decode -> prefill rank: slot `slot` now belongs to request `rid` at `epoch`."""

    TYPE: ClassVar[str] = "alloc"
    slot: int
    writer: int
    epoch: int
    rid: int
    n_tokens: int
    tokens: Union[list, None] = None     # real-KV mode: the prompt the rank prefills
    corrupt: int = 0                     # fault injection: flip bytes of the exported KV


@dataclass(frozen=True)
class Abort:
    """decode -> prefill rank: the request in `slot` at `epoch` was terminated."""

    TYPE: ClassVar[str] = "abort"
    slot: int
    writer: int
    epoch: int


@dataclass(frozen=True)
class Done:
    """prefill rank -> decode: this rank's KV for `slot` at `epoch` has landed."""

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


@dataclass(frozen=True)
class Hello:
    """prefill rank -> decode, first message on a control channel: which rank this is."""

    TYPE: ClassVar[str] = "hello"
    rank: int


@dataclass(frozen=True)
class Ready:
    """decode -> client: where prefill rank w connects its control channel and its data transport."""

    TYPE: ClassVar[str] = "ready"
    control: list
    data: list


@dataclass(frozen=True)
class Up:
    """decode -> client: every prefill rank is connected; requests may come."""

    TYPE: ClassVar[str] = "up"
    writers: int


@dataclass(frozen=True)
class Submit:
    """client -> decode: a new request with a prompt of n_tokens."""

    TYPE: ClassVar[str] = "submit"
    rid: int
    n_tokens: int
    tokens: Union[list, None] = None     # real-KV mode: prompt token ids
    params: Union[dict, None] = None     # real-KV mode: SamplingParams fields
    corrupt: int = 0                     # fault injection: flip bytes of this request's exported KV


@dataclass(frozen=True)
class ClientAbort:
    """client -> decode: the client aborted (or disconnected from) request rid."""

    TYPE: ClassVar[str] = "client_abort"
    rid: int
    cause: str = "client"                # why: client, disconnect, stop_string, ...


@dataclass(frozen=True)
class StatsRequest:
    """client -> decode: send a live Stats snapshot now, tagged with this nonce (a /metrics scrape)."""

    TYPE: ClassVar[str] = "stats_request"
    nonce: int


@dataclass(frozen=True)
class Result:
    """decode -> client: how request rid ended (served | corrupt | aborted | failed) and why."""

    TYPE: ClassVar[str] = "result"
    rid: int
    status: str
    reason: Union[str, None]
    slot: Union[int, None]
    latency_s: float
    bad_bytes: int = 0


@dataclass(frozen=True)
class Shutdown:
    """client -> decode, decode -> prefill: finish what is in flight, report Stats, exit."""

    TYPE: ClassVar[str] = "shutdown"


@dataclass(frozen=True)
class Stats:
    """A process's counters at shutdown (prefill -> decode, decode -> client)."""

    TYPE: ClassVar[str] = "stats"
    data: dict


@dataclass(frozen=True)
class Event:
    """decode -> client (real-KV mode): a TokenEvent of request rid, as its fields."""

    TYPE: ClassVar[str] = "event"
    rid: int
    event: dict


@dataclass(frozen=True)
class Events:
    """decode -> client: the Events of one decode step in one frame (one send per step, not per request).

    items: [rid, event] pairs, each as an Event's fields (`events_of` validates and unpacks them).
    """

    TYPE: ClassVar[str] = "events"
    items: list


Message = Union[Alloc, Abort, Done, Safe, Hello, Ready, Up, Submit, ClientAbort, StatsRequest, Result, Shutdown,
                Stats, Event, Events]
MESSAGE_TYPES: dict[str, type] = {c.TYPE: c for c in typing.get_args(Message)}
RESULT_STATUSES = ("served", "corrupt", "aborted", "failed")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def encode(msg: Any, types: Mapping[str, type] = MESSAGE_TYPES) -> dict[str, Any]:
    """The JSON object for one message (what Channel.send takes); `types` is the message set it belongs to."""
    if types.get(getattr(msg, "TYPE", None)) is not type(msg):
        raise MessageError(f"encode: {type(msg).__name__} is not a control message type")
    return {"type": msg.TYPE, **asdict(msg)}


def _check(tname: str, name: str, value: Any, hint: Any) -> None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) is Union else (hint,)
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
    want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise MessageError(f"{tname} message: field {name!r}={value!r}, expected {want}")


def decode_message(raw: Any, types: Mapping[str, type] = MESSAGE_TYPES) -> Any:
    """Parse and validate one received JSON object into its message dataclass, one of `types`."""
    if not isinstance(raw, dict):
        raise MessageError(f"control message is a {type(raw).__name__}, expected a JSON object")
    tname = raw.get("type")
    cls = types.get(tname) if isinstance(tname, str) else None
    if cls is None:
        raise MessageError(f"control message type={tname!r}, expected one of {sorted(types)}")
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    got = set(raw) - {"type"}
    required = {f.name for f in fields(cls) if f.default is MISSING}
    missing, extra = sorted(required - got), sorted(got - set(names))
    if missing or extra:
        raise MessageError(f"{tname} message: missing fields {missing}, unexpected fields {extra}; "
                           f"expected {names}")
    for name in got:
        _check(tname, name, raw[name], hints[name])
    if cls is Result and raw["status"] not in RESULT_STATUSES:
        raise MessageError(f"result message: field 'status'={raw['status']!r}, expected one of {RESULT_STATUSES}")
    return cls(**{k: raw[k] for k in got})


def events_of(msg: Events) -> list[Event]:
    """The Events a batch carries, each validated like a single Event message."""
    out = []
    for item in msg.items:
        if not (isinstance(item, list) and len(item) == 2):
            raise MessageError(f"events message: item {item!r}, expected [rid, event]")
        ev = decode_message({"type": Event.TYPE, "rid": item[0], "event": item[1]})
        assert isinstance(ev, Event)
        out.append(ev)
    return out


def from_emission(em: Emission, types: Mapping[str, type] = MESSAGE_TYPES, **extra: Any) -> Any:
    """The message for a kv_slot spec `send` emission (index [slot, writer], epoch), of the type in `types`
    named by its channel; extra adds Alloc's payload."""
    if em.kind != "send" or em.fields.get("channel") not in KVSlot.channels or em.fields["channel"] not in types:
        raise MessageError(f"emission {em!r} is not a send on one of {sorted(KVSlot.channels)}")
    s, w = em.fields["index"]
    return types[em.fields["channel"]](slot=s, writer=w, epoch=em.fields["epoch"], **extra)

