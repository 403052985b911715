"""`kvproof prove`: run every registered check and report verdicts against expectations.

Each spec-layer protocol a check covers is also sanity-searched (verify/sanity.py):
dead actions and vacuous properties are reported, and a "proven" verdict about an
empty protocol or a property that holds only vacuously is withdrawn (unknown).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from kvproof.spec.core import variant_arg
from kvproof.verify.loader import LoadError
from kvproof.verify.registry import Check, all_checks, unique
from kvproof.verify.sanity import Sanity, sanity
from kvproof.verify.report import dump_json, summary_line, to_json, to_junit, to_sarif, verdict_text
from kvproof.verify.verdict import Status, Verdict

SPEC_FILES = {"kv_slot": "spec/kv_slot.py", "kv_page": "spec/kv_page.py", "hicache": "spec/hicache_plan.py",
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


def _checks_of(modules: list[str], builtin: bool = False) -> list[Check]:
    """The package's checks, or those of the named modules (and the package's, with `builtin`)."""
    if not modules:
        return all_checks()
    from kvproof.verify.loader import load
    return unique((all_checks() if builtin else []) + [c for m in modules for c in load(m).checks])


def expectation_line(verdicts: list[Verdict]) -> str:
    """How the checks expected to prove and those expected to refute came out."""
    def part(exp: Status) -> str:
        vs = [v for v in verdicts if v.expected == exp]
        return f"{sum(v.status == exp for v in vs)}/{len(vs)} {exp.value}"
    return (f"fixed designs: {part(Status.PROVEN)}; pre-fix designs and guard removals: "
            f"{part(Status.REFUTED)}")


def apply_sanity(checks: list[Check], verdicts: list[Verdict]) -> list[Sanity]:
    """Sanity-search each (protocol, variant) the checks cover; withdraw proofs that mean nothing."""
    found: dict[tuple[Any, str], Sanity] = {}
    for c, v in zip(checks, verdicts):
        if c.spec is None or base_variant(c.variant) not in (c.spec.variants or ("",)):
            continue
        key = (c.spec, base_variant(c.variant))
        if key not in found:
            found[key] = sanity(*key)
        s = found[key]
        why = s.empty or s.vacuous.get(v.property)
        if v.status == Status.PROVEN and why:
            v.status = Status.UNKNOWN
            v.detail = f"proof withdrawn: {why}. " + v.detail
            v.method = "withdrawn by the sanity search; was " + v.method
    return list(found.values())


def add_prove_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kvproof prove`."""
    p.add_argument("modules", nargs="*", metavar="MODULE.py",
                   help="run the checks of these protocol modules (files outside the package) instead of "
                        "the package's own")
    p.add_argument("--builtin", action="store_true",
                   help="with MODULE.py arguments: run the package's own checks too")
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
        checks = select(_checks_of(args.modules, args.builtin), args.protocol, args.variant)
    except (SelectionError, LoadError, ValueError) as e:
        print(f"kvproof prove: {e}", file=sys.stderr)
        return 2
    if not checks:
        print("kvproof prove: no checks selected; a module declares them in CHECKS or checks()",
              file=sys.stderr)
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
    sane = apply_sanity(checks, verdicts)
    secs = time.perf_counter() - t0
    if args.json:
        print(dump_json({**to_json(verdicts, secs), "sanity": [s.to_json() for s in sane]}))
    else:
        for s in sane:
            found = s.lines()
            print("\n".join(found) if found else
                  f"SANE     {s.protocol}/{s.variant}: every action fires, no property is vacuous ({s.method})")
        print(summary_line(verdicts) + f" ({secs:.1f}s)")
        print(expectation_line(verdicts) + f"; total time {secs:.1f} s")
    if args.junit:
        Path(args.junit).write_text(to_junit(verdicts, secs))
    if args.sarif:
        Path(args.sarif).write_text(dump_json(to_sarif(verdicts, SPEC_FILES)))
    return 0 if all(v.ok for v in verdicts) else 1
