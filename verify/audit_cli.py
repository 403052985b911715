"""`kvproof audit`: validate runtime traces against the spec, or audit a stream plan for races."""
from __future__ import annotations

import argparse
import json
import sys

from kvproof.spec.core import SpecError
from kvproof.verify.trace_audit import TraceFormatError, audit


def add_audit_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kvproof audit`."""
    p.add_argument("paths", nargs="+", metavar="TRACE",
                   help="trace files (JSON Lines) or directories of them, one file per process")
    p.add_argument("--streams", action="store_true",
                   help="the file is a stream plan or recorded stream trace: run the race audit")
    p.add_argument("--format", choices=["text", "json", "sarif"], default=None,
                   help="output format (default text; --json is short for --format json)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.add_argument("--context", type=int, default=5, help="preceding steps shown with an error")
    p.add_argument("--protocol", action="append", metavar="PATH.py",
                   help="a module of your own defining the traces' protocol (repeatable)")


def audit_main(args: argparse.Namespace) -> int:
    """Exit 0: valid; 1: an illegal step or a property violation; 2: malformed input."""
    fmt = args.format or ("json" if args.json else "text")
    if args.streams:
        from kvproof.verify.stream_audit import audit_streams
        if len(args.paths) != 1:
            print("kvproof audit --streams: give exactly one plan or trace file", file=sys.stderr)
            return 2
        code, out = audit_streams(args.paths[0], fmt)
        print(out)
        return code
    if fmt == "sarif":
        print("kvproof audit: SARIF output is for --streams; use --format text|json", file=sys.stderr)
        return 2
    extra = {}
    try:
        from kvproof.verify.loader import LoadError, load
        for path in args.protocol or []:
            extra.update(load(path).protocols)
    except (LoadError, SpecError) as e:
        print(f"kvproof audit: --protocol: {e}", file=sys.stderr)
        return 2
    try:
        res = audit(args.paths, context=args.context, protocols=extra)
    except TraceFormatError as e:
        if fmt == "json":
            print(json.dumps({"ok": False, "verdict": "malformed", "error": str(e)}, indent=2))
        else:
            print(f"kvproof audit: malformed trace: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res.to_json(), indent=2) if fmt == "json" else res.text())
    return 0 if res.ok else 1
