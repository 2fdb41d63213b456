"""relu / sigmoid / tanh: reference against torch (float64, forward and backward), finite
differences of the reference backward, every backend against the reference, opcheck, bad input."""

import re

import pytest
import torch

import gpu_nn
import gpu_nn.functional as F
from gpu_nn.ops.activation import BACKENDS
from helpers import assert_close, backend_params, gpu_dtypes_for, randn, vs_reference_dtypes

EPS32 = torch.finfo(torch.float32).eps

OPS = {"relu": (F.relu, torch.relu), "sigmoid": (F.sigmoid, torch.sigmoid), "tanh": (F.tanh, torch.tanh)}
SHAPES = [(1,), (7,), (3, 5, 17), (2, 0, 3), (2, 3, 33, 9)]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_torch_float64(name, shape, rng):
    ours, theirs = OPS[name]
    x = randn(rng, *shape, requires_grad=True) * 4
    x.retain_grad()
    with gpu_nn.backend("reference"):
        y = ours(x)
        g = randn(rng, *y.shape)
        (gx,) = torch.autograd.grad(y, x, g)
    xt = x.detach().requires_grad_()
    yt = theirs(xt)
    (gt,) = torch.autograd.grad(yt, xt, g)
    assert_close(y, yt, torch.float64, what="forward")
    assert_close(gx, gt, torch.float64, what="backward")


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_reference_extremes_elementwise_like_torch(name, dtype, rng):
    """Tails, infinities, NaN, signed zeros and denormal results, each element within two ulps
    of torch *relative to its own size* (not to the tensor's scale): sigmoid(-80) in float64
    is 1.8e-35 and must not round to 0 through a cancellation."""
    ours, theirs = OPS[name]
    info = torch.finfo(dtype)
    special = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1e-30, 15.0, -15.0, 40.0, -40.0,
               80.0, -80.0, 88.7, -88.7, 103.0, -103.0, 700.0, -700.0, 745.0, -745.0, 1e4, -1e4]
    x = torch.cat([torch.tensor(special, dtype=torch.float64), randn(rng, 2000) * 30]).to(dtype)
    with gpu_nn.backend("reference"):
        y = ours(x)
    yt = theirs(x.double()).to(dtype).double()  # torch's float64 value, rounded to the dtype
    assert torch.equal(torch.isnan(y), torch.isnan(yt))
    ok = ~torch.isnan(yt)
    y, yt = y.double()[ok], yt[ok]
    ulp = torch.clamp(yt.abs(), min=info.smallest_normal) * info.eps
    bad = (y - yt).abs() > 2 * ulp
    assert not bad.any(), f"{name} {dtype}: x={x[ok][bad][:5].tolist()} ours={y[bad][:5].tolist()} torch={yt[bad][:5].tolist()}"


@pytest.mark.parametrize("name", OPS)
def test_reference_backward_finite_differences(name, rng):
    ours, _ = OPS[name]
    x = randn(rng, 4, 7, requires_grad=True)
    with gpu_nn.backend("reference"):
        assert torch.autograd.gradcheck(ours, (x,))


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", [(5, 9, 11), (4099,), (0, 3)])
@pytest.mark.parametrize("noncontig", [False, True])
def test_backend_matches_reference(backend, device, name, shape, noncontig, rng):
    ours, _ = OPS[name]
    for dtype in vs_reference_dtypes(backend, device):
        x64 = randn(rng, *shape) * 3
        g64 = randn(rng, *shape)
        with gpu_nn.backend("reference"):
            xr = x64.clone().requires_grad_()
            yr = ours(xr)
            (gr,) = torch.autograd.grad(yr, xr, g64)
        x = x64.to(device=device, dtype=dtype)
        if noncontig:
            x = torch.stack([x, x], dim=-1)[..., 0]
            assert not x.is_contiguous() or x.numel() <= 1
        x.requires_grad_()
        with gpu_nn.backend(backend):
            y = ours(x)
            (gx,) = torch.autograd.grad(y, x, g64.to(device=device, dtype=dtype))
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, yr, dtype, what=f"{name} forward {dtype}")
        assert_close(gx, gr, dtype, what=f"{name} backward {dtype}")


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
def test_nan_propagates(backend, device):
    x = torch.tensor([float("nan"), -1.0, 2.0], device=device)
    with gpu_nn.backend(backend):
        for name, (ours, theirs) in OPS.items():
            y = ours(x)
            assert torch.isnan(y[0]), name
            torch.testing.assert_close(y[1:].cpu(), theirs(x[1:]).cpu())


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
def test_sigmoid_and_tanh_gradients_are_torchs_expressions(backend, device, rng):
    """sigmoid's gradient is torch's sigmoid_backward ``a * (1 - b) * b`` in that order, tanh's
    ``a * (1 - b * b)`` with ``1 - b * b`` rounded once (the fma torch's CPU and CUDA builds make
    of it): float32 gradients are torch's own backward of the same output and gradient bit for
    bit (torch's CPU kernels here, its CUDA ones on a GPU). Before: ``a * b * (1 - b)`` (a third
    of 100,000 elements an ulp off torch's) and two roundings of ``1 - b * b`` (two thirds)."""
    backwards = {"sigmoid": torch.ops.aten.sigmoid_backward, "tanh": torch.ops.aten.tanh_backward}
    for name, bw in backwards.items():
        ours, _ = OPS[name]
        x = (randn(rng, 30011) * 6).float().to(device).requires_grad_()
        g = randn(rng, 30011).float().to(device)
        with gpu_nn.backend(backend):
            y = ours(x)
            (gx,) = torch.autograd.grad(y, x, g)
        want = bw(g, y.detach())
        assert torch.equal(gx, want), (name, int((gx != want).sum()))


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_triton_sigmoid_and_tanh_are_torchs_expressions_and_math(backend, device):
    """The Triton activation kernel computes torch's CUDA float32 sigmoid and tanh: sigmoid as
    ``1 / (1 + exp(-x))`` with libdevice's expf and an IEEE division, so exactly 0 below x =
    -88.72, where exp(-x) overflows, as torch's are on the CPU and on CUDA (the e / (1 + e) form
    gave values down to 1.4e-45 there: fails before), and tanh as libdevice's tanhf, x itself
    below 2^-14 (-0.0 kept); both within 3 float32 ulps of float64 (relative, normal results;
    libdevice's expf and tanhf are within 2, the interpreter's NumPy within 1) and NaN / +-inf as
    torch's. On a GPU, also torch's CUDA results bit for bit (the same libdevice functions,
    the same expression): what the kernel was made to be, which only a GPU can show."""
    nan, inf = float("nan"), float("inf")
    special = [-88.73, -88.72, -88.7, -87.4, -104.0, -200.0, 17.5, 1e-30, -1e-40, 1.4e-45, 6.1e-5, -6.2e-5,
               -0.0, 0.0, inf, -inf, nan]
    x = torch.cat([torch.linspace(-100, 100, 20011), torch.tensor(special)])
    x64 = x.double()
    with gpu_nn.backend(backend):
        got = {"sigmoid": F.sigmoid(x.to(device)).cpu(), "tanh": F.tanh(x.to(device)).cpu()}
    truth = {"sigmoid": torch.sigmoid(x64), "tanh": torch.tanh(x64)}
    tiny = torch.finfo(torch.float32).tiny
    for name, y in got.items():
        want = OPS[name][1](x)  # torch's own float32 result (its CPU kernels here)
        assert torch.equal(torch.isnan(y), torch.isnan(want)), name
        ok = ~torch.isnan(want)
        # where torch's is exactly 0 or +-1 (overflow, saturation), ours is the same value
        ends = ok & ((want == 0) | (want.abs() == 1))
        assert torch.equal(y[ends], want[ends]), (name, x[ends][y[ends] != want[ends]])
        normal = ok & (truth[name].abs() >= tiny)
        rel = ((y[normal].double() - truth[name][normal]).abs() / truth[name][normal].abs()).max()
        assert rel <= 3 * EPS32, (name, float(rel) / EPS32)
        if str(device).startswith("cuda"):
            torch_cuda = OPS[name][1](x.to(device)).cpu()
            torch.testing.assert_close(y, torch_cuda, rtol=0, atol=0, equal_nan=True, msg=name)
    assert (got["sigmoid"][x < -88.72] == 0).all() and (got["sigmoid"][x < -88.72] == 0).any()
    small = x.abs() < 6.103515625e-05
    assert torch.equal(got["tanh"][small], x[small]) and torch.signbit(got["tanh"][x == 0]).tolist() == \
        torch.signbit(x[x == 0]).tolist()


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
def test_tanh_near_zero_keeps_float32_precision(backend, device):
    """tanh of tiny, subnormal and signed-zero inputs as torch's (tanh(x) = x there, -0.0 kept),
    and within a few float32 ulps across the range, through F.tanh. The Triton form (1 - e) /
    (1 + e), e = exp(-2|x|), cancelled as |x| shrank: 1.0133e-6 for tanh(1e-6), 0 for 1e-8 (a
    user audit). The fused epilogues (a linear's here) and the recurrent cells keep that form
    (their registers, kernels/triton/activation.py _tanh_quot): within a few float32 ulps of 1
    absolutely."""
    # the linear and the cell multiply x by 1 in exact float32 (conftest's _exact_float32: no TF32)
    tiny = torch.tensor([1e-6, -1e-6, 3e-5, 1e-8, -1e-20, 1.4e-45, -1e-40, -0.0, 0.0], device=device)
    with gpu_nn.backend(backend):
        y = F.tanh(tiny)
    want = torch.tanh(tiny.cpu())
    torch.testing.assert_close(y.cpu(), want, rtol=2 * EPS32, atol=0)
    assert torch.equal(torch.signbit(y.cpu()), torch.signbit(want))
    r = torch.linspace(-4, 4, 4001, dtype=torch.float64)
    with gpu_nn.backend(backend):
        y = F.tanh(r.float().to(device))
        fused = F.linear(r.float().to(device)[:, None], torch.ones(1, 1, device=device), activation="tanh")
        h = F.rnn_tanh_cell(r.float().to(device)[:, None], torch.zeros(len(r), 1, device=device),
                            torch.ones(1, 1, device=device), torch.ones(1, 1, device=device))
    # a few ulps: exp's own rounding, then the quotient's, near |x| = 0.25
    err = ((y.cpu().double() - torch.tanh(r)).abs() / torch.tanh(r).abs().clamp_min(1e-30)).max()
    assert err <= 8 * EPS32, float(err)
    for got in (fused[:, 0], h[:, 0]):
        assert float((got.cpu().double() - torch.tanh(r)).abs().max()) <= 4 * EPS32


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_relu_underscore_is_torchs(backend, device, rng):
    """F.relu_ (torch.nn.functional's name for the in-place relu): x itself, torch's values and
    gradient, one version bump; an integer tensor too."""
    base = randn(rng, 3, 7, 5).to(device)
    grads = []
    for fn in (torch.nn.functional.relu_, F.relu_):
        x_leaf = base.clone().requires_grad_()
        x = x_leaf * 1
        v = x._version
        with gpu_nn.backend(backend):
            y = fn(x)
            assert y is x and x._version == v + 1
            (y * base).sum().backward()
        grads.append(x_leaf.grad)
    torch.testing.assert_close(grads[1], grads[0])
    ints = torch.arange(-3, 4, device=device)
    with gpu_nn.backend(backend):
        torch.testing.assert_close(F.relu_(base.clone()), torch.relu(base))
        assert torch.equal(F.relu_(ints.clone()), torch.relu(ints))


def test_relu_inplace(rng):
    x = randn(rng, 3, 4)
    expect = torch.relu(x)
    out = F.relu(x, inplace=True)
    assert out is x
    torch.testing.assert_close(x, expect)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("grad", ["no_grad", "not_required", "required"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_relu_inplace_as_torch(backend, device, grad, layout, rng, monkeypatch):
    """relu(x, inplace=True): x itself comes back holding torch's values, its version bumped (a
    graph that saved x refuses its backward, as torch's), and where no gradient is recorded and
    the Triton kernel takes x as it lies (contiguous) one launch writes x in place, where the
    out-of-place result copied back was two passes and a temporary (an inference
    ReLU(inplace=True)); a gradient through it is torch's."""
    from gpu_nn.ops import activation as A
    from helpers import interpreted_launches

    op_calls = []
    op = A._activation_op
    monkeypatch.setattr(A, "_activation_op", lambda *a: op_calls.append(a) or op(*a))
    dt = torch.float32
    base = randn(rng, 2, 3, 4, 5).to(device, dt)

    def laid_out(t):  # a copy of t in the layout under test
        if layout == "channels_last":
            return t.clone().contiguous(memory_format=torch.channels_last)
        return t.clone() if layout == "contiguous" else t.transpose(1, 3).clone().transpose(1, 3)

    leaf_t, leaf_o = (laid_out(base).requires_grad_(grad == "required") for _ in range(2))
    results = []
    for relu, x_leaf, be in ((torch.nn.functional.relu, leaf_t, "reference"), (F.relu, leaf_o, backend)):
        x = x_leaf * 1 if grad == "required" else laid_out(x_leaf.detach())
        w = torch.ones_like(x, requires_grad=True)
        saved = (x * w).sum()  # saves x: changing it in place must make this backward refuse
        v = x._version
        with gpu_nn.backend(be), interpreted_launches(device) as names, \
                (torch.no_grad() if grad == "no_grad" else torch.enable_grad()):
            y = relu(x, inplace=True)
        assert y is x
        bumps = x._version - v
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()
        graph = None
        if grad == "required":  # the nodes y's gradient passes: torch's are ReluBackward0 -> MulBackward0
            graph = [type(f).__name__ for f, _ in y.grad_fn.next_functions]
        g = torch.autograd.grad(y.sum(), x_leaf)[0] if grad == "required" else None
        results.append((y.detach().clone(), g, names, bumps, graph))
    (yt, gt, _, bt, grt), (yo, go, names, bo, gro) = results
    torch.testing.assert_close(yo, yt)
    assert yo.stride() == yt.stride()
    assert bo == bt == 1  # one version bump, as relu_
    if grad == "required":
        torch.testing.assert_close(go, gt)
        # recorded as one in-place node over x's own history (a copy_ of an out-of-place
        # result was a CopyBackwards node: a zero gradient for the overwritten x added to the
        # real one, two more passes in every backward)
        assert gro == grt == ["MulBackward0"]
    if backend == "triton" and layout != "transposed":
        assert not op_calls  # in place: no out-of-place op, no copy back
        assert names == (["_act_fwd_kernel"] if device == "cpu" else [])


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_relu_inplace_on_a_view_reaches_the_base(backend, device, rng):
    """relu(v, inplace=True) of a strided view of a tensor autograd records (columns 1:4 of a
    layer's output): the base's history goes through the view as torch's (CopySlices), the base
    holds torch's values and its input gets torch's gradient."""
    x0, w0 = randn(rng, 3, 5).to(device), randn(rng, 5, 6).to(device)
    got = []
    for relu in (torch.nn.functional.relu, F.relu):
        w = w0.clone().requires_grad_()
        h = x0 @ w
        with gpu_nn.backend(backend):
            v = relu(h[:, 1:4], inplace=True)
        assert type(h.grad_fn).__name__ == "CopySlices" and v._base is h
        (g,) = torch.autograd.grad((h * torch.arange(6.0, device=device)).sum(), w)
        got.append((h.detach(), g))
    torch.testing.assert_close(got[1][0], got[0][0])
    torch.testing.assert_close(got[1][1], got[0][1])


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_relu_inplace_refuses_what_torch_refuses(backend, device):
    """relu(x, inplace=True) refuses as torch's relu_ does, with its words: a leaf or a view of
    one that requires grad, a view made in no_grad mode changed with grad on, one view of a
    multi-view function (unbind, split), an inference tensor outside inference mode (the
    in-place kernel wrote it before); inside inference mode it is changed in place. A refused
    call leaves the tensor and its version as torch's does: unchanged (the multi-view and
    no_grad views were written, then refused by mark_dirty; an autograd parity audit)."""
    w = torch.randn(5, 6, device=device, requires_grad=True)

    def cases():
        h = torch.ones(3, 5, device=device) @ w
        with torch.no_grad():
            view = h[0]
        with torch.inference_mode():
            t = torch.randn(3, 4, device=device)
        return [("leaf", torch.randn(3, device=device, requires_grad=True)),
                ("leaf view", torch.randn(3, 4, device=device, requires_grad=True)[0]),
                ("no_grad view", view),
                ("unbind view", (torch.ones(3, 5, device=device) @ w).unbind(0)[1]),
                ("split view", (torch.ones(3, 5, device=device) @ w - 1).split(1)[1]),
                ("inference tensor", t)]

    def version(t):
        return None if t.is_inference() else t._version

    with gpu_nn.backend(backend):
        for call in (lambda x: F.relu(x, inplace=True), F.relu_):
            torch.manual_seed(0)
            theirs_cases = cases()
            torch.manual_seed(0)
            for (what, x), (_, y) in zip(cases(), theirs_cases):
                with pytest.raises(RuntimeError) as theirs:
                    torch.relu_(y)
                with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
                    call(x)
                # what the refused call left: torch's (refused before writing, but for an
                # inference tensor, which torch's relu_ writes, then refuses)
                assert torch.equal(x.detach(), y.detach()) and version(x) == version(y), what
        with torch.inference_mode():
            t = torch.randn(3, 4, device=device)
            expect = torch.relu(t)
            assert F.relu(t, inplace=True) is t and torch.equal(t, expect)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("grad", (False, True))
def test_relu_inplace_refuses_an_expanded_input_as_torch(backend, device, grad):
    """relu in place on an expand()ed tensor (4 rows, one memory location): torch's relu_ refuses
    it, in its words, before computing; ours computed the relu out of place (a kernel run) and
    then failed in the copy back with copy_'s RuntimeError, not a KernelInputError. Refused
    first now, the tensor and its version untouched."""
    def expanded():
        base = torch.tensor([[-1.0, 2.0, -3.0]], device=device)
        return (base * 1).requires_grad_(False) if not grad else (base.requires_grad_() * 1), base

    with pytest.raises(RuntimeError) as theirs:
        torch.relu_(expanded()[0].expand(4, 3))
    with gpu_nn.backend(backend):
        for call in (lambda x: F.relu(x, inplace=True), F.relu_, gpu_nn.nn.ReLU(inplace=True)):
            x, _ = expanded()
            e = x.expand(4, 3)
            before = e._version
            with pytest.raises(gpu_nn.KernelInputError, match=re.escape(str(theirs.value))):
                call(e)
            assert torch.equal(x.detach().cpu(), torch.tensor([[-1.0, 2.0, -3.0]])) and e._version == before


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_relu_inplace_on_an_expanded_input_keeps_torchs_order_of_errors(backend, device):
    """The expanded-input refusal comes after torch's earlier checks, as in torch: an expanded
    view of a leaf requiring grad gets autograd's view error, a bool one relu's dtype error, a
    complex one clamp's NotImplementedError (the refusal first said "more than one element" for
    all three: a re-read)."""
    cases = [lambda: torch.randn(1, 3, device=device, requires_grad=True).expand(2, 3),
             lambda: torch.ones(1, 3, dtype=torch.bool, device=device).expand(2, 3),
             lambda: torch.randn(1, 3, dtype=torch.complex64, device=device).expand(2, 3)]
    for make in cases:
        with pytest.raises(Exception) as theirs:
            torch.relu_(make())
        with gpu_nn.backend(backend), pytest.raises(type(theirs.value)) as ours:
            F.relu_(make())
        assert str(ours.value) == str(theirs.value), (str(ours.value), str(theirs.value))


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, rng):
    x = randn(rng, 3, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.gpu_nn.activation.default, (x, name))
    g = randn(rng, 3, 5)
    y = OPS[name][1](x).detach()
    torch.library.opcheck(torch.ops.gpu_nn.activation_backward.default, (g, y, name))


def test_bad_input():
    with pytest.raises(NotImplementedError, match="^clamp is not supported for complex types$"):  # torch's verdict
        F.relu(torch.zeros(5, dtype=torch.complex64))
    with pytest.raises(gpu_nn.KernelInputError, match="floating-point"):  # torch computes it; our kernels do not
        F.sigmoid(torch.zeros(5, dtype=torch.complex64))
    with pytest.raises(gpu_nn.KernelInputError):
        F.sigmoid([1.0, 2.0])
    with pytest.raises(ValueError):  # KernelInputError is a ValueError too
        F.tanh(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="^Boolean inputs not supported for relu$"):  # torch's error
        F.relu(torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("arg", [[1.0, 2.0], 3.0, None], ids=["list", "float", "None"])
def test_non_tensors_get_torchs_error_type_and_words(name, form, arg):
    """Not a tensor: torch's exception type and words. ``F.sigmoid`` / ``F.tanh`` call the
    argument's method (AttributeError), ``F.relu`` and the modules torch's parser (TypeError);
    ours raised the TypeError everywhere (a leftover of an earlier audit)."""
    mod = {"relu": "ReLU", "sigmoid": "Sigmoid", "tanh": "Tanh"}[name]
    theirs = getattr(torch.nn.functional, name) if form == "functional" else getattr(torch.nn, mod)()
    ours = getattr(F, name) if form == "functional" else getattr(gpu_nn.nn, mod)()
    with pytest.raises((AttributeError, TypeError)) as want:
        theirs(arg)
    with pytest.raises(gpu_nn.KernelInputError) as got:
        ours(arg)
    assert isinstance(got.value, type(want.value)) and str(got.value) == str(want.value)


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool])
def test_integer_inputs_as_torch(backend, device, dtype, rng):
    """torch's relu keeps an integer dtype (exactly, int64 beyond float precision too) and
    refuses bool; sigmoid and tanh compute in the default float dtype (float64 when that is
    the default)."""
    x = torch.from_numpy(rng.integers(-100, 100, (3, 7))).to(dtype)
    if dtype is torch.int64:
        x[0, :3] = torch.tensor([2**53 + 1, -(2**60), 2**62 + 7])
    x = x.to(device).t()  # not contiguous: torch's output keeps that layout
    with gpu_nn.backend(backend):
        if dtype is not torch.bool:
            y = F.relu(x)
            assert y.dtype == dtype and y.stride() == torch.relu(x).stride()
            assert torch.equal(y, torch.relu(x))
            xi = x.clone()
            assert F.relu(xi, inplace=True) is xi and torch.equal(xi, torch.relu(x))
            assert torch.equal(gpu_nn.nn.ReLU()(x), torch.relu(x))
        for default in (torch.float32, torch.float64):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(default)
            try:
                for name in ("sigmoid", "tanh"):
                    ours, theirs = OPS[name]
                    y, yt = ours(x), theirs(x)
                    assert y.dtype == yt.dtype == default
                    # an explicitly chosen GPU backend computes float64 in float32 (DESIGN section 4)
                    assert_close(y, yt.double(), default if backend == "reference" else torch.float32,
                                 what=f"{name} of {dtype}")
            finally:
                torch.set_default_dtype(prev)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_reference_relu_backward_is_torchs_threshold_backward_bit_for_bit(dtype, rng):
    """+0 wherever the output is not > 0, even for NaN / inf gradients; the gradient's own bits
    (NaN, inf, -0) where it is; strided views read in place."""
    from gpu_nn.reference import activation as A

    g = randn(rng, 6, 9, 10).to(dtype)
    y = randn(rng, 6, 9, 10).to(dtype)
    g.view(-1)[::7] = float("nan")
    g.view(-1)[3::11] = float("inf")
    g.view(-1)[5::13] = -0.0
    y.view(-1)[::5] = 0.0
    for gs, ys in ((g, y), (g[:, ::2, 1::3], y[:, ::2, 1::3]), (g.transpose(0, 2), y.transpose(0, 2))):
        ours = torch.from_numpy(A.relu_backward(gs.numpy(), ys.numpy()))
        theirs = torch.ops.aten.threshold_backward(gs, ys, 0)
        assert ours.dtype == dtype and ours.shape == theirs.shape
        bits = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16}[dtype]
        assert torch.equal(ours.contiguous().view(bits), theirs.contiguous().view(bits))


# --- relu's gradient at NaN, +-inf, +-0 (issue 18.2) ------------------------------------------
# torch's relu backward is threshold_backward(grad, out, 0) = 0 where out <= 0, else grad: a NaN
# input gives a NaN output, NaN <= 0 is false, so the gradient passes there.

_RELU_EDGES = [float("nan"), -1.0, 2.0, float("inf"), float("-inf"), 0.0, -0.0, -3.5, 0.25]


def _relu_dtypes(backend, device):
    return gpu_dtypes_for(backend, device) if backend != "reference" else (torch.float64, torch.float32)


@pytest.mark.parametrize("module", [False, True], ids=["F.relu", "nn.ReLU"])
@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
def test_relu_gradient_at_nan_inf_and_zero_is_torchs(backend, device, module, rng):
    for dtype in _relu_dtypes(backend, device):
        x = torch.tensor(_RELU_EDGES, dtype=dtype, device=device)
        g = torch.from_numpy(rng.standard_normal(len(_RELU_EDGES)) + 3.0).to(dtype=dtype, device=device)
        fn = gpu_nn.nn.ReLU() if module else F.relu
        xo = x.clone().requires_grad_()
        with gpu_nn.backend(backend):
            y = fn(xo)
            (gx,) = torch.autograd.grad(y, xo, g)
        xt = x.clone().requires_grad_()
        yt = torch.relu(xt)
        (gt,) = torch.autograd.grad(yt, xt, g)
        # the forward bit for bit too, against torch's CPU relu (the oracle; its CUDA max may not
        # keep a zero's sign): NaN kept, and -0.0 kept as torch's clamp_min keeps it
        yc = torch.relu(x.detach().cpu())
        assert torch.equal(torch.isnan(y).cpu(), torch.isnan(yc)), f"{backend} {dtype}: {y.tolist()}"
        assert torch.equal(torch.signbit(y).cpu(), torch.signbit(yc)), f"{backend} {dtype}: {y.tolist()} != {yc.tolist()}"
        assert torch.equal(y.detach().nan_to_num().cpu(), yc.nan_to_num())
        # expected [g0, 0, g2, g3, 0, 0, 0, 0, g8]: bit for bit (a select, no arithmetic)
        assert torch.equal(gx.cpu(), gt.cpu()), f"{backend} {dtype}: {gx.tolist()} != torch {gt.tolist()}"
        assert gx[0] == g[0], "gradient at a NaN input must pass through (torch's threshold_backward)"


@pytest.mark.parametrize("layer", ["conv1d", "conv2d", "linear"])
@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
def test_fused_relu_epilogue_gradient_at_nan_inf_and_zero_is_torchs(layer, backend, device, rng):
    """conv / linear with activation='relu': a NaN bias entry makes a whole output channel NaN,
    and torch sends the gradient through it (so that channel's bias, weight and input gradients
    are finite, not 0); +inf passes, -inf and an exact 0 output (zero weight, zero bias) stop it.
    No NaN reaches the conv/matmul backward itself, so this isolates the epilogue."""
    O = 7
    bias_vals = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0]
    for dtype in _relu_dtypes(backend, device):
        if layer == "linear":
            x = torch.from_numpy(rng.standard_normal((5, 11))).to(dtype)
            w = torch.from_numpy(rng.standard_normal((O, 11)) * 0.3).to(dtype)
            ours_fn, theirs_fn = (lambda x, w, b: F.linear(x, w, b, activation="relu")), torch.nn.functional.linear
        else:
            nd = 1 if layer == "conv1d" else 2
            x = torch.from_numpy(rng.standard_normal((2, 3) + (9,) * nd)).to(dtype)
            w = torch.from_numpy(rng.standard_normal((O, 3) + (3,) * nd) * 0.3).to(dtype)
            ours_f = F.conv1d if nd == 1 else F.conv2d
            theirs_fn = torch.nn.functional.conv1d if nd == 1 else torch.nn.functional.conv2d
            ours_fn = (lambda f: lambda x, w, b: f(x, w, b, padding=1, activation="relu"))(ours_f)
            theirs_fn = (lambda f: lambda x, w, b: f(x, w, b, padding=1))(theirs_fn)
        b = torch.from_numpy(rng.standard_normal(O)).to(dtype)
        b[: len(bias_vals)] = torch.tensor(bias_vals, dtype=dtype)
        w[3:5] = 0.0  # channels 3, 4: output exactly +-0 -> relu gradient 0
        x, w, b = (t.to(device) for t in (x, w, b))
        xo, wo, bo = (t.clone().requires_grad_() for t in (x, w, b))
        with gpu_nn.backend(backend):
            y = ours_fn(xo, wo, bo)
            g = torch.from_numpy(rng.standard_normal(tuple(y.shape)) + 2.0).to(dtype=dtype, device=device)
            grads = torch.autograd.grad(y, (xo, wo, bo), g)
        xt, wt, bt = (t.clone().cpu().double().requires_grad_() for t in (x, w, b))
        yt = torch.relu(theirs_fn(xt, wt, bt))
        expect = torch.autograd.grad(yt, (xt, wt, bt), g.cpu().double())
        for name, ours, theirs in zip(("input", "weight", "bias"), grads, expect):
            assert torch.equal(torch.isfinite(ours.cpu()), torch.isfinite(theirs)), f"{layer} {backend} {dtype} grad {name}"
            red = {"input": O * 3 ** (x.dim() - 2), "weight": x.numel() // 3, "bias": y.numel() // O}[name]
            assert_close(ours.cpu(), theirs, dtype, k=red, what=f"{layer} {backend} {dtype} grad {name}")
        assert torch.isnan(yt[:, 0]).all() and grads[2][0] != 0  # the NaN channel's gradient passed


def _layouts(rng):
    """Inputs of one [2, 3, 6, 5] tensor's values in several memory layouts: channels_last, a
    transpose, a strided slice, a slice of a transpose (dense in neither), an expansion."""
    base = randn(rng, 2, 3, 6, 10)
    return {
        "channels_last": base[..., :5].contiguous(memory_format=torch.channels_last),
        "transposed": base[..., :5].transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": base[..., ::2],
        "sliced_transposed": base.transpose(1, 3)[::2].transpose(1, 3),
        "expanded": randn(rng, 2, 1, 6, 5).expand(2, 3, 6, 5),
    }


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
@pytest.mark.parametrize("name", OPS)
def test_output_layout_is_torchs(backend, device, name, rng):
    """As torch's activations: the output laid out as torch.empty_like(input) (a channels_last
    input stays channels_last; the kernel runs over a dense input's memory as it is, any dim
    order); the gradient laid out as torch's backward lays it out: as the output where the two
    share a layout (a channels_last network), else relu's (threshold_backward) as the output and
    sigmoid's / tanh's as grad_output (ours followed the output there too; a dtype / layout
    audit); values and gradients as the reference's."""
    ours, theirs = OPS[name]
    for lay, x64 in _layouts(rng).items():
        dtype = gpu_dtypes_for(backend, device)[-1]
        x = x64.to(device=device, dtype=dtype).requires_grad_()
        with gpu_nn.backend(backend):
            y = ours(x)
        want = theirs(x)
        assert y.shape == want.shape and y.stride() == want.stride(), (lay, y.stride(), want.stride())
        for g_lay in ("same", "contiguous"):
            g = torch.empty_like(y).copy_(randn(rng, *y.shape)) if g_lay == "same" else randn(rng, *y.shape).to(device, dtype)
            with gpu_nn.backend(backend):
                (dx,) = torch.autograd.grad(y, x, g, retain_graph=True)
            (dxt,) = torch.autograd.grad(want, x, g, retain_graph=True)
            assert dx.stride() == dxt.stride(), (lay, g_lay, dx.stride(), dxt.stride())
            assert_close(y, want, dtype, what=f"{name} {lay}")
            assert_close(dx, dxt, dtype, what=f"{name} {lay} grad ({g_lay} grad_output)")


@pytest.mark.parametrize("name", OPS)
def test_opcheck_channels_last(name, rng):
    """The fake kernels give the real ones' layout (torch.empty_like of the input; torch's
    backward's for the backward, a contiguous gradient of a channels_last output included):
    opcheck on channels_last tensors."""
    x = randn(rng, 2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.gpu_nn.activation.default, (x, name))
    y = OPS[name][1](x).detach()
    g = randn(rng, 2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.gpu_nn.activation_backward.default, (g, y, name))
    torch.library.opcheck(torch.ops.gpu_nn.activation_backward.default, (g.contiguous(), y, name))


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "float16"])
def test_reference_negation_right_on_every_stride(dtype):
    """NumPy 2.4 negates a strided operand wrongly where the result is strided too (elements 16
    or 64 bytes apart; in place included): the reference's sigmoid of an LSTM's one-unit output
    gate, a column of [rows, 4] float32 gates, took other rows' values. reference._ufuncs.negative
    negates right at every stride, in place and into another view, as a contiguous negation does
    (NaN's sign flipped, -0.0 for 0.0)."""
    import numpy as np

    from reference._ufuncs import negative

    for step in range(1, 18):
        for n in (1, 2, 3, 17, 64):
            x = (np.arange(n * step) % 11 - 5).astype(dtype)
            if dtype.startswith("float"):  # the values whose sign bits a negation must flip too
                k = min(5, n)
                x[::step][:k] = np.array([np.nan, 0.0, -0.0, np.inf, -np.inf], dtype)[:k]
            want = np.negative(np.ascontiguousarray(x[::step]))
            a = x.copy()[::step]
            assert negative(a, a) is a
            other = np.zeros(n * step, dtype)[::step]
            negative(x[::step], other)
            for got in (a, other):
                assert got.tobytes() == want.tobytes(), (dtype, step, n)


@pytest.mark.parametrize("cell", [False, True])
def test_reference_lstm_of_one_unit_matches_torch_in_float32(cell, rng):
    """The one-unit LSTM's output gate is a 16-byte-strided column of its gates: in float32 every
    row but the first came out 1e-2 off torch's through NumPy's strided negation (see
    test_reference_negation_right_on_every_stride); outputs, states and gradients now match."""
    import gpu_nn.nn as gnn

    torch.manual_seed(int(rng.integers(1 << 30)))
    theirs = torch.nn.LSTMCell(3, 1) if cell else torch.nn.LSTM(3, 1, num_layers=2, bidirectional=True)
    ours = (gnn.LSTMCell if cell else gnn.LSTM)(3, 1, **({} if cell else {"num_layers": 2, "bidirectional": True}))
    ours.load_state_dict(theirs.state_dict())
    x = randn(rng, *((5, 3) if cell else (4, 5, 3))).float()
    outs = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        with gpu_nn.backend("reference"):
            y = m(xi)
            y = torch.cat([y[0].reshape(-1), y[1].reshape(-1)]) if cell else torch.cat(
                [y[0].reshape(-1), y[1][0].reshape(-1), y[1][1].reshape(-1)])
            g = torch.autograd.grad(y.sum(), [xi, *m.parameters()])
        outs.append((y, g))
    (y0, g0), (y1, g1) = outs
    assert_close(y0, y1.double(), torch.float32, k=12, what="one-unit LSTM outputs")
    for a, b in zip(g0, g1):
        assert_close(a, b.double(), torch.float32, k=12 * 5, what="one-unit LSTM gradients")
