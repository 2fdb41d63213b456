"""The hook through which a kernel launcher asks for a measured configuration.

Kernels never import ``gpu_nn`` (DESIGN section 2: data flows one way), yet a launcher here, such
as :func:`gpu_nn.kernels.triton.dense.matmul`, which other kernel modules call too, must be able to
use ``gpu_nn._tuning.choose``. So the ops layer installs that function here when it first loads
the Triton kernels (``gpu_nn.ops._dispatch.triton_kernels``), and launchers call :func:`choose`.
Until something is installed (the ahead-of-time compile tools, a kernel module imported on its
own) every launcher gets its heuristic, ``default``.
"""

from __future__ import annotations

_chooser = None


def install(fn) -> None:
    """Route :func:`choose` to ``fn`` (``gpu_nn._tuning.choose``'s signature); None removes it."""
    global _chooser
    _chooser = fn


def installed():
    return _chooser


def choose(op: str, key: tuple, candidates, run, default, device, prepare=None):
    """``gpu_nn._tuning.choose(op, key, candidates, run, default, device, prepare=prepare)`` when
    installed, else ``default``. ``run(config)`` must rewrite the launch's outputs in full (the
    candidates are timed on the real buffers); ``prepare(candidates)`` may compile them all first."""
    fn = _chooser
    if fn is None:
        return default
    return fn(op, key, candidates, run, default, device, prepare=prepare)
