"""The one HiCache core: host pages under device pages, write-back, and the checked layer-wise swap-in.

Both HiCache versions are built on `HostPages`: the standalone two-tier cache
(`hicache.cache.HiCache`, radix-indexed, with a toy DSA forward) and the serving engine's
host tier (`hicache.host_tier.HostTier`, hash-indexed under the engine's page pool, with the
decoder's forward). What they share lives here once:

- the host copy of the device tensors, in the same page layout (`[layer, page, ...]`; pinned
  with CUDA so host -> device copies are asynchronous), one KV tensor and one or more
  Indexer-cache tensors;
- the host page table (`pages.TierPages`, which fires the KV page spec);
- `write_back(device_page, host_page)`: the copy out, and the host page becomes cached;
- `swap_in(swaps, indexer, attention)`: the batch plan of `spec.hicache_plan` -- the load
  stream copies each layer's Indexer-cache pages, then its KV pages; the forward stream runs
  the owner's `indexer[l]` and `attention[l]` -- gated by the one `PlanGate` (checked once per
  shape; a racy plan is refused unless `allow_races`) and run by `streams.executor.execute`
  (CPU emulator, synchronous, or CUDA streams).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from kvproof.runtime.hicache.pages import TierPages
from kvproof.runtime.streams.executor import CudaExecutor, ExecResult, OpImpl, execute
from kvproof.runtime.streams.gate import PlanGate
from kvproof.spec.hicache_plan import hicache_plan
from kvproof.spec.streams import Plan, Violation


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Coalesce page ids into (first, count) runs of consecutive pages."""
    out: list[list[int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += 1
        else:
            out.append([p, 1])
    return [(a, n) for a, n in out]


def layer_copy(host: torch.Tensor, dev: torch.Tensor, l: int, swaps: list[tuple[int, int]],
               emulated: bool) -> OpImpl:
    """Two-phase copy of layer ``l``'s pages host -> device for ``swaps`` [(host page, device page)]."""
    src_t = torch.tensor([s for s, _ in swaps], dtype=torch.long)
    dst_t = torch.tensor([d for _, d in swaps], dtype=torch.long)

    def start():
        if not swaps:
            return None
        layer = dev[l]                      # one view per layer: what the indexer reads too
        if emulated:                        # the data is read now, lands at the end
            snap = host[l].index_select(0, src_t)
            return lambda: layer.index_copy_(0, dst_t, snap)
        # On the load stream: pinned host runs -> device staging (async), then scatter to pages.
        # Both tensors are allocated on this stream and used only here (allocator-safe).
        stage = torch.empty((len(swaps),) + tuple(layer.shape[1:]), dtype=layer.dtype, device=layer.device)
        k = 0
        for s, n in _runs([s for s, _ in swaps]):
            stage[k:k + n].copy_(host[l, s:s + n], non_blocking=True)
            k += n
        layer.index_copy_(0, dst_t.to(layer.device, non_blocking=True), stage)
        return None
    return start


def _both(impls: list[OpImpl]) -> OpImpl:
    """One op made of several two-phase parts (started together, committed together)."""
    def start():
        commits = [c for c in (f() for f in impls) if c is not None]
        return (lambda: [c() for c in commits]) if commits else None
    return start


class LoadTarget(Protocol):
    """The device pages a swap-in loads into (the engine's `PagePool`, HiCache's device `TierPages`)."""

    def start_load(self, p: int) -> None:
        """A load into fresh page p starts (the page spec's `load_start`)."""

    def landed(self, p: int) -> None:
        """The load into p has landed (the page spec's `land`)."""


class HostPages:
    """Host pages mirroring device KV and Indexer-cache tensors, their page table and the checked swap-in."""

    def __init__(self, kv: torch.Tensor, idx: Sequence[torch.Tensor], pages: int, variant: str,
                 allow_races: bool, schedule: str, seed: int) -> None:
        # kv, idx: the device tensors [layers, device pages, ...]; pages: host pages
        self.dev_kv, self.dev_idx = kv, list(idx)
        self.cuda = kv.device.type == "cuda"

        def host_like(t: torch.Tensor) -> torch.Tensor:          # [L, pages, ...], pinned with CUDA
            return torch.zeros((t.shape[0], pages) + tuple(t.shape[2:]), dtype=t.dtype, pin_memory=self.cuda)
        self.host_kv = host_like(kv)
        self.host_idx = [host_like(t) for t in self.dev_idx]
        self.pages = TierPages(pages, "host")
        self.allow_races, self.schedule, self.seed = allow_races, schedule, seed
        self.plan = hicache_plan(kv.shape[0], variant)
        self.gate = PlanGate()
        self.gate(self.plan, allow_races)                        # fail fast, before the first batch
        self._executor = CudaExecutor(kv.device) if self.cuda else None
        self.batches = 0                                         # swap-in plans run to the end

    def check(self, plan: Plan) -> tuple[Violation, ...]:
        """The plan's races (spec.streams.check_plan), checked once per plan shape."""
        return self.gate.races(plan)

    def write_back(self, device_page: int, host_page: int) -> None:
        """Copy a device page into a freshly allocated host page, which becomes cached and unheld."""
        self.host_kv[:, host_page].copy_(self.dev_kv[:, device_page])
        for h, d in zip(self.host_idx, self.dev_idx):
            h[:, host_page].copy_(d[:, device_page])
        self.pages.store(host_page)

    def swap_in(self, swaps: list[tuple[int, int]], device: LoadTarget, indexer: Callable[[int], OpImpl],
                attention: Callable[[int], OpImpl], schedule: str | None = None,
                timing: bool = False) -> ExecResult:
        """Run the checked plan of one batch: load `swaps` [(host page, device page of `device`)] layer by
        layer while the forward stream runs `indexer(l)` and `attention(l)` (two-phase ops of the owner);
        the device pages are marked landed only once the plan ran to the end."""
        self.gate(self.plan, self.allow_races)
        for _, p in swaps:
            device.start_load(p)
        emulated = not self.cuda
        impls: dict[str, OpImpl] = {}
        for l in range(self.dev_kv.shape[0]):
            impls[f"load_idx[{l}]"] = _both([layer_copy(h, d, l, swaps, emulated)
                                             for h, d in zip(self.host_idx, self.dev_idx)])
            impls[f"load_kv[{l}]"] = layer_copy(self.host_kv, self.dev_kv, l, swaps, emulated)
            impls[f"indexer[{l}]"] = indexer(l)
            impls[f"attention[{l}]"] = attention(l)
        res = execute(self.plan, impls, schedule or self.schedule, self.seed + self.batches, cuda=self._executor,
                      timing=timing)
        for _, p in swaps:                                       # the plan ran to the end: every load landed
            device.landed(p)
        self.batches += 1
        return res
