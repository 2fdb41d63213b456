"""Recurrent layers: LSTM and GRU forward / forward+backward.

CPU set (device "cpu"): T=50 B=32 I=128 H=256, float32, the NumPy reference fallback
(``gpu_nn.nn.LSTM`` / ``GRU`` on the reference backend) against torch CPU.
GPU set (device "cuda", issues 6 and 16), float32 and bfloat16, torch's default precision switches
(float32 recurrent layers in TF32 on both sides, ``torch.backends.cudnn.allow_tf32``):
LSTM, GRU and RNN (tanh) T=100 N=64 I=H=512 forward and forward+backward (``triton-persistent``
too: 128 tiles, one program each, though the default takes the persistent kernel at N <= 16
only); small batch N=4 and 16,
T=50, at H=256 / 512 / 1024 (``--quick`` and the Elman layer: 512) forward, and forward+backward at
H=512 (all three, issue 16's small-batch goals);
a 2-layer bidirectional LSTM N=32 T=100 I=H=256 forward+backward; a bidirectional LSTM N=4 T=50
I=H=512 forward; the demo's models (LSTM and GRU, T=8 N=32 I=8 H=32, two bidirectional layers,
float32) forward+backward, with an input that requires grad and on data as the demo trains them
(``data-input``: the weights' gradients alone); a packed LSTM N=64 T=100 I=H=512 forward+backward
(lengths T down to T / 10, ``packed_lengths``; per step, both persistent forms forced on, cupy),
PackedSequence in and out on both sides. torch (cuDNN) against our
triton and cupy backends and against a Python loop of ``torch.nn.LSTMCell`` / ``GRUCell`` /
``RNNCell``; forward-only cases run both modules in eval mode (inference: cuDNN's own inference
path); provider ``triton`` runs the per-step launches (``GPU_NN_RNN_PERSISTENT=0``), in the
small-batch fwd+bwd cases ``triton-default`` runs ours with no switch set (the persistent
forward, the per-step backward: the default combination, which neither forced form is), and in
the small-batch set ``triton-persistent`` the one-launch persistent forward and, in the
fwd+bwd cases, the one-launch persistent backward (``GPU_NN_RNN_PERSISTENT=1``; W_hh resident
on the SMs where it applies, forward and backward), and in its forward cases and its one-layer
fwd+bwd cases ``triton-persistent-l2`` the persistent kernels re-reading W_hh from L2 every step
(``GPU_NN_RNN_RESIDENT=0``). In the
bidirectional cases ``cupy`` runs both directions of a layer in one device-loop launch (its
default) and ``cupy-one-direction`` one launch per direction, one after the other (what it did
before), so the run shows what the pairing gains. ``cupy-mma`` (the LSTM at the main shape, the
small-batch and bidirectional fwd+bwd cases) runs the cupy device loop's dots on the tensor cores
(``GPU_NN_CUPY_RNN=mma``; float32 with torch's default TF32 setting, bfloat16) against its
default CUDA-core loop (``cupy``).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import gpu_nn
from gpu_nn import nn as gnn
from gpu_nn.benchmarks import harness
from gpu_nn.kernels import env_switch

TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
PERSISTENT_ENV = "GPU_NN_RNN_PERSISTENT"
CUPY_RNN_ENV = "GPU_NN_CUPY_RNN"
RESIDENT_ENV = "GPU_NN_RNN_RESIDENT"
# provider -> (backend, GPU_NN_RNN_PERSISTENT, GPU_NN_RNN_RESIDENT): the small-batch set measures
# the per-step launches ("triton", forced off), the persistent kernel ("triton-persistent", forced
# on, W_hh resident where it applies: kernels/triton/rnn.py resident_kp) and, in the forward
# cases, the one-layer small-batch fwd+bwd cases and the packed case, the persistent kernels
# re-reading W_hh from L2 every step ("triton-persistent-l2")
PROVIDERS = {"triton": ("triton", "0", None), "triton-persistent": ("triton", "1", "1"),
             "triton-persistent-l2": ("triton", "1", "0"),
             "triton-default": ("triton", harness.UNSET, harness.UNSET)}  # the switches removed: the code's default
SMALL_PROVIDERS = ("triton", "triton-persistent", "triton-persistent-l2", "cupy", "cell_loop")
PERSISTENT_PROVIDERS = ("triton-persistent", "triton-persistent-l2")
SKIP_PERSISTENT_ENV = "GPU_NN_BENCH_SKIP_PERSISTENT"  # set by hand ("1") to leave the persistent kernels out


def _unskipped(providers):
    """``providers`` less the persistent ones where GPU_NN_BENCH_SKIP_PERSISTENT=1."""
    if env_switch(SKIP_PERSISTENT_ENV):
        return tuple(p for p in providers if p not in PERSISTENT_PROVIDERS)
    return tuple(providers)


def _small_providers():
    return _unskipped(SMALL_PROVIDERS)


def _layer_providers(l2: bool = False):
    """The fwd+bwd cases' providers: per step, persistent, cupy (a cell loop has no backward
    through a bidirectional stack, nor a persistent form); with ``l2`` the persistent kernels
    re-reading W_hh from L2 too (forward and backward: the one-layer small-batch cases, where the
    resident backward is set against it; elsewhere the L2 form is timed in the forward cases)."""
    drop = ("cell_loop",) if l2 else ("cell_loop", "triton-persistent-l2")
    return tuple(p for p in _small_providers() if p not in drop)


def _with_default(providers):
    """``providers`` and, after triton, ``triton-default``: ours with no switch set, what a user
    gets. At small batch its fwd+bwd is neither forced form (the persistent forward by default,
    the per-step backward: ops.rnn PERSISTENT_BWD_BY_DEFAULT), so the forced ones alone would leave
    the default combination untimed (a benchmark audit); its kernels are theirs (no compile)."""
    if env_switch(SKIP_PERSISTENT_ENV):  # (the default forward is persistent at small batch)
        return tuple(providers)
    return tuple(q for p in providers for q in ((p, "triton-default") if p == "triton" else (p,)))


def _mma(providers):
    """``providers`` and, after cupy, cupy with its loop's dots on the tensor cores."""
    return tuple(q for p in providers for q in ((p, "cupy-mma") if p == "cupy" else (p,)))


def _bi(providers):
    """A bidirectional case's providers: ``providers`` and, after cupy, cupy with one launch
    per direction; no cell loop (torch's cells run one direction: its twin of a bidirectional
    layer does not exist, and building it failed the whole family's case list)."""
    return tuple(q for p in providers if p != "cell_loop"
                 for q in ((p, "cupy-one-direction") if p == "cupy" else (p,)))


class _one_direction_loops:
    """The cupy backend's bidirectional layers one device-loop launch per direction while a call
    runs (``_CupyImpl.pair_loops`` off)."""

    def __enter__(self):
        from gpu_nn.ops import rnn as ops

        self.impl, self.old = ops._CupyImpl, ops._CupyImpl.pair_loops
        self.impl.pair_loops = False
        return self

    def __exit__(self, *exc):
        self.impl.pair_loops = self.old
        return False

OURS = {"lstm": gnn.LSTM, "gru": gnn.GRU, "rnn": gnn.RNN}
CELLS = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _flops(mode, T, N, I, H, backward, L=1, D=1):
    G = GATES[mode]
    f = sum(2 * T * N * G * H * ((I if l == 0 else D * H) + H) for l in range(L)) * D
    return f * 3 if backward else f


def packed_lengths(T: int, N: int) -> torch.Tensor:
    """The packed cases' sequence lengths: N lengths spread evenly from T down to T // 10, in a
    fixed shuffled order (a batch as a data loader gives it: ``enforce_sorted=False``)."""
    lens = torch.linspace(T, max(1, T // 10), N).round().to(torch.int64)
    return lens[torch.randperm(N, generator=torch.Generator().manual_seed(0))]


def _case(mode, T, N, I, H, dtype, device, backward, providers, L=1, bidirectional=False, packed=False,
          data_input=False):
    D = 2 if bidirectional else 1
    name = f"{mode} {'fwd+bwd' if backward else 'fwd'}"
    layers = f" L={L}" if L > 1 else ""
    shape = (f"T={T} N={N} I={I} H={H}{layers}{' bi' if bidirectional else ''}{' packed' if packed else ''}"
             f"{' data-input' if data_input else ''} {str(dtype).replace('torch.', '')}")
    kw = {"num_layers": L, "bidirectional": bidirectional}
    base = TORCH[mode](I, H, **kw).to(device=device, dtype=dtype)
    if not backward:
        # inference as users run it, in eval mode: cuDNN's forward takes its training path (and
        # writes its reserve) from module.training, not from grad mode (ours is the same kernel
        # either way); the training-mode forward under no_grad flattered ours (a benchmark audit)
        base.eval()
    lens = packed_lengths(T, N) if packed else None

    def inputs():
        if packed:
            # the leaf is the packed data itself (one graph per rotated input, nothing before it)
            p = pack_padded_sequence(torch.randn(T, N, I, device=device, dtype=dtype), lens, enforce_sorted=False)
            x = PackedSequence(p.data.requires_grad_(backward), p.batch_sizes, p.sorted_indices, p.unsorted_indices)
            return x, torch.randn(p.data.shape[0], D * H, device=device, dtype=dtype)
        # data_input: a training step on data, the input needing no gradient (as the demo's):
        # the weights' gradients alone (cuDNN's output_mask skips the input's, as ours does)
        x = torch.randn(T, N, I, device=device, dtype=dtype, requires_grad=backward and not data_input)
        g = torch.randn(T, N, D * H, device=device, dtype=dtype)
        return x, g

    def run_module(module, backend=None, persistent=None, one_direction=False, cupy_env=None, resident=None):
        def setup():
            nxt = harness.rotating(inputs)

            def fn():
                x, g = nxt()
                ctx = gpu_nn.backend(backend) if backend else _null()
                with ctx, harness.env_var(PERSISTENT_ENV, persistent), harness.env_var(CUPY_RNN_ENV, cupy_env), \
                        harness.env_var(RESIDENT_ENV, resident), _one_direction_loops() if one_direction else _null():
                    if backward:
                        out, _ = module(x)
                        (out.data if packed else out).backward(g)
                    else:
                        with torch.no_grad():
                            module(x)

            return fn

        return setup

    def cell_loop():
        cell = CELLS[mode](I, H).to(device=device, dtype=dtype)
        cell.load_state_dict({k.replace("_l0", ""): v for k, v in base.state_dict().items()})

        def setup():
            nxt = harness.rotating(inputs)

            def fn():
                x, g = nxt()
                with torch.enable_grad() if backward else torch.no_grad():
                    h = None
                    outs = []
                    for t in range(T):
                        h = cell(x[t], h)
                        outs.append(h[0] if mode == "lstm" else h)
                    if backward:
                        torch.stack(outs).backward(g)

            return fn

        return setup

    provs = {"torch": run_module(base)}
    for p in providers:
        if p == "cell_loop" and packed:
            continue  # a cell loop has no packed form
        if p == "cell_loop":
            provs[p] = cell_loop()
        else:
            ours = OURS[mode](I, H, **kw).to(device=device, dtype=dtype)
            ours.load_state_dict(base.state_dict())
            ours.train(base.training)
            if p == "cupy-one-direction":
                provs[p] = run_module(ours, "cupy", one_direction=True)
                continue
            if p == "cupy-mma":
                provs[p] = run_module(ours, "cupy", cupy_env="mma")
                continue
            backend, persistent, resident = PROVIDERS.get(p, (p, None, None))
            provs[p] = run_module(ours, backend, persistent, resident=resident)
    # a packed batch does the work of its steps that run: sum(lengths) of T * N
    useful = float(lens.sum()) / (T * N) if packed else 1.0
    return harness.Case(family="rnn", name=name, shape=shape, providers=provs, device=device,
                        flops=_flops(mode, T, N, I, H, backward, L, D) * useful)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cases(device: str = "cpu", quick: bool = False) -> list[harness.Case]:
    out = []
    if device == "cpu":
        for mode in ("lstm", "gru"):
            out.append(_case(mode, 50, 32, 128, 256, torch.float32, "cpu", True, ("reference",)))
        return out
    # N=64 at H=512 makes 128 (batch, hidden) tiles, one program each on the H200's 132 SMs: the
    # persistent kernel, forced on ("triton-persistent", W_hh resident), is legal there though not
    # the default (batch <= 16): the main cases time it so that a run can move that bound (in the
    # fwd+bwd cases the switch also takes the persistent backward, four batch tiles of 16)
    # --quick leaves torch's cell loop out (a Python loop over torch's cells: context, not a goal
    # of issue 16, and at T=100 its fwd+bwd is the slowest provider, about 46 ms a call, timed
    # behind sleeps three times that: seconds of a GPU run's time-limited bench step)
    def loop(ps):
        return tuple(p for p in ps if not (quick and p == "cell_loop"))

    provs = loop(_unskipped(("triton", "triton-persistent", "cupy", "cell_loop")))
    lanes = []
    for dtype in (torch.float32, torch.bfloat16):
        out = []  # this dtype's cases: the lanes alternate (harness.interleave)
        lanes.append(out)
        for mode in ("lstm", "gru", "rnn"):
            for backward in (False, True):
                # (cupy-mma on the LSTM only: the GPU run's bench step has a time limit)
                ps = _mma(provs) if mode == "lstm" else provs
                out.append(_case(mode, 100, 64, 512, 512, dtype, device, backward, ps))
            for N in (4, 16):
                # the Elman layer at H=512 only: issue 16's small-batch goals name all three modes
                for H in ((512,) if quick or mode == "rnn" else (256, 512, 1024)):
                    out.append(_case(mode, 50, N, H, H, dtype, device, False, loop(_small_providers())))
        for mode in ("lstm", "gru", "rnn"):
            for N in (4, 16):  # fwd+bwd at small batch: per step, persistent forward and backward, cupy
                ps = _with_default(_layer_providers(l2=True))
                out.append(_case(mode, 50, N, 512, 512, dtype, device, True, _mma(ps) if mode == "lstm" else ps))
        # issue 16's stack; triton-persistent: both directions' loops, forward and backward, one
        # persistent launch per layer each (B = 32: two batch tiles)
        out.append(_case("lstm", 100, 32, 256, 256, dtype, device, True, _mma(_bi(_layer_providers())), L=2,
                         bidirectional=True))
        # small-batch bidirectional forward: both directions in one launch per step (triton) or
        # in one persistent launch (triton-persistent)
        out.append(_case("lstm", 50, 4, 512, 512, dtype, device, False, _bi(_small_providers()), bidirectional=True))
        # the demo's recurrent models (gpu-nn demo: T=8 N=32 I=8 H=32, two bidirectional layers),
        # launch-bound: per step against one persistent launch per layer forward and backward
        if dtype == torch.float32:
            for mode in ("lstm", "gru"):
                out.append(_case(mode, 8, 32, 8, 32, dtype, device, True, _bi(_layer_providers()), L=2,
                                 bidirectional=True))
                # as the demo trains them: on data (no input gradient, which both sides then skip)
                out.append(_case(mode, 8, 32, 8, 32, dtype, device, True, _bi(_layer_providers()), L=2,
                                 bidirectional=True, data_input=True))
        # a packed batch of unequal lengths (T down to T / 10, shuffled): the step kernels skip
        # the batch tiles whose sequences have ended (torch: cuDNN's packed path); --quick: float32.
        # The persistent kernels forced on (128 tiles: one a program, W_hh resident) and from L2:
        # their backward skips the ended tiles too, the resident one its share exchange
        if not quick or dtype == torch.float32:
            ps = _unskipped(("triton", "triton-persistent", "triton-persistent-l2", "cupy"))
            out.append(_case("lstm", 100, 64, 512, 512, dtype, device, True, ps, packed=True))
    return harness.interleave(lanes)


if __name__ == "__main__":
    harness.main_for(cases)
