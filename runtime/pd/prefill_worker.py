"""One prefill rank: computes a request's KV and pushes it into decode's slot, via the spec.

The KV is synthetic (`kv_chunk`) unless a `compute` hook is given (real-KV mode,
pd.model_worker.PrefillModel.many: the model's exported KV, of which the rank writes its byte share,
and the prompt's last hidden state, which the rank's Done carries so decode samples the first token).
With a hook, an Alloc only records the job; `compute_pending()` (the process loop calls it after
draining its inbox) runs the model once for as many pending prompts as the hook takes, so a
burst of Allocs costs a few batched forwards, and each batch's layers are posted before the next
batch is computed.

`PrefillRank` is the protocol logic of one rank (writer w), free of threads so
tests can drive it step by step; the process loop (pd/prefill_process.py) feeds it
control messages and write completions from one thread. Its per-slot transfer
state lives in the spec `Instance` (actor "prefill"); `jobs` only remembers
what to compute for the slot's current epoch (request id, prompt length); the
next layer to push is the spec's `posted`.

Alloc -> p_on_alloc; then per `pump()` call one layer per active slot: p_post ->
post_write(tag=(slot, writer, epoch, layer)); each completion -> p_complete;
all layers posted and completed -> p_finish (Done). Abort -> whichever of
p_on_abort_unseen / p_on_abort / p_on_abort_busy is enabled; with writes in
flight the Safe answer waits for p_answer_safe after the last completion.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import IO, Any, Callable

import numpy as np

from kvproof.runtime.pd.kv_pool import POOL_REGION, kv_chunk, offset
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import Abort, Alloc, Message, from_emission
from kvproof.runtime.transport import Completion, Transport
from kvproof.runtime.transport.messages import receive_args
from kvproof.spec.core import ProtocolViolation
from kvproof.spec.kv_slot import KVSlot
from kvproof.spec.instance import Instance
from kvproof.spec.machine import Firing

# the prefill actions that receive an abort; their guards are disjoint, at most one is enabled
ABORT_ACTIONS = tuple(a for a, d in KVSlot.actions.items() if d.receives == "abort" and d.actor == "prefill")


@dataclass(frozen=True)
class Prefilled:
    """What real-KV compute made of one prompt: its KV bytes and what its Done carries."""

    kv: np.ndarray                          # uint8 [layers, n_tokens, bytes_per_token]
    hidden: str | None = None               # base64 of the last prompt position's hidden state


# real-KV compute: the first k >= 1 of these Allocs' prompts computed (a ValueError for a bad one)
ComputeFn = Callable[[list[Alloc]], list["Prefilled | ValueError"]]


@dataclass
class Job:
    """What rank w computes for one slot's current epoch."""

    rid: int
    n_tokens: int
    epoch: int
    data: np.ndarray | None = None          # real-KV mode: uint8 [layers, n_tokens, bytes_per_token]
    hidden: str | None = None               # real-KV mode: what Done carries (Prefilled.hidden)
    alloc: Alloc | None = None              # real-KV mode: the prompt, until compute_pending computed `data`


class PrefillRank:
    """Prefill rank `rank`: every transfer step is a fired spec action."""

    def __init__(self, cfg: PDConfig, rank: int, transport: Transport, send: Callable[[Message], None],
                 trace: IO[str] | str | None = None, auto: bool = True,
                 compute: ComputeFn | None = None) -> None:
        # auto=False: a completion fires only p_complete; the caller fires p_finish /
        # p_answer_safe itself, one step at a time (model-based tests)
        if not 0 <= rank < cfg.writers:
            raise ValueError(f"rank={rank}, expected 0 <= rank < writers={cfg.writers}")
        self.cfg, self.rank, self.transport, self._send, self.auto = cfg, rank, transport, send, auto
        self.compute = compute                              # None: synthetic KV (kv_chunk)
        self.inst = Instance(KVSlot, cfg.variant, cfg.spec_params, actor="prefill", trace=trace)
        self.jobs: dict[int, Job] = {}                      # slot -> current epoch's job
        self._sources: dict[int, np.ndarray] = {}           # wr_id -> bytes, alive until completion
        self.stats: Counter[str] = Counter()

    # ------------------------------------------------------------ events
    def on_message(self, msg: Message) -> None:
        """Alloc or Abort from decode; stale or duplicate ones are counted and ignored."""
        if isinstance(msg, (Alloc, Abort)) and msg.writer != self.rank:
            raise ValueError(f"rank {self.rank} got {msg.TYPE} for writer={msg.writer}")
        if isinstance(msg, Alloc):
            if not 1 <= msg.n_tokens <= self.cfg.tokens_per_slot:
                raise ValueError(f"alloc: n_tokens={msg.n_tokens}, expected 1..{self.cfg.tokens_per_slot}")
            if self._try("p_on_alloc", **receive_args(msg, "p_on_alloc")):
                self.jobs[msg.slot] = Job(msg.rid, msg.n_tokens, msg.epoch,
                                          alloc=msg if self.compute is not None else None)
        elif isinstance(msg, Abort):
            act = next((a for a in ABORT_ACTIONS if self._emit(self.inst.try_fire(a, **receive_args(msg, a)))), None)
            if act is None:
                self.stats["ignored_abort"] += 1
                return
            job = self.jobs.get(msg.slot)
            if act == "p_on_abort_unseen" or (job is not None and job.alloc is not None):
                self.jobs.pop(msg.slot, None)               # nothing posted: nothing left to compute or send
        else:
            raise ValueError(f"prefill rank {self.rank}: unexpected {msg.TYPE} message")

    def on_completion(self, c: Completion) -> None:
        """A write completed. OK: it landed. ERROR: the connection is dead (the caller stops the rank)."""
        self._sources.pop(c.wr_id, None)
        if not c.ok:
            self.stats["write_errors"] += 1
            return
        s, w, e = c.tag[0], c.tag[1], c.tag[2]
        self.stats["writes_completed"] += 1
        self._emit(self._fire("p_complete", s=s, w=w, e=e))             # an older epoch's completion is a no-op
        if not self.auto:
            return
        if not self._emit(self.inst.try_fire("p_answer_safe", s=s, w=w)):
            self._maybe_finish(s)

    def compute_pending(self) -> list[str]:
        """Run the model for pending jobs (one batch: as many as the hook takes); why any job was dropped."""
        pending = self.take_pending()
        return self.store_computed(pending, self.compute([j.alloc for _, j in pending])) if pending else []

    def take_pending(self) -> list[tuple[int, Job]]:
        """The jobs whose KV is still to compute (the caller runs `compute` on their Allocs, maybe without
        holding the rank's lock, then hands the results to `store_computed`)."""
        return self._pending() if self.compute is not None else []

    def store_computed(self, pending: list[tuple[int, Job]], out: list[Any]) -> list[str]:
        """Keep `compute`'s results for the first len(out) of `pending`; why any job was dropped."""
        if not 1 <= len(out) <= len(pending):
            raise ValueError(f"compute returned {len(out)} results for {len(pending)} prompts, "
                             f"expected 1..{len(pending)}")
        errors = []
        for (s, job), data in zip(pending, out):
            if self.jobs.get(s) is not job or job.alloc is None:
                continue                                    # replaced or dropped meanwhile
            job.alloc = None
            want = (self.cfg.layers, job.n_tokens, self.cfg.bytes_per_token)
            if not isinstance(data, (Prefilled, ValueError)):
                data = ValueError(f"compute returned {type(data).__name__}, expected Prefilled or ValueError")
            elif isinstance(data, Prefilled) and data.kv.shape != want:
                data = ValueError(f"compute returned KV of shape {data.kv.shape}, expected {want}")
            if isinstance(data, ValueError):
                # the slot gets no writes: decode's transfer timeout ends the request (as before batching)
                del self.jobs[s]
                self.stats["compute_errors"] += 1
                errors.append(f"slot {s} rid {job.rid}: {data}")
            else:
                job.data, job.hidden = data.kv, data.hidden
        return errors

    def pump(self, max_posts: int | None = None) -> int:
        """Post the next layer of every slot still sending (whose KV is computed); returns how many were posted."""
        posted = 0
        for s, job in list(self.jobs.items()):
            if max_posts is not None and posted >= max_posts:
                break
            if job.alloc is not None or self._next_layer(s) >= self.cfg.layers:
                continue
            f = self.inst.try_fire("p_post", s=s, w=self.rank)
            if not f:
                continue
            self._posted(job, self._emit(f))
            posted += 1
            self._maybe_finish(s)
        return posted

    # ------------------------------------------------------------ single steps
    def post(self, s: int) -> None:
        """Compute slot s's next layer and post it as one write tagged (slot, writer, epoch, layer)."""
        self._posted(self.jobs[s], self._emit(self._fire("p_post", s=s, w=self.rank)))

    def finish(self, s: int) -> None:
        """Every posted layer of slot s completed: report Done."""
        self._emit(self._fire("p_finish", s=s, w=self.rank), self.jobs.get(s))
        self.jobs.pop(s, None)

    def answer_safe(self, s: int) -> None:
        """The last write of an aborted transfer completed: answer Safe."""
        self._emit(self._fire("p_answer_safe", s=s, w=self.rank))

    def has_work(self) -> bool:
        """Whether some slot still has KV to compute or layers to post."""
        return any(self._next_layer(s) < self.cfg.layers and self.inst.enabled("p_post", s=s, w=self.rank)
                   for s in self.jobs)

    def summary(self) -> dict[str, Any]:
        """Counters for the stress report."""
        return {**self.stats, "rank": self.rank}

    # ------------------------------------------------------------ internals
    def _pending(self) -> list[tuple[int, Job]]:
        """Jobs whose KV is still to compute, in Alloc order (the spec still lets them post)."""
        return [(s, j) for s, j in self.jobs.items()
                if j.alloc is not None and self.inst.enabled("p_post", s=s, w=self.rank)]

    def _next_layer(self, s: int) -> int:
        return self.inst.get("posted", s, self.rank)

    def _posted(self, job: Job, f: Firing) -> None:
        for em in f.emissions:
            if em.kind == "post_write":
                self._post(job, em.fields)

    def _post(self, job: Job, f: dict[str, Any]) -> None:
        s, w, e, layer = f["slot"], f["writer"], f["epoch"], f["chunk"]
        if job.data is None:
            data = kv_chunk(job.rid, w, layer, job.n_tokens, self.cfg.words_per_writer)
        else:                                               # this rank's byte share of every token
            bw = self.cfg.bytes_per_writer
            data = np.ascontiguousarray(job.data[layer, :, w * bw:(w + 1) * bw]).reshape(-1)
        wr = self.transport.post_write(memoryview(data), POOL_REGION, offset(self.cfg, s, w, layer), tag=(s, w, e, layer))
        self._sources[wr] = data
        self.stats["writes_posted"] += 1
        self.stats["bytes_posted"] += data.nbytes

    def _maybe_finish(self, s: int) -> None:
        job = self.jobs.get(s)
        if job is not None and self._next_layer(s) >= self.cfg.layers \
                and self._emit(self.inst.try_fire("p_finish", s=s, w=self.rank), job):
            self.jobs.pop(s, None)

    def _try(self, action: str, **args: int) -> bool:
        f = self._emit(self.inst.try_fire(action, **args))
        if not f:
            self.stats[f"ignored_{action}"] += 1
        return bool(f)

    def _fire(self, action: str, **args: int) -> Firing:
        f = self.inst.try_fire(action, **args)
        if not f:
            raise ProtocolViolation(KVSlot.name, action, args, f.guard)
        return f

    def _emit(self, f: Firing, job: Job | None = None) -> Firing:
        """Count a firing and send its messages (a Done carries `job`'s hidden state); passes `f` through
        (its posts are the caller's)."""
        if f:
            self.stats["fired"] += 1
            for em in f.emissions:
                if em.kind == "send":
                    done = job is not None and job.hidden is not None and em.fields["channel"] == "done"
                    self._send(from_emission(em, hidden=job.hidden) if done else from_emission(em))  # type: ignore[union-attr]
        return f
