"""`kvproof serve`: arguments and entry point of the OpenAI-compatible server."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from kvproof.runtime.serving.engine import EngineConfig, LocalEngine
from kvproof.runtime.model.config import PRESETS, ModelConfig, preset
from kvproof.runtime.layersplit.split_cache import engine_shape
from kvproof.runtime.serving.monitor import MonitorConfig
from kvproof.spec.core import variant_arg
from kvproof.runtime.pd.roles import add_role_args, check_role_args, run_worker_role


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` options to a parser."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--model", default="tiny", choices=sorted(PRESETS),
                        help="model preset with seeded weights (default: tiny)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint directory (config.json + safetensors shards); overrides --model")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16", "float64"),
                        help="parameter and KV dtype (default: the preset's, float32 where the preset is "
                             "float64 — float64 is for bit-exactness tests, not serving; a checkpoint's own)")
    parser.add_argument("--served-model-name", default=None, help="name clients pass as 'model'")
    parser.add_argument("--engine", default="pd", choices=("pd", "local"),
                        help="pd (default): a router plus prefill and decode worker processes, KV moved "
                             "through the verified slot protocol; local: one engine core (see --local-core)")
    parser.add_argument("--local-core", default="process", choices=("process", "thread"),
                        help="--engine local: run the EngineCore (scheduler + model) in its own process, so the "
                             "model step and the HTTP server run in parallel (default), or on a thread of the "
                             "server's process")
    parser.add_argument("--backend", default="torch", choices=("torch", "triton"),
                        help="attention: torch (CPU) or the project's Triton kernels")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--num-pages", type=int, default=2048, help="KV cache pages")
    parser.add_argument("--host-cache-pages", type=int, default=0,
                        help="HiCache host tier: pages in host memory under the device pool, evicted prefix "
                             "pages are kept there and swapped back in layer-wise (default 0: off)")
    parser.add_argument("--layersplit", type=int, default=1, metavar="R",
                        help="LayerSplit: run the model forward on R gloo ranks (the engine process + R-1 "
                             "spawned), each storing only its share of the KV layers; with --engine pd every "
                             "prefill rank gets its own R ranks, decode runs unsplit (CPU; default 1: off)")
    parser.add_argument("--max-batch", type=int, default=256, help="most sequences per step")
    parser.add_argument("--max-prefill-tokens", type=int, default=512, help="prefill token budget per step")
    parser.add_argument("--num-drafts", type=int, default=2, help="MTP drafts per step (0: no speculation)")
    parser.add_argument("--no-monitor", action="store_true", help="do not abort on the anomaly rule")
    parser.add_argument("--monitor-min-tokens", type=int, default=None,
                        help="arm the rule after this many tokens (default: the spec's value for the model)")
    parser.add_argument("--monitor-min-accept-length", type=float, default=None,
                        help="abort below this mean accept length (default: the spec's per-model value; "
                             "post-mortem 1.4, tiny 1.0 = off)")
    parser.add_argument("--monitor-max-accept-rate", type=float, default=None,
                        help="abort above this accept rate (default: the spec's per-model value, 0.96)")
    pd = parser.add_argument_group("--engine pd (prefill/decode processes over the PD runtime)")
    pd.add_argument("--writers", type=int, default=1, help="prefill ranks, one process each (default 1)")
    pd.add_argument("--slots", type=int, default=16, help="decode KV slots (default 16)")
    pd.add_argument("--protocol", default="fixed", choices=("fixed", "unfixed"), type=variant_arg,
                    help="KV slot protocol: fixed (safe-to-recycle handshake) or unfixed (the pre-fix bug)")
    pd.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="KV slot size in prompt tokens; longer prompts get HTTP 400 (default: the context length)")
    pd.add_argument("--kv-delay-ms", type=float, default=None,
                    help="inject a mean exponential delay into every KV write (default: none)")
    pd.add_argument("--transport", default="tcp", choices=("tcp", "mooncake", "verbs"),
                    help="how KV bytes move: tcp (default), mooncake (Mooncake Transfer Engine; the mooncake "
                         "extra), verbs (RDMA via pyverbs; needs a device); the protocol is the same")
    pd.add_argument("--cpu-layout", default="auto", choices=("auto", "off"),
                    help="auto (default): decode alone on one CPU, the router and prefill ranks on the others "
                         "(with >= 2 CPUs; the one-command launch); off: wherever the OS puts them")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="cap on prompt + output tokens per request (default: what the model and KV pool allow)")
    parser.add_argument("--api-key", default=os.environ.get("KVPROOF_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $KVPROOF_API_KEY; unset: open)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="server log level (default info)")
    parser.add_argument("--max-body-mb", type=float, default=16.0,
                        help="largest request body in MiB; larger ones get HTTP 413 (default 16)")
    parser.add_argument("--mixed-steps", action="store_true",
                        help="run prefill chunks in the same forward as the decode rows (more tok/s, later first "
                             "token; default: a prefill step runs alone, first)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, best for the tiny model; 0: torch's default)")
    add_role_args(parser)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the parsed arguments describe."""
    mon = MonitorConfig(not args.no_monitor, args.monitor_min_tokens, args.monitor_min_accept_length,
                        args.monitor_max_accept_rate)
    cfg = EngineConfig(model=serving_model(args), checkpoint=args.checkpoint, backend=args.backend,
                       num_pages=args.num_pages, max_batch=args.max_batch,
                       max_prefill_tokens=args.max_prefill_tokens, num_drafts=args.num_drafts,
                       monitor=mon, device=args.device, threads=args.threads or None,
                       host_cache_pages=_host_pages(args.host_cache_pages), layersplit=_layersplit(args),
                       max_model_len=_max_model_len(args.max_model_len), mixed_steps=args.mixed_steps)
    # the rest of LayerSplit's checks (ranks <= layers, no host tier, CPU), before anything starts
    if args.checkpoint is None:
        mc = cfg.model
    else:
        from kvproof.runtime.model.checkpoint import read_config
        mc = read_config(args.checkpoint)
    engine_shape(cfg, mc.n_layers)
    return cfg


def serving_model(args: argparse.Namespace) -> ModelConfig:
    """The preset --model names, in the --dtype asked for (float64 presets serve in float32 by default)."""
    mc = preset(args.model)
    dtype = getattr(args, "dtype", None) or ("float32" if mc.dtype == "float64" else mc.dtype)
    return mc.replace(dtype=dtype)


def _layersplit(args: argparse.Namespace) -> int:
    """--layersplit R: 1 (off) or R ranks (ValueError names a bad value)."""
    r = args.layersplit
    if r < 1:
        raise ValueError(f"--layersplit {r}: expected >= 1 (ranks; 1 disables LayerSplit)")
    return r


def _max_model_len(n: int | None) -> int | None:
    if n is not None and n < 2:
        raise ValueError(f"--max-model-len {n}: expected >= 2 (one prompt and one output token)")
    return n


def _host_pages(n: int) -> int:
    if n < 0:
        raise ValueError(f"--host-cache-pages {n}: expected >= 0 (0 disables the host tier)")
    return n


def build_engine(args: argparse.Namespace) -> Any:
    """The engine selected by --engine (ProcessEngine or LocalEngine by --local-core, or PDEngine); ValueError
    names a bad option."""
    check_role_args(args)
    if args.engine == "pd":
        from kvproof.runtime.pd.engine import PDEngine, PDEngineConfig
        from kvproof.runtime.transport import check_available
        check_available(args.transport)                    # TransportUnavailable says how to get it
        pd = PDEngineConfig(slots=args.slots, writers=args.writers, protocol=args.protocol,
                            max_prompt_tokens=args.max_prompt_tokens, delay_ms=args.kv_delay_ms,
                            transport=args.transport, listen=args.pd_listen if args.role == "router" else None,
                            cpu_layout=args.cpu_layout)
        secret = None
        if args.role is not None:                          # hand-started roles share the operator's secret
            from kvproof.runtime.pd.launch import secret_from_env
            secret = secret_from_env()
        return PDEngine(engine_config(args), pd, model_name=args.served_model_name, secret=secret)
    if args.local_core == "process":
        from kvproof.runtime.serving.engine_proc import ProcessEngine
        return ProcessEngine(engine_config(args), model_name=args.served_model_name)
    return LocalEngine(engine_config(args), model_name=args.served_model_name)


async def _serve(args: argparse.Namespace, engine: Any) -> None:
    from kvproof.runtime.serving.server import start_server
    runner, url = await start_server(engine, args.host, args.port, api_key=args.api_key or None,
                                     max_body_bytes=int(args.max_body_mb * (1 << 20)))
    split = f", layersplit {args.layersplit} ranks" if args.layersplit > 1 else ""
    print(f"kvproof serve: {engine.model_name} on {url} (engine {args.engine}, backend {args.backend}{split}); "
          f"Ctrl-C to stop", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await engine.stop()


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until interrupted; returns the exit code."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvproof.runtime.transport import TransportUnavailable
    try:
        engine = build_engine(args)          # validates every option; starts nothing yet
        if args.max_body_mb <= 0:
            raise ValueError(f"--max-body-mb {args.max_body_mb}: expected > 0")
    except (ValueError, TransportUnavailable) as e:
        print(f"kvproof serve: {e}", file=sys.stderr)
        return 2
    if args.role in ("decode", "prefill"):
        return run_worker_role(args, engine.cfg, engine.pd_cfg, engine.secret)
    asyncio.run(_serve(args, engine))
    return 0
