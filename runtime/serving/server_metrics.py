"""The server's /metrics: engine stats under Prometheus names with HELP texts, and latency histograms.

Engine `stats()` keys (`name`, `name{label}`, histogram triples `name_bucket{le}` / `name_sum` /
`name_count`) map to exported names through `METRICS`, which says what each measures; a key
missing there fails `test_every_engine_stat_has_help`. Every sample carries `model_name`.
Counters end in `_total`, units come last (`_seconds`, `_bytes`, `_tokens`, `_ratio`).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# the *_created series double every family and no dashboard reads them (vLLM turns them off too)
disable_created_metrics()
PREFIX = "kvproof_"
RECLAIM_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)

# stats key (its name part) -> (exported name without the prefix, HELP); counters keep their _total
METRICS: dict[str, tuple[str, str]] = {
    "requests_total": ("requests_total", "Requests the engine accepted"),
    "prompt_tokens_total": ("prompt_tokens_total", "Prompt tokens of the requests the engine accepted"),
    "generation_tokens_total": ("generation_tokens_total", "Output tokens the engine generated"),
    "spec_steps_total": ("spec_steps_total", "Speculative verification steps (one per decoding request per step)"),
    "spec_drafted_total": ("spec_drafted_tokens_total", "Draft tokens the MTP head proposed"),
    "spec_accepted_total": ("spec_accepted_tokens_total", "Draft tokens the model accepted"),
    "requests_finished_total": ("requests_finished_total", "Requests that ended, by finish reason"),
    "aborts_total": ("aborts_total", "Requests aborted, by cause (client, disconnect, anomaly, shutdown, ...)"),
    "anomaly_aborts_total": ("anomaly_aborts_total", "Requests the speculative-decoding monitor aborted, by rule"),
    "steps_total": ("steps_total", "Engine steps, by kind (prefill or decode)"),
    "queue_depth": ("queue_depth_requests", "Requests in each engine queue now"),
    "kv_pages": ("kv_pages", "KV cache pages now, by state (free or used)"),
    "preemptions_total": ("preemptions_total", "Running requests preempted for lack of KV pages"),
    "spec_accept_length": ("spec_accept_length_tokens",
                           "Mean tokens emitted per verification step since start, bonus token included"),
    "spec_accept_rate": ("spec_accept_ratio", "Accepted over proposed draft tokens since start"),
    "cache_hit_rate": ("prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache over prompt tokens"),
    "prefix_cache_hit_tokens_total": ("prefix_cache_hit_tokens_total",
                                      "Prompt tokens served from the prefix cache (not recomputed)"),
    "http_requests_total": ("http_requests_total", "HTTP requests to the generation routes, by route"),
    "http_errors_total": ("http_errors_total", "HTTP error responses (4xx and 5xx, any route), by status"),
    "client_disconnects_total": ("client_disconnects_total", "Clients that disconnected before their response ended"),
    # the PD engine: decode's KV slot table and transfers
    "slots": ("kv_slots", "Decode KV slots now, by protocol state"),
    "kv_transfers_total": ("kv_transfers_total", "KV transfers from prefill ranks that completed"),
    "kv_transfer_failures_total": ("kv_transfer_failures_total", "KV transfers that failed (timeout, dead rank)"),
    "kv_requests_aborted_total": ("kv_requests_aborted_total", "Requests aborted while holding a KV slot"),
    "slots_reclaimed_total": ("kv_slots_reclaimed_total", "Aborted KV slots made FREE again"),
    "reclaim_latency_seconds": ("kv_slot_reclaim_latency_seconds",
                                "Seconds from a KV slot's abort until it was FREE again (safe to reuse)"),
    "kv_transferred_bytes_total": ("kv_transferred_bytes_total", "KV bytes that landed in decode's slots"),
    "kv_foreign_landings_total": ("kv_foreign_landings_total",
                                  "KV writes that landed in a slot of another epoch (0 under the fixed protocol)"),
    "kv_imported_tokens_total": ("kv_imported_tokens_total", "Prompt tokens whose KV decode imported from a slot"),
    "pd_waiting_for_slot": ("pd_waiting_for_slot_requests", "Requests waiting for a free decode KV slot now"),
    "pd_writers": ("pd_prefill_ranks", "Prefill ranks (KV writers) of the PD deployment"),
    "pd_worker_up": ("pd_worker_up", "1 while a PD role's process (decode, prefill-i) runs, 0 once it exited"),
    "pd_engine_failed": ("pd_engine_failed", "1 once the PD engine failed (a worker died): new requests are refused"),
    "rejected_connections_total": ("rejected_connections_total",
                                   "Connections to decode's control or data ports refused, by reason (authentication)"),
    "kv_refused_writes_total": ("kv_refused_writes_total", "KV writes decode's transport refused, by reason"),
    "prefill_requests_total": ("prefill_requests_total", "Prompts the prefill ranks prefilled"),
    "prefill_prompt_tokens_total": ("prefill_prompt_tokens_total", "Prompt tokens the prefill ranks were asked for"),
    "prefill_prefix_hit_tokens_total": ("prefill_prefix_hit_tokens_total",
                                        "Of those, tokens found in a prefill rank's prefix cache"),
    # the host tier (HiCache)
    "hicache_device_hits_total": ("hicache_device_hits_total", "Prefix pages found in the device pool"),
    "hicache_host_hits_total": ("hicache_host_hits_total", "Prefix pages found in the host tier (swapped in)"),
    "hicache_misses_total": ("hicache_misses_total", "Prefix pages found in neither tier"),
    "hicache_evictions_total": ("hicache_evictions_total", "Device pages evicted"),
    "hicache_writebacks_total": ("hicache_writebacks_total", "Evicted device pages written back to the host tier"),
    "hicache_swap_ins_total": ("hicache_swap_ins_total", "Pages loaded from the host tier into the device pool"),
    "hicache_swap_batches_total": ("hicache_swap_batches_total", "Batches that ran a layer-wise swap-in plan"),
    "hicache_dropped_total": ("hicache_dropped_total", "Evicted pages the full host tier could not keep"),
    "hicache_plans_checked_total": ("hicache_plans_checked_total", "Swap-in stream plans race-checked"),
    "hicache_stale_indexer_reads_total": ("hicache_stale_indexer_reads_total",
                                          "Indexer reads of a page before its swap-in landed (0 when fixed)"),
    "hicache_host_pages": ("hicache_host_pages", "Host-tier pages now, by state"),
    # LayerSplit
    "layersplit_ranks": ("layersplit_ranks", "Ranks of the LayerSplit group"),
    "layersplit_layers_owned": ("layersplit_layers_owned", "KV layers each LayerSplit rank stores"),
    "layersplit_kv_bytes": ("layersplit_kv_bytes", "KV and indexer cache bytes each LayerSplit rank holds"),
    "layersplit_staging_bytes": ("layersplit_staging_bytes", "Receive-buffer bytes each LayerSplit rank holds"),
    "layersplit_unsplit_kv_bytes": ("layersplit_unsplit_kv_bytes", "KV and indexer bytes one unsplit rank would hold"),
    "layersplit_forwards_total": ("layersplit_forwards_total", "Model forwards run on the LayerSplit group"),
    "layersplit_broadcast_bytes_total": ("layersplit_broadcast_bytes_total", "KV bytes the owners broadcast"),
    "layersplit_exports_total": ("layersplit_exports_total", "KV exports gathered from the group (PD transfers)"),
    "layersplit_export_bytes_total": ("layersplit_export_bytes_total", "KV bytes gathered for those exports"),
}


def histogram(name: str, values: Iterable[float], buckets: tuple[float, ...] = RECLAIM_BUCKETS) -> dict[str, Any]:
    """The stats keys of a histogram of values: `name_bucket{le}` (cumulative), `name_sum`, `name_count`."""
    vs = list(values)
    counts = {str(b): sum(1 for v in vs if v <= b) for b in buckets}
    counts["+Inf"] = len(vs)
    return {f"{name}_bucket{{le}}": counts, f"{name}_sum": float(sum(vs)), f"{name}_count": len(vs)}


def describe(key: str) -> tuple[str, str]:
    """(exported name without prefix, HELP) of a stats key's name part; prefill_* sums the ranks' own."""
    if key in METRICS:
        return METRICS[key]
    if key.startswith("prefill_") and key[len("prefill_"):] in METRICS:
        name, doc = METRICS[key[len("prefill_"):]]
        return "prefill_" + name, doc + ", summed over the prefill ranks"
    raise KeyError(f"engine stat {key!r} has no entry in server_metrics.METRICS (name and HELP)")


def _describe_or_flag(key: str) -> tuple[str, str]:
    # a stat added without a METRICS entry is still exported (and test_every_engine_stat_has_a_name_and_help
    # fails) rather than turning every scrape into a 500
    try:
        return describe(key)
    except KeyError:
        return key, f"{key}: no HELP yet (add it to runtime/serving/server_metrics.METRICS)"


class EngineCollector:
    """Exports engine.stats() (plus the server's HTTP counters) with names, HELP and a model_name label."""

    def __init__(self, engine: Any, http: dict[str, dict[str, float]]) -> None:
        self.engine, self.http = engine, http

    def collect(self) -> Iterator[Metric]:
        """Yield one metric family per stats key (histogram triples as one family)."""
        model = self.engine.model_name
        stats = dict(self.engine.stats())
        stats["http_requests_total{route}"] = self.http["route"]
        stats["http_errors_total{status}"] = self.http["status"]
        stats["client_disconnects_total"] = self.http["disconnects"].get("n", 0)
        hists = {k[: -len("_bucket{le}")] for k in stats if k.endswith("_bucket{le}")}
        for base in sorted(hists):
            name, doc = _describe_or_flag(base)
            fam = HistogramMetricFamily(PREFIX + name, doc, labels=["model_name"])
            buckets = [(le, float(v)) for le, v in stats.pop(f"{base}_bucket{{le}}").items()]
            fam.add_metric([model], buckets, float(stats.pop(f"{base}_sum", 0.0)))
            stats.pop(f"{base}_count", None)
            yield fam
        for key, val in stats.items():
            base, _, label = key.partition("{")
            label = label.rstrip("}")
            name, doc = _describe_or_flag(base)
            counter = name.endswith("_total")
            fam_cls = CounterMetricFamily if counter else GaugeMetricFamily
            full = PREFIX + (name[: -len("_total")] if counter else name)
            if isinstance(val, dict):
                fam = fam_cls(full, doc, labels=["model_name", label or "key"])
                for lv, v in val.items():
                    fam.add_metric([model, str(lv)], float(v))
            else:
                fam = fam_cls(full, doc, labels=["model_name"])
                fam.add_metric([model], float(val))
            yield fam


class RequestHistograms:
    """Per-request latency histograms the HTTP server observes (seconds, labelled by model_name)."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        def h(name: str, doc: str) -> Any:
            return Histogram(PREFIX + name, doc, ["model_name"], registry=registry,
                             buckets=LATENCY_BUCKETS).labels(model_name)
        self.ttft = h("time_to_first_token_seconds",
                      "Seconds from receiving a generation request to its first output token")
        self.itl = h("inter_token_latency_seconds",
                     "Seconds between consecutive output tokens of a request (a step's tokens share its gap)")
        self.e2e = h("e2e_request_latency_seconds",
                     "Seconds from receiving a generation request to its last token (any finish reason)")
        self.queue = h("request_queue_time_seconds",
                       "Seconds a request waited before the engine first computed for it (PD engine: until "
                       "decode allocated its KV slot)")
