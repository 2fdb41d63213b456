"""Launch-configuration sweep and profiler breakdown of the memory-bound kernels (GPU only).

(a) ``sweep``: every configuration of a candidate grid, at the benchmark shapes, in float32 and
bfloat16, of

* the activation kernels (``_act_fwd_kernel`` / ``_act_bwd_kernel``, relu / sigmoid / tanh):
  BLOCK 1024..16384 x num_warps 4 / 8 / 16 (no persistent grid-stride variant exists);
* the pooling kernels (max with indices / avg, forward / backward, 3x3/2 padding 1):
  BLOCK 128..2048 x num_warps 2 / 4 / 8;
* the Adam kernel (10.5M parameters in bench_optim's mix of tensors): BLOCK x ITERS x num_warps,
  its chunk table built for each chunk size;
* first, within ``--conv-budget-s`` (at most half the budget): the convolution forward at
  bench_conv's conv2d / conv1d shapes, NCHW and channels_last, float32 (TF32, as torch's
  default) and bfloat16: every candidate the measuring chooser would time for the problem (the
  heuristic's first; NHWC tiles and the via-channels_last variant where they apply), launched
  through ``conv_forward`` with a chooser that answers the row's candidate, and torch's conv
  (``{"provider": "torch"}``; ``best`` gives best / torch). Rows in ``DIR/sweep_conv.json`` as
  they come, and in ``sweep.json`` under ``"conv"``.

Each configuration is launched through the kernel module's own launcher with the module's
configuration function replaced for the call (``block_size`` / ``launch_config`` / ``config``), so
the launch is the one the product makes but for the configuration; a group's configurations are
compiled in parallel first (Triton's AsyncCompileMode, as the dense tuning does). Each one's
output is checked once against torch (output poisoned first), then timed by
``triton.testing.do_bench``: CUDA events, median, L2 flushed before every call, two input sets in
rotation, each larger than the H200's L2. One JSON row per (kernel, dtype, shape, config): us,
GB/s against the bytes the kernel must move, correct (torch.testing.assert_close's defaults for
the dtype) and the largest error. ``DIR/sweep.json`` is rewritten after every row, so a run cut
short keeps what it measured; ``--budget-s`` stops the sweep cleanly between rows. Groups run in
order of what matters most: relu at the main shape, pooling and Adam in float32, then the rest.
Kernel defaults are not changed here: the data is for choosing them.

(b) ``profile``: one warm forward+backward (a step for Adam) at the benchmark shape of relu,
sigmoid, max_pool2d, avg_pool2d, softmax, cross_entropy, linear (8192x4096 -> 4096, float32 and
bfloat16) and Adam, for torch and ours (triton; cupy where it has the op), under torch.profiler
with CPU and CUDA activity: every GPU event (name, start, duration), the region's wall time
(unprofiled and profiled), the GPU's busy time and span (span - busy: the GPU idle inside the
region, host-bound gaps), and the CPU ops with the most self time. ``DIR/profile.json`` and a
compact table (kernel, count, total us per provider), ``DIR/profile.txt``, printed last.

    python -m gpu_nn.benchmarks.sweep --out DIR [--budget-s S] [--only sweep|profile]

Without a GPU it says so and exits 0. The inputs, providers and counts come from the
``bench_<family>`` modules and ``kernel_counts``; the grids, the runner and the summariser are
plain functions that tests drive on the CPU with fake timings and events (the Triton launches
themselves run there under the interpreter).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import sys
import time
from typing import Callable

import torch

from gpu_nn.benchmarks import harness

ACT_BLOCKS = (1024, 2048, 4096, 8192, 16384)
ACT_WARPS = (4, 8, 16)
POOL_BLOCKS = (128, 256, 512, 1024, 2048)
POOL_WARPS = (2, 4, 8)
OPTIM_BLOCKS = (512, 1024, 2048, 4096)
OPTIM_ITERS = (1, 4, 16)
OPTIM_WARPS = (4, 8)

POOL_SHAPE = (32, 64, 112, 112)  # bench_pool's: ResNet's stem pool input
ADAM_PARAMS = 10_500_000  # bench_optim's quick total
LINEAR = (8192, 4096, 4096)  # bench_dense's M, K, N
LOGITS = (8192, 32000)  # bench_dense's quick softmax / cross_entropy rows x classes
ADAM_HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "sign": 1.0}
ADAM_STEP = 3.0  # the step count the kernels read (bias corrections)


# ------------------------------------------------------------------------------ grids

def grid(default: dict, **axes) -> list[dict]:
    """Every combination of ``axes`` (name -> values) that gives each thread at least one element
    (``BLOCK >= 32 * num_warps``), ``default`` first and not repeated."""
    out = [dict(default)]
    names = list(axes)
    for combo in itertools.product(*(axes[n] for n in names)):
        cfg = dict(zip(names, combo))
        if cfg["BLOCK"] >= 32 * cfg["num_warps"] and cfg != default:
            out.append(cfg)
    return out


def activation_grid() -> list[dict]:
    from gpu_nn.kernels.triton import activation as ka

    return grid(dict(zip(("BLOCK", "num_warps"), ka.block_size(1, False))), BLOCK=ACT_BLOCKS, num_warps=ACT_WARPS)


def pool_grid() -> list[dict]:
    from gpu_nn.kernels.triton import pool as kp

    return grid(dict(zip(("BLOCK", "num_warps"), kp.launch_config(False))), BLOCK=POOL_BLOCKS, num_warps=POOL_WARPS)


def optim_grid() -> list[dict]:
    from gpu_nn.kernels.triton import optim as ko

    return grid(dict(zip(("BLOCK", "ITERS", "num_warps"), ko.config(False))),
                BLOCK=OPTIM_BLOCKS, ITERS=OPTIM_ITERS, num_warps=OPTIM_WARPS)


def config_str(cfg: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in cfg.items())


# ------------------------------------------------------------------------------ launching

@contextlib.contextmanager
def _patched(module, **attrs):
    """Module globals replaced for the duration (the kernel modules' configuration functions,
    and their ``launch_kernel`` while a group compiles)."""
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _configured(module, fn_name: str, cfg: dict):
    """``module.<fn_name>(...)`` returns ``cfg``'s values (in its key order) while this lasts."""
    values = tuple(cfg.values())
    return _patched(module, **{fn_name: lambda *args, **kw: values})


def _precompile(module, launch: Callable[[dict], None], configs) -> None:
    """Compile every configuration of a group at once: each launch becomes ``kernel.warmup`` under
    Triton's AsyncCompileMode on a thread pool (Triton >= 3.4; older ones compile on first launch).
    A configuration that fails to compile fails again, and is reported, when it is launched."""
    from gpu_nn.kernels.triton._compat import parallel_compile

    def warm(kernel, grid_, *args, **kw):
        kernel.warmup(*args, grid=grid_, **kw)

    with parallel_compile(min(16, len(configs))) as available:
        if not available:
            return
        with _patched(module, launch_kernel=warm):
            for cfg in configs:
                try:
                    launch(cfg)
                except Exception:  # noqa: BLE001 - reported by the timed launch
                    pass


def _finite(x: float):
    return x if math.isfinite(x) else str(x)


def compare(out: torch.Tensor, ref: torch.Tensor, **tol) -> tuple[bool, float | str]:
    """(within torch.testing.assert_close's default tolerances for the dtype, or ``tol``'s rtol /
    atol, largest absolute error); an index tensor must be equal."""
    if out.shape != ref.shape:
        return False, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return True, 0.0
    err = float((out.double() - ref.double()).abs().max())
    try:
        torch.testing.assert_close(out, ref, **tol)
    except AssertionError:
        return False, _finite(err)
    return True, _finite(err)


def _all_ok(*results) -> tuple[bool, float | str]:
    ok = all(r[0] for r in results)
    errs = [r[1] for r in results]
    worst = next((e for e in errs if isinstance(e, str)), None)
    return ok, worst if worst is not None else max(errs)


def _interpret() -> bool:
    from gpu_nn.kernels import triton as ktriton

    return ktriton.INTERPRET


# ------------------------------------------------------------------------------ groups

@dataclasses.dataclass
class Group:
    """The configurations of one kernel at one dtype and shape. ``setup(configs)`` builds the
    inputs (and compiles the configurations) and returns ``(run, check)``: ``run(cfg)`` launches
    once on the next input set, ``check(cfg)`` launches once and returns ``(correct, max_err)``."""

    kernel: str
    op: str
    dtype: str
    shape: str
    bytes: int
    configs: list
    setup: Callable


def _dtype_str(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _numel(shape) -> int:
    return math.prod(shape)


def _act_setup(op: str, backward: bool, shape, dtype, device: str, copies: int, configs):
    from gpu_nn.kernels.triton import activation as ka

    interpret = _interpret()
    fwd = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[op]
    bwd = {"relu": lambda g, y: torch.ops.aten.threshold_backward(g, y, 0),
           "sigmoid": torch.ops.aten.sigmoid_backward, "tanh": torch.ops.aten.tanh_backward}[op]

    def make():
        x = torch.randn(shape, dtype=dtype, device=device)
        if backward:  # g, y, dx
            return torch.randn_like(x), fwd(x), torch.empty_like(x)
        return x, torch.empty_like(x)

    nxt = harness.rotating(make, copies)
    launcher = ka.act_backward if backward else ka.act_forward

    def launch(cfg, tensors):
        with _configured(ka, "block_size", cfg):
            launcher(*tensors, op, interpret)

    def run(cfg):
        launch(cfg, nxt())

    def check(cfg):
        t = nxt()
        t[-1].fill_(float("nan"))
        launch(cfg, t)
        return compare(t[-1], bwd(t[0], t[1]) if backward else fwd(t[0]))

    if not interpret:
        _precompile(ka, run, configs)
    return run, check


def activation_groups(ops, shapes, dtypes, device: str = "cuda", copies: int = 2, configs=None) -> list[Group]:
    configs = activation_grid() if configs is None else configs
    out = []
    for op in ops:
        for shape in shapes:
            for backward in (False, True):
                for dtype in dtypes:
                    es = torch.empty((), dtype=dtype).element_size()
                    out.append(Group(
                        "_act_bwd_kernel" if backward else "_act_fwd_kernel", f"{op} {'bwd' if backward else 'fwd'}",
                        _dtype_str(dtype), "x".join(map(str, shape)), (3 if backward else 2) * _numel(shape) * es,
                        configs, functools.partial(_act_setup, op, backward, shape, dtype, device, copies)))
    return out


K3, S2, P1, D1 = (3, 3), (2, 2), (1, 1), (1, 1)


def _pool_out(shape):
    N, C, H, W = shape
    return (N, C, (H + 2 - 3) // 2 + 1, (W + 2 - 3) // 2 + 1)


def _pool_setup(kind: str, backward: bool, shape, dtype, device: str, copies: int, configs):
    import torch.nn.functional as TF

    from gpu_nn.kernels.triton import pool as kp

    interpret = _interpret()
    aten = torch.ops.aten

    def make():
        x = torch.randn(shape, dtype=dtype, device=device)
        if kind == "max":
            y, idx = TF.max_pool2d(x, 3, 2, 1, return_indices=True)
            if backward:  # x (for torch's backward), g, idx, dx
                return x, torch.randn_like(y), idx, torch.empty_like(x)
            return x, torch.empty_like(y), torch.empty_like(idx)
        if backward:
            return x, torch.randn(_pool_out(shape), dtype=dtype, device=device), torch.empty_like(x)
        return x, torch.empty(_pool_out(shape), dtype=dtype, device=device)

    def launch(cfg, t):
        with _configured(kp, "launch_config", cfg):
            if kind == "max" and backward:
                kp.max_pool2d_backward(t[1], t[2], t[3], K3, S2, P1, D1, interpret)
            elif kind == "max":
                kp.max_pool2d_forward(t[0], t[1], t[2], K3, S2, P1, D1, False, interpret)
            elif backward:
                kp.avg_pool2d_backward(t[1], t[2], K3, S2, P1, True, 0, interpret)
            else:
                kp.avg_pool2d_forward(t[0], t[1], K3, S2, P1, False, True, 0, interpret)

    nxt = harness.rotating(make, copies)

    def run(cfg):
        launch(cfg, nxt())

    def check(cfg):
        t = nxt()
        if kind == "max" and not backward:
            t[1].fill_(float("nan"))
            t[2].fill_(-7)
            launch(cfg, t)
            y, idx = TF.max_pool2d(t[0], 3, 2, 1, return_indices=True)
            return _all_ok(compare(t[1], y), compare(t[2], idx))
        t[-1].fill_(float("nan"))
        launch(cfg, t)
        if kind == "max":
            ref = aten.max_pool2d_with_indices_backward(t[1], t[0], [3, 3], [2, 2], [1, 1], [1, 1], False, t[2])
        elif backward:
            ref = aten.avg_pool2d_backward(t[1], t[0], [3, 3], [2, 2], [1, 1], False, True, None)
        else:
            ref = TF.avg_pool2d(t[0], 3, 2, 1)
        return compare(t[-1], ref)

    if not interpret:
        _precompile(kp, run, configs)
    return run, check


def pool_groups(dtypes, shape=POOL_SHAPE, device: str = "cuda", copies: int = 2, configs=None) -> list[Group]:
    configs = pool_grid() if configs is None else configs
    n_in, n_out = _numel(shape), _numel(_pool_out(shape))
    out = []
    for kind in ("max", "avg"):
        for backward in (False, True):
            for dtype in dtypes:
                es = torch.empty((), dtype=dtype).element_size()
                ix = 8 if kind == "max" else 0  # the int64 indices written forward, read backward
                kernel = f"_{kind}_pool_{'bwd' if backward else 'fwd'}_kernel"
                out.append(Group(kernel, f"{kind}_pool2d 3x3/2 p1 {'bwd' if backward else 'fwd'}", _dtype_str(dtype),
                                 "x".join(map(str, shape)), n_in * es + n_out * (es + ix), configs,
                                 functools.partial(_pool_setup, kind, backward, shape, dtype, device, copies)))
    return out


def _adam_reference(p, g, m, v):
    """torch's single-tensor Adam (``torch.optim.adam``), float32, at step ``ADAM_STEP``."""
    hp, t = ADAM_HP, ADAM_STEP
    gf = g.float()
    m = m.lerp(gf, 1 - hp["beta1"])
    v = v * hp["beta2"] + (1 - hp["beta2"]) * gf * gf
    denom = v.sqrt() / math.sqrt(1 - hp["beta2"] ** t) + hp["eps"]
    p = (p.float() - (hp["lr"] / (1 - hp["beta1"] ** t)) * m / denom).to(p.dtype)
    return p, m, v


def _adam_setup(sizes, dtype, device: str, copies: int, configs):
    from gpu_nn.kernels.triton import optim as ko
    from gpu_nn.optim import _triton as glue

    interpret = _interpret()

    def make():
        P = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
        G = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
        M = [torch.randn(n, device=device) * 0.1 for n in sizes]
        V = [torch.rand(n, device=device) * 0.01 for n in sizes]
        steps = [torch.full((), ADAM_STEP, device=device) for _ in sizes]
        return P, G, M, V, steps

    tables = {}  # built once per (input set, chunk): outside the timed launches

    def launch(cfg, t):
        P, G, M, V, steps = t
        chunk = cfg["BLOCK"] * cfg["ITERS"]
        key = (id(t), chunk)
        if key not in tables:
            tables[key] = glue._table(P, G, [M, V, [None] * len(P)], steps, [0] * len(P), P[0].device, chunk)
        table, n = tables[key]
        with _configured(ko, "config", cfg):
            ko.launch("adam", table, n, P[0], G[0], M[0], steps[0], ADAM_HP, {"wd_mode": 0, "amsgrad": False}, interpret)

    nxt = harness.rotating(make, copies)

    def run(cfg):
        launch(cfg, nxt())

    def check(cfg):
        t = make()  # a fresh set: the timed ones have taken many steps
        expected = [_adam_reference(*a) for a in zip(*t[:4])]
        launch(cfg, t)
        cat = lambda ts: torch.cat([x.reshape(-1) for x in ts])  # noqa: E731
        return _all_ok(*(compare(cat(t[i]), cat([e[j] for e in expected])) for i, j in ((0, 0), (2, 1), (3, 2))))

    if not interpret:
        _precompile(ko, run, configs)
    return run, check


def adam_groups(dtypes, sizes=None, device: str = "cuda", copies: int = 2, configs=None) -> list[Group]:
    from gpu_nn.benchmarks import bench_optim

    sizes = bench_optim._mixed_sizes(ADAM_PARAMS) if sizes is None else sizes
    configs = optim_grid() if configs is None else configs
    total = sum(sizes)
    out = []
    for dtype in dtypes:
        pb = torch.empty((), dtype=dtype).element_size()
        # bench_optim's count: p, g read + p written; m, v read + written (float32)
        out.append(Group("_adam_kernel", "adam step", _dtype_str(dtype), f"{len(sizes)} tensors {total}",
                         total * (3 * pb + 16), configs, functools.partial(_adam_setup, sizes, dtype, device, copies)))
    return out


CONV_BUDGET_S = 60.0  # the conv section's share of the sweep's budget (at most half of it)


def conv_config(cfg: tuple) -> dict:
    """A forward candidate (``kernels/triton/conv.py``: a config tuple, VIA_CL appended for the
    via-channels_last variant) as a row's config."""
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return {"variant": "via_channels_last" if len(cfg) == 6 else "direct", **dict(zip(keys, cfg[:5]))}


def _conv_tuple(cfg: dict) -> tuple:
    t = tuple(cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
    if cfg["variant"] == "via_channels_last":
        from gpu_nn.kernels.triton import conv as kt

        return (*t, kt.VIA_CL)
    return t


def _conv_problem(p: dict, dtype, channels_last: bool, device: str, fill: bool = True, seed: int = 0):
    """(x, w, b, y): bench_conv's tensors for problem ``p``, y laid out as our forward lays it out
    (torch's rule) and unwritten; ``fill=False``: all unwritten (for the layout questions only)."""
    from gpu_nn.ops import conv as oc

    n, c, sp, o, k, groups = p["n"], p["c"], p["spatial"], p["o"], p["k"], p.get("groups", 1)
    fmt = torch.channels_last if channels_last and len(sp) == 2 else torch.contiguous_format
    gen = torch.Generator(device="cpu").manual_seed(seed)
    new = (lambda *s: torch.randn(*s, generator=gen)) if fill else (lambda *s: torch.empty(*s))
    x = new(n, c, *sp).to(device=device, dtype=dtype, memory_format=fmt)
    w = (new(o, c // groups, *k) / math.sqrt(c // groups * math.prod(k))).to(device=device, dtype=dtype, memory_format=fmt)
    b = new(o).to(device=device, dtype=dtype)
    st, pad = p.get("stride", 1), p.get("padding", 0)
    out = [(s + 2 * pad - kk) // st + 1 for s, kk in zip(sp, k)]
    y = oc._alloc((n, o, *out), oc._memory_format(x, w), lambda s: torch.empty(s, dtype=dtype, device=device))
    return x, w, b, y


def _as4d(t):
    """conv1d's [N, C, L] as [N, C, 1, L] (a view), as gpu_nn.ops.conv hands it to the kernels;
    a bias is left as it is."""
    return t if t.dim() != 3 else t.unsqueeze(2)


def conv_candidates(p: dict, dtype, channels_last: bool) -> list[dict]:
    """The heuristic's forward configuration first, then every candidate the measuring chooser
    would time for this problem (``problem_candidates``: the NHWC tiles and the via-channels_last
    variant where they apply; the float32 precision as the launcher decides it here), then torch
    (``{"provider": "torch"}``). Depthwise problems have one configuration: none."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    groups = p.get("groups", 1)
    if kt.is_depthwise(p["c"], p["c"] // groups, groups):
        return []
    x, w, b, y = (_as4d(t) for t in _conv_problem(p, dtype, channels_last, "cpu", fill=False))
    default = kt.pick_config(p["o"] // groups, y.shape[0] * y.shape[2] * y.shape[3], dtype.itemsize == 2, False)
    cands = kt.problem_candidates(x, w, b, y, groups, oc._precision(dtype))
    return [conv_config(c) for c in dict.fromkeys([default, *cands])] + [{"provider": "torch"}]


def _conv_setup(p: dict, dtype, channels_last: bool, device: str, copies: int, configs):
    """The forward through ``kernels/triton/conv.conv_forward`` with a chooser that answers the
    row's configuration (bias, no activation); torch's conv for the torch row. The check compares
    against torch's convolution of the same inputs in float64."""
    import torch.nn.functional as TF

    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    interpret = _interpret()
    nd = len(p["spatial"])
    st, pad, groups = p.get("stride", 1), p.get("padding", 0), p.get("groups", 1)
    st4, pads4, dl4 = ([st, st] if nd == 2 else [1, st]), ([pad] * 4 if nd == 2 else [0, 0, pad, pad]), [1, 1]
    tconv = TF.conv2d if nd == 2 else TF.conv1d
    prec = oc._precision(dtype)
    # against float64: half precision and float32 under TF32 round their operands (about 2^-8 and
    # 2^-11 relative), float32 accumulates K = C*taps products (outputs are O(1) here)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 or prec == "tf32" else {"rtol": 1e-4, "atol": 1e-4}

    def launch(cfg, t):
        x, w, b, y = t
        if cfg.get("provider") == "torch":
            return tconv(x, w, b, st, pad, 1, groups)
        choice = _conv_tuple(cfg)
        kt.conv_forward(_as4d(x), _as4d(w), b, _as4d(y), st4, pads4, dl4, groups, None, prec, interpret,
                        choose=lambda op, key, cands, run, default, **_: choice)
        return y

    seeds = itertools.count()
    nxt = harness.rotating(lambda: _conv_problem(p, dtype, channels_last, device, seed=next(seeds)), copies)

    def run(cfg):
        launch(cfg, nxt())

    chk = _conv_problem(p, dtype, channels_last, device, seed=99)
    ref = tconv(*(t.double() for t in chk[:3]), st, pad, 1, groups)

    def check(cfg):
        chk[3].fill_(float("nan"))
        return compare(launch(cfg, chk).double(), ref, **tol)

    if not interpret:
        _conv_precompile(kt, run, [c for c in configs if "provider" not in c])
    return run, check


def _conv_precompile(kt, run: Callable[[dict], None], configs) -> None:
    """:func:`_precompile` for the conv launchers, which index their kernel object directly
    (``_conv_fwd_kernel[grid](...)``): a stand-in whose launches are ``warmup`` calls."""
    from gpu_nn.kernels.triton._compat import parallel_compile

    kernel = kt._conv_fwd_kernel

    class Warm:
        def __getitem__(self, grid_):
            return lambda *args, **kw: kernel.warmup(*args, grid=grid_, **kw)

    with parallel_compile(min(16, len(configs))) as available:
        if not available:
            return
        with _patched(kt, _conv_fwd_kernel=Warm()):
            for cfg in configs:
                try:
                    run(cfg)
                except Exception:  # noqa: BLE001 - reported by the timed launch
                    pass


def conv_groups(dtypes, layouts=("nchw", "channels_last"), shapes=None, device: str = "cuda", copies: int = 2,
                configs=None) -> list[Group]:
    """The forward of bench_conv's conv2d / conv1d cases (``GPU_SHAPES``; depthwise has no
    candidates), per dtype and layout (channels_last: conv2d only, as bench_conv): every
    configuration of :func:`conv_candidates` and torch. ResNet's 3x3 stages first."""
    from gpu_nn.benchmarks import bench_conv

    shapes = bench_conv.GPU_SHAPES if shapes is None else shapes
    out = []
    for dtype in dtypes:
        es = torch.empty((), dtype=dtype).element_size()
        for layout in layouts:
            for name, shape, p in shapes:
                cl = layout == "channels_last"
                if cl and len(p["spatial"]) != 2:
                    continue
                cfgs = conv_candidates(p, dtype, cl) if configs is None else configs
                if not cfgs:
                    continue
                x, w, _, y = _conv_problem(p, dtype, cl, "cpu", fill=False)
                out.append(Group("_conv_fwd_kernel", f"{name} fwd {layout}", _dtype_str(dtype), shape,
                                 (x.numel() + w.numel() + y.numel()) * es, cfgs,
                                 functools.partial(_conv_setup, p, dtype, cl, device, copies)))
    order = {n: i for i, n in enumerate(("conv2d 3x3", "conv2d 1x1", "conv2d 7x7/2 stem"))}
    return sorted(out, key=lambda g: order.get(g.op.split(" fwd")[0], len(order)))


def default_groups(device: str = "cuda") -> list[Group]:
    """The GPU sweep, most wanted first: relu at the main shape, pooling and Adam in float32,
    sigmoid / tanh, pooling and Adam in bfloat16, then the other activation shapes."""
    from gpu_nn.benchmarks import bench_activation

    f32, bf16 = torch.float32, torch.bfloat16
    main, others = bench_activation.GPU_SHAPES[0], bench_activation.GPU_SHAPES[1:]
    return (activation_groups(["relu"], [main], [f32, bf16], device)
            + pool_groups([f32], device=device) + adam_groups([f32], device=device)
            + activation_groups(["sigmoid", "tanh"], [main], [f32, bf16], device)
            + pool_groups([bf16], device=device) + adam_groups([bf16], device=device)
            + activation_groups(["relu", "sigmoid", "tanh"], others, [f32, bf16], device))


# ------------------------------------------------------------------------------ runner

def do_bench_seconds(fn) -> float:
    """Median seconds per call: triton.testing.do_bench (CUDA events, L2 flushed before each)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, return_mode="median") / 1e3


def _row_line(row: dict) -> str:
    head = f"{row['op']} {row['dtype']} {row['shape']} {config_str(row.get('config', {}))}"
    if "error" in row:
        return f"{head}: error {row['error'][:120]}"
    return f"{head}: {row['us']:.1f} us {row['gbps']:.0f} GB/s {'ok' if row['correct'] else 'WRONG'}"


def run_sweep(groups, out_path: str, budget_s: float, bench=do_bench_seconds, clock=time.perf_counter,
              cleanup=None, log=print) -> dict:
    """Every group's every configuration: check once, then ``bench(fn) -> seconds``; the JSON at
    ``out_path`` is rewritten after every row. No new group or row starts once ``budget_s``
    seconds have passed (``clock``); the document then says where it stopped."""
    t0 = clock()
    doc = {"environment": harness.environment(), "budget_s": budget_s, "status": "running", "elapsed_s": 0.0,
           "rows": []}
    rows = doc["rows"]
    stopped = None

    def save():
        doc["elapsed_s"] = round(clock() - t0, 3)
        harness.dump_json(doc, out_path)

    for gi, g in enumerate(groups):
        if clock() - t0 >= budget_s:
            stopped = (gi, 0)
            break
        base = {"kernel": g.kernel, "op": g.op, "dtype": g.dtype, "shape": g.shape, "bytes": g.bytes}
        try:
            run, check = g.setup(g.configs)
        except Exception as exc:  # noqa: BLE001 - the group is reported, the sweep goes on
            rows.append({**base, "error": f"setup: {type(exc).__name__}: {exc}"[:500]})
            log(_row_line(rows[-1]))
            save()
            continue
        for ci, cfg in enumerate(g.configs):
            if clock() - t0 >= budget_s:
                stopped = (gi, ci)
                break
            row = {**base, "config": dict(cfg), "default": ci == 0}
            try:
                row["correct"], row["max_err"] = check(cfg)
                s = bench(functools.partial(run, cfg))
                row["us"] = s * 1e6
                row["gbps"] = g.bytes / s / 1e9
            except Exception as exc:  # noqa: BLE001 - one configuration failing (compile, launch) is data
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
            log(_row_line(row))
            save()
        run = check = None
        if cleanup is not None:
            cleanup()
        if stopped is not None:
            break
    if stopped is None:
        doc["status"] = "complete"
    else:
        gi, ci = stopped
        doc["status"] = (f"budget: stopped after {clock() - t0:.1f} s of {budget_s:g} s, at group {gi + 1}/{len(groups)}"
                         f" config {ci + 1}")
        doc["not_measured"] = [f"{g.op} {g.dtype} {g.shape}" + (f" (from config {ci + 1})" if k == 0 and ci else "")
                               for k, g in enumerate(groups[gi:])]
    doc["best"] = best(rows)
    save()
    return doc


def best(rows) -> list[dict]:
    """Per (kernel, op, dtype, shape): the default configuration's time and the fastest correct
    configuration, with default / best (above 1: the best is faster)."""
    groups = collections.OrderedDict()
    for r in rows:
        if "us" in r:
            groups.setdefault((r["kernel"], r["op"], r["dtype"], r["shape"]), []).append(r)
    out = []
    for (kernel, op, dtype, shape), rs in groups.items():
        theirs = next((r for r in rs if r["config"].get("provider") == "torch"), None)  # conv: torch's time
        rs = [r for r in rs if r is not theirs]
        good = [r for r in rs if r.get("correct")]
        default = next((r for r in rs if r.get("default")), None)
        item = {"kernel": kernel, "op": op, "dtype": dtype, "shape": shape, "configs": len(rs),
                "wrong": sum(not r.get("correct") for r in rs)}
        if default is not None:
            item.update(default_config=default["config"], default_us=default["us"], default_gbps=default["gbps"])
        if good:
            b = min(good, key=lambda r: r["us"])
            item.update(best_config=b["config"], best_us=b["us"], best_gbps=b["gbps"])
            if default is not None:
                item["speedup"] = default["us"] / b["us"]
        if theirs is not None:
            item["torch_us"] = theirs["us"]
            if good:
                item["best_vs_torch"] = item["best_us"] / theirs["us"]
        out.append(item)
    return out


def format_best(items) -> str:
    lines = ["op | dtype | shape | default us (GB/s) | best us (GB/s) | best config | default/best | wrong"]
    for b in items:
        d = f"{b['default_us']:.1f} ({b['default_gbps']:.0f})" if "default_us" in b else "-"
        s = f"{b['best_us']:.1f} ({b['best_gbps']:.0f})" if "best_us" in b else "-"
        lines.append(f"{b['op']} | {b['dtype']} | {b['shape']} | {d} | {s} | {config_str(b.get('best_config', {}))} | "
                     f"{b.get('speedup', float('nan')):.2f} | {b['wrong']}"
                     + (f" | torch {b['torch_us']:.1f} us, best/torch {b.get('best_vs_torch', float('nan')):.2f}"
                        if "torch_us" in b else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ profile

def profile_cases(device: str = "cuda") -> list[tuple[str, str, dict]]:
    """``[(op, shape, {provider: setup})]``: bench_<family>'s setups at their benchmark shapes,
    relu first (its backward is the open question); each setup() returns one fwd+bwd (a step)."""
    import torch.nn.functional as TF

    import gpu_nn.functional as F
    import gpu_nn.optim as go
    from gpu_nn.benchmarks import bench_activation as ba, bench_dense as bd, bench_optim as bo, bench_pool as bp

    f32, bf16 = torch.float32, torch.bfloat16
    shape = ba.GPU_SHAPES[0]
    act = lambda fn, be, shp, dt: ba._provider(fn, be, shp, dt, device, True)  # noqa: E731
    cases = []
    for name, ours, theirs in (("relu", F.relu, torch.relu), ("sigmoid", F.sigmoid, torch.sigmoid)):
        cases.append((f"{name} fwd+bwd", ba._shape_str(shape, f32),
                      {"torch": act(theirs, None, shape, f32), "triton": act(ours, "triton", shape, f32)}))
    make, _ = bp._inputs(POOL_SHAPE, device, f32)
    for name, ours, theirs in (("max_pool2d", F.max_pool2d, TF.max_pool2d), ("avg_pool2d", F.avg_pool2d, TF.avg_pool2d)):
        cases.append((f"{name} 3x3/2 p1 fwd+bwd", ba._shape_str(POOL_SHAPE, f32),
                      {"torch": bp._fwd_bwd(theirs, None, make), "triton": bp._fwd_bwd(ours, "triton", make),
                       "cupy": bp._fwd_bwd(ours, "cupy", make)}))
    cases.append(("softmax fwd+bwd", ba._shape_str(LOGITS, bf16),
                  {"torch": act(lambda x: torch.softmax(x, -1), None, LOGITS, bf16),
                   "triton": act(lambda x: F.softmax(x, -1), "triton", LOGITS, bf16)}))
    ce = bd._ce_inputs(*LOGITS, device, bf16)
    cases.append(("cross_entropy fwd+bwd", ba._shape_str(LOGITS, bf16),
                  {"torch": bd._ce_setup(ce, TF.cross_entropy, None), "triton": bd._ce_setup(ce, F.cross_entropy, "triton")}))
    M, K, N = LINEAR
    for dt in (f32, bf16):
        lin = bd._linear_inputs(M, K, N, device, dt)
        cases.append(("linear fwd+bwd", f"{M}x{K}->{N} {_dtype_str(dt)}",
                      {"torch": bd._linear_setup(lin, TF.linear, None, True),
                       "triton": bd._linear_setup(lin, F.linear, "triton", True)}))
    sizes = bo._mixed_sizes(ADAM_PARAMS)
    cases.append(("adam step", f"{len(sizes)} tensors {sum(sizes)} float32",
                  {"torch": bo._setup(torch.optim.Adam, sizes, f32, device, fused=True),
                   "triton": bo._setup(go.Adam, sizes, f32, device, backend="triton"),
                   "cupy": bo._setup(go.Adam, sizes, f32, device, backend="cupy")}))
    return cases


def summarise(events) -> dict:
    """GPU events (``{name, start_us, dur_us}``) -> count, summed duration, busy time (the union
    of the intervals), span (first start to last end), idle = span - busy, and per kernel name
    ``{name, count, total_us}``, largest total first."""
    if not events:
        return {"events": 0, "total_us": 0.0, "busy_us": 0.0, "span_us": 0.0, "idle_us": 0.0, "kernels": []}
    spans = sorted((e["start_us"], e["start_us"] + e["dur_us"]) for e in events)
    busy, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    span = max(e for _, e in spans) - spans[0][0]
    per = collections.OrderedDict()
    for e in events:
        c, t = per.get(e["name"], (0, 0.0))
        per[e["name"]] = (c + 1, t + e["dur_us"])
    kernels = [{"name": n, "count": c, "total_us": t} for n, (c, t) in per.items()]
    kernels.sort(key=lambda k: -k["total_us"])
    return {"events": len(events), "total_us": sum(e["dur_us"] for e in events), "busy_us": busy, "span_us": span,
            "idle_us": span - busy, "kernels": kernels}


def format_profile(records, name_width: int = 90) -> str:
    """The compact table: per (op, provider) a header line, then kernel name, count, total us."""
    lines = []
    for r in records:
        head = f"{r['op']} {r['shape']} [{r['provider']}]"
        if "error" in r or "skipped" in r:
            lines.append(f"{head}: {r.get('error') or r.get('skipped')}")
            continue
        s = r["summary"]
        lines.append(f"{head}: wall {r['wall_us']:.0f} us (profiled {r['profiled_wall_us']:.0f}); GPU busy "
                     f"{s['busy_us']:.0f} us of a {s['span_us']:.0f} us span (idle {s['idle_us']:.0f}); {s['events']} events")
        for k in s["kernels"]:
            name = k["name"] if len(k["name"]) <= name_width else k["name"][:name_width - 3] + "..."
            lines.append(f"    {name:<{name_width}} {k['count']:>5} {k['total_us']:>10.1f}")
    return "\n".join(lines)


def _cpu_top(prof, n: int = 12) -> list[dict]:
    out = []
    for k in prof.key_averages():
        self_us = getattr(k, "self_cpu_time_total", 0.0)
        if self_us:
            out.append({"name": k.key, "count": k.count, "self_cpu_us": float(self_us)})
    out.sort(key=lambda r: -r["self_cpu_us"])
    return out[:n]


def profile_one(setup, sync=torch.cuda.synchronize) -> dict:
    """One warm region of ``setup()``'s callable: wall time alone, then under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from gpu_nn.benchmarks import kernel_counts

    run = setup()
    for _ in range(2):  # compilation, tuning, caches, allocator
        run()
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        sync()
        pwall = time.perf_counter() - t0
    events = kernel_counts.gpu_events(prof.events())
    return {"wall_us": wall * 1e6, "profiled_wall_us": pwall * 1e6, "summary": summarise(events),
            "events": events, "cpu_top": _cpu_top(prof)}


def run_profile(cases, out_dir: str, budget_s: float, profile=profile_one, clock=time.perf_counter,
                cleanup=None, log=print) -> list[dict]:
    """Every (case, provider) through ``profile``, into ``out_dir``/profile.json (after each)
    and profile.txt; a provider whose backend lacks the op is recorded as skipped."""
    from gpu_nn._errors import BackendUnavailableError

    t0 = clock()
    records = []
    doc = {"environment": harness.environment(), "status": "running", "records": records}
    for op, shape, providers in cases:
        for provider, setup in providers.items():
            rec = {"op": op, "shape": shape, "provider": provider}
            if clock() - t0 >= budget_s:
                rec["skipped"] = f"budget of {budget_s:g} s spent"
            else:
                try:
                    rec.update(profile(setup))
                except BackendUnavailableError as exc:
                    rec["skipped"] = f"not implemented: {exc}"[:300]
                except Exception as exc:  # noqa: BLE001 - one provider failing is data
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
                if cleanup is not None:
                    cleanup()
            records.append(rec)
            log(format_profile([rec]).splitlines()[0])
            harness.dump_json(doc, os.path.join(out_dir, "profile.json"))
    doc["status"] = "complete"
    doc["elapsed_s"] = round(clock() - t0, 3)
    harness.dump_json(doc, os.path.join(out_dir, "profile.json"))
    with open(os.path.join(out_dir, "profile.txt"), "w") as f:
        f.write(format_profile(records) + "\n")
    return records


# ------------------------------------------------------------------------------ command line

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for sweep.json, profile.json, profile.txt")
    ap.add_argument("--budget-s", type=float, default=150.0, help="seconds for the sweep (default %(default)s)")
    ap.add_argument("--conv-budget-s", type=float, default=CONV_BUDGET_S,
                    help="seconds of the sweep's budget for its conv section, first (at most half; default %(default)s)")
    ap.add_argument("--profile-budget-s", type=float, default=90.0,
                    help="seconds after which the profile starts no new case (default %(default)s)")
    ap.add_argument("--only", choices=("sweep", "profile"), help="one part only (default both)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep: no GPU here, nothing to measure")
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.only in (None, "sweep"):
        # conv first, within its share: every forward candidate (and torch) at bench_conv's shapes;
        # its rows go to sweep_conv.json as they come and into sweep.json under "conv"
        conv = run_sweep(conv_groups([torch.float32, torch.bfloat16], device="cuda"),
                         os.path.join(args.out, "sweep_conv.json"), min(args.conv_budget_s, args.budget_s / 2),
                         cleanup=torch.cuda.empty_cache)
        print(f"sweep conv: {len(conv['rows'])} rows, {conv['status']}")
        print(format_best(conv["best"]), flush=True)
        path = os.path.join(args.out, "sweep.json")
        doc = run_sweep(default_groups("cuda"), path, max(0.0, args.budget_s - conv["elapsed_s"]),
                        cleanup=torch.cuda.empty_cache)
        doc["conv"] = conv
        harness.dump_json(doc, path)
        print(f"sweep: {len(doc['rows'])} rows, {doc['status']}")
        print(format_best(doc["best"]), flush=True)
    if args.only in (None, "profile"):
        records = run_profile(profile_cases("cuda"), args.out, args.profile_budget_s, cleanup=torch.cuda.empty_cache)
        print(format_profile(records))
        done = sum("summary" in r for r in records)
        print(f"profile: {done} of {len(records)} (op, provider) regions profiled, "
              f"{sum('error' in r for r in records)} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
