"""Where a call's host time goes on a GPU machine, piece by piece (issue 14, item 1).

``gpu-nn bench --family overhead`` gives whole calls (ours, torch, two bare wrappers). This splits
ours on CUDA tensors small enough that the GPU is never the bottleneck (4 elements, a few
microseconds of kernel), so every figure is host time: the allocator, the current device and
stream, the launch plan's look-up, Triton's launcher alone, Triton's JIT path, the forward and the
backward of one op apart, and the same for torch's op and for a bare ``torch.autograd.Function``
around it. Medians of SAMPLES samples of N calls each, ``time.perf_counter``, the device
synchronised after each sample (queued work counted in no sample but its own). Then one cProfile
of fwd+bwd calls (own time, top rows), the optimizer step with stable and with fresh gradients,
and cross-entropy. Writes JSON (``--json``) and a text table; CPU machines get the parts that
need no CUDA skipped with their reason.

    python -m gpu_nn.benchmarks.host_split --json /tmp/host_split.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import threading
import time

import torch

SAMPLES = 9
N = 300


def per_call_us(fn, n: int | None = None, samples: int | None = None, sync=None) -> float:
    """Median over ``samples`` (default SAMPLES) of the mean host time of ``fn()`` over ``n``
    (default N) calls, microseconds."""
    n = N if n is None else n
    samples = SAMPLES if samples is None else samples
    for _ in range(min(n, 50)):
        fn()
    if sync:
        sync()
    out = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if sync:
            sync()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return round(statistics.median(out), 2)


class _Floor(torch.autograd.Function):
    """A bare autograd.Function around torch's relu: the mechanism's own cost."""

    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(g, y, 0)


def capture_launch(fn):
    """``(kernel, grid, args, kwargs)`` of the first launch ``fn()`` makes through the activation
    launcher, or None where none goes through it (CPU)."""
    from gpu_nn.kernels.triton import activation as ka

    seen = []
    orig = ka.launch_kernel

    def spy(kernel, grid, *args, **kwargs):
        seen.append((kernel, grid, args, kwargs))
        return orig(kernel, grid, *args, **kwargs)

    ka.launch_kernel = spy
    try:
        fn()
    finally:
        ka.launch_kernel = orig
    return seen[0] if seen else None


def split(device: str) -> dict:
    import gpu_nn
    import gpu_nn.functional as F
    from gpu_nn.kernels.triton import _launch

    res = {}
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    x = torch.randn(4, device=device)
    xg = x.clone().requires_grad_(True)
    g = torch.ones(4, device=device)

    def add(name, fn, **kw):
        try:
            res[name] = per_call_us(fn, sync=sync, **kw)
        except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
            res[name] = f"{type(exc).__name__}: {exc}"[:160]

    add("torch.empty((4,), device)", lambda: torch.empty((4,), device=x.device, dtype=torch.float32))
    add("torch.empty_like(x)", lambda: torch.empty_like(x))
    if cuda:
        add("torch._C._cuda_getDevice()", torch._C._cuda_getDevice)
        add("torch.cuda.current_stream()", torch.cuda.current_stream)
        from triton.runtime import driver

        add("triton driver get_current_stream(0)", lambda: driver.active.get_current_stream(0))
    with gpu_nn.backend("triton" if cuda else "auto"):
        got = capture_launch(lambda: F.relu(x)) if cuda else None
        if got is not None:
            kernel, grid, args, kwargs = got
            add("relu kernel: _launch.launch (plan)", lambda: _launch.launch(kernel, grid, *args, **kwargs))
            add("relu kernel: _launch._lookup only", lambda: _launch._lookup(kernel, grid, args, kwargs))
            found = _launch._lookup(kernel, grid, args, kwargs)
            if found and found[3]:
                run, function, metadata, tail, _ = found[3]
                stream = _launch._get_stream(found[1])
                add("relu kernel: compiled run() alone",
                    lambda: run(grid[0], 1, 1, stream, function, metadata, None, None, None, *args, *tail))
                raw = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
                add("relu kernel: run() with int pointers",
                    lambda: run(grid[0], 1, 1, stream, function, metadata, None, None, None, *raw, *tail))
            add("relu kernel: kernel[grid] (Triton JIT)", lambda: kernel[grid](*args, **kwargs))
        with torch.no_grad():
            add("ours F.relu fwd (no grad)", lambda: F.relu(x))
        add("ours F.relu fwd, grad wanted", lambda: F.relu(xg))

        def ours_fb():
            torch.autograd.grad(F.relu(xg), xg, g)
        add("ours F.relu fwd+bwd", ours_fb)
        y_keep = F.relu(xg)
        add("ours F.relu bwd only", lambda: torch.autograd.grad(y_keep, xg, g, retain_graph=True))
        from gpu_nn.ops import activation as oa

        y0 = torch.relu(x)
        add("ours activation_backward() direct", lambda: oa.activation_backward(g, y0, "relu"))
        add("ours activation_forward() direct", lambda: oa.activation_forward(x, "relu"))
    with torch.no_grad():
        add("torch relu fwd (no grad)", lambda: torch.relu(x))
    add("torch relu fwd+bwd", lambda: torch.autograd.grad(torch.relu(xg), xg, g))
    y_t = torch.relu(xg)
    add("torch relu bwd only", lambda: torch.autograd.grad(y_t, xg, g, retain_graph=True))
    add("floor autograd.Function fwd+bwd", lambda: torch.autograd.grad(_Floor.apply(xg), xg, g))
    y_f = _Floor.apply(xg)
    add("floor autograd.Function bwd only", lambda: torch.autograd.grad(y_f, xg, g, retain_graph=True))

    seen = {}

    class _Where(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen["thread"] = threading.get_ident()
            return g

    torch.autograd.grad(_Where.apply(xg), xg, g)
    res["backward runs on the calling thread"] = seen.get("thread") == threading.get_ident()
    return res


def optim_split(device: str) -> dict:
    import gpu_nn
    import gpu_nn.optim as goptim

    res = {}
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    shapes = [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (128,), (10, 128), (10,)]
    for who in ("ours", "torch-fused", "torch-foreach"):
        for fresh in (False, True):
            torch.manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
            for p in ps:
                p.grad = torch.randn_like(p)
            if who == "ours":
                opt = goptim.Adam(ps, lr=1e-3)
            else:
                kw = {"fused": True} if who == "torch-fused" and cuda else {"foreach": True}
                opt = torch.optim.Adam(ps, lr=1e-3, **kw)

            def step():
                if fresh:  # new gradient tensors (zero_grad(set_to_none) + backward): other addresses
                    for p in ps:
                        p.grad = torch.ones_like(p)
                opt.step()
            name = f"Adam 6 tensors {who} {'fresh grads' if fresh else 'stable grads'}"
            try:
                with gpu_nn.backend("triton" if cuda else "auto"):
                    res[name] = per_call_us(step, n=100, sync=sync)
            except Exception as exc:  # noqa: BLE001
                res[name] = f"{type(exc).__name__}: {exc}"[:160]
    return res


def ce_split(device: str) -> dict:
    import gpu_nn
    import gpu_nn.functional as F

    res = {}
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    z = torch.randn(32, 10, device=device, requires_grad=True)
    t = torch.randint(0, 10, (32,), device=device)
    with gpu_nn.backend("triton" if cuda else "auto"):
        res["ours cross_entropy 32x10 fwd+bwd"] = per_call_us(
            lambda: torch.autograd.grad(F.cross_entropy(z, t), z), n=100, sync=sync)
    res["torch cross_entropy 32x10 fwd+bwd"] = per_call_us(
        lambda: torch.autograd.grad(torch.nn.functional.cross_entropy(z, t), z), n=100, sync=sync)
    return res


def profile_text(device: str, n: int = 500, top: int = 30) -> str:
    import gpu_nn
    import gpu_nn.functional as F

    xg = torch.randn(4, device=device, requires_grad=True)
    g = torch.ones(4, device=device)

    def body(k):
        for _ in range(k):
            torch.autograd.grad(F.relu(xg), xg, g)

    with gpu_nn.backend("triton" if device == "cuda" else "auto"):
        body(20)
        prof = cProfile.Profile()
        prof.enable()
        body(n)
        prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--device", default=None, help="cuda where available, else cpu")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": device, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    for name, fn in (("relu", split), ("optim", optim_split), ("cross_entropy", ce_split)):
        t0 = time.perf_counter()
        try:
            out[name] = fn(device)
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        for k, v in out[name].items():
            print(f"{name:<14}{k:<48}{v}")
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    out["profile_relu_fwd_bwd"] = profile_text(device)
    print(out["profile_relu_fwd_bwd"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
