"""The cupy backend's device time loop (kernels/cuda/rnn.cu: rnn_seq_fwd / rnn_seq_bwd, one
cooperative launch per layer, direction and pass): its per-unit work host-compiled and run over
every (t, n, j) in step order against the float64 reference, the half-precision rounding it
applies, the path choice and grid size, NVRTC for sm_90 in every configuration the loader builds,
and on a GPU the whole path against the reference and against the per-step path."""

import contextlib
import ctypes
import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpu_nn.ops import rnn as ops
from gpu_nn.reference import rnn as ref
from helpers import CUDA, aot_cover, assert_close, backend_params, build_host_library, fptr, latin_cover, max_rel_err

MODES = ("rnn_tanh", "rnn_relu", "lstm", "gru")

HOST_SRC = r"""
#include "rnn_math.cuh"
// code: the stand-ins' second argument, the launcher's dot code as _HostLaunch passes it: 1 / 2 the
// FMA path rounding to float16 / bfloat16, 0 / 3 exact; 11 / 12 / 13 the tensor-core dots (GN_MMA)
// of KIND 1 / 2 / 3, as the host's scalar form of them
static void fwd_unit(const GnSeqFwd& a, int mode, int code, int t, int n, int j) {
    switch (code) {
        case 1: gn_seq_fwd_unit<1>(a, mode, t, n, j); break;
        case 2: gn_seq_fwd_unit<2>(a, mode, t, n, j); break;
        case 11: gn_seq_fwd_unit<0, 1>(a, mode, t, n, j); break;
        case 12: gn_seq_fwd_unit<0, 2>(a, mode, t, n, j); break;
        case 13: gn_seq_fwd_unit<0, 3>(a, mode, t, n, j); break;
        default: gn_seq_fwd_unit<0>(a, mode, t, n, j);
    }
}
static void bwd_unit(const GnSeqBwd& a, int mode, int code, int t, int n, int j, int first) {
    switch (code) {
        case 1: gn_seq_bwd_unit<1>(a, mode, t, n, j, first); break;
        case 2: gn_seq_bwd_unit<2>(a, mode, t, n, j, first); break;
        case 11: gn_seq_bwd_unit<0, 1>(a, mode, t, n, j, first); break;
        case 12: gn_seq_bwd_unit<0, 2>(a, mode, t, n, j, first); break;
        case 13: gn_seq_bwd_unit<0, 3>(a, mode, t, n, j, first); break;
        default: gn_seq_bwd_unit<0>(a, mode, t, n, j, first);
    }
}
extern "C" {
// stand-ins for the kernels rnn_seq_fwd / rnn_seq_bwd with their very parameter lists: the per-unit
// work over every (t, n, j) in step order (the order the grid barrier enforces)
void host_rnn_seq_fwd(int mode, int round, GN_SEQ_FWD_PARAMS) {
    GnSeqFwd a = GN_SEQ_FWD_STRUCT;
    (void)count;
    for (int s = 0; s < T; ++s) {
        int t = reverse ? T - 1 - s : s;
        for (int n = 0; n < B; ++n)
            for (int j = 0; j < H; ++j) fwd_unit(a, mode, round, t, n, j);
    }
}
void host_rnn_seq_bwd(int mode, int round, GN_SEQ_BWD_PARAMS) {
    GnSeqBwd a = GN_SEQ_BWD_STRUCT;
    (void)count;
    for (int s = 0; s < T; ++s) {
        int t = reverse ? s : T - 1 - s;
        for (int n = 0; n < B; ++n)
            for (int j = 0; j < H; ++j) bwd_unit(a, mode, round, t, n, j, s == 0);
    }
}
// stand-ins for the two-direction kernels rnn_seq2_fwd / rnn_seq2_bwd, their very parameter lists:
// step s of both directions between two barriers (forward t = s, reverse t = T - 1 - s)
void host_rnn_seq2_fwd(int mode, int round, GN_SEQ2_FWD_PARAMS) {
    GnSeqFwd dirs[2] = {GN_SEQ_FWD_STRUCT_OF(f_), GN_SEQ_FWD_STRUCT_OF(r_)};
    (void)count;
    for (int s = 0; s < f_T; ++s)
        for (const GnSeqFwd& a : dirs) {
            int t = a.reverse ? a.T - 1 - s : s;
            for (int n = 0; n < a.B; ++n)
                for (int j = 0; j < a.H; ++j) fwd_unit(a, mode, round, t, n, j);
        }
}
void host_rnn_seq2_bwd(int mode, int round, GN_SEQ2_BWD_PARAMS) {
    GnSeqBwd dirs[2] = {GN_SEQ_BWD_STRUCT_OF(f_), GN_SEQ_BWD_STRUCT_OF(r_)};
    (void)count;
    for (int s = 0; s < f_T; ++s)
        for (const GnSeqBwd& a : dirs) {
            int t = a.reverse ? s : a.T - 1 - s;
            for (int n = 0; n < a.B; ++n)
                for (int j = 0; j < a.H; ++j) bwd_unit(a, mode, round, t, n, j, s == 0);
        }
}
// stand-ins for the per-step kernels rnn_cell_fwd / rnn_cell_bwd, their very parameter lists: one
// element per thread there, every element in turn here (no element reads another's result)
void host_rnn_cell_fwd(int mode, int round, GN_CELL_FWD_PARAMS) {
    (void)round;
    for (gn_index idx = 0; idx < (gn_index)B * H; ++idx) gn_cell_fwd_at(mode, idx, GN_CELL_FWD_ARGS);
}
void host_rnn_cell_bwd(int mode, int round, GN_CELL_BWD_PARAMS) {
    (void)round;
    for (gn_index idx = 0; idx < (gn_index)B * H; ++idx) gn_cell_bwd_at(mode, idx, GN_CELL_BWD_ARGS);
}
// stand-ins for the projection kernels rnn_proj_fwd / rnn_proj_bwd, their very parameter lists
void host_rnn_proj_fwd(int mode, int round, GN_PROJ_FWD_PARAMS) {
    (void)mode, (void)round;
    for (gn_index idx = 0; idx < (gn_index)B * P; ++idx) gn_proj_fwd_at(idx, GN_PROJ_FWD_ARGS);
}
void host_rnn_proj_bwd(int mode, int round, GN_PROJ_BWD_PARAMS) {
    (void)mode, (void)round;
    for (gn_index idx = 0; idx < (gn_index)B * P; ++idx) gn_proj_bwd_at(idx, GN_PROJ_BWD_ARGS);
}
// One warp's tensor-core dot of one 16 x 8 tile, every lane's fragments from the GN_HD helpers
// the kernel uses, the mma itself emulated from the PTX ISA's fragment layout (written out here
// again, apart from the helpers), each lane's accumulators put where gn_mma_c_at says:
// d[m * 8 + n] = sum over k in [k0, k1) of A[m][k] B[k][n].
void host_mma_tile(int kind, const void* w, long long ldw, int mrows, const float* v, long long ldv, int nr, int k0,
                   int k1, float* d) {
    float acc[32][4] = {};
    int KC = kind == 3 ? 8 : 16;
    for (int kc = k0; kc < k1; kc += KC) {
        float A[16][16] = {}, B[16][8] = {};
        for (int lane = 0; lane < 32; ++lane) {
            unsigned a[4], b[2];
            int g = lane >> 2, t = lane & 3;
            if (kind == 1) { gn_mma_frag_a<1>(w, ldw, mrows, kc, k1, lane, a); gn_mma_frag_b<1>(v, ldv, nr, kc, k1, lane, b); }
            if (kind == 2) { gn_mma_frag_a<2>(w, ldw, mrows, kc, k1, lane, a); gn_mma_frag_b<2>(v, ldv, nr, kc, k1, lane, b); }
            if (kind == 3) { gn_mma_frag_a<3>(w, ldw, mrows, kc, k1, lane, a); gn_mma_frag_b<3>(v, ldv, nr, kc, k1, lane, b); }
            auto dec = [&](unsigned bits) {
                return kind == 1 ? gn_mma_dec<1>(bits) : (kind == 2 ? gn_mma_dec<2>(bits) : gn_mma_dec<3>(bits));
            };
            if (kind == 3) {  // m16n8k8 .tf32: a0 (g, t) a1 (g + 8, t) a2 (g, t + 4) a3 (g + 8, t + 4); b0 (t, g) b1 (t + 4, g)
                A[g][t] = dec(a[0]); A[g + 8][t] = dec(a[1]); A[g][t + 4] = dec(a[2]); A[g + 8][t + 4] = dec(a[3]);
                B[t][g] = dec(b[0]); B[t + 4][g] = dec(b[1]);
            } else {  // m16n8k16 .f16 / .bf16: two elements per register, the lower index in the low half
                for (int h = 0; h < 2; ++h) {
                    A[g][2 * t + h] = dec((a[0] >> (16 * h)) & 0xffffu);
                    A[g + 8][2 * t + h] = dec((a[1] >> (16 * h)) & 0xffffu);
                    A[g][2 * t + 8 + h] = dec((a[2] >> (16 * h)) & 0xffffu);
                    A[g + 8][2 * t + 8 + h] = dec((a[3] >> (16 * h)) & 0xffffu);
                    B[2 * t + h][g] = dec((b[0] >> (16 * h)) & 0xffffu);
                    B[2 * t + 8 + h][g] = dec((b[1] >> (16 * h)) & 0xffffu);
                }
            }
        }
        for (int lane = 0; lane < 32; ++lane) {  // c0 (g, 2t) c1 (g, 2t + 1) c2 (g + 8, 2t) c3 (g + 8, 2t + 1)
            int g = lane >> 2, t = lane & 3;
            for (int q = 0; q < 4; ++q) {
                int m = g + 8 * (q >> 1), n = 2 * t + (q & 1);
                for (int k = 0; k < KC; ++k) acc[lane][q] += A[m][k] * B[k][n];
            }
        }
    }
    for (int lane = 0; lane < 32; ++lane)
        for (int q = 0; q < 4; ++q) {
            int m, n;
            gn_mma_c_at(lane, q, &m, &n);
            d[m * 8 + n] = acc[lane][q];
        }
}
void host_mma_bits(int kind, int n, const float* x, unsigned* y) {
    for (int i = 0; i < n; ++i) y[i] = kind == 1 ? gn_f16_bits(x[i]) : (kind == 2 ? gn_bf16_bits(x[i]) : gn_tf32_bits(x[i]));
}
void host_f16_value(int n, const unsigned* h, float* y) {
    for (int i = 0; i < n; ++i) y[i] = gn_f16_value(h[i]);
}
void host_round(int which, int n, const float* x, float* y) {
    for (int i = 0; i < n; ++i)
        y[i] = which == 1 ? gn_round<1>(x[i]) : (which == 2 ? gn_round<2>(x[i]) : gn_round<0>(x[i]));
}
}
"""


def _lib():
    return build_host_library(HOST_SRC, "rnn_seq")


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _ptr(a):
    return None if a is None else fptr(a)


def _host_direction(lib, mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lens, reverse, mask=None):
    """One layer and direction through the host-compiled loop, composed as the driver composes it."""
    T, B, _ = x.shape
    H = w_hh.shape[1]
    G = ref.GATES[mode]
    S = 4 if mode in ("lstm", "gru") else 1  # reserve width of the stored gates, in units of H
    xg = np.zeros((T, B, S * H), np.float32)
    xg[:, :, :G * H] = x @ w_ih.T + b_ih + (b_hh if mode != "gru" else 0)
    hs = np.full((T + 1, B, H), np.nan, np.float32)
    hs[T if reverse else 0] = h0
    cs = None
    if mode == "lstm":
        cs = np.full((T + 1, B, H), np.nan, np.float32)
        cs[T if reverse else 0] = c0
    out = np.full((T, B, H), np.nan, np.float32)
    wt = _f32(w_hh.T)
    ll = ctypes.c_longlong
    lib.host_rnn_seq_fwd(mode_code(mode), 0, fptr(xg), ll(B * S * H), ll(S * H), fptr(hs), _ptr(cs), fptr(wt),
                         fptr(_f32(b_hh)) if mode == "gru" else None, int(mode == "gru"), fptr(out), ll(B * H), ll(H),
                         _ptr(mask), ll(B * H), ll(H), int(mask is not None), fptr(lens), int(reverse), T, B, H, None)
    return xg, hs, cs, out


def mode_code(mode):
    return ref.MODES.index(mode)


@pytest.mark.parametrize("mode,T,B,H,lens", [
    # slices shorter than a staged chunk
    *[(m, 5, 11, 37, (5, 2, 4, 1, 3, 5, 5, 2, 4, 3, 1)) for m in MODES],
    # slices of 67 k (forward) / 199 or 265 (backward): several chunks, a short last one
    *[(m, 2, 3, 529, (2, 1, 2)) for m in ("lstm", "gru")],
])
def test_device_loop_unit_work_on_host_matches_reference(mode, T, B, H, lens, rng):
    """Forward and backward of a bidirectional layer with lengths and initial states: the kernels'
    per-unit functions run over every (t, n, j) in step order (the order the grid barrier
    enforces), on odd sizes (uneven reduction slices, more than one 32-unit task, staged chunks), checked
    against the float64 reference: outputs, h_n, c_n, and every gradient composed from the gate
    gradients as the driver composes them."""
    lib = _lib()
    I = 6
    G = ref.GATES[mode]
    lens = np.array(lens, np.int64)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((2, B, H))
    c0 = rng.standard_normal((2, B, H)) if mode == "lstm" else None
    ws = [tuple(rng.standard_normal(s) * 0.4 for s in ((G * H, I), (G * H, H), (G * H,), (G * H,))) + (None,)
          for _ in range(2)]
    want_out, want_hn, want_cn, reserve = ref.rnn_forward(mode, x, h0, c0, ws, 1, True, lens)
    gout, ghn = rng.standard_normal(want_out.shape), rng.standard_normal(want_hn.shape)
    gcn = rng.standard_normal(want_hn.shape) if mode == "lstm" else None
    want_dx, want_dhx, want_dcx, want_dws = ref.rnn_backward(mode, gout, ghn, gcn, x, ws, reserve, 1, True, lens)
    x32 = _f32(x)
    dx = np.zeros((T, B, I))
    for d in range(2):
        w_ih, w_hh, b_ih, b_hh, _ = (None if a is None else _f32(a) for a in ws[d])
        xg, hs, cs, out = _host_direction(lib, mode, x32, h0[d], None if c0 is None else c0[d], w_ih, w_hh, b_ih, b_hh,
                                          lens, d == 1)
        assert_close(torch.from_numpy(out), torch.from_numpy(want_out[:, :, d * H:(d + 1) * H]), torch.float32,
                     k=I + H, what=f"{mode} out dir {d}")
        last = 0 if d == 1 else T
        assert_close(torch.from_numpy(hs[last]), torch.from_numpy(want_hn[d]), torch.float32, k=I + H, what="h_n")
        if mode == "lstm":
            assert_close(torch.from_numpy(cs[last]), torch.from_numpy(want_cn[d]), torch.float32, k=I + H, what="c_n")
        # backward through the host loop from the host forward's states and stored gates
        carry = _f32(ghn[d])
        dc = _f32(gcn[d]) if mode == "lstm" else None
        dgi = np.full((T, B, G * H), np.nan, np.float32)
        dgh = np.full((T, B, G * H), np.nan, np.float32) if mode == "gru" else dgi
        S = xg.shape[2]  # the stored gates' row stride
        ll = ctypes.c_longlong
        lib.host_rnn_seq_bwd(mode_code(mode), 0, fptr(w_hh), fptr(carry), _ptr(dc),
                             fptr(_f32(gout[:, :, d * H:(d + 1) * H])), ll(B * H), ll(H), fptr(xg), ll(B * S), ll(S),
                             fptr(hs), _ptr(cs), fptr(dgi), fptr(dgh), ll(B * G * H), ll(G * H), fptr(lens),
                             int(d == 1), T, B, H, None)
        gi, gh = dgi.astype(np.float64), dgh.astype(np.float64)
        last_t = T - 1 if d == 1 else 0  # the last step processed: its dG W_hh is added after the loop
        dh0 = carry + gh[last_t] @ w_hh
        hprev = (hs[1:] if d == 1 else hs[:T]).astype(np.float64)
        got = {
            "dh0": (dh0, want_dhx[d]),
            "dw_ih": (gi.reshape(T * B, -1).T @ x.reshape(T * B, I), want_dws[d][0]),
            "dw_hh": (gh.reshape(T * B, -1).T @ hprev.reshape(T * B, H), want_dws[d][1]),
            "db_ih": (gi.sum((0, 1)), want_dws[d][2]),
            "db_hh": (gh.sum((0, 1)), want_dws[d][3]),
        }
        if mode == "lstm":
            got["dc0"] = (dc, want_dcx[d])
        for name, (a, b) in got.items():
            assert_close(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(b), torch.float32,
                         k=T * B * G * H, what=f"{mode} {name} dir {d}")
        dx += gi @ w_ih
    assert_close(torch.from_numpy(dx), torch.from_numpy(want_dx), torch.float32, k=T * B * G * H, what=f"{mode} dx")


def test_device_loop_dropout_mask_on_host(rng):
    """The mask multiplies the output (only): the same run with and without it."""
    lib = _lib()
    T, B, I, H, mode = 3, 4, 5, 9, "gru"
    lens = np.array([3, 1, 2, 3], np.int64)
    x = _f32(rng.standard_normal((T, B, I)))
    w = [_f32(rng.standard_normal(s) * 0.4) for s in ((3 * H, I), (3 * H, H), (3 * H,), (3 * H,))]
    h0 = _f32(rng.standard_normal((B, H)))
    mask = _f32((rng.uniform(size=(T, B, H)) > 0.3) / 0.7)
    _, hs_a, _, out_a = _host_direction(lib, mode, x, h0, None, *w, lens, False)
    _, hs_b, _, out_b = _host_direction(lib, mode, x, h0, None, *w, lens, False, mask=mask)
    np.testing.assert_array_equal(hs_a, hs_b)
    np.testing.assert_array_equal(out_b, out_a * mask)
    assert (out_a[1:, 1] == 0).all() and (out_a[0, 1] != 0).all()  # past its length a row outputs zero


def test_half_rounding_matches_torch(rng):
    """gn_round<1> / <2> (the state operand of a half dot) equal torch's float16 / bfloat16
    rounding, nearest even, at midpoints, subnormals, overflow, infinities and NaN."""
    lib = _lib()
    edge = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, 6.1e-5, 6.0e-5, 2.0 ** -24, 2.0 ** -25,
            3 * 2.0 ** -26, 1e-8, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, np.inf,
            -np.inf, 3.4e38]
    x = np.concatenate([np.array(edge), rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 6, 4000)])
    x = _f32(x)
    x = np.concatenate([x, -x])
    for which, dt in ((1, torch.float16), (2, torch.bfloat16)):
        y = np.empty_like(x)
        lib.host_round(which, x.size, fptr(x), fptr(y))
        want = torch.from_numpy(x).to(dt).float().numpy()
        np.testing.assert_array_equal(y, want, err_msg=str(dt))
    y = np.empty(1, np.float32)
    for which in (0, 1, 2):
        lib.host_round(which, 1, fptr(_f32([np.nan])), fptr(y))
        assert np.isnan(y[0])


def _edge_values(rng):
    edge = [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e6, 6.1e-5, 6.0e-5, 2.0 ** -24, 2.0 ** -25,
            3 * 2.0 ** -26, 1e-8, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, np.inf,
            -np.inf, 3.4e38, 1 + 2.0 ** -10 + 2.0 ** -11, 1 + 2.0 ** -11 + 2.0 ** -12, 2.0 ** -14, 2.0 ** -14 * 0.75]
    x = _f32(np.concatenate([np.array(edge), rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 6, 4000)]))
    return np.concatenate([x, -x])


def _tf32_rna(x):
    """float32 -> TF32 (10 mantissa bits), nearest with ties away from zero, as cvt.rna.tf32.f32,
    written apart from the kernels' gn_tf32_bits."""
    u = x.view(np.uint32).astype(np.uint64)
    finite = (u & 0x7F800000) != 0x7F800000
    r = np.where(finite, ((u + 0x1000) & ~np.uint64(0x1FFF)) & 0xFFFFFFFF, u)
    return r.astype(np.uint32)


def test_mma_operand_encodings_match_torch(rng):
    """The tensor-core dots' operand encodings (rnn_math.cuh gn_f16_bits / gn_bf16_bits /
    gn_tf32_bits) give torch's float16 / bfloat16 bits (nearest even, subnormals, overflow,
    infinities) and TF32 rounded nearest, ties away; NaN stays NaN; gn_f16_value decodes every
    one of the 65536 float16 bit patterns as torch does."""
    lib = _lib()
    x = _edge_values(rng)
    y = np.empty(x.size, np.uint32)
    for kind, dt in ((1, torch.float16), (2, torch.bfloat16)):
        lib.host_mma_bits(kind, x.size, fptr(x), fptr(y))
        want = torch.from_numpy(x).to(dt).view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
        np.testing.assert_array_equal(y, want, err_msg=str(dt))
    lib.host_mma_bits(3, x.size, fptr(x), fptr(y))
    np.testing.assert_array_equal(y, _tf32_rna(x))
    assert ((y & 0x1FFF) == 0)[np.isfinite(x)].all()
    nan = _f32([np.nan, -np.nan])
    for kind, exp_mask, width in ((1, 0x7C00, 0x3FF), (2, 0x7F80, 0x7F), (3, 0x7F800000, 0x7FFFFF)):
        out = np.empty(2, np.uint32)
        lib.host_mma_bits(kind, 2, fptr(nan), fptr(out))
        assert ((out & exp_mask) == exp_mask).all() and ((out & width) != 0).all(), (kind, out)
    bits = np.arange(65536, dtype=np.uint32)
    vals = np.empty(65536, np.float32)
    lib.host_f16_value(65536, fptr(bits), fptr(vals))
    want = torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(torch.float16).float().numpy()
    np.testing.assert_array_equal(vals, want)  # (NaN compares equal to NaN here)


def _mma_operands(kind, rows, ld, rng):
    """A weight operand as the kernel reads it (KIND 1 / 2: float16 / bfloat16 bits, 3: float32)
    and its values as float64."""
    w = torch.from_numpy(rng.standard_normal((rows, ld)))
    if kind == 3:
        w32 = _f32(w.numpy())
        return w32, _tf32_rna(w32).view(np.float32).astype(np.float64)
    dt = torch.float16 if kind == 1 else torch.bfloat16
    wh = w.to(dt)
    return np.ascontiguousarray(wh.view(torch.int16).numpy()), wh.double().numpy()


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("mrows,nr,k0,k1", [(16, 8, 0, 16), (11, 5, 3, 40), (3, 1, 5, 6), (16, 8, 7, 71), (0, 8, 0, 9)])
def test_mma_fragments_compute_the_tile(kind, mrows, nr, k0, k1, rng):
    """The tensor-core dot of one warp (rnn.cu gn_seq_dot_mma) is made of the GN_HD fragment
    helpers: every lane's A and B fragments (weights rows past mrows and state rows past nr zero,
    k outside [k0, k1) zero), the mma emulated from the PTX ISA's register layout, each lane's
    D put where gn_mma_c_at says. The tile equals the float64 product of the encoded operands
    (the products are exact in float32, the sums float32)."""
    lib = _lib()
    ldw, ldv = k1 + 3, k1 + 2
    w, wv = _mma_operands(kind, 16, ldw, rng)
    v = _f32(rng.standard_normal((8, ldv)))
    d = np.full(128, np.nan, np.float32)
    lib.host_mma_tile(kind, w.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(ldw), mrows, fptr(v),
                      ctypes.c_longlong(ldv), nr, k0, k1, fptr(d))
    if kind == 3:
        vv = _tf32_rna(v.copy()).view(np.float32).astype(np.float64)
    else:
        vv = torch.from_numpy(v).to(torch.float16 if kind == 1 else torch.bfloat16).double().numpy()
    want = np.zeros((16, 8))
    want[:mrows, :nr] = wv[:mrows, k0:k1] @ vv[:nr, k0:k1].T
    np.testing.assert_allclose(d.reshape(16, 8), want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


def _driver_inputs(mode, rng):
    """The host driver tests' case: two bidirectional layers, unequal lengths, initial states (a
    pair for the LSTM, else [h0, None]), dropout masks between the layers."""
    T, B, I, H, L = 4, 5, 3, 11, 2
    lengths = torch.tensor([4, 1, 3, 4, 2])
    args, _ = ops._make_seq(mode, T=T, B=B, I=I, H=H, L=L, bi=True, lengths=tuple(lengths.tolist()))(rng)
    hs = list(args[1]) if mode == "lstm" else [args[1], None]
    masks = torch.from_numpy((rng.uniform(size=(L - 1, T, B, 2 * H)) > 0.3) / 0.7)
    return (T, B, I, H, L), lengths, args[0], hs, args[2], masks


def _host_loop_kernel(host):
    """Stands in for _CupyImpl._loop_kernel: the host stand-ins as the module, the launcher's dot
    code (+ 10 for the tensor-core dots) as its code, a grid of one block."""
    return lambda mode, dot, device, kernel, B, H, directions=1, mma=False: (host, (mode, 10 + dot if mma else dot), 1)


class _HostLaunch:
    """Stands in for kcuda.launch of the loop kernels: the same arguments, converted as CuPy
    converts them (tensors to pointers, NumPy scalars to their C types), go to the host stand-ins."""

    def __init__(self, lib):
        self.lib = lib
        self.launches = []

    def launch(self, mod, kernel, grid, block, args, shared_mem=0, device=0):
        mode, dot = mod
        conv = []
        for a in args:
            if isinstance(a, torch.Tensor):
                conv.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, np.int64):
                conv.append(ctypes.c_longlong(int(a)))
            else:
                assert isinstance(a, np.int32), type(a)
                conv.append(ctypes.c_int(int(a)))
        self.launches.append(kernel)
        getattr(self.lib, f"host_{kernel}")(ctypes.c_int(ref.MODES.index(mode)), ctypes.c_int(dot), *conv)


def _driver_against_reference(mode, dtype, rng):
    """The cupy driver (_gpu_forward / _gpu_backward with _CupyImpl) on _driver_inputs in
    ``dtype``, and the float64 reference on the same inputs as the backend sees them (rounded to
    ``dtype``: rounding the inputs alone moves rnn_relu pre-activations within a half ulp of zero
    across the kink, which the kernel's arithmetic is not to answer for; test_rnn's
    _seq_against_reference does the same). Returns [(name, ours, reference, k)] for the outputs,
    states and every gradient."""
    (T, B, I, H, L), lengths, x, hs, params, masks = _driver_inputs(mode, rng)
    c = lambda a: None if a is None else (torch.from_numpy(a) if isinstance(a, np.ndarray) else a).detach().to(dtype)
    r = lambda a: None if a is None else c(a).double().numpy()
    ws = ops._split([r(p) for p in params], L, 2, True)
    out_r, hn_r, cn_r, res = ref.rnn_forward(mode, r(x), r(hs[0]), r(hs[1]), ws, L, True, lengths.numpy(), r(masks))
    gout, ghn = rng.standard_normal(out_r.shape), rng.standard_normal(hn_r.shape)
    gcn = rng.standard_normal(cn_r.shape) if mode == "lstm" else None
    want_dx, want_dhx, want_dcx, want_dws = ref.rnn_backward(mode, r(gout), r(ghn), r(gcn), r(x), ws, res, L, True,
                                                             lengths.numpy(), r(masks))
    weights = [c(p) for p in params]
    out, hn, cn, reserve = ops._gpu_forward(ops._CupyImpl, mode, c(x), c(hs[0]), c(hs[1]), weights, L, True, True,
                                            lengths, c(masks))
    dx, dhx, dcx, dws = ops._gpu_backward(ops._CupyImpl, mode, c(gout), c(ghn), c(gcn), c(x), weights, reserve, L,
                                          True, True, lengths, c(masks))
    kf, kb = I + 2 * H, T * B * 4 * H
    flat = [g for kk in range(2 * L) for g in want_dws[kk] if g is not None]
    got = [("out", out, out_r, kf), ("h_n", hn, hn_r, kf), ("dx", dx, want_dx, kb), ("dhx", dhx, want_dhx, kb)]
    got += [(f"dw{i}", a, b, kb) for i, (a, b) in enumerate(zip(dws, flat))]
    if mode == "lstm":
        got += [("c_n", cn, cn_r, kf), ("dcx", dcx, want_dcx, kb)]
    return [(name, a, torch.from_numpy(b), k) for name, a, b, k in got]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pair", [True, False], ids=["pair", "one-direction"])
def test_cupy_driver_with_host_loop_matches_reference(mode, dtype, pair, rng, monkeypatch):
    """The cupy backend's driver (_gpu_forward / _gpu_backward with _CupyImpl: the input
    projection and weight gradients as torch matmuls, the loop launches with the arguments it
    builds) on CPU tensors, every loop launch run by the host stand-ins: two bidirectional layers,
    lengths, initial states, dropout masks, against the float64 reference (half layers: the state
    rounded before the dot as the GPU kernel does, their weights passed to the loop as they are,
    16-bit). ``pair``: both directions of a layer in one launch (rnn_seq2_fwd / rnn_seq2_bwd, the
    default), else one launch per direction."""
    host = _HostLaunch(_lib())
    monkeypatch.delenv(ops.CUPY_RNN_ENV, raising=False)
    monkeypatch.setattr(ops._CupyImpl, "pair_loops", pair)
    monkeypatch.setattr(ops._CupyImpl, "_loop_kernel", staticmethod(_host_loop_kernel(host)))
    got = _driver_against_reference(mode, dtype, rng)
    assert host.launches == (["rnn_seq2_fwd"] * 2 + ["rnn_seq2_bwd"] * 2 if pair
                             else ["rnn_seq_fwd"] * 4 + ["rnn_seq_bwd"] * 4)
    for name, a, b, k in got:
        assert_close(a, b, dtype, k=k, what=f"{mode} {name}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cupy_driver_with_host_mma_loop_matches_reference(mode, dtype, rng, monkeypatch):
    """GPU_NN_CUPY_RNN=mma: the driver's loop launches with the tensor-core dots' arguments (W_hh
    forward and W_hh^T backward in the operand type: float16 / bfloat16 for half layers, float32
    for float32 with TF32 allowed), every launch run by the host stand-ins' scalar form of the mma
    dot (the operands encoded as the fragments encode them), both directions in one launch, two
    layers, lengths, states, dropout masks, against the float64 reference (float32: the TF32
    bound)."""
    from test_rnn import tol_tf32

    host = _HostLaunch(_lib())
    monkeypatch.setenv(ops.CUPY_RNN_ENV, "mma")
    monkeypatch.setattr(ops._CupyImpl, "_loop_kernel", staticmethod(_host_loop_kernel(host)))
    torch.backends.cudnn.allow_tf32 = True  # float32: dot code 3, the TF32 mma (conftest puts the flag back)
    got = _driver_against_reference(mode, dtype, rng)
    assert host.launches == ["rnn_seq2_fwd"] * 2 + ["rnn_seq2_bwd"] * 2
    for name, a, b, k in got:
        if dtype == torch.float32:
            err = max_rel_err(a, b)
            assert err <= tol_tf32(k), f"{mode} {name}: {err:.3e} > TF32 bound {tol_tf32(k):.3e}"
        else:
            assert_close(a, b, dtype, k=k, what=f"{mode} {name}")


def _record_gemm_precision(monkeypatch):
    """Every torch GEMM the cupy backend makes (torch.mm, torch.addmm, Tensor.addmm_) appends the
    float32 GEMM precision torch runs it at (``torch.backends.cuda.matmul.allow_tf32``) and the
    operand dtype to the returned list."""
    seen = []
    for owner, name in ((torch, "mm"), (torch, "addmm"), (torch.Tensor, "addmm_")):
        orig = getattr(owner, name)

        def rec(*a, _o=orig, **k):
            seen.append((torch.backends.cuda.matmul.allow_tf32, a[1].dtype))
            return _o(*a, **k)

        monkeypatch.setattr(owner, name, rec, raising=False)  # (Tensor inherits addmm_ from its C base)
    return seen


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("cudnn,mm", [(True, False), (False, True), (True, True), (False, False)])
def test_cupy_gemms_follow_cudnn_tf32_flag(mode, cudnn, mm, rng, monkeypatch):
    """The cupy backend's torch GEMMs (input projection, weight and input gradients, the final dh0
    product; per-step products where it runs per step) run in TF32 exactly when
    ``torch.backends.cudnn.allow_tf32`` says so, as torch's cuDNN RNN and our Triton kernels do,
    whatever the matmul flag says, which is left as it was. Driver on CPU tensors, the loop
    launches run by the host stand-ins, both directions and the per-step path."""
    host = _HostLaunch(_lib())
    monkeypatch.setattr(ops._CupyImpl, "_loop_kernel",
                        staticmethod(_host_loop_kernel(host)))
    monkeypatch.setattr(ops._CupyImpl, "_module", staticmethod(lambda mode, device: (host, (mode, 0))))
    # (conftest's _exact_float32 puts both flags back after the test)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, mm
    T, B, I, H, L = 3, 4, 3, 5, 2
    for env in ("loop", "step"):
        monkeypatch.setenv(ops.CUPY_RNN_ENV, env)
        args, _ = ops._make_seq(mode, T=T, B=B, I=I, H=H, L=L, bi=True, lengths=(3, 1, 2, 3))(rng)
        x, params = args[0].detach().float(), [p.detach().float() for p in args[2]]
        hs = [h.detach().float() for h in (args[1] if mode == "lstm" else (args[1],))] + [None]
        lengths = torch.tensor([3, 1, 2, 3])
        with monkeypatch.context() as m:
            seen = _record_gemm_precision(m)
            out, hn, cn, reserve = ops._gpu_forward(ops._CupyImpl, mode, x, hs[0], hs[1], params, L, True, True,
                                                    lengths, None)
            gcn = torch.randn(cn.shape) if mode == "lstm" else None
            ops._gpu_backward(ops._CupyImpl, mode, torch.randn(out.shape), torch.randn(hn.shape), gcn, x, params,
                              reserve, L, True, True, lengths, None)
        assert torch.backends.cuda.matmul.allow_tf32 == mm  # put back after every GEMM
        # input projection, dW_ih, dW_hh, dx per layer and direction at least (and dh0, per-step products)
        assert len(seen) >= 4 * L * 2 and {dt for _, dt in seen} == {torch.float32}, (env, seen)
        assert {tf for tf, _ in seen} == {cudnn}, (env, seen)


@pytest.mark.parametrize("dot,want", [(0, False), (3, True), (1, None), (2, None)])
@pytest.mark.parametrize("before", [False, True])
def test_cublas_tf32_sets_and_restores_the_matmul_flag(dot, want, before):
    torch.backends.cuda.matmul.allow_tf32 = before  # (conftest's _exact_float32 puts it back)
    with ops._cublas_tf32(dot):
        assert torch.backends.cuda.matmul.allow_tf32 == (before if want is None else want)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(RuntimeError), ops._cublas_tf32(dot):
        raise RuntimeError
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("path,P", [("step", 0), ("loop", 0), ("step", 3)], ids=["step", "loop", "projection"])
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_cupy_paths_with_strided_masks_match_reference(path, P, bi, rng, monkeypatch):
    """Every cupy path (GPU_NN_CUPY_RNN=step: the per-step kernels; the device loop; an LSTM with
    a projection: the projection kernels) with the dropout masks an expanded [.., B, 1] tensor
    (unit stride 0: the kernels index units densely) and with the output gradient a strided view,
    outputs and every gradient against the float64 reference on the same mask values, every
    launch run by the host stand-ins."""
    host = _HostLaunch(_lib())
    monkeypatch.setattr(ops._CupyImpl, "_module", staticmethod(lambda mode, device: (host, (mode, 0))))
    monkeypatch.setattr(ops._CupyImpl, "_loop_kernel", staticmethod(_host_loop_kernel(host)))
    monkeypatch.setenv(ops.CUPY_RNN_ENV, path)
    mode = "lstm" if P else "gru"
    T, B, I, H, L, D = 4, 3, 5, 6, 2, 2 if bi else 1
    W, G = P or H, ref.GATES[mode] * H
    x, hx, cx = rng.standard_normal((T, B, I)), rng.standard_normal((L * D, B, W)), rng.standard_normal((L * D, B, H))
    ws = []
    for layer in range(L):
        for _ in range(D):
            ws += [rng.standard_normal((G, I if layer == 0 else D * W)) * 0.3, rng.standard_normal((G, W)) * 0.3,
                   rng.standard_normal(G) * 0.3, rng.standard_normal(G) * 0.3] + (
                   [rng.standard_normal((P, H)) * 0.3] if P else [])
    lens = np.array([4, 2, 3])
    keep = (rng.uniform(size=(L - 1, T, B, 1)) > 0.3) / 0.7  # one value per row: expanded over the units
    masks = np.broadcast_to(keep, (L - 1, T, B, D * W))
    wsr = ops._split(ws, L, D, True)
    out_r, hn_r, cn_r, res = ref.rnn_forward(mode, x, hx, cx if mode == "lstm" else None, wsr, L, bi, lens, masks)
    gout, ghn = rng.standard_normal(out_r.shape), rng.standard_normal(hn_r.shape)
    gcn = rng.standard_normal(cn_r.shape) if mode == "lstm" else None
    want = ref.rnn_backward(mode, gout, ghn, gcn, x, wsr, res, L, bi, lens, masks)
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    m = f(keep).expand(L - 1, T, B, D * W)
    assert m.stride(-1) == 0
    gout_t = torch.zeros(T, B, 2 * D * W)[..., ::2].copy_(f(gout))  # a strided view: units 2 apart
    wt, lt = [f(w) for w in ws], torch.from_numpy(lens)
    c0 = f(cx) if mode == "lstm" else None
    out, hn, cn, reserve = ops._gpu_forward(ops._CupyImpl, mode, f(x), f(hx), c0, wt, L, bi, True, lt, m)
    grads = ops._gpu_backward(ops._CupyImpl, mode, gout_t, f(ghn), None if gcn is None else f(gcn), f(x), wt,
                              reserve, L, bi, True, lt, m)
    used = set(host.launches)
    assert used >= ({"rnn_proj_fwd", "rnn_proj_bwd"} if P else {"rnn_cell_fwd", "rnn_cell_bwd"} if path == "step"
                    else {"rnn_seq2_fwd" if bi else "rnn_seq_fwd"}), used
    k = I + D * W
    assert_close(out, torch.from_numpy(out_r), torch.float32, k=k, what="output")
    assert_close(hn, torch.from_numpy(hn_r), torch.float32, k=k, what="h_n")
    if mode == "lstm":
        assert_close(cn, torch.from_numpy(cn_r), torch.float32, k=k, what="c_n")
    n_states = 3 if mode == "lstm" else 2  # dx, dh0 and (LSTM) dc0
    for i, (a, b) in enumerate(zip(grads[:n_states], want[:n_states], strict=True)):
        assert_close(a, torch.from_numpy(b), torch.float32, k=T * G, what=f"input / state gradient {i}")
    flat = [g for per in want[3] for g in per if g is not None]
    for i, (a, b) in enumerate(zip(grads[3], flat, strict=True)):
        assert_close(a, torch.from_numpy(b), torch.float32, k=T * B, what=f"weight gradient {i}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cupy_cell_path_with_host_kernels_matches_reference(mode, dtype, rng, monkeypatch):
    """The cupy backend's cell path (ops._gpu_cell_forward / _gpu_cell_backward with _CupyImpl:
    torch's matmuls, the per-step kernels launched with the arguments it builds: t = -1 and no
    lengths, no carry in, the c' gradient from its own tensor or none) on CPU tensors, every
    kernel launch run by the host stand-ins, against the float64 reference; the LSTM also with no
    c' gradient. States are strided views (converted for the kernels)."""
    host = _HostLaunch(_lib())
    monkeypatch.setattr(ops._CupyImpl, "_module", staticmethod(lambda mode, device: (host, (mode, 0))))
    B, I, H = 3, 4, 5
    G = ref.GATES[mode] * H
    s = H ** -0.5
    x = rng.standard_normal((B, I))
    h0, c0 = rng.standard_normal((B, 2 * H))[:, ::2], rng.standard_normal((B, H))
    w_ih, w_hh = rng.standard_normal((G, I)) * s, rng.standard_normal((G, H)) * s
    b_ih, b_hh = rng.standard_normal(G) * s, rng.standard_normal(G) * s
    gh, gc = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    lstm = mode == "lstm"
    ws = [(w_ih, w_hh, b_ih, b_hh)]
    _, hn_r, cn_r, res = ref.rnn_forward(mode, x[None], h0[None], c0[None] if lstm else None, ws, 1, False)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
    hx = torch.from_numpy(rng.standard_normal((B, 2 * H))).to(dtype)[:, ::2].copy_(t(h0))  # a strided view
    args = (t(x), hx, t(c0) if lstm else None, t(w_ih), t(w_hh), t(b_ih), t(b_hh))
    h, c, reserve = ops._gpu_cell_forward(ops._CupyImpl, mode, *args)
    assert host.launches == ["rnn_cell_fwd"]
    assert_close(h, torch.from_numpy(hn_r[0]), dtype, k=I + H, what=f"{mode} h'")
    if lstm:
        assert_close(c, torch.from_numpy(cn_r[0]), dtype, k=I + H, what=f"{mode} c'")
    for with_gc in (True, False) if lstm else (False,):
        host.launches.clear()
        grads = ops._gpu_cell_backward(ops._CupyImpl, mode, t(gh), t(gc) if with_gc else None, *args, h, c, reserve)
        assert host.launches == ["rnn_cell_bwd"]
        gcn = (gc if with_gc else np.zeros_like(gc))[None] if lstm else None
        dx, dh, dc, dws = ref.rnn_backward(mode, np.zeros((1, B, H)), gh[None], gcn, x[None], ws, res, 1, False)
        want = [dx[0], dh[0]] + ([dc[0]] if lstm else []) + list(dws[0])
        got = [g for i, g in enumerate(grads) if i != 2 or lstm]
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, torch.from_numpy(b), dtype, k=B * 4 * H, what=f"{mode} grad {i} (c' gradient: {with_gc})")


def _assert_own_state_pairs(pairs, dtype, T, B, H):
    """ops.own_state_pairs held to _seq_against_reference's bounds: outputs and states k = 4H,
    gradients k = T B 4H."""
    for what, a, b in pairs:
        assert_close(a, b, dtype, k=T * B * 4 * H if what.startswith("grad") else 4 * H, what=f"rnn_relu {what}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relu_half_gradients_from_own_states_on_host(dtype, rng, monkeypatch):
    """rnn_relu in float16 / bfloat16 through the driver, every loop launch run by the host
    stand-ins, on the device test's first LOOP_GRID case (where the H200 failed it against the
    plain float64 reference, 7e-2 and 3e-1): outputs and stored states match the reference, and
    the gradients match the reference backward from the stored states to the usual bounds
    (ops.own_state_pairs: a pre-activation within rounding of 0 may take the other relu branch,
    which no half-precision implementation can avoid; the host loop reproduces the GPU's numbers)."""
    host = _HostLaunch(_lib())
    monkeypatch.delenv(ops.CUPY_RNN_ENV, raising=False)
    monkeypatch.setattr(ops._CupyImpl, "_loop_kernel",
                        staticmethod(_host_loop_kernel(host)))
    T, B, I, H, L, bi, lens, _ = LOOP_GRID[0]
    mode = "rnn_relu"
    args, kw = ops._make_seq(mode, T=T, B=B, I=I, H=H, L=L, bi=bi, lengths=lens)(rng)
    masks = torch.from_numpy((rng.uniform(size=(L - 1, T, B, 2 * H)) > 0.3) / 0.7).to(dtype)
    x, hx = args[0].detach().to(dtype), args[1].detach().to(dtype)
    weights = [p.detach().to(dtype) for p in args[2]]
    out, hn, _, reserve = ops._gpu_forward(ops._CupyImpl, mode, x, hx, None, weights, L, bi, True, kw["lengths"],
                                           masks)
    gouts = [torch.from_numpy(rng.standard_normal(o.shape)).to(dtype) for o in (out, hn)]
    dx, dhx, _, dws = ops._gpu_backward(ops._CupyImpl, mode, gouts[0], gouts[1], None, x, weights, reserve, L, bi,
                                        True, kw["lengths"], masks)
    assert host.launches == ["rnn_seq2_fwd"] * 2 + ["rnn_seq2_bwd"] * 2  # bidirectional: both directions per launch
    pairs = ops.own_state_pairs(mode, x, hx, weights, L, bi, True, kw["lengths"], masks, out, hn, reserve, gouts,
                                [dx, dhx, *dws])
    _assert_own_state_pairs(pairs, dtype, T, B, H)


@pytest.mark.parametrize("B,H,P,env,want", [
    (64, 512, 0, None, True),
    (1, 1, 0, "", True),
    (4, 13, 0, "loop", True),
    (4, 13, 0, "step", False),   # the old path on request
    (4, 13, 3, None, False),     # projections run per step
    (0, 13, 0, None, False),
])
def test_cupy_loop_choice(B, H, P, env, want):
    assert ops.cupy_loop_choice(B, H, P, env) is want


def test_cupy_loop_choice_rejects_bad_env():
    with pytest.raises(ValueError, match=ops.CUPY_RNN_ENV):
        ops.cupy_loop_choice(4, 13, 0, "1")


class _AtenCounter(TorchDispatchMode):
    """Counts the aten ops a block runs, by overload packet name."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ydt", [torch.float32, torch.float16])
@pytest.mark.parametrize("form", ["one", "shared", "two"])
def test_cupy_colsum_writes_float32_bias_gradients_without_copies(form, ydt):
    """The CuPy backend's bias-gradient column sums (pure torch: checked on the CPU): y = x.sum(0),
    y2 = y (shared) or x2.sum(0) (two), a half y the float32 sum rounded once; a float32 y is the
    reduction's own output (no copy_), y2 one copy of it where it shares y's sum."""
    g = torch.Generator().manual_seed(3)
    x, x2 = torch.randn(37, 23, generator=g), torch.randn(37, 23, generator=g)
    y = torch.empty(23, dtype=ydt)
    y2 = None if form == "one" else torch.empty(23, dtype=ydt)
    with _AtenCounter() as spy:
        ops._CupyImpl.colsum(x, y, y2, x2 if form == "two" else None)
    torch.testing.assert_close(y, x.sum(0).to(ydt), rtol=0, atol=0)
    if form != "one":
        torch.testing.assert_close(y2, (x2 if form == "two" else x).sum(0).to(ydt), rtol=0, atol=0)
    copies = spy.counts.get("copy_", 0)
    if ydt == torch.float32:
        assert copies == (1 if form == "shared" else 0), spy.counts
    else:
        assert copies == (1 if form == "one" else 2), spy.counts


def test_cupy_colsum_under_a_recorded_backward_keeps_the_graph():
    """Inside a backward that autograd records (create_graph), out= would refuse the inputs: the
    sums are copied instead, and the result still carries the graph's values."""
    x = torch.randn(5, 7, dtype=torch.float32, requires_grad=True)
    y, y2 = torch.empty(7), torch.empty(7)
    ops._CupyImpl.colsum(x, y, y2)
    assert y.requires_grad and y2.requires_grad  # (sum(out=) raises on an input that requires grad)
    torch.testing.assert_close(y, x.detach().sum(0), rtol=0, atol=0)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


@pytest.mark.parametrize("B,H,sm,per_sm,cap,want", [
    (64, 512, 132, 2, None, 128),  # 16 unit tiles x 8 row tiles
    (4, 512, 132, 2, None, 16),
    (256, 1024, 132, 2, None, 264),  # more tasks than resident blocks: blocks loop over tasks
    (9, 33, 132, 2, None, 4),
    (64, 512, 132, 2, 3, 3),
    (64, 512, 132, 0, None, 0),  # nothing resident: per step
])
def test_cupy_loop_grid(B, H, sm, per_sm, cap, want):
    assert ops.cupy_loop_grid(B, H, sm, per_sm, cap) == want


def rnn_cu_builds(every: bool) -> list:
    """The (GN_MODE, GN_ROUND, GN_MMA) builds of rnn.cu the compile test below takes: all 24 with
    ``every``, else a Latin rectangle (helpers.latin_cover: every cell with every rounding, GN_MMA
    alternating), in which every pair of two factors' values is compiled (cell and rounding, cell
    and MMA, rounding and MMA: 12 of the 24 builds, each about 2 s of NVRTC on CI's machine)."""
    if every:
        return list(itertools.product(range(len(ref.MODES)), range(3), range(2)))
    return latin_cover(range(len(ref.MODES)), range(3), (0, 1))


def test_rnn_cu_builds_meet_every_pair_of_values():
    combos = rnn_cu_builds(every=False)
    assert len(combos) == 12 and len(set(combos)) == 12
    for a, b in itertools.combinations(range(3), 2):
        want = {(x, y) for x in range((4, 3, 2)[a]) for y in range((4, 3, 2)[b])}
        assert {(c[a], c[b]) for c in combos} == want, (a, b)
    assert sorted(rnn_cu_builds(every=True)) == sorted(itertools.product(range(4), range(3), range(2)))


AOT_COVER = aot_cover()  # (as tests/test_compile.py reads it)


@pytest.mark.parametrize("mode", ref.MODES)  # a test per cell (GN_MODE): xdist's workers share the compiles
def test_rnn_cu_loader_builds_compile_for_sm90_without_spills(mode):
    """NVRTC for sm_90, the (GN_MODE, GN_ROUND, GN_MMA) builds the loader makes, the loop kernels
    without register spills (ptxas's report): every pair of two factors' values (rnn_cu_builds),
    every build with GPU_NN_AOT_FULL=1 or GPU_NN_AOT_COVER=all (the sm_90 check's switches: run at
    every stop that touches a kernel)."""
    from cupy_backends.cuda.libs import nvrtc

    from gpu_nn.kernels import cuda as kcuda

    for _, rnd, mma in (b for b in rnn_cu_builds(AOT_COVER == "all") if b[0] == ref.MODES.index(mode)):
        opts = ["-arch=sm_90", *kcuda.options("rnn"), f"-DGN_MODE={ref.MODES.index(mode)}", f"-DGN_ROUND={rnd}",
                f"-DGN_MMA={mma}", "--ptxas-options=-v"]  # the loader's own options
        prog = nvrtc.createProgram(kcuda.source("rnn"), "rnn.cu", [], [])
        try:
            try:
                nvrtc.compileProgram(prog, opts)
            except nvrtc.NVRTCError:
                pytest.fail(nvrtc.getProgramLog(prog))
            log = nvrtc.getProgramLog(prog)
        finally:
            nvrtc.destroyProgram(prog)
        entries = {}
        cur = None
        for line in log.splitlines():
            if "Compiling entry function" in line:
                cur = line.split("'")[1]
            elif cur and "spill stores" in line:
                entries[cur] = line
        assert {"rnn_seq_fwd", "rnn_seq_bwd", "rnn_seq2_fwd", "rnn_seq2_bwd", "rnn_cell_fwd", "rnn_cell_bwd"} <= set(entries), log
        for name, line in entries.items():
            assert " 0 bytes spill stores, 0 bytes spill loads" in line, f"{mode} GN_ROUND={rnd} GN_MMA={mma} {name}: {line}"


# ----------------------------------------------------------------------------------------------
# on a GPU: the whole path

CUPY = [p for p in backend_params(("cupy",))]
GPU_ONLY = pytest.mark.skipif(not CUDA, reason="the device loop needs a CUDA GPU (its unit work is host-tested above)")

LOOP_GRID = [
    # T, B, I, H, L, bi, lengths, masks
    (7, 11, 6, 37, 2, True, (7, 2, 5, 1, 3, 7, 6, 4, 7, 2, 5), True),
    (5, 3, 4, 5, 1, False, None, False),
    (9, 20, 17, 70, 1, True, None, False),
]


@GPU_ONLY
@pytest.mark.parametrize("backend,device", CUPY)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blocks", [None, 1, 3])
def test_device_loop_matches_reference(backend, device, mode, blocks, rng, monkeypatch):
    """The default cupy path (the device loop) against the float64 reference, every GPU dtype;
    ``blocks`` caps the grid so that blocks loop over several tasks between barriers."""
    from test_rnn import _seq_against_reference

    monkeypatch.delenv(ops.CUPY_RNN_ENV, raising=False)
    monkeypatch.setattr(ops._CupyImpl, "max_loop_blocks", blocks)
    calls = []
    names = ("persist_forward", "loop_backward", "persist_forward_pair", "persist_backward_pair")
    for name in names:
        orig = getattr(ops._CupyImpl, name)
        monkeypatch.setattr(ops._CupyImpl, name,
                            staticmethod(lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1]))
    for cfg in LOOP_GRID:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if mode == "rnn_relu" and dtype != torch.float32:
                _relu_half_against_reference(backend, device, dtype, rng, *cfg)
            else:
                _seq_against_reference(backend, device, mode, dtype, rng, *cfg, batch_first=cfg[0] == 5)
    # the loops ran, not the per-step path: one direction (LOOP_GRID[1]) and both in one launch
    assert set(names) <= set(calls)


def _relu_half_against_reference(backend, device, dtype, rng, T, B, I, H, L, bi, lengths, masks):
    """_seq_against_reference for rnn_relu in float16 / bfloat16, through gpu_nn::rnn_seq itself
    (its reserve is the backend's stored states): outputs and states against the float64
    reference, gradients against the reference backward from those states (ops.own_state_pairs
    says why the plain comparison is ill-posed for relu at half precision)."""
    import gpu_nn

    args, kw = ops._make_seq("rnn_relu", T=T, B=B, I=I, H=H, L=L, bi=bi, lengths=lengths)(rng)
    D = 2 if bi else 1
    mk = torch.from_numpy((rng.uniform(size=(L - 1, T, B, D * H)) > 0.3) / 0.7) if masks and L > 1 else None
    leaves = [t.detach().to(device, dtype).requires_grad_() for t in (args[0], args[1], *args[2])]
    mk = None if mk is None else mk.to(device, dtype)
    with gpu_nn.backend(backend):
        out, hn, _, res = ops._rnn_seq_op(leaves[0], leaves[1], None, leaves[2:], "rnn_relu", L, bi, True,
                                          kw.get("lengths"), mk)
        gens = np.random.default_rng(5)
        gs = [torch.from_numpy(gens.standard_normal(o.shape)).to(device, dtype) for o in (out, hn)]
        grads = torch.autograd.grad((out, hn), leaves, gs)
    assert out.dtype == dtype and res.device == out.device
    pairs = ops.own_state_pairs("rnn_relu", leaves[0], leaves[1], leaves[2:], L, bi, True, kw.get("lengths"), mk, out,
                                hn, res, gs, grads)
    _assert_own_state_pairs(pairs, dtype, T, B, H)


@GPU_ONLY
@pytest.mark.parametrize("backend,device", CUPY)
@pytest.mark.parametrize("mode", MODES)
def test_device_loop_matches_per_step_path(backend, device, mode, rng, monkeypatch):
    """Same inputs through GPU_NN_CUPY_RNN=step and the device loop: outputs and every gradient
    agree to float32 rounding (the dots sum in another order)."""
    import gpu_nn

    T, B, I, H = 13, 9, 10, 45
    args, kw = ops._make_seq(mode, T=T, B=B, I=I, H=H, L=2, bi=True, lengths=(13, 4, 9, 1, 13, 7, 2, 11, 6))(rng)
    flat = [args[0], *(args[1] if mode == "lstm" else (args[1],)), *args[2]]
    res = {}
    for env in ("step", "loop"):
        monkeypatch.setenv(ops.CUPY_RNN_ENV, env)
        leaves = [t.detach().to("cuda", torch.float32).requires_grad_() for t in flat]
        n_h = 2 if mode == "lstm" else 1
        h = tuple(leaves[1:1 + n_h]) if mode == "lstm" else leaves[1]
        with gpu_nn.backend("cupy"):
            out = ops.SEQ_FUNCS[mode](leaves[0], h, leaves[1 + n_h:], True, 2, 0.0, True, True, False,
                                      lengths=kw.get("lengths"))
            gs = [torch.from_numpy(np.random.default_rng(7).standard_normal(o.shape)).float().cuda() for o in out]
            grads = torch.autograd.grad(out, leaves, gs)
        res[env] = [t.detach().double().cpu() for t in (*out, *grads)]
    for a, b in zip(res["loop"], res["step"]):
        assert_close(a, b, torch.float32, k=T * B * 4 * H)


@GPU_ONLY
@pytest.mark.parametrize("backend,device", CUPY)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blocks", [None, 3])
def test_device_loop_mma_matches_reference(backend, device, mode, blocks, rng, monkeypatch):
    """GPU_NN_CUPY_RNN=mma (the loop's dots as mma.sync tiles) against the float64 reference:
    float16 and bfloat16 (rnn_relu from its own states, as the FMA loop's test), float32 with TF32
    allowed at the TF32 bound (rnn_relu left out there: TF32's 10-bit mantissa meets relu's kink
    as float16 does); ``blocks`` 3 makes blocks loop over tasks."""
    from test_rnn import _seq_against_reference

    monkeypatch.setenv(ops.CUPY_RNN_ENV, "mma")
    monkeypatch.setattr(ops._CupyImpl, "max_loop_blocks", blocks)
    kernels = []
    orig = ops._CupyImpl._loop_kernel
    monkeypatch.setattr(ops._CupyImpl, "_loop_kernel",
                        staticmethod(lambda *a, **k: (kernels.append(k.get("mma", a[7] if len(a) > 7 else False)),
                                                      orig(*a, **k))[1]))
    for cfg in LOOP_GRID:
        for dtype in (torch.float16, torch.bfloat16):
            if mode == "rnn_relu":
                _relu_half_against_reference(backend, device, dtype, rng, *cfg)
            else:
                _seq_against_reference(backend, device, mode, dtype, rng, *cfg, batch_first=cfg[0] == 5)
    if mode != "rnn_relu":  # TF32 on short sequences, as the Triton backend's TF32 tests
        torch.backends.cudnn.allow_tf32 = True  # (conftest's _exact_float32 puts it back)
        for cfg in [(4, 5, 3, 6, 2, True, (4, 1, 3, 2, 4), True), LOOP_GRID[1]]:
            _seq_against_reference(backend, device, mode, torch.float32, rng, *cfg, tf32=True)
    assert kernels and all(kernels)  # every loop launch took the tensor-core kernels


@GPU_ONLY
@pytest.mark.parametrize("backend,device", CUPY)
@pytest.mark.parametrize("mode", ["rnn_tanh", "lstm", "gru"])
def test_cupy_float32_with_tf32_against_reference(backend, device, mode, rng):
    """torch's default precision (cudnn.allow_tf32 on): the cupy backend's float32 GEMMs run in
    TF32 (the loop's recurrent dots stay exact float32), held to the TF32 bound against the float64
    reference on short sequences, as the Triton backend's TF32 tests are (rnn_relu left out: at
    TF32's 10-bit mantissa a pre-activation within rounding of 0 may take the other branch, as at
    float16; ops.own_state_pairs)."""
    from test_rnn import _seq_against_reference

    torch.backends.cudnn.allow_tf32 = True  # (conftest's _exact_float32 puts it back)
    for cfg in [(4, 5, 3, 6, 2, True, (4, 1, 3, 2, 4), True), LOOP_GRID[1]]:
        _seq_against_reference(backend, device, mode, torch.float32, rng, *cfg, tf32=True)


@GPU_ONLY
@pytest.mark.parametrize("backend,device", CUPY)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blocks", [None, 3])
def test_device_loop_pair_matches_one_direction_launches(backend, device, mode, blocks, rng, monkeypatch):
    """Both directions of a layer in one launch (rnn_seq2_fwd / rnn_seq2_bwd, the default) against
    one launch per direction (``_CupyImpl.pair_loops`` off): the same inputs give the same outputs
    and gradients, float32 and bfloat16, lengths, two layers; ``blocks`` 3 makes the blocks loop
    over tasks of both directions between barriers."""
    import gpu_nn

    monkeypatch.delenv(ops.CUPY_RNN_ENV, raising=False)
    monkeypatch.setattr(ops._CupyImpl, "max_loop_blocks", blocks)
    T, B, I, H = 11, 13, 7, 45
    args, kw = ops._make_seq(mode, T=T, B=B, I=I, H=H, L=2, bi=True,
                             lengths=(11, 4, 9, 1, 11, 7, 2, 10, 6, 11, 3, 8, 5))(rng)
    flat = [args[0], *(args[1] if mode == "lstm" else (args[1],)), *args[2]]
    for dtype in (torch.float32, torch.bfloat16):
        res = {}
        for pair in (True, False):
            monkeypatch.setattr(ops._CupyImpl, "pair_loops", pair)
            leaves = [t.detach().to("cuda", dtype).requires_grad_() for t in flat]
            n_h = 2 if mode == "lstm" else 1
            h = tuple(leaves[1:1 + n_h]) if mode == "lstm" else leaves[1]
            with gpu_nn.backend("cupy"):
                out = ops.SEQ_FUNCS[mode](leaves[0], h, leaves[1 + n_h:], True, 2, 0.0, True, True, False,
                                          lengths=kw.get("lengths"))
                gs = [torch.from_numpy(np.random.default_rng(7).standard_normal(o.shape)).to("cuda", dtype)
                      for o in out]
                grads = torch.autograd.grad(out, leaves, gs)
            res[pair] = [t.detach().double().cpu() for t in (*out, *grads)]
        for i, (a, b) in enumerate(zip(res[True], res[False])):
            # the same per-task arithmetic on both sides: rounding in the dtype bounds any difference
            assert_close(a, b, dtype, k=T * B * 4 * H, what=f"{mode} {dtype} tensor {i}")


@GPU_ONLY
@pytest.mark.parametrize("backend,device", CUPY)
def test_device_loop_launch_is_cooperative(backend, device):
    """The loop kernels go through CuPy's cooperative launch, which bounds a 1-D grid by what can
    be resident (occupancy x SMs) before cuLaunchCooperativeKernel: a grid one block past that is
    reduced to it, with CuPy's warning (a plain launch would run it as asked; the driver refuses
    only a grid that is still too large, which CuPy never passes), and the reduced grid still
    computes every task (blocks loop over tasks; T = 1, so no barrier is waited on)."""
    import warnings

    from gpu_nn.kernels import cuda as kcuda

    dev = torch.cuda.current_device()
    mod = kcuda.load("rnn", {"GN_MODE": 0, "GN_ROUND": 0}, dev, cooperative=True)
    per_sm, sms = ops._CupyImpl._residency(mod, "rnn_seq_fwd", dev)
    assert per_sm >= 1
    resident = per_sm * sms
    B, H = 8, 32 * (resident + 1)  # resident + 1 tasks of 32 units x 8 rows
    f = torch.float32
    xg = torch.randn(1, B, H, device="cuda")
    hs = torch.randn(2, B, H, device="cuda")
    wt = torch.randn(H, H, device="cuda") * H ** -0.5
    out = torch.full((1, B, H), float("nan"), device="cuda", dtype=f)
    lens = torch.ones(B, dtype=torch.int64, device="cuda")
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    args = (xg, np.int64(B * H), np.int64(H), hs, hs, wt, wt, np.int32(0), out, np.int64(B * H), np.int64(H), out,
            np.int64(0), np.int64(0), np.int32(0), lens, np.int32(0), np.int32(1), np.int32(B), np.int32(H), count)
    want = torch.tanh(xg[0].double() + hs[0].double() @ wt.double())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kcuda.launch(mod, "rnn_seq_fwd", (resident,), (ops.SEQ_THREADS,), args, device=dev)
    torch.cuda.synchronize()
    assert not [w for w in seen if "grid size" in str(w.message)]  # a grid that fits is launched as asked
    assert_close(out[0], want, f, k=H, what="resident grid")
    out.fill_(float("nan"))
    with pytest.warns(UserWarning, match=f"grid size will be reduced from {resident + 1} to {resident}"):
        kcuda.launch(mod, "rnn_seq_fwd", (resident + 1,), (ops.SEQ_THREADS,), args, device=dev)
    torch.cuda.synchronize()
    assert_close(out[0], want, f, k=H, what="reduced grid")


def test_cupy_launch_passes_tensors_as_addresses_without_dlpack(monkeypatch):
    """kcuda.launch hands CuPy a tensor as its device address (np.uint64, a T* parameter's eight
    bytes), never through DLPack, whose stream handshake makes CuPy's stream wait on torch's
    (an invalid capture inside torch.cuda.graph); NumPy scalars pass as they are."""
    from gpu_nn.kernels import cuda as kcuda

    def no_dlpack(self, *args, **kwargs):
        raise AssertionError("a tensor went through DLPack")

    monkeypatch.setattr(torch.Tensor, "__dlpack__", no_dlpack)
    t = torch.arange(10, dtype=torch.float32)[3:]  # a view: its address includes the offset
    n, s = np.int32(7), np.int64(-3)
    out = kcuda.kernel_args((t, n, torch.empty(0), s))
    assert type(out[0]) is np.uint64 and int(out[0]) == t.data_ptr()
    assert int(out[0]) == t.untyped_storage().data_ptr() + 3 * 4
    assert out[1] is n and out[3] is s and type(out[2]) is np.uint64


def _emulate_out_dtype_gemms(monkeypatch):
    """torch.mm / torch.addmm with ``out_dtype`` (CUDA-only kernels) emulated on CPU tensors: the
    half operands widened exactly, the product summed in float32, written into ``out``; and
    _gemm_half_to_float32 saying yes. Returns the list of calls made."""
    calls = []
    mm, addmm = torch.mm, torch.addmm

    def fake_mm(x, y, *args, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return mm(x, y, *args, out=out, **kw) if out is not None else mm(x, y, *args, **kw)
        assert out_dtype == torch.float32 and x.dtype == y.dtype != torch.float32 and out.dtype == torch.float32
        calls.append("mm")
        return mm(x.float(), y.float(), out=out)

    def fake_addmm(bias, x, y, *args, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return addmm(bias, x, y, *args, out=out, **kw) if out is not None else addmm(bias, x, y, *args, **kw)
        assert out_dtype == bias.dtype == torch.float32 and x.dtype == y.dtype != torch.float32
        calls.append("addmm")
        return addmm(bias, x.float(), y.float(), out=out)

    monkeypatch.setattr(torch, "mm", fake_mm)
    monkeypatch.setattr(torch, "addmm", fake_addmm)
    monkeypatch.setitem(ops._HALF_TO_FLOAT32, "cpu", True)
    return calls


def test_half_to_float32_gemms_are_cuda_only_here():
    """This CPU machine's torch has no out_dtype GEMM kernel for CPU tensors (the general path
    runs there); on a CUDA build the check reads torch's dispatcher for CUDA."""
    assert ops._gemm_half_to_float32("cpu") is False


def test_refused_half_gemm_falls_back_once_with_a_warning(rng, monkeypatch):
    """Where torch's out_dtype GEMM raises before running (a torch that refuses these operands or
    this output layout), the product is computed by the general path, the same values, with one
    warning; later calls go to the general path without trying again."""
    attempts = []

    def refuse(*args, out_dtype=None, **kw):
        attempts.append(1)
        raise RuntimeError("out_dtype not supported here")

    monkeypatch.setitem(ops._HALF_TO_FLOAT32, "cpu", True)
    monkeypatch.setattr(torch, "addmm", refuse)
    a = torch.from_numpy(rng.standard_normal((5, 3))).half()
    b = torch.from_numpy(rng.standard_normal((3, 4))).half()
    bias = torch.from_numpy(rng.standard_normal(4)).half()
    c = torch.empty(5, 4)
    with pytest.warns(RuntimeWarning, match="refused"):
        ops._CupyImpl.matmul(a, b, c, bias1=bias, dot=1)
    want = (a.float() @ b.float()).half().float() + bias.float()  # the general path: the product rounded to half
    torch.testing.assert_close(c, want)
    assert ops._HALF_TO_FLOAT32["cpu"] is False and len(attempts) == 1
    ops._CupyImpl.matmul(a, b, c, bias1=bias, dot=1)
    assert len(attempts) == 1


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, False), (torch.float16, False), (torch.float16, True),
                                             (torch.bfloat16, True)])
def test_cupy_matmul_writes_what_the_general_formula_gives(dtype, out_dtype, grad, rng, monkeypatch):
    """_CupyImpl.matmul, whose float32 cases without a scale write c through mm / addmm /
    addmm_ (no temporary copied into c: counted; both biases folded into the addmm), against (a @ b + bias1 + bias2) * scale (+ c)
    in float64: every combination of the options, c a strided view (the input projection writes
    the first G H columns of a wider gate buffer) whose other columns stay untouched; ``grad``:
    inputs that autograd records (the double-backward route), which take the general path.
    ``out_dtype``: torch's half GEMMs that write float32 (CUDA; emulated here) take the half cases
    without scale or accumulation, also without a copy into c."""
    from gpu_nn.ops import rnn as ops

    gemms = _emulate_out_dtype_gemms(monkeypatch) if out_dtype else []
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: (copies.append(1), real_copy(self, src, *a, **k))[1])

    M, K, N, ld = 13, 9, 11, 16
    a = torch.from_numpy(rng.standard_normal((M, K))).to(dtype).requires_grad_(grad)
    b = torch.from_numpy(rng.standard_normal((K, N))).to(dtype)
    vec = [torch.from_numpy(rng.standard_normal(N)).to(dtype) for _ in range(2)]
    scale = torch.from_numpy(rng.standard_normal((M, N))).to(dtype)
    dot = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    for acc in (False, True):
        for use in range(8):
            b1, b2, sc = (vec[0] if use & 1 else None), (vec[1] if use & 2 else None), (scale if use & 4 else None)
            buf = torch.from_numpy(rng.standard_normal((M, ld))).float()
            before = buf.clone()
            c = buf[:, :N]
            want = a.detach().double() @ b.double()
            for v in (b1, b2):
                if v is not None:
                    want = want + v.double()
            if sc is not None:
                want = want * sc.double()
            if acc:
                want = want + before[:, :N].double()
            copies.clear()
            gemms.clear()
            with torch.no_grad() if not grad else contextlib.nullcontext():
                ops._CupyImpl.matmul(a, b, c, bias1=b1, bias2=b2, scale=sc, acc=acc, dot=dot)
            fast = dtype == torch.float32 and sc is None and not grad and not (acc and (b1 is not None or b2 is not None))
            half_fast = out_dtype and sc is None and not grad and not acc
            assert len(copies) == (0 if fast or half_fast else 1)
            assert gemms == ([("mm" if b1 is None and b2 is None else "addmm")] if half_fast else [])
            c = c.detach()
            # float32: float32 sums of K products; half: the product itself rounded to the half
            # dtype (unit roundoff 2^-11 / 2^-8 of values ~ sqrt(K)), then float32 adds
            rtol, atol = {torch.float32: (1e-5, 1e-5 * K), torch.float16: (2e-3, 2e-3 * K),
                          torch.bfloat16: (1.6e-2, 1.6e-2 * K)}[dtype]
            torch.testing.assert_close(c.double(), want, rtol=rtol, atol=atol,
                                       msg=f"acc={acc} bias1={b1 is not None} bias2={b2 is not None} scale={sc is not None}")
            assert torch.equal(buf[:, N:], before[:, N:])


def test_cupy_kernel_functions_are_looked_up_once():
    """kcuda.function keeps one RawKernel per (module, kernel): CuPy's get_function builds a new
    one, with a cache lookup keyed by the whole source, on every call."""
    from gpu_nn.kernels import cuda as kcuda

    class Module:
        def __init__(self):
            self.calls = []

        def get_function(self, name):
            self.calls.append(name)
            return (self, name)

    m1, m2 = Module(), Module()
    for _ in range(3):
        assert kcuda.function(m1, "a") == (m1, "a") and kcuda.function(m1, "b") == (m1, "b")
        assert kcuda.function(m2, "a") == (m2, "a")
    assert m1.calls == ["a", "b"] and m2.calls == ["a"]
