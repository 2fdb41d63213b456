"""Recurrent family: cells and whole sequences; checks, dispatch and ``torch.library`` registration.

Public functions (``gpu_nn.functional``):

* cells (DESIGN section 3): ``rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None)``,
  ``rnn_relu_cell(...)``, ``gru_cell(...)`` -> ``h'``; ``lstm_cell(input, (h, c), w_ih, w_hh,
  b_ih=None, b_hh=None)`` -> ``(h', c')``. ``input [B, I]`` or unbatched ``[I]``, states
  ``[B, H]`` / ``[H]``; ``hx=None`` means zeros.
* sequences, mirroring ``torch.rnn_tanh`` / ``torch.rnn_relu`` / ``torch.lstm`` / ``torch.gru``
  (the ATen ops behind ``torch.nn.RNN`` / ``LSTM`` / ``GRU``)::

      rnn_tanh(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
               batch_first, lengths=None, dropout_masks=None) -> (output, h_n)
      rnn_relu(...)                                        -> (output, h_n)
      gru(...)                                             -> (output, h_n)
      lstm(input, (h0, c0), params, ...)                   -> (output, h_n, c_n)

  ``input [T, B, I]`` (``[B, T, I]`` when batch_first), ``hx [L * D, B, H]``, ``params`` the flat
  list ``w_ih, w_hh[, b_ih, b_hh]`` per layer and direction in torch's order (``_flat_weights``
  of the module). Extensions: ``lengths`` (int64 ``[B]``, on the CPU) gives per-sequence lengths
  with PackedSequence semantics (outputs beyond a length are zero, final states are each
  sequence's own last step); ``dropout_masks [L - 1, T, B, D * H]`` replaces the masks that
  ``train=True, dropout > 0`` would otherwise draw from torch's RNG.

  LSTM projections (``torch.nn.LSTM(proj_size=P)``), detected as torch detects them: ``h0`` and
  ``c0`` of different widths. Then ``h0 [L * D, B, P]``, ``c0 [L * D, B, H]``, ``params`` per
  layer and direction ``w_ih, w_hh [4 H, P][, b_ih, b_hh], w_hr [P, H]`` (torch's order), layer
  inputs above the first ``D * P`` wide, output ``[T, B, D * P]``; each step ends with
  ``h' = (o * tanh(c')) W_hr^T``.

Custom ops (namespace ``gpu_nn``): ``rnn_seq`` / ``rnn_seq_backward`` (whole sequences; the
forward returns a flat reserve of intermediates that the backward consumes, laid out by
``reference.rnn.reserve_layout``) and ``rnn_cell`` / ``rnn_cell_backward`` (one step; the
forward returns ``(h', c', reserve)``, a float32 reserve laid out by ``cell_reserve_layout``,
and its backward reads that and the saved h', c' instead of recomputing the step).
Backends: reference, triton, cupy.

Precision: float32 layers run their products in TF32 when ``torch.backends.cudnn.allow_tf32``
(torch's default, the switch torch's cuDNN RNN obeys), else exactly (``tf32_allowed``); half
layers in their dtype with float32 accumulation.

GPU forward of a sequence: the input projection of all steps as one matmul, then per layer and
direction either one fused launch per time step, or (triton backend) the persistent kernel
that runs the whole time loop in one launch with a grid barrier between steps. The persistent
kernel is chosen by ``persistent_choice``: it is legal for batch 1..64 and hidden 1..1024 (W_hh,
at most 16 MiB, stays in L2 across steps), its (batch, hidden) tiles of 16 x 16 dealt to at most
one program per SM, so that all are resident and the barrier cannot deadlock; the
heuristic takes it on a CUDA device for batch <= 16 (one batch tile), where the H200 measured it
faster in every dtype: the small-batch set of ``benchmarks/bench_rnn.py`` at 82f8513 (T=50
I=H=512, forward; ratio to cuDNN, persistent against per step) LSTM float32 N=4 / 16 1.71x /
1.94x against 2.40x / 2.33x, GRU float32 1.01x / 0.90x against 2.41x / 2.70x, LSTM bfloat16 1.05x /
1.35x against 1.50x / 1.88x, GRU bfloat16 1.18x / 1.19x against 1.80x / 1.84x. (An earlier
run, before TF32 and the 16 x 16 step tiles, had float32 the other way, 6.33x / 5.18x against
6.01x / 4.93x, and the default was half precision only until 82f8513's figures were read.)
Those figures are of the kernel re-reading W_hh from L2 at every step. Since be52977, where each
tile has its own program and the dots run on the tensor cores, the program keeps its tile's W_hh
rows in shared memory for the whole loop instead (``kernels.triton.rnn.resident_kp``;
``GPU_NN_RNN_RESIDENT=0`` turns that off), not yet timed on a GPU; so does the persistent backward
(taken only when forced on, below) since the change that gave it the same rows.
``GPU_NN_RNN_PERSISTENT=0`` never takes it, ``=1`` whenever legal (also under the Triton
interpreter, with one program, since the interpreter runs programs one after another); never for
an LSTM with a projection (the persistent kernel has none). Forced on (``=1``), the persistent kernels also take batches up to 64 (four batch tiles
of 16 dealt to the programs with the hidden tiles: the demo's recurrent models, batch 32, hidden
32, make 8 tiles a bidirectional layer), outside the heuristic's measured domain.

The backward: the persistent backward (``kernels.triton.rnn.loop_backward``, one launch per layer
and direction; ``persist_backward_pair``, both directions of a bidirectional layer in one launch;
the same barrier, then the final dh0 step as after the per-step loop) under
``GPU_NN_RNN_PERSISTENT=1``; not by default (``PERSISTENT_BWD_BY_DEFAULT``: no GPU has run it
yet); otherwise the per-step kernels (both directions per step in one launch) on the same
reserve.

A projected LSTM step on the GPU: the step kernel (recurrent product over the P-wide state,
m = o * tanh(c') into the reserve), then the projection kernel (h' = m W_hr^T, length masking,
output); backward: the projection-gradient kernel (dh of the projected state), dm = dh W_hr
(the matmul), then the step kernel's cell backward with dm as its output gradient.

On by default (``PERSISTENT_BY_DEFAULT``) since the grid barrier's GPU tests passed on an H200
(12 of 12, issue 16) and the small-batch set of ``benchmarks/bench_rnn.py`` measured the gains
above there.

The cupy backend runs the time loop on the device (``_CupyImpl.persist_forward`` /
``loop_backward``, kernels/cuda/rnn.cu ``rnn_seq_fwd`` / ``rnn_seq_bwd``): one cooperative launch
per layer, direction and pass, forward and backward, chosen by ``cupy_loop_choice``
(``GPU_NN_CUPY_RNN=step``: per step, as before; projections always per step) with a grid of
``cupy_loop_grid`` blocks, falling back per step when nothing can be resident. A bidirectional
layer runs both directions in one launch per pass (``persist_forward_pair`` /
``persist_backward_pair``, ``rnn_seq2_fwd`` / ``rnn_seq2_bwd``: step s of both directions between
the same two barriers, twice the blocks at the same depth), each direction in its own launch
where that grid cannot be resident. The input projection and the weight gradients remain one
torch matmul each over all steps; in float32 they run in TF32 exactly where
``torch.backends.cudnn.allow_tf32`` says (``_cublas_tf32``), as cuDNN's do, whatever torch's matmul
flag says (the loop's recurrent dots are exact float32 CUDA-core sums either way).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import _backend, _precision
from .._errors import KernelInputError, KernelInputIndexError, KernelInputTypeError, scalar_type_name, type_name
from ..check import CheckCase, _rel, generic_error
from ..reference import rnn as ref
from ._dispatch import (
    FLOAT_DTYPES, autocast_inputs, check_same_device, check_tensor, compute_dtype, cuda_kernels, empty, from_numpy, maybe_empty, not_float_message,
    on_device, refuse_wrapping_count, routed, to_numpy, triton_kernels,
)
from ._dispatch import has_torch_function as _has_tf
from ._dispatch import _any_legacy_batched, env_switch, stand_in, tangents_in_play, torchs_own_error, vmap_active, wanted
from ._dispatch import torch_function as _tf
from .dense import linear_dtype_message

__all__ = [
    "gru",
    "gru_cell",
    "lstm",
    "lstm_cell",
    "rnn_relu",
    "rnn_relu_cell",
    "rnn_tanh",
    "rnn_tanh_cell",
]

BACKENDS = ("reference", "triton", "cupy")
MODES = ref.MODES
GATES = ref.GATES


def reserve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Intermediates are kept in float32 for half inputs (the backward needs them accurate)."""
    return compute_dtype(dtype)


def _shape_info(input: Tensor, hx: Tensor, cx: Optional[Tensor], num_layers: int, bidirectional: bool):
    """``(T, B, H, P, L, D)``; ``P`` the projection size (0: none)."""
    T, B, _ = input.shape
    H, P = _state_widths(hx, cx)
    return T, B, H, P, num_layers, 2 if bidirectional else 1


def _state_widths(hx, cx):
    """``(H, P)`` from the initial states, as torch tells a projected LSTM: h and c of different widths."""
    if cx is not None and cx.dim() == 3 and hx.shape[-1] != cx.shape[-1]:
        return cx.shape[-1], hx.shape[-1]
    return hx.shape[-1], 0


def _weight_dims(mode, weights, num_layers, D, has_biases):
    """``(H, P, per)`` from the flat weights: ``per`` tensors per layer and direction, one more
    (``w_hr``, last) for a projected LSTM."""
    per = 4 if has_biases else 2
    if mode == "lstm" and len(weights) == num_layers * D * (per + 1):
        return weights[1].shape[0] // 4, weights[per].shape[0], per + 1
    return weights[1].shape[0] // GATES[mode], 0, per


_HIDDEN_DEVICE = "Input and hidden tensors are not at the same device, found input tensor at {} and hidden tensor at {}"
_PARAM_DEVICE = "Input and parameter tensors are not at the same device, found input tensor at {} and parameter tensor at {}"


def _check_devices(input, hiddens, weights, cell=False):
    """torch's device check of the recurrent ops, before anything dispatches: a hidden state or
    a weight on another device (meta included) must not reach a kernel, nor the fake kernel
    (a meta argument sends a custom op there, which returns uninitialised tensors). Cells get
    torch's cell wording too, ``Tensor on device A is not on the expected device B!``, where torch
    expects the device of h when h is the odd one and the input's otherwise."""
    dev = input.device  # once: each .device makes a torch.device
    for fmt, ts in ((_HIDDEN_DEVICE, hiddens), (_PARAM_DEVICE, weights)):
        for t in ts:
            if isinstance(t, Tensor) and t.device != dev:
                msg = fmt.format(input.device, t.device)
                if cell:
                    h = hiddens[0]
                    got, want = ((input.device, h.device) if isinstance(h, Tensor) and h.device != input.device
                                 else (t.device, input.device))
                    msg = f"Tensor on device {got} is not on the expected device {want}! ({msg})"
                raise KernelInputError(msg)


class HiddenStateTypeError(KernelInputError, TypeError):
    """An LSTM cell state that is not a pair of tensors: torch raises TypeError there."""


# ----------------------------------------------------------------------------------------------
# checks


# The Triton recurrent step kernels index the recurrent weights' rows and columns in int32
# ((g * H + row) * stride, in their inner loops; W_ih goes through the recurrent matmul, whose
# offsets are int64): a W_hh of more than this many elements would wrap (an LSTM from hidden size
# 23171, a GRU from 26755, an Elman layer from 46341) and read the wrong rows silently. Widening
# those products costs registers in the per-step kernels, which no GPU run has measured; such
# layers are refused on the Triton backend instead (CuPy's kernels and the reference take them).
WEIGHT_INDEX_MAX = 2**31 - 1


def _check_weight_index(op: str, rows: int, cols: int) -> None:
    """Refuse, for the Triton backend, a W_hh of ``rows`` x ``cols`` (gates x hidden, its state
    width; a projection's W_hr is smaller) past :data:`WEIGHT_INDEX_MAX` elements. Shapes only:
    the layers' weights are dense (their own or flatten_parameters' chunks)."""
    if rows * cols > WEIGHT_INDEX_MAX:
        raise KernelInputError(
            f"{op}: a {rows} x {cols} weight ({rows * cols} elements) is past the {WEIGHT_INDEX_MAX} that gpu-nn's "
            f"Triton recurrent kernels index in 32 bits; the cupy or reference backend takes it")


# The Triton recurrent matmul (input projection, weight gradients) numbers its rows (T x B, a
# cell's B) and steps its inner loops over them and over the input features in int32 when their
# count is an int32 argument: a count within a tile of 2^31 - 1 wraps (rows written out of place,
# an inner loop that never ends); from 2^31 the argument is int64 and works. That window is
# refused on Triton.
ROWS_WRAP = (2**31 - 256, 2**31)


def _check_rows(op: str, n: int, what: str = "rows (steps x batch)") -> None:
    """Refuse, for the Triton backend, a row count (T x B, or a cell's B) or an input width (the
    matmul's inner loop) in :data:`ROWS_WRAP`."""
    refuse_wrapping_count(op, n, ROWS_WRAP, f"{n} {what}", "cupy or reference")


def _check_triton_sizes(op: str, w_hh, rows: int, features: int) -> None:
    """The Triton backend's index-width refusals of a layer or cell: its W_hh's elements, its
    ``rows`` (T x B, a cell's B) and its input ``features``."""
    _check_weight_index(op, w_hh.shape[0], w_hh.shape[-1])
    _check_rows(op, rows)
    _check_rows(op, features, "input features")


def _check_seq(op, input, hx, cx, weights, mode, num_layers, bidirectional, has_biases, lengths, masks):
    if mode not in MODES:
        raise KernelInputError(f"{op}: unknown mode {mode!r}; expected one of {MODES}")
    if not isinstance(input, Tensor) or input.dim() != 3:
        raise KernelInputError(
            f"{op}: input must have 3 dimensions, got {input.dim() if isinstance(input, Tensor) else type(input).__name__}"
        )
    if input.dtype not in FLOAT_DTYPES:
        raise KernelInputError(not_float_message(op, "input", input.dtype))
    if num_layers < 1:
        raise KernelInputError(f"{op}: num_layers must be at least 1, got {num_layers}")
    D = 2 if bidirectional else 1
    T, B, I = input.shape
    if T == 0:
        raise KernelInputError("Expected sequence length to be larger than 0 in RNN")
    _check_devices(input, [hx, cx], weights)
    H, P = _state_widths(hx, cx)
    W = P or H  # the width of h and of a direction's output
    if hx.dim() != 3 or hx.shape[0] != num_layers * D or hx.shape[1] != B:
        raise KernelInputError(f"Expected hidden size ({num_layers * D}, {B}, {hx.shape[-1]}), got {list(hx.shape)}")
    if mode == "lstm":
        if cx is None:
            raise KernelInputError(f"{op}: lstm needs a cell state")
        if cx.dim() != 3 or tuple(cx.shape[:2]) != (num_layers * D, B):
            raise KernelInputError(f"Expected hidden size ({num_layers * D}, {B}, {H}), got {list(cx.shape)}")
        if P and P > H:
            raise KernelInputError(f"{op}: proj_size has to be smaller than hidden_size (h0 width {P}, c0 width {H})")
    for what, ts in (("hidden", (hx, cx)), ("parameter", weights)):
        for t in ts:
            if t is not None and t.dtype != input.dtype:  # torch's check_attributes (its CUDA layers' words)
                raise KernelInputError(
                    f"Input and {what} tensors are not the same dtype, found input tensor with "
                    f"{scalar_type_name(input.dtype)} and {what} tensor with {scalar_type_name(t.dtype)}")
    _check_weight_shapes(op, weights, mode, num_layers, D, has_biases, T, B, I, H, P, lengths)
    _check_lengths(op, lengths, T, B)
    _check_masks(op, masks, input, num_layers, T, B, D * W)


def _check_weight_shapes(op, weights, mode, num_layers, D, has_biases, T, B, I, H, P, lengths):
    """Each layer's and direction's ``w_ih, w_hh[, b_ih, b_hh][, w_hr]`` of the shapes a layer of
    input width ``I``, hidden width ``H`` and projection ``P`` has (torch's words where its
    projection of the whole input would fail)."""
    W = P or H
    G = GATES[mode] * H
    per = (4 if has_biases else 2) + (1 if P else 0)
    if len(weights) != num_layers * D * per:
        raise KernelInputError(f"{op}: expected {num_layers * D * per} weight tensors, got {len(weights)}")
    for l in range(num_layers):
        in_w = I if l == 0 else D * W
        for d in range(D):
            ws = weights[(l * D + d) * per:(l * D + d + 1) * per]
            want = [(G, in_w), (G, W)] + ([(G,), (G,)] if has_biases else []) + ([(P, H)] if P else [])
            for w, s in zip(ws, want):
                if tuple(w.shape) != s:
                    if w is ws[0] and w.dim() == 2 and w.shape[0] == G and w.shape[1] != in_w:
                        # torch projects a layer's whole input at once (its packed rows, or T x B)
                        rows = int(lengths.sum()) if lengths is not None and lengths.dim() == 1 else T * B
                        raise KernelInputError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{in_w} and "
                                               f"{w.shape[1]}x{w.shape[0]})")
                    raise KernelInputError(
                        f"{op}: weight of layer {l} direction {d} has shape {list(w.shape)}, expected {list(s)}"
                    )


def _check_lengths(op, lengths, T, B):
    """``lengths``: None, or a CPU int64 ``[B]`` with every length in ``[0, T]``."""
    if lengths is not None:
        if lengths.dim() != 1 or lengths.shape[0] != B or lengths.dtype != torch.int64 or lengths.device.type != "cpu":
            raise KernelInputError(f"{op}: lengths must be a CPU int64 tensor of shape [{B}] (as pack_padded_sequence's), "
                                   f"got {lengths.dtype} {list(lengths.shape)} on {lengths.device}")
        if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
            raise KernelInputError(f"{op}: lengths must lie in [0, {T}]")


def _check_masks(op, masks, input, num_layers, T, B, width):
    """``masks``: None, or the inner layers' dropout masks ``[L - 1, T, B, width]`` on the
    input's device."""
    if masks is not None:
        check_same_device(input, masks)
        want = (num_layers - 1, T, B, width)
        if tuple(masks.shape) != want:
            raise KernelInputError(f"{op}: dropout_masks must have shape {list(want)}, got {list(masks.shape)}")


def _check_seq_backward(op, grad_output, grad_hn, grad_cn, input, weights, reserve, mode, num_layers, D, has_biases, H,
                        P, lengths, masks):
    """What the sequence backward's kernels index by, checked as the forward checks it (a direct
    call of ``torch.ops.gpu_nn.rnn_seq_backward``; the autograd wrapper passes the forward's
    own): every weight's shape, ``lengths`` (a CPU int64 ``[B]`` in ``[0, T]``, read for every
    batch row), the dropout masks, and ``grad_hn`` / ``grad_cn`` each ``[L * D, B, width]`` or
    empty (zeros), all on the input's device."""
    T, B, I = input.shape
    W = P or H
    _check_devices(input, [grad_output, grad_hn, grad_cn, reserve], weights)
    _check_weight_shapes(op, weights, mode, num_layers, D, has_biases, T, B, I, H, P, lengths)
    _check_lengths(op, lengths, T, B)
    _check_masks(op, masks, input, num_layers, T, B, D * W)
    for name, g, width in (("grad_hn", grad_hn, W), ("grad_cn", grad_cn, H)):
        if g is None or (name == "grad_cn" and mode != "lstm"):
            continue
        if g.numel() and tuple(g.shape) != (num_layers * D, B, width):
            raise KernelInputError(f"{op}: {name} must have shape {[num_layers * D, B, width]} (or be empty: zeros), "
                                   f"got {list(g.shape)}")


def _split(weights, num_layers, D, has_biases):
    """Per layer and direction ``(w_ih, w_hh, b_ih, b_hh, w_hr)``, absent ones None."""
    per = 4 if has_biases else 2
    if len(weights) == num_layers * D * (per + 1):
        per += 1
    out = []
    for k in range(num_layers * D):
        ws = list(weights[k * per:(k + 1) * per])
        w_hr = ws.pop() if len(ws) in (3, 5) else None
        if not has_biases:
            ws += [None, None]
        out.append((*ws, w_hr))
    return out


def _dense_biases(ws):
    """:func:`_split`'s tuples with every bias dense: the GPU kernels index a bias by unit
    (``bias + unit``, no stride), so a strided or broadcast one (a view of a larger buffer, an
    ``expand``ed scalar) would be read wrong, past its end for a stride of 0."""
    return [(w_ih, w_hh, _dense(b_ih), _dense(b_hh), w_hr) for w_ih, w_hh, b_ih, b_hh, w_hr in ws]


def _dense(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


# ----------------------------------------------------------------------------------------------
# launchers


def rnn_seq_forward(input, hx, cx, weights, mode, num_layers, bidirectional, has_biases, lengths=None, dropout_masks=None):
    """Whole sequence, time-major. ``input [T, B, I]``, ``hx / cx [L * D, B, H]``.

    Returns ``(output [T, B, D * W], hn, cn, reserve)`` (W = P for a projected LSTM, else H);
    ``cn`` is an empty ``[0]`` tensor for the Elman RNN and the GRU; ``reserve`` is flat, float32
    for half inputs.
    """
    op = mode
    _check_seq(op, input, hx, cx, weights, mode, num_layers, bidirectional, has_biases, lengths, dropout_masks)
    backend = _backend.resolve(op, input.device, BACKENDS, dtype=input.dtype)
    if backend == "triton":  # w_hh: [gates x H, W] (w_hr's P x H is smaller)
        _check_triton_sizes(op, weights[1], input.shape[0] * input.shape[1], input.shape[2])
    dev, dt = input.device, input.dtype
    if backend == "reference":
        D = 2 if bidirectional else 1
        ws = _split([to_numpy(w) for w in weights], num_layers, D, has_biases)
        out, hn, cn, res = ref.rnn_forward(
            mode, to_numpy(input), to_numpy(hx), to_numpy(cx) if mode == "lstm" else None, ws,
            num_layers, bidirectional, None if lengths is None else lengths.cpu().numpy(), to_numpy(dropout_masks),
        )
        cn_t = from_numpy(cn, dt, dev) if cn is not None else input.new_empty(0)
        return from_numpy(out, dt, dev), from_numpy(hn, dt, dev), cn_t, from_numpy(res, reserve_dtype(dt), dev)
    _backend.check_interpreter_dtype(op, backend, input)
    out, hn, cn, res = _gpu_forward(_impl(backend), mode, input, hx, cx, weights, num_layers, bidirectional, has_biases,
                                    lengths, dropout_masks)
    if res.dtype != reserve_dtype(dt):
        # float64 on a GPU backend named explicitly: the kernels keep a float32 reserve, the op
        # promises (its fake kernel, torch.compile's memory plan) the float64 the reference keeps
        res = res.to(reserve_dtype(dt))
    return out, hn, cn, res


def seq_mask(output_mask, n_weights: int) -> tuple:
    """``(dinput, dhx, dcx, dweights)`` flags of :func:`rnn_seq_backward` from ``output_mask``
    (``[input, hx, cx, *weights]``, None: all): the input's, the states' and one per weight."""
    if output_mask is None:
        return True, True, True, (True,) * n_weights
    m = [bool(b) for b in output_mask]
    if len(m) != 3 + n_weights:
        raise KernelInputError(f"rnn_seq_backward: output_mask has {len(m)} entries, expected {3 + n_weights} "
                               "(input, hx, cx and one per weight)")
    return m[0], m[1], m[2], tuple(m[3:])


def _flat_grads(per_k, need_w, has_biases, P, make):
    """The weights' gradients flat, in the order of ``weights`` (per layer and direction ``w_ih,
    w_hh[, b_ih, b_hh][, w_hr]``; ``per_k[k]`` indexed as :func:`_split`'s tuples): ``make(g)``
    of each one asked for, ``make(None)`` (an empty ``[0]`` tensor) for each ``need_w`` leaves out."""
    slots = (0, 1) + ((2, 3) if has_biases else ()) + ((4,) if P else ())
    flat = []
    for grads in per_k:
        for j in slots:
            flat.append(make(grads[j] if need_w[len(flat)] else None))
    return flat


def rnn_seq_backward(grad_output, grad_hn, grad_cn, input, weights, reserve, mode, num_layers, bidirectional,
                     has_biases, lengths=None, dropout_masks=None, output_mask=None):
    """Gradients of :func:`rnn_seq_forward`: ``(dinput, dhx, dcx, dweights)`` (``dcx`` empty for
    non-LSTM modes; ``dweights`` in the order of ``weights``). Each gradient ``output_mask``
    (``[input, hx, cx, *weights]``, None: all) leaves out comes back as an empty ``[0]`` tensor
    and its products are not computed, as torch's cuDNN backward's ``output_mask``: a data
    input's (the first layer's product with ``w_ih``), a frozen weight's. An empty ``grad_hn`` /
    ``grad_cn`` stands for zeros (the forward's h_n / c_n unused: the autograd wrapper passes one
    rather than a zeros tensor the backward would copy)."""
    op = mode + "_backward"
    T, B, I = input.shape
    D = 2 if bidirectional else 1
    need_x, need_hx, need_cx, need_w = seq_mask(output_mask, len(weights))
    H, P, _ = _weight_dims(mode, weights, num_layers, D, has_biases)
    want = (T, B, D * (P or H))
    if tuple(grad_output.shape) != want:
        raise KernelInputError(f"{op}: grad_output has shape {list(grad_output.shape)}, expected {list(want)}")
    size = ref.reserve_size(mode, T, B, H, num_layers, D, P)
    if reserve.numel() != size:
        raise KernelInputError(f"{op}: reserve has {reserve.numel()} elements, expected {size}")
    _check_seq_backward(op, grad_output, grad_hn, grad_cn, input, weights, reserve, mode, num_layers, D, has_biases, H,
                        P, lengths, dropout_masks)
    backend = _backend.resolve(op, input.device, BACKENDS, dtype=input.dtype)
    dev, dt = input.device, input.dtype
    if backend == "reference":
        ws = _split([to_numpy(w) for w in weights], num_layers, D, has_biases)
        states = (num_layers * D, B)

        def state(g, width):  # an empty placeholder (an unused h_n / c_n): zero
            a = to_numpy(g)
            return np.zeros((*states, width), a.dtype) if a.size == 0 else a
        dx, dhx, dcx, dws = ref.rnn_backward(
            mode, to_numpy(grad_output), state(grad_hn, P or H), state(grad_cn, H) if mode == "lstm" else None,
            to_numpy(input), ws, to_numpy(reserve), num_layers, bidirectional,
            None if lengths is None else lengths.cpu().numpy(), to_numpy(dropout_masks),
            need_input=need_x, need_weights=_split(need_w, num_layers, D, has_biases),
        )

        def made(g):  # each absent gradient its own empty tensor (outputs never alias)
            return input.new_empty(0) if g is None else from_numpy(g, dt, dev)

        flat = _flat_grads(dws, need_w, has_biases, P, made)
        return (made(dx), made(dhx if need_hx else None), made(dcx if need_cx else None), flat)
    _backend.check_interpreter_dtype(op, backend, input)
    if reserve.dtype != torch.float32:  # (a float64 one: see rnn_seq_forward)
        reserve = reserve.float()
    # its views (_reserve_views) are dense [.., B, H] blocks to the kernels: a direct call's
    # strided reserve is made dense (the forward's own is; it was read as dense)
    reserve = reserve.contiguous()
    return _gpu_backward(_impl(backend), mode, grad_output, grad_hn, grad_cn, input, weights, reserve, num_layers,
                         bidirectional, has_biases, lengths, dropout_masks, (need_x, need_hx, need_cx, need_w))


# ----------------------------------------------------------------------------------------------
# the GPU driver: host time loop over per-step kernel launches, shared by the triton and cupy
# backends (which differ in how they run a matmul, a column sum and one fused step)


def _impl(backend):
    if backend == "triton":
        return triton_kernels("rnn")[1]
    return _CupyImpl


def tf32_allowed(dtype: torch.dtype) -> bool:
    """Whether a layer of io dtype ``dtype`` may round float32 dot operands to TF32. float32: as
    torch's cuDNN RNN decides it, ``torch.backends.cudnn.allow_tf32`` (on by default) or the
    per-operation ``torch.backends.cudnn.rnn.fp32_precision`` (:func:`gpu_nn._precision.tf32`),
    read per call. Half layers: always; their only float32 x float32 products are the weight
    gradients from the float32 reserve, which TF32 keeps at 10 mantissa bits (float16's, more
    than bfloat16's) where cuDNN would compute them in the half dtype. float64: never."""
    if dtype in (torch.float16, torch.bfloat16):
        return True
    return dtype == torch.float32 and _precision.tf32("rnn")


def _dot_code(*dtypes, tf32: bool):
    """The dot code (kernels/triton/rnn.py ``_dot``) of a product of operands of these dtypes:
    half-precision when any operand is half (the float32 one is cast down, as cuDNN keeps half
    activations); two float32 operands as TF32 when ``tf32`` (``tf32_allowed``), else exact."""
    for d in dtypes:
        if d == torch.float16:
            return 1
        if d == torch.bfloat16:
            return 2
    return 3 if tf32 else 0


_FULL_LENGTHS: dict = {}  # (T, B, device, stream) -> read-only int64 [B] filled with T
_FULL_LENGTHS_MAX = 256
_DEFAULT_STREAMS: dict = {}  # CUDA device index -> its default stream's raw handle


def _valid_rows(lengths, T, B, device):
    """``rows(m)``: ``m`` [T * B, n] (step-major operand rows of a weight gradient's GEMM) with the
    rows of steps past their sequence's length zeroed, where ``lengths`` leaves some (else ``m``
    itself). Those steps add nothing to the weight gradients, as in torch's packed sequences:
    their gate gradients are zero, but the rows they multiply may hold inf or NaN (the final
    state an ended sequence carries on, a padding value of the input), and 0 * inf is NaN. A
    relu RNN whose state overflowed made dW_hh NaN where torch's is finite (a user audit)."""
    if lengths is None or not B or int(lengths.min()) >= T:
        return lambda m: m
    pad = _backend.to_device_async(~_steps_alive(lengths, T).reshape(T * B, 1), device)
    return lambda m: m.masked_fill(pad, 0)


def _steps_alive(lengths: Tensor, T: int) -> Tensor:
    """``[T, B]`` bool, step t of sequence b within its length (``lengths``, int64 on the CPU: the
    table is made beside them, whatever torch.set_default_device says)."""
    return torch.arange(T, device=lengths.device)[:, None] < lengths[None, :]


def _lengths_on(lengths, T, B, device):
    """Per-sequence lengths on the device (copied from pinned memory: torch's copy from pageable
    memory would synchronise the stream at every packed call, forward and backward, and fail
    inside a CUDA-graph capture); full length where the caller gave none (the step
    kernels always mask; a sequence passing none to the per-step kernels, t = -1 as the cells
    do, would take a further compiled variant of each for the other lengths pointer type).

    The full lengths are made once per (T, B, device) and kept (a fill per call was one more GPU
    launch and a few microseconds on the host) where the call runs on the device's default
    stream (or on the CPU): the kernels only read them, and a kept tensor is never freed. On any
    other stream they are made per call: the fill is queued on the stream that made it, so a
    layer on another stream, ordered after nothing of that one (independent work, another
    thread), could read a kept tensor before its fill ran; and the side streams are where
    torch's CUDA graphs work (a capture, whose fill would only run at replay, and the warm-up
    runs of ``torch.compile(mode="reduce-overhead")``, whose allocations come from the graphs'
    memory pool, which torch later resets to a checkpoint and hands to other graphs: a kept
    tensor from there could be overwritten under the graphs that read it). Nor kept beyond
    ``_FULL_LENGTHS_MAX`` entries (then made per call, never evicted: an evicted tensor could
    still be read by queued kernels)."""
    if lengths is not None:  # int64 on the CPU (_check_seq): no stream synchronisation, capturable
        return _backend.to_device_async(lengths.contiguous(), device)
    stream = 0
    if device.type == "cuda":  # (a tensor's device always has its index)
        stream = cuda_kernels().current_stream_handle(device.index)
        default = _DEFAULT_STREAMS.get(device.index)
        if default is None:
            default = _DEFAULT_STREAMS[device.index] = torch.cuda.default_stream(device).cuda_stream
        if stream != default:
            return torch.full((B,), T, dtype=torch.int64, device=device)
    key = (T, B, device, stream)
    full = _FULL_LENGTHS.get(key)
    if full is None:
        full = torch.full((B,), T, dtype=torch.int64, device=device)
        # (CUDA captures no work of the default stream: the capture test is a guard, on a miss only)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing and len(_FULL_LENGTHS) < _FULL_LENGTHS_MAX:
            _FULL_LENGTHS[key] = full
    return full


@functools.lru_cache(maxsize=256)
def _reserve_views_plan(mode, T, B, H, L, D, P):
    """``(size, ((key, shape, strides, offset), ...))`` of the reserve layout
    (``reference.rnn.reserve_layout``), contiguous strides: computed once per layout."""
    layout, size = ref.reserve_layout(mode, T, B, H, L, D, P)
    plan = []
    for k, (o, s) in layout.items():
        strides, acc = [], 1
        for n in reversed(s):
            strides.append(acc)
            acc *= n
        plan.append((k, tuple(s), tuple(reversed(strides)), o))
    return size, tuple(plan)


def _reserve_views(reserve, mode, T, B, H, L, D, P):
    """``{key: view}`` of a flat reserve laid out by ``reference.rnn.reserve_layout``: one
    ``as_strided`` per entry on a contiguous reserve (a slice and a view otherwise)."""
    _, plan = _reserve_views_plan(mode, T, B, H, L, D, P)
    if reserve.is_contiguous():
        base = reserve.storage_offset()
        return {k: reserve.as_strided(s, st, base + o) for k, s, st, o in plan}
    return {k: reserve[o:o + math.prod(s)].view(s) for k, s, _, o in plan}


PERSISTENT_ENV = "GPU_NN_RNN_PERSISTENT"
PERSISTENT_BY_DEFAULT = True  # the barrier passed its H200 tests; the heuristic is in persistent_choice
# the persistent backward (kernels.triton.rnn.loop_backward) has not run on a GPU yet: by default
# the backward keeps its per-step launches; GPU_NN_RNN_PERSISTENT=1 takes it (bench_rnn's
# triton-persistent provider times it in the small-batch fwd+bwd cases)
PERSISTENT_BWD_BY_DEFAULT = False
PERSIST_MAX_B = 64  # kernels/triton/rnn.py PERSIST_MAX_B: four batch tiles of 16
PERSIST_DEFAULT_MAX_B = 16  # the heuristic's batch bound: one tile, as the H200 measured it


def persistent_choice(device_type: str, B: int, H: int, sm_count: int, env: Optional[str],
                      by_default: bool = PERSISTENT_BY_DEFAULT, proj_size: int = 0) -> bool:
    """Whether the forward runs the persistent kernel (``kernels.triton.rnn.persist_forward``, one
    launch per layer and direction; ``persist_forward_pair``, one per bidirectional layer)
    instead of one launch per step. ``env`` is the value of
    ``GPU_NN_RNN_PERSISTENT`` (None if unset).

    Legal when 1 <= B <= PERSIST_MAX_B (64), 1 <= H <= 1024 and ``sm_count >= 1``: the (batch,
    hidden) tiles of 16 x 16 are dealt to min(tiles, sm_count) programs, one per SM at most, so
    all of them are resident and the grid barrier cannot deadlock. ``"0"``: never; ``"1"``:
    whenever legal (also under the interpreter, where ``sm_count`` is 1); unset or empty: the
    heuristic, within the domain the H200 measured (B <= 16: one batch tile) on a CUDA device,
    every dtype (faster than the per-step launches in all eight small-batch forward cases of
    the run at 82f8513: the module docstring has the figures), applied only when ``by_default``.
    Never for an LSTM with a projection (``proj_size > 0``): the persistent kernel has no
    projection step.
    """
    switch = env_switch(PERSISTENT_ENV, env, read=False)
    if switch is False or proj_size > 0 or sm_count < 1 or not (1 <= B <= PERSIST_MAX_B and 1 <= H <= 1024):
        return False
    return switch is True or (by_default and device_type == "cuda" and B <= PERSIST_DEFAULT_MAX_B)


# The Triton persistent kernels' grid barrier counts arrivals in an int32 (its target at step s is
# (s + 1) x programs): a time loop of T steps over n programs takes it while T * n stays below this
# (a 16M-step sequence over 132 programs would pass it, the barrier's target would wrap and some
# programs would read a step's states before they were written); longer loops run per step.
BARRIER_COUNT_MAX = 2**31 - 1


def _persist_programs(K, dev, B, H, P=0, backward=False, *, T):
    """Programs of the persistent launch over ``T`` steps, 0 for per-step launches (``backward``:
    of the backward time loop, whose default is PERSISTENT_BWD_BY_DEFAULT)."""
    if K is _CupyImpl:  # its own device loop, sized when launched (it falls back per step there)
        return int(cupy_loop_choice(B, H, P, os.environ.get(CUPY_RNN_ENV)))
    if not hasattr(K, "persist_forward"):
        return 0
    sm = _barrier_sms(dev)
    by_default = PERSISTENT_BWD_BY_DEFAULT if backward else PERSISTENT_BY_DEFAULT
    if not persistent_choice(dev.type, B, H, sm, os.environ.get(PERSISTENT_ENV), by_default, P):
        return 0
    n = K.persist_programs(B, H, sm)
    return n if T * n <= BARRIER_COUNT_MAX else 0


def _persist_pair_programs(K, dev, B, H, T):
    """Programs of the two-direction persistent launches (forward or backward) over ``T`` steps,
    0 where the backend has none (cupy) or the barrier's count would pass BARRIER_COUNT_MAX."""
    if not hasattr(K, "persist_pair_programs"):
        return 0
    n = K.persist_pair_programs(B, H, _barrier_sms(dev))
    return n if T * n <= BARRIER_COUNT_MAX else 0


def _barrier_sms(dev) -> int:
    """The SMs a persistent (grid-barrier) launch may fill: the device's, or 1 under Triton's
    interpreter, which runs programs one after another (only a single program can pass a barrier;
    CUDA tensors included: the interpreter copies them to the host)."""
    if dev.type != "cuda" or _backend.interpret_mode():
        return 1
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _gpu_forward(K, mode, input, hx, cx, weights, num_layers, bidirectional, has_biases, lengths, masks):
    T, B, I = input.shape
    D = 2 if bidirectional else 1
    H, P = _state_widths(hx, cx)
    W = P or H
    L = num_layers
    dt, dev = input.dtype, input.device
    GH = GATES[mode] * H
    size, _ = _reserve_views_plan(mode, T, B, H, L, D, P)
    reserve = empty((size,), dtype=torch.float32, device=dev)
    v = _reserve_views(reserve, mode, T, B, H, L, D, P)
    out = empty((T, B, D * W), dtype=dt, device=dev)
    hn = empty((L * D, B, W), dtype=dt, device=dev)
    cn = empty((L * D, B, H), dtype=dt, device=dev) if mode == "lstm" else input.new_empty(0)
    lens = _lengths_on(lengths, T, B, dev)
    ws = _dense_biases(_split(weights, L, D, has_biases))
    persist = _persist_programs(K, dev, B, H, P, T=T)
    # both directions in one persistent launch (triton): its own program count, all resident
    persist_pair = _persist_pair_programs(K, dev, B, H, T) if persist and D == 2 else 0
    tf32 = tf32_allowed(dt)
    steps_forward = getattr(K, "steps_forward", None)  # one call per layer and direction (triton; pairs below)
    # the initial states into their reserve slots (slot 0 forward, slot T reverse) before the
    # loop, the final ones out after it: one copy op each way for all layers and directions
    # (a multi-tensor copy on a GPU, where a copy per state was a launch each)
    slots = [v[("h", l, d)] for l in range(L) for d in range(D)]
    if mode == "lstm":
        slots += [v[("c", l, d)] for l in range(L) for d in range(D)]
    torch._foreach_copy_([sl[T if k % D else 0] for k, sl in enumerate(slots)],
                         [*hx.unbind(0), *(cx.unbind(0) if mode == "lstm" else ())])
    xin = input
    for l in range(L):
        dest = v[("x", l + 1)] if l < L - 1 else out
        mk = masks[l] if (masks is not None and l < L - 1) else None
        in_w = xin.shape[-1]
        # both directions' time loops in one launch (triton: per step, or one persistent launch;
        # cupy: one device-loop launch) where their weights allow it (triton: the same dtype and
        # strides): (launcher, its arguments after the two directions'), called once both are collected
        pair_loop = None
        if D == 2 and hasattr(K, "pair_ok") and K.pair_ok(ws[l * D][1], ws[l * D + 1][1]):
            pdc = _dot_code(ws[l * D][1].dtype, tf32=tf32)
            if persist and persist_pair:
                pair_loop = (K.persist_forward_pair, (lens, pdc, persist_pair))
            elif not persist and not P and steps_forward is not None:
                pair_loop = (K.steps_forward_pair, (lens, pdc))
        pair = []
        XGs = [v[("gates", l, d)] if mode in ("lstm", "gru") else empty((T, B, H), dtype=torch.float32, device=dev)
               for d in range(D)]
        # the input projection of every step: (x, W_ih^T, XG, b_ih, b_hh) per direction, the two
        # directions in one launch where they can share it (triton)
        projs = [(xin.reshape(T * B, in_w), ws[l * D + d][0].t(), XGs[d].view(T * B, XGs[d].shape[-1])[:, :GH],
                  ws[l * D + d][2], ws[l * D + d][3] if mode != "gru" else None) for d in range(D)]
        pdot = _dot_code(xin.dtype, ws[l * D][0].dtype, tf32=tf32)
        paired = D == 2 and hasattr(K, "matmul_pair") and K.pair_matmul_ok(*projs, pdot)
        if paired:
            K.matmul_pair(*projs, dot=pdot)
        for d in range(D):
            k = l * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = ws[k]
            Hs = v[("h", l, d)]
            Cs = v.get(("c", l, d))
            XG = XGs[d]
            if not paired:
                a, b, c, bias1, bias2 = projs[d]
                K.matmul(a, b, c, bias1=bias1, bias2=bias2, dot=pdot)
            dcode = _dot_code(w_hh.dtype, tf32=tf32)
            # (XG, Hs, Cs, w_hh, b_hh, out, mask): what a whole-sequence loop of this direction takes
            loop = (XG, Hs, Cs, w_hh, b_hh if mode == "gru" else None, dest[:, :, d * H:(d + 1) * H],
                    None if mk is None else mk[:, :, d * H:(d + 1) * H])
            if pair_loop is not None:
                pair.append(loop)
                if d == 1:
                    pair_loop[0](mode, *pair, *pair_loop[1])
            elif persist:
                K.persist_forward(mode, *loop, lens, d == 1, dcode, persist)
            elif P:
                Ms = v[("m", l, d)]
                for t, p, n in ref._steps(T, d == 1):
                    K.step_forward(mode, XG[t], Hs[p], Ms[t], Cs[p], Cs[n], w_hh, None, None, None, lens, t, dcode,
                                   proj=True)
                    K.proj_forward(Ms[t], w_hr, Hs[p], Hs[n], dest[t, :, d * P:(d + 1) * P],
                                   None if mk is None else mk[t, :, d * P:(d + 1) * P], lens, t,
                                   _dot_code(w_hr.dtype, tf32=tf32))
            elif steps_forward is not None:
                steps_forward(mode, *loop, lens, d == 1, dcode)
            else:
                for t, p, n in ref._steps(T, d == 1):
                    K.step_forward(mode, XG[t], Hs[p], Hs[n], None if Cs is None else Cs[p],
                                   None if Cs is None else Cs[n], w_hh, b_hh if mode == "gru" else None,
                                   dest[t, :, d * H:(d + 1) * H], None if mk is None else mk[t, :, d * H:(d + 1) * H],
                                   lens, t, dcode)
        xin = dest
    torch._foreach_copy_([*hn.unbind(0), *(cn.unbind(0) if mode == "lstm" else ())],
                         [sl[0 if k % D else T] for k, sl in enumerate(slots)])
    return out, hn, cn, reserve


def _gpu_backward(K, mode, gout, ghn, gcn, input, weights, reserve, num_layers, bidirectional, has_biases, lengths,
                  masks, need=None):
    """:func:`rnn_seq_backward` on a GPU backend; ``need`` is :func:`seq_mask`'s (None: every
    gradient): a weight's product (its column sum for a bias), the first layer's input product
    and the initial state's final step run only for a gradient asked for."""
    need_x, need_hx, need_cx, need_w = need or (True, True, True, (True,) * len(weights))
    T, B, I = input.shape
    D = 2 if bidirectional else 1
    L = num_layers
    H, P, _ = _weight_dims(mode, weights, L, D, has_biases)
    W = P or H
    dt, dev = input.dtype, input.device
    GH = GATES[mode] * H
    v = _reserve_views(reserve, mode, T, B, H, L, D, P)
    lens = _lengths_on(lengths, T, B, dev)
    f32 = torch.float32
    dhx = empty((L * D, B, W), dtype=f32, device=dev) if need_hx else None
    dcx = empty((L * D, B, H), dtype=f32, device=dev) if mode == "lstm" else None
    # the whole backward time loop of a layer and direction in one launch (cupy's device loop,
    # triton's persistent backward), its program count (cupy: 1, sized at launch)
    bloop = hasattr(K, "loop_backward") and _persist_programs(K, dev, B, H, P, backward=True, T=T)
    steps_backward = getattr(K, "steps_backward", None)  # one call per layer and direction (triton; pairs below)
    ws = _split(weights, L, D, has_biases)
    wants = _split(list(need_w), L, D, has_biases)  # per layer and direction, as ws (None: absent)
    # both directions of a layer in one launch per step (triton's per-step path) or in one whole
    # loop launch (triton's persistent backward, cupy's device loop): the two directions' gate
    # gradients coexist, one buffer each; otherwise one buffer serves both in turn
    can_pair = steps_backward is not None or bool(bloop and _persist_pair_programs(K, dev, B, H, T))
    pairs = [D == 2 and not P and can_pair and K.pair_ok(ws[l * D][1], ws[l * D + 1][1]) for l in range(L)]
    # the pairs' persistent backward (triton, where the persistent backward is chosen; cupy): its programs
    bpair = _persist_pair_programs(K, dev, B, H, T) if bloop and any(pairs) and hasattr(K, "persist_backward_pair") else 0
    nbuf = 2 if any(pairs) else 1
    dGis = empty((nbuf, T, B, GH), dtype=f32, device=dev)
    dGhs = empty((nbuf, T, B, GH), dtype=f32, device=dev) if mode == "gru" else dGis
    # the state-gradient carries of every layer and direction, from grad h_n in one copy (and the
    # LSTM's cell-state carries in dcx itself, from grad c_n: what the steps leave there is dc0)
    # (an empty grad h_n / c_n: the outputs were not used, their gradients zero; filled here,
    # once, where a zeros tensor made by the autograd wrapper and its copy were two launches)
    carries = empty((L * D, B, W), dtype=f32, device=dev)
    if maybe_empty(ghn):
        carries.zero_()
    else:
        carries.copy_(ghn)
    if dcx is not None:
        if maybe_empty(gcn):
            dcx.zero_()
        else:
            dcx.copy_(gcn)
    if P:
        # per step: dHp[t] the projected state's gradient (zero where invalid), dm = dHp[t] W_hr
        # the cell's output gradient; the cell's own carry stays zero (an LSTM's dh_prev goes
        # through W_hh only), so one zero buffer serves every step
        dHp = empty((T, B, P), dtype=f32, device=dev)
        dm = empty((B, H), dtype=f32, device=dev)
        zero_h = torch.zeros((B, H), dtype=f32, device=dev)
    dws = [None] * (L * D)
    tf32 = tf32_allowed(dt)
    dout = gout
    rows = _valid_rows(lengths, T, B, dev)
    for l in range(L - 1, -1, -1):
        xin = input if l == 0 else v[("x", l)]
        in_w = xin.shape[-1]
        # dW_ih's operand, both directions; dW_hh's, each direction's states before its steps
        # (masked once, paired or not): each where a direction asks for that gradient
        x2 = rows(xin.reshape(T * B, in_w)) if any(wants[l * D + d][0] for d in range(D)) else None
        hps = [rows((v[("h", l, d)][1:] if d == 1 else v[("h", l, d)][:T]).reshape(T * B, W)) if wants[l * D + d][1]
               else None for d in range(D)]
        # (a data input's: none; the first layer's of one direction in the input's dtype, which
        # its one product writes rounded once, as the float32 result's .to(dt) after the loop did;
        # two directions accumulate in float32)
        dx_dt = dt if l == 0 and D == 1 else f32
        dxin = empty((T, B, in_w), dtype=dx_dt, device=dev) if (l > 0 or need_x) else None
        mk = masks[l - 1] if (masks is not None and l > 0) else None
        dws_pair = None
        paired = pairs[l]
        if paired:
            dirs = [(ws[k][1], carries[k], None if dcx is None else dcx[k], dout[:, :, d * H:(d + 1) * H],
                     v.get(("gates", l, d)), v[("h", l, d)], v.get(("c", l, d)), dGis[d], dGhs[d],
                     dhx[k] if need_hx else None)
                    for d, k in ((0, l * D), (1, l * D + 1))]
            pdc = _dot_code(ws[l * D][1].dtype, tf32=tf32)
            if bpair:  # both directions' time loops in one persistent launch (cupy: False, not run, where
                # its two-direction grid cannot be resident: each direction below then)
                paired = K.persist_backward_pair(mode, *dirs, lens, pdc, bpair) is not False
            else:
                K.steps_backward_pair(mode, *dirs, lens, pdc)
        if paired and hasattr(K, "pair_matmul_ok") and all(wants[l * D + d][0] and wants[l * D + d][1] for d in range(D)):
            # dW_ih and dW_hh of both directions, each pair in one launch where the two can share it
            dws_pair = [(empty(ws[l * D + d][0].shape, dtype=ws[l * D + d][0].dtype, device=dev),
                         empty(ws[l * D + d][1].shape, dtype=ws[l * D + d][1].dtype, device=dev)) for d in range(D)]
            ih = [(dGis[d].view(T * B, GH).t(), x2, dws_pair[d][0], None, None) for d in range(D)]
            hh = [(dGhs[d].view(T * B, GH).t(), hps[d], dws_pair[d][1], None, None) for d in range(D)]
            ih_dot, hh_dot = _dot_code(x2.dtype, tf32=tf32), _dot_code(hps[0].dtype, tf32=tf32)
            if K.pair_matmul_ok(*ih, ih_dot) and K.pair_matmul_ok(*hh, hh_dot):
                K.matmul_pair(*ih, dot=ih_dot)
                K.matmul_pair(*hh, dot=hh_dot)
            else:
                dws_pair = None
        for d in range(D):
            k = l * D + d
            w_ih, w_hh, b_ih, b_hh, w_hr = ws[k]
            Hs = v[("h", l, d)]
            Cs = v.get(("c", l, d))
            G = v.get(("gates", l, d))
            carry = carries[k]
            dc = None if dcx is None else dcx[k]
            dcode = _dot_code(w_hh.dtype, tf32=tf32)
            dGi, dGh = (dGis[d], dGhs[d]) if paired else (dGis[0], dGhs[0])
            prev = None
            if paired:
                pass  # the step loops of both directions ran above
            elif P:
                rdot = _dot_code(w_hr.dtype, tf32=tf32)
                for t, p, n in reversed(ref._steps(T, d == 1)):
                    K.proj_backward(prev, w_hh, carry, dout[t, :, d * P:(d + 1) * P], dHp[t], lens, t, dcode)
                    K.matmul(dHp[t], w_hr, dm, dot=rdot)
                    K.step_backward(mode, None, w_hh, zero_h, dc, dm, G[t], None, None, Cs[p], Cs[n], dGi[t], dGh[t],
                                    None, lens, t, dcode)
                    prev = dGh[t]
                if need_hx:
                    K.proj_backward(prev, w_hh, carry, None, dhx[k], None, 0, dcode, final=True)
            elif bloop and K.loop_backward(mode, w_hh, carry, dc, dout[:, :, d * H:(d + 1) * H], G, Hs, Cs, dGi, dGh,
                                           lens, d == 1, dcode, bloop):
                prev = dGh[T - 1 if d == 1 else 0]  # the last step processed: the final dot below
                if need_hx:
                    K.step_backward(mode, prev, w_hh, carry, None, None, None, None, None, None, None, None, None, dhx[k],
                                    None, 0, dcode, final=True)
            elif steps_backward is not None:
                prev = steps_backward(mode, w_hh, carry, dc, dout[:, :, d * H:(d + 1) * H], G, Hs, Cs, dGi, dGh, lens,
                                      d == 1, dcode)
                if need_hx:
                    K.step_backward(mode, prev, w_hh, carry, None, None, None, None, None, None, None, None, None, dhx[k],
                                    None, 0, dcode, final=True)
            else:
                for t, p, n in reversed(ref._steps(T, d == 1)):
                    K.step_backward(mode, prev, w_hh, carry, dc, dout[t, :, d * H:(d + 1) * H],
                                    None if G is None else G[t], Hs[p], Hs[n], None if Cs is None else Cs[p],
                                    None if Cs is None else Cs[n], dGi[t], dGh[t], None, lens, t, dcode)
                    prev = dGh[t]
                if need_hx:
                    K.step_backward(mode, prev, w_hh, carry, None, None, None, None, None, None, None, None, None, dhx[k],
                                    None, 0, dcode, final=True)
            gi, gh = dGi.view(T * B, GH), dGh.view(T * B, GH)
            want = wants[k]
            dw_ih = dw_hh = db_ih = db_hh = dw_hr = None
            if dws_pair is not None:
                dw_ih, dw_hh = dws_pair[d]  # made above, both directions in one launch each
            else:
                if want[0]:
                    dw_ih = empty(w_ih.shape, dtype=w_ih.dtype, device=dev)
                    K.matmul(gi.t(), x2, dw_ih, dot=_dot_code(x2.dtype, tf32=tf32))
                if want[1]:
                    hprev = hps[d]
                    dw_hh = empty(w_hh.shape, dtype=w_hh.dtype, device=dev)
                    K.matmul(gh.t(), hprev, dw_hh, dot=_dot_code(hprev.dtype, tf32=tf32))
            if b_ih is not None and (want[2] or want[3]):
                db_ih = empty(b_ih.shape, dtype=b_ih.dtype, device=dev)
                db_hh = empty(b_hh.shape, dtype=b_hh.dtype, device=dev)
                # one launch for both (Elman / LSTM: one gate gradient; the GRU's two in one pass)
                K.colsum(gi, db_ih, db_hh, None if dGhs is dGis else gh)
            if dxin is not None:
                K.matmul(gi, w_ih, dxin.view(T * B, in_w), scale=None if mk is None else mk.reshape(T * B, in_w),
                         acc=d == 1, dot=_dot_code(w_ih.dtype, tf32=tf32))
            if P and want[4]:
                dw_hr = empty(w_hr.shape, dtype=w_hr.dtype, device=dev)
                K.matmul(dHp.view(T * B, P).t(), rows(v[("m", l, d)].reshape(T * B, H)), dw_hr, dot=_dot_code(f32, tf32=tf32))
            dws[k] = (dw_ih, dw_hh, db_ih, db_hh, dw_hr)
        dout = dxin
    e = input.new_empty
    dx = dout.to(dt) if dout is not None else e(0)
    flat = _flat_grads(dws, need_w, has_biases, P, lambda g: e(0) if g is None else g)
    dcx_t = dcx.to(dt) if dcx is not None and need_cx else e(0)
    return dx, dhx.to(dt) if need_hx else e(0), dcx_t, flat


CUPY_RNN_ENV = "GPU_NN_CUPY_RNN"
# kernels/cuda/rnn_math.cuh: a task of the device loop is SEQ_UNITS hidden units x SEQ_ROWS batch
# rows, run by a block of SEQ_THREADS threads
SEQ_UNITS, SEQ_ROWS, SEQ_THREADS = 32, 8, 256


def cupy_loop_choice(B: int, H: int, P: int, env: Optional[str]) -> bool:
    """Whether the cupy backend runs the time loop of a layer and direction on the device
    (``rnn_seq_fwd`` / ``rnn_seq_bwd``: one cooperative launch per layer, direction and pass)
    rather than a torch matmul and a cell launch per step. ``env`` is ``GPU_NN_CUPY_RNN`` (None if
    unset): ``"step"`` forces the per-step path; unset, ``""``, ``"loop"`` or ``"mma"`` take the
    device loop wherever it applies: every mode, lengths, initial states and dropout masks, but not
    an LSTM with a projection (``P > 0``: the loop has no projection step) nor an empty batch
    (``"mma"``: its dots on the tensor cores where the precision allows, :func:`cupy_mma`).

    The loop is the default since its GPU tests passed on the H200 (run of ac586cd);
    ``GPU_NN_CUPY_RNN=step`` keeps the old path.
    """
    if env not in CUPY_RNN_VALUES:
        raise ValueError(f"{CUPY_RNN_ENV} must be loop, mma, step or unset, got {env!r}")
    return env != "step" and P == 0 and B >= 1 and H >= 1


CUPY_RNN_VALUES = (None, "", "loop", "mma", "step")


def cupy_mma(dot: int, env: Optional[str]) -> bool:
    """Whether the device loop's dots run on the tensor cores (kernels/cuda/rnn.cu ``GN_MMA``:
    mma.sync tiles of 16 units x 8 batch rows, float32 accumulation) rather than as CUDA-core
    FMAs: only on request (``GPU_NN_CUPY_RNN=mma``: no GPU has run it yet, its operand fragments
    are host-tested through an emulation of the instruction's register layout), and only where
    the layer's precision allows it (``dot`` 1 / 2: float16 / bfloat16 operands, exactly the
    products the FMA path forms; 3: float32 with TF32 allowed, operands rounded to TF32 as
    cuDNN's are). Exact float32 (``dot`` 0) keeps the FMAs."""
    return env == "mma" and dot in (1, 2, 3)


def cupy_loop_grid(B: int, H: int, sm_count: int, blocks_per_sm: int, cap: Optional[int] = None,
                   directions: int = 1) -> int:
    """Blocks of a device-loop launch: one per task (``SEQ_UNITS`` units x ``SEQ_ROWS`` rows, of
    each of the ``directions`` the launch runs: 2 for ``rnn_seq2_fwd`` / ``rnn_seq2_bwd``) up to
    what the device holds at once (``sm_count`` x ``blocks_per_sm`` from the occupancy API; more
    tasks than that loop inside the blocks) and ``cap``; 0 when nothing can be resident (the
    caller then runs per step)."""
    tasks = directions * -(-H // SEQ_UNITS) * -(-B // SEQ_ROWS)
    grid = min(tasks, sm_count * blocks_per_sm)
    if cap is not None:
        grid = min(grid, cap)
    return max(grid, 0)


def _unit_last(t):
    """``t`` as float32 with a unit last stride (the CUDA C kernels index hidden units densely)."""
    t = t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def _float32_out(out):
    """Where a CUDA C kernel writes ``out``: ``out`` itself if it is float32 with a unit last
    stride (units dense), else a float32 temporary the caller copies into ``out`` afterwards."""
    if out.dtype == torch.float32 and out.stride(-1) == 1:
        return out
    return torch.empty(out.shape, dtype=torch.float32, device=out.device)


_HALF_TO_FLOAT32: dict = {}  # device type -> whether the half GEMMs that write float32 are used


def _gemm_half_to_float32(device_type: str) -> bool:
    """Whether this torch has float16 / bfloat16 GEMMs that write float32 (``torch.mm`` /
    ``torch.addmm`` with ``out_dtype=torch.float32``: aten::mm.dtype_out, addmm.dtype_out, CUDA
    only) on ``device_type``, and they have not refused a call (``_half_gemm_refused``)."""
    ok = _HALF_TO_FLOAT32.get(device_type)
    if ok is None:
        key = device_type.upper()
        ok = _HALF_TO_FLOAT32[device_type] = all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                                                 for op in ("aten::mm.dtype_out", "aten::addmm.dtype_out"))
    return ok


def _half_gemm_refused(device_type: str, exc: Exception) -> None:
    """A half GEMM that writes float32 raised before running (a torch whose kernel refuses these
    operands or this output layout): the general path serves this device type from now on, and
    a warning says why once."""
    import warnings

    _HALF_TO_FLOAT32[device_type] = False
    warnings.warn(f"gpu_nn: torch's half GEMM with out_dtype=float32 refused a recurrent layer's product "
                  f"({type(exc).__name__}: {exc}); the cupy backend rounds half products to their dtype "
                  "and widens them instead", RuntimeWarning, stacklevel=3)


def _loop_weight_dtype(dot: int) -> torch.dtype:
    """The dtype of W_hh as the device loop reads it, per dot code: float16 / bfloat16 for half
    layers (1 / 2: their weights as they are, widened in the kernel; the FMA path's and the mma's
    operand alike), float32 otherwise (0, and 3: TF32 rounded in the kernel where it applies)."""
    return {1: torch.float16, 2: torch.bfloat16}.get(dot, torch.float32)


def _cublas_tf32(dot: int) -> _precision.matmul_tf32:
    """torch's float32 GEMMs (cuBLAS) while the block runs: TF32 for dot code 3, exact for 0, set
    for the block and put back after it (:class:`gpu_nn._precision.matmul_tf32`; untouched for
    the half codes 1 / 2, whose GEMMs run in their dtype). The cupy backend's recurrent layers so
    follow torch's cuDNN RNN setting (``tf32_allowed``, which chose the code) in their torch GEMMs
    as the Triton backend does in its own kernels and torch's cuDNN RNN does, whatever the matmul
    setting says. The setting is process-wide: another thread's float32 GEMM launched while the
    block runs (one GEMM launch) sees it too."""
    return _precision.matmul_tf32({0: False, 3: True}.get(dot))


class _CupyImpl:
    """The cupy backend: torch's matmuls around our fused CUDA C cell kernels (kernels/cuda/rnn.cu)."""

    @staticmethod
    def matmul(a, b, c, *, bias1=None, bias2=None, scale=None, acc=False, dot=0):
        """c = (a @ b + bias1 + bias2) * scale (+ c with ``acc``), the product in the dtype of
        ``dot``, the rest in float32, as the Triton backend's ``_rnn_matmul_kernel`` (dot 3: the
        float32 GEMM in TF32, 0: exact; ``_cublas_tf32``). Where c is float32 and so is the
        product, without a scale, the GEMM writes c itself (the biases folded in through addmm,
        or c accumulated through addmm_), and so does a half product without a scale or
        accumulation where torch's half GEMM can write float32 (``_gemm_half_to_float32``): no
        float32 temporary and no copy of it into c (one full pass over c per GEMM fewer; the
        input projection of T=100 N=64 H=512 is 52 MB)."""
        with _cublas_tf32(dot):
            _CupyImpl._matmul(a, b, c, bias1, bias2, scale, acc, dot)

    @staticmethod
    def _matmul(a, b, c, bias1, bias2, scale, acc, dot):
        wdt = {1: torch.float16, 2: torch.bfloat16}.get(dot, torch.float32)  # 0 / 3: float32 (exact / TF32)
        recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, c, bias1, bias2))
        # (out= refuses inputs that autograd records; the double-backward route is one)
        half_out = (wdt != torch.float32 and c.dtype == torch.float32 and scale is None and not acc and not recorded
                    and _gemm_half_to_float32(c.device.type))
        fp32_out = (c.dtype == wdt == torch.float32 and scale is None and a.dtype == b.dtype == torch.float32
                    and not (acc and (bias1 is not None or bias2 is not None)) and not recorded)
        if half_out or fp32_out:
            # the GEMM writes c itself: float32 operands, or half ones through torch's half GEMM
            # that writes float32 (its float32 accumulators not rounded to the half dtype first,
            # as the Triton backend's matmul); the two biases summed first (a G * H vector) and
            # folded in: no float32 temporary, no copy of it into c, no pass over c per bias
            if acc:
                c.addmm_(a, b)
                return
            kw = {"out_dtype": torch.float32} if half_out else {}
            x, y = (a.to(wdt), b.to(wdt)) if half_out else (a, b)
            try:
                if bias1 is None and bias2 is None:
                    torch.mm(x, y, out=c, **kw)
                else:
                    bias = (bias1.float() if bias2 is None else
                            (bias2.float() if bias1 is None else bias1.float() + bias2.float()))
                    torch.addmm(bias, x, y, out=c, **kw)
                return
            except (RuntimeError, TypeError) as exc:
                if not half_out:
                    raise
                _half_gemm_refused(c.device.type, exc)  # then the general path below
        r = torch.mm(a.to(wdt), b.to(wdt)).float()
        if bias1 is not None:
            r += bias1.float()
        if bias2 is not None:
            r += bias2.float()
        if scale is not None:
            r *= scale.float()
        if acc:
            r += c.float()
        c.copy_(r)

    @staticmethod
    def colsum(x, y, y2=None, x2=None):
        """y = x.sum(0) and y2 = x2.sum(0) (x2 given) or y2 = y, as the Triton backend's ``colsum``
        (x, x2 float32). A float32 y is the reduction's own output (``out=``: no temporary and no
        device-to-device copy of it; the H200 counted two copies in every CuPy cell's backward at
        a331102), y2 its one copy; a half y takes the float32 sum rounded once, as before (a sum in
        the half dtype would round the gate gradients first). ``out=`` refuses what autograd
        records (the double-backward route's recomputation): that takes the copies."""
        recorded = torch.is_grad_enabled() and (x.requires_grad or (x2 is not None and x2.requires_grad))
        if y.dtype == x.dtype and (x2 is None or x2.dtype == x.dtype) and not recorded:
            torch.sum(x, 0, out=y)
            if y2 is not None:
                if x2 is None:
                    y2.copy_(y)
                else:
                    torch.sum(x2, 0, out=y2)
            return
        s = x.sum(0)
        y.copy_(s)
        if y2 is not None:
            y2.copy_(s if x2 is None else x2.sum(0))

    @staticmethod
    def _module(mode, device):
        kcuda = cuda_kernels()

        return kcuda, kcuda.load("rnn", {"GN_MODE": ref.MODES.index(mode)}, device.index or 0)

    # tests cap the loop's grid to make blocks loop over tasks (None: the occupancy bound only)
    max_loop_blocks: Optional[int] = None

    @staticmethod
    def _loop_kernel(mode, dot, device, kernel, B, H, directions=1, mma=False):
        """(kcuda, cooperative module, grid) of a loop kernel (``directions`` 2: a two-direction
        one; ``mma``: its dots on the tensor cores, :func:`cupy_mma`); grid 0: it cannot be
        resident."""
        kcuda = cuda_kernels()
        dev = device.index if device.index is not None else torch.cuda.current_device()
        # dot 3 (TF32 allowed for float32) runs as exact float32 CUDA-core FMAs, or as TF32 mma
        rnd = dot if dot in (1, 2) else 0
        mod = kcuda.load("rnn", {"GN_MODE": ref.MODES.index(mode), "GN_ROUND": rnd, "GN_MMA": int(mma)}, dev,
                         cooperative=True)
        per_sm, sms = _CupyImpl._residency(mod, kernel, dev)
        return kcuda, mod, cupy_loop_grid(B, H, sms, per_sm, _CupyImpl.max_loop_blocks, directions)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _residency(mod, kernel, dev):
        import cupy
        from cupy_backends.cuda.api import driver

        with cupy.cuda.Device(dev):
            fn = mod.get_function(kernel)
            per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, SEQ_THREADS, 0)
        return per_sm, torch.cuda.get_device_properties(dev).multi_processor_count

    @staticmethod
    def persist_forward(mode, xg, hs, cs, w_hh, b_hh, out, mask, lengths, reverse, dot, programs):
        """Every step of one layer and direction in one launch of ``rnn_seq_fwd``: ``xg [T, B, *]``
        the input projections (unit last stride; become the stored gates), ``hs / cs [T + 1, B, H]``
        contiguous float32 slots, ``out`` / ``mask [T, B, H]``, ``lengths`` int64 ``[B]``.
        ``programs`` is :func:`cupy_loop_choice`'s yes. Runs per step when the grid cannot be
        resident."""
        B, H = hs.shape[1], hs.shape[2]
        mma = cupy_mma(dot, os.environ.get(CUPY_RNN_ENV))
        kcuda, mod, grid = _CupyImpl._loop_kernel(mode, dot, hs.device, "rnn_seq_fwd", B, H, mma=mma)
        if grid == 0:
            _CupyImpl._steps_forward(mode, xg, hs, cs, w_hh, b_hh, out, mask, lengths, reverse, dot)
            return
        args, finish = _CupyImpl._loop_fwd_args(xg, hs, cs, w_hh, b_hh, out, mask, lengths, reverse, dot, mma)
        count = torch.zeros(1, dtype=torch.int32, device=hs.device)
        kcuda.launch(mod, "rnn_seq_fwd", (grid,), (SEQ_THREADS,), (*args, count), device=hs.device.index or 0)
        finish()

    @staticmethod
    def pair_ok(fwd_w_hh, rev_w_hh) -> bool:
        """Both directions of a layer can share a loop launch whatever their weights' strides (the
        launchers pass each direction's W_hh as a contiguous tensor of its own)."""
        return True

    # tests turn this off to run the two directions' loops one launch each (the same arithmetic)
    pair_loops: bool = True

    @staticmethod
    def persist_pair_programs(B: int, H: int, sm_count: int) -> int:
        """1 where the two-direction loops apply (their grid is sized at launch), else 0."""
        return int(_CupyImpl.pair_loops and B >= 1 and H >= 1)

    @staticmethod
    def persist_forward_pair(mode, fwd, rev, lengths, dot, programs):
        """Both directions' forward time loops in one launch of ``rnn_seq2_fwd``: ``fwd`` / ``rev``
        are ``(xg, hs, cs, w_hh, b_hh, out, mask)`` of each direction as ``persist_forward`` takes
        them. Where the two-direction grid cannot be resident, each direction as
        ``persist_forward``."""
        hs = fwd[1]
        B, H = hs.shape[1], hs.shape[2]
        mma = cupy_mma(dot, os.environ.get(CUPY_RNN_ENV))
        kcuda, mod, grid = _CupyImpl._loop_kernel(mode, dot, hs.device, "rnn_seq2_fwd", B, H, 2, mma)
        if grid == 0:
            for d, loop in enumerate((fwd, rev)):
                _CupyImpl.persist_forward(mode, *loop, lengths, d == 1, dot, programs)
            return
        args_f, finish_f = _CupyImpl._loop_fwd_args(*fwd, lengths, False, dot, mma)
        args_r, finish_r = _CupyImpl._loop_fwd_args(*rev, lengths, True, dot, mma)
        count = torch.zeros(1, dtype=torch.int32, device=hs.device)
        kcuda.launch(mod, "rnn_seq2_fwd", (grid,), (SEQ_THREADS,), (*args_f, *args_r, count),
                     device=hs.device.index or 0)
        finish_f()
        finish_r()

    @staticmethod
    def _loop_fwd_args(xg, hs, cs, w_hh, b_hh, out, mask, lengths, reverse, dot, mma):
        """The arguments of one direction of ``rnn_seq_fwd`` / ``rnn_seq2_fwd`` (rnn_math.cuh
        ``GN_SEQ_FWD_ARGS``, without the counter) and what to do after the launch (the output
        copied into ``out`` where the kernel wrote a float32 stand-in)."""
        import numpy as np

        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        assert hs.is_contiguous() and (cs is None or cs.is_contiguous()) and xg.stride(2) == 1
        if mma:  # W_hh [G * H, H] in the mma's operand type: its A, rows are units
            wt = w_hh.to(_loop_weight_dtype(dot)).contiguous()
        else:  # [H, G * H]: lanes (consecutive units) read consecutive elements
            wt = w_hh.t().to(_loop_weight_dtype(dot)).contiguous()
        o32 = _float32_out(out)
        m32 = None if mask is None else _unit_last(mask)
        bhh = None if b_hh is None else _unit_last(b_hh)
        args = (xg, np.int64(xg.stride(0)), np.int64(xg.stride(1)), hs, hs if cs is None else cs, wt,
                wt if bhh is None else bhh, np.int32(bhh is not None), o32, np.int64(o32.stride(0)),
                np.int64(o32.stride(1)), o32 if m32 is None else m32, np.int64(0 if m32 is None else m32.stride(0)),
                np.int64(0 if m32 is None else m32.stride(1)), np.int32(m32 is not None), lengths, np.int32(reverse),
                np.int32(T), np.int32(B), np.int32(H))

        def finish():
            if o32 is not out:
                out.copy_(o32)

        return args, finish

    @staticmethod
    def _steps_forward(mode, xg, hs, cs, w_hh, b_hh, out, mask, lengths, reverse, dot):
        """One direction's forward as a matmul and a cell launch per step (no loop grid fits)."""
        for t, p, n in ref._steps(hs.shape[0] - 1, reverse):
            _CupyImpl.step_forward(mode, xg[t], hs[p], hs[n], None if cs is None else cs[p],
                                   None if cs is None else cs[n], w_hh, b_hh, out[t],
                                   None if mask is None else mask[t], lengths, t, dot)

    @staticmethod
    def loop_backward(mode, w_hh, carry, dc, dout, g, hs, cs, dgi, dgh, lengths, reverse, dot, programs=None):
        """Every step of one layer and direction's backward in one launch of ``rnn_seq_bwd``: from
        ``carry`` / ``dc [B, H]`` (dh_T / dc_T), ``dout [T, B, H]``, the stored gates ``g`` and
        states, writes the gate gradients ``dgi / dgh [T, B, G * H]`` and leaves in ``carry`` dh_0
        without the last step's ``dG W_hh`` (the caller adds it, as after the per-step loop) and
        in ``dc`` dc_0. Returns False, having done nothing, when the grid cannot be resident.
        ``programs`` (the Triton launcher's program count) is not used: the grid is sized here."""
        B, H = hs.shape[1], hs.shape[2]
        mma = cupy_mma(dot, os.environ.get(CUPY_RNN_ENV))
        kcuda, mod, grid = _CupyImpl._loop_kernel(mode, dot, hs.device, "rnn_seq_bwd", B, H, mma=mma)
        if grid == 0:
            return False
        args = _CupyImpl._loop_bwd_args(w_hh, carry, dc, dout, g, hs, cs, dgi, dgh, lengths, reverse, dot, mma)
        count = torch.zeros(1, dtype=torch.int32, device=hs.device)
        kcuda.launch(mod, "rnn_seq_bwd", (grid,), (SEQ_THREADS,), (*args, count), device=hs.device.index or 0)
        return True

    @staticmethod
    def persist_backward_pair(mode, fwd, rev, lengths, dot, programs):
        """Both directions' backward time loops in one launch of ``rnn_seq2_bwd``, then each
        direction's final dh0 step: ``fwd`` / ``rev`` are ``(w_hh, carry, dc, dout, G, Hs, Cs, dGi,
        dGh, dh0)`` as kernels/triton/rnn.py ``persist_backward_pair`` takes them (each direction
        its own gate-gradient buffers; ``dGh`` None: ``dGi``). Returns False, having done nothing,
        where the two-direction grid cannot be resident (the caller then runs each direction)."""
        T = fwd[3].shape[0]
        B, H = fwd[1].shape
        dirs = [(w_hh, carry, dc, dout, G, Hs, Cs, dGi, dGi if dGh is None else dGh, dh0)
                for w_hh, carry, dc, dout, G, Hs, Cs, dGi, dGh, dh0 in (fwd, rev)]
        if T and B and H:
            mma = cupy_mma(dot, os.environ.get(CUPY_RNN_ENV))
            kcuda, mod, grid = _CupyImpl._loop_kernel(mode, dot, fwd[1].device, "rnn_seq2_bwd", B, H, 2, mma)
            if grid == 0:
                return False
            args = [a for d, (w_hh, carry, dc, dout, G, Hs, Cs, dGi, dGh, _) in enumerate(dirs)
                    for a in _CupyImpl._loop_bwd_args(w_hh, carry, dc, dout, G, Hs, Cs, dGi, dGh, lengths, d == 1, dot,
                                                      mma)]
            count = torch.zeros(1, dtype=torch.int32, device=fwd[1].device)
            kcuda.launch(mod, "rnn_seq2_bwd", (grid,), (SEQ_THREADS,), (*args, count),
                         device=fwd[1].device.index or 0)
        for d, (w_hh, carry, _, _, _, _, _, _, dGh, dh0) in enumerate(dirs):
            if dh0 is None:  # the initial state's gradient not asked for
                continue
            # the last step processed: 0 forward, T - 1 reverse (its dG W_hh is dh0's last term)
            prev = dGh[T - 1 if d == 1 else 0] if T else None
            _CupyImpl.step_backward(mode, prev, w_hh, carry, None, None, None, None, None, None, None, None, None, dh0,
                                    None, 0, dot, final=True)
        return True

    @staticmethod
    def _loop_bwd_args(w_hh, carry, dc, dout, g, hs, cs, dgi, dgh, lengths, reverse, dot, mma):
        """The arguments of one direction of ``rnn_seq_bwd`` / ``rnn_seq2_bwd`` (rnn_math.cuh
        ``GN_SEQ_BWD_ARGS``, without the counter)."""
        import numpy as np

        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        assert hs.is_contiguous() and carry.is_contiguous() and dgi.stride(2) == 1 and dgh.stride() == dgi.stride()
        if mma:  # W_hh^T [H, G * H] in the mma's operand type: its A, rows are units
            w = w_hh.t().to(_loop_weight_dtype(dot)).contiguous()
        else:
            w = w_hh.to(_loop_weight_dtype(dot)).contiguous()  # [G * H, H]
        d32 = _unit_last(dout)
        return (w, carry, carry if dc is None else dc, d32, np.int64(d32.stride(0)), np.int64(d32.stride(1)),
                carry if g is None else g, np.int64(0 if g is None else g.stride(0)),
                np.int64(0 if g is None else g.stride(1)), hs, hs if cs is None else cs, dgi, dgh,
                np.int64(dgi.stride(0)), np.int64(dgi.stride(1)), lengths, np.int32(reverse), np.int32(T), np.int32(B),
                np.int32(H))

    @staticmethod
    def step_forward(mode, xg, hp, hn, cp, cn, w_hh, b_hh, out, mask, lengths, t, dot, proj=False):
        """As kernels/triton/rnn.py ``step_forward`` (``lengths`` None: a cell, t = -1)."""
        import numpy as np

        B, H = hn.shape
        if B * H == 0:
            return
        if lengths is None:
            lengths, t = hp, -1  # rnn_cell_fwd reads no lengths at t < 0
        kcuda, mod = _CupyImpl._module(mode, hp.device)
        with _cublas_tf32(dot):
            hh = torch.mm(hp.to(w_hh.dtype), w_hh.t()).float()
        if proj:
            out, mask = hn, None  # not written: rnn_proj_fwd writes the output
        # the kernel indexes rows by stride and units densely: a mask (or an output) whose units are
        # not contiguous (an expanded [B, 1] mask: stride 0) goes through a dense float32 copy
        o32 = _float32_out(out)
        m32 = None if mask is None else _unit_last(mask)
        any_ = hp
        kcuda.launch(mod, "rnn_cell_fwd", ((B * H + 255) // 256,), (256,), (
            xg, np.int64(xg.stride(0)), hh, hp, hn, any_ if cp is None else cp, any_ if cn is None else cn,
            any_ if b_hh is None else _unit_last(b_hh), np.int32(b_hh is not None), o32, np.int64(o32.stride(0)),
            any_ if m32 is None else m32, np.int64(0 if m32 is None else m32.stride(0)), np.int32(m32 is not None),
            lengths, np.int32(t), np.int32(B), np.int32(H), np.int32(proj)), device=hp.device.index or 0)
        if o32 is not out:
            out.copy_(o32)

    @staticmethod
    def proj_forward(m, w_hr, hp, hn, out, mask, lengths, t, dot):
        """h' = m W_hr^T (torch's matmul into hn), then rnn_proj_fwd masks it and writes the output."""
        import numpy as np

        B, P = hn.shape
        if B * P == 0:
            return
        kcuda, mod = _CupyImpl._module("lstm", hn.device)
        with _cublas_tf32(dot):
            hn.copy_(torch.mm(m.to(w_hr.dtype), w_hr.t()))
        o32 = _float32_out(out)
        m32 = None if mask is None else _unit_last(mask)  # as step_forward's
        kcuda.launch(mod, "rnn_proj_fwd", ((B * P + 255) // 256,), (256,), (
            hn, hp, hn, o32, np.int64(o32.stride(0)), hn if m32 is None else m32,
            np.int64(0 if m32 is None else m32.stride(0)), np.int32(m32 is not None), lengths, np.int32(t), np.int32(B),
            np.int32(P)), device=hn.device.index or 0)
        if o32 is not out:
            out.copy_(o32)

    @staticmethod
    def proj_backward(dg_next, w_hh, carry, dout, dh, lengths, t, dot, final=False):
        """carry += dG_next W_hh (torch's matmul); final: dh0 = carry, else rnn_proj_bwd."""
        import numpy as np

        B, P = carry.shape
        if dg_next is not None:
            with _cublas_tf32(dot):
                carry += torch.mm(dg_next.to(w_hh.dtype), w_hh).float()
        if final:
            dh.copy_(carry)
            return
        if B * P == 0:
            return
        kcuda, mod = _CupyImpl._module("lstm", carry.device)
        d32 = _unit_last(dout)
        kcuda.launch(mod, "rnn_proj_bwd", ((B * P + 255) // 256,), (256,), (
            carry, d32, np.int64(d32.stride(0)), dh, lengths, np.int32(t), np.int32(B), np.int32(P)),
            device=carry.device.index or 0)

    @staticmethod
    def step_backward(mode, dg_next, w_hh, carry, dc, dout, g, hp, hn, cp, cn, dgi, dgh, dh0, lengths, t, dot,
                      final=False, has_carry=True, dc_in=None):
        """As kernels/triton/rnn.py ``step_backward`` (``has_carry=False``, ``dc_in``, ``lengths``
        None: a cell)."""
        import numpy as np

        B, H = carry.shape
        if dg_next is not None:
            with _cublas_tf32(dot):
                carry += torch.mm(dg_next.to(w_hh.dtype), w_hh).float()
        if final:
            dh0.copy_(carry)
            return
        if B * H == 0:
            return
        if has_carry:
            dc_in = dc
        if lengths is None:
            lengths, t = carry, -1  # rnn_cell_bwd reads no lengths at t < 0
        kcuda, mod = _CupyImpl._module(mode, carry.device)
        d32 = _unit_last(dout)
        any_ = carry
        kcuda.launch(mod, "rnn_cell_bwd", ((B * H + 255) // 256,), (256,), (
            carry, np.int32(has_carry), any_ if dc is None else dc, any_ if dc_in is None else dc_in,
            np.int32(dc_in is not None), d32, np.int64(d32.stride(0)), any_ if g is None else g,
            np.int64(0 if g is None else g.stride(0)), any_ if hp is None else hp, any_ if hn is None else hn,
            any_ if cp is None else cp, any_ if cn is None else cn,
            dgi, dgh, np.int64(dgi.stride(0)), lengths, np.int32(t), np.int32(B), np.int32(H)),
            device=carry.device.index or 0)


# ----------------------------------------------------------------------------------------------
# custom ops: sequences


@routed
@torch.library.custom_op("gpu_nn::rnn_seq", mutates_args=())
@on_device
def _rnn_seq_op(input: Tensor, hx: Tensor, cx: Optional[Tensor], weights: list[Tensor], mode: str, num_layers: int,
                bidirectional: bool, has_biases: bool, lengths: Optional[Tensor],
                dropout_masks: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return rnn_seq_forward(input, hx, cx, weights, mode, num_layers, bidirectional, has_biases, lengths, dropout_masks)


@_rnn_seq_op.register_fake
def _(input, hx, cx, weights, mode, num_layers, bidirectional, has_biases, lengths, dropout_masks):
    T, B, H, P, L, D = _shape_info(input, hx, cx, num_layers, bidirectional)
    W = P or H
    cn = input.new_empty((L * D, B, H)) if mode == "lstm" else input.new_empty(0)
    res = input.new_empty(ref.reserve_size(mode, T, B, H, L, D, P), dtype=reserve_dtype(input.dtype))
    return input.new_empty((T, B, D * W)), input.new_empty((L * D, B, W)), cn, res


@routed
@torch.library.custom_op("gpu_nn::rnn_seq_backward", mutates_args=())
@on_device
def _rnn_seq_backward_op(grad_output: Tensor, grad_hn: Tensor, grad_cn: Optional[Tensor], input: Tensor,
                         weights: list[Tensor], reserve: Tensor, mode: str, num_layers: int, bidirectional: bool,
                         has_biases: bool, lengths: Optional[Tensor], dropout_masks: Optional[Tensor],
                         output_mask: Optional[list[bool]] = None) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    return rnn_seq_backward(grad_output, grad_hn, grad_cn, input, weights, reserve, mode, num_layers, bidirectional,
                            has_biases, lengths, dropout_masks, output_mask)


@_rnn_seq_backward_op.register_fake
def _(grad_output, grad_hn, grad_cn, input, weights, reserve, mode, num_layers, bidirectional, has_biases, lengths,
      dropout_masks, output_mask=None):
    need_x, need_hx, need_cx, need_w = seq_mask(output_mask, len(weights))
    e = input.new_empty
    # the state gradients' shapes from the layer's (grad h_n / c_n may be empty placeholders: zero)
    D = 2 if bidirectional else 1
    H, P, _ = _weight_dims(mode, weights, num_layers, D, has_biases)
    states = (num_layers * D, input.shape[1])
    dcx = e((*states, H)) if mode == "lstm" and need_cx else e(0)
    return (e(input.shape) if need_x else e(0), e((*states, P or H)) if need_hx else e(0), dcx,
            [w.new_empty(w.shape) if m else e(0) for w, m in zip(weights, need_w)])


def _flat_needs(needs, n_w: int) -> list:
    """The sequence op's ``needs_input_grad`` flat, ``[input, hx, cx, one per weight, the rest]``:
    its weight entry is a list of flags (the tensor-list spread, torch's own pytree route alike),
    elsewhere one flag for the whole list."""
    w = needs[3] if isinstance(needs[3], (list, tuple)) and len(needs[3]) == n_w else [bool(needs[3])] * n_w
    return [*needs[:3], *w, *needs[4:]]


def _seq_setup(ctx, inputs, output):
    input, hx, cx, weights, mode, num_layers, bidirectional, has_biases, lengths, masks = inputs
    ctx.args = (mode, num_layers, bidirectional, has_biases)
    ctx.has_cx = cx is not None
    ctx.n_w = len(weights)
    ctx.has_lengths, ctx.has_masks = lengths is not None, masks is not None
    # no zero tensors for the gradients that do not come: the reserve's never does (a fill of
    # its whole size per backward), h_n's / c_n's often not; the backward takes None
    ctx.set_materialize_grads(False)
    # hx / cx are only read by the double backward (the first-order backward runs on the reserve)
    ctx.save_for_backward(input, output[3], lengths, masks, hx, cx, *weights)


def _seq_backward(ctx, g_out, g_hn, g_cn, _g_res):
    input, reserve, lengths, masks, hx, cx, *weights = ctx.saved_tensors
    mode, num_layers, bidirectional, has_biases = ctx.args
    lengths = lengths if ctx.has_lengths else None
    masks = masks if ctx.has_masks else None
    if torch.is_grad_enabled() and (_any_legacy_batched((g_out, g_hn, g_cn)) or
                                    tangents_in_play((g_out, g_hn, g_cn, input, hx, cx, *weights))):
        # the recomputation: for gradients batched by torch's legacy vmap with create_graph=True
        # (a vectorized jacobian of a vectorized jacobian), whose ops refuse them (the fused
        # backward's results differentiated through that batching came out wrong: 0.05 off for
        # an LSTM); and where forward-mode AD reaches the backward (jvp of a vjp pullback, a dual
        # cotangent: its ops have forward rules, _SeqGrads none)
        return _seq_backward_differentiable(ctx, g_out, g_hn, g_cn, input, hx, cx, weights, lengths, masks)
    T, B, _ = input.shape
    D = 2 if bidirectional else 1
    H, P, _ = _weight_dims(mode, weights, num_layers, D, has_biases)
    W = P or H
    if g_out is None:
        g_out = input.new_zeros((T, B, D * W))
    # an unused h_n / c_n (the usual case): without a graph to build, an empty placeholder the
    # op reads as zero (it fills its float32 carries once); _SeqGrads' double backward takes
    # real zeros (it differentiates through them)
    lean = not torch.is_grad_enabled()
    if g_hn is None:
        g_hn = input.new_empty(0) if lean else input.new_zeros((num_layers * D, B, W))
    if mode == "lstm" and (g_cn is None or maybe_empty(g_cn)):
        g_cn = input.new_empty(0) if lean else input.new_zeros((num_layers * D, B, H))
    # the gradients this backward uses (a data input's, a zero initial state's, a frozen weight's
    # are not computed, as torch's cuDNN backward's output_mask): needs_input_grad narrowed by the
    # engine (wanted), its entry for the weight list a list (the tensor-list spread, torch's own
    # pytree route alike), flattened to line up with the edges
    n_w = len(weights)
    needs = _flat_needs(ctx.needs_input_grad, n_w)
    if isinstance(ctx.needs_input_grad[3], (list, tuple)):  # (flags per weight: they line up with the edges)
        needs = wanted(ctx, needs)
    need_w = [bool(n) for n in needs[3:3 + n_w]]
    mask = [bool(needs[0]), bool(needs[1]), ctx.has_cx and mode == "lstm" and bool(needs[2]), *need_w]
    if not any(mask):  # (the weights' entry a list: torch's tensor-list route takes no None for it)
        return None, None, None, [None] * n_w, None, None, None, None, None, None
    g_cn = g_cn.contiguous() if mode == "lstm" else None
    if torch.is_grad_enabled():
        # create_graph=True, torch.func's grad: the same fused backward, its results made
        # differentiable by _SeqGrads (a second derivative recomputes the forward, only if asked)
        dx, dhx, dcx, *dws = _SeqGrads.apply(
            (mode, num_layers, bidirectional, has_biases, ctx.has_cx and mode == "lstm", tuple(mask)), g_out.contiguous(),
            g_hn.contiguous(), g_cn, input, hx, cx, reserve, lengths, masks, *weights)
    else:
        dx, dhx, dcx, dws = _rnn_seq_backward_op(
            g_out.contiguous(), g_hn.contiguous(), g_cn, input, list(weights), reserve,
            mode, num_layers, bidirectional, has_biases, lengths, masks, mask,
        )
    return (dx if mask[0] else None, dhx if mask[1] else None, dcx if mask[2] else None,
            [g if m else None for g, m in zip(dws, need_w)], None, None, None, None, None, None)


class _SeqGrads(torch.autograd.Function):
    """The sequence op's first-order gradients where a graph is built (create_graph=True, every
    backward under torch.func's grad: per-sample gradients, MAML): the fused backward op, as
    without a graph, its results differentiable. A second derivative recomputes the forward
    from our linear and activation ops (ops/_autograd.py: recompute_double_backward), only when
    one is asked for (until 52b4f24 every such backward recomputed its first-order gradients
    that way: a whole composed forward and backward of every layer and step). ``meta``:
    ``(mode, num_layers, bidirectional, has_biases, has_cx, mask)``; results ``(dx, dhx, dcx,
    *dws)``, empty placeholders where the mask is False."""

    @staticmethod
    def vmap(info, in_dims, *args):
        # once per element, as the sequence op itself under vmap (each element's results
        # differentiable again: a vmapped Hessian); an empty batch asks the op's fake kernel.
        # (_dispatch's loop looked up at the call, as the ops' own vmap rules do: tests count it)
        from . import _dispatch

        return _dispatch._looped(_SeqGrads.apply, info.batch_size, in_dims, args, _SeqGrads.forward)

    @staticmethod
    def forward(meta, g_out, g_hn, g_cn, input, hx, cx, reserve, lengths, masks, *weights):
        mode, num_layers, bidirectional, has_biases, _, mask = meta
        dx, dhx, dcx, dws = _rnn_seq_backward_op(g_out, g_hn, g_cn, input, list(weights), reserve, mode, num_layers,
                                                 bidirectional, has_biases, lengths, masks, list(mask))
        return (dx, dhx, dcx, *dws)

    @staticmethod
    def setup_context(ctx, inputs, output):
        meta, g_out, g_hn, g_cn, input, hx, cx, _, lengths, masks, *weights = inputs
        ctx.meta = meta
        ctx.save_for_backward(g_out, g_hn, g_cn, input, hx, cx, lengths, masks, *weights)

    @staticmethod
    def backward(ctx, *gg):
        from ._autograd import recompute_double_backward

        g_out, g_hn, g_cn, input, hx, cx, lengths, masks, *weights = ctx.saved_tensors
        mode, num_layers, bidirectional, has_biases, has_cx, mask = ctx.meta
        lstm = mode == "lstm"
        # the results (dx, dhx, dcx, *dws) are the gradients of the primals (input, hx, cx, *weights)
        prims = [input, hx, cx if has_cx else None, *weights]
        wrt = [i for i, p in enumerate(prims) if p is not None and mask[i]]

        def compose(*p):
            return _seq_compose(mode, num_layers, bidirectional, has_biases, lengths, masks, p[0], p[1],
                                p[2] if has_cx else (cx if lstm else None), *p[3:])

        d_cot, d_prims = recompute_double_backward(compose, prims, wrt, [g_out, g_hn, g_cn if lstm else None],
                                                   [gg[i] for i in wrt])
        return (None, d_cot[0], d_cot[1], d_cot[2], d_prims[0], d_prims[1], d_prims[2], None, None, None,
                *d_prims[3:])

    # the second derivative's recomputed forward runs on the backend the first-order gradients'
    # forward ran on, in whatever thread autograd runs it (as every op's backward: it took the
    # thread's block, an audit: an LSTM's under 'triton' recomputed on 'reference' from a thread)
    setup_context, backward = map(staticmethod, _backend.autograd_pair(setup_context, backward))


_rnn_seq_op.register_autograd(_seq_backward, setup_context=_seq_setup)


# ----------------------------------------------------------------------------------------------
# double backward: the recurrence rebuilt from our linear and activation ops (each with its own
# double backward) and torch elementwise math, differentiated with create_graph=True. The
# fused kernels' reserve holds the forward's intermediates but not a graph; recomputing one
# forward is what torch's own cuDNN RNN cannot do at all (it has no double backward).


def _step_compose(mode, gi, gh, h, c, w_hr=None):
    """One step from the input projection ``gi = x W_ih^T + b_ih`` and the recurrent one
    ``gh = h W_hh^T + b_hh`` ([B, G * H] each): ``(h', c')`` (c' None but for the LSTM; a
    projected LSTM's h' is ``(o * tanh(c')) W_hr^T``)."""
    from .activation import _activation_op as act

    if mode in ("rnn_tanh", "rnn_relu"):
        return act(gi + gh, "tanh" if mode == "rnn_tanh" else "relu"), None
    if mode == "lstm":
        H = c.shape[-1]
        z = gi + gh
        i, f, o = act(z[:, :H], "sigmoid"), act(z[:, H:2 * H], "sigmoid"), act(z[:, 3 * H:], "sigmoid")
        c2 = f * c + i * act(z[:, 2 * H:3 * H], "tanh")
        m = o * act(c2, "tanh")
        if w_hr is not None:
            from .dense import _linear_op as linear

            return linear(m, w_hr, None, None), c2
        return m, c2
    H = h.shape[-1]
    rz = act(gi[:, :2 * H] + gh[:, :2 * H], "sigmoid")
    n = act(gi[:, 2 * H:] + rz[:, :H] * gh[:, 2 * H:], "tanh")
    return n + rz[:, H:] * (h - n), None


def _seq_compose(mode, num_layers, bidirectional, has_biases, lengths, masks, input, hx, cx, *weights):
    """rnn_seq_forward as a differentiable composition: ``(output, hn, cn)`` (cn None but for
    the LSTM), with the same length semantics (a finished sequence keeps its state, its outputs
    are zero) and dropout between layers."""
    from .dense import _linear_op as linear

    T, B, _ = input.shape
    D = 2 if bidirectional else 1
    valid = None
    if lengths is not None:
        valid = _backend.to_device_async(_steps_alive(lengths, T), input.device)[:, :, None]
    ws = _split(list(weights), num_layers, D, has_biases)
    xin, hns, cns = input, [], []
    for l in range(num_layers):
        outs = []
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_hr = ws[l * D + d]
            proj = linear(xin, w_ih, b_ih, None)
            h = hx[l * D + d]
            c = cx[l * D + d] if mode == "lstm" else None
            seq = [None] * T
            for t in (range(T - 1, -1, -1) if d == 1 else range(T)):
                h2, c2 = _step_compose(mode, proj[t], linear(h, w_hh, b_hh, None), h, c, w_hr)
                if valid is not None:
                    h2 = torch.where(valid[t], h2, h)
                    c2 = None if c2 is None else torch.where(valid[t], c2, c)
                seq[t] = h2 if valid is None else torch.where(valid[t], h2, torch.zeros_like(h2))
                h, c = h2, c2
            outs.append(torch.stack(seq))
            hns.append(h)
            cns.append(c)
        out = torch.cat(outs, dim=2) if D == 2 else outs[0]
        xin = out if masks is None or l == num_layers - 1 else out * masks[l]
    return out, torch.stack(hns), (torch.stack(cns) if mode == "lstm" else None)


def _unwrapped(t):
    """``t`` without torch.func's wrappers (None stays None)."""
    while t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _seq_backward_differentiable(ctx, g_out, g_hn, g_cn, input, hx, cx, weights, lengths, masks):
    mode, num_layers, bidirectional, has_biases = ctx.args
    has_cx = ctx.has_cx and mode == "lstm"
    prims = [input, hx, cx if has_cx else None, *weights]
    flags = _flat_needs(ctx.needs_input_grad, len(weights))
    wrt = [i for i, p in enumerate(prims) if p is not None and flags[i]]
    from ._autograd import leaf

    transformed = torch._C._are_functorch_transforms_active()
    if not transformed and any(p is not None and torch._C._functorch.is_functorch_wrapped_tensor(p) for p in prims):
        # a torch.func.vjp's pullback called after its transform ended: what the forward saved
        # are that finished level's wrappers; the tensors inside them, differentiated afresh (no
        # transform is left to differentiate the result again)
        prims = [_unwrapped(p) for p in prims]
    full = list(prims)
    # the results with a gradient coming (c_n: an LSTM's alone)
    keep = [k for k, g in enumerate((g_out, g_hn, g_cn)) if g is not None and (k < 2 or mode == "lstm")]
    cotangents = tuple((g_out, g_hn, g_cn)[k] for k in keep)

    def compose(*ws):  # the kept results of the forward, recomputed from ws in place of prims[wrt]
        for i, t in zip(wrt, ws):
            full[i] = t
        outs = _seq_compose(mode, num_layers, bidirectional, has_biases, lengths, masks, full[0], full[1],
                            full[2] if has_cx else (cx if mode == "lstm" else None), *full[3:])
        return tuple(outs[k] for k in keep)

    if transformed:
        # under torch.func's grad / vjp (which run every backward differentiably) autograd.grad
        # and fresh leaves are not allowed: the same recomputation through torch.func.vjp, which
        # nests with the transform's levels (grad of grad)
        grads = torch.func.vjp(compose, *(prims[i] for i in wrt))[1](cotangents)
    else:
        with torch.enable_grad():
            leaves = [leaf(prims[i], True) for i in wrt]
            grads = torch.autograd.grad(compose(*leaves), leaves, cotangents, create_graph=True, allow_unused=True)
    res = [None] * len(prims)
    for i, g in zip(wrt, grads):
        res[i] = g if g is not None else torch.zeros_like(prims[i])
    # (the weights' entry a list whatever is asked: torch's tensor-list route takes no None for it)
    return res[0], res[1], res[2], list(res[3:]), None, None, None, None, None, None



# ----------------------------------------------------------------------------------------------
# custom ops: cells (one step of one layer). On the GPU backends a dedicated path over the
# sequence's kernels: the input projection (one matmul) and one fused step forward; the backward
# one step-backward launch and the GEMMs, from what the forward kept (no recompute), with no
# lengths (the kernels take t = -1) and no copy of a float32 row-contiguous state.


def cell_reserve_layout(mode: str, B: int, H: int, f32_io: bool):
    """``({name: (offset, shape)}, total)`` of a cell's float32 reserve (the third output of
    ``gpu_nn::rnn_cell``): what the backward reads besides the op's inputs and outputs.

    ``"gates" [B, S * H]`` (LSTM: activated i, f, g, o; GRU: r, z, n and h W_hn^T + b_hn; none for
    the Elman cell, ``reference.rnn.STORED``). A float32 layer (``f32_io``) keeps nothing else:
    its outputs h' and c' are the float32 states the kernels read, saved for the backward as they
    are. Other dtypes add the float32 states: ``"h"`` (h'; the Elman cell's input projection is
    formed there), ``"hp"`` (h), and for the LSTM ``"c"`` (c') and ``"cp"`` (c)."""
    S = ref.STORED[mode]
    slots = [("gates", (B, S * H))] if S else []
    if not f32_io:
        slots += [("h", (B, H)), ("hp", (B, H))] + ([("c", (B, H)), ("cp", (B, H))] if mode == "lstm" else [])
    out, off = {}, 0
    for name, shape in slots:
        out[name] = (off, shape)
        off += shape[0] * shape[1]
    return out, off


def _cell_views(reserve, mode, B, H, f32_io):
    layout, _ = cell_reserve_layout(mode, B, H, f32_io)
    return {k: reserve[o:o + s[0] * s[1]].view(s) for k, (o, s) in layout.items()}


def _rows32(t):
    """``t`` as float32 ``[B, H]`` rows with unit strides (the step kernels' state layout): ``t``
    itself when it already is one, else one conversion."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    # (not t.to(float32, memory_format=...): that returns a float32 t itself, strides and all)
    return torch.empty(t.shape, dtype=torch.float32, device=t.device).copy_(t)


def _unit_cols(t):
    """``t`` with a unit last stride (rows may be strided): itself when it has one."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def rnn_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
    """``input [B, I]``, ``hx / cx [B, H]`` -> ``(h' [B, H], c' [B, H] or empty [0], reserve)``,
    ``reserve`` float32, laid out by :func:`cell_reserve_layout`."""
    op = mode + "_cell"
    # the public cells have checked already (_cell: a few comparisons here, _cell_usual); a call
    # of the op itself (torch.ops.gpu_nn.rnn_cell) is checked as they are, before a kernel indexes
    # by the weights' sizes
    _check_cell_op(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode)
    backend = _backend.resolve(op, input.device, BACKENDS, dtype=input.dtype)
    if backend == "reference":
        return _reference_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode)
    if backend == "triton":
        _check_triton_sizes(op, w_hh, input.shape[0] if input.dim() == 2 else 1, input.shape[-1])
    _backend.check_interpreter_dtype(op, backend, input)
    return _gpu_cell_forward(_impl(backend), mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def _reference_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
    """``reference.rnn.cell_forward`` (the sequence reference's step, without its reserve and
    bookkeeping: a cell is a handful of NumPy calls), its reserve laid out as the cell's own
    (:func:`cell_reserve_layout`; the reference backward recomputes and does not read it, it
    makes the op's outputs complete)."""
    dt, dev = input.dtype, input.device
    hn, cn, gates = ref.cell_forward(mode, to_numpy(input), to_numpy(hx), to_numpy(cx), to_numpy(w_ih), to_numpy(w_hh),
                                     to_numpy(b_ih), to_numpy(b_hh))
    parts = [] if gates is None else [gates]
    if dt != torch.float32:  # the float32 states, in cell_reserve_layout's order
        parts += [hn, to_numpy(hx)] + ([cn, to_numpy(cx)] if mode == "lstm" else [])
    if not parts:
        reserve = torch.empty(0, dtype=torch.float32, device=dev)
    elif len(parts) == 1:  # the gates, a fresh contiguous array: shared, then viewed flat
        reserve = from_numpy(gates, torch.float32, dev).view(-1)
    else:
        reserve = from_numpy(np.concatenate([p.reshape(-1) for p in parts]), torch.float32, dev)
    return from_numpy(hn, dt, dev), (from_numpy(cn, dt, dev) if mode == "lstm" else input.new_empty(0)), reserve


def _gpu_cell_forward(K, mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """Two launches for a float32 layer with row-contiguous states: ``K.matmul`` (x W_ih^T + b_ih
    (+ b_hh but for the GRU) into the gates slot, or for the Elman cell straight into h') and
    ``K.step_forward`` (recurrent product, cell math, h' and c'). Other dtypes convert h (and c)
    once into the reserve and c' once out of it."""
    B, I = input.shape
    H = w_hh.shape[1]
    dt, dev = input.dtype, input.device
    b_ih, b_hh = _dense(b_ih), _dense(b_hh)  # read by unit, no stride (_dense_biases)
    f32_io = dt == torch.float32
    lstm = mode == "lstm"
    _, size = cell_reserve_layout(mode, B, H, f32_io)
    reserve = empty((size,), dtype=torch.float32, device=dev)
    v = _cell_views(reserve, mode, B, H, f32_io)
    h = empty((B, H), dtype=dt, device=dev)
    c = empty((B, H), dtype=dt, device=dev) if lstm else input.new_empty(0)
    if f32_io:
        hp, hn = _rows32(hx), h
        cp, cn = (_rows32(cx), c) if lstm else (None, None)
    else:
        hp, hn = v["hp"], v["h"]
        hp.copy_(hx)
        cp, cn = (v["cp"], v["c"]) if lstm else (None, None)
        if lstm:
            cp.copy_(cx)
    xg = v["gates"] if "gates" in v else hn  # the Elman cell: each element read, then h' written over it
    tf32 = tf32_allowed(dt)
    K.matmul(input, w_ih.t(), xg[:, :GATES[mode] * H], bias1=b_ih, bias2=b_hh if mode != "gru" else None,
             dot=_dot_code(input.dtype, w_ih.dtype, tf32=tf32))
    K.step_forward(mode, xg, hp, hn, cp, cn, w_hh, b_hh if mode == "gru" else None, h, None, None, -1,
                   _dot_code(w_hh.dtype, tf32=tf32))
    if lstm and not f32_io:
        c.copy_(cn)
    return h, c, reserve


def cell_mask(output_mask, mode: str, has_bias: bool) -> tuple:
    """The gradients :func:`rnn_cell_backward` computes, ``(dx, dh, dc, dw_ih, dw_hh, db_ih,
    db_hh)``: those ``output_mask`` asks for (None: all) that apply (dc an LSTM's, the biases'
    with biases)."""
    m = (True,) * 7 if output_mask is None else tuple(bool(b) for b in output_mask)
    if len(m) != 7:
        raise KernelInputError(f"rnn_cell_backward: output_mask has {len(m)} entries, expected 7 "
                               "(dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh)")
    return m[0], m[1], m[2] and mode == "lstm", m[3], m[4], m[5] and has_bias, m[6] and has_bias


def rnn_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, reserve, mode, output_mask=None):
    """``(dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh)``; ``dc`` and the bias gradients are empty
    ``[0]`` tensors where they do not apply, and so is every gradient ``output_mask`` (seven
    flags in that order; None: all) does not ask for, which is not computed (as torch's cells,
    whose autograd skips a frozen weight's product and a data input's). ``h, c, reserve`` are the
    forward's outputs; ``grad_c`` None: no gradient reached c'."""
    op = mode + "_cell_backward"
    mask = cell_mask(output_mask, mode, b_ih is not None)
    backend = _backend.resolve(op, input.device, BACKENDS, dtype=input.dtype)
    _check_cell_backward(op, grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, reserve, mode,
                         backend != "reference")
    if backend == "reference":
        return _reference_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode, mask)
    _backend.check_interpreter_dtype(op, backend, input)
    return _gpu_cell_backward(_impl(backend), mode, grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c,
                              reserve, mask)


def _reference_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode, mask=None):
    """``reference.rnn.cell_backward`` (the sequence reference's step backward on a recomputed
    step); absent gradients, and those ``mask`` (:func:`cell_mask`'s; None: all) leaves out, as
    empty ``[0]`` tensors."""
    dt, dev = input.dtype, input.device
    lstm = mode == "lstm"
    mask = cell_mask(mask, mode, b_ih is not None) if mask is None else mask
    grads = ref.cell_backward(
        mode, to_numpy(grad_h), to_numpy(grad_c) if lstm else None, to_numpy(input), to_numpy(hx), to_numpy(cx),
        to_numpy(w_ih), to_numpy(w_hh), to_numpy(b_ih), to_numpy(b_hh), need=mask)
    # each absent gradient its own empty tensor (outputs never alias)
    return tuple(from_numpy(g, dt, dev) if m else input.new_empty(0) for g, m in zip(grads, mask))


def _gpu_cell_backward(K, mode, grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, reserve, mask=None):
    """One ``K.step_backward`` (no carry in: dh = grad_h; the gate gradients dG, dc = dc_prev, the
    carry = the part of dh_prev that bypasses W_hh, zero but for the GRU), then the GEMMs: dh =
    (carry +) dG_hh W_hh, dx = dG W_ih, dW_ih = dG^T x, dW_hh = dG_hh^T h, and the bias gradients
    as two column sums. Nine launches with float32 row-contiguous states and gradients, fewer
    where ``mask`` (:func:`cell_mask`'s; None: all) leaves gradients out: each GEMM and the column sums only
    for a gradient asked for (dc comes from the step's own launch; one not asked for is dropped)."""
    mask = cell_mask(mask, mode, b_ih is not None) if mask is None else mask
    need_x, need_h, need_c, need_wih, need_whh, need_b = *mask[:5], mask[5] or mask[6]
    B, I = input.shape
    H = w_hh.shape[1]
    dt, dev = input.dtype, input.device
    f32 = torch.float32
    f32_io = dt == f32
    lstm, gru = mode == "lstm", mode == "gru"
    # the kernels index the reserve and the saved h' / c' as dense [B, H] rows: the forward's own
    # are; a direct call's strided or expanded ones are made so (they were read as dense)
    v = _cell_views(reserve.contiguous(), mode, B, H, f32_io)
    GH = GATES[mode] * H
    if f32_io:
        hp = _rows32(hx) if gru else None
        hn = h.contiguous() if mode in ("rnn_tanh", "rnn_relu") else None
        cp, cn = (_rows32(cx), c.contiguous()) if lstm else (None, None)
    else:
        hp, hn = v["hp"], v["h"]
        cp, cn = (v["cp"], v["c"]) if lstm else (None, None)
    dGi = empty((B, GH), dtype=f32, device=dev)
    dGh = empty((B, GH), dtype=f32, device=dev) if gru else dGi
    carry = empty((B, H), dtype=f32, device=dev)
    dc32 = empty((B, H), dtype=f32, device=dev) if lstm else None
    dc_in = _rows32(grad_c) if (lstm and grad_c is not None) else None
    tf32 = tf32_allowed(dt)
    wdot = _dot_code(w_hh.dtype, tf32=tf32)
    K.step_backward(mode, None, w_hh, carry, dc32, _unit_cols(grad_h), v.get("gates"), hp, hn, cp, cn, dGi, dGh, None,
                    None, -1, wdot, has_carry=False, dc_in=dc_in)
    # what is not asked for: empty placeholders, each its own tensor (outputs never alias), none a launch
    dh = dx = dw_ih = dw_hh = db_ih = db_hh = None
    if not need_h:
        pass
    elif gru:  # dh = carry (dh * z) + dG_hh W_hh, in float32
        K.matmul(dGh, w_hh, carry, acc=True, dot=wdot)
        dh = carry if f32_io else carry.to(dt)
    else:  # the carry is zero: dh = dG W_hh, straight into the io dtype
        dh = empty((B, H), dtype=dt, device=dev)
        K.matmul(dGh, w_hh, dh, dot=wdot)
    if need_x:
        dx = empty((B, I), dtype=dt, device=dev)
        K.matmul(dGi, w_ih, dx, dot=_dot_code(w_ih.dtype, tf32=tf32))
    if need_wih:
        dw_ih = empty(w_ih.shape, dtype=w_ih.dtype, device=dev)
        K.matmul(dGi.t(), input, dw_ih, dot=_dot_code(input.dtype, tf32=tf32))
    if need_whh:
        hprev = hx if f32_io else v["hp"]  # float32 h: the TF32 product of two float32 operands, as the sequence's
        dw_hh = empty(w_hh.shape, dtype=w_hh.dtype, device=dev)
        K.matmul(dGh.t(), hprev, dw_hh, dot=_dot_code(hprev.dtype, tf32=tf32))
    if need_b:
        db_ih = empty(b_ih.shape, dtype=b_ih.dtype, device=dev)
        db_hh = empty(b_hh.shape, dtype=b_hh.dtype, device=dev)
        # one launch: Elman / LSTM have one gate gradient (b_ih's and b_hh's gradients are one
        # sum), the GRU two (summed in the same pass)
        K.colsum(dGi, db_ih, db_hh, None if dGh is dGi else dGh)
    dc = (dc32 if f32_io else dc32.to(dt)) if need_c else None
    return tuple(g if m and g is not None else input.new_empty(0)
                 for g, m in zip((dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh), mask))


def _check_cell_op(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
    """The cell op's own checks (the public cells' :func:`_check_cell`, on the batched call the op
    takes: ``hx`` given, an LSTM's ``cx`` too, both biases or neither), so that a direct call of
    ``torch.ops.gpu_nn.rnn_cell`` is refused as the public cells refuse it, not indexed past its
    tensors by the kernels. The usual call costs :func:`_cell_usual`'s comparisons."""
    if mode not in MODES:
        raise KernelInputError(f"{op}: unknown mode {mode!r}; expected one of {MODES}")
    # (the devices first, on every call: a kernel handed another device's pointer faults)
    _check_devices(input, [hx, cx], [w_ih, w_hh, b_ih, b_hh], cell=True)
    if _cell_usual(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode) and (cx is not None or mode != "lstm"):
        return
    if mode == "lstm" and cx is None:
        raise KernelInputError(f"{op}: lstm needs a cell state")
    if (b_ih is None) != (b_hh is None):
        raise KernelInputError(f"{op}: both biases or neither")
    _check_cell(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode)


def _check_cell_backward(op, grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, reserve, mode, gpu):
    """The cell backward op's checks: the forward's inputs as the forward checks them, then what
    the kernels read by those sizes: ``grad_h`` (and an LSTM's ``grad_c``, when given) ``[B, H]``
    on the input's device, the reserve's size, and ``h`` / ``c``, each ``[B, H]`` or an empty
    placeholder (the autograd wrapper saves only what the backward reads: on a GPU backend
    (``gpu``) a float32 Elman cell's h', a float32 LSTM's c', which must then be ``[B, H]``). A
    direct call of ``torch.ops.gpu_nn.rnn_cell_backward`` with a gradient of another batch read
    past its end."""
    _check_cell_op(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode)
    B, H = input.shape[0], w_hh.shape[1]
    f32_io = input.dtype == torch.float32
    # h' / c' may be empty placeholders where the kernels do not read them
    placeholder = {"h": not (gpu and f32_io and mode.startswith("rnn")), "c": not (gpu and f32_io and mode == "lstm")}
    tensors = [("grad_h", grad_h), ("h", h), ("c", c)] + ([("grad_c", grad_c)] if mode == "lstm" else [])
    for name, t in tensors:
        if t is None and name == "grad_c":
            continue
        if not isinstance(t, Tensor) or (tuple(t.shape) != (B, H) and not (placeholder.get(name) and t.numel() == 0)):
            got = list(t.shape) if isinstance(t, Tensor) else type_name(t)
            raise KernelInputError(f"{op}: {name} must have shape {[B, H]}, got {got}")
        check_same_device(input, t)
    _, size = cell_reserve_layout(mode, B, H, f32_io)
    if not isinstance(reserve, Tensor) or reserve.numel() != size or reserve.device != input.device:
        raise KernelInputError(f"{op}: reserve must be the forward's ({size} elements on {input.device})")


def _cell_usual(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode) -> bool:
    """The usual call, accepted in a few comparisons (this runs on every cell step): tensors of
    one dtype, ``input [B, I]``, ``hx`` (and ``cx``) ``[B, H]``, ``w_ih [G H, I]``, ``w_hh [G H, H]``,
    both biases ``[G H]`` or neither. False sends the call through every check of
    :func:`_check_cell`, which words the error (or accepts what this does not cover)."""
    if not (isinstance(input, Tensor) and isinstance(hx, Tensor) and isinstance(w_ih, Tensor)
            and isinstance(w_hh, Tensor)) or w_hh.dim() != 2:
        return False
    H = w_hh.shape[1]
    G = GATES[mode] * H
    s = input.shape
    dt = input.dtype
    if (len(s) != 2 or hx.shape != (s[0], H) or w_ih.shape != (G, s[1]) or w_hh.shape != (G, H)
            or hx.dtype != dt or w_ih.dtype != dt or w_hh.dtype != dt):
        return False
    if cx is not None and not (isinstance(cx, Tensor) and cx.shape == (s[0], H) and cx.dtype == dt):
        return False
    if b_ih is None or b_hh is None:
        return b_ih is None and b_hh is None
    return (isinstance(b_ih, Tensor) and isinstance(b_hh, Tensor) and b_ih.shape == (G,) and b_hh.shape == (G,)
            and b_ih.dtype == dt and b_hh.dtype == dt)


def _check_cell(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
    if _cell_usual(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
        return
    for pos, (name, t) in enumerate((("input", input), ("hx", hx), ("w_ih", w_ih), ("w_hh", w_hh)), 1):
        check_tensor(op, name, t, pos)
    if input.dim() != 2:
        raise KernelInputError(f"{op}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    H = w_hh.shape[-1]
    G = GATES[mode] * H
    if w_ih.dim() != 2 or w_ih.shape[0] != G or w_hh.dim() != 2 or tuple(w_hh.shape) != (G, H):
        raise KernelInputError(f"{op}: weights of shape {list(w_ih.shape)} and {list(w_hh.shape)} do not fit a {mode} cell")
    if input.shape[1] != w_ih.shape[1]:
        raise KernelInputError(f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}")
    for i, t in enumerate((hx, cx)):
        if t is None:
            continue
        # torch's order: the batch size, then the hidden size, then the rank; its sizes read as
        # size(0) and size(1), which raise IndexError where the state has no such dim
        if t.dim() == 0:
            raise KernelInputIndexError("Dimension specified as 0 but tensor has no dimensions")
        if t.shape[0] != input.shape[0]:
            raise KernelInputError(f"Input batch size {input.shape[0]} doesn't match hidden{i} batch size {t.shape[0]}")
        if t.dim() < 2:
            raise KernelInputIndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
        if t.shape[1] != H:
            raise KernelInputError(f"hidden{i} has inconsistent hidden_size: got {t.shape[1]}, expected {H}")
        if t.dim() != 2:
            raise KernelInputError(f"{op}: Expected hidden{i} to be 2D, got {t.dim()}D instead")
    # (devices: _check_devices, which _cell calls first, has refused any other device already)
    # dtypes: torch's words where torch refuses (its two linears, input's first: addmm(b, x, w^T),
    # or mm without a bias), ours where it would compute in a promoted dtype and we do not
    for x, w, b in ((input, w_ih, b_ih), (hx, w_hh, b_hh)):
        msg = linear_dtype_message(x, w, b)
        if msg is not None:
            raise KernelInputError(msg)
    dt = input.dtype
    for name, t in (("hx", hx), ("cx", cx), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)):
        if t is not None and (w_ih.dtype != dt or t.dtype != dt):
            raise KernelInputError(
                f"{op}: input dtype ({input.dtype}), weight dtype ({w_ih.dtype}) and {name} dtype ({t.dtype}) must be "
                "the same (torch computes this mix in the promoted dtype; gpu-nn's cells take one dtype)"
            )
    if any(b is not None and tuple(b.shape) != (G,) for b in (b_ih, b_hh)):
        # (both or neither: _cell fills in a missing one, as torch's cells take either alone).
        # torch's words: its linears broadcast each bias to [B, G] (the hidden one first, the
        # input one first in a GRU), so torch is asked on stand-ins; a bias it broadcasts that
        # differs from row to row, which ours do not take, gets our words
        raise torchs_own_error(
            lambda: _TORCH_CELLS[mode](*map(stand_in, (input, hx, cx, w_ih, w_hh, b_ih, b_hh))),
            f"{op}: a bias of shape {[list(b.shape) for b in (b_ih, b_hh) if tuple(b.shape) != (G,)][0]} where "
            f"[{G}] is expected (torch's cells broadcast a bias to [batch, {G}]; gpu-nn's take one bias for every "
            "row)", KernelInputError)


# torch's own cells (their functional forms), called with (input, hx, cx, w_ih, w_hh, b_ih, b_hh)
_TORCH_CELLS = {
    "rnn_tanh": lambda x, h, c, *w: torch._VF.rnn_tanh_cell(x, h, *w),
    "rnn_relu": lambda x, h, c, *w: torch._VF.rnn_relu_cell(x, h, *w),
    "lstm": lambda x, h, c, *w: torch._VF.lstm_cell(x, (h, c), *w),
    "gru": lambda x, h, c, *w: torch._VF.gru_cell(x, h, *w),
}


def _one_bias(b, G: int):
    """A bias torch's cells take by broadcasting it to ``[B, G]`` that is the same for every row
    (0-d, ``[1]``, ``[1, G]``, ``[1, 1]``) as the ``[G]`` ours take (a view, expanded and made
    dense: autograd sums its gradient back); anything else as it is (:func:`_check_cell` words
    it)."""
    if (isinstance(b, Tensor) and tuple(b.shape) != (G,) and b.dim() <= 2 and b.shape[-1:] in ((), (1,), (G,))
            and b.shape[:-1] in ((), (1,))):
        return b.reshape(-1).expand(G).contiguous()
    return b


@routed
@torch.library.custom_op("gpu_nn::rnn_cell", mutates_args=())
@on_device
def _rnn_cell_op(input: Tensor, hx: Tensor, cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                 b_hh: Optional[Tensor], mode: str) -> tuple[Tensor, Tensor, Tensor]:
    return rnn_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode)


@_rnn_cell_op.register_fake
def _(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode):
    B, H = hx.shape
    res = hx.new_empty(cell_reserve_layout(mode, B, H, input.dtype == torch.float32)[1], dtype=torch.float32)
    return hx.new_empty(hx.shape), (hx.new_empty(hx.shape) if mode == "lstm" else hx.new_empty(0)), res


@routed
@torch.library.custom_op("gpu_nn::rnn_cell_backward", mutates_args=())
@on_device
def _rnn_cell_backward_op(grad_h: Tensor, grad_c: Optional[Tensor], input: Tensor, hx: Tensor, cx: Optional[Tensor],
                          w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], h: Tensor,
                          c: Tensor, reserve: Tensor, mode: str, output_mask: Optional[list[bool]] = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return rnn_cell_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, reserve, mode, output_mask)


@_rnn_cell_backward_op.register_fake
def _(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, reserve, mode, output_mask=None):
    mask = cell_mask(output_mask, mode, b_ih is not None)
    return tuple(like.new_empty(like.shape) if m else input.new_empty(0)
                 for like, m in zip((input, hx, hx, w_ih, w_hh, b_ih, b_hh), mask))


def _cell_setup(ctx, inputs, output):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode = inputs
    ctx.mode = mode
    ctx.has_b = b_ih is not None
    ctx.has_cx = cx is not None
    # no zero tensors for the gradients that do not come (the reserve's never does; c' often
    # does not): the backward takes None
    ctx.set_materialize_grads(False)
    # the outputs the backward reads, and only those (as torch's cells, a GRU's h' or an LSTM's
    # h' may then be changed in place before backward): the Elman cells' h' (their activation's
    # derivative, as torch's), a float32 LSTM's c' on the GPU backends (their kernels' tanh(c'), as
    # torch's fused CUDA cell saves it; half dtypes keep a copy in the reserve). The reference
    # recomputes the step and reads neither: on a CPU, c' may be changed in place, as torch's CPU
    # cell allows
    h, c, reserve = output
    keep_c = (mode == "lstm" and input.dtype == torch.float32
              and _backend.resolve("lstm_cell_backward", input.device, BACKENDS, dtype=input.dtype) != "reference")
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, h if mode.startswith("rnn") else None,
                          c if keep_c else None, reserve)


def _cell_backward(ctx, g_h, g_c, _g_res):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, reserve = ctx.saved_tensors
    mode = ctx.mode
    if h is None or c is None:  # not saved (not read): empty placeholders for the op's arguments
        h = reserve.new_empty(0) if h is None else h
        c = reserve.new_empty(0) if c is None else c
    # the gradients this backward uses (a data input's, a frozen weight's, a zero state's are not
    # computed), in the op's output order (dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh)
    needs = wanted(ctx)
    mask = [bool(needs[0]), bool(needs[1]), mode == "lstm" and ctx.has_cx and bool(needs[2]), bool(needs[3]),
            bool(needs[4]), ctx.has_b and bool(needs[5]), ctx.has_b and bool(needs[6])]
    if (g_h is None and g_c is None) or not any(mask):
        return (None,) * 8
    if g_h is None:  # only c' reached the loss
        g_h = torch.zeros_like(hx)
    if mode != "lstm" or (g_c is not None and maybe_empty(g_c)):
        g_c = None
    grads = _rnn_cell_backward_op(
        g_h, g_c, input, hx, cx if ctx.has_cx else None, w_ih, w_hh, b_ih if ctx.has_b else None,
        b_hh if ctx.has_b else None, h, c, reserve, mode, mask,
    )
    return (*(g if m else None for g, m in zip(grads, mask)), None)


_rnn_cell_op.register_autograd(_cell_backward, setup_context=_cell_setup)


def _compose_under_vmap() -> bool:
    """``GPU_NN_RNN_VMAP_COMPOSE=1`` and a vmap transform active: the recurrent functions run
    their composition, whose ops all fold the batch (per-sample gradients of an LSTM as a few
    launches per step for the whole batch), instead of the fused op once per element. Opt-in
    until a GPU measures the two (bench_func's 'per-sample lstm'): on the CPU machine the
    reference took 112 ms against 10.4 looped (8 sequences of 20 steps, func_52b4f24_passive.json;
    111 against 131 before the loop's backward took the fused op, func_ade37ab.json)."""
    return vmap_active() and env_switch("GPU_NN_RNN_VMAP_COMPOSE") is True


def _cell_compose(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    from .dense import _linear_op as linear

    return _step_compose(mode, linear(input, w_ih, b_ih, None), linear(hx, w_hh, b_hh, None), hx, cx)


def _cell_bwd_setup(ctx, inputs, output):
    grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh, h, c, reserve, mode, output_mask = inputs
    ctx.mode = mode
    ctx.mask = cell_mask(output_mask, mode, b_ih is not None)
    ctx.save_for_backward(grad_h, grad_c, input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def _cell_backward_backward(ctx, *gg):
    """Double backward of rnn_cell_backward by recomputation (ops/_autograd.py): the step
    rebuilt from our linear and activation ops, differentiated twice. The forward's outputs
    that the backward takes (h', c', the reserve) get no gradient of their own: they are
    functions of the primals, whose whole dependence the recomputation differentiates."""
    from ._autograd import recompute_double_backward

    grad_h, grad_c, *prims = ctx.saved_tensors
    mode = ctx.mode
    lstm = mode == "lstm"
    # the backward's results in order (dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh) are the
    # gradients of the primals (input, hx, cx, w_ih, w_hh, b_ih, b_hh); dc and the biases' are
    # empty placeholders where the primal is absent, and so is every result the mask left out
    wrt = [i for i, p in enumerate(prims) if p is not None and (i != 2 or lstm) and ctx.mask[i]]
    d_cot, d_prims = recompute_double_backward(
        lambda *p: _cell_compose(mode, *p), prims, wrt, [grad_h, grad_c if lstm else None], [gg[i] for i in wrt])
    return (d_cot[0], d_cot[1], *d_prims, None, None, None, None, None)


# double backward (create_graph=True): the backward op is differentiable too
_rnn_cell_backward_op.register_autograd(_cell_backward_backward, setup_context=_cell_bwd_setup)


# ----------------------------------------------------------------------------------------------
# public functions


def _lstm_state(op, hx):
    """``(h, c)`` from an LSTM state argument, refused as torch refuses it: a single tensor (which
    would unpack along its first dimension) is a TypeError, a sequence of another length an error."""
    if isinstance(hx, Tensor) or not isinstance(hx, (tuple, list)):
        raise HiddenStateTypeError(
            f"{op}(): argument 'hx' (position 2) must be tuple of Tensors, not {type_name(hx)}"
        )
    if len(hx) != 2:
        raise KernelInputError(f"{op} expects two hidden states")
    for i, t in enumerate(hx):
        if not isinstance(t, Tensor):  # torch's parser on a tuple of Tensors (hx is its argument 1)
            raise HiddenStateTypeError(f"expected Tensor as element {i} in argument 1, but got {type_name(t)}")
    return hx[0], hx[1]


def _cell(op, mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    check_tensor(op, "input", input, 1)
    batched = input.dim() == 2
    if input.dim() not in (1, 2):
        raise KernelInputError(f"{op}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    _check_devices(input, [hx, cx], [w_ih, w_hh, b_ih, b_hh], cell=True)
    if not batched:
        input = input[None]
        hx = None if hx is None else hx[None]
        cx = None if cx is None else cx[None]
    # torch's CPU autocast lists the Elman cells but not lstm_cell / gru_cell (see autocast_inputs)
    input, hx, cx, w_ih, w_hh, b_ih, b_hh = autocast_inputs("lower", input, hx, cx, w_ih, w_hh, b_ih, b_hh,
                                                            cpu=None if mode.startswith("rnn") else "promote",
                                                            state=cx if mode == "lstm" else hx)
    H = w_hh.shape[-1]
    if hx is None:
        hx = input.new_zeros((input.shape[0], H))
    if mode == "lstm" and cx is None:
        cx = input.new_zeros((input.shape[0], H))
    G = GATES[mode] * H if isinstance(H, int) else None
    if G is not None:
        b_ih, b_hh = _one_bias(b_ih, G), _one_bias(b_hh, G)
    if (b_ih is None) != (b_hh is None):  # torch's cells take either bias alone (its linear's None)
        b_ih, b_hh = (torch.zeros_like(b_hh), b_hh) if b_ih is None else (b_ih, torch.zeros_like(b_ih))
    _check_cell(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode)
    if tangents_in_play((input, hx, cx, w_ih, w_hh, b_ih, b_hh)) or _compose_under_vmap():
        # forward-mode AD: the step as a composition of our linear and activation ops (each
        # with its jvp rule), which the fused cell op has none of
        h, c = _cell_compose(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    else:
        h, c, _ = _rnn_cell_op(input, hx, cx, w_ih, w_hh, b_ih, b_hh, mode)
    if not batched:
        h, c = h[0], (c[0] if mode == "lstm" else c)
    return h, c


def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = tanh(input W_ih^T + b_ih + hx W_hh^T + b_hh); ``input [B, I]`` or ``[I]``."""
    if _has_tf(input, hx, w_ih, w_hh, b_ih, b_hh):
        return _tf(rnn_tanh_cell, input, hx, w_ih, w_hh, b_ih, b_hh)
    return _cell("rnn_tanh_cell", "rnn_tanh", input, hx, None, w_ih, w_hh, b_ih, b_hh)[0]


def rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """h' = relu(input W_ih^T + b_ih + hx W_hh^T + b_hh); ``input [B, I]`` or ``[I]``."""
    if _has_tf(input, hx, w_ih, w_hh, b_ih, b_hh):
        return _tf(rnn_relu_cell, input, hx, w_ih, w_hh, b_ih, b_hh)
    return _cell("rnn_relu_cell", "rnn_relu", input, hx, None, w_ih, w_hh, b_ih, b_hh)[0]


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One LSTM step (gate order i, f, g, o); ``hx = (h, c)`` or None -> ``(h', c')``."""
    if _has_tf(input, hx, w_ih, w_hh, b_ih, b_hh):
        return _tf(lstm_cell, input, hx, w_ih, w_hh, b_ih, b_hh)
    h, c = (None, None) if hx is None else _lstm_state("lstm_cell", hx)
    return _cell("lstm_cell", "lstm", input, h, c, w_ih, w_hh, b_ih, b_hh)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step, n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h."""
    if _has_tf(input, hx, w_ih, w_hh, b_ih, b_hh):
        return _tf(gru_cell, input, hx, w_ih, w_hh, b_ih, b_hh)
    return _cell("gru_cell", "gru", input, hx, None, w_ih, w_hh, b_ih, b_hh)[0]


def draw_dropout_masks(p: float, num_layers: int, T: int, B: int, width: int, like: Tensor,
                       lengths: Tensor | None = None) -> Tensor | None:
    """Inverted-dropout masks ``[L - 1, T, B, width]`` drawn with torch's RNG (values 0 or 1/(1-p)),
    as torch's layers draw them on the CPU: one draw per layer over its output, which for
    sequences of ``lengths`` (a packed input) is the packed data, ``sum(lengths)`` rows in time-major
    order, so the same seed gives torch's masks and leaves the generator where torch's leaves it
    (the steps past a sequence's end, which no output reads, mask 0)."""
    if num_layers < 2 or p <= 0:
        return None
    if p >= 1:
        return like.new_zeros((num_layers - 1, T, B, width))
    if lengths is None:
        keep = torch.empty((num_layers - 1, T, B, width), dtype=like.dtype, device=like.device).bernoulli_(1 - p)
        return keep.div_(1 - p)
    # the packed rows' places in [T * B], time-major, found on the host (lengths are a CPU
    # tensor): a boolean mask on the device would cost a nonzero() and its host synchronisation
    # (and break a CUDA graph's capture), a pageable copy another
    live = _steps_alive(lengths, T).reshape(-1).nonzero().reshape(-1)
    keep = torch.empty((num_layers - 1, live.numel(), width), dtype=like.dtype, device=like.device).bernoulli_(1 - p)
    masks = like.new_zeros((num_layers - 1, T, B, width))
    masks.view(num_layers - 1, T * B, width).index_copy_(1, _backend.to_device_async(live, like.device),
                                                          keep.div_(1 - p))
    return masks


def _seq(mode, input, hx, cx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
         dropout_masks):
    check_tensor(mode, "input", input, 1)
    if mode != "lstm":  # (the LSTM's pair: _lstm_state)
        check_tensor(mode, "hx", hx, 2)
    for i, w in enumerate(params):  # torch's parser on its TensorList (a module's weight set to None)
        if not isinstance(w, Tensor):
            raise KernelInputTypeError(f"expected Tensor as element {i} in argument 2, but got {type_name(w)}")
    if input.dim() != 3:
        raise KernelInputError(f"{mode}: input must have 3 dimensions, got {input.dim()}")
    _check_devices(input, [hx, cx], params)
    # torch's CPU autocast casts the Elman sequences and the LSTM's oneDNN (mkldnn) path, not GRU's
    # (see autocast_inputs); an LSTM oneDNN does not take runs torch's native path, whose matmuls
    # alone are autocast (_lstm_cpu_autocast)
    native = mode == "lstm" and _lstm_cpu_autocast(input, hx, cx, lengths)
    in_dtype = input.dtype
    input, hx, cx, *params = autocast_inputs("lower", input, hx, cx, *params,
                                             cpu="promote" if mode == "gru" or native else None,
                                             state=cx if mode == "lstm" else hx)
    x = input.transpose(0, 1) if batch_first else input
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = hx.shape[-1]
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    if dropout_masks is None and train and num_layers > 1 and dropout != 0:
        p = float(dropout)
        if not 0 <= p <= 1:  # torch's dropout between the layers (a module's dropout set after construction)
            raise KernelInputError(f"dropout probability has to be between 0 and 1, but got {p:g}")
        # (lengths the op refuses draw as a padded batch: the op's check words the refusal)
        ok = lengths is None or (lengths.dim() == 1 and lengths.shape[0] == B
                                 and (B == 0 or 0 <= int(lengths.min()) and int(lengths.max()) <= T))
        dropout_masks = draw_dropout_masks(p, num_layers, T, B, D * H, x, lengths if ok else None)
    if not train:
        dropout_masks = None
    if tangents_in_play((x, hx, cx, *params)) or _compose_under_vmap():
        # forward-mode AD: the layers as a composition of our linear and activation ops over the
        # steps (each with its jvp rule), which the fused sequence op has none of
        out, hn, cn = _seq_compose(mode, int(num_layers), bool(bidirectional), bool(has_biases), lengths, dropout_masks,
                                   x.contiguous(), hx, cx, *params)
        cn = x.new_empty(0) if cn is None else cn
    else:
        out, hn, cn, _ = _rnn_seq_op(x.contiguous(), hx, cx, list(params), mode, int(num_layers), bool(bidirectional),
                                     bool(has_biases), lengths, dropout_masks)
    if batch_first:
        out = out.transpose(0, 1)
    if native and hn.shape[-1] != cn.shape[-1] and in_dtype != torch.float64:
        # torch's native projected LSTM: the output and h come out of the projection's autocast
        # matmul (the autocast dtype), c out of the cell's elementwise math (the promoted dtype)
        low = torch.get_autocast_dtype("cpu")
        out, hn = out.to(low), hn.to(low)
    return out, hn, cn


def _lstm_cpu_autocast(input: Tensor, hx, cx, lengths) -> bool:
    """Whether an LSTM sequence inside a CPU autocast region runs as torch's native LSTM does
    there: packed (lengths), projected (h narrower than c) or an input oneDNN does not take
    (neither float32 nor bfloat16, or bfloat16 where this CPU's oneDNN lacks it): torch then
    autocasts only the inner matmuls, so its results come out in the autocast dtype promoted with
    the state's (c's; float32 for a float32 state) and, with a projection, the output and h in the
    autocast dtype (the projection is a matmul) and c promoted. Otherwise torch's oneDNN LSTM runs in the autocast dtype, as the Elman sequences."""
    if input.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    projected = isinstance(hx, Tensor) and isinstance(cx, Tensor) and hx.shape[-1] != cx.shape[-1]
    return lengths is not None or projected or not _onednn_takes(input.dtype)


def _onednn_takes(dtype: torch.dtype) -> bool:
    """Whether torch's CPU LSTM would run an input of ``dtype`` through oneDNN (its ``use_mkldnn``:
    oneDNN built in and enabled, a float32 input, or a bfloat16 one where this CPU has oneDNN's
    bfloat16 support: AVX-512 on x86, not an AVX2-only CPU, where torch runs it natively)."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    # (oneDNN built in: a constant read at import; torch.backends.mkldnn.is_available() is a
    # function Dynamo refuses to trace, which broke torch.compile(fullgraph) of an LSTM under
    # CPU autocast)
    if not _MKLDNN_BUILT or not (torch.backends.mkldnn.enabled or torch.compiler.is_exporting()):
        # (torch.export turns oneDNN off while it traces; the program it exports runs torch's
        # LSTM with the flag as it is then, on by default: read as on there, so an LSTM exported
        # under CPU autocast keeps the dtype eager gives, not float32; a compile audit. Ours
        # decides when traced, torch's when run: a program exported, and run, with oneDNN turned
        # off by the user gives bfloat16 where torch's gives float32, a re-read found; the flag
        # as the user set it is not visible while export traces)
        return False
    return dtype == torch.float32 or _mkldnn_bf16()


_MKLDNN_BUILT = torch.backends.mkldnn.is_available()


@functools.lru_cache(maxsize=1)
def _mkldnn_bf16() -> bool:
    """This CPU's oneDNN bfloat16 support, as torch's ``mkldnn_bf16_device_check`` (fixed for the
    process)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def rnn_tanh(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
             batch_first=False, lengths=None, dropout_masks=None):
    """Multi-layer Elman RNN with tanh over a whole sequence -> ``(output, h_n)``; as ``torch.rnn_tanh``."""
    if _has_tf(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
               dropout_masks):
        return _tf(rnn_tanh, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                   lengths, dropout_masks)
    if isinstance(params, Tensor):  # torch's packed overload: (data, batch_sizes, hx, params, ...)
        return _packed_overload("rnn_tanh", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                batch_first)
    out, hn, _ = _seq("rnn_tanh", input, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                      batch_first, lengths, dropout_masks)
    return out, hn


def rnn_relu(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
             batch_first=False, lengths=None, dropout_masks=None):
    """Multi-layer Elman RNN with relu over a whole sequence -> ``(output, h_n)``; as ``torch.rnn_relu``."""
    if _has_tf(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
               dropout_masks):
        return _tf(rnn_relu, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                   lengths, dropout_masks)
    if isinstance(params, Tensor):  # torch's packed overload: (data, batch_sizes, hx, params, ...)
        return _packed_overload("rnn_relu", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                batch_first)
    out, hn, _ = _seq("rnn_relu", input, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                      batch_first, lengths, dropout_masks)
    return out, hn


def gru(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
        batch_first=False, lengths=None, dropout_masks=None):
    """Multi-layer GRU over a whole sequence -> ``(output, h_n)``; as ``torch.gru``."""
    if _has_tf(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
               dropout_masks):
        return _tf(gru, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
                   dropout_masks)
    if isinstance(params, Tensor):  # torch's packed overload: (data, batch_sizes, hx, params, ...)
        return _packed_overload("gru", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                batch_first)
    out, hn, _ = _seq("gru", input, hx, None, params, has_biases, num_layers, dropout, train, bidirectional,
                      batch_first, lengths, dropout_masks)
    return out, hn


def lstm(input, hx, params, has_biases=True, num_layers=1, dropout=0.0, train=False, bidirectional=False,
         batch_first=False, lengths=None, dropout_masks=None):
    """Multi-layer LSTM over a whole sequence, ``hx = (h0, c0)`` -> ``(output, h_n, c_n)``; as ``torch.lstm``.
    A projected LSTM (``h0`` narrower than ``c0``) takes ``w_hr`` after each layer's biases in ``params``."""
    if _has_tf(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
               dropout_masks):
        return _tf(lstm, input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first, lengths,
                   dropout_masks)
    if isinstance(hx, Tensor) and isinstance(params, (tuple, list)) and all(isinstance(t, Tensor) for t in params):
        # torch's packed overload: (data, batch_sizes, (h0, c0), params, ...)
        return _packed_overload("lstm", input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
                                batch_first)
    h0, c0 = _lstm_state("lstm", hx)
    return _seq("lstm", input, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
                lengths, dropout_masks)


def _packed_overload(mode, data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional):
    """torch.lstm / gru / rnn_tanh / rnn_relu's packed overload, ``(data, batch_sizes, hx, params,
    has_biases, num_layers, dropout, train, bidirectional)``, as torch's recurrent modules call it:
    the packed rows (sorted, longest first, as ``hx``'s batch is) run as the padded batch of their
    lengths, the output packed back -> ``(output data, h_n[, c_n])``."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

    x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
    h0, c0 = _lstm_state(mode, hx) if mode == "lstm" else (hx, None)
    out, hn, cn = _seq(mode, x, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, False,
                       lengths, None)
    out = pack_padded_sequence(out, lengths).data
    return (out, hn, cn) if mode == "lstm" else (out, hn)


SEQ_FUNCS = {"rnn_tanh": rnn_tanh, "rnn_relu": rnn_relu, "lstm": lstm, "gru": gru}
CELL_FUNCS = {"rnn_tanh": rnn_tanh_cell, "rnn_relu": rnn_relu_cell, "lstm": lstm_cell, "gru": gru_cell}


# ----------------------------------------------------------------------------------------------
# gpu-nn check


def _t(rng, *shape, grad=True, scale=1.0):
    return torch.from_numpy(rng.standard_normal(shape) * scale).requires_grad_(grad)


def _make_cell(mode, B=5, I=7, H=11, bias=True):
    G = GATES[mode] * H

    def make(rng):
        s = H ** -0.5
        x, h = _t(rng, B, I), _t(rng, B, H)
        ws = [_t(rng, G, I, scale=s), _t(rng, G, H, scale=s)] + ([_t(rng, G, scale=s), _t(rng, G, scale=s)] if bias else [])
        hx = (h, _t(rng, B, H)) if mode == "lstm" else h
        return (x, hx, *ws), {}

    return make


def _make_seq(mode, T=4, B=3, I=5, H=9, L=2, bi=True, lengths=(4, 2, 3), P=0):
    """A sequence case; ``P > 0``: an LSTM with projections of size P."""
    G = GATES[mode] * H
    D = 2 if bi else 1
    W = P or H

    def make(rng):
        s = H ** -0.5
        x = _t(rng, T, B, I)
        h0 = _t(rng, L * D, B, W)
        hx = (h0, _t(rng, L * D, B, H)) if mode == "lstm" else h0
        params = []
        for l in range(L):
            for _ in range(D):
                params += [_t(rng, G, I if l == 0 else D * W, scale=s), _t(rng, G, W, scale=s), _t(rng, G, scale=s),
                           _t(rng, G, scale=s)] + ([_t(rng, P, H, scale=s)] if P else [])
        kw = {"lengths": torch.tensor(lengths)} if lengths is not None else {}
        return (x, hx, params, True, L, 0.0, False, bi, False), kw

    return make


def own_state_pairs(mode, x, hx, params, num_layers, bidirectional, has_biases, lengths, masks, out, hn, reserve,
                    gouts, grads):
    """``[(what, ours, want)]`` of a sequence run of an Elman RNN or a GRU (no cell state):
    ``x``, ``hx``, ``params``, ``masks`` the inputs as the backend got them (time major, in its
    dtype), ``out``, ``hn``, ``reserve`` what ``gpu_nn::rnn_seq`` returned, ``grads`` the
    gradients of ``x``, ``hx`` and ``params`` for the output gradients ``gouts``. The outputs
    and the stored states (``h`` and ``x`` slots of the reserve) against the float64 reference
    forward; the gradients against the float64 reference backward *from the reserve the backend
    stored*.

    That is the well-posed comparison of the relu RNN's gradients in float16 / bfloat16: relu'
    jumps at 0, and a pre-activation within the half dots' rounding of 0 (about one unit in a
    thousand at bfloat16) may take the other branch than the float64 reference, which drops (or
    adds) a whole dh there and moves every gradient upstream of it far past any rounding bound,
    in any correct half-precision implementation (``gpu-nn check``'s rnn_relu cupy bfloat16 row
    on the H200: 0.60, from one unit whose float64 pre-activation is 3.6e-4 while the states'
    rounding is 5e-3). Given the branches the backend took (its stored h), its backward must
    match the reference to rounding, and its states must match the reference's."""
    assert mode != "lstm", "the reference forward here takes no cell state"
    import numpy as np

    def np64(t):
        return t.detach().to("cpu", torch.float64).numpy()

    T, B, _ = x.shape
    H, L, D = hx.shape[-1], num_layers, 2 if bidirectional else 1
    ws = _split([np64(p) for p in params], L, D, has_biases)
    lens = None if lengths is None else np.asarray(torch.as_tensor(lengths).cpu(), dtype=np.int64)
    mk = None if masks is None else np64(masks)
    x64 = np64(x)
    out_r, hn_r, _, res_r = ref.rnn_forward(mode, x64, np64(hx), None, ws, L, bidirectional, lens, mk)
    res = np64(reserve)
    pairs = [("output", out, out_r), ("h_n", hn, hn_r)]
    for key, (o, s) in ref.reserve_layout(mode, T, B, H, L, D)[0].items():
        if key[0] in ("h", "x"):
            pairs.append((f"stored {key}", res[o:o + math.prod(s)].reshape(s), res_r[o:o + math.prod(s)].reshape(s)))
    dx_r, dhx_r, _, dws_r = ref.rnn_backward(mode, np64(gouts[0]), np64(gouts[1]), None, x64, ws, res, L,
                                             bidirectional, lens, mk)
    want = [dx_r, dhx_r] + [g for k in range(L * D) for g in dws_r[k] if g is not None]
    assert len(grads) == len(want)
    pairs += [(f"grad {i}", a, b) for i, (a, b) in enumerate(zip(grads, want))]
    return [(what, torch.as_tensor(a), torch.from_numpy(np.asarray(b))) for what, a, b in pairs]


_RELU_SEQ = CheckCase(op="rnn_relu", make=_make_seq("rnn_relu"), fn=rnn_relu, backends=BACKENDS)


def _relu_seq_check(backend, device, dtype, rng):
    """rnn_relu's check: float32 / float64 the generic comparison; float16 / bfloat16 the outputs
    and states against the reference, the gradients against the reference backward from the
    backend's own stored states (:func:`own_state_pairs` says why). Same inputs and output
    gradients as the generic comparison draws."""
    if dtype not in (torch.float16, torch.bfloat16):
        return generic_error(_RELU_SEQ, backend, device, dtype, rng)
    (x, hx, params, has_biases, L, _, _, bi, _), kw = _RELU_SEQ.make(rng)
    seed = int(rng.integers(2**31))
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (x, hx, *params)]
    with _backend.backend(backend):
        out, hn, _, res = _rnn_seq_op(leaves[0], leaves[1], None, leaves[2:], "rnn_relu", L, bi, has_biases,
                                      kw.get("lengths"), None)
        gen = torch.Generator().manual_seed(seed)
        gouts = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in (out, hn)]
        grads = torch.autograd.grad((out, hn), leaves, gouts)
    pairs = own_state_pairs("rnn_relu", leaves[0], leaves[1], leaves[2:], L, bi, has_biases, kw.get("lengths"), None,
                            out, hn, res, gouts, grads)
    return max(_rel(a, b) for _, a, b in pairs)


CHECK_CASES = [
    CheckCase(op=f"{m}_cell", make=_make_cell(m), fn=CELL_FUNCS[m], backends=BACKENDS) for m in MODES
] + [
    CheckCase(op=m, make=_make_seq(m), fn=SEQ_FUNCS[m], backends=BACKENDS,
              run=_relu_seq_check if m == "rnn_relu" else None) for m in MODES
] + [CheckCase(op="lstm_proj", make=_make_seq("lstm", H=7, P=3), fn=lstm, backends=BACKENDS)]
