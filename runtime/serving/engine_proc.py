"""The local engine with its EngineCore in a process of its own: the HTTP loop and the model step run in parallel.

`LocalEngine` runs the model loop on a thread of the server's process, so the model step and the
HTTP/SSE work take turns under one GIL. `ProcessEngine` gives the `EngineCore` (scheduler, model,
monitor) its own process, as vLLM separates its API server from its engine core: the core runs
`step()` back to back and sends, after each step, ONE message with every event of that step;
requests, aborts, fault injections and stats requests go the other way. Messages are pickled
tuples over a socket pair (`multiprocessing.Pipe`; the core's side and the messages are in
`core_process`); the server's asyncio loop reads the core's messages with `add_reader`, so events
reach the request queues without a thread hop.

Life cycle: `start()` spawns the core (a fresh interpreter: no fork of a threaded server) and waits
for its "ready"; `stop()` asks it to abort what is pending and exit, then joins it (terminate,
then kill, if it does not). The core exits by itself when the server's end of the pipe closes (the
server died), so no core outlives its server. A core that dies or raises sets `error`: pending
requests finish with reason "abort" and the error, `submit` raises RuntimeError (HTTP 503) and
/health answers 503.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, AsyncIterator, Callable

from kvproof.runtime.model.tokenizer import ByteTokenizer
from kvproof.runtime.serving.core_process import core_main
from kvproof.runtime.serving.engine_api import GenerationRequest, StreamingMixin, TokenEvent

Sink = Callable[[TokenEvent], None]
log = logging.getLogger("kvproof.engine")


# ---------------------------------------------------------------- the server side
class ProcessEngine(StreamingMixin):
    """The Engine interface over an EngineCore in its own process (see the module docstring)."""

    def __init__(self, cfg: Any = None, model_name: str | None = None, start_timeout_s: float = 300.0) -> None:
        from kvproof.runtime.serving.engine import EngineConfig
        self.cfg = cfg or EngineConfig()
        self.model_name = model_name or f"kvproof-{self.cfg.model.name}"
        self.tokenizer = ByteTokenizer()
        self.start_timeout_s = start_timeout_s
        self.error: BaseException | None = None
        self.proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_mu = threading.Lock()
        self._mu = threading.Lock()                           # guards _sinks
        self._sinks: dict[str, Sink] = {}
        self._info: dict[str, Any] = {}
        self._stats: dict = {}
        self._nonces = 0
        self._stats_nonce = 0
        self._stopped = threading.Event()

    @property
    def max_model_len(self) -> int:
        """Longest prompt + output one request may have (known once the core is up)."""
        assert self._info, "ProcessEngine.start() was not called"
        return self._info["max_model_len"]

    # ------------------------------------------------------------ lifecycle
    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")            # a fresh interpreter: never fork a threaded server
        mine, theirs = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=core_main, args=(self.cfg, theirs), name="kvproof-engine-core")
        proc.start()
        theirs.close()
        deadline = time.monotonic() + self.start_timeout_s
        while not mine.poll(0.1):
            if not proc.is_alive():
                raise RuntimeError(f"engine core process exited with code {proc.exitcode} before it was ready")
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"engine core not ready within {self.start_timeout_s} s")
        try:
            msg = pickle.loads(mine.recv_bytes())
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"engine core process exited with code {proc.exitcode} before it was ready") from None
        if msg[0] != "ready":
            proc.join(5)
            log.error("%s\n%s", msg[1], msg[2])
            raise RuntimeError(msg[1])
        self._info, self._stats = msg[1], msg[1]["stats"]
        self.proc, self._conn = proc, mine

    async def start(self) -> None:
        """Spawn the engine-core process, wait until its model is loaded, and read its messages on this loop."""
        if self.proc is not None:
            return
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self._spawn)
        assert self._conn is not None
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    async def stop(self) -> None:
        """Abort everything pending, stop the core process and reap it (also after the core failed)."""
        proc = self.proc
        if proc is None:
            return
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            try:
                self._send(("stop",))
            except RuntimeError:
                pass
            # the loop keeps reading: the core's last events (aborts of pending requests) arrive here
            if not await loop.run_in_executor(None, self._stopped.wait, 15.0):
                proc.terminate()
        await loop.run_in_executor(None, _reap, proc)
        self._detach("engine stopped")
        self.proc = None

    def _detach(self, why: str) -> None:
        """Stop reading the core's messages and end every pending request as an abort (`why`)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_reader(conn.fileno())
                except (ValueError, OSError):
                    pass
            conn.close()
        with self._mu:
            pending, self._sinks = self._sinks, {}
        for rid, sink in pending.items():
            sink(TokenEvent(rid, (), True, "abort", why))
        self._stopped.set()

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = RuntimeError(why)
        self._detach(f"engine failed: {why}")

    # ------------------------------------------------------------ messages from the core (loop thread)
    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll(0):
                if self._handle(pickle.loads(conn.recv_bytes())):
                    return
        except (EOFError, OSError):
            proc = self.proc
            if proc is not None:
                proc.join(1.0)
            code = proc.exitcode if proc is not None else None
            if not self._stopped.is_set():
                self._fail(f"engine core process exited (code {code})")

    def _handle(self, msg: tuple) -> bool:
        """Apply one message; True when the core is done (stopped or failed)."""
        kind = msg[0]
        if kind == "events":
            _, events, stats, nonce = msg
            if stats is not None:
                self._stats = stats
            if nonce is not None:
                self._stats_nonce = max(self._stats_nonce, nonce)
            sinks = self._sinks
            for t in events:
                rid = t[0]
                if t[2]:
                    with self._mu:
                        sink = sinks.pop(rid, None)
                else:
                    sink = sinks.get(rid)
                if sink is not None:
                    sink(TokenEvent(*t))
            return False
        if kind == "stopped":
            self._detach("shutdown")
            return True
        if kind == "error":
            log.error("%s\n%s", msg[1], msg[2])                # the core's traceback, in the server's log
            self._fail(msg[1])
            return True
        raise RuntimeError(f"engine core sent an unknown message {kind!r}")

    # ------------------------------------------------------------ requests (any thread)
    def _send(self, msg: tuple) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"engine is not running ({self.error})" if self.error else "engine is not running")
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_mu:
                conn.send_bytes(data)
        except OSError as e:
            raise RuntimeError(f"engine core is gone: {e}") from None

    def submit(self, req: GenerationRequest, sink: Sink) -> None:
        """Queue a request whose events go to `sink` (on the server's loop); ValueError if invalid,
        RuntimeError if the engine is not running."""
        if self.error is not None or self._conn is None:
            raise RuntimeError(f"engine is not running ({self.error!r})" if self.error else "engine is not running")
        n, limit = len(req.prompt_tokens), self.max_model_len
        if n == 0 or n + req.params.max_tokens > limit:
            raise ValueError(f"prompt of {n} tokens + max_tokens {req.params.max_tokens} exceeds the "
                             f"model's context of {limit} tokens")
        vocab = self._info["vocab_size"]
        if any(not 0 <= t < vocab for t in req.prompt_tokens):
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        with self._mu:
            if req.request_id in self._sinks:
                raise ValueError(f"request_id {req.request_id!r} is already running")
            self._sinks[req.request_id] = sink
        try:
            self._send(("add", req))
        except RuntimeError:
            with self._mu:
                self._sinks.pop(req.request_id, None)
            raise

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit a request (ValueError now if invalid) and stream its tokens."""
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.submit(request, q.put_nowait)                    # events arrive on this loop: no hop needed
        return self._events(request.request_id, q)

    def abort(self, request_id: str, cause: str = "client") -> bool:
        """Abort a request; False when it is unknown or already finished."""
        with self._mu:
            if request_id not in self._sinks:
                return False
        try:
            self._send(("abort", request_id, cause))
        except RuntimeError:
            return False
        return True

    def inject_kv_corruption(self, request_id: str) -> None:
        """Fault injection: flip bytes of this request's KV cache right after its prefill (call before generate)."""
        self._send(("corrupt", request_id))

    def stats(self) -> dict:
        """The latest snapshot of the core's counters and gauges."""
        return self._stats

    async def refresh_stats(self, timeout_s: float = 1.0) -> bool:
        """Have the core send a snapshot after its current step and wait for it (a /metrics scrape)."""
        self._nonces += 1
        nonce = self._nonces
        try:
            self._send(("stats", nonce))
        except RuntimeError:
            return False
        end = time.monotonic() + timeout_s
        while self._stats_nonce < nonce:
            if time.monotonic() > end or self._conn is None:
                return False
            await asyncio.sleep(0.002)
        return True


def _reap(proc: multiprocessing.process.BaseProcess) -> None:
    """Join the core process: terminate, then kill, if it does not exit."""
    proc.join(10.0)
    if proc.exitcode is None:
        proc.terminate()
        proc.join(5.0)
    if proc.exitcode is None:
        proc.kill()
        proc.join(5.0)
