// Per-element math of the optimizer steps (Adam/AdamW, RMSprop), in torch's operation order.
// GN_HD: compiled by NVRTC for the kernels in optim.cu and by g++ in tests/test_optim.py,
// which checks it against the NumPy reference, and the per-step scalars (bias corrections,
// step size, decay) against torch.optim's Python formulas. The per-element arithmetic is
// float32; the per-step scalars are computed in float64 (as torch computes them in Python) and
// rounded to float once.
#pragma once
#include "common.cuh"

// b^n for an integer-valued step n >= 0 by repeated squaring: the step arrives as a float32
// read from the device (exact up to 2^24), and NVRTC's pow(double, double) is slower than the
// ~log2(n) multiplications this needs.
GN_HD double gn_pow_int(double b, double step) {
    long long n = (long long)step;
    double r = 1.0;
    while (n > 0) {
        if (n & 1) r *= b;
        b *= b;
        n >>= 1;
    }
    return r;
}

// The per-step scalars of one Adam/AdamW step, in torch's order (torch/optim/adam.py,
// _single_tensor_adam, non-capturable): bias_correction1 = 1 - beta1^t,
// bias_correction2 = 1 - beta2^t, step_size = lr / bias_correction1,
// bias_correction2_sqrt = bias_correction2^0.5, decay = 1 - lr wd (decoupled weight decay);
// w1 = 1 - beta1 (lerp weight), w2 = 1 - beta2 (addcmul value). Each rounded to float once.
struct GnAdamScalars {
    float neg_step_size, bc2_sqrt, w1, beta2, w2, wd, eps, decay;
};

GN_HD GnAdamScalars gn_adam_scalars(double lr, double beta1, double beta2, double eps, double wd, double step) {
    double bc1 = 1.0 - gn_pow_int(beta1, step);
    double bc2 = 1.0 - gn_pow_int(beta2, step);
    GnAdamScalars s;
    s.neg_step_size = (float)(-(lr / bc1));
    s.bc2_sqrt = (float)sqrt(bc2);
    s.w1 = (float)(1.0 - beta1);
    s.beta2 = (float)beta2;
    s.w2 = (float)(1.0 - beta2);
    s.wd = (float)wd;
    s.eps = (float)eps;
    s.decay = (float)(1.0 - lr * wd);
    return s;
}

// The per-step scalars of one RMSprop step (torch/optim/rmsprop.py, _single_tensor_rmsprop):
// w = 1 - alpha (addcmul value and lerp weight); momentum is used when > 0. RMSprop has no
// bias correction, so nothing depends on the step count.
struct GnRmspropScalars {
    float lr, alpha, w, eps, wd, momentum;
    int use_momentum;
};

GN_HD GnRmspropScalars gn_rmsprop_scalars(double lr, double alpha, double eps, double wd, double momentum) {
    GnRmspropScalars s;
    s.lr = (float)lr;
    s.alpha = (float)alpha;
    s.w = (float)(1.0 - alpha);
    s.eps = (float)eps;
    s.wd = (float)wd;
    s.momentum = (float)momentum;
    s.use_momentum = momentum > 0.0;
    return s;
}

// Elements per thread per turn of the kernels' chunk loops (optim.cu): every load of a group is
// issued before any arithmetic, as one 16-byte access per float32 tensor where aligned.
#define GN_ILP 4

// The elements [start, end) of one chunk that thread tid of nthreads updates, as body(i, n)
// calls on the n elements from i: with aligned, groups of GN_ILP (thread tid takes groups tid,
// tid + nthreads, ...) and the chunk's last, partial group element by element by the one thread
// whose turn it is; otherwise element by element (element tid, tid + nthreads, ...). Each element
// of the chunk exactly once either way (tests/test_optim.py runs it on the host for every thread).
template <typename F>
GN_HD void gn_chunk_loop(bool aligned, long long start, long long end, long long tid, long long nthreads, F body) {
    if (aligned) {
        long long i = start + GN_ILP * tid;
        for (; i + GN_ILP <= end; i += GN_ILP * nthreads) body(i, GN_ILP);
        for (; i < end; ++i) body(i, 1);
    } else {
        for (long long i = start + tid; i < end; i += nthreads) body(i, 1);
    }
}

// torch.lerp's two-sided formula
GN_HD float gn_lerp(float a, float b, float w) {
    float d = b - a;
    return w < 0.5f ? a + w * d : b - d * (1.0f - w);
}

// One Adam/AdamW element. decoupled: p *= decay (= 1 - lr wd), else g += wd p (when wd != 0).
// The caller rounds double-precision scalars to float as torch does: w1 = 1 - beta1,
// w2 = 1 - beta2, neg_step_size = -(lr / (1 - beta1^t)), bc2_sqrt = sqrt(1 - beta2^t).
GN_HD void gn_adam_update(float& p, float g, float& m, float& v, float& vmax, int amsgrad, int maximize,
                          int decoupled, float w1, float beta2, float w2, float wd, float eps,
                          float neg_step_size, float bc2_sqrt, float decay) {
    if (maximize) g = -g;
    if (wd != 0.0f) {
        if (decoupled) p = p * decay;
        else g = g + wd * p;
    }
    m = gn_lerp(m, g, w1);
    v = v * beta2 + (w2 * g) * g;
    float s;
    if (amsgrad) {
        vmax = (v > vmax || v != v) ? v : vmax;  // torch.maximum keeps NaN
        s = sqrtf(vmax);
    } else {
        s = sqrtf(v);
    }
    float denom = s / bc2_sqrt + eps;
    p = p + (neg_step_size * m) / denom;
}

// One RMSprop element.
GN_HD void gn_rmsprop_update(float& p, float g, float& v, float& ga, float& buf, int centered, int use_momentum,
                             int maximize, float lr, float alpha, float w, float eps, float wd, float momentum) {
    // w = 1 - alpha rounded from double by the caller
    if (maximize) g = -g;
    if (wd != 0.0f) g = g + wd * p;
    v = v * alpha + (w * g) * g;
    float avg;
    if (centered) {
        ga = gn_lerp(ga, g, w);
        // torch's addcmul(v, ga, ga, value=-1) is one fused multiply-add (CPU and CUDA): ga^2
        // is never rounded alone, so v = +inf (g^2 overflowed) minus a finite ga^2 stays +inf
        // where a separately rounded ga^2 (> FLT_MAX once |ga| > 1.8e19) would give inf - inf =
        // NaN. fmaf says so to NVRTC and to the host compiler alike.
        avg = sqrtf(fmaf(-ga, ga, v));
    } else {
        avg = sqrtf(v);
    }
    avg = avg + eps;
    if (use_momentum) {
        buf = buf * momentum + g / avg;
        p = p + (-lr) * buf;
    } else {
        p = p + ((-lr) * g) / avg;
    }
}
