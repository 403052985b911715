"""Run a LayerSplit group: one process per rank on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

``run_group`` (``run_groups`` for several configurations in one launch) spawns the ranks, each builds its ``LayerSplitPool`` share,
computes its shard of the queries (context parallelism: rows ``rank::ranks``)
and reports outputs and memory; ``run_unsplit`` is the one-rank reference.
``start_ranks``, ``gloo_group`` and ``broadcast`` are the pieces the serving
engine's LayerSplit group (``layersplit.engine_group``) shares: spawn rank processes
without waiting, a private gloo group (no global default group, so several groups can live in
one process), and an asynchronous broadcast on it. Where a group meets comes from the usual
torch.distributed settings (``rendezvous``): an init method, or MASTER_ADDR / MASTER_PORT.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvproof.runtime.layersplit.pool import LayerSplitConfig, LayerSplitPool, make_queries


INIT_METHOD_ENV = "KVPROOF_LAYERSPLIT_INIT_METHOD"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rendezvous(env: dict[str, str] | None = None) -> tuple[str, int]:
    """(host, port) where a group's rank 0 hosts the store: $KVPROOF_LAYERSPLIT_INIT_METHOD
    (tcp://HOST:PORT, torch's init_method form), else $MASTER_ADDR (default 127.0.0.1) and
    $MASTER_PORT (default: a free port; set it only with one group per host)."""
    env = os.environ if env is None else env
    method = env.get(INIT_METHOD_ENV)
    if method:
        host, _, port = method.removeprefix("tcp://").rpartition(":")
        if not method.startswith("tcp://") or not host or not port.isdigit():
            raise ValueError(f"{INIT_METHOD_ENV}={method!r}, expected tcp://HOST:PORT")
        return host.strip("[]"), int(port)
    host = env.get("MASTER_ADDR") or "127.0.0.1"
    port = env.get("MASTER_PORT")
    if port is not None and not port.isdigit():
        raise ValueError(f"MASTER_PORT={port!r}, expected a port number")
    return host, int(port) if port else free_port(host)


def start_ranks(target: Callable[..., None], args: tuple, nprocs: int) -> mp.ProcessContext:
    """Spawn ``nprocs`` processes running ``target(i, *args)``, i = 0..nprocs-1; returns without waiting."""
    return mp.start_processes(target, args=args, nprocs=nprocs, join=False, start_method="spawn")


def gloo_group(rank: int, ranks: int, port: int, timeout_s: float = 60.0,
               check: Callable[[], object] | None = None, host: str = "127.0.0.1") -> dist.ProcessGroupGloo:
    """A private gloo group of ``ranks`` on ``host``:``port`` (rank 0 hosts the store); blocks until all joined.

    Rank 0 polls until every other rank has said hello, calling ``check()`` meanwhile (e.g. a
    ProcessContext's ``join(0)``, which raises with the rank's traceback if one died), so a rank
    that fails while starting is reported at once rather than after the timeout.
    """
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, ranks, rank == 0, timeout=timeout, wait_for_workers=False)
    if rank == 0:
        hellos, end = [f"hello/{k}" for k in range(1, ranks)], time.monotonic() + timeout_s
        while not store.check(hellos):
            if check is not None:
                check()
            if time.monotonic() > end:
                raise TimeoutError(f"gloo group on port {port}: not every rank joined within {timeout_s} s")
            time.sleep(0.02)
    else:
        store.set(f"hello/{rank}", "1")
    return dist.ProcessGroupGloo(store, rank, ranks, timeout)


def broadcast(group: dist.ProcessGroupGloo, t: torch.Tensor, src: int) -> Any:
    """Asynchronous broadcast of ``t`` from rank ``src`` on a private group; returns the work (``.wait()``)."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = src, 0
    return group.broadcast([t], opts)


def _worker(rank: int, ranks: int, addr: tuple[str, int], cfgs: list[LayerSplitConfig], count: int,
            outdir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr[0], str(addr[1])
    torch.set_num_threads(1)                       # ranks share the machine's cores
    cuda = cfgs[0].device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
        cfgs = [LayerSplitConfig(**{**c.__dict__, "device": f"cuda:{rank}"}) for c in cfgs]
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=ranks, timeout=timedelta(seconds=60))
    try:
        for k, cfg in enumerate(cfgs):
            pool = LayerSplitPool(cfg, rank, ranks)
            out = pool.forward(make_queries(cfg, count).shard(rank, ranks))
            torch.save({"out": out.cpu(), "memory": pool.memory()}, Path(outdir) / f"cfg{k}-rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_groups(cfgs: Sequence[LayerSplitConfig], ranks: int, count: int) -> list[dict[str, Any]]:
    """Run several configurations, one after another, in one group of ``ranks`` spawned processes."""
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be a positive int, got {ranks!r}")
    cfgs = list(cfgs)
    if not cfgs or len({c.device.split(":")[0] for c in cfgs}) != 1:
        raise ValueError(f"cfgs must be non-empty and on one device type, got {[c.device for c in cfgs]}")
    if cfgs[0].device.startswith("cuda") and torch.cuda.device_count() < ranks:
        raise RuntimeError(f"{ranks} ranks need {ranks} GPUs, found {torch.cuda.device_count()}")
    results = []
    with tempfile.TemporaryDirectory() as d:
        procs = start_ranks(_worker, (ranks, rendezvous(), cfgs, count, d), ranks)
        while not procs.join():
            pass
        for k in range(len(cfgs)):
            parts = [torch.load(Path(d) / f"cfg{k}-rank{r}.pt") for r in range(ranks)]
            first = parts[0]["out"]
            out = torch.empty(first.shape[0], count, *first.shape[2:], dtype=first.dtype)
            for r, p in enumerate(parts):
                out[:, r::ranks] = p["out"]
            results.append({"out": out, "memory": [p["memory"] for p in parts]})
    return results


def run_group(cfg: LayerSplitConfig, ranks: int, count: int) -> dict[str, Any]:
    """Run ``ranks`` processes; the outputs of all queries reassembled ([L, T, H, latent]) and per-rank memory."""
    return run_groups([cfg], ranks, count)[0]


def run_unsplit(cfg: LayerSplitConfig, count: int) -> dict[str, Any]:
    """The unsplit pool (every layer local) on the same queries, in this process."""
    pool = LayerSplitPool(cfg)
    return {"out": pool.forward(make_queries(cfg, count)).cpu(), "memory": [pool.memory()]}
