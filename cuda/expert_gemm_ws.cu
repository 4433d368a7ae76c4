// expert_gemm_ws.cu: the second-generation expert GEMMs for slots with many rows on Hopper
// (sm_90a only): warp-specialised, a TMA producer feeding two wgmma consumer warpgroups
// through a ring of shared-memory stages, on a persistent grid. The same contract, work
// items and epilogues as expert_gemm_wgmma.cu (the first generation, kept as the fallback
// and the cross-check); includes expert_gemm.cuh and pipeline.cuh.
//
// Grid WS_CTAS CTAs (persistent; fewer when there are fewer tiles), block WS_THREADS = 3
// warpgroups, WS_SHARED_BYTES of dynamic shared memory. A tile is (work item, column
// block): the item's rows (at most WS_BM) x WS_BN weight rows over the whole K; tile t runs
// on CTA t % WS_CTAS, in ascending t (item-major: the m-tiles of one slot and one column
// block run in the same wave and share the weight tile through L2). The number of items
// is read on the device (item_counts[COUNT_TILED]).
//
// Warpgroup 0, the producer, gives its registers back (setmaxnreg.dec to WS_PRODUCER_REGS)
// and one thread of it issues the TMA loads (cp.async.bulk.tensor.2d, 128-byte swizzle)
// for every k-tile of every tile of the CTA, into stage (k-tile count) % WS_STAGES:
//   A  the item's rows from the gathered rows [R, K] (x or act), as two boxes of 64 rows x
//      64 k; the second only when the item has more than 64 rows (a remainder of 1..64
//      rows loads and multiplies one 64-row half, not 128). Rows past R read as zeros (the
//      tensor map's bound); rows past the item (the next slot's) are computed and dropped.
//   B  WS_BN weight rows as two boxes of 128 rows x 64 k (GEMM 1: the gate rows n0.. and
//      the up rows I + n0..; GEMM 2: the down rows n0..n0 + 256).
// Warpgroups 1 and 2, the consumers, take more registers (setmaxnreg.inc to
// WS_CONSUMER_REGS); consumer c owns tile rows 64 c .. 64 c + 63 and all WS_BN columns:
// one m64n256k16 per k16 step, 128 f32 accumulators per thread, as in the first generation.
//
// The ring, per stage s: full[s] (1 arrival: the producer's arrive.expect_tx of the stage's
// bytes; completes when the TMA bytes have landed) and empty[s] (WS_CONSUMER_WARPS
// arrivals: lane 0 of every consumer warp, once the wgmmas that read the stage are
// complete). Use u of stage s (u = k-tile count / WS_STAGES) waits for phase parity u & 1
// of full[s] (consumers) and (u & 1) ^ 1 of empty[s] (producer: the first round passes at
// once). Consumers keep one wgmma group in flight: k-tile kt is committed, then
// wgmma.wait_group 1 retires k-tile kt - 1, whose stage is released; no drain per k-tile,
// only at the end of a tile (wait_group 0, then the epilogue straight from registers, while
// the producer already fills the stages of the next tile). A consumer whose 64 rows lie
// past the item (items of at most 64 rows) multiplies nothing and only releases stages.
//
// Order: each accumulator sums its k in ascending k-tiles, k16 steps in order inside a
// k-tile, as the first generation: the same bits, run to run and across both generations.
//
// Requirements (src/cuda/expert_gemm.rs): H % 256 == 0, I % 128 == 0, 16-byte aligned
// rows, R >= 1, an sm_90a device; the tensor maps are built by the launcher from the
// buffers' addresses and shapes (KernelArg::TensorMap).

#include "expert_gemm.cuh"
#include "pipeline.cuh"
#include "wgmma.cuh"

#define WS_BM 128
#define WS_BN 256
#define WS_BK 64
#define WS_STAGES 4
#define WS_THREADS 384
#define WS_CTAS 132
#define WS_HALF_ROWS 64
#define WS_B_BOX_ROWS 128
#define WS_HALF_BYTES (WS_HALF_ROWS * WS_BK * 2)
#define WS_A_BYTES (WS_BM * WS_BK * 2)
#define WS_B_BYTES (WS_BN * WS_BK * 2)
#define WS_STAGE_BYTES (WS_A_BYTES + WS_B_BYTES)
#define WS_ALIGN 1024
#define WS_BARRIER_BYTES 128
#define WS_SHARED_BYTES (WS_STAGES * WS_STAGE_BYTES + WS_ALIGN + WS_BARRIER_BYTES)
#define WS_CONSUMER_WARPS 8
#define WS_PRODUCER_REGS 40
#define WS_CONSUMER_REGS 232
#define WS_ACC 128

#ifndef DOTS_MOE_EMULATE  // C++ models of these PTX wrappers: tests/emulator

// Hands registers back to the pool (every thread of the warpgroup executes it).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Takes registers from the pool (every thread of the warpgroup executes it).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

#endif  // DOTS_MOE_EMULATE

// The 1024-byte aligned start of the dynamic shared memory (WS_ALIGN bytes are reserved).
__device__ __forceinline__ u32 ws_smem_base(const unsigned char* smem_buffer) {
    const u32 raw = smem_u32(smem_buffer);
    return (raw + WS_ALIGN - 1) & ~(u32)(WS_ALIGN - 1);
}

// One GEMM on the ring: GEMM 1 (UP: B rows gate n0.. and up I + n0.., SwiGLU into act) or
// GEMM 2 (B rows down n0..n0 + 256, the routing weight into y). k_len = H (UP) or I;
// col_blocks = I / 128 (UP) or H / 256; b_slot_rows = 2 I (UP) or H: the weight rows per
// slot in the b map.
template <bool UP>
__device__ __forceinline__ void ws_gemm(const TmaMap* a_map, const TmaMap* b_map, const GemmItem* __restrict__ items,
                                        const u32* __restrict__ item_counts, u32 hidden, u32 inter,
                                        const float* __restrict__ row_weights, u16* __restrict__ act,
                                        float* __restrict__ y) {
    DECLARE_DYNAMIC_SMEM(smem_buffer, 128);
    const u32 smem = ws_smem_base(smem_buffer);
    const u32 full = smem + WS_STAGES * WS_STAGE_BYTES;  // full[s] at full + 8 s
    const u32 empty = full + 8 * WS_STAGES;              // empty[s] at empty + 8 s
    const u32 k_tiles = (UP ? hidden : inter) / WS_BK;
    const u32 col_blocks = UP ? inter / (WS_BN / 2) : hidden / WS_BN;
    const u32 b_slot_rows = UP ? 2 * inter : hidden;
    const u32 n_tiles = item_counts[COUNT_TILED] * col_blocks;
    const u32 warpgroup = threadIdx.x >> 7;

    if (threadIdx.x == 0) {
        for (u32 s = 0; s < WS_STAGES; ++s) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, WS_CONSUMER_WARPS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    if (warpgroup == 0) {
        // The producer.
        setmaxnreg_dec<WS_PRODUCER_REGS>();
        if (threadIdx.x != 0) return;
        u32 use = 0;  // k-tiles issued by this CTA so far
        for (u32 tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
            const GemmItem item = items[tile / col_blocks];
            const u32 n0 = (tile % col_blocks) * (UP ? WS_BN / 2 : WS_BN);
            const u32 b_lo = item.slot * b_slot_rows + n0;
            const u32 b_hi = UP ? b_lo + inter : b_lo + WS_B_BOX_ROWS;
            const bool two_halves = item.rows > WS_HALF_ROWS;
            const u32 bytes = (two_halves ? 2u : 1u) * WS_HALF_BYTES + WS_B_BYTES;
            for (u32 kt = 0; kt < k_tiles; ++kt, ++use) {
                const u32 s = use % WS_STAGES, parity = (use / WS_STAGES) & 1u;
                const u32 stage = smem + s * WS_STAGE_BYTES;
                const int k0 = (int)(kt * WS_BK);
                mbar_wait(empty + 8 * s, parity ^ 1u);
                mbar_arrive_expect_tx(full + 8 * s, bytes);
                tma_load_2d(stage, a_map, k0, (int)item.row_begin, full + 8 * s);
                if (two_halves) {
                    tma_load_2d(stage + WS_HALF_BYTES, a_map, k0, (int)(item.row_begin + WS_HALF_ROWS), full + 8 * s);
                }
                tma_load_2d(stage + WS_A_BYTES, b_map, k0, (int)b_lo, full + 8 * s);
                tma_load_2d(stage + WS_A_BYTES + WS_B_BYTES / 2, b_map, k0, (int)b_hi, full + 8 * s);
            }
        }
        return;
    }

    // The consumers.
    setmaxnreg_inc<WS_CONSUMER_REGS>();
    const u32 consumer = warpgroup - 1;
    const u32 t = threadIdx.x & 127u;
    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2, q = lane & 3u;
    const u32 row0 = consumer * WS_HALF_ROWS + (t >> 5) * 16 + g;
    float acc[WS_ACC];
    u32 use = 0;
    for (u32 tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        const GemmItem item = items[tile / col_blocks];
        const u32 n0 = (tile % col_blocks) * (UP ? WS_BN / 2 : WS_BN);
        if (consumer * WS_HALF_ROWS >= item.rows) {
            // No rows of this consumer in the item: release the stages only.
            for (u32 kt = 0; kt < k_tiles; ++kt, ++use) {
                const u32 s = use % WS_STAGES;
                mbar_wait(full + 8 * s, (use / WS_STAGES) & 1u);
                if (lane == 0) mbar_arrive(empty + 8 * s);
            }
            continue;
        }
#pragma unroll
        for (int i = 0; i < WS_ACC; ++i) acc[i] = 0.0f;
        for (u32 kt = 0; kt < k_tiles; ++kt, ++use) {
            const u32 s = use % WS_STAGES;
            const u32 stage = smem + s * WS_STAGE_BYTES;
            mbar_wait(full + 8 * s, (use / WS_STAGES) & 1u);
            const u64 desc_a = wgmma_desc(stage + consumer * WS_HALF_BYTES);
            const u64 desc_b = wgmma_desc(stage + WS_A_BYTES);
            fence_accumulators(acc);
            wgmma_fence();
#pragma unroll
            for (u32 kk = 0; kk < WS_BK / 16; ++kk) {
                // 16 k elements are 32 bytes: 2 in the descriptor's 16-byte address units.
                wgmma_m64n256k16(acc, desc_a + 2 * kk, desc_b + 2 * kk);
            }
            wgmma_commit();
            // k-tile kt - 1 is complete: its stage goes back to the producer.
            wgmma_wait<1>();
            fence_accumulators(acc);
            if (kt > 0 && lane == 0) mbar_arrive(empty + 8 * ((use + WS_STAGES - 1) % WS_STAGES));
        }
        wgmma_wait<0>();
        fence_accumulators(acc);
        if (lane == 0) mbar_arrive(empty + 8 * ((use + WS_STAGES - 1) % WS_STAGES));

#pragma unroll
        for (u32 h = 0; h < 2; ++h) {
            const u32 r = row0 + 8 * h;
            if (r >= item.rows) continue;
            const u64 row = (u64)item.row_begin + r;
            if (UP) {
                u16* dst = act + row * inter + n0 + 2 * q;
#pragma unroll
                for (u32 j = 0; j < WS_BN / 16; ++j) {
                    const float* gate = &acc[4 * j + 2 * h];
                    const float* up = &acc[4 * (j + WS_BN / 16) + 2 * h];
                    *reinterpret_cast<u32*>(dst + 8 * j) =
                        pack_bf16x2(silu_mul(gate[0], up[0]), silu_mul(gate[1], up[1]));
                }
            } else {
                const float w = row_weights[row];
                float* dst = y + row * hidden + n0 + 2 * q;
#pragma unroll
                for (u32 j = 0; j < WS_BN / 8; ++j) {
                    *reinterpret_cast<float2*>(dst + 8 * j) =
                        make_float2(__fmul_rn(w, acc[4 * j + 2 * h]), __fmul_rn(w, acc[4 * j + 2 * h + 1]));
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)
    moe_expert_up_ws(const __grid_constant__ TmaMap x_map, const __grid_constant__ TmaMap gate_up_map,
                     const GemmItem* __restrict__ items, const u32* __restrict__ item_counts, u32 hidden, u32 inter,
                     u16* __restrict__ act) {
    grid_dependency_sync();
    ws_gemm<true>(&x_map, &gate_up_map, items, item_counts, hidden, inter, nullptr, act, nullptr);
}

extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)
    moe_expert_down_ws(const __grid_constant__ TmaMap act_map, const __grid_constant__ TmaMap down_map,
                       const float* __restrict__ row_weights, const GemmItem* __restrict__ items,
                       const u32* __restrict__ item_counts, u32 hidden, u32 inter, float* __restrict__ y) {
    grid_dependency_sync();
    ws_gemm<false>(&act_map, &down_map, items, item_counts, hidden, inter, row_weights, nullptr, y);
}
