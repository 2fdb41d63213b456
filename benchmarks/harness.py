"""The one benchmark harness.

A :class:`Case` is one shape of one op with a ``setup()`` per provider (``torch``, ``triton``,
``cupy``, ``reference``): ``setup()`` builds inputs (three copies, rotated: a call does not find
the previous call's inputs in the cache, though where three sets fit the H200's 50 MB L2 -- the
small convolutions, the recurrent layers' inputs, and every weight, which is not rotated -- both
sides run from a warm L2 alike, as in a training loop; ``sweep.device_seconds`` flushes L2
before each call, its recurrent groups excepted)
and returns a zero-argument callable that does the timed work. The
harness warms each callable up, times repeated runs (CUDA events on a GPU, ``perf_counter`` on
the CPU), and reports the median; ratios are taken against the baseline provider measured in
the same run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from gpu_nn import _tuning

from .suite import PROVIDERS


@dataclasses.dataclass
class Case:
    family: str
    name: str                      # e.g. "conv2d fwd+bwd"
    shape: str                     # human-readable shape, e.g. "N=8 C=64 32x32 O=64 k3"
    providers: dict                # provider name -> setup() -> callable
    device: str = "cpu"
    flops: float | None = None     # per call, for TFLOP/s
    bytes: float | dict | None = None  # per call, for GB/s; a dict: per provider (sides moving different bytes)
    baseline: str = "torch"
    calls: int = 1                 # op calls per timed callable; figures are per call
    min_reps: int = 0              # timed calls at least, whatever the run's setting


# (warm-up calls, timed calls, seconds after which a provider stops early)
QUICK = (2, 7, 2.0)
FULL = (3, 15, 10.0)


UNSET = object()  # env_var's value that removes the variable for the block


class env_var:
    """Sets an environment variable for the duration of a block (``value`` None: leaves it as it
    is; :data:`UNSET`: removes it, the code's default), restoring its old value, or its absence,
    after it: a provider's switch read at call time (``GPU_NN_RNN_PERSISTENT``, say)."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        if self.value is not None:
            self.old = os.environ.get(self.name)
            if self.value is UNSET:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = self.value
        return self

    def __exit__(self, *exc):
        if self.value is not None:
            if self.old is None:
                os.environ.pop(self.name, None)
            else:
                os.environ[self.name] = self.old
        return False


def interleave(lanes) -> list:
    """The lists of ``lanes`` dealt round-robin (their first items, then their seconds, ...): a
    family's dtypes alternate in its lane of the timed phase, so that a run its limit cuts has
    timed some of each (the dtype a goal names first need not come first in the loops)."""
    lanes = [list(x) for x in lanes]
    return [lane[k] for k in range(max(map(len, lanes), default=0)) for lane in lanes if k < len(lane)]


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
                  min_time: float = 0.0, max_time: float | None = None, min_reps: int = 3,
                  host: list | None = None) -> list[float]:
    """Seconds per call for ``reps`` timed calls after ``warmup`` untimed ones.

    On a GPU each call is bracketed by CUDA events recorded on the current stream after the
    previous call finished: the start event is stamped on an idle stream at once and the kernels
    run only once the host has launched them, so the figure is the call's latency, the host's
    launch included (:func:`run_case` times the device apart); on the CPU by ``perf_counter``. Timing goes on
    until ``reps`` calls and ``min_time`` seconds are done, but stops early (after at least
    ``min_reps`` calls) once ``max_time`` seconds have been spent, so that one slow shape
    cannot blow a ``--quick`` budget.

    ``host`` (a list) receives, per timed call, the host seconds the call took to return, not
    waiting for the device: on a GPU the time to enqueue its work. A call whose host time is
    close to its device time is host-bound (in a loop the GPU waits for the launches); well
    below it, a stream of such calls keeps the GPU busy.
    """
    if reps < 1:
        raise ValueError("reps must be >= 1")
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    t_start = time.perf_counter()
    while True:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            h0 = time.perf_counter()
            fn()
            h1 = time.perf_counter()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            h0 = time.perf_counter()
            fn()
            h1 = time.perf_counter()
            times.append(h1 - h0)
        if host is not None:
            host.append(h1 - h0)
        spent = time.perf_counter() - t_start
        if max_time is not None and spent >= max_time and len(times) >= min(min_reps, reps):
            break
        if len(times) >= reps and spent >= min_time:
            break
    return times


def summarize(times: list[float]) -> dict:
    """Median (the figure every ratio uses), min, max and interquartile range of ``times``."""
    s = sorted(times)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "iqr": q[2] - q[0], "reps": len(s)}


def run_case(case: Case, providers=None, warmup: int = 2, reps: int = 7, max_time: float | None = None,
             exact: bool = False) -> dict:
    """Time every provider of ``case``; returns a result row (seconds are medians).

    On a GPU, ``seconds`` is device time: :func:`time_callable`'s reps (one call between events
    on an idle stream, kept as ``latency_seconds``: the host's launch included) are followed by
    as many calls, each queued behind its own GPU sleep (``gpu_nn._tuning.queued_times``), which
    the events time without the host; ``queued`` says, per provider, whether the host did queue
    them in time (False: a call that synchronises with the device, and ``seconds`` includes host
    time). ``loop_seconds`` / ``loop_ratio``: the larger of host and device time per call, what a
    loop of calls costs, each side alike.

    ``first_call`` holds, per provider, the seconds of its ``setup()`` plus one synchronised
    call: the first use of a shape, kernel compilation included, kept apart from the medians.

    ``providers`` (an iterable of names) restricts our providers to those backends and their
    variants, or with ``exact`` to those names (:func:`timed`); the others are always timed. A
    provider whose ``setup()`` or call raises is recorded under ``errors``.
    """
    row = {
        "family": case.family, "name": case.name, "shape": case.shape, "device": case.device,
        "baseline": case.baseline, "seconds": {}, "stats": {}, "host_seconds": {}, "errors": {}, "first_call": {},
        "flops": case.flops, "bytes": case.bytes,
    }
    t_case = time.perf_counter()
    for name, setup in case.providers.items():
        if not timed(name, providers, exact):
            continue
        try:
            # first use apart from the steady state: setup plus one call, synchronised, is where
            # kernels compile (or load from Triton's on-disk cache in a later process)
            t0 = time.perf_counter()
            fn = setup()
            fn()
            _sync(case.device)
            row["first_call"][name] = time.perf_counter() - t0
            host: list = []
            times = time_callable(fn, case.device, warmup, max(reps, case.min_reps), max_time=max_time, host=host,
                                  min_reps=max(3, case.min_reps))
            host_s = statistics.median(host)
            if case.device.startswith("cuda"):
                # those were latencies: one call on an idle stream, its events stamped while the
                # host was still launching. The figure every ratio uses is the device's time:
                # as many calls queued behind a GPU sleep (gpu_nn._tuning.queued_times)
                row.setdefault("latency_seconds", {})[name] = statistics.median(times) / case.calls
                times, queued = _tuning.queued_times(fn, len(times), host_s)
                row.setdefault("queued", {})[name] = queued
            stats = summarize([t / case.calls for t in times])
            row["seconds"][name] = stats["median"]
            row["stats"][name] = stats
            # the host's share: per call, the median seconds until the call returned (on a GPU
            # without waiting for the device; compare with "seconds" to see a host-bound case)
            row["host_seconds"][name] = host_s / case.calls
        except Exception as exc:  # a provider that cannot run here is reported, not fatal
            row["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            fn = None
            if case.device.startswith("cuda"):
                torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - t_case, 3)  # the whole case, first calls included
    base = row["seconds"].get(case.baseline)
    row["ratio"] = {  # ours / baseline: below 1 is faster than the baseline
        n: s / base for n, s in row["seconds"].items() if base and n != case.baseline
    }
    if row.get("latency_seconds"):
        # a loop of calls runs at the slower of the host and the device: per call, the larger of
        # the two, against torch's the same way (issue 14's "as fast as torch in a loop")
        loop = {n: max(s, row["host_seconds"].get(n, 0.0)) for n, s in row["seconds"].items()}
        row["loop_seconds"] = loop
        lb = loop.get(case.baseline)
        row["loop_ratio"] = {n: s / lb for n, s in loop.items() if lb and n != case.baseline}
    if case.flops:
        row["tflops"] = {n: case.flops / s / 1e12 for n, s in row["seconds"].items()}
    if case.bytes:
        per = case.bytes if isinstance(case.bytes, dict) else dict.fromkeys(row["seconds"], case.bytes)
        row["gbps"] = {n: per[n] / s / 1e9 for n, s in row["seconds"].items() if per.get(n)}
    return row


HOST_BOUND = 0.9  # host seconds at least this share of the device seconds: in a loop the launches set the pace


OUR_BACKENDS = PROVIDERS  # (suite's, the --backend choices)


def is_ours(provider: str) -> bool:
    """A provider of ours: a backend, or a variant of one (``triton-persistent``, ``cupy-mma``);
    not torch's own others (``torch_foreach``, the ``cell_loop`` of torch's cells)."""
    return provider.split("-", 1)[0] in OUR_BACKENDS


def timed(provider: str, providers=None, exact: bool = False) -> bool:
    """Whether a run restricted to ``providers`` (``gpu-nn bench --backend``: backends of ours)
    times ``provider``: every provider that is not ours (torch, its foreach form and cell loop,
    the overhead family's floors) always; one of ours where its backend is named, a variant
    (``triton-persistent``) with its backend or by its own name; with ``exact`` (a bench
    module's ``--provider``) ours only by their own names. The floors were dropped before, so
    that ``--family overhead --backend reference`` judged every case against torch alone."""
    return (not providers or provider in providers or not is_ours(provider)
            or (not exact and provider.split("-", 1)[0] in providers))


def host_bound(rows: list) -> list:
    """Our providers' cases on a GPU whose calls are host-bound: the host took at least
    HOST_BOUND of the device's seconds to return (in a loop the device would wait for the launches), as
    (family, name, shape, provider, host seconds, seconds). The overhead family (tiny inputs,
    host-bound by design) and torch's providers (the baseline, its foreach form, its cell loop)
    are left out. Issue 14 wants none at the bench
    shapes."""
    out = []
    for r in rows:
        if r.get("family") == "overhead" or not str(r.get("device", "")).startswith("cuda"):
            continue
        for n, sec in r.get("seconds", {}).items():
            h = r.get("host_seconds", {}).get(n)
            if is_ours(n) and h is not None and sec > 0 and h >= HOST_BOUND * sec:
                out.append((r["family"], r["name"], r["shape"], n, h, sec))
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Device name, library versions and the date, for the JSON of every run."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        cap = torch.cuda.get_device_capability(0)
        env["compute_capability"] = f"sm_{cap[0]}{cap[1]}"
    for mod in ("numpy", "triton", "cupy", "gpu_nn"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed, or no usable driver for cupy
            pass
    return env


def run_cases(cases: list[Case], providers=None, warmup: int = 2, reps: int = 7, progress: bool = True,
              max_time: float | None = None, on_row=None, exact: bool = False) -> list[dict]:
    """Run every case in order (with a tqdm progress bar unless ``progress`` is False);
    ``on_row(rows)`` after each case (``gpu-nn bench`` writes its JSON so far, so that a run
    cut short by a time limit keeps what it measured)."""
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc="bench", unit="case")
    try:
        for c in cases:
            if bar is not None:
                bar.set_postfix_str(f"{c.family}: {c.name} {c.shape}"[:60])
            rows.append(run_case(c, providers, warmup, reps, max_time=max_time, exact=exact))
            if on_row is not None:
                on_row(rows)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def dump_json(doc, path: str) -> None:
    """``doc`` as JSON at ``path``, atomically: a run killed mid-write (gpu_run.sh's time limits
    cut the bench and the sweep, which rewrite their JSON after every case) leaves the previous
    version, never half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def write_json(rows: list[dict], path: str, **extra) -> None:
    """``{"environment": ..., "results": rows, **extra}`` as JSON at ``path`` (atomically)."""
    dump_json({"environment": environment(), "results": rows, **extra}, path)


def print_table(rows: list[dict], title: str = "gpu-nn bench", console=None) -> None:
    """One line per (case, non-baseline provider): shape, ours, baseline, ratio, TFLOP/s, GB/s."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, caption="ratio = ours / baseline median time (below 1 is faster than the baseline)")
    for col in ("family", "op", "shape", "ours", "ours ms", "baseline ms", "ratio", "TFLOP/s", "GB/s", "1st use s"):
        table.add_column(col, justify="right" if col.endswith(("ms", "ratio", "/s", " s")) else "left")
    for r in rows:
        bname = r["baseline"]
        base = r["seconds"].get(bname)
        others = [n for n in r["seconds"] if n != bname]
        if not others and not r["errors"]:
            table.add_row(r["family"], r["name"], r["shape"], "-", "-", f"{base * 1e3:.3f}" if base else "-", "-", "-", "-", "-")
        for name in others:
            s = r["seconds"][name]
            ratio = r["ratio"].get(name)
            colour = "green" if ratio is not None and ratio <= 1.0 else "yellow"

            def rate(key, fmt):
                if key not in r:
                    return "-"
                mine, theirs = r[key].get(name), r[key].get(bname)
                if mine is None:  # (bytes given per provider, none for this one)
                    return "-"
                return fmt.format(mine) + (f" ({fmt.format(theirs)})" if theirs is not None else "")

            table.add_row(
                r["family"], r["name"], r["shape"], name, f"{s * 1e3:.3f}",
                f"{base * 1e3:.3f} {bname}" if base else f"- {bname}",
                f"[{colour}]{ratio:.2f}x[/{colour}]" if ratio is not None else "-",
                rate("tflops", "{:.2f}"), rate("gbps", "{:.0f}"),
                f"{r['first_call'][name]:.2f}" if name in r.get("first_call", {}) else "-",
            )
        for name, err in r["errors"].items():
            # the message as text: a bracket in it ("[1, 2]") is no rich markup
            table.add_row(r["family"], r["name"], r["shape"], name, "[red]error[/red]", "-", "-", "-",
                          escape(err[:80]), "-")
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that cells do not wrap
            console = Console(width=200)
    console.print(table)


def main_for(cases_fn: Callable[..., list[Case]], argv=None) -> list[dict]:
    """Command-line entry shared by every ``bench_<family>.py``."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--provider", action="append",
                   help="only these providers of ours, by name (triton: not triton-persistent); torch's always")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    warmup, reps, max_time = QUICK if args.quick else FULL
    rows = run_cases(cases_fn(device=device, quick=args.quick), args.provider, warmup=warmup, reps=reps, max_time=max_time,
                     exact=True)
    print_table(rows)
    if args.json:
        write_json(rows, args.json)
    return rows
