"""Recurrent layers: LSTM and GRU forward / forward+backward.

CPU set (device "cpu"): T=50 B=32 I=128 H=256, float32, the NumPy reference fallback
(``gpu_nn.nn.LSTM`` / ``GRU`` on the reference backend) against torch CPU.
GPU set (device "cuda", issues 6 and 16), float32 and bfloat16, torch's default precision switches
(float32 recurrent layers in TF32 on both sides, ``torch.backends.cudnn.allow_tf32``):
LSTM, GRU and RNN (tanh) T=100 N=64 I=H=512 forward and forward+backward; small batch N=4 and 16,
T=50, at H=256 / 512 / 1024 (``--quick``: 512) forward, and the LSTM forward+backward at H=512;
a 2-layer bidirectional LSTM N=32 T=100 I=H=256 forward+backward; a bidirectional LSTM N=4 T=50
I=H=512 forward. torch (cuDNN) against our
triton and cupy backends and against a Python loop of ``torch.nn.LSTMCell`` / ``GRUCell`` /
``RNNCell``; provider ``triton`` runs the per-step launches (``GPU_NN_RNN_PERSISTENT=0``), and in
the small-batch set ``triton-persistent`` the one-launch persistent forward
(``GPU_NN_RNN_PERSISTENT=1``).
"""

from __future__ import annotations

import os

import torch

import gpu_nn
from gpu_nn import nn as gnn
from gpu_nn.benchmarks import harness

TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}
PERSISTENT_ENV = "GPU_NN_RNN_PERSISTENT"
# provider -> (backend, GPU_NN_RNN_PERSISTENT): the small-batch set measures the per-step
# launches ("triton", forced off) and the persistent kernel ("triton-persistent", forced on)
PROVIDERS = {"triton": ("triton", "0"), "triton-persistent": ("triton", "1")}
SMALL_PROVIDERS = ("triton", "triton-persistent", "cupy", "cell_loop")
SKIP_PERSISTENT_ENV = "GPU_NN_BENCH_SKIP_PERSISTENT"  # set by gpu_run.sh when the barrier test failed


def _small_providers():
    if os.environ.get(SKIP_PERSISTENT_ENV) == "1":
        return tuple(p for p in SMALL_PROVIDERS if p != "triton-persistent")
    return SMALL_PROVIDERS
OURS = {"lstm": gnn.LSTM, "gru": gnn.GRU, "rnn": gnn.RNN}
CELLS = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn": torch.nn.RNNCell}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _flops(mode, T, N, I, H, backward, L=1, D=1):
    G = GATES[mode]
    f = sum(2 * T * N * G * H * ((I if l == 0 else D * H) + H) for l in range(L)) * D
    return f * 3 if backward else f


def _case(mode, T, N, I, H, dtype, device, backward, providers, L=1, bidirectional=False):
    D = 2 if bidirectional else 1
    name = f"{mode} {'fwd+bwd' if backward else 'fwd'}"
    layers = f" L={L}" if L > 1 else ""
    shape = f"T={T} N={N} I={I} H={H}{layers}{' bi' if bidirectional else ''} {str(dtype).replace('torch.', '')}"
    kw = {"num_layers": L, "bidirectional": bidirectional}
    base = TORCH[mode](I, H, **kw).to(device=device, dtype=dtype)

    def inputs():
        x = torch.randn(T, N, I, device=device, dtype=dtype, requires_grad=backward)
        g = torch.randn(T, N, D * H, device=device, dtype=dtype)
        return x, g

    def run_module(module, backend=None, persistent=None):
        def setup():
            nxt = harness.rotating(inputs)

            def fn():
                x, g = nxt()
                ctx = gpu_nn.backend(backend) if backend else _null()
                with ctx, _env(PERSISTENT_ENV, persistent):
                    if backward:
                        out, _ = module(x)
                        out.backward(g)
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
        if p == "cell_loop":
            provs[p] = cell_loop()
        else:
            ours = OURS[mode](I, H, **kw).to(device=device, dtype=dtype)
            ours.load_state_dict(base.state_dict())
            backend, persistent = PROVIDERS.get(p, (p, None))
            provs[p] = run_module(ours, backend, persistent)
    return harness.Case(family="rnn", name=name, shape=shape, providers=provs, device=device,
                        flops=_flops(mode, T, N, I, H, backward, L, D))


class _env:
    """Sets an environment variable for the duration of a call (None: leave it as it is)."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        if self.value is not None:
            self.old = os.environ.get(self.name)
            os.environ[self.name] = self.value
        return self

    def __exit__(self, *exc):
        if self.value is not None:
            if self.old is None:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = self.old
        return False


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
    provs = ("triton", "cupy", "cell_loop")
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("lstm", "gru", "rnn"):
            for backward in (False, True):
                out.append(_case(mode, 100, 64, 512, 512, dtype, device, backward, provs))
            if mode == "rnn":
                continue
            for N in (4, 16):
                for H in ((512,) if quick else (256, 512, 1024)):
                    out.append(_case(mode, 50, N, H, H, dtype, device, False, _small_providers()))
        for N in (4, 16):  # fwd+bwd at small batch (the persistent kernel is forward only)
            out.append(_case("lstm", 50, N, 512, 512, dtype, device, True, ("triton", "cupy")))
        out.append(_case("lstm", 100, 32, 256, 256, dtype, device, True, ("triton", "cupy"), L=2, bidirectional=True))
        # small-batch bidirectional forward: both directions in one launch per step (triton) or
        # in one persistent launch (triton-persistent)
        out.append(_case("lstm", 50, 4, 512, 512, dtype, device, False, _small_providers(), bidirectional=True))
    return out


if __name__ == "__main__":
    harness.main_for(cases)
