// Per-window math of the pooling kernels in pool.cu: GN_HD functions that NVRTC compiles for
// the GPU and that tests/test_pool.py compiles with g++ and checks against reference/pool.py.
//
// Semantics are torch's (see reference/pool.py): max visits taps row-major and takes a tap
// when v > best or isnan(v) (NaN propagates, ties keep the first position, the index is
// ih * W + iw, -1 for a window made only of padding); min is max of -x negated back; avg
// divides by divisor_override, else by the window clipped to the padded input
// (count_include_pad) or to the input. Values are read through gn_to_float (overloaded per
// element type) and accumulated in float.
#pragma once

#include "common.cuh"

#if GN_DEVICE
GN_HD float gn_inf() { return __int_as_float(0x7f800000); }
#else
GN_HD float gn_inf() { return HUGE_VALF; }
#endif

GN_HD float gn_to_float(float v) { return v; }
GN_HD float gn_to_float(double v) { return (float)v; }

// torch's pooling_output_shape for one dimension.
GN_HD gn_index gn_pool_out_size(gn_index len, int k, int s, int p, int d, int ceil_mode) {
    gn_index num = len + 2 * (gn_index)p - (gn_index)d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
    gn_index out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;  // floor division
    if (ceil_mode && (out - 1) * s >= len + p) out -= 1;
    return out;
}

// Max (minimum != 0: min) over the window whose first tap is (h0, w0) of the plane at x.
template <typename T>
GN_HD void gn_max_window(const T* x, gn_index sxh, gn_index sxw, gn_index H, gn_index W, gn_index h0, gn_index w0,
                         int KH, int KW, int DH, int DW, int minimum, float* out, gn_index* out_idx) {
    float best = -gn_inf();
    gn_index bidx = -1;
    for (int i = 0; i < KH; ++i) {
        gn_index ih = h0 + (gn_index)i * DH;
        if (ih < 0 || ih >= H) continue;
        for (int j = 0; j < KW; ++j) {
            gn_index iw = w0 + (gn_index)j * DW;
            if (iw < 0 || iw >= W) continue;
            float v = gn_to_float(x[ih * sxh + iw * sxw]);
            if (minimum) v = -v;
            // bidx < 0: the first in-input tap is the default position, as torch
            if (v > best || gn_isnan(v)) {
                best = v;
                bidx = ih * W + iw;
            } else if (bidx < 0) {
                bidx = ih * W + iw;
            }
        }
    }
    *out = minimum ? -best : best;
    *out_idx = bidx;
}

// torch's avg divisor of the window starting at (h0, w0); *empty when it holds no input.
GN_HD float gn_avg_divisor(gn_index h0, gn_index w0, gn_index H, gn_index W, int KH, int KW, int PH, int PW,
                           int count_pad, int divisor, bool* empty) {
    gn_index hend = h0 + KH < H + PH ? h0 + KH : H + PH;
    gn_index wend = w0 + KW < W + PW ? w0 + KW : W + PW;
    gn_index pool = (hend - h0) * (wend - w0);
    gn_index ch = (hend < H ? hend : H) - (h0 > 0 ? h0 : 0);
    gn_index cw = (wend < W ? wend : W) - (w0 > 0 ? w0 : 0);
    *empty = ch <= 0 || cw <= 0;
    if (divisor != 0) return (float)divisor;
    return (float)(count_pad ? pool : ch * cw);
}

template <typename T>
GN_HD float gn_avg_window(const T* x, gn_index sxh, gn_index sxw, gn_index H, gn_index W, gn_index h0, gn_index w0,
                          int KH, int KW, int PH, int PW, int count_pad, int divisor) {
    float acc = 0.0f;
    for (int i = 0; i < KH; ++i) {
        gn_index ih = h0 + i;
        if (ih < 0 || ih >= H) continue;
        for (int j = 0; j < KW; ++j) {
            gn_index iw = w0 + j;
            if (iw < 0 || iw >= W) continue;
            acc += gn_to_float(x[ih * sxh + iw * sxw]);
        }
    }
    bool empty;
    float div = gn_avg_divisor(h0, w0, H, W, KH, KW, PH, PW, count_pad, divisor, &empty);
    return empty ? 0.0f : acc / div;
}

// Gradient of input element (ih, iw): the sum of g over the windows covering it whose saved
// index names it. g and idx point at the [OH, OW] plane of this element's (n, c).
template <typename T>
GN_HD float gn_max_gather(const T* g, const gn_index* idx, gn_index ih, gn_index iw, gn_index W, gn_index OH, gn_index OW,
                          int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW) {
    float acc = 0.0f;
    gn_index target = ih * W + iw;
    for (int i = 0; i < KH; ++i) {
        gn_index hnum = ih + PH - (gn_index)i * DH;
        if (hnum < 0 || hnum % SH != 0) continue;
        gn_index oh = hnum / SH;
        if (oh >= OH) continue;
        for (int j = 0; j < KW; ++j) {
            gn_index wnum = iw + PW - (gn_index)j * DW;
            if (wnum < 0 || wnum % SW != 0) continue;
            gn_index ow = wnum / SW;
            if (ow >= OW) continue;
            gn_index o = oh * OW + ow;
            if (idx[o] == target) acc += gn_to_float(g[o]);
        }
    }
    return acc;
}

template <typename T>
GN_HD float gn_avg_gather(const T* g, gn_index ih, gn_index iw, gn_index H, gn_index W, gn_index OH, gn_index OW,
                          int KH, int KW, int SH, int SW, int PH, int PW, int count_pad, int divisor) {
    float acc = 0.0f;
    for (int i = 0; i < KH; ++i) {
        gn_index hnum = ih + PH - i;
        if (hnum < 0 || hnum % SH != 0) continue;
        gn_index oh = hnum / SH;
        if (oh >= OH) continue;
        for (int j = 0; j < KW; ++j) {
            gn_index wnum = iw + PW - j;
            if (wnum < 0 || wnum % SW != 0) continue;
            gn_index ow = wnum / SW;
            if (ow >= OW) continue;
            bool empty;
            float div = gn_avg_divisor(oh * SH - PH, ow * SW - PW, H, W, KH, KW, PH, PW, count_pad, divisor, &empty);
            if (!empty) acc += gn_to_float(g[oh * OW + ow]) / div;
        }
    }
    return acc;
}
