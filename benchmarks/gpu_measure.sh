#!/usr/bin/env bash
# benchmarks/gpu_measure.sh OUTDIR
#
# The measurement run of a GPU session, after benchmarks/gpu_run.sh on the same machine (the
# package installed, Triton's cache holding the default kernels). Steps, each under `timeout`,
# the whole within GPU_MEASURE_BUDGET_S (default 300 s), most wanted first:
#   install        only when gpu_nn does not import (gpu_run.sh has installed it)
#   tma-repeat     python -m gpu_nn.benchmarks.tma_fwd_repeat: the TMA conv forward tile the H200
#                  found wrong once (tma8x16 storing y through pointers) and its twins, 10 launches
#                  each, against a float64 reference: a race or a fault (tma_fwd_repeat.json)
#   sweep          python -m gpu_nn.benchmarks.sweep --only sweep: first every conv forward,
#                  input- and weight-gradient candidate (tiles, NHWC tiles, via channels_last, packed
#                  and split K, the TMA kernels) and torch at bench_conv's shapes, bfloat16 first,
#                  within at most 75 s of its budget (sweep_conv.json, and sweep.json's
#                  "conv"), then every launch configuration of a
#                  candidate grid of the activation, pooling and Adam kernels, checked against
#                  torch and timed (sweep.json, rewritten after every row)
#   rnn            ... --only rnn: the recurrent kernels (issue 16): torch.profiler breakdown of the
#                  LSTM T=100 N=64 fwd and fwd+bwd, ours against cuDNN (rnn_profile.json / .txt),
#                  then the step / persistent / projection kernels over their candidate
#                  configurations (rnn_sweep.json, rewritten after every row)
#                  The two sweeps share what the profile and REST seconds leave, in proportion to
#                  what each wants: GPU_MEASURE_SWEEP_S (default 150) and GPU_MEASURE_RNN_S
#                  (default 120) seconds of measuring, each plus MARGIN for its process; each gets
#                  all it wants when the budget holds both, none (skipped) where its measuring
#                  budget would be under 10 s. GPU_MEASURE_REST_S (default 75) is what they leave
#                  for the demo and its profile
#   profile        ... --only profile: torch.profiler breakdown of one warm fwd+bwd per op, ours
#                  against torch, both on their heuristics (GPU_NN_TUNE=0): every GPU event, wall
#                  time, GPU busy / idle (profile.json, profile.txt)
#   demo           gpu-nn demo --epochs 3 (eager; demo.json)
#   demo-profile   ... sweep --only demo: 10 training steps of each demo model, ours and the torch
#                  twin, under torch.profiler and cProfile (demo_profile.json / .txt), when 20 s are left
#   demo-compile   gpu-nn demo --epochs 3 --compile (demo-compile.json), when 60 s are left
#   demo-compile-rnn-gru / -lstm   the same with --compile-rnn, one model each, when 60 s are left
#   demo-fuse      gpu-nn demo --model cnn --epochs 3 --fuse: the CNN through gpu_nn.fuse (its three
#                  convolution / linear -> ReLU pairs one layer each), to set against demo.json's CNN,
#                  when 30 s are left
#   host_split     python -m gpu_nn.benchmarks.host_split: a call's host time piece by piece
#                  (host_split.json), when 20 s are left
#   kernel_counts  python -m gpu_nn.benchmarks.kernel_counts: GPU events per op fwd+bwd at tiny
#                  shapes (counts.json), when 30 s are left
#   func           gpu-nn bench --family func --quick: per-sample gradients of an MLP, a CNN and an LSTM, an MLP ensemble's step, on both
#                  backends against torch's layers (func/bench.json), when 30 s are left
#   demo-persistent-lstm / -gru   the recurrent demos on triton with GPU_NN_RNN_PERSISTENT=1 (every
#                  time loop one persistent launch, forward and backward), when 30 s are left each
# Kernel caches as in gpu_run.sh: a carried archive unpacked first (gpu_run.sh's entries already
# there are left alone), GPU_NN_PACK_CACHE=PATH packs the caches at the end (40 s kept for it).
# OUTDIR/summary.txt has one line per step (exit status, seconds); everything OUTDIR holds is also
# packed into OUTDIR.tgz beside it. Exits non-zero when a sweep or the profile failed or could
# not finish (the later steps repeat earlier measurements; their status is in the summary).
#
# GPU_MEASURE_STEPS (default: every step above) names the steps to run, in the order above; the
# others get a "not run" summary line. The demos run our heuristic configurations (GPU_NN_TUNE=0),
# as the bench and the torch twin's cuDNN do: tuning every candidate in the first epoch took the
# eager demo past its 50 s limit at a331102, with no demo.json.
#
# Typical device call (README, tools): gpu_run.sh, then this, each archive copied to $OUT.
set -u -o pipefail

. "$(dirname "${BASH_SOURCE[0]}")/steps.sh"  # begin, left, step, step_if_left, machine_info, select_steps, asked, wanted
begin "${1:?usage: benchmarks/gpu_measure.sh OUTDIR}"
BUDGET=${GPU_MEASURE_BUDGET_S:-300}
reserve_pack
SWEEP_S=${GPU_MEASURE_SWEEP_S:-150}
RNN_S=${GPU_MEASURE_RNN_S:-120}
ALL_STEPS="tma-repeat sweep rnn profile demo demo-profile demo-compile demo-compile-rnn demo-fuse host_split kernel_counts func demo-persistent"
select_steps GPU_MEASURE_STEPS "$ALL_STEPS" "$ALL_STEPS"

if ! "$PY" -c "import gpu_nn" > /dev/null 2>&1; then
    step install 60 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . || true
fi
carried_cache

# a correctness question first (under a minute with its compiles): is the suspect TMA tile's wrong
# result a race of every pipelined TMA tile, or its own fault? Its time comes out of the sweeps'
# share (AVAIL below is what it leaves), by choice: a wrong result outranks a timing
wanted tma-repeat && step tma-repeat 45 "$PY" -m gpu_nn.benchmarks.tma_fwd_repeat --repeats 10 --out "$OUTDIR"

SW=("$PY" -m gpu_nn.benchmarks.sweep --out "$OUTDIR")
PROFILE_S=60   # the profile step's limit; it starts no new case after PROFILE_S - 20
MARGIN=25      # a sweep's limit over its own budget: imports, CUDA start, the row in flight
REST=${GPU_MEASURE_REST_S:-75}  # kept for the demo (50 s) and its profile (25 s): the demo goal's only figures
# the two sweeps share what the profile and REST leave (where those are asked for), in proportion
# to their wants
asked profile || PROFILE_S=0
asked demo || asked demo-profile || REST=0
AVAIL=$(( $(left) - PROFILE_S - REST ))
WANT_SW=$(( SWEEP_S + MARGIN )); WANT_RNN=$(( RNN_S + MARGIN ))
# (a sweep not asked for takes no share)
asked sweep || WANT_SW=0
asked rnn || WANT_RNN=0
if (( AVAIL >= WANT_SW + WANT_RNN )); then
    SW_LIMIT=$WANT_SW; RNN_LIMIT=$WANT_RNN
elif (( AVAIL > 0 )); then
    SW_LIMIT=$(( AVAIL * WANT_SW / (WANT_SW + WANT_RNN) )); RNN_LIMIT=$(( AVAIL - SW_LIMIT ))
else
    SW_LIMIT=0; RNN_LIMIT=0
fi
SW_BUDGET=$(( SW_LIMIT - MARGIN )); (( SW_BUDGET < 0 )) && SW_BUDGET=0
RNN_BUDGET=$(( RNN_LIMIT - MARGIN )); (( RNN_BUDGET < 0 )) && RNN_BUDGET=0
# sweep_part NAME LIMIT BUDGET: the sweep's part NAME (sweep, rnn) with BUDGET seconds of
# measuring, its result line into the summary; skipped (status 0) under MIN_SWEEP_S of measuring,
# which would spend its start-up (imports, CUDA) for no row
MIN_SWEEP_S=10
# sweep_part NAME LIMIT BUDGET WANT: a skipped sweep says how many seconds more of
# GPU_MEASURE_BUDGET_S would have given it MIN_SWEEP_S of measuring (its share of AVAIL is WANT's)
sweep_part() {
    wanted "$1" || return 0
    if (( $3 < MIN_SWEEP_S )); then
        if (( $4 - MARGIN < MIN_SWEEP_S )); then  # (its GPU_MEASURE_*_S asks for less: no budget runs it)
            echo "$1: skipped (it asks for $(( $4 - MARGIN ))s of measuring, under ${MIN_SWEEP_S})" | tee -a "$SUMMARY"
            return 0
        fi
        local need=$(( ((MIN_SWEEP_S + MARGIN) * (WANT_SW + WANT_RNN) + $4 - 1) / $4 - AVAIL ))
        (( need < 1 )) && need=1
        echo "$1: skipped (a measuring budget of ${3}s, under ${MIN_SWEEP_S}: about ${need}s more of" \
             "GPU_MEASURE_BUDGET_S would run it)" | tee -a "$SUMMARY"
        return 0
    fi
    step "$1" "$2" "${SW[@]}" --only "$1" --budget-s "$3"
    local rc=$?
    grep -E "^$1: " "$OUTDIR/$1.log" 2>/dev/null | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"
    return "$rc"
}
sweep_part sweep "$SW_LIMIT" "$SW_BUDGET" "$WANT_SW"
SWEEP_RC=$?
sweep_part rnn "$RNN_LIMIT" "$RNN_BUDGET" "$WANT_RNN"
RNN_RC=$?

# the profile times each side's heuristic configurations (torch's cuDNN does not benchmark by
# default): measuring ours would compile every candidate of its first cases (the convolutions)
# inside the step's limit, and the later ops would go unprofiled
PROFILE_RC=0
if wanted profile; then
    step profile "$PROFILE_S" env GPU_NN_TUNE=0 "${SW[@]}" --only profile --profile-budget-s $(( PROFILE_S - 20 ))
    PROFILE_RC=$?
    grep -E "^profile: " "$OUTDIR/profile.log" 2>/dev/null | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"
fi

GN=("$PY" -m gpu_nn.cli)
# the demos (and their profile) on our heuristic configurations, as the bench and the twin's cuDNN
DEMO=(env GPU_NN_TUNE=0 "${GN[@]}" demo)
wanted demo && step demo 50 "${DEMO[@]}" --epochs 3 --json "$OUTDIR/demo.json" --no-progress
# where a demo step's time goes (its kernels compiled by the demo just run): GPU busy against
# wall, and the host's Python functions, ours against the twin
if wanted demo-profile; then
    step_if_left 20 demo-profile 30 env GPU_NN_TUNE=0 "${SW[@]}" --only demo --profile-budget-s 20
    grep -E "^demo profile: " "$OUTDIR/demo-profile.log" 2>/dev/null | tail -n 1 | sed 's/^/  /' | tee -a "$SUMMARY"
fi
# issue 14's other demo goal (<= 1.0x torch with both twins compiled with CUDA graphs): never
# measured yet (it came last), so right after the eager demo and its profile
wanted demo-compile && step_if_left 60 demo-compile 90 "${DEMO[@]}" --epochs 3 --compile \
    --json "$OUTDIR/demo-compile.json" --no-progress
# the recurrent demos compiled with Dynamo tracing their recurrent layers too (--compile-rnn: by
# default Dynamo runs torch's recurrent modules, and ours, eagerly inside the compiled models),
# one model a run: torch's own LSTM failed to train so under AOT autograd on the CPU (2.11, 2.13)
if wanted demo-compile-rnn; then
    for m in gru lstm; do
        step_if_left 60 "demo-compile-rnn-$m" 60 "${DEMO[@]}" --model "$m" --epochs 3 --compile --compile-rnn \
            --json "$OUTDIR/demo-compile-rnn-$m.json" --no-progress
    done
fi
# the CNN with its activations fused into the layers' epilogues (gpu_nn.fuse): 3 launches and 3
# autograd nodes fewer per step, measured against the unfused demo above
wanted demo-fuse && step_if_left 30 demo-fuse 30 "${DEMO[@]}" --model cnn --epochs 3 --fuse \
    --json "$OUTDIR/demo-fuse.json" --no-progress
# a call's host time piece by piece (allocation, current stream, the launch plan, Triton's launcher,
# our forward and backward apart, a bare autograd.Function; the optimizer with moving gradients):
# issue 14's host cost, the figures no CPU machine gives
wanted host_split && step_if_left 20 host_split 30 "$PY" -m gpu_nn.benchmarks.host_split --json "$OUTDIR/host_split.json"
# the tests pin the launch counts on a GPU already: these tables only where time is left
wanted kernel_counts && step_if_left 30 kernel_counts 40 "$PY" -m gpu_nn.benchmarks.kernel_counts --out "$OUTDIR/counts.json"
# torch.func workloads (per-sample gradients, vmap(hessian), a Hessian-vector product, jacfwd of an
# LSTM) on both GPU backends against torch's layers: the fold rules' figures on a GPU
wanted func && step_if_left 30 func 45 "${GN[@]}" bench --family func --quick --out "$OUTDIR/func" --no-progress
# the recurrent demos with every time loop in Triton's persistent launch (forward and backward; not
# the default until measured): the same epochs, to set against demo.json's, on the triton backend
# named explicitly (the persistent kernels are Triton's, whatever auto picks)
if wanted demo-persistent; then
    for m in lstm gru; do
        step_if_left 30 "demo-persistent-$m" 25 env GPU_NN_RNN_PERSISTENT=1 "${DEMO[@]}" --model "$m" --epochs 3 \
            --backend triton --json "$OUTDIR/demo-persistent-$m.json" --no-progress
    done
fi

echo "total: $(( SECONDS - START ))s; sweep rc=$SWEEP_RC, rnn rc=$RNN_RC, profile rc=$PROFILE_RC" | tee -a "$SUMMARY"
pack_cache
pack
exit $(( SWEEP_RC != 0 || RNN_RC != 0 || PROFILE_RC != 0 ))
