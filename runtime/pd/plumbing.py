"""What the PD processes share: control-channel heartbeats, trace files, logging, message parsing."""

from __future__ import annotations

import os
import sys
from typing import IO, Any

from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.messages import Message, MessageError, decode_message
from kvproof.runtime.transport.control import ChannelConfig

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


def log(who: str, text: str) -> None:
    """One line on stderr, tagged with the process and its pid."""
    print(f"[{who} pid {os.getpid()}] {text}", file=sys.stderr, flush=True)


def parse_message(msg: Any, who: str, stats: Any) -> Message | None:
    """Decode a control message; a malformed one is counted in `stats`, logged and dropped (None)."""
    try:
        return decode_message(msg)
    except MessageError as e:
        stats["malformed_messages"] += 1
        log(who, f"ignored malformed message: {e}")
        return None
