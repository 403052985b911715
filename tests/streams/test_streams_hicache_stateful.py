"""HiCache against a dictionary model: after every step, every cached prefix reloads bit-identical."""
from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvproof.runtime.hicache.cache import HiCache
from kvproof.runtime.hicache.pages import CacheFullError, HiCacheConfig

L, P, D, I = 2, 2, 4, 3
PAGE_IDS = st.lists(st.integers(0, 3), min_size=1, max_size=4)     # sequences of page "words"


def _tokens(words: list[int]) -> list[int]:
    return [w * 10 + k for w in words for k in range(P)]


def _data(tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """KV and Indexer cache determined by the prefix (as a real model's would be)."""
    kv, idx = torch.empty(L, len(tokens), D), torch.empty(L, len(tokens), I)
    for t in range(len(tokens)):
        g = torch.Generator().manual_seed(hash(tuple(tokens[:t + 1])) % (2 ** 31))
        kv[:, t], idx[:, t] = torch.randn(L, D, generator=g), torch.randn(L, I, generator=g)
    return kv, idx


class HiCacheModel(RuleBasedStateMachine):
    """Rules fire on the real cache; the model is just 'what was inserted'."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = HiCache(HiCacheConfig(layers=L, page_size=P, kv_dim=D, idx_dim=I, device_pages=4,
                                           host_pages=6, topk=2, schedule="adversarial"))
        self.inserted: list[list[int]] = []

    @rule(words=PAGE_IDS)
    def insert(self, words: list[int]) -> None:
        toks = _tokens(words)
        try:
            self.cache.insert(toks, *_data(toks))
            self.inserted.append(toks)
        except CacheFullError:
            assert len(words) > 4

    @rule(pages=st.integers(0, 4))
    def evict(self, pages: int) -> None:
        self.cache.evict(pages)

    @rule(words=PAGE_IDS)
    def load(self, words: list[int]) -> None:
        toks = _tokens(words)
        r = self.cache.load(toks)
        assert r.prefix_pages <= len(words) and r.exec.races == []

    @invariant()
    def cached_prefixes_reload_bit_identical(self) -> None:
        for toks in self.inserted[-3:]:
            hit = len(self.cache.match(toks)) * P
            if hit:
                kv, idx = self.cache.gather(toks)
                ref_kv, ref_idx = _data(toks[:hit])
                assert torch.equal(kv, ref_kv) and torch.equal(idx, ref_idx)

    @invariant()
    def pages_accounted(self) -> None:
        nodes = list(self.cache.index.nodes())
        assert all(n.device_page is not None or n.host_page is not None for n in nodes)
        assert len(self.cache.dev_pool.used) == sum(n.device_page is not None for n in nodes)
        assert len(self.cache.host_pool.used) == sum(n.host_page is not None for n in nodes)
        assert not any(self.cache.is_locked(n) for n in nodes)


TestHiCacheModel = HiCacheModel.TestCase
TestHiCacheModel.settings = settings(max_examples=60, stateful_step_count=15, deadline=None)
