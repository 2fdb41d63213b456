"""Triton kernels for the dense family: a tiled matmul (linear forward with fused bias and
activation epilogue, and both backward products), column sums (bias gradient), softmax /
log_softmax forward and backward over the last dim, and a fused cross_entropy.

All kernels accumulate in float32 and store in the output's dtype (float32, float16,
bfloat16). Row and element offsets are int64: logits of 32768 x 32000 already pass 2^31
elements. Launchers take contiguous row-major 2-D tensors except :func:`matmul`, which takes
any strides (so transposes are views, never copies).
"""

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import INTERPRET as _INTERPRETED
from . import _tune
from ._aot import AotSpec
from ._compat import parallel_compile
from ._launch import cdiv, next_power_of_2
from ._launch import launch as launch_kernel
from .activation import ACT_CODES, _act_grad, _epilogue_act, _grouped_tile
from .activation import act_backward as _act_backward
from .activation import act_forward as _act_forward

DTYPES = ("fp32", "fp16", "bf16")
_TL = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _tdt(t) -> str:
    return _TL[t.dtype]


# =========================================================================== matmul


@triton.jit(do_not_specialize=["has_bias", "act"])
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, has_bias, act,
                   PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """C[M, N] = act(A[M, K] @ B[K, N] + bias[N]) for any strides; float32 accumulation.

    Programs are ordered in groups of GROUP_M row-tiles so that neighbouring programs share
    B tiles in L2. ``PREC`` is the ``tl.dot`` input precision, chosen by the launcher
    ("ieee" unless TF32 is allowed; it only matters for float32 operands).

    The epilogue flags ``has_bias`` (0 / 1) and ``act`` (an ``ACT_CODES`` value) are run-time
    arguments, never specialised (not even the JIT's usual value-1 specialisation): they run once
    per output tile, so a branch costs nothing, and one compiled kernel per tile configuration
    serves all eight epilogues (the tuning candidates would otherwise multiply by eight in the
    ahead-of-time compile).
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # int64 before multiplying by a stride: M * K may exceed 2^31
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if has_bias != 0:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    acc = _epilogue_act(acc, act)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["has_bias", "act"])
def _matmul_tma_kernel(a_desc, b_desc, c_ptr, bias_ptr, M, N, K, stride_cm, has_bias, act,
                       A_KM: tl.constexpr, B_NK: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr):
    """C[M, N] = act(A[M, K] @ B[K, N] + bias[N]) as :func:`_matmul_kernel`, persistent, with A and
    B read through host-side tensor descriptors (TMA: the copy engine fills the shared-memory
    tiles, no address arithmetic or masks in the K loop; out-of-bounds rows and columns read as 0).

    The grid is at most one program per SM; program p computes output tiles p, p + P, p + 2 P, ...
    (P programs) in :func:`_grouped_tile`'s order, so one launch fills every SM once and the tiles
    of a wave share B tiles in L2 as in the non-persistent kernel. ``FLATTEN`` lets the software
    pipeliner fuse the tile loop with the K loop (the next tile's first loads are issued during
    this tile's last products and its epilogue).

    Layouts (a descriptor's last dimension is the contiguous one): ``A_KM`` False: ``a_desc``
    describes A [M, K] (row-major); True: A^T [K, M] (A column-major, the weight gradient's
    dY^T), its [BLOCK_K, BLOCK_M] tile transposed in the kernel. ``B_NK`` True: ``b_desc``
    describes B^T [N, K] (linear's forward reads the weight w [N, K] itself for B = w^T); False:
    B [K, N] row-major. The epilogue (run-time ``has_bias`` / ``act``, never specialised) and the
    store through plain pointers (int64 offsets, masked) are the non-persistent kernel's, in four
    column slices (a quarter of the store addresses live at a time), for C with unit column
    stride (``stride_cm`` its row stride; :func:`matmul` offers the kernel no other C): with a
    run-time column stride, or the whole tile stored at once, the 128x256 tile spilled in the
    specialisation where ``stride_cm`` is not a multiple of 16 (tests/test_compile.py).
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # the inner loop from 0 to a count that is never negative: Triton before 3.9 fuses a
        # flattened loop nest testing its inner trip count == 0, not <= 0, so an inner loop of
        # negative length (a run-time start past its end, a split-K range) ran once
        # (triton-lang/triton issues 11656 / 11735)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            if A_KM:
                a = a_desc.load([off_k, off_m]).T
            else:
                a = a_desc.load([off_m, off_k])
            if B_NK:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            acc = tl.dot(a, b, acc, input_precision=PREC)
        # the epilogue in column quarters: a quarter of the store addresses live at a time
        h0, h1 = _column_halves(acc, BLOCK_M, BLOCK_N)
        q0, q1 = _column_halves(h0, BLOCK_M, BLOCK_N // 2)
        q2, q3 = _column_halves(h1, BLOCK_M, BLOCK_N // 2)
        _store_tile(c_ptr, bias_ptr, q0, off_m, off_n, M, N, stride_cm, 1, has_bias, act, BLOCK_M, BLOCK_N // 4)
        _store_tile(c_ptr, bias_ptr, q1, off_m, off_n + BLOCK_N // 4, M, N, stride_cm, 1, has_bias, act, BLOCK_M,
                    BLOCK_N // 4)
        _store_tile(c_ptr, bias_ptr, q2, off_m, off_n + BLOCK_N // 2, M, N, stride_cm, 1, has_bias, act, BLOCK_M,
                    BLOCK_N // 4)
        _store_tile(c_ptr, bias_ptr, q3, off_m, off_n + 3 * (BLOCK_N // 4), M, N, stride_cm, 1, has_bias, act, BLOCK_M,
                    BLOCK_N // 4)


@triton.jit
def _column_halves(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x [BLOCK_M, BLOCK_N] as its left and right [BLOCK_M, BLOCK_N / 2] halves."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _store_tile(c_ptr, bias_ptr, acc, off_m, off_n, M, N, stride_cm, stride_cn, has_bias, act,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """C[off_m:, off_n:] = act(acc + bias) (masked to [M, N]): the matmul kernels' epilogue."""
    # int64 before multiplying by a stride: M * N may exceed 2^31
    offs_m = off_m + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = off_n + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < N
    if has_bias != 0:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    acc = _epilogue_act(acc, act)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) on sm_90, per operand kind: "half"
# (fp16 / bf16 on wgmma), "tf32" (fp32 on wgmma) and "ieee" (fp32 on FMA). The first of each list
# is the heuristic (the configuration used before tuning existed: 128x128 tiles keep the tensor
# cores fed; fp32 takes a shorter K step because its tiles are twice as large in shared memory);
# the others are the candidates timed on first use of a shape on a GPU: wide 128x256 / 256x128
# tiles (cuBLAS's choice for large bf16 GEMMs is a 256x128 tile), deeper pipelines with one
# warpgroup, and 64-row tiles that give small problems more programs. FMA fp32 has no wide
# tiles (its operands live in registers); it tries a shorter K step and half-size tiles instead.
# The spills test_compile.py records for these (KNOWN_SPILLS: up to 728 B for the half 256x128) are
# the forms with every stride a run-time value; Triton's JIT compiles a stride equal to 1 as the
# constant 1, and every layout linear launches has unit strides (forward: stride_ak = stride_bk
# = 1; input gradient: stride_ak = stride_bn = 1): compiled that way (2026-12-03, Triton 3.9 and
# 3.6, sm_90) every candidate software-pipelines its loads (98-147 KiB of shared memory, where the
# generic half forms get 24-64 KiB: one stage) in 110-205 registers (tf32 / half) without a spill.
_MATMUL_CANDIDATES = {
    "half": ((128, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4)),
    "tf32": ((128, 128, 32, 8, 8, 3), (128, 256, 32, 8, 8, 3), (128, 128, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4)),
    "ieee": ((128, 128, 32, 8, 8, 3), (128, 128, 16, 8, 8, 4), (64, 128, 32, 8, 4, 3), (128, 64, 32, 8, 4, 3)),
}
_MATMUL_INTERP = (32, 32, 16, 4, 4, 1)

# The persistent TMA kernel's configurations (_matmul_tma_kernel) per operand kind: the same six
# numbers and a "tma" tag (a tuning choice is stored and compared as the whole tuple). Only where
# :func:`tma_eligible` holds do they join the candidates, after the pointer kernel's (whose first
# stays the heuristic). One per kind, because each is compiled ahead of time for each of linear's
# three layouts (5-7 s apiece on the test machine's CPU, cold; tests/test_compile.py):
# bf16, the tile that won the pointer kernel's tuning of every bf16 GEMM of linear at
# 8192x4096x4096 on the H200 (2026-11-30), 128x256 with two warpgroups (one m64n256 wgmma each)
# and three stages of 64-deep K tiles (144 KiB, plus the flattened loop's epilogue buffer: 160
# KiB with Triton 3.9 and the epilogue in column quarters, 176 KiB storing the whole tile), and
# float16 the same (one wgmma shape for both 16-bit types); tf32, the pointer kernel's heuristic
# 128x128x32 (128x256x32 needs 272 KiB of shared memory).
TMA = "tma"
_MATMUL_TMA_CANDIDATES = {
    "bf16": ((128, 256, 64, 8, 8, 3, TMA),),
    "fp16": ((128, 256, 64, 8, 8, 3, TMA),),
    "tf32": ((128, 128, 32, 8, 8, 3, TMA),),
}
# the small configuration the interpreter tests run the TMA kernel in
_MATMUL_TMA_INTERP = (32, 32, 16, 4, 4, 1, TMA)
# tl.dot needs every tile side >= 16 on NVIDIA GPUs; the interpreter would not notice
assert all(min(c[:3]) >= 16 for cands in (*_MATMUL_CANDIDATES.values(), *_MATMUL_TMA_CANDIDATES.values())
           for c in (*cands, _MATMUL_INTERP, _MATMUL_TMA_INTERP))


def _operand_kind(dt: str, prec: str) -> str:
    return "half" if dt in ("fp16", "bf16") else prec


def matmul_candidates(dt: str, prec: str) -> tuple:
    """Every configuration :func:`matmul` may launch on a GPU for operand dtype ``dt`` and dot
    precision ``prec``; the first is the heuristic."""
    return _MATMUL_CANDIDATES[_operand_kind(dt, prec)]


def matmul_tma_candidates(dt: str, prec: str) -> tuple:
    """The persistent TMA kernel's configurations for operand dtype ``dt`` and precision ``prec``
    (none for full-precision float32, which stays on FMA in the pointer kernel)."""
    return _MATMUL_TMA_CANDIDATES.get(prec if dt == "fp32" else dt, ())


def tuning_candidates(dt: str, prec: str, tma: bool) -> tuple:
    """What the tuning times for one call: :func:`matmul_candidates` (the heuristic first), then,
    where the call is :func:`tma_eligible`, :func:`matmul_tma_candidates`."""
    return matmul_candidates(dt, prec) + (matmul_tma_candidates(dt, prec) if tma else ())


def matmul_config(dt: str, interpret: bool, prec: str = "ieee") -> tuple:
    """The heuristic (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). Under the
    interpreter one small fixed config (fewer Python-level programs per test, still >= 16 on
    every side)."""
    return _MATMUL_INTERP if interpret else matmul_candidates(dt, prec)[0]


def dot_precision(dt: str, allow_tf32: bool) -> str:
    return "tf32" if (dt == "fp32" and allow_tf32) else "ieee"


# A float32 product in full precision (no TF32: FFMA, not the tensor cores) with a column-major B
# (linear's forward, x @ w.t()) ran at half the speed of the same product with B row-major on the
# H200 (2026-11-30, 82f8513, every tuning candidate, 8192x4096x4096: 12.5-13.5 ms against
# 6.3-6.9 ms), while bfloat16 showed no such gap (0.41 against 0.42 ms). So from this many rows of
# A on, B is first copied row-major: 2*K*N*4 bytes (about 30 us for 4096x4096 at the H200's copy
# rate) against half of 2*M*N*K FFMA flops (at about 50 TFLOP/s the copy pays for itself from
# M of about 115 on; 256 leaves a margin and keeps small calls to one launch).
ROW_MAJOR_B_MIN_M = 256


def b_operand(b, M: int, dt: str, prec: str, interpret: bool):
    """B as the kernel should read it: a row-major copy for a full-precision float32 product
    of at least ROW_MAJOR_B_MIN_M rows whose B is column-major, else B itself."""
    if not interpret and prec == "ieee" and dt == "fp32" and M >= ROW_MAJOR_B_MIN_M and _layout(b) == "c":
        return b.contiguous()
    return b


def _layout(t) -> str:
    """'r' row-major (unit column stride), 'c' column-major, 'g' general: part of the tuning key,
    since which operand dimension is contiguous decides the load vectorisation."""
    s0, s1 = t.stride()
    return "r" if s1 == 1 else ("c" if s0 == 1 else "g")


# The TMA kernel applies from this many output tiles of 128x128 on (times the SM count): below
# one full wave every program of a persistent grid gets at most one tile, so persistence buys
# nothing there, and the pointer kernel's 64-row candidates give such problems more programs;
# and only from this many K steps of 64 (8) do three pipeline stages reach a steady state. Both
# keep the two extra compilations and timings of the first call of a key to GEMMs of tens of
# microseconds and more (132 tiles x 512 deep is 2.2 GFLOP, ~4 us at the H200's bf16 rate).
TMA_MIN_WAVES = 1
TMA_MIN_K = 512
# tl.range(flatten=...) of the persistent tile loop (see _matmul_tma_kernel)
TMA_FLATTEN = True


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _tma_operand(t, transposed: bool):
    """Whether t [R, C] can be described for TMA as itself (``transposed`` False: row-major, unit
    column stride) or as its transpose [C, R] (True: unit row stride): 16-byte aligned base, and
    the described tensor's row stride a multiple of 16 bytes and at least its row length (rows
    that overlap, such as a broadcast operand's stride 0, are left to the pointer kernel)."""
    s0, s1 = t.stride()
    row, unit = (s1, s0) if transposed else (s0, s1)
    length = t.shape[0] if transposed else t.shape[1]
    es = t.element_size()
    return unit == 1 and row >= length and (row * es) % 16 == 0 and t.data_ptr() % 16 == 0


def _tma_layouts(a, b):
    """(A_KM, B_NK) of :func:`_matmul_tma_kernel` for a @ b by layout and alignment alone, or
    None. Only linear's three layouts, each compiled ahead of time: A row-major with B
    column-major (x @ w.t()) or row-major (dY @ W), and A column-major with B row-major
    (dY.t() @ X); the first that fits, in that order."""
    for a_km, b_nk in ((False, True), (False, False), (True, False)):
        if _tma_operand(a, a_km) and _tma_operand(b, b_nk):
            return a_km, b_nk
    return None


def tma_layout(a, b, dt: str, prec: str, sm_count: int):
    """:func:`_tma_layouts`, or None also where the TMA kernel does not apply by dtype /
    precision (:func:`matmul_tma_candidates`) or size (TMA_MIN_WAVES waves of ``sm_count``
    128x128 tiles, TMA_MIN_K). Device-independent: :func:`tma_eligible` adds the device checks."""
    if not matmul_tma_candidates(dt, prec):
        return None
    M, K = a.shape
    N = b.shape[1]
    if K < TMA_MIN_K or cdiv(M, 128) * cdiv(N, 128) < TMA_MIN_WAVES * sm_count:
        return None
    return _tma_layouts(a, b)


def tma_output(c) -> bool:
    """Whether the TMA kernel may store into c: unit column stride, and base and row stride
    multiples of 16 (bytes and elements: Triton's divisibility specialisation, which the kernel's
    ahead-of-time specs assume; without it the 128x256 tile spilled up to 500 bytes per thread in
    the epilogue). :func:`matmul`'s outputs are fresh contiguous tensors, so this excludes N not a
    multiple of 16."""
    return c.stride(1) == 1 and c.stride(0) % 16 == 0 and c.data_ptr() % 16 == 0


def _device_index(t) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def tma_eligible(a, b, dt: str, prec: str, interpret: bool) -> bool:
    """Whether the TMA candidates may be timed (and a cached TMA choice launched) for this call:
    compiled kernels (never the interpreter), a CUDA device of compute capability >= 9 (TMA and
    wgmma), and :func:`tma_layout`."""
    if interpret or _INTERPRETED or a.device.type != "cuda":
        return False
    idx = _device_index(a)
    return _has_tma(idx) and tma_layout(a, b, dt, prec, _sm_count(idx)) is not None


def _tma_args(a, b, c, bias, act, bm, bn, bk):
    """The runtime arguments of :func:`_matmul_tma_kernel` and its (A_KM, B_NK)."""
    M, K = a.shape
    N = b.shape[1]
    a_km, b_nk = _tma_layouts(a, b)  # the caller checked that there is one
    if a_km:
        a_desc = TensorDescriptor(a, [K, M], [a.stride(1), 1], [bk, bm])
    else:
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [bm, bk])
    if b_nk:
        b_desc = TensorDescriptor(b, [N, K], [b.stride(1), 1], [bn, bk])
    else:
        b_desc = TensorDescriptor(b, [K, N], [b.stride(0), 1], [bk, bn])
    assert tma_output(c), "the TMA kernel stores C with unit column stride, 16-aligned rows"
    args = (a_desc, b_desc, c, bias if bias is not None else c, M, N, K, c.stride(0),
            1 if bias is not None else 0, act)
    return args, a_km, b_nk


def _launch_matmul_tma(a, b, c, bias, act, prec, cfg, programs=None) -> None:
    """One launch of :func:`_matmul_tma_kernel` through the JIT (``kernel[grid]``, not the cached
    launch plans of ``_launch``: the GEMMs it serves take hundreds of microseconds, and the plan
    key was verified for pointer arguments only). ``programs``: the persistent grid's size
    (default: one per SM, at most one per tile; tests pass a few to run several tiles per program
    under the interpreter)."""
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk, gm, warps, stages, _ = cfg
    args, a_km, b_nk = _tma_args(a, b, c, bias, act, bm, bn, bk)
    if programs is None:  # CPU tensors: the interpreter (tests, the sweep's CPU check), a few programs
        programs = _sm_count(_device_index(a)) if a.device.type == "cuda" else 3
    grid = (max(1, min(programs, cdiv(M, bm) * cdiv(N, bn))),)
    _matmul_tma_kernel[grid](*args, A_KM=a_km, B_NK=b_nk, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             GROUP_M=gm, FLATTEN=TMA_FLATTEN, num_warps=warps, num_stages=stages)


def _launch_matmul(a, b, c, bias, act, prec, cfg) -> None:
    if len(cfg) == 7:
        _launch_matmul_tma(a, b, c, bias, act, prec, cfg)
        return
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk, gm, warps, stages = cfg
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    launch_kernel(_matmul_kernel, grid,
        a, b, c, bias if bias is not None else c, M, N, K,
        *a.stride(), *b.stride(), *c.stride(),  # one call per tensor: a, b, c are 2-D
        1 if bias is not None else 0, act,
        PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages,
    )


def _compile_candidates(a, b, c, bias, act, prec, cands) -> None:
    """Compile every candidate for this call's specialisation at once, in threads, before they are
    timed (``prepare`` of the tuning): Triton's AsyncCompileMode (Triton >= 3.4) runs the compiles
    in an executor, and ptxas runs as a separate process, so four candidates cost about one
    compile instead of four on the first call of a shape. Where that mode is missing nothing
    happens here and each candidate compiles in its warm-up launch, as before."""
    if _INTERPRETED or len(cands) < 2:
        return
    M, K = a.shape
    N = b.shape[1]
    args = (a, b, c, bias if bias is not None else c, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), 1 if bias is not None else 0, act)
    with parallel_compile(len(cands)) as available:
        for cfg in (cands if available else ()):
            bm, bn, bk, gm, warps, stages = cfg[:6]
            if len(cfg) == 7:
                targs, a_km, b_nk = _tma_args(a, b, c, bias, act, bm, bn, bk)
                _matmul_tma_kernel.warmup(*targs, A_KM=a_km, B_NK=b_nk, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                          GROUP_M=gm, FLATTEN=TMA_FLATTEN, num_warps=warps, num_stages=stages,
                                          grid=(1,))
            else:
                _matmul_kernel.warmup(*args, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
                                      num_warps=warps, num_stages=stages, grid=(1,))


def matmul(a, b, c, bias=None, activation=None, allow_tf32=False, interpret=False) -> None:
    """c[M, N] = act(a[M, K] @ b[K, N] + bias[N]); a, b, c any strides, a and b of one dtype, c
    of theirs or float32 (:func:`_matmul_blocks`' partial sums); bias contiguous [N] or None; c
    must not overlap a, b or bias.

    On a GPU the configuration is measured on first use of a (M, N, K, layouts of a / b / c,
    dtypes, bias, activation, precision, TMA eligibility) on the device (``gpu_nn._tuning``: every
    :func:`tuning_candidates` entry timed on these very buffers, the fastest cached in memory and
    on disk; the persistent TMA kernel's among them where :func:`tma_eligible`); the heuristic
    serves CPU tensors, the interpreter, ``GPU_NN_TUNE=0`` and CUDA graph capture.
    """
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return
    if M > MATMUL_MAX_DIM or N > MATMUL_MAX_DIM or K > MATMUL_MAX_DIM:
        _matmul_blocks(a, b, c, bias, activation, allow_tf32, interpret)
        return
    dt = _tdt(a)
    prec = dot_precision(dt, allow_tf32)
    b = b_operand(b, M, dt, prec, interpret)
    act = ACT_CODES[activation]
    cfg = matmul_config(dt, interpret, prec)
    if not interpret:
        # tma: whether the TMA candidates apply (alignment included), so that a cached TMA
        # choice is only ever served to calls that can run it
        tma = tma_output(c) and tma_eligible(a, b, dt, prec, interpret)
        key = tuning_key(a, b, c, bias, act, dt, prec, tma)
        cfg = _tune.choose("matmul", key, tuning_candidates(dt, prec, tma),
                           lambda cand: _launch_matmul(a, b, c, bias, act, prec, cand), cfg, a.device,
                           prepare=lambda cands: _compile_candidates(a, b, c, bias, act, prec, cands))
    _launch_matmul(a, b, c, bias, act, prec, cfg)


def tuning_key(a, b, c, bias, act: int, dt: str, prec: str, tma: bool) -> tuple:
    """What names a matmul problem for the measured choice: sizes, each operand's layout and
    strides, the dtypes (c's too: _matmul_blocks sums half-precision products into a float32 c),
    bias, activation, precision, TMA eligibility, and whether every pointer is 16-byte aligned.
    The strides and the alignment are what Triton's JIT specialises the compiled kernel on (a
    stride equal to 1 or a multiple of 16, an aligned pointer: the load widths), so a sliced view
    (a leading stride not the row length, an offset start) is timed on its own compiled form,
    not served the choice made for the dense tensor's."""
    M, K = a.shape
    N = b.shape[1]
    aligned = all(t.data_ptr() % 16 == 0 for t in (a, b, c, *(() if bias is None else (bias,))))
    return (M, N, K, _layout(a) + _layout(b) + _layout(c), dt, _tdt(c), bias is not None, act, prec,
            tuple(a.stride()), tuple(b.stride()), tuple(c.stride()), aligned, tma)


# The most rows, columns or inner length one matmul launch takes. The kernels number rows and
# columns in int32 (pid * BLOCK, the TMA coordinates) and the pointer kernel's inner loop steps an
# int32 K by BLOCK_K, which wraps from K = 2^31 - BLOCK_K on; 2^30 leaves every such sum in range.
MATMUL_MAX_DIM = 2**30


def _matmul_blocks(a, b, c, bias, activation, allow_tf32, interpret) -> None:
    """:func:`matmul` past MATMUL_MAX_DIM: rows and columns in blocks of at most that many (views
    of a, b, c and the bias, one launch each: output entries are independent), an inner length
    past it in blocks whose float32 products are summed before the bias, the activation and the
    rounding to c's dtype, once on the total (a linear layer's weight gradient over more than
    2^30 rows). A rare path: the sums there are torch's elementwise ops, the activation the
    activation kernel."""
    L = MATMUL_MAX_DIM
    M, K = a.shape
    N = b.shape[1]
    if M > L or N > L:
        for r0 in range(0, M, L):
            for c0 in range(0, N, L):
                matmul(a[r0:r0 + L], b[:, c0:c0 + L], c[r0:r0 + L, c0:c0 + L],
                       None if bias is None else bias[c0:c0 + L], activation, allow_tf32, interpret)
        return
    total = torch.zeros((M, N), dtype=torch.float32, device=c.device)
    part = torch.empty((M, N), dtype=torch.float32, device=c.device)
    for k0 in range(0, K, L):
        matmul(a[:, k0:k0 + L], b[k0:k0 + L], part, allow_tf32=allow_tf32, interpret=interpret)
        total += part
    if bias is not None:
        total += bias.float()
    if activation is not None:
        _act_forward(total, total, activation, interpret)  # (elementwise: in place)
    c.copy_(total)


def act_grad(g, y, activation, interpret):
    """dY' = dY through the activation (written through the forward output y); contiguous."""
    out = torch.empty_like(g)
    _act_backward(g, y, out, activation, interpret)
    return out


# =========================================================================== column sums


@triton.jit
def _colsum_kernel(g_ptr, out_ptr, M, N, stride_gm, stride_gn, CHUNK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[s, n] = sum of g[m, n] over the rows m of split s = program_id(1), [s * CHUNK,
    min(M, (s + 1) * CHUNK)), float32 accumulation; ``out`` [splits, N] contiguous. One split
    (CHUNK >= M) is the bias gradient itself; several write float32 partial sums, which a second
    launch over them (splits rows) adds up (:func:`colsum`)."""
    pid = tl.program_id(0).to(tl.int64)  # int64: a bias of 2^31 - 1 outputs (a linear's) numbers past it
    split = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    m_lo = split.to(tl.int64) * CHUNK  # int64: the last split's end passes 2^31 - 1 for M just below it
    m_hi = tl.minimum(m_lo + CHUNK, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=(offs_m[:, None] < m_hi) & mask_n[None, :], other=0.0)
        acc += g.to(tl.float32)
    tl.store(out_ptr + split.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _act_colsum_kernel(g_ptr, y_ptr, dg_ptr, out_ptr, R, M, N, stride_b, stride_m, stride_n, ACT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dg = g through the activation (written through its output y) and out[n] = the sum of dg
    over b and m, in one pass over [B, M, N] tensors that share one layout (``stride_*``): the
    fused activation's gradient and the bias gradient of a linear layer ([1, rows, features]) or
    a convolution ([N, H*W, C] of an NCHW tensor, [1, N*H*W, C] of a channels_last one). The
    R = B * M rows are walked as one flat range, BLOCK_M at a time (b and m per row), so a small
    H*W costs no partly filled tiles. For a linear layer the sum is _colsum_kernel's, over the
    same rounded dg values in the same order: bitwise the two kernels' result."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # int32 offsets: act_colsum_fits keeps tensors below 2^31
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        b = r // M
        offs = (b * stride_b + (r - b * M) * stride_m)[:, None] + offs_n[None, :] * stride_n
        mask = (r[:, None] < R) & mask_n[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dg = _act_grad(g, y, ACT).to(dg_ptr.dtype.element_ty)
        tl.store(dg_ptr + offs, dg, mask=mask)
        acc += dg.to(tl.float32)
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n)


_COLSUM = (64, 64, 4)  # BLOCK_M, BLOCK_N, num_warps
# the activation's gradient and the bias gradient in one launch up to this many rows (B * M):
# each of its cdiv(N, 64) programs walks all rows in tiles of 64, one after another, so this
# keeps that walk to 4 tiles (a small batch's linear layer, a tiny convolution); more rows keep
# the full-grid activation kernel and the sum apart (chosen, not measured: the GPU runs are to
# say where the two cross)
ACT_COLSUM_MAX_ROWS = 256


# The column sum's rows are split among programs when its columns alone give fewer than this
# many (cdiv(N, 64)): at 09f2311's predecessor a331102 the H200 profiled linear's bias gradient
# (8192 x 4096 bfloat16, 64 MB) at 182 us in 64 programs walking all 8192 rows each, torch's
# reduction at 32 us (float32: 234 against 49). Four waves of an H200's 132 SMs; every split
# walks at least COLSUM_MIN_ROWS rows (its partial sums are N float32 more to write and read).
COLSUM_TARGET_PROGRAMS = 528
COLSUM_MIN_ROWS = 256


def colsum_splits(m: int, n: int, block_n: int = _COLSUM[1]) -> int:
    """How many row ranges a column sum of [m, n] is split into: 1 (one launch, as small
    problems always are) up to what fills COLSUM_TARGET_PROGRAMS programs with ranges of at least
    COLSUM_MIN_ROWS rows. A function of the shape alone: the same on every device and under
    the interpreter (which thus runs the split path on the tests' larger inputs)."""
    return max(1, min(cdiv(COLSUM_TARGET_PROGRAMS, cdiv(n, block_n)), m // COLSUM_MIN_ROWS))


def colsum_ranges(m: int, n: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(splits, rows per split) of a column sum of [m, n] walked ``block_m`` rows at a time:
    :func:`colsum_splits` ranges of whole row tiles, none of them empty; (1, m) (at least 1:
    the kernel's CHUNK) for one launch. The dense and the recurrent column sums both launch so."""
    splits = colsum_splits(m, n, block_n)
    if splits == 1:
        return 1, max(m, 1)
    chunk = cdiv(cdiv(m, splits), block_m) * block_m
    return cdiv(m, chunk), chunk


def colsum(g, out, interpret=False) -> None:
    """out[n] = g[:, n].sum() for a 2-d ``g`` (any strides), float32 accumulation: one launch,
    or (:func:`colsum_splits`) float32 partial sums of row ranges, then their sum."""
    M, N = g.shape
    if N == 0:
        return
    bm, bn, warps = _COLSUM
    splits, chunk = colsum_ranges(M, N, bm, bn)
    if splits == 1:
        launch_kernel(_colsum_kernel, (cdiv(N, bn), 1), g, out, M, N, g.stride(0), g.stride(1), chunk,
                      BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
        return
    ws = torch.empty((splits, N), dtype=torch.float32, device=g.device)
    launch_kernel(_colsum_kernel, (cdiv(N, bn), splits), g, ws, M, N, g.stride(0), g.stride(1), chunk,
                  BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    launch_kernel(_colsum_kernel, (cdiv(N, bn), 1), ws, out, splits, N, N, 1, splits,
                  BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)


def act_colsum_fits(rows: int, cols: int) -> bool:
    """Whether :func:`act_colsum_into` takes ``rows`` x ``cols`` in one launch: at most
    ACT_COLSUM_MAX_ROWS rows, and fewer than 2^31 elements (the kernel's offsets are int32)."""
    return 0 < cols and rows <= ACT_COLSUM_MAX_ROWS and rows * cols < 1 << 31


def act_colsum_into(g, y, dg, db, activation, B, M, N, stride_b, stride_m, stride_n) -> None:
    """dg = g through the activation, db = its sums per column n, one launch: ``g``, ``y`` and
    ``dg`` [B, M, N] views through the same strides (see _act_colsum_kernel)."""
    bm, bn, warps = _COLSUM
    launch_kernel(_act_colsum_kernel, (cdiv(N, bn),), g, y, dg, db, B * M, M, N, stride_b, stride_m, stride_n,
                  ACT=ACT_CODES[activation], BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)


def act_colsum(g, y, activation, db, interpret=False):
    """(dY', with db = its column sums written): dY' = dY through the activation for contiguous
    [M, N] ``g`` and ``y``; one launch where :func:`act_colsum_fits`, else act_grad then colsum."""
    M, N = g.shape
    if not act_colsum_fits(M, N):
        dg = act_grad(g, y, activation, interpret)
        colsum(dg, db, interpret)
        return dg
    dg = torch.empty_like(g)
    act_colsum_into(g, y, dg, db, activation, 1, M, N, 0, N, 1)
    return dg


# =========================================================================== softmax


@triton.jit
def _online_exp_sum(m_vec, s_vec, x):
    """One step of the per-lane online log-sum-exp: the running max ``m_vec`` and the sum
    ``s_vec`` of exp(x - m_vec) so far, taken to ``x`` -> (new max, new sum), elementwise (any
    tile shape). ONE exp per element: of the two factors of ``s exp(m - m') + exp(x - m')``
    (m' = max(m, x)) one is exp(0), so it is ``s e + 1`` where x raised the max, else ``s + e``,
    with e = exp(-|x - m|), written as one multiply-add of two selects (``s * e + 1`` and
    ``s + e`` as two live values spilled 8 bytes in five of the cross-entropy middle-dim forms).
    The two-exp form took twice the special-function work, which on the H200 bounded the
    cross-entropy forward's pass before it went to one exp (``_ce_fwd_kernel``).

    NaN reaches the sum (``tl.maximum`` drops it by default: fmaxf; NaN > m is false, and
    s + exp(NaN) is NaN); a lane that has seen only -inf keeps sum 0 (exp(-inf - -inf) would
    be NaN). A lane's first +inf leaves it a finite sum where the two-exp form had NaN (a second
    gives NaN, inf - inf): the combination of the lanes (``s exp(m_lane - m)``, m = +inf) makes
    the row NaN all the same, as torch's."""
    m_new = tl.maximum(m_vec, x, propagate_nan=tl.PropagateNan.ALL)
    d = x - m_vec
    e = tl.exp(-tl.abs(d))
    hi = d > 0
    s_new = tl.where(m_new == float("-inf"), 0.0, s_vec * tl.where(hi, e, 1.0) + tl.where(hi, 1.0, e))
    return m_new, s_new


@triton.jit
def _row_stats(x_ptr, base, n_cols, BLOCK: tl.constexpr):
    """(m, log_s, s) of one row, m = max(x), s = sum(exp(x - m)), log_s = log(s), online over blocks:
    per-lane running max and rescaled sums, combined once at the end (one reduction instead
    of two per block). Kept apart, never as m + log_s: that sum rounds to x's precision and
    x - (m + log_s) loses log_s (log_softmax([1e8, 1e8]) = 0, torch -0.693).

    A row holding NaN or +inf, or all -inf, gets a NaN log_s (so an all-NaN result, as
    torch's x - m is NaN there): exp(inf - inf) is NaN; an all -inf row sums to 0, forced to NaN.
    """
    m_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
    s_vec = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(x_ptr + base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_vec, s_vec = _online_exp_sum(m_vec, s_vec, x)
    m = tl.max(m_vec, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(s_vec * tl.exp(m_vec - m_safe), 0)
    log_s = tl.where(m == float("-inf"), float("nan"), tl.log(s))
    return m, log_s, s


@triton.jit
def _softmax_fwd_kernel(x_ptr, y_ptr, n_cols, LOG: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    """y = softmax(x) = exp(x - m) / s (or log_softmax = (x - m) - log(s)) of each row of a
    contiguous [rows, n_cols] tensor, m = max(x), s = sum(exp(x - m)): the shift is taken
    off x before the small log(s) (see :func:`_row_stats`). NaN / inf placement as torch.

    SINGLE: the row fits one block (one read of x). Otherwise a first pass computes the
    row's (m, s) online and a second pass writes the result, softmax as exp(x - m) / s too: not
    exp((x - m) - log s), whose argument rounds at log s's size, log(n) ulps of error in every
    probability of a long row (4-7x torch's float32 error from 10k columns on; an accuracy
    audit). NaN / inf as before: an all -inf row's exp(x - m) is NaN, a row holding NaN or +inf
    sums to NaN.
    """
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        # the padding lanes would give exp(-inf - -inf) = NaN in an all -inf row: keep them 0
        e = tl.where(mask, tl.exp(x - m), 0.0)
        s = tl.sum(e, 0)
        if LOG:
            y = (x - m) - tl.log(s)
        else:
            y = e / s
        tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m, log_s, s = _row_stats(x_ptr, base, n_cols, BLOCK)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = cols < n_cols
            x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                y = (x - m) - log_s
            else:
                y = tl.exp(x - m) / s
            tl.store(y_ptr + base + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(g_ptr, y_ptr, dx_ptr, n_cols, LOG: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr):
    """softmax: dx = y (g - sum(g y)); log_softmax: dx = g - exp(y) sum(g); per row."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(g_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = g - tl.exp(y) * tl.sum(g, 0)
        else:
            dx = y * (g - tl.sum(g * y, 0))
        tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = cols < n_cols
            g = tl.load(g_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += g
            else:
                y = tl.load(y_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
                acc += g * y
        total = tl.sum(acc, 0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = cols < n_cols
            g = tl.load(g_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = g - tl.exp(y) * total
            else:
                dx = y * (g - total)
            tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mid_tile(base, c0, C, INNER, offs_i, mi, BLOCK_C: tl.constexpr):
    """(offsets, mask) of the [BLOCK_C, BLOCK_I] tile at channels c0.. of the middle-dim kernels:
    element (c, i) of outer index o at o * C * INNER (``base``) + c * INNER + i."""
    cs = c0 + tl.arange(0, BLOCK_C)
    return base + cs[:, None].to(tl.int64) * INNER + offs_i[None, :], (cs < C)[:, None] & mi[None, :]


@triton.jit
def _softmax_fwd_mid_kernel(x_ptr, y_ptr, C, INNER, LOG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """softmax / log_softmax over the middle dim of a contiguous [outer, C, INNER] tensor (a
    softmax over dim d of a contiguous tensor: C its size, INNER the product of the dims after
    it), in place, without the transpose to rows and back: program (i, o) takes BLOCK_I
    consecutive inner positions of outer index o, lanes along the contiguous inner dim, and runs
    :func:`_row_stats`'s online pass over C in [BLOCK_C, BLOCK_I] tiles (the same per-lane
    arithmetic, so the same NaN / inf placement), then writes (softmax as exp(x - m) / s, as
    the row kernel's long rows)."""
    o = tl.program_id(1).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < INNER
    base = o * C * INNER
    m_vec = tl.full((BLOCK_C, BLOCK_I), float("-inf"), tl.float32)
    s_vec = tl.zeros((BLOCK_C, BLOCK_I), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        off, msk = _mid_tile(base, c0, C, INNER, offs_i, mi, BLOCK_C)
        x = tl.load(x_ptr + off, mask=msk, other=float("-inf")).to(tl.float32)
        m_vec, s_vec = _online_exp_sum(m_vec, s_vec, x)
    m = tl.max(m_vec, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(s_vec * tl.exp(m_vec - m_safe[None, :]), 0)
    log_s = tl.where(m == float("-inf"), float("nan"), tl.log(s))
    for c0 in range(0, C, BLOCK_C):
        off, msk = _mid_tile(base, c0, C, INNER, offs_i, mi, BLOCK_C)
        x = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32)
        if LOG:
            y = (x - m[None, :]) - log_s[None, :]
        else:
            y = tl.exp(x - m[None, :]) / s[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _softmax_bwd_mid_kernel(g_ptr, y_ptr, dx_ptr, C, INNER, LOG: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_I: tl.constexpr):
    """:func:`_softmax_bwd_kernel` over the middle dim of contiguous [outer, C, INNER] tensors
    (as :func:`_softmax_fwd_mid_kernel`): the sum over C, then dx."""
    o = tl.program_id(1).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < INNER
    base = o * C * INNER
    acc = tl.zeros((BLOCK_C, BLOCK_I), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        off, msk = _mid_tile(base, c0, C, INNER, offs_i, mi, BLOCK_C)
        g = tl.load(g_ptr + off, mask=msk, other=0.0).to(tl.float32)
        if LOG:
            acc += g
        else:
            acc += g * tl.load(y_ptr + off, mask=msk, other=0.0).to(tl.float32)
    total = tl.sum(acc, 0)
    for c0 in range(0, C, BLOCK_C):
        off, msk = _mid_tile(base, c0, C, INNER, offs_i, mi, BLOCK_C)
        g = tl.load(g_ptr + off, mask=msk, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + off, mask=msk, other=0.0).to(tl.float32)
        if LOG:
            dx = g - tl.exp(y) * total[None, :]
        else:
            dx = y * (g - total[None, :])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=msk)


# (C, inner) of the middle-dim kernels' ahead-of-time configurations: a channel softmax of a
# segmentation map (21 classes over 56x56), a long middle dim over pairs, and the check cases'
MID_AOT = ((21, 56 * 56), (1000, 2), (33, 7))  # the last: gpu-nn check's "softmax dim=1" case
MID_TILE = 2048  # elements of a [BLOCK_C, BLOCK_I] tile (two float32 tiles live at a time)
MID_MAX_I = 128  # inner positions per program
MID_MAX_OUTER = 65535  # grid axis 1
# inner positions the middle-dim kernels index in int32 (program_id(0) * BLOCK_I + lane): past it
# the offsets would wrap, so such a shape takes the row path (its transpose to rows and back)
MID_MAX_INNER = 2**31 - 1 - MID_MAX_I


def mid_config(C: int, inner: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_I, num_warps) of the middle-dim kernels: BLOCK_I the inner size rounded up
    to a power of two (at most MID_MAX_I), BLOCK_C what fills MID_TILE (at most C, rounded up);
    small tiles under the interpreter, so that tests loop over C."""
    if interpret:
        return min(next_power_of_2(C), 4), min(next_power_of_2(inner), 8), 4
    bi = min(next_power_of_2(inner), MID_MAX_I)
    bc = min(next_power_of_2(C), max(1, MID_TILE // bi))
    # a full tile on 8 warps: 8 elements per thread of each live float32 tile (on 4 warps the
    # float16 softmax backward's 16 x 128 tile spilled 8 bytes in sm_90 SASS)
    return bc, bi, 8 if bc * bi >= MID_TILE else 4


def mid_ok(outer: int, C: int, inner: int) -> bool:
    """Whether the middle-dim kernels take a softmax of this [outer, C, inner] shape: more than
    one inner position (else it is a row softmax), fewer than int32 indexes (MID_MAX_INNER) and a
    grid the GPU allows."""
    return 1 < inner <= MID_MAX_INNER and 0 < outer <= MID_MAX_OUTER and C > 0


def softmax_fwd_mid(x, y, outer: int, C: int, inner: int, log: bool, interpret: bool) -> None:
    """y = softmax of contiguous x viewed as [outer, C, inner] over C (see :func:`mid_ok`)."""
    bc, bi, warps = mid_config(C, inner, interpret)
    launch_kernel(_softmax_fwd_mid_kernel, (cdiv(inner, bi), outer), x, y, C, inner, LOG=log, BLOCK_C=bc, BLOCK_I=bi,
                  num_warps=warps)


def softmax_bwd_mid(g, y, dx, outer: int, C: int, inner: int, log: bool, interpret: bool) -> None:
    """dx from g and y, contiguous, viewed as [outer, C, inner], over C."""
    bc, bi, warps = mid_config(C, inner, interpret)
    launch_kernel(_softmax_bwd_mid_kernel, (cdiv(inner, bi), outer), g, y, dx, C, inner, LOG=log, BLOCK_C=bc,
                  BLOCK_I=bi, num_warps=warps)


# single-block sizes with their warps, then the looped block for longer rows
_SOFTMAX_SINGLE = ((128, 4), (512, 4), (2048, 8), (8192, 16))
_SOFTMAX_LOOP = (4096, 8)
_SOFTMAX_INTERP_SINGLE_MAX = 128
_SOFTMAX_INTERP_LOOP = 64


def softmax_config(n_cols: int, interpret: bool) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE, num_warps) for rows of ``n_cols``. The interpreter loops over blocks of
    64 once a row passes 128 so that small tests reach the looped path."""
    if interpret:
        if n_cols <= _SOFTMAX_INTERP_SINGLE_MAX:
            return max(16, next_power_of_2(n_cols)), True, 4
        return _SOFTMAX_INTERP_LOOP, False, 4
    for blk, warps in _SOFTMAX_SINGLE:
        if n_cols <= blk:
            return blk, True, warps
    return _SOFTMAX_LOOP[0], False, _SOFTMAX_LOOP[1]


def softmax_fwd(x, y, log: bool, interpret: bool) -> None:
    """Rows of contiguous [rows, n_cols] x into y (same shape and dtype)."""
    softmax_fwd_rows(x, y, *x.shape, log, interpret)


# rows of one softmax launch (a program each, on grid x: at most 2^31 - 1); more run as launches
# over flat views of this many rows
SOFTMAX_ROWS_MAX = 2**31 - 1


def _row_chunks(rows: int, n: int, *ts):
    """(rows, views) per launch past SOFTMAX_ROWS_MAX rows: ``ts`` (contiguous, ``rows`` rows of
    ``n``) as flat views of that many rows at most."""
    flat = [t.view(-1) for t in ts]
    step = SOFTMAX_ROWS_MAX
    return [(min(step, rows - r0), [f[r0 * n:(r0 + step) * n] for f in flat]) for r0 in range(0, rows, step)]


def softmax_fwd_rows(x, y, rows: int, n: int, log: bool, interpret: bool) -> None:
    """:func:`softmax_fwd` of contiguous x, y of any shape holding ``rows`` rows of ``n`` (the
    last dim): the caller needs no [rows, n] view."""
    if rows == 0 or n == 0:
        return
    blk, single, warps = softmax_config(n, interpret)
    if rows <= SOFTMAX_ROWS_MAX:
        launch_kernel(_softmax_fwd_kernel, (rows,), x, y, n, LOG=log, SINGLE=single, BLOCK=blk, num_warps=warps)
        return
    for r, (xv, yv) in _row_chunks(rows, n, x, y):
        launch_kernel(_softmax_fwd_kernel, (r,), xv, yv, n, LOG=log, SINGLE=single, BLOCK=blk, num_warps=warps)


def softmax_bwd(g, y, dx, log: bool, interpret: bool) -> None:
    """dx from g and the forward output y, all contiguous [rows, n_cols]."""
    softmax_bwd_rows(g, y, dx, *g.shape, log, interpret)


def softmax_bwd_rows(g, y, dx, rows: int, n: int, log: bool, interpret: bool) -> None:
    """:func:`softmax_bwd` of contiguous tensors of any shape holding ``rows`` rows of ``n``."""
    if rows == 0 or n == 0:
        return
    blk, single, warps = softmax_config(n, interpret)
    if rows <= SOFTMAX_ROWS_MAX:
        launch_kernel(_softmax_bwd_kernel, (rows,), g, y, dx, n, LOG=log, SINGLE=single, BLOCK=blk, num_warps=warps)
        return
    for r, (gv, yv, dv) in _row_chunks(rows, n, g, y, dx):
        launch_kernel(_softmax_bwd_kernel, (r,), gv, yv, dv, n, LOG=log, SINGLE=single, BLOCK=blk, num_warps=warps)


# =========================================================================== cross_entropy


@triton.jit
def _ce_online(x, w, mask, m_vec, s_vec, lin, wsum):
    """One tile of the cross-entropy forward's per-lane pass (:func:`_ce_fwd_kernel`): logits x
    (-inf where masked), weights w (0 where masked) -> the running max, the rescaled sum of exp,
    the weighted sum of x - (running max) and the weight sum, elementwise (any tile shape)."""
    m_new, s_vec = _online_exp_sum(m_vec, s_vec, x)
    # an unchanged max (or no weight yet) moves nothing: avoids inf - inf and 0 * inf
    lin += tl.where((m_vec == m_new) | (wsum == 0.0), 0.0, wsum * (m_vec - m_new))
    # a lane that has seen only -inf adds w * -inf (torch's w_c * logp_c there), not -inf - -inf
    lin += tl.where(mask, w * tl.where(m_new == float("-inf"), x, x - m_new), 0.0)
    return m_new, s_vec, lin, wsum + w


@triton.jit
def _ce_fwd_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, stats_ptr, C, ignore_index, eps,
                   PROB: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """Per-row cross entropy of contiguous logits [M, C], in ONE pass over the logits.

    With m = max(x), log_s = log(sum(exp(x - m))), -logp_c = log_s - (x_c - m) (the shift
    taken off x first: m + log_s would round to x's precision, see :func:`_row_stats`):

    * indices: loss = (1 - eps) w_t (-logp_t) + eps / C sum_c w_c (-logp_c), 0 if t == ignore_index
    * probabilities (t' = (1 - eps) t + eps / C): loss = sum_c w_c t'_c (-logp_c)

    sum_c w_c (-logp_c) = W log_s - sum_c w_c (x_c - m): the pass keeps, per lane, the running
    max, the rescaled sum of exp and the weighted sum of x - (running max), moved to a new max
    by adding W_lane (old - new), so that no weighted sum of raw logits can overflow (label
    smoothing over [2e38, 2e38, 1]: torch 6.67e36). NaN / inf as torch's term-by-term sums:
    NaN or +inf in a row, or an all -inf row, give NaN; a 0 weight on a -inf logit gives NaN.

    Writes loss[M] (in loss_ptr's dtype: float32 for a reduction to finish, the input's for
    'none') and the row statistics stats[0, M] = m, stats[1, M] = log_s, stats[2, M] = the row's
    total weight W (sum_c w_c for indices, C without weights; sum_c w_c t'_c for probabilities),
    which the backward needs before its pass and so need not sum again.
    """
    row = tl.program_id(0).to(tl.int64)
    M = tl.num_programs(0).to(tl.int64)
    base = row * C
    # the row's running max m is one number (each tile's max folded in), the lanes' sums kept
    # relative to it: one exp per logit (the per-lane running max that _ce_online keeps took two
    # then, and twice the arithmetic: at 8192 x 32000 bfloat16 the H200 ran that pass at 400 us,
    # a third of the bandwidth; _online_exp_sum now takes one); the sums move to a new max only
    # in the tiles that raise it
    m = tl.max(tl.full((BLOCK,), float("-inf"), tl.float32), 0)
    s_vec = tl.zeros((BLOCK,), dtype=tl.float32)
    lin = tl.zeros((BLOCK,), dtype=tl.float32)   # sum w (x - m)   (or sum w t' (x - m))
    wsum = tl.zeros((BLOCK,), dtype=tl.float32)  # sum w           (or sum w t')
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < C
        x = tl.load(x_ptr + base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.where(mask, 1.0, 0.0)
        if PROB:
            t = tl.load(t_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            w = w * (t * (1.0 - eps) + eps / C)
        # a NaN logit may or may not reach m (tl.max / tl.maximum may drop it): its own exp and
        # weighted term are NaN either way, and m itself never becomes NaN
        m_new = tl.maximum(m, tl.max(x, 0))
        if m_new != m:  # the max rose: exp(-inf) = 0 keeps an empty sum 0; a lane with weight
            # and only -inf logits so far gets W (-inf), as torch's w_c * logp_c = -inf there
            s_vec = s_vec * tl.exp(m - m_new)
            lin += tl.where(wsum == 0.0, 0.0, wsum * (m - m_new))
        m = m_new
        if m == float("-inf"):  # every logit so far -inf (or NaN, which no max keeps): no sum
            # yet but a NaN's, which must stay in it when a later tile raises m (0 * NaN); the
            # weights times -inf
            s_vec += tl.where(x != x, float("nan"), 0.0)
            lin += tl.where(mask, w * x, 0.0)
        else:
            d = x - m  # -inf at a -inf logit (and the padding): exp 0, weight x -inf as torch's
            s_vec += tl.exp(d)
            lin += tl.where(mask, w * d, 0.0)
        wsum += w
    log_s = tl.log(tl.sum(s_vec, 0))
    log_s = tl.where(m == float("-inf"), float("nan"), log_s)  # torch: all -inf -> NaN
    lin_m = tl.sum(lin, 0)
    w_row = tl.sum(wsum, 0)
    smooth = w_row * log_s - lin_m
    if PROB:
        loss = smooth
    else:
        t = tl.load(t_ptr + row)
        valid = t != ignore_index
        # the launcher refuses out-of-range targets, except during CUDA graph capture (no host
        # sync allowed): then such a row reads class 0 and its loss is NaN, never out of bounds
        in_range = (t >= 0) & (t < C)
        tc = tl.where(valid & in_range, t, 0)
        x_t = tl.load(x_ptr + base + tc).to(tl.float32)
        if HAS_W:
            w_t = tl.load(w_ptr + tc).to(tl.float32)
        else:
            w_t = 1.0
        loss = (1.0 - eps) * w_t * (log_s - (x_t - m))
        # torch adds the smoothing term only for eps > 0 (0 * inf would be NaN)
        loss += tl.where(eps > 0.0, (eps / C) * smooth, 0.0)
        loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + M + row, log_s)
    tl.store(stats_ptr + 2 * M + row, w_row)


@triton.jit(do_not_specialize=["M"])
def _ce_reduce_kernel(loss_ptr, t_ptr, w_ptr, out_ptr, stats_ptr, M, C, ignore_index, eps,
                      MEAN: tl.constexpr, PROB: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """'sum' / 'mean' of the float32 row losses loss[M], in ONE program: per-lane float32 sums
    in a fixed order, then one tree sum (deterministic, no atomics), stored in out_ptr's dtype.

    'mean' divides by the denominator D = sum of w[t] over the non-ignored rows (indices; 1 per
    row without weights) or M (probabilities), and stores D at stats[3 M] for the backward. With
    label smoothing and index targets D = 0 becomes NaN (torch averages its nll and smoothing
    terms separately, and the nll term is 0 / 0), so the loss and its gradient are NaN.
    ``t_ptr`` / ``w_ptr`` are read only for 'mean' over index targets (resp. with weights).
    """
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    den = tl.zeros((BLOCK,), dtype=tl.float32)
    M64 = M.to(tl.int64)  # (M is i32 below 2^31: 3 * M and the loop's last step would wrap)
    for start in range(0, M64, BLOCK):
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = rows < M64
        acc += tl.load(loss_ptr + rows, mask=mask, other=0.0)
        if MEAN and not PROB:
            t = tl.load(t_ptr + rows, mask=mask, other=ignore_index)
            # an out-of-range target (only during CUDA graph capture, see _ce_fwd_kernel) has a
            # NaN loss already: it weighs 0 here and reads nothing outside w
            valid = mask & (t != ignore_index) & (t >= 0) & (t < C)
            if HAS_W:
                den += tl.load(w_ptr + tl.where(valid, t, 0), mask=valid, other=0.0).to(tl.float32)
            else:
                den += tl.where(valid, 1.0, 0.0)
    total = tl.sum(acc, 0)
    if MEAN:
        if PROB:
            d = M * 1.0
        else:
            d = tl.sum(den, 0)
            d = tl.where((eps > 0.0) & (d == 0.0), float("nan"), d)
        total = total / d
        tl.store(stats_ptr + 3 * M64, d)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["M"])
def _ce_target_check_kernel(t_ptr, out_ptr, M, C, ignore_index, BLOCK: tl.constexpr):
    """The first out-of-range class index of t[M] among this program's blocks (blocks pid,
    pid + P, pid + 2P, ...: each program visits its rows in increasing order): writes
    out[pid] = (row, t[row]), row = M when every target is in [0, C) or ignore_index. Every
    entry is written, so the buffer needs no zero-fill; the host reads all P pairs at once."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    M64 = M.to(tl.int64)
    first = M64
    for start in range(pid.to(tl.int64) * BLOCK, M64, P * BLOCK):  # (an i32 start wraps within a block of 2^31)
        rows = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = rows < M64
        t = tl.load(t_ptr + rows, mask=mask, other=ignore_index)
        bad = mask & (t != ignore_index) & ((t < 0) | (t >= C))
        first = tl.minimum(first, tl.min(tl.where(bad, rows, M64), 0))
    v = tl.load(t_ptr + first, mask=first < M64, other=0)
    tl.store(out_ptr + 2 * pid, first)
    tl.store(out_ptr + 2 * pid + 1, v.to(tl.int64))


@triton.jit(do_not_specialize=["stride_g", "mean"])
def _ce_bwd_kernel(x_ptr, t_ptr, w_ptr, stats_ptr, g_ptr, stride_g, mean, dx_ptr, dt_ptr, C, ignore_index, eps,
                   PROB: tl.constexpr, HAS_W: tl.constexpr, HAS_DT: tl.constexpr, BLOCK: tl.constexpr):
    """d loss / d logits for one row, logp = (x - m) - log_s and p = exp(logp) from the saved
    row statistics stats[3, M] of :func:`_ce_fwd_kernel` (never x - (m + log_s): see
    :func:`_row_stats`), W = stats[2, row], and the row's share of the upstream gradient
    s = g[row * stride_g] (any float dtype; stride 0 for 'sum' / 'mean'), divided by the 'mean'
    denominator stats[3 M] when ``mean`` (of :func:`_ce_reduce_kernel`, NaN where torch's is):

    * indices: s ((1 - eps) w_t (p - onehot(t)) + eps / C (W p - w)); s = 0 if ignored
    * probabilities: s (p W - w t'); with HAS_DT also d/dt = -(1 - eps) s w logp

    (torch's log_softmax backward g - p sum(g) of the loss's g = d loss / d logp, regrouped:
    a NaN p, from a NaN / +inf / all -inf row, makes the whole row NaN as in torch, ignored
    rows included.)
    """
    row = tl.program_id(0).to(tl.int64)
    M = tl.num_programs(0).to(tl.int64)
    base = row * C
    s = tl.load(g_ptr + row * stride_g).to(tl.float32)
    if mean != 0:
        s = s / tl.load(stats_ptr + 3 * M).to(tl.float32)
    m = tl.load(stats_ptr + row)
    log_s = tl.load(stats_ptr + M + row)
    w_tot = tl.load(stats_ptr + 2 * M + row).to(tl.float32)
    if not PROB:
        t_row = tl.load(t_ptr + row)
        valid = t_row != ignore_index
        in_range = (t_row >= 0) & (t_row < C)  # see the forward: NaN, never out of bounds
        tc = tl.where(valid & in_range, t_row, 0)
        if HAS_W:
            w_t = tl.load(w_ptr + tc).to(tl.float32)
        else:
            w_t = 1.0
        s = tl.where(valid, tl.where(in_range, s, float("nan")), 0.0)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < C
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        logp = (x - m) - log_s
        p = tl.exp(logp)
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            w = 1.0
        if PROB:
            t = tl.load(t_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            tp = t * (1.0 - eps) + eps / C
            dx = s * (p * w_tot - w * tp)
            if HAS_DT:
                dt = -(1.0 - eps) * s * w * logp
                tl.store(dt_ptr + base + cols, dt.to(dt_ptr.dtype.element_ty), mask=mask)
        else:
            onehot = tl.where(cols == tc, 1.0, 0.0)
            # the smoothing term only where eps > 0: 0 x (w_tot p - w) is NaN where a class weight
            # (so w_tot) is inf, which no class-target gradient of torch's has (as the forward)
            smooth = tl.where(eps > 0.0, (eps / C) * (w_tot * p - w), 0.0)
            dx = s * ((1.0 - eps) * w_t * (p - onehot) + smooth)
        tl.store(dx_ptr + base + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_mid_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, stats_ptr, C, INNER, M, ignore_index, eps,
                       PROB: tl.constexpr, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """:func:`_ce_fwd_kernel` on logits [outer, C, INNER] as they lie (a contiguous [N, C, d...]
    input: the classes along dim 1, INNER the product of the d's), without the transpose to
    rows: program (i, o) takes the BLOCK_I consecutive positions of outer index o from
    i * BLOCK_I (rows o * INNER + i, the order of the [N, d...] target and of a 'none' loss),
    lanes along the contiguous inner dim, and runs the row kernel's per-lane pass over C in
    [BLOCK_C, BLOCK_I] tiles (the same arithmetic per class, the same NaN / inf placement),
    ending with a sum over the tile's C axis. ``M`` = outer * INNER rows; writes loss[M] and
    the [3, M] row statistics as the row kernel does."""
    o = tl.program_id(1).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)  # (INNER < 2^31: ce_mid_ok)
    mi = offs_i < INNER
    base = o * C * INNER
    rows = o * INNER + offs_i
    M64 = tl.cast(M, tl.int64)  # the statistics' offsets 2 M, 3 M pass 2^31 long before M does
    m_vec = tl.full((BLOCK_C, BLOCK_I), float("-inf"), tl.float32)
    s_vec = tl.zeros((BLOCK_C, BLOCK_I), dtype=tl.float32)
    lin = tl.zeros((BLOCK_C, BLOCK_I), dtype=tl.float32)
    wsum = tl.zeros((BLOCK_C, BLOCK_I), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        off, msk = _mid_tile(base, c0, C, INNER, offs_i, mi, BLOCK_C)
        x = tl.load(x_ptr + off, mask=msk, other=float("-inf")).to(tl.float32)
        if HAS_W:
            cs = c0 + tl.arange(0, BLOCK_C)
            wc = tl.load(w_ptr + cs, mask=cs < C, other=0.0).to(tl.float32)
            w = wc[:, None] * tl.where(msk, 1.0, 0.0)
        else:
            w = tl.where(msk, 1.0, 0.0)
        if PROB:
            t = tl.load(t_ptr + off, mask=msk, other=0.0).to(tl.float32)
            w = w * (t * (1.0 - eps) + eps / C)
        m_vec, s_vec, lin, wsum = _ce_online(x, w, msk, m_vec, s_vec, lin, wsum)
    m = tl.max(m_vec, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(tl.sum(s_vec * tl.exp(m_vec - m_safe[None, :]), 0))
    log_s = tl.where(m == float("-inf"), float("nan"), log_s)
    lin_m = tl.sum(lin + tl.where((m_vec == m[None, :]) | (wsum == 0.0), 0.0, wsum * (m_vec - m[None, :])), 0)
    w_row = tl.sum(wsum, 0)
    smooth = w_row * log_s - lin_m
    if PROB:
        loss = smooth
    else:
        t = tl.load(t_ptr + rows, mask=mi, other=ignore_index)
        valid = t != ignore_index
        in_range = (t >= 0) & (t < C)  # see _ce_fwd_kernel: NaN, never out of bounds
        tc = tl.where(valid & in_range, t, 0)
        x_t = tl.load(x_ptr + base + tc * INNER + offs_i, mask=mi, other=0.0).to(tl.float32)
        if HAS_W:
            w_t = tl.load(w_ptr + tc, mask=mi, other=0.0).to(tl.float32)
        else:
            w_t = 1.0
        loss = (1.0 - eps) * w_t * (log_s - (x_t - m))
        loss += tl.where(eps > 0.0, (eps / C) * smooth, 0.0)
        loss = tl.where(valid, tl.where(in_range, loss, float("nan")), 0.0)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=mi)
    tl.store(stats_ptr + rows, m, mask=mi)
    tl.store(stats_ptr + M64 + rows, log_s, mask=mi)
    tl.store(stats_ptr + 2 * M64 + rows, w_row, mask=mi)


@triton.jit(do_not_specialize=["stride_g", "mean"])
def _ce_bwd_mid_kernel(x_ptr, t_ptr, w_ptr, stats_ptr, g_ptr, stride_g, mean, dx_ptr, dt_ptr, C, INNER, M,
                       ignore_index, eps, PROB: tl.constexpr, HAS_W: tl.constexpr, HAS_DT: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """:func:`_ce_bwd_kernel` on logits [outer, C, INNER] as they lie, tiled as
    :func:`_ce_fwd_mid_kernel`: dx (and dt) written in the input's own layout, no transpose back."""
    o = tl.program_id(1).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < INNER
    base = o * C * INNER
    rows = o * INNER + offs_i
    M64 = tl.cast(M, tl.int64)  # (as the forward)
    s = tl.load(g_ptr + rows * stride_g, mask=mi, other=0.0).to(tl.float32)
    if mean != 0:
        s = s / tl.load(stats_ptr + 3 * M64).to(tl.float32)
    m = tl.load(stats_ptr + rows, mask=mi, other=0.0)
    log_s = tl.load(stats_ptr + M64 + rows, mask=mi, other=0.0)
    w_tot = tl.load(stats_ptr + 2 * M64 + rows, mask=mi, other=0.0).to(tl.float32)
    if not PROB:
        t_row = tl.load(t_ptr + rows, mask=mi, other=ignore_index)
        valid = t_row != ignore_index
        in_range = (t_row >= 0) & (t_row < C)
        tc = tl.where(valid & in_range, t_row, 0)
        if HAS_W:
            w_t = tl.load(w_ptr + tc, mask=mi, other=0.0).to(tl.float32)
        else:
            w_t = tl.full((BLOCK_I,), 1.0, tl.float32)
        s = tl.where(valid, tl.where(in_range, s, float("nan")), 0.0)
    for c0 in range(0, C, BLOCK_C):
        off, msk = _mid_tile(base, c0, C, INNER, offs_i, mi, BLOCK_C)
        cs = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + off, mask=msk, other=0.0).to(tl.float32)
        logp = (x - m[None, :]) - log_s[None, :]
        p = tl.exp(logp)
        if HAS_W:
            w = tl.load(w_ptr + cs, mask=cs < C, other=0.0).to(tl.float32)[:, None]
        else:
            w = 1.0
        if PROB:
            t = tl.load(t_ptr + off, mask=msk, other=0.0).to(tl.float32)
            tp = t * (1.0 - eps) + eps / C
            dx = s[None, :] * (p * w_tot[None, :] - w * tp)
            if HAS_DT:
                dt = -(1.0 - eps) * s[None, :] * w * logp
                tl.store(dt_ptr + off, dt.to(dt_ptr.dtype.element_ty), mask=msk)
        else:
            onehot = tl.where(cs[:, None] == tc[None, :], 1.0, 0.0)
            smooth = tl.where(eps > 0.0, (eps / C) * (w_tot[None, :] * p - w), 0.0)  # (see _ce_bwd_kernel)
            dx = s[None, :] * ((1.0 - eps) * w_t[None, :] * (p - onehot) + smooth)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=msk)


_CE_BLOCKS = ((256, 4), (1024, 4), (2048, 8))
_CE_INTERP_BLOCK = 64


def ce_config(C: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK, num_warps): the smallest block that holds the row, else the largest, looped."""
    if interpret:
        return min(_CE_INTERP_BLOCK, max(16, next_power_of_2(C))), 4
    for blk, warps in _CE_BLOCKS:
        if C <= blk:
            return blk, warps
    return _CE_BLOCKS[-1]


def ce_fwd(x, t, w, loss, stats, prob: bool, ignore_index: int, eps: float, interpret: bool) -> None:
    """x [M, C] contiguous logits; t [M] int64 indices or [M, C] probabilities (x's dtype);
    w [C] or None; writes loss [M] (float32, or the dtype of ``loss``) and stats[:3 M], the
    [3, M] row statistics of :func:`_ce_fwd_kernel`."""
    M, C = x.shape
    if M == 0:
        return
    blk, warps = ce_config(C, interpret)
    launch_kernel(_ce_fwd_kernel, (M,), x, t, w if w is not None else x, loss, stats, C, ignore_index, float(eps),
                  PROB=prob, HAS_W=w is not None, BLOCK=blk, num_warps=warps)


# the middle-dim cross-entropy kernels' one configuration (BLOCK_C, BLOCK_I, num_warps): 128
# contiguous inner positions per program, 16 classes per tile, 8 elements per thread of each of
# the four float32 tiles the forward keeps; the interpreter's small tiles loop over C and over
# several inner blocks in the tests
CE_MID = (16, 128, 8)
CE_MID_INTERP = (4, 8, 4)
CE_MID_MIN_INNER = 32  # fewer inner positions per class leave most of a program's lanes idle
CE_MID_MAX_C = 1024  # classes a program walks for its 128 positions (64 tiles) whatever the grid
CE_MID_MIN_PROGRAMS = 1024  # past CE_MID_MAX_C: programs enough that the long walks still fill the GPU


def ce_mid_ok(outer: int, C: int, inner: int) -> bool:
    """Whether the middle-dim kernels take a cross entropy over logits [outer, C, inner] (a
    contiguous [N, C, d...] input): inner positions enough to fill a program's lanes, a grid the
    GPU allows, and either few classes or, for many, enough programs that each walking all C is
    still parallel enough (else the rows after a transpose are, one program per row); fewer inner
    positions than int32 indexes (MID_MAX_INNER), as :func:`mid_ok`."""
    if not CE_MID_MIN_INNER <= inner <= MID_MAX_INNER or not 0 < outer <= MID_MAX_OUTER or C < 1:
        return False
    return C <= CE_MID_MAX_C or outer * cdiv(inner, CE_MID[1]) >= CE_MID_MIN_PROGRAMS


def ce_fwd_mid(x, t, w, loss, stats, outer: int, C: int, inner: int, prob: bool, ignore_index: int, eps: float,
               interpret: bool) -> None:
    """:func:`ce_fwd` for contiguous logits x viewed as [outer, C, inner] (:func:`ce_mid_ok`): t
    the [outer * inner] int64 indices or the probabilities in x's layout; loss and stats as
    :func:`ce_fwd`'s, rows in (outer, inner) order."""
    bc, bi, warps = CE_MID_INTERP if interpret else CE_MID
    launch_kernel(_ce_fwd_mid_kernel, (cdiv(inner, bi), outer), x, t, w if w is not None else x, loss, stats, C,
                  inner, outer * inner, ignore_index, float(eps), PROB=prob, HAS_W=w is not None, BLOCK_C=bc,
                  BLOCK_I=bi, num_warps=warps)


def ce_bwd_mid(x, t, w, stats, g, mean: bool, dx, dt, outer: int, C: int, inner: int, prob: bool, ignore_index: int,
               eps: float, interpret: bool) -> None:
    """:func:`ce_bwd` for the logits of :func:`ce_fwd_mid`: dx (and dt) in x's layout."""
    bc, bi, warps = CE_MID_INTERP if interpret else CE_MID
    stride_g = g.stride(0) if g.dim() else 0
    launch_kernel(_ce_bwd_mid_kernel, (cdiv(inner, bi), outer), x, t, w if w is not None else x, stats, g, stride_g,
                  int(mean), dx, dt if dt is not None else dx, C, inner, outer * inner, ignore_index, float(eps),
                  PROB=prob, HAS_W=w is not None, HAS_DT=dt is not None, BLOCK_C=bc, BLOCK_I=bi, num_warps=warps)


_CE_REDUCE = (2048, 8)  # (BLOCK, num_warps) of the one program that sums the rows
_CE_REDUCE_INTERP = 16


def ce_reduce(loss_rows, t, w, out, stats, mean: bool, prob: bool, ignore_index: int, C: int, eps: float,
              interpret: bool) -> None:
    """out [] (any float dtype) = the sum of the float32 row losses loss_rows [M], or for
    ``mean`` their mean as torch divides it (t [M] int64 indices, w [C] or None: the weights
    of the non-ignored targets; probabilities: M), the denominator stored at stats[3 M]. One
    launch, also for M = 0 (sum 0, mean NaN, as torch)."""
    M = loss_rows.shape[0]
    blk, warps = (_CE_REDUCE_INTERP, 4) if interpret else _CE_REDUCE
    idx = mean and not prob  # only then are t and w read: the others pass float32 placeholders
    has_w = idx and w is not None
    launch_kernel(_ce_reduce_kernel, (1,), loss_rows, t if idx else loss_rows, w if has_w else loss_rows, out, stats,
                  M, C, ignore_index, float(eps), MEAN=mean, PROB=mean and prob, HAS_W=has_w, BLOCK=blk,
                  num_warps=warps)


def ce_bwd(x, t, w, stats, g, mean: bool, dx, dt, prob: bool, ignore_index: int, eps: float, interpret: bool) -> None:
    """dx [M, C] (and dt [M, C] for probability targets when given) from the saved stats of
    :func:`ce_fwd` (and :func:`ce_reduce` for ``mean``) and the upstream gradient g: [M] with
    any stride for 'none', 0-d for 'sum' / 'mean' (any float dtype; read as float32)."""
    M, C = x.shape
    if M == 0:
        return
    blk, warps = ce_config(C, interpret)
    stride_g = g.stride(0) if g.dim() else 0
    launch_kernel(_ce_bwd_kernel, (M,), x, t, w if w is not None else x, stats, g, stride_g, int(mean), dx,
                  dt if dt is not None else dx, C, ignore_index, float(eps), PROB=prob, HAS_W=w is not None,
                  HAS_DT=dt is not None, BLOCK=blk, num_warps=warps)


_CE_CHECK = (1024, 4)  # (BLOCK, num_warps) of the target check
_CE_CHECK_INTERP = 16
_CE_CHECK_PROGRAMS = 64  # at most: each writes one pair, all read back at once


def ce_check_targets(t, C: int, ignore_index: int, interpret: bool):
    """The first target of t [M] (int64, contiguous, M > 0) that is neither ignore_index nor
    in [0, C), as (row, value), row = M when there is none: an int64 [P, 2] tensor on t's
    device (P <= _CE_CHECK_PROGRAMS programs, each its blocks' first), to be read back in
    ONE copy; :func:`first_bad_target` reads it."""
    M = t.shape[0]
    blk, warps = (_CE_CHECK_INTERP, 4) if interpret else _CE_CHECK
    P = min(cdiv(M, blk), 4 if interpret else _CE_CHECK_PROGRAMS)
    out = torch.empty((P, 2), dtype=torch.int64, device=t.device)
    launch_kernel(_ce_target_check_kernel, (P,), t, out, M, C, ignore_index, BLOCK=blk, num_warps=warps)
    return out


def first_bad_target(pairs: list, M: int):
    """The offending value of :func:`ce_check_targets`' pairs (read back as a list), or None."""
    row, value = min((tuple(p) for p in pairs), default=(M, 0))
    return value if row < M else None


# =========================================================================== AOT


def aot_specs():
    """Every configuration the launchers above can launch with on a GPU."""
    specs = []
    for dt in DTYPES:
        for prec in (("ieee", "tf32") if dt == "fp32" else ("ieee",)):
            for bm, bn, bk, gm, warps, stages in matmul_candidates(dt, prec):
                sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
                       "M": "i32", "N": "i32", "K": "i32",
                       "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32",
                       "stride_cm": "i32", "stride_cn": "i32", "has_bias": "i32", "act": "i32",
                       "PREC": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                       "GROUP_M": "constexpr"}
                ce = {"PREC": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm}
                specs.append(AotSpec(_matmul_kernel, sig, ce, num_warps=warps, num_stages=stages,
                                     label=f"{dt} {prec} {bm}x{bn}x{bk} g{gm} w{warps} s{stages}"))
        prec = "tf32" if dt == "fp32" else "ieee"
        for bm, bn, bk, gm, warps, stages, _ in matmul_tma_candidates(dt, prec):
            for a_km, b_nk in ((False, True), (False, False), (True, False)):  # linear's three, see tma_layout
                a_blk = (bk, bm) if a_km else (bm, bk)
                b_blk = (bn, bk) if b_nk else (bk, bn)
                sig = {"a_desc": f"tensordesc<{dt}[{a_blk[0]}, {a_blk[1]}]>",
                       "b_desc": f"tensordesc<{dt}[{b_blk[0]}, {b_blk[1]}]>",
                       "c_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "M": "i32", "N": "i32", "K": "i32",
                       "stride_cm": "i32", "has_bias": "i32", "act": "i32",
                       "A_KM": "constexpr", "B_NK": "constexpr", "PREC": "constexpr", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr", "FLATTEN": "constexpr"}
                ce = {"A_KM": a_km, "B_NK": b_nk, "PREC": prec, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                      "GROUP_M": gm, "FLATTEN": TMA_FLATTEN}
                lay = ("c" if a_km else "r") + ("c" if b_nk else "r")
                specs.append(AotSpec(_matmul_tma_kernel, sig, ce, num_warps=warps, num_stages=stages,
                                     divisible_by_16=("c_ptr", "stride_cm"),  # see tma_output
                                     label=f"tma {dt} {prec} {lay} {bm}x{bn}x{bk} g{gm} w{warps} s{stages}"))
        bm, bn, warps = _COLSUM
        # the bias gradient in one launch; the float32 partial sums of row ranges; their sum
        for src, out in dict.fromkeys(((dt, dt), (dt, "fp32"), ("fp32", dt))):
            specs.append(AotSpec(_colsum_kernel, {"g_ptr": f"*{src}", "out_ptr": f"*{out}", "M": "i32", "N": "i32",
                                                  "stride_gm": "i32", "stride_gn": "i32", "CHUNK": "i32",
                                                  "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                                 {"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, label=f"{src} -> {out}"))
        for act in ("relu", "sigmoid", "tanh"):
            specs.append(AotSpec(_act_colsum_kernel, {"g_ptr": f"*{dt}", "y_ptr": f"*{dt}", "dg_ptr": f"*{dt}",
                                                      "out_ptr": f"*{dt}", "R": "i32", "M": "i32", "N": "i32",
                                                      "stride_b": "i32", "stride_m": "i32", "stride_n": "i32",
                                                      "ACT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                                 {"ACT": ACT_CODES[act], "BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                 label=f"{dt} {act}"))
        smx = [(b, True, w) for b, w in _SOFTMAX_SINGLE] + [(_SOFTMAX_LOOP[0], False, _SOFTMAX_LOOP[1])]
        for log in (False, True):
            for blk, single, warps in smx:
                ce = {"LOG": log, "SINGLE": single, "BLOCK": blk}
                lab = f"{dt} {'log_' if log else ''}softmax BLOCK={blk} {'single' if single else 'loop'}"
                specs.append(AotSpec(_softmax_fwd_kernel, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "n_cols": "i32",
                                                           "LOG": "constexpr", "SINGLE": "constexpr", "BLOCK": "constexpr"},
                                     ce, num_warps=warps, label=lab))
                specs.append(AotSpec(_softmax_bwd_kernel, {"g_ptr": f"*{dt}", "y_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
                                                           "n_cols": "i32", "LOG": "constexpr", "SINGLE": "constexpr",
                                                           "BLOCK": "constexpr"},
                                     ce, num_warps=warps, label=lab))
        for C, inner in MID_AOT:
            bc, bi, warps = mid_config(C, inner, False)
            for log in (False, True):
                ce = {"LOG": log, "BLOCK_C": bc, "BLOCK_I": bi}
                lab = f"{dt} {'log_' if log else ''}softmax middle dim {bc}x{bi}"
                cx = {"LOG": "constexpr", "BLOCK_C": "constexpr", "BLOCK_I": "constexpr"}
                specs.append(AotSpec(_softmax_fwd_mid_kernel, {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "C": "i32",
                                                               "INNER": "i32", **cx}, ce, num_warps=warps, label=lab))
                specs.append(AotSpec(_softmax_bwd_mid_kernel, {"g_ptr": f"*{dt}", "y_ptr": f"*{dt}", "dx_ptr": f"*{dt}",
                                                               "C": "i32", "INNER": "i32", **cx}, ce, num_warps=warps,
                                     label=lab))
        for blk, warps in _CE_BLOCKS:
            for prob in (False, True):
                tdt = dt if prob else "i64"
                for has_w in (False, True):
                    lab = f"{dt} {'prob' if prob else 'index'} weight={has_w} BLOCK={blk}"
                    # the row losses: float32 for a reduction to finish, the input's dtype for 'none'
                    for ldt in sorted({"fp32", dt}):
                        specs.append(AotSpec(_ce_fwd_kernel, {"x_ptr": f"*{dt}", "t_ptr": f"*{tdt}", "w_ptr": f"*{dt}",
                                                              "loss_ptr": f"*{ldt}", "stats_ptr": "*fp32", "C": "i32",
                                                              "ignore_index": "i32", "eps": "fp32", "PROB": "constexpr",
                                                              "HAS_W": "constexpr", "BLOCK": "constexpr"},
                                             {"PROB": prob, "HAS_W": has_w, "BLOCK": blk}, num_warps=warps,
                                             label=lab + f" loss={ldt}"))
                    for has_dt in ((False, True) if prob else (False,)):
                        specs.append(AotSpec(
                            _ce_bwd_kernel,
                            {"x_ptr": f"*{dt}", "t_ptr": f"*{tdt}", "w_ptr": f"*{dt}", "stats_ptr": "*fp32",
                             "g_ptr": f"*{dt}", "stride_g": "i32", "mean": "i32", "dx_ptr": f"*{dt}",
                             "dt_ptr": f"*{dt}", "C": "i32", "ignore_index": "i32", "eps": "fp32", "PROB": "constexpr",
                             "HAS_W": "constexpr", "HAS_DT": "constexpr", "BLOCK": "constexpr"},
                            {"PROB": prob, "HAS_W": has_w, "HAS_DT": has_dt, "BLOCK": blk}, num_warps=warps,
                            label=lab + f" dt={has_dt}"))
        # the middle-dim kernels: one tile configuration, every option
        bc, bi, warps = CE_MID
        cxm = {"PROB": "constexpr", "HAS_W": "constexpr", "BLOCK_C": "constexpr", "BLOCK_I": "constexpr"}
        for prob in (False, True):
            tdt = dt if prob else "i64"
            for has_w in (False, True):
                lab = f"{dt} middle dim {'prob' if prob else 'index'} weight={has_w} {bc}x{bi}"
                for ldt in sorted({"fp32", dt}):
                    specs.append(AotSpec(_ce_fwd_mid_kernel,
                                         {"x_ptr": f"*{dt}", "t_ptr": f"*{tdt}", "w_ptr": f"*{dt}", "loss_ptr": f"*{ldt}",
                                          "stats_ptr": "*fp32", "C": "i32", "INNER": "i32", "M": "i32",
                                          "ignore_index": "i32", "eps": "fp32", **cxm},
                                         {"PROB": prob, "HAS_W": has_w, "BLOCK_C": bc, "BLOCK_I": bi}, num_warps=warps,
                                         label=lab + f" loss={ldt}"))
                for has_dt in ((False, True) if prob else (False,)):
                    specs.append(AotSpec(_ce_bwd_mid_kernel,
                                         {"x_ptr": f"*{dt}", "t_ptr": f"*{tdt}", "w_ptr": f"*{dt}", "stats_ptr": "*fp32",
                                          "g_ptr": f"*{dt}", "stride_g": "i32", "mean": "i32", "dx_ptr": f"*{dt}",
                                          "dt_ptr": f"*{dt}", "C": "i32", "INNER": "i32", "M": "i32",
                                          "ignore_index": "i32", "eps": "fp32", "HAS_DT": "constexpr", **cxm},
                                         {"PROB": prob, "HAS_W": has_w, "HAS_DT": has_dt, "BLOCK_C": bc, "BLOCK_I": bi},
                                         num_warps=warps, label=lab + f" dt={has_dt}"))
        # the finishing reduction: 'sum'; 'mean' over probabilities; over indices, without and with weights
        blk, warps = _CE_REDUCE
        for mean, prob, has_w in ((False, False, False), (True, True, False), (True, False, False), (True, False, True)):
            idx = mean and not prob
            specs.append(AotSpec(_ce_reduce_kernel,
                                 {"loss_ptr": "*fp32", "t_ptr": "*i64" if idx else "*fp32",
                                  "w_ptr": f"*{dt}" if has_w else "*fp32", "out_ptr": f"*{dt}", "stats_ptr": "*fp32",
                                  "M": "i32", "C": "i32", "ignore_index": "i32", "eps": "fp32", "MEAN": "constexpr",
                                  "PROB": "constexpr", "HAS_W": "constexpr", "BLOCK": "constexpr"},
                                 {"MEAN": mean, "PROB": prob, "HAS_W": has_w, "BLOCK": blk}, num_warps=warps,
                                 label=f"{dt} {'mean' if mean else 'sum'}{' prob' if prob else ''} weight={has_w}"))
    blk, warps = _CE_CHECK
    specs.append(AotSpec(_ce_target_check_kernel, {"t_ptr": "*i64", "out_ptr": "*i64", "M": "i32", "C": "i32",
                                                   "ignore_index": "i32", "BLOCK": "constexpr"},
                         {"BLOCK": blk}, num_warps=warps, label="int64 targets"))
    return specs


# linear's operand layouts as a launch specialises them (see launched_specs): the strides that
# are 1 in each of its three GEMMs (fwd x @ w^T: A row-major, B = w^T column-major; dgrad dY @ w:
# both row-major; wgrad dY^T @ x: A column-major), C always a fresh row-major tensor
LINEAR_UNIT_STRIDES = {"rc": ("stride_ak", "stride_bk", "stride_cn"), "rr": ("stride_ak", "stride_bn", "stride_cn"),
                       "cr": ("stride_am", "stride_bn", "stride_cn")}
_DIVISIBLE = ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
              "stride_cm")


def launched_specs():
    """The pointer matmul's configurations as linear launches them at sizes like the benchmark's
    (8192x4096 -> 4096): each of linear's three layouts, its unit strides specialised to 1 (Triton's
    JIT compiles any int argument equal to 1 as the constant 1) and every other pointer and int a
    multiple of 16. :func:`aot_specs` compiles the general form instead (no unit stride, no
    divisibility: it serves every launch, but the SASS it gives is not the one that runs on these
    calls: more registers, spills the launched forms do not have, half-precision tiles without the
    software pipeline). ``gpu-nn sass --launched`` compiles these; the TMA kernel's specs are
    already in their launched form. Also the softmax row kernels as aligned rows whose length is
    a multiple of 16 launch them (:meth:`AotSpec.aligned`)."""
    specs = []
    for spec in aot_specs():
        if spec.kernel in (_softmax_fwd_kernel, _softmax_bwd_kernel):
            # the row kernels as rows of a multiple of 16 elements launch them: 128-bit accesses
            specs.append(spec.aligned())
        if spec.kernel is not _matmul_kernel:
            continue
        for lay, units in LINEAR_UNIT_STRIDES.items():
            sig, ce = dict(spec.signature), dict(spec.constexprs)
            for name in units:
                sig[name] = "constexpr"
                ce[name] = 1
            specs.append(AotSpec(spec.kernel, sig, ce, num_warps=spec.num_warps, num_stages=spec.num_stages,
                                 label=f"{spec.label} launched {lay}",
                                 divisible_by_16=tuple(a for a in _DIVISIBLE if a not in units)))
    return specs
