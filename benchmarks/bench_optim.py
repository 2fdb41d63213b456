"""Optimizer step benchmarks.

CPU set: one Adam step over 10 tensors totalling 4M float32 parameters, the NumPy reference
(gpu_nn.optim.Adam on CPU tensors) against ``torch.optim.Adam(foreach=True)``.

GPU set (issue 7): Adam, AdamW and RMSprop over 10.5M and 124M float32 parameters in many
tensors of mixed sizes, and over bf16 parameters with float32 state; GB/s against the bytes a
step must move (Adam fp32: p, g, m, v read + p, m, v written = 28 B/param; RMSprop fp32: 20;
bf16 params: 2+2 B for p/g reads, 2 B p write); providers triton and cupy against torch
``fused=True`` (baseline) and ``foreach=True``. SGD with momentum, Adagrad and Adadelta at the same
sizes against torch ``fused=True`` where torch has it for that device and dtype (probed: one step),
else against ``foreach=True`` (the case's shape says which).
"""

from __future__ import annotations

import torch

from gpu_nn.benchmarks import harness

CPU_SIZES = [1_000_003, 700_001, 600_000, 500_000, 400_000, 300_000, 250_000, 150_000, 100_000, 194_304]


def _mixed_sizes(total: int) -> list[int]:
    """Transformer-like mix: big matrices, medium ones, many small vectors; sums to ``total``."""
    base = [4096 * 1024, 1024 * 1024, 1024 * 4096, 768 * 768, 3072, 1024, 768, 50_257, 4_099, 131]
    sizes, s, i = [], 0, 0
    while s < total:
        n = min(base[i % len(base)], total - s)
        sizes.append(n)
        s += n
        i += 1
    return sizes


def _params(sizes, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ps = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=g).to(device=device, dtype=dtype))
        p.grad = torch.randn(n, generator=g).to(device=device, dtype=dtype)
        ps.append(p)
    return ps


def _setup(cls, sizes, dtype, device, backend=None, **kw):
    def setup():
        import gpu_nn

        ps = _params(sizes, dtype, device)
        opt = cls(ps, **kw)
        if backend is None:
            return opt.step

        def step():
            with gpu_nn.backend(backend):
                opt.step()

        return step

    return setup


def fused_on(cls, device: str, dtype) -> bool:
    """Whether torch's ``cls`` takes ``fused=True`` for ``dtype`` parameters on ``device`` (a
    constructor without the argument, or a device or dtype its fused kernels lack, says no):
    one step on a one-element parameter."""
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
        p.grad = torch.ones_like(p)
        cls([p], fused=True).step()
    except (TypeError, RuntimeError, ValueError, AssertionError):
        return False
    return True


def cases(device: str, quick: bool) -> list[harness.Case]:
    import gpu_nn.optim as go

    # the optimizers beside Adam / AdamW / RMSprop: (name, torch class, ours, float32 state
    # tensors per parameter, keyword arguments)
    others = (("sgd momentum", torch.optim.SGD, go.SGD, 1, {"lr": 1e-3, "momentum": 0.9}),
              ("adagrad", torch.optim.Adagrad, go.Adagrad, 1, {"lr": 1e-2}),
              ("adadelta", torch.optim.Adadelta, go.Adadelta, 2, {}))
    out = []
    if device == "cpu":
        n = sum(CPU_SIZES)
        out.append(harness.Case(
            "optim", "adam step", f"10 tensors, {n / 1e6:.1f}M fp32", device="cpu", bytes=28 * n,
            providers={
                "torch": _setup(torch.optim.Adam, CPU_SIZES, torch.float32, "cpu", foreach=True),
                "reference": _setup(go.Adam, CPU_SIZES, torch.float32, "cpu", backend="reference"),
            }))
        return out
    totals = [10_500_000] if quick else [10_500_000, 124_000_000]
    for total in totals:
        sizes = _mixed_sizes(total)
        # bfloat16 parameters: ours keeps float32 state (gpu_nn.optim's _state_dtype), torch its
        # state in the parameters' dtype (zeros_like), so the sides move different bytes (Adam:
        # 22 B a parameter against 14): each side's GB/s from its own bytes, and the ratio of
        # times is bounded below by the ratio of bytes in a bandwidth-bound step
        # (the shape text is the recorded runs' key: a case named anew would leave their rows in
        # the README's table beside its own; the bytes say what each side moves)
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16 params, fp32 state")):
            pb = 4 if dtype == torch.float32 else 2

            def bytes_of(state, pb=pb):  # p, g read + p written; state read + written, per side
                ours, theirs = total * (3 * pb + 2 * 4 * state), total * (3 * pb + 2 * pb * state)
                return {"torch": theirs, "torch_foreach": theirs, "triton": ours, "cupy": ours}

            for name, tcls, ocls, state in (("adam", torch.optim.Adam, go.Adam, 2), ("adamw", torch.optim.AdamW, go.AdamW, 2),
                                            ("rmsprop", torch.optim.RMSprop, go.RMSprop, 1)):
                bytes_ = bytes_of(state)
                providers = {
                    "torch": _setup(tcls, sizes, dtype, "cuda", **({"fused": True} if name != "rmsprop" else {"foreach": True})),
                    "torch_foreach": _setup(tcls, sizes, dtype, "cuda", foreach=True),
                    "triton": _setup(ocls, sizes, dtype, "cuda", backend="triton"),
                    "cupy": _setup(ocls, sizes, dtype, "cuda", backend="cupy"),
                }
                if name == "rmsprop":
                    providers.pop("torch_foreach")  # torch has no fused RMSprop: foreach is the baseline
                out.append(harness.Case("optim", f"{name} step", f"{len(sizes)} tensors, {total / 1e6:.1f}M {label}",
                                        device="cuda", bytes=bytes_, providers=providers))
            # the other optimizers of ours (issue 14's goal: <= 1.0x torch fused=True where torch
            # has one on this device, else <= 0.8x foreach): SGD with momentum, Adagrad, Adadelta
            for name, tcls, ocls, state, kw in others:
                bytes_ = bytes_of(state)
                fused = fused_on(tcls, device, dtype)
                providers = {
                    "torch": _setup(tcls, sizes, dtype, "cuda", **kw, **({"fused": True} if fused else {"foreach": True})),
                    "triton": _setup(ocls, sizes, dtype, "cuda", backend="triton", **kw),
                    "cupy": _setup(ocls, sizes, dtype, "cuda", backend="cupy", **kw),
                }
                if fused:
                    providers["torch_foreach"] = _setup(tcls, sizes, dtype, "cuda", foreach=True, **kw)
                out.append(harness.Case("optim", f"{name} step", f"{len(sizes)} tensors, {total / 1e6:.1f}M {label}, "
                                        f"vs torch {'fused' if fused else 'foreach'}", device="cuda", bytes=bytes_,
                                        providers=providers))
        # a mixed-precision loop's step: GradScaler.step + update over fused Adam, which hands the
        # optimizer its scale and found_inf (the kernels unscale and skip on the device; torch's
        # fused Adam the same), against ours without fused=True (GradScaler unscales in a pass of
        # its own and reads found_inf on the host before the step). bytes: the fused step's
        # (Adam's 28 B a parameter, the gradient written back unscaled: 4 more)
        out.append(harness.Case(
            "optim", "adam step, GradScaler", f"{len(sizes)} tensors, {total / 1e6:.1f}M fp32", device="cuda",
            bytes=32 * total,
            providers={"torch": _amp_setup(torch.optim.Adam, sizes, fused=True),
                       "triton": _amp_setup(go.Adam, sizes, backend="triton", fused=True),
                       "cupy": _amp_setup(go.Adam, sizes, backend="cupy", fused=True),
                       "triton-unfused": _amp_setup(go.Adam, sizes, backend="triton")}))
        out.append(harness.Case(
            "optim", "copy (bandwidth ceiling)", f"{total / 1e6:.1f}M fp32 x 7 arrays", device="cuda", bytes=28 * total,
            providers={"torch": lambda total=total: _copy_setup(total)}))
    return out


def _amp_setup(cls, sizes, backend=None, **kw):
    """One ``scaler.step(opt); scaler.update()`` of a GradScaler (scale 1, never growing: the
    gradients keep their values call after call) over float32 CUDA parameters."""
    def setup():
        import contextlib

        import gpu_nn

        ps = _params(sizes, torch.float32, "cuda")
        opt = cls(ps, **kw)
        scaler = torch.amp.GradScaler("cuda", init_scale=1.0, growth_interval=2**30)
        scaler.scale(torch.ones((), device="cuda"))  # (makes its scale tensor)
        region = (lambda: gpu_nn.backend(backend)) if backend else contextlib.nullcontext

        def step():
            with region():
                scaler.step(opt)
            scaler.update()

        return step

    return setup


def _copy_setup(total):
    """A device copy moving the same 28 B/param as an fp32 Adam step (3.5 x 4 B read + written)."""
    src = torch.empty(int(3.5 * total), device="cuda")
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


if __name__ == "__main__":
    harness.main_for(cases)
