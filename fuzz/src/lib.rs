//! Shared pieces of the dots-moe fuzz targets: the allocation guard every target runs
//! under, value generators that reach the corner cases (NaN, infinities, ties, huge and
//! tiny values), and the plain reference router the `route` and `moe_layer` oracles
//! compare against.
//!
//! The reference code here is written from the contract's text (src/moe/route.rs), not
//! from the implementation: sorts instead of selection loops, `f64` where the contract
//! does not fix the order of an operation.

pub mod alloc_guard;
pub mod panics;
pub mod reference;
pub mod safetensors_file;
pub mod values;

/// Every fuzz target links this crate, so every target runs under the guard. A target
/// arms it with [`alloc_guard::Limit`] around the code under test.
#[global_allocator]
static GLOBAL: alloc_guard::BoundedAlloc = alloc_guard::BoundedAlloc;
