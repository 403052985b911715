"""Configuration of a prefill/decode (PD) disaggregated deployment: one frozen dataclass.

The decode KV pool is `slots` fixed-size slots; each slot holds up to
`tokens_per_slot` tokens of `layers` layers. Each of the `writers` prefill ranks
owns a disjoint part of every token's KV (`bytes_per_token / writers` bytes, as
tensor-parallel ranks own disjoint heads) and pushes it layer by layer: one
one-sided write (chunk) per layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from kvproof.runtime.transport import FaultConfig
from kvproof.spec.core import variant_name

Variant = Literal["fixed", "unfixed"]


@dataclass(frozen=True)
class PDConfig:
    """Everything a decode or prefill process needs to know about the deployment."""

    variant: Variant = "fixed"
    slots: int = 16
    writers: int = 2
    layers: int = 4                      # one chunk (one write) per layer per writer
    tokens_per_slot: int = 64
    bytes_per_token: int = 256           # per layer, all writers together
    transport: str = "tcp"               # tcp | mooncake | verbs (see docs/transports.md)
    delay_ms: float | None = 2.0         # mean injected delay of a KV write; None: none
    delay_dist: Literal["fixed", "exponential", "uniform"] = "exponential"
    transfer_timeout_s: float = 5.0      # decode gives up waiting for a slot's KV after this
    decode_ms: float = 0.0               # how long decode reads a READY slot before finishing
    heartbeat_timeout_s: float = 5.0     # control-channel silence that means a dead peer
    drain_timeout_s: float = 10.0        # at shutdown, wait this long for aborting slots
    seed: int = 0
    trace_dir: str | None = None         # one JSON Lines trace per process when set
    drop_rank: int | None = None         # fault: this prefill rank's data connection is dropped ...
    drop_after_writes: int | None = None  # ... once it sent this many writes

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", variant_name(self.variant))
        if self.variant not in ("fixed", "unfixed"):
            raise ValueError(f"variant={self.variant!r}, expected 'fixed' or 'unfixed'")
        for name in ("slots", "writers", "layers", "tokens_per_slot", "bytes_per_token"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}, expected an int >= 1")
        if self.bytes_per_token % (8 * self.writers):
            raise ValueError(f"bytes_per_token={self.bytes_per_token}, expected a multiple of "
                             f"8 * writers = {8 * self.writers} (whole 64-bit words per writer)")
        if self.delay_ms is not None and not self.delay_ms >= 0:
            raise ValueError(f"delay_ms={self.delay_ms!r}, expected None or >= 0")
        for name in ("transfer_timeout_s", "heartbeat_timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}, expected > 0")
        if self.transport not in ("tcp", "mooncake", "verbs", "loopback"):   # loopback: in-process tests
            raise ValueError(f"transport={self.transport!r}, expected 'tcp', 'mooncake' or 'verbs'")
        if (self.drop_rank is None) != (self.drop_after_writes is None):
            raise ValueError(f"drop_rank={self.drop_rank!r}, drop_after_writes={self.drop_after_writes!r}: "
                             f"expected both set (a rank and a write count) or both None")
        if self.drop_rank is not None and not 0 <= self.drop_rank < self.writers:
            raise ValueError(f"drop_rank={self.drop_rank!r}, expected 0 <= rank < writers={self.writers}")
        if not self.decode_ms >= 0:
            raise ValueError(f"decode_ms={self.decode_ms!r}, expected >= 0")

    # ---------------------------------------------------------------- derived
    @property
    def spec_params(self) -> dict[str, int]:
        """Instance parameters of the KV slot protocol."""
        return {"slots": self.slots, "writers": self.writers}

    @property
    def bytes_per_writer(self) -> int:
        """Bytes of one token's KV, per layer, that one prefill rank owns."""
        return self.bytes_per_token // self.writers

    @property
    def words_per_writer(self) -> int:
        """bytes_per_writer in 64-bit words."""
        return self.bytes_per_writer // 8

    @property
    def slot_bytes(self) -> int:
        """Bytes of one KV slot (all writers, all layers, all tokens)."""
        return self.layers * self.tokens_per_slot * self.bytes_per_token

    @property
    def pool_bytes(self) -> int:
        """Bytes of the whole decode KV pool."""
        return self.slots * self.slot_bytes

    def request_bytes(self, n_tokens: int) -> int:
        """KV bytes a request of n_tokens moves from prefill to decode."""
        return self.layers * n_tokens * self.bytes_per_token

    def faults(self, rank: int) -> FaultConfig | None:
        """The faults of prefill rank `rank`'s connection: write delays (own random stream), a drop."""
        drop = self.drop_after_writes if rank == self.drop_rank else None
        if self.delay_ms is None and drop is None:
            return None
        return FaultConfig(delay_ms=self.delay_ms, delay_dist=self.delay_dist, drop_after_writes=drop,
                           seed=self.seed * 1009 + rank + 1)

    # ---------------------------------------------------------------- (de)serialization
    def to_json(self) -> str:
        """The config as a JSON object (passed to worker processes on their command line)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PDConfig":
        """Parse to_json's output; unknown or missing keys are an error naming them."""
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"PDConfig JSON is malformed: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"PDConfig JSON is a {type(raw).__name__}, expected an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"PDConfig JSON has unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**raw)
