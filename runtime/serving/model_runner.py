"""Sequences -> tensors -> tokens: batch layout, forward, MTP drafts, verification and sampling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from kvproof.runtime.model.decoder import AttnBatch, DSAModel
from kvproof.runtime.model.cache import KVCache
from kvproof.runtime.serving.sampler import LogprobEntry, pick, sample  # noqa: F401 (sample: re-exported)
from kvproof.runtime.serving.scheduler import Sequence

if TYPE_CHECKING:
    from kvproof.runtime.hicache.host_tier import HostTier
    from kvproof.runtime.layersplit.split_cache import SplitKVCache


@dataclass
class Verified:
    """Outcome of one decode row: tokens to emit (accepted drafts then the bonus token)."""

    tokens: list[int]
    accepted: int
    drafted: int
    logprobs: list[LogprobEntry] | None = None     # per token, when the request asks for logprobs


class ModelRunner:
    """Runs prefill chunks and decode (verify) steps of a batch of sequences over the paged cache."""

    def __init__(self, model: DSAModel, cache: "KVCache | SplitKVCache", num_drafts: int,
                 host: "HostTier | None" = None,
                 forward: Callable[[torch.Tensor, AttnBatch], torch.Tensor] | None = None) -> None:
        if num_drafts and model.mtp is None:
            raise ValueError(f"num_drafts={num_drafts} needs a model with an MTP layer")
        self.model, self.cache, self.num_drafts, self.host = model, cache, num_drafts, host
        self.page_size = model.cfg.page_size
        self.device = cache.kv.device
        # the decoder forward (tokens [T], batch -> hidden [T, D]): this process's model over the cache,
        # or a LayerSplit group's (model_layersplit_group.LayerSplitGroup.forward: every rank runs it)
        self._forward = forward or (lambda tokens, b: self.model(tokens, b, self.cache))

    def _layout(self, seqs: list[Sequence], starts: list[int], lens: list[int]) -> AttnBatch:
        """AttnBatch for sequence b writing positions starts[b] .. starts[b] + lens[b] - 1."""
        S, dev = self.page_size, self.device
        B, Q = len(seqs), max(lens)
        ctx = [s + n for s, n in zip(starts, lens)]
        K = max(ctx)
        max_pages = max(len(s.pages) for s in seqs)
        table = torch.tensor([s.pages + [0] * (max_pages - len(s.pages)) for s in seqs], dtype=torch.int64)
        lens_t, starts_t = torch.tensor(lens), torch.tensor(starts)
        if Q * B == sum(lens):                                                  # uniform (decode): no ragged rows
            q_mask = torch.ones(B, Q, dtype=torch.bool)
            q_index = torch.arange(B * Q).view(B, Q)
            tok_seq = torch.arange(B).repeat_interleave(Q)
            positions = (starts_t[:, None] + torch.arange(Q)).view(-1)
        else:
            offs = lens_t.cumsum(0) - lens_t                                     # [B] first token row
            j = torch.arange(Q)
            q_mask = j[None, :] < lens_t[:, None]                                # [B, Q]
            q_index = torch.where(q_mask, offs[:, None] + j[None, :], 0)
            tok_seq = torch.repeat_interleave(torch.arange(B), lens_t)           # [T]
            positions = starts_t[tok_seq] + torch.arange(len(tok_seq)) - offs[tok_seq]
        slots = table[tok_seq, positions // S] * S + positions % S               # [T]
        key_slots = (table[:, :, None] * S + torch.arange(S)).view(B, -1)[:, :K]  # [B, K]
        return AttnBatch(positions.to(dev), slots.to(dev), q_index.to(dev), q_mask.to(dev),
                         key_slots.to(dev), torch.tensor(ctx, device=dev),
                         table.to(torch.int32).to(dev), tok_seq.to(torch.int32).to(dev))

    def prefill(self, seqs: list[Sequence], chunks: list[int]) -> torch.Tensor:
        """Cache the next chunk of each sequence; returns the hidden state of each chunk's last token [B, D]."""
        starts = [s.num_cached for s in seqs]
        toks = torch.tensor([t for s, st, n in zip(seqs, starts, chunks) for t in s.tokens[st: st + n]])
        b = self._layout(seqs, starts, chunks)
        swaps = [(hp, p) for s in seqs for hp, p, _ in s.swaps]                 # host tier: load first
        if swaps:
            assert self.host is not None, "a sequence has host-tier swaps but the runner has no host tier"
            h = self.host.forward(self.model, toks.to(self.device), b, swaps)   # [T, D]
        else:
            h = self._forward(toks.to(self.device), b)                          # [T, D]
        last = torch.tensor(chunks).cumsum(0) - 1
        for s, n in zip(seqs, chunks):
            s.num_cached += n
        return h[last.to(self.device)]

    def first_token(self, seq: Sequence, hidden: torch.Tensor) -> tuple[int, LogprobEntry | None]:
        """Sample the first output token from the prompt's last hidden state [D] (and its logprob entry)."""
        logits = self.model.logits(hidden[None])[0]                               # [V]
        p = seq.params
        if p.processed:
            return pick(logits, p, seq.prompt, seq.output, self.model.cfg.eos_id, seq.generator)
        return sample(logits, p.temperature, p.top_p, seq.generator), None

    def decode(self, seqs: list[Sequence]) -> list[Verified]:
        """One speculative step per sequence: draft k tokens with the MTP head, verify them in one forward."""
        return self.step(seqs, [], [])[0]

    def step(self, seqs: list[Sequence], prefill: list[Sequence], chunks: list[int]
             ) -> tuple[list[Verified], torch.Tensor]:
        """One forward for a decode step of `seqs` (draft k tokens each with the MTP head, verify them) and
        the next prefill chunk of each of `prefill`: (verified per decode sequence, hidden state of each
        chunk's last token [len(prefill), D])."""
        k, B = self.num_drafts, len(seqs)
        toks = []
        if seqs:
            last = torch.tensor([s.tokens[-1] for s in seqs], device=self.device)   # [B]
            if k:
                h_prev = torch.stack([s.hidden for s in seqs])                      # [B, D]
                drafts = self.model.draft(h_prev, last, k)                          # [B, k]
            else:
                drafts = last.new_zeros(B, 0)
            toks.append(torch.cat([last[:, None], drafts], dim=1).reshape(-1))      # [B * (k + 1)]
        starts = [s.num_tokens - 1 for s in seqs] + [s.num_cached for s in prefill]
        if prefill:
            toks.append(torch.tensor([t for s, n in zip(prefill, chunks) for t in s.tokens[s.num_cached: s.num_cached + n]],
                                     device=self.device))
        b = self._layout(seqs + prefill, starts, [k + 1] * B + chunks)
        h = self._forward(torch.cat(toks) if len(toks) > 1 else toks[0], b)      # [T, D]
        nd = B * (k + 1)
        hidden = h[nd + torch.tensor(chunks, device=self.device).cumsum(0) - 1] if prefill else h[:0]
        for s, n in zip(prefill, chunks):
            s.num_cached += n
        return (self._verify(seqs, h[:nd].view(B, k + 1, -1), drafts) if seqs else []), hidden

    def _verify(self, seqs: list[Sequence], h: torch.Tensor, drafts: torch.Tensor) -> list[Verified]:
        """Accept each sequence's drafts up to the first the model disagrees with, plus its own token."""
        k = self.num_drafts
        logits = self.model.logits(h)                                           # [B, k + 1, V]
        greedy = logits.argmax(-1).tolist()                                     # [B, k + 1]
        drafts_l = drafts.tolist()
        out = []
        for i, s in enumerate(seqs):
            p = s.params
            emitted: list[int] = []
            lps: list[LogprobEntry] | None = [] if p.logprobs is not None else None
            for j in range(k + 1):
                if p.processed:                 # the history at position j: output + the drafts accepted so far
                    y, lp = pick(logits[i, j], p, s.prompt, s.output + emitted, self.model.cfg.eos_id,
                                 s.generator)
                    if lps is not None and lp is not None:
                        lps.append(lp)
                elif p.temperature <= 0:
                    y = greedy[i][j]
                else:
                    y = sample(logits[i, j], p.temperature, p.top_p, s.generator)
                emitted.append(y)
                if j == k or drafts_l[i][j] != y:
                    break
            a = len(emitted) - 1
            s.num_cached = s.num_tokens + a                                     # last token + accepted drafts
            s.hidden = h[i, a]
            out.append(Verified(emitted, a, k, lps))
        return out
