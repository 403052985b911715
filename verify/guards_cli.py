"""`kvproof guards` (guard-necessity report) and `kvproof explore` (explicit-state search)."""
from __future__ import annotations

import argparse
import json
import sys

from kvproof.spec.core import Protocol, SpecError, variant_arg
from kvproof.verify.explore import explore, fair_liveness_violations, render_state
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
    results = necessity(proto, args.variant, params, args.depth, args.guard)
    if args.json:
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
    return 0


def add_explore_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kvproof explore`."""
    p.add_argument("--protocol", default="kv_slot", help="a protocol name, or PATH.py[:NAME] of your own")
    p.add_argument("--variant", default=None, type=variant_arg,
                   help="default: the protocol's first variant (its fixed one)")
    p.add_argument("--param", action="append", metavar="NAME=N",
                   help="sizes and search bounds, e.g. slots=2 writers=1 max_epoch=1 max_chunks=1")
    p.add_argument("--no-symmetry", action="store_true", help="do not reduce by slot symmetry")
    p.add_argument("--max-states", type=int, default=500_000, help="stop (exit 2) beyond this many states")
    p.add_argument("--json", action="store_true")


def explore_main(args: argparse.Namespace) -> int:
    """Breadth-first search: reachable states, violations, deadlocks, liveness."""
    proto = _protocol(args.protocol)
    args.variant = args.variant or (proto.variants[0] if proto.variants else "")
    if args.variant not in proto.variants:
        print(f"kvproof explore: unknown variant {args.variant!r}; expected one of {proto.variants}",
              file=sys.stderr)
        return 2
    try:
        ex = explore(proto, args.variant, _params(args.param), symmetry=None if args.no_symmetry else "slot",
                     max_states=args.max_states)
    except RuntimeError as e:          # the state space outgrew the cap: the bounds are too loose
        print(f"kvproof explore: {e}", file=sys.stderr)
        return 2
    live = {g: len(fair_liveness_violations(ex, g)) for g in proto.goals}
    if not proto.actions or not any(not i.strengthening for i in proto.invariants.values()):
        print(f"kvproof explore: {proto.name} has no {'actions' if not proto.actions else 'properties'}: "
              f"nothing was checked ({ex.states} state(s))", file=sys.stderr)
        return 2
    doc = {"protocol": proto.name, "variant": args.variant, "params": ex.params, "states": ex.states,
           "transitions": ex.edges, "seconds": round(ex.seconds, 3),
           "states_per_second": round(ex.states / ex.seconds) if ex.seconds else None,
           "violations": {k: render_state(ex.layout, v) for k, v in ex.violations.items()},
           "deadlocks": len(ex.deadlocks), "liveness_violations": live,
           "symmetry": "slot" if ex.symmetric else None, "symmetry_note": ex.symmetry_note or None}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        if ex.symmetry_note:
            print(f"warning: {ex.symmetry_note}; searched every state instead")
        print(f"{proto.name}/{args.variant} {ex.params}: {ex.states} states, {ex.edges} transitions "
              f"in {ex.seconds:.2f}s; violated: {sorted(ex.violations) or 'none'}; deadlocks: "
              f"{len(ex.deadlocks)}; liveness violations: {live}")
    return 1 if ex.violations or ex.deadlocks or any(live.values()) else 0
