// cuda_shim.h: just enough of CUDA's device language to run every dots-moe kernel file on
// the CPU, one std::thread per CUDA thread, CTAs one after another in a seeded order
// (emu.cpp: CUDA promises no order, so a kernel that assumes one can fail here). A logic check
// for machines without a GPU, driven from Rust (tests/kernel_support). It proves nothing
// about speed, memory ordering between CTAs, or the real compiler.
//
// Warps take turns (`Turns`): one warp of a CTA runs at a time, its 32 lanes together, from
// one CTA-wide or warpgroup-wide barrier to the next; whenever the running warp has parked
// every live lane at such a barrier (or exited), the next warp is drawn from a seeded
// generator among those not waiting. So the code between two barriers runs warp by warp in
// a random but reproducible order (DOTS_MOE_EMU_SEED), and a shared-memory handoff between
// warps that lacks its __syncthreads reads stale or poisoned bytes instead of passing by
// luck. DOTS_MOE_EMU_SCHEDULE=free lets every thread run at once instead.
//
// The emulator is built with -fsanitize=alignment (tests/kernel_support): float4, uint4 and
// float2 carry their CUDA alignment, so a kernel's own misaligned vector access aborts.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
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
#define __grid_constant__
// The kernels' dynamic shared memory is the running CTA's buffer (common.cuh).
#define DECLARE_DYNAMIC_SMEM(name, align) unsigned char* name = emu::dynamic_smem

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
using std::exp;

namespace emu {
[[noreturn]] inline void fail(const char* what) {
    fprintf(stderr, "emulator: %s (thread %u of CTA (%u, %u))\n", what, threadIdx.x, blockIdx.x, blockIdx.y);
    std::abort();
}

// Turns passed and waits released so far (a watchdog in emu.cpp aborts a run in which this
// stops moving: a hang).
inline std::atomic<unsigned long long> progress{0};

// A CTA-wide or warpgroup-wide barrier of the turn-taking launcher.
struct TurnBarrier {
    unsigned expected = 0;  // threads that have not exited
    unsigned arrived = 0;
    unsigned long long phase = 0;
};

// Which warp of the running CTA may run (see the top of this file).
class Turns {
public:
    Turns(unsigned threads, unsigned long long seed, bool free)
        : n_warps_((threads + 31) / 32), warps_(new WarpState[n_warps_]), rng_(seed), free_(free) {
        for (unsigned w = 0; w < n_warps_; ++w) warps_[w].live = std::min(32u, threads - 32 * w);
        running_ = free_ ? 0 : (unsigned)(rng_() % n_warps_);
    }

    // Blocks the calling thread until its warp's turn (at the start of the CTA).
    void begin(unsigned warp) {
        std::unique_lock<std::mutex> lock(m_);
        warps_[warp].cv.wait(lock, [&] { return free_ || running_ == warp; });
    }

    // Arrives at `b` and waits until every thread of `b` has arrived and it is this warp's
    // turn again.
    void arrive_and_wait(TurnBarrier& b, unsigned warp) {
        std::unique_lock<std::mutex> lock(m_);
        const unsigned long long phase = b.phase;
        park(lock, &b, warp, [&] {
            if (++b.arrived == b.expected) release(b);
        }, [&] { return b.phase != phase; });
    }

    // Waits until `done()` holds (evaluated with the lock held) and it is this warp's turn;
    // `key` names what is waited for, and whoever makes `done()` true calls `wake(key)`.
    template <class Done>
    void wait_for(const void* key, unsigned warp, Done done) {
        std::unique_lock<std::mutex> lock(m_);
        if (done()) return;
        park(lock, key, warp, [] {}, done);
    }

    // Runs `f` with the lock held (the state of what `wait_for` waits on).
    template <class F>
    auto locked(F f) {
        std::lock_guard<std::mutex> lock(m_);
        return f();
    }

    // Lock held (inside `locked`): the warps parked on `key` may go on when their turn comes.
    void wake(const void* key) {
        for (unsigned w = 0; w < n_warps_; ++w) {
            if (warps_[w].at == key) {
                warps_[w].parked = 0;
                warps_[w].at = nullptr;
                warps_[w].waiting = false;
            }
        }
        progress.fetch_add(1, std::memory_order_relaxed);
        if (free_) {
            for (unsigned w = 0; w < n_warps_; ++w) warps_[w].cv.notify_all();
        }
    }

    // The calling thread leaves the CTA: it no longer counts at `bars` (arrive and drop).
    void exit(unsigned warp, std::initializer_list<TurnBarrier*> bars) {
        std::unique_lock<std::mutex> lock(m_);
        WarpState& me = warps_[warp];
        --me.live;
        for (TurnBarrier* b : bars) {
            --b->expected;
            if (b->expected > 0 && b->arrived == b->expected) release(*b);
        }
        if (me.parked == me.live) {
            me.waiting = me.live > 0 && me.parked > 0;
            pass();
        }
    }

private:
    struct WarpState {
        unsigned live = 0;                 // lanes that have not exited
        unsigned parked = 0;               // lanes waiting at `at`
        const void* at = nullptr;          // what they wait for
        bool waiting = false;              // every live lane is parked at `at`
        std::condition_variable cv;
    };

    // Lock held: the calling lane parks on `key` (after `arrive`, which may wake it) until
    // `done()`; when that leaves every live lane of its warp parked, the turn passes.
    template <class Arrive, class Done>
    void park(std::unique_lock<std::mutex>& lock, const void* key, unsigned warp, Arrive arrive, Done done) {
        WarpState& me = warps_[warp];
        if (me.parked > 0 && me.at != key) fail("lanes of one warp wait for different things");
        me.at = key;
        ++me.parked;
        const bool whole_warp = me.parked == me.live;
        if (whole_warp) me.waiting = true;
        arrive();
        if (whole_warp) pass();
        me.cv.wait(lock, [&] { return done() && (free_ || running_ == warp); });
    }

    // Lock held: every thread parked at `b` may go on (when its warp's turn comes).
    void release(TurnBarrier& b) {
        b.arrived = 0;
        ++b.phase;
        wake(&b);
    }

    // Lock held, the running warp cannot go on: the next turn goes to a warp drawn among
    // those with live lanes that are not waiting.
    void pass() {
        if (free_) return;
        std::vector<unsigned> ready;
        bool live = false;
        for (unsigned w = 0; w < n_warps_; ++w) {
            live |= warps_[w].live > 0;
            if (warps_[w].live > 0 && !warps_[w].waiting) ready.push_back(w);
        }
        if (ready.empty()) {
            if (live) fail("every warp waits (at a barrier or an mbarrier phase) for what can never complete");
            running_ = n_warps_;
            return;
        }
        running_ = ready[rng_() % ready.size()];
        progress.fetch_add(1, std::memory_order_relaxed);
        warps_[running_].cv.notify_all();
    }

    unsigned n_warps_;
    std::unique_ptr<WarpState[]> warps_;
    std::mt19937_64 rng_;
    bool free_;
    unsigned running_;
    std::mutex m_;
};

struct Warp {
    std::barrier<> bar{32};
    unsigned long long slots[32];
    unsigned frag[32][10];  // mma / ldmatrix operands of each lane (gemm_shim.h)
};
// A warpgroup's wgmma state (ptx_models.h): the accumulators of the operations issued and
// not yet waited for, and the operands each read at issue (compared again when its group
// completes at a wait_group).
struct Group {
    TurnBarrier bar;
    float* acc[128];              // each thread's accumulator array, as the last wgmma saw it
    float pending[128][128];      // the accumulators once the in-flight wgmmas complete
    bool has_pending = false;
    struct Operands {
        unsigned long long desc_a, desc_b;
        std::vector<float> values;
    };
    std::vector<Operands> open;                     // issued since the last commit_group
    std::vector<std::vector<Operands>> committed;  // the committed groups in flight, oldest first
    bool complete = false;                         // nothing in flight (set at a wait_group)
};
// An mbarrier of pipeline.cuh (its state; the 8 bytes in shared memory are not used) and
// the bulk copies that complete on it (ptx_models.h).
struct BulkCopy {
    unsigned dst;
    const void* src;  // the bytes, or null when `staged` holds them (a tensor copy's box)
    unsigned bytes;
    std::vector<unsigned char> staged;
};
struct MBarrier {
    unsigned count = 0;    // arrivals per phase
    unsigned pending = 0;  // arrivals the running phase still needs
    long long tx = 0;      // bytes announced by expect_tx and not yet landed
    unsigned long long phase = 0;  // phases completed
    std::vector<BulkCopy> in_flight;
};

struct Block {
    std::unique_ptr<Turns> turns;
    std::map<unsigned, MBarrier> mbarriers;  // by shared address
    TurnBarrier bar;
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

namespace emu {
// The calling thread's warp index in its CTA.
inline unsigned warp_index() { return threadIdx.x / 32; }
inline void sync(TurnBarrier& b) { block->turns->arrive_and_wait(b, warp_index()); }
}  // namespace emu

inline void __syncthreads() { emu::sync(emu::block->bar); }
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

inline unsigned atomicAdd(unsigned* address, unsigned v) {
    return std::atomic_ref<unsigned>(*address).fetch_add(v);
}
inline unsigned atomicExch(unsigned* address, unsigned v) {
    return std::atomic_ref<unsigned>(*address).exchange(v);
}
// A device-wide fence. The CTAs of a launch run one after another here (in a seeded order,
// emu.cpp), so what it orders between CTAs already holds; it orders this thread's accesses
// like a sequentially consistent fence.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// ld.global.cg: a load cached in L2 only, never a stale L1 line. One memory here.
template <class T>
T __ldcg(const T* p) {
    return *p;
}

inline unsigned long long __cvta_generic_to_shared(const void* p) {
    return (unsigned long long)((const unsigned char*)p - emu::dynamic_smem) + emu::SMEM_WINDOW_START;
}
