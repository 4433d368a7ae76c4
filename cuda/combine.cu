// combine.cu: step 5 of the MoE contract (src/moe/combine.rs). Includes common.cuh.
//
// moe_combine   out [T, H] (f32) = per token, the sum of its `slots` (= slots_per_token)
//               already-weighted expert rows expert_rows [T slots, H] (f32, permuted order),
//               read through pair_rows [T slots]
//   grid (T, ceil(H / (4 * COMBINE_THREADS))), block COMBINE_THREADS. One CTA owns one
//   token's row (or 4 * COMBINE_THREADS columns of it); its `slots` row indices are staged in
//   shared memory, then each thread owns 4 consecutive columns (16-byte float4 loads and
//   one 128-bit store; one column a thread when H % 4 != 0) and adds the token's rows in
//   slot order j = 0..slots-1, starting from 0.0f, one f32 add per slot: exactly the CPU's
//   sum, so the output is bit-identical to it and run to run. No atomics; a token's output
//   depends on its own rows only. Bytes: 4 T slots H read + 4 T H written + 4 T slots.
//   FLOPs: T slots H adds.

#include "common.cuh"

#define COMBINE_THREADS 256
#define COMBINE_MAX_SLOTS 64

extern "C" __global__ void __launch_bounds__(COMBINE_THREADS)
    moe_combine(const float* __restrict__ expert_rows, const u32* __restrict__ pair_rows,
                u32 slots_per_token, u64 hidden_size, u32 vectorized, float* __restrict__ out) {
    grid_dependency_sync();
    __shared__ u32 rows[COMBINE_MAX_SLOTS];
    const u64 token = blockIdx.x;
    const u32 slots = slots_per_token;
    for (u32 j = threadIdx.x; j < slots; j += COMBINE_THREADS) rows[j] = pair_rows[token * slots + j];
    __syncthreads();
    float* dst = out + token * hidden_size;
    if (vectorized) {
        const u64 k = ((u64)blockIdx.y * COMBINE_THREADS + threadIdx.x) * 4;
        if (k >= hidden_size) return;
        store_global_16(dst + k, sum_slots4<false>(expert_rows, rows, slots, hidden_size, k));
    } else {
        const u64 end = min(hidden_size, ((u64)blockIdx.y + 1) * COMBINE_THREADS * 4);
        for (u64 k = (u64)blockIdx.y * COMBINE_THREADS * 4 + threadIdx.x; k < end; k += COMBINE_THREADS) {
            float acc = 0.0f;
            for (u32 j = 0; j < slots; ++j) acc = __fadd_rn(acc, expert_rows[(u64)rows[j] * hidden_size + k]);
            dst[k] = acc;
        }
    }
}
