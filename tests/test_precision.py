"""float32 precision as torch decides it (gpu_nn._precision): torch's per-operation API
(``fp32_precision``, torch >= 2.9) and its legacy flags, read without the legacy getters' "mix of
the legacy and new APIs" error. Each check runs in a process of its own: these settings are
process-wide and some (the generic one) have no getter that gives back what was set."""

import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not hasattr(torch._C, "_get_fp32_precision_getter"),
                                reason="torch before 2.9 has no per-operation fp32_precision API")


def _run(body: str, kernels: bool = False) -> None:
    """Run PRELUDE then ``body`` (an indented block: dedented here) in a process of its own, which
    prints DONE last: a body that never ran to its end fails the test. The process is forked from
    the uninterpreted server (helpers.run_uninterpreted: torch and gpu-nn imported, no precision
    setting touched or read; a fresh Python where there is no server): a fresh Python cost about
    3.4 s of imports, 20 s of a run for the six bodies that run no kernel. One that does
    (``kernels``: Triton's, which on a CPU machine need the interpreter the server has not) runs
    in a fresh Python with this process's environment."""
    from helpers import run_fresh, run_uninterpreted

    code = PRELUDE + textwrap.dedent(body) + "\nprint('DONE')\n"
    if kernels:
        proc = run_fresh(["-c", code])
    else:
        proc = run_uninterpreted(["-c", code], timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("DONE"), proc.stdout[-3000:] + proc.stderr[-3000:]


PRELUDE = """
import torch
from gpu_nn import _precision as P

def raises(fn):
    try:
        fn()
    except RuntimeError as e:
        return "mix of the legacy and new APIs" in str(e)
    return False
"""


def test_tf32_follows_both_apis_where_torchs_legacy_getters_raise():
    _run("""
    # the legacy API: what torch.backends.*.allow_tf32 read
    for flag in (True, False):
        torch.backends.cuda.matmul.allow_tf32 = flag
        assert P.tf32("matmul") is flag is torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = flag
        assert P.tf32("conv") is P.tf32("rnn") is flag is torch.backends.cudnn.allow_tf32
    for prec, want in (("high", True), ("medium", True), ("highest", False)):
        torch.set_float32_matmul_precision(prec)
        assert P.tf32("matmul") is want and not P.tf32("conv")
    # the new API, one operation at a time (torch's notes): the legacy getters raise, we answer
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert raises(lambda: torch.backends.cuda.matmul.allow_tf32)
    assert P.tf32("matmul") and not P.tf32("conv")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert raises(lambda: torch.backends.cudnn.allow_tf32)
    assert not P.tf32("conv") and P.tf32("rnn")
    # 'none' inherits: cuda's 'all', then the generic setting
    torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"
    assert P.tf32("conv")
    torch.backends.fp32_precision = "ieee"
    assert not P.tf32("conv") and P.tf32("rnn") and P.tf32("matmul")
    """)


def test_without_cudnn_convolutions_and_recurrent_layers_follow_the_matmul_setting():
    """``torch.backends.cudnn.enabled = False``: torch's CUDA convolutions and recurrent layers run
    their native kernels, cuBLAS GEMMs under the matmul TF32 setting (off by default), so float32
    products are exact there whatever cudnn.allow_tf32 says; ours decide the same way (before,
    they read cudnn.allow_tf32 alone and ran TF32)."""
    _run("""
    from gpu_nn.ops import conv as oc, rnn as orn
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # a CPU machine (no GPU: the interpreter, or none) answers 'ieee' otherwise
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False
    assert P.tf32("conv") and P.tf32("rnn") and oc._precision(torch.float32) == "tf32" and orn.tf32_allowed(torch.float32)
    torch.backends.cudnn.enabled = False
    assert not P.tf32("conv") and not P.tf32("rnn") and not P.tf32("matmul")
    assert oc._precision(torch.float32) == "ieee" and not orn.tf32_allowed(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    assert P.tf32("conv") and P.tf32("rnn") and oc._precision(torch.float32) == "tf32"
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's own setting means nothing while it is off
    assert P.tf32("conv") and P.tf32("rnn")
    torch.backends.cudnn.enabled = True
    assert not P.tf32("conv") and not P.tf32("rnn") and P.tf32("matmul")
    torch.cuda.is_available = available
    """)


def test_float32_ops_choose_their_precision_under_the_new_api():
    """Linear, convolution and recurrent layers on the Triton path (the interpreter, or a GPU) after
    a user set the new API for one operation each: their choices follow it (before, each raised
    torch's mix error from the legacy getter it read)."""
    _run("""
    import gpu_nn, gpu_nn.functional as F
    from gpu_nn.ops import conv as oc, dense as od, rnn as orn
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    assert raises(lambda: torch.backends.cuda.matmul.allow_tf32) and raises(lambda: torch.backends.cudnn.allow_tf32)
    assert od._tf32_allowed() and orn.tf32_allowed(torch.float32)
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # the interpreter answers 'ieee' otherwise
    assert oc._precision(torch.float32) == "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert oc._precision(torch.float32) == "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.cuda.is_available = available
    dev = "cuda" if available() else "cpu"  # Triton runs CPU tensors only under the interpreter
    x = torch.randn(2, 3, 5, 5, device=dev, requires_grad=True)
    with gpu_nn.backend("triton"):
        F.linear(torch.randn(3, 4, device=dev), torch.randn(2, 4, device=dev)).sum()
        F.conv2d(x, torch.randn(2, 3, 3, 3, device=dev)).sum().backward()
        gpu_nn.nn.GRU(3, 4).to(dev)(torch.randn(2, 1, 3, device=dev))
    """, kernels=True)


def test_matmul_tf32_sets_and_restores_cublas_under_either_api():
    _run("""
    for prec in ("highest", "high", "medium"):
        torch.set_float32_matmul_precision(prec)
        for want in (True, False, None):
            before = P.tf32("matmul")
            with P.matmul_tf32(want):
                assert P.tf32("matmul") is (before if want is None else want)
                assert not raises(lambda: torch.backends.cuda.matmul.allow_tf32)
            assert P.tf32("matmul") is before
            # "medium" comes back as "medium" (through the legacy flag it would read "high", and
            # with the CPU's bfloat16 matmul setting "medium" made, torch's getter would raise)
            assert torch.get_float32_matmul_precision() == prec
        try:
            with P.matmul_tf32(not P.tf32("matmul")):
                raise KeyError
        except KeyError:
            pass
        assert torch.get_float32_matmul_precision() == prec
    # set through the new API only: the choice comes back, and nothing raises meanwhile
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with P.matmul_tf32(False):
        assert not P.tf32("matmul")
    assert P.tf32("matmul")
    """)


def test_exact_float32_turns_tf32_off_everywhere_and_puts_it_back():
    _run("""
    def state():
        return {op: P.tf32(op) for op in P.OPS}

    # torch's defaults (cuDNN TF32 on, matmul off), then every legacy combination
    for cudnn, mm in ((True, False), (False, True), (True, True), (False, False)):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, mm
        with P.exact_float32():
            assert state() == {"matmul": False, "conv": False, "rnn": False}
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert state() == {"matmul": mm, "conv": cudnn, "rnn": cudnn}
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (cudnn, mm)
    torch.set_float32_matmul_precision("medium")
    with P.exact_float32():
        assert not P.tf32("matmul")
    assert torch.get_float32_matmul_precision() == "medium"
    # the new API set for single operations (the legacy getters raise): each choice comes back
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    before = state()
    with P.exact_float32():
        assert state() == {"matmul": False, "conv": False, "rnn": False}
    assert state() == before == {"matmul": True, "conv": False, "rnn": True}
    """)


def test_blocks_put_back_mixed_settings_and_inheritance():
    """What the blocks found comes back exactly, in states that mix the APIs: "medium" with
    cuBLAS's TF32 turned off per operation stays exact (set_float32_matmul_precision("medium")
    alone would write TF32), the CPU's matmul setting is left as it was, and an inherited
    ("none") cuBLAS setting keeps following a generic setting made afterwards."""
    _run("""
    g = torch._C._get_fp32_precision_getter
    torch.set_float32_matmul_precision("medium")
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    for block in (lambda: P.matmul_tf32(True), P.exact_float32):
        with block():
            pass
        assert g("cuda", "matmul") == "ieee" and not P.tf32("matmul"), block
        assert g("mkldnn", "matmul") == "bf16" and torch.get_float32_matmul_precision() == "medium"
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    with P.exact_float32():
        pass
    assert g("mkldnn", "matmul") == "ieee"
    """)
    _run("""
    g = torch._C._get_fp32_precision_getter
    assert g("cuda", "matmul") == "none"  # torch's default: inherited (from nothing yet)
    torch.backends.fp32_precision = "ieee"  # inherited from the generic setting now
    assert g("cuda", "matmul") == "ieee"
    with P.matmul_tf32(True):  # what every float32 cupy recurrent call does under the defaults
        assert P.tf32("matmul")
    with P.exact_float32():
        pass
    torch.backends.fp32_precision = "tf32"
    assert P.tf32("matmul")  # still inherited: the later generic setting reaches it
    """)
