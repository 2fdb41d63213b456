"""Shared test helpers: backend parametrisation, random inputs, tolerances."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile

import numpy as np
import pytest
import torch

import gpu_nn
from gpu_nn import _backend

CUDA = torch.cuda.is_available()


def backend_params(have=("reference", "triton", "cupy")):
    """pytest params ``(backend, device)`` for every backend in ``have``.

    Combinations that cannot run here are kept and skipped with the reason, so a report shows
    what did not run.
    """
    params = []
    for name in have:
        if name == "reference":
            params.append(pytest.param("reference", "cpu", id="reference-cpu"))
            continue
        ok, why = _backend.status(name)
        if name == "triton":
            if CUDA:
                params.append(pytest.param("triton", "cuda", id="triton-cuda"))
            elif ok:
                params.append(pytest.param("triton", "cpu", id="triton-interp"))
            else:
                params.append(pytest.param("triton", "cpu", id="triton", marks=pytest.mark.skip(reason=why)))
        elif name == "cupy":
            marks = () if ok else pytest.mark.skip(reason=f"cupy backend unavailable: {why}")
            params.append(pytest.param("cupy", "cuda", id="cupy-cuda", marks=marks))
    return params


INTERP_DTYPES = tuple(
    getattr(torch, name.strip())
    for name in os.environ.get("GPU_NN_TEST_INTERP_DTYPES", "float32,float16,bfloat16").split(",")
)


def gpu_dtypes_for(backend: str, device: str):
    """Float dtypes a backend is tested in: the reference in float32/float64; GPUs and the
    Triton interpreter in float32/16/bf16 (the interpreter computes bfloat16 as the GPU does
    with gpu-nn's fix, kernels/triton/_compat.py; GPU_NN_TEST_INTERP_DTYPES, a comma list such
    as ``bfloat16``, narrows what it runs)."""
    if backend == "reference":
        return (torch.float64, torch.float32)
    if device == "cpu":
        return INTERP_DTYPES
    return (torch.float32, torch.float16, torch.bfloat16)


def randn(rng: np.random.Generator, *shape, dtype=torch.float64, device="cpu", noncontig=False, requires_grad=False):
    """Fresh standard-normal values (never zeros). ``noncontig`` returns a strided view of a
    larger buffer with the same values."""
    a = rng.standard_normal(shape)
    t = torch.from_numpy(a).to(dtype=dtype, device=device)
    if noncontig and t.dim() > 0:
        big = torch.empty(*shape[:-1], 2 * shape[-1] if shape else 1, dtype=dtype, device=device)
        big.fill_(float("nan"))
        big[..., ::2] = t
        t = big[..., ::2]
        assert not t.is_contiguous() or t.numel() <= 1
    return t.requires_grad_(requires_grad)


EPS = {
    torch.float64: 2.2e-16,
    torch.float32: 1.2e-7,
    torch.float16: 9.8e-4,
    torch.bfloat16: 7.8e-3,
}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1): an error relative to the output scale."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return 0.0
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return float("inf")
    a = torch.where(nan_e, 0.0, a)
    e = torch.where(nan_e, 0.0, e)
    scale = max(float(e.abs().max()), 1.0)
    return float((a - e).abs().max()) / scale


def tol(dtype: torch.dtype, k: int = 1) -> float:
    """Tolerance of a result computed in ``dtype`` by a reduction of length ``k``
    (float32 accumulation for half types): a few ulps of the output dtype plus a floor that
    grows like sqrt(k) ulps of the accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return 4 * EPS[dtype] + 8 * EPS[acc] * max(k, 1) ** 0.5


def assert_close(actual, expected, dtype, k=1, what=""):
    err = max_rel_err(actual, expected)
    bound = tol(dtype, k)
    assert err <= bound, f"{what}: max relative error {err:.3e} > {bound:.3e} ({dtype}, k={k})"
    return err


def assert_like_torch(ours, torch_same_dtype, ref64, dtype, k=1, what=""):
    """DESIGN section 4: our error in ``dtype`` may be at most twice torch's own error in that
    dtype, plus a small floor scaled by the reduction length."""
    ours_err = max_rel_err(ours, ref64)
    torch_err = max_rel_err(torch_same_dtype, ref64)
    bound = 2 * torch_err + tol(dtype, k)
    assert ours_err <= bound, f"{what}: error {ours_err:.3e} > 2 x torch's {torch_err:.3e} + floor ({dtype}, k={k})"
    return ours_err


def build_host_library(c_source: str, name: str) -> ctypes.CDLL:
    """Compile ``c_source`` (C++ that may ``#include`` the kernels' ``*.cuh`` headers) into a
    shared library with the host compiler and load it: the CUDA kernels' ``GN_HD`` math is
    then checked on the CPU against the reference."""
    from gpu_nn.kernels import cuda as kcuda

    digest = hashlib.sha1((c_source + name).encode()).hexdigest()[:12]
    for f in sorted(os.listdir(kcuda.include_dir())):
        if f.endswith((".cuh", ".cu")):
            with open(os.path.join(kcuda.include_dir(), f), "rb") as fh:
                digest = hashlib.sha1(digest.encode() + fh.read()).hexdigest()[:12]
    out_dir = os.path.join(tempfile.gettempdir(), "gpu_nn_host")
    os.makedirs(out_dir, exist_ok=True)
    lib = os.path.join(out_dir, f"{name}-{digest}.so")
    if not os.path.exists(lib):
        src = os.path.join(out_dir, f"{name}-{digest}.cpp")
        with open(src, "w") as f:
            f.write(c_source)
        tmp = f"{lib}.{os.getpid()}.tmp"
        subprocess.run(
            ["g++", "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{kcuda.include_dir()}", src, "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def fptr(a: np.ndarray):
    """ctypes pointer to a contiguous NumPy array's data."""
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


__all__ = [
    "CUDA",
    "assert_close",
    "assert_like_torch",
    "backend_params",
    "build_host_library",
    "fptr",
    "gpu_dtypes_for",
    "gpu_nn",
    "max_rel_err",
    "randn",
    "tol",
]


def run_bench_script(tmp_path, script: str, python_body: str, env: dict, log_line: str = 'echo "$*"'):
    """Run ``benchmarks/<script> tmp_path/out`` with ``PYTHON`` a bash stand-in that appends
    ``log_line``'s output (each call's arguments, by default) to a log and then runs
    ``python_body``. ``env`` is the whole environment but ``PYTHON``. Returns
    ``(CompletedProcess, out folder, logged lines)``."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\n{log_line} >> {log}\n{python_body}")
    fake.chmod(0o755)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(root / "benchmarks" / script), str(out)], cwd=root, env={**env, "PYTHON": str(fake)},
                       capture_output=True, text=True, timeout=60)
    return r, out, log.read_text().splitlines() if log.exists() else []
