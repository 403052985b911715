"""Guard-necessity analysis: drop each guard of a protocol in turn and see which property fails."""
from __future__ import annotations

import time
from dataclasses import dataclass

from kvproof.spec.core import NAT_PROPERTY, Protocol
from kvproof.verify.bmc import Counterexample, bmc, induction
from kvproof.verify.symbolic import Encoding


@dataclass
class GuardResult:
    """What happens to the properties without one guard."""

    guard: str
    kind: str                        # "local" or "env"
    actions: list[str]
    broken: str | None               # first property that fails, or None
    counterexample: Counterexample | None
    still_inductive: bool            # the invariants remain inductive without the guard
    depth: int                       # BMC bound searched
    seconds: float
    # Neither inductive nor refuted by BMC: every state reachable in the instance was searched
    # (explicit-state, `verify/explore.py`) and this many states hold every property; None when
    # the search was not run or outgrew `max_states` (then the guard stays unknown).
    exhaustive_states: int | None = None

    @property
    def needed(self) -> bool:
        """True when dropping the guard breaks a safety property."""
        return self.broken is not None


def guards_of(protocol: type[Protocol], variant: str, params: dict[str, int]) -> dict[str, tuple[str, list[str]]]:
    """Every named guard of a variant: name -> (kind, actions using it)."""
    enc = Encoding(protocol, variant, params)
    out: dict[str, tuple[str, list[str]]] = {}
    for inst in enc.instances:
        _, m = enc.step(inst, 0)
        for kind, name, _ in m.guards:
            k, acts = out.setdefault(name, (kind, []))
            if inst.adef.name not in acts:
                acts.append(inst.adef.name)
    return out


def necessity(protocol: type[Protocol], variant: str, params: dict[str, int],
              depth: int = 12, only: list[str] | None = None, max_states: int = 1_000_000,
              jobs: int = 1) -> list[GuardResult]:
    """Drop each guard (or those in `only`) and report the property that then fails.

    Without the guard: 1-induction over every invariant (still inductive: redundant); else BMC
    to `depth` (a counterexample: needed); else an exhaustive explicit-state search of the
    instance, up to `max_states` states, which either finds a longer counterexample or shows
    that no reachable state of this instance violates a property. Guards are independent:
    with `jobs` > 1 they are analysed in that many processes (results in the same order)."""
    todo = [(name, kind, actions) for name, (kind, actions) in guards_of(protocol, variant, params).items()
            if (only is None or name in only) and not name.endswith("_delivered")]   # channel semantics
    args = [(protocol, variant, params, depth, max_states, *g) for g in todo]
    if jobs > 1 and len(args) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=min(jobs, len(args))) as pool:
            return list(pool.map(_one, *zip(*args)))
    return [_one(*a) for a in args]


def _one(protocol: type[Protocol], variant: str, params: dict[str, int], depth: int, max_states: int,
         name: str, kind: str, actions: list[str]) -> GuardResult:
    """The necessity analysis of one guard (a process-pool task: arguments picklable)."""
    # The type property is a property here: a guard that only keeps a counter from going
    # negative is needed, since the runtime rejects the negative value (no Z3 type hides it).
    props = [n for n, i in protocol.invariants.items() if not i.strengthening] + [NAT_PROPERTY]
    t0 = time.perf_counter()
    dropped = frozenset({name})
    ind = induction(protocol, variant, params, list(protocol.invariants), 1, dropped)
    cex = None if ind.proven else bmc(protocol, variant, params, props, depth, dropped)
    states = None
    if not ind.proven and cex is None:
        cex, states = _exhaustive(protocol, variant, params, props, dropped, max_states)
    return GuardResult(name, kind, actions, cex.property if cex else None, cex,
                       ind.proven, depth, time.perf_counter() - t0, states)


def _exhaustive(protocol: type[Protocol], variant: str, params: dict[str, int], props: list[str],
                dropped: frozenset[str], max_states: int) -> tuple[Counterexample | None, int | None]:
    """Search every reachable state without the dropped guard: (shortest counterexample, None),
    (None, states searched) when no property fails anywhere, (None, None) past max_states."""
    from kvproof.verify.explore import explore, path_steps, render_state
    try:
        ex = explore(protocol, variant, params, dropped, max_states=max_states)
    except RuntimeError:            # the instance outgrew max_states: stays unknown
        return None, None
    bad = {p: st for p, st in ex.violations.items() if p in props}
    if not bad:
        return None, ex.graph.number_of_nodes()
    runs = {p: path_steps(ex, st) for p, st in bad.items()}
    prop = min(runs, key=lambda p: len(runs[p]))
    return Counterexample(prop, runs[prop], render_state(ex.layout, bad[prop])), None
