"""``CHECK_CASES`` of the optimizer family for ``gpu-nn check``: a few steps of each optimizer
(and one clipping call) on the backend and dtype under test against the float64 reference."""

from __future__ import annotations

import numpy as np
import torch

from .. import _backend
from ..check import CheckCase

SHAPES = [(37, 29), (29,), (5, 3), (4099,), (1,)]


def _make(rng):
    params = [rng.standard_normal(s) for s in SHAPES]
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(3)]
    return params, grads


def _run_steps(cls, kw, params, grads, backend, device, dtype):
    ps = [torch.nn.Parameter(torch.from_numpy(p).to(device=device, dtype=dtype).clone()) for p in params]
    opt = cls(ps, **kw)
    with _backend.backend(backend):
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = torch.from_numpy(g).to(device=device, dtype=dtype).clone()
            opt.step()
    return ps


def _rel(a, b):
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1.0)


def _optimizer_case(name, kw, backends):
    def run(backend, device, dtype, rng):
        from . import optimizers

        cls = getattr(optimizers, name)
        params, grads = _make(rng)
        ours = _run_steps(cls, kw, params, grads, backend, device, dtype)
        # the reference starts from the same rounded values the backend saw
        start = [torch.from_numpy(p).to(dtype).double().numpy() for p in params]
        rgrads = [[torch.from_numpy(g).to(dtype).double().numpy() for g in gs] for gs in grads]
        theirs = _run_steps(cls, kw, start, rgrads, "reference", "cpu", torch.float64)
        return max(_rel(a, b) for a, b in zip(ours, theirs))

    return CheckCase(op=f"optim.{name}", run=run, backends=backends, dtypes=(torch.float32, torch.float16, torch.bfloat16))


def _clip_run(backend, device, dtype, rng):
    from ..nn.utils import clip_grad_norm_

    errs = []
    for norm_type in (2.0, float("inf")):
        gs = [rng.standard_normal(s) for s in SHAPES]
        out = []
        for be, dev, dt in ((backend, device, dtype), ("reference", "cpu", torch.float64)):
            ps = [torch.nn.Parameter(torch.zeros(s, device=dev, dtype=dt)) for s in SHAPES]
            for p, g in zip(ps, gs):
                p.grad = torch.from_numpy(g).to(device=dev, dtype=dtype).to(dt).clone()
            with _backend.backend(be):
                total = clip_grad_norm_(ps, 1.0, norm_type)
            out.append((total, [p.grad for p in ps]))
        (t1, g1), (t2, g2) = out
        errs.append(abs(float(t1) - float(t2)) / max(abs(float(t2)), 1.0))
        errs += [_rel(a, b) for a, b in zip(g1, g2)]
    return max(errs)


CHECK_CASES = [
    _optimizer_case("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), ("reference", "triton")),
    _optimizer_case("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1), ("reference", "triton")),
    _optimizer_case("Adadelta", dict(weight_decay=0.1), ("reference", "triton")),
    _optimizer_case("RMSprop", dict(lr=0.01, momentum=0.9, centered=True), ("reference", "triton", "cupy")),
    _optimizer_case("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1), ("reference", "triton", "cupy")),
    _optimizer_case("AdamW", dict(lr=0.01), ("reference", "triton", "cupy")),
    CheckCase(op="clip_grad_norm_", run=_clip_run, backends=("reference", "triton"),
              dtypes=(torch.float32, torch.float16, torch.bfloat16)),
]

__all__ = ["CHECK_CASES"]
_ = np  # rng arrays are NumPy
