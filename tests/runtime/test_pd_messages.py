"""Control messages, the PD config and the KV pool's content function."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvproof.runtime.pd.kv_pool import KVPool, expected_kv, kv_chunk, offset
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import (
    MESSAGE_TYPES, Abort, Alloc, ClientAbort, Done, MessageError, Ready, Result, Safe, Shutdown, Stats, Submit,
    decode_message, encode, from_emission,
)
from kvproof.spec.machine import Emission


@pytest.mark.parametrize("msg", [
    Alloc(3, 1, 7, 42, 16), Abort(0, 0, 1), Done(2, 1, 9), Safe(5, 0, 2), Submit(1, 8), ClientAbort(4), Shutdown(),
    Result(1, "served", None, 3, 0.25), Result(2, "failed", "transfer timeout", None, 1.0, 0),
    Ready([["127.0.0.1", 1]], [["127.0.0.1", 2]]), Stats({"served": 3}),
])
def test_round_trip(msg: object) -> None:
    """encode then decode_message gives the same message back."""
    assert decode_message(encode(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize("raw,needle", [
    ([1, 2], "expected a JSON object"),
    ({"slot": 1}, "type=None"),
    ({"type": "bogus"}, "type='bogus'"),
    ({"type": "done", "slot": 1, "writer": 0}, "missing fields ['epoch']"),
    ({"type": "done", "slot": 1, "writer": 0, "epoch": 1, "extra": 2}, "unexpected fields ['extra']"),
    ({"type": "done", "slot": -1, "writer": 0, "epoch": 1}, "'slot'=-1, expected an int >= 0"),
    ({"type": "done", "slot": True, "writer": 0, "epoch": 1}, "'slot'=True, expected int"),
    ({"type": "alloc", "slot": 0, "writer": 0, "epoch": 1, "rid": "x", "n_tokens": 1}, "'rid'='x'"),
    ({"type": "submit", "rid": 1, "n_tokens": 1.5}, "'n_tokens'=1.5"),
    ({"type": "result", "rid": 1, "status": "weird", "reason": None, "slot": None, "latency_s": 0.0}, "status"),
    ({"type": "result", "rid": 1, "status": "served", "reason": 3, "slot": None, "latency_s": 0.0},
     "expected str or null"),
])
def test_malformed_messages_are_named(raw: object, needle: str) -> None:
    """Every malformed message raises MessageError naming the type and field."""
    with pytest.raises(MessageError) as ei:
        decode_message(raw)
    assert needle in str(ei.value)


def test_every_type_registered() -> None:
    """The type tags are unique and include the four spec channels."""
    assert {"alloc", "abort", "done", "safe"} <= set(MESSAGE_TYPES)


def test_from_emission() -> None:
    """A spec send emission becomes the matching message; anything else is refused."""
    em = Emission("send", {"channel": "abort", "index": [2, 1], "epoch": 5})
    assert from_emission(em) == Abort(2, 1, 5)
    em = Emission("send", {"channel": "alloc", "index": [0, 0], "epoch": 1})
    assert from_emission(em, rid=7, n_tokens=3) == Alloc(0, 0, 1, 7, 3)
    with pytest.raises(MessageError, match="not a send"):
        from_emission(Emission("post_write", {"slot": 0}))


def test_config_validation_and_json() -> None:
    """Bad values are named; to_json/from_json round-trip; unknown keys are refused."""
    cfg = PDConfig(variant="unfixed", slots=3, writers=2, bytes_per_token=32, delay_ms=None)
    assert PDConfig.from_json(cfg.to_json()) == cfg
    assert cfg.faults(0) is None and PDConfig().faults(1).seed != PDConfig().faults(0).seed
    with pytest.raises(ValueError, match="variant='other'"):
        PDConfig(variant="other")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bytes_per_token=20"):
        PDConfig(bytes_per_token=20)
    with pytest.raises(ValueError, match="slots=0"):
        PDConfig(slots=0)
    with pytest.raises(ValueError, match="unknown keys"):
        PDConfig.from_json('{"nope": 1}')
    with pytest.raises(ValueError, match="malformed"):
        PDConfig.from_json("{")


def test_kv_content_detects_any_foreign_chunk() -> None:
    """A slot filled with request A's KV verifies for A; one chunk of request B is detected."""
    cfg = PDConfig(slots=2, writers=2, layers=3, tokens_per_slot=8, bytes_per_token=32)
    pool = KVPool(cfg)
    mem = pool.buffer

    def fill(rid: int, w: int, layer: int, n: int) -> None:
        data = kv_chunk(rid, w, layer, n, cfg.words_per_writer)
        o = offset(cfg, 1, w, layer)
        mem[o:o + data.nbytes] = data.tobytes()

    for w in range(2):
        for layer in range(3):
            fill(10, w, layer, 5)
    assert pool.bad_bytes(1, 10, 5) == 0
    assert pool.bad_bytes(1, 11, 5) > 0
    fill(11, 1, 2, 2)                          # a stale 2-token chunk of another request
    assert pool.bad_bytes(1, 10, 5) > 0
    assert np.array_equal(expected_kv(10, 5, cfg)[0, 0].reshape(-1), kv_chunk(10, 0, 0, 5, cfg.words_per_writer))
    with pytest.raises(ValueError, match="layer=3"):
        offset(cfg, 0, 0, 3)
    with pytest.raises(ValueError, match="n_tokens=9"):
        pool.bad_bytes(0, 1, 9)


def test_vllm_connector_messages_use_the_one_validator() -> None:
    """The connector's channel has the same codec over its own set: kv_slot's abort/safe are the very
    classes PD uses (no copy to drift), its Alloc carries its own payload and PD's Done its own (the
    prompt's hidden state), PD plumbing is refused."""
    from kvproof.runtime.pd.messages import Hello, Submit
    from kvproof.runtime.vllm_connector import messages as vm
    assert vm.MessageError is MessageError
    assert (vm.Abort, vm.Safe) == (Abort, Safe)                         # one class per spec channel and payload
    assert vm.Done is not Done and vm.Done.TYPE == Done.TYPE == "done"
    assert vm.Alloc is not Alloc and vm.Alloc.TYPE == Alloc.TYPE == "alloc"
    assert vm.decode(vm.encode(vm.Alloc(1, 0, 2, "req-1", [3, 4]))) == vm.Alloc(1, 0, 2, "req-1", [3, 4])
    assert vm.decode(vm.encode(Abort(0, 1, 2))) == Abort(0, 1, 2)     # kv_slot's abort, whichever runtime built it
    with pytest.raises(MessageError, match="hidden"):
        vm.decode(encode(Done(0, 1, 2, "AAAA")))                       # PD's done payload is not the connector's
    with pytest.raises(MessageError, match=r"field 'slot'=-1, expected an int >= 0"):
        vm.decode({"type": "done", "slot": -1, "writer": 0, "epoch": 0})
    with pytest.raises(MessageError, match="expected one of"):
        vm.decode({"type": "submit", "rid": 0, "n_tokens": 1})          # a pd message is not a vLLM one
    with pytest.raises(MessageError, match="missing fields \\['blocks', 'req'\\]"):
        vm.decode(encode(Alloc(0, 0, 1, 7, 3)))                      # PD's alloc payload is not the connector's
    for foreign in (Alloc(0, 0, 1, 7, 3), Submit(1, 8), Hello(0)):
        with pytest.raises(MessageError, match="not a vllm-connector control message type"):
            vm.encode(foreign)


def test_spec_messages_are_derived_from_the_spec_channels() -> None:
    """Each kv_slot channel's message has exactly the channel's index fields and the epoch (then the
    runtime's payload): adding a channel or an index field to the spec changes the wire class."""
    from dataclasses import fields
    from typing import Optional

    from kvproof.runtime.transport.messages import SpecMessage, receive_args, spec_message
    from kvproof.runtime.vllm_connector import messages as vm
    from kvproof.spec.kv_slot import KVSlot
    for name, ch in KVSlot.channels.items():
        cls = MESSAGE_TYPES[name]
        assert issubclass(cls, SpecMessage) and cls.PROTOCOL is KVSlot
        assert [f.name for f in fields(cls)][:len(ch.index) + 1] == [*ch.index, "epoch"]
        assert vm.VLLM.types[name].__mro__[1] is SpecMessage
    assert [f.name for f in fields(Alloc)][3:] == ["rid", "n_tokens", "tokens", "corrupt"]
    assert spec_message(KVSlot, "done", hidden=(Optional[str], None)) is Done        # one class per payload
    assert spec_message(KVSlot, "done") is vm.Done and vm.Done is not Done
    assert receive_args(Safe(3, 1, 2), "on_safe") == {"s": 3, "w": 1, "e": 2}
    assert receive_args(Abort(3, 1, 2), "p_on_abort_busy") == {"s": 3, "w": 1, "e": 2}
    with pytest.raises(MessageError, match="does not receive 'safe'"):
        receive_args(Safe(3, 1, 2), "on_done")
    with pytest.raises(MessageError, match="no channel 'bogus'"):
        spec_message(KVSlot, "bogus")
    with pytest.raises(MessageError, match="channel's own fields"):
        spec_message(KVSlot, "abort", epoch=int)


def test_events_batch_round_trips_and_validates_each_item() -> None:
    from kvproof.runtime.pd.messages import Event, Events, events_of
    ev = {"request_id": "a", "tokens": [1, 2], "finished": False}
    msg = decode_message(json.loads(json.dumps(encode(Events([[3, ev], [4, ev]])))))
    assert isinstance(msg, Events)
    assert events_of(msg) == [Event(3, ev), Event(4, ev)]
    with pytest.raises(MessageError, match="expected an int >= 0"):
        events_of(Events([[-1, ev]]))
    with pytest.raises(MessageError, match=r"expected \[rid, event\]"):
        events_of(Events([[3]]))


def test_done_hidden_state_round_trips_and_a_malformed_one_is_named() -> None:
    """The prompt's last hidden state rides on Done as base64 of the model dtype's bytes; decode refuses
    one that is not base64 or has the wrong size, naming the field and the size it expected."""
    import torch

    from kvproof.runtime.model.config import ModelConfig
    from kvproof.runtime.pd.kv_export import hidden_from_wire, hidden_to_wire
    mc = ModelConfig()
    h = torch.randn(mc.hidden, dtype=mc.torch_dtype)
    msg = decode_message(json.loads(json.dumps(encode(Done(1, 0, 3, hidden_to_wire(h))))))
    assert torch.equal(hidden_from_wire(msg.hidden, mc), h)                # bit for bit
    with pytest.raises(ValueError, match="field 'hidden' is not base64"):
        hidden_from_wire("not base64!", mc)
    with pytest.raises(ValueError, match=rf"field 'hidden' has 8 bytes, expected {h.numel() * h.element_size()}"):
        hidden_from_wire(hidden_to_wire(h[:8 // h.element_size()]), mc)
