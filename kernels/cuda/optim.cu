// Multi-tensor optimizer steps for the cupy backend: Adam/AdamW and RMSprop.
//
// One launch per (device, dtype) part of a parameter group. CUDA C can turn integers into
// pointers, so the chunk table holds raw device addresses: one row of OPTIM_NCOL int64 per
// block-sized chunk, [param, grad, state0, state1, state2, step, start, numel]. Each thread
// block walks OPTIM_CHUNK elements of one tensor with a grid-stride-free loop.
// Per-step scalars that depend on the step count (bias corrections) are computed per block in
// double from the device-resident step tensor (no host synchronisation), by the GN_HD
// functions of optim_math.cuh that tests/test_optim.py also runs on the host. The learning rate
// comes by value (adam_step, rmsprop_step) or as a pointer to a float32 tensor read on the
// device (the *_lr_ptr entry points: a tensor lr, capturable into CUDA graphs).
// Parameters/gradients: PARAM_KIND 0 = float, 1 = float16, 2 = bfloat16 (the half kinds stored
// as unsigned short and converted with PTX cvt, so no CUDA header beyond NVRTC's builtins is
// needed); state is float32.
//
// Each thread takes GN_ILP consecutive elements at a time (optim_math.cuh's gn_chunk_loop), every
// load of the group issued before any arithmetic (as one 16-byte access per float32 tensor,
// 8-byte per half one, where the chunk's tensors are 16-byte aligned; element by element
// otherwise and for a chunk's last, partial group): four times the bytes in flight of an
// element-at-a-time loop, which is what a memory-bound step at the GPU's bandwidth needs. The
// arithmetic is per element either way (gn_adam_update / gn_rmsprop_update): the same bits,
// since the build contracts nothing the source does not (kernels/cuda/__init__.py
// SOURCE_OPTIONS: --fmad=false; NVRTC's default fused each path's copy of Adam's second moment
// differently).
#include "optim_math.cuh"

#ifndef PARAM_KIND
#define PARAM_KIND 0
#endif
#ifndef OPTIM_CHUNK
#define OPTIM_CHUNK 16384
#endif
#define OPTIM_NCOL 8

#if PARAM_KIND == 0
typedef float PARAM_T;
__device__ __forceinline__ float gn_to_f(float x) { return x; }
__device__ __forceinline__ float gn_from_f(float x) { return x; }
#elif PARAM_KIND == 1
typedef unsigned short PARAM_T;
__device__ __forceinline__ float gn_to_f(unsigned short x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ unsigned short gn_from_f(float f) {
    unsigned short x;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
}
#else
typedef unsigned short PARAM_T;
__device__ __forceinline__ float gn_to_f(unsigned short x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ unsigned short gn_from_f(float f) {
    unsigned short x;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(f));  // sm_80+
    return x;
}
#endif

// N consecutive elements from a (16-byte aligned for float N = 4, 8-byte for half), as floats
template <int N>
__device__ __forceinline__ void gn_load(const float* a, float (&o)[N]) {
    if (N == 4) {
        float4 t = *reinterpret_cast<const float4*>(a);
        o[0] = t.x, o[1] = t.y, o[2] = t.z, o[3 % N] = t.w;
    } else {
        for (int j = 0; j < N; ++j) o[j] = a[j];
    }
}
template <int N>
__device__ __forceinline__ void gn_store(float* a, const float (&o)[N]) {
    if (N == 4) {
        *reinterpret_cast<float4*>(a) = make_float4(o[0], o[1 % N], o[2 % N], o[3 % N]);
    } else {
        for (int j = 0; j < N; ++j) a[j] = o[j];
    }
}
#if PARAM_KIND != 0
template <int N>
__device__ __forceinline__ void gn_load(const unsigned short* a, float (&o)[N]) {
    if (N == 4) {
        uint2 t = *reinterpret_cast<const uint2*>(a);
        o[0] = gn_to_f((unsigned short)(t.x & 0xffffu)), o[1 % N] = gn_to_f((unsigned short)(t.x >> 16));
        o[2 % N] = gn_to_f((unsigned short)(t.y & 0xffffu)), o[3 % N] = gn_to_f((unsigned short)(t.y >> 16));
    } else {
        for (int j = 0; j < N; ++j) o[j] = gn_to_f(a[j]);
    }
}
template <int N>
__device__ __forceinline__ void gn_store(unsigned short* a, const float (&o)[N]) {
    if (N == 4) {
        uint2 t;
        t.x = (unsigned)gn_from_f(o[0]) | ((unsigned)gn_from_f(o[1 % N]) << 16);
        t.y = (unsigned)gn_from_f(o[2 % N]) | ((unsigned)gn_from_f(o[3 % N]) << 16);
        *reinterpret_cast<uint2*>(a) = t;
    } else {
        for (int j = 0; j < N; ++j) a[j] = gn_from_f(o[j]);
    }
}
#endif

// Whether every tensor of a chunk row (the unused ones are 0) allows the 16-byte group accesses
__device__ __forceinline__ bool gn_row_aligned(const long long* row, long long start) {
    return ((row[0] | row[1] | row[2] | row[3] | row[4]) & 15) == 0 && (start % GN_ILP) == 0;
}

template <int N>
__device__ __forceinline__ void adam_group(PARAM_T* p, PARAM_T* g, float* m, float* v, float* vmax, int amsgrad,
                                           int maximize, int decoupled, const GnAdamScalars& s,
                                           const float* __restrict__ scale) {
    float pi[N], gi[N], mi[N], vi[N], vm[N];
    gn_load<N>(p, pi);
    gn_load<N>(g, gi);
    if (scale) {  // GradScaler's unscale (IEEE division, as torch's fused step), left in the gradient
        const float sc = *scale;
        for (int j = 0; j < N; ++j) gi[j] = __fdiv_rn(gi[j], sc);
        gn_store<N>(g, gi);
    }
    gn_load<N>(m, mi);
    gn_load<N>(v, vi);
    if (amsgrad) gn_load<N>(vmax, vm);
    for (int j = 0; j < N; ++j) {
        if (!amsgrad) vm[j] = 0.0f;
        gn_adam_update(pi[j], gi[j], mi[j], vi[j], vm[j], amsgrad, maximize, decoupled, s.w1, s.beta2, s.w2, s.wd,
                       s.eps, s.neg_step_size, s.bc2_sqrt, s.decay);
    }
    gn_store<N>(p, pi);
    gn_store<N>(m, mi);
    gn_store<N>(v, vi);
    if (amsgrad) gn_store<N>(vmax, vm);
}

// One block's chunk of an Adam/AdamW step. hyper: lr, beta1, beta2, eps, weight_decay (float64).
// GradScaler's scalars (null where not given): found_inf nonzero skips the whole step (nothing
// written, as torch's fused step), scale unscales the gradient first.
__device__ __forceinline__ void adam_chunk(const long long* __restrict__ table, double lr, double beta1, double beta2,
                                           double eps, double wd, int amsgrad, int maximize, int decoupled,
                                           const float* __restrict__ scale, const float* __restrict__ found_inf) {
    if (found_inf && *found_inf != 0.0f) return;
    const long long* row = table + (long long)blockIdx.x * OPTIM_NCOL;
    PARAM_T* p = reinterpret_cast<PARAM_T*>(row[0]);
    PARAM_T* g = reinterpret_cast<PARAM_T*>(row[1]);
    float* m = reinterpret_cast<float*>(row[2]);
    float* v = reinterpret_cast<float*>(row[3]);
    float* vmax = reinterpret_cast<float*>(row[4]);
    double step = (double)*reinterpret_cast<const float*>(row[5]);
    long long start = row[6], n = row[7];
    const GnAdamScalars s = gn_adam_scalars(lr, beta1, beta2, eps, wd, step);
    long long end = start + OPTIM_CHUNK < n ? start + OPTIM_CHUNK : n;
    gn_chunk_loop(gn_row_aligned(row, start), start, end, threadIdx.x, blockDim.x, [&](long long i, int n) {
        if (n == GN_ILP) adam_group<GN_ILP>(p + i, g + i, m + i, v + i, vmax + i, amsgrad, maximize, decoupled, s, scale);
        else adam_group<1>(p + i, g + i, m + i, v + i, vmax + i, amsgrad, maximize, decoupled, s, scale);
    });
}

// The learning rate by value (a Python float) ...
extern "C" __global__ void adam_step(const long long* __restrict__ table, double lr, double beta1, double beta2,
                                     double eps, double wd, int amsgrad, int maximize, int decoupled,
                                     const float* __restrict__ scale, const float* __restrict__ found_inf) {
    adam_chunk(table, lr, beta1, beta2, eps, wd, amsgrad, maximize, decoupled, scale, found_inf);
}

// ... or read from a 1-element float32 tensor on the device when the kernel runs (a tensor lr that a
// scheduler changes in place, CUDA graph replays included), widened exactly: the same step as the
// float lr of its value.
extern "C" __global__ void adam_step_lr_ptr(const long long* __restrict__ table, const float* __restrict__ lr,
                                            double beta1, double beta2, double eps, double wd, int amsgrad,
                                            int maximize, int decoupled, const float* __restrict__ scale,
                                            const float* __restrict__ found_inf) {
    adam_chunk(table, (double)*lr, beta1, beta2, eps, wd, amsgrad, maximize, decoupled, scale, found_inf);
}

template <int N>
__device__ __forceinline__ void rmsprop_group(PARAM_T* p, const PARAM_T* g, float* v, float* ga, float* buf,
                                              int centered, int use_momentum, int maximize,
                                              const GnRmspropScalars& s) {
    float pi[N], gi[N], vi[N], gai[N], bi[N];
    gn_load<N>(p, pi);
    gn_load<N>(g, gi);
    gn_load<N>(v, vi);
    if (centered) gn_load<N>(ga, gai);
    if (use_momentum) gn_load<N>(buf, bi);
    for (int j = 0; j < N; ++j) {
        if (!centered) gai[j] = 0.0f;
        if (!use_momentum) bi[j] = 0.0f;
        gn_rmsprop_update(pi[j], gi[j], vi[j], gai[j], bi[j], centered, use_momentum, maximize, s.lr, s.alpha, s.w,
                          s.eps, s.wd, s.momentum);
    }
    gn_store<N>(p, pi);
    gn_store<N>(v, vi);
    if (centered) gn_store<N>(ga, gai);
    if (use_momentum) gn_store<N>(buf, bi);
}

// One block's chunk of an RMSprop step
__device__ __forceinline__ void rmsprop_chunk(const long long* __restrict__ table, double lr, double alpha,
                                              double eps, double wd, double momentum, int centered, int maximize) {
    const long long* row = table + (long long)blockIdx.x * OPTIM_NCOL;
    PARAM_T* p = reinterpret_cast<PARAM_T*>(row[0]);
    const PARAM_T* g = reinterpret_cast<const PARAM_T*>(row[1]);
    float* v = reinterpret_cast<float*>(row[2]);
    float* ga = reinterpret_cast<float*>(row[3]);
    float* buf = reinterpret_cast<float*>(row[4]);
    long long start = row[6], n = row[7];
    const GnRmspropScalars s = gn_rmsprop_scalars(lr, alpha, eps, wd, momentum);
    const int use_momentum = s.use_momentum;
    long long end = start + OPTIM_CHUNK < n ? start + OPTIM_CHUNK : n;
    gn_chunk_loop(gn_row_aligned(row, start), start, end, threadIdx.x, blockDim.x, [&](long long i, int n) {
        if (n == GN_ILP)
            rmsprop_group<GN_ILP>(p + i, g + i, v + i, ga + i, buf + i, centered, use_momentum, maximize, s);
        else
            rmsprop_group<1>(p + i, g + i, v + i, ga + i, buf + i, centered, use_momentum, maximize, s);
    });
}

extern "C" __global__ void rmsprop_step(const long long* __restrict__ table, double lr, double alpha, double eps,
                                        double wd, double momentum, int centered, int maximize) {
    rmsprop_chunk(table, lr, alpha, eps, wd, momentum, centered, maximize);
}

// lr read on the device (see adam_step_lr_ptr)
extern "C" __global__ void rmsprop_step_lr_ptr(const long long* __restrict__ table, const float* __restrict__ lr,
                                               double alpha, double eps, double wd, double momentum, int centered,
                                               int maximize) {
    rmsprop_chunk(table, (double)*lr, alpha, eps, wd, momentum, centered, maximize);
}
