"""KV audit: how far a sequence's cached KV is from a recomputation of it from its tokens.

The evidence the anomaly monitor (spec/specdec_monitor.py) needs before it aborts a
suspect generation: the tokens are the ground truth, so a fresh prefill of them into a
scratch cache gives the KV the request should be reading. Cached rows that differ (bit
flips, foreign KV landed by a slot-reuse race, a stale page) are corruption; rows that
match mean the suspicious statistics come from the model's own output (a greedy loop).
"""
from __future__ import annotations

import torch

from kvproof.runtime.model.cache import KVCache
from kvproof.runtime.model.decoder import DSAModel
from kvproof.runtime.serving.model_runner import ModelRunner
from kvproof.runtime.serving.engine_api import SamplingParams
from kvproof.runtime.serving.scheduler import Sequence

CHUNK = 512                                    # positions per prefill chunk of the recomputation


def recompute_kv(model: DSAModel, tokens: list[int]) -> torch.Tensor:
    """The KV of positions 0..n-1 of `tokens` from a fresh prefill: [L, n, kv_width + index_dim] (cache dtype)."""
    mc, n = model.cfg, len(tokens)
    pages = -(-n // mc.page_size)
    dev = next(model.parameters()).device
    scratch = KVCache(mc, pages, dev, fp8_indexer=model.backend == "triton")
    seq = Sequence("kv-audit", list(tokens), SamplingParams(max_tokens=1), pages=list(range(pages)))
    runner = ModelRunner(model, scratch, 0)
    while seq.num_cached < n:                  # in chunks, as the engine prefills (bounded activations)
        runner.prefill([seq], [min(CHUNK, n - seq.num_cached)])
    return scratch.export_tokens(seq.pages, n).view(scratch.kv.dtype)


def kv_error(model: DSAModel, cached: torch.Tensor, tokens: list[int]) -> float:
    """Largest relative difference, over layers and positions, between cached rows and their recomputation.

    `cached`: the sequence's exported KV bytes (`KVCache.export_tokens`, uint8 [L, n, token_bytes]) of
    the first n = len(tokens) positions. 0.0 for an exact match; about 1.4 for another request's KV.
    """
    if not tokens:
        return 0.0
    want = recompute_kv(model, tokens).double()                                  # [L, n, W]
    got = cached.contiguous().view(model.cfg.torch_dtype).double()
    if got.shape != want.shape:
        raise ValueError(f"cached KV {tuple(got.shape)} does not match the recomputation {tuple(want.shape)}")
    diff = torch.linalg.vector_norm(torch.nan_to_num(got - want, nan=float("inf")), dim=-1)
    return float((diff / torch.linalg.vector_norm(want, dim=-1).clamp_min(1e-30)).max())

