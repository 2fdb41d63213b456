"""DESIGN section 4, level 3, checked from the other side: every Triton launch the launchers
actually make is in its family's ``aot_specs()``.

``aot_specs()`` claims to list every configuration a family's launchers can produce, and
``test_compile.py`` compiles exactly that list for sm_90; nothing else checks the claim (the GRU
step forward without b_hh was launched but missing from the list, so never compiled). Here each
family's ops run on the triton backend under the interpreter -- its ``CHECK_CASES`` in float32,
float16 and bfloat16 plus extra calls that reach the options the check cases miss -- while a
recorder wrapped around every kernel's launch entry point (``kernel[grid](...)`` calls
``kernel.run(*args, grid=, warmup=, **kwargs)``, the public ``KernelInterface`` protocol of both
the JIT and the interpreter)
binds the arguments to the kernel's Python signature and notes: the kernel, every constexpr
(defaults included), the element type of every pointer (tensor) argument, and num_warps /
num_stages. Each launch must match one ``AotSpec`` of the family that defines the kernel.

The launchers pick their block sizes and warps with ``interpret`` (smaller blocks under the
interpreter); the configurations that matter are the GPU ones, so every function of the kernel
modules that takes an ``interpret`` argument is called with ``interpret=False`` here, and the
kernels are launched with the GPU block sizes (run in the interpreter, or recorded without
running where nothing reads their results: ``DRY_FAMILIES``). A launch that does not pass num_warps
/ num_stages gets Triton's CUDA defaults (4 / 3), which is what it compiles with on a GPU.

bfloat16 runs here as on the GPU (gpu-nn's exact bfloat16 in the interpreter, _compat). Conv's
TF32 precision is reached by patching ``gpu_nn.ops.conv._precision`` (it only answers "tf32" when
CUDA is present).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import sys

import numpy as np
import pytest
import torch

import gpu_nn
from gpu_nn import _backend, check
from gpu_nn.kernels import triton as ktriton
from helpers import aot_cover

pytestmark = pytest.mark.skipif(not ktriton.INTERPRET, reason="records launches through the Triton interpreter (CPU only)")

FAMILY_MODULES = {
    "activation": "gpu_nn.ops.activation",
    "conv": "gpu_nn.ops.conv",
    "dense": "gpu_nn.ops.dense",
    "pool": "gpu_nn.ops.pool",
    "rnn": "gpu_nn.ops.rnn",
    "optim": "gpu_nn.optim",
}
TRITON_DEFAULTS = {"num_warps": 4, "num_stages": 3}  # the CUDA backend's defaults for a launch that passes neither
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
        torch.bool: "*i1"}


def _kernel_modules():
    return [importlib.import_module(f"gpu_nn.kernels.triton.{f}") for f in ktriton.FAMILIES]


def _is_kernel(obj) -> bool:
    from triton.runtime import KernelInterface

    return isinstance(obj, KernelInterface) and hasattr(obj, "fn")


def _fn(kernel):
    return getattr(kernel, "fn", kernel)


def _family_of(kernel) -> str:
    return _fn(kernel).__module__.rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=None)
def _params(fn):
    """(signature, names of the constexpr parameters) of a kernel's Python function."""
    import triton.language as tl

    sig = inspect.signature(fn)
    ann = inspect.get_annotations(fn)
    cons = tuple(n for n in sig.parameters
                 if ann.get(n) is tl.constexpr or str(ann.get(n, "")).rsplit(".", 1)[-1] == "constexpr")
    return sig, cons


@dataclasses.dataclass
class Launch:
    kernel: object
    constexprs: dict
    pointers: dict
    num_warps: int
    num_stages: int
    where: str
    # the run-time parameters as Triton's JIT specialises them on a GPU: name -> type string, or
    # "constexpr" for an int equal to 1 (not do_not_specialize) or None, with its value in ``special``
    runtime: dict = dataclasses.field(default_factory=dict)
    special: dict = dataclasses.field(default_factory=dict)
    # False for a launch whose configuration is compiled per problem on first use, not listed
    # ahead of time (the pooling tiles away from TILED_AOT's problems): the front-end check only
    aot: bool = True

    @property
    def name(self):
        return _fn(self.kernel).__name__

    def key(self):
        return (self.name, tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(sorted(self.pointers.items())), self.num_warps, self.num_stages)

    def describe(self):
        cons = ", ".join(f"{k}={v!r}" for k, v in self.constexprs.items())
        ptrs = ", ".join(f"{k}:{v}" for k, v in self.pointers.items())
        return f"{self.name}[{cons}] warps={self.num_warps} stages={self.num_stages} ptrs({ptrs}) from {self.where}"


def _caller() -> str:
    """The launcher frame (first frame outside this file and triton) for the failure message: a
    walk up the frames, reading no source (``inspect.stack()`` reads every frame's source file
    and took 97 % of this file's time)."""
    fr = sys._getframe(2)
    while fr is not None:
        name = fr.f_code.co_filename
        if "test_aot_coverage" not in name and "/triton/" not in name:
            return f"{name.rsplit('/', 1)[-1]}:{fr.f_lineno} {fr.f_code.co_name}"
        fr = fr.f_back
    return "?"


def _do_not_specialize(kernel, sig) -> set:
    """The kernel's do_not_specialize parameters by name (the interpreter keeps the decorator's
    arguments in ``kwargs``; indices or names)."""
    raw = getattr(kernel, "do_not_specialize", None) or (getattr(kernel, "kwargs", None) or {}).get("do_not_specialize")
    names = list(sig.parameters)
    return {names[i] if isinstance(i, int) else i for i in (raw or ())}


def _jit_types(kernel, sig, cons, arguments) -> tuple[dict, dict]:
    """(name -> Triton type, name -> value of the ones the JIT makes constants) of a launch's
    run-time arguments, as Triton's JIT (3.x ``native_specialize_impl``) specialises them on a
    GPU: a tensor its pointer type, a bool i1, an int equal to 1 a constant (unless
    do_not_specialize), other ints i32 / i64 / u64 by value, a float fp32, None a constant."""
    dns = _do_not_specialize(kernel, sig)
    runtime, special = {}, {}
    for n, v in arguments.items():
        if n in cons:
            continue
        if isinstance(v, torch.Tensor):
            runtime[n] = _PTR[v.dtype]
        elif isinstance(v, bool):
            runtime[n] = "i1"
        elif isinstance(v, int):
            if v == 1 and n not in dns:
                runtime[n], special[n] = "constexpr", 1
            else:
                runtime[n] = "i32" if -2**31 <= v < 2**31 else ("i64" if -2**63 <= v < 2**63 else "u64")
        elif isinstance(v, float):
            runtime[n] = "fp32"
        elif v is None:
            runtime[n], special[n] = "constexpr", None
        else:
            runtime[n] = f"? {type(v).__name__}"
    return runtime, special


class Recorder:
    """Wraps ``run`` of every kernel object in the kernel modules; ``launches`` collects them."""

    def __init__(self, monkeypatch):
        self.launches: list[Launch] = []
        self.dry = False  # record without running the kernel (large shapes whose results nobody reads)
        self.aot = True  # launches recorded now are to be in aot_specs (see Launch.aot)
        seen = set()
        for mod in _kernel_modules():
            for obj in vars(mod).values():
                if _is_kernel(obj) and id(obj) not in seen:
                    seen.add(id(obj))
                    monkeypatch.setattr(obj, "run", self._wrap(obj, obj.run))

    def _wrap(self, kernel, run):
        sig, cons = _params(_fn(kernel))

        def recorder(*args, grid, warmup, **kwargs):
            opts = {k: kwargs.get(k, d) for k, d in TRITON_DEFAULTS.items()}
            call_kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
            extra = set(kwargs) - set(call_kwargs) - {"num_warps", "num_stages"}
            assert not extra, f"{_fn(kernel).__name__}: launch options this test does not check: {sorted(extra)}"
            bound = sig.bind(*args, **call_kwargs)
            bound.apply_defaults()
            constexprs = {n: bound.arguments[n] for n in cons}
            pointers = {n: _PTR[v.dtype] for n, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
            runtime, special = _jit_types(kernel, sig, cons, bound.arguments)
            if not warmup:
                self.launches.append(Launch(kernel, constexprs, pointers, opts["num_warps"], opts["num_stages"], _caller(),
                                            runtime, special, self.aot))
            if self.dry and _fn(kernel).__name__ not in READ_BACK:
                return None
            return run(*args, grid=grid, warmup=warmup, **kwargs)

        return recorder

    @contextlib.contextmanager
    def per_problem(self):
        """Launches of configurations compiled per problem (Launch.aot False)."""
        self.aot = False
        try:
            yield
        finally:
            self.aot = True

    @contextlib.contextmanager
    def dry_run(self):
        self.dry = True
        try:
            yield
        finally:
            self.dry = False


def _force_gpu_heuristics(monkeypatch):
    """Every kernel-module function with an ``interpret`` parameter runs as on a GPU."""
    for mod in _kernel_modules():
        for name, obj in list(vars(mod).items()):
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__ and "interpret" in inspect.signature(obj).parameters:
                monkeypatch.setattr(mod, name, _gpu_variant(obj))


def _gpu_variant(fn):
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.arguments["interpret"] = False
        return fn(*bound.args, **bound.kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# matching


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, (bool, int)) and isinstance(b, (bool, int)) and int(a) == int(b)
    return type(a) is type(b) and a == b


def _mismatches(launch: Launch, spec) -> list[str]:
    """What differs between a launch and a spec of the same kernel (empty: it matches)."""
    sig, cons = _params(_fn(launch.kernel))
    out = []
    for n in cons:
        default = sig.parameters[n].default
        want = spec.constexprs.get(n, default)
        if want is inspect.Parameter.empty:
            out.append(f"{n}: spec lacks it (launch {launch.constexprs[n]!r})")
        elif not _same(launch.constexprs[n], want):
            out.append(f"{n}: launch {launch.constexprs[n]!r} vs spec {want!r}")
    spec_ptrs = {n: t for n, t in spec.signature.items() if str(t).startswith("*")}
    for n in sorted(set(spec_ptrs) | set(launch.pointers)):
        if launch.pointers.get(n) != spec_ptrs.get(n):
            out.append(f"{n}: launch {launch.pointers.get(n, 'not a tensor')} vs spec {spec_ptrs.get(n, 'not a pointer')}")
    for opt in ("num_warps", "num_stages"):
        if getattr(launch, opt) != getattr(spec, opt):
            out.append(f"{opt}: launch {getattr(launch, opt)} vs spec {getattr(spec, opt)}")
    return out


def _kernel_specs(launch: Launch, specs_by_family) -> list:
    """The specs of ``launch``'s kernel (in its family's list)."""
    return [s for s in specs_by_family[_family_of(launch.kernel)] if _fn(s.kernel) is _fn(launch.kernel)]


def unmatched(launches, specs_by_family) -> list[str]:
    """One report line per distinct launch that no spec of its kernel's family matches."""
    report, done = [], set()
    for la in launches:
        if not la.aot or la.key() in done:
            continue
        done.add(la.key())
        fam = _family_of(la.kernel)
        diffs = [(_mismatches(la, s), s) for s in _kernel_specs(la, specs_by_family)]
        if any(not d for d, _ in diffs):
            continue
        line = f"[{fam}] {la.describe()}"
        if diffs:
            d, s = min(diffs, key=lambda x: len(x[0]))
            line += f"\n    nearest spec '{s.label}': " + "; ".join(d)
        else:
            line += "\n    no spec of this kernel at all"
        report.append(line)
    return report


def _all_specs():
    from gpu_nn.kernels.triton import _aot

    return {f: _aot.family_specs(f) for f in ktriton.FAMILIES}


# ----------------------------------------------------------------------------------------------
# exercising the ops


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _run_check_cases(family, rng):
    for fam, case in check.collect_cases():
        if fam != FAMILY_MODULES[family].rsplit(".", 1)[-1] or "triton" not in case.backends:
            continue
        for dtype in DTYPES:
            if dtype not in case.dtypes:
                continue
            if case.run is not None:
                case.run("triton", "cpu", dtype, rng)
            else:
                args, kwargs = case.make(rng)
                with _backend.backend("triton"):
                    check.forward_backward(case.fn, check._convert(args, dtype, "cpu"),
                                           check._convert(kwargs, dtype, "cpu"), 0)


def _t(rng, *shape, dtype, grad=True, scale=1.0):
    t = torch.from_numpy(rng.standard_normal(shape) * scale).to(dtype)
    return t.requires_grad_(grad)


def _fwd_bwd(out):
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor) and o.requires_grad]
    torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])


def extra_activation(rng, monkeypatch, rec):
    pass  # CHECK_CASES run relu / sigmoid / tanh forward and backward in both dtypes


def extra_conv(rng, monkeypatch, rec):
    from gpu_nn.ops import conv as ops

    F = gpu_nn.functional
    with _backend.backend("triton"):
        for dt in DTYPES:
            # more than 32 output channels on a short GEMM: fp32 "small", half "medium" (fwd, wgrad)
            _fwd_bwd(F.conv2d(_t(rng, 1, 3, 5, 4, dtype=dt), _t(rng, 33, 3, 2, 2, dtype=dt), _t(rng, 33, dtype=dt)))
            # more than 32 input channels per group: dgrad "medium"
            _fwd_bwd(F.conv2d(_t(rng, 1, 33, 4, 3, dtype=dt), _t(rng, 3, 33, 1, 2, dtype=dt), None, padding=1))
            # the "large" tiles need >= 128 * 264 GEMM rows: 1 x 184 x 184 pixels with 1x1 taps (two input channels: one would be depthwise). The
            # dgrad-only call keeps a bias gradient: with only grad_input wanted, conv_backward returns
            # one empty tensor as both grad_weight and grad_bias, which the custom op rejects as aliasing
            with rec.dry_run():  # recorded, not interpreted: thousands of programs whose output nobody reads
                F.conv2d(_t(rng, 1, 2, 184, 184, dtype=dt, grad=False), _t(rng, 33, 2, 1, 1, dtype=dt, grad=False))
                _fwd_bwd(F.conv2d(_t(rng, 1, 33, 184, 184, dtype=dt), _t(rng, 1, 33, 1, 1, dtype=dt, grad=False),
                                  _t(rng, 1, dtype=dt)))
            # depthwise with a channel multiplier, no bias, activation
            _fwd_bwd(F.conv2d(_t(rng, 2, 3, 6, 5, dtype=dt), _t(rng, 6, 1, 3, 3, dtype=dt), None, groups=3,
                              activation="tanh"))
    # float32 with TF32 allowed (the op only says "tf32" where CUDA is present)
    orig = ops._precision
    monkeypatch.setattr(ops, "_precision", lambda dtype: "tf32" if dtype == torch.float32 else orig(dtype))
    with _backend.backend("triton"):
        dt = torch.float32
        _fwd_bwd(F.conv2d(_t(rng, 2, 3, 7, 6, dtype=dt), _t(rng, 5, 3, 3, 2, dtype=dt), _t(rng, 5, dtype=dt), padding=1,
                          activation="relu"))
        _fwd_bwd(F.conv2d(_t(rng, 1, 3, 5, 4, dtype=dt), _t(rng, 33, 3, 2, 2, dtype=dt), _t(rng, 33, dtype=dt)))
        _fwd_bwd(F.conv2d(_t(rng, 1, 33, 4, 3, dtype=dt), _t(rng, 3, 33, 1, 2, dtype=dt), None, padding=1))
        with rec.dry_run():
            F.conv2d(_t(rng, 1, 2, 184, 184, dtype=dt, grad=False), _t(rng, 33, 2, 1, 1, dtype=dt, grad=False))
            _fwd_bwd(F.conv2d(_t(rng, 1, 33, 184, 184, dtype=dt), _t(rng, 1, 33, 1, 1, dtype=dt, grad=False),
                              _t(rng, 1, dtype=dt)))
    # the vmap folds' grouped launches (tests/test_double_backward.py): per-sample weight
    # gradients (B groups over a placeholder weight of no memory), an ensemble's stacked weights
    # (a shared input: one convolution of B O output channels; a batched one: B groups), and
    # linear layers as a kernel-size-1 conv1d of B groups (one image of length M: N = 1, ones
    # the JIT makes constants)
    from torch.func import grad, vmap

    with _backend.backend("triton"):
        for dt in DTYPES:
            w, b, xs = _t(rng, 4, 2, 3, 3, dtype=dt, grad=False), _t(rng, 4, dtype=dt, grad=False), _t(rng, 3, 1, 2, 6, 6, dtype=dt, grad=False)
            vmap(grad(lambda W, c, u: F.conv2d(u, W, c, padding=1, activation="tanh").sum(), argnums=(0, 1)),
                 in_dims=(None, None, 0))(w, b, xs)
            ws, bs = _t(rng, 3, 4, 2, 3, 3, dtype=dt, grad=False), _t(rng, 3, 4, dtype=dt, grad=False)
            for dx, x in ((None, xs[0]), (0, xs)):
                vmap(grad(lambda u, W, c: F.conv2d(u, W, c, stride=2).sum(), argnums=(0, 1, 2)), in_dims=(dx, 0, 0))(x, ws, bs)
                vmap(grad(lambda u, W, c: F.conv2d(u, W, c).sum(), argnums=(1, 2)), in_dims=(dx, 0, 0))(x, ws, bs)
            wl, bl = _t(rng, 3, 5, 7, dtype=dt, grad=False), _t(rng, 3, 5, dtype=dt, grad=False)
            for dx, x in ((None, _t(rng, 6, 7, dtype=dt, grad=False)), (0, _t(rng, 3, 6, 7, dtype=dt, grad=False))):
                vmap(grad(lambda u, W, c: F.linear(u, W, c, activation="relu").sum(), argnums=(0, 1, 2)),
                     in_dims=(dx, 0, 0))(x, wl, bl)
            vmap(grad(lambda W, c, u: F.linear(u, W, c).sum(), argnums=(0, 1)), in_dims=(None, None, 0))(
                wl[0], bl[0], _t(rng, 3, 6, 7, dtype=dt, grad=False))
    # the via-channels_last copies both ways: a plane of 28x28 (every int a multiple of 16, as the
    # bench's problems launch them) and an odd one
    from gpu_nn.kernels.triton import conv as kc

    for dt in DTYPES:
        for shape in ((2, 32, 28, 28), (1, 5, 3, 7)):
            x = _t(rng, *shape, dtype=dt, grad=False)
            kc.layout_copy(torch.empty(shape, dtype=dt), kc.layout_copy(kc._nhwc_empty(x), x))


def extra_dense(rng, monkeypatch, rec):
    F = gpu_nn.functional
    with _backend.backend("triton"):
        for dt in DTYPES:
            for act in ("relu", "sigmoid", "tanh"):  # fused activation without a bias
                _fwd_bwd(F.linear(_t(rng, 3, 7, dtype=dt), _t(rng, 5, 7, dtype=dt), None, activation=act))
            # every softmax block: each single-block bucket and the looped path
            for n in (5, 129, 513, 2049, 8193):
                for fn in (F.softmax, F.log_softmax):
                    _fwd_bwd(fn(_t(rng, 2, n, dtype=dt), dim=-1))
            # every cross_entropy block (C above the largest loops over it), index / probability
            # targets with and without weight, the probability target's own gradient
            for C in (7, 257, 1025, 2049):
                x = _t(rng, 3, C, dtype=dt)
                w = torch.rand(C, dtype=torch.float64).to(dt) + 0.5
                idx = torch.from_numpy(rng.integers(0, C, 3))
                _fwd_bwd(F.cross_entropy(x, idx))
                _fwd_bwd(F.cross_entropy(x, idx, weight=w, label_smoothing=0.1))
                if C == 7:  # the finish of a 'sum' (the check cases reach 'mean' and 'none')
                    _fwd_bwd(F.cross_entropy(x, idx, weight=w, reduction="sum"))
                prob = torch.softmax(torch.randn(3, C, dtype=torch.float64), -1).to(dt)
                for wt in (None, w):
                    _fwd_bwd(F.cross_entropy(x, prob, weight=wt))
                    _fwd_bwd(F.cross_entropy(x, prob.clone().requires_grad_(True), weight=wt))
            # the middle-dim kernels ([N, C, d...] logits as they lie): every option
            x = _t(rng, 2, 5, 40, dtype=dt)
            w = torch.rand(5, dtype=torch.float64).to(dt) + 0.5
            idx = torch.from_numpy(rng.integers(0, 5, (2, 40)))
            prob = torch.softmax(torch.randn(2, 5, 40, dtype=torch.float64), 1).to(dt)
            for wt in (None, w):
                for red in ("mean", "none"):
                    _fwd_bwd(F.cross_entropy(x, idx, weight=wt, reduction=red))
                _fwd_bwd(F.cross_entropy(x, prob, weight=wt))
                _fwd_bwd(F.cross_entropy(x, prob.clone().requires_grad_(True), weight=wt, reduction="none"))
    # float32 matmuls with TF32 allowed, every activation, with and without bias
    from gpu_nn.ops import dense as ops

    monkeypatch.setattr(ops, "_tf32_allowed", lambda: True)
    with _backend.backend("triton"):
        dt = torch.float32
        for act in (None, "relu", "sigmoid", "tanh"):
            for bias in (True, False):
                b = _t(rng, 5, dtype=dt) if bias else None
                _fwd_bwd(F.linear(_t(rng, 3, 7, dtype=dt), _t(rng, 5, 7, dtype=dt), b, activation=act))
    # the bias gradient's column sum in row ranges (float32 partial sums, then their sum): 600 rows
    with _backend.backend("triton"):
        for dt in DTYPES:
            _fwd_bwd(F.linear(_t(rng, 600, 7, dtype=dt), _t(rng, 5, 7, dtype=dt), _t(rng, 5, dtype=dt)))


def extra_pool(rng, monkeypatch, rec):
    F = gpu_nn.functional
    with _backend.backend("triton"):
        for dt in DTYPES:
            x = _t(rng, 2, 3, 9, 8, dtype=dt)
            _fwd_bwd(F.max_pool2d(x, 3, 2, 1, return_indices=True))
            _fwd_bwd(F.min_pool2d(x, 2, 1, 0, 2, True, True))
            _fwd_bwd(F.avg_pool2d(x, 3, 2, 1, True, False, 4))
            y = _t(rng, 2, 3, 11, dtype=dt)
            _fwd_bwd(F.max_pool1d(y, 3, 2, 1, 1, False, True))
            _fwd_bwd(F.min_pool1d(y, 3))
            _fwd_bwd(F.avg_pool1d(y, 4, 3, 2, True, False))
    # the tiled forms a measuring chooser may pick on a GPU (the heuristic here is the flat one),
    # compiled per problem (their tiles and windows are constants): front-end check only. The
    # plane tiles in 1-d and 2-d (a 1-d pooling is [N, C, 1, L]: H = OH = 1, which the JIT
    # makes constants), the channels_last tiles for a channels_last input
    from gpu_nn.kernels.triton import pool as kp
    from gpu_nn.ops import pool as P

    heuristic = P._chooser
    for form in (kp.TILE, kp.CLTILE):
        def choose(op, key, cands, run, default, _form=form, **_):
            return next((c for c in cands if c[0] == _form), default)
        monkeypatch.setattr(P, "_chooser", lambda device, _c=choose: _c)
        with _backend.backend("triton"), rec.per_problem():
            for dt in DTYPES:
                x = _t(rng, 2, 3, 9, 8, dtype=dt)
                xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
                for inp in (x, xc):
                    _fwd_bwd(F.max_pool2d(inp, 3, 2, 1, return_indices=True))
                    _fwd_bwd(F.avg_pool2d(inp, 3, 2, 1, True, False))
                y = _t(rng, 2, 3, 11, dtype=dt)
                _fwd_bwd(F.max_pool1d(y, 3, 2, 1, 1, False, True))
                _fwd_bwd(F.min_pool1d(y, 3))
                _fwd_bwd(F.avg_pool1d(y, 4, 3, 2, True, False))
    monkeypatch.setattr(P, "_chooser", heuristic)


def _seq_params(rng, mode, L, D, I, H, bias, dt):
    G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[mode] * H
    ps = []
    for layer in range(L):
        for _ in range(D):
            ps += [_t(rng, G, I if layer == 0 else D * H, dtype=dt, scale=H ** -0.5), _t(rng, G, H, dtype=dt, scale=H ** -0.5)]
            if bias:
                ps += [_t(rng, G, dtype=dt, scale=H ** -0.5), _t(rng, G, dtype=dt, scale=H ** -0.5)]
    return ps


def _run_seq(rng, mode, dt, T, B, I, H, L, bi, bias, lengths=None, dropout=0.0, backward=True):
    from gpu_nn.ops import rnn as ops

    D = 2 if bi else 1
    x = _t(rng, T, B, I, dtype=dt)
    h0 = _t(rng, L * D, B, H, dtype=dt)
    hx = (h0, _t(rng, L * D, B, H, dtype=dt)) if mode == "lstm" else h0
    ps = _seq_params(rng, mode, L, D, I, H, bias, dt)
    kw = {"lengths": torch.tensor(lengths)} if lengths is not None else {}
    out = ops.SEQ_FUNCS[mode](x, hx, ps, bias, L, dropout, dropout > 0, bi, False, **kw)
    if backward:
        _fwd_bwd(out)


def _rnn_sweep(rng, dt, persistent, cells=True):
    """Sequences (the persistent kernel only changes the forward: no backward then) and cells.
    The step kernels have one tile for every batch size (kernels/triton/rnn.py ``step_blocks``)
    and the matmul one per dot code, so small shapes reach every configuration."""
    from gpu_nn.ops import rnn as ops

    for mode in ("rnn_tanh", "rnn_relu", "lstm", "gru"):
        # no biases, packed lengths, dropout between two layers (float32 inner-layer outputs and
        # the dropout masks), one direction
        _run_seq(rng, mode, dt, 3, 3, 4, 5, 2, False, False, lengths=(3, 1, 2), dropout=0.5, backward=not persistent)
        # biases, no lengths, two directions, no dropout
        _run_seq(rng, mode, dt, 2, 2, 3, 5, 2, True, True, backward=not persistent)
        if persistent or not cells:
            continue
        # cells with and without biases
        B, I, H = 3, 4, 5
        G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[mode] * H
        for bias in (True, False):
            h = _t(rng, B, H, dtype=dt)
            hx = (h, _t(rng, B, H, dtype=dt)) if mode == "lstm" else h
            bs = (_t(rng, G, dtype=dt), _t(rng, G, dtype=dt)) if bias else (None, None)
            _fwd_bwd(ops.CELL_FUNCS[mode](_t(rng, B, I, dtype=dt), hx, _t(rng, G, I, dtype=dt), _t(rng, G, H, dtype=dt), *bs))


def extra_rnn(rng, monkeypatch, rec):
    from gpu_nn.ops import rnn as ops

    with _backend.backend("triton"):
        # torch's default: float32 recurrent layers in TF32 (cudnn.allow_tf32 on)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
        for dt in DTYPES:
            monkeypatch.setenv(ops.PERSISTENT_ENV, "0")
            _rnn_sweep(rng, dt, False)
            monkeypatch.setenv(ops.PERSISTENT_ENV, "1")  # the persistent forward wherever legal (B <= 16)
            _rnn_sweep(rng, dt, True)
        # TF32 off: float32 with the exact dot code (DOT_DT 0), otherwise the launches above (half
        # layers do not read the flag). One short two-layer sequence per mode with dropout and
        # lengths, no biases, forward and backward, the GRU also with b_hh; then the persistent
        # forward (whose warps depend on the dot code)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        for env, backward in (("0", True), ("1", False)):
            monkeypatch.setenv(ops.PERSISTENT_ENV, env)
            for mode in ("rnn_tanh", "rnn_relu", "lstm", "gru"):
                for bias in ((False, True) if mode == "gru" else (False,)):
                    _run_seq(rng, mode, torch.float32, 2, 2, 3, 4, 2, False, bias, lengths=(2, 1), dropout=0.5,
                             backward=backward)
    # the bias gradients' column sums over T * N >= 512 rows: in row ranges, every mode and dtype
    from gpu_nn.kernels.triton import rnn as kr

    x, x2 = (torch.from_numpy(rng.standard_normal((600, 9))).float() for _ in range(2))
    for dt in DTYPES:
        kr.colsum(x, torch.empty(9, dtype=dt))
        kr.colsum(x, torch.empty(9, dtype=dt), torch.empty(9, dtype=dt))
        kr.colsum(x, torch.empty(9, dtype=dt), torch.empty(9, dtype=dt), x2)


def _optimizer_steps(configs, shapes, dt):
    from gpu_nn import optim

    for (name, kw), tensor_lr in [(c, t) for c in configs for t in (False, True)]:
        ps = [torch.nn.Parameter(torch.randn(s, dtype=dt)) for s in shapes]
        if tensor_lr:
            # (foreach=True takes a tensor lr only with capturable=True, as torch's Adam)
            kw = {**kw, "lr": torch.tensor(kw.get("lr", 1.0)), **({"capturable": True} if kw.get("foreach") else {})}
        opt = getattr(optim, name)(ps, **kw)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, dtype=dt)
            opt.step()


def extra_optim(rng, monkeypatch, rec):
    from gpu_nn.nn.utils import clip_grad_norm_

    configs = [
        ("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, weight_decay=0.1, maximize=True)),
        ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1)), ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
        ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
        ("Adagrad", dict(lr=0.1)), ("Adagrad", dict(lr=0.1, weight_decay=0.1, maximize=True)),
        ("Adadelta", dict()), ("Adadelta", dict(weight_decay=0.1, maximize=True)),
        *[("RMSprop", dict(lr=0.01, weight_decay=wd, centered=c, momentum=m))
          for wd in (0.0, 0.1) for c in (False, True) for m in (0.0, 0.9)],
        *[(cls, dict(lr=0.01, weight_decay=wd, amsgrad=a, maximize=a))
          for cls in ("Adam", "AdamW") for wd in (0.0, 0.1) for a in (False, True)],
        ("Adam", dict(lr=0.01, foreach=True)), ("Adam", dict(lr=0.01, foreach=False)),
    ]
    shapes = [(5, 3), (7,), (1,)]
    with _backend.backend("triton"):
        for dt in DTYPES:
            # every configuration with the lr by value and as a float32 tensor the kernels read
            # (LR_PTR); dry: the steps read nothing back
            with rec.dry_run():
                _optimizer_steps(configs, shapes, dt)
            for norm in (2.0, float("inf"), 3.0, 1.0):
                for nonfinite in (False, True):
                    ps = [torch.nn.Parameter(torch.randn(s, dtype=dt)) for s in shapes]
                    for p in ps:
                        p.grad = torch.randn(p.shape, dtype=dt)
                    clip_grad_norm_(ps, 0.5, norm, error_if_nonfinite=nonfinite)
            clip_grad_norm_([torch.nn.Parameter(torch.randn(3, dtype=dt))], 1.0)  # no gradient at all


# the kernels whose results host code reads (cross-entropy's target check, read back before the
# loss): a dry run still runs these, on the small inputs their callers check
READ_BACK = {"_ce_target_check_kernel"}
# the families recorded dry (every launch but READ_BACK's): their launches wait on no other value
# their kernels computed. Not optim: its check cases compare the optimizers' steps with the
# reference, and clip_grad_norm_(error_if_nonfinite=True) reads its norm; its extra optimizer
# configurations (most of its launches, which read nothing back) run dry inside extra_optim
DRY_FAMILIES = ("rnn", "conv", "pool", "activation", "dense")
EXTRAS = {"activation": extra_activation, "conv": extra_conv, "dense": extra_dense, "pool": extra_pool,
          "rnn": extra_rnn, "optim": extra_optim}


def retyped(launches, specs_by_family) -> set:
    """Keys of the launches whose run-time scalars the JIT types otherwise than the spec they
    match (an int argument of 0 is i32 where the spec says i64: the optimizers pass a float's
    bits as an int, 0 for 0.0): a specialisation test_compile.py never compiles."""
    out = set()
    for la in launches:
        if not la.aot or la.key() in out:
            continue
        spec = next((s for s in _kernel_specs(la, specs_by_family) if not _mismatches(la, s)), None)
        if spec is None:
            continue  # (unmatched() reports it)
        for n, t in la.runtime.items():
            want = spec.signature.get(n)
            if t != "constexpr" and not str(t).startswith("*") and want is not None and str(want) != str(t):
                out.add(la.key())
                break
    return out


def specialised_rows(launches, retyped_keys=frozenset()) -> list[dict]:
    """One row per distinct launch with a run-time argument the JIT makes a constant (an int
    equal to 1, None), or typed otherwise than its spec (``retyped_keys``): what
    ``_aot.frontend`` compiles (test_compile.py compiles the specs' own types)."""
    rows, seen = [], set()
    for la in launches:
        if not la.special and la.key() not in retyped_keys:
            continue
        fn = _fn(la.kernel)
        sig, cons = _params(fn)
        signature = {n: ("constexpr" if n in cons else la.runtime[n]) for n in sig.parameters}
        constexprs = {**la.constexprs, **la.special}
        key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items(), key=lambda kv: kv[0])),
               la.num_warps, la.num_stages)
        if key in seen:
            continue
        seen.add(key)
        rows.append({"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
                     "num_warps": la.num_warps, "num_stages": la.num_stages, "where": la.where})
    return rows


def frontend_failures(rows, tmp_path) -> list:
    """``_aot.frontend`` on ``rows`` in a process without TRITON_INTERPRET (only compiled
    kernels have a front end); the failed rows."""
    import json
    import pickle

    from helpers import run_uninterpreted

    path = tmp_path / "specialised.pkl"
    path.write_bytes(pickle.dumps([{k: v for k, v in r.items() if k != "where"} for r in rows]))
    proc = run_uninterpreted(["-m", "gpu_nn.kernels.triton._aot", "--frontend", path], timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert lines, f"no report from the front-end run (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    failed = json.loads(lines[-1])
    assert (proc.returncode != 0) == bool(failed), (proc.returncode, proc.stderr[-2000:])
    return failed


@pytest.mark.parametrize("family", list(FAMILY_MODULES))
def test_every_launch_is_in_aot_specs(family, monkeypatch, tmp_path):
    rng = np.random.default_rng(abs(hash(family)) % 2**32)
    rec = Recorder(monkeypatch)
    _force_gpu_heuristics(monkeypatch)
    # where no host code reads a kernel's results, which kernels launch, and how, depends on shapes,
    # dtypes, layouts and options only: recorded without being interpreted, such a family records
    # the same launches (compared run against run for conv, pool, dense and optim's extra steps)
    # in seconds instead of 20 s of interpreting (the recurrent family's took a minute and a
    # half); what the kernels compute is checked by the families' own tests
    with rec.dry_run() if family in DRY_FAMILIES else contextlib.nullcontext():
        _run_check_cases(family, rng)
        EXTRAS[family](rng, monkeypatch, rec)
    assert rec.launches, f"{family}: no Triton launch recorded"
    specs = _all_specs()
    report = unmatched(rec.launches, specs)
    distinct = len({la.key() for la in rec.launches})
    assert not report, (f"{family}: {len(report)} of {distinct} distinct launch configurations are missing from "
                        "aot_specs() (never compiled for sm_90):\n" + "\n".join(report))
    # and every launch goes through Triton's front end for sm_90 as the JIT specialises its
    # arguments on a GPU: the AOT specs type run-time ints as i32, the JIT makes an int equal to 1
    # a constant (the H200 at 09f2311: every 1-d tiled pooling failed to compile there, a helper
    # calling .to on such a constant, which neither the interpreter nor the specs met)
    rows = covered(specialised_rows(rec.launches, retyped(rec.launches, specs)), aot_cover())
    failed = frontend_failures(rows, tmp_path) if rows else []
    assert not failed, (f"{family}: {len(failed)} of {len(rows)} specialised launches fail Triton's front end for "
                        "sm_90:\n" + "\n".join(f"{r['kernel']} from {next(x['where'] for x in rows if x['kernel'] == r['kernel'])}: "
                                                 f"{r['error'][-600:]}" for r in failed[:5]))


def covered(rows, cover: str) -> list:
    """The specialised launches ``rows`` the front-end check runs, under the sm_90 checks' cover
    switch (helpers.aot_cover, as test_compile.py's): all of them with ``all``; else, kernel by
    kernel, a subset in which every value (``each``, the default) or every pair of values
    (``pairs``) of the factors that make a compiled form -- each constexpr, the constants the JIT
    makes of ints equal to 1 and of None, each argument's type, warps, stages -- is met
    (``_aot.covering``, as test_compile.py chooses the specs it compiles all the way). A front
    end takes about 80 ms a launch on CI's machine; with all 853 of the six families' launches
    these six tests took 83 worker-seconds of a clean-clone run, with the each-cover's 157 29
    (42a36f9, 3aa49ed). A failure that needs two factors
    together waits for a pairs (440 launches) or full run, which run at every stop that touches a
    kernel; the H200's (every 1-d tiled pooling: a helper calling ``.to`` on such a constant)
    needed one."""
    if cover == "all":
        return rows
    from gpu_nn.kernels.triton import _aot

    specs = [_aot.AotSpec(r["kernel"], r["signature"], r["constexprs"], r["num_warps"], r["num_stages"]) for r in rows]
    return [r for r, keep in zip(rows, _aot.covering(specs, order={"each": 1, "pairs": 2}[cover])) if keep]


def test_front_end_cover_meets_every_value_of_the_specialised_launches():
    """``covered`` keeps, kernel by kernel, launches in which every factor value (``each``) or
    pair of values (``pairs``) of the whole list is met, fewer than all; ``all`` keeps all."""
    rows = [{"kernel": k, "signature": {"x_ptr": t, "n": "constexpr" if one else "i32", "A": "constexpr"},
             "constexprs": {"A": a, **({"n": 1} if one else {})}, "num_warps": w, "num_stages": 3}
            for k in ("k1", "k2") for t in ("*fp32", "*bf16") for one in (False, True) for a in (16, 32, 64) for w in (4, 8)]

    def values(rs):
        return {(r["kernel"], name, repr(v)) for r in rs
                for name, v in [*r["signature"].items(), *r["constexprs"].items(), ("warps", r["num_warps"])]}

    def pairs(rs):
        out = set()
        for r in rs:
            f = sorted((n, repr(v)) for n, v in [*r["signature"].items(), *r["constexprs"].items(), ("w", r["num_warps"])])
            out |= {(r["kernel"], a, b) for i, a in enumerate(f) for b in f[i + 1:]}
        return out

    each, two = covered(rows, "each"), covered(rows, "pairs")
    assert covered(rows, "all") == rows
    assert values(each) == values(rows) and len(each) < len(two) < len(rows)
    assert pairs(two) == pairs(rows) and pairs(each) != pairs(rows)
    assert all(r in rows for r in two) and {r["kernel"] for r in each} == {"k1", "k2"}


def test_checker_reports_a_launch_missing_from_the_specs(monkeypatch):
    """The check can fail: with one configuration dropped from aot_specs(), the launch that needs
    it is reported (with its nearest spec), and the full list accepts the same launch."""
    from gpu_nn.kernels.triton import activation as ka

    rec = Recorder(monkeypatch)
    _force_gpu_heuristics(monkeypatch)
    with _backend.backend("triton"):
        _fwd_bwd(gpu_nn.functional.relu(torch.randn(3, 5, dtype=torch.float32, requires_grad=True)))
    assert {la.name for la in rec.launches} == {"_act_fwd_kernel", "_act_bwd_kernel"}
    specs = _all_specs()
    assert unmatched(rec.launches, specs) == []
    dropped = [s for s in specs["activation"] if s.kernel is ka._act_fwd_kernel and s.label == "relu fp32"]
    assert len(dropped) == 1
    specs["activation"] = [s for s in specs["activation"] if s is not dropped[0]]
    report = unmatched(rec.launches, specs)
    assert len(report) == 1 and "_act_fwd_kernel[ACT=1" in report[0] and "nearest spec" in report[0], report
    # a pointer type of another dtype, or other warps, is a different compiled kernel too
    fwd = next(la for la in rec.launches if la.name == "_act_fwd_kernel")
    assert _mismatches(fwd, dropped[0]) == []
    other = dataclasses.replace(dropped[0], signature={**dropped[0].signature, "y_ptr": "*fp16"})
    assert _mismatches(fwd, other) == ["y_ptr: launch *fp32 vs spec *fp16"]
    assert len(unmatched(rec.launches, {**specs, "activation": specs["activation"] + [other]})) == 1
    assert _mismatches(fwd, dataclasses.replace(dropped[0], num_warps=8)) == ["num_warps: launch 4 vs spec 8"]
    assert _mismatches(fwd, dataclasses.replace(dropped[0], constexprs={"ACT": 1, "BLOCK": 2048})) == [
        "BLOCK: launch 1024 vs spec 2048"]
