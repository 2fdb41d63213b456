"""Triton version differences (kernels/triton/_compat.py): the project runs on triton 3.6 on the
GPU machine and 3.9 in development."""

import pytest
import torch

from gpu_nn.kernels import triton as ktriton
from gpu_nn.kernels.triton import _compat

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@pytest.mark.parametrize("text, expected", [
    ("3.6.0", (3, 6)), ("3.9.0", (3, 9)), ("3.7.0+git1a2b3c", (3, 7)), ("2.4.0rc1", (2, 4)), ("3.10", (3, 10)),
])
def test_version_parse(text, expected):
    assert _compat._version(text) == expected


@triton.jit
def _strided_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # range() over a runtime scalar: the construct the interpreter of triton < 3.7 cannot
    # convert to int under NumPy >= 2.4 without the _compat fix
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, n, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def test_range_over_runtime_scalar():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not ktriton.INTERPRET:
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton kernels cannot run")
    x = torch.arange(1, 38, dtype=torch.float32, device=device)
    out = torch.full((1,), float("nan"), dtype=torch.float32, device=device)
    before = tl.core.tensor.__dict__.get("__index__", None)
    _strided_sum_kernel[(1,)](x, out, x.numel(), BLOCK=16)
    assert out.item() == float(x.sum().item())
    # the interpreter undoes its patches of tl.tensor after the call, ours included
    assert tl.core.tensor.__dict__.get("__index__", None) is before


def test_fix_installed_exactly_where_needed():
    from triton.runtime import interpreter

    patched = interpreter._patch_lang_tensor.__module__ == _compat.__name__
    assert patched == (ktriton.INTERPRET and _compat.needs_interpreter_index_fix())
