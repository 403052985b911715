"""A DeepSeek-Sparse-Attention decoder of the GLM-5 family shape, in torch.

Per layer: MLA attention over the compressed KV latent in the weight-absorbed form
(queries are mapped into latent space, so the cache holds only `[c | k_rope]`), the
lightning indexer that scores every cached token and keeps the top-k for each query,
and a SwiGLU MLP (GLM-5's MoE layers are simplified to dense MLPs). One MTP layer
drafts tokens for speculative decoding; here it is a projection plus an MLP block
without attention (DeepSeek's MTP layer has its own attention; ours reads no cache).

A layer runs in two halves, the two compute ops of the LayerSplit plan
(`spec/layersplit_plan.py`): `index` (norm, projections, the new tokens' indexer keys
written, indexer scores and top-k; reads the layer's Indexer cache) and `attend` (the new
tokens' KV rows written, sparse MLA, output projection, MLP; reads the layer's KV). Both take
the layer's cache tensors, so a LayerSplit rank passes a receive buffer where it does not
store the layer; the single-process path passes the `KVCache`'s own.

Attention runs on one of two backends:
  "torch"  vectorised torch over the paged cache (`sparse_torch`: per-token top-k, fast on the CPU,
           batch-invariant in float64);
  "triton" the project's kernels (`kernels/indexer.py`, `kernels/sparse_mla.py`), for a
           GPU, or on the CPU under TRITON_INTERPRET=1 (slow; used by a test).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvproof.runtime.model import sparse_torch
from kvproof.runtime.model.cache import KVCache, write_index_keys, write_rows
from kvproof.runtime.model.config import ModelConfig

BACKENDS = ("torch", "triton")


@dataclass
class AttnBatch:
    """Where the T tokens of one forward sit: B sequences, each extending its cached context."""

    positions: torch.Tensor     # int64 [T]      position of each token in its sequence
    slots: torch.Tensor         # int64 [T]      flat cache slot (page * S + offset) to write
    q_index: torch.Tensor       # int64 [B, Q]   token row of the j-th new token of sequence b
    q_mask: torch.Tensor        # bool  [B, Q]   which q_index entries are real
    key_slots: torch.Tensor     # int64 [B, K]   flat slot of key position j of sequence b
    ctx_lens: torch.Tensor      # int64 [B]      context length after this forward
    page_table: torch.Tensor    # int32 [B, max_pages] (triton backend)
    tok_seq: torch.Tensor       # int32 [T]      sequence row of each token (triton backend)


@dataclass
class Indexed:
    """What the indexer half of a layer hands the attention half."""

    q_nope: torch.Tensor        # [T, H, dn]
    q_pe: torch.Tensor          # [T, H, dr]   (RoPE applied)
    rows: torch.Tensor          # [T, DL + dr] the new tokens' KV rows, written by `attend`
    select: tuple[torch.Tensor, ...]   # torch: (slots [T, W], real [T, W]); triton: (indices, counts)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dim."""
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


def _linear(i: int, o: int, dtype: torch.dtype, device: torch.device | str) -> nn.Linear:
    return nn.Linear(i, o, bias=False, dtype=dtype, device=device)


def rope_tables(positions: torch.Tensor, d: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, d/2] of the rotation by position [T] (angles in float64, then `dtype`)."""
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)   # [d/2]
    ang = positions.to(torch.float64)[:, None] * inv[None, :]                                  # [T, d/2]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float,
               tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rotate the last dim of x [T, ..., d] (halves as pairs) by position [T]; `tables`: rope_tables' result."""
    d = x.shape[-1]
    cos, sin = tables if tables is not None else rope_tables(positions, d, theta, x.dtype)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (d // 2,)
    cos, sin = cos.view(shape), sin.view(shape)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def _rope(b: AttnBatch, d: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_tables of a batch's positions, computed once per batch (every layer, q and k, reuse them)."""
    memo = b.__dict__.setdefault("_rope", {})
    key = (d, theta, dtype)
    if key not in memo:
        memo[key] = rope_tables(b.positions, d, theta, dtype)
    return memo[key]


class Fused:
    """Several bias-free linears that read the same input, as one matmul: their weights stacked.

    The stack is rebuilt whenever a weight changes (loading, in-place init, moving devices), so the
    linears stay the parameters (checkpoints, state dicts); outputs are split back in order."""

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self._key: tuple | None = None
        self._w: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., in] -> one tensor [..., out_i] per linear."""
        ws = [lin.weight for lin in self.linears]
        key = tuple((w._version, w.data_ptr()) for w in ws)
        if key != self._key:
            with torch.inference_mode(False), torch.no_grad():
                self._w = torch.cat([w.detach() for w in ws])
            self._key = key
        return torch.nn.functional.linear(x, self._w).split(self.sizes, dim=-1)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str) -> None:
        super().__init__()
        dt = cfg.torch_dtype
        self.w_gate = _linear(cfg.hidden, cfg.intermediate, dt, device)
        self.w_up = _linear(cfg.hidden, cfg.intermediate, dt, device)
        self.w_down = _linear(cfg.intermediate, cfg.hidden, dt, device)
        self._gate_up = Fused(self.w_gate, self.w_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        gate, up = self._gate_up(x)
        return self.w_down(nn.functional.silu(gate).mul_(up))


class MLAttention(nn.Module):
    """MLA with the compressed latent, weight-absorbed, plus the lightning indexer."""

    def __init__(self, cfg: ModelConfig, layer: int, device: torch.device | str) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        c, dt = cfg, cfg.torch_dtype
        self.wq_a = _linear(c.hidden, c.q_lora_rank, dt, device)
        self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps, dt, device)
        self.wq_b = _linear(c.q_lora_rank, c.n_heads * c.qk_head_dim, dt, device)
        self.wkv_a = _linear(c.hidden, c.kv_width, dt, device)
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.norm_eps, dt, device)
        self.wkv_b = _linear(c.kv_lora_rank, c.n_heads * (c.qk_nope_dim + c.v_head_dim), dt, device)
        self.wo = _linear(c.n_heads * c.v_head_dim, c.hidden, dt, device)
        self.wi_q = _linear(c.q_lora_rank, c.index_heads * c.index_dim, dt, device)
        self.wi_k = _linear(c.hidden, c.index_dim, dt, device)
        self.wi_w = _linear(c.hidden, c.index_heads, dt, device)
        self._from_x = Fused(self.wq_a, self.wkv_a, self.wi_k, self.wi_w)     # everything that reads x
        self._from_qa = Fused(self.wq_b, self.wi_q)                            # everything that reads qa

    def forward(self, x: torch.Tensor, b: AttnBatch, cache: KVCache, backend: str) -> torch.Tensor:
        """x [T, D] -> [T, D]; writes this layer's KV and indexer keys of the T tokens first."""
        ik, ik_fp8 = cache.layer_index(self.layer)
        return self.attend(self.index(x, b, ik, ik_fp8, backend), b, cache.kv[self.layer], backend)

    def index(self, x: torch.Tensor, b: AttnBatch, ik: torch.Tensor, ik_fp8: torch.Tensor | None,
              backend: str) -> Indexed:
        """The indexer half: x [T, D]; writes the T tokens' indexer keys into ik [P, S, DI] (and ik_fp8),
        then selects each query's top-k keys from them."""
        c = self.cfg
        T, H, DL = x.shape[0], c.n_heads, c.kv_lora_rank
        qa, kv, ikey, iw = self._from_x(x)                  # wq_a, wkv_a [T, DL + dr], wi_k, wi_w: one matmul
        qa = self.q_norm(qa)                                                    # [T, q_lora]
        q, iq = self._from_qa(qa)                           # wq_b, wi_q
        q = q.view(T, H, c.qk_head_dim)
        tables = _rope(b, c.qk_rope_dim, c.rope_theta, x.dtype)                 # shared by q and k, every layer
        q_nope, q_pe = q[..., : c.qk_nope_dim], apply_rope(q[..., c.qk_nope_dim:], b.positions, c.rope_theta, tables)
        k_pe = apply_rope(kv[:, DL:], b.positions, c.rope_theta, tables)        # [T, dr]
        rows = torch.cat([self.kv_norm(kv[:, :DL]), k_pe], -1)
        write_index_keys(ik, ik_fp8, b.slots, ikey)
        iq = iq.contiguous().view(T, c.index_heads, c.index_dim)                # [T, HI, DI]
        iw = iw * (c.index_heads ** -0.5 * c.index_dim ** -0.5)                 # [T, HI] (a new tensor)
        if backend == "triton":
            assert ik_fp8 is not None, "the triton backend needs KVCache(fp8_indexer=True)"
            select = self._select_triton(iq, iw, b, ik_fp8)
        else:
            select = self._select_torch(iq, iw, b, ik)
        return Indexed(q_nope, q_pe, rows, select)

    def attend(self, st: Indexed, b: AttnBatch, kv: torch.Tensor, backend: str) -> torch.Tensor:
        """The attention half: writes the T tokens' KV rows into kv [P, S, DL + dr], then sparse MLA over
        the selected keys and the output projection -> [T, D]."""
        c = self.cfg
        T, H, DL = st.q_nope.shape[0], c.n_heads, c.kv_lora_rank
        write_rows(kv, b.slots, st.rows)
        wkv_b = self.wkv_b.weight.view(H, c.qk_nope_dim + c.v_head_dim, DL)
        w_uk, w_uv = wkv_b[:, : c.qk_nope_dim], wkv_b[:, c.qk_nope_dim:]        # [H, dn, DL], [H, dv, DL]
        q_lat = torch.einsum("thn,hnl->thl", st.q_nope, w_uk)                   # [T, H, DL]
        if backend == "triton":
            o_lat = self._attend_triton(q_lat, st.q_pe, st.select, b, kv)
        else:
            o_lat = self._attend_torch(q_lat, st.q_pe, st.select, b, kv)
        o = torch.einsum("thl,hvl->thv", o_lat, w_uv)                           # [T, H, dv]
        return self.wo(o.reshape(T, H * c.v_head_dim))

    def _select_torch(self, iq: torch.Tensor, iw: torch.Tensor, b: AttnBatch, ik_pages: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        return sparse_torch.select(iq, iw, b, ik_pages, self.cfg.index_topk)

    def _attend_torch(self, q_lat: torch.Tensor, q_pe: torch.Tensor, select: tuple[torch.Tensor, ...],
                      b: AttnBatch, kv_pages: torch.Tensor) -> torch.Tensor:
        slots, real = select
        return sparse_torch.attend(q_lat, q_pe, slots, real, kv_pages, self.cfg.sm_scale)

    def _select_triton(self, iq: torch.Tensor, iw: torch.Tensor, b: AttnBatch, ik_fp8: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        from kvproof.kernels.indexer import indexer_topk
        c = self.cfg
        q_len = (b.positions + 1).to(torch.int32)
        # bf16 q as the kernel is built for: fp32 q would make the GPU's dots TF32 (about 1e-3
        # relative error); bf16 x fp8-key products are exact in the fp32 accumulator.
        return indexer_topk(iq.to(torch.bfloat16).contiguous(), iw.to(torch.float32).contiguous(),
                            ik_fp8, b.page_table, b.tok_seq, q_len, c.page_size, topk=c.index_topk)

    def _attend_triton(self, q_lat: torch.Tensor, q_pe: torch.Tensor, select: tuple[torch.Tensor, ...],
                       b: AttnBatch, kv: torch.Tensor) -> torch.Tensor:
        from kvproof.kernels.sparse_mla import sparse_mla_attention
        c = self.cfg                                                            # kv [P, S, DL + dr]
        idx, counts = select
        kdt = kv.dtype if kv.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        out, _ = sparse_mla_attention(q_lat.to(kdt).contiguous(), q_pe.to(kdt).contiguous(),
                                      kv.to(kdt).contiguous(), b.page_table, b.tok_seq, idx, counts,
                                      c.sm_scale)
        return out.to(q_lat.dtype)                                              # [T, H, DL]


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, cfg: ModelConfig, layer: int, device: torch.device | str) -> None:
        super().__init__()
        dt = cfg.torch_dtype
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, dt, device)
        self.attn = MLAttention(cfg, layer, device)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, dt, device)
        self.mlp = MLP(cfg, device)

    def forward(self, h: torch.Tensor, b: AttnBatch, cache: KVCache, backend: str) -> torch.Tensor:
        """h [T, D] -> [T, D]."""
        h = h + self.attn(self.attn_norm(h), b, cache, backend)
        return h + self.mlp(self.mlp_norm(h))

    def index(self, h: torch.Tensor, b: AttnBatch, ik: torch.Tensor, ik_fp8: torch.Tensor | None,
              backend: str) -> Indexed:
        """The LayerSplit plan's ``indexer[l]``: norm + the attention's indexer half (see MLAttention.index)."""
        return self.attn.index(self.attn_norm(h), b, ik, ik_fp8, backend)

    def attend(self, h: torch.Tensor, st: Indexed, b: AttnBatch, kv: torch.Tensor, backend: str) -> torch.Tensor:
        """The plan's ``attention[l]``: the attention half, residual, MLP: h [T, D] -> [T, D]."""
        h = h + self.attn.attend(st, b, kv, backend)
        return h + self.mlp(self.mlp_norm(h))


class MTPHead(nn.Module):
    """Multi-token prediction: from the hidden state at i and the token at i+1, predict token i+2."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str) -> None:
        super().__init__()
        dt = cfg.torch_dtype
        self.hnorm = RMSNorm(cfg.hidden, cfg.norm_eps, dt, device)
        self.enorm = RMSNorm(cfg.hidden, cfg.norm_eps, dt, device)
        self.eh_proj = _linear(2 * cfg.hidden, cfg.hidden, dt, device)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, dt, device)
        self.mlp = MLP(cfg, device)
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, dt, device)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h [N, D] hidden at i, emb [N, D] embedding of token i+1 -> hidden for i+2 [N, D]."""
        x = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))
        return x + self.mlp(self.mlp_norm(x))


class DSAModel(nn.Module):
    """Embedding, decoder layers, final norm, LM head and the MTP draft head."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu", backend: str = "torch") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
        self.cfg, self.backend = cfg, backend
        dt = cfg.torch_dtype
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden, dtype=dt, device=device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, dt, device)
        self.head = _linear(cfg.hidden, cfg.vocab_size, dt, device)
        self.mtp = MTPHead(cfg, device) if cfg.n_mtp_layers else None

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, b: AttnBatch, cache: KVCache) -> torch.Tensor:
        """tokens [T] -> last hidden states [T, D] (before the final norm); writes the KV of all T."""
        h = self.embed(tokens)                                                  # [T, D]
        for layer in self.layers:
            h = layer(h, b, cache, self.backend)
        return h

    @torch.inference_mode()
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, D] -> logits [N, V]."""
        return self.head(self.norm(h))

    @torch.inference_mode()
    def draft(self, h: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Greedy MTP chain: h [N, D] at i, tokens [N] at i+1 -> drafts [N, k] for i+2 .. i+k+1."""
        assert self.mtp is not None, "this model has no MTP layer (n_mtp_layers=0)"
        out = []
        for _ in range(k):
            h = self.mtp(h, self.embed(tokens))
            tokens = self.head(self.mtp.norm(h)).argmax(-1)                     # [N]
            out.append(tokens)
        return torch.stack(out, dim=1) if out else tokens.new_zeros(tokens.shape[0], 0)
