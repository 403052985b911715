#!/bin/bash
# usage: serve_cpu.sh [serve args...] ; CPU seconds of each process of `kvproof serve` (and of the load
# generator) under the bench load: 200 requests, 32 in flight, max_tokens 16..64, ignore_eos.
cd "$(dirname "$0")/../.."
PORT=$((18000 + RANDOM % 1000))
OMP_NUM_THREADS=1 .venv/bin/python -m kvproof serve --port $PORT --served-model-name tiny "$@" > /tmp/serve_cpu.$PORT.log 2>&1 &
SPID=$!
for i in $(seq 240); do curl -sf http://127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 0.5; done
cpu() { awk '{print $14 + $15}' /proc/$1/stat 2>/dev/null || echo 0; }
tree() { echo $1; for c in $(cat /proc/$1/task/*/children 2>/dev/null); do tree $c; done; }
PIDS=$(tree $SPID)
declare -A C0; for p in $PIDS; do C0[$p]=$(cpu $p); done
/usr/bin/time -f "loadgen: %U user + %S sys s, %e s wall" .venv/bin/python -m kvproof loadgen --url http://127.0.0.1:$PORT \
  --requests 200 --concurrency 32 --max-tokens 64 --min-max-tokens 16 --abort-fraction 0 --ignore-eos --seed 0 --json \
  > /tmp/serve_cpu.$PORT.json
python3 -c "import json; d=json.load(open('/tmp/serve_cpu.$PORT.json')); print('tok/s', d['output_tokens_per_s'], 'tokens', d['output_tokens'], 'ttft', d['ttft_ms'])"
HZ=$(getconf CLK_TCK)
for p in $PIDS; do
  echo "pid $p $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-90): $(( ($(cpu $p) - ${C0[$p]}) * 1000 / HZ )) ms CPU"
done
kill $SPID; wait $SPID 2>/dev/null
