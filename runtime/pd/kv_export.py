"""Real-KV mode's byte formats: a token's KV export size, the hidden state on Done, a garbled export.

`hidden_to_wire` / `hidden_from_wire` are the prompt's last hidden state as a `Done` carries it;
`corrupt_payload` is the fault injection that garbles an export (to exercise the anomaly monitor).
"""
from __future__ import annotations

import base64
import binascii

import torch

from kvproof.runtime.model.config import ModelConfig


def token_bytes(mc: ModelConfig) -> int:
    """Bytes of one token of one layer in the KV export format ([kv row | indexer key])."""
    return (mc.kv_width + mc.index_dim) * torch.empty((), dtype=mc.torch_dtype).element_size()


def hidden_to_wire(h: torch.Tensor) -> str:
    """A hidden state [D] as Done carries it: base64 of its bytes in the model's dtype."""
    return base64.b64encode(h.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).decode("ascii")


def hidden_from_wire(text: str, mc: ModelConfig) -> torch.Tensor:
    """Done's hidden state back as a [D] tensor of the model's dtype; a malformed one raises ValueError."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"done: field 'hidden' is not base64 ({e})") from None
    want = mc.hidden * torch.empty((), dtype=mc.torch_dtype).element_size()
    if len(raw) != want:
        raise ValueError(f"done: field 'hidden' has {len(raw)} bytes, expected {want} "
                         f"({mc.hidden} x {mc.torch_dtype})")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(mc.torch_dtype)


def corrupt_payload(data: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Flip the high mantissa byte of about half the elements of exported KV bytes (stays finite)."""
    esz = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    out = data.clone()
    elems = out.view(*out.shape[:-1], -1, esz)                         # [L, n, E, esz]
    sel = torch.rand(elems.shape[:-1], generator=g) < 0.5
    elems[..., esz - 2] ^= sel.to(torch.uint8) * 0x5A
    vals = torch.nan_to_num(out.view(dtype), nan=0.0, posinf=1e4, neginf=-1e4)
    return vals.contiguous().view(torch.uint8)
