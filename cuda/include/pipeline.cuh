// pipeline.cuh: the Hopper (sm_90) asynchronous pipeline primitives: mbarriers with
// transaction counts, and bulk copies from global to shared memory that complete on an
// mbarrier (`#include "pipeline.cuh"` after common.cuh). For producer/consumer rings of
// shared-memory stages: the producer announces a stage's bytes (arrive.expect_tx) and
// issues its bulk copies; consumers wait for the stage's phase, use it, and arrive on its
// "empty" mbarrier; the producer waits for that before it refills the stage.
//
// Semantics relied on (PTX ISA, "mbarrier" and "cp.async.bulk"):
//  - An mbarrier's phase completes when its pending arrival count reaches 0 and its
//    transaction count is 0; it then re-arms with the count given at init.
//  - arrive.expect_tx adds `bytes` to the transaction count, then arrives; each bulk copy
//    subtracts its bytes when they have landed (complete_tx).
//  - try_wait.parity P returns once the phase of parity P has completed: on a fresh
//    mbarrier (phase 0 running), P = 1 returns at once and P = 0 waits.
//  - Bulk copy sizes and both addresses are multiples of 16 bytes.
// The CPU emulator models each of these (tests/emulator/ptx_models.h): a stage read
// before its phase completes is poison, a wrong transaction count aborts.

#pragma once

// A TMA tensor map (the driver's CUtensorMap: 128 opaque bytes, 64-byte aligned), passed to
// a kernel by value as a `const __grid_constant__` parameter, so that its address is a
// valid operand of the tensor copies below. The launcher encodes it from a
// `TensorMapSpec` (src/cuda/launch.rs): cuTensorMapEncodeTiled on a device, the emulator's
// own encoding on the CPU (tests/emulator/ptx_models.h).
struct __align__(64) TmaMap {
    u64 opaque[16];
};

#ifndef DOTS_MOE_EMULATE

// mbarrier at shared address `bar`, completing a phase after `count` arrivals.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrives once at `bar`.
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Adds `bytes` to the phase's expected transactions, then arrives once at `bar`.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Waits until the phase of parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// `bytes` (a multiple of 16) from global `src` to shared `dst` (both 16-byte aligned),
// completing on `bar`'s transaction count; `policy` is an L2 cache policy
// (createpolicy, e.g. l2_evict_first() for weights read once).
__device__ __forceinline__ void bulk_copy_g2s(u32 dst, const void* src, u32 bytes, u32 bar, u64 policy) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
        "%4;\n" ::"r"(dst),
        "l"(src), "r"(bytes), "r"(bar), "l"(policy)
        : "memory");
}

// The box of the 2-D tensor `map` at (c0 inner elements, c1 rows) into shared `dst`,
// completing on `bar`'s transaction count with the box's full size (elements outside the
// tensor are written as zeros and still count). With the 128-byte swizzle, `dst` is
// 1024-byte aligned and 16-byte chunk c of box row r lands at chunk c ^ (r & 7): the wgmma
// operand layout (wgmma.cuh).
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
        "[%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// tma_load_2d with an L2 cache policy (createpolicy, e.g. l2_evict_first() for weights
// read once).
__device__ __forceinline__ void tma_load_2d_hint(u32 dst, const TmaMap* map, int c0, int c1, u32 bar, u64 policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, "
        "{%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(bar), "l"(policy)
        : "memory");
}

// Makes mbarrier initialisation visible to the async proxy (the bulk copies) before any
// copy completes on it; then a __syncthreads makes it visible to the other threads.
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

#endif  // DOTS_MOE_EMULATE
