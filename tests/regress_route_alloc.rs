//! Regression test for an allocation the `route` fuzz target found: `route_logits`
//! sized its per-expert scratch from the config even for an empty batch, so a config
//! claiming 2^31 experts cost 18 GB of (lazily mapped) memory to route zero tokens.
//!
//! This file is its own test binary, so it can record every allocation.

use dots_moe::RouterConfig;
use dots_moe::moe::route_logits;

mod support;

use support::alloc::Recording;

#[global_allocator]
static GLOBAL: Recording = Recording;

#[test]
fn empty_batch_allocates_nothing_per_expert() {
    let cfg = RouterConfig { n_experts: (u32::MAX / 2) as usize, top_k: 1, ..RouterConfig::dots1() };
    cfg.validate().expect("the largest expert count the router accepts");
    support::alloc::reset();
    let routing = route_logits(&cfg, &[], 0, None).expect("an empty batch routes");
    let largest = support::alloc::largest();
    assert!(routing.expert_ids.is_empty() && routing.weights.is_empty());
    assert!(largest < 1 << 20, "routing no tokens allocated {largest} bytes at once");
}
