"""Where each KV block of a vLLM layer cache lies in memory: byte ranges one-sided writes target."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LayerLayout:
    """One layer's paged KV tensor as a byte region: `parts` byte runs per block (K and V, ...)."""

    name: str
    nbytes: int              # bytes of the region (the tensor's storage, from its start)
    base: int                # byte offset of element 0 within the region
    num_blocks: int
    block_stride: int        # bytes between block b and b+1
    part_offsets: tuple      # byte offset of each part (K, V, ...) of block 0 relative to base
    part_bytes: int          # contiguous bytes of one part of one block

    def to_json(self) -> dict:
        """Plain-JSON form (sent in the connection hello)."""
        return {**asdict(self), "part_offsets": list(self.part_offsets)}

    @classmethod
    def from_json(cls, d: dict) -> "LayerLayout":
        """Inverse of to_json."""
        return cls(**{**d, "part_offsets": tuple(d["part_offsets"])})

    def ranges(self, block: int) -> list[tuple[int, int]]:
        """(offset, length) of each contiguous part of `block` within the region."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"layer {self.name}: block={block}, expected 0 <= block < {self.num_blocks}")
        return [(self.base + p + block * self.block_stride, self.part_bytes) for p in self.part_offsets]


def layout_of(name: str, t: torch.Tensor, num_blocks: int) -> LayerLayout:
    """Find the block dimension of a paged KV tensor (the dim of size num_blocks) and its byte runs."""
    dims = [d for d, n in enumerate(t.shape) if n == num_blocks]
    if not dims:
        raise ValueError(f"layer {name}: KV tensor of shape {tuple(t.shape)} has no dimension of "
                         f"size num_blocks={num_blocks}")
    bd, item = dims[0], t.element_size()
    inner = t.shape[bd + 1:]
    part = math.prod(inner) * item
    # the inner dims must be one contiguous run, so a block part is one write
    want = 1
    for d in range(t.dim() - 1, bd, -1):
        if t.shape[d] > 1 and t.stride(d) != want:
            raise ValueError(f"layer {name}: dims after the block dim are not contiguous "
                             f"(shape {tuple(t.shape)}, stride {t.stride()})")
        want *= t.shape[d]
    offsets = [0]
    for d in range(bd):                     # every index of the dims before the block dim
        offsets = [o + i * t.stride(d) * item for o in offsets for i in range(t.shape[d])]
    storage = t.untyped_storage()
    return LayerLayout(name, storage.nbytes(), t.storage_offset() * item, num_blocks,
                       t.stride(bd) * item, tuple(offsets), part)


def region_tensor(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage of `t` (what the transport registers or reads)."""
    flat = torch.empty(0, dtype=torch.uint8)
    flat.set_(t.untyped_storage())
    return flat
