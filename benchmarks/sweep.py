"""Launch-configuration sweep and profiler breakdown of the memory-bound kernels (GPU only).

(a) ``sweep``: every configuration of a candidate grid, at the benchmark shapes, in float32 and
bfloat16, of

* the activation kernels (``_act_fwd_kernel`` / ``_act_bwd_kernel``, relu / sigmoid / tanh):
  BLOCK 1024..16384 x num_warps 4 / 8 / 16 (no persistent grid-stride variant exists);
* the pooling kernels (max with indices / avg, forward / backward, 3x3/2 padding 1):
  BLOCK 128..2048 x num_warps 2 / 4 / 8;
* the Adam kernel (10.5M parameters in bench_optim's mix of tensors): BLOCK x ITERS x num_warps,
  its chunk table built for each chunk size;
* linear's three GEMMs (issue 15) at bench_dense's 8192x4096 -> 4096, bfloat16 and float32
  (TF32): every candidate dense.py's tuning times for such a problem (the pointer kernel's, then
  the persistent TMA kernel's) through ``_launch_matmul``, and torch's matmul (cuBLAS; ``best``
  gives best / torch);
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
``device_seconds``: CUDA events, median, L2 flushed before every call as ``triton.testing.do_bench``
does, the calls queued behind a GPU sleep so that the events time the device and not our host
path (row ``queued``, ``host_us``), two input sets in rotation, each larger than the H200's L2. One JSON row per (kernel, dtype, shape, config): us,
GB/s against the bytes the kernel must move, correct (torch.testing.assert_close's defaults for
the dtype) and the largest error. ``DIR/sweep.json`` is rewritten after every row, so a run cut
short keeps what it measured; ``--budget-s`` stops the sweep cleanly between rows. Groups run in
order of what matters most: relu at the main shape, pooling and Adam in float32, then the rest.
Kernel defaults are not changed here: the data is for choosing them.

(c) ``rnn`` (issue 16): first a torch.profiler breakdown like (b) of bench_rnn's LSTM T=100 N=64
I=H=512 float32 (TF32) forward and forward+backward and bfloat16 forward, torch (cuDNN) against
our triton and cupy backends (``DIR/rnn_profile.json``, ``.txt``: time per kernel name); then a sweep
like (a) into ``DIR/rnn_sweep.json``, most wanted first (``rnn_groups``):

* the step forward ``_rnn_step_fwd_kernel`` (LSTM, N=64 H=512, TF32 then bfloat16): BLOCK_B 16 /
  32 / 64 x BLOCK_H 16 / 32 / 64 x BLOCK_K 32 / 64 / 128 x num_warps 2 / 4 / 8 at three stages,
  pruned to grids of at least 32 programs and to what fits in shared memory (51 and 54
  configurations), then the 4 fastest at 1 / 2 / 4 stages;
* the persistent forward (LSTM, T=50 N=16, both dtypes): W_hh resident at 8 and 4 warps (the
  product's form there: ``resident_kp``), then re-read from L2 every step in BLOCK_H x BLOCK_K x
  num_warps (27; always one stage: see ``persist_launch``), programs = min((batch, hidden) tiles,
  SMs) as the product;
* the input projection (6400x512 -> 2048): ``_rnn_matmul_kernel`` in 7 tiles, dense.py's linear
  kernel in its 4 tuning candidates (the fastest is its tuned choice), torch.addmm;
* the step backward ``_rnn_step_bwd_kernel`` (LSTM, N=64) as the forward (54 + 12 per dtype);
* GRU and Elman RNN steps, forward and backward, in the 6 fastest LSTM configurations; the
  per-step LSTM forward at N=16 (24 + 12) and N=4 (24; float32 runs it at small batch), the
  persistent LSTM at N=4 and GRU at N=16 in the 6 fastest of the N=16 LSTM.

About 500 configurations in all, each compiled once (the Triton cache keeps them across runs).
The step kernels run on buffers shaped as the driver's; the buffers a launch updates in place
(the projection, which becomes the activated gates; the persistent kernel's; the backward's carry
and dc) have one copy per launch of a timed batch (8 step launches, 3 persistent), restored before
each batch outside the timed region; ``queued_seconds`` times the batch with CUDA events behind a
GPU sleep, so that the host's launch rate is not what is measured, and no L2 flush (W_hh stays in
L2 across the steps of a layer). Each configuration's outputs are checked against the product's
own configuration on the same inputs (the projection: against a float64 product, 4 units of the
dot's roundoff of the largest output); registers and spills of each launch are recorded and
``best`` passes over spilling ones. ``us`` is per launch (a persistent launch is the whole
sequence). kernels/triton/rnn.py ``STEP_TABLE`` takes the step kernels' winners.

(b) ``profile``: one warm forward+backward (a step for Adam) at the benchmark shape of relu,
sigmoid, max_pool2d, avg_pool2d, softmax, cross_entropy, linear (8192x4096 -> 4096, float32 and
bfloat16) and Adam, for torch and ours (triton; cupy where it has the op), under torch.profiler
with CPU and CUDA activity: every GPU event (name, start, duration), the region's wall time
(unprofiled and profiled), the GPU's busy time and span (span - busy: the GPU idle inside the
region, host-bound gaps), and the CPU ops with the most self time. ``DIR/profile.json`` and a
compact table (kernel, count, total us per provider), ``DIR/profile.txt``, printed last.

(d) ``demo`` (only when asked for): ``DEMO_STEPS`` training steps of each ``gpu-nn demo`` model,
ours (auto backend) against its torch twin, then the recurrent models' steps with every time
loop one persistent Triton launch (``GPU_NN_RNN_PERSISTENT=1``), profiled as (b) and once more
under cProfile: the GPU busy time against the wall time says whether a step is host-bound, the
Python functions with the most own time say where the host spends it
(``DIR/demo_profile.json`` / ``.txt``).

    python -m gpu_nn.benchmarks.sweep --out DIR [--budget-s S] [--only sweep|rnn|profile|demo]

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


# the tiled pooling kernels' tiles (BH, BW, num_warps): around tile_config's picks at POOL_SHAPE
# (8 x 64 for the 56 x 56 output, 4 x 128 for the 112 x 112 input, 4 warps), narrower and wider
# rows, fewer and more elements per thread
POOL_TILES = ((8, 64, 4), (4, 128, 4), (4, 64, 2), (16, 64, 8), (8, 32, 2), (2, 128, 2), (16, 32, 4), (8, 128, 8))


def pool_tile_grid(default=None) -> list[dict]:
    """The tiled kernels' configurations, ``default`` (tile_config's pick at the group's plane) first."""
    cfgs = [dict(zip(("BH", "BW", "num_warps"), t)) for t in POOL_TILES]
    if default is not None:
        d = dict(zip(("BH", "BW", "num_warps"), default))
        cfgs = [d] + [c for c in cfgs if c != d]
    return cfgs


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


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float | str]:
    """(within torch.testing.assert_close's default tolerances for the dtype, largest absolute
    error); an index tensor must be equal."""
    return compare_tol(out, ref, None, None)


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
    inputs (and compiles the configurations) and returns ``(run, check)`` or ``(run, check,
    reset)``: ``run(cfg)`` launches ``launches`` times (each on its next input set), ``check(cfg)``
    launches once and returns ``(correct, max_err)`` or ``(correct, max_err, extra)`` (``extra``
    joins the row: registers, spills); ``reset()`` restores what the launches update in place,
    and is then called before every timed ``run``, outside the timed region. ``configs``: a list,
    or a function of the rows measured so far returning one (a group that refines an earlier
    group's best). ``bytes`` / ``flops``: per launch."""

    kernel: str
    op: str
    dtype: str
    shape: str
    bytes: int
    configs: list | Callable
    setup: Callable
    launches: int = 1
    flops: float = 0


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


def _pool_setup(kind: str, backward: bool, shape, dtype, device: str, copies: int, configs, tiled: bool = False):
    """``tiled``: the configurations are the tiled kernels' (BH, BW, num_warps), launched as the
    ``cfg`` the launchers take; else the flat kernels' (BLOCK, num_warps) through launch_config."""
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
        forced = (kp.TILE, cfg["BH"], cfg["BW"], cfg["num_warps"]) if tiled else None
        with contextlib.nullcontext() if tiled else _configured(kp, "launch_config", cfg):
            if kind == "max" and backward:
                kp.max_pool2d_backward(t[1], t[2], t[3], K3, S2, P1, D1, interpret, cfg=forced)
            elif kind == "max":
                kp.max_pool2d_forward(t[0], t[1], t[2], K3, S2, P1, D1, False, interpret, cfg=forced)
            elif backward:
                kp.avg_pool2d_backward(t[1], t[2], K3, S2, P1, True, 0, interpret, cfg=forced)
            else:
                kp.avg_pool2d_forward(t[0], t[1], K3, S2, P1, False, True, 0, interpret, cfg=forced)

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


def pool_groups(dtypes, shape=POOL_SHAPE, device: str = "cuda", copies: int = 2, configs=None,
                tile_configs=None) -> list[Group]:
    """The flat kernels' groups (``configs``, default pool_grid()), each followed by the tiled
    kernel's group of the same op (``tile_configs``, default pool_tile_grid() with tile_config's
    pick for the plane first; an empty list leaves them out)."""
    from gpu_nn.kernels.triton import pool as kp

    configs = pool_grid() if configs is None else configs
    n_in, n_out = _numel(shape), _numel(_pool_out(shape))
    out = []
    for kind in ("max", "avg"):
        for backward in (False, True):
            plane = shape[-2:] if backward else _pool_out(shape)[-2:]
            tiles = pool_tile_grid(kp.tile_config(*plane, False)[1:]) if tile_configs is None else tile_configs
            for dtype in dtypes:
                es = torch.empty((), dtype=dtype).element_size()
                ix = 8 if kind == "max" else 0  # the int64 indices written forward, read backward
                kernel = f"_{kind}_pool_{'bwd' if backward else 'fwd'}_kernel"
                op = f"{kind}_pool2d 3x3/2 p1 {'bwd' if backward else 'fwd'}"
                nbytes = n_in * es + n_out * (es + ix)
                out.append(Group(kernel, op, _dtype_str(dtype), "x".join(map(str, shape)), nbytes, configs,
                                 functools.partial(_pool_setup, kind, backward, shape, dtype, device, copies)))
                if tiles:
                    out.append(Group(kernel.replace("_kernel", "_tile_kernel"), op + " tiled", _dtype_str(dtype),
                                     "x".join(map(str, shape)), nbytes, tiles,
                                     functools.partial(_pool_setup, kind, backward, shape, dtype, device, copies,
                                                       tiled=True)))
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


CONV_BUDGET_S = 75.0  # the conv section's share of the sweep's budget (at most half of it)


def conv_config(cfg: tuple) -> dict:
    """A forward candidate (``kernels/triton/conv.py``: a config tuple, FLAT appended for the
    one-loop K, SPLIT after it for split K, PACKED for the (channel, tap) K loop, VIA_CL for the
    via-channels_last variant) as a row's config."""
    from gpu_nn.kernels.triton import conv as kt

    if len(cfg) == 3:  # a depthwise tile (DW_FWD_CANDIDATES)
        return {"variant": "depthwise", **dict(zip(("BLOCK_P", "BLOCK_C", "num_warps"), cfg))}
    variant = "via_channels_last" if kt.VIA_CL in cfg[5:] else "direct"
    if kt.TMA in cfg:  # the TMA forward: a BH x BW block of output pixels, its own tuple
        keys = ("BH", "BW", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
        return {"variant": variant, "tma": True, **dict(zip(keys, cfg[:6]))}
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return {"variant": variant, "flat_k": kt.FLAT in cfg[5:],
            "split_k": kt.SPLIT in cfg[5:], "packed_k": kt.PACKED in cfg[5:], **dict(zip(keys, cfg[:5]))}


def _conv_tuple(cfg: dict) -> tuple:
    from gpu_nn.kernels.triton import conv as kt

    if cfg.get("variant") == "depthwise":
        return tuple(cfg[k] for k in ("BLOCK_P", "BLOCK_C", "num_warps"))
    if cfg.get("tma"):
        t = (*(cfg[k] for k in ("BH", "BW", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")), kt.TMA)
        return (*t, kt.VIA_CL) if cfg["variant"] == "via_channels_last" else t
    t = tuple(cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))
    if cfg.get("flat_k"):
        t = (*t, kt.FLAT)
    if cfg.get("split_k"):
        t = (*t, kt.SPLIT)
    if cfg.get("packed_k"):
        t = (*t, kt.PACKED)
    if cfg["variant"] == "via_channels_last":
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


def conv_candidates(p: dict, dtype, channels_last: bool, device: str = "cpu") -> list[dict]:
    """The heuristic's forward configuration first, then every candidate the measuring chooser
    would time for this problem (``problem_candidates``: the NHWC tiles and the via-channels_last
    variant where they apply; the float32 precision as the launcher decides it here), then torch
    (``{"provider": "torch"}``). Depthwise problems: their kernel's tiles (``DW_FWD_CANDIDATES``,
    the heuristic's ``DW_CONFIG`` first)."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    groups = p.get("groups", 1)
    if kt.is_depthwise(p["c"], p["c"] // groups, groups):
        return [conv_config(c) for c in dict.fromkeys([kt.DW_CONFIG, *kt.DW_FWD_CANDIDATES])] + [{"provider": "torch"}]
    x, w, b, y, stride, tma = _conv_standins(p, dtype, channels_last, device)
    prec = oc._precision(dtype)
    default = kt.fwd_heuristic(x, w, b, y, groups, kt.fwd_default(
        p["o"] // groups, y.shape[0] * y.shape[2] * y.shape[3], p["c"] // groups, math.prod(p["k"]),
        dtype.itemsize == 2, False), False, prec)
    cands = kt.problem_candidates(x, w, b, y, groups, prec) + (kt.tma_candidates(x, w, stride, groups, prec) if tma else [])
    return [conv_config(c) for c in dict.fromkeys([default, *cands])] + [{"provider": "torch"}]


def _conv_standins(p: dict, dtype, channels_last: bool, device: str) -> tuple:
    """(x, w, b, y, stride, tma) for the candidate lists of problem ``p``: unwritten CPU
    stand-ins with the device tensors' layouts (conv1d as [N, C, 1, L]), the convolution's stride
    as the launchers take it, and whether ``device`` runs the TMA kernels. The launchers' own
    lists ask the tensors' device for the TMA candidates, which a CPU stand-in never has: the
    callers add them from ``tma``."""
    from gpu_nn.kernels.triton import conv as kt

    x, w, b, y = (_as4d(t) for t in _conv_problem(p, dtype, channels_last, "cpu", fill=False))
    st = p.get("stride", 1)
    return x, w, b, y, (st, st) if len(p["spatial"]) == 2 else (1, st), kt.tma_device(torch.empty(0, device=device))


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
        return compare_tol(launch(cfg, chk), ref, **tol)

    if not interpret:  # the conv launchers index their kernel object directly
        _precompile_direct(kt, ("_conv_fwd_kernel", "_conv_tma_fwd_kernel", "_conv_dw_fwd_kernel"), run,
                           [c for c in configs if "provider" not in c])
    return run, check


CONV_BWD_SHAPES = ("conv2d 3x3", "conv2d 3x3/2", "conv2d 7x7/2 stem")  # bench_conv's conv2d cases the backward section takes


def conv_bwd_candidates(part: str, p: dict, dtype, channels_last: bool, device: str = "cpu") -> list[dict]:
    """The input gradient's (``part`` "dgrad") or weight gradient's ("wgrad") configurations for
    problem ``p``: the heuristic's first, then every candidate the measuring chooser would time
    (the TMA kernels where ``device`` has them), then torch."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    groups = p.get("groups", 1)
    if kt.is_depthwise(p["c"], p["c"] // groups, groups):
        return []
    x, w, _, y, stride, tma = _conv_standins(p, dtype, channels_last, device)
    prec = oc._precision(dtype)
    half = dtype.itemsize == 2
    cg, og, taps = p["c"] // groups, p["o"] // groups, math.prod(p["k"])
    if part == "dgrad":
        default = kt.pick_config(cg, x.shape[0] * x.shape[2] * x.shape[3], half, False, kt.DGRAD_CONFIGS)
        cands = kt.dgrad_problem_candidates(y, w, x, groups, prec) + (
            kt.tma_dgrad_candidates(y, w, stride, groups, prec) if tma else [])
    else:
        default = kt.wgrad_default(og, cg, taps, half, False)
        cands = kt.wgrad_candidates(half, cg, taps) + (kt.tma_wgrad_candidates(y, x, stride, groups, prec) if tma else [])
    return [conv_config(c) for c in dict.fromkeys([default, *cands])] + [{"provider": "torch"}]


def _conv_bwd_setup(part: str, p: dict, dtype, channels_last: bool, device: str, copies: int, configs):
    """The input or weight gradient through ``kernels/triton/conv`` with a chooser that answers
    the row's configuration; torch's (``torch.nn.grad.conv2d_input`` / ``conv2d_weight``: cuDNN's
    kernels) for the torch row. Checked against torch's float64 gradient of the same tensors."""
    from gpu_nn.kernels.triton import conv as kt
    from gpu_nn.ops import conv as oc

    interpret = _interpret()
    st, pad = p.get("stride", 1), p.get("padding", 0)
    prec = oc._precision(dtype)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 or prec == "tf32" else {"rtol": 1e-4, "atol": 1e-4}
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def problem(seed):
        x, w, _, y = _conv_problem(p, dtype, channels_last, device, seed=seed)
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        g = torch.randn(y.shape, generator=gen).to(device=device, dtype=dtype, memory_format=fmt)
        out = torch.empty_like(x) if part == "dgrad" else torch.empty_like(w)
        return x, w, g, out

    def launch(cfg, t):
        x, w, g, out = t
        if cfg.get("provider") == "torch":
            if part == "dgrad":
                return torch.nn.grad.conv2d_input(x.shape, w, g, st, pad)
            return torch.nn.grad.conv2d_weight(x, w.shape, g, st, pad)
        choice = _conv_tuple(cfg)
        force = lambda op, key, cands, run, default, **_: choice  # noqa: E731
        if part == "dgrad":
            kt.conv_backward_data(g, w, out, [st, st], [pad] * 4, [1, 1], 1, prec, interpret, choose=force)
        else:
            kt.conv_backward_weight(g, x, out, [st, st], [pad] * 4, [1, 1], 1, prec, interpret, choose=force)
        return out

    seeds = itertools.count(step=2)
    nxt = harness.rotating(lambda: problem(next(seeds)), copies)

    def run(cfg):
        launch(cfg, nxt())

    chk = problem(99)
    x64, w64, g64 = (t.double() for t in chk[:3])
    ref = (torch.nn.grad.conv2d_input(x64.shape, w64, g64, st, pad) if part == "dgrad"
           else torch.nn.grad.conv2d_weight(x64, w64.shape, g64, st, pad))

    def check(cfg):
        chk[3].fill_(float("nan"))
        return compare_tol(launch(cfg, chk), ref, **tol)

    if not interpret:
        names = {"dgrad": ("_conv_dgrad_kernel", "_conv_tma_dgrad_kernel"),
                 "wgrad": ("_conv_wgrad_kernel", "_conv_tma_wgrad_kernel")}[part]
        _precompile_direct(kt, names, run, [c for c in configs if "provider" not in c])
    return run, check


def conv_bwd_groups(dtypes, layouts=("channels_last", "nchw"), shapes=None, device: str = "cuda",
                    copies: int = 2) -> list[Group]:
    """The input and weight gradients of bench_conv's conv2d 3x3 stages, its 3x3/2 and the stem (CONV_BWD_SHAPES),
    per dtype and layout: every configuration of :func:`conv_bwd_candidates` and torch; per shape
    the input gradient, then the weight gradient (the stem's input gradient is left out: a
    network's first layer has none)."""
    from gpu_nn.benchmarks import bench_conv

    shapes = [s for s in bench_conv.GPU_SHAPES if s[0] in CONV_BWD_SHAPES] if shapes is None else shapes
    out = []
    for dtype in dtypes:
        es = torch.empty((), dtype=dtype).element_size()
        for layout in layouts:
            cl = layout == "channels_last"
            for name, shape, p in shapes:
                x, w, _, y = _conv_problem(p, dtype, cl, "cpu", fill=False)
                flops = 2.0 * y.numel() * w[0].numel()
                for part in ("dgrad", "wgrad"):
                    if part == "dgrad" and p["c"] < 16:
                        continue
                    cfgs = conv_bwd_candidates(part, p, dtype, cl, device)
                    out.append(Group(f"_conv_{part}_kernel", f"{name} {part} {layout}", _dtype_str(dtype), shape,
                                     (x.numel() + w.numel() + y.numel()) * es, cfgs,
                                     functools.partial(_conv_bwd_setup, part, p, dtype, cl, device, copies),
                                     flops=flops))
    return out


def conv_groups(dtypes, layouts=("nchw", "channels_last"), shapes=None, device: str = "cuda", copies: int = 2,
                configs=None) -> list[Group]:
    """The forward of bench_conv's conv2d / conv1d cases (``GPU_SHAPES``, depthwise's tiles
    too), per dtype and layout (channels_last: conv2d only, as bench_conv): every
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
                cfgs = conv_candidates(p, dtype, cl, device) if configs is None else configs
                if not cfgs:
                    continue
                x, w, _, y = _conv_problem(p, dtype, cl, "cpu", fill=False)
                dw = cfgs[0].get("variant") == "depthwise"
                out.append(Group("_conv_dw_fwd_kernel" if dw else "_conv_fwd_kernel", f"{name} fwd {layout}",
                                 _dtype_str(dtype), shape,
                                 (x.numel() + w.numel() + y.numel()) * es, cfgs,
                                 functools.partial(_conv_setup, p, dtype, cl, device, copies)))
    order = {n: i for i, n in enumerate(("conv2d 3x3", "conv2d 1x1", "conv2d 7x7/2 stem"))}
    return sorted(out, key=lambda g: order.get(g.op.split(" fwd")[0], len(order)))


def conv_sweep_groups(device: str = "cuda") -> list[Group]:
    """The conv section, most wanted first (its budget may end it anywhere): bfloat16 forwards
    (issue 15's first goal), bfloat16 gradients of channels_last problems (the layout convnets
    train in), float32 forwards, then the other gradients."""
    f32, bf16 = torch.float32, torch.bfloat16
    return (conv_groups([bf16], device=device) + conv_bwd_groups([bf16], ("channels_last",), device=device)
            + conv_groups([f32], device=device) + conv_bwd_groups([bf16], ("nchw",), device=device)
            + conv_bwd_groups([f32], device=device))


def default_groups(device: str = "cuda") -> list[Group]:
    """The GPU sweep, most wanted first: relu at the main shape, linear's three GEMMs (issue
    15: the pointer and persistent TMA matmul candidates against cuBLAS, bfloat16 and TF32),
    pooling and Adam in float32,
    sigmoid / tanh, pooling and Adam in bfloat16, then the other activation shapes."""
    from gpu_nn.benchmarks import bench_activation

    f32, bf16 = torch.float32, torch.bfloat16
    main, others = bench_activation.GPU_SHAPES[0], bench_activation.GPU_SHAPES[1:]
    return (activation_groups(["relu"], [main], [f32, bf16], device)
            + linear_groups([bf16, f32], device=device)
            + pool_groups([f32], device=device) + adam_groups([f32], device=device)
            + activation_groups(["sigmoid", "tanh"], [main], [f32, bf16], device)
            + pool_groups([bf16], device=device) + adam_groups([bf16], device=device)
            + activation_groups(["relu", "sigmoid", "tanh"], others, [f32, bf16], device))


# ------------------------------------------------------------------------------ linear (issue 15)

MATMUL_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
LINEAR_GEMMS = ("fwd", "dgrad", "wgrad")


def linear_grid(dtype) -> list[dict]:
    """What dense.py's tuning times for a large GEMM of linear where the persistent TMA kernel
    applies (``kd.tuning_candidates(..., tma=True)``: the pointer kernel's candidates, the
    heuristic first, then the TMA kernel's, ``tma`` True), and torch (cuBLAS) last. float32 runs
    with TF32, as torch's linear benchmark allows it."""
    from gpu_nn.kernels.triton import dense as kd

    dt = kd._TL[dtype]
    cands = kd.tuning_candidates(dt, "tf32" if dt == "fp32" else "ieee", True)
    return ([{"impl": "dense", **dict(zip(MATMUL_KEYS, c[:6])), "tma": len(c) == 7} for c in cands]
            + [{"provider": "torch"}])


def _matmul_tuple(cfg: dict) -> tuple:
    from gpu_nn.kernels.triton import dense as kd

    return tuple(cfg[k] for k in MATMUL_KEYS) + ((kd.TMA,) if cfg["tma"] else ())


def _linear_gemm_operands(gemm: str, M: int, K: int, N: int, dtype, device: str):
    """(a, b, c, bias) of one of linear's GEMMs for y = x [M, K] @ w [N, K]^T + b, as
    gpu_nn.ops.dense passes them: fwd x @ w.t() (+ bias) into y [M, N]; dgrad dY @ w into
    dx [M, K]; wgrad dY.t() @ x into dw [N, K]. Operands scaled so that outputs are O(1)."""
    g = torch.Generator(device="cpu").manual_seed(5)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    if gemm == "fwd":
        return t(M, K), t(N, K, scale=K ** -0.5).t(), torch.empty(M, N, device=device, dtype=dtype), t(N, scale=0.1)
    if gemm == "dgrad":
        return t(M, N), t(N, K, scale=N ** -0.5), torch.empty(M, K, device=device, dtype=dtype), None
    return t(M, N, scale=M ** -0.5).t(), t(M, K), torch.empty(N, K, device=device, dtype=dtype), None


def _linear_setup(gemm: str, M: int, K: int, N: int, dtype, device: str, configs):
    """One GEMM of linear launched through ``kd._launch_matmul`` in the row's configuration
    (the tuning bypassed), or torch.matmul / addmm (TF32 allowed for float32) into the same
    output; checked against the float64 product within 4 u of its largest entry (u the dot's unit
    roundoff; Triton's TF32 truncates: 2^-10), plus bfloat16's output rounding."""
    from gpu_nn.kernels.triton import dense as kd

    a, b, c, bias = _linear_gemm_operands(gemm, M, K, N, dtype, device)
    prec = "tf32" if dtype == torch.float32 else "ieee"
    ref = a.double() @ b.double() + (bias.double() if bias is not None else 0.0)
    u = {torch.float32: 2.0 ** -10, torch.float16: _U["half"], torch.bfloat16: _U["bf16"]}[dtype]
    scale = float(ref.abs().max())
    atol = 4 * u * scale + (2.0 ** -8 if dtype == torch.bfloat16 else 0.0) * scale

    def launch(cfg):
        if cfg.get("provider") == "torch":
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                if bias is not None:
                    torch.addmm(bias, a, b, out=c)
                else:
                    torch.matmul(a, b, out=c)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        else:
            kd._launch_matmul(a, b, c, bias, 0, prec, _matmul_tuple(cfg))
        return c

    def check(cfg):
        c.fill_(float("nan"))
        return compare_tol(launch(cfg), ref, rtol=4 * u, atol=atol)

    if not _interpret():  # both kernels' configurations at once (Triton's AsyncCompileMode)
        kd._compile_candidates(a, b, c, bias, 0, prec, [_matmul_tuple(x) for x in configs if "provider" not in x])
    return launch, check


def linear_groups(dtypes, gemms=LINEAR_GEMMS, shape=LINEAR, device: str = "cuda", configs=None) -> list[Group]:
    """linear's three GEMMs at bench_dense's shape (``LINEAR``: M, K, N), per dtype: every
    configuration of :func:`linear_grid` (pointer and TMA kernels, torch), one launch each."""
    M, K, N = shape
    dims = {"fwd": (M, N, K), "dgrad": (M, K, N), "wgrad": (N, K, M)}  # (rows, cols, depth) of each product
    out = []
    for dtype in dtypes:
        es = torch.empty((), dtype=dtype).element_size()
        for gemm in gemms:
            r, c, d = dims[gemm]
            out.append(Group("_matmul_kernel / _matmul_tma_kernel", f"linear {gemm} GEMM", _dtype_str(dtype),
                             f"{r}x{d} @ {d}x{c}", (r * d + d * c + r * c) * es,
                             linear_grid(dtype) if configs is None else configs,
                             functools.partial(_linear_setup, gemm, M, K, N, dtype, device), flops=2 * r * c * d))
    return out


# ------------------------------------------------------------------------------ recurrent (issue 16)

RNN_T, RNN_N, RNN_H = 100, 64, 512  # bench_rnn's main shape (I = H)
RNN_SMALL_T, RNN_SMALL_N = 50, (16, 4)  # its small-batch set (quick: H = 512)
STEP_KEYS = ("BLOCK_B", "BLOCK_H", "BLOCK_K", "num_warps", "num_stages")
STEP_BB = (16, 32, 64)
STEP_BH = (16, 32, 64)
STEP_BK = (32, 64, 128)
STEP_WARPS = (2, 4, 8)
STEP_STAGES = (1, 2, 3, 4)
STEP_MIN_PROGRAMS = 32  # a quarter of the H200's 132 SMs: fewer programs cannot pay for wider tiles
STEP_TOP = 4  # the fastest tiles of the first pass whose pipeline depths are tried next
RNN_TOP = 6  # the fastest LSTM configurations tried on the GRU / Elman RNN and at N = 4
PERSIST_KEYS = ("BLOCK_H", "BLOCK_K", "num_warps", "resident")
PERSIST_BH = (16, 32, 64)
PERSIST_BK = (32, 64, 128)
PERSIST_WARPS = (2, 4, 8)
PERSIST_RESIDENT_WARPS = (4, 8)  # the resident-weight form (BLOCK_H 16: a 64-row wgmma operand; no K loop)
RNN_COPIES = 8  # input sets per timed batch of step launches (each launch on its own copy)
PERSIST_COPIES = 3
RNN_REPS = 10
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of _rnn_matmul_kernel tried on the projection
PROJ_TILES = ((128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (128, 128, 32, 8, 4), (64, 128, 32, 4, 3),
              (128, 64, 32, 4, 3), (64, 64, 32, 4, 4))
SMEM_LIMIT = 232_448  # bytes of shared memory one block may use on sm_90 (227 KiB)


_U = {"fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "half": 2.0 ** -11, "bf16": 2.0 ** -8}


def _mode_name(mode: str) -> str:
    return {"rnn_tanh": "rnn"}.get(mode, mode)


def step_smem_bytes(cfg: dict, gates: int, w_bytes: int, backward: bool) -> int:
    """Shared memory of a step-kernel configuration as Triton 3.9 allocates it for sm_90 (read off
    ``gpu-nn sass`` for 69 LSTM configurations in float32 / TF32, all matched): num_stages - 1
    buffers (at least one) of each K step's operands, the W_hh tile of every gate (forward; the
    backward's one [BLOCK_K, BLOCK_H] tile of W_hh) and the float32 [BLOCK_B, BLOCK_K] rows of
    h_{t-1} (backward: of the next step's gate gradients), those twice for 64-row tiles at 4 or
    more warps (a layout conversion's copy)."""
    bb, bh, bk, w, s = (cfg[k] for k in STEP_KEYS)
    w_tiles = 1 if backward else gates
    h_copies = 2 if (bb >= 64 and w >= 4) else 1
    return max(1, s - 1) * (w_tiles * bk * bh * w_bytes + h_copies * bb * bk * 4)


def rnn_step_grid(B: int, H: int, mode: str = "lstm", dot: int = 3, backward: bool = False,
                  stages=(3,), min_programs: int = STEP_MIN_PROGRAMS) -> list[dict]:
    """Step-kernel configurations (``STEP_KEYS``) for batch ``B`` and hidden size ``H``: the
    product's own (``step_blocks``) first, then every BLOCK_B (at most the batch rounded up to 16)
    x BLOCK_H x BLOCK_K x num_warps x ``stages`` whose grid has at least ``min_programs`` programs
    (or the most any tile gives), BLOCK_K at most H rounded up to 32, and whose shared memory
    (``step_smem_bytes``) fits in a block: a configuration that cannot launch would only cost its
    compile. (No configuration of the LSTM TF32 forward grid at three stages spilled registers in
    ptxas for sm_90, Triton 3.9; the sweep records each launch's spills, and ``best`` passes over
    any that spill.)"""
    from gpu_nn.kernels.triton import rnn as krnn

    default = dict(zip(STEP_KEYS, krnn.step_blocks(B, H, mode, dot, backward)))
    gates = krnn.NGATES[krnn.MODE_CODES[mode]]
    w_bytes = 4 if dot in (0, 3) else 2
    cap_b = max(16, -(-B // 16) * 16)
    tiles = [(bb, bh) for bb in STEP_BB for bh in STEP_BH if bb <= cap_b]
    most = max(-(-B // bb) * -(-H // bh) for bb, bh in tiles)
    out = [default]
    for (bb, bh), bk, w, s in itertools.product(tiles, STEP_BK, STEP_WARPS, stages):
        cfg = dict(zip(STEP_KEYS, (bb, bh, bk, w, s)))
        if (-(-B // bb) * -(-H // bh) >= min(min_programs, most) and bk <= max(32, -(-H // 32) * 32)
                and step_smem_bytes(cfg, gates, w_bytes, backward) <= SMEM_LIMIT and cfg != default):
            out.append(cfg)
    return out


def persist_grid() -> list[dict]:
    """Persistent-kernel configurations (``PERSIST_KEYS``; one pipeline stage always, see
    ``persist_launch``): the product's first (at the sweep's shapes W_hh resident: TF32 and
    bfloat16 at H = 512, one tile per program, ``resident_kp``), then the resident form at the
    other warp counts, then BLOCK_H x BLOCK_K x num_warps re-reading W_hh from L2 (``resident``
    0: GPU_NN_RNN_RESIDENT=0), the form before resident weights."""
    from gpu_nn.kernels.triton import rnn as krnn

    bh, bk = krnn.PERSIST_BLOCKS[1:]
    default = {"BLOCK_H": bh, "BLOCK_K": bk, "num_warps": krnn.persist_launch("lstm", 3, False, 16)[0], "resident": 1}
    out = [default]
    for w in PERSIST_RESIDENT_WARPS:
        c = {**default, "num_warps": w}
        if c != default:
            out.append(c)
    for cfg in itertools.product(PERSIST_BH, PERSIST_BK, PERSIST_WARPS):
        out.append(dict(zip(PERSIST_KEYS, (*cfg, 0))))
    return out


def top_configs(rows, kernel: str, op: str, dtype: str, shape: str, k: int, default: dict) -> list[dict]:
    """``default``, then the ``k`` fastest correct configurations without spills that a group
    measured (by kernel, op, dtype, shape): the grid of a group that refines an earlier one."""
    good = [r for r in rows if (r["kernel"], r["op"], r["dtype"], r["shape"]) == (kernel, op, dtype, shape)
            and "us" in r and r.get("correct") and not r.get("spills")]
    good.sort(key=lambda r: r["us"])
    out = [dict(default)]
    for r in good:
        if len(out) > k:
            break
        if r["config"] not in out:
            out.append(dict(r["config"]))
    return out


def _with_stages(rows, kernel, op, dtype, shape, default, fits=lambda cfg: True, stages=STEP_STAGES, k=STEP_TOP):
    """Configs for a second pass: the ``k`` fastest of the first pass, each at every pipeline depth
    for which ``fits(cfg)``."""
    best_ = top_configs(rows, kernel, op, dtype, shape, k, default)[1:]
    out = [dict(default)]
    for cfg in best_ or [default]:
        for s in stages:
            c = {**cfg, "num_stages": s}
            if c not in out and fits(c):
                out.append(c)
    return out


def compare_tol(out: torch.Tensor, ref: torch.Tensor, rtol: float | None,
                atol: float | None) -> tuple[bool, float | str]:
    """Like :func:`compare`, with explicit tolerances (compared in float64); None for both:
    assert_close's defaults for the dtype, in the dtype."""
    if out.shape != ref.shape:
        return False, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return True, 0.0
    err = float((out.double() - ref.double()).abs().max())
    try:
        if rtol is None:
            torch.testing.assert_close(out, ref)
        else:
            torch.testing.assert_close(out.double(), ref.double(), rtol=rtol, atol=atol)
    except AssertionError:
        return False, _finite(err)
    return True, _finite(err)


def _spill_info(compiled) -> dict:
    """Registers and spilled registers of a launched kernel, where the compiled kernel says."""
    spills, regs = getattr(compiled, "n_spills", None), getattr(compiled, "n_regs", None)
    out = {}
    if isinstance(spills, int):
        out["spills"] = spills
    if isinstance(regs, int):
        out["registers"] = regs
    return out


class _Capture:
    """Wraps a launch function (``launch_kernel``) or a kernel (``kernel[grid](...)``) to keep the
    compiled kernel the last launch returned."""

    def __init__(self, target):
        self.target, self.compiled = target, None

    def __call__(self, kernel, grid, *args, **kw):
        self.compiled = self.target(kernel, grid, *args, **kw)
        return self.compiled

    def __getitem__(self, grid):
        def go(*args, **kw):
            self.compiled = self.target[grid](*args, **kw)
            return self.compiled
        return go


class _Warm:
    """A kernel whose ``[grid](...)`` only compiles (``warmup``): the persistent launcher calls its
    kernel directly, not through ``launch_kernel``."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kw: self.kernel.warmup(*args, grid=grid, **kw)


def _precompile_direct(module, names, launch, configs) -> None:
    """:func:`_precompile` for a launcher that calls ``module.<name>[grid](...)`` itself, for each
    of ``names`` (one name or several: a launcher with more than one kernel)."""
    from gpu_nn.kernels.triton._compat import parallel_compile

    names = (names,) if isinstance(names, str) else tuple(names)
    with parallel_compile(min(16, len(configs))) as available:
        if not available:
            return
        with _patched(module, **{name: _Warm(getattr(module, name)) for name in names}):
            for cfg in configs:
                try:
                    launch(cfg)
                except Exception:  # noqa: BLE001 - reported by the timed launch
                    pass


def _step_cfg(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in STEP_KEYS)


def _rnn_dot(dtype) -> int:
    """float32 layers at torch's default (cudnn.allow_tf32: TF32), half dtypes their own dot."""
    return {torch.float32: 3, torch.float16: 1, torch.bfloat16: 2}[dtype]


def _rnn_width(mode: str, H: int) -> int:
    """Columns of a step's projection / gates buffer: the reserve's S * H (GRU: r, z, n and
    h W_hn^T + b_hn)."""
    return {"lstm": 4, "gru": 4}.get(mode, 1) * H


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if torch.device(device).type == "cuda" else 1


def _step_setup(mode: str, backward: bool, B: int, H: int, dtype, device: str, copies: int, configs):
    """One step of one layer, forward (``step_forward``) or backward (``step_backward``, a middle
    step: the next step's gate gradients, an output gradient), on buffers shaped as the
    driver's. The buffers a launch updates in place (forward: the projection, which becomes the
    activated gates; backward: the carry and the LSTM's dc) have ``copies`` copies, one per launch
    of a timed batch, restored from a pristine set by ``reset`` outside the timed region. The
    check compares every output with the product's own configuration on the same inputs."""
    from gpu_nn.kernels.triton import rnn as krnn

    interpret = _interpret()
    dot = _rnn_dot(dtype)
    G = krnn.NGATES[krnn.MODE_CODES[mode]]
    GH, W = G * H, _rnn_width(mode, H)
    dev = device
    s = H ** -0.5
    w_hh = (torch.randn(GH, H, device=dev) * s).to(dtype)
    b_hh = (torch.randn(GH, device=dev) * s).to(dtype) if mode == "gru" else None
    lens = torch.full((B,), RNN_T, dtype=torch.int64, device=dev)
    hp = torch.randn(B, H, device=dev).tanh()
    cp = torch.randn(B, H, device=dev) if mode == "lstm" else None
    if not backward:
        pristine = [torch.randn(B, W, device=dev)]  # the step's input projection
        work = [torch.empty(copies, B, W, device=dev)]
        outs = {"hn": torch.empty(B, H, device=dev), "out": torch.empty(B, H, dtype=dtype, device=dev)}
        if mode == "lstm":
            outs["cn"] = torch.empty(B, H, device=dev)

        def launch(i):
            krnn.step_forward(mode, work[0][i], hp, outs["hn"], cp, outs.get("cn"), w_hh, b_hh, outs["out"], None,
                              lens, 0, dot)
    else:
        g = torch.rand(B, W, device=dev)  # activated gates in (0, 1); GRU's 4th: h W_hn^T + b_hn
        hn = torch.randn(B, H, device=dev).tanh()
        cn = torch.randn(B, H, device=dev) if mode == "lstm" else None
        dg_next = torch.randn(B, GH, device=dev) * 0.1
        dout = torch.randn(B, H, device=dev).to(dtype)
        pristine = [torch.randn(B, H, device=dev)] + ([torch.randn(B, H, device=dev)] if mode == "lstm" else [])
        work = [torch.empty(copies, B, H, device=dev) for _ in pristine]
        outs = {"dgi": torch.empty(B, GH, device=dev)}
        if mode == "gru":
            outs["dgh"] = torch.empty(B, GH, device=dev)

        def launch(i):
            krnn.step_backward(mode, dg_next, w_hh, work[0][i], work[1][i] if mode == "lstm" else None, dout,
                               None if mode == "rnn_tanh" else g, hp, hn, cp, cn, outs["dgi"],
                               outs.get("dgh", outs["dgi"]), None, lens, 0, dot)

    def reset():
        for w, p in zip(work, pristine):
            w.copy_(p.expand_as(w))

    def results():
        got = {k: v.clone() for k, v in outs.items()}
        got.update({f"inplace{j}": w[0].clone() for j, w in enumerate(work)})
        return got

    def poison():
        for v in outs.values():
            v.fill_(float("nan"))

    reset()
    poison()
    launch(0)  # the product's own configuration: the reference of every other
    ref = results()

    def run(cfg):
        with _configured(krnn, "step_blocks", {k: cfg[k] for k in STEP_KEYS}):
            for i in range(copies):
                launch(i)

    def check(cfg):
        reset()
        poison()
        cap = _Capture(krnn.launch_kernel)
        with _configured(krnn, "step_blocks", {k: cfg[k] for k in STEP_KEYS}), _patched(krnn, launch_kernel=cap):
            launch(0)
        got = results()
        return (*_all_ok(*(compare(got[k], ref[k]) for k in ref)), _spill_info(cap.compiled))

    if not interpret:
        def one(cfg):
            with _configured(krnn, "step_blocks", {k: cfg[k] for k in STEP_KEYS}):
                launch(0)
        _precompile(krnn, one, configs)
    return run, check, reset


def _persist_setup(mode: str, B: int, H: int, T: int, dtype, device: str, copies: int, configs):
    """The persistent forward of one layer (T steps in one launch) with the
    configuration's BLOCK_H / BLOCK_K / num_warps (one stage), W_hh resident or not (``resident``)
    and one program per (batch, hidden) tile, capped at the SM count as the product does; the
    projection buffer (overwritten with the activated gates) has one copy per launch of a timed
    batch, restored outside the timed region. Every configuration is checked against the product's
    tile re-reading W_hh from L2."""
    from gpu_nn.kernels.triton import rnn as krnn

    interpret = _interpret()
    dot = _rnn_dot(dtype)
    G = krnn.NGATES[krnn.MODE_CODES[mode]]
    W = _rnn_width(mode, H)
    dev = device
    s = H ** -0.5
    w_hh = (torch.randn(G * H, H, device=dev) * s).to(dtype)
    b_hh = (torch.randn(G * H, device=dev) * s).to(dtype) if mode == "gru" else None
    lens = torch.full((B,), T, dtype=torch.int64, device=dev)
    pristine = torch.randn(T, B, W, device=dev)
    work = torch.empty(copies, T, B, W, device=dev)
    hs = torch.empty(T + 1, B, H, device=dev)
    cs = torch.empty(T + 1, B, H, device=dev) if mode == "lstm" else None
    h0, c0 = torch.randn(B, H, device=dev).tanh(), torch.randn(B, H, device=dev)
    out = torch.empty(T, B, H, dtype=dtype, device=dev)
    sm = _sm_count(dev)

    def launch(cfg, i, kernel=None):
        bh, bk, w = cfg["BLOCK_H"], cfg["BLOCK_K"], cfg["num_warps"]
        patch = {"PERSIST_BLOCKS": (krnn.PERSIST_BLOCKS[0], bh, bk), "persist_launch": lambda *a, _w=w: (_w, 1)}
        if kernel is not None:
            patch["_rnn_persist_fwd_kernel"] = kernel
        with _patched(krnn, **patch), harness.env_var(krnn.RESIDENT_ENV, str(cfg.get("resident", 0))):
            # one program per (batch, hidden) tile up to the SM count, as the product launches
            krnn.persist_forward(mode, work[i], hs, cs, w_hh, b_hh, out, None, lens, False, dot,
                                 krnn.persist_programs(B, H, sm) if not interpret else 1)

    def reset():
        work.copy_(pristine.expand_as(work))
        hs[0].copy_(h0)
        if cs is not None:
            cs[0].copy_(c0)

    def poison():
        for t in (out, hs[1:]) + ((cs[1:],) if cs is not None else ()):
            t.fill_(float("nan"))

    def results():
        got = {"out": out.clone(), "hs": hs.clone(), "gates": work[0].clone()}
        if cs is not None:
            got["cs"] = cs.clone()
        return got

    reset()
    poison()
    # the reference: the product's tile and warps re-reading W_hh from L2 (the form the GPU tests
    # have run since 82f8513), so that the resident rows, first, are checked and not the yardstick
    launch({**configs[0], "resident": 0}, 0)
    ref = results()

    def run(cfg):
        for i in range(copies):
            launch(cfg, i)

    def check(cfg):
        reset()
        poison()
        cap = _Capture(krnn._rnn_persist_fwd_kernel)
        launch(cfg, 0, kernel=cap)
        got = results()
        return (*_all_ok(*(compare(got[k], ref[k]) for k in ref)), _spill_info(cap.compiled))

    if not interpret:
        _precompile_direct(krnn, "_rnn_persist_fwd_kernel", lambda cfg: launch(cfg, 0), configs)
    return run, check, reset


def proj_grid(dtype) -> list[dict]:
    """The input projection's candidates: ``_rnn_matmul_kernel`` in the product's tile, then in
    PROJ_TILES; dense.py's ``_matmul_kernel`` in each of its tuning candidates (the fastest of
    them is what its tuning would choose); torch (cuBLAS)."""
    from gpu_nn.kernels.triton import dense as kd, rnn as krnn

    dot = _rnn_dot(dtype)
    bm, bn, bk, w = krnn.matmul_blocks(RNN_T * RNN_N, 4 * RNN_H, dot)
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    out = [{"impl": "rnn", **dict(zip(keys, (bm, bn, bk, w, krnn.MATMUL_STAGES)))}]
    for t in PROJ_TILES:
        c = {"impl": "rnn", **dict(zip(keys, t))}
        if c not in out:
            out.append(c)
    dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    for c in kd.matmul_candidates(dt, "tf32" if dtype == torch.float32 else "ieee"):
        out.append({"impl": "dense", **dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"), c))})
    out.append({"impl": "torch"})
    return out


def _proj_setup(M: int, K: int, N: int, dtype, device: str, configs):
    """The input projection of all steps, ``XG[M, N] = X[M, K] W_ih^T + b_ih + b_hh`` into the
    float32 reserve, as the driver launches it, against dense.py's linear kernel (one bias: b_ih
    + b_hh summed once, outside the timing) and torch.addmm (output in the io dtype, TF32 allowed
    for float32 as cuDNN does). Checked against a float64 product of the same operands, within
    4 u (u the dot's unit roundoff) of the largest output."""
    from gpu_nn.kernels.triton import dense as kd, rnn as krnn

    interpret = _interpret()
    dot = _rnn_dot(dtype)
    dev = device
    x = torch.randn(M, K, device=dev).to(dtype)
    w = (torch.randn(N, K, device=dev) * K ** -0.5).to(dtype)
    b1, b2 = (torch.randn(N, device=dev) * 0.1).to(dtype), (torch.randn(N, device=dev) * 0.1).to(dtype)
    bsum = b1 + b2
    out32 = torch.empty(M, N, device=dev)
    outio = torch.empty(M, N, dtype=dtype, device=dev)
    prec = "tf32" if dtype == torch.float32 else "ieee"
    ref = x.double() @ w.double().t() + b1.double() + b2.double()
    u = _U["tf32" if dtype == torch.float32 else ("bf16" if dtype == torch.bfloat16 else "half")]
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")

    def launch(cfg):
        if cfg["impl"] == "rnn":
            with _configured(krnn, "matmul_blocks", {k: cfg[k] for k in keys}), \
                    _patched(krnn, MATMUL_STAGES=cfg["num_stages"]):
                krnn.matmul(x, w.t(), out32, bias1=b1, bias2=b2, dot=dot)
            return out32
        if cfg["impl"] == "dense":
            kd._launch_matmul(x, w.t(), out32, bsum, 0, prec,
                              tuple(cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")))
            return out32
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            torch.addmm(bsum, x, w.t(), out=outio)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        return outio

    def check(cfg):
        out32.fill_(float("nan"))
        outio.fill_(float("nan"))
        got = launch(cfg)
        atol = 4 * u * float(ref.abs().max()) + (2.0 ** -8 if got.dtype == torch.bfloat16 else 0.0) * float(ref.abs().max())
        return compare_tol(got, ref, rtol=4 * u, atol=atol)

    if not interpret:
        _precompile(krnn, launch, [c for c in configs if c["impl"] == "rnn"])
        _precompile(kd, launch, [c for c in configs if c["impl"] == "dense"])
    return launch, check


def _step_bytes(mode, backward, B, H, es) -> int:
    """What one step launch must move: W_hh once, the state and gate rows read and written."""
    G = {"lstm": 4, "gru": 3}.get(mode, 1)
    W = _rnn_width(mode, H)
    if backward:
        return G * H * H * es + B * G * H * 4 * (2 if mode == "gru" else 1) + B * (G * H + W) * 4 + B * H * 4 * 6
    return G * H * H * es + 2 * B * W * 4 + B * H * (4 * 4 + es)


def step_groups(modes, backward: bool, B: int, H: int, dtypes, device: str = "cuda", copies: int = RNN_COPIES,
                configs=None, stages_pass: bool = True, from_lstm: bool = False) -> list[Group]:
    """Per mode and dtype: the step kernel over ``rnn_step_grid`` at one pipeline depth, then (if
    ``stages_pass``) the fastest STEP_TOP of those at every depth. ``from_lstm``: instead, the
    RNN_TOP fastest LSTM configurations of the same pass, dtype and shape (the grid measured
    first), each of the mode's own. ``configs`` (tests): a fixed list, one group per mode and dtype."""
    from gpu_nn.kernels.triton import rnn as krnn

    kernel = "_rnn_step_bwd_kernel" if backward else "_rnn_step_fwd_kernel"
    out = []
    for mode in modes:
        op = f"{_mode_name(mode)} step {'bwd' if backward else 'fwd'}"
        for dtype in dtypes:
            dot = _rnn_dot(dtype)
            shape = f"N={B} H={H} {krnn.dot_kind(dot)}"
            es = torch.empty((), dtype=dtype).element_size()
            default = dict(zip(STEP_KEYS, krnn.step_blocks(B, H, mode, dot, backward)))
            nbytes = _step_bytes(mode, backward, B, H, es)
            flops = 2 * B * krnn.NGATES[krnn.MODE_CODES[mode]] * H * H
            setup = functools.partial(_step_setup, mode, backward, B, H, dtype, device, copies)
            mk = functools.partial(Group, kernel, op, _dtype_str(dtype), shape, nbytes, setup=setup, launches=copies,
                                   flops=flops)
            if configs is not None:
                out.append(mk(configs=configs))
            elif from_lstm:
                lstm_op = f"lstm step {'bwd' if backward else 'fwd'}"
                out.append(mk(configs=lambda rows, _op=lstm_op, _d=default, _s=shape, _dt=_dtype_str(dtype):
                              top_configs(rows, kernel, _op, _dt, _s, RNN_TOP, _d)))
            else:
                out.append(mk(configs=rnn_step_grid(B, H, mode, dot, backward,
                                                    min_programs=STEP_MIN_PROGRAMS if B > 16 else 8)))
                if stages_pass:
                    fits = functools.partial(lambda c, _g, _w: step_smem_bytes(c, _g, _w, backward) <= SMEM_LIMIT,
                                             _g=krnn.NGATES[krnn.MODE_CODES[mode]], _w=es if dot not in (0, 3) else 4)
                    out.append(mk(configs=lambda rows, _op=op, _d=default, _s=shape, _dt=_dtype_str(dtype), _f=fits:
                                  _with_stages(rows, kernel, _op, _dt, _s, _d, _f)))
    return out


def persist_groups(modes, B: int, H: int, dtypes, device: str = "cuda", copies: int = PERSIST_COPIES, configs=None,
                   from_n=None, T: int = RNN_SMALL_T) -> list[Group]:
    """The persistent forward per mode and dtype over ``persist_grid`` (``from_n``: the RNN_TOP
    fastest LSTM configurations measured at that batch instead)."""
    from gpu_nn.kernels.triton import rnn as krnn

    out = []
    for mode in modes:
        for dtype in dtypes:
            dot = _rnn_dot(dtype)
            shape = f"T={T} N={B} H={H} {krnn.dot_kind(dot)}"
            es = torch.empty((), dtype=dtype).element_size()
            G = krnn.NGATES[krnn.MODE_CODES[mode]]
            nbytes = T * _step_bytes(mode, False, B, H, es)
            grid_ = persist_grid() if configs is None else configs
            cfgs = grid_
            if from_n is not None or mode != "lstm":
                src = f"T={T} N={from_n or B} H={H} {krnn.dot_kind(dot)}"
                cfgs = (lambda rows, _s=src, _dt=_dtype_str(dtype), _d=grid_[0]:
                        top_configs(rows, "_rnn_persist_fwd_kernel", "lstm persistent fwd", _dt, _s, RNN_TOP, _d))
            out.append(Group("_rnn_persist_fwd_kernel", f"{_mode_name(mode)} persistent fwd", _dtype_str(dtype), shape,
                             nbytes, cfgs, functools.partial(_persist_setup, mode, B, H, T, dtype, device, copies),
                             launches=copies, flops=2 * T * B * G * H * H))
    return out


def proj_groups(dtypes, M=RNN_T * RNN_N, K=RNN_H, N=4 * RNN_H, device: str = "cuda", configs=None) -> list[Group]:
    out = []
    for dtype in dtypes:
        es = torch.empty((), dtype=dtype).element_size()
        out.append(Group("input projection", "lstm input projection", _dtype_str(dtype), f"{M}x{K}->{N}",
                         (M * K + N * K) * es + M * N * 4, proj_grid(dtype) if configs is None else configs,
                         functools.partial(_proj_setup, M, K, N, dtype, device), flops=2 * M * N * K))
    return out


def rnn_groups(device: str = "cuda") -> list[Group]:
    """The recurrent sweep, most wanted first (issue 16's gaps): the LSTM step forward at N = 64
    (TF32, then bfloat16), the persistent LSTM at N = 16 (both), the input projection, the LSTM
    step backward at N = 64, the GRU / Elman RNN steps with the LSTM's best, the small-batch
    per-step forward (float32 runs it: the persistent kernel is the default for half dtypes
    only), the persistent LSTM at N = 4 and GRU at N = 16 with the N = 16 LSTM's best."""
    f32, bf16 = torch.float32, torch.bfloat16
    N, H = RNN_N, RNN_H
    g = []
    g += step_groups(["lstm"], False, N, H, [f32], device)
    g += step_groups(["lstm"], False, N, H, [bf16], device)
    g += persist_groups(["lstm"], 16, H, [f32, bf16], device)
    g += proj_groups([f32, bf16], device=device)
    g += step_groups(["lstm"], True, N, H, [f32, bf16], device)
    g += step_groups(["gru", "rnn_tanh"], False, N, H, [f32, bf16], device, from_lstm=True)
    g += step_groups(["gru", "rnn_tanh"], True, N, H, [f32, bf16], device, from_lstm=True)
    g += step_groups(["lstm"], False, 16, H, [f32], device)
    g += persist_groups(["lstm"], 4, H, [f32, bf16], device, from_n=16)
    g += persist_groups(["gru"], 16, H, [f32, bf16], device)
    g += step_groups(["lstm"], False, 4, H, [f32], device, stages_pass=False)
    return g


def rnn_profile_cases(device: str = "cuda") -> list[tuple[str, str, dict]]:
    """bench_rnn's LSTM T=100 N=64 I=H=512 float32 (TF32) forward and forward+backward, and the
    bfloat16 forward: torch (cuDNN) against our triton and cupy backends."""
    from gpu_nn.benchmarks import bench_rnn as br

    cases = []
    for dtype, backward in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
        c = br._case("lstm", RNN_T, RNN_N, RNN_H, RNN_H, dtype, device, backward, ("triton", "cupy"))
        cases.append((c.name, c.shape, dict(c.providers)))
    return cases


# ------------------------------------------------------------------------------ runner

_FLUSH: list = []  # the L2 flush buffer, made once


def _queued_median(fn, reps: int, before=None, samples: int = 1) -> tuple[float, bool, float]:
    """(median device seconds of ``reps`` calls of ``fn()``, whether the host queued them all,
    host seconds per call): ``gpu_nn._tuning.queued_times``, ``before()`` queued untimed ahead of
    each call, the host's time per call (``before`` included) the median of ``samples``
    synchronised calls made first."""
    import statistics

    from gpu_nn import _tuning

    host = []
    for _ in range(samples):
        t0 = time.perf_counter()
        if before is not None:
            before()
        fn()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    host_s = statistics.median(host)
    times, queued = _tuning.queued_times(fn, reps, host_s, before=before)
    return statistics.median(times), queued, host_s


def device_seconds(fn, reps: int = 25) -> tuple[float, dict]:
    """Median seconds per call of ``fn``, the device's time: ``reps`` calls each queued behind a
    GPU sleep (:func:`_queued_median`), each preceded (untimed) by an L2 flush, a 256 MB zero as
    ``triton.testing.do_bench`` does, and bracketed by its own CUDA events; with the ``queued``
    flag and the host's microseconds per call (flush included). do_bench itself queues nothing
    ahead: the H200 sweep at a331102 timed every channels_last conv tile at 84-94 us at 28x28
    and below, whatever its size, where our launch took longer on the host than the flush on the
    device, and the TMA tiles (descriptors made on the host) at 130-160."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
    fn()
    torch.cuda.synchronize()
    s, queued, host_s = _queued_median(fn, reps, before=_FLUSH[0].zero_, samples=3)
    return s, {"queued": queued, "host_us": round(host_s * 1e6, 1)}


def _row_line(row: dict) -> str:
    head = f"{row['op']} {row['dtype']} {row['shape']} {config_str(row.get('config', {}))}"
    if "error" in row:
        return f"{head}: error {row['error'][:120]}"
    return f"{head}: {row['us']:.1f} us {row['gbps']:.0f} GB/s {'ok' if row['correct'] else 'WRONG'}"


def queued_seconds(fn, reset, reps: int = RNN_REPS) -> float:
    """Median seconds of ``fn()`` over ``reps`` timed calls, ``reset()`` queued untimed before
    each: :func:`_queued_median` (each call queued behind a GPU sleep longer than the host takes
    to queue it, so that the events time the kernels back to back, not the host's launch rate:
    a step kernel of 10 us is shorter than its Python launch), the first call, reset too,
    measuring the host. No L2 flush: in the layer's time loop W_hh stays in L2 from step to step."""
    return _queued_median(fn, reps, before=reset)[0]


def run_sweep(groups, out_path: str, budget_s: float, bench=device_seconds, clock=time.perf_counter,
              cleanup=None, log=print, bench_reset=queued_seconds) -> dict:
    """Every group's every configuration: check once, then ``bench(fn) -> seconds`` (a group with
    a ``reset``: ``bench_reset(fn, reset)``), divided by the group's ``launches``: ``us`` is per
    launch; the JSON at ``out_path`` is rewritten after every row. No new group or row starts once
    ``budget_s`` seconds have passed (``clock``); the document then says where it stopped.
    ``setups`` records each group's setup time (input buffers and the parallel compilation of
    its configurations) and configuration count."""
    t0 = clock()
    doc = {"environment": harness.environment(), "budget_s": budget_s, "status": "running", "elapsed_s": 0.0,
           "rows": [], "setups": []}
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
        configs = g.configs(rows) if callable(g.configs) else g.configs
        ts = clock()
        try:
            made = g.setup(configs)
        except Exception as exc:  # noqa: BLE001 - the group is reported, the sweep goes on
            rows.append({**base, "error": f"setup: {type(exc).__name__}: {exc}"[:500]})
            log(_row_line(rows[-1]))
            save()
            continue
        run, check = made[:2]
        reset = made[2] if len(made) > 2 else None
        doc["setups"].append({"op": g.op, "dtype": g.dtype, "shape": g.shape, "configs": len(configs),
                              "setup_s": round(clock() - ts, 3)})
        for ci, cfg in enumerate(configs):
            if clock() - t0 >= budget_s:
                stopped = (gi, ci)
                break
            row = {**base, "config": dict(cfg), "default": ci == 0}
            try:
                res = check(cfg)
                row["correct"], row["max_err"] = res[:2]
                if len(res) > 2:
                    row.update(res[2])
                fn = functools.partial(run, cfg)
                s = bench(fn) if reset is None else bench_reset(fn, reset)
                if isinstance(s, tuple):  # (seconds, what else the timing says)
                    s, said = s
                    row.update(said)
                s /= g.launches
                row["us"] = s * 1e6
                row["gbps"] = g.bytes / s / 1e9
                if g.flops:
                    row["tflops"] = g.flops / s / 1e12
            except Exception as exc:  # noqa: BLE001 - one configuration failing (compile, launch) is data
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
            log(_row_line(row))
            save()
        run = check = reset = made = None
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
    configuration that does not spill registers (one that spills may not launch in the product),
    with default / best (above 1: the best is faster)."""
    groups = collections.OrderedDict()
    for r in rows:
        if "us" in r:
            groups.setdefault((r["kernel"], r["op"], r["dtype"], r["shape"]), []).append(r)
    out = []
    for (kernel, op, dtype, shape), rs in groups.items():
        # torch's own row (conv: provider, the projection group: impl), not a candidate of ours
        theirs = next((r for r in rs if "torch" in (r["config"].get("provider"), r["config"].get("impl"))), None)
        rs = [r for r in rs if r is not theirs]
        good = [r for r in rs if r.get("correct") and not r.get("spills")]
        default = next((r for r in rs if r.get("default")), None)
        item = {"kernel": kernel, "op": op, "dtype": dtype, "shape": shape, "configs": len(rs),
                "wrong": sum(not r.get("correct") for r in rs), "spilled": sum(bool(r.get("spills")) for r in rs)}
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
    the bfloat16 3x3 convolution at 28x28 first (NCHW and channels_last: the kernels' own time,
    which the bench's one-call events never showed apart from our host path), then relu; each
    setup() returns one fwd+bwd (a step)."""
    import torch.nn.functional as TF

    import gpu_nn.functional as F
    import gpu_nn.optim as go
    from gpu_nn.benchmarks import bench_activation as ba, bench_conv as bc, bench_dense as bd, bench_optim as bo
    from gpu_nn.benchmarks import bench_pool as bp

    f32, bf16 = torch.float32, torch.bfloat16
    shape = ba.GPU_SHAPES[0]
    act = lambda fn, be, shp, dt: ba._provider(fn, be, shp, dt, device, True)  # noqa: E731
    cases = []
    _, conv_shape, conv = bc.GPU_SHAPES[1]
    for cl in (False, True):
        case = bc._case("conv2d 3x3", conv_shape, device, bf16, **conv, providers=("torch", "triton"), channels_last=cl)
        cases.append((case.name, conv_shape, dict(case.providers)))
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
                cleanup=None, log=print, name: str = "profile") -> list[dict]:
    """Every (case, provider) through ``profile``, into ``out_dir``/``name``.json (after each)
    and ``name``.txt; a provider whose backend lacks the op is recorded as skipped."""
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
            harness.dump_json(doc, os.path.join(out_dir, f"{name}.json"))
    doc["status"] = "complete"
    doc["elapsed_s"] = round(clock() - t0, 3)
    harness.dump_json(doc, os.path.join(out_dir, f"{name}.json"))
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write(format_profile(records) + "\n")
    return records


# --------------------------------------------------------------------------- demo profile

DEMO_STEPS = 10  # training steps per profiled region (the demo's batch, 32)


def demo_step_setup(model: str, impl: str, device: str = "cuda", steps: int = DEMO_STEPS, seed: int = 0,
                    backend: str = "auto", env: tuple | None = None):
    """setup() -> run(): ``steps`` training steps of ``gpu-nn demo``'s ``model`` (its network,
    optimizer, learning rate and clipping, one batch of 32 of its shape; the demo's own step,
    ``demo._Side.step``), built from gpu_nn under ``backend`` (``impl`` "ours"; auto: what the
    demo runs) or from torch (its twin); ``env``: an environment variable ``(name, value)`` set
    around every call (``GPU_NN_RNN_PERSISTENT``, say)."""
    import gpu_nn
    from gpu_nn import demo

    def setup():
        side = demo.gpu_nn_impl() if impl == "ours" else demo.torch_impl()
        hp = demo.HYPER[model]
        gen = torch.Generator().manual_seed(seed)
        shape = (32, 1, 8, 8) if model == "cnn" else (32, 8, 8)
        x = torch.rand(shape, generator=gen).mul(16).to(device)
        y = torch.randint(0, 10, (32,), generator=gen).to(device)
        torch.manual_seed(seed)
        with gpu_nn.backend("auto"):
            net = demo.build(model, side.nn).to(device)
        opt = getattr(side.optim, hp["optimizer"])(net.parameters(), lr=hp["lr"])
        ctx = (lambda: gpu_nn.backend(backend)) if impl == "ours" else contextlib.nullcontext
        twin = demo._Side(net, opt, side.nn.CrossEntropyLoss(), side.clip_grad_norm_, ctx)

        def run():
            with harness.env_var(*(env or (None, None))):
                for _ in range(steps):
                    loss = twin.step(x, y, hp["clip"])
            return loss.detach()  # the last step's loss (no host sync here)
        return run
    return setup


def demo_profile_cases(device: str = "cuda") -> list[tuple[str, str, dict]]:
    """``[(region, shape, {provider: setup})]``: DEMO_STEPS training steps of each demo model,
    ours (auto) against its torch twin (issue 14's demo goal: where a step's time goes); for the
    recurrent models also ours on Triton with every time loop one persistent launch
    (``GPU_NN_RNN_PERSISTENT=1``, not the default at the demo's batch of 32), to see whether the
    persistent kernels would make those steps shorter."""
    from gpu_nn import demo
    from gpu_nn.ops import rnn as ops_rnn

    out = [(f"demo {m} {DEMO_STEPS} steps", "batch 32", {p: demo_step_setup(m, p, device) for p in ("torch", "ours")})
           for m in demo.MODELS]
    # last: their first calls compile the persistent kernels, which the budget may not hold
    for m in demo.MODELS:
        if m != "cnn":
            out.append((f"demo {m} {DEMO_STEPS} steps", "batch 32", {
                "ours (persistent)": demo_step_setup(m, "ours", device, backend="triton",
                                                     env=(ops_rnn.PERSISTENT_ENV, "1"))}))
    return out


def profile_with_python(setup, sync=torch.cuda.synchronize, top: int = 25) -> dict:
    """:func:`profile_one`, then one more warm region under cProfile: the host's Python functions
    with the most own time (``py_top``: function, calls, own and cumulative us), to say which
    code a host-bound region spends its time in."""
    import cProfile
    import pstats

    run = setup()
    rec = profile_one(lambda: run, sync)  # warmed there
    prof = cProfile.Profile()
    prof.enable()
    run()
    sync()
    prof.disable()
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _) in pstats.Stats(prof).stats.items():
        where = "/".join(fname.replace(os.sep, "/").split("/")[-2:])  # package dir and file
        rows.append({"function": f"{where}:{line}({func})", "calls": nc, "own_us": tt * 1e6,
                     "cum_us": ct * 1e6})
    rows.sort(key=lambda r: -r["own_us"])
    rec["py_top"] = rows[:top]
    return rec


def format_python_top(records, n: int = 12) -> str:
    """Per profiled region, its ``n`` Python functions with the most own time."""
    lines = []
    for r in records:
        if "py_top" not in r:
            continue
        lines.append(f"{r['op']} [{r['provider']}] Python, most own time first (calls, own us, cumulative us):")
        lines.extend(f"    {p['function'][:80]:<80} {p['calls']:>6} {p['own_us']:>9.0f} {p['cum_us']:>9.0f}"
                     for p in r["py_top"][:n])
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line

RNN_PROFILE_S = 20.0  # of the rnn part's budget: the profile's three cases, before the sweep


def run_rnn(out_dir: str, budget_s: float, device: str = "cuda", log=print) -> dict:
    """The recurrent part: the profile of ``rnn_profile_cases`` (rnn_profile.json / .txt; it
    starts no new case after RNN_PROFILE_S or a fifth of the budget), then ``rnn_groups`` swept
    in what is left (rnn_sweep.json)."""
    t0 = time.perf_counter()
    cleanup = torch.cuda.empty_cache
    records = run_profile(rnn_profile_cases(device), out_dir, min(RNN_PROFILE_S, budget_s / 5), cleanup=cleanup,
                          log=log, name="rnn_profile")
    log(format_profile(records))
    left = max(0.0, budget_s - (time.perf_counter() - t0))
    doc = run_sweep(rnn_groups(device), os.path.join(out_dir, "rnn_sweep.json"), left, cleanup=cleanup, log=log)
    log(f"rnn: {len(doc['rows'])} rows, {doc['status']}; profile: {sum('summary' in r for r in records)} of "
        f"{len(records)} regions")
    log(format_best(doc["best"]))
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True,
                    help="folder for sweep.json, profile.json / .txt, rnn_sweep.json, rnn_profile.json / .txt")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="seconds for the sweep, and again for the rnn part (default %(default)s)")
    ap.add_argument("--conv-budget-s", type=float, default=CONV_BUDGET_S,
                    help="seconds of the sweep's budget for its conv section, first (at most half; default %(default)s)")
    ap.add_argument("--profile-budget-s", type=float, default=90.0,
                    help="seconds after which the profile starts no new case (default %(default)s)")
    ap.add_argument("--only", choices=("sweep", "rnn", "profile", "demo"),
                    help="one part only (default sweep, rnn and profile; demo: the demo's training steps profiled, "
                         "demo_profile.json / .txt)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep: no GPU here, nothing to measure")
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.only in (None, "sweep"):
        # conv first, within its share: every forward, input- and weight-gradient candidate (and
        # torch) at bench_conv's shapes (conv_sweep_groups' order); its rows go to sweep_conv.json
        # as they come and into sweep.json under "conv"
        conv = run_sweep(conv_sweep_groups("cuda"), os.path.join(args.out, "sweep_conv.json"),
                         min(args.conv_budget_s, args.budget_s / 2), cleanup=torch.cuda.empty_cache)
        print(f"sweep conv: {len(conv['rows'])} rows, {conv['status']}")
        print(format_best(conv["best"]), flush=True)
        path = os.path.join(args.out, "sweep.json")
        doc = run_sweep(default_groups("cuda"), path, max(0.0, args.budget_s - conv["elapsed_s"]),
                        cleanup=torch.cuda.empty_cache)
        doc["conv"] = conv
        harness.dump_json(doc, path)
        print(f"sweep: {len(doc['rows'])} rows, {doc['status']}")
        print(format_best(doc["best"]), flush=True)
    if args.only in (None, "rnn"):
        run_rnn(args.out, args.budget_s, "cuda", log=lambda s: print(s, flush=True))
    if args.only in (None, "profile"):
        records = run_profile(profile_cases("cuda"), args.out, args.profile_budget_s, cleanup=torch.cuda.empty_cache)
        print(format_profile(records))
        done = sum("summary" in r for r in records)
        print(f"profile: {done} of {len(records)} (op, provider) regions profiled, "
              f"{sum('error' in r for r in records)} errors")
    if args.only == "demo":
        records = run_profile(demo_profile_cases("cuda"), args.out, args.profile_budget_s, profile=profile_with_python,
                              cleanup=torch.cuda.empty_cache, name="demo_profile")
        with open(os.path.join(args.out, "demo_profile.txt"), "a") as f:
            f.write(format_python_top(records) + "\n")
        print(format_profile(records, name_width=60))
        print(format_python_top(records))
        print(f"demo profile: {sum('summary' in r for r in records)} of {len(records)} regions profiled, "
              f"{sum('error' in r for r in records)} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
