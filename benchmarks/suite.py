"""``gpu-nn bench``: every family's benchmark cases, a table, JSON and a PNG of the ratios.

Each family contributes ``gpu_nn.benchmarks.bench_<family>.cases(device, quick)``; a family
whose module is missing (or fails to import, or whose ``cases`` raises) is listed as such in
the table and the JSON rather than silently left out. On a GPU the families time our Triton /
CUDA C kernels against torch (cuDNN, cuBLAS); on a CPU the NumPy reference fallback against
torch's CPU kernels. Ratios are ours / torch median times measured in the same run.
"""

from __future__ import annotations

import importlib
import json
import os
import time

FAMILIES = ("conv", "pool", "dense", "activation", "rnn", "optim", "overhead")
# families run only where named (--family): torch.func workloads (bench_func's docstring)
EXTRA_FAMILIES = ("func",)
# bench.json's timing["gpu"]: how a GPU run's "seconds" were taken (harness.run_case). Runs
# without it bracketed one call on an idle stream: latency, the host's launch included.
GPU_TIMING = "queued"
PROVIDERS = ("reference", "triton", "cupy")


def add_arguments(parser) -> None:
    from ..cli import count as _count

    parser.add_argument("--family", action="append", choices=(*FAMILIES, *EXTRA_FAMILIES, "all"),
                        help="family to run (repeatable); default all (%s run only where named)" % ", ".join(EXTRA_FAMILIES))
    parser.add_argument("--quick", action="store_true",
                        help="small shape sets and few repetitions (about half a minute on a 2-core CPU)")
    parser.add_argument("--out", default="bench-results", help="directory for bench.json and bench.png (default %(default)s)")
    parser.add_argument("--backend", action="append", choices=PROVIDERS,
                        help="only time these backends of ours, each with its variants (triton: triton-persistent too; "
                             "repeatable); torch's providers and the overhead family's floors are always timed")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="CPU runs: 'wall' (default) times wall-clock seconds; 'thread' times the calling "
                             "thread's CPU seconds, the host cost of a call without the waits a loaded, shared "
                             "machine adds (use with --family overhead; torch runs on one thread there)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--warm-jobs", type=_count(0), default=0, metavar="N",
                        help="GPU runs: before timing, N processes make each case's first call in parallel, "
                             "so that kernel compilation (Triton's and CuPy's on-disk caches, shared by every "
                             "process) runs on N cores instead of one; each case's cold first call is kept as "
                             "first_call_cold, its warm one as first_call (default 0: no warm phase)")
    parser.add_argument("--warm-budget-s", type=float, default=None, metavar="S",
                        help="with --warm-jobs: the warm phase starts no case after S seconds and is given "
                             "up S + 30 seconds in (its processes ended), so that a time-limited run still "
                             "reaches its timed phase; the cases it did not reach compile there (default: "
                             "no limit)")


def collect(families, device: str, quick: bool):
    """(cases, status): every family's cases, and per family 'ok (N cases)' or why it has none."""
    cases, status = [], {}
    for fam in families:
        mod_name = f"gpu_nn.benchmarks.bench_{fam}"
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name == mod_name:
                status[fam] = "missing: no benchmarks/bench_%s.py" % fam
            else:
                status[fam] = f"import failed: {type(exc).__name__}: {exc}"
            continue
        except Exception as exc:
            status[fam] = f"import failed: {type(exc).__name__}: {exc}"
            continue
        try:
            got = list(mod.cases(device=device, quick=quick))
        except Exception as exc:
            status[fam] = f"cases() failed: {type(exc).__name__}: {exc}"
            continue
        status[fam] = f"ok ({len(got)} cases)"
        cases.extend(got)
    return cases, status


def plot(rows, path: str, title: str, note: str = "") -> None:
    """Horizontal bars of ours / torch per (op, shape, provider); a line at 1 (parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = []
    for r in rows:
        for prov, ratio in r["ratio"].items():
            items.append((f"{r['family']}: {r['name']} {r['shape']} [{prov}]", ratio, r["family"]))
    fams = sorted({f for _, _, f in items})
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(fams)}
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.28 * len(items) + 1.2)))
    if items:
        ys = range(len(items))
        ax.barh(list(ys), [v for _, v, _ in items], color=[colours[f] for _, _, f in items])
        ax.set_yticks(list(ys), [lab for lab, _, _ in items], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("time ours / time torch (median; < 1 is faster than torch)")
    else:
        ax.text(0.5, 0.5, "no ratios measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, va="bottom", color="firebrick")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _warm_worker(fams, device, quick, indices, cache_path, deadline, record_path):
    """One warm-phase process: the first call of every provider of cases ``indices`` (in the
    order ``collect`` gives), timed, each finished case appended to ``record_path`` as a JSON line
    {"i": index, "got": {provider: seconds}} (:func:`_warm_records`), so that a process ended
    past the phase's grace (a case still compiling) keeps the cases it did finish. Tuned
    launchers measure their candidates here too (so that every candidate compiles), but into a
    throw-away cache and with no record: timings taken beside other busy processes are not
    choices. No case is started after ``deadline`` (time.time()), if given."""
    os.environ.pop("GPU_NN_TUNE_RECORD", None)
    os.environ["GPU_NN_TUNE_CACHE"] = cache_path
    import torch

    if device == "cuda":  # the first calls like for like too: cuDNN searches where ours measures
        tuned_configurations(torch)
    cases, _ = collect(fams, device, quick)
    for i in indices:
        if deadline is not None and time.time() > deadline:
            break
        got = {}
        for name, setup in cases[i].providers.items():
            fn = None
            try:
                t0 = time.perf_counter()
                fn = setup()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                got[name] = time.perf_counter() - t0
            except Exception:  # the timed run reports it
                pass
            finally:
                fn = None
        if device == "cuda":
            torch.cuda.empty_cache()
        with open(record_path, "a") as f:
            f.write(json.dumps({"i": i, "got": got}) + "\n")


def _warm_records(paths) -> dict:
    """{case index: {provider: seconds}} from the warm processes' record files (a line cut short by
    a killed process, or a file never written, is skipped)."""
    out = {}
    for path in paths:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                row = json.loads(line)
                out[int(row["i"])] = {str(k): float(v) for k, v in row["got"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return out


def _dealt(n: int, jobs: int) -> list[list[int]]:
    """Case indices ``0..n-1`` dealt to ``jobs`` processes in rounds, each round in the other
    direction (0, 1, ..., jobs-1, then jobs-1, ..., 0): a family that alternates two kinds of case
    (bench_conv's and bench_rnn's dtypes) gives every process both, where dealing every round
    the same way gave an even number of processes one kind each."""
    shares: list[list[int]] = [[] for _ in range(jobs)]
    for i in range(n):
        r, k = divmod(i, jobs)
        shares[k if r % 2 == 0 else jobs - 1 - k].append(i)
    return shares


def warm(fams, device: str, quick: bool, n_cases: int, jobs: int, budget_s: float | None = None) -> tuple[dict, float]:
    """The parallel warm phase: ({case index: {provider: cold first-call seconds}}, wall seconds).
    Cases are dealt in rounds, each the other way round (:func:`_dealt`), so that each process
    gets a mix of families and of dtypes. With ``budget_s``
    the workers start no case after that many seconds, and a worker still busy 30 s later (a case
    compiling many kernels) is ended: the case it was in stays cold, and the timed run compiles
    it; the cases it finished before count as warm (their record files), as they did not before
    (a late worker's whole share was taken for cold and timed after every warm case)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import tempfile

    t0 = time.perf_counter()
    jobs = max(1, min(jobs, n_cases))
    deadline = None if budget_s is None else time.time() + budget_s
    late = ()
    with tempfile.TemporaryDirectory(prefix="gpu_nn_warm_") as tmp:
        # spawn: a forked child would inherit this process's CUDA context, which CUDA forbids
        ex = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
        try:
            records = [os.path.join(tmp, f"warm-{j}.jsonl") for j in range(jobs)]
            shares = _dealt(n_cases, jobs)
            futs = [ex.submit(_warm_worker, tuple(fams), device, quick, shares[j],
                              os.path.join(tmp, f"tuning-{j}.json"), deadline, records[j]) for j in range(jobs)]
            _, late = cf.wait(futs, timeout=None if budget_s is None else budget_s + 30)
        finally:
            if budget_s is not None and late:
                for proc in list((getattr(ex, "_processes", None) or {}).values()):
                    proc.terminate()
            ex.shutdown(wait=True, cancel_futures=True)
        # every worker's finished cases, a late or dead one's too (the case it was in stays cold:
        # the timed run compiles it)
        cold = _warm_records(records)
    return cold, time.perf_counter() - t0


def warmed_first(cases: list, cold: dict) -> tuple[list, dict]:
    """``(cases, cold)`` with the cases the warm phase reached (``cold``'s keys) first, each
    group dealt round-robin over the families (:func:`_by_family`), and ``cold`` keyed by the new
    positions. A warm phase cut by its
    budget leaves cases whose kernels the timed process would compile itself, seconds each: on
    the H200 at 09f2311 the timed phase met the first such case after 40 of 186 and its step
    ran out; timed after the warmed ones, those cost the ratio table nothing."""
    order = _by_family([i for i in range(len(cases)) if i in cold], cases) \
        + _by_family([i for i in range(len(cases)) if i not in cold], cases)
    return [cases[i] for i in order], {new: cold[old] for new, old in enumerate(order) if old in cold}


def _by_family(idx: list, cases: list) -> list:
    """``idx`` dealt round-robin over the cases' families, each family in its own order: a timed
    phase cut by its limit still times some of every family (at 09f2311 its 40 cases were all
    convolutions, the first family)."""
    from . import harness

    groups: dict = {}
    for i in idx:
        groups.setdefault(getattr(cases[i], "family", None), []).append(i)
    return harness.interleave(groups.values())


def tuned_configurations(torch) -> dict:
    """On a GPU, both sides pick their configurations the same way: where ours measures its
    candidates (gpu_nn._tuning applies: GPU_NN_TUNE not 0), torch's cuDNN measures its algorithms
    too (``torch.backends.cudnn.benchmark``), else both run their heuristics (gpu_run.sh's bench
    step, GPU_NN_TUNE=0). Ours measured against cuDNN's heuristic favoured ours (a benchmark
    audit). Returns what the run used, for bench.json's timing."""
    from gpu_nn import _tuning

    ours = _tuning.applies(torch.device("cuda"))
    if ours:
        torch.backends.cudnn.benchmark = True
    return {"ours_measured_configurations": ours, "torch_cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


class _ThreadClock:
    """Stands in for the harness's ``time`` module: ``perf_counter`` reads this thread's CPU time."""

    perf_counter = staticmethod(time.thread_time)
    sleep = staticmethod(time.sleep)


def run(args) -> int:
    import torch
    from rich.console import Console

    from . import harness

    fams = FAMILIES if not args.family or "all" in args.family else tuple(dict.fromkeys(args.family))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-nn bench: --device cuda but torch sees no CUDA device")
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    clock = getattr(args, "clock", "wall")
    if clock == "thread":
        if device != "cpu":
            raise SystemExit("gpu-nn bench: --clock thread is for CPU runs (GPU runs time with CUDA events)")
    t0 = time.perf_counter()
    cases, status = collect(fams, device, args.quick)
    cold, warm_s = {}, None
    jobs = getattr(args, "warm_jobs", 0) or 0
    if jobs > 0 and device == "cuda" and cases:
        cold, warm_s = warm(fams, device, args.quick, len(cases), jobs, getattr(args, "warm_budget_s", None))
        console.print(f"warm phase: first call of {len(cold)} of {len(cases)} cases in {jobs} processes, "
                      f"{warm_s:.1f} s wall ({sum(sum(v.values()) for v in cold.values()):.1f} s of first calls, "
                      f"kernel compilation included)" + ("; those timed first" if len(cold) < len(cases) else ""))
        cases, cold = warmed_first(cases, cold)
    warmup, reps, max_time = harness.QUICK if args.quick else harness.FULL
    providers = set(args.backend) if args.backend else None
    if providers and cases:
        offered = {n for c in cases for n in c.providers}
        absent = sorted(providers - offered)
        where = ("on a CPU our side is the reference backend; triton and cupy are timed on a CUDA device"
                 if device == "cpu" else "no case of these families offers it here")
        if not providers & offered:  # nothing of ours would be timed: say so rather than print a table of '-'
            raise SystemExit(f"gpu-nn bench: --backend {', '.join(sorted(providers))}: {where}")
        if absent:
            console.print(f"--backend {', '.join(absent)} not timed: {where}", markup=False)
    saved = harness.time
    if clock == "thread":
        harness.time = _ThreadClock()
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench.json")
    timing = {"warmup": warmup, "reps": reps, "max_seconds_per_provider": max_time, "statistic": "median"}
    if device == "cuda":  # what "seconds" means on a GPU (runs before 2026-12-04's second stop: latency)
        timing["gpu"] = GPU_TIMING
        timing.update(tuned_configurations(torch))

    def with_cold(rows_so_far):  # row i is case i: run_cases appends one row per case, in order
        for i, r in enumerate(rows_so_far):
            if i in cold:
                r["first_call_cold"] = cold[i]
        return rows_so_far

    warm_info = {} if warm_s is None else {"warm_phase": {"jobs": jobs, "wall_seconds": round(warm_s, 1)}}

    def partial(rows_so_far):  # a run killed by a time limit (gpu_run.sh) keeps every finished case
        harness.write_json(with_cold(rows_so_far), json_path, families=status, quick=bool(args.quick),
                           run_device=device, timing=timing, clock=clock, partial=True, cases_planned=len(cases),
                           **warm_info)

    try:
        rows = harness.run_cases(cases, providers, warmup=warmup, reps=reps, max_time=max_time,
                                 progress=not args.no_progress, on_row=partial)
    finally:
        harness.time = saved
    env = harness.environment()
    title = f"gpu-nn bench on {env['device'] if device == 'cuda' else 'CPU: ' + env['cpu']}" + (" (--quick)" if args.quick else "")
    harness.print_table(rows, title=title, console=console)
    for fam in fams:
        colour = "green" if status[fam].startswith("ok") else "red"
        console.print(f"  {fam:<10} [{colour}]{status[fam]}[/{colour}]")
    extra = {}
    if "overhead" in fams:
        from . import bench_overhead

        extra["overhead_summary"] = bench_overhead.summary([r for r in rows if r["family"] == "overhead"])
        bench_overhead.print_summary(extra["overhead_summary"], console)
    if device == "cuda":
        hb = harness.host_bound(rows)
        ours = sum(1 for r in rows if r["family"] != "overhead" for n in r["seconds"] if harness.is_ours(n))
        extra["host_bound"] = [list(t) for t in hb]
        console.print(f"host-bound (the call took >= {harness.HOST_BOUND:.0%} of its device time to return): "
                      f"{len(hb)} of {ours} of ours outside the overhead family"
                      + "".join(f"\n  {f}: {nm} {sh} [{p}] host {h * 1e3:.3f} ms of {sec * 1e3:.3f} ms"
                                for f, nm, sh, p, h, sec in hb[:12]), markup=False)  # "[triton]" is not markup
    png_path = os.path.join(args.out, "bench.png")
    harness.write_json(with_cold(rows), json_path, families=status, quick=bool(args.quick), run_device=device,
                       timing=timing, wall_seconds=round(time.perf_counter() - t0, 1), clock=clock,
                       partial=False, cases_planned=len(cases), **warm_info, **extra)
    not_run = [f"{f} ({status[f].split(':')[0]})" for f in fams if not status[f].startswith("ok")]
    plot(rows, png_path, title, note=("not benchmarked: " + ", ".join(not_run)) if not_run else "")
    key = "first_call_cold" if cold else "first_call"  # with a warm phase, the cold calls were its
    first = [(v, r, n) for r in rows for n, v in r.get(key, {}).items() if n != r["baseline"]]
    if first:
        v, r, n = max(first, key=lambda t: t[0])
        console.print(f"first use of each shape (setup + one call, kernel compilation included): "
                      f"{sum(t[0] for t in first):.1f} s in all for ours, apart from the steady-state medians; "
                      f"slowest {v:.2f} s ({r['family']}: {r['name']} {r['shape']} [{n}])", markup=False)
    n_err = sum(len(r["errors"]) for r in rows)
    console.print(f"{len(rows)} cases, {n_err} provider errors, {time.perf_counter() - t0:.0f} s; "
                  f"wrote {json_path} and {png_path}")
    return 0


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="gpu-nn bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
