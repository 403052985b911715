"""Deterministic seeded weights for the embedded default model.

Random weights would make the MTP head useless (accept length 1.0, which trips the
anomaly monitor on every request). So the seeded model has a structure: a token path
(embedding -> head) that maps each token to a successor `succ[token]` among the printable
ASCII bytes, plus attention and MLP blocks with random weights scaled by
`cfg.context_gain` that perturb it depending on the context. The MTP head drafts
along the token path, so a draft is accepted exactly when the context did not change
the main model's choice: healthy accept lengths of about 1.6-2.2 with two drafts,
and visibly lower once the KV cache is garbage.
"""
from __future__ import annotations

import torch

from kvproof.runtime.model.decoder import DSAModel
from kvproof.runtime.model.config import ModelConfig

PRINTABLE = range(32, 127)


def successor_map(cfg: ModelConfig) -> torch.Tensor:
    """succ [V]: the token the seeded token path predicts after each token (printable ASCII)."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    pr = torch.tensor(list(PRINTABLE))
    succ = pr[torch.randint(len(pr), (cfg.vocab_size,), generator=g)]            # [V]
    succ[pr] = pr[torch.randperm(len(pr), generator=g)]                          # a permutation on printable
    return succ


@torch.no_grad()
def init_seeded_(model: DSAModel) -> DSAModel:
    """Fill `model` in place with the seeded weights described in the module docstring."""
    cfg = model.cfg
    if cfg.vocab_size < 127:
        raise ValueError(f"seeded init needs vocab_size >= 127 (byte tokens), got {cfg.vocab_size}")
    g = torch.Generator().manual_seed(cfg.seed)
    dt, D = cfg.torch_dtype, cfg.hidden

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    for name, p in model.named_parameters():
        if p.dim() == 1:                                                          # norm gains
            p.fill_(1.0)
        elif p.dim() == 2:
            p.copy_((rnd(*p.shape) * p.shape[1] ** -0.5).to(dt))
    for layer in model.layers:
        layer.attn.wo.weight.mul_(cfg.context_gain)
        layer.mlp.w_down.weight.mul_(cfg.context_gain)
    emb = rnd(cfg.vocab_size, D)
    emb = emb / emb.norm(dim=-1, keepdim=True) * D ** 0.5                        # rms 1 per row
    model.embed.weight.copy_(emb.to(dt))
    succ = successor_map(cfg)
    head = rnd(cfg.vocab_size, D) * 0.1 * D ** -0.5                              # weak rows
    head.index_add_(0, succ, emb * D ** -0.5)                                    # token path
    model.head.weight.copy_(head.to(dt))
    if model.mtp is not None:
        proj = rnd(D, 2 * D) * 0.05 * D ** -0.5
        proj[:, D:] += torch.eye(D, dtype=torch.float64)                         # pass the next token on
        model.mtp.eh_proj.weight.copy_(proj.to(dt))
        model.mtp.mlp.w_down.weight.mul_(0.1)
    return model


def seeded_model(cfg: ModelConfig, device: torch.device | str = "cpu", backend: str = "torch") -> DSAModel:
    """A DSAModel with the deterministic seeded weights of `cfg.seed`."""
    return init_seeded_(DSAModel(cfg, device=device, backend=backend)).eval()
