#!/usr/bin/env bash
# benchmarks/gpu_run.sh OUTDIR
#
# On a fresh GPU machine where torch, triton and cupy are already installed and nothing can be
# downloaded: install gpu-nn from this working tree without network, then run
#   gpu-nn info, gpu-nn check --json, gpu-nn sass --json (alongside check: CPU-only work),
#   gpu-nn bench --quick --out OUTDIR/bench, and the test suite (pytest -x -q tests),
# each under `timeout`, so that the whole script ends within 8 minutes. Every log, JSON and PNG
# lands in OUTDIR; OUTDIR/summary.txt has one line per step with its exit status and seconds.
# Exits non-zero when gpu-nn check failed (or could not run); everything is written regardless.
# OUTDIR holds about a dozen files; where only a few files come back (the device tool returns at
# most 8), run it into a scratch folder and tar that:
#   bash benchmarks/gpu_run.sh /tmp/gpu-run; tar -czf "$OUT/gpu-run.tgz" -C /tmp gpu-run
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_run.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-470}   # seconds for the whole script (8 minutes less a margin)
START=$SECONDS
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

left() { echo $(( BUDGET - (SECONDS - START) )); }

# step NAME LIMIT_S CMD...: run CMD under timeout (capped by the time left), tee its log.
step() {
    local name=$1 limit=$2; shift 2
    local rem; rem=$(left)
    (( limit > rem )) && limit=$rem
    if (( limit < 5 )); then
        echo "$name: skipped (no time left of ${BUDGET}s)" | tee -a "$SUMMARY"
        return 124
    fi
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: rc=$rc $(( SECONDS - t0 ))s$([ "$rc" = 124 ] && echo ' (timed out)')" | tee -a "$SUMMARY"
    return "$rc"
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(hostname)"
    git -C "$ROOT" rev-parse HEAD 2>/dev/null | sed 's/^/commit: /'
    nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
} > "$OUT/machine.txt"

# Install from the working tree: no index, no build isolation (setuptools is already there).
if ! step install 90 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .; then
    step install-noneditable 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index . || true
fi

GN=("$PY" -m gpu_nn.cli)
step info 30 "${GN[@]}" info

# sass is CPU-only (ptxas, cuobjdump): compile alongside check, finish before bench times anything.
( step sass 150 "${GN[@]}" sass --json "$OUT/sass.json" >/dev/null ) &
SASS_PID=$!
step check 150 "${GN[@]}" check --json "$OUT/check.json" --no-progress
CHECK_RC=$?
wait "$SASS_PID"

# The persistent RNN forward's grid barrier has never run on a GPU (it ships opt-in): test it on
# its own, under its own timeout, before anything launches it; a hang or failure keeps it out of
# the benchmark and out of the full pytest run.
PERSIST_K=persistent_multi_program
if ! step persistent 90 "$PY" -m pytest -q tests/test_rnn.py -k "$PERSIST_K" -p no:cacheprovider; then
    export GPU_NN_BENCH_SKIP_PERSISTENT=1
fi

step bench 150 "${GN[@]}" bench --quick --out "$OUT/bench" --no-progress

PYTEST_ARGS=(-x -q tests -p no:cacheprovider -k "not $PERSIST_K")
"$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n 8)
step pytest 150 "$PY" -m pytest "${PYTEST_ARGS[@]}"

echo "total: $(( SECONDS - START ))s; check rc=$CHECK_RC" | tee -a "$SUMMARY"
exit $(( CHECK_RC != 0 ))
