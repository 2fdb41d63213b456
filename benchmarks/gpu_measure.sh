#!/usr/bin/env bash
# benchmarks/gpu_measure.sh OUTDIR
#
# The measurement run of a GPU session, after benchmarks/gpu_run.sh on the same machine (the
# package installed, Triton's cache holding the default kernels). Steps, each under `timeout`,
# the whole within GPU_MEASURE_BUDGET_S (default 300 s), most wanted first:
#   install        only when gpu_nn does not import (gpu_run.sh has installed it)
#   sweep          python -m gpu_nn.benchmarks.sweep --only sweep: first every conv forward
#                  candidate (direct, NHWC tiles, via channels_last) and torch at bench_conv's
#                  shapes, within at most 60 s (sweep_conv.json, and sweep.json's "conv"), then
#                  every launch configuration of a candidate grid of the activation, pooling and
#                  Adam kernels, checked against torch and timed (sweep.json, rewritten after
#                  every row); its --budget-s is GPU_MEASURE_SWEEP_S (default 150) or less, so
#                  that the profile keeps its time
#   profile        ... --only profile: torch.profiler breakdown of one warm fwd+bwd per op, ours
#                  against torch: every GPU event, wall time, GPU busy / idle (profile.json,
#                  profile.txt)
#   kernel_counts  python -m gpu_nn.benchmarks.kernel_counts: GPU events per op fwd+bwd at tiny
#                  shapes (counts.json)
#   demo           gpu-nn demo --epochs 3 (eager; demo.json)
#   demo-compile   the same with --compile (demo-compile.json), when 60 s are left
# OUTDIR/summary.txt has one line per step (exit status, seconds); everything OUTDIR holds is also
# packed into OUTDIR.tgz beside it. Exits non-zero when the sweep or the profile failed or could
# not finish (the later steps repeat earlier measurements; their status is in the summary).
#
# Typical device call (README, tools): gpu_run.sh, then this, each archive copied to $OUT.
set -u -o pipefail

. "$(dirname "${BASH_SOURCE[0]}")/steps.sh"  # begin, left, step, machine_info
begin "${1:?usage: benchmarks/gpu_measure.sh OUTDIR}"
BUDGET=${GPU_MEASURE_BUDGET_S:-300}
SWEEP_S=${GPU_MEASURE_SWEEP_S:-150}

if ! "$PY" -c "import gpu_nn" > /dev/null 2>&1; then
    step install 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . || true
fi

SW=("$PY" -m gpu_nn.benchmarks.sweep --out "$OUTDIR")
PROFILE_S=60   # the profile step's limit; it starts no new case after PROFILE_S - 20
MARGIN=25      # the sweep's limit over its own budget: imports, CUDA start, the row in flight
# the sweep gets what the profile and a minute for the rest leave, at most SWEEP_S of measuring
SW_LIMIT=$(( $(left) - PROFILE_S - 60 ))
(( SW_LIMIT > SWEEP_S + MARGIN )) && SW_LIMIT=$(( SWEEP_S + MARGIN ))
SW_BUDGET=$(( SW_LIMIT - MARGIN )); (( SW_BUDGET < 0 )) && SW_BUDGET=0
step sweep "$SW_LIMIT" "${SW[@]}" --only sweep --budget-s "$SW_BUDGET"
SWEEP_RC=$?
grep -E "^sweep: " "$OUTDIR/sweep.log" 2>/dev/null | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"

step profile "$PROFILE_S" "${SW[@]}" --only profile --profile-budget-s $(( PROFILE_S - 20 ))
PROFILE_RC=$?
grep -E "^profile: " "$OUTDIR/profile.log" 2>/dev/null | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"

step kernel_counts 40 "$PY" -m gpu_nn.benchmarks.kernel_counts --out "$OUTDIR/counts.json"

GN=("$PY" -m gpu_nn.cli)
step demo 50 "${GN[@]}" demo --epochs 3 --json "$OUTDIR/demo.json" --no-progress
if (( $(left) >= 60 )); then
    step demo-compile 90 "${GN[@]}" demo --epochs 3 --compile --json "$OUTDIR/demo-compile.json" --no-progress
else
    echo "demo-compile: skipped ($(left)s left of ${BUDGET}s, it needs 60)" | tee -a "$SUMMARY"
fi

echo "total: $(( SECONDS - START ))s; sweep rc=$SWEEP_RC, profile rc=$PROFILE_RC" | tee -a "$SUMMARY"
tar -czf "$OUTDIR.tgz" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")"
exit $(( SWEEP_RC != 0 || PROFILE_RC != 0 ))
