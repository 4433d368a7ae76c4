// expert_gemm.cuh: helpers of the expert GEMM kernel files (steps 3 and 4 of the MoE
// contract, src/moe/expert.rs), included by each of them after common.cuh. No kernels
// here, no toolkit header.
//
// The contract, for every slot e (routed experts 0..E, shared halves E..E+n_shared) and
// each of its permuted rows r in expert_offsets[e]..expert_offsets[e+1]:
//   GEMM 1   a[r][i] = bf16( silu(x[r] . gate_e[i]) * (x[r] . up_e[i]) )      i < I
//   GEMM 2   y[r][h] = w[r] * (a[r] . down_e[h])                              h < H, f32
// x [R, H] bf16 (gathered, permuted order), gate_up [E+n_shared, 2I, H] bf16 (gate rows
// 0..I, up rows I..2I of each slot), down [E+n_shared, H, I] bf16, products and sums in f32,
// silu(g) = g / (1 + exp(-g)) exactly as cpu::swiglu writes it.
//
// Work items. A schedule kernel (expert_gemm_schedule.cu) turns expert_offsets into lists
// of items on the device; an item is one slot's contiguous rows [row_begin, row_begin +
// rows). Every GEMM kernel runs on a grid (column blocks, item capacity): blockIdx.y is
// the item, CTAs past the number of items written by the schedule return at once.

#pragma once
#include "common.cuh"

// One work item: slot, first permuted row, number of rows (the 4th word is padding).
struct GemmItem {
    u32 slot;
    u32 row_begin;
    u32 rows;
    u32 unused;
};

// item_counts[] layout, shared with src/cuda/expert_gemm.rs.
#define COUNT_DECODE 0   // items in decode_items
#define COUNT_TILED 1    // items in tiled_items
#define COUNT_OVERFLOW 2 // 1 if an item list was too small (a bug in the host's bound)

// ---- the schedule (expert_gemm_schedule.cu; the decode chain's router in route.cu) -----
//
// One warp turns expert_offsets [n_slots + 1] into the work item lists and item_counts
// (the rules are in expert_gemm_schedule.cu). It reads the offsets through L2 (__ldcg): in
// the decode chain the same CTA wrote them just before.

// Rows of one decode item at most (8 tiles of 8 tokens; expert_gemm_decode.cu).
#define DECODE_ITEM_ROWS 64

__device__ __forceinline__ void write_items(GemmItem* items, u32 capacity, u32 first, u32 n, u32 slot,
                                            u32 row_begin, u32 rows, u32 chunk, u32& overflow) {
    for (u32 i = 0; i < n; ++i) {
        const u32 at = first + i;
        if (at >= capacity) {
            overflow = 1;
            return;
        }
        GemmItem item;
        item.slot = slot;
        item.row_begin = row_begin + i * chunk;
        item.rows = min(chunk, rows - i * chunk);
        item.unused = 0;
        items[at] = item;
    }
}

// Inclusive prefix sum over the warp.
__device__ __forceinline__ u32 warp_inclusive_sum(u32 v) {
    const u32 lane = threadIdx.x & 31u;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const u32 other = __shfl_up_sync(FULL_MASK, v, offset);
        if (lane >= (u32)offset) v += other;
    }
    return v;
}

__device__ __forceinline__ void schedule_items(const u32* expert_offsets, u32 n_slots, u32 decode_max_rows,
                                               u32 tile_rows, u32 decode_capacity, u32 tiled_capacity,
                                               GemmItem* __restrict__ decode_items,
                                               GemmItem* __restrict__ tiled_items, u32* __restrict__ item_counts) {
    const u32 lane = threadIdx.x & 31u;
    decode_max_rows = min(decode_max_rows, (u32)DECODE_ITEM_ROWS);
    u32 decode_total = 0, tiled_total = 0, overflow = 0;
    for (u32 base = 0; base < n_slots; base += 32) {
        const u32 slot = base + lane;
        u32 begin = 0, rows = 0;
        if (slot < n_slots) {
            begin = __ldcg(expert_offsets + slot);
            rows = __ldcg(expert_offsets + slot + 1) - begin;
        }
        u32 n_decode = 0, n_tiled = 0, chunk = rows;
        if (rows == 0) {
        } else if (rows <= decode_max_rows) {
            n_decode = 1;
        } else if (tile_rows > 0) {
            n_tiled = (rows + tile_rows - 1) / tile_rows;
            chunk = tile_rows;
        } else {
            n_decode = (rows + DECODE_ITEM_ROWS - 1) / DECODE_ITEM_ROWS;
            chunk = DECODE_ITEM_ROWS;
        }
        const u32 decode_end = warp_inclusive_sum(n_decode);
        const u32 tiled_end = warp_inclusive_sum(n_tiled);
        write_items(decode_items, decode_capacity, decode_total + decode_end - n_decode, n_decode, slot, begin,
                    rows, chunk, overflow);
        write_items(tiled_items, tiled_capacity, tiled_total + tiled_end - n_tiled, n_tiled, slot, begin, rows,
                    chunk, overflow);
        decode_total += __shfl_sync(FULL_MASK, decode_end, 31);
        tiled_total += __shfl_sync(FULL_MASK, tiled_end, 31);
    }
    overflow = __any_sync(FULL_MASK, overflow) ? 1u : 0u;
    if (lane == 0) {
        item_counts[COUNT_DECODE] = min(decode_total, decode_capacity);
        item_counts[COUNT_TILED] = min(tiled_total, tiled_capacity);
        item_counts[COUNT_OVERFLOW] = overflow;
    }
}

// ---- where the cp.async-fed tile kernels read their A rows -----------------------------
//
// chunk(i, r, c, k0, valid): the address of 16-byte chunk c of item row r at k0, the
// thread's i-th A chunk of a stage (any readable address when the row is not valid).
// TileRows: the item's rows of a [rows, ld] bf16 buffer (the gathered rows x, or the
// activation).
struct TileRows {
    const u16* rows;
    u64 ld;
    __device__ __forceinline__ const u16* chunk(u32 /*i*/, u32 r, u32 c, u32 k0, bool valid) const {
        return rows + (valid ? (u64)r * ld + k0 + 8 * c : 0);
    }
};

// GatheredRows: the bf16 hidden states [T, ld] through the permutation (no gather pass):
// item row r is hidden row row_pairs[row_begin + r] / slots. Chunk i of a stage lies in
// row (threadIdx.x + i THREADS) / CHUNKS_PER_ROW, so each thread looks its CHUNKS rows up
// once per tile, not per stage.
template <u32 CHUNKS, u32 THREADS, u32 CHUNKS_PER_ROW>
struct GatheredRows {
    const u16* row[CHUNKS];
    __device__ __forceinline__ GatheredRows(const u16* hidden, const u32* row_pairs, u32 slots, u64 ld,
                                            GemmItem item) {
#pragma unroll
        for (u32 i = 0; i < CHUNKS; ++i) {
            const u32 r = (threadIdx.x + i * THREADS) / CHUNKS_PER_ROW;
            row[i] = r < item.rows ? hidden + (u64)(row_pairs[item.row_begin + r] / slots) * ld : hidden;
        }
    }
    __device__ __forceinline__ const u16* chunk(u32 i, u32 /*r*/, u32 c, u32 k0, bool valid) const {
        return row[i] + (valid ? k0 + 8 * c : 0);
    }
};

// ---- numerics -------------------------------------------------------------------------

// silu(g) * u, the order and roundings of cpu::swiglu: g / (1 + exp(-g)) * u.
__device__ __forceinline__ float silu_mul(float g, float u) {
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, exp_f32(-g))), u);
}

// Two f32 as a bf16x2 word (round to nearest even): `lo` in the low half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// ---- the decode epilogues (expert_gemm_decode.cu, expert_gemm_stream.cu) ---------------
//
// One warp's NT accumulator tiles of mma m16n8k16 with the weight rows as A and 8 item rows
// per tile as B (lane l, g = l >> 2, q = l & 3): acc[t][0] / acc[t][2] are weight rows g /
// g + 8 of item row 8t + 2q, acc[t][1] / acc[t][3] of item row 8t + 2q + 1. Rows past the
// item are dropped.

// GEMM 1: weight rows g = gate, g + 8 = up of act column `col`.
template <int NT>
__device__ __forceinline__ void decode_store_act(const float (&acc)[NT][4], u16* act, u32 inter, GemmItem item,
                                                 u32 col) {
    const u32 q = threadIdx.x & 3u;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        const u32 r = 8 * t + 2 * q;
        u16* dst = act + ((u64)item.row_begin + r) * inter + col;
        if (r < item.rows) dst[0] = f32_to_bf16(silu_mul(acc[t][0], acc[t][2]));
        if (r + 1 < item.rows) dst[inter] = f32_to_bf16(silu_mul(acc[t][1], acc[t][3]));
    }
}

// GEMM 2: weight rows g and g + 8 = output columns `col` and `col + 8`, times the routing
// weight of the row.
template <int NT>
__device__ __forceinline__ void decode_store_rows(const float (&acc)[NT][4], const float* row_weights, float* y,
                                                  u32 hidden, GemmItem item, u32 col) {
    const u32 q = threadIdx.x & 3u;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (u32 j = 0; j < 2; ++j) {
            const u32 r = 8 * t + 2 * q + j;
            if (r < item.rows) {
                const u64 row = (u64)item.row_begin + r;
                const float w = row_weights[row];
                float* dst = y + row * hidden + col;
                dst[0] = __fmul_rn(w, acc[t][j]);
                dst[8] = __fmul_rn(w, acc[t][2 + j]);
            }
        }
    }
}

// The PTX wrappers below are replaced by C++ models when the kernel files run on the CPU
// (tests/emulator: DOTS_MOE_EMULATE defined); NVRTC compiles them as written.
#ifndef DOTS_MOE_EMULATE

// ---- memory ---------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_u32(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// An L2 cache policy that marks what it loads to be evicted first (createpolicy: all of the
// accesses that carry it, fraction 1.0). Not volatile: the compiler may keep one per thread.
__device__ __forceinline__ u64 l2_evict_first() {
    u64 policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// 16 bytes from global memory that is read exactly once (expert weights): not kept in L1,
// and first out of L2, so that a layer's stream of weights does not push out what is read
// again (activations, the routing state).
__device__ __forceinline__ uint4 load_stream_16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p), "l"(l2_evict_first()));
    return v;
}

// 16 bytes from global memory that other warps of the CTA read too (activations): via L1.
__device__ __forceinline__ uint4 load_shared_16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// cp.async of 16 bytes, global to shared, bypassing L1. `src_bytes` 0 writes 16 zero bytes
// and reads nothing (rows past the end of an item); `src` must still be a valid address.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed cp.async groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- tensor cores (sm_80 and later) -----------------------------------------------------

// Four 8x8 b16 matrices from shared memory; lane l gives the address of row (l & 7) of
// matrix (l >> 3); r[m] receives matrix m in the mma fragment layout.
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += A (16 x 16, row-major) * B (16 x 8, column-major), bf16 inputs, f32 accumulators.
// Fragments (lane l, g = l >> 2, q = l & 3), each u32 a pair of bf16 (low half first):
//   a[0] = A[g][2q..2q+1]   a[1] = A[g+8][2q..2q+1]   a[2] = A[g][2q+8..]   a[3] = A[g+8][2q+8..]
//   b0   = B[2q..2q+1][g]   b1   = B[2q+8..2q+9][g]
//   c[0] = C[g][2q]  c[1] = C[g][2q+1]  c[2] = C[g+8][2q]  c[3] = C[g+8][2q+1]
__device__ __forceinline__ void mma_16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#endif  // DOTS_MOE_EMULATE
