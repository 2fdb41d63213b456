"""The gpu-nn command: info, check and sass."""

import os
import subprocess
import sys

from gpu_nn.cli import main


def test_info_names_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "cupy"):
        assert name in out
    assert "torch" in out and "device" in out


def test_check_relu_passes(capsys):
    assert main(["check", "--op", "relu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "relu" in out and "0 failed" in out and "FAIL" not in out


def test_sass_prints_the_table(tmp_path):
    """Compiles the activation kernels for sm_90 in a subprocess (the test session sets
    TRITON_INTERPRET; gpu-nn sass must drop it for its compiler processes)."""
    js = tmp_path / "sass.json"
    env = dict(os.environ, TRITON_INTERPRET="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "gpu_nn.cli", "sass", "--family", "activation", "--json", str(js)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "_act_fwd_kernel" in proc.stdout and "registers" in proc.stdout
    assert "18 configurations compiled, 0 failed, 0 spill" in proc.stdout
    import json

    rows = json.loads(js.read_text())
    assert len(rows) == 18 and all(r["ok"] and r["registers"] > 0 and r["local_bytes"] == 0 for r in rows)


def test_sass_lists_a_missing_family(monkeypatch, capsys):
    from gpu_nn.benchmarks import sass_report

    monkeypatch.setattr(sass_report, "_kernel_module_exists", lambda fam: False)
    assert main(["sass", "--family", "conv"]) == 0
    out = capsys.readouterr().out
    assert "missing" in out and "conv" in out


def test_check_runs_triton_when_started_without_interpret(tmp_path):
    """`gpu-nn check` started without TRITON_INTERPRET still checks the Triton backend (in the
    interpreter on a CPU-only machine): building the parser must not import the kernels first."""
    import json

    import pytest

    pytest.importorskip("triton")
    js = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "gpu_nn.cli", "check", "--op", "relu", "--no-progress", "--json", str(js)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(js.read_text())
    assert {r["backend"] for r in rows} >= {"reference", "triton"}
