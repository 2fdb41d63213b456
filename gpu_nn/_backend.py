"""The one place that chooses a backend.

Backends:

* ``reference`` -- vectorised NumPy on the CPU (CUDA tensors are copied to the host and back).
* ``triton``    -- our ``@triton.jit`` kernels; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before the kernels were imported.
* ``cupy``      -- our CUDA C kernels compiled at run time by CuPy (NVRTC); CUDA tensors only.
* ``auto``      -- a GPU backend for CUDA tensors, ``reference`` for CPU tensors and for float64
  CUDA tensors (the GPU kernels compute in float32: float64 runs exact on the reference, as
  torch's float64 does, gradient checks included).

The choice comes from the innermost ``gpu_nn.backend(name)`` block active in the calling
thread, else from the ``GPU_NN_BACKEND`` environment variable (every thread's default), else
``auto``. It is thread-local, as torch's own context managers are: two threads in overlapping
blocks do not see each other's choice. Autograd runs the backward of CUDA tensors on its own
worker threads, which see none of the user's blocks; so every op captures the backend its
forward ran under (:func:`capture`) and its backward re-enters it (:func:`autograd_pair`). An
explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying
why; nothing falls back silently.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading

import torch

from ._errors import BackendUnavailableError

NAMES = ("auto", "reference", "triton", "cupy")
GPU_BACKENDS = ("triton", "cupy")

_local = threading.local()  # .stack: this thread's backend() blocks, innermost last
_env_cache: tuple = (None, "auto")  # (raw GPU_NN_BACKEND, validated name): one tuple, swapped whole


def _validate(name: str, where: str) -> str:
    name = str(name).strip().lower()
    if name not in NAMES:
        raise BackendUnavailableError(
            f"{where}: unknown backend {name!r}; expected one of {', '.join(NAMES)}"
        )
    return name


def _thread_stack() -> list[str]:
    try:
        return _local.stack
    except AttributeError:
        stack = _local.stack = []
        return stack


_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("GPU_NN_BACKEND") if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None


def _env_raw():
    """GPU_NN_BACKEND as stored, read on every call (None when unset): CPython's os.environ
    keeps its entries in ``_data`` under encoded keys, and one dict lookup there costs a tenth
    of ``os.environ.get`` (which encodes the key and decodes the value each time); elsewhere
    the public call. Compared raw against the cache; decoded only when it changed."""
    if _ENV_KEY is None:
        return os.environ.get("GPU_NN_BACKEND")
    return _ENV_DATA.get(_ENV_KEY)


def _env_decode(raw):
    return raw if raw is None or isinstance(raw, str) else os.environ.decodevalue(raw)


def requested() -> str:
    """The backend asked for right now in this thread: innermost ``backend()`` block, else the
    env var (read on every call, so a change to it is seen; validated once per value)."""
    stack = _thread_stack()  # created once per thread: a missing attribute is a slow lookup each time
    if stack:
        return stack[-1]
    global _env_cache
    raw = _env_raw()
    cached = _env_cache
    if raw == cached[0]:
        return cached[1]
    name = _validate(_env_decode(raw) or "auto", "GPU_NN_BACKEND")
    _env_cache = (raw, name)  # a tuple assignment is atomic: threads see the old or the new pair
    return name


class backend(contextlib.ContextDecorator):
    """Run the enclosed ops on backend ``name`` (``auto``, ``reference``, ``triton``, ``cupy``):
    ``with gpu_nn.backend("triton"):`` (``as`` gives the name), or as a decorator.

    An unknown name is refused when the object is made; a backend that cannot run here when the
    block is entered, not at the first op. As torch's ``no_grad()`` objects, one object may be
    entered again, nested, and from several threads (each thread has its own stack of blocks).
    """

    def __init__(self, name: str):
        self.name = _validate(name, "gpu_nn.backend")

    def __enter__(self) -> str:
        name = self.name
        if name not in ("auto", "reference"):
            ok, why = status(name)
            if not ok:
                raise BackendUnavailableError(f"backend {name!r} cannot run here: {why}")
        _thread_stack().append(name)
        return name

    def __exit__(self, *exc) -> None:
        _thread_stack().pop()

    def __call__(self, func):
        """As a decorator: ``func`` runs in the block. A generator function's body does at each
        resumption, as under torch's ``no_grad()`` decorator, and the caller's code between its
        yields does not (ContextDecorator alone opened and closed the block around making the
        generator, so its body ran outside it)."""
        if not inspect.isgeneratorfunction(func):
            return super().__call__(func)

        @functools.wraps(func)
        def generator(*args, **kwargs):
            gen = func(*args, **kwargs)
            try:
                with self:
                    response = gen.send(None)
                while True:
                    try:
                        request = yield response
                    except GeneratorExit:
                        with self:
                            gen.close()
                        raise
                    except BaseException as exc:  # (thrown in by the caller: handed to the body)
                        with self:
                            response = gen.throw(exc)
                    else:
                        with self:
                            response = gen.send(request)
            except StopIteration as stop:
                return stop.value

        return generator

    def __repr__(self) -> str:
        return f"gpu_nn.backend({self.name!r})"


@contextlib.contextmanager
def _entered(name: str):
    """Re-enter a backend captured earlier (already validated when it was captured)."""
    stack = _thread_stack()
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def capture() -> str:
    """The backend to record with an op's forward, so that its backward (perhaps on an
    autograd worker thread) runs on the same one."""
    return requested()


_CTX_ATTR = "gpu_nn_backend"


def autograd_pair(setup_context, backward):
    """Wrap an op's ``(setup_context, backward)`` pair (``register_autograd``'s or an
    ``autograd.Function``'s) so that the backward runs under the backend requested when the
    forward ran, in whatever thread autograd runs it. The wrapped functions are unchanged
    otherwise: same ``ctx``, same arguments, same results."""

    def setup(ctx, inputs, output):
        setattr(ctx, _CTX_ATTR, requested())
        return setup_context(ctx, inputs, output)

    def bwd(ctx, *grads):
        stack = _thread_stack()  # what _entered does, inline: this runs once per op backward
        stack.append(getattr(ctx, _CTX_ATTR, "auto"))
        try:
            return backward(ctx, *grads)
        finally:
            stack.pop()

    setup.__wrapped__, bwd.__wrapped__ = setup_context, backward
    return setup, bwd


@functools.lru_cache(maxsize=None)
def interpret_mode() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1 at import). Fixed
    once the kernels are imported (``@triton.jit`` decides at decoration), so cached."""
    if not _triton_importable()[0]:
        return False
    from .kernels import triton as ktriton

    return ktriton.INTERPRET


def triton_library_compiled() -> bool:
    """Whether Triton's own language library (``tl.sum``, ``tl.max``, ... themselves
    ``@triton.jit`` functions, decorated when ``triton.language`` is imported) is in compiled
    form: imported before ``TRITON_INTERPRET=1`` was set. Interpreted kernels cannot call it
    ("Cannot call @triton.jit'd outside of the scope of a kernel"). ``import gpu_nn`` does not
    import it (the flop formulas wait for torch.utils.flop_counter, which loads Triton on torch
    2.13), but a user's earlier import of Triton or of that module does."""
    std = sys.modules.get("triton.language.standard")
    if std is None:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(getattr(std, "sum", None), JITFunction)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, ""


@functools.lru_cache(maxsize=None)
def _cuda_ok() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


@functools.lru_cache(maxsize=None)
def _cupy_status() -> tuple[bool, str]:
    try:
        import cupy
    except Exception as exc:
        return False, (
            f"cupy is not importable ({type(exc).__name__}: {exc}); "
            "install gpu-nn[cuda12] or gpu-nn[cuda13]"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver or device
        return False, f"cupy {cupy.__version__} is installed but finds no usable CUDA device ({exc})"
    if count < 1:
        return False, f"cupy {cupy.__version__} is installed but finds no CUDA device"
    try:  # our CuPy kernels are compiled at run time: no NVRTC library, no kernel
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # (cuda.pathfinder's DynamicLibNotFoundError, a RuntimeError)
        return False, (f"cupy {cupy.__version__} finds no NVRTC library to compile its kernels with "
                       f"({type(exc).__name__}: {exc}); install gpu-nn[cuda12] or gpu-nn[cuda13], whose NVRTC "
                       "wheels provide it")
    ok, why = _cuda_ok()
    if not ok:
        return False, why
    return True, f"cupy {cupy.__version__} on {why}"


_status_cache: dict = {}  # name -> (ok, why): every input to it is fixed for the process


def status(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run here, and why (or why not)."""
    got = _status_cache.get(name)
    if got is not None:
        return got
    got = _status_cache[name] = _status(_validate(name, "gpu_nn.backend_status"))
    return got


def _status(name: str) -> tuple[bool, str]:
    if name in ("auto", "reference"):
        return True, "NumPy on the CPU" if name == "reference" else "always"
    if name == "triton":
        ok, why = _triton_importable()
        if not ok:
            return False, why
        cuda, cwhy = _cuda_ok()
        if cuda:
            return True, f"compiled kernels on {cwhy}"
        if interpret_mode():
            if triton_library_compiled():
                return False, ("TRITON_INTERPRET=1 was set after triton.language was imported (by an import of "
                               "triton, or of torch.utils.flop_counter): Triton's own functions are compiled, and the "
                               "interpreted kernels cannot call them; set it before those imports")
            return True, "CPU tensors through the Triton interpreter (TRITON_INTERPRET=1)"
        return False, (f"{cwhy}, and TRITON_INTERPRET=1 was not set (set before torch and gpu_nn are imported, it "
                       "runs the kernels on CPU tensors in Triton's interpreter; gpu-nn check sets it itself)")
    return _cupy_status()


def available_backends() -> list[str]:
    """The concrete backends that work here, in preference order."""
    return [n for n in ("triton", "cupy", "reference") if status(n)[0]]


def resolve(op: str, device: torch.device, have: tuple[str, ...], prefer: tuple[str, ...] = GPU_BACKENDS,
            dtype: torch.dtype | None = None) -> str:
    """Pick the backend that runs ``op`` on tensors of ``device`` (and floating ``dtype``).

    ``have`` lists the backends that implement ``op``; ``prefer`` orders the GPU ones for
    ``auto``. ``auto`` sends float64 to the reference wherever it runs (our GPU kernels
    compute in float32, which is not what a float64 tensor asks for); an explicitly requested
    GPU backend runs float64 in float32. Raises BackendUnavailableError when the requested
    backend cannot run.
    """
    req = requested()
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if req == "auto":
        if dev.type != "cuda" or (dtype is torch.float64 and "reference" in have):
            return "reference"
        reasons = []
        for name in prefer:
            if name not in have:
                continue
            ok, why = status(name)
            if ok:
                return name
            reasons.append(f"{name}: {why}")
        raise BackendUnavailableError(
            f"{op}: no GPU backend can run it on {dev} ({'; '.join(reasons) or 'none implemented'})"
        )
    if req not in have:
        raise BackendUnavailableError(
            f"{op} has no {req} implementation (it has: {', '.join(have)}); "
            f"use gpu_nn.backend('auto') or one of those"
        )
    if req == "reference":
        return req
    ok, why = status(req)
    if not ok:
        raise BackendUnavailableError(f"{op}: backend {req!r} cannot run here: {why}")
    if dev.type != "cuda":
        if req == "triton" and interpret_mode() and dev.type == "cpu":
            return req
        raise BackendUnavailableError(
            f"{op}: backend {req!r} needs CUDA tensors, got tensors on {dev}"
            + (" (CPU tensors run Triton only under TRITON_INTERPRET=1)" if req == "triton" else "")
        )
    return req


def check_interpreter_dtype(op: str, backend_name: str, *tensors: torch.Tensor) -> None:
    """Triton's own interpreter computes bfloat16 silently wrong (on its bit patterns as integers);
    gpu-nn installs exact bfloat16 arithmetic in it (kernels/triton/_compat.py). Where that
    could not be installed, refuse bfloat16 there rather than return wrong values."""
    if backend_name != "triton":
        return
    for t in tensors:
        if t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu":  # dtype first: no device object
            from .kernels.triton import _compat  # imported already: CPU tensors reach triton only interpreted

            if _compat.bf16_exact():
                return
            raise BackendUnavailableError(
                f"{op}: bfloat16 is not supported by this Triton's interpreter (its results are "
                "wrong without error); run bfloat16 on a GPU or use float16/float32 here"
            )


# pinned host tensors copied to a device during a CUDA-graph capture: the graph's copy node reads
# them again at every replay, so they must outlive it (one per copy made while capturing, never
# freed)
_CAPTURED_HOST: list = []


def to_device_async(host: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor (a small table: lengths, addresses) on ``device`` without a host
    synchronisation. On CUDA through pinned memory: torch's copy from pageable memory
    synchronises the stream after it (the host waits for all queued GPU work) and cannot be
    captured into a CUDA graph; from pinned memory the copy is queued like a kernel (torch's
    host allocator keeps the pinned block until the copy has run). Copied while a graph is
    captured, the pinned tensor is kept for good."""
    if torch.device(device).type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    host = host.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED_HOST.append(host)
    return host.to(device, non_blocking=True)
