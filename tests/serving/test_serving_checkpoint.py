"""Checkpoints in the usual layout: round trip, and errors that name the bad tensors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvproof.runtime.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kvproof.runtime.serving.engine import EngineConfig, SamplingParams, generate_reference
from kvproof.runtime.model.config import preset
from kvproof.runtime.model.weights import seeded_model
from kvproof.runtime.model.tokenizer import ByteTokenizer

CFG = preset("tiny").replace(seed=7)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    save_checkpoint(seeded_model(CFG), tmp_path, max_shard_bytes=200_000)
    return tmp_path


def test_round_trip_is_bit_exact_and_sharded(ckpt: Path) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((ckpt / s).is_file() for s in shards)
    loaded, orig = load_checkpoint(ckpt), seeded_model(CFG)
    assert loaded.cfg == CFG
    for (n1, p1), (n2, p2) in zip(orig.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    prompt = ByteTokenizer().encode("checkpoint")
    params = SamplingParams(max_tokens=12)
    assert generate_reference(EngineConfig(model=CFG, checkpoint=str(ckpt)), [prompt], params) == \
        generate_reference(EngineConfig(model=CFG), [prompt], params)


def _shard_of(ckpt: Path, name: str) -> Path:
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_missing_tensor_is_named(ckpt: Path) -> None:
    idx = ckpt / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    del data["weight_map"]["layers.1.attn.wkv_b.weight"]
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"missing \['layers\.1\.attn\.wkv_b\.weight'\]"):
        load_checkpoint(ckpt)


def test_unexpected_tensor_is_named(ckpt: Path) -> None:
    idx = ckpt / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    shard = _shard_of(ckpt, "embed.weight")
    tensors = load_file(str(shard))
    tensors["layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    data["weight_map"]["layers.9.extra.weight"] = shard.name
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"unexpected \['layers\.9\.extra\.weight'\]"):
        load_checkpoint(ckpt)


def test_shape_mismatch_is_named(ckpt: Path) -> None:
    shard = _shard_of(ckpt, "head.weight")
    tensors = load_file(str(shard))
    tensors["head.weight"] = tensors["head.weight"][:, :10].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"head\.weight: expected \(260, 64\), got \(260, 10\)"):
        load_checkpoint(ckpt)


def test_missing_files_are_named(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    _shard_of(ckpt, "embed.weight").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-0000\d-of-0000\d\.safetensors is listed but missing"):
        load_checkpoint(ckpt)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(empty)
    (empty / "config.json").write_text(json.dumps({**CFG.to_json(), "hiden": 3}))
    with pytest.raises(CheckpointError, match="unknown keys \\['hiden'\\]"):
        load_checkpoint(empty)
