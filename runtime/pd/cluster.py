"""Launch a PD deployment on loopback: one decode process and one process per prefill rank.

The cluster object is the client: it submits and aborts requests over a
control channel to decode and receives one `Result` per request. Child
processes are always killed on `close()` (also on errors and in `__exit__`).

    with PDCluster(PDConfig(variant="fixed")) as c:
        c.submit(rid=1, n_tokens=32)
        print(c.next_result(timeout=5))
        stats = c.shutdown()
"""

from __future__ import annotations

import queue
import subprocess
import time
from typing import Any

from kvproof.runtime.transport.control import Channel, ChannelClosed, ChannelListener
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import (
    ClientAbort, Message, MessageError, Ready, Result, Shutdown, Stats, Submit, Up, decode_message, encode,
)
from kvproof.runtime.pd.launch import spawn_worker
from kvproof.runtime.pd.plumbing import channel_config
from kvproof.runtime.transport import check_available
from kvproof.runtime.transport.auth import Secret, accept_authenticated

_MODULE = "kvproof.runtime.pd.process"


class ClusterError(RuntimeError):
    """The deployment failed to start, died, or broke the client protocol."""


class PDCluster:
    """A decode process plus `writers` prefill-rank processes, driven from this (client) process."""

    def __init__(self, cfg: PDConfig, start_timeout_s: float = 60.0, secret: Secret | None = None,
                 listen: tuple[str, int] | None = None) -> None:
        # listen=None: spawn decode and the ranks here (one-command launch); (host, port): they are
        # started elsewhere (`kvproof serve --role decode|prefill`) and decode connects to this address
        self.cfg, self.start_timeout_s, self.listen = cfg, start_timeout_s, listen
        self.secret = secret or Secret.generate()          # per deployment; reaches workers on stdin only
        self.ready: Ready | None = None                    # decode's listener addresses, once known
        self.results: queue.Queue[Result] = queue.Queue()
        self._control: queue.Queue[Any] = queue.Queue()
        self._listener: ChannelListener | None = None
        self._client: Channel | None = None
        self.decode: subprocess.Popen | None = None
        self.prefill: list[subprocess.Popen] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "PDCluster":
        """Spawn decode, wait for its addresses, spawn the prefill ranks, wait until all are connected."""
        check_available(self.cfg.transport)                # a missing library or device: say so before spawning
        try:
            self._listener = ChannelListener(*(self.listen or ("127.0.0.1", 0)))
            host, port = self._listener.address
            if self.listen is None:
                self.decode = self._spawn(["decode", "--client", f"{host}:{port}"])
            sock, _ = self._accept_decode()
            self._client = Channel(sock, config=channel_config(self.cfg), label="client",
                                   on_message=self._on_message, on_dead=lambda r: self._control.put(ClusterError(r)))
            ready = self.ready = self._expect(Ready)
            for w in range(self.cfg.writers if self.listen is None else 0):
                (ch, cp), (dh, dp) = ready.control[w], ready.data[w]
                self.prefill.append(self._spawn(["prefill", "--rank", str(w), "--control", f"{ch}:{cp}",
                                                 "--data", f"{dh}:{dp}"]))
            self._expect(Up)
            return self
        except BaseException:
            self.close()
            raise

    def _accept_decode(self) -> tuple[Any, bytes]:
        """Accept decode's authenticated client connection (impostors are refused and counted)."""
        assert self._listener is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                return accept_authenticated(self._listener.sock, self.secret, "client", 1.0)
            except TimeoutError:
                if self.decode is not None and self.decode.poll() is not None:
                    raise ClusterError(f"decode process exited with code {self.decode.returncode} "
                                       f"before connecting") from None
                if time.monotonic() > deadline:
                    raise ClusterError(f"decode did not connect within {self.start_timeout_s} s") from None

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        return spawn_worker(_MODULE, args[0], [*args[1:], "--config", self.cfg.to_json()], self.secret)

    def _expect(self, cls: type) -> Any:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                item = self._control.get(timeout=0.1)
            except queue.Empty:
                if self.decode is not None and self.decode.poll() is not None:
                    raise ClusterError(f"decode process exited with code {self.decode.returncode} "
                                       f"while the client waited for {cls.__name__}") from None
                if time.monotonic() > deadline:
                    raise ClusterError(f"no {cls.__name__} from decode within {self.start_timeout_s} s") from None
                continue
            if isinstance(item, Exception):
                raise ClusterError(f"waiting for {cls.__name__}: {item}")
            if isinstance(item, cls):
                return item

    def _on_message(self, raw: Any) -> None:
        msg = self._decode(raw)
        if msg is not None:
            self._route(msg)

    def _decode(self, raw: Any) -> Message | None:
        """The message decode sent, or None after queueing a ClusterError for a malformed one."""
        try:
            return decode_message(raw)
        except MessageError as e:
            self._control.put(ClusterError(f"malformed message from decode: {e}"))
            return None

    def _route(self, msg: Message) -> None:
        """Results to `results`, everything else to the control queue (a subclass routes more)."""
        (self.results if isinstance(msg, Result) else self._control).put(msg)

    def shutdown(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Let decode drain aborting slots, collect every process's Stats, and stop all processes."""
        timeout_s = timeout_s if timeout_s is not None else self.cfg.drain_timeout_s + 15.0
        try:
            if self._client is None:
                raise ClusterError("the cluster is not started")
            try:
                self._client.send(encode(Shutdown()))
            except ChannelClosed as e:
                raise ClusterError(f"decode is gone: {e}") from e
            stats: Stats = self._expect_within(Stats, timeout_s)
            return stats.data
        finally:
            self.close(wait_s=5.0)

    def _expect_within(self, cls: type, timeout_s: float) -> Any:
        old, self.start_timeout_s = self.start_timeout_s, timeout_s
        try:
            return self._expect(cls)
        finally:
            self.start_timeout_s = old

    def close(self, wait_s: float = 0.0) -> None:
        """Stop everything: wait up to wait_s for children to exit, then kill the rest."""
        deadline = time.monotonic() + wait_s
        for p in [self.decode, *self.prefill]:
            if p is None:
                continue
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                p.kill()
                p.wait(5.0)
        if self._client is not None:
            self._client.close()
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> "PDCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ client API
    def submit(self, rid: int, n_tokens: int) -> None:
        """Send a new request to decode."""
        self._send(Submit(rid, n_tokens))

    def abort(self, rid: int, cause: str = "client") -> None:
        """Abort of request rid, and why (ignored by decode if it already ended)."""
        self._send(ClientAbort(rid, cause))

    def next_result(self, timeout: float | None = None) -> Result | None:
        """The next finished request's Result, or None after timeout."""
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            return None

    def kill_role(self, role: str) -> None:
        """SIGKILL a worker by role name: decode or prefill-R."""
        if role == "decode" and self.decode is not None:
            self.decode.kill()
        elif role.startswith("prefill-") and role[8:].isdigit():
            self.kill_prefill(int(role[8:]))
        else:
            raise ValueError(f"role={role!r}, expected 'decode' or 'prefill-R' with 0 <= R < {len(self.prefill)}")

    def dead_role(self) -> str | None:
        """None while every worker runs, else which one exited and how."""
        for name, p in [("decode", self.decode), *((f"prefill-{i}", q) for i, q in enumerate(self.prefill))]:
            if p is not None and p.poll() is not None:
                return f"{name} process exited with code {p.returncode}"
        return None

    def kill_prefill(self, rank: int) -> None:
        """SIGKILL prefill rank `rank`'s process (a crash mid-run)."""
        if not 0 <= rank < len(self.prefill):
            raise ValueError(f"rank={rank}, expected 0 <= rank < {len(self.prefill)}")
        self.prefill[rank].kill()

    def _send(self, msg: Any) -> None:
        if self._client is None:
            raise ClusterError("the cluster is not started; call start() first")
        try:
            self._client.send(encode(msg))
        except ChannelClosed as e:
            raise ClusterError(f"decode is gone: {e}") from e
