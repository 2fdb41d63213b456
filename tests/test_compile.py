"""DESIGN section 4, levels 3 and 4: every Triton kernel configuration compiles for sm_90 and
every CUDA C source compiles with NVRTC for sm_90, with no GPU present."""

import json
import os
import subprocess
import sys

import pytest

from gpu_nn.kernels import cuda as kcuda
from gpu_nn.kernels import triton as ktriton


def _aot_rows(family, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / f"{family}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_nn.kernels.triton._aot", "--family", family, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), f"AOT run for {family} produced nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc


@pytest.mark.parametrize("family", ktriton.FAMILIES)
def test_triton_kernels_compile_for_sm90(family, tmp_path):
    rows, proc = _aot_rows(family, tmp_path)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} [{r['label']}]: {r['error']}" for r in failed)
    spilled = [r for r in rows if r["local_bytes"] > 0]
    assert not spilled, "register spills: " + ", ".join(f"{r['kernel']} [{r['label']}] {r['local_bytes']} B" for r in spilled)
    assert proc.returncode == 0


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
    script = tmp_path / "bad_kernel.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0


@pytest.mark.parametrize("name", kcuda.sources() or [pytest.param(None, marks=pytest.mark.skip(reason="no .cu sources yet"))])
def test_cuda_sources_compile_with_nvrtc_for_sm90(name):
    cubin = kcuda.compile_cubin(name, arch="sm_90")
    assert cubin[:4] == b"\x7fELF"


def test_nvrtc_reports_errors():
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }', "bad.cu", [], [])
    with pytest.raises(nvrtc.NVRTCError):
        nvrtc.compileProgram(prog, ["-arch=sm_90"])
    nvrtc.destroyProgram(prog)
