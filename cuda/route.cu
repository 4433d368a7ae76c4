// route.cu: step 1 of the MoE contract (src/moe/route.rs), fused with the first half of
// the permutation (src/moe/permute.rs). Includes common.cuh and expert_gemm.cuh (the MMA
// wrapper of the tensor-core logits, the schedule of the decode chain's router).
//
// Kernels: the router logits on CUDA cores (below) and on tensor cores
// (moe_router_logits_tc_*, after them), the selection (moe_router_select), and the decode
// chain's router (moe_router_decode_*, at the end), each described where it is defined.
//
// moe_router_logits_<x>_<w>_e<EB>   logits [T, E] = fp32(x [T, H]) . fp32(w [E, H])^T
//   grid (ceil(T / LOGIT_TOKENS), ceil(E / EB)), block LOGIT_THREADS (4 warps).
//   One CTA owns LOGIT_TOKENS tokens x EB experts (EB = 1 for small batches: one CTA per
//   expert row, so a decode step reads the 1 MB router weight with E CTAs in parallel;
//   EB = 4 for large ones: each x chunk is reused for 4 experts). All 128 threads split H:
//   thread i owns the 8-element chunks i, i + 128, ... (16-byte loads for bf16, two float4
//   for f32; contiguous across the CTA) and keeps one f32 accumulator per (token, expert)
//   (fmaf in element order). The partials are summed by a fixed xor butterfly inside each
//   warp, then warp 0 + 1 + 2 + 3 in that order. That order depends on H only, not on EB
//   or T: the logits are bit-identical run to run and whatever else shares the batch.
//   With H % 8 != 0 the chunks are single elements.
//   Bytes: E H sizeof(w) (re-read from L2 by each token block) + T H sizeof(x) (re-read
//   from L2 by each expert block) + 4 T E written. FLOPs: 2 T E H.
//
// moe_router_select          logits [T, E] -> slot_ids, slot_weights [T, slots], pair_ranks [T slots],
//                            tile_counts [n_tiles, n_slots], tile_status [n_tiles],
//                            tile_offsets [n_tiles, n_slots], expert_offsets [n_slots + 1]
//   slots = k + n_shared slots per token; n_slots = E + n_shared; a tile is TILE_TOKENS tokens.
//   grid n_tiles, block TILE_THREADS (8 warps), dynamic shared memory (see the layout
//   below; src/cuda/moe.rs computes the same size). Warp w routes tokens w, w + 8, ... of
//   the tile: scores (sigmoid or max-subtracted softmax, sequential sum like the CPU),
//   choice = score + bias, group-limited masking (excluded groups' choices become 0.0), k
//   rounds of warp arg-max with ties to the lower index, weights from the unbiased scores,
//   normalised with sum + 1e-20 (sum in slot order) and scaled. Shared slots E..E+n_shared-1 follow
//   with weight 1.0. Then the whole block ranks the tile's pairs (rank_tile): these per-tile
//   counts are the router's per-expert counts; no separate counting pass is needed. The CTA
//   that finishes last (the arrival counter tiles_done, 0 before and after the launch) scans
//   the table into tile_offsets and expert_offsets (scan_tile_counts in common.cuh), so
//   each moe_permute_scatter CTA reads one row of it. With a single tile (T <= TILE_TOKENS,
//   decode; no counter, no table read) and fuse_scatter set, the CTA also writes row_pairs,
//   pair_rows and row_weights (moe_permute_scatter's job), so routing plus permutation is
//   two launches at decode.
//   A token with a non-finite logit is still routed (its bad logits read as 0.0) so every
//   id stays in range; tile_status records (token << 32 | expert) + 1 of the tile's first
//   such token, 0 when the tile is clean. Bytes: 4 T E read, 12 T slots + 4 n_tiles n_slots
//   + 8 n_tiles written; the last CTA: 8 n_tiles n_slots read (L2; none for one tile),
//   4 (n_tiles + 1) n_slots + 4 written; the fused scatter: 12 T slots written.
//   FLOPs: about 10 T E.

#include "common.cuh"
#include "expert_gemm.cuh"

#define LOGIT_THREADS 128
#define LOGIT_WARPS (LOGIT_THREADS / 32)
#define LOGIT_TOKENS 8

template <typename TX, typename TW, int EB>
__device__ __forceinline__ void router_logits(const TX* __restrict__ x, const TW* __restrict__ w,
                                              float* __restrict__ logits, u32 tokens, u32 experts,
                                              u64 hidden, u32 vectorized) {
    __shared__ float partial[LOGIT_WARPS][LOGIT_TOKENS * EB];
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u64 t0 = (u64)blockIdx.x * LOGIT_TOKENS;
    const u32 e0 = blockIdx.y * EB;
    const u32 nt = (u32)min((u64)LOGIT_TOKENS, (u64)tokens - t0);
    const u32 ne = min((u32)EB, experts - e0);
    const TX* x_rows = x + t0 * hidden;
    const TW* w_rows = w + (u64)e0 * hidden;
    float acc[LOGIT_TOKENS][EB];
#pragma unroll
    for (int i = 0; i < LOGIT_TOKENS; ++i) {
#pragma unroll
        for (int e = 0; e < EB; ++e) acc[i][e] = 0.0f;
    }
    // Threads past LOGIT_THREADS (the decode chain's router runs this in a TILE_THREADS
    // block) take no part: the order of the sums is the same in both kernels.
    if (threadIdx.x < LOGIT_THREADS) {
        if (vectorized) {
#pragma unroll 4
            for (u64 k = (u64)threadIdx.x * 8; k < hidden; k += LOGIT_THREADS * 8) {
                float wv[EB][8];
#pragma unroll
                for (int e = 0; e < EB; ++e) {
                    if ((u32)e < ne) {
                        load8_f32(w_rows + (u64)e * hidden + k, wv[e]);
                    } else {
#pragma unroll
                        for (int j = 0; j < 8; ++j) wv[e][j] = 0.0f;
                    }
                }
#pragma unroll
                for (int i = 0; i < LOGIT_TOKENS; ++i) {
                    if ((u32)i < nt) {
                        float xv[8];
                        load8_f32(x_rows + (u64)i * hidden + k, xv);
#pragma unroll
                        for (int e = 0; e < EB; ++e) {
#pragma unroll
                            for (int j = 0; j < 8; ++j) acc[i][e] = fmaf(xv[j], wv[e][j], acc[i][e]);
                        }
                    }
                }
            }
        } else {
            for (u64 k = threadIdx.x; k < hidden; k += LOGIT_THREADS) {
                float wv[EB];
#pragma unroll
                for (int e = 0; e < EB; ++e) wv[e] = (u32)e < ne ? load1_f32(w_rows + (u64)e * hidden + k) : 0.0f;
#pragma unroll
                for (int i = 0; i < LOGIT_TOKENS; ++i) {
                    if ((u32)i < nt) {
                        const float xv = load1_f32(x_rows + (u64)i * hidden + k);
#pragma unroll
                        for (int e = 0; e < EB; ++e) acc[i][e] = fmaf(xv, wv[e], acc[i][e]);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < LOGIT_TOKENS; ++i) {
#pragma unroll
            for (int e = 0; e < EB; ++e) {
#pragma unroll
                for (int offset = 16; offset > 0; offset >>= 1) {
                    acc[i][e] += __shfl_xor_sync(FULL_MASK, acc[i][e], offset);
                }
                if (lane == 0) partial[warp][i * EB + e] = acc[i][e];
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < LOGIT_TOKENS * EB) {
        const u32 i = threadIdx.x / EB;
        const u32 e = threadIdx.x % EB;
        if (i < nt && e < ne) {
            float sum = partial[0][threadIdx.x];
#pragma unroll
            for (int v = 1; v < LOGIT_WARPS; ++v) sum += partial[v][threadIdx.x];
            logits[(t0 + i) * experts + e0 + e] = sum;
        }
    }
}

#define ROUTER_LOGITS(NAME, TX, TW, EB)                                                        \
    extern "C" __global__ void __launch_bounds__(LOGIT_THREADS)                                \
        NAME(const TX* __restrict__ x, const TW* __restrict__ w, float* __restrict__ logits,   \
             u32 tokens, u32 experts, u64 hidden, u32 vectorized) {                            \
        grid_dependency_sync();                                                                \
        router_logits<TX, TW, EB>(x, w, logits, tokens, experts, hidden, vectorized);           \
    }

ROUTER_LOGITS(moe_router_logits_f32_f32_e1, float, float, 1)
ROUTER_LOGITS(moe_router_logits_f32_bf16_e1, float, u16, 1)
ROUTER_LOGITS(moe_router_logits_bf16_f32_e1, u16, float, 1)
ROUTER_LOGITS(moe_router_logits_bf16_bf16_e1, u16, u16, 1)
ROUTER_LOGITS(moe_router_logits_f32_f32_e4, float, float, 4)
ROUTER_LOGITS(moe_router_logits_f32_bf16_e4, float, u16, 4)
ROUTER_LOGITS(moe_router_logits_bf16_f32_e4, u16, float, 4)
ROUTER_LOGITS(moe_router_logits_bf16_bf16_e4, u16, u16, 4)

// moe_router_logits_tc_<x>_<w>   the same logits on tensor cores (mma.sync m16n8k16, bf16
//   operands, f32 accumulation), for batches of more than LOGIT_E1_MAX_TOKENS tokens where
//   the layer asks for them (src/cuda/moe.rs, LogitsKernel::TensorCores).
//   grid (ceil(T / TC_TOKENS), ceil(E / TC_EXPERTS)), block TC_THREADS (4 warps). Warp w owns
//   tokens 16w..16w+15 of the CTA's TC_TOKENS and all TC_EXPERTS experts (8 tiles of 8);
//   every k step of TC_K_STEP, lane l (g = l >> 2, q = l & 3) loads 8 consecutive elements
//   (k 8q..8q+7) of token rows g and g + 8 and of expert rows g of each tile, which feed two
//   MMAs (elements 0..3, then 4..7, as the decode GEMMs pair them). So x is read once per
//   64 experts and w once per 64 tokens, where the CUDA-core kernel reads x once per 4
//   experts: at T = 4096, E = 128, H = 4096 about 0.1 GB from L2 instead of 2.6 GB.
//   An f32 operand is split into bf16 parts, v = hi + lo + r with hi = bf16(v),
//   lo = bf16(v - hi) (|r| <= 2^-16 |v|), and the product is hi.hi, then lo.hi (f32 x), then
//   hi.lo (f32 w), each term as its own MMA into the same accumulator; lo.lo is dropped.
//   Rounding contract (against the exact logit, with S = sum |x_i w_i|): |logit - exact| <=
//   (n 2^-21 + s 2^-14) S, n the MMAs per logit (H / 16 per term), s the split operands
//   (src/cuda/moe.rs, tensor_core_logit_bound, checked by tests/cuda_kernels.rs). Not the
//   CUDA-core kernel's sums: a token's logits depend on which kernel its batch runs, never on
//   the other tokens of a batch that runs this one. H % TC_K_STEP == 0 and 16-byte aligned
//   rows (the host falls back to the CUDA-core kernel otherwise).
//   Bytes: T H sizeof(x) ceil(E / TC_EXPERTS) + E H sizeof(w) ceil(T / TC_TOKENS) (L2) + 4 T E.
//   FLOPs: 2 T E H per term (tensor cores).

#define TC_WARPS 4
#define TC_THREADS (TC_WARPS * 32)
#define TC_TOKENS (TC_WARPS * 16)
#define TC_TILES 8
#define TC_EXPERTS (TC_TILES * 8)
#define TC_K_STEP 32

// 8 consecutive elements as bf16 pairs: `hi` the elements rounded to bf16 (nearest even),
// `lo` for f32 the rounded remainders (v - hi is exact in f32).
__device__ __forceinline__ void split8(const u16* p, uint4& hi, uint4& lo) {
    hi = load_shared_16(p);
    lo = make_uint4(0u, 0u, 0u, 0u);
}
__device__ __forceinline__ void split8(const float* p, uint4& hi, uint4& lo) {
    float v[8];
    load8_f32(p, v);
    u32 h[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u16 a = f32_to_bf16(v[2 * i]), b = f32_to_bf16(v[2 * i + 1]);
        h[i] = (u32)a | ((u32)b << 16);
        l[i] = pack_bf16x2(__fsub_rn(v[2 * i], bf16_to_f32(a)), __fsub_rn(v[2 * i + 1], bf16_to_f32(b)));
    }
    hi = make_uint4(h[0], h[1], h[2], h[3]);
    lo = make_uint4(l[0], l[1], l[2], l[3]);
}

// acc += the two MMAs of one k step: rows (r0 = row g, r1 = row g + 8) x b.
__device__ __forceinline__ void mma_step(float acc[4], const uint4& r0, const uint4& r1, const uint4& b) {
    mma_16816(acc, r0.x, r1.x, r0.y, r1.y, b.x, b.y);
    mma_16816(acc, r0.z, r1.z, r0.w, r1.w, b.z, b.w);
}

template <typename T>
struct IsF32 {
    static constexpr bool value = false;
};
template <>
struct IsF32<float> {
    static constexpr bool value = true;
};

template <typename TX, typename TW>
__device__ __forceinline__ void router_logits_tc(const TX* __restrict__ x, const TW* __restrict__ w,
                                                 float* __restrict__ logits, u32 tokens, u32 experts, u64 hidden) {
    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2, q = lane & 3u;
    const u64 t0 = (u64)blockIdx.x * TC_TOKENS + (threadIdx.x >> 5) * 16 + g;
    const u64 t1 = t0 + 8;
    const bool ok0 = t0 < tokens, ok1 = t1 < tokens;
    const TX* x0 = x + (ok0 ? t0 : 0) * hidden + 8 * q;
    const TX* x1 = x + (ok1 ? t1 : 0) * hidden + 8 * q;
    const u32 e_g = blockIdx.y * TC_EXPERTS + g;  // the lane's expert of tile 0; tile j adds 8 j
    const TW* w_g = w + (u64)min(e_g, experts - 1) * hidden + 8 * q;
    float acc[TC_TILES][4];
#pragma unroll
    for (int j = 0; j < TC_TILES; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (u64 k = 0; k < hidden; k += TC_K_STEP) {
        uint4 r0h = zero, r0l = zero, r1h = zero, r1l = zero;
        if (ok0) split8(x0 + k, r0h, r0l);
        if (ok1) split8(x1 + k, r1h, r1l);
#pragma unroll
        for (int j = 0; j < TC_TILES; ++j) {
            uint4 bh = zero, bl = zero;
            if (e_g + 8 * j < experts) split8(w_g + (u64)(8 * j) * hidden + k, bh, bl);
            mma_step(acc[j], r0h, r1h, bh);
            if (IsF32<TX>::value) mma_step(acc[j], r0l, r1l, bh);
            if (IsF32<TW>::value) mma_step(acc[j], r0h, r1h, bl);
        }
    }
#pragma unroll
    for (int j = 0; j < TC_TILES; ++j) {
        const u32 e = blockIdx.y * TC_EXPERTS + 8 * j + 2 * q;
#pragma unroll
        for (u32 c = 0; c < 2; ++c) {
            if (e + c >= experts) continue;
            if (ok0) logits[t0 * experts + e + c] = acc[j][c];
            if (ok1) logits[t1 * experts + e + c] = acc[j][2 + c];
        }
    }
}

#define ROUTER_LOGITS_TC(NAME, TX, TW)                                                         \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 4)                                \
        NAME(const TX* __restrict__ x, const TW* __restrict__ w, float* __restrict__ logits,   \
             u32 tokens, u32 experts, u64 hidden) {                                            \
        grid_dependency_sync();                                                                \
        router_logits_tc<TX, TW>(x, w, logits, tokens, experts, hidden);                       \
    }

ROUTER_LOGITS_TC(moe_router_logits_tc_f32_f32, float, float)
ROUTER_LOGITS_TC(moe_router_logits_tc_f32_bf16, float, u16)
ROUTER_LOGITS_TC(moe_router_logits_tc_bf16_f32, u16, float)
ROUTER_LOGITS_TC(moe_router_logits_tc_bf16_bf16, u16, u16)

// Shared memory of moe_router_select, in this order (4-byte words unless said):
//   choice      [TILE_WARPS * E]   f32, per warp
//   score       [TILE_WARPS * E]   f32, per warp
//   ids         [TILE_TOKENS * slots]  the tile's slot ids
//   weights     [TILE_TOKENS * slots]  f32
//   warp_counts [TILE_WARPS * n_slots], running [n_slots + 1]   (rank_tile, scan_tile_counts)
//   bad         [TILE_WARPS]       u64, 8-byte aligned
//
// select_tile is the whole of it for tile `tile` of `n_tiles`, run by all TILE_THREADS
// threads of a CTA (moe_router_select: tile = blockIdx.x; the decode chain's router,
// moe_router_decode_*: its last CTA, for the one tile). It reads the logits as volatile
// (from L2, never a stale L1 line): in the decode chain other CTAs of the same launch wrote
// them. (__ldcg there made ptxas spill a register in both kernels.) It returns true
// in the CTA that scanned the offsets (the last to arrive), false in the others.
__device__ __forceinline__ bool select_tile(const float* logits, const float* __restrict__ bias, u32 tokens, u32 experts,
                            u32 top_k, u32 n_shared, u32 n_group, u32 topk_group, u32 softmax,
                            u32 norm_topk_prob, float scale, u32* __restrict__ slot_ids,
                            float* __restrict__ slot_weights, u32* __restrict__ pair_ranks,
                            u32* __restrict__ tile_counts, u64* __restrict__ tile_status,
                            u32* __restrict__ tile_offsets, u32* __restrict__ expert_offsets,
                            u32* __restrict__ tiles_done, u32 fuse_scatter, u32* __restrict__ row_pairs,
                            u32* __restrict__ pair_rows, float* __restrict__ row_weights, u32 tile, u32 n_tiles,
                            unsigned char* smem) {
    const u32 slots = top_k + n_shared;
    const u32 n_slots = experts + n_shared;
    const u32 warp = threadIdx.x >> 5;
    const u32 lane = threadIdx.x & 31u;
    float* choice = reinterpret_cast<float*>(smem) + warp * experts;
    float* score = reinterpret_cast<float*>(smem) + (TILE_WARPS + warp) * experts;
    u32* ids = reinterpret_cast<u32*>(smem) + 2 * TILE_WARPS * experts;
    float* weights = reinterpret_cast<float*>(ids + TILE_TOKENS * slots);
    u32* warp_counts = reinterpret_cast<u32*>(weights + TILE_TOKENS * slots);
    u32* running = warp_counts + TILE_WARPS * n_slots;
    const size_t words = 2 * TILE_WARPS * experts + 2 * TILE_TOKENS * slots + (TILE_WARPS + 1) * n_slots + 1;
    u64* bad = reinterpret_cast<u64*>(smem + ((words * 4 + 7) & ~(size_t)7));

    const u64 t_begin = (u64)tile * TILE_TOKENS;
    const u32 tile_tokens = (u32)min((u64)TILE_TOKENS, (u64)tokens - t_begin);
    const u32 per_group = experts / n_group;

    u64 first_bad = 0;
    for (u32 local = warp; local < tile_tokens; local += TILE_WARPS) {
        const u64 t = t_begin + local;
        const float* row = logits + t * experts;

        // Scores. Non-finite logits read as 0.0 and are reported.
        u32 bad_expert = NO_INDEX;
        float max_logit = NEG_INF;
        for (u32 e = lane; e < experts; e += 32) {
            float l = *reinterpret_cast<const volatile float*>(row + e);
            if (!is_finite_f32(l)) {
                bad_expert = min(bad_expert, e);
                l = 0.0f;
            }
            score[e] = l;
            max_logit = fmaxf(max_logit, l);
        }
        bad_expert = warp_min_u32(bad_expert);
        if (bad_expert != NO_INDEX && first_bad == 0) first_bad = ((t << 32) | bad_expert) + 1;
        if (softmax) {
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {
                max_logit = fmaxf(max_logit, __shfl_xor_sync(FULL_MASK, max_logit, offset));
            }
            for (u32 e = lane; e < experts; e += 32) score[e] = exp_f32(score[e] - max_logit);
            __syncwarp();
            float sum = 0.0f;
            if (lane == 0) {
                for (u32 e = 0; e < experts; ++e) sum += score[e];  // index order, like the CPU
            }
            sum = __shfl_sync(FULL_MASK, sum, 0);
            __syncwarp();
            for (u32 e = lane; e < experts; e += 32) score[e] = score[e] / sum;
        } else {
            for (u32 e = lane; e < experts; e += 32) score[e] = 1.0f / (1.0f + exp_f32(-score[e]));
        }
        for (u32 e = lane; e < experts; e += 32) choice[e] = score[e] + (bias ? bias[e] : 0.0f);
        __syncwarp();

        // Group-limited selection: lane g scores group g (n_group <= 32, checked by the host).
        if (n_group > 1) {
            float group_score = NEG_INF;
            if (lane < n_group) {
                float best = NEG_INF, second = NEG_INF;
                for (u32 i = 0; i < per_group; ++i) {
                    const float c = choice[lane * per_group + i];
                    if (c > best) {
                        second = best;
                        best = c;
                    } else if (c > second) {
                        second = c;
                    }
                }
                group_score = per_group >= 2 ? best + second : best;
            }
            u32 kept = 0;
            for (u32 r = 0; r < topk_group; ++r) {
                const bool open = lane < n_group && ((kept >> lane) & 1u) == 0;
                float v = open ? group_score : NEG_INF;
                u32 g = open ? lane : NO_INDEX;
                warp_argmax(v, g);
                kept |= 1u << g;
            }
            for (u32 e = lane; e < experts; e += 32) {
                if (((kept >> (e / per_group)) & 1u) == 0) choice[e] = 0.0f;
            }
            __syncwarp();
        }

        // Top-k in descending choice order, ties to the lower index. A taken choice becomes
        // -inf; every live choice is finite, so it is never taken twice.
        float sum = 0.0f;
        for (u32 j = 0; j < top_k; ++j) {
            float v = NEG_INF;
            u32 pick = NO_INDEX;
            for (u32 e = lane; e < experts; e += 32) {
                const float c = choice[e];
                if (c > v) {
                    v = c;
                    pick = e;
                }
            }
            warp_argmax(v, pick);
            if (lane == (pick & 31u)) choice[pick] = NEG_INF;
            if (lane == 0) {
                const float wj = score[pick];
                ids[local * slots + j] = pick;
                weights[local * slots + j] = wj;
                sum += wj;  // slot order, like the CPU
            }
        }
        if (lane == 0) {
            if (norm_topk_prob) {
                const float denominator = sum + 1e-20f;
                for (u32 j = 0; j < top_k; ++j) weights[local * slots + j] = weights[local * slots + j] / denominator;
            }
            for (u32 j = 0; j < top_k; ++j) weights[local * slots + j] = weights[local * slots + j] * scale;
        }
        for (u32 j = top_k + lane; j < slots; j += 32) {
            ids[local * slots + j] = experts + (j - top_k);
            weights[local * slots + j] = 1.0f;
        }
        __syncwarp();
    }
    if (lane == 0) bad[warp] = first_bad;
    __syncthreads();

    const u32 n_pairs = tile_tokens * slots;
    const u64 pair_base = t_begin * slots;
    for (u32 i = threadIdx.x; i < n_pairs; i += TILE_THREADS) {
        slot_ids[pair_base + i] = ids[i];
        slot_weights[pair_base + i] = weights[i];
    }
    if (threadIdx.x == 0) {
        u64 status = 0;
        for (u32 w = 0; w < TILE_WARPS; ++w) {
            if (bad[w] != 0 && (status == 0 || bad[w] < status)) status = bad[w];
        }
        tile_status[tile] = status;
    }
    rank_tile(ids, n_pairs, n_slots, warp_counts, running, pair_ranks + pair_base,
              tile_counts + (u64)tile * n_slots);
    if (!last_tile_to_arrive(tiles_done, n_tiles)) return false;
    u32* offsets = running;  // [n_slots + 1]: this tile's counts, then expert_offsets
    scan_tile_counts(tile_counts, n_tiles, n_slots, warp_counts, offsets, tile_offsets, expert_offsets);

    // One tile (T <= TILE_TOKENS, decode): this CTA has every count, so it finishes the
    // permutation itself (what moe_permute_scatter does for many tiles): one launch less.
    if (fuse_scatter) {
        for (u32 i = threadIdx.x; i < n_pairs; i += TILE_THREADS) {
            const u32 p = (u32)pair_base + i;
            const u32 row = offsets[ids[i]] + pair_ranks[p];
            row_pairs[row] = p;
            pair_rows[p] = row;
            row_weights[row] = weights[i];
        }
    }
    return true;
}

extern "C" __global__ void __launch_bounds__(TILE_THREADS)
    moe_router_select(const float* __restrict__ logits, const float* __restrict__ bias,
                      u32 tokens, u32 experts, u32 top_k, u32 n_shared, u32 n_group,
                      u32 topk_group, u32 softmax, u32 norm_topk_prob, float scale,
                      u32* __restrict__ slot_ids, float* __restrict__ slot_weights,
                      u32* __restrict__ pair_ranks, u32* __restrict__ tile_counts,
                      u64* __restrict__ tile_status, u32* __restrict__ tile_offsets,
                      u32* __restrict__ expert_offsets, u32* __restrict__ tiles_done,
                      u32 fuse_scatter, u32* __restrict__ row_pairs,
                      u32* __restrict__ pair_rows, float* __restrict__ row_weights) {
    grid_dependency_sync();
    DECLARE_DYNAMIC_SMEM(smem, 16);
    select_tile(logits, bias, tokens, experts, top_k, n_shared, n_group, topk_group, softmax, norm_topk_prob, scale,
                slot_ids, slot_weights, pair_ranks, tile_counts, tile_status, tile_offsets, expert_offsets, tiles_done,
                fuse_scatter, row_pairs, pair_rows, row_weights, blockIdx.x, gridDim.x, smem);
}

// The decode chain's router (T <= TILE_TOKENS: one permutation tile): the logits as
// moe_router_logits_*_e1 computes them (same CTAs, same sums), then the CTA that finishes
// last (tiles_done counts the grid's CTAs) selects, scatters and schedules the work items
// (moe_router_select with fuse_scatter, then moe_expert_schedule), so routing, permutation
// and the schedule are one launch. Its parameters are moe_router_select's (fuse_scatter 1)
// after the logits' operands, then the schedule's. Block TILE_THREADS: threads past LOGIT_THREADS wait
// during the logits. The last CTA reads every logit from L2 (select_tile) and its own
// expert_offsets through L2 after a barrier (schedule_items).
template <typename TX, typename TW>
__device__ __forceinline__ void router_decode(
    const TX* __restrict__ x, const TW* __restrict__ w, float* logits, u32 tokens, u32 experts, u64 hidden,
    u32 vectorized, const float* __restrict__ bias, u32 top_k, u32 n_shared, u32 n_group, u32 topk_group,
    u32 softmax, u32 norm_topk_prob, float scale, u32* __restrict__ slot_ids, float* __restrict__ slot_weights,
    u32* __restrict__ pair_ranks, u32* __restrict__ tile_counts, u64* __restrict__ tile_status,
    u32* __restrict__ tile_offsets, u32* expert_offsets, u32* __restrict__ tiles_done, u32 fuse_scatter,
    u32* __restrict__ row_pairs, u32* __restrict__ pair_rows, float* __restrict__ row_weights, u32 decode_max_rows,
    u32 tile_rows, u32 decode_capacity, u32 tiled_capacity, GemmItem* __restrict__ decode_items,
    GemmItem* __restrict__ tiled_items, u32* __restrict__ item_counts) {
    DECLARE_DYNAMIC_SMEM(decode_smem, 16);
    router_logits<TX, TW, 1>(x, w, logits, tokens, experts, hidden, vectorized);
    if (!last_tile_to_arrive(tiles_done, gridDim.x * gridDim.y)) return;
    select_tile(logits, bias, tokens, experts, top_k, n_shared, n_group, topk_group, softmax, norm_topk_prob, scale,
                slot_ids, slot_weights, pair_ranks, tile_counts, tile_status, tile_offsets, expert_offsets, tiles_done,
                fuse_scatter, row_pairs, pair_rows, row_weights, 0u, 1u, decode_smem);
    __syncthreads();  // expert_offsets, written by this CTA's threads
    if (threadIdx.x < 32) {
        schedule_items(expert_offsets, experts + n_shared, decode_max_rows, tile_rows, decode_capacity, tiled_capacity,
                       decode_items, tiled_items, item_counts);
    }
}

#define ROUTER_DECODE(NAME, TX, TW)                                                                                \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS, 2)                                                  \
        NAME(const TX* __restrict__ x, const TW* __restrict__ w, u64 hidden, u32 vectorized,                      \
             float* __restrict__ logits, const float* __restrict__ bias, u32 tokens, u32 experts, u32 top_k,      \
             u32 n_shared, u32 n_group, u32 topk_group, u32 softmax, u32 norm_topk_prob, float scale,             \
             u32* __restrict__ slot_ids, float* __restrict__ slot_weights, u32* __restrict__ pair_ranks,         \
             u32* __restrict__ tile_counts, u64* __restrict__ tile_status, u32* __restrict__ tile_offsets,       \
             u32* __restrict__ expert_offsets, u32* __restrict__ tiles_done, u32 fuse_scatter,                   \
             u32* __restrict__ row_pairs, u32* __restrict__ pair_rows, float* __restrict__ row_weights,          \
             u32 decode_max_rows, u32 tile_rows, u32 decode_capacity, u32 tiled_capacity,                        \
             GemmItem* __restrict__ decode_items, GemmItem* __restrict__ tiled_items,                            \
             u32* __restrict__ item_counts) {                                                                     \
        grid_dependency_sync();                                                                                    \
        router_decode<TX, TW>(x, w, logits, tokens, experts, hidden, vectorized, bias, top_k, n_shared, n_group,   \
                              topk_group, softmax, norm_topk_prob, scale, slot_ids, slot_weights, pair_ranks,      \
                              tile_counts, tile_status, tile_offsets, expert_offsets, tiles_done, fuse_scatter,    \
                              row_pairs, pair_rows, row_weights, decode_max_rows, tile_rows, decode_capacity,      \
                              tiled_capacity, decode_items, tiled_items, item_counts);                             \
    }

ROUTER_DECODE(moe_router_decode_f32_f32, float, float)
ROUTER_DECODE(moe_router_decode_f32_bf16, float, u16)
ROUTER_DECODE(moe_router_decode_bf16_f32, u16, float)
ROUTER_DECODE(moe_router_decode_bf16_bf16, u16, u16)
