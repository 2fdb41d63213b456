"""The backend switch: env var, context manager, explicit requests that cannot run."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpu_nn
import gpu_nn.functional as F
from gpu_nn import _backend


def test_error_classes():
    assert issubclass(gpu_nn.KernelInputError, ValueError)
    assert issubclass(gpu_nn.KernelInputError, RuntimeError)
    assert issubclass(gpu_nn.BackendUnavailableError, RuntimeError)


def test_context_manager_nests_and_restores():
    base = _backend.requested()
    with gpu_nn.backend("reference"):
        assert _backend.requested() == "reference"
        with gpu_nn.backend("auto"):
            assert _backend.requested() == "auto"
        assert _backend.requested() == "reference"
    assert _backend.requested() == base


def test_unknown_backend_is_refused():
    with pytest.raises(gpu_nn.BackendUnavailableError, match="unknown backend 'cuda'"):
        with gpu_nn.backend("cuda"):
            pass


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("GPU_NN_BACKEND", "reference")
    assert _backend.requested() == "reference"
    monkeypatch.setenv("GPU_NN_BACKEND", "nonsense")
    with pytest.raises(gpu_nn.BackendUnavailableError, match="GPU_NN_BACKEND"):
        F.relu(torch.randn(3))


def test_auto_uses_reference_for_cpu_tensors():
    assert _backend.resolve("relu", torch.device("cpu"), ("reference", "triton")) == "reference"


def test_available_backends_always_has_reference():
    names = gpu_nn.available_backends()
    assert "reference" in names
    for name in names:
        assert _backend.status(name)[0]


def test_cupy_refused_without_gpu_with_reason():
    """Without a GPU the cupy backend is refused with its reason; with one (and cupy installed)
    it is accepted and says which device it runs on."""
    ok, why = _backend.status("cupy")
    assert why
    if torch.cuda.is_available() and ok:
        with gpu_nn.backend("cupy") as name:
            assert name == "cupy"
        assert "cupy" in why
        return
    assert not ok
    with pytest.raises(gpu_nn.BackendUnavailableError, match="cupy"):
        with gpu_nn.backend("cupy"):
            pass


def test_op_without_backend_says_so(monkeypatch):
    with pytest.raises(gpu_nn.BackendUnavailableError, match="has no cupy implementation"):
        monkeypatch.setattr(_backend, "requested", lambda: "cupy")
        _backend.resolve("someop", torch.device("cpu"), ("reference", "triton"))


def test_triton_refuses_bfloat16_in_interpreter():
    """The interpreter computes bfloat16 wrong without error, so CPU tensors in bfloat16 are
    refused there; on a GPU the compiled kernels take bfloat16 and match torch."""
    if torch.cuda.is_available():
        x = torch.randn(4, 33, dtype=torch.bfloat16, device="cuda")
        with gpu_nn.backend("triton"):
            torch.testing.assert_close(F.relu(x), torch.relu(x), rtol=0, atol=0)
        return
    if not _backend.interpret_mode():
        pytest.skip("TRITON_INTERPRET is not set in this session")
    with gpu_nn.backend("triton"):
        with pytest.raises(gpu_nn.BackendUnavailableError, match="bfloat16"):
            F.relu(torch.randn(4, dtype=torch.bfloat16))


def test_triton_without_interpreter_explains_why():
    """Started without TRITON_INTERPRET: a CPU-only machine refuses triton and names the
    variable; a GPU machine accepts it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, gpu_nn\n"
        "try:\n"
        "    with gpu_nn.backend('triton'):\n"
        "        pass\n"
        "except gpu_nn.BackendUnavailableError as e:\n"
        "    print('REFUSED:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    if torch.cuda.is_available():
        assert "REFUSED:" not in out
    else:
        assert "REFUSED:" in out and "TRITON_INTERPRET" in out


def test_reference_handles_half_precision_by_widening():
    x = torch.randn(7, dtype=torch.float16)
    with gpu_nn.backend("reference"):
        y = F.sigmoid(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, torch.sigmoid(x.float()).half())


def test_from_numpy_copies_views_and_shares_owned_arrays():
    from gpu_nn.ops._dispatch import from_numpy

    base = np.arange(12, dtype=np.float32)
    view = base.reshape(3, 4)  # a view: it could be an op's input seen through to_numpy
    t = from_numpy(view, torch.float32, torch.device("cpu"))
    t[0, 0] = 99.0
    assert base[0] == 0.0  # copied: the tensor does not alias the array
    owned = np.zeros(5, np.float32)  # made by the reference for this call: handed over as is
    assert from_numpy(owned, torch.float32, torch.device("cpu")).data_ptr() == owned.ctypes.data
