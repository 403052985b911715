"""The decode instance's side of the connector: its blocks for a request are a KV slot of the spec.

`DecodeSide` lives in vLLM's worker (it owns the KV memory the prefill ranks
write into). Every slot state change is a fired action of the KV slot spec on
this process's decode-actor instance; this module keeps only derived indexes
(free-slot deque, request <-> slot maps) and what vLLM must be told.

vLLM request -> spec:  new remote-prefill request with its blocks -> alloc (Alloc to
every rank); Done from each rank -> on_done, then start_decode -> vLLM hears
"received" (finished_recving); normal finish -> finish; abort or disconnect ->
abort; Safe from each rank -> on_safe, then reclaim -> vLLM hears "release"
(finished_sending) and only then frees the blocks. In the unfixed variant abort
frees the slot at once, so the release is reported at once. A transfer not
done after transfer_timeout_s -> timeout; after reclaim vLLM hears "failed" and
recomputes the prompt itself.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from kvproof.runtime.transport.control import Channel, ChannelConfig
from kvproof.runtime.transport import make_transport
from kvproof.runtime.transport.messages import receive_args
from kvproof.runtime.vllm_connector.config import ConnectorConfig
from kvproof.runtime.vllm_connector.kv_layout import LayerLayout
from kvproof.runtime.vllm_connector.messages import Done, Hello, Safe, decode, encode, from_emission
from kvproof.runtime.vllm_connector.spec_driver import SpecDriver
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.instance import Instance

CONTROL = ChannelConfig(heartbeat_interval_s=None, heartbeat_timeout_s=None)


@dataclass
class Recv:
    """One request receiving KV into its blocks (bookkeeping; slot state is in the spec instance)."""

    req_id: str
    blocks: list[int]
    params: dict[str, Any]
    slot: int | None = None
    epoch: int | None = None
    started: float = field(default_factory=time.monotonic)
    received: bool = False          # "received" was reported to vLLM
    failed: bool = False            # timed out or its rank died: vLLM recomputes the prompt itself


class EventLog:
    """Connector events as JSON Lines (alloc, received, abort, release, freed, foreign landing)."""

    def __init__(self, path: str | None) -> None:
        self._f = open(path, "a") if path else None
        self._lock = threading.Lock()

    def write(self, kind: str, **fields: Any) -> None:
        """Append one event with a monotonic timestamp (comparable across processes of one host)."""
        if self._f is None:
            return
        with self._lock:
            self._f.write(json.dumps({"t_ns": time.monotonic_ns(), "pid": os.getpid(), "kind": kind, **fields})
                          + "\n")
            self._f.flush()


def trace_path(cfg: ConnectorConfig, name: str) -> str | None:
    """Where this process writes trace `name` (None: not tracing)."""
    if cfg.trace_dir is None:
        return None
    path = os.path.join(cfg.trace_dir, f"{name}-{os.getpid()}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


class DecodeSide(SpecDriver):
    """Decode's slot table over vLLM's blocks; connections to every prefill rank."""

    def __init__(self, cfg: ConnectorConfig, regions: list[Any], layouts: list[LayerLayout],
                 connect: Callable[..., Any] = make_transport) -> None:
        self.cfg, self.regions, self.layouts = cfg, regions, layouts
        self._connect = connect
        self.inst = Instance(KVSlot, cfg.spec_variant, cfg.spec_params, actor="decode",
                             trace=trace_path(cfg, "decode"))
        self.events = EventLog(trace_path(cfg, "events/decode"))
        self.lock = threading.RLock()
        self.free: deque[int] = deque(range(cfg.slots))
        self.waiting: deque[Recv] = deque()
        self.by_req: dict[str, Recv] = {}
        self.by_slot: dict[int, Recv] = {}
        self.peer: tuple[str, tuple] | None = None
        self.channels: list[Channel] = []
        self.transports: list[Any] = []
        self.received: set[str] = set()
        self.released: set[str] = set()
        self.failed: set[str] = set()
        self.leases: dict[str, list[int]] = {}
        self.dead: dict[int, str] = {}                     # prefill rank -> why its connection died
        self.stats: Counter[str] = Counter()

    # ------------------------------------------------------------ from vLLM's scheduler (metadata)
    def add(self, req_id: str, blocks: list[int], params: dict[str, Any]) -> None:
        """A request whose prompt KV prefill pushes into `blocks`; it gets a slot when the spec allows."""
        with self.lock:
            self._ensure_peer(params)
            rec = Recv(req_id, list(blocks), params)
            if self.dead:                                   # no transfer can complete: recompute locally
                self.failed.add(req_id)
                self.events.write("failed", req=req_id, why="prefill rank dead")
                return
            self.by_req[req_id] = rec
            self.waiting.append(rec)
            self._schedule()

    def finished(self, req_id: str, aborted: bool) -> None:
        """vLLM finished the request: normally (finish) or by abort/disconnect (abort, then wait for safe)."""
        with self.lock:
            rec = self.by_req.get(req_id)
            if rec is None:
                return                                      # not ours, or its slot is gone already
            if rec.slot is None:
                self.waiting.remove(rec)
                del self.by_req[req_id]
                self._release(rec, "never allocated")
                return
            s = rec.slot
            if not aborted and self.inst.enabled("finish", s=s):
                self._fire("finish", s=s)
                self._freed(rec, report=False)
                return
            self._fire("abort", s=s)
            self.stats["aborted"] += 1
            self.events.write("abort", req=req_id, slot=s, epoch=rec.epoch, received=rec.received)
            if self._is_free(s):                            # unfixed: the spec freed it at once
                self._freed(rec, report=True)

    def tick(self) -> None:
        """Terminate transfers older than transfer_timeout_s (their KV is then recomputed by vLLM)."""
        now = time.monotonic()
        with self.lock:
            for s, rec in list(self.by_slot.items()):
                if now - rec.started > self.cfg.transfer_timeout_s and self.inst.enabled("timeout", s=s):
                    rec.failed = True
                    self._fire("timeout", s=s)
                    self.events.write("timeout", req=rec.req_id, slot=s, epoch=rec.epoch)
                    if self._is_free(s):
                        self._freed(rec, report=True)

    def take_results(self) -> tuple[set[str], set[str], set[str]]:
        """(released, received, failed) since the last call: what vLLM's get_transfer_results reports."""
        with self.lock:
            out = (self.released, self.received, self.failed)
            self.released, self.received, self.failed = set(), set(), set()
            return out

    def rank_dead(self, rank: int, reason: str) -> None:
        """Rank `rank`'s control channel died: drain its transport, then nothing of it can land.

        Transfers waiting for it are terminated (abort) and reported failed once reclaimed, so vLLM
        recomputes their prompts; every aborting slot gets on_peer_dead for the rank, then reclaim.
        """
        if rank in self.dead or rank >= len(self.transports):
            return
        self.transports[rank].close_and_drain()             # outside the lock: on_land may still run
        with self.lock:
            self.dead[rank] = reason
            self.inst.record("kill", w=rank)
            self.events.write("rank_dead", rank=rank, why=reason)
            for s, rec in list(self.by_slot.items()):
                if self.inst.enabled("timeout", s=s):       # still waiting for KV
                    rec.failed = True
                    self._fire("abort", s=s)
                    if self._is_free(s):
                        self._freed(rec, report=True)
                        continue
                if self.inst.enabled("on_peer_dead", s=s, w=rank):
                    self._fire("on_peer_dead", s=s, w=rank)
                if self.inst.enabled("reclaim", s=s):
                    self._fire("reclaim", s=s)
                    self._freed(rec, report=True)

    def take_leases(self) -> dict[str, list[int]]:
        """{request: [slot, epoch]} allocated since the last call."""
        with self.lock:
            out, self.leases = self.leases, {}
            return out

    # ------------------------------------------------------------ from the prefill ranks
    def on_message(self, rank: int, raw: dict[str, Any]) -> None:
        """Done or Safe from prefill rank `rank` (control thread); stale or duplicate ones are ignored."""
        msg = decode(raw)
        if not isinstance(msg, (Done, Safe)) or msg.writer != rank:
            raise ValueError(f"decode: unexpected {raw!r} from prefill rank {rank}")
        with self.lock:
            if isinstance(msg, Done):
                if self._try("on_done", **receive_args(msg, "on_done")) and self.inst.enabled("start_decode", s=msg.slot):
                    self._fire("start_decode", s=msg.slot)
                    rec = self.by_slot[msg.slot]
                    rec.received = True
                    self.received.add(rec.req_id)
                    self.events.write("received", req=rec.req_id, slot=msg.slot, epoch=msg.epoch,
                                      ms=round((time.monotonic() - rec.started) * 1e3, 3))
            elif self._try("on_safe", **receive_args(msg, "on_safe")) and self.inst.enabled("reclaim", s=msg.slot):
                self._fire("reclaim", s=msg.slot)
                self._freed(self.by_slot[msg.slot], report=True)

    def on_land(self, tag: tuple[int, ...], region: int, offset: int, length: int) -> None:
        """A write landed (transport receive thread; the bytes are placed): trace it, count foreign ones."""
        s, w, e = tag[0], tag[1], tag[2]
        with self.lock:
            self.inst.record("land", s=s, w=w, e=e)
            self.stats["landed"] += 1
            if e != self.inst.get("epoch", s) or self._is_free(s):
                self.stats["foreign_landings"] += 1
                self.events.write("foreign_landing", slot=s, writer=w, epoch=e, region=region, offset=offset)

    # ------------------------------------------------------------ internals
    def _ensure_peer(self, params: dict[str, Any]) -> None:
        host, ports = params.get("remote_host"), params.get("remote_ports")
        if not isinstance(host, str) or not isinstance(ports, list) or len(ports) != self.cfg.prefill_ranks:
            raise ValueError(f"kv_transfer_params: remote_host={host!r} remote_ports={ports!r}; expected a host "
                             f"and {self.cfg.prefill_ranks} [control, data] port pairs (prefill_ranks)")
        key = (host, tuple(map(tuple, ports)))
        if self.peer is not None:
            if self.peer != key:
                raise ValueError(f"decode is bound to prefill {self.peer}; got a request from {key} "
                                 "(one prefill instance per decode instance)")
            return
        for rank, (ctrl, data) in enumerate(ports):
            ch = Channel.connect((host, ctrl), config=CONTROL, label=f"decode-r{rank}",
                                 on_message=lambda m, r=rank: self.on_message(r, m),
                                 on_dead=lambda why, r=rank: self.rank_dead(r, why))
            tr = self._connect("tcp", connect=(host, data), on_land=self.on_land)
            for i, region in enumerate(self.regions):
                tr.register(region, region_id=i)
            ch.send(encode(Hello(self.cfg.spec_variant, self.cfg.slots, self.cfg.prefill_ranks, rank,
                                 [lay.to_json() for lay in self.layouts])))
            self.channels.append(ch)
            self.transports.append(tr)
        self.peer = key

    def _schedule(self) -> None:
        while self.waiting and self.dead:
            rec = self.waiting.popleft()
            self.by_req.pop(rec.req_id, None)
            self.failed.add(rec.req_id)
        while self.waiting and self.free:
            s = self.free.popleft()
            if not self.inst.enabled("alloc", s=s):
                continue                                    # stale candidate; the spec decides
            rec = self.waiting.popleft()
            for em in self.inst.fire("alloc", s=s):
                self._send(from_emission(em, req=rec.params["remote_request_id"], blocks=rec.blocks))
            rec.slot, rec.epoch, rec.started = s, self.inst.get("epoch", s), time.monotonic()
            self.by_slot[s] = rec
            self.leases[rec.req_id] = [s, rec.epoch]
            self.events.write("alloc", req=rec.req_id, slot=s, epoch=rec.epoch, blocks=rec.blocks)

    def _freed(self, rec: Recv, report: bool) -> None:
        """The spec freed rec's slot: forget it, tell vLLM it may free the blocks (report), schedule."""
        s = rec.slot
        assert s is not None and self._is_free(s)
        del self.by_slot[s]
        self.by_req.pop(rec.req_id, None)
        self.free.append(s)
        if report:
            self._release(rec, "reclaimed")
        self._schedule()

    def _release(self, rec: Recv, why: str) -> None:
        if rec.failed:
            self.failed.add(rec.req_id)
        else:
            self.released.add(rec.req_id)
        self.stats["released"] += 1
        self.events.write("release", req=rec.req_id, slot=rec.slot, epoch=rec.epoch, blocks=rec.blocks, why=why)

    def _is_free(self, s: int) -> bool:
        """Slot s is back in the free pool: the spec would let a new request have it."""
        return self.inst.enabled("alloc", s=s)

    @property
    def _counts(self) -> Counter:
        return self.stats

    def _send(self, msg: Any) -> None:
        ch = self.channels[msg.writer]
        if ch.is_dead:
            self.stats["sends_to_dead_rank"] += 1
            return
        ch.send(encode(msg))

    def close(self) -> None:
        """Close the connections and the trace."""
        for ch in self.channels:
            ch.close()
        for tr in self.transports:
            tr.close_and_drain()
        self.inst.close()
