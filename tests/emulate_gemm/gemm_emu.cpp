// gemm_emu.cpp: runs the expert GEMM kernels (schedule, decode, mma.sync, wgmma) on the
// CPU under gemm_shim.h and compares them with the contract computed plainly in double
// precision. Built and run by tests/cuda_expert_emulated.rs, which writes kernels.inc (the
// kernel files, with DOTS_MOE_EMULATE defined and the dynamic shared memory declaration
// replaced). Exit status 0 when every mode agrees; messages on stderr otherwise.
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "gemm_shim.h"
#include "kernels.inc"

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
namespace emu {
thread_local Warp* warp;
thread_local Group* group;
thread_local unsigned lane;
thread_local Block* block;
unsigned char* dynamic_smem;
}  // namespace emu

// Runs `kernel` on every CTA of `grid`, one std::thread per CUDA thread; the same threads
// run the CTAs one after another (per-CTA barriers and shared memory are made fresh by
// thread 0 between two CTAs, behind a barrier every thread always reaches).
static void launch(unsigned grid_x, unsigned grid_y, unsigned threads, size_t shared,
                   const std::function<void()>& kernel) {
    std::barrier<> between(threads);
    emu::Block blk;
    std::unique_ptr<unsigned char[]> smem;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            for (unsigned by = 0; by < grid_y; ++by) {
                for (unsigned bx = 0; bx < grid_x; ++bx) {
                    if (t == 0) {
                        blk.bar = std::make_unique<std::barrier<>>(threads);
                        blk.warps = std::make_unique<emu::Warp[]>((threads + 31) / 32);
                        blk.groups = std::make_unique<emu::Group[]>((threads + 127) / 128);
                        // Exactly `shared` bytes (AddressSanitizer sees overruns), poisoned.
                        smem.reset(new unsigned char[shared > 0 ? shared : 1]);
                        std::memset(smem.get(), 0xab, shared > 0 ? shared : 1);
                        emu::dynamic_smem = smem.get();
                    }
                    between.arrive_and_wait();
                    threadIdx = dim3{t, 0, 0};
                    blockIdx = dim3{bx, by, 0};
                    emu::block = &blk;
                    emu::warp = &blk.warps[t / 32];
                    emu::group = &blk.groups[t / 128];
                    emu::lane = t % 32;
                    kernel();
                    emu::warp->bar.arrive_and_drop();
                    emu::group->bar.arrive_and_drop();
                    emu::block->bar->arrive_and_drop();
                    between.arrive_and_wait();
                }
            }
        });
    }
    for (auto& th : pool) th.join();
}

static u16 to_bf16(float f) { return f32_to_bf16(f); }
static float from_bf16(u16 b) { return bf16_to_f32(b); }

struct Rng {
    unsigned long long s;
    float uniform(float scale) {  // in (-scale, scale)
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return scale * ((float)((s >> 40) & 0xffffff) / 8388608.0f - 1.0f);
    }
};

struct Mode {
    const char* name;
    u32 decode_max_rows;  // as the schedule takes it
    u32 tile_rows;        // 0: no tiled kernel (batch-invariant)
    bool wgmma;
};

static double rel_error(const std::vector<float>& got, const std::vector<float>& want, size_t* bad) {
    double diff = 0, norm = 0;
    *bad = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) ++*bad;
        diff += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        norm += (double)want[i] * want[i];
    }
    return std::sqrt(diff / norm);
}

int main() {
    const u32 H = 512, I = 128;  // K = H: 16 mma / 8 wgmma k tiles, so both stage rings wrap
    const std::vector<u32> counts = {0, 1, 9, 20, 33, 70, 129, 2};  // every decode tile class, 1 and 2 row tiles
    const u32 n_slots = counts.size();
    std::vector<u32> offsets = {0};
    for (u32 c : counts) offsets.push_back(offsets.back() + c);
    const u32 R = offsets.back();

    Rng rng{12345};
    std::vector<u16> gate_up((size_t)n_slots * 2 * I * H), down((size_t)n_slots * H * I), x((size_t)R * H);
    for (auto& v : gate_up) v = to_bf16(rng.uniform(std::sqrt(3.0f / H)));
    for (auto& v : down) v = to_bf16(rng.uniform(std::sqrt(3.0f / I)));
    for (auto& v : x) v = to_bf16(rng.uniform(1.0f));
    std::vector<float> row_weights(R);
    for (auto& w : row_weights) w = 1.25f + rng.uniform(1.0f);

    // The contract, in double precision.
    std::vector<float> act_ref((size_t)R * I), y_ref((size_t)R * H);
    for (u32 e = 0; e < n_slots; ++e) {
        for (u32 r = offsets[e]; r < offsets[e + 1]; ++r) {
            for (u32 i = 0; i < I; ++i) {
                double g = 0, u = 0;
                for (u32 k = 0; k < H; ++k) {
                    const double xv = from_bf16(x[(size_t)r * H + k]);
                    g += xv * from_bf16(gate_up[((size_t)e * 2 * I + i) * H + k]);
                    u += xv * from_bf16(gate_up[((size_t)e * 2 * I + I + i) * H + k]);
                }
                act_ref[(size_t)r * I + i] = from_bf16(to_bf16((float)(g / (1.0 + std::exp(-g)) * u)));
            }
            for (u32 h = 0; h < H; ++h) {
                double acc = 0;
                for (u32 i = 0; i < I; ++i) {
                    acc += (double)act_ref[(size_t)r * I + i] * from_bf16(down[((size_t)e * H + h) * I + i]);
                }
                y_ref[(size_t)r * H + h] = (float)(row_weights[r] * acc);
            }
        }
    }

    const Mode modes[] = {
        {"default (decode + wgmma tiles)", 64, 128, true},
        {"all tiled, mma", 0, 128, false},
        {"all tiled, wgmma", 0, 128, true},
        {"batch-invariant (decode chunks)", 64, 0, false},
    };
    int failures = 0;
    for (const Mode& mode : modes) {
        // Item capacities: GemmOptions::capacities.
        const u32 used = std::min(n_slots, R);
        u32 decode_cap, tiled_cap;
        if (mode.tile_rows == 0) {
            decode_cap = (R + 63) / 64 + used;
            tiled_cap = 0;
        } else {
            decode_cap = mode.decode_max_rows == 0 ? 0 : used;
            const u32 big = std::min(n_slots, R / (mode.decode_max_rows + 1));
            tiled_cap = big == 0 ? 0 : (R + 127) / 128 + big;
        }
        std::vector<GemmItem> decode_items(std::max(decode_cap, 1u)), tiled_items(std::max(tiled_cap, 1u));
        std::vector<u32> item_counts(3, 0xffffffffu);
        launch(1, 1, 32, 0, [&] {
            moe_expert_schedule(offsets.data(), n_slots, mode.decode_max_rows, mode.tile_rows, decode_cap, tiled_cap,
                                decode_items.data(), tiled_items.data(), item_counts.data());
        });
        // The schedule's documented rule, on the host.
        u32 want_decode = 0, want_tiled = 0;
        for (u32 c : counts) {
            if (c == 0) continue;
            if (c <= mode.decode_max_rows) {
                want_decode += 1;
            } else if (mode.tile_rows > 0) {
                want_tiled += (c + mode.tile_rows - 1) / mode.tile_rows;
            } else {
                want_decode += (c + 63) / 64;
            }
        }
        if (item_counts[0] != want_decode || item_counts[1] != want_tiled || item_counts[2] != 0) {
            fprintf(stderr, "%s: schedule made %u / %u items (overflow %u), expected %u / %u\n", mode.name,
                    item_counts[0], item_counts[1], item_counts[2], want_decode, want_tiled);
            ++failures;
            continue;
        }

        std::vector<u16> act((size_t)R * I, 0xffff);   // NaN
        std::vector<float> y((size_t)R * H, NAN);
        if (decode_cap > 0) {
            launch(I / 32, decode_cap, 128, 0, [&] {
                moe_expert_up_decode(x.data(), gate_up.data(), decode_items.data(), item_counts.data(), H, I,
                                     act.data());
            });
        }
        if (tiled_cap > 0) {
            if (mode.wgmma) {
                launch(I / 128, tiled_cap, 256, WG_SHARED_BYTES, [&] {
                    moe_expert_up_wgmma(x.data(), gate_up.data(), tiled_items.data(), item_counts.data(), H, I,
                                        act.data());
                });
            } else {
                launch(I / 64, tiled_cap, 256, MMA_SHARED_BYTES, [&] {
                    moe_expert_up_mma(x.data(), gate_up.data(), tiled_items.data(), item_counts.data(), H, I,
                                      act.data());
                });
            }
        }
        if (decode_cap > 0) {
            launch(H / 64, decode_cap, 128, 0, [&] {
                moe_expert_down_decode(act.data(), down.data(), row_weights.data(), decode_items.data(),
                                       item_counts.data(), H, I, y.data());
            });
        }
        if (tiled_cap > 0) {
            if (mode.wgmma) {
                launch(H / 256, tiled_cap, 256, WG_SHARED_BYTES, [&] {
                    moe_expert_down_wgmma(act.data(), down.data(), row_weights.data(), tiled_items.data(),
                                          item_counts.data(), H, I, y.data());
                });
            } else {
                launch(H / 128, tiled_cap, 256, MMA_SHARED_BYTES, [&] {
                    moe_expert_down_mma(act.data(), down.data(), row_weights.data(), tiled_items.data(),
                                        item_counts.data(), H, I, y.data());
                });
            }
        }
        std::vector<float> act_f(act.size());
        for (size_t i = 0; i < act.size(); ++i) act_f[i] = from_bf16(act[i]);
        size_t bad_act = 0, bad_y = 0;
        const double err_act = rel_error(act_f, act_ref, &bad_act);
        const double err_y = rel_error(y, y_ref, &bad_y);
        const bool ok = bad_act == 0 && bad_y == 0 && err_act <= 1e-2 && err_y <= 1e-2;
        printf("%-34s items %u/%u  activation: rel err %.2e, %zu unwritten  rows: rel err %.2e, %zu unwritten  %s\n",
               mode.name, item_counts[0], item_counts[1], err_act, bad_act, err_y, bad_y, ok ? "ok" : "FAILED");
        if (!ok) ++failures;
    }
    return failures == 0 ? 0 : 1;
}
