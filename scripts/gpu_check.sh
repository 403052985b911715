#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one script, for a lent GPU machine
# (no network; python3 there holds torch and triton; see docs/gpu.md).
#
#   here (network):  scripts/gpu_check.sh wheels     # the wheels the GPU machine lacks -> .whl/
#   on the GPU:      scripts/gpu_check.sh [STAGE...] # default: setup tests bench sanitize loadgen
#
# Stages (each logs to $OUT and never stops the next one):
#   setup     install the carried wheels and kvproof itself (editable, offline)
#   tests     the whole suite natively (Triton compiled for the GPU, no interpreter),
#             GPU-marked tests included           -> tests.log
#   bench     kvproof bench kernels / hicache / layersplit --json -> bench_*.json
#   sanitize  compute-sanitizer memcheck + racecheck over the kernel tests -> sanitizer.log
#   loadgen   kvproof serve --engine local|pd --model small --device cuda --backend triton, then
#             kvproof loadgen --json against each -> loadgen_local.json, loadgen_pd.json
#             (server logs and /metrics appended to tests.log)
# At the end a summary table (stage, status, seconds, key numbers) is printed and written
# to $OUT/summary.txt. At most 8 files come back from $OUT; this writes 8.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OUT=${OUT:-/tmp/kvproof-gpu}
mkdir -p "$OUT"
STAGE_LIMIT=${STAGE_LIMIT:-400}          # seconds per stage (a device command may run 600 s)
# loadgen's server (overridable to try the stage on a CPU: SERVE_ARGS="--model tiny --device cpu")
SERVE_ARGS=${SERVE_ARGS:---model small --device cuda --backend triton --threads 0}
declare -a SUMMARY=()

wheels() {
    # z3-solver is the one runtime dependency the GPU image lacks (its package list: KINDS.md).
    local v
    v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('z3-solver'))")
    local exclude
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    mkdir -p .whl
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl "z3-solver==$v"
    ls -la .whl
}

record() {  # record STAGE RC SECONDS NOTE
    local status=ok
    [ "$2" -ne 0 ] && status="FAILED(rc=$2)"
    SUMMARY+=("$(printf '%-9s %-14s %5ss  %s' "$1" "$status" "$3" "$4")")
}

stage_setup() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || return 1
    fi
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
    nvidia-smi -L
    $PY - <<'EOF'
import torch, triton, z3
print(f"torch {torch.__version__}, triton {triton.__version__}, z3 {z3.get_version_string()}, "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
import kvproof.cli  # noqa: F401  (the package imports)
EOF
}

stage_tests() {
    local xdist=()
    $PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
    env -u TRITON_INTERPRET timeout "$STAGE_LIMIT" $PY -m pytest -q -p no:cacheprovider "${xdist[@]}" -rs \
        tests > "$OUT/tests.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/tests.log"
    return $rc
}

stage_bench() {
    local rc=0 b
    for b in kernels hicache layersplit; do
        env -u TRITON_INTERPRET timeout "$STAGE_LIMIT" $PY -m kvproof bench "$b" --json \
            > "$OUT/bench_$b.json" 2>> "$OUT/tests.log" || rc=$?
    done
    return $rc
}

stage_sanitize() {
    local rc=0 tool
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool" >> "$OUT/sanitizer.log"
        env -u TRITON_INTERPRET timeout "$STAGE_LIMIT" compute-sanitizer --tool "$tool" \
            --error-exitcode 86 --target-processes all \
            $PY -m pytest -q -p no:cacheprovider tests/kernels -k "not production" -x \
            >> "$OUT/sanitizer.log" 2>&1 || rc=$?
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -n 3
    done
    return $rc
}

stage_loadgen() {
    local port=8765 rc=0 i engine pid
    for engine in local pd; do
        # shellcheck disable=SC2086
        env -u TRITON_INTERPRET $PY -m kvproof serve --engine $engine --port $port $SERVE_ARGS \
            >> "$OUT/tests.log" 2>&1 &
        pid=$!
        for i in $(seq 1 180); do
            curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
            sleep 1
        done
        timeout "$STAGE_LIMIT" $PY -m kvproof loadgen --url "http://127.0.0.1:$port" --requests 200 \
            --concurrency 32 --json > "$OUT/loadgen_$engine.json" 2>> "$OUT/tests.log" || rc=$?
        curl -sf "http://127.0.0.1:$port/metrics" | grep -E "^kvproof_(slots|cache|aborts|requests_finished)" \
            >> "$OUT/tests.log"
        kill -INT $pid 2>/dev/null
        wait $pid 2>/dev/null
        port=$((port + 1))
    done
    return $rc
}

numbers() {  # key numbers of a stage's JSON output, one line
    $PY - "$1" <<'EOF' 2>/dev/null
import json, sys
stage, out = sys.argv[1], __import__("os").environ.get("OUT", "/tmp/kvproof-gpu")
def load(n):
    with open(f"{out}/{n}") as f:
        return json.load(f)
try:
    if stage == "bench":
        k = load("bench_kernels.json")
        best = {}
        for r in k["rows"]:
            if r.get("pct_hbm_ceiling") is not None:
                best[r["kernel"]] = max(best.get(r["kernel"], 0), r["pct_hbm_ceiling"])
        h, l = load("bench_hicache.json"), load("bench_layersplit.json")
        print("best %HBM: " + ", ".join(f"{n} {p:.0f}" for n, p in best.items())
              + f"; hicache {h['swap_in_gbps']} vs plain {h['plain_copy_gbps']} GB/s, hidden {h['hidden_fraction']}"
              + f"; layersplit hidden {l.get('hidden_fraction')}")
    elif stage == "loadgen":
        for eng in ("local", "pd"):
            try:
                g = load(f"loadgen_{eng}.json")
                print(f"{eng}: {g['completed']}/{g['requests']} done, {g['errors']} errors, "
                      f"{g['output_tokens_per_s']} tok/s, TTFT p50 {g['ttft_ms']['p50']} ms, "
                      f"ITL p50 {g['itl_ms']['p50']} ms", end="; ")
            except Exception as e:
                print(eng, f"(no numbers: {e})", end="; ")
        print()
except Exception as e:  # the stage's own log says why
    print(f"(no numbers: {e})")
EOF
}

main() {
    local stages=("$@") s t0 rc
    [ ${#stages[@]} -eq 0 ] && stages=(setup tests bench sanitize loadgen)
    if [ "${stages[0]}" = wheels ]; then wheels; return; fi
    for s in "${stages[@]}"; do
        echo "=== $s"
        t0=$(date +%s)
        "stage_$s"
        rc=$?
        record "$s" "$rc" "$(( $(date +%s) - t0 ))" "$(numbers "$s")"
    done
    printf '%s\n' "stage     status          time   numbers" "${SUMMARY[@]}" | tee "$OUT/summary.txt"
}

main "$@"
