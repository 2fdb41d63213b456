// Multi-tensor optimizer steps for the cupy backend: Adam/AdamW and RMSprop.
//
// One launch per (device, dtype) part of a parameter group. CUDA C can turn integers into
// pointers, so the chunk table holds raw device addresses: one row of OPTIM_NCOL int64 per
// block-sized chunk, [param, grad, state0, state1, state2, step, start, numel]. Each thread
// block walks OPTIM_CHUNK elements of one tensor with a grid-stride-free loop.
// Per-step scalars that depend on the step count (bias corrections) are computed per block in
// double from the device-resident step tensor (no host synchronisation), by the GN_HD
// functions of optim_math.cuh that tests/test_optim.py also runs on the host.
// Parameters/gradients: PARAM_KIND 0 = float, 1 = float16, 2 = bfloat16 (the half kinds stored
// as unsigned short and converted with PTX cvt, so no CUDA header beyond NVRTC's builtins is
// needed); state is float32.
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

// hyper: lr, beta1, beta2, eps, weight_decay (float64, by value)
extern "C" __global__ void adam_step(const long long* __restrict__ table, double lr, double beta1, double beta2,
                                     double eps, double wd, int amsgrad, int maximize, int decoupled) {
    const long long* row = table + (long long)blockIdx.x * OPTIM_NCOL;
    PARAM_T* p = reinterpret_cast<PARAM_T*>(row[0]);
    const PARAM_T* g = reinterpret_cast<const PARAM_T*>(row[1]);
    float* m = reinterpret_cast<float*>(row[2]);
    float* v = reinterpret_cast<float*>(row[3]);
    float* vmax = reinterpret_cast<float*>(row[4]);
    double step = (double)*reinterpret_cast<const float*>(row[5]);
    long long start = row[6], n = row[7];
    const GnAdamScalars s = gn_adam_scalars(lr, beta1, beta2, eps, wd, step);
    long long end = start + OPTIM_CHUNK < n ? start + OPTIM_CHUNK : n;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float pi = gn_to_f(p[i]);
        float mi = m[i], vi = v[i];
        float vm = amsgrad ? vmax[i] : 0.0f;
        gn_adam_update(pi, gn_to_f(g[i]), mi, vi, vm, amsgrad, maximize, decoupled, s.w1, s.beta2, s.w2, s.wd,
                       s.eps, s.neg_step_size, s.bc2_sqrt, s.decay);
        p[i] = gn_from_f(pi);
        m[i] = mi;
        v[i] = vi;
        if (amsgrad) vmax[i] = vm;
    }
}

extern "C" __global__ void rmsprop_step(const long long* __restrict__ table, double lr, double alpha, double eps,
                                        double wd, double momentum, int centered, int maximize) {
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
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float pi = gn_to_f(p[i]);
        float vi = v[i];
        float gai = centered ? ga[i] : 0.0f;
        float bi = use_momentum ? buf[i] : 0.0f;
        gn_rmsprop_update(pi, gn_to_f(g[i]), vi, gai, bi, centered, use_momentum, maximize, s.lr, s.alpha, s.w,
                          s.eps, s.wd, s.momentum);
        p[i] = gn_from_f(pi);
        v[i] = vi;
        if (centered) ga[i] = gai;
        if (use_momentum) buf[i] = bi;
    }
}
