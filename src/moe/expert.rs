//! Steps 3 and 4 of the contract: the **grouped expert GEMM**, shared experts included
//! as extra slots.
//!
//! For every slot `e` and each of its permuted rows `r` (contiguous, from
//! [`Permutation::expert_rows`](crate::moe::Permutation::expert_rows)):
//!
//! ```text
//! g      = x[r] @ gate_e^T             # [I], f32 accumulation
//! u      = x[r] @ up_e^T               # [I]
//! a      = silu(g) * u                 # f32; rounded to bf16 under Precision::Bf16
//! y[r]   = w[r] * (a @ down_e^T)       # [H], f32 accumulation, one multiply by the weight
//! ```
//!
//! `x` is the gathered input (bf16 under [`Precision::Bf16`], f32 under
//! [`Precision::F32`]); `w[r]` is the routing weight of the row's pair (1.0 for the shared
//! slots). Only the I-wide activation is kept between the two GEMMs.
//!
//! The CPU engine runs this step in [`crate::cpu::experts`] (its public entry point,
//! [`grouped_experts`](crate::moe::grouped_experts), is re-exported by [`crate::moe`]); the plain oracle
//! is [`crate::moe::reference::expert_mlp`].

/// What the expert GEMMs take as input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// The kernel contract: the gathered hidden rows and the SwiGLU activation are rounded
    /// to bf16 (nearest even) before each GEMM; products and sums in f32. This is what a
    /// bf16 engine (and the CUDA kernels) compute.
    #[default]
    Bf16,
    /// Inputs stay f32 (bf16 weights convert exactly): the accurate path the reference
    /// model uses to match an f32 computation.
    F32,
}
