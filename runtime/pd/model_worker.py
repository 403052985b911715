"""Real-KV mode of the PD processes: the model runs in the prefill ranks and in decode.

    python -m kvproof.runtime.pd.model_worker decode|prefill --stdin   (arguments + secret on stdin)

The processes are the ones of `pd.process` (same loops, same spec firing); this module only plugs
the model in. A prefill rank's `PrefillModel` runs the model on the whole prompt (it rides on
`Alloc`) and returns `KVCache.export_tokens` bytes `[layers, n, token_bytes]` and the hidden state of
the prompt's last position; the rank posts its byte share of every token, one write per layer, exactly
as for synthetic KV, and its `Done` carries the hidden state (`hidden_to_wire`).
With `layersplit=R` each prefill rank is rank 0 of its own LayerSplit group (R-1 follower processes
of its own) and gathers the layers it does not store from their owners for the export
(`EngineCore.export_tokens`); decode always runs unsplit (`ModelCluster` gives it layersplit=1).
Decode's `DecodeModel.read` (pd/decode_model.py) is `DecodeWorker`'s read of a READY slot: it copies
the slot's bytes out, samples the first token from the carried hidden state (`EngineCore.start`) and
sends it to the router without waiting for a decode step; the slot is then finished (freed), and
before its next step decode imports the bytes into its own model KV pages (`import_tokens`) and
admits the request into its `EngineCore` (`prefilled=(pages, n)`, `started=`), which decodes (MTP
speculative decoding, the anomaly monitor) and streams `Event` messages back to the router.
"""
from __future__ import annotations

import json
import sys
import zlib
from dataclasses import asdict
from typing import Any

import torch

from kvproof.runtime.serving.engine import EngineConfig, EngineCore, SamplingParams
from kvproof.runtime.model.config import ModelConfig
from kvproof.runtime.serving.monitor import MonitorConfig
from kvproof.runtime.pd.config import PDConfig
from kvproof.runtime.pd.cpus import parse_cpus, pin_process
from kvproof.runtime.pd.messages import Alloc
from kvproof.runtime.pd.kv_export import corrupt_payload, hidden_to_wire
from kvproof.runtime.pd.prefill_worker import Prefilled
from kvproof.runtime.serving.scheduler import Sequence


# ---------------------------------------------------------------- config on the command line

def engine_config_to_json(cfg: EngineConfig) -> str:
    """EngineConfig as JSON (for the worker command line)."""
    return json.dumps(asdict(cfg))


def engine_config_from_json(text: str) -> EngineConfig:
    """Parse engine_config_to_json's output; a bad document raises ValueError naming it."""
    try:
        raw = json.loads(text)
        raw["model"] = ModelConfig(**raw["model"])
        raw["monitor"] = MonitorConfig(**raw["monitor"])
        return EngineConfig(**raw)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"engine config JSON is malformed: {e!r}") from None


# ---------------------------------------------------------------- prefill rank
class PrefillModel:
    """A prefill rank's copy of the model (with a prefix cache): Alloc -> KV bytes of the first n-1 tokens."""

    def __init__(self, ecfg: EngineConfig, pd: PDConfig) -> None:
        self.core = EngineCore(ecfg)
        self.pd = pd
        self.prefilled = 0
        self.prompt_tokens = 0          # tokens this rank was asked to prefill
        self.prefix_hit_tokens = 0      # of those, found in its prefix cache (not recomputed)

    def stats(self) -> dict[str, Any]:
        """This rank's counters, every key `prefill_*`: its prefix cache (the router's cache hit rate
        in PD mode), with a host tier its HiCache counters (`prefill_hicache_*`), with LayerSplit its
        group's (`prefill_layersplit_*`: forwards, exports, bytes)."""
        out = {"prefill_requests_total": self.prefilled, "prefill_prompt_tokens_total": self.prompt_tokens,
               "prefill_prefix_hit_tokens_total": self.prefix_hit_tokens}
        core = self.core
        host = core.host.stats() if core.host is not None else {}
        # the group's counters only: decode sums every prefill_* key over the ranks (gauges would not add up)
        group = {k: v for k, v in core.group.stats().items() if k.endswith("_total")} if core.group else {}
        out.update({f"prefill_{k}": v for k, v in (host | group).items() if isinstance(v, (int, float))})
        return out

    def __call__(self, alloc: Alloc) -> Prefilled:
        """Run the model on the prompt and export its KV (and last hidden state) for the slot."""
        out = self.many([alloc])[0]
        if isinstance(out, ValueError):
            raise out
        return out

    def many(self, allocs: list[Alloc]) -> list[Prefilled | ValueError]:
        """The first k >= 1 prompts computed in one forward of at most max_prefill_tokens (past the first
        prompt): their KV bytes and last hidden states; a malformed Alloc gets its ValueError and does not
        spoil the batch."""
        core = self.core
        budget = core.cfg.max_prefill_tokens
        out: list[Prefilled | ValueError] = []
        batch: list[tuple[int, Alloc, Sequence]] = []            # (index in out, alloc, its sequence)
        cold: set[bytes] = set()                                 # first uncached page of each prompt in it
        try:
            for alloc in allocs:
                tokens = alloc.tokens
                n = len(tokens) if tokens else 0
                if not tokens:
                    out.append(ValueError(f"alloc for rid {alloc.rid} carries no prompt tokens "
                                          f"(real-KV mode needs them)"))
                elif n != alloc.n_tokens:
                    out.append(ValueError(f"alloc for rid {alloc.rid}: n_tokens={alloc.n_tokens}, expected "
                                          f"len(prompt) = {n}"))
                else:
                    seq = Sequence(f"pf-{alloc.rid}", list(tokens), SamplingParams())
                    core.scheduler._match_prefix(seq)              # cached full pages (the last token is computed)
                    need = -(-n // core.model.cfg.page_size) - len(seq.pages)
                    miss = len(seq.pages)                          # its first page not in the cache
                    first_miss = seq.page_hashes[miss] if miss < len(seq.page_hashes) else None
                    if batch and (n - seq.num_cached > budget or not core.pool.can_allocate(need)
                                  or first_miss in cold):
                        # the next batch takes it; one sharing a prefix this batch computes gets it
                        # from the cache then (a burst computes each cold prefix once, not once a prompt)
                        core.pool.free(seq.pages)
                        break
                    if first_miss is not None:
                        cold.add(first_miss)
                    seq.pages += core.pool.allocate(need)
                    budget -= n - seq.num_cached
                    self.prompt_tokens += n
                    self.prefix_hit_tokens += seq.num_cached
                    out.append(ValueError("not computed"))         # replaced below
                    batch.append((len(out) - 1, alloc, seq))
            if batch:
                seqs = [q for _, _, q in batch]
                with torch.no_grad():
                    hidden = core.runner.prefill(seqs, [len(q.prompt) - q.num_cached for q in seqs])   # [B, D]
                for (i, alloc, seq), h in zip(batch, hidden):
                    core.scheduler.prefilled(seq)                  # publish its full pages for later prompts
                    data = core.export_tokens(seq.pages, len(seq.prompt)).cpu()    # uint8 [L, n, token_bytes]
                    if alloc.corrupt:
                        data = corrupt_payload(data, core.model.cfg.torch_dtype, zlib.crc32(str(alloc.rid).encode()))
                    out[i] = Prefilled(data.numpy(), hidden_to_wire(h))
                    self.prefilled += 1
        finally:
            for _, _, seq in batch:
                core.pool.free(seq.pages)
        return out


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry of a real-KV worker process."""
    from kvproof.runtime.pd.decode_model import DecodeModel
    from kvproof.runtime.pd.decode_process import run_decode
    from kvproof.runtime.pd.prefill_process import run_prefill
    from kvproof.runtime.pd.process import worker_args
    def extra(ap: Any) -> None:
        ap.add_argument("--engine", required=True, help="EngineConfig as JSON")
        ap.add_argument("--cpus", default=None, help="run on these CPUs only, e.g. 1 or 0,2 (pd.cpus); default: all")
    a = worker_args("python -m kvproof.runtime.pd.model_worker", argv, extra)
    if a.cpus is not None:
        pin_process(parse_cpus(a.cpus))                   # before the model and its threads exist
    cfg = PDConfig.from_json(a.config)
    ecfg = engine_config_from_json(a.engine)
    if a.role == "decode":
        return run_decode(cfg, a.client, model=DecodeModel(ecfg, cfg), secret=a.secret, listen_host=a.listen_host)
    model = PrefillModel(ecfg, cfg)                       # with layersplit R: spawns its R-1 followers
    try:
        return run_prefill(cfg, a.rank, a.control, a.data, compute=model.many, live_stats=model.stats,
                           secret=a.secret)
    finally:
        model.core.close()                                 # stop and join the followers


if __name__ == "__main__":
    sys.exit(main())
