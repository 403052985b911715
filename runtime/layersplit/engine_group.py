"""The serving engine's LayerSplit group: rank 0's `LayerSplitGroup`, the follower ranks, the batch on the wire.

Rank 0 (the engine process; with `--engine pd` each prefill rank) spawns ranks 1..R-1 and joins
them in a private gloo group (`layersplit.group.gloo_group`). Every request to the followers is
a small header over a pipe (the pipe lets an idle follower wait without a gloo timeout and see
EOF if the engine dies) followed by collectives every rank issues in the same order:

- `forward`: one broadcast of an int64 tensor holding the tokens, the `AttnBatch` tensors and
  the batch's pages, then each rank's part of the checked plan (`layersplit.split_cache.split_forward`).
  The MTP draft head, the logits and sampling read no cache and run on rank 0 only.
- `export`: every layer of a sequence's first n tokens for the PD engine's KV transfer; each
  follower broadcasts the rows of the layers it owns (`exchange_owned`) and rank 0 assembles
  `KVCache.export_tokens`' layout.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

from kvproof.runtime.layersplit.group import broadcast, gloo_group, rendezvous, start_ranks
from kvproof.runtime.model.decoder import AttnBatch, DSAModel
from kvproof.runtime.layersplit.split_cache import SplitKVCache, engine_shape, split_forward
from kvproof.spec.layersplit_plan import LayerSplitShape, owned_layers, rank_plan

GLOO_TIMEOUT_S = 60.0             # a collective that takes longer fails (a rank died mid-step)
_FIELDS = ("positions", "slots", "q_index", "q_mask", "key_slots", "ctx_lens", "page_table", "tok_seq")


def exchange_owned(cache: SplitKVCache, group: Any, pages: list[int], n_tokens: int) -> dict[int, torch.Tensor]:
    """Every follower's layers of a sequence's first n tokens, one broadcast per follower (its `export_owned`).

    Run by every rank of the group in the same order; returns {rank k: uint8 [layers owned by k, n,
    token_bytes]} for k = 1..R-1 (a follower that is not the source receives and drops the block:
    the broadcast is the group's one collective, and the export happens once per prompt).
    """
    shape, works, parts = cache.shape, [], {}
    for src in range(1, shape.ranks):
        if src == cache.rank:
            t = cache.export_owned(pages, n_tokens)
        else:
            owned = owned_layers(src, shape.ranks, shape.layers, shape.ownership)
            t = torch.empty(len(owned), n_tokens, cache.store.token_bytes, dtype=torch.uint8, device=cache.kv.device)
        works.append(broadcast(group, t, src))
        parts[src] = t
    for w in works:
        w.wait()
    return parts


# ---------------------------------------------------------------- the batch on the wire
@dataclass(frozen=True)
class BatchSizes:
    """The header of one step: sizes of the tokens, the AttnBatch tensors and the page list."""

    tokens: int
    seqs: int
    queries: int
    keys: int
    max_pages: int
    pages: int

    def lengths(self) -> tuple[int, ...]:
        """Element counts of tokens, the AttnBatch fields (in `_FIELDS` order) and pages."""
        T, B, Q, K, M = self.tokens, self.seqs, self.queries, self.keys, self.max_pages
        return (T, T, T, B * Q, B * Q, B * K, B, B * M, T, self.pages)


def encode_batch(tokens: torch.Tensor, b: AttnBatch, pages: torch.Tensor) -> tuple[torch.Tensor, BatchSizes]:
    """One int64 tensor holding tokens, the AttnBatch and pages, and its header."""
    B, Q = b.q_index.shape
    sizes = BatchSizes(tokens.numel(), B, Q, b.key_slots.shape[1], b.page_table.shape[1], pages.numel())
    parts = [tokens] + [getattr(b, f) for f in _FIELDS] + [pages]
    return torch.cat([p.reshape(-1).to(torch.int64) for p in parts]), sizes


def decode_batch(payload: torch.Tensor, sizes: BatchSizes) -> tuple[torch.Tensor, AttnBatch, torch.Tensor]:
    """Inverse of encode_batch: (tokens [T], AttnBatch, pages [N])."""
    B, Q, K, M = sizes.seqs, sizes.queries, sizes.keys, sizes.max_pages
    parts = list(torch.split(payload, list(sizes.lengths())))
    tokens, pages = parts[0], parts[-1]
    pos, slots, q_index, q_mask, key_slots, ctx, table, tok_seq = parts[1:-1]
    b = AttnBatch(pos, slots, q_index.view(B, Q), q_mask.view(B, Q).bool(), key_slots.view(B, K), ctx,
                  table.view(B, M).to(torch.int32), tok_seq.to(torch.int32))
    return tokens, b, pages


# ---------------------------------------------------------------- the group
class LayerSplitGroup:
    """Rank 0 of the engine's LayerSplit group: spawns the followers, broadcasts each batch, runs its share.

    The plan is checked (`checked_plan`) before anything is spawned, so a refused plan costs
    no processes. `close()` stops the followers (also when the engine is garbage collected).
    """

    def __init__(self, cfg: Any, model: DSAModel, shape: LayerSplitShape, cache: SplitKVCache) -> None:
        from kvproof.runtime.layersplit.pool import checked_plan
        self.cfg, self.model, self.shape, self.cache = cfg, model, shape, cache
        self.plan = rank_plan(checked_plan(shape, cfg.layersplit_allow_races), 0)
        ctx = mp.get_context("spawn")
        pipes = [ctx.Pipe(duplex=False) for _ in range(shape.ranks - 1)]      # (follower's end, ours)
        self.conns = [w for _, w in pipes]
        addr = rendezvous()                       # MASTER_ADDR/MASTER_PORT or an init method; else loopback
        self.procs = start_ranks(_follower, (shape.ranks, addr, cfg, [r for r, _ in pipes]), shape.ranks - 1)
        for r, _ in pipes:
            r.close()
        self._finalizer = weakref.finalize(self, _shutdown, self.conns, self.procs)
        try:
            self.group = gloo_group(0, shape.ranks, addr[1], GLOO_TIMEOUT_S, check=lambda: self.procs.join(0),
                                    host=addr[0])
        except BaseException:
            self.close()
            raise
        self.memory = [cache.memory()] + [
            SplitKVCache(model.cfg, cache.store.num_pages, "meta", cache.store.ik_fp8 is not None, shape, k).memory()
            for k in range(1, shape.ranks)]
        self.counts = {"forwards": 0, "broadcast_bytes": 0, "exports": 0, "export_bytes": 0}

    def _check_alive(self) -> None:
        for k, p in enumerate(self.procs.processes, start=1):
            if not p.is_alive():
                raise RuntimeError(f"LayerSplit rank {k} (pid {p.pid}) exited with code {p.exitcode}")

    def forward(self, tokens: torch.Tensor, b: AttnBatch) -> torch.Tensor:
        """The model forward on every rank (tokens [T] -> rank 0's last hidden states [T, D])."""
        self._check_alive()
        pages = torch.unique(b.page_table.to(torch.int64))
        payload, sizes = encode_batch(tokens, b, pages)
        for c in self.conns:
            c.send(("forward", sizes))
        with torch.inference_mode():
            broadcast(self.group, payload, 0).wait()
            h = split_forward(self.model, self.cache, self.plan, self.group, tokens, b, pages)
        self.counts["forwards"] += 1
        self.counts["broadcast_bytes"] += self.shape.layers * pages.numel() * self.cache.page_bytes()
        return h

    def export_tokens(self, pages: list[int], n_tokens: int) -> torch.Tensor:
        """Every layer of a sequence's first n tokens, gathered from the owners: uint8 [L, n, token_bytes].

        Byte for byte what `KVCache.export_tokens` gives unsplit (KV rows and float indexer keys;
        the fp8 Indexer pages are derived from those on import), for the PD engine's KV transfer.
        Host-synchronous and between forwards: `forward` waited every transfer of its plan before
        returning, and each follower takes the request from its pipe after the forwards sent
        before it, so the export reads finished KV and cannot race with a plan's ops.
        """
        L, tb = self.shape.layers, self.cache.store.token_bytes
        out = torch.empty(L, n_tokens, tb, dtype=torch.uint8, device=self.cache.kv.device)
        if n_tokens == 0:
            return out
        self._check_alive()
        for c in self.conns:
            c.send(("export", (list(pages), n_tokens)))
        with torch.inference_mode():
            parts = {0: self.cache.export_owned(pages, n_tokens)} | exchange_owned(self.cache, self.group, pages,
                                                                                   n_tokens)
        for k, part in parts.items():
            out[list(owned_layers(k, self.shape.ranks, L, self.shape.ownership))] = part
        self.counts["exports"] += 1
        self.counts["export_bytes"] += sum(p.numel() for k, p in parts.items() if k)
        return out

    def stats(self) -> dict:
        """LayerSplit gauges and counters for /metrics (bytes per rank, forwards, broadcast bytes, exports)."""
        m = self.memory
        return {"layersplit_ranks": self.shape.ranks,
                "layersplit_layers_owned{rank}": {str(x["rank"]): x["layers_owned"] for x in m},
                "layersplit_kv_bytes{rank}": {str(x["rank"]): x["kv_bytes"] + x["indexer_bytes"] for x in m},
                "layersplit_staging_bytes{rank}": {str(x["rank"]): x["staging_bytes"] for x in m},
                "layersplit_unsplit_kv_bytes": m[0]["unsplit_kv_bytes"] + m[0]["unsplit_indexer_bytes"],
                "layersplit_forwards_total": self.counts["forwards"],
                "layersplit_broadcast_bytes_total": self.counts["broadcast_bytes"],
                "layersplit_exports_total": self.counts["exports"],
                "layersplit_export_bytes_total": self.counts["export_bytes"]}

    def close(self) -> None:
        """Stop the followers and wait for them (idempotent)."""
        self._finalizer()


def _shutdown(conns: list[Any], procs: Any, timeout_s: float = 10.0) -> None:
    for c in conns:
        try:
            c.send(("stop", None))
        except (BrokenPipeError, OSError):
            pass                                   # that follower is gone already
        c.close()
    for p in procs.processes:
        p.join(timeout_s)
        if p.is_alive():
            p.terminate()
            p.join(timeout_s)


def _follower(index: int, ranks: int, addr: tuple[str, int], cfg: Any, conns: list[Any]) -> None:
    """Rank index + 1: build the model and this rank's cache share, then run forwards and exports until told to stop."""
    from kvproof.runtime.model.checkpoint import load_model
    from kvproof.runtime.layersplit.pool import checked_plan
    rank, conn = index + 1, conns[index]
    for k, c in enumerate(conns):
        if k != index:
            c.close()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_model(cfg.checkpoint, cfg.model, cfg.device, cfg.backend)
    shape = engine_shape(cfg, model.cfg.n_layers)
    assert shape is not None
    plan = rank_plan(checked_plan(shape, cfg.layersplit_allow_races), rank)
    cache = SplitKVCache(model.cfg, cfg.num_pages, cfg.device, cfg.backend == "triton", shape, rank)
    group = gloo_group(rank, ranks, addr[1], GLOO_TIMEOUT_S, host=addr[0])
    while True:
        try:
            kind, arg = conn.recv()
        except EOFError:                           # the engine process is gone
            return
        if kind == "stop":
            return
        if kind == "export":                       # arg = (pages, n_tokens): see LayerSplitGroup.export_tokens
            with torch.inference_mode():
                exchange_owned(cache, group, *arg)
            continue
        sizes: BatchSizes = arg
        payload = torch.empty(sum(sizes.lengths()), dtype=torch.int64)
        with torch.inference_mode():
            broadcast(group, payload, 0).wait()
            tokens, b, pages = decode_batch(payload, sizes)
            split_forward(model, cache, plan, group, tokens, b, pages)
