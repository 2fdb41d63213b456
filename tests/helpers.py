"""Shared test helpers: backend parametrisation, random inputs, tolerances."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import tempfile

import numpy as np
import pytest
import torch

import gpu_nn
from gpu_nn import _backend

CUDA = torch.cuda.is_available()


def backend_params(have=("reference", "triton", "cupy")):
    """pytest params ``(backend, device)`` for every backend in ``have``.

    Combinations that cannot run here are kept and skipped with the reason, so a report shows
    what did not run.
    """
    params = []
    for name in have:
        if name == "reference":
            params.append(pytest.param("reference", "cpu", id="reference-cpu"))
            continue
        ok, why = _backend.status(name)
        if name == "triton":
            if CUDA:
                params.append(pytest.param("triton", "cuda", id="triton-cuda"))
            elif ok:
                params.append(pytest.param("triton", "cpu", id="triton-interp"))
            else:
                params.append(pytest.param("triton", "cpu", id="triton", marks=pytest.mark.skip(reason=why)))
        elif name == "cupy":
            marks = () if ok else pytest.mark.skip(reason=f"cupy backend unavailable: {why}")
            params.append(pytest.param("cupy", "cuda", id="cupy-cuda", marks=marks))
    return params


def backend_dtype_params(have=("reference", "triton", "cupy")):
    """pytest params ``(backend, device, dtype)``: :func:`backend_params` times the dtypes each is
    tested in (:func:`gpu_dtypes_for`), one test per dtype instead of a loop over them inside one:
    on a GPU each dtype compiles its own kernel variants, and xdist can then share one heavy
    test's dtypes among its workers (the recurrent backend tests: up to a minute of compiles each
    on the H200, benchmarks/results/census/)."""
    out = []
    for p in backend_params(have):
        backend, device = p.values
        for dt in gpu_dtypes_for(backend, device):
            out.append(pytest.param(backend, device, dt, id=f"{p.id}-{str(dt).replace('torch.', '')}", marks=p.marks))
    return out


def latin_cover(rows, cols, values):
    """``(row, col, value)`` for every row and column, the value the ``(i + j) mod len(values)``-th:
    every (row, column) pair meets once, and where rows and columns each number at least
    ``len(values)``, every row and every column meets each value (a Latin rectangle: all pairs of
    the three factors, a ``len(values)``-th of their product). What it gives up is the three-way
    combinations: a fault that needs one row, one column and one value together to show. Used
    where each cell costs seconds of the interpreter's time and the third factor is a dtype or a
    dot precision the kernels take through the same code."""
    if len(rows) < len(values) or len(cols) < len(values):
        raise ValueError(f"{len(rows)} rows and {len(cols)} columns cannot meet each of {len(values)} values")
    return [(r, c, values[(i + j) % len(values)]) for i, r in enumerate(rows) for j, c in enumerate(cols)]


INTERP_DTYPES = tuple(
    getattr(torch, name.strip())
    for name in os.environ.get("GPU_NN_TEST_INTERP_DTYPES", "float32,float16,bfloat16").split(",")
)


def gpu_dtypes_for(backend: str, device: str):
    """Float dtypes a backend is tested in: the reference in float32/float64; GPUs and the
    Triton interpreter in float32/16/bf16 (the interpreter computes bfloat16 as the GPU does
    with gpu-nn's fix, kernels/triton/_compat.py; GPU_NN_TEST_INTERP_DTYPES, a comma list such
    as ``bfloat16``, narrows what it runs)."""
    if backend == "reference":
        return (torch.float64, torch.float32)
    if device == "cpu":
        return INTERP_DTYPES
    return (torch.float32, torch.float16, torch.bfloat16)


def vs_reference_dtypes(backend: str, device: str):
    """:func:`gpu_dtypes_for` for a test that compares ``backend`` with the float64 reference:
    the reference's own float64 left out, where it would be compared with itself (a reference
    fault then moves both sides alike; the ``*_reference_matches_torch`` tests check the
    reference against torch). Its float32 leg stays: the float32 path against float64."""
    return tuple(d for d in gpu_dtypes_for(backend, device) if not (backend == "reference" and d == torch.float64))


def randn(rng: np.random.Generator, *shape, dtype=torch.float64, device="cpu", noncontig=False, requires_grad=False):
    """Fresh standard-normal values (never zeros). ``noncontig`` returns a strided view of a
    larger buffer with the same values."""
    a = rng.standard_normal(shape)
    t = torch.from_numpy(a).to(dtype=dtype, device=device)
    if noncontig and t.dim() > 0:
        big = torch.empty(*shape[:-1], 2 * shape[-1] if shape else 1, dtype=dtype, device=device)
        big.fill_(float("nan"))
        big[..., ::2] = t
        t = big[..., ::2]
        assert not t.is_contiguous() or t.numel() <= 1
    return t.requires_grad_(requires_grad)


EPS = {
    torch.float64: 2.2e-16,
    torch.float32: 1.2e-7,
    torch.float16: 9.8e-4,
    torch.bfloat16: 7.8e-3,
}


def count_loops(monkeypatch) -> list:
    """The batch sizes of every vmap loop over an op's batch (``_dispatch._looped``) from here to
    the test's end, appended to the list returned: empty where every op folded the batch."""
    from gpu_nn.ops import _dispatch

    loops = []
    looped = _dispatch._looped
    monkeypatch.setattr(_dispatch, "_looped", lambda fn, n, *a, **k: (loops.append(n), looped(fn, n, *a, **k))[1])
    return loops


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1): an error relative to the output scale."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return 0.0
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return float("inf")
    a = torch.where(nan_e, 0.0, a)
    e = torch.where(nan_e, 0.0, e)
    scale = max(float(e.abs().max()), 1.0)
    return float((a - e).abs().max()) / scale


def tol(dtype: torch.dtype, k: int = 1) -> float:
    """Tolerance of a result computed in ``dtype`` by a reduction of length ``k``
    (float32 accumulation for half types): a few ulps of the output dtype plus a floor that
    grows like sqrt(k) ulps of the accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return 4 * EPS[dtype] + 8 * EPS[acc] * max(k, 1) ** 0.5


def assert_close(actual, expected, dtype, k=1, what=""):
    err = max_rel_err(actual, expected)
    bound = tol(dtype, k)
    assert err <= bound, f"{what}: max relative error {err:.3e} > {bound:.3e} ({dtype}, k={k})"
    return err


def assert_like_torch(ours, torch_same_dtype, ref64, dtype, k=1, what=""):
    """DESIGN section 4: our error in ``dtype`` may be at most twice torch's own error in that
    dtype, plus a small floor scaled by the reduction length."""
    ours_err = max_rel_err(ours, ref64)
    torch_err = max_rel_err(torch_same_dtype, ref64)
    bound = 2 * torch_err + tol(dtype, k)
    assert ours_err <= bound, f"{what}: error {ours_err:.3e} > 2 x torch's {torch_err:.3e} + floor ({dtype}, k={k})"
    return ours_err


def build_host_library(c_source: str, name: str) -> ctypes.CDLL:
    """Compile ``c_source`` (C++ that may ``#include`` the kernels' ``*.cuh`` headers) into a
    shared library with the host compiler and load it: the CUDA kernels' ``GN_HD`` math is
    then checked on the CPU against the reference."""
    from gpu_nn.kernels import cuda as kcuda

    digest = hashlib.sha1((c_source + name).encode()).hexdigest()[:12]
    for f in sorted(os.listdir(kcuda.include_dir())):
        if f.endswith((".cuh", ".cu")):
            with open(os.path.join(kcuda.include_dir(), f), "rb") as fh:
                digest = hashlib.sha1(digest.encode() + fh.read()).hexdigest()[:12]
    out_dir = os.path.join(tempfile.gettempdir(), "gpu_nn_host")
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, f"{name}-{digest}.so")
    if not os.path.exists(lib):
        src = os.path.join(out_dir, f"{name}-{digest}.cpp")
        with open(src, "w") as f:
            f.write(c_source)
        tmp = f"{lib}.{os.getpid()}.tmp"
        subprocess.run(
            ["g++", "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{kcuda.include_dir()}", src, "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def fptr(a: np.ndarray):
    """ctypes pointer to a contiguous NumPy array's data."""
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


__all__ = [
    "CUDA",
    "assert_close",
    "assert_like_torch",
    "backend_params",
    "build_host_library",
    "fptr",
    "gpu_dtypes_for",
    "gpu_nn",
    "max_rel_err",
    "randn",
    "tol",
]


def run_bench_script(tmp_path, script: str, python_body: str, env: dict, log_line: str = 'echo "$*"'):
    """Run ``benchmarks/<script> tmp_path/out`` with ``PYTHON`` a bash stand-in that appends
    ``log_line``'s output (each call's arguments, by default) to a log and then runs
    ``python_body``. ``env`` is the whole environment but ``PYTHON``. Returns
    ``(CompletedProcess, out folder, logged lines)``."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\n{log_line} >> {log}\n{python_body}")
    fake.chmod(0o755)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(root / "benchmarks" / script), str(out)], cwd=root, env={**env, "PYTHON": str(fake)},
                       capture_output=True, text=True, timeout=60)
    return r, out, log.read_text().splitlines() if log.exists() else []


class _IndexScope:
    """A language-patch scope that records what ``scope`` would, except that a tensor's
    ``__index__`` is always the one that reads a one-element array of any rank (see
    concurrent_programs)."""

    def __init__(self, scope):
        self.scope = scope

    def set_attr(self, obj, name, value):
        if name == "__index__":
            value = _index
        self.scope.set_attr(obj, name, value)


def _index(self):
    return int(self.handle.data.squeeze())


@contextlib.contextmanager
def concurrent_programs(timeout_s: float = 300.0):
    """Under the Triton interpreter, every program of a launch in this block runs in a thread of
    its own, all at once, instead of one after another: a grid-wide barrier (the persistent RNN
    kernels' ``_grid_barrier``, an atomic counter and a spin) then opens as it does on a GPU, and
    programs that exchange data through memory between steps interleave. ``tl.program_id``
    reads the calling thread's index (the interpreter keeps one builder for all programs); its
    atomics are made in C++ under the GIL, so each is whole with respect to the other threads,
    and each yields the GIL a little after it (a spinning program leaves the others time to
    run). A program that raises stops the launch: the others raise at their next atomic (a
    spin would never end), and the first error is re-raised here; so does a launch that runs
    past ``timeout_s``. Outside the interpreter (a GPU) the block changes nothing.

    It replaces ``GridExecutor.__call__`` by the same steps as Triton's (copy arguments to the
    host, pre-run hooks, the language patch, the grid, the copy back; Triton 3.6 to 3.9 have
    them alike) with the grid loop threaded; where this Triton lacks one of those internals the
    test is skipped, saying so."""
    import inspect
    import threading
    import time

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        yield
        return
    import triton.runtime.interpreter as interp

    need = ("GridExecutor", "InterpreterBuilder", "interpreter_builder", "_patch_lang", "_implicit_cvt")
    executor = getattr(interp, "GridExecutor", None)
    if not all(hasattr(interp, n) for n in need) or not all(
            hasattr(executor, n) for n in ("_init_args_hst", "_restore_args_dev", "__call__")):
        pytest.skip("this Triton's interpreter lacks the internals concurrent_programs threads its programs through")
    builder_cls = interp.InterpreterBuilder
    local = threading.local()
    abort = threading.Event()
    real_call, real_rmw, real_cas = executor.__call__, builder_cls.create_atomic_rmw, builder_cls.create_atomic_cas

    def atomic(real):
        def run(self, *args, **kwargs):
            if abort.is_set():
                raise RuntimeError("another program of this launch failed (concurrent_programs)")
            out = real(self, *args, **kwargs)
            time.sleep(0.0002)  # let the other programs run while this one spins
            return out
        return run

    def call(self, *args_dev, **kwargs):
        spec = inspect.getfullargspec(self.fn)
        kwargs = {k: v for k, v in kwargs.items() if k in spec.args or k in spec.kwonlyargs}
        args_hst, kwargs_hst = self._init_args_hst(args_dev, kwargs)
        for hook in self.pre_run_hooks:
            hook(*args_hst, **kwargs_hst)
        patch = interp._patch_lang(self.fn)
        try:
            args = inspect.getcallargs(self.fn, *args_hst, **kwargs_hst)
            args = {k: v if k in self.constexprs else interp._implicit_cvt(v) for k, v in args.items()}
            grid = self.grid(args) if callable(self.grid) else self.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            interp.interpreter_builder.set_grid_dim(*grid)
            errors = []

            def program(x, y, z):
                try:
                    interp.interpreter_builder.set_grid_idx(x, y, z)
                    self.fn(**args)
                except BaseException as e:  # noqa: BLE001 -- re-raised below
                    errors.append(e)
                    abort.set()

            threads = [threading.Thread(target=program, args=(x, y, z), daemon=True)
                       for x in range(grid[0]) for y in range(grid[1]) for z in range(grid[2])]
            for t in threads:
                t.start()
            end = time.monotonic() + timeout_s
            for t in threads:
                t.join(max(0.0, end - time.monotonic()))
            if any(t.is_alive() for t in threads):
                abort.set()
                for t in threads:
                    t.join(10.0)
                raise TimeoutError(f"a launch of {grid[0] * grid[1] * grid[2]} programs ran past {timeout_s} s")
            if errors:
                raise errors[0]
        finally:
            patch.restore()
        self._restore_args_dev(args_dev, args_hst, kwargs, kwargs_hst)

    missing = object()
    real_idx = builder_cls.__dict__.get("grid_idx", missing)
    builder_cls.grid_idx = property(lambda self: getattr(local, "idx", None),
                                    lambda self, v: setattr(local, "idx", v))
    # Device-function calls patch the language again on every call (InterpretedFunction), each
    # attribute anew; on Triton 3.6 the tensor's ``__index__`` goes through the interpreter's own
    # (which NumPy >= 2.4 refuses on its one-element arrays) before gpu-nn's compat layer mends
    # it (kernels/triton/_compat.py): another program's thread could call it in between. Here
    # every such patch sets the mended one straight away.
    real_tensor_patch = interp._patch_lang_tensor
    interp._patch_lang_tensor = lambda tensor, scope: real_tensor_patch(tensor, _IndexScope(scope))
    # A device function is rewritten (its source parsed with ast) on its first call, which here
    # several programs' threads can make at once: CPython 3.11's AST constructor keeps its
    # recursion depth per interpreter, not per thread, and raised a spurious "SystemError: AST
    # constructor recursion depth mismatch" in a clean-clone CI run (cpython gh-106905). One
    # rewrite at a time.
    functions = getattr(interp, "InterpretedFunction", None)
    real_rewrite = getattr(functions, "rewrite", None)
    if real_rewrite is not None:
        rewriting = threading.Lock()

        def rewrite(self):
            with rewriting:
                return real_rewrite(self)

        functions.rewrite = rewrite
    builder_cls.create_atomic_rmw = atomic(real_rmw)
    builder_cls.create_atomic_cas = atomic(real_cas)
    executor.__call__ = call
    try:
        yield
    finally:
        interp._patch_lang_tensor = real_tensor_patch
        if real_rewrite is not None:
            functions.rewrite = real_rewrite
        executor.__call__ = real_call
        builder_cls.create_atomic_rmw, builder_cls.create_atomic_cas = real_rmw, real_cas
        if real_idx is missing:
            del builder_cls.grid_idx
        else:
            builder_cls.grid_idx = real_idx


class FakeDevice:
    """``torch.cuda``'s events, sleep and synchronize simulated on a fake host clock, for timing
    code on a machine without a GPU: the stream runs each queued item once the host has queued
    it and the item before it is done. ``call(host, kernel, sync=False)`` makes a callable that
    spends ``host`` seconds of host time, then queues a kernel of ``kernel`` seconds (``sync``:
    then waits for the stream, as a call with a device-to-host copy does). Install it with
    ``install(monkeypatch, *time_users)``: every module in ``time_users`` reads this clock as
    its ``time``; ``torch.cuda._sleep(cycles)`` lasts ``cycles`` ns."""

    CYCLE_S = 1e-9

    def __init__(self):
        self.now = 0.0        # the host's clock
        self.free_at = 0.0    # when the stream has finished everything queued so far
        self.log: list = []

    # the host clock, as a ``time`` module
    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def _queue(self, seconds):
        self.free_at = max(self.free_at, self.now) + seconds

    def call(self, host: float, kernel: float, sync: bool = False):
        def fn():
            self.log.append("run")
            self.now += host
            self._queue(kernel)
            if sync:
                self.now = max(self.now, self.free_at)
        return fn

    def install(self, monkeypatch, *time_users):
        dev = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                dev.log.append("record")
                dev._queue(0.0)
                self.t = dev.free_at

            def synchronize(self):
                dev.now = max(dev.now, self.t)

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        def _sleep(cycles):
            dev.log.append(("sleep", cycles))
            dev._queue(cycles * dev.CYCLE_S)

        def synchronize(device=None):
            dev.now = max(dev.now, dev.free_at)

        from gpu_nn import _tuning
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "_sleep", _sleep)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(_tuning, "_cycle_s", [self.CYCLE_S])
        monkeypatch.setattr(_tuning, "time", self)
        for mod in time_users:
            monkeypatch.setattr(mod, "time", self)
        return self


@contextlib.contextmanager
def interpreted_launches(device: str):
    """The names of the Triton kernels launched inside the block, in order, where they run in the
    interpreter (``device`` "cpu"); on a GPU the list stays empty (launch counts there are
    kernel_counts' business). Restores only what it patched."""
    names: list = []
    if device != "cpu":
        yield names
        return
    from triton.runtime.interpreter import InterpretedFunction

    orig = InterpretedFunction.run

    def run(self, *args, **kwargs):
        names.append(self.fn.__name__)
        return orig(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield names
    finally:
        InterpretedFunction.run = orig


def aot_cover() -> str:
    """How much of each kernel's configurations the sm_90 compile checks compile (test_compile's
    Triton specs, test_cupy_rnn's rnn.cu builds) and of the recorded launches test_aot_coverage
    takes through the front end: ``"all"`` with GPU_NN_AOT_FULL=1, else
    GPU_NN_AOT_COVER (``all``, ``pairs`` or ``each``; default ``each``); another value is refused."""
    from gpu_nn.kernels import env_switch

    cover = "all" if env_switch("GPU_NN_AOT_FULL") else os.environ.get("GPU_NN_AOT_COVER", "each")
    if cover not in ("all", "pairs", "each"):
        raise ValueError(f"GPU_NN_AOT_COVER must be all, pairs or each, got {cover!r}")
    return cover


@contextlib.contextmanager
def environment_kept():
    """Put the process environment back as it was on entry, on leaving (pytest's own
    PYTEST_CURRENT_TEST, set phase by phase, left as it is then). conftest wraps every test in
    it: a variable a test leaves set (``gpu-nn check``'s ``main()`` called in-process sets
    GPU_NN_TUNE=0) otherwise stayed for the rest of the worker's tests, and each later
    :func:`run_uninterpreted` differed from the server's start in a variable imports may read, so
    ran as a fresh Python: in a full ``-n 2`` run, some 20 sm_90 scripts of one worker, about 4 s
    of imports each."""
    before = dict(os.environ)
    try:
        yield
    finally:
        if os.environ != before:  # only what changed is undone (no moment without the rest)
            for k in [k for k in os.environ if k not in before and k != "PYTEST_CURRENT_TEST"]:
                del os.environ[k]
            for k, v in before.items():
                if k != "PYTEST_CURRENT_TEST" and os.environ.get(k) != v:
                    os.environ[k] = v


_BASE_ENV: dict | None = None  # the session's environment before any test changed it (conftest)


def set_base_env(env: dict) -> None:
    """The environment the servers start with (conftest: the session's, once its session fixtures
    set what they set). Where a server started from the environment at its first use instead, a
    test that had changed a variable imports may read (monkeypatch, or a leak) started it so, and
    no later request of the worker matched it."""
    global _BASE_ENV
    _BASE_ENV = dict(env)


def uninterpreted_env(**extra) -> dict:
    """The environment of this process without ``TRITON_INTERPRET`` (a process that compiles
    kernels must not have it: kernels imported under the interpreter cannot compile), plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


class _UninterpretedServer:
    """The client of ``tests/uninterpreted_server.py``: one server of each kind (this one, and
    :class:`_TorchServer`) per test process, started at its first use from the session's
    environment (:func:`set_base_env`) and stopped when the process exits. A request that does
    not end as the protocol says (a timeout's kill that finds the child gone, an interrupt, a
    server that died) stops the server, and the next request starts another."""

    # variables the imports read: a child whose environment differs in one of these from the
    # server's at its start is not served (run_uninterpreted starts a fresh Python instead)
    IMPORT_TIME = ("GPU_NN_", "TRITON_", "TORCH", "PYTORCH", "CUDA", "OMP_", "MKL_", "OPENBLAS_", "PYTHON")
    # read at use, not by the imports: Triton's cache at each compile (3.6 and 3.9: knobs.cache.dir),
    # inductor's when it compiles (torch sets it in os.environ then: a test process that ran
    # torch.compile has it, the server's start did not)
    AFTER_IMPORT = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")

    ARGS: tuple = ()  # the server script's arguments
    DROPPED: tuple = ("TRITON_INTERPRET",)  # left out of the session's environment at its start

    def __init__(self):
        self.proc = None
        self.buf = b""
        self.started_env: dict = {}
        self.err_path = None
        self.next_id = 0
        self.exit_hook = False

    def serves(self, env: dict) -> bool:
        """Whether a child may take ``env`` (the server, started now if it is not running, made
        its imports with the same values of every variable they may read)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        keys = {k for k in set(env) | set(self.started_env)
                if k.startswith(self.IMPORT_TIME) and k not in self.AFTER_IMPORT}
        return all(env.get(k) == self.started_env.get(k) for k in keys)

    def _line(self, timeout: float):
        import json
        import select
        import time

        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                code = self.proc.wait()
                raise RuntimeError(f"the uninterpreted server exited (code {code}): "
                                   f"{open(self.err_path, errors='replace').read()[-3000:]}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _start(self):
        import atexit
        import pathlib
        import sys

        self.stop()
        fd, self.err_path = tempfile.mkstemp(prefix="gpu-nn-server-", suffix=".err")
        server = pathlib.Path(__file__).with_name("uninterpreted_server.py")
        self.started_env = self._start_env()
        try:
            self.proc = subprocess.Popen([sys.executable, str(server), *self.ARGS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=fd, env=self.started_env, bufsize=0)
        finally:
            os.close(fd)
        self.buf = b""
        if not self.exit_hook:
            atexit.register(self.stop)
            self.exit_hook = True
        if self._line(300) is None:
            self.stop()
            raise RuntimeError("the uninterpreted server did not start within 300 s")

    def _start_env(self) -> dict:
        base = os.environ if _BASE_ENV is None else _BASE_ENV
        return {k: v for k, v in base.items() if k not in self.DROPPED}

    def launch(self, argv: list, timeout: float, cwd, env: dict) -> subprocess.CompletedProcess:
        """``argv`` run as ``python`` would with ``env``: forked from this server where it serves
        ``env`` (:func:`server_wanted`, :meth:`serves`), else a fresh Python."""
        import sys

        if not server_wanted() or not self.serves(env):
            return subprocess.run([sys.executable, *map(str, argv)], env=env, capture_output=True, text=True,
                                  timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
        return self.run(argv, timeout, cwd or os.getcwd(), env)

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
        self.proc = None
        if self.err_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.err_path)
            self.err_path = None

    def _answer(self, rid: int, key: str, timeout: float):
        msg = self._line(timeout)
        if msg is not None and (msg.get("id") != rid or key not in msg):
            raise RuntimeError(f"the uninterpreted server answered {msg} to request {rid}")
        return msg

    def run(self, argv: list, timeout: float, cwd, env: dict) -> subprocess.CompletedProcess:
        import json
        import signal

        self.next_id += 1
        rid = self.next_id
        with tempfile.TemporaryDirectory(prefix="gpu-nn-run-") as d:
            out, err = os.path.join(d, "out"), os.path.join(d, "err")
            req = {"id": rid, "argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "out": out, "err": err}
            try:
                self.proc.stdin.write((json.dumps(req) + "\n").encode())
                pid = self._answer(rid, "pid", 60)["pid"]
                done = self._answer(rid, "rc", timeout)
                if done is None:  # as subprocess.run's timeout: the child killed, TimeoutExpired raised
                    os.kill(pid, signal.SIGKILL)  # (the server reaps it only after: the pid is still the child's)
                    if self._answer(rid, "rc", 60) is None:
                        raise RuntimeError(f"the uninterpreted server did not report its killed child {pid}")
                    raise subprocess.TimeoutExpired(argv, timeout, output=_read(out), stderr=_read(err))
            except subprocess.TimeoutExpired:
                raise
            except BaseException:
                self.stop()  # out of step with the protocol: the next request starts a server afresh
                raise
            return subprocess.CompletedProcess(argv, done["rc"], _read(out), _read(err))


def _read(path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class _TorchServer(_UninterpretedServer):
    """The same server with torch imported alone (``--torch-only``), for :func:`run_fresh`: only
    the variables torch's import may read must match its start; gpu-nn's, Triton's and
    TRITON_INTERPRET itself are read by the child's own imports."""

    ARGS = ("--torch-only",)
    IMPORT_TIME = ("TORCH", "PYTORCH", "CUDA", "OMP_", "MKL_", "OPENBLAS_", "PYTHON")
    AFTER_IMPORT = ("TORCHINDUCTOR_CACHE_DIR",)
    DROPPED = ()


_SERVER = _UninterpretedServer()
_TORCH_SERVER = _TorchServer()


def server_wanted() -> bool:
    """Whether :func:`run_uninterpreted` forks its scripts from the server (no CUDA, ``os.fork``,
    GPU_NN_TEST_NO_SERVER unset or 0) where their environment lets it."""
    return not CUDA and hasattr(os, "fork") and os.environ.get("GPU_NN_TEST_NO_SERVER", "") in ("", "0")


def run_uninterpreted(argv: list, timeout: float = 300, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], env=uninterpreted_env(**env), capture_output=True,
    text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)``, in a child forked from a
    server that made torch's, Triton's and gpu-nn's imports once (tests/uninterpreted_server.py:
    about 3.8 s of each such process, the most of many tests' time). The child is a process of its
    own (exit code, output, working directory, ``sys.argv``, its environment: this process's now,
    with ``env``; its end through Python's own shutdown); what it shares with the others is those
    imports. Where a variable they may read (GPU_NN_*, TRITON_* but TRITON_CACHE_DIR, torch's but
    TORCHINDUCTOR_CACHE_DIR, CUDA's, the thread counts, PYTHON*) differs from the server's at its
    start, the script runs as a fresh Python, as every one does with ``GPU_NN_TEST_NO_SERVER=1``
    and on a machine with CUDA (a child forked after torch.cuda.is_available() initialised CUDA's driver cannot use it;
    those machines have cores to spare)."""
    env = uninterpreted_env(**{str(k): str(v) for k, v in (env or {}).items()})
    return _SERVER.launch(argv, timeout, cwd, env)


def run_fresh(argv: list, timeout: float = 300, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
    timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)`` (``env``: the whole environment, this
    process's by default), for a script that must make gpu-nn's and Triton's imports itself
    (what they read from the environment at import is its point), in a child forked from a server
    that imported torch alone (``uninterpreted_server.py --torch-only``: about 2 s of each such
    Python). Where a variable torch's import may read differs from that server's start, or as
    :func:`run_uninterpreted` says (CUDA, GPU_NN_TEST_NO_SERVER=1), a fresh Python runs it."""
    env = {str(k): str(v) for k, v in (os.environ if env is None else env).items()}
    return _TORCH_SERVER.launch(argv, timeout, cwd, env)
