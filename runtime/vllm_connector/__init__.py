"""kvproof's KV slot protocol inside vLLM: a push KV connector, its proxy and its benchmark.

`KVProofConnector` (connector.py) is what vLLM loads from
``--kv-transfer-config '{"kv_connector":"KVProofConnector",
"kv_connector_module_path":"kvproof.runtime.vllm_connector",...}'``; it is imported
lazily so that the proxy, the config and the protocol sides work without vLLM.
"""
from __future__ import annotations

from typing import Any

__all__ = ["KVProofConnector"]


def __getattr__(name: str) -> Any:
    """Import the vLLM-facing connector class only when vLLM asks for it."""
    if name == "KVProofConnector":
        from kvproof.runtime.vllm_connector.connector import KVProofConnector

        return KVProofConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
