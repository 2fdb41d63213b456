// Max / min / avg pooling, forward and backward, in CUDA C (launched through CuPy).
//
// Shapes: x is [N, C, H, W] with any strides (sxn, sxc, sxh, sxw in elements); y, idx, g
// are dense [N, C, OH, OW] and dx dense [N, C, H, W], contiguous, or with POOL_CL in
// channels_last order (N, H, W, C: torch's layout for a channels_last input, written as it lies
// instead of through a copy). One thread per output (forward) or input (backward) element in
// the order of its memory (channels fastest with POOL_CL), grid-stride loops. Index arithmetic in pool_idx:
// 32-bit int with POOL_NARROW (the launcher's choice where every tensor spans fewer than 2^30
// elements, so that an index plus the grid's stride stays below 2^31), else int64; the sizes and
// strides arrive as int64 either way. The backward kernels gather over the windows covering
// each input element: no atomics, so the results are deterministic. The window math lives in pool_math.cuh (also compiled on the host
// by the tests). 1d pooling is 2d pooling of height 1.
//
// With POOL_NARROW the three sizes an element index is unravelled by arrive with their
// multiply-high divisors (pool_math.cuh's gn_fastdiv: m and s per size, computed by the launcher),
// so that placing an element costs a few multiplies instead of three integer divisions.
//
// The window (kernel size, stride, dilation, and max against min) is either the kernels' run-time
// arguments or, with POOL_FIXED, compile-time constants: the launcher compiles one module per
// window of up to 64 taps, where the tap loops unroll, the tap offsets fold into the addressing
// and the gathers' divisions by the stride become shifts or multiplies (the run-time arguments
// are then ignored). Padding, count_include_pad and divisor_override stay run-time values.
//
// Compile-time parameters (defaults let the file compile standalone):
//   POOL_T       element type: float, double, gn_f16 (IEEE half), gn_bf16 (bfloat16)
//   POOL_THREADS threads per block (launch bound)
//   POOL_NARROW  1: 32-bit index arithmetic (see above); 0 (default): int64
//   POOL_CL      1: y, idx, g and dx in channels_last order; 0 (default): contiguous NCHW
//   POOL_FIXED   1: the window from POOL_KH, POOL_KW, POOL_SH, POOL_SW, POOL_DH, POOL_DW and
//                POOL_MIN (1: min pooling); 0 (default): from the arguments
//   POOL_XW1     1: the forwards read x with column stride 1 (the launcher's choice where x's
//                columns are contiguous); 0 (default): sxw
#include "common.cuh"

#ifndef POOL_T
#define POOL_T float
#endif
#ifndef POOL_THREADS
#define POOL_THREADS 256
#endif
#ifndef POOL_NARROW
#define POOL_NARROW 0
#endif
#ifndef POOL_CL
#define POOL_CL 0
#endif
#ifndef POOL_FIXED
#define POOL_FIXED 0
#endif
#if POOL_NARROW
typedef int pool_idx;
#else
typedef gn_index pool_idx;
#endif
#ifndef POOL_XW1
#define POOL_XW1 0
#endif
// x's column stride: 1 at compile time with POOL_XW1 (the launcher's choice for an input whose
// columns are contiguous: the taps of a row are then constant offsets from its first), else the argument
#define GN_XW(arg) (POOL_XW1 ? (pool_idx)1 : (pool_idx)(arg))
// a window parameter: the compile-time POOL_<name> with POOL_FIXED, else the argument <name>_
#if POOL_FIXED
#define GN_WIN(name) (POOL_##name)
#else
#define GN_WIN(name) (name##_)
#endif

// Half types as raw bits: NVRTC has no cuda_fp16.h on its search path; conversions by PTX.
struct gn_f16 { unsigned short bits; };
struct gn_bf16 { unsigned short bits; };

__device__ __forceinline__ float gn_to_float(gn_f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float gn_to_float(gn_bf16 v) { return __uint_as_float(((unsigned int)v.bits) << 16); }

__device__ __forceinline__ void gn_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void gn_store(double* p, float v) { *p = (double)v; }
__device__ __forceinline__ void gn_store(gn_f16* p, float v) {
    unsigned short b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v));
    p->bits = b;
}
__device__ __forceinline__ void gn_store(gn_bf16* p, float v) {
    unsigned short b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(v));
    p->bits = b;
}

#include "pool_math.cuh"

#define GN_GRID_LOOP(i, total) \
    for (pool_idx i = (pool_idx)blockIdx.x * blockDim.x + threadIdx.x; i < (total); i += (pool_idx)gridDim.x * blockDim.x)

#define GN_PLANE_STRIDE(C) (POOL_CL ? (C) : (pool_idx)1)

// the sizes an element index is unravelled by (the last three of [N, C, R, Q]): with POOL_NARROW
// as gn_fastdiv from the size and its divisor's m and s arguments, else the sizes themselves
#if POOL_NARROW
#define GN_DIVISORS(C, R, Q)                                                                     \
    const gn_fastdiv dC = {(unsigned int)(C), mC, sC}, dR = {(unsigned int)(R), mR, sR},           \
                     dQ = {(unsigned int)(Q), mQ, sQ}
#else
#define GN_DIVISORS(C, R, Q) const pool_idx dC = (C), dR = (R), dQ = (Q)
#endif
#define GN_MAGIC_ARGS \
    unsigned int mC, unsigned int sC, unsigned int mR, unsigned int sR, unsigned int mQ, unsigned int sQ

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
pool_max_fwd(const POOL_T* __restrict__ x, POOL_T* __restrict__ y, gn_index* __restrict__ idx, gn_index total_,
             gn_index C_, gn_index H_, gn_index W_, gn_index OH_, gn_index OW_,
             gn_index sxn_, gn_index sxc_, gn_index sxh_, gn_index sxw_,
             int KH_, int KW_, int SH_, int SW_, int PH, int PW, int DH_, int DW_, int MIN_,
             GN_MAGIC_ARGS) {
    const pool_idx total = (pool_idx)total_, C = (pool_idx)C_, H = (pool_idx)H_, W = (pool_idx)W_;
    const pool_idx OH = (pool_idx)OH_, OW = (pool_idx)OW_;
    const pool_idx sxn = (pool_idx)sxn_, sxc = (pool_idx)sxc_, sxh = (pool_idx)sxh_, sxw = GN_XW(sxw_);
    const int KH = GN_WIN(KH), KW = GN_WIN(KW), SH = GN_WIN(SH), SW = GN_WIN(SW), DH = GN_WIN(DH), DW = GN_WIN(DW);
    GN_DIVISORS(C, OH, OW);
    GN_GRID_LOOP(o, total) {
        pool_idx n, c, oh, ow;
        gn_unravel(o, dC, dR, dQ, POOL_CL, &n, &c, &oh, &ow);
        float best;
        gn_index bidx;
        gn_max_window<POOL_T, pool_idx>(x, n * sxn + c * sxc, sxh, sxw, H, W, oh * SH - PH, ow * SW - PW,
                                        KH, KW, DH, DW, GN_WIN(MIN), &best, &bidx);
        gn_store(y + o, best);
        if (idx != nullptr) idx[o] = bidx;  // null: the values only (nothing will read the indices)
    }
}

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
pool_avg_fwd(const POOL_T* __restrict__ x, POOL_T* __restrict__ y, gn_index total_,
             gn_index C_, gn_index H_, gn_index W_, gn_index OH_, gn_index OW_,
             gn_index sxn_, gn_index sxc_, gn_index sxh_, gn_index sxw_,
             int KH_, int KW_, int SH_, int SW_, int PH, int PW, int count_pad, int divisor,
             GN_MAGIC_ARGS) {
    const pool_idx total = (pool_idx)total_, C = (pool_idx)C_, H = (pool_idx)H_, W = (pool_idx)W_;
    const pool_idx OH = (pool_idx)OH_, OW = (pool_idx)OW_;
    const pool_idx sxn = (pool_idx)sxn_, sxc = (pool_idx)sxc_, sxh = (pool_idx)sxh_, sxw = GN_XW(sxw_);
    const int KH = GN_WIN(KH), KW = GN_WIN(KW), SH = GN_WIN(SH), SW = GN_WIN(SW);
    GN_DIVISORS(C, OH, OW);
    GN_GRID_LOOP(o, total) {
        pool_idx n, c, oh, ow;
        gn_unravel(o, dC, dR, dQ, POOL_CL, &n, &c, &oh, &ow);
        gn_store(y + o, gn_avg_window<POOL_T, pool_idx>(x, n * sxn + c * sxc, sxh, sxw, H, W, oh * SH - PH,
                                                        ow * SW - PW, KH, KW, PH, PW, count_pad, divisor));
    }
}

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
pool_max_bwd(const POOL_T* __restrict__ g, const gn_index* __restrict__ idx, POOL_T* __restrict__ dx, gn_index total_,
             gn_index C_, gn_index H_, gn_index W_, gn_index OH_, gn_index OW_,
             int KH_, int KW_, int SH_, int SW_, int PH, int PW, int DH_, int DW_, GN_MAGIC_ARGS) {
    const pool_idx total = (pool_idx)total_, C = (pool_idx)C_, H = (pool_idx)H_, W = (pool_idx)W_;
    const pool_idx OH = (pool_idx)OH_, OW = (pool_idx)OW_;
    const int KH = GN_WIN(KH), KW = GN_WIN(KW), SH = GN_WIN(SH), SW = GN_WIN(SW), DH = GN_WIN(DH), DW = GN_WIN(DW);
    GN_DIVISORS(C, H, W);
    GN_GRID_LOOP(e, total) {
        pool_idx n, c, ih, iw;
        gn_unravel(e, dC, dR, dQ, POOL_CL, &n, &c, &ih, &iw);
        pool_idx ob = gn_plane<pool_idx>(n, c, C, OH, OW, POOL_CL);
        gn_store(dx + e, gn_max_gather<POOL_T, pool_idx>(g + ob, idx + ob, ih, iw, W, OH, OW, GN_PLANE_STRIDE(C), KH, KW,
                                                         SH, SW, PH, PW, DH, DW));
    }
}

extern "C" __global__ void __launch_bounds__(POOL_THREADS)
pool_avg_bwd(const POOL_T* __restrict__ g, POOL_T* __restrict__ dx, gn_index total_,
             gn_index C_, gn_index H_, gn_index W_, gn_index OH_, gn_index OW_,
             int KH_, int KW_, int SH_, int SW_, int PH, int PW, int count_pad, int divisor,
             GN_MAGIC_ARGS) {
    const pool_idx total = (pool_idx)total_, C = (pool_idx)C_, H = (pool_idx)H_, W = (pool_idx)W_;
    const pool_idx OH = (pool_idx)OH_, OW = (pool_idx)OW_;
    const int KH = GN_WIN(KH), KW = GN_WIN(KW), SH = GN_WIN(SH), SW = GN_WIN(SW);
    GN_DIVISORS(C, H, W);
    GN_GRID_LOOP(e, total) {
        pool_idx n, c, ih, iw;
        gn_unravel(e, dC, dR, dQ, POOL_CL, &n, &c, &ih, &iw);
        gn_store(dx + e, gn_avg_gather<POOL_T, pool_idx>(g + gn_plane<pool_idx>(n, c, C, OH, OW, POOL_CL), ih, iw, H, W, OH, OW,
                                                         GN_PLANE_STRIDE(C), KH, KW, SH, SW, PH, PW, count_pad, divisor));
    }
}
