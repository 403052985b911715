"""The torch backend's sparse attention: lightning-indexer top-k and MLA over the selected keys, per token.

Each query token keeps the `W = index_topk` cached keys its indexer scores highest (causal: keys
at or before its position) and attends to those W keys only; fewer than W keys is padding,
masked out. Everything a token's output depends on has a fixed shape per token (its score row
over its own sequence's keys, W selected rows), so a request gives the same tokens alone or in
any batch (the e2e tests compare batched outputs with single-request references).

Ties. Identical keys (repeated tokens) score alike, and the batch shape can change the rounding
of such ties in the last bits. Scores are snapped to a 2^-24 grid and packed with their
position into one int64 key, `snapped << 17 | (2^17 - 1 - position)`: keys are unique, ties go to
the lower position, and `topk` of the packed keys is deterministic (no full stable sort).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvproof.runtime.model.decoder import AttnBatch

POS_BITS = 17                          # positions < 2^17: every preset's max_seq_len fits
_LOW = (1 << POS_BITS) - 1
SNAP = 2.0 ** 24                       # the score grid: 2^-24
SCORE_LIMIT = 2.0 ** 20                # |score| beyond this saturates (keeps the packed key in int64)
INVALID = -(1 << 45)                   # the snapped score of a masked key: below every clamped score
_CHUNK = 1 << 22                       # elements of one intermediate: longer batches run in chunks


def pack_scores(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """score [N, K] (float) and valid [N, K] -> unique int64 keys: snapped score, then lower position first."""
    K = score.shape[-1]
    if K > _LOW + 1:
        raise ValueError(f"context of {K} positions; the torch indexer handles at most {_LOW + 1}")
    snapped = torch.round(score.clamp(-SCORE_LIMIT, SCORE_LIMIT) * SNAP).to(torch.int64)
    snapped.masked_fill_(~valid, INVALID)
    return snapped.mul_(1 << POS_BITS).add_(_LOW - torch.arange(K, device=score.device))


def top_positions(keys: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` largest packed keys of each row [N, K] -> (positions [N, width] int64, real [N, width] bool).

    Rows with fewer than `width` keys are padded with masked entries (position 0)."""
    N, K = keys.shape
    if K < width:
        keys = torch.nn.functional.pad(keys, (0, width - K), value=INVALID << POS_BITS)
    top = keys.topk(width, dim=-1, sorted=True).values
    real = (top >> POS_BITS) > INVALID
    pos = torch.where(real, _LOW - (top & _LOW), 0)
    return pos, real


def _scores(iq: torch.Tensor, iw: torch.Tensor, ik: torch.Tensor) -> torch.Tensor:
    """Indexer scores of n queries of one sequence: iq [n, HI, DI], iw [n, HI], ik [K, DI] -> [n, K].

    score[q, k] = sum_h iw[q, h] * relu(iq[q, h] . ik[k])."""
    n, HI, DI = iq.shape
    s = torch.matmul(iq.reshape(n * HI, DI), ik.t()).relu_()                # [n * HI, K]
    return torch.bmm(iw.view(n, 1, HI), s.view(n, HI, -1)).view(n, -1)


def select(iq: torch.Tensor, iw: torch.Tensor, b: "AttnBatch", ik_pages: torch.Tensor, width: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-`width` keys by indexer score: (flat cache slots [T, width], real [T, width])."""
    T, HI, DI = iq.shape
    ik_flat = ik_pages.view(-1, DI)
    B, Q = b.q_index.shape
    if B * Q == T:                         # every sequence has Q tokens (decode): one batched product
        K = b.key_slots.shape[1]
        ik = ik_flat[b.key_slots]                                              # [B, K, DI]
        s = torch.matmul(iq.view(B, Q * HI, DI), ik.transpose(1, 2)).relu_()   # [B, Q * HI, K]
        score = torch.bmm(iw.view(T, 1, HI), s.view(T, HI, K)).view(T, K)
        valid = torch.arange(K, device=iq.device)[None, :] <= b.positions[:, None]
        pos, real = top_positions(pack_scores(score, valid), width)
        return b.key_slots.view(B, 1, K).expand(B, Q, K).reshape(T, K).gather(1, pos), real
    # ragged (prefill chunks): sequence by sequence over its own keys, no padding
    lens, ctx = b.q_mask.sum(1).tolist(), b.ctx_lens.tolist()
    slots, reals, t0 = [], [], 0
    for i, (n, k) in enumerate(zip(lens, ctx)):
        ks = b.key_slots[i, :k]
        ik = ik_flat[ks]                                                       # [k, DI]
        kpos = torch.arange(k, device=iq.device)
        step = max(1, _CHUNK // (HI * k))
        for a in range(t0, t0 + n, step):
            e = min(a + step, t0 + n)
            score = _scores(iq[a:e], iw[a:e], ik)
            pos, real = top_positions(pack_scores(score, kpos[None, :] <= b.positions[a:e, None]), width)
            slots.append(ks[pos])
            reals.append(real)
        t0 += n
    return torch.cat(slots), torch.cat(reals)


def attend(q_lat: torch.Tensor, q_pe: torch.Tensor, slots: torch.Tensor, real: torch.Tensor,
           kv_pages: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Absorbed MLA of each token over its selected KV rows: q_lat [T, H, DL], q_pe [T, H, dr],
    slots/real [T, W], kv_pages [P, S, DL + dr] -> [T, H, DL]."""
    T, H, DL = q_lat.shape
    width = kv_pages.shape[-1]
    W = slots.shape[1]
    kv_flat = kv_pages.view(-1, width)
    q = torch.cat([q_lat, q_pe], dim=-1)                                       # [T, H, DL + dr]
    out = []
    step = max(1, _CHUNK // (W * width))
    for a in range(0, T, step):
        e = min(a + step, T)
        kv = kv_flat[slots[a:e]]                                               # [n, W, DL + dr]
        s = torch.bmm(q[a:e], kv.transpose(1, 2)).mul_(sm_scale)               # [n, H, W]
        s.masked_fill_(~real[a:e, None, :], float("-inf"))
        out.append(torch.bmm(torch.softmax(s, dim=-1), kv[..., :DL]))          # [n, H, DL]
    return out[0] if len(out) == 1 else torch.cat(out)
