"""dense family (flatten, linear, softmax, log_softmax, cross_entropy) and the dense and
activation modules: reference against torch in float64 (forward and every gradient), finite
differences of the reference backward, opcheck on every custom op, bad input, every Triton
kernel against the reference, modules against torch's with the same state_dict."""

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import gpu_nn
import gpu_nn.functional as F
import gpu_nn.nn as gnn
from gpu_nn.reference import dense as R
from gpu_nn.ops.dense import BACKENDS
from helpers import (assert_close, assert_like_torch, backend_params, gpu_dtypes_for, interpreted_launches, max_rel_err,
                     randn, tol, vs_reference_dtypes)

ACTS = (None, "relu", "sigmoid", "tanh")
TORCH_ACT = {None: lambda y: y, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
WORST = {}  # largest float64 error against torch, per op (printed by test_zz_report)


def _note(op, *errs):
    WORST[op] = max([WORST.get(op, 0.0), *errs])


def _grads(out, inputs, g):
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, inputs, g)


# =========================================================================== flatten


@pytest.mark.parametrize("shape,start,end", [
    ((2, 3, 4), 0, -1), ((2, 3, 4), 1, -1), ((2, 3, 4, 5), 1, 2), ((2, 3, 4), -2, -1), ((5,), 0, 0),
    ((), 0, -1), ((0, 3, 2), 1, 2), ((2, 3, 4), 2, 2),
])
def test_flatten_matches_torch(shape, start, end, rng):
    x = randn(rng, *shape, requires_grad=True)
    y = F.flatten(x, start, end)
    yt = torch.flatten(x, start, end)
    assert y.shape == yt.shape
    torch.testing.assert_close(y, yt)
    assert (y.data_ptr() == x.data_ptr()) == (yt.data_ptr() == x.data_ptr())  # view exactly when torch's is
    assert (y is x) == (yt is x)  # nothing to merge: the input itself, as torch (ours was a view)
    g = randn(rng, *y.shape)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g.reshape(shape))
    # the reference never aliases its input
    xn = x.detach().numpy()
    r = R.flatten(xn, start, end)
    assert r.shape == tuple(yt.shape) and not (r.size and __import__("numpy").shares_memory(r, xn))
    assert R.flatten_backward(r, shape).shape == shape


def test_flatten_noncontiguous_copies_like_torch(rng):
    x = randn(rng, 4, 6).t()
    y = F.flatten(x)
    torch.testing.assert_close(y, torch.flatten(x))


# =========================================================================== linear


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("xshape,out", [((7,), 5), ((1, 13), 1), ((3, 5, 17), 19), ((0, 4), 3), ((2, 1, 3, 9), 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_reference_matches_torch(act, xshape, out, bias, rng):
    x = randn(rng, *xshape, requires_grad=True)
    w = randn(rng, out, xshape[-1], requires_grad=True)
    b = randn(rng, out, requires_grad=True) if bias else None
    with gpu_nn.backend("reference"):
        y = F.linear(x, w, b, activation=act)
    yt = TORCH_ACT[act](TF.linear(x, w, b))
    g = randn(rng, *yt.shape)
    e = [assert_close(y, yt, torch.float64, what="linear forward")]
    with gpu_nn.backend("reference"):
        gs = _grads(y, [x, w, b], g)
    for a, t in zip(gs, _grads(yt, [x, w, b], g)):
        e.append(assert_close(a, t, torch.float64, k=max(xshape[0], 1) * 8, what="linear backward"))
    _note("linear", *e)


def test_linear_vector_weight_and_broadcast_bias(rng):
    x = randn(rng, 3, 5)
    w1 = randn(rng, 5)
    torch.testing.assert_close(F.linear(x, w1), TF.linear(x, w1))
    w = randn(rng, 4, 5)
    b = randn(rng, 1)
    torch.testing.assert_close(F.linear(x, w, b), TF.linear(x, w, b))


@pytest.mark.parametrize("act", ACTS)
def test_linear_reference_finite_differences(act, rng):
    x = randn(rng, 3, 2, 5, requires_grad=True)
    w = randn(rng, 4, 5, requires_grad=True)
    b = randn(rng, 4, requires_grad=True)
    with gpu_nn.backend("reference"):
        assert torch.autograd.gradcheck(lambda x, w, b: F.linear(x, w, b, activation=act), (x, w, b))



def _linear_after_inplace(lin, xshape, wants, change, seed, dtype, device):
    """``lin(x, w, b)`` with only ``wants`` ('x', 'w', 'b') requiring a gradient, ``change`` ('x',
    'w' or 'b', through a non-leaf copy) changed in place after the forward, then the gradients
    with create_graph: the error's type, or the gradients and whether each carries a graph."""
    rng = np.random.default_rng(seed)
    leaves = {n: randn(rng, *s, dtype=dtype, device=device).requires_grad_(n in wants)
              for n, s in (("x", xshape), ("w", (4, 5)), ("b", (4,)))}
    used = {n: t * 1 if n == change else t for n, t in leaves.items()}
    y = lin(used["x"], used["w"], used["b"])
    with torch.no_grad():
        used[change].mul_(2)
    try:
        grads = torch.autograd.grad(y.sum(), [leaves[n] for n in sorted(wants)], create_graph=True)
    except RuntimeError as e:
        return type(e).__name__, None
    return [g.detach() for g in grads], [g.requires_grad for g in grads]


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("wants", ["x", "w", "b", "xw", "bw", "bx"])
@pytest.mark.parametrize("change", ["x", "w", "b"])
@pytest.mark.parametrize("xshape", [(3, 5), (2, 3, 5)])
def test_linear_keeps_what_torch_keeps(backend, device, wants, change, xshape):
    """As torch's mm / addmm, the input is kept for the weight's gradient only and the weight for
    the input's: changing in place what the asked gradients do not read is no error (ours kept
    both, and a frozen layer's input stayed alive until the backward), changing what they read
    is torch's version-counter error; the gradients, and whether a create_graph gradient has a
    graph (an input's through a constant weight has none), are torch's."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    with gpu_nn.backend(backend):
        theirs = _linear_after_inplace(TF.linear, xshape, wants, change, 5, dtype, device)
        ours = _linear_after_inplace(F.linear, xshape, wants, change, 5, dtype, device)
    if isinstance(theirs[0], str):
        assert ours[0] == theirs[0]
        return
    assert not isinstance(ours[0], str), f"ours raised where torch did not ({ours[0]})"
    for a, b in zip(ours[0], theirs[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ours[1] == theirs[1]


def test_linear_stand_ins_of_a_trace_stay_in_it():
    """The zeros standing in for what linear did not keep (a first layer's weight) are kept for
    plain eager calls only: one made while torch.compile traced the backward is that trace's
    (a functional / fake tensor), and kept it broke every eager backward after it."""
    from gpu_nn.ops import dense as D

    torch.manual_seed(0)
    model = torch.nn.Sequential(gnn.Linear(4, 3), gnn.ReLU(), gnn.Linear(3, 2))
    x = torch.randn(5, 4)  # wants no gradient: the first layer keeps no weight
    D._ZEROS.clear()
    torch._dynamo.reset()
    torch.compile(model, backend="aot_eager")(x).sum().backward()
    compiled = [p.grad.clone() for p in model.parameters()]
    assert all(type(z) is torch.Tensor for z in D._ZEROS.values())
    model.zero_grad()
    model(x).sum().backward()
    for a, b in zip(compiled, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b)


def test_linear_stand_ins_made_in_inference_mode_are_not_kept():
    """A backward run inside torch.inference_mode() (torch allows it) makes its stand-in zero
    there, an inference tensor: kept, it broke every later create_graph backward of a linear
    with a frozen weight ('Inference tensors cannot be saved for backward'), in any thread."""
    from gpu_nn.ops import dense as D

    D._ZEROS.clear()
    for lin in (torch.nn.functional.linear, F.linear):
        x = torch.randn(4, 3, requires_grad=True)
        loss = lin(x, torch.randn(5, 3), None).sum()  # frozen weight: x is not kept
        with torch.inference_mode():
            (gx,) = torch.autograd.grad(loss, x)
        assert torch.equal(gx, torch.zeros(4, 3) + gx[0])
    assert not any(z.is_inference() for z in D._ZEROS.values())
    got = []
    for lin in (torch.nn.functional.linear, F.linear):
        torch.manual_seed(1)
        x = torch.randn(4, 3, requires_grad=True)
        w = torch.randn(5, 3)
        (gx,) = torch.autograd.grad(lin(x, w, None).pow(2).sum(), x, create_graph=True)
        got.append(torch.autograd.grad(gx.square().sum(), x)[0])
    torch.testing.assert_close(got[1], got[0])


# =========================================================================== softmax / log_softmax

SOFTMAX = {"softmax": (F.softmax, torch.softmax), "log_softmax": (F.log_softmax, torch.log_softmax)}


@pytest.mark.parametrize("name", SOFTMAX)
@pytest.mark.parametrize("shape,dim", [((7,), 0), ((3, 5, 17), -1), ((3, 5, 17), 1), ((3, 5, 17), 0),
                                       ((2, 0, 3), 2), ((4, 1), 1), ((), 0), ((2, 3, 4, 5), -3)])
def test_softmax_reference_matches_torch(name, shape, dim, rng):
    ours, theirs = SOFTMAX[name]
    x = randn(rng, *shape, requires_grad=True) * 4
    with gpu_nn.backend("reference"):
        y = ours(x, dim)
    yt = theirs(x, dim)
    g = randn(rng, *yt.shape)
    with gpu_nn.backend("reference"):
        (gx,) = torch.autograd.grad(y, x, g)
    (gt,) = torch.autograd.grad(yt, x, g)
    _note(name, assert_close(y, yt, torch.float64, what=name), assert_close(gx, gt, torch.float64, what=name + " bwd"))


@pytest.mark.parametrize("name", SOFTMAX)
def test_softmax_implicit_dim_and_dtype(name, rng):
    ours, _ = SOFTMAX[name]
    tfn = getattr(TF, name)
    for shape in [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)]:
        x = randn(rng, *shape)
        with pytest.warns(UserWarning, match=f"Implicit dimension choice for {name}"):
            y = ours(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(y, tfn(x))
    x = randn(rng, 3, 4, dtype=torch.float32)
    y = ours(x, 1, dtype=torch.float64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, tfn(x, 1, dtype=torch.float64))


def test_softmax_large_logits_stable(rng):
    x = randn(rng, 3, 9) * 1000
    with gpu_nn.backend("reference"):
        torch.testing.assert_close(F.softmax(x, 1), torch.softmax(x, 1))
        torch.testing.assert_close(F.log_softmax(x, 1), torch.log_softmax(x, 1))


def _softmax_path_sizes():
    """Row lengths on both sides of the Triton softmax's single-block limit in this mode (the
    interpreter's limit is smaller), so the one-block and the looped kernels both run."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import dense as kd

    single = lambda n: kd.softmax_config(n, ktriton.INTERPRET)[1]  # noqa: E731
    limit = 1
    while single(2 * limit):
        limit *= 2
    lo, hi = limit, 2 * limit  # single(lo), not single(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if single(mid) else (lo, mid)
    sizes = {"single-small": 9, "single-full": lo, "loop-one-over": lo + 1, "loop-long": 2 * lo + 37}
    assert [single(n) for n in sizes.values()] == [True, True, False, False]
    return sizes


LARGE_LOGITS = {"x1000": lambda z: z * 1000, "plus3e4": lambda z: 3e4 + 10 * z, "minus3e4": lambda z: -3e4 + z}


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_column_sum_splits_its_rows_when_its_columns_give_few_programs(backend, device, rng):
    """The bias gradient's column sum: in one launch for few rows, else float32 partial sums of
    row ranges (enough programs to stream a large gradient: the H200 took 182 us for linear's
    8192 x 4096 bfloat16 bias gradient in 64 programs, torch 32) and their sum in a second
    launch; against a float64 sum for every dtype, on contiguous and transposed (strided)
    gradients, split counts from 1 to several, and the split ranges' edges (rows not a multiple
    of a range, of the row tile)."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import dense as kd

    assert kd.colsum_splits(255, 4096) == 1 and kd.colsum_splits(8192, 4096) == 9
    assert kd.colsum_splits(100_000, 70) == kd.COLSUM_TARGET_PROGRAMS // 2
    for dtype in gpu_dtypes_for(backend, device):
        for M, N, transposed in ((300, 3, False), (777, 70, True), (1043, 129, False), (9, 5, True)):
            g64 = randn(rng, N, M).t() if transposed else randn(rng, M, N)
            g = g64.to(device, dtype)
            assert g.is_contiguous() != transposed
            out = torch.full((N,), float("nan"), dtype=dtype, device=device)
            with interpreted_launches(device) as names:
                kd.colsum(g, out, ktriton.INTERPRET)
            want = g.double().sum(0)  # the rounded inputs' exact sum
            assert_close(out, want, dtype, k=max(M, 1), what=f"colsum {dtype} {M}x{N}")
            if device == "cpu":
                splits = kd.colsum_splits(M, N)
                assert names == ["_colsum_kernel"] * (1 if splits == 1 else 2), (M, N, splits)
                assert (splits > 1) == (M >= 2 * kd.COLSUM_MIN_ROWS)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_linear_past_the_launch_bound_runs_in_blocks(backend, device, rng, monkeypatch):
    """A matmul whose rows, columns or inner length pass MATMUL_MAX_DIM (2^30: the kernels number
    rows and columns in int32 and step an int32 K) runs as row / column blocks, and an inner
    length past it as float32 partial products summed before the bias, the activation and the
    rounding: with the bound lowered to 24, a linear layer of 37 rows, 35 inputs and 33 outputs
    passes it in every dimension of its forward, input gradient and weight gradient (the weight
    gradient's inner length is the rows). Against the reference, fused activations included."""
    from gpu_nn.kernels.triton import dense as kd

    monkeypatch.setattr(kd, "MATMUL_MAX_DIM", 24)
    x64, w64, b64, g64 = randn(rng, 37, 35), randn(rng, 33, 35), randn(rng, 33), randn(rng, 37, 33)
    for activation in (None, "tanh"):
        dtype = torch.float32
        got, want = [], []
        for be, dev, out in ((backend, device, got), ("reference", "cpu", want)):
            x, w, b = (t.to(dev, dtype).requires_grad_() for t in (x64, w64, b64))
            with gpu_nn.backend(be), interpreted_launches(dev) as names:
                y = F.linear(x, w, b, activation=activation)
                out += [y, *torch.autograd.grad(y, (x, w, b), g64.to(dev, dtype))]
            if dev == "cpu" and be == "triton":  # 2 x 2 x 2 blocks a product
                assert names.count("_matmul_kernel") == 24, names
        for a, e, what in zip(got, want, ("y", "dx", "dw", "db")):
            assert_close(a, e, dtype, k=37, what=f"{activation} {what}")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_softmax_and_cross_entropy_past_their_launch_limits(backend, device, rng, monkeypatch):
    """Sizes the Triton softmax / cross-entropy kernels cannot index, with the limits lowered:
    a row length in ROW_LENGTH_WRAP (within a loop tile of 2^31 - 1, where the kernels' int32
    loop counter wraps and never ends) is refused with a KernelInputError before any kernel,
    forward and backward, on every softmax path (rows, middle dim, moved dim) and for the classes
    of cross entropy, while the reference takes it; cross entropy past CE_ROWS_MAX rows is
    refused on its row kernels, not on the middle-dim ones (int64 rows); a softmax past
    SOFTMAX_ROWS_MAX rows (one program a row on grid x) runs as launches over row blocks,
    against the reference."""
    from gpu_nn._errors import KernelInputError
    from gpu_nn.kernels.triton import dense as kd
    from gpu_nn.ops import dense as od

    monkeypatch.setattr(od, "ROW_LENGTH_WRAP", (5, 7))
    x, t = randn(rng, 3, 6, 4).float().to(device), torch.tensor([0, 5, 2], device=device)
    for name in SOFTMAX:
        ours = SOFTMAX[name][0]
        for dim in (1, -1):  # the middle dim, the rows (lengths 6 and 4)
            with gpu_nn.backend(backend), interpreted_launches(device) as names:
                if dim == 1:
                    with pytest.raises(KernelInputError, match="a dimension of 6 would wrap"):
                        ours(x, dim)
                else:
                    ours(x, dim)
            assert names == [] or dim == -1
        xt = x.transpose(1, 2)  # a moved dim of 6
        with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="a dimension of 6"):
            ours(xt, 2)
        y = ours(x.detach().cpu().double(), 1)  # the reference takes it
        with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="a dimension of 6"):
            op = torch.ops.gpu_nn.log_softmax_backward if name == "log_softmax" else torch.ops.gpu_nn.softmax_backward
            op(x, x, 1)
    with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="a dimension of 6"):
        F.cross_entropy(x[:, :, 0], t)
    assert y.shape == x.shape
    monkeypatch.setattr(od, "ROW_LENGTH_WRAP", (2**31 - 2**16, 2**31))
    monkeypatch.setattr(od, "CE_ROWS_MAX", 2)
    with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="3 rows are past the 2"):
        F.cross_entropy(x[:, :, 0], t)
    # [N, C, d] logits with 40 positions a class take the middle-dim kernels, which index rows in
    # int64: 80 rows run there
    xm, tm = randn(rng, 2, 3, 40).float().to(device), torch.from_numpy(rng.integers(0, 3, (2, 40))).to(device)
    with gpu_nn.backend(backend):
        got = F.cross_entropy(xm, tm)
    with gpu_nn.backend("reference"):
        want = F.cross_entropy(xm.cpu().double(), tm.cpu())
    assert_close(got, want, torch.float32, k=80, what="middle-dim cross entropy past CE_ROWS_MAX")
    monkeypatch.setattr(kd, "SOFTMAX_ROWS_MAX", 5)
    xr = randn(rng, 3, 4, 7).float()
    g = randn(rng, 3, 4, 7).float()
    for name, (ours, _) in SOFTMAX.items():
        a = xr.to(device).requires_grad_()
        with gpu_nn.backend(backend), interpreted_launches(device) as names:
            y = ours(a, -1)
            (dx,) = torch.autograd.grad(y, a, g.to(device))
        if device == "cpu":  # 12 rows in blocks of 5: three launches each way
            assert len(names) == 6, names
        with gpu_nn.backend("reference"):
            b = xr.double().requires_grad_()
            yr = ours(b, -1)
            (dxr,) = torch.autograd.grad(yr, b, g.double())
        assert_close(y, yr, torch.float32, k=7, what=f"{name} row blocks")
        assert_close(dx, dxr, torch.float32, k=7, what=f"{name} row blocks, gradient")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: 2^31 rows under the interpreter take hours")
def test_column_sum_over_two_to_the_31_rows_on_the_gpu():
    """The bias gradient's column sum over 2^31 - 5 rows, where the split sum's last range ended
    past 2^31 - 1 in int32 and dropped out, and over 2^31 + 5 (an int64 row count, where the high
    splits read before the tensor): an expanded (zero-stride) column of ones, no memory. (The
    matmul's blocks past 2^30 are the lowered-bound test's, which runs here too: a real linear of
    2^31 rows and one feature computes full tiles at float32 FMA speed, minutes a launch.)"""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import dense as kd

    for M in (2**31 - 5, 2**31 + 5):
        g = torch.ones(1, 1, device="cuda").expand(M, 1)
        out = torch.full((1,), float("nan"), device="cuda")
        kd.colsum(g, out, ktriton.INTERPRET)
        assert abs(out.item() - M) <= 1e-5 * M, (M, out.item())


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name", SOFTMAX)
@pytest.mark.parametrize("path", ["single-small", "single-full", "loop-one-over", "loop-long"])
@pytest.mark.parametrize("logits", LARGE_LOGITS)
def test_softmax_large_logits_every_backend(backend, device, name, path, logits, rng):
    """Issue 20: logits whose exp overflows (or underflows to 0 in every column) on every backend,
    float32 and float16, in the one-block and the looped kernel: a missing max subtraction gives
    NaN. Error against float64 torch on the same rounded inputs: at most twice torch's own."""
    ours, theirs = SOFTMAX[name]
    n = _softmax_path_sizes()[path]
    z = randn(rng, 3, n)
    dtypes = (torch.float32, torch.float16) + ((torch.float64,) if backend == "reference" else ())
    for dtype in dtypes + tuple(d for d in gpu_dtypes_for(backend, device) if d not in dtypes):
        x = LARGE_LOGITS[logits](z).to(dtype)
        assert torch.isfinite(x).all()
        truth = theirs(x.double(), 1)
        xg = x.to(device).requires_grad_()
        with gpu_nn.backend(backend):
            y = ours(xg, 1)
            g = randn(rng, *y.shape).to(device=device, dtype=dtype)
            (gx,) = torch.autograd.grad(y, xg, g)
        assert y.dtype == dtype and torch.isfinite(y).all(), f"{name} {dtype}: non-finite output"
        xt = x.clone().requires_grad_()
        yt = theirs(xt, 1)
        (gt,) = torch.autograd.grad(yt, xt, g.cpu())
        x64 = x.double().requires_grad_()
        (g64,) = torch.autograd.grad(theirs(x64, 1), x64, g.cpu().double())
        assert_like_torch(y, yt, truth, dtype, k=n, what=f"{name} {dtype}")
        assert_like_torch(gx, gt, g64, dtype, k=n, what=f"{name} backward {dtype}")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("name", SOFTMAX)
def test_softmax_looped_rows_place_nan_and_inf_as_torch(backend, device, name, rng):
    """The looped row kernel's online pass (dense.py ``_row_stats`` / ``_online_exp_sum``, one exp
    per element) on rows longer than one block, each with NaN, +inf, only -inf, +inf and -inf
    together, or -inf lanes around finite ones, in the first block, the last or both: values
    and NaN / inf placement as torch's, forward and backward (rows of -inf and finite values
    finite and close)."""
    ours, theirs = SOFTMAX[name]
    n = _softmax_path_sizes()["loop-long"]
    inf, nan = float("inf"), float("nan")
    for dtype in gpu_dtypes_for(backend, device):
        x = randn(rng, 8, n).to(dtype)
        x[0, 3], x[1, n - 2], x[2] = nan, inf, -inf
        x[3, 1], x[3, n - 1] = inf, -inf
        x[4, : n // 2] = -inf  # every lane -inf in the first blocks, then finite values
        x[5, n - 5:] = inf
        x[6, 0], x[6, n - 1] = inf, nan
        xg = x.to(device).requires_grad_()
        with gpu_nn.backend(backend):
            y = ours(xg, 1)
            g = randn(rng, *y.shape).to(device=device, dtype=dtype)
            (gx,) = torch.autograd.grad(y, xg, g)
        xt = x.clone().requires_grad_()
        yt = theirs(xt, 1)
        (gt,) = torch.autograd.grad(yt, xt, g.cpu())
        for a, b, what in ((y, yt, "forward"), (gx, gt, "backward")):
            a = a.cpu()
            assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name} {dtype} {what}: NaN placement"
            assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{name} {dtype} {what}: inf placement"
            fin = torch.isfinite(b)
            assert_close(a[fin], b[fin], dtype, k=n, what=f"{name} {dtype} {what}")


@pytest.mark.parametrize("name", SOFTMAX)
def test_softmax_reference_finite_differences(name, rng):
    ours, _ = SOFTMAX[name]
    x = randn(rng, 3, 4, 5, requires_grad=True)
    with gpu_nn.backend("reference"):
        assert torch.autograd.gradcheck(lambda x: ours(x, 1), (x,))


# =========================================================================== cross_entropy


def _ce_inputs(rng, shape, prob, weight, ignore, dtype=torch.float64):
    C = shape[0] if len(shape) == 1 else shape[1]
    x = randn(rng, *shape, dtype=dtype) * 2
    if prob:
        t = torch.from_numpy(rng.random(shape)).to(dtype)
    else:
        tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
        t = torch.from_numpy(rng.integers(0, C, tshape))
        if ignore is not None and t.numel():
            t.view(-1)[::3] = ignore
    w = torch.from_numpy(rng.random(C) + 0.3).to(dtype) if weight else None
    return x, t, w


CE_SHAPES = [(11,), (7, 13), (4, 6, 3, 2), (0, 5), (1, 1)]


@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_reference_matches_torch(shape, prob, weight, reduction, smoothing, rng):
    ignore = None if prob else 2
    x, t, w = _ce_inputs(rng, shape, prob, weight, ignore)
    x.requires_grad_()
    if prob:
        t.requires_grad_()
    kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
    if ignore is not None:
        kw["ignore_index"] = ignore
    with gpu_nn.backend("reference"):
        y = F.cross_entropy(x, t, **kw)
    yt = TF.cross_entropy(x, t, **kw)
    assert y.shape == yt.shape and y.dtype == yt.dtype
    e = [assert_close(y, yt, torch.float64, what="cross_entropy")]
    if x.numel() == 0:
        return
    g = randn(rng, *yt.shape)
    with gpu_nn.backend("reference"):
        gs = _grads(y, [x, t], g)
    for a, b in zip(gs, _grads(yt, [x, t], g)):
        e.append(assert_close(a, b, torch.float64, what="cross_entropy backward"))
    _note("cross_entropy", *e)


def test_cross_entropy_uint8_target_default_ignore_and_legacy_args(rng):
    x = randn(rng, 6, 5)
    t = torch.tensor([0, 1, 4, 3, 2, 1], dtype=torch.uint8)
    torch.testing.assert_close(F.cross_entropy(x, t), TF.cross_entropy(x, t))
    t2 = torch.tensor([0, -100, 4, -100, 2, 1])
    torch.testing.assert_close(F.cross_entropy(x, t2), TF.cross_entropy(x, t2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(F.cross_entropy(x, t2, reduce=False), TF.cross_entropy(x, t2, reduce=False))
        torch.testing.assert_close(F.cross_entropy(x, t2, size_average=False), TF.cross_entropy(x, t2, size_average=False))


@pytest.mark.parametrize("prob", [False, True])
def test_cross_entropy_reference_finite_differences(prob, rng):
    x, t, w = _ce_inputs(rng, (5, 7, 2), prob, True, None if prob else 1)
    x.requires_grad_()
    kw = dict(weight=w, label_smoothing=0.2)
    if not prob:
        kw["ignore_index"] = 1
    with gpu_nn.backend("reference"):
        if prob:
            t.requires_grad_()
            assert torch.autograd.gradcheck(lambda x, t: F.cross_entropy(x, t, **kw), (x, t))
        else:
            assert torch.autograd.gradcheck(lambda x: F.cross_entropy(x, t, **kw), (x,))


@pytest.mark.parametrize("shape", [(11,), (7, 13), (4, 6, 3, 2), (1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("special", [False, True])
def test_cross_entropy_index_path_equals_general_path(shape, dtype, weight, ignore, special, rng, monkeypatch):
    """The reference's path for class indices without label smoothing (reference.dense
    _ce_index_rows / _ce_index_backward, fewer NumPy calls) gives the general path's values
    bit for bit: losses, row statistics and input gradients (from the statistics and without),
    every reduction, ignored targets (some, all: 'mean' is then 0 / 0), weights, and logits
    holding +-inf and NaN."""
    C = shape[0] if len(shape) == 1 else shape[1]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    t = rng.integers(0, C, tshape)
    if special:
        x.reshape(-1)[[0, -1]] = [np.inf, -np.inf]
        if x.size > 4:
            x.reshape(-1)[2] = np.nan
    ii = -100
    if ignore != "none":
        ii = C - 1 if ignore == "some" else -7
        if ignore == "all":
            t = np.full(tshape, ii)
        else:
            t.reshape(-1)[: max(1, t.size // 3)] = ii
    w = (rng.random(C) + 0.5).astype(dtype) if weight else None
    for reduction in R.REDUCTIONS:
        outs, g = [], None
        for fast in (True, False):
            monkeypatch.setattr(R, "INDEX_PATH", fast)
            loss, stats = R.cross_entropy_forward(x, t, w, ii, reduction, 0.0)
            if g is None:
                g = np.asarray(rng.standard_normal(loss.shape), dtype)
            outs.append((loss, stats, R.cross_entropy_backward(g, x, t, w, ii, reduction, 0.0, lse=stats),
                         R.cross_entropy_backward(g, x, t, w, ii, reduction, 0.0)))
        for what, a, b in zip(("loss", "stats", "grad", "grad without stats"), *outs):
            assert a.shape == b.shape and a.dtype == b.dtype, (what, reduction)
            np.testing.assert_array_equal(a, b, err_msg=f"{what} {reduction}")


# =========================================================================== opcheck


def test_opcheck_every_op(rng):
    ops = torch.ops.gpu_nn
    x = randn(rng, 3, 4, 5, requires_grad=True)
    w = randn(rng, 6, 5, requires_grad=True)
    b = randn(rng, 6, requires_grad=True)
    for act in ACTS:
        torch.library.opcheck(ops.linear.default, (x, w, b, act))
        y = TORCH_ACT[act](TF.linear(x, w, b)).detach()
        g = randn(rng, *y.shape)
        torch.library.opcheck(ops.linear_backward.default, (g, x.detach(), w.detach(), y if act else None, act, True))
    torch.library.opcheck(ops.linear.default, (x, w, None, None))
    torch.library.opcheck(ops.linear_backward.default, (randn(rng, 3, 4, 6), x.detach(), w.detach(), None, None, False))
    for need in ((False, True), (True, False)):  # a gradient not wanted: not computed, an empty placeholder
        torch.library.opcheck(ops.linear_backward.default, (randn(rng, 3, 4, 6), x.detach(), w.detach(), None, None,
                                                            True, *need))
    for name in ("softmax", "log_softmax"):
        torch.library.opcheck(getattr(ops, name).default, (x, 1))
        y = getattr(torch, name)(x, 1).detach()
        torch.library.opcheck(getattr(ops, name + "_backward").default, (randn(rng, 3, 4, 5), y, 1))
    for prob in (False, True):
        for red in ("mean", "none"):
            xc, t, wc = _ce_inputs(rng, (4, 7, 3), prob, True, None if prob else 1)
            xc.requires_grad_()
            ii = -100 if prob else 1
            if prob:
                t.requires_grad_()
            torch.library.opcheck(ops.cross_entropy.default, (xc, t, wc, red, ii, 0.1))
            loss, lse = ops.cross_entropy.default(xc.detach(), t.detach(), wc, red, ii, 0.1)
            g = randn(rng, *loss.shape)
            torch.library.opcheck(ops.cross_entropy_backward.default,
                                  (g, xc.detach(), t.detach(), wc, lse, red, ii, 0.1, prob))


def test_compile_fullgraph_through_dense_ops(rng):
    x = randn(rng, 5, 2, 3, dtype=torch.float32)
    t = torch.from_numpy(rng.integers(0, 4, (5,)))
    lin = gnn.Linear(6, 4, activation="tanh")

    def f(x):
        h = F.flatten(x, 1)
        return F.cross_entropy(F.log_softmax(lin(h), 1), t, label_smoothing=0.1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


# =========================================================================== bad input


def _raises(match, fn):
    with pytest.raises(gpu_nn.KernelInputError, match=match):
        fn()


@pytest.mark.parametrize("shape", [(2, 4), (2, 3, 4), (4,)], ids=str)
def test_linear_dtype_mismatch_words_are_torchs(shape):
    """Every input / weight / bias dtype combination torch refuses, refused in its words, which
    depend on the bias (addmm checks the bias against the weight first, then input against
    weight; mm without a bias words it 'expected m1 and m2 ...', integer names included)."""
    dts = (torch.float32, torch.float64, torch.float16, torch.int64)
    seen = 0
    for dx, dw, db in itertools.product(dts, dts, dts + (None,)):
        x, w = torch.ones(*shape, dtype=dx), torch.ones(3, 4, dtype=dw)
        b = None if db is None else torch.ones(3, dtype=db)
        try:
            TF.linear(x, w, b)
            continue  # torch computes it (ours may refuse integers and CPU half: not this test's subject)
        except RuntimeError as e:
            want = str(e)
        with pytest.raises(gpu_nn.KernelInputError) as info:
            F.linear(x, w, b)
        assert str(info.value) == want, (dx, dw, db)
        seen += 1
    assert seen > 40


def test_messages_word_numbers_and_dtypes_as_torch():
    """torch's exact words where an error audit found ours differ: C++'s printing of a double
    (label_smoothing 2.0 is "Got: 2"), the probability target's weight-shape prefix, and complex
    dtypes by torch's names (c10::complex<float>, ComplexFloat) where ours printed torch.complex64."""
    x = torch.randn(3, 5)
    calls = [
        lambda f: f.cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=2.0),
        lambda f: f.cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=1.0000001),
        lambda f: f.cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=3.14159265),
        lambda f: f.cross_entropy(x, torch.rand(3, 5), weight=torch.rand(4)),
        lambda f: f.cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.rand(4)),
        lambda f: f.linear(x.cfloat(), torch.randn(2, 5)),
        lambda f: f.linear(x, torch.randn(2, 5).cdouble()),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as theirs:
            call(TF)
        with pytest.raises(gpu_nn.KernelInputError) as ours:
            call(F)
        assert str(ours.value) == str(theirs.value)


def test_bad_input():
    x = torch.randn(3, 5)
    _raises(r"mat1 and mat2 shapes cannot be multiplied \(3x5 and 6x4\)", lambda: F.linear(x, torch.randn(4, 6)))
    _raises(r"mat1 and mat2 shapes cannot be multiplied \(6x5 and 6x4\)", lambda: F.linear(torch.randn(2, 3, 5), torch.randn(4, 6)))
    _raises("expected m1 and m2 to have the same dtype, but got: float != double",
            lambda: F.linear(x, torch.randn(4, 5, dtype=torch.float64)))
    _raises("must have the same dtype", lambda: F.linear(x, torch.randn(4, 5), torch.randn(4, dtype=torch.float64)))
    _raises("The expanded size of the tensor", lambda: F.linear(x, torch.randn(4, 5), torch.randn(3)))
    _raises("at least 1D", lambda: F.linear(torch.randn(()), torch.randn(4, 5)))
    _raises("unknown activation", lambda: F.linear(x, torch.randn(4, 5), activation="gelu"))
    _raises("floating-point", lambda: F.linear(x.long(), torch.randn(4, 5).long()))
    _raises(r"Target 7 is out of bounds\.", lambda: F.cross_entropy(x, torch.tensor([0, 1, 7])))
    _raises(r"Target -3 is out of bounds\.", lambda: F.cross_entropy(x, torch.tensor([0, 1, -3])))
    _raises(r"Expected input batch_size \(3\) to match target batch_size \(4\)\.",
            lambda: F.cross_entropy(x, torch.tensor([0, 1, 2, 3])))
    _raises(r"Expected input batch_size \(3\) to match target batch_size \(4\)\.",
            lambda: F.cross_entropy(torch.randn(3, 5, 2), torch.zeros(4, 2, dtype=torch.long)))
    _raises("foo is not a valid value for reduction", lambda: F.cross_entropy(x, torch.tensor([0, 1, 2]), reduction="foo"))
    _raises("weight tensor should be defined either for all 5 classes",
            lambda: F.cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.rand(4)))
    _raises("expected target dtype to be Long or Byte, but got Float", lambda: F.cross_entropy(x, torch.tensor([0.0, 1, 2])))
    _raises("expected target dtype to be Long or Byte, but got Int",
            lambda: F.cross_entropy(x, torch.tensor([0, 1, 2], dtype=torch.int32)))
    _raises("multi-target not supported", lambda: F.cross_entropy(x, torch.randn(3, 4)))
    _raises("multi-target not supported", lambda: F.cross_entropy(x, torch.zeros(3, 2, dtype=torch.long)))
    _raises(r"Expected input batch_size \(3\) to match target batch_size \(0\)\.", lambda: F.cross_entropy(x, torch.tensor(1)))
    _raises(r"Expected input batch_size \(3\) to match target batch_size \(2\)\.",
            lambda: F.cross_entropy(x, torch.zeros(2, 2, dtype=torch.long)))
    _raises("label_smoothing must be between 0.0 and 1.0. Got: 1.5",
            lambda: F.cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=1.5))
    _raises(r"Expected target size \[3, 4\], got \[3, 5\]", lambda: F.cross_entropy(torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.long)))
    _raises("ignore_index is not supported for floating point target", lambda: F.cross_entropy(x, torch.rand(3, 5), ignore_index=1))
    _raises("Expected floating point type for target with class probabilities, got Long",
            lambda: F.cross_entropy(x, torch.zeros(3, 5, dtype=torch.long)))
    _raises(r"Dimension out of range \(expected to be in range of \[-2, 1\], but got 2\)", lambda: F.softmax(x, 2))
    _raises(r"Dimension out of range \(expected to be in range of \[-2, 1\], but got -3\)", lambda: F.log_softmax(x, -3))
    _raises("not implemented for 'Long'", lambda: F.softmax(x.long(), 1))
    _raises(r"Dimension out of range", lambda: F.flatten(x, 2))
    _raises("start_dim cannot come after end_dim", lambda: F.flatten(x, 1, 0))
    with pytest.raises(ValueError):  # a KernelInputError is a ValueError and a RuntimeError
        F.cross_entropy(x, torch.tensor([0, 1, 9]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_weight_requiring_grad_as_torch(reduction, smoothing):
    """A weight that requires grad: with probability targets torch differentiates it, and so do
    we (float64, against torch); with class indices torch refuses at the forward, and so do we,
    with its message (no silent None gradient)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, 3, dtype=torch.float64, generator=g)
    p = torch.softmax(torch.randn(4, 5, 3, dtype=torch.float64, generator=g), 1)
    w = torch.rand(5, dtype=torch.float64, generator=g) + 0.1
    got, want = [], []
    for f, out in ((F.cross_entropy, got), (TF.cross_entropy, want)):
        xs, ps, ws = (t.clone().requires_grad_() for t in (x, p, w))
        loss = f(xs, ps, ws, reduction=reduction, label_smoothing=smoothing)
        out.append(loss.detach())
        out.extend(torch.autograd.grad(loss.sum(), [xs, ps, ws]))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    ws = w.clone().requires_grad_()
    idx = torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 1], [2, 0, 4]])
    for f in (F.cross_entropy, TF.cross_entropy):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
            f(x, idx, ws, reduction=reduction, label_smoothing=smoothing)
    with torch.no_grad():  # no gradient wanted: the weight's flag does not matter
        torch.testing.assert_close(F.cross_entropy(x, idx, ws), TF.cross_entropy(x, idx, ws), rtol=1e-12, atol=0)


_CE_ORDER_INPUTS = {  # (input shape, target shape, target dtype) of class-index targets, C = 5
    "2d": ((3, 5), (3,), torch.int64), "3d": ((3, 5, 4), (3, 4), torch.int64),
    "4d": ((3, 5, 4, 2), (3, 4, 2), torch.int64), "5d": ((3, 5, 4, 2, 2), (3, 4, 2, 2), torch.int64),
    "unbatched": ((5,), (), torch.int64), "2d-target-rank": ((3, 5), (3, 2), torch.int64),
    "4d-target-rank": ((3, 5, 4, 2), (3, 4), torch.int64), "4d-target-size": ((3, 5, 4, 2), (3, 4, 3), torch.int64),
    "3d-target-size": ((3, 5, 4), (3, 5), torch.int64), "batch": ((3, 5), (2,), torch.int64),
    "target-int32": ((3, 5), (3,), torch.int32),
}


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("wshape,wdtype", [((5,), torch.float32), ((6,), torch.float32), ((5,), torch.float64),
                                           ((1, 5), torch.float32)], ids=["w", "w-size", "w-dtype", "w-2d"])
@pytest.mark.parametrize("case", list(_CE_ORDER_INPUTS))
def test_cross_entropy_weight_requiring_grad_refused_in_torchs_order(case, wshape, wdtype, grad):
    """Class-index targets with a weight that requires grad: torch refuses the weight's gradient
    where its nll_loss autograd kernel is entered, after the batch check (and, for a rank that is
    reshaped, the target size) but before the kernel's checks of the target's rank, sizes and
    dtype and of the weight; naming nll_loss2d_forward for every input of rank 3 and up. Ours
    checked those first and always named nll_loss_forward (an audit). The same error type and
    words as torch's, or the same values where torch computes (under no_grad)."""
    if case == "target-int32" and not grad and torch.__version__ < (2, 13):
        pytest.skip("torch before 2.13 refuses an int32 target after the weight's checks, in other words ('expected "
                    "scalar type Long but found Int'); ours has 2.13's order and words")
    xshape, tshape, tdtype = _CE_ORDER_INPUTS[case]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*xshape, generator=g)
    t = torch.randint(0, 5, tshape, generator=g).to(tdtype)
    w = (torch.rand(*wshape, generator=g) + 0.1).to(wdtype).requires_grad_()
    outcomes = []
    for f in (F.cross_entropy, TF.cross_entropy):
        with torch.set_grad_enabled(grad):
            try:
                outcomes.append(("value", f(x, t, w).detach()))
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                outcomes.append((type(exc), str(exc)))
    (kind, got), (want_kind, want) = outcomes
    if want_kind == "value":
        assert kind == "value", got
        torch.testing.assert_close(got, want)
    else:
        assert kind != "value" and issubclass(kind, gpu_nn.KernelInputError) and issubclass(kind, want_kind)
        assert got == want


# class indices with a [4, 0, 3] input are left out: torch itself fails there ('size mismatch' in
# its nll_loss2d), so there is nothing to compare
@pytest.mark.parametrize("shape,prob", [((4, 0), True), ((4, 0, 3), True), ((0,), True), ((4, 0), False), ((0,), False)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_without_classes_as_torch(shape, prob, reduction):
    """An empty class dim (C = 0): torch's values, signs of zero included (probability targets
    -0, class indices +0 where every target is ignored, 'mean' NaN) and an empty gradient,
    where the NumPy reference could not reshape [M, 0] rows; a class index is out of range."""
    x = torch.randn(*shape, dtype=torch.float64)
    target = torch.randn(*shape, dtype=torch.float64) if prob else torch.full(shape[:1] if len(shape) > 1 else (), -100)
    out, grads = [], []
    for f in (F.cross_entropy, TF.cross_entropy):
        xs = x.clone().requires_grad_()
        y = f(xs, target, reduction=reduction)
        out.append(y.detach())
        grads.append(torch.autograd.grad(y.sum(), xs)[0])
    a, b = out
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.signbit(a), torch.signbit(b))
    torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    assert grads[0].shape == grads[1].shape == x.shape
    if not prob and len(shape) > 1:
        with pytest.raises(IndexError, match="Target 0 is out of bounds"):
            F.cross_entropy(x, torch.tensor([0, -100, -100, -100]), reduction=reduction)


def test_elementwise_mean_is_torchs_deprecated_mean():
    x, t = torch.randn(3, 5, dtype=torch.float64), torch.tensor([1, 2, 3])
    with pytest.warns(UserWarning, match="elementwise_mean' is deprecated"):
        got = F.cross_entropy(x, t, reduction="elementwise_mean")
    torch.testing.assert_close(got, TF.cross_entropy(x, t), rtol=1e-15, atol=0)


def test_bad_input_raises_torchs_exception_type():
    """Where torch raises IndexError, TypeError or NotImplementedError, ours is one too (and a
    KernelInputError), with torch's message: code that catches torch's type keeps working."""
    import types

    torch_ns = types.SimpleNamespace(softmax=TF.softmax, log_softmax=TF.log_softmax, flatten=torch.flatten,
                                     cross_entropy=TF.cross_entropy)
    x = torch.randn(3, 5)
    calls = [
        lambda f: f.softmax(x, 2), lambda f: f.log_softmax(x, -3),
        lambda f: f.softmax(x.long(), 1), lambda f: f.log_softmax(x.long(), 1),
        lambda f: f.flatten(x, 2), lambda f: f.flatten(x, 0, -3), lambda f: f.flatten(x, "a"),
        lambda f: f.flatten(x, 0, "b"), lambda f: f.flatten(x, True), lambda f: f.flatten(x, 1.0),
        lambda f: f.cross_entropy(x, torch.tensor([0, 1, 7])), lambda f: f.cross_entropy(x, torch.tensor([0, 1, -3])),
        lambda f: f.cross_entropy(x.reshape(3, 5, 1), torch.tensor([[0], [1], [9]])),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(Exception) as theirs:
            call(torch_ns)
        with pytest.raises(gpu_nn.KernelInputError) as ours:
            call(F)
        assert type(theirs.value) in (IndexError, TypeError, NotImplementedError), (i, theirs.value)
        assert isinstance(ours.value, type(theirs.value)), (i, type(ours.value), type(theirs.value), theirs.value)
        assert str(theirs.value).splitlines()[0] in str(ours.value), (i, ours.value, theirs.value)


@pytest.mark.parametrize("arg", [[1.0, 2.0], np.zeros(2), None], ids=["list", "ndarray", "None"])
@pytest.mark.parametrize("call", ["F.softmax", "F.log_softmax", "nn.Softmax", "nn.LogSoftmax", "nn.Flatten", "flatten",
                                  "nn.Linear"])
def test_non_tensors_get_torchs_error_type_and_words(call, arg):
    """Not a tensor: torch's exception type and words. torch.nn.functional's softmax / log_softmax
    (and the modules over them) and nn.Flatten call the argument's method (an AttributeError, an
    ndarray's own TypeError), torch.flatten and linear its parser (TypeError); ours raised the
    parser's TypeError everywhere (an audit)."""
    def run(lib, fn_lib):
        return {"F.softmax": lambda: fn_lib.softmax(arg, 0), "F.log_softmax": lambda: fn_lib.log_softmax(arg, 0),
                "nn.Softmax": lambda: lib.Softmax(0)(arg), "nn.LogSoftmax": lambda: lib.LogSoftmax(0)(arg),
                "nn.Flatten": lambda: lib.Flatten()(arg),
                "flatten": lambda: (torch.flatten if fn_lib is TF else F.flatten)(arg),
                "nn.Linear": lambda: lib.Linear(2, 2)(arg)}[call]()

    with pytest.raises((AttributeError, TypeError)) as want:
        run(torch.nn, TF)
    with pytest.raises(gpu_nn.KernelInputError) as got:
        run(gpu_nn.nn, F)
    assert isinstance(got.value, type(want.value)) and str(got.value) == str(want.value)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("shape", [(2, 3), (1, 3, 40)], ids=["rows", "middle-dim"])
def test_an_infinite_class_weight_leaves_class_target_gradients_finite_as_torchs(backend, device, shape):
    """A class weight of inf that no row targets, label_smoothing 0: torch's loss and gradient are
    finite (the weight enters only the smoothing term, which is 0 x ... and absent); the Triton
    backwards computed (eps / C)(w_tot p - w) anyway, 0 x inf = NaN in every gradient element (the
    forward already left it out; a non-finite-values audit). Both layouts' kernels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    t = torch.zeros((shape[0],) + tuple(shape[2:]), dtype=torch.long)
    t[..., ::2] = 1
    w = torch.tensor([1.0, 2.0, float("inf")])
    for reduction in ("mean", "sum", "none"):
        got = []
        for fn in (F.cross_entropy, TF.cross_entropy):
            xs = x.clone().to(device).requires_grad_()
            with gpu_nn.backend(backend):
                loss = fn(xs, t.to(device), weight=w.to(device), reduction=reduction)
                (gx,) = torch.autograd.grad(loss.sum(), xs)
            got.append((loss.detach().cpu(), gx.cpu()))
        assert torch.isfinite(got[1][1]).all()
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_probability_target_gradient_scales_before_a_huge_logp(backend, device, label_smoothing):
    """d loss / d target = -(1 - eps) s w logp: with logp -3.4e38, a class weight of 3 and 'mean'
    over 13 rows the product is 7.8e37, finite, as torch's; the reference formed w logp first and
    overflowed to inf (a non-finite-values audit). 'none' with a grad_output of 1 / 13 too."""
    N = 13
    x = torch.ones(N, 5)
    x[0] = torch.tensor([3.4e38, -3.4e38, 0.0, 1.0, 2.0])
    p, w = torch.full((N, 5), 0.2), torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    for reduction, go in (("mean", None), ("none", torch.full((N,), 1 / 13))):
        got = []
        for fn in (F.cross_entropy, TF.cross_entropy):
            t = p.clone().to(device).requires_grad_()
            with gpu_nn.backend(backend):
                loss = fn(x.to(device), t, weight=w.to(device), reduction=reduction, label_smoothing=label_smoothing)
                (g,) = torch.autograd.grad(loss, t, None if go is None else go.to(device))
            got.append(g.cpu())
        assert torch.isfinite(got[1][0, 2:]).all()
        torch.testing.assert_close(got[0], got[1], rtol=1e-6, atol=0)


# =========================================================================== Triton kernels vs reference


def _to(t, dtype, device, grad=False):
    if t is None:
        return None
    t = t.detach().to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return t.requires_grad_(grad)


def _round64(t, dtype):
    """The float64 tensor holding exactly the values ``t`` has in ``dtype``: the reference then
    sees the kernel's inputs, so the comparison measures the kernel alone."""
    if t is None or not t.is_floating_point():
        return t
    return t.detach().to(dtype).to(torch.float64)


def _check_backend(fn, args, diff, dtype, device, backend, k, what, gout_seed=0):
    """Run ``fn(*args)`` on ``backend`` in ``dtype`` and on the reference in float64 (same
    rounded inputs); compare the output and the gradients of the args indexed by ``diff``."""
    args64 = [_round64(a, dtype) if torch.is_tensor(a) else a for a in args]
    ref_in = [a.clone().requires_grad_(i in diff) if torch.is_tensor(a) and a.is_floating_point() else a
              for i, a in enumerate(args64)]
    with gpu_nn.backend("reference"):
        yr = fn(*ref_in)
    gen = torch.Generator().manual_seed(gout_seed)
    g64 = _round64(torch.randn(yr.shape, generator=gen, dtype=torch.float64), dtype)
    with gpu_nn.backend("reference"):
        gr = torch.autograd.grad(yr, [ref_in[i] for i in diff], g64) if diff else ()
    ins = [_to(a, dtype, device, grad=(i in diff)) if torch.is_tensor(a) else a for i, a in enumerate(args64)]
    with gpu_nn.backend(backend):
        y = fn(*ins)
        gs = torch.autograd.grad(y, [ins[i] for i in diff], g64.to(device=device, dtype=y.dtype)) if diff else ()
    assert y.dtype == (dtype if yr.dtype.is_floating_point else yr.dtype) and y.shape == yr.shape
    errs = [assert_close(y, yr, dtype, k=k, what=f"{what} forward {dtype}")]
    for a, b in zip(gs, gr):
        errs.append(assert_close(a, b, dtype, k=k, what=f"{what} backward {dtype}"))
    return max(errs)


KERNEL_ERR = {}


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("xshape,out,bias,noncontig", [
    ((67, 45), 37, True, False),     # several tiles on every side, partial tiles everywhere
    ((3, 5, 19), 33, False, False),  # leading dims, no bias
    ((9, 40), 17, True, True),       # non-contiguous input (a transposed view)
])
def test_linear_backend_matches_reference(backend, device, act, xshape, out, bias, noncontig, rng):
    for dtype in vs_reference_dtypes(backend, device):
        if noncontig:
            x = randn(rng, xshape[-1], *xshape[:-1]).movedim(0, -1)
        else:
            x = randn(rng, *xshape)
        w = randn(rng, out, xshape[-1]) * 0.3
        b = randn(rng, out) if bias else None
        args = [x, w, b]
        diff = [0, 1, 2] if bias else [0, 1]
        e = _check_backend(lambda x, w, b: F.linear(x, w, b, activation=act), args, diff, dtype, device, backend,
                           k=max(xshape[-1], x.numel() // xshape[-1]), what=f"linear {act}")
        KERNEL_ERR[(backend, "linear", str(dtype))] = max(KERNEL_ERR.get((backend, "linear", str(dtype)), 0), e)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_activation_and_bias_gradient_in_one_launch(backend, device, act, monkeypatch, rng):
    """A fused linear's backward at small M takes the activation's gradient and the bias gradient
    in one launch (_act_colsum_kernel): the activation kernel then the column sum, for
    every dtype (the bias gradient bitwise under the interpreter; compiled, the two reductions may
    add in other orders, so within rounding), at M below and above the one-launch bound (which then keeps the two), an N that
    is not a multiple of the block, M = 0; and the linear op takes it (against the reference)."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import dense as kd

    for dtype in gpu_dtypes_for(backend, device):
        for M, N in ((5, 70), (130, 3), (0, 9)):
            g = randn(rng, M, N).to(device, dtype)
            y = torch.sigmoid(randn(rng, M, N)).to(device, dtype) - (0.5 if act != "sigmoid" else 0.0)
            db2 = torch.full((N,), float("nan"), dtype=dtype, device=device)
            dg2 = kd.act_grad(g, y, act, ktriton.INTERPRET)
            kd.colsum(dg2, db2, ktriton.INTERPRET)
            for bound in (256, 100):  # 100: M = 130 over it, the two launches
                monkeypatch.setattr(kd, "ACT_COLSUM_MAX_ROWS", bound)
                db = torch.full((N,), float("nan"), dtype=dtype, device=device)
                with interpreted_launches(device) as names:
                    dg = kd.act_colsum(g, y, act, db, ktriton.INTERPRET)
                assert torch.equal(dg, dg2), (dtype, M, N, bound)
                if device == "cpu":  # the interpreter sums each column in the same order in both
                    assert torch.equal(db, db2), (dtype, M, N, bound)
                else:  # compiled, the two kernels' reductions may add in other orders (H200: float32
                    # M = 130 differed in the last bits for sigmoid / tanh): M terms' rounding apart
                    assert_close(db, db2, dtype, k=max(M, 1), what=f"bias gradient {dtype} M={M} N={N} bound={bound}")
                if device == "cpu":
                    one = M <= bound
                    assert names == (["_act_colsum_kernel"] if one else ["_act_bwd_kernel", "_colsum_kernel"])
    x, w, b = randn(rng, 7, 11), randn(rng, 13, 11) * 0.3, randn(rng, 13)
    _check_backend(lambda x, w, b: F.linear(x, w, b, activation=act), [x, w, b], [0, 1, 2], torch.float32, device,
                   backend, k=11, what=f"linear {act} one launch")


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name", SOFTMAX)
@pytest.mark.parametrize("shape,dim", [((6, 37), -1), ((3, 301), 1), ((4, 9, 5), 1), ((2, 0, 3), -1), ((), 0)])
def test_softmax_backend_matches_reference(backend, device, name, shape, dim, rng):
    ours, _ = SOFTMAX[name]
    for dtype in vs_reference_dtypes(backend, device):
        x = randn(rng, *shape) * 3
        e = _check_backend(lambda x: ours(x, dim), [x], [0], dtype, device, backend, k=shape[dim] if shape else 1,
                           what=name)
        KERNEL_ERR[(backend, name, str(dtype))] = max(KERNEL_ERR.get((backend, name, str(dtype)), 0), e)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("name", SOFTMAX)
def test_softmax_rows_in_place_and_strided_match_reference(backend, device, name, rng):
    """A last-dim softmax of a contiguous input runs on the tensors as they are (no [rows, n]
    view in or out); a transposed input, a non-last dim and an expanded gradient (from sum())
    take the general path. Both against the reference, values and gradients."""
    ours, _ = SOFTMAX[name]
    for dtype in vs_reference_dtypes(backend, device):
        x = randn(rng, 3, 5, 17) * 3
        for fn, k in ((lambda x: ours(x, -1), 17), (lambda x: ours(x, 2), 17), (lambda x: ours(x.transpose(1, 2), -1), 5),
                      (lambda x: ours(x.transpose(0, 2), 0), 17), (lambda x: ours(x[:, 1], 1), 17)):
            e = _check_backend(fn, [x], [0], dtype, device, backend, k=k, what=name)
            KERNEL_ERR[(backend, name, str(dtype))] = max(KERNEL_ERR.get((backend, name, str(dtype)), 0), e)
        xr = x.clone().requires_grad_()
        with gpu_nn.backend("reference"):
            ours(xr, -1).sum().backward()
        xt = x.to(device=device, dtype=dtype).requires_grad_()
        with gpu_nn.backend(backend):
            ours(xt, -1).sum().backward()  # the gradient reaching the backward is expanded (stride 0)
        assert_close(xt.grad, xr.grad, dtype, k=17, what=f"{name} expanded gradient {dtype}")


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("shape,prob,weight,reduction,smoothing", [
    ((9, 29), False, False, "mean", 0.0),
    ((9, 29), False, True, "mean", 0.2),
    ((5, 150), False, True, "sum", 0.1),      # a row longer than one block: looped
    ((3, 13, 2, 3), False, False, "none", 0.3),
    ((17,), False, True, "none", 0.0),
    ((7, 70), True, True, "mean", 0.2),
    ((4, 23, 3), True, False, "none", 0.0),
    ((0, 7), False, False, "sum", 0.0),
])
def test_cross_entropy_backend_matches_reference(backend, device, shape, prob, weight, reduction, smoothing, rng):
    for dtype in vs_reference_dtypes(backend, device):
        x, t, w = _ce_inputs(rng, shape, prob, weight, None if prob else 4)
        kw = dict(reduction=reduction, label_smoothing=smoothing)
        if not prob:
            kw["ignore_index"] = 4
        diff = [0, 1] if prob else [0]
        C = shape[0] if len(shape) == 1 else shape[1]
        e = _check_backend(lambda x, t, w: F.cross_entropy(x, t, w, **kw), [x, t, w], diff, dtype, device, backend,
                           k=C * max(x.numel() // max(C, 1), 1), what=f"cross_entropy {shape} prob={prob}")
        KERNEL_ERR[(backend, "cross_entropy", str(dtype))] = max(KERNEL_ERR.get((backend, "cross_entropy", str(dtype)), 0), e)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_cross_entropy_rows_of_many_tiles_like_torch(backend, device, prob, rng):
    """The row kernel's one pass over rows of several tiles (its running max one number per
    row, the lanes' sums moved only in tiles that raise it): against torch in float64 for rows
    whose max rises in every tile, sits in the first, or is reached late; a NaN or +inf in a
    middle tile; only -inf; -inf over the first tiles then finite, and with a NaN among them; a
    -inf logit under a zero weight; with and without weights and label smoothing, 'none' (the row losses themselves)
    and 'mean'."""
    from gpu_nn.kernels.triton import dense as kd

    # four tiles a row: the interpreter's are 64 wide (C = 200), a GPU's the widest block, 2048
    # (C = 6400; a row that fits one block runs in one tile there); positions scale with them
    f = (kd.ce_config(10**6, device == "cpu")[0]) // 64
    C = 200 * f
    x = torch.from_numpy(rng.standard_normal((10, C)) * 3)
    x[1] = torch.linspace(-5, 30, C, dtype=torch.float64)
    x[2] = torch.linspace(30, -5, C, dtype=torch.float64)
    x[3, 150 * f] = float("nan")
    x[4, 100 * f] = float("inf")
    x[5] = float("-inf")
    x[6, :140 * f] = float("-inf")
    x[7, 3] = float("-inf")
    x[8, 190 * f] = 40.0
    x[9, :64 * f] = float("-inf")  # a NaN while the row's max is still -inf (no max keeps a NaN)
    x[9, 5] = float("nan")
    w = torch.from_numpy(rng.random(C) + 0.2)
    w[3] = 0.0  # row 7's -inf logit: 0 * inf is NaN in the smoothing term, as torch's
    if prob:
        t = torch.softmax(torch.from_numpy(rng.standard_normal((10, C))), 1)
    else:
        t = torch.from_numpy(rng.integers(0, C, 10))
        t[6] = 150 * f  # a finite logit: the row's loss is finite without smoothing
    for weight in (None, w):
        for eps in (0.0, 0.1):
            for reduction in ("none", "mean"):
                kw = dict(weight=weight, label_smoothing=eps, reduction=reduction)
                xt = x.clone().requires_grad_()
                want = TF.cross_entropy(xt, t, **kw)
                (gwant,) = torch.autograd.grad(want.sum(), xt)
                xo = x.to(device, torch.float32).requires_grad_()
                with gpu_nn.backend(backend):
                    got = F.cross_entropy(xo, t.to(device) if not prob else t.to(device, torch.float32),
                                          weight=None if weight is None else weight.to(device, torch.float32),
                                          label_smoothing=eps, reduction=reduction)
                    (ggot,) = torch.autograd.grad(got.sum(), xo)
                got, ggot, want = got.detach().double().cpu(), ggot.double().cpu(), want.detach()
                what = f"prob={prob} weight={weight is not None} eps={eps} {reduction}"
                assert torch.equal(got.isnan(), want.isnan()), (what, got, want)
                assert torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0)), (what, got, want)
                fin = want.isfinite()
                assert_close(got[fin], want[fin], torch.float32, k=C, what=what)
                # the backward reads the forward's row statistics: NaN exactly where torch's is
                assert torch.equal(ggot.isnan(), gwant.isnan()), (what, ggot.isnan().sum(1), gwant.isnan().sum(1))


def test_bfloat16_softmax_like_torch():
    """bfloat16 softmax matches torch's within bfloat16's precision: compiled on a GPU and in
    the interpreter with gpu-nn's exact bfloat16 (kernels/triton/_compat.py)."""
    from gpu_nn import _backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not (_backend.status("triton")[0] and _backend.interpret_mode()):
        pytest.skip("TRITON_INTERPRET is not set in this session: triton cannot run on this CPU machine")
    x = torch.randn(3, 37, dtype=torch.bfloat16, device=device)
    with gpu_nn.backend("triton"):
        torch.testing.assert_close(F.softmax(x, 1).float(), torch.softmax(x.float(), 1), rtol=2e-2, atol=4e-3)


def test_heuristics_keep_dot_tiles_at_least_16():
    from gpu_nn.kernels.triton import dense as kd

    for dt in kd.DTYPES:
        for interp in (False, True):
            assert min(kd.matmul_config(dt, interp)[:3]) >= 16
        for prec in ("ieee", "tf32"):
            cands = kd.matmul_candidates(dt, prec)
            assert 3 <= len(cands) <= 5 and len(set(cands)) == len(cands)
            assert all(min(c[:3]) >= 16 for c in cands) and cands[0] == kd.matmul_config(dt, False, prec)
    assert kd.dot_precision("fp32", False) == "ieee" and kd.dot_precision("fp32", True) == "tf32"
    assert kd.dot_precision("bf16", True) == "ieee"  # only float32 operands have a precision choice
    for c in (1, 100, 129, 8192, 8193, 32000):
        blk, single, _ = kd.softmax_config(c, False)
        assert (blk >= c) == single
    specs = kd.aot_specs()
    labels = {(s.name, s.label) for s in specs}
    assert len(labels) == len(specs)  # every config listed once


# =========================================================================== matmul tuning

_MM_LAYOUTS = ("fwd", "dgrad", "wgrad")  # the operand layouts linear's three GEMMs launch with


def _mm_operands(rng, layout, M, N, K, dtype, device):
    """(a [M, K], b [K, N]) as linear passes them: x @ w^T (b column-major), dY @ w (both
    row-major), dY^T @ x (a column-major)."""
    def t(*shape):
        return randn(rng, *shape, dtype=dtype, device=device)
    if layout == "fwd":
        return t(M, K), t(N, K).t()
    if layout == "dgrad":
        return t(M, K), t(K, N)
    return t(K, M).t(), t(K, N)


def _mm_reference(a, b, bias, act):
    y = a.double().cpu() @ b.double().cpu()
    if bias is not None:
        y = y + bias.double().cpu()
    return TORCH_ACT[act](y)


def _triton_here():
    from gpu_nn import _backend

    if not torch.cuda.is_available() and not (_backend.status("triton")[0] and _backend.interpret_mode()):
        pytest.skip("TRITON_INTERPRET is not set in this session: triton cannot run on this CPU machine")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dt,prec", [("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")])
def test_every_matmul_candidate_matches_reference(dt, prec, rng):
    """Each configuration the tuner may pick computes the right product: odd M, N, K (partial tiles
    on every side, K not a multiple of BLOCK_K), the candidates cycling through linear's three
    operand layouts and the eight epilogues (bias x activation)."""
    device = _triton_here()  # (bfloat16 too: kernels/triton/_compat.py makes the interpreter's exact)
    from gpu_nn.kernels.triton import dense as kd

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    M, N, K = 37, 29, 83
    for i, cfg in enumerate(kd.matmul_candidates(dt, prec)):
        layout, act, has_bias = _MM_LAYOUTS[i % 3], ACTS[i % 4], i % 2 == 0
        a, b = _mm_operands(rng, layout, M, N, K, dtype, device)
        bias = randn(rng, N, dtype=dtype, device=device) if has_bias else None
        c = torch.full((M, N), float("nan"), dtype=dtype, device=device)
        kd._launch_matmul(a, b, c, bias, kd.ACT_CODES[act], prec, cfg)
        _assert_product(c, a, b, bias, act, dtype, prec, K, f"matmul {dt} {prec} {cfg} {layout} act={act} bias={has_bias}")


def _assert_product(c, a, b, bias, act, dtype, prec, K, what):
    """c = act(a @ b + bias) within the dtype's tolerance for a K-deep float32-accumulated dot,
    or for prec "tf32" within the TF32 bound below."""
    want = _mm_reference(a, b, bias, act)
    if prec != "tf32" or c.device.type == "cpu":
        # (the interpreter's dot computes float32 whatever input_precision says: float32's
        # bound there, which an output rounded to bfloat16 fails; the TF32 bound passed it)
        assert_close(c, want, dtype, k=K, what=what)
    else:
        # tf32 (compiled Triton; the interpreter computes float32) cuts each operand to a 10-bit
        # mantissa: Triton hands the float32 registers to the MMA, which drops the low 13 bits
        # (truncation, relative error < 2^-10, where cuBLAS rounds to nearest, < 2^-11), so a
        # product is off by < 2 x 2^-10, within float16's 4-ulp term (EPS[float16] = 2^-10),
        # accumulated in float32: tol(float16, K). That error is made in the product z = a @ b
        # + bias and is relative to z's scale (~sqrt(K) here); every epilogue activation is
        # 1-Lipschitz, so it passes at most that absolute error on, while sigmoid / tanh squash
        # the output's own scale to 1: measured against z's scale, not the output's.
        z = _mm_reference(a, b, bias, None)
        err = max_rel_err(c, want) * max(float(want.abs().max()), 1.0) / max(float(z.abs().max()), 1.0)
        bound = tol(torch.float16, K)
        assert err <= bound, f"{what}: max error {err:.3e} of the product's scale > {bound:.3e} (tf32, k={K})"


# (M, N, K) per layout for the TMA kernel: odd M where A's rows are not a described stride
# (fwd, dgrad), odd K where it is (wgrad: A^T = dY is [K, M], so M must be a multiple of 8, as
# must every other described row length); every side a partial tile of the interpreter's 32x32x16
# configuration, and several tiles per program of a 2-program persistent grid
_TMA_SHAPES = {"fwd": (37, 72, 88), "dgrad": (37, 40, 88), "wgrad": (72, 40, 83)}
_TMA_KIND = {"fwd": (False, True), "dgrad": (False, False), "wgrad": (True, False)}  # (A_KM, B_NK)


@pytest.mark.parametrize("dt,prec", [("fp16", "ieee"), ("fp32", "tf32"), ("bf16", "ieee")])
def test_tma_matmul_kernel_matches_reference(dt, prec, rng):
    """The persistent TMA kernel, launched directly (production never launches it under the
    interpreter; on a GPU its real configurations), against the float64 product: linear's three
    layouts, each with and without bias, the four activations, C a column slice of a wider
    buffer, two programs looping over 4-6 tiles each (partial on every side)."""
    device = _triton_here()  # (bfloat16 too: kernels/triton/_compat.py makes the interpreter's exact)
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA and wgmma need compute capability 9.0")
    from gpu_nn.kernels.triton import dense as kd

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    # on a GPU its real configurations
    cfgs = [kd._MATMUL_TMA_INTERP] if device == "cpu" else list(kd.matmul_tma_candidates(dt, prec))
    assert cfgs and all(c[-1] == kd.TMA for c in cfgs)
    i = 0
    for cfg in cfgs:
        for layout in _MM_LAYOUTS:
            M, N, K = _TMA_SHAPES[layout]
            for has_bias in (False, True):
                act = ACTS[i % 4]
                i += 1
                a, b = _mm_operands(rng, layout, M, N, K, dtype, device)
                assert kd._tma_layouts(a, b) == _TMA_KIND[layout]
                bias = randn(rng, N, dtype=dtype, device=device) if has_bias else None
                # C as the kernel takes it (kd.tma_output): unit column stride, rows a multiple
                # of 16 elements apart: here every row padded to the next multiple, past N,
                # whose padding must stay untouched
                ld = -(-N // 16) * 16 + 16 * has_bias
                buf = torch.full((M, ld), float("nan"), dtype=dtype, device=device)
                c = buf[:, :N]
                assert kd.tma_output(c)
                kd._launch_matmul_tma(a, b, c, bias, kd.ACT_CODES[act], prec, cfg, programs=2)
                assert buf[:, N:].isnan().all(), "the TMA kernel wrote past column N"
                _assert_product(c, a, b, bias, act, dtype, prec, K,
                                f"tma matmul {dt} {prec} {cfg} {layout} act={act} bias={has_bias}")


def test_tma_candidates_only_for_calls_that_can_run_them(monkeypatch, rng):
    """The TMA configurations are timed (and a cached TMA choice served) only for half or TF32
    products in one of linear's three layouts, with 16-byte aligned bases and row strides, of at
    least one wave of 128x128 tiles and TMA_MIN_K deep, on a GPU, never under the interpreter;
    the tuning key carries the verdict."""
    from gpu_nn.kernels.triton import _tune
    from gpu_nn.kernels.triton import dense as kd

    M, N, K, sms = 296, 264, kd.TMA_MIN_K, 4  # 3 x 3 tiles of 128 on 4 "SMs"; M, N multiples of 8

    def ops(layout, dtype=torch.bfloat16, m=M, n=N, k=K):
        return _mm_operands(rng, layout, m, n, k, dtype, "cpu")

    for layout, kind in _TMA_KIND.items():
        a, b = ops(layout)
        assert kd.tma_layout(a, b, "bf16", "ieee", sms) == kind
        assert kd.tma_layout(a.half(), b.half(), "fp16", "ieee", sms) == kind
        a32, b32 = ops(layout, torch.float32)
        assert kd.tma_layout(a32, b32, "fp32", "tf32", sms) == kind
        assert kd.tma_layout(a32, b32, "fp32", "ieee", sms) is None  # full precision stays on FMA
        assert kd.tma_layout(a, b, "bf16", "ieee", 10 * sms) is None  # under one wave of tiles
        assert kd.tma_layout(*ops(layout, k=K - 8), "bf16", "ieee", sms) is None  # too shallow
        assert not kd.tma_eligible(a, b, "bf16", "ieee", interpret=True)
        assert not kd.tma_eligible(a, b, "bf16", "ieee", interpret=False)  # CPU tensors
    # odd K: the row stride of x and w (fwd), of dY (dgrad) is not a multiple of 16 bytes
    for layout in ("fwd", "dgrad"):
        assert kd.tma_layout(*ops(layout, k=K + 1), "bf16", "ieee", sms) is None
        assert kd.tma_layout(*ops(layout, torch.float32, k=K + 2), "fp32", "tf32", sms) is None
    assert kd.tma_layout(*ops("wgrad", m=M + 1), "bf16", "ieee", sms) is None  # dY^T's row stride M
    assert kd.tma_layout(*ops("wgrad", k=K + 1), "bf16", "ieee", sms) == (True, False)  # K is no stride here
    # a padded row stride that is not a multiple of 16 bytes, and a base off by one element
    b = ops("dgrad")[1]
    a = randn(rng, M, K + 4, dtype=torch.bfloat16)[:, :K]
    assert kd.tma_layout(a, b, "bf16", "ieee", sms) is None
    assert kd.tma_layout(randn(rng, M, K + 8, dtype=torch.bfloat16)[:, :K], b, "bf16", "ieee", sms) == (False, False)
    a = randn(rng, M * K + 1, dtype=torch.bfloat16)[1:].view(M, K)
    assert kd.tma_layout(a, b, "bf16", "ieee", sms) is None
    # a broadcast operand (row stride 0: overlapping rows)
    assert kd.tma_layout(randn(rng, 1, K, dtype=torch.bfloat16).expand(M, K), b, "bf16", "ieee", sms) is None
    # both operands column-major: not one of linear's layouts
    assert kd.tma_layout(ops("wgrad")[0], ops("fwd")[1], "bf16", "ieee", sms) is None

    for dt, prec in (("fp16", "ieee"), ("bf16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee")):
        plain = kd.matmul_candidates(dt, prec)
        assert kd.tuning_candidates(dt, prec, False) == plain
        tma = kd.tuning_candidates(dt, prec, True)
        assert tma[:len(plain)] == plain  # the heuristic stays first
        assert [c for c in tma[len(plain):]] == list(kd.matmul_tma_candidates(dt, prec))
        assert all(c[-1] == kd.TMA for c in tma[len(plain):]) and all(len(c) == 6 for c in plain)
        assert (len(tma) > len(plain)) == (prec == "tf32" or dt in ("bf16", "fp16"))

    # the launcher asks the tuner with the verdict in the key and the candidates it allows
    asked = []
    monkeypatch.setattr(_tune, "_chooser", lambda op, key, cands, run, default, device, prepare=None:
                        (asked.append((key, cands)), default)[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors launch only under the interpreter
    a, b = _mm_operands(rng, "fwd", 19, 32, 32, torch.float32, dev)
    kd.matmul(a, b, torch.empty(19, 32, device=dev), allow_tf32=True)
    monkeypatch.setattr(kd, "tma_eligible", lambda *args: True)
    kd.matmul(a, b, torch.empty(19, 32, device=dev), allow_tf32=True)
    # an output the TMA kernel cannot store into (row stride not a multiple of 16, or a column
    # stride) gets the pointer kernel's candidates only
    kd.matmul(a, b[:, :24], torch.empty(19, 24, device=dev), allow_tf32=True)
    kd.matmul(a, b, torch.empty(32, 19, device=dev).t(), allow_tf32=True)
    (key0, cands0), (key1, cands1), (key2, cands2), (key3, cands3) = asked
    assert key2[-1] is False and key3[-1] is False and cands2 == cands3 == cands0
    assert kd.tma_output(torch.empty(19, 32)) and not kd.tma_output(torch.empty(19, 24))
    assert not kd.tma_output(torch.empty(19, 33)[:, 1:]) and not kd.tma_output(torch.empty(32, 19).t())
    assert key0[-1] is False and key1[-1] is True and key0[:-1] == key1[:-1]
    assert cands0 == kd.matmul_candidates("fp32", "tf32") and cands1 == kd.tuning_candidates("fp32", "tf32", True)
    assert len(cands1) > len(cands0)


def test_every_tma_launch_is_in_aot_specs(monkeypatch, rng):
    """What the TMA launcher passes for each configuration and layout (recorded from a stand-in
    for the kernel: no CPU process can launch it, so tests/test_aot_coverage.py never sees it) is
    an ahead-of-time spec: the same constexprs, warps, stages and descriptor block shapes."""
    from gpu_nn.kernels.triton import dense as kd

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((args, kw))

    specs = [s for s in kd.aot_specs() if s.kernel is kd._matmul_tma_kernel]
    monkeypatch.setattr(kd, "_matmul_tma_kernel", Recorder())
    n = 0
    for dt, prec, dtype in (("bf16", "ieee", torch.bfloat16), ("fp16", "ieee", torch.float16),
                            ("fp32", "tf32", torch.float32)):
        for cfg in kd.matmul_tma_candidates(dt, prec):
            for layout in _MM_LAYOUTS:
                a, b = _mm_operands(rng, layout, 40, 48, 64, dtype, "cpu")
                launches.clear()
                kd._launch_matmul_tma(a, b, torch.empty(40, 48, dtype=dtype), None, 0, prec, cfg, programs=1)
                (args, kw), = launches
                opts = {k: kw.pop(k) for k in ("num_warps", "num_stages")}
                match = [s for s in specs if s.constexprs == kw and s.signature["c_ptr"] == f"*{dt}"
                         and (s.num_warps, s.num_stages) == (opts["num_warps"], opts["num_stages"])]
                assert len(match) == 1, f"{dt} {cfg} {layout}: {kw} {opts} has {len(match)} specs"
                for desc, name in zip(args[:2], ("a_desc", "b_desc")):
                    assert match[0].signature[name] == f"tensordesc<{dt}[{desc.block_shape[0]}, {desc.block_shape[1]}]>"
                n += 1
    assert n == len(specs) == 3 * sum(len(kd.matmul_tma_candidates(*k))
                                      for k in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32")))


@pytest.fixture
def tune_cache(tmp_path, monkeypatch):
    from gpu_nn import _tuning

    monkeypatch.setenv(_tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    monkeypatch.delenv(_tuning.RECORD_ENV, raising=False)
    _tuning.clear()
    yield tmp_path / "tuning.json"
    _tuning.clear()


def test_matmul_launches_the_measured_winner_and_caches_it(tune_cache, monkeypatch, rng):
    """With measuring forced and a fake clock that makes the last candidate fastest, matmul times
    every candidate once on its own buffers, launches the winner, keeps it (memory and disk) for
    the shape, and measures again for another shape; the result is the product either way."""
    device = _triton_here()
    from gpu_nn import _tuning
    from gpu_nn.kernels.triton import _tune
    from gpu_nn.kernels.triton import dense as kd

    launched = []
    real = kd._launch_matmul

    def spy(a, b, c, bias, act, prec, cfg):
        launched.append(cfg)
        real(a, b, c, bias, act, prec, cfg)

    monkeypatch.setattr(kd, "_launch_matmul", spy)
    cands = kd.matmul_candidates("fp32", "ieee")
    winner = cands[-1]
    cost = {c: 2.0 + i for i, c in enumerate(cands)}
    cost[winner] = 1.0

    def timer(fn):
        fn()
        return cost[launched[-1]]

    monkeypatch.setattr(_tune, "_chooser", lambda *args, **kw: _tuning.choose(*args, timer=timer, force=True, **kw))
    for M in (37, 21):
        a, b = _mm_operands(rng, "fwd", M, 29, 45, torch.float32, device)
        bias = randn(rng, 29, dtype=torch.float32, device=device)
        for first in (True, False):
            launched.clear()
            c = torch.full((M, 29), float("nan"), device=device)
            kd.matmul(a, b, c, bias=bias, activation="tanh")
            assert launched == (list(cands) + [winner] if first else [winner])
            assert_close(c, _mm_reference(a, b, bias, "tanh"), torch.float32, k=45, what=f"tuned matmul M={M}")
    stored = json.loads(tune_cache.read_text())["test"]
    assert len(stored) == 2 and all(v == list(winner) for v in stored.values())


def test_matmul_tuning_key_names_strides_and_alignment():
    """A matmul's tuning key tells apart what Triton compiles apart: a sliced operand whose
    leading stride is not its row length, or whose start is not 16-byte aligned, gets a key of
    its own (before, the layout letters r / c / g alone: the choice timed for the dense tensor's
    compiled form was served to the view's); the same problem in fresh tensors keeps one key."""
    from gpu_nn.kernels.triton import dense as kd

    def key(a, b, c, bias=None):
        return kd.tuning_key(a, b, c, bias, 0, "fp32", "ieee", False)

    a, b, c = torch.empty(64, 32), torch.empty(32, 48), torch.empty(64, 48)
    base = key(a, b, c)
    assert key(torch.empty(64, 32), torch.empty(32, 48), torch.empty(64, 48)) == base
    wide = torch.empty(64, 40)[:, :32]  # row-major, leading stride 40
    assert kd._layout(wide) == kd._layout(a) and key(wide, b, c) != base
    shifted = torch.empty(64 * 32 + 1)[1:].view(64, 32)  # row-major, 4 bytes past alignment
    assert shifted.stride() == a.stride() and key(shifted, b, c) != base
    assert key(a, b, c, torch.empty(48)) != base and key(a, b, c, torch.empty(49)[1:]) != key(a, b, c, torch.empty(48))
    assert key(a, b.t().contiguous().t(), c) != base  # (column-major b: the layout letters already differ)


def test_linear_tunes_and_records_on_a_gpu(tune_cache, monkeypatch, rng):
    """On a GPU, unforced: a linear forward and backward measure every candidate of each of the
    three GEMMs with CUDA events (recorded: one row per candidate with a positive time, one chosen
    per problem), and the results still match the reference."""
    if not torch.cuda.is_available():
        pytest.skip("measures with CUDA events: needs a GPU")
    from gpu_nn import _tuning
    from gpu_nn.kernels.triton import dense as kd

    rec = tune_cache.parent / "record.jsonl"
    monkeypatch.setenv(_tuning.ENV, "1")
    monkeypatch.setenv(_tuning.RECORD_ENV, str(rec))
    x = randn(rng, 300, 257, dtype=torch.float16, device="cuda", requires_grad=True)
    w = (randn(rng, 129, 257, dtype=torch.float16, device="cuda") * 0.1).requires_grad_()
    b = randn(rng, 129, dtype=torch.float16, device="cuda", requires_grad=True)
    g = randn(rng, 300, 129, dtype=torch.float16, device="cuda")
    with gpu_nn.backend("triton"):
        y = F.linear(x, w, b, activation="relu")
        dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    rows = _tuning.read_record(str(rec))
    n = len(kd.matmul_candidates("fp16", "ieee"))
    problems = {json.dumps(r["key"]) for r in rows}
    assert len(problems) == 3 and len(rows) == 3 * n and all(r["op"] == "matmul" for r in rows)
    assert all(r["ms"] is not None and r["ms"] > 0 for r in rows), [r for r in rows if not r["ms"]]
    assert sum(r["chosen"] for r in rows) == 3
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    y64 = torch.relu(x64 @ w64.t() + b64)
    want = torch.autograd.grad(y64, (x64, w64, b64), g.double().cpu())
    assert_close(y, y64, torch.float16, k=257, what="tuned linear")
    for got, ref, k in zip((dx, dw, db), want, (129, 300, 300)):
        assert_close(got, ref, torch.float16, k=k, what="tuned linear backward")


def test_matmul_uses_the_heuristic_where_tuning_does_not_apply(tune_cache, monkeypatch, rng):
    """CPU tensors and the interpreter take the heuristic without measuring (the installed chooser
    is gpu_nn._tuning.choose itself, as in normal use)."""
    device = _triton_here()
    if device == "cuda":
        pytest.skip("CPU-side behaviour: on a GPU matmul measures")
    from gpu_nn import _tuning
    from gpu_nn.kernels.triton import _tune
    from gpu_nn.kernels.triton import dense as kd

    with gpu_nn.backend("triton"):  # loads the kernels, which installs the chooser
        F.linear(randn(rng, 2, 3, dtype=torch.float32), randn(rng, 4, 3, dtype=torch.float32))
    assert _tune.installed() is _tuning.choose
    launched = []
    real = kd._launch_matmul
    monkeypatch.setattr(kd, "_launch_matmul", lambda *args: (launched.append(args[-1]), real(*args)))
    a, b = _mm_operands(rng, "dgrad", 19, 23, 17, torch.float32, device)
    for interpret in (False, True):
        launched.clear()
        kd.matmul(a, b, torch.empty(19, 23), interpret=interpret)
        assert launched == [kd.matmul_config("fp32", interpret)]


# =========================================================================== modules


def _same_state(ours, theirs):
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("bias", [True, False])
def test_linear_module_matches_torch(bias, rng):
    torch.manual_seed(0)
    ours = gnn.Linear(7, 5, bias=bias, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch.nn.Linear(7, 5, bias=bias, dtype=torch.float64)
    torch.testing.assert_close(ours.weight, theirs.weight)  # same initialisation
    assert isinstance(ours, torch.nn.Linear) and repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = randn(rng, 3, 7, requires_grad=True)
    y, yt = ours(x), theirs(x)
    torch.testing.assert_close(y, yt)
    g = randn(rng, 3, 5)
    y.backward(g)
    gx = x.grad.clone()
    x.grad = None
    yt.backward(g)
    torch.testing.assert_close(gx, x.grad)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    act = gnn.Linear(7, 5, bias=bias, activation="relu", dtype=torch.float64)
    assert "activation='relu'" in repr(act) and list(act.state_dict()) == list(theirs.state_dict())
    act.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(act(x), torch.relu(theirs(x)))
    with pytest.raises(gpu_nn.KernelInputError):
        gnn.Linear(3, 4, activation="gelu")


def test_simple_modules_match_torch(rng):
    x = randn(rng, 2, 3, 4, 5) * 3
    pairs = [
        (gnn.Flatten(), torch.nn.Flatten()), (gnn.Flatten(0, 2), torch.nn.Flatten(0, 2)),
        (gnn.Softmax(dim=2), torch.nn.Softmax(dim=2)), (gnn.LogSoftmax(dim=-1), torch.nn.LogSoftmax(dim=-1)),
        (gnn.ReLU(), torch.nn.ReLU()), (gnn.Sigmoid(), torch.nn.Sigmoid()), (gnn.Tanh(), torch.nn.Tanh()),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        xo = x.clone().requires_grad_()
        xt = x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        torch.testing.assert_close(yo, yt)
        g = randn(rng, *yt.shape)
        yo.backward(g)
        yt.backward(g)
        torch.testing.assert_close(xo.grad, xt.grad)
    r = gnn.ReLU(inplace=True)
    assert repr(r) == repr(torch.nn.ReLU(inplace=True))
    y = x.clone()
    assert r(y) is y
    torch.testing.assert_close(y, torch.relu(x))


@pytest.mark.parametrize("kw", [dict(), dict(weight=True, label_smoothing=0.1, ignore_index=2), dict(reduction="sum")])
def test_cross_entropy_module_matches_torch(kw, rng):
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(6, dtype=torch.float64) + 0.5
    ours, theirs = gnn.CrossEntropyLoss(**kw), torch.nn.CrossEntropyLoss(**kw)
    assert repr(ours) == repr(theirs) and list(ours.state_dict()) == list(theirs.state_dict())
    _same_state(ours, theirs)
    x = randn(rng, 5, 6, requires_grad=True)
    t = torch.from_numpy(rng.integers(0, 6, (5,)))
    lo, lt = ours(x, t), theirs(x, t)
    torch.testing.assert_close(lo, lt)
    (go,) = torch.autograd.grad(lo, x)
    (gt,) = torch.autograd.grad(lt, x)
    torch.testing.assert_close(go, gt)


def test_zz_report():
    """Not a check: prints the largest errors seen, for the report (run with -s)."""
    print("\nfloat64 reference vs torch, largest error per op:", {k: f"{v:.2e}" for k, v in WORST.items()})
    print("backend vs reference, largest relative error:", {"/".join(k): f"{v:.2e}" for k, v in KERNEL_ERR.items()})


# --- torch's argument types, zero input features, general linear biases (issue 19.6, 19.8, 19.9)

_DENSE_TYPE_CASES = [
    ("softmax", lambda M, x: M.softmax(x, dim=1.9)),
    ("softmax dim str", lambda M, x: M.softmax(x, dim="1")),
    ("log_softmax", lambda M, x: M.log_softmax(x, dim=1.9)),
    ("softmax dtype str", lambda M, x: M.softmax(x, 1, dtype="float")),
    ("log_softmax dtype numpy", lambda M, x: M.log_softmax(x, 1, dtype=__import__("numpy").float32)),
    ("softmax dtype list", lambda M, x: M.softmax(x, 1, dtype=[torch.float64])),  # (unhashable: an audit)
    ("log_softmax dtype dict", lambda M, x: M.log_softmax(x, 1, dtype={})),
    ("cross_entropy ignore_index", lambda M, x: M.cross_entropy(x, torch.tensor([1, 2, 0]), ignore_index=1.5)),
    ("cross_entropy ignore_index str", lambda M, x: M.cross_entropy(x, torch.tensor([1, 2, 0]), ignore_index="1")),
    ("cross_entropy label_smoothing str", lambda M, x: M.cross_entropy(x, torch.tensor([1, 2, 0]), label_smoothing="0.1")),
    ("cross_entropy input list", lambda M, x: M.cross_entropy([1.0], torch.tensor(0))),
    ("linear bias list", lambda M, x: M.linear(x, torch.randn(5, 4, dtype=x.dtype), [1.0, 2, 3, 4, 5])),
    ("linear bias float", lambda M, x: M.linear(x, torch.randn(5, 4, dtype=x.dtype), 2.0)),
]


@pytest.mark.parametrize("name,call", _DENSE_TYPE_CASES, ids=[c[0] for c in _DENSE_TYPE_CASES])
def test_non_tensor_non_int_arguments_raise_torchs_type_error(name, call, rng):
    """softmax(dim=1.9) used to run as dim=1, cross_entropy(ignore_index=1.5) as 1, a list bias
    raised AttributeError: each is the installed torch's error (also a KernelInputError), its
    type and its words. That is a TypeError, except a string dim before torch 2.13 (the
    named-dim overload's RuntimeError); the wording of softmax's differs between versions."""
    x = randn(rng, 3, 4)
    with pytest.raises((TypeError, RuntimeError)) as theirs:
        call(TF, x)
    with gpu_nn.backend("reference"), pytest.raises(gpu_nn.KernelInputError) as ours:
        call(F, x)
    assert isinstance(ours.value, type(theirs.value))
    assert str(theirs.value) in str(ours.value)


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
@pytest.mark.parametrize("xs,ws,bias", [((3, 0), (4, 0), True), ((3, 0), (4, 0), False), ((0,), (4, 0), True),
                                        ((2, 3, 0), (5, 0), True)], ids=str)
def test_zero_input_features_give_torchs_bias_broadcast(backend, device, xs, ws, bias, rng):
    """F.linear with K = 0 is the bias broadcast (zeros without bias), gradients included (the
    input and weight gradients are empty, the bias gradient the summed output gradient)."""
    dt = gpu_dtypes_for(backend, device)[0]
    x = randn(rng, *xs, dtype=dt, device=device, requires_grad=True)
    w = randn(rng, *ws, dtype=dt, device=device, requires_grad=True)
    b = randn(rng, ws[0], dtype=dt, device=device, requires_grad=True) if bias else None
    with gpu_nn.backend(backend):
        y = F.linear(x, w, b)
        g = randn(rng, *y.shape, dtype=dt, device=device)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    yt = TF.linear(x, w, b)
    gt = torch.autograd.grad(yt, [t for t in (x, w, b) if t is not None], g)
    assert y.shape == yt.shape
    assert_close(y, yt, dt, what="forward")
    for a, e in zip(grads, gt):
        assert a.shape == e.shape
        assert_close(a, e, dt, k=max(y.numel(), 1), what="grad")


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
def test_linear_module_with_zero_in_features(backend, device, rng):
    torch.manual_seed(0)
    m = gnn.Linear(0, 3).to(device)
    x = randn(rng, 5, 0, dtype=torch.float32, device=device)
    with gpu_nn.backend(backend):
        y = m(x)
        y.sum().backward()
    torch.testing.assert_close(y, TF.linear(x, m.weight, m.bias))
    torch.testing.assert_close(m.bias.grad, torch.full((3,), 5.0, dtype=m.bias.dtype, device=device))


_BIAS_SHAPES = [None, (), (1,), (5,), (1, 5), (3, 5), (5, 1), (3, 1), (1, 1, 5), (2, 1, 5), (2, 3, 5), (4, 3, 5),
                (2, 3), (3,), (1, 1, 1, 5), (2, 5), (4, 5), (1, 3, 5)]


def test_linear_bias_of_any_shape_follows_torchs_rule(rng):
    """torch's linear takes a bias that expands to [rows, O] (2-D or contiguous input with a
    bias that is 1-D once squeezed: its addmm path) or broadcasts to the output without growing
    it (its matmul + add_ path), and refuses the rest with those ops' messages. Every input
    rank / bias shape / contiguity combination below (2-D weight; a 1-D weight without bias):
    same values, same gradients, or an error containing torch's."""
    bad, n = [], 0
    for xs, ws, bs, nc in itertools.product([(4,), (3, 4), (2, 3, 4), (2, 2, 3, 4)], [(5, 4), (4,)], _BIAS_SHAPES,
                                            [False, True]):
        if (nc and len(xs) < 2) or (len(ws) == 1 and bs is not None):
            continue  # a 1-D weight with a bias: see test_properties (torch's layout-dependent verdict)
        x = randn(rng, *xs, requires_grad=True)
        xi = x.transpose(0, 1).contiguous().transpose(0, 1) if nc else x
        w = randn(rng, *ws, requires_grad=True)
        b = None if bs is None else randn(rng, *bs, requires_grad=True)
        ins = [t for t in (x, w, b) if t is not None]
        try:
            yt = TF.linear(xi, w, b)
        except RuntimeError as e:
            with gpu_nn.backend("reference"), pytest.raises(gpu_nn.KernelInputError) as ours:
                F.linear(xi, w, b)
            if str(e) not in str(ours.value):
                bad.append(f"{xs} {ws} {bs} nc={nc}: torch {e}, ours {ours.value}")
            continue
        n += 1
        with gpu_nn.backend("reference"):
            y = F.linear(xi, w, b)
            g = randn(rng, *yt.shape)
            grads = torch.autograd.grad(y, ins, g)
        gt = torch.autograd.grad(yt, ins, g)
        if y.shape != yt.shape or max_rel_err(y, yt) > 1e-12 or any(max_rel_err(a, e) > 1e-12 for a, e in zip(grads, gt)):
            bad.append(f"{xs} {ws} {bs} nc={nc}: values or gradients differ")
    assert n > 60 and not bad, "\n".join(bad[:10])


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
@pytest.mark.parametrize("bs", [(1, 7), (6, 7), (6, 1)], ids=str)
def test_linear_row_bias_on_every_backend(backend, device, bs, rng):
    """A [1, O] or [N, O] bias (and [N, 1]): torch's result and gradients, fused relu included."""
    dt = torch.float32
    x = randn(rng, 6, 5, dtype=dt, device=device, requires_grad=True)
    w = randn(rng, 7, 5, dtype=dt, device=device, requires_grad=True)
    b = randn(rng, *bs, dtype=dt, device=device, requires_grad=True)
    with gpu_nn.backend(backend):
        y = F.linear(x, w, b, activation="relu")
        g = randn(rng, *y.shape, dtype=dt, device=device)
        grads = torch.autograd.grad(y, (x, w, b), g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    yt = torch.relu(TF.linear(x64, w64, b64))
    gt = torch.autograd.grad(yt, (x64, w64, b64), g.double())
    assert_close(y, yt, dt, k=5, what="forward")
    for name, a, e in zip("xwb", grads, gt):
        assert a.shape == e.shape, name
        assert_close(a, e, dt, k=7, what=f"grad {name}")


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("bias_kind", ["expanded", "strided"])
@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_linear_bias_view_of_any_stride(backend, device, bias_kind, activation, rng):
    """An expanded (stride-0) or strided bias view, as a double backward passes, reads as its
    values: the Triton epilogue read it with unit stride and returned garbage (7e22) before."""
    x = randn(rng, 5, 7, dtype=torch.float32).to(device)
    w = randn(rng, 3, 7, dtype=torch.float32).to(device)
    b = torch.tensor(1.75, device=device).expand(3) if bias_kind == "expanded" else randn(rng, 6, dtype=torch.float32).to(device)[::2]
    with gpu_nn.backend(backend):
        y = F.linear(x, w, b, activation=activation)
    want = TORCH_ACT[activation](TF.linear(x.cpu().double(), w.cpu().double(), b.cpu().double()))
    assert_close(y.cpu().double(), want, torch.float32, k=7, what=f"linear bias {bias_kind}")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_kernels_guard_out_of_range_targets(backend, device, weighted, rng):
    """During CUDA graph capture the launcher cannot refuse an out-of-range target (that needs a
    host sync), so the kernels guard it themselves: that row's loss and gradient are NaN, every
    other row is exact, and nothing is read outside the row (the interpreter would raise)."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import dense as kd

    M, C = 5, 7
    x = randn(rng, M, C, dtype=torch.float32).to(device)
    t = torch.tensor([2, 9, -3, 6, 4], device=device)  # rows 1 and 2 out of range
    w = (torch.rand(C) + 0.5).to(device) if weighted else None
    loss = torch.empty(M, device=device)
    stats = torch.empty(3 * M + 1, device=device)
    kd.ce_fwd(x, t, w, loss, stats, False, -100, 0.0, ktriton.INTERPRET)
    assert torch.isnan(loss[1:3]).all()
    good = torch.tensor([0, 3, 4])
    want = TF.cross_entropy(x[good].cpu().double(), t[good].cpu(), None if w is None else w.cpu().double(), reduction="none")
    assert_close(loss[good].cpu().double(), want, torch.float32, k=C, what="ce rows in range")
    # the 'mean' finish: NaN, and the bad rows weigh nothing (no read of w outside [0, C))
    out = torch.empty((), device=device)
    kd.ce_reduce(loss, t, w, out, stats, True, False, -100, C, 0.0, ktriton.INTERPRET)
    assert torch.isnan(out)
    den = 3.0 if w is None else float(w[t[good]].sum())
    assert float(stats[3 * M]) == pytest.approx(den, rel=1e-6)
    dx = torch.empty_like(x)
    kd.ce_bwd(x, t, w, stats, torch.ones(M, device=device), False, dx, None, False, -100, 0.0, ktriton.INTERPRET)
    assert torch.isnan(dx[1:3]).all()
    xg = x[good].cpu().double().requires_grad_()
    TF.cross_entropy(xg, t[good].cpu(), None if w is None else w.cpu().double(), reduction="none").sum().backward()
    assert_close(dx[good].cpu().double(), xg.grad, torch.float32, k=C, what="ce gradient rows in range")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("case", ["zero_weight_smooth", "all_ignored", "empty_mean", "prob_sum", "prob_mean"])
def test_cross_entropy_reductions_finish_on_the_device(backend, device, case, rng):
    """The 'sum' / 'mean' finish (one program) and the backward's read of grad / denominator
    where torch has special values: a mean over zero total weight (0 / 0 = NaN; with label
    smoothing NaN although the smoothing term is not 0, and NaN gradients), an empty batch
    (mean NaN), probability targets (divided by the row count)."""
    kw = {"zero_weight_smooth": dict(label_smoothing=0.2), "all_ignored": dict(ignore_index=3),
          "empty_mean": {}, "prob_sum": dict(reduction="sum", label_smoothing=0.3), "prob_mean": {}}[case]
    shape = (0, 5) if case == "empty_mean" else (7, 11) if case.startswith("prob") else (6, 5)
    x = randn(rng, *shape)
    if case.startswith("prob"):
        t = torch.softmax(randn(rng, *shape), 1)
    else:
        t = torch.full(shape[:1], 3, dtype=torch.int64)
    w = torch.from_numpy(rng.random(shape[1]) + 0.3) if case != "prob_mean" else None
    if case == "zero_weight_smooth":
        w[3] = 0.0  # every row's target weighs 0: the denominator is 0, the smoothing sum is not
    for dtype in vs_reference_dtypes(backend, device):
        _check_backend(lambda x, t, w: F.cross_entropy(x, t, w, **kw), [x, t, w], [0], dtype, device, backend,
                       k=x.numel() + 1, what=f"cross_entropy {case}")
    with gpu_nn.backend(backend):
        xo = x.float().to(device).requires_grad_()
        y = F.cross_entropy(xo, (t.float() if case.startswith("prob") else t).to(device),
                            None if w is None else w.float().to(device), **kw)
        (gx,) = torch.autograd.grad(y, [xo])
    assert torch.isnan(y).item() == (case not in ("prob_sum", "prob_mean")), y
    assert torch.isnan(gx).all() if case == "zero_weight_smooth" else not torch.isnan(gx).any(), gx


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("layout", ["expanded", "strided"])
def test_cross_entropy_none_reads_grad_of_any_stride(backend, device, layout, rng, monkeypatch):
    """'none': the backward reads the upstream gradient with its own stride (an expanded one
    from ``loss.sum()``, a strided view) instead of a contiguous float32 copy of it."""
    from gpu_nn.kernels.triton import dense as kd

    x, t, w = _ce_inputs(rng, (9, 13), False, True, 4)
    # made in float32 on the device: a conversion (.float(), .to) would hand over a dense copy
    if layout == "expanded":
        g = torch.full((), 0.7, device=device).expand(9)
    else:
        g = randn(rng, 9, 2, dtype=torch.float32, device=device)[:, 1]
    with gpu_nn.backend("reference"):
        xr = x.clone().requires_grad_()
        (want,) = torch.autograd.grad(F.cross_entropy(xr, t, w, ignore_index=4, reduction="none"), [xr],
                                      g.cpu().double())
    with gpu_nn.backend(backend):
        xo = x.float().to(device).requires_grad_()
        y = F.cross_entropy(xo, t.to(device), w.float().to(device), ignore_index=4, reduction="none")
        seen = []
        orig = kd.ce_bwd
        monkeypatch.setattr(kd, "ce_bwd", lambda *a: seen.append(a[4].stride()) or orig(*a))
        (got,) = torch.autograd.grad(y, [xo], g)
    assert seen == [g.stride()] and g.stride() != (1,)  # read as it is, no copy
    assert_close(got, want, torch.float32, k=13, what=f"cross_entropy none grad {layout}")
    assert_close(got, want, torch.float32, k=13, what=f"cross_entropy none grad {layout}")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_cross_entropy_target_check_kernel_finds_the_first_bad_target(backend, device, rng, monkeypatch):
    """The range check that the Triton route runs on a GPU (one kernel, one copy back): the
    first offending target in row order, whichever program's blocks it falls in (several
    programs, each looping over several blocks), or None; ignore_index is never offending."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import dense as kd

    C, ii = 7, -100
    for M in (1, 37, 203):
        t = torch.from_numpy(rng.integers(0, C, M))
        t[rng.random(M) < 0.2] = ii
        for bad in ([], [M - 1], [int(rng.integers(M)), M - 1], sorted(set(rng.integers(0, M, 3).tolist()))):
            tb = t.clone()
            for i, r in enumerate(bad):
                tb[r] = C + i if i % 2 == 0 else -2 - i
            pairs = kd.ce_check_targets(tb.to(device), C, ii, ktriton.INTERPRET)
            assert 1 <= pairs.shape[0] <= (4 if ktriton.INTERPRET else kd._CE_CHECK_PROGRAMS)
            got = kd.first_bad_target(pairs.tolist(), M)
            assert got == (int(tb[bad[0]]) if bad else None), (M, bad)
    if ktriton.INTERPRET:
        assert kd.ce_check_targets(torch.zeros(203, dtype=torch.int64), C, ii, True).shape[0] == 4  # 13 blocks, 4 programs
    # through the op: refused with torch's message before any kernel of the op runs
    x = randn(rng, 203, C, dtype=torch.float32).to(device)
    t = torch.from_numpy(rng.integers(0, C, 203))
    t[150], t[180] = C + 2, -5
    for name in ("ce_fwd", "ce_reduce", "ce_bwd"):
        monkeypatch.setattr(kd, name, lambda *a, name=name: pytest.fail(f"{name} ran before the range check"))
    with gpu_nn.backend(backend), pytest.raises(gpu_nn.KernelInputError, match=f"Target {C + 2} is out of bounds."):
        F.cross_entropy(x, t.to(device))


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_compiled_backward_equals_eager(backend, device, reduction, rng):
    """torch.compile(fullgraph) through fwd AND bwd: the saved statistics (fake shape = real
    shape, 'mean' one entry longer) and the unmaterialised gradient of the statistics output
    pass AOT autograd, and the gradient equals the eager one."""
    x = randn(rng, 6, 9, dtype=torch.float32, device=device).requires_grad_()
    t = torch.tensor([1, 8, 0, 3, 2, 3], device=device)
    w = (torch.rand(9) + 0.5).to(device)

    def f(x):
        y = F.cross_entropy(x, t, w, reduction=reduction, ignore_index=3, label_smoothing=0.1)
        return y.square().sum()

    with gpu_nn.backend(backend):
        (want,) = torch.autograd.grad(f(x), [x])
        torch._dynamo.reset()
        (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(x), [x])
    torch.testing.assert_close(got, want)


def test_full_precision_float32_product_reads_a_row_major_b():
    """kernels.triton.dense.b_operand: a column-major B (linear's x @ w.t()) is copied row-major
    for a full-precision float32 product of at least ROW_MAJOR_B_MIN_M rows (the H200 ran the
    column-major case at half speed), and left alone everywhere else."""
    from gpu_nn.kernels.triton import dense as kd

    m = kd.ROW_MAJOR_B_MIN_M
    w = torch.randn(7, 5)  # [N, K]
    b = w.t()  # [K, N], column-major
    got = kd.b_operand(b, m, "fp32", "ieee", False)
    assert got.stride() == (7, 1) and torch.equal(got, b)
    for args in ((m - 1, "fp32", "ieee", False), (m, "fp32", "tf32", False), (m, "bf16", "ieee", False),
                 (m, "fp32", "ieee", True)):
        assert kd.b_operand(b, *args) is b, args
    r = torch.randn(5, 7)  # already row-major
    assert kd.b_operand(r, m, "fp32", "ieee", False) is r


def test_parallel_compile_says_whether_triton_has_the_mode(monkeypatch):
    """kernels.triton._compat.parallel_compile (the linear tuning's and the sweep's batch compile):
    True inside the block where Triton has AsyncCompileMode, False and nothing done without it."""
    import sys

    from gpu_nn.kernels.triton._compat import parallel_compile

    import importlib.util

    have = importlib.util.find_spec("triton.runtime._async_compile") is not None
    with parallel_compile(2) as available:
        assert available is have
    monkeypatch.setitem(sys.modules, "triton.runtime._async_compile", None)  # import now fails
    with parallel_compile(2) as available:
        assert available is False


def test_cpu_autocast_region_reaches_linear(rng):
    """autocast_inputs asks one 'any autocast region?' question before the per-device one: a CPU
    region must still be seen (linear runs in its dtype, as torch's), and none outside it."""
    x, w, b = (torch.from_numpy(rng.standard_normal(s)).float() for s in ((3, 5), (4, 5), (4,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, yt = F.linear(x, w, b), torch.nn.functional.linear(x, w, b)
    assert y.dtype == yt.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), yt.float(), rtol=2e-2, atol=2e-2)
    assert F.linear(x, w, b).dtype == torch.float32


def test_autocast_leaves_float64_alone(rng):
    """torch's autocast never casts float64 (any policy): float64 layers keep float64 inside a
    region, ours as torch's (the reference, exact)."""
    x, w, b = (torch.from_numpy(rng.standard_normal(s)) for s in ((3, 5), (4, 5), (4,)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ours, theirs in ((F.linear(x, w, b), torch.nn.functional.linear(x, w, b)),
                             (F.log_softmax(x, 1), torch.nn.functional.log_softmax(x, 1)),
                             (F.conv1d(x[None], w[:, :3, None]), torch.nn.functional.conv1d(x[None], w[:, :3, None]))):
            assert ours.dtype == theirs.dtype == torch.float64
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", backend_params(BACKENDS))
@pytest.mark.parametrize("name", SOFTMAX)
def test_softmax_layout_is_torchs(backend, device, name, rng):
    """softmax / log_softmax return contiguous results and gradients whatever the input's layout
    (torch's rule, and what the fake kernels promise): the reference had returned a channels_last
    input's own layout (NumPy keeps the order it reads)."""
    ours, theirs = SOFTMAX[name]
    x64 = randn(rng, 2, 3, 4, 5)
    dtype = gpu_dtypes_for(backend, device)[-1]
    for x0 in (x64.contiguous(memory_format=torch.channels_last), x64.transpose(1, 3)):
        for dim in (1, -1):
            x = x0.to(device=device, dtype=dtype).requires_grad_()
            with gpu_nn.backend(backend):
                y = ours(x, dim)
            yt = theirs(x, dim)
            assert y.stride() == yt.stride(), (dim, y.stride(), yt.stride())
            g = torch.empty_like(x).copy_(randn(rng, *x.shape))
            with gpu_nn.backend(backend):
                (dx,) = torch.autograd.grad(y, x, g)
            (dxt,) = torch.autograd.grad(yt, x, g)
            assert dx.stride() == dxt.stride(), (dim, dx.stride(), dxt.stride())
            assert_close(y, yt, dtype, k=x.shape[dim], what=f"{name} dim {dim}")
            assert_close(dx, dxt, dtype, k=x.shape[dim], what=f"{name} dim {dim} grad")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("name", SOFTMAX)
def test_softmax_middle_dim_in_place(backend, device, name, rng, monkeypatch):
    """A softmax over a dim other than the last of a contiguous tensor runs in place on the
    middle-dim kernels (no transpose to rows and back): against float64 torch on the same rounded
    inputs, at most twice torch's own error, with logits whose exp overflows, and torch's NaN
    placement where a column holds NaN, +inf or only -inf (the interpreter's small tiles loop
    over C and over several inner blocks)."""
    from gpu_nn.kernels.triton import dense as kd

    ours, theirs = SOFTMAX[name]
    launched = []
    real = kd.launch_kernel
    monkeypatch.setattr(kd, "launch_kernel", lambda k, *a, **kw: launched.append(k.__name__) or real(k, *a, **kw))
    for shape, dim in (((2, 9, 3, 5), 1), ((11, 3, 7), 0), ((2, 3, 6, 4), -2)):
        for dtype in gpu_dtypes_for(backend, device):
            z = randn(rng, *shape)
            x = (3e4 + 10 * z).to(dtype)  # exp overflows without the max subtraction
            xs = x.clone()
            cols = xs.movedim(dim, -1).reshape(-1, shape[dim])  # a view: each row is one softmax
            cols[0, 1] = float("nan")
            cols[1, 0] = float("inf")
            cols[2] = float("-inf")
            for inp in (x, xs):
                xg = inp.to(device).requires_grad_()
                launched.clear()
                with gpu_nn.backend(backend):
                    y = ours(xg, dim)
                    g = randn(rng, *y.shape).to(device=device, dtype=dtype)
                    (gx,) = torch.autograd.grad(y, xg, g)
                assert launched == ["_softmax_fwd_mid_kernel", "_softmax_bwd_mid_kernel"], launched
                xt = inp.clone().requires_grad_()
                yt = theirs(xt, dim)
                (gt,) = torch.autograd.grad(yt, xt, g.cpu())
                assert torch.equal(torch.isnan(y.cpu()), torch.isnan(yt)), f"{name} {dtype}: NaN placement"
                assert torch.equal(torch.isnan(gx.cpu()), torch.isnan(gt)), f"{name} {dtype}: gradient NaN placement"
                fin = ~torch.isnan(yt)
                x64 = inp.double().requires_grad_()
                y64 = theirs(x64, dim)
                (g64,) = torch.autograd.grad(y64, x64, g.cpu().double())
                if inp is x:  # all finite: the error bound of the large-logits test
                    assert_like_torch(y, yt, y64, dtype, k=shape[dim], what=f"{name} {dtype}")
                    assert_like_torch(gx, gt, g64, dtype, k=shape[dim], what=f"{name} backward {dtype}")
                else:
                    assert_close(y.cpu()[fin], y64.detach()[fin], dtype, k=shape[dim], what=f"{name} {dtype} finite columns")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("shape,prob,weight,reduction,smoothing", [
    ((2, 5, 8, 9), False, False, "mean", 0.0),
    ((2, 5, 8, 9), False, True, "none", 0.2),
    ((3, 7, 33), False, True, "mean", 0.1),
    ((1, 6, 40), False, False, "sum", 0.3),
    ((2, 5, 8, 9), True, True, "mean", 0.2),
    ((3, 7, 33), True, False, "none", 0.0),
])
def test_cross_entropy_middle_dim_in_place(backend, device, shape, prob, weight, reduction, smoothing, rng,
                                           monkeypatch):
    """Cross entropy over contiguous [N, C, d...] logits runs on the middle-dim kernels (no
    transpose to rows and back: the gradient is written in the logits' layout): every option
    against the float64 reference, gradients of the logits and of probability targets included
    (the interpreter's small tiles loop over C and over several inner blocks)."""
    from gpu_nn.kernels.triton import dense as kd

    launched = []
    real = kd.launch_kernel
    monkeypatch.setattr(kd, "launch_kernel", lambda k, *a, **kw: launched.append(k.__name__) or real(k, *a, **kw))
    for dtype in gpu_dtypes_for(backend, device):
        x, t, w = _ce_inputs(rng, shape, prob, weight, None if prob else 4)
        kw = dict(reduction=reduction, label_smoothing=smoothing)
        if not prob:
            kw["ignore_index"] = 4
        launched.clear()
        e = _check_backend(lambda x, t, w: F.cross_entropy(x, t, w, **kw), [x, t, w], [0, 1] if prob else [0], dtype,
                           device, backend, k=x.numel(), what=f"cross_entropy middle dim {shape} prob={prob}")
        mids = [k for k in launched if k.startswith("_ce_") and k not in ("_ce_reduce_kernel", "_ce_target_check_kernel")]
        assert mids == ["_ce_fwd_mid_kernel", "_ce_bwd_mid_kernel"], launched
        KERNEL_ERR[(backend, "cross_entropy", str(dtype))] = max(KERNEL_ERR.get((backend, "cross_entropy", str(dtype)), 0), e)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("prob", [False, True])
def test_cross_entropy_middle_dim_nonfinite_like_torch(backend, device, prob, rng):
    """The middle-dim kernels place NaN as torch does: a position whose logits hold a NaN or a
    +inf, or are all -inf, has a NaN loss and gradient, and a NaN reaches a 'mean' (here 'none'
    then 'mean' of the same inputs); the other positions stay finite and match float64 torch."""
    shape = (2, 5, 36)
    x, t, _ = _ce_inputs(rng, shape, prob, False, None)
    x = x.float()
    t = t.float() if prob else t
    x[0, 1, 3] = float("nan")
    x[1, 0, 7] = float("inf")
    x[0, :, 11] = float("-inf")
    for reduction in ("none", "mean"):
        xg = x.clone().to(device).requires_grad_()
        with gpu_nn.backend(backend):
            y = F.cross_entropy(xg, t.to(device), reduction=reduction)
            (gx,) = torch.autograd.grad(y.sum(), xg)
        xt = x.clone().requires_grad_()
        yt = TF.cross_entropy(xt, t, reduction=reduction)
        (gt,) = torch.autograd.grad(yt.sum(), xt)
        assert torch.equal(torch.isnan(y.cpu()), torch.isnan(yt)), reduction
        assert torch.equal(torch.isnan(gx.cpu()), torch.isnan(gt)), reduction
        fin = ~torch.isnan(gt)
        x64 = x.double().requires_grad_()
        y64 = TF.cross_entropy(x64, t.double() if prob else t, reduction=reduction)
        (g64,) = torch.autograd.grad(y64.sum(), x64)
        assert_close(gx.cpu()[fin], g64[fin], torch.float32, k=shape[1], what=f"finite positions {reduction}")
        if reduction == "none":  # (the mean is NaN: checked above)
            fin_y = ~torch.isnan(yt)
            assert fin_y.sum() > 0
            assert_close(y.cpu()[fin_y], y64.detach()[fin_y], torch.float32, k=shape[1], what="finite losses")


def test_cross_entropy_middle_dim_choice():
    """Where the middle-dim kernels take [outer, C, inner] logits: inner positions enough to fill a
    program's lanes, few classes, or many classes over enough programs; else the rows."""
    from gpu_nn.kernels.triton import dense as kd

    assert kd.ce_mid_ok(8, 21, 512 * 512)  # a segmentation map
    assert kd.ce_mid_ok(1, 3, kd.CE_MID_MIN_INNER)
    assert not kd.ce_mid_ok(1, 3, kd.CE_MID_MIN_INNER - 1)  # a few positions: rows
    assert kd.ce_mid_ok(2, kd.CE_MID_MAX_C, 40)
    assert not kd.ce_mid_ok(32, 32000, 128)  # a vocabulary over 32 programs: rows, one program each
    assert kd.ce_mid_ok(1024, 32000, 128)  # ... over 1024 programs
    assert not kd.ce_mid_ok(kd.MID_MAX_OUTER + 1, 3, 64)  # grid axis 1


@pytest.mark.parametrize("ishape", [(2, 4, 3), (2, 4, 3, 5), (2, 4, 3, 5, 2)])
@pytest.mark.parametrize("tshape", [(), (2,), (3,), (2, 3), (2, 1), (2, 3, 5), (2, 3, 4), (2, 1, 3, 5), (2, 3, 5, 2),
                                    (1, 3, 5), (2, 3, 5, 2, 1)])
def test_cross_entropy_target_shape_errors_as_torch(ishape, tshape):
    """A class-index target of the wrong rank or sizes for a [N, C, d1, ...] input (a segmentation
    target kept as [N, 1, H, W], say): torch's message, which depends on the input's rank (its
    nll_loss2d for 4-D inputs, its reshaped path otherwise); ours said 'size mismatch' for any
    rank. Shapes that torch accepts are computed by both."""
    x, t = torch.randn(*ishape), torch.zeros(tshape, dtype=torch.long)
    try:
        want = TF.cross_entropy(x, t)
    except (RuntimeError, ValueError, IndexError) as e:
        with pytest.raises(gpu_nn.KernelInputError) as ours:
            F.cross_entropy(x, t)
        assert str(ours.value) == str(e).splitlines()[0]
        return
    torch.testing.assert_close(F.cross_entropy(x, t), want)


def _ce_weight_cases():
    ce = []
    for ishape in ((5,), (3, 5), (3, 5, 2), (3, 5, 2, 2), (3, 5, 2, 1, 2)):
        spatial = ishape[2:]
        good = () if len(ishape) == 1 else (ishape[0], *spatial)
        targets = {"ok": good, "prob": ishape}
        if len(ishape) > 1:
            targets["batch"] = (4, *spatial)
            targets["size"] = (ishape[0], *(s + 1 for s in spatial)) if spatial else (ishape[0], 2)
        for tname, tshape in targets.items():
            for wname in ("c", "c-1", "cx1", "f64", "c-1f64", "int"):
                ce.append(pytest.param(ishape, tname, tshape, wname, id=f"{len(ishape)}d-{tname}-{wname}"))
    return ce


@pytest.mark.parametrize("ishape,tname,tshape,wname", _ce_weight_cases())
def test_cross_entropy_weight_checked_in_torchs_order(ishape, tname, tshape, wname):
    """The class weight's size and dtype checked where torch checks them: after the batch and
    target checks, the size before the dtype, with torch's message per input rank (nll_loss's
    for ranks 1 and 2, nll_loss2d's otherwise, which takes a weight of any shape holding C
    elements); probability targets take an integer weight (promoted, as torch's) and check the
    target's dtype first. Ours checked the weight first, with rank 2's message at every rank (a
    parity audit). Where torch computes, both compute the same loss."""
    C = 5
    weights = {"c": torch.rand(C), "c-1": torch.rand(C - 1), "cx1": torch.rand(C, 1), "f64": torch.rand(C, dtype=torch.float64),
               "c-1f64": torch.rand(C - 1, dtype=torch.float64), "int": torch.arange(1, C + 1)}
    x = torch.randn(*ishape)
    t = torch.rand(tshape).softmax(1 if len(tshape) > 1 else 0) if tname == "prob" else torch.randint(0, C, tshape)
    w = weights[wname]
    try:
        want = TF.cross_entropy(x, t, weight=w)
    except (RuntimeError, ValueError) as e:
        with pytest.raises(gpu_nn.KernelInputError) as ours:
            F.cross_entropy(x, t, weight=w)
        assert str(ours.value) == str(e).splitlines()[0]
        return
    torch.testing.assert_close(F.cross_entropy(x, t, weight=w), want)


def test_linear_errors_in_torchs_order():
    """Bad shapes and dtypes together get torch's message, in torch's order: without a bias its
    matmul finds the shapes wrong before the dtypes (a 1-D weight: the dot product's dtype first,
    the matrix-vector product's sizes first, each in its words); with one, addmm finds the bias's
    dtype first. Ours checked the dtypes first everywhere (a parity audit). Not compared: a 1-D
    weight with a bias (torch's verdict depends on its internal path; ours computes, README) and
    integer inputs that torch computes (ours refuses them)."""
    import itertools

    dts = (torch.float32, torch.float64, torch.int64)
    inputs, weights = ((2, 5), (2, 3, 5), (5,)), ((3, 5), (3, 4), (5,), (4,))
    n = 0
    for xs, ws, xd, wd, b in itertools.product(inputs, weights, dts, dts, (None, "same", "wide", "float64")):
        if len(ws) == 1 and b is not None:
            continue
        x, w = torch.ones(xs, dtype=xd), torch.ones(ws, dtype=wd)
        bias = None if b is None else torch.ones(ws[0] + (b == "wide"), dtype=torch.float64 if b == "float64" else xd)
        try:
            TF.linear(x, w, bias)
            continue  # (an integer linear torch computes: ours refuses it, README)
        except RuntimeError as e:
            want = str(e).splitlines()[0]
        with pytest.raises(gpu_nn.KernelInputError) as ours:
            F.linear(x, w, bias)
        assert str(ours.value) == want, (xs, ws, xd, wd, b)
        n += 1
    assert n > 200


@pytest.mark.parametrize("rows", [65536, 20000])
def test_reference_bias_gradient_is_one_rounding_of_the_exact_sum(rows):
    """The reference's float32 bias gradient over many rows is the exact column sum rounded
    once (within one float32 ulp of it): NumPy's axis-0 sum added one row at a time, an error
    growing with the rows (8e-6 relative at 65536 rows, 60x torch's; an accuracy audit). The
    recurrent layers' bias gradients take the same column sums."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3, generator=gen)
    w = torch.randn(5, 3, generator=gen)
    b = torch.zeros(5, requires_grad=True)
    g = torch.randn(rows, 5, generator=gen) + 0.5  # a mean: the sums grow with the rows
    with gpu_nn.backend("reference"):
        F.linear(x, w, b).backward(g)
    exact = g.double().sum(0)
    err = (b.grad.double() - exact).abs()
    assert (err <= torch.from_numpy(np.spacing(exact.float().abs().numpy())).double()).all(), err
    G = g.numpy()
    np.testing.assert_array_equal(R.column_sums(G), exact.float().numpy())
    np.testing.assert_array_equal(R.column_sums(G.astype(np.float64)), np.add.reduce(G.astype(np.float64), axis=0))


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("layout", ["rows", "middle"])
def test_softmax_of_long_rows_as_accurate_as_torchs(backend, device, layout, rng):
    """float32 softmax over 22,183 values (the looped row kernel) and 3,100 (the middle-dim
    kernel, over a dim that is not the last): both wrote exp((x - m) - log s), whose argument rounds at log
    s's size, an error in every probability that grows with the row (4x torch's and more on a
    long row's largest probabilities; an accuracy audit); now exp(x - m) / s. A constant row,
    whose sum is exact: 1 / n within 3 ulps (log n rounds by half an ulp in float32: the old
    form was 5-6 ulps off); random rows: within twice torch's own float32 error."""
    n = 22183 if layout == "rows" else 3100  # (log n rounds by half an ulp in float32, both)
    shape = (1, n) if layout == "rows" else (1, n, 2)
    with gpu_nn.backend(backend):
        y = F.softmax(torch.zeros(shape, device=device), 1).cpu()
    one = torch.tensor(1 / n, dtype=torch.float32)
    ulp = torch.nextafter(one, torch.tensor(1.0)) - one
    assert ((y - one).abs() <= 3 * ulp).all(), ((y - one).abs().max() / ulp).item()
    if layout == "rows":  # (torch's own float32 error over a middle dim is 10x its rows')
        x = randn(rng, 2, n).float() * 3
        truth = torch.softmax(x.double(), 1)
        with gpu_nn.backend(backend):
            y = F.softmax(x.to(device), 1).cpu()
        err = lambda a: ((a.double() - truth).abs().max() / truth.abs().max()).item()  # noqa: E731
        torchs = err(torch.softmax(x, 1))
        assert err(y) <= 2 * max(torchs, torch.finfo(torch.float32).eps), (err(y), torchs)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_dense_ops_called_directly_refuse_tensors_that_disagree(backend, device):
    """The custom ops may be called directly (torch.ops.gpu_nn.*), and their kernels take M, K and
    O from one tensor each and read the rest by those sizes: a bias, weight, target, class weight
    or saved statistics of another size was read past its end (values from beyond the tensors
    came back), and linear_backward's products wrote a gradient past its end (the process died
    of heap corruption under the interpreter; a helper's audit). Each is refused before a kernel
    runs, on every backend; the consistent calls still run."""
    E = gpu_nn.KernelInputError
    ops = torch.ops.gpu_nn
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 4, device=device), torch.randn(5, 4, device=device), torch.randn(5, device=device)
    with gpu_nn.backend(backend):
        y = ops.linear.default(x, w, b, "relu")
        g = torch.randn_like(y)
        ops.linear_backward.default(g, x, w, y, "relu", True)
        bad_linear = [((x, w, b[:2], None), "bias of shape"), ((x, w[:, :3], None, None), "cannot be multiplied"),
                      ((x, w[0], None, None), "2-D weight"), ((x.int(), w.int(), None, None), "floating-point"),
                      ((x, w.double(), None, None), "same dtype"), ((x, w, None, "gelu"), "unknown activation")]
        for args, msg in bad_linear:
            with pytest.raises(E, match=msg):
                ops.linear.default(*args)
        for args, msg in (((g[:2], x, w, y, "relu", True), "grad of shape"),
                          ((torch.randn(6, 5, device=device), x, w, None, None, True), "grad of shape"),
                          ((g, x[:2], w, None, None, True), "grad of shape"), ((g, x, w, y[:, :3], "relu", True), "output of shape"),
                          ((g[:, :4], x, w, None, None, True), "grad of shape")):
            with pytest.raises(E, match=msg):
                ops.linear_backward.default(*args)
        logits, t = torch.randn(4, 5, device=device), torch.tensor([0, 3, 1, 4], device=device)
        loss, stats = ops.cross_entropy.default(logits, t, None, "mean", -100, 0.0)
        ops.cross_entropy_backward.default(torch.ones((), device=device), logits, t, None, stats, "mean", -100, 0.0, False)
        for args, msg in (((logits, t[:2], None, "none", -100, 0.0), "target of shape"),
                          ((logits, t, torch.ones(2, device=device), "sum", -100, 0.0), "weight tensor should be defined"),
                          ((logits, torch.rand(2, 5, device=device), None, "none", -100, 0.0), "probability target"),
                          ((logits, t, None, "foo", -100, 0.0), "not a valid value for reduction"),
                          ((logits, t.short(), None, "mean", -100, 0.0), "Long or Byte")):
            with pytest.raises(E, match=msg):
                ops.cross_entropy.default(*args)
        one = torch.ones((), device=device)
        for args, msg in (((one, logits, t, None, stats[:-1], "mean", -100, 0.0, False), "statistics have 13"),
                          ((one, logits, t, None, stats[:0], "mean", -100, 0.0, False), "statistics have 13"),
                          ((one[None][:0], logits, t, None, stats, "mean", -100, 0.0, False), "grad of shape"),
                          ((torch.ones(2, device=device), logits, t, None, stats, "mean", -100, 0.0, False), "grad of shape"),
                          ((one, logits, t[:2], None, stats, "mean", -100, 0.0, False), "target of shape")):
            with pytest.raises(E, match=msg):
                ops.cross_entropy_backward.default(*args)
        for args, msg in (((logits.int(), 1), "floating-point"), ((logits, 2), "Dimension out of range"),
                          ((logits[0, 0], 1), "Dimension out of range")):
            with pytest.raises(E, match=msg):
                ops.softmax.default(*args)
        sm = ops.log_softmax.default(logits, 1)
        with pytest.raises(E, match="floating-point"):
            ops.log_softmax_backward.default(torch.ones_like(sm).int(), sm, 1)
