// expert_gemm_wgmma.cu: the expert GEMMs for slots with many rows on Hopper (sm_90a only):
// wgmma.mma_async m64n256k16 bf16 -> f32, both operands from shared memory through matrix
// descriptors (128-byte swizzle, K-major), fed by a WG_STAGES-deep cp.async pipeline.
// Includes expert_gemm.cuh; for sm_90a only (wgmma needs
// the architecture-specific target).
//
// Grid (column blocks, item capacity), block WG_THREADS = 2 warpgroups, WG_SHARED_BYTES of
// dynamic shared memory (opt-in above 48 KB; src/cuda/expert_gemm.rs sets the attribute).
// blockIdx.y is a tiled item (slot e, rows row_begin..row_begin + rows, rows <= WG_BM);
// one CTA owns the output tile (the item's rows) x (WG_BN weight rows) over the whole K: no
// split-K, no atomics. Warpgroup wg owns tile rows 64 wg .. 64 wg + 63 and all WG_BN
// columns: one m64n256k16 per k16 step, 128 f32 accumulators per thread. All 256 threads
// also copy: 4 A chunks and 8 B chunks of 16 bytes per stage.
//
// Shared memory, per stage: A = WG_BM rows x WG_BK (128 bytes a row), B = WG_BN rows x WG_BK.
// Both in the canonical K-major 128-byte-swizzle layout of wgmma: row r at r * 128 bytes,
// its 16-byte chunk c at chunk c ^ (r & 7), every buffer 1024-byte aligned (the swizzle
// works on address bits 4..6 ^ 7..9). Descriptor: start address, stride byte offset 1024
// (8 rows), leading byte offset unused (1), swizzle mode 1 (128 B); the k16 step kk within
// the 64-wide stage advances the start address by 32 kk bytes, as CUTLASS and DeepGEMM do.
//
// Pipeline, iteration kt: wait for this thread's copies of stage kt (cp.async.wait_group),
// fence.proxy.async (cp.async writes are generic-proxy writes, wgmma reads through the
// async proxy), barrier; queue the copies of stage kt + WG_STAGES - 1 into the buffer of
// stage kt - 1 (every warpgroup finished reading it: it waited for its wgmmas before the
// barrier); then 4 wgmmas on stage kt, commit, wait for them. So copies run WG_STAGES - 1
// stages ahead of the tensor cores; the wgmmas of one stage do not overlap those of the
// next (a simple, provably ordered pipeline; a producer warpgroup with TMA and mbarriers
// would overlap them, at the cost of much more code).
//
// Accumulator fragment of m64nNk16 (thread t of a warpgroup, warp w = t / 32, g = (t % 32)
// / 4, q = t % 4): d[4j + 2h + v] = D[16 w + g + 8 h][8 j + 2 q + v], j < N / 8, h, v < 2.
//
// moe_expert_up_wgmma    GEMM 1 + SwiGLU. B rows 0..127 are gate rows n0..n0+128, rows
//   128..255 the up rows I + n0..; so d[4j + i] (gate, j < 16) and d[4 (j + 16) + i] (up)
//   are the same act element in the same thread: a = bf16(silu(gate) * up), stored as
//   bf16 pairs. Grid x: I / 128. K = H.
// moe_expert_down_wgmma  GEMM 2: 256 down rows (output columns) n0..n0+256; y = w[r] *
//   acc, f32 pairs. Grid x: H / 256. K = I.
//
// Order: each accumulator sums its k in ascending stages, k16 steps in order inside a
// stage: bit-identical run to run; a row's result does not depend on the other rows.
//
// Bytes and FLOPs for dots.llm1 at T tokens (R = 8 T rows, c = rows of a slot): GEMM 1 of
// a slot reads its 23.1 MB of gate/up weights once per 128-row tile (from L2 after the
// first when its tiles run together: consecutive blockIdx.y), its x rows once per column
// block (11 blocks); FLOPs 2 x 128 x 256 x H per CTA (GEMM 2: 2 x 128 x 256 x I). Per
// token the two GEMMs do 2 x 8 slots x 3 x H x I = 277 M FLOPs (GEMM 1 185 M, GEMM 2 92 M).
// At T = 16384 (c = 768 routed, 16384 shared: whole 128-row tiles under even routing;
// uneven routing pads each routed slot by at most 127 rows, under 12.5% of R) that is
// 4.54 TFLOP per layer, floor 5.74 ms at 790 TFLOP/s; the target is 60% of that peak.
//
// Requirements (src/cuda/expert_gemm.rs): H % WG_BK == 0, I % WG_BK == 0, I % 128 == 0,
// H % 256 == 0, 16-byte aligned rows, an sm_90a device.

#include "expert_gemm.cuh"
#include "wgmma.cuh"

#define WG_BM 128
#define WG_BN 256
#define WG_BK 64
#define WG_STAGES 4
#define WG_THREADS 256
#define WG_ROW_BYTES (WG_BK * 2)
#define WG_A_BYTES (WG_BM * WG_ROW_BYTES)
#define WG_B_BYTES (WG_BN * WG_ROW_BYTES)
#define WG_STAGE_BYTES (WG_A_BYTES + WG_B_BYTES)
#define WG_ALIGN 1024
#define WG_SHARED_BYTES (WG_STAGES * WG_STAGE_BYTES + WG_ALIGN)
#define WG_CHUNKS_PER_ROW (WG_ROW_BYTES / 16)
#define WG_ACC 128  // f32 accumulators per thread: 64 x 256 / 128 threads

// Byte offset of 16-byte chunk c of tile row r: the 128-byte swizzle (see the header).
__device__ __forceinline__ u32 wg_tile_offset(u32 r, u32 c) {
    return r * WG_ROW_BYTES + ((c ^ (r & 7u)) << 4);
}


// A stage's A rows come from a TileRows (expert_gemm.cuh) or a GatheredRows of this file's
// copy layout (WG_A_CHUNKS rows per thread).
#define WG_A_CHUNKS (WG_BM * WG_CHUNKS_PER_ROW / WG_THREADS)
typedef GatheredRows<WG_A_CHUNKS, WG_THREADS, WG_CHUNKS_PER_ROW> WgGatheredRows;

// Queues the copies of one stage: A = item rows 0..WG_BM (zeros from a_valid on) of `a`,
// B = weight rows (0..127 from b_lo, 128..255 from b_hi), k0..k0 + WG_BK.
template <typename ARows>
__device__ __forceinline__ void wg_load_stage(u32 stage, const ARows& a, u32 a_valid, const u16* b_lo,
                                              const u16* b_hi, u64 ldb, u32 k0) {
#pragma unroll
    for (u32 i = 0; i < WG_A_CHUNKS; ++i) {
        const u32 chunk = threadIdx.x + i * WG_THREADS;
        const u32 r = chunk / WG_CHUNKS_PER_ROW, c = chunk % WG_CHUNKS_PER_ROW;
        const bool valid = r < a_valid;
        cp_async_16(stage + wg_tile_offset(r, c), a.chunk(i, r, c, k0, valid), valid ? 16u : 0u);
    }
#pragma unroll
    for (u32 i = 0; i < WG_BN * WG_CHUNKS_PER_ROW / WG_THREADS; ++i) {
        const u32 chunk = threadIdx.x + i * WG_THREADS;
        const u32 r = chunk / WG_CHUNKS_PER_ROW, c = chunk % WG_CHUNKS_PER_ROW;
        const u16* src = (r < WG_BN / 2 ? b_lo + (u64)r * ldb : b_hi + (u64)(r - WG_BN / 2) * ldb) + k0 + 8 * c;
        cp_async_16(stage + WG_A_BYTES + wg_tile_offset(r, c), src, 16u);
    }
}

// acc (this warpgroup's 64 rows x 256 columns) over the whole K.
template <typename ARows>
__device__ __forceinline__ void wg_mainloop(float acc[WG_ACC], u32 smem, const ARows& a, u32 a_valid,
                                            const u16* b_lo, const u16* b_hi, u64 ldb, u32 k_len) {
    const u32 warpgroup = threadIdx.x >> 7;
#pragma unroll
    for (int i = 0; i < WG_ACC; ++i) acc[i] = 0.0f;

    const u32 k_tiles = k_len / WG_BK;
#pragma unroll
    for (u32 s = 0; s < WG_STAGES - 1; ++s) {
        if (s < k_tiles) wg_load_stage(smem + s * WG_STAGE_BYTES, a, a_valid, b_lo, b_hi, ldb, s * WG_BK);
        cp_async_commit();
    }
    for (u32 kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<WG_STAGES - 2>();
        fence_proxy_async_shared();
        __syncthreads();
        const u32 next = kt + WG_STAGES - 1;
        if (next < k_tiles) {
            wg_load_stage(smem + (next % WG_STAGES) * WG_STAGE_BYTES, a, a_valid, b_lo, b_hi, ldb, next * WG_BK);
        }
        cp_async_commit();

        const u32 a_stage = smem + (kt % WG_STAGES) * WG_STAGE_BYTES;
        const u64 desc_a = wgmma_desc(a_stage + warpgroup * 64 * WG_ROW_BYTES);
        const u64 desc_b = wgmma_desc(a_stage + WG_A_BYTES);
        fence_accumulators(acc);
        wgmma_fence();
#pragma unroll
        for (u32 kk = 0; kk < WG_BK / 16; ++kk) {
            // 16 k elements are 32 bytes: 2 in the descriptor's 16-byte address units.
            wgmma_m64n256k16(acc, desc_a + 2 * kk, desc_b + 2 * kk);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_accumulators(acc);
    }
}

// The 1024-byte aligned start of the dynamic shared memory (WG_ALIGN bytes are reserved).
__device__ __forceinline__ u32 wg_smem_base(const unsigned char* smem_buffer) {
    const u32 raw = smem_u32(smem_buffer);
    return (raw + WG_ALIGN - 1) & ~(u32)(WG_ALIGN - 1);
}

// GEMM 1 + SwiGLU of this CTA's item, its rows from `a`.
template <typename ARows>
__device__ __forceinline__ void wg_up(u32 smem, const ARows& a, const u16* gate_up, GemmItem item, u32 hidden,
                                      u32 inter, u16* act) {
    const u32 n0 = blockIdx.x * (WG_BN / 2);  // first act column of the CTA
    const u16* slot = gate_up + (u64)item.slot * 2 * inter * hidden;
    float acc[WG_ACC];
    wg_mainloop(acc, smem, a, item.rows, slot + (u64)n0 * hidden, slot + (u64)(inter + n0) * hidden, hidden, hidden);

    const u32 t = threadIdx.x & 127u;
    const u32 g = (t & 31u) >> 2, q = t & 3u;
    const u32 row0 = (threadIdx.x >> 7) * 64 + (t >> 5) * 16 + g;
#pragma unroll
    for (u32 h = 0; h < 2; ++h) {
        const u32 r = row0 + 8 * h;
        if (r < item.rows) {
            u16* dst = act + ((u64)item.row_begin + r) * inter + n0 + 2 * q;
#pragma unroll
            for (u32 j = 0; j < WG_BN / 16; ++j) {
                const float* gate = &acc[4 * j + 2 * h];
                const float* up = &acc[4 * (j + WG_BN / 16) + 2 * h];
                *reinterpret_cast<u32*>(dst + 8 * j) = pack_bf16x2(silu_mul(gate[0], up[0]), silu_mul(gate[1], up[1]));
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    moe_expert_up_wgmma(const u16* __restrict__ x, const u16* __restrict__ gate_up,
                        const GemmItem* __restrict__ items, const u32* __restrict__ item_counts, u32 hidden,
                        u32 inter, u16* __restrict__ act) {
    grid_dependency_sync();
    DECLARE_DYNAMIC_SMEM(smem_buffer, 128);
    if (blockIdx.y >= item_counts[COUNT_TILED]) return;
    const GemmItem item = items[blockIdx.y];
    const TileRows a{x + (u64)item.row_begin * hidden, hidden};
    wg_up(wg_smem_base(smem_buffer), a, gate_up, item, hidden, inter, act);
}

// moe_expert_up_wgmma_hidden: moe_expert_up_wgmma with the item's rows read from the bf16
// hidden states [T, H] through row_pairs (the gather pass folded in; the same bits).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    moe_expert_up_wgmma_hidden(const u16* __restrict__ hidden_states, const u32* __restrict__ row_pairs,
                               u32 slots_per_token, const u16* __restrict__ gate_up,
                               const GemmItem* __restrict__ items, const u32* __restrict__ item_counts, u32 hidden,
                               u32 inter, u16* __restrict__ act) {
    grid_dependency_sync();
    DECLARE_DYNAMIC_SMEM(smem_buffer, 128);
    if (blockIdx.y >= item_counts[COUNT_TILED]) return;
    const GemmItem item = items[blockIdx.y];
    const WgGatheredRows a(hidden_states, row_pairs, slots_per_token, hidden, item);
    wg_up(wg_smem_base(smem_buffer), a, gate_up, item, hidden, inter, act);
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
    moe_expert_down_wgmma(const u16* __restrict__ act, const u16* __restrict__ down,
                          const float* __restrict__ row_weights, const GemmItem* __restrict__ items,
                          const u32* __restrict__ item_counts, u32 hidden, u32 inter, float* __restrict__ y) {
    grid_dependency_sync();
    DECLARE_DYNAMIC_SMEM(smem_buffer, 128);
    if (blockIdx.y >= item_counts[COUNT_TILED]) return;
    const GemmItem item = items[blockIdx.y];
    const u32 n0 = blockIdx.x * WG_BN;  // first output column of the CTA
    const u16* down_rows = down + ((u64)item.slot * hidden + n0) * inter;
    float acc[WG_ACC];
    const TileRows a{act + (u64)item.row_begin * inter, inter};
    wg_mainloop(acc, wg_smem_base(smem_buffer), a, item.rows, down_rows, down_rows + (u64)(WG_BN / 2) * inter, inter,
                inter);

    const u32 t = threadIdx.x & 127u;
    const u32 g = (t & 31u) >> 2, q = t & 3u;
    const u32 row0 = (threadIdx.x >> 7) * 64 + (t >> 5) * 16 + g;
#pragma unroll
    for (u32 h = 0; h < 2; ++h) {
        const u32 r = row0 + 8 * h;
        if (r < item.rows) {
            const u64 row = (u64)item.row_begin + r;
            const float w = row_weights[row];
            float* dst = y + row * hidden + n0 + 2 * q;
#pragma unroll
            for (u32 j = 0; j < WG_BN / 8; ++j) {
                const float2 v = make_float2(__fmul_rn(w, acc[4 * j + 2 * h]), __fmul_rn(w, acc[4 * j + 2 * h + 1]));
                *reinterpret_cast<float2*>(dst + 8 * j) = v;
            }
        }
    }
}
