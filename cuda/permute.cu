// permute.cu: step 2 of the MoE contract (src/moe/permute.rs): the stable counting sort of
// the (token, slot) pairs by slot, and the gather of hidden rows into permuted order.
// Includes common.cuh. Pairs p = t * slots + j are u32 (the host checks
// T * slots < 2^32); element offsets (row * H) are u64.
//
// moe_permute_rank      slot_ids [T * slots] -> pair_ranks [T * slots], tile_counts [n_tiles, n_slots],
//                       tile_status [n_tiles], tile_offsets [n_tiles, n_slots], expert_offsets [n_slots + 1]
//   grid n_tiles, block TILE_THREADS. One CTA owns one tile of TILE_TOKENS tokens (the same
//   tiles as moe_router_select, which does this step itself when it produced the ids): it
//   copies the tile's ids to shared memory and ranks them (rank_tile). An id >= n_slots is
//   left out and tile_status gets (its pair + 1) for the tile's first one. The CTA that
//   finishes last (the arrival counter tiles_done, 0 before and after the launch) scans the
//   whole tile_counts table into tile_offsets and expert_offsets (scan_tile_counts in
//   common.cuh). Bytes: 4 T slots read, 4 T slots + 4 n_tiles n_slots + 8 n_tiles written;
//   the last CTA: 8 n_tiles n_slots read (L2; none for one tile), 4 (n_tiles + 1) n_slots + 4
//   written. Shared: 4 (TILE_TOKENS slots + (TILE_WARPS + 1) n_slots + 1).
//
// moe_permute_scatter   -> row_pairs [T slots], pair_rows [T slots],
//                          row_weights [T slots] (optional: slot_weights in row order)
//   grid max(n_tiles, 1), block TILE_THREADS, no shared memory. Each thread places pairs of
//   its CTA's tile: row = tile_offsets[tile][e] + rank, reading only the tile's own row of
//   tile_offsets (4 n_slots bytes, L1/L2). Ascending pair order inside every slot, exactly
//   the CPU's stable sort; integer sums only, so no order question. With T = 0 (no rank or
//   selection launch before it) CTA 0 writes expert_offsets, all 0, and nothing else.
//   Bytes: 4 n_tiles n_slots (L2) + 8 T slots read (12 with weights), 8 T slots (12 with
//   weights) written.
//
// moe_gather_<x>_to_<out>   x_perm [T slots, H] = hidden [row_pairs[r] / slots]
//   grid (T slots, ceil(H / (8 * GATHER_THREADS))), block GATHER_THREADS. One CTA owns one
//   permuted row (or 8 * GATHER_THREADS columns of it); each thread moves 8 consecutive
//   elements with 16-byte accesses (bf16 reads/writes are one uint4; f32 two float4). With
//   H % 8 != 0 it moves one element a thread. f32 -> bf16 rounds to nearest even, like
//   cpu::f32_to_bf16. Bytes: T slots H (sizeof(x) + sizeof(out)) + 4 T slots. FLOPs: 0.

#include "common.cuh"

#define GATHER_THREADS 256

extern "C" __global__ void __launch_bounds__(TILE_THREADS)
    moe_permute_rank(const u32* __restrict__ slot_ids, u32 tokens, u32 slots_per_token,
                     u32 n_slots, u32* __restrict__ pair_ranks, u32* __restrict__ tile_counts,
                     u64* __restrict__ tile_status, u32* __restrict__ tile_offsets,
                     u32* __restrict__ expert_offsets, u32* __restrict__ tiles_done) {
    grid_dependency_sync();
    DECLARE_DYNAMIC_SMEM(smem, 16);
    const u32 slots = slots_per_token;
    u32* ids = reinterpret_cast<u32*>(smem);
    u32* warp_counts = ids + TILE_TOKENS * slots;
    u32* running = warp_counts + TILE_WARPS * n_slots;  // [n_slots + 1]: counts, then offsets
    __shared__ u32 first_bad;

    const u32 tile = blockIdx.x;
    const u32 n_tiles = gridDim.x;
    const u64 t_begin = (u64)tile * TILE_TOKENS;
    const u32 tile_tokens = (u32)min((u64)TILE_TOKENS, (u64)tokens - t_begin);
    const u32 n_pairs = tile_tokens * slots;
    const u64 pair_base = t_begin * slots;
    if (threadIdx.x == 0) first_bad = NO_INDEX;
    __syncthreads();
    for (u32 i = threadIdx.x; i < n_pairs; i += TILE_THREADS) {
        const u32 id = slot_ids[pair_base + i];
        ids[i] = id;
        if (id >= n_slots) atomicMin(&first_bad, i);  // a minimum: the same whatever the order
    }
    __syncthreads();
    if (threadIdx.x == 0) tile_status[tile] = first_bad == NO_INDEX ? 0 : pair_base + first_bad + 1;
    rank_tile(ids, n_pairs, n_slots, warp_counts, running, pair_ranks + pair_base,
              tile_counts + (u64)tile * n_slots);
    if (last_tile_to_arrive(tiles_done, n_tiles)) {
        scan_tile_counts(tile_counts, n_tiles, n_slots, warp_counts, running, tile_offsets, expert_offsets);
    }
}

extern "C" __global__ void __launch_bounds__(TILE_THREADS)
    moe_permute_scatter(const u32* __restrict__ slot_ids, const float* __restrict__ slot_weights,
                        const u32* __restrict__ pair_ranks, const u32* __restrict__ tile_offsets,
                        u32 tokens, u32 slots_per_token, u32 n_slots,
                        u32* __restrict__ expert_offsets, u32* __restrict__ row_pairs,
                        u32* __restrict__ pair_rows, float* __restrict__ row_weights) {
    grid_dependency_sync();
    const u32 tile = blockIdx.x;
    if (tokens == 0) {
        for (u32 e = threadIdx.x; e <= n_slots; e += TILE_THREADS) expert_offsets[e] = 0;
        return;
    }
    const u32 slots = slots_per_token;
    const u64 t_begin = (u64)tile * TILE_TOKENS;
    const u32 n_pairs = (u32)min((u64)TILE_TOKENS, (u64)tokens - t_begin) * slots;
    const u32 pair_base = (u32)(t_begin * slots);
    const u32* base = tile_offsets + (u64)tile * n_slots;
    for (u32 i = threadIdx.x; i < n_pairs; i += TILE_THREADS) {
        const u32 p = pair_base + i;
        const u32 e = slot_ids[p];
        if (e >= n_slots) continue;  // reported by the rank step
        const u32 row = base[e] + pair_ranks[p];
        row_pairs[row] = p;
        pair_rows[p] = row;
        if (row_weights) row_weights[row] = slot_weights[p];
    }
}

__device__ __forceinline__ void store8(float* dst, const float v[8]) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void store8(u16* dst, const float v[8]) {
    uint4 packed;
    packed.x = (u32)f32_to_bf16(v[0]) | ((u32)f32_to_bf16(v[1]) << 16);
    packed.y = (u32)f32_to_bf16(v[2]) | ((u32)f32_to_bf16(v[3]) << 16);
    packed.z = (u32)f32_to_bf16(v[4]) | ((u32)f32_to_bf16(v[5]) << 16);
    packed.w = (u32)f32_to_bf16(v[6]) | ((u32)f32_to_bf16(v[7]) << 16);
    store_global_16(dst, packed);
}

__device__ __forceinline__ void store1(float* dst, float v) { *dst = v; }
__device__ __forceinline__ void store1(u16* dst, float v) { *dst = f32_to_bf16(v); }

template <typename TX, typename TO>
__device__ __forceinline__ void gather(const TX* __restrict__ hidden, const u32* __restrict__ row_pairs,
                                       TO* __restrict__ out, u32 slots_per_token, u64 hidden_size,
                                       u32 vectorized) {
    const u64 row = blockIdx.x;
    const u64 token = row_pairs[row] / slots_per_token;
    const TX* src = hidden + token * hidden_size;
    TO* dst = out + row * hidden_size;
    if (vectorized) {
        const u64 k = ((u64)blockIdx.y * GATHER_THREADS + threadIdx.x) * 8;
        if (k < hidden_size) {
            float v[8];
            load8_f32(src + k, v);
            store8(dst + k, v);
        }
    } else {
        for (u64 k = (u64)blockIdx.y * GATHER_THREADS * 8 + threadIdx.x;
             k < min(hidden_size, ((u64)blockIdx.y + 1) * GATHER_THREADS * 8); k += GATHER_THREADS) {
            store1(dst + k, load1_f32(src + k));
        }
    }
}

// bf16 -> bf16 moves the bits untouched (one uint4 per thread).
template <>
__device__ __forceinline__ void gather<u16, u16>(const u16* __restrict__ hidden, const u32* __restrict__ row_pairs,
                                                 u16* __restrict__ out, u32 slots_per_token, u64 hidden_size,
                                                 u32 vectorized) {
    const u64 row = blockIdx.x;
    const u64 token = row_pairs[row] / slots_per_token;
    const u16* src = hidden + token * hidden_size;
    u16* dst = out + row * hidden_size;
    if (vectorized) {
        const u64 k = ((u64)blockIdx.y * GATHER_THREADS + threadIdx.x) * 8;
        if (k < hidden_size) *reinterpret_cast<uint4*>(dst + k) = *reinterpret_cast<const uint4*>(src + k);
    } else {
        for (u64 k = (u64)blockIdx.y * GATHER_THREADS * 8 + threadIdx.x;
             k < min(hidden_size, ((u64)blockIdx.y + 1) * GATHER_THREADS * 8); k += GATHER_THREADS) {
            dst[k] = src[k];
        }
    }
}

#define GATHER(NAME, TX, TO)                                                                   \
    extern "C" __global__ void __launch_bounds__(GATHER_THREADS)                               \
        NAME(const TX* __restrict__ hidden, const u32* __restrict__ row_pairs,                 \
             TO* __restrict__ out, u32 slots_per_token, u64 hidden_size, u32 vectorized) {     \
        grid_dependency_sync();                                                                \
        gather<TX, TO>(hidden, row_pairs, out, slots_per_token, hidden_size, vectorized);      \
    }

GATHER(moe_gather_f32_to_f32, float, float)
GATHER(moe_gather_f32_to_bf16, float, u16)
GATHER(moe_gather_bf16_to_f32, u16, float)
GATHER(moe_gather_bf16_to_bf16, u16, u16)
