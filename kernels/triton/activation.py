"""Triton kernels for relu, sigmoid and tanh, forward and backward.

Elementwise over a flattened contiguous tensor of ``n`` elements; computed in float32 and
stored in the tensor's dtype. ``ACT`` selects the function at compile time
(0 = identity, 1 = relu, 2 = sigmoid, 3 = tanh); the ``_apply_act`` / ``_act_grad`` helpers
are shared with the fused epilogues of conv and linear.

The activation kernel (``F.sigmoid`` / ``F.tanh``, ``nn.Sigmoid`` / ``nn.Tanh``) computes in
float32 what torch's CUDA kernels compute, by their expressions and their math library: sigmoid
``1 / (1 + exp(-x))`` with libdevice's ``__nv_expf`` (which CUDA's ``expf``, torch's
``std::exp(float)``, is) and an IEEE division (``tl.div_rn``), tanh libdevice's ``__nv_tanhf``
(torch's ``::tanh``); the gradients (here and in the fused epilogues' backward) torch's
``a * (1 - b) * b`` and ``a * fma(-b, b, 1)``, as its builds compile ``a * (1 - b * b)``.
Triton's own ``tl.exp`` is ``ex2.approx`` of ``x * log2(e)`` rounded to float32 (an error
growing with |x|: up to about 60 float32 ulps of a sigmoid near x = -80 from that rounding
alone, ex2 taken exact; 16 in the median over [-87, -70]) and its ``/`` PTX's
approximate ``div.full.f32`` (2 ulps). The fused epilogues and the recurrent cells keep the
``tl.exp`` forms (``_apply_act``, ``_tanh_quot``): their registers are counted.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

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
    recurrent kernels compute: an exact small-|x| branch (a Taylor series, which the activation
    kernel had before it took libdevice's tanhf) cost them registers they do not have (Triton
    3.6, sm_90: a float16 conv tile from 0 to 72-80 B of spills, a TF32 matmul tile from 0 to 56
    B, whatever activation the launch asks for; the LSTM's persistent forward 8 B). F.tanh /
    nn.Tanh (:func:`_tanh_torch`) are exact there."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _sigmoid_torch(x):
    """torch's CUDA sigmoid of a float32 tile: ``1 / (1 + exp(-x))`` with CUDA's expf (libdevice)
    and an IEEE division, so 0 below x = -88.72, where exp(-x) overflows, as torch's (the
    reference and the fused forms keep e / (1 + e) there: tiny results)."""
    return tl.div_rn(1.0, 1.0 + libdevice.exp(-x))


@triton.jit
def _tanh_torch(x):
    """torch's CUDA tanh of a float32 tile: libdevice's tanhf. Below |x| = 2^-14, x itself,
    which tanhf returns there (x^3 / 3 is under half an ulp of x): Triton compiles libdevice in
    flush-to-zero mode (``enable_reflect_ftz``), which would return 0 for a subnormal x where
    torch's (nvcc's default, no flush) returns x; -0.0 keeps its sign, NaN stays NaN."""
    return tl.where(tl.abs(x) < 6.103515625e-05, x, libdevice.tanh(x))


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
        g = g * (1.0 - y) * y  # torch's sigmoid_backward: a * (1 - b) * b, in that order
    elif ACT == 3:
        # torch's tanh_backward a * (1 - b * b), whose 1 - b * b its CPU and CUDA builds compile to
        # one fma: fused here too, whatever Triton's contraction (the interpreter's is exact)
        g = g * tl.fma(-y, y, 1.0)
    return g


@triton.jit
def _act_fwd_kernel(x_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64: tensors may exceed 2^31 elements
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 2:
        y = _sigmoid_torch(x)
    elif ACT == 3:
        y = _tanh_torch(x)
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
