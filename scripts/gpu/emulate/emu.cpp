// emu.cpp: runs a list of dots-moe kernel launches on the CPU (see cuda_shim.h).
//
//   emu PROGRAM OUTPUT
//
// PROGRAM (little-endian): u32 buffers, then per buffer u64 bytes + the bytes; u32
// launches, then per launch u32 name length + name, u32 grid_x, grid_y, block, shared
// bytes, u32 args, per arg u8 kind (0 buffer index, 1 u32, 2 u64, 3 f32 bits, 4 null
// pointer) + u64 value. OUTPUT: u32 buffers, per buffer u64 bytes + the bytes, after the
// launches ran in order.
#include <cstdio>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels_emu.inc"

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;
namespace emu {
thread_local Warp* warp;
thread_local unsigned lane;
thread_local Block* block;
unsigned char* dynamic_smem;
}  // namespace emu

struct Arg {
    unsigned char kind;
    unsigned long long value;
};

struct Reader {
    FILE* f;
    template <class T>
    T get() {
        T v;
        if (fread(&v, sizeof(T), 1, f) != 1) throw std::runtime_error("truncated program");
        return v;
    }
};

using Kernel = std::function<void(const std::vector<Arg>&, std::vector<std::vector<unsigned char>>&)>;

template <class T>
T scalar(const Arg& a) {
    T v;
    if (a.kind == 3) {
        unsigned bits = (unsigned)a.value;
        std::memcpy(&v, &bits, sizeof(float));
    } else {
        v = (T)a.value;
    }
    return v;
}

template <class T>
T* pointer(const Arg& a, std::vector<std::vector<unsigned char>>& buffers) {
    if (a.kind == 4) return nullptr;
    if (a.kind != 0) throw std::runtime_error("expected a pointer argument");
    return reinterpret_cast<T*>(buffers.at(a.value).data());
}

#define P(T, i) pointer<T>(a[i], b)
#define U32(i) scalar<u32>(a[i])
#define U64(i) scalar<u64>(a[i])
#define F32(i) scalar<float>(a[i])

static std::map<std::string, Kernel> kernels() {
    std::map<std::string, Kernel> k;
#define LOGITS(NAME, TX, TW) \
    k[#NAME] = [](auto& a, auto& b) { NAME(P(TX, 0), P(TW, 1), P(float, 2), U32(3), U32(4), U64(5), U32(6)); };
    LOGITS(moe_router_logits_f32_f32_e1, float, float)
    LOGITS(moe_router_logits_f32_bf16_e1, float, u16)
    LOGITS(moe_router_logits_bf16_f32_e1, u16, float)
    LOGITS(moe_router_logits_bf16_bf16_e1, u16, u16)
    LOGITS(moe_router_logits_f32_f32_e4, float, float)
    LOGITS(moe_router_logits_f32_bf16_e4, float, u16)
    LOGITS(moe_router_logits_bf16_f32_e4, u16, float)
    LOGITS(moe_router_logits_bf16_bf16_e4, u16, u16)
    k["moe_router_select"] = [](auto& a, auto& b) {
        moe_router_select(P(float, 0), P(float, 1), U32(2), U32(3), U32(4), U32(5), U32(6), U32(7), U32(8), U32(9),
                          F32(10), P(u32, 11), P(float, 12), P(u32, 13), P(u32, 14), P(u64, 15), U32(16),
                          P(u32, 17), P(u32, 18), P(u32, 19), P(float, 20));
    };
    k["moe_permute_rank"] = [](auto& a, auto& b) {
        moe_permute_rank(P(u32, 0), U32(1), U32(2), U32(3), P(u32, 4), P(u32, 5), P(u64, 6));
    };
    k["moe_permute_scatter"] = [](auto& a, auto& b) {
        moe_permute_scatter(P(u32, 0), P(float, 1), P(u32, 2), P(u32, 3), U32(4), U32(5), U32(6), U32(7), P(u32, 8),
                            P(u32, 9), P(u32, 10), P(float, 11));
    };
#define GATHER_K(NAME, TX, TO) \
    k[#NAME] = [](auto& a, auto& b) { NAME(P(TX, 0), P(u32, 1), P(TO, 2), U32(3), U64(4), U32(5)); };
    GATHER_K(moe_gather_f32_to_f32, float, float)
    GATHER_K(moe_gather_f32_to_bf16, float, u16)
    GATHER_K(moe_gather_bf16_to_f32, u16, float)
    GATHER_K(moe_gather_bf16_to_bf16, u16, u16)
    k["moe_combine"] = [](auto& a, auto& b) { moe_combine(P(float, 0), P(u32, 1), U32(2), U64(3), U32(4), P(float, 5)); };
    return k;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: emu PROGRAM OUTPUT\n");
        return 2;
    }
    try {
        FILE* f = fopen(argv[1], "rb");
        if (!f) throw std::runtime_error("cannot open program");
        Reader r{f};
        std::vector<std::vector<unsigned char>> buffers(r.get<u32>());
        for (auto& buf : buffers) {
            buf.resize(r.get<u64>());
            if (!buf.empty() && fread(buf.data(), 1, buf.size(), f) != buf.size()) throw std::runtime_error("truncated buffer");
        }
        auto table = kernels();
        u32 launches = r.get<u32>();
        for (u32 l = 0; l < launches; ++l) {
            std::string name(r.get<u32>(), '\0');
            if (fread(name.data(), 1, name.size(), f) != name.size()) throw std::runtime_error("truncated name");
            dim3 grid{r.get<u32>(), r.get<u32>(), 1};
            u32 threads = r.get<u32>();
            u32 shared = r.get<u32>();
            std::vector<Arg> args(r.get<u32>());
            for (auto& a : args) {
                a.kind = r.get<unsigned char>();
                a.value = r.get<u64>();
            }
            auto kernel = table.find(name);
            if (kernel == table.end()) throw std::runtime_error("unknown kernel " + name);
            gridDim = grid;
            blockDim = dim3{threads, 1, 1};
            std::vector<unsigned char> smem(shared + 16, 0xab);  // poisoned: reads before writes show
            for (unsigned by = 0; by < grid.y; ++by) {
                for (unsigned bx = 0; bx < grid.x; ++bx) {
                    emu::Block blk;
                    blk.bar = std::make_unique<std::barrier<>>(threads);
                    blk.warps = std::make_unique<emu::Warp[]>((threads + 31) / 32);
                    std::fill(smem.begin(), smem.end(), 0xab);
                    emu::dynamic_smem = smem.data();
                    std::vector<std::thread> pool;
                    for (unsigned t = 0; t < threads; ++t) {
                        pool.emplace_back([&, t] {
                            threadIdx = dim3{t, 0, 0};
                            blockIdx = dim3{bx, by, 0};
                            emu::block = &blk;
                            emu::warp = &blk.warps[t / 32];
                            emu::lane = t % 32;
                            kernel->second(args, buffers);
                            emu::warp->bar.arrive_and_drop();
                            emu::block->bar->arrive_and_drop();
                        });
                    }
                    for (auto& th : pool) th.join();
                }
            }
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
