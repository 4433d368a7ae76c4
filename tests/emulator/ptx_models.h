// ptx_models.h: C++ models of the PTX wrappers of cuda/include/common.cuh,
// cuda/include/expert_gemm.cuh, cuda/include/wgmma.cuh, cuda/include/pipeline.cuh and
// cuda/expert_gemm_ws.cu (compiled out there when
// DOTS_MOE_EMULATE is defined), written from the PTX ISA's definitions of the
// instructions, not from the kernels' index math.
// Included after common.cuh (for u32 / u64 / u16).
#pragma once
#include "pipeline.cuh"  // TmaMap

inline float bf16_bits_to_f32(u32 bits) { return __uint_as_float((bits & 0xffffu) << 16); }

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Every 16-byte vector access of the wrappers must be 16-byte aligned (the hardware's rule).
inline void check_aligned_16(const void* p, const char* what) {
    if (((uintptr_t)p & 15u) != 0) {
        fprintf(stderr, "%s: misaligned 16-byte access at %p\n", what, p);
        std::abort();
    }
}

__device__ __forceinline__ uint4 load_stream_16(const void* p) {
    check_aligned_16(p, "ld.global.nc.v4");
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}

__device__ __forceinline__ uint4 load_shared_16(const void* p) { return load_stream_16(p); }

// st.global.v4 (common.cuh).
inline void store_global_16(void* p, float4 v) {
    check_aligned_16(p, "st.global.v4.f32");
    std::memcpy(p, &v, 16);
}
inline void store_global_16(void* p, uint4 v) {
    check_aligned_16(p, "st.global.v4.u32");
    std::memcpy(p, &v, 16);
}

// ---- cp.async, asynchronously ----------------------------------------------------------
//
// A copy's destination is poisoned (0xff bytes: bf16 NaN) when it is issued; its bytes
// land only at the cp.async.wait_group that retires its group. Groups are per thread, in
// commit order. So a wait that leaves the stage's group in flight, or a read before the
// barrier that follows every thread's wait, reads NaN. The ranges that landed are recorded
// until the thread's fence.proxy.async (what a wgmma needs before it reads them).
namespace emu {
struct Copy {
    unsigned dst;
    const void* src;
    bool zero;
};
struct CopyState {
    std::vector<Copy> open;                 // issued, not yet committed
    std::vector<std::vector<Copy>> groups;  // committed, oldest first
};
inline thread_local CopyState copies;

// Called by the launcher before each CTA: nothing of the previous CTA stays in flight.
inline void reset_thread_state() {
    copies = CopyState{};
}

inline void land(const std::vector<Copy>& group) {
    std::vector<std::pair<unsigned, unsigned>> ranges;
    for (const Copy& c : group) {
        if (c.zero) {
            std::memset(smem_at(c.dst), 0, 16);
        } else {
            std::memcpy(smem_at(c.dst), c.src, 16);
        }
        ranges.emplace_back(c.dst, c.dst + 16);
    }
    std::lock_guard<std::mutex> lock(block->unfenced_lock);
    auto& mine = block->unfenced[threadIdx.x];
    mine.insert(mine.end(), ranges.begin(), ranges.end());
}
}  // namespace emu

// cp.async of 16 bytes (zero fill when src_bytes is 0).
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, u32 src_bytes) {
    if (src_bytes != 0 && src_bytes != 16) std::abort();
    check_aligned_16(src, "cp.async source");
    if ((dst & 15u) != 0) {
        fprintf(stderr, "cp.async: misaligned 16-byte destination %u\n", dst);
        std::abort();
    }
    std::memset(emu::smem_at(dst), 0xff, 16);
    emu::copies.open.push_back(emu::Copy{dst, src, src_bytes == 0});
}

__device__ __forceinline__ void cp_async_commit() {
    emu::copies.groups.push_back(std::move(emu::copies.open));
    emu::copies.open.clear();
}

// Retires this thread's oldest groups until at most N are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    auto& groups = emu::copies.groups;
    while (groups.size() > (size_t)N) {
        emu::land(groups.front());
        groups.erase(groups.begin());
    }
}

// ldmatrix.m8n8.x4.b16: lane l gives the row address of row (l % 8) of matrix (l / 8);
// lane l receives, of each matrix m, row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1.
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], u32 addr) {
    emu::Warp* w = emu::warp;
    const unsigned lane = emu::lane;
    w->frag[lane][0] = addr;
    w->bar.arrive_and_wait();
    for (unsigned m = 0; m < 4; ++m) {
        const u32 row_addr = w->frag[8 * m + lane / 4][0];
        if (row_addr & 15u) std::abort();
        std::memcpy(&r[m], emu::smem_at(row_addr + 4 * (lane % 4)), 4);
    }
    w->bar.arrive_and_wait();
}

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32, from the PTX ISA's fragment figures:
// A (16 x 16): lane = 4 (row % 8) + (k % 8) / 2, register = (row >= 8) + 2 (k >= 8),
// half = k % 2. B (16 x 8): lane = 4 n + (k % 8) / 2, register = (k >= 8), half = k % 2.
// C (16 x 8): lane = 4 (row % 8) + col / 2, register = 2 (row >= 8) + col % 2.
__device__ __forceinline__ void mma_16816(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    emu::Warp* w = emu::warp;
    const unsigned lane = emu::lane;
    unsigned* f = w->frag[lane];
    f[0] = a0, f[1] = a1, f[2] = a2, f[3] = a3, f[4] = b0, f[5] = b1;
    w->bar.arrive_and_wait();
    auto half = [](u32 word, unsigned h) { return bf16_bits_to_f32(h ? word >> 16 : word); };
    auto A = [&](unsigned row, unsigned k) {
        return half(w->frag[4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2);
    };
    auto B = [&](unsigned k, unsigned n) { return half(w->frag[4 * n + (k % 8) / 2][4 + (k >= 8)], k % 2); };
    float out[4];
    for (unsigned reg = 0; reg < 4; ++reg) {
        const unsigned row = lane / 4 + 8 * (reg / 2), col = 2 * (lane % 4) + reg % 2;
        float acc = c[reg];
        for (unsigned k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        out[reg] = acc;
    }
    w->bar.arrive_and_wait();
    for (unsigned reg = 0; reg < 4; ++reg) c[reg] = out[reg];
}

// ---- wgmma, asynchronously --------------------------------------------------------------
//
// wgmma.mma_async reads its shared-memory operands at issue (they must be visible to the
// async proxy: every range a cp.async landed there must have been fenced by its thread
// with fence.proxy.async, else the emulator aborts), and writes the accumulators only at
// wgmma.wait_group: in between they are poisoned (NaN), so reading them early, or never
// waiting, shows. The operands are read again at the wait and must not have changed. The
// registers must not be written between a wait and the next wgmma unless a wgmma.fence
// comes in between (a thread's accumulators are compared with what the wgmma left).
namespace emu {
struct WgmmaThread {
    bool fenced = false;
    bool known = false;      // `last` holds what the last wgmma (or its wait) left
    float last[128];
};
inline thread_local WgmmaThread wgmma_state;

inline void reset_wgmma_thread() {
    wgmma_state = WgmmaThread{};
}

}  // namespace emu

__device__ __forceinline__ void wgmma_fence() { emu::wgmma_state.fenced = true; }
// wgmma.commit_group: the wgmmas issued since the last commit become one group.
__device__ __forceinline__ void wgmma_commit() {
    emu::Group* g = emu::group;
    if (threadIdx.x % 128 == 0) {
        g->committed.push_back(std::move(g->open));
        g->open.clear();
    }
}

__device__ __forceinline__ void fence_proxy_async_shared() {
    std::lock_guard<std::mutex> lock(emu::block->unfenced_lock);
    emu::block->unfenced[threadIdx.x].clear();
}
__device__ __forceinline__ void fence_accumulators(float*) {}

// Element (row, k) of a K-major operand with a 128-byte-swizzle descriptor (PTX ISA,
// "matrix descriptor" and the canonical layouts): 8-row groups `stride byte offset` apart,
// rows 128 bytes apart inside a group, then the swizzle on the shared-memory address:
// bits 4..6 ^= bits 7..9.
inline unsigned desc_address(u64 desc, unsigned row, unsigned k) {
    if ((desc >> 62) != 1) {
        fprintf(stderr, "descriptor: swizzle mode %llu, expected 1 (128 B)\n", (unsigned long long)(desc >> 62));
        std::abort();
    }
    if (((desc >> 49) & 7u) != 0) std::abort();  // base offset: 0 for 1024-aligned operands
    const u32 start = (u32)(desc & 0x3FFFu) << 4;
    const u32 stride = (u32)((desc >> 32) & 0x3FFFu) << 4;
    u32 addr = start + (row / 8) * stride + (row % 8) * 128 + 2 * k;
    addr ^= ((addr >> 7) & 7u) << 4;
    return addr;
}

inline float desc_element(u64 desc, unsigned row, unsigned k) {
    u16 bits;
    std::memcpy(&bits, emu::smem_at(desc_address(desc, row, k)), 2);
    return bf16_bits_to_f32(bits);
}

// The operands of one m64n256k16: A 64 x 16 then B 256 x 16, after checking that every
// byte read was made visible to the async proxy.
inline std::vector<float> wgmma_operands(u64 desc_a, u64 desc_b, bool check) {
    std::vector<float> v;
    v.reserve((64 + 256) * 16);
    std::vector<std::pair<unsigned, unsigned>> unfenced;
    if (check) {
        std::lock_guard<std::mutex> lock(emu::block->unfenced_lock);
        for (const auto& t : emu::block->unfenced) unfenced.insert(unfenced.end(), t.begin(), t.end());
    }
    auto read = [&](u64 desc, unsigned rows) {
        for (unsigned m = 0; m < rows; ++m) {
            for (unsigned k = 0; k < 16; ++k) {
                const unsigned a = desc_address(desc, m, k);
                for (const auto& r : unfenced) {
                    if (a >= r.first && a < r.second) {
                        emu::fail("wgmma reads shared memory that cp.async wrote and no fence.proxy.async made visible");
                    }
                }
                v.push_back(desc_element(desc, m, k));
            }
        }
    };
    read(desc_a, 64);
    read(desc_b, 256);
    return v;
}

// wgmma.mma_async m64n256k16 f32 += bf16 x bf16, A and B K-major from descriptors. The
// accumulator of thread t (warp w = t / 32, lane l): d[4 j + 2 h + v] = D[16 w + l / 4 +
// 8 h][8 j + 2 (l % 4) + v].
__device__ __forceinline__ void wgmma_m64n256k16(float d[128], u64 desc_a, u64 desc_b) {
    emu::Group* g = emu::group;
    const unsigned t = threadIdx.x % 128;
    auto& me = emu::wgmma_state;
    if (!me.fenced && (!me.known || std::memcmp(me.last, d, sizeof me.last) != 0)) {
        emu::fail("accumulators written outside wgmma without a wgmma.fence before the next wgmma");
    }
    if (g->has_pending && g->acc[t] != d) {
        emu::fail("a wgmma adds to other accumulators than the wgmmas in flight (the emulator models one set)");
    }
    g->acc[t] = d;
    emu::sync(g->bar);
    if (t == 0) {
        if (!g->has_pending) {
            for (unsigned i = 0; i < 128; ++i) std::memcpy(g->pending[i], g->acc[i], sizeof g->pending[i]);
            g->has_pending = true;
        }
        std::vector<float> ops = wgmma_operands(desc_a, desc_b, true);
        const float* a = ops.data();
        const float* b = ops.data() + 64 * 16;
        for (unsigned m = 0; m < 64; ++m) {
            for (unsigned n = 0; n < 256; ++n) {
                const unsigned thread = 32 * (m / 16) + 4 * (m % 8) + (n % 8) / 2;
                const unsigned reg = 4 * (n / 8) + 2 * ((m % 16) / 8) + n % 2;
                float acc = g->pending[thread][reg];
                for (unsigned k = 0; k < 16; ++k) acc += a[m * 16 + k] * b[n * 16 + k];
                g->pending[thread][reg] = acc;
            }
        }
        g->open.push_back(emu::Group::Operands{desc_a, desc_b, std::move(ops)});
    }
    emu::sync(g->bar);
    // In flight: the registers hold nothing yet.
    for (unsigned i = 0; i < 128; ++i) d[i] = NAN;
    std::memcpy(me.last, d, sizeof me.last);
    me.known = true;
    me.fenced = false;
}

// wgmma.wait_group N: every committed group but the newest N completes (its operands are
// compared with what they were at issue). The accumulators are written once nothing of
// theirs is left in flight (the kernels keep one accumulator set per thread, which every
// in-flight wgmma adds to); until then they stay poisoned.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
    emu::Group* g = emu::group;
    const unsigned t = threadIdx.x % 128;
    emu::sync(g->bar);
    if (t == 0) {
        while (g->committed.size() > (size_t)N) {
            for (const auto& op : g->committed.front()) {
                if (wgmma_operands(op.desc_a, op.desc_b, false) != op.values) {
                    emu::fail("a wgmma's shared-memory operands changed before its wait_group");
                }
            }
            g->committed.erase(g->committed.begin());
        }
        g->complete = g->committed.empty() && g->open.empty();
    }
    emu::sync(g->bar);
    if (g->complete) {
        if (g->has_pending) std::memcpy(g->acc[t], g->pending[t], sizeof g->pending[t]);
        std::memcpy(emu::wgmma_state.last, g->acc[t], sizeof emu::wgmma_state.last);
        emu::wgmma_state.known = true;
    }
    emu::sync(g->bar);
    if (t == 0 && g->complete) g->has_pending = false;
    emu::sync(g->bar);
}

// ---- mbarriers and bulk copies (pipeline.cuh), asynchronously -------------------------
//
// An mbarrier counts the arrivals of its running phase and the transaction bytes announced
// (expect_tx) against those landed. A bulk copy poisons its destination (0xff) when issued
// and lands only once every arrival of its mbarrier's phase is in; the phase then completes
// if the bytes balance, and aborts if more bytes landed than were announced (fewer: the
// phase never completes, and the run aborts when every warp waits). A wait for a phase of
// the wrong parity returns before its copies land (poison) or never.
namespace emu {
// Lock held (Turns::locked).
inline MBarrier& mbarrier_at(unsigned addr) {
    auto it = block->mbarriers.find(addr);
    if (it == block->mbarriers.end()) fail("an mbarrier used before mbarrier.init");
    return it->second;
}

// Lock held: once every arrival of the phase is in, its copies land, and the phase
// completes when the transaction bytes balance.
inline void mbarrier_progress(MBarrier& m) {
    if (m.pending != 0) return;
    for (const BulkCopy& c : m.in_flight) {
        std::memcpy(smem_at(c.dst), c.src ? c.src : c.staged.data(), c.bytes);
        m.tx -= c.bytes;
    }
    m.in_flight.clear();
    if (m.tx < 0) fail("bulk copies landed more bytes than the phase's expect_tx announced");
    if (m.tx > 0) return;
    ++m.phase;
    m.pending = m.count;
    block->turns->wake(&m);
}
}  // namespace emu

inline void mbar_init(u32 bar, u32 count) {
    if ((bar & 7u) != 0 || count == 0) emu::fail("mbarrier.init: a misaligned mbarrier or a count of 0");
    emu::block->turns->locked([&] { emu::block->mbarriers[bar] = emu::MBarrier{count, count, 0, 0, {}}; });
}

inline void fence_mbarrier_init() {}

inline void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    emu::block->turns->locked([&] {
        emu::MBarrier& m = emu::mbarrier_at(bar);
        if (m.pending == 0) emu::fail("more arrivals at an mbarrier than its count");
        m.tx += bytes;
        --m.pending;
        emu::mbarrier_progress(m);
    });
}

inline void mbar_arrive(u32 bar) { mbar_arrive_expect_tx(bar, 0); }

inline void mbar_wait(u32 bar, u32 parity) {
    emu::MBarrier* m = emu::block->turns->locked([&] { return &emu::mbarrier_at(bar); });
    emu::block->turns->wait_for(m, emu::warp_index(), [m, parity] { return (m->phase & 1u) != (parity & 1u); });
}

inline void bulk_copy_g2s(u32 dst, const void* src, u32 bytes, u32 bar, u64) {
    if (bytes == 0 || bytes % 16 != 0) emu::fail("cp.async.bulk: a size that is not a positive multiple of 16");
    check_aligned_16(src, "cp.async.bulk source");
    if ((dst & 15u) != 0) emu::fail("cp.async.bulk: a misaligned shared destination");
    std::memset(emu::smem_at(dst), 0xff, bytes);
    emu::block->turns->locked([&] {
        emu::MBarrier& m = emu::mbarrier_at(bar);
        m.in_flight.push_back(emu::BulkCopy{dst, src, bytes, {}});
        emu::mbarrier_progress(m);
    });
}

// createpolicy: a cache hint has no effect on what the kernels compute.
inline u64 l2_evict_first() { return 0; }

// ---- TMA tensor copies (pipeline.cuh) and register reallocation, asynchronously ---------
//
// The emulator's encoding of a TmaMap (written by tests/kernel_support from a
// `TensorMapSpec`; a device gets the driver's): opaque[0] EMU_TMA_MAGIC, [1] the tensor's
// device address, [2] its inner extent (elements), [3] its rows, [4] the row pitch (bytes),
// [5] the box's inner extent (elements), [6] its rows, [7] the element size (bytes), [8] the
// swizzle span (bytes: 128).
//
// cp.async.bulk.tensor.2d (PTX ISA "cp.async.bulk.tensor", CUDA "Tensor Memory Access"):
// the box at (c0, c1) is read from the tensor, every element outside it (coordinates below
// 0 or past an extent) as zero, and written to shared memory at `dst` in rows of
// (box inner extent x element size) bytes, each 16-byte chunk then moved by the 128-byte
// swizzle, a function of the shared address: bits 4..6 ^= bits 7..9 (the same rule as the
// wgmma descriptor model above). The destination is poisoned at issue, and the box lands,
// and counts its full size against the mbarrier's transaction bytes, like a bulk copy.
constexpr unsigned long long EMU_TMA_MAGIC = 0x414d54756d45ull;  // "EmuTMA"

namespace emu {
static void* ptr(unsigned long long addr);
}

inline void tma_load_2d(u32 dst, const TmaMap* map, int c0, int c1, u32 bar) {
    const u64* w = map->opaque;
    if (w[0] != EMU_TMA_MAGIC) emu::fail("cp.async.bulk.tensor: the operand is not a tensor map");
    const u64 base = w[1], inner = w[2], rows = w[3], pitch = w[4], box_inner = w[5], box_rows = w[6], elem = w[7];
    const u64 row_bytes = box_inner * elem;
    if (w[8] != 128 || row_bytes != 128) {
        emu::fail("cp.async.bulk.tensor: the emulator models the 128-byte swizzle over 128-byte box rows only");
    }
    if ((dst & 1023u) != 0) emu::fail("cp.async.bulk.tensor: a 128-byte-swizzle destination not 1024-byte aligned");
    if (pitch % 16 != 0 || base % 16 != 0) emu::fail("cp.async.bulk.tensor: a tensor map with a misaligned address or pitch");
    // The whole tensor lies inside its buffer.
    emu::ptr(base + (rows - 1) * pitch + inner * elem);
    const unsigned bytes = (unsigned)(row_bytes * box_rows);
    std::vector<unsigned char> staged(bytes, 0);
    for (u64 r = 0; r < box_rows; ++r) {
        const long long gr = (long long)c1 + (long long)r;
        for (u64 e = 0; e < box_inner; ++e) {
            const long long ge = (long long)c0 + (long long)e;
            const unsigned addr = dst + (unsigned)(r * row_bytes + e * elem);
            const unsigned swizzled = addr ^ (((addr >> 7) & 7u) << 4);
            unsigned char* out = staged.data() + (swizzled - dst);
            if (gr >= 0 && (u64)gr < rows && ge >= 0 && (u64)ge < inner) {
                std::memcpy(out, emu::ptr(base + (u64)gr * pitch + (u64)ge * elem), elem);
            }
        }
    }
    std::memset(emu::smem_at(dst), 0xff, bytes);
    emu::block->turns->locked([&] {
        emu::MBarrier& m = emu::mbarrier_at(bar);
        m.in_flight.push_back(emu::BulkCopy{dst, nullptr, bytes, std::move(staged)});
        emu::mbarrier_progress(m);
    });
}

// The cache hint has no effect on what lands.
inline void tma_load_2d_hint(u32 dst, const TmaMap* map, int c0, int c1, u32 bar, u64) {
    tma_load_2d(dst, map, c0, c1, bar);
}

// setmaxnreg: a register budget has no effect on what the kernels compute.
template <int N>
inline void setmaxnreg_dec() {}
template <int N>
inline void setmaxnreg_inc() {}
