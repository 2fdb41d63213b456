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
import os
import time
from typing import Callable

import numpy as np
import torch

from . import _backend, _precision

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
        else:  # the interpreter; bfloat16 where gpu-nn's exact bfloat16 is installed in it
            from .kernels.triton import _compat

            half = (torch.float16, torch.bfloat16) if _compat.bf16_exact() else (torch.float16,)
            out.append(("triton", "cpu", (torch.float32,) + half))
    if _backend.status("cupy")[0]:
        out.append(("cupy", "cuda", (torch.float32, torch.float16, torch.bfloat16)))
    return out


def plan(ops=None) -> list[tuple]:
    """Every (family, case, backend, device, dtype) that runs here, in a fixed order.

    The position of a job in this list seeds its random inputs, so a job gives the same inputs
    whether it runs in this process or in a worker.
    """
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
    return jobs


class _CompileTimer:
    """Seconds spent compiling kernels in this process: Triton's compiler (its JIT takes
    ``triton.compiler.compile`` when a kernel first binds on a device) and NVRTC through our
    CuPy loader. Cache hits on disk count too; they take milliseconds."""

    def __init__(self):
        self.seconds = 0.0
        self._installed = False

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        timed.__wrapped__ = fn
        return timed

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        try:
            import triton.compiler as tc

            if not getattr(tc.compile, "_gpu_nn_timed", False):
                tc.compile = self._wrap(tc.compile)
                tc.compile._gpu_nn_timed = True
        except Exception:  # no triton: nothing of it to time
            pass
        try:
            from .kernels import cuda as kcuda

            if not getattr(kcuda._load, "_gpu_nn_timed", False):
                kcuda._load = self._wrap(kcuda._load)
                kcuda._load._gpu_nn_timed = True
        except Exception:
            pass


_TIMER = _CompileTimer()


def run_job(index: int, job: tuple, seed: int = 0) -> dict:
    """Run one planned job and return its row (a crash is a failed row, not an exception)."""
    fam, case, backend, device, dtype = job
    rng = np.random.default_rng(seed * 1_000_003 + index)
    tol = TOL[dtype] * case.tol_scale
    c0, t0 = _TIMER.seconds, time.perf_counter()
    # float32 rows check the exact float32 path against TOL[float32]: TF32 (torch's default for
    # convolutions and recurrent layers, through cudnn.allow_tf32) has a 10-bit mantissa, and
    # its error bound is the tests' business (test_conv / test_rnn ``tf32`` tests)
    with _precision.exact_float32():
        try:
            err = case.run(backend, device, dtype, rng) if case.run else generic_error(case, backend, device, dtype, rng)
            ok = bool(err <= tol)
            msg = ""
        except Exception as exc:  # a crash is a failure, reported in the table
            err, ok, msg = float("nan"), False, f"{type(exc).__name__}: {exc}"
    return {
        "family": fam, "op": case.op, "backend": backend, "device": device,
        "dtype": str(dtype).replace("torch.", ""), "max_rel_err": err, "tol": tol,
        "ok": ok, "error": msg, "seconds": time.perf_counter() - t0, "compile_s": _TIMER.seconds - c0,
    }


_WORKER_JOBS: list | None = None


class WorkerPoisoned(Exception):
    """Raised by a worker process asked for a job after one of its jobs met a CUDA error: CUDA's
    errors of a kernel (an illegal address, a launch failure) are sticky, every later call in
    that process would fail with it, under other ops' names; the job is run again alone."""


_POISONED = False


def _cuda_error(row: dict) -> bool:
    """Whether a failed row's error is CUDA's own (the context is then unusable)."""
    err = row.get("error") or ""
    return not row["ok"] and ("CUDA error" in err or "AcceleratorError" in err or "CUDA_ERROR" in err)


def _worker_run(index: int, ops, seed: int) -> dict:
    """In a worker process: plan once (cases hold closures, so only indices cross processes),
    then run job ``index``."""
    global _WORKER_JOBS, _POISONED
    if _POISONED:
        raise WorkerPoisoned(index)
    _TIMER.install()
    if _WORKER_JOBS is None:
        _WORKER_JOBS = plan(ops)
    row = run_job(index, _WORKER_JOBS[index], seed)
    _POISONED = _cuda_error(row)
    return row


def _isolated_run(conn, runner, index: int, ops, seed: int) -> None:
    """In a process of its own: job ``index``'s row (``runner``: :func:`_worker_run`) sent
    through ``conn``."""
    conn.send(runner(index, ops, seed))
    conn.close()


def _run_isolated(indices, ops, seed: int, workers: int, runner=None):
    """Jobs ``indices``, each in a fresh process of its own (at most ``workers`` at a time), as
    ``(index, row or None, exit code)`` in completion order: a job that kills its process (a
    crash in a launch, the driver's abort) is named by its own None row, and no other job fails
    with it."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    pending, running = list(indices), {}
    while pending or running:
        while pending and len(running) < max(1, workers):
            i = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_isolated_run, args=(send, runner or _worker_run, i, ops, seed), daemon=True)
            proc.start()
            send.close()
            running[proc.sentinel] = (proc, i, recv)
        for sentinel in wait(list(running)):
            proc, i, recv = running.pop(sentinel)
            row = None
            try:
                if recv.poll():
                    row = recv.recv()
            except (EOFError, OSError):
                pass
            proc.join()
            yield i, row, proc.exitcode


# The order in which run_checks hands jobs to its worker processes: the ones that compile the
# most first (a list scheduler's longest-first rule), plan order among equals. From the H200 run
# at a331102 (benchmarks/results/2026-12-04_nvidia-h200_a331102/check.json; 15 workers, 745 s of
# jobs, 65 s wall): the recurrent family on triton took 10.7 s a job (up to 17.3, nearly all
# compiling), conv / dense / activation on triton 3-8, the rest 2 s and less; in plan order the
# recurrent jobs came last and set the tail. A model of the pool over those times finished plan
# order at 56.6 s and this order at 50.6 (longest-first by the measured times: 49.7).
SUBMIT_RANK = {("rnn", "triton"): 0, ("conv", "triton"): 1, ("dense", "triton"): 1, ("activation", "triton"): 1,
               ("rnn", "cupy"): 2}


def submission_order(jobs) -> list[int]:
    """Indices of ``jobs`` (:func:`plan`'s) in the order :func:`run_checks` submits them to its
    workers: by :data:`SUBMIT_RANK` of (family, backend) (others last), plan order among equals.
    A job's inputs are seeded from its plan index, so the order changes no result."""
    return sorted(range(len(jobs)), key=lambda i: (SUBMIT_RANK.get((jobs[i][0], jobs[i][2]), 3), i))


def default_workers() -> int:
    """Workers for ``gpu-nn check``: on a GPU most of a first run is kernel compilation, which
    is CPU work that parallelises across processes; under the interpreter (no GPU) the work
    is the interpreter itself, and CI machines have two cores, so one process. On a GPU, one per
    core but one (the parent, which hands out the jobs and prints), at most 16."""
    if not torch.cuda.is_available():
        return 1
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def op_line(op: str, rows: list[dict]) -> str:
    """One line for a finished op: pass count, worst error per backend, time and compile time."""
    bad = [r for r in rows if not r["ok"]]
    worst = {}
    for r in rows:
        key = r["backend"]
        worst[key] = max(worst.get(key, 0.0), r["max_rel_err"] if r["max_rel_err"] == r["max_rel_err"] else float("inf"))
    errs = ", ".join(f"{b} {e:.1e}" for b, e in worst.items())
    secs = sum(r.get("seconds", 0.0) for r in rows)
    comp = sum(r.get("compile_s", 0.0) for r in rows)
    verdict = "ok" if not bad else "FAIL " + "; ".join(
        f"{r['backend']}/{r['dtype']}: {(r['error'] or 'err %.2e > tol %.0e' % (r['max_rel_err'], r['tol']))[:120]}" for r in bad)
    return f"{op}: {len(rows) - len(bad)}/{len(rows)} pass, worst {errs}; {secs:.1f} s ({comp:.1f} s compiling) {verdict}"


def run_checks(ops=None, seed=0, progress=True, workers: int = 1, on_op=None) -> list[dict]:
    """Run every planned job; ``workers > 1`` spreads them over that many processes.

    ``on_op(op, rows)`` is called as soon as every job of an op has finished (in completion
    order), so a run that is cut short has already said what passed. The rows come back in plan
    order whatever the number of workers, with ``seconds`` and ``compile_s`` per row.
    """
    jobs = plan(ops)
    per_op: dict[str, int] = {}
    for _, case, *_ in jobs:
        per_op[case.op] = per_op.get(case.op, 0) + 1
    done: dict[str, list[dict]] = {}
    rows: list[dict | None] = [None] * len(jobs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="gpu-nn check", unit="check", leave=False)

    def finished(i: int, row: dict) -> None:
        rows[i] = row
        if bar is not None:
            bar.update(1)
        got = done.setdefault(row["op"], [])
        got.append(row)
        if len(got) == per_op[row["op"]] and on_op is not None:
            on_op(row["op"], got)

    if workers <= 1 or len(jobs) <= 1:
        _TIMER.install()
        for i, job in enumerate(jobs):
            finished(i, run_job(i, job, seed))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        def failed(i: int, why: str) -> dict:  # a row for a job whose process died under it
            fam, case, backend, device, dtype = jobs[i]
            return {"family": fam, "op": case.op, "backend": backend, "device": device,
                    "dtype": str(dtype).replace("torch.", ""), "max_rel_err": float("nan"),
                    "tol": TOL[dtype] * case.tol_scale, "ok": False, "error": why, "seconds": 0.0, "compile_s": 0.0}

        # jobs run once more, each alone, after the pool: a broken pool's unfinished ones (a
        # process that dies fails every job the pool had not finished, whichever one killed it),
        # a job that met a CUDA error (CUDA reports a kernel's fault at a later call, maybe
        # another job's) and those its poisoned worker refused afterwards
        again = []
        runner = _worker_run  # (looked up here: a test stands in its own)
        order = submission_order(jobs)
        rank = {i: k for k, i in enumerate(order)}
        pending = order
        while pending:
            # a CUDA error ends this pool (its poisoned worker would refuse, at once, every job
            # it is handed) and the jobs not yet started go to a fresh one
            cancelled = []
            # spawn: a forked child would inherit this process's CUDA context, which CUDA forbids
            ex = cf.ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=mp.get_context("spawn"))
            try:
                futs = {ex.submit(runner, i, ops, seed): i for i in pending}
                for fut in cf.as_completed(futs):
                    i = futs[fut]
                    try:
                        row = fut.result()
                    except cf.CancelledError:
                        cancelled.append(i)
                        continue
                    except (WorkerPoisoned, cf.process.BrokenProcessPool):
                        again.append(i)
                        continue
                    except Exception as exc:  # the row could not even be made, nor sent back
                        row = failed(i, f"worker failed: {type(exc).__name__}: {exc}")
                    if _cuda_error(row):
                        again.append(i)
                        for f in futs:
                            f.cancel()  # (those not started yet)
                        continue
                    finished(i, row)
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
            pending = sorted(cancelled, key=rank.__getitem__)
        for i, row, code in _run_isolated(sorted(again, key=rank.__getitem__), ops, seed, workers, runner):
            finished(i, row if row is not None else failed(
                i, f"its process died (exit code {code}): this job, run alone, killed it"))
    if bar is not None:
        bar.close()
    return [r for r in rows if r is not None]


def print_table(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="gpu-nn check: ours against the float64 reference")
    for col in ("op", "backend", "device", "dtype", "max rel err", "tol", "result"):
        # the result (a failure's message) wraps; the others keep their width
        table.add_column(col, justify="right" if col in ("max rel err", "tol") else "left", no_wrap=col != "result",
                         min_width=None if col == "result" else len(col))
    for r in rows:
        table.add_row(
            r["op"], r["backend"], r["device"], r["dtype"], f"{r['max_rel_err']:.2e}", f"{r['tol']:.0e}",
            "[green]pass[/green]" if r["ok"] else f"[red]FAIL[/red] {r['error'][:80]}",
        )
    console = Console()
    if not console.is_terminal:  # piped or logged: rich's 80 columns would cut the names
        console = Console(width=160)
    console.print(table)
