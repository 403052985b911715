"""CUDA execution of HiCache plans on real streams and events, and the CUDA sanitizer (GPU only)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no NVIDIA GPU here)")]

L, P, D, I = 4, 16, 64, 32


def _cache(variant: str = "fixed"):
    from kvproof.runtime.hicache.cache import HiCache
    from kvproof.runtime.hicache.pages import HiCacheConfig
    return HiCache(HiCacheConfig(layers=L, page_size=P, kv_dim=D, idx_dim=I, device_pages=16, host_pages=64,
                                 topk=32, device="cuda", variant=variant, allow_races=variant == "unfixed"))


def test_cuda_reload_bit_identical_and_forward_matches() -> None:
    from kvproof.runtime.hicache.cache import reference_forward
    c = _cache()
    assert c.host_kv.is_pinned()
    g = torch.Generator().manual_seed(0)
    toks, kv, idx = list(range(8 * P)), torch.randn(L, 8 * P, D, generator=g), torch.randn(L, 8 * P, I, generator=g)
    c.insert(toks, kv.cuda(), idx.cuda())
    c.evict()
    kv2, idx2 = c.gather(toks)
    assert torch.equal(kv2.cpu(), kv) and torch.equal(idx2.cpu(), idx)
    c.evict()
    q, h = torch.randn(L, I, generator=g), torch.randn(D, generator=g)
    r = c.load(toks, q.cuda(), h.cuda())
    torch.cuda.synchronize()
    ref_s, ref_h = reference_forward(kv.cuda(), idx.cuda(), q.cuda(), h.cuda(), 32)
    # bit-identical to the synchronous reference (same ops, same shapes on the same device)
    assert all(torch.equal(a, b) for a, b in zip(r.scores, ref_s))
    assert torch.equal(r.hidden, ref_h)


_CSAN_SCRIPT = textwrap.dedent("""
    import sys, torch
    from kvproof.runtime.hicache.cache import HiCache
    from kvproof.runtime.hicache.pages import HiCacheConfig
    v = sys.argv[1]
    c = HiCache(HiCacheConfig(layers=2, page_size=16, kv_dim=64, idx_dim=32, device_pages=8, host_pages=16,
                              topk=8, device="cuda", variant=v, allow_races=v == "unfixed"))
    toks = list(range(64))
    c.insert(toks, torch.randn(2, 64, 64, device="cuda"), torch.randn(2, 64, 32, device="cuda"))
    c.evict()
    torch.cuda.synchronize()
    c.load(toks)
    torch.cuda.synchronize()
    print("done")
""")


@pytest.mark.parametrize("variant, expect_race", [("unfixed", True), ("fixed", False)])
def test_cuda_sanitizer_flags_prefix_only(variant: str, expect_race: bool) -> None:
    env = dict(os.environ, TORCH_CUDA_SANITIZER="1")
    p = subprocess.run([sys.executable, "-c", _CSAN_SCRIPT, variant], env=env, capture_output=True, text=True,
                       timeout=300)
    text = p.stdout + p.stderr
    raced = "CSAN detected a possible data race" in text
    assert raced == expect_race, text[-3000:]
