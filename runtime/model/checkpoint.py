"""Checkpoints in the usual layout: `config.json` plus safetensors shards and their index.

    <dir>/config.json                          ModelConfig fields
    <dir>/model.safetensors.index.json         {"metadata": {...}, "weight_map": {tensor: shard}}
    <dir>/model-00001-of-0000N.safetensors     the shards (or a single model.safetensors)

Tensor names are the parameter names of `DSAModel` (e.g. `layers.0.attn.wkv_a.weight`).
Errors name the missing, unexpected or mis-shaped tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvproof.runtime.model.decoder import DSAModel
from kvproof.runtime.model.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory does not match the model it should load into."""


def save_checkpoint(model: DSAModel, path: str | Path, max_shard_bytes: int = 1 << 30) -> list[str]:
    """Write config.json, shards of at most max_shard_bytes and the index; returns the shard names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.cfg.to_json(), indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, tensors in zip(names, shards):
        save_file(tensors, str(path / fname))
        weight_map.update({k: fname for k in tensors})
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                         indent=2))
    return names


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        return ModelConfig.from_json(json.loads(f.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{f}: {e}") from None


def _weight_map(path: Path) -> dict[str, str]:
    if (path / INDEX).is_file():
        try:
            wm = json.loads((path / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path / INDEX}: expected JSON with a 'weight_map' ({e})") from None
        for shard in sorted(set(wm.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{path / INDEX}: shard {shard} is listed but missing")
        return wm
    if (path / SINGLE).is_file():
        with safe_open(str(path / SINGLE), "pt") as f:
            return {k: SINGLE for k in f.keys()}
    raise CheckpointError(f"{path}: neither {INDEX} nor {SINGLE}")


def load_checkpoint(path: str | Path, device: str = "cpu", backend: str = "torch") -> DSAModel:
    """A DSAModel built from config.json with every tensor loaded and checked."""
    path = Path(path)
    cfg = read_config(path)
    model = DSAModel(cfg, device=device, backend=backend)
    expected = model.state_dict()
    wm = _weight_map(path)
    missing = sorted(set(expected) - set(wm))
    unexpected = sorted(set(wm) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected "
                              f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})")
    loaded: dict[str, torch.Tensor] = {}
    bad = []
    for shard in sorted(set(wm.values())):
        with safe_open(str(path / shard), "pt", device=device) as f:
            present = set(f.keys())
            for name in (n for n, s in wm.items() if s == shard):
                if name not in present:
                    raise CheckpointError(f"{path / shard}: tensor {name} listed in the index is not in the shard")
                t = f.get_tensor(name)
                want = expected[name]
                if tuple(t.shape) != tuple(want.shape):
                    bad.append(f"{name}: expected {tuple(want.shape)}, got {tuple(t.shape)}")
                loaded[name] = t.to(want.dtype)
    if bad:
        raise CheckpointError(f"{path}: shape mismatch in {len(bad)} tensor(s): " + "; ".join(bad[:8]))
    model.load_state_dict(loaded, strict=True)
    return model.eval()


def load_model(path: str | Path | None, cfg: ModelConfig, device: str = "cpu", backend: str = "torch"
               ) -> DSAModel:
    """The checkpoint at `path`, or the seeded model of `cfg` when path is None."""
    if path is None:
        from kvproof.runtime.model.weights import seeded_model
        return seeded_model(cfg, device, backend)
    return load_checkpoint(path, device, backend)
