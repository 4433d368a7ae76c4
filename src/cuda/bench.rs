//! Timing of the MoE kernels with CUDA events (filled in by `dots-moe kernels --time`).
