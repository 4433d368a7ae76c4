// expert_gemm_stream.cu: the second-generation expert GEMMs for slots with few rows
// (decode) on Hopper (sm_90a only): the weights stream through a ring of shared-memory
// stages filled by TMA (with an L2 evict-first hint), so a CTA keeps STREAM_STAGES k-tiles
// of its weight rows in flight whatever the item's row count; the first generation
// (expert_gemm_decode.cu, every sm_80+ card) holds them in registers, DECODE_UNROLL steps
// deep for 8 or 16 rows but only one or two steps for 33-64. Same work items, grid, output
// columns per CTA and epilogues as the first generation. Includes expert_gemm.cuh and
// pipeline.cuh.
//
// Grid (column blocks, item capacity), block STREAM_THREADS: warps 0..3 compute, warp 4's
// lane 0 issues the loads. blockIdx.y is a decode item (rows <= 64), blockIdx.x a block of
// STREAM_W_ROWS weight rows:
//   moe_expert_up_stream    gate rows n0..n0 + 32 and up rows I + n0.. (n0 = 32 blockIdx.x):
//                           act columns n0..n0 + 32, SwiGLU fused. K = H.
//   moe_expert_down_stream  down rows n0..n0 + 64 (n0 = 64 blockIdx.x): output columns
//                           n0..n0 + 64, the routing weight fused. K = I.
// Stage s (1024-byte aligned): the weight rows as two TMA boxes of 32 rows x 64 k (8 KB,
// 128-byte swizzle), then the item's rows as NT boxes of 8 rows x 64 k (NT = 1, 2, 4, 8
// tiles of 8 rows for <= 8, 16, 32, 64 rows; rows past R read as zeros, rows past the item
// are the next slot's: computed and dropped). full[s]: the producer's arrive.expect_tx of
// the stage's bytes; empty[s]: one arrival per compute warp once it has read the stage into
// registers (ldmatrix), which needs no wait for an asynchronous unit.
//
// Compute warp w, lane l (g = l >> 2, q = l & 3), per k16 step: ldmatrix.x4 of its 16
// weight rows (the mma A operand: rows 0..7 are gate rows n0 + 8w + g / down rows n0 + 16w +
// g, rows 8..15 the up rows I + n0 + 8w + g / down rows n0 + 16w + 8 + g) and, per tile t,
// ldmatrix.x4 of the item rows 8t..8t+7 over two k16 steps (the mma B operand, tokens as its
// 8 columns), then mma.sync m16n8k16 per tile. So the accumulator fragment is the first
// generation's (c0 / c2 rows g / g + 8 of token 2q, c1 / c3 of token 2q + 1) and so are
// the epilogues.
//
// Determinism and batch invariance: every output element is one accumulator over k16 steps
// in ascending order, one mma per step; a token's B column depends on its row only, and
// the A fragment on the weight rows only: a row's result does not depend on NT, the other
// rows of its item, or the run.
//
// Bytes: as the first generation (every weight byte of a used slot read once, the item's
// rows once per CTA from L2). Requirements (src/cuda/expert_gemm.rs): H % 64, I % 64, I %
// 32 and H % 64 for the column blocks, 16-byte aligned rows, R >= 1, an sm_90a device.

#include "expert_gemm.cuh"
#include "pipeline.cuh"

#define STREAM_WARPS 4
#define STREAM_THREADS (STREAM_WARPS * 32 + 32)
#define STREAM_STAGES 4
#define STREAM_BK 64
#define STREAM_W_ROWS 64
#define STREAM_W_BOX_ROWS 32
#define STREAM_X_BOX_ROWS 8
#define STREAM_MAX_TILES 8
#define STREAM_W_BYTES (STREAM_W_ROWS * STREAM_BK * 2)
#define STREAM_X_BOX_BYTES (STREAM_X_BOX_ROWS * STREAM_BK * 2)
#define STREAM_STAGE_BYTES (STREAM_W_BYTES + STREAM_MAX_TILES * STREAM_X_BOX_BYTES)
#define STREAM_ALIGN 1024
#define STREAM_BARRIER_BYTES 64
#define STREAM_SHARED_BYTES (STREAM_STAGES * STREAM_STAGE_BYTES + STREAM_ALIGN + STREAM_BARRIER_BYTES)
#define STREAM_MIN_CTAS 3

// Byte offset of 16-byte chunk c of row r in a tile of 128-byte rows with the 128-byte
// swizzle (what the TMA boxes write; the tile 1024-byte aligned).
__device__ __forceinline__ u32 stream_offset(u32 r, u32 c) {
    return r * (STREAM_BK * 2) + ((c ^ (r & 7u)) << 4);
}

// The ring's mbarriers of stage s, after the stages: full[s], then empty[s].
__device__ __forceinline__ u32 stream_full(u32 smem, u32 s) {
    return smem + STREAM_STAGES * STREAM_STAGE_BYTES + 8 * s;
}
__device__ __forceinline__ u32 stream_empty(u32 smem, u32 s) {
    return stream_full(smem, STREAM_STAGES + s);
}

// The NT-tile dot products of one compute warp over the whole K, from the ring; releases
// every stage it reads. a_lo / a_hi: the warp's first A row of rows 0..7 / 8..15 in a
// stage's weight tile.
template <int NT>
__device__ __forceinline__ void stream_dot(float acc[NT][4], u32 smem, u32 k_tiles, u32 a_lo,
                                           u32 a_hi) {
    const u32 lane = threadIdx.x & 31u;
    const u32 m = lane >> 3;  // the ldmatrix matrix this lane addresses
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    // A: matrices (rows 0..7, k 0..7), (8..15, 0..7), (0..7, 8..15), (8..15, 8..15).
    const u32 a_row = ((m & 1u) ? a_hi : a_lo) + (lane & 7u);
    const u32 a_chunk = m >> 1;
    for (u32 kt = 0; kt < k_tiles; ++kt) {
        const u32 s = kt % STREAM_STAGES;
        const u32 stage = smem + s * STREAM_STAGE_BYTES;
        mbar_wait(stream_full(smem, s), (kt / STREAM_STAGES) & 1u);
#pragma unroll
        for (u32 kk = 0; kk < STREAM_BK / 16; kk += 2) {
            u32 a[2][4];
#pragma unroll
            for (u32 h = 0; h < 2; ++h) ldmatrix_x4(a[h], stage + stream_offset(a_row, 2 * (kk + h) + a_chunk));
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                // B: the tile's 8 rows, chunks 2 kk .. 2 kk + 3 (k16 steps kk and kk + 1).
                u32 b[4];
                ldmatrix_x4(b, stage + STREAM_W_BYTES + t * STREAM_X_BOX_BYTES + stream_offset(lane & 7u, 2 * kk + m));
                mma_16816(acc[t], a[0][0], a[0][1], a[0][2], a[0][3], b[0], b[1]);
                mma_16816(acc[t], a[1][0], a[1][1], a[1][2], a[1][3], b[2], b[3]);
            }
        }
        // Every lane's ldmatrix of the stage is done: it goes back to the producer.
        __syncwarp();
        if (lane == 0) mbar_arrive(stream_empty(smem, s));
    }
}

// The producer (lane 0 of the last warp): every k-tile's weight boxes (rows w_lo.. and
// w_hi.., evict-first) and the item's NT row boxes into the ring.
__device__ __forceinline__ void stream_produce(const TmaMap* x_map, const TmaMap* w_map, u32 smem, u32 k_tiles,
                                               u32 w_lo, u32 w_hi, u32 row_begin, u32 nt) {
    const u64 policy = l2_evict_first();
    const u32 bytes = STREAM_W_BYTES + nt * STREAM_X_BOX_BYTES;
    for (u32 kt = 0; kt < k_tiles; ++kt) {
        const u32 s = kt % STREAM_STAGES;
        const u32 stage = smem + s * STREAM_STAGE_BYTES;
        const u32 full = stream_full(smem, s);
        const int k0 = (int)(kt * STREAM_BK);
        mbar_wait(stream_empty(smem, s), ((kt / STREAM_STAGES) & 1u) ^ 1u);
        mbar_arrive_expect_tx(full, bytes);
        tma_load_2d_hint(stage, w_map, k0, (int)w_lo, full, policy);
        tma_load_2d_hint(stage + STREAM_W_BYTES / 2, w_map, k0, (int)w_hi, full, policy);
        for (u32 t = 0; t < nt; ++t) {
            tma_load_2d(stage + STREAM_W_BYTES + t * STREAM_X_BOX_BYTES, x_map, k0,
                        (int)(row_begin + t * STREAM_X_BOX_ROWS), full);
        }
    }
}

// The ring's mbarriers, initialised by thread 0 before any thread uses them.
__device__ __forceinline__ void stream_setup(u32 smem) {
    if (threadIdx.x == 0) {
        for (u32 s = 0; s < STREAM_STAGES; ++s) {
            mbar_init(stream_full(smem, s), 1);
            mbar_init(stream_empty(smem, s), STREAM_WARPS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();
}

// Tiles of 8 rows for an item of `rows` rows: 1, 2, 4 or 8.
__device__ __forceinline__ u32 stream_tiles(u32 rows) {
    return rows <= 8 ? 1u : rows <= 16 ? 2u : rows <= 32 ? 4u : 8u;
}

// The 1024-byte aligned start of the dynamic shared memory (STREAM_ALIGN bytes reserved).
__device__ __forceinline__ u32 stream_smem_base(const unsigned char* smem_buffer) {
    const u32 raw = smem_u32(smem_buffer);
    return (raw + STREAM_ALIGN - 1) & ~(u32)(STREAM_ALIGN - 1);
}

template <int NT>
__device__ __forceinline__ void up_stream_warp(u32 smem, u32 k_tiles, u16* act, u32 inter, GemmItem item,
                                               u32 n0) {
    const u32 warp = threadIdx.x >> 5, g = (threadIdx.x & 31u) >> 2;
    float acc[NT][4];
    // Rows 0..7: gate rows 8w.. of the tile (box 0); rows 8..15: the matching up rows (box 1).
    stream_dot<NT>(acc, smem, k_tiles, 8 * warp, STREAM_W_BOX_ROWS + 8 * warp);
    decode_store_act<NT>(acc, act, inter, item, n0 + 8 * warp + g);
}

template <int NT>
__device__ __forceinline__ void down_stream_warp(u32 smem, u32 k_tiles, const float* row_weights, float* y,
                                                 u32 hidden, GemmItem item, u32 n0) {
    const u32 warp = threadIdx.x >> 5, g = (threadIdx.x & 31u) >> 2;
    float acc[NT][4];
    stream_dot<NT>(acc, smem, k_tiles, 16 * warp, 16 * warp + 8);
    decode_store_rows<NT>(acc, row_weights, y, hidden, item, n0 + 16 * warp + g);
}

// One GEMM of the ring: GEMM 1 (UP: gate rows n0.. and up rows I + n0.., SwiGLU into act)
// or GEMM 2 (down rows n0..n0 + 64, the routing weight into y).
template <bool UP>
__device__ __forceinline__ void stream_gemm(const TmaMap* x_map, const TmaMap* w_map,
                                            const GemmItem* __restrict__ items,
                                            const u32* __restrict__ item_counts, u32 hidden, u32 inter,
                                            const float* __restrict__ row_weights, u16* __restrict__ act,
                                            float* __restrict__ y) {
    DECLARE_DYNAMIC_SMEM(smem_buffer, 128);
    if (blockIdx.y >= item_counts[COUNT_DECODE]) return;
    const GemmItem item = items[blockIdx.y];
    const u32 smem = stream_smem_base(smem_buffer);
    stream_setup(smem);
    const u32 k_tiles = (UP ? hidden : inter) / STREAM_BK;
    const u32 n0 = blockIdx.x * (UP ? STREAM_W_ROWS / 2 : STREAM_W_ROWS);
    const u32 nt = stream_tiles(item.rows);
    if ((threadIdx.x >> 5) == STREAM_WARPS) {
        if ((threadIdx.x & 31u) == 0) {
            const u32 w_lo = item.slot * (UP ? 2 * inter : hidden) + n0;
            stream_produce(x_map, w_map, smem, k_tiles, w_lo,
                           w_lo + (UP ? inter : STREAM_W_BOX_ROWS), item.row_begin, nt);
        }
        return;
    }
    if (UP) {
        if (nt == 1) {
            up_stream_warp<1>(smem, k_tiles, act, inter, item, n0);
        } else if (nt == 2) {
            up_stream_warp<2>(smem, k_tiles, act, inter, item, n0);
        } else if (nt == 4) {
            up_stream_warp<4>(smem, k_tiles, act, inter, item, n0);
        } else {
            up_stream_warp<8>(smem, k_tiles, act, inter, item, n0);
        }
    } else {
        if (nt == 1) {
            down_stream_warp<1>(smem, k_tiles, row_weights, y, hidden, item, n0);
        } else if (nt == 2) {
            down_stream_warp<2>(smem, k_tiles, row_weights, y, hidden, item, n0);
        } else if (nt == 4) {
            down_stream_warp<4>(smem, k_tiles, row_weights, y, hidden, item, n0);
        } else {
            down_stream_warp<8>(smem, k_tiles, row_weights, y, hidden, item, n0);
        }
    }
}

extern "C" __global__ void __launch_bounds__(STREAM_THREADS, STREAM_MIN_CTAS)
    moe_expert_up_stream(const __grid_constant__ TmaMap x_map, const __grid_constant__ TmaMap gate_up_map,
                         const GemmItem* __restrict__ items, const u32* __restrict__ item_counts, u32 hidden,
                         u32 inter, u16* __restrict__ act) {
    grid_dependency_sync();
    stream_gemm<true>(&x_map, &gate_up_map, items, item_counts, hidden, inter, nullptr, act, nullptr);
}

extern "C" __global__ void __launch_bounds__(STREAM_THREADS, STREAM_MIN_CTAS)
    moe_expert_down_stream(const __grid_constant__ TmaMap act_map, const __grid_constant__ TmaMap down_map,
                           const float* __restrict__ row_weights, const GemmItem* __restrict__ items,
                           const u32* __restrict__ item_counts, u32 hidden, u32 inter, float* __restrict__ y) {
    grid_dependency_sync();
    stream_gemm<false>(&act_map, &down_map, items, item_counts, hidden, inter, row_weights, nullptr, y);
}
