// Per-window math of the pooling kernels in pool.cu: GN_HD functions that NVRTC compiles for
// the GPU and that tests/test_pool.py compiles with g++ and checks against reference/pool.py.
//
// Semantics are torch's (see reference/pool.py): max visits taps row-major and takes a tap
// when v > best or isnan(v) (NaN propagates, ties keep the first position, the index is
// ih * W + iw, -1 for a window made only of padding); min is max of -x negated back; avg
// divides by divisor_override, else by the window clipped to the padded input
// (count_include_pad) or to the input. Values are read through gn_to_float (overloaded per
// element type) and accumulated in float.
//
// The index type I is a template parameter: the kernels use 32-bit int where every tensor they
// touch spans fewer than 2^30 elements (pool.cu's POOL_NARROW; a GPU divides 32-bit integers in
// a fraction of the instructions a 64-bit division takes) and long long otherwise; the host
// tests instantiate both.
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

// (n, c, r, q) of dense element e of an [N, C, R, Q] tensor: in contiguous order, or with cl in
// channels_last order (channels fastest), the order in which the kernels visit the elements.
template <typename I>
GN_HD void gn_unravel(I e, I C, I R, I Q, bool cl, I* n, I* c, I* r, I* q) {
    if (cl) {
        *c = e % C;
        I t = e / C;
        *q = t % Q;
        t /= Q;
        *r = t % R;
        *n = t / R;
    } else {
        *q = e % Q;
        I t = e / Q;
        *r = t % R;
        t /= R;
        *c = t % C;
        *n = t / C;
    }
}

// The first element of (n, c)'s [OH, OW] plane in a dense output (values, indices, gradient):
// its positions are 1 apart in contiguous order, C apart (gn_max_gather's SO) with cl.
template <typename I>
GN_HD I gn_plane(I n, I c, I C, I OH, I OW, bool cl) {
    return cl ? n * OH * OW * C + c : (n * C + c) * OH * OW;
}

// Max (minimum != 0: min) over the window whose first tap is (h0, w0) of the plane at x.
template <typename T, typename I>
GN_HD void gn_max_window(const T* x, I sxh, I sxw, I H, I W, I h0, I w0,
                         int KH, int KW, int DH, int DW, int minimum, float* out, gn_index* out_idx) {
    float best = -gn_inf();
    I bidx = -1;
    for (int i = 0; i < KH; ++i) {
        I ih = h0 + (I)i * DH;
        if (ih < 0 || ih >= H) continue;
        for (int j = 0; j < KW; ++j) {
            I iw = w0 + (I)j * DW;
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
    *out_idx = (gn_index)bidx;
}

// torch's avg divisor of the window starting at (h0, w0); *empty when it holds no input.
template <typename I>
GN_HD float gn_avg_divisor(I h0, I w0, I H, I W, int KH, int KW, int PH, int PW,
                           int count_pad, int divisor, bool* empty) {
    I hend = h0 + KH < H + PH ? h0 + KH : H + PH;
    I wend = w0 + KW < W + PW ? w0 + KW : W + PW;
    I pool = (hend - h0) * (wend - w0);
    I ch = (hend < H ? hend : H) - (h0 > 0 ? h0 : 0);
    I cw = (wend < W ? wend : W) - (w0 > 0 ? w0 : 0);
    *empty = ch <= 0 || cw <= 0;
    if (divisor != 0) return (float)divisor;
    return (float)(count_pad ? pool : ch * cw);
}

template <typename T, typename I>
GN_HD float gn_avg_window(const T* x, I sxh, I sxw, I H, I W, I h0, I w0,
                          int KH, int KW, int PH, int PW, int count_pad, int divisor) {
    float acc = 0.0f;
    for (int i = 0; i < KH; ++i) {
        I ih = h0 + i;
        if (ih < 0 || ih >= H) continue;
        for (int j = 0; j < KW; ++j) {
            I iw = w0 + j;
            if (iw < 0 || iw >= W) continue;
            acc += gn_to_float(x[ih * sxh + iw * sxw]);
        }
    }
    bool empty;
    float div = gn_avg_divisor<I>(h0, w0, H, W, KH, KW, PH, PW, count_pad, divisor, &empty);
    return empty ? 0.0f : acc / div;
}

// Gradient of input element (ih, iw): the sum of g over the windows covering it whose saved
// index names it. g and idx point at the [OH, OW] plane of this element's (n, c), its output
// positions SO elements apart (1 for NCHW, C for channels_last, where the channels of one
// position lie together). The windows
// that can cover row ih start at or before it and reach it: oh from (ih + PH) / SH down while
// oh * SH - PH + (KH - 1) * DH >= ih (one division per dimension, none per window). With
// dilation some of them skip ih; their saved index then names another element. Visited in the
// order of decreasing oh, then ow, as the taps of a window are (so the same float sums).
template <typename T, typename I>
GN_HD float gn_max_gather(const T* g, const gn_index* idx, I ih, I iw, I W, I OH, I OW, I SO,
                          int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW) {
    float acc = 0.0f;
    I target = ih * W + iw;
    I reach_h = (I)(KH - 1) * DH, reach_w = (I)(KW - 1) * DW;
    I left = (iw + PW) / SW;  // iw + PW >= 0: the quotient is the floor
    for (I oh = (ih + PH) / SH; oh >= 0 && oh * SH - PH + reach_h >= ih; --oh) {
        if (oh >= OH) continue;
        for (I ow = left; ow >= 0 && ow * SW - PW + reach_w >= iw; --ow) {
            if (ow >= OW) continue;
            I o = (oh * OW + ow) * SO;
            if (idx[o] == target) acc += gn_to_float(g[o]);
        }
    }
    return acc;
}

template <typename T, typename I>
GN_HD float gn_avg_gather(const T* g, I ih, I iw, I H, I W, I OH, I OW, I SO,
                          int KH, int KW, int SH, int SW, int PH, int PW, int count_pad, int divisor) {
    float acc = 0.0f;
    I left = (iw + PW) / SW;
    for (I oh = (ih + PH) / SH; oh >= 0 && oh * SH - PH + (KH - 1) >= ih; --oh) {
        if (oh >= OH) continue;
        for (I ow = left; ow >= 0 && ow * SW - PW + (KW - 1) >= iw; --ow) {
            if (ow >= OW) continue;
            bool empty;
            float div = gn_avg_divisor<I>(oh * SH - PH, ow * SW - PW, H, W, KH, KW, PH, PW, count_pad, divisor, &empty);
            if (!empty) acc += gn_to_float(g[(oh * OW + ow) * SO]) / div;
        }
    }
    return acc;
}
