// Per-element math of the optimizer steps (Adam/AdamW, RMSprop), in torch's operation order.
// GN_HD: compiled by NVRTC for the kernels in optim.cu and by g++ in tests/test_optim.py,
// which checks it against the NumPy reference. All arithmetic is float32; the per-step
// scalars (bias corrections, decay) are computed by the caller in float64.
#pragma once
#include "common.cuh"

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
        avg = sqrtf(v + (-ga) * ga);
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
