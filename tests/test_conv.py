"""conv1d / conv2d: reference against torch (float64, forward and every gradient) over a grid of
kernel sizes, strides, padding forms, dilations, groups, batch sizes and memory layouts; finite
differences of the reference backward; opcheck; torch.compile; bad input; the Triton kernels
against the reference; the nn modules against torch's."""

import functools
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import gpu_nn
import gpu_nn.functional as F
from gpu_nn.reference import conv as ref
from helpers import CUDA, EPS, assert_close, backend_params, gpu_dtypes_for, interpreted_launches, max_rel_err, randn, tol

# ----------------------------------------------------------------------------- grid

K2 = [(1, 1), (2, 2), (3, 3), (5, 5), (7, 7), (1, 3), (4, 2), (3, 6)]
S2 = [1, 2, 3, (1, 2)]
P2 = [0, 1, (2, 1), "valid", "same"]
D2 = [1, 2, 3, (1, 2)]
GROUPS = [1, 2, "dw"]
LAYOUTS = ["contig", "noncontig", "channels_last"]


def _grid2d():
    cases = []
    for i, (k, s, p) in enumerate(itertools.product(K2, S2, P2)):
        if p == "same" and s != 1:
            continue
        cases.append((k, s, p, D2[i % 4], GROUPS[i % 3], 1 + i % 3, LAYOUTS[i % 3], i % 2 == 0))
    return cases


def _grid1d():
    cases = []
    for i, (k, s, p) in enumerate(itertools.product(range(1, 8), (1, 2, 3), (0, 2, "same", "valid"))):
        if p == "same" and s != 1:
            continue
        cases.append((k, s, p, (1, 2, 3)[i % 3], GROUPS[i % 3], 1 + i % 2, LAYOUTS[i % 2], i % 2 == 1))
    return cases


def _layout(t, layout):
    if layout == "noncontig":
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


def _shapes(nd, k, s, p, d, groups, n, rng_sizes):
    k = (k,) * nd if isinstance(k, int) else k
    d = (d,) * nd if isinstance(d, int) else d
    cin, o = (4, 6) if groups != "dw" else (3, 6)
    g = cin if groups == "dw" else groups
    if nd == 1:
        d = d[:1]
    # odd spatial size that always fits the dilated kernel
    spatial = tuple(dd * (kk - 1) + 1 + extra for kk, dd, extra in zip(k, d, rng_sizes))
    return (n, cin, *spatial), (o, cin // g, *k), g


def _compare(nd, xs, ws, g, bias, s, p, d, layout, rng, activation=None):
    x = _layout(randn(rng, *xs), layout).requires_grad_()
    w = randn(rng, *ws, requires_grad=True)
    b = randn(rng, ws[0], requires_grad=True) if bias else None
    ours = F.conv2d if nd == 2 else F.conv1d
    theirs = TF.conv2d if nd == 2 else TF.conv1d
    leaves = [x, w] + ([b] if bias else [])
    with gpu_nn.backend("reference"):
        y = ours(x, w, b, s, p, d, g, activation=activation)
        go = randn(rng, *y.shape)
        grads = torch.autograd.grad(y, leaves, go) if y.numel() else [torch.zeros_like(t) for t in leaves]
    with _nowarn():
        yt = theirs(x, w, b, s, p, d, g)
    if activation:
        yt = getattr(torch, activation)(yt)
    gt = torch.autograd.grad(yt, leaves, go) if yt.numel() else [torch.zeros_like(t) for t in leaves]
    k = ws[1] * (ws[2] if nd == 1 else ws[2] * ws[3])
    errs = [assert_close(y, yt, torch.float64, k, "forward")]
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), grads, gt):
        errs.append(assert_close(a, e, torch.float64, k * max(y.numel() // max(ws[0], 1), 1), name))
    return max(errs)


class _nowarn:
    """torch warns about 'same' with even kernels; the warning is not under test."""

    def __enter__(self):
        import warnings

        self._c = warnings.catch_warnings()
        self._c.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self._c.__exit__(*exc)


@pytest.mark.parametrize("k,s,p,d,groups,n,layout,bias", _grid2d())
def test_conv2d_reference_matches_torch(k, s, p, d, groups, n, layout, bias, rng):
    xs, ws, g = _shapes(2, k, s, p, d, groups, n, (int(rng.integers(0, 6)), int(rng.integers(0, 6))))
    _compare(2, xs, ws, g, bias, s, p, d, layout, rng)


@pytest.mark.parametrize("k,s,p,d,groups,n,layout,bias", _grid1d())
def test_conv1d_reference_matches_torch(k, s, p, d, groups, n, layout, bias, rng):
    xs, ws, g = _shapes(1, k, s, p, d, groups, n, (int(rng.integers(0, 9)),))
    _compare(1, xs, ws, g, bias, s, p, d, layout, rng)


# ----------------------------------------------------------------------------- reference paths
# The reference picks its algorithm per part (forward, weight gradient, input gradient) by shape:
# im2col (any stride), "flat" (stride 1: one GEMM per kernel tap on the flat padded image) or
# "stacked" (stride 1: the flat taps gathered, one GEMM). The grid above mostly lands on im2col
# (small channel counts), so each stride-1 path is forced here and compared with torch.

# (nd, x shape, weight shape, groups, padding, dilation, bias, layout, activation)
PATH_CASES = [
    (2, (2, 5, 9, 7), (7, 5, 3, 3), 1, 1, 1, True, "contig", None),
    (2, (3, 6, 8, 11), (4, 3, 2, 3), 2, "same", (2, 1), False, "channels_last", None),    # asymmetric 'same'
    (2, (1, 4, 7, 6), (4, 1, 3, 2), 4, "same", 3, True, "noncontig", "relu"),            # depthwise, dilated
    (2, (2, 6, 5, 9), (9, 2, 4, 4), 3, (0, 2), (1, 2), True, "contig", "tanh"),
    (2, (2, 3, 6, 5), (4, 3, 1, 1), 1, 1, 1, False, "contig", None),                     # 1x1 with padding
    (2, (3, 2, 7, 8), (3, 2, 5, 5), 1, "valid", 1, True, "noncontig", None),
    (1, (2, 4, 13), (6, 4, 4), 1, "same", 2, True, "contig", "sigmoid"),                 # 1d, even kernel
    (1, (3, 6, 10), (6, 2, 3), 3, 2, 1, False, "channels_last", None),
    (1, (1, 5, 9), (5, 1, 5), 5, "valid", 2, True, "contig", None),                      # 1d depthwise
]


@pytest.mark.parametrize("path", [
    {"fwd": "flat", "wgrad": "flat", "dgrad": "flat"},
    {"fwd": "stacked", "wgrad": "stacked", "dgrad": "stacked"},
    {"fwd": "im2col", "wgrad": "flat", "dgrad": "stacked"},
], ids=["flat", "stacked", "mixed"])
@pytest.mark.parametrize("nd,xs,ws,g,p,d,bias,layout,act", PATH_CASES, ids=[f"case{i}" for i in range(len(PATH_CASES))])
def test_reference_forced_path_matches_torch(path, nd, xs, ws, g, p, d, bias, layout, act, rng, monkeypatch):
    monkeypatch.setattr(ref, "_FORCE", path)
    _compare(nd, xs, ws, g, bias, 1, p, d, layout, rng, act)
    # a stride > 1 ignores the forced stride-1 path and still matches
    if p != "same":
        _compare(nd, xs, ws, g, bias, 2, p, d, layout, rng, act)


PAD_STRINGS_2D = [((4, 2), 1), ((2, 4), 1), ((2, 2), 1), ((4, 4), (2, 3)), ((1, 2), 2), ((6, 3), (1, 2)),
                  ((3, 3), 1), ((2, 5), (3, 1))]


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("k,d", PAD_STRINGS_2D, ids=[f"k{k}-d{d}" for k, d in PAD_STRINGS_2D])
def test_reference_public_conv2d_padding_strings(padding, k, d, rng):
    """Issue 20: ``reference.conv.conv2d`` / ``conv2d_backward`` called directly with a padding
    string (the public ops resolve 'same' themselves and pass explicit pads, so this path of the
    reference was never run): even and asymmetric kernels put the odd pad on the high side."""
    dd = d if isinstance(d, tuple) else (d, d)
    xs = (2, 3, 9 + dd[0] * k[0], 8 + dd[1] * k[1])
    x = torch.from_numpy(rng.standard_normal(xs)).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((5, 3, *k))).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(5)).requires_grad_()
    with _nowarn():
        yt = TF.conv2d(x, w, b, 1, padding, d)
    y = ref.conv2d(x.detach().numpy(), w.detach().numpy(), b.detach().numpy(), 1, padding, d)
    assert y.shape == tuple(yt.shape)
    kk = 3 * k[0] * k[1]
    assert_close(torch.from_numpy(y), yt, torch.float64, kk, "forward")
    go = torch.from_numpy(rng.standard_normal(y.shape))
    gt = torch.autograd.grad(yt, (x, w, b), go)
    got = ref.conv2d_backward(go.numpy(), x.detach().numpy(), w.detach().numpy(), 1, padding, d)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, gt):
        assert_close(torch.from_numpy(np.asarray(a)), e, torch.float64, kk * y.shape[2] * y.shape[3], name)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("k,d", [(2, 1), (4, 1), (4, 3), (6, 2), (1, 1), (3, 2), (5, 1)])
def test_reference_public_conv1d_padding_strings(padding, k, d, rng):
    """As above for ``reference.conv.conv1d`` / ``conv1d_backward`` (even kernels, dilation)."""
    x = torch.from_numpy(rng.standard_normal((3, 2, 11 + d * k))).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((4, 2, k))).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(4)).requires_grad_()
    with _nowarn():
        yt = TF.conv1d(x, w, b, 1, padding, d)
    y = ref.conv1d(x.detach().numpy(), w.detach().numpy(), b.detach().numpy(), 1, padding, d)
    assert y.shape == tuple(yt.shape)
    assert_close(torch.from_numpy(y), yt, torch.float64, 2 * k, "forward")
    go = torch.from_numpy(rng.standard_normal(y.shape))
    gt = torch.autograd.grad(yt, (x, w, b), go)
    got = ref.conv1d_backward(go.numpy(), x.detach().numpy(), w.detach().numpy(), 1, padding, d)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), got, gt):
        assert_close(torch.from_numpy(np.asarray(a)), e, torch.float64, 2 * k * y.shape[2], name)


# (nd, x shape, weight shape, groups, stride, padding, dilation, bias, activation): odd sizes,
# strides, dilations, groups / depthwise, symmetric, per-side ('same', even kernel) and no padding
SMALL_CASES = [
    (2, (1, 2, 5, 5), (3, 2, 3, 3), 1, 1, 1, 1, True, None),                 # the overhead benchmark's
    (2, (2, 4, 7, 6), (6, 2, 3, 2), 2, (2, 1), (1, 2), (1, 2), True, "relu"),
    (2, (3, 3, 6, 9), (3, 1, 2, 3), 3, 1, "same", 2, False, "tanh"),         # depthwise, asymmetric 'same'
    (2, (2, 16, 5, 5), (16, 16, 3, 3), 1, 1, 1, 1, False, None),              # general path: flat
    (2, (1, 3, 8, 7), (5, 3, 4, 4), 1, 3, 0, 1, True, "sigmoid"),
    (1, (2, 4, 11), (6, 2, 4), 2, 1, "same", 3, True, None),
    (1, (3, 5, 9), (4, 5, 3), 1, 2, 2, 1, False, "relu"),
]


@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nonfinite"])
@pytest.mark.parametrize("nd,xs,ws,g,s,p,d,bias,act", SMALL_CASES, ids=[f"case{i}" for i in range(len(SMALL_CASES))])
def test_reference_small_path_matches_general(nd, xs, ws, g, s, p, d, bias, act, nonfinite, rng, monkeypatch):
    """Small problems take one gather, one GEMM and a bincount scatter (``ref.SMALL``); the
    general paths stay for large ones. Both must agree to rounding, forward and every gradient,
    on strided (non-contiguous) inputs too, and NaN / inf must reach the same outputs and
    gradients (torch's col2im rule: only the (output, tap) pairs that exist)."""
    x = rng.standard_normal((xs[0], xs[1], *xs[2:-1], 2 * xs[-1]))[..., ::2]  # strided view
    w = rng.standard_normal(ws)
    b = rng.standard_normal(ws[0]) if bias else None
    if nonfinite:
        x[(0,) * (x.ndim - 1) + (1,)] = np.inf
        x[(-1,) * x.ndim] = np.nan
        w[(0,) * w.ndim] = -np.inf
    fwd, bwd = (ref.conv2d, ref.conv2d_backward) if nd == 2 else (ref.conv1d, ref.conv1d_backward)
    used = []
    for name in ("_conv2d_small", "_backward_small"):
        real = getattr(ref, name)
        monkeypatch.setattr(ref, name, lambda *a, _r=real, _n=name: used.append(_n) or _r(*a))

    def run():
        y = fwd(x, w, b, s, p, d, g, act)
        go = rng.standard_normal(y.shape)
        return [y, *bwd(go, x, w, s, p, d, g, (True, True, True), y, act)]

    state, limit = rng.bit_generator.state, ref.SMALL
    small = run()
    assert used == ["_conv2d_small", "_backward_small"]
    monkeypatch.setattr(ref, "SMALL", 0)
    rng.bit_generator.state = state  # the same output gradient
    general = run()
    assert used == ["_conv2d_small", "_backward_small"]
    for what, a, e in zip(("forward", "grad_input", "grad_weight", "grad_bias"), small, general):
        assert a.shape == e.shape and a.dtype == e.dtype and a.flags.c_contiguous, what
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=what)
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12, err_msg=what)
    if not nonfinite:  # float32 through the small path against the float64 general result
        y32 = fwd(x.astype(np.float32), w.astype(np.float32), None if b is None else b.astype(np.float32), s, p, d, g, act)
        monkeypatch.setattr(ref, "SMALL", limit)
        y32s = fwd(x.astype(np.float32), w.astype(np.float32), None if b is None else b.astype(np.float32), s, p, d, g, act)
        assert y32s.dtype == np.float32
        np.testing.assert_allclose(y32s, y32, rtol=1e-5, atol=1e-5)


def test_reference_resolve_padding():
    """'same' pads d (k - 1) in total, the odd element on the high side, as torch does."""
    assert ref.resolve_padding("same", (4, 2), 1) == ((1, 2), (0, 1))
    assert ref.resolve_padding("same", (4, 5), (3, 2)) == ((4, 5), (4, 4))
    assert ref.resolve_padding("valid", (4, 2), 1) == ((0, 0), (0, 0))
    with pytest.raises(ValueError, match="Invalid padding string"):
        ref.resolve_padding("full", (3, 3), 1)


def test_reference_path_choice():
    w = ((1, 1), 0.11)  # 3x3 padding 1 on 32x32: 11% of the flat positions are not outputs
    k = (3, 3)
    for part in ("fwd", "wgrad", "dgrad"):
        assert ref._choose(part, (1, 1), 1, 64, 64, k, w[1]) == "flat"          # N=8 C=64 O=64 benchmark
        assert ref._choose(part, (2, 2), 1, 64, 64, k, w[1]) == "im2col"        # strided
        assert ref._choose(part, (1, 1), 1, 64, 64, (1, 1), 0.0) == "im2col"    # 1x1
        assert ref._choose(part, (1, 1), 1, 64, 64, (5, 5), 0.36) == "im2col"   # border-heavy
        assert ref._choose(part, (1, 1), 1, 3, 32, k, w[1]) == "im2col"         # RGB input benchmark
    assert ref._choose("fwd", (1, 1), 64, 1, 1, k, w[1]) == "im2col"            # depthwise
    assert ref._choose("wgrad", (1, 1), 64, 1, 1, k, w[1]) == "flat"
    assert ref._choose("dgrad", (1, 1), 64, 1, 1, k, w[1]) == "stacked"
    assert ref._choose("wgrad", (1, 1), 1, 8, 8, k, w[1]) == "flat"
    assert ref._waste((8, 64, 32, 32), k, ((1, 1), (1, 1)), (1, 1)) == pytest.approx(1 - 1024 / 1156)


@pytest.mark.parametrize("scratch_max", [None, 0], ids=["scratch", "fresh"])
def test_reference_results_own_their_memory(scratch_max, rng, monkeypatch):
    """Temporaries live in reused per-thread scratch memory; results must not: a second call
    (or a call on another thread) must leave the first call's results untouched."""
    if scratch_max is not None:
        monkeypatch.setattr(ref, "_SCRATCH_MAX", scratch_max)
    monkeypatch.setattr(ref, "_FORCE", {"fwd": "flat", "wgrad": "flat", "dgrad": "flat"})
    x1, x2 = rng.standard_normal((2, 16, 6, 7)), rng.standard_normal((2, 16, 6, 7))
    w = rng.standard_normal((16, 16, 3, 3))
    y1 = ref.conv2d(x1, w, None, 1, 1)
    g1 = ref.conv2d_backward(y1, x1, w, 1, 1)
    keep = [a.copy() for a in (y1, *g1)]
    y2 = ref.conv2d(x2, w, None, 1, 1)
    ref.conv2d_backward(y2, x2, w, 1, 1)
    for a, k in zip((y1, *g1), keep):
        assert a.flags.c_contiguous and a.base is None
        np.testing.assert_array_equal(a, k)
    ref.clear_scratch()
    np.testing.assert_array_equal(ref.conv2d(x1, w, None, 1, 1), y1)

    from concurrent.futures import ThreadPoolExecutor

    def run(i):
        xs = [x1, x2][i % 2]
        return [ref.conv2d(xs, w, None, 1, 1) for _ in range(20)]

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(run, range(4)))
    for i, ys in enumerate(outs):
        for y in ys:
            np.testing.assert_allclose(y, [y1, y2][i % 2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid", "tanh"])
def test_batch_sizes_and_activation(nd, n, activation, rng):
    spatial = (7, 9) if nd == 2 else (13,)
    ks = (3, 2) if nd == 2 else (4,)
    _compare(nd, (n, 4, *spatial), (6, 2, *ks), 2, True, 1, "same", 1, "contig", rng, activation)


@pytest.mark.parametrize("nd", [1, 2])
def test_unbatched_input(nd, rng):
    x = randn(rng, 3, *((6, 7) if nd == 2 else (11,)))
    w = randn(rng, 4, 3, *((3, 3) if nd == 2 else (3,)))
    ours, theirs = (F.conv2d, TF.conv2d) if nd == 2 else (F.conv1d, TF.conv1d)
    y = ours(x, w, None, 1, 1)
    assert y.shape == theirs(x, w, None, 1, 1).shape
    assert_close(y, theirs(x, w, None, 1, 1), torch.float64, 27)


def test_large_padding_and_big_stride(rng):
    # padding wider than the kernel reach and a stride larger than the kernel: the output
    # gradient gets cropped / leaves input pixels untouched
    for s, p in ((1, 4), (4, 3), (5, (0, 6))):
        _compare(2, (2, 3, 8, 9), (4, 3, 2, 3), 1, True, s, p, 1, "contig", rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_low_precision_dtypes(dtype, rng):
    x64, w64 = randn(rng, 2, 3, 9, 8), randn(rng, 5, 3, 3, 3)
    y = F.conv2d(x64.to(dtype), w64.to(dtype), padding=1)
    assert y.dtype == dtype
    e = max_rel_err(y, TF.conv2d(x64, w64, padding=1))
    assert e < (1e-5 if dtype == torch.float32 else 5e-3)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("nd,kw", [
    (2, dict(stride=2, padding=1)),
    (2, dict(padding="same", dilation=2, groups=2, activation="tanh")),
    (2, dict(stride=(1, 3), padding=(0, 2), activation="sigmoid")),
    (1, dict(stride=3, padding=2, dilation=2, groups=4)),
    (1, dict(padding="same", activation="relu")),
])
def test_reference_backward_finite_differences(nd, kw, rng):
    g = kw.get("groups", 1)
    x = randn(rng, 2, 4, *((6, 7) if nd == 2 else (11,)), requires_grad=True)
    w = randn(rng, 4, 4 // g, *((3, 2) if nd == 2 else (3,)), requires_grad=True)
    b = randn(rng, 4, requires_grad=True)
    fn = F.conv2d if nd == 2 else F.conv1d
    if kw.get("activation") == "relu":
        x = (x.detach() + 0.05 * torch.sign(x.detach())).requires_grad_()  # keep clear of relu's kink
    with gpu_nn.backend("reference"):
        assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, b, **kw), (x, w, b))


# ----------------------------------------------------------------------------- opcheck / compile

@pytest.mark.parametrize("nd,act,bias", [(2, None, True), (2, "relu", False), (1, "sigmoid", True), (1, None, False)])
def test_opcheck(nd, act, bias, rng):
    sp = (7, 6) if nd == 2 else (9,)
    ks = (3, 2) if nd == 2 else (3,)
    x = randn(rng, 2, 4, *sp, requires_grad=True)
    w = randn(rng, 6, 2, *ks, requires_grad=True)
    b = randn(rng, 6, requires_grad=True) if bias else None
    stride, pad, dil = [1] * nd, [1, 2] * nd, [1] * nd
    torch.library.opcheck(torch.ops.gpu_nn.conv_forward.default, (x, w, b, stride, pad, dil, 2, act))
    y = torch.ops.gpu_nn.conv_forward.default(x, w, b, stride, pad, dil, 2, act).detach()
    g = randn(rng, *y.shape)
    for mask in ([True, True, bias], [False, True, False], [True, False, False]):
        torch.library.opcheck(torch.ops.gpu_nn.conv_backward.default,
                              (g, x.detach(), w.detach(), y if act else None, stride, pad, dil, 2, act, mask))


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_conv_ops_called_directly_refuse_argument_lists_of_other_lengths(backend, device, rng):
    """The public functions expand stride, padding and dilation to one entry per dimension (padding
    per side); a direct call of the custom op with other lengths was read in part (the Triton
    forward took a conv2d padding of six entries) or failed with an IndexError; and the backward's
    output_mask has three entries (a helper's audit)."""
    x, w = randn(rng, 2, 4, 7, 6).to(device), randn(rng, 6, 2, 3, 2).to(device)
    ops = torch.ops.gpu_nn
    with gpu_nn.backend(backend):
        y = ops.conv_forward.default(x, w, None, [1, 1], [1, 1, 0, 0], [1, 1], 2, None)
        for st, pad, dil in (([1, 1], [1, 1, 0, 0, 5, 5], [1, 1]), ([1, 1], [1, 1], [1, 1]), ([1], [1, 1, 0, 0], [1, 1]),
                             ([1, 1], [1, 1, 0, 0], [1])):
            with pytest.raises(gpu_nn.KernelInputError, match="paddings \\(one per side\\)"):
                ops.conv_forward.default(x, w, None, st, pad, dil, 2, None)
        with pytest.raises(gpu_nn.KernelInputError, match="output_mask has 2 entries"):
            ops.conv_backward.default(torch.ones_like(y), x, w, None, [1, 1], [1, 1, 0, 0], [1, 1], 2, None, [True, True])


class _SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = torch.nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(6, 4, 3, 3) * 0.3)
        self.w3 = torch.nn.Parameter(torch.randn(5, 6, 4) * 0.3)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.conv2d(x, self.w2, None, stride=2, padding="valid", groups=2, activation="relu")
        x = F.conv1d(x.flatten(2), self.w3, padding="same", activation="tanh")
        return x.sum()


def test_torch_compile_fullgraph(rng):
    torch._dynamo.reset()
    model = _SmallCNN().double()
    x = randn(rng, 2, 3, 11, 9, requires_grad=True)
    eager = model(x)
    ge = torch.autograd.grad(eager, [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    gc = torch.autograd.grad(out, [x, *model.parameters()])
    torch.testing.assert_close(out, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- bad input

def _bad_cases():
    x4, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    return [
        ("rank", lambda: F.conv2d(torch.randn(2, 4, 5, 5, 5), w), "Expected 3D \\(unbatched\\) or 4D \\(batched\\) input to conv2d"),
        ("rank1d", lambda: F.conv1d(x4, torch.randn(6, 4, 3)), "Expected 2D \\(unbatched\\) or 3D \\(batched\\) input to conv1d"),
        ("weight rank", lambda: F.conv2d(x4, torch.randn(6, 4, 3)), "expected stride to be a single integer value or a list of 1 values"),
        ("channels", lambda: F.conv2d(x4, torch.randn(6, 3, 3, 3)),
         r"Given groups=1, weight of size \[6, 3, 3, 3\], expected input\[2, 4, 5, 5\] to have 3 channels, but got 4 channels instead"),
        ("group channels", lambda: F.conv2d(x4, torch.randn(6, 2, 3, 3), groups=3), "expected input\\[2, 4, 5, 5\\] to have 6 channels"),
        ("groups divide", lambda: F.conv2d(x4, torch.randn(6, 1, 3, 3), groups=4), "expected weight to be divisible by 4 at dimension 0"),
        ("groups", lambda: F.conv2d(x4, w, groups=0), "non-positive groups is not supported"),
        ("kernel too big", lambda: F.conv2d(torch.randn(2, 4, 2, 2), w),
         r"Calculated padded input size per channel: \(2 x 2\). Kernel size: \(3 x 3\). Kernel size can't be greater than actual input size"),
        ("dilated kernel too big", lambda: F.conv1d(torch.randn(2, 4, 4), torch.randn(6, 4, 3), padding=1, dilation=3),
         r"padded input size per channel: \(6\). Kernel size: \(7\)"),
        ("negative padding", lambda: F.conv2d(x4, w, padding=-1), "negative padding is not supported"),
        ("stride", lambda: F.conv2d(x4, w, stride=0), "non-positive stride is not supported"),
        ("dilation", lambda: F.conv2d(x4, w, dilation=(1, 0)), "dilation"),
        ("dilation1d", lambda: F.conv1d(x4[0], torch.randn(6, 5, 3), dilation=0), "dilation"),
        ("negative dilation", lambda: F.conv2d(x4, w, dilation=-1), "dilation should be greater than zero$"),
        ("same strided", lambda: F.conv2d(x4, w, stride=2, padding="same"), "padding='same' is not supported for strided convolutions"),
        ("padding string", lambda: F.conv2d(x4, w, padding="full"), "Invalid padding string: 'full'"),
        ("stride length", lambda: F.conv2d(x4, w, stride=(1, 1, 1)), "a list of 2 values to match the convolution dimensions"),
        ("weight dtype", lambda: F.conv2d(x4, w.double()), "weight type"),
        ("bias dtype", lambda: F.conv2d(x4, w, torch.randn(6).double()), "bias type"),
        ("bias size", lambda: F.conv2d(x4, w, torch.randn(5)), "expected bias to be 1-dimensional with 6 elements"),
        ("int input", lambda: F.conv2d(x4.long(), w.long()), "floating-point"),
        ("activation", lambda: F.conv2d(x4, w, activation="gelu"), "unknown activation"),
        ("empty kernel", lambda: F.conv2d(x4, torch.randn(6, 4, 0, 3)), "kernel"),
        ("not a tensor", lambda: F.conv1d([1.0, 2.0], torch.randn(1, 1, 1)), "must be Tensor"),
    ]


@pytest.mark.parametrize("what,fn,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises(what, fn, match):
    with pytest.raises(gpu_nn.KernelInputError, match=match):
        fn()


@pytest.mark.parametrize("o,groups", [(0, 1), (1, 2), (3, 2), (6, 4)], ids=str)
@pytest.mark.parametrize("nd", [1, 2])
def test_weight_count_against_groups_in_torchs_words(o, groups, nd):
    """A weight with fewer output channels than groups (0 with groups=1 included) or a count
    groups do not divide: torch's message exactly (it brackets the size once for 'at least',
    twice for 'divisible by')."""
    x = torch.randn(2, 4, *(5,) * nd)
    w = torch.randn(o, 4 // groups, *(3,) * nd)
    theirs, ours = (TF.conv1d, F.conv1d) if nd == 1 else (TF.conv2d, F.conv2d)
    with pytest.raises(RuntimeError) as want:
        theirs(x, w, groups=groups)
    with pytest.raises(gpu_nn.KernelInputError) as got:
        ours(x, w, groups=groups)
    assert str(got.value) == str(want.value)


# (weight shape, bias size, stride, padding, dilation, groups) for a [*, 4, 6, 6] input: one or
# several arguments wrong at once
_REFUSED = [
    ((5, 4, 3, 3), None, 1, 0, 0, 1), ((5, 4, 3, 3), None, 1, 0, (1, 0), 1), ((5, 4, 3, 3), 5, 1, 0, -1, 1),
    ((5, 3, 3, 3), None, 1, 0, 0, 1), ((5, 4, 3, 3), 4, 1, 0, 0, 1), ((5, 4, 3, 3), None, 0, -1, 0, 1),
    ((5, 4, 3, 3), None, 0, -1, 1, 1), ((5, 4, 3, 3), None, 2, "same", 1, 0), ((5, 4, 3, 3), None, 0, "same", 1, 0),
    ((5, 2, 3, 3), None, 1, -1, 1, 2), ((5, 4, 3, 3), None, 1, -1, 1, 0), ((5, 4, 0, 3), None, 1, 0, 1, 1),
    ((5, 4, 0, 3), None, 1, -1, 1, 1), ((5, 4, 9, 3), None, 1, 0, 1, 1), ((4, 2, 3, 3), 5, 1, 0, 1, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [None, 1, 3])
@pytest.mark.parametrize("case", _REFUSED, ids=str)
def test_refusals_in_torchs_words_and_order(case, batch, dtype):
    """Refused arguments, one or several wrong at once: torch's error, word for word. Its order of
    checks and some of its words depend on the kernel it picks (its oneDNN path, which a batched
    float32 CPU input takes on a machine with more than one thread, checks padding before stride
    and the channel count before dilation, and says 'non-positive dilation is not supported'), so
    ours asks torch on stand-ins once its own checks refuse; where torch's answer is oneDNN's failure to
    build its kernel (an empty kernel), ours, which names the weight."""
    wshape, b, stride, padding, dilation, groups = case
    x = torch.randn(*((batch,) if batch else ()), 4, 6, 6, dtype=dtype)
    w = torch.randn(*wshape, dtype=dtype)
    bias = None if b is None else torch.randn(b, dtype=dtype)
    with pytest.raises(RuntimeError) as want:
        TF.conv2d(x, w, bias, stride, padding, dilation, groups)
    with pytest.raises(gpu_nn.KernelInputError) as got:
        F.conv2d(x, w, bias, stride, padding, dilation, groups)
    if str(want.value).startswith("could not create a primitive descriptor"):
        assert "expected a non-empty kernel" in str(got.value)
    else:
        assert str(got.value) == str(want.value)
    if dilation == 0:  # conv1d: the same verdict for the 1-d form (torch's words name it [1, d])
        with pytest.raises(RuntimeError) as want:
            TF.conv1d(x[..., 0], w[..., 0], bias, stride if stride != "same" else 1, 0, 0, groups)
        with pytest.raises(gpu_nn.KernelInputError) as got:
            F.conv1d(x[..., 0], w[..., 0], bias, stride if stride != "same" else 1, 0, 0, groups)
        assert str(got.value) == str(want.value)


MIXED_PADDINGS = [
    ("conv2d", (0, -1)), ("conv2d", (-1, 0)), ("conv2d", (-2, 3)), ("conv2d", (1, -1)),
    ("conv1d", (-1,)), ("conv1d", -1), ("conv1d", (0, -1)),
]


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("op,padding", MIXED_PADDINGS, ids=[f"{o}-{p}" for o, p in MIXED_PADDINGS])
def test_mixed_sign_padding_raises_like_torch(backend, device, op, padding):
    """Issue 20: a padding negative in one dimension only (the only earlier test used -1, negative
    in every dimension, so a check weakened from ``any`` to ``all`` passed) raises before any
    kernel runs, with torch's message."""
    x, w = (torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3)) if op == "conv2d" else (torch.randn(2, 4, 7), torch.randn(6, 4, 3))
    with pytest.raises(RuntimeError) as theirs:
        getattr(TF, op)(x, w, padding=padding)
    with gpu_nn.backend(backend), pytest.raises(gpu_nn.KernelInputError) as ours:
        getattr(F, op)(x.to(device), w.to(device), padding=padding)
    assert str(theirs.value) in str(ours.value)


def test_bad_input_device_mismatch():
    meta_w = torch.randn(6, 4, 3, 3, device="meta")
    with pytest.raises(gpu_nn.KernelInputError, match="same device"):
        F.conv2d(torch.randn(2, 4, 5, 5), meta_w)


# ----------------------------------------------------------------------------- Triton kernels

TRITON_CASES = [
    # (nd, input shape, weight shape, kwargs, layout)
    (2, (2, 5, 9, 7), (7, 5, 3, 3), dict(padding=1), "contig"),
    (2, (1, 6, 9, 8), (4, 3, 2, 5), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), "noncontig"),
    (2, (1, 3, 7, 6), (6, 1, 3, 3), dict(padding="same", dilation=2, groups=3), "channels_last"),
    (2, (1, 7, 8, 7), (5, 7, 4, 4), dict(padding="same", activation="relu"), "contig"),
    (2, (2, 20, 9, 7), (33, 20, 1, 1), dict(stride=3, activation="sigmoid"), "channels_last"),
    (2, (1, 2, 8, 7), (3, 2, 7, 7), dict(padding="valid", bias=False), "contig"),
    (2, (0, 3, 5, 5), (4, 3, 3, 3), dict(padding=1), "contig"),
    (1, (3, 5, 29), (7, 5, 5), dict(padding=2, activation="tanh"), "noncontig"),
    (1, (2, 6, 31), (12, 1, 3), dict(stride=2, dilation=3, groups=6), "channels_last"),
    (2, (1, 4, 9, 8), (4, 1, 3, 2), dict(stride=(2, 3), padding=(1, 2), groups=4, activation="relu"), "noncontig"),
    # the input gradient by stride residue class: stride 3 with a tap span that reaches every
    # class of h (dilation 2) and of w, classes short of a row or column (11 = 3*3 + 2, 10)
    (2, (1, 6, 11, 10), (6, 3, 3, 4), dict(stride=(3, 2), padding=(2, 1), dilation=(2, 1), groups=2), "channels_last"),
    (2, (1, 5, 10, 9), (4, 5, 5, 3), dict(stride=3, padding=(2, 1), bias=False), "contig"),
]


def _set_tf32(mm, cudnn):
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = mm
    torch.backends.cudnn.allow_tf32 = cudnn
    return old


@pytest.fixture
def no_tf32():
    """float32 kernels compared at float32 tolerances: keep TF32 off (torch's cuDNN flag is on
    by default, and the launcher follows it)."""
    old = _set_tf32(False, False)
    yield
    _set_tf32(*old)


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("nd,xs,ws,kw,layout", TRITON_CASES, ids=[f"case{i}" for i in range(len(TRITON_CASES))])
def test_triton_matches_reference(backend, device, nd, xs, ws, kw, layout, rng):
    kw = dict(kw)
    has_bias = kw.pop("bias", True)
    fn = F.conv2d if nd == 2 else F.conv1d
    k = ws[1] * (ws[2] * ws[3] if nd == 2 else ws[2])
    x64 = randn(rng, *xs)
    w64 = randn(rng, *ws) / k ** 0.5
    b64 = randn(rng, ws[0]) if has_bias else None

    def reference(dtype, g64=None):
        """The float64 reference on the inputs as ``dtype`` holds them (a fused ReLU's mask then
        follows the rounded pre-activation, as the kernel's does; the unrounded one can differ
        in a whole gradient term where a pre-activation lies within one rounding of zero)."""
        r = (lambda t: t.to(dtype).double()) if dtype is not None else (lambda t: t)
        with gpu_nn.backend("reference"):
            leaves = [r(x64).requires_grad_(), r(w64).requires_grad_()] + ([r(b64).requires_grad_()] if has_bias else [])
            yr = fn(leaves[0], leaves[1], leaves[2] if has_bias else None, **kw)
            if g64 is None:
                return yr
            gr = torch.autograd.grad(yr, leaves, r(g64)) if yr.numel() else [torch.zeros_like(t) for t in leaves]
        return yr, gr

    g64 = randn(rng, *reference(None).shape)
    red_bwd = max(g64.numel() // max(ws[0], 1), 1) + ws[0] * k
    for dtype in gpu_dtypes_for(backend, device):
        yr, gr = reference(dtype, g64)
        x = _layout(x64.to(device=device, dtype=dtype), layout).requires_grad_()
        w = w64.to(device=device, dtype=dtype).requires_grad_()
        b = b64.to(device=device, dtype=dtype).requires_grad_() if has_bias else None
        ins = [x, w] + ([b] if has_bias else [])
        with gpu_nn.backend(backend):
            y = fn(x, w, b, **kw)
            gs = torch.autograd.grad(y, ins, g64.to(device=device, dtype=dtype)) if y.numel() else [torch.zeros_like(t) for t in ins]
        assert y.dtype == dtype and y.shape == yr.shape
        assert_close(y, yr, dtype, k, f"forward {dtype}")
        for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), gs, gr):
            assert a.dtype == dtype
            assert_close(a, e, dtype, red_bwd, f"{name} {dtype}")


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_activation_and_bias_gradient_in_one_launch(backend, device, act, monkeypatch, rng):
    """A small convolution with a fused activation and a bias takes the activation's gradient
    and the bias gradient in one launch (dense._act_colsum_kernel over g as [N, H*W, C] or, for
    channels_last, [1, N*H*W, C]): the same input and weight gradients as the activation kernel
    then torch's sum (bitwise: the same dY'), the bias gradient equal to float32's precision,
    both against the reference; conv1d, NCHW and channels_last."""
    from gpu_nn.kernels.triton import dense as kd

    one_launch = kd.ACT_COLSUM_MAX_ROWS  # the module's bound (each pass below sets its own)
    cases = [(2, (2, 3, 5, 6), (7, 3, 3, 3), "contig"), (2, (3, 4, 4, 5), (6, 4, 3, 1), "channels_last"),
             (1, (2, 3, 9), (5, 3, 3), "contig")]
    for nd, xs, ws, layout in cases:
        fn = F.conv2d if nd == 2 else F.conv1d
        x64, w64, b64 = randn(rng, *xs), randn(rng, *ws) * 0.3, randn(rng, ws[0])
        g64 = randn(rng, *fn(x64, w64, b64, padding=1).shape)
        for dtype in gpu_dtypes_for(backend, device):
            # the float64 reference on the inputs as dtype holds them (see test_triton_matches_reference)
            with gpu_nn.backend("reference"):
                leaves = [t.to(dtype).double().requires_grad_() for t in (x64, w64, b64)]
                ref = torch.autograd.grad(fn(*leaves, padding=1, activation=act), leaves, g64.to(dtype).double())
            got = {}
            for bound in (one_launch, 0):
                monkeypatch.setattr(kd, "ACT_COLSUM_MAX_ROWS", bound)
                ins = [_layout(x64.to(device, dtype), layout).requires_grad_(), w64.to(device, dtype).requires_grad_(),
                       b64.to(device, dtype).requires_grad_()]
                g = _layout(g64.to(device, dtype), layout)  # the channels_last case's g too: its branch
                with gpu_nn.backend(backend), interpreted_launches(device) as names:
                    y = fn(*ins, padding=1, activation=act)
                    got[bound] = torch.autograd.grad(y, ins, g)
                if device == "cpu":
                    assert ("_act_colsum_kernel" in names) == (bound > 0) and ("_act_bwd_kernel" in names) == (bound == 0)
            (dx, dw, db), (dx2, dw2, db2) = got[one_launch], got[0]
            assert torch.equal(dx, dx2) and torch.equal(dw, dw2), (nd, layout, dtype)
            # reduction lengths: dx over output channels x taps, dw and db over the output's pixels
            kx, kb = ws[0] * math.prod(ws[2:]), g64.numel() // ws[0]
            assert_close(db, db2, dtype, kb, f"grad_bias against torch's sum {dtype}")
            for name, a, e, k in zip(("grad_input", "grad_weight", "grad_bias"), (dx, dw, db), ref, (kx, kb, kb)):
                assert_close(a, e, dtype, k, f"{name} {nd}d {layout} {dtype}")


def _copies_outside_launches(monkeypatch):
    """A dispatch mode class, ``Copies(shape)``, that records (op, result strides, source strides)
    of every copy (copy_, clone, _to_copy, contiguous) of a tensor of ``shape`` made outside the
    Triton launches of the conv, dense and activation families (the interpreter's launches issue
    torch ops of their own, which it leaves out): the copies a launcher makes around its kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gpu_nn.ops._dispatch import triton_kernels

    inside = [0]
    for fam in ("conv", "dense", "activation"):
        mod = triton_kernels(fam)[1]
        real = mod.launch_kernel

        def counted(*a, _real=real, **k):
            inside[0] += 1
            try:
                return _real(*a, **k)
            finally:
                inside[0] -= 1
        monkeypatch.setattr(mod, "launch_kernel", counted)

    class Copies(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.seen = tuple(shape), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if not inside[0] and name in ("copy_", "clone", "_to_copy", "contiguous") and \
                    isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
                self.seen.append((name, tuple(out.stride()), tuple(args[-1].stride())))
            return out

    return Copies


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("nd", [1, 2])
def test_fused_activation_gradient_takes_the_outputs_layout(backend, device, nd, monkeypatch, rng):
    """The backward of a convolution with a fused activation runs the activation's gradient in
    the layout of the forward's output (its input and weight's), whatever layout grad_output
    comes in: a channels_last layer's NCHW gradient (back from a flatten) or an expanded one
    (y.sum()) is copied once into y's layout, and y itself never (it was copied, and an expanded
    gradient materialised as well, before); the gradient kernels then read one layout. Values
    against the float64 reference, every gradient; the copies counted outside the kernels'
    launches (a dispatch mode around the op's own function, which the interpreter's launches
    would also feed)."""
    from gpu_nn.ops import conv as oc

    Copies = _copies_outside_launches(monkeypatch)
    xs, ws = ((2, 6, 5, 7), (8, 6, 3, 3)) if nd == 2 else ((2, 6, 9), (8, 6, 3))
    x64, w64, b64 = randn(rng, *xs), randn(rng, *ws) * 0.3, randn(rng, ws[0])
    cl = _layout(x64, "channels_last")
    stride, padding, dilation = ([1, 1], [1, 1, 1, 1], [1, 1]) if nd == 2 else ([1], [1, 1], [1])
    dtype = torch.float32
    x = cl.to(device=device, dtype=dtype)
    w = _layout(w64, "channels_last").to(device=device, dtype=dtype) if nd == 2 else \
        w64.permute(0, 2, 1).contiguous().permute(0, 2, 1).to(device=device, dtype=dtype)
    b = b64.to(device=device, dtype=dtype)
    with gpu_nn.backend(backend):
        y = oc.conv_forward(x, w, b, stride, padding, dilation, 1, "relu")
    assert not y.is_contiguous() and y.permute(0, *range(2, y.dim()), 1).is_contiguous()  # channels_last
    g64 = randn(rng, *y.shape)
    with gpu_nn.backend("reference"):
        leaves = [t.double().requires_grad_() for t in (x, w, b)]
        fn = F.conv2d if nd == 2 else F.conv1d
        yr = fn(*leaves, padding=1, activation="relu")
    for how in ("nchw", "expanded", "channels_last"):
        g = {"nchw": g64.contiguous(), "expanded": torch.ones(()).expand(y.shape),
             "channels_last": g64.permute(0, *range(2, y.dim()), 1).contiguous().permute(0, y.dim() - 1, *range(1, y.dim() - 1))
             }[how].to(device=device, dtype=dtype)
        expect = torch.autograd.grad(yr, leaves, g.double(), retain_graph=True)
        with gpu_nn.backend(backend), Copies(y.shape) as spy:
            got = oc.conv_backward(g, x, w, y, stride, padding, dilation, 1, "relu", [True, True, True])
        # one copy of the gradient into y's strides where it comes in another layout; y never moves
        assert spy.seen == ([] if how == "channels_last" else [("copy_", y.stride(), g.stride())]), (how, spy.seen)
        kx, kb = ws[0] * math.prod(ws[2:]), g.numel() // ws[0]
        for name, a, e, k in zip(("grad_input", "grad_weight", "grad_bias"), got, expect, (kx, kb, kb)):
            assert_close(a, e, dtype, k, f"{name} {nd}d {how}")
        assert got[0].stride() == x.stride() and got[1].stride() == w.stride()


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_channels_last_float32_weight_gradient_is_summed_in_place(backend, device, depthwise, monkeypatch, rng):
    """The weight gradient's float32 partial sums ([split, O, C, taps]) reduce straight into a
    channels_last float32 weight gradient, through its strides (one pass; a contiguous sum and a
    transposing copy were two), with the values of the contiguous weight's gradient; a bfloat16
    one keeps its float32 sum and one rounding copy (torch's sum into a half out rounds first)."""
    from gpu_nn.kernels.triton import conv as kt

    Copies = _copies_outside_launches(monkeypatch)
    c, o, groups = (6, 6, 6) if depthwise else (6, 8, 1)
    x = _layout(randn(rng, 3, c, 9, 7), "channels_last").to(device)
    w_shape = (o, c // groups, 3, 3)
    g = _layout(randn(rng, 3, o, 9, 7), "channels_last").to(device)
    got = {}
    for dtype in (torch.float32, *([torch.bfloat16] if device != "cpu" else ())):
        for layout in ("contig", "channels_last"):
            dw = _layout(torch.empty(w_shape, device=device, dtype=dtype), layout)
            with Copies(w_shape) as spy:
                kt.conv_backward_weight(g.to(dtype), x.to(dtype), dw, (1, 1), (1, 1, 1, 1), (1, 1), groups, "ieee",
                                        device == "cpu")
            if dtype == torch.float32:
                assert spy.seen == [], (layout, spy.seen)
            got[dtype, layout] = dw
        assert torch.equal(got[dtype, "contig"], got[dtype, "channels_last"]), dtype
    ref = torch.ops.aten.convolution_backward(  # torch's own, float64 on the CPU
        g.double().cpu(), x.double().cpu(), torch.zeros(w_shape, dtype=torch.float64), None,
        [1, 1], [1, 1], [1, 1], False, [0, 0], groups, [False, True, False])[1]
    assert_close(got[torch.float32, "channels_last"], ref, torch.float32, 3 * 9 * 7, "grad_weight")


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("wants", [w for w in itertools.product((0, 1), repeat=3) if any(w)], ids=str)
def test_backward_with_some_leaves_frozen(backend, device, nd, wants, rng):
    """Only the gradients autograd asks for (frozen weight, no bias, input without grad...): the
    backward op returns a distinct placeholder for each gradient it skips (a custom op may not
    return one tensor twice), and the ones it computes match torch."""
    want_x, want_w, want_b = wants
    xs, ws = ((2, 3, 7, 9), (4, 3, 3, 2)) if nd == 2 else ((2, 3, 11), (4, 3, 3))
    x64, w64, b64 = randn(rng, *xs), randn(rng, *ws), randn(rng, ws[0])
    fn, tfn = (F.conv2d, TF.conv2d) if nd == 2 else (F.conv1d, TF.conv1d)
    dtype = torch.float64 if backend == "reference" else torch.float32

    def leaves(dev, dt):
        return (x64.to(dev, dt).requires_grad_(bool(want_x)), w64.to(dev, dt).requires_grad_(bool(want_w)),
                b64.to(dev, dt).requires_grad_(bool(want_b)) if want_b else None)

    x, w, b = leaves(device, dtype)
    with gpu_nn.backend(backend):
        y = fn(x, w, b, padding=1)
        y.sum().backward()
    xt, wt, bt = leaves("cpu", torch.float64)
    tfn(xt, wt, bt, padding=1).sum().backward()
    for name, ours, theirs in (("input", x, xt), ("weight", w, wt), ("bias", b, bt)):
        if theirs is None or not theirs.requires_grad:
            assert ours is None or ours.grad is None
        else:
            assert_close(ours.grad.cpu(), theirs.grad, dtype, 27, f"grad_{name}")


def test_dot_precision_follows_torch_flags(monkeypatch):
    """float32 convolutions obey torch.backends.cudnn.allow_tf32 alone (as torch's cuDNN
    convolutions do); the matmul flag and set_float32_matmul_precision are linear's."""
    from gpu_nn.ops import conv as oc

    monkeypatch.setattr(oc.torch.cuda, "is_available", lambda: True)
    old = _set_tf32(False, False)
    try:
        for mm, cudnn, want in ((False, False, "ieee"), (True, False, "ieee"), (False, True, "tf32"), (True, True, "tf32")):
            _set_tf32(mm, cudnn)
            assert oc._precision(torch.float32) == want
            assert oc._precision(torch.float16) == "ieee"
    finally:
        _set_tf32(*old)


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` records the launch's keyword
    arguments and, with ``run=True``, launches the real kernel."""

    def __init__(self, kernel, run=True):
        self.kernel, self.run, self.launches = kernel, run, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            if self.run:
                return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("cudnn", [False, True])
def test_tf32_flag_reaches_the_kernels(cudnn, monkeypatch, rng):
    """The PREC constexpr of the forward, dgrad and wgrad launches follows
    torch.backends.cudnn.allow_tf32 (and not the matmul flag, set the other way); linear's
    switch follows the matmul flag and torch.set_float32_matmul_precision, not cudnn's."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc
    from gpu_nn.ops import dense as od

    _need_triton()
    monkeypatch.setattr(oc.torch.cuda, "is_available", lambda: True)  # the interpreter answers 'ieee' otherwise
    monkeypatch.setattr(oc, "_chooser", lambda device: None)
    recs = {}
    for name in ("_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"):
        recs[name] = _Recorder(getattr(kt, name), run=False)  # precision is the point, not the values
        monkeypatch.setattr(kt, name, recs[name])
    old = _set_tf32(not cudnn, cudnn)
    try:
        dev = "cuda" if CUDA else "cpu"  # compiled Triton takes CUDA tensors; the interpreter CPU ones
        x = randn(rng, 1, 3, 6, 5, dtype=torch.float32, device=dev, requires_grad=True)
        w = randn(rng, 4, 3, 3, 3, dtype=torch.float32, device=dev, requires_grad=True)
        with gpu_nn.backend("triton"):
            y = F.conv2d(x, w, padding=1)
            torch.autograd.grad(y, (x, w), torch.ones_like(y))
        want = "tf32" if cudnn else "ieee"
        for name, rec in recs.items():
            assert [k["PREC"] for k in rec.launches] == [want], name
        assert od._tf32_allowed() is (not cudnn)
    finally:
        _set_tf32(*old)
    old_mm = torch.get_float32_matmul_precision()
    try:
        for prec, want in (("highest", False), ("high", True), ("medium", True)):
            torch.set_float32_matmul_precision(prec)
            assert od._tf32_allowed() is want
    finally:
        torch.set_float32_matmul_precision(old_mm)


def _tf32_bound(red: int) -> float:
    """The tolerance of a float32 result whose operands were cut to TF32 (10 explicit mantissa
    bits, machine epsilon 2^-10 as float16) and accumulated in float32 over ``red`` terms:
    helpers.tol's formula with TF32's epsilon in place of the output dtype's. Triton's "tf32"
    truncates (the MMA drops the low 13 bits; no round-to-nearest as in cuBLAS / cuDNN), so an
    operand is off by < 2^-10 and a product by < 2 x 2^-10, inside the 4 x 2^-10 term.

    Only compiled kernels cut operands (a GPU: Triton runs on CUDA tensors wherever there is
    one): the interpreter's dot is a float32 matmul whatever ``input_precision`` says, and its
    TMA descriptors do not round (``round_f32_to_tf32`` is never set), so there the bound is
    float32's, 170x tighter at 576 terms (an audit: outputs rounded to bfloat16 passed the TF32
    bound here)."""
    if not CUDA:
        return tol(torch.float32, red)
    return 4 * 2.0 ** -10 + 8 * EPS[torch.float32] * max(red, 1) ** 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists only on a GPU (the interpreter computes float32)")
@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_tf32_error_bound_on_gpu(backend, device, rng):
    """With torch's default (cudnn.allow_tf32 on) a float32 conv's operands are cut to TF32:
    10 explicit mantissa bits (truncated in Triton: relative error < 2^-10) with float32
    accumulation, so the error bound is float16's: 4 ulps of a 10-bit mantissa plus the float32 floor."""
    old = _set_tf32(False, True)
    try:
        xs, ws = (2, 64, 13, 11), (48, 64, 3, 3)
        k = ws[1] * ws[2] * ws[3]
        x64, w64, b64 = randn(rng, *xs), randn(rng, *ws) / k ** 0.5, randn(rng, ws[0])
        leaves64 = [t.clone().requires_grad_() for t in (x64, w64, b64)]
        with gpu_nn.backend("reference"):
            yr = F.conv2d(*leaves64, padding=1)
            g64 = randn(rng, *yr.shape)
            gr = torch.autograd.grad(yr, leaves64, g64)
        leaves = [t.to(device, torch.float32).requires_grad_() for t in (x64, w64, b64)]
        with gpu_nn.backend(backend):
            y = F.conv2d(*leaves, padding=1)
            gs = torch.autograd.grad(y, leaves, g64.to(device, torch.float32))
        assert max_rel_err(y, yr) <= _tf32_bound(k)
        red_bwd = yr.numel() // ws[0] + ws[0] * k
        for a, e in zip(gs, gr):
            assert max_rel_err(a, e) <= _tf32_bound(red_bwd)
    finally:
        _set_tf32(*old)


# ----------------------------------------------------------------------------- measured configurations

@pytest.fixture
def tune_cache(tmp_path, monkeypatch):
    from gpu_nn import _tuning

    monkeypatch.setenv(_tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    _tuning.clear()
    yield tmp_path / "tuning.json"
    _tuning.clear()


def _need_triton():
    """Skip, saying why, where the Triton backend cannot run (neither a GPU nor the interpreter)."""
    ok, why = gpu_nn._backend.status("triton")
    if not ok:
        pytest.skip(f"triton backend unavailable here: {why}")


def _small_conv(rng, dtype, layout="contig", c=5, o=7):
    """A small odd image: [1, c, 7, 5] * [o, c, 3, 3], padding 1, bias, relu (one program per
    candidate tile); channels_last lays out the input and the weight."""
    x64, w64, b64 = randn(rng, 1, c, 7, 5), randn(rng, o, c, 3, 3) / (9 * c) ** 0.5, randn(rng, o)
    with gpu_nn.backend("reference"):
        yr = F.conv2d(x64, w64, b64, padding=1, activation="relu")
    dev = "cuda" if CUDA else "cpu"
    return (_layout(x64.to(dev, dtype), layout), _layout(w64.to(dev, dtype), layout), b64.to(dev, dtype)), yr


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("part", ["fwd", "dgrad", "wgrad"])
def test_tuning_launches_the_timed_winner_and_caches_it(part, tune_cache, monkeypatch, rng):
    """With a forced chooser and a fake clock, the forward (or the input gradient) times every
    candidate once, launches the fastest, keeps it (memory and disk), and the next call with
    the same problem launches the winner straight away; the result matches the reference."""
    from gpu_nn import _tuning
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    # the problem's own list (_small_conv makes one output tile: the split candidates are offered)
    (x, w, b), yr = _small_conv(np.random.default_rng(0), torch.float32)
    if part == "fwd":
        cands = kt.problem_candidates(x, w, b, torch.empty(yr.shape), 1, "ieee")
        assert cands[:len(kt.fwd_candidates(False))] == kt.fwd_candidates(False)
    elif part == "dgrad":
        cands = kt.dgrad_problem_candidates(torch.empty(yr.shape), w, x, 1, "ieee")
        assert cands[:len(kt.dgrad_candidates(False))] == kt.dgrad_candidates(False)
    else:
        cands = kt.wgrad_candidates(False, 5, 9)
    # 5 channels: the packed (channel, tap) forms of the forward's and the weight gradient's
    # tiles are offered (last); the split forms of the forward's and the input gradient's
    assert 2 <= len(cands) <= 8 and len(set(cands)) == len(cands)
    assert any(kt.SPLIT in c for c in cands) is (part != "wgrad")
    assert (kt.PACKED in cands[-1]) is (part != "dgrad") and (kt.SPLIT in cands[-1]) is (part == "dgrad")
    winner = cands[-1]  # not the heuristic's choice: the clock decides
    recs = {p: _Recorder(getattr(kt, f"_conv_{p}_kernel")) for p in ("fwd", "dgrad", "wgrad")}
    for p, rec in recs.items():
        monkeypatch.setattr(kt, f"_conv_{p}_kernel", rec)
    rec = recs[part]
    cfg_of = lambda k: ((k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], k["num_warps"], k["num_stages"])  # noqa: E731
                        + ((kt.FLAT,) if k.get("FLAT_K") else ())
                        + ((kt.SPLIT,) if k.get("SPLIT_K") or k.get("SPLIT_T") else ())
                        + ((kt.PACKED,) if k.get("PACKED_K") or k.get("PACKED_N") else ()))
    timed = []

    def timer(fn):
        n = len(rec.launches)
        fn()
        if len(rec.launches) == n:  # the other part's candidate: any constant clock
            return 1.0
        timed.append(cfg_of(rec.launches[n]))
        return 1.0 if timed[-1] == winner else 2.0 + len(timed)

    monkeypatch.setattr(oc, "_chooser", lambda device: functools.partial(_tuning.choose, device=device, timer=timer, force=True))
    (x, w, b), yr = _small_conv(rng, torch.float32)
    x.requires_grad_(part == "dgrad")
    w.requires_grad_(part == "wgrad")
    g = randn(rng, *yr.shape, dtype=torch.float32, device=x.device)
    # the reduction length of each result element (the tolerance's k): the forward sums 9 taps x
    # 5 channels, dgrad 9 taps x 7 output channels, wgrad the 7 x 5 output pixels
    kred = {"fwd": 45, "dgrad": 7 * 9 + 35, "wgrad": 35 + 35}[part]
    if part != "fwd":
        with gpu_nn.backend("reference"):
            x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            yr64 = F.conv2d(x64, w64, b.double(), padding=1, activation="relu")
            want = torch.autograd.grad(yr64, x64 if part == "dgrad" else w64, g.double())[0]

    def call(x):
        with gpu_nn.backend("triton"):
            y = F.conv2d(x, w, b, padding=1, activation="relu")
            return y if part == "fwd" else torch.autograd.grad(y, x if part == "dgrad" else w, g)[0]

    got = call(x)
    assert sorted(timed) == sorted(cands)
    assert cfg_of(rec.launches[-1]) == winner and len(rec.launches) == len(cands) + 1
    assert winner in [tuple(v) for d in json.loads(tune_cache.read_text()).values() for v in d.values()]
    assert_close(got, yr if part == "fwd" else want, torch.float32, kred, "tuned")
    timed.clear()
    rec.launches.clear()
    got = call(x)
    assert timed == [] and [cfg_of(k) for k in rec.launches] == [winner]
    assert_close(got, yr if part == "fwd" else want, torch.float32, kred, "cached")
    # another layout is another problem: measured again
    call(_layout(x.detach(), "channels_last").requires_grad_(part == "dgrad"))
    assert sorted(timed) == sorted(cands)


def test_heuristic_serves_where_nothing_can_be_measured(monkeypatch):
    from gpu_nn.ops import conv as oc

    assert oc._chooser(torch.device("cpu")) is None
    monkeypatch.setenv("GPU_NN_TUNE", "0")
    assert oc._chooser(torch.device("cuda", 0)) is None


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_every_candidate_matches_reference(half, monkeypatch, rng):
    """Each configuration a measuring chooser may pick, launched on its own (under the
    interpreter on a CPU machine) against the reference: the generic forward candidates on NCHW
    and channels_last inputs with odd channel counts, the NHWC tiles on a channels_last problem
    with 16 / 32 channels (the specialisation they are compiled for), the dgrad candidates."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    dtype = torch.float16 if half else torch.float32
    problems = [("contig", 5, 7, False), ("channels_last", 5, 7, False), ("channels_last", 16, 32, True)]
    for layout, c, o, nhwc in problems:
        for cand in kt.fwd_candidates(half, nhwc):
            if nhwc and cand in kt.fwd_candidates(half, False):
                continue  # run above
            def pick(op, key, candidates, run, default, cand=cand, **_):
                assert cand in candidates
                return cand
            monkeypatch.setattr(oc, "_chooser", lambda device: pick)
            # float32 gets the NHWC tiles under TF32 only (the interpreter may emulate its rounding)
            tf32 = nhwc and not half
            monkeypatch.setattr(oc, "_precision", lambda dt, tf32=tf32: "tf32" if tf32 and dt == torch.float32 else "ieee")
            (x, w, b), yr = _small_conv(rng, dtype, layout, c, o)
            y4 = torch.empty(1, o, 7, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
            assert kt.nhwc_specialised(x, w, b, y4, c, o) is nhwc
            with gpu_nn.backend("triton"):
                y = F.conv2d(x, w, b, padding=1, activation="relu")
            if tf32:
                assert max_rel_err(y, yr) <= _tf32_bound(9 * c), f"forward {cand} {layout} C={c} (tf32)"
            else:
                assert_close(y, yr, dtype, 9 * c, f"forward {cand} {layout} C={c}")
    # the input gradient's candidates (the heuristic's table), on the odd NCHW problem
    monkeypatch.setattr(oc, "_precision", lambda dt: "ieee")
    (x, w, b), _ = _small_conv(rng, dtype)
    g64 = randn(rng, 1, 7, 7, 5, device=x.device)  # x64 (the reference's leaf) is on x's device
    with gpu_nn.backend("reference"):
        x64 = x.detach().double().requires_grad_()
        want = torch.autograd.grad(F.conv2d(x64, w.double(), b.double(), padding=1), x64, g64)[0]
    x.requires_grad_()
    for cand in kt.dgrad_candidates(half):
        monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand: (lambda op, key, cs, run, default, **_: cand if op == "conv_dgrad" else default))
        with gpu_nn.backend("triton"):
            got = torch.autograd.grad(F.conv2d(x, w, b, padding=1), x, g64.to(x.device, dtype))[0]
        assert_close(got, want, dtype, 63, f"dgrad {cand}")
    # ... and the weight gradient's (NCHW and channels_last: the K split differs per tile)
    for layout in ("contig", "channels_last"):
        (x, w, b), _ = _small_conv(rng, dtype, layout)
        with gpu_nn.backend("reference"):
            w64 = w.detach().double().requires_grad_()
            want = torch.autograd.grad(F.conv2d(x.double(), w64, b.double(), padding=1), w64, g64)[0]
        w.requires_grad_()
        for cand in kt.wgrad_candidates(half):
            monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand: (
                lambda op, key, cs, run, default, **_: cand if op == "conv_wgrad" else default))
            with gpu_nn.backend("triton"):
                got = torch.autograd.grad(F.conv2d(x, w, b, padding=1), w, g64.to(x.device, dtype))[0]
            assert_close(got, want, dtype, 35, f"wgrad {cand} {layout}")


@pytest.mark.parametrize("layout", ["contig", "channels_last"])
def test_depthwise_forward_candidates_through_the_chooser(layout, monkeypatch, rng):
    """A depthwise forward asks a measuring chooser (op "conv_dw_fwd") to pick among
    DW_FWD_CANDIDATES, the heuristic's DW_CONFIG as the default, under a key that names the
    problem; every candidate, run as the chooser runs it, rewrites y in full with the
    reference's values (float32 and float16, conv2d with a channel multiplier and a bias, and
    conv1d; stride, padding and dilation); the backward keeps its single configuration."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    asked = []

    def chooser(op, key, candidates, run, default, prepare=None):
        asked.append((op, key, tuple(candidates), default))
        if op != "conv_dw_fwd":
            return default
        for c in candidates:
            run(c)
        return candidates[-1]

    monkeypatch.setattr(oc, "_chooser", lambda device: chooser)
    cases = [(2, (2, 3, 9, 7), (6, 1, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=3)),
             (1, (3, 5, 11), (5, 1, 3), dict(stride=1, padding=2, dilation=2, groups=5))]
    for nd, xs, ws, kw in cases:
        for dtype in (torch.float32, torch.float16):
            x64, w64, b64 = randn(rng, *xs), randn(rng, *ws), randn(rng, ws[0])
            fn = F.conv2d if nd == 2 else F.conv1d
            with gpu_nn.backend("reference"):
                want = fn(*(t.to(dtype).double() for t in (x64, w64, b64)), **kw)
            x = _layout(x64.to(dtype), layout) if nd == 2 else x64.to(dtype)
            runs = []
            real = kt._launcher

            def spy(kernel, grid, warm, _real=real):
                launch = _real(kernel, grid, warm)
                return lambda *a, **k: (runs.append((k.get("BLOCK_P"), k.get("BLOCK_C"), k.get("num_warps")))
                                        if getattr(kernel, "fn", kernel).__name__ == "_conv_dw_fwd_kernel" else None,
                                        launch(*a, **k))[1]
            monkeypatch.setattr(kt, "_launcher", spy)
            asked.clear()
            with gpu_nn.backend("triton"):
                y = fn(x, w64.to(dtype), b64.to(dtype), **kw)
            op, key, cands, default = asked[-1]
            assert op == "conv_dw_fwd" and cands == kt.DW_FWD_CANDIDATES and default == kt.dw_config(True)
            assert str(dtype) in key and key[9] == kw["groups"]  # the forward's problem key
            # each candidate once as the chooser ran it, then the choice (the last) for the call itself
            assert runs == [*kt.DW_FWD_CANDIDATES, kt.DW_FWD_CANDIDATES[-1]], runs
            assert_close(y, want, dtype, math.prod(ws[2:]), f"depthwise {nd}d {layout} {dtype}")
            # each candidate on its own (the suite's GPU_NN_POISON fills y with NaN first: every
            # element written)
            for cand in kt.DW_FWD_CANDIDATES:
                monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand: (
                    lambda op, key, cs, run, default, **_: cand if op == "conv_dw_fwd" else default))
                with gpu_nn.backend("triton"):
                    got = fn(x, w64.to(dtype), b64.to(dtype), **kw)
                assert_close(got, want, dtype, math.prod(ws[2:]), f"depthwise {cand} {nd}d {layout} {dtype}")
            monkeypatch.setattr(oc, "_chooser", lambda device: chooser)
            monkeypatch.setattr(kt, "_launcher", real)
    # the backward asks for nothing of its depthwise kernels
    x = randn(rng, 2, 3, 9, 7, requires_grad=True)
    asked.clear()
    with gpu_nn.backend("triton"):
        F.conv2d(x, randn(rng, 6, 1, 3, 3), groups=3).sum().backward()
    assert [a[0] for a in asked] == ["conv_dw_fwd"]


def _spy_launches(kt, monkeypatch) -> list:
    """(kernel name, grid) of every launch the conv launchers plan from here on."""
    launched = []
    real = kt._launching

    def spy(kernel, grid):
        launched.append((getattr(kernel, "fn", kernel).__name__, grid))
        return real(kernel, grid)

    monkeypatch.setattr(kt, "_launching", spy)
    return launched


# (kernel, conv kwargs) of the split-K forward: 6 taps; 25 taps in 16 splits of two K trips,
# the last three splits past the K loop's end (a mutation audit: that bound went untested)
SPLIT_K_KERNELS = [((3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), activation="tanh")),
                   ((5, 5), dict(stride=(2, 1), padding=(2, 2), activation="tanh"))]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("kernel,kw", SPLIT_K_KERNELS, ids=["3x2", "5x5"])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_split_k_candidates_match_reference(half, kernel, kw, monkeypatch, rng):
    """The split-K forward candidates (problem_candidates offers them to one-group problems with
    few output tiles), forced: partial products over grid axis 2 into the float32 workspace,
    then the reduce + bias + activation pass; against the reference on an odd NCHW problem and a
    channels_last one in the NHWC specialisation, with stride / dilation / padding, and every
    split launched (two or more), splits past the K loop's end too."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    dtype = torch.float16 if half else torch.float32
    launched = _spy_launches(kt, monkeypatch)
    for layout, c, o, nhwc in (("contig", 5, 7, False), ("channels_last", 16, 32, True)):
        tf32 = nhwc and not half  # float32 gets the NHWC tiles under TF32 only
        monkeypatch.setattr(oc, "_precision", lambda dt, tf32=tf32: "tf32" if tf32 and dt == torch.float32 else "ieee")
        taps = kernel[0] * kernel[1]
        x64, w64, b64 = randn(rng, 2, c, 9, 7), randn(rng, o, c, *kernel) / (taps * c) ** 0.5, randn(rng, o)
        with gpu_nn.backend("reference"):
            yr = F.conv2d(x64, w64, b64, **kw)
        dev = "cuda" if CUDA else "cpu"
        x, w, b = _layout(x64.to(dev, dtype), layout), _layout(w64.to(dev, dtype), layout), b64.to(dev, dtype)
        y4 = torch.empty(yr.shape, dtype=dtype, device=dev).contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
        cands = [cand for cand in kt.problem_candidates(x, w, b, y4, 1, oc._precision(dtype)) if kt.SPLIT in cand]
        assert cands and all(cand[5:] == (kt.FLAT, kt.SPLIT) for cand in cands)
        assert kt.nhwc_specialised(x, w, b, y4, c, o) is nhwc
        for cand in cands:
            monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand: (
                lambda op, key, candidates, run, default, **_: cand if op == "conv_fwd" else default))
            launched.clear()
            with gpu_nn.backend("triton"):
                y = F.conv2d(x, w, b, **kw)
            names = [nm for nm, _ in launched]
            assert names == ["_conv_fwd_kernel", "_conv_splitk_reduce_kernel"], names
            assert launched[0][1][2] >= 2, f"{cand}: {launched[0][1]} (no split)"
            if taps == 25:  # (16 splits of the K loop's 25 trips or more: some past its end)
                assert launched[0][1][2] == 16, launched
            if tf32:
                assert max_rel_err(y, yr) <= _tf32_bound(taps * c), f"split {cand} {layout} (tf32)"
            else:
                assert_close(y, yr, dtype, taps * c, f"split {cand} {layout}")


# (kernel, conv kwargs) of the tap-split input gradient: 6 taps split within residue classes;
# 25 taps in 16 splits of 2, the last three splits past the last tap (a mutation audit: their
# bound went untested, every case's splits dividing its taps)
DGRAD_SPLIT_KERNELS = [((3, 2), dict(stride=(3, 2), padding=(1, 0), dilation=(1, 2))),
                       ((5, 5), dict(stride=(2, 1), padding=(2, 2)))]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("kernel,kw", DGRAD_SPLIT_KERNELS, ids=["3x2", "5x5"])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_dgrad_split_candidates_match_reference(half, kernel, kw, monkeypatch, rng):
    """The input gradient's tap-split candidates (dgrad_problem_candidates), forced: whole taps
    per split into the float32 workspace, then summed into dx; against the reference gradient
    on an odd NCHW problem and a channels_last one in the NHWC specialisation, with stride,
    dilation and padding, every split launched (two or more), splits past the last tap too."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    dtype = torch.float16 if half else torch.float32
    launched = _spy_launches(kt, monkeypatch)
    dev = "cuda" if CUDA else "cpu"
    for layout, c, o, nhwc in (("contig", 5, 7, False), ("channels_last", 16, 32, True)):
        tf32 = nhwc and not half
        monkeypatch.setattr(oc, "_precision", lambda dt, tf32=tf32: "tf32" if tf32 and dt == torch.float32 else "ieee")
        taps = kernel[0] * kernel[1]
        x64, w64 = randn(rng, 2, c, 9, 7), randn(rng, o, c, *kernel) / (taps * c) ** 0.5
        with gpu_nn.backend("reference"):
            xr = x64.clone().requires_grad_()
            yr = F.conv2d(xr, w64, None, **kw)
            g64 = randn(rng, *yr.shape)
            want = torch.autograd.grad(yr, xr, g64)[0]
        x = _layout(x64.to(dev, dtype), layout).requires_grad_()
        w = _layout(w64.to(dev, dtype), layout)
        g = _layout(g64.to(dev, dtype), layout)
        dx_like = torch.empty_like(x)
        cands = [cd for cd in kt.dgrad_problem_candidates(g, w, dx_like, 1, oc._precision(dtype)) if kt.SPLIT in cd]
        offered = bool(kt.DGRAD_SPLIT[("half" if half else "fp32", nhwc)])
        assert bool(cands) is offered and all(cd[5:] == (kt.SPLIT,) for cd in cands)
        assert kt.dgrad_nhwc_specialised(g, w, dx_like, c, o) is nhwc
        for cand in cands:
            monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand: (
                lambda op, key, candidates, run, default, **_: cand if op == "conv_dgrad" else default))
            with gpu_nn.backend("triton"):
                y = F.conv2d(x, w, None, **kw)
                launched.clear()
                got = torch.autograd.grad(y, x, g)[0]
            dgrad = [grid for nm, grid in launched if nm == "_conv_dgrad_kernel"]
            assert len(dgrad) == 1 and dgrad[0][2] >= 2, launched
            if taps == 25:  # (16 splits of two taps: the last three start past the last tap)
                assert dgrad[0][2] == 16, launched
            assert "_conv_splitk_reduce_kernel" in [nm for nm, _ in launched]
            if tf32:
                assert max_rel_err(got, want) <= _tf32_bound(taps * o), f"dgrad split {cand} {layout} (tf32)"
            else:
                assert_close(got, want, dtype, taps * o, f"dgrad split {cand} {layout}")


# Few channels per group: the packed (channel, tap) forms and the nested ones, both directions of
# every option the packed index math touches (stride, padding, dilation, groups, 'same', conv1d,
# both layouts). (nd, input shape, weight shape, kwargs, layout)
PACKED_CASES = [
    (2, (1, 3, 9, 8), (5, 3, 7, 7), dict(stride=2, padding=3, activation="relu"), "contig"),
    (2, (2, 3, 7, 6), (5, 3, 5, 3), dict(stride=2, padding=(2, 1)), "channels_last"),
    (2, (1, 6, 9, 8), (4, 3, 2, 5), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), "noncontig"),
    (2, (2, 2, 7, 6), (3, 2, 3, 3), dict(padding="same", dilation=2, activation="sigmoid"), "channels_last"),
    (1, (3, 5, 29), (7, 5, 5), dict(padding=2, stride=3, activation="tanh"), "contig"),
]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
@pytest.mark.parametrize("nd,xs,ws,kw,layout", PACKED_CASES, ids=[f"case{i}" for i in range(len(PACKED_CASES))])
def test_packed_and_nested_forms_match_reference(half, nd, xs, ws, kw, layout, monkeypatch, rng):
    """Each forward and weight-gradient tile a measuring chooser may pick for a problem with few
    channels per group, forced, in its packed form (the K loop, or the weight gradient's
    columns, over (channel, tap) pairs) and in its nested form (a channel block per tap), against
    the float64 reference; the heuristic (no chooser) takes the packed forms here."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    dtype = torch.float16 if half else torch.float32
    dev = "cuda" if CUDA else "cpu"
    fn = F.conv2d if nd == 2 else F.conv1d
    cg, taps = ws[1], int(np.prod(ws[2:]))
    x64, w64, b64 = randn(rng, *xs), randn(rng, *ws) / (cg * taps) ** 0.5, randn(rng, ws[0])
    with gpu_nn.backend("reference"):
        leaves = [t.clone().requires_grad_() for t in (x64, w64)]
        yr = fn(leaves[0], leaves[1], b64, **kw)
        g64 = randn(rng, *yr.shape)
        wr = torch.autograd.grad(yr, leaves[1], g64)[0]
    x = _layout(x64.to(dev, dtype), layout)
    w = _layout(w64.to(dev, dtype), layout).requires_grad_()
    b, g = b64.to(dev, dtype), g64.to(dev, dtype)
    red_w = yr.numel() // ws[0]  # each weight gradient element sums over batch and output pixels
    offered = {}

    def forcing(part, cand):
        def choose(op, key, candidates, run, default, **_):
            offered[op] = candidates
            return cand if op == part else default
        return choose

    key = "half" if half else "fp32"
    table = {**kt.GPU_CONFIGS[key], **kt.TUNE_CONFIGS[key]}
    fwd_tiles = [table[n] for n in kt.FWD_PACKED[key]]
    for part, tiles in (("conv_fwd", fwd_tiles), ("conv_wgrad", kt.wgrad_candidates(half))):
        for tile in tiles:
            for cand in (tile, (*tile, kt.PACKED)):
                monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand, part=part: forcing(part, cand))
                with gpu_nn.backend("triton"):
                    y = fn(x, w, b, **kw)
                    gw = torch.autograd.grad(y, w, g)[0]
                assert cand in offered[part], (part, cand)
                if part == "conv_fwd":
                    assert_close(y, yr, dtype, cg * taps, f"forward {cand}")
                else:
                    assert_close(gw, wr, dtype, red_w, f"weight gradient {cand}")
    # no chooser: the heuristic's tiles, packed (at most half of each channel block used)
    monkeypatch.setattr(oc, "_chooser", lambda device: None)
    recs = {p: _Recorder(getattr(kt, f"_conv_{p}_kernel")) for p in ("fwd", "wgrad")}
    for p, rec in recs.items():
        monkeypatch.setattr(kt, f"_conv_{p}_kernel", rec)
    with gpu_nn.backend("triton"):
        y = fn(x, w, b, **kw)
        gw = torch.autograd.grad(y, w, g)[0]
    assert [k["PACKED_K"] for k in recs["fwd"].launches] == [True]
    assert [k["PACKED_N"] for k in recs["wgrad"].launches] == [True]
    assert_close(y, yr, dtype, cg * taps, "forward (heuristic)")
    assert_close(gw, wr, dtype, red_w, "weight gradient (heuristic)")


def test_packed_forms_only_for_few_channels():
    """The packed forms are offered where a tile's channel block (the forward's BLOCK_K, the
    weight gradient's BLOCK_N) is not filled and there is more than one tap, and chosen by the
    heuristic where at least half of it would be idle: the RGB stem (3 channels, 7x7) goes from
    49 trips of its K loop to 5 (half, BLOCK_K 32) and its weight gradient from 49 column
    programs to 3 (BLOCK_N 64)."""
    from gpu_nn.kernels.triton import conv as kt

    assert kt.packs(3, 49, 32) and kt.packs(16, 9, 32) and kt.packs(8, 9, 16)
    assert not kt.packs(17, 9, 32) and not kt.packs(3, 1, 32) and not kt.packs(64, 9, 32)
    assert kt.packed_offered(31, 9, 32) and not kt.packed_offered(32, 9, 32) and not kt.packed_offered(3, 1, 32)
    for dtype in (torch.float32, torch.float16):
        key = "half" if dtype == torch.float16 else "fp32"
        table = {**kt.GPU_CONFIGS[key], **kt.TUNE_CONFIGS[key]}

        def new(*shape):
            return torch.empty(shape, dtype=dtype)

        stem = new(2, 3, 16, 16), new(64, 3, 7, 7), None, new(2, 64, 8, 8)
        packed = [c for c in kt.problem_candidates(*stem, 1, "ieee") if kt.PACKED in c]
        assert packed == [(*table[n], kt.PACKED) for n in kt.FWD_PACKED[key]]
        wide = new(2, 64, 8, 8), new(64, 64, 3, 3), None, new(2, 64, 8, 8)
        assert not any(kt.PACKED in c for c in kt.problem_candidates(*wide, 1, "ieee"))
        one_tap = new(2, 3, 8, 8), new(64, 3, 1, 1), None, new(2, 64, 8, 8)
        assert not any(kt.PACKED in c for c in kt.problem_candidates(*one_tap, 1, "ieee"))
        plain = kt.wgrad_candidates(key == "half")
        assert kt.wgrad_candidates(key == "half", 3, 49) == plain + [(*c, kt.PACKED) for c in plain]
        assert kt.wgrad_candidates(key == "half", 64, 9) == plain
    bk, bn = kt.GPU_CONFIGS["half"]["large"][2], kt.GPU_CONFIGS["half"]["medium"][1]
    assert (49 * kt.cdiv(3, bk), kt.cdiv(3 * 49, bk)) == (49, 5)
    assert (49 * kt.cdiv(3, bn), kt.cdiv(3 * 49, bn)) == (49, 3)


# (input shape, weight shape, padding [t, b, l, r], dilation, bias, activation, weight layout,
# output layout, stride; the input channels_last, as the kernel takes it) for the TMA forward:
# blocks cut by the image's edge on both sides, padding that reaches past a whole box, a 1x1 and
# a dilated kernel, NCHW and channels_last weights and outputs; strided (H and W multiples of
# the stride): ResNet's 3x3/2, a 1x1 of unequal strides, a dilated non-square kernel whose
# offsets fall in every residue class
TMA_CASES = [  # 64 channels: a whole number of channel blocks for every GPU tile too
    ((1, 64, 9, 10), (24, 64, 3, 3), (1, 1, 1, 1), (1, 1), True, "relu", "channels_last", "contig", (1, 1)),
    ((1, 64, 5, 7), (16, 64, 3, 2), (2, 2, 0, 1), (2, 1), False, None, "channels_last", "channels_last", (1, 1)),
    ((2, 64, 4, 6), (8, 64, 1, 1), (0, 0, 0, 0), (1, 1), True, "tanh", "channels_last", "channels_last", (1, 1)),
    ((1, 64, 6, 5), (20, 64, 3, 3), (3, 3, 3, 3), (1, 1), True, "sigmoid", "channels_last", "contig", (1, 1)),
    ((2, 64, 8, 10), (16, 64, 3, 3), (1, 1, 1, 1), (1, 1), True, "relu", "channels_last", "contig", (2, 2)),
    ((1, 64, 9, 6), (8, 64, 1, 1), (0, 0, 0, 0), (1, 1), False, None, "contig", "channels_last", (3, 2)),
    ((1, 64, 6, 8), (12, 64, 3, 2), (2, 1, 0, 1), (2, 1), True, "tanh", "channels_last", "channels_last", (2, 2)),
]


def _tma_here() -> str:
    _need_triton()
    if CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA and wgmma need compute capability 9.0")
    return "cuda" if CUDA else "cpu"


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("half", [False, True], ids=["tf32", "half"])
@pytest.mark.parametrize("case", TMA_CASES, ids=[f"case{i}" for i in range(len(TMA_CASES))])
def test_tma_forward_matches_reference(half, case, rng):
    """The TMA forward launched directly (on a CPU machine in the interpreter with its small
    tile, on a GPU with every TMA_CONFIGS tile whose channel block fits) against the float64
    reference: the image's edge inside the pixel blocks, padding larger than the kernel's reach,
    dilation, a non-square kernel, bias and activation, NCHW and channels_last weights (the
    (tap, channel) view or a copy) and outputs, stride 1 and the strided form."""
    from gpu_nn.kernels.triton import conv as kt

    dev = _tma_here()
    xs, ws, pad, dil, has_bias, act, wl, yl, st = case
    dtype = torch.float16 if half else torch.float32
    x64, w64 = randn(rng, *xs), randn(rng, *ws) / (ws[1] * ws[2] * ws[3]) ** 0.5
    b64 = randn(rng, ws[0]) if has_bias else None
    with gpu_nn.backend("reference"):
        yr = F.conv2d(TF.pad(x64, (pad[2], pad[3], pad[0], pad[1])), w64, b64, stride=st, dilation=dil, activation=act)
    x = _layout(x64.to(dev, dtype), "channels_last")
    w = _layout(w64.to(dev, dtype), wl)
    b = b64.to(dev, dtype) if has_bias else None
    key = "half" if half else "fp32"
    table = kt.TMA_CONFIGS[key] if st == (1, 1) else {n: kt.TMA_CONFIGS[key][n] for n in (kt.TMA_STRIDED["fwd"],)}
    cfgs = [kt.TMA_INTERP_CONFIG] if dev == "cpu" else [(*c, kt.TMA) for c in table.values()]
    assert all(xs[1] % cfg[3] == 0 for cfg in cfgs) and kt._tma_describable(x, st)
    for cfg in cfgs:
        y = _layout(torch.full(yr.shape, float("nan"), dtype=dtype, device=dev), yl)
        kt._tma_forward(cfg, x, w, b, y, st, pad, dil, act, "ieee" if half else "tf32")
        red = ws[1] * ws[2] * ws[3]
        if half:
            assert_close(y, yr, dtype, red, f"TMA forward {cfg}")
        else:
            assert max_rel_err(y, yr) <= _tf32_bound(red), f"TMA forward {cfg} (tf32)"


# (input shape, weight shape, padding [t, b, l, r], dilation, input-gradient layout, a
# non-finite weight, stride) for the TMA input gradient (g channels_last, as the kernel takes
# it); strided (dilation 1): residue classes short of a row (odd sizes), a 1x1 kernel whose
# other classes no tap reaches (zero gradient), stride 3 with a non-finite weight
TMA_DGRAD_CASES = [  # 64 output channels: a whole number of channel blocks for every GPU tile too
    ((1, 24, 9, 10), (64, 24, 3, 3), (1, 1, 1, 1), (1, 1), "contig", False, (1, 1)),
    ((1, 8, 5, 7), (64, 8, 3, 2), (2, 2, 0, 1), (2, 1), "channels_last", False, (1, 1)),
    ((2, 8, 4, 6), (64, 8, 1, 1), (0, 0, 0, 0), (1, 1), "channels_last", False, (1, 1)),
    ((1, 16, 6, 5), (64, 16, 3, 3), (3, 3, 3, 3), (1, 1), "contig", False, (1, 1)),
    ((1, 8, 7, 6), (64, 8, 3, 3), (1, 1, 1, 1), (1, 1), "contig", True, (1, 1)),
    ((1, 8, 9, 10), (64, 8, 3, 3), (1, 1, 1, 1), (1, 1), "channels_last", False, (2, 2)),
    ((1, 8, 7, 8), (64, 8, 1, 1), (0, 0, 0, 0), (1, 1), "contig", False, (2, 3)),
    ((1, 8, 11, 9), (64, 8, 5, 3), (2, 2, 1, 1), (1, 1), "contig", True, (3, 2)),
]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("half", [False, True], ids=["tf32", "half"])
@pytest.mark.parametrize("case", TMA_DGRAD_CASES, ids=[f"case{i}" for i in range(len(TMA_DGRAD_CASES))])
def test_tma_dgrad_matches_reference(half, case, rng):
    """The TMA input gradient launched directly (interpreter tile on a CPU machine, every
    DGRAD_TMA_CONFIGS tile whose channel block fits on a GPU) against the float64 reference:
    pixel blocks cut by the image's edge, padding past the kernel's reach (output pixels no tap
    reaches), dilation, a non-square and a 1x1 kernel, NCHW and channels_last gradients; with an
    infinite weight, non-finite values exactly at the pixels its tap reaches (the zero rows the
    copy engine fills in for the other pixels never meet it); strided, the pixels by residue
    class, each class's taps alone."""
    from gpu_nn.kernels.triton import conv as kt

    dev = _tma_here()
    xs, ws, pad, dil, dl, nonfinite, st = case
    dtype = torch.float16 if half else torch.float32
    x64, w64 = randn(rng, *xs), randn(rng, *ws) / (ws[0] * ws[2] * ws[3]) ** 0.5
    if nonfinite:
        w64[3, 2, 0, 2] = float("inf")
    with gpu_nn.backend("reference"):
        xl = x64.clone().requires_grad_()
        yr = F.conv2d(TF.pad(xl, (pad[2], pad[3], pad[0], pad[1])), w64, stride=st, dilation=dil)
        g64 = randn(rng, *yr.shape)
        want = torch.autograd.grad(yr, xl, g64)[0]
    g = _layout(g64.to(dev, dtype), "channels_last")
    w = w64.to(dev, dtype)
    key = "half" if half else "fp32"
    table = kt.DGRAD_TMA_CONFIGS[key]
    table = table if st == (1, 1) else {n: table[n] for n in (kt.TMA_STRIDED["dgrad"],)}
    cfgs = [kt.DGRAD_TMA_INTERP_CONFIG] if dev == "cpu" else [(*c, kt.TMA) for c in table.values()]
    red = ws[0] * ws[2] * ws[3]
    assert all(ws[0] % cfg[3] == 0 for cfg in cfgs)
    for cfg in cfgs:
        dx = _layout(torch.full(xs, float("nan"), dtype=dtype, device=dev), dl)
        kt._tma_dgrad(cfg, g, w, dx, st, pad, dil, "ieee" if half else "tf32")
        got = dx.double().cpu()
        fin = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), fin), f"TMA dgrad {cfg}: non-finite pixels differ"
        if nonfinite:
            assert not fin.all() and fin.any()
            got, want_c = torch.where(fin, got, 0.0), torch.where(fin, want, 0.0)
        else:
            want_c = want
        if half:
            assert_close(got, want_c, dtype, red, f"TMA dgrad {cfg}")
        else:
            assert max_rel_err(got, want_c) <= _tf32_bound(red), f"TMA dgrad {cfg} (tf32)"


# (input shape, weight shape, padding [t, b, l, r], dilation, x layout, g layout, an infinite
# input pixel that no output pixel reaches through some taps, stride) for the TMA weight
# gradient; strided (H and W multiples of the stride): 24 channels (the last channel block
# reaches into the next residue's), dilation with stride 3, the infinite pixel reached by one tap
TMA_WGRAD_CASES = [
    ((2, 24, 9, 10), (16, 24, 3, 3), (1, 1, 1, 1), (1, 1), "channels_last", "channels_last", False, (1, 1)),
    ((1, 8, 5, 7), (32, 8, 3, 2), (2, 2, 0, 1), (2, 1), "channels_last", "contig", False, (1, 1)),
    ((3, 16, 4, 6), (8, 16, 1, 1), (0, 0, 0, 0), (1, 1), "contig", "contig", False, (1, 1)),
    ((1, 16, 11, 9), (24, 16, 3, 3), (0, 0, 0, 0), (1, 1), "channels_last", "channels_last", True, (1, 1)),
    ((2, 24, 8, 10), (16, 24, 3, 3), (1, 1, 1, 1), (1, 1), "channels_last", "channels_last", False, (2, 2)),
    ((1, 8, 9, 8), (32, 8, 3, 2), (2, 1, 0, 1), (2, 1), "contig", "contig", False, (3, 2)),
    ((1, 16, 12, 9), (24, 16, 4, 3), (0, 0, 0, 0), (1, 1), "channels_last", "channels_last", True, (2, 3)),
]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("half", [False, True], ids=["tf32", "half"])
@pytest.mark.parametrize("case", TMA_WGRAD_CASES, ids=[f"case{i}" for i in range(len(TMA_WGRAD_CASES))])
def test_tma_wgrad_matches_reference(half, case, rng):
    """The TMA weight gradient launched directly (interpreter tile on a CPU machine, every
    WGRAD_TMA_CONFIGS tile on a GPU) against the float64 reference: pixel blocks cut by the
    output's edge, padding, dilation, a non-square and a 1x1 kernel, x and g in either layout
    (NHWC copies where they are not), several pixel blocks per split and several splits; with an
    infinite input pixel in the last row, non-finite weight-gradient entries exactly for the
    taps whose output pixels reach it (the blocks' rows past the output's edge are zeroed
    before they meet g's zero fill)."""
    from gpu_nn.kernels.triton import conv as kt

    dev = _tma_here()
    xs, ws, pad, dil, xl, gl, nonfinite, st = case
    dtype = torch.float16 if half else torch.float32
    x64 = randn(rng, *xs)
    if nonfinite:
        x64[0, 3, xs[2] - 1, 4] = float("inf")  # valid conv: only the bottom taps reach the last row
    w64 = randn(rng, *ws) / (ws[1] * ws[2] * ws[3]) ** 0.5
    with gpu_nn.backend("reference"):
        wl = w64.clone().requires_grad_()
        yr = F.conv2d(TF.pad(x64, (pad[2], pad[3], pad[0], pad[1])), wl, stride=st, dilation=dil)
        g64 = randn(rng, *yr.shape)
        want = torch.autograd.grad(yr, wl, g64)[0]
    x = _layout(x64.to(dev, dtype), xl)
    g = _layout(g64.to(dev, dtype), gl)
    key = "half" if half else "fp32"
    table = kt.WGRAD_TMA_CONFIGS[key]
    table = table if st == (1, 1) else {n: table[n] for n in (kt.TMA_STRIDED["wgrad"],)}
    cfgs = [kt.WGRAD_TMA_INTERP_CONFIG] if dev == "cpu" else [(*c, kt.TMA) for c in table.values()]
    red = yr.numel() // ws[0]
    fin = torch.isfinite(want)
    assert fin.any() and fin.all() is not nonfinite
    for cfg in cfgs:
        dw = torch.full(ws, float("nan"), dtype=dtype, device=dev)
        kt._tma_wgrad(cfg, g, x, dw, st, pad, dil, "ieee" if half else "tf32", dev == "cpu")
        got = dw.double().cpu()
        assert torch.equal(torch.isfinite(got), fin), f"TMA wgrad {cfg}: non-finite entries differ"
        got, want_c = torch.where(fin, got, 0.0), torch.where(fin, want, 0.0)
        if half:
            assert_close(got, want_c, dtype, red, f"TMA wgrad {cfg}")
        else:
            assert max_rel_err(got, want_c) <= _tf32_bound(red), f"TMA wgrad {cfg} (tf32)"


def test_tma_tiles_kept_from_the_chooser_on_a_triton_with_the_register_operand_race(monkeypatch):
    """Every pipelined TMA tile takes its wgmma's A operand from registers, which Triton before
    the upstream fix of issue 9433 may rewrite while a wgmma still reads them (3.6's PTX has no
    guarding moves, 3.9's has: tests/test_compile.py reads them): below TMA_RS_SAFE_FROM the
    measuring chooser gets no TMA tile of the forward, the input gradient or the weight gradient
    (tma_candidates itself, which the sweep times, still lists them)."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.kernels.triton._compat import triton_version

    assert kt.TMA_CHOOSER == (triton_version() >= kt.TMA_RS_SAFE_FROM) and kt.TMA_RS_SAFE_FROM == (3, 9)
    t = lambda *s, cl=True: torch.empty(s, dtype=torch.float16).to(  # noqa: E731
        memory_format=torch.channels_last if cl else torch.contiguous_format)
    x, w, y = t(2, 64, 28, 28), t(32, 64, 3, 3), t(2, 32, 28, 28, cl=False)
    g, w64 = t(2, 64, 28, 28), t(64, 32, 3, 3)
    monkeypatch.setattr(kt, "tma_device", lambda t: True)
    for chooser in (True, False):
        monkeypatch.setattr(kt, "TMA_CHOOSER", chooser)
        fwd = kt.problem_candidates(x, w, None, y, 1, "ieee", (1, 1))
        dgrad = kt.dgrad_problem_candidates(g, w64, t(2, 32, 28, 28), 1, "ieee", (1, 1))
        assert any(kt.TMA in c for c in fwd) is chooser and any(kt.TMA in c for c in dgrad) is chooser
        assert kt.tma_candidates(x, w, (1, 1), 1, "ieee")  # the sweep's list either way


def test_tma_weight_gradient_candidates_follow_the_gate_and_grid_y(rng, monkeypatch):
    """The weight gradient's chooser (conv_backward_weight's candidate list) gets the TMA tiles
    only with TMA_CHOOSER on, and not those whose taps x output-channel blocks pass grid y: a
    half-precision channels_last 3x3 problem of 640 output channels (9 x 10 blocks of 64, 9 x 5
    of 128), GRID_YZ_MAX lowered to 40 (no channel slicing: 4 x 16 channels a launch take its 64).
    The stand-in chooser records the list and stops the call (nothing launches)."""
    from gpu_nn.kernels.triton import conv as kt

    cl = torch.channels_last
    x = randn(rng, 2, 64, 6, 6).half().to(memory_format=cl)
    g = randn(rng, 2, 640, 6, 6).half().to(memory_format=cl)
    monkeypatch.setattr(kt, "tma_device", lambda t: True)
    assert kt.tma_wgrad_candidates(g, x, (1, 1), 1, "ieee")
    seen = []

    class Chosen(Exception):
        pass

    def choose(op, key, cands, run, default, prepare=None):
        seen.append([c for c in cands if kt.TMA in c])
        raise Chosen

    for chooser, grid_max, want in ((True, 65535, True), (False, 65535, False), (True, 40, False)):
        monkeypatch.setattr(kt, "TMA_CHOOSER", chooser)
        monkeypatch.setattr(kt, "GRID_YZ_MAX", grid_max)
        kt._CANDIDATES.clear()
        dw = torch.empty(640, 64, 3, 3, dtype=torch.float16)
        with pytest.raises(Chosen):
            kt.conv_backward_weight(g, x, dw, (1, 1), (1, 1, 1, 1), (1, 1), 1, "ieee", True, choose)
        assert bool(seen[-1]) is want, (chooser, grid_max, seen[-1])
    assert len(seen) == 3


def test_tma_candidates_only_where_they_apply(monkeypatch):
    """The TMA forward is offered for one-group problems in half precision or TF32, each tile
    whose channel block divides the channel count, on x itself where it is NHWC (else one tile
    on channels_last copies); strided, the TMA_STRIDED tile alone, where H and W are multiples
    of the stride (the input gradient: dilation 1); never on a device without TMA (here: the
    CPU)."""
    from gpu_nn.kernels.triton import conv as kt

    def t(*shape, dtype=torch.float16, cl=True):
        e = torch.empty(shape, dtype=dtype)
        return e.contiguous(memory_format=torch.channels_last) if cl else e

    x, w = t(2, 64, 28, 28), t(32, 64, 3, 3)
    half = [(*c, kt.TMA) for c in kt.TMA_CONFIGS["half"].values()]
    assert kt.tma_candidates(x, w, (1, 1), 1, "ieee") == half
    assert kt.tma_candidates(t(2, 64, 28, 28, cl=False), w, (1, 1), 1, "ieee") == [
        (*kt.TMA_CONFIGS["half"]["tma8x16"], kt.TMA, kt.VIA_CL)]
    strided = [(*kt.TMA_CONFIGS["half"][kt.TMA_STRIDED["fwd"]], kt.TMA)]
    assert kt.tma_candidates(x, w, (2, 2), 1, "ieee") == strided
    assert kt.tma_candidates(t(2, 64, 28, 28, cl=False), w, (2, 2), 1, "ieee") == [(*strided[0], kt.VIA_CL)]
    sliced = t(2, 128, 28, 28)[:, :64]  # NHWC-strided, but its pixels are not whole: no strided view
    assert kt._tma_strided(sliced) and not kt._tma_describable(sliced, (2, 2)) and kt._tma_describable(sliced, (1, 1))
    assert kt.tma_candidates(sliced, w, (2, 2), 1, "ieee") == [(*strided[0], kt.VIA_CL)]
    assert kt.tma_candidates(sliced, w, (2, 1), 1, "ieee") == strided  # a unit column stride needs no whole pixels
    assert kt.tma_candidates(t(2, 64, 27, 28), w, (2, 2), 1, "ieee") == []  # 27 rows: no strided view
    assert kt.tma_candidates(x, t(32, 32, 3, 3), (1, 1), 2, "ieee") == []
    assert kt.tma_candidates(t(2, 48, 28, 28), t(32, 48, 3, 3), (1, 1), 1, "ieee") == []  # 48 % 64
    # blocks that would mostly hang past a 7x7 image are not offered: 8x8 uses 77 % of its rows
    assert kt.tma_candidates(t(2, 64, 7, 7), w, (1, 1), 1, "ieee") == [(*kt.TMA_CONFIGS["half"]["tma8x8"], kt.TMA)]
    assert kt._block_use(7, 7, 8, 16) < kt.TMA_MIN_USE <= kt._block_use(7, 7, 8, 8)
    x32, w32 = t(2, 32, 28, 28, dtype=torch.float32), t(32, 32, 3, 3, dtype=torch.float32)
    assert kt.tma_candidates(x32, w32, (1, 1), 1, "ieee") == []
    assert kt.tma_candidates(x32, w32, (1, 1), 1, "tf32") == [(*c, kt.TMA) for c in kt.TMA_CONFIGS["fp32"].values()]
    y = t(2, 32, 28, 28)
    assert not kt.tma_device(x) and not any(kt.TMA in c for c in kt.problem_candidates(x, w, None, y, 1, "ieee", (1, 1)))
    monkeypatch.setattr(kt, "tma_device", lambda t: True)
    monkeypatch.setattr(kt, "TMA_CHOOSER", True)  # whatever the Triton (the chooser's lists are the point)
    # tma8x16, wrong on the H200 storing a channels_last y through pointers, is not offered there
    # (kt.TMA_FWD_SUSPECT); an NCHW y, which it stores through a descriptor, gets every tile
    suspect = (*kt.TMA_CONFIGS["half"]["tma8x16"], kt.TMA)
    assert kt.problem_candidates(x, w, None, y, 1, "ieee", (1, 1))[-(len(half) - 1):] == [c for c in half if c != suspect]
    assert suspect not in kt.problem_candidates(x, w, None, y, 1, "ieee", (1, 1))
    x16, y16 = t(2, 64, 16, 16), t(2, 32, 16, 16, cl=False)  # rows of 32 bytes: a descriptor's
    tiles16 = kt.tma_candidates(x16, w, (1, 1), 1, "ieee")
    assert suspect in tiles16 and kt.problem_candidates(x16, w, None, y16, 1, "ieee", (1, 1))[-len(tiles16):] == tiles16
    assert not any(kt.TMA in c for c in kt.problem_candidates(x, w, None, y, 1, "ieee"))  # no stride given
    # the input gradient's: by the output channel count, and rows of C channels in 16-byte units
    dhalf = [(*c, kt.TMA) for c in kt.DGRAD_TMA_CONFIGS["half"].values()]
    g = t(2, 64, 28, 28)
    w64 = t(64, 32, 3, 3)
    assert kt.tma_dgrad_candidates(g, w64, (1, 1), 1, "ieee") == dhalf
    assert kt.tma_dgrad_candidates(t(2, 64, 28, 28, cl=False), w64, (1, 1), 1, "ieee") == [
        (*kt.DGRAD_TMA_CONFIGS["half"]["tma8x16n64"], kt.TMA, kt.VIA_CL)]
    assert kt.tma_dgrad_candidates(g, w64, (1, 2), 1, "ieee") == [(*kt.DGRAD_TMA_CONFIGS["half"][kt.TMA_STRIDED["dgrad"]], kt.TMA)]
    assert kt.tma_dgrad_candidates(g, w64, (1, 2), 1, "ieee", (2, 1)) == []  # strided and dilated
    assert kt.tma_dgrad_candidates(t(2, 48, 28, 28), t(48, 32, 3, 3), (1, 1), 1, "ieee") == []  # 48 % 64
    assert kt.tma_dgrad_candidates(g, t(64, 12, 3, 3), (1, 1), 1, "ieee") == []  # 12 x 2 bytes
    assert not any(kt.TMA in c for c in kt.dgrad_problem_candidates(g, w64, t(2, 32, 28, 28), 1, "ieee"))
    assert kt.dgrad_problem_candidates(g, w64, t(2, 32, 28, 28), 1, "ieee", (1, 1))[-len(dhalf):] == dhalf
    # the weight gradient's: both channel counts in 16-byte NHWC rows; VIA_CL where x or g is NCHW
    whalf = [(*c, kt.TMA) for c in kt.WGRAD_TMA_CONFIGS["half"].values()]
    x24, g40 = t(2, 24, 28, 28), t(2, 40, 28, 28)
    assert kt.tma_wgrad_candidates(x24, g40, (1, 1), 1, "ieee") == whalf
    assert kt.tma_wgrad_candidates(t(2, 24, 28, 28, cl=False), g40, (1, 1), 1, "ieee") == [(*c, kt.VIA_CL) for c in whalf]
    assert kt.tma_wgrad_candidates(x24, t(2, 36, 28, 28), (1, 1), 1, "ieee") == []
    assert kt.tma_wgrad_candidates(x24, g40, (2, 2), 1, "ieee") == [(*kt.WGRAD_TMA_CONFIGS["half"][kt.TMA_STRIDED["wgrad"]], kt.TMA)]
    assert kt.tma_wgrad_candidates(x24, t(2, 40, 28, 27), (2, 2), 1, "ieee") == []  # (g, x): x of 27 columns
    labels = {sp.label for sp in kt.aot_specs()}
    for key, dts in (("fp32", ("fp32 tf32",)), ("half", ("fp16 ieee", "bf16 ieee"))):
        assert all(f"fwd {name} {dt} tma" in labels for name in kt.TMA_CONFIGS[key] for dt in dts)
        assert all(f"wgrad {name} {dt} tma" in labels for name in kt.WGRAD_TMA_CONFIGS[key] for dt in dts)
        assert all(f"dgrad {name} {dt} tma" in labels for name in kt.DGRAD_TMA_CONFIGS[key] for dt in dts)
        assert all(f"{part} {name} {dt} tma strided" in labels for part, name in kt.TMA_STRIDED.items() for dt in dts)


@pytest.mark.usefixtures("no_tf32")
def test_tma_candidates_through_the_chooser_match_reference(monkeypatch, rng):
    """Every TMA candidate a measuring chooser may pick, forward, input and weight gradient,
    forced through F.conv2d (the device check patched on a CPU machine, where the interpreter runs the
    GPU tiles): the direct form on a channels_last half problem, the via-channels_last form on
    an NCHW one."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    dev = _tma_here()
    monkeypatch.setattr(kt, "tma_device", lambda t: True)
    monkeypatch.setattr(kt, "TMA_CHOOSER", True)  # whatever the Triton (the chooser's lists are the point)
    # 8 columns: an NCHW y of 16-byte rows, which the via-channels_last tile stores through a
    # descriptor (kt.TMA_FWD_SUSPECT: not offered where it would store through pointers)
    x64, w64, b64 = randn(rng, 1, 64, 5, 8), randn(rng, 64, 64, 3, 3) / 24, randn(rng, 64)
    with gpu_nn.backend("reference"):
        yr = F.conv2d(x64, w64, b64, padding=1, activation="relu")
    for layout in ("channels_last", "contig"):
        x, w = (_layout(t.to(dev, torch.float16), layout) for t in (x64, w64))
        b = b64.to(dev, torch.float16)
        y_like = _layout(torch.empty(yr.shape, dtype=torch.float16), layout)  # F.conv2d's y follows x's layout
        cands = [c for c in kt.problem_candidates(x, w, b, y_like, 1, "ieee", (1, 1)) if kt.TMA in c]
        assert cands and all((kt.VIA_CL in c) is (layout == "contig") for c in cands)
        for cand in cands:
            monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand: (
                lambda op, key, cs, run, default, **_: cand if cand in cs else pytest.fail(f"{cand} not offered")))
            with gpu_nn.backend("triton"):
                y = F.conv2d(x, w, b, padding=1, activation="relu")
            assert_close(y, yr, torch.float16, 9 * 64, f"forward {cand} {layout}")
    # ... and the input and weight gradients', g in either layout (F.conv2d's output follows x's)
    g64 = randn(rng, *yr.shape)
    for part, red in (("dgrad", 9 * 64), ("wgrad", 5 * 9)):
        with gpu_nn.backend("reference"):
            leaf = (x64 if part == "dgrad" else w64).clone().requires_grad_()
            y64 = F.conv2d(leaf, w64, b64, padding=1) if part == "dgrad" else F.conv2d(x64, leaf, b64, padding=1)
            want = torch.autograd.grad(y64, leaf, g64)[0]
        for layout in ("channels_last", "contig"):
            x, w = (_layout(t.to(dev, torch.float16), layout) for t in (x64, w64))
            wrt = (x if part == "dgrad" else w).requires_grad_()
            g = _layout(g64.to(dev, torch.float16), layout)
            cands = ([c for c in kt.dgrad_problem_candidates(g, w, x, 1, "ieee", (1, 1)) if kt.TMA in c]
                     if part == "dgrad" else kt.tma_wgrad_candidates(g, x, (1, 1), 1, "ieee"))
            assert cands and all((kt.VIA_CL in c) is (layout == "contig") for c in cands)
            for cand in cands:
                monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand, op_=f"conv_{part}": (
                    lambda op, key, cs, run, default, **_: default if op != op_ else (
                        cand if cand in cs else pytest.fail(f"{cand} not offered"))))
                with gpu_nn.backend("triton"):
                    got = torch.autograd.grad(F.conv2d(x, w, b64.to(dev, torch.float16), padding=1), wrt, g)[0]
                assert_close(got, want, torch.float16, red, f"{part} {cand} {layout}")


@pytest.mark.usefixtures("no_tf32")
def test_tma_choice_kept_for_aligned_tensors_never_serves_misaligned_views(monkeypatch, rng):
    """A measuring chooser's kept TMA choice (memory cache: no candidate check) and a view of the
    same shape and strides whose base is not 16-byte aligned (a channel slice one element in): the
    tuning keys name x's / g's alignment, so the view gets its own choice (the via-channels_last
    copy); a contiguous but misaligned weight view is copied fresh for its descriptor. Forward,
    input and weight gradient against the reference; before, the second call failed TMA's
    alignment assertion."""
    import itertools

    from gpu_nn import _tuning
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    dev = _tma_here()
    monkeypatch.setattr(kt, "tma_device", lambda t: True)
    monkeypatch.setattr(kt, "TMA_CHOOSER", True)  # whatever the Triton (the chooser's lists are the point)
    monkeypatch.setattr(_tuning, "_memory", {})
    tick = itertools.count()

    def chooser(device):
        # every call measures (force); the fake clock makes the first TMA candidate the fastest
        def choose(op, key, cands, run, default, **kw):
            tma = [c for c in cands if kt.TMA in c]
            return _tuning.choose(op, key, tma[:1] + [c for c in cands if c not in tma[:1]], run, default,
                                  device=torch.device("cpu"), force=True, timer=lambda f: (f(), float(next(tick)))[1])
        return choose

    monkeypatch.setattr(oc, "_chooser", chooser)
    parent64 = randn(rng, 1, 72, 6, 8)
    w64 = randn(rng, 16, 64, 3, 3) / 24
    buf64 = randn(rng, 1 + 16 * 64) / 8
    parent = parent64.to(dev, torch.float16).contiguous(memory_format=torch.channels_last)
    w = w64.to(dev, torch.float16).contiguous(memory_format=torch.channels_last)
    buf = buf64.to(dev, torch.float16)
    cases = [(parent[:, 0:64], w, parent64[:, 0:64], w64, 1), (parent[:, 1:65], w, parent64[:, 1:65], w64, 1),
             (parent[:, 0:64], buf[:1024].view(16, 64, 1, 1), parent64[:, 0:64], buf64[:1024].view(16, 64, 1, 1), 0),
             (parent[:, 0:64], buf[1:].view(16, 64, 1, 1), parent64[:, 0:64], buf64[1:].view(16, 64, 1, 1), 0)]
    assert cases[1][0].data_ptr() % 16 and cases[3][1].data_ptr() % 16
    for x, wt, x64, wt64, pad in cases:
        g64 = randn(rng, 1, 16, 6, 8)
        with gpu_nn.backend("reference"):
            xr, wr = x64.clone().requires_grad_(), wt64.clone().requires_grad_()
            yr = F.conv2d(xr, wr, padding=pad)
            want = torch.autograd.grad(yr, [xr, wr], g64)
        xx, ww = x.detach().requires_grad_(), wt.detach().requires_grad_()  # the views themselves
        with gpu_nn.backend("triton"):
            y = F.conv2d(xx, ww, padding=pad)
            got = torch.autograd.grad(y, [xx, ww], g64.to(dev, torch.float16))
        red = 9 * 64 if pad else 64
        assert_close(y, yr, torch.float16, red, f"forward, x at {x.data_ptr() % 16}, w at {wt.data_ptr() % 16}")
        assert_close(got[0], want[0], torch.float16, red, "input gradient")
        assert_close(got[1], want[1], torch.float16, 6 * 8, "weight gradient")


def _tma_store_spies(monkeypatch, kernel):
    """The TMA kernels on a CPU machine (the interpreter runs the GPU tiles), float32 in TF32 (the
    precision the TMA kernels run float32 in; the interpreter's is exact), and two records:
    the launch options of ``kernel`` and the shapes of the NHWC temporaries the launchers make."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    monkeypatch.setattr(kt, "tma_device", lambda t: True)
    monkeypatch.setattr(kt, "TMA_CHOOSER", True)  # whatever the Triton (the chooser's lists are the point)
    monkeypatch.setattr(oc, "_precision", lambda dt: "tf32" if dt == torch.float32 else "ieee")
    launches, temps = [], []
    real_launch, real_empty = kt._jit_launch, kt._nhwc_empty
    monkeypatch.setattr(kt, "_jit_launch", lambda k, grid, args, meta, warm: (
        launches.append(meta) if k is kernel else None, real_launch(k, grid, args, meta, warm))[1])
    monkeypatch.setattr(kt, "_nhwc_empty", lambda t: (temps.append(tuple(t.shape)), real_empty(t))[1])
    return launches, temps


def _tma_close(got, want, dtype, what) -> None:
    """A TMA kernel's half result at half tolerance, its float32 one at TF32's (9 taps x 64 channels)."""
    if dtype == torch.float16:
        assert_close(got, want, dtype, 9 * 64, what)
    else:
        assert max_rel_err(got, want) <= _tf32_bound(9 * 64), f"{what} (tf32)"


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["half", "fp32"])
def test_tma_forward_writes_an_nchw_output_through_a_descriptor(dtype, monkeypatch, rng):
    """The via-channels_last TMA forward of an NCHW problem stores the tile into the NCHW output
    itself through a TMA descriptor (Y_DESC): no NHWC temporary of the output and no copy back.
    72 output channels against 128-channel tiles and 6 rows against 8-row blocks: the store's
    clipping at O and Ho is exercised. With 9 columns (18 or 36-byte rows, which TMA cannot
    describe) the launch falls back to the temporary and the copy. Both match the reference."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    dev = _tma_here()
    launches, temps = _tma_store_spies(monkeypatch, kt._conv_tma_fwd_kernel)
    for width, described in ((8, True), (9, False)):
        x64, w64, b64 = randn(rng, 2, 64, 6, width), randn(rng, 72, 64, 3, 3) / 24, randn(rng, 72)
        with gpu_nn.backend("reference"):
            yr = F.conv2d(x64, w64, b64, padding=1, activation="relu")
        x, w, b = (t.to(dev, dtype) for t in (x64, w64, b64))

        def offered():
            return [c for c in kt.problem_candidates(x, w, b, torch.empty(yr.shape, dtype=dtype), 1,
                                                     "ieee" if dtype == torch.float16 else "tf32", (1, 1))
                    if kt.TMA in c and kt.VIA_CL in c]

        if not described:  # the tile would store through pointers: not offered (kt.TMA_FWD_SUSPECT, the H200's
            assert offered() == []  # wrong result), but that path still gives the reference's values here
            monkeypatch.setattr(kt, "TMA_FWD_SUSPECT", ())
        cands = offered()
        assert cands
        for cand in cands:
            launches.clear()
            temps.clear()
            monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand: (
                lambda op, key, cs, run, default, **_: cand if cand in cs else pytest.fail(f"{cand} not offered")))
            with gpu_nn.backend("triton"):
                y = F.conv2d(x, w, b, padding=1, activation="relu")
            assert y.is_contiguous()
            _tma_close(y, yr, dtype, f"forward {cand} width {width}")
            assert [m["Y_DESC"] for m in launches] == [described]
            assert (tuple(yr.shape) in temps) is not described  # the output's NHWC temporary


def test_tma_store_descriptor_only_for_rows_of_whole_16_byte_units():
    """A TMA store writes up to the next 16-byte boundary past a row's last element (triton-lang
    issue 11583): an NCHW y whose rows are a width slice of wider ones (strides and base still
    16-byte multiples) gets no store descriptor, as the dense y of the same strides does."""
    from gpu_nn.kernels.triton import conv as kc

    dense = torch.empty(2, 3, 5, 40, dtype=torch.float16)
    assert kc._y_describable(dense, 16) and kc._y_descriptor(dense, 4, 16, 16) is not None
    sliced = dense[..., :36]  # 72-byte rows in 80-byte strides
    assert not kc._y_describable(sliced, 16) and kc._y_descriptor(sliced, 4, 16, 16) is None
    assert kc._y_describable(dense[..., :32], 16)  # 64-byte rows: whole units


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["half", "fp32"])
def test_tma_input_gradient_writes_an_nchw_dx_through_a_descriptor(dtype, monkeypatch, rng):
    """As the forward's test, for the stride-1 TMA input gradient (DX_DESC): the
    via-channels_last candidate of an NCHW problem stores dx itself, 72 input channels against
    64- and 128-channel tiles and 6 rows against 8-row blocks; 9 columns fall back to the NHWC
    temporary and the copy. Both against the reference's input gradient."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    dev = _tma_here()
    launches, temps = _tma_store_spies(monkeypatch, kt._conv_tma_dgrad_kernel)
    for width, described in ((8, True), (9, False)):
        x64, w64 = randn(rng, 2, 72, 6, width), randn(rng, 64, 72, 3, 3) / 24
        g64 = randn(rng, 2, 64, 6, width)
        with gpu_nn.backend("reference"):
            leaf = x64.clone().requires_grad_()
            want = torch.autograd.grad(F.conv2d(leaf, w64, padding=1), leaf, g64)[0]
        x, w, g = (t.to(dev, dtype) for t in (x64, w64, g64))
        cands = [c for c in kt.dgrad_problem_candidates(g, w, x, 1, "ieee" if dtype == torch.float16 else "tf32",
                                                        (1, 1), (1, 1))
                 if kt.TMA in c and kt.VIA_CL in c]
        assert cands
        for cand in cands:
            monkeypatch.setattr(oc, "_chooser", lambda device, cand=cand: (
                lambda op, key, cs, run, default, **_: default if op != "conv_dgrad" else (
                    cand if cand in cs else pytest.fail(f"{cand} not offered"))))
            xg = x.clone().requires_grad_()
            with gpu_nn.backend("triton"):
                y = F.conv2d(xg, w, padding=1)
                launches.clear()
                temps.clear()
                got = torch.autograd.grad(y, xg, g)[0]
            assert got.is_contiguous()
            _tma_close(got, want, dtype, f"dgrad {cand} width {width}")
            assert [m["DX_DESC"] for m in launches] == [described]
            assert (tuple(x.shape) in temps) is not described  # dx's NHWC temporary


DW_CASES = [  # depthwise problems: (nd, input shape, weight shape, kwargs, layout)
    (2, (2, 3, 7, 6), (6, 1, 3, 3), dict(padding="same", dilation=2, groups=3, activation="relu"), "contig"),
    (2, (1, 4, 9, 8), (4, 1, 3, 2), dict(stride=(2, 3), padding=(1, 2), groups=4), "channels_last"),
    (1, (3, 5, 29), (5, 1, 5), dict(padding=2, stride=2, groups=5, activation="tanh"), "contig"),
    # stride 3 over a dilated tap span (every residue class of h), two outputs per channel
    (2, (2, 6, 11, 10), (12, 1, 3, 3), dict(stride=(3, 2), padding=(2, 1), dilation=(2, 1), groups=6), "noncontig"),
]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("pix_fast", [False, True], ids=["channels-fastest", "pixels-fastest"])
@pytest.mark.parametrize("nd,xs,ws,kw,layout", DW_CASES, ids=[f"case{i}" for i in range(len(DW_CASES))])
def test_depthwise_tile_orientations_match_reference(pix_fast, nd, xs, ws, kw, layout, monkeypatch, rng):
    """The depthwise kernels (forward, input and weight gradient) in both tile orientations,
    forced, whatever the layout (PIX_FAST: lanes on consecutive pixels, for NCHW / NCL; else on
    consecutive channels), against the float64 reference; and the launchers take the
    pixels-fastest tile exactly for tensors whose pixels are adjacent and channels are not."""
    from gpu_nn.kernels.triton import conv as kt

    _need_triton()
    dev = "cuda" if CUDA else "cpu"
    fn = F.conv2d if nd == 2 else F.conv1d
    x64, w64, b64 = randn(rng, *xs), randn(rng, *ws), randn(rng, ws[0])
    with gpu_nn.backend("reference"):
        leaves = [t.clone().requires_grad_() for t in (x64, w64, b64)]
        yr = fn(*leaves, **kw)
        g64 = randn(rng, *yr.shape)
        want = torch.autograd.grad(yr, leaves, g64)
    recs = {p: _Recorder(getattr(kt, f"_conv_dw_{p}_kernel")) for p in ("fwd", "dgrad", "wgrad")}
    for p, rec in recs.items():
        monkeypatch.setattr(kt, f"_conv_dw_{p}_kernel", rec)
    monkeypatch.setattr(kt, "pixels_adjacent", lambda t: pix_fast)
    x = _layout(x64.to(dev), layout).requires_grad_()
    w, b = w64.to(dev).requires_grad_(), b64.to(dev).requires_grad_()
    with gpu_nn.backend("triton"):
        y = fn(x, w, b, **kw)
        got = torch.autograd.grad(y, (x, w, b), g64.to(dev, torch.float32))
    assert [k["PIX_FAST"] for rec in recs.values() for k in rec.launches] == [pix_fast] * 3
    taps = int(np.prod(ws[2:]))
    assert_close(y, yr, torch.float32, taps, "forward")
    for name, a, e, k in zip(("input", "weight", "bias"), got, want, (taps, yr.numel() // ws[0], yr.numel() // ws[0])):
        assert_close(a, e, torch.float32, k, f"{name} gradient")
    t4 = torch.empty(2, 3, 4, 5)
    monkeypatch.undo()  # the rule itself
    assert kt.pixels_adjacent(t4) and not kt.pixels_adjacent(t4.contiguous(memory_format=torch.channels_last))
    assert not kt.pixels_adjacent(t4[..., ::2]) and kt.pixels_adjacent(torch.empty(2, 1, 4, 5))


def test_split_k_only_where_tiles_are_few():
    """Split K is offered to one-group problems with fewer output tiles than SPLIT_WAVE and a K
    loop of four trips or more; the split count aims at two waves, at least 2, at most
    SPLIT_MAX and the K loop's trips."""
    from gpu_nn.kernels.triton import conv as kt

    cl = torch.channels_last
    deep = [torch.empty(*sh).to(memory_format=cl) for sh in ((32, 512, 7, 7), (512, 512, 3, 3), (32, 512, 7, 7))]
    wide = [torch.empty(*sh).to(memory_format=cl) for sh in ((32, 64, 56, 56), (64, 64, 3, 3), (32, 64, 56, 56))]
    for half in (False, True):
        prec = "ieee" if half else "tf32"
        assert any(kt.SPLIT in c for c in kt.problem_candidates(*deep[:2], None, deep[2], 1, prec))
        assert not any(kt.SPLIT in c for c in kt.problem_candidates(*wide[:2], None, wide[2], 1, prec))
    assert kt.split_eligible(1, 1568, 512, 128, 128, 72) and not kt.split_eligible(2, 1568, 256, 128, 128, 72)
    assert not kt.split_eligible(1, 1568, 512, 128, 128, 3)
    assert kt.split_count(52, 72) == 6 and kt.split_count(1, 72) == kt.SPLIT_MAX and kt.split_count(1, 5) == 5
    assert kt.split_count(131, 72) == 3 and kt.split_count(200, 9) == 2
    # compiled ahead of time: every split tile in the specialisation it launches with, and the finish
    labels = {sp.label for sp in kt.aot_specs()}
    for (key, nhwc), names in kt.FWD_SPLIT.items():
        dts = ("fp16 ieee", "bf16 ieee") if key == "half" else ("fp32 tf32",) if nhwc else ("fp32 ieee", "fp32 tf32")
        for name in names:
            assert all(f"fwd {name} {dt} split" in labels for dt in dts), name
    assert all(f"splitk reduce {dt}" in labels for dt in ("fp32", "fp16", "bf16"))
    for (key, nhwc), names in kt.DGRAD_SPLIT.items():
        dts = ("fp16 ieee", "bf16 ieee") if key == "half" else ("fp32 tf32",) if nhwc else ("fp32 ieee", "fp32 tf32")
        for name in names:
            assert all(f"dgrad {name} {dt} split" in labels for dt in dts), name
    assert not [lb for lb in labels if lb.startswith("dgrad large fp16") and lb.endswith("split")]
    # the input gradient splits whole taps: a deep layer's 3x3 gets it, a 1x1 (one tap) never
    for dt, prec in ((torch.float32, "tf32"), (torch.float16, "ieee")):
        d, wd = [t.to(dt) for t in deep], [t.to(dt) for t in wide]
        assert any(kt.SPLIT in c for c in kt.dgrad_problem_candidates(d[2], d[1], d[0], 1, prec))
        one_tap = torch.empty(512, 512, 1, 1, dtype=dt).to(memory_format=cl)
        assert not any(kt.SPLIT in c for c in kt.dgrad_problem_candidates(d[2], one_tap, d[0], 1, prec))
        assert not any(kt.SPLIT in c for c in kt.dgrad_problem_candidates(wd[2], wd[1], wd[0], 1, prec))


def test_nhwc_tiles_only_where_their_specialisation_holds(rng):
    """The large NHWC tiles are compiled for unit channel strides and multiples of 16: any
    other problem gets the generic candidates (and float32 without TF32 never gets them)."""
    from gpu_nn.kernels.triton import conv as kt

    cl = torch.channels_last
    x, w, y = (torch.empty(*sh).to(memory_format=cl) for sh in ((2, 32, 9, 7), (48, 32, 3, 3), (2, 48, 9, 7)))
    assert kt.nhwc_specialised(x, w, None, y, 32, 48)
    assert kt.nhwc_specialised(x, w, torch.empty(48), y, 32, 48)
    assert not kt.nhwc_specialised(x, w[:, :16], None, y, 16, 24)  # groups=2 with 24 output channels per group
    assert not kt.nhwc_specialised(x.contiguous(), w, None, y, 32, 48)
    assert not kt.nhwc_specialised(x, w.contiguous(), None, y, 32, 48)
    assert not kt.nhwc_specialised(x, w, None, y.contiguous(), 32, 48)
    x24, w24 = torch.empty(2, 24, 9, 7).to(memory_format=cl), torch.empty(48, 24, 3, 3).to(memory_format=cl)
    assert not kt.nhwc_specialised(x24, w24, None, y, 24, 48)  # 24 channels: not a multiple of 16
    assert not kt.nhwc_specialised(x, w, torch.empty(49)[1:], y, 32, 48)  # a misaligned bias pointer
    for half in (False, True):
        generic, nhwc = kt.fwd_candidates(half), kt.fwd_candidates(half, True)
        assert 3 <= len(generic) <= 4 and 3 <= len(nhwc) <= 8 and set(nhwc) - set(generic)
        # each kind has its one-loop K variants (FLAT), of tiles that are candidates themselves
        for cands in (generic, nhwc):
            flat = [c for c in cands if c[5:] == (kt.FLAT,)]
            assert flat and all(c[:5] in cands for c in flat)


# (nd, N, C, spatial, O, kernel, stride, padding, dilation, groups, bias, activation, layouts of
# (input, weight)): odd sizes, channel counts per group in multiples of 16 (what the variant needs)
VIA_CL_CASES = [
    (2, 3, 32, (7, 5), 32, (3, 2), (2, 1), (1, 0), (1, 2), 2, True, "relu", ("contig", "contig")),
    (2, 1, 16, (5, 9), 16, (3, 3), 1, 1, 1, 1, False, None, ("contig", "noncontig")),
    (2, 2, 16, (6, 7), 32, (2, 3), 1, (0, 1), (2, 1), 1, True, "sigmoid", ("channels_last", "contig")),
    (1, 2, 16, (13,), 16, (3,), 1, "same", 2, 1, True, "tanh", ("contig", "contig")),
]


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_layout_copy_moves_nchw_and_nhwc_both_ways(backend, device, rng):
    """The via-channels_last copies (kernels/triton/conv.py layout_copy): NCHW -> NHWC and back,
    exact, in one launch of the tiled copy wherever both tensors merge H and W (planes of odd
    sizes, H or W of 1, several tiles each way), torch's copy where one does not (a sliced W),
    nothing launched for an empty tensor."""
    from gpu_nn.kernels.triton import conv as kt

    for dtype in gpu_dtypes_for(backend, device):
        for shape in ((3, 17, 5, 7), (2, 70, 9, 1), (1, 5, 1, 131), (2, 3, 66, 67), (0, 4, 3, 3)):
            src = randn(rng, *shape).to(device, dtype)
            for to_nhwc in (True, False):
                a = src if to_nhwc else kt._nhwc_empty(src).copy_(src)
                dst = kt._nhwc_empty(src) if to_nhwc else torch.empty(shape, dtype=dtype, device=device)
                dst.fill_(float("nan"))
                with interpreted_launches(device) as names:
                    assert kt.layout_copy(dst, a) is dst
                assert torch.equal(dst, src), (dtype, shape, to_nhwc)
                if device == "cpu":
                    assert names == (["_layout_copy_kernel"] if src.numel() else []), (shape, to_nhwc, names)
        # every other column of a wider tensor (H and W still merge, at stride 2): the kernel;
        # its first columns (they do not): torch's copy
        wide = randn(rng, 2, 3, 4, 10).to(device, dtype)
        for src, launched in ((wide[..., ::2], True), (wide[..., :5], False)):
            dst = kt._nhwc_empty(src)
            with interpreted_launches(device) as names:
                kt.layout_copy(dst, src)
            assert torch.equal(dst, src)
            if device == "cpu":
                assert names == (["_layout_copy_kernel"] if launched else [])
        # an expanded destination (elements sharing memory): torch's copy, and its refusal
        with pytest.raises(RuntimeError, match="single memory location"):
            kt.layout_copy(torch.empty(2, 1, 1, 1, dtype=dtype, device=device).expand(2, 3, 4, 4),
                           randn(rng, 2, 3, 4, 4).to(device, dtype))


@pytest.mark.parametrize("half", [False, True], ids=["tf32", "half"])
def test_via_channels_last_candidates_match_reference(half, monkeypatch, rng):
    """The via-channels_last forward candidates, forced (the tuner that would time them does not
    run on a CPU), on problems that are not channels_last: against the reference, bitwise equal
    to the same tile launched directly on channels_last copies of the operands, and the result
    in the memory format torch gives (the caller's y is written, not replaced)."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    dtype = torch.float16 if half else torch.float32
    # float32 takes the variant under TF32 only (the interpreter may emulate its rounding)
    monkeypatch.setattr(oc, "_precision", lambda dt: "ieee" if half or dt != torch.float32 else "tf32")
    vias = [c for c in kt.fwd_candidates(half, False, True) if c[-1] == kt.VIA_CL]
    assert vias and all(c[:5] not in vias for c in kt.fwd_candidates(half, False))
    for ci, (nd, n, c, sp, o, k, st, pad, dil, groups, bias, act, (lx, lw)) in enumerate(VIA_CL_CASES):
        x64, w64 = randn(rng, n, c, *sp), randn(rng, o, c // groups, *k) / (c // groups * np.prod(k)) ** 0.5
        b64 = randn(rng, o) if bias else None
        conv = F.conv2d if nd == 2 else F.conv1d
        kw = dict(stride=st, padding=pad, dilation=dil, groups=groups, activation=act)
        with gpu_nn.backend("reference"):
            yr = conv(x64, w64, b64, **kw)
        dev = "cuda" if CUDA else "cpu"
        x, w = _layout(x64.to(dev, dtype), lx), _layout(w64.to(dev, dtype), lw)
        b = None if b64 is None else b64.to(dev, dtype)
        seen, choice = [], []

        def pick(op, key, candidates, run, default, **_):
            seen.append(list(candidates))
            return choice[-1]

        monkeypatch.setattr(oc, "_chooser", lambda device: pick)
        for via in [vias[(ci + 1) % len(vias)]]:  # each tile on every other problem (the NHWC tile first)
            tile = via[:5]
            xc, wc = _layout(x.contiguous(), "channels_last"), _layout(w.contiguous(), "channels_last")
            with gpu_nn.backend("triton"):
                choice.append(via)
                y = conv(x, w, b, **kw)
                choice.append(tile)  # the same tile, launched directly on channels_last copies
                y_direct = conv(xc, wc, b, **kw)
            assert via in seen[-2] and tile in seen[-1] and via not in seen[-1], "the variant is for the NCHW problem only"
            _check_via(y, yr, y_direct, x, w, dtype, c // groups * int(np.prod(k)), half,
                       f"via channels_last {tile} conv{nd}d {lx}/{lw}")


def test_float32_via_channels_last_heuristic_tiles_match_reference(monkeypatch, rng):
    """The float32 (TF32) heuristic's via-channels_last launches (fwd_heuristic: fwd_default's
    own tile, "large" or "small", on channels_last copies; not among the measured candidates),
    forced through the launcher on the CPU: against the reference and bitwise equal to the same
    tile launched directly on channels_last copies."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    monkeypatch.setattr(oc, "_precision", lambda dt: "tf32" if dt == torch.float32 else "ieee")
    dev = "cuda" if CUDA else "cpu"
    choice = []
    monkeypatch.setattr(oc, "_chooser", lambda device: lambda op, key, cands, run, default, **_: choice[-1])
    for name, (nd, n, c, sp, o, k, st, pad, dil, groups, bias, act, _) in zip(("large", "small"), VIA_CL_CASES[1:3]):
        x64, w64 = randn(rng, n, c, *sp), randn(rng, o, c // groups, *k) / (c // groups * np.prod(k)) ** 0.5
        b64 = randn(rng, o) if bias else None
        kw = dict(stride=st, padding=pad, dilation=dil, groups=groups, activation=act)
        with gpu_nn.backend("reference"):
            yr = F.conv2d(x64, w64, b64, **kw)
        x, w = x64.to(dev, torch.float32), w64.to(dev, torch.float32)
        b = None if b64 is None else b64.to(dev, torch.float32)
        tile = kt.GPU_CONFIGS["fp32"][name]
        with gpu_nn.backend("triton"):
            choice.append((*tile, kt.VIA_CL))
            y = F.conv2d(x, w, b, **kw)
            choice.append(tile)
            y_direct = F.conv2d(_layout(x, "channels_last"), _layout(w.contiguous(), "channels_last"), b, **kw)
        _check_via(y, yr, y_direct, x, w, torch.float32, c // groups * int(np.prod(k)), False,
                   f"float32 heuristic {name} via channels_last")


def test_forward_heuristic_takes_channels_last_copies_where_it_should():
    """fwd_heuristic's choice where nothing is measured, compiled (interpret False; the decision
    reads only shapes, dtypes, strides and alignment, so CPU tensors stand in): an NCHW half
    problem of one group and at least 32 channels in takes the half large tile on channels_last
    copies, float32 under TF32 its own tile on them; IEEE float32, fewer than 32 channels, two
    groups, a channels_last input, 24 channels (not a multiple of 16) or the interpreter keep
    the default."""
    from gpu_nn.kernels.triton import conv as kt

    def choice(dtype=torch.bfloat16, c=32, o=32, k=3, groups=1, fmt=None, prec="ieee", interpret=False):
        x = torch.empty(2, c, 9, 9, dtype=dtype)
        x = x if fmt is None else x.contiguous(memory_format=fmt)
        w = torch.empty(o, c // groups, k, k, dtype=dtype)
        y = torch.empty(2, o, 10 - k, 10 - k, dtype=dtype)
        cfg = kt.fwd_default(o, 2 * (10 - k) ** 2, c // groups, k * k, dtype != torch.float32, interpret)
        return kt.fwd_heuristic(x, w, None, y, groups, cfg, interpret, prec), cfg

    got, _ = choice()
    assert got == (*kt.GPU_CONFIGS["half"]["large"], kt.VIA_CL), got
    got, cfg = choice(torch.float32, prec="tf32")
    assert got == (*cfg[:5], kt.VIA_CL), (got, cfg)
    assert choice(k=1)[0][-1] == kt.VIA_CL
    # (16 channels: 1x1, and 3x3, whose default is also the packed loop)
    for kw in (dict(dtype=torch.float32), dict(c=16, k=1), dict(c=16), dict(c=64, groups=2),
               dict(fmt=torch.channels_last), dict(c=24, o=24), dict(interpret=True)):
        got, cfg = choice(**kw)
        assert got == cfg, (kw, got, cfg)


@pytest.mark.skipif(not CUDA, reason="needs a GPU: the heuristic takes the copies only for compiled kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_untuned_half_nchw_convolution_through_the_heuristic_on_the_gpu(dtype, rng, monkeypatch):
    """On a GPU with nothing measured (GPU_NN_TUNE=0), a half NCHW convolution of 32 channels
    runs fwd_heuristic's via-channels_last tile (the copies, the NHWC tile, the copy back):
    against the float64 reference within the half bound, NCHW out as torch's, fwd+bwd."""
    monkeypatch.setenv("GPU_NN_TUNE", "0")
    x64, w64, b64 = randn(rng, 2, 32, 11, 9), randn(rng, 48, 32, 3, 3) / (32 * 9) ** 0.5, randn(rng, 48)
    g64 = randn(rng, 2, 48, 11, 9)
    with gpu_nn.backend("reference"):
        x, w, b = (t.clone().requires_grad_() for t in (x64, w64, b64))
        yr = F.conv2d(x, w, b, padding=1)
        want = [yr, *torch.autograd.grad(yr, (x, w, b), g64)]
    x, w, b = (t.to("cuda", dtype).requires_grad_() for t in (x64, w64, b64))
    with gpu_nn.backend("triton"):
        y = F.conv2d(x, w, b, padding=1)
        got = [y, *torch.autograd.grad(y, (x, w, b), g64.to("cuda", dtype))]
    assert y.is_contiguous()
    for a, e, what, red in zip(got, want, ("y", "dx", "dw", "db"), (32 * 9, 48 * 9, 2 * 99, 2 * 99)):
        assert_close(a.cpu(), e, dtype, red, f"{dtype} {what}")


def _check_via(got, want, direct, x, w, dtype, red, half, what):
    """A via-channels_last result: within the tolerance of its precision against the reference
    (``red`` terms per output), bitwise equal to the same tile launched directly on channels_last
    copies, and in the memory format torch gives for ``x`` and ``w``."""
    from gpu_nn.ops import conv as oc

    if half:
        assert_close(got, want, dtype, red, what)
    else:
        assert max_rel_err(got, want) <= _tf32_bound(red), what
    assert torch.equal(got.contiguous(), direct.contiguous()), f"{what}: not bitwise equal to the direct NHWC launch"
    fmt = oc._memory_format(x, w)
    assert _same_layout(got, oc._alloc(got.shape, fmt, torch.empty)), f"{what}: strides {got.stride()} ({fmt})"


@pytest.mark.parametrize("half", [False, True], ids=["tf32", "half"])
def test_via_channels_last_dgrad_candidates_match_reference(half, monkeypatch, rng):
    """The input gradient's via-channels_last candidates, forced, on the same problems: against
    the reference's gradient, bitwise equal to the same tile launched directly on channels_last
    copies (where the DGRAD_NHWC tiles are candidates), in the input's memory format."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    _need_triton()
    dtype = torch.float16 if half else torch.float32
    monkeypatch.setattr(oc, "_precision", lambda dt: "ieee" if half or dt != torch.float32 else "tf32")
    vias = [c for c in kt.dgrad_candidates(half, False, True) if c[-1] == kt.VIA_CL]
    assert vias and not any(c[-1] == kt.VIA_CL for c in kt.dgrad_candidates(half, True, True))
    for ci, (nd, n, c, sp, o, k, st, pad, dil, groups, bias, act, (lx, lw)) in enumerate(VIA_CL_CASES):
        x64, w64 = randn(rng, n, c, *sp), randn(rng, o, c // groups, *k) / (c // groups * np.prod(k)) ** 0.5
        b64 = randn(rng, o) if bias else None
        conv = F.conv2d if nd == 2 else F.conv1d
        kw = dict(stride=st, padding=pad, dilation=dil, groups=groups, activation=act)
        with gpu_nn.backend("reference"):  # on the inputs as dtype holds them (the activation's mask as the kernel's)
            r = lambda t: None if t is None else t.to(dtype).double()  # noqa: E731
            xr = r(x64).requires_grad_()
            y64 = conv(xr, r(w64), r(b64), **kw)
            g64 = randn(rng, *y64.shape)
            want = torch.autograd.grad(y64, xr, r(g64))[0]
        dev = "cuda" if CUDA else "cpu"
        x, w = _layout(x64.detach().to(dev, dtype), lx).requires_grad_(), _layout(w64.to(dev, dtype), lw)
        b, g = None if b64 is None else b64.to(dev, dtype), g64.to(dev, dtype)
        xc = _layout(x.detach().contiguous(), "channels_last").requires_grad_()
        wc, gc = _layout(w.contiguous(), "channels_last"), _layout(g, "channels_last")
        seen, choice = [], []

        def pick(op, key, candidates, run, default, **_):
            if op != "conv_dgrad":
                return default
            seen.append(list(candidates))
            return choice[-1]

        monkeypatch.setattr(oc, "_chooser", lambda device: pick)
        for via in [vias[(ci + 1) % len(vias)]]:  # each tile on every other problem (the NHWC tile first)
            tile = via[:5]
            with gpu_nn.backend("triton"):
                choice.append(via)
                got = torch.autograd.grad(conv(x, w, b, **kw), x, g)[0]
                choice.append(tile)  # the same tile, directly on channels_last copies
                direct = torch.autograd.grad(conv(xc, wc, b, **kw), xc, gc)[0]
            assert via in seen[-2] and tile in seen[-1] and via not in seen[-1], "the variant is for the NCHW problem only"
            _check_via(got, want, direct, x, w, dtype, o // groups * int(np.prod(k)), half,
                       f"dgrad via channels_last {tile} conv{nd}d {lx}/{lw}")


def test_via_channels_last_choice_is_recorded_and_cached(tune_cache, tmp_path, monkeypatch):
    """A winning via-channels_last candidate is named as such in the GPU_NN_TUNE_RECORD rows
    (its config ends with VIA_CL) and comes back from the disk cache as the same tuple, not as
    the direct launch of its tile."""
    from gpu_nn import _tuning
    from gpu_nn.kernels.triton import conv as kt

    record = tmp_path / "record.jsonl"
    monkeypatch.setenv(_tuning.RECORD_ENV, str(record))
    cands = kt.fwd_candidates(True, False, True)
    winner = next(c for c in cands if c[-1] == kt.VIA_CL)
    key = ((32, 128, 28, 28), (100352, 784, 28, 1), "torch.bfloat16")
    clock = lambda fn: 1.0 if fn() == winner else 2.0  # noqa: E731
    got = _tuning.choose("conv_fwd", key, cands, lambda cfg: cfg, cands[0], torch.device("cpu"), timer=clock, force=True)
    assert got == winner
    rows = _tuning.read_record(str(record))
    assert [tuple(r["config"]) for r in rows] == cands
    assert [r["config"][-1] == kt.VIA_CL for r in rows if r["chosen"]] == [True]
    monkeypatch.delenv(_tuning.RECORD_ENV)
    _tuning.clear()

    def no_clock(fn):
        raise AssertionError("measured again")

    assert _tuning.choose("conv_fwd", key, cands, lambda cfg: cfg, cands[0], torch.device("cpu"), timer=no_clock,
                          force=True) == winner


@pytest.mark.parametrize("part", ["fwd", "dgrad"])
def test_tuning_compiles_every_candidate_up_front(part, monkeypatch):
    """Before timing, the launchers' ``prepare`` compiles every candidate at once (warmup calls
    inside parallel_compile), the via-channels_last ones on NHWC stand-ins with the strides their
    launch will have (nothing copied); under the interpreter it does nothing."""
    import contextlib

    from gpu_nn.kernels.triton import conv as kt

    class Stub:
        def __init__(self):
            self.warm, self.runs = [], 0

        def __getitem__(self, grid):
            def run(*args, **kw):
                self.runs += 1
            return run

        def warmup(self, *args, grid, **kw):
            self.warm.append((args, kw))

    stub = Stub()
    monkeypatch.setattr(kt, f"_conv_{part}_kernel", stub)
    monkeypatch.setattr(kt, "parallel_compile", lambda n: contextlib.nullcontext(True))
    offered = []

    def choose(op, key, cands, run, default, prepare):
        offered.extend(cands)
        prepare(cands)
        return default

    x, w = torch.randn(2, 32, 5, 6, dtype=torch.float16), torch.randn(32, 32, 3, 3, dtype=torch.float16)
    y = torch.empty(2, 32, 5, 6, dtype=torch.float16)
    for interpret in (True, False):
        if part == "fwd":
            kt.conv_forward(x, w, None, y, (1, 1), (1, 1, 1, 1), (1, 1), 1, None, "ieee", interpret, choose=choose)
        else:
            kt.conv_backward_data(y, w, x, (1, 1), (1, 1, 1, 1), (1, 1), 1, "ieee", interpret, choose=choose)
        if interpret:
            assert stub.warm == [] and stub.runs == 1
    vias = [c for c in offered if c[-1] == kt.VIA_CL]
    assert vias and len(stub.warm) == len(offered) // 2 and stub.runs == 2
    for cand, (args, kw) in zip(offered[len(offered) // 2:], stub.warm):
        assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_warps"], kw["num_stages"]) == cand[:5]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if cand in vias:
            assert all(kt._nhwc_strided(t) for t in tensors) and not any(t is x or t is y for t in tensors)
        else:
            assert tensors[0] is (x if part == "fwd" else y)


def test_via_channels_last_only_where_it_applies(rng):
    """The variant is offered for half / TF32 problems with channel counts per group in multiples
    of 16 that are not already in the NHWC specialisation (those get the NHWC tiles directly)."""
    from gpu_nn.kernels.triton import conv as kt

    cl = torch.channels_last
    x, w, y = torch.empty(2, 32, 9, 7), torch.empty(48, 32, 3, 3), torch.empty(2, 48, 9, 7)
    assert kt.via_cl_eligible(x, w, None, y, 32, 48)
    assert kt.via_cl_eligible(x.to(memory_format=cl), w, None, y.to(memory_format=cl), 32, 48)  # weight NCHW
    assert kt.via_cl_eligible(x, w, torch.empty(48), y, 32, 48)
    assert not kt.via_cl_eligible(*(t.to(memory_format=cl) for t in (x, w)), None, y.to(memory_format=cl), 32, 48)
    assert not kt.via_cl_eligible(x, w[:, :16], None, y, 16, 24)  # groups=2 with 24 output channels per group
    assert not kt.via_cl_eligible(torch.empty(2, 24, 9, 7), torch.empty(48, 24, 3, 3), None, y, 24, 48)
    assert not kt.via_cl_eligible(x, w, torch.empty(49)[1:], y, 32, 48)  # a misaligned bias pointer
    for half in (False, True):
        plain, via = kt.fwd_candidates(half), kt.fwd_candidates(half, False, True)
        assert via[:len(plain)] == plain and 1 <= len(via) - len(plain) <= 3
        assert all(cand[-1] == kt.VIA_CL and cand[:5] in kt.fwd_candidates(half, True) for cand in via[len(plain):])
        assert kt.fwd_candidates(half, True, True) == kt.fwd_candidates(half, True)
    # the copies take exactly the strides the NHWC specialisation is compiled for, whatever the
    # sizes (torch's channels_last may keep NCHW strides where a dimension is 1)
    for shape in ((1, 32, 1, 1), (3, 16, 1, 5), (2, 32, 4, 1)):
        t = torch.randn(shape)
        c = kt._nhwc_copy(t)
        assert torch.equal(c, t) and kt._nhwc_strided(c) and c.stride(1) == 1
        assert kt._nhwc_copy(c) is c


# ----------------------------------------------------------------------------- memory format

def _same_layout(a, b):
    """Equal strides wherever the size is above 1 (a size-1 dimension's stride is immaterial)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _lay(t, layout):
    if layout == "NHWC":
        return _layout(t, "channels_last")
    if layout == "HW":  # spatial dims swapped in memory: neither format
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


@pytest.mark.parametrize("nd", [1, 2])
def test_memory_format_rule_matches_torch(nd, rng):
    """_memory_format against what torch's CPU convolution returns (output, input gradient,
    weight gradient), over every input x weight layout and sizes where the formats coincide
    (one input or output channel, 1x1 images and kernels)."""
    from gpu_nn.ops import conv as oc

    sizes = [(2, 4, 3, 6, 3), (2, 1, 3, 6, 3), (2, 4, 1, 6, 3), (3, 2, 5, 1, 1)]
    for (n, c, o, s, k), xl, wl in itertools.product(sizes, ("NCHW", "NHWC", "HW"), ("NCHW", "NHWC", "HW")):
        xs, ws = ((n, c, s, s + 1), (o, c, k, k)) if nd == 2 else ((n, c, s + 1), (o, c, k))
        x = _lay(randn(rng, *xs), xl).requires_grad_()
        w = _lay(randn(rng, *ws), wl).requires_grad_()
        y = (TF.conv2d if nd == 2 else TF.conv1d)(x, w)
        gi, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        fmt = oc._memory_format(x, w)
        for what, t in (("output", y), ("grad_input", gi), ("grad_weight", gw)):
            want = oc._alloc(t.shape, fmt, torch.empty)
            assert _same_layout(t, want), f"{what} {(n, c, o, s, k)} {xl} x {wl}: torch {t.stride()}, ours {want.stride()}"


@pytest.mark.parametrize("nd", [1, 2])
def test_fake_kernels_give_the_real_layouts(nd, rng):
    """register_fake's outputs (what torch.compile traces with) have the real outputs' strides,
    forward and backward, every gradient asked for, in channels_last and not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gpu_nn.ops import conv as oc

    xs, ws = ((2, 4, 6, 5), (6, 4, 3, 2)) if nd == 2 else ((2, 4, 9), (6, 4, 3))
    for xl, wl in itertools.product(("NCHW", "NHWC"), repeat=2):
        x, w, b = _lay(randn(rng, *xs), xl), _lay(randn(rng, *ws), wl), randn(rng, ws[0])
        args = ([1] * nd, [1, 1] * nd, [1] * nd, 1, "relu")
        with gpu_nn.backend("reference"):
            y = oc._conv_forward_op(x, w, b, *args)
            grads = oc._conv_backward_op(torch.ones_like(y), x, w, y, *args, [True, True, True])
        assert not any(t.requires_grad for t in (x, w, b))
        ones = torch.ones_like(y)
        mode = FakeTensorMode()
        fx, fw, fb, fy, fg = (mode.from_tensor(t) for t in (x, w, b, y, ones))
        with mode:
            fake_y = oc._conv_forward_op(fx, fw, fb, *args)
            fake_g = oc._conv_backward_op(fg, fx, fw, fy, *args, [True, True, True])
        for what, real, fake in zip(("output", "grad_input", "grad_weight", "grad_bias"), (y, *grads), (fake_y, *fake_g)):
            assert real.shape == fake.shape and _same_layout(real, fake), f"{what} {xl} x {wl}: {real.stride()} vs {fake.stride()}"


def test_channels_last_like_is_torchs_suggest_memory_format():
    """The inline stride test equals torch's suggest_memory_format on every permuted, sliced and
    expanded 4-d tensor with sides 1..3 (the ambiguous size-1 cases included)."""
    from torch._prims_common import suggest_memory_format

    from gpu_nn.ops import conv as oc

    for shape in itertools.product((1, 2, 3), repeat=4):
        for perm in itertools.permutations(range(4)):
            t = torch.empty(*shape).permute(*perm).contiguous().permute(*[perm.index(i) for i in range(4)])
            for v in (t, t[..., ::2], t[:, :, :1].expand(shape)):
                assert oc._channels_last_like(v) == (suggest_memory_format(v) == torch.channels_last), (shape, v.stride())


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("xl,wl", list(itertools.product(("NCHW", "NHWC"), repeat=2)))
def test_memory_format_like_torch_both_directions(backend, device, nd, xl, wl, rng):
    """NCHW and channels_last inputs and weights on every backend: the output, input gradient and
    weight gradient have torch's memory format and match the float64 reference (forward, dgrad,
    wgrad; a fused activation where both are channels_last, which routes the gradient through
    the elementwise kernel in channels_last)."""
    act = "relu" if xl == wl == "NHWC" else None
    groups = 2 if wl == "NCHW" else 1
    xs, ws = ((2, 6, 9, 7), (5 * groups, 6 // groups, 3, 2)) if nd == 2 else ((2, 6, 13), (5 * groups, 6 // groups, 3))
    kw = dict(stride=(2, 1) if nd == 2 else 2, padding=1, groups=groups, activation=act)
    k = ws[1] * (ws[2] * ws[3] if nd == 2 else ws[2])
    x64, w64, b64 = randn(rng, *xs), randn(rng, *ws) / k ** 0.5, randn(rng, ws[0])
    fn, tfn = (F.conv2d, TF.conv2d) if nd == 2 else (F.conv1d, TF.conv1d)
    leaves = [x64.clone().requires_grad_(), w64.clone().requires_grad_(), b64.clone().requires_grad_()]
    if backend == "reference":  # torch's float64 (the reference against itself could not fail)
        yr = tfn(*leaves, kw["stride"], kw["padding"], 1, groups)
        yr = torch.relu(yr) if act else yr
    else:
        with gpu_nn.backend("reference"):
            yr = fn(*leaves, **kw)
    g64 = randn(rng, *yr.shape)
    gr = torch.autograd.grad(yr, leaves, g64)
    dtype = torch.float64 if backend == "reference" else torch.float32
    x = _lay(x64.to(device, dtype), xl).requires_grad_()
    w = _lay(w64.to(device, dtype), wl).requires_grad_()
    b = b64.to(device, dtype).requires_grad_()
    with gpu_nn.backend(backend):
        y = fn(x, w, b, **kw)
        gs = torch.autograd.grad(y, (x, w, b), _lay(g64.to(device, dtype), "NHWC" if "NHWC" in (xl, wl) else "NCHW"))
    # torch's layouts, from torch's own convolution on the same layouts
    xt, wt = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    yt = tfn(xt, wt, None, kw["stride"], kw["padding"], 1, groups)
    gt = torch.autograd.grad(yt, (xt, wt), torch.ones_like(yt))
    for what, ours, theirs in (("output", y, yt), ("grad_input", gs[0], gt[0]), ("grad_weight", gs[1], gt[1])):
        assert _same_layout(ours, theirs), f"{what}: strides {ours.stride()}, torch's {theirs.stride()}"
    red_bwd = max(yr.numel() // ws[0], 1) + ws[0] * k
    assert_close(y, yr, dtype, k, "forward")
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), gs, gr):
        assert_close(a, e, dtype, red_bwd, name)


def test_triton_heuristic_tiles():
    from gpu_nn.kernels.triton import conv as kt

    configs = [c for table in kt.GPU_CONFIGS.values() for c in table.values()]
    for cfg in (*configs, kt.INTERP_CONFIG):
        assert min(cfg[:3]) >= 16
    labels = {s.label for s in kt.aot_specs()}
    for n in (1, 16, 33, 64, 65, 512):
        for m in (0, 10**3, 10**6):
            for half in (False, True):
                assert kt.pick_config(n, m, half, True) == kt.INTERP_CONFIG
                cfg = kt.pick_config(n, m, half, False)
                table = kt.GPU_CONFIGS["half" if half else "fp32"]
                assert cfg in table.values()
                name = next(k for k, v in table.items() if v == cfg)
                # whatever the heuristic picks is compiled ahead of time, in every dtype; wgrad
                # asks with a zero GEMM length (it splits its reduction over programs instead)
                wname = next(k for k, v in table.items() if v == kt.pick_config(n, 0, half, False))
                # the input gradient picks by the same rule from its own table (two tiles replaced)
                dtable = kt.DGRAD_CONFIGS["half" if half else "fp32"]
                dname = next(k for k, v in dtable.items() if v == kt.pick_config(n, m, half, False, kt.DGRAD_CONFIGS))
                assert dname == name
                for dt in (("fp16 ieee", "bf16 ieee") if half else ("fp32 ieee", "fp32 tf32")):
                    for kind, nm in (("fwd", name), ("dgrad", dname), ("wgrad", wname)):
                        assert f"{kind} {nm} {dt}" in labels
    for dt in ("fp32", "fp16", "bf16"):
        for kind in ("fwd", "dgrad", "wgrad"):
            assert f"depthwise {kind} {dt}" in labels
    # every candidate a measuring chooser may launch is compiled ahead of time too
    for half, nhwc, dts in ((False, False, ("fp32 ieee", "fp32 tf32")), (True, False, ("fp16 ieee", "bf16 ieee")),
                            (False, True, ("fp32 tf32",)), (True, True, ("fp16 ieee", "bf16 ieee"))):
        key = "half" if half else "fp32"
        table = {**kt.GPU_CONFIGS[key], **kt.TUNE_CONFIGS[key], **kt.NHWC_CONFIGS[key]}
        for cand in kt.fwd_candidates(half, nhwc):
            name = next(k for k, v in table.items() if v == cand[:5])
            flat = " flat" if kt.FLAT in cand[5:] else ""  # the one-loop K variant: its own spec
            for dt in dts:
                assert f"fwd {name} {dt}{flat}" in labels
        if nhwc:  # the via-channels_last candidates launch their tile in the NHWC specialisation
            for cand in kt.fwd_candidates(half, False, True):
                if cand[-1] != kt.VIA_CL:
                    continue
                name = next(k for k, v in table.items() if v == cand[:5])
                spec = name if name in kt.NHWC_CONFIGS[key] else f"{name}/nhwc"
                flat = " flat" if kt.FLAT in cand[5:] else ""
                for dt in dts:
                    assert f"fwd {spec} {dt}{flat}" in labels
    # ... and so is every input-gradient candidate (NHWC tiles and via channels_last included)
    for half, dts in ((False, ("fp32 tf32",)), (True, ("fp16 ieee", "bf16 ieee"))):
        key = "half" if half else "fp32"
        table = {**kt.DGRAD_CONFIGS[key], **kt.DGRAD_NHWC_CONFIGS[key]}
        for cand in {*kt.dgrad_candidates(half, True), *kt.dgrad_candidates(half, False, True)}:
            name = next(k for k, v in table.items() if v == cand[:5])
            if len(cand) == 6 and name not in kt.DGRAD_NHWC_CONFIGS[key]:
                name += "/nhwc"
            for dt in dts:
                assert f"dgrad {name} {dt}" in labels
    # ... and every weight-gradient candidate
    for half, dts in ((False, ("fp32 ieee", "fp32 tf32")), (True, ("fp16 ieee", "bf16 ieee"))):
        key = "half" if half else "fp32"
        table = {**kt.GPU_CONFIGS[key], **kt.TUNE_CONFIGS[key]}
        for cand in kt.wgrad_candidates(half, 3, 9):  # with their packed forms (few channels)
            name = next(k for k, v in table.items() if v == cand[:5])
            packed = " packed" if kt.PACKED in cand[5:] else ""
            assert all(f"wgrad {name} {dt}{packed}" in labels for dt in dts), name
        # ... and the forward's packed forms (heuristic or measured)
        for name in kt.FWD_PACKED[key]:
            assert all(f"fwd {name} {dt} packed" in labels for dt in dts), name
    for kind, names, unit, div16 in (
            ("fwd", {**kt.NHWC_CONFIGS["fp32"], **kt.NHWC_CONFIGS["half"]}, kt.NHWC_UNIT, kt.NHWC_DIV16),
            ("dgrad", {**kt.DGRAD_NHWC_CONFIGS["fp32"], **kt.DGRAD_NHWC_CONFIGS["half"]}, kt.DGRAD_NHWC_UNIT,
             kt.DGRAD_NHWC_DIV16)):
        nhwc_specs = [sp for sp in kt.aot_specs() if sp.label.split()[0] == kind
                      and (sp.label.split()[1] in names or sp.label.split()[1].endswith("/nhwc"))]
        assert nhwc_specs and all(sp.divisible_by_16 == div16 and all(sp.constexprs[k] == 1 for k in unit)
                                  for sp in nhwc_specs)
    # depthwise = one input channel per group, whatever the channel multiplier
    assert kt.is_depthwise(6, 1, 6) and kt.is_depthwise(1, 1, 1)
    assert not kt.is_depthwise(6, 2, 3) and not kt.is_depthwise(6, 6, 1)


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("nd,args,kwargs,shape", [
    (2, (4, 6, 3), dict(stride=2, padding=1), (2, 4, 9, 8)),
    (2, (4, 8, (2, 3)), dict(padding="same", dilation=2, groups=4, bias=False), (1, 4, 7, 9)),
    (1, (6, 4, 5), dict(padding="valid", groups=2), (3, 6, 17)),
    (1, (3, 5, 4), dict(padding="same"), (3, 11)),
    # padding modes: the input padded as torch's layers pad it (F.pad), then convolved unpadded
    (2, (4, 6, 3), dict(padding=1, padding_mode="reflect"), (2, 4, 9, 8)),
    (2, (4, 6, (2, 4)), dict(padding="same", padding_mode="circular", dilation=(2, 1)), (1, 4, 7, 9)),
    (2, (4, 4, 3), dict(padding=(1, 2), padding_mode="replicate", groups=2, stride=(2, 1)), (4, 9, 8)),
    (1, (3, 5, 4), dict(padding=2, stride=2, padding_mode="replicate"), (3, 11)),
    (1, (6, 4, 5), dict(padding="same", padding_mode="reflect", bias=False), (3, 6, 17)),
])
def test_modules_match_torch(nd, args, kwargs, shape, rng):
    ours_cls, theirs_cls = (gpu_nn.nn.Conv2d, torch.nn.Conv2d) if nd == 2 else (gpu_nn.nn.Conv1d, torch.nn.Conv1d)
    theirs = theirs_cls(*args, **kwargs).double()
    ours = ours_cls(*args, **kwargs).double()
    assert isinstance(ours, theirs_cls)
    assert ours.extra_repr() == theirs.extra_repr()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = randn(rng, *shape, requires_grad=True)
    with _nowarn():
        yt = theirs(x)
    y = ours(x)
    assert_close(y, yt, torch.float64, 100)
    g = randn(rng, *y.shape)
    gs = torch.autograd.grad(y, [x, *ours.parameters()], g)
    gt = torch.autograd.grad(yt, [x, *theirs.parameters()], g)
    for a, e in zip(gs, gt):
        assert_close(a, e, torch.float64, 1000)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_groups_taps_and_weight_rows_past_the_launch_limits_refused(backend, device, rng, monkeypatch):
    """Limits of the Triton launches besides pixels, lowered: groups past GRID_YZ_MAX (they ride
    CUDA's grid z, at most 65535: 'invalid argument' on a GPU), weight elements per output
    channel past WEIGHT_ROW_MAX (int32 in the kernels) and output channels per group past
    CHANNELS_MAX (blocks of them ride grid y) refused in the forward, input channels past it in
    the input gradient; kernel taps past
    GRID_YZ_MAX (the weight gradient's grid y) refused where a weight gradient is wanted, while
    the forward and the input gradient alone run; a depthwise conv, whose groups ride no grid
    axis, runs with more groups and is refused past GRID_YZ_MAX blocks of DW_BLOCK_C channels. A
    KernelInputError before any kernel of the op; the reference takes every case."""
    from gpu_nn._errors import KernelInputError
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    assert oc.DW_BLOCK_C == kt.DW_CONFIG[1]  # the depthwise kernels' channel block on a GPU
    x = randn(rng, 2, 6, 9).float().to(device)
    grouped = randn(rng, 6, 2, 3).float().to(device)  # 3 groups of 2 channels, 3 taps
    plain = randn(rng, 6, 6, 3).float().to(device)
    wide = randn(rng, 2, 6, 3).float().to(device)  # 2 output channels, 6 input channels
    # the forward's output-channel and the input gradient's input-channel blocks ride grid y, at
    # least 16 channels a block in every tile (CHANNELS_MAX = GRID_YZ_MAX blocks of 16)
    assert oc.CHANNELS_MAX == oc.GRID_YZ_MAX * 16
    blocks = [cfg[1] for tables in (kt.GPU_CONFIGS, kt.TUNE_CONFIGS, kt.NHWC_CONFIGS, kt.DGRAD_CONFIGS,
                                    kt.DGRAD_NHWC_CONFIGS) for table in tables.values() for cfg in table.values()]
    blocks += [cfg[2] for tables in (kt.TMA_CONFIGS, kt.DGRAD_TMA_CONFIGS) for table in tables.values()
               for cfg in table.values()]
    blocks += [kt.INTERP_CONFIG[1], kt.TMA_INTERP_CONFIG[2], kt.DGRAD_TMA_INTERP_CONFIG[2], kt.REDUCE_BLOCKS[1],
               kt.DW_CONFIG[1], kt.DW_INTERP_CONFIG[1]]
    assert min(blocks) == 16, sorted(set(blocks))
    for attr, bound, match, w, groups in (("GRID_YZ_MAX", 2, "3 groups", grouped, 3),
                                          ("WEIGHT_ROW_MAX", 5, "6 weight elements per output channel", grouped, 3),
                                          ("CHANNELS_MAX", 5, "6 output channels per group", plain, 1)):
        monkeypatch.setattr(oc, attr, bound)
        monkeypatch.setattr(oc, "_PLANS", {})  # the plans hold the verdict under the limits they met
        with gpu_nn.backend(backend), interpreted_launches(device) as names, pytest.raises(KernelInputError, match=match):
            F.conv1d(x, w, groups=groups)
        assert names == []
        with gpu_nn.backend("reference"):
            F.conv1d(x, w, groups=groups)
        monkeypatch.undo()
    monkeypatch.setattr(oc, "GRID_YZ_MAX", 2)
    monkeypatch.setattr(oc, "_PLANS", {})
    xx = x.clone().requires_grad_()
    with gpu_nn.backend(backend):
        wt = plain.clone().requires_grad_()
        y = F.conv1d(xx, wt)
        with interpreted_launches(device) as names, pytest.raises(KernelInputError, match="3 kernel taps"):
            torch.autograd.grad(y, (xx, wt), torch.ones_like(y))  # (the weight's gradient asked for)
        assert names == []
        y = F.conv1d(xx, plain)  # no weight gradient wanted
        (dx,) = torch.autograd.grad(y, xx, torch.ones_like(y))
        # depthwise: the groups ride no grid axis (6 groups run); its channel blocks ride grid y
        depthwise = randn(rng, 6, 1, 1).float().to(device)
        ran = [(F.conv1d(x, depthwise, groups=6), (x, depthwise), dict(groups=6))]
        monkeypatch.setattr(oc, "DW_BLOCK_C", 2)
        monkeypatch.setattr(oc, "_PLANS", {})
        with pytest.raises(KernelInputError, match="6 depthwise channels are past the 4"):
            F.conv1d(x, depthwise, groups=6)
    # input channels ride grid y only in the input gradient: the forward and the weight gradient
    # alone take 6 past a bound of 5, an input gradient is refused before any kernel; a depthwise
    # conv (its own bound above) and a one-channel conv, which runs the depthwise kernels, take
    # more output channels than CHANNELS_MAX
    monkeypatch.undo()
    monkeypatch.setattr(oc, "CHANNELS_MAX", 5)
    monkeypatch.setattr(oc, "_PLANS", {})
    ww = wide.clone().requires_grad_()
    with gpu_nn.backend(backend):
        y = F.conv1d(x, ww)  # x needs no gradient
        ran.append((y.detach(), (x, wide), {}))
        (dw,) = torch.autograd.grad(y, ww, torch.ones_like(y))
        y = F.conv1d(xx, ww)
        with interpreted_launches(device) as names, pytest.raises(KernelInputError,
                                                                   match="6 input channels per group .input gradient."):
            torch.autograd.grad(y, xx, torch.ones_like(y))
        assert names == []
        dw6, one = randn(rng, 6, 1, 1).float().to(device), randn(rng, 6, 1, 3).float().to(device)
        ran.append((F.conv1d(x, dw6, groups=6), (x, dw6), dict(groups=6)))
        ran.append((F.conv1d(x[:, :1], one), (x[:, :1], one), {}))
    # what ran under the lowered limits is right: the reference's results of the same calls
    with gpu_nn.backend("reference"):
        for i, (out, (a, wt), kw) in enumerate(ran):
            want = F.conv1d(a.cpu().double(), wt.cpu().double(), **kw)
            assert_close(out, want, torch.float32, k=18, what=f"forward {i} under the lowered limits")
        xr, wr = x.cpu().double().requires_grad_(), wide.cpu().double().requires_grad_()
        y = F.conv1d(xr, plain.cpu().double())
        (dx_r,) = torch.autograd.grad(y, xr, torch.ones_like(y))
        y = F.conv1d(x.cpu().double(), wr)
        (dw_r,) = torch.autograd.grad(y, wr, torch.ones_like(y))
    assert_close(dx, dx_r, torch.float32, k=18, what="input gradient under the lowered limits")
    assert_close(dw, dw_r, torch.float32, k=14, what="weight gradient under the lowered limits")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_weight_gradient_columns_past_grid_y_run_in_channel_slices(backend, device, rng, monkeypatch):
    """The weight gradient's column tiles (channel blocks x taps) ride CUDA's grid y, at most
    65535 ('invalid argument' past it on a GPU): a problem past it runs in launches over
    input-channel slices of one group, each within the limit whatever the tile. The limit
    lowered to 20 with 3x3 taps: slices of (20 // 9) x WGRAD_MIN_BLOCK_N channels, so 40 channels
    in one group take two launches and two groups of 36 four, every launch's grid y within 20
    (one launch of 27 column tiles without the slicing), float32 gradients against the float64
    reference."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    assert kt.GRID_YZ_MAX == oc.GRID_YZ_MAX == 65535 and kt.WGRAD_MIN_BLOCK_N == 16
    monkeypatch.setattr(kt, "GRID_YZ_MAX", 20)
    for c, groups, slices in ((40, 1, 2), (72, 2, 4)):
        x = randn(rng, 2, c, 5, 6, dtype=torch.float64)
        w = randn(rng, 6, c // groups, 3, 3, dtype=torch.float64)
        gy = randn(rng, 2, 6, 5, 6, dtype=torch.float64)
        grads = {}
        for be in ("reference", backend):
            dev, dt = ("cpu", torch.float64) if be == "reference" else (device, torch.float32)
            leaves = [t.to(dev, dt).requires_grad_() for t in (x, w)]
            grids = []
            if dev == "cpu" and be != "reference":
                from triton.runtime.interpreter import InterpretedFunction

                orig = InterpretedFunction.run

                def run(self, *args, _orig=orig, **kw):
                    grids.append((self.fn.__name__, tuple(kw["grid"])))
                    return _orig(self, *args, **kw)

                monkeypatch.setattr(InterpretedFunction, "run", run)
            with gpu_nn.backend(be):
                y = F.conv2d(leaves[0], leaves[1], padding=1, groups=groups)
                grads[be] = torch.autograd.grad(y, leaves, gy.to(dev, dt))
            monkeypatch.setattr(InterpretedFunction, "run", orig) if grids else None
            if grids:
                wgrad = [g for name, g in grids if "wgrad" in name]
                assert len(wgrad) == slices and all(g[1] <= 20 for g in wgrad), grids
        for a, b in zip(grads[backend], grads["reference"]):
            assert_close(a.cpu(), b, torch.float32, k=2 * 5 * 6 * 9)


@pytest.mark.skipif(not CUDA, reason="a GPU's grid y: 32769 taps are too many programs for the interpreter "
                                     "(test_weight_gradient_columns_past_grid_y_run_in_channel_slices lowers the limit)")
def test_weight_gradient_of_32769_taps_and_64_channels_runs_on_gpu(rng):
    """conv1d with 64 channels and a kernel of 32769 taps: its weight gradient's column tiles
    (two channel blocks of 32 x 32769 taps = 65538) pass CUDA's grid y; it runs in channel slices
    and matches the float64 reference."""
    x = randn(rng, 1, 64, 32770, dtype=torch.float64)
    w = randn(rng, 3, 64, 32769, dtype=torch.float64)
    gy = randn(rng, 1, 3, 2, dtype=torch.float64)
    out = {}
    for be, dev, dt in (("reference", "cpu", torch.float64), ("triton", "cuda", torch.float32)):
        leaves = [t.to(dev, dt).requires_grad_() for t in (x, w)]
        with gpu_nn.backend(be):
            y = F.conv1d(*leaves)
            out[be] = torch.autograd.grad(y, leaves, gy.to(dev, dt))
    for a, b in zip(out["triton"], out["reference"]):
        assert_close(a.cpu(), b, torch.float32, k=64 * 32769)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_batches_past_the_kernels_pixel_index_run_in_chunks(backend, device, rng, monkeypatch):
    """The Triton kernels number a launch's pixels in int32: a batch past PIXELS_MAX (2^31 - 1;
    here lowered to 300) runs on the Triton backend as chunks of samples that fit, with the
    values and every gradient of the whole batch, and one sample past it is refused; the
    reference (int64 indexing) runs the batch whole. An int32-overflow audit's find: the pixel
    index wrapped negative and passed the kernels' masks."""
    from gpu_nn.ops import conv as oc

    monkeypatch.setattr(oc, "PIXELS_MAX", 300)
    x = randn(rng, 5, 3, 10, 10, dtype=torch.float32, device=device, requires_grad=True)  # 12 x 12 padded: 144 a sample
    w = randn(rng, 4, 3, 3, 3, dtype=torch.float32, device=device, requires_grad=True)
    b = randn(rng, 4, dtype=torch.float32, device=device, requires_grad=True)
    with gpu_nn.backend(backend), interpreted_launches(device) as names:
        y = F.conv2d(x, w, b, padding=1, activation="relu")
    yt = torch.relu(TF.conv2d(x, w, b, padding=1))
    assert_close(y, yt, torch.float32, 30)
    if backend == "triton" and device == "cpu":
        assert len(names) == 3, names  # samples 0-1, 2-3, 4: two of 144 pixels fit 300
    g = torch.randn_like(y)
    with gpu_nn.backend(backend):
        got = torch.autograd.grad(y, [x, w, b], g)
    for a, e in zip(got, torch.autograd.grad(yt, [x, w, b], g)):
        assert_close(a, e, torch.float32, 300)
    big = randn(rng, 1, 3, 20, 20, dtype=torch.float32, device=device)  # 484 padded positions
    with gpu_nn.backend(backend):
        if backend == "reference":
            assert_close(F.conv2d(big, w, padding=1), TF.conv2d(big, w, padding=1), torch.float32, 30)
        else:
            with pytest.raises(gpu_nn.KernelInputError, match="one sample has 484 .padded. positions"):
                F.conv2d(big, w, padding=1)
            # the op itself (what a compiled graph with a dynamic batch calls, unsplit): its
            # launches refuse the count, forward and backward
            with pytest.raises(gpu_nn.KernelInputError, match="720 .padded. positions in one launch"):
                oc._conv_forward_op(x.detach(), w.detach(), None, [1, 1], [1, 1, 1, 1], [1, 1], 1, None)
            with pytest.raises(gpu_nn.KernelInputError, match="720 .padded. positions in one launch"):
                oc._conv_backward_op(g, x.detach(), w.detach(), None, [1, 1], [1, 1, 1, 1], [1, 1], 1, None,
                                     [True, True, False])


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_module_padding_modes_on_each_backend(mode, backend, device, rng):
    """Every padding_mode torch's layers take (they raised KernelInputError, and convert left such
    layers to torch): the input padded by F.pad, our kernels convolving it unpadded, a fused
    activation after the bias; a layer whose mode is set after construction follows it."""
    theirs = torch.nn.Conv2d(3, 4, 3, padding=(2, 1), padding_mode=mode).to(device)
    ours = gpu_nn.nn.Conv2d(3, 4, 3, padding=(2, 1), padding_mode=mode, activation="relu").to(device)
    ours.load_state_dict(theirs.state_dict())
    x = randn(rng, 2, 3, 7, 6, dtype=torch.float32).to(device).requires_grad_()
    with gpu_nn.backend(backend):
        y = ours(x)
        yt = torch.relu(theirs(x))
        assert_close(y, yt, torch.float32, 30)
        g = torch.randn_like(y)
        for a, e in zip(torch.autograd.grad(y, [x, ours.weight, ours.bias], g),
                        torch.autograd.grad(yt, [x, theirs.weight, theirs.bias], g), strict=True):
            assert_close(a, e, torch.float32, 300)
        ours.padding_mode = theirs.padding_mode = "zeros"
        assert_close(ours(x), torch.relu(theirs(x)), torch.float32, 30)


def test_module_padding_mode_passes_errors_that_judge_no_input(monkeypatch):
    """An error of F.pad that says nothing of the input (out of memory, a recursion limit: torch's
    subclasses of its plain errors) reaches the caller as it is, for an OOM retry loop's except;
    only torch's plain error classes become ours (review)."""
    layer = gpu_nn.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    x = torch.randn(1, 3, 5, 5)
    for exc in (torch.OutOfMemoryError("CUDA out of memory"), RecursionError("deep")):
        def fail(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(torch.nn.functional, "pad", fail)
        with pytest.raises(type(exc)) as got:
            layer(x)
        assert got.value is exc and not isinstance(got.value, gpu_nn.KernelInputError)


@pytest.mark.parametrize("case", [
    ("Conv2d", dict(padding=3, padding_mode="reflect"), (1, 3, 3, 3)),  # reflection past the input
    ("Conv2d", dict(padding=4, padding_mode="circular"), (1, 3, 3, 3)),  # wrapping more than once
    ("Conv1d", dict(padding=1, padding_mode="reflect"), (1, 1, 3, 5)),  # 4-D: NotImplementedError
    ("Conv1d", dict(padding=1, padding_mode="reflect"), (1, 3, 0)),  # an empty length
    ("Conv2d", dict(padding=1, padding_mode="replicate"), None),  # a list: TypeError
], ids=["reflect-past", "circular-twice", "reflect-4d", "reflect-empty", "replicate-list"])
def test_module_padding_mode_bad_input_is_our_error_in_torchs_words(case):
    """Bad input that a layer of another padding_mode refuses in its F.pad (torch's layer refuses
    it there too) raises our error of torch's kind (KernelInputError, ...TypeError,
    ...NotImplementedError) in torch's words; it escaped as torch's own error (an audit)."""
    name, kw, shape = case
    x = [[1.0]] if shape is None else torch.randn(*shape)
    theirs = getattr(torch.nn, name)(3, 4, 3, **kw)
    ours = getattr(gpu_nn.nn, name)(3, 4, 3, **kw)
    want, got = _outcome(lambda: theirs(x)), _outcome(lambda: ours(x))
    assert want[0] is not None and issubclass(got[0], (gpu_nn.KernelInputError, want[0])), (want, got)
    assert issubclass(got[0], gpu_nn.KernelInputError) and issubclass(got[0], want[0]) and got[1] == want[1], (want, got)


# --- torch's checks, in torch's order and wording (issues 18.3, 19.6, 19.9) -------------------


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 (we compare whatever torch raises)
        return type(e), str(e)
    return None


@pytest.mark.parametrize("nd", [1, 2])
def test_every_fault_combination_reports_what_torch_reports(nd):
    """Bad dtypes (integer input with and without a bias, mismatched weight / bias), bad
    stride / padding / dilation / groups and bad shapes, alone and together: whenever torch
    raises, we raise an exception of its type whose message contains torch's (the first fault
    torch reports: the bias dtype before any shape, the weight dtype after them). Left out, and
    stated: an all-integer convolution (torch computes it on the CPU, gpu-nn is floating-point
    only) and a zero-size batch with a mismatched weight dtype (torch returns an empty result
    unchecked; we refuse the dtypes)."""
    dts = [torch.float32, torch.float64, torch.int64]
    params = [(1, 0, 1, 1), (0, 0, 1, 1), (-1, 0, 1, 1), (1, -1, 1, 1), (1, 0, -1, 1), (1, 0, 1, 0), (1, 0, 1, -1),
              (-1, -1, -1, -1), (1, "same", -1, 1), (2, "same", 1, 1)]
    shapes = ([2, 4] + [6] * nd, [4] + [6] * nd, [2, 3] + [6] * nd, [2, 4] + [2] * nd, [0, 4] + [6] * nd)
    bad, n = [], 0
    for xd, wd, bd in itertools.product(dts, dts, [None] + dts):
        for (stride, pad, dil, groups), xs in itertools.product(params, shapes):
            x, w = torch.ones(xs, dtype=xd), torch.ones([6, 4] + [3] * nd, dtype=wd)
            b = None if bd is None else torch.ones(6, dtype=bd)
            kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
            theirs = _outcome(lambda: getattr(torch.nn.functional, f"conv{nd}d")(x, w, b, **kw))
            with gpu_nn.backend("reference"):
                ours = _outcome(lambda: getattr(F, f"conv{nd}d")(x, w, b, **kw))
            if theirs is None and ours is not None and (
                    (not xd.is_floating_point and wd == xd and bd in (None, xd)) or (xs[0] == 0 and wd != xd)):
                continue  # the two stated exceptions
            n += 1
            if not ((theirs is None and ours is None) or (
                    theirs is not None and ours is not None and issubclass(ours[0], theirs[0]) and theirs[1] in ours[1])):
                bad.append(f"{xs} {xd} {wd} {bd} {kw}: torch {theirs}, ours {ours}")
    assert n > 1000
    assert not bad, f"{len(bad)} mismatches, e.g.\n" + "\n".join(bad[:10])


_CONV_TYPE_CASES = [
    dict(stride=(2.5, 1)), dict(stride=2.5), dict(stride="2"), dict(stride=True), dict(stride=None),
    dict(stride=torch.tensor([2, 1])), dict(stride=torch.tensor(2.0)), dict(padding=1.5), dict(padding=("a", 1)),
    dict(padding=(1, "a")), dict(dilation=(1, 1.0)), dict(groups=1.0), dict(groups=True), dict(bias=[1.0, 2.0, 3.0]),
]


@pytest.mark.parametrize("kwargs", _CONV_TYPE_CASES, ids=str)
def test_non_int_arguments_raise_torchs_type_error(kwargs, rng):
    """conv2d(stride=(2.5, 1)) used to run with stride 2: every value torch's parser refuses is
    a TypeError (also a KernelInputError) whose message contains torch's, for a call that
    passes the argument by keyword."""
    x, w = randn(rng, 1, 2, 8, 8), randn(rng, 3, 2, 3, 3)
    with pytest.raises(TypeError) as theirs:
        torch.nn.functional.conv2d(x, w, **kwargs)
    with pytest.raises(gpu_nn.KernelInputError) as ours:
        F.conv2d(x, w, **kwargs)
    assert isinstance(ours.value, TypeError)
    assert str(theirs.value) in str(ours.value)


@pytest.mark.parametrize("kwargs", [
    dict(stride=np.int64(2)), dict(stride=torch.tensor(2)), dict(padding=torch.tensor(1)),
    dict(dilation=np.int32(2)), dict(groups=np.int64(1)), dict(groups=torch.tensor(1)),
], ids=str)
def test_numpy_and_0d_tensor_ints_are_accepted(kwargs, rng):
    """torch (and our pools) take NumPy integers and integer 0-d tensors as ints."""
    x, w, b = randn(rng, 2, 2, 9, 8), randn(rng, 3, 2, 3, 3), randn(rng, 3)
    with gpu_nn.backend("reference"):
        ours = F.conv2d(x, w, b, **kwargs)
    assert_close(ours, torch.nn.functional.conv2d(x, w, b, **kwargs), torch.float64, k=18)


@pytest.mark.parametrize("call", [
    lambda M: M.conv1d(torch.randn(1, 1, 4), torch.randn(1, 2)),
    lambda M: M.conv1d(torch.randn(1, 4), torch.randn(2)),
    lambda M: M.conv1d(torch.randn(1, 1, 4), torch.randn(1, 1, 2, 2)),
    lambda M: M.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 2, 2)),
    lambda M: M.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 2, 2), stride=[1]),
    lambda M: M.conv2d(torch.randn(1, 4, 4), torch.randn(1, 2, 2), None, [1], [1], [1]),
    lambda M: M.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 1, 2, 2)),
    lambda M: M.conv2d(torch.randn(1, 1, 4, 3), torch.randn(1, 2, 2), torch.randn(1), padding="same"),
])
def test_weight_of_the_wrong_rank_reports_what_torch_reports(call):
    """A weight of rank != nd + 2 (an OpInfo error input): torch's message, in its order (too few
    dims; parameter arity against the weight's rank; input rank against the weight's)."""
    with pytest.raises(RuntimeError) as theirs:
        call(TF)
    with gpu_nn.backend("reference"), pytest.raises(gpu_nn.KernelInputError) as ours:
        call(F)
    assert str(theirs.value) in str(ours.value)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("bias_kind", ["expanded", "strided"])
def test_conv_bias_view_of_any_stride(backend, device, nd, bias_kind, rng):
    """An expanded (stride-0) or strided bias view, as a double backward passes, reads as its
    values (the Triton epilogue read it with unit stride before: off by 1.0-1.5)."""
    x = randn(rng, 2, 3, *([7] * nd), dtype=torch.float32).to(device)
    w = randn(rng, 4, 3, *([3] * nd), dtype=torch.float32).to(device)
    b = torch.tensor(0.5, device=device).expand(4) if bias_kind == "expanded" else randn(rng, 8, dtype=torch.float32).to(device)[::2]
    fn, tfn = (F.conv1d, TF.conv1d) if nd == 1 else (F.conv2d, TF.conv2d)
    with gpu_nn.backend(backend):
        y = fn(x, w, b)
    assert_close(y.cpu().double(), tfn(x.cpu().double(), w.cpu().double(), b.cpu().double()), torch.float32, k=27, what=f"conv bias {bias_kind}")


def test_remembered_checks_still_refuse_what_torch_refuses():
    """conv's argument checks are remembered per (tensor type, shape, dtype, device, arguments)
    after they pass; whatever differs in one of those facts is checked again and still raises,
    every time (only passes are remembered)."""
    GF = F
    x, w, b = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3)
    for _ in range(2):
        GF.conv2d(x, w, b)
        with pytest.raises(gpu_nn.KernelInputError, match="expected bias to be 1-dimensional with 3 elements"):
            GF.conv2d(x, w, torch.randn(4))
        with pytest.raises(gpu_nn.KernelInputError, match="should be the same"):
            GF.conv2d(x, w, b.double())
        with pytest.raises(gpu_nn.KernelInputError, match="Kernel size can't be greater than actual input size"):
            GF.conv2d(torch.randn(1, 2, 2, 2), w, b)
        with pytest.raises(gpu_nn.KernelInputError, match="expected input.* to have 4 channels"):
            GF.conv2d(x, torch.randn(4, 2, 3, 3), None, groups=2)
        with pytest.raises(gpu_nn.KernelInputError, match="non-positive stride"):
            GF.conv2d(x, w, b, stride=0)
        GF.conv2d(x, w, b, stride=1)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_planned_launchers_check_once_per_facts(backend, device, monkeypatch, rng):
    """The public function remembers its parse and checks, the launchers their checks and
    geometry (gpu_nn.ops.conv._PUBLIC / _PLANS), per call facts: a repeated fwd+bwd runs no
    check at all and gives the same values; a layout change (same shapes, other strides) is
    planned anew and keeps torch's memory format; the custom ops called directly with facts
    that differ from a planned call are checked again and still raise."""
    from gpu_nn.ops import conv as oc

    for name in ("_PUBLIC", "_PLANS", "_CHECKED"):  # empty caches: the first call below plans
        monkeypatch.setattr(oc, name, type(getattr(oc, name))())
    calls = []
    orig = oc._check_all
    monkeypatch.setattr(oc, "_check_all", lambda *a, **k: calls.append(1) or orig(*a, **k))
    x = randn(rng, 2, 3, 7, 6, dtype=torch.float32).to(device)
    w = randn(rng, 5, 3, 3, 3, dtype=torch.float32).to(device).requires_grad_()
    b = randn(rng, 5, dtype=torch.float32).to(device).requires_grad_()

    def run(x):
        x = x.detach().requires_grad_()
        y = F.conv2d(x, w, b, padding=1, activation="relu")
        return (y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y)))

    with gpu_nn.backend(backend):
        first = run(x)
        n = len(calls)
        assert n == 3  # public, forward launcher, backward launcher
        again = run(x)
        assert len(calls) == n  # all remembered
        for a, c in zip(first, again):
            assert torch.equal(a, c)
        xcl = x.contiguous(memory_format=torch.channels_last)
        got = run(xcl)
        assert len(calls) == n + 2  # the public facts hold no strides; both launchers' do
        # torch's memory format for this input in this dtype on this device (cuDNN's float64
        # convolution returns NCHW for a channels_last input; its float32 one and the CPU's keep it)
        theirs = TF.conv2d(xcl, w.detach(), b.detach(), padding=1)
        assert theirs.is_contiguous(memory_format=torch.channels_last)
        assert got[0].is_contiguous(memory_format=torch.channels_last)  # as torch's (not the first plan's NCHW)
        # both plans' values and gradients against torch's float64 (the two runs and the layouts
        # agreeing with each other alone would pass a kernel wrong in all of them)
        leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w, b)]
        want = TF.conv2d(*leaves, padding=1).relu()
        want_grads = torch.autograd.grad(want, leaves, torch.ones_like(want))
        for res, what in ((first, "planned forward"), (got, "planned channels_last forward")):
            assert_close(res[0].double().cpu(), want.detach(), torch.float32, k=27, what=what)
            for i, (a, e) in enumerate(zip(res[1:], want_grads, strict=True)):
                assert_close(a.double().cpu(), e, torch.float32, k=2 * 7 * 6 * 5, what=f"{what}: gradient {i}")
        for a, c in zip(first[1:], got[1:]):  # and the two layouts' gradients, closer to each other
            assert_close(c.double(), a.double(), torch.float32, k=27, what="planned channels_last gradients")
        op_fwd, op_bwd = torch.ops.gpu_nn.conv_forward, torch.ops.gpu_nn.conv_backward
        args = ([1, 1], [1, 1, 1, 1], [1, 1], 1, None)
        with pytest.raises(gpu_nn.KernelInputError, match="should be the same"):
            op_fwd(x, w.detach(), b.detach().double(), *args)
        g = torch.ones_like(first[0])
        for bad, match in ((g.double(), "grad_output type"), (g[:, :, :-1], "grad_output of size")):
            with pytest.raises(gpu_nn.KernelInputError, match=match):
                op_bwd(bad, x, w.detach(), None, *args, [True, True, True])


@pytest.mark.parametrize("name", ["Conv1d", "Conv2d"])
def test_module_signature_is_torchs_plus_activation(name):
    """inspect.signature (IDEs, documentation tools, argument checks of wrappers) shows torch's
    constructor and our keyword-only activation, not (*args, **kwargs)."""
    import inspect

    ours = inspect.signature(getattr(gpu_nn.nn, name)).parameters
    theirs = inspect.signature(getattr(torch.nn, name)).parameters
    assert list(ours) == [*theirs, "activation"]
    assert all(ours[k] == theirs[k] for k in theirs)
    assert ours["activation"].kind is inspect.Parameter.KEYWORD_ONLY and ours["activation"].default is None


def test_half_nchw_heuristic_runs_on_channels_last_copies():
    """Where nothing is measured on a GPU, a float16 / bfloat16 NCHW convolution of one group and
    at least 32 input channels (multiples of 16) takes the large tile on channels_last copies:
    the H200's conv sweep at a331102 timed it 1.1-2.8x faster than the direct kernel's heuristic
    tile at all four bfloat16 3x3 shapes (fwd_heuristic's docstring). It is one of the
    candidates a measuring chooser times for that problem, compiled ahead of time; channels_last
    inputs, float32, grouped or packed problems and the interpreter keep fwd_default's."""
    from gpu_nn.kernels.triton import conv as kt

    def case(dtype=torch.bfloat16, c=64, o=64, cl=False, groups=1):
        x = torch.empty(2, c, 9, 9, dtype=dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        w = torch.empty(o, c // groups, 3, 3, dtype=dtype)
        y = torch.empty(2, o, 9, 9, dtype=dtype)
        if cl:
            y = y.to(memory_format=torch.channels_last)
        cg, og = c // groups, o // groups
        base = kt.fwd_default(og, 2 * 81, cg, 9, dtype.itemsize == 2, False)
        return x, w, None, y, groups, base

    x, w, b, y, g, base = case()
    got = kt.fwd_heuristic(x, w, b, y, g, base, False)
    assert got == (*kt.GPU_CONFIGS["half"]["large"], kt.VIA_CL) != base
    assert got in kt.problem_candidates(x, w, b, y, g, "ieee")
    assert kt.fwd_heuristic(x, w, b, y, g, base, True) == base  # the interpreter
    for kw in (dict(dtype=torch.float32), dict(cl=True), dict(groups=2), dict(c=16), dict(o=24)):
        x, w, b, y, g, base = case(**kw)
        assert kt.fwd_heuristic(x, w, b, y, g, base, False) == base, kw
    # float32 under TF32: fwd_default's own tile on the copies (what a channels_last caller of the
    # problem runs), compiled ahead of time in that specialisation; IEEE float32 keeps its tile
    x, w, b, y, g, base = case(dtype=torch.float32)
    assert kt.fwd_heuristic(x, w, b, y, g, base, False, "tf32") == (*base[:5], kt.VIA_CL)
    assert kt.fwd_heuristic(x, w, b, y, g, base, True, "tf32") == base
    for kw in (dict(cl=True), dict(groups=2), dict(c=16)):
        x, w, b, y, g, base = case(dtype=torch.float32, **kw)
        assert kt.fwd_heuristic(x, w, b, y, g, base, False, "tf32") == base, kw
    labels = {s.label for s in kt.aot_specs()}
    assert any(lbl.startswith("fwd large bf16") for lbl in labels) and any("nhwc" in lbl for lbl in labels)
    assert {f"fwd {t}/nhwc fp32 tf32" for t in kt.GPU_CONFIGS["fp32"]} <= labels


def test_candidate_lists_are_made_once_per_facts(monkeypatch):
    """The launchers ask for a problem's candidate list once per facts (shapes, strides, dtype,
    options, which tensors are 16-byte aligned, the device), not on every call: a second call
    on other tensors with the same facts reuses it, a bias that is not 16-byte aligned (a fact
    the channels_last-copy candidates depend on) gets its own. Forward, input and weight
    gradients, with a chooser that picks the default."""
    from gpu_nn.kernels.triton import conv as kt

    made = {"fwd": 0, "dgrad": 0, "wgrad": 0}
    for name, fn in (("fwd", "problem_candidates"), ("dgrad", "dgrad_problem_candidates"),
                     ("wgrad", "wgrad_candidates")):
        real = getattr(kt, fn)

        def counted(*a, _real=real, _name=name, **k):
            made[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(kt, fn, counted)
    asked = []

    def choose(op, key, cands, run, default, **_):
        asked.append((op, len(cands)))
        return default

    # compiled kernels on a GPU machine take CUDA tensors (the interpreter, CPU ones)
    from gpu_nn.kernels import triton as ktriton

    dt, interp = torch.float16, ktriton.INTERPRET
    kw = dict(dtype=dt, device="cuda" if CUDA else "cpu")
    for bias_offset in (0, 0, 1):
        x, w = torch.randn(2, 32, 6, 6, **kw), torch.randn(32, 32, 3, 3, **kw)
        b = torch.randn(33, **kw)[bias_offset:bias_offset + 32]
        y = torch.empty(2, 32, 4, 4, **kw)
        kt.conv_forward(x, w, b, y, (1, 1), (0, 0, 0, 0), (1, 1), 1, None, "ieee", interp, choose=choose)
        g = torch.randn(2, 32, 4, 4, **kw)
        kt.conv_backward_data(g, w, torch.empty(2, 32, 6, 6, **kw), (1, 1), (0, 0, 0, 0), (1, 1), 1, "ieee", interp,
                              choose=choose)
        kt.conv_backward_weight(g, x, torch.empty(32, 32, 3, 3, dtype=torch.float32, device=kw["device"]), (1, 1),
                                (0, 0, 0, 0), (1, 1), 1, "ieee", interp, choose=choose)
    assert made == {"fwd": 2, "dgrad": 1, "wgrad": 1}, made
    assert len(asked) == 9 and all(n > 1 for _, n in asked), asked


@pytest.mark.parametrize("shape,kshape,padding", [
    ((2, 3, 0, 8), (4, 3, 3, 3), 2), ((3, 0, 8), (4, 3, 3, 3), 2), ((2, 3, 0), (4, 3, 3), 2), ((3, 0), (4, 3, 3), 1),
    ((2, 3, 0, 8), (4, 3, 1, 1), 0), ((0, 3, 0, 8), (4, 3, 3, 3), 2)], ids=str)
def test_input_empty_in_space_alone_as_torch(shape, kshape, padding):
    """An input empty in a spatial dim alone, which padding lets the kernel fit: torch refuses it
    ('Only zero batch or zero channel inputs are supported', showing the batched 2-d shape it
    runs); ours returned the bias broadcast over a padded-size output. An empty batch still
    gives torch's empty result."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(*shape, generator=g), torch.randn(*kshape, generator=g), torch.randn(kshape[0], generator=g)
    theirs, ours = (TF.conv2d, F.conv2d) if len(kshape) == 4 else (TF.conv1d, F.conv1d)
    try:
        want = theirs(x, w, b, padding=padding)
    except RuntimeError as e:
        with pytest.raises(gpu_nn.KernelInputError) as got:
            ours(x, w, b, padding=padding)
        assert str(got.value) == str(e).splitlines()[0]
        return
    got = ours(x, w, b, padding=padding)
    assert got.shape == want.shape and got.stride() == want.stride()
