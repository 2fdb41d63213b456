"""Convolution benchmarks: the reference fallback against torch on the CPU (issue 2) and the
Triton kernels against torch / cuDNN on a GPU (issue 5), forward and forward+backward.

CPU set: conv2d 3x3 forward+backward at N=8 C=64 32x32 O=64 and N=32 C=3 32x32 O=32,
``reference`` (gpu_nn's NumPy fallback through the public function, custom-op overhead
included) against ``torch``. GPU set: ResNet-50's 3x3 stages at N=32, the 7x7/2 stem, a 1x1
64->256 at 56x56, text conv1d N=64 C=300 L=128 O=100 k=3/4/5 and depthwise conv1d N=256
C=128 L=202 k=3, in float32 and bfloat16, ``triton`` against ``torch`` (cuDNN); TFLOP/s from
the forward's 2*N*O*prod(out)*C/groups*prod(k) (x3 for forward+backward). Each conv2d GPU case
also runs in channels_last (input and weight; torch in channels_last too), and the 3x3 28x28 stage
runs as conv + bias + ReLU (ours fused into one launch, torch's conv then relu), in both layouts.
The seed-sized CNN block of issue 15's goals (N=128, 1 -> 32 -> 64 channels, 28x28, 3x3 'same',
bias + ReLU, forward and backward) is a GPU case of its own, in --quick too; --quick times the other
cases forward only, but for the 56x56 3x3 stage forward+backward in both layouts.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as TF

import gpu_nn
import gpu_nn.functional as F
from gpu_nn.benchmarks import harness


def _flops(n, c, spatial, o, k, stride, padding, groups):
    out = [(s + 2 * padding - kk) // stride + 1 for s, kk in zip(spatial, k)]
    return 2.0 * n * o * math.prod(out) * (c // groups) * math.prod(k)


def _case(name, shape, device, dtype, n, c, spatial, o, k, stride=1, padding=0, groups=1, backward=True,
          providers=("torch", "reference"), channels_last=False, relu=False):
    """``channels_last``: input and weight in torch.channels_last for every provider (torch in
    channels_last too, as a convnet after ``model.to(memory_format=torch.channels_last)``).
    ``relu``: ours fuses bias + ReLU into the convolution (``activation="relu"``), torch runs
    its convolution (bias included) then ``relu``."""
    nd = len(spatial)
    base_fn = F.conv2d if nd == 2 else F.conv1d
    tconv = TF.conv2d if nd == 2 else TF.conv1d
    if relu:
        def ours_fn(*args):
            return base_fn(*args, activation="relu")

        def theirs_fn(*args):
            return torch.relu(tconv(*args))
    else:
        ours_fn, theirs_fn = base_fn, tconv
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(n, c, *spatial, generator=gen).to(device=device, dtype=dtype, memory_format=fmt).requires_grad_(backward)
        w = (torch.randn(o, c // groups, *k, generator=gen) / math.sqrt(c // groups * math.prod(k))).to(
            device=device, dtype=dtype, memory_format=fmt).requires_grad_(backward)
        b = torch.randn(o, generator=gen).to(device=device, dtype=dtype).requires_grad_(backward)
        return x, w, b

    def setup_for(fn, backend):
        def setup():
            nxt = harness.rotating(make)
            g = None

            def run():
                nonlocal g
                x, w, b = nxt()
                if backend is None:
                    y = fn(x, w, b, stride, padding, 1, groups)
                else:
                    with gpu_nn.backend(backend):
                        y = fn(x, w, b, stride, padding, 1, groups)
                if backward:
                    if g is None:
                        g = torch.randn_like(y)
                    if backend is None:
                        torch.autograd.grad(y, (x, w, b), g)
                    else:
                        with gpu_nn.backend(backend):
                            torch.autograd.grad(y, (x, w, b), g)
                return y

            return run

        return setup

    provs = {"torch": setup_for(theirs_fn, None)}
    for p in providers:
        if p != "torch":
            provs[p] = setup_for(ours_fn, p)
    flops = _flops(n, c, spatial, o, k, stride, padding, groups) * (3 if backward else 1)
    dt = str(dtype).replace("torch.", "")
    name = name + (" +bias+relu" if relu else "") + (" channels_last" if channels_last else "")
    return harness.Case(family="conv", name=f"{name} {'fwd+bwd' if backward else 'fwd'} {dt}", shape=shape,
                        providers=provs, device=device, flops=flops)


# (name, shape label, problem) of the GPU cases; benchmarks/sweep.py times every forward
# configuration candidate at these too.
GPU_SHAPES = [
    ("conv2d 3x3", "N=32 C=64 56x56 O=64", dict(n=32, c=64, spatial=(56, 56), o=64, k=(3, 3), padding=1)),
    ("conv2d 3x3", "N=32 C=128 28x28 O=128", dict(n=32, c=128, spatial=(28, 28), o=128, k=(3, 3), padding=1)),
    ("conv2d 3x3", "N=32 C=256 14x14 O=256", dict(n=32, c=256, spatial=(14, 14), o=256, k=(3, 3), padding=1)),
    ("conv2d 3x3", "N=32 C=512 7x7 O=512", dict(n=32, c=512, spatial=(7, 7), o=512, k=(3, 3), padding=1)),
    ("conv2d 7x7/2 stem", "N=32 C=3 224x224 O=64", dict(n=32, c=3, spatial=(224, 224), o=64, k=(7, 7), stride=2, padding=3)),
    # a ResNet stage's downsampling 3x3 (stride 2): the strided TMA kernels and the input
    # gradient by residue class
    ("conv2d 3x3/2", "N=32 C=128 56x56 O=128", dict(n=32, c=128, spatial=(56, 56), o=128, k=(3, 3), stride=2, padding=1)),
    ("conv2d 1x1", "N=32 C=64 56x56 O=256", dict(n=32, c=64, spatial=(56, 56), o=256, k=(1, 1))),
    ("conv1d text k3", "N=64 C=300 L=128 O=100", dict(n=64, c=300, spatial=(128,), o=100, k=(3,))),
    ("conv1d text k4", "N=64 C=300 L=128 O=100", dict(n=64, c=300, spatial=(128,), o=100, k=(4,))),
    ("conv1d text k5", "N=64 C=300 L=128 O=100", dict(n=64, c=300, spatial=(128,), o=100, k=(5,))),
    ("conv1d depthwise k3", "N=256 C=128 L=202", dict(n=256, c=128, spatial=(202,), o=128, k=(3,), padding=1, groups=128)),
]


# issue 15's small-model goal: the seed-sized CNN block, two 3x3 'same' convolutions with bias and
# ReLU, 1 -> 32 -> 64 channels at 28x28, batch 128, trained (forward and backward)
BLOCK_SHAPE = "N=128 C=1->32->64 28x28 3x3 same +bias+relu"
BLOCK = dict(n=128, c=(1, 32, 64), spatial=(28, 28), k=(3, 3))


def block_case(device, dtype, providers=("torch", "triton"), n=None) -> harness.Case:
    """The seed-sized CNN block fwd+bwd: x (a model's input, no gradient) through conv(1->32) +
    bias + ReLU and conv(32->64) + bias + ReLU, then the gradients of both weights and biases
    for a given output gradient. Ours fuses bias + ReLU into each convolution (one launch per
    layer forward); torch runs each convolution (bias included) then ``relu``, as a user's
    ``nn.Sequential(Conv2d, ReLU, Conv2d, ReLU)`` does. ``n`` overrides the batch (tests)."""
    n = BLOCK["n"] if n is None else n
    c0, c1, c2 = BLOCK["c"]
    hw, k = BLOCK["spatial"], BLOCK["k"]

    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(n, c0, *hw, generator=gen).to(device=device, dtype=dtype)
        params = []
        for ci, co in ((c0, c1), (c1, c2)):
            w = torch.randn(co, ci, *k, generator=gen) / math.sqrt(ci * math.prod(k))
            b = torch.randn(co, generator=gen) * 0.1
            params += [t.to(device=device, dtype=dtype).requires_grad_() for t in (w, b)]
        return x, params

    def setup_for(backend):
        def setup():
            nxt = harness.rotating(make)
            g = None

            def forward(x, w1, b1, w2, b2):
                if backend is None:
                    h = torch.relu(TF.conv2d(x, w1, b1, padding="same"))
                    return torch.relu(TF.conv2d(h, w2, b2, padding="same"))
                h = F.conv2d(x, w1, b1, padding="same", activation="relu")
                return F.conv2d(h, w2, b2, padding="same", activation="relu")

            def run():
                nonlocal g
                x, params = nxt()
                with contextlib.nullcontext() if backend is None else gpu_nn.backend(backend):
                    y = forward(x, *params)
                    g = torch.randn_like(y) if g is None else g
                    torch.autograd.grad(y, params, g)
                return y

            return run

        return setup

    provs = {"torch": setup_for(None)}
    for p in providers:
        if p != "torch":
            provs[p] = setup_for(p)
    # forward 2*N*O*HW*C*9 per layer; backward: both weight gradients, and the input gradient of
    # the second layer only (x needs none): 3x the second layer's, 2x the first's
    f1 = 2.0 * n * c1 * math.prod(hw) * c0 * math.prod(k)
    f2 = 2.0 * n * c2 * math.prod(hw) * c1 * math.prod(k)
    dt = str(dtype).replace("torch.", "")
    return harness.Case(family="conv", name=f"conv2d cnn block fwd+bwd {dt}", shape=BLOCK_SHAPE if n == BLOCK["n"]
                        else BLOCK_SHAPE.replace("N=128", f"N={n}"), providers=provs, device=device,
                        flops=2 * f1 + 3 * f2)


def cases(device: str = "cpu", quick: bool = False) -> list[harness.Case]:
    if device == "cpu":
        return [
            _case("conv2d 3x3", "N=8 C=64 32x32 O=64 k3 p1", "cpu", torch.float32, 8, 64, (32, 32), 64, (3, 3), padding=1),
            _case("conv2d 3x3", "N=32 C=3 32x32 O=32 k3 p1", "cpu", torch.float32, 32, 3, (32, 32), 32, (3, 3), padding=1),
        ]
    shapes = GPU_SHAPES
    lanes = []
    gpu = ("torch", "triton")
    for dtype in (torch.float32, torch.bfloat16):
        out = []  # this dtype's cases: the lanes alternate (harness.interleave)
        lanes.append(out)
        for backward in ((False,) if quick else (False, True)):
            for name, shape, kw in shapes:
                out.append(_case(name, shape, device, dtype, backward=backward, providers=gpu, **kw))
            # channels_last (conv2d: the layout convnets run in for speed), against torch in channels_last
            for name, shape, kw in shapes:
                if len(kw["spatial"]) == 2:
                    out.append(_case(name, shape, device, dtype, backward=backward, providers=gpu, channels_last=True, **kw))
        # conv + bias + ReLU as one launch of ours against torch's conv (bias included) then relu
        name, shape, kw = shapes[1]
        for cl in (False, True):
            out.append(_case(name, shape, device, dtype, backward=False, providers=gpu, channels_last=cl, relu=True, **kw))
        if quick:
            # --quick's forward+backward of the ResNet stages (issue 15's fwd+bwd goal is at every
            # stage; the full set runs every shape both ways): the four 3x3 stages, both layouts.
            # Until 2026-12-08 only the 56x56 stage, so no GPU run had the other three's fwd+bwd
            for name, shape, kw in shapes[:4]:
                for cl in (False, True):
                    out.append(_case(name, shape, device, dtype, backward=True, providers=gpu, channels_last=cl, **kw))
        # a goal case of its own (issue 15), in --quick too
        out.append(block_case(device, dtype, providers=gpu))
    return harness.interleave(lanes)


def _script_cases(device: str = "cpu", quick: bool = False) -> list[harness.Case]:
    """Run as a script on the CPU, this file also times max_pool2d 3x3/2 fwd+bwd at N=16 C=32
    32x32 next to the convolutions (issue 2's CPU set); ``bench_pool`` owns that case, so
    ``gpu-nn bench`` times it once, under pool."""
    out = cases(device, quick)
    if device == "cpu":
        from . import bench_pool

        out += bench_pool.cases(device, quick)
    return out


if __name__ == "__main__":
    harness.main_for(_script_cases)
