"""The stress harness: thousands of requests, random client aborts, late-landing KV writes.

A closed-loop client keeps `concurrency` requests in flight against a real PD
deployment (decode + one process per prefill rank, TCP on loopback) whose KV
writes get exponentially distributed delays, so a write can land after later
writes and control messages. A fraction `abort_rate` of requests is aborted
at a uniformly random time within `abort_window_ms` of submission (before a
slot, while the KV is in flight, while decoding). Decode compares every
finished request's KV bit for bit with the known content; the pre-fix protocol
(`unfixed`) must show corrupted results, the fixed one none, with every slot
back in the free pool at the end.
"""

from __future__ import annotations

import heapq
import os
import random
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

from kvproof.runtime.pd.cluster import ClusterError, PDCluster
from kvproof.runtime.pd.config import PDConfig

Progress = Callable[[int, int, dict[str, int]], None]   # (results so far, requests, status counts)


class RoleDied(ClusterError):
    """A worker the run cannot go on without (decode) died; `partial` is the report so far."""

    def __init__(self, why: str, partial: dict[str, Any]) -> None:
        super().__init__(why)
        self.partial = partial


def parse_kill(text: str | None) -> tuple[str, float] | None:
    """`ROLE@SECONDS` (decode@2, prefill-0@1.5) -> (role, seconds); ValueError names a bad value."""
    if text is None:
        return None
    role, _, at = text.partition("@")
    try:
        t = float(at)
    except ValueError:
        t = -1.0
    if not (role == "decode" or (role.startswith("prefill-") and role[8:].isdigit())) or t < 0:
        raise ValueError(f"--kill {text!r}: expected ROLE@SECONDS with ROLE decode or prefill-R, e.g. decode@2.0")
    return role, t


def _percentiles(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.array(xs) * 1000.0, [50, 90, 99])
    return {"n": len(xs), "p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}


def run_stress(protocol: str = "fixed", requests: int = 5000, abort_rate: float = 0.1,
               delay_ms: float | None = 2.0, seed: int = 0, writers: int = 2, slots: int = 16,
               concurrency: int | None = None, layers: int = 4, tokens: int = 64, bytes_per_token: int = 256,
               abort_window_ms: float | None = None, transfer_timeout_s: float = 5.0,
               trace_dir: str | None = None, kill_rank: int | None = None, kill_after: int | None = None,
               timeout_s: float = 600.0, progress: Progress | None = None, keep_raw: bool = False,
               socket_baseline: bool = False, transport: str = "tcp", kill: tuple[str, float] | None = None,
               drop: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run one stress experiment against a freshly launched deployment and return its report.

    socket_baseline=True also measures a plain loopback socket copy (and the bare TCP transport)
    of the same bytes in the same write size, right after the run, for comparison. kill=(role, s)
    SIGKILLs a worker s seconds into the run; drop=(rank, n) drops rank's data connection after n
    writes. Decode's death raises RoleDied at once (with the partial report), whatever killed it.
    """
    if not 0.0 <= abort_rate <= 1.0:
        raise ValueError(f"abort_rate={abort_rate!r}, expected a probability in [0, 1]")
    if requests < 1:
        raise ValueError(f"requests={requests!r}, expected >= 1")
    cfg = PDConfig(variant=protocol, slots=slots, writers=writers, layers=layers,  # type: ignore[arg-type]
                   tokens_per_slot=tokens, bytes_per_token=bytes_per_token, delay_ms=delay_ms,
                   transfer_timeout_s=transfer_timeout_s, seed=seed, trace_dir=trace_dir, transport=transport,
                   drop_rank=drop[0] if drop else None, drop_after_writes=drop[1] if drop else None)
    if kill is not None and kill[0].startswith("prefill-") and not int(kill[0][8:]) < writers:
        raise ValueError(f"kill role {kill[0]!r}: there are {writers} prefill ranks (prefill-0..{writers - 1})")
    concurrency = concurrency or slots + slots // 2     # a queue, so a freed slot is reused at once
    window = (abort_window_ms if abort_window_ms is not None else 4 * (delay_ms or 0.5) + 2.0) / 1000.0
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    bad_bytes, latencies = 0, []
    t_start = time.monotonic()
    with PDCluster(cfg) as cluster:
        t0 = time.monotonic()
        aborts: list[tuple[float, int]] = []
        outstanding: set[int] = set()
        next_rid = done = 0
        killed: str | None = None

        def decode_died(why: str) -> RoleDied:
            partial = {"protocol": protocol, "transport": transport, "requests": requests, "results": done,
                       "counts": dict(counts), "dead_role": "decode", "killed": killed,
                       "run_s": round(time.monotonic() - t0, 3)}
            return RoleDied(f"decode died: {why}; {done}/{requests} results", partial)

        try:
            while done < requests:
                now = time.monotonic()
                if kill is not None and killed is None and now - t0 >= kill[1]:
                    cluster.kill_role(kill[0])
                    killed = f"{kill[0]} killed (SIGKILL) {now - t0:.2f} s into the run"
                why = cluster.dead_role()
                if why is not None and why.startswith("decode"):   # nothing can finish any more: stop now
                    raise decode_died(why)
                if now - t0 > timeout_s:
                    raise ClusterError(f"stress run exceeded timeout_s={timeout_s}: {done}/{requests} results")
                while len(outstanding) < concurrency and next_rid < requests:
                    cluster.submit(next_rid, rng.randint(1, tokens))
                    outstanding.add(next_rid)
                    if rng.random() < abort_rate:
                        heapq.heappush(aborts, (now + rng.uniform(0.0, window), next_rid))
                    next_rid += 1
                    if kill_rank is not None and next_rid == (kill_after or requests // 2):
                        cluster.kill_prefill(kill_rank)
                while aborts and aborts[0][0] <= now:
                    rid = heapq.heappop(aborts)[1]
                    if rid in outstanding:
                        cluster.abort(rid)
                wait = min(0.05, max(0.0, aborts[0][0] - now)) if aborts else 0.05
                r = cluster.next_result(timeout=wait)
                while r is not None:
                    outstanding.discard(r.rid)
                    done += 1
                    counts[r.status] += 1
                    if r.status == "failed":
                        reasons[r.reason or "?"] += 1
                    if r.status in ("served", "corrupt"):
                        latencies.append(r.latency_s)
                    bad_bytes += r.bad_bytes
                    r = cluster.next_result(timeout=0)
                if progress is not None:
                    progress(done, requests, dict(counts))
        except ClusterError as e:                      # the client channel died with decode
            if _wait_dead_decode(cluster, 2.0):
                raise decode_died(cluster.dead_role() or str(e)) from None
            raise
        run_s = time.monotonic() - t0
        stats = cluster.shutdown()
    rep = _report(cfg, stats, counts, reasons, bad_bytes, latencies, run_s, time.monotonic() - t_start,
                  requests=requests, abort_rate=abort_rate, concurrency=concurrency, window_s=window)
    rep["killed"], rep["dropped"] = killed, (f"prefill-{drop[0]} data connection after {drop[1]} writes"
                                             if drop else None)
    if socket_baseline and rep["writes_posted"]:
        rep["socket_baseline"] = _socket_baseline(rep)
    if keep_raw:
        rep["_raw"] = {"latency_s": latencies, "reclaim_s": stats.get("reclaim_latency_s", [])}
    return rep


def _wait_dead_decode(cluster: PDCluster, timeout_s: float) -> bool:
    """Whether the decode process is found dead within timeout_s (a lost client channel usually means so)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cluster.decode is not None and cluster.decode.poll() is not None:
            return True
        time.sleep(0.02)
    return False


def _socket_baseline(rep: dict[str, Any]) -> dict[str, Any]:
    """Plain socket vs bare TcpTransport throughput for this run's bytes and mean write size."""
    from kvproof.runtime.transport.throughput import tcp_throughput

    chunk = max(64, rep["bytes_transferred"] // max(1, rep["writes_posted"]))
    total = max(chunk, min(rep["bytes_transferred"], 64 << 20) // chunk * chunk)
    b = tcp_throughput(total, chunk, repeats=1)
    stress_gbps = rep["transfer_mb_s"] / 1000.0
    return {**b, "bytes": total, "chunk": chunk, "stress_transfer_gbps": stress_gbps,
            "stress_over_plain_socket": round(stress_gbps / b["plain_socket_gbps"], 4)}


def _report(cfg: PDConfig, stats: dict[str, Any], counts: Counter[str], reasons: Counter[str], bad_bytes: int,
            latencies: list[float], run_s: float, wall_s: float, **run: Any) -> dict[str, Any]:
    finished = counts["served"] + counts["corrupt"]
    landed = stats.get("bytes_landed", 0)
    prefill = stats.get("prefill", {})
    return {
        "protocol": cfg.variant, "transport": cfg.transport, "requests": run["requests"], "abort_rate": run["abort_rate"],
        "delay_ms": cfg.delay_ms, "seed": cfg.seed, "writers": cfg.writers, "slots": cfg.slots,
        "layers": cfg.layers, "tokens_per_slot": cfg.tokens_per_slot, "bytes_per_token": cfg.bytes_per_token,
        "concurrency": run["concurrency"], "abort_window_ms": round(run["window_s"] * 1000, 3),
        "served": counts["served"], "corrupted": counts["corrupt"], "aborted": counts["aborted"],
        "failed": counts["failed"], "failure_reasons": dict(reasons), "finished": finished,
        "corrupted_bytes": bad_bytes,
        "slots_reclaimed": stats.get("slots_reclaimed", 0), "slots_initial": cfg.slots,
        "slots_free_end": stats.get("slots_free"), "all_slots_free": stats.get("slots_free") == cfg.slots,
        "bytes_transferred": landed, "transfer_mb_s": round(landed / run_s / 1e6, 3),
        "finished_per_s": round(finished / run_s, 1), "results_per_s": round(sum(counts.values()) / run_s, 1),
        "request_latency_ms": _percentiles(latencies),
        "reclaim_latency_ms": _percentiles(stats.get("reclaim_latency_s", [])),
        "foreign_landings": stats.get("foreign_landings", 0),
        "writes_posted": sum(p.get("writes_posted", 0) for p in prefill.values()),
        "transitions_fired": stats.get("fired", 0) + sum(p.get("fired", 0) for p in prefill.values()),
        "ignored_messages": {k: v for k, v in stats.items() if k.startswith("ignored_")},
        "dead_ranks": stats.get("dead_ranks", {}),
        "rejected_connections": stats.get("rejected_connections_total{reason}", {}),
        "refused_writes": stats.get("kv_refused_writes_total{reason}", {}),
        "run_s": round(run_s, 3), "wall_s": round(wall_s, 3),
    }


_ADD = ("requests", "served", "corrupted", "aborted", "failed", "finished", "corrupted_bytes", "slots_reclaimed",
        "bytes_transferred", "foreign_landings", "writes_posted", "transitions_fired", "run_s", "wall_s")


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report for several runs of the same protocol (made with keep_raw=True): sums, rates, percentiles."""
    out = dict(reports[0])
    for key in _ADD:
        out[key] = sum(r[key] for r in reports)
    for key in ("failure_reasons", "ignored_messages"):
        out[key] = dict(sum((Counter(r[key]) for r in reports), Counter()))
    out["dead_ranks"] = {k: v for r in reports for k, v in r["dead_ranks"].items()}
    out["slots_free_end"] = min(r["slots_free_end"] for r in reports)
    out["all_slots_free"] = all(r["all_slots_free"] for r in reports)
    out["seed"] = [r["seed"] for r in reports]
    run_s = out["run_s"]
    out["transfer_mb_s"] = round(out["bytes_transferred"] / run_s / 1e6, 3)
    out["finished_per_s"] = round(out["finished"] / run_s, 1)
    out["results_per_s"] = round((out["finished"] + out["aborted"] + out["failed"]) / run_s, 1)
    out["request_latency_ms"] = _percentiles([x for r in reports for x in r["_raw"]["latency_s"]])
    out["reclaim_latency_ms"] = _percentiles([x for r in reports for x in r["_raw"]["reclaim_s"]])
    out["run_s"], out["wall_s"] = round(run_s, 3), round(out["wall_s"], 3)
    out.pop("_raw")
    return out


def run_compare(**kw: Any) -> dict[str, Any]:
    """Run unfixed and fixed under the same load and report both plus the fixed/unfixed throughput ratio.

    The requests are split in two halves run in the order unfixed, fixed, fixed, unfixed (seeds seed
    and seed+1 for both protocols), so slow drifts of a shared machine's load hit both alike.
    With trace_dir each run traces into its own sub-directory, trace_dir/<protocol>-<half>.
    """
    kw.pop("protocol", None)
    kw.pop("progress", None)
    trace_dir = kw.pop("trace_dir", None)
    n, seed = kw.pop("requests", 5000), kw.pop("seed", 0)
    halves = [(n // 2 or 1, seed), (n - n // 2 or 1, seed + 1)]
    runs: dict[str, list[dict[str, Any]]] = {"unfixed": [], "fixed": []}
    for proto, half in (("unfixed", 0), ("fixed", 0), ("fixed", 1), ("unfixed", 1)):
        sub = os.path.join(trace_dir, f"{proto}-{half}") if trace_dir else None
        runs[proto].append(run_stress(protocol=proto, requests=halves[half][0], seed=halves[half][1],
                                      trace_dir=sub, keep_raw=True, **kw))
    unfixed, fixed = merge_reports(runs["unfixed"]), merge_reports(runs["fixed"])
    ratio = fixed["finished_per_s"] / unfixed["finished_per_s"] if unfixed["finished_per_s"] else None
    return {"unfixed": unfixed, "fixed": fixed, "schedule": "unfixed, fixed, fixed, unfixed (halves)",
            "throughput_ratio_fixed_over_unfixed": round(ratio, 3) if ratio is not None else None}
