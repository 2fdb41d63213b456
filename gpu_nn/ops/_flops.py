"""Flop formulas of our matmul-shaped ops for ``torch.utils.flop_counter.FlopCounterMode``.

torch counts its own convolution and matmul ops (``aten.convolution``, ``aten.mm``, ...); a
model built from our layers calls ``gpu_nn::`` ops instead, which it would count as 0. Each
formula counts what torch counts for the same layer: 2 flops per multiply-add of the
convolution or matrix products (torch's own ``conv_flop_count`` and ``conv_backward_flop`` for
convolutions), nothing for bias, activation, softmax or pooling; a backward counts the input and
weight gradients it computes (twice the forward's products for the recurrent ops, and for linear
where both its input's and its weight's gradients are wanted).

The formulas are registered when ``torch.utils.flop_counter`` is imported (at once where it is
already): importing it costs about a second and loads Triton (torch 2.13), which ``import gpu_nn``
should not (a Triton imported before ``TRITON_INTERPRET=1`` is set cannot interpret our kernels,
and ``gpu-nn check`` sets it after the import). A user of ``FlopCounterMode`` imports the module,
and that import registers them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import math
import sys
import warnings

import torch

_MODULE = "torch.utils.flop_counter"


def _linear(x_shape, w_shape) -> int:
    rows = math.prod(x_shape[:-1])
    return 2 * rows * math.prod(w_shape)  # [rows, K] x [K, O] (a 1-d weight: O = 1)


def _recurrent(rows: int, weights) -> int:
    """Every step's products: each 2-d weight (input, recurrent, projection) meets every row."""
    return 2 * rows * sum(math.prod(w) for w in weights if w is not None and len(w) == 2)


def register(_fc) -> None:
    """Our ops' formulas in ``_fc`` (torch.utils.flop_counter)'s registry."""
    _ops = torch.ops.gpu_nn

    @_fc.register_flop_formula(_ops.conv_forward)
    def _conv_forward(x_shape, w_shape, _bias, _stride, _padding, _dilation, _groups, _activation, *, out_shape,
                      **kwargs):
        return _fc.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    @_fc.register_flop_formula(_ops.conv_backward)
    def _conv_backward(grad_out_shape, x_shape, w_shape, _output, stride, padding, dilation, groups, _activation,
                       output_mask, *, out_shape, **kwargs):
        # output_mask: (input, weight, bias) gradients wanted, as aten.convolution_backward's
        # (torch's formula as registered: it takes its output as out_val, shapes passing through)
        return _fc.conv_backward_flop(grad_out_shape, x_shape, w_shape, None, stride, padding, dilation, False,
                                      [0] * len(stride), groups, list(output_mask), out_val=out_shape)

    @_fc.register_flop_formula(_ops.linear)
    def _linear_forward(x_shape, w_shape, _bias, _activation, **kwargs):
        return _linear(x_shape, w_shape)

    @_fc.register_flop_formula(_ops.linear_backward)
    def _linear_backward(_grad_shape, x_shape, w_shape, _output, _activation, _has_bias, need_input=True,
                         need_weight=True, **kwargs):
        # dx = g w and dw = g^T x, each if wanted
        return (bool(need_input) + bool(need_weight)) * _linear(x_shape, w_shape)

    @_fc.register_flop_formula(_ops.rnn_cell)
    def _cell_forward(x_shape, _hx, _cx, w_ih, w_hh, *args, **kwargs):
        return _recurrent(x_shape[0], (w_ih, w_hh))

    @_fc.register_flop_formula(_ops.rnn_cell_backward)
    def _cell_backward(_gh, _gc, x_shape, _hx, _cx, w_ih, w_hh, *args, output_mask=None, **kwargs):
        # each weight's two products, the one to its operand's gradient (dx with w_ih, dh with
        # w_hh) and its own, each if wanted (output_mask: dx, dh, dc, dw_ih, dw_hh, ...)
        output_mask = args[6] if len(args) > 6 else output_mask  # (b_ih, b_hh, h, c, reserve, mode, output_mask)
        m = [True] * 5 if output_mask is None else [bool(b) for b in output_mask]
        rows = x_shape[0]
        return (_recurrent(rows, (w_ih,)) * (m[0] + m[3])) + (_recurrent(rows, (w_hh,)) * (m[1] + m[4]))

    @_fc.register_flop_formula(_ops.rnn_seq)
    def _seq_forward(x_shape, _hx, _cx, weights, *args, **kwargs):
        return _recurrent(x_shape[0] * x_shape[1], weights)  # input [T, B, I]

    @_fc.register_flop_formula(_ops.rnn_seq_backward)
    def _seq_backward(_go, _ghn, _gcn, x_shape, weights, _reserve, _mode, num_layers, bidirectional, has_biases,
                      *args, output_mask=None, **kwargs):
        # each 2-d weight's product to its operand's gradient and its own (output_mask [input, hx,
        # cx, *weights]): the first layer's w_ih meets the rows where the input's gradient is
        # wanted, each w_hh the rows of every step but the first (dh0's, where hx's is wanted)
        T, B = x_shape[0], x_shape[1]
        output_mask = args[2] if len(args) > 2 else output_mask  # (lengths, dropout_masks, output_mask)
        m = [True] * (3 + len(weights)) if output_mask is None else [bool(b) for b in output_mask]
        D = 2 if bidirectional else 1
        per = len(weights) // (num_layers * D)  # each layer and direction: w_ih, w_hh, ...
        total = 0
        for i, w in enumerate(weights):
            j = i % per
            back = (T - 1 + m[1]) * B if j == 1 else (m[0] if i < D * per and j == 0 else 1) * T * B
            total += _recurrent(back, (w,)) + _recurrent(T * B, (w,)) * m[3 + i]
        return total


def _register_or_warn(module) -> None:
    try:
        register(module)
    except Exception as exc:  # an import of the user's must not fail for our counts
        warnings.warn(f"gpu_nn: flop formulas not registered ({type(exc).__name__}: {exc})", stacklevel=2)


class _ThenLoader(importlib.abc.Loader):
    """``loader`` (its own object untouched: a zip importer's serves many modules), and
    ``then(module)`` after it has run the module; anything else asked of it (get_source, ...) is
    the loader's."""

    def __init__(self, loader, then):
        self._loader, self._then = loader, then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` right after the module ``name`` is first imported (a one-shot finder
    ahead of the others: it finds the module's spec as they would and wraps its loader). Where
    anything goes wrong here, the import proceeds as if the finder were not there."""

    def __init__(self, name: str, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _ThenLoader(spec.loader, self.then)
            return spec
        except Exception:
            return None


def install() -> None:
    """Register the formulas now if torch's flop counter is imported (waiting for another
    thread's import of it to finish: a module is in sys.modules before its body has run), else
    when it is."""
    if _MODULE in sys.modules:
        _register_or_warn(importlib.import_module(_MODULE))
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_MODULE, _register_or_warn))


install()
