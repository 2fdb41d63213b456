"""Max / avg / min pooling: reference against torch (float64, values, indices, gradients) over
a grid of geometries; finite differences of the reference backward; every backend (Triton under
the interpreter here, compiled on a GPU; CuPy on a GPU) against the reference; the CUDA C window
math compiled with g++ against the reference; opcheck; bad input; modules against torch's."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import gpu_nn
import gpu_nn.functional as F
import gpu_nn.nn as gnn
from gpu_nn.reference import pool as R
from helpers import assert_close, backend_params, build_host_library, fptr, gpu_dtypes_for, randn

# (kernel, stride, padding, dilation, ceil_mode): kernels 1..7 and asymmetric, strides 1..3,
# padding up to k/2, dilation 1..3, both ceil modes
MAX2D = [
    (1, 1, 0, 1, False), (2, None, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 1, True),
    (3, 1, 1, 2, False), (3, 3, 0, 3, True), (4, 3, 2, 1, True), (5, 2, 2, 1, False),
    (7, 1, 3, 1, False), (7, 3, 3, 1, True), ((2, 3), (1, 2), (1, 1), (2, 1), True),
    ((1, 5), (3, 1), (0, 2), (1, 2), False), ((4, 2), (2, 3), (2, 0), (1, 3), True),
    ((3, 1), 2, (1, 0), (3, 1), True), (2, 3, 1, 3, True),
]
AVG2D = [  # (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    (1, 1, 0, False, True, None), (2, None, 0, False, True, None), (3, 2, 1, False, True, None),
    (3, 2, 1, True, False, None), (3, 2, 1, True, True, None), (4, 3, 2, True, True, None),
    (5, 2, 2, True, False, None), (7, 3, 3, False, False, None), ((2, 3), (1, 2), (1, 1), True, True, None),
    ((3, 2), 1, (1, 0), False, True, 5), ((5, 1), (2, 3), (2, 0), True, False, 3), (3, 2, 1, True, True, -2),
]
MAX1D = [(1, 1, 0, 1, False), (2, None, 0, 1, False), (3, 2, 1, 1, True), (4, 3, 2, 2, True),
         (5, 1, 2, 3, False), (7, 3, 3, 1, True), (3, 1, 0, 3, False), (6, 2, 3, 2, True)]
AVG1D = [(1, 1, 0, False, True), (3, 2, 1, True, True), (4, 3, 2, True, False), (7, 3, 3, False, True),
         (5, 1, 2, True, False), (2, None, 1, True, True)]
SHAPES2D = [(2, 3, 11, 13), (1, 1, 9, 7), (0, 2, 10, 9), (3, 17, 8)]
SHAPES1D = [(2, 3, 17), (1, 1, 9), (0, 2, 12), (3, 19)]


def _fits(shape, k, s, p, d, ceil, nd):
    """Whether torch accepts this geometry on this shape (output size >= 1)."""
    k, s, p, d = (R._pair(v, nd) for v in (k, k if s is None else s, p, d))
    return all(R.out_size(L, *a, ceil) >= 1 for L, *a in zip(shape[-nd:], k, s, p, d))


def _layouts(x, which):
    if which == "noncontig":
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if which == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _fwd_bwd(fn, x, args, g=None, **kw):
    x = x.detach().requires_grad_()
    out = fn(x, *args, **kw)
    y = out[0] if isinstance(out, tuple) else out
    if g is None:
        g = torch.from_numpy(np.random.default_rng(1).standard_normal(y.shape)).to(y.dtype)
    (gx,) = torch.autograd.grad(y, x, g) if y.numel() else (torch.zeros_like(x),)
    return out, gx, g


# --- reference (through the public functions) against torch, float64 -----------------------


@pytest.mark.parametrize("geo", MAX2D, ids=str)
@pytest.mark.parametrize("shape", SHAPES2D, ids=str)
@pytest.mark.parametrize("layout", ["contig", "noncontig", "channels_last"])
def test_max_min_pool2d_reference_matches_torch(geo, shape, layout, rng):
    k, s, p, d, ceil = geo
    if not _fits(shape, k, s, p, d, ceil, 2):
        pytest.skip("geometry does not fit this shape (torch rejects it; covered by test_bad_input)")
    x = _layouts(randn(rng, *shape), layout)
    args = (k, s, p, d, ceil)
    with gpu_nn.backend("reference"):
        (y, i), gx, g = _fwd_bwd(F.max_pool2d, x, args, return_indices=True)
        (ym, im), gxm, _ = _fwd_bwd(F.min_pool2d, x, args, g, return_indices=True)
    (yt, it), gt, _ = _fwd_bwd(TF.max_pool2d, x, args, g, return_indices=True)
    (ytm, itm), gtm, _ = _fwd_bwd(lambda v, *a, **kw: tuple(o * m for o, m in zip(TF.max_pool2d(-v, *a, **kw), (-1, 1))), x, args, g, return_indices=True)
    assert y.shape == yt.shape and y.dtype == torch.float64
    assert torch.equal(y, yt) and torch.equal(i, it)  # random normal data: no ties
    assert torch.equal(ym, ytm) and torch.equal(im, itm)
    assert_close(gx, gt, torch.float64, what="max backward")
    assert_close(gxm, gtm, torch.float64, what="min backward")


@pytest.mark.parametrize("geo", AVG2D, ids=str)
@pytest.mark.parametrize("shape", SHAPES2D, ids=str)
@pytest.mark.parametrize("layout", ["contig", "noncontig", "channels_last"])
def test_avg_pool2d_reference_matches_torch(geo, shape, layout, rng):
    k, s, p, ceil, cip, dov = geo
    if not _fits(shape, k, s, p, 1, ceil, 2):
        pytest.skip("geometry does not fit this shape")
    x = _layouts(randn(rng, *shape), layout)
    args = (k, s, p, ceil, cip, dov)
    with gpu_nn.backend("reference"):
        y, gx, g = _fwd_bwd(F.avg_pool2d, x, args)
    yt, gt, _ = _fwd_bwd(TF.avg_pool2d, x, args, g)
    assert_close(y, yt, torch.float64, k=49, what="avg forward")
    assert_close(gx, gt, torch.float64, k=49, what="avg backward")


@pytest.mark.parametrize("geo", MAX1D, ids=str)
@pytest.mark.parametrize("shape", SHAPES1D, ids=str)
@pytest.mark.parametrize("layout", ["contig", "noncontig"])
def test_max_min_pool1d_reference_matches_torch(geo, shape, layout, rng):
    k, s, p, d, ceil = geo
    if not _fits(shape, k, s, p, d, ceil, 1):
        pytest.skip("geometry does not fit this shape")
    x = _layouts(randn(rng, *shape), layout)
    args = (k, s, p, d, ceil)
    with gpu_nn.backend("reference"):
        (y, i), gx, g = _fwd_bwd(F.max_pool1d, x, args, return_indices=True)
        (ym, im), gxm, _ = _fwd_bwd(F.min_pool1d, x, args, g, return_indices=True)
    (yt, it), gt, _ = _fwd_bwd(TF.max_pool1d, x, args, g, return_indices=True)
    (ytm, itm), gtm, _ = _fwd_bwd(lambda v, *a, **kw: tuple(o * m for o, m in zip(TF.max_pool1d(-v, *a, **kw), (-1, 1))), x, args, g, return_indices=True)
    assert torch.equal(y, yt) and torch.equal(i, it)
    assert torch.equal(ym, ytm) and torch.equal(im, itm)
    assert_close(gx, gt, torch.float64, what="max1d backward")
    assert_close(gxm, gtm, torch.float64, what="min1d backward")


@pytest.mark.parametrize("geo", AVG1D, ids=str)
@pytest.mark.parametrize("shape", SHAPES1D, ids=str)
def test_avg_pool1d_reference_matches_torch(geo, shape, rng):
    k, s, p, ceil, cip = geo
    if not _fits(shape, k, s, p, 1, ceil, 1):
        pytest.skip("geometry does not fit this shape")
    x = randn(rng, *shape)
    with gpu_nn.backend("reference"):
        y, gx, g = _fwd_bwd(F.avg_pool1d, x, geo)
    yt, gt, _ = _fwd_bwd(TF.avg_pool1d, x, geo, g)
    assert_close(y, yt, torch.float64, k=7, what="avg1d forward")
    assert_close(gx, gt, torch.float64, k=7, what="avg1d backward")


def test_ties_keep_first_position_like_torch():
    x = torch.tensor([[[[1.0, 1.0, 0.0], [1.0, 2.0, 2.0], [0.0, 2.0, -1.0]]]], dtype=torch.float64)
    with gpu_nn.backend("reference"):
        y, i = F.max_pool2d(x, 2, 1, return_indices=True)
    yt, it = TF.max_pool2d(x, 2, 1, return_indices=True)
    assert torch.equal(y, yt) and torch.equal(i, it)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("with_indices", [False, True])
def test_signed_zero_ties_keep_the_first_zero_like_torch(backend, device, with_indices, rng):
    """-0.0 and +0.0 compare equal, so torch's "v > best" keeps a window's first zero, sign and
    all: the values must match torch bit for bit, not just numerically (the reference once took
    NumPy's max over the taps, which kept the last). Values alone (no gradient, no indices: the
    forward's values-only path) and with indices; 2x2 windows of mixed zeros, every order, and a
    3x3 / 2 pooling with padding over random signed zeros."""
    zeros = torch.tensor([0.0, -0.0])
    quads = torch.cartesian_prod(*[zeros] * 4)  # [16, 4]: every order of signs
    x = quads.reshape(1, 16, 2, 2).repeat(2, 1, 1, 1)
    x2 = torch.from_numpy(np.where(rng.random((2, 3, 9, 8)) < 0.5, -0.0, 0.0).astype(np.float32))
    # a NaN and an inf elsewhere send the reference down its general path, whose running maximum
    # (np.maximum) kept either zero (a non-finite-values audit)
    x3 = x2.clone()
    x3[0, 0, 0, 0], x3[1, 2, 8, 7] = float("nan"), float("inf")
    for inp, args in ((x, (2,)), (x2, (3, 2, 1)), (x3, (3, 2, 1)), (x3, (2,))):
        yt, it = TF.max_pool2d(inp, *args, return_indices=True)
        with gpu_nn.backend(backend):
            if with_indices:
                y, i = F.max_pool2d(inp.to(device), *args, return_indices=True)
                assert torch.equal(i.cpu(), it)
            else:
                with torch.no_grad():
                    y = F.max_pool2d(inp.to(device), *args)
        assert torch.equal(y.cpu().nan_to_num(7.0), yt.nan_to_num(7.0))
        assert torch.equal(torch.signbit(y.cpu()), torch.signbit(yt))
        assert torch.signbit(yt).any() and not torch.signbit(yt).all()


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
def test_subnormal_float32_pools_like_torch(backend, device, rng):
    """float32 subnormals (below 1.18e-38) are values like any other to torch's kernels: max pooling
    tells them apart (values and indices exact) and average pooling sums them, forward and
    backward. A kernel built with flush-to-zero (CuPy's own NVRTC options) compares every one
    equal to zero and sums them to zero. Compared scaled by 2^140, exactly, so an error is
    relative to the subnormal values, not to 1."""
    x = torch.from_numpy((rng.choice([-1.0, 1.0], (2, 3, 9, 8)) * rng.uniform(1e-44, 1e-38, (2, 3, 9, 8))).astype(np.float32))
    g_max = torch.from_numpy(rng.uniform(1e-44, 1e-38, (2, 3, 5, 4)).astype(np.float32))
    assert (x.abs() < torch.finfo(torch.float32).tiny).all() and (x != 0).all()
    scaled = lambda t: t.detach().cpu().double() * 2.0**140  # noqa: E731

    def run(mod, xin, g):
        xin = xin.clone().requires_grad_(True)
        y, i = mod.max_pool2d(xin, 3, 2, 1, return_indices=True)
        (gx,) = torch.autograd.grad(y, xin, g)
        xa = xin.detach().clone().requires_grad_(True)
        a = mod.avg_pool2d(xa, 3, 2, 1)
        (ga,) = torch.autograd.grad(a, xa, g)
        return y, i, gx, a, ga

    want = run(TF, x, g_max)
    with gpu_nn.backend(backend):
        got = run(F, x.to(device), g_max.to(device))
    for name, o, w in zip(("max", "indices", "max backward"), got[:3], want[:3]):
        assert torch.equal(o.cpu(), w), name
    assert_close(scaled(got[3]), scaled(want[3]), torch.float32, k=9, what="avg forward")
    assert_close(scaled(got[4]), scaled(want[4]), torch.float32, k=9, what="avg backward")
    assert scaled(want[3]).abs().max() > 1 and scaled(want[4]).abs().max() > 1


@pytest.mark.parametrize("kernel,stride,padding", [((12, 13), 5, (6, 3)), (3, 1, 1), ((1, 11), (1, 4), (0, 5))])
def test_ties_and_nans_in_large_and_small_windows_like_torch(kernel, stride, padding, rng):
    # few distinct values, so most windows tie; NaNs sprinkled in: first max wins, last NaN wins.
    # (12, 13) has 156 taps, past the reference's int8 tap code: the int16 path runs.
    x = torch.from_numpy(rng.integers(-2, 3, (2, 3, 29, 31)).astype(np.float64))
    x.view(-1)[rng.choice(x.numel(), 40, replace=False)] = float("nan")
    with gpu_nn.backend("reference"):
        y, i = F.max_pool2d(x, kernel, stride, padding, return_indices=True)
        ym, im = F.min_pool2d(x, kernel, stride, padding, return_indices=True)
    yt, it = TF.max_pool2d(x, kernel, stride, padding, return_indices=True)
    ytm, itm = TF.max_pool2d(-x, kernel, stride, padding, return_indices=True)
    assert torch.isnan(yt).any() and not torch.isnan(yt).all()
    torch.testing.assert_close(y, yt, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(ym, -ytm, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(i, it) and torch.equal(im, itm)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("nd", [1, 2])
def test_nan_propagates(backend, device, nd, rng):
    shape = (2, 3, 9, 8) if nd == 2 else (2, 3, 13)
    x = randn(rng, *shape, dtype=torch.float32)
    flat = x.view(-1)
    flat[[3, 40, 41, 70]] = float("nan")
    args = (3, 2, 1)
    maxf, minf = (F.max_pool2d, F.min_pool2d) if nd == 2 else (F.max_pool1d, F.min_pool1d)
    yt, it = (TF.max_pool2d if nd == 2 else TF.max_pool1d)(x, *args, return_indices=True)
    with gpu_nn.backend(backend):
        y, i = maxf(x.to(device), *args, return_indices=True)
        ym, im = minf(x.to(device), *args, return_indices=True)
    assert torch.isnan(yt).any()
    ytm, itm = (TF.max_pool2d if nd == 2 else TF.max_pool1d)(-x, *args, return_indices=True)
    torch.testing.assert_close(y.cpu(), yt, equal_nan=True)
    torch.testing.assert_close(ym.cpu(), -ytm, equal_nan=True)
    assert torch.equal(im.cpu(), itm)
    assert torch.equal(i.cpu(), it)  # the NaN's position, as torch


def test_all_padding_window_gives_minus_inf_and_no_gradient():
    # dilation 3, padding 1 on a 2x2 input: window (0, 0) reads rows/cols -1 and 2 only
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    with gpu_nn.backend("reference"):
        y, i = F.max_pool2d(x, 2, 1, 1, 3, return_indices=True)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert y.item() == float("-inf") and i.item() == -1
    assert torch.equal(g, torch.zeros_like(x))


# --- finite differences of the reference backward -----------------------------------------


@pytest.mark.parametrize("case", [
    (F.avg_pool2d, (3, 2, 1, True, False)), (F.avg_pool2d, ((2, 3), 1, (1, 1), False, True, 5)),
    (F.avg_pool1d, (3, 2, 1, True, False)), (F.max_pool2d, (3, 2, 1, 2, True)), (F.min_pool2d, ((2, 3), 1, 1)),
    (F.max_pool1d, (3, 2, 1, 2, True)), (F.min_pool1d, (4, 1, 2)),
], ids=lambda c: f"{c[0].__name__}{c[1]}")
def test_reference_backward_finite_differences(case, rng):
    fn, args = case
    shape = (2, 2, 7, 6) if fn.__name__.endswith("2d") else (2, 3, 11)
    # a random permutation of spread-out values: no ties, and gaps far larger than gradcheck's eps
    x = torch.from_numpy(rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 + 0.01).requires_grad_()
    with gpu_nn.backend("reference"):
        assert torch.autograd.gradcheck(lambda v: fn(v, *args), (x,))


# --- opcheck, fake tensors, torch.compile --------------------------------------------------


def test_opcheck_every_op(rng):
    x = randn(rng, 2, 3, 9, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.gpu_nn.max_pool.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], True, False))
    torch.library.opcheck(torch.ops.gpu_nn.max_pool.default, (x, [2, 3], [1, 2], [1, 0], [2, 1], False, True))
    torch.library.opcheck(torch.ops.gpu_nn.avg_pool.default, (x, [3, 2], [2, 1], [1, 1], True, False, None))
    torch.library.opcheck(torch.ops.gpu_nn.avg_pool.default, (x, [3, 3], [2, 2], [1, 1], False, True, 4))
    _, idx = F.max_pool2d(x.detach(), 3, 2, 1, 1, True, True)
    g = randn(rng, *idx.shape)
    torch.library.opcheck(torch.ops.gpu_nn.max_pool_backward.default, (g, idx, [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], [1, 1]))
    ga = randn(rng, 2, 3, 5, 4)
    torch.library.opcheck(torch.ops.gpu_nn.avg_pool_backward.default, (ga, [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], True, False, None))


def test_torch_compile_fullgraph(rng):
    x = randn(rng, 2, 3, 11, 9, dtype=torch.float32)

    def f(v):
        return F.max_pool2d(v, 3, 2, 1).sum() + F.avg_pool2d(v, 2).sum() + F.min_pool1d(v.flatten(2), 3).sum()

    with gpu_nn.backend("reference"):
        torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


# --- bad input ------------------------------------------------------------------------------

BAD = [
    (F.max_pool2d, (torch.randn(5, 5), 2), {}, "non-empty 3D or 4D"),
    (F.max_pool2d, (torch.randn(2, 0, 5, 5), 2), {}, "optional 0 dim batch size"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), 0), {"stride": 1}, "kernel size should be greater than zero"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), 2), {"stride": 0}, "stride should not be zero"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), 2), {"stride": -1}, "stride should be greater than zero"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), 2), {"dilation": 0}, "dilation should be greater than zero"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), 2), {"padding": -1}, "pad must be non-negative"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), 2), {"padding": 2}, "pad should be at most half of effective kernel size"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), 2), {"padding": (1, 2), "stride": 1, "dilation": 3}, "smaller than or equal to half of kernel size"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), 7), {}, "Output size is too small"),
    (F.max_pool2d, (torch.randn(2, 3, 5, 5), (2, 3, 4)), {}, "kernel_size must either be a single int"),
    (F.max_pool2d, (torch.arange(50).reshape(2, 1, 5, 5), 2), {}, "floating-point"),
    (F.min_pool2d, (torch.randn(2, 3, 5, 5), 2), {"padding": 2}, "pad should be at most half"),
    (F.max_pool1d, (torch.randn(5), 2), {}, "Expected 2D or 3D"),
    (F.max_pool1d, (torch.randn(2, 3, 5), 0), {}, "kernel_size must be greater than zero"),
    (F.max_pool1d, (torch.randn(2, 3, 5), 2), {"stride": 0}, "stride must be greater than zero"),
    (F.max_pool1d, (torch.randn(2, 3, 5), 2), {"dilation": 0}, "dilation must be greater than zero"),
    (F.max_pool1d, (torch.randn(2, 3, 5), 2), {"padding": -1}, "padding must be non-negative"),
    (F.max_pool1d, (torch.randn(2, 3, 5), 2), {"padding": 2}, "padding should be at most half of kernel size"),
    (F.max_pool1d, (torch.randn(2, 3, 5), 7), {}, "Invalid computed output size"),
    (F.min_pool1d, (torch.randn(2, 3, 5), 7), {}, "Invalid computed output size"),
    (F.avg_pool2d, (torch.randn(2, 3, 5, 5), 2), {"padding": 2}, "pad should be at most half"),
    (F.avg_pool2d, (torch.randn(2, 3, 5, 5), 2), {"divisor_override": 0}, "divisor must be not zero"),
    (F.avg_pool2d, (torch.randn(2, 3, 5, 5), 7), {}, "Output size is too small"),
    (F.avg_pool2d, (torch.randn(2, 3, 5, 5), 2), {"stride": 0}, "stride should not be zero"),
    (F.avg_pool2d, (torch.randn(2, 3, 5, 5), 2), {"padding": -1}, "pad must be non-negative"),
    (F.avg_pool1d, (torch.randn(5), 2), {}, "Expected 2 to 3 dimensions"),
    (F.avg_pool1d, (torch.randn(2, 3, 5), (2, 3)), {}, "should contain one int"),
    (F.avg_pool1d, (torch.randn(2, 3, 5), 7), {}, "Output size is too small"),
]


@pytest.mark.parametrize("fn,args,kwargs,match", BAD, ids=[f"{b[0].__name__}-{b[3][:24]}" for b in BAD])
def test_bad_input(fn, args, kwargs, match):
    with pytest.raises(gpu_nn.KernelInputError, match=match) as info:
        fn(*args, **kwargs)
    if fn in (F.max_pool2d, F.max_pool1d, F.avg_pool2d, F.avg_pool1d) and "floating" not in match:
        theirs = getattr(TF, fn.__name__)
        with pytest.raises(RuntimeError) as tinfo:
            theirs(*args, **kwargs)
        assert str(info.value) == str(tinfo.value).splitlines()[0], "wording differs from torch's"


MIXED_PADDINGS = [(F.max_pool2d, (0, -1)), (F.max_pool2d, (-1, 0)), (F.min_pool2d, (0, -1)), (F.min_pool2d, (-1, 1)),
                  (F.avg_pool2d, (0, -1)), (F.avg_pool2d, (-1, 0)), (F.max_pool1d, (-1,)), (F.min_pool1d, (-1,)),
                  (F.avg_pool1d, (-1,))]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("fn,padding", MIXED_PADDINGS, ids=[f"{f.__name__}-{p}" for f, p in MIXED_PADDINGS])
def test_mixed_sign_padding_raises_like_torch(backend, device, fn, padding):
    """Issue 20: a padding negative in one dimension only raises KernelInputError with torch's
    message (min pooling: max pooling's) on every backend, before any kernel runs."""
    x = torch.randn(2, 3, 7, 7) if fn.__name__.endswith("2d") else torch.randn(2, 3, 7)
    theirs = getattr(TF, fn.__name__.replace("min_", "max_"))
    with pytest.raises(RuntimeError) as tinfo:
        theirs(x, 3, 1, padding)
    want = str(tinfo.value).splitlines()[0].replace("max_pool1d()", f"{fn.__name__}()")
    with gpu_nn.backend(backend), pytest.raises(gpu_nn.KernelInputError) as info:
        fn(x.to(device), 3, 1, padding)
    assert want in str(info.value)


# --- every backend against the reference ---------------------------------------------------

KERNEL_CASES = [  # (fn, args, shape)
    (F.max_pool2d, (3, 2, 1), (2, 3, 11, 9)),
    (F.max_pool2d, ((2, 3), (1, 2), (1, 1), (2, 1), True), (2, 3, 9, 11)),
    (F.max_pool2d, (2, 3, 1, 3, True), (1, 2, 7, 8)),
    (F.min_pool2d, (3, 2, 1, 1, True), (2, 3, 11, 9)),
    (F.min_pool2d, ((4, 1), (2, 1), (2, 0), (1, 1), False), (2, 2, 9, 5)),
    (F.max_pool1d, (4, 3, 2, 2, True), (2, 3, 29)),
    (F.min_pool1d, (3, 1, 1), (3, 17)),
    (F.avg_pool2d, (3, 2, 1, True, False), (2, 3, 11, 9)),
    (F.avg_pool2d, (3, 2, 1, True, True), (2, 3, 10, 9)),
    (F.avg_pool2d, ((3, 2), 1, (1, 0), False, True, 5), (2, 3, 9, 7)),
    (F.avg_pool2d, ((5, 1), (2, 3), (2, 0), True, False, -3), (1, 2, 11, 10)),
    (F.avg_pool1d, (5, 2, 2, True, True), (2, 3, 23)),
    (F.avg_pool1d, (4, 3, 2, True, False), (3, 19)),
]


# channels_last exists for 4-D inputs only: the other cases run contiguous (and strided) alone
_CASE_LAYOUTS = [(c, lay) for c in KERNEL_CASES for lay in (("contig", "channels_last") if len(c[2]) == 4 else ("contig",))]


def _case_layout_id(v) -> str:
    """pytest id of a _CASE_LAYOUTS value: the layout's name, or the case's function, args and shape."""
    return v if isinstance(v, str) else f"{v[0].__name__}{v[1]}{v[2]}"


@pytest.mark.parametrize("backend,device", backend_params(("triton", "cupy")))
@pytest.mark.parametrize("case,layout", _CASE_LAYOUTS, ids=_case_layout_id)
def test_backend_matches_reference(backend, device, case, layout, rng, dtypes=None):
    fn, args, shape = case
    is_max = fn.__name__.startswith(("max", "min"))
    kw = {"return_indices": True} if is_max else {}
    k = int(np.prod(R._pair(args[0], 2 if fn.__name__.endswith("2d") else 1)))
    for dtype in dtypes or gpu_dtypes_for(backend, device):
        # the reference sees the same dtype-rounded values, so ties created by rounding are shared
        x64 = randn(rng, *shape).to(dtype).double()
        g64 = None
        with gpu_nn.backend("reference"):
            outr, gr, g64 = _fwd_bwd(fn, x64, args, **kw)
        x = _layouts(x64.to(device=device, dtype=dtype), layout)
        with gpu_nn.backend(backend):
            out, gx, _ = _fwd_bwd(fn, x, args, g64.to(device=device, dtype=dtype), **kw)
        y, yr = (out[0], outr[0]) if is_max else (out, outr)
        assert y.dtype == dtype and y.shape == yr.shape
        assert_close(y, yr, dtype, k=k, what=f"{fn.__name__} forward {dtype}")
        if is_max:
            assert torch.equal(out[1].cpu(), outr[1]), "indices"
        assert_close(gx, gr, dtype, k=k, what=f"{fn.__name__} backward {dtype}")


def _ties_and_nans(rng, shape, nan_count):
    """Few distinct small integers (exact in every dtype), so most windows hold a tie of their
    maximum and of their minimum; NaNs at ``nan_count`` random places, some windows with two."""
    x = rng.integers(-2, 3, shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, nan_count, replace=False)] = np.nan
    if flat.size > 4 and nan_count:
        flat[[1, 2]] = np.nan  # two NaNs next to each other: in one window for any kernel >= 2
    return torch.from_numpy(x)


MAXMIN_CASES = [c for c in KERNEL_CASES if c[0].__name__.startswith(("max", "min"))]


def _nan_pair_in_a_window(x, theirs, args):
    """NaN at the first and the last tap of plane 0's first window with two taps: the windows
    ``theirs(*args)`` reads (dilation and stride may skip the NaNs _ties_and_nans placed), found
    as torch's indices of the smallest and largest in-plane position."""
    nd = 2 if theirs is TF.max_pool2d else 1
    plane = x.shape[-nd:]
    pos = torch.arange(math.prod(plane), dtype=torch.float32).reshape(plane).expand(x.shape)
    first = theirs(-pos, *args, return_indices=True)[1].reshape(-1)
    last = theirs(pos, *args, return_indices=True)[1].reshape(-1)
    j = int((first != last).nonzero()[0, 0])
    x.view(-1)[[int(first[j]), int(last[j])]] = float("nan")  # in-plane positions are plane 0's flat ones


def _distinct_integers(n, dtype):
    """The n smallest positive integers that ``dtype`` holds exactly: 1..n in float32 and
    float16 (to 2048), in bfloat16 every integer to 256, then every 2nd to 512, every 4th..."""
    v = torch.arange(1, 4 * n + 1, dtype=torch.float64)
    return v[v.to(dtype).double() == v][:n]


@pytest.mark.parametrize("backend,device", backend_params(("triton", "cupy")))
@pytest.mark.parametrize("case", MAXMIN_CASES, ids=lambda c: f"{c[0].__name__}{c[1]}{c[2]}")
@pytest.mark.parametrize("nans", [0, 7], ids=["ties", "ties+nans"])
def test_backend_ties_and_nans_like_torch(backend, device, case, nans, rng, dtypes=None):
    """Issue 20: deliberate ties and NaNs in the kernels' windows (random inputs tie only by
    rounding luck). torch: ties keep the first position; a NaN wins, the last NaN of a window
    is its index; the gradient goes to that position. min pooling is -max_pool(-x)."""
    fn, args, shape = case
    theirs = TF.max_pool2d if fn.__name__.endswith("2d") else TF.max_pool1d
    sign = -1.0 if fn.__name__.startswith("min") else 1.0
    x32 = _ties_and_nans(rng, shape, nans)
    if nans:
        _nan_pair_in_a_window(x32, theirs, args)
    yt, it = theirs(sign * x32, *args, return_indices=True)
    yt = sign * yt
    assert (nans == 0) == (not torch.isnan(yt).any())
    for dtype in dtypes or gpu_dtypes_for(backend, device):
        x = x32.to(device=device, dtype=dtype).requires_grad_()
        with gpu_nn.backend(backend):
            y, i = fn(x, *args, return_indices=True)
            g = _distinct_integers(y.numel(), dtype).to(device=device, dtype=dtype).reshape(y.shape)
            (gx,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close(y.cpu().float(), yt, equal_nan=True, rtol=0, atol=0, msg=f"values {dtype}")
        assert torch.equal(i.cpu(), it), f"indices {dtype}"
        # every output sends its (distinct, exact) gradient to torch's index: torch's float32
        # sums are exact, and ours (as torch's CUDA kernels) add in float32 and round once to dtype
        xt = (sign * x32).requires_grad_()
        (gt,) = torch.autograd.grad(theirs(xt, *args), xt, g.cpu().float())
        torch.testing.assert_close(gx.cpu(), gt.to(dtype), rtol=0, atol=0, msg=f"gradient {dtype}")


@pytest.mark.parametrize("backend,device", backend_params(("triton", "cupy")))
def test_backend_zero_batch_and_noncontig(backend, device, rng):
    with gpu_nn.backend(backend):
        y = F.max_pool2d(torch.randn(0, 3, 9, 9, device=device), 3, 2)
        assert y.shape == (0, 3, 4, 4)
        x = randn(rng, 2, 3, 9, 10, dtype=torch.float32, noncontig=True).to(device)
        torch.testing.assert_close(F.avg_pool2d(x, 3, 2, 1).cpu(), TF.avg_pool2d(x.cpu(), 3, 2, 1))
        torch.testing.assert_close(F.max_pool2d(x, 3, 2, 1).cpu(), TF.max_pool2d(x.cpu(), 3, 2, 1))


def test_bfloat16_max_pooling_is_exact():
    """bfloat16 max pooling only selects, so it equals torch's exactly: compiled on a GPU and in
    the interpreter (which, without gpu-nn's fix, orders negative bfloat16 backwards)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not gpu_nn._backend.interpret_mode():
        pytest.skip("TRITON_INTERPRET is not set in this session: triton cannot run on this CPU machine")
    x = torch.randn(2, 3, 9, 10, dtype=torch.bfloat16, device=device)
    with gpu_nn.backend("triton"):
        torch.testing.assert_close(F.max_pool2d(x, 3, 2, 1), TF.max_pool2d(x, 3, 2, 1), rtol=0, atol=0)


# --- CUDA C: window math on the host, NVRTC with non-default defines ------------------------

_HOST_SRC = r"""
#include "pool_math.cuh"
// The kernels' window math with the index type I the kernels use: long long (POOL_NARROW=0) and
// int (POOL_NARROW=1); exported as <name> and <name>32. The planes' loops here are plain C++.
template <typename I>
static void max_fwd_t(const float* x, float* y, long long* idx, long long P, long long H, long long W, long long OH, long long OW,
                      int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int minimum) {
    for (long long pl = 0; pl < P; ++pl)
        for (long long oh = 0; oh < OH; ++oh)
            for (long long ow = 0; ow < OW; ++ow) {
                long long o = (pl * OH + oh) * OW + ow;
                gn_max_window<float, I>(x, (I)(pl * H * W), (I)W, (I)1, (I)H, (I)W, (I)(oh * SH - PH), (I)(ow * SW - PW),
                                        KH, KW, DH, DW, minimum, y + o, idx + o);
            }
}
template <typename I>
static void avg_fwd_t(const float* x, float* y, long long P, long long H, long long W, long long OH, long long OW,
                      int KH, int KW, int SH, int SW, int PH, int PW, int cp, int dv) {
    for (long long pl = 0; pl < P; ++pl)
        for (long long oh = 0; oh < OH; ++oh)
            for (long long ow = 0; ow < OW; ++ow)
                y[(pl * OH + oh) * OW + ow] = gn_avg_window<float, I>(x, (I)(pl * H * W), (I)W, (I)1, (I)H, (I)W, (I)(oh * SH - PH),
                                                                      (I)(ow * SW - PW), KH, KW, PH, PW, cp, dv);
}
template <typename I>
static void max_bwd_t(const float* g, const long long* idx, float* dx, long long P, long long H, long long W, long long OH, long long OW,
                      int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW) {
    for (long long pl = 0; pl < P; ++pl)
        for (long long ih = 0; ih < H; ++ih)
            for (long long iw = 0; iw < W; ++iw)
                dx[(pl * H + ih) * W + iw] = gn_max_gather<float, I>(g + pl * OH * OW, idx + pl * OH * OW, (I)ih, (I)iw, (I)W,
                                                                     (I)OH, (I)OW, (I)1, KH, KW, SH, SW, PH, PW, DH, DW);
}
template <typename I>
static void avg_bwd_t(const float* g, float* dx, long long P, long long H, long long W, long long OH, long long OW,
                      int KH, int KW, int SH, int SW, int PH, int PW, int cp, int dv) {
    for (long long pl = 0; pl < P; ++pl)
        for (long long ih = 0; ih < H; ++ih)
            for (long long iw = 0; iw < W; ++iw)
                dx[(pl * H + ih) * W + iw] = gn_avg_gather<float, I>(g + pl * OH * OW, (I)ih, (I)iw, (I)H, (I)W, (I)OH, (I)OW,
                                                                     (I)1, KH, KW, SH, SW, PH, PW, cp, dv);
}
// the kernels' element loops (pool.cu): dense outputs in contiguous order, or with cl in
// channels_last order (POOL_CL: x, y, idx, g and dx in (n, h, w, c) order), the elements visited
// in memory order and placed with the kernels' own gn_unravel / gn_plane; the sizes divide as the
// kernels' do: plainly with int64 indices, as gn_fastdiv with 32-bit ones (POOL_NARROW)
static long long gn_divisor(long long d, long long) { return d; }
static gn_fastdiv gn_divisor(long long d, int) { return gn_fastdiv_make((unsigned int)d); }
#define GN_UNRAVEL(e, C, R, Q, cl, n, c, r, q) \
    gn_unravel<I>(e, gn_divisor(C, (I)0), gn_divisor(R, (I)0), gn_divisor(Q, (I)0), cl, n, c, r, q)
template <typename I>
static void max_fwd_k_t(const float* x, float* y, long long* idx, long long N, long long C, long long H, long long W,
                        long long OH, long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW,
                        int minimum, int cl) {
    I sxn = (I)(C * H * W), sxc = cl ? (I)1 : (I)(H * W), sxh = cl ? (I)(W * C) : (I)W, sxw = cl ? (I)C : (I)1;
    for (I o = 0; o < (I)(N * OH * OW * C); ++o) {
        I n, c, oh, ow;
        GN_UNRAVEL(o, C, OH, OW, cl != 0, &n, &c, &oh, &ow);
        gn_max_window<float, I>(x, n * sxn + c * sxc, sxh, sxw, (I)H, (I)W, (I)(oh * SH - PH), (I)(ow * SW - PW),
                                KH, KW, DH, DW, minimum, y + o, idx + o);
    }
}
template <typename I>
static void avg_fwd_k_t(const float* x, float* y, long long N, long long C, long long H, long long W, long long OH,
                        long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int cp, int dv, int cl) {
    I sxn = (I)(C * H * W), sxc = cl ? (I)1 : (I)(H * W), sxh = cl ? (I)(W * C) : (I)W, sxw = cl ? (I)C : (I)1;
    for (I o = 0; o < (I)(N * OH * OW * C); ++o) {
        I n, c, oh, ow;
        GN_UNRAVEL(o, C, OH, OW, cl != 0, &n, &c, &oh, &ow);
        y[o] = gn_avg_window<float, I>(x, n * sxn + c * sxc, sxh, sxw, (I)H, (I)W, (I)(oh * SH - PH), (I)(ow * SW - PW),
                                       KH, KW, PH, PW, cp, dv);
    }
}
template <typename I>
static void max_bwd_k_t(const float* g, const long long* idx, float* dx, long long N, long long C, long long H, long long W,
                        long long OH, long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int cl) {
    for (I e = 0; e < (I)(N * H * W * C); ++e) {
        I n, c, ih, iw;
        GN_UNRAVEL(e, C, H, W, cl != 0, &n, &c, &ih, &iw);
        I ob = gn_plane<I>(n, c, (I)C, (I)OH, (I)OW, cl != 0);
        dx[e] = gn_max_gather<float, I>(g + ob, idx + ob, ih, iw, (I)W, (I)OH, (I)OW, cl ? (I)C : (I)1, KH, KW, SH, SW,
                                        PH, PW, DH, DW);
    }
}
template <typename I>
static void avg_bwd_k_t(const float* g, float* dx, long long N, long long C, long long H, long long W, long long OH,
                        long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int cp, int dv, int cl) {
    for (I e = 0; e < (I)(N * H * W * C); ++e) {
        I n, c, ih, iw;
        GN_UNRAVEL(e, C, H, W, cl != 0, &n, &c, &ih, &iw);
        dx[e] = gn_avg_gather<float, I>(g + gn_plane<I>(n, c, (I)C, (I)OH, (I)OW, cl != 0), ih, iw, (I)H, (I)W, (I)OH,
                                        (I)OW, cl ? (I)C : (I)1, KH, KW, SH, SW, PH, PW, cp, dv);
    }
}
// each entry point twice from one parameter list: <name> with long long indices, <name>32 with int
#define GN_PAIR(name, PARAMS, ARGS) \
    void name PARAMS { name##_t<long long> ARGS; } \
    void name##32 PARAMS { name##_t<int> ARGS; }
extern "C" {
GN_PAIR(max_fwd, (const float* x, float* y, long long* idx, long long P, long long H, long long W, long long OH,
                  long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int m),
        (x, y, idx, P, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, m))
GN_PAIR(avg_fwd, (const float* x, float* y, long long P, long long H, long long W, long long OH, long long OW,
                  int KH, int KW, int SH, int SW, int PH, int PW, int cp, int dv),
        (x, y, P, H, W, OH, OW, KH, KW, SH, SW, PH, PW, cp, dv))
GN_PAIR(max_bwd, (const float* g, const long long* idx, float* dx, long long P, long long H, long long W, long long OH,
                  long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW),
        (g, idx, dx, P, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW))
GN_PAIR(avg_bwd, (const float* g, float* dx, long long P, long long H, long long W, long long OH, long long OW,
                  int KH, int KW, int SH, int SW, int PH, int PW, int cp, int dv),
        (g, dx, P, H, W, OH, OW, KH, KW, SH, SW, PH, PW, cp, dv))
GN_PAIR(max_fwd_k, (const float* x, float* y, long long* idx, long long N, long long C, long long H, long long W,
                    long long OH, long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int m,
                    int cl),
        (x, y, idx, N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, m, cl))
GN_PAIR(avg_fwd_k, (const float* x, float* y, long long N, long long C, long long H, long long W, long long OH,
                    long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int cp, int dv, int cl),
        (x, y, N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, cp, dv, cl))
GN_PAIR(max_bwd_k, (const float* g, const long long* idx, float* dx, long long N, long long C, long long H, long long W,
                    long long OH, long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int cl),
        (g, idx, dx, N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, cl))
GN_PAIR(avg_bwd_k, (const float* g, float* dx, long long N, long long C, long long H, long long W, long long OH,
                    long long OW, int KH, int KW, int SH, int SW, int PH, int PW, int cp, int dv, int cl),
        (g, dx, N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, cp, dv, cl))
// gn_fastdiv: its m and s, and n / d by them
void fastdiv_magic(unsigned int d, unsigned int* m, unsigned int* s) {
    gn_fastdiv f = gn_fastdiv_make(d);
    *m = f.m;
    *s = f.s;
}
int fastdiv(int n, unsigned int d) { return gn_div(n, gn_fastdiv_make(d)); }
}
"""


@pytest.fixture(scope="module")
def host_lib():
    return build_host_library(_HOST_SRC, "pool_math")


def _ll(*v):
    import ctypes

    return [ctypes.c_longlong(int(a)) for a in v]


def _ci(*v):
    import ctypes

    return [ctypes.c_int(int(a)) for a in v]


_INDEX = pytest.mark.parametrize("sfx", ["", "32"], ids=["int64", "int32"])  # POOL_NARROW 0 / 1's index type


@_INDEX
@pytest.mark.parametrize("geo", MAX2D, ids=str)
def test_cuda_max_math_on_host(host_lib, geo, sfx, rng):
    k, s, p, d, ceil = geo
    k, s, p, d = (R._pair(v, 2) for v in (k, k if s is None else s, p, d))
    H, W = 11, 13
    x = rng.standard_normal((2, 3, H, W)).astype(np.float32)
    x.reshape(-1)[[5, 77]] = np.nan
    g = None
    for minimum in (0, 1):
        yr, ir = (R.min_pool2d if minimum else R.max_pool2d)(x, k, s, p, d, ceil, True)
        OH, OW = yr.shape[-2:]
        y = np.empty_like(yr)
        idx = np.empty(yr.shape, np.int64)
        getattr(host_lib, "max_fwd" + sfx)(fptr(x), fptr(y), fptr(idx), *_ll(6, H, W, OH, OW), *_ci(*k, *s, *p, *d, minimum))
        np.testing.assert_array_equal(y, yr)
        np.testing.assert_array_equal(idx, ir)
        g = rng.standard_normal(yr.shape).astype(np.float32)
        dx = np.empty_like(x)
        getattr(host_lib, "max_bwd" + sfx)(fptr(g), fptr(idx), fptr(dx), *_ll(6, H, W, OH, OW), *_ci(*k, *s, *p, *d))
        np.testing.assert_allclose(dx, R.max_pool2d_backward(g, ir, x.shape), rtol=1e-6, atol=1e-6)


@_INDEX
@pytest.mark.parametrize("geo", MAX2D, ids=str)
@pytest.mark.parametrize("nans", [0, 9], ids=["ties", "ties+nans"])
def test_cuda_max_math_ties_and_nans_on_host(host_lib, geo, nans, sfx, rng):
    """Issue 20: gn_max_window / gn_max_gather on inputs built to tie (and with NaNs, two of them
    adjacent), against torch's values, indices and gradient, max and min pooling."""
    k, s, p, d, ceil = geo
    k, s, p, d = (R._pair(v, 2) for v in (k, k if s is None else s, p, d))
    H, W = 11, 13
    x = _ties_and_nans(rng, (2, 3, H, W), nans).numpy()
    for minimum in (0, 1):
        sign = -1.0 if minimum else 1.0
        xt = torch.from_numpy(sign * x).requires_grad_()
        yt, it = TF.max_pool2d(xt, k, s, p, d, ceil, return_indices=True)
        OH, OW = yt.shape[-2:]
        y = np.empty(tuple(yt.shape), np.float32)
        idx = np.empty(tuple(yt.shape), np.int64)
        getattr(host_lib, "max_fwd" + sfx)(fptr(x), fptr(y), fptr(idx), *_ll(6, H, W, OH, OW), *_ci(*k, *s, *p, *d, minimum))
        np.testing.assert_array_equal(y, sign * yt.detach().numpy())
        np.testing.assert_array_equal(idx, it.numpy())
        g = np.arange(1, y.size + 1, dtype=np.float32).reshape(y.shape)
        (gt,) = torch.autograd.grad(yt, xt, torch.from_numpy(g))
        dx = np.empty_like(x)
        getattr(host_lib, "max_bwd" + sfx)(fptr(g), fptr(idx), fptr(dx), *_ll(6, H, W, OH, OW), *_ci(*k, *s, *p, *d))
        np.testing.assert_array_equal(dx, gt.numpy())


@_INDEX
@pytest.mark.parametrize("geo", MAX2D + [((2, 1), 1, (1, 0), (5, 1), False)], ids=str)
def test_cuda_max_math_default_positions_on_host(host_lib, geo, sfx, rng):
    """gn_max_window's default position (torch's: the window's first in-input tap, taken with the
    value -inf; -1 for a window made only of padding, the reference's choice where torch's index
    points outside the input), which only shows where no tap is greater: inputs of -inf (+inf
    for min pooling) with a few finite values, against the reference's values and indices. The
    last geometry (taps 5 rows apart, one row of padding, 4 rows) has a window of padding only."""
    k, s, p, d, ceil = geo
    k, s, p, d = (R._pair(v, 2) for v in (k, k if s is None else s, p, d))
    padding_only = d == (5, 1)
    H, W = (4 if padding_only else 11), 13
    x = np.full((2, 3, H, W), -np.inf, np.float32)
    x.reshape(-1)[rng.choice(x.size, 5, replace=False)] = rng.standard_normal(5)
    for minimum in (0, 1):
        xs = -x if minimum else x
        yr, ir = (R.min_pool2d if minimum else R.max_pool2d)(xs, k, s, p, d, ceil, True)
        OH, OW = yr.shape[-2:]
        y = np.empty_like(yr)
        idx = np.empty(yr.shape, np.int64)
        getattr(host_lib, "max_fwd" + sfx)(fptr(xs), fptr(y), fptr(idx), *_ll(6, H, W, OH, OW),
                                           *_ci(*k, *s, *p, *d, minimum))
        np.testing.assert_array_equal(y, yr)
        np.testing.assert_array_equal(idx, ir)
        assert (ir == -1).any() == padding_only


def _nhwc(a):
    """An [N, C, R, Q] array's channels_last memory: [N, R, Q, C], C-contiguous."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def test_fastdiv_divides_every_32_bit_index_like_the_launcher_computes_it(host_lib, rng):
    """pool_math.cuh's gn_fastdiv (the 32-bit kernels' division of an index by a size: a
    multiply-high, an add and a shift) against Python's floor division, and its magic numbers
    against the launcher's (gpu_nn.kernels.fastdiv.magic, what the kernels receive), at the edges of
    its range (n up to 2^31 - 1, divisors 1 to 2^31 - 1, powers of two and their neighbours,
    multiples of d and one below) and at random."""
    import ctypes

    from gpu_nn.kernels import fastdiv

    top = 2**31 - 1
    ds = {1, 2, 3, 5, 6, 7, 9, 10, 12, 14, 28, 56, 112, 224, 1000, 12345, top}
    ds |= {v for k in range(1, 31) for v in (2**k - 1, 2**k, 2**k + 1)}
    ds |= set(int(v) for v in rng.integers(1, top, 200))
    m, sh = ctypes.c_uint(), ctypes.c_uint()
    host_lib.fastdiv.argtypes = [ctypes.c_int, ctypes.c_uint]
    for d in sorted(ds):
        host_lib.fastdiv_magic(ctypes.c_uint(d), ctypes.byref(m), ctypes.byref(sh))
        assert (m.value, sh.value) == fastdiv.magic(d), d
        q = top // d
        ns = {0, 1, d - 1, d, d + 1, top, top - 1, q * d, q * d - 1, (q // 2) * d, (q // 2) * d - 1}
        ns |= set(int(v) for v in rng.integers(0, top, 20))
        for n in ns:
            if 0 <= n <= top:
                assert host_lib.fastdiv(n, d) == n // d, (n, d)


@_INDEX
@pytest.mark.parametrize("cl", [0, 1], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("geo", [MAX2D[i] for i in (2, 4, 10, 12)] + [AVG2D[i] for i in (3, 8, 10)], ids=str)
def test_cuda_kernel_loops_on_host(host_lib, geo, cl, sfx, rng):
    """pool.cu's element loops (gn_unravel, gn_plane, the plane stride of the gathers) in both
    layouts: outputs, indices and gradients dense in contiguous order, or with POOL_CL in
    channels_last order (channels fastest, a plane's positions C apart), against the reference
    laid out the same way (max / min with NaNs, and avg)."""
    H, W, N, C = 9, 10, 2, 5
    lay = _nhwc if cl else np.ascontiguousarray
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    x.reshape(-1)[[7, 40]] = np.nan
    if len(geo) == 5:  # max / min
        k, s, p, d, ceil = geo
        k, s, p, d = (R._pair(v, 2) for v in (k, k if s is None else s, p, d))
        for minimum in (0, 1):
            yr, ir = (R.min_pool2d if minimum else R.max_pool2d)(x, k, s, p, d, ceil, True)
            OH, OW = yr.shape[-2:]
            y, idx = np.empty_like(lay(yr)), np.empty(lay(ir).shape, np.int64)
            getattr(host_lib, "max_fwd_k" + sfx)(fptr(lay(x)), fptr(y), fptr(idx), *_ll(N, C, H, W, OH, OW),
                                                 *_ci(*k, *s, *p, *d, minimum, cl))
            np.testing.assert_array_equal(y, lay(yr))
            np.testing.assert_array_equal(idx, lay(ir))
            g = rng.standard_normal(yr.shape).astype(np.float32)
            dx = np.empty_like(lay(x))
            getattr(host_lib, "max_bwd_k" + sfx)(fptr(lay(g)), fptr(idx), fptr(dx), *_ll(N, C, H, W, OH, OW),
                                                 *_ci(*k, *s, *p, *d, cl))
            np.testing.assert_allclose(dx, lay(R.max_pool2d_backward(g, ir, x.shape)), rtol=1e-6, atol=1e-6)
        return
    k, s, p, ceil, cip, dov = geo
    k, s, p = (R._pair(v, 2) for v in (k, k if s is None else s, p))
    x = np.nan_to_num(x)
    yr = R.avg_pool2d(x, k, s, p, ceil, cip, dov)
    OH, OW = yr.shape[-2:]
    y = np.empty_like(lay(yr))
    getattr(host_lib, "avg_fwd_k" + sfx)(fptr(lay(x)), fptr(y), *_ll(N, C, H, W, OH, OW),
                                         *_ci(*k, *s, *p, int(cip), dov or 0, cl))
    np.testing.assert_allclose(y, lay(yr), rtol=1e-6, atol=1e-6)
    g = rng.standard_normal(yr.shape).astype(np.float32)
    dx = np.empty_like(lay(x))
    getattr(host_lib, "avg_bwd_k" + sfx)(fptr(lay(g)), fptr(dx), *_ll(N, C, H, W, OH, OW),
                                         *_ci(*k, *s, *p, int(cip), dov or 0, cl))
    np.testing.assert_allclose(dx, lay(R.avg_pool2d_backward(g, x.shape, k, s, p, ceil, cip, dov)), rtol=1e-5, atol=1e-6)


@_INDEX
@pytest.mark.parametrize("geo", AVG2D, ids=str)
def test_cuda_avg_math_on_host(host_lib, geo, sfx, rng):
    k, s, p, ceil, cip, dov = geo
    k, s, p = (R._pair(v, 2) for v in (k, k if s is None else s, p))
    H, W = 11, 13
    x = rng.standard_normal((2, 3, H, W)).astype(np.float32)
    yr = R.avg_pool2d(x, k, s, p, ceil, cip, dov)
    OH, OW = yr.shape[-2:]
    y = np.empty_like(yr)
    getattr(host_lib, "avg_fwd" + sfx)(fptr(x), fptr(y), *_ll(6, H, W, OH, OW), *_ci(*k, *s, *p, int(cip), dov or 0))
    np.testing.assert_allclose(y, yr, rtol=1e-6, atol=1e-6)
    g = rng.standard_normal(yr.shape).astype(np.float32)
    dx = np.empty_like(x)
    getattr(host_lib, "avg_bwd" + sfx)(fptr(g), fptr(dx), *_ll(6, H, W, OH, OW), *_ci(*k, *s, *p, int(cip), dov or 0))
    np.testing.assert_allclose(dx, R.avg_pool2d_backward(g, x.shape, k, s, p, ceil, cip, dov), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("defines", [
    {"POOL_T": "gn_f16", "POOL_THREADS": 128}, {"POOL_T": "gn_bf16", "POOL_THREADS": 512}, {"POOL_T": "double"},
    {"POOL_T": "float", "POOL_NARROW": 1}, {"POOL_T": "gn_bf16", "POOL_NARROW": 1},
    {"POOL_T": "float", "POOL_NARROW": 1, "POOL_CL": 1}, {"POOL_T": "gn_f16", "POOL_CL": 1},
    {"POOL_T": "float", "POOL_NARROW": 1, "POOL_XW1": 1, "POOL_FIXED": 1, "POOL_KH": 3, "POOL_KW": 3, "POOL_SH": 2,
     "POOL_SW": 2, "POOL_DH": 1, "POOL_DW": 1, "POOL_MIN": 0},
    {"POOL_T": "gn_bf16", "POOL_CL": 1, "POOL_FIXED": 1, "POOL_KH": 1, "POOL_KW": 5, "POOL_SH": 3, "POOL_SW": 1,
     "POOL_DH": 1, "POOL_DW": 2, "POOL_MIN": 1},
], ids=str)
def test_pool_cu_compiles_with_defines(defines):
    from gpu_nn.kernels import cuda as kcuda

    assert kcuda.compile_cubin("pool", defines, arch="sm_90")[:4] == b"\x7fELF"


# --- modules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ours,theirs,kwargs,shape", [
    (gnn.MaxPool2d, torch.nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (2, 3, 11, 9)),
    (gnn.MaxPool1d, torch.nn.MaxPool1d, dict(kernel_size=4, stride=3, padding=2, dilation=2, return_indices=True), (2, 3, 29)),
    (gnn.AvgPool2d, torch.nn.AvgPool2d, dict(kernel_size=(3, 2), padding=1, count_include_pad=False, divisor_override=5), (2, 3, 11, 9)),
    (gnn.AvgPool1d, torch.nn.AvgPool1d, dict(kernel_size=5, stride=2, padding=2, ceil_mode=True), (3, 17)),
    (gnn.MinPool2d, torch.nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1), (2, 3, 11, 9)),
    (gnn.MinPool1d, torch.nn.MaxPool1d, dict(kernel_size=3, return_indices=True), (2, 3, 17)),
], ids=lambda v: getattr(v, "__name__", None))
def test_modules_match_torch(ours, theirs, kwargs, shape, rng):
    m, t = ours(**kwargs), theirs(**kwargs)
    assert m.extra_repr() == t.extra_repr()
    x = randn(rng, *shape)
    neg = ours.__name__.startswith("Min")
    with gpu_nn.backend("reference"):
        y = m(x)
    yt = t(-x if neg else x)
    if isinstance(y, tuple):
        assert torch.equal(y[1], yt[1])
        y, yt = y[0], yt[0]
    torch.testing.assert_close(y, -yt if neg else yt)
    if neg:
        assert not isinstance(m, torch.nn.MaxPool2d) and type(m).__name__ in repr(m)


def test_check_cases_exist_for_every_op():
    from gpu_nn.ops import pool

    assert {c.op for c in pool.CHECK_CASES} == set(pool.__all__) - set(pool.ALIASES)
    assert set(pool.ALIASES) <= set(pool.__all__) and set(pool.ALIASES.values()) <= {c.op for c in pool.CHECK_CASES}


# --- torch's checks, in torch's order (issues 18.3, 19.6) ------------------------------------


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (we compare whatever torch raises)
        return type(e), str(e)
    return None


def _pool_grid():
    shapes2 = [(2, 3, 5, 5), (0, 3, 5, 5), (3, 0, 5, 5), (2, 3, 0, 5), (3, 5, 5), (5, 5), (1, 2, 3, 5, 5)]
    shapes1 = [(2, 3, 7), (0, 3, 7), (3, 0, 7), (3, 7), (7,), (2, 3, 0)]
    pads, dils = [-1, 0, 1, 2], [0, 1, 2, -1]
    for shape in shapes2:
        for k in (0, 3, -1, (3, 0), (2, 3)):
            for s in (None, 0, -1, 2):
                for p in pads:
                    yield "avg_pool2d", shape, dict(kernel_size=k, stride=s, padding=p)
                    for d in dils:
                        yield "max_pool2d", shape, dict(kernel_size=k, stride=s, padding=p, dilation=d)
    for shape in shapes1:
        for k in (0, 1, 3, -1):
            for s in (None, 0, -1):
                for p in pads:
                    yield "avg_pool1d", shape, dict(kernel_size=k, stride=s, padding=p)
                    for d in dils:
                        yield "max_pool1d", shape, dict(kernel_size=k, stride=s, padding=p, dilation=d)
                        yield "max_pool1d", shape, dict(kernel_size=k, stride=s, padding=p, dilation=d, return_indices=True)


def test_every_fault_combination_reports_what_torch_reports(rng):
    """A grid of bad kernel / stride / padding / dilation values on bad and zero-size shapes:
    whenever torch raises, we raise an exception of torch's type whose message contains torch's
    (the first fault torch reports: padding before shape, 1d-with-indices through the 2d path),
    and we run wherever torch runs."""
    bad = []
    for name, shape, kw in _pool_grid():
        x = torch.from_numpy(rng.standard_normal(shape))
        theirs = _outcome(lambda: getattr(torch.nn.functional, name)(x, **kw))
        with gpu_nn.backend("reference"):
            ours = _outcome(lambda: getattr(F, name)(x, **kw))
        ok = (theirs is None and ours is None) or (
            theirs is not None and ours is not None and issubclass(ours[0], theirs[0]) and theirs[1] in ours[1])
        if not ok:
            bad.append(f"{name}{shape} {kw}: torch {theirs}, ours {ours}")
    assert not bad, f"{len(bad)} mismatches, e.g.\n" + "\n".join(bad[:10])


def test_avg_range_refusals_come_first_where_torch_has_them(monkeypatch):
    """torch 2.11's avg_pool2d meta function refuses kernel sizes < 1 (and some strides) as
    "integer out of range" before the padding and shape checks; avg_pool1d gets there after its
    own rank and arity checks. The installed torch decides (probed at import): here the rule is
    forced, so its order is checked on any torch."""
    from gpu_nn.ops import pool as P

    monkeypatch.setattr(P, "_AVG_REFUSED", {"kernel_size": {0, -1}, "stride": {-1}, "padding": set()})
    monkeypatch.setattr(P, "_PARSED", {})
    x2, x1 = torch.zeros(2, 3, 5, 5), torch.zeros(2, 3, 7)
    for fn, x, kw in ((F.avg_pool2d, x2, dict(kernel_size=0, padding=-1)), (F.avg_pool2d, x2[0, 0], dict(kernel_size=(3, -1))),
                      (F.avg_pool2d, x2, dict(kernel_size=3, stride=(1, -2))), (F.avg_pool1d, x1, dict(kernel_size=0, stride=0))):
        with pytest.raises(gpu_nn.KernelInputError, match="^integer out of range$"):
            fn(x, **kw)
    with pytest.raises(gpu_nn.KernelInputError, match="stride should not be zero"):
        F.avg_pool2d(x2, 3, stride=0)
    with pytest.raises(gpu_nn.KernelInputError, match="pad must be non-negative"):
        F.avg_pool2d(x2, 3, padding=-1)
    with pytest.raises(gpu_nn.KernelInputError, match="avg_pool2d: stride must either be omitted"):
        F.avg_pool2d(x2, 3, stride=(1, 1, 1))
    with pytest.raises(gpu_nn.KernelInputError, match="Expected 2 to 3 dimensions"):
        F.avg_pool1d(torch.zeros(7), 0)
    assert F.avg_pool2d(x2, 3, 2, 1).shape == (2, 3, 3, 3)


_TYPE_CASES = [
    ("max_pool2d", ("22",), {}),
    ("max_pool2d", ((2.9, 2),), {}),
    ("max_pool2d", (2.9,), {}),
    ("max_pool2d", (True,), {}),
    ("max_pool2d", (2,), dict(stride=1.5)),
    ("max_pool2d", (2,), dict(padding=0.0)),
    ("max_pool2d", (2,), dict(dilation=(1, 1.5))),
    ("max_pool1d", (2.5,), {}),
    ("max_pool1d", ("2",), {}),
    ("max_pool1d", (2.5,), dict(return_indices=True)),
    ("avg_pool1d", (2.5,), {}),
    ("avg_pool2d", ("22",), {}),
    ("avg_pool2d", ((2, 2.0),), {}),
    ("avg_pool2d", (2,), dict(divisor_override=2.5)),
    ("avg_pool2d", (2,), dict(divisor_override="2")),
    # bool arguments: a bool only (ran as bool(v) before, where torch refuses)
    ("max_pool2d", (2,), dict(ceil_mode="yes")),
    ("max_pool2d", (2,), dict(ceil_mode=1)),
    ("max_pool2d", (2,), dict(ceil_mode=None, return_indices=True)),
    ("max_pool2d", (2, 2, 0, 1, torch.tensor(True)), {}),
    ("max_pool1d", (2,), dict(ceil_mode=np.bool_(True))),
    ("max_pool1d", (2,), dict(ceil_mode=0, return_indices=True)),
    ("avg_pool2d", (2,), dict(ceil_mode=1.0)),
    ("avg_pool2d", (2,), dict(count_include_pad=None)),
    ("avg_pool1d", (2,), dict(ceil_mode="yes")),
    ("avg_pool1d", (2,), dict(count_include_pad=0)),
    ("max_pool2d", (2.5,), dict(ceil_mode="yes")),  # the kernel size first, as torch's parser
]


_MODULE_TYPE_CASES = [dict(ceil_mode=1), dict(count_include_pad=None), dict(divisor_override=1.5),
                      dict(kernel_size=2.0), dict(stride=1.5), dict(padding=(0.5, 0)), dict(kernel_size="2"),
                      dict(kernel_size=(2, 2.5))]


@pytest.mark.parametrize("layer,kw", [(n, c) for n in ("AvgPool1d", "AvgPool2d") for c in _MODULE_TYPE_CASES
                                       if n == "AvgPool2d" or "divisor_override" not in c],  # (2-d only)
                         ids=str)
def test_avg_pool_layers_word_a_bad_argument_as_torchs_layers(layer, kw, rng):
    """torch's AvgPool layers pass their arguments to its parser's avg_pool* by position, which
    then names the position of a bad one ("argument 'ceil_mode' (position 5) must be bool");
    ours say the same, type and words (the flags and divisor_override lacked the position, an
    audit: our functional forms word them as the usual keyword call)."""
    k = {"kernel_size": 2, **kw}
    x = torch.from_numpy(rng.standard_normal((1, 2, 8, 8) if layer.endswith("2d") else (1, 2, 8)))
    with pytest.raises(TypeError) as theirs:
        getattr(torch.nn, layer)(**k)(x)
    with pytest.raises(gpu_nn.KernelInputError) as ours:
        getattr(gpu_nn.nn, layer)(**k)(x)
    assert isinstance(ours.value, TypeError) and str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name,args,kwargs", _TYPE_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in _TYPE_CASES])
def test_non_int_arguments_raise_torchs_type_error(name, args, kwargs, rng):
    """A float, string or bool where torch wants ints is torch's TypeError, never coerced."""
    x = torch.from_numpy(rng.standard_normal((1, 2, 8, 8) if name.endswith("2d") else (1, 2, 8)))
    with pytest.raises(TypeError) as theirs:
        getattr(torch.nn.functional, name)(x, *args, **kwargs)
    with pytest.raises(gpu_nn.KernelInputError) as ours:
        getattr(F, name)(x, *args, **kwargs)
    assert isinstance(ours.value, TypeError)
    assert str(theirs.value) in str(ours.value)


# --- the reference's two paths: small inputs gather through cached window tables, large ones
# loop over taps; both must give the same values, indices and gradients ----------------------

def test_reference_small_gather_path_equals_tap_loop(monkeypatch, rng):
    x = np.round(rng.standard_normal((2, 3, 11, 13)) * 2) / 2  # ties in most windows
    x[0, 1, :4, :5] = -np.inf  # windows of -inf only: their first in-input position (loop path)
    xs = [x, x[0, 0, :7, :5].copy(), rng.standard_normal((1, 2, 9, 7)).astype(np.float32)]
    got = {}
    fast_limit = R.SMALL
    for small in (fast_limit, 0):
        monkeypatch.setattr(R, "SMALL", small)
        runs = []
        for a in xs:
            for k, s, p, d, ceil in MAX2D:
                k, s, p, d = R._params2d(k, s, p, d)
                if R.out_size(a.shape[-2], k[0], s[0], p[0], d[0], ceil) < 1 or R.out_size(a.shape[-1], k[1], s[1], p[1], d[1], ceil) < 1:
                    continue
                vals, idx = R._max2d(a, k, s, p, d, ceil)
                runs.append((vals, idx, R._max_backward2d(np.cos(vals), idx, a.shape)))
            for k, s, p, ceil, cip, dov in AVG2D:
                k, s, p, _ = R._params2d(k, s, p, 1)
                if R.out_size(a.shape[-2], k[0], s[0], p[0], 1, ceil) < 1 or R.out_size(a.shape[-1], k[1], s[1], p[1], 1, ceil) < 1:
                    continue
                y = R._avg2d(np.where(np.isinf(a), 0.5, a), k, s, p, ceil, cip, dov)
                runs.append((y, R._avg_backward2d(np.sin(y), a.shape, k, s, p, ceil, cip, dov)))
                # a NaN and infs (the -inf block, a +inf): only the windows that hold them turn
                # non-finite (the window product must not spread them through 0 * inf), and a
                # non-finite output gradient reaches only its own window's inputs
                an = a.copy()
                an.flat[3] = np.nan
                an.flat[-2] = np.inf
                y = R._avg2d(an, k, s, p, ceil, cip, dov)
                gy = np.ones_like(y)
                gy.flat[0] = np.inf
                runs.append((y, R._avg_backward2d(gy, a.shape, k, s, p, ceil, cip, dov)))
        got[small] = runs
    assert len(got[0]) == len(got[fast_limit]) > 60
    for fast, loop in zip(got[fast_limit], got[0]):
        for f, l in zip(fast, loop):
            assert f.dtype == l.dtype and f.shape == l.shape and f.flags.c_contiguous  # ops return contiguous outputs
            if f.dtype == np.int64:
                np.testing.assert_array_equal(f, l)
            else:
                np.testing.assert_allclose(f, l, rtol=2e-6 if f.dtype == np.float32 else 1e-14, atol=1e-6 if f.dtype == np.float32 else 1e-14)


def test_memoised_argument_checks_still_refuse_what_torch_refuses():
    """The public functions remember argument sets that passed (per input shape): a shape that
    fails with the same arguments, or a failing argument after a passing one, still raises."""
    x = torch.randn(1, 2, 5, 5)
    for _ in range(2):
        F.max_pool2d(x, 3, 2, 0)
        with pytest.raises(gpu_nn.KernelInputError, match="Output size is too small"):
            F.max_pool2d(torch.randn(1, 2, 1, 1), 3, 2, 0)
        with pytest.raises(gpu_nn.KernelInputError, match="pad should be at most half"):
            F.max_pool2d(x, 3, 2, 2)
        with pytest.raises(gpu_nn.KernelInputError, match="Invalid computed output size"):
            F.max_pool1d(torch.randn(1, 2, 1), 3, 2, 0)
        F.max_pool1d(torch.randn(1, 2, 7), 3, 2, 0)
        F.avg_pool2d(x, 3, 2, 0)
        with pytest.raises(gpu_nn.KernelInputError, match="Output size is too small"):
            F.avg_pool2d(torch.randn(1, 2, 1, 1), 3, 2, 0)


@pytest.mark.parametrize("backend,device", backend_params())
def test_remembered_launcher_checks_still_refuse_direct_calls(backend, device, rng):
    """The custom ops' own checks (they may be called directly) are remembered per (shapes,
    dtypes, arguments) that passed: after a good call, a call that differs only in what a check
    reads -- the dtype, a geometry, the indices' dtype, a gradient's shape -- still raises."""
    ops = torch.ops.gpu_nn
    x = randn(rng, 2, 3, 9, 7, dtype=torch.float32).to(device)
    with gpu_nn.backend(backend):
        for _ in range(2):
            y, idx = ops.max_pool.default(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False)
            ops.max_pool_backward.default(torch.ones_like(y), idx, [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], [1, 1])
            a = ops.avg_pool.default(x, [3, 3], [2, 2], [1, 1], False, True, None)
            ops.avg_pool_backward.default(torch.ones_like(a), [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], False, True, None)
            with pytest.raises(gpu_nn.KernelInputError, match="floating-point"):
                ops.max_pool.default(x.to(torch.int32), [3, 3], [2, 2], [1, 1], [1, 1], False, False)
            with pytest.raises(gpu_nn.KernelInputError, match="invalid pooling parameters"):
                ops.max_pool.default(x, [3, 3], [2, 2], [2, 1], [1, 1], False, False)
            with pytest.raises(gpu_nn.KernelInputError, match="Output size is too small"):
                ops.max_pool.default(x[..., :1, :], [3, 3], [2, 2], [0, 0], [1, 1], False, False)
            with pytest.raises(gpu_nn.KernelInputError, match="expected int64 indices"):
                ops.max_pool_backward.default(torch.ones_like(y), idx.int(), [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], [1, 1])
            with pytest.raises(gpu_nn.KernelInputError, match="must be the same 4D shape"):
                ops.max_pool_backward.default(torch.ones_like(y)[:, :2], idx, [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], [1, 1])
            # an input_size of other planes: the kernels gather each plane's gradient from the
            # same plane of grad_output (past its end, a helper's audit found under ASan)
            with pytest.raises(gpu_nn.KernelInputError, match="batch and channels of input_size"):
                ops.max_pool_backward.default(torch.ones_like(y)[:1, :2], idx[:1, :2], [2, 3, 9, 7], [3, 3], [2, 2], [1, 1],
                                              [1, 1])
            # the forward's geometry (a stride of 0 divided by zero in the kernels), and a
            # grad_output that is the output of that geometry, with or without ceil_mode
            for k, st, pd, dl in (([3, 3], [0, 0], [1, 1], [1, 1]), ([3, 3], [2, 2], [-1, -1], [1, 1]),
                                  ([3, 3], [2, 2], [1, 1], [0, 0]), ([3], [2], [1], [1])):
                with pytest.raises(gpu_nn.KernelInputError, match="pooling parameters|2 entries each"):
                    ops.max_pool_backward.default(torch.ones_like(y), idx, [2, 3, 9, 7], k, st, pd, dl)
            with pytest.raises(gpu_nn.KernelInputError, match="is not the output of"):
                ops.max_pool_backward.default(torch.ones_like(y), idx, [2, 3, 30, 30], [3, 3], [2, 2], [1, 1], [1, 1])
            with pytest.raises(gpu_nn.KernelInputError, match="divisor must be not zero"):
                ops.avg_pool_backward.default(torch.ones_like(a), [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], False, True, 0)
            for st, pd in (([0, 0], [1, 1]), ([2, 2], [2, 2])):
                with pytest.raises(gpu_nn.KernelInputError, match="invalid pooling parameters"):
                    ops.avg_pool_backward.default(torch.ones_like(a), [2, 3, 9, 7], [3, 3], st, pd, False, True, None)
            with pytest.raises(gpu_nn.KernelInputError, match="divisor must be not zero"):
                ops.avg_pool.default(x, [3, 3], [2, 2], [1, 1], False, True, 0)
            with pytest.raises(gpu_nn.KernelInputError, match="!= output shape"):
                ops.avg_pool_backward.default(torch.ones_like(a)[..., :-1], [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], False, True,
                                              None)


@pytest.mark.parametrize("backend,device", backend_params(("triton", "cupy")))
@pytest.mark.parametrize("shape", [(2, 3, 17), (3, 19), (0, 2, 12)], ids=str)
@pytest.mark.parametrize("layout", ["contig", "noncontig"])
def test_pool1d_view_of_every_layout_matches_reference(backend, device, shape, layout, rng):
    """1d pooling runs on one [N, C, 1, L] view of a contiguous input (strided ones take the
    unsqueeze chain): values, indices, gradients and result strides as the reference's, batched,
    unbatched and zero-size, called twice (the second through the remembered checks)."""
    x = _layouts(randn(rng, *shape, dtype=torch.float32), layout)
    for fn, args, kw in ((F.max_pool1d, (3, 2, 1), dict(return_indices=True)), (F.min_pool1d, (4, 3, 2, 2, True), {}),
                         (F.avg_pool1d, (3, 2, 1, True, False), {})):
        with gpu_nn.backend("reference"):
            want, gwant, g = _fwd_bwd(fn, x, args, **kw)
        for _ in range(2):
            with gpu_nn.backend(backend):
                got, ggot, _ = _fwd_bwd(fn, x.to(device), args, g.to(device), **kw)
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
                torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ggot.cpu(), gwant, rtol=1e-6, atol=1e-6)


class _DropGrad(torch.autograd.Function):
    """Identity forward; an undefined gradient backward (as a branch that contributes nothing)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return None


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("fn", ["max_pool2d", "min_pool2d", "max_pool1d"])
def test_max_pool_backward_takes_an_undefined_gradient(backend, device, fn, rng):
    """The max / min pool autograd setup does not materialise gradients (no zero fill for the
    unused indices' gradient): an undefined gradient of the output reaches the backward, which
    then gives an undefined one for the input (no kernel, no error); defined ones still flow."""
    x = randn(rng, 2, 3, 9, 8, dtype=torch.float32).to(device)
    x = (x if fn != "max_pool1d" else x[:, :, 0]).requires_grad_()
    with gpu_nn.backend(backend):
        y, idx = getattr(F, fn)(x, 3, 2, 1, return_indices=True)
        (dx,) = torch.autograd.grad(_DropGrad.apply(y).sum(), [x], allow_unused=True, retain_graph=True)
        assert dx is None
        (dx,) = torch.autograd.grad(_DropGrad.apply(y).sum() + (2 * y).sum(), [x])
    want = torch.zeros_like(x).reshape(*x.shape[:2], -1)
    want.scatter_add_(2, idx.reshape(*x.shape[:2], -1), torch.full(idx.shape, 2.0, device=device).reshape(*x.shape[:2], -1))
    assert torch.equal(dx, want.reshape(x.shape))


# --- the tiled Triton forms (one program per 2-D tile of one plane) -------------------------


def _forcing(monkeypatch, form):
    """Every Triton pooling launch takes configuration ``form`` (flat or tiled), as a measuring
    chooser that picked it would; returns (ops asked, kernels launched)."""
    from gpu_nn.kernels.triton import pool as kp
    from gpu_nn.ops import pool as P

    asked, launched = [], []

    def choose(op, key, cands, run, default, **_):
        assert cands[0] == default and default[0] == kp.FLAT, "the heuristic (flat) is the first candidate"
        asked.append(op)
        return next((c for c in cands if c[0] == form), cands[0])  # not offered here: the heuristic

    launch = kp.launch_kernel

    def spy(kernel, grid, *args, **kwargs):
        launched.append(kernel.__name__)
        return launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(P, "_chooser", lambda device: choose)
    monkeypatch.setattr(kp, "launch_kernel", spy)
    return asked, launched


def _tiled_ran(asked, launched, fn):
    kind = "avg" if fn.__name__.startswith("avg") else "max"
    assert asked == [f"{kind}_pool_fwd", f"{kind}_pool_bwd"] * (len(asked) // 2) and asked, asked
    assert set(launched) == {f"_{kind}_pool_fwd_tile_kernel", f"_{kind}_pool_bwd_tile_kernel"}, launched


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_measured_choices_follow_the_output_not_only_the_input(backend, device, tmp_path, monkeypatch):
    """The measuring chooser (gpu_nn._tuning.choose on a fake clock where the tiles win) keeps a
    choice per problem: one channels_last input pooled with ceil_mode off (a 1x1 output, which
    is contiguous too: the plane tile is offered) and on (2x2 channels_last: the channels_last
    tile). Keyed by the input alone, the second call was served the plane tile, which wrote NCHW
    order into the NHWC output (max error ~4 against torch)."""
    from gpu_nn import _tuning
    from gpu_nn.kernels.triton import pool as kp
    from gpu_nn.ops import pool as P

    monkeypatch.setenv(_tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    _tuning.clear()
    timed = []

    def timer(fn):
        fn()
        return 2.0 if timed[-1][0] == kp.FLAT else 1.0

    def chooser(dev):
        return lambda op, key, cands, run, default, **_: _tuning.choose(
            op, key, cands, lambda c: (timed.append(c), run(c)), default, dev, timer=timer, force=True)

    monkeypatch.setattr(P, "_chooser", chooser)
    x = torch.randn(2, 8, 5, 5).to(device=device, memory_format=torch.channels_last)
    try:
        for f, tf in ((F.max_pool2d, TF.max_pool2d), (F.avg_pool2d, TF.avg_pool2d)):
            for ceil in (False, True):
                timed.clear()
                with gpu_nn.backend(backend):
                    got = f(x, 4, 4, ceil_mode=ceil)
                assert timed and timed[-1][0] == (kp.CLTILE if ceil else kp.TILE), (f.__name__, ceil, timed)
                assert torch.equal(got.cpu(), tf(x.cpu(), 4, 4, ceil_mode=ceil)), (f.__name__, ceil)
            timed.clear()
            with gpu_nn.backend(backend):  # each problem's choice kept apart: nothing measured again
                f(x, 4, 4, ceil_mode=False), f(x, 4, 4, ceil_mode=True)
            assert timed == [], f.__name__
    finally:
        _tuning.clear()


def _forced_dtypes(backend, device, index):
    """What a test that forces one kernel form runs in: on a GPU every dtype of gpu_dtypes_for;
    under the interpreter float32 and one 16-bit type, float16 where ``index`` (the case's place
    in its list) is even and bfloat16 where it is odd, so each forced form meets both 16-bit types
    across its cases at two dtypes' cost (the flat kernels run all three in every case)."""
    full = gpu_dtypes_for(backend, device)
    if device != "cpu":
        return full
    half = torch.float16 if index % 2 == 0 else torch.bfloat16
    return tuple(d for d in full if d in (torch.float32, half))


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[0].__name__}{c[1]}{c[2]}")
def test_tiled_form_matches_reference(backend, device, case, rng, monkeypatch):
    """The tiled forward and backward kernels (every kernel-case geometry: strides, padding,
    dilation, ceil mode, divisors, min pooling, 1d) against the reference. Not offered for
    channels_last tensors (the flat kernels read those channels-fastest; a forward there is
    offered the channels_last tile instead): there the flat kernels run."""
    asked, launched = _forcing(monkeypatch, "tile")
    dtypes = _forced_dtypes(backend, device, KERNEL_CASES.index(case))
    test_backend_matches_reference(backend, device, case, "contig", rng, dtypes)
    _tiled_ran(asked, launched, case[0])
    if len(case[2]) == 4:
        asked.clear()
        launched.clear()
        test_backend_matches_reference(backend, device, case, "channels_last", rng, dtypes)
        assert launched and not any("tile" in k or "_cl_" in k for k in launched), (asked, launched)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if len(c[2]) == 4], ids=lambda c: f"{c[0].__name__}{c[1]}{c[2]}")
def test_channels_last_tiles_match_reference(backend, device, case, rng, monkeypatch):
    """The channels_last tiles (one output row, forward, or input row, backward, x positions x
    channels per program) in every 4-D kernel-case geometry against the reference, values,
    indices and gradients; offered only for channels_last tensors."""
    asked, launched = _forcing(monkeypatch, "cltile")
    dtypes = _forced_dtypes(backend, device, KERNEL_CASES.index(case))
    test_backend_matches_reference(backend, device, case, "channels_last", rng, dtypes)
    kind = "avg" if case[0].__name__.startswith("avg") else "max"
    assert set(launched) == {f"_{kind}_pool_fwd_cl_kernel", f"_{kind}_pool_bwd_cl_kernel"}, launched
    assert f"{kind}_pool_fwd" in asked and f"{kind}_pool_bwd" in asked
    launched.clear()
    test_backend_matches_reference(backend, device, case, "contig", rng, dtypes)
    assert not any("_cl_" in k for k in launched), launched


_SPLIT_CASES = [(F.max_pool2d, (3, 2, 1), (1, 3, 7, 5)),
                (F.min_pool2d, ((2, 3), (1, 2), (1, 1), (2, 1), True), (1, 3, 6, 7)),
                (F.avg_pool2d, ((3, 2), 1, (1, 0), False, True, 5), (1, 3, 5, 4))]


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("form", ["tile", "cltile"])
@pytest.mark.parametrize("case", _SPLIT_CASES, ids=lambda c: f"{c[0].__name__}{c[1]}{c[2]}")
def test_tiled_forms_split_planes_rows_and_channels(backend, device, form, case, rng, monkeypatch):
    """The tiled forms where a plane (NCHW tiles) or a row's positions and the channels
    (channels_last tiles) take several tiles each: 2 x 2 tiles, 2 positions x 2 channels (3
    channels: a partial channel tile), as large planes and C > 64 split them on a GPU. The
    interpreter's one large tile per plane or row hides the tile decomposition (the program id
    split by multiply-high divisors of the tiles per plane and per tile row)."""
    from gpu_nn.kernels.triton import pool as kp

    monkeypatch.setattr(kp, "INTERP_BLOCK", 4)
    monkeypatch.setattr(kp, "TILE_MAX_W", 2)
    monkeypatch.setattr(kp, "CL_TILE_MAX_C", 2)
    kp.forms.cache_clear()
    try:
        assert kp.tile_config(7, 5, True)[1:3] == (2, 2) and kp.cl_tile_config(5, 3, True)[1:3] == (2, 2)
        asked, launched = _forcing(monkeypatch, form)
        dtypes = _forced_dtypes(backend, device, _SPLIT_CASES.index(case) + (form == "cltile"))
        test_backend_matches_reference(backend, device, case, "contig" if form == "tile" else "channels_last", rng,
                                       dtypes)
        kind = "avg" if case[0].__name__.startswith("avg") else "max"
        sfx = "tile" if form == "tile" else "cl"
        assert set(launched) == {f"_{kind}_pool_fwd_{sfx}_kernel", f"_{kind}_pool_bwd_{sfx}_kernel"}, launched
    finally:
        kp.forms.cache_clear()


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("case", MAXMIN_CASES, ids=lambda c: f"{c[0].__name__}{c[1]}{c[2]}")
@pytest.mark.parametrize("nans", [0, 7], ids=["ties", "ties+nans"])
def test_tiled_form_ties_and_nans_like_torch(backend, device, case, nans, rng, monkeypatch):
    """Ties keep the first position, the last NaN of a window wins, gradients exactly torch's,
    in the tiled kernels too."""
    asked, launched = _forcing(monkeypatch, "tile")
    dtypes = _forced_dtypes(backend, device, MAXMIN_CASES.index(case) + bool(nans))
    test_backend_ties_and_nans_like_torch(backend, device, case, nans, rng, dtypes)
    _tiled_ran(asked, launched, case[0])


_DEFAULT_GEOS = [((3, 3), (2, 2), (1, 1), (1, 1), (11, 13)), ((2, 3), (1, 2), (1, 1), (2, 1), (9, 11)),
                 ((3, 3), (3, 3), (0, 0), (3, 3), (11, 13)),
                 ((2, 1), (1, 1), (1, 0), (5, 1), (4, 6))]  # the last: a window of padding only


# (backend, device, form): the Triton forms (flat, plane tile, channels_last tile) forced, and
# CUDA C's one kernel (its availability marks kept from backend_params)
_DEFAULT_FORMS = [pytest.param(*p.values, form, marks=p.marks, id=f"{p.id}-{form}")
                  for p in backend_params(("triton", "cupy"))
                  for form in (("flat", "tile", "cltile") if p.values[0] == "triton" else ("flat",))]


@pytest.mark.parametrize("backend,device,form", _DEFAULT_FORMS)
@pytest.mark.parametrize("minimum", [False, True], ids=["max", "min"])
def test_default_positions_like_the_reference(backend, device, form, minimum, rng, monkeypatch):
    """The default position of a max / min window, torch's first in-input tap (taken with the
    value -inf), which shows only where no tap is greater: inputs of -inf (+inf for min) with a
    few finite values, values and indices against the reference, including a window of padding
    only (index -1: the reference's choice where torch's points outside the input); Triton's
    flat and tiled kernels, CUDA C's (the form parameter is Triton's)."""
    if backend == "triton":
        _forcing(monkeypatch, form)
    fn = F.min_pool2d if minimum else F.max_pool2d
    for k, s, p, d, (H, W) in _DEFAULT_GEOS:
        x = torch.full((2, 3, H, W), float("inf") if minimum else float("-inf"))
        x.view(-1)[torch.from_numpy(rng.choice(x.numel(), 4, replace=False))] = torch.from_numpy(
            rng.standard_normal(4)).float()
        if form == "cltile":  # the channels_last tile runs on channels_last inputs only
            x = x.contiguous(memory_format=torch.channels_last)
        with gpu_nn.backend("reference"):
            yr, ir = fn(x, k, s, p, d, return_indices=True)
        with gpu_nn.backend(backend):
            y, i = fn(x.to(device), k, s, p, d, return_indices=True)
        torch.testing.assert_close(y.cpu(), yr, rtol=0, atol=0)
        assert torch.equal(i.cpu(), ir), (k, s, p, d)
        assert (ir == -1).any() == (d == (5, 1))


def test_tiled_form_configuration():
    """Tile shapes per plane size, the windows the backward visits per dimension, and the
    candidate lists (flat first; no tiled form where a tensor spans 2^31 elements)."""
    from gpu_nn.kernels.triton import pool as kp

    assert kp.tile_config(56, 56, False) == ("tile", 8, 64, 4)
    assert kp.tile_config(112, 112, False) == ("tile", 4, 128, 4)
    assert kp.tile_config(7, 7, False) == ("tile", 8, 8, 1)
    assert kp.tile_config(1, 101, False) == ("tile", 1, 128, 1)
    assert kp.tile_config(1, 1, False) == ("tile", 1, 1, 1)
    assert kp.forms(56, 56, True, False) == (kp.flat_config(False),)
    assert kp.forms(56, 56, False, False) == (kp.flat_config(False), kp.tile_config(56, 56, False))
    # channels_last launches (forward over output rows, backward over input rows): the channels_last tile
    assert kp.cl_tile_config(112, 64, False) == ("cltile", 8, 64, 4)
    assert kp.cl_tile_config(7, 3, False) == ("cltile", 8, 4, 1)
    assert kp.forms(112, 112, False, False, 64) == (kp.flat_config(False), kp.cl_tile_config(112, 64, False))
    # windows of size k, stride s, dilation d over one position: 3x3/2 -> 2, 3x3/1 -> 3, 2/2 -> 1
    assert [kp.windows_covering(*a) for a in ((3, 2, 1), (3, 1, 1), (2, 2, 1), (3, 3, 3), (7, 3, 1), (1, 1, 1))] == [2, 3, 1, 3, 3, 1]
    # brute force: the largest number of windows covering one position equals windows_covering
    for k in range(1, 6):
        for s in range(1, 5):
            for d in range(1, 4):
                span = (k - 1) * d + 1
                most = max(sum(1 for o in range(0, 40) if o * s <= pos < o * s + span) for pos in range(20, 40))
                assert most == kp.windows_covering(k, s, d), (k, s, d)


# --- CUDA C: 32-bit index arithmetic where every tensor allows it ---------------------------


def test_cuda_index_width_follows_the_tensor_spans(monkeypatch):
    """gpu_nn.ops.pool._narrow: the CuPy kernels take 32-bit index arithmetic (POOL_NARROW=1)
    only where every tensor of the launch spans fewer than _NARROW_SPAN elements, strided views
    counted by their span, not their element count."""
    from gpu_nn.ops import pool as P

    assert P._NARROW_SPAN == 2**30
    monkeypatch.setattr(P, "_NARROW_SPAN", 100)
    assert P._narrow(torch.empty(99), torch.empty(3, 33))
    assert not P._narrow(torch.empty(99), torch.empty(100))
    big = torch.empty(4, 60)
    assert P._narrow(big[:, :10]) is False  # 40 elements spanning 190
    assert P._narrow(big[:1, :10])  # one row: 10 elements, contiguous
    assert P._narrow(torch.empty(0, 500))


@pytest.mark.parametrize("backend,device", backend_params(("cupy",)))
@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if len(c[2]) == 4], ids=lambda c: f"{c[0].__name__}{c[1]}{c[2]}")
def test_cupy_int64_kernels_match_reference(backend, device, case, rng, monkeypatch):
    """The CuPy kernels' int64 form (POOL_NARROW=0: tensors of 2^30 elements or more), forced on
    small inputs, against the reference, one dtype per case (:func:`_wide_form_dtypes`); the
    32-bit form runs in every other CuPy test."""
    from gpu_nn.ops import pool as P

    monkeypatch.setattr(P, "_NARROW_SPAN", 0)
    test_backend_matches_reference(backend, device, case, "contig", rng, _wide_form_dtypes(backend, device, case, "contig"))


def _wide_form_dtypes(backend, device, case, layout) -> tuple:
    """The one dtype a case of the wide-index tests runs in: the backend's dtypes dealt out over
    the cases in turn (case-layout i takes dtype i mod n). With three dtypes, every dtype meets
    the wide form in 2-d max and average pooling (Triton: in both layouts); 2-d min pooling runs
    in two dtypes, each 1-d case in one. The wide form differs from the 32-bit one in its index
    arithmetic alone, which no dtype enters; every dtype runs every case in the 32-bit form
    (test_backend_matches_reference). A compiled variant per case and dtype was the H200 suite's
    second-largest compile bill (variant_census: 126 variants no other test compiles, about 127 s
    of one core, all three dtypes)."""
    dts = tuple(gpu_dtypes_for(backend, device))
    i = _CASE_LAYOUTS.index((case, layout)) if (case, layout) in _CASE_LAYOUTS else KERNEL_CASES.index(case)
    return (dts[i % len(dts)],)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("case,layout", _CASE_LAYOUTS, ids=_case_layout_id)
def test_triton_int64_kernels_match_reference(backend, device, case, layout, rng, monkeypatch):
    """The Triton flat kernels' int64 form (WIDE: tensors spanning 2^31 elements or more, where
    the offsets are divided as they are, not by the multiply-high divisors of the 32-bit form),
    forced on small inputs, against the reference in both layouts, one dtype per case
    (:func:`_wide_form_dtypes`)."""
    from gpu_nn.kernels.triton import pool as kp

    monkeypatch.setattr(kp, "_wide", lambda *tensors: True)
    test_backend_matches_reference(backend, device, case, layout, rng, _wide_form_dtypes(backend, device, case, layout))


@pytest.mark.parametrize("backend,device", backend_params(("cupy",)))
@pytest.mark.parametrize("case,layout", _CASE_LAYOUTS, ids=_case_layout_id)
def test_cupy_runtime_window_kernels_match_reference(backend, device, case, layout, rng, monkeypatch):
    """The CuPy kernels whose window is a run-time argument (pool.cu without POOL_FIXED: windows
    of more than _FIXED_TAPS taps), forced on every window, against the reference; every other
    CuPy test runs windows this small on modules compiled for their window."""
    from gpu_nn.ops import pool as P

    monkeypatch.setattr(P, "_FIXED_TAPS", 0)
    test_backend_matches_reference(backend, device, case, layout, rng)


def _stub_cupy_launches(monkeypatch, module) -> list:
    """The CuPy pooling launcher with its module loading and kernel launches stubbed (a CPU test):
    ``module(narrow, cl, window, unit_w)`` stands for the module a launch loads; returns the list
    each launch appends ``(kernel, module, grid, block, args)`` to."""
    from gpu_nn.ops import pool as P

    launches = []
    monkeypatch.setattr(P, "_cuda_module", lambda dtype, device, narrow, cl=False, window=None, unit_w=False:
                        module(narrow, cl, window, unit_w))
    monkeypatch.setattr(P, "cuda_kernels", lambda: type("K", (), {"launch": staticmethod(
        lambda mod, kernel, grid, block, args, device=0: launches.append((kernel, mod, grid, block, args)))}))
    return launches


def test_cupy_pool_modules_are_compiled_for_small_windows_only(monkeypatch):
    """Which module a CuPy pooling launch loads: one compiled for its window (POOL_FIXED with the
    window's KH, KW, SH, SW, DH, DW and min flag; avg pooling with unit dilation and no min flag)
    up to _FIXED_TAPS taps, the run-time window kernels beyond; the 32-bit kernels get the
    multiply-high divisors of the sizes they unravel by (C, OH, OW forward; C, H, W backward),
    the int64 ones zeros. Launches stubbed: runs on the CPU."""
    from gpu_nn.kernels import fastdiv
    from gpu_nn.ops import pool as P

    seen = _stub_cupy_launches(monkeypatch, lambda narrow, cl, window, unit_w: (narrow, cl, window, unit_w))
    x = torch.randn(2, 5, 12, 11)
    out = torch.empty(2, 5, 6, 5)
    P._cupy_max_forward(x, out, None, (3, 2), (2, 2), (1, 0), (1, 2), True)
    P._cupy_avg_forward(x.contiguous(memory_format=torch.channels_last), out, (3, 3), (2, 2), (1, 1), True, 0, cl=True)
    P._cupy_max_backward(out, torch.zeros(2, 5, 6, 5, dtype=torch.int64), x, (9, 8), (1, 1), (4, 4), (1, 1))
    P._cupy_avg_backward(out, x, (3, 3), (2, 2), (1, 1), False, 0, cl=True)
    P._cupy_max_forward(x[..., ::2], out[..., :3], None, (2, 2), (2, 2), (0, 0), (1, 1), False)
    P._cupy_max_forward(x[..., :1], out[..., :1], None, (2, 1), (2, 1), (0, 0), (1, 1), False)
    assert [(k, m) for k, m, _, _, _ in seen] == [
        ("pool_max_fwd", (True, False, (3, 2, 2, 2, 1, 2, 1), True)),
        ("pool_avg_fwd", (True, True, (3, 3, 2, 2, 1, 1, 0), False)),  # columns C apart
        ("pool_max_bwd", (True, False, None, True)),  # 72 taps
        ("pool_avg_bwd", (True, True, (3, 3, 2, 2, 1, 1, 0), False)),
        ("pool_max_fwd", (True, False, (2, 2, 2, 2, 1, 1, 0), False)),  # every other column
        ("pool_max_fwd", (True, False, (2, 1, 2, 1, 1, 1, 0), True)),  # one column
    ]
    sizes = [(5, 6, 5), (5, 6, 5), (5, 12, 11), (5, 12, 11), (5, 6, 3), (5, 6, 1)]
    for (_, _, _, _, args), dims in zip(seen, sizes):
        assert all(type(a) is np.uint32 for a in args[-6:])
        assert [int(a) for a in args[-6:]] == [v for d in dims for v in fastdiv.magic(d)]
    seen.clear()
    monkeypatch.setattr(P, "_NARROW_SPAN", 0)
    P._cupy_max_forward(x, out, None, (3, 2), (2, 2), (1, 0), (1, 2), False)
    (_, mod, _, _, args), = seen
    assert mod == (False, False, (3, 2, 2, 2, 1, 2, 0), True) and [int(a) for a in args[-6:]] == [0] * 6


def test_cupy_pool_grid_stops_at_what_the_gpu_holds(monkeypatch):
    """The CuPy pooling launches: one 256-thread block per 256 elements up to the blocks the GPU
    holds at once (the occupancy API's answer for the kernel, asked once per module and kernel),
    beyond that the kernels' grid-stride loops (each thread's set-up paid once for several
    elements, no second wave). Launches and the occupancy stubbed: runs on the CPU."""
    from gpu_nn.ops import pool as P

    asked = []
    launches = _stub_cupy_launches(monkeypatch, lambda narrow, cl, window, unit_w: narrow)
    monkeypatch.setattr(P, "_resident_blocks", lambda mod, kernel, index: asked.append((mod, kernel)) or 1056 + mod)
    monkeypatch.setattr(P, "_GRID_CAPS", {})
    dev = torch.device("cuda", 0)
    args = (torch.empty(1),)
    for n in (1, 256, 257, 1056 * 256, 1056 * 256 + 1, 10**8):
        P._cuda_launch("pool_max_fwd", n, args, dev, False, False)
    P._cuda_launch("pool_max_bwd", 10**8, args, dev, False, False)
    P._cuda_launch("pool_max_bwd", 10**8, args, dev, True, False)
    grids = [(g, b) for _, _, g, b, _ in launches]
    assert grids == [((b,), (256,)) for b in (1, 1, 2, 1056, 1056, 1056, 1056, 1057)]
    assert asked == [(False, "pool_max_fwd"), (False, "pool_max_bwd"), (True, "pool_max_bwd")]
    assert P._grid_cap(None, "pool_max_fwd", torch.device("cpu")) == 65535 * 32


# --- channels_last: torch's layouts ----------------------------------------------------------

_CL_CASES = [c for c in KERNEL_CASES if len(c[2]) == 4] + [
    (F.max_pool2d, ((1, 2),), (2, 3, 1, 6)), (F.avg_pool2d, (3, 1, 1), (1, 4, 3, 1)),
    (F.max_pool2d, (2,), (2, 1, 4, 6)), (F.avg_pool2d, (1,), (2, 5, 1, 1)),
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", _CL_CASES, ids=lambda c: f"{c[0].__name__}{c[1]}{c[2]}")
def test_channels_last_layouts_are_torchs(backend, device, case, rng):
    """A channels_last input gives channels_last values, indices and input gradient, as torch's
    pooling does (and a contiguous one contiguous ones); values, indices and gradients equal
    torch's. Extra cases: a height or width of 1, and shapes whose channels_last and contiguous
    layouts coincide (C = 1; H = W = 1), which torch treats as contiguous."""
    fn, args, shape = case
    theirs = {"max_pool2d": TF.max_pool2d, "avg_pool2d": TF.avg_pool2d}.get(fn.__name__)
    sign = 1.0
    if fn.__name__ == "min_pool2d":
        theirs, sign = TF.max_pool2d, -1.0
    is_max = theirs is TF.max_pool2d
    kw = {"return_indices": True} if is_max else {}
    dtype = gpu_dtypes_for(backend, device)[0]
    for layout in ("channels_last", "contig"):
        x = _layouts(randn(rng, *shape).to(dtype), layout).to(device).requires_grad_()
        with gpu_nn.backend(backend):
            out = fn(x, *args, **kw)
        xt = (sign * x.detach().cpu().double()).requires_grad_()
        want = theirs(xt, *args, **kw)
        y, yt = (out[0], want[0]) if is_max else (out, want)
        assert y.stride() == yt.stride(), (layout, y.stride(), yt.stride())
        assert_close(y, sign * yt, dtype, what=f"{fn.__name__} {layout} values")
        if is_max:
            assert out[1].stride() == want[1].stride() and torch.equal(out[1].cpu(), want[1]), layout
        g = randn(rng, *y.shape).to(device=device, dtype=dtype)
        with gpu_nn.backend(backend):
            (dx,) = torch.autograd.grad(y, x, g)
        (dxt,) = torch.autograd.grad(yt, xt, g.cpu().double())  # min: d(-M(-x))/dx = M's Jacobian at -x
        assert dx.stride() == dxt.stride(), (layout, dx.stride(), dxt.stride())
        assert_close(dx, dxt, dtype, k=9, what=f"{fn.__name__} {layout} gradient")


def test_opcheck_channels_last(rng):
    """The fake kernels promise the real ones' layouts: opcheck on channels_last inputs, and on
    the backward ops with channels_last=True."""
    x = randn(rng, 2, 3, 9, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    ops = torch.ops.gpu_nn
    torch.library.opcheck(ops.max_pool.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], False, False))
    torch.library.opcheck(ops.avg_pool.default, (x, [3, 3], [2, 2], [1, 1], True, False, None))
    y, idx = TF.max_pool2d(x.detach(), 3, 2, 1, return_indices=True)
    g = randn(rng, *y.shape).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.max_pool_backward.default, (g, idx, [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], [1, 1], True))
    ga = randn(rng, 2, 3, 5, 4)
    torch.library.opcheck(ops.avg_pool_backward.default, (ga, [2, 3, 9, 7], [3, 3], [2, 2], [1, 1], True, False, None, True))


# --- values-only max pooling (no gradient wanted, no return_indices) -------------------------


def _with_forms():
    """backend_params() with the kernel form: flat for every backend, tiled too for Triton."""
    return [pytest.param(*bp.values, form, marks=bp.marks, id=f"{bp.id}-{form}")
            for bp in backend_params() for form in (("flat", "tile") if bp.values[0] == "triton" else ("flat",))]


@pytest.mark.parametrize("backend,device,form", _with_forms())
def test_values_only_max_pooling(backend, device, form, rng, monkeypatch):
    """Where nothing will read the indices (no return_indices; no grad mode or an input that
    needs no gradient) the op is asked for the values only: an empty index tensor comes back
    and the Triton kernels launch with STORE_IDX False (the CUDA C kernel gets a null index
    pointer); the values equal torch's in both layouts, flat and tiled. With a gradient wanted,
    or return_indices, the indices are made."""
    from gpu_nn.kernels.triton import pool as kp
    from gpu_nn.ops import pool as P

    asked, launched = _forcing(monkeypatch, form) if backend == "triton" else ([], [])
    stores = []
    if backend == "triton":
        spy = kp.launch_kernel

        def record(kernel, grid, *args, **kw):
            stores.append(kw.get("STORE_IDX"))
            return spy(kernel, grid, *args, **kw)
        monkeypatch.setattr(kp, "launch_kernel", record)
    seen = []
    real = P.max_pool_forward
    monkeypatch.setattr(P, "max_pool_forward", lambda *a: seen.append(a[-1]) or real(*a))
    dtype = gpu_dtypes_for(backend, device)[0]
    for layout in ("contig", "channels_last"):
        x0 = randn(rng, 2, 3, 11, 9)
        x0[0, 0, 4, 4], x0[1, 2, 6, 5], x0[0, 1, :4, :4] = float("nan"), float("inf"), float("-inf")
        x0[1, 1, :4, :4] = float("inf")  # min pooling's all -inf windows
        x = _layouts(x0.to(dtype), layout).to(device)
        with gpu_nn.backend(backend):
            y = F.max_pool2d(x, 3, 2, 1)
            z = F.min_pool2d(x, 3, 2, 1)
            with torch.no_grad():
                w = F.max_pool1d(x.detach().requires_grad_()[0], 3, 2, 1)
        assert seen == [False, False, False] and stores in ([], [False, False, False]), (seen, stores)
        assert y.stride() == TF.max_pool2d(x, 3, 2, 1).stride()
        # NaN propagates, a window of -inf (+inf for min) gives -inf (+inf), as torch's
        torch.testing.assert_close(y, TF.max_pool2d(x, 3, 2, 1), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(z, -TF.max_pool2d(-x, 3, 2, 1), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(w, TF.max_pool1d(x[0], 3, 2, 1), rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(y).any() and torch.isinf(y).any() and torch.isinf(z).any()
        seen.clear()
        stores.clear()
        with gpu_nn.backend(backend):
            _, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
            F.max_pool2d(x.detach().requires_grad_(), 3, 2, 1)
        # torch's indices from its NCHW kernel: on a GPU its channels_last kernel starts each index
        # at 0 and keeps 0 for a window with no element above -inf (x0[0, 1]'s -inf block), where its
        # CPU and NCHW CUDA kernels, and ours, give the window's first element (README; the H200 at
        # 09f2311 failed this comparison against torch's channels_last CUDA indices)
        want = TF.max_pool2d(x.contiguous(), 3, 2, 1, return_indices=True)[1]
        assert seen == [True, True] and stores in ([], [True, True]) and torch.equal(idx.cpu(), want.cpu())
        seen.clear()
        stores.clear()
    if backend == "triton" and form == "tile":
        assert "_max_pool_fwd_tile_kernel" in launched


def test_values_only_op_refuses_a_backward(rng):
    """Called directly with need_indices=False on an input that needs a gradient, the op's
    backward says why it cannot run (the public functions never do that)."""
    x = randn(rng, 1, 2, 5, 5, requires_grad=True)
    vals, idx = torch.ops.gpu_nn.max_pool(x, [2, 2], [2, 2], [0, 0], [1, 1], False, False, False)
    assert idx.shape == (0,) and idx.dtype == torch.int64
    with pytest.raises(gpu_nn.KernelInputError, match="need_indices=False"):
        vals.sum().backward()


def test_opcheck_values_only(rng):
    x = randn(rng, 2, 3, 9, 7)
    for x_ in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.gpu_nn.max_pool.default, (x_, [3, 3], [2, 2], [1, 1], [1, 1], False, False, False))


def _same_strides(a, b) -> bool:
    """Strides equal wherever the size is not 1 (a size-1 dimension's stride means nothing)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n != 1)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape", [(2, 9, 3), (1, 9, 3), (9, 3), (5, 7, 4), (2, 5, 7, 4)], ids=str)
def test_pooling_of_a_channels_fastest_input_has_torchs_layouts(backend, device, shape, rng):
    """Inputs whose channels are the fastest dimension (an (N, L, C) / (H, W, C) tensor
    permuted): layouts of values, indices and input gradient as torch's. torch's max_pool1d on a
    CPU tensor needing no gradient returns contiguous values (its own 1d kernel), the (N, L, C)
    order otherwise (with indices, a gradient wanted, on CUDA), as avg_pool1d always does; an
    unbatched input ([C, L], [C, H, W]) gives contiguous results whatever its layout. Ours the
    same (min pooling as max pooling), so that a .view() working on torch's result works on
    ours. Values and gradients equal torch's too."""
    two_d = len(shape) in (3, 4) and shape[-1] == 4
    if two_d:
        fns = ((F.max_pool2d, TF.max_pool2d, 1, {}), (F.min_pool2d, TF.max_pool2d, -1, {}),
               (F.max_pool2d, TF.max_pool2d, 1, {"return_indices": True}), (F.avg_pool2d, TF.avg_pool2d, 1, {}))
    else:
        fns = ((F.max_pool1d, TF.max_pool1d, 1, {}), (F.min_pool1d, TF.max_pool1d, -1, {}),
               (F.max_pool1d, TF.max_pool1d, 1, {"return_indices": True}), (F.avg_pool1d, TF.avg_pool1d, 1, {}))
    dtype = gpu_dtypes_for(backend, device)[0]
    for grad in (False, True):
        x = randn(rng, *shape).to(device=device, dtype=dtype)
        x = x.movedim(-1, -3 if two_d else -2).requires_grad_(grad)
        for fn, theirs, sign, kw in fns:
            with gpu_nn.backend(backend):
                got = fn(x, 3, 2, **kw)
            want = theirs(sign * x, 3, 2, **kw)
            for a, b in zip(got if kw else (got,), want if kw else (want,)):
                assert _same_strides(a, b), (fn.__name__, kw, grad, a.stride(), b.stride())
                torch.testing.assert_close(a, b if a.dtype == torch.int64 else sign * b)
            if grad:
                y, yt = (got[0], want[0]) if kw else (got, want)
                g = randn(rng, *y.shape).to(device=device, dtype=dtype)
                with gpu_nn.backend(backend):
                    (dx,) = torch.autograd.grad(y, x, g)
                (dxt,) = torch.autograd.grad(yt, x, sign * g)
                assert _same_strides(dx, dxt), (fn.__name__, kw, "gradient", dx.stride(), dxt.stride())
                torch.testing.assert_close(dx, dxt)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("dim", [1, 2])
def test_with_indices_names_return_both_as_torchs(backend, device, dim, rng):
    """F.max_pool1d_with_indices / max_pool2d_with_indices (torch.nn.functional's names): output
    and indices whatever return_indices says, torch's values, indices and gradient."""
    shape = (2, 3, 11) if dim == 1 else (2, 3, 9, 7)
    x = randn(rng, *shape).to(device)
    name = f"max_pool{dim}d_with_indices"
    got = []
    for fn in (getattr(TF, name), getattr(F, name)):
        xl = x.clone().requires_grad_()
        with gpu_nn.backend(backend):
            y, idx = fn(xl, 3, 2, 1, return_indices=False)
            (y * y).sum().backward()
        got.append((y.detach(), idx, xl.grad))
    (yt, it, gt), (yo, io, go) = got
    torch.testing.assert_close(yo, yt)
    assert torch.equal(io, it)
    torch.testing.assert_close(go, gt)


def test_max_pool1d_layout_follows_torch_under_forward_mode_and_functorch():
    """torch's max_pool1d keeps an (N, L, C)-ordered CPU input's order where it runs its
    with-indices form: a gradient wanted, a tangent at level 0 (forward-mode AD, torch.func.jvp),
    functorch's wrapped tensors; its plain 1d kernel (no gradient) returns contiguous values. Ours
    made them contiguous under forward-mode AD (a fuzz against torch)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jvp, vmap

    x = torch.randn(2, 9, 3, dtype=torch.float64).transpose(1, 2)
    v = torch.randn_like(x)
    xb = torch.randn(4, 2, 9, 3, dtype=torch.float64).transpose(2, 3)
    for name, ours, theirs in (("max", F.max_pool1d, torch.nn.functional.max_pool1d),
                               ("min", F.min_pool1d, lambda a, k: -torch.nn.functional.max_pool1d(-a, k))):
        got, want = [], []
        for fn, into in ((ours, got), (theirs, want)):
            with fwAD.dual_level():
                y = fn(fwAD.make_dual(x, v), 2)
                into += [y.stride(), fwAD.unpack_dual(y).tangent.stride()]
            out, tangent = jvp(lambda a: fn(a, 2), (x,), (v,))
            into += [out.stride(), tangent.stride(), vmap(lambda a: fn(a, 2))(xb).stride(), fn(x, 2).stride()]
        assert got == want, (name, got, want)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_channels_last_pooling_to_one_pixel_has_torchs_strides(backend, device):
    """A channels_last input pooled to 1 x 1 (a global pool): torch's values, indices and input
    gradient have empty(memory_format=channels_last)'s strides, size-1 dims included ((3, 1, 3, 3)
    for [2, 3, 1, 1]); the reference kept NCHW's (3, 1, 1, 1), channels_last-contiguous too but
    read as contiguous by a later layer's layout test (a compile fuzz); the fake kernels as the real."""
    for shape, k in (((2, 3, 4, 4), 4), ((2, 3, 1, 4), (1, 4)), ((1, 3, 1, 1), 1)):
        x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
        for name in ("max_pool2d", "avg_pool2d"):
            got, want = [], []
            for lib, into in ((F, got), (TF, want)):
                xi = x.detach().to(device).requires_grad_()
                with gpu_nn.backend(backend):
                    out = getattr(lib, name)(xi, k, **({"return_indices": True} if name == "max_pool2d" else {}))
                    outs = out if isinstance(out, tuple) else (out,)
                    (gi,) = torch.autograd.grad(outs[0], xi, torch.ones_like(outs[0]))
                into += [t.stride() for t in (*outs, gi)]
            assert got == want, (name, shape, got, want)
        # the fake kernels (torch.compile, export) give the real results' strides too (their
        # new_empty(...).contiguous(memory_format=) kept NCHW's for these)
        kk = [k, k] if isinstance(k, int) else list(k)
        xi = x.to(device)
        calls = [(torch.ops.gpu_nn.max_pool.default, (xi, kk, kk, [0, 0], [1, 1], False, False)),
                 (torch.ops.gpu_nn.avg_pool.default, (xi, kk, kk, [0, 0], False, True, None))]
        with gpu_nn.backend(backend):
            real = [op(*args) for op, args in calls]
        g, idx = torch.ones_like(real[0][0]), real[0][1]
        calls += [(torch.ops.gpu_nn.max_pool_backward.default, (g, idx, list(shape), kk, kk, [0, 0], [1, 1], True)),
                  (torch.ops.gpu_nn.avg_pool_backward.default, (g, list(shape), kk, kk, [0, 0], False, True, None, True))]
        with gpu_nn.backend(backend):
            real += [op(*args) for op, args in calls[2:]]
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]) for op, args in calls]
        strides = [[t.stride() for t in (o if isinstance(o, tuple) else (o,))] for o in (*real, *fake)]
        assert strides[:4] == strides[4:], (shape, strides)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_pooling_layout_is_torchs_suggest_memory_format(backend, device):
    """Pooling results, indices and input gradients take the layout torch's do, its
    suggest_memory_format of the input (c10's channels_last test over the actual strides, size-1
    dims included, no density required), as convolution already did; pooling had tested for
    dense NHWC: an HWC image made a batch of one (channels_last-strided but for its size-1 batch
    dim) came out channels_last where torch's is contiguous, a strided channels_last slice
    contiguous where torch's is channels_last (a fuzz against torch)."""
    img = torch.randn(4, 6, 3)
    base = torch.randn(2, 3, 4, 8).contiguous(memory_format=torch.channels_last)
    inputs = [img.permute(2, 0, 1).unsqueeze(0),                              # (3, 1, 18, 3)
              base[..., ::2],                                                 # channels_last, not dense
              torch.randn(3, 5, 3, 1).permute(0, 2, 3, 1),                    # H of 1
              torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)]
    seqs = [torch.randn(5, 3).t().unsqueeze(0), torch.randn(2, 7, 3).transpose(1, 2)]
    cases = [(lambda f, x: f.max_pool2d(x, (1, 2), return_indices=True), inputs),
             (lambda f, x: f.avg_pool2d(x, (1, 2)), inputs),
             (lambda f, x: f.max_pool1d(x, 2, return_indices=True), seqs),
             (lambda f, x: f.avg_pool1d(x, 2), seqs)]
    for fn, xs in cases:
        for x in xs:
            got, want = [], []
            for lib, into in ((F, got), (TF, want)):
                xi = x.detach().to(device).requires_grad_()
                with gpu_nn.backend(backend):
                    out = fn(lib, xi)
                    outs = out if isinstance(out, tuple) else (out,)
                    (gi,) = torch.autograd.grad(outs[0], xi, torch.ones_like(outs[0]))
                into += [tuple(st for st, n in zip(t.stride(), t.shape) if n > 1) for t in (*outs, gi)]
            assert got == want, (x.shape, x.stride(), got, want)


# --- the backward's sums in torch's order -----------------------------------------------------
#
# torch adds an input element's window terms in increasing (oh, ow) order: its CPU kernels
# scatter the outputs in order, its CUDA ones gather in that order, both in float32 for a float32
# tensor. Another order gives other last bits for about half the elements that take three terms
# or more (random float gradients; the integer gradients of the tests above sum exactly in any
# order). Max / min inputs get a peak every third row and column, so one peak wins all the
# windows around it (nine at 3x3 / 1).
_ORDER_CASES = [  # 2-d cases with every positional argument (the CUDA C test reads them)
    (F.max_pool2d, (3, 1, 1, 1, False), (2, 3, 10, 11)),
    (F.max_pool2d, (3, 1, 1, 2, True), (2, 3, 11, 10)),
    (F.min_pool2d, ((3, 4), (1, 2), (1, 2), 1, False), (2, 3, 9, 12)),
    (F.max_pool1d, (5, 1, 2), (2, 3, 29)),
    (F.avg_pool2d, (3, 1, 1, False, True, None), (2, 3, 10, 11)),
    (F.avg_pool2d, ((5, 3), (1, 2), (2, 1), True, False, None), (2, 3, 11, 10)),
    (F.avg_pool2d, (4, 1, 2, False, True, 7), (2, 3, 9, 9)),
    (F.avg_pool1d, (4, 1, 2, True, False), (2, 3, 23)),
]
_TORCH_POOLS = {"max_pool2d": TF.max_pool2d, "min_pool2d": TF.max_pool2d, "max_pool1d": TF.max_pool1d,
                "avg_pool2d": TF.avg_pool2d, "avg_pool1d": TF.avg_pool1d}
_ORDER_FORMS = [pytest.param("reference", "cpu", None, id="reference-cpu")] + [
    pytest.param(*p.values, form, marks=p.marks, id=f"{p.id}-{form}") for p in backend_params(("triton", "cupy"))
    for form in (("flat", "tile", "cltile") if p.values[0] == "triton" else (None,))]


def _order_input(rng, fn, shape):
    """float32 normal values; for max / min a peak (a trough for min) every third row and column."""
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    if not fn.__name__.startswith("avg"):
        peaks = x[..., ::3, ::3] if x.dim() == 4 else x[..., ::3]  # a view: += lands in x
        peaks += -50.0 if fn.__name__.startswith("min") else 50.0
    return x


def _torch_pool(fn, x, args):
    """torch's forward of our ``fn`` (min pooling as -max_pool(-x), exact)."""
    theirs = _TORCH_POOLS[fn.__name__]
    return -theirs(-x, *args) if fn.__name__.startswith("min") else theirs(x, *args)


@pytest.mark.parametrize("backend,device,form", _ORDER_FORMS)
@pytest.mark.parametrize("case", _ORDER_CASES, ids=lambda c: f"{c[0].__name__}{c[1]}{c[2]}")
def test_backward_adds_the_windows_in_torchs_order(backend, device, form, case, rng, monkeypatch):
    """float32 values and gradients bit for bit torch's, with random float gradients and inputs
    whose elements take up to 9 (max) or 16 (avg) windows' terms: each backward kernel (Triton's
    flat, plane-tile and channels_last-tile forms, in both layouts; CUDA C's; the reference's tap
    loop, which the small-matrix plan skips here) adds them in torch's order. Averages also
    divide as torch does (IEEE: Triton's ``/`` is approximate on a GPU, ``tl.div_rn`` is not)."""
    fn, args, shape = case
    if form is not None:
        _forcing(monkeypatch, form)
    if backend == "reference":
        monkeypatch.setattr(R, "SMALL", 0)  # the tap loop; the matrix product sums in BLAS's order
    x = _order_input(rng, fn, shape)
    layouts = (torch.contiguous_format, torch.channels_last) if x.dim() == 4 else (torch.contiguous_format,)
    for fmt in layouts:
        xt = x.contiguous(memory_format=fmt).requires_grad_()
        yt = _torch_pool(fn, xt, args)
        g = torch.from_numpy(rng.standard_normal(tuple(yt.shape)).astype(np.float32))
        if x.dim() == 4:
            g = g.contiguous(memory_format=fmt)
        (gt,) = torch.autograd.grad(yt, xt, g)
        xo = x.to(device).contiguous(memory_format=fmt).requires_grad_()
        with gpu_nn.backend(backend):
            y = fn(xo, *args)
            (gx,) = torch.autograd.grad(y, xo, g.to(device))
        assert torch.equal(y.detach().cpu(), yt.detach()), ("values", fmt)
        wrong = (gx.cpu() != gt).sum().item()
        assert wrong == 0, f"{wrong} of {gt.numel()} gradient elements differ from torch's ({fmt})"
        if device == "cuda" and not fn.__name__.startswith("avg"):
            # 16-bit max / min: float32 sums rounded once, as torch's CUDA kernels add them (its
            # average is not compared: AveragePool2d.cu divides a c10::Half by an int, rounding
            # each quotient to the 16-bit type before its float32 sum; ours keeps them in float32)
            for dt in (torch.float16, torch.bfloat16):
                xh = xt.detach().to(device=device, dtype=dt).requires_grad_()
                (gh,) = torch.autograd.grad(_torch_pool(fn, xh, args), xh, g.to(device=device, dtype=dt))
                xo = xh.detach().clone().requires_grad_()
                with gpu_nn.backend(backend):
                    (go,) = torch.autograd.grad(fn(xo, *args), xo, g.to(device=device, dtype=dt))
                assert torch.equal(go, gh), (dt, fmt)


@_INDEX
@pytest.mark.parametrize("cl", [0, 1], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [c for c in _ORDER_CASES if len(c[2]) == 4], ids=lambda c: f"{c[0].__name__}{c[1]}")
def test_cuda_gathers_add_in_torchs_order_on_host(host_lib, case, cl, sfx, rng):
    """gn_max_gather / gn_avg_gather (pool.cu's backward) compiled with g++, both index types and
    layouts: the gradient bit for bit torch's float32 one (see the test above)."""
    fn, args, shape = case
    N, C, H, W = shape
    x = _order_input(rng, fn, shape)
    lay = _nhwc if cl else np.ascontiguousarray
    xt = x.clone().requires_grad_()
    if fn.__name__.startswith("avg"):
        k, s, p, ceil, cip, dov = args
        yt = TF.avg_pool2d(xt, *args)
    else:
        k, s, p, d, ceil = args
        sign = -1.0 if fn.__name__.startswith("min") else 1.0
        yt, it = TF.max_pool2d(sign * xt, *args, return_indices=True)
        yt = sign * yt
        d = R._pair(d, 2)
    k, s, p = (R._pair(v, 2) for v in (k, s, p))
    OH, OW = yt.shape[-2:]
    g = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
    (gt,) = torch.autograd.grad(yt, xt, torch.from_numpy(g))
    dx = np.empty_like(lay(x.numpy()))
    if fn.__name__.startswith("avg"):
        getattr(host_lib, "avg_bwd_k" + sfx)(fptr(lay(g)), fptr(dx), *_ll(N, C, H, W, OH, OW),
                                             *_ci(*k, *s, *p, int(cip), dov or 0, cl))
    else:
        idx = lay(it.numpy())
        getattr(host_lib, "max_bwd_k" + sfx)(fptr(lay(g)), fptr(idx), fptr(dx), *_ll(N, C, H, W, OH, OW),
                                             *_ci(*k, *s, *p, *d, cl))
    np.testing.assert_array_equal(dx, lay(gt.numpy()))
