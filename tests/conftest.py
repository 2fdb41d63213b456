"""Test-session setup.

Where no GPU is present the Triton kernels run in the interpreter on CPU tensors; that has to
be decided before any kernel module is imported, so it happens here, first. On a GPU machine
the same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GPU_NN_POISON", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

import gpu_nn  # noqa: E402,F401  (imports kernels after the variables above are set)


@pytest.fixture
def rng(request):
    """A fresh NumPy generator per test, seeded from the test's id so failures reproduce."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
