// Fused recurrent cell kernels for the cupy backend (Elman tanh / relu, LSTM, GRU): per-step
// kernels (rnn_cell_*, rnn_proj_*) and, below, the device time loop (rnn_seq_fwd / rnn_seq_bwd; and
// rnn_seq2_fwd / rnn_seq2_bwd, both directions of a bidirectional layer in one launch).
//
// Per step: one thread per (batch row b, hidden unit j) of one time step; the recurrent matmul
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
// rnn_cell_bwd: carry [B, H] holds dh without this step's output gradient (not read, taken as
// zero, when has_carry is 0: a cell); writes the gate gradients dgi (W_ih side) / dgh (W_hh side,
// GRU only), the new carry, and dc from dc_next read at dcin (dc itself in a sequence; zero, not
// read, when has_dcin is 0).
// Cells pass t = -1: no lengths, every row valid, len not read.
// rnn_proj_bwd: carry [B, P] holds dG_next W_hh plus what invalid rows carried; dh [B, P] gets
// the projected state's gradient where valid (zero elsewhere).
#include "rnn_math.cuh"

#ifndef GN_MODE
#define GN_MODE 2
#endif

extern "C" __global__ void rnn_cell_fwd(GN_CELL_FWD_PARAMS) {
    gn_index idx = (gn_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (gn_index)B * H) return;
    gn_cell_fwd_at(GN_MODE, idx, GN_CELL_FWD_ARGS);
}

extern "C" __global__ void rnn_proj_fwd(GN_PROJ_FWD_PARAMS) {
    gn_index idx = (gn_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (gn_index)B * P) return;
    gn_proj_fwd_at(idx, GN_PROJ_FWD_ARGS);
}

extern "C" __global__ void rnn_proj_bwd(GN_PROJ_BWD_PARAMS) {
    gn_index idx = (gn_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (gn_index)B * P) return;
    gn_proj_bwd_at(idx, GN_PROJ_BWD_ARGS);
}

extern "C" __global__ void rnn_cell_bwd(GN_CELL_BWD_PARAMS) {
    gn_index idx = (gn_index)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (gn_index)B * H) return;
    gn_cell_bwd_at(GN_MODE, idx, GN_CELL_BWD_ARGS);
}

// ---------------------------------------------------------------------------------------------
// The device time loop: every step of one layer and direction in one launch (rnn_math.cuh,
// "The device time loop", says how a block splits a task). The grid must be co-resident: the
// launcher sizes it by the occupancy API and launches it cooperatively (CuPy reduces a larger 1-D
// grid to what can be resident, with a warning, so any gridDim.x must work). GN_ROUND: 0 exact
// float32 dots, 1 / 2 the state operand rounded to float16 / bfloat16 (half weights, passed as
// they are: 16-bit elements). Blocks loop over tasks when there are more tasks than blocks; a task
// stays on the same block and thread every step, so the states a thread finalizes are its own,
// and only what other blocks wrote is read through L2.

#ifndef GN_ROUND
#define GN_ROUND 0
#endif

// GN_MMA 1: the loop's dots on the tensor cores (mma.sync; rnn_math.cuh, "Tensor-core dots"), their
// operands float16 / bfloat16 (GN_ROUND 1 / 2, half weights) or TF32 (GN_ROUND 0: float32 weights
// where TF32 is allowed); the weight argument is then W_hh [G * H, H] for the forward and W_hh^T
// [H, G * H] for the backward (the mma's A: rows are units), in that operand type. 0: CUDA-core FMAs.
#ifndef GN_MMA
#define GN_MMA 0
#endif
#define GN_MMA_KIND (GN_ROUND == 1 ? 1 : (GN_ROUND == 2 ? 2 : 3))

template <int KIND>
__device__ __forceinline__ void gn_mma(const unsigned* a, const unsigned* b, float* c) {
    if constexpr (KIND == 1)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else if constexpr (KIND == 2)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One warp's slice [k0, k1) of a task's dot on the tensor cores: acc[2 * g + h] += the 16 x 8 tile
// D[m][n] = sum_k w[(g * gs + row0 + 16 h + m) * ldw + k] * v[n * ldv + k] for gates g < ng, unit
// halves h (rows past `rows`, the units left from row0, and batch rows n >= nr are zero).
template <int KIND>
__device__ __forceinline__ void gn_seq_dot_mma(const float* v, gn_index ldv, int nr, const void* w, gn_index ldw,
                                               int row0, int rows, gn_index gs, int ng, int k0, int k1,
                                               float (*acc)[4], int lane) {
    const int es = KIND == 3 ? 4 : 2;  // bytes per weight element
    // two passes of (up to) two gates each over the slice, the B fragments read again in the
    // second: half the A fragments in flight (the LSTM's eight at once spilled at 128 registers)
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
        if (2 * pass >= ng) break;
        for (int kc = k0; kc < k1; kc += gn_mma_k<KIND>()) {
            unsigned b[2];
            gn_mma_frag_b<KIND>(v, ldv, nr, kc, k1, lane, b);
#pragma unroll
            for (int q = 4 * pass; q < 4 * pass + 4; ++q) {
                int g = q >> 1, h = q & 1;
                if (g < ng) {
                    unsigned a[4];
                    const char* base = (const char*)w + ((gn_index)g * gs + row0 + 16 * h) * ldw * es;
                    gn_mma_frag_a<KIND>(base, ldw, rows - 16 * h, kc, k1, lane, a);
                    gn_mma<KIND>(a, b, acc[q]);
                }
            }
        }
    }
}

static_assert(GN_SEQ_NR == GN_SEQ_KS, "after the slice dots, warp r finalizes row r of the task");

// count is zeroed before the launch and only grows: after step s's barrier it is (s + 1) * gridDim.x.
__device__ __forceinline__ void gn_grid_barrier(unsigned int* count, unsigned int target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();  // this block's writes (ordered by the bar.sync above) before the arrival
        atomicAdd(count, 1u);
        while (*(volatile unsigned int*)count < target) {
        }
        __threadfence();
    }
    __syncthreads();
}

// The shared memory of a loop block: the slice dots' partial sums and each warp's staged operand.
struct GnSeqFwdShared {
    float part[GN_SEQ_KS][GN_SEQ_NR][4][GN_SEQ_JB];
    float vs[GN_SEQ_KS][GN_SEQ_NR][GN_SEQ_CH];
};
struct GnSeqBwdShared {
    float part[GN_SEQ_KS][GN_SEQ_NR][GN_SEQ_JB];
    float vs[GN_SEQ_KS][GN_SEQ_NR][GN_SEQ_CH];
};

// Task `task` of step s of one forward loop: the warps' slice dots over [k0, k1) of H for all
// gates of the task's units, summed in slice order, then one warp per row applies the cell. Every
// thread of the block calls it with the same task (it synchronises the block).
__device__ __forceinline__ void gn_seq_fwd_task(const GnSeqFwd& a, int s, int task, int k0, int k1,
                                                GnSeqFwdShared& sh, int lane, int warp) {
    const int G = gn_gates(GN_MODE), H = a.H, B = a.B;
    const int nj = (H + GN_SEQ_JB - 1) / GN_SEQ_JB;
    const gn_index BH = (gn_index)B * H;
    int t = a.reverse ? a.T - 1 - s : s;
    gn_index p = a.reverse ? t + 1 : t;
    int jb = (task % nj) * GN_SEQ_JB, j = jb + lane, n0 = (task / nj) * GN_SEQ_NR;
    int nr = B - n0 < GN_SEQ_NR ? B - n0 : GN_SEQ_NR;
#if GN_MMA
    float acc[8][4] = {};
    if (gn_rows_live(a.len, n0, nr, t))
        gn_seq_dot_mma<GN_MMA_KIND>(a.hs + p * BH + (gn_index)n0 * H, H, nr, a.wt, H, jb, H - jb, H, G, k0, k1, acc,
                                    lane);
#pragma unroll
    for (int q = 0; q < 8; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int m, n;
            gn_mma_c_at(lane, e, &m, &n);
            sh.part[warp][n][q >> 1][16 * (q & 1) + m] = acc[q][e];
        }
#else
    float acc[GN_SEQ_NR][4] = {};
    // every lane stages (j may be past H in the last unit tile; its columns are not read);
    // a task whose rows have all ended skips the dot (the same test in every thread)
    if (gn_rows_live(a.len, n0, nr, t))
        gn_seq_dot_staged<GN_ROUND>(a.hs + p * BH + (gn_index)n0 * H, H, nr, a.wt, (gn_index)G * H, j < H ? j : 0, H,
                                    G, k0, k1, sh.vs[warp], acc, lane, 32);
#pragma unroll
    for (int r = 0; r < GN_SEQ_NR; ++r)
#pragma unroll
        for (int g = 0; g < 4; ++g) sh.part[warp][r][g][lane] = acc[r][g];
#endif
    __syncthreads();
    if (warp < nr && j < H) {
        float hh[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int q = 0; q < GN_SEQ_KS; ++q)
            for (int g = 0; g < 4; ++g) hh[g] += sh.part[q][warp][g][lane];
        gn_seq_fwd_cell(a, GN_MODE, t, n0 + warp, j, hh);
    }
    __syncthreads();
}

// Task `task` of step s of one backward loop (the forward's steps in reverse): the slice dots over
// [k0, k1) of G * H of the step processed before (none at s = 0), then the cell.
__device__ __forceinline__ void gn_seq_bwd_task(const GnSeqBwd& a, int s, int task, int k0, int k1,
                                                GnSeqBwdShared& sh, int lane, int warp) {
    const int H = a.H, B = a.B;
    const int nj = (H + GN_SEQ_JB - 1) / GN_SEQ_JB;
    int t = a.reverse ? s : a.T - 1 - s;
    gn_index tn = a.reverse ? t - 1 : t + 1;
    int jb = (task % nj) * GN_SEQ_JB, j = jb + lane, n0 = (task / nj) * GN_SEQ_NR;
    int nr = B - n0 < GN_SEQ_NR ? B - n0 : GN_SEQ_NR;
#if GN_MMA
    float acc[8][4] = {};
    if (s > 0 && gn_rows_live(a.len, n0, nr, tn))
        gn_seq_dot_mma<GN_MMA_KIND>(a.dgh + tn * a.sdg_t + n0 * a.sdg_n, a.sdg_n, nr, a.w, gn_gates(GN_MODE) * H, jb,
                                    H - jb, 0, 1, k0, k1, acc, lane);
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int m, n;
            gn_mma_c_at(lane, e, &m, &n);
            sh.part[warp][n][16 * q + m] = acc[q][e];
        }
#else
    float acc[GN_SEQ_NR][4] = {};
    if (s > 0 && gn_rows_live(a.len, n0, nr, tn))  // rows whose step tn ran (the others' dG are 0)
        gn_seq_dot_staged<GN_ROUND>(a.dgh + tn * a.sdg_t + n0 * a.sdg_n, a.sdg_n, nr, a.w, H, j < H ? j : 0, 0, 1, k0,
                                    k1, sh.vs[warp], acc, lane, 32);
#pragma unroll
    for (int r = 0; r < GN_SEQ_NR; ++r) sh.part[warp][r][lane] = acc[r][0];
#endif
    __syncthreads();
    if (warp < nr && j < H) {
        float dd = 0.0f;
        for (int q = 0; q < GN_SEQ_KS; ++q) dd += sh.part[q][warp][lane];
        gn_seq_bwd_cell(a, GN_MODE, t, n0 + warp, j, dd);
    }
    __syncthreads();
}

__device__ __forceinline__ int gn_seq_tasks(int B, int H) {
    return ((H + GN_SEQ_JB - 1) / GN_SEQ_JB) * ((B + GN_SEQ_NR - 1) / GN_SEQ_NR);
}

// The time loop of every loop kernel: per step s, the block's tasks of its NDIR directions (a's
// first, then b's; the same T, B and H), then the grid barrier. TASK runs one task of one step;
// K is the length of the dot whose slices the warps take (H forward, G * H backward).
template <int NDIR, class Args, class Shared, void (*TASK)(const Args&, int, int, int, int, Shared&, int, int)>
__device__ __forceinline__ void gn_seq_run(const Args& a, const Args& b, int K, Shared& sh, unsigned int* count) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, ntasks = gn_seq_tasks(a.B, a.H);
    int k0, k1;
    gn_seq_slice(K, warp, &k0, &k1);
    for (int s = 0; s < a.T; ++s) {
        for (int task = blockIdx.x; task < NDIR * ntasks; task += gridDim.x) {
            if (NDIR == 1 || task < ntasks)  // the same branch in every thread of the block
                TASK(a, s, task, k0, k1, sh, lane, warp);
            else
                TASK(b, s, task - ntasks, k0, k1, sh, lane, warp);
        }
        if (s + 1 < a.T) gn_grid_barrier(count, (unsigned int)(s + 1) * gridDim.x);
    }
}

extern "C" __global__ void __launch_bounds__(GN_SEQ_KS * 32, 2)
    rnn_seq_fwd(GN_SEQ_FWD_PARAMS) {
    GnSeqFwd a = GN_SEQ_FWD_STRUCT;
    __shared__ GnSeqFwdShared sh;
    gn_seq_run<1, GnSeqFwd, GnSeqFwdShared, gn_seq_fwd_task>(a, a, H, sh, count);
}

extern "C" __global__ void __launch_bounds__(GN_SEQ_KS * 32, 2)
    rnn_seq_bwd(GN_SEQ_BWD_PARAMS) {
    GnSeqBwd a = GN_SEQ_BWD_STRUCT;
    __shared__ GnSeqBwdShared sh;
    gn_seq_run<1, GnSeqBwd, GnSeqBwdShared, gn_seq_bwd_task>(a, a, gn_gates(GN_MODE) * H, sh, count);
}

// Both directions of a bidirectional layer in one launch: step s of the forward direction (t = s)
// and of the reverse one (t = T - 1 - s) between the same two barriers, the tasks of the forward
// direction first, then the reverse one's (f_ / r_: each direction's own arguments, the same T,
// B and H). Each task runs the one-direction kernel's arithmetic (the same task functions); the
// grid holds up to twice the blocks at the same depth, and a layer takes T barriers instead of 2T.
extern "C" __global__ void __launch_bounds__(GN_SEQ_KS * 32, 2)
    rnn_seq2_fwd(GN_SEQ2_FWD_PARAMS) {
    GnSeqFwd af = GN_SEQ_FWD_STRUCT_OF(f_), ar = GN_SEQ_FWD_STRUCT_OF(r_);
    __shared__ GnSeqFwdShared sh;
    gn_seq_run<2, GnSeqFwd, GnSeqFwdShared, gn_seq_fwd_task>(af, ar, f_H, sh, count);
}

extern "C" __global__ void __launch_bounds__(GN_SEQ_KS * 32, 2)
    rnn_seq2_bwd(GN_SEQ2_BWD_PARAMS) {
    GnSeqBwd af = GN_SEQ_BWD_STRUCT_OF(f_), ar = GN_SEQ_BWD_STRUCT_OF(r_);
    __shared__ GnSeqBwdShared sh;
    gn_seq_run<2, GnSeqBwd, GnSeqBwdShared, gn_seq_bwd_task>(af, ar, gn_gates(GN_MODE) * f_H, sh, count);
}
