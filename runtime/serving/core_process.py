"""The engine-core process of `engine_proc.ProcessEngine`: an EngineCore stepping back to back, one message per step.

The server sends pickled tuples: ("add", GenerationRequest), ("abort", request_id, cause),
("corrupt", request_id), ("stats", nonce), ("stop",). After each step the core sends
("events", [event tuples in TokenEvent field order], stats snapshot or None, answered nonce or None),
at most one message per step; ("ready", info) once the model is loaded, ("error", message,
traceback) when it fails, ("stopped",) after a stop. A closed pipe (the server died) ends it.
"""
from __future__ import annotations

import dataclasses
import pickle
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from kvproof.runtime.serving.engine_api import TokenEvent

_EV_FIELDS = tuple(f.name for f in dataclasses.fields(TokenEvent))    # the server rebuilds TokenEvent(*fields)
STATS_EVERY_S = 0.25                   # an idle-free core also refreshes the server's snapshot this often


def _as_tuple(ev: TokenEvent) -> tuple:
    return tuple(getattr(ev, f) for f in _EV_FIELDS)             # shallow: no deep copy as astuple makes


def core_main(cfg: Any, conn: Connection) -> None:
    """Entry point of the engine-core process: build the EngineCore, then step and exchange messages."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C reaches the whole group: the server stops us
    from kvproof.runtime.serving.engine import EngineCore
    try:
        core = EngineCore(cfg)
    except BaseException as e:
        conn.send_bytes(pickle.dumps(("error", f"engine core failed to start: {type(e).__name__}: {e}",
                                      traceback.format_exc())))
        conn.close()
        raise SystemExit(1) from None
    conn.send_bytes(pickle.dumps(("ready", {"max_model_len": core.max_model_len,
                                            "vocab_size": core.model.cfg.vocab_size, "stats": core.stats()})))
    try:
        _core_loop(core, conn)
    finally:
        core.close()
        conn.close()


def _core_loop(core: Any, conn: Connection) -> None:
    out: list[tuple] = []
    finished = [False]

    def sink(ev: TokenEvent) -> None:
        out.append(_as_tuple(ev))
        finished[0] |= ev.finished

    busy, stopping, nonce, last_stats = False, False, None, time.monotonic()
    try:
        while not stopping:
            # block only when there is nothing to step; a closed pipe (server gone) ends the loop
            ready = conn.poll(0 if busy else None)
            while ready:
                msg = pickle.loads(conn.recv_bytes())
                kind = msg[0]
                if kind == "add":
                    try:
                        core.add(msg[1], sink)
                    except ValueError as e:                   # the server checked first: a race at most
                        sink(TokenEvent(msg[1].request_id, (), True, "abort", f"refused: {e}"))
                elif kind == "abort":
                    core.abort(msg[1], msg[2])
                elif kind == "corrupt":
                    core.corrupt_after_prefill.add(msg[1])
                elif kind == "stats":
                    nonce = msg[1]
                elif kind == "stop":
                    stopping = True
                ready = conn.poll(0)
            if not stopping:
                busy = core.step()
            now = time.monotonic()
            if nonce is not None or finished[0] or now - last_stats > STATS_EVERY_S:
                stats, last_stats = core.stats(), now
            else:
                stats = None
            if out or stats is not None:
                conn.send_bytes(pickle.dumps(("events", out, stats, nonce), protocol=pickle.HIGHEST_PROTOCOL))
                out.clear()
                nonce, finished[0] = None, False
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return                                                # the server is gone: nobody to answer
    except BaseException as e:                                # a model error: tell the server, then exit
        try:
            conn.send_bytes(pickle.dumps(("error", f"engine core failed: {type(e).__name__}: {e}",
                                          traceback.format_exc())))
        except OSError:
            pass
        raise
    for rid in list(core.seqs):                               # stop: pending requests end as aborts
        core.abort(rid, "shutdown")
    conn.send_bytes(pickle.dumps(("events", out, core.stats(), None)))
    conn.send_bytes(pickle.dumps(("stopped",)))
