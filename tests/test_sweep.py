"""``gpu_nn.benchmarks.sweep`` and ``benchmarks/gpu_measure.sh`` on the CPU: the configuration
grids, the runner's rows, JSON and time budget on fake timings, every configuration's launch
(through the Triton interpreter here) checked against torch, the profile summariser on fake
events, and the measuring script's steps with a stand-in python."""

import json
import os
import pathlib
import tarfile
import types

import pytest
import torch

from gpu_nn.benchmarks import kernel_counts, sweep
from helpers import run_bench_script


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_grids_put_the_default_first_and_give_every_thread_work():
    from gpu_nn.kernels.triton import activation as ka, optim as ko, pool as kp

    act = sweep.activation_grid()
    assert act[0] == {"BLOCK": ka.block_size(1, False)[0], "num_warps": ka.block_size(1, False)[1]}
    assert len(act) == 15 and len({tuple(c.values()) for c in act}) == 15
    assert {c["BLOCK"] for c in act} == {1024, 2048, 4096, 8192, 16384} and {c["num_warps"] for c in act} == {4, 8, 16}
    pool = sweep.pool_grid()
    assert tuple(pool[0].values()) == kp.launch_config(False)
    assert {"BLOCK": 128, "num_warps": 8} not in pool and {"BLOCK": 128, "num_warps": 4} in pool
    assert all(c["BLOCK"] >= 32 * c["num_warps"] for c in pool) and len(pool) == 14
    opt = sweep.optim_grid()
    assert tuple(opt[0].values()) == ko.config(False) and list(opt[0]) == ["BLOCK", "ITERS", "num_warps"]
    assert len(opt) == 24 and len({tuple(c.values()) for c in opt}) == 24
    # a default outside the axes is kept, first
    assert sweep.grid({"BLOCK": 3, "num_warps": 1}, BLOCK=(64,), num_warps=(1, 2, 4)) == [
        {"BLOCK": 3, "num_warps": 1}, {"BLOCK": 64, "num_warps": 1}, {"BLOCK": 64, "num_warps": 2}]


def test_compare_flags_wrong_and_unwritten_outputs():
    ref = torch.randn(5, 7)
    assert sweep.compare(ref.clone(), ref) == (True, 0.0)
    off = ref.clone()
    off[2, 3] += 1e-2
    ok, err = sweep.compare(off, ref)
    assert not ok and err == pytest.approx(1e-2, rel=1e-3)
    poisoned = ref.clone()
    poisoned[0, 0] = float("nan")  # an element the kernel never wrote
    assert sweep.compare(poisoned, ref) == (False, "nan")
    idx = torch.arange(6)
    assert sweep.compare(idx, idx.clone())[0] and not sweep.compare(idx, idx.flip(0))[0]
    assert not sweep.compare(ref[:4], ref)[0]
    assert sweep._all_ok((True, 1e-7), (False, 3.0)) == (False, 3.0)
    assert sweep._all_ok((True, 1e-7), (False, "nan")) == (False, "nan")


# the groups' tensors: CPU ones run the kernels under the interpreter (CI), a GPU machine's CUDA
# ones compiled (Triton takes no CPU tensor there)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _groups(f32, configs_act, configs_pool, configs_adam, tiles=()):
    return (sweep.activation_groups(["relu", "tanh"], [(3, 5, 7)], [f32], DEV, configs=configs_act)
            + sweep.pool_groups([f32], shape=(1, 2, 9, 11), device=DEV, configs=configs_pool, tile_configs=list(tiles))
            + sweep.adam_groups([f32], sizes=[1000, 37, 2100], device=DEV, configs=configs_adam))


def test_every_configuration_reaches_the_launch_and_matches_torch(tmp_path, monkeypatch):
    """The real groups on tiny tensors (CPU ones under the interpreter; a GPU's): each configuration's BLOCK,
    num_warps (and ITERS) reach the kernel launch, and every output matches torch's."""
    from gpu_nn.kernels.triton import activation as ka, optim as ko, pool as kp

    launched = []
    for mod in (ka, kp, ko):
        real = mod.launch_kernel

        def spy(kernel, grid, *args, _real=real, **kw):
            launched.append((getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)), grid,
                             {k: kw[k] for k in ("BLOCK", "ITERS", "BH", "BW", "num_warps") if k in kw}))
            return _real(kernel, grid, *args, **kw)
        monkeypatch.setattr(mod, "launch_kernel", spy)

    act = [{"BLOCK": 1024, "num_warps": 4}, {"BLOCK": 32, "num_warps": 1}]
    pool = [{"BLOCK": 128, "num_warps": 4}, {"BLOCK": 64, "num_warps": 2}]
    tiles = [{"BH": 2, "BW": 8, "num_warps": 1}, {"BH": 4, "BW": 4, "num_warps": 1}]
    adam = [{"BLOCK": 512, "ITERS": 1, "num_warps": 4}, {"BLOCK": 256, "ITERS": 4, "num_warps": 2}]
    groups = _groups(torch.float32, act, pool, adam, tiles)

    def bench(fn):
        fn()
        return 2e-6

    doc = sweep.run_sweep(groups, str(tmp_path / "sweep.json"), 1e9, bench=bench, log=lambda s: None)
    assert doc["status"] == "complete"
    rows = doc["rows"]
    assert len(rows) == 2 * (4 + 4 + 4 + 1) and all("error" not in r for r in rows), rows
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    for r in rows:
        assert r["us"] == pytest.approx(2.0) and r["gbps"] == pytest.approx(r["bytes"] / 2e-6 / 1e9)
    # each row's launches (check + timed run) carried its configuration, with a grid to match
    seen = {}
    for name, grid, kw in launched:
        seen.setdefault(name, set()).add((tuple(sorted(kw.items())), grid))
    assert {(("BLOCK", 32), ("num_warps", 1)), (("BLOCK", 1024), ("num_warps", 4))} == {k for k, _ in seen["_act_fwd_kernel"]}
    assert (((("BLOCK", 32), ("num_warps", 1)), (4,))) in seen["_act_bwd_kernel"]  # 105 elements
    assert ((("BLOCK", 64), ("num_warps", 2)), (1,)) in seen["_max_pool_fwd_kernel"]  # 1*2*5*6 outputs
    assert ((("BLOCK", 64), ("num_warps", 2)), (4,)) in seen["_avg_pool_bwd_kernel"]  # 198 inputs
    # the tiled groups: 2 planes of 5x6 outputs (9x11 inputs) in 2x8 / 4x4 tiles (the pool shape
    # is small because the interpreter's cost is per program: 30 s alone with 6 planes, 12 s with 2)
    assert {(("BH", 2), ("BW", 8), ("num_warps", 1)), (("BH", 4), ("BW", 4), ("num_warps", 1))} == {
        k for k, _ in seen["_max_pool_fwd_tile_kernel"]}
    assert ((("BH", 2), ("BW", 8), ("num_warps", 1)), (2 * 3 * 1,)) in seen["_max_pool_fwd_tile_kernel"]
    assert ((("BH", 4), ("BW", 4), ("num_warps", 1)), (2 * 3 * 3,)) in seen["_avg_pool_bwd_tile_kernel"]
    # chunks of BLOCK * ITERS: 1000, 37, 2100 elements -> 2 + 1 + 5 (512) or 1 + 1 + 3 (1024)
    assert {g for _, g in seen["_adam_kernel"]} == {(8,), (5,)}
    assert {k for k, _ in seen["_adam_kernel"]} == {(("BLOCK", 512), ("ITERS", 1), ("num_warps", 4)),
                                                    (("BLOCK", 256), ("ITERS", 4), ("num_warps", 2))}
    on_disk = json.loads((tmp_path / "sweep.json").read_text())
    assert on_disk["status"] == "complete" and len(on_disk["rows"]) == len(rows)
    assert [b["op"] for b in on_disk["best"]][:2] == ["relu fwd", "relu bwd"]


def _fake_group(name, configs, bytes_=1e6, wrong=(), fail=(), setup_error=None, calls=None):
    def setup(cfgs):
        if setup_error:
            raise RuntimeError(setup_error)

        def run(cfg):
            if calls is not None:
                calls.append((name, cfg["BLOCK"]))

        def check(cfg):
            if cfg["BLOCK"] in fail:
                raise RuntimeError("out of resources: shared memory")
            return (cfg["BLOCK"] not in wrong), 0.5 if cfg["BLOCK"] in wrong else 0.0
        return run, check
    return sweep.Group(f"_{name}_kernel", name, "float32", "8x8", bytes_, [{"BLOCK": b, "num_warps": 4} for b in configs], setup)


def test_runner_writes_every_row_keeps_errors_and_stops_at_the_budget(tmp_path):
    """Fake timings on a fake clock: each timed config costs 10 s; a budget of 45 s stops the
    sweep cleanly after the fifth row (no new row once 45 s have passed), and sweep.json on disk
    grew by one row per timed configuration, so a kill keeps everything measured."""
    clock = Clock()
    path = tmp_path / "sweep.json"
    times = {1024: 100e-6, 2048: 50e-6, 4096: 20e-6, 8192: 80e-6}
    seen_on_disk = []
    calls = []
    cleanups = []

    def bench(fn):
        fn()
        seen_on_disk.append(len(json.loads(path.read_text())["rows"]) if path.exists() else 0)
        clock.now += 10
        return times[calls[-1][1]]

    groups = [_fake_group("a", [1024, 2048, 4096], wrong=(4096,), calls=calls),
              _fake_group("b", [1024], setup_error="no such kernel"),
              _fake_group("c", [1024, 8192, 2048, 4096], fail=(8192,), calls=calls),
              _fake_group("d", [1024], calls=calls)]
    doc = sweep.run_sweep(groups, str(path), 45, bench=bench, clock=clock, cleanup=lambda: cleanups.append(1),
                          log=lambda s: None)
    rows = doc["rows"]
    assert [(r["op"], r.get("config", {}).get("BLOCK")) for r in rows] == [
        ("a", 1024), ("a", 2048), ("a", 4096), ("b", None), ("c", 1024), ("c", 8192), ("c", 2048)]
    assert seen_on_disk == [0, 1, 2, 4, 6]  # the file before each timing: every earlier row already there
    assert rows[3]["error"] == "setup: RuntimeError: no such kernel"
    assert "out of resources" in rows[5]["error"] and "us" not in rows[5]
    assert rows[0]["default"] and not rows[1]["default"] and rows[4]["default"]
    assert rows[1]["us"] == pytest.approx(50) and rows[1]["gbps"] == pytest.approx(1e6 / 50e-6 / 1e9)
    assert rows[2]["correct"] is False and rows[2]["max_err"] == 0.5
    assert doc["status"].startswith("budget: stopped after 50.0 s of 45 s, at group 3/4 config 4")
    assert doc["not_measured"] == ["c float32 8x8 (from config 4)", "d float32 8x8"]
    assert len(cleanups) == 2  # after each group that was set up, the one cut short included
    on_disk = json.loads(path.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(rows)) and on_disk["status"] == doc["status"]
    assert on_disk["environment"]["torch"] == torch.__version__
    # best: a's fastest *correct* config is 2048 (4096 is faster but wrong)
    a, c = on_disk["best"]
    assert a["best_config"] == {"BLOCK": 2048, "num_warps": 4} and a["speedup"] == pytest.approx(2.0) and a["wrong"] == 1
    assert c["best_config"]["BLOCK"] == 2048 and c["configs"] == 2  # 8192 failed
    text = sweep.format_best(on_disk["best"])
    assert "a | float32 | 8x8 | 100.0 (10) | 50.0 (20) | BLOCK=2048 num_warps=4 | 2.00 | 1" in text


def test_runner_with_no_budget_measures_nothing_and_says_so(tmp_path):
    doc = sweep.run_sweep([_fake_group("a", [1024])], str(tmp_path / "s.json"), 0, bench=lambda fn: 1.0,
                          clock=Clock(), log=lambda s: None)
    assert doc["rows"] == [] and doc["status"].startswith("budget") and doc["not_measured"] == ["a float32 8x8"]


def _ev(name, start, end, device=True):
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return types.SimpleNamespace(name=name, device_type=kind, time_range=types.SimpleNamespace(start=start, end=end))


def test_profile_summary_counts_kernels_busy_time_and_gaps():
    annotation = _ev("Optimizer.step#Adam.step", 50, 450)
    annotation.is_user_annotation = True  # a record_function range on the GPU timeline: not GPU work
    raw = [_ev("aten::relu", 0, 500, device=False), _ev("copy_kernel", 300, 340), _ev("relu_kernel", 100, 200),
           _ev("relu_kernel", 150, 260), _ev("Memset (Device)", 400, 401), annotation]
    events = kernel_counts.gpu_events(raw)
    assert [e["name"] for e in events] == ["relu_kernel", "relu_kernel", "copy_kernel", "Memset (Device)"]
    assert events[0] == {"name": "relu_kernel", "start_us": 100.0, "dur_us": 100.0}
    s = sweep.summarise(events)
    # busy = [100, 260] + [300, 340] + [400, 401] (the two relu kernels overlap); span 100..401
    assert s["busy_us"] == pytest.approx(201) and s["span_us"] == pytest.approx(301) and s["idle_us"] == pytest.approx(100)
    assert s["total_us"] == pytest.approx(251) and s["events"] == 4
    assert s["kernels"] == [{"name": "relu_kernel", "count": 2, "total_us": 210.0},
                            {"name": "copy_kernel", "count": 1, "total_us": 40.0},
                            {"name": "Memset (Device)", "count": 1, "total_us": 1.0}]
    assert sweep.summarise([])["kernels"] == []
    rec = {"op": "relu fwd+bwd", "shape": "8x8 float32", "provider": "triton", "wall_us": 436.2,
           "profiled_wall_us": 612.0, "summary": s}
    text = sweep.format_profile([rec, {"op": "relu fwd+bwd", "shape": "8x8 float32", "provider": "cupy",
                                       "skipped": "not implemented"}], name_width=12)
    lines = text.splitlines()
    assert lines[0] == ("relu fwd+bwd 8x8 float32 [triton]: wall 436 us (profiled 612); GPU busy 201 us of a "
                        "301 us span (idle 100); 4 events")
    assert lines[1].split() == ["relu_kernel", "2", "210.0"]
    assert lines[3] == "    Memset (D...     1        1.0"  # names cut to the width
    assert lines[4] == "relu fwd+bwd 8x8 float32 [cupy]: not implemented"


def test_profile_runner_records_skips_errors_and_the_budget(tmp_path):
    from gpu_nn._errors import BackendUnavailableError

    clock = Clock()

    def fake_profile(setup):
        clock.now += 30
        return setup()

    def ok():
        return {"wall_us": 10.0, "profiled_wall_us": 12.0, "events": [], "cpu_top": [],
                "summary": sweep.summarise([{"name": "k", "start_us": 0.0, "dur_us": 5.0}])}

    def lacks():
        raise BackendUnavailableError("max_pool2d has no cupy kernel here")

    def broken():
        raise RuntimeError("boom")

    cases = [("relu fwd+bwd", "s", {"torch": ok, "cupy": lacks}), ("pool", "s", {"triton": broken, "torch": ok})]
    recs = sweep.run_profile(cases, str(tmp_path), 70, profile=fake_profile, clock=clock, log=lambda s: None)
    assert [r["provider"] for r in recs] == ["torch", "cupy", "triton", "torch"]
    assert recs[0]["summary"]["busy_us"] == 5.0
    assert recs[1]["skipped"].startswith("not implemented: max_pool2d")
    assert recs[2]["error"] == "RuntimeError: boom"
    assert recs[3]["skipped"] == "budget of 70 s spent" and "summary" not in recs[3]
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["status"] == "complete" and len(doc["records"]) == 4
    assert (tmp_path / "profile.txt").read_text().startswith("relu fwd+bwd s [torch]: wall 10 us")


def test_without_a_gpu_the_command_says_so_and_succeeds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sweep.main(["--out", str(tmp_path / "o"), "--budget-s", "5"]) == 0
    assert "no GPU" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def _measure(tmp_path, budget, import_ok=True):
    env = {**os.environ, "GPU_MEASURE_BUDGET_S": str(budget)}
    env.pop("GPU_MEASURE_SWEEP_S", None)
    env.pop("GPU_MEASURE_REST_S", None)
    return run_bench_script(
        tmp_path, "gpu_measure.sh",
        ("" if import_ok else 'case "$*" in "-c import gpu_nn") exit 1;; esac\n')
        + 'case "$*" in *"--only sweep"*) echo "relu fwd float32 8x8 BLOCK=1024 num_warps=4: 1.0 us 9 GB/s ok";'
        ' echo "sweep: 191 rows, complete";; esac\n'
        'case "$*" in *"--only rnn"*) echo "rnn: 240 rows, complete; profile: 9 of 9 regions";; esac\n'
        'case "$*" in *"--only profile"*) echo "profile: 20 of 22 (op, provider) regions profiled, 1 errors"; exit 3;; esac\n'
        'case "$*" in *"--only demo"*) echo "demo profile: 6 of 6 regions profiled, 0 errors";; esac\n'
        "exit 0\n", env)


def _budget(calls, part):
    (call,) = [c for c in calls if f"--only {part}" in c]
    assert call.startswith("-m gpu_nn.benchmarks.sweep --out ") and f"--only {part} --budget-s " in call
    return int(call.split()[-1])


def test_gpu_measure_script_steps_summary_and_archive(tmp_path):
    """benchmarks/gpu_measure.sh with a stand-in python: the steps run in order, the two sweeps
    share what the profile and the demo's two steps leave (in proportion to their wants: 150 + 25
    and 120 + 25 s), each step's result line reaches summary.txt, a failed profile fails the
    script, and everything lands in one archive beside OUTDIR."""
    r, out, calls = _measure(tmp_path, 300)
    assert r.returncode == 1, r.stdout + r.stderr  # the profile failed
    summary = (out / "summary.txt").read_text()
    steps = [line.split(":")[0] for line in summary.splitlines() if not line.startswith(" ")]
    assert steps == ["tma-repeat", "sweep", "rnn", "profile", "demo", "demo-profile", "demo-compile",
                     "demo-compile-rnn-gru", "demo-compile-rnn-lstm", "demo-fuse",
                     "host_split", "kernel_counts", "func", "demo-persistent-lstm", "demo-persistent-gru", "total"]
    assert "  sweep: 191 rows, complete" in summary and "  profile: 20 of 22" in summary
    assert "  demo profile: 6 of 6 regions profiled" in summary
    (demo_call,) = [c for c in calls if "--only demo" in c]
    assert demo_call.endswith("--only demo --profile-budget-s 20")
    assert "  rnn: 240 rows, complete" in summary
    assert "profile: rc=3" in summary and "total:" in summary and "sweep rc=0, rnn rc=0, profile rc=3" in summary
    # machine.txt's package list first, then: installed already, so no pip install
    assert calls[:4] == ["--version", "-m pip list --format=freeze", "-c import gpu_nn",
                         f"-m gpu_nn.benchmarks.tma_fwd_repeat --repeats 10 --out {out}"]
    # 300 - 60 (profile) - 75 (the demo and its profile) = 165 s of limits: 90 and 75, less 25 s
    # each for the process
    sw, rnn = _budget(calls, "sweep"), _budget(calls, "rnn")
    assert 62 <= sw <= 65 and 48 <= rnn <= 51 and sw + rnn + 2 * 25 + 60 + 75 <= 300
    (profile_call,) = [c for c in calls if "--only profile" in c]
    assert profile_call.endswith("--profile-budget-s 40")
    assert f"-m gpu_nn.benchmarks.kernel_counts --out {out}/counts.json" in calls
    assert f"-m gpu_nn.benchmarks.host_split --json {out}/host_split.json" in calls
    assert f"-m gpu_nn.cli bench --family func --quick --out {out}/func --no-progress" in calls
    demo = [c for c in calls if c.startswith("-m gpu_nn.cli demo ")]
    assert demo[0] == f"-m gpu_nn.cli demo --epochs 3 --json {out}/demo.json --no-progress"
    assert demo[1] == f"-m gpu_nn.cli demo --epochs 3 --compile --json {out}/demo-compile.json --no-progress"
    for m, call in zip(("gru", "lstm"), demo[2:4]):
        assert call == (f"-m gpu_nn.cli demo --model {m} --epochs 3 --compile --compile-rnn "
                        f"--json {out}/demo-compile-rnn-{m}.json --no-progress")
    assert demo[4] == f"-m gpu_nn.cli demo --model cnn --epochs 3 --fuse --json {out}/demo-fuse.json --no-progress"
    for m, call in zip(("lstm", "gru"), demo[5:]):
        assert call == (f"-m gpu_nn.cli demo --model {m} --epochs 3 --backend triton --json {out}/demo-persistent-{m}.json"
                        " --no-progress")
    with tarfile.open(str(out) + ".tgz") as tar:
        names = tar.getnames()
    for f in ("summary.txt", "machine.txt", "sweep.log", "rnn.log", "profile.log", "kernel_counts.log", "demo.log"):
        assert f"out/{f}" in names
    # a budget that holds both: each sweep gets all it wants
    (tmp_path / "big").mkdir()
    _, _, calls = _measure(tmp_path / "big", 1000)
    assert (_budget(calls, "sweep"), _budget(calls, "rnn")) == (150, 120)
    # one that leaves a sweep under 10 s of measuring skips it (its start-up would buy no row):
    # 180 - 60 - 75 = 45 s of limits, 24 and 21, less 25 each
    (tmp_path / "small").mkdir()
    _, out, calls = _measure(tmp_path / "small", 180)
    summary = (out / "summary.txt").read_text()
    assert "sweep: skipped (a measuring budget of 0s, under 10: about" in summary
    assert "rnn: skipped (a measuring budget of 0s, under 10: about" in summary
    assert not any("--only sweep" in c or "--only rnn" in c for c in calls) and any("--only profile" in c for c in calls)


def test_gpu_measure_script_installs_when_needed_and_skips_what_the_budget_cannot_hold(tmp_path):
    r, out, calls = _measure(tmp_path, 3, import_ok=False)
    summary = (out / "summary.txt").read_text()
    assert "install: skipped (no time left of 3s)" in summary and "tma-repeat: skipped" in summary
    assert "sweep: skipped" in summary and "rnn: skipped" in summary and "profile: skipped" in summary
    assert "demo-compile: skipped" in summary and "demo-profile: skipped" in summary
    assert "demo-fuse: skipped" in summary
    assert not any("gpu_nn.benchmarks.sweep" in c for c in calls)
    assert r.returncode == 1  # nothing was measured
    assert (pathlib.Path(str(out) + ".tgz")).exists()


def test_gpu_measure_says_how_much_more_budget_a_skipped_sweep_needs(tmp_path, monkeypatch):
    """A sweep skipped for want of budget says how many seconds more of GPU_MEASURE_BUDGET_S
    would run it (the recipe's 230 s with the cache pack's 40 kept left the sweeps nothing on
    the H200 runs' step times: an audit of the GPU call, which the summary's bare "skipped" did
    not show); given that much more, it runs. One that asks for under 10 s of measuring
    (GPU_MEASURE_RNN_S=0) says so, whatever the budget."""
    import re

    (tmp_path / "short").mkdir()
    (tmp_path / "enough").mkdir()
    r, out, calls = _measure(tmp_path / "short", 190)
    summary = (out / "summary.txt").read_text()
    m = re.search(r"^sweep: skipped \(a measuring budget of \d+s, under 10: about (\d+)s more of "
                  r"GPU_MEASURE_BUDGET_S would run it\)$", summary, re.M)
    assert m and "rnn: skipped" in summary, summary
    more = int(m.group(1))
    assert 0 < more < 60
    r, out, calls = _measure(tmp_path / "enough", 190 + more + 2)  # (a second or two of the stand-in's steps)
    assert "sweep: skipped" not in (out / "summary.txt").read_text() and _budget(calls, "sweep") >= 10
    (tmp_path / "off").mkdir()
    monkeypatch.setenv("GPU_MEASURE_RNN_S", "0")
    r, out, calls = _measure(tmp_path / "off", 600)
    summary = (out / "summary.txt").read_text()
    assert "rnn: skipped (it asks for 0s of measuring, under 10)" in summary and "sweep: skipped" not in summary


def test_gpu_measure_runs_the_steps_asked_and_the_demos_on_the_heuristics(tmp_path, monkeypatch):
    """GPU_MEASURE_STEPS names the steps a call runs (the measurement call of a session split in
    two: the demo and its compiled twin, which came after a minute and more of TMA repeat and
    profile and were skipped at 230 s); the others say "not run", and the sweeps' shares keep
    nothing for a sweep, a profile or a demo not asked for. The demos run our heuristic configurations
    (GPU_NN_TUNE=0), as the bench and the twin's cuDNN do: tuning in the first epoch took the
    eager demo past its limit at a331102. An unknown step name runs nothing."""
    monkeypatch.setenv("GPU_MEASURE_STEPS", "demo demo-compile")
    env = {**os.environ, "GPU_MEASURE_BUDGET_S": "160"}
    r, out, calls = run_bench_script(tmp_path, "gpu_measure.sh", "exit 0\n", env,
                                     log_line='echo "$* [TUNE=${GPU_NN_TUNE:-}]"')
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    steps = [line.split(":")[0] for line in summary.splitlines() if not line.startswith(" ")]
    assert steps == ["tma-repeat", "sweep", "rnn", "profile", "demo", "demo-profile", "demo-compile", "demo-compile-rnn",
                     "demo-fuse", "host_split", "kernel_counts", "func", "demo-persistent", "total"]
    assert "tma-repeat: not run (GPU_MEASURE_STEPS=demo demo-compile)" in summary
    assert "demo: rc=0" in summary and "demo-compile: rc=0" in summary
    demo = [c for c in calls if c.startswith("-m gpu_nn.cli demo ")]
    assert demo == [f"-m gpu_nn.cli demo --epochs 3 --json {out}/demo.json --no-progress [TUNE=0]",
                    f"-m gpu_nn.cli demo --epochs 3 --compile --json {out}/demo-compile.json --no-progress [TUNE=0]"]
    assert not any("gpu_nn.benchmarks" in c for c in calls)
    # the default runs every step, the demos on the heuristics too
    monkeypatch.delenv("GPU_MEASURE_STEPS")
    (tmp_path / "all").mkdir()
    r, out, calls = run_bench_script(tmp_path / "all", "gpu_measure.sh", "exit 0\n",
                                     {**os.environ, "GPU_MEASURE_BUDGET_S": "600"},
                                     log_line='echo "$* [TUNE=${GPU_NN_TUNE:-}]"')
    demo = [c for c in calls if c.startswith("-m gpu_nn.cli demo ")]
    assert len(demo) == 7 and all(c.endswith("[TUNE=0]") for c in demo)
    assert "not run" not in (out / "summary.txt").read_text()
    assert any("--only sweep" in c for c in calls) and any("tma_fwd_repeat" in c for c in calls)
    # a sweep alone (names apart by any white space) gets all it wants: the other sweep, the
    # profile and the demo not asked for take no share
    monkeypatch.setenv("GPU_MEASURE_STEPS", "rnn\n\ttma-repeat")
    (tmp_path / "rnn").mkdir()
    r, out, calls = _measure(tmp_path / "rnn", 250)
    assert _budget(calls, "rnn") == 120 and not any("--only sweep" in c or "--only profile" in c for c in calls)
    assert "sweep: not run (GPU_MEASURE_STEPS=rnn tma-repeat)" in (out / "summary.txt").read_text()
    # a step name the script does not have: refused before any step runs, the archive made
    monkeypatch.setenv("GPU_MEASURE_STEPS", "demo demo-compiled")
    (tmp_path / "typo").mkdir()
    r, out, calls = run_bench_script(tmp_path / "typo", "gpu_measure.sh", "exit 0\n", {**os.environ})
    assert r.returncode == 2 and "unknown step 'demo-compiled'" in (out / "summary.txt").read_text()
    assert not any("gpu_nn" in c for c in calls if not c.startswith(("--version", "-m pip list")))
    assert pathlib.Path(str(out) + ".tgz").exists()


def test_gpu_measure_steps_keep_the_kills_grace_inside_the_budget(tmp_path):
    """Every step's limit leaves the 10 s its kill may add inside what is left of the budget, so
    the script ends within it and a device call's limit can sit just above the two budgets
    (the recipe has no outer timeout, which would lose the archive): with 40 s, the first
    step's 45 s limit becomes 30 s."""
    r, out, calls = _measure(tmp_path, 40)
    log = (out / "tma-repeat.log").read_text().splitlines()[0]
    assert log.startswith("== tma-repeat (limit 30s)") or log.startswith("== tma-repeat (limit 29s)"), log


# ------------------------------------------------------------------------------ recurrent part


def test_rnn_grids_keep_the_default_first_and_only_what_can_launch(monkeypatch):
    from gpu_nn.kernels.triton import dense as kd, rnn as krnn

    monkeypatch.delenv(krnn.RESIDENT_ENV, raising=False)

    keys = sweep.STEP_KEYS
    for B, H, mode, dot, bwd, n in ((64, 512, "lstm", 3, False, 51), (64, 512, "lstm", 2, False, 54),
                                    (64, 512, "lstm", 3, True, 54), (16, 512, "gru", 3, False, 27)):
        g = sweep.rnn_step_grid(B, H, mode, dot, bwd, min_programs=32 if B > 16 else 8)
        assert tuple(g[0][k] for k in keys) == krnn.step_blocks(B, H, mode, dot, bwd)
        assert len(g) == n and len({tuple(c.values()) for c in g}) == n
        gates = krnn.NGATES[krnn.MODE_CODES[mode]]
        for c in g[1:]:
            assert -(-B // c["BLOCK_B"]) * -(-H // c["BLOCK_H"]) >= (32 if B > 16 else 8)
            assert sweep.step_smem_bytes(c, gates, 4 if dot == 3 else 2, bwd) <= sweep.SMEM_LIMIT
    # the three float32 LSTM forward tiles of BLOCK_K 128 x BLOCK_H 64 need 272 KiB: left out
    assert {"BLOCK_B": 16, "BLOCK_H": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3} not in \
        sweep.rnn_step_grid(64, 512, "lstm", 3)
    # BLOCK_B never above the batch rounded up to 16, BLOCK_K never above H rounded up to 32
    assert {c["BLOCK_B"] for c in sweep.rnn_step_grid(4, 40, "lstm", 3)} == {16}
    assert {c["BLOCK_K"] for c in sweep.rnn_step_grid(4, 40, "lstm", 3)} == {32, 64}
    per = sweep.persist_grid()
    assert (16, per[0]["BLOCK_H"], per[0]["BLOCK_K"]) == krnn.PERSIST_BLOCKS and len(per) == 29
    # the product's form at the sweep's shapes (T=50 N=16 H=512, TF32 / bfloat16): W_hh resident
    assert krnn.resident_kp(512, 3, 32, 32) and krnn.resident_kp(512, 2, 32, 32)
    assert per[0]["num_warps"] == krnn.persist_launch("lstm", 3, False, 512)[0] and per[0]["resident"] == 1
    assert [c["resident"] for c in per] == [1, 1] + [0] * 27
    assert len({tuple(c.values()) for c in per}) == 29
    proj = sweep.proj_grid(torch.float32)
    first = proj[0]
    assert (first["impl"], first["BLOCK_M"], first["BLOCK_N"], first["BLOCK_K"], first["num_warps"],
            first["num_stages"]) == ("rnn", *krnn.matmul_blocks(6400, 2048, 3), krnn.MATMUL_STAGES)
    assert [c for c in proj if c["impl"] == "dense"] == [
        {"impl": "dense", **dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"), c))}
        for c in kd.matmul_candidates("fp32", "tf32")]
    assert proj[-1] == {"impl": "torch"}


def test_step_shared_memory_estimate_matches_ptxas():
    """``step_smem_bytes`` against the shared memory `gpu-nn sass` reported for sm_90 (Triton
    3.9): LSTM float32 (TF32) forward 16x16x32, 16x64x128 and 64x16x32 (4 and 2 warps) at three
    stages, backward 16x16x128; bfloat16 halves the W_hh tiles only."""
    c = lambda bb, bh, bk, s, w=4: dict(zip(sweep.STEP_KEYS, (bb, bh, bk, w, s)))  # noqa: E731
    assert sweep.step_smem_bytes(c(16, 16, 32, 3), 4, 4, False) == 20480
    assert sweep.step_smem_bytes(c(64, 16, 32, 3), 4, 4, False) == 49152
    assert sweep.step_smem_bytes(c(64, 16, 32, 3, 2), 4, 4, False) == 32768
    assert sweep.step_smem_bytes(c(16, 64, 128, 3), 4, 4, False) == 278528
    assert sweep.step_smem_bytes(c(16, 16, 128, 3), 4, 4, True) == 32768
    assert sweep.step_smem_bytes(c(16, 16, 32, 1), 4, 2, False) == 16 * 32 * (4 * 2 + 4)


def _row(op, cfg, us, correct=True, spills=0, shape="s"):
    return {"kernel": "k", "op": op, "dtype": "float32", "shape": shape, "config": cfg, "us": us, "correct": correct,
            "spills": spills}


def test_refining_groups_take_the_fastest_correct_unspilled_configurations(tmp_path):
    cfg = lambda b, s=3: {"BLOCK_H": b, "num_stages": s}  # noqa: E731
    rows = [_row("a", cfg(16), 5.0), _row("a", cfg(32), 2.0), _row("a", cfg(64), 1.0, correct=False),
            _row("a", cfg(128), 1.5, spills=8), _row("a", cfg(8), 3.0), _row("b", cfg(4), 0.1),
            _row("a", cfg(2), 0.5, shape="other")]
    assert sweep.top_configs(rows, "k", "a", "float32", "s", 2, cfg(16)) == [cfg(16), cfg(32), cfg(8)]
    assert sweep.top_configs(rows, "k", "a", "float32", "s", 9, cfg(16)) == [cfg(16), cfg(32), cfg(8)]
    staged = sweep._with_stages(rows, "k", "a", "float32", "s", cfg(16), fits=lambda c: c["num_stages"] < 4, k=1)
    assert staged == [cfg(16), cfg(32, 1), cfg(32, 2), cfg(32, 3)]
    # nothing measured yet (a cut first pass): the default at every depth
    assert sweep._with_stages([], "k", "a", "float32", "s", cfg(16), k=1) == [cfg(16, 3), cfg(16, 1), cfg(16, 2),
                                                                               cfg(16, 4)]
    # the runner resolves a group's configuration function with the rows measured before it
    seen = []

    def setup(configs):
        seen.append(list(configs))
        return (lambda c: None), (lambda c: (True, 0.0))

    first = sweep.Group("k", "a", "float32", "s", 1, [cfg(16), cfg(32)], setup)
    second = sweep.Group("k", "a", "float32", "s", 1,
                         lambda rows: sweep.top_configs(rows, "k", "a", "float32", "s", 1, cfg(16)), setup)
    times = iter([4e-6, 2e-6, 4e-6, 2e-6])
    doc = sweep.run_sweep([first, second], str(tmp_path / "r.json"), 1e9, bench=lambda fn: next(times),
                          log=lambda s: None)
    assert seen == [[cfg(16), cfg(32)], [cfg(16), cfg(32)]] and len(doc["rows"]) == 4
    assert [s["configs"] for s in doc["setups"]] == [2, 2]
    (b,) = doc["best"]
    assert b["best_config"] == cfg(32) and b["configs"] == 4 and b["spilled"] == 0


def test_rnn_groups_run_every_configuration_under_the_interpreter(tmp_path, monkeypatch):
    """The recurrent groups on tiny tensors (CPU ones under the interpreter; a GPU's): step forward / backward
    (LSTM, GRU, Elman), the persistent forward and the input projection; each configuration's
    tile, warps and stages reach the launch, every output matches the product's configuration
    (or, for the projection, a float64 product), ``reset`` runs before every timed batch, times
    are per launch, and a configuration whose output differs is flagged wrong."""
    from gpu_nn.kernels.triton import rnn as krnn

    f32 = torch.float32
    launched, kps = [], []
    real = krnn.launch_kernel

    def spy(kernel, grid, *args, **kw):
        launched.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), grid,
                         tuple(kw.get(k) for k in ("BLOCK_B", "BLOCK_H", "BLOCK_K", "num_warps", "num_stages"))))
        if "KP" in kw:
            kps.append(kw["KP"])
        out = real(kernel, grid, *args, **kw)
        if kw.get("num_warps") == 1:  # the sabotaged configuration below: its step writes a wrong h
            args[3].add_(1.0)
        return out
    monkeypatch.setattr(krnn, "launch_kernel", spy)

    d = dict(zip(sweep.STEP_KEYS, (16, 16, 32, 4, 3)))
    o = dict(zip(sweep.STEP_KEYS, (16, 32, 64, 2, 1)))
    bad = dict(zip(sweep.STEP_KEYS, (16, 16, 32, 1, 3)))
    per = [{"BLOCK_H": 16, "BLOCK_K": 32, "num_warps": 8, "resident": 1},
           {"BLOCK_H": 32, "BLOCK_K": 64, "num_warps": 4, "resident": 0}]
    monkeypatch.delenv(krnn.RESIDENT_ENV, raising=False)
    proj = [{"impl": "rnn", "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
            {"impl": "dense", "BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4, "num_warps": 4, "num_stages": 1},
            {"impl": "torch"}]
    groups = (sweep.step_groups(["lstm"], False, 3, 5, [f32], DEV, copies=2, configs=[d, o, bad])
              + sweep.step_groups(["gru"], False, 3, 5, [f32], DEV, copies=2, configs=[d, o])
              + sweep.step_groups(["lstm", "rnn_tanh", "gru"], True, 3, 5, [f32], DEV, copies=2, configs=[d, o])
              + sweep.persist_groups(["lstm"], 3, 5, [f32], DEV, copies=2, T=4, configs=per)
              + sweep.proj_groups([f32], M=7, K=5, N=20, device=DEV, configs=proj))
    resets = []

    def bench_reset(fn, reset):
        reset()
        resets.append(1)
        fn()
        return 4e-6

    def bench(fn):
        fn()
        return 2e-6

    doc = sweep.run_sweep(groups, str(tmp_path / "rnn.json"), 1e9, bench=bench, bench_reset=bench_reset,
                          log=lambda s: None)
    rows = doc["rows"]
    assert doc["status"] == "complete" and len(rows) == 3 + 2 + 6 + 2 + 3 and all("error" not in r for r in rows), rows
    wrong = [r for r in rows if not r["correct"]]
    assert [(r["op"], r["config"]) for r in wrong] == [("lstm step fwd", bad)]
    assert len(resets) == 3 + 2 + 6 + 2  # every timed batch of a group that updates in place
    for r in rows:
        assert r["us"] == pytest.approx(2.0)  # 4 us per batch of two launches; 2 us per projection call
    by_kernel = {}
    for name, grid, cfg in launched:
        by_kernel.setdefault(name, set()).add((grid, cfg))
    assert ((1, 1), (16, 32, 64, 2, 1)) in by_kernel["_rnn_step_fwd_kernel"]
    assert ((1, 1), (16, 16, 32, 4, 3)) in by_kernel["_rnn_step_bwd_kernel"]
    assert ((1, 1), (16, 32, 64, 2, 1)) in by_kernel["_rnn_step_bwd_kernel"]
    assert ((1,), (None, None, 32, 4, 1)) in by_kernel["_rnn_matmul_kernel"]
    # the persistent rows: W_hh resident (KP 16, H = 5 in one tile) and re-read (KP 0), each
    # checked against the product's tile re-reading it (the reference launch, KP 0, first)
    assert set(kps) == {0, 16} and kps[0] == 0
    best = {(b["op"]): b for b in doc["best"]}
    assert best["lstm step fwd"]["wrong"] == 1 and best["lstm persistent fwd"]["configs"] == 2
    # two candidates of ours and torch's addmm, the baseline (not one of ours: sweep.best)
    assert best["lstm input projection"]["configs"] == 2 and "torch_us" in best["lstm input projection"]


def test_rnn_groups_order_and_profile_cases():
    groups = sweep.rnn_groups("cpu")  # built, not set up: nothing runs
    first = groups[0]
    assert (first.kernel, first.op, first.dtype, first.shape) == ("_rnn_step_fwd_kernel", "lstm step fwd", "float32",
                                                                  "N=64 H=512 tf32")
    assert len(first.configs) == 51 and callable(groups[1].configs) and groups[1].shape == first.shape
    assert [g.op for g in groups[2:6]] == ["lstm step fwd", "lstm step fwd", "lstm persistent fwd", "lstm persistent fwd"]
    assert {g.op for g in groups} >= {"gru step fwd", "rnn step bwd", "lstm input projection", "gru persistent fwd"}
    assert all(g.launches == sweep.RNN_COPIES for g in groups if "step" in g.op)
    cases = sweep.rnn_profile_cases("cpu")
    assert [(op, shape) for op, shape, _ in cases] == [("lstm fwd", "T=100 N=64 I=512 H=512 float32"),
                                                       ("lstm fwd+bwd", "T=100 N=64 I=512 H=512 float32"),
                                                       ("lstm fwd", "T=100 N=64 I=512 H=512 bfloat16")]
    assert all(set(p) == {"torch", "triton", "cupy"} for _, _, p in cases)


def test_device_seconds_time_the_kernel_not_the_flush_nor_our_host_path(monkeypatch, tmp_path):
    """The sweep's timing: an L2 flush queued before every call (80 us on the device) and a host
    path slower than flush and kernel together (150 us against 80 + 30): do_bench's way, the
    events would time about 100 us, part of our host path (the H200 sweep at a331102: every
    channels_last conv tile 84-94 us); queued behind a sleep they time the 30 us kernel. The row
    keeps whether the calls were queued and the host's time per call."""
    import types as _types

    from helpers import FakeDevice

    dev = FakeDevice().install(monkeypatch)
    monkeypatch.setattr(sweep, "time", dev)
    monkeypatch.setattr(sweep, "_FLUSH", [_types.SimpleNamespace(zero_=lambda: dev.call(5e-6, 80e-6)())])
    s, said = sweep.device_seconds(dev.call(150e-6, 30e-6), reps=10)
    assert s == pytest.approx(30e-6) and said == {"queued": True, "host_us": pytest.approx(155.0)}
    doc = sweep.run_sweep([_fake_group("a", [1024])], str(tmp_path / "s.json"), 1e9,
                          bench=lambda fn: (2e-6, {"queued": False}), log=lambda s: None)
    assert doc["rows"][0]["us"] == pytest.approx(2.0) and doc["rows"][0]["queued"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_queued_seconds_resets_before_every_timed_call():
    x = torch.zeros(1 << 20, device="cuda")
    calls = []
    s = sweep.queued_seconds(lambda: x.add_(1), lambda: calls.append(1), reps=3)
    assert s > 0 and len(calls) == 4


CONV_TINY = [("conv2d 3x3", "N=1 C=16 5x6 O=16", dict(n=1, c=16, spatial=(5, 6), o=16, k=(3, 3), padding=1)),
             ("conv1d k3", "N=2 C=16 L=9 O=32", dict(n=2, c=16, spatial=(9,), o=32, k=(3,), stride=2)),
             ("conv1d depthwise", "N=1 C=4 L=9", dict(n=1, c=4, spatial=(9,), o=4, k=(3,), groups=4))]


def test_conv_rows_name_every_variant():
    """A row's config and the candidate tuple it came from convert both ways, for every kind of
    forward candidate (tiles, flat / split / packed K, via channels_last, the TMA forward)."""
    from gpu_nn.kernels.triton import conv as kt

    tile = kt.GPU_CONFIGS["half"]["large"]
    tma = kt.TMA_CONFIGS["half"]["tma8x16"]
    cands = [tile, (*tile, kt.FLAT), (*tile, kt.FLAT, kt.SPLIT), (*tile, kt.PACKED), (*tile, kt.VIA_CL),
             (*tile, kt.FLAT, kt.VIA_CL), (*tma, kt.TMA), (*tma, kt.TMA, kt.VIA_CL)]
    rows = [sweep.conv_config(c) for c in cands]
    assert [sweep._conv_tuple(r) for r in rows] == cands
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == len(cands)
    assert rows[6] == {"variant": "direct", "tma": True, "BH": 8, "BW": 16, "BLOCK_N": 128, "BLOCK_K": 64,
                       "num_warps": 8, "num_stages": 3}


def test_conv_section_times_every_candidate_and_torch(tmp_path):
    """The conv groups on tiny CPU problems (Triton interpreter, float16 and float32): each group
    holds the heuristic's configuration first, every candidate the measuring chooser would time
    (the via-channels_last variant for NCHW half problems, the NHWC tiles for channels_last
    ones) and torch last; every configuration's output matches torch's in float64; the best
    rows carry torch's time; depthwise has its own kernel's tiles (DW_FWD_CANDIDATES, the
    heuristic's DW_CONFIG first)."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import conv as kt

    if not ktriton.INTERPRET:
        pytest.skip("launches Triton kernels on CPU tensors: Triton interpreter only (the GPU runs the real section)")
    f16, f32 = torch.float16, torch.float32
    groups = sweep.conv_groups([f16, f32], shapes=CONV_TINY, device="cpu")
    names = [(g.op, g.dtype) for g in groups]
    assert names == [("conv2d 3x3 fwd nchw", "float16"), ("conv2d 3x3 fwd channels_last", "float16"),
                     ("conv2d 3x3 fwd nchw", "float32"), ("conv2d 3x3 fwd channels_last", "float32"),
                     ("conv1d k3 fwd nchw", "float16"), ("conv1d depthwise fwd nchw", "float16"),
                     ("conv1d k3 fwd nchw", "float32"), ("conv1d depthwise fwd nchw", "float32")]
    by = dict(zip(names, groups))
    dw = by[names[7]]
    assert dw.kernel == "_conv_dw_fwd_kernel" and by[names[6]].kernel == "_conv_fwd_kernel"
    assert [sweep._conv_tuple(c) for c in dw.configs[:-1]] == list(kt.DW_FWD_CANDIDATES)
    assert dw.configs[0] == sweep.conv_config(kt.DW_CONFIG) and dw.configs[-1] == {"provider": "torch"}
    half_nchw, half_cl = by[names[0]].configs, by[names[1]].configs
    # 16 channels fill half of the half-precision channel block (32): the heuristic packs
    default = kt.fwd_default(16, 30, 16, 9, True, False)
    assert default == (*kt.pick_config(16, 30, True, False), kt.PACKED)
    assert half_nchw[0] == half_cl[0] == sweep.conv_config(default) and half_nchw[-1] == {"provider": "torch"}
    # the tiny problems make one output tile: split K is offered too (problem_candidates), and
    # the packed form of every generic tile
    packed_all = {(*t, kt.PACKED) for t in kt.GPU_CONFIGS["half"].values()}
    for configs, fwd in ((half_nchw, kt.fwd_candidates(True, False, True)), (half_cl, kt.fwd_candidates(True, True))):
        got = {sweep._conv_tuple(c) for c in configs[:-1]}
        split = {c for c in got if kt.SPLIT in c}
        packed = {c for c in got if kt.PACKED in c}
        assert split and all(c[5:] == (kt.FLAT, kt.SPLIT) for c in split)
        assert packed == packed_all and default in packed and got - split - packed == set(fwd)
    assert len(half_cl) == len({*map(str, half_cl)})  # the default is not repeated
    assert {c["variant"] for c in half_nchw[:-1]} == {"direct", "via_channels_last"}
    assert {c["variant"] for c in by[names[2]].configs[:-1]} == {"direct"}  # ieee float32 here: no NHWC tiles

    def bench(fn):
        fn()
        return 3e-6

    # run: the half groups of conv2d (both variants, the NHWC tiles), float32 conv1d and its
    # depthwise tiles (keeps the test short)
    groups = [by[names[0]], by[names[1]], by[names[6]], dw]
    doc = sweep.run_sweep(groups, str(tmp_path / "conv.json"), 1e9, bench=bench, log=lambda s: None)
    rows = doc["rows"]
    assert doc["status"] == "complete" and len(rows) == sum(len(g.configs) for g in groups)
    assert all("error" not in r and r["correct"] for r in rows), [r for r in rows if "error" in r or not r["correct"]]
    assert all(b["torch_us"] == pytest.approx(3.0) and b["best_vs_torch"] == pytest.approx(1.0) for b in doc["best"])
    assert all(b["configs"] == len(by[(b["op"], b["dtype"])].configs) - 1 for b in doc["best"])
    assert "torch 3.0 us" in sweep.format_best(doc["best"])


CONV_BWD_TINY = [("conv2d 3x3", "N=1 C=16 5x6 O=16", dict(n=1, c=16, spatial=(5, 6), o=16, k=(3, 3), padding=1)),
                 ("conv2d 7x7/2 stem", "N=1 C=3 9x8 O=16", dict(n=1, c=3, spatial=(9, 8), o=16, k=(7, 7), stride=2,
                                                                padding=3))]


def test_conv_backward_section_times_every_candidate_and_torch(tmp_path):
    """The conv backward groups on tiny CPU problems (Triton interpreter, float16): per shape and
    layout the input gradient (not for the 3-channel stem) and the weight gradient, each with
    the heuristic's configuration first, every candidate the chooser would time (the packed
    weight-gradient columns for the stem) and torch last; every configuration's gradient
    matches torch's in float64."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import conv as kt

    if not ktriton.INTERPRET:
        pytest.skip("launches Triton kernels on CPU tensors: Triton interpreter only (the GPU runs the real section)")
    groups = sweep.conv_bwd_groups([torch.float16], shapes=CONV_BWD_TINY, device="cpu")
    assert [g.op for g in groups] == ["conv2d 3x3 dgrad channels_last", "conv2d 3x3 wgrad channels_last",
                                      "conv2d 7x7/2 stem wgrad channels_last", "conv2d 3x3 dgrad nchw",
                                      "conv2d 3x3 wgrad nchw", "conv2d 7x7/2 stem wgrad nchw"]
    stem = {sweep._conv_tuple(c) for c in groups[2].configs[:-1]}
    assert groups[2].configs[0] == sweep.conv_config(kt.wgrad_default(16, 3, 49, True, False))
    assert stem == {*kt.wgrad_candidates(True, 3, 49)} and all(g.configs[-1] == {"provider": "torch"} for g in groups)

    def bench(fn):
        fn()
        return 3e-6

    doc = sweep.run_sweep(groups[:3], str(tmp_path / "conv_bwd.json"), 1e9, bench=bench, log=lambda s: None)
    rows = doc["rows"]
    assert doc["status"] == "complete" and len(rows) == sum(len(g.configs) for g in groups[:3])
    assert all("error" not in r and r["correct"] for r in rows), [r for r in rows if "error" in r or not r["correct"]]


def test_conv_sections_offer_the_tma_kernels_where_the_device_has_them(monkeypatch):
    """On a device with TMA the sweep times the TMA forward, input and weight gradient at a
    stride-1 3x3 stage, though it builds its candidate lists from CPU stand-ins (here the "meta"
    device stands for a TMA GPU, the CPU for one without), and never at the strided stem."""
    from gpu_nn.benchmarks import bench_conv
    from gpu_nn.kernels.triton import conv as kt

    monkeypatch.setattr(kt, "tma_device", lambda t: t.device.type == "meta")
    stage = next(p for name, _, p in bench_conv.GPU_SHAPES if name == "conv2d 3x3")
    stem = next(p for name, _, p in bench_conv.GPU_SHAPES if name == "conv2d 7x7/2 stem")
    lists = {"fwd": lambda p, dev: sweep.conv_candidates(p, torch.bfloat16, True, dev),
             "dgrad": lambda p, dev: sweep.conv_bwd_candidates("dgrad", p, torch.bfloat16, True, dev),
             "wgrad": lambda p, dev: sweep.conv_bwd_candidates("wgrad", p, torch.bfloat16, True, dev)}
    for part, rows in lists.items():
        assert any(r.get("tma") for r in rows(stage, "meta")), part
        assert not any(r.get("tma") for r in rows(stage, "cpu")), part
        assert not any(r.get("tma") for r in rows(stem, "meta")), part


def test_linear_section_times_every_matmul_candidate_and_torch(tmp_path):
    """The linear groups on a tiny CPU problem (Triton interpreter, float32 with TF32): one group
    per GEMM of linear, each holding what the tuning times where the TMA kernel applies (the
    pointer kernel's candidates, the heuristic first, then the TMA kernel's) and torch last; every
    configuration's output matches the float64 product; the best rows carry torch's time."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import dense as kd

    if not ktriton.INTERPRET:
        pytest.skip("launches Triton kernels on CPU tensors: Triton interpreter only (the GPU runs the real section)")
    # K and N multiples of 16: every GEMM's output rows as the TMA kernel stores them (kd.tma_output)
    groups = sweep.linear_groups([torch.float32], shape=(37, 48, 32), device="cpu")
    assert [g.op for g in groups] == ["linear fwd GEMM", "linear dgrad GEMM", "linear wgrad GEMM"]
    assert [g.shape for g in groups] == ["37x48 @ 48x32", "37x32 @ 32x48", "32x37 @ 37x48"]
    cfgs = groups[0].configs
    assert [sweep._matmul_tuple(c) for c in cfgs[:-1]] == list(kd.tuning_candidates("fp32", "tf32", True))
    assert cfgs[0]["tma"] is False and cfgs[-2]["tma"] is True and cfgs[-1] == {"provider": "torch"}
    assert [c["tma"] for c in sweep.linear_grid(torch.bfloat16)[:-1]].count(True) == len(kd.matmul_tma_candidates("bf16", "ieee"))

    def bench(fn):
        fn()
        return 3e-6

    doc = sweep.run_sweep(groups, str(tmp_path / "linear.json"), 1e9, bench=bench, log=lambda s: None)
    rows = doc["rows"]
    assert doc["status"] == "complete" and len(rows) == sum(len(g.configs) for g in groups)
    assert all("error" not in r and r["correct"] for r in rows), [r for r in rows if "error" in r or not r["correct"]]
    assert all(b["torch_us"] == pytest.approx(3.0) and b["configs"] == len(cfgs) - 1 for b in doc["best"])


@pytest.mark.parametrize("model", ["cnn", "gru"])
def test_demo_profile_regions_train_the_demo_models_and_name_the_host_code(model):
    """The demo profile's regions are the demo's training steps (its network, optimizer and
    clipping) for both twins, from the same weights and batch: on the CPU (reference backend)
    their losses after three steps agree, and the profile with Python names our host code."""
    from gpu_nn import demo

    cases = sweep.demo_profile_cases("cpu")
    (_, _, providers), *persistent = [c for c in cases if c[0].startswith(f"demo {model} ")]
    assert set(providers) == {"torch", "ours"}
    # the recurrent models also with every time loop one persistent launch (Triton), after the rest
    assert [set(p) for _, _, p in persistent] == ([] if model == "cnn" else [{"ours (persistent)"}])
    assert len(cases) == 2 * len(demo.MODELS) - 1 and all("persistent" in "".join(c[2]) for c in cases[3:])
    losses = {impl: sweep.demo_step_setup(model, impl, "cpu", steps=3)()() for impl in ("ours", "torch")}
    first = sweep.demo_step_setup(model, "torch", "cpu", steps=1)()()
    assert losses["torch"] < first  # three steps trained
    torch.testing.assert_close(losses["ours"], losses["torch"], rtol=1e-4, atol=1e-5)
    rec = sweep.profile_with_python(sweep.demo_step_setup(model, "ours", "cpu", steps=2), sync=lambda: None, top=10**6)
    assert rec["summary"]["events"] == 0 and rec["wall_us"] > 0  # no GPU events on a CPU
    functions = " ".join(p["function"] for p in rec["py_top"])
    assert "ops/_dispatch.py" in functions, functions  # our route, named with its package dir
    assert "Python, most own time first" in sweep.format_python_top([{"op": "d", "provider": "ours", **rec}])


def test_env_var_block_sets_and_restores(monkeypatch):
    """harness.env_var: the variable set inside the block, its old value (or its absence) back
    after it, also when the block raises, and None leaving it alone; the demo profile's
    persistent provider runs ours with GPU_NN_RNN_PERSISTENT=1 that way."""
    from gpu_nn.benchmarks import harness

    monkeypatch.setenv("GN_TEST_A", "old")
    monkeypatch.delenv("GN_TEST_B", raising=False)
    monkeypatch.delenv("GN_TEST_C", raising=False)
    with pytest.raises(RuntimeError):
        with harness.env_var("GN_TEST_A", "1"), harness.env_var("GN_TEST_B", "2"), harness.env_var("GN_TEST_C", None):
            assert os.environ["GN_TEST_A"] == "1" and os.environ["GN_TEST_B"] == "2"
            raise RuntimeError("inside")
    assert os.environ["GN_TEST_A"] == "old" and "GN_TEST_B" not in os.environ and "GN_TEST_C" not in os.environ
    seen = []
    setup = sweep.demo_step_setup("gru", "ours", "cpu", steps=1, backend="reference",
                                  env=("GPU_NN_RNN_PERSISTENT", "1"))
    from gpu_nn.ops import rnn as ops_rnn

    monkeypatch.delenv(ops_rnn.PERSISTENT_ENV, raising=False)
    real = ops_rnn.rnn_seq_forward
    monkeypatch.setattr(ops_rnn, "rnn_seq_forward",
                        lambda *a, **k: seen.append(os.environ.get(ops_rnn.PERSISTENT_ENV)) or real(*a, **k))
    setup()()
    assert seen and set(seen) == {"1"} and ops_rnn.PERSISTENT_ENV not in os.environ


def test_profile_starts_with_the_convolution_in_both_layouts():
    """The profile step names each kernel's own time: the bfloat16 3x3 convolution at 28x28
    first, NCHW and channels_last, ours against cuDNN (the bench's one-call events mixed our host
    path into its figures)."""
    cases = sweep.profile_cases("cpu")
    assert [(op, shape, sorted(p)) for op, shape, p in cases[:2]] == [
        ("conv2d 3x3 fwd+bwd bfloat16", "N=32 C=128 28x28 O=128", ["torch", "triton"]),
        ("conv2d 3x3 channels_last fwd+bwd bfloat16", "N=32 C=128 28x28 O=128", ["torch", "triton"])]
    assert [op for op, _, _ in cases[2:4]] == ["relu fwd+bwd", "sigmoid fwd+bwd"]


def test_best_sets_torchs_row_apart_by_provider_or_impl():
    """sweep.best: torch's own row, labelled ``provider`` (conv) or ``impl`` (the recurrent input
    projection's group), is the baseline and never a candidate of ours; best_vs_torch is ours
    against it."""
    from gpu_nn.benchmarks import sweep

    def row(config, us):
        return {"kernel": "k", "op": "proj", "dtype": "bf16", "shape": "s", "config": config, "us": us,
                "gbps": 1.0 / us, "correct": True}

    for key in ("provider", "impl"):
        (b,) = sweep.best([row({"impl": "rnn", "BLOCK_M": 64}, 3.0), row({"impl": "dense", "BLOCK_M": 128}, 2.0),
                           row({key: "torch"}, 1.0)])
        assert b["configs"] == 2 and b["best_config"] == {"impl": "dense", "BLOCK_M": 128}
        assert b["torch_us"] == 1.0 and b["best_vs_torch"] == pytest.approx(2.0)
