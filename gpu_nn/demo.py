"""``gpu-nn demo``: the textbook CNN and recurrent models trained end to end on real digits.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, pixel values 0..16; see
``gpu_nn/data/README.md``), shipped in the package, split once and for all into 1,437 training
and 360 test images (a fixed permutation, independent of ``--seed``).

Models (``--model``, default all three):

* ``cnn``:  Conv2d(1->16, 3, padding=1) -> ReLU -> MaxPool2d(2) -> Conv2d(16->32, 3,
  padding='same') -> ReLU -> MaxPool2d(2) -> Flatten -> Linear(128->64) -> ReLU ->
  Linear(64->10); softmax cross-entropy; Adam.
* ``lstm``: a bidirectional 2-layer LSTM (hidden 32) reading each image row by row (8 steps of
  8 features, batch_first); its last output (both directions, 64 features) through
  Linear(64->10); cross-entropy; Adam; gradients clipped to global norm 1.
* ``gru``:  the same with a bidirectional 2-layer GRU, trained with RMSprop.

Every layer, the loss, the optimizer and the clipping of "ours" come from ``gpu_nn.nn``,
``gpu_nn.optim`` and ``gpu_nn.nn.utils.clip_grad_norm_``. Alongside, the same architecture in
plain ``torch.nn`` starts from the same initial weights (its state_dict is loaded from ours)
and sees the same batches in the same order, so the two loss curves and the two test
accuracies show that gpu-nn trains as torch does. Builders take the module namespaces
(:class:`Impl`) as an argument: the same code builds both.

On a CUDA device with ``--backend auto`` our GPU kernels run (Triton / CUDA C); on the CPU the
NumPy reference does.

Timing: both twins go through one training-step function and one timing loop (the only
difference is the ``gpu_nn.backend`` block around ours). The first epoch is reported apart as
warm-up (it sees every batch shape once, so it pays kernel compilation, autotuning and, with
``--compile``, ``torch.compile``'s tracing and code generation); ``seconds_per_epoch`` is the
steady state, the mean of the later epochs (the first epoch's figure when only one ran).
``--compile`` compiles both models the same way (``torch.compile`` with the same backend and
mode; on a GPU ``mode="reduce-overhead"``, CUDA graphs, by default).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.resources
import json
import os
import time
from types import ModuleType
from typing import Callable

import numpy as np
import torch

MODELS = ("cnn", "lstm", "gru")
N_TRAIN = 1437  # of 1797: 80 % for training, the rest (360) for the test
N_TEST = 1797 - N_TRAIN
SPLIT_SEED = 20240917  # the split is part of the data set, not of the run: never changes

# Per model: epochs, batch size, optimizer, learning rate, clip norm (None: no clipping).
# Chosen so that the default run of all three models (ours and torch's twin) finishes in
# under 4 minutes on a 2-core CPU with test accuracies cnn >= 0.95, lstm/gru >= 0.90.
HYPER = {
    "cnn": dict(epochs=8, batch_size=32, optimizer="Adam", lr=3e-3, clip=None),
    "lstm": dict(epochs=20, batch_size=32, optimizer="Adam", lr=4e-3, clip=1.0),
    "gru": dict(epochs=12, batch_size=32, optimizer="RMSprop", lr=3e-3, clip=1.0),
}
HIDDEN = 32


@dataclasses.dataclass(frozen=True)
class Impl:
    """Where a model's layers, loss, optimizers and gradient clipping come from."""

    name: str
    nn: ModuleType
    optim: ModuleType
    clip_grad_norm_: Callable


def gpu_nn_impl() -> Impl:
    import gpu_nn.nn
    import gpu_nn.optim

    return Impl("gpu_nn", gpu_nn.nn, gpu_nn.optim, gpu_nn.nn.utils.clip_grad_norm_)


def torch_impl() -> Impl:
    return Impl("torch", torch.nn, torch.optim, torch.nn.utils.clip_grad_norm_)


# --------------------------------------------------------------------------------------- data


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] with values 0..16, labels uint8 [1797]) from the package."""
    ref = importlib.resources.files("gpu_nn.data").joinpath("digits.npz")
    with ref.open("rb") as f, np.load(f) as z:
        return z["images"].copy(), z["labels"].copy()


def split(images: np.ndarray, labels: np.ndarray):
    """Fixed train/test split: ((x_train, y_train), (x_test, y_test)), x as float32 in [0, 1]."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    x = images.astype(np.float32) / 16.0
    y = labels.astype(np.int64)
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    return (x[tr], y[tr]), (x[te], y[te])


# ------------------------------------------------------------------------------------- models


class DigitsCNN(torch.nn.Module):
    """[N, 1, 8, 8] -> logits [N, 10]."""

    def __init__(self, nn: ModuleType):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding="same")
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class DigitsRNN(torch.nn.Module):
    """[N, 8, 8] read as 8 steps of 8 features -> logits [N, 10] from the last step's output."""

    def __init__(self, nn: ModuleType, cell: str, hidden: int = HIDDEN):
        super().__init__()
        self.rnn = getattr(nn, cell)(8, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hidden, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def build(model: str, nn: ModuleType) -> torch.nn.Module:
    if model == "cnn":
        return DigitsCNN(nn)
    if model in ("lstm", "gru"):
        return DigitsRNN(nn, model.upper())
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")


def _inputs(model: str, x: np.ndarray, device) -> torch.Tensor:
    t = torch.from_numpy(x).to(device)
    return t.unsqueeze(1) if model == "cnn" else t


# ----------------------------------------------------------------------------------- training


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _accuracy(net, model, x, y, device) -> float:
    net.eval()
    with torch.no_grad():
        pred = net(_inputs(model, x, device)).argmax(dim=1).cpu().numpy()
    net.train()
    return float((pred == y).mean())


def backend_label(backend: str, device: str, impl: Impl) -> str:
    if impl.name != "gpu_nn":
        return f"{impl.name} (self-check: both sides are torch)"
    if backend != "auto":
        return backend
    return "reference" if torch.device(device).type == "cpu" else "auto (our GPU kernels)"


class _Side:
    """One twin: its (maybe compiled) model, optimizer, loss, clipping and backend block, the
    per-step losses and per-epoch seconds. Both twins run this same code."""

    def __init__(self, net, opt, loss_fn, clip, context, compiled: bool = False):
        self.net, self.opt, self.loss_fn, self.clip, self.context = net, opt, loss_fn, clip, context
        self.curve: list[float] = []
        self.epoch_seconds: list[float] = []
        # with torch.compile: what torch's counters say this twin's steps compiled (graphs, graph
        # breaks, CUDA graphs skipped), taken around each step outside its timed span
        self.compiled = dict.fromkeys(COMPILE_COUNTS, 0) if compiled else None

    def step(self, xb, yb, clip_norm):
        """One training step in the twin's block: zero_grad, loss, backward, clipping (``clip_norm``
        None: none), optimizer step. Returns the loss, not synchronised."""
        with self.context():
            self.opt.zero_grad()
            loss = self.loss_fn(self.net(xb), yb)
            loss.backward()
            if clip_norm is not None:
                self.clip(self.net.parameters(), clip_norm)
            self.opt.step()
        return loss

    def timed_step(self, xb, yb, clip_norm, device) -> None:
        before = compile_counts() if self.compiled is not None else None
        _sync(device)
        t0 = time.perf_counter()
        loss = self.step(xb, yb, clip_norm)
        _sync(device)
        self.epoch_seconds[-1] += time.perf_counter() - t0
        if before is not None:
            for k, v in compile_counts().items():
                self.compiled[k] += v - before[k]
        self.curve.append(float(loss.detach()))

    def figures(self) -> tuple[float, float, float]:
        """(total seconds, warm-up = first epoch, steady state = mean of the later epochs)."""
        e = self.epoch_seconds
        steady = sum(e[1:]) / (len(e) - 1) if len(e) > 1 else (e[0] if e else 0.0)
        return sum(e), (e[0] if e else 0.0), steady


COMPILE_COUNTS = ("graphs", "graph_breaks", "cudagraph_skips")


def compile_counts() -> dict:
    """torch.compile's process-wide counters (``torch._dynamo.utils.counters``): graphs compiled,
    graph breaks, and the times inductor skipped CUDA graphs for a graph (reduce-overhead then
    runs it without them, which issue 14's compiled-demo goal does not measure)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def train_pair(model: str, epochs: int | None = None, device: str = "cpu", backend: str = "auto",
               subset: int | None = None, seed: int = 0, ours: Impl | None = None,
               batch_size: int | None = None, lr: float | None = None, progress: bool = True,
               keep_models: bool = False, compile: bool | None = None, compile_backend: str = "inductor",
               compile_mode: str | None = None, fuse: bool = False, compile_rnn: bool = False) -> dict:
    """Train ``model`` built from ``ours`` (default gpu_nn) and its torch twin side by side.

    Both start from the same weights and take the same batches; each step runs ours (under
    ``gpu_nn.backend(backend)``) then the twin. Returns the figures of the JSON report, with
    per-step losses ``loss_curve`` / ``torch_loss_curve``; with ``keep_models`` also the two
    trained modules under ``models``. ``compile`` (truthy) wraps both models in
    ``torch.compile(backend=compile_backend, mode=compile_mode)``; ``compile_rnn`` with it lets
    Dynamo trace the recurrent modules of both (``torch._dynamo.config.allow_rnn``). ``fuse``: ours is
    ``gpu_nn.fuse`` of its model (each convolution / linear -> ReLU pair one layer; the twin stays
    as built, the same weights through the unchanged state_dict keys).
    """
    import gpu_nn

    hp = dict(HYPER[model])
    epochs = hp["epochs"] if epochs is None else epochs
    batch_size = batch_size or hp["batch_size"]
    lr = hp["lr"] if lr is None else lr
    ours = ours or gpu_nn_impl()
    twin_impl = torch_impl()
    (x_tr, y_tr), (x_te, y_te) = split(*load_digits())
    if subset is not None:
        x_tr, y_tr = x_tr[:subset], y_tr[:subset]

    with gpu_nn.backend(backend):  # an unusable backend fails here, before any work
        torch.manual_seed(seed)
        net = build(model, ours.nn).to(device)
        if fuse:
            net = gpu_nn.fuse(net)
    twin = build(model, twin_impl.nn).to(device)
    twin.load_state_dict(net.state_dict())
    opt = vars(ours.optim)[hp["optimizer"]](net.parameters(), lr=lr)  # (ours: vars, not the torch fallback)
    twin_opt = getattr(twin_impl.optim, hp["optimizer"])(twin.parameters(), lr=lr)
    loss_fn, twin_loss_fn = ours.nn.CrossEntropyLoss(), twin_impl.nn.CrossEntropyLoss()

    compile = True if compile else None
    if compile is not None:
        # the same compilation for both twins; the modules keep their parameters (state_dict,
        # optimizers and the accuracy below see the same tensors)
        kw = {"backend": compile_backend} if compile_mode is None else {"backend": compile_backend, "mode": compile_mode}
        fwd, twin_fwd = torch.compile(net, **kw), torch.compile(twin, **kw)
    else:
        fwd, twin_fwd = net, twin

    sides = (
        _Side(fwd, opt, loss_fn, ours.clip_grad_norm_, lambda: gpu_nn.backend(backend), compiled=compile is not None),
        _Side(twin_fwd, twin_opt, twin_loss_fn, twin_impl.clip_grad_norm_, contextlib.nullcontext,
              compiled=compile is not None),
    )
    # --compile-rnn: Dynamo traces the recurrent modules too (torch._dynamo.config.allow_rnn, off by
    # default: Dynamo then runs torch's recurrent modules, and ours, which are theirs by type, eagerly)
    rnn_ctx = contextlib.nullcontext()
    if compile is not None and compile_rnn:
        from torch import _dynamo

        rnn_ctx = _dynamo.config.patch(allow_rnn=True)
    with rnn_ctx:
        order = np.random.default_rng(seed)
        n = len(y_tr)
        for epoch in range(epochs):
            perm = order.permutation(n)
            batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(batches), desc=f"{model} epoch {epoch + 1}/{epochs}", unit="batch", leave=True)
            for side in sides:
                side.epoch_seconds.append(0.0)
            for idx in batches:
                xb = _inputs(model, x_tr[idx], device)
                yb = torch.from_numpy(y_tr[idx]).to(device)
                for side in sides:  # same batch, same code, ours then the twin
                    side.timed_step(xb, yb, hp["clip"], device)
                if bar is not None:
                    bar.set_postfix(loss=f"{sides[0].curve[-1]:.4f}", torch=f"{sides[1].curve[-1]:.4f}", refresh=False)
                    bar.update(1)
            if bar is not None:
                bar.close()
    (seconds, warmup, steady), (twin_seconds, twin_warmup, twin_steady) = (s.figures() for s in sides)
    curve, twin_curve = sides[0].curve, sides[1].curve

    with gpu_nn.backend(backend):
        acc = _accuracy(net, model, x_te, y_te, device)
    twin_acc = _accuracy(twin, model, x_te, y_te, device)
    out = {
        "test_accuracy": acc,
        "torch_test_accuracy": twin_acc,
        "seconds": round(seconds, 3),
        "torch_seconds": round(twin_seconds, 3),
        "seconds_per_epoch": round(steady, 3),
        "torch_seconds_per_epoch": round(twin_steady, 3),
        "warmup_seconds": round(warmup, 3),
        "torch_warmup_seconds": round(twin_warmup, 3),
        "steady_state": epochs > 1,
        "compile": None if compile is None else {"backend": compile_backend, "mode": compile_mode,
                                                 "allow_rnn": bool(compile_rnn)},
        # per twin, what its steps compiled: a graph break or a CUDA graph skipped shows here
        "compiled": None if compile is None else {"ours": sides[0].compiled, "torch": sides[1].compiled},
        "fused": bool(fuse),
        "epochs": epochs,
        "backend": backend_label(backend, device, ours),
        "device": str(device),
        "optimizer": hp["optimizer"],
        "lr": lr,
        "batch_size": batch_size,
        "clip_grad_norm": hp["clip"],
        "train_size": n,
        "test_size": len(y_te),
        "seed": seed,
        "final_loss": curve[-1] if curve else None,
        "torch_final_loss": twin_curve[-1] if twin_curve else None,
        "loss_curve": curve,
        "torch_loss_curve": twin_curve,
    }
    if keep_models:
        out["models"] = (net, twin)
    return out


# ------------------------------------------------------------------------------------- output


def plot_losses(results: dict, path: str) -> None:
    """Per-step training loss of ours and torch's twin, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = results[name]
        steps = np.arange(1, len(r["loss_curve"]) + 1)
        ax.plot(steps, r["torch_loss_curve"], lw=2.5, alpha=0.45, color="tab:orange", label="torch.nn")
        ax.plot(steps, r["loss_curve"], lw=0.9, color="tab:blue", label=f"gpu-nn ({r['backend']})")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(f"{name}: test acc {r['test_accuracy']:.3f} (torch {r['torch_test_accuracy']:.3f})", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"gpu-nn demo on digits ({results[names[0]]['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    sizes = {(r.get("train_size", N_TRAIN), r.get("test_size", N_TEST)) for r in results.values()}
    train, test = sizes.pop() if len(sizes) == 1 else (N_TRAIN, N_TEST)
    table = Table(title=f"gpu-nn demo: digits, fixed split ({train} train / {test} test)")
    for col in ("model", "backend", "device", "epochs", "test acc ours", "test acc torch", "s/epoch ours", "s/epoch torch",
                "warm-up s ours", "warm-up s torch"):
        table.add_column(col, justify="right" if col not in ("model", "backend", "device") else "left")
    for name, r in results.items():
        close = abs(r["test_accuracy"] - r["torch_test_accuracy"]) <= 0.01
        colour = "green" if close else "red"
        table.add_row(name, r["backend"], r["device"], str(r["epochs"]),
                      f"[{colour}]{r['test_accuracy']:.4f}[/{colour}]", f"{r['torch_test_accuracy']:.4f}",
                      f"{r['seconds_per_epoch']:.2f}" + ("" if r.get("steady_state", True) else "*"),
                      f"{r['torch_seconds_per_epoch']:.2f}" + ("" if r.get("steady_state", True) else "*"),
                      f"{r.get('warmup_seconds', 0.0):.2f}", f"{r.get('torch_warmup_seconds', 0.0):.2f}")
    if any(not r.get("steady_state", True) for r in results.values()):
        table.caption = "* one epoch only: s/epoch includes the warm-up (compilation); run 2+ epochs for the steady state"
    else:
        table.caption = "s/epoch: steady state, mean of epochs 2..E; warm-up: epoch 1 (compilation, autotuning)"
    (console or Console()).print(table)


# -------------------------------------------------------------------------------------- command


def add_arguments(parser) -> None:
    from .cli import count, output_path

    def plot_path(path: str) -> str:
        # matplotlib picks the format from the suffix: refuse one it cannot write now, not after training
        path = output_path(path)
        if os.path.splitext(path)[1].lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise argparse.ArgumentTypeError(f"{path}: the plot is written as .png, .pdf, .svg or .jpg (by its suffix)")
        return path

    parser.add_argument("--model", choices=(*MODELS, "all"), default="all", help="default %(default)s")
    parser.add_argument("--epochs", type=count(1), help="epochs per model (default: %s)"
                        % ", ".join(f"{m} {h['epochs']}" for m, h in HYPER.items()))
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--backend", choices=("auto", "reference", "triton", "cupy"), default=None,
                        help="gpu-nn backend for our models (default: GPU_NN_BACKEND, else auto)")
    parser.add_argument("--json", type=output_path, help="write the figures to this JSON file")
    parser.add_argument("--plot", type=plot_path, help="write a plot of the loss curves to this .png (.pdf, .svg, .jpg) path")
    parser.add_argument("--subset", type=count(1), help="train on only the first N training images")
    parser.add_argument("--seed", type=count(0), default=0, help="initial weights and batch order (default %(default)s)")
    parser.add_argument("--threads", type=count(1), default=1,
                        help="CPU threads of torch and of NumPy's BLAS (the reference fallback's matrix products) "
                             "(default %(default)s: the models are tiny, and fanning each small op out over threads "
                             "costs more than it saves, badly so on a busy machine)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both models the same way (see --compile-backend / --compile-mode)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for --compile (default %(default)s; 'aot_eager' compiles fast)")
    parser.add_argument("--compile-mode", default=None,
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode for --compile (default: reduce-overhead, i.e. CUDA graphs, on cuda "
                             "with inductor; torch's default otherwise)")
    parser.add_argument("--compile-rnn", action="store_true",
                        help="with --compile: Dynamo traces the recurrent modules of both twins too "
                             "(torch._dynamo.config.allow_rnn; by default it runs them eagerly, torch's and ours)")
    parser.add_argument("--fuse", action="store_true",
                        help="our model through gpu_nn.fuse: each convolution / linear -> ReLU pair one layer with "
                             "the activation in its epilogue (the CNN's three; the recurrent models have none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--ours-from", choices=("gpu_nn", "torch"), default="gpu_nn",
                        help="build 'ours' from gpu_nn (default) or, as a self-check of the demo itself, from torch")


# NumPy's bundled OpenBLAS (its wheels' numpy.libs, or numpy/.dylibs on macOS): the thread
# setters a build may export, each with its getter (set -> get)
_BLAS_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                 "openblas_set_num_threads64_", "openblas_set_num_threads")


@functools.lru_cache(maxsize=1)
def _numpy_openblas():
    """(set, get) of the OpenBLAS threads of the library NumPy's wheel bundles (opened by its path:
    the copy NumPy has loaded), or None (another BLAS, a NumPy built otherwise)."""
    import ctypes
    import glob

    base = os.path.dirname(np.__file__)
    for path in sorted(glob.glob(os.path.join(base + ".libs", "*openblas*"))
                       + glob.glob(os.path.join(base, ".dylibs", "*openblas*"))):
        try:  # the copy NumPy has loaded, never one of its own (RTLD_NOLOAD where there is one)
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) or ctypes.DEFAULT_MODE)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            setter = getattr(lib, name, None)
            getter = getattr(lib, name.replace("_set_", "_get_"), None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter.argtypes, getter.restype = [], ctypes.c_int
                return setter, getter
    return None


def numpy_blas_threads(n: int) -> int | None:
    """Set the threads of NumPy's BLAS (the reference fallback's matrix products) to ``n``; the
    count before, or None where that BLAS is not found (left alone). ``torch.set_num_threads``
    leaves it be: on a 2-core machine with one core busy, its two threads waiting on each other
    made the demo's reference LSTM and GRU 10-17x slower per epoch (CNN unchanged; an audit:
    119.8 s in all against 12.2 s with OPENBLAS_NUM_THREADS=1; the LSTM alone, 3 epochs, 2.27 s
    an epoch against 0.21 s capped by this)."""
    blas = _numpy_openblas()
    if blas is None:
        return None
    before = blas[1]()
    blas[0](int(n))
    return before


def _write_json(path: str, results: dict) -> None:
    """``results`` to ``path``, whole or not at all (a reader never sees half a file)."""
    from .kernels import replace_file

    replace_file(path, json.dumps(results, indent=1).encode())


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-nn demo: --device cuda but torch sees no CUDA device")
    torch_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    blas_before = numpy_blas_threads(args.threads)
    try:
        return _run(args, device)
    finally:  # (both given back: a caller in the same process keeps its own)
        torch.set_num_threads(torch_before)
        if blas_before is not None:
            numpy_blas_threads(blas_before)


def _run(args, device: str) -> int:
    from rich.console import Console

    from . import _backend

    if args.compile:
        from torch import _dynamo

        known = _dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in known:
            raise SystemExit(f"gpu-nn demo: --compile-backend {args.compile_backend!r} is not one of torch.compile's "
                             f"backends: {', '.join(sorted(known))}")
    if not args.compile and (args.compile_mode is not None or args.compile_backend != "inductor"):
        # (they would be ignored: the run trains eager and its figures say nothing of them)
        raise SystemExit("gpu-nn demo: --compile-mode / --compile-backend take effect with --compile only")
    if args.compile_rnn and not args.compile:
        raise SystemExit("gpu-nn demo: --compile-rnn takes effect with --compile only")
    if args.fuse and args.ours_from != "gpu_nn":
        raise SystemExit("gpu-nn demo: --fuse makes gpu_nn layers; it cannot go with --ours-from torch")
    if args.ours_from == "gpu_nn" and (args.backend or _backend.requested()) == "cupy":
        from ._errors import BackendUnavailableError

        # said before any data is read or model made (the first linear would refuse it mid-run)
        raise BackendUnavailableError(
            "the demo's models need linear, conv2d and cross_entropy, which have no cupy kernels (cupy runs "
            "pooling, the recurrent layers and the optimizers' steps); use --backend triton or auto")
    ours = gpu_nn_impl() if args.ours_from == "gpu_nn" else torch_impl()
    models = MODELS if args.model == "all" else (args.model,)
    results = {}
    t0 = time.perf_counter()
    mode = args.compile_mode
    if args.compile and mode is None and device == "cuda" and args.compile_backend == "inductor":
        mode = "reduce-overhead"
    for m in models:
        results[m] = train_pair(m, args.epochs, device, args.backend or _backend.requested(), args.subset, args.seed, ours,
                                progress=not args.no_progress, compile=args.compile,
                                compile_backend=args.compile_backend, compile_mode=mode, fuse=args.fuse,
                                compile_rnn=args.compile_rnn)
        if args.json and len(results) < len(models):  # the models done so far: a run cut short keeps them
            _write_json(args.json, results)
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that cells do not wrap
        console = Console(width=160)
    print_table(results, console)
    for name, r in results.items():  # --compile: what each twin's steps compiled, said beside its figures
        if r.get("compiled"):
            console.print(f"{name} compiled: " + "; ".join(
                f"{side} {c['graphs']} graphs, {c['graph_breaks']} graph breaks, {c['cudagraph_skips']} CUDA graphs skipped"
                for side, c in r["compiled"].items()), markup=False)
    console.print(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        _write_json(args.json, results)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot_losses(results, args.plot)
        console.print(f"wrote {args.plot}")
    return 0
