#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, as ONE command that fits a lent H100/H200 machine
# (one command <= 10 min, 15 min of device time in all; no network; torch + triton preinstalled).
#
#   here (network):  scripts/gpu_check.sh wheels      # z3-solver wheel -> .whl/ (carried, < 64 MiB)
#   on the GPU:      scripts/gpu_check.sh             # all stages, < 540 s of stage timeouts
#                    scripts/gpu_check.sh --dry-run   # print the stage plan and its budget, run nothing
#                    scripts/gpu_check.sh STAGE...    # a subset, same budgets
#
# Stages (each under its own timeout, logs and JSON written to $OUT as they go; a failed stage
# never stops the next one; a summary table closes the run and is written to $OUT/summary.txt):
#   setup      carried wheels + kvproof (editable, offline); versions
#   tests      kernel + stream tests natively (no interpreter), gpu-marked ones included -> tests.log
#   bench      kvproof bench kernels --quick --json --out (rows written as they complete) -> bench_kernels.json
#   memcheck   compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1 (so torch's pool cannot
#              hide out-of-bounds accesses), on a small subset of the kernel tests -> memcheck.log
#   racecheck  compute-sanitizer racecheck on 3 kernels (copy, top-k, indexer); hazards inside
#              Triton's own cross-warp reductions (triton#7264, #4736) are set aside -> racecheck.log
# Optional stages, only when named (a second device command): benches  (bench hicache and
# layersplit --json) and loadgen (serve --engine local|pd on `small`, loadgen --json each).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OUT=${OUT:-/tmp/kvproof-gpu}

# stage:timeout seconds (sum must stay < 540 so the one command fits 9 minutes with start-up)
PLAN=(setup:45 tests:170 bench:150 memcheck:80 racecheck:80)
EXTRA=(benches:240 loadgen:300)     # not in the default run; setup + one of them fits a command
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)}
SANITIZER=${SANITIZER:-compute-sanitizer}
SERVE_ARGS=${SERVE_ARGS:---model small --device cuda --backend triton --threads 0}
# + the staged fp8 MLA kernel, which writes its rows into a global staging slot per program
MEMCHECK_TESTS="tests/kernels/test_paged_copy_kernel.py tests/kernels/test_topk_kernel.py tests/kernels/test_sparse_mla_kernel.py"
MEMCHECK_K="(match_reference or agrees_with_torch or cooperative or dequantise_each_row_once) and not production"
RACECHECK_TESTS="tests/kernels/test_paged_copy_kernel.py tests/kernels/test_topk_kernel.py tests/kernels/test_indexer_kernel.py"
RACECHECK_K="(roundtrip or agrees_with_torch or decode_scores) and not production"
declare -a SUMMARY=()

budget() { local s t=0; for s in "${PLAN[@]}"; do t=$((t + ${s#*:})); done; echo $t; }

dry_run() {
    printf '%-10s %8s  %s\n' stage timeout_s runs
    local s
    for s in "${PLAN[@]}"; do
        printf '%-10s %8s  %s\n' "${s%%:*}" "${s#*:}" "$(describe "${s%%:*}")"
    done
    printf '%-10s %8s  %s\n' total "$(budget)" "limit 540 s (one device command: 600 s)"
    for s in "${EXTRA[@]}"; do
        printf '%-10s %8s  %s\n' "(${s%%:*})" "${s#*:}" "optional, only when named: $(describe "${s%%:*}")"
    done
}

describe() {
    case $1 in
        setup) echo "pip install .whl/*.whl and -e . offline; print torch/triton/z3/GPU";;
        tests) echo "pytest tests/kernels tests/streams natively (gpu-marked included; -n 8 with xdist) -> \$OUT/tests.log";;
        bench) echo "kvproof bench kernels --quick --json --out \$OUT/bench_kernels.json";;
        memcheck) echo "compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1: $MEMCHECK_TESTS -> \$OUT/memcheck.log";;
        racecheck) echo "compute-sanitizer racecheck: $RACECHECK_TESTS, Triton reduction reports set aside -> \$OUT/racecheck.log";;
        benches) echo "kvproof bench hicache / layersplit --json -> \$OUT/bench_{hicache,layersplit}.json";;
        loadgen) echo "serve --engine local|pd $SERVE_ARGS + loadgen --json -> \$OUT/loadgen_{local,pd}.json";;
    esac
}

wheels() {
    # z3-solver is the one runtime dependency the GPU image lacks.
    local v exclude
    v=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('z3-solver'))")
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")" .whl
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d .whl "z3-solver==$v"
    ls -la .whl
}

stage_setup() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || return 1
    fi
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
    nvidia-smi -L
    $PY -c "import torch, triton, z3; print('torch', torch.__version__, 'triton', triton.__version__, \
'z3', z3.get_version_string(), 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())"
}

stage_tests() {
    # The compile-for-target test needs no GPU (CI runs it); xdist spreads the JIT compiles.
    local xdist=()
    $PY -c "import xdist" 2>/dev/null && xdist=(-n 8)
    env -u TRITON_INTERPRET $PY -m pytest -q -p no:cacheprovider -p no:randomly -rs "${xdist[@]}" \
        --ignore=tests/kernels/test_compile_target.py tests/kernels tests/streams > "$OUT/tests.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/tests.log"
    return $rc
}

stage_bench() {
    env -u TRITON_INTERPRET $PY -m kvproof bench kernels --quick --json --out "$OUT/bench_kernels.json" \
        > "$OUT/bench_kernels.stdout" 2> "$OUT/bench_kernels.log"
}

stage_memcheck() {
    # shellcheck disable=SC2086
    env -u TRITON_INTERPRET PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
        --error-exitcode 86 --target-processes all \
        $PY -m pytest -q -p no:cacheprovider -p no:randomly -x $MEMCHECK_TESTS -k "$MEMCHECK_K" \
        > "$OUT/memcheck.log" 2>&1
    local rc=$?
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -n 2
    return $rc
}

stage_racecheck() {
    # Triton's tl.sum/tl.max/tl.cumsum/tl.histogram across warps go through shared memory in a
    # pattern racecheck reports as hazards (triton#7264, #4736). A report whose source line
    # (file.py:LINE in the report) holds such a reduction is set aside; any other fails the stage.
    # shellcheck disable=SC2086
    env -u TRITON_INTERPRET "$SANITIZER" --tool racecheck --racecheck-report hazard \
        --target-processes all \
        $PY -m pytest -q -p no:cacheprovider -p no:randomly -x $RACECHECK_TESTS -k "$RACECHECK_K" \
        > "$OUT/racecheck.log" 2>&1
    local rc=$?
    $PY - "$OUT/racecheck.log" <<'PYEOF'
import re, sys
known = re.compile(r"tl\.(sum|max|min|cumsum|histogram|reduce|argmax|argmin|associative_scan)\b")
total = kept = 0
for line in open(sys.argv[1], errors="replace"):
    if "Race reported" not in line and "hazard" not in line.lower():
        continue
    m = re.search(r"in (\S+\.py):(\d+)", line)
    if not m:
        continue
    total += 1
    try:
        src = open(m.group(1)).read().splitlines()[int(m.group(2)) - 1]
    except (OSError, IndexError):
        src = ""
    if not known.search(src):
        kept += 1
        print("race outside a Triton reduction:", line.strip())
print(f"racecheck: {total} reports, {total - kept} inside Triton reductions (set aside), {kept} others")
sys.exit(1 if kept else 0)
PYEOF
    local parsed=$?
    [ "$rc" -ne 0 ] && return "$rc"
    return $parsed
}

stage_benches() {
    local rc=0 b
    for b in hicache layersplit; do
        env -u TRITON_INTERPRET $PY -m kvproof bench "$b" --json > "$OUT/bench_$b.json" 2>> "$OUT/benches.log" || rc=$?
    done
    return $rc
}

stage_loadgen() {
    local port=8765 rc=0 i engine pid
    for engine in local pd; do
        # shellcheck disable=SC2086
        env -u TRITON_INTERPRET $PY -m kvproof serve --engine $engine --port $port $SERVE_ARGS \
            >> "$OUT/loadgen.log" 2>&1 &
        pid=$!
        for i in $(seq 1 120); do
            curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
            sleep 1
        done
        $PY -m kvproof loadgen --url "http://127.0.0.1:$port" --requests 200 --concurrency 32 --json \
            > "$OUT/loadgen_$engine.json" 2>> "$OUT/loadgen.log" || rc=$?
        kill -INT $pid 2>/dev/null
        wait $pid 2>/dev/null
        port=$((port + 1))
    done
    return $rc
}

numbers() {  # key numbers of a stage, one line
    case $1 in
        tests) grep -E "passed|failed" "$OUT/tests.log" | tail -n 1;;
        bench) $PY - <<'EOF' 2>/dev/null || echo "(no JSON)"
import json, os
d = json.load(open(os.path.join(os.environ["OUT"], "bench_kernels.json")))
ok = [r for r in d["rows"] if r.get("pct_hbm_ceiling") is not None]
best = {}
for r in ok:
    best[r["kernel"]] = max(best.get(r["kernel"], 0), r["pct_hbm_ceiling"])
print(f"{len(ok)}/{len(d['rows'])} rows; HBM {d['ceilings'].get('hbm_gbps', 0):.0f} GB/s; best %HBM: "
      + ", ".join(f"{k} {v:.0f}" for k, v in best.items()))
EOF
        ;;
        memcheck) grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -n 1;;
        racecheck) grep -E "RACECHECK SUMMARY" "$OUT/racecheck.log" | tail -n 1;;
    esac
}

main() {
    local stages=() s t0 rc limit wanted entry
    if [ "${1:-}" = "--dry-run" ]; then dry_run; return 0; fi
    if [ "${1:-}" = wheels ]; then wheels; return; fi
    mkdir -p "$OUT"
    wanted=("$@")
    for entry in "${PLAN[@]}" "${EXTRA[@]}"; do
        if [[ ${#wanted[@]} -eq 0 && " ${PLAN[*]} " == *" $entry "* ]] \
            || [[ " ${wanted[*]} " == *" ${entry%%:*} "* ]]; then stages+=("$entry"); fi
    done
    for entry in "${stages[@]}"; do
        s=${entry%%:*}
        limit=${entry#*:}
        echo "=== $s (timeout ${limit}s)" | tee -a "$OUT/progress.log"
        t0=$(date +%s)
        # each stage runs in a subshell under its own timeout; its numbers are read after
        export -f "stage_$s"
        export PY OUT MEMCHECK_TESTS MEMCHECK_K RACECHECK_TESTS RACECHECK_K SERVE_ARGS SANITIZER
        timeout --kill-after=5 "$limit" bash -c "stage_$s" >> "$OUT/progress.log" 2>&1
        rc=$?
        SUMMARY+=("$(printf '%-10s %-16s %5ss / %4ss  %s' "$s" \
            "$([ $rc -eq 0 ] && echo ok || { [ $rc -eq 124 ] && echo TIMEOUT || echo "FAILED(rc=$rc)"; })" \
            "$(( $(date +%s) - t0 ))" "$limit" "$(numbers "$s")")")
        printf '%s\n' "${SUMMARY[-1]}" | tee -a "$OUT/progress.log"
    done
    printf '%s\n' "stage      status           time / limit  numbers" "${SUMMARY[@]}" | tee "$OUT/summary.txt"
}

main "$@"
