"""`KVProofConnector`: vLLM's KVConnectorBase_V1 over kvproof's verified KV slot protocol (push).

Scheduler side (vLLM's EngineCore): decides which requests receive or hold KV
and hands that to the worker in the step's metadata; it owns no protocol state.
Worker side: `DecodeSide` (kv_consumer) and/or `PrefillSide` (kv_producer), which
fire the spec. Free rule on decode: a request aborted before vLLM saw its KV
arrive is held by vLLM itself until we report it (finished_recving or
finished_sending, both free it); one aborted after the arrival is held because
request_finished returns True. Either way the worker reports it only after the
spec's reclaim (every prefill rank answered safe), or at once in the unfixed
variant.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole, KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
)

from kvproof.runtime.vllm_connector.config import ConnectorConfig
from kvproof.runtime.vllm_connector.decode_side import DecodeSide, EventLog, trace_path
from kvproof.runtime.vllm_connector.kv_layout import layout_of, region_tensor
from kvproof.runtime.vllm_connector.prefill_side import PrefillSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

_NORMAL_END = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


@dataclass
class KVProofMetadata(KVConnectorMetadata):
    """One step's instructions from the scheduler side to the workers."""

    recv: dict[str, tuple[list[int], int, dict]] = field(default_factory=dict)  # req -> (blocks, first, params)
    finished: dict[str, bool] = field(default_factory=dict)                     # req -> aborted
    hold: dict[str, list[int]] = field(default_factory=dict)                    # prefill: req -> its blocks
    idle: bool = False


@dataclass
class SlotLeases(KVConnectorWorkerMetadata):
    """Worker -> scheduler: the (slot, epoch) each new request got, for its kv_transfer_params."""

    leases: dict[str, list[int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        """Union of two workers' leases."""
        assert isinstance(other, SlotLeases)
        return SlotLeases({**self.leases, **other.leases})


class KVProofConnector(KVConnectorBase_V1):
    """Push KV connector: prefill writes one-sidedly into decode's slot, under the KV slot spec."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tc = vllm_config.kv_transfer_config
        self.cfg = ConnectorConfig.from_extra(tc.kv_connector_extra_config)
        self.producer, self.consumer = tc.is_kv_producer, tc.is_kv_consumer
        if self.producer and self.cfg.port == 0:
            raise ValueError("kv_connector_extra_config: a kv_producer needs port=<first control port> "
                             "(its ports go into kv_transfer_params for decode to connect to)")
        self.block_size = vllm_config.cache_config.block_size
        self.tp = vllm_config.parallel_config.tensor_parallel_size
        if self.producer and self.tp != self.cfg.prefill_ranks:
            raise ValueError(f"kv_connector_extra_config: prefill_ranks={self.cfg.prefill_ranks}, but this "
                             f"prefill instance has tensor_parallel_size={self.tp}")
        # scheduler side
        self._recv: dict[str, tuple[list[int], int, dict]] = {}
        self._first: dict[str, int] = {}
        self._recv_reqs: set[str] = set()
        self._arrived: set[str] = set()
        self._finished: dict[str, bool] = {}
        self._awaiting: set[str] = set()                  # blocks held until the worker reports them
        self._drop_arrival: set[str] = set()
        self._hold: dict[str, list[int]] = {}
        self._holding: set[str] = set()
        self._lease: dict[str, list[int]] = {}            # decode: req -> [slot, epoch]
        self._freed_log = EventLog(trace_path(self.cfg, "events/sched")) if role == KVConnectorRole.SCHEDULER \
            else None
        # worker side
        self.decode: DecodeSide | None = None
        self.prefill: PrefillSide | None = None

    # ============================================================ scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Remote prefill: every prompt token beyond the local hit arrives asynchronously."""
        p = request.kv_transfer_params
        if p and p.get("do_remote_prefill"):
            count = len(request.prompt_token_ids or []) - num_computed_tokens
            if count > 0 and num_computed_tokens % self.block_size == 0:
                self._first[request.request_id] = num_computed_tokens // self.block_size
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        """Decode: stage the request's new blocks for the worker's alloc (first call only)."""
        p = request.kv_transfer_params
        if not p or not p.get("do_remote_prefill") or num_external_tokens <= 0:
            return
        rid = request.request_id
        first = self._first.pop(rid, 0)
        n = math.ceil((first * self.block_size + num_external_tokens) / self.block_size)
        ids = list(blocks.get_block_ids()[0])[first:n]
        self._recv[rid] = (ids, first, dict(p))
        self._recv_reqs.add(rid)
        p["do_remote_prefill"] = False                   # a re-entry (preemption) must not stage it again

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        """Hand this step's new transfers, finished requests and held prefills to the workers."""
        meta = KVProofMetadata(self._recv, self._finished, self._hold,
                               idle=scheduler_output.total_num_scheduled_tokens == 0)
        self._recv, self._finished, self._hold = {}, {}, {}
        return meta

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        """Track arrivals and releases; drop the arrival of a request vLLM finished before seeing it.

        vLLM frees such a request at its next finished_recving; an arrival is not a release.
        """
        wm = connector_output.kv_connector_worker_meta
        if isinstance(wm, SlotLeases):
            self._lease.update(wm.leases)
        recving = set(connector_output.finished_recving or ())
        failed = set(connector_output.failed_recving or ())
        dropped = recving & self._drop_arrival - failed
        if dropped:
            connector_output.finished_recving = recving - dropped
        self._arrived |= (recving - dropped - failed) & self._recv_reqs
        self._recv_reqs -= failed - self._awaiting          # recomputed locally: no transfer left
        for rid in set(connector_output.finished_sending or ()) | (recving - dropped):
            if rid in self._awaiting or rid in self._holding:
                self._awaiting.discard(rid)
                self._holding.discard(rid)
                self._recv_reqs.discard(rid)
                self._arrived.discard(rid)
                self._drop_arrival.discard(rid)
                if self._freed_log is not None:
                    self._freed_log.write("freed", req=rid)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill: hold the blocks for the push. Decode: hold an aborted request's blocks until safe."""
        rid, p, status = request.request_id, request.kv_transfer_params or {}, request.status.name
        if self.producer and p.get("do_remote_decode"):
            if status not in _NORMAL_END or not block_ids:
                return False, None
            self._hold[rid] = list(block_ids)
            self._holding.add(rid)
            host = self.cfg.host
            return True, {"do_remote_prefill": True, "do_remote_decode": False, "remote_request_id": rid,
                          "remote_host": host, "prefill_ranks": self.tp,
                          "remote_ports": [[self.cfg.port + 2 * r, self.cfg.port + 2 * r + 1] for r in range(self.tp)]}
        if rid not in self._recv_reqs and rid not in self._recv:
            return False, None
        aborted = status not in _NORMAL_END
        self._finished[rid] = aborted
        lease = self._lease.pop(rid, None)
        out = {"kvproof_slot": lease[0], "kvproof_epoch": lease[1]} if lease else None
        if not aborted:
            self._recv_reqs.discard(rid)
            self._arrived.discard(rid)
            return False, out
        self._awaiting.add(rid)
        if rid in self._arrived:
            return True, out                               # vLLM would free now: we hold until safe
        self._drop_arrival.add(rid)                        # vLLM holds it itself until our report
        return False, out

    def has_pending_push_work(self) -> bool:
        """Keep the engine stepping while prefill holds KV or decode waits for safe answers."""
        return bool(self._holding or self._awaiting)

    # ============================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Describe every layer's paged KV as a byte region; start the decode and/or prefill side."""
        num_blocks = self._kv_cache_config.num_blocks
        names = list(kv_caches)
        layouts = [layout_of(n, kv_caches[n], num_blocks) for n in names]
        regions = [region_tensor(kv_caches[n]) for n in names]
        if self.consumer:
            self.decode = DecodeSide(self.cfg, regions, layouts)
        if self.producer:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.prefill = PrefillSide(self.cfg, get_tensor_model_parallel_rank(), regions, layouts)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Apply the step's metadata: new transfers (alloc), finished requests, held prefills."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVProofMetadata)
        self._idle = meta.idle
        if self.prefill is not None:
            for rid, blocks in meta.hold.items():
                self.prefill.hold(rid, blocks)
        if self.decode is not None:
            for rid, (blocks, first, params) in meta.recv.items():
                self.decode.add(rid, blocks, {**params, "first_block": first})
            for rid, aborted in meta.finished.items():
                self.decode.finished(rid, aborted)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing per layer: a request runs only once all its KV landed."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Nothing per layer: prefill pushes from the held blocks once decode allocates."""

    def wait_for_save(self) -> None:
        """Nothing to wait for: pushes read blocks vLLM holds for us."""

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Released (free now), received (run now) and failed (recompute) requests since the last step."""
        sending, recving, failed = set(), set(), set()
        if self.decode is not None:
            self.decode.tick()
            released, received, failed = self.decode.take_results()
            sending |= released
            recving |= received | failed
        if self.prefill is not None:
            sending |= self.prefill.take_finished()
        if getattr(self, "_idle", False) and not (sending or recving):
            time.sleep(0.002)                              # idle engine kept stepping for us: don't spin
        return KVConnectorTransferResults(sending, recving, failed)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        """The slot leases made since the last step (the epoch goes back in kv_transfer_params)."""
        leases = self.decode.take_leases() if self.decode is not None else {}
        return SlotLeases(leases) if leases else None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(finished sending, finished receiving), for callers of the older API."""
        r = self.get_transfer_results(finished_req_ids)
        return r.finished_sending or None, r.finished_recving or None

    def shutdown(self) -> None:
        """Close connections and traces."""
        if self.decode is not None:
            self.decode.close()
        if self.prefill is not None:
            self.prefill.close()
