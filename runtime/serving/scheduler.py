"""Sequences and the continuous-batching scheduler of the single-process engine.

Each step runs one forward over the next chunks of waiting prompts (up to a token budget) and
the decode rows of every running sequence (its last token plus its drafts, verified); a step
whose prompts load pages from the host tier runs its prefill alone (the checked load plan covers
that forward).
The page pool (`model.cache.PagePool`) owns KV pages; a sequence holds pages for
every position it has cached or is about to write. When a decode step cannot get
pages, the newest running sequence is preempted: its pages are freed and it is
re-prefilled later (its output so far is kept and recomputed into the cache).
"""
from __future__ import annotations

import enum
import hashlib
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvproof.runtime.model.cache import PagePool
from kvproof.runtime.serving.engine_api import SamplingParams

if TYPE_CHECKING:
    from kvproof.runtime.hicache.host_tier import HostTier
    from kvproof.runtime.serving.monitor import RequestMonitor


class SeqStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"        # queued or part-way through (chunked) prefill
    RUNNING = "running"        # decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request being generated: its tokens, pages, sampling state and monitor."""

    request_id: str
    prompt: list[int]
    params: "SamplingParams"
    monitor: "RequestMonitor | None" = None
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    page_tags: list[int] = field(default_factory=list)    # content epoch of each page as this sequence holds it
    num_cached: int = 0                    # positions whose KV is in the cache
    status: SeqStatus = SeqStatus.WAITING
    hidden: torch.Tensor | None = None     # [D] hidden state of the last cached position (MTP input)
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    scheduled_at: float | None = None      # when a step first computed for it (queue time = this - arrival)
    logprobs: list = field(default_factory=list)   # per output token, when params.logprobs is set
    preemptions: int = 0
    sent: int = 0                          # output tokens already delivered to the client
    page_hashes: list[bytes] = field(default_factory=list)   # prefix hash of each full target page
    published: int = 0                     # leading pages already in the prefix cache
    swaps: list[tuple[int, int, bytes]] = field(default_factory=list)  # host tier: (host page, page, hash)

    def __post_init__(self) -> None:
        assert self.prompt, f"request {self.request_id}: empty prompt"
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def tokens(self) -> list[int]:
        """Prompt followed by the output so far."""
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        """Prompt plus output length."""
        return len(self.prompt) + len(self.output)

    @property
    def prefill_target(self) -> int:
        """Positions to cache before decoding: the prompt, or all but the last token after a preemption."""
        return len(self.prompt) if not self.output else self.num_tokens - 1


@dataclass
class ScheduledBatch:
    """What one engine step runs in one forward: the next prefill chunk of some waiting sequences and
    one decode row-set (last token + drafts) of some running ones (either list may be empty)."""

    prefill: list[Sequence]
    chunks: list[int]                      # new positions per prefill sequence this step
    decode: list[Sequence]

    @property
    def seqs(self) -> list[Sequence]:
        """Every sequence the step computes for."""
        return self.prefill + self.decode


class Scheduler:
    """FIFO admission of prefill chunks within a token budget, plus a decode row-set of everything running."""

    def __init__(self, pool: PagePool, page_size: int, max_batch: int, max_prefill_tokens: int,
                 lookahead: int, host: "HostTier | None" = None, mixed: bool = True) -> None:
        self.pool, self.page_size, self.host = pool, page_size, host
        self.mixed = mixed                     # prefill chunks and decode rows in one step
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.lookahead = lookahead             # positions a decode step writes: 1 + drafts
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_hit_tokens = 0             # prompt positions served from the prefix cache
        self.prefix_query_tokens = 0           # prompt positions admitted

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def is_idle(self) -> bool:
        """Nothing queued or running."""
        return not self.waiting and not self.running

    def _pages_needed(self, seq: Sequence, positions: int) -> int:
        return max(0, -(-positions // self.page_size) - len(seq.pages))

    def _grow(self, seq: Sequence, positions: int) -> bool:
        n = self._pages_needed(seq, positions)
        if not self.pool.can_allocate(n):
            return False
        new = self.pool.allocate(n)
        seq.pages.extend(new)
        seq.page_tags.extend(self.pool.tag(p) for p in new)
        return True

    def schedule(self) -> ScheduledBatch | None:
        """Pick the next step's batch, allocating the pages it writes; None when idle."""
        seqs, chunks, budget = [], [], self.max_prefill_tokens
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) + len(seqs) >= self.max_batch:
                break
            if not seq.pages:
                self._match_prefix(seq)
            n = min(seq.prefill_target - seq.num_cached, budget)
            if not self._grow(seq, seq.num_cached + n):
                break
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            seqs.append(seq)
            chunks.append(n)
            budget -= n
        # a step with host-tier loads runs its prefill alone (the checked load plan covers that forward);
        # otherwise the running sequences decode in the same forward (one step, not two)
        if seqs and (not self.mixed or any(s.swaps for s in seqs)):
            return ScheduledBatch(seqs, chunks, [])
        if not self.running:
            return ScheduledBatch(seqs, chunks, []) if seqs else None
        ready: list[Sequence] = []
        for seq in list(self.running):
            if seq.status != SeqStatus.RUNNING:          # preempted as a victim of an earlier one
                continue
            while not self._grow(seq, seq.num_tokens - 1 + self.lookahead):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                ready.append(seq)
        # a sequence preempted after it was placed in `ready` is dropped from it
        ready = [s for s in ready if s.status == SeqStatus.RUNNING]
        if not ready and not seqs:        # everything was preempted: its pages are free for prefill
            return self.schedule() if self.waiting else None
        return ScheduledBatch(seqs, chunks, ready)

    def _match_prefix(self, seq: Sequence) -> None:
        """Share the cached pages of the longest cached prefix (always leaving one token to compute)."""
        S, toks = self.page_size, seq.tokens
        n_full = (seq.prefill_target - 1) // S
        if len(seq.page_hashes) < n_full:
            # a cryptographic chain: a client must not be able to craft a colliding prefix
            # (a collision would hand it another request's KV)
            h = seq.page_hashes[-1] if seq.page_hashes else b""
            for j in range(len(seq.page_hashes), n_full):
                h = hashlib.blake2b(h + array("q", toks[j * S:(j + 1) * S]).tobytes(), digest_size=16).digest()
                seq.page_hashes.append(h)
        for h in seq.page_hashes[:n_full]:
            p = self.pool.lookup(h)
            if p is not None:
                self.pool.share(p)
            elif self.host is not None and (r := self.host.reserve(h)) is not None:
                p = r[1]                       # swapped in by the batch that first reads it
                seq.swaps.append((r[0], p, h))
            else:
                break
            seq.pages.append(p)
            seq.page_tags.append(self.pool.tag(p))
        if self.host is not None:
            self.host.count_match(len(seq.pages) - len(seq.swaps), len(seq.swaps), n_full)
        seq.num_cached = seq.published = len(seq.pages)
        seq.num_cached *= S
        self.prefix_hit_tokens += seq.num_cached
        self.prefix_query_tokens += seq.prefill_target

    def prefilled(self, seq: Sequence) -> None:
        """Publish the full prompt pages a prefill chunk completed (and the pages it swapped in)."""
        self._end_swaps(seq, publish=True)
        done = min(seq.num_cached, seq.prefill_target - 1) // self.page_size
        for j in range(seq.published, min(done, len(seq.page_hashes))):
            self.pool.publish(seq.pages[j], seq.page_hashes[j])
        seq.published = max(seq.published, done)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's pages and put it back at the head of the queue."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_cached, seq.hidden, seq.published = 0, None, 0
        seq.status, seq.preemptions = SeqStatus.WAITING, seq.preemptions + 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def promote(self, seq: Sequence) -> None:
        """A sequence finished its prefill: it decodes from the next step on."""
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its pages."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._end_swaps(seq, publish=False)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        """Drop the sequence's hold of every page, with the epochs it holds them at."""
        self.pool.free(seq.pages, seq.page_tags)
        seq.pages, seq.page_tags = [], []

    def reads(self, batch: ScheduledBatch) -> None:
        """Check with the page spec that every page the batch reads is held at the content its sequence
        expects (pages a host load fills this batch are read inside the checked load plan instead)."""
        pages: list[int] = []
        tags: list[int] = []
        for seq in batch.seqs:
            if not seq.swaps:
                pages += seq.pages
                tags += seq.page_tags
                continue
            loading = {p for _, p, _ in seq.swaps}
            for p, e in zip(seq.pages, seq.page_tags):
                if p not in loading:
                    pages.append(p)
                    tags.append(e)
        # a page shared by several sequences (a cached prefix) is read at the same epoch by each: `read` is
        # idempotent for equal arguments, so one firing per distinct (page, epoch) checks the same thing
        pairs = dict.fromkeys(zip(pages, tags))
        self.pool.read([p for p, _ in pairs], [e for _, e in pairs])

    def _end_swaps(self, seq: Sequence, publish: bool) -> None:
        for hp, p, h in seq.swaps:
            if publish:                        # the batch ran: its load landed
                self.pool.loaded(p, h)
            self.host.release(hp)              # type: ignore[union-attr]
        seq.swaps = []

    def counts(self) -> dict[str, Any]:
        """Queue depths and page usage."""
        prefilling = sum(1 for s in self.waiting if s.num_cached > 0)
        return {"waiting": len(self.waiting) - prefilling, "prefilling": prefilling,
                "running": len(self.running), "pages_free": self.pool.num_free,
                "pages_total": self.pool.num_pages, "preemptions": self.preemptions,
                "prefix_hit_tokens": self.prefix_hit_tokens, "prefix_query_tokens": self.prefix_query_tokens}
