"""The DSA model: forward shapes, determinism, sparse selection, the glm5 preset, the Triton backend."""
from __future__ import annotations

import pytest
import torch

from kvproof.runtime.serving.engine import EngineConfig, SamplingParams, generate_reference
from kvproof.runtime.model.decoder import DSAModel
from kvproof.runtime.model.cache import KVCache, PagePool
from kvproof.runtime.model.config import ModelConfig, preset
from kvproof.runtime.model.weights import seeded_model
from kvproof.runtime.serving.model_runner import ModelRunner
from kvproof.runtime.serving.scheduler import Sequence
from kvproof.runtime.model.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
# The Triton backend runs natively on a GPU and under the interpreter (TRITON_INTERPRET=1) on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _prefill(model: DSAModel, prompts: list[list[int]], num_pages: int = 64) -> tuple[torch.Tensor, list]:
    dev = next(model.parameters()).device
    cache = KVCache(model.cfg, num_pages, dev, fp8_indexer=model.backend == "triton")
    pool = PagePool(num_pages)
    runner = ModelRunner(model, cache, num_drafts=0)
    seqs = [Sequence(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
    for s in seqs:
        s.pages = pool.allocate(-(-len(s.prompt) // model.cfg.page_size))
    return runner.prefill(seqs, [len(p) for p in prompts]), seqs


def test_forward_shapes_and_determinism() -> None:
    cfg = preset("tiny")
    m1, m2 = seeded_model(cfg), seeded_model(cfg)
    prompts = [TOK.encode("def fib(n):"), TOK.encode("hello, world " * 5)]
    h1, _ = _prefill(m1, prompts)
    h2, _ = _prefill(m2, prompts)
    assert h1.shape == (2, cfg.hidden) and h1.dtype == torch.float64
    assert torch.equal(h1, h2), "same seed, same prompts: bit-identical hidden states"
    logits = m1.logits(h1)
    assert logits.shape == (2, cfg.vocab_size) and torch.isfinite(logits).all()
    drafts = m1.draft(h1, logits.argmax(-1), 3)
    assert drafts.shape == (2, 3)


def test_batch_composition_does_not_change_hidden_states() -> None:
    model = seeded_model(preset("tiny"))
    a, b = TOK.encode("x = 1"), TOK.encode("a much longer prompt that crosses several pages " * 2)
    alone, _ = _prefill(model, [a])
    both, _ = _prefill(model, [b, a])
    torch.testing.assert_close(alone[0], both[1], rtol=1e-12, atol=1e-12)


def test_indexer_selects_top_k_beyond_its_budget() -> None:
    cfg = preset("tiny")
    prompt = TOK.encode("sparse attention " * 8)            # 137 tokens > index_topk
    assert len(prompt) > cfg.index_topk
    dense = seeded_model(cfg.replace(index_topk=4096))
    sparse = seeded_model(cfg)
    hd, _ = _prefill(dense, [prompt])
    hs, _ = _prefill(sparse, [prompt])
    assert not torch.allclose(hd, hs), "top-k selection must change attention on long contexts"


def test_glm5_preset_shapes_on_meta_device() -> None:
    cfg = preset("glm5")
    assert (cfg.n_layers, cfg.n_dense_layers, cfg.n_moe_layers) == (78, 3, 75)
    assert (cfg.hidden, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_dim) == (6144, 64, 2048, 512, 64)
    assert (cfg.v_head_dim, cfg.index_heads, cfg.index_dim, cfg.index_topk, cfg.page_size) == (256, 32, 128, 2048, 64)
    assert cfg.kv_width * 2 == 1152, "bf16 KV bytes per token per layer"
    model = DSAModel(cfg, device="meta")
    attn = model.layers[0].attn
    assert attn.wkv_b.weight.shape == (64 * (128 + 256), 512)
    assert attn.wq_b.weight.shape == (64 * 192, 2048)
    assert model.mtp is not None and model.mtp.eh_proj.weight.shape == (6144, 2 * 6144)


def test_small_preset_fits_the_kernels() -> None:
    """`small` (for GPU runs of the triton backend) has the kernels' shapes."""
    cfg = preset("small")
    for d in (cfg.kv_lora_rank, cfg.qk_rope_dim, cfg.index_dim, cfg.index_heads):
        assert d >= 16 and d & (d - 1) == 0
    assert cfg.index_heads >= 16 and cfg.index_dim <= 128 and cfg.page_size == 64
    model = DSAModel(cfg, device="meta", backend="triton")
    assert sum(p.numel() for p in model.parameters()) < 100_000_000


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="hidden"):
        ModelConfig(hidden=0)
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        ModelConfig.from_json({**preset("tiny").to_json(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("gpt-9")


def test_triton_backend_matches_torch_backend() -> None:
    """The project's kernels (native on a GPU, the interpreter on the CPU) give the torch backend's
    logits and tokens."""
    pytest.importorskip("triton")
    cfg = preset("tiny").replace(dtype="float32", index_topk=64)
    prompt = TOK.encode("def f(x): return x")              # shorter than top-k: same selection
    ht, _ = _prefill(seeded_model(cfg, backend="torch"), [prompt])
    hk, _ = _prefill(seeded_model(cfg, device=DEV, backend="triton"), [prompt])
    torch.testing.assert_close(hk.cpu(), ht, rtol=2e-3, atol=2e-3)
    base = EngineConfig(model=cfg, num_pages=16, num_drafts=1)
    ref = generate_reference(base, [prompt], SamplingParams(max_tokens=4))
    out = generate_reference(EngineConfig(model=cfg, num_pages=16, num_drafts=1, backend="triton", device=DEV),
                             [prompt], SamplingParams(max_tokens=4))
    assert out == ref
