"""The decode process: accepts the client and every prefill rank, then runs the decode loop.

Its loop thread owns the decode spec instance (`DecodeWorker`) and the model; the channel and
transport threads only put events into the loop's inbox (and the data connections' receive threads
call `DecodeWorker.on_land`), except the protocol's hot messages, handled by their channel's thread as
they arrive (under the worker's lock, which the loop holds for everything but the model step): a
`Submit`, so a new request's `Alloc` goes to the prefill ranks while a decode step runs, not after it,
and a rank's `Done` / `Safe`, so a request whose KV landed gets its first token while a step runs
(`DecodeModel.read`). A rank is declared dead when its control channel or data connection
dies; decode then closes *and drains* the data connection before firing anything on its behalf.
Every connection (client, control, data) passes the deployment secret's mutual challenge-response
(transport/auth.py) for its purpose first; a listener refuses and counts impostors and keeps
waiting for the real rank.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.decode_worker import DecodeWorker
from kvproof.runtime.pd.kv_pool import POOL_REGION, KVPool
from kvproof.runtime.pd.messages import (ClientAbort, Done, Hello, Message, Ready, Safe, Shutdown, Stats, StatsRequest,
                                         Submit, Up, encode)
from kvproof.runtime.pd.plumbing import ACCEPT_TIMEOUT_S, channel_config, log, open_trace, parse_message
from kvproof.runtime.transport import TcpListener, TransportError, make_transport
from kvproof.runtime.transport.auth import REJECTED, Secret, accept_authenticated, connect_authenticated
from kvproof.runtime.transport.control import Channel, ChannelClosed, ChannelListener


def run_decode(cfg: PDConfig, client_addr: tuple[str, int], model: Any = None, secret: Secret | None = None,
               listen_host: str = "127.0.0.1", listen_port: int | None = None,
               accept_timeout_s: float = ACCEPT_TIMEOUT_S) -> int:
    """The decode process: slot table, KV pool, one control channel + data connection per rank.

    `model` (real-KV mode, pd.decode_model.DecodeModel): reads READY slots into its model, decodes,
    streams Event messages; None: synthetic KV compared byte for byte. listen_port (per-role launch):
    rank w listens on base+2w (control) and base+2w+1 (data); None: free ports, reported in Ready."""
    if secret is None:
        raise ValueError("run_decode needs the deployment secret (every connection is authenticated)")
    inbox: queue.Queue[tuple[str, int, Any]] = queue.Queue()
    ccfg = channel_config(cfg)
    mu = threading.RLock()                  # the worker (and the model's pending prompts): loop vs Submits
    up: list[DecodeWorker] = []             # the worker, once every rank is connected

    def on_rank(w: int, m: Any) -> None:
        if up and isinstance(m, dict) and m.get("type") in (Done.TYPE, Safe.TYPE):
            with mu:                        # at once, while the loop thread runs a model step: a Done's
                _rank_message(up[0], w, m)  # first token goes to the client now, not after the step
            inbox.put(("wake", w, None))    # an idle loop admits the started request now, not in 50 ms
        else:
            inbox.put(("rank", w, m))

    def on_client(m: Any) -> None:
        if up and isinstance(m, dict) and m.get("type") == Submit.TYPE:
            with mu:                        # at once, while the loop thread runs a model step
                _submit(up[0], model, m)
        else:
            inbox.put(("client", -1, m))

    client = Channel(connect_authenticated(client_addr, secret, "client")[0], config=ccfg, label="decode-client",
                     on_message=on_client, on_dead=lambda r: inbox.put(("client_dead", -1, r)))
    ctrl_l = [ChannelListener(listen_host, rank_ports(listen_port, w)[0]) for w in range(cfg.writers)]
    data_l = [TcpListener(listen_host, rank_ports(listen_port, w)[1]) for w in range(cfg.writers)]
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
        model.attach(pool, lambda m: client.send(encode(m)), client.send_events, lock=mu)
    worker = DecodeWorker(cfg, pool, send, report, trace=open_trace(cfg, "decode"),
                          read=model.read if model is not None else None)
    try:
        client.send(encode(Ready(control=[list(x.address) for x in ctrl_l], data=[list(x.address) for x in data_l])))
        for w in range(cfg.writers):
            # an impostor on either port is refused and counted; the accept goes on for the real rank
            sock, _ = accept_authenticated(ctrl_l[w].sock, secret, f"ctrl/{w}", accept_timeout_s)
            ctrls[w] = Channel(sock, config=ccfg, label=f"decode-ctrl{w}",
                               on_message=lambda m, w=w: on_rank(w, m),
                               on_dead=lambda r, w=w: inbox.put(("rank_dead", w, f"control channel: {r}")))
            sock, key = accept_authenticated(data_l[w].sock, secret, f"data/{w}", accept_timeout_s)
            datas[w] = make_transport(cfg.transport, sock=sock, key=key, on_land=worker.on_land,
                                      label=f"decode-data{w}")
            datas[w].register(pool.buffer, region_id=POOL_REGION)
        if model is not None:
            model.security = lambda: security_counters(datas)
        up.append(worker)
        client.send(encode(Up(cfg.writers)))
        rank_stats = _decode_loop(cfg, worker, inbox, ctrls, datas, model, mu)
        summary = worker.summary()
        summary["prefill"] = rank_stats
        summary.update(security_counters(datas))
        client.send(encode(Stats(summary)))
        return 0
    except ChannelClosed as e:
        log("decode", f"client gone: {e}")
        return 1
    finally:
        with mu:
            up.clear()                       # a late Submit goes to the inbox nobody reads, not to a closing worker
        for ch in ctrls.values():
            ch.close()
        for t in datas.values():
            try:
                t.close_and_drain()
            except TransportError as e:
                log("decode", str(e))
        for lst in ctrl_l + data_l:
            lst.close()
        worker.inst.close()
        client.close()


def rank_ports(base: int | None, w: int) -> tuple[int, int]:
    """(control, data) listener ports of rank w under base port `base` (None: 0, any free port)."""
    return (0, 0) if base is None else (base + 2 * w, base + 2 * w + 1)


def security_counters(datas: dict[int, Any]) -> dict[str, dict[str, int]]:
    """Refused connections (handshake failures) and refused writes (outside a region, bad MAC), by reason."""
    writes: dict[str, int] = {}
    for t in datas.values():
        for k, v in getattr(t, "refused_writes", {}).items():
            writes[k] = writes.get(k, 0) + v
    return {"rejected_connections_total{reason}": REJECTED.snapshot(), "kv_refused_writes_total{reason}": writes}


def _rank_dead(worker: DecodeWorker, datas: dict[int, Any], ctrls: dict[int, Channel], w: int, why: str) -> None:
    if w in worker.dead:
        return
    ctrls[w].close()
    try:
        datas[w].close_and_drain()       # only now can nothing of rank w land any more
    except TransportError as e:
        log("decode", f"rank {w}: cannot prove its connection drained ({e}); its slots stay aborting")
        return
    worker.rank_dead(w, why)


def _submit(worker: DecodeWorker, model: Any, raw: Any) -> None:
    """A client's Submit: the model keeps the prompt, the worker queues it (Alloc as soon as a slot is free)."""
    msg = parse_message(raw, "decode", worker.stats)
    if not isinstance(msg, Submit):
        return
    try:
        if model is not None:
            model.on_submit(msg)
        extra = None if msg.tokens is None else {"tokens": msg.tokens, "corrupt": msg.corrupt}
        worker.submit(msg.rid, msg.n_tokens, extra)
    except ValueError as e:
        worker.stats["malformed_messages"] += 1
        log("decode", f"refused submit: {e}")


def _rank_message(worker: DecodeWorker, w: int, raw: Any) -> None:
    """A Done or Safe from rank w, on its channel's thread (the worker's lock held)."""
    msg = parse_message(raw, "decode", worker.stats)
    if msg is not None:
        _protocol_message(worker, w, msg)


def _protocol_message(worker: DecodeWorker, w: int, msg: Message) -> None:
    """A spec message from rank w to the worker; a malformed one is counted and logged."""
    try:
        worker.on_message(w, msg)
    except ValueError as e:
        worker.stats["malformed_messages"] += 1
        log("decode", f"rank {w}: {e}")


def _decode_loop(cfg: PDConfig, worker: DecodeWorker, inbox: queue.Queue, ctrls: dict[int, Channel],
                 datas: dict[int, Any], model: Any = None, mu: Any = None) -> dict[str, Any]:
    mu = mu if mu is not None else threading.RLock()
    deadline: float | None = None
    rank_stats: dict[str, Any] = {}
    stats_wanted: float | None = None
    busy, last_step = False, 0.0
    while True:
        with mu:
            nxt = worker.tick()
        wait = 0.0 if busy else (min(0.05, nxt) if nxt is not None else 0.05)
        try:
            kind, w, raw = inbox.get(timeout=wait) if wait > 0 else inbox.get_nowait()
        except queue.Empty:
            kind, w, raw = "idle", -1, None
        with mu:
            deadline, stats_wanted = _handle(cfg, worker, ctrls, datas, model, rank_stats, kind, w, raw,
                                             deadline, stats_wanted)
        if model is not None and (inbox.empty() or time.monotonic() - last_step > 0.01):
            busy = model.step(worker)                       # messages first, but a step every 10 ms
            last_step = time.monotonic()
        with mu:
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


def _handle(cfg: PDConfig, worker: DecodeWorker, ctrls: dict[int, Channel], datas: dict[int, Any], model: Any,
            rank_stats: dict[str, Any], kind: str, w: int, raw: Any, deadline: float | None,
            stats_wanted: float | None) -> tuple[float | None, float | None]:
    """One inbox event (the worker's lock held); returns the new (drain deadline, stats deadline)."""
    if kind == "client":
        if isinstance(raw, dict) and raw.get("type") == Submit.TYPE:
            _submit(worker, model, raw)
        else:
            msg = parse_message(raw, "decode", worker.stats)
            if isinstance(msg, ClientAbort):
                worker.abort(msg.rid)
                if model is not None:
                    model.abort(msg.rid, msg.cause)
            elif isinstance(msg, StatsRequest):
                if model is not None:
                    model.send_stats(worker, msg.nonce)
            elif isinstance(msg, Shutdown) and deadline is None:
                deadline = time.monotonic() + cfg.drain_timeout_s
    elif kind == "client_dead":
        raise ChannelClosed(raw)
    elif kind == "rank":
        msg = parse_message(raw, "decode", worker.stats)
        if isinstance(msg, Hello):
            if msg.rank != w:
                _rank_dead(worker, datas, ctrls, w, f"hello from rank {msg.rank} on rank {w}'s channel")
        elif isinstance(msg, Stats) and msg.data.get("live"):
            if model is not None:
                model.on_rank_stats(w, msg.data)
        elif isinstance(msg, Stats):                    # a rank's final summary, at shutdown
            rank_stats[str(w)] = msg.data
        elif msg is not None:
            _protocol_message(worker, w, msg)
    elif kind == "rank_dead" and stats_wanted is None:
        _rank_dead(worker, datas, ctrls, w, raw)
    return deadline, stats_wanted
