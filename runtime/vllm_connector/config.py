"""Configuration of the vLLM KV connector: `kv_connector_extra_config`, checked, frozen."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from kvproof.spec.kv_slot import KVSlot

# "prefix" is the deprecated name of the pre-fix variant (it collided with prefix caching).
_VARIANTS = {"fixed": "fixed", "unfixed": "unfixed", "prefix": "unfixed"}


def spec_variant(variant: str) -> str:
    """The KV slot spec's own name for a connector variant (the spec may still call it 'prefix')."""
    name = _VARIANTS.get(variant)
    if name is None:
        raise ValueError(f"kv_connector_extra_config: variant={variant!r}, expected 'fixed' or 'unfixed'")
    if name not in KVSlot.variants:
        name = "prefix" if name == "unfixed" and "prefix" in KVSlot.variants else name
    return name


@dataclass(frozen=True)
class ConnectorConfig:
    """What `kv_connector_extra_config` may set; every field has a working default."""

    variant: str = "fixed"                  # fixed | unfixed (pre-fix negative control; alias: prefix)
    slots: int = 64                         # decode's slot table: requests receiving KV at once
    prefill_ranks: int = 1                  # writers per slot: the prefill instance's TP ranks
    host: str = "127.0.0.1"                 # prefill: address its listeners bind to
    port: int = 0                           # prefill: first control port (0: any free port)
    trace_dir: str | None = None            # JSON Lines traces for `kvproof audit` (and event logs)
    write_delay_ms: float | None = None     # prefill fault injection: late-landing writes
    write_delay_prob: float = 1.0
    write_delay_dist: str = "fixed"         # fixed | uniform (U(0, 2*delay)) | exponential: reorders writes
    fault_seed: int | None = None
    transfer_timeout_s: float = 60.0        # decode: a transfer not done by then is terminated
    hold_timeout_s: float = 120.0           # prefill: KV no decode asked for is released then

    def __post_init__(self) -> None:
        spec_variant(self.variant)
        for name in ("slots", "prefill_ranks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"kv_connector_extra_config: {name}={v!r}, expected an int >= 1")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"kv_connector_extra_config: port={self.port!r}, expected 0..65535")
        if self.write_delay_ms is not None and not self.write_delay_ms >= 0:
            raise ValueError(f"kv_connector_extra_config: write_delay_ms={self.write_delay_ms!r}, "
                             "expected None or >= 0")
        if not 0.0 <= self.write_delay_prob <= 1.0:
            raise ValueError(f"kv_connector_extra_config: write_delay_prob={self.write_delay_prob!r}, "
                             "expected a probability in [0, 1]")
        if self.write_delay_dist not in ("fixed", "uniform", "exponential"):
            raise ValueError(f"kv_connector_extra_config: write_delay_dist={self.write_delay_dist!r}, "
                             "expected fixed, uniform or exponential")
        for name in ("transfer_timeout_s", "hold_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"kv_connector_extra_config: {name}={getattr(self, name)!r}, expected > 0")

    @property
    def spec_params(self) -> dict[str, int]:
        """Instance parameters of the KV slot protocol."""
        return {"slots": self.slots, "writers": self.prefill_ranks}

    @property
    def spec_variant(self) -> str:
        """The spec's variant name."""
        return spec_variant(self.variant)

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "ConnectorConfig":
        """Build from vLLM's `kv_connector_extra_config`; unknown keys are an error naming the known ones."""
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kv_connector_extra_config: unknown keys {unknown}; expected some of {sorted(known)}")
        return cls(**extra)
