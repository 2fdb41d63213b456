"""``gpu-nn results``: keep every GPU run's figures in the repository and show them in README.

``gpu-nn results record RUN_DIR`` takes the folder that ``benchmarks/gpu_run.sh`` wrote (its
``machine.txt``, ``summary.txt``, ``check.json``, ``bench/bench.json`` and the pytest log) and
stores what it measured under ``benchmarks/results/<date>_<gpu>_<commit>/``: ``run.json`` (GPU,
versions, commit, date, one line per step, the check and test summaries) plus the benchmark and
check JSON as they came, and ``tuning.jsonl``: the time of every candidate configuration of every
tuned launcher at every benchmark shape (``GPU_NN_TUNE_RECORD`` rows, see gpu_nn._tuning), the
data from which CPU-only sessions fit tuning heuristics. ``gpu-nn results render`` rewrites the README's results section (the
latest run's ratio table, with its date, GPU, versions and commit) and ``history.png`` (the
geometric-mean ratio per family across every recorded run), from the recorded runs only: a
figure that no run recorded cannot reach the README.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import os
import re
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
START = "<!-- gpu-results:start (written by `gpu-nn results render`; do not edit by hand) -->"
END = "<!-- gpu-results:end -->"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("record", help="store a gpu_run.sh output folder under benchmarks/results/")
    rec.add_argument("run_dir", help="the OUTDIR that benchmarks/gpu_run.sh wrote (unpacked)")
    rec.add_argument("--into", default=RESULTS_DIR, help="results folder (default: the repository's)")
    rec.add_argument("--no-render", action="store_true", help="do not rewrite README and history.png")
    rec.add_argument("--tests", default=None, metavar="DIR",
                     help="the OUTDIR of a tests-only gpu_run.sh call of the same commit (GPU_RUN_STEPS=pytest, "
                          "the session's second call): its test summary and failures join the run's record")
    ren = sub.add_parser("render", help="rewrite README's results section and history.png from the recorded runs")
    ren.add_argument("--dir", default=RESULTS_DIR, help="results folder (default: the repository's)")
    ren.add_argument("--readme", default=None,
                     help="README to rewrite (default: the repository's README when --dir is the repository's "
                          "results folder; for another folder none unless given: history.png only)")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "unknown"


def pytest_summary(log: str) -> str:
    """pytest's closing line ('N passed, M failed in T s'), or '' when the run was cut short."""
    lines = [ln.strip("= ").strip() for ln in log.splitlines()]
    for ln in reversed(lines):
        if re.search(r"\d+ (passed|failed|error)", ln) and (" in " in ln or ln.endswith("s")):
            return ln
    return ""


def failures(log: str) -> list[str]:
    """The ``FAILED ...`` / ``ERROR ...`` lines of pytest's -rfE summary."""
    return [ln.strip() for ln in log.splitlines() if ln.startswith(("FAILED ", "ERROR "))]


def tuning_summary(path: str) -> dict | None:
    """How many timings a GPU_NN_TUNE_RECORD file holds, for how many (op, key) problems, per op;
    None where the run recorded none."""
    rows = []
    for line in _read(path).splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a killed process
            continue
        if isinstance(row, dict) and "op" in row:
            rows.append(row)
    if not rows:
        return None
    problems = {(r["op"], json.dumps(r.get("key"))) for r in rows}
    ops: dict = {}
    for op, _ in problems:
        ops[op] = ops.get(op, 0) + 1
    return {"rows": len(rows), "problems": len(problems), "failed": sum(r.get("ms") is None for r in rows),
            "per_op": dict(sorted(ops.items()))}


def summarize_run(run_dir: str) -> dict:
    """Everything ``record`` keeps about one gpu_run.sh folder, as one dict."""
    machine = _read(os.path.join(run_dir, "machine.txt"))
    meta = _machine_meta(machine)
    bench = _load_json(os.path.join(run_dir, "bench", "bench.json")) or {}
    env = bench.get("environment", {})
    check = _load_json(os.path.join(run_dir, "check.json"))
    steps = [ln for ln in _read(os.path.join(run_dir, "summary.txt")).splitlines() if ln.strip()]
    test_log = _read(os.path.join(run_dir, "pytest.log"))
    packages = dict(re.findall(r"^  ([A-Za-z0-9_.-]+)==(\S+)$", machine, flags=re.M))
    gpu = env.get("device") or _machine_gpu(machine) or "unknown GPU"
    run = {
        "date": meta.get("date") or env.get("date") or datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "commit": meta.get("commit", "unknown"),
        "gpu": gpu.strip(),
        "versions": {k: env[k] for k in ("python", "torch", "cuda", "triton", "cupy", "numpy", "gpu_nn") if k in env}
                    or machine_versions(machine, packages),
        # the image's whole `pip list` (steps.sh's machine_info): setuptools decides which
        # pyproject.toml forms install there without a download
        "packages": packages,
        "steps": steps,
        "check": None,
        "tests": {"summary": pytest_summary(test_log), "failures": failures(test_log)},
        "bench_cases": len(bench.get("results", [])),
        # a bench step cut by its time limit leaves the cases it finished (bench.json "partial")
        "bench_partial": bool(bench.get("partial", False)),
        "bench_cases_planned": bench.get("cases_planned"),
        "tuning": tuning_summary(os.path.join(run_dir, "tuning.jsonl")),
    }
    if isinstance(check, list):
        if not all(isinstance(r, dict) for r in check):
            raise SystemExit(f"gpu-nn results: {os.path.join(run_dir, 'check.json')} is not a gpu-nn check --json "
                             "table (a list of rows)")
        bad = [r for r in check if not r.get("ok")]
        run["check"] = {"rows": len(check), "failed": len(bad),
                        "failures": [f"{r.get('op', '?')} {r.get('backend', '?')} {r.get('dtype', '?')}: "
                                     f"{r.get('error') or r.get('max_rel_err')}" for r in bad][:50]}
    return run


def _machine_meta(machine: str) -> dict:
    """The date, host and commit lines of a machine.txt (steps.sh's machine_info)."""
    return dict(re.findall(r"^(date|host|commit): (.+)$", machine, flags=re.M))


def _machine_gpu(machine: str) -> str | None:
    """The GPU nvidia-smi names in a machine.txt (None where it names none)."""
    m = re.search(r"NVIDIA [A-Z]\w+[^|]*?(?=\s{2,}|\|)", machine)
    return m[0].strip() if m else None


def _join_tests(run: dict, run_dir: str, tests_dir: str) -> None:
    """A tests-only call's results into ``run`` (see :func:`record`). Refused where the run ran
    its own tests (its summary has no "pytest: not run": they would be replaced), where either
    names no commit or they differ (the tests of another tree), and where the two machines'
    GPUs differ (a second call on another machine)."""
    if not any(ln.startswith("pytest: not run") for ln in run["steps"]):
        raise SystemExit("gpu-nn results: the run ran its own tests (no 'pytest: not run' in its summary): "
                         "--tests joins a tests-only call to a run that left them out")
    machine = _read(os.path.join(tests_dir, "machine.txt"))
    commit = _machine_meta(machine).get("commit", "unknown")
    if "unknown" in (commit, run["commit"]) or commit != run["commit"]:
        raise SystemExit(f"gpu-nn results: {tests_dir} ran commit {commit}, the run {run['commit']}: "
                         "a tests-only call joins the record of its own, named commit only")
    gpu, ran_on = _machine_gpu(machine), _machine_gpu(_read(os.path.join(run_dir, "machine.txt")))
    if gpu and ran_on and gpu != ran_on:  # (each as nvidia-smi names it)
        raise SystemExit(f"gpu-nn results: {tests_dir} ran on a {gpu}, the run on a {ran_on}")
    log = _read(os.path.join(tests_dir, "pytest.log"))
    run["tests"] = {"summary": pytest_summary(log), "failures": failures(log), "from": "a second call"}
    theirs = [ln for ln in _read(os.path.join(tests_dir, "summary.txt")).splitlines() if ln.startswith(("pytest:", "  pytest:"))]
    steps = []
    for ln in run["steps"]:  # the tests' lines where the run says it left them out
        steps.extend(theirs if ln.startswith("pytest: not run") else (ln,))
    run["steps"] = steps


def machine_versions(machine: str, pkgs: dict) -> dict:
    """The versions a run's bench.json would name, from its machine.txt (``pkgs``: its package
    list; python and CUDA from the text), for a run whose bench step left no bench.json."""
    out = {k: pkgs[k] for k in ("torch", "triton", "numpy") if k in pkgs}
    cupy = next((v for k, v in pkgs.items() if k.startswith("cupy-cuda")), None)
    if cupy:
        out["cupy"] = cupy
    for key, pattern in (("python", r"python packages \(Python (\S+)\)"), ("cuda", r"CUDA Version: (\S+)")):
        m = re.search(pattern, machine)
        if m:
            out[key] = m.group(1)
    return out


def run_name(run: dict) -> str:
    day = run["date"][:10]
    return f"{day}_{_slug(run['gpu'])}_{run['commit'][:7]}"


def record(run_dir: str, into: str = RESULTS_DIR, tests_dir: str | None = None) -> str:
    """Store one gpu_run.sh folder; returns the new results folder. ``tests_dir``: a tests-only
    call's folder of the same commit (a session's second call, GPU_RUN_STEPS=pytest), whose test
    summary, failures and pytest step lines join the record (its own steps say "pytest: not run")."""
    if not os.path.isdir(run_dir):
        raise SystemExit(f"gpu-nn results: no folder {run_dir}")
    if tests_dir is not None and not os.path.isfile(os.path.join(tests_dir, "pytest.log")):
        raise SystemExit(f"gpu-nn results: {tests_dir} holds no pytest.log (the tests-only call's OUTDIR, unpacked)")
    for part in (os.path.join("bench", "bench.json"), "check.json"):
        path = os.path.join(run_dir, part)
        if os.path.exists(path) and _load_json(path) is None:
            raise SystemExit(f"gpu-nn results: {path} is not readable JSON (a step cut off while writing it?)")
    run = summarize_run(run_dir)
    device = (_load_json(os.path.join(run_dir, "bench", "bench.json")) or {}).get("run_device")
    if device is not None and not str(device).startswith("cuda"):
        # (it would be listed, as a "cpu" run, among the README's results on a GPU; a CLI audit)
        raise SystemExit(f"gpu-nn results: {run_dir}'s bench.json ran on {device}: benchmarks/results/ records GPU "
                         "runs (CPU figures live in benchmarks/results/cpu/)")
    if not run["bench_cases"] and run["check"] is None:
        raise SystemExit(f"gpu-nn results: {run_dir} has neither bench/bench.json nor check.json: nothing to record")
    if tests_dir is not None:
        _join_tests(run, run_dir, tests_dir)
    dest = os.path.join(into, run_name(run))
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "run.json"), "w") as f:
        json.dump(run, f, indent=1)
    for src, name in ((os.path.join(run_dir, "bench", "bench.json"), "bench.json"),
                      (os.path.join(run_dir, "check.json"), "check.json"),
                      (os.path.join(run_dir, "tuning.jsonl"), "tuning.jsonl"),
                      (os.path.join(run_dir, "triton_cache.json"), "triton_cache.json")):
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dest, name))
    return dest


def load_runs(results_dir: str = RESULTS_DIR) -> list[dict]:
    """Every recorded run, oldest first, with its benchmark rows under ``bench``."""
    runs = []
    if not os.path.isdir(results_dir):
        return runs
    for name in sorted(os.listdir(results_dir)):
        path = os.path.join(results_dir, name, "run.json")
        run = _load_json(path)
        if not isinstance(run, dict):
            if os.path.exists(path):
                raise SystemExit(f"gpu-nn results: {path} is not readable JSON")
            continue
        missing = [k for k in ("date", "commit", "gpu") if not isinstance(run.get(k), str)]
        if missing:
            raise SystemExit(f"gpu-nn results: {path} is not a run record (no {', '.join(missing)}); "
                             "gpu-nn results record writes them")
        bench = _load_json(os.path.join(results_dir, name, "bench.json")) or {}
        run["name"] = name
        run["bench"] = bench.get("results", [])
        # what a GPU run's seconds are (benchmarks/suite.py GPU_TIMING): "queued" is the device's
        # time; a run that does not say bracketed one call on an idle stream (host launch included)
        run["gpu_timing"] = (bench.get("timing") or {}).get("gpu", "latency")
        run["summary_md"] = os.path.isfile(os.path.join(results_dir, name, "SUMMARY.md"))
        runs.append(run)
    runs.sort(key=lambda r: (r["date"], r["name"]))
    return runs


def family_geomeans(rows: list[dict]) -> dict:
    """Geometric mean of ours / torch per (family, provider) over a run's cases."""
    acc: dict = {}
    for r in rows:
        for prov, ratio in (r.get("ratio") or {}).items():
            if ratio and ratio > 0 and math.isfinite(ratio):
                acc.setdefault((r["family"], prov), []).append(math.log(ratio))
    return {k: math.exp(sum(v) / len(v)) for k, v in acc.items()}


def other_records(results_dir: str = RESULTS_DIR) -> list[str]:
    """Folders of ``results_dir`` holding a GPU record without a full run (a tests-only run's
    SUMMARY.md), as "`path`: its title", oldest first: the README names them beside the table."""
    out = []
    if not os.path.isdir(results_dir):
        return out
    for name in sorted(os.listdir(results_dir)):
        folder = os.path.join(results_dir, name)
        summary = os.path.join(folder, "SUMMARY.md")
        if os.path.isfile(summary) and not os.path.isfile(os.path.join(folder, "run.json")):
            title = next((ln.lstrip("# ").strip() for ln in _read(summary).splitlines() if ln.strip()), name)
            out.append(f"`benchmarks/results/{name}/SUMMARY.md`: {title}")
    return out


TIMING_WORDS = {
    "queued": "*queued* timing is the device's time per call (calls queued behind a GPU sleep, each between its "
              "own CUDA events), both sides alike",
    "latency": "*latency* timing brackets one call on an idle GPU, so the host's launch counts too: our host "
               "path was slower than torch's there, and those ratios overstate the kernels' time",
}
HISTORY_IMAGE = "![ratios across recorded runs](benchmarks/results/history.png)"


def markdown(runs: list[dict], others: list[str] = ()) -> str:
    """The README section: latest run's table (or a plain statement that none is recorded), and
    the recorded runs that are not full runs (``others``)."""
    if not runs:
        return ("No GPU run has been recorded yet: `benchmarks/gpu_run.sh` on a GPU machine, then "
                "`gpu-nn results record OUTDIR`, puts its figures here.")
    last = runs[-1]
    v = last.get("versions", {})
    head = (f"Latest recorded GPU run: **{last['gpu']}**, {last['date'][:10]}, commit `{last['commit'][:7]}`; "
            + ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "triton", "cupy", "python") if k in v)
            + f". {len(runs)} run{'s' if len(runs) != 1 else ''} recorded in `benchmarks/results/`.")
    lines = [head, ""]
    chk, tests = last.get("check"), last.get("tests", {})
    if chk:
        lines.append(f"`gpu-nn check`: {chk['rows'] - chk['failed']} of {chk['rows']} rows pass.  ")
    if tests.get("summary"):
        lines.append(f"Test suite: {tests['summary']}.  ")
    elif last.get("steps") and any(ln.startswith("pytest: rc=") for ln in last["steps"]):
        # (a call that left the tests to another one says "pytest: not run": nothing to say here)
        shown = tests.get("failures", [])
        lines.append("Test suite: cut by its time limit before its summary" + (f" ({len(shown)} failures named)" if shown else "")
                     + (f"; see `benchmarks/results/{last['name']}/SUMMARY.md`" if last.get("summary_md") else "") + ".  ")
    for o in others:
        lines.append(f"Also recorded: {o}.  ")
    # the ratio table: each case's latest measurement (a run whose bench step was cut, or left no
    # bench.json, keeps the cases it did not reach from the runs before it, each row naming its run)
    tables = [r for r in runs if r.get("bench")]
    if not tables:
        return "\n".join([*lines, "", "No recorded run has a bench table yet.", "", HISTORY_IMAGE])
    table = tables[-1]
    if table is not last:
        lines.append(f"The latest run's bench step left no table: the table below is the run of "
                     f"{table['date'][:10]}, commit `{table['commit'][:7]}`"
                     + (f", on the {table.get('gpu')}" if table.get("gpu") != last.get("gpu") else "") + ".  ")
    # ratios of one GPU only: an H100 (about 3.0 TB/s copied, the device tool's default draw) and
    # an H200 (about 4.3) give torch and ours other times, so a case is never filled in from another
    # GPU's run
    others_gpu = collections.Counter(r.get("gpu") for r in tables if r.get("gpu") != table.get("gpu"))
    if others_gpu:
        lines.append(f"The table below holds runs on the {table.get('gpu')} only; bench tables of "
                     + ", ".join(f"{k} ({n} run{'s' if n != 1 else ''})" for k, n in sorted(others_gpu.items()))
                     + " are in `benchmarks/results/`.  ")
    tables = [r for r in tables if r.get("gpu") == table.get("gpu")]
    merged, seen, used = [], set(), []
    for run in reversed(tables):
        n = 0
        for row in run["bench"]:
            k = (row.get("family"), row.get("name"), row.get("shape"))
            if k in seen:
                continue
            seen.add(k)
            merged.append((run, row))
            n += 1
        if n:
            used.append((run, n))
    multi = len(used) > 1
    # a GPU bench times its cases round-robin over the families (suite._by_family): the table
    # groups them again, in the order the families first appear
    first = {}
    for _, row in merged:
        first.setdefault(row.get("family"), len(first))
    merged.sort(key=lambda m: first[m[1].get("family")])
    if table.get("bench_partial"):
        planned = table.get("bench_cases_planned")
        n_cut = table.get("bench_cases", len(table["bench"]))
        if multi:
            lines.append(f"The bench step of `{table['commit'][:7]}` was cut by its time limit after {n_cut}"
                         + (f" of {planned}" if planned else "") + " planned cases.  ")
        else:
            lines.append(f"The bench step was cut by its time limit: {n_cut}"
                         + (f" of {planned}" if planned else "") + " planned cases are in the table below.  ")
    if multi:
        # a run that recorded tuning timings timed measured configurations; one without, the
        # heuristic's (gpu_run.sh's bench step since 2a1b77e): their ratios are not the same thing
        def how(r):
            return ("measured configurations" if (r.get("tuning") or {}).get("rows") else "heuristic configurations") \
                + f", {r.get('gpu_timing', 'latency')} timing"
        lines.append("Each case's latest measurement: " + "; ".join(
            f"{n} from commit `{r['commit'][:7]}` ({r['date'][:10]}, {how(r)})" for r, n in used) + ".  ")
    methods = {r.get("gpu_timing", "latency") for r, _ in used}
    lines.append("Timing: " + "; ".join(TIMING_WORDS.get(m, m) for m in sorted(methods, reverse=True)) + ".  ")
    loop = any(r.get("loop_ratio") for _, r in merged)
    lines += ["", "Time ours / torch (median, same process; below 1 is faster than torch)"
              + (": *loop* is the same ratio of what a call costs in a loop, the larger of its host and device "
                 "times per call, each side alike" if loop else "") + ":", "",
              "| family | case | shape | provider | ratio |" + (" loop |" if loop else "") + (" run |" if multi else ""),
              "| --- | --- | --- | --- | ---: |" + (" ---: |" if loop else "") + (" --- |" if multi else "")]
    unqueued = False
    for run, r in merged:
        tail = f" `{run['commit'][:7]}` |" if multi else ""
        queued = r.get("queued") or {}
        for prov, ratio in sorted((r.get("ratio") or {}).items()):
            lr = (r.get("loop_ratio") or {}).get(prov)
            mid = (f" {lr:.2f}x |" if lr else " - |") if loop else ""
            # a side not queued behind the GPU sleep: its seconds hold host time, the other's not
            mark = " †" if False in (queued.get(prov), queued.get(r.get("baseline", "torch"))) else ""
            unqueued = unqueued or bool(mark)
            lines.append(f"| {r['family']} | {r['name']} | {r['shape']} | {prov} | {ratio:.2f}x{mark} |{mid}{tail}")
        for prov, err in sorted((r.get("errors") or {}).items()):
            lines.append(f"| {r['family']} | {r['name']} | {r['shape']} | {prov} | error: {err[:60]} |"
                         + (" - |" if loop else "") + tail)
    if unqueued:
        lines += ["", "† one side's calls could not be queued behind the GPU sleep (a call that reads the device "
                  "back, or more launches than the driver's queue holds): its time includes the host's, the "
                  "other side's is the device's alone; the ratio is not like for like."]
    lines += ["", HISTORY_IMAGE]
    return "\n".join(lines)


def plot_history(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    series: dict = {}
    for i, run in enumerate(runs):
        for key, g in family_geomeans(run["bench"]).items():
            series.setdefault(key, []).append((i, g))
    for (fam, prov), pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{fam} [{prov}]")
    if series:
        ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(runs)), [f"{r['date'][:10]}\n{r['commit'][:7]}" for r in runs], fontsize=7)
    ax.set_ylabel("geomean time ours / torch")
    ax.set_title("gpu-nn on the GPU: ratio to torch per family across recorded runs", fontsize=10)
    if series:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no GPU run recorded yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(results_dir: str = RESULTS_DIR, readme: str | None = None) -> None:
    if not os.path.isdir(results_dir):
        # a mistyped --dir would otherwise render "no runs" over the README's table (a user audit)
        raise SystemExit(f"gpu-nn results: no folder {results_dir} (recorded runs live in {RESULTS_DIR})")
    runs = load_runs(results_dir)
    if not runs and not other_records(results_dir):
        raise SystemExit(f"gpu-nn results: {results_dir} holds no recorded run (gpu-nn results record OUTDIR adds one)")
    plot_history(runs, os.path.join(results_dir, "history.png"))
    if readme:
        text = _read(readme)
        if START not in text or END not in text:
            raise SystemExit(f"gpu-nn results: {readme} has no results markers ({START} ... {END})")
        pre, rest = text.split(START, 1)
        _, post = rest.split(END, 1)
        with open(readme, "w") as f:
            f.write(pre + START + "\n" + markdown(runs, other_records(results_dir)) + "\n" + END + post)


def run(args) -> int:
    if args.action == "record":
        dest = record(args.run_dir, args.into, args.tests)
        print(f"recorded {args.run_dir} as {dest}")
        if not args.no_render:
            render(args.into, os.path.join(os.path.dirname(HERE), "README.md") if args.into == RESULTS_DIR else None)
        return 0
    readme = args.readme
    if readme is None and os.path.realpath(args.dir) == os.path.realpath(RESULTS_DIR):
        readme = os.path.join(os.path.dirname(HERE), "README.md")
    # (another folder leaves the repository's README alone unless --readme names it, as record
    # --into does: its runs would stand in README as the repository's; a CLI audit)
    render(args.dir, readme)
    what = f"{readme} and " if readme else ""
    print(f"rendered {what}{os.path.join(args.dir, 'history.png')} from {len(load_runs(args.dir))} runs")
    return 0
