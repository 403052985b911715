"""`kvproof prove`: run every registered check and report verdicts against expectations."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from kvproof.spec.core import variant_arg
from kvproof.verify.registry import Check, all_checks
from kvproof.verify.report import dump_json, summary_line, to_json, to_junit, to_sarif, verdict_text
from kvproof.verify.verdict import Status, Verdict

SPEC_FILES = {"kv_slot": "spec/kv_slot.py", "hicache": "spec/hicache_plan.py",
              "layersplit": "spec/layersplit_plan.py", "specdec_monitor": "spec/specdec_monitor.py"}


class SelectionError(ValueError):
    """--protocol / --variant named something no check has."""


def base_variant(variant: str) -> str:
    """'fixed-without-G' (a guard-removal experiment) belongs to variant 'fixed'."""
    return variant.split("-without-")[0]


def select(checks: list[Check], protocols: list[str] | None, variants: list[str] | None) -> list[Check]:
    """Checks of the named protocols and variants; unknown names raise SelectionError."""
    known_p = sorted({c.protocol for c in checks})
    for p in protocols or []:
        if p not in known_p:
            raise SelectionError(f"unknown protocol {p!r}; expected one of: {', '.join(known_p)}")
    out = [c for c in checks if not protocols or c.protocol in protocols]
    known_v = sorted({c.variant for c in out} | {base_variant(c.variant) for c in out})
    for v in variants or []:
        if v not in known_v:
            raise SelectionError(f"unknown variant {v!r} for {', '.join(protocols or known_p)}; "
                                 f"expected one of: {', '.join(known_v)}")
    return [c for c in out if not variants or c.variant in variants or base_variant(c.variant) in variants]


def run_checks(checks: list[Check], on_done: Callable[[Verdict], None] | None = None) -> list[Verdict]:
    """Run checks in order; a check that crashes is reported UNKNOWN with the error, not lost."""
    out = []
    for c in checks:
        t0 = time.perf_counter()
        try:
            v = c.run()
            v.expected = c.expected
        except Exception as e:     # noqa: BLE001 - one broken check must not hide the others
            v = Verdict(c.protocol, c.variant, c.property, c.params, Status.UNKNOWN, c.expected,
                        "error", f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
        out.append(v)
        if on_done:
            on_done(v)
    return out


def add_prove_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kvproof prove`."""
    p.add_argument("--protocol", action="append", help="run only this protocol's checks (repeatable)")
    p.add_argument("--variant", action="append", type=variant_arg, help="run only this variant (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML here")
    p.add_argument("--sarif", metavar="FILE", help="also write SARIF 2.1.0 here")
    p.add_argument("--list", action="store_true", help="list the selected checks and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="show details of every verdict")


def prove_main(args: argparse.Namespace) -> int:
    """Run the selected checks; exit 0 only when every verdict matches its expectation."""
    try:
        checks = select(all_checks(), args.protocol, args.variant)
    except SelectionError as e:
        print(f"kvproof prove: {e}", file=sys.stderr)
        return 2
    if args.list:
        for c in checks:
            print(f"{c.check_id}  expect {c.expected.value}")
        return 0
    t0 = time.perf_counter()
    if args.json:
        verdicts = run_checks(checks)
    else:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
        console = Console(stderr=False, highlight=False)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as prog:
            task = prog.add_task("proving", total=len(checks))

            def done(v: Verdict) -> None:
                prog.console.print(verdict_text(v, args.verbose), markup=False, soft_wrap=True)
                prog.advance(task)
            verdicts = run_checks(checks, done)
    secs = time.perf_counter() - t0
    if args.json:
        print(dump_json(to_json(verdicts, secs)))
    else:
        print(summary_line(verdicts) + f" ({secs:.1f}s)")
    if args.junit:
        Path(args.junit).write_text(to_junit(verdicts, secs))
    if args.sarif:
        Path(args.sarif).write_text(dump_json(to_sarif(verdicts, SPEC_FILES)))
    return 0 if all(v.ok for v in verdicts) else 1
