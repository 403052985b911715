"""Choosing one token from logits: logit processors, greedy or seeded sampling, logprobs.

The fast paths (plain greedy, plain temperature + nucleus) stay in `sample`; a request that asks
for any processing (`SamplingParams.processed`: penalties, logit bias, min_tokens, top_k, min_p,
logprobs) goes through `pick`, one row at a time, with the token history it depends on. Both
engines sample here: the local engine's `ModelRunner` and the PD decode process's (same class).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from kvproof.runtime.serving.engine_api import SamplingParams

LogprobEntry = tuple[float, tuple[tuple[int, float], ...]]   # (the token's logprob, top alternatives)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
           top_k: int | None = None, min_p: float = 0.0) -> int:
    """One token from logits [V]: argmax when temperature is 0, else temperature, top-k, top-p, min-p, one draw."""
    if temperature <= 0:
        return int(logits.argmax())
    # on the CPU: the request's generator is a CPU generator, and this keeps sampling device-independent
    probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)           # [V]
    if top_k is not None and top_k < probs.numel():
        kth = torch.topk(probs, top_k, sorted=True).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    if top_p < 1.0:
        p_sorted, order = torch.sort(probs, descending=True, stable=True)
        drop = (torch.cumsum(p_sorted, 0) - p_sorted) >= top_p * p_sorted.sum()   # keep the smallest nucleus
        p_sorted[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, p_sorted)
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    return int(torch.multinomial(probs, 1, generator=generator))


def process(logits: torch.Tensor, p: "SamplingParams", prompt: Sequence[int], output: Sequence[int],
            eos_id: int) -> torch.Tensor:
    """The logits [V] after logit bias, min_tokens masking and the penalties (float64, CPU)."""
    x = logits.double().cpu().clone()
    V = x.numel()
    for t, b in p.logit_bias:
        if 0 <= t < V:
            x[t] += b
    if len(output) < p.min_tokens:                  # no end before min_tokens
        for t in (*p.stop_token_ids, *(() if p.ignore_eos else (eos_id,))):
            if 0 <= t < V:
                x[t] = float("-inf")
    if p.repetition_penalty != 1.0:                 # over prompt and output (the CTRL / HF rule)
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        seen = seen[seen < V]
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and output:   # over output tokens (OpenAI's rule)
        counts = torch.bincount(torch.tensor(list(output), dtype=torch.long), minlength=V)[:V].double()
        x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).double()
    return x


def pick(logits: torch.Tensor, p: "SamplingParams", prompt: Sequence[int], output: Sequence[int],
         eos_id: int, generator: torch.Generator | None) -> tuple[int, LogprobEntry | None]:
    """One token from logits [V] with every processor of `p`; its logprob entry when `p.logprobs` is set."""
    x = process(logits, p, prompt, output, eos_id)
    y = sample(x, p.temperature, p.top_p, generator, p.top_k, p.min_p)
    if p.logprobs is None:
        return y, None
    lp = torch.log_softmax(x, dim=-1)
    k = min(p.logprobs, lp.numel())
    top = torch.topk(lp, k, sorted=True) if k else None
    alts = tuple(zip(top.indices.tolist(), map(_finite, top.values.tolist()))) if top is not None else ()
    return y, (_finite(float(lp[y])), alts)


def _finite(v: float) -> float:
    # a masked token's logprob is -inf, which JSON cannot carry; OpenAI clients use -9999.0
    return max(v, -9999.0)
