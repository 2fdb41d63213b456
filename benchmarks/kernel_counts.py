"""Kernels per op, ours against torch (issue 14.2): what one forward+backward launches on the GPU.

For every public op of the overhead family (its tiny, odd-sized inputs, every input requiring
grad), one warm forward+backward runs under ``torch.profiler`` with CUDA activity, on each GPU
backend of ours and on torch; the GPU-side events (kernels, memsets, memcpys) are counted by name.
A warm-up call first, so that lazy set-up and compilation are not counted. :func:`by_kind` sorts
the events into kernels named as themselves (ours) and torch's by kind (fills, reductions, copies,
host syncs, other aten kernels); tests/test_hotpath.py pins its launch cases that way on a GPU.

    python -m gpu_nn.benchmarks.kernel_counts --out counts.json   (prints a markdown table)

On a machine without a GPU there is nothing to count: it says so and exits 0 (there the launch
counts are pinned through the Triton interpreter in tests/test_hotpath.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

import gpu_nn
from gpu_nn.benchmarks import bench_overhead


def _first_tensor(y):
    if isinstance(y, torch.Tensor):
        return y
    for v in y:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _leaves(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                out.append(a)
        elif isinstance(a, (tuple, list)):
            out.extend(_leaves(a))
    return out


def _fwd_bwd(fn, args):
    y = _first_tensor(fn(*args))
    g = torch.ones_like(y)
    torch.cuda.synchronize()
    return y, g


# What a GPU event of torch's is, by a substring of its name (the first that matches).
KINDS = (
    ("Memcpy DtoH", "sync"),           # a copy to the host, which waits for it (.item(), a bool test)
    ("Memcpy", "copy"),                # device to device, host to device
    ("direct_copy_kernel", "copy"),    # aten copy_: .contiguous(), .to(), clone
    ("Memset", "fill"),
    ("FillFunctor", "fill"),           # zeros, full, fill_
    # sum, any, ... (torch's by its namespace: a kernel of ours may be named *reduce_kernel too,
    # _ce_reduce_kernel, and was counted as torch's reduction on the H200 at 09f2311)
    ("at::native::reduce_kernel", "reduce"),
    ("at::native::", "aten"),          # another of torch's kernels (elementwise arithmetic, comparisons)
)


def kind(name: str) -> str:
    """The kind of a GPU event (:data:`KINDS`), or ``"kernel"`` for a kernel named as itself:
    ours (a Triton or CuPy kernel's function name), or a cuDNN / cuBLAS kernel of torch's."""
    return next((k for sub, k in KINDS if sub in name), "kernel")


def by_kind(counts: dict) -> tuple[dict, dict]:
    """({kernel name: count} for the ``"kernel"`` events, {kind: count} for the rest) of a
    :func:`count` result."""
    kernels, kinds = {}, collections.Counter()
    for name, n in counts.items():
        k = kind(name)
        if k == "kernel":
            kernels[name] = n
        else:
            kinds[k] += n
    return kernels, dict(kinds)


def count(fn, args):
    """{gpu event name: count} for one fwd+bwd of fn(*args) (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    y, g = _fwd_bwd(fn, args)
    torch.autograd.grad(y, _leaves(args), g, allow_unused=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        y = _first_tensor(fn(*args))
        torch.autograd.grad(y, _leaves(args), g, allow_unused=True)
        torch.cuda.synchronize()
    return dict(collections.Counter(e["name"] for e in gpu_events(prof.events())))


def gpu_events(events) -> list[dict]:
    """The GPU-side entries (kernels, memsets, memcpys) of a profiler's ``events()``, in start
    order: ``{name, start_us, dur_us}``, times in microseconds as the profiler gives them. A
    ``record_function`` range shown on the GPU timeline (a user annotation, such as torch's
    ``Optimizer.step#...``: CUDA-typed too) is no work of the GPU's and is left out."""
    out = []
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            start, end = e.time_range.start, e.time_range.end
            out.append({"name": e.name, "start_us": float(start), "dur_us": float(end - start)})
    out.sort(key=lambda r: r["start_us"])
    return out


def _cell(counts: dict) -> str:
    kinds = by_kind(counts)[1]
    return f"{sum(counts.values())}" + (f" ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})" if kinds else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON file for the counts")
    ap.add_argument("--op", action="append", help="only this op (repeatable)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_counts: no GPU here, nothing to count")
        return 0
    from gpu_nn import _backend

    ops = bench_overhead._functional_ops("cuda")
    rows = []
    for name, (make, ours, theirs) in ops.items():
        if args.op and name not in args.op:
            continue
        row = {"op": name}
        try:
            row["torch"] = count(theirs, make(True))
        except Exception as exc:  # noqa: BLE001 - a row that fails says why and the rest go on
            row["torch"] = {"error": repr(exc)[:200]}
        for be in ("triton", "cupy"):
            if not _backend.status(be)[0]:
                continue
            try:
                with gpu_nn.backend(be):
                    row[be] = count(ours, make(True))
            except Exception as exc:  # noqa: BLE001
                row[be] = {"error": repr(exc)[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\nGPU events per op fwd+bwd; in brackets torch's fills, reductions, copies, host syncs and other"
          " aten kernels among them (kernel_counts.KINDS)")
    print("\n| op | torch | triton | cupy |\n| --- | --- | --- | --- |")
    for r in rows:
        cells = []
        for k in ("torch", "triton", "cupy"):
            d = r.get(k, {})
            cells.append("error" if "error" in d else _cell(d) if d else "-")
        print(f"| {r['op']} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
