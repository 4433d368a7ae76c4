// cuda_shim.h: just enough of CUDA's device language to run every dots-moe kernel file on
// the CPU, one std::thread per CUDA thread, CTAs one after another (emu.cpp). A logic check
// for machines without a GPU, driven from Rust (tests/emulator_support). It proves nothing
// about speed, memory ordering between CTAs, or the real compiler.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __shared__ static
// The kernels' dynamic shared memory is the running CTA's buffer (common.cuh).
#define DECLARE_DYNAMIC_SMEM(name, align) unsigned char* name = emu::dynamic_smem

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
using std::exp;

namespace emu {
struct Warp {
    std::barrier<> bar{32};
    unsigned long long slots[32];
    unsigned frag[32][10];  // mma / ldmatrix operands of each lane (gemm_shim.h)
};
// A warpgroup's wgmma state (ptx_models.h): the accumulators of the operations issued and
// not yet waited for, and the operands each read at issue (compared again at the wait).
struct Group {
    std::barrier<> bar{128};
    float* acc[128];              // each thread's accumulator array, as the last wgmma saw it
    float pending[128][128];      // the accumulators once the in-flight wgmmas complete
    bool has_pending = false;
    struct Operands {
        unsigned long long desc_a, desc_b;
        std::vector<float> values;
    };
    std::vector<Operands> in_flight;
};
struct Block {
    std::unique_ptr<std::barrier<>> bar;
    std::unique_ptr<Warp[]> warps;
    std::unique_ptr<Group[]> groups;
    // Shared-memory ranges each thread's cp.async wrote (at its wait_group) and that no
    // fence.proxy.async of that thread has made visible to wgmma yet.
    std::mutex unfenced_lock;
    std::vector<std::vector<std::pair<unsigned, unsigned>>> unfenced;
};
extern thread_local Warp* warp;
extern thread_local Group* group;
extern thread_local unsigned lane;
extern thread_local Block* block;
extern unsigned char* dynamic_smem;

// The shared-window address of the first byte of the running CTA's dynamic shared memory
// (`dynamic_smem`): not 1024-aligned on purpose, so the wgmma kernels' own alignment is
// exercised.
constexpr unsigned SMEM_WINDOW_START = 16;

// Host pointer of shared-window address `a`.
inline unsigned char* smem_at(unsigned a) {
    if (a < SMEM_WINDOW_START) {
        fprintf(stderr, "shared address %u below the dynamic window\n", a);
        std::abort();
    }
    return dynamic_smem + (a - SMEM_WINDOW_START);
}

template <class T>
T exchange(T v, unsigned src) {
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    warp->slots[lane] = bits;
    warp->bar.arrive_and_wait();
    unsigned long long other = warp->slots[src];
    warp->bar.arrive_and_wait();
    T r;
    std::memcpy(&r, &other, sizeof(T));
    return r;
}
}  // namespace emu

inline void __syncthreads() { emu::block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp->bar.arrive_and_wait(); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) { return emu::exchange(v, emu::lane ^ (unsigned)offset); }
template <class T>
T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, (unsigned)src & 31u); }
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
    return emu::exchange(v, emu::lane >= delta ? emu::lane - delta : emu::lane);
}
inline int __any_sync(unsigned, int p) {
    emu::warp->slots[emu::lane] = p != 0;
    emu::warp->bar.arrive_and_wait();
    int any = 0;
    for (unsigned l = 0; l < 32; ++l) any |= emu::warp->slots[l] != 0;
    emu::warp->bar.arrive_and_wait();
    return any;
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
    emu::warp->slots[emu::lane] = v;
    emu::warp->bar.arrive_and_wait();
    unsigned mask = 0;
    for (unsigned l = 0; l < 32; ++l) {
        if (emu::warp->slots[l] == v) mask |= 1u << l;
    }
    emu::warp->bar.arrive_and_wait();
    return mask;
}
inline unsigned atomicMin(unsigned* address, unsigned v) {
    std::atomic_ref<unsigned> a(*address);
    unsigned old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

inline unsigned long long __cvta_generic_to_shared(const void* p) {
    return (unsigned long long)((const unsigned char*)p - emu::dynamic_smem) + emu::SMEM_WINDOW_START;
}
