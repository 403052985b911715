"""`kvproof bench verify`: verification time and explicit-search speed for 2, 3 and 4 slots."""
from __future__ import annotations

import time
from typing import Any

from kvproof.spec.kv_slot import KVSlot
from kvproof.verify.bmc import bmc, induction
from kvproof.verify.explore import explore


def bench_verify(quick: bool = False, slot_counts: tuple[int, ...] = (2, 3, 4)) -> dict[str, Any]:
    """Time the inductive proof, the unfixed refutation and bounded explicit search per slot count."""
    cap = 20_000 if quick else 200_000
    rows = []
    for n in slot_counts:
        t0 = time.perf_counter()
        ind = induction(KVSlot, "fixed", {"slots": n, "writers": 2}, list(KVSlot.invariants))
        t_ind = time.perf_counter() - t0
        t0 = time.perf_counter()
        cex = bmc(KVSlot, "unfixed", {"slots": n, "writers": 1}, ["no_cross_request_write"], 10)
        t_bmc = time.perf_counter() - t0
        params = {"slots": n, "writers": 1, "max_epoch": 1, "max_chunks": 1}
        t0 = time.perf_counter()
        try:
            ex = explore(KVSlot, "fixed", params, symmetry="slot", max_states=cap)
            states, edges, complete = ex.states, ex.edges, True
        except RuntimeError:          # search cap reached: report the rate over the capped prefix
            states, edges, complete = cap, None, False
        t_bfs = time.perf_counter() - t0
        rows.append({"slots": n, "induction_seconds": round(t_ind, 3), "proven": ind.proven,
                     "unfixed_bmc_seconds": round(t_bmc, 3), "unfixed_cex_steps": len(cex.steps) if cex else None,
                     "search_params": params, "search_complete": complete, "states": states,
                     "transitions": edges, "search_seconds": round(t_bfs, 3),
                     "states_per_second": round(states / t_bfs) if t_bfs else None})
    return {"bench": "verify", "protocol": KVSlot.name, "state_cap": cap, "rows": rows}
