"""CuPy (CUDA C) launch glue for Adam/AdamW and RMSprop: ``kernels/cuda/optim.cu``.

CUDA C can cast integers to pointers, so the chunk table holds raw device addresses (one row
of 8 int64 per chunk of ``CHUNK`` elements: param, grad, three state tensors, step, start,
numel). Tables are cached by address; scalars pass by value as float64 (a tensor lr as its
address, to the ``*_lr_ptr`` entry points); the kernels read the step from the device. Tensors
must be dense (contiguous or one dense layout shared by the parameter, its gradient and its
state); others go through contiguous copies.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _backend
from .._errors import KernelInputError
from ._triton import Prepared, capturing, chunk_rows, graph_keep

CHUNK = 16384
THREADS = 256
_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_TABLES: dict = {}


def _table(P, G, C, steps, device):
    # sizes are part of the key: new tensors can reuse freed addresses with other sizes
    key = (str(device), tuple((t.data_ptr(), t.numel()) for t in P), tuple(t.data_ptr() for t in G),
           tuple(tuple(0 if s is None else s.data_ptr() for s in c) for c in C),
           tuple(s.data_ptr() for s in steps))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    cols = [[p.data_ptr() for p in P], [g.data_ptr() for g in G]]
    cols += [[0 if k >= len(C) or C[k][i] is None else C[k][i].data_ptr() for i in range(len(P))] for k in range(3)]
    cols.append([s.data_ptr() for s in steps] if steps else [0] * len(P))
    numels = [p.numel() for p in P]
    rows = chunk_rows(cols, numels, None, CHUNK)  # raw addresses, no flag column
    out = ((None, 0) if not len(rows) else (_backend.to_device_async(torch.from_numpy(rows), device), len(rows))) + (
        cols, numels)
    if capturing(device):
        return out
    if len(_TABLES) > 32:
        _TABLES.clear()
    _TABLES[key] = out
    return out


class Launch(Prepared):
    """One part's launch, prepared (see ``_triton.Prepared``): the table of raw addresses and
    the compiled module; its gradient column holds the gradients' raw addresses
    (``_triton.Prepared.regrad`` rebuilds it where they moved)."""

    __slots__ = ("kind", "table", "n", "mod", "device", "copies", "cols", "numels", "flags", "chunk", "staged_g")

    def __init__(self, kind, table, n, mod, device, copies, cols=None, numels=None, staged_g=None):
        self.kind, self.table, self.n, self.mod, self.device, self.copies = kind, table, n, mod, device, copies
        self.cols, self.numels, self.flags, self.chunk = cols, numels, None, CHUNK  # raw addresses, no flag column
        self.staged_g = staged_g

    def _grad_column(self, grads) -> list:
        return [g.data_ptr() for g in grads]

    def __call__(self, hp: dict, grads=None) -> None:
        from ..kernels import cuda as kcuda

        if self.n:
            graph_keep(self.table)
            f64, i32 = np.float64, np.int32
            lr = hp["lr"]
            # a tensor lr (1-element float32 on this device: _dispatch.run_parts) goes as its
            # address to the entry point that reads it on the device
            by_value = isinstance(lr, (float, int))
            lr_arg = f64(lr) if by_value else lr
            if self.kind == "adam":
                decoupled = bool(hp["decoupled_weight_decay"])
                # GradScaler's scalars on this device (a fused step's: _dispatch.run_parts), or null
                scale, found_inf = (hp.get(k) for k in ("grad_scale", "found_inf"))
                args = (self.table, lr_arg, f64(hp["beta1"]), f64(hp["beta2"]), f64(hp["eps"]),
                        f64(hp["weight_decay"]), i32(hp["amsgrad"]), i32(hp["maximize"]), i32(decoupled),
                        np.uint64(0) if scale is None else scale, np.uint64(0) if found_inf is None else found_inf)
                kcuda.launch(self.mod, "adam_step" if by_value else "adam_step_lr_ptr", (self.n,), (THREADS,), args,
                             device=self.device)
            else:
                if hp.get("found_inf") is not None or hp.get("grad_scale") is not None:
                    raise KernelInputError("optim.rmsprop takes no GradScaler scalars (torch has no fused RMSprop)")
                args = (self.table, lr_arg, f64(hp["alpha"]), f64(hp["eps"]), f64(hp["weight_decay"]),
                        f64(hp["momentum"]), i32(hp["centered"]), i32(hp["maximize"]))
                kcuda.launch(self.mod, "rmsprop_step" if by_value else "rmsprop_step_lr_ptr", (self.n,), (THREADS,),
                             args, device=self.device)
        self.write_back()
        self.unscaled_back(hp, grads)


def prepare(kind: str, params, st: dict, grads) -> Launch:
    """The launch of one part: staging copies where the layout is not dense, the table (cached
    by addresses), the module compiled for the parameters' dtype."""
    from ..kernels import cuda as kcuda
    from ._triton import _same_layout as same_layout
    from ._triton import stage

    if kind not in ("adam", "rmsprop"):
        raise KernelInputError(f"optim.{kind} has no cupy kernel")
    if kind == "adam":
        cols, steps = [st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"]], st["step"]
    else:
        cols, steps = [st["square_avg"], st["grad_avg"], st["momentum_buffer"]], []
    P, G, C, copies = stage(params, grads, cols, same_layout)
    device = params[0].device
    table, n, tcols, numels = _table(P, G, C, steps, device)
    index = device.index or 0
    mod = kcuda.load("optim", {"PARAM_KIND": _KIND[params[0].dtype], "OPTIM_CHUNK": CHUNK}, index) if n else None
    return Launch(kind, table, n, mod, index, copies, tcols, numels, G if copies else None)
