//! Helpers shared by the integration tests; a test binary takes them with `mod support;`.
//!
//! - [`alloc`]: a global allocator recording the largest allocation (for the tests that
//!   bound allocation sizes; each installs it in its own binary).
//! - `gemm`: the GPU-vs-CPU tests of the expert GEMMs and the CUDA layer (`cuda` feature).
//! - [`model`]: the model tests' fixtures, expected values and scratch directories.
//!
//! Each binary uses a part of them, so unused items are allowed here.
#![allow(dead_code)]

pub mod alloc;
#[cfg(feature = "cuda")]
pub mod gemm;
pub mod model;
