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

from typing import Any

import numpy as np
import torch

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
    if keys.device.type == "cpu" and K > width and N:
        # the keys are unique, so the `width` largest of a row and their order are unique: numpy's
        # introselect plus a sort of those few gives exactly topk(sorted=True), ~4x faster on a CPU
        part = np.partition(keys.numpy(), K - width, axis=-1)[:, K - width:]          # [N, width], unordered
        top = torch.from_numpy(np.flip(np.sort(part, axis=-1), axis=-1).copy())       # descending
    else:
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


def _split(ctx: list[int], rows: int, page: int) -> list[list[int]]:
    """Sequences (indices into ctx) in groups by context length, so that padding every sequence of a
    group to its longest costs less than the extra ops of one more group (at most three groups)."""
    order = sorted(range(len(ctx)), key=ctx.__getitem__)
    fixed = 2048 // max(rows, 1)       # one more group's ops cost about as much as this many (sequence, key) pairs

    def best(part: list[int]) -> tuple[int, int | None]:
        """(cost, split point) of `part` as one group or as two."""
        n = len(part)
        one = n * (ctx[part[-1]] + page)
        cut, cost = None, one
        for i in range(1, n):
            c = i * (ctx[part[i - 1]] + page) + (n - i) * (ctx[part[-1]] + page) + fixed
            if c < cost:
                cut, cost = i, c
        return cost, cut

    _, cut = best(order)
    if cut is None:
        return [order]
    groups = [order[:cut], order[cut:]]
    big = max(range(2), key=lambda g: len(groups[g]) * ctx[groups[g][-1]])
    _, cut2 = best(groups[big])
    if cut2 is not None:
        g = groups.pop(big)
        groups[big:big] = [g[:cut2], g[cut2:]]
    return groups


def _batched(iq: torch.Tensor, iw: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
             ik_pages: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`width` keys of B sequences with Q query tokens each, keys padded to the longest:
    iq [B*Q, HI, DI], iw [B*Q, HI], positions [B*Q], table [B, pages] -> (slots [B*Q, width], real)."""
    T, HI, DI = iq.shape
    B, MP = table.shape
    Q, S = T // B, ik_pages.shape[1]
    K = MP * S
    ik = ik_pages[table].view(B, K, DI)                                        # whole pages: one index per page
    s = torch.matmul(iq.view(B, Q * HI, DI), ik.transpose(1, 2)).relu_()       # [B, Q * HI, K]
    score = torch.bmm(iw.view(T, 1, HI), s.view(T, HI, K)).view(T, K)
    valid = torch.arange(K, device=iq.device)[None, :] <= positions[:, None]
    pos, real = top_positions(pack_scores(score, valid), width)
    tok_table = table.repeat_interleave(Q, dim=0) if Q > 1 else table           # [T, pages]
    return tok_table.gather(1, pos // S) * S + pos % S, real


def select(iq: torch.Tensor, iw: torch.Tensor, b: Any, ik_pages: torch.Tensor, width: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top-`width` keys by indexer score: (flat cache slots [T, width], real [T, width]).

    Sequences with the same number of new tokens (decode rows; all of them in a decode step) run
    batched, grouped by context length; the others (prefill chunks) one by one over their own keys.
    A token selects the same keys either way (its score row covers its own sequence's keys; padding
    is masked). `b` is the forward's `decoder.AttnBatch` (not imported: decoder imports this module)."""
    T, HI, DI = iq.shape
    S = ik_pages.shape[1]
    B, Q = b.q_index.shape
    table = b.page_table.to(torch.int64)
    ctx = b.ctx_lens.tolist()
    if B * Q == T:
        lens, same = [Q] * B, list(range(B))
    else:
        lens = b.q_mask.sum(1).tolist()
        Q = max(set(lens), key=lens.count)                                      # the decode rows' length
        same = [i for i, n in enumerate(lens) if n == Q] if lens.count(Q) > 1 else []
    groups = getattr(b, "_groups", None)
    if groups is None:
        groups = b._groups = [[same[j] for j in g] for g in _split([ctx[i] for i in same], Q, S)] if same else []
    if len(groups) == 1 and len(same) == B:                                     # one batched product: done
        return _batched(iq, iw, b.positions, table, ik_pages, width)
    slots = torch.empty(T, width, dtype=torch.int64, device=iq.device)
    real = torch.empty(T, width, dtype=torch.bool, device=iq.device)
    offs = [0]
    for n in lens[:-1]:
        offs.append(offs[-1] + n)
    for g in groups:
        seqs = torch.tensor(g, device=iq.device)
        rows = (torch.tensor([offs[i] for i in g], device=iq.device)[:, None]
                + torch.arange(Q, device=iq.device)).view(-1)
        mp = -(-max(ctx[i] for i in g) // S)
        sl, re = _batched(iq[rows], iw[rows], b.positions[rows], table[seqs, :mp], ik_pages, width)
        slots[rows], real[rows] = sl, re
    batched = set(same)
    for i, (n, k) in enumerate(zip(lens, ctx)):                                 # ragged: one by one, no padding
        if i in batched:
            continue
        pages = table[i, : -(-k // S)]
        ik = ik_pages[pages].view(-1, DI)                                      # [pages * S, DI] >= k keys
        kpos = torch.arange(ik.shape[0], device=iq.device)
        step = max(1, _CHUNK // (HI * ik.shape[0]))
        for a in range(offs[i], offs[i] + n, step):
            e = min(a + step, offs[i] + n)
            score = _scores(iq[a:e], iw[a:e], ik)
            pos, re = top_positions(pack_scores(score, kpos[None, :] <= b.positions[a:e, None]), width)
            slots[a:e], real[a:e] = pages[pos // S] * S + pos % S, re
    return slots, real


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
