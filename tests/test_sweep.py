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


def _groups(f32, configs_act, configs_pool, configs_adam):
    return (sweep.activation_groups(["relu", "tanh"], [(3, 5, 7)], [f32], "cpu", configs=configs_act)
            + sweep.pool_groups([f32], shape=(2, 3, 9, 11), device="cpu", configs=configs_pool)
            + sweep.adam_groups([f32], sizes=[1000, 37, 2100], device="cpu", configs=configs_adam))


def test_every_configuration_reaches_the_launch_and_matches_torch(tmp_path, monkeypatch):
    """The real groups on tiny CPU tensors (Triton interpreter): each configuration's BLOCK,
    num_warps (and ITERS) reach the kernel launch, and every output matches torch's."""
    from gpu_nn.kernels.triton import activation as ka, optim as ko, pool as kp

    launched = []
    for mod in (ka, kp, ko):
        real = mod.launch_kernel

        def spy(kernel, grid, *args, _real=real, **kw):
            launched.append((getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)), grid,
                             {k: kw[k] for k in ("BLOCK", "ITERS", "num_warps") if k in kw}))
            return _real(kernel, grid, *args, **kw)
        monkeypatch.setattr(mod, "launch_kernel", spy)

    act = [{"BLOCK": 1024, "num_warps": 4}, {"BLOCK": 32, "num_warps": 1}]
    pool = [{"BLOCK": 128, "num_warps": 4}, {"BLOCK": 64, "num_warps": 2}]
    adam = [{"BLOCK": 512, "ITERS": 1, "num_warps": 4}, {"BLOCK": 256, "ITERS": 4, "num_warps": 2}]
    groups = _groups(torch.float32, act, pool, adam)

    def bench(fn):
        fn()
        return 2e-6

    doc = sweep.run_sweep(groups, str(tmp_path / "sweep.json"), 1e9, bench=bench, log=lambda s: None)
    assert doc["status"] == "complete"
    rows = doc["rows"]
    assert len(rows) == 2 * (4 + 4 + 1) and all("error" not in r for r in rows), rows
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    for r in rows:
        assert r["us"] == pytest.approx(2.0) and r["gbps"] == pytest.approx(r["bytes"] / 2e-6 / 1e9)
    # each row's launches (check + timed run) carried its configuration, with a grid to match
    seen = {}
    for name, grid, kw in launched:
        seen.setdefault(name, set()).add((tuple(sorted(kw.items())), grid))
    assert {(("BLOCK", 32), ("num_warps", 1)), (("BLOCK", 1024), ("num_warps", 4))} == {k for k, _ in seen["_act_fwd_kernel"]}
    assert (((("BLOCK", 32), ("num_warps", 1)), (4,))) in seen["_act_bwd_kernel"]  # 105 elements
    assert ((("BLOCK", 64), ("num_warps", 2)), (3,)) in seen["_max_pool_fwd_kernel"]  # 2*3*5*6 outputs
    assert ((("BLOCK", 64), ("num_warps", 2)), (10,)) in seen["_avg_pool_bwd_kernel"]  # 594 inputs
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
    raw = [_ev("aten::relu", 0, 500, device=False), _ev("copy_kernel", 300, 340), _ev("relu_kernel", 100, 200),
           _ev("relu_kernel", 150, 260), _ev("Memset (Device)", 400, 401)]
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
    return run_bench_script(
        tmp_path, "gpu_measure.sh",
        ("" if import_ok else 'case "$*" in "-c import gpu_nn") exit 1;; esac\n')
        + 'case "$*" in *"--only sweep"*) echo "relu fwd float32 8x8 BLOCK=1024 num_warps=4: 1.0 us 9 GB/s ok";'
        ' echo "sweep: 191 rows, complete";; esac\n'
        'case "$*" in *"--only profile"*) echo "profile: 20 of 22 (op, provider) regions profiled, 1 errors"; exit 3;; esac\n'
        "exit 0\n", env)


def test_gpu_measure_script_steps_summary_and_archive(tmp_path):
    """benchmarks/gpu_measure.sh with a stand-in python: the steps run in order, the sweep gets a
    budget that leaves the profile its time, each step's result line reaches summary.txt, a
    failed profile fails the script, and everything lands in one archive beside OUTDIR."""
    r, out, calls = _measure(tmp_path, 300)
    assert r.returncode == 1, r.stdout + r.stderr  # the profile failed
    summary = (out / "summary.txt").read_text()
    steps = [line.split(":")[0] for line in summary.splitlines() if not line.startswith(" ")]
    assert steps == ["sweep", "profile", "kernel_counts", "demo", "demo-compile", "total"]
    assert "  sweep: 191 rows, complete" in summary and "  profile: 20 of 22" in summary
    assert "profile: rc=3" in summary and "total:" in summary and "sweep rc=0, profile rc=3" in summary
    assert calls[0] == "-c import gpu_nn"  # installed already: no pip
    (sweep_call,) = [c for c in calls if "--only sweep" in c]
    assert sweep_call.startswith(f"-m gpu_nn.benchmarks.sweep --out {out} --only sweep --budget-s ")
    budget = int(sweep_call.split()[-1])
    assert 120 <= budget <= 150  # about 150 s of the 300, the profile's 60 s and a minute left
    (profile_call,) = [c for c in calls if "--only profile" in c]
    assert profile_call.endswith("--profile-budget-s 40")
    assert f"-m gpu_nn.benchmarks.kernel_counts --out {out}/counts.json" in calls
    demo = [c for c in calls if " demo " in c]
    assert demo[0] == f"-m gpu_nn.cli demo --epochs 3 --json {out}/demo.json --no-progress"
    assert demo[1] == f"-m gpu_nn.cli demo --epochs 3 --compile --json {out}/demo-compile.json --no-progress"
    with tarfile.open(str(out) + ".tgz") as tar:
        names = tar.getnames()
    for f in ("summary.txt", "machine.txt", "sweep.log", "profile.log", "kernel_counts.log", "demo.log"):
        assert f"out/{f}" in names


def test_gpu_measure_script_installs_when_needed_and_skips_what_the_budget_cannot_hold(tmp_path):
    r, out, calls = _measure(tmp_path, 3, import_ok=False)
    summary = (out / "summary.txt").read_text()
    assert "install: skipped (no time left of 3s)" in summary
    assert "sweep: skipped" in summary and "profile: skipped" in summary
    assert "demo-compile: skipped" in summary
    assert not any("gpu_nn.benchmarks.sweep" in c for c in calls)
    assert r.returncode == 1  # nothing was measured
    assert (pathlib.Path(str(out) + ".tgz")).exists()


CONV_TINY = [("conv2d 3x3", "N=1 C=16 5x6 O=16", dict(n=1, c=16, spatial=(5, 6), o=16, k=(3, 3), padding=1)),
             ("conv1d k3", "N=2 C=16 L=9 O=32", dict(n=2, c=16, spatial=(9,), o=32, k=(3,), stride=2)),
             ("conv1d depthwise", "N=1 C=4 L=9", dict(n=1, c=4, spatial=(9,), o=4, k=(3,), groups=4))]


def test_conv_section_times_every_candidate_and_torch(tmp_path):
    """The conv groups on tiny CPU problems (Triton interpreter, float16 and float32): each group
    holds the heuristic's configuration first, every candidate the measuring chooser would time
    (the via-channels_last variant for NCHW half problems, the NHWC tiles for channels_last
    ones) and torch last; every configuration's output matches torch's in float64; the best
    rows carry torch's time; depthwise (one configuration) has no group."""
    from gpu_nn.kernels import triton as ktriton
    from gpu_nn.kernels.triton import conv as kt

    if not ktriton.INTERPRET:
        pytest.skip("launches Triton kernels on CPU tensors: Triton interpreter only (the GPU runs the real section)")
    f16, f32 = torch.float16, torch.float32
    groups = sweep.conv_groups([f16, f32], shapes=CONV_TINY, device="cpu")
    names = [(g.op, g.dtype) for g in groups]
    assert names == [("conv2d 3x3 fwd nchw", "float16"), ("conv2d 3x3 fwd channels_last", "float16"),
                     ("conv2d 3x3 fwd nchw", "float32"), ("conv2d 3x3 fwd channels_last", "float32"),
                     ("conv1d k3 fwd nchw", "float16"), ("conv1d k3 fwd nchw", "float32")]
    by = dict(zip(names, groups))
    half_nchw, half_cl = by[names[0]].configs, by[names[1]].configs
    default = kt.pick_config(16, 30, True, False)
    assert half_nchw[0] == half_cl[0] == sweep.conv_config(default) and half_nchw[-1] == {"provider": "torch"}
    assert {sweep._conv_tuple(c) for c in half_nchw[:-1]} == {default, *kt.fwd_candidates(True, False, True)}
    assert {sweep._conv_tuple(c) for c in half_cl[:-1]} == {default, *kt.fwd_candidates(True, True)}
    assert len(half_cl) == len({*map(str, half_cl)})  # the default is not repeated
    assert {c["variant"] for c in half_nchw[:-1]} == {"direct", "via_channels_last"}
    assert {c["variant"] for c in by[names[2]].configs[:-1]} == {"direct"}  # ieee float32 here: no NHWC tiles

    def bench(fn):
        fn()
        return 3e-6

    # run: the half groups of conv2d (both variants, the NHWC tiles) and float32 conv1d (keeps the test short)
    groups = [by[names[0]], by[names[1]], by[names[5]]]
    doc = sweep.run_sweep(groups, str(tmp_path / "conv.json"), 1e9, bench=bench, log=lambda s: None)
    rows = doc["rows"]
    assert doc["status"] == "complete" and len(rows) == sum(len(g.configs) for g in groups)
    assert all("error" not in r and r["correct"] for r in rows), [r for r in rows if "error" in r or not r["correct"]]
    assert all(b["torch_us"] == pytest.approx(3.0) and b["best_vs_torch"] == pytest.approx(1.0) for b in doc["best"])
    assert all(b["configs"] == len(by[(b["op"], b["dtype"])].configs) - 1 for b in doc["best"])
    assert "torch 3.0 us" in sweep.format_best(doc["best"])
