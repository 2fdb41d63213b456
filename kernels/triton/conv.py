"""Triton implicit-GEMM convolution kernels: forward (fused bias + activation), backward data
(dgrad) and backward weight (wgrad).

Every tensor is 4-D ``[N, C, H, W]`` addressed through its strides, so NCHW, channels_last and
strided views run without a copy; conv1d runs as H = 1. Per group ``g`` (grid axis 2):

* forward  ``y[n, o, p, q] = act(b[o] + sum_{c, i, j} x[n, gCg + c, p*sh - pt + i*dh, q*sw - pl + j*dw] * w[o, c, i, j])``
  as a GEMM with M = N*Ho*Wo output pixels, N = Og output channels, K = kh*kw taps x Cg channels;
* dgrad    ``gx[n, c, h, w] = sum_{o, i, j} g[n, o, (h + pt - i*dh)/sh, (w + pl - j*dw)/sw] * w[o, c, i, j]``
  (terms whose division is inexact or out of range vanish): M = N*H*W, N = Cg, K = taps x Og;
* wgrad    ``gw[o, c, i, j] = sum_{n, p, q} g[n, o, p, q] * x[n, gCg + c, p*sh - pt + i*dh, q*sw - pl + j*dw]``:
  a GEMM per tap with M = Og, N = Cg and K = N*Ho*Wo, split over K into float32 partial sums
  (``SPLIT`` programs) that the launcher adds up, so small weights still fill the GPU.

The im2col matrix never exists in memory: each program gathers its A tile straight from the
input with masked loads (zero padding = ``other=0``). The K loop runs taps outside, channels
inside (or, in the forward's ``FLAT_K`` candidates, as one loop over both, so that Triton's
software pipeline spans taps; its ``SPLIT_K`` form splits that loop over float32 partial
sums for deep layers whose output tiles do not fill the GPU), so in channels_last (unit
channel stride) the A and B tiles are read along contiguous channels: with channel counts that
are multiples of 16 Triton compiles 128-bit cp.async copies (``NHWC_CONFIGS``). NCHW tensors
are read in place as well (no transpose pass), along the pixel axis, with per-element gathers; where a measuring chooser runs (a GPU), NCHW problems in half
precision or TF32 with channel counts in multiples of 16 also get "via channels_last"
candidates (``VIA_CL``: NHWC copies in, the NHWC specialisation, an NHWC temporary copied out;
the TMA forward instead stores the NCHW output itself through a descriptor where TMA can
describe it, ``Y_DESC``), taken only where they time faster. Inputs are float32 / float16 / bfloat16,
accumulation is float32; float32 ``tl.dot`` runs with the ``PREC`` input precision the launcher
chooses ("ieee", or "tf32" when torch allows TF32). Offsets that scale with the batch or a
spatial index are int64, so tensors above 2^31 elements address correctly; the pixel number
itself (batch x positions) is int32, so a launch takes at most 2^30 pixels
(``gpu_nn.ops.conv.PIXELS_MAX``, half the range: the sums over pixel numbers stay in it; the
public functions run a larger batch in chunks).

Few channels per group (an RGB stem) leave most of a channel block idle; the ``PACKED`` forms
run the forward's K loop and the weight gradient's columns over (channel, tap) pairs instead.

NCHW tensors have their pixels adjacent and their channels H*W apart, but the pixel index comes
through a division, so Triton's coalescing pass cannot see that contiguity and its default layout
puts a warp's lanes on the channel axis; launches on such tensors therefore load (and store)
their pixel x channel tiles transposed, lanes on pixels (``A_PIX`` / ``Y_PIX`` / ``B_PIX``,
``PIX_FAST`` in the depthwise kernels; :func:`pixels_adjacent`).

On devices with TMA, one-group problems in half precision or TF32 are also offered
``_conv_tma_*`` kernels (forward, input and weight gradient): a block of BH x BW pixels of one
image reads each (tap, channel block) as one TMA box of the NHWC tensor, the padding filled with
zeros by the copy engine; measured candidates only (``TMA``). Strided layers too (``STRIDED``
forms, ``TMA_STRIDED``): the input as [N, H/SH, SH, W/SW, SW*C], the input gradient's pixels
by residue class.

A strided convolution's pointer input gradients (``_conv_dgrad_kernel``,
``_conv_dw_dgrad_kernel``) take the input pixels by stride residue class too
(:func:`dgrad_grid_m`), so that a program runs only the taps that reach its pixels.

Depthwise convolutions (one input channel per group: groups = C, weight [C*mult, 1, kh, kw])
have no GEMM to feed (K = taps only), so they run through dedicated FMA kernels
(``_conv_dw_*``) over [pixels x channels] tiles instead of a 16-wide dot tile with one live lane.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import memo
from . import INTERPRET as INTERPRETED
from ._aot import AotSpec
from ._compat import parallel_compile, triton_version
from ._launch import cdiv
from ._launch import launch as launch_kernel
from .activation import ACT_CODES, _epilogue_act
from .dense import _device_index, _has_tma, _tma_operand

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the sm_90 configurations the heuristics
# may pick, per operand width; every tl.dot tile is >= 16 on each side. float32 operands take
# K = 16 and two stages: with K = 32 or three stages the gathered pointer tiles spill
# registers (checked by the AOT compile, see aot_specs). Register use is dominated by the
# int64 pointer tiles of the gathered loads, not by the accumulator.
GPU_CONFIGS = {
    "fp32": {
        "large": (128, 64, 16, 8, 2),
        "small": (64, 32, 16, 4, 2),
    },
    "half": {
        "large": (128, 64, 32, 8, 3),
        "medium": (64, 64, 32, 4, 3),
        "small": (64, 32, 32, 8, 3),  # 4 warps: dgrad spills (255 registers)
    },
}
# Extra forward configuration for measured choice only (pick_config never returns it): the
# float32 large tile with a third stage (sm_90 AOT: 192 registers ieee, 202 tf32; no spills).
# Larger generic tiles (128x128; 128x32 or K = 64 in half precision; 64x64x16 in fp32 ieee)
# spill with this kernel's gathered int64 pointer tiles (255 registers plus 24-490 bytes of
# stack), and half's 128x64x32/4st (234 registers) and 64x128x32/3st (188) were left out to
# keep the list and the compile time short.
TUNE_CONFIGS = {
    "fp32": {
        "large3": (128, 64, 16, 8, 3),
    },
    "half": {},
}
# Forward tiles for channels_last problems whose channel counts and strides are multiples of
# 16 (nhwc_specialised), fp16 / bf16 / tf32 only: with unit channel strides and those
# divisibilities (what Triton's JIT specialises at run time) the gathered A tile is read along
# contiguous channels with 128-bit cp.async copies and the pointer arithmetic shrinks, so
# cuDNN-sized tiles fit. sm_90 AOT compile of that specialisation: half 128x128x64/3st 157
# registers, tf32 128x128x32/3st 160; no spills, HGMMA, LDGSTS.E.BYPASS.128 (ieee float32 at
# 128x128x32 spills: it is not a candidate). The same tiles without the specialisation spill
# (255 registers + stack), so only such problems get them.
# Added as measured candidates (sm_90 AOT, Triton 3.9, registers / shared memory, no spills,
# HGMMA in each): tf32 128x128x32 with 4 stages 161 / 128 KB; tf32 128x128x64/3st 225 / 192 KB;
# half 128x128x64 with 4 stages 162 / 128 KB; half 128x256x32/3st 199 / 72 KB and 256x128x32/3st
# 204 / 72 KB. Tried and left out: half 128x256x64/3st (244 registers, 144 KB) and 256x128x64/3st
# (252 registers, 144 KB): no spills, but at the register limit, one codegen change from spilling.
NHWC_CONFIGS = {
    "fp32": {
        "nhwc128k32": (128, 128, 32, 8, 3),
        "nhwc128k32s4": (128, 128, 32, 8, 4),
        "nhwc128k64": (128, 128, 64, 8, 3),
    },
    "half": {
        "nhwc128k64": (128, 128, 64, 8, 3),
        "nhwc128k64s4": (128, 128, 64, 8, 4),
        "nhwc128x256": (128, 256, 32, 8, 3),
        "nhwc256x128": (256, 128, 32, 8, 3),
    },
}
# The forward candidates a measuring chooser times, by name (GPU_CONFIGS, TUNE_CONFIGS or
# NHWC_CONFIGS), for (operand width, NHWC tiles eligible: nhwc_specialised and not ieee fp32).
# The generic tiles stay among the channels_last candidates: on the H200 (82f8513) they won
# bf16 64x56^2 and 512x7^2 and fp32 64x56^2 against nhwc128k*.
FWD_CANDIDATES = {
    ("fp32", False): ("large", "small", "large3"),
    ("half", False): ("large", "medium", "small"),
    ("fp32", True): ("large", "large3", "nhwc128k32", "nhwc128k32s4", "nhwc128k64"),
    ("half", True): ("large", "medium", "nhwc128k64", "nhwc128k64s4", "nhwc128x256", "nhwc256x128"),
}
# "Via channels_last": extra forward candidates for problems that are not channels_last but whose
# channel counts per group are multiples of 16 (fp16 / bf16 / tf32): x and w are copied to
# channels_last (one pass each), the forward runs on the copies, into a channels_last y that is
# copied into the caller's y (one pass). cuDNN runs NCHW convolutions the same way (its NHWC
# implicit GEMM between two transposes); whether the three copies cost less than the direct
# kernel's per-element NCHW gathers is measured, per problem, never assumed. A candidate of this
# variant is its configuration tuple with VIA_CL appended (so the tuning cache and the
# GPU_NN_TUNE_RECORD rows name the variant); the tiles by name, as in FWD_CANDIDATES:
VIA_CL = "via_channels_last"
FWD_VIA_CL = {
    "fp32": ("large3", "nhwc128k32"),
    "half": ("large", "nhwc128k64"),
}
# "Flat K": forward candidates whose K loop is one loop over (tap, channel block) pairs
# (``_conv_fwd_kernel``'s FLAT_K) instead of taps outside, channel blocks inside. Triton
# pipelines only the innermost loop: nested, that loop has cdiv(CG, BLOCK_K) trips (one at 64
# channels and BLOCK_K 64), so no load of the next tap is in flight while a tap's dot runs; flat,
# the stages overlap across taps. A candidate of this variant is its tile tuple with FLAT
# appended (before VIA_CL where both apply); by tile name, per (operand width, NHWC tiles eligible):
FLAT = "flat_k"
FWD_FLAT = {
    ("fp32", False): ("large3",),
    ("half", False): ("large",),
    ("fp32", True): ("nhwc128k32", "nhwc128k32s4"),
    ("half", True): ("nhwc128k64", "nhwc128k64s4"),
}
FWD_VIA_CL_FLAT = {"fp32": ("nhwc128k32",), "half": ("nhwc128k64",)}
# Split K: flat-K candidates whose K loop is split over grid axis 2 into float32 partial sums
# (a workspace [S, N*Ho*Wo, O]) that _conv_splitk_reduce_kernel adds up with the bias and the
# activation. Offered only to one-group problems whose output tiles make less than a wave of
# SPLIT_WAVE programs (deep layers: 512 channels at 7x7 and N = 32 make 52 tiles of 128x128 for
# 132 SMs); the split count (split_count) brings the programs to about two waves. As
# ``(*tile, FLAT, SPLIT)``, by tile name per (operand width, NHWC tiles eligible):
SPLIT = "split_k"
FWD_SPLIT = {
    ("fp32", False): ("large3",),
    ("half", False): ("large",),
    ("fp32", True): ("nhwc128k32",),
    ("half", True): ("nhwc128k64",),
}
# The input gradient's split: its taps (whole taps: each keeps its own accumulator) over grid
# axis 2, by tile name in DGRAD_CONFIGS / DGRAD_NHWC_CONFIGS, as ``(*tile, SPLIT)``:
DGRAD_SPLIT = {
    ("fp32", False): ("large",),
    ("half", False): (),  # half's "large" split takes all 255 registers (sm_90 AOT): one codegen change from spilling
    ("fp32", True): ("nhwc128x64k32",),
    ("half", True): ("nhwc128x64k64",),
}
# "Packed K": forward candidates whose K loop runs over the group's (channel, tap) pairs one by
# one (``_conv_fwd_kernel``'s PACKED_K) instead of a channel block per tap, for problems with
# fewer channels per group than the tile's BLOCK_K and more than one tap (an RGB stem: 3 x 49
# pairs in 5 trips of 32 instead of 49 trips of a 32-wide block holding 3 channels). The
# heuristic takes it where at least half of each channel block would be idle (packs()); a
# measuring chooser times it beside the nested loop wherever any of the block is. As
# ``(*tile, PACKED)``, by tile name per operand width (the generic tiles; a channels_last
# problem of 16 channels gets them beside the NHWC tiles, whose 32- or 64-wide channel blocks it
# would fill by half or a quarter):
PACKED = "packed_k"
FWD_PACKED = {"fp32": ("large", "small", "large3"), "half": ("large", "medium", "small")}
# The TMA forward (``_conv_tma_fwd_kernel``): measured candidates only, where the device has TMA
# and wgmma (compute capability 9+), for one-group problems in half precision or TF32
# whose channel count is a multiple of the tile's BLOCK_K: each (tap, channel block) of a block
# of output pixels is one TMA box of the NHWC input, zero-filled in the padding by the copy
# engine, so the K loop has no address arithmetic, masks or gathers (the pointer kernels' int64
# pointer tiles are what limits their tiles). As ``(BH, BW, BLOCK_N, BLOCK_K, num_warps,
# num_stages, TMA)``: a BH x BW block of output pixels of one image (BLOCK_M = BH * BW) by
# BLOCK_N output channels; the blocks waste the pixels past the image's edge (7x7 in 8x8: 77 %
# used; 28 wide in 4x32: 87.5 %), so several shapes are offered. sm_90 AOT in the specs below:
# no spills, HGMMA (A from registers: the box is reshaped to [BLOCK_M, BLOCK_K] after its
# shared-memory load), UTMALDG for both operands.
TMA = "tma"
TMA_CONFIGS = {
    "half": {"tma8x16": (8, 16, 128, 64, 8, 3), "tma4x32": (4, 32, 128, 64, 8, 3), "tma8x8": (8, 8, 128, 64, 4, 4),
             "tma8x16n64": (8, 16, 64, 64, 4, 4)},
    "fp32": {"tma8x16": (8, 16, 128, 32, 8, 3), "tma4x32": (4, 32, 128, 32, 8, 3), "tma8x8": (8, 8, 128, 32, 4, 3)},
}
# the TMA tile NCHW problems (channel counts in multiples of its BLOCK_K) are offered on
# channels_last copies (the via-channels_last variant: ``(*tile, TMA, VIA_CL)``)
TMA_VIA_CL = {"half": ("tma8x16",), "fp32": ("tma8x16",)}
# the TMA forward's tile in the interpreter tests (BLOCK_M = 16)
TMA_INTERP_CONFIG = (2, 8, 16, 16, 4, 1, TMA)
# The TMA input gradient (``_conv_tma_dgrad_kernel``), on the same terms (one group, half or
# TF32; strided: dilation 1) for output channel counts in multiples of BLOCK_K: a BH x BW block of input
# pixels by BLOCK_N input channels. It keeps two accumulators (the running sum and the tap's),
# so its 128-channel tiles take 191 (half) / 201 (TF32) registers against the forward's 138 /
# 144 (sm_90 AOT, no spills, HGMMA, UTMALDG); 64-channel tiles take 112-126.
DGRAD_TMA_CONFIGS = {
    "half": {"tma8x16": (8, 16, 128, 64, 8, 3), "tma8x16n64": (8, 16, 64, 64, 8, 3), "tma8x8": (8, 8, 64, 64, 4, 4)},
    "fp32": {"tma8x16": (8, 16, 128, 32, 8, 3), "tma8x16n64": (8, 16, 64, 32, 8, 3)},
}
DGRAD_TMA_VIA_CL = {"half": ("tma8x16n64",), "fp32": ("tma8x16n64",)}
DGRAD_TMA_INTERP_CONFIG = (2, 8, 16, 16, 4, 1, TMA)
# The TMA weight gradient (``_conv_tma_wgrad_kernel``), same terms, any channel counts whose
# NHWC rows are whole 16-byte units: (BH, BW, BLOCK_C, BLOCK_O, num_warps, num_stages, TMA), a
# tap's BLOCK_C x BLOCK_O tile of the weight gradient summed over blocks of BH x BW output
# pixels. Its operands are reshaped and x's transposed in the kernel, which costs shared memory:
# sm_90 AOT, registers / shared memory, no spills, HGMMA and UTMALDG: half 128x128 over 8x8
# pixels 162 / 88 KB, 64x64 over 8x16 124 / 84 KB and over 8x8 (4 stages) 88 / 60 KB; TF32
# 128x128 over 8x8 (2 stages) 153 / 128 KB, 64x64 over 8x8 120 / 96 KB. Left out: half 128x128
# over 8x16 (168 KB), TF32 64x64 over 8x16 (192 KB) and 128x64 over 8x16 (288 KB: more than an
# SM has).
WGRAD_TMA_CONFIGS = {
    "half": {"tma8x8": (8, 8, 128, 128, 8, 3), "tma8x16c64": (8, 16, 64, 64, 4, 3), "tma8x8c64": (8, 8, 64, 64, 4, 4)},
    "fp32": {"tma8x8": (8, 8, 128, 128, 8, 2), "tma8x8c64": (8, 8, 64, 64, 4, 3)},
}
WGRAD_TMA_INTERP_CONFIG = (2, 8, 16, 16, 4, 1, TMA)
SPLIT_WAVE = 132
SPLIT_TARGET_PROGRAMS = 264
SPLIT_MAX = 16
REDUCE_BLOCKS = (32, 64, 4)  # BLOCK_M, BLOCK_N, num_warps of the split-K finish
# The specialisation NHWC_CONFIGS are compiled (and launched) with: unit channel strides, and
# these pointers / ints multiples of 16.
NHWC_UNIT = ("stride_xc", "stride_wc", "stride_yc")
NHWC_DIV16 = ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "CG", "OG",
              "stride_xn", "stride_xh", "stride_xw", "stride_wo", "stride_wh", "stride_ww",
              "stride_yn", "stride_yh", "stride_yw")
# The same specialisation for the input gradient (dgrad reads g along its channels and w along
# its input channels: unit stride_gc / stride_wc, and writes dx along its channels).
DGRAD_NHWC_UNIT = ("stride_gc", "stride_wc", "stride_dc")
DGRAD_NHWC_DIV16 = ("g_ptr", "w_ptr", "dx_ptr", "CG", "OG",
                    "stride_gn", "stride_gh", "stride_gw", "stride_wo", "stride_wh", "stride_ww",
                    "stride_dn", "stride_dh", "stride_dw")
# Input-gradient tiles in that specialisation (fp16 / bf16 / tf32), measured candidates only.
# dgrad keeps two accumulators (the running sum and the tap's, see _conv_dgrad_kernel), so its
# tiles stop short of the forward's: sm_90 AOT, registers / shared memory, no spills, HGMMA: tf32
# 128x64x32/3st 190 / 72 KB, half 128x64x64/3st 178 / 72 KB; in the specialisation the generic
# "large" tile takes 120 (tf32) / 124 (half). 128x128 (tf32 x32: 246 registers, half x64: 244)
# does not spill but sits at the register limit: left out.
DGRAD_NHWC_CONFIGS = {
    "fp32": {"nhwc128x64k32": (128, 64, 32, 8, 3)},
    "half": {"nhwc128x64k64": (128, 64, 64, 8, 3)},
}
# The via-channels_last input-gradient candidates (as FWD_VIA_CL: g and w copied to NHWC, dx
# through an NHWC temporary), by tile name in DGRAD_CONFIGS (below) / DGRAD_NHWC_CONFIGS.
DGRAD_VIA_CL = {
    "fp32": ("large", "nhwc128x64k32"),
    "half": ("large", "nhwc128x64k64"),
}
# The input gradient's generic tiles: GPU_CONFIGS with the float32 "large" tile replaced. dgrad
# keeps two accumulators, and with the forward's 128x64x16 / 8 warps / 2 stages ieee float32
# spills there (sm_90 AOT, Triton 3.9: 255 registers and a 16-byte stack frame, also in the
# specialisation NCHW launches take, unit stride_gw / stride_ww / stride_dw); 128x32x16 takes 189
# registers, no spills. Half's "medium" 64x64x32 with the forward's 4 warps spilled in the input
# gradient: Triton 3.6 (the H200 image's) 112 bytes in the NCHW (pixels-fastest) form and 48 as
# an NCHW launch at bf16 N=32 C=O=128 28x28 specialises it (255 registers; the heuristic's tile
# for the 128x28^2, 256x14^2 and 512x7^2 layers), Triton 3.9 16 in the generic form; with 8
# warps no form spills under either (sm_90 AOT: 3.6 123-193 registers, 3.9 100-171; HGMMA in each).
DGRAD_REPLACED = {
    "fp32": {"large": (128, 32, 16, 8, 2)},
    "half": {"medium": (64, 64, 32, 8, 3)},
}
DGRAD_CONFIGS = {key: {**table, **DGRAD_REPLACED[key]} for key, table in GPU_CONFIGS.items()}
# One small fixed configuration under the interpreter: few Python-level programs.
INTERP_CONFIG = (64, 16, 16, 4, 1)
WGRAD_TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs
# (BLOCK_P, BLOCK_C, num_warps) of the depthwise FMA kernels, on a GPU and in the interpreter.
DW_CONFIG = (64, 32, 8)  # 4 warps: the dgrad spills (255 registers)
# The depthwise forward's candidates for a measuring chooser (DW_CONFIG first: the heuristic's),
# (BLOCK_P, BLOCK_C, num_warps): longer pixel runs for the pixels-fastest (NCHW) form, wider
# channel runs for channels_last; each compiled for sm_90 in both forms and every dtype without
# spills (aot_specs). An FMA kernel: nothing but the tile and its warps to choose.
DW_FWD_CANDIDATES = ((64, 32, 8), (128, 16, 4), (128, 32, 8), (32, 64, 8), (16, 128, 8))
DW_INTERP_CONFIG = (64, 16, 4)


@triton.jit
def _split_pos(m, RH, RW):
    """Flat index over [N, RH, RW] -> (n, row, col)."""
    plane = RH * RW
    r = m % plane
    return m // plane, r // RW, r % RW


@triton.jit
def _tap_source(oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW):
    """Input pixel read by tap (i, j) of output pixel (oh, ow), and whether it is inside the
    input (outside is zero padding)."""
    ih = oh * SH - PH + i * DH
    iw = ow * SW - PW + j * DW
    return ih, iw, (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)


@triton.jit
def _residue_class(pid, nblk, SH, SW):
    """Program ``pid`` of a grid axis that runs ``nblk`` blocks of each stride residue class in
    turn: ``(block within its class, rh, rw)``. Folds to ``(pid, 0, 0)`` in a stride-1 launch
    (SH, SW == 1 are constants there)."""
    cls = tl.where(SH * SW == 1, 0, pid // nblk)
    rh = cls // SW
    return pid - cls * nblk, rh, cls - rh * SW


@triton.jit
def _residue_block(pid, N, H, W, SH, SW, BLOCK_M: tl.constexpr):
    """Program ``pid``'s input pixels when they are taken by stride residue class (see
    :func:`dgrad_grid_m`): ``(n, hq, wq, in range, rh, rw)`` for the pixels ``(hq * SH + rh, wq
    * SW + rw)``, ``rh`` and ``rw`` scalars. Class ``(rh, rw)`` has ``cdiv(N * HQ * WQ,
    BLOCK_M)`` blocks (HQ = cdiv(H, SH), WQ = cdiv(W, SW); a class short of a row or column
    masks it); classes follow one another along the grid axis. Stride 1: one class, the pixels
    in their usual order."""
    HQ = tl.cdiv(H, SH)
    WQ = tl.cdiv(W, SW)
    MQ = N * HQ * WQ
    blk, rh, rw = _residue_class(pid, tl.cdiv(MQ, BLOCK_M), SH, SW)
    offs = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    n, hq, wq = _split_pos(offs, HQ, WQ)
    return n, hq, wq, (offs < MQ) & (hq * SH + rh < H) & (wq * SW + rw < W), rh, rw


@triton.jit
def _class_tap(hq, wq, rh, rw, i, j, Ho, Wo, SH, SW, PH, PW, DH, DW):
    """For pixels ``(hq * SH + rh, wq * SW + rw)`` of one residue class and a tap (i, j) whose
    offsets the stride divides (``(rh + PH - i*DH) % SH == 0``, likewise w): the output pixel
    the tap takes each from, and whether it exists. The divisions are scalar and exact."""
    oh = hq + (rh + PH - i * DH) // SH
    ow = wq + (rw + PW - j * DW) // SW
    return oh, ow, (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)


@triton.jit
def _fwd_tap(x_row, w_col, oh, ow, m_ok, i, j, H, W, SH, SW, PH, PW, DH, DW, stride_xh, stride_xw, stride_wh,
             stride_ww):
    """The forward's tap (i, j): the A rows (input pixels it reads, ``m_ok`` and inside the
    input) and the B columns (the weights' tap) of the program's tile."""
    ih, iw, inside = _tap_source(oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW)
    return x_row + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw, \
        w_col + i * stride_wh + j * stride_ww, m_ok & inside


@triton.jit
def _pix(v, PIX_FAST: tl.constexpr):
    """A vector over the tile's pixels as a tile axis: columns (the fastest axis of Triton's
    default layout: consecutive lanes on consecutive pixels) with ``PIX_FAST``, else rows."""
    if PIX_FAST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _chan(v, PIX_FAST: tl.constexpr):
    """A vector over the tile's channels as the other tile axis (see :func:`_pix`)."""
    if PIX_FAST:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _orient(t, PIX_FAST: tl.constexpr):
    """A [pixels, channels] tile as :func:`_pix` / :func:`_chan` lay tiles out ([channels,
    pixels] with ``PIX_FAST``), or such a tile back as [pixels, channels]: its transpose with
    ``PIX_FAST``, else itself."""
    if PIX_FAST:
        return tl.trans(t)
    else:
        return t


@triton.jit
def _load_oriented(pix_ptr, chan, chan_stride, pix_ok, chan_ok, PIX_FAST: tl.constexpr):
    """The [pixels, channels] tile at ``pix_ptr`` (a pointer per pixel) + ``chan`` (channel
    indices) x ``chan_stride``, zero where masked, loaded in :func:`_pix`'s layout (lanes on
    pixels with ``PIX_FAST``: NCHW tensors) and returned as [pixels, channels] for the dot. The
    indices are widened and scaled after their broadcast, as the kernels always did (scaled
    first, the forward's small tiles took 20-25 % more registers, sm_90 AOT)."""
    return _orient(tl.load(_pix(pix_ptr, PIX_FAST) + _chan(chan, PIX_FAST).to(tl.int64) * chan_stride,
                           mask=_pix(pix_ok, PIX_FAST) & _chan(chan_ok, PIX_FAST), other=0.0), PIX_FAST)


@triton.jit
def _store_oriented(ptr, pix_off, chan_off, tile, pix_ok, chan_ok, PIX_FAST: tl.constexpr):
    """Store the [pixels, channels] ``tile`` at ``ptr`` + ``pix_off`` (an offset per pixel) +
    ``chan_off`` (one per channel) in :func:`_pix`'s layout, converted to ``ptr``'s element type.
    The offsets are summed before the pointer is added, as the forward's store always did: with
    a pointer per pixel formed first, its float32 tiles took up to 255 registers and spilled
    (sm_90 AOT)."""
    tl.store(ptr + (_pix(pix_off, PIX_FAST) + _chan(chan_off, PIX_FAST)),
             _orient(tile, PIX_FAST).to(ptr.dtype.element_ty), mask=_pix(pix_ok, PIX_FAST) & _chan(chan_ok, PIX_FAST))


@triton.jit
def _fwd_block(acc, a_row, b_col, pix_ok, o_ok, c0, CG, stride_xc, stride_wc, PREC: tl.constexpr,
               BLOCK_K: tl.constexpr, A_PIX: tl.constexpr = False):
    """acc + the products of one tap's channel block ``c0 .. c0 + BLOCK_K``; ``A_PIX``: the A
    tile loaded as [channels, pixels] and transposed (see ``_conv_fwd_kernel``)."""
    cc = c0 + tl.arange(0, BLOCK_K)
    c_ok = cc < CG
    a = _load_oriented(a_row, cc, stride_xc, pix_ok, c_ok, A_PIX)
    b = tl.load(b_col[None, :] + cc[:, None].to(tl.int64) * stride_wc, mask=c_ok[:, None] & o_ok[None, :], other=0.0)
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                     N, H, W, Ho, Wo, KW, TAPS, CG, OG,
                     stride_xn, stride_xc, stride_xh, stride_xw,
                     stride_wo, stride_wc, stride_wh, stride_ww,
                     stride_yn, stride_yc, stride_yh, stride_yw,
                     SH, SW, PH, PW, DH, DW,
                     HAS_BIAS, ACT, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     FLAT_K: tl.constexpr = False, SPLIT_K: tl.constexpr = False, PACKED_K: tl.constexpr = False,
                     A_PIX: tl.constexpr = False, Y_PIX: tl.constexpr = False):
    """``A_PIX``: the A tile (input pixels x channels) loaded as [channels, pixels] and
    transposed for the dot, so that Triton's default layout puts a warp's lanes on consecutive
    pixels: in NCHW (pixels adjacent along W, channels H*W apart) its loads then cover
    consecutive addresses, where the [pixels, channels] load puts the lanes on channels (one
    sector per lane). The pixel axis's contiguity is invisible to Triton's analysis (the pixel
    index comes through a division), so the load's own layout never follows the memory order.
    ``Y_PIX`` (not with SPLIT_K): the result stored the same way, [channels, pixels].

    ``PACKED_K``: the K loop over the group's ``CG * TAPS`` (channel, tap) pairs one by one,
    ``kk = c * TAPS + t`` (the weight's own order), ``BLOCK_K`` pairs a trip, instead of a
    channel block per tap: for few channels (an RGB stem: 3 channels x 49 taps is 5 trips of
    32 pairs instead of 49 trips whose 32-wide channel block holds 3). Each A element then has
    its own tap, so the row and column parts of its address and of its padding test are added
    per element (the address is separable: ``row(m) + col(kk)``). Same products, summed in
    another order.

    ``FLAT_K``: the K loop as one loop over (tap, channel block) pairs instead of taps outside
    and channel blocks inside. Triton pipelines (``num_stages``) only the innermost loop, whose
    trip count in the nested form is ``cdiv(CG, BLOCK_K)``: one or two at 64 or 128 channels, so
    the loads of one tap are never in flight while the previous tap's dot runs. Flat, the loop
    has ``TAPS * cdiv(CG, BLOCK_K)`` trips (9 and more for a 3x3 kernel) and the stages overlap
    across taps, at the cost of the tap's index math in every trip. Same results either way
    (the same products summed in the same order).

    ``SPLIT_K`` (with FLAT_K, one group): grid axis 2 splits the K loop into ``num_programs(2)``
    contiguous ranges; split ``s`` stores its float32 partial product, no bias or activation,
    at ``y + s * N * Ho * Wo * OG`` (``y`` the float32 workspace [S, N, Ho, Wo, OG] that
    ``_conv_splitk_reduce_kernel`` sums into the output): for problems whose output tiles do
    not fill the GPU (deep layers: few pixels, a long K)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SPLIT_K:
        grp = 0
        split = tl.program_id(2)
        nsplit = tl.num_programs(2)
    else:
        grp = tl.program_id(2)
        split = 0
        nsplit = 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < N * Ho * Wo
    o_ok = offs_o < OG
    n, oh, ow = _split_pos(offs_m, Ho, Wo)
    x_row = x_ptr + n.to(tl.int64) * stride_xn + (grp * CG).to(tl.int64) * stride_xc
    oc = grp * OG + offs_o
    w_col = w_ptr + oc.to(tl.int64) * stride_wo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PACKED_K:
        KTOT = CG * TAPS
        nkb = tl.cdiv(KTOT, BLOCK_K)
        per = tl.cdiv(nkb, nsplit)
        ohs = oh * SH - PH  # the window's top-left input pixel (may lie in the padding)
        ows = ow * SW - PW
        a_row = x_row + ohs.to(tl.int64) * stride_xh + ows.to(tl.int64) * stride_xw
        for kb in range(split * per, tl.minimum(split * per + per, nkb)):
            kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = kk < KTOT
            c = kk // TAPS
            t = kk - c * TAPS
            i = t // KW
            j = t - i * KW
            di = i * DH
            dj = j * DW
            a_col = c.to(tl.int64) * stride_xc + di.to(tl.int64) * stride_xh + dj.to(tl.int64) * stride_xw
            ih = _pix(ohs, A_PIX) + _chan(di, A_PIX)
            iw = _pix(ows, A_PIX) + _chan(dj, A_PIX)
            a_ok = (_pix(m_ok, A_PIX) & _chan(k_ok, A_PIX)) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = _orient(tl.load(_pix(a_row, A_PIX) + _chan(a_col, A_PIX), mask=a_ok, other=0.0), A_PIX)
            b_row = c.to(tl.int64) * stride_wc + i * stride_wh + j * stride_ww
            b = tl.load(w_col[None, :] + b_row[:, None], mask=k_ok[:, None] & o_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=tl.float32)
    elif FLAT_K:
        KC = tl.cdiv(CG, BLOCK_K)
        per = tl.cdiv(TAPS * KC, nsplit)
        for kk in range(split * per, tl.minimum(split * per + per, TAPS * KC)):
            t = kk // KC
            c0 = (kk - t * KC) * BLOCK_K
            i = t // KW
            a_row, b_col, pix_ok = _fwd_tap(x_row, w_col, oh, ow, m_ok, i, t - i * KW, H, W, SH, SW, PH, PW, DH,
                                            DW, stride_xh, stride_xw, stride_wh, stride_ww)
            acc = _fwd_block(acc, a_row, b_col, pix_ok, o_ok, c0, CG, stride_xc, stride_wc, PREC, BLOCK_K, A_PIX)
    else:
        for t in range(0, TAPS):
            a_row, b_col, pix_ok = _fwd_tap(x_row, w_col, oh, ow, m_ok, t // KW, t % KW, H, W, SH, SW, PH, PW, DH,
                                            DW, stride_xh, stride_xw, stride_wh, stride_ww)
            for c0 in range(0, CG, BLOCK_K):
                acc = _fwd_block(acc, a_row, b_col, pix_ok, o_ok, c0, CG, stride_xc, stride_wc, PREC, BLOCK_K, A_PIX)
    # bias and activation are runtime flags (a uniform branch in the epilogue), not constexprs:
    # eight compiled variants per configuration would buy nothing measurable. Triton's JIT still
    # compiles HAS_BIAS = 1 and ACT = 1 (relu) apart, folded; unspecialised (do_not_specialize)
    # those launches took up to 35 more registers and spilled 16-40 B in two float32 tiles
    # (sm_90, Triton 3.6), so they stay specialised
    if HAS_BIAS != 0:
        bias = tl.load(b_ptr + oc, mask=o_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    acc = _epilogue_act(acc, ACT)
    y_pix = n.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw
    if SPLIT_K:
        y_pix += split.to(tl.int64) * N * Ho * Wo * OG  # this split's slice of the workspace
    _store_oriented(y_ptr, y_pix, oc.to(tl.int64) * stride_yc, acc, m_ok, o_ok, Y_PIX)


@triton.jit(do_not_specialize=["M"])  # M may be 1: never a constexpr (M.to below)
def _conv_splitk_reduce_kernel(ws_ptr, b_ptr, y_ptr, M, O, Ho, Wo, S,
                               stride_yn, stride_yc, stride_yh, stride_yw, HAS_BIAS, ACT,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Y_PIX: tl.constexpr = False):
    """The split-K forward's finish: ``y[n, o, p, q] = act(sum_s ws[s, m, o] + b[o])`` with
    ``m = (n * Ho + p) * Wo + q``, ``ws`` float32 [S, M, O] contiguous, ``y`` any strides;
    ``Y_PIX``: y stored [channels, pixels] (lanes on consecutive pixels: an NCHW y, as
    ``_conv_fwd_kernel``'s), the workspace still read along its contiguous channels."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    o_ok = offs_o < O
    mask = m_ok[:, None] & o_ok[None, :]
    src = ws_ptr + offs_m.to(tl.int64)[:, None] * O + offs_o[None, :]
    plane = M.to(tl.int64) * O
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, S):
        acc += tl.load(src, mask=mask, other=0.0)
        src += plane
    if HAS_BIAS != 0:
        acc = acc + tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    acc = _epilogue_act(acc, ACT)
    n, oh, ow = _split_pos(offs_m, Ho, Wo)
    y_pix = n.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw
    _store_oriented(y_ptr, y_pix, offs_o.to(tl.int64) * stride_yc, acc, m_ok, o_ok, Y_PIX)


@triton.jit
def _pixel_block(blk, HH, WW, BH: tl.constexpr, BW: tl.constexpr):
    """Block ``blk`` of the ``BH x BW`` pixel blocks tiling N images of ``HH x WW``, image-major:
    (image, first row, first column)."""
    blocks_w = tl.cdiv(WW, BW)
    blocks = tl.cdiv(HH, BH) * blocks_w
    n = blk // blocks
    r = blk - n * blocks
    return n, (r // blocks_w) * BH, (r - (r // blocks_w) * blocks_w) * BW


@triton.jit
def _floor_divmod(d, S, P):
    """``(d // S, d % S)`` with floor semantics for ``d >= -P`` (Triton's integer division
    truncates toward zero; ``d + S*P`` is not negative)."""
    q = (d + S * P) // S - P
    return q, d - q * S


@triton.jit
def _conv_tma_fwd_kernel(x_desc, w_desc, b_ptr, y_ptr, Ho, Wo, O, CG, KW, TAPS, PH, PW, DH, DW, SH, SW,
                         stride_yn, stride_yc, stride_yh, stride_yw, HAS_BIAS, ACT, PREC: tl.constexpr,
                         BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         STRIDED: tl.constexpr = False, Y_DESC: tl.constexpr = False):
    """The forward through TMA: ``y`` = act(conv(x, w) + b) for one group, each program
    a ``BH x BW`` block of output pixels of one image (grid axis 0: images x pixel blocks) by
    ``BLOCK_N`` output channels (axis 1).

    ``x_desc`` describes x as NHWC [N, H, W, C] (unit channel stride), box [1, BH, BW, BLOCK_K];
    ``w_desc`` the weight as [O, TAPS * C] in (tap, channel) order (a channels_last weight),
    box [BLOCK_N, BLOCK_K]. At stride 1 the input pixels tap (i, j) reads for a block of output
    pixels are themselves a box, at (oh0 - PH + i*DH, ow0 - PW + j*DW): one TMA copy per (tap,
    channel block), no address arithmetic or masks in the K loop, and the padding comes free
    (the copy engine fills coordinates outside the tensor, negative ones too, with zeros). ``C``
    must be a multiple of BLOCK_K, so that no channel block reaches into the next tap's weights.
    Pixels of the block past Ho or Wo are computed from whatever the box holds and not stored.

    ``STRIDED`` (stride ``SH x SW``): ``x_desc`` describes x as [N, H/SH, SH, W/SW, SW*C]
    (:func:`_strided_view`), box [1, BH, 1, BW, BLOCK_K]; input row ``oh*SH + dh`` is row
    ``oh + qh`` of residue ``rh`` (``dh = qh*SH + rh``, 0 <= rh < SH), so the pixels tap (i, j)
    reads for a block of output pixels are again one box, at (oh0 + qh, rh, ow0 + qw, rw*C +
    c0), and the copy engine's zero fill outside [0, H/SH) is exactly the padding.

    ``Y_DESC``: ``y_ptr`` is a TMA descriptor of an NCHW ``y`` [N, O, Ho, Wo], box [1, BLOCK_N,
    BH, BW] (:func:`_y_descriptor`), and the tile goes out as one TMA store (the copy engine
    drops what lies past O, Ho or Wo). Through pointers an NCHW tile is stored an element at a
    time (pixels are contiguous there, but a thread's accumulator holds channels, and a
    ``ow < Wo`` mask is not known to be constant in vector-wide groups): 64 two-byte stores per
    thread in half precision at half the sectors' bytes (sm_90 SASS), against 128-bit stores
    for an NHWC ``y``. The via-channels_last forward wrote an NHWC temporary and copied it into
    an NCHW ``y`` instead: a further pass over the output."""
    BLOCK_M: tl.constexpr = BH * BW
    n, oh0, ow0 = _pixel_block(tl.program_id(0), Ho, Wo, BH, BW)
    o0 = tl.program_id(1) * BLOCK_N
    KC = CG // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, TAPS * KC):
        t = kk // KC
        c0 = (kk - t * KC) * BLOCK_K
        i = t // KW
        if STRIDED:
            qh, rh = _floor_divmod(i * DH - PH, SH, PH)
            qw, rw = _floor_divmod((t - i * KW) * DW - PW, SW, PW)
            a = x_desc.load([n, oh0 + qh, rh, ow0 + qw, rw * CG + c0])
        else:
            a = x_desc.load([n, oh0 - PH + i * DH, ow0 - PW + (t - i * KW) * DW, c0])
        b = w_desc.load([o0, t * CG + c0])
        acc = tl.dot(tl.reshape(a, (BLOCK_M, BLOCK_K)), b.T, acc, input_precision=PREC, out_dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    oh = oh0 + offs_m // BW
    ow = ow0 + offs_m % BW
    offs_o = o0 + tl.arange(0, BLOCK_N)
    o_ok = offs_o < O
    if HAS_BIAS != 0:
        acc = acc + tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    acc = _epilogue_act(acc, ACT)
    if Y_DESC:
        # the [pixels, channels] tile as the [1, channels, BH, BW] box of NCHW y
        y_ptr.store([n, o0, oh0, ow0], tl.reshape(tl.trans(acc), (1, BLOCK_N, BH, BW)).to(y_ptr.dtype))
    else:
        y_off = (n.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw)[:, None] \
            + offs_o.to(tl.int64)[None, :] * stride_yc
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=((oh < Ho) & (ow < Wo))[:, None] & o_ok[None, :])


@triton.jit
def _conv_tma_dgrad_kernel(g_desc, w_desc, dx_ptr, H, W, Ho, Wo, C, O, KW, TAPS, PH, PW, DH, DW, SH, SW,
                           stride_dn, stride_dc, stride_dh, stride_dw, PREC: tl.constexpr,
                           BH: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           STRIDED: tl.constexpr = False, DX_DESC: tl.constexpr = False):
    """The input gradient through TMA, one group: each program a ``BH x BW`` block of input
    pixels of one image (grid axis 0) by ``BLOCK_N`` input channels (axis 1).

    ``g_desc`` describes g as NHWC [N, Ho, Wo, O], box [1, BH, BW, BLOCK_K]; ``w_desc`` the
    weight as [TAPS * O, C] in (tap, output channel) rows, box [BLOCK_K, BLOCK_N]. At stride 1
    the output pixels tap (i, j) takes from a block of input pixels are a box at (h0 + PH - i*DH,
    w0 + PW - j*DW), zero outside g (the copy engine's fill). As in ``_conv_dgrad_kernel`` each
    tap's products go to their own accumulator, added only to the pixels the tap reaches (a zero
    row of g times a non-finite weight must not reach a pixel torch's scatter never forms it
    for). One flat loop over (tap, channel block) pairs so that the loads pipeline across taps;
    ``O`` must be a multiple of BLOCK_K (no box reaches into the next tap's rows).

    ``STRIDED`` (stride ``SH x SW``, dilation 1): the block's pixels are ``(hq*SH + rh, wq*SW +
    rw)`` for a block of ``(hq, wq)`` and one residue class ``(rh, rw)`` (grid axis 0: classes
    x images x blocks of the ``cdiv(H, SH) x cdiv(W, SW)`` class grid). Only the taps whose
    offset the stride divides reach such pixels -- ``i = i0, i0 + SH, ...`` with ``i0 = (rh +
    PH) % SH`` -- and for those the output pixels are again one box, at (hq0 + (rh + PH -
    i) / SH, ...): the loop runs over them alone (none: the block's gradient is zero).

    ``DX_DESC`` (stride 1 only): ``dx_ptr`` is a TMA descriptor of an NCHW ``dx``, box [1,
    BLOCK_N, BH, BW], and the block goes out as one TMA store (as the forward's ``Y_DESC``)."""
    BLOCK_M: tl.constexpr = BH * BW
    c0 = tl.program_id(1) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    KO = O // BLOCK_K
    if STRIDED:
        HQ = tl.cdiv(H, SH)
        WQ = tl.cdiv(W, SW)
        blk, rh, rw = _residue_class(tl.program_id(0), tl.num_programs(0) // (SH * SW), SH, SW)
        n, hq0, wq0 = _pixel_block(blk, HQ, WQ, BH, BW)
        h = (hq0 + offs_m // BW) * SH + rh
        w = (wq0 + offs_m % BW) * SW + rw
        i0 = (rh + PH) % SH
        j0 = (rw + PW) % SW
        nj = tl.cdiv(KW - j0, SW)
        n_taps = tl.cdiv(TAPS // KW - i0, SH) * nj
    else:
        n, h0, w0 = _pixel_block(tl.program_id(0), H, W, BH, BW)
        h = h0 + offs_m // BW
        w = w0 + offs_m % BW
        n_taps = TAPS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tap = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, n_taps * KO):
        tt = kk // KO
        ob = kk - tt * KO
        if STRIDED:
            ti = tt // nj
            i = i0 + ti * SH
            j = j0 + (tt - ti * nj) * SW
            gh = hq0 + (rh + PH - i) // SH  # exact: the stride divides it
            gw = wq0 + (rw + PW - j) // SW
        else:
            i = tt // KW
            j = tt - i * KW
            gh = h0 + PH - i * DH
            gw = w0 + PW - j * DW
        a = g_desc.load([n, gh, gw, ob * BLOCK_K])
        b = w_desc.load([(i * KW + j) * O + ob * BLOCK_K, c0])
        tap = tl.dot(tl.reshape(a, (BLOCK_M, BLOCK_K)), b, tap, input_precision=PREC, out_dtype=tl.float32)
        if ob == KO - 1:
            oh = gh + offs_m // BW
            ow = gw + offs_m % BW
            reach = (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
            acc += tl.where(reach[:, None], tap, 0.0)
            tap = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DX_DESC:
        tl.static_assert(not STRIDED, "a strided block's pixels are no box of dx")
        dx_ptr.store([n, c0, h0, w0], tl.reshape(tl.trans(acc), (1, BLOCK_N, BH, BW)).to(dx_ptr.dtype))
    else:
        offs_c = c0 + tl.arange(0, BLOCK_N)
        d_off = (n.to(tl.int64) * stride_dn + h.to(tl.int64) * stride_dh + w.to(tl.int64) * stride_dw)[:, None] \
            + offs_c.to(tl.int64)[None, :] * stride_dc
        tl.store(dx_ptr + d_off, acc.to(dx_ptr.dtype.element_ty),
                 mask=((h < H) & (w < W))[:, None] & (offs_c < C)[None, :])


@triton.jit
def _conv_tma_wgrad_kernel(x_desc, g_desc, ws_ptr, N, Ho, Wo, C, O, KW, TAPS, PH, PW, DH, DW, SH, SW, CHUNK,
                           PREC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_O: tl.constexpr, STRIDED: tl.constexpr = False):
    """The weight gradient through TMA, one group: partial sums ws[split, o, c, tap]
    (float32, contiguous [SPLIT, O, C, TAPS]) of g[n, p, q, o] * x[n, p - PH + i*DH, q - PW +
    j*DW, c] over the output pixels. Each program one tap and a ``BLOCK_C x BLOCK_O`` tile of
    (input, output) channels (grid axis 0: channel blocks; axis 1: taps x output-channel
    blocks), its K loop over ``CHUNK`` blocks of ``BH x BW`` output pixels (axis 2: the split).

    ``x_desc`` / ``g_desc`` describe x and g as NHWC, boxes [1, BH, BW, BLOCK_C] and [1, BH, BW,
    BLOCK_O]: a block of output pixels and the input pixels a tap pairs with them are both boxes
    at stride 1. The product is taken as ws^T = x^T g: x's tile is the A operand (registers),
    where the rows of pixels past the image's edge are zeroed (g is zero there, but an
    infinite x must not meet it: the pointer kernel never pairs them), g's the B operand.

    ``STRIDED``: ``x_desc`` as in :func:`_conv_tma_fwd_kernel`'s strided form; the tap's
    input pixels for a block of output pixels are the box at (oh0 + qh, rh, ow0 + qw, rw*C +
    c0). A channel block reaching past C reads the next residue's channels (or zeros past the
    last): those columns only make rows of ws past C, which are not stored."""
    BLOCK_M: tl.constexpr = BH * BW
    c0 = tl.program_id(0) * BLOCK_C
    pid_to = tl.program_id(1)
    n_ob = tl.cdiv(O, BLOCK_O)
    t = pid_to // n_ob
    o0 = (pid_to - t * n_ob) * BLOCK_O
    i = t // KW
    dh = i * DH - PH
    dw = (t - i * KW) * DW - PW
    b_lo = tl.program_id(2) * CHUNK
    b_hi = tl.minimum(b_lo + CHUNK, N * tl.cdiv(Ho, BH) * tl.cdiv(Wo, BW))
    offs_m = tl.arange(0, BLOCK_M)
    qh, rh = _floor_divmod(dh, SH, PH)
    qw, rw = _floor_divmod(dw, SW, PW)
    acc = tl.zeros((BLOCK_C, BLOCK_O), dtype=tl.float32)
    for blk in range(b_lo, b_hi):
        n, oh0, ow0 = _pixel_block(blk, Ho, Wo, BH, BW)
        if STRIDED:
            a = tl.reshape(x_desc.load([n, oh0 + qh, rh, ow0 + qw, rw * C + c0]), (BLOCK_M, BLOCK_C))
        else:
            a = tl.reshape(x_desc.load([n, oh0 + dh, ow0 + dw, c0]), (BLOCK_M, BLOCK_C))
        inside = ((oh0 + offs_m // BW) < Ho) & ((ow0 + offs_m % BW) < Wo)
        a = tl.where(inside[:, None], a, 0.0).to(a.dtype)
        b = tl.reshape(g_desc.load([n, oh0, ow0, o0]), (BLOCK_M, BLOCK_O))
        acc = tl.dot(a.T, b, acc, input_precision=PREC, out_dtype=tl.float32)
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_o = o0 + tl.arange(0, BLOCK_O)
    ws_off = ((tl.program_id(2) * O + offs_o).to(tl.int64)[None, :] * C + offs_c[:, None]) * TAPS + t
    tl.store(ws_ptr + ws_off, acc, mask=(offs_c < C)[:, None] & (offs_o < O)[None, :])


@triton.jit
def _conv_dgrad_kernel(g_ptr, w_ptr, dx_ptr,
                       N, H, W, Ho, Wo, KW, TAPS, CG, OG,
                       stride_gn, stride_gc, stride_gh, stride_gw,
                       stride_wo, stride_wc, stride_wh, stride_ww,
                       stride_dn, stride_dc, stride_dh, stride_dw,
                       SH, SW, PH, PW, DH, DW,
                       PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_T: tl.constexpr = False, A_PIX: tl.constexpr = False, Y_PIX: tl.constexpr = False):
    """``A_PIX`` / ``Y_PIX``: g's tile loaded, and dx stored, [channels, pixels] (lanes on
    consecutive pixels: NCHW tensors), as in ``_conv_fwd_kernel``.

    ``SPLIT_T`` (one group): grid axis 2 splits the taps into ``num_programs(2)`` contiguous
    ranges (whole taps, so each tap's own accumulator stays as below); split ``s`` stores its
    float32 partial sum at ``dx + s * N * H * W * CG`` (``dx`` the float32 workspace [S, N, H, W,
    CG] that ``_conv_splitk_reduce_kernel`` sums into the gradient): for deep layers whose
    output tiles do not fill the GPU.

    Strided convolutions (``SH * SW > 1``): grid axis 0 takes the input pixels by residue class
    (``h % SH``, ``w % SW``), :func:`dgrad_grid_m` blocks per class, so that a program's pixels
    share their class and the taps that reach none of them (the stride does not divide ``h +
    PH - i*DH``) are skipped whole: at stride 2 a 3x3 kernel's program runs 1, 2 or 4 of its 9
    taps (2.25 on average) where a block mixing the classes ran all 9, three quarters of its
    products on zero rows. At stride 1 the one class is every pixel, in the usual order."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SPLIT_T:
        grp = 0
        split = tl.program_id(2)
        per = tl.cdiv(TAPS, tl.num_programs(2))
        t_lo = split * per
        t_hi = tl.minimum(t_lo + per, TAPS)
    else:
        grp = tl.program_id(2)
        split = 0
        t_lo = 0
        t_hi = TAPS
    n, hq, wq, m_ok, rh, rw = _residue_block(pid_m, N, H, W, SH, SW, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < CG
    g_row = g_ptr + n.to(tl.int64) * stride_gn
    cc = grp * CG + offs_c
    w_col = w_ptr + offs_c.to(tl.int64) * stride_wc  # weight dim 1 counts channels within the group
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        i = t // KW
        j = t % KW
        # the stride divides h + PH - i*DH for every pixel of the class or for none: a tap that
        # reaches none runs no trips of the channel loop
        o_hi = tl.where(((rh + PH - i * DH) % SH == 0) & ((rw + PW - j * DW) % SW == 0), OG, 0)
        oh, ow, hit = _class_tap(hq, wq, rh, rw, i, j, Ho, Wo, SH, SW, PH, PW, DH, DW)
        ok = m_ok & hit
        a_row = g_row + oh.to(tl.int64) * stride_gh + ow.to(tl.int64) * stride_gw
        b_col = w_col + i * stride_wh + j * stride_ww
        # the tap's products go to their own accumulator, added only to the pixels the tap
        # reaches: a pixel it misses has a zero row of A, and 0 * (inf or NaN weight) would
        # spread a non-finite weight to every input pixel (torch's scatter never forms it)
        tap = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for o0 in range(0, o_hi, BLOCK_K):
            oo = o0 + tl.arange(0, BLOCK_K)
            oo_ok = oo < OG
            oc = (grp * OG + oo).to(tl.int64)
            a = _load_oriented(a_row, oc, stride_gc, ok, oo_ok, A_PIX)
            b = tl.load(b_col[None, :] + oc[:, None] * stride_wo, mask=oo_ok[:, None] & c_ok[None, :], other=0.0)
            tap = tl.dot(a, b, tap, input_precision=PREC, out_dtype=tl.float32)
        acc += tl.where(ok[:, None], tap, 0.0)
    h = hq * SH + rh
    w = wq * SW + rw
    d_pix = n.to(tl.int64) * stride_dn + h.to(tl.int64) * stride_dh + w.to(tl.int64) * stride_dw
    if SPLIT_T:
        d_pix += split.to(tl.int64) * N * H * W * CG  # this split's slice of the workspace
    _store_oriented(dx_ptr, d_pix, cc.to(tl.int64) * stride_dc, acc, m_ok, c_ok, Y_PIX)


@triton.jit
def _wgrad_packed(g_ptr, x_ptr, ws_ptr, pid_o, pid_q, grp, split, N, H, W, Ho, Wo, KW, TAPS, CG, OG, G, CHUNK,
                  stride_gn, stride_gc, stride_gh, stride_gw, stride_xn, stride_xc, stride_xh, stride_xw,
                  SH, SW, PH, PW, DH, DW, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_PIX: tl.constexpr):
    """``_conv_wgrad_kernel``'s PACKED_N form: columns ``q = c * TAPS + t`` (the B element of
    pixel ``m`` and column ``q`` is x at ``row(m) + col(q)``, inside the input or zero)."""
    QTOT = CG * TAPS
    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_q = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = offs_o < OG
    q_ok = offs_q < QTOT
    c = offs_q // TAPS
    t = offs_q - c * TAPS
    i = t // KW
    di = i * DH
    dj = (t - i * KW) * DW
    oc = (grp * OG + offs_o).to(tl.int64)
    x_col = (grp * CG + c).to(tl.int64) * stride_xc + di.to(tl.int64) * stride_xh + dj.to(tl.int64) * stride_xw
    M = N * Ho * Wo
    m_lo = split * CHUNK
    m_hi = tl.minimum(m_lo + CHUNK, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_K):
        mm = m0 + tl.arange(0, BLOCK_K)
        mm_ok = mm < m_hi
        n, oh, ow = _split_pos(mm, Ho, Wo)
        ohs = oh * SH - PH
        ows = ow * SW - PW
        n64 = n.to(tl.int64)
        g_off = n64 * stride_gn + oh.to(tl.int64) * stride_gh + ow.to(tl.int64) * stride_gw
        x_row = n64 * stride_xn + ohs.to(tl.int64) * stride_xh + ows.to(tl.int64) * stride_xw
        a = tl.load(g_ptr + oc[:, None] * stride_gc + g_off[None, :], mask=o_ok[:, None] & mm_ok[None, :], other=0.0)
        ih = _pix(ohs, B_PIX) + _chan(di, B_PIX)
        iw = _pix(ows, B_PIX) + _chan(dj, B_PIX)
        x_ok = (_pix(mm_ok, B_PIX) & _chan(q_ok, B_PIX)) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = _orient(tl.load(x_ptr + _pix(x_row, B_PIX) + _chan(x_col, B_PIX), mask=x_ok, other=0.0), B_PIX)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=tl.float32)
    ws_off = ((split * G * OG).to(tl.int64) + oc)[:, None] * QTOT + offs_q[None, :]
    tl.store(ws_ptr + ws_off, acc, mask=o_ok[:, None] & q_ok[None, :])


@triton.jit
def _conv_wgrad_kernel(g_ptr, x_ptr, ws_ptr,
                       N, H, W, Ho, Wo, KW, TAPS, CG, OG, G, CHUNK,
                       stride_gn, stride_gc, stride_gh, stride_gw,
                       stride_xn, stride_xc, stride_xh, stride_xw,
                       SH, SW, PH, PW, DH, DW,
                       PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PACKED_N: tl.constexpr = False, B_PIX: tl.constexpr = False):
    """Partial sums ws[split, o, c, tap] (float32, contiguous [SPLIT, O, CG, TAPS]).

    A program's columns are ``BLOCK_N`` channels of one tap (grid axis 1: taps x channel
    blocks), or with ``PACKED_N`` ``BLOCK_N`` of the group's ``CG * TAPS`` (channel, tap) pairs
    ``q = c * TAPS + t``, the order of ws's last two axes (grid axis 1: ``cdiv(CG * TAPS,
    BLOCK_N)``): for few channels (3 channels x 49 taps: 3 programs of 64 pairs instead of 49
    programs whose 64-wide channel block holds 3, each re-reading the same tile of g).

    ``B_PIX``: x's tile loaded [channels, pixels] and transposed (lanes on consecutive pixels:
    an NCHW x, as ``_conv_fwd_kernel``'s A_PIX); g's tile [output channels, pixels] has its
    lanes on pixels already."""
    pid_o = tl.program_id(0)
    pid_ct = tl.program_id(1)
    pid_gs = tl.program_id(2)
    grp = pid_gs % G
    split = pid_gs // G
    if PACKED_N:
        _wgrad_packed(g_ptr, x_ptr, ws_ptr, pid_o, pid_ct, grp, split, N, H, W, Ho, Wo, KW, TAPS, CG, OG, G, CHUNK,
                      stride_gn, stride_gc, stride_gh, stride_gw, stride_xn, stride_xc, stride_xh, stride_xw,
                      SH, SW, PH, PW, DH, DW, PREC, BLOCK_M, BLOCK_N, BLOCK_K, B_PIX)
        return
    n_cblk = tl.cdiv(CG, BLOCK_N)
    t = pid_ct // n_cblk
    cblk = pid_ct % n_cblk
    i = t // KW
    j = t % KW
    offs_o = pid_o * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = cblk * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = offs_o < OG
    c_ok = offs_c < CG
    oc = (grp * OG + offs_o).to(tl.int64)
    cc = (grp * CG + offs_c).to(tl.int64)
    M = N * Ho * Wo
    m_lo = split * CHUNK
    m_hi = tl.minimum(m_lo + CHUNK, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_K):
        mm = m0 + tl.arange(0, BLOCK_K)
        mm_ok = mm < m_hi
        n, oh, ow = _split_pos(mm, Ho, Wo)
        ih, iw, inside = _tap_source(oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW)
        x_ok = mm_ok & inside
        n64 = n.to(tl.int64)
        g_off = n64 * stride_gn + oh.to(tl.int64) * stride_gh + ow.to(tl.int64) * stride_gw
        x_off = n64 * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw
        a = tl.load(g_ptr + oc[:, None] * stride_gc + g_off[None, :], mask=o_ok[:, None] & mm_ok[None, :], other=0.0)
        b = _load_oriented(x_ptr + x_off, cc, stride_xc, x_ok, c_ok, B_PIX)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=tl.float32)
    ws_off = ((split * G * OG).to(tl.int64) + oc)[:, None] * (CG * TAPS) + offs_c[None, :] * TAPS + t
    tl.store(ws_ptr + ws_off, acc, mask=o_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_zeros(BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PIX_FAST: tl.constexpr):
    if PIX_FAST:
        return tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)


@triton.jit
def _conv_dw_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr,
                        N, H, W, O, Ho, Wo, KW, TAPS, MULT,
                        stride_xn, stride_xc, stride_xh, stride_xw,
                        stride_wo, stride_wh, stride_ww,
                        stride_yn, stride_yc, stride_yh, stride_yw,
                        SH, SW, PH, PW, DH, DW, HAS_BIAS, ACT,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PIX_FAST: tl.constexpr = False):
    """Depthwise forward (groups = C, weight [O = C*MULT, 1, kh, kw]): a tile of BLOCK_P pixels
    by BLOCK_C channels accumulated tap by tap with FMAs (no GEMM to feed: K = taps).

    ``PIX_FAST``: the tile laid out [channels, pixels], so that a warp's lanes take consecutive
    pixels (NCHW / NCL tensors, whose pixels are adjacent in memory: coalesced loads and stores);
    else [pixels, channels], lanes on consecutive channels (channels_last). Same arithmetic."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < N * Ho * Wo
    o_ok = offs_o < O
    n, oh, ow = _split_pos(offs_p, Ho, Wo)
    ci = (offs_o // MULT).to(tl.int64)
    x_col = _chan(ci * stride_xc, PIX_FAST)
    x_row = n.to(tl.int64) * stride_xn
    acc = _dw_zeros(BLOCK_P, BLOCK_C, PIX_FAST)
    for t in range(0, TAPS):
        i = t // KW
        j = t % KW
        ih, iw, inside = _tap_source(oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW)
        ok = p_ok & inside
        a = tl.load(x_ptr + _pix(x_row + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw, PIX_FAST) + x_col,
                    mask=_pix(ok, PIX_FAST) & _chan(o_ok, PIX_FAST), other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + offs_o.to(tl.int64) * stride_wo + i * stride_wh + j * stride_ww, mask=o_ok, other=0.0).to(tl.float32)
        acc += a * _chan(wv, PIX_FAST)
    if HAS_BIAS != 0:
        acc += _chan(tl.load(b_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32), PIX_FAST)
    acc = _epilogue_act(acc, ACT)
    y_off = _pix(n.to(tl.int64) * stride_yn + oh.to(tl.int64) * stride_yh + ow.to(tl.int64) * stride_yw, PIX_FAST) \
        + _chan(offs_o.to(tl.int64) * stride_yc, PIX_FAST)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=_pix(p_ok, PIX_FAST) & _chan(o_ok, PIX_FAST))


@triton.jit
def _conv_dw_dgrad_kernel(g_ptr, w_ptr, dx_ptr,
                          N, H, W, C, Ho, Wo, KW, TAPS, MULT,
                          stride_gn, stride_gc, stride_gh, stride_gw,
                          stride_wo, stride_wh, stride_ww,
                          stride_dn, stride_dc, stride_dh, stride_dw,
                          SH, SW, PH, PW, DH, DW,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PIX_FAST: tl.constexpr = False):
    """Depthwise input gradient: dx[n, c, h, w] = sum_{r < MULT, i, j} g[n, c*MULT + r, (h + pt - i*dh)/sh,
    (w + pl - j*dw)/sw] * w[c*MULT + r, 0, i, j] over exact, in-range divisions; ``PIX_FAST`` as
    in :func:`_conv_dw_fwd_kernel`. Strided: the pixels by stride residue class, the taps that
    reach none of a program's pixels skipped, as in :func:`_conv_dgrad_kernel`."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n, hq, wq, p_ok, rh, rw = _residue_block(pid_p, N, H, W, SH, SW, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    g_row = n.to(tl.int64) * stride_gn
    acc = _dw_zeros(BLOCK_P, BLOCK_C, PIX_FAST)
    for t in range(0, TAPS):
        i = t // KW
        j = t % KW
        # a tap that reaches none of the class's pixels runs no trips (as in _conv_dgrad_kernel)
        r_hi = tl.where(((rh + PH - i * DH) % SH == 0) & ((rw + PW - j * DW) % SW == 0), MULT, 0)
        oh, ow, hit = _class_tap(hq, wq, rh, rw, i, j, Ho, Wo, SH, SW, PH, PW, DH, DW)
        ok = _pix(p_ok & hit, PIX_FAST)
        off = _pix(g_row + oh.to(tl.int64) * stride_gh + ow.to(tl.int64) * stride_gw, PIX_FAST)
        for rr in range(0, r_hi):
            oc = (offs_c * MULT + rr).to(tl.int64)
            a = tl.load(g_ptr + off + _chan(oc * stride_gc, PIX_FAST), mask=ok & _chan(c_ok, PIX_FAST), other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + oc * stride_wo + i * stride_wh + j * stride_ww, mask=c_ok, other=0.0).to(tl.float32)
            # only where the tap reaches the pixel: 0 * (inf or NaN weight) must not spread
            acc += tl.where(ok, a * _chan(wv, PIX_FAST), 0.0)
    h = hq * SH + rh
    w = wq * SW + rw
    d_off = _pix(n.to(tl.int64) * stride_dn + h.to(tl.int64) * stride_dh + w.to(tl.int64) * stride_dw, PIX_FAST) \
        + _chan(offs_c.to(tl.int64) * stride_dc, PIX_FAST)
    tl.store(dx_ptr + d_off, acc.to(dx_ptr.dtype.element_ty), mask=_pix(p_ok, PIX_FAST) & _chan(c_ok, PIX_FAST))


@triton.jit
def _conv_dw_wgrad_kernel(g_ptr, x_ptr, ws_ptr,
                          N, H, W, O, Ho, Wo, KW, TAPS, MULT, CHUNK,
                          stride_gn, stride_gc, stride_gh, stride_gw,
                          stride_xn, stride_xc, stride_xh, stride_xw,
                          SH, SW, PH, PW, DH, DW,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PIX_FAST: tl.constexpr = False):
    """Depthwise weight gradient, partial sums ws[split, o, tap] (float32, contiguous
    [SPLIT, O, TAPS]) of g[n, o, p, q] * x[n, o // MULT, p*sh - pt + i*dh, q*sw - pl + j*dw];
    ``PIX_FAST`` as in :func:`_conv_dw_fwd_kernel`."""
    pid_c = tl.program_id(0)
    t = tl.program_id(1)
    split = tl.program_id(2)
    i = t // KW
    j = t % KW
    offs_o = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_ok = offs_o < O
    g_col = _chan(offs_o.to(tl.int64) * stride_gc, PIX_FAST)
    x_col = _chan((offs_o // MULT).to(tl.int64) * stride_xc, PIX_FAST)
    M = N * Ho * Wo
    m_lo = split * CHUNK
    m_hi = tl.minimum(m_lo + CHUNK, M)
    acc = _dw_zeros(BLOCK_P, BLOCK_C, PIX_FAST)
    for m0 in range(m_lo, m_hi, BLOCK_P):
        mm = m0 + tl.arange(0, BLOCK_P)
        mm_ok = mm < m_hi
        n, oh, ow = _split_pos(mm, Ho, Wo)
        ih, iw, inside = _tap_source(oh, ow, i, j, H, W, SH, SW, PH, PW, DH, DW)
        x_ok = mm_ok & inside
        n64 = n.to(tl.int64)
        a = tl.load(g_ptr + _pix(n64 * stride_gn + oh.to(tl.int64) * stride_gh + ow.to(tl.int64) * stride_gw, PIX_FAST) + g_col,
                    mask=_pix(mm_ok, PIX_FAST) & _chan(o_ok, PIX_FAST), other=0.0).to(tl.float32)
        b = tl.load(x_ptr + _pix(n64 * stride_xn + ih.to(tl.int64) * stride_xh + iw.to(tl.int64) * stride_xw, PIX_FAST) + x_col,
                    mask=_pix(x_ok, PIX_FAST) & _chan(o_ok, PIX_FAST), other=0.0).to(tl.float32)
        acc += a * b
    if PIX_FAST:
        tot = tl.sum(acc, axis=1)
    else:
        tot = tl.sum(acc, axis=0)
    tl.store(ws_ptr + (split * O + offs_o).to(tl.int64) * TAPS + t, tot, mask=o_ok)


@triton.jit
def _layout_copy_kernel(src_ptr, dst_ptr, I, J, tiles_j, tiles_ij, s_b, s_i, s_j, d_b, d_i, d_j,
                        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """dst[b, i, j] = src[b, i, j] over [B, I, J] views of any strides, a [BLOCK_I, BLOCK_J] tile
    a program (program b * tiles_ij + ti * tiles_j + tj). The NCHW <-> NHWC copies of the
    via-channels_last variant ([N, C, H*W]: unit stride along j on one side, along i on the
    other): Triton's JIT makes a unit stride a constant, so the load is laid out along the
    source's contiguous axis and the store along the destination's, the tile transposed through
    shared memory between them: both sides in full sectors. torch's copy_ of such a permutation
    walks the destination's order and reads the source a channel plane apart per lane."""
    pid = tl.program_id(0)
    b = pid // tiles_ij
    r = pid - b * tiles_ij
    ti = r // tiles_j
    tj = r - ti * tiles_j
    offs_i = (ti * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    offs_j = (tj * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    mask = (offs_i < I)[:, None] & (offs_j < J)[None, :]
    b64 = b.to(tl.int64)
    v = tl.load(src_ptr + b64 * s_b + offs_i[:, None] * s_i + offs_j[None, :] * s_j, mask=mask)
    tl.store(dst_ptr + b64 * d_b + offs_i[:, None] * d_i + offs_j[None, :] * d_j, v, mask=mask)


LAYOUT_COPY = (64, 64, 4)  # BLOCK_I, BLOCK_J, num_warps


def _bij(t):
    """[B, I, J] strides of a 4-d [N, C, H, W] ``t`` whose H and W merge into one axis, else None."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if h > 1 and w > 1 and sh != w * sw:
        return None
    return sn, sc, (sw if w > 1 else sh)


def layout_copy(dst, src):
    """``dst.copy_(src)`` for two 4-d tensors of one shape and dtype: through
    :func:`_layout_copy_kernel` where both merge H and W (NCHW-contiguous and NHWC tensors do)
    and no two elements of ``dst`` share memory, else torch's copy (which refuses the latter).
    ``dst`` is returned."""
    sv, dv = _bij(src), _bij(dst)
    if sv is None or dv is None or src.dtype != dst.dtype or src.shape != dst.shape or not src.numel() \
            or torch._debug_has_internal_overlap(dst):  # an expanded dst: torch's copy refuses it
        return dst.copy_(src)
    n, c, h, w = src.shape
    bi, bj, warps = LAYOUT_COPY
    tiles_j = cdiv(h * w, bj)
    tiles_ij = cdiv(c, bi) * tiles_j
    launch_kernel(_layout_copy_kernel, (n * tiles_ij,), src, dst, c, h * w, tiles_j, tiles_ij, *sv, *dv,
                  BLOCK_I=bi, BLOCK_J=bj, num_warps=warps)
    return dst


# ----------------------------------------------------------------------------- heuristics

def pick_config(gemm_n: int, gemm_m: int, half: bool, interpret: bool,
                configs: dict = GPU_CONFIGS) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a GEMM whose N side is
    ``gemm_n`` wide (output channels per group for forward / wgrad rows, input channels per
    group for dgrad) and ``gemm_m`` long; ``half`` for float16/bfloat16 operands; ``configs``
    the tile table (the input gradient passes DGRAD_CONFIGS). A pure function of the shape; the
    tile sides are asserted >= 16."""
    if interpret:
        cfg = INTERP_CONFIG
    else:
        table = configs["half" if half else "fp32"]
        big = gemm_m >= 128 * 264  # enough 128-row tiles for two waves of 132 SMs
        if gemm_n > 32 and big:
            cfg = table["large"]
        elif gemm_n > 32 and "medium" in table:
            cfg = table["medium"]
        else:
            cfg = table["small"]
    assert min(cfg[:3]) >= 16, f"tl.dot tiles must be >= 16 on each side, got {cfg[:3]}"
    return cfg


def fwd_candidates(half: bool, nhwc: bool = False, via_cl: bool = False) -> list[tuple]:
    """The forward configurations a measuring chooser times (``FWD_CANDIDATES``): tiles of the
    heuristic's table, the pipelined ``TUNE_CONFIGS`` and, with ``nhwc`` (a half or TF32
    problem that :func:`nhwc_specialised` accepts), the large ``NHWC_CONFIGS`` tiles; with
    ``via_cl`` (a problem :func:`via_cl_eligible` accepts) also the ``FWD_VIA_CL`` tiles run on
    channels_last copies, as ``(*config, VIA_CL)``; the ``FWD_FLAT`` / ``FWD_VIA_CL_FLAT`` tiles
    with the one-loop K as ``(*config, FLAT[, VIA_CL])``. All compiled for sm_90 in :func:`aot_specs`."""
    key = "half" if half else "fp32"
    table = {**GPU_CONFIGS[key], **TUNE_CONFIGS[key], **NHWC_CONFIGS[key]}
    out = [table[name] for name in FWD_CANDIDATES[(key, nhwc)]]
    out += [(*table[name], FLAT) for name in FWD_FLAT[(key, nhwc)]]
    if via_cl and not nhwc:
        out += [(*table[name], VIA_CL) for name in FWD_VIA_CL[key]]
        out += [(*table[name], FLAT, VIA_CL) for name in FWD_VIA_CL_FLAT[key]]
    return out


def packs(cg: int, taps: int, block: int) -> bool:
    """The heuristic's choice of the packed (channel, tap) loop: more than one tap and at most
    half of a ``block``-wide channel block used (``block``: the forward's BLOCK_K, the weight
    gradient's BLOCK_N). Nested, such a problem makes ``taps * cdiv(cg, block)`` trips of its
    K loop (or programs of its weight gradient) where packed makes ``cdiv(cg * taps, block)``."""
    return taps > 1 and 2 * cg <= block


def packed_offered(cg: int, taps: int, block: int) -> bool:
    """Whether a measuring chooser is offered the packed form of a tile: more than one tap and
    any of the tile's channel block idle."""
    return taps > 1 and cg < block


def fwd_default(og: int, m: int, cg: int, taps: int, half: bool, interpret: bool) -> tuple:
    """The forward's configuration where nothing is measured: :func:`pick_config`'s tile, in its
    packed form where :func:`packs`."""
    cfg = pick_config(og, m, half, interpret)
    return (*cfg, PACKED) if packs(cg, taps, cfg[2]) else cfg


def fwd_heuristic(x, w, b, y, groups: int, cfg: tuple, interpret: bool, prec: str = "ieee") -> tuple:
    """The forward's configuration where nothing is measured, for these tensors: ``cfg``
    (:func:`fwd_default`), except for a float16 / bfloat16, or float32 under TF32 (``prec``),
    problem with an NCHW-contiguous input that could run on channels_last copies
    (:func:`via_cl_eligible`, one group, at least 32 channels in: unpacked) compiled for a GPU:
    there a tile on the copies.

    Half: the heuristic's large tile (``(*large, VIA_CL)``). The H200's conv sweep at a331102
    (bfloat16, N=32, 3x3, C=O=64..512, 56x56..7x7: benchmarks/results/2026-12-04_nvidia-h200_a331102/
    sweep_conv.json) timed that candidate at 202 / 89 / 219 / 163 us against the direct NCHW
    kernel's heuristic tile at 458 / 246 / 251 / 177, within 7 % of the best candidate at every
    shape (those figures include part of our host path, see that run's SUMMARY.md: upper bounds).

    float32 under TF32: ``cfg``'s own tile on the copies, which is what a channels_last caller of
    that problem runs. The H200 bench at 09f2311 (float32 3x3, N=32, the same four shapes, one
    call between CUDA events, our host path about 150-180 us of each figure) took 502 / 503 / 517 /
    446 us NCHW, where the host returned after 166 / 154 / 159 / 157 us (so the kernel took more
    than 280 us at each), and 237 / 283 / 237 / 360 us for the same problems channels_last (an
    upper bound of that kernel's time), about 100-350 us apart: more than the two copies cost
    (x and y, 51 MB each way at 56x56). IEEE float32 keeps ``cfg`` (its NHWC tiles spill)."""
    if interpret or groups != 1 or PACKED in cfg[5:] or not x.is_contiguous():
        return cfg
    half = x.element_size() == 2
    if not half and not (x.dtype == torch.float32 and prec == "tf32"):
        return cfg
    cg, og = w.shape[1], w.shape[0]
    if cg < 32 or not via_cl_eligible(x, w, b, y, cg, og):
        return cfg
    return (*GPU_CONFIGS["half"]["large"], VIA_CL) if half else (*cfg[:5], VIA_CL)


def wgrad_default(og: int, cg: int, taps: int, half: bool, interpret: bool) -> tuple:
    """The weight gradient's configuration where nothing is measured: :func:`pick_config`'s
    tile for its M = ``og`` rows (no GEMM length: it splits its reduction instead), packed where
    :func:`packs` (BLOCK_N)."""
    cfg = pick_config(og, 0, half, interpret)
    return (*cfg, PACKED) if packs(cg, taps, cfg[1]) else cfg


def split_count(tiles: int, k_iters: int) -> int:
    """Splits of the split-K forward: enough for about SPLIT_TARGET_PROGRAMS programs with
    ``tiles`` output tiles, at least 2, at most SPLIT_MAX and at most ``k_iters`` (each split
    keeps one trip of the K loop at least)."""
    return max(2, min(SPLIT_MAX, k_iters, cdiv(SPLIT_TARGET_PROGRAMS, max(tiles, 1))))


def split_eligible(groups: int, m: int, og: int, bm: int, bn: int, k_iters: int) -> bool:
    """Whether a split-K candidate of tile ``bm x bn`` is offered: one group, fewer output tiles
    than a wave (SPLIT_WAVE) and a K loop of at least four trips."""
    return groups == 1 and cdiv(m, bm) * cdiv(og, bn) < SPLIT_WAVE and k_iters >= 4


def dgrad_grid_m(n: int, h: int, w: int, stride, bm: int) -> int:
    """Grid axis 0 of ``_conv_dgrad_kernel`` and ``_conv_dw_dgrad_kernel``: ``bm``-pixel blocks
    of each stride residue class of the input pixels (:func:`_residue_block`), ``cdiv(n * h * w,
    bm)`` at stride 1."""
    sh, sw = stride
    return sh * sw * cdiv(n * cdiv(h, sh) * cdiv(w, sw), bm)


def _tma_strided(t) -> bool:
    """Whether ``t`` [N, C, H, W] can be described for TMA as NHWC: unit channel stride, the other
    strides positive multiples of 16 bytes (an expanded tensor's 0 is left to a copy), a 16-byte
    aligned base."""
    es = t.element_size()
    return t.stride(1) == 1 and all(s > 0 and s * es % 16 == 0 for s in (t.stride(0), t.stride(2), t.stride(3))) \
        and t.data_ptr() % 16 == 0


def _strided_view(x, stride) -> tuple[list, list]:
    """(shape, strides) of x [N, C, H, W] seen as [N, H/SH, SH, W/SW, SW*C] -- (image, row
    quotient, row residue, column quotient, column residue and channel) -- for the strided TMA
    kernels: input pixel (q*SH + r) is (q, r), and a column residue's C channels follow the
    previous residue's in memory (x's pixels are whole: W stride C)."""
    n, c, h, w = x.shape
    sh, sw = stride
    return [n, h // sh, sh, w // sw, sw * c], [x.stride(0), sh * x.stride(2), x.stride(2), sw * x.stride(3), 1]


def _tma_strided_x(x, stride) -> bool:
    """A strided problem's x fits :func:`_strided_view` once dense NHWC (H and W multiples of the
    stride); stride 1 always."""
    sh, sw = stride
    return x.shape[2] % sh == 0 and x.shape[3] % sw == 0


def _tma_describable(x, stride) -> bool:
    """Whether the TMA forward / weight gradient can read x [N, C, H, W] as it is for this
    stride: :func:`_tma_strided`, and where the stride is not 1, :func:`_strided_view` exact (H
    and W multiples of the stride, :func:`_tma_strided_x`; whole pixels where the column stride
    is not 1)."""
    if not _tma_strided(x):
        return False
    return tuple(stride) == (1, 1) or (_tma_strided_x(x, stride) and (stride[1] == 1 or x.stride(3) == x.shape[1]))


# A TMA tile is offered only where its pixel blocks use this share of their rows on the image
# (7x7 in 8x16 blocks: 38 %; in 8x8: 77 %), or where no tile does better: each candidate costs a
# compilation and a timing on the first call of a problem.
TMA_MIN_USE = 0.7


def _block_use(h: int, w: int, bh: int, bw: int) -> float:
    """The share of a ``bh x bw`` block tiling's rows that fall on an ``h x w`` image."""
    return h * w / (cdiv(h, bh) * bh * cdiv(w, bw) * bw)


def _well_used(cfgs: list, h: int, w: int) -> list:
    """The tiles of ``cfgs`` ((BH, BW, ...) tuples) whose blocks use TMA_MIN_USE of their rows on
    an ``h x w`` image, or the best-used ones where none does."""
    use = [_block_use(h, w, c[0], c[1]) for c in cfgs]
    floor = min(TMA_MIN_USE, max(use, default=0.0))
    return [c for c, u in zip(cfgs, use) if u >= floor]


def tma_problem(x, stride, groups: int, prec: str) -> bool:
    """Whether the TMA kernels apply to this problem at all (device aside): one group, half
    precision or TF32 operands; stride 1, or the stride's own conditions (each kernel's
    candidates add theirs: :func:`tma_candidates`, :func:`tma_dgrad_candidates`,
    :func:`tma_wgrad_candidates`)."""
    return groups == 1 and (x.element_size() == 2 or prec == "tf32")


# Strided problems are offered one TMA tile per kernel (the STRIDED forms of these alone are
# compiled ahead of time): the forward and weight gradient read x through _strided_view (H and
# W multiples of the stride), the input gradient takes its pixels by residue class (dilation 1).
TMA_STRIDED = {"fwd": "tma8x16", "dgrad": "tma8x16n64", "wgrad": "tma8x8c64"}


def tma_device(t) -> bool:
    """Whether ``t``'s device runs the TMA kernels: a CUDA device of compute capability 9+ (the
    dense matmul's test), the kernels compiled (not the interpreter)."""
    if INTERPRETED or t.device.type != "cuda":
        return False
    return _has_tma(_device_index(t))


def _tma_offer(t, configs: dict, via_cl: dict, channels: int, hw, direct: bool, only=None) -> list[tuple]:
    """The TMA tiles of ``configs`` (TMA_CONFIGS or DGRAD_TMA_CONFIGS; ``only``: that tile
    alone) for a kernel that reads ``t`` through TMA with a K loop over ``channels`` in blocks of
    BLOCK_K: on ``t`` itself where ``direct`` (it can be described as it is), each tile whose
    BLOCK_K divides ``channels`` and whose pixel blocks are well used on an ``hw`` grid of
    pixels (:func:`_well_used`); else the ``via_cl`` tiles, on channels_last copies."""
    key = "half" if t.element_size() == 2 else "fp32"
    table = {k: v for k, v in configs[key].items() if only is None or k == only}
    if direct:
        return [(*cfg, TMA) for cfg in _well_used(list(table.values()), *hw) if channels % cfg[3] == 0]
    return [(*table[name], TMA, VIA_CL) for name in via_cl[key] if name in table and channels % table[name][3] == 0]


def tma_candidates(x, w, stride, groups: int, prec: str) -> list[tuple]:
    """The TMA forward's candidates for this problem (device aside): each TMA_CONFIGS tile whose
    BLOCK_K divides the channel count and whose blocks are well used (:func:`_well_used`), on x
    itself where it can be described for TMA (:func:`_tma_describable`), else the TMA_VIA_CL
    tiles on channels_last copies; strided, the TMA_STRIDED tile alone, where H and W are
    multiples of the stride; none where :func:`tma_problem` refuses."""
    sh, sw = stride
    strided = (sh, sw) != (1, 1)
    if not tma_problem(x, stride, groups, prec) or not _tma_strided_x(x, stride):
        return []
    # x's size over the stride stands for the output's (the usual padding)
    return _tma_offer(x, TMA_CONFIGS, TMA_VIA_CL, w.shape[1], (x.shape[2] // sh, x.shape[3] // sw),
                      _tma_describable(x, stride), TMA_STRIDED["fwd"] if strided else None)


def tma_dgrad_candidates(g, w, stride, groups: int, prec: str, dilation=(1, 1)) -> list[tuple]:
    """The TMA input gradient's candidates for this problem (device aside), as
    :func:`tma_candidates`: each DGRAD_TMA_CONFIGS tile whose BLOCK_K divides the output channel
    count, on g itself where it can be described for TMA as NHWC, else the DGRAD_TMA_VIA_CL
    tiles on channels_last copies; the weight's rows of C channels must be whole 16-byte units.
    Strided: the TMA_STRIDED tile alone, dilation 1."""
    strided = tuple(stride) != (1, 1)
    if not tma_problem(g, stride, groups, prec) or w.shape[1] * g.element_size() % 16 \
            or (strided and tuple(dilation) != (1, 1)):
        return []
    return _tma_offer(g, DGRAD_TMA_CONFIGS, DGRAD_TMA_VIA_CL, w.shape[0], g.shape[2:], _tma_strided(g),
                      TMA_STRIDED["dgrad"] if strided else None)


def tma_wgrad_candidates(g, x, stride, groups: int, prec: str) -> list[tuple]:
    """The TMA weight gradient's candidates for this problem (device aside): every
    WGRAD_TMA_CONFIGS tile (strided: the TMA_STRIDED one, where H and W are multiples of the
    stride) where both channel counts make NHWC rows of whole 16-byte units, as ``(*tile, TMA)``
    where x and g can be described for TMA as they are, else ``(*tile, TMA, VIA_CL)`` (NHWC
    copies of those that cannot)."""
    es = x.element_size()
    if not tma_problem(x, stride, groups, prec) or x.shape[1] * es % 16 or g.shape[1] * es % 16 \
            or not _tma_strided_x(x, stride):
        return []
    tail = (TMA,) if _tma_describable(x, stride) and _tma_strided(g) else (TMA, VIA_CL)
    table = WGRAD_TMA_CONFIGS["half" if es == 2 else "fp32"]
    if tuple(stride) != (1, 1):
        table = {TMA_STRIDED["wgrad"]: table[TMA_STRIDED["wgrad"]]}
    return [(*cfg, *tail) for cfg in _well_used(list(table.values()), *g.shape[2:])]


def problem_candidates(x, w, b, y, groups: int, prec: str, stride=None) -> list[tuple]:
    """The forward candidates :func:`conv_forward` hands a measuring chooser for these tensors
    (layouts, alignment, channel counts) and float32 precision; benchmarks/sweep.py times the
    same list. With ``stride`` (the convolution's), on a device with TMA (:func:`tma_device`),
    also :func:`tma_candidates`."""
    half = x.element_size() == 2
    cg, og = w.shape[1], w.shape[0] // groups
    tiles = half or prec == "tf32"  # the NHWC tiles are not candidates for ieee float32
    nhwc = tiles and nhwc_specialised(x, w, b, y, cg, og)
    via_cl = tiles and not nhwc and via_cl_eligible(x, w, b, y, cg, og)
    out = fwd_candidates(half, nhwc, via_cl)
    key = "half" if half else "fp32"
    table = {**GPU_CONFIGS[key], **TUNE_CONFIGS[key], **NHWC_CONFIGS[key]}
    m, taps = y.shape[0] * y.shape[2] * y.shape[3], w.shape[2] * w.shape[3]
    for name in FWD_SPLIT[(key, nhwc)]:
        bm, bn, bk = table[name][:3]
        if split_eligible(groups, m, og, bm, bn, taps * cdiv(cg, bk)):
            out.append((*table[name], FLAT, SPLIT))
    out += [(*table[name], PACKED) for name in FWD_PACKED[key] if packed_offered(cg, taps, table[name][2])]
    if stride is not None and TMA_CHOOSER and tma_device(x):
        out += [c for c in tma_candidates(x, w, stride, groups, prec) if not tma_fwd_suspect(c, x, y)]
    return out


# TMA forward tiles that gave wrong results on an H200 where they store y through pointers (y
# channels_last): benchmarks/results/2026-12-04_nvidia-h200_a331102, the conv sweep, bfloat16 N=32
# C=O=64 56x56 channels_last, tma8x16 max error 0.72 where every other candidate, and the same
# tile storing an NCHW y through a descriptor, were right; the interpreter finds it right. Not
# offered to the measuring chooser there until a GPU run shows it right (benchmarks/sweep.py
# still times it, through tma_candidates). Read on the CPU since (its sm_90 build as the JIT
# specialises that launch): the same program as tma4x32 but for BH / BW, its epilogue right, its
# cubin the one that served 28x28 right; one hazard is in every pipelined TMA tile (the register
# operand wgmma split in four, the next ldmatrix rewriting its registers behind a wait_group 3),
# so a race is the lead: benchmarks/tma_fwd_repeat.py launches it and its twins again and again
# on the next GPU (gpu_measure.sh's first step).
TMA_FWD_SUSPECT = ("tma8x16",)
# Every pipelined TMA tile (forward, input and weight gradient) takes its wgmma's A operand from
# registers (the TMA box reshaped), which Triton splits into several wgmmas in flight across
# iterations: the next iteration may rewrite those registers while a wgmma still reads them
# (triton-lang/triton issue 9433, undefined in the PTX ISA; fixed upstream by copying the operand
# to fresh registers before each, PRs 9514 / 9530). Triton 3.9's sm_90 PTX of these tiles has the
# copies, 3.6's (the H200 image's) has none (_aot.rs_wgmma_unguarded; 3.7 and 3.8 not read): on a
# Triton before TMA_RS_SAFE_FROM the measuring chooser is not offered the TMA tiles (the sweep
# still times them against torch, and benchmarks/tma_fwd_repeat.py asks a GPU whether the race
# shows). No other kernel of the project has a register-operand wgmma in flight across
# iterations (benchmarks/results/aot/rs_wgmma_triton-3.6.0.md).
TMA_RS_SAFE_FROM = (3, 9)
TMA_CHOOSER = triton_version() >= TMA_RS_SAFE_FROM


def tma_fwd_suspect(cfg: tuple, x, y) -> bool:
    """Whether TMA forward candidate ``cfg`` is one of TMA_FWD_SUSPECT's tiles and would store
    ``y`` through pointers (not through a descriptor: :func:`_tma_y_direct`)."""
    if TMA not in cfg or _tma_y_direct(cfg, y):
        return False
    table = TMA_CONFIGS["half" if x.element_size() == 2 else "fp32"]
    return any(tuple(cfg[:6]) == tuple(table[name]) for name in TMA_FWD_SUSPECT if name in table)


def dgrad_candidates(half: bool, nhwc: bool = False, via_cl: bool = False) -> list[tuple]:
    """The input-gradient configurations a measuring chooser times: the heuristic's own table
    (already compiled for dgrad in :func:`aot_specs`); with ``nhwc`` (a half or TF32 problem
    that :func:`dgrad_nhwc_specialised` accepts) also the ``DGRAD_NHWC_CONFIGS`` tiles; with
    ``via_cl`` (:func:`dgrad_via_cl_eligible`) the ``DGRAD_VIA_CL`` tiles run on channels_last
    copies, as ``(*config, VIA_CL)``."""
    key = "half" if half else "fp32"
    out = list(DGRAD_CONFIGS[key].values())
    if nhwc:
        out += list(DGRAD_NHWC_CONFIGS[key].values())
    elif via_cl:
        table = {**DGRAD_CONFIGS[key], **DGRAD_NHWC_CONFIGS[key]}
        out += [(*table[name], VIA_CL) for name in DGRAD_VIA_CL[key]]
    return out


# Each launcher's candidate list, per the facts it depends on (shapes, strides, dtype, the
# convolution's options, which tensors are 16-byte aligned, the device): computing it took 8.8 us
# of host time per forward call on the CPU machine (the NHWC, channels_last-copy, split-K and
# TMA eligibility tests), on every call, a measured choice cached or not. Bounded; a list is
# shared between calls and never changed after it is made.
_CANDIDATES: dict = {}
CANDIDATES_MAX = 512


def _candidates(facts: tuple, build) -> list:
    return memo(_CANDIDATES, CANDIDATES_MAX, facts, build)


def dgrad_problem_candidates(g, w, dx, groups: int, prec: str, stride=None, dilation=(1, 1)) -> list[tuple]:
    """The input-gradient candidates :func:`conv_backward_data` hands a measuring chooser for
    these tensors: :func:`dgrad_candidates` for their layouts, and the tap-split ``DGRAD_SPLIT``
    tiles as ``(*tile, SPLIT)`` for one-group problems with two taps or more and fewer output
    tiles than a wave; with ``stride`` on a device with TMA, :func:`tma_dgrad_candidates`."""
    half = g.element_size() == 2
    o, cg, kh, kw = w.shape
    og = o // groups
    tiles = half or prec == "tf32"  # the NHWC tiles are not candidates for ieee float32
    nhwc = tiles and dgrad_nhwc_specialised(g, w, dx, cg, og)
    via_cl = tiles and not nhwc and dgrad_via_cl_eligible(g, w, dx, cg, og)
    out = dgrad_candidates(half, nhwc, via_cl)
    key = "half" if half else "fp32"
    table = {**DGRAD_CONFIGS[key], **DGRAD_NHWC_CONFIGS[key]}
    m = dx.shape[0] * dx.shape[2] * dx.shape[3]
    for name in DGRAD_SPLIT[(key, nhwc)]:
        bm, bn = table[name][:2]
        if kh * kw >= 2 and split_eligible(groups, m, cg, bm, bn, 4):  # split over whole taps
            out.append((*table[name], SPLIT))
    if stride is not None and TMA_CHOOSER and tma_device(g):
        out += tma_dgrad_candidates(g, w, stride, groups, prec, dilation)
    return out


def dgrad_nhwc_specialised(g, w, dx, cg: int, og: int) -> bool:
    """As :func:`nhwc_specialised`, for the input gradient's arguments (DGRAD_NHWC_UNIT unit,
    DGRAD_NHWC_DIV16 multiples of 16)."""
    if g.stride(1) != 1 or w.stride(1) != 1 or dx.stride(1) != 1:
        return False
    ints = (cg, og, g.stride(0), g.stride(2), g.stride(3), w.stride(0), w.stride(2), w.stride(3),
            dx.stride(0), dx.stride(2), dx.stride(3))
    return all(v % 16 == 0 for v in ints) and all(t.data_ptr() % 16 == 0 for t in (g, w, dx))


def dgrad_via_cl_eligible(g, w, dx, cg: int, og: int) -> bool:
    """As :func:`via_cl_eligible`, for the input gradient."""
    return cg % 16 == 0 and og % 16 == 0 and not dgrad_nhwc_specialised(g, w, dx, cg, og)


def nhwc_specialised(x, w, b, y, cg: int, og: int) -> bool:
    """Whether the forward's arguments take the specialisation NHWC_CONFIGS are compiled for:
    unit channel strides (channels_last input, weight and output) and the NHWC_DIV16 pointers
    and ints multiples of 16 (so Triton's JIT compiles exactly that specialisation)."""
    if x.stride(1) != 1 or w.stride(1) != 1 or y.stride(1) != 1:
        return False
    ints = (cg, og, x.stride(0), x.stride(2), x.stride(3), w.stride(0), w.stride(2), w.stride(3),
            y.stride(0), y.stride(2), y.stride(3))
    ptrs = (x, w, y) if b is None else (x, w, b, y)
    return all(v % 16 == 0 for v in ints) and all(t.data_ptr() % 16 == 0 for t in ptrs)


def via_cl_eligible(x, w, b, y, cg: int, og: int) -> bool:
    """Whether the via-channels_last forward candidates apply: a problem that does not already
    take the NHWC specialisation as it stands, whose channels_last copies would
    (:func:`_nhwc_copy` makes every stride a multiple of C, O or CG, all multiples of 16 here;
    torch's allocations are 16-byte aligned), and whose bias is aligned."""
    if cg % 16 or og % 16 or (b is not None and b.data_ptr() % 16):
        return False
    return not nhwc_specialised(x, w, b, y, cg, og)


def _nhwc_strided(t) -> bool:
    """Unit channel stride and every other stride a multiple of 16, 16-byte aligned."""
    return t.stride(1) == 1 and all(s % 16 == 0 for s in (t.stride(0), t.stride(2), t.stride(3))) \
        and t.data_ptr() % 16 == 0


def _nhwc_empty(t):
    """A new [N, C, H, W] tensor like ``t`` laid out NHWC with exactly the dense strides (not
    ``memory_format=channels_last``, which keeps torch's freedom for size-1 dimensions)."""
    n, c, h, w = t.shape
    return torch.empty((n, h, w, c), dtype=t.dtype, device=t.device).permute(0, 3, 1, 2)


def _nhwc_copy(t):
    """``t`` itself when :func:`_nhwc_strided`, else a dense NHWC copy (one pass)."""
    return t if _nhwc_strided(t) else layout_copy(_nhwc_empty(t), t)


# The weight gradient's candidates for a measuring chooser, by tile name (GPU_CONFIGS /
# TUNE_CONFIGS), the heuristic's own first (pick_config(og, 0): "small" for float32, "medium"
# for half with more than 32 output channels per group). Larger tiles re-read g and x less; the
# K split (wgrad_split) follows each tile's count. sm_90 AOT of the kernel in its generic form:
# float32 128x64x16 at 2 / 3 stages 151-156 registers, half 128x64x32/3st 195, no spills;
# 128x128 (fp32 x16 / half x32), 64x128x32 and 128x64x64 (half) spill (32-184 B): left out.
WGRAD_CANDIDATES = {"fp32": ("small", "large", "large3"), "half": ("medium", "small", "large")}
# CUDA's grid y (and z): at most 65535 programs. The weight gradient puts its column tiles
# (channel blocks x taps, or packed (channel, tap) blocks) on grid y, the TMA form its taps x
# output-channel blocks: a problem past it runs in launches over input-channel slices of one
# group (conv_backward_weight), each of which every configuration's column tiles fit; TMA
# candidates whose grid would not fit are not offered.
GRID_YZ_MAX = 65535
# the narrowest BLOCK_N of any weight-gradient tile, on a GPU or in the interpreter: the column
# tiles of a slice of this many channels times GRID_YZ_MAX // taps fit grid y whatever the tile
WGRAD_MIN_BLOCK_N = min(INTERP_CONFIG[1], *(cfg[1] for cfgs in (*GPU_CONFIGS.values(), *TUNE_CONFIGS.values())
                                             for cfg in cfgs.values()))


def wgrad_candidates(half: bool, cg: int = 0, taps: int = 1) -> list[tuple]:
    """The weight-gradient configurations a measuring chooser times (``WGRAD_CANDIDATES``), and
    for a problem of ``cg`` channels per group and ``taps`` taps the packed (channel, tap)
    columns of each tile as ``(*tile, PACKED)`` where :func:`packed_offered` (BLOCK_N)."""
    key = "half" if half else "fp32"
    table = {**GPU_CONFIGS[key], **TUNE_CONFIGS[key]}
    out = [table[name] for name in WGRAD_CANDIDATES[key]]
    return out + [(*cfg, PACKED) for cfg in out if packed_offered(cg, taps, cfg[1])]


def wgrad_split(tiles: int, m: int, block_k: int, interpret: bool) -> int:
    """How many programs share the K = N*Ho*Wo reduction of wgrad (float32 partial sums)."""
    if interpret:
        return 2 if m > 4 * block_k else 1
    want = -(-WGRAD_TARGET_PROGRAMS // max(tiles, 1))
    return max(1, min(want, m // (8 * block_k)))


def _dot_precision(prec: str) -> str:
    assert prec in ("ieee", "tf32"), prec
    return prec


def is_depthwise(c: int, cg: int, groups: int) -> bool:
    """One input channel per group: the depthwise kernels apply."""
    return cg == 1 and groups == c


def dw_config(interpret: bool) -> tuple[int, int, int]:
    return DW_INTERP_CONFIG if interpret else DW_CONFIG


def _pix_flags(x, y, split: bool) -> dict:
    """The forward's A_PIX / Y_PIX for input ``x`` and output ``y``: both where both are
    :func:`pixels_adjacent` (NCHW in, NCHW out), neither where either is not (channels_last, or
    mixed layouts); the split-K workspace (NHWC) is never stored pixels-fastest, its A tile is
    where x is. What aot_specs() compiles: (False, False), (True, True), and (True, False) for
    the split forms."""
    if split:
        return {"A_PIX": pixels_adjacent(x), "Y_PIX": False}
    both = pixels_adjacent(x) and pixels_adjacent(y)
    return {"A_PIX": both, "Y_PIX": both}


def pixels_adjacent(t) -> bool:
    """Whether ``t`` [N, C, H, W] has its pixels along W adjacent and its channels not (NCHW /
    NCL): the depthwise kernels then lay their tiles out pixels-fastest (``PIX_FAST``) and the
    implicit-GEMM forward loads its A tile so (``A_PIX``), so that a warp's loads and stores
    cover consecutive addresses; channels_last tensors keep the channels-fastest tiles."""
    return t.stride(3) == 1 and t.stride(1) != 1


# ----------------------------------------------------------------------------- launchers

def _compiling(kernel, grid):
    """``kernel[grid]``'s stand-in that only compiles (``warmup``) for these arguments."""
    return lambda *args, **kw: kernel.warmup(*args, grid=grid, **kw)


def _launching(kernel, grid):
    """``kernel[grid]`` through a cached launch plan (:func:`._launch.launch`)."""
    return lambda *args, **kw: launch_kernel(kernel, grid, *args, **kw)


def _launcher(kernel, grid, warm: bool):
    """:func:`_compiling` when ``warm`` (a tuning's prepare: compile only), else :func:`_launching`."""
    return _compiling(kernel, grid) if warm else _launching(kernel, grid)


def _splitk_finish(ws, bias, out, act: str | None, warm: bool) -> None:
    """The split launches' finish (``_conv_splitk_reduce_kernel``): ``out`` [N, C, H, W] (any
    strides) = act(sum over the splits of the float32 workspace ``ws`` [S, N*H*W, C] + bias)."""
    nsplit, m, c = ws.shape
    rbm, rbn, rwarps = REDUCE_BLOCKS
    _launcher(_conv_splitk_reduce_kernel, (cdiv(m, rbm), cdiv(c, rbn)), warm)(
        ws, bias if bias is not None else out, out, m, c, out.shape[2], out.shape[3], nsplit, *out.stride(),
        int(bias is not None), ACT_CODES[act], BLOCK_M=rbm, BLOCK_N=rbn, Y_PIX=pixels_adjacent(out), num_warps=rwarps)


def _nhwc_like(*ts):
    """Unwritten NHWC stand-ins for the via-channels_last variant's copies (same strides,
    alignment and dtypes, so the same specialisation compiles), or the tensors themselves where
    they already qualify."""
    return tuple(t if _nhwc_strided(t) else _nhwc_empty(t) for t in ts)


def _compile_all(cands, interpret: bool, warm) -> None:
    """The tuning's ``prepare``: compile every candidate for this call's specialisation at once,
    in threads (as dense's matmul does), before they are timed. ``warm(config, nhwc)`` launches
    ``warmup`` with the direct configuration on ``nhwc(*tensors)``: the tensors themselves, or
    for a via-channels_last candidate their NHWC stand-ins (nothing copied). Where Triton lacks
    AsyncCompileMode each candidate compiles in its warm-up launch instead."""
    if interpret or len(cands) < 2:
        return
    with parallel_compile(len(cands)) as available:
        for cfg in (cands if available else ()):
            warm(_direct_cfg(cfg), _nhwc_like if VIA_CL in cfg[5:] else (lambda *ts: ts))


def _direct_cfg(cfg: tuple) -> tuple:
    """A candidate as the direct launch takes it: the tile, and FLAT where the candidate has it
    (VIA_CL is the launcher's business, not the kernel's)."""
    return tuple(c for c in cfg if c != VIA_CL)


def _launch_variant(direct, cfg, a, w, out, writes_as_it_lies=None):
    """``direct(cfg, a, w, out)`` for a plain 5-tuple configuration; for the via-channels_last
    variant (``cfg[5] == VIA_CL``): NHWC copies of the operands that are not NHWC already, the
    kernel in its NHWC specialisation, ``out`` copied back from an NHWC temporary (a fresh one
    each call: a tuning run(cfg) must be idempotent, and torch's caching allocator makes it
    cheap) unless ``writes_as_it_lies(direct cfg, out)`` says the kernel writes ``out`` itself
    (the TMA forward's descriptor store of an NCHW output)."""
    if VIA_CL not in cfg[5:]:
        direct(cfg, a, w, out)
        return
    if writes_as_it_lies is not None and writes_as_it_lies(_direct_cfg(cfg), out):
        direct(_direct_cfg(cfg), _nhwc_copy(a), _nhwc_copy(w), out)
        return
    oc = out if _nhwc_strided(out) else _nhwc_empty(out)
    direct(_direct_cfg(cfg), _nhwc_copy(a), _nhwc_copy(w), oc)
    if oc is not out:
        layout_copy(out, oc)


def _tma_rows(m):
    """The 2-D ``m`` itself where TMA can describe it row-major (the dense matmul's test), else a
    fresh contiguous copy (a fresh allocation: ``contiguous()`` of a contiguous view whose base is
    not 16-byte aligned would return the view itself)."""
    return m if _tma_operand(m, False) else torch.empty_like(m, memory_format=torch.contiguous_format).copy_(m)


def _jit_launch(kernel, grid, args, meta, warm: bool) -> None:
    """``kernel[grid](*args, **meta)`` through the JIT (the TMA launchers: the cached launch plans
    of ``_launch`` take pointer arguments only), or with ``warm`` its compile only
    (:func:`_compiling`)."""
    (_compiling(kernel, grid) if warm else kernel[grid])(*args, **meta)


def _x_descriptor(x, stride, bh: int, bw: int, bk: int):
    """TMA descriptor of x [N, C, H, W] (:func:`_tma_describable` for ``stride``) as NHWC, box
    [1, bh, bw, bk]; strided (``stride`` not 1): of :func:`_strided_view`, box [1, bh, 1, bw,
    bk]. Returns ``(descriptor, strided)``."""
    xs = x.permute(0, 2, 3, 1)
    if tuple(stride) == (1, 1):
        return TensorDescriptor(xs, list(xs.shape), list(xs.stride()), [1, bh, bw, bk]), False
    return TensorDescriptor(xs, *_strided_view(x, stride), [1, bh, 1, bw, bk]), True


def _y_describable(y, bw: int) -> bool:
    """Whether TMA can describe an NCHW-ordered ``y`` [N, O, Ho, Wo] for a tile store with box rows
    of ``bw`` pixels: unit pixel stride (not NHWC, whose pointer stores are 128 bits wide
    already), strides and base multiples of 16 bytes (Wo * element size: not 7x7 in half
    precision), box rows of at least 16 bytes, and rows of whole 16-byte units: a TMA store
    writes up to the next 16-byte boundary past a row's last element (triton-lang/triton issue
    11583, the hardware's), which in a row of a wider one (a width-sliced ``y``) is another
    element's."""
    es = y.element_size()
    return (y.stride(3) == 1 and y.stride(1) != 1 and bw * es % 16 == 0 and y.data_ptr() % 16 == 0
            and y.shape[3] * es % 16 == 0 and all(st * es % 16 == 0 for st in y.stride()[:3]))


def _y_descriptor(y, bh: int, bw: int, bn: int):
    """TMA descriptor of ``y`` (:func:`_y_describable`), box [1, bn, bh, bw], for the TMA kernels'
    tile store (``Y_DESC`` / ``DX_DESC``); None where TMA cannot describe it."""
    if not _y_describable(y, bw):
        return None
    return TensorDescriptor(y, list(y.shape), list(y.stride()), [1, bn, bh, bw])


def _tma_y_direct(cfg, y) -> bool:
    """Whether the TMA forward ``cfg`` stores ``y`` as it lies through a descriptor (the
    via-channels_last variant then writes an NCHW ``y`` itself, no NHWC temporary and copy)."""
    return TMA in cfg and _y_describable(y, cfg[1])


def _tma_forward(cfg, x, w, b, y, stride, padding, dilation, activation, prec, warm=False) -> None:
    """One launch of :func:`_conv_tma_fwd_kernel` (``warm``: compile only) through the JIT
    (``kernel[grid]``: the cached launch plans of ``_launch`` take pointer arguments only); x
    must be :func:`_tma_describable` for the stride, one group. An NCHW ``y`` that
    :func:`_y_descriptor` describes is written by a TMA store."""
    bh, bw, bn, bk, warps, stages = cfg[:6]
    n, _, _, _ = x.shape
    o, cg, kh, kw = w.shape
    _, _, ho, wo = y.shape
    assert cg % bk == 0 and _tma_strided(x), "the TMA forward needs whole channel blocks and an NHWC-describable x"
    if not _tma_describable(x, stride):  # a strided view needs whole pixels (a channel-sliced x)
        x = layout_copy(_nhwc_empty(x), x)
    wv = _tma_rows(w.permute(0, 2, 3, 1).reshape(o, kh * kw * cg))  # [O, TAPS * C]: a view of a channels_last weight
    x_desc, strided = _x_descriptor(x, stride, bh, bw, bk)
    w_desc = TensorDescriptor(wv, list(wv.shape), list(wv.stride()), [bn, bk])
    grid = (n * cdiv(ho, bh) * cdiv(wo, bw), cdiv(o, bn))
    y_desc = _y_descriptor(y, bh, bw, bn)
    args = (x_desc, w_desc, b if b is not None else y, y if y_desc is None else y_desc, ho, wo, o, cg, kw, kh * kw,
            padding[0], padding[2], dilation[0], dilation[1], stride[0], stride[1], *y.stride(), int(b is not None),
            ACT_CODES[activation])
    meta = dict(PREC=_dot_precision(prec), BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk, STRIDED=strided,
                Y_DESC=y_desc is not None, num_warps=warps, num_stages=stages)
    _jit_launch(_conv_tma_fwd_kernel, grid, args, meta, warm)


def _tma_dgrad(cfg, g, w, dx, stride, padding, dilation, prec, warm=False) -> None:
    """One launch of :func:`_conv_tma_dgrad_kernel` (``warm``: compile only) through the JIT; g
    must be :func:`_tma_strided`, one group, dilation 1 where the stride is not. The weight is
    read as [TAPS * O, C] (tap, output channel) rows: a copy of the usual weight (a pass over
    the weight alone)."""
    bh, bw, bn, bk, warps, stages = cfg[:6]
    n, c, h, wd = dx.shape
    o, _, kh, kw = w.shape
    _, _, ho, wo = g.shape
    sh, sw = stride
    strided = (sh, sw) != (1, 1)
    assert o % bk == 0 and _tma_strided(g), "the TMA input gradient needs whole channel blocks and an NHWC-describable g"
    assert not strided or tuple(dilation) == (1, 1), "the strided TMA input gradient needs dilation 1"
    gs = g.permute(0, 2, 3, 1)
    wt = _tma_rows(w.permute(2, 3, 0, 1).reshape(kh * kw * o, c))
    g_desc = TensorDescriptor(gs, list(gs.shape), list(gs.stride()), [1, bh, bw, bk])
    w_desc = TensorDescriptor(wt, list(wt.shape), list(wt.stride()), [bk, bn])
    # strided: blocks of each residue class's cdiv(h, sh) x cdiv(wd, sw) pixels
    grid = (sh * sw * n * cdiv(cdiv(h, sh), bh) * cdiv(cdiv(wd, sw), bw), cdiv(c, bn))
    dx_desc = None if strided else _y_descriptor(dx, bh, bw, bn)  # an NCHW dx: the TMA store
    args = (g_desc, w_desc, dx if dx_desc is None else dx_desc, h, wd, ho, wo, c, o, kw, kh * kw, padding[0],
            padding[2], dilation[0], dilation[1], sh, sw, *dx.stride())
    meta = dict(PREC=_dot_precision(prec), BH=bh, BW=bw, BLOCK_N=bn, BLOCK_K=bk, STRIDED=strided,
                DX_DESC=dx_desc is not None, num_warps=warps, num_stages=stages)
    _jit_launch(_conv_tma_dgrad_kernel, grid, args, meta, warm)


def _tma_wgrad(cfg, g, x, dw, stride, padding, dilation, prec, interpret: bool, warm=False) -> None:
    """The TMA weight gradient (``warm``: compile only): NHWC copies of x and g where they cannot
    be described as they are, :func:`_conv_tma_wgrad_kernel` into float32 partial sums over
    splits of the output-pixel blocks (:func:`wgrad_split`), summed into dw."""
    bh, bw, bc, bo, warps, stages = cfg[:6]
    x, g = _nhwc_copy(x), _nhwc_copy(g)
    if not _tma_describable(x, stride):  # a strided view needs whole pixels (a channel-sliced x)
        x = layout_copy(_nhwc_empty(x), x)
    n, c, _, _ = x.shape
    o, _, kh, kw = dw.shape
    _, _, ho, wo = g.shape
    nb = n * cdiv(ho, bh) * cdiv(wo, bw)
    tiles = cdiv(c, bc) * kh * kw * cdiv(o, bo)
    split = wgrad_split(tiles, nb * bh * bw, bh * bw, interpret)
    chunk = cdiv(nb, split)
    split = cdiv(nb, chunk)
    ws = _partials(split, (o, c, kh * kw), dw)
    gs = g.permute(0, 2, 3, 1)
    x_desc, strided = _x_descriptor(x, stride, bh, bw, bc)
    g_desc = TensorDescriptor(gs, list(gs.shape), list(gs.stride()), [1, bh, bw, bo])
    grid = (cdiv(c, bc), kh * kw * cdiv(o, bo), split)
    args = (x_desc, g_desc, ws, n, ho, wo, c, o, kw, kh * kw, padding[0], padding[2], dilation[0], dilation[1],
            stride[0], stride[1], chunk)
    meta = dict(PREC=_dot_precision(prec), BH=bh, BW=bw, BLOCK_C=bc, BLOCK_O=bo, STRIDED=strided, num_warps=warps,
                num_stages=stages)
    _jit_launch(_conv_tma_wgrad_kernel, grid, args, meta, warm)
    if not warm:
        _reduce_partials(ws, dw)


def conv_forward(x, w, bias, y, stride, padding, dilation, groups, activation, prec, interpret, choose=None):
    """``y`` [N, O, Ho, Wo] = act(conv(x [N, C, H, W], w [O, C/groups, kh, kw]) + bias [O]).

    ``padding`` is ``[top, bottom, left, right]`` (only top/left enter the index math: the
    bottom/right padding only decides Ho/Wo, which ``y`` already has). Any strides.

    ``choose``: None (the heuristic :func:`pick_config` decides) or a measuring chooser
    ``choose(op, key, candidates, run, default, prepare=) -> config`` (``gpu_nn._tuning.choose``
    bound to the device, which the caller passes only where measuring is possible; ``prepare``
    compiles every candidate at once before they are timed): the implicit-GEMM forward then
    launches the fastest of :func:`problem_candidates` for this problem; a depthwise one the
    fastest of ``DW_FWD_CANDIDATES`` (its input and weight gradients keep ``DW_CONFIG``)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    _, _, ho, wo = y.shape
    if y.numel() == 0:
        return
    og = o // groups
    # the problem as a measuring chooser keys it (every launch rewrites y in full, so the
    # candidates are timed on the real buffers); x's 16-byte alignment too: a TMA candidate that
    # reads x as it is exists only for an aligned x, and a choice kept for one must not serve a
    # view of the same strides that is not
    key = None if choose is None else (
        tuple(x.shape), tuple(x.stride()), tuple(w.shape), tuple(w.stride()), tuple(y.stride()), str(x.dtype),
        tuple(stride), tuple(padding), tuple(dilation), groups, prec, bias is not None, activation,
        x.data_ptr() % 16 == 0)
    if is_depthwise(c, cg, groups):
        pix = pixels_adjacent(x)

        def dw_launch(cfg, warm=False):
            bp, bc, warps = cfg
            _launcher(_conv_dw_fwd_kernel, (cdiv(n * ho * wo, bp), cdiv(o, bc)), warm)(
                x, w, bias if bias is not None else y, y,
                n, h, wd, o, ho, wo, kw, kh * kw, og,
                *x.stride(), w.stride(0), w.stride(2), w.stride(3), *y.stride(),
                stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
                int(bias is not None), ACT_CODES[activation],
                BLOCK_P=bp, BLOCK_C=bc, PIX_FAST=pix, num_warps=warps,
            )

        cfg = dw_config(interpret)
        if choose is not None:
            cfg = tuple(choose("conv_dw_fwd", key, list(DW_FWD_CANDIDATES), dw_launch, cfg,
                               prepare=lambda cs: _compile_all(cs, interpret, lambda c, _: dw_launch(c, warm=True))))
        dw_launch(cfg)
        return
    half = x.element_size() == 2

    def direct(cfg, x, w, y, warm=False):
        if TMA in cfg:
            _tma_forward(cfg, x, w, bias, y, stride, padding, dilation, activation, prec, warm)
            return
        bm, bn, bk, warps, stages = cfg[:5]
        split = SPLIT in cfg[5:]
        packed = PACKED in cfg[5:]
        m = n * ho * wo
        if split:
            # split K (one group): the partial products, no bias or activation, into a float32
            # workspace [S, N*Ho*Wo, O] (an NHWC output to the kernel), then summed into y with them
            k_iters = cdiv(cg * kh * kw, bk) if packed else kh * kw * cdiv(cg, bk)
            nsplit = split_count(cdiv(m, bm) * cdiv(og, bn), k_iters)
            out = torch.empty((nsplit, m, og), dtype=torch.float32, device=y.device)
            out_strides, b, epilogue = (ho * wo * og, 1, wo * og, og), out, (0, 0)
        else:
            nsplit, out, out_strides = groups, y, y.stride()
            b, epilogue = bias if bias is not None else y, (int(bias is not None), ACT_CODES[activation])
        grid = (cdiv(m, bm), cdiv(og, bn), nsplit)
        _launcher(_conv_fwd_kernel, grid, warm)(
            x, w, b, out,
            n, h, wd, ho, wo, kw, kh * kw, cg, og,
            *x.stride(), *w.stride(), *out_strides,
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            *epilogue, PREC=_dot_precision(prec), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            FLAT_K=FLAT in cfg[5:], SPLIT_K=split, PACKED_K=packed, **_pix_flags(x, out, split), num_warps=warps,
            num_stages=stages,
        )
        if split:
            _splitk_finish(out, bias, y, activation, warm)

    def launch(cfg):
        _launch_variant(direct, cfg, x, w, y, _tma_y_direct)

    cfg = fwd_heuristic(x, w, bias, y, groups, fwd_default(og, n * ho * wo, cg, kh * kw, half, interpret), interpret,
                        prec)
    if choose is not None:
        facts = (problem_candidates, key, tuple(y.shape), w.data_ptr() % 16 == 0, y.data_ptr() % 16 == 0,
                 bias is None or bias.data_ptr() % 16 == 0, x.get_device())
        cands = _candidates(facts, lambda: problem_candidates(x, w, bias, y, groups, prec, stride))
        def warm(c, nhwc):
            # a candidate that writes y as it lies (the TMA store of an NCHW y) compiles for y itself
            direct(c, *nhwc(x, w), y if _tma_y_direct(c, y) else nhwc(y)[0], warm=True)

        cfg = tuple(choose("conv_fwd", key, cands, launch, cfg, prepare=lambda cs: _compile_all(cs, interpret, warm)))
    launch(cfg)


def conv_backward_data(g, w, dx, stride, padding, dilation, groups, prec, interpret, choose=None):
    """``dx`` [N, C, H, W] = gradient of the input from ``g`` [N, O, Ho, Wo] and ``w``.
    ``choose``: as for :func:`conv_forward`, over :func:`dgrad_candidates` (with its NHWC tiles
    or its via-channels_last variant where they apply)."""
    n, c, h, wd = dx.shape
    o, cg, kh, kw = w.shape
    _, _, ho, wo = g.shape
    if dx.numel() == 0:
        return
    og = o // groups
    if is_depthwise(c, cg, groups):
        bp, bc, warps = dw_config(interpret)
        grid = (dgrad_grid_m(n, h, wd, stride, bp), cdiv(c, bc))
        launch_kernel(
            _conv_dw_dgrad_kernel, grid,
            g, w, dx,
            n, h, wd, c, ho, wo, kw, kh * kw, og,
            *g.stride(), w.stride(0), w.stride(2), w.stride(3), *dx.stride(),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            BLOCK_P=bp, BLOCK_C=bc, PIX_FAST=pixels_adjacent(g), num_warps=warps,
        )
        return
    half = g.element_size() == 2

    def direct(cfg, g, w, dx, warm=False):
        if TMA in cfg:
            _tma_dgrad(cfg, g, w, dx, stride, padding, dilation, prec, warm)
            return
        bm, bn, bk, warps, stages = cfg[:5]
        split = SPLIT in cfg[5:]
        m = n * h * wd
        nsplit = split_count(cdiv(m, bm) * cdiv(cg, bn), kh * kw) if split else groups
        # split: the taps' partial sums into a float32 workspace [S, N, H, W, CG] (an NHWC
        # gradient to the kernel), then summed into dx
        out = torch.empty((nsplit, m, cg), dtype=torch.float32, device=dx.device) if split else dx
        strides = (h * wd * cg, 1, wd * cg, cg) if split else dx.stride()
        grid = (dgrad_grid_m(n, h, wd, stride, bm), cdiv(cg, bn), nsplit)
        kernel = _launcher(_conv_dgrad_kernel, grid, warm)
        kernel(
            g, w, out,
            n, h, wd, ho, wo, kw, kh * kw, cg, og,
            *g.stride(), *w.stride(), *strides,
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            PREC=_dot_precision(prec), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_T=split, **_pix_flags(g, out, split),
            num_warps=warps, num_stages=stages,
        )
        if split:
            _splitk_finish(out, None, dx, None, warm)

    def writes_as_it_lies(cfg, dx):
        # the stride-1 TMA input gradient stores an NCHW dx itself through a descriptor
        return tuple(stride) == (1, 1) and _tma_y_direct(cfg, dx)

    def launch(cfg):
        _launch_variant(direct, cfg, g, w, dx, writes_as_it_lies)

    cfg = pick_config(cg, n * h * wd, half, interpret, DGRAD_CONFIGS)
    if choose is not None:
        key = (tuple(g.shape), tuple(g.stride()), tuple(w.shape), tuple(w.stride()), tuple(dx.shape), tuple(dx.stride()),
               str(g.dtype), tuple(stride), tuple(padding), tuple(dilation), groups, prec,
               g.data_ptr() % 16 == 0)  # as the forward's key

        def warm(c, nhwc):
            direct(c, *nhwc(g, w), dx if writes_as_it_lies(c, dx) else nhwc(dx)[0], warm=True)

        facts = (dgrad_problem_candidates, key, w.data_ptr() % 16 == 0, dx.data_ptr() % 16 == 0, g.get_device())
        cands = _candidates(facts, lambda: dgrad_problem_candidates(g, w, dx, groups, prec, stride, dilation))
        cfg = tuple(choose("conv_dgrad", key, cands, launch, cfg, prepare=lambda cs: _compile_all(cs, interpret, warm)))
    launch(cfg)


def conv_backward_weight(g, x, dw, stride, padding, dilation, groups, prec, interpret, choose=None):
    """``dw`` [O, C/groups, kh, kw] = sum over batch and output pixels of ``g`` x input patches.
    ``choose``: as for :func:`conv_forward`, over :func:`wgrad_candidates` (the K split follows
    each candidate's tile); depthwise convolutions keep their single configuration."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = dw.shape
    _, _, ho, wo = g.shape
    og = o // groups
    m = n * ho * wo
    if m == 0:
        dw.zero_()
        return
    if is_depthwise(c, cg, groups):
        bp, bc, warps = dw_config(interpret)
        split = wgrad_split(cdiv(o, bc) * kh * kw, m, bp, interpret)
        chunk = cdiv(cdiv(m, split), bp) * bp
        split = cdiv(m, chunk)
        ws = _partials(split, (o, kh * kw), dw)
        launch_kernel(
            _conv_dw_wgrad_kernel, (cdiv(o, bc), kh * kw, split),
            g, x, ws,
            n, h, wd, o, ho, wo, kw, kh * kw, og, chunk,
            *g.stride(), *x.stride(),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            BLOCK_P=bp, BLOCK_C=bc, PIX_FAST=pixels_adjacent(x), num_warps=warps,
        )
        _reduce_partials(ws, dw)
        return
    assert kh * kw <= GRID_YZ_MAX, "more taps than grid y holds: refused by the ops layer"
    sliced = (GRID_YZ_MAX // (kh * kw)) * WGRAD_MIN_BLOCK_N  # input channels a launch takes
    if cg > sliced:  # column tiles past grid y: one group at a time, in channel slices (views)
        for gi in range(groups):
            gg, ci = g[:, gi * og:(gi + 1) * og], gi * cg
            for c0 in range(0, cg, sliced):
                c1 = min(cg, c0 + sliced)
                conv_backward_weight(gg, x[:, ci + c0:ci + c1], dw[gi * og:(gi + 1) * og, c0:c1], stride, padding,
                                     dilation, 1, prec, interpret, choose)
        return
    half = x.element_size() == 2

    def run(cfg, warm=False):
        if TMA in cfg:
            _tma_wgrad(cfg, g, x, dw, stride, padding, dilation, prec, interpret, warm)
            return
        bm, bn, bk, warps, stages = cfg[:5]
        packed = PACKED in cfg[5:]
        cols = cdiv(cg * kh * kw, bn) if packed else cdiv(cg, bn) * kh * kw
        tiles = cdiv(og, bm) * cols * groups
        split = wgrad_split(tiles, m, bk, interpret)
        chunk = cdiv(cdiv(m, split), bk) * bk
        split = cdiv(m, chunk)
        ws = _partials(split, (o, cg, kh * kw), dw)
        grid = (cdiv(og, bm), cols, groups * split)
        kernel = _launcher(_conv_wgrad_kernel, grid, warm)
        kernel(
            g, x, ws,
            n, h, wd, ho, wo, kw, kh * kw, cg, og, groups, chunk,
            *g.stride(), *x.stride(),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            PREC=_dot_precision(prec), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PACKED_N=packed, B_PIX=pixels_adjacent(x),
            num_warps=warps, num_stages=stages,
        )
        if not warm:
            _reduce_partials(ws, dw)

    cfg = wgrad_default(og, cg, kh * kw, half, interpret)
    if choose is not None:
        # every run rewrites dw in full (its partials summed into it, or written directly)
        key = (tuple(g.shape), tuple(g.stride()), tuple(x.shape), tuple(x.stride()), tuple(dw.shape),
               tuple(dw.stride()), str(x.dtype), tuple(stride), tuple(padding), tuple(dilation), groups, prec,
               g.data_ptr() % 16 == 0, x.data_ptr() % 16 == 0)  # as the forward's key
        def build():
            out = list(wgrad_candidates(half, cg, kh * kw))
            if TMA_CHOOSER and tma_device(x):  # taps x output-channel blocks ride grid y
                out += [t for t in tma_wgrad_candidates(g, x, stride, groups, prec)
                        if kh * kw * cdiv(o, t[3]) <= GRID_YZ_MAX]
            return out

        cands = _candidates((wgrad_candidates, tma_wgrad_candidates, key, x.get_device()), build)
        cfg = tuple(choose("conv_wgrad", key, cands, run, cfg,
                           prepare=lambda cs: _compile_all(cs, interpret, lambda c, _nhwc: run(c, warm=True))))
    run(cfg)


def _direct(dw) -> bool:
    return dw.dtype == torch.float32 and dw.is_contiguous()


def _partials(split: int, shape: tuple, dw):
    """The float32 buffer ``[split, *shape]`` of the wgrad kernels' partial sums. With one split
    and a contiguous float32 ``dw`` (same layout) that is ``dw`` itself: no reduction, no copy."""
    if split == 1 and _direct(dw):
        return dw.view(1, *shape)
    return torch.empty((split, *shape), dtype=torch.float32, device=dw.device)


def _reduce_partials(ws, dw) -> None:
    """dw = sum of the partials: one reduction, written in place when dw can take it. A float32
    dw in another layout (channels_last) takes the sum through its own strides, one pass where a
    contiguous sum and a transposing copy were two; a half-precision dw keeps the float32 sum and
    one rounding copy (torch's sum into a half ``out`` rounds its float32 input to half first)."""
    if ws.data_ptr() == dw.data_ptr() and ws.shape[0] == 1:
        return  # the kernel wrote dw directly
    if _direct(dw):
        torch.sum(ws, 0, out=dw.view(ws.shape[1:]))
    elif dw.dtype == torch.float32:
        torch.sum(ws.view(ws.shape[0], *dw.shape), 0, out=dw)
    else:
        dw.copy_(ws.sum(0).view(dw.shape))


# ----------------------------------------------------------------------------- AOT

_INTS_FWD = ("N", "H", "W", "Ho", "Wo", "KW", "TAPS", "CG", "OG",
             "stride_xn", "stride_xc", "stride_xh", "stride_xw",
             "stride_wo", "stride_wc", "stride_wh", "stride_ww",
             "stride_yn", "stride_yc", "stride_yh", "stride_yw",
             "SH", "SW", "PH", "PW", "DH", "DW")
_INTS_DGRAD = ("N", "H", "W", "Ho", "Wo", "KW", "TAPS", "CG", "OG",
               "stride_gn", "stride_gc", "stride_gh", "stride_gw",
               "stride_wo", "stride_wc", "stride_wh", "stride_ww",
               "stride_dn", "stride_dc", "stride_dh", "stride_dw",
               "SH", "SW", "PH", "PW", "DH", "DW")
_INTS_WGRAD = ("N", "H", "W", "Ho", "Wo", "KW", "TAPS", "CG", "OG", "G", "CHUNK",
               "stride_gn", "stride_gc", "stride_gh", "stride_gw",
               "stride_xn", "stride_xc", "stride_xh", "stride_xw",
               "SH", "SW", "PH", "PW", "DH", "DW")
_INTS_DW_FWD = ("N", "H", "W", "O", "Ho", "Wo", "KW", "TAPS", "MULT",
                "stride_xn", "stride_xc", "stride_xh", "stride_xw", "stride_wo", "stride_wh", "stride_ww",
                "stride_yn", "stride_yc", "stride_yh", "stride_yw", "SH", "SW", "PH", "PW", "DH", "DW", "HAS_BIAS", "ACT")
_INTS_DW_DGRAD = ("N", "H", "W", "C", "Ho", "Wo", "KW", "TAPS", "MULT",
                  "stride_gn", "stride_gc", "stride_gh", "stride_gw", "stride_wo", "stride_wh", "stride_ww",
                  "stride_dn", "stride_dc", "stride_dh", "stride_dw", "SH", "SW", "PH", "PW", "DH", "DW")
_INTS_DW_WGRAD = ("N", "H", "W", "O", "Ho", "Wo", "KW", "TAPS", "MULT", "CHUNK",
                  "stride_gn", "stride_gc", "stride_gh", "stride_gw", "stride_xn", "stride_xc", "stride_xh", "stride_xw",
                  "SH", "SW", "PH", "PW", "DH", "DW")


def _fwd_spec(dt: str, prec: str, cname: str, cfg: tuple, nhwc: bool = False, flat: bool = False,
              split: bool = False, packed: bool = False, apix: bool = False) -> AotSpec:
    """The forward kernel's spec for one configuration; ``nhwc``: in the channels_last
    specialisation NHWC_CONFIGS launch with (unit strides as constexprs, 16-divisible ints);
    ``flat``: the one-loop K (``FLAT_K``); ``split``: its split-K form (``SPLIT_K``, flat too),
    which writes the float32 workspace (passed as y and as the unread bias); ``packed``: the
    (channel, tap) K loop (``PACKED_K``); ``apix``: the A tile loaded and (but for the split
    form) the result stored pixels-fastest (``A_PIX`` / ``Y_PIX``: what NCHW problems launch
    with, :func:`_pix_flags`)."""
    bm, bn, bk, warps, stages = cfg
    blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "FLAT_K": flat or split, "SPLIT_K": split,
              "PACKED_K": packed, "A_PIX": apix, "Y_PIX": apix and not split}
    unit = {k: 1 for k in NHWC_UNIT} if nhwc else {}
    out = "fp32" if split else dt
    sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{out}", "y_ptr": f"*{out}"}
    sig.update({k: "i32" for k in _INTS_FWD})
    sig.update({"HAS_BIAS": "i32", "ACT": "i32"})
    sig.update({k: "constexpr" for k in ("PREC", *blocks, *unit)})
    variant = (" split" if split else " flat" if flat else " packed" if packed else "") + (" apix" if apix else "")
    return AotSpec(_conv_fwd_kernel, sig, {"PREC": prec, **blocks, **unit}, num_warps=warps, num_stages=stages,
                   label=f"fwd {cname} {dt} {prec}{variant}",
                   **({"divisible_by_16": NHWC_DIV16} if nhwc else {}))


def _dgrad_spec(dt: str, prec: str, cname: str, cfg: tuple, nhwc: bool = False, split: bool = False,
                apix: bool = False) -> AotSpec:
    """The input gradient kernel's spec for one configuration; ``nhwc``: in the channels_last
    specialisation NHWC_DGRAD_CONFIGS launch with (DGRAD_NHWC_UNIT, DGRAD_NHWC_DIV16); ``split``:
    the tap-split form (``SPLIT_T``), which writes the float32 workspace; ``apix``: g loaded and
    (but for the split form) dx stored pixels-fastest (NCHW problems, :func:`_pix_flags`)."""
    bm, bn, bk, warps, stages = cfg
    blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_T": split, "A_PIX": apix, "Y_PIX": apix and not split}
    unit = {k: 1 for k in DGRAD_NHWC_UNIT} if nhwc else {}
    sig = {"g_ptr": f"*{dt}", "w_ptr": f"*{dt}", "dx_ptr": f"*{'fp32' if split else dt}"}
    sig.update({k: "i32" for k in _INTS_DGRAD})
    sig.update({k: "constexpr" for k in ("PREC", *blocks, *unit)})
    return AotSpec(_conv_dgrad_kernel, sig, {"PREC": prec, **blocks, **unit}, num_warps=warps, num_stages=stages,
                   label=f"dgrad {cname} {dt} {prec}{' split' if split else ''}{' apix' if apix else ''}",
                   **({"divisible_by_16": DGRAD_NHWC_DIV16} if nhwc else {}))


_INTS_TMA_FWD = ("Ho", "Wo", "O", "CG", "KW", "TAPS", "PH", "PW", "DH", "DW", "SH", "SW",
                 "stride_yn", "stride_yc", "stride_yh", "stride_yw", "HAS_BIAS", "ACT")


_INTS_TMA_DGRAD = ("H", "W", "Ho", "Wo", "C", "O", "KW", "TAPS", "PH", "PW", "DH", "DW", "SH", "SW",
                   "stride_dn", "stride_dc", "stride_dh", "stride_dw")


_INTS_TMA_WGRAD = ("N", "Ho", "Wo", "C", "O", "KW", "TAPS", "PH", "PW", "DH", "DW", "SH", "SW", "CHUNK")


def _tma_spec(kernel, part: str, cname: str, cfg: tuple, dt: str, prec: str, strided: bool, ptrs: dict, ints,
              names, store: tuple = ()) -> AotSpec:
    """One TMA kernel's spec: ``ptrs`` (descriptors and pointers by name, in parameter order),
    the run-time ints, and the tile ``cfg`` = (*blocks named ``names``, num_warps, num_stages).
    ``store`` ``(flag, output, suffix, on)``: a kernel with a descriptor-store flag (``Y_DESC``,
    ``DX_DESC``); ``on``: the ``output`` argument is a descriptor of the NCHW result, box [1,
    BLOCK_N, BH, BW], and the label ends in ``suffix``."""
    *values, warps, stages = cfg[:len(names) + 2]
    blocks = {**dict(zip(names, values)), "STRIDED": strided}
    label = f"{part} {cname} {dt} {prec} tma{' strided' if strided else ''}"
    if store:
        flag, output, suffix, on = store
        blocks[flag] = on
        if on:
            ptrs = {**ptrs, output: f"tensordesc<{dt}[1, {blocks['BLOCK_N']}, {blocks['BH']}, {blocks['BW']}]>"}
            label += f" {suffix}"
    sig = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in ("PREC", *blocks)}}
    return AotSpec(kernel, sig, {"PREC": prec, **blocks}, num_warps=warps, num_stages=stages, label=label)


def _tma_specs() -> list[AotSpec]:
    """The TMA kernels' specs: every TMA_CONFIGS (forward), WGRAD_TMA_CONFIGS (weight gradient)
    and DGRAD_TMA_CONFIGS (input gradient) tile in TF32 (float32) and in float16 / bfloat16, and
    each kernel's TMA_STRIDED tile in its ``STRIDED`` form (the forward's and weight gradient's
    x a 5-D descriptor, :func:`_strided_view`)."""
    def x_box(bh, bw, bk, strided):
        return f"1, {bh}, 1, {bw}, {bk}" if strided else f"1, {bh}, {bw}, {bk}"

    specs = []
    for dt, prec in (("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")):
        key = "fp32" if dt == "fp32" else "half"
        for strided in (False, True):
            def tiles(part, table):
                return [(n, c) for n, c in table[key].items() if not strided or n == TMA_STRIDED[part]]
            for cname, cfg in tiles("fwd", TMA_CONFIGS):
                bh, bw, bn, bk = cfg[:4]
                ptrs = {"x_desc": f"tensordesc<{dt}[{x_box(bh, bw, bk, strided)}]>",
                        "w_desc": f"tensordesc<{dt}[{bn}, {bk}]>", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}"}
                # y through pointers, and for the via-channels_last tiles also y NCHW through a
                # descriptor (Y_DESC: the TMA store)
                for y_desc in (False, True) if cname in TMA_VIA_CL[key] or strided else (False,):
                    specs.append(_tma_spec(_conv_tma_fwd_kernel, "fwd", cname, cfg, dt, prec, strided, ptrs,
                                           _INTS_TMA_FWD, ("BH", "BW", "BLOCK_N", "BLOCK_K"),
                                           ("Y_DESC", "y_ptr", "nchw-y", y_desc)))
            for cname, cfg in tiles("wgrad", WGRAD_TMA_CONFIGS):
                bh, bw, bc, bo = cfg[:4]
                ptrs = {"x_desc": f"tensordesc<{dt}[{x_box(bh, bw, bc, strided)}]>",
                        "g_desc": f"tensordesc<{dt}[1, {bh}, {bw}, {bo}]>", "ws_ptr": "*fp32"}
                specs.append(_tma_spec(_conv_tma_wgrad_kernel, "wgrad", cname, cfg, dt, prec, strided, ptrs,
                                       _INTS_TMA_WGRAD, ("BH", "BW", "BLOCK_C", "BLOCK_O")))
            for cname, cfg in tiles("dgrad", DGRAD_TMA_CONFIGS):
                bh, bw, bn, bk = cfg[:4]
                ptrs = {"g_desc": f"tensordesc<{dt}[1, {bh}, {bw}, {bk}]>", "w_desc": f"tensordesc<{dt}[{bk}, {bn}]>",
                        "dx_ptr": f"*{dt}"}
                # dx through pointers, and at stride 1 also NCHW dx through a descriptor (DX_DESC:
                # the TMA store; the via-channels_last tile's, and any tile's where g is
                # channels_last and x, so dx, NCHW)
                for dx_desc in (False, True) if not strided else (False,):
                    specs.append(_tma_spec(_conv_tma_dgrad_kernel, "dgrad", cname, cfg, dt, prec, strided, ptrs,
                                           _INTS_TMA_DGRAD, ("BH", "BW", "BLOCK_N", "BLOCK_K"),
                                           ("DX_DESC", "dx_ptr", "nchw-dx", dx_desc)))
    return specs


def aot_specs():
    """Every configuration the launchers can launch on a GPU: each GPU config x dtype x
    (float32) precision (wgrad: all but "large"), plus the forward's measured-choice candidates
    (TUNE_CONFIGS, and NHWC_CONFIGS and the FWD_VIA_CL tiles in the channels_last specialisation
    they launch with) and the input gradient's (DGRAD_NHWC_CONFIGS and the DGRAD_VIA_CL tiles, in
    theirs); bias and activation are runtime arguments of the forward kernel. ``tests/test_aot_coverage.py`` checks that launches stay within this list."""
    specs = []
    # the via-channels_last copies, NCHW -> NHWC (unit source stride along j, destination's along
    # i: constants, as the JIT makes them) and back, and the form with no unit stride
    bi, bj, lwarps = LAYOUT_COPY
    for dt in ("fp32", "fp16", "bf16"):
        for ones, lab in ((("s_j", "d_i"), "nchw->nhwc"), (("s_i", "d_j"), "nhwc->nchw"), ((), "strided")):
            sig = {"src_ptr": f"*{dt}", "dst_ptr": f"*{dt}"}
            sig.update({k: "i32" for k in ("I", "J", "tiles_j", "tiles_ij", "s_b", "s_i", "s_j", "d_b", "d_i", "d_j")})
            sig.update({k: "constexpr" for k in (*ones, "BLOCK_I", "BLOCK_J")})
            spec = AotSpec(_layout_copy_kernel, sig, {**{k: 1 for k in ones}, "BLOCK_I": bi, "BLOCK_J": bj},
                           num_warps=lwarps, label=f"layout copy {dt} {lab}")
            # and as a plane of a multiple of 16 pixels launches it (28x28, 56x56: every int a
            # multiple of 16): 128-bit loads and stores on both sides (sm_90, Triton 3.9: 32-40
            # registers, the tile through 8 KB (half) / 16 KB (float32) of shared memory)
            specs += [spec, spec.aligned()] if ones else [spec]
    variants = [("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")]
    for dt, prec in variants:
        key = "fp32" if dt == "fp32" else "half"
        tiles = {**GPU_CONFIGS[key], **TUNE_CONFIGS[key], **NHWC_CONFIGS[key]}
        for cname, cfg in GPU_CONFIGS[key].items():
            specs += [_fwd_spec(dt, prec, cname, cfg, apix=apix) for apix in (False, True)]
            specs += [_dgrad_spec(dt, prec, cname, DGRAD_CONFIGS[key][cname], apix=apix) for apix in (False, True)]
        # the weight gradient: every candidate (pick_config(og, 0)'s "small" / "medium" among
        # them), with channel-block columns and with packed (channel, tap) columns
        for cname in WGRAD_CANDIDATES[key]:
            bm, bn, bk, warps, stages = tiles[cname]
            for packed in (False, True):
                for bpix in (False, True):
                    blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "PACKED_N": packed, "B_PIX": bpix}
                    sig = {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "ws_ptr": "*fp32"}
                    sig.update({k: "i32" for k in _INTS_WGRAD})
                    sig.update({k: "constexpr" for k in ("PREC", *blocks)})
                    specs.append(AotSpec(_conv_wgrad_kernel, sig, {"PREC": prec, **blocks}, num_warps=warps,
                                         num_stages=stages, label=f"wgrad {cname} {dt} {prec}{' packed' if packed else ''}"
                                         f"{' apix' if bpix else ''}"))
        # the generic tiles' variants, each also pixels-fastest (A_PIX: NCHW inputs)
        for apix in (False, True):
            for cname, cfg in TUNE_CONFIGS[key].items():
                specs.append(_fwd_spec(dt, prec, cname, cfg, apix=apix))
            for cname in FWD_PACKED[key]:
                specs.append(_fwd_spec(dt, prec, cname, tiles[cname], packed=True, apix=apix))
            for cname in FWD_FLAT[(key, False)]:
                specs.append(_fwd_spec(dt, prec, cname, tiles[cname], flat=True, apix=apix))
            for cname in FWD_SPLIT[(key, False)]:
                specs.append(_fwd_spec(dt, prec, cname, tiles[cname], split=True, apix=apix))
        for cname in DGRAD_SPLIT[(key, False)]:
            specs += [_dgrad_spec(dt, prec, cname, DGRAD_CONFIGS[key][cname], split=True, apix=apix)
                      for apix in (False, True)]
        if prec == "ieee" and dt == "fp32":
            continue  # the NHWC specialisation: TF32 or half only (see NHWC_CONFIGS)
        for cname, cfg in NHWC_CONFIGS[key].items():
            specs.append(_fwd_spec(dt, prec, cname, cfg, nhwc=True))
        # the flat-K tiles in the NHWC specialisation (FWD_FLAT's NHWC ones, and those the
        # via-channels_last variant launches flat on its copies)
        for cname in dict.fromkeys([*FWD_FLAT[(key, True)], *FWD_VIA_CL_FLAT[key]]):
            specs.append(_fwd_spec(dt, prec, cname if cname in NHWC_CONFIGS[key] else f"{cname}/nhwc", tiles[cname],
                                   nhwc=True, flat=True))
        for cname in FWD_SPLIT[(key, True)]:
            specs.append(_fwd_spec(dt, prec, cname, tiles[cname], nhwc=True, split=True))
        for cname in DGRAD_SPLIT[(key, True)]:
            specs.append(_dgrad_spec(dt, prec, cname, DGRAD_NHWC_CONFIGS[key][cname], nhwc=True, split=True))
        # the generic tiles the via-channels_last variant launches on its NHWC copies (channels_last
        # callers with channel counts in multiples of 16 get the same specialisation), and the
        # heuristic's own tiles there (such callers untuned; float32's via-channels_last heuristic)
        for cname in dict.fromkeys([*FWD_VIA_CL[key], *GPU_CONFIGS[key]]):
            if cname not in NHWC_CONFIGS[key]:
                cfg = {**GPU_CONFIGS[key], **TUNE_CONFIGS[key]}[cname]
                specs.append(_fwd_spec(dt, prec, f"{cname}/nhwc", cfg, nhwc=True))
        for cname, cfg in DGRAD_NHWC_CONFIGS[key].items():
            specs.append(_dgrad_spec(dt, prec, cname, cfg, nhwc=True))
        for cname in DGRAD_VIA_CL[key]:
            if cname not in DGRAD_NHWC_CONFIGS[key]:
                specs.append(_dgrad_spec(dt, prec, f"{cname}/nhwc", DGRAD_CONFIGS[key][cname], nhwc=True))
    specs += _tma_specs()
    rbm, rbn, rwarps = REDUCE_BLOCKS
    for dt in ("fp32", "fp16", "bf16"):
        sig = {"ws_ptr": "*fp32", "b_ptr": f"*{dt}", "y_ptr": f"*{dt}"}
        sig.update({k: "i32" for k in ("M", "O", "Ho", "Wo", "S", "stride_yn", "stride_yc", "stride_yh", "stride_yw",
                                       "HAS_BIAS", "ACT")})
        sig.update({"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "Y_PIX": "constexpr"})
        for pix in (False, True):
            specs.append(AotSpec(_conv_splitk_reduce_kernel, sig, {"BLOCK_M": rbm, "BLOCK_N": rbn, "Y_PIX": pix},
                                 num_warps=rwarps, label=f"splitk reduce {dt}{' apix' if pix else ''}"))
    for dt in ("fp32", "fp16", "bf16"):
        for kernel, ptrs, ints, kind in (
            (_conv_dw_fwd_kernel, ("x_ptr", "w_ptr", "b_ptr", "y_ptr"), _INTS_DW_FWD, "fwd"),
            (_conv_dw_dgrad_kernel, ("g_ptr", "w_ptr", "dx_ptr"), _INTS_DW_DGRAD, "dgrad"),
            (_conv_dw_wgrad_kernel, ("g_ptr", "x_ptr", "ws_ptr"), _INTS_DW_WGRAD, "wgrad"),
        ):
            # the forward's tuning candidates too, DW_CONFIG's label unchanged
            for bp, bc, warps in (DW_FWD_CANDIDATES if kind == "fwd" else (DW_CONFIG,)):
                tile = "" if (bp, bc, warps) == DW_CONFIG else f" {bp}x{bc} w{warps}"
                for pix in (False, True):
                    sig = {p: ("*fp32" if p == "ws_ptr" else f"*{dt}") for p in ptrs}
                    sig.update({k: "i32" for k in ints})
                    sig.update({k: "constexpr" for k in ("BLOCK_P", "BLOCK_C", "PIX_FAST")})
                    specs.append(AotSpec(kernel, sig, {"BLOCK_P": bp, "BLOCK_C": bc, "PIX_FAST": pix}, num_warps=warps,
                                         label=f"depthwise {kind} {dt}{tile}{' pixels' if pix else ''}"))
    return specs
