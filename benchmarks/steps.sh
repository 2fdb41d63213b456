# benchmarks/steps.sh: the step runner of gpu_run.sh and gpu_measure.sh (sourced, not run).
#
# The sourcing script calls `begin OUTDIR_ARG` first (which sets OUTDIR, ROOT, PY, SUMMARY, START,
# moves to the repository root and writes OUTDIR/machine.txt) and sets BUDGET (seconds for the
# whole script).

# begin OUTDIR_ARG: the common start of gpu_run.sh and gpu_measure.sh
begin() {
    mkdir -p "$1"
    OUTDIR=$(cd "$1" && pwd)
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    cd "$ROOT" || exit 1
    PY=${PYTHON:-python3}
    START=$SECONDS
    SUMMARY="$OUTDIR/summary.txt"
    # tests/conftest.py sets TRITON_DEFAULT_FP_FUSION=1 (Triton's default value), and a set value is
    # part of Triton's cache key: set for every step, the kernels check, bench and the tests
    # compile share one on-disk cache instead of compiling twice
    export TRITON_DEFAULT_FP_FUSION=1
    : > "$SUMMARY"
    machine_info > "$OUTDIR/machine.txt"
}

# pack: OUTDIR.tgz of everything OUTDIR holds. The script's own budget is what bounds it (every
# step's limit, its kill's grace included, within what is left), so a device call's limit can
# sit just above the budgets: an outer `timeout` would end the script before this and lose the
# archive (a trap could not help: bash runs it only once the step in the foreground has ended)
pack() {
    tar -czf "$OUTDIR.tgz" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")"
}

# carried_cache: unpack the kernel caches an earlier GPU run on the same image packed
# (python -m gpu_nn.benchmarks.triton_cache pack; its docstring says what it holds), where one
# travelled with the repository: GPU_NN_CARRIED_CACHE, else .gpu_cache/triton-cache.tar.xz (the
# device tool's `carry`). GPU_NN_CARRIED_CACHE=none compiles everything, as a fresh machine does
# (issue 17's figures are a fresh machine's). The summary says which it was; a second script on
# the same machine finds the entries there and writes nothing.
carried_cache() {
    local archive=${GPU_NN_CARRIED_CACHE:-$ROOT/.gpu_cache/triton-cache.tar.xz}
    if [ "$archive" = none ]; then
        echo "  cache: none carried (GPU_NN_CARRIED_CACHE=none): kernels compile on first use" | tee -a "$SUMMARY"
        return 0
    fi
    if [ ! -f "$archive" ]; then
        echo "  cache: none carried ($archive absent): kernels compile on first use" | tee -a "$SUMMARY"
        return 0
    fi
    step cache 60 "$PY" -m gpu_nn.benchmarks.triton_cache unpack "$archive"
    tail -n 1 "$OUTDIR/cache.log" | sed 's/^/  cache: /' | tee -a "$SUMMARY"
}

# pack_cache: with GPU_NN_PACK_CACHE=PATH, the kernel caches as this run leaves them packed into
# PATH (outside OUTDIR: one more file for the device tool, at most 15 MiB), for the next run to
# carry. Its own PACK_S, after the budget: a script that packs runs on BUDGET - PACK_S
# (reserve_pack, called before its steps)
PACK_S=40
reserve_pack() {
    [ -n "${GPU_NN_PACK_CACHE:-}" ] && BUDGET=$(( BUDGET - PACK_S ))
    return 0
}
pack_cache() {
    [ -n "${GPU_NN_PACK_CACHE:-}" ] || return 0
    # within PACK_S, the kill's grace included; entries stop 15 s before it (imports, the flush)
    timeout -k 5 "$(( PACK_S - 5 ))" "$PY" -m gpu_nn.benchmarks.triton_cache pack "$GPU_NN_PACK_CACHE" \
        --max-s "$(( PACK_S - 15 ))" > "$OUTDIR/cache-pack.log" 2>&1
    echo "  cache: rc=$? $(tail -n 1 "$OUTDIR/cache-pack.log")" | tee -a "$SUMMARY"
}

# select_steps VAR ALLOWED DEFAULT: the steps a call runs, STEPS_ASKED, from the variable named VAR
# (names apart by any white space; unset, empty or blank: DEFAULT); a name not in ALLOWED is refused
# before any step runs (exit 2), the archive made for the call's copy
select_steps() {
    local var=$1 allowed=$2 default=$3 s
    local -  # (set -f below: a name is never a file pattern)
    set -f
    STEPS_VAR=$var
    STEPS_ASKED=$(printf '%s' "${!var:-}" | tr -s ' \t\n' '   ' | sed 's/^ //; s/ $//')
    [ -n "$STEPS_ASKED" ] || STEPS_ASKED=$default  # (unset, empty or white space only)
    for s in $STEPS_ASKED; do
        [[ " $allowed " == *" $s "* ]] && continue
        echo "$var: unknown step '$s' ($allowed)" | tee -a "$SUMMARY"
        pack
        exit 2
    done
}

# asked NAME: whether the call runs step NAME (select_steps), quietly
asked() { [[ " $STEPS_ASKED " == *" $1 "* ]]; }

# wanted NAME: asked, else a summary line says it was left out
wanted() {
    asked "$1" && return 0
    echo "$1: not run ($STEPS_VAR=$STEPS_ASKED)" | tee -a "$SUMMARY"
    return 1
}

# step_if_left NEED NAME LIMIT_S CMD...: step NAME (see step) where at least NEED s of the budget
# are left, else a summary line says it was skipped and what it needs
step_if_left() {
    local need=$1 name=$2; shift 2
    if (( $(left) >= need )); then
        step "$name" "$@"
    else
        echo "$name: skipped ($(left)s left of ${BUDGET}s, it needs $need)" | tee -a "$SUMMARY"
    fi
}

# seconds of BUDGET left
left() { echo $(( BUDGET - (SECONDS - START) )); }

# step NAME LIMIT_S CMD...: run CMD under timeout (capped by the time left), log to NAME.log,
# and write one summary line. The limit's signal is STEP_SIGNAL (default TERM; pytest takes INT,
# on which it still prints its failure summary), SIGKILL STEP_KILL_S (default 10) s later.
step() {
    local name=$1 limit=$2; shift 2
    local grace=${STEP_KILL_S:-10}
    local rem; rem=$(( $(left) - grace ))  # (the kill's grace inside the budget)
    (( limit > rem )) && limit=$rem
    if (( limit < 5 )); then
        echo "$name: skipped (no time left of ${BUDGET}s)" | tee -a "$SUMMARY"
        return 124
    fi
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" > "$OUTDIR/$name.log"
    timeout -s "${STEP_SIGNAL:-TERM}" -k "$grace" "$limit" "$@" >> "$OUTDIR/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc $(( SECONDS - t0 ))s$( [ "$rc" = 124 ] && echo ' (timed out)')" | tee -a "$SUMMARY"
    return "$rc"
}

# date, host, commit, cores, nvidia-smi and the Python packages (the image's setuptools decides
# which pyproject.toml forms install there), for OUTDIR/machine.txt
machine_info() {
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(hostname)"
    git -C "$ROOT" rev-parse HEAD 2>/dev/null | sed 's/^/commit: /'
    echo "cpus: $(nproc 2>/dev/null || echo unknown)"
    nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
    echo "python packages ($("$PY" --version 2>&1)):"
    timeout 30 "$PY" -m pip list --format=freeze 2>&1 | sed 's/^/  /'
}
