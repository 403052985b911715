#!/bin/bash
# usage: spy.sh ENGINE OUT ; profiles a kvproof serve under the bench load with py-spy (all processes)
cd "$(dirname "$0")/../.."
ENGINE=$1; OUT=$2; PORT=$((18000 + RANDOM % 1000))
OMP_NUM_THREADS=1 .venv/bin/python -m kvproof serve --engine $ENGINE --port $PORT --served-model-name tiny > $OUT.serve.log 2>&1 &
SPID=$!
for i in $(seq 120); do curl -sf http://127.0.0.1:$PORT/v1/models >/dev/null && break; sleep 0.5; done
.venv/bin/py-spy record --subprocesses --format raw --rate 200 -o $OUT.raw -p $SPID -d 30 --nonblocking >/dev/null 2>&1 &
YPID=$!
sleep 1
timeout 120 .venv/bin/python -m kvproof loadgen --url http://127.0.0.1:$PORT --requests 200 --concurrency 32 --max-tokens 64 --abort-fraction 0 --ignore-eos --json > $OUT.load.json
wait $YPID
kill $SPID; wait $SPID
