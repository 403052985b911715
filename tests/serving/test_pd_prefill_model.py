"""A PD prefill rank's model (`PrefillModel.many`): the whole prompt's KV and last hidden state, and a
burst of prompts that share a prefix not yet cached computes that prefix once, not once per prompt."""
from __future__ import annotations

import torch

from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.kv_export import hidden_from_wire
from kvproof.runtime.pd.messages import Alloc
from kvproof.runtime.pd.model_worker import PrefillModel
from kvproof.runtime.pd.prefill_worker import Prefilled
from kvproof.runtime.serving.engine import EngineConfig


def _alloc(rid: int, prompt: list[int]) -> Alloc:
    return Alloc(rid % 4, 0, 1, rid, len(prompt), prompt)


def test_a_burst_sharing_a_cold_prefix_computes_it_once_and_exports_what_alone_would() -> None:
    prefix = [(7 * i) % 250 for i in range(64)]                      # 4 full pages, not cached yet
    prompts = [prefix + [100 + r, 50 + r, 3] for r in range(3)] + [[9, 8, 7, 6, 5]]
    pm = PrefillModel(EngineConfig(), PDConfig())
    allocs = [_alloc(r, p) for r, p in enumerate(prompts)]
    first = pm.many(allocs)
    # the second prompt shares the first one's cold prefix: the batch stops there (FIFO), the next
    # batch finds the prefix in the cache
    assert len(first) == 1 and pm.prefix_hit_tokens == 0
    rest = pm.many(allocs[1:])
    assert len(rest) == 3 and pm.prefix_hit_tokens == 2 * 64           # both later prompts hit all 4 pages
    out = first + rest
    assert all(isinstance(o, Prefilled) for o in out)
    alone = [PrefillModel(EngineConfig(), PDConfig())(a) for a in allocs]    # each in a fresh rank
    mc = pm.core.model.cfg
    for got, want, p in zip(out, alone, prompts):
        assert got.kv.shape == want.kv.shape == (mc.n_layers, len(p), got.kv.shape[2])   # the whole prompt
        assert (got.kv == want.kv).all()
        assert torch.equal(hidden_from_wire(got.hidden, mc), hidden_from_wire(want.hidden, mc))
