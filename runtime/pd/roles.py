"""Per-role launch of the PD engine across hosts: `kvproof serve --role router|decode|prefill`.

    router   the HTTP server; decode connects to it at --pd-listen HOST:PORT
    decode   connects to the router at --router HOST:PORT; listens for the prefill ranks at
             --pd-listen HOST:PORT (rank W: control PORT+2W, data PORT+2W+1)
    prefill  rank --rank W; connects to decode at --decode HOST:PORT (decode's --pd-listen)

The names follow SGLang's `--disaggregation-mode prefill|decode` (accepted as an alias of --role)
and vLLM's KV roles (prefill = kv_producer, decode = kv_consumer). Every role gets the same model
and PD flags (as with SGLang), and the same deployment secret from $KVPROOF_SECRET_FILE (a 0600
file) or $KVPROOF_SECRET; nothing private goes on a command line. Without --role the one-command
launcher runs all roles on this host, as before.
"""

from __future__ import annotations

import argparse
import signal
import sys
from dataclasses import replace
from typing import Any

ROLES = ("router", "decode", "prefill")
_VLLM = {"kv_producer": "prefill", "kv_consumer": "decode"}


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"address {text!r}, expected HOST:PORT with 0 < PORT < 65536")
    return host, int(port)


def _role(text: str) -> str:
    role = _VLLM.get(text, text)
    if role not in ROLES:
        raise argparse.ArgumentTypeError(f"role {text!r}, expected one of {', '.join(ROLES)} "
                                         f"(or vLLM's kv_producer / kv_consumer)")
    return role


def add_role_args(parser: argparse.ArgumentParser) -> None:
    """Add the per-role launch options to `serve`'s parser."""
    g = parser.add_argument_group("per-role launch across hosts (default: every role on this host)")
    g.add_argument("--role", "--disaggregation-mode", dest="role", type=_role, default=None,
                   help="run one role only: router | decode | prefill (secret from $KVPROOF_SECRET_FILE)")
    g.add_argument("--pd-listen", type=_addr, default=None, metavar="HOST:PORT",
                   help="router: where decode connects; decode: base address the prefill ranks connect to")
    g.add_argument("--router", type=_addr, default=None, metavar="HOST:PORT", help="decode: the router's --pd-listen")
    g.add_argument("--decode", type=_addr, default=None, metavar="HOST:PORT",
                   help="prefill: decode's --pd-listen")
    g.add_argument("--rank", type=int, default=None, help="prefill: this rank, 0 <= RANK < --writers")


def check_role_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming a missing or misplaced per-role option."""
    role = args.role
    if role is None:
        given = [f"--{k.replace('_', '-')}" for k in ("pd_listen", "router", "decode", "rank")
                 if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --role "
                             f"router|decode|prefill")
        return
    if args.engine != "pd":
        raise ValueError(f"--role {role} needs --engine pd (the roles are the PD engine's)")
    need = {"router": ["pd_listen"], "decode": ["router", "pd_listen"], "prefill": ["decode", "rank"]}[role]
    missing = [f"--{k.replace('_', '-')}" for k in need if getattr(args, k) is None]
    if missing:
        raise ValueError(f"--role {role} needs {' and '.join(missing)}")
    if role == "prefill" and not 0 <= args.rank < args.writers:
        raise ValueError(f"--rank {args.rank}: expected 0 <= rank < --writers {args.writers}")


def run_worker_role(args: argparse.Namespace, ecfg: Any, pd_cfg: Any, secret: Any) -> int:
    """Run this process as the decode worker or one prefill rank until the deployment stops."""
    from kvproof.runtime.pd.decode_process import rank_ports, run_decode
    from kvproof.runtime.pd.decode_model import DecodeModel
    from kvproof.runtime.pd.model_worker import PrefillModel
    from kvproof.runtime.pd.prefill_process import run_prefill

    # SIGTERM ends the role like the end of the deployment: loops unwind, connections close, exit 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.role == "decode":
        host, port = args.pd_listen
        model = DecodeModel(replace(ecfg, layersplit=1), pd_cfg)     # decode imports every layer: unsplit
        return run_decode(pd_cfg, args.router, model=model, secret=secret, listen_host=host, listen_port=port,
                          accept_timeout_s=600.0)
    host, port = args.decode
    ctrl, data = rank_ports(port, args.rank)
    model = PrefillModel(ecfg, pd_cfg)
    try:
        return run_prefill(pd_cfg, args.rank, (host, ctrl), (host, data), compute=model.many,
                           live_stats=model.stats, secret=secret)
    finally:
        model.core.close()
