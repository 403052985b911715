"""`kvproof guards` (guard-necessity report) and `kvproof explore` (explicit-state search)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kvproof.spec.core import Protocol, SpecError, variant_arg
from kvproof.verify.explore import explore, fair_liveness_violations, path_steps, render_state
from kvproof.verify.guards import necessity
from kvproof.verify.report import step_table

def _protocol(name: str) -> type[Protocol]:
    """A catalog protocol by name, or one from a user's module: PATH.py or PATH.py:NAME."""
    from kvproof.verify.loader import LoadError, protocol_from
    try:
        return protocol_from(name)
    except KeyError as e:
        raise SystemExit(f"kvproof: {e.args[0]}") from None
    except (LoadError, SpecError) as e:
        raise SystemExit(f"kvproof: --protocol {name}: {e}") from None


def _params(pairs: list[str] | None) -> dict[str, int]:
    out = {}
    for kv in pairs or []:
        k, sep, v = kv.partition("=")
        if not sep or not v.isdigit():
            raise SystemExit(f"kvproof: --param {kv!r}; expected NAME=INTEGER, e.g. slots=2")
        out[k] = int(v)
    return out


def add_guards_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kvproof guards`."""
    p.add_argument("--protocol", default="kv_slot", help="a protocol name, or PATH.py[:NAME] of your own")
    p.add_argument("--variant", default=None, type=variant_arg,
                   help="default: the protocol's first variant (its fixed one)")
    p.add_argument("--param", action="append", metavar="NAME=N", help="instance size, e.g. writers=1")
    p.add_argument("--depth", type=int, default=14, help="BMC depth per dropped guard")
    p.add_argument("--guard", action="append", help="only these guards")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="analyse this many guards at once, one process each (default: every CPU)")
    p.add_argument("--json", action="store_true")


def guards_main(args: argparse.Namespace) -> int:
    """Drop each guard in turn; report which property breaks and how."""
    proto = _protocol(args.protocol)
    args.variant = args.variant or (proto.variants[0] if proto.variants else "")
    params = {**{p: 1 for p in proto.indices.values()}, **_params(args.param)}   # index sets of size 1
    if args.variant not in proto.variants:
        print(f"kvproof guards: unknown variant {args.variant!r}; expected one of {proto.variants}",
              file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"kvproof guards: --jobs {args.jobs}; expected an integer >= 1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = necessity(proto, args.variant, params, args.depth, args.guard, jobs=args.jobs)
    total = time.perf_counter() - t0
    summary = (f"{len(results)} guards in {total:.1f}s ({args.jobs} processes; "
               f"{sum(r.seconds for r in results):.1f}s summed over guards)")
    if args.json:
        # The total goes to stderr so that --json stays a plain list (its consumers read it as one).
        print(f"kvproof guards: {summary}", file=sys.stderr)
        print(json.dumps([{"guard": r.guard, "kind": r.kind, "actions": r.actions, "needed": r.needed,
                           "breaks": r.broken, "still_inductive": r.still_inductive, "depth": r.depth,
                           "exhaustive_states": r.exhaustive_states,
                           "counterexample": [s.to_json() for s in r.counterexample.steps]
                           if r.counterexample else None, "seconds": round(r.seconds, 3)}
                          for r in results], indent=2))
        return 0
    bounds = ", ".join(f"{k}={v}" for k, v in {**proto.bounds, **params}.items())
    for r in results:
        if r.needed:
            print(f"NEEDED     {r.guard:32s} ({r.kind}, in {', '.join(r.actions)}): without it "
                  f"{r.broken} fails in {len(r.counterexample.steps)} steps")
            print("\n".join("           " + ln for ln in step_table(r.counterexample.steps).splitlines()))
        elif r.still_inductive:
            print(f"redundant  {r.guard:32s} ({r.kind}): every property stays inductive without it")
        elif r.exhaustive_states is not None:
            print(f"redundant* {r.guard:32s} ({r.kind}): the invariant is no longer inductive, but none of "
                  f"the {r.exhaustive_states:,} reachable states of this instance ({bounds}) violates a "
                  f"property (exhaustive search)")
        else:
            print(f"unknown    {r.guard:32s} ({r.kind}): no counterexample up to depth {r.depth}, "
                  f"but the invariant is no longer inductive")
    print(summary)
    return 0


def add_explore_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kvproof explore`."""
    p.add_argument("--protocol", default="kv_slot", help="a protocol name, or PATH.py[:NAME] of your own")
    p.add_argument("--variant", default=None, type=variant_arg,
                   help="default: the protocol's first variant (its fixed one)")
    p.add_argument("--param", action="append", metavar="NAME=N",
                   help="sizes and search bounds, e.g. slots=2 writers=1 max_epoch=1 max_chunks=1")
    p.add_argument("--engine", choices=("python", "spin"), default="python",
                   help="python: the built-in breadth-first search (default); spin: generated Promela "
                        "checked by SPIN (Debian package 'spin' and a C compiler)")
    p.add_argument("--no-symmetry", action="store_true", help="do not reduce by slot symmetry (python engine)")
    p.add_argument("--no-liveness", action="store_true", help="skip the fair-liveness goals")
    p.add_argument("--max-states", type=int, default=500_000,
                   help="python engine: stop (exit 2) beyond this many states")
    p.add_argument("--json", action="store_true")


def explore_main(args: argparse.Namespace) -> int:
    """Exhaustive search of one instance: reachable states, violations, deadlocks, liveness."""
    proto = _protocol(args.protocol)
    args.variant = args.variant or (proto.variants[0] if proto.variants else "")
    if args.variant not in proto.variants:
        print(f"kvproof explore: unknown variant {args.variant!r}; expected one of {proto.variants}",
              file=sys.stderr)
        return 2
    params = {**proto.search_bounds, **_params(args.param)}
    try:
        doc, tables = (_explore_spin if args.engine == "spin" else _explore_python)(proto, args, params)
    except RuntimeError as e:   # state space past the cap, SPIN missing or failing: say which
        print(f"kvproof explore: {e}", file=sys.stderr)
        return 2
    if not proto.actions or not any(not i.strengthening for i in proto.invariants.values()):
        print(f"kvproof explore: {proto.name} has no {'actions' if not proto.actions else 'properties'}: "
              f"nothing was checked ({doc['states']} state(s))", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        if doc.get("symmetry_note"):
            print(f"warning: {doc['symmetry_note']}; searched every state instead")
        live = doc["liveness_violations"]
        print(f"{proto.name}/{args.variant} {doc['params']} [{doc['engine']}, symmetry "
              f"{'on' if doc['symmetry'] else 'off'}]: {doc['states']} states, {doc['transitions']} "
              f"transitions in {doc['seconds']:.2f}s ({doc['states_per_second']} states/s); violated: "
              f"{sorted(doc['violations']) or 'none'}; deadlocks: {doc['deadlocks']}; liveness violations: "
              f"{live if not args.no_liveness else 'not checked'}")
        for prop, table in tables.items():
            print(f"\n{prop}: shortest counterexample ({len(doc['counterexamples'][prop])} steps)\n{table}")
    bad = doc["violations"] or doc["deadlocks"] or any(doc["liveness_violations"].values())
    return 1 if bad else 0


def _explore_python(proto: type[Protocol], args: argparse.Namespace, params: dict[str, int]
                    ) -> tuple[dict, dict[str, str]]:
    ex = explore(proto, args.variant, params, symmetry=None if args.no_symmetry else "slot",
                 max_states=args.max_states)
    live = {} if args.no_liveness else {g: len(fair_liveness_violations(ex, g)) for g in proto.goals}
    cex = {k: path_steps(ex, v) for k, v in ex.violations.items()}
    doc = {"protocol": proto.name, "variant": args.variant, "engine": "python", "params": ex.params,
           "symmetry": "slot" if ex.symmetric else None, "symmetry_note": ex.symmetry_note or None,
           "states": ex.states,
           "transitions": ex.edges, "seconds": round(ex.seconds, 3),
           "states_per_second": round(ex.states / ex.seconds) if ex.seconds else None,
           "violations": {k: render_state(ex.layout, v) for k, v in ex.violations.items()},
           "counterexamples": {k: [s.to_json() for s in v] for k, v in cex.items()},
           "deadlocks": len(ex.deadlocks), "liveness_violations": live,
           "fairness": "strong, per action instance (fair strongly connected components)"}
    return doc, {k: step_table(v) for k, v in cex.items()}


def _explore_spin(proto: type[Protocol], args: argparse.Namespace, params: dict[str, int]
                  ) -> tuple[dict, dict[str, str]]:
    from kvproof.verify.spin import explore_spin
    ex = explore_spin(proto, args.variant, params, liveness=not args.no_liveness)
    live = {g: int(v is not None) for g, v in ex.liveness.items()}
    doc = {"protocol": proto.name, "variant": args.variant, "engine": "spin", "params": ex.params,
           "symmetry": None, "states": ex.states, "transitions": ex.transitions,
           "seconds": round(ex.seconds, 3), "search_seconds": round(ex.search_seconds, 3),
           "compile_seconds": round(ex.compile_seconds, 3),
           "states_per_second": round(ex.states_per_second) if ex.states_per_second else None,
           "states_per_cpu_second": round(ex.states_per_cpu_second) if ex.states_per_cpu_second else None,
           "violations": ex.final_states,
           "counterexamples": {k: [s.to_json() for s in v] for k, v in ex.violations.items()},
           "deadlocks": ex.deadlocks, "liveness_violations": live,
           "liveness_counterexamples": {g: [s.to_json() for s in v] for g, v in ex.liveness.items() if v},
           "fairness": "weak, per action instance (SPIN -f, one process per action instance)"}
    return doc, {k: step_table(v) for k, v in ex.violations.items()}
