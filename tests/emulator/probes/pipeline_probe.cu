// pipeline_probe.cu: a producer/consumer ring over pipeline.cuh, the shape issue 13's
// warp-specialised kernels take, small enough to check exactly. Not a registry kernel:
// tests/cuda_pipeline.rs runs it on the emulator and on the GPU (GpuContext::load), and
// tests/cuda_static.rs compiles it with NVRTC for sm_90a.
//
// probe_ring_sum   out[j] = sum over chunks c (ascending) of rows[c * PROBE_CHUNK + j],
//   j < PROBE_CHUNK; rows [n_chunks, PROBE_CHUNK] f32. One CTA of 4 warps: lane 0 of warp
//   0 streams the chunks into PROBE_STAGES shared stages with bulk copies (full mbarrier:
//   one arrival with the stage's bytes); warps 1..3 (96 threads, 4 columns each) wait for
//   a stage, add it, and arrive on its empty mbarrier (96 arrivals), which the producer
//   waits for before it refills the stage.

#include "common.cuh"
#include "expert_gemm.cuh"
#include "pipeline.cuh"

#define PROBE_STAGES 3
#define PROBE_CONSUMERS 96
#define PROBE_CHUNK (PROBE_CONSUMERS * 4)  // floats per chunk
#define PROBE_BYTES (PROBE_CHUNK * 4)      // bytes per stage
#define PROBE_DATA 128                     // the stages' offset in shared memory

extern "C" __global__ void __launch_bounds__(128)
    probe_ring_sum(const float* __restrict__ rows, u32 n_chunks, float* __restrict__ out) {
    DECLARE_DYNAMIC_SMEM(smem, 128);
    const u32 base = smem_u32(smem);
    auto full = [&](u32 s) { return base + 8 * s; };
    auto empty = [&](u32 s) { return base + 8 * (PROBE_STAGES + s); };
    if (threadIdx.x == 0) {
        for (u32 s = 0; s < PROBE_STAGES; ++s) {
            mbar_init(full(s), 1);
            mbar_init(empty(s), PROBE_CONSUMERS);
        }
        fence_mbarrier_init();
    }
    __syncthreads();

    if (threadIdx.x < 32) {
        if (threadIdx.x != 0) return;
        const u64 policy = l2_evict_first();
        for (u32 c = 0; c < n_chunks; ++c) {
            const u32 s = c % PROBE_STAGES, round = c / PROBE_STAGES;
            mbar_wait(empty(s), (round & 1u) ^ 1u);
            mbar_arrive_expect_tx(full(s), PROBE_BYTES);
            bulk_copy_g2s(base + PROBE_DATA + s * PROBE_BYTES, rows + (u64)c * PROBE_CHUNK, PROBE_BYTES, full(s),
                          policy);
        }
        return;
    }

    const u32 i = threadIdx.x - 32;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (u32 c = 0; c < n_chunks; ++c) {
        const u32 s = c % PROBE_STAGES, round = c / PROBE_STAGES;
        mbar_wait(full(s), round & 1u);
        const float4 v = *reinterpret_cast<const float4*>(smem + PROBE_DATA + s * PROBE_BYTES + 16 * i);
        acc[0] = __fadd_rn(acc[0], v.x);
        acc[1] = __fadd_rn(acc[1], v.y);
        acc[2] = __fadd_rn(acc[2], v.z);
        acc[3] = __fadd_rn(acc[3], v.w);
        mbar_arrive(empty(s));
    }
    store_global_16(out + 4 * i, make_float4(acc[0], acc[1], acc[2], acc[3]));
}
