"""One prefill rank's side of the connector: pushes a finished prompt's KV into decode's slot, via the spec.

`PrefillSide` lives in the prefill instance's vLLM worker. It listens for decode
instances (a control channel and a TCP transport per decode). Per decode peer it
keeps a prefill-actor instance of the KV slot spec, sized by the peer's Hello,
and fires it for every step: Alloc -> p_on_alloc; each one-sided write ->
p_post; each completion -> p_complete; all landed -> p_finish (Done); Abort ->
p_on_abort_unseen / p_on_abort / p_on_abort_busy, and p_answer_safe once the
last started write completed (Safe). The source of the writes is vLLM's own
KV cache: the request's blocks, which vLLM keeps (request_finished delayed the
free) until this rank reports the request finished sending.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kvproof.runtime.pd.prefill_worker import ABORT_ACTIONS          # derived from the spec
from kvproof.runtime.transport.control import Channel, ChannelListener
from kvproof.runtime.transport import FaultConfig, TcpListener, TcpTransport
from kvproof.runtime.transport.messages import receive_args
from kvproof.runtime.vllm_connector.config import ConnectorConfig
from kvproof.runtime.vllm_connector.decode_side import CONTROL, EventLog, trace_path
from kvproof.runtime.vllm_connector.kv_layout import LayerLayout
from kvproof.runtime.vllm_connector.messages import Abort, Alloc, Hello, decode, encode
from kvproof.runtime.vllm_connector.spec_driver import SpecDriver
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.instance import Instance


@dataclass
class Held:
    """A finished prefill whose blocks vLLM keeps for us."""

    req_id: str
    blocks: list[int]
    since: float = field(default_factory=time.monotonic)
    users: int = 0                  # transfers reading these blocks now


@dataclass
class Job:
    """The transfer of one decode slot's current epoch."""

    req_id: str
    epoch: int
    dst_blocks: list[int]
    posted_all: bool = False


class Peer(SpecDriver):
    """One connected decode instance: its spec instance, control channel and transport."""

    def __init__(self, side: "PrefillSide", ch: Channel, tr: TcpTransport, hello: Hello, n: int) -> None:
        cfg = side.cfg
        if hello.variant != cfg.spec_variant or hello.writers != cfg.prefill_ranks or hello.rank != side.rank:
            raise ValueError(f"decode hello {hello!r} does not match this prefill rank "
                             f"(variant={cfg.spec_variant}, prefill_ranks={cfg.prefill_ranks}, rank={side.rank})")
        self.dst = [LayerLayout.from_json(d) for d in hello.layers]
        if [(d.name, d.part_bytes, len(d.part_offsets)) for d in self.dst] != \
                [(lay.name, lay.part_bytes, len(lay.part_offsets)) for lay in side.layouts]:
            raise ValueError(f"decode's KV layers {[d.name for d in self.dst]} differ from prefill's "
                             f"{[lay.name for lay in side.layouts]}: the two instances must serve one model")
        self.side, self.ch, self.tr, self.hello = side, ch, tr, hello
        self.inst = Instance(KVSlot, cfg.spec_variant, {"slots": hello.slots, "writers": hello.writers},
                             actor="prefill", trace=trace_path(cfg, f"prefill-r{side.rank}-peer{n}"))
        self.jobs: dict[int, Job] = {}
        self.sources: dict[int, Any] = {}                  # wr_id -> source view, alive until completion
        threading.Thread(target=self._poll_loop, name=f"prefill-r{side.rank}-cq{n}", daemon=True).start()

    def on_message(self, raw: dict[str, Any]) -> None:
        """Alloc or Abort from decode (control thread)."""
        msg = decode(raw)
        side, w = self.side, self.side.rank
        with side.lock:
            if isinstance(msg, Alloc):
                if self._try("p_on_alloc", **receive_args(msg, "p_on_alloc")):
                    self.jobs[msg.slot] = Job(msg.req, msg.epoch, list(msg.blocks))
                    self.push(msg.slot)
            elif isinstance(msg, Abort):
                for act in ABORT_ACTIONS:                   # the one the spec enables, evaluated once
                    f = self.inst.try_fire(act, **receive_args(msg, act))
                    if f:
                        break
                else:
                    side.stats["ignored_abort"] += 1
                    return
                self._emit(f.emissions)
                side.events.write("abort", slot=msg.slot, epoch=msg.epoch, action=act)
                if act != "p_on_abort_busy":
                    self._end(msg.slot)
            else:
                raise ValueError(f"prefill rank {w}: unexpected {raw!r}")

    def push(self, s: int) -> None:
        """Post every write of slot s's job once its source blocks are known (called under the lock)."""
        job, side = self.jobs.get(s), self.side
        held = side.held.get(job.req_id) if job else None
        if job is None or job.posted_all or held is None:
            return
        if len(job.dst_blocks) < len(held.blocks):
            raise ValueError(f"alloc for {job.req_id}: decode gave {len(job.dst_blocks)} blocks, "
                             f"the prompt's KV fills {len(held.blocks)}")
        held.users += 1
        job.posted_all = True
        for i, lay in enumerate(side.layouts):
            for src_b, dst_b in zip(held.blocks, job.dst_blocks):
                for (src_off, n), (dst_off, _) in zip(lay.ranges(src_b), self.dst[i].ranges(dst_b)):
                    if not self.inst.enabled("p_post", s=s, w=side.rank):
                        return                              # aborted meanwhile: post nothing more
                    for em in self.inst.fire("p_post", s=s, w=side.rank):
                        src = side.regions[i][src_off:src_off + n]
                        wr = self.tr.post_write(src, i, dst_off, tag=(s, side.rank, job.epoch, em.fields["chunk"]))
                        self.sources[wr] = src
                        side.stats["writes_posted"] += 1
                        side.stats["bytes_posted"] += n
        self._maybe_finish(s)

    def _poll_loop(self) -> None:
        while not self.tr.is_dead:
            for c in self.tr.poll(timeout=0.05):
                self.sources.pop(c.wr_id, None)
                with self.side.lock:
                    if not c.ok:
                        self.side.stats["write_errors"] += 1
                        continue
                    s, w, e = c.tag[0], c.tag[1], c.tag[2]
                    self._fire("p_complete", s=s, w=w, e=e)  # an older epoch's completion is a no-op
                    if self.inst.enabled("p_answer_safe", s=s, w=w):
                        self._fire("p_answer_safe", s=s, w=w)
                        self._end(s)
                    else:
                        self._maybe_finish(s)

    def _maybe_finish(self, s: int) -> None:
        job = self.jobs.get(s)
        if job is not None and job.posted_all and self.inst.enabled("p_finish", s=s, w=self.side.rank):
            self._fire("p_finish", s=s, w=self.side.rank)
            self._end(s)

    def _end(self, s: int) -> None:
        """Slot s's transfer is over (done or safe): the source blocks may go back to vLLM."""
        job = self.jobs.pop(s, None)
        if job is not None:
            self.side.unuse(job.req_id, job.posted_all)

    @property
    def _counts(self) -> Counter:
        return self.side.stats

    def _send(self, msg: Any) -> None:
        self.ch.send(encode(msg))


class PrefillSide:
    """Prefill rank `rank`: listens for decode instances, pushes held KV into their slots."""

    def __init__(self, cfg: ConnectorConfig, rank: int, regions: list[Any], layouts: list[LayerLayout]) -> None:
        self.cfg, self.rank, self.regions, self.layouts = cfg, rank, regions, layouts
        self.lock = threading.RLock()
        self.held: dict[str, Held] = {}
        self.finished_sending: set[str] = set()
        self.stats: Counter[str] = Counter()
        self.events = EventLog(trace_path(cfg, f"events/prefill-r{rank}"))
        port = cfg.port + 2 * rank if cfg.port else 0
        self.ctrl_listener = ChannelListener(cfg.host, port)
        self.data_listener = TcpListener(cfg.host, port + 1 if port else 0)
        self.peers: list[Peer] = []
        self.faults = (FaultConfig(delay_ms=cfg.write_delay_ms, delay_prob=cfg.write_delay_prob,
                                   delay_dist=cfg.write_delay_dist, seed=cfg.fault_seed)
                       if cfg.write_delay_ms is not None else None)
        threading.Thread(target=self._accept_loop, name=f"prefill-r{rank}-accept", daemon=True).start()

    @property
    def ports(self) -> list[int]:
        """[control port, data port] decode connects to."""
        return [self.ctrl_listener.address[1], self.data_listener.address[1]]

    def _accept_loop(self) -> None:
        while True:
            try:
                ch = self.ctrl_listener.accept(timeout=None, config=CONTROL, label=f"prefill-r{self.rank}")
                tr = self.data_listener.accept(timeout=30.0, faults=self.faults)
                hello = decode(ch.recv(timeout=30.0))
            except OSError:
                return
            if not isinstance(hello, Hello):
                ch.close()
                continue
            with self.lock:
                peer = Peer(self, ch, tr, hello, len(self.peers))
                self.peers.append(peer)
            threading.Thread(target=self._recv_loop, args=(peer,), daemon=True).start()

    def _recv_loop(self, peer: Peer) -> None:
        while True:
            try:
                raw = peer.ch.recv()
            except Exception:                               # noqa: BLE001 - channel closed: the peer is gone
                return
            peer.on_message(raw)

    # ------------------------------------------------------------ from vLLM (step thread)
    def hold(self, req_id: str, blocks: list[int]) -> None:
        """vLLM finished prefilling req_id and keeps its blocks until we report it finished sending."""
        with self.lock:
            self.held[req_id] = Held(req_id, list(blocks))
            for peer in self.peers:
                for s, job in list(peer.jobs.items()):
                    if job.req_id == req_id:
                        peer.push(s)

    def unuse(self, req_id: str, used: bool) -> None:
        """A transfer reading req_id's blocks is over; release them once no transfer reads them."""
        held = self.held.get(req_id)
        if held is None:
            return
        held.users -= 1 if used else 0
        if held.users <= 0:
            del self.held[req_id]
            self.finished_sending.add(req_id)
            self.events.write("release", req=req_id, blocks=held.blocks)

    def take_finished(self) -> set[str]:
        """Requests whose blocks vLLM may free now (transfers over, or no decode asked in time)."""
        now = time.monotonic()
        with self.lock:
            for h in list(self.held.values()):
                if h.users == 0 and now - h.since > self.cfg.hold_timeout_s:
                    del self.held[h.req_id]
                    self.finished_sending.add(h.req_id)
                    self.events.write("hold_timeout", req=h.req_id)
            out, self.finished_sending = self.finished_sending, set()
            return out

    def close(self) -> None:
        """Stop listening and close every peer."""
        self.ctrl_listener.close()
        self.data_listener.close()
        for p in self.peers:
            p.ch.close()
            p.tr.close_and_drain()
            p.inst.close()
