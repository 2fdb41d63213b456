"""Property-based tests (hypothesis) that hunt for disagreements between gpu-nn and torch.

Each property draws a random configuration (shapes, strides, options; valid and invalid ones)
and checks one of two outcomes: torch accepts it and ours returns the same values (float64:
forward, indices where torch's are meaningful, every gradient), or torch refuses it and ours
raises ``KernelInputError`` (never something else, and never when torch succeeds). Kernel
properties run the Triton backend (the interpreter here, compiled on a GPU) against the
reference on fewer examples.

Every property runs inside a plain test that counts what the strategy produced, so a strategy
that stopped drawing invalid (or valid) configurations fails the run instead of silently
testing less. Examples are fresh per run (no example database, not derandomized); a failure
prints the drawn configuration and the seed of its random values (``note``).
"""

from __future__ import annotations

import collections
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

import gpu_nn
import gpu_nn.functional as F
from helpers import assert_close, backend_params, max_rel_err, tol

PROFILE = dict(deadline=None, database=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
SEEDS = st.integers(0, 2**32 - 1)
F64 = torch.float64


def _outcome(fn):
    """("ok", result) or ("err", exception) of ``fn()``; warnings silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return "ok", fn()
    except Exception as exc:  # torch raises RuntimeError, ValueError, TypeError or IndexError
        return "err", exc


def _same_verdict(theirs, ours, seen):
    """Both refuse (ours with KernelInputError) or both accept. Returns True when both accept."""
    tk, tv = theirs
    ok, ov = ours
    if tk == "err":
        seen["invalid"] += 1
        event("torch refuses")
        assert ok == "err", f"torch raises {type(tv).__name__}: {str(tv).splitlines()[0]!r}; ours returned"
        assert isinstance(ov, gpu_nn.KernelInputError), f"ours raised {type(ov).__name__}: {ov} (torch: {tv})"
        return False
    seen["valid"] += 1
    event("torch accepts")
    if ok == "err":
        raise AssertionError(f"torch accepts, ours raises {type(ov).__name__}: {ov}") from ov
    return True


def _close_with_inf(actual, expected, dtype, k, what):
    """assert_close, with infinities (all-padding max windows) required at the same places
    with the same sign and left out of the error (inf - inf is NaN)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    inf = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf) and torch.equal(a[inf], e[inf]), f"{what}: infinities differ"
    assert_close(torch.where(inf, 0.0, a), torch.where(inf, 0.0, e), dtype, k=k, what=what)


def _check_counts(seen, valid, invalid):
    assert seen["valid"] >= valid and seen["invalid"] >= invalid, (
        f"strategy drew {dict(seen)}: needs >= {valid} valid and >= {invalid} invalid configurations")


def _grads(out, inputs, g):
    inputs = [t for t in inputs if t is not None and t.requires_grad]
    if not inputs:
        return ()
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _normal(rng, shape, scale=1.0):
    """float64 standard normals of ``shape`` (0-d included) as a tensor."""
    return torch.from_numpy(np.asarray(rng.standard_normal(shape) * scale, dtype=np.float64))


def _layout(x: torch.Tensor, which: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout (a view of a larger buffer)."""
    if which == "noncontig" and x.dim() >= 1:
        big = torch.full((*x.shape[:-1], 2 * x.shape[-1] + 1), float("nan"), dtype=x.dtype, device=x.device)
        big[..., 1::2] = x
        return big[..., 1::2]
    if which == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if which == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


# =========================================================================== pooling

def _as_arg(draw, vals, nd):
    """``vals`` (nd ints) as torch accepts them: an int when all equal (sometimes), a
    1-tuple when all equal (sometimes), else the tuple."""
    form = draw(st.sampled_from(["int", "tuple", "one"]))
    if len(set(vals)) == 1 and form == "int":
        return vals[0]
    if len(set(vals)) == 1 and form == "one":
        return (vals[0],)
    return tuple(vals)


MUTATIONS = ["ndim", "zero_size", "kernel", "stride", "padding", "big_padding", "dilation", "arity",
             "too_small", "divisor"]


@st.composite
def pool_configs(draw, valid_only=False):
    """(op, shape, layout, kwargs) for max/min/avg pooling, 1d or 2d: a geometry drawn from
    plausible ranges (not always valid: padding up to k/2 + 1, windows larger than the input),
    then, unless ``valid_only``, up to two mutations towards something torch refuses."""
    kind = draw(st.sampled_from(["max", "min", "avg", "avg"]))
    nd = draw(st.sampled_from([1, 2, 2] if valid_only else [1, 2]))
    spatial = [draw(st.integers(1, 9)) for _ in range(nd)]
    batch = draw(st.sampled_from([[], [1], [2], [0]] if not valid_only else [[], [1], [2]]))
    chans = [draw(st.integers(1, 3))]
    k = [draw(st.integers(1, 4 if valid_only else 5)) for _ in range(nd)]
    s = [draw(st.integers(1, 3)) for _ in range(nd)]
    p = [draw(st.integers(0, kv // 2 if valid_only else kv // 2 + 1)) for kv in k]
    d = [draw(st.integers(1, 2 if valid_only else 3)) for _ in range(nd)] if kind != "avg" else [1] * nd
    stride_form = draw(st.sampled_from(["given", "given", "given", "none", "empty"]))
    divisor = draw(st.sampled_from([None, None, None, 1, 3, 7, -2]))
    arity = {}
    muts = [] if valid_only else draw(st.lists(st.sampled_from(MUTATIONS), max_size=2))
    for m in muts:
        i = draw(st.integers(0, nd - 1))
        if m == "ndim":
            batch = draw(st.sampled_from([[2, 1], []]))
            if not batch:
                chans = []
        elif m == "zero_size":
            (spatial if draw(st.booleans()) or not chans else chans)[0] = 0
        elif m == "kernel":
            k[i] = draw(st.sampled_from([0, -1]))
        elif m == "stride":
            s[i], stride_form = draw(st.sampled_from([0, -1])), "given"
        elif m == "padding":
            p[i] = -1
        elif m == "big_padding":
            p[i] = k[i] // 2 + draw(st.integers(1, 2))
        elif m == "dilation":
            d[i] = draw(st.sampled_from([0, -2]))
        elif m == "arity":
            arity[draw(st.sampled_from(["kernel_size", "stride", "padding", "dilation"]))] = draw(
                st.sampled_from([0, nd + 1]))
        elif m == "too_small":
            k[i] = spatial[i] + 2 * p[i] + 1
        elif m == "divisor":
            divisor = 0
    shape = (*batch, *chans, *spatial)
    kw = {"kernel_size": _as_arg(draw, k, nd), "padding": _as_arg(draw, p, nd)}
    kw["stride"] = {"given": _as_arg(draw, s, nd), "none": None, "empty": ()}[stride_form]
    if kind != "avg":
        kw["dilation"] = _as_arg(draw, d, nd)
    for name, n in arity.items():
        if name in kw:
            vals = {"kernel_size": k, "stride": s, "padding": p, "dilation": d}[name]
            kw[name] = tuple((vals * 2)[:n])
    # ceil_mode windows that overhang the padding are where divisors go wrong: favoured when
    # the geometry is valid (the kernel properties' strategy)
    mostly = st.sampled_from([True, True, False]) if valid_only else st.booleans()
    kw["ceil_mode"] = draw(mostly)
    if kind == "avg":
        kw["count_include_pad"] = draw(mostly)
        if nd == 2:
            kw["divisor_override"] = divisor
    else:
        kw["return_indices"] = draw(st.booleans())
    layout = draw(st.sampled_from(["contig", "noncontig", "channels_last", "transposed"]))
    return f"{kind}_pool{nd}d", shape, layout, kw


def _torch_pool(name):
    kind, rest = name.split("_", 1)
    if kind != "min":
        return getattr(TF, name)
    tfn = getattr(TF, "max_" + rest)

    def min_pool(x, **kw):
        out = tfn(-x, **kw)
        return (-out[0], out[1]) if isinstance(out, tuple) else -out

    return min_pool


def _distinct(rng, shape, dtype=F64):
    """Distinct values (a scaled permutation, exact in float32 too): no ties anywhere."""
    n = math.prod(shape)
    return torch.from_numpy((rng.permutation(n).reshape(shape) - n / 2) * 0.25).to(dtype)


def _check_pool_against_torch(name, shape, layout, kw, seed, seen):
    note(f"{name} shape={shape} layout={layout} kw={kw} seed={seed}")
    rng = np.random.default_rng(seed)
    x0 = _distinct(rng, shape)
    ours_fn, theirs_fn = getattr(F, name), _torch_pool(name)
    xt = _layout(x0, layout).requires_grad_()
    xo = _layout(x0, layout).requires_grad_()
    theirs = _outcome(lambda: theirs_fn(xt, **kw))
    with gpu_nn.backend("reference"):
        ours = _outcome(lambda: ours_fn(xo, **kw))
    if not _same_verdict(theirs, ours, seen):
        return
    yt, yo = theirs[1], ours[1]
    it = io = None
    if isinstance(yt, tuple):
        (yt, it), (yo, io) = yt, yo
    assert yo.shape == yt.shape and yo.dtype == yt.dtype, f"{tuple(yo.shape)} {yo.dtype} vs {tuple(yt.shape)}"
    if name.startswith("avg"):
        assert_close(yo, yt, F64, k=49, what=f"{name} forward")
    else:
        assert torch.equal(yo, yt), f"{name} values differ: max |d| {max_rel_err(yo, yt)}"
    # a window made only of padding (dilation on tiny inputs): -inf, and torch's index there
    # is out of range (its backward would write out of bounds), so it is compared by hand
    pad_only = torch.isinf(yt)
    if pad_only.any():
        event("all-padding window")
    if it is not None:
        assert io.dtype == torch.int64
        assert torch.equal(io[~pad_only], it[~pad_only]), f"{name} indices differ"
    if yt.numel() == 0:
        return
    g = _normal(rng, tuple(yt.shape))
    with gpu_nn.backend("reference"):
        (go,) = torch.autograd.grad(yo, xo, g)
    if pad_only.any():
        # expected: scatter-add of g at torch's (in-range) indices of the other windows
        _, idx = (_torch_pool(name)(x0, **{**kw, "return_indices": True}))
        lead = x0.shape[:-nd_of(name)]
        gexp = torch.zeros(lead + (math.prod(x0.shape[-nd_of(name):]),), dtype=F64)
        gg = torch.where(pad_only, 0.0, g).reshape(*lead, -1)
        ii = torch.where(pad_only, 0, idx).reshape(*lead, -1)
        gexp.scatter_add_(-1, ii, gg)
        gt = gexp.reshape(x0.shape)
    else:
        (gt,) = torch.autograd.grad(yt, xt, g)
    k = math.prod(_as_tuple(kw["kernel_size"], nd_of(name)))
    assert_close(go, gt, F64, k=k, what=f"{name} backward")


def nd_of(name):
    return 2 if name.endswith("2d") else 1


def _as_tuple(v, n):
    return (v,) * n if isinstance(v, int) else (tuple(v) * n if len(v) == 1 else tuple(v))


def test_pool_reference_matches_torch_or_both_refuse():
    seen = collections.Counter()

    @settings(max_examples=300, **PROFILE)
    @given(cfg=pool_configs(), seed=SEEDS)
    def prop(cfg, seed):
        _check_pool_against_torch(*cfg, seed, seen)

    prop()
    _check_counts(seen, valid=40, invalid=40)


def test_pool_reference_valid_geometries_match_torch():
    """Valid geometries only (the property above spends most examples on refusals)."""
    seen = collections.Counter()

    @settings(max_examples=150, **PROFILE)
    @given(cfg=pool_configs(valid_only=True), seed=SEEDS)
    def prop(cfg, seed):
        _check_pool_against_torch(*cfg, seed, seen)

    prop()
    _check_counts(seen, valid=60, invalid=0)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_pool_backend_matches_reference(backend, device):
    seen = collections.Counter()

    @settings(max_examples=40, **PROFILE)
    @given(cfg=pool_configs(valid_only=True), seed=SEEDS)
    # pinned: a ceil_mode window overhanging the padding in H and W (count_include_pad's
    # divisor stops at the padded edge), and an all-padding max window (dilation)
    @example(cfg=("avg_pool2d", (1, 2, 5, 7), "channels_last",
                  dict(kernel_size=(2, 3), stride=2, padding=(0, 1), ceil_mode=True, count_include_pad=True,
                       divisor_override=None)), seed=1)
    @example(cfg=("max_pool2d", (1, 1, 2, 2), "contig",
                  dict(kernel_size=2, stride=1, padding=1, dilation=3, ceil_mode=False, return_indices=True)), seed=2)
    def prop(cfg, seed):
        name, shape, layout, kw = cfg
        note(f"{name} shape={shape} layout={layout} kw={kw} seed={seed}")
        fn = getattr(F, name)
        rng = np.random.default_rng(seed)
        x0 = _distinct(rng, shape)
        xr = _layout(x0, layout).requires_grad_()
        with gpu_nn.backend("reference"):
            ref = _outcome(lambda: fn(xr, **kw))
        if ref[0] == "err":  # output size < 1: torch refuses it too (the properties above)
            assert isinstance(ref[1], gpu_nn.KernelInputError), ref[1]
            seen["invalid"] += 1
            return
        seen["valid"] += 1
        yr, ir = ref[1] if isinstance(ref[1], tuple) else (ref[1], None)
        g = _normal(rng, tuple(yr.shape)).float().double()
        x = _layout(x0.to(device=device, dtype=torch.float32), layout).requires_grad_()
        with gpu_nn.backend(backend):
            out = fn(x, **kw)
            y, i = out if isinstance(out, tuple) else (out, None)
            (gx,) = torch.autograd.grad(y, x, g.to(device=device, dtype=torch.float32)) if y.numel() else (torch.zeros_like(x),)
        with gpu_nn.backend("reference"):
            (gr,) = torch.autograd.grad(yr, xr, g) if yr.numel() else (torch.zeros_like(xr),)
        k = math.prod(_as_tuple(kw["kernel_size"], nd_of(name)))
        assert y.dtype == torch.float32 and y.shape == yr.shape
        _close_with_inf(y, yr, torch.float32, k=k, what=f"{name} forward")
        if i is not None:
            assert torch.equal(i.cpu(), ir), f"{name} indices differ"
        assert_close(gx, gr, torch.float32, k=k, what=f"{name} backward")

    prop()
    _check_counts(seen, valid=10, invalid=0)


# =========================================================================== linear

ACTS = {None: lambda y: y, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@st.composite
def linear_configs(draw):
    lead = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 0]), max_size=3)))
    K = draw(st.integers(1, 6))
    O = draw(st.integers(1, 5))
    wkind = draw(st.sampled_from(["2d", "2d", "2d", "1d", "3d"]))
    kx = draw(st.sampled_from([K] * 6 + [K + 1]))  # a mismatched inner dim, sometimes
    bias = draw(st.sampled_from(["O", "O", "none", "1", "scalar", "wrong", "f32"]))
    act = draw(st.sampled_from(list(ACTS)))
    layout = draw(st.sampled_from(["contig", "noncontig", "transposed"]))
    wlayout = draw(st.sampled_from(["contig", "transposed"]))
    return lead, K, O, kx, wkind, bias, act, layout, wlayout


def test_linear_matches_torch_or_both_refuse():
    seen = collections.Counter()

    @settings(max_examples=150, **PROFILE)
    @given(cfg=linear_configs(), seed=SEEDS)
    def prop(cfg, seed):
        note(f"cfg={cfg} seed={seed}")
        lead, K, O, kx, wkind, bias, act, layout, wlayout = cfg
        rng = np.random.default_rng(seed)
        x = _layout(_normal(rng, (*lead, kx)), layout).requires_grad_()
        wshape = {"2d": (O, K), "1d": (K,), "3d": (1, O, K)}[wkind]
        w = _layout(_normal(rng, wshape), wlayout).requires_grad_()
        Ob = 1 if wkind == "1d" else O
        b = {"O": lambda: _normal(rng, Ob), "none": lambda: None,
             "1": lambda: _normal(rng, 1), "scalar": lambda: torch.tensor(0.7, dtype=F64),
             "wrong": lambda: _normal(rng, Ob + 1),
             "f32": lambda: torch.randn(Ob)}[bias]()
        if b is not None:
            b.requires_grad_()
        theirs = _outcome(lambda: ACTS[act](TF.linear(x, w, b)))
        if wkind == "1d" and b is not None:
            # torch's verdict on a 1-D weight with a bias depends on its internal path, chosen by
            # the input's rank and memory layout: a contiguous [4, 2, 3] input with a [1] bias
            # fails in addmm ("mat2 must be a matrix"), its transposed copy succeeds, a strided
            # 1-D input fails in an in-place add. Ours computes the [1, K] weight's result
            # (squeezed), which is what torch returns whenever it succeeds
            subst = _outcome(lambda: ACTS[act](TF.linear(x, w[None], b)).squeeze(-1))
            if theirs[0] != subst[0]:
                event("torch's layout-dependent verdict on a 1-D weight with bias")
            theirs = subst
        with gpu_nn.backend("reference"):
            ours = _outcome(lambda: F.linear(x, w, b, activation=act))
        if bias == "f32" and theirs[0] == "ok":
            # torch's matmul-then-add path (inputs of rank >= 3 it does not flatten, 1-d inputs
            # with a 0-d bias) type-promotes a bias of another dtype, its addmm path refuses it;
            # ours refuses it on every path, with addmm's message
            event("torch's layout-dependent acceptance of a float32 bias")
            seen["invalid"] += 1
            assert ours[0] == "err" and isinstance(ours[1], gpu_nn.KernelInputError), ours
            return
        if not _same_verdict(theirs, ours, seen):
            return
        yt, yo = theirs[1], ours[1]
        assert yo.shape == yt.shape and yo.dtype == yt.dtype
        assert_close(yo, yt, F64, k=K, what="linear forward")
        g = _normal(rng, tuple(yt.shape))
        with gpu_nn.backend("reference"):
            go = _grads(yo, [x, w, b], g)
        gt = _grads(yt, [x, w, b], g)
        for a, t, what in zip(go, gt, ("x", "w", "b")):
            assert_close(a, t, F64, k=max(K, x.numel() // max(kx, 1)), what=f"linear grad {what}")

    prop()
    _check_counts(seen, valid=40, invalid=15)


# =========================================================================== softmax / log_softmax


@st.composite
def softmax_configs(draw):
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 7, 0]), max_size=4)))
    n = max(len(shape), 1)
    dim = draw(st.integers(-n - 1, n))  # one out of range on each side
    perm = draw(st.permutations(range(len(shape))))
    return draw(st.sampled_from(["softmax", "log_softmax"])), shape, dim, tuple(perm), draw(st.sampled_from(["contig", "noncontig"]))


def test_softmax_matches_torch_or_both_refuse():
    seen = collections.Counter()

    @settings(max_examples=150, **PROFILE)
    @given(cfg=softmax_configs(), seed=SEEDS)
    def prop(cfg, seed):
        note(f"cfg={cfg} seed={seed}")
        name, shape, dim, perm, layout = cfg
        rng = np.random.default_rng(seed)
        base = _layout(_normal(rng, shape, 4), layout)
        # a permuted view: the reduced dim is strided in memory
        x = base.permute(perm).requires_grad_() if shape else base.requires_grad_()
        theirs = _outcome(lambda: getattr(TF, name)(x, dim))
        with gpu_nn.backend("reference"):
            ours = _outcome(lambda: getattr(F, name)(x, dim))
        if not _same_verdict(theirs, ours, seen):
            return
        yt, yo = theirs[1], ours[1]
        assert yo.shape == yt.shape and yo.dtype == yt.dtype
        assert_close(yo, yt, F64, what=name)
        g = _normal(rng, tuple(yt.shape))
        with gpu_nn.backend("reference"):
            (go,) = torch.autograd.grad(yo, x, g)
        (gt,) = torch.autograd.grad(yt, x, g)
        assert_close(go, gt, F64, k=max(x.shape[dim] if x.dim() else 1, 1), what=name + " backward")

    prop()
    _check_counts(seen, valid=60, invalid=15)


# =========================================================================== cross_entropy


@st.composite
def ce_configs(draw):
    prob = draw(st.booleans())
    ndim = draw(st.sampled_from([1, 2, 2, 3, 4]))
    C = draw(st.integers(1, 5))
    N = draw(st.sampled_from([1, 2, 3, 4, 0]))
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(max(ndim - 2, 0)))
    shape = (C,) if ndim == 1 else (N, C, *spatial)
    weight = draw(st.sampled_from(["none", "pos", "pos", "zeros", "wrong", "f32"]))
    reduction = draw(st.sampled_from(["mean", "mean", "sum", "none", "bogus"]))
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.5, 1.0, 1.5, -0.1]))
    if prob:
        ignore = draw(st.sampled_from([-100, -100, -1, 0]))
        target = draw(st.sampled_from(["softmax", "softmax", "random", "grad", "f32", "long", "shape"]))
    else:
        ignore = draw(st.sampled_from([-100, -1, 0, 2, C + 3]))
        target = draw(st.sampled_from(["ok", "ok", "ok", "ignored", "ignored", "all_ignored", "uint8", "int32",
                                       "out_of_range", "negative", "batch", "shape"]))
    layout = draw(st.sampled_from(["contig", "noncontig", "transposed"]))
    return prob, shape, weight, reduction, smoothing, ignore, target, layout


def _ce_target(rng, prob, shape, ignore, target):
    C = shape[0] if len(shape) == 1 else shape[1]
    if prob:
        if target == "long":
            return torch.from_numpy(rng.integers(0, C, shape))
        tshape = shape if target != "shape" else (*shape[:-1], shape[-1] + 1)
        if target == "random":
            return _normal(rng, tshape)
        t = torch.softmax(_normal(rng, tshape), dim=0 if len(shape) == 1 else 1)
        if target == "f32":
            return t.float()
        return t.requires_grad_(target == "grad")
    tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
    if target == "batch":
        tshape = (tshape[0] + 1, *tshape[1:]) if tshape else (2,)
    elif target == "shape":
        tshape = (*tshape, 2)
    t = torch.from_numpy(rng.integers(0, C, tshape))
    if t.numel():
        flat = t.view(-1)
        if target == "ignored":
            flat[rng.random(flat.shape[0]) < 0.4] = ignore
        elif target == "all_ignored":
            flat[:] = ignore
        elif target == "out_of_range":
            flat[rng.integers(flat.shape[0])] = C
        elif target == "negative":
            flat[rng.integers(flat.shape[0])] = -2
    if target == "uint8":
        return t.to(torch.uint8)
    if target == "int32":
        return t.int()
    return t


def test_cross_entropy_matches_torch_or_both_refuse():
    seen = collections.Counter()

    @settings(max_examples=300, **PROFILE)
    @given(cfg=ce_configs(), seed=SEEDS)
    def prop(cfg, seed):
        note(f"cfg={cfg} seed={seed}")
        prob, shape, weight, reduction, smoothing, ignore, target, layout = cfg
        rng = np.random.default_rng(seed)
        C = shape[0] if len(shape) == 1 else shape[1]
        x = _layout(_normal(rng, shape, 2), layout).requires_grad_()
        t = _ce_target(rng, prob, shape, ignore, target)
        w = {"none": None, "pos": torch.from_numpy(rng.random(C) + 0.2), "f32": torch.rand(C),
             "zeros": torch.from_numpy(np.where(rng.random(C) < 0.5, 0.0, rng.random(C) + 0.2)),
             "wrong": torch.from_numpy(rng.random(C + 1) + 0.2)}[weight]
        kw = dict(weight=w, ignore_index=ignore, reduction=reduction, label_smoothing=smoothing)
        theirs = _outcome(lambda: TF.cross_entropy(x, t, **kw))
        if theirs[0] == "err" and "gather(): Expected dtype int32/int64 for index" in str(theirs[1]):
            # torch's label-smoothing 'mean' with a weight gathers the weight with the raw uint8
            # target, an accident of its implementation (the same uint8 target is accepted
            # everywhere else for 1-d / 2-d inputs); ours gives the int64 target's result
            event("torch's uint8 gather failure")
            theirs = _outcome(lambda: TF.cross_entropy(x, t.long(), **kw))
        with gpu_nn.backend("reference"):
            ours = _outcome(lambda: F.cross_entropy(x, t, **kw))
        if not _same_verdict(theirs, ours, seen):
            return
        yt, yo = theirs[1], ours[1]
        assert yo.shape == yt.shape and yo.dtype == yt.dtype
        if torch.isnan(yt).any():
            event("NaN loss (nothing to average)")
        # a float32 probability target: torch smooths it in float32 (target * (1 - eps) + eps / C
        # in the target's dtype), ours after casting it to the input's dtype
        rtol_dtype = torch.float32 if target == "f32" else F64
        assert_close(yo, yt, rtol_dtype, k=C * max(x.numel(), 1), what="cross_entropy")
        g = _normal(rng, tuple(yt.shape))
        with gpu_nn.backend("reference"):
            go = _grads(yo, [x, t], g)
        tb = _outcome(lambda: _grads(yt, [x, t], g))
        if tb[0] == "err":
            # torch's forward returns early for an empty uint8 target of a K-dim input, its
            # backward then refuses the uint8 target; ours has a (zero-size) gradient
            event("torch's backward refuses what its forward accepted")
            assert target == "uint8" and x.numel() == 0, tb[1]
            return
        gt = tb[1]
        for a, b, what in zip(go, gt, ("input", "target")):
            if b is None:
                assert a is None or not a.abs().sum(), what
                continue
            assert_close(a, b, rtol_dtype, k=C * max(x.numel(), 1), what=f"cross_entropy grad {what}")

    prop()
    _check_counts(seen, valid=60, invalid=60)


# =========================================================================== flatten


def test_flatten_matches_torch_or_both_refuse():
    seen = collections.Counter()

    @settings(max_examples=100, **PROFILE)
    @given(shape=st.lists(st.sampled_from([1, 2, 3, 0]), max_size=4).map(tuple), start=st.integers(-8, 7),
           end=st.integers(-8, 7), ordered=st.sampled_from([True, True, True, False]),
           in_range=st.sampled_from([True, False]), perm_seed=SEEDS)
    def prop(shape, start, end, ordered, in_range, perm_seed):
        n = max(len(shape), 1)
        # half the draws keep both dims in range; the other half put one of them one past
        # either end, so neither kind can run short by chance
        start, end = (v % (2 * n) - n for v in (start, end))
        if not in_range:
            past = n if end % 2 else -n - 1
            start, end = (past, end) if start % 2 else (start, past)
        if ordered and -n <= min(start, end) and max(start, end) < n and start % n > end % n:
            start, end = end, start
        rng = np.random.default_rng(perm_seed)
        x = _normal(rng, shape)
        x = (x.permute(*rng.permutation(len(shape)).tolist()) if shape else x).requires_grad_()
        theirs = _outcome(lambda: torch.flatten(x, start, end))
        ours = _outcome(lambda: F.flatten(x, start, end))
        if not _same_verdict(theirs, ours, seen):
            return
        yt, yo = theirs[1], ours[1]
        assert yo.shape == yt.shape and torch.equal(yo, yt)
        assert (yo.data_ptr() == x.data_ptr() and yo._base is not None) == (yt.data_ptr() == x.data_ptr() and yt._base is not None)

    prop()
    _check_counts(seen, valid=20, invalid=15)


# =========================================================================== activations


@st.composite
def strided_views(draw):
    """(base shape, a chain of view ops (op, a, b)): permutes, stepped slices, expands of
    size-1 dims, diagonals."""
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 4, 3, 1, 0]), max_size=4)))
    ops = [(draw(st.sampled_from(["permute", "slice", "expand", "diag"])), draw(st.integers(0, 7)),
            draw(st.integers(0, 7))) for _ in range(draw(st.integers(1, 3)))]
    return shape, ops


def _apply_views(x, ops):
    for op, a, b in ops:
        n = x.dim()
        if n == 0:
            break
        if op == "permute":
            perm = list(range(n))[a % n:] + list(range(n))[:a % n]
            if b % 2 and n >= 2:
                perm[0], perm[-1] = perm[-1], perm[0]
            x = x.permute(*perm)
        elif op == "slice":
            d = a % n
            x = x[(slice(None),) * d + (slice(b % 2, None, 2),)]
        elif op == "expand":
            x = x.expand(*[2 + b % 2 if s == 1 else -1 for s in x.shape])
        elif op == "diag" and n >= 2:
            x = x.diagonal(offset=b % 2, dim1=a % n, dim2=(a + 1) % n)
    return x


ACT_OPS = {"relu": (F.relu, torch.relu), "sigmoid": (F.sigmoid, torch.sigmoid), "tanh": (F.tanh, torch.tanh)}


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_activation_on_strided_views(backend, device):
    seen = collections.Counter()
    dtype = F64 if backend == "reference" else torch.float32

    # the mix the closing assert asks for is drawn by chance (an empty view was missing in one
    # run of 40): these examples always run, on top of the fresh draws
    @settings(max_examples=120 if backend == "reference" else 40, **PROFILE)
    @given(view=strided_views(), name=st.sampled_from(list(ACT_OPS)), seed=SEEDS, inplace=st.booleans())
    @example(view=((2, 0, 3), [("permute", 1, 0)]), name="relu", seed=1, inplace=True)
    @example(view=((3, 5), [("slice", 1, 1)]), name="tanh", seed=2, inplace=True)
    @example(view=((4, 1, 3), [("expand", 0, 1), ("permute", 1, 1)]), name="sigmoid", seed=3, inplace=False)
    def prop(view, name, seed, inplace):
        shape, ops = view
        note(f"shape={shape} ops={ops} seed={seed}")
        rng = np.random.default_rng(seed)
        base = _normal(rng, shape, 3).to(device=device, dtype=dtype).requires_grad_()
        xv = _apply_views(base, ops)
        event(f"contiguous={xv.is_contiguous()}, empty={xv.numel() == 0}")
        seen["contig" if xv.is_contiguous() else "strided"] += 1
        seen["empty" if xv.numel() == 0 else "nonempty"] += 1
        ours, theirs = ACT_OPS[name]
        with gpu_nn.backend(backend):
            y = ours(xv)
        # the expected values: torch (float64) on the reference, the reference on kernels
        if backend == "reference":
            leaf = base
            yt = theirs(xv)
        else:
            leaf = base.detach().cpu().double().requires_grad_()
            with gpu_nn.backend("reference"):
                yt = ours(_apply_views(leaf, ops))
        assert y.shape == xv.shape and y.dtype == dtype
        assert_close(y, yt, dtype, what=f"{name} forward")
        g = _normal(rng, tuple(y.shape)).to(dtype)
        with gpu_nn.backend(backend):
            (gb,) = torch.autograd.grad(y, base, g.to(device))
        with gpu_nn.backend("reference"):
            (gbt,) = torch.autograd.grad(yt, leaf, g.to(yt.dtype))
        assert_close(gb, gbt, dtype, k=27, what=f"{name} backward (through the view)")
        if inplace and name == "relu":
            # relu(inplace) writes through a view; expanded (overlapping) views are refused
            # by torch, so only views without internal overlap are tried
            xc = base.detach().clone()
            v = _apply_views(xc, ops)
            if not any(s == 0 and n > 1 for s, n in zip(v.stride(), v.shape)):
                expect = xc.clone()
                _apply_views(expect, ops).relu_()
                with gpu_nn.backend(backend):
                    out = F.relu(v, inplace=True)
                assert out is v
                assert torch.equal(xc, expect), "relu(inplace=True) through a view"

    prop()
    assert seen["strided"] >= 2 and seen["empty"] >= 1 and seen["nonempty"] >= 3, dict(seen)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_softmax_backend_matches_reference(backend, device):
    """Triton softmax / log_softmax on random shapes, dims (empty ones included) and strided
    views against the reference (float32 values, float64 reference on the same values). The
    examples are derandomized (a fixed sequence from the test itself): the guard below counts
    non-empty ones, and random draws once gave 9 of 25 in a clean-clone CI run (0 of 60 alone:
    the draws in a worker's process after other tests differ); the reference's property above
    keeps drawing anew (150 examples)."""
    seen = collections.Counter()

    @settings(max_examples=25, **{**PROFILE, "derandomize": True})
    @given(cfg=softmax_configs(), seed=SEEDS)
    def prop(cfg, seed):
        name, shape, dim, perm, layout = cfg
        n = max(len(shape), 1)
        dim = min(max(dim, -n), n - 1)  # valid dims only (refusals are the property above's)
        note(f"{name} shape={shape} dim={dim} perm={perm} layout={layout} seed={seed}")
        rng = np.random.default_rng(seed)
        base = _layout(_normal(rng, shape, 4).float().double(), layout)
        x64 = (base.permute(perm) if shape else base).requires_grad_()
        seen["empty" if x64.numel() == 0 else "nonempty"] += 1
        with gpu_nn.backend("reference"):
            yr = getattr(F, name)(x64, dim)
        g = _normal(rng, tuple(yr.shape)).float().double()
        with gpu_nn.backend("reference"):
            (gr,) = torch.autograd.grad(yr, x64, g) if yr.numel() else (torch.zeros_like(x64),)
        x = (_layout(base.float().to(device), layout).permute(perm) if shape else base.float().to(device)).requires_grad_()
        with gpu_nn.backend(backend):
            y = getattr(F, name)(x, dim)
            (gx,) = torch.autograd.grad(y, x, g.float().to(device)) if y.numel() else (torch.zeros_like(x),)
        k = x.shape[dim] if x.dim() else 1
        assert y.shape == yr.shape and y.dtype == torch.float32
        assert_close(y, yr, torch.float32, k=k, what=f"{name} forward")
        assert_close(gx, gr, torch.float32, k=k, what=f"{name} backward")

    prop()
    assert seen["nonempty"] >= 10, dict(seen)  # empty dims: test_regression_softmax_over_an_empty_dim


# =========================================================================== regressions
# Disagreements the properties above found, pinned as plain tests.


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((0,), 0), ((2, 0, 3), 1), ((0, 3), 0)])
def test_regression_softmax_over_an_empty_dim(backend, device, name, shape, dim):
    # the reference raised numpy's "zero-size array to reduction operation maximum", the
    # Triton launcher "cannot reshape tensor of 0 elements into shape [-1, 0]"
    x = torch.randn(shape, device=device, requires_grad=True)
    with gpu_nn.backend(backend):
        y = getattr(F, name)(x, dim)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert y.shape == x.shape and gx.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("eps", [-0.1, -5.0, float("nan")])
def test_regression_cross_entropy_nonpositive_smoothing_is_no_smoothing(prob, eps):
    # torch checks only label_smoothing <= 1 and ignores values <= 0; ours refused them
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.softmax(torch.randn(4, 3, dtype=F64), 1) if prob else torch.tensor([0, 2, 1, 2])
    with gpu_nn.backend("reference"):
        y = F.cross_entropy(x, t, label_smoothing=eps)
    torch.testing.assert_close(y, TF.cross_entropy(x, t, label_smoothing=eps))
    torch.testing.assert_close(y, TF.cross_entropy(x, t))
    with pytest.raises(gpu_nn.KernelInputError, match="label_smoothing must be between 0.0 and 1.0. Got: 1.5"):
        F.cross_entropy(x, t, label_smoothing=1.5)


@pytest.mark.parametrize("shape", [(2, 3, 2), (2, 3, 2, 2)])
def test_regression_cross_entropy_uint8_target_refused_for_kdim_input(shape):
    # torch's nll_loss2d path (inputs of rank >= 3) takes int64 targets only; ours accepted uint8
    x = torch.randn(shape, dtype=F64)
    t = torch.zeros((shape[0], *shape[2:]), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="expected scalar type Long but found Byte"):
        TF.cross_entropy(x, t)
    with pytest.raises(gpu_nn.KernelInputError, match="expected scalar type Long but found Byte"):
        F.cross_entropy(x, t)
    x2 = torch.randn(4, 3, dtype=F64)  # 1-d / 2-d inputs still take uint8, as torch
    t2 = torch.tensor([0, 2, 1, 2], dtype=torch.uint8)
    torch.testing.assert_close(F.cross_entropy(x2, t2), TF.cross_entropy(x2, t2))


@pytest.mark.parametrize("xdt,tdt,wdt", [(F64, torch.float32, torch.float32), (torch.float32, F64, None),
                                         (torch.float32, torch.float32, F64), (torch.float16, torch.float32, None)])
def test_regression_cross_entropy_probability_targets_promote_dtypes(xdt, tdt, wdt):
    # torch type-promotes input, probability target and weight (and so accepts a weight of
    # another float dtype there); ours refused the weight and computed in the input's dtype
    x = torch.randn(4, 3, dtype=xdt, requires_grad=True)
    t = torch.softmax(torch.randn(4, 3, dtype=F64), 1).to(tdt)
    w = None if wdt is None else torch.rand(3, dtype=wdt) + 0.2
    with gpu_nn.backend("reference"):
        y = F.cross_entropy(x, t, weight=w, label_smoothing=0.1)
        (gx,) = torch.autograd.grad(y, x)
    yt = TF.cross_entropy(x, t, weight=w, label_smoothing=0.1)
    (gt,) = torch.autograd.grad(yt, x)
    assert y.dtype == yt.dtype and gx.dtype == gt.dtype == xdt
    # torch rounds part of the computation in the narrowest dtype involved (log_softmax in the
    # input's, the smoothing in the target's): that bounds the agreement
    low = min((d for d in (xdt, tdt, wdt) if d is not None), key=lambda d: torch.finfo(d).bits)
    assert_close(y, yt, low, k=12, what="loss")
    assert_close(gx, gt, low, k=12, what="grad")
    with pytest.raises(gpu_nn.KernelInputError, match="expected scalar type"):  # class indices: refused, as torch
        F.cross_entropy(x.detach().double(), torch.tensor([0, 1, 2, 0]), weight=torch.rand(3))


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_regression_cross_entropy_smoothing_mean_over_zero_weight_is_nan(backend, device):
    # every target's weight is 0: torch's 'mean' is NaN (its nll term is 0 / 0) with NaN
    # gradients; ours divided the smoothed sum by 0 and gave inf (and +-inf gradients)
    x = torch.randn(3, 2, device=device, requires_grad=True)
    t = torch.tensor([0, 0, 0], device=device)
    w = torch.tensor([0.0, 0.5], device=device)
    with gpu_nn.backend(backend):
        y = F.cross_entropy(x, t, weight=w, label_smoothing=0.1)
        (gx,) = torch.autograd.grad(y, x)
    yt = TF.cross_entropy(x.cpu(), t.cpu(), weight=w.cpu(), label_smoothing=0.1)
    assert torch.isnan(yt) and torch.isnan(y.cpu())
    assert torch.isnan(gx).all()


# =========================================================================== extreme values
# Every family on values at the edges of floating point (issue 19 goal): signed zeros,
# float32 / float64 denormals, +-1e38, NaN, +-inf mixed into normal values, on odd shapes
# (0, 1, primes), against torch in float64 on the reference backend. NaN and +-inf must sit
# exactly where torch's sit (masks compared exactly, the sign of infinities included); finite
# values agree to a tolerance scaled by the largest finite magnitude involved (sums over
# +-1e38 cancel differently in another order).

EXTREMES = (0.0, -0.0, 1e-38, -1e-38, 1.4e-45, 5e-324, 1e38, -1e38, float("nan"), float("inf"), float("-inf"))
ODD = st.sampled_from([1, 2, 3, 5, 7])


def _extreme(rng, shape, density, finite=EXTREMES[:-3]):
    """float64 normals of ``shape`` with a share ``density`` of entries replaced by EXTREMES
    (the finite ones from ``finite``)."""
    x = rng.standard_normal(shape)
    if x.size and density:
        m = rng.random(shape) < density
        # half of the replaced entries NaN / +-inf, half the finite extremes
        special = np.asarray(EXTREMES[-3:] * 8 + tuple(finite) * (24 // max(len(finite), 1)))
        x[m] = special[rng.integers(0, len(special), int(m.sum()))]
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def _finite_scale(*ts):
    """The largest finite magnitude among the tensors (1 at least)."""
    s = 1.0
    for t in ts:
        if t is not None and t.numel():
            t = t.detach().double()
            f = t[torch.isfinite(t)]
            if f.numel():
                s = max(s, float(f.abs().max()))
    return s


def _same_nonfinite(actual, expected, what, scale=1.0, k=1, dtype=F64, elementwise=False):
    """NaN, +inf and -inf at exactly the same places; the finite rest within tol(dtype, k)
    of ``scale`` (the magnitude of the terms the result sums), or with ``elementwise`` of each
    expected value (at least 1)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    for name, fa, fe in (("NaN", torch.isnan(a), torch.isnan(e)), ("+inf", a == math.inf, e == math.inf),
                         ("-inf", a == -math.inf, e == -math.inf)):
        assert torch.equal(fa, fe), (f"{what}: {name} at {fa.nonzero().tolist()[:6]} (ours) vs "
                                     f"{fe.nonzero().tolist()[:6]} (torch)")
    fin = torch.isfinite(e)
    if fin.any():
        if elementwise:
            rel = (a[fin] - e[fin]).abs() / e[fin].abs().clamp(min=1.0)
            err, bound = float(rel.max()), tol(dtype, k)
        else:
            err, bound = float((a[fin] - e[fin]).abs().max()), tol(dtype, k) * scale
        assert err <= bound, f"{what}: finite values differ by {err:.3e} > {bound:.3e}"


def _grads_or_none(out, inputs, g):
    gs = torch.autograd.grad(out, inputs, g, allow_unused=True)
    return [torch.zeros_like(i) if a is None else a for a, i in zip(gs, inputs)]


DENSITY = st.sampled_from([0.3, 0.6, 0.1, 0.0])  # none at all last: hypothesis favours the first
# The "seen" counts at the end of each property only check that the draws mixed finite and
# non-finite cases at all (at least 2 / 1): the draws are fresh each run, and a higher bound
# failed by chance (conv: 4 non-finite of 45 in one run where 10 were required).


@st.composite
def extreme_conv_configs(draw):
    nd = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cg, og = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2]))
    k = [draw(st.integers(1, 3)) for _ in range(nd)]
    s = [draw(st.integers(1, 2)) for _ in range(nd)]
    p = [draw(st.integers(0, kv)) for kv in k]
    d = [draw(st.integers(1, 2)) for _ in range(nd)]
    size = [draw(st.sampled_from([1, 2, 3, 5, 7])) for _ in range(nd)]
    n = draw(st.sampled_from([1, 2, 0]))
    which = draw(st.sampled_from(["x", "w", "g", "all"]))
    return nd, n, groups, cg, og, k, s, p, d, size, which, draw(DENSITY), draw(st.booleans())


def test_conv_extreme_values_match_torch():
    """conv1d / conv2d forward, input and weight gradients with NaN / inf / huge / tiny values
    in the input, the weight or the output gradient: torch's NaN and inf placement exactly
    (issue 19.4: a NaN weight reached every input-gradient pixel, torch only the taps')."""
    seen = collections.Counter()

    @settings(max_examples=60, **PROFILE)
    @given(cfg=extreme_conv_configs(), seed=SEEDS)
    def prop(cfg, seed):
        note(f"cfg={cfg} seed={seed}")
        nd, n, groups, cg, og, k, s, p, d, size, which, density, bias = cfg
        out = [(sz + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for sz, pp, dd, kk, ss in zip(size, p, d, k, s)]
        if min(out) < 1:
            return
        rng = np.random.default_rng(seed)
        x = _extreme(rng, (n, groups * cg, *size), density if which in ("x", "all") else 0).requires_grad_()
        w = _extreme(rng, (groups * og, cg, *k), density if which in ("w", "all") else 0).requires_grad_()
        b = _extreme(rng, (groups * og,), density if which == "all" else 0).requires_grad_() if bias else None
        kw = dict(stride=tuple(s), padding=tuple(p), dilation=tuple(d), groups=groups)
        fn, tfn = (F.conv1d, TF.conv1d) if nd == 1 else (F.conv2d, TF.conv2d)
        with gpu_nn.backend("reference"):
            yo = fn(x, w, b, **kw)
        yt = tfn(x, w, b, **kw)
        taps = cg * math.prod(k)
        scale = _finite_scale(x) * _finite_scale(w) + _finite_scale(b)
        _same_nonfinite(yo, yt, "conv forward", scale, taps)
        g = _extreme(rng, tuple(yt.shape), density if which in ("g", "all") else 0)
        ins = [x, w] + ([b] if bias else [])
        with gpu_nn.backend("reference"):
            go = _grads_or_none(yo, ins, g)
        gt = _grads_or_none(yt, ins, g)
        seen["nonfinite" if not all(torch.isfinite(t).all() for t in (yt, *gt)) else "finite"] += 1
        gs = _finite_scale(g)
        _same_nonfinite(go[0], gt[0], "conv input grad", gs * _finite_scale(w), og * math.prod(k))
        _same_nonfinite(go[1], gt[1], "conv weight grad", gs * _finite_scale(x), max(n * math.prod(out), 1))
        if bias:
            _same_nonfinite(go[2], gt[2], "conv bias grad", gs, max(n * math.prod(out), 1))

    prop()
    assert seen["nonfinite"] >= 2 and seen["finite"] >= 1, dict(seen)


@st.composite
def extreme_pool_configs(draw):
    kind = draw(st.sampled_from(["max", "min", "avg"]))
    nd = draw(st.sampled_from([1, 2]))
    k = [draw(st.integers(1, 3)) for _ in range(nd)]
    s = [draw(st.integers(1, 3)) for _ in range(nd)]
    p = [draw(st.integers(0, kv // 2)) for kv in k]
    size = [draw(st.sampled_from([5, 7, 1, 2, 3])) for _ in range(nd)]
    n = draw(st.sampled_from([1, 2, 0]))
    extra = {}
    if kind == "avg":
        extra = dict(count_include_pad=draw(st.booleans()), ceil_mode=draw(st.booleans()))
    else:
        extra = dict(dilation=tuple(draw(st.integers(1, 2)) for _ in range(nd)), ceil_mode=draw(st.booleans()))
    return kind, nd, n, k, s, p, size, extra, draw(DENSITY), draw(st.booleans())


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_conv_extreme_values_backend_match_torch(backend, device):
    """The Triton conv kernels (implicit GEMM and depthwise; forward, dgrad, wgrad) in float32
    with NaN / +-inf / signed zeros in the input, weight or output gradient: NaN and inf where
    torch's float64 has them (no +-1e38 here: float32 overflows where float64 does not)."""
    seen = collections.Counter()

    @settings(max_examples=20, **PROFILE)
    @given(cfg=extreme_conv_configs(), seed=SEEDS)
    def prop(cfg, seed):
        note(f"cfg={cfg} seed={seed}")
        nd, n, groups, cg, og, k, s, p, d, size, which, density, bias = cfg
        out = [(sz + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for sz, pp, dd, kk, ss in zip(size, p, d, k, s)]
        if min(out) < 1 or n == 0:
            return
        rng = np.random.default_rng(seed)
        mild = (0.0, -0.0, 1e-30)
        x = _extreme(rng, (n, groups * cg, *size), density if which in ("x", "all") else 0, mild)
        w = _extreme(rng, (groups * og, cg, *k), density if which in ("w", "all") else 0, mild)
        kw = dict(stride=tuple(s), padding=tuple(p), dilation=tuple(d), groups=groups)
        fn, tfn = (F.conv1d, TF.conv1d) if nd == 1 else (F.conv2d, TF.conv2d)
        shape = (n, groups * og, *out)
        g = _extreme(rng, shape, density if which in ("g", "all") else 0, mild)
        x64, w64 = x.float().double().requires_grad_(), w.float().double().requires_grad_()
        yt = tfn(x64, w64, **kw)
        gt = _grads_or_none(yt, [x64, w64], g.float().double())
        with gpu_nn.backend(backend):
            xo, wo = x.float().to(device).requires_grad_(), w.float().to(device).requires_grad_()
            yo = fn(xo, wo, **kw)
            go = _grads_or_none(yo, [xo, wo], g.float().to(device))
        seen["nonfinite" if not all(torch.isfinite(t).all() for t in (yt, *gt)) else "finite"] += 1
        taps = cg * math.prod(k)
        _same_nonfinite(yo.cpu(), yt, "conv forward", _finite_scale(x) * _finite_scale(w), taps, dtype=torch.float32)
        _same_nonfinite(go[0].cpu(), gt[0], "conv input grad", _finite_scale(g) * _finite_scale(w), og * math.prod(k),
                        dtype=torch.float32)
        _same_nonfinite(go[1].cpu(), gt[1], "conv weight grad", _finite_scale(g) * _finite_scale(x), n * math.prod(out),
                        dtype=torch.float32)

    prop()
    assert seen["nonfinite"] >= 2, dict(seen)


def test_pool_extreme_values_match_torch():
    """max / min / avg pooling, forward and input gradient, with NaN / inf / huge / tiny inputs
    and output gradients: torch's NaN and inf placement (min pooling as -max_pool(-x))."""
    seen = collections.Counter()

    @settings(max_examples=60, **PROFILE)
    @given(cfg=extreme_pool_configs(), seed=SEEDS)
    def prop(cfg, seed):
        note(f"cfg={cfg} seed={seed}")
        kind, nd, n, k, s, p, size, extra, density, grad_extreme = cfg
        rng = np.random.default_rng(seed)
        x = _extreme(rng, (n, 2, *size), density).requires_grad_()
        kw = dict(kernel_size=tuple(k), stride=tuple(s), padding=tuple(p), **extra)
        tname = f"{'avg' if kind == 'avg' else 'max'}_pool{nd}d"
        sign = -1 if kind == "min" else 1
        theirs = _outcome(lambda: sign * getattr(TF, tname)(sign * x, **kw))
        with gpu_nn.backend("reference"):
            ours = _outcome(lambda: getattr(F, f"{kind}_pool{nd}d")(x, **kw))
        if not _same_verdict(theirs, ours, seen):
            return
        yt, yo = theirs[1], ours[1]
        _same_nonfinite(yo, yt, f"{kind} pool forward", _finite_scale(x), math.prod(k))
        seen["nonfinite" if not torch.isfinite(x).all() else "finite"] += 1
        if kind != "avg" and x.numel() and torch.isinf(getattr(TF, tname)(torch.zeros_like(x), **kw)).any():
            # a window of padding only (dilation): torch's max-pool backward then scatters
            # through an invalid index (wrong values, and segfaults / aborts seen in this
            # property); its gradient there is no oracle
            event("max/min pool window of padding only: gradient not compared")
            return
        g = _extreme(rng, tuple(yt.shape), density if grad_extreme else 0)
        with gpu_nn.backend("reference"):
            (go,) = _grads_or_none(yo, [x], g)
        (gt,) = _grads_or_none(yt, [x], g)
        _same_nonfinite(go, gt, f"{kind} pool input grad", _finite_scale(g), math.prod(k))

    prop()
    assert seen["nonfinite"] >= 2 and seen["finite"] >= 1, dict(seen)


def test_activation_extreme_values_match_torch():
    """relu / sigmoid / tanh forward and backward at +-0, denormals, +-1e38, NaN, +-inf."""
    seen = collections.Counter()

    @settings(max_examples=40, **PROFILE)
    @given(name=st.sampled_from(list(ACT_OPS)),
           shape=st.lists(st.sampled_from([7, 5, 3, 2, 1]), min_size=1, max_size=3).map(tuple) | st.just((0, 3)) | st.just(()),
           density=DENSITY, seed=SEEDS)
    def prop(name, shape, density, seed):
        note(f"{name} shape={shape} density={density} seed={seed}")
        rng = np.random.default_rng(seed)
        x = _extreme(rng, shape, density).requires_grad_()
        ours_fn, torch_fn = ACT_OPS[name]
        with gpu_nn.backend("reference"):
            yo = ours_fn(x)
        yt = torch_fn(x)
        _same_nonfinite(yo, yt, f"{name} forward")
        g = _extreme(rng, shape, density)
        with gpu_nn.backend("reference"):
            (go,) = _grads_or_none(yo, [x], g)
        (gt,) = _grads_or_none(yt, [x], g)
        seen["nonfinite" if not torch.isfinite(x).all() else "finite"] += 1
        _same_nonfinite(go, gt, f"{name} backward", _finite_scale(g))

    prop()
    assert seen["nonfinite"] >= 2, dict(seen)


def test_relu_backward_at_nan_passes_the_gradient_as_torch():
    x = torch.tensor([float("nan"), 1.0, -1.0], dtype=F64, requires_grad=True)
    g = torch.tensor([2.0, 3.0, 4.0], dtype=F64)
    with gpu_nn.backend("reference"):
        (go,) = torch.autograd.grad(F.relu(x), x, g)
    (gt,) = torch.autograd.grad(torch.relu(x), x, g)
    torch.testing.assert_close(go, gt, equal_nan=True)


def test_softmax_extreme_values_match_torch():
    """softmax / log_softmax forward and backward over rows holding NaN, +-inf, +-1e38 (issue
    19.1 / 19.5: log_softmax([inf, 1, 2]) must be all NaN, [-inf, 1] gives [-inf, 0])."""
    seen = collections.Counter()

    @settings(max_examples=60, **PROFILE)
    @given(name=st.sampled_from(["softmax", "log_softmax"]), shape=st.lists(ODD, min_size=1, max_size=3).map(tuple),
           dim=st.integers(-1, 2), density=DENSITY, seed=SEEDS)
    def prop(name, shape, dim, density, seed):
        dim = min(dim, len(shape) - 1)
        note(f"{name} shape={shape} dim={dim} density={density} seed={seed}")
        rng = np.random.default_rng(seed)
        x = _extreme(rng, shape, density).requires_grad_()
        with gpu_nn.backend("reference"):
            yo = getattr(F, name)(x, dim)
        yt = getattr(TF, name)(x, dim)
        _same_nonfinite(yo, yt, f"{name} forward", _finite_scale(yt), shape[dim])
        g = _normal(rng, shape)
        with gpu_nn.backend("reference"):
            (go,) = _grads_or_none(yo, [x], g)
        (gt,) = _grads_or_none(yt, [x], g)
        seen["nonfinite" if not torch.isfinite(x).all() else "finite"] += 1
        _same_nonfinite(go, gt, f"{name} backward", _finite_scale(g) * _finite_scale(yt), shape[dim])

    prop()
    assert seen["nonfinite"] >= 2, dict(seen)


def test_cross_entropy_extreme_values_match_torch():
    """cross_entropy (class indices with ignore_index, or probabilities; weights; label
    smoothing; every reduction) on logits holding NaN, +-inf, +-1e38: loss and logit gradient
    with torch's NaN / inf placement (issue 19.1 / 19.5)."""
    seen = collections.Counter()

    @settings(max_examples=80, **PROFILE)
    @given(prob=st.booleans(), n=st.sampled_from([1, 2, 3, 5]), C=ODD, weight=st.booleans(),
           reduction=st.sampled_from(["mean", "sum", "none"]), eps=st.sampled_from([0.0, 0.0, 0.1, 0.5]),
           ignored=st.booleans(), density=DENSITY, seed=SEEDS)
    def prop(prob, n, C, weight, reduction, eps, ignored, density, seed):
        note(f"prob={prob} n={n} C={C} weight={weight} {reduction} eps={eps} ignored={ignored} seed={seed}")
        rng = np.random.default_rng(seed)
        x = _extreme(rng, (n, C), density).requires_grad_()
        if prob:
            t = torch.softmax(_normal(rng, (n, C)), 1)
        else:
            t = torch.from_numpy(rng.integers(0, C, n))
            if ignored:
                t[0] = -100
        w = torch.from_numpy(rng.random(C) + 0.2) if weight else None
        kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
        with gpu_nn.backend("reference"):
            yo = F.cross_entropy(x, t, **kw)
        yt = TF.cross_entropy(x, t, **kw)
        xs = _finite_scale(x)
        _same_nonfinite(yo, yt, "cross_entropy", xs * n, n * C)
        g = torch.ones(()) if yt.dim() == 0 else _normal(rng, tuple(yt.shape))
        with gpu_nn.backend("reference"):
            (go,) = _grads_or_none(yo, [x], g.double())
        (gt,) = _grads_or_none(yt, [x], g.double())
        seen["nonfinite" if not torch.isfinite(x).all() else "finite"] += 1
        _same_nonfinite(go, gt, "cross_entropy grad", _finite_scale(g) * 2, C)

    prop()
    assert seen["nonfinite"] >= 2, dict(seen)


CELLS = {"rnn_tanh_cell": (F.rnn_tanh_cell, torch.rnn_tanh_cell, 1), "rnn_relu_cell": (F.rnn_relu_cell, torch.rnn_relu_cell, 1),
         "lstm_cell": (F.lstm_cell, torch.lstm_cell, 4), "gru_cell": (F.gru_cell, torch.gru_cell, 3)}


def test_rnn_cell_extreme_values_match_torch():
    """RNN (tanh / relu), LSTM and GRU cells, forward and every gradient, with NaN / inf /
    huge / tiny values in the input, the state or the weights."""
    seen = collections.Counter()

    @settings(max_examples=40, **PROFILE)
    @given(name=st.sampled_from(list(CELLS)), batch=st.sampled_from([0, 1, 2, 3]), isz=ODD, hsz=ODD,
           bias=st.booleans(), which=st.sampled_from(["x", "h", "w", "all"]), density=DENSITY, seed=SEEDS)
    def prop(name, batch, isz, hsz, bias, which, density, seed):
        note(f"{name} batch={batch} input={isz} hidden={hsz} bias={bias} which={which} seed={seed}")
        rng = np.random.default_rng(seed)
        ours_fn, torch_fn, gates = CELLS[name]
        dens = {k: density if which in (k, "all") else 0 for k in ("x", "h", "w")}
        x = _extreme(rng, (batch, isz), dens["x"]).requires_grad_()
        h = _extreme(rng, (batch, hsz), dens["h"]).requires_grad_()
        c = _extreme(rng, (batch, hsz), dens["h"]).requires_grad_()
        w_ih = _extreme(rng, (gates * hsz, isz), dens["w"]).requires_grad_()
        w_hh = _extreme(rng, (gates * hsz, hsz), dens["w"]).requires_grad_()
        b_ih = _extreme(rng, (gates * hsz,), dens["w"]).requires_grad_() if bias else None
        b_hh = _extreme(rng, (gates * hsz,), dens["w"]).requires_grad_() if bias else None
        hx = (h, c) if name == "lstm_cell" else h
        with gpu_nn.backend("reference"):
            yo = ours_fn(x, hx, w_ih, w_hh, b_ih, b_hh)
        yt = torch_fn(x, hx, w_ih, w_hh, b_ih, b_hh)
        yo, yt = (list(yo), list(yt)) if name == "lstm_cell" else ([yo], [yt])
        ins = [t for t in (x, h, c, w_ih, w_hh, b_ih, b_hh) if t is not None]
        k = isz + hsz
        scale = (_finite_scale(x, h) * _finite_scale(w_ih, w_hh) * k + _finite_scale(b_ih, b_hh)) if name == "rnn_relu_cell" else 1.0
        for i, (a, b) in enumerate(zip(yo, yt)):
            _same_nonfinite(a, b, f"{name} output {i}", scale * (1 + _finite_scale(c) * (i == 1)), k)
        gs = [_normal(rng, tuple(t.shape)) for t in yt]
        with gpu_nn.backend("reference"):
            go = _grads_or_none(yo, ins, gs)
        gt = _grads_or_none(yt, ins, gs)
        seen["nonfinite" if not all(torch.isfinite(t).all() for t in (*yt, *gt)) else "finite"] += 1
        gscale = _finite_scale(*ins) ** 2 * k * max(batch, 1) * scale
        for i, (a, b) in enumerate(zip(go, gt)):
            _same_nonfinite(a, b, f"{name} grad {i}", gscale, k * max(batch, 1))

    prop()
    assert seen["nonfinite"] >= 2 and seen["finite"] >= 1, dict(seen)


def test_rnn_relu_cell_backward_through_a_nan_preactivation_as_torch():
    x = torch.tensor([[1.0]], dtype=F64, requires_grad=True)
    h = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    w_ih = torch.tensor([[float("nan")], [1.0]], dtype=F64, requires_grad=True)
    w_hh = torch.ones(2, 2, dtype=F64, requires_grad=True)
    g = torch.tensor([[2.0, 3.0]], dtype=F64)
    with gpu_nn.backend("reference"):
        go = torch.autograd.grad(F.rnn_relu_cell(x, h, w_ih, w_hh), [h, w_hh], g)
    gt = torch.autograd.grad(torch.rnn_relu_cell(x, h, w_ih, w_hh), [h, w_hh], g)
    for a, b in zip(go, gt):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("name", list(CELLS))
def test_rnn_cell_batch_zero_as_torch(name):
    ours_fn, torch_fn, gates = CELLS[name]
    x, h = torch.randn(0, 3, dtype=F64), torch.randn(0, 2, dtype=F64)
    hx = (h, h) if name == "lstm_cell" else h
    w_ih, w_hh = torch.randn(gates * 2, 3, dtype=F64), torch.randn(gates * 2, 2, dtype=F64)
    with gpu_nn.backend("reference"):
        yo = ours_fn(x, hx, w_ih, w_hh)
    yt = torch_fn(x, hx, w_ih, w_hh)
    for a, b in zip(*(((y,) if name != "lstm_cell" else y) for y in (yo, yt))):
        assert a.shape == b.shape


OPTIMIZERS = {
    "SGD": [dict(lr=0.1), dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), dict(lr=0.1, momentum=0.5, dampening=0.3)],
    "Adagrad": [dict(lr=0.1), dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)],
    "Adadelta": [dict(), dict(rho=0.5, weight_decay=0.1)],
    "RMSprop": [dict(), dict(momentum=0.9), dict(centered=True), dict(centered=True, momentum=0.9, weight_decay=0.1)],
    "Adam": [dict(), dict(amsgrad=True, weight_decay=0.1)],
    "AdamW": [dict(), dict(amsgrad=True)],
}


def test_optimizer_extreme_values_match_torch():
    """Two steps of every optimizer (several hyperparameter sets each) on parameters and
    gradients holding NaN, +-inf, +-1e38, denormals: parameters and state as torch's, NaN and
    inf placement included."""
    seen = collections.Counter()

    @settings(max_examples=60, **PROFILE)
    @given(name=st.sampled_from(list(OPTIMIZERS)), which=st.integers(0, 3), size=ODD, where=st.sampled_from(["p", "g", "all"]),
           dtype=st.sampled_from([F64, torch.float32]), density=DENSITY, seed=SEEDS)
    def prop(name, which, size, where, dtype, density, seed):
        hp = OPTIMIZERS[name][which % len(OPTIMIZERS[name])]
        note(f"{name} {hp} size={size} where={where} {dtype} density={density} seed={seed}")
        rng = np.random.default_rng(seed)
        # float32 too: 1e38 squared overflows there (the second moments of RMSprop / Adam)
        p0 = _extreme(rng, (size,), density if where in ("p", "all") else 0).to(dtype)
        grads = [_extreme(rng, (size,), density if where in ("g", "all") else 0).to(dtype), _normal(rng, (size,)).to(dtype)]
        params, states = [], []
        for opt_cls in (getattr(gpu_nn.optim, name), getattr(torch.optim, name)):
            p = torch.nn.Parameter(p0.clone())
            opt = opt_cls([p], **hp)
            for g in grads:
                p.grad = g.clone()
                with gpu_nn.backend("reference"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt.step()
            params.append(p.detach())
            states.append({k: v for k, v in opt.state[p].items() if k != "step" and torch.is_tensor(v)})
        seen["nonfinite" if not torch.isfinite(params[1]).all() else "finite"] += 1
        _same_nonfinite(params[0], params[1], f"{name} parameter", k=4, dtype=dtype, elementwise=True)
        assert states[0].keys() == states[1].keys(), (sorted(states[0]), sorted(states[1]))
        for key, theirs in states[1].items():
            _same_nonfinite(states[0][key], theirs, f"{name} {key}", k=4, dtype=dtype, elementwise=True)

    prop()
    assert seen["nonfinite"] >= 2 and seen["finite"] >= 1, dict(seen)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_centered_rmsprop_overflowing_float32_gradient_as_torch(momentum):
    out = []
    for opt_cls in (gpu_nn.optim.RMSprop, torch.optim.RMSprop):
        p = torch.nn.Parameter(torch.ones(3))
        opt = opt_cls([p], centered=True, momentum=momentum)
        p.grad = torch.tensor([3e38, 1.0, 2.0])
        with gpu_nn.backend("reference"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        out.append(p.detach())
    torch.testing.assert_close(out[0], out[1], equal_nan=True)


# --------------------------------------------------------------------------- issue 19.1 / 19.5 / 19.4 cases

BACKENDS_RT = backend_params(("reference", "triton"))


def _f(backend, device, fn, *tensors):
    """fn(*tensors moved to device) on ``backend``, results back on the CPU."""
    with gpu_nn.backend(backend):
        out = fn(*[t.to(device) for t in tensors])
    return [o.cpu() for o in out] if isinstance(out, (tuple, list)) else out.cpu()


def _ce_with_grad(x, t, **kw):
    """cross_entropy (ours, or torch's with ours=False) and its input gradient; tensor keyword
    arguments (a class weight) go to x's device, as _f moves x and t."""
    kw = {k: v.to(x.device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_() if t.is_floating_point() else t
    loss = (F if kw.pop("ours", True) else TF).cross_entropy(x, t, **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


@pytest.mark.parametrize("backend,device", BACKENDS_RT)
@pytest.mark.parametrize("offset", [1e3, 1e4, 1e7])
@pytest.mark.parametrize("C", [37, 150])  # 150 > 128: the interpreter's looped softmax path too
def test_regression_softmax_family_precision_at_large_logits(backend, device, offset, C):
    # issue 19.1: float32 logits M + randn lost precision as M grew (reference log_softmax
    # error 3e-5 / 5e-4 / 0.47 at M = 1e3 / 1e4 / 1e7, torch 3e-7): x - (m + log s), with
    # m + log s rounded to float32. Every result within 2x torch's own float32 error (+ floor).
    from helpers import assert_like_torch
    gen = torch.Generator().manual_seed(int(offset) + C)
    x = offset + torch.randn(6, C, generator=gen)
    x64 = x.double()
    t = torch.randint(0, C, (6,), generator=gen)
    tp = torch.softmax(torch.randn(6, C, generator=gen), 1)
    w = torch.rand(C, generator=gen) + 0.2
    for name in ("log_softmax", "softmax"):
        ours = _f(backend, device, lambda x: getattr(F, name)(x, 1), x)
        assert_like_torch(ours, getattr(TF, name)(x, 1), getattr(TF, name)(x64, 1), torch.float32, k=C, what=name)
    for target, kw in ((t, {}), (t, dict(weight=w, label_smoothing=0.1)), (tp, dict(weight=w, label_smoothing=0.2))):
        lo, go = _f(backend, device, lambda x, tt: _ce_with_grad(x, tt, **kw), x, target)
        lt, gt = _ce_with_grad(x, target, ours=False, **kw)
        kw64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        l64, g64 = _ce_with_grad(x64, target.double() if target.is_floating_point() else target, ours=False, **kw64)
        assert_like_torch(lo, lt, l64, torch.float32, k=C, what="cross_entropy loss")
        assert_like_torch(go, gt, g64, torch.float32, k=C, what="cross_entropy grad")


@pytest.mark.parametrize("backend,device", BACKENDS_RT)
def test_regression_softmax_family_at_1e8_and_2e38(backend, device):
    # issue 19.1: log_softmax([1e8, 1e8]) was [0, 0] (torch -0.693 each), cross-entropy 0 with
    # gradient [0, 1] (torch 0.693, [-0.5, 0.5]); label smoothing over [2e38, 2e38, 1] was
    # NaN (torch 6.67e36: the weighted sum of the logits overflowed)
    x = torch.tensor([1e8, 1e8])
    y = _f(backend, device, lambda x: F.log_softmax(x, 0), x)
    torch.testing.assert_close(y, torch.full((2,), -math.log(2.0)))
    loss, g = _f(backend, device, lambda x, t: _ce_with_grad(x, t), x[None], torch.tensor([0]))
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    torch.testing.assert_close(g, torch.tensor([[-0.5, 0.5]]))
    big = torch.tensor([[2e38, 2e38, 1.0]])
    for kw in (dict(label_smoothing=0.1), dict(label_smoothing=0.1, weight=torch.tensor([0.5, 1.0, 2.0]))):
        lo, go = _f(backend, device, lambda x, t: _ce_with_grad(x, t, **kw), big, torch.tensor([0]))
        lt, gt = _ce_with_grad(big, torch.tensor([0]), ours=False, **kw)
        assert "weight" in kw or (torch.isfinite(lt) and lt > 1e36)  # 6.67e36 (weighted: inf, as torch)
        torch.testing.assert_close(lo, lt)
        torch.testing.assert_close(go, gt)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("backend,device", BACKENDS_RT)
@pytest.mark.parametrize("row", [[INF, 1.0, 2.0], [-INF, 1.0, 2.0], [-INF, -INF, -INF], [NAN, 1.0, 2.0],
                                 [INF, -INF, 0.0], [-INF, 3.0, -INF]])
def test_regression_softmax_family_at_infinite_logits(backend, device, row):
    # issue 19.5: log_softmax([inf, 1, 2]) was [nan, -inf, -inf] (torch: all NaN), cross-entropy
    # with target 1 gave loss inf, gradient [nan, -1, 0] (torch: NaN, all NaN); -inf logits
    # (torch: -inf log-probability, 0 probability, finite gradients) and NaN as torch too
    x = torch.tensor(row)
    for name in ("log_softmax", "softmax"):
        torch.testing.assert_close(_f(backend, device, lambda x: getattr(F, name)(x, 0), x), getattr(TF, name)(x, 0),
                                   equal_nan=True)
    tp = torch.tensor([[0.0, 0.5, 0.5]])
    for target in (torch.tensor([0]), torch.tensor([1]), torch.tensor([-100]), tp):
        for kw in ({}, dict(label_smoothing=0.1), dict(weight=torch.tensor([0.5, 1.0, 2.0]), reduction="sum")):
            lo, go = _f(backend, device, lambda x, t: _ce_with_grad(x, t, **kw), x[None], target)
            lt, gt = _ce_with_grad(x[None], target, ours=False, **kw)
            torch.testing.assert_close(lo, lt, equal_nan=True, msg=f"loss {target} {kw}")
            torch.testing.assert_close(go, gt, equal_nan=True, msg=f"grad {target} {kw}")


def _conv_masks(fn, x, w, g, **kw):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, **kw)
    gx, gw = torch.autograd.grad(y, [x, w], g)
    return [(torch.isnan(t), torch.isinf(t)) for t in (y, gx, gw)], (y.detach(), gx, gw)


@pytest.mark.parametrize("backend,device", BACKENDS_RT)
@pytest.mark.parametrize("case", ["2d", "1d", "2d-stride2-pad1", "depthwise-pad1", "2d-x-nan-pad1"])
def test_regression_conv_nan_reaches_what_torchs_reaches(backend, device, case):
    # issue 19.4: x = ones(1,1,5,5) and a 3x3 weight of ones with one NaN gave 25 of 25
    # non-finite input-gradient entries (torch 9: the taps that touch it); conv1d with
    # w = [nan, 1, 1] gave all NaN (torch [nan, nan, nan, 2, 1]). The backward convolved the
    # zero-padded output gradient with the whole weight (0 * NaN); also the flat weight
    # gradient's by-product positions (0 * a NaN input) and the Triton dgrad kernels' masked
    # loads (other=0 times a NaN weight tap).
    nan = float("nan")
    kw = {}
    if case == "2d":
        fn, tfn, x, w = F.conv2d, TF.conv2d, torch.ones(1, 1, 5, 5), torch.ones(1, 1, 3, 3)
        w[0, 0, 1, 2] = nan
    elif case == "1d":
        fn, tfn, x, w = F.conv1d, TF.conv1d, torch.ones(1, 1, 5), torch.tensor([[[nan, 1.0, 1.0]]])
    elif case == "2d-stride2-pad1":
        fn, tfn, x, w = F.conv2d, TF.conv2d, torch.ones(2, 3, 7, 6), torch.ones(4, 3, 3, 3)
        w[1, 2, 0, 0] = -float("inf")
        kw = dict(stride=2, padding=1)
    elif case == "depthwise-pad1":
        fn, tfn, x, w = F.conv2d, TF.conv2d, torch.ones(1, 3, 5, 5), torch.ones(3, 1, 3, 3)
        w[1, 0, 2, 2] = nan
        kw = dict(padding=1, groups=3)
    else:  # the reference's flat (stride-1) weight gradient: 20x20 keeps the padding share low
        fn, tfn, x, w = F.conv2d, TF.conv2d, torch.ones(1, 1, 20, 20), torch.ones(1, 1, 3, 3)
        x[0, 0, 0, 0] = nan
        kw = dict(padding=1)
    g = torch.ones_like(tfn(x, w, **kw))
    theirs, (y_t, gx_t, gw_t) = _conv_masks(tfn, x.double(), w.double(), g.double(), **kw)
    with gpu_nn.backend(backend):
        ours, (y, gx, gw) = _conv_masks(fn, x.to(device), w.to(device), g.to(device), **kw)
    for (on, oi), (tn, ti), what in zip(ours, theirs, ("output", "input grad", "weight grad")):
        assert torch.equal(on.cpu(), tn) and torch.equal(oi.cpu(), ti), f"{what}: NaN/inf placement differs"
    # and the finite values (sums of ones and of the finite taps: float32 holds them exactly)
    for a, e, what in ((y, y_t, "output"), (gx, gx_t, "input grad"), (gw, gw_t, "weight grad")):
        _same_nonfinite(a, e, what, k=x.numel(), dtype=torch.float32, elementwise=True)
    assert torch.isfinite(gx_t).any() and torch.isfinite(gw_t).any()  # (a NaN weight: every output NaN)
    if case == "2d":
        assert int((~torch.isfinite(gx_t)).sum()) == 9
    if case == "1d":
        torch.testing.assert_close(gx.cpu().double(), torch.tensor([[[nan, nan, nan, 2.0, 1.0]]], dtype=F64), equal_nan=True)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_softmax_family_extreme_values_backend_match_torch(backend, device):
    """The Triton softmax / log_softmax / cross_entropy kernels on float32 logits holding NaN,
    +-inf, +-1e38: NaN / inf placement as torch's float32 (sums of the non-negative -logp
    terms overflow in any order alike), values within float32 tolerance; C = 150 takes the
    interpreter's looped paths."""
    seen = collections.Counter()

    @settings(max_examples=30, **PROFILE)
    @given(op=st.sampled_from(["softmax", "log_softmax", "ce", "ce", "ce_prob"]), n=st.sampled_from([1, 2, 3]),
           C=st.sampled_from([3, 5, 150]), weight=st.booleans(), eps=st.sampled_from([0.0, 0.1]),
           density=DENSITY, seed=SEEDS)
    def prop(op, n, C, weight, eps, density, seed):
        note(f"{op} n={n} C={C} weight={weight} eps={eps} density={density} seed={seed}")
        rng = np.random.default_rng(seed)
        x = _extreme(rng, (n, C), density).float()
        seen["nonfinite" if not torch.isfinite(x).all() else "finite"] += 1
        if op in ("softmax", "log_softmax"):
            xr = x.clone().requires_grad_()
            g = _normal(rng, (n, C)).float()
            yt = getattr(TF, op)(xr, 1)
            (gt,) = torch.autograd.grad(yt, xr, g)
            with gpu_nn.backend(backend):
                xo = x.to(device).requires_grad_()
                yo = getattr(F, op)(xo, 1)
                (go,) = torch.autograd.grad(yo, xo, g.to(device))
        else:
            t = torch.softmax(_normal(rng, (n, C)), 1).float() if op == "ce_prob" else torch.from_numpy(rng.integers(0, C, n))
            if op == "ce" and n > 1:
                t[1] = -100
            w = torch.from_numpy(rng.random(C) + 0.2).float() if weight else None
            kw = dict(weight=w, label_smoothing=eps, reduction="sum")
            yt, gt = _ce_with_grad(x, t, ours=False, **kw)
            kw["weight"] = None if w is None else w.to(device)
            with gpu_nn.backend(backend):
                yo, go = _ce_with_grad(x.to(device), t.to(device), **kw)
        _same_nonfinite(yo.cpu(), yt, f"{op} forward", _finite_scale(yt), C * n, dtype=torch.float32)
        _same_nonfinite(go.cpu(), gt, f"{op} backward", _finite_scale(gt), C * n, dtype=torch.float32)

    prop()
    assert seen["nonfinite"] >= 2, dict(seen)
