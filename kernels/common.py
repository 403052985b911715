"""Shared pieces of the DSA kernels: paged-cache layouts, fp8 block quantisation, views.

A paged cache pool holds, per layer, `num_pages` pages of `page_size` tokens. Inside
a page the bytes of each *plane* are stored one after the other (page-split), each
plane holding a fixed number of bytes per token:

    KV bf16      one plane of 1152 B/token   (512 latent + 64 RoPE, bf16)
    KV fp8       one plane of  656 B/token   (512 fp8 + 4 fp32 scales + 64 RoPE bf16)
    Indexer fp8  two planes: 128 B/token of fp8 e4m3 keys, then 4 B/token fp32 scale

so a token's bytes sit at `page * page_bytes + plane_offset(i) + slot * plane_bytes[i]`.
Nothing here runs at import time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0            # largest finite e4m3fn value
FP8_BLOCK = 128            # elements sharing one fp32 scale
KV_LATENT_DIM = 512
KV_ROPE_DIM = 64
INDEXER_HEADS = 32
INDEXER_DIM = 128
DEFAULT_PAGE_SIZE = 64
DEFAULT_TOPK = 2048


@dataclass(frozen=True)
class PagedLayout:
    """Byte layout of one page of one layer of a paged cache."""

    name: str
    page_size: int
    plane_bytes: tuple[int, ...]   # bytes per token of each plane, in page order

    def __post_init__(self) -> None:
        assert self.page_size > 0, f"page_size must be positive, got {self.page_size}"
        assert self.plane_bytes and all(b > 0 for b in self.plane_bytes), (
            f"plane_bytes must be non-empty positive sizes, got {self.plane_bytes}")

    @property
    def token_bytes(self) -> int:
        """Bytes one token occupies across all planes (one row of a packed buffer)."""
        return sum(self.plane_bytes)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer."""
        return self.page_size * self.token_bytes

    def plane_offset(self, i: int) -> int:
        """Byte offset of plane `i` inside a page."""
        return self.page_size * sum(self.plane_bytes[:i])

    def column_offset(self, i: int) -> int:
        """Byte offset of plane `i` inside one token row of a packed buffer."""
        return sum(self.plane_bytes[:i])


def kv_bf16_layout(page_size: int = DEFAULT_PAGE_SIZE) -> PagedLayout:
    """Latent KV in bf16: [latent 512 | rope 64] per token, 1152 B."""
    return PagedLayout("kv_bf16", page_size, (2 * (KV_LATENT_DIM + KV_ROPE_DIM),))


def kv_fp8_layout(page_size: int = DEFAULT_PAGE_SIZE) -> PagedLayout:
    """Latent KV in fp8: [512 fp8 | 4 fp32 scales | 64 bf16 rope] per token, 656 B."""
    return PagedLayout("kv_fp8", page_size,
                       (KV_LATENT_DIM + 4 * (KV_LATENT_DIM // FP8_BLOCK) + 2 * KV_ROPE_DIM,))


def indexer_fp8_layout(page_size: int = DEFAULT_PAGE_SIZE, dim: int = INDEXER_DIM) -> PagedLayout:
    """Indexer keys: a plane of fp8 keys then a plane of fp32 scales (one per 128), 132 B/token."""
    assert dim % FP8_BLOCK == 0 or dim < FP8_BLOCK, f"dim must be a multiple of {FP8_BLOCK}, got {dim}"
    return PagedLayout("indexer_fp8", page_size, (dim, 4 * max(1, dim // FP8_BLOCK)))


# ---------------------------------------------------------------------------------
# fp8 block quantisation (torch references)
# ---------------------------------------------------------------------------------

def quantize_fp8(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last dim of `x` to fp8 e4m3 with one fp32 scale per `block` elements."""
    d = x.shape[-1]
    block = min(block, d)
    assert d % block == 0, f"x last dim {d} must be a multiple of block {block}"
    xb = x.float().reshape(*x.shape[:-1], d // block, block)                 # [..., NB, block]
    # Scale strictly positive: the indexer relies on relu(s * a) == s * relu(a).
    scale = (xb.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-8)               # [..., NB]
    q = (xb / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(x.shape), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_fp8, in fp32."""
    d, nb = q.shape[-1], scale.shape[-1]
    assert d % nb == 0, f"q last dim {d} must be a multiple of the scale count {nb}"
    qb = q.float().reshape(*q.shape[:-1], nb, d // nb)
    return (qb * scale[..., None].float()).reshape(q.shape)


def kv_fp8_token_bytes(dl: int = KV_LATENT_DIM, dr: int = KV_ROPE_DIM) -> int:
    """Bytes per token of the fp8 KV layout: dl fp8 | dl/128 fp32 scales | dr bf16."""
    assert dl % FP8_BLOCK == 0, f"fp8 KV latent dim must be a multiple of {FP8_BLOCK}, got {dl}"
    return dl + 4 * (dl // FP8_BLOCK) + 2 * dr


def quantize_kv_fp8(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Pack latent c [..., dl] (fp8 + per-128 scales) and rope r [..., dr] (bf16) into uint8 rows."""
    q, scale = quantize_fp8(c)                                                # [..., dl], [..., dl/128]
    parts = [q.view(torch.uint8), scale.float().contiguous().view(torch.uint8),
             r.to(torch.bfloat16).contiguous().view(torch.uint8)]
    return torch.cat(parts, dim=-1)                                           # [..., token_bytes]


def dequantize_kv_fp8(rows: torch.Tensor, dl: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of quantize_kv_fp8: (c fp32 [..., dl], r fp32 [..., dr])."""
    nb = dl // FP8_BLOCK
    q = rows[..., :dl].contiguous().view(FP8_DTYPE)
    scale = rows[..., dl: dl + 4 * nb].contiguous().view(torch.float32)
    r = rows[..., dl + 4 * nb:].contiguous().view(torch.bfloat16)
    return dequantize_fp8(q, scale), r.float()


# ---------------------------------------------------------------------------------
# Views into paged pools
# ---------------------------------------------------------------------------------

def pool_bytes(pool: torch.Tensor, layout: PagedLayout, name: str = "pool") -> torch.Tensor:
    """View a pool shaped [L, P, ...] (page bytes contiguous) as uint8 [L, P, page_bytes]."""
    assert pool.dim() >= 3, f"{name} must be [layers, pages, ...], got shape {tuple(pool.shape)}"
    L, P = pool.shape[0], pool.shape[1]
    assert pool[0, 0].is_contiguous(), (
        f"{name} pages must be contiguous in their trailing dims, got stride {pool.stride()}")
    # view, never reshape: a silent copy would make scatter write into a temporary.
    u8 = pool.view(L, P, -1).view(torch.uint8)
    assert u8.shape[-1] == layout.page_bytes, (
        f"{name} has {u8.shape[-1]} bytes per page, layout {layout.name} expects {layout.page_bytes}")
    return u8


def indexer_views(cache: torch.Tensor, page_size: int, dim: int = INDEXER_DIM
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split one layer of an fp8 indexer cache (uint8 [P, page_bytes]) into keys and scales."""
    layout = indexer_fp8_layout(page_size, dim)
    assert cache.dtype == torch.uint8 and cache.dim() == 2, (
        f"indexer cache must be uint8 [pages, page_bytes], got {cache.dtype} {tuple(cache.shape)}")
    assert cache.shape[1] == layout.page_bytes and cache.stride(1) == 1, (
        f"indexer cache rows must be {layout.page_bytes} contiguous bytes, got shape "
        f"{tuple(cache.shape)} stride {cache.stride()}")
    P = cache.shape[0]
    keys = cache[:, : page_size * dim].view(FP8_DTYPE).reshape(P, page_size, dim)  # [P, S, D]
    nb = layout.plane_bytes[1] // 4
    scales = cache.view(torch.float32)[:, page_size * dim // 4:]                   # [P, S*nb]
    return keys, scales.reshape(P, page_size, nb)                                  # [P, S, NB]


def write_indexer_keys(cache: torch.Tensor, page_table: torch.Tensor, req: int,
                       k: torch.Tensor, page_size: int) -> None:
    """Quantise keys k [N, D] of positions 0..N-1 of request `req` into the indexer cache."""
    keys, scales = indexer_views(cache, page_size, k.shape[-1])
    q, s = quantize_fp8(k)
    pos = torch.arange(k.shape[0], device=k.device)
    pages = page_table[req, pos // page_size].long()
    keys[pages, pos % page_size] = q
    scales[pages, pos % page_size] = s


def token_pages(page_table: torch.Tensor, lens: torch.Tensor, req: int, page_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Page id and in-page slot of every valid token of request `req` (torch reference)."""
    pos = torch.arange(int(lens[req]), device=page_table.device)
    return page_table[req, pos // page_size].long(), pos % page_size


def dot_in_fp32(t: torch.Tensor) -> bool:
    """Whether kernels must upcast tl.dot operands to fp32 for tensors on t's device.

    Off the GPU the kernels run under the Triton interpreter, whose tl.dot on bf16
    operands is wrong in Triton 3.9 (it multiplies raw bit patterns); fp32 is exact
    there, and the bf16 products being upcast are exact in fp32 anyway.
    """
    return t.device.type != "cuda"


def check_int_vector(t: torch.Tensor, name: str, n: int | None = None) -> None:
    """Assert `t` is a 1-D int32 tensor (of length n when given)."""
    assert t.dim() == 1 and t.dtype == torch.int32, (
        f"{name} must be 1-D int32, got {t.dtype} shape {tuple(t.shape)}")
    assert n is None or t.shape[0] == n, f"{name} must have length {n}, got {t.shape[0]}"


def check_page_table(page_table: torch.Tensor, name: str = "page_table") -> None:
    """Assert the page table is int32 [R, max_pages] with contiguous rows."""
    assert page_table.dim() == 2 and page_table.dtype == torch.int32, (
        f"{name} must be int32 [requests, max_pages], got {page_table.dtype} "
        f"shape {tuple(page_table.shape)}")
    assert page_table.stride(1) == 1, f"{name} rows must be contiguous"


def decode_queries(seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_req, q_len) for decode: one query per request seeing its whole context."""
    check_int_vector(seq_lens, "seq_lens")
    return torch.arange(seq_lens.shape[0], dtype=torch.int32, device=seq_lens.device), seq_lens


def prefill_queries(prefix_lens: torch.Tensor, extend_lens: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_req, q_len) for causal prefill: query i of request r sees prefix_lens[r] + i + 1 keys."""
    check_int_vector(prefix_lens, "prefix_lens")
    check_int_vector(extend_lens, "extend_lens", prefix_lens.shape[0])
    dev = extend_lens.device
    ext = extend_lens.long()
    q_req = torch.repeat_interleave(torch.arange(ext.shape[0], device=dev), ext)          # [T]
    first = (torch.cumsum(ext, 0) - ext)[q_req]
    i = torch.arange(q_req.shape[0], device=dev) - first
    return q_req.int(), (prefix_lens.long()[q_req] + i + 1).int()
