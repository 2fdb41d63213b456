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

// Division of a 32-bit index n in [0, 2^31) by a divisor d in [1, 2^31) that every thread of a
// launch shares (a tensor size), as a multiply-high, an add and a shift instead of the dozen or
// more instructions of an integer division: Granlund and Montgomery's method in the form torch's
// IntDivider uses. s is the least shift with 2^s >= d and m = floor(2^32 (2^s - d) / d) + 1 (< 2^32);
// then n / d = (umulhi(n, m) + n) >> s, the sum below 2^32 as umulhi(n, m) < n. The launcher
// computes m and s on the host (kernels/fastdiv.py, magic); gn_fastdiv_make is the same
// arithmetic for the host tests.
struct gn_fastdiv {
    unsigned int d, m, s;
};

GN_HD gn_fastdiv gn_fastdiv_make(unsigned int d) {
    unsigned int s = 0;
    while (s < 31 && (1u << s) < d) ++s;
    unsigned long long m = ((1ull << 32) * ((1ull << s) - d)) / d + 1;
    gn_fastdiv f = {d, (unsigned int)m, s};
    return f;
}

GN_HD unsigned int gn_umulhi(unsigned int a, unsigned int b) {
#if GN_DEVICE
    return __umulhi(a, b);
#else
    return (unsigned int)(((unsigned long long)a * b) >> 32);
#endif
}

// n / d and d's value, for a plain divisor (any index type) and a gn_fastdiv (32-bit indices)
template <typename I>
GN_HD I gn_div(I n, I d) { return n / d; }
GN_HD int gn_div(int n, gn_fastdiv d) { return (int)((gn_umulhi((unsigned int)n, d.m) + (unsigned int)n) >> d.s); }
template <typename I>
GN_HD I gn_size(I d) { return d; }
GN_HD int gn_size(gn_fastdiv d) { return (int)d.d; }

// (n, c, r, q) of dense element e of an [N, C, R, Q] tensor: in contiguous order, or with cl in
// channels_last order (channels fastest), the order in which the kernels visit the elements.
// The sizes C, R, Q as plain indices or as gn_fastdiv (D), the remainders by multiply-subtract.
template <typename I, typename D>
GN_HD void gn_unravel(I e, D C, D R, D Q, bool cl, I* n, I* c, I* r, I* q) {
    if (cl) {
        I t = gn_div(e, C);
        *c = e - t * gn_size(C);
        I u = gn_div(t, Q);
        *q = t - u * gn_size(Q);
        *n = gn_div(u, R);
        *r = u - *n * gn_size(R);
    } else {
        I t = gn_div(e, Q);
        *q = e - t * gn_size(Q);
        I u = gn_div(t, R);
        *r = t - u * gn_size(R);
        *n = gn_div(u, C);
        *c = u - *n * gn_size(C);
    }
}

// The first element of (n, c)'s [OH, OW] plane in a dense output (values, indices, gradient):
// its positions are 1 apart in contiguous order, C apart (gn_max_gather's SO) with cl.
template <typename I>
GN_HD I gn_plane(I n, I c, I C, I OH, I OW, bool cl) {
    return cl ? n * OH * OW * C + c : (n * C + c) * OH * OW;
}

// Whether 0 <= i < n: one unsigned comparison (a negative i wraps to a large unsigned value).
GN_HD bool gn_inside(int i, int n) { return (unsigned int)i < (unsigned int)n; }
GN_HD bool gn_inside(long long i, long long n) { return (unsigned long long)i < (unsigned long long)n; }

// Max (minimum != 0: min) over the window whose first tap is (h0, w0) of the plane that starts
// plane elements into x. torch's rule: the default position is the window's first in-input tap
// (row-major; -1 for a window made only of padding) with the value -inf, then each tap whose
// value is greater or NaN takes over. The default is found from the rows and columns alone, so
// a tap's update is two comparisons and two selects; a tap outside the input reads as -inf,
// which never takes over. Every tap's offset is one index sum from x (not a pointer per plane
// or row, which the compiler re-associates into 64-bit sums). With compile-time KH, KW, DH, DW
// (pool.cu's POOL_FIXED) the loops unroll into predicated loads, no branch per tap.
template <typename T, typename I>
GN_HD void gn_max_window(const T* x, I plane, I sxh, I sxw, I H, I W, I h0, I w0,
                         int KH, int KW, int DH, int DW, int minimum, float* out, gn_index* out_idx) {
    I fh = -1, fw = -1;  // the first in-input row and column
    for (int i = KH - 1; i >= 0; --i)
        if (gn_inside(h0 + (I)i * DH, H)) fh = h0 + (I)i * DH;
    for (int j = KW - 1; j >= 0; --j)
        if (gn_inside(w0 + (I)j * DW, W)) fw = w0 + (I)j * DW;
    const float neg_inf = -gn_inf();
    float best = neg_inf;
    I bidx = (fh >= 0 && fw >= 0) ? fh * W + fw : (I)-1;
    for (int i = 0; i < KH; ++i) {
        I ih = h0 + (I)i * DH;
        if (!gn_inside(ih, H)) continue;
        I row = plane + ih * sxh + w0 * sxw;  // the row's first tap (an offset, read only if inside)
        for (int j = 0; j < KW; ++j) {
            I iw = w0 + (I)j * DW;
            float v = neg_inf;
            if (gn_inside(iw, W)) {
                v = gn_to_float(x[row + (I)j * DW * sxw]);
                if (minimum) v = -v;
            }
            if (v > best || gn_isnan(v)) {
                best = v;
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

// The average over the window whose first tap is (h0, w0) of the plane that starts plane
// elements into x (addressed as gn_max_window's taps).
template <typename T, typename I>
GN_HD float gn_avg_window(const T* x, I plane, I sxh, I sxw, I H, I W, I h0, I w0,
                          int KH, int KW, int PH, int PW, int count_pad, int divisor) {
    float acc = 0.0f;
    for (int i = 0; i < KH; ++i) {
        I ih = h0 + i;
        if (!gn_inside(ih, H)) continue;
        I row = plane + ih * sxh;
        for (int j = 0; j < KW; ++j) {
            I iw = w0 + j;
            if (gn_inside(iw, W)) acc += gn_to_float(x[row + iw * sxw]);
        }
    }
    bool empty;
    float div = gn_avg_divisor<I>(h0, w0, H, W, KH, KW, PH, PW, count_pad, divisor, &empty);
    return empty ? 0.0f : acc / div;
}

// Gradient of input element (ih, iw): the sum of g over the windows covering it whose saved
// index names it. g and idx point at the [OH, OW] plane of this element's (n, c), its output
// positions SO elements apart (1 for NCHW, C for channels_last, where the channels of one
// position lie together). The windows that can cover row ih start at or before it and reach it:
// oh <= (ih + PH) / SH with oh * SH - PH + (KH - 1) * DH >= ih, i.e. at most (KH - 1) * DH / SH
// below that quotient (one division per dimension, none per window). With dilation some of them
// skip ih; their saved index then names another element. Added in increasing oh, then ow, the
// order torch's kernels add them in (its CPU kernel scatters the outputs in order, its CUDA one
// gathers as here), so the float sums are torch's bit for bit.
template <typename T, typename I>
GN_HD float gn_max_gather(const T* g, const gn_index* idx, I ih, I iw, I W, I OH, I OW, I SO,
                          int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW) {
    float acc = 0.0f;
    I target = ih * W + iw;
    I reach_h = (I)(KH - 1) * DH, reach_w = (I)(KW - 1) * DW;
    I top = (ih + PH) / SH, left = (iw + PW) / SW;  // ih + PH, iw + PW >= 0: the quotients are floors
    for (I oh = top - reach_h / SH; oh <= top; ++oh) {
        if (oh < 0 || oh >= OH || oh * SH - PH + reach_h < ih) continue;
        for (I ow = left - reach_w / SW; ow <= left; ++ow) {
            if (ow < 0 || ow >= OW || ow * SW - PW + reach_w < iw) continue;
            I o = (oh * OW + ow) * SO;
            if (idx[o] == target) acc += gn_to_float(g[o]);
        }
    }
    return acc;
}

// The sum of g / divisor over the windows covering (ih, iw), in gn_max_gather's order; each
// quotient rounded to float as torch's CUDA kernel rounds it for float32 (NVRTC divides IEEE:
// no -prec-div=false here).
template <typename T, typename I>
GN_HD float gn_avg_gather(const T* g, I ih, I iw, I H, I W, I OH, I OW, I SO,
                          int KH, int KW, int SH, int SW, int PH, int PW, int count_pad, int divisor) {
    float acc = 0.0f;
    I top = (ih + PH) / SH, left = (iw + PW) / SW;
    for (I oh = top - (I)(KH - 1) / SH; oh <= top; ++oh) {
        if (oh < 0 || oh >= OH || oh * SH - PH + (KH - 1) < ih) continue;
        for (I ow = left - (I)(KW - 1) / SW; ow <= left; ++ow) {
            if (ow < 0 || ow >= OW || ow * SW - PW + (KW - 1) < iw) continue;
            bool empty;
            float div = gn_avg_divisor<I>(oh * SH - PH, ow * SW - PW, H, W, KH, KW, PH, PW, count_pad, divisor, &empty);
            if (!empty) acc += gn_to_float(g[(oh * OW + ow) * SO]) / div;
        }
    }
    return acc;
}
