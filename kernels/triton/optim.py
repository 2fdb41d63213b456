"""Triton multi-tensor kernels for SGD, Adagrad, Adadelta, RMSprop, Adam/AdamW and global-norm
gradient clipping: one launch per (device, dtype) part of a parameter group.

Layout (why not a table of raw pointers): Triton cannot turn an integer loaded from memory into
a typed pointer portably (and the interpreter has no such cast), so every tensor of one role is
addressed **relative to a base tensor of that role**: ``p_base + p_off`` where ``p_off = (ptr -
base_ptr) / itemsize`` is an int64 element offset (possibly negative) read from a chunk table.
All tensors live in one address space, so this is plain pointer arithmetic on a GPU, and the
interpreter (which runs on real host addresses) does the same. Roles: parameters and gradients
(the parameters' dtype), optimizer state (always float32), step counts (float32 scalars).

Chunk table: int64 ``[n_chunks, NCOL]``, one row per program: element offsets of the tensor's
parameter, gradient, up to three state tensors and its step, the chunk's first element, the
tensor's numel and a per-tensor flag (SGD: first step). Program ``i`` updates
``CHUNK = BLOCK * ITERS`` elements of one tensor; full blocks run without masks (vectorised
loads: every offset is 16-byte aligned, constexprs ``VP``/``VS`` give the alignment in
elements of the parameter/gradient and state offsets; the launch glue copies any tensor that
is not), the tail block masked.

Scalars: hyperparameters arrive as int64 bit patterns of Python doubles (Triton passes Python
floats as fp32, and ``1 - 0.999`` in fp32 is off by 1e-5 relative); per-tensor bias
corrections are computed in-kernel in float64 from the step tensor (``beta**step`` by binary
powering on the integer step), so a step never reads anything back to the host. The learning
rate may instead arrive as a pointer to a 1-element float32 tensor (constexpr ``LR_PTR``): each
program loads it once and widens it to float64, so a tensor a scheduler changes in place is read
when the kernel runs (CUDA graph replays included) and steps exactly as its value passed as a
float does. The per-element math runs in float32 in torch's operation order; results are stored
in the parameter's dtype (float32/float16/bfloat16). float64 parameters are not supported (they
run on the reference).
"""

import struct

import triton
import triton.language as tl

from ._aot import AotSpec
from ._launch import launch as launch_kernel

NCOL = 9  # p_off, g_off, s0_off, s1_off, s2_off, step_off, start, numel, flag
GPU_BLOCK, GPU_ITERS, GPU_WARPS = 1024, 16, 4
INTERP_BLOCK, INTERP_ITERS = 512, 1
CLIP_RBLOCK = 1024
NORM_CODES = {"inf": 0, "two": 2, "p": 1, "one": 3}


def f64_bits(x: float) -> int:
    """A Python float's IEEE double bit pattern as a signed int64 (read back with bitcast)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _f64(bits):
    """A hyperparameter passed as the int64 bit pattern of a Python double (Triton would pass a
    float argument as fp32, and 1 - 0.999 in fp32 is off by about 1e-5 relative)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _lr64(lr_arg, LR_PTR: tl.constexpr):
    """The learning rate as float64: ``lr_arg`` is the int64 bit pattern of a Python double, or
    with ``LR_PTR`` a pointer to a 1-element float32 tensor read here, on the device, when the
    kernel runs (a scheduler's in-place change reaches the next step and a CUDA graph's
    replays; widened exactly, so a float32 lr of value v steps as the float lr float(v))."""
    if LR_PTR:
        lr = tl.load(lr_arg).to(tl.float64)
    else:
        lr = _f64(lr_arg)
    return lr


@triton.jit
def _pow_int(base, step):
    """``base ** step`` for a non-negative integer-valued float64 ``step``, by binary powering
    (a handful of float64 multiplies: exact enough that 1 - beta^t keeps full precision)."""
    n = step.to(tl.int64)
    r = base * 0.0 + 1.0
    b = base
    while n > 0:
        r = tl.where((n & 1) == 1, r * b, r)
        b = b * b
        n = n >> 1
    return r


@triton.jit
def _lerp(a, b, w):
    """torch.lerp's two-sided formula (exact at w = 1)."""
    d = b - a
    return tl.where(w < 0.5, a + w * d, b - d * (1.0 - w))


@triton.jit
def _amp_live(n, inf_ptr, AMP: tl.constexpr):
    """The chunk's element count, or 0 where GradScaler found an inf / NaN (``AMP`` > 0 and
    ``found_inf`` nonzero, read here on the device): every program then skips the whole step and
    writes nothing, as torch's fused steps do, with no host read."""
    if AMP != 0:
        n = tl.where(tl.load(inf_ptr) != 0.0, 0, n)
    return n


@triton.jit
def _amp_scale(scale_ptr, AMP: tl.constexpr):
    """GradScaler's scale (``AMP`` 2: read on the device), 1 otherwise (unused)."""
    if AMP == 2:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = 1.0
    return s


@triton.jit
def _grad(g_ptr, offs, mask, scale, AMP: tl.constexpr):
    """The gradient in float32; with ``AMP`` 2 unscaled (g / scale, IEEE-rounded as torch's fused
    steps divide) and written back so, as torch's fused steps leave the gradients unscaled."""
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if AMP == 2:
        g = tl.div_rn(g, scale)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    return g


# -- SGD ----------------------------------------------------------------------------------

@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, offs, mask, first, sign, lr, wd, momentum, damp1, scale,
               MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, WD: tl.constexpr, AMP: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = _grad(g_ptr, offs, mask, scale, AMP) * sign
    if WD:
        g = g + wd * p
    if MOMENTUM:
        b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
        # first step: the buffer is the gradient itself (torch clones it)
        b = tl.where(first != 0, g, b * momentum + damp1 * g)
        tl.store(b_ptr + offs, (b).to(b_ptr.dtype.element_ty), mask=mask)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    tl.store(p_ptr + offs, (p + (-lr) * g).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["lr_arg", "wd_b", "mom_b", "damp_b", "sign_b"])
def _sgd_kernel(table_ptr, p_base, g_base, s_base, lr_arg, wd_b, mom_b, damp_b, sign_b, scale_ptr, inf_ptr,
                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, WD: tl.constexpr, VP: tl.constexpr, VS: tl.constexpr,
                BLOCK: tl.constexpr, ITERS: tl.constexpr, LR_PTR: tl.constexpr = False, AMP: tl.constexpr = 0):
    """p -= lr * (b or g + momentum b); b = g (first step) | momentum b + (1 - dampening) g."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 9  # this program's chunk
    p_ptr = p_base + tl.multiple_of(tl.load(row + 0), VP)
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VP)
    b_ptr = s_base + tl.multiple_of(tl.load(row + 2), VS)
    start = tl.multiple_of(tl.load(row + 6), BLOCK)
    n = tl.load(row + 7)
    first = tl.load(row + 8)
    n = _amp_live(n, inf_ptr, AMP)
    scale = _amp_scale(scale_ptr, AMP)
    lr = _lr64(lr_arg, LR_PTR).to(tl.float32)
    wd = _f64(wd_b).to(tl.float32)
    momentum = _f64(mom_b).to(tl.float32)
    damp1 = (1.0 - _f64(damp_b)).to(tl.float32)
    sign = _f64(sign_b).to(tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        if start + (it + 1) * BLOCK <= n:
            _sgd_block(p_ptr, g_ptr, b_ptr, offs, None, first, sign, lr, wd, momentum, damp1, scale,
                       MOMENTUM, NESTEROV, WD, AMP)
        elif start + it * BLOCK < n:
            _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < n, first, sign, lr, wd, momentum, damp1, scale,
                       MOMENTUM, NESTEROV, WD, AMP)


# -- Adagrad ------------------------------------------------------------------------------

@triton.jit
def _adagrad_block(p_ptr, g_ptr, s_ptr, offs, mask, sign, wd, neg_clr, eps, scale, WD: tl.constexpr,
                   AMP: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = _grad(g_ptr, offs, mask, scale, AMP) * sign
    if WD:
        g = g + wd * p
    s = tl.load(s_ptr + offs, mask=mask).to(tl.float32) + g * g
    tl.store(s_ptr + offs, (s).to(s_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, (p + tl.div_rn(neg_clr * g, tl.sqrt_rn(s) + eps)).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["lr_arg", "lr_decay_b", "wd_b", "eps_b", "sign_b"])
def _adagrad_kernel(table_ptr, p_base, g_base, s_base, step_base, lr_arg, lr_decay_b, wd_b, eps_b, sign_b, scale_ptr,
                    inf_ptr, WD: tl.constexpr, VP: tl.constexpr, VS: tl.constexpr, BLOCK: tl.constexpr,
                    ITERS: tl.constexpr, LR_PTR: tl.constexpr = False, AMP: tl.constexpr = 0):
    """sum += g^2; p -= lr / (1 + (step - 1) lr_decay) * g / (sqrt(sum) + eps)."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 9  # this program's chunk
    p_ptr = p_base + tl.multiple_of(tl.load(row + 0), VP)
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VP)
    s_ptr = s_base + tl.multiple_of(tl.load(row + 2), VS)
    step = tl.load(step_base + tl.load(row + 5)).to(tl.float64)
    start = tl.multiple_of(tl.load(row + 6), BLOCK)
    n = _amp_live(tl.load(row + 7), inf_ptr, AMP)
    scale = _amp_scale(scale_ptr, AMP)
    neg_clr = (-(_lr64(lr_arg, LR_PTR) / (1.0 + (step - 1.0) * _f64(lr_decay_b)))).to(tl.float32)
    wd = _f64(wd_b).to(tl.float32)
    eps = _f64(eps_b).to(tl.float32)
    sign = _f64(sign_b).to(tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        if start + (it + 1) * BLOCK <= n:
            _adagrad_block(p_ptr, g_ptr, s_ptr, offs, None, sign, wd, neg_clr, eps, scale, WD, AMP)
        elif start + it * BLOCK < n:
            _adagrad_block(p_ptr, g_ptr, s_ptr, offs, offs < n, sign, wd, neg_clr, eps, scale, WD, AMP)


# -- Adadelta -----------------------------------------------------------------------------

@triton.jit
def _adadelta_block(p_ptr, g_ptr, v_ptr, u_ptr, offs, mask, sign, wd, neg_lr, rho, w, eps,
                    WD: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * sign
    if WD:
        g = g + wd * p
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32) * rho + (w * g) * g
    u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
    delta = tl.div_rn(tl.sqrt_rn(u + eps), tl.sqrt_rn(v + eps)) * g
    u = u * rho + (w * delta) * delta
    tl.store(v_ptr + offs, (v).to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + offs, (u).to(u_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, (p + neg_lr * delta).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["lr_arg", "rho_b", "eps_b", "wd_b", "sign_b"])
def _adadelta_kernel(table_ptr, p_base, g_base, s_base, lr_arg, rho_b, eps_b, wd_b, sign_b,
                     WD: tl.constexpr, VP: tl.constexpr, VS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                     LR_PTR: tl.constexpr = False):
    """v = rho v + (1-rho) g^2; delta = sqrt(u+eps)/sqrt(v+eps) g; u = rho u + (1-rho) delta^2; p -= lr delta."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 9  # this program's chunk
    p_ptr = p_base + tl.multiple_of(tl.load(row + 0), VP)
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VP)
    v_ptr = s_base + tl.multiple_of(tl.load(row + 2), VS)
    u_ptr = s_base + tl.multiple_of(tl.load(row + 3), VS)
    start = tl.multiple_of(tl.load(row + 6), BLOCK)
    n = tl.load(row + 7)
    rho64 = _f64(rho_b)
    neg_lr = (-_lr64(lr_arg, LR_PTR)).to(tl.float32)
    rho = rho64.to(tl.float32)
    w = (1.0 - rho64).to(tl.float32)
    eps = _f64(eps_b).to(tl.float32)
    wd = _f64(wd_b).to(tl.float32)
    sign = _f64(sign_b).to(tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        if start + (it + 1) * BLOCK <= n:
            _adadelta_block(p_ptr, g_ptr, v_ptr, u_ptr, offs, None, sign, wd, neg_lr, rho, w, eps, WD)
        elif start + it * BLOCK < n:
            _adadelta_block(p_ptr, g_ptr, v_ptr, u_ptr, offs, offs < n, sign, wd, neg_lr, rho, w, eps, WD)


# -- RMSprop ------------------------------------------------------------------------------

@triton.jit
def _rmsprop_block(p_ptr, g_ptr, v_ptr, ga_ptr, b_ptr, offs, mask, sign, wd, neg_lr, alpha, w, eps, momentum,
                   WD: tl.constexpr, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * sign
    if WD:
        g = g + wd * p
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32) * alpha + (w * g) * g
    tl.store(v_ptr + offs, (v).to(v_ptr.dtype.element_ty), mask=mask)
    if CENTERED:
        ga = _lerp(tl.load(ga_ptr + offs, mask=mask).to(tl.float32), g, w)
        tl.store(ga_ptr + offs, (ga).to(ga_ptr.dtype.element_ty), mask=mask)
        # torch's addcmul(v, ga, ga, value=-1) is one fused multiply-add on CPU and CUDA, so
        # ga^2 is never rounded on its own: v = +inf (g^2 overflowed) minus a finite ga^2 stays
        # +inf. Rounded separately (the interpreter, or a compiler that does not contract),
        # ga^2 overflows too once |ga| > 1.8e19 and inf - inf gives NaN.
        avg = tl.sqrt_rn(tl.fma(-ga, ga, v))
    else:
        avg = tl.sqrt_rn(v)
    avg = avg + eps
    if MOMENTUM:
        b = tl.load(b_ptr + offs, mask=mask).to(tl.float32) * momentum + tl.div_rn(g, avg)
        tl.store(b_ptr + offs, (b).to(b_ptr.dtype.element_ty), mask=mask)
        p = p + neg_lr * b
    else:
        p = p + tl.div_rn(neg_lr * g, avg)
    tl.store(p_ptr + offs, (p).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["lr_arg", "alpha_b", "eps_b", "wd_b", "mom_b", "sign_b"])
def _rmsprop_kernel(table_ptr, p_base, g_base, s_base, lr_arg, alpha_b, eps_b, wd_b, mom_b, sign_b,
                    WD: tl.constexpr, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, VP: tl.constexpr, VS: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr, LR_PTR: tl.constexpr = False):
    """v = alpha v + (1-alpha) g^2; avg = sqrt(v [- gbar^2]) + eps; p -= lr (b | g / avg)."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 9  # this program's chunk
    p_ptr = p_base + tl.multiple_of(tl.load(row + 0), VP)
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VP)
    v_ptr = s_base + tl.multiple_of(tl.load(row + 2), VS)
    ga_ptr = s_base + tl.multiple_of(tl.load(row + 3), VS)
    b_ptr = s_base + tl.multiple_of(tl.load(row + 4), VS)
    start = tl.multiple_of(tl.load(row + 6), BLOCK)
    n = tl.load(row + 7)
    a64 = _f64(alpha_b)
    neg_lr = (-_lr64(lr_arg, LR_PTR)).to(tl.float32)
    alpha = a64.to(tl.float32)
    w = (1.0 - a64).to(tl.float32)
    eps = _f64(eps_b).to(tl.float32)
    wd = _f64(wd_b).to(tl.float32)
    momentum = _f64(mom_b).to(tl.float32)
    sign = _f64(sign_b).to(tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        if start + (it + 1) * BLOCK <= n:
            _rmsprop_block(p_ptr, g_ptr, v_ptr, ga_ptr, b_ptr, offs, None, sign, wd, neg_lr, alpha, w, eps,
                           momentum, WD, CENTERED, MOMENTUM)
        elif start + it * BLOCK < n:
            _rmsprop_block(p_ptr, g_ptr, v_ptr, ga_ptr, b_ptr, offs, offs < n, sign, wd, neg_lr, alpha, w, eps,
                           momentum, WD, CENTERED, MOMENTUM)


# -- Adam / AdamW -------------------------------------------------------------------------

@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vm_ptr, offs, mask, sign, wd, decay, w1, beta2, w2, eps, neg_step,
                bc2s, scale, WD_MODE: tl.constexpr, AMSGRAD: tl.constexpr, AMP: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = _grad(g_ptr, offs, mask, scale, AMP) * sign
    if WD_MODE == 1:
        g = g + wd * p
    if WD_MODE == 2:
        p = p * decay
    m = _lerp(tl.load(m_ptr + offs, mask=mask).to(tl.float32), g, w1)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32) * beta2 + (w2 * g) * g
    tl.store(m_ptr + offs, (m).to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, (v).to(v_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        # NaN kept, as torch.maximum keeps it (and the CUDA C twin's select)
        vm = tl.maximum(tl.load(vm_ptr + offs, mask=mask).to(tl.float32), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vm_ptr + offs, (vm).to(vm_ptr.dtype.element_ty), mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(vm), bc2s) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2s) + eps
    tl.store(p_ptr + offs, (p + tl.div_rn(neg_step * m, denom)).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["lr_arg", "beta1_b", "beta2_b", "eps_b", "wd_b", "sign_b"])
def _adam_kernel(table_ptr, p_base, g_base, s_base, step_base, lr_arg, beta1_b, beta2_b, eps_b, wd_b, sign_b,
                 scale_ptr, inf_ptr, WD_MODE: tl.constexpr, AMSGRAD: tl.constexpr, VP: tl.constexpr,
                 VS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, LR_PTR: tl.constexpr = False,
                 AMP: tl.constexpr = 0):
    """Adam (WD_MODE 1: L2 into the gradient) / AdamW (WD_MODE 2: decoupled decay), torch's order:
    m = lerp(m, g, 1-b1); v = b2 v + (1-b2) g^2; p += -(lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 9  # this program's chunk
    p_ptr = p_base + tl.multiple_of(tl.load(row + 0), VP)
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VP)
    m_ptr = s_base + tl.multiple_of(tl.load(row + 2), VS)
    v_ptr = s_base + tl.multiple_of(tl.load(row + 3), VS)
    vm_ptr = s_base + tl.multiple_of(tl.load(row + 4), VS)
    step = tl.load(step_base + tl.load(row + 5)).to(tl.float64)
    start = tl.multiple_of(tl.load(row + 6), BLOCK)
    n = _amp_live(tl.load(row + 7), inf_ptr, AMP)
    scale = _amp_scale(scale_ptr, AMP)
    lr64 = _lr64(lr_arg, LR_PTR)
    b1 = _f64(beta1_b)
    b2 = _f64(beta2_b)
    wd64 = _f64(wd_b)
    bc1 = 1.0 - _pow_int(b1, step)
    bc2 = 1.0 - _pow_int(b2, step)
    neg_step = (-(lr64 / bc1)).to(tl.float32)
    bc2s = tl.sqrt(bc2).to(tl.float32)  # float64 sqrt is IEEE-rounded
    w1 = (1.0 - b1).to(tl.float32)
    beta2 = b2.to(tl.float32)
    w2 = (1.0 - b2).to(tl.float32)
    eps = _f64(eps_b).to(tl.float32)
    wd = wd64.to(tl.float32)
    decay = (1.0 - lr64 * wd64).to(tl.float32)
    sign = _f64(sign_b).to(tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        if start + (it + 1) * BLOCK <= n:
            _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vm_ptr, offs, None, sign, wd, decay, w1, beta2, w2, eps,
                        neg_step, bc2s, scale, WD_MODE, AMSGRAD, AMP)
        elif start + it * BLOCK < n:
            _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vm_ptr, offs, offs < n, sign, wd, decay, w1, beta2, w2, eps,
                        neg_step, bc2s, scale, WD_MODE, AMSGRAD, AMP)


# -- clipping -----------------------------------------------------------------------------

@triton.jit
def _norm_piece(x, p, NORM: tl.constexpr):
    """|x| (NORM 0: inf, 3: one), x^2 (2) or |x|^p (1) in float32; ``p`` float64."""
    a = tl.abs(x)
    if NORM == 0 or NORM == 3:
        return a
    elif NORM == 2:
        return a * a
    else:
        # |x|^p where |x| > 0; else |x| itself: 0 stays 0, and NaN stays NaN (torch's norm is NaN
        # then; a select of 0 there made a NaN gradient count as 0 in the total). exp(p log|x|)
        # in float64, rounded once: in float32 the product's rounding grows with |p log|x|| (and
        # a GPU's float32 exp is ex2.approx), 4-20x torch's error at |x| near 1e30
        a64 = tl.where(a > 0, a, 1.0).to(tl.float64)
        return tl.where(a > 0, tl.exp(p * tl.log(a64)).to(tl.float32), a)


@triton.jit(do_not_specialize=["p_b"])
def _clip_partial_kernel(table_ptr, g_base, part_ptr, part0, p_b, NORM: tl.constexpr, VP: tl.constexpr,
                         BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """part[part0 + pid] = max |g| (NORM 0) | sum g^2 (NORM 2) | sum |g|^p (NORM 1) | sum |g| (NORM
    3) over the chunk."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 9  # this program's chunk
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VP)
    start = tl.multiple_of(tl.load(row + 6), BLOCK)
    n = tl.load(row + 7)
    p = _f64(p_b)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        x = _norm_piece(tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32), p, NORM)
        if NORM == 0:
            # NaN must survive the max (torch's norm is NaN then)
            acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc = acc + x
    if NORM == 0:
        r = tl.max(acc, axis=0) + tl.sum(tl.where(acc != acc, acc, 0.0), axis=0)  # + NaN if any
    else:
        r = tl.sum(acc, axis=0)
    tl.store(part_ptr + part0 + tl.program_id(0), r)


@triton.jit
def _clip_total(part_ptr, n_parts, p, NORM: tl.constexpr, RBLOCK: tl.constexpr):
    return _clip_reduce(part_ptr, 0, n_parts, p, NORM, RBLOCK)


@triton.jit
def _clip_reduce(part_ptr, c0, c1, p, NORM: tl.constexpr, RBLOCK: tl.constexpr):
    """The norm over the partials part[c0:c1] (each a chunk's max |g|, sum g^2, sum |g|^p or sum
    |g|)."""
    acc = tl.zeros([RBLOCK], dtype=tl.float32)
    for s in range(c0, c1, RBLOCK):
        o = s + tl.arange(0, RBLOCK)
        x = tl.load(part_ptr + o, mask=o < c1, other=0.0)
        if NORM == 0:
            acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        else:
            acc = acc + x
    if NORM == 0:
        total = tl.max(acc, axis=0) + tl.sum(tl.where(acc != acc, acc, 0.0), axis=0)  # + NaN if any
    elif NORM == 2:
        total = tl.sqrt_rn(tl.sum(acc, axis=0))
    elif NORM == 3:
        total = tl.sum(acc, axis=0)  # p = 1: the sum itself, as torch's (no exp / log round trip)
    else:
        total = tl.exp(tl.log(tl.sum(acc, axis=0).to(tl.float64)) / p).to(tl.float32)  # p float64
    return total


@triton.jit
def _round_to(x, rnd):
    """float32 ``x`` rounded to float16 (``rnd`` 1) or bfloat16 (2), back in float32; 0: ``x``."""
    if rnd == 1:
        x = x.to(tl.float16).to(tl.float32)
    elif rnd == 2:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


@triton.jit(do_not_specialize=["max_norm_b", "p_b", "rnd"])
def _clip_scale_kernel(table_ptr, g_base, part_ptr, n_parts, total_ptr, max_norm_b, p_b, rnd, NORM: tl.constexpr,
                       VP: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, RBLOCK: tl.constexpr):
    """Every program reduces the partials to the total norm (no separate launch, no host read),
    program 0 stores it, and each scales its chunk by min(1, max_norm / (total + 1e-6)), the
    total rounded first as the caller returns it (``rnd``: 0 float32, 1 float16, 2 bfloat16, the
    gradients' promoted dtype): torch's total is in that dtype, so a float16 total past 65504 is
    inf and the gradients scale by 0, not by the float32 total's coefficient; so is its
    coefficient, each of its three ops rounded to the half dtype (the scaled gradients then
    torch's bit for bit, not an ulp off)."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * 9  # this program's chunk
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VP)
    start = tl.multiple_of(tl.load(row + 6), BLOCK)
    n = tl.load(row + 7)
    p = _f64(p_b)
    total = _clip_total(part_ptr, n_parts, p, NORM, RBLOCK)
    if tl.program_id(0) == 0:
        tl.store(total_ptr, total)
    # torch's coefficient as its 0-d math in the total's dtype: each op rounded to it (rnd 0:
    # float32, no rounding)
    total = _round_to(total, rnd)
    # (1 / t IEEE-rounded, as torch's reciprocal: Triton's float32 '/' is approximate on a GPU)
    coef = _round_to(_round_to(tl.div_rn(tl.full([], 1.0, tl.float32), _round_to(total + 1e-6, rnd)), rnd)
                     * _f64(max_norm_b).to(tl.float32), rnd)
    coef = tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN, as torch.clamp keeps it
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        if start + (it + 1) * BLOCK <= n:
            tl.store(g_ptr + offs, (tl.load(g_ptr + offs).to(tl.float32) * coef).to(g_ptr.dtype.element_ty))
        elif start + it * BLOCK < n:
            tl.store(g_ptr + offs, (tl.load(g_ptr + offs, mask=offs < n).to(tl.float32) * coef).to(g_ptr.dtype.element_ty), mask=offs < n)


@triton.jit(do_not_specialize=["p_b"])
def _clip_tensor_kernel(part_ptr, bounds_ptr, rnd_ptr, out_ptr, p_b, NORM: tl.constexpr, RBLOCK: tl.constexpr):
    """out[t] = gradient t's own norm over its chunks' partials part[bounds[t]:bounds[t+1]],
    rounded to its dtype (rnd[t]: 0 float32, 1 float16, 2 bfloat16) as torch's per-tensor norm
    is, then put back in the partials' form (NORM 2 its square, NORM 1 its p-th power, NORM 0
    and 3 itself) for _clip_total: torch's total is the norm of those rounded norms, so a float16
    gradient whose own norm passes 65504 makes it inf beside float32 gradients too."""
    t = tl.program_id(0)
    p = _f64(p_b)
    v = _clip_reduce(part_ptr, tl.load(bounds_ptr + t), tl.load(bounds_ptr + t + 1), p, NORM, RBLOCK)
    v = _round_to(v, tl.load(rnd_ptr + t))
    if NORM == 2:
        v = v * v
    elif NORM == 1:
        v = _norm_piece(v, p, 1)
    tl.store(out_ptr + t, v)


@triton.jit
def _clip_total_kernel(part_ptr, n_parts, total_ptr, p_b, NORM: tl.constexpr, RBLOCK: tl.constexpr):
    """The total norm alone (error_if_nonfinite reads it before anything is scaled)."""
    tl.store(total_ptr, _clip_total(part_ptr, n_parts, _f64(p_b), NORM, RBLOCK))


# -- launch configuration -----------------------------------------------------------------

def config(interpret: bool) -> tuple[int, int, int]:
    """(BLOCK, ITERS, num_warps): on a GPU 1024 x 16 = 16 Ki elements per program at 4 warps
    (8 elements per thread per block: two 16-byte vectors per fp32 array); the interpreter
    runs each program in Python, so one small block per program."""
    return (INTERP_BLOCK, INTERP_ITERS, 4) if interpret else (GPU_BLOCK, GPU_ITERS, GPU_WARPS)


def launch(kind: str, table, n_chunks: int, p_base, g_base, s_base, step_base, scalars: dict, flags: dict,
           interpret: bool, grad_scale=None, found_inf=None) -> None:
    """One multi-tensor step launch over ``n_chunks`` table rows (see the module docstring).
    ``scalars`` are Python numbers, but ``scalars["lr"]`` may be a 1-element float32 tensor on
    the parameters' device: the kernel then reads it when it runs (``LR_PTR``). ``found_inf``
    (and ``grad_scale``): GradScaler's float32 scalars on that device, for the kernels torch
    fuses (SGD, Adagrad, Adam): the step skipped where ``found_inf`` is nonzero, the gradients
    unscaled by ``grad_scale`` (and left so) before it (``AMP`` 1: found_inf alone, 2: both)."""
    if n_chunks == 0:
        return
    blk, iters, warps = config(interpret)
    lr = scalars["lr"]
    grid = (n_chunks,)
    common = dict(VP=16 // p_base.element_size(), VS=4, BLOCK=blk, ITERS=iters, num_warps=warps)
    amp = 0 if found_inf is None and grad_scale is None else (2 if grad_scale is not None else 1)
    if amp:  # (0 by default: a step without GradScaler keeps its keywords and plan key)
        if kind not in ("sgd", "adagrad", "adam"):
            raise ValueError(f"the {kind} kernel takes no GradScaler scalars (torch has no fused {kind})")
        common["AMP"] = amp
    if amp == 2 and found_inf is None:
        raise ValueError("a grad_scale launch reads found_inf too (a zero where nothing was found)")
    scale_ptr = grad_scale if grad_scale is not None else s_base
    inf_ptr = found_inf if found_inf is not None else s_base
    if type(lr) is float or isinstance(lr, int):
        b = {k: f64_bits(v) for k, v in scalars.items()}
    else:  # LR_PTR (False by default: the by-value launch keeps its keywords and plan key)
        b = {k: f64_bits(v) for k, v in scalars.items() if k != "lr"}
        b["lr"] = lr
        common["LR_PTR"] = True
    if kind == "sgd":
        launch_kernel(_sgd_kernel, grid, table, p_base, g_base, s_base, b["lr"], b["weight_decay"], b["momentum"], b["dampening"],
                      b["sign"], scale_ptr, inf_ptr, MOMENTUM=flags["momentum"], NESTEROV=flags["nesterov"],
                      WD=flags["wd"], **common)
    elif kind == "adagrad":
        launch_kernel(_adagrad_kernel, grid, table, p_base, g_base, s_base, step_base, b["lr"], b["lr_decay"], b["weight_decay"],
                      b["eps"], b["sign"], scale_ptr, inf_ptr, WD=flags["wd"], **common)
    elif kind == "adadelta":
        launch_kernel(_adadelta_kernel, grid, table, p_base, g_base, s_base, b["lr"], b["rho"], b["eps"], b["weight_decay"],
                      b["sign"], WD=flags["wd"], **common)
    elif kind == "rmsprop":
        launch_kernel(_rmsprop_kernel, grid, table, p_base, g_base, s_base, b["lr"], b["alpha"], b["eps"], b["weight_decay"],
                      b["momentum"], b["sign"], WD=flags["wd"], CENTERED=flags["centered"],
                      MOMENTUM=flags["momentum"], **common)
    elif kind == "adam":
        launch_kernel(_adam_kernel, grid, table, p_base, g_base, s_base, step_base, b["lr"], b["beta1"], b["beta2"], b["eps"],
                      b["weight_decay"], b["sign"], scale_ptr, inf_ptr, WD_MODE=flags["wd_mode"],
                      AMSGRAD=flags["amsgrad"], **common)
    else:
        raise ValueError(f"unknown optimizer kernel {kind!r}")


def clip_partial(table, n_chunks, g_base, partials, part0, norm_code, p, interpret):
    blk, iters, warps = config(interpret)
    launch_kernel(_clip_partial_kernel, (n_chunks,), table, g_base, partials, part0, f64_bits(p), NORM=norm_code,
                  VP=16 // g_base.element_size(),
                  BLOCK=blk, ITERS=iters, num_warps=warps)


def clip_scale(table, n_chunks, g_base, partials, n_parts, total, max_norm, norm_code, p, interpret, rnd=0):
    """``rnd``: the total's dtype as _clip_scale_kernel rounds it (0 float32, 1 float16, 2 bfloat16)."""
    blk, iters, warps = config(interpret)
    launch_kernel(_clip_scale_kernel, (n_chunks,), table, g_base, partials, n_parts, total, f64_bits(max_norm), f64_bits(p),
                  rnd, NORM=norm_code, VP=16 // g_base.element_size(), BLOCK=blk, ITERS=iters, RBLOCK=CLIP_RBLOCK,
                  num_warps=warps)


def clip_tensor(partials, bounds, rnd, out, n_tensors, norm_code, p):
    """Each gradient's own norm, rounded to its dtype (:func:`_clip_tensor_kernel`)."""
    launch_kernel(_clip_tensor_kernel, (n_tensors,), partials, bounds, rnd, out, f64_bits(p), NORM=norm_code,
                  RBLOCK=CLIP_RBLOCK, num_warps=4)


def clip_total(partials, n_parts, total, norm_code, p):
    launch_kernel(_clip_total_kernel, (1,), partials, n_parts, total, f64_bits(p), NORM=norm_code, RBLOCK=CLIP_RBLOCK, num_warps=4)


# GradScaler's forms of the fused steps (SGD, Adagrad, Adam): 0 none, 1 found_inf alone (the
# gradients unscaled before: scaler.unscale_), 2 found_inf and the scale
AMP_FORMS = (0, 1, 2)


def _amp_tag(amp: int) -> str:
    return {0: "", 1: " amp=found_inf", 2: " amp=scale"}[amp]


def aot_specs():
    """Every configuration the launchers can launch with on a GPU: each kernel x parameter dtype
    x option flags (offsets are always 16-byte aligned: the launch glue copies anything else)."""
    specs = []
    blk, iters, warps = GPU_BLOCK, GPU_ITERS, GPU_WARPS
    base = {"BLOCK": blk, "ITERS": iters}
    # the learning rate by value (int64 bits of a double) or, LR_PTR, read from a float32 tensor
    lr_forms = ((False, "i64", ""), (True, "*fp32", " lr_ptr"))
    amp_sig = {"scale_ptr": "*fp32", "inf_ptr": "*fp32"}  # GradScaler's scalars (the state base with AMP 0)
    for dt in ("fp32", "fp16", "bf16"):
        pg = {"table_ptr": "*i64", "p_base": f"*{dt}", "g_base": f"*{dt}", "s_base": "*fp32"}
        isz = {"fp32": 4, "fp16": 2, "bf16": 2}[dt]
        al = {"VP": 16 // isz, "VS": 4}
        tag = dt
        for lr_ptr, lr_type, lr_tag in lr_forms:
            lr_sig = {"lr_arg": lr_type}
            lr_cx = {**base, **al, "LR_PTR": lr_ptr}
            for mom in (False, True):
                for nest in ((False, True) if mom else (False,)):
                    for wd in (False, True):
                        for amp in AMP_FORMS:
                            sig = {**pg, **lr_sig, **{k: "i64" for k in ("wd_b", "mom_b", "damp_b", "sign_b")}, **amp_sig,
                                   **{k: "constexpr" for k in ("MOMENTUM", "NESTEROV", "WD", "VP", "VS", "BLOCK", "ITERS",
                                                               "LR_PTR", "AMP")}}
                            specs.append(AotSpec(_sgd_kernel, sig, {**lr_cx, "MOMENTUM": mom, "NESTEROV": nest, "WD": wd,
                                                                    "AMP": amp}, num_warps=warps,
                                                 label=f"sgd {tag} mom={mom} nesterov={nest} wd={wd}{lr_tag}"
                                                       f"{_amp_tag(amp)}"))
            for wd in (False, True):
                for amp in AMP_FORMS:
                    sig = {**pg, "step_base": "*fp32", **lr_sig,
                           **{k: "i64" for k in ("lr_decay_b", "wd_b", "eps_b", "sign_b")}, **amp_sig,
                           **{k: "constexpr" for k in ("WD", "VP", "VS", "BLOCK", "ITERS", "LR_PTR", "AMP")}}
                    specs.append(AotSpec(_adagrad_kernel, sig, {**lr_cx, "WD": wd, "AMP": amp}, num_warps=warps,
                                         label=f"adagrad {tag} wd={wd}{lr_tag}{_amp_tag(amp)}"))
                sig = {**pg, **lr_sig, **{k: "i64" for k in ("rho_b", "eps_b", "wd_b", "sign_b")},
                       **{k: "constexpr" for k in ("WD", "VP", "VS", "BLOCK", "ITERS", "LR_PTR")}}
                specs.append(AotSpec(_adadelta_kernel, sig, {**lr_cx, "WD": wd}, num_warps=warps,
                                     label=f"adadelta {tag} wd={wd}{lr_tag}"))
                for cen in (False, True):
                    for mom in (False, True):
                        sig = {**pg, **lr_sig, **{k: "i64" for k in ("alpha_b", "eps_b", "wd_b", "mom_b", "sign_b")},
                               **{k: "constexpr" for k in ("WD", "CENTERED", "MOMENTUM", "VP", "VS", "BLOCK", "ITERS",
                                                           "LR_PTR")}}
                        cx = {**lr_cx, "WD": wd, "CENTERED": cen, "MOMENTUM": mom}
                        specs.append(AotSpec(_rmsprop_kernel, sig, cx, num_warps=warps,
                                             label=f"rmsprop {tag} wd={wd} centered={cen} momentum={mom}{lr_tag}"))
            for wd_mode in (0, 1, 2):
                for ams in (False, True):
                    for amp in AMP_FORMS:
                        sig = {**pg, "step_base": "*fp32", **lr_sig,
                               **{k: "i64" for k in ("beta1_b", "beta2_b", "eps_b", "wd_b", "sign_b")}, **amp_sig,
                               **{k: "constexpr" for k in ("WD_MODE", "AMSGRAD", "VP", "VS", "BLOCK", "ITERS", "LR_PTR",
                                                           "AMP")}}
                        specs.append(AotSpec(_adam_kernel, sig, {**lr_cx, "WD_MODE": wd_mode, "AMSGRAD": ams, "AMP": amp},
                                             num_warps=warps,
                                             label=f"adam {tag} wd_mode={wd_mode} amsgrad={ams}{lr_tag}{_amp_tag(amp)}"))
        for norm in NORM_CODES.values():
            sig = {"table_ptr": "*i64", "g_base": f"*{dt}", "part_ptr": "*fp32", "part0": "i32", "p_b": "i64",
                   **{k: "constexpr" for k in ("NORM", "VP", "BLOCK", "ITERS")}}
            specs.append(AotSpec(_clip_partial_kernel, sig, {**base, "NORM": norm, "VP": al["VP"]},
                                 num_warps=warps, label=f"clip partial {tag} norm={norm}"))
            sig = {"table_ptr": "*i64", "g_base": f"*{dt}", "part_ptr": "*fp32", "n_parts": "i32",
                   "total_ptr": "*fp32", "max_norm_b": "i64", "p_b": "i64", "rnd": "i32",
                   **{k: "constexpr" for k in ("NORM", "VP", "BLOCK", "ITERS", "RBLOCK")}}
            specs.append(AotSpec(_clip_scale_kernel, sig, {**base, "NORM": norm, "VP": al["VP"],
                                                           "RBLOCK": CLIP_RBLOCK}, num_warps=warps,
                                 label=f"clip scale {tag} norm={norm}"))
    for norm in NORM_CODES.values():
        sig = {"part_ptr": "*fp32", "n_parts": "i32", "total_ptr": "*fp32", "p_b": "i64", "NORM": "constexpr",
               "RBLOCK": "constexpr"}
        specs.append(AotSpec(_clip_total_kernel, sig, {"NORM": norm, "RBLOCK": CLIP_RBLOCK}, num_warps=4,
                             label=f"clip total norm={norm}"))
        sig = {"part_ptr": "*fp32", "bounds_ptr": "*i32", "rnd_ptr": "*i32", "out_ptr": "*fp32", "p_b": "i64",
               "NORM": "constexpr", "RBLOCK": "constexpr"}
        specs.append(AotSpec(_clip_tensor_kernel, sig, {"NORM": norm, "RBLOCK": CLIP_RBLOCK}, num_warps=4,
                             label=f"clip tensor norm={norm}"))
    return specs
