// ptx_models.h: C++ models of the PTX wrappers of cuda/include/expert_gemm.cuh and
// cuda/expert_gemm_wgmma.cu (compiled out there when DOTS_MOE_EMULATE is defined), written
// from the PTX ISA's definitions of the instructions, not from the kernels' index math.
// Included after common.cuh (for u32 / u64 / u16).
#pragma once

inline float bf16_bits_to_f32(u32 bits) { return __uint_as_float((bits & 0xffffu) << 16); }

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ uint4 load_stream_16(const void* p) {
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}

__device__ __forceinline__ uint4 load_shared_16(const void* p) { return load_stream_16(p); }

// cp.async: modelled as an immediate copy (zero fill when src_bytes is 0).
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, u32 src_bytes) {
    if (src_bytes != 0 && src_bytes != 16) std::abort();
    if (((uintptr_t)src & 15u) != 0 || (dst & 15u) != 0) {
        fprintf(stderr, "cp.async: misaligned 16-byte copy\n");
        std::abort();
    }
    if (src_bytes == 16) {
        std::memcpy(emu::smem_at(dst), src, 16);
    } else {
        std::memset(emu::smem_at(dst), 0, 16);
    }
}
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}

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

// ---- wgmma -----------------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N>
__device__ __forceinline__ void wgmma_wait() {}
__device__ __forceinline__ void fence_proxy_async_shared() {}
__device__ __forceinline__ void fence_accumulators(float*) {}

// Element (row, k) of a K-major operand with a 128-byte-swizzle descriptor (PTX ISA,
// "matrix descriptor" and the canonical layouts): 8-row groups `stride byte offset` apart,
// rows 128 bytes apart inside a group, then the swizzle on the shared-memory address:
// bits 4..6 ^= bits 7..9.
inline float desc_element(u64 desc, unsigned row, unsigned k) {
    if ((desc >> 62) != 1) {
        fprintf(stderr, "descriptor: swizzle mode %llu, expected 1 (128 B)\n", (unsigned long long)(desc >> 62));
        std::abort();
    }
    if (((desc >> 49) & 7u) != 0) std::abort();  // base offset: 0 for 1024-aligned operands
    const u32 start = (u32)(desc & 0x3FFFu) << 4;
    const u32 stride = (u32)((desc >> 32) & 0x3FFFu) << 4;
    u32 addr = start + (row / 8) * stride + (row % 8) * 128 + 2 * k;
    addr ^= ((addr >> 7) & 7u) << 4;
    u16 bits;
    std::memcpy(&bits, emu::smem_at(addr), 2);
    return bf16_bits_to_f32(bits);
}

// wgmma.mma_async m64n256k16 f32 += bf16 x bf16, A and B K-major from descriptors. The
// accumulator of thread t (warp w = t / 32, lane l): d[4 j + 2 h + v] = D[16 w + l / 4 +
// 8 h][8 j + 2 (l % 4) + v].
__device__ __forceinline__ void wgmma_m64n256k16(float d[128], u64 desc_a, u64 desc_b) {
    emu::Group* g = emu::group;
    const unsigned t = threadIdx.x % 128;
    g->acc[t] = d;
    g->bar.arrive_and_wait();
    if (t == 0) {
        static thread_local float a[64][16], b[256][16];
        for (unsigned m = 0; m < 64; ++m)
            for (unsigned k = 0; k < 16; ++k) a[m][k] = desc_element(desc_a, m, k);
        for (unsigned n = 0; n < 256; ++n)
            for (unsigned k = 0; k < 16; ++k) b[n][k] = desc_element(desc_b, n, k);
        for (unsigned m = 0; m < 64; ++m) {
            for (unsigned n = 0; n < 256; ++n) {
                const unsigned thread = 32 * (m / 16) + 4 * (m % 8) + (n % 8) / 2;
                const unsigned reg = 4 * (n / 8) + 2 * ((m % 16) / 8) + n % 2;
                float acc = g->acc[thread][reg];
                for (unsigned k = 0; k < 16; ++k) acc += a[m][k] * b[n][k];
                g->acc[thread][reg] = acc;
            }
        }
    }
    g->bar.arrive_and_wait();
}
