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
    TF32, as they decide it. Never raises for a mix of the legacy and new APIs. With cuDNN
    switched off (``torch.backends.cudnn.enabled = False``) torch's CUDA convolutions and
    recurrent layers run their native kernels, whose products are cuBLAS GEMMs (im2col and
    matmuls; a depthwise convolution's own kernel is exact float32): they follow the matmul
    setting then, and so does ``op`` here."""
    if op != "matmul" and not torch._C._get_cudnn_enabled():
        op = "matmul"
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


def _cudnn_legacy():
    """torch.backends.cudnn.allow_tf32's value, or None where reading it raises."""
    try:
        return torch._C._get_cudnn_allow_tf32()
    except RuntimeError:
        return None


def _stored(backend: str, op: str) -> str:
    """What (backend, op) holds, as far as torch lets it be read: torch's getter gives the value
    resolved through inheritance, so one equal to what its parent resolves to is taken for an
    inherited ``"none"`` (written back, it resolves the same, and keeps following its parent)."""
    value = _get(backend, op)
    return "none" if value == _get(backend, "all") else value


class _Snapshot:
    """What a block here may change, to be written back at its end: the legacy flags where they
    can be read (a mix of APIs makes torch's getters raise), then the per-operation values as
    stored (:func:`_stored`) -- in that order, since the legacy setters write per-operation
    values too. ``cudnn`` False: the matmul settings alone (what :class:`matmul_tf32` changes:
    the legacy matmul flag and cuBLAS's value; the CPU's matmul value only where "medium" has to
    come back through set_float32_matmul_precision, which writes it)."""

    __slots__ = ("matmul", "cudnn", "nodes")

    def __init__(self, cudnn: bool):
        self.matmul = _matmul_legacy()
        self.cudnn = _cudnn_legacy() if cudnn else None
        nodes = [("cuda", "matmul")] if _get is not None else []
        if nodes and (cudnn or self.matmul == "medium"):
            nodes.append(("mkldnn", "matmul"))
        if nodes and cudnn:
            nodes += [("cuda", "conv"), ("cuda", "rnn")]
        self.nodes = [(b, o, _stored(b, o)) for b, o in nodes]

    def restore(self) -> None:
        if self.cudnn is not None:
            torch._C._set_cudnn_allow_tf32(self.cudnn)
        if self.matmul in ("high", "highest"):
            torch._C._set_cublas_allow_tf32(self.matmul == "high")  # (leaves the CPU's value alone)
        elif self.matmul is not None:
            torch._C._set_float32_matmul_precision(self.matmul)
        for backend, op, value in self.nodes:
            _set(backend, op, value)


class matmul_tf32:
    """cuBLAS's float32 GEMMs in TF32 (``want`` True) or exact (False) while the block runs; None:
    untouched. Nothing is written where the setting already says ``want``; otherwise the legacy
    setter writes it (it sets the legacy flag and cuBLAS's per-operation value alike, so neither
    API's reader sees a mix, torch's own cuBLAS calls included) and the block's end writes back
    what it found (:class:`_Snapshot`). The setting is process-wide: another thread's float32
    GEMM launched meanwhile sees it too."""

    __slots__ = ("want", "saved")

    def __init__(self, want):
        self.want = want
        self.saved = None

    def __enter__(self):
        if self.want is not None and tf32("matmul") != self.want:
            self.saved = _Snapshot(cudnn=False)
            torch._C._set_cublas_allow_tf32(self.want)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            self.saved.restore()
            self.saved = None
        return False


class exact_float32:
    """TF32 off for every float32 product of torch's CUDA kernels and ours (matmul, conv, rnn)
    while the block runs, through the legacy setters and each operation's own value, then back
    to what it found (:class:`_Snapshot`)."""

    def __enter__(self):
        self.saved = _Snapshot(cudnn=True)
        torch._C._set_cudnn_allow_tf32(False)
        torch._C._set_cublas_allow_tf32(False)
        if _set is not None:
            for op in OPS:
                _set("cuda", op, "ieee")
        return self

    def __exit__(self, *exc):
        self.saved.restore()
        return False
