"""NumPy reference for the recurrent family: Elman RNN (tanh / relu), LSTM and GRU, as cells and
as whole multi-layer, optionally bidirectional sequences with backpropagation through time.

Formulas (torch's, gate order as in ``torch.nn``)::

    rnn_tanh / rnn_relu:  h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)
    lstm (i, f, g, o):    i, f, o = sigmoid(.), g = tanh(.)  of  x W_ih^T + b_ih + h W_hh^T + b_hh
                          c' = f * c + i * g,   h' = o * tanh(c')
    gru (r, z, n):        r, z = sigmoid(x W_i{r,z}^T + b_i{r,z} + h W_h{r,z}^T + b_h{r,z})
                          n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),  h' = (1 - z) * n + z * h

Sequences are time-major: ``x [T, B, I]``, ``hx / cx [L * D, B, H]`` (D = 2 when
bidirectional; index ``l * D + d``); ``batch_first`` is the caller's business. ``weights`` is a
list with one ``(w_ih, w_hh, b_ih, b_hh)`` tuple per layer and direction (biases may be
``None``), ``w_ih [G * H, I_l]`` and ``w_hh [G * H, H]`` with G = 1, 4, 3. ``lengths [B]``
(optional) gives per-sequence lengths as a PackedSequence does: a step ``t >= lengths[b]``
leaves sequence b's state unchanged and outputs zero, so the forward direction's final state is
the state at each sequence's own last step and the reverse direction starts at it.
``dropout_masks [L - 1, T, B, D * P]`` (optional, drawn by the caller, already scaled by
1 / (1 - p)) multiply the output of each layer but the last before it feeds the next.

LSTM projections (torch's ``proj_size``): a weight tuple may carry a fifth entry ``w_hr [P, H]``
(P < H); then ``h`` has size P (``hx [L * D, B, P]``, ``w_hh [4 H, P]``, layer inputs above the
first ``D * P`` wide, output ``[T, B, D * P]``) while ``c`` keeps size H, and each step ends with
``h' = (o * tanh(c')) W_hr^T``. Without projections P = H below.

The forward pass returns a flat ``reserve`` array (the intermediates the backward needs, laid
out by :func:`reserve_layout`); the backward takes it back, as cuDNN's reserve space works.
The input projection of a layer is one matmul over all time steps; the time loop is the only
Python loop, and it runs in preallocated buffers with in-place updates.
inf / NaN values propagate as in torch, without NumPy's RuntimeWarnings (torch does not warn):
the public functions each run under one ``np.errstate``.
"""

from __future__ import annotations

import math

import numpy as np

from ._errstate import quiet
from .activation import relu_
from .activation import sigmoid_ as _sigmoid_
from .dense import column_sums

MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")
# rows of w_ih / w_hh per hidden unit, and per-step values stored in the reserve per hidden unit
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
STORED = {"rnn_tanh": 0, "rnn_relu": 0, "lstm": 4, "gru": 4}


def reserve_layout(mode: str, T: int, B: int, H: int, num_layers: int, num_directions: int, P: int = 0):
    """``({key: (offset, shape)}, total)`` of the flat reserve. ``P``: the LSTM's projection size
    (0: none, and the state slots are H wide).

    Per layer ``l`` and direction ``d``: ``("gates", l, d) [T, B, S * H]`` (LSTM: activated
    i, f, g, o; GRU: r, z, n and h W_hn^T + b_hn; none for the Elman RNN), ``("h", l, d)
    [T + 1, B, H]`` (the state before and after every step: slot 0 holds h0 for the forward
    direction, slot T for the reverse one, and step t moves slot t -> t + 1 forward, t + 1 -> t
    reverse), ``("c", l, d)`` likewise for the LSTM; per layer l >= 1 ``("x", l) [T, B, D * H]``,
    the layer's input after dropout. With a projection (P > 0) the ``h`` slots and ``x`` are P
    and D * P wide, and ``("m", l, d) [T, B, H]`` keeps ``o * tanh(c')`` of every step (the
    input of the projection, which dW_hr needs).
    """
    S = STORED[mode]
    W = P if P else H
    out, off = {}, 0

    def put(key, shape):
        nonlocal off
        out[key] = (off, shape)
        off += math.prod(shape)  # math.prod: np.prod costs microseconds on a tuple

    for l in range(num_layers):
        for d in range(num_directions):
            if S:
                put(("gates", l, d), (T, B, S * H))
            put(("h", l, d), (T + 1, B, W))
            if mode == "lstm":
                put(("c", l, d), (T + 1, B, H))
            if P:
                put(("m", l, d), (T, B, H))
        if l > 0:
            put(("x", l), (T, B, num_directions * W))
    return out, off


def reserve_size(mode: str, T: int, B: int, H: int, num_layers: int, num_directions: int, P: int = 0) -> int:
    return reserve_layout(mode, T, B, H, num_layers, num_directions, P)[1]


def _unpack(ws):
    """``(w_ih, w_hh, b_ih, b_hh, w_hr or None)`` of one layer and direction."""
    return (*ws[:4], ws[4] if len(ws) > 4 else None)


def _views(reserve, layout):
    return {k: reserve[o:o + math.prod(s)].reshape(s) for k, (o, s) in layout.items()}


_CONSTS: dict = {}  # dtype -> 0-d arrays (0.5, 1, 0)


def _consts(dt):
    """``(0.5, 1, 0)`` as 0-d arrays of ``dt``: a ufunc takes one at half the cost of a Python
    float (no scalar conversion per call), with the same result (same dtype, same value)."""
    got = _CONSTS.get(dt)
    if got is None:
        got = _CONSTS[dt] = (np.array(0.5, dt), np.array(1, dt), np.array(0, dt))
    return got


def _valid_mask(lengths, T, B):
    if lengths is None:
        return None
    lengths = np.asarray(lengths).astype(np.int64)
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {lengths.shape}")
    if (lengths >= T).all():
        return None
    return np.arange(T)[:, None] < lengths[None, :]


def _steps(T, reverse):
    """(t, slot before, slot after) in processing order."""
    return [(t, t + 1, t) for t in range(T - 1, -1, -1)] if reverse else [(t, t, t + 1) for t in range(T)]


# ----------------------------------------------------------------------------------------------
# one layer, one direction


def _dir_forward(mode, xin, w_ih, w_hh, b_ih, b_hh, G, Hs, Cs, reverse, valid, w_hr=None, Ms=None):
    T, B, _ = xin.shape
    H = w_hh.shape[0] // GATES[mode]
    x2 = xin.reshape(T * B, xin.shape[-1])
    # a contiguous [H, G * H] copy: the per-step product then runs as a plain NN gemm, the
    # fastest layout for OpenBLAS at these small shapes
    whhT = np.ascontiguousarray(w_hh.T)
    if mode == "gru":
        np.matmul(x2, w_ih.T, out=G.reshape(T * B, 4 * H)[:, : 3 * H])
        if b_ih is not None:
            G[:, :, : 3 * H] += b_ih
    elif mode == "lstm":
        np.matmul(x2, w_ih.T, out=G.reshape(T * B, 4 * H))
        if b_ih is not None:
            G += b_ih + b_hh
    else:
        G = np.matmul(x2, w_ih.T).reshape(T, B, H)
        if b_ih is not None:
            G += b_ih + b_hh
    tmp = np.empty((B, GATES[mode] * H), G.dtype)
    tH = np.empty((B, H), G.dtype)
    whrT = None if w_hr is None else np.ascontiguousarray(w_hr.T)
    for t, p, n in _steps(T, reverse):
        g, hp, hn = G[t], Hs[p], Hs[n]
        np.matmul(hp, whhT, out=tmp)
        if mode == "lstm":
            g += tmp
            _sigmoid_(g[:, : 2 * H])
            _sigmoid_(g[:, 3 * H:])
            np.tanh(g[:, 2 * H: 3 * H], out=g[:, 2 * H: 3 * H])
            c = Cs[n]
            np.multiply(g[:, H: 2 * H], Cs[p], out=c)
            np.multiply(g[:, :H], g[:, 2 * H: 3 * H], out=tH)
            c += tH
            m = hn if whrT is None else Ms[t]
            np.tanh(c, out=m)
            m *= g[:, 3 * H:]
            if whrT is not None:
                np.matmul(m, whrT, out=hn)
        elif mode == "gru":
            if b_hh is not None:
                tmp += b_hh
            rz = g[:, : 2 * H]
            rz += tmp[:, : 2 * H]
            _sigmoid_(rz)
            g[:, 3 * H:] = tmp[:, 2 * H:]
            nn = g[:, 2 * H: 3 * H]
            np.multiply(g[:, :H], tmp[:, 2 * H:], out=tH)
            nn += tH
            np.tanh(nn, out=nn)
            np.subtract(hp, nn, out=hn)
            hn *= g[:, H: 2 * H]
            hn += nn
        else:
            np.add(g, tmp, out=hn)
            if mode == "rnn_tanh":
                np.tanh(hn, out=hn)
            else:
                relu_(hn)
        if valid is not None and not valid[t].all():
            inv = ~valid[t]
            hn[inv] = hp[inv]
            if Cs is not None:
                Cs[n][inv] = Cs[p][inv]


def _dir_backward(mode, dout, dhn, dcn, w_hh, G, Hs, Cs, reverse, valid, dGi, dGh, w_hr=None, dHp=None):
    """BPTT of one layer and direction. ``dout [T, B, W]`` (zero where invalid; W = P with a
    projection, else H) is the gradient of this direction's outputs; writes the gradient of the
    pre-activations seen by ``w_ih`` into ``dGi`` and by ``w_hh`` into ``dGh`` (the same array
    except for the GRU) and, with a projection ``w_hr``, the gradient of each step's projected
    state into ``dHp [T, B, P]`` (zero where invalid; dW_hr = sum_t dHp[t]^T m_t); returns dh0, dc0."""
    T, B, _ = dout.shape
    H = w_hh.shape[0] // GATES[mode]
    dh = np.array(dhn, dtype=dGi.dtype, copy=True)
    dc = np.array(dcn, dtype=dGi.dtype, copy=True) if mode == "lstm" else None
    tH = np.empty((B, H), dGi.dtype)
    tH2 = np.empty((B, H), dGi.dtype)
    nh = np.empty((B, w_hh.shape[1]), dGi.dtype)
    dm = np.empty((B, H), dGi.dtype) if w_hr is not None else None
    for t, p, n in reversed(_steps(T, reverse)):
        dh += dout[t]
        dg = dGi[t]
        if valid is not None and not valid[t].all():
            inv = ~valid[t]
            keep_h = dh[inv]
            keep_c = dc[inv] if dc is not None else None
        else:
            inv = None
        if mode == "lstm":
            dhp = dh
            if w_hr is not None:
                # h = m W_hr^T: dm = dh W_hr, and the cell below sees dm where it would see dh
                dHp[t] = dh
                if inv is not None:
                    dHp[t][inv] = 0
                np.matmul(dh, w_hr, out=dm)
                dh = dm
            g = G[t]
            i, f, gg, o = g[:, :H], g[:, H: 2 * H], g[:, 2 * H: 3 * H], g[:, 3 * H:]
            tc = np.tanh(Cs[n], out=tH)
            # do = dh * tanh(c) * o (1 - o)
            d_o = dg[:, 3 * H:]
            np.multiply(dh, tc, out=d_o)
            np.subtract(1, o, out=tH2)
            tH2 *= o
            d_o *= tH2
            # dc += dh * o * (1 - tanh(c)^2)
            np.multiply(tc, tc, out=tH2)
            np.subtract(1, tH2, out=tH2)
            tH2 *= o
            tH2 *= dh
            dc += tH2
            # di = dc g i (1 - i); df = dc c_prev f (1 - f); dg = dc i (1 - g^2)
            d_i, d_f, d_g = dg[:, :H], dg[:, H: 2 * H], dg[:, 2 * H: 3 * H]
            np.subtract(1, i, out=tH2)
            tH2 *= i
            np.multiply(dc, gg, out=d_i)
            d_i *= tH2
            np.subtract(1, f, out=tH2)
            tH2 *= f
            np.multiply(dc, Cs[p], out=d_f)
            d_f *= tH2
            np.multiply(gg, gg, out=tH2)
            np.subtract(1, tH2, out=tH2)
            tH2 *= i
            np.multiply(dc, tH2, out=d_g)
            dc *= f
            np.matmul(dg, w_hh, out=nh)
            dh, nh = nh, dhp
        elif mode == "gru":
            g = G[t]
            r, z, nn, hn_ = g[:, :H], g[:, H: 2 * H], g[:, 2 * H: 3 * H], g[:, 3 * H:]
            d_r, d_z, d_n = dg[:, :H], dg[:, H: 2 * H], dg[:, 2 * H: 3 * H]
            # dz = dh (h_prev - n) z (1 - z)
            np.subtract(Hs[p], nn, out=d_z)
            d_z *= dh
            np.subtract(1, z, out=tH)
            tH *= z
            d_z *= tH
            # dn = (dh - dh z) (1 - n^2): torch's CPU cell writes h' = (h - n) z + n, and its
            # autograd sums dn = dh - dh z, not dh (1 - z): the same but for rounding, except that
            # an infinite dh gives NaN there (inf - inf), where (1 - z) keeps it infinite
            np.multiply(dh, z, out=tH)
            np.subtract(dh, tH, out=d_n)
            np.multiply(nn, nn, out=tH)
            np.subtract(1, tH, out=tH)
            d_n *= tH
            # dr = dn hn r (1 - r)
            np.multiply(d_n, hn_, out=d_r)
            np.subtract(1, r, out=tH)
            tH *= r
            d_r *= tH
            dgh = dGh[t]
            dgh[:, : 2 * H] = dg[:, : 2 * H]
            np.multiply(d_n, r, out=dgh[:, 2 * H:])
            np.matmul(dgh, w_hh, out=nh)
            np.multiply(dh, z, out=tH)
            nh += tH
            dh, nh = nh, dh
        else:
            hcur = Hs[n]
            if mode == "rnn_tanh":
                np.multiply(hcur, hcur, out=tH)
                np.subtract(1, tH, out=tH)
                np.multiply(dh, tH, out=dg)
            else:
                # torch's threshold_backward: +0 where h <= 0, else dh (a NaN h passes dh); a
                # select, not dh * mask, which would make an infinite dh NaN (inf * 0) where h <= 0
                np.copyto(dg, dh)
                np.copyto(dg, 0, where=hcur <= 0)
            np.matmul(dg, w_hh, out=nh)
            dh, nh = nh, dh
        if inv is not None:
            dg[inv] = 0
            if dGh is not dGi:
                dGh[t][inv] = 0
            dh[inv] = keep_h
            if dc is not None:
                dc[inv] = keep_c
    return dh, dc


# ----------------------------------------------------------------------------------------------
# whole sequences


@quiet
def rnn_forward(mode, x, hx, cx, weights, num_layers, bidirectional, lengths=None, dropout_masks=None):
    """Multi-layer (bi)directional recurrence over ``x [T, B, I]``.

    Returns ``(output [T, B, D * W], hn [L * D, B, W], cn [L * D, B, H] or None, reserve)``
    (W = P with an LSTM projection, else H). ``output`` is zero at steps beyond a sequence's length.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = weights[0][1].shape[0] // GATES[mode]
    P = weights[0][4].shape[0] if len(weights[0]) > 4 and weights[0][4] is not None else 0
    W = P if P else H
    dt = np.result_type(x.dtype, hx.dtype, *(w.dtype for ws in weights for w in ws if w is not None))
    layout, size = reserve_layout(mode, T, B, H, num_layers, D, P)
    reserve = np.empty(size, dt)
    v = _views(reserve, layout)
    valid = _valid_mask(lengths, T, B)
    hn = np.empty((num_layers * D, B, W), dt)
    cn = np.empty((num_layers * D, B, H), dt) if mode == "lstm" else None
    xin = x
    out = None
    for l in range(num_layers):
        if l > 0:
            xin = v[("x", l)]
            if dropout_masks is not None:
                np.multiply(out, dropout_masks[l - 1], out=xin)
            else:
                xin[...] = out
        out = np.empty((T, B, D * W), dt)
        for d in range(D):
            k = l * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = _unpack(weights[k])
            Hs = v[("h", l, d)]
            Cs = v[("c", l, d)] if mode == "lstm" else None
            G = v.get(("gates", l, d))
            first = T if d == 1 else 0
            Hs[first] = hx[k]
            if Cs is not None:
                Cs[first] = cx[k]
            _dir_forward(mode, xin, w_ih, w_hh, b_ih, b_hh, G, Hs, Cs, d == 1, valid, w_hr, v.get(("m", l, d)))
            out[:, :, d * W:(d + 1) * W] = Hs[:T] if d == 1 else Hs[1:]
            hn[k] = Hs[0] if d == 1 else Hs[T]
            if cn is not None:
                cn[k] = Cs[0] if d == 1 else Cs[T]
        if valid is not None:
            out *= valid[:, :, None]
    return out, hn, cn, reserve


@quiet
def rnn_backward(mode, grad_output, grad_hn, grad_cn, x, weights, reserve, num_layers, bidirectional,
                 lengths=None, dropout_masks=None, need_input=True, need_weights=None):
    """Gradients of :func:`rnn_forward`. ``grad_hn`` / ``grad_cn`` may be ``None`` (zero).

    Returns ``(dx [T, B, I], dhx [L * D, B, W], dcx or None, dweights)`` with ``dweights`` a list
    of ``(dw_ih, dw_hh, db_ih, db_hh[, dw_hr])`` per layer and direction (bias gradients ``None``
    where the layer has no bias; ``dw_hr`` with a projection).

    Only the gradients asked for are computed, as torch's cuDNN backward (its ``output_mask``):
    ``need_input`` False gives ``dx`` None (no product with the first layer's ``w_ih``);
    ``need_weights`` (None: all) lists per layer and direction a flag per entry of
    ``weights[k]``, and a weight whose flag is False gets None (no product; the two biases share
    one column sum, made when either is asked for).
    """
    T, B, I = x.shape
    D = 2 if bidirectional else 1
    dt = reserve.dtype
    H = weights[0][1].shape[0] // GATES[mode]
    P = weights[0][4].shape[0] if len(weights[0]) > 4 and weights[0][4] is not None else 0
    W = P if P else H
    v = _views(reserve, reserve_layout(mode, T, B, H, num_layers, D, P)[0])
    valid = _valid_mask(lengths, T, B)
    gate_w = GATES[mode] * H
    dhx = np.empty((num_layers * D, B, W), dt)
    dcx = np.empty((num_layers * D, B, H), dt) if mode == "lstm" else None
    dweights = [None] * (num_layers * D)
    dout = np.array(grad_output, dtype=dt, copy=True)
    zeros = np.zeros((B, W), dt)
    zeros_c = np.zeros((B, H), dt)
    dGi = np.empty((T, B, gate_w), dt)
    dGh = np.empty((T, B, gate_w), dt) if mode == "gru" else dGi
    dHp = np.empty((T, B, P), dt) if P else None
    for l in range(num_layers - 1, -1, -1):
        xin = x if l == 0 else v[("x", l)]
        in_w = xin.shape[-1]
        dxin = np.zeros((T, B, in_w), dt) if (l > 0 or need_input) else None
        x_rows = None  # dW_ih's operand, both directions (made where a dW_ih is asked for)
        if valid is not None:
            # a select, not a product: a NaN / inf gradient of a padded output adds nothing
            np.copyto(dout, 0, where=~valid[:, :, None])
        for d in range(D):
            k = l * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = _unpack(weights[k])
            Hs = v[("h", l, d)]
            Cs = v[("c", l, d)] if mode == "lstm" else None
            G = v.get(("gates", l, d))
            dh0, dc0 = _dir_backward(
                mode, dout[:, :, d * W:(d + 1) * W],
                zeros if grad_hn is None else grad_hn[k],
                (zeros_c if grad_cn is None else grad_cn[k]) if mode == "lstm" else None,
                w_hh, G, Hs, Cs, d == 1, valid, dGi, dGh, w_hr, dHp,
            )
            dhx[k] = dh0
            if dcx is not None:
                dcx[k] = dc0
            gi = dGi.reshape(T * B, gate_w)
            gh = dGh.reshape(T * B, gate_w)
            want = (True,) * 5 if need_weights is None else need_weights[k]
            if want[0] and x_rows is None:
                x_rows = _valid_rows(xin, valid)
            dw_ih = gi.T @ x_rows if want[0] else None
            dw_hh = gh.T @ _valid_rows(Hs[1:] if d == 1 else Hs[:T], valid) if want[1] else None
            db_ih = db_hh = None
            if b_ih is not None and (want[2] or want[3]):
                db_ih = column_sums(gi)
                db_hh = column_sums(gh) if gh is not gi else db_ih.copy()
                db_ih, db_hh = (db_ih if want[2] else None), (db_hh if want[3] else None)
            if dxin is not None:
                dxin.reshape(T * B, in_w)[...] += gi @ w_ih
            dweights[k] = (dw_ih, dw_hh, db_ih, db_hh)
            if P:
                dweights[k] += (dHp.reshape(T * B, P).T @ _valid_rows(v[("m", l, d)], valid) if want[4] else None,)
        if l > 0:
            dout = dxin
            if dropout_masks is not None:
                dout *= dropout_masks[l - 1]
        else:
            dx = dxin
    return dx, dhx, dcx, dweights


def _valid_rows(m: np.ndarray, valid) -> np.ndarray:
    """``m`` [T, B, n] as [T * B, n] rows of a weight gradient's product, the steps past their
    sequence's length (``valid`` False) zeroed: they add nothing, as in torch's packed sequences,
    though the state an ended sequence carries on (or the input's padding) may be inf or NaN,
    which a zero gate gradient would turn into NaN (0 * inf)."""
    T, B, n = m.shape
    if valid is not None and not valid.all():
        m = np.where(valid[:, :, None], m, 0)
    return m.reshape(T * B, n)


# ----------------------------------------------------------------------------------------------
# cells: one step of one layer


def _cell_weights(w_ih, w_hh, b_ih, b_hh):
    return [(w_ih, w_hh, b_ih, b_hh)]


def rnn_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """Elman cell: ``x [B, I]``, ``h [B, H]`` -> ``h' [B, H]``."""
    out, hn, _, _ = rnn_forward("rnn_" + nonlinearity, x[None], h[None], None, _cell_weights(w_ih, w_hh, b_ih, b_hh), 1, False)
    return hn[0]


def rnn_cell_backward(grad_h, x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """``(dx, dh, dw_ih, dw_hh, db_ih, db_hh)`` of :func:`rnn_cell` (bias gradients None without bias)."""
    mode = "rnn_" + nonlinearity
    ws = _cell_weights(w_ih, w_hh, b_ih, b_hh)
    _, _, _, res = rnn_forward(mode, x[None], h[None], None, ws, 1, False)
    g0 = np.zeros((1,) + h.shape, res.dtype)
    dx, dh, _, dw = rnn_backward(mode, g0, grad_h[None], None, x[None], ws, res, 1, False)
    return (dx[0], dh[0], *dw[0])


def lstm_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """LSTM cell: ``x [B, I]``, ``h, c [B, H]`` -> ``(h', c')``."""
    _, hn, cn, _ = rnn_forward("lstm", x[None], h[None], c[None], _cell_weights(w_ih, w_hh, b_ih, b_hh), 1, False)
    return hn[0], cn[0]


def lstm_cell_backward(grad_h, grad_c, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """``(dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh)`` of :func:`lstm_cell`."""
    ws = _cell_weights(w_ih, w_hh, b_ih, b_hh)
    _, _, _, res = rnn_forward("lstm", x[None], h[None], c[None], ws, 1, False)
    g0 = np.zeros((1,) + h.shape, res.dtype)
    dx, dh, dc, dw = rnn_backward("lstm", g0, grad_h[None], grad_c[None], x[None], ws, res, 1, False)
    return (dx[0], dh[0], dc[0], *dw[0])


def gru_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """GRU cell: ``x [B, I]``, ``h [B, H]`` -> ``h'``."""
    _, hn, _, _ = rnn_forward("gru", x[None], h[None], None, _cell_weights(w_ih, w_hh, b_ih, b_hh), 1, False)
    return hn[0]


def gru_cell_backward(grad_h, x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """``(dx, dh, dw_ih, dw_hh, db_ih, db_hh)`` of :func:`gru_cell`."""
    ws = _cell_weights(w_ih, w_hh, b_ih, b_hh)
    _, _, _, res = rnn_forward("gru", x[None], h[None], None, ws, 1, False)
    g0 = np.zeros((1,) + h.shape, res.dtype)
    dx, dh, _, dw = rnn_backward("gru", g0, grad_h[None], None, x[None], ws, res, 1, False)
    return (dx[0], dh[0], *dw[0])


# ----------------------------------------------------------------------------------------------
# cells, small-input path: what rnn_forward / rnn_backward compute at T = 1 for one layer and
# direction (the same operations in the same order, so the same values up to the sign of a
# zero), without the reserve, the views and the sequence bookkeeping. At a cell's usual sizes
# each NumPy call costs about a microsecond whatever it does, so the count of calls is the cost:
# the LSTM's four gate activations are two full-width passes with per-column constants.

@quiet
def cell_forward(mode, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """One step of one layer: ``x [B, I]``, ``h [B, H]``, ``c [B, H]`` (LSTM, else None), weights
    as :func:`rnn_forward`'s, every array of one dtype. Returns ``(h' [B, H], c' [B, H] or None,
    gates [B, S * H] or None)``, ``gates`` being the reserve's slot (LSTM: activated i, f, g, o;
    GRU: r, z, n and h W_hn^T + b_hn; None for the Elman cell). Equal to ``rnn_forward`` at
    ``T = 1`` (tests/test_rnn.py compares them); the public cells above keep that general path."""
    H = w_hh.shape[1]
    if mode == "lstm":
        G = x @ w_ih.T
        if b_ih is not None:
            G += b_ih + b_hh
        G += h @ w_hh.T
        _sigmoid_(G[:, : 2 * H])
        np.tanh(G[:, 2 * H: 3 * H], out=G[:, 2 * H: 3 * H])
        _sigmoid_(G[:, 3 * H:])
        cn = G[:, H: 2 * H] * c
        ig = G[:, :H] * G[:, 2 * H: 3 * H]
        cn += ig
        hn = np.tanh(cn)
        hn *= G[:, 3 * H:]
        return hn, cn, G
    if mode == "gru":
        # contiguous pieces, joined once at the end: NumPy's strided loops cost twice the
        # contiguous ones at these sizes
        gi = x @ w_ih.T
        if b_ih is not None:
            gi += b_ih
        gh = h @ w_hh.T
        if b_hh is not None:
            gh += b_hh
        rz = np.add(gi[:, : 2 * H], gh[:, : 2 * H])
        _sigmoid_(rz)
        hW = gh[:, 2 * H:]
        n = np.multiply(rz[:, :H], hW)
        n += gi[:, 2 * H:]
        np.tanh(n, out=n)
        hn = np.subtract(h, n)
        hn *= rz[:, H:]
        hn += n
        G = np.concatenate((rz, n, hW), axis=1)
        return hn, None, G
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    hn = x @ w_ih.T
    if b_ih is not None:
        hn += b_ih + b_hh
    hn += h @ w_hh.T
    if mode == "rnn_tanh":
        np.tanh(hn, out=hn)
    else:
        relu_(hn)
    return hn, None, None


@quiet
def cell_backward(mode, grad_h, grad_c, x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, need=None):
    """Gradients of :func:`cell_forward` (recomputed here): ``(dx, dh, dc or None, dw_ih, dw_hh,
    db_ih, db_hh)``, the bias gradients None without biases; ``grad_c`` None (or the LSTM's
    absent c' gradient) counts as zero. Equal to ``rnn_backward`` at ``T = 1``. ``need`` (None:
    all) flags each of the seven: one that is False is not computed and comes back None (the two
    biases share one column sum, made when either is asked for)."""
    hn, cn, G = cell_forward.__wrapped__(mode, x, h, c, w_ih, w_hh, b_ih, b_hh)  # quiet already
    need_x, need_h, need_c, need_wih, need_whh, need_bih, need_bhh = (True,) * 7 if need is None else need
    H = w_hh.shape[1]
    one = _consts(hn.dtype)[1]
    if mode == "lstm":
        i, f, gg, o = G[:, :H], G[:, H: 2 * H], G[:, 2 * H: 3 * H], G[:, 3 * H:]
        dG = np.empty_like(G)
        s = np.subtract(one, G)
        s *= G  # a (1 - a) of every gate: the sigmoid derivative on i, f, o (g's column unused)
        tc = np.tanh(cn)
        d_o = dG[:, 3 * H:]
        np.multiply(grad_h, tc, out=d_o)
        d_o *= s[:, 3 * H:]
        t = np.multiply(tc, tc)
        np.subtract(one, t, out=t)
        t *= o
        t *= grad_h
        dc = t if grad_c is None else np.add(grad_c, t)
        d_i = dG[:, :H]
        np.multiply(dc, gg, out=d_i)
        d_i *= s[:, :H]
        d_f = dG[:, H: 2 * H]
        np.multiply(dc, c, out=d_f)
        d_f *= s[:, H: 2 * H]
        t = np.multiply(gg, gg, out=t if t is not dc else None)
        np.subtract(one, t, out=t)
        t *= i
        np.multiply(dc, t, out=dG[:, 2 * H: 3 * H])
        dc_prev = dc * f if need_c else None
        dGh = dG
        dh = dG @ w_hh if need_h else None
    elif mode == "gru":
        r, z, n, hW = G[:, :H], G[:, H: 2 * H], G[:, 2 * H: 3 * H], G[:, 3 * H:]
        dG = np.empty((x.shape[0], 3 * H), G.dtype)
        s = np.subtract(one, G[:, : 2 * H])  # 1 - r, 1 - z
        d_r, d_z, d_n = dG[:, :H], dG[:, H: 2 * H], dG[:, 2 * H:]
        np.subtract(h, n, out=d_z)
        d_z *= grad_h
        s *= G[:, : 2 * H]
        d_z *= s[:, H:]
        np.multiply(grad_h, z, out=d_n)  # dn = dh - dh z, as torch's CPU cell (see rnn_backward)
        np.subtract(grad_h, d_n, out=d_n)
        t = np.multiply(n, n)
        np.subtract(one, t, out=t)
        d_n *= t
        np.multiply(d_n, hW, out=d_r)
        d_r *= s[:, :H]
        dGh = dG.copy()
        np.multiply(d_n, r, out=dGh[:, 2 * H:])
        dh = None
        if need_h:
            dh = dGh @ w_hh
            np.multiply(grad_h, z, out=t)
            dh += t
        dc_prev = None
    else:
        if mode == "rnn_tanh":
            t = np.multiply(hn, hn)
            np.subtract(one, t, out=t)
            dG = np.multiply(grad_h, t)
        else:
            # torch's threshold_backward: +0 where h' <= 0, else the gradient (a NaN h' passes
            # it); a select, not grad * mask, which would make an infinite gradient NaN (inf * 0)
            dG = np.where(hn <= 0, _consts(hn.dtype)[2], grad_h)
        dGh = dG
        dh = dG @ w_hh if need_h else None
        dc_prev = None
    dx = dG @ w_ih if need_x else None
    dw_ih = dG.T @ x if need_wih else None
    dw_hh = dGh.T @ h if need_whh else None
    db_ih = db_hh = None
    if b_ih is not None and (need_bih or need_bhh):
        db_ih = column_sums(dG)
        db_hh = column_sums(dGh) if dGh is not dG else db_ih.copy()
        db_ih, db_hh = (db_ih if need_bih else None), (db_hh if need_bhh else None)
    return dx, dh, dc_prev, dw_ih, dw_hh, db_ih, db_hh
