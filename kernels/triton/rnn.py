"""Triton kernels for the recurrent family (Elman tanh / relu, LSTM, GRU), forward and backward.

The time loop runs on the host (one launch per step of one layer and both its directions),
except in the persistent kernel:

* ``_rnn_matmul_kernel`` -- ``C (+)= scale * (A @ B + bias1 + bias2)`` with arbitrary strides,
  float32 accumulation: the input projection of all time steps at once (``X W_ih^T + b``), and
  in the backward ``dX = dG W_ih``, ``dW_ih = dG^T X``, ``dW_hh = dG^T H_prev``.
* ``_rnn_step_fwd_kernel`` -- one time step, fused: ``h_{t-1} W_hh^T`` for every gate of the
  program's tile of hidden units, plus the precomputed input projection, the gate
  nonlinearities and the state update, the output write (times the dropout mask when the output
  feeds the next layer) and the variable-length masking. No gate pre-activation goes through
  global memory; the activated gates are stored for the backward (the reserve).
* ``_rnn_step_bwd_kernel`` -- one step backward, fused: ``dh = carry + dG_{next} W_hh + dout``
  (the recurrent term of the step processed before), then the gate gradients of this step and
  the part of dh / dc that bypasses W_hh. With ``FINAL`` it only forms dh0.
  The cells (gpu_nn.ops.rnn) run the step kernels once each, with ``t = -1`` (no lengths) and,
  backward, no carry in and the c' gradient read from its own tensor.
* ``_rnn_step2_fwd_kernel`` / ``_rnn_step2_bwd_kernel`` -- the same step tiles for both
  directions of a bidirectional layer in one launch (grid axis 2 picks the direction, each with
  its own buffers and step index): a layer's time loop is T launches, not 2T, each with twice
  the programs (issue 16: the two directions concurrently, not one after the other).
* ``_rnn_colsum_kernel`` -- bias gradients (column sums of the stored gate gradients).
* ``_rnn_proj_fwd_kernel`` / ``_rnn_proj_bwd_kernel`` -- the LSTM projection (``proj_size``):
  per step, after the step kernel (run with ``PROJ``: recurrent product over the P-wide state,
  ``m = o * tanh(c')`` stored unmasked), ``h' = m W_hr^T`` with the length masking and the output
  write; backward, ``dh`` of the projected state before the step kernel's cell math (which then
  takes ``dm = dh W_hr``, formed by ``_rnn_matmul_kernel``, as its output gradient).
* ``_rnn_persist_fwd_kernel`` -- the small-batch path (B <= 64, H <= 1024): the whole forward
  time loop of one layer and direction in one launch, the step kernel's math per hidden tile,
  a grid-wide barrier (atomic counter) between steps; at most one program per SM.
  ``_rnn_persist2_fwd_kernel`` does both directions of a bidirectional layer in one such launch
  (the hidden tiles of both dealt to the programs, one barrier per step for both).
* ``_rnn_persist_bwd_kernel`` -- the backward time loop of one layer and direction in one launch:
  per step the step backward's tile for each of the program's tiles, then the barrier; the
  previous step's gate gradients, written by every program, read through L2 (``.cg``); with
  resident weights (one tile per program, as the forward's) each program instead multiplies its
  own gate gradients by its own W_hh rows and the programs exchange those shares of dh_{t-1}
  (``_resident_bwd_tile``).
  ``_rnn_persist2_bwd_kernel``: both directions of a bidirectional layer in one such launch.
  The persistent kernels deal (batch, hidden) tiles of 16 x 16 to the programs, B <= 64.

Variable lengths (``len [B]``; full lengths when none were given): a step beyond a sequence's
length keeps its state, writes a zero output and zero gate gradients. A step tile whose batch
rows have all ended (a packed batch's padding: the nn modules run a packed batch in its sorted
order, longest first, so the short sequences end in the last batch tiles) skips the recurrent
product, forward and backward, so a packed batch's per-step work follows the sequences still
running, not the longest one. The persistent forward keeps the full product in every batch
tile: its stored gates equal the reference's entry for entry, finished rows included (its tests
compare the whole reserve); the persistent backward skips as the step backward does (its
resident form: the share product and its exchange, see ``_resident_bwd_tile``).

Layouts: everything row-major with explicit row strides; states and gates in float32 (the
reserve); weights and the user's input / output in float32, float16 or bfloat16. Gate order
i, f, g, o (LSTM) and r, z, n (GRU), torch's. ``MODE``: 0 tanh, 1 relu, 2 LSTM, 3 GRU.
Dots (``DOT_DT``, chosen per call by gpu_nn.ops.rnn): float32 operands exact (``input_precision=
"ieee"``, FMA) or TF32 (tensor cores) as ``torch.backends.cudnn.allow_tf32`` says for float32
layers; half-precision dots cast the float32 operand to the weights' dtype; all accumulate in
float32.
Not supported: projections in the persistent kernel (the ops never choose it for them).
"""

import inspect

import torch
import triton
import triton.language as tl

from .. import env_switch
from . import INTERPRET as _INTERPRET, POISON as _POISON
from ._aot import AotSpec
from .activation import _grouped_tile, _tanh_quot as _tanh
from .dense import colsum_ranges
from . import _launch
from ._launch import cdiv, next_power_of_2
from ._launch import launch as launch_kernel

MODE_CODES = {"rnn_tanh": 0, "rnn_relu": 1, "lstm": 2, "gru": 3}
NGATES = {0: 1, 1: 1, 2: 4, 3: 3}
DOT_CODES = {"fp32": 0, "fp16": 1, "bf16": 2, "tf32": 3}


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _dot_operand(x, DOT_DT: tl.constexpr):
    """``x`` in the operand type of dot code ``DOT_DT`` (see :func:`_dot`)."""
    if DOT_DT == 1:
        y = x.to(tl.float16)
    elif DOT_DT == 2:
        y = x.to(tl.bfloat16)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _dot(a, b, acc, DOT_DT: tl.constexpr):
    """acc + a @ b, float32 accumulation. DOT_DT 0: float32 operands, exact IEEE products (FMA,
    no tensor cores); 3: float32 operands as TF32 (tensor cores, 10-bit mantissa); 1 / 2: both
    operands cast to float16 / bfloat16 (tensor cores)."""
    if DOT_DT == 3:
        acc += tl.dot(_dot_operand(a, DOT_DT), _dot_operand(b, DOT_DT), input_precision="tf32")
    else:
        acc += tl.dot(_dot_operand(a, DOT_DT), _dot_operand(b, DOT_DT), input_precision="ieee")
    return acc


@triton.jit
def _rnn_matmul_kernel(a_ptr, b_ptr, c_ptr, bias1_ptr, bias2_ptr, scale_ptr, M, N, K,
                       stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_sm, stride_sn,
                       has_bias1, has_bias2, has_scale, accumulate, DOT_DT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = (accumulate ? C : 0) + scale[M, N] * (A[M, K] @ B[K, N] + bias1[N] + bias2[N]).

    One program per [BLOCK_M, BLOCK_N] tile of C, ordered in groups of GROUP_M row tiles so that
    neighbouring programs share B tiles in L2; the K loop is software-pipelined (the launch's
    num_stages) and its dots run on tensor cores unless DOT_DT is 0. The epilogue options are
    runtime ints, not constexprs (a uniform branch per tile, once; Triton's JIT compiles a
    flag's value 1 apart, folded, and that stays: unspecialised flags took the 128x128 float32
    tile's launched form from 16 to 56 B of spills, sm_90, Triton 3.6); the bias / scale
    pointers have the type of B (the caller passes B where one is absent; never read then).
    """
    _matmul_tile(tl.program_id(0), a_ptr, b_ptr, c_ptr, bias1_ptr, bias2_ptr, scale_ptr, M, N, K, stride_am, stride_ak,
                 stride_bk, stride_bn, stride_cm, stride_cn, stride_sm, stride_sn, has_bias1, has_bias2, has_scale,
                 accumulate, DOT_DT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _rnn_matmul2_kernel(a_ptr, a1_ptr, b_ptr, b1_ptr, c_ptr, c1_ptr, bias1_ptr, bias11_ptr, bias2_ptr, bias21_ptr,
                        scale_ptr, scale1_ptr, M, N, K,
                        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_sm, stride_sn,
                        has_bias1, has_bias2, has_scale, accumulate, DOT_DT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Two products of one shape in one launch, the two directions of a bidirectional layer
    (their input projections, dW_ih, dW_hh): grid axis 1 picks the operands (0: the ``*_ptr``
    ones, 1: the ``*1_ptr`` ones), each program then runs ``_rnn_matmul_kernel``'s tile. Shared:
    sizes, strides and epilogue flags. The two outputs must not overlap."""
    two = tl.program_id(1) == 1
    _matmul_tile(tl.program_id(0), tl.where(two, a1_ptr, a_ptr), tl.where(two, b1_ptr, b_ptr),
                 tl.where(two, c1_ptr, c_ptr), tl.where(two, bias11_ptr, bias1_ptr), tl.where(two, bias21_ptr, bias2_ptr),
                 tl.where(two, scale1_ptr, scale_ptr), M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                 stride_cn, stride_sm, stride_sn, has_bias1, has_bias2, has_scale, accumulate, DOT_DT, BLOCK_M,
                 BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _matmul_tile(pid, a_ptr, b_ptr, c_ptr, bias1_ptr, bias2_ptr, scale_ptr, M, N, K,
                 stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_sm, stride_sn,
                 has_bias1, has_bias2, has_scale, accumulate, DOT_DT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The body of ``_rnn_matmul_kernel`` for program ``pid``."""
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mm = rm < M
    mn = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mk = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=mk[:, None] & mn[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_DT)
    if has_bias1:
        acc += tl.load(bias1_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    if has_bias2:
        acc += tl.load(bias2_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    m2 = mm[:, None] & mn[None, :]
    if has_scale:
        acc *= tl.load(scale_ptr + rm[:, None] * stride_sm + rn[None, :] * stride_sn, mask=m2, other=0.0).to(tl.float32)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if accumulate:
        acc += tl.load(c_ptrs, mask=m2, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _rnn_colsum_kernel(x_ptr, x2_ptr, y_ptr, y2_ptr, M, N, stride_xm, stride_x2m, CHUNK, Y2: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[s, :] = sum over the rows of x[M, N] in split s = program_id(1), [s * CHUNK,
    min(M, (s + 1) * CHUNK)) (float32 accumulation; ``y`` [splits, N] contiguous: one split is the
    bias gradient, several are float32 partial sums that a second launch adds up). ``Y2``: 0
    nothing more; 1 the same sums into y2 too (the two bias gradients of the Elman / LSTM layers,
    whose gate gradients are one); 2 y2 = the column sums of x2 [M, N] (the GRU's two gate
    gradients), in the same pass."""
    split = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    m_lo = split.to(tl.int64) * CHUNK  # int64: the last split's end passes 2^31 - 1 for M just below it
    m_hi = tl.minimum(m_lo + CHUNK, M)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rm < m_hi)[:, None] & mn[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rn[None, :], mask=mask, other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
        if Y2 == 2:
            x2 = tl.load(x2_ptr + rm[:, None] * stride_x2m + rn[None, :], mask=mask, other=0.0)
            acc2 += tl.sum(x2.to(tl.float32), axis=0)
    out = split.to(tl.int64) * N + rn
    tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mn)
    if Y2 == 1:
        tl.store(y2_ptr + out, acc.to(y2_ptr.dtype.element_ty), mask=mn)
    if Y2 == 2:
        tl.store(y2_ptr + out, acc2.to(y2_ptr.dtype.element_ty), mask=mn)


@triton.jit
def _recurrent_dot(h_ptr, rb, mb, w_ptr, stride_w0, stride_w1, rh, mh, H, P, K_END, CACHE: tl.constexpr,
                   MODE: tl.constexpr, DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """h_{t-1} W_hh^T for one [BLOCK_B, BLOCK_H] tile of hidden units, per gate (unused gates
    stay zero): ``h_ptr`` float32 rows of P (the state width: H, or the LSTM's projection size;
    read with cache modifier ``CACHE``: ".cg" where
    other programs of the same launch wrote them), W_hh rows g * H + j read transposed as
    [BLOCK_K, BLOCK_H] tiles. The product runs over the first ``K_END`` state columns: P, or 0
    where no row of the tile needs it (the accumulators stay zero, W_hh is not read). Returns the
    four float32 accumulators."""
    acc0 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, K_END, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < P
        hprev = tl.load(h_ptr + rb[:, None] * P + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                        cache_modifier=CACHE)
        wm = mk[:, None] & mh[None, :]
        w0 = tl.load(w_ptr + rh[None, :] * stride_w0 + rk[:, None] * stride_w1, mask=wm, other=0.0)
        acc0 = _dot(hprev, w0, acc0, DOT_DT)
        if MODE >= 2:
            w1 = tl.load(w_ptr + (H + rh)[None, :] * stride_w0 + rk[:, None] * stride_w1, mask=wm, other=0.0)
            acc1 = _dot(hprev, w1, acc1, DOT_DT)
            w2 = tl.load(w_ptr + (2 * H + rh)[None, :] * stride_w0 + rk[:, None] * stride_w1, mask=wm, other=0.0)
            acc2 = _dot(hprev, w2, acc2, DOT_DT)
        if MODE == 2:
            w3 = tl.load(w_ptr + (3 * H + rh)[None, :] * stride_w0 + rk[:, None] * stride_w1, mask=wm, other=0.0)
            acc3 = _dot(hprev, w3, acc3, DOT_DT)
    return acc0, acc1, acc2, acc3


@triton.jit
def _resident_w(w_ptr, stride_w0, stride_w1, jh, H, MODE: tl.constexpr, DOT_DT: tl.constexpr, KP: tl.constexpr,
                BLOCK_H: tl.constexpr, TRANS: tl.constexpr = False):
    """The W_hh rows of hidden tile ``jh``, every gate's, as one [4 * BLOCK_H, KP] operand in the
    dot code's type: row g * BLOCK_H + i is W_hh row g * H + jh * BLOCK_H + i (zero past H, past
    the mode's gates, and in columns past H: KP >= H). Loaded once by a persistent program that
    keeps it for every step (:func:`_resident_dot`). The gates stacked on one axis make a
    64-row operand for BLOCK_H = 16, the rows of one warpgroup MMA (wgmma on sm_90), which reads
    it from shared memory; one [KP, BLOCK_H] operand per gate would be the B operand of a
    16-row dot, which Triton holds in registers across the loop (spilling from KP = 512).

    ``TRANS``: the same operand transposed, [KP, 4 * BLOCK_H] (the resident backward's), loaded
    so rather than through ``tl.trans``: Triton 3.6 and 3.9 store a transposed 32-bit wgmma
    operand to shared memory physically transposed, and past 256 rows (KP 512) the store puts
    rows 256 and up where the wgmma descriptors do not read them (the H200's wrong float32
    gradients at KP 512: benchmarks/results/aot/rnn_resident_bwd_trans_a331102.md)."""
    r = tl.arange(0, 4 * BLOCK_H)
    g = r // BLOCK_H
    rh = jh * BLOCK_H + r % BLOCK_H
    rk = tl.arange(0, KP)
    if MODE == 2:
        live = g < 4
    elif MODE == 3:
        live = g < 3
    else:
        live = g < 1
    if TRANS:
        wm = (rk < H)[:, None] & (live & (rh < H))[None, :]
        w = tl.load(w_ptr + (g * H + rh)[None, :] * stride_w0 + rk[:, None] * stride_w1, mask=wm, other=0.0)
    else:
        wm = (live & (rh < H))[:, None] & (rk < H)[None, :]
        w = tl.load(w_ptr + (g * H + rh)[:, None] * stride_w0 + rk[None, :] * stride_w1, mask=wm, other=0.0)
    return _dot_operand(w, DOT_DT)


@triton.jit
def _resident_dot(h_ptr, rb, mb, w, H, DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                  KP: tl.constexpr):
    """:func:`_recurrent_dot` over the whole state at once against the resident operand ``w`` of
    :func:`_resident_w`: h_{t-1} (float32 rows of H, read ``.cg``: other programs wrote them) as
    one [KP, BLOCK_B] load, one dot for all gates (gates x units on the MMA's rows, the batch
    rows on its columns), no K loop and no W_hh load. Returns the four gates' [BLOCK_B, BLOCK_H]
    float32 products, as :func:`_recurrent_dot` (a gate the mode lacks is zero)."""
    rk = tl.arange(0, KP)
    h_t = tl.load(h_ptr + rb[None, :] * H + rk[:, None], mask=(rk < H)[:, None] & mb[None, :], other=0.0,
                  cache_modifier=".cg")
    acc = _dot(w, h_t, tl.zeros((4 * BLOCK_H, BLOCK_B), dtype=tl.float32), DOT_DT)
    # [gate (2 x 2), unit, row] -> [row, unit, gate]: split the gates off the last axis
    acc = tl.permute(tl.reshape(acc, (2, 2, BLOCK_H, BLOCK_B)), (3, 2, 0, 1))
    even, odd = tl.split(acc)  # gates (0, 2) and (1, 3)
    acc0, acc2 = tl.split(even)
    acc1, acc3 = tl.split(odd)
    return acc0, acc1, acc2, acc3


@triton.jit
def _cell_update(xg, hp, cp, acc0, acc1, acc2, acc3, bhh_ptr, rh, mh, m2, H, MODE: tl.constexpr,
                 HAS_BHH: tl.constexpr):
    """One step's cell math on a [BLOCK_B, BLOCK_H] tile, shared by the step and persistent
    kernels: ``xg`` points at the tile's input projections (gate g at ``xg + g * H``), ``acc*``
    hold h_{t-1} W_hh^T per gate, ``cp`` the previous cell state (LSTM; ignored otherwise).
    Overwrites the projections with the activated gates (GRU: r, z, n and the raw
    W_hn h + b_hn, which the backward needs) and returns (h_t, c_t) before length masking."""
    c_new = cp
    if MODE == 0:
        h_new = _tanh(tl.load(xg, mask=m2, other=0.0) + acc0)
    elif MODE == 1:
        # relu as torch's clamp_min: NaN and -0.0 kept (tl.maximum would drop NaN on the GPU)
        pre = tl.load(xg, mask=m2, other=0.0) + acc0
        h_new = tl.where(pre < 0, 0.0, pre)
    elif MODE == 2:
        gi = _sigmoid(tl.load(xg, mask=m2, other=0.0) + acc0)
        gf = _sigmoid(tl.load(xg + H, mask=m2, other=0.0) + acc1)
        gg = _tanh(tl.load(xg + 2 * H, mask=m2, other=0.0) + acc2)
        go = _sigmoid(tl.load(xg + 3 * H, mask=m2, other=0.0) + acc3)
        c_new = gf * cp + gi * gg
        h_new = go * _tanh(c_new)
        tl.store(xg, gi, mask=m2)
        tl.store(xg + H, gf, mask=m2)
        tl.store(xg + 2 * H, gg, mask=m2)
        tl.store(xg + 3 * H, go, mask=m2)
    else:
        if HAS_BHH:
            acc0 += tl.load(bhh_ptr + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
            acc1 += tl.load(bhh_ptr + H + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
            acc2 += tl.load(bhh_ptr + 2 * H + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
        r = _sigmoid(tl.load(xg, mask=m2, other=0.0) + acc0)
        z = _sigmoid(tl.load(xg + H, mask=m2, other=0.0) + acc1)
        n = _tanh(tl.load(xg + 2 * H, mask=m2, other=0.0) + r * acc2)
        h_new = n + z * (hp - n)
        tl.store(xg, r, mask=m2)
        tl.store(xg + H, z, mask=m2)
        tl.store(xg + 2 * H, n, mask=m2)
        tl.store(xg + 3 * H, acc2, mask=m2)
    return h_new, c_new


@triton.jit
def _tile_index(jb, jh, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The indices of the [BLOCK_B, BLOCK_H] tile (batch tile ``jb``, hidden tile ``jh``) of a
    row-major [B, H] state: rows ``rb`` (int64) and units ``rh``, their masks ``mb`` / ``mh``,
    the 2-D mask ``m2`` and the element offsets ``st`` (row stride H)."""
    rb = (jb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rh = jh * BLOCK_H + tl.arange(0, BLOCK_H)
    mb = rb < B
    mh = rh < H
    return rb, rh, mb, mh, mb[:, None] & mh[None, :], rb[:, None] * H + rh[None, :]


@triton.jit
def _valid_rows(len_ptr, rb, mb, t):
    """Which batch rows ``rb`` run step ``t``: ``t < len[b]``; every row when ``t < 0`` (a cell:
    no lengths, ``len`` not read, any pointer will do). A uniform branch, not a load mask: the
    interpreter refuses a mask combined from a tensor and a scalar."""
    valid = rb >= 0
    if t >= 0:
        valid = t < tl.load(len_ptr + rb, mask=mb, other=0)
    return valid


@triton.jit(do_not_specialize=["t"])
def _rnn_step_fwd_kernel(xg_ptr, stride_xg, hp_ptr, hn_ptr, cp_ptr, cn_ptr, w_ptr, stride_w0, stride_w1, bhh_ptr,
                         out_ptr, stride_out, mask_ptr, stride_mask, has_mask, len_ptr, t, B, H, P,
                         MODE: tl.constexpr, HAS_BHH: tl.constexpr, PROJ: tl.constexpr,
                         DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step of one layer and direction for a [BLOCK_B, BLOCK_H] tile of (batch, hidden unit).

    ``xg [B, *]`` holds the input projection of this step for every gate (biases folded in,
    except the GRU's b_hh); LSTM / GRU overwrite it with the activated gates (GRU: r, z, n and
    h W_hn^T + b_hn). ``hp / cp`` the previous state, ``hn / cn`` the new one (float32 [B, H]).
    ``out`` gets h' (zero where ``t >= len[b]``), times ``mask`` when ``has_mask`` (a runtime
    int, a uniform branch per tile; Triton's JIT compiles has_mask = 1 apart, the branch folded).
    ``t < 0`` (the cells): no lengths, every row valid, ``len`` not read (any pointer will do).
    Element-wise in place is safe: ``xg`` may be ``hn`` and ``out`` (the Elman cell in float32),
    each element is read before it is written, by the same tile.

    PROJ (LSTM with a projection): ``hp [B, P]`` is the projected state, ``hn [B, H]`` gets
    ``m = o * tanh(c')`` with no length masking (the projection kernel masks h), ``out`` is not
    written; ``cn`` is masked as usual.
    """
    _step_fwd_tile(tl.program_id(0), tl.program_id(1), xg_ptr, stride_xg, hp_ptr, hn_ptr, cp_ptr, cn_ptr, w_ptr,
                   stride_w0, stride_w1, bhh_ptr, out_ptr, stride_out, mask_ptr, stride_mask, has_mask, len_ptr, t, B,
                   H, P, MODE, HAS_BHH, PROJ, DOT_DT, BLOCK_B, BLOCK_H, BLOCK_K)


@triton.jit(do_not_specialize=["t", "t1"])
def _rnn_step2_fwd_kernel(xg_ptr, xg1_ptr, stride_xg, hp_ptr, hp1_ptr, hn_ptr, hn1_ptr, cp_ptr, cp1_ptr, cn_ptr,
                          cn1_ptr, w_ptr, w1_ptr, stride_w0, stride_w1, bhh_ptr, bhh1_ptr, out_ptr, out1_ptr,
                          stride_out, mask_ptr, mask1_ptr, stride_mask, has_mask, len_ptr, t, t1, B, H,
                          MODE: tl.constexpr, HAS_BHH: tl.constexpr,
                          DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step of both directions of a bidirectional layer in one launch: grid axis 2 picks the
    direction, 0 the forward one (step ``t``, the ``*_ptr`` buffers), 1 the reverse one (step
    ``t1``, the ``*1_ptr`` buffers); each program then runs ``_rnn_step_fwd_kernel``'s tile, no
    projection. Shared by the two directions: the strides, the mask flag, the lengths and the
    sizes. The two directions are independent within a step, so the launch is twice the programs
    of one direction at the same latency, and half the launches of a layer. ``t`` and ``t1`` are
    not specialised (a step index of 1 or a multiple of 16 would compile another kernel)."""
    rev = tl.program_id(2) == 1
    _step_fwd_tile(tl.program_id(0), tl.program_id(1), tl.where(rev, xg1_ptr, xg_ptr), stride_xg,
                   tl.where(rev, hp1_ptr, hp_ptr), tl.where(rev, hn1_ptr, hn_ptr), tl.where(rev, cp1_ptr, cp_ptr),
                   tl.where(rev, cn1_ptr, cn_ptr), tl.where(rev, w1_ptr, w_ptr), stride_w0, stride_w1,
                   tl.where(rev, bhh1_ptr, bhh_ptr), tl.where(rev, out1_ptr, out_ptr), stride_out,
                   tl.where(rev, mask1_ptr, mask_ptr), stride_mask, has_mask, len_ptr, tl.where(rev, t1, t), B, H, H,
                   MODE, HAS_BHH, False, DOT_DT, BLOCK_B, BLOCK_H, BLOCK_K)


@triton.jit
def _step_fwd_tile(pid_b, pid_h, xg_ptr, stride_xg, hp_ptr, hn_ptr, cp_ptr, cn_ptr, w_ptr, stride_w0, stride_w1, bhh_ptr,
                   out_ptr, stride_out, mask_ptr, stride_mask, has_mask, len_ptr, t, B, H, P,
                   MODE: tl.constexpr, HAS_BHH: tl.constexpr, PROJ: tl.constexpr,
                   DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """The body of ``_rnn_step_fwd_kernel`` for the tile (``pid_b``, ``pid_h``)."""
    rb, rh, mb, mh, m2, st = _tile_index(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    # steps beyond a sequence's length keep its state and output zero (PackedSequence semantics);
    # a tile whose sequences have all ended (a packed batch's padding: in the sorted order a
    # packed batch runs in, the last tiles as the short sequences end) skips the recurrent product
    valid = _valid_rows(len_ptr, rb, mb, t)
    k_end = P * tl.max(valid.to(tl.int32), axis=0)
    acc0, acc1, acc2, acc3 = _recurrent_dot(hp_ptr, rb, mb, w_ptr, stride_w0, stride_w1, rh, mh, H, P, k_end, "",
                                            MODE, DOT_DT, BLOCK_B, BLOCK_H, BLOCK_K)
    xg = xg_ptr + rb[:, None] * stride_xg + rh[None, :]
    if PROJ:
        # h is P wide here and only the GRU's update reads it: the cell state stands in
        cp = tl.load(cp_ptr + st, mask=m2, other=0.0)
        hp = cp
    else:
        hp = tl.load(hp_ptr + st, mask=m2, other=0.0)
        cp = hp  # placeholder for the non-LSTM modes
        if MODE == 2:
            cp = tl.load(cp_ptr + st, mask=m2, other=0.0)
    h_new, c_new = _cell_update(xg, hp, cp, acc0, acc1, acc2, acc3, bhh_ptr, rh, mh, m2, H, MODE, HAS_BHH)
    valid = valid[:, None]
    c_new = tl.where(valid, c_new, cp)
    if MODE == 2:
        tl.store(cn_ptr + st, c_new, mask=m2)
    if PROJ:
        tl.store(hn_ptr + st, h_new, mask=m2)
    else:
        out = tl.where(valid, h_new, 0.0)
        h_new = tl.where(valid, h_new, hp)
        tl.store(hn_ptr + st, h_new, mask=m2)
        if has_mask:
            out = out * tl.load(mask_ptr + rb[:, None] * stride_mask + rh[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(out_ptr + rb[:, None] * stride_out + rh[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["t"])
def _rnn_proj_fwd_kernel(m_ptr, w_ptr, stride_w0, stride_w1, hp_ptr, hn_ptr, out_ptr, stride_out, mask_ptr, stride_mask,
                         has_mask, len_ptr, t, B, H, P, DOT_DT: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The LSTM projection of one step, for a [BLOCK_B, BLOCK_P] tile: ``h' = m W_hr^T`` with
    ``m [B, H]`` (float32, contiguous: o * tanh(c') from the step kernel) and ``W_hr [P, H]``;
    rows with ``t >= len[b]`` keep ``hp`` instead. ``hp / hn [B, P]`` float32 contiguous;
    ``out`` gets h' (zero where invalid), times ``mask`` when ``has_mask`` (runtime flag)."""
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    rb = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mb = rb < B
    mp = rp < P
    m2 = mb[:, None] & mp[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < H
        m = tl.load(m_ptr + rb[:, None] * H + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + rp[None, :] * stride_w0 + rk[:, None] * stride_w1, mask=mk[:, None] & mp[None, :], other=0.0)
        acc = _dot(m, w, acc, DOT_DT)
    st = rb[:, None] * P + rp[None, :]
    valid = (t < tl.load(len_ptr + rb, mask=mb, other=0))[:, None]
    hp = tl.load(hp_ptr + st, mask=m2, other=0.0)
    tl.store(hn_ptr + st, tl.where(valid, acc, hp), mask=m2)
    out = tl.where(valid, acc, 0.0)
    if has_mask:
        out = out * tl.load(mask_ptr + rb[:, None] * stride_mask + rp[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + rb[:, None] * stride_out + rp[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _carried_dh(dgn_ptr, stride_dgn, w_ptr, stride_w0, stride_w1, carry_ptr, has_carry, st, rb, mb, rn, mn, m2, GH,
                K_END, HAS_NEXT: tl.constexpr, DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, CACHE: tl.constexpr):
    """The state gradient a backward step starts from, for rows ``rb`` and state columns ``rn``:
    the carry at ``st`` (zero, not read, when ``has_carry`` is 0) plus, with HAS_NEXT,
    ``dG_next W_hh`` over the GH gate columns of the step processed just before (``dgn [B, GH]``,
    ``W_hh [GH, N]``), float32; the product over the first ``K_END`` of them (GH, or 0 where the
    tile's rows of ``dgn`` are all zero: nothing to add, W_hh not read). ``dgn`` is read with
    cache modifier ``CACHE`` (".cg" where other programs of the same launch wrote it)."""
    dh = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if has_carry != 0:  # a uniform branch (the interpreter refuses a tensor & scalar load mask)
        dh = tl.load(carry_ptr + st, mask=m2, other=0.0)
    if HAS_NEXT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_END, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mk = rk < GH
            dg = tl.load(dgn_ptr + rb[:, None] * stride_dgn + rk[None, :], mask=mb[:, None] & mk[None, :], other=0.0,
                         cache_modifier=CACHE)
            w = tl.load(w_ptr + rk[:, None] * stride_w0 + rn[None, :] * stride_w1, mask=mk[:, None] & mn[None, :], other=0.0)
            acc = _dot(dg, w, acc, DOT_DT)
        dh += acc
    return dh


@triton.jit(do_not_specialize=["t"])
def _rnn_proj_bwd_kernel(dgn_ptr, stride_dgn, w_ptr, stride_w0, stride_w1, carry_ptr, dout_ptr, stride_dout, dh_ptr,
                         len_ptr, t, B, P, GH, HAS_NEXT: tl.constexpr, FINAL: tl.constexpr, DOT_DT: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """The gradient of one step's projected state (LSTM with a projection), [BLOCK_B, BLOCK_P]
    tile: ``dh = carry + dG_next W_hh`` (HAS_NEXT; ``dgn [B, GH]``, ``W_hh [GH, P]``) ``+ dout``
    (where valid). FINAL: store dh to ``dh [B, P]`` (dh0) and stop. Otherwise ``dh [B, P]`` gets
    dh where valid and 0 elsewhere (the caller forms dm = dh W_hr and dW_hr from it) and the
    carry keeps dh only where invalid (those rows pass it on unchanged)."""
    pid_b = tl.program_id(0)
    pid_p = tl.program_id(1)
    rb = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mb = rb < B
    mp = rp < P
    m2 = mb[:, None] & mp[None, :]
    st = rb[:, None] * P + rp[None, :]
    dh = _carried_dh(dgn_ptr, stride_dgn, w_ptr, stride_w0, stride_w1, carry_ptr, 1, st, rb, mb, rp, mp, m2, GH, GH,
                     HAS_NEXT, DOT_DT, BLOCK_B, BLOCK_P, BLOCK_K, "")
    if FINAL:
        tl.store(dh_ptr + st, dh, mask=m2)
    else:
        valid = (t < tl.load(len_ptr + rb, mask=mb, other=0))[:, None] & m2
        dout = tl.load(dout_ptr + rb[:, None] * stride_dout + rp[None, :], mask=m2, other=0.0).to(tl.float32)
        dh += tl.where(valid, dout, 0.0)
        tl.store(dh_ptr + st, tl.where(valid, dh, 0.0), mask=m2)
        tl.store(carry_ptr + st, tl.where(valid, 0.0, dh), mask=m2)


@triton.jit
def _rnn_persist_fwd_kernel(xg_ptr, stride_xgt, stride_xgb, hs_ptr, cs_ptr, stride_hs, w_ptr, stride_w0, stride_w1, bhh_ptr,
                            out_ptr, stride_ot, stride_ob, mask_ptr, stride_mt, stride_mb, has_mask, len_ptr, count_ptr,
                            reverse, T, B, H,
                            MODE: tl.constexpr, HAS_BHH: tl.constexpr, DOT_DT: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                            KP: tl.constexpr = 0):
    """The whole time loop of one layer and direction in one launch (persistent, small batch).

    Shapes: ``xg [T, B, *]`` (strides ``stride_xgt``, ``stride_xgb``, unit last stride) the input
    projections, overwritten with the activated gates as the step kernel does; ``hs / cs
    [T + 1, B, H]`` float32, slot stride ``stride_hs`` (the reserve's state slots: slot 0 holds the initial state
    forward, slot T when ``reverse``); ``out [T, B, H]`` (unit last stride), ``mask`` likewise;
    ``count`` one int32, zero at launch.

    The (batch, hidden) tiles, ``cdiv(B, BLOCK_B) * cdiv(H, BLOCK_H)`` of them numbered batch
    tile major, are dealt to the programs: program ``pid`` of ``P`` owns tiles ``pid, pid + P,
    ...`` (BLOCK_B rows x BLOCK_H units across all gates each). Per step it computes
    ``h_{t-1} W_hh^T`` for its tiles and the same gate math, stores and masking as
    ``_rnn_step_fwd_kernel``, then waits at a grid-wide barrier: CTA barrier, one acq_rel
    gpu-scope increment of ``count``, spin on acquire reads until ``count == (s + 1) * P``.
    This is only safe when every program is resident at once: the
    launcher caps ``P`` at the SM count (one program per SM). h_{t-1} is read with ``.cg``
    (L2, never a stale L1 line) because other programs wrote it. W_hh is re-read every step;
    for H <= 1024 it (at most 16 MiB in float32 for the LSTM) stays resident in L2 across steps,
    so the re-reads do not go to HBM. Not supported: more than 2^31 / P steps (the counter is
    int32); the launcher takes B <= PERSIST_MAX_B.

    ``KP > 0`` (resident weights, :func:`resident_kp`): one tile per program (the launcher
    launches exactly as many programs as tiles), whose W_hh rows, every gate's, are loaded once,
    before the time loop, as one [4 * BLOCK_H, KP] operand (KP >= H) that stays in shared memory
    for every step (:func:`_resident_w`); a step then reads only h_{t-1}, in one load, and makes
    one dot for all gates (:func:`_resident_dot`).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nh = tl.cdiv(H, BLOCK_H)
    wr = w_ptr
    if KP > 0:  # one tile per program (nprog == tiles): tile pid's W_hh rows, kept for every step
        wr = _resident_w(w_ptr, stride_w0, stride_w1, pid % nh, H, MODE, DOT_DT, KP, BLOCK_H)
    for s in range(0, T):
        for j in range(pid, tl.cdiv(B, BLOCK_B) * nh, nprog):
            _persist_tile(j // nh, j % nh, s, reverse, xg_ptr, stride_xgt, stride_xgb, hs_ptr, cs_ptr, stride_hs, w_ptr,
                          stride_w0, stride_w1, bhh_ptr, out_ptr, stride_ot, stride_ob, mask_ptr, stride_mt, stride_mb,
                          has_mask, len_ptr, B, T, H, MODE, HAS_BHH, DOT_DT, BLOCK_B, BLOCK_H, BLOCK_K, wr, KP)
        _grid_barrier(count_ptr, (s + 1) * nprog)


@triton.jit
def _rnn_persist2_fwd_kernel(xg_ptr, xg1_ptr, stride_xgt, stride_xgb, hs_ptr, hs1_ptr, cs_ptr, cs1_ptr, stride_hs, w_ptr,
                             w1_ptr, stride_w0, stride_w1, bhh_ptr, bhh1_ptr, out_ptr, out1_ptr, stride_ot, stride_ob,
                             mask_ptr, mask1_ptr, stride_mt, stride_mb, has_mask, len_ptr, count_ptr, T, B, H,
                             MODE: tl.constexpr, HAS_BHH: tl.constexpr, DOT_DT: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                             KP: tl.constexpr = 0):
    """Both directions of a bidirectional layer in one persistent launch: the hidden tiles of the
    forward direction (the ``*_ptr`` buffers) and of the reverse one (``*1_ptr``) are
    twice ``_rnn_persist_fwd_kernel``'s tiles, dealt to the programs as it deals one
    direction's; per step every program runs its tiles of both directions (step ``s`` forward,
    ``T - 1 - s`` reverse), then the same grid barrier. Shared: strides, mask flag, lengths,
    sizes. Half the barriers and launches of two one-direction launches, twice the programs.
    ``KP > 0``: resident weights, one tile per program, as ``_rnn_persist_fwd_kernel``'s."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nh = tl.cdiv(H, BLOCK_H)
    nt = tl.cdiv(B, BLOCK_B) * nh
    wr = w_ptr
    if KP > 0:  # one tile per program (nprog == 2 * nt): tile pid's W_hh rows, kept for every step
        rev, _, _, jh = _pair_tile(pid, nt, nh)
        wr = _resident_w(tl.where(rev, w1_ptr, w_ptr), stride_w0, stride_w1, jh, H, MODE, DOT_DT, KP, BLOCK_H)
    for s in range(0, T):
        for j in range(pid, 2 * nt, nprog):
            rev, r, jb, jh = _pair_tile(j, nt, nh)
            _persist_tile(jb, jh, s, r, tl.where(rev, xg1_ptr, xg_ptr), stride_xgt, stride_xgb,
                          tl.where(rev, hs1_ptr, hs_ptr), tl.where(rev, cs1_ptr, cs_ptr), stride_hs,
                          tl.where(rev, w1_ptr, w_ptr), stride_w0, stride_w1, tl.where(rev, bhh1_ptr, bhh_ptr),
                          tl.where(rev, out1_ptr, out_ptr), stride_ot, stride_ob, tl.where(rev, mask1_ptr, mask_ptr),
                          stride_mt, stride_mb, has_mask, len_ptr, B, T, H, MODE, HAS_BHH, DOT_DT, BLOCK_B,
                          BLOCK_H, BLOCK_K, wr, KP)
        _grid_barrier(count_ptr, (s + 1) * nprog)


@triton.jit
def _pair_tile(j, nt, nh):
    """Tile ``j`` of a two-direction persistent launch (``nt`` tiles a direction, ``nh`` hidden
    tiles a batch tile): (reverse direction?, the same as int32, batch tile, hidden tile)."""
    rev = j >= nt
    r = rev.to(tl.int32)
    jj = j - r * nt
    return rev, r, jj // nh, jj % nh


@triton.jit
def _grid_barrier(count_ptr, target):
    """Grid-wide barrier: every thread's h_t stores precede the CTA barrier, the release
    increment publishes them at gpu scope, the acquire reads make the others' visible here."""
    tl.debug_barrier()
    cnt = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while cnt < target:
        cnt = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _persist_tile(jb, j, s, reverse, xg_ptr, stride_xgt, stride_xgb, hs_ptr, cs_ptr, stride_hs, w_ptr, stride_w0,
                  stride_w1, bhh_ptr, out_ptr, stride_ot, stride_ob, mask_ptr, stride_mt, stride_mb, has_mask, len_ptr,
                  B, T, H, MODE: tl.constexpr, HAS_BHH: tl.constexpr, DOT_DT: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, wr, KP: tl.constexpr):
    """Step ``s`` of the persistent forward for batch tile ``jb``, hidden tile ``j`` of one
    direction; ``KP > 0``: against the resident operand ``wr`` (:func:`_resident_w`), else
    W_hh read from ``w_ptr`` (``wr`` unused)."""
    rb, rh, mb, mh, m2, st = _tile_index(jb, j, B, H, BLOCK_B, BLOCK_H)
    lens = tl.load(len_ptr + rb, mask=mb, other=0)
    # forward: step t = s moves slot t -> t + 1; reverse: t = T - 1 - s moves slot t + 1 -> t
    t = s + reverse * (T - 1 - 2 * s)
    t64 = t.to(tl.int64)
    hp_base = hs_ptr + (t64 + reverse) * stride_hs
    hn_base = hs_ptr + (t64 + 1 - reverse) * stride_hs
    valid = (t < lens)[:, None]
    if KP > 0:
        acc0, acc1, acc2, acc3 = _resident_dot(hp_base, rb, mb, wr, H, DOT_DT, BLOCK_B, BLOCK_H, KP)
    else:
        acc0, acc1, acc2, acc3 = _recurrent_dot(hp_base, rb, mb, w_ptr, stride_w0, stride_w1, rh, mh, H, H, H, ".cg",
                                                MODE, DOT_DT, BLOCK_B, BLOCK_H, BLOCK_K)
    xg = xg_ptr + t64 * stride_xgt + rb[:, None] * stride_xgb + rh[None, :]
    hp = tl.load(hp_base + st, mask=m2, other=0.0, cache_modifier=".cg")
    cp = hp  # placeholder for the non-LSTM modes
    if MODE == 2:
        cp = tl.load(cs_ptr + (t64 + reverse) * stride_hs + st, mask=m2, other=0.0, cache_modifier=".cg")
    h_new, c_new = _cell_update(xg, hp, cp, acc0, acc1, acc2, acc3, bhh_ptr, rh, mh, m2, H, MODE, HAS_BHH)
    # steps beyond a sequence's length keep its state and output zero (PackedSequence semantics)
    out = tl.where(valid, h_new, 0.0)
    tl.store(hn_base + st, tl.where(valid, h_new, hp), mask=m2)
    if MODE == 2:
        tl.store(cs_ptr + (t64 + 1 - reverse) * stride_hs + st, tl.where(valid, c_new, cp), mask=m2)
    if has_mask:
        out = out * tl.load(mask_ptr + t64 * stride_mt + rb[:, None] * stride_mb + rh[None, :], mask=m2,
                            other=0.0).to(tl.float32)
    tl.store(out_ptr + t64 * stride_ot + rb[:, None] * stride_ob + rh[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=["t", "has_carry", "has_dcin"])
def _rnn_step_bwd_kernel(dgn_ptr, stride_dgn, w_ptr, stride_w0, stride_w1, carry_ptr, has_carry, dc_ptr, dcin_ptr,
                         has_dcin, dout_ptr, stride_dout, g_ptr, stride_g, hp_ptr, hn_ptr, cp_ptr, cn_ptr, dgi_ptr, dgh_ptr, stride_dg, dh0_ptr,
                         len_ptr, t, B, H,
                         MODE: tl.constexpr, HAS_NEXT: tl.constexpr, FINAL: tl.constexpr,
                         DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step backward for a [BLOCK_B, BLOCK_H] tile.

    dh = carry + dG_next W_hh (HAS_NEXT; ``dgn [B, G * H]`` the W_hh-side gate gradients of the
    step processed just before) + dout (where valid). FINAL: store dh to ``dh0`` and stop.
    Otherwise write this step's gate gradients (``dgi`` the W_ih side, ``dgh`` the W_hh side;
    the same buffer except for the GRU), the new carry (the part of dh_prev not through W_hh)
    and, for the LSTM, dc_prev into ``dc`` (from dc_next read at ``dcin``: ``dc`` itself in the
    sequence, in place). Invalid rows (t >= len) pass dh and dc through unchanged and get zero
    gate gradients.

    The cells (one step, no state gradient carried in): ``has_carry`` 0 (dh is dout alone, the
    carry only written), ``has_dcin`` 0 where no c' gradient came (dc_next zero, not read), and
    ``t < 0``: no lengths, every row valid, ``len`` not read. Both flags are runtime arguments
    the JIT does not specialise (one compiled kernel serves sequence and cell; a uniform predicate
    on one load each; unspecialised, no configuration gained a spill or more than 8 registers,
    sm_90, Triton 3.6).
    """
    _step_bwd_tile(tl.program_id(0), tl.program_id(1), dgn_ptr, stride_dgn, w_ptr, stride_w0, stride_w1, carry_ptr,
                   has_carry, dc_ptr, dcin_ptr, has_dcin, dout_ptr, stride_dout, g_ptr, stride_g, hp_ptr, hn_ptr, cp_ptr,
                   cn_ptr, dgi_ptr, dgh_ptr, stride_dg, dh0_ptr, len_ptr, t, B, H, MODE, HAS_NEXT, FINAL, DOT_DT,
                   BLOCK_B, BLOCK_H, BLOCK_K, 1, "")


@triton.jit(do_not_specialize=["t", "t1"])
def _rnn_step2_bwd_kernel(dgn_ptr, dgn1_ptr, stride_dgn, w_ptr, w1_ptr, stride_w0, stride_w1, carry_ptr, carry1_ptr,
                          dc_ptr, dc1_ptr, has_dc, dout_ptr, dout1_ptr, stride_dout, g_ptr, g1_ptr, stride_g, hp_ptr,
                          hp1_ptr, hn_ptr, hn1_ptr, cp_ptr, cp1_ptr, cn_ptr, cn1_ptr, dgi_ptr, dgi1_ptr, dgh_ptr,
                          dgh1_ptr, stride_dg, dh0_ptr, dh01_ptr, len_ptr, t, t1, B, H,
                          MODE: tl.constexpr, HAS_NEXT: tl.constexpr, FINAL: tl.constexpr,
                          DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """One backward step of both directions of a bidirectional layer in one launch, as
    ``_rnn_step2_fwd_kernel`` is to the forward: grid axis 2 picks the direction (0: step ``t``
    and the ``*_ptr`` buffers, 1: step ``t1`` and the ``*1_ptr`` ones), each program runs
    ``_rnn_step_bwd_kernel``'s tile of a sequence (the carry always read; the LSTM's c gradient
    ``dc`` updated in place when ``has_dc``). ``FINAL``: both directions' dh0."""
    rev = tl.program_id(2) == 1
    dc = tl.where(rev, dc1_ptr, dc_ptr)
    _step_bwd_tile(tl.program_id(0), tl.program_id(1), tl.where(rev, dgn1_ptr, dgn_ptr), stride_dgn,
                   tl.where(rev, w1_ptr, w_ptr), stride_w0, stride_w1, tl.where(rev, carry1_ptr, carry_ptr), 1, dc, dc,
                   has_dc, tl.where(rev, dout1_ptr, dout_ptr), stride_dout, tl.where(rev, g1_ptr, g_ptr), stride_g,
                   tl.where(rev, hp1_ptr, hp_ptr), tl.where(rev, hn1_ptr, hn_ptr), tl.where(rev, cp1_ptr, cp_ptr),
                   tl.where(rev, cn1_ptr, cn_ptr), tl.where(rev, dgi1_ptr, dgi_ptr), tl.where(rev, dgh1_ptr, dgh_ptr),
                   stride_dg, tl.where(rev, dh01_ptr, dh0_ptr), len_ptr, tl.where(rev, t1, t), B, H, MODE, HAS_NEXT,
                   FINAL, DOT_DT, BLOCK_B, BLOCK_H, BLOCK_K, 1, "")


@triton.jit
def _step_bwd_tile(pid_b, pid_h, dgn_ptr, stride_dgn, w_ptr, stride_w0, stride_w1, carry_ptr, has_carry, dc_ptr,
                   dcin_ptr, has_dcin, dout_ptr, stride_dout, g_ptr, stride_g, hp_ptr, hn_ptr, cp_ptr, cn_ptr, dgi_ptr,
                   dgh_ptr, stride_dg, dh0_ptr, len_ptr, t, B, H,
                   MODE: tl.constexpr, HAS_NEXT: tl.constexpr, FINAL: tl.constexpr,
                   DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   has_next, CACHE: tl.constexpr):
    """The body of ``_rnn_step_bwd_kernel`` for the tile (``pid_b``, ``pid_h``). The persistent
    backward passes ``has_next`` 0 at its first step (HAS_NEXT is a compile-time flag there) and
    ``CACHE`` ".cg" for ``dgn``, which other programs wrote."""
    rb, rh, mb, mh, m2, st = _tile_index(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    GH = H if MODE <= 1 else (4 * H if MODE == 2 else 3 * H)
    k_end = GH
    if HAS_NEXT and not FINAL:
        # a sequence that ended before step t - 1 has zero gate gradients at t - 1, t and t + 1
        # (the step processed before this one, either direction): where every row of the tile
        # has (a packed batch's padding), the carried product adds nothing and is skipped
        last = tl.max(tl.load(len_ptr + rb, mask=mb, other=0), axis=0)
        k_end = tl.where((last < t) | (has_next == 0), 0, GH)
    dh = _carried_dh(dgn_ptr, stride_dgn, w_ptr, stride_w0, stride_w1, carry_ptr, has_carry, st, rb, mb, rh, mh, m2,
                     GH, k_end, HAS_NEXT, DOT_DT, BLOCK_B, BLOCK_H, BLOCK_K, CACHE)
    if FINAL:
        tl.store(dh0_ptr + st, dh, mask=m2)
    else:
        _bwd_cell(dh, rb, mb, rh, m2, st, carry_ptr, dc_ptr, dcin_ptr, has_dcin, dout_ptr, stride_dout, g_ptr, stride_g,
                  hp_ptr, hn_ptr, cp_ptr, cn_ptr, dgi_ptr, dgh_ptr, stride_dg, len_ptr, t, H, MODE, BLOCK_B, BLOCK_H)


@triton.jit
def _bwd_cell(dh, rb, mb, rh, m2, st, carry_ptr, dc_ptr, dcin_ptr, has_dcin, dout_ptr, stride_dout, g_ptr, stride_g,
              hp_ptr, hn_ptr, cp_ptr, cn_ptr, dgi_ptr, dgh_ptr, stride_dg, len_ptr, t, H, MODE: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """A backward step's cell math on a [BLOCK_B, BLOCK_H] tile from ``dh`` (the carried state
    gradient, without this step's output gradient): adds ``dout`` where valid, writes the gate
    gradients (``dgi`` the W_ih side, ``dgh`` the W_hh side), the new carry and (LSTM) ``dc``, as
    :func:`_step_bwd_tile` describes. Returns the W_hh-side gate gradients as written (zero
    where invalid; gates the mode lacks are zero): the resident backward multiplies them by its
    tile's W_hh rows (:func:`_resident_bwd_tile`)."""
    dout = tl.load(dout_ptr + rb[:, None] * stride_dout + rh[None, :], mask=m2, other=0.0).to(tl.float32)
    valid = _valid_rows(len_ptr, rb, mb, t)[:, None] & m2
    dout = tl.where(valid, dout, 0.0)
    dh += dout
    g = g_ptr + rb[:, None] * stride_g + rh[None, :]
    dgi = dgi_ptr + rb[:, None] * stride_dg + rh[None, :]
    dgh = dgh_ptr + rb[:, None] * stride_dg + rh[None, :]
    carry = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    e1 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    e2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    e3 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if MODE <= 1:
        h = tl.load(hn_ptr + st, mask=m2, other=0.0)
        if MODE == 0:
            d = dh * (1.0 - h * h)
        else:
            d = tl.where(h <= 0, 0.0, dh)  # torch's threshold_backward: a NaN h passes dh
        e0 = tl.where(valid, d, 0.0)
        tl.store(dgi, e0, mask=m2)
    elif MODE == 2:
        gi = tl.load(g, mask=m2, other=0.0)
        gf = tl.load(g + H, mask=m2, other=0.0)
        gg = tl.load(g + 2 * H, mask=m2, other=0.0)
        go = tl.load(g + 3 * H, mask=m2, other=0.0)
        c = tl.load(cn_ptr + st, mask=m2, other=0.0)
        cp = tl.load(cp_ptr + st, mask=m2, other=0.0)
        dc_in = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        if has_dcin != 0:
            dc_in = tl.load(dcin_ptr + st, mask=m2, other=0.0)
        tc = _tanh(c)
        dc = dc_in + dh * go * (1.0 - tc * tc)
        e0 = tl.where(valid, dc * gg * gi * (1.0 - gi), 0.0)
        e1 = tl.where(valid, dc * cp * gf * (1.0 - gf), 0.0)
        e2 = tl.where(valid, dc * gi * (1.0 - gg * gg), 0.0)
        e3 = tl.where(valid, dh * tc * go * (1.0 - go), 0.0)
        tl.store(dgi, e0, mask=m2)
        tl.store(dgi + H, e1, mask=m2)
        tl.store(dgi + 2 * H, e2, mask=m2)
        tl.store(dgi + 3 * H, e3, mask=m2)
        tl.store(dc_ptr + st, tl.where(valid, dc * gf, dc_in), mask=m2)
    else:
        r = tl.load(g, mask=m2, other=0.0)
        z = tl.load(g + H, mask=m2, other=0.0)
        n = tl.load(g + 2 * H, mask=m2, other=0.0)
        hn_ = tl.load(g + 3 * H, mask=m2, other=0.0)
        hp = tl.load(hp_ptr + st, mask=m2, other=0.0)
        dz = dh * (hp - n) * z * (1.0 - z)
        # torch's autograd sums dn = dh - dh z over h' = (h - n) z + n (as the reference): NaN (inf
        # - inf) where dh is infinite, where dh (1 - z) stays infinite. dh - dh (0 for a finite
        # dh, NaN for an infinite one) added to 1 - z gives that, without the product dh z kept
        # live across the stores below (dn = dh - dh z, or dh (1 - z) + (dh - dh), cost the
        # persistent exact-float32 backward 8 bytes of spills under Triton 3.6: read in its SASS)
        dn = dh * (1.0 - z + (dh - dh)) * (1.0 - n * n)
        dr = dn * hn_ * r * (1.0 - r)
        e0 = tl.where(valid, dr, 0.0)
        e1 = tl.where(valid, dz, 0.0)
        e2 = tl.where(valid, dn * r, 0.0)
        tl.store(dgi, e0, mask=m2)
        tl.store(dgi + H, e1, mask=m2)
        tl.store(dgi + 2 * H, tl.where(valid, dn, 0.0), mask=m2)
        tl.store(dgh, e0, mask=m2)
        tl.store(dgh + H, e1, mask=m2)
        tl.store(dgh + 2 * H, e2, mask=m2)
        carry = dh * z
    tl.store(carry_ptr + st, tl.where(valid, carry, dh), mask=m2)
    return e0, e1, e2, e3


@triton.jit
def _rnn_persist_bwd_kernel(w_ptr, stride_w0, stride_w1, carry_ptr, dc_ptr, has_dc, dout_ptr, stride_dot, stride_dob,
                            g_ptr, stride_gt, stride_gb, hs_ptr, cs_ptr, stride_hs, dgi_ptr, dgh_ptr, stride_dgt,
                            stride_dgb, len_ptr, count_ptr, ws_ptr, reverse, T, B, H,
                            MODE: tl.constexpr, DOT_DT: tl.constexpr,
                            BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                            KP: tl.constexpr = 0):
    """The whole backward time loop of one layer and direction in one launch (persistent, small
    batch), as ``_rnn_persist_fwd_kernel`` is to the forward: the forward's steps in reverse
    order (``T - 1`` down to 0 forward, 0 up to ``T - 1`` when ``reverse``), per step every
    hidden tile of the program (``pid, pid + P, ...``) runs ``_rnn_step_bwd_kernel``'s tile of a
    sequence step (the carry always read, ``dc`` updated in place when ``has_dc``; the first
    step processed has no ``dG_next W_hh``), then the grid barrier. The gate gradients of the
    step processed before (``dgh`` at ``tn``) were written by every program: read with ``.cg``
    after the barrier. ``carry`` / ``dc [B, H]`` are each tile's own across steps. Leaves in
    ``carry`` dh_0 without the last step's ``dG W_hh`` (the caller's final step adds it, as after
    the per-step loop) and in ``dc`` dc_0.

    Shapes: ``dout [T, B, H]`` (strides ``stride_dot``, ``stride_dob``, unit last), ``g [T, B, *]``
    the stored gates (strides ``stride_gt``, ``stride_gb``), ``hs / cs [T + 1, B, H]`` float32
    slots (stride ``stride_hs``), ``dgi / dgh [T, B, G * H]`` (strides ``stride_dgt``,
    ``stride_dgb``; the same tensor but for the GRU), ``len [B]``, ``count`` one int32, zero at
    launch. The (batch, hidden) tiles are dealt to the programs as the forward's; every program
    resident (the launcher caps the grid at the SM count), one pipeline stage (see
    ``persist_launch``).

    ``KP > 0`` (resident weights, :func:`resident_kp`): one tile per program, whose W_hh rows
    (every gate's, as the resident forward holds them) are loaded once, before the time loop;
    a step sums the partial state gradients the programs left in ``ws`` (float32, see
    :func:`_resident_bwd_tile`) instead of reading ``dG_next`` and W_hh from L2. ``ws`` is not
    read otherwise (any pointer will do)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nh = tl.cdiv(H, BLOCK_H)
    if KP > 0:  # one tile per program (nprog == tiles): tile pid's W_hh rows, kept for every step
        wt = _resident_w(w_ptr, stride_w0, stride_w1, pid % nh, H, MODE, DOT_DT, KP, BLOCK_H, True)
        for s in range(0, T):
            _resident_bwd_tile(pid // nh, pid % nh, s, reverse, wt, ws_ptr, carry_ptr, dc_ptr, has_dc, dout_ptr,
                               stride_dot, stride_dob, g_ptr, stride_gt, stride_gb, hs_ptr, cs_ptr, stride_hs, dgi_ptr,
                               dgh_ptr, stride_dgt, stride_dgb, len_ptr, T, B, H, MODE, DOT_DT, BLOCK_B, BLOCK_H, KP)
            _grid_barrier(count_ptr, (s + 1) * nprog)
        return
    for s in range(0, T):
        for j in range(pid, tl.cdiv(B, BLOCK_B) * nh, nprog):
            _persist_bwd_tile(j // nh, j % nh, s, reverse, w_ptr, stride_w0, stride_w1, carry_ptr, dc_ptr, has_dc,
                              dout_ptr, stride_dot, stride_dob, g_ptr, stride_gt, stride_gb, hs_ptr, cs_ptr, stride_hs,
                              dgi_ptr, dgh_ptr, stride_dgt, stride_dgb, len_ptr, T, B, H, MODE, DOT_DT, BLOCK_B,
                              BLOCK_H, BLOCK_K)
        _grid_barrier(count_ptr, (s + 1) * nprog)


@triton.jit
def _rnn_persist2_bwd_kernel(w_ptr, w1_ptr, stride_w0, stride_w1, carry_ptr, carry1_ptr, dc_ptr, dc1_ptr, has_dc,
                             dout_ptr, dout1_ptr, stride_dot, stride_dob, g_ptr, g1_ptr, stride_gt, stride_gb, hs_ptr,
                             hs1_ptr, cs_ptr, cs1_ptr, stride_hs, dgi_ptr, dgi1_ptr, dgh_ptr, dgh1_ptr, stride_dgt,
                             stride_dgb, len_ptr, count_ptr, ws_ptr, T, B, H,
                             MODE: tl.constexpr, DOT_DT: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                             KP: tl.constexpr = 0):
    """Both directions' backward time loops of a bidirectional layer in one persistent launch,
    as ``_rnn_persist2_fwd_kernel`` is to the forward: the tiles of the forward direction (the
    ``*_ptr`` buffers) and of the reverse one (``*1_ptr``) dealt to the programs, per step every
    program runs its tiles of both (step ``T - 1 - s`` forward, ``s`` reverse), then one grid
    barrier. Each direction as ``_rnn_persist_bwd_kernel`` leaves it. ``KP > 0``: resident
    weights, one tile per program, as ``_rnn_persist_bwd_kernel``'s; ``ws`` holds the two
    directions' partial sums one after the other (:func:`resident_ws_size` each)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nh = tl.cdiv(H, BLOCK_H)
    nt = tl.cdiv(B, BLOCK_B) * nh
    if KP > 0:  # one tile per program (nprog == 2 * nt)
        rev, r, jb, jh = _pair_tile(pid, nt, nh)
        wt = _resident_w(tl.where(rev, w1_ptr, w_ptr), stride_w0, stride_w1, jh, H, MODE, DOT_DT, KP, BLOCK_H, True)
        wsd = ws_ptr + r.to(tl.int64) * (2 * tl.cdiv(B, BLOCK_B) * nh * H * BLOCK_B)
        for s in range(0, T):
            _resident_bwd_tile(jb, jh, s, r, wt, wsd, tl.where(rev, carry1_ptr, carry_ptr),
                               tl.where(rev, dc1_ptr, dc_ptr), has_dc, tl.where(rev, dout1_ptr, dout_ptr), stride_dot,
                               stride_dob, tl.where(rev, g1_ptr, g_ptr), stride_gt, stride_gb,
                               tl.where(rev, hs1_ptr, hs_ptr), tl.where(rev, cs1_ptr, cs_ptr), stride_hs,
                               tl.where(rev, dgi1_ptr, dgi_ptr), tl.where(rev, dgh1_ptr, dgh_ptr), stride_dgt,
                               stride_dgb, len_ptr, T, B, H, MODE, DOT_DT, BLOCK_B, BLOCK_H, KP)
            _grid_barrier(count_ptr, (s + 1) * nprog)
        return
    for s in range(0, T):
        for j in range(pid, 2 * nt, nprog):
            rev, r, jb, jh = _pair_tile(j, nt, nh)
            _persist_bwd_tile(jb, jh, s, r, tl.where(rev, w1_ptr, w_ptr), stride_w0, stride_w1,
                              tl.where(rev, carry1_ptr, carry_ptr), tl.where(rev, dc1_ptr, dc_ptr), has_dc,
                              tl.where(rev, dout1_ptr, dout_ptr), stride_dot, stride_dob, tl.where(rev, g1_ptr, g_ptr),
                              stride_gt, stride_gb, tl.where(rev, hs1_ptr, hs_ptr), tl.where(rev, cs1_ptr, cs_ptr),
                              stride_hs, tl.where(rev, dgi1_ptr, dgi_ptr), tl.where(rev, dgh1_ptr, dgh_ptr), stride_dgt,
                              stride_dgb, len_ptr, T, B, H, MODE, DOT_DT, BLOCK_B, BLOCK_H, BLOCK_K)
        _grid_barrier(count_ptr, (s + 1) * nprog)


@triton.jit
def _bwd_step_slots(s, reverse, T, stride_hs):
    """Where step ``s`` of a persistent backward is (one direction): its time ``t`` (and as int64),
    the time ``tn64`` of the step processed before it (forward: t = T - 1 - s, before it t + 1;
    reverse: t = s, before it t - 1) and the offsets of its state slots in ``hs / cs``, ``hp``
    before the step and ``hn`` after it (forward: slot t -> t + 1; reverse: slot t + 1 -> t)."""
    t = T - 1 - s + reverse * (2 * s + 1 - T)
    t64 = t.to(tl.int64)
    tn64 = t64 + 1 - 2 * reverse
    return t, t64, tn64, (t64 + reverse) * stride_hs, (t64 + 1 - reverse) * stride_hs


@triton.jit
def _persist_bwd_tile(jb, jh, s, reverse, w_ptr, stride_w0, stride_w1, carry_ptr, dc_ptr, has_dc, dout_ptr, stride_dot,
                      stride_dob, g_ptr, stride_gt, stride_gb, hs_ptr, cs_ptr, stride_hs, dgi_ptr, dgh_ptr, stride_dgt,
                      stride_dgb, len_ptr, T, B, H, MODE: tl.constexpr, DOT_DT: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step ``s`` of the persistent backward for batch tile ``jb``, hidden tile ``jh`` of one
    direction: the step backward's tile of a sequence step (the first step processed, s = 0, has
    no ``dG_next W_hh``; the previous step's ``dgh``, written by other programs, read ``.cg``)."""
    t, t64, tn64, hp, hn = _bwd_step_slots(s, reverse, T, stride_hs)
    _step_bwd_tile(jb, jh, dgh_ptr + tn64 * stride_dgt, stride_dgb, w_ptr, stride_w0, stride_w1, carry_ptr, 1, dc_ptr,
                   dc_ptr, has_dc, dout_ptr + t64 * stride_dot, stride_dob, g_ptr + t64 * stride_gt, stride_gb,
                   hs_ptr + hp, hs_ptr + hn, cs_ptr + hp, cs_ptr + hn, dgi_ptr + t64 * stride_dgt,
                   dgh_ptr + t64 * stride_dgt, stride_dgb, carry_ptr, len_ptr, t, B, H, MODE, True, False, DOT_DT,
                   BLOCK_B, BLOCK_H, BLOCK_K, s > 0, ".cg")


@triton.jit
def _resident_bwd_tile(jb, jh, s, reverse, wt, ws_ptr, carry_ptr, dc_ptr, has_dc, dout_ptr, stride_dot, stride_dob,
                       g_ptr, stride_gt, stride_gb, hs_ptr, cs_ptr, stride_hs, dgi_ptr, dgh_ptr, stride_dgt,
                       stride_dgb, len_ptr, T, B, H, MODE: tl.constexpr, DOT_DT: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, KP: tl.constexpr):
    """Step ``s`` of the resident persistent backward for batch tile ``jb``, hidden tile ``jh``
    (the program's one tile), ``wt`` its W_hh rows transposed ([KP, 4 * BLOCK_H]: column
    g * BLOCK_H + i is W_hh row g * H + jh * BLOCK_H + i, zero past H and the mode's gates).

    dG W_hh is summed the other way round from the L2 form: each program multiplies the W_hh-side
    gate gradients it has just computed (its own units', still in registers) by its own rows,
    giving its share of dh_{t-1} for every unit, ``wt @ dG_tile^T`` ([KP, BLOCK_B]: one dot with
    the state units on the MMA's rows; from KP = 64 a wgmma whose A operand stays in shared
    memory, below that an mma.sync with the small operand in registers), and
    stores it to ``ws``; after the barrier each program adds up the shares of its units from
    every hidden tile of its batch tile (one reduction over a fixed layout: the same sum whatever the
    timing). A step so moves [H, BLOCK_B] floats out and in per program where the L2 form reads
    the tile's [G * H, BLOCK_H] W_hh rows and [BLOCK_B, G * H] gate gradients.

    ``ws`` float32 [2, cdiv(B, BLOCK_B), cdiv(H, BLOCK_H), H, BLOCK_B]: step ``s`` writes slot
    ``s % 2`` and the next step reads it, so a program that runs ahead never overwrites shares
    another is still reading (it passed the barrier after which they were all read). The last
    step processed writes none: the caller's final step adds its dG W_hh, as for the L2 form. A
    step whose batch tile has no row running (``len <= t`` in every row: a packed batch's
    padding) writes no shares, and the next step reads none (its gate gradients are zero, so
    the shares would be: the same sums)."""
    t, t64, tn64, hp, hn = _bwd_step_slots(s, reverse, T, stride_hs)
    rb, rh, mb, mh, m2, st = _tile_index(jb, jh, B, H, BLOCK_B, BLOCK_H)
    nh = tl.cdiv(H, BLOCK_H)
    nb = tl.cdiv(B, BLOCK_B)
    rc = tl.arange(0, BLOCK_B)
    dh = tl.load(carry_ptr + st, mask=m2, other=0.0)
    # a step where every row of the batch tile has ended (len <= t: a packed batch's padding) has
    # zero gate gradients, so zero shares: its writers store none and its readers (the same batch
    # tile's programs, one step later) read none, both deciding from the same lengths
    last = tl.max(tl.load(len_ptr + rb, mask=mb, other=0), axis=0)
    if (s > 0) & (last > tn64):  # the shares the previous step left, every hidden tile's, for this tile's units
        q = tl.arange(0, KP // BLOCK_H)
        base = ws_ptr + (((s - 1) % 2) * nb + jb).to(tl.int64) * nh * H * BLOCK_B
        offs = (q[:, None, None] * H + rh[None, :, None]) * BLOCK_B + rc[None, None, :]
        part = tl.load(base + offs, mask=(q < nh)[:, None, None] & mh[None, :, None], other=0.0, cache_modifier=".cg")
        dh += tl.trans(tl.sum(part, axis=0))
    e0, e1, e2, e3 = _bwd_cell(dh, rb, mb, rh, m2, st, carry_ptr, dc_ptr, dc_ptr, has_dc, dout_ptr + t64 * stride_dot,
                               stride_dob, g_ptr + t64 * stride_gt, stride_gb, hs_ptr + hp, hs_ptr + hn, cs_ptr + hp,
                               cs_ptr + hn, dgi_ptr + t64 * stride_dgt, dgh_ptr + t64 * stride_dgt, stride_dgb, len_ptr,
                               t, H, MODE, BLOCK_B, BLOCK_H)
    if (s < T - 1) & (last > t64):
        # [row, unit, gate lo, gate hi] -> [gate, unit, row]: gate g = 2 * hi + lo on the rows, as in wt
        d = tl.join(tl.join(e0, e1), tl.join(e2, e3))
        d = tl.reshape(tl.permute(d, (3, 2, 1, 0)), (4 * BLOCK_H, BLOCK_B))
        share = _dot(wt, d, tl.zeros((KP, BLOCK_B), dtype=tl.float32), DOT_DT)
        rk = tl.arange(0, KP)
        out = ws_ptr + (((s % 2) * nb + jb) * nh + jh).to(tl.int64) * H * BLOCK_B
        tl.store(out + rk[:, None] * BLOCK_B + rc[None, :], share, mask=(rk < H)[:, None])


# ----------------------------------------------------------------------------------------------
# launch heuristics and launchers (all tensors already allocated and offset by the caller)


def _rows_twin(kernel, rows):
    """``kernel``'s function again, with its ``do_not_specialize``, as a kernel with no 16-byte
    alignment fact about its parameters ``rows`` (``do_not_specialize_on_alignment``): what a
    time loop launches when the rows it passes for them are not a multiple of 16 bytes apart
    (``_time_loop``, ``uniform_rows``), and a per-step launch when one of them is not aligned
    (``_for_rows``).

    With the alignment specialised, each step's rows are aligned or not by the step's index
    (float32 rows of B * H = 35 elements: one step in four aligned), and each pattern over the
    kernel's row pointers is a variant of its own, compiled on a GPU at its first use: the variant
    census (benchmarks/variant_census.py) counted 1,080 variants of the step and projection
    kernels in the test suite, 457 with the twins (benchmarks/results/census). The twin is one
    compiled kernel whatever the steps' alignment, so a loop binds its launcher
    (``_launch.bind``) as one over aligned rows does. What it gives up is vector width on the
    row accesses of such shapes, which are misaligned in most steps anyway; the weights, biases
    and lengths keep their alignment facts. The same function, so the same
    code and the same ``aot_specs`` entries (a spec compiles with no alignment fact at all,
    ``AotSpec``), and one Triton cache entry where the twin's launch specialises as a launch of
    the kernel would (its ``cache_key`` is the kernel's)."""
    params = inspect.signature(kernel.fn).parameters
    assert all(r in params for r in rows), rows  # Triton ignores a name that is no parameter
    # the interpreter keeps the decorator's arguments in kwargs, the JIT as an attribute
    dns = getattr(kernel, "kwargs", {}).get("do_not_specialize") or getattr(kernel, "do_not_specialize", None)
    return triton.jit(do_not_specialize=dns, do_not_specialize_on_alignment=rows)(kernel.fn)


# the pointers of a step that are rows of a buffer: per step (the loops' ``rows``) or per layer
# and direction (the carried state gradients, rows of [L * D, B, H] buffers); not the weights,
# biases and lengths, which keep their alignment facts in the twins
_FWD_ROWS = ["xg_ptr", "hp_ptr", "hn_ptr", "cp_ptr", "cn_ptr", "out_ptr", "mask_ptr"]
_BWD_ROWS = ["dgn_ptr", "carry_ptr", "dc_ptr", "dcin_ptr", "dout_ptr", "g_ptr", "hp_ptr", "hn_ptr", "cp_ptr", "cn_ptr",
             "dgi_ptr", "dgh_ptr", "dh0_ptr"]


def _pair_rows(kernel, rows):
    """Both directions' row pointers of the pair kernel ``kernel``: ``x_ptr`` and ``x1_ptr`` of
    each of ``rows`` it has (the backward pair reads the LSTM's dc_next from ``dc_ptr`` itself)."""
    params = inspect.signature(kernel.fn).parameters
    return [n for r in rows for n in (r, r[:-4] + "1_ptr") if n in params]


# the kernels for rows at any alignment (module names: tests wrap every kernel found here)
_rnn_step_fwd_rows_kernel = _rows_twin(_rnn_step_fwd_kernel, _FWD_ROWS)
_rnn_step2_fwd_rows_kernel = _rows_twin(_rnn_step2_fwd_kernel, _pair_rows(_rnn_step2_fwd_kernel, _FWD_ROWS))
_rnn_step_bwd_rows_kernel = _rows_twin(_rnn_step_bwd_kernel, _BWD_ROWS)
_rnn_step2_bwd_rows_kernel = _rows_twin(_rnn_step2_bwd_kernel, _pair_rows(_rnn_step2_bwd_kernel, _BWD_ROWS))
_rnn_proj_fwd_rows_kernel = _rows_twin(_rnn_proj_fwd_kernel, ["m_ptr", "hp_ptr", "hn_ptr", "out_ptr", "mask_ptr"])
_rnn_proj_bwd_rows_kernel = _rows_twin(_rnn_proj_bwd_kernel, ["dgn_ptr", "carry_ptr", "dout_ptr", "dh_ptr"])
LOOSE_ROWS = {_rnn_step_fwd_kernel: _rnn_step_fwd_rows_kernel, _rnn_step2_fwd_kernel: _rnn_step2_fwd_rows_kernel,
              _rnn_step_bwd_kernel: _rnn_step_bwd_rows_kernel, _rnn_step2_bwd_kernel: _rnn_step2_bwd_rows_kernel,
              _rnn_proj_fwd_kernel: _rnn_proj_fwd_rows_kernel, _rnn_proj_bwd_kernel: _rnn_proj_bwd_rows_kernel}


def _for_rows(kernel, *rows):
    """What one launch of ``kernel`` outside a time loop runs (the per-step launchers below):
    ``kernel`` where every tensor of ``rows`` (its row pointers; None skipped) is 16-byte
    aligned, else its twin ``LOOSE_ROWS[kernel]``. A per-step loop over rows at odd strides
    (the LSTM projection's) then compiles two kernels, not one per pattern of aligned rows."""
    for x in rows:
        if x is not None and x.data_ptr() % 16:
            return LOOSE_ROWS[kernel]
    return kernel


STEP_BLOCKS = (16, 16, 32, 4, 3)  # BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages (Triton's default 3)

# Measured choices of the step kernels' configuration, (pass, mode, batch bucket, dot kind) ->
# (BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages); a key not listed gets STEP_BLOCKS. Empty
# until a GPU run of ``python -m gpu_nn.benchmarks.sweep --only rnn`` (benchmarks/gpu_measure.sh)
# has timed the candidates: its rnn_sweep.json "best" entries name, per kernel, mode, dtype and
# batch, the fastest correct configuration without spills; a session copies those that beat
# STEP_BLOCKS here, e.g. ("fwd", "lstm", 64, "tf32"): (16, 32, 64, 4, 3). pass: "fwd" / "bwd";
# mode: a MODE_CODES key; bucket: STEP_BATCH_BUCKETS entry holding B (None above the last);
# dot kind: ``dot_kind(dot)``. A best entry's op "lstm step fwd", dtype float32, shape "N=64 H=512
# tf32" is the key ("fwd", "lstm", 64, "tf32"); its op "rnn step ..." serves "rnn_tanh" and
# "rnn_relu" (the sweep runs tanh). Every entry is compiled by aot_specs() (tests/test_compile.py
# checks it compiles without spills), and must have BLOCK_B, BLOCK_H, BLOCK_K >= 16 (tl.dot).
STEP_TABLE: dict = {}
STEP_BATCH_BUCKETS = (16, 64)  # B <= 16 (the small-batch bench), B <= 64 (its N=64), larger


def dot_kind(dot: int) -> str:
    """The table's name of a dot code: "fma" (exact float32), "tf32", or "half" (float16 and
    bfloat16: the same tensor-core instructions on operands of the same width)."""
    return _DOT_KINDS.get(dot, "half")


_DOT_KINDS = {0: "fma", 3: "tf32"}


def batch_bucket(B: int):
    for b in STEP_BATCH_BUCKETS:  # a plain loop: a generator costs a microsecond per step launch
        if B <= b:
            return b
    return None


def step_blocks(B: int, H: int, mode: str = "lstm", dot: int = 3, backward: bool = False) -> tuple:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages) of the step kernels, forward or backward:
    STEP_TABLE's measured entry for (pass, mode, batch bucket, dot kind), else STEP_BLOCKS.

    Each program computes every gate of a [BLOCK_B, BLOCK_H] tile of (batch row, hidden unit), so
    the cell math stays fused. STEP_BLOCKS makes the grid cdiv(B, 16) x cdiv(H, 16) programs, the
    most that dot tiles of at least 16 on every side allow: N = 64, H = 512 makes 4 x 32 = 128
    programs for the H200's 132 SMs, where the former 32 x 32 tiles made 2 x 16 = 32. Whether a
    wider tile (fewer re-reads of W_hh per batch tile, of h_{t-1} per hidden tile), another K step,
    warp count or pipeline depth is faster is for the H200 to say: benchmarks/sweep.py times the
    candidates (``rnn_step_grid``) and STEP_TABLE takes what it measures. H does not key the table:
    the measured shapes have H = 512."""
    return STEP_TABLE.get(("bwd" if backward else "fwd", mode, batch_bucket(B), dot_kind(dot)), STEP_BLOCKS)


def step_configs(mode: str, dot: int, backward: bool) -> list:
    """Every configuration ``step_blocks`` can return for one pass, mode and dot code (the
    default first): what aot_specs() compiles."""
    kind = dot_kind(dot)
    p = "bwd" if backward else "fwd"
    extra = [c for k, c in sorted(STEP_TABLE.items(), key=repr) if k[0] == p and k[1] == mode and k[3] == kind]
    return list(dict.fromkeys([STEP_BLOCKS, *extra]))


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of _rnn_matmul_kernel, per dot kind; GROUP_M 8
MATMUL_TC = (128, 128, 32, 8)  # tensor-core dots (TF32, float16, bfloat16): two warpgroups of wgmma
MATMUL_FMA = (64, 64, 32, 4)  # exact float32 (FMA): 128 x 128 needs all 255 registers at 8 warps
MATMUL_INTERP = (32, 32, 32, 4)  # under the interpreter: numpy work per program grows with the tile
MATMUL_STAGES = 3
MATMUL_GROUP_M = 8


def matmul_blocks(M: int, N: int, dot: int, interpret: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of ``_rnn_matmul_kernel`` for C [M, N] with dot code
    ``dot``: 128 x 128 tiles on tensor cores, 64 x 64 for the exact float32 dot. The matmuls that
    carry the work are the input projection of all steps (M = T * B, N = G * H: 50 x 16 tiles at
    T = 100, N = 64, H = 512) and dX (N = I: 200 tiles); the weight gradients (M = G * H, N = I or
    H, K = T * B) make 64 tiles there, half the GPU for about 50 us against the per-step kernels'
    milliseconds, and cells / per-step products are a tile or two whatever the size. One tile per
    dot kind keeps the compiled set small (every tile is one more kernel per operand types).
    ``interpret``: 32 x 32 tiles, as dense.py's matmul does there (the interpreter runs each
    program's block ops in numpy, so the tests' small products would run 128 x 128 blocks that
    are mostly masked; smaller tiles also give them several programs and row groups to order);
    tests/test_aot_coverage.py runs the GPU tiles in the interpreter."""
    if interpret:
        return MATMUL_INTERP
    return MATMUL_FMA if dot == 0 else MATMUL_TC


def matmul(a, b, c, *, bias1=None, bias2=None, scale=None, acc=False, dot=0):
    """``c (+)= scale * (a @ b + bias1 + bias2)``; 2-D tensors with any strides; ``bias1 / bias2
    [N]`` and ``scale [M, N]`` (unit last stride) of b's dtype."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    for t in (bias1, bias2, scale):
        assert t is None or t.dtype == b.dtype, "bias / scale must have B's dtype (one compiled kernel per pointer type)"
    bm, bn, bk, warps = matmul_blocks(M, N, dot, _INTERPRET)
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    s = scale if scale is not None else b
    launch_kernel(_rnn_matmul_kernel, grid,
        a, b, c, bias1 if bias1 is not None else b, bias2 if bias2 is not None else b, s, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        s.stride(0) if scale is not None else 0, s.stride(1) if scale is not None else 0,
        int(bias1 is not None), int(bias2 is not None), int(scale is not None), int(acc),
        DOT_DT=dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=MATMUL_GROUP_M, num_warps=warps,
        num_stages=MATMUL_STAGES,
    )


def matmul_pair(first, second, *, dot=0):
    """Two products of one shape in one launch (``_rnn_matmul2_kernel``): ``first`` / ``second``
    are ``(a, b, c, bias1, bias2)`` as :func:`matmul` takes them (no scale), the two with the
    same shapes and strides, few tiles (``pair_matmul_ok``) and outputs that do not overlap."""
    a, b, c, bias1, bias2 = first
    a1, b1, c1, bias11, bias21 = second
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    assert pair_matmul_ok(first, second, dot)
    bm, bn, bk, warps = matmul_blocks(M, N, dot, _INTERPRET)
    grid = (cdiv(M, bm) * cdiv(N, bn), 2)
    launch_kernel(_rnn_matmul2_kernel, grid,
        a, a1, b, b1, c, c1, bias1 if bias1 is not None else b, bias11 if bias11 is not None else b1,
        bias2 if bias2 is not None else b, bias21 if bias21 is not None else b1, b, b1, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), 0, 0,
        int(bias1 is not None), int(bias2 is not None), 0, 0,
        DOT_DT=dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=MATMUL_GROUP_M, num_warps=warps,
        num_stages=MATMUL_STAGES,
    )


# A product pairs (matmul_pair) only while one of them makes fewer tiles than a wave of the
# H200's 132 SMs: there one launch of both fills the GPU better than two under-filled ones and
# saves a launch (the demo's and the weight gradients' small products). Larger products keep a
# launch each: the 128x128 tile sits at the register limit (sm_90 AOT, generic specialisation:
# the pair form spills 64-136 bytes per thread, the one-direction form 200-296, both in
# tests/test_compile.py's ledger; with the input projection's unit strides as constants, 312-488
# against 320-368), so a product that fills the GPU alone gains nothing.
MATMUL_PAIR_MAX_TILES = 132


def pair_matmul_ok(first, second, dot: int = 0) -> bool:
    """Whether two ``(a, b, c, bias1, bias2)`` products can share a :func:`matmul_pair` launch:
    the same shapes, strides and dtypes operand by operand, biases present in both or neither
    (of B's dtype), and fewer than MATMUL_PAIR_MAX_TILES tiles each with the tile of ``dot``."""
    for x, y in zip(first, second):
        if (x is None) != (y is None):
            return False
        if x is not None and (x.shape != y.shape or x.stride() != y.stride() or x.dtype != y.dtype):
            return False
    M, N = first[0].shape[0], first[1].shape[1]
    bm, bn = matmul_blocks(M, N, dot, _INTERPRET)[:2]
    return cdiv(M, bm) * cdiv(N, bn) < MATMUL_PAIR_MAX_TILES and all(
        t is None or t.dtype == first[1].dtype for t in first[3:])


def colsum(x, y, y2=None, x2=None):
    """y[N] = x[M, N].sum(0) and, in the same launch, y2 = x2.sum(0) (x2 given), or y2 = y
    (y2 given, x2 not); ``x`` / ``x2`` float32 with unit column stride, ``y2`` of y's dtype."""
    M, N = x.shape
    if N == 0:
        return
    assert y2 is None or y2.dtype == y.dtype
    assert x2 is None or (y2 is not None and x2.shape == x.shape)
    mode = 0 if y2 is None else (1 if x2 is None else 2)
    xs2 = x2.stride(0) if x2 is not None else 0
    splits, chunk = colsum_ranges(M, N, 32, 64)  # the gate gradients of all T steps: thousands of rows
    if splits > 1:  # float32 partial sums of row ranges (x2's in ws[1]), then their sums as below
        ws = torch.empty((2 if mode == 2 else 1, splits, N), dtype=torch.float32, device=x.device)
        launch_kernel(_rnn_colsum_kernel, (cdiv(N, 64), splits), x, x2 if x2 is not None else x, ws[0], ws[-1],
                      M, N, x.stride(0), xs2, chunk, Y2=2 if mode == 2 else 0, BLOCK_M=32, BLOCK_N=64, num_warps=4)
        x, x2, M, xs2, chunk = ws[0], (ws[1] if mode == 2 else None), splits, N, splits
    launch_kernel(_rnn_colsum_kernel, (cdiv(N, 64), 1), x, x2 if x2 is not None else x, y,
                  y2 if y2 is not None else y, M, N, x.stride(0), xs2, chunk,
                  Y2=mode, BLOCK_M=32, BLOCK_N=64, num_warps=4)


_NO_LENGTHS: dict = {}  # device -> int64 [1]


def _no_lengths(like):
    """The lengths pointer of a launch with ``t = -1`` (every row valid; never read): an int64
    tensor, so that the cells' launches are the sequences' own compiled kernels (a pointer of
    another type would be one more specialisation of every step kernel). Kept per device, except
    when made during CUDA-graph capture (its memory would be the graph pool's)."""
    d = like.device
    got = _NO_LENGTHS.get(d)
    if got is None:
        got = torch.empty(1, dtype=torch.int64, device=d)
        if not (d.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _NO_LENGTHS[d] = got
    return got


def step_forward(mode, xg, hp, hn, cp, cn, w_hh, b_hh, out, mask, lengths, t, dot, proj=False):
    """One step; ``proj``: LSTM with a projection (``hp [B, P]``, ``hn`` gets m, ``out`` unused).
    ``lengths`` None (a cell): every row valid (the kernel gets ``t = -1`` and ``_no_lengths``,
    never read)."""
    B, H = hn.shape
    P = hp.shape[1]
    if B == 0 or H == 0:
        return
    if proj:
        out, mask = hn, None  # not written: the projection kernel writes the output
    if lengths is None:
        lengths, t = _no_lengths(hn), -1
    bb, bh, bk, warps, stages = step_blocks(B, H, mode, dot)
    grid = (cdiv(B, bb), cdiv(H, bh))
    kernel = _for_rows(_rnn_step_fwd_kernel, xg, hp, hn, cp, cn, out, mask)
    launch_kernel(kernel, grid,
        xg, xg.stride(0), hp, hn, cp if cp is not None else hp, cn if cn is not None else hn, w_hh,
        w_hh.stride(0), w_hh.stride(1), b_hh if b_hh is not None else w_hh, out, out.stride(0),
        mask if mask is not None else w_hh, mask.stride(0) if mask is not None else 0, int(mask is not None),
        lengths, t, B, H, P,
        MODE=MODE_CODES[mode], HAS_BHH=b_hh is not None, PROJ=proj,
        DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )


def proj_blocks(B: int, P: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_P, BLOCK_K, num_warps) of the projection kernels: the step kernels' default
    tile (STEP_BLOCKS, not the measured table) over the P projected units."""
    return STEP_BLOCKS[:4]


def proj_forward(m, w_hr, hp, hn, out, mask, lengths, t, dot):
    """``hn = valid ? m W_hr^T : hp``, ``out = valid ? hn * mask : 0`` (``_rnn_proj_fwd_kernel``).
    ``m [B, H]``, ``hp / hn [B, P]`` float32 contiguous; ``out`` / ``mask [B, P]`` unit last stride."""
    B, H = m.shape
    P = hn.shape[1]
    if B == 0:
        return
    bb, bp, bk, warps = proj_blocks(B, P)
    launch_kernel(_for_rows(_rnn_proj_fwd_kernel, m, hp, hn, out, mask), (cdiv(B, bb), cdiv(P, bp)),
        m, w_hr, w_hr.stride(0), w_hr.stride(1), hp, hn, out, out.stride(0), mask if mask is not None else w_hr,
        mask.stride(0) if mask is not None else 0, int(mask is not None), lengths, t, B, H, P, DOT_DT=dot,
        BLOCK_B=bb, BLOCK_P=bp, BLOCK_K=bk, num_warps=warps,
    )


def proj_backward(dg_next, w_hh, carry, dout, dh, lengths, t, dot, final=False):
    """``_rnn_proj_bwd_kernel``: ``carry / dh [B, P]`` float32 contiguous, ``dg_next [B, 4 H]`` or
    None, ``dout [B, P]`` unit last stride (None when ``final``: dh gets dh0)."""
    B, P = carry.shape
    if B == 0:
        return
    bb, bp, bk, warps = proj_blocks(B, P)
    any_ = carry
    launch_kernel(_for_rows(_rnn_proj_bwd_kernel, dg_next, carry, dout, dh), (cdiv(B, bb), cdiv(P, bp)),
        dg_next if dg_next is not None else any_, dg_next.stride(0) if dg_next is not None else 0, w_hh,
        w_hh.stride(0), w_hh.stride(1), carry, dout if dout is not None else any_,
        dout.stride(0) if dout is not None else 0, dh, lengths if lengths is not None else any_, t, B, P,
        w_hh.shape[0], HAS_NEXT=dg_next is not None, FINAL=final, DOT_DT=dot,
        BLOCK_B=bb, BLOCK_P=bp, BLOCK_K=bk, num_warps=warps,
    )


PERSIST_BLOCKS = (16, 16, 32)  # BLOCK_B, BLOCK_H, BLOCK_K


def persist_launch(mode: str, dot: int, has_bhh: bool, kp: int = 0) -> tuple[int, int]:
    """(num_warps, num_stages) of the persistent kernel. One stage, always: with two or more,
    Triton's pipeliner turns the h_{t-1} loads of the K loop into ``cp.async.ca`` (L1-cached;
    the ``.cg`` modifier and ``volatile`` are both dropped, seen in the sm_90 PTX), and an L1
    sector that straddles the end of slot t and the start of slot t + 1 (B * H not a multiple
    of 8) would be cached before other programs write slot t + 1 and read stale a step later.
    BLOCK_K = 32: the float32 LSTM spills at 64. Warps, from ptxas for sm_90: at one stage the
    float32 (FMA) dots keep a few spill stores at 4 warps (rnn_tanh 8 B, LSTM / GRU with b_hh
    24 B of stack), none at 8, except the GRU without b_hh, which spills at 8 and not at 4; the
    tensor-core dots (TF32, float16, bfloat16) spill at none with 4. Resident weights (``kp``
    > 0): 8 warps, whose registers stage the [64, KP] operand (a float32 LSTM at KP = 512 spills
    64 B at 4 warps, none at 8: 158 registers)."""
    if kp:
        return 8, 1
    if dot == 0 and not (mode == "gru" and not has_bhh):
        return 8, 1
    return 4, 1


PERSIST_MAX_B = 64  # four batch tiles; the ops' heuristic takes it by default up to one (B <= 16)
PERSIST_MAX_H = 1024

# The persistent kernels' grid barrier needs every program resident at once. The grid is capped at
# the SM count and one program of any configuration fits an SM (the L2 forms: at most 32K
# registers, 4 KB of shared memory; the resident forms: 8 warps of at most 255 registers, 65.3K,
# and 160 KiB of shared memory: benchmarks/results/aot/rnn_resident_kp_*.json and
# rnn_resident_bwd_kp_*.json), so on its own a
# launch always is; but Triton launches are
# not cooperative, so concurrent barrier launches on several streams taking SMs from each other
# would spin instead of failing. COOPERATIVE (GPU_NN_RNN_COOPERATIVE=1) launches them with
# Triton's launch_cooperative_grid (CU_LAUNCH_ATTRIBUTE_COOPERATIVE: a grid that cannot be
# resident is a launch error); off by default until a GPU run has passed its tests that way
# (tests/test_rnn.py, test_persistent_cooperative_launch_matches_per_step_on_gpu).
COOPERATIVE_ENV = "GPU_NN_RNN_COOPERATIVE"
COOPERATIVE = env_switch(COOPERATIVE_ENV) is True


def _launch_options() -> dict:
    """The persistent launches' extra launch options (none by default: see COOPERATIVE)."""
    return {"launch_cooperative_grid": True} if COOPERATIVE else {}


# Resident weights (the persistent forward kernels' KP > 0). With one program per tile, each
# program's W_hh rows are the same at every step, so it loads them once, before the time loop, as
# one [4 * BLOCK_H, KP] operand (every gate's rows of its hidden tile, zero-padded to KP >= H
# columns) that Triton allocates in shared memory ahead of the loop (sm_90 TTGIR: the operand's
# local_alloc precedes the time loop) and the step's one dot reads from there as the A operand of
# a 64-row wgmma (HGMMA in the SASS); a step then loads only h_{t-1} (one [KP, BLOCK_B] load).
# Re-reading W_hh from L2 (KP = 0) costs each step H / BLOCK_K dependent rounds of loads (one
# pipeline stage: see persist_launch), 16 at H = 512, each moving 4x more W_hh than h_{t-1}.
# Taken where every tile has its own program (tiles <= SMs: B <= 16 at H = 512 makes 32 tiles a
# direction, 64 for both), the dots run on the tensor cores (TF32, float16, bfloat16: FMA dots
# would hold the operands in registers) and KP <= RESIDENT_MAX_KP: 128 KiB of
# shared memory for a float32 operand (plus 32 KiB for h_{t-1}); a half LSTM at KP = 1024 spills
# 72-80 B at 8 warps (its staging), so H > 512 keeps the L2 form. sm_90 of every form at KP 16 to
# 512 (300 specs, each also in its aligned launch form: benchmarks/results/aot/rnn_resident_kp_*.json):
# no spills, at most 190 registers at 8 warps under Triton 3.9, 225 under 3.6, HGMMA in each.
# Not measured on a GPU yet: GPU_NN_RNN_RESIDENT=0 turns it off (bench_rnn's triton-persistent-l2
# provider times the L2 form beside it).
# The persistent backward takes the same rows on the same terms (resident_kp): its product
# dh_{t-1} = dG_t W_hh needs, for a tile's 16 units, W_hh's columns of those units over all G * H
# rows (128 KiB at H = 512 in float32, and a 16-row dot whichever way round), so it is turned
# round instead: each program multiplies the gate gradients it has just computed (its own units',
# in registers) by its own rows, W_hh^T of its 4 x 16 rows (the forward's operand, transposed: the
# A operand of a KP-row wgmma) times dG_tile^T, and stores that [H, BLOCK_B] share of dh_{t-1};
# after the barrier each program sums its units' shares from every hidden tile of its batch tile
# (_resident_bwd_tile). sm_90 of its 480 forms at KP 16 to 512: no spills; HGMMA from KP 64 (a
# KP-row dot: below 64 rows it is an mma.sync, HMMA, its small operand in registers); registers
# up to 212 at 8 warps under Triton 3.9, 255 under 3.6 in float32 at KP 512, shared memory up to
# 160 KiB (benchmarks/results/aot/rnn_resident_bwd_kp_*.json, made at 5e1699f: the packed-batch
# skip added a branch, 208 -> 212 under 3.9).
RESIDENT_ENV = "GPU_NN_RNN_RESIDENT"
RESIDENT_MAX_KP = 512
# The backward's resident form up to KP 256: on the H200 at a331102 the persistent backward
# (GPU_NN_RNN_PERSISTENT=1; off by default) gave a wrong float32 (TF32) input gradient at KP 512
# (B=4 H=512 bidirectional: relative error 0.78 Elman, 0.45 LSTM) while its forward was right.
# The cause, found by emulating the kernel's sm_90 PTX on the CPU (all 64 programs, the barrier
# and the wgmma's shared-memory layout modelled): Triton 3.6 / 3.9 stored the tl.trans'd W_hh
# operand physically transposed and put its rows 256 and up where the wgmma descriptors do not
# read them (benchmarks/results/aot/rnn_resident_bwd_trans_a331102.md). The operand is now loaded
# transposed (_resident_w's TRANS) and every compiled spec is held to having no such operand
# (_aot.wide_transposed_32bit); the emulated kernel is exact at KP 512 since. The bound stays at
# 256 (above it, W_hh from L2) until a GPU run passes test_resident_backward_at_kp512_on_gpu.
RESIDENT_BWD_MAX_KP = 256


def resident_kp(H: int, dot: int, tiles: int, programs: int, backward: bool = False) -> int:
    """KP of a persistent launch (forward, or the ``backward``) of ``programs`` programs over
    ``tiles`` tiles: the resident operands' depth (a power of two >= max(H, 16)), or 0 (W_hh read
    from L2 per step) where the resident form does not apply (see RESIDENT_MAX_KP, and
    RESIDENT_BWD_MAX_KP for the backward) or GPU_NN_RNN_RESIDENT=0."""
    if env_switch(RESIDENT_ENV) is False or dot == DOT_CODES["fp32"] or programs != tiles:
        return 0
    kp = max(16, next_power_of_2(H))
    return kp if kp <= (RESIDENT_BWD_MAX_KP if backward else RESIDENT_MAX_KP) else 0


def persist_tiles(B: int, H: int) -> int:
    """(batch, hidden) tiles of one direction's persistent launch."""
    return cdiv(B, PERSIST_BLOCKS[0]) * cdiv(H, PERSIST_BLOCKS[1])


def persist_programs(B: int, H: int, sm_count: int) -> int:
    """Programs of the persistent kernels: one per (batch, hidden) tile, capped at ``sm_count``
    so that all of them are resident at once (the grid barrier needs it; one program per SM at
    most); 0 where the persistent kernels do not apply (B > PERSIST_MAX_B, H > PERSIST_MAX_H, an
    empty problem)."""
    if not (1 <= B <= PERSIST_MAX_B and 1 <= H <= PERSIST_MAX_H and sm_count >= 1):
        return 0
    return min(persist_tiles(B, H), sm_count)


def persist_pair_programs(B: int, H: int, sm_count: int) -> int:
    """Programs of the pair persistent kernels (both directions): one per tile of either
    direction, capped at ``sm_count`` as ``persist_programs``; 0 where they do not apply."""
    if not persist_programs(B, H, sm_count):
        return 0
    return min(2 * persist_tiles(B, H), sm_count)


def persist_forward_pair(mode, fwd, rev, lengths, dot, num_programs):
    """Both directions' whole time loops in one launch (``_rnn_persist2_fwd_kernel``): ``fwd`` /
    ``rev`` are ``(xg, hs, cs, w_hh, b_hh, out, mask)`` of each direction as ``persist_forward``
    takes them, with the same strides (``pair_ok`` of the weights); ``num_programs`` from
    ``persist_pair_programs`` (1 under the interpreter)."""
    xg, hs, cs, w_hh, b_hh, out, mask = fwd
    xg1, hs1, cs1, w_hh1, b_hh1, out1, mask1 = rev
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    if T == 0 or B == 0 or H == 0:
        return
    assert 1 <= num_programs <= 2 * persist_tiles(B, H) and B <= PERSIST_MAX_B
    assert hs.stride(1) == H and hs.stride(2) == 1 and hs1.stride() == hs.stride()
    assert (cs is None or cs.stride() == hs.stride() == cs1.stride()) and xg.stride() == xg1.stride()
    assert out.stride() == out1.stride() and pair_ok(w_hh, w_hh1) and (mask is None or mask.stride() == mask1.stride())
    bb, bh, bk = PERSIST_BLOCKS
    kp = resident_kp(H, dot, 2 * persist_tiles(B, H), num_programs)
    warps, stages = persist_launch(mode, dot, b_hh is not None, kp)
    count = torch.zeros(1, dtype=torch.int32, device=hs.device)  # zeroed per launch, as persist_forward's
    launch_kernel(_rnn_persist2_fwd_kernel, (num_programs,),
        xg, xg1, xg.stride(0), xg.stride(1), hs, hs1, cs if cs is not None else hs, cs1 if cs1 is not None else hs1,
        hs.stride(0), w_hh, w_hh1, w_hh.stride(0), w_hh.stride(1), b_hh if b_hh is not None else w_hh,
        b_hh1 if b_hh1 is not None else w_hh1, out, out1, out.stride(0), out.stride(1),
        mask if mask is not None else w_hh, mask1 if mask1 is not None else w_hh1,
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0, int(mask is not None),
        lengths, count, T, B, H, MODE=MODE_CODES[mode], HAS_BHH=b_hh is not None,
        DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, KP=kp, num_warps=warps, num_stages=stages,
        **_launch_options(),
    )


def persist_forward(mode, xg, hs, cs, w_hh, b_hh, out, mask, lengths, reverse, dot, num_programs):
    """Whole time loop of one layer and direction in one launch (``_rnn_persist_fwd_kernel``).

    ``xg [T, B, *]``, ``hs / cs [T + 1, B, H]`` float32 with contiguous slots, ``out`` and
    ``mask [T, B, H]`` with unit last stride, ``lengths`` int64 ``[B]``. ``num_programs`` from
    ``persist_programs`` (the caller states the device's SM count; under the interpreter that
    is 1, since programs run one after another and a barrier across two would never open).
    """
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    if T == 0 or B == 0 or H == 0:
        return
    assert 1 <= num_programs <= persist_tiles(B, H) and B <= PERSIST_MAX_B
    assert hs.stride(1) == H and hs.stride(2) == 1 and (cs is None or cs.stride() == hs.stride())
    bb, bh, bk = PERSIST_BLOCKS
    kp = resident_kp(H, dot, persist_tiles(B, H), num_programs)
    warps, stages = persist_launch(mode, dot, b_hh is not None, kp)
    # zeroed per launch: a re-launch (or a launch after an aborted one) never sees stale counts
    count = torch.zeros(1, dtype=torch.int32, device=hs.device)
    launch_kernel(_rnn_persist_fwd_kernel, (num_programs,),
        xg, xg.stride(0), xg.stride(1), hs, cs if cs is not None else hs, hs.stride(0), w_hh,
        w_hh.stride(0), w_hh.stride(1), b_hh if b_hh is not None else w_hh, out, out.stride(0), out.stride(1),
        mask if mask is not None else w_hh, mask.stride(0) if mask is not None else 0,
        mask.stride(1) if mask is not None else 0, int(mask is not None), lengths, count, int(reverse), T, B, H,
        MODE=MODE_CODES[mode], HAS_BHH=b_hh is not None,
        DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, KP=kp, num_warps=warps, num_stages=stages,
        **_launch_options(),
    )


def persist_bwd_launch(mode: str, dot: int, kp: int = 0) -> tuple[int, int]:
    """(num_warps, num_stages) of the persistent backward: one stage, as the forward's (the
    pipeliner would make the ``.cg`` loads of ``dG_next`` L1-cached ``cp.async.ca``), 4 warps;
    resident weights (``kp`` > 0) 8, as the resident forward."""
    return (8 if kp else 4), 1


def resident_ws_size(B: int, H: int) -> int:
    """float32 elements of one direction's share buffer in the resident persistent backward
    (:func:`_resident_bwd_tile`): two step slots of [batch tiles, hidden tiles, H, BLOCK_B]."""
    bb, bh, _ = PERSIST_BLOCKS
    return 2 * cdiv(B, bb) * cdiv(H, bh) * H * bb


def _barrier_and_shares(kp: int, B: int, H: int, directions: int, device):
    """The persistent backward's barrier counter (one int32, zero) and, with resident weights,
    its share buffer (``directions`` x :func:`resident_ws_size` float32) in one allocation after
    it; without, the counter stands in for the buffer. Only the counter is zeroed: every share a
    step reads was written by the step before (``_resident_bwd_tile``: writers and readers skip
    the same ended steps; tests/test_rnn.py starts the buffer NaN to hold it to that, and so does
    every launch under ``GPU_NN_POISON=1``, as the test suite runs), so the zero fill is 4 bytes,
    not the buffer's 2 MiB at B = 16, H = 512."""
    if not kp:
        count = torch.zeros(1, dtype=torch.int32, device=device)
        return count, count
    assert kp % PERSIST_BLOCKS[1] == 0, "the share sum reads KP / BLOCK_H hidden tiles"
    n = directions * resident_ws_size(B, H)
    buf = torch.empty(n + 1, dtype=torch.float32, device=device)
    if _POISON:  # a share read before it is written shows as NaN
        buf[:n].fill_(float("nan"))
    return buf[n:].view(torch.int32).zero_(), buf[:n]


def loop_backward(mode, w_hh, carry, dc, dout, g, hs, cs, dgi, dgh, lengths, reverse, dot, programs):
    """The backward time loop of one layer and direction in one launch
    (``_rnn_persist_bwd_kernel``), what ``steps_backward`` does in one launch per step: from
    ``carry`` / ``dc [B, H]`` (float32 contiguous; ``dc`` the LSTM's, else None) and ``dout
    [T, B, H]`` (unit last stride), the stored gates ``g`` (None: Elman) and ``hs / cs [T + 1, B,
    H]``, writes ``dgi / dgh [T, B, G * H]`` and leaves dh_0 without the last step's ``dG W_hh``
    in ``carry`` (the caller's final ``step_backward`` adds it), dc_0 in ``dc``. ``programs``
    from ``persist_programs`` (1 under the interpreter). Returns True (the cupy backend's
    ``loop_backward`` may decline; this one always runs)."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    if T == 0 or B == 0 or H == 0:
        return True
    assert 1 <= programs <= persist_tiles(B, H) and B <= PERSIST_MAX_B
    assert hs.stride(1) == H and hs.stride(2) == 1 and (cs is None or cs.stride() == hs.stride())
    assert carry.is_contiguous() and dout.stride(2) == 1 and dgi.stride(2) == 1 and dgh.stride() == dgi.stride()
    bb, bh, bk = PERSIST_BLOCKS
    kp = resident_kp(H, dot, persist_tiles(B, H), programs, True)
    warps, stages = persist_bwd_launch(mode, dot, kp)
    count, ws = _barrier_and_shares(kp, B, H, 1, hs.device)  # per launch, as the forward's counter
    launch_kernel(_rnn_persist_bwd_kernel, (programs,),
        w_hh, w_hh.stride(0), w_hh.stride(1), carry, dc if dc is not None else carry, int(dc is not None),
        dout, dout.stride(0), dout.stride(1), g if g is not None else carry, g.stride(0) if g is not None else 0,
        g.stride(1) if g is not None else 0, hs, cs if cs is not None else hs, hs.stride(0), dgi, dgh,
        dgi.stride(0), dgi.stride(1), lengths, count, ws, int(reverse), T, B, H,
        MODE=MODE_CODES[mode], DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, KP=kp, num_warps=warps,
        num_stages=stages, **_launch_options(),
    )
    return True


def persist_backward_pair(mode, fwd, rev, lengths, dot, programs):
    """Both directions' backward time loops in one persistent launch (``_rnn_persist2_bwd_kernel``)
    and their final dh0 step in one more: what ``steps_backward_pair`` leaves, in two launches.
    ``fwd`` / ``rev`` as ``steps_backward_pair`` takes them; ``programs`` from
    ``persist_pair_programs`` (1 under the interpreter)."""
    w_hh, carry, dc, dout, G, Hs, Cs, dGi, dGh, dh0 = fwd
    w_hh1, carry1, dc1, dout1, G1, Hs1, Cs1, dGi1, dGh1, dh01 = rev
    T = dout.shape[0]
    B, H = carry.shape
    if B == 0 or H == 0:
        return
    assert pair_ok(w_hh, w_hh1) and dout.stride() == dout1.stride() and dGi.stride() == dGi1.stride()
    assert 1 <= programs <= 2 * persist_tiles(B, H) and B <= PERSIST_MAX_B
    assert Hs.stride() == Hs1.stride() and Hs.stride(1) == H and Hs.stride(2) == 1
    assert carry.is_contiguous() and carry1.is_contiguous() and dout.stride(2) == 1 and dGi.stride(2) == 1
    dGh = dGi if dGh is None else dGh
    dGh1 = dGi1 if dGh1 is None else dGh1
    if T:
        bb, bh, bk = PERSIST_BLOCKS
        kp = resident_kp(H, dot, 2 * persist_tiles(B, H), programs, True)
        warps, stages = persist_bwd_launch(mode, dot, kp)
        count, ws = _barrier_and_shares(kp, B, H, 2, carry.device)
        launch_kernel(_rnn_persist2_bwd_kernel, (programs,),
            w_hh, w_hh1, w_hh.stride(0), w_hh.stride(1), carry, carry1, dc if dc is not None else carry,
            dc1 if dc1 is not None else carry1, int(dc is not None), dout, dout1, dout.stride(0), dout.stride(1),
            G if G is not None else carry, G1 if G1 is not None else carry1, G.stride(0) if G is not None else 0,
            G.stride(1) if G is not None else 0, Hs, Hs1, Cs if Cs is not None else Hs,
            Cs1 if Cs1 is not None else Hs1, Hs.stride(0), dGi, dGi1, dGh, dGh1, dGi.stride(0), dGi.stride(1),
            lengths, count, ws, T, B, H,
            MODE=MODE_CODES[mode], DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, KP=kp, num_warps=warps,
            num_stages=stages, **_launch_options(),
        )
    if dh0 is None:  # the initial state's gradient not asked for: no final step
        return
    # the final step: the last steps processed are 0 forward and T - 1 reverse (none when T = 0)
    bb, bh, bk, warps, stages = step_blocks(B, H, mode, dot, backward=True)
    kw = dict(MODE=MODE_CODES[mode], HAS_NEXT=T > 0, FINAL=True, DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
              num_warps=warps, num_stages=stages)
    prev, prev1 = (dGh[0], dGh1[T - 1]) if T else (carry, carry1)
    _final_pair_step(launch_kernel, (cdiv(B, bb), cdiv(H, bh), 2), prev, prev1, dGh.stride(1) if T else 0, w_hh,
                     w_hh1, carry, carry1, dh0, dh01, lengths, kw)


def step_backward(mode, dg_next, w_hh, carry, dc, dout, g, hp, hn, cp, cn, dgi, dgh, dh0, lengths, t, dot, final=False,
                  has_carry=True, dc_in=None):
    """One backward step (``_rnn_step_bwd_kernel``). The sequence (``has_carry``): ``carry`` and
    ``dc`` updated in place. A cell (``has_carry=False``): dh is ``dout`` alone and ``carry`` only
    written; ``dc_in`` the c' gradient (float32 [B, H], contiguous) or None (zero), ``dc``
    written; ``lengths`` None (every row valid: ``t = -1``, ``_no_lengths`` passed for the
    lengths, never read)."""
    B, H = carry.shape
    if B == 0 or H == 0:
        return
    bb, bh, bk, warps, stages = step_blocks(B, H, mode, dot, backward=True)
    grid = (cdiv(B, bb), cdiv(H, bh))
    any_ = carry
    if has_carry:
        dc_in = dc
    if lengths is None:
        t = -1
        if not final:  # the final step (dh0 only) reads no lengths; its compiled kernel takes the carry
            lengths = _no_lengths(carry)
    kernel = _for_rows(_rnn_step_bwd_kernel, dg_next, carry, dc, dc_in, dout, g, hp, hn, cp, cn, dgi, dgh, dh0)
    launch_kernel(kernel, grid,
        dg_next if dg_next is not None else any_, dg_next.stride(0) if dg_next is not None else 0, w_hh,
        w_hh.stride(0), w_hh.stride(1), carry, int(has_carry), dc if dc is not None else any_,
        dc_in if dc_in is not None else any_, int(dc_in is not None),
        dout if dout is not None else any_, dout.stride(0) if dout is not None else 0,
        g if g is not None else any_, g.stride(0) if g is not None else 0,
        hp if hp is not None else any_, hn if hn is not None else any_, cp if cp is not None else any_,
        cn if cn is not None else any_, dgi if dgi is not None else any_, dgh if dgh is not None else any_,
        dgi.stride(0) if dgi is not None else 0, dh0 if dh0 is not None else any_,
        lengths if lengths is not None else any_, t, B, H,
        MODE=MODE_CODES[mode], HAS_NEXT=dg_next is not None, FINAL=final, DOT_DT=dot,
        BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )


def _steps(T: int, reverse: bool):
    """``(t, p, n)`` per step in processing order, as ``reference.rnn._steps``: step t moves state
    slot p to slot n (t -> t + 1 forward, t + 1 -> t reverse)."""
    return [(t, t + 1, t) for t in range(T - 1, -1, -1)] if reverse else [(t, t, t + 1) for t in range(T)]


class _Same:
    """One value for every step of a time loop (``_time_loop``'s ``rows``): a pointer a loop passes
    unchanged, where the other steps pass a row of a buffer."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __getitem__(self, i):
        return self.value


def _addresses(x) -> list:
    """The raw device address of each row of a buffer ``[R, ...]``, what a bound launcher takes
    for a pointer argument (``_launch.bind``): a list, so that a step reads one by an index."""
    base, step = x.data_ptr(), x.stride(0) * x.element_size()
    return list(range(base, base + x.shape[0] * step, step)) if step else [base] * x.shape[0]


def uniform_rows(rows) -> bool:
    """Whether every buffer of ``rows`` (``_Same`` entries aside) has its rows a multiple of 16
    bytes apart: then each row has row 0's 16-byte alignment, the one fact about a pointer that a
    compiled kernel is specialised on, and one compiled kernel serves every step."""
    return all(isinstance(x, _Same) or x.stride(0) * x.element_size() % 16 == 0 for x in rows)


def _time_loop(kernel, grid, steps, rows, fixed, body, kw, kw_first=None):
    """The launches of one time loop of ``kernel``, one per entry of ``steps``, in order.

    ``body(launch, rows, fixed, todo)`` makes one ``launch(*runtime_args)`` per entry of ``todo``
    (a run of consecutive entries of ``steps``), reading its per-step pointers as ``rows[k][i]``
    and its loop-wide pointers as ``fixed[k]``. Here ``rows`` holds buffers ``[R, ...]`` (row i
    of one is what a step passes) or ``_Same`` values, ``fixed`` tensors. Launch 0 takes the
    keywords ``kw_first`` where given, every other launch ``kw``.

    The kernel is ``kernel`` where ``uniform_rows(rows)``, else its twin ``LOOSE_ROWS[kernel]``,
    which knows nothing of the rows' alignment: one compiled kernel serves every step either way
    (the step kernels also take ``t`` as ``do_not_specialize``, so its value changes none).
    Where the launcher can be bound (``_launch.bind``: a compiled kernel on a GPU, Triton's
    launcher verified), the first launch with ``kw`` binds it (its arguments tensor views) and
    every later one calls it with raw addresses, ``rows`` read through ``_addresses`` and
    ``fixed`` as ``data_ptr()``s: per step no plan key (about 11 us of host time on a 2-core CPU
    machine for the forward step kernel's 20 arguments), no tensor view and, in the launcher, no
    ``data_ptr()`` call or ``cuPointerGetAttribute`` per pointer. Elsewhere (the interpreter, a
    CPU) every launch goes through ``launch_kernel`` with views from one ``unbind`` per buffer."""
    launch = launch_kernel  # the module's (host_cost patches it)
    if not uniform_rows(rows):
        kernel = LOOSE_ROWS[kernel]
    head = steps[:1] if kw_first is not None else []
    rest = steps[len(head):]
    if _launch.bindable() and rest:
        if head:  # a tensor indexes its rows itself; the few views of the bound launches
            body(lambda *a: launch(kernel, grid, *a, **kw_first), rows, fixed, head)
        bound = []
        body(lambda *a: bound.append(_launch.bind(kernel, grid, *a, **kw)), rows, fixed, rest[:1])
        head, rest = [], rest[1:]
        if bound[0] is not None:
            addresses = [_Same(x.value.data_ptr()) if isinstance(x, _Same) else _addresses(x) for x in rows]
            body(bound[0], addresses, [f.data_ptr() for f in fixed], rest)
            return
    views = [x if isinstance(x, _Same) else x.unbind(0) for x in rows]
    if head:
        body(lambda *a: launch(kernel, grid, *a, **kw_first), views, fixed, head)
    body(lambda *a: launch(kernel, grid, *a, **kw), views, fixed, rest)


def _backward_order(T: int, reverse: bool) -> list:
    """``(t, p, n, q)`` per backward step in processing order: ``reversed(_steps(T, reverse))``,
    each with ``q`` the ``t`` of the step processed before it (-1 for the first)."""
    order = list(reversed(_steps(T, reverse)))
    return [(t, p, n, order[i - 1][0] if i else -1) for i, (t, p, n) in enumerate(order)]


def steps_forward(mode, XG, Hs, Cs, w_hh, b_hh, out, mask, lengths, reverse, dot):
    """The per-step time loop of one layer and direction: for each step ``(t, p, n)`` of
    ``_steps(T, reverse)`` exactly the launch ``step_forward(mode, XG[t], Hs[p], Hs[n], Cs[p],
    Cs[n], w_hh, b_hh, out[t], mask[t], lengths, t, dot)`` makes, at a fraction of its host cost
    (the demo's models are host-bound): the configuration, grid, strides and keywords are
    computed once and the launches made by ``_time_loop`` (on a GPU, straight to the launcher
    after the first).

    ``XG [T, B, *]`` the input projections (unit last stride), ``Hs / Cs [T + 1, B, H]`` float32
    state slots (``Cs`` None but for the LSTM), ``out`` and ``mask [T, B, H]`` with unit last stride
    (views into the layer's output / dropout masks; ``mask`` may be None), ``lengths`` int64 [B].
    No projection (``step_forward(..., proj=True)`` stays per step)."""
    T, B, H = out.shape
    if T == 0 or B == 0 or H == 0:
        return
    bb, bh, bk, warps, stages = step_blocks(B, H, mode, dot)
    grid = (cdiv(B, bb), cdiv(H, bh))
    kw = dict(MODE=MODE_CODES[mode], HAS_BHH=b_hh is not None, PROJ=False, DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh,
              BLOCK_K=bk, num_warps=warps, num_stages=stages)
    sxg, sout = XG.stride(1), out.stride(1)
    s0, s1 = w_hh.stride(0), w_hh.stride(1)
    smask, has_mask = (0, 0) if mask is None else (mask.stride(1), 1)
    P = H
    # as step_forward: cp / cn default to hp / hn, a missing mask to w_hh (not read)
    rows = [XG, Hs, Hs if Cs is None else Cs, out, _Same(w_hh) if mask is None else mask]
    fixed = [w_hh, b_hh if b_hh is not None else w_hh, lengths]

    def body(launch, rows, fixed, todo):
        xgs, hs, cs, outs, masks = rows
        w, bhh, lens = fixed
        for t, p, n in todo:
            launch(xgs[t], sxg, hs[p], hs[n], cs[p], cs[n], w, s0, s1, bhh, outs[t], sout, masks[t], smask, has_mask,
                   lens, t, B, H, P)

    _time_loop(_rnn_step_fwd_kernel, grid, _steps(T, reverse), rows, fixed, body, kw)


def steps_backward(mode, w_hh, carry, dc, dout, G, Hs, Cs, dGi, dGh, lengths, reverse, dot):
    """The per-step backward time loop of one layer and direction, without the final dh0 step:
    for each step ``(t, p, n)`` of ``reversed(_steps(T, reverse))`` exactly the launch
    ``step_backward(mode, prev, w_hh, carry, dc, dout[t], G[t], Hs[p], Hs[n], Cs[p], Cs[n],
    dGi[t], dGh[t], None, lengths, t, dot)`` makes (``prev``: ``dGh`` of the step before, None
    first), with the per-call work done once (see :func:`steps_forward`). Returns that last
    ``prev`` (the dgn of the final step), None when T = 0.

    ``carry [B, H]`` and ``dc [B, H]`` (LSTM; else None) float32 contiguous, updated in place;
    ``dout [T, B, H]`` unit last stride; ``G`` the stored gates ``[T, B, *]`` (None: Elman);
    ``Hs / Cs [T + 1, B, H]``; ``dGi / dGh [T, B, GH]`` written (the same tensor but for the GRU)."""
    T = dout.shape[0]
    B, H = carry.shape
    if T == 0 or B == 0 or H == 0:
        return None
    bb, bh, bk, warps, stages = step_blocks(B, H, mode, dot, backward=True)
    grid = (cdiv(B, bb), cdiv(H, bh))
    kw_first = dict(MODE=MODE_CODES[mode], HAS_NEXT=False, FINAL=False, DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh,
                    BLOCK_K=bk, num_warps=warps, num_stages=stages)
    kw_next = {**kw_first, "HAS_NEXT": True}
    s0, s1 = w_hh.stride(0), w_hh.stride(1)
    has_dc = int(dc is not None)
    sdout, sg = dout.stride(1), (G.stride(1) if G is not None else 0)
    sdg, sdgn = dGi.stride(1), dGh.stride(1)
    # a missing buffer's pointer is the carry's (not read)
    rows = [dout, _Same(carry) if G is None else G, Hs, _Same(carry) if Cs is None else Cs, dGi, dGh]
    fixed = [w_hh, carry, dc if dc is not None else carry, lengths]

    def body(launch, rows, fixed, todo):
        douts, gs, hs, cs, dgis, dghs = rows
        w, car, dcp, lens = fixed
        for t, p, n, q in todo:
            prev, sprev = (dghs[q], sdgn) if q >= 0 else (car, 0)
            launch(prev, sprev, w, s0, s1, car, 1, dcp, dcp, has_dc, douts[t], sdout, gs[t], sg, hs[p], hs[n], cs[p],
                   cs[n], dgis[t], dghs[t], sdg, car, lens, t, B, H)

    order = _backward_order(T, reverse)
    _time_loop(_rnn_step_bwd_kernel, grid, order, rows, fixed, body, kw_next, kw_first)
    return dGh[order[-1][0]]


def pair_ok(fwd_w_hh, rev_w_hh) -> bool:
    """Whether the two directions of a layer can share the pair launches
    (``steps_forward_pair`` / ``steps_backward_pair``): their recurrent weights have the same
    dtype and strides (the pair kernels take one set of strides)."""
    return fwd_w_hh.dtype == rev_w_hh.dtype and fwd_w_hh.stride() == rev_w_hh.stride()


def steps_forward_pair(mode, fwd, rev, lengths, dot):
    """Both directions of a bidirectional layer, one ``_rnn_step2_fwd_kernel`` launch per step:
    step ``i`` runs the forward direction's step ``(t, p, n) = _steps(T, False)[i]`` and the
    reverse one's ``_steps(T, True)[i]`` side by side (grid axis 2), each exactly as
    ``steps_forward`` would. ``fwd`` / ``rev``: ``(XG, Hs, Cs, w_hh, b_hh, out, mask)`` of each
    direction, as ``steps_forward`` takes them; the two share strides (``pair_ok`` of the
    weights; the other buffers are views of the same layouts) and ``mask`` is None for both or
    neither."""
    XG, Hs, Cs, w_hh, b_hh, out, mask = fwd
    XG1, Hs1, Cs1, w_hh1, b_hh1, out1, mask1 = rev
    T, B, H = out.shape
    if T == 0 or B == 0 or H == 0:
        return
    assert XG.stride() == XG1.stride() and out.stride() == out1.stride() and pair_ok(w_hh, w_hh1)
    bb, bh, bk, warps, stages = step_blocks(B, H, mode, dot)
    grid = (cdiv(B, bb), cdiv(H, bh), 2)
    kw = dict(MODE=MODE_CODES[mode], HAS_BHH=b_hh is not None, DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk,
              num_warps=warps, num_stages=stages)
    sxg, sout = XG.stride(1), out.stride(1)
    s0, s1 = w_hh.stride(0), w_hh.stride(1)
    if mask is None:
        masks, masks1, smask, has_mask = _Same(w_hh), _Same(w_hh1), 0, 0
    else:
        assert mask.stride() == mask1.stride()
        masks, masks1, smask, has_mask = mask, mask1, mask.stride(1), 1
    rows = [XG, XG1, Hs, Hs1, Hs if Cs is None else Cs, Hs1 if Cs1 is None else Cs1, out, out1, masks, masks1]
    fixed = [w_hh, w_hh1, *((b_hh, b_hh1) if b_hh is not None else (w_hh, w_hh1)), lengths]

    def body(launch, rows, fixed, todo):
        xgs, xgs1, hs, hs1, cs, cs1, outs, outs1, mk, mk1 = rows
        w, w1, bhh, bhh1, lens = fixed
        for (t, p, n), (u, q, m) in todo:
            launch(xgs[t], xgs1[u], sxg, hs[p], hs1[q], hs[n], hs1[m], cs[p], cs1[q], cs[n], cs1[m], w, w1, s0, s1, bhh,
                   bhh1, outs[t], outs1[u], sout, mk[t], mk1[u], smask, has_mask, lens, t, u, B, H)

    _time_loop(_rnn_step2_fwd_kernel, grid, list(zip(_steps(T, False), _steps(T, True))), rows, fixed, body, kw)


def steps_backward_pair(mode, fwd, rev, lengths, dot):
    """Both directions' backward time loops, one ``_rnn_step2_bwd_kernel`` launch per step, and
    the final dh0 step of both in one more: the launches ``steps_backward`` and the final
    ``step_backward`` make per direction, side by side. ``fwd`` / ``rev``: ``(w_hh, carry, dc,
    dout, G, Hs, Cs, dGi, dGh, dh0)`` of each direction (``dGi`` and ``dGh`` of one direction
    are its own buffers: the two directions' gate gradients coexist), as ``steps_backward``
    takes them, ``dh0 [B, H]`` float32 the initial state's gradient written last (both None: not
    asked for, no final launch)."""
    w_hh, carry, dc, dout, G, Hs, Cs, dGi, dGh, dh0 = fwd
    w_hh1, carry1, dc1, dout1, G1, Hs1, Cs1, dGi1, dGh1, dh01 = rev
    T = dout.shape[0]
    B, H = carry.shape
    if B == 0 or H == 0:
        return
    assert pair_ok(w_hh, w_hh1) and dout.stride() == dout1.stride() and dGi.stride() == dGi1.stride()
    bb, bh, bk, warps, stages = step_blocks(B, H, mode, dot, backward=True)
    grid = (cdiv(B, bb), cdiv(H, bh), 2)
    kw_first = dict(MODE=MODE_CODES[mode], HAS_NEXT=False, FINAL=False, DOT_DT=dot, BLOCK_B=bb, BLOCK_H=bh,
                    BLOCK_K=bk, num_warps=warps, num_stages=stages)
    kw_next = {**kw_first, "HAS_NEXT": True}
    s0, s1 = w_hh.stride(0), w_hh.stride(1)
    has_dc = int(dc is not None)
    sdout, sg = dout.stride(1), (G.stride(1) if G is not None else 0)
    sdg, sdgn = dGi.stride(1), dGh.stride(1)
    rows = [dout, dout1, *((_Same(carry), _Same(carry1)) if G is None else (G, G1)), Hs, Hs1,
            *((_Same(carry), _Same(carry1)) if Cs is None else (Cs, Cs1)), dGi, dGi1, dGh, dGh1]
    fixed = [w_hh, w_hh1, carry, carry1, *((dc, dc1) if dc is not None else (carry, carry1)), lengths]

    def body(launch, rows, fixed, todo):
        douts, douts1, gs, gs1, hs, hs1, cs, cs1, dgis, dgis1, dghs, dghs1 = rows
        w, w1, car, car1, dcp, dcp1, lens = fixed
        for (t, p, n, r), (u, q, m, v) in todo:
            prev, prev1, sprev = (dghs[r], dghs1[v], sdgn) if r >= 0 else (car, car1, 0)
            launch(prev, prev1, sprev, w, w1, s0, s1, car, car1, dcp, dcp1, has_dc, douts[t], douts1[u], sdout, gs[t],
                   gs1[u], sg, hs[p], hs1[q], hs[n], hs1[m], cs[p], cs1[q], cs[n], cs1[m], dgis[t], dgis1[u], dghs[t],
                   dghs1[u], sdg, car, car1, lens, t, u, B, H)

    order = list(zip(_backward_order(T, False), _backward_order(T, True)))
    if order:
        _time_loop(_rnn_step2_bwd_kernel, grid, order, rows, fixed, body, kw_next, kw_first)
        (t, *_), (u, *_) = order[-1]
        prev, prev1, sprev, kw = dGh[t], dGh1[u], sdgn, kw_next
    else:
        prev, prev1, sprev, kw = carry, carry1, 0, kw_first
    if dh0 is not None:  # (None: the initial state's gradient not asked for)
        _final_pair_step(launch_kernel, grid, prev, prev1, sprev, w_hh, w_hh1, carry, carry1, dh0, dh01, lengths, kw)


def _final_pair_step(launch, grid, prev, prev1, sprev, w_hh, w_hh1, carry, carry1, dh0, dh01, lengths, kw):
    """The final step of both directions' backward in one ``_rnn_step2_bwd_kernel`` launch:
    dh0 = carry + dG_last W_hh of each (``prev`` / ``prev1`` the gate gradients of the last step
    processed, row stride ``sprev``; no lengths, no output gradient read)."""
    s0, s1 = w_hh.stride(0), w_hh.stride(1)
    kernel = _for_rows(_rnn_step2_bwd_kernel, prev, prev1, carry, carry1, dh0, dh01)
    launch(kernel, grid, prev, prev1, sprev, w_hh, w_hh1, s0, s1, carry, carry1, carry, carry1, 0, carry,
           carry1, 0, carry, carry1, 0, carry, carry1, carry, carry1, carry, carry1, carry, carry1, carry, carry1, carry,
           carry1, 0, dh0, dh01, lengths, 0, 0, carry.shape[0], carry.shape[1], **{**kw, "FINAL": True})


# ----------------------------------------------------------------------------------------------
# ahead-of-time configurations


def _matmul_spec(a, b, c, dot, tile):
    bm, bn, bk, warps = tile
    # bias1 / bias2 / scale have B's type (B itself stands in where one is absent)
    sig = {"a_ptr": f"*{a}", "b_ptr": f"*{b}", "c_ptr": f"*{c}", "bias1_ptr": f"*{b}", "bias2_ptr": f"*{b}",
           "scale_ptr": f"*{b}", "M": "i32", "N": "i32", "K": "i32"}
    for s in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn", "stride_sm", "stride_sn",
              "has_bias1", "has_bias2", "has_scale", "accumulate"):
        sig[s] = "i32"
    for k in ("DOT_DT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
        sig[k] = "constexpr"
    cons = {"DOT_DT": dot, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": MATMUL_GROUP_M}
    return AotSpec(_rnn_matmul_kernel, sig, cons, num_warps=warps, num_stages=MATMUL_STAGES,
                   label=f"matmul {a}x{b}->{c} dot{dot} {bm}x{bn}x{bk} w{warps}")


def _persist_spec(code, dt, out_dt, has_bhh, dot, kp=0):
    bb, bh, bk = PERSIST_BLOCKS
    mode = [m for m, c in MODE_CODES.items() if c == code][0]
    warps, stages = persist_launch(mode, dot, has_bhh, kp)
    sig = {"xg_ptr": "*fp32", "stride_xgt": "i32", "stride_xgb": "i32", "hs_ptr": "*fp32", "cs_ptr": "*fp32",
           "stride_hs": "i32", "w_ptr": f"*{dt}", "stride_w0": "i32", "stride_w1": "i32", "bhh_ptr": f"*{dt}",
           "out_ptr": f"*{out_dt}", "stride_ot": "i32", "stride_ob": "i32",
           "mask_ptr": f"*{dt}", "stride_mt": "i32",
           "stride_mb": "i32", "has_mask": "i32", "len_ptr": "*i64", "count_ptr": "*i32", "reverse": "i32",
           "T": "i32", "B": "i32",
           "H": "i32"}
    for k in ("MODE", "HAS_BHH", "DOT_DT", "BLOCK_B", "BLOCK_H", "BLOCK_K", "KP"):
        sig[k] = "constexpr"
    cons = {"MODE": code, "HAS_BHH": has_bhh, "DOT_DT": dot, "BLOCK_B": bb, "BLOCK_H": bh,
            "BLOCK_K": bk, "KP": kp}
    res = f" kp{kp}" if kp else ""
    return AotSpec(_rnn_persist_fwd_kernel, sig, cons, num_warps=warps, num_stages=stages,
                   label=f"persist fwd {mode} {dt} dot{dot} out {out_dt} bhh{int(has_bhh)}{res} w{warps} s{stages}")


def _persist_bwd_spec(mode, dt, dout_dt, dot, kp=0):
    bb, bh, bk = PERSIST_BLOCKS
    warps, stages = persist_bwd_launch(mode, dot, kp)
    # the share buffer is float32 with resident weights; without, the counter stands in for it
    sig = {"w_ptr": f"*{dt}", "stride_w0": "i32", "stride_w1": "i32", "carry_ptr": "*fp32", "dc_ptr": "*fp32",
           "has_dc": "i32", "dout_ptr": f"*{dout_dt}", "stride_dot": "i32", "stride_dob": "i32", "g_ptr": "*fp32",
           "stride_gt": "i32", "stride_gb": "i32", "hs_ptr": "*fp32", "cs_ptr": "*fp32", "stride_hs": "i32",
           "dgi_ptr": "*fp32", "dgh_ptr": "*fp32", "stride_dgt": "i32", "stride_dgb": "i32", "len_ptr": "*i64",
           "count_ptr": "*i32", "ws_ptr": "*fp32" if kp else "*i32", "reverse": "i32", "T": "i32", "B": "i32",
           "H": "i32"}
    for k in ("MODE", "DOT_DT", "BLOCK_B", "BLOCK_H", "BLOCK_K", "KP"):
        sig[k] = "constexpr"
    cons = {"MODE": MODE_CODES[mode], "DOT_DT": dot, "BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk, "KP": kp}
    res = f" kp{kp}" if kp else ""
    return AotSpec(_rnn_persist_bwd_kernel, sig, cons, num_warps=warps, num_stages=stages,
                   label=f"persist bwd {mode} {dt} dot{dot} dout {dout_dt}{res} w{warps} s{stages}")


def step_dots(dt: str) -> tuple[int, ...]:
    """The dot codes a layer of io dtype ``dt`` runs its recurrent products with: float32 exact
    (torch.backends.cudnn.allow_tf32 off) or TF32 (on); a half dtype its own."""
    return (DOT_CODES["fp32"], DOT_CODES["tf32"]) if dt == "fp32" else (DOT_CODES[dt],)


def matmul_operands(dt: str) -> list[tuple[str, str, str, int]]:
    """(A, B, C, DOT_DT) of every matmul the driver runs for io dtype ``dt``. float32: all float32,
    exact or TF32. Half: the input projection from the io-dtype input (first layer) or the float32
    layer input (the reserve), and dX, dm from float32 gate gradients, into float32; dW_ih of the
    first layer from the io-dtype input into dt; those in the half dtype. The weight gradients from
    two float32 operands (dW_hh, dW_ih of inner layers, dW_hr) in TF32: 10-bit mantissas, as
    float16's and more than bfloat16's, on tensor cores."""
    if dt == "fp32":
        return [("fp32", "fp32", "fp32", d) for d in step_dots(dt)]
    h = DOT_CODES[dt]
    return [(dt, dt, "fp32", h), ("fp32", dt, "fp32", h), ("fp32", dt, dt, h), ("fp32", "fp32", dt, DOT_CODES["tf32"])]


def aot_specs():
    """Every launch configuration of the driver in gpu_nn.ops.rnn: per io dtype, the matmuls
    (``matmul_operands``, each in its tile of ``matmul_blocks``), the column sum, and per dot code
    of ``step_dots`` the step kernels for every mode in the tile of ``step_blocks`` (output /
    output-gradient in the io dtype (last layer) or float32 (inner layers), the GRU with and
    without b_hh, first / middle / final backward step; the cells' one forward and one backward
    step, without lengths), the projection kernels, and the persistent forward (one block configuration) for every mode, output in the io dtype or
    float32, the GRU with and without b_hh, and its resident-weight forms (tensor-core dots) at
    KP 16 (the interpreter's one-tile launches) and RESIDENT_MAX_KP, both directions' too at
    the latter (every KP between compiles as they do: the sm_90 table in
    benchmarks/results/aot/rnn_resident_kp_*.json). The dropout mask, like the matmul's biases / scale /
    accumulation, is a runtime int (an i32 here; a launch's value 1, which the JIT compiles
    apart, is compiled by tests/test_aot_coverage.py's front-end check). Pointer arguments a
    launch does not use carry the type of the dummy the launcher passes in their place (each
    pointer type is its own compiled kernel): an absent bias / scale of the matmul is B, an
    absent dropout mask the weights (the mask's dtype), the final backward step's output
    gradient and lengths the float32 carry, a cell's lengths its float32 state (the cell
    launches' carry-in and c'-gradient flags are runtime arguments). tests/test_aot_coverage.py checks this list against
    the launches the ops make."""
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        for a, b, c, d in matmul_operands(dt):
            specs.append(_matmul_spec(a, b, c, d, matmul_blocks(1, 1, d)))
            specs.append(_pair_spec(_rnn_matmul2_kernel, specs[-1]))
        # the bias gradients (y2 0, 1, 2); the float32 partial sums of row ranges (y2 0, 2 into
        # fp32) of every dtype are the fp32 pass's own specs (listed once: each dtype's pass
        # listed them again, four identical compiles)
        for y2, out in ((0, dt), (1, dt), (2, dt)):
            specs.append(AotSpec(_rnn_colsum_kernel, {"x_ptr": "*fp32", "x2_ptr": "*fp32", "y_ptr": f"*{out}",
                                                      "y2_ptr": f"*{out}", "M": "i32", "N": "i32",
                                                      "stride_xm": "i32", "stride_x2m": "i32", "CHUNK": "i32",
                                                      "Y2": "constexpr", "BLOCK_M": "constexpr",
                                                      "BLOCK_N": "constexpr"},
                                 {"Y2": y2, "BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4,
                                 label=f"colsum {out} y2 {y2}"))
        for dot in step_dots(dt):
            specs += _step_specs(dt, dot)
            specs += _proj_specs(dt, dot)
    return specs


def _step_specs(dt, dot):
    """The persistent forward and the step kernels of one io dtype and dot code, the step kernels
    in every configuration ``step_configs`` lists for their pass and mode."""
    specs = []
    for mode, code in MODE_CODES.items():
        for out_dt in sorted({dt, "fp32"}):
            for has_bhh in ((False, True) if mode == "gru" else (False,)):
                specs.append(_persist_spec(code, dt, out_dt, has_bhh, dot))
                specs.append(_pair_spec(_rnn_persist2_fwd_kernel, specs[-1]))
                if dot != DOT_CODES["fp32"]:  # resident weights: the least and the most KP (see RESIDENT_MAX_KP)
                    specs.append(_persist_spec(code, dt, out_dt, has_bhh, dot, 16))
                    specs.append(_persist_spec(code, dt, out_dt, has_bhh, dot, RESIDENT_MAX_KP))
                    specs.append(_pair_spec(_rnn_persist2_fwd_kernel, specs[-1]))
                for cfg in step_configs(mode, dot, False):
                    specs.append(step_fwd_spec(mode, dt, out_dt, has_bhh, False, dot, cfg))
                    specs.append(_pair_spec(_rnn_step2_fwd_kernel, specs[-1]))
        for dout_dt in sorted({dt, "fp32"}):
            specs.append(_persist_bwd_spec(mode, dt, dout_dt, dot))
            specs.append(_pair_spec(_rnn_persist2_bwd_kernel, specs[-1]))
            if dot != DOT_CODES["fp32"]:  # resident weights, as the forward's
                specs.append(_persist_bwd_spec(mode, dt, dout_dt, dot, 16))
                specs.append(_persist_bwd_spec(mode, dt, dout_dt, dot, RESIDENT_MAX_KP))
                specs.append(_pair_spec(_rnn_persist2_bwd_kernel, specs[-1]))
            for has_next, final in ((False, False), (True, False), (True, True)):
                if final and dout_dt != "fp32":
                    continue
                # the final step (dh0 only) gets no output gradient and no lengths: both
                # come as the float32 carry (dummy pointers, never read); the pair's final step
                # gets the lengths (int64, never read either)
                for cfg in step_configs(mode, dot, True):
                    specs.append(step_bwd_spec(mode, dt, dout_dt, "fp32" if final else "i64", has_next, final, dot,
                                               cfg))
                    if has_next or not final:
                        specs.append(_pair_spec(_rnn_step2_bwd_kernel,
                                                step_bwd_spec(mode, dt, dout_dt, "i64", has_next, final, dot, cfg)))
        # the cells (gpu_nn.ops.rnn._gpu_cell_forward / _backward) launch these very kernels:
        # t = -1 and an int64 dummy for the lengths (_no_lengths), h' and its gradient in the io
        # dtype, a middle backward step
    return specs


def _pair_spec(kernel, single: AotSpec) -> AotSpec:
    """The AotSpec of a two-direction kernel (``_rnn_step2_fwd_kernel``, ``_rnn_step2_bwd_kernel``,
    ``_rnn_persist2_fwd_kernel``, ``_rnn_persist2_bwd_kernel``, ``_rnn_matmul2_kernel``) for the
    launch whose one-direction form is ``single``: an argument the single kernel has keeps its
    type, each other ``x1_ptr`` (the second direction's) takes the type of ``x_ptr``, ``t1`` that
    of ``t``, an argument of the pair's own (``has_dc``) is i32; the constexprs and launch options
    are the single kernel's, less those the pair fixes (PROJ)."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in single.signature:  # the first direction's own (bias1_ptr too)
            sig[name] = single.signature[name]
            continue
        base = name[:-5] + "_ptr" if name.endswith("1_ptr") else ("t" if name == "t1" else name)
        sig[name] = single.signature.get(base, "i32")
    cons = {k: v for k, v in single.constexprs.items() if k in sig}
    return AotSpec(kernel, sig, cons, num_warps=single.num_warps, num_stages=single.num_stages,
                   label="pair " + single.label)


def step_bwd_spec(mode, dt, dout_dt, len_dt, has_next, final, dot, cfg):
    """The AotSpec of one ``_rnn_step_bwd_kernel`` launch: io dtype ``dt`` (the weights'),
    output gradient ``dout_dt``, lengths ``len_dt`` ("i64"; "fp32" for the final step, which
    gets the carry, never read), configuration ``cfg`` (a ``step_blocks`` tuple)."""
    bb, bh, bk, warps, stages = cfg
    sig = {"dgn_ptr": "*fp32", "stride_dgn": "i32", "w_ptr": f"*{dt}", "stride_w0": "i32",
           "stride_w1": "i32", "carry_ptr": "*fp32", "has_carry": "i32", "dc_ptr": "*fp32", "dcin_ptr": "*fp32",
           "has_dcin": "i32", "dout_ptr": f"*{dout_dt}", "stride_dout": "i32", "g_ptr": "*fp32", "stride_g": "i32",
           "hp_ptr": "*fp32", "hn_ptr": "*fp32", "cp_ptr": "*fp32", "cn_ptr": "*fp32", "dgi_ptr": "*fp32",
           "dgh_ptr": "*fp32", "stride_dg": "i32", "dh0_ptr": "*fp32",
           "len_ptr": f"*{len_dt}", "t": "i32", "B": "i32", "H": "i32"}
    for k in ("MODE", "HAS_NEXT", "FINAL", "DOT_DT", "BLOCK_B", "BLOCK_H", "BLOCK_K"):
        sig[k] = "constexpr"
    cons = {"MODE": MODE_CODES[mode], "HAS_NEXT": has_next, "FINAL": final, "DOT_DT": dot,
            "BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}
    label = (f"step bwd {mode} {dt} dot{dot} dout {dout_dt} len {len_dt} next{int(has_next)} final{int(final)} "
             f"{bb}x{bh}x{bk} w{warps} s{stages}")
    return AotSpec(_rnn_step_bwd_kernel, sig, cons, num_warps=warps, num_stages=stages, label=label)


def step_fwd_spec(mode, dt, out_dt, has_bhh, proj, dot, cfg):
    """The AotSpec of one ``_rnn_step_fwd_kernel`` launch: io dtype ``dt`` (the weights'), output
    ``out_dt``, configuration ``cfg`` (a ``step_blocks`` tuple); lengths int64 (the cells pass
    ``_no_lengths``)."""
    bb, bh, bk, warps, stages = cfg
    sig = {"xg_ptr": "*fp32", "stride_xg": "i32", "hp_ptr": "*fp32", "hn_ptr": "*fp32",
           "cp_ptr": "*fp32", "cn_ptr": "*fp32", "w_ptr": f"*{dt}", "stride_w0": "i32",
           "stride_w1": "i32", "bhh_ptr": f"*{dt}", "out_ptr": f"*{out_dt}", "stride_out": "i32",
           "mask_ptr": f"*{dt}", "stride_mask": "i32", "has_mask": "i32",
           "len_ptr": "*i64", "t": "i32", "B": "i32", "H": "i32", "P": "i32"}
    for k in ("MODE", "HAS_BHH", "PROJ", "DOT_DT", "BLOCK_B", "BLOCK_H", "BLOCK_K"):
        sig[k] = "constexpr"
    cons = {"MODE": MODE_CODES[mode], "HAS_BHH": has_bhh, "PROJ": proj, "DOT_DT": dot,
            "BLOCK_B": bb, "BLOCK_H": bh, "BLOCK_K": bk}
    label = (f"step fwd {mode} {dt} dot{dot} out {out_dt} bhh{int(has_bhh)} proj{int(proj)} "
             f"{bb}x{bh}x{bk} w{warps} s{stages}")
    return AotSpec(_rnn_step_fwd_kernel, sig, cons, num_warps=warps, num_stages=stages, label=label)


def _proj_specs(dt, dot):
    """The LSTM projection: the step forward with PROJ (its output is the float32 m slot, passed
    as out too), the projection forward (output in the io dtype or float32; the dropout mask a
    runtime flag), the projection backward (first / middle / final step, output
    gradient in the io dtype or float32; the final step's dout and lengths are the carry)."""
    bb, bp, bk, warps = proj_blocks(1, 1)
    specs = [step_fwd_spec("lstm", dt, "fp32", False, True, dot, cfg) for cfg in step_configs("lstm", dot, False)]
    for out_dt in sorted({dt, "fp32"}):
        sig = {"m_ptr": "*fp32", "w_ptr": f"*{dt}", "stride_w0": "i32", "stride_w1": "i32", "hp_ptr": "*fp32",
               "hn_ptr": "*fp32", "out_ptr": f"*{out_dt}", "stride_out": "i32",
               "mask_ptr": f"*{dt}", "stride_mask": "i32", "has_mask": "i32", "len_ptr": "*i64",
               "t": "i32", "B": "i32", "H": "i32", "P": "i32"}
        for k in ("DOT_DT", "BLOCK_B", "BLOCK_P", "BLOCK_K"):
            sig[k] = "constexpr"
        cons = {"DOT_DT": dot, "BLOCK_B": bb, "BLOCK_P": bp, "BLOCK_K": bk}
        specs.append(AotSpec(_rnn_proj_fwd_kernel, sig, cons, num_warps=warps,
                             label=f"proj fwd {dt} dot{dot} out {out_dt} B{bb}"))
    for dout_dt in sorted({dt, "fp32"}):
        for has_next, final in ((False, False), (True, False), (True, True)):
            if final and dout_dt != "fp32":
                continue
            sig = {"dgn_ptr": "*fp32", "stride_dgn": "i32", "w_ptr": f"*{dt}", "stride_w0": "i32",
                   "stride_w1": "i32", "carry_ptr": "*fp32", "dout_ptr": f"*{dout_dt}", "stride_dout": "i32",
                   "dh_ptr": "*fp32", "len_ptr": "*fp32" if final else "*i64", "t": "i32", "B": "i32", "P": "i32",
                   "GH": "i32"}
            for k in ("HAS_NEXT", "FINAL", "DOT_DT", "BLOCK_B", "BLOCK_P", "BLOCK_K"):
                sig[k] = "constexpr"
            cons = {"HAS_NEXT": has_next, "FINAL": final, "DOT_DT": dot, "BLOCK_B": bb, "BLOCK_P": bp,
                    "BLOCK_K": bk}
            label = f"proj bwd {dt} dot{dot} dout {dout_dt} B{bb} next{int(has_next)} final{int(final)}"
            specs.append(AotSpec(_rnn_proj_bwd_kernel, sig, cons, num_warps=warps, label=label))
    return specs
