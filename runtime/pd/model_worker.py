"""Real-KV mode of the PD processes: the model runs in the prefill ranks and in decode.

    python -m kvproof.runtime.pd.model_worker decode|prefill --stdin   (arguments + secret on stdin)

The processes are the ones of `pd.process` (same loops, same spec firing); this module only plugs
the model in. A prefill rank's `PrefillModel` runs the model on the whole prompt (it rides on
`Alloc`) and returns `KVCache.export_tokens` bytes `[layers, n, token_bytes]` and the hidden state of
the prompt's last position; the rank posts its byte share of every token, one write per layer, exactly
as for synthetic KV, and its `Done` carries the hidden state (`hidden_to_wire`).
With `layersplit=R` each prefill rank is rank 0 of its own LayerSplit group (R-1 follower processes
of its own) and gathers the layers it does not store from their owners for the export
(`EngineCore.export_tokens`); decode always runs unsplit (`ModelCluster` gives it layersplit=1).
Decode's `DecodeModel.read` is `DecodeWorker`'s read of a READY slot: it copies the slot's bytes
into its own model KV pages (`import_tokens`) and hands the request to its `EngineCore`
(`prefilled=(pages, n)` with the hidden state), which samples the first token from it at once: the
first token goes to the router without waiting for a decode step. The slot is then finished (freed)
and the core decodes (MTP speculative decoding, the anomaly monitor) and streams `Event` messages back
to the router.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sys
import time
import zlib
from collections import deque
from dataclasses import asdict, fields
from typing import Any, Callable

import numpy as np
import torch

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, GenerationRequest, SamplingParams, TokenEvent
from kvproof.runtime.pd.kv_pool import KVPool
from kvproof.runtime.model.config import ModelConfig
from kvproof.runtime.serving.monitor import MonitorConfig
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.cpus import parse_cpus, pin_process
from kvproof.runtime.pd.messages import Alloc, Event, Events, Message, Result, Stats, Submit
from kvproof.runtime.pd.prefill_worker import Prefilled
from kvproof.runtime.serving.scheduler import Sequence
from kvproof.runtime.serving.server_metrics import histogram
from kvproof.spec.kv_slot import DState

STATS_INTERVAL_S = 0.2


# ---------------------------------------------------------------- config on the command line
_EVENT_FIELDS = tuple(f.name for f in fields(TokenEvent))

def engine_config_to_json(cfg: EngineConfig) -> str:
    """EngineConfig as JSON (for the worker command line)."""
    return json.dumps(asdict(cfg))


def engine_config_from_json(text: str) -> EngineConfig:
    """Parse engine_config_to_json's output; a bad document raises ValueError naming it."""
    try:
        raw = json.loads(text)
        raw["model"] = ModelConfig(**raw["model"])
        raw["monitor"] = MonitorConfig(**raw["monitor"])
        return EngineConfig(**raw)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"engine config JSON is malformed: {e!r}") from None


def token_bytes(mc: ModelConfig) -> int:
    """Bytes of one token of one layer in the KV export format ([kv row | indexer key])."""
    return (mc.kv_width + mc.index_dim) * torch.empty((), dtype=mc.torch_dtype).element_size()


def hidden_to_wire(h: torch.Tensor) -> str:
    """A hidden state [D] as Done carries it: base64 of its bytes in the model's dtype."""
    return base64.b64encode(h.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).decode("ascii")


def hidden_from_wire(text: str, mc: ModelConfig) -> torch.Tensor:
    """Done's hidden state back as a [D] tensor of the model's dtype; a malformed one raises ValueError."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"done: field 'hidden' is not base64 ({e})") from None
    want = mc.hidden * torch.empty((), dtype=mc.torch_dtype).element_size()
    if len(raw) != want:
        raise ValueError(f"done: field 'hidden' has {len(raw)} bytes, expected {want} "
                         f"({mc.hidden} x {mc.torch_dtype})")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(mc.torch_dtype)


def corrupt_payload(data: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Flip the high mantissa byte of about half the elements of exported KV bytes (stays finite)."""
    esz = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    out = data.clone()
    elems = out.view(*out.shape[:-1], -1, esz)                         # [L, n, E, esz]
    sel = torch.rand(elems.shape[:-1], generator=g) < 0.5
    elems[..., esz - 2] ^= sel.to(torch.uint8) * 0x5A
    vals = torch.nan_to_num(out.view(dtype), nan=0.0, posinf=1e4, neginf=-1e4)
    return vals.contiguous().view(torch.uint8)


# ---------------------------------------------------------------- prefill rank
class PrefillModel:
    """A prefill rank's copy of the model (with a prefix cache): Alloc -> KV bytes of the first n-1 tokens."""

    def __init__(self, ecfg: EngineConfig, pd: PDConfig) -> None:
        self.core = EngineCore(ecfg)
        self.pd = pd
        self.prefilled = 0
        self.prompt_tokens = 0          # tokens this rank was asked to prefill
        self.prefix_hit_tokens = 0      # of those, found in its prefix cache (not recomputed)

    def stats(self) -> dict[str, Any]:
        """This rank's counters, every key `prefill_*`: its prefix cache (the router's cache hit rate
        in PD mode), with a host tier its HiCache counters (`prefill_hicache_*`), with LayerSplit its
        group's (`prefill_layersplit_*`: forwards, exports, bytes)."""
        out = {"prefill_requests_total": self.prefilled, "prefill_prompt_tokens_total": self.prompt_tokens,
               "prefill_prefix_hit_tokens_total": self.prefix_hit_tokens}
        core = self.core
        host = core.host.stats() if core.host is not None else {}
        # the group's counters only: decode sums every prefill_* key over the ranks (gauges would not add up)
        group = {k: v for k, v in core.group.stats().items() if k.endswith("_total")} if core.group else {}
        out.update({f"prefill_{k}": v for k, v in (host | group).items() if isinstance(v, (int, float))})
        return out

    def __call__(self, alloc: Alloc) -> Prefilled:
        """Run the model on the prompt and export its KV (and last hidden state) for the slot."""
        out = self.many([alloc])[0]
        if isinstance(out, ValueError):
            raise out
        return out

    def many(self, allocs: list[Alloc]) -> list[Prefilled | ValueError]:
        """The first k >= 1 prompts computed in one forward of at most max_prefill_tokens (past the first
        prompt): their KV bytes and last hidden states; a malformed Alloc gets its ValueError and does not
        spoil the batch."""
        core = self.core
        budget = core.cfg.max_prefill_tokens
        out: list[Prefilled | ValueError] = []
        batch: list[tuple[int, Alloc, Sequence]] = []            # (index in out, alloc, its sequence)
        try:
            for alloc in allocs:
                tokens = alloc.tokens
                n = len(tokens) if tokens else 0
                if not tokens:
                    out.append(ValueError(f"alloc for rid {alloc.rid} carries no prompt tokens "
                                          f"(real-KV mode needs them)"))
                elif n != alloc.n_tokens:
                    out.append(ValueError(f"alloc for rid {alloc.rid}: n_tokens={alloc.n_tokens}, expected "
                                          f"len(prompt) = {n}"))
                else:
                    seq = Sequence(f"pf-{alloc.rid}", list(tokens), SamplingParams())
                    core.scheduler._match_prefix(seq)              # cached full pages (the last token is computed)
                    need = -(-n // core.model.cfg.page_size) - len(seq.pages)
                    if batch and (n - seq.num_cached > budget or not core.pool.can_allocate(need)):
                        core.pool.free(seq.pages)                  # the next batch takes it
                        break
                    seq.pages += core.pool.allocate(need)
                    budget -= n - seq.num_cached
                    self.prompt_tokens += n
                    self.prefix_hit_tokens += seq.num_cached
                    out.append(ValueError("not computed"))         # replaced below
                    batch.append((len(out) - 1, alloc, seq))
            if batch:
                seqs = [q for _, _, q in batch]
                with torch.no_grad():
                    hidden = core.runner.prefill(seqs, [len(q.prompt) - q.num_cached for q in seqs])   # [B, D]
                for (i, alloc, seq), h in zip(batch, hidden):
                    core.scheduler.prefilled(seq)                  # publish its full pages for later prompts
                    data = core.export_tokens(seq.pages, len(seq.prompt)).cpu()    # uint8 [L, n, token_bytes]
                    if alloc.corrupt:
                        data = corrupt_payload(data, core.model.cfg.torch_dtype, zlib.crc32(str(alloc.rid).encode()))
                    out[i] = Prefilled(data.numpy(), hidden_to_wire(h))
                    self.prefilled += 1
        finally:
            for _, _, seq in batch:
                core.pool.free(seq.pages)
        return out


# ---------------------------------------------------------------- decode
class DecodeModel:
    """Decode's model: imports READY slots into its KV pages, decodes, streams Events, reports stats."""

    def __init__(self, ecfg: EngineConfig, pd: PDConfig) -> None:
        self.core = EngineCore(ecfg)
        self.pd = pd
        self.pending: dict[int, GenerationRequest] = {}    # rid -> request, until its slot is read
        # (rid, request, started sequence, its KV bytes): first token sent, not yet in the core
        self._started: deque[tuple[int, GenerationRequest, Sequence, np.ndarray]] = deque()
        self.pool: KVPool | None = None
        self._send: Callable[[Message], None] | None = None
        self._send_events: Callable[[list], None] | None = None
        self._batch: list[tuple[int, TokenEvent]] | None = None    # (rid, event) pairs of the step running now
        self._next_stats = 0.0
        self.imported_tokens = 0
        self.security: Callable[[], dict[str, Any]] = dict   # run_decode: refused connections and writes
        self.rank_stats: dict[int, dict[str, Any]] = {}    # prefill rank -> its latest live counters
        self._lock: Any = contextlib.nullcontext()

    def on_rank_stats(self, rank: int, data: dict[str, Any]) -> None:
        """A prefill rank's live counters (its prefix cache: where PD's cache hits happen)."""
        self.rank_stats[rank] = data

    def attach(self, pool: KVPool, send: Callable[[Message], None],
               send_events: Callable[[list], None] | None = None, lock: Any = None) -> None:
        """Called by run_decode: the slot pool to read from, the client channel's send, its send_events
        ((rid, TokenEvent) pairs as one binary frame; None: as Event/Events messages) and the lock
        that guards the slot worker (held for the live snapshot; None: no other thread uses it)."""
        self.pool, self._send, self._send_events = pool, send, send_events
        if lock is not None:
            self._lock = lock

    def on_submit(self, msg: Submit) -> None:
        """Remember a request's prompt and sampling parameters until its KV arrives."""
        if msg.tokens is None or msg.params is None:
            raise ValueError(f"submit rid {msg.rid}: real-KV mode needs 'tokens' and 'params'")
        if len(msg.tokens) != msg.n_tokens or not msg.tokens:
            raise ValueError(f"submit rid {msg.rid}: n_tokens={msg.n_tokens}, expected len(tokens) >= 1")
        p = dict(msg.params)
        p["stop_token_ids"] = tuple(p.get("stop_token_ids", ()))
        self.pending[msg.rid] = GenerationRequest(str(msg.rid), tuple(msg.tokens), SamplingParams(**p))

    def on_result(self, r: Result) -> None:
        """A request's slot life ended; forget it unless its KV was read (then the core owns it)."""
        if r.status != "served":
            self.pending.pop(r.rid, None)

    def read(self, s: int, req: Any) -> int:
        """DecodeWorker's read of READY slot s: copy its KV out, sample the first token from the hidden state
        the last Done carried and send it at once; the loop thread admits the sequence before its next step.

        Runs where the Done is handled: on a rank channel's thread, beside a model step, so it touches no
        queue, page or counter of the core (`EngineCore.start`) and sends its event itself."""
        assert self.pool is not None
        greq = self.pending.pop(req.rid)
        n, rid = len(greq.prompt_tokens), req.rid
        try:
            if req.hidden is None:
                raise ValueError("done: no 'hidden' (real-KV mode needs the prompt's last hidden state)")
            hidden = hidden_from_wire(req.hidden, self.core.model.cfg).to(self.core.cache.kv.device)
            # PD's queue: from the Submit until decode allocated its KV slot (prefill starts then)
            times = (req.submitted, req.allocated if req.allocated is not None else req.submitted)
            seq, ev = self.core.start(greq, hidden, times)
        except ValueError as e:                             # the router validates; never strand the slot
            self._flush([(rid, TokenEvent(greq.request_id, (), True, "abort", f"decode refused: {e}", n))])
            return 0
        raw = self.pool.array[s, :, :, :n]                                   # [W, L, n, Bw]
        data = np.ascontiguousarray(raw.transpose(1, 2, 0, 3)).reshape(self.pd.layers, n, -1)   # the slot is freed next
        self._flush([(rid, ev)])                            # the first token now, not with a step's events
        self._started.append((rid, greq, seq, data))
        return 0

    def _admit(self) -> None:
        """Loop thread: the started sequences' KV into model pages, the sequences into the core."""
        core = self.core
        while self._started:
            rid, greq, seq, data = self._started.popleft()
            n = len(greq.prompt_tokens)
            need = -(-n // core.model.cfg.page_size)
            if not core.pool.can_allocate(need):
                self._event(rid, TokenEvent(greq.request_id, (), True, "abort", "decode out of KV pages", n, 1))
                continue
            pages = core.pool.allocate(need)
            core.cache.import_tokens(pages, torch.from_numpy(data).to(core.cache.kv.device))
            self.imported_tokens += n
            try:
                core.add(greq, lambda ev, rid=rid: self._event(rid, ev), prefilled=(pages, n), started=seq)
            except ValueError as e:
                core.pool.free(pages)
                self._event(rid, TokenEvent(greq.request_id, (), True, "abort", f"decode refused: {e}", n, 1))

    def abort(self, rid: int, cause: str = "client") -> None:
        """The router aborted rid: stop it if it is decoding (the slot side is DecodeWorker.abort's)."""
        self.pending.pop(rid, None)
        self._admit()                                       # a started request is in the core before it aborts
        self.core.abort(str(rid), cause)

    def send_stats(self, worker: Any, nonce: int) -> None:
        """A live Stats snapshot now, tagged with the router's nonce (its /metrics scrape waits for it)."""
        self._send_msg(Stats({**self.snapshot(worker), "nonce": nonce}))

    def step(self, worker: Any) -> bool:
        """One model step (if any work) and, now and then, a live Stats snapshot; True when busy."""
        # the step's events go out in one frame: one send, one router wake-up per step, not per request
        self._batch = []
        try:
            with torch.no_grad():
                self._admit()
                busy = self.core.step()
        finally:
            batch, self._batch = self._batch, None
            if batch:
                self._flush(batch)
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + STATS_INTERVAL_S
            with self._lock:                                # the client thread may be submitting
                snap = self.snapshot(worker)
            self._send_msg(Stats(snap))
        return busy

    def snapshot(self, worker: Any) -> dict[str, Any]:
        """Model counters plus the slot table's: what the router's stats() shows."""
        out = self.core.stats()
        ws = worker.stats
        lat = worker.reclaim_latency_s
        out.update({
            "live": 1,
            "slots{state}": {st.name: worker.inst.count("d_state", st) for st in DState},
            "kv_transfers_total": ws["served"] + ws["corrupt"],
            "kv_transfer_failures_total": ws["failed"],
            "kv_requests_aborted_total": ws["aborted"],
            "slots_reclaimed_total": ws["slots_reclaimed"],
            **histogram("reclaim_latency_seconds", lat),
            "kv_transferred_bytes_total": sum(worker.bytes_landed),
            "kv_foreign_landings_total": sum(worker.foreign_landings),
            "kv_imported_tokens_total": self.imported_tokens,
            "pd_waiting_for_slot": len(worker.waiting),
            **self.security(),
        })
        # In PD mode prompts are prefilled on the prefill ranks, so their prefix caches give the hit
        # rate (decode imports each prompt's KV and has no prefix hits of its own).
        ranks: dict[str, float] = {}
        for r in self.rank_stats.values():                  # summed over the prefill ranks
            for k, v in r.items():
                if k.startswith("prefill_") and isinstance(v, (int, float)):
                    ranks[k] = ranks.get(k, 0) + v
        out.update(ranks)
        asked, hits = ranks.get("prefill_prompt_tokens_total", 0), ranks.get("prefill_prefix_hit_tokens_total", 0)
        out["prefix_cache_hit_tokens_total"] = hits
        out["cache_hit_rate"] = hits / asked if asked else 0.0
        return out

    def _event(self, rid: int, ev: TokenEvent) -> None:
        if self._batch is not None:
            self._batch.append((rid, ev))
        else:
            self._flush([(rid, ev)])

    def _flush(self, batch: list[tuple[int, TokenEvent]]) -> None:
        """A step's events to the router: one binary EVENTS frame (or JSON Event/Events without one)."""
        if self._send_events is not None:
            self._send_events(batch)
            return
        items = []
        for rid, ev in batch:
            d = {f: getattr(ev, f) for f in _EVENT_FIELDS}     # shallow: asdict's deep copy costs ~10x
            d["tokens"] = list(ev.tokens)
            items.append([rid, d])
        self._send_msg(Event(*items[0]) if len(items) == 1 else Events(items))

    def _send_msg(self, msg: Message) -> None:
        if self._send is not None:
            self._send(msg)


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry of a real-KV worker process."""
    from kvproof.runtime.pd.decode_process import run_decode
    from kvproof.runtime.pd.prefill_process import run_prefill
    from kvproof.runtime.pd.process import worker_args
    def extra(ap: Any) -> None:
        ap.add_argument("--engine", required=True, help="EngineConfig as JSON")
        ap.add_argument("--cpus", default=None, help="run on these CPUs only, e.g. 1 or 0,2 (pd.cpus); default: all")
    a = worker_args("python -m kvproof.runtime.pd.model_worker", argv, extra)
    if a.cpus is not None:
        pin_process(parse_cpus(a.cpus))                   # before the model and its threads exist
    cfg = PDConfig.from_json(a.config)
    ecfg = engine_config_from_json(a.engine)
    if a.role == "decode":
        return run_decode(cfg, a.client, model=DecodeModel(ecfg, cfg), secret=a.secret, listen_host=a.listen_host)
    model = PrefillModel(ecfg, cfg)                       # with layersplit R: spawns its R-1 followers
    try:
        return run_prefill(cfg, a.rank, a.control, a.data, compute=model.many, live_stats=model.stats,
                           secret=a.secret)
    finally:
        model.core.close()                                 # stop and join the followers


if __name__ == "__main__":
    sys.exit(main())
