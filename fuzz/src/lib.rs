//! Shared pieces of the dots-moe fuzz targets: the allocation guard every target runs
//! under and value generators that reach the corner cases (NaN, infinities, ties, huge
//! and tiny values). The plain reference the `route`, `config` and `moe_layer` oracles
//! compare against is the library's own, `dots_moe::moe::reference`, written from the
//! contract's text rather than from the engines (sorts instead of selection loops).

pub mod alloc_guard;
pub mod panics;
pub mod safetensors_file;
pub mod values;

/// Every fuzz target links this crate, so every target runs under the guard. A target
/// arms it with [`alloc_guard::Limit`] around the code under test.
#[global_allocator]
static GLOBAL: alloc_guard::BoundedAlloc = alloc_guard::BoundedAlloc;
