// emu.cpp: runs a list of dots-moe kernel launches on the CPU (see cuda_shim.h).
//
//   emu PROGRAM OUTPUT
//
// Built by tests/emulator_support (Rust) with two generated files next to it: kernels.inc
// (the headers and every kernel file of the registry, included in order) and dispatch.inc
// (one entry per declared kernel that calls it with its arguments cast to the declared
// types). Nothing here lists a kernel or an argument.
//
// PROGRAM (little-endian): u32 buffers, then per buffer u64 bytes + the bytes; u32
// launches, then per launch u32 name length + name, u32 grid_x, grid_y, block, u64 shared
// bytes, u32 args, u64 per arg (scalars zero-extended, f32 as its bits, pointers as device
// addresses: buffer i starts at (i + 1) << 32, 0 is null). OUTPUT: u32 buffers, per
// buffer u64 bytes + the bytes, after the launches ran in order.
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels.inc"

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;
namespace emu {
thread_local Warp* warp;
thread_local Group* group;
thread_local unsigned lane;
thread_local Block* block;
unsigned char* dynamic_smem;

static std::vector<std::vector<unsigned char>>* buffers;

// The host address of device address `addr`.
static void* ptr(unsigned long long addr) {
    if (addr == 0) return nullptr;
    const unsigned long long index = (addr >> 32) - 1, offset = addr & 0xffffffffull;
    if (index >= buffers->size() || offset > (*buffers)[index].size()) {
        fprintf(stderr, "emu: address %#llx is outside every buffer\n", addr);
        std::abort();
    }
    return (*buffers)[index].data() + offset;
}

static float f32(unsigned long long bits) {
    const unsigned b = (unsigned)bits;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
}  // namespace emu

using Args = std::vector<unsigned long long>;
using Kernel = void (*)(const Args&);

static const std::map<std::string, std::pair<unsigned, Kernel>>& kernels() {
    static const std::map<std::string, std::pair<unsigned, Kernel>> table = {
#include "dispatch.inc"
    };
    return table;
}

// The seed of the warps' turns (DOTS_MOE_EMU_SEED, else 0) and whether threads run freely
// instead (DOTS_MOE_EMU_SCHEDULE=free); see cuda_shim.h.
static unsigned long long schedule_seed() {
    const char* s = std::getenv("DOTS_MOE_EMU_SEED");
    return s ? std::strtoull(s, nullptr, 0) : 0;
}
static bool schedule_free() {
    const char* s = std::getenv("DOTS_MOE_EMU_SCHEDULE");
    return s && std::string(s) == "free";
}

// splitmix64: one generator seed per CTA of every launch, from the run's seed.
static unsigned long long mix(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Runs `kernel` on every CTA of `grid`, one std::thread per CUDA thread; the same threads
// run the CTAs one after another (per-CTA state and shared memory are made fresh by thread
// 0 between two CTAs, behind a barrier every thread always reaches), in an order shuffled
// by the run's seed and the launch's index: the hardware promises no order, so a kernel
// whose result depends on one (a "last CTA" that is not the last to finish, say) shows it.
// Inside a CTA the warps take turns (cuda_shim.h).
static void launch(unsigned index, unsigned grid_x, unsigned grid_y, unsigned threads, size_t shared, Kernel kernel,
                   const Args& args) {
    gridDim = dim3{grid_x, grid_y, 1};
    blockDim = dim3{threads, 1, 1};
    static const unsigned long long seed = schedule_seed();
    static const bool free = schedule_free();
    std::barrier<> between(threads);
    std::vector<std::pair<unsigned, unsigned>> order;  // (bx, by) in running order
    for (unsigned by = 0; by < grid_y; ++by) {
        for (unsigned bx = 0; bx < grid_x; ++bx) order.emplace_back(bx, by);
    }
    std::shuffle(order.begin(), order.end(), std::mt19937_64(mix(mix(seed) ^ ~(unsigned long long)index)));
    emu::Block blk;
    std::unique_ptr<unsigned char[]> smem;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            for (const auto [bx, by] : order) {
                if (t == 0) {
                    const unsigned long long cta = mix(mix(mix(seed) ^ index) ^ by) ^ bx;
                    blk.turns = std::make_unique<emu::Turns>(threads, mix(cta), free);
                    blk.bar = emu::TurnBarrier{threads};
                    blk.warps = std::make_unique<emu::Warp[]>((threads + 31) / 32);
                    blk.groups = std::make_unique<emu::Group[]>((threads + 127) / 128);
                    for (unsigned g = 0; g < (threads + 127) / 128; ++g) {
                        blk.groups[g].bar = emu::TurnBarrier{std::min(128u, threads - 128 * g)};
                    }
                    blk.unfenced.assign(threads, {});
                    blk.mbarriers.clear();
                    // Exactly `shared` bytes (AddressSanitizer sees overruns), poisoned:
                    // reads before writes show.
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
                emu::reset_thread_state();
                emu::reset_wgmma_thread();
                blk.turns->begin(t / 32);
                kernel(args);
                emu::warp->bar.arrive_and_drop();
                blk.turns->exit(t / 32, {&emu::group->bar, &blk.bar});
                between.arrive_and_wait();
            }
        });
    }
    for (auto& th : pool) th.join();
}

struct Reader {
    FILE* f;
    template <class T>
    T get() {
        T v;
        if (fread(&v, sizeof(T), 1, f) != 1) throw std::runtime_error("truncated program");
        return v;
    }
};

// Aborts the run when no turn has passed and no wait was released for
// DOTS_MOE_EMU_TIMEOUT_S seconds (default 300): a hang, such as a wait nothing completes
// while a thread still runs, or a warp-level wait the turns cannot see.
static void start_watchdog() {
    const char* s = std::getenv("DOTS_MOE_EMU_TIMEOUT_S");
    const unsigned limit = s ? (unsigned)std::strtoul(s, nullptr, 0) : 300;
    std::thread([limit] {
        unsigned long long last = emu::progress.load();
        unsigned still = 0;
        for (;;) {
            std::this_thread::sleep_for(std::chrono::seconds(1));
            const unsigned long long now = emu::progress.load();
            still = now == last ? still + 1 : 0;
            last = now;
            if (still >= limit) {
                fprintf(stderr, "emulator: no warp made progress for %u s: a hang\n", limit);
                std::abort();
            }
        }
    }).detach();
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: emu PROGRAM OUTPUT\n");
        return 2;
    }
    start_watchdog();
    try {
        FILE* f = fopen(argv[1], "rb");
        if (!f) throw std::runtime_error("cannot open program");
        Reader r{f};
        std::vector<std::vector<unsigned char>> buffers(r.get<u32>());
        emu::buffers = &buffers;
        for (auto& buf : buffers) {
            buf.resize(r.get<u64>());
            if (!buf.empty() && fread(buf.data(), 1, buf.size(), f) != buf.size()) {
                throw std::runtime_error("truncated buffer");
            }
        }
        u32 launches = r.get<u32>();
        for (u32 l = 0; l < launches; ++l) {
            std::string name(r.get<u32>(), '\0');
            if (fread(name.data(), 1, name.size(), f) != name.size()) throw std::runtime_error("truncated name");
            const u32 grid_x = r.get<u32>(), grid_y = r.get<u32>(), threads = r.get<u32>();
            const u64 shared = r.get<u64>();
            Args args(r.get<u32>());
            for (auto& a : args) a = r.get<u64>();
            auto kernel = kernels().find(name);
            if (kernel == kernels().end()) throw std::runtime_error("unknown kernel " + name);
            if (kernel->second.first != args.size()) throw std::runtime_error(name + ": wrong argument count");
            launch(l, grid_x, grid_y, threads, shared, kernel->second.second, args);
        }
        fclose(f);
        FILE* out = fopen(argv[2], "wb");
        if (!out) throw std::runtime_error("cannot open output");
        u32 n = buffers.size();
        fwrite(&n, 4, 1, out);
        for (auto& buf : buffers) {
            u64 bytes = buf.size();
            fwrite(&bytes, 8, 1, out);
            fwrite(buf.data(), 1, buf.size(), out);
        }
        fclose(out);
    } catch (const std::exception& e) {
        fprintf(stderr, "emu: %s\n", e.what());
        return 1;
    }
    return 0;
}
