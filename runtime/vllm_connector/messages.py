"""Control messages of the vLLM connector: the KV slot spec's channels plus the connection hello.

Abort, Done and Safe are the spec channels' messages (runtime/transport/messages.py derives
them from spec/kv_slot.py; the PD runtime's are the same classes), Alloc is the `alloc`
channel's message with the connector's payload (prefill's request id and decode's blocks).
`VLLM` is this channel's message set: the one codec (encode, decode with every check,
from_emission) over these five types only -- a PD Alloc or Submit is not a connector message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

from kvproof.runtime.transport.messages import MessageError, MessageSet, spec_message  # noqa: F401  (one error)
from kvproof.spec.kv_slot import KVSlot


@dataclass(frozen=True)
class Hello:
    """decode -> prefill rank, once per connection: the slot table and the KV layout to write into."""

    TYPE: ClassVar[str] = "hello"
    variant: str
    slots: int
    writers: int
    rank: int
    layers: list                    # one LayerLayout.to_json() per layer: where decode's blocks lie


Alloc = spec_message(KVSlot, "alloc", req=str, blocks=list)
Abort = spec_message(KVSlot, "abort")
Done = spec_message(KVSlot, "done")
Safe = spec_message(KVSlot, "safe")

Message = Union[Hello, Alloc, Abort, Done, Safe]
VLLM = MessageSet("vllm-connector", Hello, Alloc, Abort, Done, Safe)
encode, decode, from_emission = VLLM.encode, VLLM.decode, VLLM.from_emission
