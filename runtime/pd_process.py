"""Process entry points: the decode process and one process per prefill rank.

    python -m kvproof.runtime.pd_process decode  --client HOST:PORT --config JSON
    python -m kvproof.runtime.pd_process prefill --rank W --control HOST:PORT --data HOST:PORT --config JSON

Each process runs one loop thread that owns its spec instance; the channel and
transport threads only put events into the loop's inbox (and the decode
transports' receive threads call `DecodeWorker.on_land`). Decode listens on one
control channel and one data connection per prefill rank (so a connection's
rank is known without a handshake race) and reports `Ready` (the addresses) and
`Up` (every rank connected) to its client. A rank is declared dead when its
control channel or data connection dies; decode then closes *and drains* the
data connection before firing anything on the rank's behalf.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from typing import IO, Any, Callable

from kvproof.runtime.channel import Channel, ChannelClosed, ChannelConfig, ChannelListener
from kvproof.runtime.decode_worker import DecodeWorker
from kvproof.runtime.kv_pool import POOL_REGION, KVPool
from kvproof.runtime.pd_config import PDConfig
from kvproof.runtime.pd_messages import (
    Cancel, Hello, Message, MessageError, Ready, Shutdown, Stats, StatsRequest, Submit, Up, decode_message, encode,
)
from kvproof.runtime.prefill_worker import PrefillRank
from kvproof.runtime.transport import TcpListener, TransportError, make_transport

ACCEPT_TIMEOUT_S = 60.0
LIVE_STATS_S = 0.2         # how often a prefill rank with live_stats reports them to decode


def channel_config(cfg: PDConfig) -> ChannelConfig:
    """Heartbeats of every control channel of the deployment."""
    return ChannelConfig(heartbeat_interval_s=min(0.25, cfg.heartbeat_timeout_s / 4),
                         heartbeat_timeout_s=cfg.heartbeat_timeout_s)


def trace_path(cfg: PDConfig, name: str) -> str | None:
    """Where process `name` (decode, prefill-0, ...) writes its JSON Lines trace, if tracing."""
    if cfg.trace_dir is None:
        return None
    return os.path.join(cfg.trace_dir, f"{name}.jsonl")


def open_trace(cfg: PDConfig, name: str) -> IO[str] | None:
    """A fresh trace file for process `name` (an older one of the same name is replaced), or None."""
    path = trace_path(cfg, name)
    if path is None:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "w")


def _log(who: str, text: str) -> None:
    print(f"[{who} pid {os.getpid()}] {text}", file=sys.stderr, flush=True)


def _parse(msg: Any, who: str, stats: Any) -> Message | None:
    try:
        return decode_message(msg)
    except MessageError as e:
        stats["malformed_messages"] += 1
        _log(who, f"ignored malformed message: {e}")
        return None


# ---------------------------------------------------------------- decode
def run_decode(cfg: PDConfig, client_addr: tuple[str, int], model: Any = None) -> int:
    """The decode process: slot table, KV pool, one control channel + data connection per rank.

    `model` (real-KV mode, pd_model_worker.DecodeModel): reads READY slots into its model, decodes,
    streams Event messages; None: synthetic KV compared byte for byte."""
    inbox: queue.Queue[tuple[str, int, Any]] = queue.Queue()
    ccfg = channel_config(cfg)
    client = Channel.connect(client_addr, config=ccfg, label="decode-client",
                             on_message=lambda m: inbox.put(("client", -1, m)),
                             on_dead=lambda r: inbox.put(("client_dead", -1, r)))
    ctrl_l = [ChannelListener() for _ in range(cfg.writers)]
    data_l = [TcpListener() for _ in range(cfg.writers)]
    ctrls: dict[int, Channel] = {}
    datas: dict[int, Any] = {}
    pool = KVPool(cfg)

    def send(w: int, msg: Message) -> None:
        try:
            ctrls[w].send(encode(msg))
        except ChannelClosed as e:
            inbox.put(("rank_dead", w, f"control channel: {e}"))

    def report(r: Any) -> None:
        if model is not None:
            model.on_result(r)
        client.send(encode(r))

    if model is not None:
        model.attach(pool, lambda m: client.send(encode(m)))
    worker = DecodeWorker(cfg, pool, send, report, trace=open_trace(cfg, "decode"),
                          read=model.read if model is not None else None)
    try:
        client.send(encode(Ready(control=[list(x.address) for x in ctrl_l], data=[list(x.address) for x in data_l])))
        for w in range(cfg.writers):
            ctrls[w] = ctrl_l[w].accept(ACCEPT_TIMEOUT_S, config=ccfg, label=f"decode-ctrl{w}",
                                        on_message=lambda m, w=w: inbox.put(("rank", w, m)),
                                        on_dead=lambda r, w=w: inbox.put(("rank_dead", w, f"control channel: {r}")))
            if cfg.transport == "tcp":
                datas[w] = data_l[w].accept(ACCEPT_TIMEOUT_S, on_land=worker.on_land, label=f"decode-data{w}")
            else:
                raise ValueError(f"transport={cfg.transport!r}: the process runtime supports 'tcp'")
            datas[w].register(pool.buffer, region_id=POOL_REGION)
        client.send(encode(Up(cfg.writers)))
        rank_stats = _decode_loop(cfg, worker, inbox, ctrls, datas, model)
        summary = worker.summary()
        summary["prefill"] = rank_stats
        client.send(encode(Stats(summary)))
        return 0
    except ChannelClosed as e:
        _log("decode", f"client gone: {e}")
        return 1
    finally:
        for ch in ctrls.values():
            ch.close()
        for t in datas.values():
            try:
                t.close_and_drain()
            except TransportError as e:
                _log("decode", str(e))
        for lst in ctrl_l + data_l:
            lst.close()
        worker.inst.close()
        client.close()


def _rank_dead(worker: DecodeWorker, datas: dict[int, Any], ctrls: dict[int, Channel], w: int, why: str) -> None:
    if w in worker.dead:
        return
    ctrls[w].close()
    try:
        datas[w].close_and_drain()       # only now can nothing of rank w land any more
    except TransportError as e:
        _log("decode", f"rank {w}: cannot prove its connection drained ({e}); its slots stay aborting")
        return
    worker.rank_dead(w, why)


def _decode_loop(cfg: PDConfig, worker: DecodeWorker, inbox: queue.Queue, ctrls: dict[int, Channel],
                 datas: dict[int, Any], model: Any = None) -> dict[str, Any]:
    deadline: float | None = None
    rank_stats: dict[str, Any] = {}
    stats_wanted: float | None = None
    busy, last_step = False, 0.0
    while True:
        nxt = worker.tick()
        wait = 0.0 if busy else (min(0.05, nxt) if nxt is not None else 0.05)
        try:
            kind, w, raw = inbox.get(timeout=wait) if wait > 0 else inbox.get_nowait()
        except queue.Empty:
            kind, w, raw = "idle", -1, None
        if kind == "client":
            msg = _parse(raw, "decode", worker.stats)
            if isinstance(msg, Submit):
                try:
                    if model is not None:
                        model.on_submit(msg)
                    extra = None if msg.tokens is None else {"tokens": msg.tokens, "corrupt": msg.corrupt}
                    worker.submit(msg.rid, msg.n_tokens, extra)
                except ValueError as e:
                    worker.stats["malformed_messages"] += 1
                    _log("decode", f"refused submit: {e}")
            elif isinstance(msg, Cancel):
                worker.cancel(msg.rid)
                if model is not None:
                    model.cancel(msg.rid, msg.cause)
            elif isinstance(msg, StatsRequest):
                if model is not None:
                    model.send_stats(worker, msg.nonce)
            elif isinstance(msg, Shutdown) and deadline is None:
                deadline = time.monotonic() + cfg.drain_timeout_s
        elif kind == "client_dead":
            raise ChannelClosed(raw)
        elif kind == "rank":
            msg = _parse(raw, "decode", worker.stats)
            if isinstance(msg, Hello):
                if msg.rank != w:
                    _rank_dead(worker, datas, ctrls, w, f"hello from rank {msg.rank} on rank {w}'s channel")
            elif isinstance(msg, Stats) and msg.data.get("live"):
                if model is not None:
                    model.on_rank_stats(w, msg.data)
            elif isinstance(msg, Stats):                    # a rank's final summary, at shutdown
                rank_stats[str(w)] = msg.data
            elif msg is not None:
                try:
                    worker.on_message(w, msg)
                except ValueError as e:
                    worker.stats["malformed_messages"] += 1
                    _log("decode", f"rank {w}: {e}")
        elif kind == "rank_dead" and stats_wanted is None:
            _rank_dead(worker, datas, ctrls, w, raw)
        if model is not None and (inbox.empty() or time.monotonic() - last_step > 0.01):
            busy = model.step(worker)                       # messages first, but a step every 10 ms
            last_step = time.monotonic()
        for rw, t in datas.items():
            if t.is_dead and rw not in worker.dead and stats_wanted is None:
                _rank_dead(worker, datas, ctrls, rw, f"data connection: {t.dead_reason}")
        now = time.monotonic()
        if stats_wanted is None and deadline is not None and (worker.idle() or now > deadline):
            for rw, ch in ctrls.items():
                if rw not in worker.dead:
                    try:
                        ch.send(encode(Shutdown()))
                    except ChannelClosed:
                        pass
            stats_wanted = now + 3.0
        if stats_wanted is not None and (now > stats_wanted or
                                         len(rank_stats) == cfg.writers - len(worker.dead)):
            return rank_stats


# ---------------------------------------------------------------- prefill
def run_prefill(cfg: PDConfig, rank: int, ctrl_addr: tuple[str, int], data_addr: tuple[str, int],
                compute: Any = None, live_stats: Callable[[], dict[str, Any]] | None = None) -> int:
    """One prefill rank's process: control channel to decode, one data connection with fault injection.

    `compute(alloc) -> uint8 [layers, n_tokens, bytes_per_token]` (real-KV mode) prefills the model;
    None: synthetic KV. `live_stats()`: counters sent to decode every LIVE_STATS_S as a live Stats."""
    who = f"prefill-{rank}"
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
    ch = Channel.connect(ctrl_addr, config=channel_config(cfg), label=f"{who}-ctrl",
                         on_message=lambda m: inbox.put(("msg", m)),
                         on_dead=lambda r: inbox.put(("dead", f"control channel: {r}")))
    ch.send(encode(Hello(rank)))
    t = make_transport(cfg.transport, connect=data_addr, faults=cfg.faults(rank), label=f"{who}-data")
    prank = PrefillRank(cfg, rank, t, lambda m: ch.send(encode(m)), trace=open_trace(cfg, who), compute=compute)
    stop = threading.Event()

    def poll_completions() -> None:
        while not stop.is_set():
            for c in t.poll(timeout=0.05):
                inbox.put(("cq", c))
            if t.is_dead and not t.outstanding():
                inbox.put(("dead", f"data connection: {t.dead_reason}"))
                return

    poller = threading.Thread(target=poll_completions, name=f"{who}-cq", daemon=True)
    poller.start()
    next_live = 0.0

    last_live: dict[str, Any] = {}

    def report_live() -> None:
        # at once when a counter changed (so decode's view is current when its Done arrives), else
        # every LIVE_STATS_S as a heartbeat
        nonlocal next_live, last_live
        if live_stats is None:
            return
        now_stats = live_stats()
        if now_stats != last_live or time.monotonic() >= next_live:
            next_live, last_live = time.monotonic() + LIVE_STATS_S, now_stats
            ch.send(encode(Stats({"live": 1, "rank": rank, **now_stats})))

    try:
        reason = _prefill_loop(prank, inbox, who, report_live)
        if reason is None:
            ch.send(encode(Stats(prank.summary())))
        else:
            _log(who, f"stopping: {reason}")
        return 0
    except ChannelClosed as e:
        _log(who, f"stopping: {e}")
        return 0
    finally:
        stop.set()
        poller.join(2.0)
        try:
            t.close_and_drain()
        except TransportError as e:
            _log(who, str(e))
        prank.inst.close()
        ch.close()


def _prefill_loop(prank: PrefillRank, inbox: queue.Queue, who: str,
                  report_live: Callable[[], None] = lambda: None) -> str | None:
    """Run until Shutdown (returns None) or the rank's connection dies (returns why)."""
    while True:
        report_live()
        try:
            ev = inbox.get(timeout=0.05) if not prank.has_work() else inbox.get_nowait()
        except queue.Empty:
            ev = None
        n = 0
        while ev is not None:
            kind, payload = ev
            if kind == "dead":
                return payload
            if kind == "cq":
                prank.on_completion(payload)
                if not payload.ok:
                    return f"write failed: {payload.error}"
            else:
                msg = _parse(payload, who, prank.stats)
                if isinstance(msg, Shutdown):
                    return None
                if msg is not None:
                    try:
                        prank.on_message(msg)
                    except ValueError as e:
                        prank.stats["malformed_messages"] += 1
                        _log(who, str(e))
            n += 1
            try:
                ev = inbox.get_nowait() if n < 256 else None
            except queue.Empty:
                ev = None
        prank.pump()


# ---------------------------------------------------------------- command line
def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"address {text!r}, expected HOST:PORT")
    return host, int(port)


def worker_args(prog: str, argv: list[str] | None = None,
                extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse and check a worker process's command line (decode, or one prefill rank)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("role", choices=("decode", "prefill"))
    ap.add_argument("--config", required=True, help="PDConfig as JSON")
    ap.add_argument("--client", type=_addr, help="decode: the client's channel listener")
    ap.add_argument("--rank", type=int, help="prefill: this rank (writer index)")
    ap.add_argument("--control", type=_addr, help="prefill: decode's control listener for this rank")
    ap.add_argument("--data", type=_addr, help="prefill: decode's data listener for this rank")
    if extra is not None:
        extra(ap)
    a = ap.parse_args(argv)
    if a.role == "decode" and a.client is None:
        ap.error("decode needs --client")
    if a.role == "prefill" and (a.rank is None or a.control is None or a.data is None):
        ap.error("prefill needs --rank, --control and --data")
    return a


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of a worker process."""
    a = worker_args("python -m kvproof.runtime.pd_process", argv)
    cfg = PDConfig.from_json(a.config)
    if a.role == "decode":
        return run_decode(cfg, a.client)
    return run_prefill(cfg, a.rank, a.control, a.data)


if __name__ == "__main__":
    sys.exit(main())
