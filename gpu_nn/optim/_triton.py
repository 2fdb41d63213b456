"""Triton launch glue for the optimizer steps and clipping: chunk tables, bases, alignment.

See ``kernels/triton/optim.py`` for the layout: every tensor of a role is addressed as an
int64 element offset from the role's base tensor, one table row per chunk of ``BLOCK * ITERS``
elements. Tables are cached by the tensors' addresses; a kept launch whose gradients moved (a
caching allocator's new blocks every step) rebuilds only its gradient column (``Launch.regrad``);
a rebuilt table goes to the device with a non-blocking copy. Nothing here reads a device value on the host (except clipping with
``error_if_nonfinite=True``, which must, and which a CUDA-graph capture therefore refuses).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import _backend
from .._errors import KernelInputError

_TABLES: dict = {}
_MAX_TABLES = 32


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous (e.g. channels_last)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted((d for d in zip(t.shape, t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(ts) -> bool:
    ts = [t for t in ts if t is not None]
    return all(_dense(t) for t in ts) and all(t.stride() == ts[0].stride() for t in ts)


def _kernel_ready(ts) -> bool:
    """One dense layout shared by all, every start 16-byte aligned (vector loads): true of
    everything torch's allocator hands out; views at odd offsets go through copies. The
    tensors have one shape (a parameter, its gradient and state), so all contiguous is one
    storage order: that usual case is settled without comparing strides."""
    for t in ts:
        if t is not None and (not t.is_contiguous() or t.data_ptr() % 16):
            break
    else:
        return True
    return _same_layout(ts) and all(t.data_ptr() % 16 == 0 for t in ts if t is not None)


def _fresh(t):
    return t.detach().clone(memory_format=torch.contiguous_format)


def stage(params, grads, cols, ready):
    """Parameters, gradients and state columns as the kernels take them: each parameter whose
    tensors fail ``ready`` is replaced, with its gradient and state, by fresh contiguous copies.
    Returns ``(P, G, C, copies)``; after the step, ``orig.copy_(tmp)`` for each pair of
    ``copies`` writes the parameter and its state back."""
    copies = []
    P, G, C = list(params), list(grads), [list(c) for c in cols]
    for i in range(len(P)):
        if not ready([P[i], G[i]] + [c[i] for c in C]):
            P[i], G[i] = _fresh(P[i]), _fresh(G[i])
            for c in C:
                if c[i] is not None:
                    copies.append((c[i], _fresh(c[i])))
                    c[i] = copies[-1][1]
            copies.append((params[i], P[i]))
    return P, G, C, copies


def chunk_rows(cols, numels, flags, chunk: int) -> np.ndarray:
    """The table's rows, int64 [rows, 9]: per tensor with elements (in order) one row per chunk of
    ``chunk`` elements (in order), its six offsets (``cols``: six lists, one value per tensor),
    the chunk's first element, the tensor's numel and its flag (``flags`` None: no flag column,
    [rows, 8], the CuPy kernels' table of raw addresses). Built by NumPy in a few calls: a
    row at a time in Python took 3.5 ms per step for a conv net's 11 tensors under the
    interpreter's chunk, and it runs on every step whose gradients moved (H200 at 09f2311: a
    CUDA training loop's new gradients come back at other addresses every step)."""
    n = np.asarray(numels, dtype=np.int64).reshape(-1)
    per = chunks_per(n, chunk)
    total = int(per.sum())
    rows = np.empty((total, NCOL if flags is not None else NCOL - 1), dtype=np.int64)
    if total:
        which = np.repeat(np.arange(len(n)), per)
        first = np.repeat(np.cumsum(per) - per, per)  # each row's tensor's first row
        rows[:, :6] = np.asarray(cols, dtype=np.int64).reshape(6, len(n)).T[which]
        rows[:, 6] = (np.arange(total, dtype=np.int64) - first) * chunk
        rows[:, 7] = n[which]
        if flags is not None:
            rows[:, 8] = np.asarray([int(f) for f in flags], dtype=np.int64)[which]
    return rows


def chunks_per(numels, chunk: int) -> np.ndarray:
    """Each tensor's rows in the table: cdiv(numel, chunk) (0 for an empty one)."""
    return -(-np.asarray(numels, dtype=np.int64) // chunk)


NCOL = 9  # p_off, g_off, s0_off, s1_off, s2_off, step_off, start, numel, flag (kernels/triton/optim.py)


def _offsets(ptrs, es, base=None):
    """Element offsets of the addresses ``ptrs`` (0: no tensor, offset 0) from ``base`` (default:
    the first tensor's address; a dense tensor's lowest address, as storage order is what the
    kernels walk), for elements of ``es`` bytes."""
    if base is None:
        base = next((p for p in ptrs if p), 0)
    out = []
    for p in ptrs:
        d = p - base if p else 0
        if d % es:
            raise KernelInputError("optimizer kernels: a tensor is not aligned to its element size")
        out.append(d // es)
    return out


# device tables a captured CUDA graph launches with: every replay reads them, so they outlive the
# caches that hand them out (a plan replaced, the address cache cleared), never freed
_GRAPH_TABLES: list = []


def capturing(device) -> bool:
    """Whether work for ``device`` is being captured into a CUDA graph now. A table made then is
    written only when the graph replays, so it is used by that capture alone: not cached by
    address, not kept in a plan or a part's prepared launches."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def graph_keep(table) -> None:
    """Keep ``table`` alive for good when a graph is being captured (see ``_GRAPH_TABLES``)."""
    if table is not None and capturing(table.device):
        _GRAPH_TABLES.append(table)


def _table(params, grads, states, steps, flags, device, chunk):
    """(table on ``device``, n_chunks) for tensors of one part; cached by addresses."""
    return _table_cols(params, grads, states, steps, flags, device, chunk)[:2]


def _table_cols(params, grads, states, steps, flags, device, chunk):
    """:func:`_table`'s ``(table, n_chunks)`` and the ``(cols, numels)`` it was built from (what a
    launch needs to rebuild it for gradients at other addresses, :meth:`Launch.regrad`)."""
    pp = [p.data_ptr() for p in params]
    gp = [g.data_ptr() for g in grads]
    numels = [p.numel() for p in params]
    sp = [[0 if s is None else s.data_ptr() for s in col] for col in states]
    tp = [0 if s is None else s.data_ptr() for s in steps]
    # one element size per role: a part's parameters and gradients share a dtype, state and
    # steps are float32 (the tables index each role from its first tensor's address)
    es_p = params[0].element_size()
    es_g = grads[0].element_size() if grads else es_p
    es_s = next((s.element_size() for col in states for s in col if s is not None), 4)
    # the offsets are in elements, so the element sizes key the table with the addresses: tensors
    # of another dtype at the same addresses (the caching allocator hands a float16 run the blocks
    # of a float32 one) were served the other dtype's offsets, stepping and scaling wrong memory
    key = (chunk, str(device), tuple(pp), tuple(numels), tuple(gp), tuple(map(tuple, sp)), tuple(tp), tuple(flags),
           es_p, es_g, es_s)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    cols = [_offsets(pp, es_p), _offsets(gp, es_g)]
    # every state column from one base, the first state tensor of any column (the kernels' s_base)
    base_s = next((p for col in sp for p in col if p), 0)
    cols += [_offsets(sp[k], es_s, base_s) if k < len(sp) else [0] * len(pp) for k in range(3)]
    cols.append(_offsets(tp, 4) if steps else [0] * len(pp))
    rows = chunk_rows(cols, numels, flags, chunk)
    if not len(rows):
        out = (None, 0, cols, numels)
    else:
        out = (_backend.to_device_async(torch.from_numpy(rows), device), len(rows), cols, numels)
    return _remember(_TABLES, key, out, device)


def _remember(cache: dict, key, out, device):
    """``out`` kept in ``cache`` under ``key`` (the cache emptied at _MAX_TABLES), except while a
    CUDA graph is captured on ``device`` (what it builds is that capture's alone); returns it."""
    if not capturing(device):
        if len(cache) >= _MAX_TABLES:
            cache.clear()
        cache[key] = out
    return out


def _chunk(kt, interpret):
    blk, iters, _ = kt.config(interpret)
    return blk * iters


def _columns(kind: str, st: dict, n: int):
    """(state columns, step tensors, per-parameter flags) of ``kind`` as the kernels take them."""
    if kind == "sgd":
        return ([st["momentum_buffer"]] if any(b is not None for b in st["momentum_buffer"]) else []), [], st["first"]
    if kind == "adagrad":
        return [st["sum"]], st["step"], [0] * n
    if kind == "adadelta":
        return [st["square_avg"], st["acc_delta"]], [], [0] * n
    if kind == "rmsprop":
        return [st["square_avg"], st["grad_avg"], st["momentum_buffer"]], [], [0] * n
    return [st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"]], st["step"], [0] * n


class Prepared:
    """What the Triton and CuPy prepared launches share: ``copies``, the (original, staged
    copy) pairs written back after the launch. ``cacheable`` when there are none: then the
    table depends only on the addresses of the parameters, gradients and state, and a later
    step over the same parameters and state reuses it (:meth:`regrad` for gradients elsewhere).
    A subclass keeps ``table``, ``n``, the table's ``cols`` (six lists, one value per tensor;
    ``cols[1]`` the gradient column), ``numels``, ``flags`` (None: no flag column), ``chunk`` and
    ``staged_g`` (the staged gradients the launch reads where there are copies, else None), and
    says what a gradient column is (:meth:`_grad_column`)."""

    __slots__ = ()

    @property
    def cacheable(self) -> bool:
        return not self.copies

    def write_back(self) -> None:
        for orig, tmp in self.copies:
            orig.copy_(tmp)

    def unscaled_back(self, hp: dict, grads) -> None:
        """After a step that unscaled the gradients (GradScaler's ``grad_scale``, a fused step's),
        the staged copies' unscaled gradients into the gradients the step was given (torch's
        fused steps leave them unscaled); nothing where the kernels read the gradients in place."""
        if hp.get("grad_scale") is None or self.staged_g is None or grads is None:
            return
        for orig, staged in zip(grads, self.staged_g):
            if staged is not orig:
                orig.copy_(staged)

    def _grad_column(self, grads) -> list | None:  # pragma: no cover - abstract
        """The table's gradient column for ``grads``, or None where no table describes them."""
        raise NotImplementedError

    def regrad(self, grads) -> bool:
        """Make the table describe ``grads`` (the kept plan's gradients, maybe at new addresses,
        same shapes, layouts and dtypes: ``optimizers._grad_key``), rebuilding only its gradient
        column where they moved; False where it cannot (then the caller prepares the part again).
        A launch with staged copies is never kept: False."""
        if self.copies or self.cols is None or not self.n:
            return not self.copies and self.n == 0
        col = self._grad_column(grads)
        if col is None:
            return False
        if col == self.cols[1]:
            return True
        cols = [self.cols[0], col, *self.cols[2:]]
        table = _backend.to_device_async(torch.from_numpy(chunk_rows(cols, self.numels, self.flags, self.chunk)),
                                         self.table.device)
        if capturing(self.table.device):
            # written when the graph replays: this capture's table alone, kept for good; an empty
            # column matches no gradients, so the next eager step rebuilds the table
            graph_keep(table)
            self.table, self.cols = table, [self.cols[0], [], *self.cols[2:]]
            return True
        self.table, self.cols = table, cols
        return True


def base_index(ts) -> int:
    """Index of the tensor a table role is measured from: the first with an address (an empty
    tensor may have none; :func:`_offsets` skips those, and the kernels add every offset to this
    tensor's address: an empty first parameter made them read near address 0)."""
    for i, t in enumerate(ts):
        if t is not None and t.data_ptr():
            return i
    return 0


def grad_offsets(grads) -> list | None:
    """The table's gradient column for ``grads``, as :func:`_offsets` makes it (element offsets
    from the :func:`base_index` gradient's address, 0 for an empty one without an address); None
    where one is not 16-byte aligned (the kernels' vector loads; then no table describes them: the
    part is prepared again, staged)."""
    ptrs = [g.data_ptr() for g in grads]
    if any(p % 16 for p in ptrs):
        return None
    return _offsets(ptrs, grads[0].element_size())  # 16-byte aligned: whole elements apart


class Launch(Prepared):
    """One part's multi-tensor launch, prepared: its table and base tensors (the gradient base
    is the step's own first gradient). The table's gradient column holds each gradient's offset
    from the first: a step whose gradients are new tensors elsewhere (a caching allocator's
    blocks after ``zero_grad(set_to_none=True)``: on the H200 every step of a training loop)
    gets the column rebuilt from the kept ``cols`` (:meth:`Prepared.regrad`), not the whole prepare."""

    __slots__ = ("kind", "table", "n", "p_base", "staged_g", "s_base", "step_base", "copies", "cols", "numels",
                 "flags", "chunk")

    def __init__(self, kind, table, n, p_base, staged_g, s_base, step_base, copies, cols=None, numels=None,
                 flags=None, chunk=None):
        self.kind, self.table, self.n, self.p_base = kind, table, n, p_base
        self.staged_g, self.s_base, self.step_base, self.copies = staged_g, s_base, step_base, copies
        self.cols, self.numels, self.flags, self.chunk = cols, numels, flags, chunk

    def _grad_column(self, grads) -> list | None:
        return grad_offsets(grads)

    def __call__(self, hp: dict, grads) -> None:
        from ..kernels import triton as ktriton
        from ..kernels.triton import optim as kt

        kind = self.kind
        sign = -1.0 if hp.get("maximize") else 1.0
        if kind == "sgd":
            sc = dict(lr=hp["lr"], weight_decay=hp["weight_decay"], momentum=hp["momentum"], dampening=hp["dampening"],
                      sign=sign)
            fl = dict(momentum=hp["momentum"] != 0, nesterov=bool(hp["nesterov"]), wd=hp["weight_decay"] != 0)
        elif kind == "adagrad":
            sc = dict(lr=hp["lr"], lr_decay=hp["lr_decay"], weight_decay=hp["weight_decay"], eps=hp["eps"], sign=sign)
            fl = dict(wd=hp["weight_decay"] != 0)
        elif kind == "adadelta":
            sc = dict(lr=hp["lr"], rho=hp["rho"], eps=hp["eps"], weight_decay=hp["weight_decay"], sign=sign)
            fl = dict(wd=hp["weight_decay"] != 0)
        elif kind == "rmsprop":
            sc = dict(lr=hp["lr"], alpha=hp["alpha"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                      momentum=hp["momentum"], sign=sign)
            fl = dict(wd=hp["weight_decay"] != 0, centered=bool(hp["centered"]), momentum=hp["momentum"] > 0)
        else:
            sc = dict(lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"],
                      weight_decay=hp["weight_decay"], sign=sign)
            wd_mode = 0 if hp["weight_decay"] == 0 else (2 if hp["decoupled_weight_decay"] else 1)
            fl = dict(wd_mode=wd_mode, amsgrad=bool(hp["amsgrad"]))
        gs = self.staged_g if self.staged_g is not None else grads
        g_base = gs[base_index(gs)]
        graph_keep(self.table)
        kt.launch(kind, self.table, self.n, self.p_base, g_base, self.s_base, self.step_base, sc, fl,
                  ktriton.INTERPRET, hp.get("grad_scale"), hp.get("found_inf"))
        self.write_back()
        self.unscaled_back(hp, grads)


def prepare(kind: str, params, st: dict, grads) -> Launch:
    """The launch of one part (one device and dtype): staging copies where a tensor's layout
    is not the kernels', the chunk table (cached by addresses) and the base tensors."""
    from ..kernels import triton as ktriton
    from ..kernels.triton import optim as kt

    cols, steps, flags = _columns(kind, st, len(params))
    # the kernels walk storage order: parameter, gradient and state must share one dense,
    # aligned layout; anything else runs on fresh copies that are written back
    P, G, C, copies = stage(params, grads, cols, _kernel_ready)
    for s in steps:
        if s.dtype != torch.float32:
            raise KernelInputError("optimizer kernels: state['step'] must be a float32 tensor on the device")
    chunk = _chunk(kt, ktriton.INTERPRET)
    table, n, tcols, numels = _table_cols(P, G, C, steps, flags, params[0].device, chunk)
    # the state base: the tensor the state columns are measured from (_table_cols: the first
    # state tensor with an address), else a stand-in
    states = [s for c in C for s in c if s is not None]
    dummy = states[base_index(states)] if states else torch.empty(1, dtype=torch.float32, device=params[0].device)
    return Launch(kind, table, n, P[base_index(P)], G if copies else None, dummy,
                  steps[base_index(steps)] if steps else dummy, copies, tcols, numels, list(flags), chunk)


_HALF_CODE = {torch.float16: 1, torch.bfloat16: 2}
_BOUNDS: dict = {}


def _tensor_bounds(numels, codes, chunk: int, device):
    """(bounds, rnd) int32 tensors on ``device`` for _clip_tensor_kernel: gradient t's chunks are
    partials[bounds[t]:bounds[t + 1]] (the tables' order: ``chunk_rows`` gives each gradient
    cdiv(numel, chunk) rows, one part after another), its dtype's rounding rnd[t]; kept per
    (numels, dtypes, chunk, device) as the tables are (not while a CUDA graph is captured)."""
    key = (tuple(numels), tuple(codes), chunk, str(device))
    hit = _BOUNDS.get(key)
    if hit is not None:
        return hit
    bounds = np.concatenate(([0], np.cumsum(chunks_per(numels, chunk)))).astype(np.int32)
    out = (_backend.to_device_async(torch.from_numpy(bounds), device),
           _backend.to_device_async(torch.from_numpy(np.asarray(codes, dtype=np.int32)), device))
    return _remember(_BOUNDS, key, out, device)


def clip_grad_norm(grads, max_norm: float, norm_type: float, error_if_nonfinite: bool,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fused clipping of CUDA (or interpreter) gradients: per device, a partial-norm kernel per
    dtype, then a scale kernel per dtype whose programs each finish the reduction themselves.
    Gradients on several devices (a model split over GPUs): each device's partials (a few
    floats per gradient chunk) copied to every other device, queued (no host synchronisation),
    so that each device's scale kernels reduce the same values to the same total, as torch
    gathers its per-device norms. Returns the float32 total on ``grads[0]``'s device (the caller
    gives it the gradients' promoted dtype ``out_dtype``, as which the scale kernels and the
    non-finite check read it: torch's total is in it)."""
    from ..kernels import triton as ktriton
    from ..kernels.triton import optim as kt
    from ..ops._dispatch import device_guard

    if error_if_nonfinite and any(capturing(d) for d in {g.device for g in grads}):
        # the check reads the total on the host, which CUDA refuses while a stream is captured,
        # and the refusal invalidates the capture (torch's own clipping fails so): refused before
        # any launch, the capture left as it was
        raise KernelInputError(
            "clip_grad_norm_: error_if_nonfinite=True reads the total norm on the host, which is not "
            "permitted while a CUDA graph is being captured; pass error_if_nonfinite=False inside a captured region")
    if any(g.dtype == torch.bfloat16 and g.device.type == "cpu" for g in grads):
        _backend.check_interpreter_dtype("clip_grad_norm_", "triton", *grads)
    if any(g.dtype not in (torch.float32, torch.float16, torch.bfloat16) for g in grads):
        raise KernelInputError("clip_grad_norm_: the triton backend takes float32/float16/bfloat16 gradients")
    norms = kt.NORM_CODES
    code = norms["inf"] if math.isinf(norm_type) else norms[{2.0: "two", 1.0: "one"}.get(float(norm_type), "p")]
    interpret = ktriton.INTERPRET
    chunk = _chunk(kt, interpret)
    groups = []  # per device: (device, plans, its partials' final form and count, copies)
    for device, gs in _device_groups(grads):
        with device_guard(device):
            groups.append((device, *_clip_partials(kt, gs, device, chunk, code, norm_type, interpret)))
    first = groups[0][0]
    if len(groups) == 1:
        gathered = [(groups[0][2], groups[0][3])]
    else:  # every device's partials on every device, one buffer each (the copies queued in order)
        n_all = sum(n for _, _, _, n, _ in groups)
        gathered = []
        for device, *_ in groups:
            with device_guard(device):
                pieces = [sums[:n].to(device, non_blocking=True) for _, _, sums, n, _ in groups if n]
                gathered.append((torch.cat(pieces) if pieces else torch.zeros(1, device=device), n_all))
    # written by a kernel on every path: the first device's first scale launch's program 0, or
    # _clip_total_kernel (error_if_nonfinite, or no element on that device)
    total = torch.empty((), dtype=torch.float32, device=first)
    with device_guard(first):
        if error_if_nonfinite:
            kt.clip_total(*gathered[0], total, code, norm_type)
            if not bool(torch.isfinite(total.to(out_dtype))):  # the one host read, as torch's own check needs
                raise RuntimeError(
                    f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so "
                    "it cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
                    "anyway, set `error_if_nonfinite=False`"
                )
    for k, ((device, plans, _, _, copies), (sums, n_sums)) in enumerate(zip(groups, gathered)):
        with device_guard(device):
            # each scale launch's program 0 stores the total: the first device's into the one
            # returned, the others' into a scratch of their own
            dst = total if k == 0 else torch.empty((), dtype=torch.float32, device=device)
            for base, table, n in plans:
                if n:
                    kt.clip_scale(table, n, base, sums, n_sums, dst, max_norm, code, norm_type, interpret,
                                  _HALF_CODE.get(out_dtype, 0))
            if k == 0 and not any(n for _, _, n in plans):
                kt.clip_total(sums, n_sums, total, code, norm_type)
            for g, c in copies:
                g.copy_(c)
    return total


def _device_groups(grads) -> list:
    """``[(device, grads on it)]`` in the order of first appearance (``grads[0]``'s first: the
    total is returned there, as torch's)."""
    groups: dict = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    return list(groups.items())


def _clip_partials(kt, grads, device, chunk, code, norm_type, interpret):
    """One device's partial norms: ``(plans, sums, n_sums, copies)``, ``sums[:n_sums]`` float32
    values in the form the reduction adds up (a chunk's max |g|, sum g^2 or sum |g|^p; where a
    gradient is float16 / bfloat16, each gradient's own norm rounded to its dtype and put back
    in that form, as torch's per-tensor norms are), ``plans`` the (base, table, chunks) of each
    dtype's scale launch, ``copies`` the (gradient, dense copy) pairs to write back."""
    parts = {}
    for i, g in enumerate(grads):
        parts.setdefault(g.dtype, []).append(i)
    plans = []
    copies = []
    n_total = 0
    numels, codes = [], []  # per gradient in the partials' order: its elements, its dtype's rounding
    launches = []
    for dt, idx in parts.items():
        gs = []
        for i in idx:
            g = grads[i]
            if not _kernel_ready([g]):
                c = _fresh(g)
                copies.append((g, c))
                g = c
            gs.append(g)
        table, n = _table(gs, gs, [], [], [0] * len(gs), device, chunk)
        base = gs[base_index(gs)]  # the tensor the table is measured from
        plans.append((base, table, n))
        launches.append((base, table, n, n_total))
        n_total += n
        numels += [g.numel() for g in gs]
        codes += [_HALF_CODE.get(dt, 0)] * len(gs)
    partials = torch.empty(max(n_total, 1), dtype=torch.float32, device=device)
    for base, table, n, part0 in launches:
        graph_keep(table)
        if n:
            kt.clip_partial(table, n, base, partials, part0, code, norm_type, interpret)
    if n_total and any(codes):
        # a half gradient: each gradient's own norm rounded to its dtype first, as torch's
        # per-tensor norms are (one launch more; float32 / float64 lists keep the chunks' sums)
        bounds, rnd = _tensor_bounds(numels, codes, chunk, device)
        graph_keep(bounds)
        graph_keep(rnd)
        sums = torch.empty(len(numels), dtype=torch.float32, device=device)
        kt.clip_tensor(partials, bounds, rnd, sums, len(numels), code, norm_type)
        return plans, sums, len(numels), copies
    return plans, partials, n_total, copies
