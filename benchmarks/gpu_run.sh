#!/usr/bin/env bash
# benchmarks/gpu_run.sh OUTDIR
#
# The GPU validation run, for a fresh GPU machine where torch, triton and cupy are installed and
# nothing can be downloaded (the device tool's H200 image). Steps, each under `timeout`, the whole
# within GPU_RUN_BUDGET_S (default 330 s: issue 17's 6 minutes less a margin for the archive):
#   install   pip install -e . without index or build isolation
#   info      gpu-nn info (versions, device, which backends work)
#   check     gpu-nn check --no-progress --json (one line per op as it finishes; its workers
#             compile kernels in parallel, and its last lines say how much time was compilation)
#   bench     gpu-nn bench --quick --warm-jobs N --warm-budget-s GPU_RUN_WARM_S (JSON + PNG): N processes
#             first make every case's first call in parallel (kernel compilation on N cores; the
#             cold first calls are kept in bench.json as first_call_cold), starting none after
#             GPU_RUN_WARM_S (default 60 s), within GPU_RUN_BENCH_S (default 120 s) in all,
#             then one process times every case, bench.json rewritten after each. The heuristic
#             configurations (GPU_NN_TUNE=0): with tuning on, the warm phase of the H200 run at
#             a331102 compiled and timed every candidate of every tuned launcher and did not end
#             within the step's 120 s, leaving no ratio table (the warm processes' choices are
#             thrown away, so the timed phase would tune again). GPU_RUN_BENCH_TUNE=1 tunes as before:
#             with GPU_NN_TUNE_RECORD=OUTDIR/tuning.jsonl every candidate configuration of every
#             tuned launcher is timed at every benchmark shape it meets, one JSON row each
#             ({device_key, op, key, config, ms, chosen}), so that CPU-only sessions can fit
#             heuristics to them, and GPU_NN_TUNE_CACHE=OUTDIR/tuning-cache.json starts the tuning
#             cache empty and keeps the choices made (gpu_measure.sh's sweeps time the candidates too)
#   pytest    the suite with xdist (all but the CPU-only sm_90 AOT compile file, which CI runs), -rfE so
#             that a run cut short still names what failed (its limit sends SIGINT, on which pytest
#             prints the summary; each failure is also appended to pytest-failures.txt as it is
#             reported, GPU_NN_FAIL_LOG in tests/conftest.py, for a run killed before its summary); it gets the time the steps before left, so the tests only a GPU
#             runs go first and the CUDA-graph captures last (GPU_NN_TEST_ORDER=gpu-first,
#             tests/conftest.py)
#   (cache)   python -m gpu_nn.benchmarks.triton_cache: compiled variants per kernel (triton_cache.json;
#             with a carried cache, how many this run compiled itself)
#   record    gpu-nn results record: OUTDIR/results/<run>/ is what goes into benchmarks/results/
# Kernel caches: after install, the archive an earlier run packed is unpacked where one travelled
# with the repository (.gpu_cache/triton-cache.tar.xz, or GPU_NN_CARRIED_CACHE; =none for a fresh
# machine's figures); GPU_NN_PACK_CACHE=PATH packs what this run leaves for the next one (steps.sh:
# carried_cache, pack_cache). The summary says whether a carried cache served the run.
# The SASS report needs no GPU: it runs on CPU machines (`gpu-nn sass`), not here.
# OUTDIR/summary.txt has one line per step (exit status, seconds); everything OUTDIR holds is also
# packed into OUTDIR.tgz beside it, one file for the device tool (which returns at most 8).
# Exits non-zero when check or the tests failed or could not finish.
# GPU_RUN_STEPS (default "check bench pytest") names which of those three run (install and info
# always do, record where check or bench ran): a session splits them over two device calls, the
# measurement first (GPU_RUN_STEPS="check bench" with GPU_RUN_BENCH_S / GPU_RUN_WARM_S, the bench
# step's limit and its warm phase's budget, defaults 120 and 60 s), the tests in a second call on
# the warm machine (GPU_RUN_STEPS=pytest). One call of all three cut both: at 09f2311 the bench timed 40 of 186
# cases in its 120 s (all convolutions) and the tests, in what was left, about 72 % of the suite.
#
# Typical device calls (README has the whole recipe, gpu_measure.sh in the first):
#   GPU_RUN_STEPS="check bench" GPU_RUN_BUDGET_S=420 GPU_RUN_BENCH_S=290 GPU_RUN_WARM_S=110 \
#       bash benchmarks/gpu_run.sh /tmp/gpu-run; cp /tmp/gpu-run.tgz "$OUT/"
#   GPU_RUN_STEPS=pytest GPU_RUN_BUDGET_S=... bash benchmarks/gpu_run.sh /tmp/gpu-tests; cp /tmp/gpu-tests.tgz "$OUT/"
# then here: tar -xzf gpu-run.tgz -C /tmp && tar -xzf gpu-tests.tgz -C /tmp &&
#   gpu-nn results record /tmp/gpu-run --tests /tmp/gpu-tests
set -u -o pipefail

. "$(dirname "${BASH_SOURCE[0]}")/steps.sh"  # begin, left, step, machine_info, select_steps, asked, wanted
begin "${1:?usage: benchmarks/gpu_run.sh OUTDIR}"
BUDGET=${GPU_RUN_BUDGET_S:-330}
reserve_pack
NCPU=$(nproc 2>/dev/null || echo 4)
select_steps GPU_RUN_STEPS "check bench pytest" "check bench pytest"
# what record and the cache count after the last step need: a call of the tests alone records nothing
RECORD_S=10
RECORDS=false  # (record runs where check or bench did)
if asked check || asked bench; then RECORDS=true; RECORD_S=25; fi
BENCH_S=${GPU_RUN_BENCH_S:-120}
WARM_S=${GPU_RUN_WARM_S:-60}
CHECK_RC=0
TEST_RC=0

if ! step install 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .; then
    step install-noneditable 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index . || true
fi
carried_cache

GN=("$PY" -m gpu_nn.cli)
# check and the tests run the heuristic configurations: measuring every candidate at each of
# their many small shapes would cost compile time and prove nothing more (the tests check each
# candidate's results explicitly); the bench step below tunes and records
export GPU_NN_TUNE=0
step info 30 "${GN[@]}" info

# check: one worker per core (up to 16); first use of each kernel compiles, in parallel.
if wanted check; then
    step check 90 "${GN[@]}" check --json "$OUTDIR/check.json" --no-progress
    CHECK_RC=$?
    tail -n 3 "$OUTDIR/check.log" | grep -v '^== ' | sed -e 's/^/  check: /' -e '$a\' | tee -a "$SUMMARY"
fi

# the first call of each tuned shape compiles and times every candidate (first_call in bench.json)
if wanted bench; then
    rm -f "$OUTDIR/tuning.jsonl" "$OUTDIR/tuning-cache.json"
    WARM_JOBS=$(( NCPU > 12 ? 12 : NCPU ))
    BENCH=("${GN[@]}" bench --quick --warm-jobs "$WARM_JOBS" --warm-budget-s "$WARM_S" --out "$OUTDIR/bench" --no-progress)
    # (its limit leaves record its time: the step's own grace, 10 s, and RECORD_S)
    (( BENCH_S > $(left) - 10 - RECORD_S )) && BENCH_S=$(( $(left) - 10 - RECORD_S ))
    if [ "${GPU_RUN_BENCH_TUNE:-0}" = 1 ]; then
        step bench "$BENCH_S" env GPU_NN_TUNE=1 GPU_NN_TUNE_RECORD="$OUTDIR/tuning.jsonl" GPU_NN_TUNE_CACHE="$OUTDIR/tuning-cache.json" \
            "${BENCH[@]}"
        echo "  bench: $(cat "$OUTDIR/tuning.jsonl" 2>/dev/null | wc -l | tr -d ' ') tuning timings recorded in tuning.jsonl" \
            | tee -a "$SUMMARY"
    else
        step bench "$BENCH_S" "${BENCH[@]}"
    fi
    grep -E "^warm phase: " "$OUTDIR/bench.log" 2>/dev/null | sed 's/^/  bench: /' | tee -a "$SUMMARY"
    # issue 14's goal: our calls at the bench shapes whose host time nears their event time
    grep -E "^host-bound " "$OUTDIR/bench.log" 2>/dev/null | sed 's/^/  bench: /' | tee -a "$SUMMARY"
fi

# The tests reuse the kernels check compiled (Triton's on-disk cache).
WORKERS=$(( NCPU > 16 ? 16 : NCPU ))
# tests/test_compile.py is left out here: it compiles every configuration for sm_90 ahead of time
# with Triton's ptxas, CPU work that needs no GPU and that CI runs on every change (its rnn case
# alone takes about 3 minutes of one core, more than this step's limit); everything else runs.
# The SASS report's test is left out for the same reason (CPU work, about 50 s of one worker here),
# and the NVRTC compile of rnn.cu's loader builds (CPU work: 74 s of one worker on the H200 at
# 09f2311 for all 24, the suite's slowest test there; 12 of them by default since stop 78).
PYTEST_ARGS=(-q -rfE --tb=short tests -p no:cacheprovider --durations=15 --ignore=tests/test_compile.py
             --deselect tests/test_cli.py::test_sass_prints_the_table
             --deselect tests/test_cupy_rnn.py::test_rnn_cu_loader_builds_compile_for_sm90_without_spills)
"$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS+=(-n "$WORKERS")
# whatever time is left, less what record needs (its limit's kill grace, the cache count's few
# seconds, at least 5 s of its own) and the kill grace pytest gets: after the limit's SIGINT,
# xdist waits up to 10 s for its workers and pytest then prints its failures and closing counts,
# which the default 10 s grace cut off in both H200 runs (a331102, 09f2311: rc 137, no counts
# line; record then had no time left); --tb=short keeps that print short
if wanted pytest; then
    PT_KILL_S=20
    PT_LIMIT=$(( $(left) - RECORD_S - PT_KILL_S )); (( PT_LIMIT > 240 )) && PT_LIMIT=240
    rm -f "$OUTDIR/pytest-failures.txt"
    STEP_SIGNAL=INT STEP_KILL_S=$PT_KILL_S step pytest "$PT_LIMIT" env GPU_NN_TEST_ORDER=gpu-first \
        GPU_NN_FAIL_LOG="$OUTDIR/pytest-failures.txt" "$PY" -m pytest "${PYTEST_ARGS[@]}"
    TEST_RC=$?
    grep -E "^(FAILED|ERROR) " "$OUTDIR/pytest.log" | head -20 | sed 's/^/  pytest: /' | tee -a "$SUMMARY"
    # each failure as it was reported (tests/conftest.py's GPU_NN_FAIL_LOG): named even when the limit
    # killed pytest before its summary
    [ -s "$OUTDIR/pytest-failures.txt" ] && echo "  pytest: $(grep -c '^=== FAILED' "$OUTDIR/pytest-failures.txt") failures named in pytest-failures.txt" | tee -a "$SUMMARY"
    # pytest's closing counts (after an interrupt a traceback follows them), else the log's last line
    PT_LAST=$(grep -E "[0-9]+ (passed|failed|errors?)\b.* in [0-9.]+s" "$OUTDIR/pytest.log" | tail -n 1)
    [ -n "$PT_LAST" ] || PT_LAST=$(tail -n 1 "$OUTDIR/pytest.log")
    echo "  pytest: $PT_LAST" | tee -a "$SUMMARY"
fi

# what the run compiled, per kernel (Triton's cache): the suite's time on a fresh machine is
# compilation, and these counts say which kernels' variants to cut
"$PY" -m gpu_nn.benchmarks.triton_cache --json "$OUTDIR/triton_cache.json" > "$OUTDIR/triton_cache.txt" 2>&1
head -n 1 "$OUTDIR/triton_cache.txt" | sed 's/^/  /' | tee -a "$SUMMARY"

# (a call of the tests alone has nothing to record: its logs are in the archive)
if $RECORDS; then
    step record 20 "${GN[@]}" results record "$OUTDIR" --into "$OUTDIR/results" --no-render
fi

echo "total: $(( SECONDS - START ))s; check rc=$CHECK_RC, pytest rc=$TEST_RC" | tee -a "$SUMMARY"
pack_cache
pack
exit $(( CHECK_RC != 0 || TEST_RC != 0 ))
