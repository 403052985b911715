"""Control messages between the client, the decode process and the prefill ranks.

Protocol messages are the KV slot spec's channels (runtime/transport/messages.py derives
their classes from spec/kv_slot.py: index [slot, writer] and epoch); pd adds only Alloc's payload:
    Alloc   decode -> prefill   slot allocated for request rid (n_tokens of prompt)
    Abort   decode -> prefill   request terminated
    Done    prefill -> decode   every chunk of this rank landed (real-KV mode: with the hidden state of
                                the prompt's last position, from which decode samples the first token)
    Safe    prefill -> decode   safe to recycle: no write of this epoch can land any more
Process plumbing, frozen dataclasses with a TYPE tag: Hello, Ready, Up, Submit, ClientAbort,
StatsRequest, Result, Shutdown, Stats, Event, Events (real-KV mode). `PD` is the one codec of
them all: encode, decode (with every check, naming the message type and field), from_emission.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from kvproof.runtime.transport.messages import MessageError, MessageSet, spec_message
from kvproof.spec.kv_slot import KVSlot

Alloc = spec_message(KVSlot, "alloc", rid=int, n_tokens=int,
                     tokens=(Union[list, None], None),     # real-KV mode: the prompt the rank prefills
                     corrupt=(int, 0))                     # fault injection: flip bytes of the exported KV
Abort = spec_message(KVSlot, "abort")
Done = spec_message(KVSlot, "done",
                    hidden=(Union[str, None], None))       # real-KV mode: base64 of the prompt's last hidden state
Safe = spec_message(KVSlot, "safe")


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
    status: Literal["served", "corrupt", "aborted", "failed"]
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
PD = MessageSet("pd", *typing.get_args(Message))
MESSAGE_TYPES: dict[str, type] = PD.types


encode, decode_message, from_emission = PD.encode, PD.decode, PD.from_emission


def events_of(msg: Events) -> list[Event]:
    """The Events a batch carries, each validated like a single Event message."""
    out = []
    for item in msg.items:
        if not (isinstance(item, list) and len(item) == 2):
            raise MessageError(f"events message: item {item!r}, expected [rid, event]")
        out.append(PD.decode({"type": Event.TYPE, "rid": item[0], "event": item[1]}))
    return out
