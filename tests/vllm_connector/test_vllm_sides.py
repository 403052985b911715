"""The connector's decode and prefill sides over real TCP, without vLLM: push, abort, late writes."""
from __future__ import annotations

import time

import pytest
import torch

from kvproof.runtime.vllm_connector.config import ConnectorConfig
from kvproof.runtime.vllm_connector.decode_side import DecodeSide
from kvproof.runtime.vllm_connector.harness import free_port
from kvproof.runtime.vllm_connector.kv_layout import layout_of, region_tensor
from kvproof.runtime.vllm_connector.prefill_side import PrefillSide
from kvproof.spec.kv_slot import DState
from kvproof.verify.trace_audit import audit


def _caches(num_blocks: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, num_blocks, 16, 2, 8, generator=g) for _ in range(2)]   # [K/V, blocks, 16 tokens, heads, dim]


def _pair(tmp_path, **kw):
    cfg = ConnectorConfig(port=free_port(), slots=2, trace_dir=str(tmp_path), **kw)
    pc, dc = _caches(8, 0), _caches(6, 1)
    pre = PrefillSide(cfg, 0, [region_tensor(t) for t in pc], [layout_of(f"l{i}", t, 8) for i, t in enumerate(pc)])
    dec = DecodeSide(cfg, [region_tensor(t) for t in dc], [layout_of(f"l{i}", t, 6) for i, t in enumerate(dc)])
    params = {"remote_host": "127.0.0.1", "remote_ports": [pre.ports], "remote_request_id": "p1"}
    return pre, dec, pc, dc, params


def _until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_layout_finds_block_dim_and_parts() -> None:
    t = torch.zeros(2, 8, 16, 2, 8)
    lay = layout_of("l", t, 8)
    assert lay.ranges(3) == [(3 * 1024, 1024), (8 * 1024 + 3 * 1024, 1024)]
    with pytest.raises(ValueError, match="no dimension of size num_blocks=5"):
        layout_of("l", t, 5)


def test_push_lands_prefill_blocks_in_decode_blocks(tmp_path) -> None:
    pre, dec, pc, dc, params = _pair(tmp_path)
    try:
        pre.hold("p1", [3, 4])
        dec.add("d1", [1, 5], params)
        got: set[str] = set()
        _until(lambda: got.update(dec.take_results()[1]) or "d1" in got)
        for p, d in zip(pc, dc):
            assert torch.equal(d[:, 1], p[:, 3]) and torch.equal(d[:, 5], p[:, 4])
        _until(lambda: "p1" in pre.finished_sending)
        dec.finished("d1", aborted=False)
        assert dec.inst.get("d_state", 0) == DState.FREE and dec.stats["foreign_landings"] == 0
    finally:
        dec.close()
        pre.close()


@pytest.mark.parametrize("variant", ["fixed", "unfixed"])
def test_abort_mid_transfer_with_late_writes(tmp_path, variant: str) -> None:
    """Fixed: the blocks are released only after safe, no foreign landing. Unfixed: released at once,
    the late writes land in a free slot."""
    pre, dec, pc, dc, params = _pair(tmp_path, variant=variant, write_delay_ms=200.0)
    try:
        pre.hold("p1", [3, 4])
        dec.add("d1", [1, 5], params)
        _until(lambda: pre.stats["writes_posted"] == 8)
        dec.finished("d1", aborted=True)
        released = dec.take_results()[0]
        if variant == "fixed":
            assert released == set() and dec.inst.get("d_state", 0) == DState.ABORTING
            _until(lambda: dec.inst.get("d_state", 0) == DState.FREE)
            assert dec.take_results()[0] == {"d1"} and dec.stats["landed"] == 8
            assert dec.stats["foreign_landings"] == 0
        else:
            assert released == {"d1"}
            _until(lambda: dec.stats["landed"] == 8)
            assert dec.stats["foreign_landings"] == 8
        res = audit([str(tmp_path)])
        assert res.ok == (variant == "fixed"), res.text()
        assert res.ok or res.at.action == "land"
    finally:
        dec.close()
        pre.close()


def test_prefill_death_mid_transfer_fails_over_to_local_recompute(tmp_path) -> None:
    """The prefill rank dies with writes in flight: decode drains its connection, terminates the
    transfer, frees the slot via on_peer_dead, and reports the request failed (vLLM recomputes)."""
    pre, dec, pc, dc, params = _pair(tmp_path, write_delay_ms=300.0)
    try:
        pre.hold("p1", [3, 4])
        dec.add("d1", [1, 5], params)
        _until(lambda: pre.stats["writes_posted"] == 8)
        pre.close()
        failed: set[str] = set()
        _until(lambda: failed.update(dec.take_results()[2]) or "d1" in failed)
        assert dec.inst.enabled("alloc", s=0) and dec.dead == {0: dec.dead[0]}
        dec.add("d2", [2], {**params, "remote_request_id": "p2"})      # no live rank: failed at once
        assert dec.take_results()[2] == {"d2"}
        res = audit([str(tmp_path)])                    # kill drains: nothing lands after it
        assert res.ok, res.text()
    finally:
        dec.close()
