//! The MoE contract, shared by the CPU reference and the CUDA kernels.
//!
//! One MoE layer of dots.llm1 maps `hidden [T, H]` to `out [T, H]` in five steps. Each
//! step's module documents its inputs, outputs, layouts and rules precisely enough to
//! write a kernel against; every backend follows them bit for bit where determinism is
//! promised.
//!
//! 1. **Route** ([`route`](mod@route)): `hidden [T, H]` (f32 or bf16) and the router weight
//!    `[E, H]` (+ bias `[E]`) to `expert_ids [T, k]` and `weights [T, k]` (f32), in f32,
//!    sigmoid-with-bias (or softmax) scoring, group-limited top-k, ties to the lower index.
//! 2. **Permute** ([`permute`](mod@permute)): with the shared experts appended as `n_shared`
//!    extra slots per token (ids `E..E+n_shared`, weight 1.0), a stable counting sort of the
//!    `T * (k + n_shared)` pairs by slot: `expert_offsets`, `row_pairs` and the inverse
//!    `pair_rows`; then the gather of hidden rows into permuted order.
//! 3. **Expert GEMM** ([`expert`]): per slot, on its contiguous rows,
//!    `w * down(silu(gate x) * up x)`, f32 accumulation, weights in the stacked
//!    `[E + n_shared, 2I, H]` / `[E + n_shared, H, I]` layout of [`weights`].
//! 4. **Shared experts**: the `n_shared * I`-wide shared MLP runs as `n_shared` extra slots of the same
//!    grouped step ([`weights`] explains the split); its output is not scaled by
//!    `routed_scaling_factor`.
//! 5. **Combine** ([`combine`](mod@combine)): per token, the sum of its weighted rows in
//!    slot order (routed choices, then shared), fixed order, no atomics.
//!
//! [`MoeLayer::forward`] runs them all on the CPU engine ([`crate::cpu`]);
//! [`reference`](mod@reference) writes each step as plainly as possible, the oracle tests and fuzz
//! targets compare every engine against.

pub mod builder;
pub mod combine;
pub mod expert;
pub mod layer;
pub mod permute;
pub mod reference;
pub mod route;
pub mod weights;

pub use crate::cpu::experts::grouped_experts;
pub use builder::MoeLayerBuilder;
pub use combine::combine;
pub use expert::Precision;
pub use layer::{MoeLayer, MoeTrace};
pub use permute::{Permutation, gather_bf16, gather_f32, permute};
pub use route::{RouterBias, Routing, route, route_logits, router_logits};
pub use weights::{ExpertShard, MoeWeights};
