"""The gpu-nn command: info, check and sass."""

import json
import os

import pytest
import torch

from gpu_nn.cli import main
from helpers import run_fresh


def test_info_names_every_backend(capsys):
    from gpu_nn import _backend

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "cupy"):  # each backend's own line says whether it works here
        ok, _ = _backend.status(name)
        assert any(ln.split()[:2] == [name, "works:" if ok else "unavailable:"] for ln in out.splitlines()), (name, out)
    assert "torch" in out and "device" in out


def test_check_relu_passes(capsys, tmp_path, monkeypatch):
    """Every backend and dtype that runs here: on the interpreter bfloat16 too. On the heuristic
    configurations (GPU_NN_TUNE=0, inherited by the workers) unless GPU_NN_TUNE is set."""
    import os

    import torch

    from gpu_nn import _backend, check

    js = tmp_path / "check.json"
    monkeypatch.setenv("GPU_NN_TUNE", "1")  # (so that teardown restores whatever was there)
    monkeypatch.delenv("GPU_NN_TUNE")
    assert main(["check", "--op", "relu", "--no-progress", "--json", str(js)]) == 0
    assert os.environ["GPU_NN_TUNE"] == "0"
    monkeypatch.setenv("GPU_NN_TUNE", "1")
    assert main(["check", "--op", "relu", "--no-progress", "--json", str(js)]) == 0
    assert os.environ["GPU_NN_TUNE"] == "1"
    out = capsys.readouterr().out
    assert "relu" in out and "0 failed" in out and "FAIL" not in out
    # a row for every planned check, every backend and dtype that runs here among them
    rows = json.loads(js.read_text())
    assert len(rows) == len(check.plan(["relu"])) and all(r["ok"] for r in rows)
    for backend, _, dtypes in check.targets():
        got = {r["dtype"] for r in rows if r["backend"] == backend}
        assert got >= {str(d).replace("torch.", "") for d in dtypes} or backend not in {"reference", "triton"}, (backend, got)
    if _backend.interpret_mode() and not torch.cuda.is_available():
        assert ("triton", "cpu", (torch.float32, torch.float16, torch.bfloat16)) in check.targets()


def test_sass_prints_the_table(tmp_path):
    """Compiles the activation kernels for sm_90 in a subprocess (the test session sets
    TRITON_INTERPRET; gpu-nn sass must drop it for its compiler processes)."""
    js = tmp_path / "sass.json"
    env = dict(os.environ, TRITON_INTERPRET="1", COLUMNS="200")
    proc = run_fresh(["-m", "gpu_nn.cli", "sass", "--family", "activation", "--json", str(js)], env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "_act_fwd_kernel" in proc.stdout and "registers" in proc.stdout
    assert "18 configurations compiled, 0 failed, 0 spill" in proc.stdout
    import json

    rows = json.loads(js.read_text())
    assert len(rows) == 18 and all(r["ok"] and r["registers"] > 0 and r["spill_bytes"] == 0 for r in rows)


def test_sass_lists_a_missing_family(monkeypatch, capsys):
    from gpu_nn.benchmarks import sass_report

    monkeypatch.setattr(sass_report, "_kernel_module_exists", lambda fam: False)
    assert main(["sass", "--family", "conv"]) == 0
    out = capsys.readouterr().out
    assert "missing" in out and "conv" in out


def test_sass_cuda_compiles_only_the_families_named(monkeypatch, capsys):
    """--family with --cuda picks CUDA C sources (it was ignored: every build compiled); an
    unknown one is refused before any compilation, with the sources' names."""
    import pytest

    from gpu_nn.benchmarks import sass_report
    from gpu_nn.kernels import cuda as kcuda
    from gpu_nn.kernels import sass

    compiled = []
    monkeypatch.setattr(kcuda, "compile_cubin", lambda name, defines: compiled.append(name) or name)
    monkeypatch.setattr(sass, "disassemble", lambda cubins: [None] * len(cubins))
    monkeypatch.setattr(kcuda, "sass_report", lambda cubin, listing=None: {})
    assert main(["sass", "--cuda", "--family", "optim"]) == 0
    assert compiled and set(compiled) == {"optim"}
    compiled.clear()
    with pytest.raises(SystemExit, match="unknown family conv; expected optim, pool, rnn"):
        main(["sass", "--cuda", "--family", "conv"])
    assert compiled == [] and {b[0] for b in sass_report.cuda_builds()} == {"optim", "pool", "rnn"}


@pytest.mark.parametrize("first", ("", "import triton.language; "), ids=("plain", "triton-imported-first"))
def test_check_runs_triton_when_started_without_interpret(tmp_path, first):
    """`gpu-nn check` started without TRITON_INTERPRET still checks the Triton backend (in the
    interpreter on a CPU-only machine): building the parser must not import the kernels first,
    and ``import gpu_nn`` must not import triton.language (torch 2.13's flop_counter did: then
    120 of 250 rows failed "Cannot call @triton.jit'd outside of the scope of a kernel", a user
    audit). Where the caller of main() imported it already, compiled, the check reruns itself
    once in a fresh process with the variable set. softmax: its kernels call Triton's own library
    (tl.max, tl.sum), which relu's do not."""
    import json

    pytest.importorskip("triton")
    js = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_NN_CHECK_RERUN")}
    code = (f"import sys; {first}from gpu_nn.cli import main; "
            f"sys.exit(main(['check', '--op', 'relu', '--op', 'softmax', '--no-progress', '--json', {str(js)!r}]))")
    proc = run_fresh(["-c", code], env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(js.read_text())
    assert {(r["op"], r["backend"]) for r in rows} >= {(op, b) for op in ("relu", "softmax") for b in ("reference", "triton")}
    if not torch.cuda.is_available():
        assert proc.stdout.count("Triton kernels run in the interpreter") == 1, proc.stdout[:500]


def test_triton_status_says_when_the_interpreter_came_too_late():
    """TRITON_INTERPRET=1 set after triton.language was imported: the triton backend is
    unavailable and says why (its kernels would fail calling Triton's compiled library)."""
    pytest.importorskip("triton")
    code = ("import os, triton.language; os.environ['TRITON_INTERPRET'] = '1'; import torch, gpu_nn; "
            "from gpu_nn import _backend; print(_backend.triton_library_compiled(), _backend.status('triton'))")
    from helpers import uninterpreted_env

    out = run_fresh(["-c", code], env=uninterpreted_env())
    assert out.returncode == 0, out.stderr[-2000:]
    if torch.cuda.is_available():  # compiled kernels: the interpreter is not needed there
        assert "True (True, 'compiled kernels on" in out.stdout, out.stdout
    else:
        assert out.stdout.startswith("True (False, ") and "was set after triton.language was imported" in out.stdout, \
            out.stdout


def test_check_prints_each_op_as_it_finishes(capsys):
    """A cut run must already have said what passed: one line per op, also with --no-progress,
    before the table."""
    assert main(["check", "--op", "relu", "--op", "tanh", "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    op_lines = [ln for ln in lines if ln.startswith(("relu:", "tanh:"))]
    assert len(op_lines) == 2 and all("pass" in ln and "compiling" in ln for ln in op_lines)
    table_at = next(i for i, ln in enumerate(lines) if "ours against the float64 reference" in ln)
    assert all(lines.index(ln) < table_at for ln in op_lines)
    assert "compiling kernels" in out  # the summary says how much of the time was compilation


def _dies_on_sigmoids_float32(index, ops, seed):
    """check's job runner, but the process running sigmoid's float32 reference job dies (a crash
    in a launch, say), wherever it runs (pickled by name into the worker processes)."""
    import os

    from gpu_nn import check

    job = check.plan(ops)[index]
    if job[1].op == "sigmoid" and job[2] == "reference" and str(job[4]) == "torch.float32":
        os._exit(139)
    marker = os.environ["GPU_NN_TEST_MARKER"]
    if job[1].op == "relu" and job[2] == "reference" and str(job[4]) == "torch.float32" and not os.path.exists(marker):
        open(marker, "w").close()  # the first run only (another job's fault surfacing here, say)
        row = check._worker_run(index, ops, seed)
        check._POISONED = True  # as after a CUDA error: this worker refuses its next jobs
        return {**row, "ok": False, "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    return check._worker_run(index, ops, seed)


def test_check_names_the_job_that_kills_its_process(monkeypatch, tmp_path):
    """A job that kills its worker process broke the pool, and every row it had not finished read
    'worker failed: BrokenProcessPool', naming no culprit; they now run again each alone, and only
    the killer fails, saying so. A row with a CUDA error (sticky in its process, and maybe another
    job's fault surfacing late) runs again alone too, as do the jobs its worker refused after it."""
    from gpu_nn import check

    monkeypatch.setattr(check, "_worker_run", _dies_on_sigmoids_float32)
    monkeypatch.setattr(check, "_POISONED", False)
    monkeypatch.setenv("GPU_NN_TEST_MARKER", str(tmp_path / "faulted"))
    rows = check.run_checks(ops=["relu", "sigmoid"], progress=False, workers=2)
    assert len(rows) == len(check.plan(["relu", "sigmoid"]))
    bad = [r for r in rows if not r["ok"]]
    assert [(r["op"], r["backend"], r["dtype"]) for r in bad] == [("sigmoid", "reference", "float32")], bad
    assert "its process died (exit code 139): this job, run alone, killed it" in bad[0]["error"]
    assert not any("CUDA error" in (r["error"] or "") for r in rows)  # relu's, run alone: passed


def test_check_workers_give_the_same_rows():
    """Jobs seed their inputs by their place in the plan, so spreading them over processes
    changes nothing but the time."""
    from gpu_nn import check

    ops = ["relu", "max_pool1d"]
    seen = []
    serial = check.run_checks(ops=ops, progress=False, workers=1)
    parallel = check.run_checks(ops=ops, progress=False, workers=2, on_op=lambda op, rows: seen.append((op, len(rows))))
    key = lambda r: (r["op"], r["backend"], r["dtype"], r["max_rel_err"], r["ok"])  # noqa: E731
    assert [key(r) for r in serial] == [key(r) for r in parallel] and serial
    assert sorted(seen) == sorted((op, sum(r["op"] == op for r in serial)) for op in ops)


def test_check_hands_the_compile_heavy_jobs_to_its_workers_first():
    """The worker pool gets the recurrent layers' triton jobs first (they compile the most: in
    plan order they came last and set the H200 run's tail), then conv / dense / activation on
    triton, the cupy recurrent ones, the rest; plan order among equals; every job once."""
    from gpu_nn import check

    jobs = check.plan()
    order = check.submission_order(jobs)
    assert sorted(order) == list(range(len(jobs)))
    ranks = [check.SUBMIT_RANK.get((jobs[i][0], jobs[i][2]), 3) for i in order]
    assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == 3
    for r in set(ranks):
        same = [i for i, k in zip(order, ranks) if k == r]
        assert same == sorted(same)
    assert jobs[order[0]][0] == "rnn" and jobs[order[0]][2] == "triton" and jobs[0][0] != "rnn"


def test_compile_timer_wraps_what_the_jit_binds(monkeypatch):
    """Triton's JIT binds ``triton.compiler.compile`` (``from ..compiler import compile`` in
    ``create_binder``): the timer must sit on that name and count the time spent in it."""
    import time

    import pytest

    triton_compiler = pytest.importorskip("triton.compiler")
    from gpu_nn import check

    def slow_compile(*args, **kwargs):
        time.sleep(0.05)
        return "kernel"

    monkeypatch.setattr(triton_compiler, "compile", slow_compile)
    timer = check._CompileTimer()
    timer.install()
    from triton.compiler import compile as bound  # what create_binder does

    assert bound("src") == "kernel"
    assert timer.seconds >= 0.05


def test_user_mistakes_get_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Mistakes a user can mend are said in one line with a non-zero exit, before any work: an
    unknown op, a worker count below 1, an output file in a missing folder, a negative seed, a
    backend this machine cannot run, a bench of a backend no case offers here, a bad
    GPU_NN_BACKEND (which `info` reports rather than dies of)."""
    import pytest

    assert main(["check", "--op", "relu", "--op", "nosuch"]) == 2
    assert "unknown op nosuch; expected one of" in capsys.readouterr().err
    missing = str(tmp_path / "no" / "out.json")
    for argv in (["check", "--workers", "0"], ["check", "--json", missing], ["demo", "--json", missing],
                 ["demo", "--plot", str(tmp_path)], ["demo", "--seed", "-3"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    assert "no folder" in err and "is a folder" in err and "must be at least 1" in err and "must be at least 0" in err
    # the demo's models need linear / conv2d / cross_entropy, which CuPy has no kernels for: said
    # before anything is read or made, wherever CuPy runs (on a GPU the first linear refused it
    # mid-run), from --backend or GPU_NN_BACKEND
    assert main(["demo", "--backend", "cupy", "--model", "lstm", "--epochs", "1"]) == 1
    assert "gpu-nn demo: error: the demo's models need linear, conv2d and cross_entropy" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setenv("GPU_NN_BACKEND", "cupy")
        assert main(["demo", "--model", "cnn", "--epochs", "1"]) == 1
        assert "which have no cupy kernels" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(SystemExit, match="on a CPU our side is the reference backend"):
            main(["bench", "--family", "activation", "--quick", "--backend", "cupy", "--out", str(tmp_path / "b")])
    monkeypatch.setenv("GPU_NN_BACKEND", "bogus")
    assert main(["info"]) == 0
    assert "requested: invalid (GPU_NN_BACKEND: unknown backend 'bogus'" in capsys.readouterr().out


def test_demo_backend_defaults_to_gpu_nn_backend(monkeypatch):
    """`gpu-nn demo` without --backend trains ours on GPU_NN_BACKEND's backend (every thread's
    default, as the README says), else auto."""
    from gpu_nn import demo

    seen = []
    monkeypatch.setattr(demo, "train_pair", lambda m, e, d, backend, *a, **k: seen.append(backend) or {})
    monkeypatch.setattr(demo, "print_table", lambda *a, **k: None)
    monkeypatch.setenv("GPU_NN_BACKEND", "reference")
    assert main(["demo", "--model", "cnn"]) == 0
    monkeypatch.delenv("GPU_NN_BACKEND")
    assert main(["demo", "--model", "cnn"]) == 0
    assert main(["demo", "--model", "cnn", "--backend", "reference"]) == 0
    assert seen == ["reference", "auto", "reference"]


def test_bad_values_are_refused_before_anything_runs(capsys):
    """Values that once ended in a traceback (a NumPy seed error, torch.compile's unknown mode or
    backend, matplotlib's unknown format after the whole training) or were silently ignored
    (--threads 0, --warm-jobs -1) are refused with a message before anything runs (a user
    audit)."""
    import pytest

    for argv, words in ((["check", "--op", "relu", "--seed", "-3"], "--seed: must be at least 0"),
                        (["demo", "--threads", "0"], "--threads: must be at least 1"),
                        (["demo", "--epochs", "0"], "--epochs: must be at least 1"),
                        (["demo", "--subset", "0"], "--subset: must be at least 1"),
                        (["demo", "--plot", "/tmp/loss.txt"], "written as .png, .pdf, .svg or .jpg"),
                        (["demo", "--compile", "--compile-mode", "bogus"], "invalid choice: 'bogus'"),
                        (["bench", "--warm-jobs", "-1"], "--warm-jobs: must be at least 0"),
                        (["sass", "--jobs", "0"], "--jobs: must be at least 1"),
                        (["sass", "--timeout", "0"], "--timeout: must be more than 0")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and words in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("gpu-nn 0.")
    with pytest.raises(SystemExit, match="is not one of torch.compile's backends"):
        main(["demo", "--compile", "--compile-backend", "bogus", "--model", "cnn", "--epochs", "1", "--no-progress"])
    # a compile option without --compile was ignored (the run trained eager, a CLI audit)
    for opt in (["--compile-mode", "reduce-overhead"], ["--compile-backend", "aot_eager"]):
        with pytest.raises(SystemExit, match="take effect with --compile only"):
            main(["demo", *opt, "--model", "cnn", "--epochs", "1", "--no-progress"])


def test_an_output_file_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, capsys):
    """--json to a folder that exists but takes no file (/proc), or to a read-only folder, is
    refused when the arguments are parsed (it failed at the end of the run: a whole demo, check or
    sass compile lost; a CLI audit), sass's --json included; an existing file is left as it was
    and a file that did not exist is not left behind."""
    import os

    import pytest

    from gpu_nn.cli import output_path

    targets = ["/proc/gpu-nn-test.json"]
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # (root writes anywhere: the read-only case only for others)
        targets.append(str(ro / "x.json"))
    for target in targets:
        for argv in (["demo", "--json", target], ["check", "--op", "relu", "--json", target],
                     ["sass", "--family", "activation", "--json", target]):
            with pytest.raises(SystemExit) as exc:
                main(argv)
            assert exc.value.code == 2 and "cannot write" in capsys.readouterr().err, argv
    kept = tmp_path / "kept.json"
    kept.write_text("old")
    assert output_path(str(kept)) == str(kept) and kept.read_text() == "old"
    fresh = tmp_path / "fresh.json"
    assert output_path(str(fresh)) == str(fresh) and not fresh.exists()
