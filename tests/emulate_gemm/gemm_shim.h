// gemm_shim.h: what the expert GEMM kernel files need beyond the common device-language
// shim (scripts/gpu/emulate/cuda_shim.h): the shared-memory window that cp.async, ldmatrix
// and wgmma descriptors address. tests/cuda_expert_emulated.rs compiles gemm_emu.cpp with
// both. A logic check: indexing, fragment layouts, the schedule, the pipeline's buffer
// reuse (cp.async is modelled as an immediate copy, so ordering races of the real
// asynchronous copies are NOT checked), bounds (AddressSanitizer). It proves nothing about
// speed or the real compiler; the PTX models are written from the PTX ISA documentation,
// independently of the kernels' own index arithmetic.
#pragma once
#include "cuda_shim.h"

namespace emu {
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
}  // namespace emu

inline unsigned long long __cvta_generic_to_shared(const void* p) {
    return (unsigned long long)((const unsigned char*)p - emu::dynamic_smem) + emu::SMEM_WINDOW_START;
}
