"""Host cost of the Triton path per call, measured without a GPU (issue 14, item 1).

The Triton path's host cost is everything but the kernel: argument checks, backend resolution,
the custom-op / autograd machinery, allocation, launch-plan look-up. Under ``TRITON_INTERPRET=1``
the kernels run in Python on CPU tensors, so their time would swamp that; here every launch is
replaced by a no-op (``InterpretedFunction.run``, which ``kernel[grid](...)`` and the fallback of
``_launch.launch`` reach, and the ``launch_kernel`` names the launchers call), and the ops run on
tiny CPU tensors under ``gpu_nn.backend("triton")``. What is left is the Python-side path.

Outputs are garbage (nothing writes them); the figures are per call, medians over samples of
``CALLS`` calls, the calling thread's CPU time (``--clock wall`` for wall time), for the ops of
``bench_overhead`` (same inputs), forward without grad and forward+backward, against torch's own
op and a bare custom op around a clone (``floor``) on the same inputs::

    .venv/bin/python -m gpu_nn.benchmarks.host_cost                 # every op
    .venv/bin/python -m gpu_nn.benchmarks.host_cost relu lstm_cell  # some
    .venv/bin/python -m gpu_nn.benchmarks.host_cost --profile conv1d  # cProfile of fwd+bwd
    .venv/bin/python -m gpu_nn.benchmarks.host_cost --optim           # optimizer steps
    .venv/bin/python -m gpu_nn.benchmarks.host_cost --demo            # the demo's training steps
    .venv/bin/python -m gpu_nn.benchmarks.host_cost --demo --profile lstm  # cProfile of one
    .venv/bin/python -m gpu_nn.benchmarks.host_cost --demo --fuse cnn      # demo --fuse's model
    .venv/bin/python -m gpu_nn.benchmarks.host_cost --func "ensemble mlp"  # torch.func workloads' launches

Must run in a fresh process: the environment is set before the kernels are imported.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("GPU_NN_POISON", "0")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

CALLS = 50
SAMPLES = 15


LAUNCHES = [0]  # launches made since the patch (every patched entry point counts one)


def _noop(*args, **kwargs):
    LAUNCHES[0] += 1
    return None


def patch_launches() -> None:
    """Every Triton launch becomes a no-op (see the module docstring)."""
    from triton.runtime.interpreter import InterpretedFunction

    import gpu_nn.kernels.triton as pkg
    from gpu_nn.kernels.triton import _launch

    InterpretedFunction.run = _noop  # (self, *args, grid=, warmup=, ...): one launch
    _launch.launch = _noop
    for family in pkg.FAMILIES:
        mod = __import__(f"gpu_nn.kernels.triton.{family}", fromlist=["_"])
        if hasattr(mod, "launch_kernel"):
            mod.launch_kernel = _noop


def _per_call(fn, make, backward: bool, backend, clock) -> float:
    import gpu_nn
    from gpu_nn.benchmarks.bench_overhead import _calls, _flat

    def sample():
        args = make(backward)
        leaves = [t for t in _flat(args) if t.requires_grad]
        t0 = clock()
        _calls(fn, args, leaves, backward, calls=CALLS, allow_unused=True)
        return (clock() - t0) / CALLS

    def run():
        if backend is None:
            return sample()
        with gpu_nn.backend(backend):
            return sample()

    run()  # warm-up: caches, plans, first-use imports
    return statistics.median(run() for _ in range(SAMPLES))


def measure(names=None, clock=time.thread_time) -> dict:
    """name -> {"fwd": {...}, "fwd+bwd": {...}} with microseconds per call for ``triton``
    (launches no-op), ``torch`` and ``floor``."""
    from gpu_nn.benchmarks.bench_overhead import _flat, _functional_ops, floor_custom_op

    ops = _functional_ops("cpu")
    out = {}
    torch.set_num_threads(1)
    for name, (make, ours, theirs) in ops.items():
        if names and name not in names:
            continue
        row = {}
        for label, backward in (("fwd", False), ("fwd+bwd", True)):
            def first(grad, make=make):
                return (next(_flat(make(grad))),)
            cell = {}
            for who, fn, mk, be in (("triton", ours, make, "triton"), ("torch", theirs, make, None),
                                    ("floor", floor_custom_op, first, None)):
                try:
                    cell[who] = round(_per_call(fn, mk, backward, be, clock) * 1e6, 1)
                except Exception as exc:  # noqa: BLE001 - reported, not hidden
                    cell[who] = f"{type(exc).__name__}: {exc}"[:120]
            row[label] = cell
        out[name] = row
    return out


# the optimizer bench's GPU set has 11 tensors per step (bench_optim); here a conv net's 11
OPTIM_SHAPES = [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (128,), (256, 128, 3, 3), (256,), (512, 256, 3, 3), (512,),
                (10, 512), (10,), (1000,)]
OPTIMIZERS = {"SGD": dict(lr=0.01), "SGD momentum": dict(lr=0.01, momentum=0.9), "Adagrad": dict(lr=0.01),
              "Adadelta": dict(), "RMSprop": dict(lr=0.01), "Adam": dict(lr=1e-3),
              "AdamW": dict(lr=1e-3, weight_decay=0.01)}


def measure_optim(clock=time.thread_time) -> dict:
    """name -> microseconds per ``step()`` of our optimizer on the Triton path (launches no-op),
    11 float32 tensors, gradients kept between steps, after warm-up steps."""
    import gpu_nn
    import gpu_nn.optim as goptim

    torch.set_num_threads(1)
    out = {}
    for label, kw in OPTIMIZERS.items():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in OPTIM_SHAPES]
        for p in ps:
            p.grad = torch.randn_like(p)
        opt = vars(goptim)[label.split()[0]](ps, **kw)  # (ours only: vars, not the torch fallback)

        def sample():
            t0 = clock()
            for _ in range(CALLS):
                opt.step()
            return (clock() - t0) / CALLS

        with gpu_nn.backend("triton"):
            for _ in range(3):
                opt.step()
            out[label] = round(statistics.median(sample() for _ in range(SAMPLES)) * 1e6, 1)
    return out


# the demo's training step, phase by phase (gpu_nn.demo's _Side.step, split where it syncs nothing)
DEMO_PHASES = ("zero_grad", "forward", "loss", "backward", "clip", "step")
DEMO_STEPS = 20  # steps per sample


def _demo_side(model: str, grads_stable: bool, fuse: bool = False):
    """{phase: callable} in DEMO_PHASES order: the demo's model, optimizer, loss and clipping (its
    HYPER, its batch size of the digits), every phase of one training step a callable of its own. ``grads_stable``: gradients zeroed in place, not
    set to None, so every backward writes the same blocks -- what a GPU's caching allocator
    normally gives the optimizer (CPU gradients otherwise come back at new addresses, and the
    optimizer's per-address tables miss). ``fuse``: the model through ``gpu_nn.fuse`` (the demo's
    ``--fuse``)."""
    import gpu_nn
    from gpu_nn import demo

    hp = demo.HYPER[model]
    torch.manual_seed(0)
    net = demo.build(model, gpu_nn.nn)
    if fuse:
        net = gpu_nn.fuse(net)
    opt = vars(gpu_nn.optim)[hp["optimizer"]](net.parameters(), lr=hp["lr"])
    loss_fn = gpu_nn.nn.CrossEntropyLoss()
    clip = gpu_nn.nn.utils.clip_grad_norm_
    (x, y), _ = demo.split(*demo.load_digits())
    xb, yb = demo._inputs(model, x[:hp["batch_size"]], "cpu"), torch.from_numpy(y[:hp["batch_size"]])
    state = {}

    def zero_grad():
        opt.zero_grad(set_to_none=not grads_stable)

    def forward():
        state["out"] = net(xb)

    def loss():
        state["loss"] = loss_fn(state["out"], yb)

    def backward():
        state.pop("loss").backward()
        state.pop("out")

    def clip_():
        if hp["clip"] is not None:
            clip(net.parameters(), hp["clip"])

    def step():
        opt.step()

    return dict(zip(DEMO_PHASES, (zero_grad, forward, loss, backward, clip_, step)))


def measure_demo(models=("cnn", "lstm", "gru"), clock=time.thread_time, grads_stable: bool = True,
                 samples: int = SAMPLES, steps: int = DEMO_STEPS, fuse: bool = False) -> dict:
    """model -> {"us": {phase: microseconds per training step, "total": their sum}, "launches":
    {phase: kernel launches per step, "total"}}: the host cost of the demo's training step on the
    Triton path, launches no-op (median of ``samples`` samples of ``steps`` steps per phase), and
    how many launches each phase makes (ours: torch's own ops on CPU tensors are not counted)."""
    import gpu_nn

    torch.set_num_threads(1)
    out = {}
    for model in models:
        phases = _demo_side(model, grads_stable, fuse)
        times = {k: [] for k in phases}
        with gpu_nn.backend("triton"):
            for _ in range(3):  # warm-up: plans, tables, first-use imports
                for fn in phases.values():
                    fn()
            launches = {}
            for k, fn in phases.items():  # one step, phase by phase, counted
                n0 = LAUNCHES[0]
                fn()
                launches[k] = LAUNCHES[0] - n0
            for _ in range(samples):
                acc = dict.fromkeys(phases, 0.0)
                for _ in range(steps):
                    for k, fn in phases.items():
                        t0 = clock()
                        fn()
                        acc[k] += clock() - t0
                for k in phases:
                    times[k].append(acc[k] / steps)
        row = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}
        row["total"] = round(sum(row.values()), 1)
        launches["total"] = sum(launches.values())
        out[model] = {"us": row, "launches": launches}
    return out


def profile_demo(model: str, top: int = 40, fuse: bool = False) -> None:
    import gpu_nn

    phases = _demo_side(model, True, fuse)

    def body(n):
        with gpu_nn.backend("triton"):
            for _ in range(n):
                for fn in phases.values():
                    fn()

    _print_profile(body, 3, 200, top)


def table(res: dict) -> str:
    lines = [f"{'op':<15}{'pass':<9}{'triton us':>10}{'torch us':>10}{'floor us':>10}{'tri/torch':>10}"]
    for name, row in res.items():
        for label, c in row.items():
            t, o, f = c["triton"], c["torch"], c["floor"]
            ratio = f"{t / o:.2f}" if isinstance(t, float) and isinstance(o, float) and o else "-"
            fmt = lambda v: f"{v:>10.1f}" if isinstance(v, float) else f"  {v}"  # noqa: E731
            lines.append(f"{name:<15}{label:<9}{fmt(t)}{fmt(o)}{fmt(f)}{ratio:>10}")
    return "\n".join(lines)


def profile(name: str, backward: bool = True, top: int = 30) -> None:
    import gpu_nn
    from gpu_nn.benchmarks.bench_overhead import _first, _flat, _functional_ops

    make, ours, _ = _functional_ops("cpu")[name]
    args = make(backward)
    leaves = [t for t in _flat(args) if t.requires_grad]

    def body(n):
        with gpu_nn.backend("triton"):
            for _ in range(n):
                if backward:
                    y = _first(ours(*args))
                    torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
                else:
                    with torch.no_grad():
                        ours(*args)

    _print_profile(body, 2, 500, top)


def _print_profile(body, warm: int, n: int, top: int) -> None:
    """``body(warm)`` unprofiled (caches, plans, imports), then ``body(n)`` under cProfile: the
    ``top`` functions by own time."""
    body(warm)
    prof = cProfile.Profile()
    prof.enable()
    body(n)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def measure_func(names=None, clock=time.thread_time, samples: int = 5) -> dict:
    """The func bench's torch.func workloads on the Triton path, launches no-op: ``"work kind"``
    -> our launches per call and the call's host time in microseconds (median of ``samples``).
    What folds under vmap shows as launches; the time includes the host-side copies of real CPU
    tensors (layouts merged for a fold), which a GPU makes on the device."""
    from gpu_nn.benchmarks.bench_func import CASES, _setup

    torch.set_num_threads(1)
    out = {}
    for kind, work, B, _ in CASES:
        name = f"{work} {kind}"
        if names and name not in names or (not names and work == "jacfwd"):  # (jacfwd: minutes here)
            continue
        for compose in ((False, True) if (kind, work) == ("lstm", "per-sample") else (False,)):
            call = _setup(kind, work, B, "cpu", "triton", compose=compose)()
            call()  # warm-up: plans, first-use imports
            LAUNCHES[0] = 0
            call()
            launches = LAUNCHES[0]
            times = []
            for _ in range(samples):
                t0 = clock()
                call()
                times.append(clock() - t0)
            out[name + (" compose" if compose else "")] = {"B": B, "launches": launches,
                                                           "us": round(statistics.median(times) * 1e6, 1)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ops", nargs="*")
    p.add_argument("--clock", choices=("thread", "wall"), default="thread")
    p.add_argument("--profile", metavar="OP")
    p.add_argument("--fwd", action="store_true", help="with --profile: forward only")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--optim", action="store_true", help="optimizer steps instead of ops")
    p.add_argument("--demo", action="store_true",
                   help="the demo's training steps (ops: the models, default all), phase by phase")
    p.add_argument("--new-grads", action="store_true",
                   help="with --demo: gradients set to None each step, as the demo does (new CPU addresses)")
    p.add_argument("--fuse", action="store_true", help="with --demo: the model through gpu_nn.fuse (demo --fuse)")
    p.add_argument("--func", action="store_true",
                   help="the func bench's torch.func workloads (ops: their names, as 'ensemble mlp'; default all "
                        "but jacfwd): launches per call and host time")
    p.add_argument("--samples", type=int, default=SAMPLES, help="with --demo: samples per phase (median)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="with --demo: training steps per sample")
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    patch_launches()
    if a.profile:
        if a.demo:
            profile_demo(a.profile, fuse=a.fuse)
        else:
            profile(a.profile, backward=not a.fwd)
        return 0
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    if a.demo:
        res = measure_demo(tuple(a.ops) or ("cnn", "lstm", "gru"), clock, grads_stable=not a.new_grads,
                           samples=a.samples, steps=a.steps, fuse=a.fuse)
        print(f"{'model':<7}" + "".join(f"{k:>11}" for k in (*DEMO_PHASES, "total")) + "   per training step")
        for m, row in res.items():
            print(f"{m:<7}" + "".join(f"{row['us'][k]:>11.1f}" for k in (*DEMO_PHASES, "total")) + "   us")
            print(f"{'':<7}" + "".join(f"{row['launches'][k]:>11d}" for k in (*DEMO_PHASES, "total")) + "   launches")
    elif a.func:
        res = measure_func(a.ops or None, clock)
        print("\n".join(f"{k:<24}B={v['B']:<4}{v['launches']:>6d} launches{v['us'] / 1e3:>10.1f} ms" for k, v in res.items()))
    elif a.optim:
        res = measure_optim(clock)
        print("\n".join(f"{k:<14}{v:>8.1f} us per step" for k, v in res.items()))
    else:
        res = measure(a.ops or None, clock)
        print(table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
