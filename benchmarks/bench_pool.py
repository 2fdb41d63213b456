"""Pooling benchmarks.

CPU (2-core machine): max_pool2d 3x3/2 forward+backward at N=16 C=32 32x32, the reference
fallback (through ``gpu_nn.functional`` with the reference backend) against torch CPU.

GPU (issue 5): max_pool2d 3x3/2 (padding 1, ResNet's stem pool) on 32x64x112x112, torch
(cuDNN/ATen) against our Triton and CUDA C kernels, forward for inference (no indices wanted:
ours writes the values alone, torch's CUDA kernel its indices as well), forward (values + int64
indices, as a training forward writes them) and forward+backward, the latter also in channels_last (float32);
avg_pool2d 3x3/2 (padding 1, counted) forward and forward+backward on the same tensors;
GB/s against the bytes each call must move,
plus a torch copy of the same tensor as the measured copy bandwidth ("% of copy" = pool GB/s /
copy GB/s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

import gpu_nn
import gpu_nn.functional as F
from gpu_nn.benchmarks import harness


def _fwd_bwd(pool, backend, make, padding=1):
    def setup():
        nxt = harness.rotating(make)

        def run():
            x, g = nxt()
            x = x.detach().requires_grad_()
            if backend is None:
                y = pool(x, 3, 2, padding)
                y.backward(g)
            else:
                with gpu_nn.backend(backend):
                    y = pool(x, 3, 2, padding)
                    y.backward(g)
        return run
    return setup


def _fwd(pool, backend, make, indices=True):
    """``indices`` False: an inference call (no return_indices, an input needing no gradient):
    ours writes the values alone, torch's CUDA kernel its indices too."""
    kw = {"return_indices": True} if indices else {}

    def setup():
        nxt = harness.rotating(make)

        def run():
            x, _ = nxt()
            if backend is None:
                pool(x, 3, 2, 1, **kw)
            else:
                with gpu_nn.backend(backend):
                    pool(x, 3, 2, 1, **kw)
        return run
    return setup


def _copy(make):
    def setup():
        nxt = harness.rotating(make)
        out = torch.empty_like(nxt()[0])

        def run():
            out.copy_(nxt()[0])
        return run
    return setup


def _inputs(shape, device, dtype, padding=1, channels_last=False):
    N, C, H, W = shape
    oh, ow = (H + 2 * padding - 3) // 2 + 1, (W + 2 * padding - 3) // 2 + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make():
        return (torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt),
                torch.randn((N, C, oh, ow), device=device, dtype=dtype).contiguous(memory_format=fmt))
    return make, N * C * oh * ow


def cases(device: str, quick: bool) -> list[harness.Case]:
    if device == "cpu":
        shape = (16, 32, 32, 32)
        rows = []
        for padding in (0, 1):
            make, _ = _inputs(shape, "cpu", torch.float32, padding)
            rows.append(harness.Case(
                "pool", f"max_pool2d 3x3/2 p{padding} fwd+bwd", "N=16 C=32 32x32 fp32",
                {"torch": _fwd_bwd(TF.max_pool2d, None, make, padding),
                 "reference": _fwd_bwd(F.max_pool2d, "reference", make, padding)},
                device="cpu"))
        return rows
    out = []
    shape = (32, 64, 112, 112)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        make, n_out = _inputs(shape, device, dtype)
        es = torch.finfo(dtype).bits // 8
        n_in = 32 * 64 * 112 * 112
        tag = f"32x64x112x112 {str(dtype).replace('torch.', '')}"
        out.append(harness.Case("pool", "copy (bandwidth)", tag, {"torch": _copy(make)}, device=device,
                                bytes=2 * n_in * es))
        out.append(harness.Case(
            "pool", "max_pool2d 3x3/2 p1 fwd (+indices)", tag,
            {"torch": _fwd(TF.max_pool2d, None, make), "triton": _fwd(F.max_pool2d, "triton", make),
             "cupy": _fwd(F.max_pool2d, "cupy", make)},
            device=device, bytes=n_in * es + n_out * (es + 8)))
        out.append(harness.Case(
            "pool", "max_pool2d 3x3/2 p1 fwd (inference)", tag,
            {"torch": _fwd(TF.max_pool2d, None, make, False), "triton": _fwd(F.max_pool2d, "triton", make, False),
             "cupy": _fwd(F.max_pool2d, "cupy", make, False)},
            device=device, bytes=n_in * es + n_out * es))  # what ours moves; torch's also writes indices
        # backward reads g and the indices, writes d input
        out.append(harness.Case(
            "pool", "max_pool2d 3x3/2 p1 fwd+bwd", tag,
            {"torch": _fwd_bwd(TF.max_pool2d, None, make), "triton": _fwd_bwd(F.max_pool2d, "triton", make),
             "cupy": _fwd_bwd(F.max_pool2d, "cupy", make)},
            device=device, bytes=n_in * es + n_out * (es + 8) + n_out * (es + 8) + n_in * es))
        # average pooling (issue 14's goal names max and avg): the same window, padding counted
        # (torch's default); no indices, so the backward reads g alone
        out.append(harness.Case(
            "pool", "avg_pool2d 3x3/2 p1 fwd", tag,
            {"torch": _fwd(TF.avg_pool2d, None, make, False), "triton": _fwd(F.avg_pool2d, "triton", make, False),
             "cupy": _fwd(F.avg_pool2d, "cupy", make, False)},
            device=device, bytes=n_in * es + n_out * es))
        out.append(harness.Case(
            "pool", "avg_pool2d 3x3/2 p1 fwd+bwd", tag,
            {"torch": _fwd_bwd(TF.avg_pool2d, None, make), "triton": _fwd_bwd(F.avg_pool2d, "triton", make),
             "cupy": _fwd_bwd(F.avg_pool2d, "cupy", make)},
            device=device, bytes=2 * (n_in * es + n_out * es)))
        if dtype == torch.float32:
            # channels_last in and out, as a channels_last network pools (torch keeps the layout;
            # ours writes it directly, the CUDA C kernels since pool.cu's POOL_CL)
            make_cl, _ = _inputs(shape, device, dtype, channels_last=True)
            out.append(harness.Case(
                "pool", "max_pool2d 3x3/2 p1 fwd+bwd channels_last", tag,
                {"torch": _fwd_bwd(TF.max_pool2d, None, make_cl), "triton": _fwd_bwd(F.max_pool2d, "triton", make_cl),
                 "cupy": _fwd_bwd(F.max_pool2d, "cupy", make_cl)},
                device=device, bytes=n_in * es + n_out * (es + 8) + n_out * (es + 8) + n_in * es))
    return out


if __name__ == "__main__":
    harness.main_for(cases)
