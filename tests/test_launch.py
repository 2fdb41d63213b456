"""Cached Triton launch plans (kernels/triton/_launch.py, issue 14 item 1).

On the CPU the fast path cannot run (no compiled kernel, no CUDA launcher to build), so the plan
logic is checked against the JIT's own binder: a real ``JITFunction`` whose ``run`` is replaced by
a stand-in that binds the arguments with Triton's binder (``create_function_from_signature``),
picks a "compiled kernel" per JIT cache key, and calls its launcher the way ``JITFunction.run``
does. Every call through :func:`launch` must reach the compiled kernel the JIT would pick for
those arguments, with exactly the launcher arguments the JIT would pass. The GPU tests compare
the fast path with the JIT path bitwise on every wired kernel, and under CUDA graph capture.
"""

import types

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

import gpu_nn
from gpu_nn.kernels.triton import INTERPRET
from gpu_nn.kernels.triton import _launch as L

GPU = torch.cuda.is_available() and not INTERPRET
needs_gpu = pytest.mark.skipif(not GPU, reason="the fast path launches compiled kernels: needs a CUDA GPU")
STREAM = 0xC0FFEE


# ----------------------------------------------------------------------------- gating (pure)

@pytest.mark.parametrize("version, ok", [((3, 5), False), ((3, 6), True), ((3, 7), False), ((3, 8), True),
                                         ((3, 9), True), ((3, 10), False), ((4, 0), False)])
def test_version_gate(version, ok):
    assert L.fast_launch_supported(version, False, None) is ok
    assert L.fast_launch_supported(version, True, None) is False  # the interpreter: never
    for off in ("0", "false", "OFF", " no "):
        assert L.fast_launch_supported(version, False, off) is False
    assert L.fast_launch_supported(version, False, "1") is ok


def test_disabled_under_the_interpreter():
    if not INTERPRET:
        pytest.skip("only meaningful where TRITON_INTERPRET=1")
    assert not L.enabled()
    prev = L.set_enabled(True)
    try:
        assert not L.enabled()  # switching on is refused where unsupported
    finally:
        L.set_enabled(prev)


# ----------------------------------------------------------------------------- plan logic (CPU)

def _k_plain(x_ptr, y_ptr, n, m, f, flag, BLOCK: tl.constexpr, ACT: tl.constexpr = 0):
    pass


def _k_dns(a_ptr, lr_b, n, tail=7, BLOCK: tl.constexpr = 8):
    pass


class _FakeCompiled:
    def __init__(self, key):
        self.key = key
        self.function = object()
        self.packed_metadata = (4, 1, 0)
        self.metadata = types.SimpleNamespace(target=types.SimpleNamespace(backend="cuda"))
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


class _FakeJit:
    """Stands in for ``JITFunction.run``: Triton's binder, a cache keyed like the JIT's, and the
    launcher call ``JITFunction.run`` makes (hooks idle: None)."""

    def __init__(self, kernel):
        self.binder = create_function_from_signature(kernel.signature, kernel.params, BaseBackend)
        self.compiled = {}
        self.n_jit = 0
        kernel.run = self.run
        kernel.device_caches = {0: (None, None, None, BaseBackend, None)}

    def expect(self, grid, args, kwargs):
        bound, spec, options = self.binder(*args, **kwargs)
        key = (tuple(spec), repr(sorted(options.items())))
        grid = grid(bound) if callable(grid) else grid
        g = tuple(grid) + (1,) * (3 - len(grid))
        return key, (*g, STREAM, None, None, None, None, None, *bound.values())

    def run(self, *args, grid, warmup, **kwargs):
        self.n_jit += 1
        key, call = self.expect(grid, args, kwargs)
        ck = self.compiled.setdefault(key, _FakeCompiled(key))
        ck.run(*call[:4], ck.function, ck.packed_metadata, *call[6:])
        return ck


@pytest.fixture
def fake_env(monkeypatch):
    from triton import knobs

    L.clear()
    monkeypatch.setattr(L, "_ENABLED", True)
    monkeypatch.setattr(L, "_get_device", lambda: 0)
    monkeypatch.setattr(L, "_get_stream", lambda dev: STREAM)
    monkeypatch.setattr(L, "_HookChain", knobs.HookChain)
    monkeypatch.setattr(L, "_runtime_knobs", types.SimpleNamespace(launch_enter_hook=knobs.HookChain(),
                                                                   launch_exit_hook=knobs.HookChain()))
    monkeypatch.setattr(L, "_specialize", native_specialize_impl)
    monkeypatch.setattr(L, "_COMPILED_TYPE", _FakeCompiled)
    yield
    L.clear()


def _same(a, b):
    return len(a) == len(b) and all(x is y or (type(x) is type(y) and not torch.is_tensor(x) and x == y)
                                    for x, y in zip(a, b))


def _check_call(fake, kernel, grid, args, kwargs):
    key, call = fake.expect(grid, args, kwargs)
    n_before = {k: len(c.calls) for k, c in fake.compiled.items()}
    L.launch(kernel, grid, *args, **kwargs)
    got = [(k, c.calls[-1]) for k, c in fake.compiled.items() if len(c.calls) != n_before.get(k, 0)]
    assert len(got) == 1, "exactly one launch per call"
    k, launched = got[0]
    assert k == key, f"plan reached the kernel compiled for {k}, the JIT would use {key}"
    ck = fake.compiled[key]
    assert _same(launched[:4], call[:4]) and launched[4] is ck.function and launched[5] is ck.packed_metadata
    assert _same(launched[6:], call[6:]), "launcher arguments differ from the JIT's"


def _draw_tensor(rng, base):
    off = int(rng.choice([0, 1, 2, 3, 4, 8]))
    dt = base[rng.integers(len(base))]
    return dt[off:off + 5]


INTS = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, 2**32 + 16, 2**63 - 1, 2**63, -2**31, -2**31 - 1]


def test_plans_reach_the_kernel_the_jit_would_pick(fake_env, rng):
    kernel = JITFunction(_k_plain)
    fake = _FakeJit(kernel)
    bases = [torch.arange(64, dtype=d) for d in (torch.float32, torch.float16, torch.int64)]
    for _ in range(300):
        args = (_draw_tensor(rng, bases), _draw_tensor(rng, bases), int(rng.choice(INTS)), int(rng.choice(INTS)),
                float(rng.choice([0.5, 1.0])), bool(rng.integers(2)))
        kw = {"BLOCK": int(rng.choice([16, 32]))}
        if rng.integers(2):
            kw["ACT"] = [1, 1.0, True, 2][rng.integers(4)]
        if rng.integers(2):
            kw["num_warps"] = int(rng.choice([2, 4]))
        grid = tuple(int(g) for g in rng.integers(1, 9, size=rng.integers(1, 4)))
        _check_call(fake, kernel, grid, args, kw)
    st = L.stats()
    assert st["plans"] > 0 and st["jit_only"] == 0
    assert fake.n_jit == st["plans"], "the JIT ran once per plan, never after"
    assert len(fake.compiled) <= st["plans"]


def test_a_kernel_still_compiling_makes_no_plan_yet(fake_env):
    """Under Triton 3.9's async compile mode (the tuner's compile-all step) the JIT returns a
    future, not the compiled kernel: no plan can be made from it, and none may be recorded in
    its place (a None plan sent that key through the JIT for good); the next call makes it."""
    kernel = JITFunction(_k_plain)
    fake = _FakeJit(kernel)
    jit_run = fake.run

    class Future:
        def __init__(self, ck):
            self._ck = ck

        def result(self):
            return self._ck

    fake.run = kernel.run = lambda *a, **k: Future(jit_run(*a, **k))
    x = torch.zeros(8)
    args, kw = (x, x, 8, 3, 0.5, True), {"BLOCK": 16}
    assert isinstance(L.launch(kernel, (1,), *args, **kw), Future)
    assert L.stats()["plans"] == 0 and L.stats()["jit_only"] == 0
    kernel.run = jit_run  # compiled now: the next call's JIT returns the kernel, whose plan is kept
    L.launch(kernel, (1,), *args, **kw)
    assert L.stats()["plans"] == 1 and fake.n_jit == 2
    L.launch(kernel, (1,), *args, **kw)
    assert fake.n_jit == 2, "the plan launched it"


def test_bind_launches_then_calls_that_kernel_with_the_arguments_given(fake_env, rng):
    """_launch.bind (the recurrent time loops): the call is launched as launch() would, and the
    returned function calls the compiled kernel the JIT picked for that call, on its grid and
    stream, with the runtime arguments it is given -- raw addresses for pointers included -- and
    the bound keywords and defaults after them, without the JIT; None where the fast path is not
    taken (switched off, a launch hook), after launching the call through the JIT."""
    kernel = JITFunction(_k_dns, do_not_specialize=["lr_b"])
    fake = _FakeJit(kernel)
    base = torch.arange(64, dtype=torch.float32)
    for _ in range(40):
        a = _draw_tensor(rng, [base])
        args = (a, int(rng.choice(INTS)), int(rng.choice(INTS)))
        grid = tuple(int(g) for g in rng.integers(1, 9, size=rng.integers(1, 4)))
        key, call = fake.expect(grid, args, {"BLOCK": 16})
        n_jit = fake.n_jit
        go = L.bind(kernel, grid, *args, BLOCK=16)
        ck = fake.compiled[key]
        assert _same(ck.calls[-1][6:], call[6:]) and fake.n_jit <= n_jit + 1  # the call itself
        n_calls = len(ck.calls)
        go(a.data_ptr() + 64, 3, args[2])
        assert fake.n_jit <= n_jit + 1 and len(ck.calls) == n_calls + 1
        launched = ck.calls[-1]
        assert _same(launched[:4], call[:4]) and launched[4] is ck.function and launched[5] is ck.packed_metadata
        assert launched[9:] == (a.data_ptr() + 64, 3, args[2], 7, 16)  # runtime args, then tail's default, BLOCK
    L._runtime_knobs.launch_enter_hook.add(lambda md: None)
    n_jit = fake.n_jit
    assert L.bind(kernel, (2,), base, 1, 2, BLOCK=16) is None and fake.n_jit == n_jit + 1
    L._runtime_knobs.launch_enter_hook.calls.clear()
    L._ENABLED = False
    assert L.bind(kernel, (2,), base, 1, 2, BLOCK=16) is None and fake.n_jit == n_jit + 2


def test_do_not_specialize_and_defaults(fake_env, rng):
    kernel = JITFunction(_k_dns, do_not_specialize=["lr_b"])
    fake = _FakeJit(kernel)
    base = [torch.arange(64, dtype=torch.float32)]
    for _ in range(120):
        args = [_draw_tensor(rng, base), int(rng.choice(INTS)), int(rng.choice(INTS))]
        if rng.integers(2):
            args.append(int(rng.choice(INTS)))  # `tail` positional, else its default
        _check_call(fake, kernel, (3,), tuple(args), {"BLOCK": 16})
    assert fake.n_jit == L.stats()["plans"]


def test_calls_the_fast_path_does_not_take(fake_env, rng):
    kernel = JITFunction(_k_plain)
    fake = _FakeJit(kernel)
    x = torch.arange(16.0)
    args = (x, x, 5, 7, 0.5, True)
    _check_call(fake, kernel, (2,), args, {"BLOCK": 16})
    _check_call(fake, kernel, (2,), args, {"BLOCK": 16})
    n = fake.n_jit
    # a callable grid, a runtime argument by keyword, a constexpr by position: the JIT, every time
    L.launch(kernel, lambda meta: (2,), *args, BLOCK=16)
    L.launch(kernel, (2,), *args[:5], flag=True, BLOCK=16)
    L.launch(kernel, (2,), *args, 16)
    L.launch(kernel, [2], *args, BLOCK=16)
    assert fake.n_jit == n + 4
    # an installed launch hook: the JIT (it needs the launch metadata)
    L._runtime_knobs.launch_enter_hook.add(lambda md: None)
    _check_call(fake, kernel, (2,), args, {"BLOCK": 16})
    assert fake.n_jit == n + 5
    # switched off: the JIT
    L._runtime_knobs.launch_enter_hook.calls.clear()
    L._ENABLED = False
    _check_call(fake, kernel, (2,), args, {"BLOCK": 16})
    assert fake.n_jit == n + 6
    L._ENABLED = True
    _check_call(fake, kernel, (2,), args, {"BLOCK": 16})
    assert fake.n_jit == n + 6


def test_key_facts(fake_env):
    kernel = JITFunction(_k_plain)
    info = L.kernel_info(kernel)
    assert info.n_lead == 6 and info.runtime_names == {"x_ptr", "y_ptr", "n", "m", "f", "flag"}
    x = torch.zeros(40)

    def key(*args, **kw):
        return L.plan_key(info, 0, BaseBackend, args, kw, native_specialize_impl)

    base = key(x, x, 32, 5, 1.0, True, BLOCK=16)
    assert key(x, x, 48, 5, 2.0, False, BLOCK=16) == base  # same facts: 16 | n; floats, bools unspecialised
    assert key(x[1:], x, 32, 5, 1.0, True, BLOCK=16) != base  # alignment
    assert key(x[4:], x, 32, 5, 1.0, True, BLOCK=16) == base  # 16 bytes on: still aligned
    assert key(x.half(), x, 32, 5, 1.0, True, BLOCK=16) != base  # dtype
    assert key(x, x, 1, 5, 1.0, True, BLOCK=16) != key(x, x, 17, 5, 1.0, True, BLOCK=16)  # == 1
    assert key(x, x, 2**31, 5, 1.0, True, BLOCK=16) != base  # i64
    assert key(x, x, 32, 5, 1.0, True, BLOCK=32) != base
    assert key(x, x, 32, 5, 1.0, True, BLOCK=16, ACT=1) != key(x, x, 32, 5, 1.0, True, BLOCK=16, ACT=True)


def test_not_a_plain_jit_function():
    assert L.kernel_info(lambda: None) is None
    assert L.kernel_info(triton.autotune(configs=[triton.Config({})], key=[])(JITFunction(_k_plain))) is None


def test_wired_launch_sites_use_launch():
    """The hot launchers call kernels through ``launch`` (the fast path where available)."""
    import inspect as _inspect

    from gpu_nn.kernels.triton import activation, optim, pool

    for mod in (activation, pool, optim):
        src = _inspect.getsource(mod)
        assert "_kernel[" not in src, f"{mod.__name__} still launches through kernel[grid]"


def test_wired_calls_have_the_fast_shape(monkeypatch):
    """Every call the wired launchers make has the shape the fast path takes (runtime arguments
    positional, constexprs and options by keyword, a tuple grid), so on a GPU none of them falls
    back to the JIT for its shape. Checked on the calls themselves: CUDA tensors on a GPU, CPU
    tensors in the interpreter elsewhere."""
    import gpu_nn.functional as F
    import gpu_nn.optim as goptim
    from gpu_nn.kernels.triton import activation, dense, optim, pool, rnn

    seen = {}

    def recorder(real):
        def launch_kernel(kernel, grid, *args, **kwargs):
            jit = JITFunction(kernel.fn, do_not_specialize=[p.name for p in kernel.params if p.do_not_specialize]
                              if hasattr(kernel, "params") else None)
            assert L.call_shape_ok(L.kernel_info(jit), grid, args, kwargs), kernel.fn.__name__
            seen[kernel.fn.__name__] = seen.get(kernel.fn.__name__, 0) + 1
            return real(kernel, grid, *args, **kwargs)
        return launch_kernel

    for mod in (activation, dense, optim, pool, rnn):
        monkeypatch.setattr(mod, "launch_kernel", recorder(mod.launch_kernel))
    torch.manual_seed(0)
    dev = "cuda" if GPU else "cpu"  # compiled kernels on a GPU, the interpreter on CPU tensors

    def r(*shape):
        return torch.randn(*shape).to(dev)

    with gpu_nn.backend("triton"):
        for act in ("relu", "sigmoid", "tanh"):
            x = r(5, 3).requires_grad_()
            getattr(F, act)(x).sum().backward()
        x = r(1, 2, 7, 6).requires_grad_()
        (F.max_pool2d(x, 3, 2, 1).sum() + F.avg_pool2d(x, 2).sum()).backward()
        z = r(3, 5).requires_grad_()
        (F.softmax(z, 1).square().sum() + F.cross_entropy(z, torch.tensor([0, 4, 2], device=dev))).backward()
        for name in ("SGD", "Adagrad", "Adadelta", "RMSprop", "Adam"):
            p = torch.nn.Parameter(r(7))
            p.grad = r(7)
            getattr(goptim, name)([p], lr=0.1).step()
        gpu_nn.nn.utils.clip_grad_norm_([p], 0.1)
        a = r(3, 5).requires_grad_()
        F.linear(a, r(2, 5), r(2).requires_grad_()).sum().backward()  # (a bias gradient wanted: _colsum_kernel)
        out, _ = gpu_nn.nn.LSTM(3, 4, proj_size=2).to(dev)(r(2, 1, 3).requires_grad_())
        out.sum().backward()
    expected = {"_act_fwd_kernel", "_act_bwd_kernel", "_max_pool_fwd_kernel", "_max_pool_bwd_kernel",
                "_avg_pool_fwd_kernel", "_avg_pool_bwd_kernel", "_softmax_fwd_kernel", "_softmax_bwd_kernel",
                "_ce_fwd_kernel", "_ce_bwd_kernel", "_sgd_kernel", "_adagrad_kernel", "_adadelta_kernel",
                "_rmsprop_kernel", "_adam_kernel", "_clip_partial_kernel", "_clip_scale_kernel", "_matmul_kernel", "_colsum_kernel",
                "_rnn_step_fwd_kernel", "_rnn_step_bwd_kernel", "_rnn_proj_fwd_kernel", "_rnn_proj_bwd_kernel"}
    assert expected <= set(seen), sorted(expected - set(seen))


# ----------------------------------------------------------------------------- GPU: fast == JIT

def _both_paths(fn):
    """fn() run through the JIT path and through the fast path (twice: plan made, plan used).
    The plans are cleared before the fast leg, and it must make some: else both legs ran the JIT
    (a count over the whole process, plans from earlier tests included, proved nothing)."""
    prev = L.set_enabled(False)
    try:
        ref = fn()
        L.set_enabled(True)
        assert L.enabled()
        L.clear()
        fn()
        out = fn()
        assert L.stats()["plans"] > 0, "the fast leg made no launch plan: it ran the JIT too"
    finally:
        L.set_enabled(prev)
    return ref, out


def _bitwise(a, b):
    for x, y in zip(a if isinstance(a, (tuple, list)) else [a], b if isinstance(b, (tuple, list)) else [b]):
        if x is None:
            assert y is None
            continue
        assert x.dtype == y.dtype and x.shape == y.shape
        x, y = x.reshape(-1), y.reshape(-1)
        assert torch.equal(x.view(torch.uint8) if x.is_floating_point() else x,
                           y.view(torch.uint8) if y.is_floating_point() else y)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_gpu_activation_fast_equals_jit(act, dtype):
    import gpu_nn.functional as F

    for n in (1, 17, 1023, 4097):
        for off in (0, 1):  # 16-aligned and unaligned data pointers
            base = torch.randn(n + off, device="cuda", dtype=dtype, requires_grad=False)
            x = base[off:].detach().requires_grad_()
            g = torch.randn(n, device="cuda", dtype=dtype)

            def run():
                with gpu_nn.backend("triton"):
                    y = getattr(F, act)(x)
                    (dx,) = torch.autograd.grad(y, x, g)
                return y.detach().clone(), dx.clone()

            _bitwise(*_both_paths(run))
    assert L.stats()["plans"] > 0


@needs_gpu
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_gpu_pool_fast_equals_jit(mode):
    import gpu_nn.functional as F

    for shape in ((1, 1, 5, 5), (2, 3, 17, 9)):
        base = torch.randn(int(np.prod(shape)) + 1, device="cuda")
        x = base[1:].view(shape).detach().requires_grad_()
        fn = F.max_pool2d if mode == "max" else F.avg_pool2d

        def run():
            with gpu_nn.backend("triton"):
                y = fn(x, 3, 2, 1)
                (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
            return y.detach().clone(), dx.clone()

        _bitwise(*_both_paths(run))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_conv_fast_equals_jit(dtype, monkeypatch):
    """conv1d / conv2d fwd+bwd (implicit GEMM, depthwise, fused activation, channels_last, an
    unaligned input) through launch plans and through the JIT: bitwise the same. The heuristic
    configurations (no measuring), so both paths launch the same kernels."""
    import gpu_nn.functional as F
    from gpu_nn import _tuning

    monkeypatch.setenv(_tuning.ENV, "0")
    cases = [
        (F.conv2d, (2, 3, 9, 7), (5, 3, 3, 3), dict(padding=1, activation="relu"), False),
        (F.conv2d, (2, 4, 8, 8), (8, 1, 3, 3), dict(padding="same", groups=4), False),  # depthwise
        (F.conv2d, (2, 16, 6, 5), (32, 16, 3, 3), dict(stride=2, padding=1), True),  # channels_last
        (F.conv1d, (3, 5, 29), (7, 5, 5), dict(padding=2, activation="tanh"), False),
    ]
    for fn, xs, ws, kw, cl in cases:
        base = torch.randn(int(np.prod(xs)) + 1, device="cuda", dtype=dtype)
        x = base[1:].view(xs).detach()
        x = (x.contiguous(memory_format=torch.channels_last) if cl else x).requires_grad_()
        w = (torch.randn(ws, device="cuda", dtype=dtype) / 4).requires_grad_()
        b = torch.randn(ws[0], device="cuda", dtype=dtype).requires_grad_()

        def run():
            with gpu_nn.backend("triton"):
                y = fn(x, w, b, **kw)
                grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
            return (y.detach().clone(), *(t.clone() for t in grads))

        _bitwise(*_both_paths(run))
    assert L.stats()["plans"] > 0


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_softmax_ce_fast_equals_jit(dtype):
    import gpu_nn.functional as F

    for rows, cols in ((1, 1), (3, 17), (5, 1025)):
        base = torch.randn(rows * cols + 1, device="cuda", dtype=dtype)
        z = base[1:].view(rows, cols).detach().requires_grad_()  # unaligned data pointer
        t = torch.randint(0, cols, (rows,), device="cuda")
        g = torch.randn(rows, cols, device="cuda", dtype=dtype)

        def run():
            with gpu_nn.backend("triton"):
                y = F.softmax(z, 1)
                ly = F.log_softmax(z, 1)
                ce = F.cross_entropy(z, t)
                dz = torch.autograd.grad((y * g).sum() + (ly * g).sum() + ce, z)[0]
            return y.detach().clone(), ly.detach().clone(), ce.detach().clone(), dz.clone()

        _bitwise(*_both_paths(run))


@needs_gpu
@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW"])
def test_gpu_optim_fast_equals_jit(name):
    import gpu_nn.optim as goptim

    torch.manual_seed(0)
    shapes = [(17,), (3, 5), (1,), (64, 33)]
    init = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn(s, device="cuda") for s in shapes]

    def run():
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        with gpu_nn.backend("triton"):
            opt = getattr(goptim, name)(ps, lr=0.01)
            for _ in range(3):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                opt.step()
            gpu_nn.nn.utils.clip_grad_norm_(ps, 0.5)
        return [p.detach().clone() for p in ps]

    _bitwise(*_both_paths(run))


@needs_gpu
def test_gpu_fast_path_under_cuda_graph_capture():
    import gpu_nn.functional as F

    x = torch.randn(4099, device="cuda")
    with gpu_nn.backend("triton"):
        F.relu(x)  # plan made outside the capture (first launch compiles)
        F.relu(x)
        prev = L.set_enabled(True)
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                F.relu(x)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = F.relu(x)
        finally:
            L.set_enabled(prev)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.relu(x))



@needs_gpu
@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("B,H", [(32, 16), (33, 17)])
def test_gpu_rnn_bound_time_loops_equal_jit(mode, bidirectional, B, H, monkeypatch):
    """The recurrent time loops on the fast path bind the launcher once per loop and pass the
    later steps' pointers as raw addresses (``_launch.bind``, rnn ``_time_loop``): outputs and
    every gradient bit for bit as on the JIT path, two layers, both directions, unequal lengths.
    Batch above the persistent kernel's default bound, so the forward runs per step too; rows a
    multiple of 16 bytes apart (B=32, H=16: the step kernels bound) and not (B=33, H=17, rows of
    561 floats: their twins for rows at any alignment bound, fed misaligned raw addresses); the
    loops bind in both (counted)."""
    monkeypatch.setenv("GPU_NN_RNN_PERSISTENT", "0")
    torch.manual_seed(0)
    m = getattr(gpu_nn.nn, mode)(24, H, num_layers=2, bidirectional=bidirectional).cuda()
    x = torch.randn(7, B, 24, device="cuda")
    lengths = torch.randint(1, 8, (B,))
    lengths[0] = 7
    g = torch.randn(7, B, (2 if bidirectional else 1) * H, device="cuda")
    binds, bound = [], []
    real = L.bind

    def spy(*a, **k):  # what each bind returned: None means the loop fell back to per-step views
        binds.append(a[0])
        go = real(*a, **k)
        bound.append(go)
        return go

    monkeypatch.setattr(L, "bind", spy)

    def run():
        xx = x.clone().requires_grad_()
        with gpu_nn.backend("triton"):
            packed = torch.nn.utils.rnn.pack_padded_sequence(xx, lengths, enforce_sorted=False)
            y, _ = torch.nn.utils.rnn.pad_packed_sequence(m(packed)[0], total_length=7)
            grads = torch.autograd.grad((y * g).sum(), (xx, *m.parameters()))
        return (y.detach().clone(), *(t.clone() for t in grads))

    _bitwise(*_both_paths(run))
    from gpu_nn.kernels.triton import rnn as kt

    assert binds and all((k in kt.LOOSE_ROWS.values()) == (B * H % 4 != 0) for k in binds), binds
    assert all(go is not None for go in bound), [k for k, go in zip(binds, bound) if go is None]
