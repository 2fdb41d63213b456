"""Triton kernels for relu, sigmoid and tanh, forward and backward.

Elementwise over a flattened contiguous tensor of ``n`` elements; computed in float32 and
stored in the tensor's dtype. ``ACT`` selects the function at compile time
(0 = identity, 1 = relu, 2 = sigmoid, 3 = tanh); the ``_apply_act`` / ``_act_grad`` helpers
are shared with the fused epilogues of conv and linear.
"""

import triton
import triton.language as tl

from ._aot import AotSpec
from ._launch import cdiv
from ._launch import launch as launch_kernel

ACT_CODES = {None: 0, "relu": 1, "sigmoid": 2, "tanh": 3}
BLOCK = 1024


@triton.jit
def _apply_act(x, ACT: tl.constexpr):
    """Activation of a float32 tile."""
    if ACT == 1:
        # torch's clamp_min(x, 0): 0 where x < 0, x elsewhere (NaN and -0.0 kept as they are)
        x = tl.where(x < 0, 0.0, x)
    elif ACT == 2:
        e = tl.exp(-tl.abs(x))
        x = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif ACT == 3:
        x = _tanh_quot(x)
    return x


@triton.jit
def _tanh_quot(x):
    """tanh of a float32 tile as sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no overflow for large
    |x|, a few float32 ulps from |x| = 0.25 up, about 1e-8 absolute below, where 1 - e cancels
    (the relative error grows as |x| shrinks: 1.3 % at 1e-6, and tanh(-0.0) is +0.0). What the
    fused epilogues (conv, linear: one compiled form carries every activation there) and the
    recurrent kernels compute: :func:`_tanh`'s exact small-|x| branch costs them registers they do
    not have (Triton 3.6, sm_90: a float16 conv tile from 0 to 72-80 B of spills, a TF32 matmul
    tile from 0 to 56 B, whatever activation the launch asks for; the LSTM's persistent forward 8
    B). F.tanh / nn.Tanh (:func:`_tanh`) are exact there."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _tanh(x):
    """tanh of a float32 tile, to a few float32 ulps at every |x|: sign(x) (1 - e) / (1 + e)
    with e = exp(-2|x|) (no overflow for large |x|) from |x| = 0.25 up, below it the odd Taylor
    series to x^9 (truncation under 1e-8 relative there), where 1 - e cancels: the quotient alone
    was 1.3 % off at 1e-6 and 0 at 1e-8 (a user audit). The series keeps x's sign, so tanh(-0.0)
    is -0.0 as torch's; NaN takes the quotient and stays NaN. The activation kernel's (F.tanh,
    nn.Tanh); the fused epilogues and the recurrent kernels keep :func:`_tanh_quot`."""
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, series, _tanh_quot(x))


@triton.jit
def _epilogue_act(acc, ACT):
    """The activation chosen by the runtime flag ACT (0 = none): a uniform branch, so one
    compiled kernel serves every activation where the kernel takes ACT as do_not_specialize
    (linear's matmul); the convolutions let Triton's JIT compile ACT = 1 (relu) apart."""
    if ACT == 1:
        acc = _apply_act(acc, 1)
    elif ACT == 2:
        acc = _apply_act(acc, 2)
    elif ACT == 3:
        acc = _apply_act(acc, 3)
    return acc


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` of a GEMM over [BLOCK_M, BLOCK_N] tiles, ordered in groups
    of GROUP_M row tiles so that neighbouring programs share B tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _act_grad(g, y, ACT: tl.constexpr):
    """Gradient through the activation given its float32 output tile ``y``."""
    if ACT == 1:
        # torch's threshold_backward: 0 where y <= 0, else g; a NaN output (NaN input) passes g
        g = tl.where(y <= 0, 0.0, g)
    elif ACT == 2:
        g = g * y * (1.0 - y)
    elif ACT == 3:
        g = g * (1.0 - y * y)
    return g


@triton.jit
def _act_fwd_kernel(x_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64: tensors may exceed 2^31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 3:
        y = _tanh(x)  # exact to a few ulps at every |x| (the epilogues' _tanh_quot is not below 0.25)
    else:
        y = _apply_act(x, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(g_ptr, y_ptr, dx_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dx = _act_grad(g, y, ACT)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def block_size(n: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK, num_warps): 1024 elements and 4 warps on a GPU; under the interpreter a larger
    block means fewer Python-level programs."""
    return (4096, 4) if interpret else (BLOCK, 4)


def act_forward(x, y, activation: str, interpret: bool) -> None:
    """y[i] = act(x[i]) for contiguous ``x``/``y`` of the same shape and dtype."""
    n = x.numel()
    if n == 0:
        return
    blk, warps = block_size(n, interpret)
    launch_kernel(_act_fwd_kernel, (cdiv(n, blk),), x, y, n, ACT=ACT_CODES[activation], BLOCK=blk, num_warps=warps)


def act_backward(g, y, dx, activation: str, interpret: bool) -> None:
    """dx[i] = g[i] * act'(.) expressed through the output y[i]; all contiguous, same shape."""
    n = g.numel()
    if n == 0:
        return
    blk, warps = block_size(n, interpret)
    launch_kernel(_act_bwd_kernel, (cdiv(n, blk),), g, y, dx, n, ACT=ACT_CODES[activation], BLOCK=blk, num_warps=warps)


def aot_specs():
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for name, code in ACT_CODES.items():
            if name is None:
                continue
            specs.append(AotSpec(_act_fwd_kernel, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n": "i32", "ACT": "constexpr", "BLOCK": "constexpr"},
                                 {"ACT": code, "BLOCK": BLOCK}, num_warps=4, label=f"{name} {dt}"))
            specs.append(AotSpec(_act_bwd_kernel, {"g_ptr": f"*{dt}", "y_ptr": f"*{dt}", "dx_ptr": f"*{dt}", "n": "i32", "ACT": "constexpr", "BLOCK": "constexpr"},
                                 {"ACT": code, "BLOCK": BLOCK}, num_warps=4, label=f"{name} {dt}"))
    return specs


def launched_specs():
    """:func:`aot_specs` as launches of aligned tensors whose element count is a multiple of 16
    compile them (:meth:`AotSpec.aligned`): the form ``gpu-nn sass --launched`` shows with
    128-bit loads and stores."""
    return [spec.aligned() for spec in aot_specs()]
