"""Frozen configuration of the DSA decoder (GLM-5 family shape) and its named presets.

`tiny` is the embedded default: a few layers of tiny width that run on a CPU in
milliseconds per step, computed in float64 so that greedy outputs are the same
whatever the batch composition (the end-to-end integrity tests compare tokens).
`glm5` records the production shapes; its MoE layers are simplified to dense MLPs
(`n_routed_experts` / `moe_intermediate` are kept for checkpoint configs but unused).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one DSA decoder; derived sizes are properties."""

    name: str = "tiny"
    vocab_size: int = 260                # byte tokenizer: 256 bytes + BOS, EOS, 2 chat markers
    hidden: int = 64
    n_layers: int = 2
    n_dense_layers: int = 1              # the first layers are dense, the rest MoE (simplified)
    intermediate: int = 128
    n_heads: int = 4
    q_lora_rank: int = 32
    kv_lora_rank: int = 32               # the compressed KV latent c (cached)
    qk_rope_dim: int = 16                # RoPE part of q/k (cached next to c)
    qk_nope_dim: int = 16
    v_head_dim: int = 16
    index_heads: int = 16                # lightning indexer
    index_dim: int = 32
    index_topk: int = 24                 # tokens each query attends to once the context is longer
    n_mtp_layers: int = 1
    page_size: int = 16
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float64"
    n_routed_experts: int = 0            # recorded only: MoE is simplified to a dense MLP
    moe_intermediate: int = 0
    bos_id: int = 256
    eos_id: int = 257
    seed: int = 0                        # seeded weights of the embedded default
    context_gain: float = 1.0            # seeded init: weight of attention/MLP vs. the token path

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden", "n_layers", "intermediate", "n_heads", "q_lora_rank",
                  "kv_lora_rank", "qk_rope_dim", "qk_nope_dim", "v_head_dim", "index_heads",
                  "index_dim", "index_topk", "page_size", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{f}={v!r}; expected an int >= 1")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"ModelConfig.n_dense_layers={self.n_dense_layers}; expected 0..{self.n_layers}")
        if self.qk_rope_dim % 2:
            raise ValueError(f"ModelConfig.qk_rope_dim={self.qk_rope_dim}; expected an even number")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}")
        if self.n_mtp_layers not in (0, 1):
            raise ValueError(f"ModelConfig.n_mtp_layers={self.n_mtp_layers}; expected 0 or 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The parameter and KV-cache dtype."""
        return _DTYPES[self.dtype]

    @property
    def kv_width(self) -> int:
        """Cached values per token per layer: latent + RoPE key."""
        return self.kv_lora_rank + self.qk_rope_dim

    @property
    def qk_head_dim(self) -> int:
        """Query/key head dim before absorption (sets the softmax scale)."""
        return self.qk_nope_dim + self.qk_rope_dim

    @property
    def sm_scale(self) -> float:
        """Softmax scale 1/sqrt(qk_head_dim)."""
        return self.qk_head_dim ** -0.5

    @property
    def n_moe_layers(self) -> int:
        """Layers that are MoE in the real model (dense MLPs here)."""
        return self.n_layers - self.n_dense_layers

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token over all layers (latent + RoPE + indexer key)."""
        esz = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.n_layers * (self.kv_width + self.index_dim) * esz

    def replace(self, **kw: Any) -> "ModelConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (the `config.json` of a checkpoint)."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "ModelConfig":
        """Parse a `config.json` dict; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config.json: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return ModelConfig(**d)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    # A mid-size model with the kernels' shapes (latent 512 + RoPE 64, indexer 32 x 128, page 64)
    # and the byte tokenizer: for GPU runs of the Triton backend and loadgen on a larger model.
    "small": ModelConfig(name="small", hidden=1024, n_layers=4, n_dense_layers=1, intermediate=2048,
                         n_heads=16, q_lora_rank=384, kv_lora_rank=512, qk_rope_dim=64, qk_nope_dim=64,
                         v_head_dim=64, index_heads=32, index_dim=128, index_topk=512, page_size=64,
                         max_seq_len=8192, dtype="bfloat16"),
    # GLM-5 shapes (see DESIGN.md); vocab and MLP widths are assumptions, MoE simplified to dense.
    "glm5": ModelConfig(name="glm5", vocab_size=154880, hidden=6144, n_layers=78, n_dense_layers=3,
                        intermediate=12288, n_heads=64, q_lora_rank=2048, kv_lora_rank=512,
                        qk_rope_dim=64, qk_nope_dim=128, v_head_dim=256, index_heads=32,
                        index_dim=128, index_topk=2048, n_mtp_layers=1, page_size=64,
                        max_seq_len=131072, dtype="bfloat16", n_routed_experts=256,
                        moe_intermediate=2048, bos_id=154820, eos_id=154821, context_gain=1.0),
}


def preset(name: str) -> ModelConfig:
    """A named preset; errors list the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None
