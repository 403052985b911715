"""Speculative decoding with the MTP head is lossless: the same greedy tokens as plain decoding."""
from __future__ import annotations

import pytest

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams, generate_reference
from kvproof.runtime.serving.monitor import MonitorConfig
from kvproof.runtime.serving.scheduler import Sequence
from kvproof.runtime.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPTS = [TOK.encode(p) for p in ("def fib(n):", "x", "The quick brown fox jumps over " * 3,
                                    "import torch\nclass Model(torch.nn.Module):\n", "0123456789")]
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


def test_speculative_equals_plain_greedy() -> None:
    plain = generate_reference(EngineConfig(num_drafts=0), PROMPTS, GREEDY)
    for k in (1, 3):
        assert generate_reference(EngineConfig(num_drafts=k), PROMPTS, GREEDY) == plain, f"num_drafts={k}"


def test_speculative_sampling_equals_plain_sampling() -> None:
    """Each emitted token is one draw from the model's distribution at its position, so with the
    same seed speculative sampling gives exactly the tokens of plain sampling."""
    params = SamplingParams(max_tokens=40, temperature=0.7, top_p=0.95, seed=5, ignore_eos=True)
    assert generate_reference(EngineConfig(num_drafts=2), PROMPTS, params) == \
        generate_reference(EngineConfig(num_drafts=0), PROMPTS, params)


def _batched(cfg: EngineConfig, params: SamplingParams) -> tuple[list[list[int]], EngineCore]:
    core = EngineCore(cfg)
    events: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
    for i, p in enumerate(PROMPTS):
        core.add(GenerationRequest(str(i), tuple(p), params), events[i].append)
    while core.step():
        pass
    return [[t for ev in events[i] for t in ev.tokens] for i in range(len(PROMPTS))], core


def test_batched_with_preemption_and_chunked_prefill_equals_reference() -> None:
    ref = generate_reference(EngineConfig(num_drafts=0), PROMPTS, GREEDY)
    cfg = EngineConfig(num_pages=14, max_prefill_tokens=8, monitor=MonitorConfig(enabled=False))
    out, core = _batched(cfg, GREEDY)
    assert out == ref
    assert core.scheduler.preemptions > 0, "the tiny pool must force preemptions"
    assert core.pool.num_free == core.pool.num_pages, "every page returned"


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    params = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
    alone = generate_reference(EngineConfig(), PROMPTS, params)
    batched, _ = _batched(EngineConfig(), params)
    assert alone == batched
    other = generate_reference(EngineConfig(), PROMPTS, SamplingParams(max_tokens=40, temperature=0.8, seed=99,
                                                                       ignore_eos=True))
    assert other != alone


def test_kv_handoff_between_cores_equals_reference() -> None:
    """The PD path in one process: core A prefills, its KV bytes move into core B's pages, B decodes."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    ref = generate_reference(EngineConfig(), PROMPTS, params)
    a, b = EngineCore(EngineConfig()), EngineCore(EngineConfig(num_pages=300))
    out = []
    for i, p in enumerate(PROMPTS):
        n = len(p) - 1                                   # decode recomputes the last prompt token
        seq_pages = a.pool.allocate(-(-n // a.model.cfg.page_size))
        if n:
            seq = Sequence("pf", p[:n], params)
            seq.pages = seq_pages
            a.runner.prefill([seq], [n])
        data = a.cache.export_tokens(seq_pages, n)       # uint8 [L, n, token_bytes]: what PD transfers
        a.pool.free(seq_pages)
        dst = b.pool.allocate(-(-n // b.model.cfg.page_size))
        b.cache.import_tokens(dst, data)
        events: list = []
        b.add(GenerationRequest(str(i), tuple(p), params), events.append, prefilled=(dst, n))
        while b.step():
            pass
        out.append([t for ev in events for t in ev.tokens])
    assert out == ref


def test_whole_prompt_handoff_with_the_hidden_state_is_started_outside_the_core_and_decodes_as_the_reference() -> None:
    """PD's path: core A computes the whole prompt; B samples the first token from its last hidden state
    (`start`, before any step and outside B's queues), admits the sequence with the KV and decodes the
    reference's tokens (seeded sampling: the generator goes on from the first draw); bad inputs are refused."""
    params = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.8, seed=7)
    ref = generate_reference(EngineConfig(), PROMPTS, params)
    a, b = EngineCore(EngineConfig()), EngineCore(EngineConfig(num_pages=300))
    out = []
    for i, p in enumerate(PROMPTS):
        n = len(p)
        seq = Sequence("pf", list(p), params)
        seq.pages = a.pool.allocate(-(-n // a.model.cfg.page_size))
        h = a.runner.prefill([seq], [n])[0]
        data = a.cache.export_tokens(seq.pages, n)
        a.pool.free(seq.pages)
        dst = b.pool.allocate(-(-n // b.model.cfg.page_size))
        b.cache.import_tokens(dst, data)
        req = GenerationRequest(str(i), tuple(p), params)
        started, first = b.start(req, h)                                # the first token, before any step
        assert len(first.tokens) == 1 and not first.finished and not b.seqs
        events: list = [first]
        b.add(req, events.append, prefilled=(dst, n), started=started)
        while b.step():
            pass
        out.append([t for ev in events for t in ev.tokens])
    assert out == ref
    dst = b.pool.allocate(1)
    with pytest.raises(ValueError, match="or all 2, started"):
        b.add(GenerationRequest("x", (1, 2), params), lambda ev: None, prefilled=(dst, 2))
    with pytest.raises(ValueError, match=r"hidden of shape \(3,\)"):
        b.start(GenerationRequest("y", (1, 2), params), h[:3])
    one = GenerationRequest("z", (1, 2), SamplingParams(max_tokens=1))
    started, first = b.start(one, h)
    ends: list = []
    b.add(one, ends.append, prefilled=(dst, 2), started=started)    # max_tokens=1: over with its first token
    assert [(e.tokens, e.finished, e.finish_reason, e.completion_tokens) for e in ends] == [((), True, "length", 1)]
    assert not b.seqs and b.pool.num_free == b.pool.num_pages
    assert b.pool.num_free == b.pool.num_pages
