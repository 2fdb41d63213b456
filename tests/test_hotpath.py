"""The hot path (issue 14) and the thread-local backend (issue 19.10).

* The eager route (``gpu_nn.ops._dispatch.Routed``) gives the same values, gradients, errors
  and autograd graph shape as the custom op, for every op of ``gpu_nn check``, on every
  backend available here.
* ``gpu_nn.backend()`` is per thread; a backward runs on the backend its forward ran on, in
  whatever thread autograd runs it.
* Launch and copy counts per op fwd+bwd (Triton) are pinned: counted under the interpreter on a
  CPU, and as GPU events by torch.profiler on a GPU (benchmarks/kernel_counts.py's count).
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import pytest
import torch

import gpu_nn
import gpu_nn.functional as F
import gpu_nn.nn as gnn
from gpu_nn import _backend, check
from gpu_nn.ops import _dispatch
from gpu_nn.ops import pool as _pool
from helpers import backend_params

# every op of gpu-nn check with a custom op (flatten is a view, no op of ours)
CASES = [(fam, c) for fam, c in check.collect_cases() if c.fn is not None and c.op != "flatten"]
# an op with an integer output (max pooling's indices), whose comparison between the routes no
# check case exercises (an audit: the integer outputs compared were none)
CASES.append(("pool", check.CheckCase(op="max_pool2d", make=_pool._make((2, 3, 9, 7)),
                                      fn=_pool._bind(_pool.max_pool2d, 3, 2, 1, 1, False, True))))
BACKENDS = [b for b in ("reference", "triton") if _backend.status(b)[0]]
# where the tests run each backend: Triton takes CUDA tensors on a GPU machine, CPU tensors
# only under the interpreter
DEVICE = {"reference": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


# ----------------------------------------------------------------------------- eager route

def _graph_names(outs):
    """Names of the autograd nodes reachable from ``outs`` (to see which route built them)."""
    seen, names, todo = set(), set(), [o.grad_fn for o in outs if o.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad and torch.equal(
        torch.nan_to_num(a.detach(), nan=1.5), torch.nan_to_num(b.detach(), nan=1.5))


def _run(case, args, kwargs, dtype, device, eager, grad_mask, monkeypatch, second_order=True):
    """Outputs, gradients, graph node names and the outcome of a second backward (None without
    ``second_order``: the gradients then taken without create_graph)."""
    monkeypatch.setattr(_dispatch, "EAGER", eager)
    args, kwargs = check._convert((args, kwargs), dtype, device)
    leaves = check._leaves((args, kwargs))
    for leaf, keep in zip(leaves, grad_mask):
        leaf.requires_grad_(keep)
    leaves = [leaf for leaf in leaves if leaf.requires_grad]
    out = case.fn(*args, **kwargs)
    outs = check._float_outputs(out)
    ints = check._int_outputs(out)
    names = _graph_names(outs)
    gen = torch.Generator().manual_seed(0)
    diff = [(o, torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)) for o in outs if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in diff], leaves, [g for _, g in diff], allow_unused=True,
                                create_graph=second_order)
    # a second backward through the gradients: the same values, or the same error, on both routes
    second = None
    try:
        s = sum(g.sum() for g in grads if g is not None and g.requires_grad)
        if second_order:
            second = torch.autograd.grad(s, leaves, allow_unused=True) if isinstance(s, torch.Tensor) else ()
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        second = f"{type(exc).__name__}: {exc}"
    with torch.no_grad():
        nograd = check._float_outputs(case.fn(*args, **kwargs))
    return outs, ints, grads, names, second, nograd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fam,case", CASES, ids=[f"{f}-{c.op}-{i}" for i, (f, c) in enumerate(CASES)])
def test_eager_route_equals_custom_op(fam, case, backend, monkeypatch):
    if backend not in case.backends:
        pytest.skip(f"{case.op} has no {backend} backend")
    dtype = torch.float64 if backend == "reference" else torch.float32
    args, kwargs = case.make(np.random.default_rng(7))
    n = len(check._leaves((args, kwargs)))
    # all inputs needing grad, and only the first (needs_input_grad / output_mask paths). The
    # interpreter is slow, so triton under it checks the first mask only and no second backward
    # (two thirds of this test's time in the conv and rnn cases): the routes' second backwards
    # are compared on the reference, every case and mask, and triton's double backward against
    # torch in test_double_backward.py
    masks = [[True] * n] + ([[True] + [False] * (n - 1)] if backend == "reference" else [])
    second_order = not (backend == "triton" and DEVICE[backend] == "cpu")
    for mask in masks:
        with gpu_nn.backend(backend):
            ref = _run(case, args, kwargs, dtype, DEVICE[backend], False, mask, monkeypatch, second_order)
            got = _run(case, args, kwargs, dtype, DEVICE[backend], True, mask, monkeypatch, second_order)
        outs, ints, grads, names, second, nograd = got
        assert any(nm.startswith("GeneratedBackwardFor_gpu_nn") for nm in ref[3]), ref[3]
        assert not any(nm.startswith("GeneratedBackwardFor_gpu_nn") for nm in names), names
        assert any(nm.startswith("Eager_") for nm in names), names  # the eager route did run
        assert len(outs) == len(ref[0]) and all(_same(a, b) for a, b in zip(outs, ref[0]))
        assert len(ints) == len(ref[1]) and all(_same(a, b) for a, b in zip(ints, ref[1]))
        assert len(grads) == len(ref[2]) and all(_same(a, b) for a, b in zip(grads, ref[2]))
        assert all(_same(a, b) for a, b in zip(nograd, ref[5])) and not any(t.requires_grad for t in nograd)
        if second is None or isinstance(second, str) or isinstance(ref[4], str):
            assert second == ref[4]
        else:
            assert len(second) == len(ref[4]) and all(_same(a, b) for a, b in zip(second, ref[4]))


@pytest.mark.parametrize("fam,case", CASES, ids=[f"{f}-{c.op}-{i}" for i, (f, c) in enumerate(CASES)])
def test_meta_tensors_give_the_shapes_of_a_real_call(fam, case):
    """A model on device="meta" (shape inference, deferred initialisation): every op, forward and
    backward, gives on meta tensors the outputs and gradients a real call gives, in shape, dtype
    and strides (the eager route hands meta tensors to the custom op, whose fake kernel serves)."""
    args, kwargs = case.make(np.random.default_rng(7))
    results = []
    for device in ("cpu", "meta"):
        a, kw = check._convert((args, kwargs), torch.float64, device)
        if "lengths" in kw:  # a packed batch's lengths stay on the CPU, as torch's packing wants them
            kw["lengths"] = kwargs["lengths"]
        leaves = check._leaves((a, kw))
        with gpu_nn.backend("reference"):
            outs = check._float_outputs(case.fn(*a, **kw))
            diff = [o for o in outs if o.requires_grad]
            grads = torch.autograd.grad(diff, leaves, [torch.ones_like(o) for o in diff], allow_unused=True)
        results.append([(t.shape, t.dtype, t.stride()) if t is not None else None for t in (*outs, *grads)])
        assert all(t is None or t.device.type == device for t in (*outs, *grads))
    assert results[0] == results[1]


@pytest.mark.parametrize("fam,case", CASES, ids=[f"{f}-{c.op}-{i}" for i, (f, c) in enumerate(CASES)])
def test_forward_mode_ad_gives_the_reverse_mode_tangent(fam, case):
    """Every op's public function under forward-mode AD (its op's jvp rule; the recurrent layers'
    composition of our linear and activation ops, their fused ops having none) gives the tangent
    that reverse mode gives (the double-backward trick of torch.autograd.functional.jvp): a dual
    tensor (torch.autograd.forward_ad) and torch.func.jvp, on both routes, and jvp of vmap (the
    batch folded or looped under the jvp level); a tensor without a tangent inside a dual level
    runs as usual."""
    import torch.autograd.forward_ad as fwad

    args, kwargs = case.make(np.random.default_rng(7))
    args, kwargs = check._convert((args, kwargs), torch.float64, "cpu")
    pos = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())
    x = args[pos].detach()

    def call(t):
        return check._float_outputs(case.fn(*args[:pos], t, *args[pos + 1:], **kwargs))[0]

    t = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    with gpu_nn.backend("reference"):
        want = torch.autograd.functional.jvp(call, x, t)[1]
        plain = call(x)
        for eager in (True, False):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_dispatch, "EAGER", eager)
                with fwad.dual_level():
                    torch.testing.assert_close(fwad.unpack_dual(call(fwad.make_dual(x, t))).tangent, want)
                    out = call(x)
                    assert fwad.unpack_dual(out).tangent is None
                    torch.testing.assert_close(out, plain)
                torch.testing.assert_close(torch.func.jvp(call, (x,), (t,))[1], want)
        if fam in ("activation", "dense"):
            xs, ts = torch.stack([x, x]), torch.stack([t, -t])
            torch.testing.assert_close(torch.func.jvp(lambda u: torch.func.vmap(call)(u), (xs,), (ts,))[1],
                                       torch.stack([want, -want]))


def test_recurrent_ops_without_a_jvp_rule_refuse_tangents():
    """The fused recurrent ops have no forward-mode rule (their public functions run a
    composition instead): called directly with a dual tensor or under torch.func.jvp they raise
    NotImplementedError, as every op without one does, rather than give zero tangents; without
    a tangent inside a dual level they run."""
    import torch.autograd.forward_ad as fwad

    from gpu_nn.ops.rnn import _rnn_cell_op

    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    w_ih, w_hh = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)

    def cell(u):
        return _rnn_cell_op(u, h, None, w_ih, w_hh, None, None, "rnn_tanh")[0]

    with gpu_nn.backend("reference"):
        for eager in (True, False):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_dispatch, "EAGER", eager)
                with fwad.dual_level():
                    with pytest.raises(NotImplementedError, match="forward-mode AD"):
                        cell(fwad.make_dual(x, torch.ones_like(x)))
                    torch.testing.assert_close(cell(x), torch.tanh(x @ w_ih.T + h @ w_hh.T))
                with pytest.raises(NotImplementedError, match="forward-mode AD"):
                    torch.func.jvp(cell, (x,), (torch.ones_like(x),))


@pytest.mark.parametrize("fam,case", CASES, ids=[f"{f}-{c.op}-{i}" for i, (f, c) in enumerate(CASES)])
def test_torch_func_reverse_mode_transforms(fam, case):
    """torch.func.vjp (what grad and jacrev build on), vmap over its pullback (jacrev's way,
    per-cotangent) and vmap of the op itself give what autograd gives for every op (torch's
    custom ops refuse them all: their generated autograd.Function has no separate
    setup_context); the recurrent sequence ops too, their weight lists spread into the
    Function's own inputs."""
    rng = np.random.default_rng(11)
    args, kwargs = case.make(rng)
    args, kwargs = check._convert((args, kwargs), torch.float64, "cpu")
    pos = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())
    x = args[pos].detach()

    def call(t):
        return check._float_outputs(case.fn(*args[:pos], t, *args[pos + 1:], **kwargs))[0]

    with gpu_nn.backend("reference"):
        xr = x.clone().requires_grad_()
        y = call(xr)
        g = torch.from_numpy(rng.standard_normal(tuple(y.shape)))
        (want,) = torch.autograd.grad(y, xr, g, allow_unused=True)
        want = torch.zeros_like(x) if want is None else want
        out, pull = torch.func.vjp(call, x)
        torch.testing.assert_close(out, y.detach())
        torch.testing.assert_close(pull(g)[0], want)
        (both,) = torch.func.vmap(pull)(torch.stack([g, -2 * g]))
        torch.testing.assert_close(both, torch.stack([want, -2 * want]))
        if x.dim() >= 1 and x.shape[0] > 0:
            torch.testing.assert_close(torch.func.vmap(call)(torch.stack([x, 2 * x])), torch.stack([call(x), call(2 * x)]))


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_torch_func_through_sequence_layers(mode):
    """torch.func over our recurrent sequence layers, whose weights travel in a list (spread
    into the transforms' Function's own inputs): grad of a head past the layer, grad through its
    input, per-sample gradients of its weights (vmap of grad over functional_call: what a loop
    of autograd gives; torch's own layers fail there) and grad of grad (torch's value). These
    raised NotImplementedError, the head's case too."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    theirs = getattr(torch.nn, mode)(3, 4, num_layers=2).double()
    ours = getattr(gpu_nn.nn, mode)(3, 4, num_layers=2).double()
    ours.load_state_dict(theirs.state_dict())
    head = torch.nn.Linear(4, 2).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    hp = {k: v.detach() for k, v in head.named_parameters()}
    with gpu_nn.backend("reference"):
        for fn in (lambda m: grad(lambda p: functional_call(head, p, (m(x)[0],)).square().sum())(hp),
                   lambda m: grad(lambda x: m(x)[0].square().sum())(x),
                   lambda m: grad(lambda x: grad(lambda x: m(x)[0].square().sum())(x).sin().sum())(x)):
            want, got = fn(theirs), fn(ours)
            for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
                torch.testing.assert_close(a, b)
        params = {k: v.detach() for k, v in ours.named_parameters()}
        per = vmap(grad(lambda p, xi: functional_call(ours, p, (xi.unsqueeze(1),))[0].square().sum()),
                   in_dims=(None, 1))(params, x)
        for b in range(x.shape[1]):
            ours.zero_grad()
            ours(x[:, b:b + 1])[0].square().sum().backward()
            for k, v in ours.named_parameters():
                torch.testing.assert_close(per[k][b], v.grad)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
def test_per_sample_gradients_and_grad_of_grad(backend, device):
    """The torch.func patterns of per-sample gradients (vmap of grad with functional_call over a
    model of our layers) and of a second derivative (grad of grad) give torch's results."""
    torch.manual_seed(0)
    dt = torch.float64 if backend == "reference" else torch.float32

    def model(lib):
        return torch.nn.Sequential(lib.Conv2d(2, 3, 3), lib.ReLU(), lib.MaxPool2d(2), lib.Flatten(), lib.Linear(12, 4))

    ours, theirs = model(gpu_nn.nn).to(device, dt), model(torch.nn).to(device, dt)
    theirs.load_state_dict(ours.state_dict())
    x, t = torch.randn(5, 2, 6, 6, device=device, dtype=dt), torch.tensor([0, 3, 1, 2, 0], device=device)

    def per_sample(net, lossf):
        def loss(p, xi, ti):
            return lossf(torch.func.functional_call(net, p, (xi[None],)), ti[None])
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(dict(net.named_parameters()), x, t)

    with gpu_nn.backend(backend):
        got = per_sample(ours, gpu_nn.functional.cross_entropy)
        xs = x[0, 0].clone()
        hess_diag = torch.func.grad(lambda a: torch.func.grad(lambda b: gpu_nn.functional.tanh(b).sum())(a).sum())(xs)
    want = per_sample(theirs, torch.nn.functional.cross_entropy)
    tol = dict(rtol=1e-9, atol=1e-9) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for k in want:
        torch.testing.assert_close(got[k], want[k], **tol)
    torch.testing.assert_close(hess_diag, torch.func.grad(lambda a: torch.func.grad(lambda b: b.tanh().sum())(a).sum())(xs), **tol)


def test_torch_func_under_modes_and_tracers():
    """Under a torch.func transform the op still reaches dispatch modes and tracers (its
    autograd.Function runs the custom op, not its Python function): make_fx of vmap records the
    op, not the example's results as constants; fake tensors under vmap keep to shapes; a flop
    counter under grad counts the op. An empty vmap batch gives empty results."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.flop_counter import FlopCounterMode

    from gpu_nn.ops.rnn import lstm_cell

    w = torch.randn(4, 3, dtype=torch.float64)

    def f(x):
        return gpu_nn.functional.linear(x, w)

    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with gpu_nn.backend("reference"):
        g = make_fx(torch.func.vmap(f))(x)
        assert any(n.target is torch.ops.gpu_nn.linear.default for n in g.graph.nodes)
        x2 = torch.randn(5, 2, 3, dtype=torch.float64)
        torch.testing.assert_close(g(x2), x2 @ w.T)
        with FakeTensorMode() as mode:
            xf, wf = mode.from_tensor(x), mode.from_tensor(w)
            y = torch.func.vmap(lambda a: gpu_nn.functional.linear(a, wf))(xf)
        assert y.shape == (5, 2, 4) and type(y).__name__ == "FakeTensor"
        with FlopCounterMode(display=False) as fc:
            torch.func.grad(lambda a: f(a).sum())(x[0])
        with FlopCounterMode(display=False) as theirs:
            torch.func.grad(lambda a: torch.nn.functional.linear(a, w).sum())(x[0])
        assert fc.get_total_flops() == theirs.get_total_flops() == 2 * 2 * 2 * 3 * 4  # the forward and dx
        empty = torch.func.vmap(f)(torch.randn(0, 2, 3, dtype=torch.float64))
        assert empty.shape == (0, 2, 4) and empty.dtype == torch.float64
        x0 = torch.zeros(0, 2, 3, dtype=torch.float64, requires_grad=True)  # autograd reaches empty results too
        torch.func.vmap(f)(x0).sum().backward()
        assert x0.grad is not None and x0.grad.shape == x0.shape
        h, c = torch.func.vmap(lambda a: lstm_cell(
            a, (torch.zeros(2, 4, dtype=torch.float64),) * 2, *(p.double() for p in _CELL_W)))(
            torch.randn(0, 2, 3, dtype=torch.float64))
        assert h.shape == c.shape == (0, 2, 4)


_CELL_W = (torch.randn(16, 3), torch.randn(16, 4), torch.randn(16), torch.randn(16))


@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_vmap_over_recurrent_layers(mode):
    """vmap (without grad) over our nn.RNN / LSTM / GRU: the sequence op's batching rule runs it
    per element (torch's own layers have no batching rule); an empty batch gives empty results."""
    torch.manual_seed(2)
    ours = getattr(gpu_nn.nn, mode)(3, 4, num_layers=2, bidirectional=True).double()
    theirs = getattr(torch.nn, mode)(3, 4, num_layers=2, bidirectional=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    with gpu_nn.backend("reference"):
        y = torch.func.vmap(lambda a: ours(a)[0])(x)
        empty = torch.func.vmap(lambda a: ours(a)[0])(x[:0])
    torch.testing.assert_close(y, torch.stack([theirs(a)[0] for a in x]).detach())
    assert empty.shape == (0, 5, 2, 8)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("op", ["cross_entropy", "GRUCell", "LSTMCell", "RNNCell"])
def test_grad_of_grad_of_recomputed_double_backwards(backend, device, op):
    """torch.func.grad of grad through the ops whose double backward is recomputed
    (cross_entropy, the recurrent cells): a transformed function may not make leaves or call
    autograd.grad, which that recomputation did."""
    torch.manual_seed(1)
    dt = torch.float64 if backend == "reference" else torch.float32
    tol = dict(rtol=1e-9, atol=1e-9) if dt == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    if op == "cross_entropy":
        t = torch.tensor([2, 0, 1], device=device)
        ours = lambda a: F.cross_entropy(a, t, label_smoothing=0.1)  # noqa: E731
        theirs = lambda a: torch.nn.functional.cross_entropy(a, t, label_smoothing=0.1)  # noqa: E731
        x = torch.randn(3, 5, device=device, dtype=dt)
    else:
        m_t = getattr(torch.nn, op)(3, 4).to(device, dt)
        m_o = getattr(gpu_nn.nn, op)(3, 4).to(device, dt)
        m_o.load_state_dict(m_t.state_dict())
        first = (lambda r: r[0] if isinstance(r, tuple) else r)
        ours, theirs = (lambda a: first(m_o(a)).tanh().sum()), (lambda a: first(m_t(a)).tanh().sum())
        x = torch.randn(2, 3, device=device, dtype=dt)

    def gg(fn):
        return torch.func.grad(lambda a: torch.func.grad(fn)(a).pow(2).sum())(x)

    with gpu_nn.backend(backend):
        got = gg(ours)
    torch.testing.assert_close(got, gg(theirs), **tol)


def _bad_calls():
    from gpu_nn.ops import activation, conv, dense, pool

    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    return [
        lambda: activation._activation_op(torch.ones(3, dtype=torch.complex64), "relu"),
        lambda: activation._activation_op(x, "gelu"),
        lambda: conv._conv_forward_op(x, torch.randn(4, 2, 3, 3), None, [1, 1], [0, 0, 0, 0], [1, 1], 1, None),
        lambda: conv._conv_forward_op(x, torch.randn(4, 3, 7, 7), None, [1, 1], [0, 0, 0, 0], [1, 1], 1, None),
        lambda: dense._linear_op(torch.randn(2, 3, requires_grad=True), torch.randn(4, 5), None, None),
        lambda: pool._avg_pool_op(x, [3, 3], [2, 2], [1, 1], False, True, 0),
    ]


@pytest.mark.parametrize("i", range(6))
def test_eager_route_raises_the_custom_ops_errors(i, monkeypatch):
    got = []
    for eager in (False, True):
        monkeypatch.setattr(_dispatch, "EAGER", eager)
        with pytest.raises(Exception) as info:
            _bad_calls()[i]()
        got.append((type(info.value), str(info.value)))
    assert got[0] == got[1]
    assert isinstance(got[0][1], str) and got[0][1]


def test_modes_and_subclasses_take_the_custom_op():
    """Anything but plain eager tensors goes through the dispatcher (fake tensors, modes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Spy():
        F.relu(torch.randn(3))
    assert "gpu_nn.activation.default" in seen
    with FakeTensorMode():
        y = F.relu(torch.randn(3, 4))
    assert y.shape == (3, 4) and type(y).__name__ == "FakeTensor"


# ----------------------------------------------------------------------------- thread-local backend

needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs a second backend (triton) that runs here")


def test_backend_decorates_a_generator_function_as_torchs_no_grad():
    """gpu_nn.backend(...) as a decorator of a generator function: its body runs in the block at
    every resumption (send, throw, close included) and the caller's code between the yields
    outside it, as torch's no_grad() decorator; the generator's return value and a plain
    function keep working. ContextDecorator alone closed the block once the generator was made
    (an audit: the body saw 'auto')."""
    seen = []

    @gpu_nn.backend("reference")
    def gen():
        seen.append(_backend.requested())
        try:
            got = yield 1
            seen.append((_backend.requested(), got))
            yield 2
        except KeyError:
            seen.append(("thrown", _backend.requested()))
            yield 3
        finally:
            seen.append(("closed", _backend.requested()))
        return "done"

    @gpu_nn.backend("reference")
    def plain():
        return _backend.requested()

    g = gen()
    assert seen == [] and next(g) == 1 and _backend.requested() == "auto"
    assert g.send("x") == 2 and _backend.requested() == "auto"
    g.close()
    assert seen == ["reference", ("reference", "x"), ("closed", "reference")]
    seen.clear()
    g = gen()
    next(g)
    assert g.throw(KeyError("k")) == 3 and seen[-1] == ("thrown", "reference")

    def outer():
        result = yield from gen()
        return result

    seen.clear()
    assert list(outer()) == [1, 2] and seen[0] == "reference" and seen[-1] == ("closed", "reference")
    with pytest.raises(StopIteration) as stop:
        g = gen()
        next(g), next(g), next(g)
    assert stop.value.value == "done"
    assert plain() == "reference" and _backend.requested() == "auto"


@needs_triton
def test_backend_blocks_in_two_threads_do_not_mix():
    """A enters triton, B enters reference, A exits: B is still on reference (issue 19.10)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with gpu_nn.backend("triton"):
            a_in.set()
            b_in.wait(10)
            seen["a"] = _backend.requested()
        a_out.set()

    def thread_b():
        a_in.wait(10)
        with gpu_nn.backend("reference"):
            b_in.set()
            a_out.wait(10)
            seen["b"] = _backend.requested()
            seen["b_op"] = _backend.resolve("relu", torch.device("cpu"), ("reference", "triton"))
        seen["b_after"] = _backend.requested()

    ts = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert seen == {"a": "triton", "b": "reference", "b_op": "reference", "b_after": _backend.requested()}


def test_env_var_is_every_threads_default(monkeypatch):
    monkeypatch.setenv("GPU_NN_BACKEND", "reference")
    got = []
    with gpu_nn.backend("auto"):
        t = threading.Thread(target=lambda: got.append(_backend.requested()))
        t.start()
        t.join(10)
        assert _backend.requested() == "auto"
    assert got == ["reference"]


def _run_threads(targets, switch_interval: float, timeout: float = 120) -> None:
    """Start a thread per (function, args) and join them all, with the interpreter switching
    threads every ``switch_interval`` seconds meanwhile (so that state shared between threads
    gets interleaved); the interval is put back after."""
    import sys

    ts = [threading.Thread(target=fn, args=args) for fn, args in targets]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout)
    finally:
        sys.setswitchinterval(interval)


def _model_step(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 9, 9, generator=g, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    lw = torch.randn(5, 36, generator=g, requires_grad=True)
    t = torch.tensor([0, 4, 2])
    h = F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 3, 2, 1)
    h = F.avg_pool2d(h, 3, 2, 1).flatten(1)
    loss = F.cross_entropy(F.linear(h, lw), t)
    grads = torch.autograd.grad(loss, [x, w, lw])
    return [loss.detach(), *grads]


def test_eight_threads_bitwise_equal_one_thread():
    """Eight threads, each in its own backend block, training-step results bitwise equal to one
    thread's; the interpreter switches threads every few microseconds so that any state shared
    between threads (a scratch buffer, a cache, the backend choice) gets interleaved."""
    want = [_model_step(s) for s in range(8)]
    got, errors = {}, []
    start = threading.Barrier(8)

    def work(s):
        try:
            start.wait(10)
            with gpu_nn.backend("reference"):
                for _ in range(3):
                    got[s] = _model_step(s)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    _run_threads([(work, (s,)) for s in range(8)], 1e-6, 60)
    assert not errors, errors
    for s in range(8):
        assert all(torch.equal(a, b) for a, b in zip(got[s], want[s])), s


@pytest.mark.parametrize("module", ["LSTM", "GRU"])
def test_threads_backward_over_one_shared_graph(module):
    """Two threads each running backward many times over one graph (retain_graph=True), as torch
    allows: every gradient equal to one thread's, no error, and the graph still sound after.
    The sequence ops' spread list arguments once swapped the shared ctx's needs_input_grad
    during a backward (IndexError in about half the calls, and a graph left broken for good)."""
    torch.manual_seed(0)
    m = getattr(gpu_nn.nn, module)(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with gpu_nn.backend("reference"):
        loss = m(x)[0].square().sum()
    wrt = [x, *m.parameters()]
    want = torch.autograd.grad(loss, wrt, retain_graph=True)
    errors, wrong = [], []
    start = threading.Barrier(2)

    def work():
        start.wait(10)
        for _ in range(40):
            try:
                got = torch.autograd.grad(loss, wrt, retain_graph=True)
                wrong.extend(i for i, (a, b) in enumerate(zip(got, want)) if not torch.equal(a, b))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

    _run_threads([(work, ()), (work, ())], 1e-6)
    assert not errors and not wrong, (errors[:2], wrong[:5])
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(loss, wrt), want))


@needs_triton
def test_triton_launches_from_two_threads_at_once():
    """Two threads launching Triton kernels at the same time (relu and sigmoid of several
    programs each), every result right. Under the interpreter its one process-wide builder and
    language patch made concurrent launches raise (13 of 60 in an audit's run) until launches
    took turns (kernels/triton/_compat.py)."""
    dev = DEVICE["triton"]
    x = torch.randn(64, 1024, device=dev)
    want = {"relu": torch.relu(x), "sigmoid": torch.sigmoid(x)}
    bad = []
    start = threading.Barrier(2)

    def work(name):
        start.wait(10)
        for _ in range(15):
            try:
                with gpu_nn.backend("triton"):
                    got = getattr(F, name)(x)
                if not torch.allclose(got, want[name], atol=1e-6):
                    bad.append(f"{name}: wrong values")
            except Exception as exc:  # noqa: BLE001 - reported below
                bad.append(repr(exc)[:200])

    _run_threads([(work, (n,)) for n in want], 1e-5)
    assert not bad, bad[:3]


@needs_triton
def test_backward_in_another_thread_runs_on_the_forwards_backend(monkeypatch):
    """Autograd may run a backward on a thread that sees none of the user's blocks (the thread
    that called it; for CUDA tensors, autograd's own device thread): the backward must still use
    the backend the forward ran on."""
    calls = []
    resolve = _backend.resolve

    def spy(op, device, have, *a, **k):
        got = resolve(op, device, have, *a, **k)
        calls.append((op, got, threading.current_thread().name))
        return got

    monkeypatch.setattr(_backend, "resolve", spy)
    dev = DEVICE["triton"]
    x = torch.randn(2, 3, 7, 7, device=dev, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=dev, requires_grad=True)
    with gpu_nn.backend("triton"):
        y = F.max_pool2d(F.sigmoid(F.conv2d(x, w, padding=1)), 2)
        loss = F.log_softmax(y.flatten(1), 1).sum()
    box = {}

    def worker():
        try:
            box["g"] = torch.autograd.grad(loss, [x, w])
        except Exception as exc:  # noqa: BLE001
            box["e"] = exc

    n_fwd = len(calls)
    t = threading.Thread(target=worker, name="not-the-forward-thread")
    t.start()
    t.join(60)
    assert "e" not in box, box.get("e")
    # the backward's calls: on CPU tensors autograd runs them in the calling thread (the worker),
    # on CUDA tensors in its own device thread; neither is the forward's thread
    bwd = calls[n_fwd:]
    threads = {c[2] for c in bwd}
    assert threading.current_thread().name not in threads, bwd
    assert torch.cuda.is_available() or threads == {"not-the-forward-thread"}, bwd
    assert len(bwd) >= 4 and {c[1] for c in bwd} == {"triton"}, bwd
    with gpu_nn.backend("reference"):  # the reference takes CPU tensors
        xc, wc = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
        y2 = F.max_pool2d(F.sigmoid(F.conv2d(xc, wc, padding=1)), 2)
        want = torch.autograd.grad(F.log_softmax(y2.flatten(1), 1).sum(), [xc, wc])
    for a, b in zip((g.cpu() for g in box["g"]), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _resolve_spy(monkeypatch) -> list:
    """The (op, backend) of every backend resolution from now on, in a list it returns."""
    calls = []
    resolve = _backend.resolve

    def spy(op, device, have, *a, **k):
        got = resolve(op, device, have, *a, **k)
        calls.append((op, got))
        return got

    monkeypatch.setattr(_backend, "resolve", spy)
    return calls


@needs_triton
@pytest.mark.parametrize("layer", ["LSTM", "GRU", "RNN", "LSTMCell"])
def test_double_backward_in_another_thread_runs_on_the_forwards_backend(layer, monkeypatch):
    """The second derivative of a recurrent layer (the sequence layers' recomputed forward, of our
    linear and activation ops) runs on the backend its forward ran on, from a thread that sees no
    block: the sequence layers' took the thread's (an audit: an LSTM under 'triton' recomputed on
    'reference'), the cells' already stayed."""
    calls = _resolve_spy(monkeypatch)
    torch.manual_seed(0)
    mod = getattr(gnn, layer)(2, 3)
    x = torch.randn(*((1, 2) if layer.endswith("Cell") else (2, 1, 2)), device=DEVICE["triton"], requires_grad=True)
    mod = mod.to(x.device)
    with gpu_nn.backend("triton"):
        out = mod(x)
        out = out[0] if isinstance(out, tuple) else out
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    calls.clear()
    box = {}

    def worker():
        try:
            box["gg"] = torch.autograd.grad(g.pow(2).sum(), x)
        except Exception as exc:  # noqa: BLE001
            box["e"] = exc

    t = threading.Thread(target=worker, name="not-the-forward-thread")
    t.start()
    t.join(120)
    assert "e" not in box, box.get("e")
    assert calls and {c[1] for c in calls} == {"triton"}, sorted(set(calls))


@needs_triton
def test_non_reentrant_checkpoint_with_the_readmes_context_fn_recomputes_on_the_forwards_backend(monkeypatch):
    """README's recipe: checkpoint(use_reentrant=False, context_fn=(nullcontext, the backend's
    block)) recomputes our ops on the forward's backend from a thread that sees no block, also
    where an op of torch's after ours asks for the recomputed tensor first (without it, the
    recompute takes that thread's backend: an audit)."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    calls = _resolve_spy(monkeypatch)
    x = torch.randn(2, 8, device=DEVICE["triton"], requires_grad=True)
    with gpu_nn.backend("triton"):
        y = checkpoint(lambda t: F.sigmoid(t).exp(), x, use_reentrant=False,
                       context_fn=lambda: (contextlib.nullcontext(), gpu_nn.backend("triton")))
    calls.clear()
    t = threading.Thread(target=lambda: y.sum().backward())
    t.start()
    t.join(60)
    assert ("sigmoid", "triton") in calls and {c[1] for c in calls} == {"triton"}, calls
    torch.testing.assert_close(x.grad, (torch.sigmoid(x) * (1 - torch.sigmoid(x)) * torch.sigmoid(x).exp()).detach())


def test_backward_keeps_the_forwards_backend_after_the_block_exits(monkeypatch):
    """Same thread: forward inside backend('reference') over an env default that cannot run
    these tensors; the backward after the block still runs on the reference."""
    x = torch.randn(4, requires_grad=True)
    with gpu_nn.backend("reference"):
        y = F.tanh(x)
    monkeypatch.setenv("GPU_NN_BACKEND", "cupy")  # would refuse CPU tensors (or be absent)
    (g,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(g, 1 - torch.tanh(x.detach()) ** 2)


# ----------------------------------------------------------------------------- launch counts

# Triton kernels launched and aten ops that launch a kernel (outside the interpreter's own
# launch plumbing; count_launches) per op forward + backward, all inputs requiring grad. Change a number only
# when a kernel is added or removed on purpose.
LAUNCHES = {
    "relu": ({"_act_fwd_kernel": 1, "_act_bwd_kernel": 1}, {}),
    "sigmoid": ({"_act_fwd_kernel": 1, "_act_bwd_kernel": 1}, {}),
    # two reductions: the wgrad kernel's split-K partial sums (summed straight into dw, no
    # copy) and the bias gradient (one sum over N, H, W)
    "conv2d": ({"_conv_fwd_kernel": 1, "_conv_dgrad_kernel": 1, "_conv_wgrad_kernel": 1}, {"aten::sum": 2}),
    # the ReLU's gradient and the bias gradient in one launch (small: ACT_COLSUM_MAX_ROWS), where
    # _act_bwd_kernel and a second aten::sum were
    "conv2d+relu": ({"_conv_fwd_kernel": 1, "_act_colsum_kernel": 1, "_conv_dgrad_kernel": 1, "_conv_wgrad_kernel": 1},
                    {"aten::sum": 1}),
    # no zero gradient for the unused int64 indices (the autograd setup does not materialise it)
    "max_pool2d": ({"_max_pool_fwd_kernel": 1, "_max_pool_bwd_kernel": 1}, {}),
    "avg_pool2d": ({"_avg_pool_fwd_kernel": 1, "_avg_pool_bwd_kernel": 1}, {}),
    "linear": ({"_matmul_kernel": 3, "_colsum_kernel": 1}, {}),
    # the ReLU's gradient and the bias gradient in one launch (a small M: ACT_COLSUM_MAX_ROWS;
    # _act_bwd_kernel and _colsum_kernel before)
    "linear+relu": ({"_matmul_kernel": 3, "_act_colsum_kernel": 1}, {}),
    "softmax": ({"_softmax_fwd_kernel": 1, "_softmax_bwd_kernel": 1}, {}),
    "log_softmax": ({"_softmax_fwd_kernel": 1, "_softmax_bwd_kernel": 1}, {}),
}
# Pinned under the interpreter only, until a GPU run records them at these counts (the H200
# record at 82f8513 predates them: there cross_entropy made 20 GPU events, lstm_cell 32).
# cross_entropy: the row kernel, the 'sum' / 'mean' finish and the backward, nothing else, for
# every reduction, weights, ignore_index, label smoothing and probability targets (the CPU
# target's range check is NumPy's; on a GPU GPU_EXPECTED adds its kernel and one copy back).
_CE = {"_ce_fwd_kernel": 1, "_ce_reduce_kernel": 1, "_ce_bwd_kernel": 1}
LAUNCHES_INTERP = {
    "cross_entropy": (_CE, {}),
    "cross_entropy none": ({"_ce_fwd_kernel": 1, "_ce_bwd_kernel": 1}, {}),
    "cross_entropy weight+ignore+smoothing": (_CE, {}),
    "cross_entropy prob+weight": (_CE, {}),
    # the cells: forward = the input projection + one step; backward = one step + dh, dx, dW_ih,
    # dW_hh (matmuls) + one launch for both bias sums (Elman and LSTM: one gate gradient; the
    # GRU's two summed in the same pass); nothing else (float32, contiguous states, the LSTM's
    # c' unused: no zero gradient made for it)
    "rnn_tanh_cell": ({"_rnn_matmul_kernel": 5, "_rnn_step_fwd_kernel": 1, "_rnn_step_bwd_kernel": 1,
                       "_rnn_colsum_kernel": 1}, {}),
    "gru_cell": ({"_rnn_matmul_kernel": 5, "_rnn_step_fwd_kernel": 1, "_rnn_step_bwd_kernel": 1,
                  "_rnn_colsum_kernel": 1}, {}),
    "lstm_cell": ({"_rnn_matmul_kernel": 5, "_rnn_step_fwd_kernel": 1, "_rnn_step_bwd_kernel": 1,
                   "_rnn_colsum_kernel": 1}, {}),
    # the sequences: the reserve gets no zero fill; the states in and out of the reserve one
    # multi-tensor copy each way (all layers and directions); the unused h_n (and c_n): the
    # backward's carries (and the LSTM's dc) one fill each (a zeros tensor per state and its copy
    # into the carries until b6f32cf); the full lengths made once (the first call), not per call
    "gru": ({"_rnn_matmul_kernel": 4, "_rnn_step_fwd_kernel": 3, "_rnn_step_bwd_kernel": 4, "_rnn_colsum_kernel": 1},
            {"aten::_foreach_copy_": 2, "aten::zero_": 1}),
    "lstm": ({"_rnn_matmul_kernel": 4, "_rnn_step_fwd_kernel": 3, "_rnn_step_bwd_kernel": 4, "_rnn_colsum_kernel": 1},
             {"aten::_foreach_copy_": 2, "aten::zero_": 2}),
    # bidirectional: both directions of a step in one launch (the pair kernels), T = 3 of them
    # forward and T + 1 backward (the last forms both directions' dh0); the two directions' input
    # projections, dW_ih and dW_hh in one launch each (_rnn_matmul2_kernel), dx per direction (the
    # second accumulates into the first's), and each direction's bias sums (one launch for both)
    "lstm bidirectional": ({"_rnn_matmul_kernel": 2, "_rnn_matmul2_kernel": 3, "_rnn_step2_fwd_kernel": 3,
                            "_rnn_step2_bwd_kernel": 4, "_rnn_colsum_kernel": 2},
                           {"aten::_foreach_copy_": 2, "aten::zero_": 2}),
}
# The same fwd+bwd on a GPU, as GPU events (torch.profiler, CUDA activity; kernel_counts.by_kind):
# our kernels are LAUNCHES' own, by name and number; beside them, torch's events by kind. Each aten
# op above is one GPU event (aten::zeros a fill kernel, aten::sum a reduce kernel) except where a
# comment says otherwise. The H200 record at 82f8513 (RECORD, triton column, at the benchmark's
# smaller shapes) has exactly these, except for the ops in PINS_AT_RECORD, whose counts changed on
# purpose after it; test_recorded_gpu_counts_match_the_pins checks that here.
GPU_OTHER = {
    "relu": {}, "sigmoid": {}, "avg_pool2d": {}, "linear": {}, "linear+relu": {}, "softmax": {}, "log_softmax": {},
    # one reduction where the interpreter counts two: the bias gradient. The compiled wgrad kernel
    # writes dw itself, unsplit, while its K = N*Ho*Wo < 2 * 8 * BLOCK_K (256 in float32; here 98),
    # where the interpreter splits K in two from 4 * 16 = 64 on and sums the partials with
    # aten::sum (test_conv2d_wgrad_split_differs_between_interpreter_and_gpu)
    "conv2d": {"reduce": 1},
    "conv2d+relu": {},  # its bias gradient summed with the ReLU's
    # no fill: autograd's zero gradient for the unused int64 indices output (FillFunctor<long>,
    # one fill at 82f8513) is no longer made (set_materialize_grads(False) in the autograd setup)
    "max_pool2d": {},
}
# The pins (LAUNCHES[op][0], GPU_OTHER[op]) as they were at 82f8513, for the ops whose counts
# changed on purpose since: the H200 record (RECORD) was made then, so it is checked against these
# (the record still tells whether the GPU counted as the pins said at the time); a GPU run of
# test_gpu_kernel_counts_are_pinned holds the current pins. max_pool2d: the indices' zero
# gradient (one fill), removed since.
PINS_AT_RECORD = {
    "max_pool2d": ({"_max_pool_fwd_kernel": 1, "_max_pool_bwd_kernel": 1}, {"fill": 1}),
}
# Expected on a GPU but not yet recorded there (the record predates them), as (our kernels, torch's
# events by kind): test_gpu_kernel_counts_are_pinned holds a GPU run to them. cross_entropy: the
# interpreter's three kernels, and the CUDA target's range check, one kernel and one copy back
# (Memcpy DtoH, kind "sync"), where 82f8513 made 20 events; torch makes 5.
GPU_EXPECTED = {
    "cross_entropy": ({"_ce_target_check_kernel": 1, **_CE}, {"sync": 1}),
    "cross_entropy none": ({"_ce_target_check_kernel": 1, "_ce_fwd_kernel": 1, "_ce_bwd_kernel": 1}, {"sync": 1}),
    "cross_entropy weight+ignore+smoothing": ({"_ce_target_check_kernel": 1, **_CE}, {"sync": 1}),
    "cross_entropy prob+weight": (_CE, {}),  # no range check for probabilities
}
RECORD = "benchmarks/results/2026-11-30_nvidia-h200_82f8513/kernel_counts.json"
# aten ops that launch nothing on a GPU: allocation, views and no-op conversions. Every other
# aten op a fwd+bwd makes outside our launches (and not inside another such op) is counted: a
# copy, a fill, a reduction, an elementwise op, a host sync (aten::item). A view-like op that
# does copy (reshape of a non-viewable layout, .to / .contiguous that convert) shows its copy
# as a child, which is counted instead.
NO_KERNEL = frozenset("aten::" + n for n in (
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "_reshape_alias", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "expand_as", "slice", "select",
    "alias", "detach", "detach_", "resolve_conj", "resolve_neg", "movedim", "as_strided", "to", "lift_fresh",
    "contiguous", "flatten", "unflatten", "split", "chunk", "narrow", "unbind", "result_type"))


def _launch_case(name, device="cpu"):
    def r(*s):
        return torch.randn(*s, device=device, requires_grad=True)

    # made outside the counted call (on a GPU a tensor made inside it is a host-to-device copy)
    t5, w7 = torch.tensor([1, 6, 0, 3, 2], device=device), torch.rand(7, device=device) + 0.5
    return {
        "relu": (F.relu, (r(3, 5, 7),)),
        "sigmoid": (F.sigmoid, (r(3, 5, 7),)),
        "conv2d": (lambda x, w, b: F.conv2d(x, w, b, padding=1), (r(2, 3, 7, 7), r(4, 3, 3, 3), r(4))),
        "conv2d+relu": (lambda x, w, b: F.conv2d(x, w, b, padding=1, activation="relu"),
                        (r(2, 3, 7, 7), r(4, 3, 3, 3), r(4))),
        "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1), (r(2, 3, 9, 9),)),
        "avg_pool2d": (lambda x: F.avg_pool2d(x, 3, 2, 1), (r(2, 3, 9, 9),)),
        "linear": (F.linear, (r(5, 7), r(3, 7), r(3))),
        "linear+relu": (lambda x, w, b: F.linear(x, w, b, activation="relu"), (r(5, 7), r(3, 7), r(3))),
        "softmax": (lambda x: F.softmax(x, 1), (r(5, 7),)),
        "log_softmax": (lambda x: F.log_softmax(x, 1), (r(5, 7),)),
        "cross_entropy": (lambda x: F.cross_entropy(x, t5), (r(5, 7),)),
        "cross_entropy none": (lambda x: F.cross_entropy(x, t5, reduction="none"), (r(5, 7),)),
        "cross_entropy weight+ignore+smoothing": (
            lambda x: F.cross_entropy(x, t5, w7, ignore_index=3, label_smoothing=0.1), (r(5, 7),)),
        "cross_entropy prob+weight": (lambda x, t: F.cross_entropy(x, t, w7, label_smoothing=0.1),
                                      (r(5, 7), torch.rand(5, 7, device=device).softmax(1).requires_grad_())),
        "rnn_tanh_cell": (F.rnn_tanh_cell, (r(3, 5), r(3, 4), r(4, 5), r(4, 4), r(4), r(4))),
        "gru_cell": (F.gru_cell, (r(3, 5), r(3, 4), r(12, 5), r(12, 4), r(12), r(12))),
        "lstm_cell": (lambda x, h, c, *p: F.lstm_cell(x, (h, c), *p)[0],
                      (r(3, 5), r(3, 4), r(3, 4), r(16, 5), r(16, 4), r(16), r(16))),
        "gru": (lambda x, h, *p: F.gru(x, h, p)[0], (r(3, 2, 5), r(1, 2, 4), r(12, 5), r(12, 4), r(12), r(12))),
        "lstm": (lambda x, h, c, *p: F.lstm(x, (h, c), p)[0],
                 (r(3, 2, 5), r(1, 2, 4), r(1, 2, 4), r(16, 5), r(16, 4), r(16), r(16))),
        "lstm bidirectional": (lambda x, h, c, *p: F.lstm(x, (h, c), p, bidirectional=True)[0],
                               (r(3, 2, 5), r(2, 2, 4), r(2, 2, 4), *(t for _ in range(2) for t in (r(16, 5), r(16, 4), r(16), r(16))))),
    }[name]


def count_launches(fn, args, grad, wrt=None):
    """(kernel launches by name, aten ops that would launch a GPU kernel or sync, by name) of
    one fwd+bwd on triton (``NO_KERNEL``: the aten ops not counted); the gradients of ``wrt``
    (default: every argument)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = collections.Counter()
    orig = InterpretedFunction.run

    def run(self, *a, **k):
        launches[self.fn.__name__] += 1
        with torch.profiler.record_function("gpu_nn_test::launch"):
            return orig(self, *a, **k)

    InterpretedFunction.run = run
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = fn(*args)
            torch.autograd.grad(y, list(args) if wrt is None else wrt, grad)
    finally:
        InterpretedFunction.run = orig
    ops = collections.Counter()
    def counted(e):
        return e.name.startswith("aten::") and e.name not in NO_KERNEL

    for e in prof.events():
        if not counted(e):
            continue
        p = e.cpu_parent
        while p is not None and p.name != "gpu_nn_test::launch" and not counted(p):
            p = p.cpu_parent
        if p is None:  # outermost: not inside a launch (interpreter copies) nor inside a counted op
            ops[e.name] += 1
    return dict(launches), dict(ops)


@pytest.mark.skipif(torch.cuda.is_available() or not _backend.interpret_mode(),
                    reason="counts launches through the Triton interpreter")
@pytest.mark.parametrize("name", sorted({**LAUNCHES, **LAUNCHES_INTERP}))
def test_launch_and_copy_counts_are_pinned(name, monkeypatch):
    monkeypatch.setattr(_dispatch, "_POISON", False)  # the poison fill is the tests', not the op's
    fn, args = _launch_case(name)
    with gpu_nn.backend("triton"):
        grad = torch.randn_like(fn(*args))  # first call: anything lazily set up is not counted
        got = count_launches(fn, args, grad)
    assert got == {**LAUNCHES, **LAUNCHES_INTERP}[name], got


# The recurrent cases' Triton launches when only some arguments require grad (the rest made
# plain): a data input's product with w_ih, a frozen weight's product (a bias: the column sum),
# the initial state's final step (dh0 = dG W_hh) are not launched. Against the all-grad pins
# above: "weights" (a data input, no initial state of the user's), "input" (frozen weights), "state"
# (a learned initial state and frozen weights). The bidirectional pair's backward: T step
# launches, the (T + 1)-th forming both directions' dh0 only where the state asks for it.
_M, _S, _C = "_rnn_matmul_kernel", "_rnn_step_bwd_kernel", "_rnn_colsum_kernel"
PARTIAL = {
    ("lstm_cell", "weights"): {_M: 3, "_rnn_step_fwd_kernel": 1, _S: 1, _C: 1},  # fwd, dW_ih, dW_hh
    ("lstm_cell", "input"): {_M: 2, "_rnn_step_fwd_kernel": 1, _S: 1},  # fwd, dx
    ("lstm_cell", "state"): {_M: 2, "_rnn_step_fwd_kernel": 1, _S: 1},  # fwd, dh
    ("gru_cell", "weights"): {_M: 3, "_rnn_step_fwd_kernel": 1, _S: 1, _C: 1},
    ("lstm", "weights"): {_M: 3, "_rnn_step_fwd_kernel": 3, _S: 3, _C: 1},  # fwd, dW_ih, dW_hh; T steps
    ("lstm", "input"): {_M: 2, "_rnn_step_fwd_kernel": 3, _S: 3},  # fwd, dx
    ("lstm", "state"): {_M: 1, "_rnn_step_fwd_kernel": 3, _S: 4},  # fwd; T steps and dh0's
    ("gru", "weights"): {_M: 3, "_rnn_step_fwd_kernel": 3, _S: 3, _C: 1},
    ("lstm bidirectional", "weights"): {"_rnn_matmul2_kernel": 3, "_rnn_step2_fwd_kernel": 3,
                                        "_rnn_step2_bwd_kernel": 3, _C: 2},  # no dx of either direction
    ("lstm bidirectional", "input"): {_M: 2, "_rnn_matmul2_kernel": 1, "_rnn_step2_fwd_kernel": 3,
                                      "_rnn_step2_bwd_kernel": 3},  # fwd's projections, dx per direction
    ("lstm bidirectional", "state"): {"_rnn_matmul2_kernel": 1, "_rnn_step2_fwd_kernel": 3,
                                      "_rnn_step2_bwd_kernel": 4},  # T steps and both dh0's
}


@pytest.mark.skipif(torch.cuda.is_available() or not _backend.interpret_mode(),
                    reason="counts launches through the Triton interpreter")
@pytest.mark.parametrize("name,asked", sorted(PARTIAL))
def test_recurrent_backward_launches_only_what_is_asked(name, asked, monkeypatch):
    monkeypatch.setattr(_dispatch, "_POISON", False)
    fn, args = _launch_case(name)
    n_state = 3 if "lstm" in name else 2  # input, h (, c), then the weights
    keep = {"weights": lambda i: i >= n_state, "input": lambda i: i == 0, "state": lambda i: 0 < i < n_state}[asked]
    args = tuple(a if keep(i) else a.detach() for i, a in enumerate(args))
    wrt = [a for a in args if a.requires_grad]
    with gpu_nn.backend("triton"):
        grad = torch.randn_like(fn(*args))
        launches, _ = count_launches(fn, args, grad, wrt)
        ours = torch.autograd.grad(fn(*args), wrt, grad)
    assert launches == PARTIAL[name, asked], launches
    # torch's gradients of the same (its functional ops, the same arguments)
    theirs_fn = {"lstm_cell": lambda x, h, c, *p: torch._VF.lstm_cell(x, (h, c), *p)[0],
                 "gru_cell": torch._VF.gru_cell,
                 "lstm": lambda x, h, c, *p: torch._VF.lstm(x, (h, c), p, True, 1, 0.0, False, False, False)[0],
                 "gru": lambda x, h, *p: torch._VF.gru(x, h, p, True, 1, 0.0, False, False, False)[0],
                 "lstm bidirectional": lambda x, h, c, *p: torch._VF.lstm(x, (h, c), p, True, 1, 0.0, False, True,
                                                                           False)[0]}[name]
    theirs = torch.autograd.grad(theirs_fn(*args), wrt, grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA kernels: needs a GPU")
@needs_triton
@pytest.mark.parametrize("name", sorted(LAUNCHES) + sorted(GPU_EXPECTED))
def test_gpu_kernel_counts_are_pinned(name, monkeypatch):
    from gpu_nn import _tuning
    from gpu_nn.benchmarks import kernel_counts

    monkeypatch.setattr(_dispatch, "_POISON", False)  # the poison fill is the tests', not the op's
    # the pins are the heuristic's launches: a measuring chooser (pooling's tiled forms, conv's
    # split-K candidates) may pick kernels of its own on a GPU
    monkeypatch.setenv(_tuning.ENV, "0")
    fn, args = _launch_case(name, "cuda")
    with gpu_nn.backend("triton"):
        got = kernel_counts.by_kind(kernel_counts.count(fn, args))  # after a warm-up call of its own
    assert got == (GPU_EXPECTED[name] if name in GPU_EXPECTED else (LAUNCHES[name][0], GPU_OTHER[name])), got


def test_recorded_gpu_counts_match_the_pins():
    """kernel_counts.by_kind on the GPU events that the H200 recorded (benchmark shapes): every
    LAUNCHES case recorded there is GPU_OTHER's pin (PINS_AT_RECORD's, as the pins were when the
    record was made, for an op whose counts changed on purpose since), and every kernel it names
    as itself in the Triton column is one of ours (a Python identifier: no aten kernel taken for
    ours)."""
    import json
    import pathlib

    from gpu_nn.benchmarks import kernel_counts

    rows = json.loads((pathlib.Path(__file__).parents[1] / RECORD).read_text())
    seen = set()
    for row in rows:
        kernels = kernel_counts.by_kind(row["triton"])[0]
        assert all(k.isidentifier() for k in kernels), (row["op"], kernels)
        if row["op"] in LAUNCHES:
            seen.add(row["op"])
            pins = PINS_AT_RECORD.get(row["op"], (LAUNCHES[row["op"]][0], GPU_OTHER[row["op"]]))
            assert kernel_counts.by_kind(row["triton"]) == pins, row
    assert seen == set(LAUNCHES) - {"conv2d+relu", "linear+relu"}  # fused activations: not benchmarked
    # PINS_AT_RECORD holds only ops recorded there whose pins did change (not a way around a pin)
    for op, pins in PINS_AT_RECORD.items():
        assert op in seen and pins != (LAUNCHES[op][0], GPU_OTHER[op]), op
    by_op = {r["op"]: r for r in rows}
    assert kernel_counts.by_kind(by_op["cross_entropy"]["triton"]) == (
        {"_ce_fwd_kernel": 1, "_ce_bwd_kernel": 1}, {"aten": 9, "reduce": 4, "copy": 3, "fill": 1, "sync": 1})
    assert kernel_counts.by_kind(by_op["lstm_cell"]["triton"])[1] == {"fill": 5, "copy": 16}
    assert kernel_counts.by_kind(by_op["conv1d"]["torch"])[1] == {"fill": 1, "reduce": 1, "aten": 1}


@needs_triton
def test_conv2d_wgrad_split_differs_between_interpreter_and_gpu():
    """Why GPU_OTHER's conv2d has one reduction where LAUNCHES has two aten::sum: for the case's
    wgrad (dw [4, 3, 3, 3], K = N*Ho*Wo = 98) the GPU's split of K is 1 (the kernel writes dw
    directly, no sum) and the interpreter's 2 (partials summed by aten::sum)."""
    import triton

    from gpu_nn.kernels.triton import conv as kc

    m = 2 * 7 * 7
    splits = {}
    for interpret in (False, True):
        bm, bn, bk = kc.pick_config(4, 0, False, interpret)[:3]  # as conv_backward_weight picks it
        splits[interpret] = kc.wgrad_split(triton.cdiv(4, bm) * triton.cdiv(3, bn) * 9, m, bk, interpret)
    assert splits == {False: 1, True: 2}


def test_launchers_compute_grids_without_triton_constexpr_functions():
    """``triton.cdiv`` / ``triton.next_power_of_2`` are ConstexprFunctions since Triton 3.5, about
    4 us per host call (against 0.2 us): host code computes grids and blocks with
    ``_launch.cdiv`` / ``_launch.next_power_of_2`` (inside @triton.jit code, ``tl.cdiv`` is free)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parent.parent
    pattern = re.compile(r"\btriton\.(cdiv|next_power_of_2)\(")
    hits = []
    for folder in ("kernels", "gpu_nn"):
        for path in sorted((root / folder).rglob("*.py")):
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line.split("#", 1)[0]) and "``" not in line:
                    hits.append(f"{path.relative_to(root)}:{no}: {line.strip()}")
    assert not hits, "\n".join(hits)


def _toy_tensorlist_function(lean: bool):
    """A Function of (x, ws: list[Tensor], k: int) -> (x * k + sum(ws), [w * x.sum() for w in ws]),
    wrapped for tensor lists the lean way or torch's way; backward records needs_input_grad."""
    from torch._library.autograd import supports_tensorlist

    seen = []

    def forward(ctx, x, ws, k):
        ctx.save_for_backward(x, *ws)
        ctx.k = k
        return x * k + sum(ws), [w * x.sum() for w in ws]

    def backward(ctx, gy, gws):
        x, *ws = ctx.saved_tensors
        seen.append(ctx.needs_input_grad)
        gws = [torch.zeros_like(w) if g is None else g for g, w in zip(gws, ws)] if gws is not None else [None] * len(ws)
        gx = gy * ctx.k + sum((g * w).sum() for g, w in zip(gws, ws) if g is not None)
        gw = [gy + (g * x.sum() if g is not None else 0) for g in gws]
        return gx, (gw if any(ctx.needs_input_grad[1]) else [None] * len(ws)), None

    def make():
        return type("Toy", (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    fn = _dispatch._lean_tensorlist(make(), supports_tensorlist(make())) if lean else supports_tensorlist(make())
    return fn, seen


@pytest.mark.parametrize("shape", ["list", "tuple", "empty", "one-frozen", "list-frozen", "unused-list-output"])
def test_lean_tensorlist_matches_torchs_wrapper(shape):
    """The eager route's tensor-list wrapper (_dispatch._lean_tensorlist) against torch's
    supports_tensorlist: the same outputs, gradients, needs_input_grad seen by backward (a tuple
    of tensors on the lean side against the same tensors in a list on torch's)."""
    results = []
    for lean in (False, True):
        fn, seen = _toy_tensorlist_function(lean)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
        ws = [torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        if shape == "empty":
            ws = []
        if shape == "one-frozen":
            ws[1].requires_grad_(False)
        if shape == "list-frozen":
            for w in ws:
                w.requires_grad_(False)
        # a tuple of tensors: spread like a list by the lean wrapper; torch's wants a backward
        # that returns a tuple there, so its side takes the list
        y, zs = fn.apply(x, tuple(ws) if shape == "tuple" and lean else ws, 2)
        assert isinstance(zs, list) and len(zs) == len(ws)
        loss = y.sum() if shape == "unused-list-output" else y.sum() + sum(z.sum() for z in zs)
        leaves = [x] + [w for w in ws if w.requires_grad]
        grads = torch.autograd.grad(loss, leaves)
        results.append(([y.detach(), *[z.detach() for z in zs]], grads, seen))
    (o0, g0, s0), (o1, g1, s1) = results
    assert all(torch.equal(a, b) for a, b in zip(o0, o1)) and len(o0) == len(o1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1)) and len(g0) == len(g1)
    assert [tuple(map(lambda v: list(v) if isinstance(v, (list, tuple)) else v, s)) for s in s0] == \
        [tuple(map(lambda v: list(v) if isinstance(v, (list, tuple)) else v, s)) for s in s1]


def test_lean_tensorlist_mixed_list_takes_torchs_wrapper():
    """A list mixing tensors with other values is not spread by the lean wrapper: torch's own
    wrapper takes the call (and treats it as a leaf, as its pytree rule says)."""
    calls = []

    class Fallback:
        @staticmethod
        def apply(*args):
            calls.append(args)
            return "fallback"

    fn, _ = _toy_tensorlist_function(True)
    lean = _dispatch._lean_tensorlist(type("T", (torch.autograd.Function,), {
        "forward": staticmethod(lambda ctx, *a: a[0]), "backward": staticmethod(lambda ctx, g: g)}), Fallback)
    x = torch.randn(2, requires_grad=True)
    assert lean.apply(x, [x, 1]) == "fallback" and len(calls) == 1
    assert _dispatch._flatten((x, [1, 2], (3, 4), [], (x, x)))[1] == (None, None, None, (list, 0), (tuple, 2))
    assert _dispatch._flatten(([x, None],))[0] is None and _dispatch._flatten(((x, 1),))[0] is None


def test_eager_route_unwraps_what_a_finished_transform_left_wrapped():
    """The eager route calls autograd.Function's C apply itself (not torch's Python classmethod
    around it) and unwraps, as that classmethod does, a tensor that a finished torch.func
    transform left wrapped (a "dead wrapper"): our relu of such a tensor gives torch's value and
    sends torch's gradient to the tensor the transform was applied to."""
    leaked = {}

    def f(x):
        leaked["x"] = x
        return (x * 2).sum()

    for backend in [b for b in ("reference", "triton") if b in gpu_nn.available_backends()]:
        dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
        results = []
        for fn in (torch.relu, F.relu):
            x0 = torch.tensor([0.5, -1.0, 2.0, -0.25, 3.0], device=dev, requires_grad=True)
            torch.func.grad(f)(x0)
            dead = leaked.pop("x")
            assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
            with gpu_nn.backend(backend):
                y = fn(dead)
                (y * torch.arange(5.0, device=dev)).sum().backward()
                with torch.no_grad():  # the route without a gradient too
                    z = fn(dead)
            results.append((y.detach(), x0.grad, z))
        for a, b in zip(*results):
            assert torch.equal(a, b), (backend, a, b)


def _layout_inputs():
    """(kind, make(shape)) of the tensors no kernel of ours reads: sparse COO, a jagged nested
    tensor, a MaskedTensor."""
    from torch.masked import masked_tensor

    return [("sparse_coo", lambda shape: torch.randn(*shape).to_sparse()),
            ("nested", lambda shape: torch.nested.nested_tensor([torch.randn(*shape[1:]), torch.randn(*shape[1:])],
                                                                layout=torch.jagged)),
            ("MaskedTensor", lambda shape: (lambda x: masked_tensor(x, x > 0))(torch.randn(*shape)))]


_LAYOUT_OPS = {
    "relu": (lambda x: F.relu(x), (2, 3, 4)), "sigmoid": (lambda x: F.sigmoid(x), (2, 3, 4)),
    "softmax": (lambda x: F.softmax(x, -1), (2, 3, 4)), "log_softmax": (lambda x: F.log_softmax(x, -1), (2, 3, 4)),
    "linear": (lambda x: F.linear(x, torch.ones(2, 4)), (2, 3, 4)),
    "max_pool2d": (lambda x: F.max_pool2d(x, 2), (2, 3, 4, 4)), "avg_pool1d": (lambda x: F.avg_pool1d(x, 2), (2, 3, 4)),
}


@pytest.mark.parametrize("op", sorted(_LAYOUT_OPS))
@pytest.mark.parametrize("kind", [k for k, _ in _layout_inputs()])
def test_unreadable_layouts_refused_with_a_kernel_input_error(op, kind):
    """A sparse, nested or masked tensor reached NumPy's conversion, the dispatcher or the
    subclass's dispatch and failed there in their words (a TypeError "can't convert Sparse
    layout tensor to numpy", NotImplementedError "gpu_nn.activation.default", "Multiple dispatch
    failed"; a mode fuzz). Now a KernelInputError saying what the kernels take, from the
    original error; found on the error path only (the hot path pays nothing)."""
    fn, shape = _LAYOUT_OPS[op]
    x = dict(_layout_inputs())[kind](shape)
    with pytest.raises(gpu_nn.KernelInputError, match="gpu-nn's kernels take dense \\(strided\\) tensors") as e:
        fn(x)
    assert e.value.__cause__ is not None
    label = {"sparse_coo": "a sparse_coo tensor", "nested": "a nested tensor", "MaskedTensor": "a MaskedTensor"}[kind]
    assert label in str(e.value)


def test_plain_errors_are_not_relabelled_as_layouts():
    """The error path's layout test changes nothing for a dense tensor: an error raised inside the
    routed call that is not a KernelInputError (forward over forward AD, refused with a
    NotImplementedError) reaches the caller as it was, and so does an op's own KernelInputError
    (a wrong-length weight)."""
    x, t = torch.randn(4), torch.randn(4)
    with pytest.raises(NotImplementedError, match="forward-mode AD over forward-mode AD") as e:
        torch.func.jvp(lambda u: torch.func.jvp(F.relu, (u,), (t,))[1], (x,), (t,))
    assert not isinstance(e.value, gpu_nn.KernelInputError)
    with pytest.raises(gpu_nn.KernelInputError, match="mat1 and mat2 shapes cannot be multiplied"):
        F.linear(torch.randn(2, 3), torch.randn(4, 5))
