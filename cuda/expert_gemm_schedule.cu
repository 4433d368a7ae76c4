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

extern "C" __global__ void __launch_bounds__(32)
    moe_expert_schedule(const u32* __restrict__ expert_offsets, u32 n_slots, u32 decode_max_rows,
                        u32 tile_rows, u32 decode_capacity, u32 tiled_capacity,
                        GemmItem* __restrict__ decode_items, GemmItem* __restrict__ tiled_items,
                        u32* __restrict__ item_counts) {
    grid_dependency_sync();
    schedule_items(expert_offsets, n_slots, decode_max_rows, tile_rows, decode_capacity, tiled_capacity, decode_items,
                   tiled_items, item_counts);
}
