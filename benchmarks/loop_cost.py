"""Host time per step of the recurrent time loops on the Triton path, without a GPU (issue 16).

``kernels/triton/rnn.py``'s loops (``steps_forward``, ``steps_backward`` and their pair forms)
make one launch per time step. On a GPU each launch costs the host the fast path's plan key (one
``native_specialize_impl`` per argument), or, where the loop binds the launcher
(``_launch.bind``), only the Python of the step. Here, with no GPU, both are measured as the GPU
runs them up to the launcher: every ``launch_kernel`` call computes the plan key exactly as
``_launch.launch`` does (the kernel's own flags, a CUDA backend for sm_90) and stops there; a
bound loop's ``bind`` computes the key once and returns a no-op launcher. What is left out on
both sides: Triton's C launcher itself (less work for the bound loop, whose pointers are plain
ints: no ``data_ptr()`` call, no ``cuPointerGetAttribute``).

    python -m gpu_nn.benchmarks.loop_cost [--T 100] [--B 64] [--H 512] [--json PATH]

Medians of 15 loops, the calling thread's CPU time, microseconds per step. Runs with
``TRITON_INTERPRET`` unset (the plan key needs the compiled-kernel objects, not interpreted ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def measure(T: int = 100, B: int = 64, H: int = 512, mode: str = "lstm", reps: int = 15) -> dict:
    """``{loop: {"per_step_key": us, "bound": us}}`` per step, for an LSTM-shaped layer."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    from gpu_nn.kernels.triton import _launch
    from gpu_nn.kernels.triton import rnn as kt

    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    infos = {}

    def keyed(kernel, grid, *args, **kwargs):
        info = infos.get(id(kernel))
        if info is None:
            info = infos[id(kernel)] = _launch.kernel_info(kernel)
        return _launch.plan_key(info, 0, backend, args, kwargs, native_specialize_impl)

    def bind(kernel, grid, *args, **kwargs):
        keyed(kernel, grid, *args, **kwargs)
        return lambda *a: None

    G = 4 * H
    e = torch.empty

    def layer():
        return dict(XG=e(T, B, G), Hs=e(T + 1, B, H), Cs=e(T + 1, B, H), out=e(T, B, H), w=e(G, H), carry=e(B, H),
                    dc=e(B, H), dGi=e(T, B, G), dh0=e(B, H))

    a, b = layer(), layer()
    lens = torch.full((B,), T, dtype=torch.int64)

    def fwd(d):
        return (d["XG"], d["Hs"], d["Cs"], d["w"], None, d["out"], None)

    def bwd(d):
        return (d["w"], d["carry"], d["dc"], d["out"], d["XG"], d["Hs"], d["Cs"], d["dGi"], d["dGi"], d["dh0"])

    loops = {
        "forward": lambda: kt.steps_forward(mode, *fwd(a), lens, False, 3),
        "backward": lambda: kt.steps_backward(mode, *bwd(a)[:-1], lens, False, 3),
        "pair forward": lambda: kt.steps_forward_pair(mode, fwd(a), fwd(b), lens, 3),
        "pair backward": lambda: kt.steps_backward_pair(mode, bwd(a), bwd(b), lens, 3),
    }
    saved = kt.launch_kernel, _launch.bind, _launch.bindable
    out = {}
    try:
        kt.launch_kernel, _launch.bind = keyed, bind
        for name, fn in loops.items():
            row = {}
            for label, on in (("per_step_key", False), ("bound", True)):
                _launch.bindable = (lambda v: lambda: v)(on)
                fn()
                ts = []
                for _ in range(reps):
                    t0 = time.thread_time()
                    fn()
                    ts.append(time.thread_time() - t0)
                row[label] = round(statistics.median(ts) / T * 1e6, 2)
            out[name] = row
    finally:
        kt.launch_kernel, _launch.bind, _launch.bindable = saved
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("loop_cost: unset TRITON_INTERPRET (the plan key needs compiled-kernel objects)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    res = measure(args.T, args.B, args.H)
    print(f"host us per step, LSTM T={args.T} B={args.B} H={args.H} (launcher stubbed)")
    print(f"{'loop':16s} {'per-step key':>13s} {'bound':>8s}")
    for name, row in res.items():
        print(f"{name:16s} {row['per_step_key']:13.2f} {row['bound']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"T": args.T, "B": args.B, "H": args.H, "us_per_step": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
