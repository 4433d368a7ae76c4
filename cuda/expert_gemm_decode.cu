// expert_gemm_decode.cu: the expert GEMMs for slots with few rows (decode): every weight
// byte of a used slot is streamed from memory exactly once, with the tokens as the narrow
// dimension ("swap A and B": weights are the 16-row A operand of mma.sync m16n8k16, the
// item's rows are its 8-column B operand). sm_80 and later (portable). Includes
// expert_gemm.cuh.
//
// Grid (column blocks, item capacity), block DECODE_THREADS (4 warps), no shared memory.
// blockIdx.y picks a decode item (slot e, rows row_begin..row_begin + rows, rows <= 64,
// written by moe_expert_schedule); blockIdx.x a block of weight rows. Each warp owns 16
// weight rows and the item's rows, whole K, no other warp's data: no barrier, no shared
// memory, no atomics (except the decode chain's combine, at the end of this file). The weight rows are split over (column blocks x items) CTAs, so one
// token alone still spreads its experts' weights over the whole GPU (T = 1: 8 slots x 44
// CTAs for GEMM 1, 8 x 64 for GEMM 2).
//
// One warp, lane l (g = l >> 2, q = l & 3), k step of 32: lane l loads 16 bytes (8 bf16,
// k0 + 8q .. k0 + 8q + 7) of weight row g and of weight row g + 8, and 16 bytes of the
// same k range of item row 8t + g for each tile t of 8 rows. Because a dot product may sum
// its k in any assignment to mma positions as long as A and B agree, these 8 elements feed
// two m16n8k16 MMAs: the first takes elements 0..3 (mma k positions 2q, 2q+1, 2q+8, 2q+9),
// the second elements 4..7. Every load is a full 16-byte vector, 4 lanes read 64
// contiguous bytes of a row; nothing is staged through shared memory.
//
// moe_expert_up_decode    GEMM 1 + SwiGLU. Warp rows: g -> gate row n0 + g, g + 8 -> up row
//   n0 + g, so accumulator c[0] (gate, row 2q) and c[2] (up, row 2q) meet in one lane:
//   a[r][n0 + g] = bf16(silu(c0) * c2) for r = 8t + 2q, and c1/c3 for r + 1. A CTA owns 4 x
//   8 = 32 act columns (I / 32 column blocks). K = H.
// moe_expert_down_decode  GEMM 2, routing weight in the epilogue. Warp rows: down rows
//   n0 + g and n0 + g + 8; y[r][n] = w[r] * c (f32). A CTA owns 64 output columns (H / 64
//   column blocks). K = I.
//
// Tile size follows the item's rows: NT = 1, 2, 4 or 8 tiles of 8 rows (<= 8, 16, 32, 64
// rows), so T = 1 pads 1 row to 8 in the tensor cores only, never in memory traffic.
//
// Determinism and batch invariance: every output element is one accumulator, summed over
// k steps in ascending order, two MMAs per step in a fixed order; the weight fragment is
// the same whatever NT, and an item row's B fragment depends only on that row. So a row's
// result does not depend on the other rows of its item, on NT, or on the run.
//
// Bytes per used slot (dots.llm1, H 4096, I 1408): GEMM 1 reads 2 I H x 2 = 23.1 MB of
// weights once + the item's x rows once per CTA (L2), writes 2 I per row; GEMM 2 reads
// H I x 2 = 11.5 MB once + activations, writes 4 H per row. FLOPs 6 H I per row (x 2 for
// padding to 8). Floor (docs/perf.md): 34.6 MB per used slot at 4.3 TB/s, 8.0 us per slot.
//
// Requirements (checked by src/cuda/expert_gemm.rs): K % (DECODE_K_STEP * DECODE_UNROLL)
// == 0 for both GEMMs (H % 128, I % 128), I % 32 and H % 64 for the column blocks,
// 16-byte aligned rows.

#include "expert_gemm.cuh"

#define DECODE_WARPS 4
#define DECODE_THREADS (DECODE_WARPS * 32)
#define DECODE_K_STEP 32  // k per step: 4 lanes x 8 elements
#define DECODE_UNROLL 4   // steps whose weight loads are in flight together (x2 double buffer)
#define DECODE_MIN_CTAS 4  // CTAs per SM the register budget must allow (<= 128 registers)
#define DECODE_CHAIN_MIN_CTAS 3  // the same for the decode chain's GEMM 1 (<= 168 registers)
#define DECODE_UP_COLUMNS (DECODE_WARPS * 8)     // act columns per CTA (GEMM 1)
#define DECODE_DOWN_COLUMNS (DECODE_WARPS * 16)  // output columns per CTA (GEMM 2)

// The weight fragments of U consecutive k steps: rows g and g + 8.
template <int U>
struct WeightSteps {
    uint4 lo[U];
    uint4 hi[U];
};

template <int U>
__device__ __forceinline__ void load_weight_steps(WeightSteps<U>& w, const uint4* row_lo, const uint4* row_hi,
                                                  u32 step) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        w.lo[u] = load_stream_16(row_lo + (step + u) * (DECODE_K_STEP / 8));
        w.hi[u] = load_stream_16(row_hi + (step + u) * (DECODE_K_STEP / 8));
    }
}

// The item's rows as the B operand, read straight from a [rows, ld] bf16 buffer (the
// gathered rows x, or the activation): load(t, step) is the lane's 16 bytes (8q..8q+7) of
// k step `step`'s 32 elements of item row 8t + g (the lane's row of tile t).
struct PackedRows {
    const uint4* row_gq;  // item row g, at the lane's column offset 8q
    u64 tile;             // 8 rows, in 16-byte units
    __device__ __forceinline__ uint4 load(u32 t, u32 step) const {
        return load_shared_16(row_gq + (u64)t * tile + step * (DECODE_K_STEP / 8));
    }
};

// The item's rows read from the hidden states through the permutation (the decode
// chain: no gather pass): item row r is hidden row row_pairs[row_begin + r] / slots, f32
// rows rounded to bf16 (nearest even) exactly as moe_gather_f32_to_bf16 rounds them, bf16
// rows as they are. Rows at or past `rows_valid` are never loaded.
template <typename TX, int NT>
struct HiddenRows {
    const TX* base;  // hidden, at the lane's column offset 8q
    u64 ld;
    u32 token[NT];   // of the lane's row of each tile (a 32-bit index, not a pointer: fewer registers)
    __device__ __forceinline__ HiddenRows(const TX* hidden, const u32* row_pairs, u32 slots, u64 ld_, u32 row_begin,
                                          u32 rows_valid)
        : base(hidden + 8 * (threadIdx.x & 3u)), ld(ld_) {
        const u32 g = (threadIdx.x & 31u) >> 2;
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const u32 r = 8 * t + g;
            token[t] = r < rows_valid ? row_pairs[row_begin + r] / slots : 0u;
        }
    }
    __device__ __forceinline__ uint4 load(u32 t, u32 step) const {
        return load_bf16x8(base + (u64)token[t] * ld + step * DECODE_K_STEP);
    }
    __device__ __forceinline__ static uint4 load_bf16x8(const u16* p) { return load_shared_16(p); }
    __device__ __forceinline__ static uint4 load_bf16x8(const float* p) {
        float v[8];
        load8_f32(p, v);
        return make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]),
                          pack_bf16x2(v[6], v[7]));
    }
};

// acc[t] += W (16 rows: row_lo = this lane's row g of rows 0..7, row_hi = its row g + 8) x
// B (item rows 8t..8t+7, from `rows`), over the whole K; rows >= rows_valid read as zero.
// The weight pointers are at column 0: the lane's 8-element column offset 8q is added
// here. The weight loads of the next U steps are issued before the MMAs of the current U
// steps (double buffer in registers): U = DECODE_UNROLL steps for 1 or 2 tiles, half as
// many for 4 tiles and a quarter for 8, which keeps every NT within DECODE_MIN_CTAS'
// register budget (no spills).
template <int NT, typename Rows>
__device__ __forceinline__ void decode_dot(float acc[NT][4], const u16* row_lo, const u16* row_hi, const Rows& rows,
                                           u32 k_len, u32 rows_valid) {
    constexpr int U = NT >= 8 ? DECODE_UNROLL / 4 : NT >= 4 ? DECODE_UNROLL / 2 : DECODE_UNROLL;
    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2;
    const uint4* a_lo = reinterpret_cast<const uint4*>(row_lo) + (lane & 3u);
    const uint4* a_hi = reinterpret_cast<const uint4*>(row_hi) + (lane & 3u);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    }
    const u32 steps = k_len / DECODE_K_STEP;
    WeightSteps<U> cur, next;
    load_weight_steps<U>(cur, a_lo, a_hi, 0);
    for (u32 step = 0; step < steps; step += U) {
        if (step + U < steps) load_weight_steps<U>(next, a_lo, a_hi, step + U);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const uint4 wl = cur.lo[u];
            const uint4 wh = cur.hi[u];
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                uint4 b = make_uint4(0u, 0u, 0u, 0u);
                if ((u32)(8 * t) + g < rows_valid) {
                    b = rows.load(t, step + u);
                }
                mma_16816(acc[t], wl.x, wh.x, wl.y, wh.y, b.x, b.y);
                mma_16816(acc[t], wl.z, wh.z, wl.w, wh.w, b.z, b.w);
            }
        }
        if (step + U < steps) cur = next;
    }
}

// The item's rows of a [rows, ld] bf16 buffer as the B operand.
__device__ __forceinline__ PackedRows packed_rows(const u16* buffer, u64 ld, GemmItem item) {
    const u32 lane = threadIdx.x & 31u;
    return PackedRows{reinterpret_cast<const uint4*>(buffer + ((u64)item.row_begin + (lane >> 2)) * ld) + (lane & 3u),
                      ld};
}

// GEMM 1 for one warp: act columns n0..n0+8 of the item, NT tiles of 8 rows.
template <int NT, typename Rows>
__device__ __forceinline__ void up_decode_warp(const u16* gate_up_slot, const Rows& rows, u16* act, u32 hidden,
                                               u32 inter, GemmItem item, u32 n0) {
    const u32 g = (threadIdx.x & 31u) >> 2;
    const u16* gate_row = gate_up_slot + (u64)(n0 + g) * hidden;
    const u16* up_row = gate_up_slot + (u64)(inter + n0 + g) * hidden;
    float acc[NT][4];
    decode_dot<NT>(acc, gate_row, up_row, rows, hidden, item.rows);
    decode_store_act<NT>(acc, act, inter, item, n0 + g);
}

// GEMM 2 for one warp: output columns n0..n0+16 of the item, NT tiles of 8 rows.
template <int NT>
__device__ __forceinline__ void down_decode_warp(const u16* down_slot, const u16* act, const float* row_weights,
                                                 float* y, u32 hidden, u32 inter, GemmItem item, u32 n0) {
    const u32 lane = threadIdx.x & 31u;
    const u32 g = lane >> 2;
    const u16* row_lo = down_slot + (u64)(n0 + g) * inter;
    const u16* row_hi = down_slot + (u64)(n0 + g + 8) * inter;
    float acc[NT][4];
    decode_dot<NT>(acc, row_lo, row_hi, packed_rows(act, inter, item), inter, item.rows);
    decode_store_rows<NT>(acc, row_weights, y, hidden, item, n0 + g);
}

// Where GEMM 1 reads an item's rows: rows<NT>(item) is the B operand of an item of NT tiles.
// Gathered rows x [R, H]:
struct GatheredSource {
    static constexpr int MAX_TILES = 8;
    const u16* x;
    u64 ld;
    template <int NT>
    __device__ __forceinline__ PackedRows rows(GemmItem item) const {
        return packed_rows(x, ld, item);
    }
};

// The hidden states [T, H] through row_pairs (the decode chain):
// (Four tiles at most: eight row pointers would spill. The chain's items have at most
// TILE_TOKENS = 32 rows; a longer one runs in parts of 32 rows, whose rows get the same
// values, see "Determinism" above.)
template <typename TX>
struct HiddenSource {
    static constexpr int MAX_TILES = 4;
    const TX* hidden;
    const u32* row_pairs;
    u32 slots;
    u64 ld;
    template <int NT>
    __device__ __forceinline__ HiddenRows<TX, NT> rows(GemmItem item) const {
        return HiddenRows<TX, NT>(hidden, row_pairs, slots, ld, item.row_begin, item.rows);
    }
};

// GEMM 1 of the item `part` (of at most 8 Source::MAX_TILES rows), its rows from `source`,
// NT = 1, 2, 4 or 8 tiles of 8 rows by the part's rows.
template <typename Source>
__device__ __forceinline__ void up_decode_part(const u16* slot, GemmItem part, u32 hidden, u32 inter, u16* act,
                                               u32 n0, const Source& source) {
    if (part.rows <= 8) {
        up_decode_warp<1>(slot, source.template rows<1>(part), act, hidden, inter, part, n0);
    } else if (part.rows <= 16) {
        up_decode_warp<2>(slot, source.template rows<2>(part), act, hidden, inter, part, n0);
    } else if (Source::MAX_TILES == 4 || part.rows <= 32) {
        up_decode_warp<4>(slot, source.template rows<4>(part), act, hidden, inter, part, n0);
    } else {
        up_decode_warp<Source::MAX_TILES>(slot, source.template rows<Source::MAX_TILES>(part), act, hidden, inter,
                                          part, n0);
    }
}

// GEMM 1 of this CTA's item (blockIdx.y), its rows from `source`.
template <typename Source>
__device__ __forceinline__ void up_decode_item(const u16* gate_up, GemmItem item, u32 hidden, u32 inter, u16* act,
                                               const Source& source) {
    const u32 n0 = blockIdx.x * DECODE_UP_COLUMNS + (threadIdx.x >> 5) * 8;
    const u16* slot = gate_up + (u64)item.slot * 2 * inter * hidden;
    constexpr u32 PART_ROWS = 8 * Source::MAX_TILES;
    if constexpr (PART_ROWS >= DECODE_ITEM_ROWS) {
        up_decode_part(slot, item, hidden, inter, act, n0, source);
    } else {
        for (u32 done = 0; done < item.rows; done += PART_ROWS) {
            GemmItem part = item;
            part.row_begin = item.row_begin + done;
            part.rows = min(PART_ROWS, item.rows - done);
            up_decode_part(slot, part, hidden, inter, act, n0, source);
        }
    }
}

// GEMM 2 of this CTA's item.
__device__ __forceinline__ void down_decode_item(const u16* act, const u16* down, const float* row_weights, float* y,
                                                 u32 hidden, u32 inter, GemmItem item) {
    const u32 n0 = blockIdx.x * DECODE_DOWN_COLUMNS + (threadIdx.x >> 5) * 16;
    const u16* slot = down + (u64)item.slot * hidden * inter;
    if (item.rows <= 8) {
        down_decode_warp<1>(slot, act, row_weights, y, hidden, inter, item, n0);
    } else if (item.rows <= 16) {
        down_decode_warp<2>(slot, act, row_weights, y, hidden, inter, item, n0);
    } else if (item.rows <= 32) {
        down_decode_warp<4>(slot, act, row_weights, y, hidden, inter, item, n0);
    } else {
        down_decode_warp<8>(slot, act, row_weights, y, hidden, inter, item, n0);
    }
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS, DECODE_MIN_CTAS)
    moe_expert_up_decode(const u16* __restrict__ x, const u16* __restrict__ gate_up,
                         const GemmItem* __restrict__ items, const u32* __restrict__ item_counts, u32 hidden,
                         u32 inter, u16* __restrict__ act) {
    grid_dependency_sync();
    if (blockIdx.y >= item_counts[COUNT_DECODE]) return;
    const GemmItem item = items[blockIdx.y];
    up_decode_item(gate_up, item, hidden, inter, act, GatheredSource{x, hidden});
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS, DECODE_MIN_CTAS)
    moe_expert_down_decode(const u16* __restrict__ act, const u16* __restrict__ down,
                           const float* __restrict__ row_weights, const GemmItem* __restrict__ items,
                           const u32* __restrict__ item_counts, u32 hidden, u32 inter, float* __restrict__ y) {
    grid_dependency_sync();
    if (blockIdx.y >= item_counts[COUNT_DECODE]) return;
    down_decode_item(act, down, row_weights, y, hidden, inter, items[blockIdx.y]);
}

// ---- the decode chain (T <= TILE_TOKENS; src/cuda/layer.rs) ------------------------------
//
// moe_expert_up_decode_hidden_<x>   GEMM 1 with the item's rows read from the hidden states
//   [T, H] (f32 or bf16) through row_pairs: the gather pass folded in. Same grid, items and
//   arithmetic as moe_expert_up_decode on gathered rows, so the same bits.
// moe_expert_down_decode_combine    GEMM 2 as moe_expert_down_decode, then the combine of
//   this CTA's DECODE_DOWN_COLUMNS output columns by the column's last CTA to finish
//   (column_done[blockIdx.x] counts the CTAs that had an item; 0 before and after the
//   launch): out[t][c] = sum over the token's slots j, in order from 0.0, of y[pair_rows[t
//   slots + j]][c], exactly moe_combine's sum, read through L2. Bytes beyond GEMM 2: the
//   last CTA of each column reads 4 T slots DECODE_DOWN_COLUMNS of y (L2) and writes 4 T
//   DECODE_DOWN_COLUMNS.

#define UP_DECODE_HIDDEN(NAME, TX)                                                                                  \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS, DECODE_CHAIN_MIN_CTAS)                             \
        NAME(const TX* __restrict__ hidden_states, const u32* __restrict__ row_pairs, u32 slots_per_token,          \
             const u16* __restrict__ gate_up, const GemmItem* __restrict__ items,                                   \
             const u32* __restrict__ item_counts, u32 hidden, u32 inter, u16* __restrict__ act) {                   \
        grid_dependency_sync();                                                                                     \
        if (blockIdx.y >= item_counts[COUNT_DECODE]) return;                                                        \
        const GemmItem item = items[blockIdx.y];                                                                    \
        up_decode_item(gate_up, item, hidden, inter, act,                                                           \
                       HiddenSource<TX>{hidden_states, row_pairs, slots_per_token, hidden});                  \
    }

UP_DECODE_HIDDEN(moe_expert_up_decode_hidden_f32, float)
UP_DECODE_HIDDEN(moe_expert_up_decode_hidden_bf16, u16)

extern "C" __global__ void __launch_bounds__(DECODE_THREADS, DECODE_MIN_CTAS)
    moe_expert_down_decode_combine(const u16* __restrict__ act, const u16* __restrict__ down,
                                   const float* __restrict__ row_weights, const GemmItem* __restrict__ items,
                                   const u32* __restrict__ item_counts, u32 hidden, u32 inter, float* __restrict__ y,
                                   const u32* __restrict__ pair_rows, u32 tokens, u32 slots_per_token,
                                   u32* __restrict__ column_done, float* __restrict__ out) {
    grid_dependency_sync();
    const u32 n_items = item_counts[COUNT_DECODE];
    if (blockIdx.y >= n_items) return;
    down_decode_item(act, down, row_weights, y, hidden, inter, items[blockIdx.y]);
    if (!last_tile_to_arrive(column_done + blockIdx.x, n_items)) return;
    constexpr u32 QUADS = DECODE_DOWN_COLUMNS / 4;
    const u32 col0 = blockIdx.x * DECODE_DOWN_COLUMNS;
    for (u32 i = threadIdx.x; i < tokens * QUADS; i += DECODE_THREADS) {
        const u64 t = i / QUADS;
        const u32 c = col0 + 4 * (i % QUADS);
        const u32* rows = pair_rows + t * slots_per_token;
        store_global_16(out + t * hidden + c, sum_slots4<true>(y, rows, slots_per_token, hidden, c));
    }
}
