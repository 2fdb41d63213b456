"""The backend switch: env var, context manager, explicit requests that cannot run."""

import copy
import os

import numpy as np
import pytest
import torch

import gpu_nn
import gpu_nn.functional as F
from gpu_nn import _backend


def test_error_classes():
    assert issubclass(gpu_nn.KernelInputError, ValueError)
    assert issubclass(gpu_nn.KernelInputError, RuntimeError)
    assert issubclass(gpu_nn.BackendUnavailableError, RuntimeError)


def test_context_manager_nests_and_restores():
    base = _backend.requested()
    with gpu_nn.backend("reference"):
        assert _backend.requested() == "reference"
        with gpu_nn.backend("auto"):
            assert _backend.requested() == "auto"
        assert _backend.requested() == "reference"
    assert _backend.requested() == base


def test_unknown_backend_is_refused():
    with pytest.raises(gpu_nn.BackendUnavailableError, match="unknown backend 'cuda'"):
        with gpu_nn.backend("cuda"):
            pass


def test_a_backend_object_enters_again_and_decorates():
    """One gpu_nn.backend(...) object entered twice, nested, and as a decorator, as torch's
    no_grad() objects (the generator-based one raised AttributeError on its second use); an
    unknown name is refused when the object is made (a decorator with one failed at its first
    call); the status error names the public function (it named a gpu_nn.status that is not)."""
    cm = gpu_nn.backend("reference")
    base = _backend.requested()
    for _ in range(2):
        with cm as name:
            assert name == "reference" and _backend.requested() == "reference"
            with cm, gpu_nn.backend("auto"):
                assert _backend.requested() == "auto"
            assert _backend.requested() == "reference"
        assert _backend.requested() == base

    @gpu_nn.backend("reference")
    def inside():
        return _backend.requested()

    assert inside() == inside() == "reference" and _backend.requested() == base
    with pytest.raises(gpu_nn.BackendUnavailableError, match="gpu_nn.backend: unknown backend 'bogus'"):
        gpu_nn.backend("bogus")
    with pytest.raises(gpu_nn.BackendUnavailableError, match="gpu_nn.backend_status: unknown backend 'bogus'"):
        gpu_nn.backend_status("bogus")


def test_env_switches_read_every_spelling_and_refuse_the_rest():
    """Every on / off GPU_NN_* variable reads through kernels.env_switch: 1 / true / yes / on and
    0 / false / no / off in any case, unset or empty for the default, anything else a ValueError
    naming the variable (GPU_NN_TUNE=off and GPU_NN_EAGER=false were taken as on, silently; a
    CLI audit)."""
    from gpu_nn.kernels import env_switch

    for value, want in (("1", True), (" TRUE ", True), ("yes", True), ("On", True), ("0", False), ("false", False),
                        ("NO", False), ("off", False), ("", None), ("  ", None), (None, None)):
        assert env_switch("GPU_NN_X", value, read=False) is want, value
    with pytest.raises(ValueError, match=r"^GPU_NN_X must be 0 or 1 .* got 'banana'$"):
        env_switch("GPU_NN_X", "banana", read=False)


@pytest.mark.parametrize("var,value,code,want", [
    ("GPU_NN_EAGER", "false", "from gpu_nn.ops import _dispatch; print(_dispatch.EAGER)", "False"),
    ("GPU_NN_EAGER", "banana", "import gpu_nn", "GPU_NN_EAGER must be 0 or 1"),
    ("GPU_NN_TUNE", "off", "from gpu_nn import _tuning; print(_tuning._tuning_off())", "True"),
    ("GPU_NN_TUNE", "1", "from gpu_nn import _tuning; print(_tuning._tuning_off())", "False"),
    ("GPU_NN_TUNE", "banana", "from gpu_nn import _tuning; _tuning._tuning_off()", "GPU_NN_TUNE must be 0 or 1"),
    ("GPU_NN_RNN_COOPERATIVE", "yes", "from gpu_nn.kernels.triton import rnn; print(rnn.COOPERATIVE)", "True"),
    ("GPU_NN_RNN_VMAP_COMPOSE", "maybe", "import torch, gpu_nn; from gpu_nn.ops import rnn; "
     "torch.func.vmap(lambda x: (rnn._compose_under_vmap(), x)[1])(torch.zeros(2))", "GPU_NN_RNN_VMAP_COMPOSE must be"),
])
def test_env_switches_in_a_fresh_process(var, value, code, want):
    """Set before gpu-nn is imported, each switch is read (helpers.run_fresh: a process that makes
    every import but torch's itself)."""
    from helpers import run_fresh

    out = run_fresh(["-c", code], env={**os.environ, var: value}, timeout=120)
    assert want in out.stdout + out.stderr, out.stdout + out.stderr


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("GPU_NN_BACKEND", "reference")
    assert _backend.requested() == "reference"
    monkeypatch.setenv("GPU_NN_BACKEND", "nonsense")
    with pytest.raises(gpu_nn.BackendUnavailableError, match="GPU_NN_BACKEND"):
        F.relu(torch.randn(3))


def test_auto_uses_reference_for_cpu_tensors():
    assert _backend.resolve("relu", torch.device("cpu"), ("reference", "triton")) == "reference"


def test_auto_sends_float64_to_the_reference(monkeypatch):
    """Under auto, float64 CUDA tensors take the reference (the GPU kernels compute in float32);
    other dtypes a GPU backend; a GPU backend requested by name keeps float64."""
    monkeypatch.setattr(_backend, "status", lambda name: (True, "stand-in"))
    cuda = torch.device("cuda")
    have = ("reference", "triton", "cupy")
    with gpu_nn.backend("auto"):
        assert _backend.resolve("relu", cuda, have, dtype=torch.float64) == "reference"
        for dt in (torch.float32, torch.float16, torch.bfloat16, None):
            assert _backend.resolve("relu", cuda, have, dtype=dt) == "triton"
        assert _backend.resolve("relu", torch.device("cpu"), have, dtype=torch.float32) == "reference"
    with gpu_nn.backend("triton"):
        assert _backend.resolve("relu", cuda, have, dtype=torch.float64) == "triton"


def test_every_op_resolves_with_its_dtype(monkeypatch):
    """Every op's forward and backward, the optimizer step and clipping tell resolve their float
    dtype (float64 here), so auto can send float64 to the reference wherever it runs."""
    seen = []
    real = _backend.resolve

    def spy(op, device, have, prefer=_backend.GPU_BACKENDS, dtype=None):
        seen.append((op, dtype))
        return real(op, device, have, prefer, dtype=dtype)

    monkeypatch.setattr(_backend, "resolve", spy)
    d = dict(dtype=torch.float64)
    x4 = torch.randn(2, 3, 6, 6, **d, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, **d, requires_grad=True)
    lw = torch.randn(5, 16, **d, requires_grad=True)
    with gpu_nn.backend("reference"):
        h = F.max_pool2d(F.relu(F.conv2d(x4, w, padding=1)), 2)
        h = F.avg_pool2d(F.sigmoid(h), 2).flatten(1)
        z = F.linear(h.repeat(1, 4), lw)
        loss = F.cross_entropy(z, torch.tensor([1, 3])) + F.log_softmax(z, 1).sum() + F.tanh(z).sum()
        lstm = gpu_nn.nn.LSTM(5, 3).double()
        out, _ = lstm(z[None])
        cell = gpu_nn.nn.GRUCell(5, 3).double()
        (loss + out.sum() + cell(z).sum()).backward()
        params = [x4, w, lw, *lstm.parameters(), *cell.parameters()]
        gpu_nn.nn.utils.clip_grad_norm_(params, 1.0)
        gpu_nn.optim.Adam(params, lr=0.1).step()
    ops = {op for op, _ in seen}
    assert {"conv2d", "relu", "max_pool", "avg_pool", "sigmoid", "linear", "cross_entropy", "log_softmax",
            "tanh", "clip_grad_norm_", "optim.adam"} <= ops, ops
    assert any("backward" in op for op in ops) and any(op.startswith(("rnn", "lstm", "gru")) for op in ops), ops
    assert all(dt == torch.float64 for _, dt in seen), [s for s in seen if s[1] != torch.float64]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float64 CUDA tensors: needs a CUDA device")
def test_float64_cuda_model_trains_exactly_under_auto():
    """A float64 model on CUDA under auto: forward, gradients and an Adam step equal torch's in
    float64 (the reference runs them; the GPU kernels' float32 would be ~1e-7 off, and the GPU
    optimizers refuse float64)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)).double().cuda()
    ours = gpu_nn.convert(copy.deepcopy(net))
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64, device="cuda")
    y = torch.randint(0, 3, (5,), device="cuda")
    with gpu_nn.backend("auto"):
        lo = gpu_nn.nn.CrossEntropyLoss()(ours(x), y)
        lo.backward()
        gpu_nn.optim.Adam(ours.parameters(), lr=0.01).step()
    lt = torch.nn.CrossEntropyLoss()(net(x), y)
    lt.backward()
    torch.optim.Adam(net.parameters(), lr=0.01).step()
    torch.testing.assert_close(lo, lt, rtol=1e-10, atol=1e-10)  # float32 arithmetic: ~1e-7
    for a, b in zip(ours.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_available_backends_always_has_reference():
    names = gpu_nn.available_backends()
    assert "reference" in names
    for name in names:
        assert _backend.status(name)[0]


def test_cupy_refused_without_gpu_with_reason():
    """Without a GPU the cupy backend is refused with its reason; with one (and cupy installed)
    it is accepted and says which device it runs on."""
    ok, why = _backend.status("cupy")
    assert why
    if torch.cuda.is_available() and ok:
        with gpu_nn.backend("cupy") as name:
            assert name == "cupy"
        assert "cupy" in why
        return
    assert not ok
    with pytest.raises(gpu_nn.BackendUnavailableError, match="cupy"):
        with gpu_nn.backend("cupy"):
            pass


def test_cupy_without_an_nvrtc_library_is_refused_with_its_reason(monkeypatch):
    """Our CuPy kernels compile at run time: a CuPy that sees a device but finds no NVRTC library
    (cupy-cuda12x installed without the extra's NVRTC wheel, no CUDA toolkit) is refused by the
    status check, saying how to install one; it was accepted, and the first op raised
    cuda.pathfinder's error from inside the custom op."""
    # CuPy's own NVRTC binding is what the status check calls: no CuPy, nothing to stand in for
    # (CI installs cupy-cuda12x with the test extra, so it runs there)
    cupy = pytest.importorskip("cupy")
    from cupy_backends.cuda.libs import nvrtc

    def missing():
        raise RuntimeError('Failure finding "libnvrtc.so.13 or libnvrtc.so.12"')

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 1)
    monkeypatch.setattr(nvrtc, "getVersion", missing)
    _backend._cupy_status.cache_clear()
    try:
        ok, why = _backend._cupy_status()
    finally:
        _backend._cupy_status.cache_clear()
    assert not ok and "finds no NVRTC library" in why and "libnvrtc.so" in why and "gpu-nn[cuda12]" in why


def test_op_without_backend_says_so(monkeypatch):
    with pytest.raises(gpu_nn.BackendUnavailableError, match="has no cupy implementation"):
        monkeypatch.setattr(_backend, "requested", lambda: "cupy")
        _backend.resolve("someop", torch.device("cpu"), ("reference", "triton"))


def test_triton_bfloat16_in_interpreter_or_refused(monkeypatch):
    """bfloat16 runs where Triton computes it right: compiled on a GPU, and in the interpreter
    with gpu-nn's fix (kernels/triton/_compat.py); an interpreter without that fix would give
    wrong values without error, so bfloat16 is refused there, naming the dtype."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _backend.interpret_mode():
        pytest.skip("TRITON_INTERPRET is not set in this session")
    x = torch.randn(4, 33, dtype=torch.bfloat16, device=device)
    with gpu_nn.backend("triton"):
        torch.testing.assert_close(F.relu(x), torch.relu(x), rtol=0, atol=0)
        torch.testing.assert_close(F.sigmoid(x).float(), torch.sigmoid(x.float()), rtol=8e-3, atol=0)
    if device == "cpu":
        from gpu_nn.kernels.triton import _compat

        monkeypatch.setattr(_compat, "_bf16_exact", False)
        with gpu_nn.backend("triton"), pytest.raises(gpu_nn.BackendUnavailableError, match="bfloat16"):
            F.relu(x)


def test_triton_without_interpreter_explains_why():
    """Started without TRITON_INTERPRET: a CPU-only machine refuses triton and names the
    variable; a GPU machine accepts it."""
    from helpers import run_uninterpreted

    code = (
        "import torch, gpu_nn\n"
        "try:\n"
        "    with gpu_nn.backend('triton'):\n"
        "        pass\n"
        "except gpu_nn.BackendUnavailableError as e:\n"
        "    print('REFUSED:', e)\n"
    )
    # (forked from the uninterpreted server where there is one: gpu-nn imported there, as here,
    # without the variable)
    out = run_uninterpreted(["-c", code], timeout=120).stdout
    if torch.cuda.is_available():
        assert "REFUSED:" not in out
    else:
        assert "REFUSED:" in out and "TRITON_INTERPRET" in out


def test_reference_handles_half_precision_by_widening():
    x = torch.randn(7, dtype=torch.float16)
    with gpu_nn.backend("reference"):
        y = F.sigmoid(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, torch.sigmoid(x.float()).half())


def test_from_numpy_copies_views_and_shares_owned_arrays():
    from gpu_nn.ops._dispatch import from_numpy

    base = np.arange(12, dtype=np.float32)
    view = base.reshape(3, 4)  # a view: it could be an op's input seen through to_numpy
    t = from_numpy(view, torch.float32, torch.device("cpu"))
    t[0, 0] = 99.0
    assert base[0] == 0.0  # copied: the tensor does not alias the array
    owned = np.zeros(5, np.float32)  # made by the reference for this call: handed over as is
    assert from_numpy(owned, torch.float32, torch.device("cpu")).data_ptr() == owned.ctypes.data


# every op on float64 tensors: (function of a generator and a device -> (output, leaves))
def _f64_cases():
    def t(g, dev, *s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dev).requires_grad_(True)

    return {
        "conv2d+relu": lambda g, d: (lambda x, w, b: (F.conv2d(x, w, b, padding=1, activation="relu"), [x, w, b]))(
            t(g, d, 2, 3, 5, 6), t(g, d, 4, 3, 3, 3), t(g, d, 4)),
        "conv1d": lambda g, d: (lambda x, w: (F.conv1d(x, w, stride=2), [x, w]))(t(g, d, 2, 3, 9), t(g, d, 5, 3, 3)),
        "linear+tanh": lambda g, d: (lambda x, w, b: (F.linear(x, w, b, activation="tanh"), [x, w, b]))(
            t(g, d, 3, 7), t(g, d, 5, 7), t(g, d, 5)),
        "linear": lambda g, d: (lambda x, w: (F.linear(x, w), [x, w]))(t(g, d, 2, 3, 7), t(g, d, 5, 7)),
        "relu": lambda g, d: (lambda x: (F.relu(x), [x]))(t(g, d, 3, 7)),
        "max_pool2d": lambda g, d: (lambda x: (F.max_pool2d(x, 2), [x]))(t(g, d, 2, 3, 6, 6)),
        "avg_pool2d": lambda g, d: (lambda x: (F.avg_pool2d(x, 3, 2, 1), [x]))(t(g, d, 2, 3, 6, 6)),
        "cross_entropy": lambda g, d: (lambda z: (F.cross_entropy(z, torch.tensor([1, 2, 0], device=d)), [z]))(
            t(g, d, 3, 5)),
        "log_softmax": lambda g, d: (lambda z: (F.log_softmax(z, 1), [z]))(t(g, d, 3, 5)),
        "lstm": lambda g, d: (lambda x, h, c, *p: (F.lstm(x, (h, c), p)[0], [x, h, c, *p]))(
            t(g, d, 3, 2, 4), t(g, d, 1, 2, 4), t(g, d, 1, 2, 4), t(g, d, 16, 4), t(g, d, 16, 4), t(g, d, 16),
            t(g, d, 16)),
        "gru_cell": lambda g, d: (lambda x, h, *p: (F.gru_cell(x, h, *p), [x, h, *p]))(
            t(g, d, 2, 4), t(g, d, 2, 4), t(g, d, 12, 4), t(g, d, 12, 4), t(g, d, 12), t(g, d, 12)),
    }


@pytest.mark.parametrize("name", sorted(_f64_cases()))
def test_named_gpu_backend_runs_float64_in_float32(name):
    """README: a GPU backend requested by name runs float64 in float32. Every op's forward and
    gradients come back float64 and agree with the float64 reference to float32's precision
    (the matmul and convolution kernels take no float64: those ops compute on float32 copies)."""
    from helpers import backend_params, interpreted_launches, tol

    (param,) = backend_params(("triton",))
    backend, device = param.values
    if param.marks:
        pytest.skip(param.marks[0].kwargs["reason"])
    results, launched = {}, {}
    for be, dev in (("reference", "cpu"), (backend, device)):
        g = torch.Generator().manual_seed(7)
        with gpu_nn.backend(be):
            with interpreted_launches(dev) as fwd:
                out, leaves = _f64_cases()[name](g, dev)
            with interpreted_launches(dev) as bwd:
                grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results[be], launched[be] = (out, grads), (fwd, bwd)
    (ro, rg), (out, grads) = results["reference"], results[backend]
    assert out.dtype == torch.float64 and all(gr.dtype == torch.float64 for gr in grads)
    if device == "cpu":  # the interpreter: Triton's kernels computed both ways (not the float64 reference)
        fwd, bwd = launched[backend]
        assert fwd and bwd, (fwd, bwd)
    else:  # compiled: float32 arithmetic, not the reference's float64 bits
        assert not torch.equal(out.cpu(), ro) or any(not torch.equal(a.cpu(), b) for a, b in zip(grads, rg))
    bound = tol(torch.float32, 64)
    torch.testing.assert_close(out.cpu(), ro, rtol=bound, atol=bound)
    for i, (a, b) in enumerate(zip(grads, rg)):
        torch.testing.assert_close(a.cpu(), b, rtol=bound, atol=bound, msg=lambda m, i=i: f"grad {i}: {m}")
