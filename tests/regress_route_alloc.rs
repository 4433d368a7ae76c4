//! Regression test for an allocation the `route` fuzz target found: `route_logits`
//! sized its per-expert scratch from the config even for an empty batch, so a config
//! claiming 2^31 experts cost 18 GB of (lazily mapped) memory to route zero tokens.
//!
//! This file is its own test binary, so it can record every allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use dots_moe::RouterConfig;
use dots_moe::moe::route_logits;

/// The system allocator, recording the largest single allocation.
struct Recording;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` unchanged; recording only touches an atomic.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Recording = Recording;

#[test]
fn empty_batch_allocates_nothing_per_expert() {
    let cfg = RouterConfig { n_experts: (u32::MAX / 2) as usize, top_k: 1, ..RouterConfig::dots1() };
    cfg.validate().expect("the largest expert count the router accepts");
    LARGEST.store(0, Ordering::Relaxed);
    let routing = route_logits(&cfg, &[], 0, None).expect("an empty batch routes");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(routing.expert_ids.is_empty() && routing.weights.is_empty());
    assert!(largest < 1 << 20, "routing no tokens allocated {largest} bytes at once");
}
