"""The PD engine's deployment config and its process cluster: decode and the prefill ranks running the model.

`PDEngineConfig` (slots, ranks, protocol variant, slot size, transport, CPU layout) gives the
`PDConfig` of the slot protocol for a model; `ModelCluster` is the `PDCluster` whose worker
processes run the model (`pd.model_worker`) and whose decode streams token events, Results and live
Stats back to the router's hooks (`pd.engine.PDEngine`).
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from kvproof.runtime.serving.engine import EngineConfig, context_limit
from kvproof.runtime.pd.cluster import ClusterError, PDCluster
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.cpus import CpuLayout, format_cpus, plan_layout
from kvproof.runtime.pd.launch import spawn_worker
from kvproof.runtime.pd.messages import Event, Events, Message, MessageError, Result, Stats, StatsRequest, Submit, events_of
from kvproof.runtime.pd.kv_export import token_bytes
from kvproof.runtime.pd.model_worker import engine_config_to_json
from kvproof.runtime.transport.event_frames import EventBatch, WireEvent


@dataclass(frozen=True)
class PDEngineConfig:
    """Deployment of the PD engine: slots, prefill ranks, protocol variant, slot size."""

    slots: int = 16
    writers: int = 1
    protocol: str = "fixed"                 # fixed | unfixed (the post-mortem's pre-fix variant)
    max_prompt_tokens: int | None = None    # slot size in tokens (longer prompts: ValueError -> 400);
                                            # None: the model's context length
    delay_ms: float | None = None           # injected mean delay of each KV write (None: none)
    transfer_timeout_s: float = 30.0
    heartbeat_timeout_s: float = 10.0
    start_timeout_s: float = 120.0
    transport: str = "tcp"                  # tcp | mooncake | verbs: how KV bytes move (no protocol change)
    listen: tuple[str, int] | None = None   # router role: decode (started elsewhere) connects here; None:
                                            # spawn decode and the prefill ranks on this host
    cpu_layout: str = "auto"                # auto: decode alone on one CPU, the rest elsewhere (pd.cpus); off

    def pd_config(self, ecfg: EngineConfig) -> PDConfig:
        """The PD runtime config: one slot = max_prompt_tokens x layers x the model's KV token bytes."""
        mc = model_config_of(ecfg)
        tb = token_bytes(mc)
        mpt = self.max_prompt_tokens if self.max_prompt_tokens is not None else context_limit(ecfg, mc)
        plan_layout(self.cpu_layout, set())               # ValueError names a bad layout now
        if tb % (8 * self.writers):
            raise ValueError(f"writers={self.writers}: the model's KV token ({tb} bytes) must split into "
                             f"whole 64-bit words per writer")
        return PDConfig(variant=self.protocol, slots=self.slots, writers=self.writers, layers=mc.n_layers,
                        tokens_per_slot=mpt, bytes_per_token=tb, delay_ms=self.delay_ms,
                        transfer_timeout_s=self.transfer_timeout_s, heartbeat_timeout_s=self.heartbeat_timeout_s,
                        transport=self.transport)


def _fields(w: WireEvent) -> dict[str, Any]:
    """A wire event as an Event message's `event` dict (TokenEvent's fields but request_id)."""
    d = w._asdict()
    del d["rid"]
    return d


def model_config_of(ecfg: EngineConfig) -> Any:
    """The served model's config: the checkpoint's, else the embedded one."""
    if ecfg.checkpoint is not None:
        from kvproof.runtime.model.checkpoint import read_config
        return read_config(ecfg.checkpoint)
    return ecfg.model


class ModelCluster(PDCluster):
    """PDCluster whose processes run the model (pd_model_worker); events, Results and live Stats go to hooks."""

    def __init__(self, cfg: PDConfig, ecfg: EngineConfig, on_event: Callable[[Event], None],
                 on_result: Callable[[Result], None], start_timeout_s: float = 120.0,
                 on_events: Callable[[EventBatch], None] | None = None,
                 listen: tuple[str, int] | None = None, secret: Any = None, cpus: CpuLayout | None = None) -> None:
        super().__init__(cfg, start_timeout_s, secret=secret, listen=listen)
        self.cpus = cpus                                    # None: every process runs where the OS puts it
        self.ecfg_json = engine_config_to_json(ecfg)
        # LayerSplit is the prefill ranks' (each shards its KV layers over its own group); decode imports
        # every layer of every prompt, so it runs unsplit
        self.decode_json = engine_config_to_json(replace(ecfg, layersplit=1))
        self.on_event, self.on_result = on_event, on_result
        self.on_events = on_events or (lambda batch: [on_event(Event(w.rid, _fields(w))) for w in batch])
        self.live: dict[str, Any] = {}
        self.live_at = 0.0                                  # when the last live snapshot arrived
        self.live_nonce = 0                                 # the newest StatsRequest decode answered

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        ecfg = self.decode_json if args[0] == "decode" else self.ecfg_json
        pin = []
        if self.cpus is not None:
            pin = ["--cpus", format_cpus(self.cpus.decode if args[0] == "decode" else self.cpus.others)]
        return spawn_worker("kvproof.runtime.pd.model_worker", args[0],
                            [*args[1:], "--config", self.cfg.to_json(), "--engine", ecfg, *pin], self.secret)

    def _on_message(self, raw: Any) -> None:
        if isinstance(raw, EventBatch):                     # checked by the channel thread as it read the frame
            self.on_events(raw)
        else:
            super()._on_message(raw)

    def _route(self, msg: Message) -> None:
        if isinstance(msg, Event):
            self.on_event(msg)
        elif isinstance(msg, Events):
            try:
                evs = events_of(msg)
            except MessageError as e:
                self._control.put(ClusterError(f"malformed message from decode: {e}"))
                return
            for ev in evs:
                self.on_event(ev)
        elif isinstance(msg, Result):
            self.on_result(msg)
        elif isinstance(msg, Stats) and msg.data.get("live"):
            self.live, self.live_at = msg.data, time.monotonic()
            self.live_nonce = max(self.live_nonce, int(msg.data.get("nonce", 0)))
        else:
            self._control.put(msg)

    def submit_request(self, msg: Submit) -> None:
        """Send a real-KV Submit (prompt and sampling parameters) to decode."""
        self._send(msg)

    def request_stats(self, nonce: int) -> None:
        """Ask decode for a live snapshot now (answered with this nonce)."""
        self._send(StatsRequest(nonce))

    def alive(self) -> str | None:
        """None while every process runs (and decode's connection lives), else which one is gone."""
        why = self.dead_role()
        if why is None and self._client is not None and self._client.is_dead:
            why = f"decode connection lost ({self._client.dead_reason})"
        return why

    def workers(self) -> dict[str, int | None]:
        """Each worker's exit code, None while it runs (polling reaps the exited ones: no zombie)."""
        out: dict[str, int | None] = {}
        for name, p in [("decode", self.decode), *((f"prefill-{i}", q) for i, q in enumerate(self.prefill))]:
            if p is not None:
                out[name] = p.poll()
        return out
