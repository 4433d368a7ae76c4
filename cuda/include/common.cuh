// common.cuh: device helpers shared by every dots-moe kernel file (`#include "common.cuh"`).
//
// src/cuda/source.rs hands this header to NVRTC in memory (no include path on any machine);
// the CPU emulator (tests/emulator) includes it from disk after its own shim. It has no
// kernels of its own and includes no CUDA toolkit header: NVRTC's built-in declarations
// (warp intrinsics, `float4`/`uint4`, `exp`) are all it uses.
//
// Numerics shared with the CPU reference (src/moe):
//  - bf16 -> f32 is exact (a shift); f32 -> bf16 rounds to nearest even and keeps NaNs
//    quiet, bit-identical to `half::bf16::from_f32` (what `cpu::f32_to_bf16` promises).
//  - `exp_f32` rounds the double-precision exponential to f32: correctly rounded in all but
//    astronomically rare cases, so it agrees with glibc's `expf` (used by the CPU
//    reference, < 0.502 ulp) on almost every input. Where the two differ it is by one ulp.

#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

#define FULL_MASK 0xffffffffu
#define NO_INDEX 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

// The dynamic shared memory of a kernel: `DECLARE_DYNAMIC_SMEM(name, align);` declares
// `name` as its first byte, `align`-byte aligned. The CPU emulator defines this macro
// before including this header (its buffer is a per-CTA allocation).
#ifndef DECLARE_DYNAMIC_SMEM
#define DECLARE_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) unsigned char name[]
#endif

// ---- programmatic dependent launch ----------------------------------------------------
//
// Every kernel of the crate begins with this call, before any read or write of global
// memory (tests/kernel_seam.rs checks it). On sm_90 and later a kernel launched with
// programmatic stream serialisation (GpuContext::set_programmatic_launch) may be scheduled
// while the kernel before it in the stream still runs: `launch_dependents` lets the next
// kernel's CTAs be scheduled once every CTA of this one has started, and `wait` blocks until
// the previous kernel has completed and its memory is visible. So a layer's kernels overlap
// only their launch and prologue, never their memory traffic. Launched plainly, both return
// at once. Compiled out for sm_80 and on the CPU emulator (launches run one after another).
__device__ __forceinline__ void grid_dependency_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ---- 128-bit global stores ---------------------------------------------------------
//
// NVRTC lowers a store of a float4 / uint4 whose lanes were computed one by one into four
// 32-bit stores (st.global.f32 x4 in the PTX); these keep it one 128-bit store
// (STG.E.128, checked in tests/cuda_static.rs). `p` must be 16-byte aligned. The CPU
// emulator models them (tests/emulator/ptx_models.h).
#ifndef DOTS_MOE_EMULATE
__device__ __forceinline__ void store_global_16(float* p, float4 v) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
                 : "memory");
}
__device__ __forceinline__ void store_global_16(void* p, uint4 v) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}
#endif  // DOTS_MOE_EMULATE

// The combine's sum (moe_combine, moe_expert_down_decode_combine, src/moe/combine.rs): the
// float4 at column `col` of the rows rows[0..slots) of y [_, ld], added in slot order from
// 0.0, one f32 add per slot and lane. L2: read through L2 (__ldcg), for rows that other CTAs
// of the same launch wrote.
template <bool L2>
__device__ __forceinline__ float4 sum_slots4(const float* y, const u32* rows, u32 slots, u64 ld, u64 col) {
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (u32 j = 0; j < slots; ++j) {
        const float4* p = reinterpret_cast<const float4*>(y + (u64)rows[j] * ld + col);
        const float4 v = L2 ? __ldcg(p) : *p;
        acc.x = __fadd_rn(acc.x, v.x);
        acc.y = __fadd_rn(acc.y, v.y);
        acc.z = __fadd_rn(acc.z, v.z);
        acc.w = __fadd_rn(acc.w, v.w);
    }
    return acc;
}

// ---- bf16 ----------------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_f32(u32 bits) {
    return __uint_as_float((bits & 0xffffu) << 16);
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x0040u);  // quiet NaN, payload kept like `half`
    }
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Eight consecutive elements as f32. `p` is 16-byte aligned (bf16) or 32-byte aligned (f32).
__device__ __forceinline__ void load8_f32(const float* p, float v[8]) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void load8_f32(const u16* p, float v[8]) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    v[0] = bf16_to_f32(a.x); v[1] = bf16_to_f32(a.x >> 16);
    v[2] = bf16_to_f32(a.y); v[3] = bf16_to_f32(a.y >> 16);
    v[4] = bf16_to_f32(a.z); v[5] = bf16_to_f32(a.z >> 16);
    v[6] = bf16_to_f32(a.w); v[7] = bf16_to_f32(a.w >> 16);
}

__device__ __forceinline__ float load1_f32(const float* p) { return *p; }
__device__ __forceinline__ float load1_f32(const u16* p) { return bf16_to_f32(*p); }

// ---- math ------------------------------------------------------------------------------

__device__ __forceinline__ float exp_f32(float x) {
    return (float)exp((double)x);
}

__device__ __forceinline__ bool is_finite_f32(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// ---- warp ----------------------------------------------------------------------------

// Lanes below this one, as a mask.
__device__ __forceinline__ u32 lanemask_lt() {
    return (1u << (threadIdx.x & 31u)) - 1u;
}

// Warp-wide arg-max of (value, index) with ties to the LOWER index: the order of
// src/moe/route.rs. Every lane returns the same pair. `NO_INDEX` with NEG_INF means "none".
__device__ __forceinline__ void warp_argmax(float& value, u32& index) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_value = __shfl_xor_sync(FULL_MASK, value, offset);
        const u32 other_index = __shfl_xor_sync(FULL_MASK, index, offset);
        if (other_value > value || (other_value == value && other_index < index)) {
            value = other_value;
            index = other_index;
        }
    }
}

__device__ __forceinline__ u32 warp_min_u32(u32 v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = min(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// ---- the permutation's tiles ------------------------------------------------------------

// Tokens per permutation tile: the router's selection block and the permutation kernels
// agree on it (src/cuda/moe.rs owns it as TILE_TOKENS).
#define TILE_TOKENS 32
// Threads of every tile block (router selection, rank, scatter).
#define TILE_THREADS 256
#define TILE_WARPS (TILE_THREADS / 32)

// Stable in-tile ranks of a tile's pairs, and the tile's per-slot counts.
//
// `ids` (shared, `n_pairs` entries) are the tile's slot ids in pair order. For each pair p
// with an id below `n_slots`, `ranks[p]` = the number of earlier pairs of the tile with the
// same id; ids out of range get no rank. `counts[e]` = pairs of slot e in the tile.
// Deterministic: ranks come from `__match_any_sync` masks and per-warp counts in fixed
// order, never from the order atomics land in.
//
// Shared scratch: `warp_counts [TILE_WARPS * n_slots]`, `running [n_slots]`. All
// TILE_THREADS threads of the block call it.
__device__ void rank_tile(const u32* ids, u32 n_pairs, u32 n_slots, u32* warp_counts,
                          u32* running, u32* ranks, u32* counts) {
    const u32 warp = threadIdx.x >> 5;
    const u32 lane = threadIdx.x & 31u;
    for (u32 i = threadIdx.x; i < n_slots; i += TILE_THREADS) running[i] = 0;
    for (u32 i = threadIdx.x; i < TILE_WARPS * n_slots; i += TILE_THREADS) warp_counts[i] = 0;
    __syncthreads();
    for (u32 chunk = 0; chunk < n_pairs; chunk += TILE_THREADS) {
        const u32 p = chunk + threadIdx.x;
        const u32 id = p < n_pairs ? ids[p] : NO_INDEX;
        const bool valid = id < n_slots;
        const u32 peers = __match_any_sync(FULL_MASK, id);
        const u32 rank_in_warp = __popc(peers & lanemask_lt());
        const bool first = (peers & lanemask_lt()) == 0;
        const bool last = (peers >> lane) == 1u;
        if (valid && first) warp_counts[warp * n_slots + id] = __popc(peers);
        __syncthreads();
        u32 row = 0;
        bool last_in_chunk = false;
        if (valid) {
            u32 before = running[id];
            for (u32 w = 0; w < warp; ++w) before += warp_counts[w * n_slots + id];
            row = before + rank_in_warp;
            ranks[p] = row;
            last_in_chunk = last;
            for (u32 w = warp + 1; w < TILE_WARPS; ++w) {
                if (warp_counts[w * n_slots + id] != 0) last_in_chunk = false;
            }
        }
        __syncthreads();
        if (last_in_chunk) running[id] = row + 1;
        if (valid && first) warp_counts[warp * n_slots + id] = 0;
        __syncthreads();
    }
    for (u32 i = threadIdx.x; i < n_slots; i += TILE_THREADS) counts[i] = running[i];
}

// Exclusive scan of the per-slot counts `offsets[0..n_slots)` (shared) into row offsets, in
// place; `offsets[n_slots]` becomes the total. Warp 0 scans (lane l owns a contiguous run
// of slots); integer sums, so the order is no question. All TILE_THREADS threads call it;
// it ends with a barrier.
__device__ __forceinline__ void scan_slot_counts(u32* offsets, u32 n_slots) {
    if (threadIdx.x < 32) {
        const u32 lane = threadIdx.x;
        const u32 per_lane = (n_slots + 31) / 32;
        const u32 begin = min(lane * per_lane, n_slots);
        const u32 end = min(begin + per_lane, n_slots);
        u32 own = 0;
        for (u32 e = begin; e < end; ++e) own += offsets[e];
        u32 inclusive = own;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const u32 other = __shfl_up_sync(FULL_MASK, inclusive, offset);
            if (lane >= (u32)offset) inclusive += other;
        }
        u32 running = inclusive - own;
        for (u32 e = begin; e < end; ++e) {
            const u32 c = offsets[e];
            offsets[e] = running;
            running += c;
        }
        __syncwarp();
        if (lane == 31) offsets[n_slots] = inclusive;
    }
    __syncthreads();
}

// ---- the tile scan: each scatter CTA reads one row -------------------------------------
//
// Every tile CTA (moe_router_select, moe_permute_rank) writes its row of
// `tile_counts [n_tiles, n_slots]`. The CTA that finishes last (last_tile_to_arrive) turns
// the whole table into `tile_offsets [n_tiles, n_slots]`, the permuted row of each tile's
// first pair of each slot (expert_offsets[e] + the pairs of slot e in earlier tiles), and
// `expert_offsets [n_slots + 1]` (scan_tile_counts). A moe_permute_scatter CTA then reads
// its own row only: O(n_tiles n_slots) in all, where every CTA summing the earlier tiles
// itself would be O(n_tiles^2 n_slots).

// Whether the calling CTA is the last of the launch's `n_tiles` CTAs to get here: the same
// answer in every thread of a CTA, true in exactly one CTA. Every thread calls it after its
// last store to `tile_counts`. `tiles_done` (one u32 in device memory) counts the arrivals;
// it must be 0 when the launch starts, and the last CTA sets it back to 0 once all have
// added, so the next launch (a CUDA graph's replay too) finds it 0. Release: each thread
// fences its stores before the barrier that precedes the arrival; acquire: the last CTA's
// thread 0 fences after seeing the count, before the barrier after which its threads read
// the table (with L2 loads, __ldcg). One tile: that CTA is the last; no counter. It ends
// with a barrier in every case (so the caller may then overwrite rank_tile's scratch).
__device__ __forceinline__ bool last_tile_to_arrive(u32* tiles_done, u32 n_tiles) {
    if (n_tiles == 1) {
        __syncthreads();
        return true;
    }
    __shared__ u32 last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 arrived = atomicAdd(tiles_done, 1u);
        last = arrived == n_tiles - 1;
        if (last) {
            __threadfence();
            atomicExch(tiles_done, 0u);  // every CTA has added: nothing else touches it now
        }
    }
    __syncthreads();
    return last != 0;
}

// The last CTA's work (all TILE_THREADS threads of it): `tile_counts` -> `tile_offsets`
// and `expert_offsets`. Warp w owns the tiles [w c, (w + 1) c), c = ceil(n_tiles /
// TILE_WARPS), and lane l the slots l, l + 32, ...: each warp sums its tiles' counts per
// slot, the per-warp sums are scanned over the warps per slot and the slot totals over the
// slots (scan_slot_counts), then each warp walks its tiles again writing the running row.
// Integer sums only: exact whatever the order. The table is read twice (8 n_tiles n_slots
// bytes from L2), tile_offsets written once (4 n_tiles n_slots).
//
// Shared scratch: `partial [TILE_WARPS * n_slots]`, `offsets [n_slots + 1]`, which holds
// the calling tile's own counts on entry (rank_tile's `running`) and expert_offsets on
// exit. With one tile those counts are the table, which is then not read at all.
__device__ void scan_tile_counts(const u32* tile_counts, u32 n_tiles, u32 n_slots, u32* partial,
                                 u32* offsets, u32* tile_offsets, u32* expert_offsets) {
    const u32 warp = threadIdx.x >> 5;
    const u32 lane = threadIdx.x & 31u;
    const u32 per_warp = (n_tiles + TILE_WARPS - 1) / TILE_WARPS;
    const u32 t_begin = min(warp * per_warp, n_tiles);
    const u32 t_end = min(t_begin + per_warp, n_tiles);
    if (n_tiles > 1) {
        for (u32 e = lane; e < n_slots; e += 32) {
            u32 sum = 0;
#pragma unroll 4
            for (u32 t = t_begin; t < t_end; ++t) sum += __ldcg(tile_counts + (u64)t * n_slots + e);
            partial[warp * n_slots + e] = sum;
        }
        __syncthreads();
        for (u32 e = threadIdx.x; e < n_slots; e += TILE_THREADS) {
            u32 running = 0;
            for (u32 w = 0; w < TILE_WARPS; ++w) {
                const u32 c = partial[w * n_slots + e];
                partial[w * n_slots + e] = running;
                running += c;
            }
            offsets[e] = running;
        }
        __syncthreads();
    }
    scan_slot_counts(offsets, n_slots);
    for (u32 e = threadIdx.x; e <= n_slots; e += TILE_THREADS) expert_offsets[e] = offsets[e];
    if (t_begin == t_end) return;
    for (u32 e = lane; e < n_slots; e += 32) {
        u32 row = offsets[e] + (n_tiles > 1 ? partial[warp * n_slots + e] : 0u);
#pragma unroll 4
        for (u32 t = t_begin; t < t_end; ++t) {
            tile_offsets[(u64)t * n_slots + e] = row;
            if (t + 1 < t_end) row += __ldcg(tile_counts + (u64)t * n_slots + e);
        }
    }
}
