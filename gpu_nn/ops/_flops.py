"""Flop formulas of our matmul-shaped ops for ``torch.utils.flop_counter.FlopCounterMode``.

torch counts its own convolution and matmul ops (``aten.convolution``, ``aten.mm``, ...); a
model built from our layers calls ``gpu_nn::`` ops instead, which it would count as 0. Each
formula counts what torch counts for the same layer: 2 flops per multiply-add of the
convolution or matrix products (torch's own ``conv_flop_count`` and ``conv_backward_flop`` for
convolutions), nothing for bias, activation, softmax or pooling; a backward counts the input and
weight gradients it computes (twice the forward's products for the recurrent ops, and for linear
where both its input's and its weight's gradients are wanted).
"""

from __future__ import annotations

import math

import torch
from torch.utils import flop_counter as _fc

_ops = torch.ops.gpu_nn


@_fc.register_flop_formula(_ops.conv_forward)
def _conv_forward(x_shape, w_shape, _bias, _stride, _padding, _dilation, _groups, _activation, *, out_shape, **kwargs):
    return _fc.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


@_fc.register_flop_formula(_ops.conv_backward)
def _conv_backward(grad_out_shape, x_shape, w_shape, _output, stride, padding, dilation, groups, _activation,
                   output_mask, *, out_shape, **kwargs):
    # output_mask: (input, weight, bias) gradients wanted, as aten.convolution_backward's
    # (torch's formula as registered: it takes its output as out_val, shapes passing through)
    return _fc.conv_backward_flop(grad_out_shape, x_shape, w_shape, None, stride, padding, dilation, False,
                                  [0] * len(stride), groups, list(output_mask), out_val=out_shape)


def _linear(x_shape, w_shape) -> int:
    rows = math.prod(x_shape[:-1])
    return 2 * rows * math.prod(w_shape)  # [rows, K] x [K, O] (a 1-d weight: O = 1)


@_fc.register_flop_formula(_ops.linear)
def _linear_forward(x_shape, w_shape, _bias, _activation, **kwargs):
    return _linear(x_shape, w_shape)


@_fc.register_flop_formula(_ops.linear_backward)
def _linear_backward(_grad_shape, x_shape, w_shape, _output, _activation, _has_bias, need_input=True, need_weight=True,
                     **kwargs):
    return (bool(need_input) + bool(need_weight)) * _linear(x_shape, w_shape)  # dx = g w and dw = g^T x, each if wanted


def _recurrent(rows: int, weights) -> int:
    """Every step's products: each 2-d weight (input, recurrent, projection) meets every row."""
    return 2 * rows * sum(math.prod(w) for w in weights if w is not None and len(w) == 2)


@_fc.register_flop_formula(_ops.rnn_cell)
def _cell_forward(x_shape, _hx, _cx, w_ih, w_hh, *args, **kwargs):
    return _recurrent(x_shape[0], (w_ih, w_hh))


@_fc.register_flop_formula(_ops.rnn_cell_backward)
def _cell_backward(_gh, _gc, x_shape, _hx, _cx, w_ih, w_hh, *args, **kwargs):
    return 2 * _recurrent(x_shape[0], (w_ih, w_hh))


@_fc.register_flop_formula(_ops.rnn_seq)
def _seq_forward(x_shape, _hx, _cx, weights, *args, **kwargs):
    return _recurrent(x_shape[0] * x_shape[1], weights)  # input [T, B, I]


@_fc.register_flop_formula(_ops.rnn_seq_backward)
def _seq_backward(_go, _ghn, _gcn, x_shape, weights, *args, **kwargs):
    return 2 * _recurrent(x_shape[0] * x_shape[1], weights)
