// expert_gemm_decode.cu: the expert GEMMs for slots with few rows (decode): every weight
// byte of a used slot is streamed from memory exactly once, with the tokens as the narrow
// dimension ("swap A and B": weights are the 16-row A operand of mma.sync m16n8k16, the
// item's rows are its 8-column B operand). sm_80 and later (portable). Includes
// expert_gemm.cuh.
//
// Grid (column blocks, item capacity), block DECODE_THREADS (4 warps), no shared memory.
// blockIdx.y picks a decode item (slot e, rows row_begin..row_begin + rows, rows <= 64,
// written by moe_expert_schedule); blockIdx.x a block of weight rows. Each warp owns 16
// weight rows and the item's rows, whole K, no other warp's data: no barrier, no shared
// memory, no atomics. The weight rows are split over (column blocks x items) CTAs, so one
// token alone still spreads its experts' weights over the whole GPU (T = 1: 8 slots x 44
// CTAs for GEMM 1, 8 x 64 for GEMM 2).
//
// One warp, lane l (g = l >> 2, q = l & 3), k step of 32: lane l loads 16 bytes (8 bf16,
// k0 + 8q .. k0 + 8q + 7) of weight row g and of weight row g + 8, and 16 bytes of the
// same k range of item row 8t + g for each tile t of 8 rows. Because a dot product may sum
// its k in any assignment to mma positions as long as A and B agree, these 8 elements feed
// two m16n8k16 MMAs: the first takes elements 0..3 (mma k positions 2q, 2q+1, 2q+8, 2q+9),
// the second elements 4..7. Every load is a full 16-byte vector, 4 lanes read 64
// contiguous bytes of a row; nothing is staged through shared memory.
//
// moe_expert_up_decode    GEMM 1 + SwiGLU. Warp rows: g -> gate row n0 + g, g + 8 -> up row
//   n0 + g, so accumulator c[0] (gate, row 2q) and c[2] (up, row 2q) meet in one lane:
//   a[r][n0 + g] = bf16(silu(c0) * c2) for r = 8t + 2q, and c1/c3 for r + 1. A CTA owns 4 x
//   8 = 32 act columns (I / 32 column blocks). K = H.
// moe_expert_down_decode  GEMM 2, routing weight in the epilogue. Warp rows: down rows
//   n0 + g and n0 + g + 8; y[r][n] = w[r] * c (f32). A CTA owns 64 output columns (H / 64
//   column blocks). K = I.
//
// Tile size follows the item's rows: NT = 1, 2, 4 or 8 tiles of 8 rows (<= 8, 16, 32, 64
// rows), so T = 1 pads 1 row to 8 in the tensor cores only, never in memory traffic.
//
// Determinism and batch invariance: every output element is one accumulator, summed over
// k steps in ascending order, two MMAs per step in a fixed order; the weight fragment is
// the same whatever NT, and an item row's B fragment depends only on that row. So a row's
// result does not depend on the other rows of its item, on NT, or on the run.
//
// Bytes per used slot (dots.llm1, H 4096, I 1408): GEMM 1 reads 2 I H x 2 = 23.1 MB of
// weights once + the item's x rows once per CTA (L2), writes 2 I per row; GEMM 2 reads
// H I x 2 = 11.5 MB once + activations, writes 4 H per row. FLOPs 6 H I per row (x 2 for
// padding to 8). Floor (docs/perf.md): 34.6 MB per used slot at 4.3 TB/s, 8.0 us per slot.
//
// Requirements (checked by src/cuda/expert_gemm.rs): K % (DECODE_K_STEP * DECODE_UNROLL)
// == 0 for both GEMMs (H % 128, I % 128), I % 32 and H % 64 for the column blocks,
// 16-byte aligned rows.

#include "expert_gemm.cuh"

#define DECODE_WARPS 4
#define DECODE_THREADS (DECODE_WARPS * 32)
#define DECODE_K_STEP 32  // k per step: 4 lanes x 8 elements
#define DECODE_UNROLL 4   // steps whose weight loads are in flight together (x2 double buffer)
#define DECODE_MIN_CTAS 4  // CTAs per SM the register budget must allow (<= 128 registers)
#define DECODE_UP_COLUMNS (DECODE_WARPS * 8)     // act columns per CTA (GEMM 1)
#define DECODE_DOWN_COLUMNS (DECODE_WARPS * 16)  // output columns per CTA (GEMM 2)

// The weight fragments of U consecutive k steps: rows g and g + 8.
template <int U>
struct WeightSteps {
    uint4 lo[U];
    uint4 hi[U];
};

template <int U>
__device__ __forceinline__ void load_weight_steps(WeightSteps<U>& w, const uint4* row_lo, const uint4* row_hi,
                                                  u32 step) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        w.lo[u] = load_stream_16(row_lo + (step + u) * (DECODE_K_STEP / 8));
        w.hi[u] = load_stream_16(row_hi + (step + u) * (DECODE_K_STEP / 8));
    }
}

// acc[t] += W (16 rows: row_lo = this lane's row g of rows 0..7, row_hi = its row g + 8) x
// B (item rows 8t..8t+7), over the whole K. `rows_b` points at item row g (the lane's row in
// tile 0); tile t is `8 * t * ldb` elements further; rows >= rows_valid read as zero. All
// three pointers are at column 0: the lane's 8-element column offset 8q is added here. The weight loads of
// the next U steps are issued before the MMAs of the current U steps (double buffer in
// registers): U = DECODE_UNROLL steps for 1 or 2 tiles, half as many for 4 tiles and a
// quarter for 8, which keeps every NT within DECODE_MIN_CTAS' register budget (no spills).
template <int NT>
__device__ __forceinline__ void decode_dot(float acc[NT][4], const u16* row_lo, const u16* row_hi, const u16* rows_b,
                                           u64 ldb, u32 k_len, u32 rows_valid) {
    constexpr int U = NT >= 8 ? DECODE_UNROLL / 4 : NT >= 4 ? DECODE_UNROLL / 2 : DECODE_UNROLL;
    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2;
    const uint4* a_lo = reinterpret_cast<const uint4*>(row_lo) + (lane & 3u);
    const uint4* a_hi = reinterpret_cast<const uint4*>(row_hi) + (lane & 3u);
    const uint4* b_base = reinterpret_cast<const uint4*>(rows_b) + (lane & 3u);
    const u64 b_tile = ldb;  // 8 rows of ldb elements, in 16-byte units
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    }
    const u32 steps = k_len / DECODE_K_STEP;
    WeightSteps<U> cur, next;
    load_weight_steps<U>(cur, a_lo, a_hi, 0);
    for (u32 step = 0; step < steps; step += U) {
        if (step + U < steps) load_weight_steps<U>(next, a_lo, a_hi, step + U);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint4 wl = cur.lo[u];
            const uint4 wh = cur.hi[u];
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                uint4 b = make_uint4(0u, 0u, 0u, 0u);
                if ((u32)(8 * t) + g < rows_valid) {
                    b = load_shared_16(b_base + (u64)t * b_tile + (step + u) * (DECODE_K_STEP / 8));
                }
                mma_16816(acc[t], wl.x, wh.x, wl.y, wh.y, b.x, b.y);
                mma_16816(acc[t], wl.z, wh.z, wl.w, wh.w, b.z, b.w);
            }
        }
        if (step + U < steps) cur = next;
    }
}

// GEMM 1 for one warp: act columns n0..n0+8 of the item, NT tiles of 8 rows.
template <int NT>
__device__ __forceinline__ void up_decode_warp(const u16* gate_up_slot, const u16* x, u16* act, u32 hidden, u32 inter,
                                               GemmItem item, u32 n0) {
    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2;
    const u16* gate_row = gate_up_slot + (u64)(n0 + g) * hidden;
    const u16* up_row = gate_up_slot + (u64)(inter + n0 + g) * hidden;
    const u16* rows_b = x + ((u64)item.row_begin + g) * hidden;
    float acc[NT][4];
    decode_dot<NT>(acc, gate_row, up_row, rows_b, hidden, hidden, item.rows);
    decode_store_act<NT>(acc, act, inter, item, n0 + g);
}

// GEMM 2 for one warp: output columns n0..n0+16 of the item, NT tiles of 8 rows.
template <int NT>
__device__ __forceinline__ void down_decode_warp(const u16* down_slot, const u16* act, const float* row_weights,
                                                 float* y, u32 hidden, u32 inter, GemmItem item, u32 n0) {
    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2;
    const u16* row_lo = down_slot + (u64)(n0 + g) * inter;
    const u16* row_hi = down_slot + (u64)(n0 + g + 8) * inter;
    const u16* rows_b = act + ((u64)item.row_begin + g) * inter;
    float acc[NT][4];
    decode_dot<NT>(acc, row_lo, row_hi, rows_b, inter, inter, item.rows);
    decode_store_rows<NT>(acc, row_weights, y, hidden, item, n0 + g);
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS, DECODE_MIN_CTAS)
    moe_expert_up_decode(const u16* __restrict__ x, const u16* __restrict__ gate_up,
                         const GemmItem* __restrict__ items, const u32* __restrict__ item_counts, u32 hidden,
                         u32 inter, u16* __restrict__ act) {
    grid_dependency_sync();
    if (blockIdx.y >= item_counts[COUNT_DECODE]) return;
    const GemmItem item = items[blockIdx.y];
    const u32 n0 = blockIdx.x * DECODE_UP_COLUMNS + (threadIdx.x >> 5) * 8;
    const u16* slot = gate_up + (u64)item.slot * 2 * inter * hidden;
    if (item.rows <= 8) {
        up_decode_warp<1>(slot, x, act, hidden, inter, item, n0);
    } else if (item.rows <= 16) {
        up_decode_warp<2>(slot, x, act, hidden, inter, item, n0);
    } else if (item.rows <= 32) {
        up_decode_warp<4>(slot, x, act, hidden, inter, item, n0);
    } else {
        up_decode_warp<8>(slot, x, act, hidden, inter, item, n0);
    }
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS, DECODE_MIN_CTAS)
    moe_expert_down_decode(const u16* __restrict__ act, const u16* __restrict__ down,
                           const float* __restrict__ row_weights, const GemmItem* __restrict__ items,
                           const u32* __restrict__ item_counts, u32 hidden, u32 inter, float* __restrict__ y) {
    grid_dependency_sync();
    if (blockIdx.y >= item_counts[COUNT_DECODE]) return;
    const GemmItem item = items[blockIdx.y];
    const u32 n0 = blockIdx.x * DECODE_DOWN_COLUMNS + (threadIdx.x >> 5) * 16;
    const u16* slot = down + (u64)item.slot * hidden * inter;
    if (item.rows <= 8) {
        down_decode_warp<1>(slot, act, row_weights, y, hidden, inter, item, n0);
    } else if (item.rows <= 16) {
        down_decode_warp<2>(slot, act, row_weights, y, hidden, inter, item, n0);
    } else if (item.rows <= 32) {
        down_decode_warp<4>(slot, act, row_weights, y, hidden, inter, item, n0);
    } else {
        down_decode_warp<8>(slot, act, row_weights, y, hidden, inter, item, n0);
    }
}
