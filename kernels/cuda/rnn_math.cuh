// Per-element math of the recurrent cells (torch's formulas and gate order), shared by the
// CUDA kernels in rnn.cu and by a host build that tests it against the NumPy reference.
//
// Forward inputs are pre-activations split in two: x* = input projection (x W_ih^T + b_ih, and
// for the Elman RNN / LSTM also + b_hh) and hh* = h W_hh^T (+ b_hh for the GRU, whose n gate
// needs the recurrent part alone). Stored gates (the reserve): LSTM i, f, g, o after their
// nonlinearities; GRU r, z, n and hn = h W_hn^T + b_hn.
#pragma once
#include "common.cuh"

GN_HD float gn_sigmoid(float x) {
    // split by sign so exp never overflows
    float e = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

GN_HD float gn_rnn_fwd(int relu, float x, float hh) {
    float p = x + hh;
    return relu ? ((p > 0.0f || p != p) ? p : 0.0f) : tanhf(p);  // relu keeps NaN, as torch
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
    float dn = dh * (1.0f - z) * (1.0f - n * n);
    dgi[0] = dgh[0] = dn * hn * r * (1.0f - r);
    dgi[1] = dgh[1] = dh * (hp - n) * z * (1.0f - z);
    dgi[2] = dn;
    dgh[2] = dn * r;
    *carry = dh * z;
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
