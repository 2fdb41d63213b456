"""float32 precision as torch decides it for its own CUDA kernels: may a float32 product round
its operands to TF32?

torch 2.9 added a per-operation setting beside the legacy flags: ``torch.backends.cuda.matmul.
fp32_precision`` (cuBLAS), ``torch.backends.cudnn.conv.fp32_precision`` and ``...cudnn.rnn.
fp32_precision``, each ``"ieee"``, ``"tf32"`` or ``"none"`` (inherit: the backend's ``"all"``,
then the generic ``torch.backends.fp32_precision``). ATen decides from the resolved value
(``Context::float32Precision(CUDA, op) == TF32``), and the legacy setters write those same values
(``allow_tf32``, ``set_float32_matmul_precision``). The legacy *getters* though raise
("you have used mix of the legacy and new APIs ...") once a user has set the new API for one
operation only -- which is how torch's own notes tell users to set it. So every decision of ours
reads the resolved per-operation value (:func:`tf32`), which never raises and is what torch's
kernels use; torch without the new API (before 2.9) answers through the legacy getters.

:class:`matmul_tf32` sets cuBLAS's choice for a block (the cupy recurrent layers run torch GEMMs
at the precision cuDNN's RNN setting asks for) and :class:`exact_float32` turns TF32 off for all
three operations (``gpu-nn check``), both restoring what they found.
"""

from __future__ import annotations

import torch

OPS = ("matmul", "conv", "rnn")

_get = getattr(torch._C, "_get_fp32_precision_getter", None)  # (backend, op) -> resolved precision
_set = getattr(torch._C, "_set_fp32_precision_setter", None)


def tf32(op: str) -> bool:
    """Whether torch lets its CUDA kernels for ``op`` (``"matmul"``: cuBLAS, linear's;
    ``"conv"`` / ``"rnn"``: cuDNN's convolutions / recurrent layers) compute float32 products in
    TF32, as they decide it. Never raises for a mix of the legacy and new APIs."""
    if _get is not None:
        return _get("cuda", op) == "tf32"
    if op == "matmul":
        return bool(torch._C._get_cublas_allow_tf32())
    return bool(torch._C._get_cudnn_allow_tf32())


def _matmul_legacy():
    """torch.get_float32_matmul_precision()'s value, or None where reading it raises."""
    try:
        return torch._C._get_float32_matmul_precision()
    except RuntimeError:
        return None


def _set_matmul(flag: bool) -> None:
    """cuBLAS's choice through the legacy setter: it writes the legacy flag and the new
    per-operation value alike, so neither API's reader sees a mix afterwards."""
    torch._C._set_cublas_allow_tf32(flag)


def _restore_matmul(flag: bool, legacy) -> None:
    """Back to a matmul choice saved as (:func:`tf32`, :func:`_matmul_legacy`): ``"medium"``
    through its own setter (the legacy ``allow_tf32`` setter would leave ``"high"``, which with
    the CPU's bfloat16 matmul setting that "medium" made reads as a mix of APIs and raises)."""
    if legacy == "medium":
        torch._C._set_float32_matmul_precision("medium")
    else:
        _set_matmul(flag)


class matmul_tf32:
    """cuBLAS's float32 GEMMs in TF32 (``want`` True) or exact (False) while the block runs; None:
    untouched. Nothing is written where the setting already says ``want``; otherwise the legacy
    setter writes it and the block's end writes the old choice back. The setting is
    process-wide: another thread's float32 GEMM launched meanwhile sees it too."""

    __slots__ = ("want", "old", "legacy")

    def __init__(self, want):
        self.want = want
        self.old = self.legacy = None

    def __enter__(self):
        if self.want is not None:
            self.old = tf32("matmul")
            if self.old != self.want:
                self.legacy = _matmul_legacy()
                _set_matmul(self.want)
        return self

    def __exit__(self, *exc):
        if self.want is not None and self.old != self.want:
            _restore_matmul(self.old, self.legacy)
        return False


def _cudnn_legacy():
    """torch.backends.cudnn.allow_tf32's value, or None where reading it raises."""
    try:
        return torch._C._get_cudnn_allow_tf32()
    except RuntimeError:
        return None


class exact_float32:
    """TF32 off for every float32 product of torch's CUDA kernels and ours (matmul, conv, rnn)
    while the block runs, then back to what it was: the legacy flags where they could be read,
    and, with torch's per-operation API, each operation's value as it resolved (an inherited
    ``"none"`` comes back as the value it resolved to: the same choice)."""

    def __enter__(self):
        self.cudnn, self.matmul = _cudnn_legacy(), _matmul_legacy()
        self.old = {op: tf32(op) for op in OPS}
        self.new = {op: _get("cuda", op) for op in OPS} if _get is not None else None
        torch._C._set_cudnn_allow_tf32(False)
        _set_matmul(False)
        if _set is not None:
            for op in OPS:
                _set("cuda", op, "ieee")
        return self

    def __exit__(self, *exc):
        if self.cudnn is not None:
            torch._C._set_cudnn_allow_tf32(self.cudnn)
        if self.matmul is not None:
            _restore_matmul(self.old["matmul"], self.matmul)
        if self.new is not None:
            for op, value in self.new.items():
                _set("cuda", op, value)
        return False
