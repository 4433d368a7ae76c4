// expert_gemm_schedule.cu: the regime of every expert slot, chosen on the device from its
// row count (no host sync), as lists of work items for the expert GEMM kernels.
// Includes expert_gemm.cuh.
//
// moe_expert_schedule   expert_offsets [n_slots + 1] -> decode_items [decode_capacity],
//                       tiled_items [tiled_capacity], item_counts [3]
//   grid 1, block 32: one warp. Lane l looks at slots l, l + 32, ... (32 at a time, in
//   order); with c the slot's row count:
//     c == 0                                  no item
//     c <= decode_max_rows                    one decode item (all c rows)
//     c >  decode_max_rows, tile_rows > 0     ceil(c / tile_rows) tiled items of tile_rows
//                                             rows (the last one shorter)
//     c >  decode_max_rows, tile_rows == 0    ceil(c / DECODE_ITEM_ROWS) decode items
//   Items are written in slot order, then row order (a warp prefix sum of the per-slot item
//   counts: integers, so no order question). item_counts = {decode items, tiled items,
//   overflow flag}; an item that does not fit its list is dropped and sets the flag (the
//   host sizes the lists so that this cannot happen; the tests check the flag).
//
//   The batch-invariant mode is decode_max_rows = DECODE_ITEM_ROWS, tile_rows = 0: every
//   slot runs through the decode kernel in chunks of at most DECODE_ITEM_ROWS rows, whose
//   per-row arithmetic does not depend on the chunk (see expert_gemm_decode.cu).
//
//   Bytes: 4 (n_slots + 1) read, 16 per item + 12 written. FLOPs: none. One launch of one
//   warp: a few microseconds of latency, no bandwidth.

#include "expert_gemm.cuh"

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

extern "C" __global__ void __launch_bounds__(32)
    moe_expert_schedule(const u32* __restrict__ expert_offsets, u32 n_slots, u32 decode_max_rows,
                        u32 tile_rows, u32 decode_capacity, u32 tiled_capacity,
                        GemmItem* __restrict__ decode_items, GemmItem* __restrict__ tiled_items,
                        u32* __restrict__ item_counts) {
    grid_dependency_sync();
    const u32 lane = threadIdx.x & 31u;
    decode_max_rows = min(decode_max_rows, (u32)DECODE_ITEM_ROWS);
    u32 decode_total = 0, tiled_total = 0, overflow = 0;
    for (u32 base = 0; base < n_slots; base += 32) {
        const u32 slot = base + lane;
        u32 begin = 0, rows = 0;
        if (slot < n_slots) {
            begin = expert_offsets[slot];
            rows = expert_offsets[slot + 1] - begin;
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
