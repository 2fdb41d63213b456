"""Triton kernels, one module per op family.

``INTERPRET`` records whether ``TRITON_INTERPRET=1`` was set when the kernels were imported:
``@triton.jit`` decides at decoration time whether a kernel is compiled or interpreted, so a
later change of the variable has no effect on kernels already imported.

Each family module exposes ``aot_specs()``: every configuration its launchers can launch
with, as :class:`~gpu_nn.kernels.triton._aot.AotSpec`, so that ``_aot`` compiles them all for
sm_90 ahead of time (DESIGN section 4, level 3).

``_compat`` holds the fixes that differ by Triton version (3.6 on the GPU machine, 3.9 in
development); they are installed here, before any kernel module runs a kernel.
"""

import os

from .. import env_switch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# GPU_NN_POISON=1 (the test suite sets it): scratch buffers a kernel must write before it reads
# them start NaN, as gpu_nn.ops._dispatch.empty does for kernel outputs; read once, at import
POISON = env_switch("GPU_NN_POISON") is True

if INTERPRET:
    # the only version difference found so far is in the interpreter (see _compat)
    from . import _compat

    _compat.apply(INTERPRET)

FAMILIES = ("activation", "conv", "dense", "pool", "rnn", "optim")
