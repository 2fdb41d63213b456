"""Triton launches without the JIT's per-call binding: cached launch plans (issue 14, item 1).

``kernel[grid](*args, **kwargs)`` goes through ``JITFunction.run`` on every call: the binder
(one specialisation per argument), a cache key built from the specialisation and
``str(options)``, several knob and driver look-ups, the check of used globals, launch metadata,
and only then ``CompiledKernel.run``, the launcher. :func:`launch` takes the same arguments;
the first call for a *plan key* goes through that path and keeps the ``CompiledKernel`` it
returns; later calls with the same key call the launcher directly.

What the launcher takes, read from the sources of Triton 3.6.0, 3.8.0 and 3.9.0
(``runtime/jit.py`` ``JITFunction.run``, ``backends/nvidia/driver.py`` ``CudaLauncher``,
``compiler/compiler.py`` ``CompiledKernel``), identical in the three::

    compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                 launch_metadata, launch_enter_hook, launch_exit_hook, *bound_args)

``bound_args`` is *every* parameter of the kernel in signature order, constexprs and defaults
included (the JIT passes ``*bound_args.values()``); the launcher drops those whose compiled
signature entry is ``"constexpr"`` -- the constexpr parameters, and the runtime arguments the
JIT specialised into constants (an int equal to 1, None). It allocates the global / profile
scratch itself (``CudaLauncher.__call__``), and takes ``None`` for the metadata and both hooks
(the C launcher calls a hook only when it is not None).

The plan key, so that a plan is only used where the JIT would pick the same compiled kernel:

* the kernel, the current CUDA device (the JIT keys its caches by it, not by the tensors');
* per positional argument, ``native_specialize_impl(backend, arg, is_const, specialize,
  align)`` with the kernel's own per-parameter flags and the kernel's own backend: the very
  call the JIT's binder makes, so the key carries exactly the facts the compiled kernel was
  specialised on (type -- ``i32`` / ``i64`` / ``u64`` by value --, an int equal to 1, 16-byte
  alignment of a pointer, 16-divisibility of an int; with ``do_not_specialize`` only the type);
* every keyword argument (constexprs and launch options such as ``num_warps``) by value and
  type, so that ``1``, ``1.0`` and ``True`` do not share a plan.

The fast path is taken only for calls of this shape: runtime parameters positional, constexpr
parameters and launch options as keywords, a grid given as a tuple of ints. Anything else (a
callable grid, a tensor passed by keyword, a positional constexpr, an Autotuner, a kernel with
pre-run hooks) goes through ``kernel[grid]`` on every call, as do all calls where:

* Triton is not one of :data:`VERIFIED` (3.7 has not been read; any other version may change
  the launcher's arguments, and wrong arguments to a raw launcher corrupt memory silently);
* ``TRITON_INTERPRET=1`` (no compiled kernel exists); ``GPU_NN_FAST_LAUNCH=0``;
* a launch hook is installed (profilers such as proton need the JIT's launch metadata).

Plans live per kernel; the key of a call is computed by a function generated once per (kernel,
number of positional arguments), as Triton generates its binder, so a call pays one
``native_specialize_impl`` per argument and a dict look-up, and none of the JIT's option
dictionary, ``str(options)``, knob reads, used-globals loop or launch metadata. Versions are
compared on (major, minor): patch releases of a verified minor are taken to keep its launcher.

Wired launchers: activation, pooling, convolution (forward, input and weight gradients,
depthwise too), softmax / log_softmax, cross-entropy, the optimizer and clipping kernels, the
dense matmul and column sums, the per-step RNN kernels (step and projection, forward and
backward). Launchers that call ``kernel[grid]`` directly keep working as before.

Time loops (the RNN step kernels, one launch per step) go further with :func:`bind`: the key is
computed for one step, and the launcher is then called with the other steps' arguments directly,
their pointers as raw addresses (see :func:`bind` for what the caller guarantees).

What a plan deliberately does not re-check per call (the JIT does): that the globals a kernel
reads are unchanged (ours read module constants), and Triton knobs read at compile time
(``TRITON_DEBUG``, instrumentation, pipeline-inspection hooks): a plan keeps the kernel chosen
under the knobs of its first call. :func:`clear` drops every plan.
"""

from __future__ import annotations

import inspect
import os

from .. import env_switch
from . import INTERPRET
from ._compat import triton_version

# Triton versions whose JITFunction.run -> CompiledKernel.run -> CudaLauncher chain was read
# and found to take the arguments described in the module docstring.
VERIFIED = frozenset({(3, 6), (3, 8), (3, 9)})

ENV = "GPU_NN_FAST_LAUNCH"


def fast_launch_supported(version: tuple[int, int], interpret: bool, env_value: str | None) -> bool:
    """Whether the fast path may be used at all: a verified Triton version, compiled kernels
    (not the interpreter), and not switched off with ``GPU_NN_FAST_LAUNCH=0``."""
    if env_switch(ENV, env_value, read=False) is False:
        return False
    return version in VERIFIED and not interpret


_ENABLED = fast_launch_supported(triton_version(), INTERPRET, os.environ.get(ENV))

_KERNELS: dict = {}  # id(kernel) -> _KernelInfo (with its plans), or None: never a fast path
MAX_PLANS = 1024  # per kernel; plans are keyed by facts, not shapes: this bounds a pathological caller
_get_device = None  # the JIT's own driver functions, bound on the first fast launch
_get_stream = None
_HookChain = None
_runtime_knobs = None
_specialize = None
_COMPILED_TYPE = None


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the grid of a launch. ``triton.cdiv`` is a ``ConstexprFunction`` since
    Triton 3.5 (it unwraps constexpr arguments on every call), several microseconds on the host
    per call; launchers compute grids with this plain function instead."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= ``n`` (0 for n = 0), as ``triton.next_power_of_2`` without its
    ``ConstexprFunction`` wrapper (see :func:`cdiv`)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def enabled() -> bool:
    return _ENABLED


def set_enabled(flag: bool) -> bool:
    """Switch the fast path on or off (benchmarks compare both); returns the previous state.
    Switching on is refused (stays off) where :func:`fast_launch_supported` says no."""
    global _ENABLED
    prev = _ENABLED
    _ENABLED = bool(flag) and fast_launch_supported(triton_version(), INTERPRET, None)
    return prev


def clear() -> None:
    """Drop every launch plan (and the per-kernel facts)."""
    _KERNELS.clear()


def stats() -> dict:
    """Numbers of cached plans and of keys that always take the JIT path (for tests)."""
    plans = [p for info in _KERNELS.values() if info is not None for p in info.plans.values()]
    return {"plans": sum(p is not None for p in plans), "jit_only": sum(p is None for p in plans)}


class _KernelInfo:
    """Per-kernel facts the plan key needs, from the JIT's own parameter descriptions, and the
    kernel's plans."""

    __slots__ = ("kernel", "n_lead", "flags", "runtime_names", "backends", "key_fns", "plans")

    def __init__(self, kernel, params):
        self.kernel = kernel  # keeps id(kernel) unique while the entry exists
        lead = 0
        while lead < len(params) and not params[lead].is_constexpr:
            lead += 1
        self.n_lead = lead  # positional arguments beyond this would land on a constexpr
        self.flags = [binder_flags(p) for p in params[:lead]]
        self.runtime_names = frozenset(p.name for p in params if not p.is_constexpr)
        self.backends = {}
        self.key_fns = {}
        self.plans = {}

    def key_fn(self, n_args: int):
        """``key(spec, backend, device, args, kwargs)`` for calls with ``n_args`` positional
        arguments: generated once, as Triton generates its binder, so that a call pays one
        ``spec`` per argument and no loop."""
        fn = self.key_fns.get(n_args)
        if fn is None:
            names = [f"a{i}" for i in range(n_args)]
            specs = "".join(f"spec(backend, a{i}, {c}, {s}, {a}), "
                            for i, (c, s, a) in enumerate(self.flags[:n_args]))
            unpack = f"    {', '.join(names)}, = args\n" if n_args else ""
            src = (f"def key(spec, backend, device, args, kwargs):\n{unpack}"
                   f"    return (device, {specs}*kwargs.items(), *map(type, kwargs.values()))\n")
            namespace = {}
            exec(src, namespace)  # noqa: S102  (source built above from booleans and counts only)
            fn = self.key_fns[n_args] = namespace["key"]
        return fn


def binder_flags(param) -> tuple:
    """``(is_const, specialize, align)``: what Triton's binder passes ``native_specialize_impl``
    for the JIT parameter ``param`` (its ``do_not_specialize`` and
    ``do_not_specialize_on_alignment`` marks). The plan keys here and
    ``gpu_nn.benchmarks.variant_census`` both key calls so."""
    return bool(param.is_const), not param.do_not_specialize, not param.do_not_specialize_on_alignment


def kernel_info(kernel):
    """The :class:`_KernelInfo` of a ``JITFunction``, or None where the fast path never applies
    (not a plain JITFunction -- an Autotuner, an interpreted function --, or annotated runtime
    parameters, whose specialisation the binder rewrites)."""
    from triton.runtime.jit import JITFunction

    if type(kernel) is not JITFunction:
        return None
    params = list(kernel.params)
    for p in params:
        if p.is_constexpr:
            continue
        if getattr(p, "annotation_type", None):
            return None
        if p._param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            return None
    return _KernelInfo(kernel, params)


def plan_key(info: _KernelInfo, device: int, backend, args: tuple, kwargs: dict, specialize) -> tuple:
    """The plan key of one call within its kernel (see the module docstring); ``specialize`` is
    the JIT's ``native_specialize_impl``."""
    return info.key_fn(len(args))(specialize, backend, device, args, kwargs)


def call_shape_ok(info: _KernelInfo | None, grid, args: tuple, kwargs: dict) -> bool:
    """Whether a call has the shape the fast path takes (module docstring)."""
    return (info is not None and type(grid) is tuple and 1 <= len(grid) <= 3 and len(args) <= info.n_lead
            and info.runtime_names.isdisjoint(kwargs))


def bound_tail(kernel, args: tuple, kwargs: dict) -> tuple:
    """The arguments the JIT passes after the positional ones: every later parameter, in
    signature order, from the keywords or its default (what the binder's ``params`` holds)."""
    sig = inspect.signature(kernel.fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    values = list(bound.arguments.values())
    assert len(values) == len(sig.parameters)
    assert all(a is b for a, b in zip(values, args))
    return tuple(values[len(args):])


def hooks_idle(runtime_knobs, hook_chain_type) -> bool:
    """True where no launch hook is installed (a hook needs the JIT's launch metadata)."""
    for h in (runtime_knobs.launch_enter_hook, runtime_knobs.launch_exit_hook):
        if h is None:
            continue
        if type(h) is not hook_chain_type or h.calls:
            return False
    return True


def _bind_driver() -> None:
    global _get_device, _get_stream, _HookChain, _runtime_knobs, _specialize, _COMPILED_TYPE
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    active = driver.active
    _get_device = active.get_current_device
    _get_stream = active.get_current_stream
    _HookChain = knobs.HookChain
    _runtime_knobs = knobs.runtime
    _specialize = native_specialize_impl
    _COMPILED_TYPE = CompiledKernel


def _make_plan(kernel, compiled, args: tuple, kwargs: dict):
    """The plan for a call the JIT has just launched, or None where it cannot be made."""
    if type(compiled) is not _COMPILED_TYPE:
        return None
    run = compiled.run  # property: loads the module on first access (done by the launch)
    function = compiled.function
    if function is None or compiled.packed_metadata is None:
        return None
    target = getattr(compiled.metadata, "target", None)
    if target is not None and getattr(target, "backend", "cuda") != "cuda":
        return None
    return (run, function, compiled.packed_metadata, bound_tail(kernel, args, kwargs), compiled)


def _lookup(kernel, grid, args: tuple, kwargs: dict):
    """``(info, device, key, plan)`` of a call the fast path may take (``plan``: the cached one,
    None where the JIT serves that key, False where none is made yet), or None where the call
    must go through ``kernel[grid]``. The fast path must be enabled."""
    info = _KERNELS.get(id(kernel), False)
    if info is False:
        info = _KERNELS[id(kernel)] = kernel_info(kernel)
    if not call_shape_ok(info, grid, args, kwargs) or kernel.pre_run_hooks:
        return None
    if _get_device is None:
        _bind_driver()
    if not hooks_idle(_runtime_knobs, _HookChain):
        return None
    device = _get_device()
    backend = info.backends.get(device)
    if backend is None:
        backend = info.backends[device] = kernel.device_caches[device][3]
    try:
        key = plan_key(info, device, backend, args, kwargs, _specialize)
        plan = info.plans.get(key, False)
    except TypeError:  # an unhashable keyword value: no plan for this call
        return None
    return info, device, key, plan


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, through a cached launch plan where possible.

    Pass the kernel's runtime parameters positionally and its constexprs and launch options
    (``num_warps``...) as keywords; ``grid`` is a tuple of 1 to 3 ints."""
    if not _ENABLED:
        return kernel[grid](*args, **kwargs)
    found = _lookup(kernel, grid, args, kwargs)
    if found is None:
        return kernel[grid](*args, **kwargs)
    info, device, key, plan = found
    if plan is False:
        compiled = kernel[grid](*args, **kwargs)
        if type(compiled) is not _COMPILED_TYPE and hasattr(compiled, "result"):
            # a kernel still compiling (Triton 3.9's async compile mode, the tuner's compile-all
            # step, returns a future): no plan yet, the next call of the key makes it
            return compiled
        if len(info.plans) >= MAX_PLANS:
            info.plans.clear()
        info.plans[key] = _make_plan(kernel, compiled, args, kwargs)
        return compiled
    if plan is None:
        return kernel[grid](*args, **kwargs)
    run, function, metadata, tail, compiled = plan
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _get_stream(device), function, metadata,
        None, None, None, *args, *tail)
    return compiled


def bindable() -> bool:
    """Whether :func:`bind` can return a launcher here (the fast path is enabled)."""
    return _ENABLED


def bind(kernel, grid, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)`` as :func:`launch` does, and return ``go``: a
    function that launches the compiled kernel this call used again, on the same grid, stream and
    keywords, with the runtime arguments it is given (positionally, as here). None where there is
    no such kernel to call directly (the fast path off or not taken for this call); the launch
    has been made either way.

    ``go`` computes no plan key: its caller guarantees that the arguments specialise as these
    did -- the same types, every pointer with the same 16-byte alignment (but those the kernel
    says ``do_not_specialize_on_alignment``), every int the same in what the kernel's binder
    specialises (an int equal to 1, 16-divisibility; nothing but its type where the kernel says
    ``do_not_specialize``) -- and that the current device and stream stay these. Pointer
    arguments may be raw device addresses (Python ints), which the launchers of the verified
    versions take as they are (``PyLong_Check`` first in ``getPointer`` /
    ``extractPointer``: no ``data_ptr()`` call and no ``cuPointerGetAttribute`` per pointer).
    For time loops: one launch per step of the same kernel on rows of the same buffers.

    The plan key is computed once: where a plan exists, this call is itself ``go``'s first launch;
    only the first call of a key, which the JIT compiles and launches, looks its new plan up."""
    found = _lookup(kernel, grid, args, kwargs) if _ENABLED else None
    if found is None:
        kernel[grid](*args, **kwargs)
        return None
    info, device, key, plan = found
    if plan is False:
        launch(kernel, grid, *args, **kwargs)  # compiles, launches and makes the plan
        plan = info.plans.get(key)
        return _bound(plan, grid, device) if plan else None
    if plan is None:
        kernel[grid](*args, **kwargs)
        return None
    go = _bound(plan, grid, device)
    go(*args)
    return go


def _bound(plan, grid, device):
    """The launcher of ``plan`` bound to ``grid`` and the device's current stream (see :func:`bind`)."""
    run, function, metadata, tail, _ = plan
    stream = _get_stream(device)
    n = len(grid)
    g0, g1, g2 = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1

    def go(*a):
        run(g0, g1, g2, stream, function, metadata, None, None, None, *a, *tail)

    return go
