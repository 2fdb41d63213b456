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
from helpers import assert_close, backend_params, max_rel_err

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
        big = torch.full((*x.shape[:-1], 2 * x.shape[-1] + 1), float("nan"), dtype=x.dtype)
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

    @settings(max_examples=120 if backend == "reference" else 40, **PROFILE)
    @given(view=strided_views(), name=st.sampled_from(list(ACT_OPS)), seed=SEEDS, inplace=st.booleans())
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
    views against the reference (float32 values, float64 reference on the same values)."""
    seen = collections.Counter()

    @settings(max_examples=25, **PROFILE)
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
