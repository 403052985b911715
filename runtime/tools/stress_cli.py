"""Command-line front of the stress harness: `kvproof stress ...` (wired in kvproof/cli.py).

    add_stress_args(parser)    adds --protocol, --requests, --abort-rate, --delay-ms, ... --json
    stress_main(args) -> int   runs it; a rich progress bar and table for people, JSON with --json

Exit status: 0 when the run shows what its protocol must show (fixed: no
corrupted result and every slot free at the end; unfixed: the run completed),
1 when fixed corrupted or leaked a slot, 2 on a failure to run (a bad option, a
transport that cannot run here), 3 when decode died mid-run (the JSON result
then has "error" and "dead_role"; the run ends within a second of the death).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvproof.runtime.pd.cluster import ClusterError
from kvproof.runtime.tools.stress import RoleDied, parse_kill, run_compare, run_stress
from kvproof.runtime.transport import PROCESS_TRANSPORTS, TransportUnavailable
from kvproof.spec.core import variant_arg


def add_stress_args(parser: argparse.ArgumentParser) -> None:
    """Add the stress options to an (sub)parser."""
    parser.add_argument("--protocol", choices=("fixed", "unfixed"), default="fixed", type=variant_arg,
                        help="KV slot protocol variant (unfixed: the pre-fix, racy one)")
    parser.add_argument("--compare", action="store_true",
                        help="run both protocols (halves, order unfixed fixed fixed unfixed) and report both "
                             "plus the fixed/unfixed throughput ratio")
    parser.add_argument("--requests", type=int, default=5000, help="requests to send (default 5000)")
    parser.add_argument("--abort-rate", type=float, default=0.1, help="fraction of requests the client aborts")
    parser.add_argument("--delay-ms", type=float, default=2.0,
                        help="mean injected delay of each KV write, exponential (default 2.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", type=int, default=2, help="prefill ranks (one process each)")
    parser.add_argument("--slots", type=int, default=16, help="decode KV slots")
    parser.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: 1.5 x slots)")
    parser.add_argument("--layers", type=int, default=4, help="layers = chunks per rank per request")
    parser.add_argument("--tokens", type=int, default=64, help="max prompt tokens (slot size)")
    parser.add_argument("--bytes-per-token", type=int, default=256, help="KV bytes per token per layer")
    parser.add_argument("--transfer-timeout", type=float, default=5.0, help="decode-side transfer timeout, s")
    parser.add_argument("--trace-dir", default=None,
                        help="write one JSON Lines trace per process here (with --compare: DIR/<protocol>-<half>)")
    parser.add_argument("--socket-baseline", action="store_true",
                        help="also measure a plain loopback socket copy of the same bytes (and the bare transport)")
    parser.add_argument("--transport", choices=PROCESS_TRANSPORTS, default="tcp",
                        help="KV transport: tcp (default), mooncake (Mooncake Transfer Engine; the mooncake "
                             "extra), verbs (RDMA via pyverbs; needs a device)")
    parser.add_argument("--kill", default=None, metavar="ROLE@SECONDS",
                        help="SIGKILL a worker that many seconds into the run: decode@2 or prefill-0@1.5")
    parser.add_argument("--drop-connection", default=None, metavar="RANK@WRITES",
                        help="drop prefill rank RANK's data connection after WRITES writes, e.g. 0@500")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(requests=args.requests, abort_rate=args.abort_rate, delay_ms=args.delay_ms, seed=args.seed,
                writers=args.writers, slots=args.slots, concurrency=args.concurrency, layers=args.layers,
                tokens=args.tokens, bytes_per_token=args.bytes_per_token,
                transfer_timeout_s=args.transfer_timeout, trace_dir=args.trace_dir,
                socket_baseline=args.socket_baseline, transport=args.transport, kill=parse_kill(args.kill),
                drop=_parse_drop(args.drop_connection))


def _parse_drop(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    rank, _, n = text.partition("@")
    if not rank.isdigit() or not n.isdigit():
        raise ValueError(f"--drop-connection {text!r}: expected RANK@WRITES, e.g. 0@500")
    return int(rank), int(n)


def _ok(report: dict[str, Any]) -> bool:
    return report["protocol"] == "unfixed" or (report["corrupted"] == 0 and report["all_slots_free"])


def stress_main(args: argparse.Namespace) -> int:
    """Run `kvproof stress` with parsed arguments; returns the exit status."""
    try:
        kw = _kwargs(args)
        if args.json:
            out: dict[str, Any] = run_compare(**kw) if args.compare else run_stress(protocol=args.protocol, **kw)
        else:
            out = _with_progress(args, kw)
    except RoleDied as e:
        print(f"kvproof stress: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(e), **e.partial}, indent=2))
        return 3
    except (ClusterError, ValueError, TransportUnavailable) as e:
        print(f"kvproof stress: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(e)}, indent=2))
        return 2
    reports = [out["unfixed"], out["fixed"]] if args.compare else [out]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_table(reports, out.get("throughput_ratio_fixed_over_unfixed"))
    return 0 if all(_ok(r) for r in reports) else 1


def _with_progress(args: argparse.Namespace, kw: dict[str, Any]) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[counts]}"), transient=False) as bar:
        if args.compare:                                     # four half runs; one line for the whole
            task = bar.add_task("stress unfixed+fixed (4 half runs)", total=None, counts="")
            out = run_compare(**kw)
            bar.update(task, total=1, completed=1)
            return out
        task = bar.add_task(f"stress {args.protocol}", total=args.requests, counts="")

        def progress(done: int, total: int, counts: dict[str, int]) -> None:
            bar.update(task, completed=done, counts=" ".join(f"{k}={v}" for k, v in sorted(counts.items())))

        return run_stress(protocol=args.protocol, progress=progress, **kw)


def _print_table(reports: list[dict[str, Any]], ratio: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [("requests", "requests"), ("served (bit-exact)", "served"), ("corrupted results", "corrupted"),
            ("aborted", "aborted"), ("failed", "failed"), ("slots reclaimed", "slots_reclaimed"),
            ("slots free at end / initial", None), ("bytes transferred", "bytes_transferred"),
            ("transfer MB/s", "transfer_mb_s"), ("finished requests/s", "finished_per_s"),
            ("reclaim latency ms p50/p90/p99", None), ("late foreign landings", "foreign_landings"),
            ("wall s", "wall_s")]
    table = Table(title="kvproof stress")
    table.add_column("")
    for r in reports:
        table.add_column(r["protocol"], justify="right")
    for label, key in rows:
        cells = []
        for r in reports:
            if label.startswith("slots free"):
                cells.append(f"{r['slots_free_end']} / {r['slots_initial']}")
            elif label.startswith("reclaim"):
                p = r["reclaim_latency_ms"]
                cells.append(f"{p['p50']} / {p['p90']} / {p['p99']}")
            else:
                cells.append(str(r[key]))
        table.add_row(label, *cells)
    console = Console()
    console.print(table)
    for r in reports:
        for reason, n in sorted(r["failure_reasons"].items()):
            console.print(f"[{r['protocol']}] failed x{n}: {reason}")
    for r in reports:
        b = r.get("socket_baseline")
        if b:
            console.print(f"[{r['protocol']}] same bytes in {b['chunk']} B writes: plain socket "
                          f"{b['plain_socket_gbps']:.3f} GB/s, bare TCP transport {b['transport_gbps']:.3f} GB/s, "
                          f"this stress run {b['stress_transfer_gbps']:.4f} GB/s (with injected delays)")
    if ratio is not None:
        console.print(f"throughput fixed / unfixed: {ratio}")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: python -m kvproof.runtime.tools.stress_cli --protocol fixed ..."""
    ap = argparse.ArgumentParser(prog="kvproof stress", description="PD KV-slot stress harness")
    add_stress_args(ap)
    return stress_main(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
