"""Drop-in recurrent modules: ``RNN``, ``LSTM``, ``GRU``, ``RNNCell``, ``LSTMCell``, ``GRUCell``.

Subclasses of torch's, so constructor arguments, parameter names (``weight_ih_l0``,
``bias_hh_l1_reverse``, ...), shapes, initialisation and ``state_dict`` are torch's own and
``load_state_dict`` works in both directions. Only ``forward`` changes: it runs our
``gpu_nn::rnn_seq`` / ``gpu_nn::rnn_cell`` ops. Inputs as torch takes them: batched 3-D,
unbatched 2-D, and ``PackedSequence`` (variable lengths, ``enforce_sorted`` either way; a packed
input returns a ``PackedSequence`` with the input's ``sorted_indices``). Dropout between layers
in training mode uses masks drawn here from torch's RNG. LSTM ``proj_size > 0`` as torch: ``h``
of size proj_size, ``c`` of size hidden_size, ``weight_hr_l{k}[_reverse]`` after the biases.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .._backend import to_device_async
from .._errors import KernelInputError, KernelInputIndexError, require_attribute
from ..ops import rnn as ops
from ..ops._dispatch import autocast_on, tangents_in_play
from ._jit import NotScriptable

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell"]

_MODES = {"RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "LSTM": "lstm", "GRU": "gru"}


def _as_input_error(fn, *args):
    """Run one of torch's own argument checks, re-raising its error as KernelInputError with the
    same words."""
    try:
        fn(*args)
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, KernelInputError):
            raise
        raise KernelInputError(str(exc)) from None


def _check_hx_dims(hx, is_lstm: bool, want: int) -> None:
    """torch's check that the initial states match the input's rank (2-D unbatched, 3-D batched),
    in its words."""
    kind = "unbatched 2-D" if want == 2 else "batched 3-D"
    if not is_lstm:
        if _dim(hx) != want:
            raise KernelInputError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
        return

    def at(i):
        # torch reads hx[0].dim(), then hx[1].dim(): a single tensor (an LSTM given GRU's state)
        # is indexed along its first dimension, which fails with torch's IndexError when it has
        # fewer than 2; a list of numbers has no dim()
        try:
            return hx[i]
        except IndexError as exc:
            raise KernelInputIndexError(str(exc)) from None

    if _dim(at(0)) != want or _dim(at(1)) != want:
        raise KernelInputError(
            f"For {kind} input, hx and cx should also be {want}-D but got ({_dim(at(0))}-D, {_dim(at(1))}-D) tensors")


def _dim(t) -> int:
    """``t.dim()``, or Python's AttributeError in its words where ``t`` has none (torch's forwards
    ask it of whatever they were given)."""
    require_attribute(t, "dim")
    return t.dim()


def _unpacked(data, batch_sizes):
    """pad_packed_sequence and the places to pack again with, as indexing (which forward-mode AD
    differentiates; torch's packing ops have no forward formula): ``(x [T, B, F], lengths,
    (steps, rows))``, ``x[steps, rows]`` the packed data again."""
    T, B = len(batch_sizes), int(batch_sizes[0]) if len(batch_sizes) else 0
    # (on the CPU, where batch_sizes are, whatever torch.set_default_device says)
    steps = torch.repeat_interleave(torch.arange(T, device="cpu"), batch_sizes)
    rows = (torch.cat([torch.arange(int(b), device="cpu") for b in batch_sizes]) if T
            else torch.zeros(0, dtype=torch.int64, device="cpu"))
    lengths = torch.bincount(rows, minlength=B)  # (each sequence's steps: the steps it has a row in)
    places = (to_device_async(steps, data.device), to_device_async(rows, data.device))  # no host wait
    x = data.new_zeros((T, B, *data.shape[1:])).index_put(places, data)
    return x, lengths, places


class _SeqMixin:
    """``forward`` of RNN / LSTM / GRU on our ops; mirrors ``torch.nn.LSTM.forward`` step by step."""

    def _gn_forward(self, input, hx):
        traced = _traced_whole(self, input, hx)
        if traced is not None:
            return traced
        mode = _MODES[self.mode]
        is_lstm = mode == "lstm"
        name = type(self).__name__
        if hasattr(self, "_update_flat_weights"):
            self._update_flat_weights()
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            hx_checked = hx
            if hx is not None:
                # torch checks the hidden state against the batch in the packed (sorted) order
                hx_checked = self.permute_hidden(hx, sorted_indices)
                _as_input_error(self.check_forward_args, data, hx_checked, batch_sizes)
            else:
                _as_input_error(self.check_input, data, batch_sizes)
            # the padded batch in the packed (sorted: longest first) order, the state permuted to
            # it as torch does: the sequences that end first fill the last batch tiles of the
            # step kernels, which skip a tile's recurrent product once all its sequences have ended
            tangents = tangents_in_play((data, *((hx,) if isinstance(hx, torch.Tensor) else hx or ()),
                                         *self._flat_weights))
            if tangents:
                x, lengths, places = _unpacked(data, batch_sizes)
            else:
                x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes), batch_first=False)
            hx = hx_checked
            batch_first, is_batched = False, True
        else:
            if _dim(input) not in (2, 3):  # (torch's forward asks input.dim() of whatever it is)
                # torch's RNN says "tensor instead", its LSTM and GRU "instead"
                word = "D tensor" if name == "RNN" else "D"
                raise KernelInputError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}{word} instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if hx is not None:
                _check_hx_dims(hx, is_lstm, input.dim())
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
            if hx is not None:
                _as_input_error(self.check_forward_args, input, hx, None)
            else:
                _as_input_error(self.check_input, input, None)
            x = input
            batch_first = self.batch_first
        B = x.shape[0] if batch_first else x.shape[1]
        if hx is None:
            # a projected LSTM's h is proj_size wide, its c hidden_size wide (as in torch)
            W = getattr(self, "proj_size", 0) or H
            z = torch.zeros(self.num_layers * D, B, W, dtype=x.dtype, device=x.device)
            hx = (z, torch.zeros(self.num_layers * D, B, H, dtype=x.dtype, device=x.device)) if is_lstm else z
        for h in (() if autocast_on(x.device.type) else hx if is_lstm else (hx,)):
            # (in an autocast region torch's layers take a state of another dtype: cast as theirs)
            if h.dtype != x.dtype:
                raise KernelInputError(
                    f"{name}: hidden state dtype ({h.dtype}) does not match input dtype ({x.dtype}) and weight dtype "
                    f"({self._flat_weights[0].dtype})"
                )
        fn = ops.SEQ_FUNCS[mode]
        res = fn(x, hx, list(self._flat_weights), self.bias, self.num_layers, self.dropout, self.training,
                 self.bidirectional, batch_first, lengths=lengths)
        out, hidden = res[0], (res[1:] if is_lstm else res[1])
        if packed:
            # the output is in the packed order already; the final state goes back to the user's
            data_out = out[places] if tangents else pack_padded_sequence(out, lengths, enforce_sorted=True).data
            return (PackedSequence(data_out, batch_sizes, sorted_indices, unsorted_indices),
                    self.permute_hidden(hidden, unsorted_indices))
        if not is_batched:
            out = out.squeeze(0 if self.batch_first else 1)
            hidden = tuple(h.squeeze(1) for h in hidden) if is_lstm else hidden.squeeze(1)
        return out, hidden


def _traced_whole(module, input, hx):
    """Under ``torch.fx.symbolic_trace`` (a Proxy among the arguments): the call recorded whole,
    one ``call_module`` node, as the tracer records torch's own recurrent modules (leaves of its
    tracer, where ours are not), so that the forward's checks never see a Proxy; None for a
    call with real arguments (two type tests)."""
    states = hx if type(hx) is tuple else (hx,)
    if type(input) is torch.Tensor and all(h is None or type(h) is torch.Tensor for h in states):
        return None
    proxy = next((a for a in (input, *states) if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    if type(module).forward not in _WHOLE_FORWARDS:
        # a subclass with a forward of its own, calling ours through super() with arguments it
        # made: a call_module node would run its whole forward again at run time (its own code
        # twice, silently). Refused as torch's own recurrent modules are there (their forward
        # branches on the proxy); a tracer that takes the subclass as a leaf never comes here
        raise torch.fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to control flow")
    tracer = proxy.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (input,) if hx is None else (input, hx), {})


class RNN(NotScriptable, _SeqMixin, torch.nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) on gpu-nn's kernels."""

    def forward(self, input, hx=None):
        return self._gn_forward(input, hx)


class LSTM(NotScriptable, _SeqMixin, torch.nn.LSTM):
    """``torch.nn.LSTM`` on gpu-nn's kernels (gate order i, f, g, o), ``proj_size`` included."""

    def forward(self, input, hx=None):
        return self._gn_forward(input, hx)


class GRU(NotScriptable, _SeqMixin, torch.nn.GRU):
    """``torch.nn.GRU`` on gpu-nn's kernels (torch's formula for n)."""

    def forward(self, input, hx=None):
        return self._gn_forward(input, hx)


def _check_cell_dims(name, input, hs):
    """torch's cells' checks of the input's and the states' ranks (an LSTM cell's ``hx[i]`` of
    ``idx`` i, the others' ``hx`` of idx None, which may be None)."""
    if _dim(input) not in (1, 2):
        raise KernelInputError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for idx, h in hs:
        if (h is not None or idx is not None) and _dim(h) not in (1, 2):
            what = "hidden" if idx is None else f"hx[{idx}]"
            raise KernelInputError(f"{name}: Expected {what} to be 1D or 2D, got {h.dim()}D instead")


class RNNCell(NotScriptable, torch.nn.RNNCell):
    """``torch.nn.RNNCell`` on gpu-nn's kernels."""

    def forward(self, input, hx=None):
        traced = _traced_whole(self, input, hx)
        if traced is not None:
            return traced
        _check_cell_dims("RNNCell", input, [(None, hx)])
        fn = ops.rnn_tanh_cell if self.nonlinearity == "tanh" else ops.rnn_relu_cell
        if self.nonlinearity not in ("tanh", "relu"):
            raise KernelInputError(f"Unknown nonlinearity: {self.nonlinearity}")
        return fn(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class LSTMCell(NotScriptable, torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` on gpu-nn's kernels."""

    def forward(self, input, hx=None):
        traced = _traced_whole(self, input, hx)
        if traced is not None:
            return traced
        _check_cell_dims("LSTMCell", input, list(enumerate(hx)) if hx is not None else [])
        if hx is not None and input.dim() == 1:
            # torch indexes the state of an unbatched input, whatever it is (a [2, H] tensor works)
            hx = (hx[0], hx[1])
        return ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(NotScriptable, torch.nn.GRUCell):
    """``torch.nn.GRUCell`` on gpu-nn's kernels."""

    def forward(self, input, hx=None):
        traced = _traced_whole(self, input, hx)
        if traced is not None:
            return traced
        _check_cell_dims("GRUCell", input, [(None, hx)])
        return ops.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


# the forwards a call_module node may stand for under symbolic tracing (_traced_whole): ours,
# which a subclass without a forward of its own inherits
_WHOLE_FORWARDS = frozenset(c.forward for c in (RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell))
