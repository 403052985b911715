"""The paged KV cache of the DSA decoder (its pages are owned by `page_pool.PagePool`, re-exported here).

Per layer and page the cache holds, for each of `page_size` token positions, the
compressed KV row `[latent c | RoPE key]` and the lightning-indexer key. With the
Triton backend the indexer keys also live in the kernels' fp8 layout
(`kernels/common.indexer_fp8_layout`), which is what the indexer kernel reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvproof.runtime.model.config import ModelConfig
from kvproof.runtime.model.page_pool import PagePool

__all__ = ["KVCache", "PagePool", "write_index_keys", "write_rows"]


def write_rows(kv: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Store KV rows [T, kv_width] at flat slots [T] of one layer's pages kv [P, S, kv_width]."""
    kv.view(-1, kv.shape[-1])[slots] = rows.to(kv.dtype)


def write_index_keys(ik: torch.Tensor, ik_fp8: torch.Tensor | None, slots: torch.Tensor, keys: torch.Tensor
                     ) -> None:
    """Store indexer keys [T, index_dim] at flat slots [T] of one layer: ik [P, S, index_dim] and, when
    kept, the kernels' fp8 pages ik_fp8 [P, page_bytes]."""
    S, D = ik.shape[1], ik.shape[2]
    ik.view(-1, D)[slots] = keys.to(ik.dtype)
    if ik_fp8 is not None:
        from kvproof.kernels.common import indexer_views, quantize_fp8
        fkeys, scales = indexer_views(ik_fp8, S, D)
        q, s = quantize_fp8(keys)                                          # [T, D] fp8, [T, NB]
        fkeys[slots // S, slots % S] = q
        scales[slots // S, slots % S] = s


@dataclass
class KVCache:
    """Cache tensors of every layer: kv [L, P, S, kv_width], index keys [L, P, S, index_dim].

    `layers` stores that many layers instead of the model's (a LayerSplit rank's share or its
    receive buffers, `layersplit.split_cache.SplitKVCache`); the methods taking a layer index it then
    by position, and export/import (PD) need every layer.
    """

    cfg: ModelConfig
    num_pages: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fp8_indexer: bool = False          # also keep the indexer keys in the kernels' fp8 layout
    layers: int | None = None          # stored layers (None: the model's n_layers)

    def __post_init__(self) -> None:
        c = self.cfg
        n = c.n_layers if self.layers is None else self.layers
        shape = (n, self.num_pages, c.page_size)
        self.kv = torch.zeros(*shape, c.kv_width, dtype=c.torch_dtype, device=self.device)
        self.ik = torch.zeros(*shape, c.index_dim, dtype=c.torch_dtype, device=self.device)
        self.ik_fp8: torch.Tensor | None = None
        if self.fp8_indexer:
            from kvproof.kernels.common import indexer_fp8_layout
            lay = indexer_fp8_layout(c.page_size, c.index_dim)
            self.ik_fp8 = torch.zeros(n, self.num_pages, lay.page_bytes, dtype=torch.uint8, device=self.device)

    def nbytes(self) -> dict[str, int]:
        """Bytes held: KV rows and indexer keys (float and, when kept, fp8 pages)."""
        idx = [self.ik] + ([self.ik_fp8] if self.ik_fp8 is not None else [])
        return {"kv_bytes": self.kv.numel() * self.kv.element_size(),
                "indexer_bytes": sum(t.numel() * t.element_size() for t in idx)}

    @staticmethod
    def pages_for_budget(cfg: ModelConfig, budget_bytes: int) -> int:
        """How many pages fit in `budget_bytes`."""
        return max(1, budget_bytes // (cfg.kv_bytes_per_token * cfg.page_size))

    def write(self, layer: int, slots: torch.Tensor, kv: torch.Tensor, ik: torch.Tensor) -> None:
        """Store kv [T, kv_width] and index keys [T, index_dim] at flat slots [T] (page * S + offset)."""
        write_rows(self.kv[layer], slots, kv)
        write_index_keys(self.ik[layer], None if self.ik_fp8 is None else self.ik_fp8[layer], slots, ik)

    def layer_index(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The indexer keys of one layer: (ik [P, S, index_dim], ik_fp8 [P, page_bytes] or None)."""
        return self.ik[layer], None if self.ik_fp8 is None else self.ik_fp8[layer]

    @property
    def token_bytes(self) -> int:
        """Bytes of one token of one layer in the export format: [kv row | indexer key] in the cache dtype."""
        return (self.cfg.kv_width + self.cfg.index_dim) * self.kv.element_size()

    def _token_slots(self, pages: list[int], n_tokens: int) -> torch.Tensor:
        S = self.cfg.page_size
        if n_tokens > len(pages) * S:
            raise ValueError(f"{n_tokens} tokens do not fit in {len(pages)} pages of {S}")
        pos = torch.arange(n_tokens)
        return torch.tensor(pages, dtype=torch.long)[pos // S] * S + pos % S           # [n]

    def export_tokens(self, pages: list[int], n_tokens: int) -> torch.Tensor:
        """The first n_tokens of a sequence's pages, every layer, as bytes uint8 [L, n, token_bytes]."""
        slots = self._token_slots(pages, n_tokens).to(self.kv.device)
        L = self.kv.shape[0]
        kv = self.kv.view(L, -1, self.cfg.kv_width)[:, slots]                           # [L, n, W]
        ik = self.ik.view(L, -1, self.cfg.index_dim)[:, slots]                          # [L, n, DI]
        return torch.cat([kv, ik], dim=-1).contiguous().view(torch.uint8)               # [L, n, token_bytes]

    def import_tokens(self, pages: list[int], data: torch.Tensor) -> None:
        """Write bytes from export_tokens (uint8 [L, n, token_bytes]) into positions 0..n-1 of `pages`."""
        L, W = self.kv.shape[0], self.cfg.kv_width
        if data.dtype != torch.uint8 or data.dim() != 3 or data.shape[0] != L or data.shape[2] != self.token_bytes:
            raise ValueError(f"KV bytes must be uint8 [{L}, n, {self.token_bytes}], got {data.dtype} "
                             f"{tuple(data.shape)}")
        slots = self._token_slots(pages, data.shape[1]).to(self.kv.device)
        rows = data.contiguous().view(self.kv.dtype)                                      # [L, n, W + DI]
        for layer in range(L):
            self.write(layer, slots, rows[layer, :, :W], rows[layer, :, W:])

    def corrupt(self, pages: list[int], n_tokens: int, seed: int = 0) -> int:
        """Flip bytes in the first n_tokens of the given pages (fault injection); returns bytes flipped.

        Flips the byte holding the high mantissa / low exponent bits of random elements, which
        scales a value by up to 2^±15: the garbage stays finite, like foreign KV would.
        """
        g = torch.Generator().manual_seed(seed)
        S, flipped = self.cfg.page_size, 0
        esz = self.kv.element_size()
        for i, p in enumerate(pages):
            n = min(S, n_tokens - i * S)
            if n <= 0:
                break
            for t in (self.kv, self.ik):
                raw = t[:, p, :n].contiguous().view(torch.uint8)             # [L, n, W * esz]
                sel = (torch.rand(raw.shape[:-1] + (raw.shape[-1] // esz,), generator=g) < 0.5).to(raw.device)
                byte = raw.view(*raw.shape[:-1], -1, esz)[..., esz - 2]       # high mantissa byte
                byte ^= (sel.to(torch.uint8) * 0x5A)
                flipped += int(sel.sum())
                fixed = torch.nan_to_num(raw.view(t.dtype), nan=0.0, posinf=1e4, neginf=-1e4)
                t[:, p, :n] = fixed
        return flipped
