"""The benchmark harness and ``gpu-nn bench``, on tiny fake cases (seconds, not minutes)."""

import json
import os
import statistics
import time

import pytest
import torch

from gpu_nn.benchmarks import harness, suite
from gpu_nn.cli import main

# Where the GPU benchmark lists' providers run in the tests that call them: tiny tensors on the GPU
# where there is one, else on the CPU (Triton under the interpreter, which conftest sets only there)
TINY_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class FakeClock:
    """Stands in for the harness's ``time`` module: calls advance it by exact amounts, so
    statistics are checked on known durations, whatever the machine's load."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(harness, "time", fake)
    return fake


def _sleeper(durations, clock=time):
    """setup() whose calls take the next of ``durations`` (cycled) on ``clock``."""
    def setup():
        it = iter(durations * 100)
        return lambda: clock.sleep(next(it))
    return setup


def test_time_callable_warms_up_then_times_reps():
    calls = []
    times = harness.time_callable(lambda: calls.append(1), "cpu", warmup=3, reps=5)
    assert len(calls) == 8 and len(times) == 5 and all(t >= 0 for t in times)


def test_time_callable_stops_early_past_max_time():
    times = harness.time_callable(lambda: time.sleep(0.02), "cpu", warmup=0, reps=50, max_time=0.05, min_reps=3)
    assert 3 <= len(times) < 10


def test_backend_restriction_keeps_every_provider_that_is_not_ours(clock):
    # `gpu-nn bench --backend reference`: our other backends are left out; torch, its other forms
    # and the overhead family's floors stay (the floors were dropped, so every overhead case was
    # judged against torch alone); a variant of ours goes with its backend
    names = ("torch", "torch_foreach", "floor-custom-op", "floor-function", "reference", "triton",
             "triton-persistent", "cupy")
    case = harness.Case("fake", "op", "n=1", {n: _sleeper([0.001], clock) for n in names})
    row = harness.run_case(case, {"reference"}, warmup=0, reps=2)
    assert set(row["seconds"]) == {"torch", "torch_foreach", "floor-custom-op", "floor-function", "reference"}
    row = harness.run_case(case, {"triton"}, warmup=0, reps=2)
    assert set(row["seconds"]) == {"torch", "torch_foreach", "floor-custom-op", "floor-function", "triton",
                                   "triton-persistent"}
    assert set(harness.run_case(case, None, warmup=0, reps=2)["seconds"]) == set(names)
    # a variant named alone: it, not its backend's other forms
    row = harness.run_case(case, {"triton-persistent"}, warmup=0, reps=2)
    assert set(row["seconds"]) == {"torch", "torch_foreach", "floor-custom-op", "floor-function", "triton-persistent"}
    # by name only (a bench module's --provider): triton without its variants
    row = harness.run_case(case, {"triton"}, warmup=0, reps=2, exact=True)
    assert set(row["seconds"]) == {"torch", "torch_foreach", "floor-custom-op", "floor-function", "triton"}


def test_median_is_robust_to_an_outlier_and_ratio_is_against_the_baseline(clock):
    # ours: 2 ms typically with one 60 ms outlier; torch: 4 ms. Median ratio 0.5, not the mean's.
    ours = [0.002, 0.002, 0.06, 0.002, 0.002]
    case = harness.Case("fake", "op", "n=1", {"torch": _sleeper([0.004], clock), "reference": _sleeper(ours, clock)},
                        flops=4e6, bytes=8e6)
    row = harness.run_case(case, warmup=0, reps=5)
    assert row["stats"]["reference"]["reps"] == 5
    assert row["seconds"]["reference"] == pytest.approx(0.002)
    assert row["seconds"]["reference"] < statistics.mean(ours)
    assert row["stats"]["reference"]["max"] == pytest.approx(0.06)
    assert row["ratio"]["reference"] == pytest.approx(row["seconds"]["reference"] / row["seconds"]["torch"])
    assert row["ratio"]["reference"] == pytest.approx(0.5)
    assert row["tflops"]["torch"] == pytest.approx(4e6 / row["seconds"]["torch"] / 1e12)
    assert row["gbps"]["reference"] == pytest.approx(8e6 / row["seconds"]["reference"] / 1e9)
    # bytes per provider where the sides move different amounts (a GB/s each from its own)
    case.bytes = {"torch": 4e6, "reference": 8e6}
    row = harness.run_case(case, warmup=0, reps=5)
    assert row["gbps"]["torch"] == pytest.approx(4e6 / row["seconds"]["torch"] / 1e9)
    assert row["gbps"]["reference"] == pytest.approx(8e6 / row["seconds"]["reference"] / 1e9)
    # the host's share per call: on a CPU the whole call (on a GPU the enqueue, apart from the events)
    assert row["host_seconds"]["reference"] == pytest.approx(0.002)
    assert row["host_seconds"]["torch"] == pytest.approx(0.004)


def test_host_bound_lists_our_gpu_cases_whose_host_time_nears_the_event_time():
    def row(fam, dev, secs, host):
        return {"family": fam, "name": "op", "shape": "s", "device": dev, "baseline": "torch",
                "seconds": secs, "host_seconds": host}

    rows = [row("activation", "cuda", {"torch": 1.0, "triton": 1.0, "cupy": 1.0}, {"torch": 0.95, "triton": 0.95, "cupy": 0.5}),
            row("overhead", "cuda", {"torch": 1.0, "triton": 1.0}, {"torch": 1.0, "triton": 1.0}),
            row("activation", "cpu", {"torch": 1.0, "reference": 1.0}, {"torch": 1.0, "reference": 1.0}),
            row("pool", "cuda", {"torch": 1.0, "triton": 2.0}, {"torch": 0.1, "triton": 1.8}),
            # torch's other providers are not ours: its foreach form, its cell loop; our variants are
            row("rnn", "cuda", {"torch": 1.0, "cell_loop": 1.0, "torch_foreach": 1.0, "triton-persistent": 1.0},
                {"torch": 0.1, "cell_loop": 1.0, "torch_foreach": 1.0, "triton-persistent": 1.0})]
    got = harness.host_bound(rows)
    assert [(f, p) for f, _, _, p, _, _ in got] == [("activation", "triton"), ("pool", "triton"),
                                                    ("rnn", "triton-persistent")]


def test_gpu_rows_time_the_device_apart_from_the_latency(monkeypatch):
    """On a GPU a row's seconds are the device's (the calls queued behind a GPU sleep), the
    one-call-on-an-idle-stream figure is kept as latency_seconds: a provider whose host launch
    (3 ms) outlasts its kernel (1 ms) is not charged for it in the ratio, and is host-bound.
    A provider that synchronises with the device is said to be not queued."""
    from helpers import FakeDevice

    dev = FakeDevice().install(monkeypatch, harness)
    case = harness.Case("fake", "op", "n=1", {"torch": lambda: dev.call(0.5e-3, 1e-3),
                                             "triton": lambda: dev.call(3e-3, 1e-3),
                                             "cupy": lambda: dev.call(0.5e-3, 2e-3, sync=True)}, device="cuda")
    row = harness.run_case(case, warmup=1, reps=5)
    assert row["latency_seconds"] == pytest.approx({"torch": 1.5e-3, "triton": 4e-3, "cupy": 2.5e-3})
    assert row["seconds"]["torch"] == pytest.approx(1e-3) and row["seconds"]["triton"] == pytest.approx(1e-3)
    assert row["ratio"]["triton"] == pytest.approx(1.0) and row["host_seconds"]["triton"] == pytest.approx(3e-3)
    assert row["queued"] == {"torch": True, "triton": True, "cupy": False}
    # both set a loop's pace: triton's launch outlasts its kernel, cupy's call waits for its own
    assert [p for *_, p, _, _ in harness.host_bound([row])] == ["triton", "cupy"]
    # in a loop a call costs the larger of its host and device times: triton's 3 ms launch
    assert row["loop_seconds"]["triton"] == pytest.approx(3e-3) and row["loop_ratio"]["triton"] == pytest.approx(3.0)


def test_time_callable_reports_host_seconds_per_call():
    host = []
    times = harness.time_callable(lambda: time.sleep(0.003), "cpu", warmup=1, reps=4, host=host)
    assert len(host) == len(times) == 4 and all(h >= 0.003 for h in host)


def test_rotating_cycles_through_distinct_copies():
    made = []

    def make():
        made.append(object())
        return (made[-1],)

    nxt = harness.rotating(make, copies=3)
    got = [nxt()[0] for _ in range(6)]
    assert len(made) == 3
    assert len({id(g) for g in got[:3]}) == 3 and got[:3] == got[3:]


def test_provider_errors_are_reported_and_filtering_keeps_the_baseline():
    def broken():
        raise RuntimeError("no such device")

    case = harness.Case("fake", "op", "n=1", {"torch": _sleeper([0.0]), "cupy": broken, "reference": _sleeper([0.0])})
    row = harness.run_case(case, warmup=0, reps=2)
    assert "no such device" in row["errors"]["cupy"] and "cupy" not in row["ratio"]
    row = harness.run_case(case, providers={"reference"}, warmup=0, reps=2)
    assert set(row["seconds"]) == {"torch", "reference"} and not row["errors"]


def test_missing_family_is_reported_not_hidden():
    cases, status = suite.collect(["activation", "nosuchfamily"], "cpu", quick=True)
    assert status["activation"].startswith("ok") and cases
    assert status["nosuchfamily"].startswith("missing")


def test_bench_command_writes_json_and_png(tmp_path, monkeypatch, capsys):
    from gpu_nn.benchmarks import bench_activation

    monkeypatch.setattr(bench_activation, "CPU_SHAPES", [(3, 5, 17)])  # the command's path, tiny shapes
    out = tmp_path / "out"
    rc = main(["bench", "--family", "activation", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["environment"]["device"] and data["environment"]["torch"] and data["environment"]["date"]
    assert data["families"] == {"activation": "ok (6 cases)"}
    rows = data["results"]
    assert len(rows) == 6 and {r["name"] for r in rows} >= {"relu fwd", "tanh fwd+bwd"}
    for r in rows:
        assert set(r["seconds"]) == {"torch", "reference"} and r["ratio"]["reference"] > 0, r
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "sigmoid fwd+bwd" in text and "3x5x17 float32" in text


def test_bench_cut_short_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    """gpu_run.sh kills the bench step at its time limit: bench.json must already hold every case
    finished before that, marked partial; a complete run says partial false."""
    from gpu_nn.benchmarks import bench_activation

    monkeypatch.setattr(bench_activation, "CPU_SHAPES", [(3, 5, 17)])
    out = tmp_path / "out"
    real = harness.run_case
    done = []

    def dies_on_the_fourth(c, *a, **k):
        if len(done) == 3:
            raise KeyboardInterrupt  # what a SIGTERM/SIGINT from the time limit amounts to
        done.append(c)
        return real(c, *a, **k)

    monkeypatch.setattr(harness, "run_case", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--family", "activation", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    data = json.loads((out / "bench.json").read_text())
    assert data["partial"] is True and data["cases_planned"] == 6
    assert [r["name"] for r in data["results"]] == [c.name for c in done]
    monkeypatch.setattr(harness, "run_case", real)
    assert main(["bench", "--family", "activation", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["partial"] is False and len(data["results"]) == 6


def test_bench_all_lists_every_family(tmp_path, monkeypatch, capsys):
    """Families not yet written show in the output as missing; the run still succeeds."""
    monkeypatch.setattr(suite, "collect", lambda fams, device, quick: ([], {f: "missing: test" for f in fams}))
    assert main(["bench", "--quick", "--out", str(tmp_path), "--no-progress", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for fam in suite.FAMILIES:
        assert fam in text
    assert set(json.loads((tmp_path / "bench.json").read_text())["families"]) == set(suite.FAMILIES)


def test_gpu_run_script_deselects_tests_that_exist():
    """The tests gpu_run.sh leaves out by node id are tests of the suite: pytest passes over a
    --deselect that names nothing, so a renamed test would run on the GPU machine unseen (stop
    78 renamed rnn.cu's compile test)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "benchmarks", "gpu_run.sh")) as f:
        ids = re.findall(r"--deselect\s+(\S+?)\)?\s", f.read())
    assert len(ids) >= 2, ids
    for node in ids:
        path, name = node.split("::")
        with open(os.path.join(root, path)) as f:
            assert re.search(rf"^def {re.escape(name)}\(", f.read(), re.M), node


def test_gpu_run_script_steps_summary_and_archive(tmp_path):
    """benchmarks/gpu_run.sh with a stand-in python that records each call: the steps run in
    order (no SASS: it belongs to CPU machines), pytest runs with -rfE so that failures are named
    even in a cut run, those names reach summary.txt, a failing test run makes the script fail,
    and everything lands in one archive beside OUTDIR."""
    import os
    import tarfile

    from helpers import run_bench_script

    r, out, calls = run_bench_script(
        tmp_path, "gpu_run.sh",
        'case "$*" in *" bench "*) echo \'{"op": "matmul", "ms": 0.5}\' >> "$GPU_NN_TUNE_RECORD";; esac\n'
        'case "$*" in *"-m pytest"*) echo "FAILED tests/test_x.py::test_y - AssertionError: boom";'
        ' echo "1 failed, 41 passed in 3.21s"; echo "KeyboardInterrupt"; exit 1;; esac\n'
        'case "$*" in *" check "*) echo "relu: 4/4 pass"; echo "time: 1.0 s wall"; echo "4 passed, 0 failed";; esac\n'
        "exit 0\n",
        {**{k: v for k, v in os.environ.items() if not k.startswith(("GPU_NN_TUNE", "GPU_NN_PACK"))},
         "GPU_NN_CARRIED_CACHE": "none"},
        log_line='echo "$* [TUNE=${GPU_NN_TUNE:-} RECORD=${GPU_NN_TUNE_RECORD:-} CACHE=${GPU_NN_TUNE_CACHE:-}]'
                 ' [KILL=${STEP_KILL_S:-}] [ORDER=${GPU_NN_TEST_ORDER:-} FUSION=${TRITON_DEFAULT_FP_FUSION:-}]"')
    assert r.returncode == 1, r.stdout + r.stderr  # the tests failed
    summary = (out / "summary.txt").read_text()
    steps = [line.split(":")[0] for line in summary.splitlines() if not line.startswith(" ")]
    assert steps == ["install", "info", "check", "bench", "pytest", "record", "total"]
    assert "pytest: FAILED tests/test_x.py::test_y" in summary and "pytest: 1 failed, 41 passed" in summary
    assert "KeyboardInterrupt" not in summary  # an interrupted pytest's counts, not the traceback after them
    assert "check: 4 passed, 0 failed" in summary
    # every step runs the heuristic configurations, the bench's warm phase within a budget (with
    # tuning on, the H200's warm phase outlasted the step and left no ratio table)
    (bench_call,) = [c for c in calls if " bench " in c]
    assert "--warm-budget-s 60" in bench_call and "tuning timings" not in summary
    assert all("[TUNE=0 RECORD= CACHE=]" in c for c in calls if " check " in c or "-m pytest" in c or " bench " in c)
    assert not any(" sass" in c for c in calls)
    (pytest_call,) = [c for c in calls if "-m pytest" in c]
    assert "-rfE" in pytest_call and "-x" not in pytest_call.split()
    # pytest's closing print after the limit's SIGINT (xdist alone waits up to 10 s for its
    # workers) gets a longer kill grace than the other steps' 10 s, and short tracebacks
    assert "--tb=short" in pytest_call.split() and "[KILL=20]" in pytest_call
    assert all("[KILL=]" in c for c in calls if "-m pytest" not in c)
    # the GPU-only tests first (a cut run has run them), one Triton cache key for every step
    assert pytest_call.endswith("[ORDER=gpu-first FUSION=1]")
    assert all(c.endswith("FUSION=1]") for c in calls)
    assert "--ignore=tests/test_compile.py" in pytest_call.split()  # CPU-only AOT compile: CI runs it
    with tarfile.open(str(out) + ".tgz") as tar:
        names = tar.getnames()
    assert "out/summary.txt" in names and "out/pytest.log" in names and "out/machine.txt" in names
    # GPU_RUN_BENCH_TUNE=1: the bench step tunes, with an empty cache, and records every
    # candidate's time into the run folder; check and the tests still run the heuristics
    (tmp_path / "tuned").mkdir()
    r, out, calls = run_bench_script(
        tmp_path / "tuned", "gpu_run.sh",
        'case "$*" in *" bench "*) echo \'{"op": "matmul", "ms": 0.5}\' >> "$GPU_NN_TUNE_RECORD";; esac\n'
        "exit 0\n",
        {**{k: v for k, v in os.environ.items() if not k.startswith(("GPU_NN_TUNE", "GPU_NN_PACK"))},
         "GPU_RUN_BENCH_TUNE": "1", "GPU_NN_CARRIED_CACHE": "none"},
        log_line='echo "$* [TUNE=${GPU_NN_TUNE:-} RECORD=${GPU_NN_TUNE_RECORD:-} CACHE=${GPU_NN_TUNE_CACHE:-}]"')
    (bench_call,) = [c for c in calls if " bench " in c]
    assert f"[TUNE=1 RECORD={out}/tuning.jsonl CACHE={out}/tuning-cache.json]" in bench_call
    assert all("[TUNE=0 RECORD= CACHE=]" in c for c in calls if " check " in c or "-m pytest" in c)
    assert "bench: 1 tuning timings recorded" in (out / "summary.txt").read_text()
    with tarfile.open(str(out) + ".tgz") as tar:
        assert "out/tuning.jsonl" in tar.getnames()


def test_gpu_run_steps_split_over_two_calls(tmp_path):
    """GPU_RUN_STEPS names which of check, bench and pytest a call runs (install, info and record
    always): a session's measurement call gives the bench GPU_RUN_BENCH_S and its warm phase
    GPU_RUN_WARM_S (one call of all three cut both at 09f2311: the bench timed 40 of 186 cases
    in its 120 s, the tests about 72 % of the suite), and a second call runs the tests alone.
    An unknown step name runs nothing."""
    import os

    from helpers import run_bench_script

    base = {**{k: v for k, v in os.environ.items() if not k.startswith(("GPU_NN_TUNE", "GPU_NN_PACK", "GPU_RUN"))},
            "GPU_NN_CARRIED_CACHE": "none"}
    (tmp_path / "measure").mkdir()
    r, out, calls = run_bench_script(
        tmp_path / "measure", "gpu_run.sh", "exit 0\n",
        {**base, "GPU_RUN_STEPS": "check bench", "GPU_RUN_BUDGET_S": "400", "GPU_RUN_BENCH_S": "280",
         "GPU_RUN_WARM_S": "110"})
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    steps = [line.split(":")[0] for line in summary.splitlines() if not line.startswith(" ")]
    assert steps == ["install", "info", "check", "bench", "pytest", "record", "total"]
    assert "pytest: not run (GPU_RUN_STEPS=check bench)" in summary
    assert not any("-m pytest" in c for c in calls)
    (bench_call,) = [c for c in calls if " bench " in c]
    assert "--warm-budget-s 110" in bench_call
    assert (out / "bench.log").read_text().startswith("== bench (limit 280s)")
    (tmp_path / "tests").mkdir()
    r, out, calls = run_bench_script(tmp_path / "tests", "gpu_run.sh", "exit 0\n", {**base, "GPU_RUN_STEPS": "pytest"})
    summary = (out / "summary.txt").read_text()
    steps = [line.split(":")[0] for line in summary.splitlines() if not line.startswith(" ")]
    # (nothing to record: neither bench.json nor check.json)
    assert steps == ["install", "info", "check", "bench", "pytest", "total"], summary
    assert not any("results record" in c for c in calls)
    assert "check: not run" in summary and "bench: not run" in summary and "pytest: rc=0" in summary
    assert not any(" check " in c or " bench " in c for c in calls) and any("-m pytest" in c for c in calls)
    assert r.returncode == 0 and "check rc=0, pytest rc=0" in summary
    # the tests alone keep 10 s after them (the cache count), not record's 25: 100 - 10 - 20 (pytest's
    # kill grace) = 70 s at most, less the seconds install and info took
    (tmp_path / "tests-limit").mkdir()
    r, out, calls = run_bench_script(tmp_path / "tests-limit", "gpu_run.sh", "exit 0\n",
                                     {**base, "GPU_RUN_STEPS": "pytest", "GPU_RUN_BUDGET_S": "100"})
    limit = int((out / "pytest.log").read_text().split("(limit ")[1].split("s)")[0])
    assert 60 <= limit <= 70, limit
    # the bench's limit leaves record its 25 s and the bench's own 10 s kill grace
    (tmp_path / "bench-limit").mkdir()
    r, out, calls = run_bench_script(tmp_path / "bench-limit", "gpu_run.sh", "exit 0\n",
                                     {**base, "GPU_RUN_STEPS": "bench", "GPU_RUN_BUDGET_S": "200", "GPU_RUN_BENCH_S": "290"})
    limit = int((out / "bench.log").read_text().split("(limit ")[1].split("s)")[0])
    assert 155 <= limit <= 165 and "record: rc=0" in (out / "summary.txt").read_text(), limit
    # names apart by any white space
    (tmp_path / "lines").mkdir()
    r, out, calls = run_bench_script(tmp_path / "lines", "gpu_run.sh", "exit 0\n", {**base, "GPU_RUN_STEPS": "check\n\tbench"})
    summary = (out / "summary.txt").read_text()
    assert "check: rc=0" in summary and "bench: rc=0" in summary and "pytest: not run (GPU_RUN_STEPS=check bench)" in summary
    # blank: every step; a pattern is a name, never the files it would match
    (tmp_path / "blank").mkdir()
    r, out, calls = run_bench_script(tmp_path / "blank", "gpu_run.sh", "exit 0\n", {**base, "GPU_RUN_STEPS": " \n "})
    assert "not run" not in (out / "summary.txt").read_text() and any("-m pytest" in c for c in calls)
    (tmp_path / "glob").mkdir()
    r, out, calls = run_bench_script(tmp_path / "glob", "gpu_run.sh", "exit 0\n", {**base, "GPU_RUN_STEPS": "*"})
    assert r.returncode == 2 and "unknown step '*'" in (out / "summary.txt").read_text()
    (tmp_path / "typo").mkdir()
    r, out, calls = run_bench_script(tmp_path / "typo", "gpu_run.sh", "exit 0\n", {**base, "GPU_RUN_STEPS": "check tests"})
    assert r.returncode == 2 and "unknown step 'tests'" in (out / "summary.txt").read_text()
    assert not any("pip install" in c or "gpu_nn" in c for c in calls)
    assert os.path.exists(str(out) + ".tgz")  # (the recipe's copy finds its archive)


def test_step_keeps_its_kill_grace_inside_the_budget(tmp_path):
    """benchmarks/steps.sh's step: a limit is capped so that the kill's grace (STEP_KILL_S,
    default 10 s) still ends inside the script's budget, and timeout is given that grace."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (f'. "{root}/benchmarks/steps.sh"; OUTDIR="{tmp_path}"; SUMMARY="$OUTDIR/summary.txt"; '
              'START=$SECONDS; BUDGET=40; timeout() { echo "timeout $*"; }; '
              'step plain 60 true; STEP_KILL_S=25 step long 60 true; STEP_KILL_S=36 step none 60 true; true')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "(limit 30s)" in (tmp_path / "plain.log").read_text() and "-k 10 30 true" in (tmp_path / "plain.log").read_text()
    assert "(limit 15s)" in (tmp_path / "long.log").read_text() and "-k 25 15 true" in (tmp_path / "long.log").read_text()
    assert "none: skipped (no time left of 40s)" in (tmp_path / "summary.txt").read_text()


def test_results_record_refuses_a_cpu_bench(tmp_path):
    """A folder whose bench.json ran on the CPU is refused (it was stored and listed as a 'cpu' run
    among the README's results on a GPU; a CLI audit); a CUDA one is stored."""
    from gpu_nn.benchmarks import results

    for device, ok in (("cpu", False), ("cuda", True)):
        run_dir = tmp_path / f"run-{device}"
        (run_dir / "bench").mkdir(parents=True)
        (run_dir / "machine.txt").write_text("date: 2026-12-01T10:00:00Z\nhost: h\ncommit: abcdef1234567\n")
        rows = [{"family": "activation", "name": "relu fwd", "shape": "N=32", "ratio": {"triton": 1.5}, "errors": {}}]
        (run_dir / "bench" / "bench.json").write_text(json.dumps({"environment": {"device": "x"}, "results": rows,
                                                                  "run_device": device}))
        if ok:
            assert results.record(str(run_dir), str(tmp_path / "results"))
        else:
            with pytest.raises(SystemExit, match="ran on cpu: benchmarks/results/ records GPU runs"):
                results.record(str(run_dir), str(tmp_path / "results"))


def test_results_record_and_render(tmp_path):
    """A gpu_run.sh folder becomes benchmarks/results/<run>/ and the README section and history
    plot are rebuilt from recorded runs only."""
    import pathlib

    from gpu_nn.benchmarks import results

    run_dir = tmp_path / "gpu-run"
    (run_dir / "bench").mkdir(parents=True)
    (run_dir / "machine.txt").write_text("date: 2026-12-01T10:00:00Z\nhost: h\ncommit: abcdef1234567\n"
                                         "python packages (Python 3.12.3):\n  setuptools==69.5.1\n  torch==2.11.0+cu130\n")
    (run_dir / "summary.txt").write_text("install: rc=0 3s\ncheck: rc=0 41s\n")
    (run_dir / "pytest.log").write_text("....F\nFAILED tests/test_a.py::test_b - x\n1 failed, 4 passed in 9.1s\n")
    (run_dir / "check.json").write_text(json.dumps([
        {"op": "relu", "backend": "triton", "dtype": "float32", "ok": True, "max_rel_err": 1e-7, "error": ""},
        {"op": "lstm", "backend": "cupy", "dtype": "float16", "ok": False, "max_rel_err": 1.0, "error": "big"}]))
    rows = [{"family": "activation", "name": "relu fwd", "shape": "N=32", "ratio": {"triton": 1.5}, "errors": {}},
            {"family": "activation", "name": "tanh fwd", "shape": "N=32", "ratio": {"triton": 0.5}, "errors": {}}]
    (run_dir / "bench" / "bench.json").write_text(json.dumps({
        "environment": {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "date": "2026-12-01"},
        "results": rows}))
    tuning = [{"device_key": "H200|sm_90", "op": "matmul", "key": [8192, 4096, 4096, "rcr", "bf16"], "config": c,
               "ms": ms, "chosen": ch} for c, ms, ch in (([128, 128], 0.41, False), ([128, 256], 0.35, True))]
    tuning.append({"device_key": "H200|sm_90", "op": "conv_fwd", "key": [32, 64], "config": [1], "ms": None,
                   "error": "OutOfResources", "chosen": False})
    (run_dir / "tuning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tuning) + '{"cut sh')
    into = tmp_path / "results"
    dest = results.record(str(run_dir), str(into))
    run = json.loads((pathlib.Path(dest) / "run.json").read_text())
    # every timing is kept as it came; run.json says how much there is
    assert (pathlib.Path(dest) / "tuning.jsonl").read_text() == (run_dir / "tuning.jsonl").read_text()
    assert run["tuning"] == {"rows": 3, "problems": 2, "failed": 1, "per_op": {"conv_fwd": 1, "matmul": 1}}
    assert run["gpu"] == "NVIDIA H200" and run["commit"] == "abcdef1234567"
    assert run["packages"] == {"setuptools": "69.5.1", "torch": "2.11.0+cu130"}
    assert run["check"]["rows"] == 2 and run["check"]["failed"] == 1
    assert run["tests"]["summary"].startswith("1 failed, 4 passed") and run["tests"]["failures"] == ["FAILED tests/test_a.py::test_b - x"]
    assert results.family_geomeans(rows) == {("activation", "triton"): pytest.approx(0.8660254)}
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.START}\nold\n{results.END}\nrest\n")
    results.render(str(into), str(readme))
    text = readme.read_text()
    assert "old" not in text and "NVIDIA H200" in text and "| activation | relu fwd | N=32 | triton | 1.50x |" in text
    assert text.startswith("intro\n") and text.endswith("rest\n") and "1 of 2 rows pass" in text
    assert (into / "history.png").stat().st_size > 1000
    assert "cut by its time limit" not in text and "Also recorded" not in text
    # a bench cut by its time limit says so; a tests-only record beside the runs is named
    doc = json.loads((pathlib.Path(dest) / "run.json").read_text())
    doc.update(bench_partial=True, bench_cases_planned=9)
    (pathlib.Path(dest) / "run.json").write_text(json.dumps(doc))
    (into / "2026-12-02_h200_tests").mkdir()
    (into / "2026-12-02_h200_tests" / "SUMMARY.md").write_text("# Test suite on the H200, tests only\n\nbody\n")
    results.render(str(into), str(readme))
    text = readme.read_text()
    assert "The bench step was cut by its time limit: 2 of 9 planned cases are in the table below." in text
    assert ("Also recorded: `benchmarks/results/2026-12-02_h200_tests/SUMMARY.md`: Test suite on the H200, "
            "tests only.") in text
    # a later run whose bench step left no bench.json and whose tests were cut (no summary): its
    # versions from machine.txt, its check line, and the table of the run before it, named
    later = tmp_path / "gpu-run-2"
    later.mkdir()
    (later / "machine.txt").write_text(
        "date: 2026-12-04T11:25:41Z\nhost: h\ncommit: 1234567abcdef\n"
        "| NVIDIA-SMI 580.159.04    Driver Version: 580.159.04     CUDA Version: 13.0     |\n"
        "|   0  NVIDIA H200                    On  |   00000000:00:06.0 Off |\n"
        "python packages (Python 3.12.3):\n  cupy-cuda13x==14.2.0\n  torch==2.11.0\n  triton==3.6.0\n")
    (later / "summary.txt").write_text("check: rc=0 65s\nbench: rc=124 121s (timed out)\npytest: rc=137 108s\n")
    (later / "pytest.log").write_text("..F..\n")
    (later / "check.json").write_text(json.dumps([
        {"op": "relu", "backend": "triton", "dtype": "float32", "ok": True, "max_rel_err": 1e-7, "error": ""}]))
    dest2 = results.record(str(later), str(into))
    (pathlib.Path(dest2) / "SUMMARY.md").write_text("# H200 run\n")
    run2 = json.loads((pathlib.Path(dest2) / "run.json").read_text())
    assert run2["versions"] == {"torch": "2.11.0", "triton": "3.6.0", "cupy": "14.2.0", "python": "3.12.3", "cuda": "13.0"}
    results.render(str(into), str(readme))
    text = readme.read_text()
    assert "commit `1234567`; torch 2.11.0, cuda 13.0, triton 3.6.0, cupy 14.2.0, python 3.12.3. 2 runs" in text
    assert "1 of 1 rows pass" in text and "1 of 2 rows pass" not in text
    assert f"Test suite: cut by its time limit before its summary; see `benchmarks/results/{pathlib.Path(dest2).name}/SUMMARY.md`" in text
    assert "the table below is the run of 2026-12-01, commit `abcdef1`" in text
    assert "| activation | relu fwd | N=32 | triton | 1.50x |" in text
    # a third run whose bench was cut after one case: that case from it, the other from the first
    # run, each row naming its run
    third = tmp_path / "gpu-run-3"
    (third / "bench").mkdir(parents=True)
    (third / "machine.txt").write_text((later / "machine.txt").read_text().replace("2026-12-04T11", "2026-12-05T11")
                                       .replace("1234567abcdef", "89abcde123456"))
    (third / "summary.txt").write_text("bench: rc=124 120s (timed out)\n")
    (third / "bench" / "bench.json").write_text(json.dumps({
        "environment": {"device": "NVIDIA H200"}, "partial": True, "cases_planned": 2, "timing": {"gpu": "queued"},
        "results": [{"family": "activation", "name": "relu fwd", "shape": "N=32", "ratio": {"triton": 1.1, "cupy": 1.3},
                     "loop_ratio": {"triton": 2.5}, "errors": {}, "baseline": "torch",
                     "queued": {"torch": True, "triton": True, "cupy": False}}]}))
    results.record(str(third), str(into))
    results.render(str(into), str(readme))
    text = readme.read_text()
    assert "The bench step of `89abcde` was cut by its time limit after 1 of 2 planned cases." in text
    assert ("Each case's latest measurement: 1 from commit `89abcde` (2026-12-05, heuristic configurations, queued "
            "timing); 1 from commit `abcdef1` (2026-12-01, measured configurations, latency timing)") in text
    # the two timings are told apart: the older runs' one-call figures include the host's launch
    assert "Timing: *queued* timing is the device's time per call" in text
    assert "; *latency* timing brackets one call on an idle GPU" in text
    assert "| activation | relu fwd | N=32 | triton | 1.10x | 2.50x | `89abcde` |" in text
    # a side whose calls were not queued (its seconds hold host time) is marked, and said so
    assert "| activation | relu fwd | N=32 | cupy | 1.30x † | - | `89abcde` |" in text
    assert "† one side's calls could not be queued" in text
    assert "| activation | tanh fwd | N=32 | triton | 0.50x | - | `abcdef1` |" in text and "1.50x" not in text
    # a run on another GPU (an H100): its table alone, no case filled in from the H200's runs,
    # which are named
    h100 = tmp_path / "gpu-run-h100"
    (h100 / "bench").mkdir(parents=True)
    (h100 / "machine.txt").write_text((third / "machine.txt").read_text().replace("2026-12-05T11", "2026-12-06T11")
                                      .replace("89abcde123456", "fedcba9876543").replace("NVIDIA H200", "NVIDIA H100 80GB HBM3"))
    (h100 / "bench" / "bench.json").write_text(json.dumps({
        "environment": {"device": "NVIDIA H100 80GB HBM3"}, "timing": {"gpu": "queued"},
        "results": [{"family": "activation", "name": "relu fwd", "shape": "N=32", "ratio": {"triton": 0.9},
                     "errors": {}, "baseline": "torch"}]}))
    results.record(str(h100), str(into))
    results.render(str(into), str(readme))
    text = readme.read_text()
    assert "Latest recorded GPU run: **NVIDIA H100 80GB HBM3**" in text
    assert "| activation | relu fwd | N=32 | triton | 0.90x |" in text and "tanh fwd" not in text
    assert ("The table below holds runs on the NVIDIA H100 80GB HBM3 only; bench tables of NVIDIA H200 (2 runs) "
            "are in `benchmarks/results/`.") in text
    # then an H200 run whose bench left no table: the H100's table is shown, and named as the H100's
    last = tmp_path / "gpu-run-h200-late"
    last.mkdir()
    (last / "machine.txt").write_text((later / "machine.txt").read_text().replace("2026-12-04T11", "2026-12-07T11")
                                      .replace("1234567abcdef", "0123456789abc"))
    (last / "check.json").write_text((later / "check.json").read_text())
    results.record(str(last), str(into))
    results.render(str(into), str(readme))
    text = readme.read_text()
    assert "Latest recorded GPU run: **NVIDIA H200**" in text
    assert ("the table below is the run of 2026-12-06, commit `fedcba9`, on the NVIDIA H100 80GB HBM3.") in text


def test_results_of_a_call_that_left_the_tests_to_another_say_nothing_of_them(tmp_path):
    """A measurement call (GPU_RUN_STEPS="check bench") says "pytest: not run" in its summary:
    its record claims no test run (it read as one cut by its limit: the review of the split);
    ``record --tests`` joins the second call's tests, of the same commit only."""
    import pathlib

    from gpu_nn.benchmarks import results

    run_dir = tmp_path / "gpu-run"
    run_dir.mkdir()
    (run_dir / "machine.txt").write_text("date: 2026-12-08T10:00:00Z\nhost: h\ncommit: abcdef1234567\n"
                                         "|   0  NVIDIA H100 80GB HBM3           On  |\n")
    (run_dir / "summary.txt").write_text(
        "install: rc=0 3s\ninfo: rc=0 4s\ncheck: rc=0 41s\nbench: rc=0 250s\n"
        "pytest: not run (GPU_RUN_STEPS=check bench)\nrecord: rc=0 2s\n")
    (run_dir / "check.json").write_text(json.dumps([
        {"op": "relu", "backend": "triton", "dtype": "float32", "ok": True, "max_rel_err": 1e-7, "error": ""}]))
    into = tmp_path / "results"
    results.record(str(run_dir), str(into))
    readme = tmp_path / "README.md"
    readme.write_text(f"{results.START}\n{results.END}\n")
    results.render(str(into), str(readme))
    text = readme.read_text()
    assert "1 of 1 rows pass" in text and "Test suite" not in text, text
    # the session's second call (GPU_RUN_STEPS=pytest) joins the record of its commit: --tests
    tests_dir = tmp_path / "gpu-tests"
    tests_dir.mkdir()
    (tests_dir / "machine.txt").write_text("date: 2026-12-08T10:10:00Z\nhost: h\ncommit: abcdef1234567\n")
    (tests_dir / "summary.txt").write_text("install: rc=0 3s\ninfo: rc=0 4s\ncheck: not run (GPU_RUN_STEPS=pytest)\n"
                                           "bench: not run (GPU_RUN_STEPS=pytest)\npytest: rc=1 80s\n"
                                           "  pytest: FAILED tests/test_a.py::test_b - x\n")
    (tests_dir / "pytest.log").write_text("..F\nFAILED tests/test_a.py::test_b - x\n1 failed, 2 passed in 80.1s\n")
    into2 = tmp_path / "results2"
    dest = results.record(str(run_dir), str(into2), str(tests_dir))
    run = json.loads((pathlib.Path(dest) / "run.json").read_text())
    assert run["tests"]["summary"] == "1 failed, 2 passed in 80.1s"
    assert run["tests"]["failures"] == ["FAILED tests/test_a.py::test_b - x"]
    assert "pytest: rc=1 80s" in run["steps"] and not any("not run" in ln for ln in run["steps"] if ln.startswith("pytest"))
    results.render(str(into2), str(readme))
    assert "Test suite: 1 failed, 2 passed in 80.1s." in readme.read_text()
    assert run["steps"].index("pytest: rc=1 80s") == 4  # where the run's 'not run' line stood
    # refused: the tests of another commit or of none named, on another GPU, a folder without
    # pytest.log, and a run that ran its own tests (they would be replaced)
    for commit in ("1111111222222", None):
        (tests_dir / "machine.txt").write_text("date: 2026-12-08T10:10:00Z\nhost: h\n"
                                               + (f"commit: {commit}\n" if commit else ""))
        with pytest.raises(SystemExit, match=f"ran commit {commit or 'unknown'}"):
            results.record(str(run_dir), str(tmp_path / "results3"), str(tests_dir))
    (tests_dir / "machine.txt").write_text("date: 2026-12-08T10:10:00Z\nhost: h\ncommit: abcdef1234567\n"
                                           "|   0  NVIDIA H200                    On  |\n")
    with pytest.raises(SystemExit, match="ran on a NVIDIA H200, the run on a NVIDIA H100 80GB HBM3"):
        results.record(str(run_dir), str(tmp_path / "results3"), str(tests_dir))
    (tests_dir / "machine.txt").write_text("date: 2026-12-08T10:10:00Z\nhost: h\ncommit: abcdef1234567\n")
    with pytest.raises(SystemExit, match="holds no pytest.log"):
        results.record(str(run_dir), str(tmp_path / "results3"), str(tmp_path))
    (run_dir / "summary.txt").write_text("check: rc=0 41s\npytest: rc=1 200s\n")
    (run_dir / "pytest.log").write_text("F\n1 failed, 5 passed in 200s\n")
    with pytest.raises(SystemExit, match="ran its own tests"):
        results.record(str(run_dir), str(tmp_path / "results3"), str(tests_dir))


def test_results_render_refuses_a_folder_without_runs(tmp_path):
    """render --dir of a mistyped or empty folder stops with an error and leaves the README as it
    was: it used to create the folder and render "no runs" over the README's results table,
    exit status 0 (a user audit)."""
    from gpu_nn.benchmarks import results

    readme = tmp_path / "README.md"
    text = f"intro\n{results.START}\nthe table\n{results.END}\nafter\n"
    readme.write_text(text)
    for folder in (tmp_path / "no-such-folder", tmp_path):
        with pytest.raises(SystemExit, match="no folder|holds no recorded run"):
            results.render(str(folder), str(readme))
    assert readme.read_text() == text and not (tmp_path / "no-such-folder").exists()


def test_results_render_of_another_folder_leaves_the_repositorys_readme(tmp_path, monkeypatch):
    """`gpu-nn results render --dir OTHER` without --readme rewrote the repository's README with
    OTHER's runs (its table claiming them recorded in benchmarks/results/; a CLI audit did so to
    this repository). Now another folder renders its history.png only, unless --readme names a
    README; the repository's folder still renders the repository's README."""
    import argparse

    from gpu_nn.benchmarks import results

    calls = []
    monkeypatch.setattr(results, "render", lambda d, readme: calls.append((d, readme)))
    monkeypatch.setattr(results, "load_runs", lambda d: [])
    parser = argparse.ArgumentParser()
    results.add_arguments(parser)
    repo_readme = os.path.join(os.path.dirname(results.HERE), "README.md")
    for argv, want in ((["render", "--dir", str(tmp_path)], (str(tmp_path), None)),
                       (["render", "--dir", str(tmp_path), "--readme", str(tmp_path / "R.md")],
                        (str(tmp_path), str(tmp_path / "R.md"))),
                       (["render"], (results.RESULTS_DIR, repo_readme))):
        calls.clear()
        assert results.run(parser.parse_args(argv)) == 0
        assert calls == [want], argv


def test_results_malformed_records_are_refused_in_one_line(tmp_path):
    """Malformed records stopped `gpu-nn results` with a traceback (KeyError 'date' sorting the
    runs, KeyError 'backend' summarising a check table), and a missing or unreadable run folder
    was reported as one that had neither file (a CLI audit): each is one line now."""
    from gpu_nn.benchmarks import results

    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "run.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"run.json is not a run record \(no date, commit, gpu\)"):
        results.load_runs(str(tmp_path / "runs"))
    (tmp_path / "runs" / "a" / "run.json").write_text("{not json")
    with pytest.raises(SystemExit, match="run.json is not readable JSON"):
        results.load_runs(str(tmp_path / "runs"))

    run_dir = tmp_path / "out"
    run_dir.mkdir()
    (run_dir / "check.json").write_text(json.dumps([{"op": "relu"}]))
    summary = results.summarize_run(str(run_dir))
    assert summary["check"] == {"rows": 1, "failed": 1, "failures": ["relu ? ?: None"]}
    (run_dir / "check.json").write_text(json.dumps(["row"]))
    with pytest.raises(SystemExit, match="is not a gpu-nn check --json table"):
        results.summarize_run(str(run_dir))
    (run_dir / "check.json").write_text("[{")
    with pytest.raises(SystemExit, match="check.json is not readable JSON"):
        results.record(str(run_dir), str(tmp_path / "into"))
    with pytest.raises(SystemExit, match="no folder"):
        results.record(str(tmp_path / "nope"), str(tmp_path / "into"))


def test_overhead_family_times_ours_torch_and_both_floors():
    """bench_overhead: per-call figures (the harness divides by the calls per sample) for an
    op, a module and an optimizer, fwd and fwd+bwd, with both floors, and a goal summary."""
    from gpu_nn.benchmarks import bench_overhead

    cases = bench_overhead.cases("cpu", quick=True, only={"relu", "Linear", "SGD"})
    assert [c.name for c in cases] == ["F.relu fwd", "F.relu fwd+bwd", "nn.Linear fwd", "nn.Linear fwd+bwd",
                                       "optim.SGD step"]
    assert all(c.calls == bench_overhead.CALLS > 1 for c in cases)
    rows = [harness.run_case(c, warmup=0, reps=2) for c in cases]
    for r in rows:
        assert not r["errors"], r["errors"]
        want = {"torch", "reference"} | ({"floor-custom-op", "floor-function"} if "optim" not in r["name"] else set())
        assert set(r["seconds"]) == want
    summ = bench_overhead.summary(rows)
    assert [s["name"] for s in summ] == [c.name for c in cases]
    relu = summ[0]
    assert relu["vs_torch"] == pytest.approx(rows[0]["seconds"]["reference"] / rows[0]["seconds"]["torch"])
    assert relu["vs_floor-custom-op"] == pytest.approx(rows[0]["seconds"]["reference"] / rows[0]["seconds"]["floor-custom-op"])
    # a GPU row: device seconds alike for every side (20 tiny kernels), the host's apart; the goal
    # reads what a loop of calls costs, the larger of the two
    gpu = {"name": "F.relu fwd", "seconds": {"torch": 4e-6, "triton": 4e-6, "floor-custom-op": 4e-6},
           "host_seconds": {"torch": 11e-6, "triton": 60e-6, "floor-custom-op": 30e-6}}
    gpu["loop_seconds"] = {n: max(v, gpu["host_seconds"][n]) for n, v in gpu["seconds"].items()}
    (item,) = bench_overhead.summary([gpu])
    assert item["vs_torch"] == pytest.approx(60 / 11) and not item["goal_met"]


def test_harness_divides_by_calls_per_sample(clock):
    case = harness.Case("fake", "op", "n=1", {"torch": _sleeper([0.02], clock), "reference": _sleeper([0.04], clock)},
                        calls=20, min_reps=9)
    row = harness.run_case(case, warmup=0, reps=2)
    assert row["seconds"]["torch"] == pytest.approx(0.001) and row["stats"]["torch"]["reps"] == 9
    assert row["ratio"]["reference"] == pytest.approx(2.0)


def test_a_cases_own_minimum_of_timed_calls_holds_under_the_time_limit(clock):
    """``Case.min_reps`` is a floor whatever the run's setting: a run's per-provider time limit
    (``max_time``, --quick's) ended timing after 3 calls though the case asked for 9."""
    case = harness.Case("fake", "op", "n=1", {"torch": _sleeper([0.02], clock), "reference": _sleeper([0.04], clock)},
                        min_reps=9)
    row = harness.run_case(case, warmup=0, reps=2, max_time=0.05)
    assert row["stats"]["torch"]["reps"] == 9 and row["stats"]["reference"]["reps"] == 9


def test_thread_clock_times_cpu_not_waiting(tmp_path, monkeypatch):
    """--clock thread: a provider that sleeps (waits, as on a loaded machine) costs ~0 CPU."""
    import types

    def sleepy():
        return lambda: time.sleep(0.01)

    case = harness.Case("fake", "op", "n=1", {"torch": _sleeper([0.0]), "reference": sleepy})
    monkeypatch.setattr(suite, "collect", lambda fams, device, quick: ([case], {f: "ok (1 cases)" for f in fams}))
    for clock, lo, hi in (("wall", 0.009, 1.0), ("thread", 0.0, 0.005)):
        out = tmp_path / clock
        assert main(["bench", "--family", "activation", "--quick", "--out", str(out), "--no-progress", "--device", "cpu",
                     "--clock", clock]) == 0
        data = json.loads((out / "bench.json").read_text())
        assert data["clock"] == clock
        assert lo <= data["results"][0]["seconds"]["reference"] <= hi, (clock, data["results"][0]["seconds"])
    assert harness.time is time or isinstance(harness.time, types.ModuleType)  # restored after the run


def test_first_use_is_timed_apart_from_the_steady_state(clock):
    """The first call of a provider (where kernels compile) is reported under first_call and
    kept out of the medians: a 5 s first call leaves a 2 ms median alone."""
    def setup():
        n = iter(range(10**6))
        return lambda: clock.sleep(5.0 if next(n) == 0 else 0.002)

    case = harness.Case("fake", "op", "n=1", {"torch": _sleeper([0.004], clock), "triton": setup})
    row = harness.run_case(case, warmup=0, reps=5)
    assert row["first_call"]["triton"] == pytest.approx(5.0)
    assert row["seconds"]["triton"] == pytest.approx(0.002) and row["ratio"]["triton"] == pytest.approx(0.5)


def test_warm_phase_makes_every_first_call_in_parallel_processes():
    """``--warm-jobs``: the spawned processes rebuild the same cases (same order) and make each
    provider's first call; every case index comes back with its providers' cold times."""
    cases, _ = suite.collect(("activation",), "cpu", True)
    cold, wall = suite.warm(("activation",), "cpu", True, len(cases), 2)
    assert sorted(cold) == list(range(len(cases)))
    for i, c in enumerate(cases):
        assert set(cold[i]) == set(c.providers), (i, c.name)
        assert all(v > 0 for v in cold[i].values())
    assert wall > 0


def test_warm_phase_budget_starts_no_case_after_it():
    """``--warm-budget-s``: the warm phase's processes start no case once the budget is spent
    (here 0 s: none), so that a time-limited GPU run reaches its timed phase; the option reaches
    warm() from the command line."""
    cases, _ = suite.collect(("activation",), "cpu", True)
    cold, wall = suite.warm(("activation",), "cpu", True, len(cases), 2, budget_s=0)
    assert cold == {} and wall < 60
    import argparse

    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    assert parser.parse_args(["--warm-jobs", "4", "--warm-budget-s", "75"]).warm_budget_s == 75
    assert parser.parse_args([]).warm_budget_s is None


def test_warm_phase_keeps_the_cases_a_worker_finished_before_it_was_ended(tmp_path, monkeypatch):
    """A warm process ended past the phase's grace (a case still compiling) kept none of its
    cases: its whole share was taken for cold and timed after every warm case. Each finished
    case is now a line of its record file, and the phase reads them: here the worker is stopped
    inside its second case (KeyboardInterrupt, as a terminate stands), and its first is kept; a
    line cut short is skipped."""
    import types

    def call(t, stop=False):
        def setup():
            def fn():
                if stop:
                    raise KeyboardInterrupt
            return fn
        return setup

    fake = [types.SimpleNamespace(providers={"torch": call(0), "reference": call(0)}),
            types.SimpleNamespace(providers={"torch": call(0, stop=True)})]
    monkeypatch.setattr(suite, "collect", lambda fams, device, quick: (fake, None))
    # (the worker sets these for its own process: put back after the test)
    monkeypatch.setenv("GPU_NN_TUNE_CACHE", str(tmp_path / "before.json"))
    monkeypatch.setenv("GPU_NN_TUNE_RECORD", str(tmp_path / "record.jsonl"))
    record = tmp_path / "warm-0.jsonl"
    with pytest.raises(KeyboardInterrupt):
        suite._warm_worker(("x",), "cpu", True, [0, 1], str(tmp_path / "tuning.json"), None, str(record))
    with open(record, "a") as f:
        f.write('{"i": 1, "got": {"tor')  # a line a killed process left unfinished
    got = suite._warm_records([str(record), str(tmp_path / "never-written.jsonl")])
    assert set(got) == {0} and set(got[0]) == {"torch", "reference"} and all(v >= 0 for v in got[0].values())


def test_warm_phase_deals_alternating_cases_to_every_process():
    """The warm processes' shares: every index once, each in increasing order, and a list that
    alternates two kinds (conv's and rnn's float32 / bfloat16 cases) gives each of an even number
    of processes both kinds (dealt the same way every round, process j got indices of j's parity
    only: with gpu_run.sh's 12 jobs one half compiled only float32, the other only bfloat16)."""
    for n, jobs in ((58, 12), (201, 12), (7, 2), (5, 8), (0, 3)):
        shares = suite._dealt(n, jobs)
        assert len(shares) == jobs and sorted(i for s in shares for i in s) == list(range(n))
        assert all(s == sorted(s) for s in shares)
        if n >= 2 * jobs:
            assert all({i % 2 for i in s} == {0, 1} for s in shares), shares


def test_warmed_cases_are_timed_first():
    """A warm phase cut by its budget: the cases it reached are timed first (their order kept),
    the cold ones after, and each cold first-call time stays with its case."""
    cases = ["a", "b", "c", "d", "e"]
    cold = {1: {"t": 0.1}, 3: {"t": 0.3}}
    got, moved = suite.warmed_first(cases, cold)
    assert got == ["b", "d", "a", "c", "e"]
    assert moved == {0: {"t": 0.1}, 1: {"t": 0.3}}
    assert suite.warmed_first(cases, {}) == (cases, {})
    full = {i: {"t": i} for i in range(5)}
    assert suite.warmed_first(cases, full) == (cases, full)
    # each group dealt round-robin over the families: a cut timed phase has some of each
    import types
    fam = [types.SimpleNamespace(family=f, n=i) for i, f in enumerate("ccccppa")]
    got, moved = suite.warmed_first(fam, {0: 0, 1: 1, 2: 2, 4: 4, 6: 6})
    assert [c.n for c in got] == [0, 4, 6, 1, 2, 3, 5] and moved == {0: 0, 1: 4, 2: 6, 3: 1, 4: 2}


def test_overhead_drops_only_the_backends_that_lack_the_op():
    from gpu_nn._errors import BackendUnavailableError
    from gpu_nn.benchmarks import bench_overhead

    def lacks():
        def call():
            raise BackendUnavailableError("relu has no cupy implementation")
        return call

    def broken():
        def call():
            raise RuntimeError("a real failure")
        return call

    provs = {"torch": lambda: (lambda: None), "cupy": lacks, "triton": broken}
    assert set(bench_overhead._implemented(provs, "cuda")) == {"torch", "triton"}  # triton's error is reported later
    assert bench_overhead._implemented(provs, "cpu") is provs


def test_overhead_probe_stops_each_call_where_it_resolves_its_backend(monkeypatch):
    """The probe of which backends have an op stops each call where the op resolves its backend
    (gpu_nn._backend.resolve), before its kernels: on a fresh GPU those calls compiled every
    overhead provider's kernels one after another in the bench's parent, ahead of the parallel
    warm phase. A backend the op lacks (the real resolve's refusal) is dropped; nothing is
    launched for the ones kept; resolve is put back."""
    import gpu_nn
    from gpu_nn import _backend
    from gpu_nn.benchmarks import bench_overhead

    monkeypatch.setattr(_backend, "status", lambda name: (True, ""))  # (a GPU machine's backends)
    real = _backend.resolve
    launched = []

    def provider(backend, have):
        def setup():
            def call():
                with gpu_nn.backend(backend):
                    _backend.resolve("op", torch.device("cuda", 0), have)
                launched.append(backend)
            return call
        return setup

    provs = {"torch": lambda: (lambda: None), "triton": provider("triton", ("reference", "triton")),
             "cupy": provider("cupy", ("reference", "triton"))}
    assert set(bench_overhead._implemented(provs, "cuda")) == {"torch", "triton"}
    assert launched == [] and _backend.resolve is real


def test_rnn_bidirectional_cases_time_cupy_both_ways():
    """bench_rnn's bidirectional cases time cupy twice: its default (both directions of a layer
    in one device-loop launch) and ``cupy-one-direction``, which turns the pairing off for the
    call and back after it (also when the call raises)."""
    from gpu_nn.benchmarks import bench_rnn
    from gpu_nn.ops import rnn as ops

    assert bench_rnn._bi(("triton", "cupy", "cell_loop")) == ("triton", "cupy", "cupy-one-direction")
    assert bench_rnn._bi(("triton",)) == ("triton",)
    assert bench_rnn._mma(bench_rnn._bi(("cupy",))) == ("cupy", "cupy-mma", "cupy-one-direction")
    assert ops._CupyImpl.pair_loops is True
    with bench_rnn._one_direction_loops():
        assert ops._CupyImpl.pair_loops is False
        assert ops._CupyImpl.persist_pair_programs(4, 8, 132) == 0  # the driver then runs each direction
    assert ops._CupyImpl.pair_loops is True and ops._CupyImpl.persist_pair_programs(4, 8, 132) == 1
    with pytest.raises(RuntimeError), bench_rnn._one_direction_loops():
        raise RuntimeError
    assert ops._CupyImpl.pair_loops is True


def test_loop_cost_runs_every_time_loop_both_ways(tmp_path):
    """``python -m gpu_nn.benchmarks.loop_cost`` (host time per step of the recurrent loops, per
    step key against bound) runs its four loops both ways and writes them; in a process without
    TRITON_INTERPRET, as it needs. Figures are not judged here (speed lives in benchmarks/)."""
    from helpers import run_fresh, run_uninterpreted, uninterpreted_env

    env = uninterpreted_env()
    out = tmp_path / "loops.json"
    proc = run_uninterpreted(["-m", "gpu_nn.benchmarks.loop_cost", "--T", "3", "--B", "4", "--H", "8", "--json", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["us_per_step"]
    assert set(res) == {"forward", "backward", "pair forward", "pair backward"}
    assert all(row["per_step_key"] > 0 and row["bound"] > 0 for row in res.values())
    bad = run_fresh(["-m", "gpu_nn.benchmarks.loop_cost"], env={**env, "TRITON_INTERPRET": "1"})
    assert bad.returncode == 2 and "TRITON_INTERPRET" in bad.stderr


def test_host_cost_demo_times_and_counts_every_phase_of_a_training_step(tmp_path):
    """``python -m gpu_nn.benchmarks.host_cost --demo`` times the demo's training step phase by
    phase on the Triton path with launches no-op, and counts the launches of each phase. Figures
    are not judged (speed lives in benchmarks/); the counts are what the step launches: the
    optimizer's whole step in one launch, clipping in two (norm, scale), nothing to zero."""
    from helpers import run_fresh

    out = tmp_path / "demo.json"
    proc = run_fresh(["-m", "gpu_nn.benchmarks.host_cost", "--demo", "cnn", "gru",
                      "--samples", "1", "--steps", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    phases = ("zero_grad", "forward", "loss", "backward", "clip", "step")
    assert set(res) == {"cnn", "gru"}
    for model, row in res.items():
        assert set(row["us"]) == set(row["launches"]) == {*phases, "total"}
        assert all(row["us"][k] > 0 for k in ("forward", "loss", "backward", "step"))
        n = row["launches"]
        assert n["total"] == sum(n[k] for k in phases)
        assert n["zero_grad"] == 0 and n["step"] == 1
        assert n["forward"] > 0 and n["loss"] > 0 and n["backward"] > n["forward"]
    assert res["cnn"]["launches"]["clip"] == 0  # the demo clips the recurrent models only
    assert res["gru"]["launches"]["clip"] == 2


def test_gpu_first_order_runs_the_tests_only_a_gpu_runs_first(request, monkeypatch):
    """GPU_NN_TEST_ORDER=gpu-first (gpu_run.sh's pytest step, which its time limit may cut): the
    cases only a GPU runs (the cupy backend's, those skipped without CUDA) come first, the
    CUDA-graph captures last (a failed capture breaks its worker), the rest between; the first
    group and the rest each spread in a fixed pseudo-random order (CRC-32 of the node id), so that
    xdist's runs of consecutive tests do not hand one worker a test's parametrisations together
    (each compiling its kernel variants on a GPU); without the variable, collection order. The
    two files' tests as this session collected them, ordered again by conftest's hook with the
    variable unset and set (where the session did not collect them, as pytest collects them in
    a process of its own: two collections, about 14 s)."""
    import itertools
    import os
    import subprocess
    import sys
    import zlib

    import conftest

    files = ("tests/test_cuda_graphs.py", "tests/test_optim.py")
    opt = request.config.option
    # this session holds both files whole, once each, in collection order: collected from the tests
    # folder or those files, nothing deselected or ignored, not reordered (the variable itself,
    # failed-first, new-first)
    narrowing = ("keyword", "markexpr", "deselect", "lf", "failedfirst", "newfirst", "stepwise", "ignore",
                 "ignore_glob", "keepduplicates")
    whole = (os.environ.get("GPU_NN_TEST_ORDER") is None and not any(getattr(opt, o, None) for o in narrowing)
             and all(any(os.path.normpath(a) in ("tests", f) for a in request.config.args) for f in files))
    # (and the hook called here is the one pytest calls: conftest's, registered)
    hooks = request.config.pluginmanager.hook.pytest_collection_modifyitems.get_hookimpls()
    assert conftest.pytest_collection_modifyitems in [h.function for h in hooks]
    mine = [it for it in request.session.items if it.nodeid.startswith(files)] if whole else []

    def collect(order):
        if order:
            monkeypatch.setenv("GPU_NN_TEST_ORDER", order)
        else:
            monkeypatch.delenv("GPU_NN_TEST_ORDER", raising=False)
        if mine:
            items = sorted(mine, key=lambda it: files.index(it.nodeid.split("::")[0]))  # (stable: collection order)
            conftest.pytest_collection_modifyitems(request.config, items)
            return [it.nodeid for it in items]
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                           capture_output=True, text=True, env=dict(os.environ),
                           cwd=os.path.dirname(os.path.dirname(__file__)))
        return [ln for ln in r.stdout.splitlines() if "::" in ln]

    plain, ordered = collect(None), collect("gpu-first")
    assert sorted(plain) == sorted(ordered) and plain[0].startswith("tests/test_cuda_graphs.py")
    graphs = [i for i, n in enumerate(ordered) if n.startswith("tests/test_cuda_graphs.py")]
    assert graphs == list(range(len(ordered) - len(graphs), len(ordered)))
    first = [n for n in ordered if not n.startswith("tests/test_cuda_graphs.py")]
    # in these files: the cupy cases and five tests skipped without CUDA
    gpu = [n for n in first if "cupy-cuda" in n or n.split("::")[1].split("[")[0] in (
        "test_gpu_step_does_not_sync", "test_kept_plan_serves_a_cuda_training_loop",
        "test_cuda_graph_replays_follow_a_tensor_lr", "test_cpu_tensor_lr_for_cuda_params_is_read_on_the_host",
        "test_clip_grad_norm_on_two_gpus_matches_torch")]
    assert len(gpu) > 20 and first[:len(gpu)] == gpu, first[:10]
    rest = first[len(gpu):]
    rank = lambda n: zlib.crc32(n.encode())  # noqa: E731
    assert gpu == sorted(gpu, key=rank) and rest == sorted(rest, key=rank)
    # the parametrisations of a test no longer come as one run: the longest run of one test
    # function among the rest is short (in collection order it is all of them)
    fn = [n.split("[")[0] for n in rest]
    runs = [len(list(g)) for _, g in itertools.groupby(fn)]
    biggest = max(fn.count(f) for f in set(fn))
    plain_fn = [n.split("[")[0] for n in plain if n in set(rest)]
    assert max(len(list(g)) for _, g in itertools.groupby(plain_fn)) == biggest > 10
    assert max(runs) <= biggest // 4, (max(runs), biggest)


def test_rnn_gpu_case_list_builds(monkeypatch):
    """bench_rnn's CUDA case list (--quick and full) builds: every case's modules, inputs and
    providers are made when the list is (a provider that cannot be built fails the whole family
    there, as a cell loop of a bidirectional layer did), here on the CPU in float32."""
    import torch

    from gpu_nn.benchmarks import bench_rnn

    real = bench_rnn._case
    built = []

    def on_cpu(mode, T, N, I, H, dtype, device, backward, providers, **kw):
        built.append((mode, T, N, H, providers, kw.get("bidirectional", False) or kw.get("packed", False)))
        return real(mode, min(T, 4), min(N, 3), min(I, 8), min(H, 8), torch.float32, "cpu", backward, providers, **kw)

    monkeypatch.setattr(bench_rnn, "_case", on_cpu)
    monkeypatch.delenv(bench_rnn.SKIP_PERSISTENT_ENV, raising=False)
    for quick in (True, False):
        built.clear()
        assert len(bench_rnn.cases("cuda", quick=quick)) == len(built) > 20
        assert not any("cell_loop" in p for *_, p, bi_or_packed in built if bi_or_packed)
        # torch's cell loop (context, no goal; the slowest provider) only in the full set
        assert any("cell_loop" in p for *_, p, _ in built) is not quick
        # the main N=64 cases (not packed) time the persistent kernel too (128 tiles: one program each)
        main = [p for mode, T, N, H, p, other in built if (T, N, H, other) == (100, 64, 512, False)]
        assert len(main) == 12 and all("triton-persistent" in p for p in main)
    # the dtypes alternate in the list (the cases are built float32 first, then bfloat16)
    monkeypatch.setattr(bench_rnn, "_case", lambda mode, T, N, I, H, dtype, *a, **kw: (mode, T, N, dtype))
    listed = bench_rnn.cases("cuda", quick=True)
    assert listed[:4] == [("lstm", 100, 64, torch.float32), ("lstm", 100, 64, torch.bfloat16)] * 2
    assert len(listed) == 45 and sum(c[3] == torch.bfloat16 for c in listed) == 20
    # forward-only cases run both sides in eval mode (cuDNN's inference path), fwd+bwd in training
    monkeypatch.setattr(bench_rnn, "_case", real)
    for backward in (False, True):
        case = bench_rnn._case("lstm", 3, 2, 4, 5, torch.float32, "cpu", backward, ("reference",))
        modules = [c.cell_contents for setup in case.providers.values() for c in setup.__closure__ or ()
                   if isinstance(c.cell_contents, torch.nn.Module)]
        assert len(modules) == 2 and all(m.training is backward for m in modules)


def test_rnn_small_batch_forwards_time_the_persistent_kernel_both_ways(monkeypatch):
    """The small-batch forward cases time the persistent forward with W_hh resident (its
    default where it applies) and re-reading it from L2 (``GPU_NN_RNN_RESIDENT=0``, the name
    the kernels read), and so do the one-layer small-batch fwd+bwd cases (the backward resident
    or not with them), the other fwd+bwd cases only the default; the skip switch drops both."""
    from gpu_nn.benchmarks import bench_rnn
    from gpu_nn.kernels.triton import rnn as kt

    assert bench_rnn.RESIDENT_ENV == kt.RESIDENT_ENV
    assert bench_rnn.PROVIDERS["triton-persistent-l2"] == ("triton", "1", "0")
    assert bench_rnn.PROVIDERS["triton-persistent"] == ("triton", "1", "1")
    monkeypatch.delenv(bench_rnn.SKIP_PERSISTENT_ENV, raising=False)
    assert {"triton-persistent", "triton-persistent-l2"} <= set(bench_rnn._small_providers())
    assert "triton-persistent" in bench_rnn._layer_providers()
    assert "triton-persistent-l2" not in bench_rnn._layer_providers()
    assert {"triton-persistent", "triton-persistent-l2"} <= set(bench_rnn._layer_providers(l2=True))
    assert "cell_loop" not in bench_rnn._layer_providers(l2=True)
    built = []
    packed = []
    monkeypatch.setattr(bench_rnn, "_case", lambda mode, T, N, I, H, dtype, device, backward, providers, **kw:
                        (packed if kw.get("packed") else built).append(
                            (T, N, backward, kw.get("L", 1), kw.get("bidirectional", False), providers)))
    bench_rnn.cases("cuda", quick=True)
    small_fb = [p for T, N, backward, L, bi, p in built if backward and N <= 16 and L == 1 and not bi]
    assert len(small_fb) == 12 and all("triton-persistent-l2" in p for p in small_fb), built
    # and ours as a user gets it (no switch: the persistent forward, the per-step backward)
    assert bench_rnn.PROVIDERS["triton-default"] == ("triton", harness.UNSET, harness.UNSET)
    assert all("triton-default" in p for p in small_fb)
    import os

    monkeypatch.setenv("GPU_NN_RNN_PERSISTENT", "0")
    with harness.env_var("GPU_NN_RNN_PERSISTENT", harness.UNSET):
        assert "GPU_NN_RNN_PERSISTENT" not in os.environ  # the default, whatever the process was given
    assert os.environ["GPU_NN_RNN_PERSISTENT"] == "0"
    # the packed batch (fwd+bwd) times both persistent forms too: their backwards skip ended tiles
    assert len(packed) == 1 and {"triton-persistent", "triton-persistent-l2"} <= set(packed[0][-1]), packed
    monkeypatch.setenv(bench_rnn.SKIP_PERSISTENT_ENV, "1")
    assert not {"triton-persistent", "triton-persistent-l2"} & set(bench_rnn._small_providers())
    assert "triton-default" not in bench_rnn._with_default(bench_rnn._layer_providers(l2=True))
    assert bench_rnn._unskipped(("triton", "triton-persistent", "cupy")) == ("triton", "cupy")


def test_bench_table_prints_error_messages_as_text(capsys):
    """A provider's error message with brackets (a shape "[1, 2]", a stray "[/x]") is printed as
    it is: rich took it for markup, dropping the text or raising after every case was timed."""
    rows = [{"family": "f", "name": "n", "shape": "s", "baseline": "torch", "seconds": {"torch": 1e-3},
             "errors": {"triton": "bad size [1, 2] [/x]"}, "flops": None, "bytes": None, "ratio": {}}]
    harness.print_table(rows)
    assert "bad size [1, 2] [/x]" in capsys.readouterr().out


def test_cnn_block_case_computes_the_same_block_as_torch():
    """bench_conv's seed-sized CNN block (issue 15's goal case) runs ours and torch on the same
    block: on the CPU at batch 2, the provider's output and the gradients it asks for match
    torch's (ours fused: bias + ReLU in each convolution; through the reference here, the
    Triton kernels being checked against it elsewhere), and the case is in the GPU list with
    its flop count."""
    import torch

    from gpu_nn.benchmarks import bench_conv

    backend = "reference"
    case = bench_conv.block_case("cpu", torch.float32, providers=("torch", backend), n=2)
    grads = {}
    real = torch.autograd.grad

    def keep(outputs, inputs, grad_outputs):
        got = real(outputs, inputs, grad_outputs)
        grads.setdefault(name, []).append(got)
        return got

    outs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.autograd, "grad", keep)
        for name in ("torch", backend):
            torch.manual_seed(0)  # the same output gradient for both (each provider draws its own)
            outs[name] = case.providers[name]()()
    assert outs[backend].shape == (2, 64, 28, 28) and outs["torch"].min() == 0
    torch.testing.assert_close(outs[backend], outs["torch"], rtol=1e-4, atol=1e-5)
    (ours,), (theirs,) = grads[backend], grads["torch"]
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    quick = bench_conv.cases("cuda", quick=True)
    gpu = [c for c in quick if "cnn block" in c.name]
    assert [c.name for c in gpu] == ["conv2d cnn block fwd+bwd float32", "conv2d cnn block fwd+bwd bfloat16"]
    # the dtypes alternate (a run its limit cuts has timed bfloat16, issue 15's headline, too)
    assert [c.name for c in quick[:4]] == ["conv2d 3x3 fwd float32", "conv2d 3x3 fwd bfloat16"] * 2
    assert harness.interleave([[1, 2, 3], [4], [], [5, 6]]) == [1, 4, 5, 2, 6, 3]
    # --quick's other forward+backward cases: the four ResNet 3x3 stages, both layouts, both dtypes
    assert sorted((c.name, c.shape) for c in quick if "bwd" in c.name and c not in gpu) == sorted(
        (f"conv2d 3x3{cl} fwd+bwd {dt}", shape) for cl in ("", " channels_last") for dt in ("float32", "bfloat16")
        for _, shape, _ in bench_conv.GPU_SHAPES[:4])
    assert [s for _, s, _ in bench_conv.GPU_SHAPES[:4]] == [
        f"N=32 C={c} {hw}x{hw} O={c}" for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7))]
    assert gpu[0].shape == bench_conv.BLOCK_SHAPE and gpu[0].flops == pytest.approx(
        2 * (2 * 128 * 32 * 784 * 9) + 3 * (2 * 128 * 64 * 784 * 32 * 9))


def test_pool_gpu_cases_time_avg_pooling_too(monkeypatch):
    """bench_pool's GPU list times average pooling (issue 14's goal names max and avg pooling)
    forward and forward+backward in each dtype, for torch, triton and cupy; the providers run
    (here on tiny tensors of TINY_DEVICE) and call each pool with the same window."""
    import torch

    from gpu_nn.benchmarks import bench_pool

    real = bench_pool._inputs
    monkeypatch.setattr(bench_pool, "_inputs", lambda shape, device, dtype, padding=1, channels_last=False:
                        real((1, 2, 7, 6), TINY_DEVICE, torch.float32, padding, channels_last))
    seen = []
    torch_avg = torch.nn.functional.avg_pool2d
    monkeypatch.setattr(torch.nn.functional, "avg_pool2d", lambda *a, **k: seen.append(a[1:]) or torch_avg(*a, **k))
    for quick, dtypes in ((True, 1), (False, 2)):
        avg = [c for c in bench_pool.cases("cuda", quick) if c.name.startswith("avg_pool2d")]
        assert sorted(c.name for c in avg) == sorted(["avg_pool2d 3x3/2 p1 fwd", "avg_pool2d 3x3/2 p1 fwd+bwd"] * dtypes)
        assert all(set(c.providers) == {"torch", "triton", "cupy"} and c.bytes > 0 for c in avg)
    for case in avg[:2]:
        for name in ("torch", "triton"):
            case.providers[name]()()
    assert seen == [(3, 2, 1)] * 2  # torch's forward, then its forward+backward


def test_optim_gpu_cases_time_every_optimizer(monkeypatch):
    """bench_optim's GPU list times every optimizer of ours (issue 14's goal covers every step):
    SGD with momentum, Adagrad and Adadelta beside Adam / AdamW / RMSprop, each against torch
    fused=True where the probe finds it for the device and dtype, else foreach (the shape says
    which); the torch and triton providers step (here on tiny parameters of TINY_DEVICE) with the
    same hyperparameters."""
    import torch

    from gpu_nn.benchmarks import bench_optim

    assert bench_optim.fused_on(torch.optim.SGD, "cpu", torch.float32)
    assert not bench_optim.fused_on(torch.optim.Adadelta, "cpu", torch.float32)  # no fused argument
    assert not bench_optim.fused_on(torch.optim.SGD, "meta", torch.float32)  # no fused kernel there
    real = bench_optim._params
    monkeypatch.setattr(bench_optim, "_params", lambda sizes, dtype, device, seed=0: real([5, 3], dtype, TINY_DEVICE, seed))
    monkeypatch.setattr(bench_optim, "fused_on", lambda cls, device, dtype: cls is torch.optim.SGD)
    cases = bench_optim.cases("cuda", quick=True)
    names = [c.name for c in cases]
    for name in ("adam", "adamw", "rmsprop", "sgd momentum", "adagrad", "adadelta"):
        assert names.count(f"{name} step") == 2  # float32 and bfloat16 parameters
    others = [c for c in cases if c.name in ("sgd momentum step", "adagrad step", "adadelta step")]
    assert all(c.shape.endswith("vs torch fused" if c.name.startswith("sgd") else "vs torch foreach") for c in others)
    assert all(("torch_foreach" in c.providers) == c.name.startswith("sgd") for c in others)
    # bfloat16 parameters: ours keeps float32 state, torch bfloat16 state: each side's own bytes
    adam = {c.shape.split("M ", 1)[1]: c.bytes for c in cases if c.name == "adam step"}
    n = 10_500_000
    assert adam["fp32"] == dict.fromkeys(("torch", "torch_foreach", "triton", "cupy"), 28 * n)
    half = adam["bf16 params, fp32 state"]
    assert half["triton"] == half["cupy"] == 22 * n and half["torch"] == half["torch_foreach"] == 14 * n
    for case in others[:3]:
        for name in ("torch", "triton"):
            case.providers[name]()()


def test_dense_gpu_cases_time_float32_linear_under_both_tf32_settings(monkeypatch):
    """bench_dense times float32 linear under torch's default (no TF32 for matmuls) and with
    torch.backends.cuda.matmul.allow_tf32 on (issue 15: each setting), both providers reading
    the switch inside the timed call, which leaves it as it was."""
    import torch

    from gpu_nn.benchmarks import bench_dense
    from gpu_nn.ops import dense as ops

    real = bench_dense._linear_inputs
    monkeypatch.setattr(bench_dense, "_linear_inputs", lambda M, K, N, device, dtype: real(3, 5, 4, TINY_DEVICE, dtype))
    seen = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda *a: seen.append(torch.backends.cuda.matmul.allow_tf32) or real_linear(*a))
    cases = [c for c in bench_dense.cases("cuda", quick=True) if c.name.startswith("linear")]
    assert [c.shape.split(" ", 1)[1] for c in cases] == ["fp32", "fp32", "fp32 tf32", "fp32 tf32", "bf16", "bf16"]
    before = torch.backends.cuda.matmul.allow_tf32
    for case in cases[:4]:
        case.providers["torch"]()()
    assert seen == [before, before, True, True] and torch.backends.cuda.matmul.allow_tf32 == before
    ours = []
    real_allowed = ops._tf32_allowed
    monkeypatch.setattr(ops, "_tf32_allowed", lambda: ours.append(real_allowed()) or ours[-1])
    for case in (cases[0], cases[2]):
        case.providers["triton"]()()  # (tiny tensors of TINY_DEVICE)
    assert ours == [before, True] and torch.backends.cuda.matmul.allow_tf32 == before


def test_rnn_defaults_read_the_switches_off_a_run():
    """benchmarks/rnn_defaults: from bench.json rows, the persistent forward's batch bound is the
    largest batch at which it beat the per-step launches in every forward case (and stops at the
    first batch where it lost), the persistent backward's default compares the backward alone
    (fwd+bwd less the forward of the same shape, for each provider), and the resident form stays
    on only where it is not slower than the L2 form. Every rnn row of the recorded H200 run parses,
    and that run supports the code's bound of 16."""
    import os

    from gpu_nn.benchmarks import rnn_defaults as rd

    def row(name, shape, iqr=0.0, **med):  # as the harness writes one: seconds the medians
        med = {k.replace("_", "-"): v for k, v in med.items()}
        return {"family": "rnn", "name": name, "shape": shape, "seconds": med,
                "stats": {k: {"median": v, "iqr": iqr} for k, v in med.items()}}

    def sh(N, dtype="float32", extra="", H=512):
        return f"T=50 N={N} I={H} H={H}{extra} {dtype}"

    cur = {"persist_default_max_b": 16, "persist_max_b": 64, "persistent_bwd_by_default": False}
    rows = [row("lstm fwd", sh(4), triton=2.0, triton_persistent=1.0, triton_persistent_l2=1.2),
            row("lstm fwd", sh(16), triton=2.0, triton_persistent=1.5, triton_persistent_l2=1.4),
            row("lstm fwd", sh(64), triton=2.0, triton_persistent=1.9),
            row("lstm fwd+bwd", sh(4), triton=5.0, triton_persistent=3.5),  # bwd 3.0 vs 2.5: wins
            row("lstm fwd+bwd", sh(16), triton=5.0, triton_persistent=4.0),  # bwd 3.0 vs 2.5: wins
            row("lstm fwd+bwd", sh(16, extra=" L=2 bi"), triton=5.0, triton_persistent=9.0),  # not one layer
            row("gru fwd", sh(4), triton=2.0, triton_persistent=1.0),
            row("gru fwd+bwd", sh(4), triton=2.1, triton_persistent=0.9),  # a backward of -0.1: noise
            # H = 1024: KP 1024 > RESIDENT_MAX_KP, both providers run the L2 kernel (their ratio is noise)
            row("lstm fwd", sh(16, H=1024), triton=9.0, triton_persistent=3.1, triton_persistent_l2=3.0),
            # resident 2 % slower, within the timings' spread: not counted as slower
            row("lstm fwd", sh(4, "bfloat16"), iqr=0.05, triton=2.0, triton_persistent=1.02, triton_persistent_l2=1.0),
            {"family": "conv", "name": "conv2d fwd", "shape": sh(4), "stats": {}}]
    d = rd.decide(rows, cur)
    assert d["persist_default_max_b"]["recommended"] == 64
    assert d["persistent_bwd_by_default"]["recommended"] is True
    assert len(d["persistent_bwd_by_default"]["cases"]) == 2  # N = 4 and 16 (the stack is not one layer)
    assert abs(d["persistent_bwd_by_default"]["cases"]["lstm fwd+bwd " + sh(4)] - 2.5 / 3.0) < 1e-12
    assert d["persistent_bwd_by_default"]["backward_not_positive"] == ["gru fwd+bwd " + sh(4)]
    res = d["resident"]
    assert res["recommended"] is False and list(res["slower"]) == ["lstm fwd " + sh(16)]
    assert res["not_resident"] == ["lstm fwd " + sh(16, H=1024)] and len(res["cases"]) == 3
    assert "lstm fwd " + sh(16) in rd.decide(rows, cur, sm_count=16)["resident"]["not_resident"]  # 32 tiles
    # a fwd+bwd case weighs the two forms only where the backward is resident too (its own bound)
    from gpu_nn.kernels.triton import rnn as kt

    both = [row("lstm fwd+bwd", sh(4, "bfloat16", H=H), triton=5.0, triton_persistent=3.0, triton_persistent_l2=3.5)
            for H in (kt.RESIDENT_BWD_MAX_KP, 2 * kt.RESIDENT_BWD_MAX_KP)]
    assert 2 * kt.RESIDENT_BWD_MAX_KP <= kt.RESIDENT_MAX_KP  # (the forward alone would be resident at both)
    r2 = rd.decide(both, cur)["resident"]
    assert list(r2["cases"]) == [rd._label(both[0])] and r2["not_resident"] == [rd._label(both[1])]
    # the persistent forward losing at N=16 stops the bound at 4; a backward that loses turns it off
    rows[1]["seconds"]["triton-persistent"] = 2.1
    rows[3]["seconds"]["triton-persistent"] = 4.5  # bwd 3.0 vs 3.5
    d = rd.decide(rows, cur)
    assert d["persist_default_max_b"]["recommended"] == 4
    assert d["persistent_bwd_by_default"]["recommended"] is False
    assert list(d["persistent_bwd_by_default"]["cases"]) == ["lstm fwd+bwd " + sh(4)]
    # nothing timed: the code's values stand
    d = rd.decide([], cur)
    assert (d["persist_default_max_b"]["recommended"], d["persistent_bwd_by_default"]["recommended"],
            d["resident"]["recommended"]) == (16, False, True)
    assert "change" in rd.report(rd.decide(rows, cur)).split("\n")[0]

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "2026-11-30_nvidia-h200_82f8513",
                        "bench.json")
    with open(path) as f:
        results = json.load(f)["results"]
    rnn = [r for r in results if r["family"] == "rnn"]
    assert rnn and all(rd.parse_case(r) is not None for r in rnn)
    assert rd.decide(results, cur)["persist_default_max_b"]["recommended"] == 16


def test_host_split_runs_and_writes_its_pieces(tmp_path, monkeypatch):
    """benchmarks/host_split.py on this machine (no CUDA: the reference backend, the CUDA-only
    pieces left out): every part's figures are numbers of microseconds, the cProfile text is there."""
    import json

    from gpu_nn.benchmarks import host_split

    monkeypatch.setattr(host_split, "SAMPLES", 3)
    monkeypatch.setattr(host_split, "N", 20)
    out = tmp_path / "hs.json"
    assert host_split.main(["--json", str(out), "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and "run_backward" in doc["profile_relu_fwd_bwd"]
    for part in ("relu", "optim", "cross_entropy"):
        figures = {k: v for k, v in doc[part].items() if not isinstance(v, bool)}
        assert figures and all(isinstance(v, float) and v > 0 for v in figures.values()), (part, doc[part])
    assert "ours F.relu fwd+bwd" in doc["relu"] and "Adam 6 tensors ours fresh grads" in doc["optim"]


def test_triton_cache_counts_compiled_variants_per_kernel(tmp_path):
    """One variant per cache folder holding a .cubin; group files and unfinished folders are not
    variants."""
    from gpu_nn.benchmarks import triton_cache

    for i, names in enumerate((["_a.cubin", "_a.json"], ["_a.cubin"], ["_b.cubin", "_b.ptx"], ["__grp___a.json"], [])):
        d = tmp_path / f"H{i}"
        d.mkdir()
        for n in names:
            (d / n).write_text("x")
    (tmp_path / "stray.json").write_text("{}")
    assert triton_cache.summary(str(tmp_path)) == {"dir": str(tmp_path), "variants": 3, "kernels": {"_a": 2, "_b": 1}}
    assert triton_cache.summary(str(tmp_path / "absent"))["variants"] == 0
    out = tmp_path / "c.json"
    assert triton_cache.main([str(tmp_path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["kernels"] == {"_a": 2, "_b": 1}


_COMPILE = """
import hashlib, json, sys, triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from gpu_nn.kernels.triton import _aot
hits = []
knobs.compilation.listener = lambda **kw: hits.append(bool(kw.get("cache_hit")))
out = []
for item in sys.argv[1:]:
    spec = _aot.family_specs("activation")[int(item[1:])]
    hits.clear()
    if item[0] == "s":  # compile_spec: what reads the IR
        out.append(dict(_aot.compile_spec(spec, sass=False), hits=list(hits)))
        continue
    src = _aot._source(spec.kernel, spec.signature, spec.constexprs, spec.divisible_by_16)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    out.append({"hits": list(hits), "cubin": hashlib.sha256(c.asm["cubin"]).hexdigest(), "ptx": "ptx" in c.asm})
print(json.dumps(out))
"""


def _compile(cache, *items: str) -> list:
    """The activation family's specs compiled for sm_90 in one process of its own (no interpreter)
    with TRITON_CACHE_DIR=cache, in order: ``"cN"`` spec N by Triton's own compile() (whether
    each compile was a cache hit, the cubin's digest, whether the result holds PTX), ``"sN"``
    spec N through ``_aot.compile_spec`` (its row, and the compiles' hits)."""
    from helpers import run_uninterpreted

    # (Triton reads TRITON_CACHE_DIR at each compile, not at import)
    r = run_uninterpreted(["-c", _COMPILE, *items], env={"TRITON_CACHE_DIR": cache})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_packed_kernel_cache_serves_cache_hits_where_it_is_unpacked(tmp_path):
    """benchmarks/triton_cache pack / unpack (a GPU run's compiled kernels carried to the next run
    on the same image): a kernel Triton compiled for sm_90 into one cache, packed (its metadata,
    cubin and group file only: no IR), unpacked into another cache, is a cache hit of
    Triton's own compile() there, the same cubin (group paths rewritten to the new place); the
    CUDA C modules travel too; an archive from another Triton build writes no Triton entry; the
    size limit leaves entries out and counts them; the summary counts what was carried apart from
    what was there before and what compiled after; the files keep their times; compile_spec (which
    reads the IR) compiles a carried entry again; a foreign or cut archive is refused."""
    import io
    import tarfile

    from gpu_nn.benchmarks import triton_cache as tc

    first, cuda = tmp_path / "first", tmp_path / "cuda"
    cuda.mkdir()
    (cuda / "rnn-0123.cubin").write_bytes(b"\x7fELF cubin")
    (built,) = _compile(first, "c0")
    assert built["hits"] == [False] and built["ptx"]
    launcher = first / "LAUNCHERKEY"  # a compiled launcher module's folder, as Triton's build keeps it
    launcher.mkdir()
    (launcher / "__triton_launcher.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\x7fELF so")
    (first / "half").mkdir()  # an unfinished compile: a group file that names no cubin
    (first / "half" / "__grp__k.json").write_text(json.dumps({"child_paths": {"k.json": str(first / "half" / "k.json")}}))
    (first / "remote").mkdir()  # a remote cache manager's group form (a list): left out
    (first / "remote" / "__grp__r.json").write_text(json.dumps({"child_paths": ["r.json", "r.cubin"]}))
    archive = tmp_path / "cache.tar.xz"
    info = tc.pack(str(archive), str(first), str(cuda))
    assert (info["kernels"], info["modules"], info["cuda_modules"]) == (1, 1, 1) and info["bytes"] == archive.stat().st_size
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        stamp = json.load(tar.extractfile("STAMP.json"))
    assert stamp["triton_key"] == tc.stamp()["triton_key"] and "cuda/rnn-0123.cubin" in names
    kept = {n.rsplit(".", 1)[-1] for n in names if n.startswith("triton/") and "LAUNCHERKEY" not in n}
    assert kept == {"json", "cubin"}, names  # no ttir / ttgir / llir / ptx / source
    second, cuda2 = tmp_path / "second", tmp_path / "cuda2"
    def variant(folder):  # a compiled variant's files as the summary counts them (a folder with a cubin)
        (second / folder).mkdir(parents=True)
        (second / folder / "_k.cubin").write_bytes(b"\x7fELF")
    variant("BEFORE")  # there before the unpack: not carried
    r = tc.unpack(str(archive), str(second), str(cuda2))
    assert r["compatible"] and (r["kernels"], r["modules"], r["cuda_modules"], r["present"]) == (1, 1, 1, 0)
    assert (cuda2 / "rnn-0123.cubin").read_bytes() == b"\x7fELF cubin"
    assert (second / "LAUNCHERKEY" / "__triton_launcher.cpython-312-x86_64-linux-gnu.so").read_bytes() == b"\x7fELF so"
    (grp,) = [g for g in second.glob("*/__grp__*.json") if (g.parent / (g.name[len("__grp__"):])).exists()]
    assert all(os.path.isfile(p) and p.startswith(str(second)) for p in json.loads(grp.read_text())["child_paths"].values())
    cubin = next(grp.parent.glob("*.cubin"))
    assert int(cubin.stat().st_mtime) == int(next((first / grp.parent.name).glob("*.cubin")).stat().st_mtime)
    assert {k: tc.summary(str(second))[k] for k in ("variants", "carried", "compiled_here")} == \
        {"variants": 2, "carried": 1, "compiled_here": 0}
    # served: a hit, the same cubin, no IR; then what reads the IR (compile_spec: registers, the
    # PTX's divisions) compiles the carried entry again
    served, row = _compile(second, "c0", "s0")
    assert served["hits"] == [True] and served["cubin"] == built["cubin"] and not served["ptx"]
    assert row["hits"] == [True, False] and row["approx_div_f32"] == 0 and row["registers"] > 0
    variant("AFTER")  # compiled after the unpack
    assert {k: tc.summary(str(second))[k] for k in ("variants", "carried", "compiled_here")} == \
        {"variants": 3, "carried": 1, "compiled_here": 1}
    # unpacked again: nothing written, the entries counted as there
    assert tc.unpack(str(archive), str(second), str(cuda2))["present"] == 3
    # another Triton build's archive: its Triton entries are skipped, its CUDA C ones kept
    other = tmp_path / "other.tar.xz"
    with tarfile.open(archive) as src, tarfile.open(other, "w:xz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "STAMP.json":
                data = json.dumps(dict(stamp, triton_key="0" * 24)).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    third = tmp_path / "third"
    r = tc.unpack(str(other), str(third), str(tmp_path / "cuda3"))
    assert not r["compatible"] and r["kernels"] == 0 and r["skipped"] > 0 and r["cuda_modules"] == 1
    assert not third.exists() or not any(third.iterdir())
    # a size limit below what the entries take: they are left out, and counted
    small = tc.pack(str(tmp_path / "small.tar.xz"), str(first), str(cuda), max_mib=0.5)
    assert small.get("kernels", 0) == 0 and small["kernels_left_out"] == 1 and small["cuda_modules_left_out"] == 1
    # an archive cut short, or one pack did not write, is refused with a message
    cut = tmp_path / "cut.tar.xz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    foreign = tmp_path / "foreign.tar.xz"
    with tarfile.open(foreign, "w:xz") as tar:
        tar.addfile(tarfile.TarInfo("triton/x/y.cubin"), io.BytesIO(b""))
    for bad in (cut, foreign):
        assert tc.main(["unpack", str(bad), "--cache", str(tmp_path / "fourth")]) == 1
    assert not (tmp_path / "fourth").exists() or not any((tmp_path / "fourth").iterdir())


def test_gpu_run_unpacks_a_carried_cache_and_packs_one_for_the_next_run(tmp_path):
    """gpu_run.sh with a carried archive (GPU_NN_CARRIED_CACHE): unpacked after install, before
    any kernel runs, and said in the summary; with GPU_NN_PACK_CACHE the caches are packed after
    the record step, outside the run folder; without an archive the summary says that nothing was
    carried (a fresh machine's figures)."""
    from helpers import run_bench_script

    archive = tmp_path / "carried.tar.xz"
    archive.write_bytes(b"x")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_NN_TUNE", "GPU_NN_CARRIED", "GPU_NN_PACK"))}
    packed = tmp_path / "packed.tar.xz"
    r, out, calls = run_bench_script(
        tmp_path, "gpu_run.sh",
        'case "$*" in *"triton_cache unpack"*) echo "carried cache x: 5 kernels unpacked";; '
        '*"triton_cache pack"*) echo "packed 7 kernels";; esac\nexit 0\n',
        {**env, "GPU_NN_CARRIED_CACHE": str(archive), "GPU_NN_PACK_CACHE": str(packed)})
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    steps = [line.split(":")[0] for line in summary.splitlines() if not line.startswith(" ")]
    assert steps == ["install", "cache", "info", "check", "bench", "pytest", "record", "total"], summary
    assert "cache: carried cache x: 5 kernels unpacked" in summary and "cache: rc=0 packed 7 kernels" in summary
    names = [c.removeprefix("-m ") for c in calls]
    assert names.index(f"gpu_nn.benchmarks.triton_cache unpack {archive}") < \
        min(i for i, c in enumerate(names) if c.startswith("gpu_nn.cli"))
    assert names[-1] == f"gpu_nn.benchmarks.triton_cache pack {packed} --max-s 25"
    (tmp_path / "bare").mkdir()
    r, out, calls = run_bench_script(tmp_path / "bare", "gpu_run.sh", "exit 0\n",
                                     {**env, "GPU_NN_CARRIED_CACHE": str(tmp_path / "absent.tar.xz")})
    summary = (out / "summary.txt").read_text()
    assert "cache: none carried" in summary and not any("triton_cache unpack" in c or "triton_cache pack" in c
                                                        for c in calls)


def test_gpu_measure_unpacks_a_carried_cache_and_packs_within_its_budget(tmp_path):
    """gpu_measure.sh (after gpu_run.sh on the same machine): the carried archive is unpacked
    before its first measurement, GPU_NN_PACK_CACHE packs the caches as its last call, and the
    40 s the pack is given come out of GPU_MEASURE_BUDGET_S (the steps' limits shrink with it)."""
    from helpers import run_bench_script

    archive = tmp_path / "carried.tar.xz"
    archive.write_bytes(b"x")
    packed = tmp_path / "packed.tar.xz"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_NN_TUNE", "GPU_NN_CARRIED", "GPU_NN_PACK",
                                                                    "GPU_MEASURE"))}
    r, out, calls = run_bench_script(tmp_path, "gpu_measure.sh", "exit 0\n",
                                     {**env, "GPU_NN_CARRIED_CACHE": str(archive), "GPU_NN_PACK_CACHE": str(packed)})
    names = [c.removeprefix("-m ") for c in calls]
    unpack = names.index(f"gpu_nn.benchmarks.triton_cache unpack {archive}")
    assert unpack < min(i for i, c in enumerate(names) if "tma_fwd_repeat" in c or "sweep" in c), names
    assert names[-1] == f"gpu_nn.benchmarks.triton_cache pack {packed} --max-s 25"
    assert "cache: rc=0" in (out / "summary.txt").read_text()
    limits = {}
    for name, extra in (("plain", {}), ("packing", {"GPU_NN_PACK_CACHE": str(packed)})):
        (tmp_path / name).mkdir()
        r, out, calls = run_bench_script(tmp_path / name, "gpu_measure.sh", "exit 0\n",
                                         {**env, "GPU_NN_CARRIED_CACHE": "none", "GPU_MEASURE_BUDGET_S": "60", **extra})
        limits[name] = (out / "tma-repeat.log").read_text().split("(limit ")[1].split("s)")[0]
        assert any(c.endswith(f"pack {packed} --max-s 25") for c in calls) == bool(extra)
    # 60 s: the first step gets its 45; with the pack's 40 kept, what 20 s leave less the kill's
    # 10 and the whole seconds bash's SECONDS has counted since the start (a second boundary
    # crossed in a few milliseconds: 9; a loaded machine, 8; this read 10 only, and failed so)
    assert limits["plain"] == "45" and limits["packing"] in ("10", "9", "8"), limits


def test_saved_bytes_counts_what_the_forward_adds_and_every_case_runs(tmp_path):
    """benchmarks/saved_bytes (the README's figures of what the recurrent layers keep for the
    backward): a Linear saves only its input and weight, which the caller holds (0 bytes); a ReLU
    after it adds its output (5 x 3 float32 = 60 bytes); every case runs on both sides and the
    JSON holds its rows."""
    from gpu_nn.benchmarks import saved_bytes

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    assert saved_bytes.saved_bytes(lin, x, None) == 0
    assert saved_bytes.saved_bytes(torch.nn.Sequential(lin, torch.nn.ReLU()), x, None) == 60
    out = tmp_path / "saved.json"
    assert saved_bytes.main(["--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == [c[0] for c in saved_bytes.CASES]
    assert all(r["ours_bytes"] > 0 and (r["torch_bytes"] or 0) > 0 for r in rows)


def test_gpu_bench_lets_cudnn_measure_where_ours_measures(monkeypatch):
    """gpu-nn bench on a GPU: with our tuning on, torch's cuDNN benchmarks its algorithms too
    (both sides measured); with GPU_NN_TUNE=0 both keep their heuristics; bench.json says which."""
    import torch

    from gpu_nn.benchmarks import suite

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setenv("GPU_NN_TUNE", "0")
    assert suite.tuned_configurations(torch) == {"ours_measured_configurations": False, "torch_cudnn_benchmark": False}
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.delenv("GPU_NN_TUNE")
    assert suite.tuned_configurations(torch) == {"ours_measured_configurations": True, "torch_cudnn_benchmark": True}
    assert torch.backends.cudnn.benchmark is True


def test_func_family_times_the_same_computation_on_both_sides(monkeypatch):
    """bench_func's cases (torch.func workloads: per-sample gradients, an LSTM's among them both
    ways, vmap(hessian), a Hessian-vector product, jacfwd of an LSTM, an MLP and a CNN ensemble's
    training step) run on our layers and compute
    what torch's layers compute (small batches here), so the ratios compare like with like; torch's LSTM may have no
    forward-mode AD (its oneDNN CPU path, mkldnn_rnn_layer, has none), ours does. Named only (--family func), not in
    the default families."""
    from gpu_nn.benchmarks import bench_func, suite

    assert "func" not in suite.FAMILIES and "func" in suite.EXTRA_FAMILIES
    monkeypatch.setattr(bench_func, "CASES", tuple((k, w, 3, 3) for k, w, _, _ in bench_func.CASES))
    cases = bench_func.cases("cpu", quick=True)
    assert [c.name for c in cases] == ["per-sample mlp", "per-sample cnn", "per-sample lstm", "vmap-hessian pinn",
                                       "hvp mlp", "jacfwd lstm", "ensemble mlp", "ensemble cnn"]
    # a GPU's quick run (gpu_measure.sh's func step): the per-sample gradients and the MLP ensemble
    assert [c.name for c in bench_func.cases("cuda", quick=True)] == ["per-sample mlp", "per-sample cnn",
                                                                      "per-sample lstm", "ensemble mlp"]
    for case in cases:
        ours = case.providers["reference"]()()
        assert torch.utils._pytree.tree_leaves(ours)
        if case.name == "per-sample lstm":  # the composition under vmap (opt-in) computes the same, folded
            from helpers import count_loops

            loops = count_loops(monkeypatch)
            torch.testing.assert_close(case.providers["reference-compose"]()(), ours)
            assert loops == []
            case.providers["reference"]()()
            assert loops  # (the fused op, once per sample)
        try:
            theirs = case.providers["torch"]()()
        except NotImplementedError as exc:  # torch's CPU LSTM (oneDNN): "Trying to use forward AD with ..."
            assert case.name == "jacfwd lstm" and "forward AD" in str(exc)
            continue
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=case.name)
