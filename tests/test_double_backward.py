"""Double backward (``create_graph=True``) of every op, and TorchScript's refusal.

* ``torch.autograd.gradgradcheck`` on the reference backend in float64 for every op and option
  group: the analytical second derivative (the backward ops' own backward) against finite
  differences of our first-order backward.
* First-order gradients taken with ``create_graph=True`` equal those without: the recurrent
  sequences compute them by recomputation there, which gradgradcheck alone (differentiating
  the recomputation against itself) would not check against the kernels.
* On the Triton backend (the interpreter on a CPU) in float32: a gradient-penalty loss
  ``|d(sum r * f(x)) / dx|^2`` differentiated once more, against torch's own double backward
  in float64, within twice torch's float32 error plus a floor.
* opcheck of the backward ops with inputs that require grad (their autograd registration).
* ``torch.jit.script`` refuses every module in ``gpu_nn.nn`` with an error that names it;
  trace, export and compile still work.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as TF

import gpu_nn
import gpu_nn.functional as F
import gpu_nn.nn as gnn
from gpu_nn.nn._jit import ScriptingNotSupportedError

from helpers import assert_close, assert_like_torch, backend_params, count_loops, randn

D64 = torch.float64


def _t(rng, *shape, scale=1.0, grad=True):
    return (randn(rng, *shape) * scale).requires_grad_(grad)


def _away_from_zero(t, margin=0.05):
    """Values kept clear of relu's kink, where finite differences would straddle it."""
    return (t.detach() + margin * torch.sign(t.detach())).requires_grad_()


def _outputs(out):
    return [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o is not None and o.is_floating_point()]


def _check(fn, inputs, fast=False):
    """gradgradcheck, plus first-order gradients with create_graph equal to those without.

    ``fast``: gradgradcheck's fast mode (one random projection of the Jacobians instead of all
    of them), for the recurrent layers whose full check takes minutes."""
    with gpu_nn.backend("reference"):
        diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        outs = _outputs(fn(*inputs))
        cots = [torch.randn_like(o) for o in outs]
        plain = torch.autograd.grad(outs, diff, cots, allow_unused=True)
        outs = _outputs(fn(*inputs))
        graph = torch.autograd.grad(outs, diff, cots, allow_unused=True, create_graph=True)
        for a, b in zip(plain, graph):
            if a is None or b is None:
                assert a is None and b is None or (a if a is not None else b).abs().max() == 0
                continue
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


# ============================================================================ activations


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_activation(act, rng):
    x = _away_from_zero(_t(rng, 3, 7, scale=2.0))
    _check(getattr(F, act), (x,))


# ============================================================================ convolution

CONV_CASES = [
    # nd, N, C, spatial, O, kernel, options
    (2, 1, 4, (5, 5), 4, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)),
    (2, 1, 3, (5, 4), 4, (2, 3), dict(padding="same", activation="relu")),
    (2, 2, 2, (5, 4), 3, (3, 3), dict(stride=2, padding=1, activation="sigmoid")),
    (2, 1, 3, (5, 7), 3, (1, 3), dict(padding=(0, 1), groups=3, activation="tanh")),
    (1, 2, 3, (11,), 5, (3,), dict(stride=2, padding=2, dilation=2)),
    (1, 1, 4, (9,), 4, (4,), dict(padding="same", groups=2, activation="tanh")),
    (1, 2, 2, (7,), 3, (2,), dict(activation="relu")),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"conv{c[0]}d-{'-'.join(map(str, c[6].values()))}")
def test_conv(case, bias, rng):
    nd, n, c, sp, o, k, kw = case
    fn = F.conv2d if nd == 2 else F.conv1d
    x = _t(rng, n, c, *sp)
    w = _t(rng, o, c // kw.get("groups", 1), *k, scale=0.5)
    b = _t(rng, o) if bias else None
    # relu: random pre-activations lie far from zero next to the finite-difference step (1e-6)
    _check(lambda x, w, *b: fn(x, w, *b, **kw), (x, w) + ((b,) if bias else ()))


# ============================================================================ pooling

POOL_CASES = [
    ("max_pool2d", (2, 3, 7, 8), dict(kernel_size=3, stride=2, padding=1, dilation=(1, 2), ceil_mode=True)),
    ("max_pool2d", (1, 2, 6, 5), dict(kernel_size=(2, 3), stride=(1, 2))),
    ("min_pool2d", (2, 2, 7, 6), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("max_pool1d", (2, 3, 11), dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)),
    ("min_pool1d", (1, 2, 9), dict(kernel_size=2)),
    ("avg_pool2d", (2, 3, 7, 8), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("avg_pool2d", (1, 2, 7, 5), dict(kernel_size=(3, 2), stride=2, padding=1, count_include_pad=True)),
    ("avg_pool2d", (2, 2, 5, 5), dict(kernel_size=2, padding=1, ceil_mode=True, divisor_override=3)),
    ("avg_pool1d", (2, 3, 11), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("avg_pool1d", (1, 2, 9), dict(kernel_size=4, stride=3, padding=2)),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[2].values()))}")
def test_pool(case, rng):
    name, shape, kw = case
    x = _t(rng, *shape)
    _check(lambda x: getattr(F, name)(x, **kw), (x,))


def test_max_pool_with_indices(rng):
    x = _t(rng, 2, 3, 6, 7)
    _check(lambda x: F.max_pool2d(x, 2, return_indices=True)[0], (x,))


# ============================================================================ dense


@pytest.mark.parametrize("act", [None, "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(act, bias, rng):
    x, w = _t(rng, 2, 3, 5), _t(rng, 4, 5, scale=0.5)
    b = _t(rng, 4) if bias else None
    _check(lambda x, w, *b: F.linear(x, w, *b, activation=act), (x, w) + ((b,) if bias else ()))


@pytest.mark.parametrize("case", ["linear O=0", "linear K=0", "max_pool2d N=0", "min_pool2d N=0", "avg_pool2d N=0"])
def test_empty_sizes_differentiate_twice_as_torch(case):
    """A second derivative where a size is 0 (no output feature, no input feature, an empty
    batch): the same shapes and values as torch's, where a reshape with an inferred -1 size
    cannot be used (0 elements into [-1, 0])."""
    g = torch.Generator().manual_seed(3)
    if case.startswith("linear"):
        o, k = (0, 5) if case.endswith("O=0") else (4, 0)
        inputs = [torch.randn(3, k, dtype=D64, generator=g), torch.randn(o, k, dtype=D64, generator=g)]
        ours, theirs = F.linear, TF.linear
    else:
        name = case.split()[0]
        inputs = [torch.randn(0, 2, 5, 5, dtype=D64, generator=g)]
        ours = lambda x: getattr(F, name)(x, 2)  # noqa: E731
        theirs = (lambda x: -TF.max_pool2d(-x, 2)) if name == "min_pool2d" else (lambda x: getattr(TF, name)(x, 2))
    results = []
    for f in (ours, theirs):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = f(*leaves)
        first = torch.autograd.grad((y * y).sum() + y.sum(), leaves, create_graph=True)
        penalty = sum((d * d).sum() for d in first) + sum((t * t).sum() for t in leaves)
        results.append(torch.autograd.grad(penalty, leaves, allow_unused=True))
    for a, b, leaf in zip(*results, inputs):  # an unused input's None: a zero gradient
        a, b = (torch.zeros_like(leaf) if t is None else t for t in (a, b))
        assert a.shape == b.shape == leaf.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_linear_vector_weight(rng):
    _check(lambda x, w: F.linear(x, w), (_t(rng, 3, 5), _t(rng, 5)))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax(name, dim, rng):
    _check(lambda x: getattr(F, name)(x, dim), (_t(rng, 3, 4, 5),))


CE_CASES = [
    dict(),
    dict(weight=True),
    dict(ignore_index=2),
    dict(label_smoothing=0.2),
    dict(label_smoothing=0.3, weight=True, ignore_index=1),
    dict(prob=True),
    dict(prob=True, weight=True, label_smoothing=0.15),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_cross_entropy(case, reduction, rng):
    case = dict(case)
    prob = case.pop("prob", False)
    weight = torch.rand(4, dtype=D64) + 0.5 if case.pop("weight", False) else None
    x = _t(rng, 5, 4, 3)
    if prob:
        t = torch.softmax(randn(rng, 5, 4, 3), 1).requires_grad_()
        _check(lambda x, t: F.cross_entropy(x, t, weight=weight, reduction=reduction, **case), (x, t))
    else:
        t = torch.randint(0, 4, (5, 3))
        t[0, 0], t[1, 1], t[2, 2] = 1, 2, 2  # an ignored class is present
        _check(lambda x: F.cross_entropy(x, t, weight=weight, reduction=reduction, **case), (x,))


@pytest.mark.parametrize("case", [dict(), dict(label_smoothing=0.2), dict(weight=True)], ids=["plain", "smoothing", "weight"])
@pytest.mark.parametrize("targets", ["all-ignored", "some-ignored"])
@pytest.mark.parametrize("zero_weight", [False, True])
def test_cross_entropy_mean_over_nothing_as_torch(case, targets, zero_weight, rng):
    """'mean' whose divisor sum w[t] is 0: torch's loss is 0 / 0 = NaN, and its derivatives are
    zero where every target is ignored (no row has a gradient) and NaN where rows with zero
    weight remain (-0 / 0). Ours (a gradient penalty, a Hessian-vector product on a batch of
    padding) gave NaN second derivatives for the former."""
    weight = torch.rand(5, dtype=D64) + 0.5 if case.get("weight") else None
    if zero_weight:
        weight = torch.zeros(5, dtype=D64)
    kw = dict(label_smoothing=case.get("label_smoothing", 0.0), weight=weight)
    t = torch.full((3,), -100) if targets == "all-ignored" else torch.tensor([1, -100, 2])
    x = _t(rng, 3, 5)
    got = []
    for f in (TF.cross_entropy, F.cross_entropy):
        with gpu_nn.backend("reference"):
            loss = f(x, t, **kw)
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            (h,) = torch.autograd.grad(g.pow(2).sum(), x)
            hvp = torch.autograd.functional.hvp(lambda z: f(z, t, **kw), x.detach(), torch.ones_like(x))[1]
        got.append((loss.detach(), g.detach(), h, hvp))
    for name, want, have in zip(("loss", "gradient", "second derivative", "hvp"), *got):
        torch.testing.assert_close(have, want, equal_nan=True, msg=lambda m: f"{name}: {m}")


def test_cross_entropy_unbatched(rng):
    _check(lambda x: F.cross_entropy(x, torch.tensor(2), label_smoothing=0.1), (_t(rng, 5),))


# ============================================================================ recurrent

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def _cell_inputs(rng, mode, B=3, I=4, H=3):
    G = GATES[mode] * H
    return (_t(rng, B, I), _t(rng, B, H), _t(rng, B, H), _t(rng, G, I, scale=0.5), _t(rng, G, H, scale=0.5),
            _t(rng, G, scale=0.5), _t(rng, G, scale=0.5))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", list(GATES))
def test_cell(mode, bias, rng):
    x, h, c, wi, wh, bi, bh = _cell_inputs(rng, mode)
    fn = getattr(F, mode + "_cell")
    b = (bi, bh) if bias else ()
    if mode == "lstm":
        _check(lambda x, h, c, wi, wh, *b: fn(x, (h, c), wi, wh, *b), (x, h, c, wi, wh, *b))
    else:
        _check(lambda x, h, wi, wh, *b: fn(x, h, wi, wh, *b), (x, h, wi, wh, *b))


SEQ_CASES = [
    # layers, bidirectional, lengths, bias, dropout masks, batch_first
    (1, False, None, True, False, False),
    (2, True, [3, 1], True, True, False),
    (2, False, None, False, False, True),
]


@pytest.mark.parametrize("case", SEQ_CASES, ids=lambda c: f"L{c[0]}-bi{int(c[1])}-len{int(c[2] is not None)}-b{int(c[3])}")
@pytest.mark.parametrize("mode", list(GATES))
def test_sequence(mode, case, rng):
    L, bi, lengths, bias, masks, batch_first = case
    T, B, I, H = 3, 2, 3, 2
    D = 2 if bi else 1
    G = GATES[mode] * H
    ws = []
    for layer in range(L):
        for _ in range(D):
            ws += [_t(rng, G, I if layer == 0 else D * H, scale=0.5), _t(rng, G, H, scale=0.5)]
            ws += [_t(rng, G, scale=0.5), _t(rng, G, scale=0.5)] if bias else []
    x = _t(rng, B, T, I) if batch_first else _t(rng, T, B, I)
    hx, cx = _t(rng, L * D, B, H), _t(rng, L * D, B, H)
    dm = torch.bernoulli(torch.full((L - 1, T, B, D * H), 0.7, dtype=D64)) / 0.7 if masks else None
    fn = getattr(F, mode)
    train = dm is not None  # given masks; without them train=True would draw fresh ones per call

    def f(x, hx, *rest):
        if mode == "lstm":
            cx, *ws = rest
            return fn(x, (hx, cx), ws, bias, L, 0.3, train, bi, batch_first, lengths, dm)
        return fn(x, hx, list(rest), bias, L, 0.3, train, bi, batch_first, lengths, dm)

    _check(f, (x, hx, cx, *ws) if mode == "lstm" else (x, hx, *ws), fast=True)


def test_sequence_state_from_input(rng):
    """An initial state computed from the input: the recomputation must not count the path
    through hx twice (gradients with respect to input and hx are separate inputs of the op)."""
    T, B, I, H = 3, 2, 3, 3
    w = [_t(rng, 3 * H, I, scale=0.5), _t(rng, 3 * H, H, scale=0.5), _t(rng, 3 * H), _t(rng, 3 * H)]
    x = _t(rng, T, B, I)
    _check(lambda x, *w: F.gru(x, x[0:1], list(w))[0], (x, *w), fast=True)


@pytest.mark.parametrize("proj_size", [0, 1])
def test_packed_module(proj_size, rng):
    """nn.LSTM on a PackedSequence, gradient penalty through the module; with proj_size the
    recomputed recurrence must project h through weight_hr (without it the gradients differ,
    or the shapes do not fit)."""
    torch.manual_seed(0)
    m = gpu_nn.nn.LSTM(2, 3 if proj_size else 2, num_layers=2, bidirectional=True, proj_size=proj_size).double()
    x = _t(rng, 4, 3, 2)

    def f(x, *params):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, [4, 2, 1], enforce_sorted=False)
        out = torch.func.functional_call(m, dict(zip(dict(m.named_parameters()), params)), (packed,))[0]
        return torch.nn.utils.rnn.pad_packed_sequence(out)[0]

    _check(f, (x, *[p.detach().requires_grad_() for p in m.parameters()]), fast=True)


# ============================================================================ Triton (interpreter) vs torch


def _penalty_grads(fn, inputs):
    """Gradients of |d(sum r * fn(inputs)) / d inputs|^2 with respect to the inputs."""
    out = fn(*inputs)
    r = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    gs = torch.autograd.grad((out * r).sum(), inputs, create_graph=True)
    pen = sum((g * g).sum() for g in gs)
    return torch.autograd.grad(pen, inputs)


TRITON_CASES = {
    "conv2d_tanh": (
        lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, activation="tanh"),
        lambda x, w, b: torch.tanh(TF.conv2d(x, w, b, stride=2, padding=1)),
        lambda rng: (_t(rng, 2, 3, 7, 6), _t(rng, 4, 3, 3, 3, scale=0.3), _t(rng, 4)),
    ),
    "linear_sigmoid": (
        lambda x, w, b: F.linear(x, w, b, activation="sigmoid"),
        lambda x, w, b: torch.sigmoid(TF.linear(x, w, b)),
        lambda rng: (_t(rng, 5, 7), _t(rng, 3, 7, scale=0.4), _t(rng, 3)),
    ),
    "pools_softmax": (
        lambda x: F.softmax(F.avg_pool2d(F.max_pool2d(x, 2, ceil_mode=True), 2, padding=1), 1),
        lambda x: TF.softmax(TF.avg_pool2d(TF.max_pool2d(x, 2, ceil_mode=True), 2, padding=1), 1),
        lambda rng: (_t(rng, 2, 3, 7, 5),),
    ),
    "cross_entropy": (
        lambda x: F.cross_entropy(F.log_softmax(x, 1) * 2, torch.tensor([1, 0, 3], device=x.device), label_smoothing=0.1),
        lambda x: TF.cross_entropy(TF.log_softmax(x, 1) * 2, torch.tensor([1, 0, 3], device=x.device), label_smoothing=0.1),
        lambda rng: (_t(rng, 3, 5),),
    ),
    "lstm_cell": (
        lambda x, h, c, wi, wh: torch.cat(F.lstm_cell(x, (h, c), wi, wh)),
        lambda x, h, c, wi, wh: torch.cat(torch.lstm_cell(x, (h, c), wi, wh)),
        lambda rng: (_t(rng, 2, 3), _t(rng, 2, 4), _t(rng, 2, 4), _t(rng, 16, 3, scale=0.5), _t(rng, 16, 4, scale=0.5)),
    ),
    "gru_sequence": (
        lambda x, h, *w: F.gru(x, h, list(w), True, 1, 0.0, False, False, False)[0],
        lambda x, h, *w: torch.gru(x, h, list(w), True, 1, 0.0, False, False, False)[0],
        lambda rng: (_t(rng, 3, 2, 3), _t(rng, 1, 2, 2), _t(rng, 6, 3, scale=0.5), _t(rng, 6, 2, scale=0.5),
                     _t(rng, 6), _t(rng, 6)),
    ),
}


@pytest.mark.parametrize("backend,device", [p for p in backend_params(("triton",))])
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_gradient_penalty(name, backend, device, rng):
    ours_fn, torch_fn, make = TRITON_CASES[name]
    inputs = make(rng)
    ref = _penalty_grads(torch_fn, inputs)
    f32 = [t.detach().to(device, torch.float32).requires_grad_() for t in inputs]
    # torch in float32 on the same device; on CUDA without cuDNN, whose RNN backward has no
    # derivative (and refuses train=False) where torch's native cells have a differentiable one
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        torch32 = _penalty_grads(torch_fn, f32)
    finally:
        torch.backends.cudnn.enabled = enabled
    with gpu_nn.backend(backend):
        ours = _penalty_grads(ours_fn, f32)
    for i, (a, t32, r) in enumerate(zip(ours, torch32, ref)):
        assert_like_torch(a, t32, r, torch.float32, k=16, what=f"{name} input {i}")


# ============================================================================ opcheck of the backward ops


def test_opcheck_backward_ops(rng):
    ops = torch.ops.gpu_nn
    x, w = _t(rng, 1, 4, 4, 3), _t(rng, 4, 2, 3, 2)
    y = ops.conv_forward(x, w, None, [1, 1], [1, 1, 0, 0], [1, 1], 2, "sigmoid")
    g = _t(rng, *y.shape)
    torch.library.opcheck(ops.conv_backward.default,
                          (g, x, w, y.detach().requires_grad_(), [1, 1], [1, 1, 0, 0], [1, 1], 2, "sigmoid",
                           [True, True, True]))
    torch.library.opcheck(ops.activation_backward.default, (_t(rng, 3, 5), torch.rand(3, 5, dtype=D64).requires_grad_(), "tanh"))
    xl, wl = _t(rng, 3, 5), _t(rng, 4, 5)
    torch.library.opcheck(ops.linear_backward.default, (_t(rng, 3, 4), xl, wl, None, None, True))
    sm = torch.softmax(randn(rng, 3, 5), 1).requires_grad_()
    torch.library.opcheck(ops.softmax_backward.default, (_t(rng, 3, 5), sm, 1))
    torch.library.opcheck(ops.log_softmax_backward.default, (_t(rng, 3, 5), sm.detach().log().requires_grad_(), 1))
    xp = randn(rng, 1, 2, 5, 4)
    _, idx = ops.max_pool(xp, [2, 2], [2, 2], [0, 0], [1, 1], False, False)
    torch.library.opcheck(ops.max_pool_backward.default, (_t(rng, *idx.shape), idx, [1, 2, 5, 4], [2, 2], [2, 2], [0, 0], [1, 1]))
    torch.library.opcheck(ops.avg_pool_backward.default, (_t(rng, 1, 2, 3, 2), [1, 2, 5, 4], [2, 2], [2, 2], [1, 0], False, True, None))


# ============================================================================ TorchScript


def _all_modules():
    nn = gpu_nn.nn
    return {
        "ReLU": nn.ReLU(), "Sigmoid": nn.Sigmoid(), "Tanh": nn.Tanh(),
        "Conv1d": nn.Conv1d(2, 3, 3), "Conv2d": nn.Conv2d(2, 3, 3),
        "Flatten": nn.Flatten(), "Linear": nn.Linear(3, 2), "Softmax": nn.Softmax(1), "LogSoftmax": nn.LogSoftmax(1),
        "CrossEntropyLoss": nn.CrossEntropyLoss(),
        "MaxPool1d": nn.MaxPool1d(2), "MaxPool2d": nn.MaxPool2d(2), "MinPool1d": nn.MinPool1d(2),
        "MinPool2d": nn.MinPool2d(2), "AvgPool1d": nn.AvgPool1d(2), "AvgPool2d": nn.AvgPool2d(2),
        "RNN": nn.RNN(3, 2), "LSTM": nn.LSTM(3, 2), "GRU": nn.GRU(3, 2),
        "RNNCell": nn.RNNCell(3, 2), "LSTMCell": nn.LSTMCell(3, 2), "GRUCell": nn.GRUCell(3, 2),
        "LazyLinear": nn.LazyLinear(2), "LazyConv1d": nn.LazyConv1d(3, 3), "LazyConv2d": nn.LazyConv2d(3, 3),
    }


def test_every_module_class_listed():
    classes = {n for n in gpu_nn.nn.__all__ if isinstance(getattr(gpu_nn.nn, n), type)}
    assert classes == set(_all_modules())


@pytest.mark.parametrize("name", list(_all_modules()))
def test_jit_script_refused(name):
    mod = _all_modules()[name]
    for target in (mod, torch.nn.Sequential(torch.nn.Identity(), mod)):
        with pytest.raises(ScriptingNotSupportedError) as info:
            torch.jit.script(target)
        msg = str(info.value)
        assert f"gpu_nn.nn.{name}" in msg
        assert "torch.jit.trace" in msg and "torch.export" in msg and "torch.compile" in msg
        # gpu_nn.revert named where it gives torch's layer back (torch has no min pooling)
        assert ("gpu_nn.revert(model)" in msg) == (not name.startswith("MinPool"))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = gpu_nn.nn
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 3 * 3, 5)
        self.gru = nn.GRUCell(5, 3)

    def forward(self, x):
        h = self.fc(self.flat(self.pool(self.act(self.conv(x)))))
        return self.gru(torch.tanh(h))


def test_trace_export_compile_still_work(rng):
    torch.manual_seed(0)
    model = _Model().double()
    x = randn(rng, 2, 2, 6, 7)
    with gpu_nn.backend("reference"):
        want = model(x)
        traced = torch.jit.trace(model, (x,))
        torch.testing.assert_close(traced(x), want)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), want)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want)


@pytest.mark.parametrize("nd", [1, 2])
def test_trace_of_same_padding_conv(nd, rng):
    """torch.jit.trace of a padding='same' convolution: its padding comes from the weight's
    sizes, which the tracer hands over as 0-d tensors (an internal assert in torch's tracer
    where the op's int-list argument held them); the trace then runs other spatial sizes."""
    torch.manual_seed(0)
    conv = (gpu_nn.nn.Conv1d if nd == 1 else gpu_nn.nn.Conv2d)(3, 4, (3, 4) if nd == 2 else 4, padding="same", dilation=2).double()
    x = randn(rng, 2, 3, *(9, 8)[:nd])
    with gpu_nn.backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(conv, (x,))
        y = randn(rng, 1, 3, *(6, 11)[:nd])
        torch.testing.assert_close(traced(y), conv(y))
        assert traced(y).shape[2:] == y.shape[2:]


def test_trace_shows_no_warnings_of_ours():
    """torch.jit.trace of a converted CNN: none of the 'Converting a tensor to a Python boolean'
    TracerWarnings our argument checks provoked (20 for this model; torch's twin gives none),
    while the user's own warnings filters keep working (a fresh process: pytest sets its own)."""
    from helpers import run_fresh

    code = (
        "import warnings, torch, gpu_nn\n"
        "m = gpu_nn.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),\n"
        "    torch.nn.Flatten(), torch.nn.Linear(36, 5), torch.nn.LogSoftmax(1)))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    torch.jit.trace(m, torch.randn(2, 3, 8, 8))\n"
        "print(sum('gpu_nn' in x.filename for x in w), sum(issubclass(x.category, torch.jit.TracerWarning) for x in w))\n"
    )
    out = run_fresh(["-c", code], env={**__import__("os").environ, "GPU_NN_BACKEND": "reference"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "0"], out.stdout


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("act", [None, "tanh"])
def test_weight_gradient_penalty_of_a_first_layer(backend, device, act):
    """A gradient penalty on a first layer's weight (its input needs no gradient, so the backward
    computes no input gradient and passes an empty placeholder): the double backward takes the
    placeholder as a zero gradient; torch's result, with and without an input gradient."""
    torch.manual_seed(3)
    dt = torch.float64 if backend == "reference" else torch.float32
    for need_x in (False, True):
        w64 = torch.randn(4, 3, dtype=torch.float64)
        b64 = torch.randn(4, dtype=torch.float64)
        x64 = torch.randn(5, 3, dtype=torch.float64)

        def run(f, dtype, dev):
            w, b, x = (t.to(dev, dtype).clone() for t in (w64, b64, x64))  # fresh leaves each run
            w.requires_grad_(), b.requires_grad_(), x.requires_grad_(need_x)
            (gw,) = torch.autograd.grad(f(x, w, b).pow(2).sum(), w, create_graph=True)
            gw.pow(2).sum().backward()
            return w.grad, (x.grad if need_x else None)

        def theirs_fn(t, w, b):
            return (torch.tanh if act else (lambda z: z))(torch.nn.functional.linear(t, w, b))

        with gpu_nn.backend(backend):
            ours = run(lambda t, w, b: gpu_nn.functional.linear(t, w, b, activation=act), dt, device)
        exact = run(theirs_fn, torch.float64, "cpu")
        if dt == torch.float64:  # the reference: torch's float64, to float64's rounding
            torch.testing.assert_close(ours[0], exact[0], rtol=1e-9, atol=1e-9)
            if need_x:
                torch.testing.assert_close(ours[1], exact[1], rtol=1e-9, atol=1e-9)
            continue
        # float32: at most twice torch's own float32 error against float64 (DESIGN section 4)
        theirs = run(theirs_fn, dt, device)
        assert_like_torch(ours[0], theirs[0], exact[0], dt, k=5 * 4, what="weight gradient penalty")
        if need_x:
            assert_like_torch(ours[1], theirs[1], exact[1], dt, k=5 * 4, what="its input gradient")


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d", "max_pool1d", "avg_pool1d", "min_pool2d"])
def test_pooling_gradient_penalty_with_a_constant_upstream_gradient(backend, device, op):
    """grad(pool(x).sum(), x, create_graph=True) differentiated again: torch's pooling backward is
    differentiable in its input (a zero derivative), so the input gradient has a graph and the
    second backward gives x a zero gradient; ours had no graph ('element 0 of tensors does not
    require grad')."""
    dims = (1, 2, 4, 4) if op.endswith("2d") else (1, 2, 6)
    theirs = {"min_pool2d": lambda t: -TF.max_pool2d(-t, 2)}.get(op, lambda t: getattr(TF, op)(t, 2))
    results = []
    for fn, name in ((lambda t: getattr(F, op)(t, 2), backend), (theirs, "reference")):
        x = torch.randn(*dims, device=device, requires_grad=True)
        with gpu_nn.backend(name):
            (gx,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
            assert gx.requires_grad, name
            gx.pow(2).sum().backward()
        results.append(x.grad)
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pooling_input_gradient_depends_on_the_input_without_a_pass(op):
    """Under torch.func's grad (per-sample gradients of a CNN), whose every backward builds a graph,
    the pooling's input gradient is not made to depend on the input by adding a zero (torch.func
    gives an input it does not reach a zero gradient itself): no elementwise op over the
    gradient, no reduction for the zero (one more read and write of the input gradient in every
    pooling backward there before). Outside it (create_graph=True) the dependence stays: the
    second derivative in the input is torch's zero, and the returned gradient may be changed in
    place, as torch's (a view made by an autograd.Function refused that: a review's find)."""
    from torch.func import grad, vmap
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self.seen.append((str(func.overloadpacket), None if first is None else first.numel()))
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 2, 2, 6, 6, dtype=D64)
    f = lambda u: getattr(F, op)(u, 2).sum()  # noqa: E731
    with gpu_nn.backend("reference"), Ops() as ops:
        g = vmap(grad(f))(x)
    # (the loss's own sum reads the pooled values; the zero was a sum of an empty slice)
    assert not [o for o in ops.seen if o[0] in ("aten.add", "aten.add_") or o == ("aten.sum", 0)], ops.seen
    torch.testing.assert_close(g, vmap(grad(lambda u: getattr(TF, op)(u, 2).sum()))(x))
    xr = x[0].clone().requires_grad_()
    with gpu_nn.backend("reference"):
        (gx,) = torch.autograd.grad(f(xr), xr, create_graph=True)
        (gg,) = torch.autograd.grad(gx.pow(2).sum(), xr)
        (gx,) = torch.autograd.grad(f(xr), xr, create_graph=True)
        gx.add_(1)
    torch.testing.assert_close(gg, torch.zeros_like(xr))
    (want,) = torch.autograd.grad(getattr(TF, op)(xr, 2).sum(), xr, create_graph=True)
    torch.testing.assert_close(gx, want + 1)
    # grad of grad through the pooling alone: torch.func's zero
    with gpu_nn.backend("reference"):
        torch.testing.assert_close(grad(lambda u: grad(f)(u).pow(2).sum())(x[0]), torch.zeros_like(x[0]))


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d", "max_pool1d", "avg_pool1d", "min_pool2d"])
def test_pooling_input_gradient_through_a_graph_carrying_upstream_gradient(backend, device, op):
    """grad(pool(x), x, v, create_graph=True) with ``v`` requiring a gradient, differentiated
    again with respect to x and v: torch's derivative in x is zero (its pooling backward is
    differentiable in its input), ours said x was not used in the graph."""
    dims = (1, 2, 4, 4) if op.endswith("2d") else (1, 2, 6)
    theirs = {"min_pool2d": lambda t: -TF.max_pool2d(-t, 2)}.get(op, lambda t: getattr(TF, op)(t, 2))
    results = []
    for fn, name in ((lambda t: getattr(F, op)(t, 2), backend), (theirs, "reference")):
        torch.manual_seed(1)
        x = torch.randn(*dims, device=device, requires_grad=True)
        with gpu_nn.backend(name):
            y = fn(x)
            v = torch.randn(y.shape, device=device, requires_grad=True)
            (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
            results.append(torch.autograd.grad(gx.pow(2).sum(), (x, v)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def _batched_cases(device="cpu", dtype=D64):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, dtype=D64, generator=g).to(device, dtype)

    w4, w3, wl = r(4, 2, 3, 3), r(4, 2, 3), r(3, 5)
    wi, wh, bi, bh = r(16, 3), r(16, 4), r(16), r(16)
    t = torch.tensor([1, 0], device=device)

    def cell(m):
        f = torch.lstm_cell if m is TF else F.lstm_cell
        return lambda x: f(x, (x[:, :1].expand(2, 4) * 1, x[:, 1:2].expand(2, 4) * 1), wi, wh, bi, bh)[0]

    return {
        "conv2d": (lambda m: (lambda x: m.conv2d(x, w4, padding=1)), r(1, 2, 4, 4)),
        "conv1d": (lambda m: (lambda x: m.conv1d(x, w3)), r(1, 2, 6)),
        "max_pool2d": (lambda m: (lambda x: m.max_pool2d(x, 2)), r(1, 2, 4, 4)),
        "avg_pool1d": (lambda m: (lambda x: m.avg_pool1d(x, 2)), r(1, 2, 6)),
        "softmax": (lambda m: (lambda x: m.softmax(x, 1)), r(2, 5)),
        "log_softmax": (lambda m: (lambda x: m.log_softmax(x, 1)), r(2, 5)),
        "cross_entropy": (lambda m: (lambda x: m.cross_entropy(x, t, reduction="none")), r(2, 5)),
        "relu": (lambda m: m.relu, r(2, 5)),
        "sigmoid": (lambda m: m.sigmoid, r(2, 5)),
        "linear": (lambda m: (lambda x: m.linear(x, wl)), r(2, 5)),
        "lstm_cell": (cell, r(2, 3)),
    }


@pytest.mark.parametrize("name", sorted(_batched_cases()))
def test_vectorized_jacobian_and_hessian_as_torch(name):
    """torch.autograd.functional.jacobian / hessian(vectorize=True), i.e. autograd.grad with
    is_grads_batched (torch's older vmap): our ops run once per batch element through their
    dispatcher entry. Ours raised 'Batching rule not implemented for aten::detach' (the NumPy
    view of a batched tensor) for every op."""
    make, x = _batched_cases()[name]
    got = []
    for m in (TF, F):
        with gpu_nn.backend("reference"):
            jac = torch.autograd.functional.jacobian(make(m), x, vectorize=True)
            hess = torch.autograd.functional.hessian(lambda v: make(m)(v).pow(2).sum(), x, vectorize=True)
        got.append((jac, hess))
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def _gpu_jacobian_cases():
    # (conv2d: 23 s interpreted); CuPy implements pooling and the recurrent layers only, so its
    # backend takes max_pool2d (the others would raise BackendUnavailableError on a GPU machine)
    cases = []
    for p in backend_params(("triton", "cupy")):
        names = ("conv1d", "max_pool2d", "linear", "cross_entropy") if p.values[0] == "triton" else ("max_pool2d",)
        cases += [pytest.param(n, *p.values, id=f"{p.id}-{n}", marks=p.marks) for n in names]
    return cases


@pytest.mark.parametrize("name,backend,device", _gpu_jacobian_cases())
def test_vectorized_jacobian_on_the_gpu_backends(name, backend, device):
    """The same on a GPU backend: a batched tensor has no storage there either (Triton's launch
    raised NotImplementedError, 'Cannot access storage of BatchedTensorImpl', which passed
    through): the dispatcher's batched fallback, the jacobian as vectorize=False's."""
    make, x = _batched_cases(device, torch.float32)[name]
    f = make(F)
    with gpu_nn.backend(backend):
        got = [torch.autograd.functional.jacobian(f, x, vectorize=vec) for vec in (True, False)]
    torch.testing.assert_close(got[0], got[1], rtol=1e-6, atol=1e-7)
    # and the jacobian itself, against the float64 reference's of the same function (the two
    # routes agreeing alone would pass a kernel wrong in both)
    make64, x64 = _batched_cases("cpu", torch.float64)[name]
    with gpu_nn.backend("reference"):
        want = torch.autograd.functional.jacobian(make64(F), x64)
    assert_close(got[0], want, torch.float32, k=x64.numel(), what=f"{name} jacobian")


_SEQ_LAYERS = {
    "lstm-2layer-bi": (gnn.LSTM, torch.nn.LSTM, dict(num_layers=2, bidirectional=True)),
    "gru": (gnn.GRU, torch.nn.GRU, {}),
    "rnn_relu-batch_first": (gnn.RNN, torch.nn.RNN, dict(nonlinearity="relu", batch_first=True)),
}


def _seq_cases():
    # every layer on the reference (float64: against torch too, hessian included); the GPU
    # backends (the interpreter on a CPU: 159 s for the two-layer LSTM with hessians) one GRU's
    # jacobian and weight gradients
    cases = [pytest.param(layer, "reference", "cpu", id=f"reference-{layer}") for layer in sorted(_SEQ_LAYERS)]
    for p in backend_params(("triton", "cupy")):
        cases.append(pytest.param("gru", *p.values, id=f"{p.id}-gru", marks=p.marks))
    return cases


@pytest.mark.parametrize("layer,backend,device", _seq_cases())
def test_vectorized_jacobian_and_hessian_through_sequence_layers(layer, backend, device):
    """jacobian / hessian(vectorize=True) through the recurrent sequence layers, whose weights
    travel in a list that torch's batched fallback refuses (a NotImplementedError before): our
    own loop over the batch (_dispatch._legacy_looped) gives what vectorize=False gives, and
    (float64 on the reference) torch's layer's values; gradients of the weights with
    is_grads_batched too."""
    ours_cls, theirs_cls, kw = _SEQ_LAYERS[layer]
    ref = backend == "reference"
    dtype = D64 if ref else torch.float32
    torch.manual_seed(0)
    ours = ours_cls(3, 4, **kw).to(device, dtype)
    theirs = theirs_cls(3, 4, **kw).to(device, dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(*((3, 2) if ref else (2, 1)), 3, dtype=dtype, device=device)  # (one backward per output element)
    J, H = torch.autograd.functional.jacobian, torch.autograd.functional.hessian
    close = dict(rtol=1e-12, atol=1e-14) if ref else dict(rtol=1e-5, atol=1e-6)
    with gpu_nn.backend(backend):
        got = [J(lambda v: ours(v)[0], x, vectorize=vec) for vec in (True, False)]
        if ref:
            got_h = [H(lambda v: ours(v)[0].pow(2).sum(), x, vectorize=vec) for vec in (True, False)]
        out = ours(x)[0]
        g = torch.randn(3, *out.shape, dtype=dtype, device=device)
        w_grads = torch.autograd.grad(out, list(ours.parameters()), g, is_grads_batched=True)
        w_rows = [torch.autograd.grad(ours(x)[0], list(ours.parameters()), g[i]) for i in range(len(g))]
    torch.testing.assert_close(got[0], got[1], **close)
    for a, rows in zip(w_grads, zip(*w_rows)):  # each batch row as its own backward gives it
        torch.testing.assert_close(a, torch.stack(rows), **close)
    if ref:  # (torch's cuDNN layer takes no batched gradients: its backward has a weight list too)
        w_theirs = torch.autograd.grad(theirs(x)[0], list(theirs.parameters()), g, is_grads_batched=True)
        torch.testing.assert_close(got_h[0], got_h[1], **close)
        torch.testing.assert_close(got[0], J(lambda v: theirs(v)[0], x, vectorize=True), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_h[0], H(lambda v: theirs(v)[0].pow(2).sum(), x, vectorize=True),
                                   rtol=1e-10, atol=1e-12)
        for a, b in zip(w_grads, w_theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    else:
        assert [a.shape for a in w_grads] == [(len(g), *p.shape) for p in ours.parameters()]


def test_batched_gradients_through_a_sequence_layer_on_another_thread(monkeypatch):
    """On a GPU the autograd engine runs a backward node on its device's own thread, where the
    legacy vmap's nesting depth (thread-local, not carried over) reads 0 while the tensors stay
    batched at level 1: the level is read off the tensors (it was the depth: a CUDA jacobian
    through an LSTM was refused as 'nested'). Simulated here by running the op's batched route on
    a second thread."""
    import threading

    from gpu_nn.ops import _dispatch

    real = _dispatch.Routed._legacy

    def on_another_thread(self, args):
        box = {}

        def run():
            try:
                box["out"] = real(self, args)
            except BaseException as exc:  # (handed back to the caller's thread)
                box["exc"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        if "exc" in box:
            raise box["exc"]
        return box["out"]

    torch.manual_seed(0)
    gru = gnn.GRU(3, 4, num_layers=2, bidirectional=True).double()
    x = torch.randn(3, 2, 3, dtype=D64)
    J = torch.autograd.functional.jacobian
    looped = J(lambda v: gru(v)[0], x, vectorize=False)
    monkeypatch.setattr(_dispatch.Routed, "_legacy", on_another_thread)
    torch.testing.assert_close(J(lambda v: gru(v)[0], x, vectorize=True), looped, rtol=1e-12, atol=1e-14)


def test_vectorized_jacobian_with_create_graph_says_so():
    """A vectorized jacobian taken with create_graph=True inside another (or hessian with
    create_graph=True and vectorize=True) hands our ops batched tensors that require grad; run
    through torch's batched fallback those gave wrong values (a GRU's nested jacobian 0.09 off,
    checked while writing this), and before stop 58 a RuntimeError about aten::detach: a
    NotImplementedError that names the way out."""
    lstm = gnn.LSTM(2, 2).double()
    x = torch.randn(2, 1, 2, dtype=D64)
    J = torch.autograd.functional.jacobian
    for f in (lambda u: lstm(u)[0], F.relu):
        with pytest.raises(NotImplementedError, match="vectorize=False for the outer one"):
            J(lambda v: J(f, v, create_graph=True, vectorize=True), x, vectorize=True)
        with pytest.raises(NotImplementedError, match="create_graph=True"):
            torch.autograd.functional.hessian(lambda v: f(v).pow(2).sum(), x, create_graph=True, vectorize=True)


def _same_as_torch(got: dict, want: dict, backend: str) -> None:
    """The forward-mode / vmap tests' results (name -> tensor) against torch's float64 ones:
    exactly on the reference (float64), within float32's tolerance on a GPU backend."""
    assert set(got) == set(want)
    for k in want:
        if backend == "reference":
            torch.testing.assert_close(got[k], want[k], msg=k)
        else:
            assert_close(got[k], want[k], torch.float32, k=16, what=k)


@pytest.mark.parametrize("act", ["Tanh", "Sigmoid", "ReLU"])
@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_forward_mode_ad_through_linear_and_activations(act, backend, device):
    """Forward-mode AD through linear and the activations (register_jvp), what scientific
    models (physics-informed networks: Laplacians, Hessians of small MLPs) ask of torch.func: a
    dual tensor, torch.func.jvp in the input and in the parameters, jacfwd, hessian (forward over
    reverse) of the input and of the parameters, jacrev of jacfwd (reverse over forward), a fused
    activation, a 3-d input: torch's values (float64 on the reference; float32 on triton against
    torch's float64). Forward over forward (jacfwd of jacfwd) raises: an autograd.Function's jvp
    rule reads its saved tensors without the outer tangent (torch's own Functions give wrong
    values there)."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call, hessian, jacfwd, jacrev, jvp, vmap

    if backend == "triton" and device == "cpu" and act != "Tanh":
        pytest.skip("the interpreter runs Tanh only: the rules are the backends' common code, and the reference "
                    "runs all three activations")
    dtype = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(0)

    def mk(lib):
        return lib.Sequential(lib.Linear(3, 5), getattr(lib, act)(), lib.Linear(5, 4), getattr(lib, act)(),
                              lib.Linear(4, 1))

    ours, theirs = mk(gnn).to(device, dtype), mk(torch.nn).double()
    theirs.load_state_dict(ours.state_dict())
    x, t = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    tp = {k: torch.randn(p.shape, dtype=torch.float64) for k, p in theirs.named_parameters()}

    def results(m, dt, dev):
        xs, ts = x.to(dev, dt), t.to(dev, dt)
        params = dict(m.named_parameters())
        tps = {k: v.to(dev, dt) for k, v in tp.items()}
        scalar = lambda u: m(u[None])[0, 0]  # noqa: E731
        out = {"jvp": jvp(m, (xs,), (ts,))[1],
               "jvp params": jvp(lambda p: functional_call(m, p, (xs,)), (params,), (tps,))[1],
               "jacfwd": vmap(jacfwd(scalar))(xs[0]),
               "hessian": vmap(hessian(scalar))(xs[0]),
               "hessian params": hessian(lambda p: functional_call(m, p, (xs,)).sum())(params)["2.weight"]["0.weight"],
               "jacrev(jacfwd)": jacrev(jacfwd(scalar))(xs[0, 0])}
        with fwad.dual_level():
            out["dual"] = fwad.unpack_dual(m(fwad.make_dual(xs, ts))).tangent
        w, b = params["0.weight"], params["0.bias"]
        f = (lambda u: gpu_nn.functional.linear(u, w, b, activation=act.lower())) if m is ours else \
            (lambda u: getattr(torch, act.lower())(torch.nn.functional.linear(u, w, b)))
        out["fused"] = jvp(f, (xs,), (ts,))[1]
        return out

    with gpu_nn.backend(backend):
        got = results(ours, dtype, device)
        with pytest.raises(NotImplementedError, match="forward-mode AD over forward-mode AD"):
            jacfwd(jacfwd(lambda u: ours(u[None])[0, 0]))(x[0, 0].to(device, dtype))
        # torch.autograd.functional's vectorized forward-mode jacobian: refused in words (its legacy
        # vmap's tangents have no unpack_dual; a RuntimeError from deep inside before)
        with pytest.raises(NotImplementedError, match="forward-mode strategy"):
            torch.autograd.functional.jacobian(ours, x[0].to(device, dtype), strategy="forward-mode", vectorize=True)
        # an in-place relu of a dual tensor (the in-place kernel and Function have no forward-mode
        # rule: the op and a copy back), with and without a gradient wanted too
        for grad in (False, True):
            with fwad.dual_level(), torch.set_grad_enabled(grad):
                d = ours[0](fwad.make_dual(x.to(device, dtype), t.to(device, dtype)))
                gpu_nn.functional.relu(d, inplace=True)
                got[f"relu_ grad={grad}"] = fwad.unpack_dual(d).tangent.detach().clone()
        # reverse over forward through it (the tangent the rule's backward op saved is not the one
        # the copy back overwrites: a review's find, "modified by an inplace operation" before)
        xr = x.to(device, dtype).requires_grad_()
        with fwad.dual_level():
            d = ours[0](fwad.make_dual(xr, t.to(device, dtype)))
            gpu_nn.functional.relu(d, inplace=True)
            got["grad of relu_'s tangent"] = torch.autograd.grad(fwad.unpack_dual(d).tangent.pow(2).sum(), xr)[0]
    want = results(theirs, torch.float64, "cpu")
    for grad in (False, True):
        with fwad.dual_level(), torch.set_grad_enabled(grad):
            d = theirs[0](fwad.make_dual(x, t))
            torch.relu_(d)
            want[f"relu_ grad={grad}"] = fwad.unpack_dual(d).tangent.detach().clone()
    xr = x.clone().requires_grad_()
    with fwad.dual_level():
        d = theirs[0](fwad.make_dual(xr, t))
        torch.relu_(d)
        want["grad of relu_'s tangent"] = torch.autograd.grad(fwad.unpack_dual(d).tangent.pow(2).sum(), xr)[0]
    _same_as_torch(got, want, backend)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_vmap_folds_linear_and_activations_into_one_call(backend, device, monkeypatch):
    """vmap of linear (weight and bias not batched) and of the activations and their backward
    (elementwise) runs the batch as one call of the op, where every op looped over the batch:
    vmap(hessian) of a 3-layer 32-wide tanh MLP over 64 points took 152 ms on the CPU machine
    (torch 2.1), 17 ms folded. The folds at every batch dim and mix of batched / unbatched
    operands give torch's values; per-sample weight and bias gradients fold too (of one row per
    element an outer product each, of several a grouped kernel-size-1 conv1d's backward); a
    batched weight (per-sample weights) keeps the loop."""
    from torch.func import functional_call, grad, hessian, vmap

    loops = count_loops(monkeypatch)
    dtype = torch.float64 if backend == "reference" else torch.float32
    k = dict(device=device, dtype=dtype)
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, **k), torch.randn(4, **k)
    x = torch.randn(3, 5, 3, **k)  # batched along dim 1 below
    g = torch.randn(5, 4, **k)
    ours = {}
    with gpu_nn.backend(backend):
        ours["linear"] = vmap(lambda u: F.linear(u, w, b, activation="tanh"), in_dims=1)(x)
        ours["tanh"] = vmap(F.tanh, in_dims=1, out_dims=1)(x)
        ours["relu grad"] = vmap(grad(lambda u: F.relu(u).pow(2).sum()), in_dims=1)(x)
        # the backward with one operand batched, the other not (vmap of vjp over cotangents)
        y = F.sigmoid(x[:, 0])
        ours["sigmoid vjp"] = vmap(torch.func.vjp(F.sigmoid, x[:, 0])[1])(g[:, None, :3].expand(5, 3, 3).contiguous())[0]
        mlp = gnn.Sequential(gnn.Linear(3, 8), gnn.Tanh(), gnn.Linear(8, 1)).to(**k)
        ours["hessian"] = vmap(hessian(lambda u: mlp(u[None])[0, 0]))(x[0])
        assert loops == [], loops  # every op folded
        params = {n: p.detach() for n, p in mlp.named_parameters()}
        ours["per-sample"] = vmap(grad(lambda p, u: functional_call(mlp, p, (u[None],)).sum()), in_dims=(None, 0))(params, x[0])
        ours["per-sample rows"] = vmap(grad(lambda p, u: functional_call(mlp, p, (u,)).sum()), in_dims=(None, 1))(params, x)
        assert loops == [], loops  # per-sample gradients too, of one row or several per element
        ws = torch.randn(5, 4, 3, **k)
        ours["batched weight"] = vmap(lambda wi: F.linear(x[0], wi, b))(ws)
    del y
    tmlp = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(**k)
    tmlp.load_state_dict(mlp.state_dict())
    want = {"linear": vmap(lambda u: torch.tanh(TF.linear(u, w, b)), in_dims=1)(x),
            "tanh": vmap(torch.tanh, in_dims=1, out_dims=1)(x),
            "relu grad": vmap(grad(lambda u: torch.relu(u).pow(2).sum()), in_dims=1)(x),
            "sigmoid vjp": vmap(torch.func.vjp(torch.sigmoid, x[:, 0])[1])(g[:, None, :3].expand(5, 3, 3).contiguous())[0],
            "hessian": vmap(hessian(lambda u: tmlp(u[None])[0, 0]))(x[0]),
            "per-sample": vmap(grad(lambda p, u: functional_call(tmlp, p, (u[None],)).sum()), in_dims=(None, 0))(
                {n: p.detach() for n, p in tmlp.named_parameters()}, x[0]),
            "per-sample rows": vmap(grad(lambda p, u: functional_call(tmlp, p, (u,)).sum()), in_dims=(None, 1))(
                {n: p.detach() for n, p in tmlp.named_parameters()}, x),
            "batched weight": vmap(lambda wi: TF.linear(x[0], wi, b))(ws)}
    for name in want:
        a, e = (ours[name]["0.weight"], want[name]["0.weight"]) if name.startswith("per-sample") else (ours[name], want[name])
        if backend == "reference":
            torch.testing.assert_close(a, e, msg=name)
        else:
            assert_close(a, e, torch.float32, k=16, what=name)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_forward_mode_and_vmap_through_softmax(name, backend, device, monkeypatch):
    """softmax / log_softmax under forward-mode AD (their rules and their backward's: hessians of
    a classifier head) and folded under vmap (the batch first, the softmax's dim past it, one
    call): torch's values for jvp, a dual tensor, hessian, vmap(jacrev) and vmap(hessian), at a
    positive, a negative and the batch's own dim; no loop over the batch left."""
    import torch.autograd.forward_ad as fwad
    from torch.func import hessian, jacrev, jvp, vmap

    loops = count_loops(monkeypatch)
    if backend == "triton" and device == "cpu" and name == "softmax":
        pytest.skip("the interpreter runs log_softmax only: the rules are the backends' common code, and the "
                    "reference runs both")
    dtype = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(0)
    W = torch.randn(6, 4, dtype=torch.float64)
    x, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for dim in (1, -1, 0):
        def ours(u):
            return getattr(F, name)(F.linear(u, W.to(u), None, activation="tanh"), dim=dim)

        def theirs(u):
            return getattr(torch, name)(torch.tanh(TF.linear(u, W)), dim=dim)

        results = []
        for f, dt, dev in ((ours, dtype, device), (theirs, torch.float64, "cpu")):
            xs, vs = x.to(dev, dt), v.to(dev, dt)
            with gpu_nn.backend(backend) if f is ours else torch.enable_grad():
                r = [jvp(f, (xs,), (vs,))[1], hessian(lambda u: (f(u) ** 2).sum())(xs[:2]),
                     vmap(jacrev(lambda u: f(u[None])[0]))(xs), vmap(hessian(lambda u: f(u[None]).pow(2).sum()))(xs)]
                with fwad.dual_level():
                    r.append(fwad.unpack_dual(f(fwad.make_dual(xs, vs))).tangent)
            results.append(r)
        for a, b in zip(*results):
            if backend == "reference":
                torch.testing.assert_close(a, b)
            else:
                assert_close(a, b, torch.float32, k=16, what=f"{name} dim={dim}")
    assert loops == [], loops
    # 0-d elements keep the loop (each one's softmax over itself: 1; folded, the softmax had
    # run across the batch: a review's find)
    s = torch.randn(5, device=device, dtype=dtype)
    for dim in (0, -1):
        with gpu_nn.backend(backend):
            got = vmap(lambda u: getattr(F, name)(u, dim=dim))(s)
        torch.testing.assert_close(got, vmap(lambda u: getattr(torch, name)(u, dim=dim))(s))


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_forward_mode_and_vmap_through_convolutions(nd, backend, device, monkeypatch):
    """Convolutions under forward-mode AD (their rule and their backward's, each term our conv
    ops: jvp / jacfwd of CNNs, hessians in the input and the parameters) and folded under vmap
    (the batch into the input's own batch dim): a CNN of two convolutions (one strided), tanh and
    sigmoid, a linear head, and a fused-activation conv2d on channels_last input, against torch;
    per-sample weight and bias gradients (one grouped convolution backward for the batch, a
    dense one for the input gradient), a grouped strided fused convolution's of two images per
    element among them; no loop over the batch left where
    the weights are not batched."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

    if backend == "triton" and device == "cpu" and nd == 1:
        pytest.skip("the interpreter runs conv2d only: the rules are the ranks' common code, and the reference "
                    "runs both ranks")
    loops = count_loops(monkeypatch)
    dtype = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(0)

    def mk(lib):
        conv = getattr(lib, f"Conv{nd}d")
        return lib.Sequential(conv(2, 3, 3, padding=1), lib.Tanh(), conv(3, 4, 3, stride=2), lib.Sigmoid(), lib.Flatten(),
                              lib.Linear(4 * (2 if nd == 1 else 4), 1))

    ours, theirs = mk(gnn).to(device, dtype), mk(torch.nn).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, *((6,) * nd), dtype=torch.float64)
    v = torch.randn_like(x)
    w, b = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    xl = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    wgroups, bgroups = torch.randn(6, 2, *((3,) * nd), dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    xgroups = torch.randn(3, 2, 4, *((7,) * nd), dtype=torch.float64)  # 3 elements of 2 images each

    # the interpreter (a hundred seconds for all of it) runs the first-order transforms and one
    # hessian; the reference every one
    light = backend == "triton" and device == "cpu"

    def results(m, dt, dev):
        xs, vs = x.to(dev, dt), v.to(dev, dt)
        params = dict(m.named_parameters())
        scalar = lambda u: m(u[None])[0, 0]  # noqa: E731
        r = {"jvp": jvp(m, (xs,), (vs,))[1], "vmap jacrev": vmap(jacrev(scalar))(xs[:2]),
             "hessian": hessian(scalar)(xs[0])}
        with fwad.dual_level():
            r["dual"] = fwad.unpack_dual(m(fwad.make_dual(xs, vs))).tangent
        if not light:
            r["vmap jacfwd"] = vmap(jacfwd(scalar))(xs[:2])
        assert loops == [], loops  # (in the input: every op folded)
        # in the parameters (their directions batch the weights: those keep the loop)
        r["jvp params"] = jvp(lambda p: functional_call(m, p, (xs,)), (params,),
                              ({k: torch.ones_like(q) for k, q in params.items()},))[1]
        if not light:
            r["hessian params"] = hessian(lambda p: functional_call(m, p, (xs,)).pow(2).sum())(params)["0.weight"][
                "2.weight"]
        loops.clear()
        if nd == 2:
            ws, bs = w.to(dev, dt), b.to(dev, dt)
            xc = xl.to(dev, dt).to(memory_format=torch.channels_last)
            f = (lambda u: F.conv2d(u, ws, bs, padding=1, activation="tanh")) if m is ours else \
                (lambda u: torch.tanh(TF.conv2d(u, ws, bs, padding=1)))
            r["fused jvp"] = jvp(f, (xc,), (torch.ones_like(xc),))[1]
            if not light:
                r["fused vmap hessian"] = vmap(hessian(lambda u: f(u[None]).pow(2).sum()))(xc)
        # per-sample gradients (vmap(grad(...)) over functional_call): one grouped convolution
        # backward for the batch; and of a grouped, strided, fused conv of two images per element
        detached = {k: q.detach() for k, q in params.items()}
        per = vmap(grad(lambda p, u: functional_call(m, p, (u[None],)).pow(2).sum()), in_dims=(None, 0))(detached, xs)
        r.update({f"per-sample {k}": per[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias")})
        wg, bg, xg = (t.to(dev, dt) for t in (wgroups, bgroups, xgroups))
        conv = getattr(F if m is ours else TF, f"conv{nd}d")
        act = (lambda u: u) if m is ours else torch.tanh
        kw = {"activation": "tanh"} if m is ours else {}
        r["per-sample grouped weight"], r["per-sample grouped bias"] = vmap(grad(
            lambda W, c, u: act(conv(u, W, c, stride=2, groups=2, **kw)).pow(2).sum(), argnums=(0, 1)),
            in_dims=(None, None, 0))(wg, bg, xg)
        return r

    with gpu_nn.backend(backend):
        got = results(ours, dtype, device)
    assert loops == [], loops
    want = results(theirs, torch.float64, "cpu")
    _same_as_torch(got, want, backend)


@pytest.mark.parametrize("pool", ["MaxPool2d", "AvgPool2d", "MaxPool1d", "AvgPool1d"])
@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_forward_mode_and_vmap_through_pooling(pool, backend, device, monkeypatch):
    """Max / min / average pooling under forward-mode AD (max pooling's tangent gathered at its
    indices, average pooling's and both backward's the ops again: jvp / jacfwd / hessian of a
    pooled CNN) and folded under vmap (the batch into the input's own batch dim, the forward's
    indices expanded over a jacfwd's directions): a conv / tanh / pool / linear CNN, and min pooling
    and dilated ceil-mode max pooling on channels_last input, against torch; no loop left."""
    import torch.autograd.forward_ad as fwad
    from torch.func import hessian, jacrev, jvp, vmap

    if backend == "triton" and device == "cpu" and pool != "MaxPool2d":
        pytest.skip("the interpreter runs MaxPool2d only: the rules are the forms' common code, and the "
                    "reference runs all four")
    loops = count_loops(monkeypatch)
    dtype = torch.float64 if backend == "reference" else torch.float32
    nd = 1 if pool.endswith("1d") else 2
    torch.manual_seed(0)

    def mk(lib):
        conv = getattr(lib, f"Conv{nd}d")
        return lib.Sequential(conv(2, 3, 3, padding=1), lib.Tanh(), getattr(lib, pool)(2), lib.Flatten(),
                              lib.Linear(3 * (3 if nd == 1 else 9), 1))

    ours, theirs = mk(gnn).to(device, dtype), mk(torch.nn).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, *((6,) * nd), dtype=torch.float64)
    v = torch.randn_like(x)
    xl = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    light = backend == "triton" and device == "cpu"
    forms = {"min": (lambda u: F.min_pool2d(u, 3, 2, 1), lambda u: -TF.max_pool2d(-u, 3, 2, 1)),
             "max dilated ceil": (lambda u: F.max_pool2d(u, 2, 2, 0, 2, True), lambda u: TF.max_pool2d(u, 2, 2, 0, 2, True))}

    def results(m, dt, dev, k):
        xs, vs = x.to(dev, dt), v.to(dev, dt)
        scalar = lambda u: m(u[None])[0, 0]  # noqa: E731
        r = {"jvp": jvp(m, (xs,), (vs,))[1], "vmap jacrev": vmap(jacrev(scalar))(xs[:2]),
             "vmap hessian": vmap(hessian(scalar))(xs[:2])}
        for grad in (True, False):
            with fwad.dual_level(), torch.set_grad_enabled(grad):
                r[f"dual grad={grad}"] = fwad.unpack_dual(m(fwad.make_dual(xs, vs))).tangent
        if nd == 2 and not light:
            xc = xl.to(dev, dt).to(memory_format=torch.channels_last)
            for name, fs in forms.items():
                f = fs[k]
                r[f"{name} jvp"] = jvp(f, (xc,), (torch.ones_like(xc),))[1]
                r[f"{name} vmap hessian"] = vmap(hessian(lambda u: f(u[None]).tanh().sum()))(xc)
        return r

    with gpu_nn.backend(backend):
        got = results(ours, dtype, device, 0)
    assert loops == [], loops
    want = results(theirs, torch.float64, "cpu", 1)
    _same_as_torch(got, want, backend)


def _ce_composed(x, target, weight, reduction, smoothing, ignore_index=-100):
    """torch's cross_entropy written out in torch's own differentiable ops (log_softmax, gather,
    sums): the derivative in every argument, the class weights included, which torch's
    nll_loss lacks (forward mode drops its weight tangent, reverse mode refuses it)."""
    cdim = 0 if x.dim() == 1 else 1
    C = x.shape[cdim]
    logp = torch.log_softmax(x, cdim)
    wshape = [1] * x.dim()
    wshape[cdim] = C
    wlogp = logp * weight.reshape(wshape)
    if target.is_floating_point():
        rows = -(wlogp * (target * (1 - smoothing) + smoothing / C)).sum(cdim)
        return rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.sum() / (x.numel() // C)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    wt = weight[t] * valid
    loss = (1 - smoothing) * -logp.gather(cdim, t.unsqueeze(cdim)).squeeze(cdim) * wt - \
        smoothing / C * wlogp.sum(cdim) * valid
    return loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.sum() / wt.sum()


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_forward_mode_through_cross_entropy(backend, device):
    """cross_entropy under forward-mode AD (its rule: the backward's inner product with the
    tangent; its backward's: the tangent of g, the double backward's recomputation for x and the
    target, the weights' term): jvp in the logits and in probability targets, a dual tensor,
    hessian (forward over reverse), a Hessian-vector product jvp(grad(loss)) in logits and targets,
    jacrev(jacfwd) (reverse over forward) and reverse mode through a dual tensor's tangent, for
    class and probability targets, each reduction, weights, label smoothing, ignored rows, 1-d,
    2-d and k-dim logits: torch's values. A tangent of the class weights: the derivative of
    torch's loss written out in torch's ops (torch's own drops the nll term's, its nll_loss having
    no weight derivative). 'mean' with every target ignored: NaN tangents, as torch's."""
    import itertools

    import torch.autograd.forward_ad as fwad
    from torch.func import grad, hessian, jacfwd, jacrev, jvp

    dtype = torch.float64 if backend == "reference" else torch.float32
    interp = backend == "triton" and device == "cpu"
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=D64, generator=gen)  # noqa: E731
    grid = itertools.product([False, True], ["mean", "sum", "none"], [False, True], [0.0, 0.2], [(4, 5), (5,), (3, 5, 2)])
    if interp:  # the interpreter runs a row kernel in seconds: the rules are the backends' common code
        grid = [(False, "mean", True, 0.2, (4, 5)), (True, "none", True, 0.0, (3, 5, 2))]
    for prob, reduction, weighted, smoothing, shape in grid:
        cdim = 0 if len(shape) == 1 else 1
        C = shape[cdim]
        x, tx, tt = r(*shape), r(*shape), r(*shape)
        if prob:
            target = torch.softmax(r(*shape), cdim)
        else:
            target = torch.randint(0, C, shape[:cdim] + shape[cdim + 1:], generator=gen)
            if len(shape) == 2:
                target[1] = -100  # an ignored row
        weight, tw = (torch.rand(C, dtype=D64, generator=gen), r(C)) if weighted else (None, None)
        what = f"prob={prob} {reduction} weighted={weighted} smoothing={smoothing} {shape}"

        def results(f, dt, dev):
            cast = lambda u: None if u is None else u.to(dev, dt if u.is_floating_point() else u.dtype)  # noqa: E731
            xs, txs, tts, ts, ws, tws = map(cast, (x, tx, tt, target, weight, tw))
            kw = dict(weight=ws, reduction=reduction, label_smoothing=smoothing)
            s = lambda u: f(u, ts, **kw).sum()  # noqa: E731
            out = {"jvp": jvp(lambda u: f(u, ts, **kw), (xs,), (txs,))[1], "hessian": hessian(s)(xs),
                   "hvp": jvp(grad(s), (xs,), (txs,))[1], "jacrev(jacfwd)": jacrev(jacfwd(s))(xs)}
            with fwad.dual_level():
                out["dual"] = fwad.unpack_dual(f(fwad.make_dual(xs, txs), ts, **kw)).tangent
            if prob:
                out["jvp target"] = jvp(lambda v: f(xs, v, **kw), (ts,), (tts,))[1]
                out["hvp in (x, target)"] = jvp(grad(lambda u, v: f(u, v, **kw).sum(), argnums=(0, 1)), (xs, ts),
                                                (txs, tts))[1]
            # reverse over forward: torch's own fails there (its forward-mode formula's saved exp
            # is modified in place), so torch.func's jvp under grad stands for it
            if f is F.cross_entropy:
                xr = xs.clone().requires_grad_()
                with fwad.dual_level():
                    tan = fwad.unpack_dual(f(fwad.make_dual(xr, txs), ts, **kw)).tangent
                    out["grad of the tangent"] = torch.autograd.grad(tan.pow(2).sum(), xr)[0]
            else:
                out["grad of the tangent"] = grad(lambda u: jvp(lambda a: f(a, ts, **kw), (u,), (txs,))[1]
                                                  .pow(2).sum())(xs)
            if weighted:
                fw = (lambda w: f(xs, ts, weight=w, reduction=reduction, label_smoothing=smoothing)) \
                    if f is F.cross_entropy else (lambda w: _ce_composed(xs, ts, w, reduction, smoothing))
                out["jvp weights"] = jvp(fw, (ws,), (tws,))[1]
                fx = (lambda u, w: F.cross_entropy(u, ts, weight=w, reduction=reduction, label_smoothing=smoothing)) \
                    if f is F.cross_entropy else (lambda u, w: _ce_composed(u, ts, w, reduction, smoothing))
                out["hvp in the weights"] = jvp(lambda w: grad(lambda u: fx(u, w).sum())(xs), (ws,), (tws,))[1]
            return out

        with gpu_nn.backend(backend):
            got = results(F.cross_entropy, dtype, device)
        want = results(TF.cross_entropy, D64, "cpu")
        assert set(got) == set(want), what
        for k in want:
            pairs = zip(got[k], want[k]) if isinstance(want[k], tuple) else [(got[k], want[k])]
            for a, b in pairs:
                if backend == "reference":
                    torch.testing.assert_close(a, b, msg=f"{what}: {k}")
                else:
                    assert_close(a, b, torch.float32, k=16, what=f"{what}: {k}")
    # 'mean' over no target at all: NaN, and NaN tangents, as torch's; its Hessian-vector
    # product 0 as torch's, with class weights too (their zero tangent over a zero denominator
    # was NaN: a fuzz's find); an empty batch of probability targets: a zero weight tangent
    x, tx = r(3, 4).to(device, dtype), r(3, 4).to(device, dtype)
    none, w = torch.full((3,), -100, device=device), torch.rand(4, generator=gen).to(device, dtype)
    p0, e0, w0 = torch.zeros(0, 4, dtype=dtype, device=device), torch.zeros(0, 4, dtype=dtype, device=device), w
    got, want = {}, {}
    for out, f in ((got, F.cross_entropy), (want, TF.cross_entropy)):
        with gpu_nn.backend(backend) if f is F.cross_entropy else torch.enable_grad():
            out["jvp"] = jvp(lambda u: f(u, none), (x,), (tx,))
            for smoothing in (0.0, 0.1):
                out[f"hvp weighted {smoothing}"] = jvp(grad(lambda u: f(u, none, weight=w, label_smoothing=smoothing)),
                                                       (x,), (tx,))[1]
            out["empty batch weight tangent"] = jvp(lambda v: f(e0, p0, weight=v), (w0,), (torch.ones_like(w0),))
    for k in want:
        torch.testing.assert_close(got[k], want[k], equal_nan=True, msg=k)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_vmap_folds_cross_entropy_and_per_sample_gradients(backend, device, monkeypatch):
    """vmap of cross_entropy and its backward runs the batch as one call (reduction 'none' over
    every element's rows, each element's reduction and denominator after it, the statistics laid
    out as each element's own call lays them), and per-sample gradients of a classifier
    (torch.func's vmap(grad(...)), what differentially private training takes: linear's weight
    and bias gradients per element one row each, a fused activation too) need no loop over the
    batch (benchmarks/results/cpu/func_5b51e46.json, func_a127006.json: a 784-128-10 MLP's 64
    per-sample gradients took 36 ms looped, 8.0 ms folded on the CPU machine). Per-element losses, gradients in the input and in probability targets,
    jacobians of 'none' losses, the input or the target alone batched, for class and probability
    targets, every reduction, weights, smoothing, an element with every target ignored, 1-d, 2-d
    and k-dim elements: torch's values element by element (torch's own vmap refuses some of them:
    masked_select, an in-place op on a batched target)."""
    import itertools

    from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

    loops = count_loops(monkeypatch)
    dtype = torch.float64 if backend == "reference" else torch.float32
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=gen).to(device)  # noqa: E731

    def same(a, b, what):
        if backend == "reference":  # (float64 throughout: a float32 step, as a fold's division once, shows)
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13, equal_nan=True, msg=what)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True, msg=what)

    grid = itertools.product([False, True], ["mean", "sum", "none"], [False, True], [0.0, 0.2], [(5,), (3, 5), (2, 5, 3)])
    if backend == "triton" and device == "cpu":  # the interpreter: a few (the folds are the backends' common code)
        grid = [(False, "mean", True, 0.2, (3, 5)), (True, "sum", True, 0.0, (2, 5, 3)), (False, "none", False, 0.0, (5,))]
    for i, (prob, reduction, weighted, smoothing, shape) in enumerate(grid):
        B, cdim = 4 if i % 5 else 1, 0 if len(shape) == 1 else 1  # (a batch of one element too: a fuzz's find)
        C = shape[cdim]
        x = r(B, *shape)
        if prob:
            t = torch.softmax(r(B, *shape), cdim + 1)
        else:
            t = torch.randint(0, C, (B, *shape[:cdim], *shape[cdim + 1:]), generator=gen).to(device)
            if len(shape) == 2 and B == 4:
                t[1, 0] = -100
                t[2, :] = -100  # an element whose every target is ignored ('mean': NaN)
                t[3, :] = 0  # and one whose targets weigh 0 (with smoothing, 'mean': NaN, not inf)
        kw = dict(weight=torch.rand(C, dtype=dtype, generator=gen).to(device) if weighted else None,
                  reduction=reduction, label_smoothing=smoothing)
        if weighted:
            kw["weight"][0] = 0
        what = f"prob={prob} {reduction} weighted={weighted} smoothing={smoothing} {shape}"
        with gpu_nn.backend(backend):
            f = F.cross_entropy
            got = [vmap(lambda a, b: f(a, b, **kw))(x, t), vmap(grad(lambda a, b: f(a, b, **kw).sum()))(x, t),
                   vmap(lambda a: f(a, t[0], **kw))(x), vmap(jacrev(lambda a, b: f(a, b, **kw)))(x, t),
                   vmap(grad(lambda a, b: f(a, b, **kw).sum(), argnums=1))(x, t) if prob else
                   vmap(lambda b: f(x[0], b, **kw))(t)]
        f, S = TF.cross_entropy, torch.stack
        want = [S([f(a, b, **kw) for a, b in zip(x, t)]), S([grad(lambda a: f(a, b, **kw).sum())(a) for a, b in zip(x, t)]),
                S([f(a, t[0], **kw) for a in x]), S([jacrev(lambda a: f(a, b, **kw))(a) for a, b in zip(x, t)]),
                S([grad(lambda v: f(a, v, **kw).sum())(b) for a, b in zip(x, t)]) if prob else
                S([f(x[0], b, **kw) for b in t])]
        for i, (a, b) in enumerate(zip(got, want)):
            same(a, b, f"{what} #{i}")
    assert loops == [], loops

    torch.manual_seed(0)
    ours = gnn.Sequential(gnn.Linear(6, 8), gnn.Tanh(), gnn.Linear(8, 4)).to(device, dtype)
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(device, dtype)
    theirs.load_state_dict(ours.state_dict())
    x, t = r(5, 6), torch.randint(0, 4, (5,), generator=gen).to(device)
    w, b = r(4, 6), r(4)
    res = []
    for m, f, lin in ((ours, F.cross_entropy, lambda a, W, c: F.linear(a, W, c, activation="tanh")),
                      (theirs, TF.cross_entropy, lambda a, W, c: torch.tanh(TF.linear(a, W, c)))):
        p = {k: v.detach() for k, v in m.named_parameters()}
        with gpu_nn.backend(backend):
            res.append({**vmap(grad(lambda p, a, c: f(functional_call(m, p, (a[None],)), c[None])),
                               in_dims=(None, 0, 0))(p, x, t),
                        **{f"1-d {k}": v for k, v in vmap(grad(lambda p, a, c: f(functional_call(m, p, (a,)), c)),
                                                          in_dims=(None, 0, 0))(p, x, t).items()},
                        "fused": vmap(grad(lambda W, c, a: lin(a[None], W, c).pow(2).sum(), argnums=(0, 1)),
                                      in_dims=(None, None, 0))(w, b, x)})
    for k in res[1]:
        for a, e in (zip(res[0][k], res[1][k]) if k == "fused" else [(res[0][k], res[1][k])]):
            same(a, e, f"per-sample {k}")
    assert loops == [], loops
    # an element whose every target is ignored, second derivatives: 0 as torch's (the fold's
    # division by its zero denominator sent inf into them: NaN; a fuzz's find)
    x, t = r(2, 2, 3), torch.tensor([[0, 1], [-100, -100]], device=device)
    tx = r(2, 2, 3)
    with gpu_nn.backend(backend):
        got = [vmap(hessian(F.cross_entropy))(x, t),
               jvp(grad(lambda a: vmap(F.cross_entropy)(a, t).sum()), (x,), (tx,))[1],
               jacrev(jacrev(lambda a: F.cross_entropy(a, t[1])))(x[1])]
    want = [torch.stack([hessian(lambda a: TF.cross_entropy(a, b))(a) for a, b in zip(x, t)]),
            jvp(grad(lambda a: sum(TF.cross_entropy(a[i], t[i]) for i in range(2))), (x,), (tx,))[1],
            jacrev(jacrev(lambda a: TF.cross_entropy(a, t[1])))(x[1])]
    for i, (a, b) in enumerate(zip(got, want)):
        same(a, b, f"every target ignored #{i}")
    if backend == "reference":
        # float16 elements of 90,000 rows each: the folds sum the rows' losses and the weights in
        # float32, as the kernels do (a float16 sum overflowed: NaN losses, zero gradients; a
        # review's find); the interpreter would take minutes for these sizes, the folds being the
        # backends' common code
        x = torch.randn(2, 1, 3, 300, 300, generator=gen).half()
        t = torch.randint(0, 3, (2, 1, 300, 300), generator=gen)
        with gpu_nn.backend(backend):
            got = [vmap(F.cross_entropy)(x, t), vmap(grad(lambda a, b: F.cross_entropy(a, b).float()))(x, t)]
            want = [torch.stack([F.cross_entropy(a, b) for a, b in zip(x, t)]),
                    torch.stack([grad(lambda u: F.cross_entropy(u, b).float())(a) for a, b in zip(x, t)])]
        for a, e in zip(got, want):
            assert a.isfinite().all() and a.abs().sum() > 0
            torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_forward_mode_through_recurrent_layers(backend, device):
    """The recurrent layers and cells under forward-mode AD: their public functions run the
    steps as a composition of our linear and activation ops (each with its jvp rule) where a
    tangent is in play, the fused ops having no rule. jvp of the output and of h_n, jvp in the
    parameters, hessian (forward over reverse), jacrev(jacfwd), a Hessian-vector product in the
    parameters and a dual tensor, for a 2-layer bidirectional LSTM, a batch_first GRU, a 2-layer
    Elman RNN and a projected LSTM, and the three cells: torch's values (float64 on the
    reference; float32 on triton against torch's float64)."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp

    dtype = torch.float64 if backend == "reference" else torch.float32
    layers = [("LSTM", dict(num_layers=2, bidirectional=True)), ("GRU", dict(batch_first=True)),
              ("RNN", dict(num_layers=2)), ("LSTM", dict(proj_size=2, batch_first=True))]
    cells = ["LSTMCell", "GRUCell", "RNNCell"]
    if backend == "triton" and device == "cpu":  # the interpreter: one layer, one cell (the route is common code)
        layers, cells = layers[1:2], cells[:1]
    for kind, kw in layers:
        torch.manual_seed(0)
        ours, theirs = getattr(gnn, kind)(3, 4, **kw).to(device, dtype), getattr(torch.nn, kind)(3, 4, **kw).double()
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(2, 5, 3, dtype=torch.float64)
        t = torch.randn_like(x)

        def results(m, dt, dev):
            xs, ts = x.to(dev, dt), t.to(dev, dt)
            p = dict(m.named_parameters())
            tp = {k: torch.ones_like(v) for k, v in p.items()}
            last = (lambda o: o[1][0]) if kind == "LSTM" else (lambda o: o[1])  # noqa: E731
            scalar = lambda u: m(u)[0].pow(2).sum()  # noqa: E731
            r = {"jvp": jvp(lambda u: m(u)[0], (xs,), (ts,))[1], "jvp h_n": jvp(lambda u: last(m(u)), (xs,), (ts,))[1],
                 "jvp params": jvp(lambda q: functional_call(m, q, (xs,))[0], (p,), (tp,))[1],
                 "hessian": hessian(scalar)(xs), "jacrev(jacfwd)": jacrev(jacfwd(scalar))(xs)}
            hvp = jvp(lambda q: grad(lambda w: functional_call(m, w, (xs,))[0].pow(2).sum())(q), (p,), (tp,))[1]
            r.update({f"hvp params {k}": v for k, v in hvp.items()})
            with fwad.dual_level():
                r["dual"] = fwad.unpack_dual(m(fwad.make_dual(xs, ts))[0]).tangent
            return r

        with gpu_nn.backend(backend):
            got = results(ours, dtype, device)
        _same_as_torch(got, results(theirs, torch.float64, "cpu"), backend)
    # a packed batch (the modules unpack and pack again by indexing: torch's packing ops have no
    # forward formula; a review's and a fuzz's find) with dual data, state and parameters
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    torch.manual_seed(0)
    ours, theirs = gnn.LSTM(3, 4, num_layers=2, bidirectional=True).to(device, dtype), \
        torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    theirs.load_state_dict(ours.state_dict())
    packed = pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64), [5, 2, 4], enforce_sorted=False)
    td, h0, th = torch.randn_like(packed.data), torch.randn(4, 3, 4, dtype=torch.float64), torch.randn(4, 3, 4,
                                                                                                       dtype=torch.float64)
    tw = {k: torch.randn(p.shape, dtype=torch.float64) for k, p in theirs.named_parameters()}

    def packed_results(m, dt, dev):
        cast = lambda t: t.to(dev, dt)  # noqa: E731
        with fwad.dual_level():
            p = PackedSequence(fwad.make_dual(cast(packed.data), cast(td)), packed.batch_sizes, packed.sorted_indices,
                               packed.unsorted_indices)
            h = (fwad.make_dual(cast(h0), cast(th)), fwad.make_dual(cast(h0), cast(th)))
            out, (hn, cn) = m(p, h)
            r = {"packed dual": fwad.unpack_dual(out.data).tangent, "packed dual h_n": fwad.unpack_dual(hn).tangent}
            # dual parameters (torch.func.jvp of a packed batch fails in torch's own LSTM)
            q = {k: fwad.make_dual(v.detach(), cast(tw[k])) for k, v in m.named_parameters()}
            p = PackedSequence(cast(packed.data), packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
            r["packed dual params"] = fwad.unpack_dual(functional_call(m, q, (p,))[0].data).tangent
        return r

    with gpu_nn.backend(backend):
        got = packed_results(ours, dtype, device)
    _same_as_torch(got, packed_results(theirs, torch.float64, "cpu"), backend)
    for kind in cells:
        torch.manual_seed(0)
        ours, theirs = getattr(gnn, kind)(3, 4).to(device, dtype), getattr(torch.nn, kind)(3, 4).double()
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(2, 3, dtype=torch.float64)
        t = torch.randn_like(x)

        def results(m, dt, dev):
            xs, ts = x.to(dev, dt), t.to(dev, dt)
            f = (lambda u: m(u)[0]) if kind == "LSTMCell" else m  # noqa: E731
            r = {"jvp": jvp(f, (xs,), (ts,))[1], "hessian": hessian(lambda u: f(u).pow(2).sum())(xs)}
            with fwad.dual_level():
                r["dual"] = fwad.unpack_dual(f(fwad.make_dual(xs, ts))).tangent
                # vmap of a dual tensor (batched tensors hide their tangents from unpack_dual:
                # the composition runs under any dual level a transform sits in; a review's find)
                # (torch's own LSTMCell has no batching rule there: its rows one by one stand in)
                r["vmap of a dual"] = fwad.unpack_dual(torch.func.vmap(f)(fwad.make_dual(xs[:, None], ts[:, None])) if m is ours
                                                       else f(fwad.make_dual(xs, ts))[:, None]).tangent
            return r

        with gpu_nn.backend(backend):
            got = results(ours, dtype, device)
        _same_as_torch(got, results(theirs, torch.float64, "cpu"), backend)


def test_per_sample_conv_gradients_loop_where_the_grouped_launch_cannot(monkeypatch):
    """The per-sample fold runs B groups per group of the convolution; where the Triton kernels
    could not launch that many (grid y: 65,535 groups; lowered here to 5) it leaves the batch to
    the loop, with the same values (it raised the launch refusal before: a review's find)."""
    from torch.func import grad, vmap

    from gpu_nn.ops import conv

    loops = count_loops(monkeypatch)
    torch.manual_seed(0)
    w, b, x = torch.randn(4, 1, 3, 3, dtype=D64), torch.randn(4, dtype=D64), torch.randn(3, 1, 2, 5, 5, dtype=D64)

    def per_sample(conv2d):
        return vmap(grad(lambda W, c, u: conv2d(u, W, c, groups=2).pow(2).sum(), argnums=(0, 1)),
                    in_dims=(None, None, 0))(w, b, x)

    want = per_sample(TF.conv2d)
    with gpu_nn.backend("reference"):
        torch.testing.assert_close(per_sample(F.conv2d), want)
        assert loops == []
        monkeypatch.setattr(conv, "GRID_YZ_MAX", 5)  # 3 elements x 2 groups: past it
        torch.testing.assert_close(per_sample(F.conv2d), want)
    assert loops == [3]


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_vmap_folds_ensembles_of_linear_and_convolution(backend, device, monkeypatch):
    """vmap over stacked weights (model ensembling: torch.func's ``stack_module_state``, B models
    run and trained as one) calls linear and convolution once for the B models, forward and
    backward: a shared input against the B weights stacked as one layer's (a linear's rows, a
    convolution's output channels), a batched one through one grouped convolution (linear as a
    kernel-size-1 conv1d of B groups). Forward, the gradients in the weights (a shared input's
    with no input gradient: the stacked layer's own backward), in the input too, in the input
    alone (frozen weights: linear's stand-in input), and a vmap(jacrev): torch's values, on
    shared and batched inputs, 1-d / 2-d / 3-d linear inputs, batched / shared / no bias, fused
    activations, groups, stride, padding and dilation; an ensemble of MLPs and of CNNs trained
    through vmap(grad(loss)) as torch's; no loop over the models."""
    from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

    loops = count_loops(monkeypatch)
    light = backend == "triton" and device == "cpu"  # the interpreter: a few (the folds are common code)
    dtype = torch.float64 if backend == "reference" else torch.float32
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    B = 3
    got, want = {}, {}

    def both(name, make):
        """make(lib, linear, conv1d, conv2d, to) -> a tensor or a tuple of them, ours and torch's."""
        with gpu_nn.backend(backend):
            got[name] = make(True, lambda t: t.to(device, dtype))
        want[name] = make(False, lambda t: t)

    def linear(ours, act):
        if not ours:
            return lambda x, w, b: getattr(torch, act)(TF.linear(x, w, b)) if act else TF.linear(x, w, b)
        return lambda x, w, b: F.linear(x, w, b, activation=act)

    def conv(ours, nd, act):
        f = getattr(F if ours else TF, f"conv{nd}d")
        if ours:
            return lambda x, w, b, **k: f(x, w, b, activation=act, **k)
        return lambda x, w, b, **k: getattr(torch, act)(f(x, w, b, **k)) if act else f(x, w, b, **k)

    K, O = 5, 4
    lin_cases = [((7, K), None, True, None), ((2, 3, K), 0, True, "tanh"), ((K,), 0, False, "relu"), ((6, K), 0, "shared", None),
                 ((K,), None, None, "sigmoid")]
    for xshape, dx, bias, act in lin_cases[:2] if light else lin_cases:
        x = r(*(((B,) if dx is not None else ()) + xshape))
        w, b = r(B, O, K), (r(B, O) if bias is True else r(O) if bias == "shared" else None)
        db = 0 if bias is True else None
        name = f"linear x{xshape} dx={dx} bias={bias} {act}"
        lin_args = (x, w, b)

        def make(ours, to, lin_args=lin_args, dx=dx, db=db, act=act):
            f = linear(ours, act)
            x, w, b = (None if t is None else to(t) for t in lin_args)
            loss = lambda x, w, b: f(x, w, b).pow(2).sum()  # noqa: E731
            out = [vmap(f, in_dims=(dx, 0, db))(x, w, b),
                   *vmap(grad(loss, argnums=(1,) if b is None else (1, 2)), in_dims=(dx, 0, db))(x, w, b),
                   vmap(grad(loss, argnums=0), in_dims=(dx, 0, db))(x, w, b)]
            if dx is not None:
                out += vmap(grad(loss, argnums=(0, 1)), in_dims=(dx, 0, db))(x, w, b)
            return out

        both(name, make)
    if not light:
        # the weights batched along their second dim, the input along its last
        x, w, b = r(6, K, B), r(O, B, K), r(O, B)
        both("linear batch dims elsewhere", lambda ours, to: vmap(grad(
            lambda x, w, b: linear(ours, "tanh")(x, w, b).pow(2).sum(), argnums=(0, 1, 2)), in_dims=(2, 1, 1))(
            to(x), to(w), to(b)))
        x, w, b = r(B, 4, K), r(B, O, K), r(B, O)
        both("linear vmap jacrev", lambda ours, to: vmap(jacrev(linear(ours, "tanh"), argnums=(0, 1)))(
            to(x), to(w), to(b)))
    conv_cases = [(2, False, 1, dict(padding=1), "tanh"), (2, True, 2, dict(stride=2, padding=1), None),
                  (1, True, 1, dict(dilation=2), "relu"), (2, False, 2, dict(stride=(2, 1)), None),
                  (1, False, 1, dict(padding=2), None)]
    for nd, batched, groups, geo, act in conv_cases[:2] if light else conv_cases:
        C = 4
        x = r(*(((B,) if batched else ()) + (2, C) + (7,) * nd))
        w, b = r(B, 6, C // groups, *(3,) * nd), r(B, 6)
        name = f"conv{nd}d batched={batched} groups={groups} {geo} {act}"
        dx = 0 if batched else None

        def make(ours, to, x=x, w=w, b=b, nd=nd, dx=dx, groups=groups, geo=geo, act=act):
            f = conv(ours, nd, act)
            x, w, b = to(x), to(w), to(b)
            g = lambda x, w, b: f(x, w, b, groups=groups, **geo)  # noqa: E731
            loss = lambda x, w, b: g(x, w, b).pow(2).sum()  # noqa: E731
            return [vmap(g, in_dims=(dx, 0, 0))(x, w, b), vmap(g, in_dims=(dx, 0, None))(x, w, b[0]),
                    *vmap(grad(loss, argnums=(1, 2)), in_dims=(dx, 0, 0))(x, w, b),
                    *vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(dx, 0, 0))(x, w, b),
                    vmap(grad(loss, argnums=0), in_dims=(dx, 0, 0))(x, w, b)]

        both(name, make)

    def trained(lib, to, cnn, x):
        torch.manual_seed(1)
        if cnn:
            models = [lib.Sequential(lib.Conv2d(1, 4, 3, padding=1), lib.ReLU(), lib.MaxPool2d(2), lib.Flatten(),
                                     lib.Linear(4 * 9, 3)) for _ in range(B)]
        else:
            models = [lib.Sequential(lib.Linear(8, 16), lib.Tanh(), lib.Linear(16, 3)) for _ in range(B)]
        params, buffers = stack_module_state([to(m.double()) for m in models])
        base = copy.deepcopy(models[0]).to("meta")
        ce = F.cross_entropy if lib is gnn else TF.cross_entropy
        t = torch.tensor([0, 2, 1, 1, 0], device=next(iter(params.values())).device)

        def loss(p, bufs, a):
            return ce(functional_call(base, (p, bufs), (a,)), t)

        same_batch = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, to(x))
        own_batches = vmap(grad(loss), in_dims=(0, 0, 0))(params, buffers, to(torch.stack([x * (i + 1) for i in range(B)])))
        return [same_batch[k] for k in sorted(same_batch)] + [own_batches[k] for k in sorted(own_batches)]

    from gpu_nn.ops import conv as conv_ops
    from gpu_nn.ops import dense as dense_ops

    # which folds an ensemble's step took: on one minibatch the first layer's stacked backward
    # (the input read once; the forward kept a stand-in of its weight, which needs no gradient
    # of its input: unbatched, it read as per-sample weight gradients before, a review's find),
    # on a minibatch per model the per-sample one there
    ran = []
    for mod, name in ((dense_ops, "_stacked_linear_backward"), (conv_ops, "_stacked_backward")):
        monkeypatch.setattr(mod, name, lambda *a, _f=getattr(mod, name), _n=name, **k: (ran.append(_n), _f(*a, **k))[1])
    for cnn in ((False,) if light else (False, True)):
        x = r(5, 1, 6, 6) if cnn else r(5, 8)
        ran.clear()
        with gpu_nn.backend(backend):
            got[f"ensemble cnn={cnn}"] = trained(gnn, lambda t: t.to(device, dtype), cnn, x)
        assert ran == ["_stacked_backward" if cnn else "_stacked_linear_backward"], ran
        want[f"ensemble cnn={cnn}"] = trained(torch.nn, lambda t: t, cnn, x)
    assert loops == [], loops
    for name in want:
        g, e = got[name], want[name]
        g, e = (list(g), list(e)) if isinstance(e, (list, tuple)) else ([g], [e])
        assert len(g) == len(e), name
        for i, (a, b) in enumerate(zip(g, e)):
            if backend == "reference":
                torch.testing.assert_close(a, b, msg=f"{name} #{i}")
            else:
                assert_close(a, b, torch.float32, k=16, what=f"{name} #{i}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_recurrent_ensembles_fold_when_composed(mode, monkeypatch):
    """An ensemble of recurrent layers (stacked weights under vmap) loops over its models, one
    fused call each, forward and backward; with GPU_NN_RNN_VMAP_COMPOSE=1 the steps run as our linear and activation
    ops, whose folds take the stacked weights (the ensemble folds): no loop. Both give torch's
    gradients, model by model (torch's recurrent layers have no vmap rule: a loop of torch's)."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    loops = count_loops(monkeypatch)
    torch.manual_seed(0)
    B = 3
    ours = [getattr(gnn, mode)(4, 6, num_layers=2, bidirectional=True).double() for _ in range(B)]
    theirs = [getattr(torch.nn, mode)(4, 6, num_layers=2, bidirectional=True).double() for _ in range(B)]
    for o, t in zip(ours, theirs):
        t.load_state_dict(o.state_dict())
    x = torch.randn(5, 2, 4, dtype=D64)
    params, buffers = stack_module_state(ours)
    base = copy.deepcopy(ours[0]).to("meta")
    want = [grad(lambda p: functional_call(t, p, (x,))[0].pow(2).sum())({k: v.detach() for k, v in t.named_parameters()})
            for t in theirs]
    for compose, looped in (("0", [B, B]), ("1", [])):
        monkeypatch.setenv("GPU_NN_RNN_VMAP_COMPOSE", compose)
        loops.clear()
        with gpu_nn.backend("reference"):
            got = vmap(grad(lambda p, b, a: functional_call(base, (p, b), (a,))[0].pow(2).sum()),
                       in_dims=(0, 0, None))(params, buffers, x)
        assert loops == looped, (compose, loops)
        for i in range(B):
            torch.testing.assert_close({k: v[i] for k, v in got.items()}, want[i], msg=f"compose={compose} model {i}")


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_forward_mode_through_a_recurrent_backward(mode):
    """Forward-mode AD reaching a recurrent layer's backward whose forward ran fused (the jvp of a
    vjp pullback: Gauss-Newton products; a dual cotangent with create_graph=True): the backward
    recomputes through our ops, which have forward rules, where the fused backward's
    differentiable wrapper has none (it raised there: a review's find). torch's values."""
    import torch.autograd.forward_ad as fwad
    from torch.func import jvp, vjp

    torch.manual_seed(0)
    theirs = getattr(torch.nn, mode)(2, 3, num_layers=2, bidirectional=True).double()
    ours = getattr(gnn, mode)(2, 3, num_layers=2, bidirectional=True).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 1, 2, dtype=D64)
    v, dv = torch.randn(4, 1, 6, dtype=D64), torch.randn(4, 1, 6, dtype=D64)

    def ggn(m):
        _, pull = vjp(lambda u: m(u)[0], x)
        return jvp(lambda c: pull(c)[0], (v,), (dv,))[1]

    def dual(m):
        xr = x.clone().requires_grad_()
        with fwad.dual_level():
            (g,) = torch.autograd.grad(m(xr)[0], xr, fwad.make_dual(v, dv), create_graph=True)
            return fwad.unpack_dual(g).tangent

    with gpu_nn.backend("reference"):
        got = [ggn(ours), dual(ours)]
    torch.testing.assert_close(got, [ggn(theirs), dual(theirs)])


def test_ensemble_folds_loop_where_the_grouped_launch_cannot(monkeypatch):
    """The ensemble folds' grouped convolution (a batched input) runs B groups per group; where
    the Triton kernels could not launch that many (grid y: lowered here to 2) they leave the
    models to the loop, with the same values; a shared input through one group still folds."""
    from torch.func import grad, vmap

    from gpu_nn.ops import conv

    loops = count_loops(monkeypatch)
    torch.manual_seed(0)
    w, b, x = torch.randn(3, 4, 5, dtype=D64), torch.randn(3, 4, dtype=D64), torch.randn(3, 6, 5, dtype=D64)
    # (1x2 taps: within the lowered limit, which the weight gradient's taps must also keep)
    wc, xc = torch.randn(3, 4, 2, 1, 2, dtype=D64), torch.randn(3, 1, 2, 5, 5, dtype=D64)

    def run(linear, conv2d):
        return [vmap(grad(lambda u, W, c: linear(u, W, c).pow(2).sum(), argnums=(0, 1, 2)))(x, w, b),
                vmap(grad(lambda u, W, c: conv2d(u, W, c).pow(2).sum(), argnums=(0, 1, 2)))(xc, wc, b),
                vmap(grad(lambda W, c: conv2d(xc[0], W, c).pow(2).sum(), argnums=(0, 1)))(wc, b)]

    want = run(TF.linear, TF.conv2d)
    with gpu_nn.backend("reference"):
        torch.testing.assert_close(run(F.linear, F.conv2d), want)
        assert loops == []
        monkeypatch.setattr(conv, "GRID_YZ_MAX", 2)  # 3 models: past it
        torch.testing.assert_close(run(F.linear, F.conv2d), want)
    assert loops == [3, 3, 3, 3], loops  # each grouped forward and backward; the shared input's folded
    # no output features: the loop too (the grouped convolution would have no channel per group;
    # a review's find: it raised KernelInputError where the loop gives torch's empty results)
    loops.clear()
    w0, b0 = torch.randn(3, 0, 5, dtype=D64), torch.randn(3, 0, dtype=D64)
    f0 = lambda linear: vmap(grad(lambda u, W, c: linear(u, W, c).sum(), argnums=(0, 1, 2)))(x, w0, b0)  # noqa: E731
    with gpu_nn.backend("reference"):
        got = [vmap(F.linear)(x, w0, b0), *f0(F.linear)]
    torch.testing.assert_close(got, [vmap(TF.linear)(x, w0, b0), *f0(TF.linear)])
    assert loops == [3, 3, 3], loops  # the forward; the forward and backward under grad


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_ensemble_folds_take_matmul_precision_for_linear(backend, device, monkeypatch):
    """Linear layers computed as a grouped convolution (an ensemble on batched inputs, forward and
    backward) decide their float32 products' TF32 by matmul's setting, not the convolutions'
    (torch's defaults differ: cuDNN convolutions may use TF32, cuBLAS matmuls not); a
    convolution's own calls keep the convolutions' setting, outside the block too."""
    from torch.func import grad, vmap

    from gpu_nn.ops import conv

    asked = []
    monkeypatch.setattr(conv, "_tf32", lambda op: asked.append(op) or False)
    x, w = torch.randn(2, 3, 4, device=device), torch.randn(2, 5, 4, device=device)
    xc, wc = torch.randn(2, 1, 2, 5, 5, device=device), torch.randn(2, 3, 2, 3, 3, device=device)
    linear_cases = {
        "vmap(grad)": lambda: vmap(grad(lambda u, W: F.linear(u, W).sum(), argnums=(0, 1)))(x, w),
        # the grouped convolution's backward recorded by autograd outside the vmap rule: eager
        # backward of a vmapped ensemble whose stacked weights require grad, grad of vmap
        "backward of vmap": lambda: vmap(F.linear)(x, w.clone().requires_grad_()).sum().backward(),
        "grad of vmap": lambda: grad(lambda W: vmap(F.linear)(x, W).sum())(w),
        "double backward": lambda: torch.autograd.grad(
            torch.autograd.grad(vmap(F.linear)(x.clone().requires_grad_(), wr := w.clone().requires_grad_()).pow(2).sum(),
                                wr, create_graph=True)[0].sum(), wr),
        # per-sample weight gradients of several rows per element (the grouped backward)
        "per-sample": lambda: vmap(grad(lambda W, u: F.linear(u, W).pow(2).sum()), in_dims=(None, 0))(w[0], x),
    }
    with gpu_nn.backend(backend):
        for name, run in linear_cases.items():
            asked.clear()
            run()
            assert asked and set(asked) == {"matmul"}, (name, asked)
        asked.clear()
        # a shared input: the stacked linear itself (cuBLAS's setting, read by linear: conv asks nothing)
        vmap(grad(lambda W: F.linear(x[0], W).pow(2).sum()))(w)
        assert asked == [], asked
        vmap(grad(lambda u, W: F.conv2d(u, W).sum(), argnums=(0, 1)))(xc, wc)
        xr = xc.clone().requires_grad_()
        F.conv2d(xr[0], wc[0]).sum().backward()
        assert asked and set(asked) == {"conv"}, asked


def test_compiled_forward_mode_gives_eager_tangents_or_raises():
    """torch.compile of a forward-mode transform: a traced custom op has no forward formula and
    gave zero tangents without a word (linear's jvp all zeros: a review's find); our ops now
    leave the compiler where a dual level is open under a transform, so jvp (also of grad: a
    Hessian-vector product) compiles to the eager tangents, and what still cannot be compiled
    (jacfwd, hessian: vmap over jvp) raises: no silent zero."""
    import warnings

    from torch.func import grad, hessian, jacfwd, jvp

    torch.manual_seed(0)
    w, x, v, t = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2])
    cell = gnn.LSTMCell(3, 4)
    fs = {"linear": lambda u: F.linear(u, w, None, activation="tanh"), "cross_entropy": lambda u: F.cross_entropy(u, t),
          "lstm_cell": lambda u: cell(u)[0]}
    loss = lambda u: F.cross_entropy(F.linear(u, w, None, activation="tanh"), t)  # noqa: E731
    with gpu_nn.backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, f in fs.items():
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(lambda u: jvp(f, (u,), (v,))[1])(x), jvp(f, (x,), (v,))[1],
                                       msg=name)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(lambda u: jvp(grad(loss), (u,), (v,))[1])(x),
                                   jvp(grad(loss), (x,), (v,))[1])
        for name, fn in (("jacfwd", jacfwd(fs["linear"])), ("hessian", hessian(loss))):
            torch._dynamo.reset()
            try:
                got = torch.compile(fn)(x)
            except Exception:  # noqa: BLE001 - torch's compiler refuses it: what is asked here
                continue
            torch.testing.assert_close(got, fn(x), msg=name)
