"""Categorise py-spy raw stacks: python scripts/profile/breakdown.py FILE.raw (see docs/performance.md)."""
import sys, collections
cats = [("spec firing (monitor/slot protocol)", ("spec/machine.py", "spec/compiled.py", "spec/core.py", "spec/instance.py", "spec/local.py", "monitor.py")),
        ("model compute (decoder, torch ops)", ("model/decoder.py", "model/cache.py", "torch/nn", "model_runner.py")),
        ("HTTP/SSE (aiohttp, server)", ("aiohttp", "serving/server", "openai_protocol", "server_choices", "server_metrics", "asyncio", "json/")),
        ("inter-process hops (control channel, messages)", ("transport/", "pd/messages.py", "socket", "selectors")),
        ("Python scheduling (scheduler, engine loop, workers)", ("scheduler.py", "serving/engine.py", "pd/", "threading.py", "queue.py")),
       ]
tot = collections.Counter(); per_proc = collections.Counter()
for line in open(sys.argv[1]):
    line = line.rstrip()
    if not line: continue
    stack, _, n = line.rpartition(" ")
    n = int(n)
    frames = stack.split(";")
    proc = frames[0][:60]
    # idle: leaf in a wait/select/sleep
    leaf = frames[-1]
    if any(w in leaf for w in ("wait (threading", "select (selectors", "poll (", "_recv_into", "recv_into", "sleep", "get (queue", "accept", "epoll")):
        cat = "idle (waiting)"
    else:
        cat = "other"
        # deepest matching frame decides (leaf first)
        for fr in reversed(frames):
            hit = next((c for c, keys in cats if any(k in fr for k in keys)), None)
            if hit: cat = hit; break
    tot[cat] += n; per_proc[(proc, cat)] += n
s = sum(v for k, v in tot.items() if k != "idle (waiting)")
print("busy samples", s)
for k, v in tot.most_common():
    print(f"{k:55s} {v:7d} {100*v/max(s,1):6.1f}%" if k != "idle (waiting)" else f"{k:55s} {v:7d}")
procs = collections.Counter()
for (p, c), v in per_proc.items():
    if c != "idle (waiting)": procs[p] += v
for p, v in procs.most_common(6): print("  proc", p, v)
