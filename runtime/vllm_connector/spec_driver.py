"""How both connector sides drive their kv_slot spec instance: fire, count what the spec refused, send what it emits."""
from __future__ import annotations

from collections import Counter
from typing import Any

from kvproof.runtime.vllm_connector.messages import from_emission
from kvproof.spec.instance import Instance


class SpecDriver:
    """Mixin for a side holding `inst` (its spec instance): `_counts` says where refusals go, `_send` sends a message."""

    inst: Instance

    @property
    def _counts(self) -> Counter:
        raise NotImplementedError(f"{type(self).__name__} names no stats counter")

    def _send(self, msg: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot send control messages")

    def _try(self, action: str, **args: int) -> bool:
        """Fire `action` when the spec allows it (guards evaluated once); else count it as ignored."""
        f = self.inst.try_fire(action, **args)
        if f:
            self._emit(f.emissions)
        else:
            self._counts[f"ignored_{action}"] += 1
        return bool(f)

    def _fire(self, action: str, **args: int) -> None:
        """Fire `action`, which the spec must allow, and send what it emits."""
        self._emit(self.inst.fire(action, **args))

    def _emit(self, emissions: list) -> None:
        for em in emissions:
            if em.kind == "send":
                self._send(from_emission(em))
