// expert_gemm_mma.cu: the expert GEMMs for slots with many rows on any card from sm_80 on
// (the portable path): mma.sync m16n8k16 bf16 tensor cores, a MMA_STAGES-deep cp.async
// pipeline through shared memory, ldmatrix fragments. Includes expert_gemm.cuh.
// On Hopper the wgmma kernels (expert_gemm_wgmma.cu)
// replace these; they remain runnable there to cross-check.
//
// Grid (column blocks, item capacity), block MMA_THREADS (8 warps), MMA_SHARED_BYTES of
// dynamic shared memory (48 KB: no opt-in needed). blockIdx.y is a tiled item (slot e, rows
// row_begin..row_begin + rows, rows <= MMA_BM, from moe_expert_schedule); one CTA owns the
// output tile (the item's rows) x (MMA_BN weight rows) over the whole K: no split-K, no
// atomics. Warp w owns rows 64 (w & 1) .. + 64 of the tile and a quarter (w >> 1) of its
// weight rows: 4 x 4 MMA tiles of 16 x 8, 64 f32 accumulators per thread.
//
// Shared memory, per stage: A = MMA_BM item rows x MMA_BK (64 bytes a row), B = MMA_BN
// weight rows x MMA_BK; the four 16-byte chunks of a row are XOR-swizzled by (row >> 1) & 3
// so that the 8 row addresses of an ldmatrix fall in 8 different bank groups. Every thread
// copies 2 A and 2 B chunks per stage with cp.async (rows past the item read as zeros).
// Iteration kt waits for stage kt, then queues stage kt + MMA_STAGES - 1 into the buffer
// that iteration kt - 1 used (the barrier between them orders the reuse), then computes.
//
// moe_expert_up_mma    GEMM 1 + SwiGLU. The CTA's 128 weight rows are 64 gate rows n0..n0+64
//   (B rows 0..63) and the matching up rows I + n0.. (B rows 64..127); warp quarter wn
//   computes gate columns 16 wn .. + 16 (MMA tiles 0, 1) and the same up columns (tiles 2,
//   3), so gate and up of one act element sit in the same thread's registers:
//   a = bf16(silu(gate) * up), written as bf16 pairs. Grid x: I / 64. K = H.
// moe_expert_down_mma  GEMM 2: 128 down rows (output columns) n0..n0+128, warp quarter wn
//   owns 32 of them; y = w[r] * acc as f32 pairs. Grid x: H / 128. K = I.
//
// Order: each accumulator sums its k in ascending MMA_BK tiles, two k16 MMAs per tile in
// order: bit-identical run to run, and a row's result does not depend on the other rows of
// its tile.
//
// Bytes: weights read once per row tile of the slot (from L2 for every tile after the
// first when the slot's tiles run together: consecutive blockIdx.y), x / act rows once per
// column block; FLOPs 2 x 128 x 128 x K per CTA (rows past the item are zeros, computed
// but never stored). The docs/perf.md floors hold for the wgmma path; this one is the portable
// fallback, expected well below the Hopper peak (mma.sync issues from one warp at a time).
//
// Requirements (src/cuda/expert_gemm.rs): H % MMA_BK == 0, I % MMA_BK == 0, I % 64 == 0,
// H % 128 == 0, 16-byte aligned rows.

#include "expert_gemm.cuh"

#define MMA_BM 128
#define MMA_BN 128
#define MMA_BK 32
#define MMA_STAGES 3
#define MMA_THREADS 256
#define MMA_ROW_BYTES (MMA_BK * 2)
#define MMA_A_BYTES (MMA_BM * MMA_ROW_BYTES)
#define MMA_B_BYTES (MMA_BN * MMA_ROW_BYTES)
#define MMA_STAGE_BYTES (MMA_A_BYTES + MMA_B_BYTES)
#define MMA_SHARED_BYTES (MMA_STAGES * MMA_STAGE_BYTES)
#define MMA_CHUNKS_PER_ROW (MMA_ROW_BYTES / 16)

// Byte offset of 16-byte chunk c of tile row r in a stage buffer (see the header).
__device__ __forceinline__ u32 mma_tile_offset(u32 r, u32 c) {
    return r * MMA_ROW_BYTES + ((c ^ ((r >> 1) & 3u)) << 4);
}

// A stage's A rows come from a TileRows (expert_gemm.cuh) or a GatheredRows of this file's
// copy layout (MMA_A_CHUNKS rows per thread).
#define MMA_A_CHUNKS (MMA_BM * MMA_CHUNKS_PER_ROW / MMA_THREADS)
typedef GatheredRows<MMA_A_CHUNKS, MMA_THREADS, MMA_CHUNKS_PER_ROW> MmaGatheredRows;

// Queues the copies of one stage: A = item rows 0..MMA_BM (zeros from a_valid on) of `a`,
// B = weight rows (0..63 from b_lo, 64..127 from b_hi), k0..k0 + MMA_BK.
template <typename ARows>
__device__ __forceinline__ void mma_load_stage(u32 stage, const ARows& a, u32 a_valid, const u16* b_lo,
                                               const u16* b_hi, u64 ldb, u32 k0) {
#pragma unroll
    for (u32 i = 0; i < MMA_A_CHUNKS; ++i) {
        const u32 chunk = threadIdx.x + i * MMA_THREADS;
        const u32 r = chunk / MMA_CHUNKS_PER_ROW, c = chunk % MMA_CHUNKS_PER_ROW;
        const bool valid = r < a_valid;
        cp_async_16(stage + mma_tile_offset(r, c), a.chunk(i, r, c, k0, valid), valid ? 16u : 0u);
    }
#pragma unroll
    for (u32 i = 0; i < MMA_BN * MMA_CHUNKS_PER_ROW / MMA_THREADS; ++i) {
        const u32 chunk = threadIdx.x + i * MMA_THREADS;
        const u32 r = chunk / MMA_CHUNKS_PER_ROW, c = chunk % MMA_CHUNKS_PER_ROW;
        const u16* src = (r < MMA_BN / 2 ? b_lo + (u64)r * ldb : b_hi + (u64)(r - MMA_BN / 2) * ldb) + k0 + 8 * c;
        cp_async_16(stage + MMA_A_BYTES + mma_tile_offset(r, c), src, 16u);
    }
}

// acc[i][j] (warp rows 16 i.., MMA tile j) over the whole K. B rows of tiles 0, 1 start at
// `b_row0`, of tiles 2, 3 at `b_row2` (rows of the stage's B buffer).
template <typename ARows>
__device__ __forceinline__ void mma_mainloop(float acc[4][4][4], u32 smem, const ARows& a, u32 a_valid,
                                             const u16* b_lo, const u16* b_hi, u64 ldb, u32 k_len, u32 b_row0,
                                             u32 b_row2) {
    const u32 lane = threadIdx.x & 31u;
    const u32 warp_m = (threadIdx.x >> 5) & 1u;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

    const u32 k_tiles = k_len / MMA_BK;
#pragma unroll
    for (u32 s = 0; s < MMA_STAGES - 1; ++s) {
        if (s < k_tiles) mma_load_stage(smem + s * MMA_STAGE_BYTES, a, a_valid, b_lo, b_hi, ldb, s * MMA_BK);
        cp_async_commit();
    }
    for (u32 kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<MMA_STAGES - 2>();
        __syncthreads();
        const u32 next = kt + MMA_STAGES - 1;
        if (next < k_tiles) {
            mma_load_stage(smem + (next % MMA_STAGES) * MMA_STAGE_BYTES, a, a_valid, b_lo, b_hi, ldb, next * MMA_BK);
        }
        cp_async_commit();

        const u32 a_stage = smem + (kt % MMA_STAGES) * MMA_STAGE_BYTES;
        const u32 b_stage = a_stage + MMA_A_BYTES;
#pragma unroll
        for (u32 kk = 0; kk < MMA_BK / 16; ++kk) {
            u32 a[4][4];
#pragma unroll
            for (u32 i = 0; i < 4; ++i) {
                const u32 r = warp_m * 64 + i * 16 + (lane & 7u) + ((lane >> 3) & 1u) * 8;
                ldmatrix_x4(a[i], a_stage + mma_tile_offset(r, kk * 2 + (lane >> 4)));
            }
            u32 b[2][4];
#pragma unroll
            for (u32 p = 0; p < 2; ++p) {
                const u32 r = (p == 0 ? b_row0 : b_row2) + (lane & 7u) + ((lane >> 4) & 1u) * 8;
                ldmatrix_x4(b[p], b_stage + mma_tile_offset(r, kk * 2 + ((lane >> 3) & 1u)));
            }
#pragma unroll
            for (u32 i = 0; i < 4; ++i)
#pragma unroll
                for (u32 j = 0; j < 4; ++j) {
                    const u32* bj = &b[j >> 1][(j & 1u) * 2];
                    mma_16816(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], bj[0], bj[1]);
                }
        }
    }
}

// GEMM 1 + SwiGLU of this CTA's item, its rows from `a`.
template <typename ARows>
__device__ __forceinline__ void mma_up(u32 smem, const ARows& a, const u16* gate_up, GemmItem item, u32 hidden,
                                       u32 inter, u16* act) {
    const u32 n0 = blockIdx.x * (MMA_BN / 2);  // first act column of the CTA
    const u16* slot = gate_up + (u64)item.slot * 2 * inter * hidden;
    const u16* gate_rows = slot + (u64)n0 * hidden;
    const u16* up_rows = slot + (u64)(inter + n0) * hidden;
    const u32 warp_n = threadIdx.x >> 6;
    float acc[4][4][4];
    mma_mainloop(acc, smem, a, item.rows, gate_rows, up_rows, hidden, hidden, warp_n * 16, MMA_BN / 2 + warp_n * 16);

    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2, q = lane & 3u;
    const u32 warp_m = (threadIdx.x >> 5) & 1u;
#pragma unroll
    for (u32 i = 0; i < 4; ++i)
#pragma unroll
        for (u32 j = 0; j < 2; ++j)
#pragma unroll
            for (u32 h = 0; h < 2; ++h) {
                const u32 r = warp_m * 64 + i * 16 + g + 8 * h;
                if (r < item.rows) {
                    const u32 col = n0 + warp_n * 16 + j * 8 + 2 * q;
                    const float* gate = &acc[i][j][2 * h];
                    const float* up = &acc[i][j + 2][2 * h];
                    const u32 packed = pack_bf16x2(silu_mul(gate[0], up[0]), silu_mul(gate[1], up[1]));
                    *reinterpret_cast<u32*>(act + ((u64)item.row_begin + r) * inter + col) = packed;
                }
            }
}


extern "C" __global__ void __launch_bounds__(MMA_THREADS, 2)
    moe_expert_up_mma(const u16* __restrict__ x, const u16* __restrict__ gate_up, const GemmItem* __restrict__ items,
                      const u32* __restrict__ item_counts, u32 hidden, u32 inter, u16* __restrict__ act) {
    grid_dependency_sync();
    DECLARE_DYNAMIC_SMEM(smem_buffer, 128);
    if (blockIdx.y >= item_counts[COUNT_TILED]) return;
    const GemmItem item = items[blockIdx.y];
    const TileRows a{x + (u64)item.row_begin * hidden, hidden};
    mma_up(smem_u32(smem_buffer), a, gate_up, item, hidden, inter, act);
}

// moe_expert_up_mma_hidden: moe_expert_up_mma with the item's rows read from the bf16 hidden
// states [T, H] through row_pairs (the gather pass folded in; the same bits).
extern "C" __global__ void __launch_bounds__(MMA_THREADS, 2)
    moe_expert_up_mma_hidden(const u16* __restrict__ hidden_states, const u32* __restrict__ row_pairs,
                             u32 slots_per_token, const u16* __restrict__ gate_up, const GemmItem* __restrict__ items,
                             const u32* __restrict__ item_counts, u32 hidden, u32 inter, u16* __restrict__ act) {
    grid_dependency_sync();
    DECLARE_DYNAMIC_SMEM(smem_buffer, 128);
    if (blockIdx.y >= item_counts[COUNT_TILED]) return;
    const GemmItem item = items[blockIdx.y];
    const MmaGatheredRows a(hidden_states, row_pairs, slots_per_token, hidden, item);
    mma_up(smem_u32(smem_buffer), a, gate_up, item, hidden, inter, act);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 2)
    moe_expert_down_mma(const u16* __restrict__ act, const u16* __restrict__ down,
                        const float* __restrict__ row_weights, const GemmItem* __restrict__ items,
                        const u32* __restrict__ item_counts, u32 hidden, u32 inter, float* __restrict__ y) {
    grid_dependency_sync();
    DECLARE_DYNAMIC_SMEM(smem_buffer, 128);
    if (blockIdx.y >= item_counts[COUNT_TILED]) return;
    const GemmItem item = items[blockIdx.y];
    const u32 n0 = blockIdx.x * MMA_BN;  // first output column of the CTA
    const u16* down_rows = down + ((u64)item.slot * hidden + n0) * inter;
    const u16* act_rows = act + (u64)item.row_begin * inter;
    const u32 warp_n = threadIdx.x >> 6;
    float acc[4][4][4];
    const TileRows a{act_rows, inter};
    mma_mainloop(acc, smem_u32(smem_buffer), a, item.rows, down_rows, down_rows + (u64)(MMA_BN / 2) * inter, inter,
                 inter, warp_n * 32, warp_n * 32 + 16);

    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2, q = lane & 3u;
    const u32 warp_m = (threadIdx.x >> 5) & 1u;
#pragma unroll
    for (u32 i = 0; i < 4; ++i)
#pragma unroll
        for (u32 h = 0; h < 2; ++h) {
            const u32 r = warp_m * 64 + i * 16 + g + 8 * h;
            if (r < item.rows) {
                const u64 row = (u64)item.row_begin + r;
                const float w = row_weights[row];
#pragma unroll
                for (u32 j = 0; j < 4; ++j) {
                    const u32 col = n0 + warp_n * 32 + j * 8 + 2 * q;
                    const float2 v = make_float2(__fmul_rn(w, acc[i][j][2 * h]), __fmul_rn(w, acc[i][j][2 * h + 1]));
                    *reinterpret_cast<float2*>(y + row * hidden + col) = v;
                }
            }
        }
}
