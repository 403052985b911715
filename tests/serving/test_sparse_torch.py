"""The torch backend's per-token top-k and sparse MLA (runtime/model/sparse_torch.py) against plain definitions."""
from __future__ import annotations

import pytest
import torch

from kvproof.runtime.model import sparse_torch
from kvproof.runtime.model.config import preset
from kvproof.runtime.model.weights import seeded_model
from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams


def _reference_topk(score: torch.Tensor, valid: torch.Tensor, w: int) -> list[list[int]]:
    """The definition: positions by snapped score, descending, ties to the lower position (a stable sort)."""
    snapped = torch.round(score * 2.0 ** 24).masked_fill(~valid, float("-inf"))
    order = torch.sort(snapped, dim=-1, descending=True, stable=True).indices
    return [[int(k) for k in row if valid[i, k]][:w] for i, row in enumerate(order)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_positions_is_the_stable_sort_with_ties_to_the_lower_position(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    N, K, W = 40, 90, 24
    score = torch.randint(-6, 7, (N, K), generator=g).to(dtype) * 0.25    # many exact ties
    score[:, ::7] += torch.rand(N, len(range(0, K, 7)), generator=g, dtype=dtype) * 1e-9   # below the grid
    score[0] = 1.0                                                         # a row that is all one tie
    ctx = torch.randint(1, K + 1, (N,), generator=g)
    ctx[0], ctx[1], ctx[2] = K, 5, W                      # every key; fewer keys than W; exactly W
    valid = torch.arange(K)[None, :] < ctx[:, None]
    keys = sparse_torch.pack_scores(score, valid)
    pos, real = sparse_torch.top_positions(keys, W)             # on the CPU: numpy's partition, then a sort
    top = keys.topk(W, dim=-1, sorted=True).values              # what a GPU runs: the same keys, same order
    assert torch.equal(pos, torch.where(real, sparse_torch._LOW - (top & sparse_torch._LOW), 0))
    want = _reference_topk(score, valid, W)
    for i in range(N):
        got = pos[i][real[i]].tolist()
        assert got == want[i], (i, got, want[i])
        assert real[i].sum() == min(W, int(ctx[i])) and (pos[i][~real[i]] == 0).all()
    assert pos[0].tolist() == list(range(W)), "an all-tie row keeps the first W positions"


def test_top_positions_pads_short_rows_and_refuses_too_long_contexts() -> None:
    pos, real = sparse_torch.top_positions(sparse_torch.pack_scores(torch.tensor([[0.5, 2.0, 2.0]]),
                                                                    torch.ones(1, 3, dtype=torch.bool)), 5)
    assert pos.tolist() == [[1, 2, 0, 0, 0]] and real.tolist() == [[True, True, True, False, False]]
    with pytest.raises(ValueError, match="at most 131072"):
        sparse_torch.pack_scores(torch.zeros(1, (1 << 17) + 1), torch.ones(1, (1 << 17) + 1, dtype=torch.bool))


def test_sparse_attention_equals_dense_attention_over_the_selected_keys() -> None:
    """attend() over W gathered rows == softmax over the whole cache with everything else masked."""
    g = torch.Generator().manual_seed(1)
    T, H, DL, dr, P, S, W = 7, 4, 32, 16, 6, 16, 10
    kv = torch.randn(P, S, DL + dr, generator=g, dtype=torch.float64)
    q_lat = torch.randn(T, H, DL, generator=g, dtype=torch.float64)
    q_pe = torch.randn(T, H, dr, generator=g, dtype=torch.float64)
    slots = torch.stack([torch.randperm(P * S, generator=g)[:W] for _ in range(T)])
    real = torch.rand(T, W, generator=g) < 0.7
    real[:, 0] = True
    out = sparse_torch.attend(q_lat, q_pe, slots, real, kv, 0.2)
    flat = kv.view(-1, DL + dr)
    for t in range(T):
        mask = torch.zeros(P * S, dtype=torch.bool)
        mask[slots[t][real[t]]] = True
        s = (torch.cat([q_lat[t], q_pe[t]], -1) @ flat.t()) * 0.2                  # [H, P*S]
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        torch.testing.assert_close(out[t], p @ flat[:, :DL], rtol=1e-12, atol=1e-12)


def test_decode_batches_give_every_request_its_single_request_tokens() -> None:
    """Decode steps of requests with contexts past index_topk, batched together (the padded, batched indexer
    path) and alone: identical greedy tokens (float64, MTP drafts on)."""
    prompts = [tuple(range(40, 40 + n)) for n in (30, 75, 140)]               # 30, 75, 140 > top-k 24
    params = SamplingParams(max_tokens=24, ignore_eos=True)

    def run(group: list[int]) -> dict[int, list[int]]:
        core = EngineCore(EngineConfig(num_pages=64))
        out: dict[int, list[int]] = {i: [] for i in group}
        for i in group:
            core.add(GenerationRequest(str(i), prompts[i], params), lambda ev, i=i: out[i].extend(ev.tokens))
        while core.step():
            pass
        return out

    together = run([0, 1, 2])
    for i in range(3):
        assert together[i] == run([i])[i], f"request {i}: batched decode differs from alone"
    assert seeded_model(preset("tiny")).cfg.index_topk < 30


def test_ragged_prefill_selection_equals_each_sequence_alone() -> None:
    """A prefill batch of chunks of different lengths (the ragged path, rows padded for one top-k) selects
    for every token exactly the slots that sequence selects alone (the batched path)."""
    from kvproof.runtime.model.cache import KVCache, PagePool
    from kvproof.runtime.serving.model_runner import ModelRunner
    from kvproof.runtime.serving.scheduler import Sequence

    cfg = preset("tiny")
    model = seeded_model(cfg)
    cache = KVCache(cfg, 64, torch.device("cpu"))
    pool = PagePool(64)
    runner = ModelRunner(model, cache, num_drafts=0)
    g = torch.Generator().manual_seed(3)
    seqs = [Sequence(str(i), torch.randint(32, 127, (n,), generator=g).tolist(), SamplingParams())
            for i, n in enumerate((70, 33, 120))]
    for s in seqs:
        s.pages = pool.allocate(-(-len(s.prompt) // cfg.page_size))
    runner.prefill(seqs, [len(s.prompt) - 10 for s in seqs])        # the cache holds all but 10 tokens of each
    chunks = [10, 4, 7]                                             # ragged: the next 10 / 4 / 7 tokens
    T = sum(chunks)
    iq = torch.randn(T, cfg.index_heads, cfg.index_dim, generator=g, dtype=torch.float64)
    iw = torch.randn(T, cfg.index_heads, generator=g, dtype=torch.float64)
    b = runner._layout(seqs, [s.num_cached for s in seqs], chunks)
    slots, real = sparse_torch.select(iq, iw, b, cache.ik[0], cfg.index_topk)
    t0 = 0
    for s, n in zip(seqs, chunks):
        alone = runner._layout([s], [s.num_cached], [n])
        sl, re = sparse_torch.select(iq[t0:t0 + n], iw[t0:t0 + n], alone, cache.ik[0], cfg.index_topk)
        assert torch.equal(sl, slots[t0:t0 + n]) and torch.equal(re, real[t0:t0 + n]), s.request_id
        t0 += n
    assert real.all(), "every token has at least index_topk keys"


@pytest.mark.parametrize("mixed", [True, False])
def test_a_request_arriving_mid_decode_is_prefilled_in_the_decode_step(mixed: bool) -> None:
    """With mixed steps a new request's prefill chunk runs in the same forward as the running requests'
    decode rows (one step, not two); without (the default, for time to first token) it runs alone first.
    Either way the new request's first token comes from that step and every request still gets its
    single-request tokens."""
    prompts = [tuple(range(40, 40 + n)) for n in (30, 75, 140)]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    core = EngineCore(EngineConfig(num_pages=64, mixed_steps=mixed))
    out: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i in (0, 1):
        core.add(GenerationRequest(str(i), prompts[i], params), lambda ev, i=i: out[i].extend(ev.tokens))
    for _ in range(4):
        core.step()
    core.add(GenerationRequest("2", prompts[2], params), lambda ev: out[2].extend(ev.tokens))
    before = dict(core.counters["steps_total{kind}"])
    assert core.scheduler.running and core.step()
    after = core.counters["steps_total{kind}"]
    assert (after["prefill"] - before["prefill"], after["decode"] - before["decode"]) == (1, int(mixed)), \
        "one mixed step" if mixed else "the prefill step alone"
    assert out[2], "the new request's first token came from that step"
    while core.step():
        pass
    for i in range(3):
        alone = EngineCore(EngineConfig(num_pages=64))
        ref: list[int] = []
        alone.add(GenerationRequest("r", prompts[i], params), lambda ev: ref.extend(ev.tokens))
        while alone.step():
            pass
        assert out[i] == ref, f"request {i}"
