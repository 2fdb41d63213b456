"""The NumPy reference on inf / NaN / overflowing values: no RuntimeWarning escapes (torch emits
none, and under ``warnings.simplefilter("error")`` one would raise mid-step and leave an
optimizer's state half-updated), and the results are torch's (same NaN / inf positions, equal
finite values). Every optimizer and option, gradient clipping at several norms, and the layers
forward and backward, all on ``gpu_nn.backend("reference")``."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as TF

import gpu_nn
import gpu_nn.functional as F

INF, NAN = float("inf"), float("nan")
HUGE = {torch.float32: 1e38, torch.float64: 1e308}  # finite, but squares (and sums) overflow
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


@contextlib.contextmanager
def strict():
    """Our side of every comparison: the reference backend, any warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gpu_nn.backend("reference"):
            yield


def same(ours, theirs, what=""):
    torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- optimizers


def _grads(dtype, k):
    """One gradient per parameter: each special value in its own parameter (and a plain one), so
    one NaN does not hide what the others do; step k scales them."""
    h = HUGE[dtype]
    rows = [[INF, 1.0, -2.0], [-INF, 0.5, 3.0], [NAN, 1.0, 2.0], [h, -h, 1.0], [h, h, 0.25], [0.3, -0.7, 1.5]]
    return [torch.tensor(r, dtype=dtype) * (0.5 if k else 1.0) for r in rows]


OPTIMIZERS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, maximize=True, eps=0.0)),
    ("Adadelta", dict()),
    ("Adadelta", dict(weight_decay=0.1, maximize=True, eps=0.0)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, maximize=True, eps=0.0)),
    ("Adam", dict(lr=0.1)),
    ("Adam", dict(lr=0.1, amsgrad=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.1, amsgrad=True, maximize=True, eps=0.0)),
    ("AdamW", dict(lr=0.1)),
    ("AdamW", dict(lr=0.1, amsgrad=True, maximize=True)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,kw", [pytest.param(n, kw, id=f"{n}-{i}") for i, (n, kw) in enumerate(OPTIMIZERS)])
def test_optimizer_nonfinite_grads(name, kw, dtype):
    """Two steps on gradients holding inf, -inf, NaN and huge finite values (their squares
    overflow), from ordinary and from huge parameters: torch's parameters and state, silently."""
    for start in (1.0, HUGE[dtype]):
        ours = [torch.nn.Parameter(torch.full((3,), start, dtype=dtype)) for _ in range(6)]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        opt, ref = getattr(gpu_nn.optim, name)(ours, **kw), getattr(torch.optim, name)(theirs, **kw)
        for k in range(2):
            for p, q, g in zip(ours, theirs, _grads(dtype, k)):
                p.grad, q.grad = g.clone(), g.clone()
            with strict():
                opt.step()
            ref.step()
            for i, (p, q) in enumerate(zip(ours, theirs)):
                same(p.detach(), q.detach(), f"step {k} start {start} param {i}")
                for key, want in ref.state[q].items():
                    got = opt.state[p].get(key)
                    if torch.is_tensor(want) and got is not None:
                        same(got.to(want.dtype), want, f"step {k} start {start} param {i} state {key}")


def test_adam_inf_grad_step_completes():
    """The audit's case: an inf gradient entry gives NaN there and a normal step elsewhere,
    with the step count, moments and parameter all updated together."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = gpu_nn.optim.Adam([p], lr=0.1)
    p.grad = torch.tensor([INF, 1.0])
    with strict():
        opt.step()
    same(p.detach(), torch.tensor([NAN, 0.9]), "param")
    st = opt.state[p]
    assert float(st["step"]) == 1
    same(st["exp_avg"], torch.tensor([INF, 0.1]), "exp_avg")
    same(st["exp_avg_sq"], torch.tensor([INF, 0.001]), "exp_avg_sq")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, 0.5, INF, -INF, 0.0])
def test_clip_grad_norm_nonfinite(norm_type, dtype):
    h = HUGE[dtype]
    cases = [
        [[0.3, -0.7, 1.5]],
        [[INF, 1.0, -2.0], [0.3, -0.7, 1.5]],
        [[-INF, 0.5]],
        [[NAN, 1.0, 2.0], [0.3, -0.7, 1.5]],
        [[h, -h, 1.0], [0.3, -0.7, 1.5]],  # every norm but 0 and -inf overflows
        [[1e30, 2.0]],  # overflows in the power of norm 3 (float32) ...
        [[1e-30, 1e-40]],  # ... or underflows
    ]
    for rows in cases:
        grads = [torch.tensor(r, dtype=dtype) for r in rows]
        ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        with strict():
            total = gpu_nn.nn.utils.clip_grad_norm_(ours, 1.0, norm_type)
        want = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
        same(total, want, f"{rows} total")
        for p, q in zip(ours, theirs):
            same(p.grad, q.grad, f"{rows} grad")


# ----------------------------------------------------------------------------- layers


def special(shape, dtype, seed=0):
    """Random values with inf, -inf and NaN at scattered positions."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    flat = x.view(-1)
    for i, v in enumerate((INF, -INF, NAN)):
        if flat.numel() > i * 3:
            flat[(i * 7 + seed) % flat.numel()] = v
    return x


def _fwd_bwd(ours_fn, torch_fn, inputs, dtype, what, grad_inputs=None):
    """Forward and backward (with an upstream gradient holding inf / -inf / NaN, then ones) of
    ``ours_fn`` under :func:`strict` against ``torch_fn``."""
    grad_inputs = grad_inputs if grad_inputs is not None else [x.is_floating_point() for x in inputs]
    xs = [x.detach().clone().requires_grad_(r) for x, r in zip(inputs, grad_inputs)]
    ys = [x.detach().clone().requires_grad_(r) for x, r in zip(inputs, grad_inputs)]
    with strict():
        out = ours_fn(*xs)
    want = torch_fn(*ys)
    out, want = (out if isinstance(out, tuple) else (out,)), (want if isinstance(want, tuple) else (want,))
    for a, b in zip(out, want):
        same(a.detach(), b.detach(), f"{what} forward")
    leaves_o = [x for x in xs if x.requires_grad]
    leaves_t = [y for y in ys if y.requires_grad]
    specials = [special(b.shape, dtype, 5) if b.dim() else torch.tensor(INF, dtype=dtype) for b in want]
    for k, gos in enumerate((specials, [torch.ones_like(b) for b in want])):
        with strict():
            got = torch.autograd.grad(out, leaves_o, gos, retain_graph=True)
        exp = torch.autograd.grad(want, leaves_t, gos, retain_graph=True)
        for i, (a, b) in enumerate(zip(got, exp)):
            same(a, b, f"{what} grad {i} (upstream {'special' if k == 0 else 'ones'})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_nonfinite(dtype):
    w, b = special((3, 5), dtype, 1), special((3,), dtype, 2)
    for x in (special((4, 5), dtype), special((2, 4, 5), dtype, 3), torch.randn(4, 5, dtype=dtype)):
        _fwd_bwd(F.linear, TF.linear, [x, w, b], dtype, f"linear {tuple(x.shape)}")
    for act in ("relu", "sigmoid", "tanh"):
        _fwd_bwd(lambda x, w, b: F.linear(x, w, b, activation=act), lambda x, w, b: getattr(torch, act)(TF.linear(x, w, b)),
                 [special((4, 5), dtype), w, b], dtype, f"linear+{act}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_nonfinite(dtype):
    x, w, b = special((2, 3, 6, 6), dtype), special((4, 3, 3, 3), dtype, 1), special((4,), dtype, 2)
    _fwd_bwd(F.conv2d, TF.conv2d, [x, w, b], dtype, "conv2d")
    _fwd_bwd(lambda x, w, b: F.conv2d(x, w, b, activation="tanh"), lambda x, w, b: torch.tanh(TF.conv2d(x, w, b)),
             [x, w, b], dtype, "conv2d+tanh")
    # torch's float32 CPU convolution gives inf for some windows holding both +inf and -inf
    # (whose exact result is NaN, as its float64 and ours): the larger case in float64 only
    if dtype == torch.float64:
        _fwd_bwd(lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=2),
                 lambda x, w, b: TF.conv2d(x, w, b, stride=2, padding=1, groups=2),
                 [special((2, 8, 12, 12), dtype), special((8, 4, 3, 3), dtype, 1), special((8,), dtype, 2)], dtype,
                 "conv2d strided")
    _fwd_bwd(F.conv1d, TF.conv1d, [special((2, 3, 9), dtype), special((4, 3, 3), dtype, 1), special((4,), dtype, 2)],
             dtype, "conv1d")


@pytest.mark.parametrize("dtype", DTYPES)
def test_activation_softmax_pool_nonfinite(dtype):
    for name in ("relu", "sigmoid", "tanh"):
        _fwd_bwd(getattr(F, name), getattr(torch, name), [special((4, 6), dtype)], dtype, name)
    for name in ("softmax", "log_softmax"):
        _fwd_bwd(lambda x: getattr(F, name)(x, 1), lambda x: getattr(TF, name)(x, 1), [special((4, 6), dtype)], dtype, name)
    for name in ("max_pool2d", "avg_pool2d"):
        _fwd_bwd(lambda x: getattr(F, name)(x, 2), lambda x: getattr(TF, name)(x, 2), [special((2, 3, 6, 6), dtype)],
                 dtype, name)
        # overlapping windows with padding: the backward accumulates inf and -inf in one place
        _fwd_bwd(lambda x: getattr(F, name)(x, 3, 1, 1), lambda x: getattr(TF, name)(x, 3, 1, 1),
                 [special((2, 3, 7, 7), dtype)], dtype, f"{name} overlapping")
    for name in ("max_pool1d", "avg_pool1d"):
        _fwd_bwd(lambda x: getattr(F, name)(x, 3, 1, 1), lambda x: getattr(TF, name)(x, 3, 1, 1),
                 [special((2, 3, 8), dtype)], dtype, name)
    _fwd_bwd(lambda x: F.min_pool2d(x, 2), lambda x: -TF.max_pool2d(-x, 2), [special((2, 3, 6, 6), dtype)], dtype, "min_pool2d")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_nonfinite(dtype):
    x = special((4, 6), dtype)
    t = torch.tensor([0, 2, 5, 1])
    # probability targets: non-negative (with +inf / NaN entries); a negative "probability" times
    # an infinite upstream gradient is left out: torch's composite backward sums +inf and -inf there
    p = special((4, 6), dtype, 3).abs()
    wt = torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=dtype)
    for red in ("mean", "sum", "none"):
        for ls in (0.0, 0.1):
            kw = dict(reduction=red, label_smoothing=ls)
            _fwd_bwd(lambda x: F.cross_entropy(x, t, **kw), lambda x: TF.cross_entropy(x, t, **kw), [x], dtype,
                     f"cross_entropy {kw}")
            _fwd_bwd(lambda x, p: F.cross_entropy(x, p, **kw), lambda x, p: TF.cross_entropy(x, p, **kw), [x, p], dtype,
                     f"cross_entropy probs {kw}")
        _fwd_bwd(lambda x, w: F.cross_entropy(x, t, w, reduction=red), lambda x, w: TF.cross_entropy(x, t, w, reduction=red),
                 [x, wt], dtype, f"cross_entropy weight {red}", grad_inputs=[True, False])


RNNS = [("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}),
        ("GRU", {"num_layers": 2, "bidirectional": True})]


def _pair(cls, dtype, *args, **kw):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, cls)(*args, **kw).to(dtype)
    ours = getattr(gpu_nn.nn, cls)(*args, **kw).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _finite_share(tensors) -> float:
    n = sum(t.numel() for t in tensors)
    return sum(int(torch.isfinite(t).sum()) for t in tensors) / max(n, 1)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,kw", [pytest.param(c, kw, id=f"{c}-{i}") for i, (c, kw) in enumerate(RNNS)])
def test_recurrent_nonfinite(cls, kw, dtype):
    """Sequence layers with inf / -inf / NaN in one batch element of the input (from its second
    step on), with +inf in its last step only (the gates saturate: parameter gradients partly
    finite), then with +-inf in the recurrent weight and a nonzero initial state: outputs, input
    and state gradients and every parameter gradient, under upstream gradients holding inf / NaN
    and then finite ones. Non-finite values where torch has them, finite ones equal. Enforced to
    hold finite entries: every forward (the other batch elements, the saturated units), and the
    saturating case's parameter gradients under the finite upstream gradient; the other cases'
    parameter gradients are mostly NaN in torch too (there the placement is what is compared)."""
    for where in ("input", "saturating", "weight"):
        ours, theirs = _pair(cls, dtype, 5, 3, **kw)
        D = 2 if kw.get("bidirectional") else 1
        S = (kw.get("num_layers", 1) * D, 3)
        g = torch.Generator().manual_seed(11)
        h0 = torch.randn(*S, kw.get("proj_size") or 3, dtype=dtype, generator=g)
        states = [h0, torch.randn(*S, 3, dtype=dtype, generator=g)] if cls == "LSTM" else [h0]
        x = torch.randn(4, 3, 5, dtype=dtype, generator=g)
        if where == "input":  # batch element 1 only: elements 0 and 2 stay finite
            x[1, 1, 0], x[2, 1, 3], x[3, 1, 1] = INF, -INF, NAN
        elif where == "saturating":
            x[3, 1, 0] = INF  # one entry: each gate's pre-activation +-inf, not inf - inf
        else:
            w = theirs.weight_hh_l0.detach().clone()
            w[0, 1], w[2, 0] = INF, -INF  # one per row: the units saturate (tanh / sigmoid of +-inf)
            with torch.no_grad():
                ours.weight_hh_l0.copy_(w)
                theirs.weight_hh_l0.copy_(w)

        def run(net):
            return lambda x, *st: net(x, tuple(st) if cls == "LSTM" else st[0])[0]

        with strict():
            out = run(ours)(x, *states)
        want = run(theirs)(x, *states)
        assert _finite_share([want]) > 0.25, f"{cls} {kw} {where}: a forward with too little to compare"
        _fwd_bwd(run(ours), run(theirs), [x, *states], dtype, f"{cls} {kw} {where}")
        go_special = special(out.shape, dtype, 7)
        go_finite = torch.randn(out.shape, dtype=dtype, generator=g)
        for k, go in enumerate((go_special, go_finite)):
            for net in (ours, theirs):
                net.zero_grad(set_to_none=True)
            with strict():
                (run(ours)(x, *states) * go).sum().backward()
            (run(theirs)(x, *states) * go).sum().backward()
            named_o, named_t = list(ours.named_parameters()), list(theirs.named_parameters())
            for (n, a), (_, b) in zip(named_o, named_t, strict=True):
                same(a.grad, b.grad, f"{cls} {kw} {where} d{n} (upstream {'special' if k == 0 else 'finite'})")
            if k == 1 and where == "saturating":
                # the saturated gates pass zero back: only the input weights' columns that read
                # the infinite entries are not finite
                share = _finite_share([b.grad for _, b in named_t])
                assert share > 0.5, f"{cls} {kw} {where}: {share:.2f} of torch's parameter gradients finite"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,kw", [("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"}), ("LSTMCell", {}), ("GRUCell", {})])
def test_recurrent_cell_nonfinite(cls, kw, dtype):
    ours, theirs = _pair(cls, dtype, 5, 3, **kw)
    x, h = special((4, 5), dtype), special((4, 3), dtype, 3)
    if cls == "LSTMCell":
        _fwd_bwd(lambda x, h, c: ours(x, (h, c)), lambda x, h, c: theirs(x, (h, c)), [x, h, special((4, 3), dtype, 4)],
                 dtype, cls)
    else:
        _fwd_bwd(lambda x, h: ours(x, h), lambda x, h: theirs(x, h), [x, h], dtype, f"{cls} {kw}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_cell_infinite_upstream_gradient_like_torch(dtype):
    """GRUCell on finite inputs with +-inf in the upstream gradient: torch's CPU cell sums its
    new-gate gradient as dh - dh z, NaN (inf - inf) where dh is infinite, which (1 - z) dh would
    keep infinite; the reference's cell backward as torch's. Rows without an infinite gradient
    stay finite and equal."""
    ours, theirs = _pair("GRUCell", dtype, 5, 3)
    g = torch.Generator().manual_seed(2)
    x, h = torch.randn(4, 5, dtype=dtype, generator=g), torch.randn(4, 3, dtype=dtype, generator=g)
    go = torch.randn(4, 3, dtype=dtype, generator=g)
    go[1, 0], go[2, 2] = INF, -INF
    got = []
    for net, ctx in ((ours, strict()), (theirs, contextlib.nullcontext())):
        xs, hs = x.clone().requires_grad_(), h.clone().requires_grad_()
        with ctx:
            (net(xs, hs) * go).sum().backward()
        got.append([xs.grad, hs.grad] + [p.grad for p in net.parameters()])
    for i, (a, b) in enumerate(zip(*got, strict=True)):
        same(a, b, f"GRUCell gradient {i}")
    dx, dh = got[1][:2]
    assert torch.isnan(dh[1:3]).any() and torch.isfinite(dh[[0, 3]]).all() and torch.isfinite(dx[[0, 3]]).all()
