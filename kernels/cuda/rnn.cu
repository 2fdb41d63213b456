// Fused recurrent cell kernels for the cupy backend (Elman tanh / relu, LSTM, GRU).
//
// One thread per (batch row b, hidden unit j) of one time step; the recurrent matmul
// h_{t-1} W_hh^T (forward) and dG_{t+1} W_hh (backward) run before, as a matmul (torch's).
// Everything here is float32: states, gates and gate gradients live in the float32 reserve; the
// launcher converts half-precision outputs. Rows are strided (row stride in elements), hidden
// units contiguous. GN_MODE: 0 tanh, 1 relu, 2 LSTM, 3 GRU.
//
// rnn_cell_fwd: xg [B, *] holds the input projection for every gate and gets the stored gates
// (LSTM / GRU); hh [B, G*H] the recurrent product; bhh [G*H] (GRU only); the new state goes to
// hn / cn, the output (zero where t >= len[b], times the dropout mask) to out.
// With proj (LSTM with a projection): hp is P wide and not read, hn gets m = o * tanh(c')
// unmasked and out is not written; rnn_proj_fwd then masks h' = m W_hr^T (computed by a matmul
// into hn of the projected state) and writes the output.
// rnn_cell_bwd: carry [B, H] holds dh without this step's output gradient; writes the gate
// gradients dgi (W_ih side) / dgh (W_hh side, GRU only) and the new carry / dc in place.
// rnn_proj_bwd: carry [B, P] holds dG_next W_hh plus what invalid rows carried; dh [B, P] gets
// the projected state's gradient where valid (zero elsewhere).
#include "rnn_math.cuh"

#ifndef GN_MODE
#define GN_MODE 2
#endif

extern "C" __global__ void rnn_cell_fwd(float* xg, long long sxg, const float* hh, const float* hp, float* hn,
                                        const float* cp, float* cn, const float* bhh, int has_bhh, float* out,
                                        long long sout, const float* mask, long long smask, int has_mask,
                                        const long long* len, int t, int B, int H, int proj) {
    gn_index idx = (gn_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (gn_index)B * H) return;
    gn_index b = idx / H, j = idx % H;
    float* x = xg + b * sxg + j;
    float hprev = proj ? 0.0f : hp[idx];  // a projected state is P wide: only the GRU reads it
    float hnew, cnew = 0.0f, cprev = 0.0f;
#if GN_MODE <= 1
    hnew = gn_rnn_fwd(GN_MODE, x[0], hh[b * H + j]);
#elif GN_MODE == 2
    {
        const float* r = hh + b * 4 * H + j;
        float xs[4] = {x[0], x[H], x[2 * H], x[3 * H]};
        float hs[4] = {r[0], r[H], r[2 * H], r[3 * H]};
        float g[4];
        cprev = cp[idx];
        gn_lstm_fwd(xs, hs, cprev, g, &cnew, &hnew);
        for (int k = 0; k < 4; ++k) x[k * H] = g[k];
    }
#else
    {
        const float* r = hh + b * 3 * H + j;
        float xs[3] = {x[0], x[H], x[2 * H]};
        float hs[3] = {r[0], r[H], r[2 * H]};
        if (has_bhh) {
            for (int k = 0; k < 3; ++k) hs[k] += bhh[k * H + j];
        }
        float g[4];
        gn_gru_fwd(xs, hs, hprev, g, &hnew);
        for (int k = 0; k < 4; ++k) x[k * H] = g[k];
    }
#endif
    bool valid = t < len[b];
#if GN_MODE == 2
    cn[idx] = valid ? cnew : cprev;
#endif
    if (proj) {
        hn[idx] = hnew;
        return;
    }
    float o = valid ? hnew : 0.0f;
    hn[idx] = valid ? hnew : hprev;
    if (has_mask) o *= mask[b * smask + j];
    out[b * sout + j] = o;
}

extern "C" __global__ void rnn_proj_fwd(const float* hw, const float* hp, float* hn, float* out, long long sout,
                                        const float* mask, long long smask, int has_mask, const long long* len, int t,
                                        int B, int P) {
    gn_index idx = (gn_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (gn_index)B * P) return;
    gn_index b = idx / P, j = idx % P;
    float o;
    gn_proj_fwd(t < len[b], hw[idx], hp[idx], has_mask ? mask[b * smask + j] : 1.0f, &hn[idx], &o);
    out[b * sout + j] = o;
}

extern "C" __global__ void rnn_proj_bwd(float* carry, const float* dout, long long sdout, float* dh,
                                        const long long* len, int t, int B, int P) {
    gn_index idx = (gn_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (gn_index)B * P) return;
    gn_index b = idx / P, j = idx % P;
    gn_proj_bwd(t < len[b], carry[idx], dout[b * sdout + j], &dh[idx], &carry[idx]);
}

extern "C" __global__ void rnn_cell_bwd(float* carry, float* dc, const float* dout, long long sdout, const float* g,
                                        long long sg, const float* hp, const float* hn, const float* cp,
                                        const float* cn, float* dgi, float* dgh, long long sdg, const long long* len,
                                        int t, int B, int H) {
    gn_index idx = (gn_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (gn_index)B * H) return;
    gn_index b = idx / H, j = idx % H;
    bool valid = t < len[b];
    float dh = carry[idx] + (valid ? dout[b * sdout + j] : 0.0f);
    float* di = dgi + b * sdg + j;
    float new_carry = 0.0f;
#if GN_MODE <= 1
    di[0] = valid ? gn_rnn_bwd(GN_MODE, dh, hn[idx]) : 0.0f;
#elif GN_MODE == 2
    {
        const float* gp = g + b * sg + j;
        float gs[4] = {gp[0], gp[H], gp[2 * H], gp[3 * H]};
        float dg[4], dcn;
        float dcin = dc[idx];
        gn_lstm_bwd(dh, dcin, gs, cn[idx], cp[idx], dg, &dcn);
        for (int k = 0; k < 4; ++k) di[k * H] = valid ? dg[k] : 0.0f;
        dc[idx] = valid ? dcn : dcin;
    }
#else
    {
        const float* gp = g + b * sg + j;
        float gs[4] = {gp[0], gp[H], gp[2 * H], gp[3 * H]};
        float a[3], h[3];
        gn_gru_bwd(dh, gs, hp[idx], a, h, &new_carry);
        float* dhp = dgh + b * sdg + j;
        for (int k = 0; k < 3; ++k) {
            di[k * H] = valid ? a[k] : 0.0f;
            dhp[k * H] = valid ? h[k] : 0.0f;
        }
    }
#endif
    carry[idx] = valid ? new_carry : dh;
}
