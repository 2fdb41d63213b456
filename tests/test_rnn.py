"""Recurrent family: modules and ops against torch.nn in float64 (outputs, final states, the
input gradient and every parameter gradient), finite differences of the reference backward,
opcheck on every op, state_dict interchange, dropout, bad input, and every backend against the
reference."""

import contextlib
import copy

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gpu_nn
import gpu_nn.functional as F
from gpu_nn import nn as gnn
from gpu_nn.ops import rnn as ops
from gpu_nn.reference import rnn as ref
from helpers import (EPS, INTERP_DTYPES, assert_close, backend_dtype_params, backend_params, concurrent_programs,
                     gpu_dtypes_for, interpreted_launches, latin_cover, max_rel_err, randn)

MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")
MODULES = {
    "rnn_tanh": (gnn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (gnn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (gnn.LSTM, torch.nn.LSTM, {}),
    "gru": (gnn.GRU, torch.nn.GRU, {}),
}
CELLS = {
    "rnn_tanh": (gnn.RNNCell, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (gnn.RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
    "lstm": (gnn.LSTMCell, torch.nn.LSTMCell, {}),
    "gru": (gnn.GRUCell, torch.nn.GRUCell, {}),
}


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 results are compared at float32 tolerances: TF32 off. torch's default
    (``torch.backends.cudnn.allow_tf32`` on) sends the Triton path's float32 dots to TF32 on a
    GPU, as it does cuDNN's; the TF32 tests below turn it on themselves."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _pair(mode, I, H, dtype=torch.float64, **kw):
    ours_cls, theirs_cls, extra = MODULES[mode]
    theirs = theirs_cls(I, H, **extra, **kw).to(dtype)
    ours = ours_cls(I, H, **extra, **kw).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _run(module, x, hx, go, ghs):
    """Forward, then backward of sum(out * go) + sum(h_n * gh): returns outputs, grads of x / hx / params."""
    out, hn = module(x, hx)
    hs = hn if isinstance(hn, tuple) else (hn,)
    out_t = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = (out_t * go).sum() + sum((h * g).sum() for h, g in zip(hs, ghs))
    leaves = [t for t in ([x if isinstance(x, torch.Tensor) else x.data] + list(hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()))]
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, leaves + params)
    return [out_t, *hs], list(grads)


def _compare(mode, rng, T, B, I, H, L, bi, batch_first, bias, init, packed=None, unbatched=False, proj=0):
    kw = {"proj_size": proj} if proj else {}
    ours, theirs = _pair(mode, I, H, num_layers=L, bidirectional=bi, batch_first=batch_first, bias=bias, **kw)
    D = 2 if bi else 1
    shape = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    x = randn(rng, *shape, requires_grad=True)
    hshape = (L * D, H) if unbatched else (L * D, B, H)
    pshape = hshape[:-1] + (proj or H,)  # a projected LSTM's h is proj_size wide
    hx = None
    if init:
        hx = randn(rng, *pshape, requires_grad=True)
        if mode == "lstm":
            hx = (hx, randn(rng, *hshape, requires_grad=True))
    results = []
    for m in (ours, theirs):
        xin = x
        if packed is not None:
            lengths, enforce = packed
            xin = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=enforce)
        results.append((m, xin))
    with gpu_nn.backend("reference"):
        out_o, hn_o = ours(results[0][1], hx)
    out_t, hn_t = theirs(results[1][1], hx)
    if packed is not None:
        assert isinstance(out_o, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(out_o.batch_sizes, out_t.batch_sizes)
        for a, b in ((out_o.sorted_indices, out_t.sorted_indices), (out_o.unsorted_indices, out_t.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        out_o, out_t = out_o.data, out_t.data
    hs_o = hn_o if isinstance(hn_o, tuple) else (hn_o,)
    hs_t = hn_t if isinstance(hn_t, tuple) else (hn_t,)
    go = randn(rng, *out_t.shape)
    ghs = [randn(rng, *h.shape) for h in hs_t]
    leaves = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
    worst = 0.0

    def grads(m, out, hs):
        loss = (out * go).sum() + sum((h * g).sum() for h, g in zip(hs, ghs))
        return torch.autograd.grad(loss, leaves + list(m.parameters()))

    with gpu_nn.backend("reference"):
        g_o = grads(ours, out_o, hs_o)
    g_t = grads(theirs, out_t, hs_t)
    worst = max(worst, assert_close(out_o, out_t, torch.float64, k=H, what="output"))
    for a, b in zip(hs_o, hs_t):
        worst = max(worst, assert_close(a, b, torch.float64, k=H, what="final state"))
    names = ["input"] + [f"hx{i}" for i in range(len(leaves) - 1)] + [n for n, _ in theirs.named_parameters()]
    for n, a, b in zip(names, g_o, g_t):
        worst = max(worst, assert_close(a, b, torch.float64, k=T * B * H, what=f"grad {n}"))
    return worst


GRID = [
    # T, B, I, H, L, bi, batch_first, bias, init
    (5, 3, 4, 7, 1, False, False, True, False),
    (4, 2, 5, 6, 2, True, True, True, True),
    (3, 3, 3, 5, 3, False, False, False, True),
    (3, 2, 4, 5, 3, True, False, True, False),
    (1, 1, 2, 3, 2, True, True, False, True),  # T = 1, batch 1
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cfg", GRID, ids=lambda c: "T{}B{}I{}H{}L{}{}{}{}{}".format(
    *c[:5], "bi" if c[5] else "", "bf" if c[6] else "", "" if c[7] else "nobias", "h0" if c[8] else ""))
def test_module_matches_torch_float64(mode, cfg, rng):
    _compare(mode, rng, *cfg)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bi,L,batch_first", [(True, 2, False), (False, 1, True)])
def test_packed_matches_torch_float64(mode, enforce_sorted, bi, L, batch_first, rng):
    lengths = [5, 4, 2, 1] if enforce_sorted else [2, 5, 1, 4]
    _compare(mode, rng, 5, 4, 3, 6, L, bi, batch_first, True, True, packed=(lengths, enforce_sorted))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("init", [False, True])
def test_unbatched_matches_torch_float64(mode, init, rng):
    _compare(mode, rng, 4, 1, 3, 5, 2, True, False, True, init, unbatched=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, None), (1, None), (None, None)], ids=["B3", "B1", "unbatched"])
@pytest.mark.parametrize("init", [False, True])
def test_cell_matches_torch_float64(mode, bias, shape, init, rng):
    ours_cls, theirs_cls, extra = CELLS[mode]
    I, H = 4, 7
    theirs = theirs_cls(I, H, bias=bias, **extra).double()
    ours = ours_cls(I, H, bias=bias, **extra).double()
    ours.load_state_dict(theirs.state_dict())
    B = shape[0]
    bs = () if B is None else (B,)
    x = randn(rng, *bs, I, requires_grad=True)
    hx = None
    leaves = [x]
    if init:
        hx = randn(rng, *bs, H, requires_grad=True)
        leaves.append(hx)
        if mode == "lstm":
            c = randn(rng, *bs, H, requires_grad=True)
            hx = (hx, c)
            leaves.append(c)
    outs = []
    for m, be in ((ours, "reference"), (theirs, None)):
        with gpu_nn.backend(be or "auto"):
            o = m(x, hx)
            o = o if isinstance(o, tuple) else (o,)
            gs = [randn(np.random.default_rng(1), *t.shape) for t in o]
            g = torch.autograd.grad(sum((a * b).sum() for a, b in zip(o, gs)), leaves + list(m.parameters()))
        outs.append((o, g))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert_close(a, b, torch.float64, k=H, what="cell output")
    for a, b in zip(outs[0][1], outs[1][1]):
        assert_close(a, b, torch.float64, k=H, what="cell grad")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["b_ih", "b_hh"])
def test_functional_cell_with_one_bias_as_torch(mode, which, rng):
    """torch's functional cells (torch.rnn_tanh_cell, ...) take either bias alone (its linear
    with a None bias); ours refused ('give both b_ih and b_hh or neither'). Values and the
    gradients of every argument, the given bias included, against torch in float64."""
    G, I, H = ops.GATES[mode] * 5, 3, 5
    args = [randn(rng, 2, I), randn(rng, 2, H), randn(rng, G, I), randn(rng, G, H), randn(rng, G)]
    theirs_fn = {"rnn_tanh": torch.rnn_tanh_cell, "rnn_relu": torch.rnn_relu_cell, "gru": torch.gru_cell,
                 "lstm": torch.lstm_cell}[mode]
    got = []
    for fn in (ops.CELL_FUNCS[mode], theirs_fn):
        x, h, w_ih, w_hh, b = leaves = [t.clone().requires_grad_() for t in args]
        biases = (b, None) if which == "b_ih" else (None, b)
        with gpu_nn.backend("reference"):
            out = fn(x, (h, h * 0.5), w_ih, w_hh, *biases) if mode == "lstm" else fn(x, h, w_ih, w_hh, *biases)
            out = out if isinstance(out, tuple) else (out,)
            grads = torch.autograd.grad([o.sum() for o in out], leaves)
        got.append([o.detach() for o in out] + list(grads))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_functional_cell_biases_as_torch_broadcasts_them(mode, rng):
    """torch's functional cells broadcast each bias to [batch, G] (its linears' addmm): a bias the
    same for every row in any shape torch takes (0-d, [1], [1, G], [1, 1]) runs as its [G] (values
    and gradients, the bias's own shape, against torch in float64); a bias of another size gets
    torch's words, whichever torch names first (the hidden one, the input one in a GRU); a bias
    that differs from row to row ([B, G], [B, 1]), which torch takes, our refusal that says so.
    Ours said 'bias of shape [5], expected [4]' for every one of these."""
    G, I, H, B = ops.GATES[mode] * 4, 3, 4, 2
    theirs_fn = {"rnn_tanh": torch.rnn_tanh_cell, "rnn_relu": torch.rnn_relu_cell, "gru": torch.gru_cell,
                 "lstm": torch.lstm_cell}[mode]
    args = [randn(rng, B, I), randn(rng, B, H), randn(rng, G, I), randn(rng, G, H)]

    def run(fn, b_ih, b_hh):
        x, h, w_ih, w_hh = args
        with gpu_nn.backend("reference"):
            out = fn(x, (h, h * 0.5), w_ih, w_hh, b_ih, b_hh) if mode == "lstm" else fn(x, h, w_ih, w_hh, b_ih, b_hh)
        return out if isinstance(out, tuple) else (out,)

    for shapes in [((), (G,)), ((1,), (G,)), ((G,), (1,)), ((1, G), (1, 1)), ((1, 1), ())]:
        got, given = [], [torch.from_numpy(rng.standard_normal(s)) for s in shapes]
        for fn in (ops.CELL_FUNCS[mode], theirs_fn):
            biases = [b.clone().requires_grad_() for b in given]
            out = run(fn, *biases)
            got.append([o.detach() for o in out] + list(torch.autograd.grad([o.sum() for o in out], biases)))
        for a, b in zip(*got):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for shapes in [((G + 1,), (G,)), ((G,), (G + 1,)), ((G + 1,), (G + 2,)), ((G // 2,), (G,)), ((3, G), (G,)),
                   ((1, 1, G), (G,))]:
        biases = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        want = _torch_msg(lambda: run(theirs_fn, *biases))
        with pytest.raises(gpu_nn.KernelInputError) as info:
            run(ops.CELL_FUNCS[mode], *biases)
        assert str(info.value) == want
    for shapes in [((B, G), (G,)), ((G,), (B, 1))]:
        biases = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        run(theirs_fn, *biases)  # torch takes it
        with pytest.raises(gpu_nn.KernelInputError, match="take one bias for every row"):
            run(ops.CELL_FUNCS[mode], *biases)


# ----------------------------------------------------------------------------------------------
# finite differences of the reference backward


@pytest.mark.parametrize("mode", MODES)
def test_reference_cell_gradcheck(mode, rng):
    I, H, B = 3, 4, 2
    G = ops.GATES[mode] * H
    x, h = randn(rng, B, I, requires_grad=True), randn(rng, B, H, requires_grad=True)
    ws = [randn(rng, G, I, requires_grad=True), randn(rng, G, H, requires_grad=True), randn(rng, G, requires_grad=True),
          randn(rng, G, requires_grad=True)]
    with gpu_nn.backend("reference"):
        if mode == "lstm":
            c = randn(rng, B, H, requires_grad=True)
            assert torch.autograd.gradcheck(lambda x, h, c, *w: F.lstm_cell(x, (h, c), *w), (x, h, c, *ws))
        else:
            assert torch.autograd.gradcheck(ops.CELL_FUNCS[mode], (x, h, *ws))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,I,H", [(3, 5, 7), (1, 2, 1)])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the NaN and inf inputs, both paths alike
def test_reference_cell_path_equals_sequence_path(mode, bias, dtype, B, I, H, rng):
    """reference.rnn.cell_forward / cell_backward (the cells' path of fewer NumPy calls) give
    what rnn_forward / rnn_backward give at T = 1, bit for bit: h', c', the reserve's gate slot,
    every gradient (no gradient for c' counts as zero), with a NaN and an inf among the inputs
    (the relu cell passes the gradient where h' is NaN, as torch's threshold_backward)."""
    G = ref.GATES[mode]
    x, h, c = (rng.standard_normal(s).astype(dtype) for s in ((B, I), (B, H), (B, H)))
    x[0, 0] = np.nan
    h[-1, -1] = np.inf
    c = c if mode == "lstm" else None
    ws = [rng.standard_normal(s).astype(dtype) for s in ((G * H, I), (G * H, H), (G * H,), (G * H,))]
    if not bias:
        ws[2] = ws[3] = None
    hn, cn, gates = ref.cell_forward(mode, x, h, c, *ws)
    _, hN, cN, res = ref.rnn_forward(mode, x[None], h[None], None if c is None else c[None], [tuple(ws)], 1, False)
    want = [hN[0]] + ([cN[0]] if mode == "lstm" else [])
    if ref.STORED[mode]:
        o, s = ref.reserve_layout(mode, 1, B, H, 1, 1)[0][("gates", 0, 0)]
        want.append(res[o:o + np.prod(s)].reshape(s)[0])
    got = [hn] + ([cn] if mode == "lstm" else []) + ([gates] if ref.STORED[mode] else [])
    assert (cn is None) == (mode != "lstm") and (gates is None) == (not ref.STORED[mode])
    for grad_c in ([None, rng.standard_normal((B, H)).astype(dtype)] if mode == "lstm" else [None]):
        gh = rng.standard_normal((B, H)).astype(dtype)
        got_b = ref.cell_backward(mode, gh, grad_c, x, h, c, *ws)
        dx, dh, dc, dw = ref.rnn_backward(mode, np.zeros((1, B, H), dtype), gh[None],
                                          None if grad_c is None else grad_c[None], x[None], [tuple(ws)], res, 1, False)
        want_b = [dx[0], dh[0], None if dc is None else dc[0], *dw[0]]
        got, want = got + [g for g in got_b if g is not None], want + [g for g in want_b if g is not None]
        assert [g is None for g in got_b] == [g is None for g in want_b]
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_reference_sequence_gradcheck(mode, rng):
    args, kw = ops._make_seq(mode, T=3, B=3, I=2, H=3, L=2, bi=True, lengths=(3, 1, 2))(rng)
    x, hx, params = args[0], args[1], args[2]
    masks = torch.from_numpy(rng.uniform(0.5, 2.0, (1, 3, 3, 6)))
    hs = list(hx) if mode == "lstm" else [hx]

    def fn(x, *rest):
        h = tuple(rest[:len(hs)]) if mode == "lstm" else rest[0]
        p = list(rest[len(hs):])
        out = ops.SEQ_FUNCS[mode](x, h, p, True, 2, 0.0, True, True, False, lengths=kw["lengths"], dropout_masks=masks)
        return out

    with gpu_nn.backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, *hs, *params))


# ----------------------------------------------------------------------------------------------
# opcheck


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_sequence(mode, rng):
    args, kw = ops._make_seq(mode, T=3, B=3, I=4, H=5, L=2, bi=True, lengths=(3, 1, 2))(rng)
    x, hx, params = args[0], args[1], args[2]
    h, c = hx if mode == "lstm" else (hx, None)
    masks = torch.from_numpy(rng.uniform(0.5, 2.0, (1, 3, 3, 10)))
    torch.library.opcheck(torch.ops.gpu_nn.rnn_seq.default, (x, h, c, params, mode, 2, True, True, kw["lengths"], masks))
    out, hn, cn, res = torch.ops.gpu_nn.rnn_seq.default(x, h, c, params, mode, 2, True, True, kw["lengths"], None)
    g = [randn(rng, *t.shape) for t in (out, hn)]
    gc = randn(rng, *cn.shape) if mode == "lstm" else None
    torch.library.opcheck(torch.ops.gpu_nn.rnn_seq_backward.default,
                          (g[0], g[1], gc, x.detach(), [p.detach() for p in params], res.detach(), mode, 2, True, True, kw["lengths"], None))
    # with a mask (a data input, hx's gradient, the second layer's weights): empty [0] tensors for the rest
    mask = [False, True, False] + [i >= len(params) // 2 for i in range(len(params))]
    torch.library.opcheck(torch.ops.gpu_nn.rnn_seq_backward.default,
                          (g[0], g[1], gc, x.detach(), [p.detach() for p in params], res.detach(), mode, 2, True, True,
                           kw["lengths"], None, mask))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_recurrent_ops_called_directly_refuse_what_their_kernels_would_read_past(backend, device, mode, rng):
    """The custom ops may be called directly (torch.ops.gpu_nn.*); their kernels index by the
    weights' sizes and the batch, so a call whose other tensors disagree is refused before a
    kernel runs: the sequence backward's lengths (one entry, int32, past T), state gradients and
    dropout masks of another shape, a weight of another shape; the cell's forward and backward
    with a state or gradient of another batch, and a reserve of another size. The CUDA C loops
    read lengths[b] and every row of the state gradients for each of B rows (a helper's audit
    showed the reads past a one-entry lengths under AddressSanitizer); the autograd wrappers
    always pass the forward's own. A good call still runs."""
    E = gpu_nn.KernelInputError
    seq = torch.ops.gpu_nn.rnn_seq.default
    seq_bwd = torch.ops.gpu_nn.rnn_seq_backward.default
    args, kw = ops._make_seq(mode, T=3, B=4, I=4, H=5, L=2, bi=True, lengths=(3, 1, 2, 3))(rng)
    x, hx, params = args[0].to(device), args[1], [p.detach().to(device) for p in args[2]]
    h, c = (t.to(device) for t in hx) if mode == "lstm" else (hx.to(device), None)
    lengths = kw["lengths"]
    with gpu_nn.backend(backend):
        out, hn, cn, res = seq(x, h, c, params, mode, 2, True, True, lengths, None)
        g = [torch.randn_like(t) for t in (out, hn)]
        gc = torch.randn_like(cn) if mode == "lstm" else None

        def bwd(**change):
            a = dict(g_out=g[0], g_hn=g[1], g_cn=gc, params=params, lengths=lengths, masks=None)
            a.update(change)
            return seq_bwd(a["g_out"], a["g_hn"], a["g_cn"], x, a["params"], res, mode, 2, True, True, a["lengths"],
                           a["masks"])

        bwd()
        bwd(g_hn=g[1].new_empty(0), g_cn=None if gc is None else gc.new_empty(0))  # empty: zeros
        for what, change in (("lengths", dict(lengths=lengths[:1])), ("lengths", dict(lengths=lengths.int())),
                             ("lengths", dict(lengths=lengths + 5)), ("grad_hn", dict(g_hn=g[1][:, :1])),
                             ("dropout_masks", dict(masks=torch.ones(1, 3, 4, 9, dtype=x.dtype, device=device))),
                             ("weight of layer 1", dict(params=[*params[:-1], params[-1][:-1]]))):
            with pytest.raises(E, match=what):
                bwd(**change)
        if mode == "lstm":
            with pytest.raises(E, match="grad_cn"):
                bwd(g_cn=gc[:, :2])
        cargs, _ = ops._make_cell(mode, B=3, I=4, H=5, bias=True)(rng)
        cx_in, chx = cargs[0].to(device), cargs[1]
        ch, cc = (t.to(device) for t in chx) if mode == "lstm" else (chx.to(device), None)
        ws = [w.to(device) for w in cargs[2:]]
        cell, cell_bwd = torch.ops.gpu_nn.rnn_cell.default, torch.ops.gpu_nn.rnn_cell_backward.default
        hh, ch2, cres = cell(cx_in, ch, cc, *ws, mode)
        with pytest.raises(E, match="batch size"):
            cell(cx_in, ch[:1], cc, *ws, mode)
        gh = torch.randn_like(hh)
        gcc = torch.randn_like(ch2) if mode == "lstm" else None
        cell_bwd(gh, gcc, cx_in, ch, cc, *ws, hh, ch2, cres, mode)
        with pytest.raises(E, match="grad_h must have shape"):
            cell_bwd(gh[:1], gcc, cx_in, ch, cc, *ws, hh, ch2, cres, mode)
        with pytest.raises(E, match="reserve must be"):
            cell_bwd(gh, gcc, cx_in, ch, cc, *ws, hh, ch2, cres[:-1], mode)
        if mode == "lstm":
            with pytest.raises(E, match="grad_c must have shape"):
                cell_bwd(gh, gcc[:1], cx_in, ch, cc, *ws, hh, ch2, cres, mode)
            with pytest.raises(E, match="needs a cell state"):
                cell(cx_in, ch, None, *ws, mode)
        # the same values in other layouts: a strided reserve, expanded saved outputs; the
        # kernels read them as dense rows (the Triton backward gave NaN and values 1e12 off)
        want = bwd()
        got = seq_bwd(g[0], g[1], gc, x, params, torch.stack([res, torch.full_like(res, 1e3)], 1)[:, 0], mode, 2, True,
                      True, lengths, None)
        for a, b_ in zip([*want[:3], *want[3]], [*got[:3], *got[3]]):
            assert torch.equal(a, b_)
        wantc = cell_bwd(gh, gcc, cx_in, ch, cc, *ws, hh, ch2, cres, mode)
        spread = [torch.stack([t, torch.full_like(t, 1e6)], -1)[..., 0] for t in (hh, ch2, cres)]
        for a, b_ in zip(wantc, cell_bwd(gh, gcc, cx_in, ch, cc, *ws, *spread, mode)):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("backend,device", backend_params(("triton", "cupy")))
def test_float64_sequence_on_a_named_gpu_backend_keeps_the_fake_kernels_promise(backend, device, rng):
    """float64 layers on a GPU backend named explicitly run the kernels' float32 reserve; the op's
    fake kernel (torch.compile's memory plan) promises the float64 one the reference keeps: the
    reserve comes back float64, and the backward takes it (its float32 reserve failed
    opcheck's fake-tensor test)."""
    args, kw = ops._make_seq("lstm", T=3, B=2, I=4, H=5, L=1, bi=False, lengths=None)(rng)
    x, (h, c), params = args[0], args[1], args[2]
    x, h, c = (t.to(device) for t in (x, h, c))
    params = [p.to(device) for p in params]
    with gpu_nn.backend(backend):
        torch.library.opcheck(torch.ops.gpu_nn.rnn_seq.default, (x, h, c, params, "lstm", 1, False, True, None, None),
                              test_utils="test_faketensor")
        out, hn, cn, res = torch.ops.gpu_nn.rnn_seq.default(x, h, c, params, "lstm", 1, False, True, None, None)
        assert res.dtype == torch.float64
        g = [randn(rng, *t.shape).to(device) for t in (out, hn, cn)]
        torch.library.opcheck(torch.ops.gpu_nn.rnn_seq_backward.default,
                              (*g, x, params, res, "lstm", 1, False, True, None, None), test_utils="test_faketensor")
        got = torch.ops.gpu_nn.rnn_seq_backward.default(*g, x, params, res, "lstm", 1, False, True, None, None)
    with gpu_nn.backend("reference"):
        want = torch.ops.gpu_nn.rnn_seq_backward.default(*[t.cpu() for t in g], x.cpu(), [p.cpu() for p in params],
                                                         res.cpu(), "lstm", 1, False, True, None, None)
    for a, b in zip([*got[:3], *got[3]], [*want[:3], *want[3]]):  # (the kernels compute in float32)
        assert a.dtype == torch.float64
        assert_close(a.cpu(), b, torch.float32, k=4 * 5, what="float64 on a GPU backend vs reference")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cell(mode, bias, rng):
    args, _ = ops._make_cell(mode, B=3, I=4, H=5, bias=bias)(rng)
    x, hx = args[0], args[1]
    h, c = hx if mode == "lstm" else (hx, None)
    ws = list(args[2:]) + ([] if bias else [None, None])
    torch.library.opcheck(torch.ops.gpu_nn.rnn_cell.default, (x, h, c, *ws, mode))
    outs = [t.detach() for t in torch.ops.gpu_nn.rnn_cell.default(x, h, c, *ws, mode)]
    gh = randn(rng, *h.shape)
    # the LSTM with and without a c' gradient (None: c' did not reach the loss)
    for gc in ((randn(rng, *h.shape), None) if mode == "lstm" else (None,)):
        torch.library.opcheck(torch.ops.gpu_nn.rnn_cell_backward.default,
                              (gh, gc, x.detach(), h.detach(), None if c is None else c.detach(),
                               *[w if w is None else w.detach() for w in ws], *outs, mode))
        # with a mask (no dx, no dw_hh, one bias): empty [0] tensors for the rest
        torch.library.opcheck(torch.ops.gpu_nn.rnn_cell_backward.default,
                              (gh, gc, x.detach(), h.detach(), None if c is None else c.detach(),
                               *[w if w is None else w.detach() for w in ws], *outs, mode,
                               [False, True, True, True, False, False, True]))


# ----------------------------------------------------------------------------------------------
# state_dict, dropout, options we do not support


@pytest.mark.parametrize("mode", MODES)
def test_load_state_dict_both_ways(mode, rng):
    ours_cls, theirs_cls, extra = MODULES[mode]
    kw = dict(num_layers=2, bidirectional=True, **extra)
    theirs, ours = theirs_cls(5, 6, **kw), ours_cls(5, 6, **kw)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert "weight_hh_l1_reverse" in dict(ours.named_parameters())
    ours.load_state_dict(theirs.state_dict())
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), n
    fresh = theirs_cls(5, 6, **kw)
    fresh.load_state_dict(ours_cls(5, 6, **kw).state_dict())
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=2e-5, rtol=1e-4)
    cours_cls, ctheirs_cls, cextra = CELLS[mode]
    c_t, c_o = ctheirs_cls(5, 6, **cextra), cours_cls(5, 6, **cextra)
    c_o.load_state_dict(c_t.state_dict())
    c_t.load_state_dict(c_o.state_dict())
    assert isinstance(ours, theirs_cls) and isinstance(c_o, ctheirs_cls)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_masks_match_layer_by_layer_torch(mode, rng):
    """Dropout between layers: given masks, a 3-layer stack equals torch single layers with the
    masks applied in between."""
    T, B, I, H, L = 4, 3, 5, 6, 3
    ours, _ = _pair(mode, I, H, num_layers=L, bidirectional=True)
    x = randn(rng, T, B, I)
    masks = torch.from_numpy((rng.uniform(size=(L - 1, T, B, 2 * H)) > 0.4) / 0.6)
    fn = ops.SEQ_FUNCS[mode]
    h0 = torch.zeros(L * 2, B, H, dtype=torch.float64)
    hx = (h0, h0) if mode == "lstm" else h0
    with gpu_nn.backend("reference"):
        out = fn(x, hx, list(ours._flat_weights), True, L, 0.4, True, True, False, dropout_masks=masks)[0]
    y = x
    for l in range(L):
        _, theirs_cls, extra = MODULES[mode]
        one = theirs_cls(y.shape[-1], H, bidirectional=True, **extra).double()
        sd = {k.replace(f"_l{l}", "_l0"): v for k, v in ours.state_dict().items() if f"_l{l}" in k}
        one.load_state_dict(sd)
        y = one(y)[0]
        if l < L - 1:
            y = y * masks[l]
    assert_close(out, y, torch.float64, k=H)


def test_module_dropout_in_training_only(rng):
    torch.manual_seed(0)
    m = gnn.LSTM(4, 5, num_layers=2, dropout=0.5)
    x = torch.randn(6, 3, 4)
    m.eval()
    a, b = m(x)[0], m(x)[0]
    assert torch.equal(a, b)
    m.train()
    c, d = m(x)[0], m(x)[0]
    assert not torch.equal(c, d) and not torch.equal(a, c)
    torch.manual_seed(7)
    e = m(x)[0]
    torch.manual_seed(7)
    assert torch.equal(e, m(x)[0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True])
def test_training_dropout_same_seed_as_torch(mode, packed, rng):
    """Dropout between the layers in training, the same seed: torch's masks and torch's generator
    state after the forward (the next draw), on the CPU where torch draws them (its cuDNN layers
    draw their own). A packed input draws over the packed rows, as torch's layers draw over the
    packed data (ours drew a padded batch's: other masks, the generator left elsewhere; an audit)."""
    torch.manual_seed(int(rng.integers(1 << 30)))
    T, B, L = 5, 4, 3
    ours, theirs = _pair(mode, 3, 4, num_layers=L, bidirectional=True, dropout=0.4)
    x = randn(rng, T, B, 3)
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 2, 4, 1], enforce_sorted=False)
    got = []
    for m in (ours, theirs):
        torch.manual_seed(7)
        with gpu_nn.backend("reference"):
            out = m(x)[0]
        got.append(((out.data if packed else out), torch.rand(3)))
    assert_close(got[0][0], got[1][0], torch.float64, k=4)
    assert torch.equal(got[0][1], got[1][1])


def test_packed_dropout_masks_need_no_data_dependent_op_on_the_device():
    """The masks of a packed input are placed on the device without a boolean index there (on
    CUDA a nonzero() and its host synchronisation, refused in a CUDA graph's capture): drawn for
    a meta-device layer, no op gets a boolean tensor off the CPU; on the CPU they are the packed
    rows' draws in time-major order, zero past each length."""
    from torch.utils._pytree import tree_leaves
    from torch.utils._python_dispatch import TorchDispatchMode

    class BoolOnDevice(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.bool and a.device.type != "cpu"
                   for a in tree_leaves((args, kwargs))):
                self.seen.append(func)
            return func(*args, **(kwargs or {}))

    lengths = torch.tensor([5, 2, 4, 1])
    with BoolOnDevice(), torch.device("meta"):  # (a default device elsewhere too: lengths stay on the CPU)
        masks = ops.draw_dropout_masks(0.4, 3, 5, 4, 6, torch.empty(0), lengths)
    assert masks.device.type == "meta" and masks.shape == (2, 5, 4, 6)
    assert BoolOnDevice.seen == []  # the old boolean index_put_ on the device appeared here
    from gpu_nn.nn.rnn import _unpacked

    with torch.device("meta"):  # forward-mode's unpacking: its places found beside batch_sizes
        x, _, places = _unpacked(torch.empty(12, 3), torch.tensor([4, 3, 3, 2], device="cpu"))
    assert x.shape == (4, 4, 3) and places[0].device.type == "meta"
    torch.manual_seed(3)
    got = ops.draw_dropout_masks(0.4, 3, 5, 4, 6, torch.empty(0, dtype=torch.float64), lengths)
    torch.manual_seed(3)
    keep = torch.empty((2, int(lengths.sum()), 6), dtype=torch.float64).bernoulli_(0.6).div_(0.6)
    live = torch.arange(5)[:, None] < lengths[None, :]
    assert torch.equal(got[:, live], keep) and not got[:, ~live].any()


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_weights_past_the_kernels_int32_index_refused_on_triton(backend, device, monkeypatch):
    """The Triton recurrent step kernels index W_hh's rows and columns in int32 (an LSTM's wraps
    from hidden size 23171): a layer or cell whose W_hh passes WEIGHT_INDEX_MAX elements is
    refused there with a KernelInputError before any kernel runs (the bound lowered here: an
    LSTM of H = 3 has a 12 x 3 W_hh; its W_ih, through the int64 matmul, is not bounded); at the
    bound it runs, and the reference takes any size. Likewise a row count (steps x batch, a
    cell's batch) or an input width in ROWS_WRAP, where the matmul's int32 loops wrap."""
    from gpu_nn._errors import KernelInputError

    x = torch.randn(2, 1, 5, device=device)
    for layers in (1, 2):
        m = gnn.LSTM(5, 3, num_layers=layers, bidirectional=True).to(device)
        monkeypatch.setattr(ops, "WEIGHT_INDEX_MAX", 12 * 3 - 1)
        with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="a 12 x 3 weight"), \
                interpreted_launches(device) as names:
            m(x)
        assert names == []
        with gpu_nn.backend("reference"):
            m(x)
        monkeypatch.setattr(ops, "WEIGHT_INDEX_MAX", 12 * 3)  # W_ih's 12 x 5 and 12 x 6 pass it
        with gpu_nn.backend(backend):
            m(x)
    cell = gnn.LSTMCell(5, 3).to(device)
    monkeypatch.setattr(ops, "WEIGHT_INDEX_MAX", 12 * 3 - 1)
    with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="a 12 x 3 weight"):
        cell(x[0])
    monkeypatch.undo()
    monkeypatch.setattr(ops, "ROWS_WRAP", (3, 5))
    xs = torch.randn(2, 2, 5, device=device)
    with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="4 rows"):
        m(xs)
    with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="3 rows"):
        cell(torch.randn(3, 5, device=device))
    monkeypatch.setattr(ops, "ROWS_WRAP", (5, 6))  # the input width, 5
    with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="5 input features"):
        m(x)
    with gpu_nn.backend(backend), pytest.raises(KernelInputError, match="5 input features"):
        cell(x[0])
    monkeypatch.setattr(ops, "ROWS_WRAP", (3, 5))
    with gpu_nn.backend(backend):
        m(x), cell(xs[0]), m(torch.randn(5, 1, 5, device=device))  # 2, 2 and 5 rows
    with gpu_nn.backend("reference"):
        m(xs)


def test_sequence_ops_refuse_bad_states_in_torchs_classes_and_words():
    """The functional sequence ops (torch.gru / lstm / rnn_tanh's signature): a state that is not a
    tensor is a TypeError (gru(x, None, ...) reached an AttributeError), an LSTM pair with a
    non-tensor is torch's parser words, and a state or weight of another dtype than the input is
    told as torch's CUDA layers tell it (ours blamed the input: "input must have the type
    torch.float64, got type torch.float32")."""
    T, B, I, H = 5, 3, 4, 6
    x = torch.randn(T, B, I)
    h = torch.zeros(1, B, H)
    gp = list(torch.nn.GRU(I, H).parameters())
    lp = list(torch.nn.LSTM(I, H).parameters())
    for bad in (None, [h], h.numpy()):
        with pytest.raises(TypeError):
            torch.gru(x, bad, gp, True, 1, 0.0, False, False, False)
        with pytest.raises(gpu_nn.KernelInputError, match=r"gru\(\): argument 'hx' \(position 2\) must be Tensor") as e:
            F.gru(x, bad, gp, True, 1, 0.0, False, False, False)
        assert isinstance(e.value, TypeError)
    with pytest.raises(TypeError) as theirs:
        torch.lstm(x, (h, None), lp, True, 1, 0.0, False, False, False)
    with pytest.raises(gpu_nn.KernelInputError) as ours:
        F.lstm(x, (h, None), lp, True, 1, 0.0, False, False, False)
    assert isinstance(ours.value, TypeError) and str(ours.value) == str(theirs.value)
    with pytest.raises(gpu_nn.KernelInputError, match="^Input and hidden tensors are not the same dtype, found input "
                                                      "tensor with Float and hidden tensor with Double$"):
        F.lstm(x, (h.double(), h.double()), lp, True, 1, 0.0, False, False, False)
    with pytest.raises(gpu_nn.KernelInputError, match="^Input and parameter tensors are not the same dtype, found input "
                                                      "tensor with Double and parameter tensor with Float$"):
        F.gru(x.double(), h.double(), gp, True, 1, 0.0, False, False, False)


@pytest.mark.parametrize("p", [2.0, -0.5, float("nan"), 1.0, 0.25])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_dropout_outside_0_1_refused_where_torch_applies_it(mode, p):
    """A dropout probability set after construction (the constructor checks its own) is torch's
    RuntimeError, same words, where the layers apply it (training, two layers or more), before
    any output; elsewhere it is never read, as torch's."""
    x = torch.randn(5, 3, 4)
    for layers, train in ((2, True), (2, False), (1, True)):
        got = {}
        for lib in (torch.nn, gnn):
            m = getattr(lib, mode)(4, 6, num_layers=layers)
            m.dropout = p
            m.train(train)
            try:
                m(x)
                got[lib] = None
            except RuntimeError as exc:
                got[lib] = str(exc)
        assert got[gnn] == got[torch.nn], (layers, train, got)
        if layers == 2 and train and not 0 <= p <= 1:
            assert got[gnn].startswith("dropout probability has to be between 0 and 1, but got ")


# ----------------------------------------------------------------------------------------------
# LSTM projections (proj_size): h' = (o * tanh(c')) W_hr^T, h proj_size wide, c hidden_size wide

PROJ_GRID = [
    # T, B, I, H, L, bi, batch_first, bias, init
    (4, 3, 5, 7, 1, False, False, True, False),
    (4, 3, 5, 7, 2, True, False, True, True),
    (3, 2, 4, 6, 2, False, True, False, True),
    (1, 1, 2, 5, 2, True, True, True, False),
]


@pytest.mark.parametrize("proj", [3, 1])
@pytest.mark.parametrize("cfg", PROJ_GRID, ids=lambda c: "T{}B{}I{}H{}L{}{}{}{}{}".format(
    *c[:5], "bi" if c[5] else "", "bf" if c[6] else "", "" if c[7] else "nobias", "h0" if c[8] else ""))
def test_proj_module_matches_torch_float64(cfg, proj, rng):
    """Outputs, h_n [L * D, B, P], c_n [L * D, B, H] and every gradient (weight_hr_l{k} included)."""
    _compare("lstm", rng, *cfg, proj=proj)


@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bi,L,init", [(True, 2, True), (False, 2, False), (True, 1, False)])
def test_proj_packed_matches_torch_float64(enforce_sorted, bi, L, init, rng):
    lengths = [4, 3, 2] if enforce_sorted else [2, 4, 1]
    _compare("lstm", rng, 4, 3, 5, 7, L, bi, False, True, init, packed=(lengths, enforce_sorted), proj=3)


@pytest.mark.parametrize("init", [False, True])
def test_proj_unbatched_matches_torch_float64(init, rng):
    _compare("lstm", rng, 4, 1, 5, 7, 2, True, False, True, init, unbatched=True, proj=3)


def test_proj_functional_matches_torch_lstm(rng):
    """gpu_nn.functional.lstm with w_hr in params (torch's flat order) equals torch.lstm."""
    T, B, I, H, P, L = 4, 3, 5, 7, 3, 2
    m = torch.nn.LSTM(I, H, num_layers=L, bidirectional=True, proj_size=P).double()
    x = randn(rng, T, B, I)
    h0, c0 = randn(rng, 2 * L, B, P), randn(rng, 2 * L, B, H)
    want = torch.lstm(x, (h0, c0), m._flat_weights, True, L, 0.0, False, True, False)
    with gpu_nn.backend("reference"):
        got = F.lstm(x, (h0, c0), list(m._flat_weights), True, L, 0.0, False, True, False)
    assert [tuple(t.shape) for t in got] == [(T, B, 2 * P), (2 * L, B, P), (2 * L, B, H)]
    for a, b in zip(got, want):
        assert_close(a, b, torch.float64, k=H)


def test_proj_reference_gradcheck(rng):
    """Finite differences of the reference backward with projections, lengths and dropout masks."""
    args, kw = ops._make_seq("lstm", T=3, B=3, I=2, H=4, L=2, bi=True, lengths=(3, 1, 2), P=2)(rng)
    x, (h0, c0), params = args[0], args[1], args[2]
    masks = torch.from_numpy(rng.uniform(0.5, 2.0, (1, 3, 3, 4)))

    def fn(x, h0, c0, *p):
        return F.lstm(x, (h0, c0), list(p), True, 2, 0.0, True, True, False, lengths=kw["lengths"], dropout_masks=masks)

    with gpu_nn.backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


def test_proj_opcheck_sequence(rng):
    args, kw = ops._make_seq("lstm", T=3, B=3, I=4, H=5, L=2, bi=True, lengths=(3, 1, 2), P=2)(rng)
    x, (h, c), params = args[0], args[1], args[2]
    masks = torch.from_numpy(rng.uniform(0.5, 2.0, (1, 3, 3, 4)))
    torch.library.opcheck(torch.ops.gpu_nn.rnn_seq.default, (x, h, c, params, "lstm", 2, True, True, kw["lengths"], masks))
    out, hn, cn, res = torch.ops.gpu_nn.rnn_seq.default(x, h, c, params, "lstm", 2, True, True, kw["lengths"], None)
    assert hn.shape == (4, 3, 2) and cn.shape == (4, 3, 5) and out.shape == (3, 3, 4)
    g = [randn(rng, *t.shape) for t in (out, hn, cn)]
    torch.library.opcheck(torch.ops.gpu_nn.rnn_seq_backward.default,
                          (*g, x.detach(), [p.detach() for p in params], res.detach(), "lstm", 2, True, True,
                           kw["lengths"], None))


@pytest.mark.parametrize("bias", [True, False])
def test_proj_state_dict_round_trip(bias, rng):
    kw = dict(num_layers=2, bidirectional=True, proj_size=3, bias=bias)
    theirs, ours = torch.nn.LSTM(5, 7, **kw), gnn.LSTM(5, 7, **kw)
    names = [(n, tuple(p.shape)) for n, p in theirs.named_parameters()]
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == names
    assert ("weight_hr_l1_reverse", (3, 7)) in names and ("weight_hh_l1", (28, 3)) in names
    assert ("weight_ih_l1", (28, 6)) in names
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 2, 5)
    with gpu_nn.backend("reference"):
        got = ours(x)
    want = theirs(x)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    fresh = torch.nn.LSTM(5, 7, **kw)
    fresh.load_state_dict(gnn.LSTM(5, 7, **kw).state_dict())
    with gpu_nn.backend("reference"):
        fresh_ours = gnn.LSTM(5, 7, **kw)
        fresh_ours.load_state_dict(fresh.state_dict())
        torch.testing.assert_close(fresh_ours(x)[0], fresh(x)[0], atol=2e-5, rtol=1e-4)


def test_proj_bad_state_torch_wording():
    ours, theirs = _pair("lstm", 5, 7, dtype=torch.float32, num_layers=2, proj_size=3)
    x = torch.randn(4, 2, 5)
    for hx in [(torch.zeros(2, 2, 7), torch.zeros(2, 2, 7)),  # h hidden_size wide instead of proj_size
               (torch.zeros(2, 2, 3), torch.zeros(2, 2, 3))]:  # c proj_size wide instead of hidden_size
        want = _torch_msg(lambda: theirs(x, hx))
        with pytest.raises(gpu_nn.KernelInputError) as info:
            ours(x, hx)
        assert str(info.value) == want


# ----------------------------------------------------------------------------------------------
# devices, empty batches, the LSTM cell's state argument (issue 19)


def _meta(*shape):
    return torch.zeros(*shape, device="meta")


def _seq_device_cases(mode):
    """(description, ours(), theirs()) calls where a state or the parameters sit on the meta device."""
    ours, theirs = _pair(mode, 4, 5, dtype=torch.float32)
    x = torch.randn(3, 2, 4)
    lstm = mode == "lstm"
    if lstm:
        hxs = [("h0 and c0", (_meta(1, 2, 5), _meta(1, 2, 5))), ("c0", (torch.zeros(1, 2, 5), _meta(1, 2, 5))),
               ("h0", (_meta(1, 2, 5), torch.zeros(1, 2, 5)))]
    else:
        hxs = [("h0", _meta(1, 2, 5))]
    cases = [(f"module, {d} on meta", lambda hx=hx: ours(x, hx), lambda hx=hx: theirs(x, hx)) for d, hx in hxs]
    fn, tfn = ops.SEQ_FUNCS[mode], getattr(torch, mode)
    for d, hx in hxs:
        cases.append((f"functional, {d} on meta", lambda hx=hx: fn(x, hx, list(ours._flat_weights), True, 1, 0.0, False,
                                                                    False, False),
                      lambda hx=hx: tfn(x, hx, list(theirs._flat_weights), True, 1, 0.0, False, False, False)))
    ours_m, theirs_m = _pair(mode, 4, 5, dtype=torch.float32)
    ours_m.to("meta")
    theirs_m.to("meta")
    cases.append(("module on meta, CPU input", lambda: ours_m(x), lambda: theirs_m(x)))
    return cases


@pytest.mark.parametrize("mode", MODES)
def test_state_or_weights_on_another_device_raise_torch_wording(mode):
    """A meta state used to reach the custom op's fake kernel and come back as uninitialised memory."""
    for what, ours_fn, theirs_fn in _seq_device_cases(mode):
        want = _torch_msg(theirs_fn)
        assert "not at the same device" in want, what
        with pytest.raises(gpu_nn.KernelInputError) as info:
            ours_fn()
        assert want in str(info.value), what


@pytest.mark.parametrize("mode", MODES)
def test_cell_state_or_weights_on_another_device_raise_torch_wording(mode):
    ours_cls, theirs_cls, extra = CELLS[mode]
    theirs, ours = theirs_cls(4, 5, **extra), ours_cls(4, 5, **extra)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4)
    lstm = mode == "lstm"
    hxs = [(_meta(2, 5), _meta(2, 5)), (torch.zeros(2, 5), _meta(2, 5))] if lstm else [_meta(2, 5)]
    calls = [(lambda hx=hx: ours(x, hx), lambda hx=hx: theirs(x, hx)) for hx in hxs]
    theirs_m, ours_m = theirs_cls(4, 5, **extra).to("meta"), ours_cls(4, 5, **extra).to("meta")
    calls.append((lambda: ours_m(x), lambda: theirs_m(x)))
    for ours_fn, theirs_fn in calls:
        want = _torch_msg(theirs_fn)
        with pytest.raises(gpu_nn.KernelInputError) as info:
            ours_fn()
        assert want in str(info.value)
        assert "not at the same device" in str(info.value)


def _empty_batch_cases():
    return [
        # mode, module kwargs, input shape, with initial state
        ("lstm", dict(), (3, 0, 4), False),
        ("lstm", dict(num_layers=2, bidirectional=True), (3, 0, 4), True),
        ("lstm", dict(proj_size=2, batch_first=True), (0, 3, 4), False),
        ("gru", dict(num_layers=2), (3, 0, 4), True),
        ("rnn_tanh", dict(bidirectional=True), (3, 0, 4), False),
        ("rnn_relu", dict(batch_first=True), (0, 2, 4), True),
    ]


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("case", _empty_batch_cases(), ids=lambda c: f"{c[0]}-{c[2]}-{'h0' if c[3] else ''}")
def test_empty_batch_returns_what_torch_returns(backend, device, case):
    """Shapes as torch's (on the CPU: only shapes are compared) and zero parameter gradients, ours
    on the backend's device."""
    mode, kw, shape, init = case
    ours, theirs = _pair(mode, 4, 5, dtype=torch.float32, **kw)
    ours.to(device)
    x = torch.randn(*shape, requires_grad=True)
    L, D = ours.num_layers, 2 if ours.bidirectional else 1
    B = 0
    hx = None
    if init:
        P = kw.get("proj_size", 0) or 5
        hx = torch.zeros(L * D, B, P) if mode != "lstm" else (torch.zeros(L * D, B, P), torch.zeros(L * D, B, 5))
    want = theirs(x, hx)
    x = x.detach().to(device).requires_grad_()
    hx = None if hx is None else tuple(h.to(device) for h in hx) if mode == "lstm" else hx.to(device)
    with gpu_nn.backend(backend):
        got = ours(x, hx)
    flat = lambda r: [r[0], *(r[1] if isinstance(r[1], tuple) else (r[1],))]  # noqa: E731
    assert [t.shape for t in flat(got)] == [t.shape for t in flat(want)]
    with gpu_nn.backend(backend):
        grads = torch.autograd.grad(got[0].sum(), [x, *ours.parameters()], allow_unused=True)
    assert grads[0].shape == x.shape
    for g, p in zip(grads[1:], ours.parameters()):
        assert g is not None and g.shape == p.shape and not g.any()


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton")))
@pytest.mark.parametrize("mode", MODES)
def test_cell_empty_batch_returns_what_torch_returns(backend, device, mode):
    ours_cls, theirs_cls, extra = CELLS[mode]
    theirs, ours = theirs_cls(4, 5, **extra), ours_cls(4, 5, **extra)
    ours.load_state_dict(theirs.state_dict())
    ours.to(device)
    x = torch.randn(0, 4)
    want = theirs(x)
    with gpu_nn.backend(backend):
        got = ours(x.to(device))
    got, want = (got, want) if mode == "lstm" else ((got,), (want,))
    assert [t.shape for t in got] == [t.shape for t in want]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,kw", [((0, 2, 4), {}), ((0, 4), {}), ((2, 0, 4), {"batch_first": True})])
def test_empty_sequence_raises_torch_wording(mode, shape, kw):
    ours, theirs = _pair(mode, 4, 5, dtype=torch.float32, **kw)
    x = torch.randn(*shape)
    want = _torch_msg(lambda: theirs(x))
    assert "Expected sequence length to be larger than 0" in want
    with pytest.raises(gpu_nn.KernelInputError) as info:
        ours(x)
    assert want in str(info.value)
    hx = torch.zeros(1, shape[1] if len(shape) == 3 and not kw else 2, 5)
    with pytest.raises(gpu_nn.KernelInputError, match="Expected sequence length to be larger than 0"):
        ops.SEQ_FUNCS[mode](torch.randn(0, 2, 4), (hx, hx) if mode == "lstm" else hx, list(ours._flat_weights))


def _torch_exc(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- the type is what we compare
        return exc
    raise AssertionError("torch accepted the bad input")


@pytest.mark.parametrize("x_shape,hx", [
    ((2, 4), torch.zeros(2, 5)),  # one [B, H] tensor: would unpack into two rows
    ((2, 4), torch.zeros(2, 2, 5)),  # one [2, B, H] tensor: would unpack into (h, c)
    ((2, 4), [torch.zeros(2, 5)]),  # one state
    ((2, 4), [torch.zeros(2, 5)] * 3),  # three states
    ((4,), torch.zeros(2, 2, 5)),  # unbatched input: torch indexes the tensor, then finds h 2-D
], ids=["2d-tensor", "3d-tensor", "one", "three", "unbatched-3d"])
def test_lstm_cell_state_not_a_pair_fails_as_torch(x_shape, hx):
    theirs = torch.nn.LSTMCell(4, 5)
    ours = gnn.LSTMCell(4, 5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(*x_shape)
    want = _torch_exc(lambda: theirs(x, hx))
    with pytest.raises(type(want)) as info:
        ours(x, hx)
    assert isinstance(info.value, gpu_nn.KernelInputError)
    assert str(want) in str(info.value)
    if isinstance(hx, torch.Tensor) and len(x_shape) == 2:
        with pytest.raises(TypeError, match="must be tuple of Tensors"):
            F.lstm_cell(x, hx, ours.weight_ih, ours.weight_hh)


@pytest.mark.parametrize("x_shape,hx", [
    ((5, 3, 4), torch.zeros(1, 3, 5)),  # GRU's state given to an LSTM: torch's hx[1] is out of range
    ((5, 3, 4), torch.zeros(0, 3, 5)),  # hx[0] out of range
    ((5, 3, 4), torch.tensor(1.0)),  # a 0-d tensor cannot be indexed
    ((5, 3, 4), torch.zeros(2, 3, 5)),  # hx[0], hx[1] are 2-D: torch's rank message for (2-D, 2-D)
    ((5, 4), torch.zeros(1, 5)),  # unbatched
], ids=["1-layer", "0-layer", "0-d", "2-layer", "unbatched"])
def test_lstm_state_a_single_tensor_fails_as_torch(x_shape, hx):
    """nn.LSTM given one tensor as its state: torch indexes it as (h, c) = (hx[0], hx[1]), so the
    error is its IndexError (or its rank message); ours the same type (a KernelInputError too)
    and words (was a KernelInputError counting the tensor's rows as states)."""
    theirs = torch.nn.LSTM(4, 5)
    ours = gnn.LSTM(4, 5)
    x = torch.randn(*x_shape)
    want = _torch_exc(lambda: theirs(x, hx))
    with pytest.raises(type(want)) as info:
        ours(x, hx)
    assert isinstance(info.value, gpu_nn.KernelInputError) and str(info.value) == str(want)


# ----------------------------------------------------------------------------------------------
# bad input


def _torch_msg(fn):
    try:
        fn()
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    raise AssertionError("torch accepted the bad input")


@pytest.mark.parametrize("mode", MODES)
def test_bad_input_torch_wording(mode):
    ours, theirs = _pair(mode, 8, 20, dtype=torch.float32, num_layers=2)
    lstm = mode == "lstm"

    def h(*s, dtype=torch.float32):
        t = torch.zeros(*s, dtype=dtype)
        return (t, t.clone()) if lstm else t

    cases = [
        (torch.randn(5, 3, 7), None),  # wrong input_size
        (torch.randn(5, 3, 8), h(2, 4, 20)),  # batch mismatch with the state
        (torch.randn(5, 3, 8), h(2, 3, 19)),  # hidden-size mismatch
        (torch.randn(5, 3, 8), h(1, 3, 20)),  # layer-count mismatch
        (torch.randn(5, 3, 8).double(), None),  # dtype mismatch with the parameters
        (torch.randn(2, 5, 3, 8), None),  # wrong rank
        (torch.randn(5, 8), h(2, 1, 20)),  # unbatched input, batched state
        (torch.randn(5, 3, 8), h(3, 20)),  # batched input, unbatched state
    ]
    for x, hx in cases:
        want = _torch_msg(lambda: theirs(x, hx))
        with pytest.raises(gpu_nn.KernelInputError) as info:
            ours(x, hx)
        assert str(info.value) == want
    with pytest.raises(gpu_nn.KernelInputError, match="Expected input to be 2D or 3D"):
        ours(torch.randn(5))
    # a state in another dtype than the parameters
    with pytest.raises(gpu_nn.KernelInputError, match="dtype"):
        ours(torch.randn(5, 3, 8), h(2, 3, 20, dtype=torch.float64))


@pytest.mark.parametrize("mode", MODES)
def test_bad_cell_input_torch_wording(mode):
    ours_cls, theirs_cls, extra = CELLS[mode]
    theirs = theirs_cls(8, 20, **extra)
    ours = ours_cls(8, 20, **extra)
    ours.load_state_dict(theirs.state_dict())
    lstm = mode == "lstm"

    def h(b, n):
        return (torch.zeros(b, 20), torch.zeros(b, n)) if lstm else torch.zeros(b, n)

    for x, hx in [(torch.randn(3, 7), None), (torch.randn(3, 8), h(4, 20) if not lstm else (torch.zeros(4, 20),) * 2),
                  (torch.randn(3, 8), h(3, 19)), (torch.randn(2, 3, 8), None)]:
        want = _torch_msg(lambda: theirs(x, hx))
        with pytest.raises(gpu_nn.KernelInputError) as info:
            ours(x, hx)
        assert str(info.value) == want
    with pytest.raises(gpu_nn.KernelInputError, match="dtype"):
        ours(torch.randn(3, 8).double())


def _nobias(name):
    def make(lib):
        m = getattr(lib, name)(2, 3)
        setattr(m, "bias_ih_l0" if name == "GRU" else "bias_hh_l0", None)
        return m
    return make


@pytest.mark.parametrize("what,make,call", [
    ("LSTM list input", lambda lib: lib.LSTM(2, 3), lambda m: m([[1.0, 2.0]] * 3)),
    ("GRU list input", lambda lib: lib.GRU(2, 3), lambda m: m([[1.0, 2.0]] * 3)),
    ("RNN int input", lambda lib: lib.RNN(2, 3), lambda m: m(3)),
    ("LSTM list state", lambda lib: lib.LSTM(2, 3), lambda m: m(torch.randn(3, 2, 2), [[0.0]])),
    ("GRU list state", lambda lib: lib.GRU(2, 3), lambda m: m(torch.randn(3, 2, 2), [[0.0]])),
    ("LSTMCell None cell state", lambda lib: lib.LSTMCell(2, 3), lambda m: m(torch.randn(2, 2), (torch.randn(2, 3), None))),
    ("GRUCell list input", lambda lib: lib.GRUCell(2, 3), lambda m: m([1.0, 2.0])),
    ("GRU bias set to None", _nobias("GRU"), lambda m: m(torch.randn(3, 2, 2))),
    ("LSTM bias set to None", _nobias("LSTM"), lambda m: m(torch.randn(3, 2, 2))),
], ids=lambda v: v if isinstance(v, str) else "")
def test_non_tensors_get_torchs_error_type_and_words(what, make, call):
    """What is not a tensor where torch's recurrent modules want one: torch's exception type (an
    AttributeError where its forward asks the object's dim(), a TypeError from its parser for a
    weight set to None) and words, as a KernelInputError (an audit: ours raised KernelInputError,
    IndexError, TypeError or a bare AttributeError of its own)."""
    torch.manual_seed(0)
    with pytest.raises((AttributeError, TypeError)) as want:
        call(make(torch.nn))
    torch.manual_seed(0)
    with pytest.raises(gpu_nn.KernelInputError) as got:
        call(make(gnn))
    assert isinstance(got.value, type(want.value))
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("mode", MODES)
def test_input_projection_width_mismatch_in_torchs_words(mode):
    """A layer-0 input weight whose width is not the input's (a module's weight_ih_l0 replaced,
    or the functional form's params): torch's matmul error over the layer's whole input (T x B
    rows); ours said 'input.size(-1) must be equal to input_size. Expected <the weight's width>',
    which names the module's attribute the input did match (an audit)."""
    _, theirs_cls, extra = MODULES[mode]
    ours_cls = MODULES[mode][0]
    x = torch.randn(3, 2, 2, dtype=torch.float64)  # (torch's float32 LSTM on oneDNN takes it, reading past the weight)
    msgs = []
    for cls in (theirs_cls, ours_cls):
        m = cls(2, 3, **extra).double()
        m.weight_ih_l0 = torch.nn.Parameter(torch.randn(m.weight_ih_l0.shape[0], 4, dtype=torch.float64))
        msgs.append(_torch_msg(lambda: m(x)))
    assert msgs[0] == msgs[1] and msgs[0].startswith("mat1 and mat2 shapes cannot be multiplied (6x2 and 4x")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_functional_packed_overload_as_torch(mode, bidirectional, rng):
    """torch.lstm / gru / rnn_tanh / rnn_relu's packed overload, (data, batch_sizes, hx, params,
    has_biases, num_layers, dropout, train, bidirectional), which torch's modules call: the same
    packed output, final states and gradients of data, states and every parameter (float64);
    ours refused it as a bad hx (a recurrent-layer audit)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    ours_cls, theirs_cls, extra = MODULES[mode]
    m = theirs_cls(3, 4, num_layers=2, bidirectional=bidirectional, **extra).double()
    p = pack_padded_sequence(randn(rng, 5, 3, 3), [5, 3, 2])
    D = 2 if bidirectional else 1
    h0 = randn(rng, 2 * D, 3, 4)
    theirs_fn = {"rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu, "gru": torch.gru, "lstm": torch.lstm}[mode]
    got = []
    for fn in (ops.SEQ_FUNCS[mode], theirs_fn):
        data, h, *ws = leaves = [t.detach().clone().requires_grad_() for t in (p.data, h0, *m._flat_weights)]
        hx = (h, h * 0.5) if mode == "lstm" else h
        with gpu_nn.backend("reference"):
            out = fn(data, p.batch_sizes, hx, ws, True, 2, 0.0, False, bidirectional)
            grads = torch.autograd.grad([o.sum() for o in out], leaves)
        got.append([o.detach() for o in out] + list(grads))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cells_state_of_too_few_dims_raise_torchs_index_error():
    """A batched cell given a 1-d (or 0-d) state: torch reads its size(1) (size(0)) and raises
    IndexError with its words; ours said 'inconsistent hidden_size: got 1' (a fuzz against
    torch). A state of the wrong batch size still says so first, as torch's."""
    x = torch.randn(2, 3)
    cases = [(mod, bad) for mod in ("RNNCell", "GRUCell", "LSTMCell") for bad in (torch.randn(2), torch.randn(3))]
    for mod, bad in cases:
        for which in ((0, 1) if mod == "LSTMCell" else (0,)):
            got = []
            for lib in (gnn, torch.nn):
                torch.manual_seed(0)
                m = getattr(lib, mod)(3, 2)
                if mod == "LSTMCell":
                    states = [torch.randn(2, 2), torch.randn(2, 2)]
                    states[which] = bad
                    hx = tuple(states)
                else:
                    hx = bad
                with pytest.raises(Exception) as err:
                    m(x, hx)
                got.append((isinstance(err.value, IndexError), str(err.value)))
            assert got[0] == got[1], (mod, which, tuple(bad.shape), got)
    for fn in (ops.gru_cell, ops.lstm_cell):  # 0-d: torch's functional forms (its modules refuse 0-d first)
        w = [torch.randn(6 if fn is ops.gru_cell else 8, 3), torch.randn(6 if fn is ops.gru_cell else 8, 2)]
        h0 = torch.randn(()) if fn is ops.gru_cell else (torch.randn(()), torch.randn(2, 2))
        with pytest.raises(IndexError, match="Dimension specified as 0 but tensor has no dimensions"):
            fn(x, h0, *w)


def test_functional_bad_input():
    with pytest.raises(gpu_nn.KernelInputError, match="3 dimensions"):
        F.gru(torch.randn(3, 4), torch.zeros(1, 3, 5), [torch.randn(15, 4), torch.randn(15, 5)], False)
    with pytest.raises(gpu_nn.KernelInputError, match="lengths"):
        F.gru(torch.randn(3, 2, 4), torch.zeros(1, 2, 5), [torch.randn(15, 4), torch.randn(15, 5)], False,
              lengths=torch.tensor([4, 1]))
    # the op takes lengths on the CPU, as pack_padded_sequence does (the functional form moves
    # them there); meta here, a CUDA tensor on a GPU
    from gpu_nn.ops import rnn as ops

    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(gpu_nn.KernelInputError, match="CPU int64"):
        ops.rnn_seq_forward(torch.randn(3, 2, 4), torch.zeros(1, 2, 5), None, [torch.randn(15, 4), torch.randn(15, 5)],
                            "gru", 1, False, False, lengths=torch.tensor([3, 1], device=other))


# ----------------------------------------------------------------------------------------------
# every backend against the reference (Triton in the interpreter here, compiled on a GPU)


def _seq_against_reference(backend, device, mode, dtype, rng, T, B, I, H, L, bi, lengths, masks, batch_first=False,
                           P=0, tf32=False):
    """``tf32``: the float32 products may have run in TF32 (cudnn.allow_tf32 on), so a float32
    result on a GPU is held to the TF32 tolerance (the interpreter computes every dot exactly).

    The reference sees every input as the backend saw it (rounded to ``dtype``, then widened to
    float64), as gpu_nn/check.py does: the tolerance is for the kernel's arithmetic, and rounding
    the inputs alone moves rnn_relu pre-activations lying within a bfloat16 ulp of zero across the
    kink (T3B3H19L2bilen: 0.11 in dx against the unrounded inputs, in exact arithmetic)."""
    args, kw = ops._make_seq(mode, T=T, B=B, I=I, H=H, L=L, bi=bi, lengths=lengths, P=P)(rng)
    x, hx, params = args[0], args[1], args[2]
    D = 2 if bi else 1
    if batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
    mk = torch.from_numpy((rng.uniform(size=(L - 1, T, B, D * (P or H))) > 0.3) / 0.7) if masks and L > 1 else None
    hs = list(hx) if mode == "lstm" else [hx]
    fn = ops.SEQ_FUNCS[mode]

    def run(be, dev, dt, layer=None):
        # ``layer(x, h, params)``: another layer on the same inputs (torch's own, below)
        leaves = [t.detach().to(dtype).to(dev, dt).requires_grad_() for t in [x, *hs, *params]]
        h = tuple(leaves[1:1 + len(hs)]) if mode == "lstm" else leaves[1]
        p = leaves[1 + len(hs):]
        with gpu_nn.backend(be):
            if layer is None:
                out = fn(leaves[0], h, p, True, L, 0.0, True, bi, batch_first, lengths=kw.get("lengths"),
                         dropout_masks=None if mk is None else mk.to(dtype).to(dev, dt))
            else:
                out = layer(leaves[0], h, p)
            gens = np.random.default_rng(5)
            gs = [torch.from_numpy(gens.standard_normal(o.shape)).to(dtype).to(dev, dt) for o in out]
            grads = torch.autograd.grad(out, leaves, gs)
        return list(out), list(grads)

    r_out, r_grads = run("reference", "cpu", torch.float64)
    o_out, o_grads = run(backend, device, dtype)
    on_tf32 = tf32 and dtype == torch.float32 and device != "cpu"
    twins = []
    if on_tf32 and kw.get("lengths") is None and mk is None and not P:
        # torch's own layer on the same inputs, twice: through cuDNN (TF32 as the test set it,
        # where cuDNN takes it: at small sizes it may run exact float32) and through torch's
        # native layer, cuDNN off, its matmuls in TF32 (_native_tf32). Their errors are the scale
        # of what TF32 does to this stack: each layer and step carries every rounding on, which
        # a bound of a few TF32 ulps (tol_tf32) does not hold (the H200 at a331102: our TF32
        # output 4.28e-3 off against that bound's 3.92e-3, B=32 H=32, two layers of six steps,
        # where cuDNN's error was about 0). The bound is DESIGN section 4's: the TF32 floor plus
        # twice the larger twin's error
        layer = _torch_layer(mode, L, bi, batch_first)
        twins.append(run(backend, device, dtype, layer))
        with _native_tf32():
            twins.append(run(backend, device, dtype, layer))

    def close(a, b, k, what, theirs=()):
        if on_tf32:
            _assert_tf32_close(a, b, k, what, [max_rel_err(t, b) for t in theirs])
        else:
            assert_close(a, b, dtype, k=k, what=what)

    for i, (a, b) in enumerate(zip(o_out, r_out)):
        assert a.dtype == dtype
        close(a, b, 4 * H, f"{mode} output", [out[i] for out, _ in twins])
    for i, (a, b) in enumerate(zip(o_grads, r_grads)):
        close(a, b, T * B * 4 * H, f"{mode} grad {i}", [grads[i] for _, grads in twins])


def _assert_tf32_close(a, b, k, what, scale=()):
    """``a`` (float32 products run in TF32) against the float64 ``b``: DESIGN section 4's bound,
    the TF32 floor (tol_tf32) plus twice the larger of torch's own errors ``scale`` on the same
    inputs (its twins' max_rel_err against ``b``). A twin this far off would be wired wrong
    (test_tf32_twins_are_torchs_layers and test_persist_twin_is_torchs_layer check the wiring in
    float64): it must not widen the bound."""
    err = max_rel_err(a, b)
    assert all(e <= 16 * tol_tf32(k) for e in scale), f"{what}: a torch twin is off by {scale}"
    bound = tol_tf32(k) + 2 * max(scale, default=0.0)
    assert err <= bound, f"{what}: max relative error {err:.3e} > TF32 bound {bound:.3e} (k={k}" + (
        f", torch's own errors {', '.join(f'{e:.3e}' for e in scale)})" if scale else ")")


def _torch_layer(mode, L, bi, batch_first):
    """torch's own multi-layer recurrent layer as ``_seq_against_reference``'s ``run`` calls a
    layer: ``layer(x, h, params)`` with the flat weight list in torch's order, returning
    [out, h_n] or [out, h_n, c_n]."""
    def layer(x0, h, p):
        out = list(getattr(torch._VF, mode)(x0, h, p, True, L, 0.0, True, bi, batch_first))
        return [out[0], *out[1]] if mode == "lstm" and isinstance(out[1], tuple) else out
    return layer


@contextlib.contextmanager
def _native_tf32():
    """torch's recurrent layers through its native implementation (cuDNN off), whose matmuls
    (cuBLAS) run in TF32: ``torch.backends.cuda.matmul.allow_tf32`` on, forward and backward."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.backends.cudnn.flags(enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("mode", MODES)
def test_tf32_twins_are_torchs_layers(mode, rng):
    """The twins whose TF32 error scales the GPU bound of _seq_against_reference, run in float64
    on the CPU (no TF32 there), native path included: they compute what the reference computes,
    outputs and every gradient, so on a GPU their error is TF32's alone."""
    T, B, I, H, L, bi = 4, 3, 5, 7, 2, True
    args, _ = ops._make_seq(mode, T=T, B=B, I=I, H=H, L=L, bi=bi)(rng)
    x, hx, params = args[0], args[1], args[2]
    hs = list(hx) if mode == "lstm" else [hx]
    layer = _torch_layer(mode, L, bi, False)

    def run(fn):
        leaves = [t.detach().to(torch.float64).requires_grad_() for t in [x, *hs, *params]]
        h = tuple(leaves[1:1 + len(hs)]) if mode == "lstm" else leaves[1]
        out = list(fn(leaves[0], h, leaves[1 + len(hs):]))
        gs = [torch.from_numpy(np.random.default_rng(5).standard_normal(o.shape)) for o in out]
        return [*out, *torch.autograd.grad(out, leaves, gs)]

    def ours(x0, h, p):
        with gpu_nn.backend("reference"):
            return ops.SEQ_FUNCS[mode](x0, h, p, True, L, 0.0, True, bi, False)

    want = run(ours)
    with _native_tf32():
        got = run(layer)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


BACKEND_GRID = [
    # T, B, I, H, L, bi, lengths, masks
    # B * H a multiple of 8: every per-step row 16-byte aligned in every dtype (kernels/triton/rnn.py
    # uniform_rows), so on a GPU the time loops bind the step kernels themselves, with the hidden
    # units off multiples of 16; B above PERSIST_DEFAULT_MAX_B (16), so the forward's loop too, not
    # the persistent kernel (the other rows: B * H not a multiple of 8, so the loops run the
    # kernels' twins for rows at any alignment, LOOSE_ROWS)
    (5, 24, 4, 5, 1, False, None, False),
    (3, 3, 6, 19, 2, True, (3, 1, 2), True),
    (4, 2, 3, 17, 2, False, (2, 4), False),
    # a packed batch in sorted order over two batch tiles of 16: the second tile's sequences end
    # early and every sequence ends before T, so both directions' forward and backward steps run
    # with whole tiles finished (the recurrent product skipped) next to tiles still running
    (5, 19, 3, 7, 1, True, (4, 4, 4, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1), False),
]


def test_latin_cover_meets_every_pair_of_the_three_factors():
    """The reduced grids below rely on it: every (row, col), (row, value) and (col, value) pair
    meets, each (row, col) once; too few rows or columns for the values is refused."""
    import itertools

    for rows, cols, values in ((BACKEND_GRID, MODES, INTERP_DTYPES), ((0, 1), (0, 1, 2), ("a", "b")),
                               ((0, 1, 2), (0, 1), ("a", "b")), ((0, 1, 2), (0, 1, 2), ("a", "b", "c"))):
        cells = latin_cover(rows, cols, values)
        assert len(cells) == len(rows) * len(cols)
        assert {(id(r), id(c)) for r, c, _ in cells} == {(id(r), id(c)) for r, c in itertools.product(rows, cols)}
        assert {(id(r), v) for r, _, v in cells} == {(id(r), v) for r in rows for v in values}
        assert {(id(c), v) for _, c, v in cells} == {(id(c), v) for c in cols for v in values}
    with pytest.raises(ValueError, match="cannot meet"):
        latin_cover((0,), (0, 1, 2), ("a", "b"))


def _backend_sequence_params():
    """Every shape x mode x dtype on a GPU; under the interpreter (seconds a case) each shape x
    mode in one dtype of a Latin rectangle (helpers.latin_cover: every shape and every mode meets
    each dtype; 16 cases instead of 48)."""
    ids = {id(c): f"T{c[0]}B{c[1]}H{c[3]}L{c[4]}{'bi' if c[5] else ''}{'len' if c[6] else ''}" for c in BACKEND_GRID}
    interp_dtype = {(id(c), m): dt for c, m, dt in latin_cover(BACKEND_GRID, MODES, INTERP_DTYPES)}
    out = []
    for cfg in BACKEND_GRID:
        for mode in MODES:
            for p in backend_dtype_params(("triton", "cupy")):
                backend, device, dtype = p.values
                if backend == "triton" and device == "cpu" and dtype != interp_dtype[id(cfg), mode]:
                    continue
                out.append(pytest.param(backend, device, dtype, mode, cfg, marks=p.marks,
                                        id=f"{ids[id(cfg)]}-{mode}-{p.id}"))
    return out


@pytest.mark.parametrize("backend,device,dtype,mode,cfg", _backend_sequence_params())
def test_backend_sequence_matches_reference(backend, device, dtype, mode, cfg, rng):
    _seq_against_reference(backend, device, mode, dtype, rng, *cfg, batch_first=cfg[0] == 4)


PROJ_BACKEND_GRID = [
    # T, B, I, H, L, bi, lengths, masks, P
    (4, 3, 5, 7, 2, True, (4, 1, 3), True, 3),
    (3, 2, 5, 19, 2, False, None, False, 5),
    (4, 3, 4, 7, 1, True, (2, 4, 3), False, 1),
]


@pytest.mark.parametrize("backend,device,dtype", backend_dtype_params(("triton", "cupy")))
@pytest.mark.parametrize("cfg", PROJ_BACKEND_GRID, ids=lambda c: f"T{c[0]}B{c[1]}H{c[3]}P{c[8]}L{c[4]}"
                         f"{'bi' if c[5] else ''}{'len' if c[6] else ''}{'mask' if c[7] else ''}")
def test_backend_proj_sequence_matches_reference(backend, device, dtype, cfg, rng):
    """LSTM with projections: outputs, h_n, c_n and every gradient (w_hr included) against the
    float64 reference, in every GPU dtype, packed lengths, dropout masks, two layers, both ways."""
    *c, P = cfg
    _seq_against_reference(backend, device, "lstm", dtype, rng, *c, batch_first=c[0] == 3, P=P)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "reference"])
@pytest.mark.parametrize("packed", [False, True])
def test_backend_proj_module_without_state_matches_reference(backend, device, packed, rng):
    """nn.LSTM(proj_size) with no initial state (zeros of the two widths) on a GPU backend."""
    m = gnn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3).to(device)
    x = randn(rng, 4, 3, 5).float().to(device)
    lengths = torch.tensor([4, 1, 3])
    res = {}
    for be in ("reference", backend):
        with gpu_nn.backend(be):
            xin = x.cpu() if be == "reference" else x
            mm = m.cpu() if be == "reference" else m.to(device)
            if packed:
                xin = pack_padded_sequence(xin, lengths, enforce_sorted=False)
            out, (hn, cn) = mm(xin)
            out = out.data if packed else out
            g = torch.autograd.grad(out.sum() + hn.sum() + cn.sum(), list(mm.parameters()))
            res[be] = [t.detach().cpu() for t in (out, hn, cn, *g)]
    for a, b in zip(res[backend], res["reference"]):
        assert_close(a, b.double(), torch.float32, k=4 * 3 * 28)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_backend_cell_matches_reference(backend, device, mode, rng):
    for dtype in gpu_dtypes_for(backend, device):
        args, _ = ops._make_cell(mode, B=3, I=5, H=13)(rng)
        fn = ops.CELL_FUNCS[mode]

        def run(be, dev, dt):
            flat = [args[0], *(args[1] if mode == "lstm" else (args[1],)), *args[2:]]
            leaves = [t.detach().to(dev, dt).requires_grad_() for t in flat]
            with gpu_nn.backend(be):
                if mode == "lstm":
                    out = fn(leaves[0], (leaves[1], leaves[2]), *leaves[3:])
                else:
                    out = (fn(*leaves),)
                gs = [torch.from_numpy(np.random.default_rng(3).standard_normal(o.shape)).to(dev, dt) for o in out]
                return list(out), torch.autograd.grad(out, leaves, gs)

        r = run("reference", "cpu", torch.float64)
        o = run(backend, device, dtype)
        for a, b in zip(o[0] + list(o[1]), r[0] + list(r[1])):
            assert_close(a, b, dtype, k=4 * 13 * 3, what=f"{mode} cell {dtype}")


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "reference"])
@pytest.mark.parametrize("mode,reach", [(m, "h") for m in MODES] + [("lstm", "c")])
def test_backend_cell_strided_states_and_one_output_reaching_the_loss(backend, device, mode, reach, rng):
    """The GPU cell path's other inputs (gpu_nn.ops.rnn._gpu_cell_forward / _backward): states
    that are strided views (the kernels take float32 unit-stride rows: converted), an output
    gradient with a non-unit last stride (what autograd hands back through a transpose), and only
    one of the LSTM's outputs reaching the loss (no zero gradient is made for the other: the step
    kernel reads no c' gradient, or gets a zero h' one). Values and every gradient against the
    float64 reference. ``reach``: the output that reaches the loss, through a transpose."""
    B, I, H = 3, 5, 6
    G = ops.GATES[mode] * H
    for dtype in gpu_dtypes_for(backend, device):
        x = randn(rng, B, I)
        hs = [randn(rng, B, 2 * H)[:, ::2] for _ in range(2 if mode == "lstm" else 1)]  # column stride 2
        ws = [randn(rng, G, I) * H ** -0.5, randn(rng, G, H) * H ** -0.5, randn(rng, G), randn(rng, G)]
        g = randn(rng, H, B)

        def run(be, dev, dt):
            leaves = [t.to(dev, dt).requires_grad_() for t in (x, *ws)]
            states = [t.to(dev, dt).detach().requires_grad_() for t in hs]
            # strided views of the states as the kernels' inputs; the leaves get the gradients
            sv = [torch.stack([s, s], dim=2)[:, :, 0] for s in states]
            assert not sv[0].is_contiguous()
            with gpu_nn.backend(be):
                if mode == "lstm":
                    h, c = F.lstm_cell(leaves[0], (sv[0], sv[1]), *leaves[1:])
                    out = c if reach == "c" else h
                else:
                    out = ops.CELL_FUNCS[mode](leaves[0], sv[0], *leaves[1:])
                loss = (out.t() * g.to(dev, dt)).sum()  # out's gradient: g.t(), a non-unit last stride
                grads = torch.autograd.grad(loss, leaves + states)
            return [out, *grads]

        r = run("reference", "cpu", torch.float64)
        o = run(backend, device, dtype)
        for i, (a, b) in enumerate(zip(o, r)):
            assert_close(a, b, dtype, k=4 * H * B, what=f"{mode} cell {dtype} reach {reach} result {i}")


def _odd_bias(rng, n, how, dev, dt):
    """A bias of n values as a leaf and the view the op gets: a stride-2 view of a larger buffer
    ('strided') or one value broadcast (stride 0, 'broadcast')."""
    if how == "strided":
        leaf = randn(rng, 2 * n).to(dev, dt).requires_grad_()
        return leaf, leaf[::2]
    leaf = randn(rng, 1).to(dev, dt).requires_grad_()
    return leaf, leaf.expand(n)


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] != "reference"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["cell", "sequence"])
def test_backend_strided_and_broadcast_biases_match_reference(backend, device, mode, form, rng):
    """Biases that are not dense (a stride-2 view, an expanded scalar) on the GPU paths: the
    kernels index a bias by unit without a stride, so such a bias was read wrong (an LSTM cell
    0.33 off, a sequence 1.6) and an expanded one past its single element. Values and every
    gradient (the bias leaves' included) against the float64 reference; each bias takes each
    form once."""
    H, B, I, T = 5, 3, 4, 3
    G = ops.GATES[mode] * H
    dt = torch.float32
    for how in (("strided", "broadcast"), ("broadcast", "strided")):
        seed = int(rng.integers(1 << 30))

        def run(be, dev, dtype):
            r = np.random.default_rng(seed)
            x = randn(r, T, B, I).to(dev, dtype).requires_grad_()
            layers = []
            for _ in range(2 if form == "sequence" else 1):
                w_ih = (randn(r, G, I if not layers else 2 * H) * H ** -0.5).to(dev, dtype).requires_grad_()
                w_hh = (randn(r, G, H) * H ** -0.5).to(dev, dtype).requires_grad_()
                (bl_ih, b_ih), (bl_hh, b_hh) = (_odd_bias(r, G, h, dev, dtype) for h in how)
                layers.append(((w_ih, w_hh, bl_ih, bl_hh), (w_ih, w_hh, b_ih, b_hh)))
            with gpu_nn.backend(be):
                if form == "cell":
                    leaves, used = layers[0]
                    args = (x[0], (x[0, :, :1].expand(B, H) * 1,) * 2) if mode == "lstm" else (x[0], x[0, :, :1].expand(B, H) * 1)
                    out = ops.CELL_FUNCS[mode](*args, *used)
                    out = out if isinstance(out, tuple) else (out,)
                else:
                    leaves = [t for lay in layers for t in lay[0]] * 2  # both directions share them
                    params = [t for lay in layers for t in lay[1]]
                    params = [p for k in range(2) for p in params[4 * k:4 * k + 4] * 2]  # layer k, both directions
                    h0 = torch.zeros(4, B, H, device=dev, dtype=dtype)
                    fn = {"rnn_tanh": F.rnn_tanh, "rnn_relu": F.rnn_relu, "gru": F.gru, "lstm": F.lstm}[mode]
                    hx = (h0, h0) if mode == "lstm" else h0
                    out = fn(x, hx, params, True, 2, 0.0, False, True, False)
                    out = (out[0], *(out[1] if mode == "lstm" else (out[1],)))
                    leaves = [t for lay in layers for t in lay[0]]
                gs = [torch.from_numpy(np.random.default_rng(3).standard_normal(o.shape)).to(dev, dtype) for o in out]
                grads = torch.autograd.grad(out, [x, *leaves], gs)
            return [o.detach() for o in out] + list(grads)

        want = run("reference", "cpu", torch.float64)
        got = run(backend, device, dt)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, dt, k=4 * 2 * H * T, what=f"{mode} {form} biases {how} result {i}")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_cells_compile_fullgraph_as_eager(backend, device, rng):
    """torch.compile(fullgraph=True) through the GPU cell path (the fake kernel's reserve, the
    backward from the saved outputs and reserve; opcheck covers the reference): an LSTM step
    and a GRU step, outputs and every gradient equal to the eager run, float32."""
    lstm, gru = gnn.LSTMCell(4, 5).to(device), gnn.GRUCell(5, 3).to(device)
    params = list(lstm.parameters()) + list(gru.parameters())

    def f(x, h, c):
        h, c = lstm(x, (h, c))
        return gru(h) + c[:, :3]

    args = [randn(rng, *s, dtype=torch.float32, device=device, requires_grad=True) for s in ((3, 4), (3, 5), (3, 5))]
    with gpu_nn.backend(backend):
        eager = f(*args)
        want = torch.autograd.grad(eager.sum(), args + params)
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = compiled(*args)
        grads = torch.autograd.grad(got.sum(), args + params)
    torch.testing.assert_close(got, eager)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_cell_fake_kernels_match_the_gpu_path(backend, device, rng):
    """The fake kernels of both cell ops against what the GPU path returns (the reserve's size
    depends on the io dtype): opcheck's fake-tensor check on this backend, every mode, float32
    and float16, the LSTM backward with and without a c' gradient."""
    for dtype in (torch.float32, torch.float16):
        for mode in MODES:
            (x, hx, *ws), _ = ops._make_cell(mode, B=3, I=4, H=5)(rng)
            h, c = hx if mode == "lstm" else (hx, None)
            args = [t if t is None else t.detach().to(device, dtype) for t in (x, h, c, *ws)]
            with gpu_nn.backend(backend):
                torch.library.opcheck(torch.ops.gpu_nn.rnn_cell.default, (*args, mode), test_utils="test_faketensor")
                outs = list(torch.ops.gpu_nn.rnn_cell.default(*args, mode))
                g = randn(rng, 3, 5, dtype=dtype, device=device)
                for gc in ((g, None) if mode == "lstm" else (None,)):
                    torch.library.opcheck(torch.ops.gpu_nn.rnn_cell_backward.default, (g, gc, *args, *outs, mode),
                                          test_utils="test_faketensor")


# ----------------------------------------------------------------------------------------------
# the CUDA kernels' per-element math (kernels/cuda/rnn_math.cuh), host-compiled, against the reference

HOST_SRC = r"""
#include "rnn_math.cuh"
extern "C" {
void host_rnn_fwd(int relu, int n, const float* x, const float* hh, float* h) {
    for (int i = 0; i < n; ++i) h[i] = gn_rnn_fwd(relu, x[i], hh[i]);
}
void host_rnn_bwd(int relu, int n, const float* dh, const float* h, float* d) {
    for (int i = 0; i < n; ++i) d[i] = gn_rnn_bwd(relu, dh[i], h[i]);
}
void host_lstm_fwd(int n, const float* x, const float* hh, const float* cp, float* g, float* c, float* h) {
    for (int i = 0; i < n; ++i) gn_lstm_fwd(x + 4 * i, hh + 4 * i, cp[i], g + 4 * i, c + i, h + i);
}
void host_lstm_bwd(int n, const float* dh, const float* dc, const float* g, const float* c, const float* cp,
                   float* dg, float* dco) {
    for (int i = 0; i < n; ++i) gn_lstm_bwd(dh[i], dc[i], g + 4 * i, c[i], cp[i], dg + 4 * i, dco + i);
}
void host_gru_fwd(int n, const float* x, const float* hh, const float* hp, float* g, float* h) {
    for (int i = 0; i < n; ++i) gn_gru_fwd(x + 3 * i, hh + 3 * i, hp[i], g + 4 * i, h + i);
}
void host_gru_bwd(int n, const float* dh, const float* g, const float* hp, float* dgi, float* dgh, float* carry) {
    for (int i = 0; i < n; ++i) gn_gru_bwd(dh[i], g + 4 * i, hp[i], dgi + 3 * i, dgh + 3 * i, carry + i);
}
void host_proj_fwd(int n, const int* valid, const float* hw, const float* hp, const float* mask, float* h, float* out) {
    for (int i = 0; i < n; ++i) gn_proj_fwd(valid[i], hw[i], hp[i], mask[i], h + i, out + i);
}
void host_proj_bwd(int n, const int* valid, const float* carry, const float* dout, float* dh, float* carry_out) {
    for (int i = 0; i < n; ++i) gn_proj_bwd(valid[i], carry[i], dout[i], dh + i, carry_out + i);
}
}
"""


def test_cuda_proj_math_on_host_matches_reference(rng):
    """The cupy backend's projection step (rnn.cu's rnn_proj_fwd / rnn_proj_bwd math) run on the
    host, composed as the driver composes it, against the float64 reference: one forward step and
    one backward step of a projected LSTM with a row past its length."""
    import ctypes

    from helpers import build_host_library, fptr

    lib = build_host_library(HOST_SRC, "rnn_math")
    B, I, H, P = 3, 5, 7, 3
    f32 = np.float32
    x, h, c = rng.standard_normal((B, I)), rng.standard_normal((B, P)), rng.standard_normal((B, H))
    w_ih, w_hh = rng.standard_normal((4 * H, I)) * 0.5, rng.standard_normal((4 * H, P)) * 0.5
    w_hr = rng.standard_normal((P, H)) * 0.5
    ws = [(w_ih, w_hh, None, None, w_hr)]
    lengths = np.array([1, 0, 1])
    out, hn, cn, res = ref.rnn_forward("lstm", x[None], h[None], c[None], ws, 1, False, lengths)
    # the cell math (checked by the test above) gives m = o * tanh(c'); the projection is a matmul
    m = ref._views(res, ref.reserve_layout("lstm", 1, B, H, 1, 1, P)[0])[("m", 0, 0)][0]
    valid = np.ascontiguousarray(np.broadcast_to((lengths > 0)[:, None], (B, P)), dtype=np.int32)
    mask = rng.uniform(0.5, 2.0, (B, P)).astype(f32)
    hw = np.ascontiguousarray(m @ w_hr.T, dtype=f32)
    hp = np.ascontiguousarray(h, dtype=f32)
    got_h, got_o = np.empty((B, P), f32), np.empty((B, P), f32)
    n = ctypes.c_int(B * P)
    lib.host_proj_fwd(n, valid.ctypes.data_as(ctypes.c_void_p), fptr(hw), fptr(hp), fptr(mask), fptr(got_h), fptr(got_o))
    assert_close(torch.from_numpy(got_h), torch.from_numpy(hn[0]), torch.float32, k=H)
    assert_close(torch.from_numpy(got_o), torch.from_numpy(out[0] * mask), torch.float32, k=H)
    # backward of one step: dh = carry + dout (valid rows) goes to dm = dh W_hr, the rest stays
    gh, go = rng.standard_normal((B, P)), rng.standard_normal((B, P))
    dx, dhx, dcx, dws = ref.rnn_backward("lstm", go[None], gh[None], np.zeros((1, B, H)), x[None], ws, res, 1, False,
                                         lengths)
    dh, carry = np.empty((B, P), f32), np.empty((B, P), f32)
    lib.host_proj_bwd(n, valid.ctypes.data_as(ctypes.c_void_p), fptr(np.ascontiguousarray(gh, dtype=f32)),
                      fptr(np.ascontiguousarray(go, dtype=f32)), fptr(dh), fptr(carry))
    want_dh = np.where(valid, gh + go, 0)
    assert_close(torch.from_numpy(dh), torch.from_numpy(want_dh), torch.float32, k=1)
    assert_close(torch.from_numpy(carry), torch.from_numpy(np.where(valid, 0, gh)), torch.float32, k=1)
    # dW_hr from the kernel's dh, as the driver forms it, and the invalid row's dh0 = its carry
    assert_close(torch.from_numpy(dh.T.astype(np.float64) @ m), torch.from_numpy(dws[0][4]), torch.float32, k=B)
    assert_close(torch.from_numpy(carry[1]), torch.from_numpy(dhx[0][1]), torch.float32, k=1)


@pytest.mark.parametrize("mode", MODES)
def test_cuda_cell_math_on_host_matches_reference(mode, rng):
    import ctypes

    from helpers import build_host_library, fptr

    lib = build_host_library(HOST_SRC, "rnn_math")
    B, I, H = 3, 5, 7
    G = ops.GATES[mode]
    x, h, c = rng.standard_normal((B, I)), rng.standard_normal((B, H)), rng.standard_normal((B, H))
    w_ih, w_hh = rng.standard_normal((G * H, I)) * 0.5, rng.standard_normal((G * H, H)) * 0.5
    b_ih, b_hh = rng.standard_normal(G * H), rng.standard_normal(G * H)
    gh_, gc_ = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    f32 = np.float32

    def per_elem(a, k):  # [B, k * H] -> contiguous [B * H, k]
        return np.ascontiguousarray(a.reshape(B, k, H).transpose(0, 2, 1).reshape(B * H, k), dtype=f32)

    def from_elem(a, k):
        return a.reshape(B, H, k).transpose(0, 2, 1).reshape(B, k * H)

    n = ctypes.c_int(B * H)
    xp = x @ w_ih.T + b_ih + (b_hh if mode != "gru" else 0)
    hh = h @ w_hh.T + (b_hh if mode == "gru" else 0)
    hp32 = np.ascontiguousarray(h.reshape(-1), dtype=f32)
    out_h = np.empty(B * H, f32)
    if mode.startswith("rnn"):
        relu = ctypes.c_int(mode == "rnn_relu")
        lib.host_rnn_fwd(relu, n, fptr(per_elem(xp, 1)), fptr(per_elem(hh, 1)), fptr(out_h))
        want = ref.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, mode[4:])
        d = np.empty(B * H, f32)
        lib.host_rnn_bwd(relu, n, fptr(np.ascontiguousarray(gh_.reshape(-1), dtype=f32)), fptr(out_h), fptr(d))
        dg = d.reshape(B, H)
        dgh, carry = dg, 0
        wants = ref.rnn_cell_backward(gh_, x, h, w_ih, w_hh, b_ih, b_hh, mode[4:])
        got_dc = None
    elif mode == "lstm":
        g4, c_new = np.empty((B * H, 4), f32), np.empty(B * H, f32)
        cp32 = np.ascontiguousarray(c.reshape(-1), dtype=f32)
        lib.host_lstm_fwd(n, fptr(per_elem(xp, 4)), fptr(per_elem(hh, 4)), fptr(cp32), fptr(g4), fptr(c_new), fptr(out_h))
        want_h, want_c = ref.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
        assert_close(torch.from_numpy(c_new.reshape(B, H)), torch.from_numpy(want_c), torch.float32, k=I + H)
        want = want_h
        dg4, dco = np.empty((B * H, 4), f32), np.empty(B * H, f32)
        lib.host_lstm_bwd(n, fptr(np.ascontiguousarray(gh_.reshape(-1), dtype=f32)),
                          fptr(np.ascontiguousarray(gc_.reshape(-1), dtype=f32)), fptr(g4), fptr(c_new), fptr(cp32),
                          fptr(dg4), fptr(dco))
        dg = from_elem(dg4, 4)
        dgh, carry = dg, 0
        wants = ref.lstm_cell_backward(gh_, gc_, x, h, c, w_ih, w_hh, b_ih, b_hh)
        got_dc = dco.reshape(B, H)
        wants = (wants[0], wants[1], *wants[3:]), wants[2]
    else:
        g4 = np.empty((B * H, 4), f32)
        lib.host_gru_fwd(n, fptr(per_elem(xp, 3)), fptr(per_elem(hh, 3)), fptr(hp32), fptr(g4), fptr(out_h))
        want = ref.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
        dgi3, dgh3, car = np.empty((B * H, 3), f32), np.empty((B * H, 3), f32), np.empty(B * H, f32)
        lib.host_gru_bwd(n, fptr(np.ascontiguousarray(gh_.reshape(-1), dtype=f32)), fptr(g4), fptr(hp32), fptr(dgi3),
                         fptr(dgh3), fptr(car))
        dg, dgh, carry = from_elem(dgi3, 3), from_elem(dgh3, 3), car.reshape(B, H)
        wants = ref.gru_cell_backward(gh_, x, h, w_ih, w_hh, b_ih, b_hh)
        got_dc = None
    assert_close(torch.from_numpy(out_h.reshape(B, H)), torch.from_numpy(want), torch.float32, k=I + H, what="h'")
    if mode == "lstm":
        wants, want_dc = wants
        assert_close(torch.from_numpy(got_dc), torch.from_numpy(want_dc), torch.float32, k=G * H, what="dc")
    dg, dgh = dg.astype(np.float64), np.asarray(dgh, np.float64)
    got = (dg @ w_ih, dgh @ w_hh + carry, dg.T @ x, dgh.T @ h, dg.sum(0), dgh.sum(0))
    for name, a, b in zip(("dx", "dh", "dw_ih", "dw_hh", "db_ih", "db_hh"), got, wants):
        assert_close(torch.from_numpy(np.asarray(a)), torch.from_numpy(b), torch.float32, k=G * H, what=name)


# ----------------------------------------------------------------------------------------------
# the persistent small-batch forward (kernels/triton/rnn.py: _rnn_persist_fwd_kernel)

_PERSIST_ENV = ops.PERSISTENT_ENV


@pytest.mark.parametrize("device_type,B,H,sm,env,want", [
    ("cuda", 4, 256, 132, None, True),    # the heuristic: CUDA, small batch, H <= 1024
    ("cuda", 16, 1024, 132, "", True),
    ("cuda", 17, 256, 132, None, False),  # the heuristic: batch beyond one tile (unmeasured there)
    ("cuda", 64, 256, 132, "1", True),    # forced on: up to four batch tiles
    ("cuda", 65, 256, 132, "1", False),   # forced on but not legal
    ("cuda", 4, 1025, 132, None, False),  # hidden beyond the bound
    ("cuda", 0, 256, 132, None, False),
    ("cuda", 4, 256, 0, None, False),     # no SM to run on
    ("cuda", 4, 256, 132, "0", False),    # forced off
    ("cuda", 4, 256, 1, "1", True),
    ("cpu", 4, 13, 1, None, False),       # the heuristic never picks the interpreter
    ("cpu", 4, 13, 1, "1", True),         # forced on: one program
    ("cpu", 32, 13, 1, "1", True),        # forced on: two batch tiles, one program
])
def test_persistent_choice(device_type, B, H, sm, env, want):
    assert ops.persistent_choice(device_type, B, H, sm, env, by_default=True) is want
    # with the heuristic off only "1" opts in
    assert ops.persistent_choice(device_type, B, H, sm, env, by_default=False) is (want and env == "1")


def test_persistent_default_follows_the_h200_measurements():
    """On by default (the barrier passed on the H200) for batch <= 16, every dtype: the run at
    82f8513 measured the persistent forward faster than the per-step launches in all eight
    small-batch cases (LSTM / GRU, float32 / bfloat16, batch 4 / 16); beyond batch 16 (no
    measurement) per step unless "1" forces it. The figures are the recorded run's own."""
    import json
    import pathlib

    assert ops.PERSISTENT_BY_DEFAULT is True
    assert ops.persistent_choice("cuda", 4, 256, 132, None) is True
    assert ops.persistent_choice("cuda", 16, 512, 132, None) is True
    assert ops.persistent_choice("cuda", 17, 256, 132, None) is False
    assert ops.persistent_choice("cuda", 17, 256, 132, "1") is True
    path = pathlib.Path(__file__).parent.parent / "benchmarks/results/2026-11-30_nvidia-h200_82f8513/bench.json"
    rows = [r for r in json.loads(path.read_text())["results"]
            if r["family"] == "rnn" and "triton-persistent" in r["seconds"] and " fwd " in f" {r['name']} "]
    assert len(rows) == 8
    for r in rows:
        sec = r["seconds"]
        assert sec["triton-persistent"] < sec["triton"], (r["name"], r["shape"], sec)


@pytest.mark.parametrize("env,device_type,by_default", [("1", "cpu", False), ("", "cuda", True), (None, "cuda", True)])
def test_persistent_choice_skips_projections(env, device_type, by_default):
    assert ops.persistent_choice(device_type, 4, 64, 132, env, by_default=by_default)
    assert not ops.persistent_choice(device_type, 4, 64, 132, env, by_default=by_default, proj_size=3)


def test_persistent_opt_in_runs_projections_per_step(rng, monkeypatch):
    """GPU_NN_RNN_PERSISTENT=1 (legal size) with proj_size: the per-step path runs, correctly."""
    from gpu_nn.kernels.triton import rnn as kt

    if not gpu_nn.available_backends() or "triton" not in gpu_nn.available_backends():
        pytest.skip("triton backend not available here")
    monkeypatch.setenv(_PERSIST_ENV, "1")

    def refuse(*a, **k):
        raise AssertionError("persistent kernel launched for a projected LSTM")

    monkeypatch.setattr(kt, "persist_forward", refuse)
    monkeypatch.setattr(kt, "persist_forward_pair", refuse)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    _seq_against_reference("triton", dev, "lstm", torch.float32, rng, 3, 2, 4, 7, 2, True, (3, 2), False, P=3)


def test_persistent_choice_rejects_bad_env():
    """A value the switch cannot read is refused, naming the variable; its spellings of on / off
    (kernels.env_switch: yes, off, ...) read as 1 / 0."""
    with pytest.raises(ValueError, match=_PERSIST_ENV):
        ops.persistent_choice("cuda", 4, 256, 132, "banana")
    assert ops.persistent_choice("cuda", 40, 256, 132, "yes") is True
    assert ops.persistent_choice("cuda", 4, 256, 132, "Off") is False


def test_step_table_entries_are_chosen_by_bucket_and_compiled(monkeypatch):
    """A measured STEP_TABLE entry serves its (pass, mode, batch bucket, dot kind) and nothing
    else, and aot_specs() compiles it for every launch that can take it (both output dtypes, the
    LSTM's projection step too), so tests/test_compile.py checks it for spills."""
    from gpu_nn.kernels.triton import rnn as kt

    entry = (32, 32, 64, 8, 2)
    monkeypatch.setattr(kt, "STEP_TABLE", {("fwd", "lstm", 64, "tf32"): entry})
    assert kt.step_blocks(64, 512, "lstm", 3) == entry and kt.step_blocks(17, 512, "lstm", 3) == entry
    for B, mode, dot, bwd in ((16, "lstm", 3, False), (65, "lstm", 3, False), (64, "gru", 3, False),
                              (64, "lstm", 0, False), (64, "lstm", 2, False), (64, "lstm", 3, True)):
        assert kt.step_blocks(B, 512, mode, dot, bwd) == kt.STEP_BLOCKS
    assert kt.step_configs("lstm", 3, False) == [kt.STEP_BLOCKS, entry]
    assert kt.step_configs("lstm", 1, False) == [kt.STEP_BLOCKS] == kt.step_configs("lstm", 3, True)
    got = [(s.constexprs["PROJ"], s.signature["out_ptr"], s.signature["len_ptr"]) for s in kt.aot_specs()
           if s.name == "_rnn_step_fwd_kernel" and s.constexprs["MODE"] == 2 and s.constexprs["DOT_DT"] == 3
           and (s.constexprs["BLOCK_B"], s.constexprs["BLOCK_H"], s.constexprs["BLOCK_K"], s.num_warps,
                s.num_stages) == entry]
    # float32 io: out is float32 either way (the cells launch the sequences' kernels: lengths int64)
    assert sorted(got) == [(False, "*fp32", "*i64"), (True, "*fp32", "*i64")]
    assert kt.dot_kind(0) == "fma" and kt.dot_kind(3) == "tf32" and kt.dot_kind(1) == kt.dot_kind(2) == "half"
    assert [kt.batch_bucket(b) for b in (1, 16, 17, 64, 65)] == [16, 16, 64, 64, None]


def test_persist_programs_capped_at_sm_count():
    from gpu_nn.kernels.triton import rnn as kt

    assert kt.persist_programs(4, 1024, 132) == 64  # one program per 16-unit hidden tile
    assert kt.persist_programs(4, 1024, 20) == 20   # never more than one program per SM
    assert kt.persist_programs(16, 33, 1) == 1
    assert kt.persist_programs(17, 33, 132) == 6   # two batch tiles x three hidden tiles
    assert kt.persist_programs(64, 1024, 132) == 132
    assert kt.persist_programs(65, 33, 132) == 0
    assert ops.PERSIST_MAX_B == kt.PERSIST_MAX_B  # the ops' legal bound mirrors the kernels' own
    assert kt.persist_programs(4, 1025, 132) == 0


def test_persistent_launches_take_one_program_under_the_interpreter(monkeypatch):
    """The interpreter runs programs one after another, so a grid barrier passes only with a
    single program: CUDA tensors under TRITON_INTERPRET=1 (the interpreter copies them to the
    host) size the persistent launches as one SM, never from the device's count (16 programs
    at B = 4, H = 256 there spun at the first barrier for ever)."""
    from gpu_nn import _backend
    from gpu_nn.kernels.triton import rnn as kt

    def no_device(dev):
        raise AssertionError("the device's SM count was read")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_device)
    monkeypatch.setattr(_backend, "interpret_mode", lambda: True)
    cuda = torch.device("cuda")
    monkeypatch.delenv(ops.PERSISTENT_ENV, raising=False)
    assert ops._persist_programs(kt, cuda, 4, 256, T=1) == 1  # persistent by default at B <= 16
    assert ops._persist_pair_programs(kt, cuda, 4, 256, 1) == 1
    monkeypatch.setenv(ops.PERSISTENT_ENV, "1")
    assert ops._persist_programs(kt, cuda, 4, 256, backward=True, T=1) == 1


PERSIST_GRID = [
    # T, B, I, H, L, bi, lengths, bias, masks
    (5, 3, 4, 7, 1, False, None, True, False),
    (3, 5, 3, 13, 2, True, (3, 1, 2, 3, 2), False, True),
    (4, 1, 5, 33, 1, True, (3,), True, False),  # three hidden tiles in the one program
    # two batch tiles of 16 (B <= 64 when forced on): one direction, then a bidirectional stack
    (4, 18, 3, 9, 1, False, (4, 1, 3, 4, 2, 4, 4, 1, 3, 2, 4, 4, 3, 1, 2, 4, 3, 2), True, False),
    (3, 19, 4, 7, 2, True, (3, 1, 2, 3, 3, 2, 1, 3, 2, 3, 1, 2, 3, 3, 2, 1, 3, 2, 1), True, True),
]


def _persist_case(mode, rng, T, B, I, H, L, bi, lengths, bias, masks):
    D = 2 if bi else 1
    G = ops.GATES[mode] * H
    s = H ** -0.5
    x = randn(rng, T, B, I)
    hx = [randn(rng, L * D, B, H) for _ in range(2 if mode == "lstm" else 1)]
    params = []
    for l in range(L):
        for _ in range(D):
            params += [randn(rng, G, I if l == 0 else D * H) * s, randn(rng, G, H) * s]
            params += [randn(rng, G) * s, randn(rng, G) * s] if bias else []
    mk = torch.from_numpy((rng.uniform(size=(L - 1, T, B, D * H)) > 0.3) / 0.7) if masks and L > 1 else None
    lens = torch.tensor(lengths) if lengths is not None else None
    return x, hx, params, mk, lens


def _persist_run(mode, backend, dtype, x, hx, params, mk, lens, L, bi, bias):
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    leaves = [t.detach().to(dev, dtype).requires_grad_() for t in [x, *hx, *params]]
    n_h = len(hx)
    h, c = leaves[1], (leaves[2] if mode == "lstm" else None)
    with gpu_nn.backend(backend):
        out, hn, cn, res = torch.ops.gpu_nn.rnn_seq(leaves[0], h, c, leaves[1 + n_h:], mode, L, bi, bias, lens,
                                                     None if mk is None else mk.to(dev, dtype))
        outs = [out, hn] + ([cn] if mode == "lstm" else [])
        gs = [torch.from_numpy(np.random.default_rng(7).standard_normal(o.shape)).to(dev, dtype) for o in outs]
        grads = torch.autograd.grad(outs, leaves, gs)
    return outs, res.detach(), grads


def _persist_twin(mode, dtype, x, hx, params, lens, L, bi, bias):
    """torch's own layer (``torch.nn.RNN`` / ``LSTM`` / ``GRU`` through
    ``torch.func.functional_call``) on :func:`_persist_run`'s inputs, with its lengths as a packed
    sequence: ``(outs, grads)`` as ``_persist_run`` returns them (no reserve; the same output
    gradients; the output zero past each length, as ours). No dropout masks. On the device the
    Triton run takes."""
    from torch.nn.utils.rnn import pad_packed_sequence

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    T, B, I = x.shape
    H = hx[0].shape[-1]
    kind = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "gru": "GRU"}[mode]
    extra = {"nonlinearity": mode[4:]} if kind == "RNN" else {}
    layer = getattr(torch.nn, kind)(I, H, num_layers=L, bidirectional=bi, bias=bias, **extra).to(dev, dtype)
    leaves = [t.detach().to(dev, dtype).requires_grad_() for t in [x, *hx, *params]]
    n_h = len(hx)
    h = tuple(leaves[1:1 + n_h]) if mode == "lstm" else leaves[1]
    weights = dict(zip(layer._flat_weights_names, leaves[1 + n_h:], strict=True))
    seq = leaves[0] if lens is None else pack_padded_sequence(leaves[0], lens, enforce_sorted=False)
    y, hn = torch.func.functional_call(layer, weights, (seq, h))
    out = y if lens is None else pad_packed_sequence(y, total_length=T)[0]
    outs = [out, *hn] if mode == "lstm" else [out, hn]
    gs = [torch.from_numpy(np.random.default_rng(7).standard_normal(o.shape)).to(dev, dtype) for o in outs]
    return outs, torch.autograd.grad(outs, leaves, gs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
def test_persist_twin_is_torchs_layer(mode, bias, rng):
    """The twin whose TF32 error scales the GPU bound of the resident-weight tests, in float64
    (no TF32): every output and gradient as the reference's on the same inputs, lengths and two
    bidirectional layers included, so on a GPU its error is TF32's alone."""
    cfg = (5, 3, 4, 6, 2, True, (5, 2, 4), bias, False)
    T, B, I, H, L, bi, lengths, bias, masks = cfg
    x, hx, params, mk, lens = _persist_case(mode, rng, *cfg)
    r_outs, _, r_grads = _persist_run(mode, "reference", torch.float64, x, hx, params, mk, lens, L, bi, bias)
    with _native_tf32():
        t_outs, t_grads = _persist_twin(mode, torch.float64, x, hx, params, lens, L, bi, bias)
    assert len(t_outs) == len(r_outs) and len(t_grads) == len(r_grads)
    for a, b in zip([*t_outs, *t_grads], [*r_outs, *r_grads]):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=1e-10, atol=1e-10)


def test_persistent_loops_past_the_barrier_count_run_per_step(monkeypatch, rng):
    """The persistent kernels' grid barrier counts arrivals in an int32 ((s + 1) x programs at step
    s): a time loop whose steps x programs pass BARRIER_COUNT_MAX runs per step instead (there the
    target wrapped and programs read states not yet written). The bound lowered to 4 x the pair
    kernel's programs (one here, the launcher's count on a GPU): a bidirectional LSTM of T = 4 runs
    the pair kernel; one whose steps x programs pass the bound for one direction's kernel as well
    (T = 5 here) runs per step; both against the reference; the program counts of both launch
    kinds, forward and backward, at and past the bound."""
    pytest.importorskip("triton")
    from gpu_nn.kernels.triton import rnn as kt

    monkeypatch.setenv(_PERSIST_ENV, "1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    K = kt
    for backward in (False, True):
        n = ops._persist_programs(K, dev, 2, 3, backward=backward, T=1)
        monkeypatch.setattr(ops, "BARRIER_COUNT_MAX", 4 * n)
        assert n >= 1 and ops._persist_programs(K, dev, 2, 3, T=4, backward=backward) == n
        assert ops._persist_programs(K, dev, 2, 3, T=5, backward=backward) == 0
    n2 = ops._persist_pair_programs(K, dev, 2, 3, 1)
    monkeypatch.setattr(ops, "BARRIER_COUNT_MAX", 4 * n2)
    assert n2 >= 1 and ops._persist_pair_programs(K, dev, 2, 3, 4) == n2 and ops._persist_pair_programs(K, dev, 2, 3, 5) == 0
    calls = []
    real, real_pair = kt.persist_forward, kt.persist_forward_pair
    monkeypatch.setattr(kt, "persist_forward", lambda *a: (calls.append(("one", a[-1])), real(*a)))
    monkeypatch.setattr(kt, "persist_forward_pair", lambda *a: (calls.append(("pair", a[-1])), real_pair(*a)))
    m = gnn.LSTM(3, 4, bidirectional=True)
    past = 4 * n2 // ops._persist_programs(K, dev, 2, 4, T=1) + 1  # steps x one direction's programs past it
    for T, launched in ((4, [("pair", n2)]), (past, [])):
        x = randn(rng, T, 2, 3).float()
        calls.clear()
        with gpu_nn.backend("triton"):
            y = m.to(dev)(x.to(dev))[0]
        with gpu_nn.backend("reference"):
            want = m.cpu()(x)[0]
        assert calls == launched, (T, calls)
        assert_close(y.cpu(), want, torch.float32, k=16, what=f"T={T}")


# the Elman modes share one kernel but for the activation (a constexpr): each shape runs one of
# them, in turn, beside the LSTM and the GRU
ELMAN_IN_TURN = ("rnn_tanh", "rnn_relu")


@pytest.mark.parametrize("cfg,mode", [(c, m) for i, c in enumerate(PERSIST_GRID)
                                      for m in (ELMAN_IN_TURN[i % 2], "lstm", "gru")],
                         ids=lambda v: v if isinstance(v, str) else "T{}B{}H{}L{}{}{}{}{}".format(
                             v[0], v[1], v[3], v[4], "bi" if v[5] else "", "len" if v[6] else "",
                             "" if v[7] else "nobias", "mask" if v[8] else ""))
def test_persistent_forward_matches_reference(mode, cfg, rng, monkeypatch):
    """Outputs, final states, every reserve entry, and the gradients of the per-step backward
    that reads that reserve, against the float64 reference. In the interpreter with exactly one
    program (programs run one after another there, so a grid barrier across several would never
    open); on a GPU with the launcher's program count."""
    pytest.importorskip("triton")
    from gpu_nn.kernels.triton import rnn as kt

    T, B, I, H, L, bi, lengths, bias, masks = cfg
    x, hx, params, mk, lens = _persist_case(mode, rng, *cfg)
    r_outs, r_res, r_grads = _persist_run(mode, "reference", torch.float64, x, hx, params, mk, lens, L, bi, bias)
    calls = []
    real, real_pair = kt.persist_forward, kt.persist_forward_pair
    monkeypatch.setattr(kt, "persist_forward", lambda *a: (calls.append(a[-1]), real(*a)))
    monkeypatch.setattr(kt, "persist_forward_pair", lambda *a: (calls.append(a[-1]), real_pair(*a)))
    monkeypatch.setenv(_PERSIST_ENV, "1")
    for dtype in (torch.float32, torch.float16):
        calls.clear()
        o_outs, o_res, o_grads = _persist_run(mode, "triton", dtype, x, hx, params, mk, lens, L, bi, bias)
        # one launch per layer: a bidirectional layer's two directions share it
        assert len(calls) == L, "the persistent kernel did not run"
        assert all(c == 1 for c in calls) or torch.cuda.is_available()
        for i, (a, b) in enumerate(zip(o_outs, r_outs)):
            assert a.dtype == dtype
            assert_close(a, b, dtype, k=4 * H, what=f"{mode} output {i}")
        # the reserve is float32 for every io dtype; its error is that of the io dtype's inputs
        assert_close(o_res, r_res, dtype, k=4 * H, what=f"{mode} reserve")
        for i, (a, b) in enumerate(zip(o_grads, r_grads)):
            assert_close(a, b, dtype, k=T * B * 4 * H, what=f"{mode} grad {i}")


def test_resident_kp_takes_one_tile_per_program_and_tensor_core_dots(monkeypatch):
    """The persistent forward keeps W_hh on the SM (KP > 0) only with one program per tile, a
    tensor-core dot code and H <= RESIDENT_MAX_KP; KP is the power of two >= max(H, 16);
    GPU_NN_RNN_RESIDENT=0 turns it off, anything but 0 / 1 / unset is refused."""
    from gpu_nn.kernels.triton import rnn as kt

    monkeypatch.delenv(kt.RESIDENT_ENV, raising=False)
    tf32, bf16, fp16, fma = (kt.DOT_CODES[k] for k in ("tf32", "bf16", "fp16", "fp32"))
    assert kt.resident_kp(7, tf32, 1, 1) == 16
    assert kt.resident_kp(17, bf16, 2, 2) == 32
    assert kt.resident_kp(512, fp16, 32, 32) == 512 == kt.RESIDENT_MAX_KP
    assert kt.resident_kp(513, tf32, 33, 33) == 0  # past RESIDENT_MAX_KP
    assert kt.resident_kp(64, fma, 4, 4) == 0  # FMA dots hold their operands in registers
    assert kt.resident_kp(64, tf32, 8, 4) == 0  # programs that take turns at tiles
    # the backward's resident form stops at KP 256 (RESIDENT_BWD_MAX_KP: wrong on the H200 at 512)
    assert kt.resident_kp(256, tf32, 16, 16, True) == 256 == kt.RESIDENT_BWD_MAX_KP
    assert kt.resident_kp(257, tf32, 17, 17, True) == 0 and kt.resident_kp(512, bf16, 32, 32, True) == 0
    assert kt.resident_kp(257, tf32, 17, 17) == 512  # the forward's keeps going
    monkeypatch.setenv(kt.RESIDENT_ENV, "0")
    assert kt.resident_kp(7, tf32, 1, 1) == 0
    monkeypatch.setenv(kt.RESIDENT_ENV, "1")
    assert kt.resident_kp(7, tf32, 1, 1) == 16
    monkeypatch.setenv(kt.RESIDENT_ENV, "banana")
    with pytest.raises(ValueError, match=kt.RESIDENT_ENV):
        kt.resident_kp(7, tf32, 1, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("H,block_h", [(7, 16), (16, 16), (40, 64)])
def test_resident_weights_forward_matches_reference(mode, H, block_h, rng, monkeypatch):
    """The persistent forward with W_hh resident (``_resident_w`` / ``_resident_dot``: every
    gate's rows of the tile as one [4 * BLOCK_H, KP] operand, h_{t-1} as one [KP, B] load, the
    gates split off the product) against the float64 reference, outputs, final states, reserve
    and the gradients through it, float32 (TF32 dots) / float16 / bfloat16, lengths and a bias;
    the gradients through the persistent backward with the same rows resident
    (``_resident_bwd_tile``: each step's W_hh-side gate gradients joined into one [4 * BLOCK_H,
    B] operand, its shares of dh_{t-1} through the share buffer). One tile per program: one tile
    in all, so that the interpreter's single program holds it (a 64-unit tile for H = 40 puts
    KP = 64 above the tile's 16 default rows and masks 24 units and columns); the launches,
    forward then backward, are checked to take KP > 0. The multi-program forms run in the
    tests below (test_resident_weights_follow_each_programs_tile,
    test_resident_backward_shares_cross_the_tiles, and on a GPU
    test_resident_weights_on_gpu_match_reference)."""
    pytest.importorskip("triton")
    from gpu_nn.kernels.triton import rnn as kt

    cfg = (5, 3, 4, H, 1, False, (5, 2, 4), True, False)
    T, B, I, H, L, bi, lengths, bias, masks = cfg
    x, hx, params, mk, lens = _persist_case(mode, rng, *cfg)
    r_outs, r_res, r_grads = _persist_run(mode, "reference", torch.float64, x, hx, params, mk, lens, L, bi, bias)
    monkeypatch.setattr(kt, "PERSIST_BLOCKS", (16, block_h, 32))
    kps = []
    real = kt.resident_kp
    monkeypatch.setattr(kt, "resident_kp", lambda *a: (kps.append(real(*a)), kps[-1])[1])
    monkeypatch.setenv(_PERSIST_ENV, "1")
    monkeypatch.delenv(kt.RESIDENT_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kps.clear()
        o_outs, o_res, o_grads = _persist_run(mode, "triton", dtype, x, hx, params, mk, lens, L, bi, bias)
        assert kps == [max(16, 1 << (H - 1).bit_length())] * 2, kps  # the forward's, the backward's
        # float32 runs TF32 dots (allow_tf32 on): a GPU rounds their operands to TF32's 10-bit
        # mantissa, so its bound is TF32's (the interpreter computes the dots in float32), widened
        # by torch's own TF32 error on the same inputs as _seq_against_reference's (DESIGN section
        # 4): its layer through cuDNN and natively, the lengths packed (_persist_twin). The reserve
        # has no twin: the outputs' scale
        tf32 = dtype == torch.float32 and torch.cuda.is_available()
        twins = []
        if tf32:
            twins.append(_persist_twin(mode, dtype, x, hx, params, lens, L, bi, bias))
            with _native_tf32():
                twins.append(_persist_twin(mode, dtype, x, hx, params, lens, L, bi, bias))

        def close(a, b, k, what, theirs, want):
            # theirs: the twins' results for what ``b`` is, ``want`` their reference (the reserve's:
            # the output's)
            if tf32:
                _assert_tf32_close(a, b, k, what, [max_rel_err(t, want) for t in theirs])
            else:
                assert_close(a, b, dtype, k=k, what=what)

        for i, (a, b) in enumerate(zip(o_outs, r_outs)):
            close(a, b, 4 * H, f"{mode} output {i}", [outs[i] for outs, _ in twins], b)
        close(o_res, r_res, 4 * H, f"{mode} reserve", [outs[0] for outs, _ in twins], r_outs[0])
        for i, (a, b) in enumerate(zip(o_grads, r_grads)):
            close(a, b, T * B * 4 * H, f"{mode} grad {i}", [grads[i] for _, grads in twins], b)


@pytest.mark.parametrize("mode", ("rnn_tanh", "lstm", "gru"))  # rnn_relu: rnn_tanh's kernel but for the activation
@pytest.mark.parametrize("tf32", (True, False), ids=("resident", "l2"))
def test_persistent_layers_across_concurrent_programs(mode, tf32, rng, monkeypatch):
    """The layer driver's persistent path with as many programs as a GPU gives it (one per
    tile: the interpreter's programs concurrent, concurrent_programs, with the device's SM count
    faked to 132): a two-layer bidirectional stack, B=20 H=33 (6 tiles a direction, 12 for the
    pair kernels), lengths, dropout masks, forward and backward persistent (GPU_NN_RNN_PERSISTENT=1),
    against the float64 reference: outputs, final states, reserve and every gradient. TF32 on,
    W_hh resident in both passes (KP 64); off, the exact dots re-reading it from L2."""
    from gpu_nn.kernels.triton import rnn as kt

    if torch.cuda.is_available():
        pytest.skip("the GPU runs the persistent kernels with its own program counts (tests above)")
    cfg = (4, 20, 5, 33, 2, True, tuple(int(v) for v in rng.integers(1, 5, size=20)), True, True)
    T, B, I, H, L, bi, lengths, bias, masks = cfg
    x, hx, params, mk, lens = _persist_case(mode, rng, *cfg)
    r_outs, r_res, r_grads = _persist_run(mode, "reference", torch.float64, x, hx, params, mk, lens, L, bi, bias)
    monkeypatch.setattr(ops, "_barrier_sms", lambda dev: 132)
    monkeypatch.setenv(_PERSIST_ENV, "1")
    monkeypatch.delenv(kt.RESIDENT_ENV, raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    programs, kps = [], []
    for name in ("persist_forward_pair", "persist_backward_pair"):
        real = getattr(kt, name)
        monkeypatch.setattr(kt, name, (lambda r: lambda *a: (programs.append(a[-1]), r(*a))[1])(real))
    real_kp = kt.resident_kp
    monkeypatch.setattr(kt, "resident_kp", lambda *a: (kps.append(real_kp(*a)), kps[-1])[1])
    with concurrent_programs():
        o_outs, o_res, o_grads = _persist_run(mode, "triton", torch.float32, x, hx, params, mk, lens, L, bi, bias)
    assert programs == [12] * (2 * L), programs  # every layer's both directions, forward and backward
    assert kps == ([64] if tf32 else [0]) * (2 * L), kps
    for i, (a, b) in enumerate(zip(o_outs, r_outs)):
        assert_close(a, b, torch.float32, k=4 * H, what=f"{mode} output {i}")
    assert_close(o_res, r_res, torch.float32, k=4 * H, what=f"{mode} reserve")
    for i, (a, b) in enumerate(zip(o_grads, r_grads)):
        assert_close(a, b, torch.float32, k=T * B * 4 * H, what=f"{mode} grad {i}")


def test_concurrent_programs_open_the_grid_barrier(monkeypatch):
    """tests/helpers.concurrent_programs (under the interpreter): the persistent kernels' grid
    barrier opens with every program running at once, each then reading what all the others
    stored before it; a program that raises stops the launch (the others, spinning at the
    barrier, give up at their next atomic) and its error comes out, at once."""
    if torch.cuda.is_available():
        pytest.skip("tests the interpreter's concurrent programs (on a GPU programs are concurrent anyway)")
    import threading
    import time

    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interp

    from gpu_nn.kernels.triton.rnn import _grid_barrier

    # a jit function resolves names in its module's globals (and the interpreter wants tl there)
    monkeypatch.setitem(globals(), "tl", tl)
    monkeypatch.setitem(globals(), "_grid_barrier", _grid_barrier)

    @triton.jit
    def kernel(x_ptr, y_ptr, count_ptr):
        pid = tl.program_id(0)
        tl.store(x_ptr + pid, pid + 1)
        _grid_barrier(count_ptr, tl.num_programs(0))
        tl.store(y_ptr + pid, tl.sum(tl.load(x_ptr + tl.arange(0, 4)), axis=0))

    def launch():
        y = torch.zeros(4, dtype=torch.int32)
        kernel[(4,)](torch.zeros(4, dtype=torch.int32), y, torch.zeros(1, dtype=torch.int32))
        return y

    with concurrent_programs():
        assert launch().tolist() == [10] * 4
    real = interp.InterpreterBuilder.create_store

    def store(self, *args, **kwargs):
        if self.grid_idx[0] == 1:
            raise RuntimeError("program 1 fails")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_store", store)
    threads, t0 = threading.active_count(), time.monotonic()
    with pytest.raises(RuntimeError, match="program 1 fails"), concurrent_programs(timeout_s=60):
        launch()
    assert time.monotonic() - t0 < 30 and threading.active_count() == threads


def _resident_tiles_setup(dot, monkeypatch):
    """What the two tests below share: the device (the GPU where there is one), the dot code and
    weight dtype of ``dot`` ("tf32": float32 weights, "bf16"), the resident form allowed, and the
    KP of every persistent launch recorded (``kps``, in launch order; the final dh0 step passes
    none). Returns (kernel module, device, dot code, dtype, kps)."""
    from gpu_nn.kernels.triton import rnn as kt

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    code, dtype = {"tf32": (kt.DOT_CODES["tf32"], torch.float32), "bf16": (kt.DOT_CODES["bf16"], torch.bfloat16)}[dot]
    real, kps = kt.launch_kernel, []

    def launch(kernel, grid, *args, **kw):
        if "KP" in kw:
            kps.append(kw["KP"])
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(kt, "launch_kernel", launch)
    monkeypatch.delenv(kt.RESIDENT_ENV, raising=False)
    return kt, dev, code, dtype, kps


# the two dot precisions (W_hh resident in float32 or bfloat16) over the tile tests' other two
# factors in a Latin rectangle (helpers.latin_cover): every pair of the three factors meets
@pytest.mark.parametrize("pair,mode,dot", [
    pytest.param(p, m, d, id=f"{'pair' if p else 'one'}-{d}-{m}")
    for p, m, d in latin_cover((False, True), ("rnn_tanh", "lstm", "gru"), ("tf32", "bf16"))])
def test_resident_weights_follow_each_programs_tile(mode, dot, pair, rng, monkeypatch):
    """Several programs, one tile each (B=20, H=33: two batch tiles x three hidden tiles a
    direction), each loading its own tile's W_hh rows (``_resident_w`` at ``pid % nh``; in the
    two-direction kernel the direction and hidden tile ``_pair_tile`` gives ``pid``) and reading
    the others' h_{t-1} after the grid barrier, all concurrent (concurrent_programs under the
    interpreter, the real grid on a GPU), against one program re-reading W_hh from L2 (KP = 0),
    dense W_hh, the reverse direction and lengths included; so does the L2 form in 5 programs
    that take turns at the tiles. The dot orders held to a bound far below what a wrong tile's
    rows or a missed barrier make (units)."""
    kt, dev, code, dtype, kps = _resident_tiles_setup(dot, monkeypatch)
    T, B, H = 4, 20, 33
    lens = torch.from_numpy(rng.integers(1, T + 1, size=B)).to(dev)
    G, S = ops.GATES[mode] * H, ref.STORED[mode] * H or H
    dirs = [[t if t is None else t.to(dev) for t in (
             torch.from_numpy(rng.standard_normal((T, B, S))).float(),
             torch.from_numpy(rng.standard_normal((T + 1, B, H))).float(),
             torch.from_numpy(rng.standard_normal((T + 1, B, H))).float() if mode == "lstm" else None,
             (torch.from_numpy(rng.standard_normal((G, H))) * H ** -0.5).to(dtype),
             torch.from_numpy(rng.standard_normal(G)).to(dtype) if mode == "gru" else None)]
            for _ in range(2 if pair else 1)]
    tiles = (2 if pair else 1) * kt.persist_tiles(B, H)
    assert tiles == (12 if pair else 6)

    def run(programs):
        bufs = [[None if t is None else t.clone() for t in d] + [torch.zeros(T, B, H, dtype=dtype, device=dev), None]
                for d in dirs]
        with concurrent_programs():
            if pair:
                kt.persist_forward_pair(mode, bufs[0], bufs[1], lens, code, programs)
            else:
                kt.persist_forward(mode, *bufs[0], lens, True, code, programs)
        return [t for d in bufs for t in d if t is not None]

    # resident (one program a tile), the L2 form in 5 programs taking turns at the tiles, in one
    resident, dealt, l2 = run(tiles), run(5), run(1)
    assert kps == [max(16, 1 << (H - 1).bit_length()), 0, 0]
    tol = 1e-6 if dev == "cpu" else 2e-2  # the interpreter's dots are exact; the GPU's sum in other orders
    for a, b in zip(dealt, l2):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    for a, b in zip(resident, l2):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("way,mode,dot", [  # rnn_relu: rnn_tanh's kernel but for the activation
    pytest.param(w, m, d, id=f"{w}-{d}-{m}")
    for w, m, d in latin_cover(("forward", "reverse", "pair"), ("rnn_tanh", "lstm", "gru"), ("tf32", "bf16"))])
def test_resident_backward_shares_cross_the_tiles(mode, dot, way, rng, monkeypatch):
    """The resident persistent backward across programs (B=20, H=33: two batch tiles x three
    hidden tiles a direction, one program each, all concurrent: concurrent_programs under the
    interpreter, the real grid on a GPU): every program's share of dh_{t-1}, dG_t times its own
    W_hh rows, reaches every hidden tile of its batch tile through the share buffer's two step
    slots (T = 4: slot 0 written at steps 0 and 2), against one program of the L2 form (which reads dG and
    W_hh itself), dense W_hh, lengths, one direction forward and reverse and the pair kernel; so
    does the L2 form in 5 programs that take turns at the tiles. A share read from the wrong
    slot, tile or batch tile, left out of the sum, written for part of the units, or read before
    the barrier changes the carry and the gate gradients by whole units. The second batch tile's
    rows end after step 1: its steps past that write no shares, and the step after each of those
    reads none (forward: steps 3 and 2 write none and steps 2 and 1 read none; reverse: step 2
    writes none and step 3 reads none). The buffer starts NaN, so a share read that was never
    written poisons the result, and the slot a skipped forward step would have written stays NaN."""
    kt, dev, code, dtype, kps = _resident_tiles_setup(dot, monkeypatch)
    T, B, H = 4, 20, 33
    pair, reverse = way == "pair", way == "reverse"
    # the pair's final dh0 step is the step kernel's, the same after either form: left out
    monkeypatch.setattr(kt, "_final_pair_step", lambda *a, **k: None)
    real_bufs, shares = kt._barrier_and_shares, []

    def bufs_(*a):  # the shares NaN until written: a share read before it is written poisons the sums
        count, ws = real_bufs(*a)
        if a[0]:  # resident (KP > 0); else ws is the counter itself
            shares.append(ws.fill_(float("nan")))
        return count, ws

    monkeypatch.setattr(kt, "_barrier_and_shares", bufs_)
    lens = torch.from_numpy(rng.integers(1, T + 1, size=B)).to(dev)
    lens[0] = T
    # the second batch tile (rows 16..19) ends after step 1: no shares at steps 2 and 3
    lens[16:] = torch.from_numpy(rng.integers(1, 3, size=B - 16)).to(dev)
    lens[16] = 2
    G, S = ops.GATES[mode] * H, ref.STORED[mode] * H

    def direction():
        u = lambda *shape: torch.from_numpy(rng.uniform(0.05, 0.95, size=shape)).float().to(dev)  # noqa: E731
        return dict(w_hh=(torch.from_numpy(rng.standard_normal((G, H))) * H ** -0.5).to(dtype).to(dev),
                    carry=torch.from_numpy(rng.standard_normal((B, H))).float().to(dev),
                    dc=torch.from_numpy(rng.standard_normal((B, H))).float().to(dev) if mode == "lstm" else None,
                    dout=torch.from_numpy(rng.standard_normal((T, B, H))).to(dtype).to(dev),
                    g=u(T, B, S) if S else None, hs=u(T + 1, B, H), cs=u(T + 1, B, H) if mode == "lstm" else None)

    dirs = [direction() for _ in range(2 if pair else 1)]
    tiles = (2 if pair else 1) * kt.persist_tiles(B, H)
    assert tiles == (12 if pair else 6)

    def run(programs):
        outs = []
        for d in dirs:
            bufs = {k: None if v is None else v.clone() for k, v in d.items()}
            bufs["dgi"] = torch.full((T, B, G), 7.0, device=dev)  # every entry written
            bufs["dgh"] = torch.full((T, B, G), 7.0, device=dev) if mode == "gru" else bufs["dgi"]
            outs.append(bufs)
        with concurrent_programs():
            if pair:
                f, r = ([b["w_hh"], b["carry"], b["dc"], b["dout"], b["g"], b["hs"], b["cs"], b["dgi"],
                         b["dgh"] if mode == "gru" else None, None] for b in outs)
                kt.persist_backward_pair(mode, f, r, lens, code, programs)
            else:
                b = outs[0]
                kt.loop_backward(mode, b["w_hh"], b["carry"], b["dc"], b["dout"], b["g"], b["hs"], b["cs"], b["dgi"],
                                 b["dgh"], lens, reverse, code, programs)
        return [b[k] for b in outs for k in ("carry", "dc", "dgi", "dgh") if b[k] is not None]

    # resident (one program a tile), the L2 form in 5 programs taking turns at the tiles, in one
    resident, dealt, l2 = run(tiles), run(5), run(1)
    assert kps == [max(16, 1 << (H - 1).bit_length()), 0, 0], kps
    for a, b in zip(dealt, l2):
        torch.testing.assert_close(a, b, rtol=1e-5 if dev == "cpu" else 2e-2, atol=1e-5 if dev == "cpu" else 2e-2)
    # each direction's shares in its own part of the buffer, [step slot, batch tile, hidden tile, H, 16]
    halves = shares[0].view(len(dirs), 2, 2, 3, H, 16)
    assert halves[0].numel() == kt.resident_ws_size(B, H)
    for r, h in enumerate(halves):
        assert h[:, 0].isfinite().all() and h[:, 0].abs().max() > 0  # batch tile 0: every step's shares
        # batch tile 1, the forward direction: steps 3, 2 (s = 0, 1) skipped, step 1 (s = 2) writes
        # slot 0, step 0 (the last processed) none; reverse: steps 0, 1 write, step 2 skipped, 3 the last
        skipped = not (reverse or r == 1)
        assert h[0, 1].isfinite().all() and h[1, 1].isnan().all() == skipped and h[1, 1].isfinite().all() != skipped
    tol = 1e-5 if dev == "cpu" else 2e-2  # the same products summed in other orders
    for a, b in zip(resident, l2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: up to hundreds of programs at these sizes, too slow for the interpreter "
                           "(the multi-program mechanics run on the CPU at small sizes, concurrent_programs: "
                           "test_resident_weights_follow_each_programs_tile, test_resident_backward_shares_cross_the_tiles)")
@pytest.mark.parametrize("mode", ("rnn_tanh", "lstm", "gru"))  # rnn_relu: rnn_tanh's kernel but for the activation
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("B,H,bi", [(4, 512, True), (16, 256, False), (64, 512, False), (32, 32, True)])
def test_resident_weights_on_gpu_match_reference(mode, dtype, B, H, bi, rng, monkeypatch):
    """The resident-weight persistent forward as the GPU runs it, many programs across the grid
    barrier: float32 with TF32 (torch's default, which the resident form needs) and bfloat16, at
    KP 512 (bidirectional: 64 programs; B=64: 128, one per tile), 256 and 32 (the demo's layers),
    two layers, against the float64 reference (outputs and gradients through the persistent
    backward), the forward launches checked to take the full KP, the backward's up to
    RESIDENT_BWD_MAX_KP (above it, W_hh from L2)."""
    from gpu_nn.kernels.triton import rnn as kt

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setenv(_PERSIST_ENV, "1")
    monkeypatch.delenv(kt.RESIDENT_ENV, raising=False)
    kps = []
    real = kt.resident_kp
    # (backward?, KP) of every persistent launch
    monkeypatch.setattr(kt, "resident_kp", lambda *a: (kps.append((len(a) > 4 and a[4], real(*a))), kps[-1][1])[1])
    _seq_against_reference("triton", "cuda", mode, dtype, rng, 6, B, 16, H, 2, bi, None, False, tf32=True)
    full = max(16, 1 << (H - 1).bit_length())
    bwd = full if full <= kt.RESIDENT_BWD_MAX_KP else 0  # H = 512: the backward reads W_hh from L2
    assert any(b for b, _ in kps) and all(k == (bwd if b else full) for b, k in kps), kps


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: 64 and 128 programs at KP 512, too slow for the interpreter (the compiled "
                           "form's operand layout is checked on the CPU: tests/test_compile.py, "
                           "test_wide_transposed_float32_operands_found_and_the_resident_backward_has_none)")
@pytest.mark.parametrize("mode", ("rnn_tanh", "lstm"))
@pytest.mark.parametrize("B,bi", [(4, True), (64, False)])
def test_resident_backward_at_kp512_on_gpu(mode, B, bi, rng, monkeypatch):
    """The resident persistent backward at KP 512, which RESIDENT_BWD_MAX_KP keeps off by default:
    on the H200 at a331102 its float32 (TF32) input gradient was wrong (B=4 H=512 bidirectional:
    0.78 Elman, 0.45 LSTM), the cause Triton's store of the transposed W_hh operand past 256
    rows (found by emulating the sm_90 PTX; W_hh is now loaded transposed). Forced here, float32
    under TF32, one and two directions, against the float64 reference: once a GPU run passes it,
    the bound can go back to RESIDENT_MAX_KP."""
    from gpu_nn.kernels.triton import rnn as kt

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setenv(_PERSIST_ENV, "1")
    monkeypatch.delenv(kt.RESIDENT_ENV, raising=False)
    monkeypatch.setattr(kt, "RESIDENT_BWD_MAX_KP", 512)
    kps = []
    real = kt.resident_kp
    monkeypatch.setattr(kt, "resident_kp", lambda *a: (kps.append((len(a) > 4 and a[4], real(*a))), kps[-1][1])[1])
    _seq_against_reference("triton", "cuda", mode, torch.float32, rng, 6, B, 16, 512, 2, bi, None, False, tf32=True)
    assert any(b for b, _ in kps) and all(k == 512 for _, k in kps), kps


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: up to hundreds of programs at these sizes, too slow for the interpreter "
                           "(the multi-program mechanics run on the CPU at small sizes, concurrent_programs: "
                           "test_resident_weights_follow_each_programs_tile, test_resident_backward_shares_cross_the_tiles)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H", [(4, 256), (16, 1000), (3, 1024), (40, 200)])
def test_persistent_multi_program_matches_per_step_on_gpu(mode, B, H, rng, monkeypatch):
    """Many programs across a grid barrier per step (min(ceil(H / 16), SMs) of them) against the
    per-step launches: outputs, final states and the reserve, float32; launched twice so a stale
    barrier counter would show; then the float64 reference."""
    from gpu_nn.kernels.triton import rnn as kt

    T, I, L, bi = 20, 64, 2, True
    lengths = tuple(int(v) for v in rng.integers(1, T + 1, size=B))
    x, hx, params, mk, lens = _persist_case(mode, rng, T, B, I, H, L, bi, lengths, True, True)
    dev = torch.device("cuda")
    programs = kt.persist_programs(B, H, torch.cuda.get_device_properties(dev).multi_processor_count)
    assert programs > 1

    def run(env):
        monkeypatch.setenv(_PERSIST_ENV, env)
        leaves = [t.to(dev, torch.float32) for t in [x, *hx, *params]]
        n_h = len(hx)
        with gpu_nn.backend("triton"):
            out, hn, cn, res = torch.ops.gpu_nn.rnn_seq(
                leaves[0], leaves[1], leaves[2] if mode == "lstm" else None, leaves[1 + n_h:], mode, L, bi, True, lens,
                mk.to(dev, torch.float32))
        return [out, hn, cn, res]

    names = ("out", "h_n", "c_n")
    r_outs, r_res, _ = _persist_run(mode, "reference", torch.float64, x, hx, params, mk, lens, L, bi, True)

    def read(res):  # the reserve without the gates of ended steps, which the per-step launches leave as they come
        return _reserve_read(res, mode, T, B, H, L, bi, lengths)

    step = run("0")
    # the per-step launches (the default above one batch tile) against the reference first, so
    # that a failure says which side is wrong (the H200 at a331102: persistent vs per-step failed
    # at B=40, H=200 in the reserve)
    for name, a, b in zip(names, step, r_outs):
        assert_close(a.cpu(), b, torch.float32, k=4 * H, what=f"{mode} per-step {name} vs reference")
    assert_close(read(step[3]), read(r_res), torch.float32, k=4 * H, what=f"{mode} per-step reserve vs reference")
    for _ in range(2):
        pers = run("1")
        for name, a, b in zip(names, pers, step):
            assert_close(a.cpu(), b.cpu().double(), torch.float32, k=4 * H, what=f"{mode} persistent {name} vs per-step"
                         + (f" (batch rows with an error: {_bad_rows(a, b)})" if a.dim() >= 2 else ""))
        assert_close(read(pers[3]), read(step[3]), torch.float32, k=4 * H, what=f"{mode} persistent reserve vs per-step")
    for a, b in zip(pers[:len(r_outs)], r_outs):
        assert_close(a.cpu(), b, torch.float32, k=4 * H, what=f"{mode} persistent vs reference")
    assert_close(pers[3].cpu(), r_res, torch.float32, k=4 * H, what=f"{mode} reserve vs reference")


def _reserve_read(res, mode, T, B, H, L, bi, lengths):
    """A float64 CPU copy of reserve ``res`` with the gates of every ended step (t >= len[b]) set
    to zero: no backward reads them, and the per-step launches leave them as they come (a batch
    tile whose sequences have all ended skips the recurrent product). On the H200 at a331102 the
    persistent-vs-per-step GPU test failed at B=40 in the reserve, relative errors 0.37 (LSTM) and
    0.86 (GRU); under the interpreter the per-step reserve differs from the reference in exactly
    those entries (LSTM 0.37) while the persistent one matches it whole."""
    r = res.detach().double().cpu().clone()
    views = ops._reserve_views(r, mode, T, B, H, L, 2 if bi else 1, 0)
    ended = torch.arange(T)[:, None] >= torch.tensor(lengths)[None, :]  # [T, B]
    for key, v in views.items():
        if key[0] == "gates":
            v[ended] = 0.0
    return r


def test_reserve_read_leaves_only_what_a_backward_reads(rng, monkeypatch):
    """_reserve_read's premise: with unequal lengths over several batch tiles (one of them all
    ended at later steps), the per-step and persistent forwards' reserves differ only in the
    gates of ended steps (here under the interpreter, or on a GPU), and agree once those are
    set aside; outputs and final states agree outright."""
    pytest.importorskip("triton")
    mode, T, I, L, bi, B, H = "lstm", 8, 4, 1, True, 20, 16
    lengths = (8,) * 4 + tuple(int(v) for v in rng.integers(1, 4, size=B - 4))  # tile 2 (rows 16..19) ends early
    x, hx, params, mk, lens = _persist_case(mode, rng, T, B, I, H, L, bi, lengths, True, True)

    def run(env):
        monkeypatch.setenv(_PERSIST_ENV, env)
        return _persist_run(mode, "triton", torch.float32, x, hx, params, mk, lens, L, bi, True)

    (s_outs, s_res, _), (p_outs, p_res, _) = run("0"), run("1")
    for a, b in zip(p_outs, s_outs):
        assert_close(a.detach().cpu(), b.detach().cpu().double(), torch.float32, k=4 * H, what="outputs")
    assert (s_res.double() - p_res.double()).abs().max() > 1e-3  # the ended steps' gates differ
    a, b = (_reserve_read(r, mode, T, B, H, L, bi, lengths) for r in (p_res, s_res))
    assert_close(a, b, torch.float32, k=4 * H, what="reserve read by the backward")


def _bad_rows(a, b) -> list:
    """Indices of axis 1 (the batch of [T, B, *] / [L*D, B, *]) where ``a`` and ``b`` differ by more
    than 1e-3 relative to b's largest magnitude: which batch tiles a wrong persistent result
    touches."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape or a.numel() == 0:
        return []
    err = (a - b).abs().transpose(0, 1).reshape(a.shape[1], -1).amax(1)
    return [i for i, e in enumerate(err.tolist()) if e > 1e-3 * max(float(b.abs().max()), 1e-30)]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: up to hundreds of programs at these sizes, too slow for the interpreter "
                           "(the multi-program mechanics run on the CPU at small sizes, concurrent_programs: "
                           "test_resident_weights_follow_each_programs_tile, test_resident_backward_shares_cross_the_tiles)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,H", [(4, 256), (16, 1000), (40, 200)])
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_persistent_backward_multi_program_matches_per_step_on_gpu(mode, B, H, bi, rng, monkeypatch):
    """The persistent backward (GPU_NN_RNN_PERSISTENT=1: one launch per layer and direction, or
    per bidirectional layer, many programs across a grid barrier per step) against the per-step
    backward: every gradient of a two-layer stack with unequal lengths and dropout masks,
    float32; run twice so a stale barrier counter would show; then the float64 reference."""
    from gpu_nn.kernels.triton import rnn as kt

    T, I, L = 20, 64, 2
    lengths = tuple(int(v) for v in rng.integers(1, T + 1, size=B))
    x, hx, params, mk, lens = _persist_case(mode, rng, T, B, I, H, L, bi, lengths, True, True)
    assert kt.persist_programs(B, H, torch.cuda.get_device_properties(0).multi_processor_count) > 1
    calls = []
    name = "persist_backward_pair" if bi else "loop_backward"
    real = getattr(kt, name)
    monkeypatch.setattr(kt, name, lambda *a: (calls.append(a[-1]), real(*a))[1])

    def run(env):
        monkeypatch.setenv(_PERSIST_ENV, env)
        return _persist_run(mode, "triton", torch.float32, x, hx, params, mk, lens, L, bi, True)[2]

    step = run("0")
    assert not calls
    for _ in range(2):
        pers = run("1")
        assert len(calls) == L and all(c > 1 for c in calls)
        calls.clear()
        for i, (a, b) in enumerate(zip(pers, step)):
            assert_close(a.cpu(), b.cpu().double(), torch.float32, k=T * B * 4 * H, what=f"{mode} grad {i} vs per-step")
    r_grads = _persist_run(mode, "reference", torch.float64, x, hx, params, mk, lens, L, bi, True)[2]
    for i, (a, b) in enumerate(zip(pers, r_grads)):
        assert_close(a.cpu(), b, torch.float32, k=T * B * 4 * H, what=f"{mode} grad {i} vs reference")


@pytest.mark.parametrize("cooperative", [False, True], ids=["default", "cooperative"])
def test_persistent_launches_are_cooperative_only_when_asked(cooperative, rng, monkeypatch):
    """GPU_NN_RNN_COOPERATIVE=1 (kernels/triton/rnn.py COOPERATIVE) launches the four persistent
    kernels -- forward and backward, one direction and the pair -- with Triton's
    launch_cooperative_grid; by default no launch carries the option (every launch of the layer
    recorded: per-step kernels never do). Values still match the reference (the interpreter
    ignores the option)."""
    from gpu_nn.kernels.triton import rnn as kt

    launched = {}
    real = kt.launch_kernel

    def spy(kernel, grid, *args, **kwargs):
        launched.setdefault(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), set()).add(
            kwargs.get("launch_cooperative_grid", False))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(kt, "launch_kernel", spy)
    monkeypatch.setattr(kt, "COOPERATIVE", cooperative)
    monkeypatch.setenv(_PERSIST_ENV, "1")
    for bi in (False, True):
        x, hx, params, mk, lens = _persist_case("gru", rng, 3, 2, 3, 5, 1, bi, (3, 2), True, False)
        outs, _, grads = _persist_run("gru", "triton", torch.float32, x, hx, params, mk, lens, 1, bi, True)
        r_outs, _, r_grads = _persist_run("gru", "reference", torch.float64, x, hx, params, mk, lens, 1, bi, True)
        for a, b in zip([*outs, *grads], [*r_outs, *r_grads]):
            assert_close(a.detach().cpu(), b, torch.float32, k=3 * 2 * 15, what="gru")
    persistent = {k for k in launched if "_persist" in k}
    assert persistent == {"_rnn_persist_fwd_kernel", "_rnn_persist2_fwd_kernel", "_rnn_persist_bwd_kernel",
                          "_rnn_persist2_bwd_kernel"}, launched
    for name, flags in launched.items():
        assert flags == {cooperative and name in persistent}, (name, flags)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: a cooperative launch is a CUDA launch attribute (the interpreter ignores it)")
@pytest.mark.parametrize("mode", MODES)
def test_persistent_cooperative_launch_matches_per_step_on_gpu(mode, rng, monkeypatch):
    """The persistent kernels launched cooperatively (GPU_NN_RNN_COOPERATIVE's switch) on many
    programs: forward and every gradient of a bidirectional two-layer stack against the
    per-step launches, run twice; what a later session needs to make it the default."""
    from gpu_nn.kernels.triton import rnn as kt

    T, B, I, H, L, bi = 12, 5, 32, 300, 2, True
    lengths = tuple(int(v) for v in rng.integers(1, T + 1, size=B))
    x, hx, params, mk, lens = _persist_case(mode, rng, T, B, I, H, L, bi, lengths, True, True)
    assert kt.persist_programs(B, H, torch.cuda.get_device_properties(0).multi_processor_count) > 1
    monkeypatch.setenv(_PERSIST_ENV, "0")
    step = _persist_run(mode, "triton", torch.float32, x, hx, params, mk, lens, L, bi, True)
    monkeypatch.setenv(_PERSIST_ENV, "1")
    monkeypatch.setattr(kt, "COOPERATIVE", True)
    compiled = []
    real = kt.launch_kernel

    def spy(kernel, grid, *args, **kwargs):
        got = real(kernel, grid, *args, **kwargs)
        if "_persist" in kernel.fn.__name__:
            compiled.append(got)
        return got

    monkeypatch.setattr(kt, "launch_kernel", spy)
    for _ in range(2):
        pers = _persist_run(mode, "triton", torch.float32, x, hx, params, mk, lens, L, bi, True)
        for a, b in zip([*pers[0], *pers[2]], [*step[0], *step[2]]):
            assert_close(a.detach().cpu(), b.detach().cpu().double(), torch.float32, k=T * B * 4 * H,
                         what=f"{mode} cooperative vs per-step")
    # the option reached the compiled kernels the driver launched (their launcher reads it there)
    assert compiled and all(c.metadata.launch_cooperative_grid for c in compiled)


@pytest.mark.parametrize("backend,device", backend_params(("reference", "triton", "cupy")))
@pytest.mark.parametrize("bad", ("nan", "overflow"))
def test_packed_steps_past_a_length_add_nothing_to_the_weight_gradients(backend, device, bad):
    """A packed relu RNN whose shorter sequence ends on a NaN or +inf state (its only step's
    input NaN, or 3e38 through positive weights): every weight gradient as torch's. The steps
    past that sequence's length carry its final state on (for h_n) with zero gate gradients,
    and the weight gradients' products took those rows too, 0 * inf: dW_hh came out NaN where
    torch's is finite (a user audit). Also a NaN in the input's padding (past a length) changes
    nothing, two layers and both directions."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(3)
    T, B, I, H = 3, 2, 2, 2
    theirs = torch.nn.RNN(I, H, nonlinearity="relu", num_layers=2, bidirectional=True).double()
    with torch.no_grad():
        theirs.weight_ih_l0.abs_().add_(1.0)
        theirs.weight_ih_l0_reverse.abs_().add_(1.0)
    ours = gnn.RNN(I, H, nonlinearity="relu", num_layers=2, bidirectional=True).double()
    ours.load_state_dict(theirs.state_dict())
    lengths = torch.tensor([3, 1])
    x = torch.randn(T, B, I, dtype=torch.float64)
    x[0, 1, :] = float("nan") if bad == "nan" else 3e38
    dt = torch.float32  # TF32 off (_exact_float32): float32 products on a GPU too

    def grads(m, x, be=None, dev=device):
        m = copy.deepcopy(m).to(dev, dt)
        with gpu_nn.backend(be) if be else contextlib.nullcontext():
            y, h = m(pack_padded_sequence(x.to(dev, dt), lengths))
            y.data.sum().add(h.sum()).backward()
        return [p.grad.cpu() for p in m.parameters()]

    # torch's CPU layer: the NaN / inf semantics are its CPU kernels' (cuDNN's relu is not
    # promised to keep a NaN)
    want = grads(theirs, x, dev="cpu")
    got = grads(ours, x, backend)
    for name, a, b in zip([n for n, _ in theirs.named_parameters()], got, want):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if bad == "overflow":  # the case this guards: torch's forward dW_hh of the first layer stays finite
        assert torch.isfinite(want[1]).all(), want[1]
    # the input's padding past the lengths is never read: NaN there changes no gradient
    xp = x.clone()
    xp[1:, 1, :] = float("nan")
    for a, b in zip(grads(ours, xp, backend), got):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_reference_gates_keep_small_values_as_torchs(mode, dtype):
    """A strongly negative gate pre-activation: the reference's sigmoid gates keep their relative
    precision, as torch's sigmoid does (a forget gate of sigmoid(-50) = 1.9e-22 times an inf cell
    state is inf; a gate of sigmoid(-16) times a state of 1e8 is 11.25). The reference computed
    (1 + tanh(x / 2)) / 2, which cancels: 0 from about -19 in float32 (NaN where torch gives inf)
    and 6 % off at -16 (a non-finite-values audit). Layer and cell, the state 1e8 and inf."""
    H = 2
    ours_cls, theirs_cls, extra = MODULES[mode]
    c_ours, c_theirs, _ = CELLS[mode]
    for pre in (-16.0, -50.0):
        for big in (1e8, float("inf")):
            got = []
            for layer, cell in ((ours_cls, c_ours), (theirs_cls, c_theirs)):
                m = layer(1, H, **extra).to(dtype)
                c = cell(1, H, **extra).to(dtype)
                with torch.no_grad():
                    for mod in (m, c):
                        for name, p in mod.named_parameters():
                            p.zero_()
                            if name.startswith("bias_ih"):
                                p[H: 2 * H] = pre  # the forget gate f, the GRU's z (h' = n + z (h - n))
                x = torch.zeros(1, 1, 1, dtype=dtype)
                state = torch.full((1, 1, H), big, dtype=dtype)
                with gpu_nn.backend("reference"):
                    if mode == "lstm":
                        out = (m(x, (torch.zeros_like(state), state))[1][1], c(x[0], (torch.zeros_like(state[0]), state[0]))[1])
                    else:
                        out = (m(x, state)[1], c(x[0], state[0]))
                got.append(out)
            for a, b in zip(*got):
                # (a GRU's inf state is NaN in both: its h W_hn^T has inf x 0)
                torch.testing.assert_close(a, b, rtol=4 * torch.finfo(dtype).eps, atol=0, equal_nan=mode == "gru")


@pytest.mark.parametrize("backend,device", backend_params())
def test_gru_backward_under_an_infinite_upstream_gradient_as_torchs(backend, device):
    """A GRU (cell and layer) with +-inf in the upstream gradient: torch's autograd sums the new
    gate's gradient as dh - dh z, NaN (inf - inf) where dh is infinite; the reference does, and the
    Triton and CUDA C backwards computed dh (1 - z), which kept it infinite (+-inf where torch has
    NaN; a non-finite-values audit). Where NaN and inf land in every gradient, as torch's; rows
    without an infinite gradient finite (compared in float32 on the GPU backends' dtype)."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(2)
    x, h = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)
    go = torch.randn(4, 3, generator=g)
    go[1, 0], go[2, 2] = float("inf"), -float("inf")
    xs, gos = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 3, generator=g)
    gos[2, 1, 0] = float("inf")
    for ours_cls, theirs_cls, args, upstream in ((gnn.GRUCell, torch.nn.GRUCell, (x, h), go),
                                                 (gnn.GRU, torch.nn.GRU, (xs,), gos)):
        theirs = theirs_cls(5, 3).to(dtype)
        ours = ours_cls(5, 3).to(device=device, dtype=dtype)
        ours.load_state_dict(theirs.state_dict())
        got = []
        for net, dev in ((ours, device), (theirs, "cpu")):
            leaves = [a.to(dev).requires_grad_() for a in args]
            with gpu_nn.backend(backend if net is ours else "reference"):
                out = net(*leaves)
                out = out[0] if isinstance(out, tuple) else out
                grads = torch.autograd.grad(out, leaves + list(net.parameters()), upstream.to(dev))
            got.append([t.cpu() for t in grads])
        for a, b in zip(*got):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
            assert torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0))
            fin = torch.isfinite(b)
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-4, atol=1e-5)
        assert any(t.isnan().any() for t in got[1])


def test_relu_recurrence_at_nan_inf_and_zero_is_torchs(rng):
    """rnn_relu keeps a NaN pre-activation (torch's relu) and its backward is torch's
    threshold_backward: 0 where h <= 0, else dh, so a NaN h passes the gradient. Reference and
    Triton (cell and sequence) against torch; the CUDA C math on the host."""
    import ctypes

    from helpers import build_host_library, fptr

    pre = torch.tensor([[float("nan"), -1.0, 2.0, float("inf"), float("-inf"), 0.0, -0.0]], dtype=torch.float64)
    H = pre.shape[1]
    x = torch.zeros(1, 1)
    w_ih, w_hh = torch.zeros(H, 1), torch.zeros(H, H)
    b_ih, b_hh = pre[0].clone(), torch.zeros(H)
    want_h = torch.relu(pre)
    want_g = torch.where(want_h <= 0, 0.0, 1.0).double()  # d h / d b_ih for an upstream gradient of ones
    bes = [("reference", torch.float64)] + ([("triton", torch.float32)] if gpu_nn._backend.status("triton")[0] else [])
    for be, dt in bes:
        dev = "cuda" if (be != "reference" and torch.cuda.is_available()) else "cpu"
        b = b_ih.to(dev, dt).requires_grad_()
        with gpu_nn.backend(be):
            h = F.rnn_relu_cell(x.to(dev, dt), torch.zeros(1, H, device=dev, dtype=dt), w_ih.to(dev, dt), w_hh.to(dev, dt),
                                b, b_hh.to(dev, dt))
            (g,) = torch.autograd.grad(h, b, torch.ones_like(h))
        torch.testing.assert_close(h.cpu().double(), want_h, equal_nan=True, msg=f"{be} forward")
        torch.testing.assert_close(g.cpu().double(), want_g[0], equal_nan=True, msg=f"{be} backward")
        # the sequence path (T = 2: the second step's recurrent product sees the first's NaN too)
        b2 = b_ih.to(dev, dt).requires_grad_()
        with gpu_nn.backend(be):
            out, hn = F.rnn_relu(x.to(dev, dt).expand(2, 1, 1).contiguous(), torch.zeros(1, 1, H, device=dev, dtype=dt),
                                 [w_ih.to(dev, dt), w_hh.to(dev, dt), b2, b_hh.to(dev, dt)])
            (g2,) = torch.autograd.grad(out[0], b2, torch.ones_like(out[0]))
        torch.testing.assert_close(out[0].cpu().double(), want_h, equal_nan=True, msg=f"{be} sequence forward")
        torch.testing.assert_close(g2.cpu().double(), want_g[0], equal_nan=True, msg=f"{be} sequence backward")
    lib = build_host_library(HOST_SRC, "rnn_math")
    for fn in (lib.host_rnn_fwd, lib.host_rnn_bwd):
        fn.restype = None
    p32 = pre[0].float().numpy().copy()
    zeros = np.full_like(p32, -0.0)  # -0.0 + -0.0 stays -0.0: torch's relu keeps it
    hout = np.empty_like(p32)
    lib.host_rnn_fwd(1, ctypes.c_int(H), fptr(p32), fptr(zeros), fptr(hout))
    np.testing.assert_array_equal(hout, want_h[0].float().numpy())
    np.testing.assert_array_equal(np.signbit(hout), torch.signbit(want_h[0]).numpy())
    d = np.empty_like(p32)
    lib.host_rnn_bwd(1, ctypes.c_int(H), fptr(np.ones_like(p32)), fptr(hout), fptr(d))
    np.testing.assert_array_equal(d, want_g[0].float().numpy())


# ----------------------------------------------------------------------------------------------
# precision as torch decides it (torch.backends.cudnn.allow_tf32) and the launch heuristics

EPS_TF32 = 2.0 ** -10  # TF32 keeps 10 mantissa bits (float16's: EPS[torch.float16] is the same 2^-10)


def tol_tf32(k: int) -> float:
    """helpers.tol for float32 results of TF32 products: a few ulps of TF32's 10-bit mantissa
    (operands rounded or truncated to it) plus the float32 accumulation floor over k terms."""
    return 4 * EPS_TF32 + 8 * EPS[torch.float32] * max(k, 1) ** 0.5


def test_tf32_follows_torchs_cudnn_flag():
    """float32 layers: TF32 exactly when torch.backends.cudnn.allow_tf32 (read per call, as torch's
    cuDNN RNN does; torch.backends.cuda.matmul.allow_tf32 does not matter); half layers use it for
    their float32 x float32 weight-gradient products whatever the flag. Dot codes: 0 exact float32,
    3 TF32, 1 / 2 the half dtypes (the float32 operand cast down)."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        for cudnn in (False, True):
            for mm in (False, True):
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, mm
                assert ops.tf32_allowed(torch.float32) is cudnn
                assert ops.tf32_allowed(torch.float64) is False
                for half in (torch.float16, torch.bfloat16):
                    assert ops.tf32_allowed(half) is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert ops._dot_code(f32, f32, tf32=False) == 0 and ops._dot_code(f32, tf32=True) == 3
    for tf32 in (False, True):
        assert ops._dot_code(f32, f16, tf32=tf32) == 1 and ops._dot_code(bf16, f32, tf32=tf32) == 2


def _record_dots(monkeypatch):
    """Wraps ``run`` of every Triton kernel of the family that takes a DOT_DT, and of its twin for
    rows at any alignment (``kt.LOOSE_ROWS``, named as the kernel): the list gets (kernel name,
    DOT_DT) of each launch, the constexpr as the kernel receives it. The cached
    launch plans (kernels/triton/_launch.py, compiled kernels only) are switched off meanwhile:
    a plan calls the compiled launcher directly, so a launch whose plan an earlier test made
    would never reach ``run``."""
    from gpu_nn.kernels.triton import _launch
    from gpu_nn.kernels.triton import rnn as kt

    monkeypatch.setattr(_launch, "_ENABLED", False)
    seen = []
    for name in ("_rnn_matmul_kernel", "_rnn_step_fwd_kernel", "_rnn_step_bwd_kernel", "_rnn_persist_fwd_kernel",
                 "_rnn_persist_bwd_kernel", "_rnn_proj_fwd_kernel", "_rnn_proj_bwd_kernel"):
        for kernel in {getattr(kt, name), kt.LOOSE_ROWS.get(getattr(kt, name))} - {None}:
            def run(*args, _name=name, _run=kernel.run, **kwargs):
                if not kwargs.get("warmup", False):
                    seen.append((_name, kwargs["DOT_DT"]))
                return _run(*args, **kwargs)

            monkeypatch.setattr(kernel, "run", run)
    return seen


@pytest.mark.skipif(not gpu_nn._backend.status("triton")[0], reason="triton backend not available here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tf32_flag_reaches_every_launch(dtype, rng, monkeypatch):
    """The dot code each kernel is launched with, per cudnn.allow_tf32 setting: a two-layer
    projected LSTM and a GRU (matmuls, step / projection kernels forward and backward) and the
    persistent forward and backward. float32: every launch 3 with the flag on, 0 with it off; float16: every
    recurrent product 1, the matmuls 1 except the float32 x float32 weight gradients (3). Under
    the interpreter the dot is exact whatever the code, so the results must also match the
    reference at the float32 tolerance there (on a GPU, the TF32 tolerance with the flag on)."""
    seen = _record_dots(monkeypatch)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for tf32 in (False, True):
        torch.backends.cudnn.allow_tf32 = tf32
        seen.clear()
        monkeypatch.setenv(ops.PERSISTENT_ENV, "0")
        _seq_against_reference("triton", dev, "lstm", dtype, rng, 2, 2, 3, 5, 2, False, (2, 1), False, P=3, tf32=tf32)
        _seq_against_reference("triton", dev, "gru", dtype, rng, 2, 2, 3, 4, 1, False, None, False, tf32=tf32)
        monkeypatch.setenv(ops.PERSISTENT_ENV, "1")
        with gpu_nn.backend("triton"):
            out, _ = gnn.LSTM(3, 4).to(dev, dtype)(torch.randn(2, 2, 3, dtype=dtype, device=dev, requires_grad=True))
            out.sum().backward()
        kernels = {n for n, _ in seen}
        assert kernels == {"_rnn_matmul_kernel", "_rnn_step_fwd_kernel", "_rnn_step_bwd_kernel",
                           "_rnn_persist_fwd_kernel", "_rnn_persist_bwd_kernel", "_rnn_proj_fwd_kernel",
                           "_rnn_proj_bwd_kernel"}, kernels
        if dtype == torch.float32:
            assert {d for _, d in seen} == {3 if tf32 else 0}
        else:
            assert {d for n, d in seen if n != "_rnn_matmul_kernel"} == {1}
            assert {d for n, d in seen if n == "_rnn_matmul_kernel"} == {1, 3}


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a GPU: the interpreter computes every float32 dot exactly, TF32 or not "
                           "(the CPU test above checks that the flag reaches the kernels)")
@pytest.mark.parametrize("mode", MODES)
def test_tf32_error_within_its_precision_on_gpu(mode, rng):
    """cudnn.allow_tf32 on (torch's default): float32 sequences on the Triton backend against the
    float64 reference within the TF32 tolerance (10-bit mantissa, float32 accumulation), every
    output and gradient; and the result differs from the exact float32 run (the products did
    run in TF32), which itself meets the float32 tolerance."""
    args, kw = ops._make_seq(mode, T=6, B=5, I=40, H=48, L=2, bi=True, lengths=(6, 3, 5, 1, 6))(rng)
    x, hx, params = args[0], args[1], args[2]
    hs = list(hx) if mode == "lstm" else [hx]
    T, B, H = 6, 5, 48

    def run(be, dev, dt):
        leaves = [t.detach().to(dev, dt).requires_grad_() for t in [x, *hs, *params]]
        h = tuple(leaves[1:1 + len(hs)]) if mode == "lstm" else leaves[1]
        with gpu_nn.backend(be):
            out = ops.SEQ_FUNCS[mode](leaves[0], h, leaves[1 + len(hs):], True, 2, 0.0, False, True, False,
                                      lengths=kw["lengths"])
            gs = [torch.from_numpy(np.random.default_rng(9).standard_normal(o.shape)).to(dev, dt) for o in out]
            grads = torch.autograd.grad(out, leaves, gs)
        return [t.detach().cpu() for t in (*out, *grads)]

    want = run("reference", "cpu", torch.float64)
    torch.backends.cudnn.allow_tf32 = True
    tf32 = run("triton", "cuda", torch.float32)
    torch.backends.cudnn.allow_tf32 = False
    exact = run("triton", "cuda", torch.float32)
    n_out = 3 if mode == "lstm" else 2
    for i, (a, e, w) in enumerate(zip(tf32, exact, want)):
        k = 4 * H if i < n_out else T * B * 4 * H
        err = max_rel_err(a, w)
        assert err <= tol_tf32(k), f"{mode} result {i}: TF32 error {err:.3e} > {tol_tf32(k):.3e} (k={k})"
        assert_close(e, w, torch.float32, k=k, what=f"{mode} result {i} exact float32")
    assert any(not torch.equal(a, e) for a, e in zip(tf32, exact)), "TF32 on and off gave identical results"


def test_launch_heuristics_fill_the_gpu_and_are_compiled():
    """The step tile gives every batch size the most programs dot tiles of 16 allow (N = 64, H =
    512: 128 for 132 SMs), each tile >= 16 on every side; the matmul tiles are tensor-core tiles
    except for the exact float32 dot; every configuration they return is in aot_specs()."""
    from gpu_nn.kernels.triton import rnn as kt

    specs = kt.aot_specs()
    step = {(s.name, s.constexprs["MODE"], s.constexprs["DOT_DT"], s.constexprs["BLOCK_B"], s.constexprs["BLOCK_H"],
             s.constexprs["BLOCK_K"], s.num_warps, s.num_stages)
            for s in specs if s.name in ("_rnn_step_fwd_kernel", "_rnn_step_bwd_kernel")}
    proj = {(s.constexprs["BLOCK_B"], s.constexprs["BLOCK_P"], s.constexprs["BLOCK_K"], s.num_warps)
            for s in specs if s.name in ("_rnn_proj_fwd_kernel", "_rnn_proj_bwd_kernel")}
    for B in (1, 4, 16, 17, 64, 1000):
        for H in (1, 16, 256, 512, 1024, 4096):
            for mode, code in kt.MODE_CODES.items():
                for dot in (0, 1, 2, 3):
                    for bwd in (False, True):
                        cfg = kt.step_blocks(B, H, mode, dot, bwd)
                        bb, bh, bk, warps, stages = cfg
                        name = "_rnn_step_bwd_kernel" if bwd else "_rnn_step_fwd_kernel"
                        assert min(bb, bh, bk) >= 16 and (name, code, dot, *cfg) in step
                        assert -(-B // bb) * -(-H // bh) == -(-B // 16) * -(-H // 16)  # STEP_TABLE is empty
            assert kt.proj_blocks(B, H) in proj
    assert kt.step_blocks(64, 512, "lstm")[:2] == (16, 16)  # 128 programs, not the former 32
    mm = {(s.constexprs["DOT_DT"], (s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["BLOCK_K"],
                                    s.num_warps)) for s in specs if s.name == "_rnn_matmul_kernel"}
    for dot in (0, 1, 2, 3):
        for M, N in ((1, 1), (6400, 2048), (2048, 512), (64, 17)):
            tile = kt.matmul_blocks(M, N, dot)
            assert min(tile[:3]) >= 16 and (dot, tile) in mm
    assert kt.matmul_blocks(6400, 2048, 3)[:2] == (128, 128)
    assert min(kt.matmul_blocks(6400, 2048, 3, interpret=True)[:3]) >= 16
    assert {d for d, _ in mm} == {0, 1, 2, 3}


# the per-layer step loops (kernels/triton/rnn.py steps_forward / steps_backward): the same
# launches, argument for argument, as the per-step launchers they stand in for


def _launch_record(kt, monkeypatch):
    """Every launch of ``kt``'s launchers recorded instead of made. The time loops' bound fast
    path (``_launch.bind``, taken on a GPU machine) is turned off too: it would launch the
    compiled kernel itself, with these tests' CPU buffers."""
    from gpu_nn.kernels.triton import _launch

    monkeypatch.setattr(_launch, "bindable", lambda: False)
    calls = []

    def record(kernel, grid, *args, **kwargs):
        # a tensor by what the kernel sees of it: address, dtype, shape, strides
        key = tuple((a.data_ptr(), a.dtype, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor)
                    else (type(a), a) for a in args)
        calls.append((kernel, grid, key, kwargs))

    monkeypatch.setattr(kt, "launch_kernel", record)
    return calls


def _jit_flags(kernel) -> tuple[set, set]:
    """(do_not_specialize, do_not_specialize_on_alignment) of a kernel by parameter name: the
    interpreter keeps the decorator's arguments, the JIT marks its parameters."""
    kw = getattr(kernel, "kwargs", None)
    if kw is not None:
        return set(kw.get("do_not_specialize") or ()), set(kw.get("do_not_specialize_on_alignment") or ())
    return ({p.name for p in kernel.params if p.do_not_specialize},
            {p.name for p in kernel.params if p.do_not_specialize_on_alignment})


def test_row_twins_differ_from_their_kernels_in_the_rows_alignment_only():
    """Each twin of kernels/triton/rnn.py LOOSE_ROWS is its kernel's own function with its
    ``do_not_specialize``, and leaves unspecialised the alignment of pointer parameters only
    (Triton ignores a name that is no parameter: a misspelt row would stay specialised), never
    the weights, biases or lengths; the per-step launchers take the twin exactly when a row they
    pass is not 16-byte aligned."""
    import inspect

    from gpu_nn.kernels.triton import rnn as kt

    assert len(kt.LOOSE_ROWS) == 6
    for kernel, twin in kt.LOOSE_ROWS.items():
        assert twin.fn is kernel.fn
        dns, dnsa = _jit_flags(twin)
        assert dns == _jit_flags(kernel)[0] and _jit_flags(kernel)[1] == set()
        params = set(inspect.signature(kernel.fn).parameters)
        assert dnsa and dnsa <= params and all(n.endswith("_ptr") for n in dnsa), dnsa
        assert not {n for n in dnsa if n.startswith(("w_ptr", "w1_ptr", "bhh", "len_ptr"))}, dnsa
    x = torch.empty(33)
    assert kt._for_rows(kt._rnn_proj_fwd_kernel, x[:8], None, x[4:]) is kt._rnn_proj_fwd_kernel
    assert kt._for_rows(kt._rnn_proj_fwd_kernel, x[:8], x[1:]) is kt._rnn_proj_fwd_rows_kernel


def _as_per_step(kt, calls, loose=None):
    """The launches with each kernel named by the per-step kernel it stands in for; where
    ``loose`` is given, every one must be the kernel's twin for rows at any alignment
    (``kt.LOOSE_ROWS``) if ``loose``, else the kernel itself."""
    base = {v: k for k, v in kt.LOOSE_ROWS.items()}
    assert loose is None or all((c[0] in base) == loose for c in calls), [c[0] for c in calls]
    return [(base.get(c[0], c[0]), *c[1:]) for c in calls]


@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B,H", [(5, 7), (4, 8)])
def test_step_loops_launch_as_the_per_step_launchers(mode, reverse, B, H, monkeypatch):
    """The loops make the per-step launchers' launches, the kernel aside: B=5, H=7 (float32 rows
    of 35 elements, 140 bytes, whose alignment changes from step to step) run the kernels' twins
    for rows at any alignment, B=4, H=8 the kernels themselves."""
    from gpu_nn.kernels.triton import rnn as kt

    calls = _launch_record(kt, monkeypatch)
    T, D = 3, 2
    loose = B * H % 4 != 0
    G, S = ref.GATES[mode] * H, ref.STORED[mode] * H or H
    lstm = mode == "lstm"
    out = torch.empty(T, B, D * H)[:, :, H:]  # the reverse direction's half: a strided view
    mask = torch.rand(T, B, D * H)[:, :, :H]
    XG, Hs = torch.empty(T, B, S), torch.empty(T + 1, B, H)
    Cs = torch.empty(T + 1, B, H) if lstm else None
    w_hh, b_hh = torch.empty(G, H).t().contiguous().t(), (torch.empty(G) if mode == "gru" else None)
    lens = torch.full((B,), T, dtype=torch.int64)
    for mk in (None, mask):
        kt.steps_forward(mode, XG, Hs, Cs, w_hh, b_hh, out, mk, lens, reverse, 3)
        n_loop = len(calls)
        for t, p, n in ref._steps(T, reverse):
            kt.step_forward(mode, XG[t], Hs[p], Hs[n], Cs[p] if lstm else None, Cs[n] if lstm else None, w_hh, b_hh,
                            out[t], None if mk is None else mk[t], lens, t, 3)
        assert n_loop == T and _as_per_step(kt, calls[:T], loose) == _as_per_step(kt, calls[T:]), mode
        calls.clear()
    carry, dc = torch.empty(B, H), (torch.empty(B, H) if lstm else None)
    dout = torch.empty(T, B, D * H)[:, :, :H]
    gates = XG if mode != "rnn_tanh" else None
    dGi = torch.empty(T, B, G)
    dGh = torch.empty(T, B, G) if mode == "gru" else dGi
    last = kt.steps_backward(mode, w_hh, carry, dc, dout, gates, Hs, Cs, dGi, dGh, lens, reverse, 0)
    prev = None
    for t, p, n in reversed(ref._steps(T, reverse)):
        kt.step_backward(mode, prev, w_hh, carry, dc, dout[t], None if gates is None else gates[t], Hs[p], Hs[n],
                         Cs[p] if lstm else None, Cs[n] if lstm else None, dGi[t], dGh[t], None, lens, t, 0)
        prev = dGh[t]
    assert len(calls) == 2 * T and _as_per_step(kt, calls[:T], loose) == _as_per_step(kt, calls[T:]), mode
    assert (last.data_ptr(), last.shape) == (prev.data_ptr(), prev.shape)


@pytest.mark.parametrize("B,H,loose", [(4, 8, False), (5, 7, True)])
def test_step_loops_bound_launches_pass_the_same_addresses(B, H, loose, monkeypatch):
    """On a GPU a time loop binds Triton's launcher at its first launch with the later steps'
    keywords (``_launch.bind``) and passes the later steps' pointers as raw addresses
    (``_time_loop``). Here bind is a recording stand-in: every launch of the four loops (both
    directions, with and without a dropout mask, the GRU's b_hh) gets, pointer for pointer, the
    address of the tensor the unbound loop passes, and the same other arguments, grid and
    keywords; bind is used once per loop, for the kernel itself where the rows lie a multiple of
    16 bytes apart (B=4, H=8 float32), for its twin that knows nothing of the rows' alignment
    where they do not (B=5, H=7: 140-byte rows, whose alignment changes from step to step)."""
    from gpu_nn.kernels.triton import _launch
    from gpu_nn.kernels.triton import rnn as kt

    calls, binds_made = [], []

    def rec(kernel, grid, args, kwargs):
        calls.append((kernel, grid, tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args), kwargs))

    def fake_bind(kernel, grid, *args, **kwargs):
        binds_made.append(kernel)
        rec(kernel, grid, args, kwargs)
        return lambda *a: rec(kernel, grid, a, kwargs)

    monkeypatch.setattr(kt, "launch_kernel", lambda kernel, grid, *a, **k: rec(kernel, grid, a, k))
    monkeypatch.setattr(_launch, "bind", fake_bind)
    T = 4
    for mode in ("rnn_tanh", "lstm", "gru"):
        G, S = ref.GATES[mode] * H, ref.STORED[mode] * H or H
        lstm, gru = mode == "lstm", mode == "gru"

        def direction():
            return dict(XG=torch.empty(T, B, S), Hs=torch.empty(T + 1, B, H), Cs=torch.empty(T + 1, B, H) if lstm else None,
                        w_hh=torch.empty(G, H), b_hh=torch.empty(G) if gru else None, carry=torch.empty(B, H),
                        dc=torch.empty(B, H) if lstm else None, dGi=torch.empty(T, B, G),
                        dGh=torch.empty(T, B, G) if gru else None, dh0=torch.empty(B, H))

        one, two = direction(), direction()
        out, dout = torch.empty(T, B, 2 * H), torch.empty(T, B, 2 * H)
        lens = torch.full((B,), T, dtype=torch.int64)
        for mk in (None, torch.empty(T, B, 2 * H)):
            def fwd(d, o):
                return (o["XG"], o["Hs"], o["Cs"], o["w_hh"], o["b_hh"], out[:, :, d * H:(d + 1) * H],
                        None if mk is None else mk[:, :, d * H:(d + 1) * H])

            def bwd(d, o):
                return (o["w_hh"], o["carry"], o["dc"], dout[:, :, d * H:(d + 1) * H], None if mode == "rnn_tanh" else o["XG"],
                        o["Hs"], o["Cs"], o["dGi"], o["dGh"] if gru else o["dGi"], o["dh0"])

            loops = [lambda: kt.steps_forward(mode, *fwd(1, two), lens, True, 3),
                     lambda: kt.steps_backward(mode, *bwd(0, one)[:-1], lens, False, 0),
                     lambda: kt.steps_forward_pair(mode, fwd(0, one), fwd(1, two), lens, 3),
                     lambda: kt.steps_backward_pair(mode, bwd(0, one), bwd(1, two), lens, 0)]
            for loop in loops:
                monkeypatch.setattr(_launch, "bindable", lambda: False)
                loop()
                want = calls[:]
                calls.clear()
                monkeypatch.setattr(_launch, "bindable", lambda: True)
                loop()
                assert calls == want, mode
                assert len(binds_made) == 1 and (binds_made[0] in kt.LOOSE_ROWS.values()) == loose, (mode, binds_made)
                calls.clear()
                binds_made.clear()


def _same(a, b):
    """Exactly equal under the interpreter (one numpy computation for both); on a GPU the pair and
    one-direction kernels are separate compilations of the same tile code: equal to float32
    rounding."""
    if a.is_cuda:
        return torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    return torch.equal(a, b)


def _kernels_here():
    """The device the Triton kernels run on here: CUDA, else the CPU under the interpreter; a
    skip saying why where the triton backend cannot run at all (gpu_nn._backend.status)."""
    ok, why = gpu_nn._backend.status("triton")
    if not ok:
        pytest.skip(f"triton backend unavailable here: {why}")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("mode,has_bhh", [("rnn_tanh", False), ("rnn_relu", False), ("lstm", False), ("gru", True),
                                          ("gru", False)])
@pytest.mark.parametrize("masked", [False, True])
def test_pair_loops_equal_two_one_direction_loops(mode, has_bhh, masked):
    """steps_forward_pair / steps_backward_pair (both directions of a layer, one launch per step)
    leave every buffer exactly as steps_forward and steps_backward + the final step_backward run
    per direction do: fresh random data, odd sizes, unequal lengths, both dropout-mask forms."""
    from gpu_nn.kernels.triton import rnn as kt

    dev = _kernels_here()
    g = torch.Generator().manual_seed(7)
    T, B, H = 5, 3, 7
    G, S = ref.GATES[mode] * H, ref.STORED[mode] * H or H
    lstm = mode == "lstm"

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    lens = torch.tensor([5, 2, 4], dtype=torch.int64, device=dev)
    out = torch.zeros(T, B, 2 * H, device=dev)
    mask = (torch.rand(T, B, 2 * H, generator=g) > 0.3).float().to(dev) * 1.4 if masked else None

    def direction(d):
        Hs, Cs = rnd(T + 1, B, H), (rnd(T + 1, B, H) if lstm else None)
        return dict(XG=rnd(T, B, S), Hs=Hs, Cs=Cs, w_hh=rnd(G, H) * 0.4, b_hh=rnd(G) if has_bhh else None,
                    out=out[:, :, d * H:(d + 1) * H], mask=None if mask is None else mask[:, :, d * H:(d + 1) * H])

    dirs = [direction(0), direction(1)]
    keys = ("XG", "Hs", "Cs", "w_hh", "b_hh", "out", "mask")
    fwd_args = lambda d: tuple(d[k] for k in keys)  # noqa: E731
    start = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()} for d in dirs]
    for d, dd in enumerate(dirs):
        kt.steps_forward(mode, *fwd_args(dd), lens, d == 1, 0)
    want_out = out.clone()
    out.zero_()
    again = [{**s, "out": out[:, :, d * H:(d + 1) * H]} for d, s in enumerate(start)]
    for s in again:  # the originals' inputs, untouched by the run above
        for k in ("XG", "Hs", "Cs"):
            if s[k] is not None:
                s[k] = s[k].clone()
    kt.steps_forward_pair(mode, fwd_args(again[0]), fwd_args(again[1]), lens, 0)
    assert _same(out, want_out)
    for a, b in zip(dirs, again):
        for k in ("XG", "Hs", "Cs"):
            assert a[k] is None or _same(a[k], b[k]), k
    # backward on what the forward left
    dout = rnd(T, B, 2 * H)

    def bwd_state(d, dd):
        return dict(w_hh=dd["w_hh"], carry=rnd(B, H), dc=rnd(B, H) if lstm else None,
                    dout=dout[:, :, d * H:(d + 1) * H], G=dd["XG"] if mode != "rnn_tanh" and mode != "rnn_relu" else None,
                    Hs=dd["Hs"], Cs=dd["Cs"], dGi=torch.full((T, B, G), 9.0, device=dev),
                    dGh=torch.full((T, B, G), 9.0, device=dev) if mode == "gru" else None,
                    dh0=torch.full((B, H), 9.0, device=dev))

    one = [bwd_state(d, dd) for d, dd in enumerate(dirs)]
    two = [{k: (v.clone() if isinstance(v, torch.Tensor) and k in ("carry", "dc", "dGi", "dGh", "dh0") else v)
            for k, v in o.items()} for o in one]
    for d, o in enumerate(one):
        dgh = o["dGh"] if o["dGh"] is not None else o["dGi"]
        prev = kt.steps_backward(mode, o["w_hh"], o["carry"], o["dc"], o["dout"], o["G"], o["Hs"], o["Cs"], o["dGi"],
                                 dgh, lens, d == 1, 0)
        kt.step_backward(mode, prev, o["w_hh"], o["carry"], None, None, None, None, None, None, None, None, None,
                         o["dh0"], None, 0, 0, final=True)
    bkeys = ("w_hh", "carry", "dc", "dout", "G", "Hs", "Cs", "dGi", "dGh", "dh0")
    kt.steps_backward_pair(mode, *[tuple(o[k] if k != "dGh" or o[k] is not None else o["dGi"] for k in bkeys)
                                   for o in two], lens, 0)
    for a, b in zip(one, two):
        for k in ("carry", "dc", "dGi", "dGh", "dh0"):
            assert a[k] is None or _same(a[k], b[k]), k


_LOOP_LENGTHS = {"full": None, "len": (5, 2, 0, 4), "len2tiles": (5, 2, 0, 4) * 5}


@pytest.mark.parametrize("mode,reverse,lengths", [
    pytest.param(m, rev, _LOOP_LENGTHS[name], id=f"{name}-{rev}-{m}")
    for name, rev, elman in latin_cover(list(_LOOP_LENGTHS), [False, True], ELMAN_IN_TURN)
    for m in (elman, "lstm", "gru")])
def test_persistent_backward_equals_per_step_loop(mode, reverse, lengths):
    """loop_backward (the whole backward time loop of one layer and direction in one launch)
    leaves carry, dc and every gate gradient exactly as steps_backward's launch per step does:
    fresh random data, three hidden tiles run by the one program the interpreter allows (on a
    GPU: the launcher's program count, across the grid barrier), one and two batch tiles, unequal
    lengths (some of zero), both directions; then the final dh0 step on either gives the same
    dh0."""
    from gpu_nn.kernels.triton import rnn as kt

    dev = _kernels_here()
    g = torch.Generator().manual_seed(3)
    T, B, H = 5, len(lengths or (0,) * 4), 33
    G, S = ref.GATES[mode] * H, ref.STORED[mode] * H
    lstm = mode == "lstm"

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    lens = torch.tensor(lengths or (T,) * B, dtype=torch.int64, device=dev)
    programs = 1 if dev == "cpu" else kt.persist_programs(B, H, torch.cuda.get_device_properties(0).multi_processor_count)
    w_hh = rnd(G, H) * 0.3
    dout, Hs, Cs = rnd(T, B, 2 * H)[:, :, H:], rnd(T + 1, B, H), (rnd(T + 1, B, H) if lstm else None)
    Gs = rnd(T, B, S) if S else None
    start = dict(carry=rnd(B, H), dc=rnd(B, H) if lstm else None, dGi=torch.full((T, B, G), 9.0, device=dev),
                 dGh=torch.full((T, B, G), 9.0, device=dev) if mode == "gru" else None)
    runs = []
    for persistent in (False, True):
        b = {k: (None if v is None else v.clone()) for k, v in start.items()}
        dgh = b["dGh"] if b["dGh"] is not None else b["dGi"]
        if persistent:
            assert kt.loop_backward(mode, w_hh, b["carry"], b["dc"], dout, Gs, Hs, Cs, b["dGi"], dgh, lens, reverse, 0,
                                    programs)
            prev = dgh[T - 1 if reverse else 0]
        else:
            prev = kt.steps_backward(mode, w_hh, b["carry"], b["dc"], dout, Gs, Hs, Cs, b["dGi"], dgh, lens, reverse, 0)
        b["dh0"] = torch.full((B, H), 9.0, device=dev)
        kt.step_backward(mode, prev, w_hh, b["carry"], None, None, None, None, None, None, None, None, None, b["dh0"],
                         None, 0, 0, final=True)
        runs.append(b)
    for k in ("carry", "dc", "dGi", "dGh", "dh0"):
        assert runs[0][k] is None or _same(runs[0][k], runs[1][k]), k
    assert not torch.equal(runs[1]["dGi"], start["dGi"])  # the loop wrote the gate gradients


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", [4, 19])
def test_persistent_backward_pair_equals_per_step_pair(mode, B):
    """persist_backward_pair (both directions' backward time loops in one persistent launch, then
    their final dh0 step) leaves carry, dc, every gate gradient and dh0 exactly as
    steps_backward_pair's launch per step does: fresh random data, unequal lengths, one and two
    batch tiles, three hidden tiles, one program here (on a GPU the launcher's count)."""
    from gpu_nn.kernels.triton import rnn as kt

    dev = _kernels_here()
    g = torch.Generator().manual_seed(5 + B)
    T, H = 4, 33
    G, S = ref.GATES[mode] * H, ref.STORED[mode] * H
    lstm = mode == "lstm"

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    lens = torch.randint(1, T + 1, (B,), generator=g, dtype=torch.int64).to(dev)
    sm = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    programs = kt.persist_pair_programs(B, H, sm)
    dout = rnd(T, B, 2 * H)

    def direction(d):
        return dict(w_hh=rnd(G, H) * 0.3, carry=rnd(B, H), dc=rnd(B, H) if lstm else None,
                    dout=dout[:, :, d * H:(d + 1) * H], G=rnd(T, B, S) if S else None, Hs=rnd(T + 1, B, H),
                    Cs=rnd(T + 1, B, H) if lstm else None, dGi=torch.full((T, B, G), 9.0, device=dev),
                    dGh=torch.full((T, B, G), 9.0, device=dev) if mode == "gru" else None,
                    dh0=torch.full((B, H), 9.0, device=dev))

    one = [direction(0), direction(1)]
    mutable = ("carry", "dc", "dGi", "dGh", "dh0")
    two = [{k: (v.clone() if k in mutable and v is not None else v) for k, v in o.items()} for o in one]
    keys = ("w_hh", "carry", "dc", "dout", "G", "Hs", "Cs", "dGi", "dGh", "dh0")

    def args(o):
        return tuple(o[k] if k != "dGh" or o[k] is not None else o["dGi"] for k in keys)

    kt.steps_backward_pair(mode, args(one[0]), args(one[1]), lens, 0)
    kt.persist_backward_pair(mode, args(two[0]), args(two[1]), lens, 0, programs)
    for a, b in zip(one, two):
        for k in mutable:
            assert a[k] is None or _same(a[k], b[k]), k


def _finished_tile_case(mode, backward):
    """Two batch tiles of the step kernels: the first's sequences run step ``t``, the second's
    have ended (a packed batch's padding, sorted order) -- before ``t - 1`` for the backward,
    whose skip needs the neighbouring step's gate gradients zero too. W_hh is all NaN, so
    whichever tile reads it is poisoned: only the first may."""
    from gpu_nn.kernels.triton import rnn as kt

    dev = _kernels_here()
    g = torch.Generator().manual_seed(11)
    H, t = 5, 3
    bb = kt.step_blocks(18, H, mode, 0, backward=backward)[0]
    B = bb + 3
    lens = torch.tensor([4] * bb + [2, 1, 2], dtype=torch.int64, device=dev)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    w_hh = torch.full((ref.GATES[mode] * H, H), float("nan"), device=dev)
    return kt, dev, rnd, B, bb, H, t, lens, w_hh


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_finished_tile_skips_recurrent_product_forward(mode):
    """A forward step leaves a tile whose sequences have all ended as it was (state carried,
    output zero) without reading W_hh: its stored gates are the activated input projections
    alone, finite although W_hh is NaN. (The Elman cells store no gates: the backward test
    below covers their skip.)"""
    kt, dev, rnd, B, bb, H, t, lens, w_hh = _finished_tile_case(mode, False)
    S = ref.STORED[mode] * H
    xg, hp, cp = rnd(B, S), rnd(B, H), rnd(B, H)
    hn, cn, out = torch.zeros(B, H, device=dev), torch.zeros(B, H, device=dev), rnd(B, H)
    kt.step_forward(mode, xg, hp, hn, cp if mode == "lstm" else None, cn if mode == "lstm" else None, w_hh,
                    rnd(ref.GATES[mode] * H) if mode == "gru" else None, out, None, lens, t, 0)
    done = slice(bb, B)
    assert torch.isnan(xg[:bb]).any()  # the running tile did read W_hh
    assert torch.isfinite(xg[done]).all()
    assert torch.equal(hn[done], hp[done]) and torch.equal(out[done], torch.zeros_like(out[done]))
    if mode == "lstm":
        assert torch.equal(cn[done], cp[done])


@pytest.mark.parametrize("mode", MODES)
def test_finished_tile_skips_recurrent_product_backward(mode):
    """A backward step passes a finished tile's state gradient through unchanged without
    reading W_hh (its rows of the previous step's gate gradients are zero: nothing to add),
    finite although W_hh is NaN; its gate gradients are zero."""
    kt, dev, rnd, B, bb, H, t, lens, w_hh = _finished_tile_case(mode, True)
    GH = ref.GATES[mode] * H
    S = ref.STORED[mode] * H
    lstm = mode == "lstm"
    dg_next = rnd(B, GH)
    dg_next[bb:] = 0.0
    carry, dc = rnd(B, H), (rnd(B, H) if lstm else None)
    carry0, dc0 = carry.clone(), (dc.clone() if lstm else None)
    dgi = torch.full((B, GH), 7.0, device=dev)
    dgh = dgi if mode != "gru" else torch.full((B, GH), 7.0, device=dev)
    kt.step_backward(mode, dg_next, w_hh, carry, dc, rnd(B, H), rnd(B, S) if S else None, rnd(B, H), rnd(B, H),
                     rnd(B, H), rnd(B, H), dgi, dgh, None, lens, t, 0)
    done = slice(bb, B)
    assert torch.isnan(dgi[:bb]).any()  # the running tile did read W_hh
    assert torch.equal(carry[done], carry0[done])
    assert torch.equal(dgi[done], torch.zeros_like(dgi[done])) and torch.equal(dgh[done], torch.zeros_like(dgh[done]))
    if lstm:
        assert torch.equal(dc[done], dc0[done])


def test_matmul_pair_equals_two_matmuls():
    """matmul_pair (two products of one shape in one launch: a bidirectional layer's input
    projections, dW_ih, dW_hh) writes what two matmul calls write, biases included, odd sizes and
    transposed operands; pair_matmul_ok refuses operands that differ in shape, strides, dtype or
    in which biases they have."""
    from gpu_nn.kernels.triton import rnn as kt

    dev = _kernels_here()
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    for bias in (False, True):
        x = rnd(37, 13)
        ws = [rnd(23, 13) for _ in range(2)]
        bs = [(rnd(23), rnd(23)) if bias else (None, None) for _ in range(2)]
        one = [torch.full((37, 23), 7.0, device=dev) for _ in range(2)]
        two = [torch.full((37, 23), 7.0, device=dev) for _ in range(2)]
        for d in range(2):
            kt.matmul(x, ws[d].t(), one[d], bias1=bs[d][0], bias2=bs[d][1], dot=0)
        kt.matmul_pair(*[(x, ws[d].t(), two[d], *bs[d]) for d in range(2)], dot=0)
        for a, b in zip(one, two):
            assert _same(a, b)
    a = (x, ws[0].t(), one[0], None, None)
    assert kt.pair_matmul_ok(a, (x, ws[1].t(), one[1], None, None))
    assert not kt.pair_matmul_ok(a, (x, ws[1].t().contiguous(), one[1], None, None))  # other strides
    assert not kt.pair_matmul_ok(a, (x[:, :12], ws[1].t()[:12], one[1], None, None))  # other shapes
    assert not kt.pair_matmul_ok(a, (x, ws[1].t(), one[1], rnd(23), None))  # a bias on one side only
    assert not kt.pair_matmul_ok(a, (x.double(), ws[1].t(), one[1], None, None))  # another dtype
    # a product that fills a wave of tiles by itself keeps its own launch
    big = [(torch.empty(128 * 12, 8), torch.empty(8, 128 * 11), torch.empty(128 * 12, 128 * 11), None, None)
           for _ in range(2)]
    bm, bn = kt.matmul_blocks(128 * 12, 128 * 11, 3, kt._INTERPRET)[:2]
    assert kt.pair_matmul_ok(*big, 3) is ((128 * 12 // bm) * (128 * 11 // bn) < kt.MATMUL_PAIR_MAX_TILES)
    assert not kt.pair_matmul_ok(*big, 3) or kt._INTERPRET


@pytest.mark.parametrize("mode,has_bhh", [("rnn_tanh", False), ("lstm", False), ("gru", True), ("gru", False)])
@pytest.mark.parametrize("masked", [False, True])
def test_persist_pair_equals_two_one_direction_launches(mode, has_bhh, masked):
    """persist_forward_pair (both directions in one persistent launch) leaves every buffer as
    persist_forward run per direction does: random data, odd sizes, unequal lengths. Under the
    interpreter with one program, which then runs every tile of both directions per step; on a
    GPU with the launchers' program counts (several programs across the grid barrier)."""
    from gpu_nn.kernels.triton import rnn as kt

    dev = _kernels_here()
    sm = torch.cuda.get_device_properties(0).multi_processor_count if dev == "cuda" else 1
    g = torch.Generator().manual_seed(11)
    T, B, H = 4, 3, 37  # three hidden tiles per direction
    G, S = ref.GATES[mode] * H, ref.STORED[mode] * H or H
    lstm = mode == "lstm"
    lens = torch.tensor([4, 1, 3], dtype=torch.int64, device=dev)
    mask = (torch.rand(T, B, 2 * H, generator=g) > 0.3).float().to(dev) * 1.4 if masked else None

    def buffers():
        gg = torch.Generator().manual_seed(5)
        out = torch.zeros(T, B, 2 * H, device=dev)
        dirs = []
        for d in range(2):
            r = [torch.randn(T, B, S, generator=gg), torch.randn(T + 1, B, H, generator=gg),
                 torch.randn(T + 1, B, H, generator=gg) if lstm else None,
                 torch.randn(G, H, generator=gg) * 0.4, torch.randn(G, generator=gg) if has_bhh else None]
            dirs.append([None if t is None else t.to(dev) for t in r]
                        + [out[:, :, d * H:(d + 1) * H], None if mask is None else mask[:, :, d * H:(d + 1) * H]])
        return out, dirs

    out1, one = buffers()
    for d in range(2):
        kt.persist_forward(mode, *one[d], lens, d == 1, 0, kt.persist_programs(B, H, sm))
    out2, two = buffers()
    assert kt.persist_pair_programs(B, H, 1) == 1 and kt.persist_pair_programs(B, H, 132) == 6
    kt.persist_forward_pair(mode, *two, lens, 0, kt.persist_pair_programs(B, H, sm))
    assert _same(out1, out2)
    for a, b in zip(one, two):
        for x, y in zip(a[:3], b[:3]):
            assert x is None or _same(x, y)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_reserve_views_match_the_layout(mode):
    """gpu_nn.ops.rnn._reserve_views (as_strided on a contiguous reserve, which may start at a
    storage offset; slice and view otherwise) against the layout's own offsets and shapes."""
    T, B, H, L, D, P = 3, 2, 5, 2, 2, 0
    layout, size = ref.reserve_layout(mode, T, B, H, L, D, P)
    base = torch.arange(2 * size + 7, dtype=torch.float32)
    for reserve in (base[7:7 + size], base[:2 * size:2]):
        views = ops._reserve_views(reserve, mode, T, B, H, L, D, P)
        assert list(views) == list(layout)
        for k, (o, s) in layout.items():
            want = reserve[o:o + int(np.prod(s))].reshape(s)
            assert views[k].shape == want.shape and torch.equal(views[k], want), k
            assert views[k].data_ptr() == want.data_ptr() and views[k].stride() == want.stride(), k


def test_full_lengths_made_once():
    a = ops._lengths_on(None, 4, 3, torch.device("cpu"))
    assert torch.equal(a, torch.full((3,), 4, dtype=torch.int64))
    assert ops._lengths_on(None, 4, 3, torch.device("cpu")) is a
    assert torch.equal(ops._lengths_on(None, 5, 3, torch.device("cpu")), torch.full((3,), 5, dtype=torch.int64))
    given = torch.tensor([3, 1, 2])
    assert torch.equal(ops._lengths_on(given, 4, 3, torch.device("cpu")), given)


def test_full_lengths_kept_only_for_the_default_stream(monkeypatch):
    """On a CUDA device (simulated: the stream handles, the capture test and the fill stood in),
    the full lengths are kept for the device's default stream only: made per call on any other
    stream (where torch's CUDA graphs capture and warm up, allocating from the graphs' pool) and
    during a capture."""
    handle, capturing, made = [0], [False], []
    real_full = torch.full

    def full(size, value, dtype=None, device=None):
        made.append(device)
        return real_full(size, value, dtype=dtype)

    monkeypatch.setattr(ops, "cuda_kernels", lambda: type("K", (), {"current_stream_handle": staticmethod(lambda i: handle[0])}))
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch, "full", full)
    monkeypatch.setattr(ops, "_FULL_LENGTHS", {})
    monkeypatch.setattr(ops, "_DEFAULT_STREAMS", {})
    dev = torch.device("cuda", 0)
    a = ops._lengths_on(None, 4, 3, dev)
    assert ops._lengths_on(None, 4, 3, dev) is a and len(made) == 1 and list(ops._FULL_LENGTHS) == [(4, 3, dev, 0)]
    handle[0] = 7  # a side stream
    b, c = ops._lengths_on(None, 4, 3, dev), ops._lengths_on(None, 4, 3, dev)
    assert b is not a and c is not b and len(made) == 3 and len(ops._FULL_LENGTHS) == 1
    handle[0], capturing[0] = 0, True  # (a capture is on a side stream; and were it not)
    assert ops._lengths_on(None, 5, 3, dev) is not ops._lengths_on(None, 5, 3, dev) and len(ops._FULL_LENGTHS) == 1
    assert torch.equal(b, real_full((3,), 4, dtype=torch.int64))


def _mixed_pairs():
    """(forward backend, backward backend, device) pairs that can run here: the reference with
    Triton (the interpreter on a CPU machine), and on a GPU also Triton with CuPy."""
    pairs = [("reference", "triton"), ("triton", "reference")]
    if torch.cuda.is_available():
        pairs += [("triton", "cupy"), ("cupy", "triton")]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for a, b in pairs:
        why = next((w for n in (a, b) if n != "reference" for ok, w in [gpu_nn._backend.status(n)] if not ok), None)
        mark = pytest.mark.skip(reason=f"backend unavailable: {why}") if why else ()
        out.append(pytest.param(a, b, dev, id=f"{a}-then-{b}", marks=mark))
    return out


@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_relu"])
@pytest.mark.parametrize("fwd_backend,bwd_backend,device", _mixed_pairs())
def test_backward_on_another_backend_reads_the_forwards_reserve(fwd_backend, bwd_backend, device, mode, rng):
    """Every backend writes and reads one reserve layout (reference.rnn.reserve_layout), so a
    forward on one backend and its backward on another (a backend block around only one of
    them, or auto choosing differently for the two) give the float64 reference's gradients. A
    2-layer bidirectional stack with lengths, in float32 (TF32 off)."""
    T, B, I, H, L = 4, 3, 5, 7, 2
    D, G = 2, ops.GATES[mode]
    shapes = [s for l in range(L) for _ in range(D) for s in ((G * H, I if l == 0 else D * H), (G * H, H), (G * H,), (G * H,))]
    w64 = [torch.from_numpy(rng.standard_normal(s) * 0.4) for s in shapes]
    x64 = torch.from_numpy(rng.standard_normal((T, B, I)))
    hx64 = torch.from_numpy(rng.standard_normal((L * D, B, H)))
    cx64 = torch.from_numpy(rng.standard_normal((L * D, B, H))) if mode == "lstm" else None
    lengths = torch.tensor([4, 3, 1])

    def run(fb, bb, dt, dev):
        to = lambda t: None if t is None else t.to(dev, dt)  # noqa: E731
        x, hx, cx, ws = to(x64), to(hx64), to(cx64), [to(w) for w in w64]
        with gpu_nn.backend(fb):
            out, hn, cn, reserve = ops.rnn_seq_forward(x, hx, cx, ws, mode, L, True, True, lengths)
        g = np.random.default_rng(7)
        go, gh = (torch.from_numpy(g.standard_normal(t.shape)).to(dev, dt) for t in (out, hn))
        gc = torch.from_numpy(g.standard_normal(cn.shape)).to(dev, dt) if mode == "lstm" else None
        with gpu_nn.backend(bb):
            dx, dhx, dcx, dws = ops.rnn_seq_backward(go, gh, gc, x, ws, reserve, mode, L, True, True, lengths)
        return [dx, dhx, *([dcx] if mode == "lstm" else []), *dws]

    want = run("reference", "reference", torch.float64, "cpu")
    got = run(fwd_backend, bwd_backend, torch.float32, device)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, torch.float32, k=T * B * G * H, what=f"{mode} {fwd_backend}->{bwd_backend} grad {i}")


@pytest.mark.parametrize("backend,device", backend_params(("triton",)))
def test_bias_gradient_column_sums_split_the_time_steps_rows(backend, device, rng):
    """The recurrent layers' bias gradients sum the gate gradients of all T steps (T * N rows):
    in one launch for few rows, else float32 partial sums of row ranges and their sum (a second
    launch), in every mode (one sum; the same sum into two biases; two sums) and output dtype,
    against float64 sums, at row counts that split into 1 to several ranges."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import dense as kd, rnn as kr

    for dtype in gpu_dtypes_for(backend, device):
        for M, N in ((37, 70), (513, 9), (1100, 131)):
            x64, x2_64 = randn(rng, M, N), randn(rng, M, N)
            x, x2 = x64.float().to(device), x2_64.float().to(device)
            for mode in (0, 1, 2):
                y = torch.full((N,), float("nan"), dtype=dtype, device=device)
                y2 = None if mode == 0 else torch.full((N,), float("nan"), dtype=dtype, device=device)
                with interpreted_launches(device) as names:
                    kr.colsum(x, y, y2, x2 if mode == 2 else None)
                assert_close(y, x.double().sum(0), dtype, k=M, what=f"colsum {dtype} {M}x{N} mode {mode}")
                if mode:
                    assert_close(y2, (x2 if mode == 2 else x).double().sum(0), dtype, k=M, what=f"y2 mode {mode}")
                if device == "cpu" and ktriton.INTERPRET:
                    splits = kd.colsum_splits(M, N, 64)
                    assert names == ["_rnn_colsum_kernel"] * (1 if splits == 1 else 2)
                    assert (splits > 1) == (M >= 2 * kd.COLSUM_MIN_ROWS)


@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_sequence_layers_on_the_meta_device_give_torchs_shapes(mode):
    """A model's shapes worked out on device="meta" (no memory, no compute): torch's layers run
    there; ours asked autocast about "meta" and raised "unknown device type for autocast"."""
    extra = {"proj_size": 2} if mode == "LSTM" else {}
    for kw in ({}, {"num_layers": 2, "bidirectional": True, "batch_first": True, **extra}):
        theirs = getattr(torch.nn, mode)(3, 4, device="meta", **kw)
        ours = getattr(gnn, mode)(3, 4, device="meta", **kw)
        x = torch.randn(5, 2, 3, device="meta")

        def shapes(res):
            out, h = res
            return out.device, out.shape, [t.shape for t in (h if isinstance(h, tuple) else (h,))]

        assert shapes(ours(x)) == shapes(theirs(x))
        h0 = theirs(x)[1]
        assert shapes(ours(x, h0)) == shapes(theirs(x, h0))


@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_fx_symbolic_trace_records_recurrent_modules_whole_as_torchs(mode):
    """torch.fx.symbolic_trace of a model holding our recurrent layers and cells: each is one
    call_module node, as torch's own are (leaves of its tracer), with and without a given state;
    the traced module computes what the model does. Ours were traced into, and their input checks
    met a Proxy (a sequence layer: 'expected a Tensor or PackedSequence input, got Proxy'; a cell:
    'symbolically traced variables cannot be used as inputs to control flow')."""

    class Model(torch.nn.Module):
        def __init__(self, lib):
            super().__init__()
            self.seq = getattr(lib, mode)(3, 4)
            self.cell = getattr(lib, mode + "Cell")(3, 4)

        def forward(self, x, h0):
            y = self.seq(x)[0].sum() + self.seq(x, h0)[0].sum()
            return y + (self.cell(x[0])[0] if mode == "LSTM" else self.cell(x[0])).sum() + \
                (self.cell(x[0], (h0[0][0], h0[1][0]))[0] if mode == "LSTM" else self.cell(x[0], h0[0])).sum()

    torch.manual_seed(0)
    theirs, ours = Model(torch.nn), Model(gnn)
    ours.load_state_dict(theirs.state_dict())
    graphs = [torch.fx.symbolic_trace(m) for m in (theirs, ours)]
    assert [(n.op, str(n.target)) for n in graphs[1].graph.nodes] == [(n.op, str(n.target)) for n in graphs[0].graph.nodes]
    assert sum(n.op == "call_module" for n in graphs[1].graph.nodes) == 4
    x = torch.randn(5, 2, 3)
    h0 = (torch.randn(1, 2, 4), torch.randn(1, 2, 4)) if mode == "LSTM" else torch.randn(1, 2, 4)
    torch.testing.assert_close(graphs[1](x, h0), theirs(x, h0))
    torch.testing.assert_close(graphs[1](x, h0), ours(x, h0))


@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"])
def test_fx_symbolic_trace_of_a_subclass_with_its_own_forward_fails_as_torchs(mode):
    """A subclass of our recurrent layer or cell with a forward of its own that calls ours through
    super(): symbolic tracing fails as it does for the same subclass of torch's (TraceError: torch's
    forward branches on the Proxy). Recorded whole, its call_module node ran the subclass's whole
    forward again at run time: a ``[0]`` after super() taken twice gave the first step only, no
    error. A subclass without a forward of its own is still recorded whole and traces right."""
    seq = "Cell" not in mode
    x = torch.randn(5, 3, 4) if seq else torch.randn(3, 4)

    def subclass(base, own_forward):
        body = {"forward": lambda self, inp: base.forward(self, inp.tanh())[0]} if own_forward else {}
        return type("Sub" + mode, (base,), body)

    for own in (True, False):
        torch.manual_seed(0)
        theirs = torch.nn.Sequential(subclass(getattr(torch.nn, mode), own)(4, 6))
        ours = torch.nn.Sequential(subclass(getattr(gnn, mode), own)(4, 6))
        ours.load_state_dict(theirs.state_dict())
        if own:
            for m in (theirs, ours):
                with pytest.raises(torch.fx.proxy.TraceError, match="cannot be used as inputs to control flow"):
                    torch.fx.symbolic_trace(m)
            continue
        traced = torch.fx.symbolic_trace(ours)
        assert [n.op for n in traced.graph.nodes] == ["placeholder", "call_module", "output"]
        first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
        torch.testing.assert_close(first(traced(x)), first(theirs(x)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: two CUDA streams, one held back by a GPU sleep")
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_full_lengths_kept_per_stream(backend):
    """The full-length tensor a layer without lengths reads is kept only for the device's
    default stream: its fill is queued on the stream that made it. A first call on a stream held
    back by a GPU sleep, then one of the same T and B on another stream ordered after nothing of
    it (other inputs, another layer): the second must not read the first's lengths before their
    fill ran (kept without the stream in the key it did, and read them as they came: rows ended
    early). Neither side stream's is kept (those are where CUDA graphs capture and warm up), the
    default stream's is."""
    from gpu_nn import _backend

    ok, why = _backend.status(backend)
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    torch.manual_seed(0)
    T, B = 7, 3
    layers = [gnn.LSTM(5, 6).cuda() for _ in range(2)]
    x = [torch.randn(T, B, 5, device="cuda") for _ in range(2)]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    with gpu_nn.backend(backend), torch.no_grad():
        for layer, xi in zip(layers, x):  # compiled and planned first: the calls below only queue work
            layer(xi)
        torch.cuda.synchronize()
        ops._FULL_LENGTHS.clear()
        with torch.cuda.stream(s1):
            torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time ahead of the first call's fill
            layers[0](x[0])
        with torch.cuda.stream(s2):
            y = layers[1](x[1])[0]
    torch.cuda.synchronize()
    with gpu_nn.backend("reference"), torch.no_grad():
        want = layers[1].cpu()(x[1].cpu())[0]
    torch.testing.assert_close(y.cpu(), want, rtol=1e-4, atol=1e-5)
    assert not ops._FULL_LENGTHS
    with gpu_nn.backend(backend), torch.no_grad():
        layers[1].cuda()(x[1])
    assert [k[3] for k in ops._FULL_LENGTHS] == [torch.cuda.default_stream().cuda_stream]


@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell", "RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("how", ["data-input", "frozen", "frozen-part", "state", "grad-x", "grad-w", "all"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_recurrent_backward_computes_only_the_gradients_asked_for(kind, how, backend, device, monkeypatch):
    """The recurrent backward computed every gradient whatever was asked: a data input's (the
    first layer's product with w_ih), a frozen weight's, a zero initial state's, where torch's
    cells (their autograd) and its cuDNN layers (output_mask) compute only what is used. The
    cell and sequence backward ops now take a mask of what this backward uses (needs_input_grad
    narrowed by the engine, as conv's and linear's); what it asks for gets torch's values (None
    where torch's is None): float64 on the reference, float32 on the GPU backends against
    torch's float64 (two layers, both directions: the paired step and persistent paths)."""
    import gpu_nn.ops.rnn as orn

    if backend == "triton" and device == "cpu" and how in ("grad-x", "grad-w", "all"):
        pytest.skip("under the interpreter, the masks that differ: grad-x's is frozen's, grad-w's "
                    "data-input's (they differ in how autograd asks, which the reference runs), all's "
                    "every other test's")
    seq = not kind.endswith("Cell")
    masks = []
    name = "rnn_seq_backward" if seq else "rnn_cell_backward"
    orig = getattr(orn, name)
    monkeypatch.setattr(orn, name, lambda *a: (masks.append(a[-1]), orig(*a))[1])
    opts = {"num_layers": 2, "bidirectional": True} if seq else {}
    dtype = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(0)
    ours = getattr(gnn, kind)(5, 6, **opts).to(device, dtype)
    theirs = getattr(torch.nn, kind)(5, 6, **opts).double()
    theirs.load_state_dict(ours.state_dict())
    lstm = kind.startswith("LSTM")
    base = torch.randn(*((4, 3, 5) if seq else (3, 5)), dtype=torch.float64)
    h0 = torch.randn(*((4, 3, 6) if seq else (3, 6)), dtype=torch.float64)
    frozen = {"frozen": lambda n: True,
              "frozen-part": (lambda n: "_l0" in n) if seq else (lambda n: n in ("weight_hh", "bias_ih"))}.get(how)
    x_grad = how not in ("data-input", "state")
    results = []
    for module in (ours, theirs):
        mine = module is ours
        for n, p in module.named_parameters():
            p.requires_grad_(frozen is None or not frozen(n))
            p.grad = None
        xb = base.to(device, dtype if mine else torch.float64).clone().requires_grad_(x_grad)
        x = xb * 1 if how in ("grad-x", "grad-w") else xb  # (a non-leaf: its node is asked about)
        hb = h0.to(device, xb.dtype).clone().requires_grad_(how == "state")
        with gpu_nn.backend(backend) if mine else contextlib.nullcontext():
            out = module(x, (hb, torch.zeros_like(hb)) if lstm else hb)
            if seq:
                y, extra = out[0], out[1][1] if lstm else out[1]
            else:
                y, extra = out if lstm else (out, None)
            loss = (y ** 2).sum() + (0 if extra is None else (extra ** 2).sum())
            if how == "grad-x":
                results.append(torch.autograd.grad(loss, [x]))
            elif how == "grad-w":
                results.append(torch.autograd.grad(loss, list(module.parameters())))
            else:
                loss.backward()
                results.append((xb.grad, hb.grad, *(p.grad for p in module.parameters())))
    # the backward's mask: (input, state, cell state, each weight) for both the sequence op
    # ([input, hx, cx, *weights]) and the cell op (dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh)
    assert len(masks) == 1
    trains = [p.requires_grad and how != "grad-x" for p in ours.parameters()]
    assert [bool(m) for m in masks[0]] == [x_grad and how != "grad-w", how == "state", False, *trains]
    for a, b in zip(*results):
        if a is None or b is None:
            assert a is None and b is None
        elif backend == "reference":
            torch.testing.assert_close(a, b)
        else:
            assert_close(a, b, dtype, k=8, what=f"{kind} {how}")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_backward_of_unused_final_states_fills_and_copies_nothing_extra(mode, bidirectional, rng):
    """The backward of a layer whose h_n (and c_n) nobody used: the autograd wrapper hands the
    op an empty placeholder and the op zero-fills its float32 carries once, where a zeros tensor
    of the state's shape and its copy into the carries were two launches each; and a
    one-direction first layer of a half-precision layer writes its input gradient in that dtype
    (one rounding, in the product), where a float32 one and a .to(dtype) copy were two passes.
    Counted with torch's profiler on the Triton path (the interpreter's own copies are flat: the
    shapes here are the op's); the gradients against the float64 reference, and a used h_n still
    reaches them (the same layer, h_n's gradient given)."""
    from torch.profiler import ProfilerActivity, profile

    T, B, I, H, layers = 3, 3, 8, 16, 2
    D = 2 if bidirectional else 1
    for dtype in (torch.float32, torch.float16):
        layer = getattr(gnn, mode.upper())(I, H, num_layers=layers, bidirectional=bidirectional).to(dtype)
        x = randn(rng, T, B, I, dtype=dtype, requires_grad=True)
        with gpu_nn.backend("triton"):
            out, _ = layer(x)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                gx, *gw = torch.autograd.grad(out.sum(), [x, *layer.parameters()])
        state = [layers * D, B, H]
        seen = [(e.name, e.input_shapes[0] if e.input_shapes else None) for e in prof.events()]
        # (a zeros tensor is an empty one zero-filled: the fills alone do not tell; the copies do)
        copied = [s for n, s in seen if n == "aten::copy_" and s == state]
        zeroed = [s for n, s in seen if n == "aten::zero_" and s == state]
        assert not copied and len(zeroed) == (2 if mode == "lstm" else 1), (dtype, copied, zeroed)
        rounded = [s for n, s in seen if n == "aten::_to_copy" and s == [T, B, I]]
        assert len(rounded) == (1 if D == 2 and dtype != torch.float32 else 0), (dtype, rounded)
        with gpu_nn.backend("reference"):
            ref_layer = copy.deepcopy(layer).double()
            x64 = x.detach().double().requires_grad_()
            want = torch.autograd.grad(ref_layer(x64)[0].sum(), [x64, *ref_layer.parameters()])
        k = T * (I + H) * layers * D
        for got, exp in zip([gx, *gw], want):
            assert_close(got, exp, dtype, k, f"{mode} {dtype} D={D}")
