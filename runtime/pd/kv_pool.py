"""The decode-side paged KV pool and the synthetic KV content prefill computes.

Layout: one contiguous uint8 region `[slot, writer, layer, token, byte]`, so the
part of one slot that one prefill rank owns for one layer is contiguous: a
request's layer-l KV from writer w is one write of n_tokens * bytes_per_writer
bytes at `offset(slot, w, l)`. The whole array is registered once on every
writer's data connection (region 0).

Content is a known function of (request id, writer, layer, token, word): each
64-bit word is a splitmix64 hash of its coordinates, so a byte written for any
other request (or any other layer/token) is detected by comparison.
"""

from __future__ import annotations

import numpy as np

from kvproof.runtime.pd.config import PDConfig

POOL_REGION = 0
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _seed(rid: int, writer: int, layer: int) -> int:
    """A well-spread 64-bit start value per (request, writer, layer)."""
    x = ((rid * 0x9E3779B97F4A7C15) ^ (writer << 48) ^ (layer << 32)) & _MASK
    return int(_mix(np.array([x], dtype=np.uint64))[0])


def kv_chunk(rid: int, writer: int, layer: int, n_tokens: int, words: int) -> np.ndarray:
    """The KV bytes writer `writer` computes for one layer of request rid: uint8 [n_tokens * words * 8]."""
    idx = np.arange(n_tokens * words, dtype=np.uint64)                        # [T * words]
    return _mix(idx + np.uint64(_seed(rid, writer, layer))).view(np.uint8)


def expected_kv(rid: int, n_tokens: int, cfg: PDConfig) -> np.ndarray:
    """Every writer's and layer's KV of request rid: uint8 [writers, layers, n_tokens, bytes_per_writer]."""
    seeds = np.array([[_seed(rid, w, l) for l in range(cfg.layers)] for w in range(cfg.writers)],
                     dtype=np.uint64)                                           # [W, L]
    idx = np.arange(n_tokens * cfg.words_per_writer, dtype=np.uint64)          # [T * words]
    words = _mix(seeds[:, :, None] + idx[None, None, :])                       # [W, L, T * words]
    return words.view(np.uint8).reshape(cfg.writers, cfg.layers, n_tokens, cfg.bytes_per_writer)


class KVPool:
    """Fixed-size KV slots, as one registered uint8 array [slot, writer, layer, token, byte]."""

    def __init__(self, cfg: PDConfig) -> None:
        self.cfg = cfg
        self.array = np.zeros((cfg.slots, cfg.writers, cfg.layers, cfg.tokens_per_slot, cfg.bytes_per_writer),
                              dtype=np.uint8)                                   # [S, W, L, T, Bw]

    @property
    def buffer(self) -> memoryview:
        """The whole pool as one flat writable byte view (what transports register)."""
        return memoryview(self.array.reshape(-1))

    def offset(self, slot: int, writer: int, layer: int) -> int:
        """Byte offset of (slot, writer, layer)'s token 0 in the pool region."""
        return offset(self.cfg, slot, writer, layer)

    def bad_bytes(self, slot: int, rid: int, n_tokens: int) -> int:
        """Decode's read of a slot: how many of request rid's KV bytes differ from what prefill computed."""
        if not 0 <= slot < self.cfg.slots:
            raise ValueError(f"slot={slot}, expected 0 <= slot < {self.cfg.slots}")
        if not 1 <= n_tokens <= self.cfg.tokens_per_slot:
            raise ValueError(f"n_tokens={n_tokens}, expected 1..{self.cfg.tokens_per_slot}")
        got = self.array[slot, :, :, :n_tokens]                                # [W, L, n, Bw]
        return int(np.count_nonzero(got != expected_kv(rid, n_tokens, self.cfg)))


def offset(cfg: PDConfig, slot: int, writer: int, layer: int) -> int:
    """Byte offset of (slot, writer, layer) in the pool region (both sides compute it)."""
    for name, v, n in (("slot", slot, cfg.slots), ("writer", writer, cfg.writers), ("layer", layer, cfg.layers)):
        if not 0 <= v < n:
            raise ValueError(f"{name}={v}, expected 0 <= {name} < {n}")
    return ((slot * cfg.writers + writer) * cfg.layers + layer) * cfg.tokens_per_slot * cfg.bytes_per_writer
