"""``gpu-nn check``: every op on every backend that works here against the reference.

Each op family contributes ``CHECK_CASES`` (a list of :class:`CheckCase`) in its
``gpu_nn.ops.<family>`` module (optimizers: ``gpu_nn.optim``). A case makes fresh random
odd-sized inputs in float64; the runner runs the op forward and backward on the backend in the
dtype under test, runs it again on the reference in float64 on the same inputs (rounded to that
dtype, then widened), and reports the largest error relative to the output scale over the
output and every input gradient.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import numpy as np
import torch

from . import _backend

FAMILY_MODULES = (
    "gpu_nn.ops.activation",
    "gpu_nn.ops.conv",
    "gpu_nn.ops.dense",
    "gpu_nn.ops.pool",
    "gpu_nn.ops.rnn",
    "gpu_nn.optim",
)

TOL = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 6e-2,
}


@dataclasses.dataclass
class CheckCase:
    """One op on one shape.

    ``make(rng)`` returns ``(args, kwargs)`` built in float64 on the CPU; float tensors with
    ``requires_grad`` are the differentiable inputs. ``fn`` is the public function. ``run``,
    if given, replaces the generic forward/backward comparison: ``run(backend, device, dtype,
    rng) -> max relative error``. ``backends`` lists the backends that implement the op.
    """

    op: str
    make: Callable | None = None
    fn: Callable | None = None
    run: Callable | None = None
    backends: tuple = ("reference", "triton")
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    tol_scale: float = 1.0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return float("inf")
    a, b = torch.where(nb, 0.0, a), torch.where(nb, 0.0, b)
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1.0)


def _convert(obj, dtype, device):
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_floating_point():
            t = t.to(device=device, dtype=dtype)
        else:
            t = t.to(device=device)
        return t.requires_grad_(obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_convert(o, dtype, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _convert(v, dtype, device) for k, v in obj.items()}
    return obj


def _leaves(obj):
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, (tuple, list)):
        return [leaf for o in obj for leaf in _leaves(o)]
    if isinstance(obj, dict):
        return [leaf for o in obj.values() for leaf in _leaves(o)]
    return []


def _float_outputs(out):
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _float_outputs(o)]
    return []


def _int_outputs(out):
    if isinstance(out, torch.Tensor):
        return [] if out.is_floating_point() else [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _int_outputs(o)]
    return []


def forward_backward(fn, args, kwargs, seed):
    """Outputs and input gradients of ``fn`` for a random output gradient."""
    out = fn(*args, **kwargs)
    outs = _float_outputs(out)
    leaves = _leaves((args, kwargs))
    grads = []
    if leaves:
        gen = torch.Generator().manual_seed(seed)
        gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
        diff = [(o, g) for o, g in zip(outs, gouts) if o.requires_grad]
        if diff:
            grads = torch.autograd.grad([o for o, _ in diff], leaves, [g for _, g in diff], allow_unused=True)
    return outs, _int_outputs(out), list(grads)


def generic_error(case: CheckCase, backend: str, device: str, dtype: torch.dtype, rng: np.random.Generator) -> float:
    args, kwargs = case.make(rng)
    seed = int(rng.integers(2**31))
    with _backend.backend(backend):
        outs, ints, grads = forward_backward(case.fn, _convert(args, dtype, device), _convert(kwargs, dtype, device), seed)
    # The reference sees the inputs as the backend saw them (rounded to dtype, then widened to
    # float64): otherwise input rounding alone can move an argmax (two float16/bfloat16 values
    # of a pooling window rounding to a tie) and send a gradient to another element.
    rargs, rkwargs = (_convert(_convert(a, dtype, "cpu"), torch.float64, "cpu") for a in (args, kwargs))
    with _backend.backend("reference"):
        routs, rints, rgrads = forward_backward(case.fn, rargs, rkwargs, seed)
    errs = [_rel(a, b) for a, b in zip(outs, routs)]
    errs += [_rel(a, b) for a, b in zip(grads, rgrads) if a is not None or b is not None]
    if len(outs) != len(routs) or len(grads) != len(rgrads):
        return float("inf")
    for a, b in zip(ints, rints):
        # indices may legitimately differ where a window holds equal values; the values
        # gathered through them are compared above
        if a.shape != b.shape:
            return float("inf")
    return max(errs, default=0.0)


def collect_cases() -> list[tuple[str, CheckCase]]:
    cases = []
    for mod_name in FAMILY_MODULES:
        mod = importlib.import_module(mod_name)
        for case in getattr(mod, "CHECK_CASES", ()):
            cases.append((mod_name.rsplit(".", 1)[-1], case))
    return cases


def targets() -> list[tuple[str, str, tuple]]:
    """(backend, device, dtypes) combinations that work here."""
    out = [("reference", "cpu", (torch.float64, torch.float32))]
    if _backend.status("triton")[0]:
        if torch.cuda.is_available():
            out.append(("triton", "cuda", (torch.float32, torch.float16, torch.bfloat16)))
        else:
            out.append(("triton", "cpu", (torch.float32, torch.float16)))
    if _backend.status("cupy")[0]:
        out.append(("cupy", "cuda", (torch.float32, torch.float16, torch.bfloat16)))
    return out


def run_checks(ops=None, seed=0, progress=True) -> list[dict]:
    rows = []
    jobs = []
    for fam, case in collect_cases():
        if ops and case.op not in ops:
            continue
        for backend, device, dtypes in targets():
            if backend not in case.backends:
                continue
            for dtype in dtypes:
                if dtype not in case.dtypes and dtype != torch.float64:
                    continue
                jobs.append((fam, case, backend, device, dtype))
    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="gpu-nn check", unit="check", leave=False)
    for i, (fam, case, backend, device, dtype) in enumerate(it):
        rng = np.random.default_rng(seed * 1_000_003 + i)
        tol = TOL[dtype] * case.tol_scale
        try:
            err = case.run(backend, device, dtype, rng) if case.run else generic_error(case, backend, device, dtype, rng)
            ok = bool(err <= tol)
            msg = ""
        except Exception as exc:  # a crash is a failure, reported in the table
            err, ok, msg = float("nan"), False, f"{type(exc).__name__}: {exc}"
        rows.append({
            "family": fam, "op": case.op, "backend": backend, "device": device,
            "dtype": str(dtype).replace("torch.", ""), "max_rel_err": err, "tol": tol,
            "ok": ok, "error": msg,
        })
    return rows


def print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gpu-nn check: ours against the float64 reference")
    for col in ("op", "backend", "device", "dtype", "max rel err", "tol", "result"):
        table.add_column(col, justify="right" if col in ("max rel err", "tol") else "left", no_wrap=True)
    for r in rows:
        table.add_row(
            r["op"], r["backend"], r["device"], r["dtype"], f"{r['max_rel_err']:.2e}", f"{r['tol']:.0e}",
            "[green]pass[/green]" if r["ok"] else f"[red]FAIL[/red] {r['error'][:80]}",
        )
    Console().print(table)
