// Per-element math of the recurrent cells (torch's formulas and gate order), shared by the
// CUDA kernels in rnn.cu and by a host build that tests it against the NumPy reference.
//
// Forward inputs are pre-activations split in two: x* = input projection (x W_ih^T + b_ih, and
// for the Elman RNN / LSTM also + b_hh) and hh* = h W_hh^T (+ b_hh for the GRU, whose n gate
// needs the recurrent part alone). Stored gates (the reserve): LSTM i, f, g, o after their
// nonlinearities; GRU r, z, n and hn = h W_hn^T + b_hn.
#pragma once
#include "common.cuh"
#if !GN_DEVICE
#include <string.h>
#endif

GN_HD float gn_sigmoid(float x) {
    // split by sign so exp never overflows
    float e = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

GN_HD float gn_rnn_fwd(int relu, float x, float hh) {
    float p = x + hh;
    return relu ? (p < 0.0f ? 0.0f : p) : tanhf(p);  // relu keeps NaN and -0.0, as torch's clamp_min
}

GN_HD void gn_lstm_fwd(const float* x, const float* hh, float cp, float* g, float* c, float* h) {
    g[0] = gn_sigmoid(x[0] + hh[0]);
    g[1] = gn_sigmoid(x[1] + hh[1]);
    g[2] = tanhf(x[2] + hh[2]);
    g[3] = gn_sigmoid(x[3] + hh[3]);
    *c = g[1] * cp + g[0] * g[2];
    *h = g[3] * tanhf(*c);
}

GN_HD void gn_gru_fwd(const float* x, const float* hh, float hp, float* g, float* h) {
    g[0] = gn_sigmoid(x[0] + hh[0]);
    g[1] = gn_sigmoid(x[1] + hh[1]);
    g[3] = hh[2];
    g[2] = tanhf(x[2] + g[0] * hh[2]);
    *h = g[2] + g[1] * (hp - g[2]);
}

// Backward: dh is the full gradient of this step's new state. Returns the gradient of the
// pre-activation(s) and the part of dh_prev that bypasses W_hh (carry) / dc_prev.
GN_HD float gn_rnn_bwd(int relu, float dh, float h) {
    return relu ? (h <= 0.0f ? 0.0f : dh) : dh * (1.0f - h * h);  // threshold_backward: NaN h passes dh
}

GN_HD void gn_lstm_bwd(float dh, float dc_in, const float* g, float c, float cp, float* dg, float* dc_out) {
    float tc = tanhf(c);
    float dc = dc_in + dh * g[3] * (1.0f - tc * tc);
    dg[0] = dc * g[2] * g[0] * (1.0f - g[0]);
    dg[1] = dc * cp * g[1] * (1.0f - g[1]);
    dg[2] = dc * g[0] * (1.0f - g[2] * g[2]);
    dg[3] = dh * tc * g[3] * (1.0f - g[3]);
    *dc_out = dc * g[1];
}

GN_HD void gn_gru_bwd(float dh, const float* g, float hp, float* dgi, float* dgh, float* carry) {
    float r = g[0], z = g[1], n = g[2], hn = g[3];
    // dn = (dh - dh z) (1 - n^2), as torch's autograd sums it (h' = (h - n) z + n): an infinite
    // dh gives NaN there, where dh (1 - z) kept it infinite
    float dhz = dh * z;
    float dn = (dh - dhz) * (1.0f - n * n);
    dgi[0] = dgh[0] = dn * hn * r * (1.0f - r);
    dgi[1] = dgh[1] = dh * (hp - n) * z * (1.0f - z);
    dgi[2] = dn;
    dgh[2] = dn * r;
    *carry = dhz;
}

// The LSTM projection (proj_size) around h' = m W_hr^T, m = o * tanh(c') (the product itself is a
// matmul). Forward, per element of the projected state: a row at or past its length keeps the
// previous state and outputs zero; the output is times the dropout mask. Backward: dh of the
// projected state is the carry (which already holds dG_next W_hh) plus the output gradient where
// valid; a valid row hands dh on (to dm = dh W_hr and dW_hr) and restarts the carry at zero, an
// invalid row hands on zero and keeps dh in the carry.
GN_HD void gn_proj_fwd(int valid, float hw, float hp, float mask, float* h, float* out) {
    *h = valid ? hw : hp;
    *out = valid ? hw * mask : 0.0f;
}

GN_HD void gn_proj_bwd(int valid, float carry, float dout, float* dh, float* carry_out) {
    float d = carry + (valid ? dout : 0.0f);
    *dh = valid ? d : 0.0f;
    *carry_out = valid ? 0.0f : d;
}

// ---------------------------------------------------------------------------------------------
// One unit of one batch row after the recurrent dot, shared by the per-step kernels and the
// device time loop. mode: 0 tanh, 1 relu, 2 LSTM, 3 GRU. x points at the unit's input projection
// (gates H apart; LSTM / GRU: overwritten with the stored gates), hh[] the recurrent dot per gate
// (the GRU's b_hh not yet added: bhh points at b_hh[j], gates H apart, or is null). Returns h' and
// writes c' (LSTM), before any length masking.
GN_HD float gn_cell_fwd(int mode, float* x, gn_index H, const float* hh, const float* bhh, float hprev, float cprev,
                        float* cnew) {
    float hnew;
    if (mode <= 1) return gn_rnn_fwd(mode, x[0], hh[0]);
    if (mode == 2) {
        float xs[4] = {x[0], x[H], x[2 * H], x[3 * H]};
        float hs[4] = {hh[0], hh[1], hh[2], hh[3]};
        float g[4];
        gn_lstm_fwd(xs, hs, cprev, g, cnew, &hnew);
        for (int k = 0; k < 4; ++k) x[k * H] = g[k];
        return hnew;
    }
    float xs[3] = {x[0], x[H], x[2 * H]};
    float hs[3] = {hh[0], hh[1], hh[2]};
    if (bhh) {
        for (int k = 0; k < 3; ++k) hs[k] += bhh[k * H];
    }
    float g[4];
    gn_gru_fwd(xs, hs, hprev, g, &hnew);
    for (int k = 0; k < 4; ++k) x[k * H] = g[k];
    return hnew;
}

// Backward of one unit of one row: dh the full gradient of the new state, g the stored gates
// (H apart), di / dhh the gate gradients to write (H apart; dhh: the GRU's W_hh side), zero where
// the row is past its length. Writes dc_prev (LSTM: the row keeps dc when invalid) and returns the
// carry (the part of dh_prev that bypasses W_hh; dh itself when invalid).
GN_HD float gn_cell_bwd(int mode, int valid, float dh, const float* g, gn_index H, float hp, float hn, float cp,
                        float cn, float dcin, float* di, float* dhh, float* dcout) {
    float carry = 0.0f;
    if (mode <= 1) {
        di[0] = valid ? gn_rnn_bwd(mode, dh, hn) : 0.0f;
    } else if (mode == 2) {
        float gs[4] = {g[0], g[H], g[2 * H], g[3 * H]};
        float dg[4], dcn;
        gn_lstm_bwd(dh, dcin, gs, cn, cp, dg, &dcn);
        for (int k = 0; k < 4; ++k) di[k * H] = valid ? dg[k] : 0.0f;
        *dcout = valid ? dcn : dcin;
    } else {
        float gs[4] = {g[0], g[H], g[2 * H], g[3 * H]};
        float a[3], h[3];
        gn_gru_bwd(dh, gs, hp, a, h, &carry);
        for (int k = 0; k < 3; ++k) {
            di[k * H] = valid ? a[k] : 0.0f;
            dhh[k * H] = valid ? h[k] : 0.0f;
        }
    }
    return valid ? carry : dh;
}

// ---------------------------------------------------------------------------------------------
// The per-step kernels' work at one element idx = b * H + j (rnn.cu rnn_cell_fwd / rnn_cell_bwd,
// one thread each; the host stand-ins of tests/test_cupy_rnn.py loop over idx), with the
// kernels' very parameter lists. rnn.cu's header comment says what each argument holds. t < 0: a
// cell, no lengths (every row valid, len not read).
#define GN_CELL_FWD_PARAMS                                                                                         \
    float *xg, long long sxg, const float *hh, const float *hp, float *hn, const float *cp, float *cn,            \
        const float *bhh, int has_bhh, float *out, long long sout, const float *mask, long long smask, int has_mask, \
        const long long *len, int t, int B, int H, int proj
#define GN_CELL_FWD_ARGS xg, sxg, hh, hp, hn, cp, cn, bhh, has_bhh, out, sout, mask, smask, has_mask, len, t, B, H, proj
#define GN_CELL_BWD_PARAMS                                                                                         \
    float *carry, int has_carry, float *dc, const float *dcin, int has_dcin, const float *dout, long long sdout,  \
        const float *g, long long sg, const float *hp, const float *hn, const float *cp, const float *cn,          \
        float *dgi, float *dgh, long long sdg, const long long *len, int t, int B, int H
#define GN_CELL_BWD_ARGS \
    carry, has_carry, dc, dcin, has_dcin, dout, sdout, g, sg, hp, hn, cp, cn, dgi, dgh, sdg, len, t, B, H

// The projection kernels' work at one element idx = b * P + j (rnn.cu rnn_proj_fwd / rnn_proj_bwd),
// their very parameter lists: rows of mask, out and dout are strided, units contiguous.
#define GN_PROJ_FWD_PARAMS                                                                                      \
    const float *hw, const float *hp, float *hn, float *out, long long sout, const float *mask, long long smask, \
        int has_mask, const long long *len, int t, int B, int P
#define GN_PROJ_FWD_ARGS hw, hp, hn, out, sout, mask, smask, has_mask, len, t, B, P
#define GN_PROJ_BWD_PARAMS \
    float *carry, const float *dout, long long sdout, float *dh, const long long *len, int t, int B, int P
#define GN_PROJ_BWD_ARGS carry, dout, sdout, dh, len, t, B, P

GN_HD void gn_proj_fwd_at(gn_index idx, GN_PROJ_FWD_PARAMS) {
    gn_index b = idx / P, j = idx % P;
    float o;
    gn_proj_fwd(t < len[b], hw[idx], hp[idx], has_mask ? mask[b * smask + j] : 1.0f, &hn[idx], &o);
    out[b * sout + j] = o;
}

GN_HD void gn_proj_bwd_at(gn_index idx, GN_PROJ_BWD_PARAMS) {
    gn_index b = idx / P, j = idx % P;
    gn_proj_bwd(t < len[b], carry[idx], dout[b * sdout + j], &dh[idx], &carry[idx]);
}

GN_HD int gn_gates(int mode) { return mode <= 1 ? 1 : (mode == 2 ? 4 : 3); }

GN_HD void gn_cell_fwd_at(int mode, gn_index idx, GN_CELL_FWD_PARAMS) {
    gn_index b = idx / H, j = idx % H;
    float* x = xg + b * sxg + j;
    float hprev = proj ? 0.0f : hp[idx];  // a projected state is P wide: only the GRU reads it
    float cnew = 0.0f, cprev = mode == 2 ? cp[idx] : 0.0f;
    const int G = gn_gates(mode);
    float hs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < G; ++k) hs[k] = hh[b * G * H + k * H + j];
    float hnew = gn_cell_fwd(mode, x, H, hs, has_bhh ? bhh + j : 0, hprev, cprev, &cnew);
    bool valid = t < 0 || t < len[b];
    if (mode == 2) cn[idx] = valid ? cnew : cprev;
    if (proj) {
        hn[idx] = hnew;
        return;
    }
    float o = valid ? hnew : 0.0f;
    hn[idx] = valid ? hnew : hprev;  // x (xg) may be hn and out (an Elman cell): read above, same element
    if (has_mask) o *= mask[b * smask + j];
    out[b * sout + j] = o;
}

GN_HD void gn_cell_bwd_at(int mode, gn_index idx, GN_CELL_BWD_PARAMS) {
    gn_index b = idx / H, j = idx % H;
    bool valid = t < 0 || t < len[b];
    float dh = (has_carry ? carry[idx] : 0.0f) + (valid ? dout[b * sdout + j] : 0.0f);
    gn_index o = b * sdg + j;
    float dcn = 0.0f;
    // only the Elman RNN reads h', only the GRU h (the projected LSTM passes neither)
    carry[idx] = gn_cell_bwd(mode, valid, dh, g + b * sg + j, H, mode == 3 ? hp[idx] : 0.0f,
                             mode <= 1 ? hn[idx] : 0.0f, mode == 2 ? cp[idx] : 0.0f, mode == 2 ? cn[idx] : 0.0f,
                             mode == 2 && has_dcin ? dcin[idx] : 0.0f, dgi + o, dgh + o, &dcn);
    if (mode == 2) dc[idx] = dcn;
}

// ---------------------------------------------------------------------------------------------
// The device time loop (rnn_seq_fwd / rnn_seq_bwd in rnn.cu): one launch runs every step of one
// layer and direction, a grid barrier between steps. A task is GN_SEQ_JB hidden units (one per
// lane) x GN_SEQ_NR batch rows; its block's GN_SEQ_KS warps each reduce one slice of the dot
// (forward: over the H inputs of h_prev, for all gates of the unit, so the cell stays fused;
// backward: over the G * H gate gradients of the step after), the slices are summed in order and
// one warp per row applies the cell. The weight is read so that lanes (consecutive units) load
// consecutive addresses: forward W_hh^T [H, G * H], backward W_hh [G * H, H], float32, or for
// half layers (ROUND 1 / 2) the float16 / bfloat16 weights themselves, widened exactly as they are
// read (gn_w_el); ROUND rounds the other operand as torch's half matmul does.
#define GN_SEQ_JB 32
#define GN_SEQ_NR 8
#define GN_SEQ_KS 8
#define GN_SEQ_CH 64  // k staged in shared memory at a time, per warp


GN_HD unsigned int gn_f2u(float x) {
#if GN_DEVICE
    return __float_as_uint(x);
#else
    unsigned int u;
    memcpy(&u, &x, 4);
    return u;
#endif
}

GN_HD float gn_u2f(unsigned int u) {
#if GN_DEVICE
    return __uint_as_float(u);
#else
    float x;
    memcpy(&x, &u, 4);
    return x;
#endif
}

// x rounded to float16 (ROUND 1) or bfloat16 (ROUND 2), nearest even, as a float; ROUND 0: x.
template <int ROUND>
GN_HD float gn_round(float x) {
    if (ROUND == 0 || x != x) return x;
    if (ROUND == 2) {
        unsigned int u = gn_f2u(x);
        u += 0x7fffu + ((u >> 16) & 1u);
        return gn_u2f(u & 0xffff0000u);
    }
    float a = fabsf(x);
    // at or past the midpoint between the largest half and the next power of two: infinity
    if (a >= 65520.0f) return gn_u2f(x > 0.0f ? 0x7f800000u : 0xff800000u);
    if (a < 6.103515625e-05f) {                                 // half subnormals: steps of 2^-24
        float r = rintf(a * 16777216.0f) * 5.9604644775390625e-08f;
        return x < 0.0f ? -r : r;
    }
    unsigned int u = gn_f2u(x);
    u += 0xfffu + ((u >> 13) & 1u);
    return gn_u2f(u & ~0x1fffu);
}

// float16 bits -> float32 (exact: subnormals, infinities, NaN).
GN_HD float gn_f16_value(unsigned h) {
    unsigned sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-08f;  // 2^-24
        return sign ? -v : v;
    }
    if (e == 31) return gn_u2f(sign | 0x7f800000u | (m << 13));
    return gn_u2f(sign | ((e + 112u) << 23) | (m << 13));
}

// Element i of the loop's CUDA-core weight operand, as float32: the float32 weight (ROUND 0), or
// for half layers (ROUND 1 / 2) their float16 / bfloat16 weight itself, read as 16 bits and
// widened exactly (half the bytes of a float32 copy streamed from L2 every step).
template <int ROUND>
GN_HD float gn_w_el(const void* M, gn_index i) {
    if (ROUND == 0) return ((const float*)M)[i];
    unsigned h = ((const unsigned short*)M)[i];
    if (ROUND == 2) return gn_u2f(h << 16);
#if GN_DEVICE
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
    return f;
#else
    return gn_f16_value(h);
#endif
}

// The k range of slice s when K is cut into GN_SEQ_KS slices.
GN_HD void gn_seq_slice(int K, int s, int* k0, int* k1) {
    int per = (K + GN_SEQ_KS - 1) / GN_SEQ_KS;
    *k0 = s * per < K ? s * per : K;
    *k1 = *k0 + per < K ? *k0 + per : K;
}

// acc[r][g] += sum over k in [k0, k1) of round(v[r * ldv + k]) * M[m0 + k * ldm + col + g * gs] (M's
// elements as gn_w_el<ROUND> reads them), for the first nr rows and the first ng columns (ng <= 4).
// Called on chunks of v staged by gn_seq_dot_staged (the sums keep the order of k).
template <int ROUND>
GN_HD void gn_seq_dot(const float* v, gn_index ldv, int nr, const void* M, gn_index m0, gn_index ldm, gn_index col,
                      gn_index gs, int ng, int k0, int k1, float (*acc)[4]) {
#if GN_DEVICE
#pragma unroll 4
#endif
    for (int k = k0; k < k1; ++k) {
        gn_index mk = m0 + (gn_index)k * ldm + col;
        float m[4];
        for (int g = 0; g < 4; ++g) m[g] = g < ng ? gn_w_el<ROUND>(M, mk + g * gs) : 0.0f;
        for (int r = 0; r < GN_SEQ_NR; ++r) {
            if (r < nr) {
                float a = gn_round<ROUND>(v[r * ldv + k]);
                for (int g = 0; g < 4; ++g) {
                    if (g < ng) acc[r][g] += a * m[g];
                }
            }
        }
    }
}

// The same sum as gn_seq_dot over rows [0, nr) of v (row stride ldv), with v staged GN_SEQ_CH k
// at a time in vs (the calling warp's buffer) by the `lanes` lanes of a warp, this one being
// `lane`: on the device one burst of loads per chunk instead of a round trip per k, read through
// L2 since other blocks wrote v before the last barrier (L1 is not coherent). The host runs it as
// one lane.
GN_HD float gn_ld_l2(const float* p) {
#if GN_DEVICE
    return __ldcg(p);
#else
    return *p;
#endif
}

GN_HD void gn_sync_warp() {
#if GN_DEVICE
    __syncwarp();
#endif
}

template <int ROUND>
GN_HD void gn_seq_dot_staged(const float* v, gn_index ldv, int nr, const void* M, gn_index ldm, gn_index col,
                             gn_index gs, int ng, int k0, int k1, float (*vs)[GN_SEQ_CH], float (*acc)[4], int lane,
                             int lanes) {
    for (int c0 = k0; c0 < k1; c0 += GN_SEQ_CH) {
        int len = k1 - c0 < GN_SEQ_CH ? k1 - c0 : GN_SEQ_CH;
        for (int i = lane; i < nr * GN_SEQ_CH; i += lanes) {
            int r = i / GN_SEQ_CH, k = i % GN_SEQ_CH;
            if (k < len) vs[r][k] = gn_ld_l2(v + r * ldv + c0 + k);
        }
        gn_sync_warp();
        gn_seq_dot<ROUND>(&vs[0][0], GN_SEQ_CH, nr, M, (gn_index)c0 * ldm, ldm, col, gs, ng, 0, len, acc);
        gn_sync_warp();  // the chunk is read before the next one overwrites it
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core dots of the device loop (GN_MMA 1; rnn.cu gn_seq_dot_mma): each warp's slice of a
// task's dot as mma.sync tiles of 16 units x 8 batch rows, KIND 1: float16 / 2: bfloat16 operands
// (m16n8k16, two per 32-bit register), 3: TF32 (m16n8k8, float32 operands rounded to TF32), float32
// accumulators. A is the weight (rows = the task's units, k contiguous), B the reduced operand
// (rows of the state / gate gradients, k contiguous), D[unit][row]. The operand encodings and the
// register fragments (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8": lane = 4 * group +
// thread; A rows group / group + 8, B and D columns group / 2 * thread + {0, 1}) are GN_HD so
// that the host test runs them for the 32 lanes of a warp and emulates the mma between them.

// float32 -> float16 bits, round to nearest even (overflow to infinity, subnormals, NaN kept NaN).
GN_HD unsigned gn_f16_bits(float x) {
    unsigned u = gn_f2u(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (a >= 0x477ff000u) return sign | 0x7c00u;  // at or past 65520: infinity
    if (a < 0x38800000u)                           // below 2^-14: steps of 2^-24 (exact scaling)
        return sign | (unsigned)rintf(gn_u2f(a) * 16777216.0f);
    unsigned m = a & 0x7fffffu, h = (((a >> 23) - 112u) << 10) | (m >> 13), rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1u;  // a carry into the exponent is right
    return sign | h;
}

// float32 -> bfloat16 bits, round to nearest even (NaN kept NaN).
GN_HD unsigned gn_bf16_bits(float x) {
    unsigned u = gn_f2u(x);
    if (x != x) return ((u >> 16) & 0x8000u) | 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// float32 -> TF32 (float32 bits, 10 mantissa bits), round to nearest, ties away (cvt.rna.tf32.f32).
GN_HD unsigned gn_tf32_bits(float x) {
    unsigned u = gn_f2u(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;  // infinity, NaN
    return (u + 0x1000u) & ~0x1fffu;
}

// An operand as KIND encodes it (16-bit kinds in the low half) and its value.
template <int KIND>
GN_HD unsigned gn_mma_enc(float x) {
    return KIND == 1 ? gn_f16_bits(x) : (KIND == 2 ? gn_bf16_bits(x) : gn_tf32_bits(x));
}

template <int KIND>
GN_HD float gn_mma_dec(unsigned b) {
    return KIND == 1 ? gn_f16_value(b) : (KIND == 2 ? gn_u2f(b << 16) : gn_u2f(b));
}

// Element i of a weight operand in memory: 16-bit (float16 / bfloat16 bits) for KIND 1 / 2, float32
// (rounded to TF32 here) for KIND 3.
template <int KIND>
GN_HD unsigned gn_mma_ld_w(const void* w, gn_index i) {
    if (KIND == 3) return gn_tf32_bits(((const float*)w)[i]);
    return ((const unsigned short*)w)[i];
}

// A[row][k] of a weight operand (row-major, leading dimension ld), zero outside rows [0, mrows)
// or k >= k1.
template <int KIND>
GN_HD unsigned gn_mma_a_el(const void* w, gn_index ld, int mrows, int row, int k, int k1) {
    return row < mrows && k < k1 ? gn_mma_ld_w<KIND>(w, (gn_index)row * ld + k) : 0u;
}

// B[k][n] = v[n * ldv + k] encoded, zero outside rows n < nr or k >= k1 (v read through L2).
template <int KIND>
GN_HD unsigned gn_mma_b_el(const float* v, gn_index ldv, int nr, int n, int k, int k1) {
    return n < nr && k < k1 ? gn_mma_enc<KIND>(gn_ld_l2(v + (gn_index)n * ldv + k)) : 0u;
}

// The k extent of one mma.
template <int KIND>
GN_HD int gn_mma_k() {
    return KIND == 3 ? 8 : 16;
}

// This lane's A fragment of the 16 x K tile whose row 0 is w's row 0, k from kc.
template <int KIND>
GN_HD void gn_mma_frag_a(const void* w, gn_index ld, int mrows, int kc, int k1, int lane, unsigned* a) {
    int g = lane >> 2, t = lane & 3;
    if (KIND == 3) {
        a[0] = gn_mma_a_el<KIND>(w, ld, mrows, g, kc + t, k1);
        a[1] = gn_mma_a_el<KIND>(w, ld, mrows, g + 8, kc + t, k1);
        a[2] = gn_mma_a_el<KIND>(w, ld, mrows, g, kc + t + 4, k1);
        a[3] = gn_mma_a_el<KIND>(w, ld, mrows, g + 8, kc + t + 4, k1);
        return;
    }
    for (int q = 0; q < 4; ++q) {
        int row = g + 8 * (q & 1), k = kc + 2 * t + 8 * (q >> 1);
        a[q] = gn_mma_a_el<KIND>(w, ld, mrows, row, k, k1) | (gn_mma_a_el<KIND>(w, ld, mrows, row, k + 1, k1) << 16);
    }
}

// This lane's B fragment (K x 8: the rows n of v), k from kc.
template <int KIND>
GN_HD void gn_mma_frag_b(const float* v, gn_index ldv, int nr, int kc, int k1, int lane, unsigned* b) {
    int g = lane >> 2, t = lane & 3;
    if (KIND == 3) {
        b[0] = gn_mma_b_el<KIND>(v, ldv, nr, g, kc + t, k1);
        b[1] = gn_mma_b_el<KIND>(v, ldv, nr, g, kc + t + 4, k1);
        return;
    }
    for (int q = 0; q < 2; ++q) {
        int k = kc + 2 * t + 8 * q;
        b[q] = gn_mma_b_el<KIND>(v, ldv, nr, g, k, k1) | (gn_mma_b_el<KIND>(v, ldv, nr, g, k + 1, k1) << 16);
    }
}

// Where this lane's accumulator q (0..3) sits in D: unit row *m, batch column *n.
GN_HD void gn_mma_c_at(int lane, int q, int* m, int* n) {
    *m = (lane >> 2) + 8 * (q >> 1);
    *n = 2 * (lane & 3) + (q & 1);
}

// The scalar form of the tensor-core dot for the host's unit functions: acc[g] += sum over k in
// [k0, k1) of dec(enc(v[k])) * dec(w[(g * gs + j) * ld + k]) for g < ng, the products as the mma
// forms them (exact in float32), summed in k order.
template <int KIND>
GN_HD void gn_mma_dot_scalar(const float* v, const void* w, gn_index ld, gn_index j, gn_index gs, int ng, int k0,
                             int k1, float* acc) {
    for (int k = k0; k < k1; ++k) {
        float x = gn_mma_dec<KIND>(gn_mma_enc<KIND>(v[k]));
        for (int g = 0; g < ng; ++g) acc[g] += x * gn_mma_dec<KIND>(gn_mma_ld_w<KIND>(w, (g * gs + j) * ld + k));
    }
}

// Arguments of one forward time loop: xg [T, B, *] the input projections (strided; LSTM / GRU:
// become the stored gates), hs / cs [T + 1, B, H] contiguous states, wt = W_hh^T [H, G * H],
// bhh [G * H] or null (GRU), out / mask [T, B, H] strided (mask may be null), len [B].
struct GnSeqFwd {
    float* xg;
    gn_index sxg_t, sxg_n;
    float* hs;
    float* cs;
    const float* wt;
    const float* bhh;
    float* out;
    gn_index sout_t, sout_n;
    const float* mask;
    gn_index smask_t, smask_n;
    const long long* len;
    int T, B, H, reverse;
};

// Arguments of one backward time loop: w = W_hh [G * H, H]; carry [B, H] dh without this step's
// output gradient nor the dot; dc [B, H] (LSTM); dout [T, B, H] strided; g [T, B, *] the stored
// gates; hs / cs as forward; dgi / dgh [T, B, G * H] (strided; dgh == dgi but for the GRU).
struct GnSeqBwd {
    const float* w;
    float* carry;
    float* dc;
    const float* dout;
    gn_index sdo_t, sdo_n;
    const float* g;
    gn_index sg_t, sg_n;
    const float* hs;
    const float* cs;
    float* dgi;
    float* dgh;
    gn_index sdg_t, sdg_n;
    const long long* len;
    int T, B, H, reverse;
};

// The kernels' parameter lists and how they become the structs, written once: rnn_seq_fwd /
// rnn_seq_bwd and the host test's stand-ins for them take exactly these (so a launcher that passes
// arguments in another order fails on the host too). GN_SEQ_*_ARGS(p) is one direction's list with
// every name prefixed by p (empty for the one-direction kernels; the two-direction kernels
// rnn_seq2_fwd / rnn_seq2_bwd take the list twice, f_ then r_); count: the grid barrier's counter.
#define GN_SEQ_FWD_ARGS(p)                                                                                        \
    float *p##xg, long long p##sxg_t, long long p##sxg_n, float *p##hs, float *p##cs, const float *p##wt,         \
        const float *p##bhh, int p##has_bhh, float *p##out, long long p##sout_t, long long p##sout_n,             \
        const float *p##mask, long long p##smask_t, long long p##smask_n, int p##has_mask, const long long *p##len, \
        int p##reverse, int p##T, int p##B, int p##H
#define GN_SEQ_FWD_STRUCT_OF(p)                                                                                   \
    {p##xg, p##sxg_t, p##sxg_n, p##hs, p##cs, p##wt, p##has_bhh ? p##bhh : 0, p##out, p##sout_t, p##sout_n,       \
     p##has_mask ? p##mask : 0, p##smask_t, p##smask_n, p##len, p##T, p##B, p##H, p##reverse}
#define GN_SEQ_BWD_ARGS(p)                                                                                        \
    const float *p##w, float *p##carry, float *p##dc, const float *p##dout, long long p##sdo_t, long long p##sdo_n, \
        const float *p##g, long long p##sg_t, long long p##sg_n, const float *p##hs, const float *p##cs,          \
        float *p##dgi, float *p##dgh, long long p##sdg_t, long long p##sdg_n, const long long *p##len,            \
        int p##reverse, int p##T, int p##B, int p##H
#define GN_SEQ_BWD_STRUCT_OF(p)                                                                                   \
    {p##w, p##carry, p##dc, p##dout, p##sdo_t, p##sdo_n, p##g, p##sg_t, p##sg_n, p##hs, p##cs, p##dgi, p##dgh,    \
     p##sdg_t, p##sdg_n, p##len, p##T, p##B, p##H, p##reverse}
#define GN_SEQ_FWD_PARAMS GN_SEQ_FWD_ARGS(), unsigned int *count
#define GN_SEQ_FWD_STRUCT GN_SEQ_FWD_STRUCT_OF()
#define GN_SEQ_BWD_PARAMS GN_SEQ_BWD_ARGS(), unsigned int *count
#define GN_SEQ_BWD_STRUCT GN_SEQ_BWD_STRUCT_OF()
#define GN_SEQ2_FWD_PARAMS GN_SEQ_FWD_ARGS(f_), GN_SEQ_FWD_ARGS(r_), unsigned int *count
#define GN_SEQ2_BWD_PARAMS GN_SEQ_BWD_ARGS(f_), GN_SEQ_BWD_ARGS(r_), unsigned int *count

// Forward cell of unit j of row n at step t, given the summed recurrent dot hh[G].
GN_HD void gn_seq_fwd_cell(const GnSeqFwd& a, int mode, int t, int n, int j, const float* hh) {
    gn_index BH = (gn_index)a.B * a.H, idx = (gn_index)n * a.H + j;
    gn_index p = a.reverse ? t + 1 : t, nx = a.reverse ? t : t + 1;
    float hprev = a.hs[p * BH + idx];
    float cprev = mode == 2 ? a.cs[p * BH + idx] : 0.0f;
    float cnew = 0.0f;
    float* x = a.xg + t * a.sxg_t + n * a.sxg_n + j;
    float hnew = gn_cell_fwd(mode, x, a.H, hh, a.bhh ? a.bhh + j : 0, hprev, cprev, &cnew);
    bool valid = t < a.len[n];
    if (mode == 2) a.cs[nx * BH + idx] = valid ? cnew : cprev;
    a.hs[nx * BH + idx] = valid ? hnew : hprev;
    float o = valid ? hnew : 0.0f;
    if (a.mask) o *= a.mask[t * a.smask_t + n * a.smask_n + j];
    a.out[t * a.sout_t + n * a.sout_n + j] = o;
}

// Backward cell of unit j of row n at step t, given dd = dG_next[n] . W_hh[:, j] (0 at the first
// step processed).
GN_HD void gn_seq_bwd_cell(const GnSeqBwd& a, int mode, int t, int n, int j, float dd) {
    gn_index BH = (gn_index)a.B * a.H, idx = (gn_index)n * a.H + j;
    gn_index p = a.reverse ? t + 1 : t, nx = a.reverse ? t : t + 1;
    float c = a.carry[idx] + dd;
    bool valid = t < a.len[n];
    float dh = c + (valid ? a.dout[t * a.sdo_t + n * a.sdo_n + j] : 0.0f);
    const float* g = mode >= 2 ? a.g + t * a.sg_t + n * a.sg_n + j : 0;
    gn_index o = t * a.sdg_t + n * a.sdg_n + j;
    float dcin = mode == 2 ? a.dc[idx] : 0.0f, dcn = 0.0f;
    float cp = mode == 2 ? a.cs[p * BH + idx] : 0.0f, cn = mode == 2 ? a.cs[nx * BH + idx] : 0.0f;
    float hp = mode == 3 ? a.hs[p * BH + idx] : 0.0f, hn = mode <= 1 ? a.hs[nx * BH + idx] : 0.0f;
    a.carry[idx] = gn_cell_bwd(mode, valid, dh, g, a.H, hp, hn, cp, cn, dcin,
                               a.dgi + o, a.dgh + o, &dcn);
    if (mode == 2) a.dc[idx] = dcn;
}

// Whether any of the rows [n0, n0 + nr) runs step t (t < len). A task whose rows have all ended
// (a packed batch's padding: in the sorted order a packed batch runs in, the last rows) skips its
// recurrent dot: the forward cell would discard it (the state is carried, the output zero), and in
// the backward it would add nothing (called with the step processed before, whose gate gradients
// are zero in a row that has ended).
GN_HD bool gn_rows_live(const long long* len, int n0, int nr, gn_index t) {
    for (int r = 0; r < nr; ++r)
        if (t < len[n0 + r]) return true;
    return false;
}

// The whole work of one thread-unit of a step, as the kernel composes it (slice dots summed in
// slice order, then the cell; the dot skipped where the kernel's task skips it, here per row):
// the host runs it over every (t, n, j) in step order. MMA 0: the CUDA-core dot (ROUND: the state
// rounded as for half weights); MMA 1 / 2 / 3: the tensor-core dot's scalar form (GN_MMA) of that
// KIND, a.wt then holding W_hh [G * H, H] in the KIND's operand type, not W_hh^T.
template <int ROUND, int MMA = 0>
GN_HD void gn_seq_fwd_unit(const GnSeqFwd& a, int mode, int t, int n, int j) {
    int G = gn_gates(mode);
    gn_index p = a.reverse ? t + 1 : t;
    float hh[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s = 0; s < GN_SEQ_KS; ++s) {
        if (!gn_rows_live(a.len, n, 1, t)) break;
        int k0, k1;
        gn_seq_slice(a.H, s, &k0, &k1);
        float acc[GN_SEQ_NR][4] = {};
        const float* v = a.hs + (p * a.B + n) * a.H;
        if constexpr (MMA) {
            gn_mma_dot_scalar<MMA>(v, a.wt, a.H, j, a.H, G, k0, k1, acc[0]);
        } else {
            float vs[GN_SEQ_NR][GN_SEQ_CH];
            gn_seq_dot_staged<ROUND>(v, a.H, 1, a.wt, (gn_index)G * a.H, j, a.H, G, k0, k1, vs, acc, 0, 1);
        }
        for (int g = 0; g < 4; ++g) hh[g] += acc[0][g];
    }
    gn_seq_fwd_cell(a, mode, t, n, j, hh);
}

// first: the first step processed (t = T - 1 forward, 0 reverse), which has no step after it.
// MMA as for gn_seq_fwd_unit, a.w then holding W_hh^T [H, G * H] in the KIND's operand type.
template <int ROUND, int MMA = 0>
GN_HD void gn_seq_bwd_unit(const GnSeqBwd& a, int mode, int t, int n, int j, int first) {
    int GH = gn_gates(mode) * a.H;
    float dd = 0.0f;
    gn_index tn = a.reverse ? t - 1 : t + 1;
    if (!first && gn_rows_live(a.len, n, 1, tn)) {
        for (int s = 0; s < GN_SEQ_KS; ++s) {
            int k0, k1;
            gn_seq_slice(GH, s, &k0, &k1);
            float acc[GN_SEQ_NR][4] = {};
            const float* v = a.dgh + tn * a.sdg_t + n * a.sdg_n;
            if constexpr (MMA) {
                gn_mma_dot_scalar<MMA>(v, a.w, GH, j, 0, 1, k0, k1, acc[0]);
            } else {
                float vs[GN_SEQ_NR][GN_SEQ_CH];
                gn_seq_dot_staged<ROUND>(v, a.sdg_n, 1, a.w, a.H, j, 0, 1, k0, k1, vs, acc, 0, 1);
            }
            dd += acc[0][0];
        }
    }
    gn_seq_bwd_cell(a, mode, t, n, j, dd);
}
