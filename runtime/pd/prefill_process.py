"""One prefill rank's process: connects to decode's control and data listeners, then runs its loop.

The loop thread owns the rank's spec instance (`PrefillRank`) and the model; the channel thread
only puts messages into the loop's inbox. The completion poller handles landed writes itself
(p_complete, and p_finish's Done) under the rank's lock, which the loop holds for everything but
the model's forward: a batch's Done goes to decode while the next batch is computed, not after. Both connections authenticate with
the deployment secret (transport/auth.py) before they are used.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import Hello, Shutdown, Stats, encode
from kvproof.runtime.pd.plumbing import LIVE_STATS_S, channel_config, log, open_trace, parse_message
from kvproof.runtime.pd.prefill_worker import PrefillRank
from kvproof.runtime.transport import TransportError, make_transport
from kvproof.runtime.transport.auth import Secret, connect_authenticated
from kvproof.runtime.transport.control import Channel, ChannelClosed


def run_prefill(cfg: PDConfig, rank: int, ctrl_addr: tuple[str, int], data_addr: tuple[str, int],
                compute: Any = None, live_stats: Callable[[], dict[str, Any]] | None = None,
                secret: Secret | None = None) -> int:
    """One prefill rank's process: control channel to decode, one data connection with fault injection.

    `compute(allocs) -> [uint8 [layers, n_tokens, bytes_per_token] | ValueError]` (real-KV mode,
    prefill_worker.ComputeFn) prefills the model for the first k of the pending prompts; None:
    synthetic KV. `live_stats()`: counters sent to decode every LIVE_STATS_S as a live Stats."""
    if secret is None:
        raise ValueError("run_prefill needs the deployment secret (every connection is authenticated)")
    who = f"prefill-{rank}"
    inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
    ch = Channel(connect_authenticated(ctrl_addr, secret, f"ctrl/{rank}")[0], config=channel_config(cfg),
                 label=f"{who}-ctrl", on_message=lambda m: inbox.put(("msg", m)),
                 on_dead=lambda r: inbox.put(("dead", f"control channel: {r}")))
    ch.send(encode(Hello(rank)))
    sock, key = connect_authenticated(data_addr, secret, f"data/{rank}")
    t = make_transport(cfg.transport, sock=sock, key=key, faults=cfg.faults(rank), label=f"{who}-data")
    prank = PrefillRank(cfg, rank, t, lambda m: ch.send(encode(m)), trace=open_trace(cfg, who), compute=compute)
    stop = threading.Event()
    mu = threading.RLock()                 # the rank (spec instance, jobs): loop thread vs completions

    def poll_completions() -> None:
        while not stop.is_set():
            cs = t.poll(timeout=0.05)
            try:
                with mu:                   # landed writes: p_complete (and Done) now, even mid-forward
                    for c in cs:
                        if c.ok:
                            prank.on_completion(c)
            except (ChannelClosed, TransportError) as e:
                inbox.put(("dead", f"control channel: {e}"))
                return
            except Exception as e:         # noqa: BLE001 - a protocol violation stops the loop, loudly
                inbox.put(("error", e))
                return
            for c in cs:
                if not c.ok:               # the loop decides: a NAK lives on, a dead connection stops it
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
        reason = _prefill_loop(prank, inbox, who, report_live, mu)
        if reason is None:
            ch.send(encode(Stats(prank.summary())))
        else:
            log(who, f"stopping: {reason}")
        return 0
    except (ChannelClosed, TransportError) as e:         # decode gone: a post on the dead connection
        log(who, f"stopping: {e}")
        return 0
    finally:
        stop.set()
        poller.join(2.0)
        try:
            t.close_and_drain()
        except TransportError as e:
            log(who, str(e))
        prank.inst.close()
        ch.close()


def _prefill_loop(prank: PrefillRank, inbox: queue.Queue, who: str,
                  report_live: Callable[[], None] = lambda: None, mu: Any = None) -> str | None:
    """Run until Shutdown (returns None) or the rank's connection dies (returns why)."""
    mu = mu if mu is not None else threading.RLock()
    while True:
        with mu:
            report_live()
            work = prank.has_work()
        try:
            ev = inbox.get(timeout=0.05) if not work else inbox.get_nowait()
        except queue.Empty:
            ev = None
        with mu:
            why = _drain(prank, inbox, who, ev)
            if why is not None:
                return why or None
            if prank.compute is None:
                prank.pump()                               # synthetic KV: one layer per slot per turn
                continue
            pending = prank.take_pending()
        if not pending:
            continue
        # real KV: one batched forward over the prompts that arrived (without the lock: completions of
        # the previous batch fire meanwhile), then every layer of it goes out at once
        out = prank.compute([j.alloc for _, j in pending])  # type: ignore[misc]
        with mu:
            for err in prank.store_computed(pending, out):
                log(who, f"prefill failed, the request will time out: {err}")
            report_live()                                  # decode sees this batch's counters before its Done
            while prank.pump():
                pass


def _drain(prank: PrefillRank, inbox: queue.Queue, who: str, ev: Any) -> str | None:
    """Handle `ev` and what else is queued (up to 256 events); '' after Shutdown, why if the rank must stop."""
    n = 0
    while ev is not None:
        kind, payload = ev
        if kind == "dead":
            return payload
        if kind == "error":
            raise payload
        if kind == "cq":
            prank.on_completion(payload)
            if not payload.ok and prank.transport.is_dead:
                return f"write failed: {payload.error}"
            if not payload.ok:                  # refused alone (NAK); the connection lives on
                log(who, f"write refused: {payload.error}")
        else:
            msg = parse_message(payload, who, prank.stats)
            if isinstance(msg, Shutdown):
                return ""
            if msg is not None:
                try:
                    prank.on_message(msg)
                except ValueError as e:
                    prank.stats["malformed_messages"] += 1
                    log(who, str(e))
        n += 1
        try:
            ev = inbox.get_nowait() if n < 256 else None
        except queue.Empty:
            ev = None
    return None
