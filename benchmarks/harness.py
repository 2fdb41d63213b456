"""The one benchmark harness.

A :class:`Case` is one shape of one op with a ``setup()`` per provider (``torch``, ``triton``,
``cupy``, ``reference``): ``setup()`` builds inputs (several copies, rotated so that a cache does
not flatter a kernel) and returns a zero-argument callable that does the timed work. The
harness warms each callable up, times repeated runs (CUDA events on a GPU, ``perf_counter`` on
the CPU), and reports the median; ratios are taken against the baseline provider measured in
the same run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Case:
    family: str
    name: str                      # e.g. "conv2d fwd+bwd"
    shape: str                     # human-readable shape, e.g. "N=8 C=64 32x32 O=64 k3"
    providers: dict                # provider name -> setup() -> callable
    device: str = "cpu"
    flops: float | None = None     # per call, for TFLOP/s
    bytes: float | None = None     # per call, for GB/s
    baseline: str = "torch"


def rotating(make_inputs: Callable[[], tuple], copies: int = 3) -> Callable[[], tuple]:
    """A function that returns a different one of ``copies`` input sets on each call."""
    sets = [make_inputs() for _ in range(copies)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]

    return nxt


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_callable(fn: Callable[[], object], device: str, warmup: int = 2, reps: int = 7,
                  min_time: float = 0.0) -> list[float]:
    """Seconds per call for ``reps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    if device.startswith("cuda"):
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        t_end = time.perf_counter() + min_time
        while len(times) < reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def run_case(case: Case, providers=None, warmup: int = 2, reps: int = 7) -> dict:
    """Time every provider of ``case``; returns a result row (seconds are medians)."""
    row = {
        "family": case.family, "name": case.name, "shape": case.shape, "device": case.device,
        "baseline": case.baseline, "seconds": {}, "errors": {},
    }
    for name, setup in case.providers.items():
        if providers and name not in providers and name != case.baseline:
            continue
        try:
            fn = setup()
            row["seconds"][name] = statistics.median(time_callable(fn, case.device, warmup, reps))
        except Exception as exc:  # a provider that cannot run here is reported, not fatal
            row["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
    base = row["seconds"].get(case.baseline)
    row["ratio"] = {  # ours / baseline: below 1 is faster than the baseline
        n: s / base for n, s in row["seconds"].items() if base and n != case.baseline
    }
    if case.flops:
        row["tflops"] = {n: case.flops / s / 1e12 for n, s in row["seconds"].items()}
    if case.bytes:
        row["gbps"] = {n: case.bytes / s / 1e9 for n, s in row["seconds"].items()}
    return row


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def run_cases(cases: list[Case], providers=None, warmup: int = 2, reps: int = 7, progress: bool = True) -> list[dict]:
    it = cases
    if progress:
        from tqdm import tqdm

        it = tqdm(cases, desc="bench", unit="case")
    return [run_case(c, providers, warmup, reps) for c in it]


def write_json(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump({"environment": environment(), "results": rows}, f, indent=1)


def print_table(rows: list[dict], title: str = "gpu-nn bench") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("op", "shape", "provider", "median ms", "baseline ms", "ratio", "TFLOP/s", "GB/s"):
        table.add_column(col)
    for r in rows:
        base = r["seconds"].get(r["baseline"])
        for name, s in r["seconds"].items():
            if name == r["baseline"]:
                continue
            table.add_row(
                r["name"], r["shape"], name, f"{s * 1e3:.3f}",
                f"{base * 1e3:.3f}" if base else "-",
                f"{r['ratio'].get(name, float('nan')):.2f}x" if base else "-",
                f"{r.get('tflops', {}).get(name, float('nan')):.2f}" if "tflops" in r else "-",
                f"{r.get('gbps', {}).get(name, float('nan')):.1f}" if "gbps" in r else "-",
            )
        for name, err in r["errors"].items():
            table.add_row(r["name"], r["shape"], name, "error", "-", "-", "-", err[:60])
    Console().print(table)


def main_for(cases_fn: Callable[..., list[Case]], argv=None) -> list[dict]:
    """Command-line entry shared by every ``bench_<family>.py``."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--provider", action="append", help="only these providers (plus the baseline)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run_cases(cases_fn(device=device, quick=args.quick), args.provider, reps=5 if args.quick else 11)
    print_table(rows)
    if args.json:
        write_json(rows, args.json)
    return rows
