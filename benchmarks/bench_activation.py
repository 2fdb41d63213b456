"""relu / sigmoid / tanh, forward and forward+backward.

Providers: ``torch`` (the baseline), ``reference`` (CPU) and ``triton`` (GPU). Activations are
memory-bound, so the GPU figure is GB/s: forward reads x and writes y (2 tensors); backward
reads grad_output and y and writes grad_input (3 more).
"""

from __future__ import annotations

import torch

import gpu_nn
import gpu_nn.functional as F
from gpu_nn.benchmarks import harness

OPS = {"relu": (F.relu, torch.relu), "sigmoid": (F.sigmoid, torch.sigmoid), "tanh": (F.tanh, torch.tanh)}

# CPU: sized so that the reference and torch take about a millisecond on a 2-core machine.
CPU_SHAPES = [(32, 64, 31, 31)]
CPU_SHAPES_FULL = [(32, 64, 31, 31), (8, 256, 57, 57)]
# GPU: the activation tensors of ResNet-50's first stage and of a wide MLP.
GPU_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (8192, 4096)]
GPU_DTYPES = (torch.float32, torch.bfloat16)


def _shape_str(shape, dtype) -> str:
    return "x".join(map(str, shape)) + f" {str(dtype).replace('torch.', '')}"


def _provider(fn, backend: str | None, shape, dtype, device: str, backward: bool):
    """setup() for one provider: rotating inputs, returns the timed closure."""

    def setup():
        def make():
            x = torch.randn(shape, dtype=dtype, device=device)
            return x.requires_grad_(backward), torch.randn(shape, dtype=dtype, device=device)

        nxt = harness.rotating(make)

        def call():
            x, g = nxt()
            y = fn(x)
            if backward:
                # autograd.grad, not backward(): no .grad accumulation between calls
                torch.autograd.grad(y, x, g)

        if backend is None:
            return call

        def call_on_backend():
            with gpu_nn.backend(backend):
                call()

        with gpu_nn.backend(backend):  # fails here, at setup, when the backend cannot run
            call()
        return call_on_backend

    return setup


def cases(device: str, quick: bool) -> list[harness.Case]:
    gpu = device.startswith("cuda")
    shapes = GPU_SHAPES if gpu else (CPU_SHAPES if quick else CPU_SHAPES_FULL)
    dtypes = GPU_DTYPES if gpu else (torch.float32,)
    ours = ("triton", "cupy") if gpu else ("reference",)
    out = []
    for name, (fn_ours, fn_torch) in OPS.items():
        for shape in shapes:
            for dtype in dtypes:
                n = 1
                for s in shape:
                    n *= s
                esize = torch.empty((), dtype=dtype).element_size()
                for backward in (False, True):
                    providers = {"torch": _provider(fn_torch, None, shape, dtype, device, backward)}
                    for b in ours:
                        if b == "cupy":  # the activations have no CUDA C kernel
                            continue
                        providers[b] = _provider(fn_ours, b, shape, dtype, device, backward)
                    out.append(harness.Case(
                        family="activation", name=f"{name} {'fwd+bwd' if backward else 'fwd'}",
                        shape=_shape_str(shape, dtype), providers=providers, device=device,
                        bytes=(5 if backward else 2) * n * esize,
                    ))
    return out


if __name__ == "__main__":
    harness.main_for(cases)
