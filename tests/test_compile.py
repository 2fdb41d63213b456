"""DESIGN section 4, levels 3 and 4: every Triton kernel configuration compiles for sm_90 and
every CUDA C source compiles with NVRTC for sm_90, with no GPU present."""

import dataclasses
import inspect
import json
import os
import re

import pytest

from gpu_nn.kernels import cuda as kcuda
from gpu_nn.kernels import triton as ktriton
from gpu_nn.kernels.triton import _aot
from helpers import aot_cover, run_uninterpreted


def _aot_rows(family, tmp_path, shard="0/1", cover="all", must=()):
    out = tmp_path / f"{family}.json"
    extra = []
    if cover != "all":
        (tmp_path / "must.json").write_text(json.dumps(sorted(must)))
        extra = ["--cover", cover, "--must", str(tmp_path / "must.json")]
    proc = run_uninterpreted(["-m", "gpu_nn.kernels.triton._aot", "--family", family, "--json", out, "--no-sass",
                              "--shard", shard, *extra], timeout=900)
    assert out.exists(), f"AOT run for {family} produced nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc


def _run_uninterpreted(tmp_path, name: str, code: str, timeout: float = 300):
    """Run ``code`` as a script in a process without TRITON_INTERPRET (kernels imported under
    the interpreter cannot be compiled; helpers.run_uninterpreted); returns the finished process."""
    script = tmp_path / name
    script.write_text(code)
    return run_uninterpreted([script], timeout=timeout)


def _uninterpreted_json(tmp_path, name: str, code: str, timeout: float = 300):
    """:func:`_run_uninterpreted`, which must succeed; the JSON its last line of output prints."""
    proc = _run_uninterpreted(tmp_path, name, code, timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_run_uninterpreted_is_a_process_of_its_own(tmp_path, monkeypatch):
    """helpers.run_uninterpreted (the forked children of tests/uninterpreted_server.py, which
    this file's compile checks run in) gives what ``subprocess.run([python, ...])`` would: the
    exit code, the output and error streams apart, ``sys.argv`` and ``sys.path[0]`` as ``python``
    sets them for a script, ``-m`` and ``-c``, the working directory asked for, no
    TRITON_INTERPRET, the asking process's environment now with ``env``, an uncaught exception's
    traceback with code 1, no standard input (the server's requests), a state of its own (what
    one child changes, the next does not see), Python's own end (a file left open flushed, a
    thread joined, a ``-c`` function picklable from ``__main__``), and a timeout that kills the
    child and raises as subprocess.run does. With GPU_NN_TEST_NO_SERVER=1 the same test runs
    fresh Pythons."""
    import subprocess

    monkeypatch.setenv("PROBE_LATER", "now")  # set after the server started (or before: either way)
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, os, sys\n"
        "import gpu_nn.kernels.triton as kt\n"
        "seen = getattr(kt, '_probe_mark', None)\n"
        "kt._probe_mark = 'set'\n"
        "print(json.dumps({'argv': sys.argv, 'path0': sys.path[0], 'cwd': os.getcwd(), 'stdin': sys.stdin.read(),\n"
        "                  'interp': os.environ.get('TRITON_INTERPRET'), 'extra': os.environ.get('PROBE_EXTRA'),\n"
        "                  'later': os.environ.get('PROBE_LATER'), 'interpreted': kt.INTERPRET, 'seen': seen}))\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(3)\n")
    for _ in range(2):  # the second child does not see what the first set
        proc = run_uninterpreted([script, "a", "b"], cwd=tmp_path, env={"PROBE_EXTRA": "x"})
        assert proc.returncode == 3 and proc.stderr == "to stderr\n", (proc.returncode, proc.stderr)
        assert json.loads(proc.stdout) == {"argv": [str(script), "a", "b"], "path0": str(tmp_path), "cwd": str(tmp_path),
                                           "stdin": "", "interp": None, "extra": "x", "later": "now",
                                           "interpreted": False, "seen": None}
    (tmp_path / "probe_mod.py").write_text("import sys\nprint(sys.argv, sys.path[0], __name__)\n")
    proc = run_uninterpreted(["-m", "probe_mod", "q"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"{[str(tmp_path / 'probe_mod.py'), 'q']} {tmp_path} __main__\n", proc
    proc = run_uninterpreted(["-c", "import sys; print(sys.argv, repr(sys.path[0])); raise KeyError('boom')", "z"])
    assert proc.returncode == 1 and proc.stdout == "['-c', 'z'] ''\n", proc.stdout
    assert proc.stderr.startswith("Traceback (most recent call last):") and proc.stderr.endswith("KeyError: 'boom'\n")
    left_open = tmp_path / "left_open.txt"
    proc = run_uninterpreted(["-c", (
        "import pickle, sys, threading, time\n"
        "def f(): pass\n"
        "assert pickle.loads(pickle.dumps(f)) is f\n"
        f"handle = open({str(left_open)!r}, 'w'); handle.write('flushed at exit')\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('joined', flush=True))).start()\n")])
    assert proc.returncode == 0 and proc.stdout == "joined\n", proc
    assert left_open.read_text() == "flushed at exit"
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        run_uninterpreted(["-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"], timeout=3)
    pid = int((timed_out.value.output or "").split()[0])
    with pytest.raises(ProcessLookupError):  # killed, and reaped
        os.kill(pid, 0)
    proc = run_uninterpreted(["-c", "print('after the timeout')"])  # the server goes on
    assert proc.returncode == 0 and proc.stdout == "after the timeout\n"


def test_variables_a_test_leaves_are_put_back(monkeypatch, request):
    """A test's leftover variables do not reach the next test (helpers.environment_kept, which
    conftest wraps every test in): one in-process ``gpu-nn check`` (GPU_NN_TUNE=0) sent every
    later sm_90 script of its worker to a fresh Python (about 20 in a full run, 4 s of imports
    each), its environment no longer the uninterpreted server's."""
    import helpers
    from gpu_nn.cli import main

    assert "_environment_put_back" in request.fixturenames  # (conftest wraps this test too)
    monkeypatch.setenv("PUT_BACK_PROBE", "kept")
    monkeypatch.delenv("GPU_NN_TUNE", raising=False)
    current = os.environ.get("PYTEST_CURRENT_TEST")
    with helpers.environment_kept():
        assert main(["check", "--op", "flatten", "--no-progress"]) == 0
        assert os.environ["GPU_NN_TUNE"] == "0"  # what check sets (the leak this guards against)
        os.environ["LEFT_PROBE"] = "1"
        del os.environ["PUT_BACK_PROBE"]
        os.environ["PYTEST_CURRENT_TEST"] = "a later phase"
    assert "GPU_NN_TUNE" not in os.environ and "LEFT_PROBE" not in os.environ
    assert os.environ["PUT_BACK_PROBE"] == "kept"
    assert os.environ["PYTEST_CURRENT_TEST"] == "a later phase"  # pytest's own: as it set it last
    if current is not None:
        os.environ["PYTEST_CURRENT_TEST"] = current
    # a server first used in a test that changed a variable imports read starts from the session's
    # environment all the same (conftest: helpers.set_base_env), so later tests' requests match it
    assert helpers._BASE_ENV is not None and "PUT_BACK_PROBE" not in helpers._BASE_ENV
    monkeypatch.setenv("GPU_NN_BASE_PROBE", "0")  # (a GPU_NN_ variable: one imports may read)
    assert helpers._SERVER._start_env() == {k: v for k, v in helpers._BASE_ENV.items() if k != "TRITON_INTERPRET"}
    assert helpers._TORCH_SERVER._start_env() == helpers._BASE_ENV and "GPU_NN_BASE_PROBE" not in helpers._BASE_ENV


def test_inductors_cache_variable_keeps_scripts_forked_from_the_server(monkeypatch):
    """torch sets TORCHINDUCTOR_CACHE_DIR in os.environ at inductor's first compile; read at use,
    not by the imports, it does not send a script to a fresh Python (it sent every later sm_90
    script of a worker that had run a torch.compile test); a variable the imports read does."""
    import helpers

    if not helpers.server_wanted():
        pytest.skip("scripts run as fresh Pythons here (CUDA, or GPU_NN_TEST_NO_SERVER): no server")
    run_uninterpreted(["-c", "pass"])  # (the server started, if it was not, before the variable is set)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", f"/tmp/inductor-probe-{os.getpid()}")
    proc = run_uninterpreted(["-c", "import os; print(os.getppid())"])
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) != os.getpid(), "forked by the server, not started by this process"
    # a variable imports read, unlike the server's start: a fresh Python, as it must be
    monkeypatch.setenv("GPU_NN_TUNE", f"{helpers._SERVER.started_env.get('GPU_NN_TUNE')}-not")
    proc = run_uninterpreted(["-c", "import os; print(os.getppid())"])
    assert proc.returncode == 0 and int(proc.stdout) == os.getpid(), proc.stderr


def test_run_fresh_makes_every_import_but_torchs_in_the_child(monkeypatch, tmp_path):
    """helpers.run_fresh: a script whose point is what gpu-nn or Triton read from the environment
    at import runs in a child of a server that imported torch alone, so the child makes those
    imports itself, after its environment (TRITON_INTERPRET and GPU_NN_* included) is set; a
    variable torch's import may read that differs from the server's start gives a fresh Python."""
    import helpers

    if not helpers.server_wanted():
        pytest.skip("scripts run as fresh Pythons here (CUDA, or GPU_NN_TEST_NO_SERVER): no server")
    code = ("import json, os, sys; print(json.dumps({'ppid': os.getppid(), 'pre': sorted(m for m in ('gpu_nn', 'triton') "
            "if m in sys.modules), 'torch': 'torch' in sys.modules, 'interp': os.environ.get('TRITON_INTERPRET')})); "
            "import gpu_nn.kernels.triton as kt; print(kt.INTERPRET)")
    run = lambda env: helpers.run_fresh(["-c", code], env=env, cwd=tmp_path)  # noqa: E731
    for interp in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if interp:
            env["TRITON_INTERPRET"] = interp
        proc = run(env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        first, second = proc.stdout.splitlines()
        assert json.loads(first) == {"ppid": json.loads(first)["ppid"], "pre": [], "torch": True, "interp": interp}
        assert json.loads(first)["ppid"] != os.getpid() and second == str(interp == "1")
    # a variable torch's import may read, not as at the server's start: not served (a fresh Python)
    started = helpers._TORCH_SERVER.started_env.get("TORCH_SHOW_CPP_STACKTRACES")
    assert not helpers._TORCH_SERVER.serves({**os.environ, "TORCH_SHOW_CPP_STACKTRACES": f"{started}-not"})
    assert helpers._TORCH_SERVER.serves({**os.environ, "GPU_NN_ANYTHING": "1", "TRITON_INTERPRET": "0"})


# The configurations known to spill registers in the specialisation aot_specs() compiles (sm_90,
# Triton 3.9), bytes of stack frame per thread. Until 2026-12-01 the check read cuobjdump's LOCAL,
# which stays 0 (ptxas keeps spills in the stack frame), so these went unseen. Most spill only in
# that *generic* specialisation -- every stride a run-time int -- while a launch specialises the
# strides equal to 1 (Triton's JIT compiles an int argument equal to 1 as a constant): every dense
# matmul configuration, compiled in linear's three layouts with the unit strides and 16-divisible
# pointers and sizes such launches have (dense.launched_specs(), `gpu-nn sass --launched`), does
# not spill (110-254 registers; the half tiles with their 3-stage pipeline);
# and the recurrent projection's 128x128x32 tile (unit K or N strides: 194-197 registers, 0 bytes). The
# persistent kernels' spills (8-24 B: one to three long-lived values reloaded once per step, in
# a kernel whose step is a grid barrier) moved when they came to deal (batch, hidden) tiles
# rather than hidden tiles alone: the half and TF32 LSTM / GRU forwards, the default path, lost
# theirs; the exact-float32 LSTM / GRU forwards and the Elman tanh half forwards and backwards
# gained one; the forwards' went again when the tile indices became one jit helper
# (kernels/triton/rnn.py _tile_index), the Elman half backwards' stayed. The list is exact: a new
# spill fails, and so does an entry that stops spilling (remove it then), in the pairs and full
# runs, which compile every entry (the default run, the entries among the specs it compiles).
KNOWN_SPILLS = {
    ("_matmul_kernel", "fp32 ieee 128x128x32 g8 w8 s3"): 192,
    ("_matmul_kernel", "fp32 ieee 128x64x32 g8 w4 s3"): 136,
    ("_matmul_kernel", "fp16 ieee 128x128x64 g8 w8 s3"): 24,
    ("_matmul_kernel", "fp16 ieee 128x256x64 g8 w8 s3"): 296,
    ("_matmul_kernel", "fp16 ieee 256x128x64 g8 w8 s3"): 728,
    ("_matmul_kernel", "bf16 ieee 128x128x64 g8 w8 s3"): 24,
    ("_matmul_kernel", "bf16 ieee 128x256x64 g8 w8 s3"): 296,
    ("_matmul_kernel", "bf16 ieee 256x128x64 g8 w8 s3"): 728,
    ("_rnn_matmul_kernel", "matmul fp32xfp32->fp32 dot3 128x128x32 w8"): 248,
    ("_rnn_matmul_kernel", "matmul fp16xfp16->fp32 dot1 128x128x32 w8"): 296,
    ("_rnn_matmul_kernel", "matmul fp32xfp16->fp32 dot1 128x128x32 w8"): 296,
    ("_rnn_matmul_kernel", "matmul fp32xfp16->fp16 dot1 128x128x32 w8"): 256,
    ("_rnn_matmul_kernel", "matmul fp32xfp32->fp16 dot3 128x128x32 w8"): 200,
    ("_rnn_matmul_kernel", "matmul bf16xbf16->fp32 dot2 128x128x32 w8"): 296,
    ("_rnn_matmul_kernel", "matmul fp32xbf16->fp32 dot2 128x128x32 w8"): 296,
    ("_rnn_matmul_kernel", "matmul fp32xbf16->bf16 dot2 128x128x32 w8"): 256,
    ("_rnn_matmul_kernel", "matmul fp32xfp32->bf16 dot3 128x128x32 w8"): 200,
    ("_rnn_persist_bwd_kernel", "persist bwd rnn_tanh fp16 dot1 dout fp16 w4 s1"): 8,
    ("_rnn_persist_bwd_kernel", "persist bwd rnn_tanh fp16 dot1 dout fp32 w4 s1"): 8,
    ("_rnn_persist_bwd_kernel", "persist bwd rnn_tanh bf16 dot2 dout bf16 w4 s1"): 8,
    ("_rnn_persist_bwd_kernel", "persist bwd rnn_tanh bf16 dot2 dout fp32 w4 s1"): 8,
    # the two-direction resident backward at KP 512 in exact float32 (255 registers): found by a
    # full run (GPU_NN_AOT_FULL=1) at stop 63, spilling at its start commit 47197d5 already (the
    # default cover did not compile these two); not launched while RESIDENT_BWD_MAX_KP is 256.
    # Triton 3.6's ptxas fits them (242 registers, KNOWN_SPILLS_TRITON_36)
    ("_rnn_persist2_bwd_kernel", "pair persist bwd rnn_tanh fp32 dot3 dout fp32 kp512 w8 s1"): 24,
    ("_rnn_persist2_bwd_kernel", "pair persist bwd rnn_relu fp32 dot3 dout fp32 kp512 w8 s1"): 8,
    # the two-direction recurrent matmul (_rnn_matmul2_kernel: a bidirectional layer's products in
    # one launch), the one-direction kernel's 128x128 tile: its generic form spills as that one's
    # does (above); launched only for products of fewer than a wave of tiles (MATMUL_PAIR_MAX_TILES)
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp32->fp32 dot3 128x128x32 w8"): 136,
    ("_rnn_matmul2_kernel", "pair matmul fp16xfp16->fp32 dot1 128x128x32 w8"): 64,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp16->fp32 dot1 128x128x32 w8"): 64,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp16->fp16 dot1 128x128x32 w8"): 104,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp32->fp16 dot3 128x128x32 w8"): 120,
    ("_rnn_matmul2_kernel", "pair matmul bf16xbf16->fp32 dot2 128x128x32 w8"): 64,
    ("_rnn_matmul2_kernel", "pair matmul fp32xbf16->fp32 dot2 128x128x32 w8"): 64,
    ("_rnn_matmul2_kernel", "pair matmul fp32xbf16->bf16 dot2 128x128x32 w8"): 104,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp32->bf16 dot3 128x128x32 w8"): 120,
}


# Triton 3.6 (the H200 image's): where its ptxas spills otherwise than 3.9's (KNOWN_SPILLS);
# read off this suite run under torch 2.11 + Triton 3.6 on the CPU machine (7f4dce1). 0: none there
# (the L2-form GRU float32 persistent backward's 8 B went with the resident backward's change of
# its tile code: ptxas under 3.6 now fits it without spilling; the two-direction GRU float32
# forward's 8 B went, as 3.9's persistent forward spills did, with the _tile_index helper)
KNOWN_SPILLS_TRITON_36 = {
    ("_rnn_persist2_bwd_kernel", "pair persist bwd rnn_tanh fp32 dot3 dout fp32 kp512 w8 s1"): 0,
    ("_rnn_persist2_bwd_kernel", "pair persist bwd rnn_relu fp32 dot3 dout fp32 kp512 w8 s1"): 0,
    ("_conv_fwd_kernel", "fwd large fp32 ieee apix"): 24,
    ("_conv_fwd_kernel", "fwd large fp32 ieee packed"): 16,
    ("_conv_fwd_kernel", "fwd large3 fp32 ieee apix"): 32,
    ("_conv_fwd_kernel", "fwd large3 fp32 ieee flat apix"): 64,
    ("_conv_fwd_kernel", "fwd large3 fp32 ieee packed"): 8,
    ("_conv_fwd_kernel", "fwd large3 fp32 ieee packed apix"): 48,
    ("_conv_fwd_kernel", "fwd large3 fp32 ieee split apix"): 64,
    ("_conv_tma_wgrad_kernel", "wgrad tma8x8 bf16 ieee tma"): 8,
    ("_conv_tma_wgrad_kernel", "wgrad tma8x8 fp16 ieee tma"): 8,
    ("_conv_wgrad_kernel", "wgrad large fp32 ieee packed apix"): 32,
    ("_conv_wgrad_kernel", "wgrad large3 fp32 ieee packed apix"): 32,
    # the class-probability cross-entropy forward in half precision (the kernel as 9844704 left it,
    # one exp per element; found running this file under 3.6 in the stop after)
    ("_ce_fwd_kernel", "bf16 prob weight=False BLOCK=2048 loss=bf16"): 8,
    ("_ce_fwd_kernel", "bf16 prob weight=False BLOCK=2048 loss=fp32"): 8,
    ("_ce_fwd_kernel", "fp16 prob weight=False BLOCK=2048 loss=fp16"): 8,
    ("_ce_fwd_kernel", "fp16 prob weight=False BLOCK=2048 loss=fp32"): 8,
    ("_matmul_kernel", "bf16 ieee 128x128x64 g8 w8 s3"): 0,
    ("_matmul_kernel", "bf16 ieee 128x256x64 g8 w8 s3"): 624,
    ("_matmul_kernel", "bf16 ieee 256x128x64 g8 w8 s3"): 232,
    ("_matmul_kernel", "bf16 ieee 64x128x64 g8 w4 s4"): 120,
    ("_matmul_kernel", "fp16 ieee 128x128x64 g8 w8 s3"): 0,
    ("_matmul_kernel", "fp16 ieee 128x256x64 g8 w8 s3"): 624,
    ("_matmul_kernel", "fp16 ieee 256x128x64 g8 w8 s3"): 232,
    ("_matmul_kernel", "fp16 ieee 64x128x64 g8 w4 s4"): 120,
    ("_matmul_kernel", "fp32 ieee 128x128x32 g8 w8 s3"): 0,
    ("_matmul_kernel", "fp32 ieee 128x64x32 g8 w4 s3"): 0,
    ("_matmul_kernel", "fp32 ieee 64x128x32 g8 w4 s3"): 8,
    ("_matmul_kernel", "fp32 tf32 128x256x32 g8 w8 s3"): 32,
    ("_rnn_matmul2_kernel", "pair matmul bf16xbf16->fp32 dot2 128x128x32 w8"): 200,
    ("_rnn_matmul2_kernel", "pair matmul fp16xfp16->fp32 dot1 128x128x32 w8"): 200,
    ("_rnn_matmul2_kernel", "pair matmul fp32xbf16->bf16 dot2 128x128x32 w8"): 112,
    ("_rnn_matmul2_kernel", "pair matmul fp32xbf16->fp32 dot2 128x128x32 w8"): 208,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp16->fp16 dot1 128x128x32 w8"): 112,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp16->fp32 dot1 128x128x32 w8"): 208,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp32->bf16 dot3 128x128x32 w8"): 136,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp32->fp16 dot3 128x128x32 w8"): 136,
    ("_rnn_matmul2_kernel", "pair matmul fp32xfp32->fp32 dot3 128x128x32 w8"): 216,
    ("_rnn_matmul_kernel", "matmul bf16xbf16->fp32 dot2 128x128x32 w8"): 200,
    ("_rnn_matmul_kernel", "matmul fp16xfp16->fp32 dot1 128x128x32 w8"): 200,
    ("_rnn_matmul_kernel", "matmul fp32xbf16->bf16 dot2 128x128x32 w8"): 112,
    ("_rnn_matmul_kernel", "matmul fp32xbf16->fp32 dot2 128x128x32 w8"): 208,
    ("_rnn_matmul_kernel", "matmul fp32xfp16->fp16 dot1 128x128x32 w8"): 112,
    ("_rnn_matmul_kernel", "matmul fp32xfp16->fp32 dot1 128x128x32 w8"): 208,
    ("_rnn_matmul_kernel", "matmul fp32xfp32->bf16 dot3 128x128x32 w8"): 136,
    ("_rnn_matmul_kernel", "matmul fp32xfp32->fp16 dot3 128x128x32 w8"): 136,
    ("_rnn_matmul_kernel", "matmul fp32xfp32->fp32 dot3 128x128x32 w8"): 216,
    ("_rnn_persist_bwd_kernel", "persist bwd rnn_tanh bf16 dot2 dout bf16 w4 s1"): 0,
    ("_rnn_persist_bwd_kernel", "persist bwd rnn_tanh bf16 dot2 dout fp32 w4 s1"): 0,
    ("_rnn_persist_bwd_kernel", "persist bwd rnn_tanh fp16 dot1 dout fp16 w4 s1"): 0,
    ("_rnn_persist_bwd_kernel", "persist bwd rnn_tanh fp16 dot1 dout fp32 w4 s1"): 0,
    ("_rnn_proj_bwd_kernel", "proj bwd bf16 dot2 dout fp32 B16 next1 final1"): 8,
    ("_rnn_proj_bwd_kernel", "proj bwd fp16 dot1 dout fp32 B16 next1 final1"): 8,
    ("_rnn_step_bwd_kernel", "step bwd gru bf16 dot2 dout fp32 len fp32 next1 final1 16x16x32 w4 s3"): 8,
    ("_rnn_step_bwd_kernel", "step bwd gru fp16 dot1 dout fp32 len fp32 next1 final1 16x16x32 w4 s3"): 8,
    ("_rnn_step_bwd_kernel", "step bwd lstm bf16 dot2 dout fp32 len fp32 next1 final1 16x16x32 w4 s3"): 8,
    ("_rnn_step_bwd_kernel", "step bwd lstm fp16 dot1 dout fp32 len fp32 next1 final1 16x16x32 w4 s3"): 8,
    ("_rnn_step_bwd_kernel", "step bwd rnn_relu bf16 dot2 dout fp32 len fp32 next1 final1 16x16x32 w4 s3"): 8,
    ("_rnn_step_bwd_kernel", "step bwd rnn_relu fp16 dot1 dout fp32 len fp32 next1 final1 16x16x32 w4 s3"): 8,
    ("_rnn_step_bwd_kernel", "step bwd rnn_tanh bf16 dot2 dout fp32 len fp32 next1 final1 16x16x32 w4 s3"): 8,
    ("_rnn_step_bwd_kernel", "step bwd rnn_tanh fp16 dot1 dout fp32 len fp32 next1 final1 16x16x32 w4 s3"): 8,
    # Adam / AdamW float32 without amsgrad since their two quotients are IEEE (tl.div_rn: PTX's
    # div.rn.f32, a fast path and a called slow path, where '/' gave the approximate div.full.f32):
    # 3.6's ptxas keeps them at 64 registers and stores one value to the stack (one STL, one LDL
    # in the SASS, by the chunk loop's head); 3.9's fits them without (sm_90 AOT, every optim
    # spec, both versions)
    ("_adam_kernel", "adam fp32 wd_mode=0 amsgrad=False"): 8,
    ("_adam_kernel", "adam fp32 wd_mode=0 amsgrad=False amp=found_inf"): 8,
    ("_adam_kernel", "adam fp32 wd_mode=2 amsgrad=False"): 8,
    ("_adam_kernel", "adam fp32 wd_mode=2 amsgrad=False amp=found_inf"): 8,
    ("_adam_kernel", "adam fp32 wd_mode=0 amsgrad=False lr_ptr"): 8,
    ("_adam_kernel", "adam fp32 wd_mode=0 amsgrad=False lr_ptr amp=found_inf"): 8,
    ("_adam_kernel", "adam fp32 wd_mode=2 amsgrad=False lr_ptr"): 8,
    ("_adam_kernel", "adam fp32 wd_mode=2 amsgrad=False lr_ptr amp=found_inf"): 8,
}


def _known_spills():
    """The exact spill table of the installed Triton: KNOWN_SPILLS for 3.9 (development and CI),
    with KNOWN_SPILLS_TRITON_36's entries for 3.6 (the H200's image); None for another version
    (its ptxas allocates otherwise: no table to hold it to)."""
    import triton

    version = ".".join(triton.__version__.split(".")[:2])
    if version == "3.9":
        return KNOWN_SPILLS
    if version == "3.6":
        return {**KNOWN_SPILLS, **KNOWN_SPILLS_TRITON_36}
    return None


# the families whose compilation takes minutes, each split over this many tests (every N-th
# spec), so that xdist's workers share them instead of one worker finishing a suite alone
SHARDS = {"conv": 2, "rnn": 2, "dense": 2}
# GPU_NN_AOT_FULL=1 (or GPU_NN_AOT_COVER=all) compiles every spec of every family (882 s of one
# core on the 2-core CPU machine when last timed, 5816991, Triton 3.9, cold cache: the suite's
# largest part). By default a subset of each kernel's specs in which every factor value is compiled at
# least once is (_aot.covering, order 1: 237 of 1,542 specs, a TMA descriptor's block counted
# dimension by dimension), the rest of an all-pairs subset (635 chosen without the spill table,
# 428 of them not compiled already) go through Triton's front end only, where a kernel's own code
# fails, and the others (877) are listed only (until stop 80 all 1,305 went through the front
# end: 78 s of every run; a front-end failure needing three factors together now hides from the
# default run too); GPU_NN_AOT_COVER=pairs compiles the
# all-pairs subset (635 specs; the default until stop 58, when the suite neared CI's 15 minutes)
# and takes every other spec through the front end. The spill
# table above is held exactly (an entry that stops spilling fails too) where every entry is
# compiled: in the full and pairs runs, which force the table's specs in. The default run checks
# the entries among the specs it compiles and fails any other spill, but does not force the rest in:
# they are generic specialisations no launch compiles (the launched forms are held to no spills by
# test_linear_launched_forms_compile_without_spills and `gpu-nn sass --launched`), and compiling
# them took 80 of the default run's 390 worker-seconds (tiles spilling 8 to 728 B a thread: the
# slowest ptxas runs; the suite went past CI's 15 minutes at stop 76). A spill or backend failure
# that needs two factors together hides from the default subset until a pairs or full run, which
# runs at every stop that touches a kernel (README, Tests).
AOT_COVER = aot_cover()
AOT_CASES = [(fam, f"{k}/{SHARDS.get(fam, 1)}") for fam in ktriton.FAMILIES for k in range(SHARDS.get(fam, 1))]


@pytest.mark.parametrize("family,shard", AOT_CASES, ids=[f"{f}-{s.replace('/', 'of')}" for f, s in AOT_CASES])
def test_triton_kernels_compile_for_sm90(family, shard, tmp_path):
    known = _known_spills()
    rows, proc = _aot_rows(family, tmp_path, shard, cover=AOT_COVER,
                          must=set(known or ()) if AOT_COVER == "pairs" else ())
    k, n = (int(v) for v in shard.split("/"))
    assert [(r["kernel"], r["label"]) for r in rows] == [(s.name, s.label) for s in _aot.family_specs(family)[k::n]]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} [{r['label']}]: {r['error']}" for r in failed)
    assert proc.returncode == 0
    rows = [r for r in rows if r["compiled"]]  # (the others passed the front end or were listed only)
    assert rows, f"no spec compiled for {family} shard {shard}"
    # Triton's store of a wide transposed 32-bit wgmma operand (see _aot.wide_transposed_32bit)
    wide = [r for r in rows if r["wide_transposed_32bit"]]
    assert not wide, "float32 wgmma operands stored transposed past 256 (Triton misplaces them): " + ", ".join(
        f"{r['kernel']} [{r['label']}] {r['wide_transposed_32bit']}" for r in wide)
    # torch's CUDA average pooling and optimizer steps divide IEEE; ours do too (tl.div_rn: Triton's
    # float32 '/' is PTX's approximate div.full.f32), so pooling's float32 results are torch's bit
    # for bit (test_pool's summation-order tests check the sums under the interpreter) and a step's
    # quotients are IEEE-rounded as torch's
    approx = [r for r in rows if (r["kernel"].startswith("_avg_pool") or family == "optim") and r["approx_div_f32"]]
    assert not approx, "approximate float32 divisions in average pooling or an optimizer: " + ", ".join(
        f"{r['kernel']} [{r['label']}] {r['approx_div_f32']}" for r in approx)
    if known is None:
        import triton

        pytest.skip(f"every {family} spec compiled, through the front end or listed as its cover says; no spill table for Triton {triton.__version__} (3.9 and 3.6 have one)")
    # spilled registers live in the stack frame (LOCAL stays 0 for Triton kernels: see _aot._resources)
    changed = [r for r in rows if r["spill_bytes"] != known.get((r["kernel"], r["label"]), 0)]
    assert not changed, "register spills (bytes per thread) differ from the known table: " + ", ".join(
        f"{r['kernel']} [{r['label']}] {r['spill_bytes']} B, known "
        f"{known.get((r['kernel'], r['label']), 0)}" for r in changed)


def test_aot_catches_a_compile_error(tmp_path):
    """The AOT check must be able to fail: a kernel with a type error is reported, not passed."""
    code = (
        "import triton, triton.language as tl\n"
        "from gpu_nn.kernels.triton._aot import AotSpec, compile_spec\n"
        "@triton.jit\n"
        "def bad(x_ptr, B: tl.constexpr):\n"
        "    tl.store(x_ptr + tl.arange(0, B), tl.dot(tl.zeros((B, 3), tl.float32), tl.zeros((3, B), tl.float32)))\n"
        "compile_spec(AotSpec(bad, {'x_ptr': '*fp32', 'B': 'constexpr'}, {'B': 16}))\n"
    )
    proc = _run_uninterpreted(tmp_path, "bad_kernel.py", code)
    # (any failure would exit non-zero: an import error, the interpreter's refusal; the compiler's)
    assert proc.returncode != 0 and "CompilationError" in proc.stderr, proc.stderr[-2000:]


def test_wide_transposed_float32_operands_found_and_the_resident_backward_has_none(tmp_path):
    """Triton 3.6 / 3.9 store a transposed float32 wgmma operand (``tl.trans`` of a loaded tile as
    the A operand) physically transposed, and past 256 rows put rows 256 and up where the wgmma
    does not read them: the H200's wrong float32 gradients of the resident recurrent backward at
    KP 512 (its sm_90 PTX emulated on the CPU: benchmarks/results/aot/
    rnn_resident_bwd_trans_a331102.md). The check must be able to fail: a [64, 512] float32 tile
    transposed into a TF32 dot is found, 256 wide it is not, the same operand loaded transposed is
    not; and the resident backward's float32 forms at KP 512 (one and two directions), which
    loaded W_hh with ``tl.trans`` before the fix, have none."""
    code = (
        "import json, triton, triton.language as tl\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from gpu_nn.kernels.triton._aot import compile_spec, compile_with_ir, wide_transposed_32bit\n"
        "from gpu_nn.kernels.triton import rnn as kt\n"
        "@triton.jit\n"
        "def k(w_ptr, d_ptr, o_ptr, M: tl.constexpr, TRANS: tl.constexpr):\n"
        "    rk = tl.arange(0, 64)\n"
        "    rm = tl.arange(0, M)\n"
        "    rn = tl.arange(0, 16)\n"
        "    if TRANS:\n"
        "        a = tl.trans(tl.load(w_ptr + rk[:, None] * M + rm[None, :]))\n"
        "    else:\n"
        "        a = tl.load(w_ptr + rk[None, :] * M + rm[:, None])\n"
        "    d = tl.load(d_ptr + rk[:, None] * 16 + rn[None, :])\n"
        "    tl.store(o_ptr + rm[:, None] * 16 + rn[None, :], tl.dot(a, d, input_precision='tf32'))\n"
        "found = []\n"
        "for m, trans in ((512, True), (256, True), (512, False)):\n"
        "    src = ASTSource(fn=k, signature={'w_ptr': '*fp32', 'd_ptr': '*fp32', 'o_ptr': '*fp32', 'M': 'constexpr',\n"
        "                                     'TRANS': 'constexpr'}, constexprs={'M': m, 'TRANS': trans})\n"
        "    c = compile_with_ir(src, {'num_warps': 4})\n"
        "    found.append(wide_transposed_32bit(c.asm['ttgir']))\n"
        "single = kt._persist_bwd_spec('lstm', 'fp32', 'fp32', kt.DOT_CODES['tf32'], 512)\n"
        "for spec in (single, kt._pair_spec(kt._rnn_persist2_bwd_kernel, single)):\n"
        "    row = compile_spec(spec, sass=False)\n"
        "    found.append([row['kernel'], row['spill_bytes'], row['wide_transposed_32bit']])\n"
        "print(json.dumps(found))\n"
    )
    wide, narrow, loaded, single, pair = _uninterpreted_json(tmp_path, "wide_transposed.py", code)
    assert wide == ["memdesc<64x512xf32, #shared>"] or (len(wide) == 1 and "64x512xf32" in wide[0]), wide
    assert narrow == [] and loaded == []
    assert single == ["_rnn_persist_bwd_kernel", 0, []] and pair == ["_rnn_persist2_bwd_kernel", 0, []], (single, pair)


def test_resident_backward_ptx_emulated_matches_the_interpreter(tmp_path):
    """The resident persistent backward's compiled sm_90 PTX (LSTM, both directions, float32
    under TF32, KP 64: a wgmma), run on the CPU by benchmarks/ptxemu.py for every program and the
    grid barrier, writes what the interpreter's L2 form of the same launch writes: a check of the
    compiled kernel itself, which the interpreter does not run (at KP 512 it gave the H200's
    wrong gradients: benchmarks/results/aot/rnn_resident_bwd_trans_a331102.md)."""
    from gpu_nn.benchmarks import rnn_ptx_emulate

    code = ("import sys\nfrom gpu_nn.benchmarks import rnn_ptx_emulate\n"
            "sys.exit(rnn_ptx_emulate.main(['--mode', 'lstm', '--H', '64', '--T', '3', '--json', sys.argv[0] + '.json']))\n")
    proc = _run_uninterpreted(tmp_path, "emulate.py", code)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "emulate.py.json").read_text())
    assert res["KP"] == 64 and res["directions"] == 2 and res["ok"]
    assert set(res["max_rel_err"]) == set(rnn_ptx_emulate.outputs("lstm", False))
    assert res["worst"] <= rnn_ptx_emulate.TOL


def test_tma_chooser_gate_follows_the_register_operand_moves_in_the_ptx(tmp_path):
    """kernels/triton/conv.py keeps the TMA tiles from the measuring chooser on a Triton whose
    pipelined register-operand wgmma may have its A registers rewritten while in flight
    (triton-lang/triton issue 9433): the installed Triton's sm_90 PTX of a pipelined TMA forward
    tile has register-operand wgmmas, guarded by moves to fresh registers wherever TMA_CHOOSER is
    on (Triton 3.9: every one, gate on; 3.6: none, gate off; 3.7 / 3.8, not read, gate off)."""
    code = (
        "import json\n"
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from gpu_nn.kernels.triton import conv as kc\n"
        "from gpu_nn.kernels.triton._aot import _source, compile_with_ir, rs_wgmma_unguarded\n"
        "(s,) = [s for s in kc.aot_specs() if s.label == 'fwd tma8x8 bf16 ieee tma']\n"
        "c = compile_with_ir(_source(s.kernel, s.signature, s.constexprs, s.divisible_by_16),\n"
        "                    {'num_warps': s.num_warps, 'num_stages': s.num_stages})\n"
        "print(json.dumps([s.num_stages, *rs_wgmma_unguarded(c.asm['ptx']), kc.TMA_CHOOSER, triton.__version__]))\n"
    )
    stages, rs, unguarded, chooser, version = _uninterpreted_json(tmp_path, "rs_moves.py", code)
    assert stages > 1 and rs > 0
    if chooser:  # offered only where the PTX has the moves
        assert unguarded == 0, (rs, unguarded, version)
    if version.startswith(("3.6.", "3.9.")):  # the two read: 3.6 has none (gated off), 3.9 all
        assert unguarded == (rs if version.startswith("3.6.") else 0) and chooser == version.startswith("3.9."), (
            rs, unguarded, chooser, version)


def test_aot_sees_register_spills(tmp_path):
    """The spill check must be able to fail: the same small kernel compiled with its registers
    capped at 32 (``maxnreg``) spills, and ``_resources`` reports it (stack frame, STL / LDL in the
    SASS); uncapped it does not. ptxas puts spills in the stack frame, not in LOCAL."""
    code = (
        "import json, triton, triton.language as tl\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from gpu_nn.kernels.triton._aot import _resources, compile_with_ir\n"
        "@triton.jit\n"
        "def k(x_ptr, y_ptr, B: tl.constexpr):\n"
        "    offs = tl.arange(0, B)\n"
        "    x = tl.load(x_ptr + offs)\n"
        "    tl.store(y_ptr + offs, x / tl.sum(x * x, axis=0) + tl.sqrt(x))\n"
        "rows = []\n"
        "for cap in ({}, {'maxnreg': 32}):\n"
        "    src = ASTSource(fn=k, signature={'x_ptr': '*fp32', 'y_ptr': '*fp32', 'B': 'constexpr'}, constexprs={'B': 1024})\n"
        "    c = compile_with_ir(src, {'num_warps': 1, **cap})\n"
        "    rows.append(_resources(c.asm['cubin']))\n"
        "print(json.dumps(rows))\n"
    )
    free, capped = _uninterpreted_json(tmp_path, "spill_kernel.py", code)
    assert free["spill_bytes"] == 0 and free["spill_stores"] == 0
    assert capped["registers"] <= 32 and capped["spill_bytes"] > 0 and capped["spill_stores"] > 0 and capped["spill_loads"] > 0


@pytest.mark.parametrize("name", kcuda.sources() or [pytest.param(None, marks=pytest.mark.skip(reason="no .cu sources yet"))])
def test_cuda_sources_compile_with_nvrtc_for_sm90(name):
    cubin = kcuda.compile_cubin(name, arch="sm_90")
    assert cubin[:4] == b"\x7fELF"


def test_cuda_sass_report_reads_a_whole_cubin():
    """compile_cubin returns the cubin whole (CuPy's getCUBIN drops its last byte, which cuobjdump
    refuses), and sass_report reads every kernel of it: registers, stack, instructions, the
    straight path and the access widths."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(kcuda.source("pool"), "pool.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-arch=sm_90", "-std=c++17", f"-I{kcuda.include_dir()}"])
        whole, cupys = kcuda._cubin(nvrtc, prog), nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    assert whole[:len(cupys)] == cupys and len(whole) >= len(cupys)
    report = kcuda.sass_report(kcuda.compile_cubin("pool"))
    assert sorted(report) == ["pool_avg_bwd", "pool_avg_fwd", "pool_max_bwd", "pool_max_fwd"]
    for r in report.values():
        assert r["registers"] > 0 and r["instructions"] > r["straight"] > 0 and r["global_loads"], r


def test_one_disassembler_run_reads_what_cuobjdump_reads():
    """sass.disassemble reads many cubins with one nvdisasm run (cuobjdump starts one per cubin,
    about 0.7 s each): every function's instructions and addresses are cuobjdump's, the code
    addresses of branches, reconvergence points, calls, returns and warp syncs (BRA, BRA.DIV,
    BSSY, CALL.REL, RET.REL, WARPSYNC.COLLECTIVE: the CUDA C recurrent module has each) made the
    function's again, the module read both first and deep in the run's file. A cubin it cannot
    read so (another architecture) is left to cuobjdump."""
    from gpu_nn.kernels.sass import _code_sections, cuobjdump, disassemble, functions

    rnn = kcuda.compile_cubin("rnn")
    norm = lambda fns: {k: [(a, " ".join(t.split())) for a, t in v] for k, v in fns.items()}  # noqa: E731
    want = norm(functions(cuobjdump(rnn)[1]))
    got = [norm(functions(t)) for t in disassemble([rnn, rnn])]
    assert got == [want, want] and [list(g) for g in got] == [list(want)] * 2 and len(want) > 1
    ops = {t.split()[1 if t.startswith("@") else 0] for ins in want.values() for _, t in ins}
    assert {"BRA", "BRA.DIV", "BSSY", "CALL.REL.NOINC", "RET.REL.NODEC", "WARPSYNC.COLLECTIVE"} <= ops
    ampere = kcuda.compile_cubin("pool", arch="sm_80")
    assert _code_sections(rnn) and _code_sections(ampere) is None
    assert sorted(functions(disassemble([ampere])[0])) == ["pool_avg_bwd", "pool_avg_fwd", "pool_max_bwd", "pool_max_fwd"]


def test_cubin_read_only_through_an_nvrtc_of_cupys_version(tmp_path, monkeypatch):
    """The cubin is read through an NVRTC library of CuPy's own version, never another one this
    process maps (torch's CUDA 13 builds map a libnvrtc.so.13 beside cupy-cuda12x's 12: a program
    handle passed to another version is undefined behaviour); with none of that version, an sm_XX
    build is refused (CuPy's reading is one byte short) and binary_path keeps PTX for that
    architecture instead; an empty cached file (a write cut short) is built again."""
    from cupy_backends.cuda.libs import nvrtc

    version = nvrtc.getVersion()
    lib = kcuda._nvrtc_library(version)
    assert lib is not None and kcuda._library_version(lib) == tuple(version)
    assert kcuda._nvrtc_library((version[0] + 90, 0)) is None
    monkeypatch.setattr(kcuda, "_nvrtc_library", lambda v: None)
    with pytest.raises(kcuda.CubinUnreadable, match="CuPy's version"):
        kcuda.compile_cubin("pool", arch="sm_90")
    monkeypatch.setenv(kcuda.CACHE_ENV, str(tmp_path / "cache"))
    real_compile, asked = kcuda.compile_binary, []
    monkeypatch.setattr(kcuda, "compile_binary", lambda name, defines=None, arch="sm_90", extra_options=(): (
        asked.append(arch), real_compile(name, defines, arch, extra_options))[1])
    path = kcuda.binary_path("pool", (), "sm_90", version)
    assert asked == ["compute_90"]  # no sm_90 compile that could only fail
    assert path.endswith(".ptx") and open(path, "rb").read().lstrip().startswith(b"//")
    assert ".target sm_90" in open(path).read()
    built = []
    monkeypatch.setattr(kcuda, "compile_binary", lambda name, defines=None, arch="sm_90", extra_options=(): built.append(arch) or b"BIN")
    open(path, "wb").close()  # emptied
    assert kcuda.binary_path("pool", (), "compute_90", version) == path and built == ["compute_90"]
    assert open(path, "rb").read() == b"BIN"


def _ftz_instructions(ptx: bytes) -> list[str]:
    """The flush-to-zero PTX instructions of ``ptx`` other than the approximate ``ex2`` and
    ``rcp`` that libdevice's own ``expf`` / ``tanhf`` issue under any option."""
    ops = re.findall(r"\b([a-z0-9]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*)", ptx.decode())
    return [o for o in ops if not o.startswith(("ex2.approx.", "rcp.approx."))]


@pytest.mark.parametrize("name", kcuda.sources())
def test_cuda_modules_keep_subnormals(name):
    """The CUDA C modules are built without flush-to-zero: torch's CUDA kernels (nvcc's default)
    and the reference keep subnormal float32 values, which CuPy's own compile (``-ftz=true``
    appended to every RawModule's options) flushes. The same build with ``-ftz=true`` shows the
    check sees it."""
    assert _ftz_instructions(kcuda.compile_binary(name, arch="compute_90")) == []
    assert len(_ftz_instructions(kcuda.compile_binary(name, arch="compute_90", extra_options=("-ftz=true",)))) > 20


def test_cuda_optimizer_steps_contract_only_what_the_source_fuses():
    """The optimizer steps' builds contract no multiply and add into an FMA the source does not
    write as ``fmaf`` (SOURCE_OPTIONS ``--fmad=false``): NVRTC's default fused Adam's second moment one way in the
    16-byte path and another in the element-at-a-time one (about a quarter of the elements 1 ulp
    apart, a tensor's bits hanging on its alignment). Adam's source has no fmaf: none in its PTX;
    RMSprop's centred average has one (the same count in both of its paths); NVRTC's default,
    appended, fuses dozens (the check sees it)."""
    def fmas(extra=()):
        ptx = kcuda.compile_binary("optim", {"PARAM_KIND": 0}, arch="compute_90", extra_options=extra).decode()
        entries = re.split(r"\.visible \.entry ", ptx)[1:]
        return {e.split("(")[0]: len(re.findall(r"\bfma\.rn\.f32\b", e)) for e in entries}

    ours, default = fmas(), fmas(("--fmad=true",))
    assert ours["adam_step"] == ours["adam_step_lr_ptr"] == 0, ours
    assert 0 < ours["rmsprop_step"] < 16, ours
    assert default["adam_step"] > 20 and default["rmsprop_step"] > ours["rmsprop_step"] + 20, default
    assert "--fmad=false" not in kcuda.options("rnn")  # the recurrent loop's float32 dot keeps its FMAs


def test_target_arch_is_the_devices_own_or_ptx_below_it():
    have = (75, 80, 86, 89, 90, 100, 120)
    assert kcuda.target_arch("90", have) == "sm_90"
    assert kcuda.target_arch("87", have) == "compute_86"  # no sm_87 cubin here: PTX the driver compiles forward
    assert kcuda.target_arch("130", have) == "compute_120"
    with pytest.raises(RuntimeError, match="sm_70"):
        kcuda.target_arch("70", have)
    with pytest.raises(ValueError, match="sm_XX"):
        kcuda.compile_cubin("pool", arch="compute_90")


def test_cuda_binaries_are_kept_on_disk_under_every_header(tmp_path, monkeypatch):
    """A compiled module is written once per (every .cu and .cuh, source, defines, arch, NVRTC)
    and read back after; a change to a header alone gives a new file (CuPy keyed a module by
    the .cu it was handed, so an edited header was served stale from its cache)."""
    import shutil

    built = []

    def fake_compile(name, defines=None, arch="sm_90", extra_options=()):
        built.append((name, dict(defines or {}), arch))
        return b"BIN%d" % len(built)

    monkeypatch.setenv(kcuda.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(kcuda, "compile_binary", fake_compile)
    monkeypatch.setattr(kcuda, "_nvrtc_library", lambda version: object())  # a cubin readable for every version
    kcuda.sources_digest.cache_clear()
    a = kcuda.binary_path("pool", (("POOL_KH", 3),), "sm_90", (12, 9))
    assert kcuda.binary_path("pool", (("POOL_KH", 3),), "sm_90", (12, 9)) == a and len(built) == 1
    assert open(a, "rb").read() == b"BIN1" and a.endswith(".cubin") and a.startswith(str(tmp_path / "cache"))
    others = {kcuda.binary_path("pool", (("POOL_KH", 2),), "sm_90", (12, 9)),
              kcuda.binary_path("pool", (("POOL_KH", 3),), "sm_100", (12, 9)),
              kcuda.binary_path("pool", (("POOL_KH", 3),), "sm_90", (13, 0)),
              kcuda.binary_path("optim", (("POOL_KH", 3),), "sm_90", (12, 9))}
    ptx = kcuda.binary_path("pool", (("POOL_KH", 3),), "compute_90", (12, 9))
    assert len(others | {a, ptx}) == 6 and len(built) == 6 and ptx.endswith(".ptx")
    copy = tmp_path / "src"
    shutil.copytree(kcuda.HERE, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (copy / "pool_math.cuh").write_text((copy / "pool_math.cuh").read_text() + "\n// edited\n")
    monkeypatch.setattr(kcuda, "HERE", str(copy))
    kcuda.sources_digest.cache_clear()
    try:
        edited = kcuda.binary_path("pool", (("POOL_KH", 3),), "sm_90", (12, 9))
    finally:
        kcuda.sources_digest.cache_clear()
    assert edited != a and len(built) == 7


def test_load_builds_the_module_itself_and_cupy_only_loads_it(tmp_path, monkeypatch):
    """``load`` hands CuPy a cubin built here (our options, no ``-ftz``) by path, never source
    text (which CuPy would compile with ``-ftz=true``), for the device's architecture, with the
    cooperative flag for the grid-barrier kernels."""
    import cupy

    made = []

    class FakeModule:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def compile(self):
            pass

    class FakeDevice:
        compute_capability = "90"

        def __init__(self, index):
            self.index = index

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setenv(kcuda.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cupy, "RawModule", FakeModule)
    monkeypatch.setattr(cupy.cuda, "Device", FakeDevice)
    defines = (("OPTIM_CHUNK", 16384), ("PARAM_KIND", 0))
    inspect.unwrap(kcuda._load)("optim", defines, 0, True)  # uncached (and unwrapped of gpu-nn check's timer)
    assert len(made) == 1 and set(made[0]) == {"path", "enable_cooperative_groups"}
    assert made[0]["enable_cooperative_groups"] is True
    with open(made[0]["path"], "rb") as f:
        assert f.read() == kcuda.compile_cubin("optim", dict(defines), arch="sm_90")


def test_launch_streams_are_made_once_without_cupys_deprecated_class(monkeypatch):
    """The CuPy stream object of torch's current stream is made once per (handle, device) and
    reused by later launches: through CuPy 14's ``Stream.from_external`` (its ``ExternalStream``
    warns DeprecationWarning at every construction, which launch made once per launch), through
    ``ExternalStream`` where CuPy has no ``from_external`` (13); the table is bounded."""
    import types

    made = []

    class Stream:
        @classmethod
        def from_external(cls, obj):
            made.append(("from_external", obj.__cuda_stream__()))
            return object()

    class ExternalStream:
        def __init__(self, ptr, device):
            made.append(("ExternalStream", ptr, device))

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=Stream, ExternalStream=ExternalStream))
    monkeypatch.setattr(kcuda, "_STREAMS", {})
    a = kcuda.cupy_stream(fake, 0x1234, 0)
    assert kcuda.cupy_stream(fake, 0x1234, 0) is a and kcuda.cupy_stream(fake, 0x99, 1) is not a
    assert made == [("from_external", (0, 0x1234)), ("from_external", (0, 0x99))]
    del Stream.from_external  # CuPy 13
    made.clear()
    b = kcuda.cupy_stream(fake, 0x77, 2)
    assert kcuda.cupy_stream(fake, 0x77, 2) is b and made == [("ExternalStream", 0x77, 2)]
    monkeypatch.setattr(kcuda, "_MAX_STREAMS", 3)
    kcuda.cupy_stream(fake, 0x78, 2)
    assert len(kcuda._STREAMS) == 1  # cleared when full, then this one kept


def test_launch_runs_inside_the_device_then_a_kept_stream(monkeypatch):
    """kcuda.launch enters the tensor's device, then the stream object made once for torch's
    current stream there (CuPy 14's Stream.from_external takes the current device as the
    stream's), and launches inside both; a second launch on the same stream makes none."""
    import sys
    import types

    import numpy as np
    import torch

    events = []

    class Ctx:
        def __init__(self, what):
            self.what = what

        def __enter__(self):
            events.append(("enter", self.what))

        def __exit__(self, *exc):
            events.append(("exit", self.what))

    class Stream:
        @classmethod
        def from_external(cls, obj):
            events.append(("made", obj.__cuda_stream__()))
            return Ctx(("stream", obj.__cuda_stream__()[1]))

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=Stream, Device=lambda i: Ctx(("device", i))))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(kcuda, "_STREAMS", {})
    # a torch without the raw-handle call (its CPU builds): the Stream object's handle
    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream", raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: types.SimpleNamespace(cuda_stream=0xABC))
    monkeypatch.setattr(kcuda, "function", lambda mod, k: lambda grid, block, args, shared_mem=0: events.append(
        ("launch", k, grid, block)))
    for _ in range(2):
        kcuda.launch("mod", "kern", (3,), (256,), (np.int32(1),), device=1)
    assert events == [("enter", ("device", 1)), ("made", (0, 0xABC)), ("enter", ("stream", 0xABC)),
                      ("launch", "kern", (3,), (256,)), ("exit", ("stream", 0xABC)), ("exit", ("device", 1))] + [
        ("enter", ("device", 1)), ("enter", ("stream", 0xABC)), ("launch", "kern", (3,), (256,)),
        ("exit", ("stream", 0xABC)), ("exit", ("device", 1))]
    # torch's CUDA builds: the raw handle of the device's current stream, no Stream object made
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: {1: 0xABC}[device], raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", None)
    events.clear()
    kcuda.launch("mod", "kern", (3,), (256,), (np.int32(1),), device=1)
    assert ("launch", "kern", (3,), (256,)) in events and ("enter", ("stream", 0xABC)) in events


def test_straight_path_follows_the_guards_and_stops_at_a_loop():
    from gpu_nn.kernels.sass import straight_path

    listing = [(0x00, "S2R R0, SR_TID.X"), (0x10, "@P0 EXIT"), (0x20, "@!P1 BRA 0x50"), (0x30, "IADD3 R1, R0, 1, RZ"),
               (0x40, "BRA 0x70"), (0x50, "IADD3 R1, R0, 2, RZ"), (0x60, "NOP"), (0x70, "STG.E [R2.64], R1"),
               (0x80, "@!P2 BRA 0x30"), (0x90, "EXIT")]
    # S2R, @P0 EXIT and @!P1 BRA (not taken), IADD3, BRA (taken, forward), STG, @!P2 BRA (not
    # taken: the loop runs once), EXIT; an unconditional backward branch ends the path
    assert straight_path(listing) == 8
    assert straight_path(listing[:8] + [(0x80, "BRA 0x30"), (0x90, "EXIT")]) == 7
    assert straight_path(listing[:2] + [(0x20, "EXIT")]) == 3


def test_pool_window_compiled_in_unrolls_its_taps():
    """A pooling module compiled for its window (gpu_nn.ops.pool's launches of windows up to 64
    taps) has no loop left in the forward kernels but the grid-stride loop over outputs (which
    the compiler versions in two on a launch-wide condition: indices stored or not for max, a
    divisor override for avg), where the run-time window kernels loop over rows and taps; and the
    32-bit max kernels call no subroutine (no integer division) and spill nothing."""
    import torch

    from gpu_nn.kernels.sass import _BRANCH, disassemble, functions
    from gpu_nn.ops import pool

    fixed = kcuda.compile_cubin("pool", pool.cuda_defines(torch.float32, True, False, pool._window((3, 3), (2, 2)), True))
    runtime = kcuda.compile_cubin("pool", pool.cuda_defines(torch.float32, True, False, None, True))
    listings = dict(zip(("fixed", "runtime"), disassemble([fixed, runtime])))

    def back_edges(which, kernel):
        ins = functions(listings[which])[kernel]
        return sum(1 for a, t in ins if _BRANCH.match(t) and int(_BRANCH.match(t).group(2), 16) < a)

    for kernel in ("pool_max_fwd", "pool_avg_fwd"):
        assert back_edges("fixed", kernel) == 2 < back_edges("runtime", kernel), kernel
    report = kcuda.sass_report(fixed, listings["fixed"])
    assert all(report[k]["calls"] == 0 and report[k]["stack_bytes"] == 0 for k in ("pool_max_fwd", "pool_max_bwd"))


def test_sass_cuda_table(monkeypatch, capsys):
    """``gpu-nn sass --cuda`` on one build (the whole list takes about 10 s): a row per kernel."""
    from gpu_nn.benchmarks import sass_report
    from gpu_nn.cli import main

    builds = sass_report.cuda_builds()
    assert {b[0] for b in builds} == {"pool", "optim", "rnn"}
    monkeypatch.setattr(sass_report, "cuda_builds", lambda: builds[:1])
    assert main(["sass", "--cuda"]) == 0
    out = capsys.readouterr().out
    assert "pool_max_fwd" in out and "4 kernels, 0 builds failed" in out


def test_nvrtc_reports_errors():
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }', "bad.cu", [], [])
    with pytest.raises(nvrtc.NVRTCError):
        nvrtc.compileProgram(prog, ["-arch=sm_90"])
    nvrtc.destroyProgram(prog)


def test_linear_launched_forms_compile_without_spills(tmp_path):
    """dense.launched_specs(): every pointer-matmul configuration in each of linear's three layouts,
    its unit strides constant and the rest multiples of 16, as launches at benchmark sizes compile
    it. One pair compiled here (``gpu-nn sass --family dense --launched`` compiles all 48: 0 spill,
    HGMMA in every half tile): the bfloat16 128x256 tile in linear's forward layout, which spills
    in its general form (KNOWN_SPILLS) and not as launched, where its SASS is on HGMMA."""
    from gpu_nn.kernels.triton import dense as kd

    specs = [s for s in kd.launched_specs() if s.kernel is kd._matmul_kernel]
    plain = [s for s in kd.aot_specs() if s.kernel is kd._matmul_kernel]
    assert len(specs) == 3 * len(plain)
    for s in specs:
        lay = s.label.rsplit(" ", 1)[1]
        assert all(s.constexprs[u] == 1 and s.signature[u] == "constexpr" for u in kd.LINEAR_UNIT_STRIDES[lay])
        assert not set(s.divisible_by_16) & set(kd.LINEAR_UNIT_STRIDES[lay])
    label = "bf16 ieee 128x256x64 g8 w8 s3"
    assert KNOWN_SPILLS[("_matmul_kernel", label)] > 0
    code = (
        "import json\n"
        "from gpu_nn.kernels.triton import dense as kd\n"
        "from gpu_nn.kernels.triton._aot import compile_spec\n"
        f"spec, = [s for s in kd.launched_specs() if s.label == {label + ' launched rc'!r}]\n"
        "print(json.dumps(compile_spec(spec)))\n"
    )
    row = _uninterpreted_json(tmp_path, "launched.py", code, timeout=600)
    assert row["spill_bytes"] == 0 and row["spill_stores"] == 0 and row["hgmma"] > 0, row


def test_convolutions_reach_the_tensor_cores_in_every_operand_type(tmp_path):
    """The implicit-GEMM convolution kernels (forward, input gradient, weight gradient) compiled
    for sm_90 in half precision and TF32 run their products on wgmma (HGMMA in the SASS), in
    both operand orientations (channels_last, and NCHW's pixels-fastest ``apix`` form) (issue
    15: tensor cores for every fp16 / bf16 / tf32 configuration; the spill check above reads no
    SASS, and linear's test holds only the matmul to it). One tile per kernel, orientation and
    dot kind, bfloat16 for both half types (float16 takes the same wgmma path). The PTX's
    ``wgmma.mma_async`` are counted, and the SASS's HGMMA (the 12 disassemblies in one run:
    ``_aot.compile_specs``): the same counts, ptxas having no other form of a wgmma."""
    code = (
        "import json\n"
        "from gpu_nn.kernels.triton import _aot\n"
        "want = {f'{k} large {dt} {prec}{o}' for k in ('fwd', 'dgrad', 'wgrad') for dt, prec in\n"
        "        (('bf16', 'ieee'), ('fp32', 'tf32')) for o in ('', ' apix')}\n"
        "specs = [s for s in _aot.family_specs('conv')\n"
        "         if s.name in ('_conv_fwd_kernel', '_conv_dgrad_kernel', '_conv_wgrad_kernel') and s.label in want]\n"
        "from gpu_nn.kernels.sass import _code_sections\n"
        "rows = {s.label: r for s, r in zip(specs, _aot.compile_specs(specs))}\n"
        "# (a Triton cubin's SASS is read in the joint run, not left to cuobjdump one by one)\n"
        "rows['joint read'] = all(_code_sections(_aot._compile(s)[1]) for s in specs[:2])\n"
        "print(json.dumps(rows))\n"
    )
    rows = _uninterpreted_json(tmp_path, "hgmma.py", code, timeout=600)
    assert rows.pop("joint read") is True
    assert len(rows) == 12, sorted(rows)
    assert all(0 < r["wgmma"] == r["hgmma"] for r in rows.values()), {k: (r["wgmma"], r["hgmma"]) for k, r in rows.items()}


def test_access_widths_reads_the_size_suffix_of_global_loads_and_stores():
    from gpu_nn.kernels.triton._aot import access_widths

    sass = "\n".join([
        "/*0100*/ LDG.E.128 R4, desc[UR4][R2.64] ;",
        "/*0110*/ @!P0 LDG.E R5, desc[UR4][R2.64] ;",
        "/*0120*/ LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R2.64] ;",  # global -> shared: not a load to registers
        "/*0130*/ LDGDEPBAR ;",
        "/*0140*/ LDG.E.U16 R6, desc[UR4][R2.64] ;",
        "/*0150*/ STG.E.64 desc[UR4][R2.64], R4 ;",
        "/*0160*/ LDG.E.EL.128.CONSTANT R4, desc[UR4][R2.64] ;",
    ])
    assert access_widths(sass, "LDG") == {"128": 2, "32": 1, "16": 1}
    assert access_widths(sass, "STG") == {"64": 1}


def test_cross_entropy_row_statistics_offsets_are_64_bit(tmp_path):
    """Cross entropy keeps its row statistics as stats[3, M] (+ the 'mean' denominator at
    stats[3 M]): M rows is an i32 argument below 2^31, so 2 * M and 3 * M passed 2^31 from 7.2e8
    rows on (a [3, 4, 512, 512, 1024] segmentation's logits) and were stored through a wrapped
    offset (an int32-overflow audit's find, read in the kernels' TTIR). Compiled for sm_90 with
    M as i32: no i32 multiply of M is left in the reduction, the middle-dim forward and backward,
    and the reduction's and the target check's loops over M run in i64 (an i32 induction variable
    wraps in the last block below 2^31). The middle-dim kernels' inner index stays i32: the shapes
    past it take the row path (mid_ok / ce_mid_ok)."""
    code = (
        "import json, re, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from gpu_nn.kernels.triton import dense as kd, _aot\n"
        "names = ['_ce_reduce_kernel', '_ce_fwd_mid_kernel', '_ce_bwd_mid_kernel', '_ce_target_check_kernel']\n"
        "rows = []\n"
        "for s in kd.aot_specs():\n"
        "    n = s.kernel.fn.__name__ if hasattr(s.kernel, 'fn') else s.kernel.__name__\n"
        "    if n in names and s.signature.get('M') == 'i32' and s.constexprs.get('MEAN', True):\n"
        "        c = _aot.compile_with_ir(_aot._source(s.kernel, s.signature, s.constexprs, s.divisible_by_16),\n"
        "                                 {'num_warps': s.num_warps})\n"
        "        lines = c.asm['ttir'].splitlines()\n"
        "        rows.append({'kernel': n,\n"
        "                     'mul': [l.strip() for l in lines if re.search(r'arith\\.muli .*%M\\b.*: i32', l)],\n"
        "                     'loops': [l.strip() for l in lines if 'scf.for' in l and ': i32' in l]})\n"
        "        names.remove(n)\n"
        "print(json.dumps(rows))\n"
    )
    rows = {r["kernel"]: r for r in _uninterpreted_json(tmp_path, "ce_offsets.py", code, timeout=600)}
    assert set(rows) == {"_ce_reduce_kernel", "_ce_fwd_mid_kernel", "_ce_bwd_mid_kernel", "_ce_target_check_kernel"}
    for name, r in rows.items():
        assert not r["mul"], (name, r["mul"])
    assert not rows["_ce_reduce_kernel"]["loops"] and not rows["_ce_target_check_kernel"]["loops"], rows
    from gpu_nn.kernels.triton import dense as kd

    assert kd.mid_ok(2, 7, kd.MID_MAX_INNER) and not kd.mid_ok(2, 7, 2**31)
    assert not kd.ce_mid_ok(1, 7, 2**31) and kd.ce_mid_ok(1, 7, kd.MID_MAX_INNER)


def test_launched_elementwise_kernels_move_128_bits_per_access(tmp_path):
    """Issue 14's memory-bound kernels as launches of aligned tensors whose sizes are multiples of
    16 compile them (``launched_specs``; sigmoid forward and backward in float32 and bfloat16 --
    relu and tanh load and store alike, ``gpu-nn sass --launched`` shows every one --, the
    softmax rows' float32 blocks and one float16 block): every global load and store is as wide
    as a thread's share of the block allows, up to 128 bits (a 128-element block over 128
    threads has one element a thread, so 32 bits). The general forms (``aot_specs``: no
    alignment known) load 32 or 16 bits at a time, which this test also shows, so a launched
    spec that lost its alignment would fail here."""
    code = (
        "import json\n"
        "from gpu_nn.kernels.triton import activation as ka, dense as kd\n"
        "from gpu_nn.kernels.triton._aot import compile_specs\n"
        "soft = (kd._softmax_fwd_kernel, kd._softmax_bwd_kernel)\n"
        "pick = lambda s: s.label.startswith(('fp32 softmax', 'fp16 softmax BLOCK=2048'))\n"
        "acts = [s for s in ka.launched_specs() if s.label.startswith(('sigmoid fp32', 'sigmoid bf16'))]\n"
        "launched = acts + [s for s in kd.launched_specs() if s.kernel in soft and pick(s)]\n"
        "general = ka.aot_specs()[:2] + [s for s in kd.aot_specs() if s.kernel in soft][:2]\n"
        "pairs = [(w, s) for w, specs in (('launched', launched), ('general', general)) for s in specs]\n"
        "rows = [dict(r, which=w, block=s.constexprs['BLOCK'], bits=16 if '16' in next(iter(s.signature.values())) else 32)\n"
        "        for (w, s), r in zip(pairs, compile_specs([s for _, s in pairs]))]\n"
        "print(json.dumps(rows))\n"
    )
    rows = _uninterpreted_json(tmp_path, "widths.py", code, timeout=600)
    launched = [r for r in rows if r["which"] == "launched"]
    assert len(launched) == 4 + 12  # sigmoid fwd / bwd x 2 dtypes; softmax: 5 fp32 blocks + 1 fp16, fwd / bwd
    for r in launched:
        per_thread = r["block"] // (32 * r["num_warps"])
        width = str(min(128, per_thread * r["bits"]))
        assert set(r["global_loads"]) == {width} and set(r["global_stores"]) == {width}, (r["kernel"], r["label"], r)
        assert r["spill_bytes"] == 0
    assert sum(set(r["global_loads"]) == {"128"} for r in launched) >= 4 + 8
    for r in rows:
        if r["which"] == "general":
            assert "128" not in r["global_loads"], (r["kernel"], r["label"])


def test_softmax_online_pass_takes_one_exp_per_element(tmp_path):
    """The softmax rows too long for one block (``_softmax_fwd_kernel``, SINGLE off) run an online
    pass for the row's max and sum of exps, then a writing pass (dense.py ``_row_stats``,
    ``_online_exp_sum``): per element a thread holds, the online pass takes one exp, the lanes'
    combination one, and softmax's writing pass one more (log_softmax's none): MUFU.EX2 in the
    SASS 3 and 2 times the elements per thread (the two-exp update took 4 and 3)."""
    code = (
        "import json\n"
        "from gpu_nn.kernels.triton import dense as kd\n"
        "from gpu_nn.kernels.triton._aot import compile_specs\n"
        "specs = [s for s in kd.launched_specs() if s.kernel is kd._softmax_fwd_kernel and 'loop' in s.label\n"
        "         and s.label.startswith(('fp32', 'bf16'))]\n"
        "print(json.dumps([dict(r, block=s.constexprs['BLOCK'], log=s.constexprs['LOG'])\n"
        "                  for s, r in zip(specs, compile_specs(specs))]))\n"
    )
    rows = _uninterpreted_json(tmp_path, "ex2.py", code, timeout=600)
    assert len(rows) == 4, rows  # softmax / log_softmax x fp32 / bf16
    for r in rows:
        per_thread = r["block"] // (32 * r["num_warps"])
        assert r["ex2"] == (2 if r["log"] else 3) * per_thread, (r["label"], r["ex2"], per_thread)


def test_activation_kernel_takes_torchs_math_library(tmp_path):
    """The activation kernel's sigmoid and tanh (F.sigmoid / F.tanh, every dtype) compiled for
    sm_90 call libdevice's __nv_expf / __nv_tanhf (TTIR), the functions CUDA's expf and tanhf
    are (torch's CUDA kernels' std::exp / ::tanh), and divide IEEE (PTX div.rn): Triton's tl.exp
    is ex2.approx of x * log2(e) rounded to float32 and its '/' the approximate div.full.f32,
    which the kernel took before (16 div.full per thread in float32 sigmoid: fails before). The
    fused epilogues keep them (registers): not checked here."""
    code = (
        "import json, re, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from gpu_nn.kernels.triton import activation as ka, _aot\n"
        "rows = []\n"
        "for s in ka.aot_specs():\n"
        "    if s.kernel is ka._act_fwd_kernel and s.constexprs['ACT'] in (2, 3):\n"
        "        c = _aot.compile_with_ir(_aot._source(s.kernel, s.signature, s.constexprs, s.divisible_by_16),\n"
        "                                 {'num_warps': s.num_warps})\n"
        "        rows.append({'label': s.label, 'act': s.constexprs['ACT'], 'nv': sorted(set(re.findall(r'__nv_\\w+', c.asm['ttir']))),\n"
        "                     'approx_div': _aot.approx_div_f32(c.asm['ptx']), 'div_rn': c.asm['ptx'].count('div.rn.f32')})\n"
        "print(json.dumps(rows))\n"
    )
    rows = _uninterpreted_json(tmp_path, "act_libdevice.py", code, timeout=600)
    assert len(rows) == 6, rows  # sigmoid, tanh x fp32, fp16, bf16
    for r in rows:
        assert r["nv"] == (["__nv_expf"] if r["act"] == 2 else ["__nv_tanhf"]), r
        assert r["approx_div"] == 0, r
        assert (r["div_rn"] > 0) == (r["act"] == 2), r


def test_layout_copy_moves_128_bits_both_ways_through_shared_memory(tmp_path):
    """The via-channels_last copies (conv.py ``_layout_copy_kernel``) as a 28x28 plane launches
    them (every int a multiple of 16; the unit strides constants): 128-bit loads along the
    source's contiguous axis and 128-bit stores along the destination's, the tile transposed
    through shared memory, no spills, every dtype and both directions; the general form (no
    alignment known) moves one element per access."""
    code = (
        "import json\n"
        "from gpu_nn.kernels.triton import conv as kc\n"
        "from gpu_nn.kernels.triton._aot import compile_specs\n"
        "specs = [s for s in kc.aot_specs() if s.kernel is kc._layout_copy_kernel]\n"
        "print(json.dumps([dict(r, label=s.label) for s, r in zip(specs, compile_specs(specs))]))\n"
    )
    rows = _uninterpreted_json(tmp_path, "layout.py", code, timeout=600)
    launched = [r for r in rows if r["label"].endswith("launched")]
    assert len(rows) == 15 and len(launched) == 6
    for r in launched:
        assert r["global_loads"] == r["global_stores"] and set(r["global_loads"]) == {"128"}, r
        assert r["spill_bytes"] == 0 and r["shared_bytes"] > 0, r
    for r in rows:
        if r not in launched:
            assert "128" not in r["global_loads"] and "128" not in r["global_stores"], r


def test_aot_shards_cover_every_spec_once(tmp_path, monkeypatch):
    """``--shard k/n`` takes every n-th spec from the k-th: the shards of a family together are
    its whole list, each spec once (``_aot.run`` as the CLI calls it, with the compilation
    replaced by a stand-in row: which specs a shard takes is the question, and the family tests
    above compile them; --shard 0/1 is the whole list)."""
    from gpu_nn.kernels.triton import _aot

    monkeypatch.setattr(_aot, "compile_spec", lambda spec, sass=True: {"kernel": spec.name, "label": spec.label})
    labels = [(s.name, s.label) for s in _aot.family_specs("conv")]
    got = []
    for shard in ("0/2", "1/2"):
        out = tmp_path / f"{shard.replace('/', 'of')}.json"
        assert _aot.main(["--family", "conv", "--json", str(out), "--no-sass", "--shard", shard]) == 0
        got += [(r["kernel"], r["label"]) for r in json.loads(out.read_text())]
    assert sorted(got) == sorted(labels) and len(got) == len(labels) > 100
    assert [(r["kernel"], r["label"]) for r in json.loads(out.read_text())] == labels[1::2]
    with pytest.raises(SystemExit):
        _aot.main(["--family", "conv", "--shard", "2/2"])


def _spec_pairs(spec):
    """Every value and pair of values of the factors that make a compiled form, written here
    apart from _aot's own code: constexprs, argument types (a TMA descriptor's element type, and
    each dimension of its block with the block's rank, apart), warps, stages, divisibility."""
    import itertools

    f = [("c", k, repr(v)) for k, v in spec.constexprs.items()]
    for k, v in spec.signature.items():
        if v.startswith("tensordesc<"):
            dtype, block = v[len("tensordesc<"):-len("]>")].split("[")
            dims = [int(d) for d in block.split(",")]
            f += [("t", k, dtype)] + [("b", k, len(dims), i, d) for i, d in enumerate(dims)]
        else:
            f.append(("t", k, v))
    f += [("w", spec.num_warps), ("s", spec.num_stages), ("d", tuple(sorted(spec.divisible_by_16)))]
    f.sort(key=repr)
    return set(f) | set(itertools.combinations(f, 2))


@pytest.mark.parametrize("family", ["conv", "rnn"])
def test_pairs_cover_every_value_and_pair_of_the_whole_list(family):
    """The subset the suite compiles by default (_aot.covering): per kernel, every factor value and
    every pair of two factors' values that the family's list has is in a chosen spec; what
    ``must`` names is chosen; the same list gives the same choice; and it is a real subset."""
    specs = _aot.family_specs(family)
    plain = _aot.covering(specs)
    unforced = next(i for i, c in enumerate(plain) if not c)
    chosen = _aot.covering(specs, must={(specs[unforced].name, specs[unforced].label)})
    assert chosen[unforced] and chosen == _aot.covering(specs, must={(specs[unforced].name, specs[unforced].label)})
    for pick in (plain, chosen):
        for name in {s.name for s in specs}:
            every = set().union(*(_spec_pairs(s) for s in specs if s.name == name))
            got = set().union(*(_spec_pairs(s) for s, c in zip(specs, pick) if c and s.name == name))
            assert got == every, (name, sorted(every - got, key=repr)[:5])
    assert sum(plain) < 0.6 * len(specs)


@pytest.mark.parametrize("family", ["conv", "rnn"])
def test_each_cover_holds_every_value_in_fewer_specs_than_pairs(family):
    """The suite's default subset (order 1): per kernel, every factor value the family's list has
    is in a chosen spec (values alone, not pairs); ``must`` is chosen; fewer specs than the
    all-pairs subset; an order other than 1 or 2 is refused."""
    specs = _aot.family_specs(family)
    plain = _aot.covering(specs, order=1)
    unforced = next(i for i, c in enumerate(plain) if not c)
    chosen = _aot.covering(specs, must={(specs[unforced].name, specs[unforced].label)}, order=1)
    assert chosen[unforced]
    for pick in (plain, chosen):
        for name in {s.name for s in specs}:
            every = {f for s in specs if s.name == name for f in _spec_pairs(s) if not isinstance(f[0], tuple)}
            got = {f for s, c in zip(specs, pick) if c and s.name == name for f in _spec_pairs(s)}
            assert every <= got, (name, sorted(every - got, key=repr)[:5])
    assert sum(plain) < sum(_aot.covering(specs)) and sum(plain) < 0.3 * len(specs)
    # a TMA descriptor's block is the tile constexprs again: its dimensions are values of their
    # own, not one value per tile (the forward's x_desc has 12 strings in 20 forms)
    tma = [c for s, c in zip(specs, plain) if s.name == "_conv_tma_fwd_kernel"]
    assert family != "conv" or 0 < sum(tma) < len({s.signature["x_desc"] for s in specs if s.name == "_conv_tma_fwd_kernel"})
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        _aot.covering(specs, order=3)


def test_pairs_of_a_full_product_take_fewer_specs_and_miss_no_pair():
    """Three factors of two values each, all 8 combinations listed: every pair of values meets in
    fewer specs (4 suffice, an orthogonal array); a list of one spec per kernel compiles it."""
    from gpu_nn.kernels.triton import activation as ka

    base = next(s for s in ka.aot_specs() if s.kernel is ka._act_fwd_kernel)
    specs = [dataclasses.replace(base, constexprs={**base.constexprs, "ACT": a, "BLOCK": b}, num_warps=w,
                                 label=f"{a} {b} {w}")
             for a in (0, 1) for b in (512, 1024) for w in (4, 8)]
    chosen = _aot.covering(specs)
    assert 4 <= sum(chosen) < 8
    every = set().union(*map(_spec_pairs, specs))
    assert set().union(*(_spec_pairs(s) for s, c in zip(specs, chosen) if c)) == every
    assert _aot.covering(specs[:1]) == [True]


@pytest.mark.parametrize("cover,order", [("pairs", 2), ("each", 1)])
def test_pairs_run_compiles_the_cover_and_takes_the_rest_through_the_front_end(tmp_path, monkeypatch, cover, order):
    """``--cover pairs`` / ``each``: the chosen specs are compiled; the others go through the front
    end (pairs: all of them; each: those of the pairs subset, the rest listed only), each row
    says which; a front-end failure is a failed row and exit status 1."""
    monkeypatch.setattr(_aot, "compile_spec", lambda spec, sass=True: {"kernel": spec.name, "label": spec.label})
    seen = []
    monkeypatch.setattr(_aot, "frontend", lambda kernel, sig, cons, w, s, div=(): seen.append((kernel, cons)))
    specs = _aot.family_specs("optim")
    chosen = _aot.covering(specs, order=order)
    front = [True] * len(specs) if cover == "pairs" else _aot.covering(specs, order=2)
    out = tmp_path / "rows.json"
    assert _aot.main(["--family", "optim", "--json", str(out), "--no-sass", "--cover", cover]) == 0
    rows = json.loads(out.read_text())
    assert [(r["kernel"], r["label"]) for r in rows] == [(s.name, s.label) for s in specs]
    assert [r["compiled"] for r in rows] == chosen and all(r["ok"] for r in rows)
    assert [r["front_end"] for r in rows] == [c or f for c, f in zip(chosen, front)]
    assert seen == [(s.kernel, s.constexprs) for s, c, f in zip(specs, chosen, front) if f and not c] != []
    if cover == "each":  # fewer than every spec, more than the compiled ones
        assert chosen.count(True) < [r["front_end"] for r in rows].count(True) < len(specs)

    def broken(kernel, *a):
        raise RuntimeError("front end says no")

    monkeypatch.setattr(_aot, "frontend", broken)
    assert _aot.main(["--family", "optim", "--json", str(out), "--no-sass", "--cover", cover]) == 1
    rows = json.loads(out.read_text())
    assert [r["ok"] for r in rows] == [c or not f for c, f in zip(chosen, front)]
    assert "front end says no" in next(r["error"] for r in rows if not r["ok"])


_FE_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def fe_kernel(x_ptr, n, B: tl.constexpr):
    # right while n is a run-time i32; the JIT makes an int equal to 1 a constant, and .to() of a
    # Python int fails in the front end (the shape of 09f2311's pooling incident)
    m = n.to(tl.int64)
    offs = tl.arange(0, B)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < m), mask=offs < m)
'''


def test_front_end_check_fails_a_specialisation_that_does_not_compile(tmp_path):
    """_aot.frontend / ``--frontend`` (what the sm_90 check runs on the specs it does not compile
    whole, and on the JIT specialisations of real launches): a kernel right for a run-time int
    and wrong where the JIT makes it a constant (an int equal to 1) passes the first row and
    fails the second, through the function and through the command (exit status 1). Its other
    tests stub it out; a front end checking nothing passed them all (an audit)."""
    (tmp_path / "fe_mod.py").write_text(_FE_KERNEL)
    rows = [{"module": "fe_mod", "kernel": "fe_kernel", "num_warps": 4, "num_stages": 3,
             "signature": {"x_ptr": "*fp32", "n": "i32", "B": "constexpr"}, "constexprs": {"B": 16}},
            {"module": "fe_mod", "kernel": "fe_kernel", "num_warps": 4, "num_stages": 3,
             "signature": {"x_ptr": "*fp32", "n": "constexpr", "B": "constexpr"}, "constexprs": {"n": 1, "B": 16}}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    # run from tmp_path: ``python -m`` puts its working directory first on sys.path
    proc = run_uninterpreted(["-m", "gpu_nn.kernels.triton._aot", "--frontend", tmp_path / "rows.json"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [f["signature"]["n"] for f in failed] == ["constexpr"] and "CompilationError" in failed[0]["error"]


def test_spec_labels_are_unique_and_the_spill_tables_name_real_specs():
    """Every (kernel, label) names one AOT spec (the spill tables and the sm_90 rows key on it:
    two specs under one label are one entry, and the recurrent family listed four identical
    colsum specs twice, compiled twice), and every key of the spill tables names a spec that
    exists (a stale entry would stand for a configuration that no longer compiles)."""
    import collections

    keys = collections.Counter((s.name, s.label) for f in ktriton.FAMILIES for s in _aot.family_specs(f))
    assert not [k for k, n in keys.items() if n > 1]
    for table in (KNOWN_SPILLS, KNOWN_SPILLS_TRITON_36):
        assert set(table) <= set(keys), sorted(set(table) - set(keys))
