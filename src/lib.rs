//! # dots-moe
//!
//! Mixture-of-Experts inference kernels for **dots.llm1** (128 routed experts, top-6
//! sigmoid-with-bias routing, 2 shared experts): a CPU reference of the MoE contract
//! ([`moe`]), fast CPU matrix kernels ([`cpu`]) and hand-written CUDA kernels.
//!
//! The contract every backend implements is documented step by step in [`moe`]:
//! route, permute, grouped expert GEMM (shared experts fused as extra slots), combine.
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod model;
pub mod moe;
pub mod roofline;
pub mod tensor;

pub use config::{Dots1Config, MoeConfig, RouterConfig, Scoring};
pub use error::{ConfigError, MoeError, PermutationError};
pub use tensor::{Dtype, TensorData, TensorView};
