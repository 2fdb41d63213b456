// Shared definitions for gpu-nn's CUDA C kernels.
//
// Per-element math lives in GN_HD functions: __host__ __device__ under NVRTC/nvcc, plain
// static inline C++ under the host compiler, so a CPU test can compile the very same math
// with g++ and check it against the NumPy reference.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GN_HD __host__ __device__ __forceinline__
#define GN_DEVICE 1
#else
#include <math.h>
#define GN_HD static inline
#define GN_DEVICE 0
#endif

typedef long long gn_index;  // int64 offsets: tensors may exceed 2^31 elements

GN_HD bool gn_isnan(float x) { return x != x; }
GN_HD bool gn_isnan(double x) { return x != x; }
