"""Dense-family benchmarks.

CPU (2-core machine): linear forward+backward at N=256 1024->1024 and cross_entropy
forward+backward at N=512 C=1000, the reference fallback (through ``gpu_nn.functional`` with
the reference backend) against torch CPU, float32.

GPU: linear forward and forward+backward at 8192x4096 -> 4096 in float32 (torch's default, and
with ``torch.backends.cuda.matmul.allow_tf32`` on: "fp32 tf32") and bfloat16 (TFLOP/s
against 2 M N K per product: 1 product forward, 3 forward+backward), softmax forward and
cross_entropy forward+backward on 32768 x 32000 logits in bfloat16 and on a float32 segmentation
map 16x21x256x256 (classes along dim 1) (GB/s against the bytes each call must move at least),
torch against our Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

import gpu_nn
import gpu_nn.functional as F
from gpu_nn._precision import matmul_tf32
from gpu_nn.benchmarks import harness


def _run(fn, backend):
    if backend is None:
        return fn()
    with gpu_nn.backend(backend):
        return fn()


def _linear_setup(make, lin, backend, backward, tf32=None):
    def setup():
        nxt = harness.rotating(make)

        def run():
            x, w, b, g = nxt()
            if backward:
                x, w, b = (t.detach().requires_grad_() for t in (x, w, b))

            def body():
                y = lin(x, w, b)
                if backward:
                    y.backward(g)
            # cuBLAS's TF32 choice for the call (None: as it is), put back after it: both sides
            # of a case read the same switch (ours obeys torch's)
            with matmul_tf32(tf32):
                _run(body, backend)
        return run
    return setup


def _ce_setup(make, ce, backend, backward=True):
    def setup():
        nxt = harness.rotating(make)

        def run():
            x, t = nxt()
            if backward:
                x = x.detach().requires_grad_()

            def body():
                loss = ce(x, t)
                if backward:
                    loss.backward()
            _run(body, backend)
        return run
    return setup


def _softmax_setup(make, sm, backend):
    def setup():
        nxt = harness.rotating(make)

        def run():
            (x,) = nxt()
            _run(lambda: sm(x, -1), backend)
        return run
    return setup


def _linear_inputs(M, K, N, device, dtype):
    def make():
        return (torch.randn(M, K, device=device, dtype=dtype), torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5,
                torch.randn(N, device=device, dtype=dtype), torch.randn(M, N, device=device, dtype=dtype))
    return make


def _ce_inputs(M, C, device, dtype):
    def make():
        return torch.randn(M, C, device=device, dtype=dtype), torch.randint(0, C, (M,), device=device)
    return make


def _ce_inputs_nd(N, C, spatial, device, dtype):
    def make():
        return (torch.randn(N, C, *spatial, device=device, dtype=dtype),
                torch.randint(0, C, (N, *spatial), device=device))
    return make


def cases(device: str, quick: bool) -> list[harness.Case]:
    if device == "cpu":
        M, K, N = 256, 1024, 1024
        lin = _linear_inputs(M, K, N, "cpu", torch.float32)
        ce = _ce_inputs(512, 1000, "cpu", torch.float32)
        return [
            harness.Case("dense", "linear fwd+bwd", f"N={M} {K}->{N} fp32", {
                "torch": _linear_setup(lin, TF.linear, None, True),
                "reference": _linear_setup(lin, F.linear, "reference", True),
            }, device="cpu", flops=3 * 2 * M * K * N),
            harness.Case("dense", "cross_entropy fwd+bwd", "N=512 C=1000 fp32", {
                "torch": _ce_setup(ce, TF.cross_entropy, None),
                "reference": _ce_setup(ce, F.cross_entropy, "reference"),
            }, device="cpu"),
        ]
    out = []
    M, K, N = 8192, 4096, 4096
    # float32 under torch's default (no TF32 for matmuls) and with TF32 allowed (issue 15: at most
    # 1.1x torch under each setting), then bfloat16
    for dtype, tag, tf32 in ((torch.float32, "fp32", None), (torch.float32, "fp32 tf32", True),
                             (torch.bfloat16, "bf16", None)):
        lin = _linear_inputs(M, K, N, device, dtype)
        for backward in (False, True):
            out.append(harness.Case("dense", "linear " + ("fwd+bwd" if backward else "fwd"), f"{M}x{K}->{N} {tag}", {
                "torch": _linear_setup(lin, TF.linear, None, backward, tf32),
                "triton": _linear_setup(lin, F.linear, "triton", backward, tf32),
            }, device=device, flops=(3 if backward else 1) * 2 * M * K * N))
    R, C = (8192, 32000) if quick else (32768, 32000)
    el = 2  # bf16 bytes
    sm = lambda: (torch.randn(R, C, device=device, dtype=torch.bfloat16),)  # noqa: E731
    out.append(harness.Case("dense", "softmax fwd", f"{R}x{C} bf16", {
        "torch": _softmax_setup(sm, TF.softmax, None),
        "triton": _softmax_setup(sm, F.softmax, "triton"),
    }, device=device, bytes=2 * R * C * el))
    ce = _ce_inputs(R, C, device, torch.bfloat16)
    # forward reads the logits once; backward reads them again and writes the gradient
    out.append(harness.Case("dense", "cross_entropy fwd+bwd", f"{R}x{C} bf16", {
        "torch": _ce_setup(ce, TF.cross_entropy, None),
        "triton": _ce_setup(ce, F.cross_entropy, "triton"),
    }, device=device, bytes=3 * R * C * el))
    # a segmentation loss: [N, C, H, W] logits, classes along dim 1 (read where they lie, no
    # transpose to rows and back), float32 as such heads usually run
    N, C, H, W = 16, 21, 256, 256
    seg = _ce_inputs_nd(N, C, (H, W), device, torch.float32)
    out.append(harness.Case("dense", "cross_entropy fwd+bwd", f"{N}x{C}x{H}x{W} dim 1 fp32", {
        "torch": _ce_setup(seg, TF.cross_entropy, None),
        "triton": _ce_setup(seg, F.cross_entropy, "triton"),
    }, device=device, bytes=3 * N * C * H * W * 4 + 2 * N * H * W * 8))
    return out


if __name__ == "__main__":
    harness.main_for(cases)
