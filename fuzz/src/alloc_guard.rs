//! A global allocator that aborts on any single allocation larger than a bound.
//!
//! The bound is what the input justifies: a target computes it from the size of the
//! input (for the checkpoint target, the bytes of the model directory it wrote) and arms
//! it around the code under test. An allocation past the bound is an "unbounded
//! allocation" finding: the guard prints its size and aborts, and libFuzzer records the
//! input as a crash. (Aborting rather than panicking: a global allocator must not unwind.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest single allocation allowed now; `usize::MAX` when disarmed.
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Largest single allocation seen while armed (for calibrating bounds).
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, with the single-allocation bound checked first.
pub struct BoundedAlloc;

#[inline]
fn check(size: usize) {
    let limit = LIMIT.load(Ordering::Relaxed);
    if limit == usize::MAX {
        return;
    }
    PEAK.fetch_max(size, Ordering::Relaxed);
    if size > limit {
        report_and_abort(size, limit);
    }
}

#[cold]
fn report_and_abort(size: usize, limit: usize) -> ! {
    // No formatting machinery for the message: it may allocate, inside the allocator.
    let mut line = [0u8; 160];
    let mut at = 0;
    for piece in [
        &b"alloc_guard: single allocation of "[..],
        &digits(size),
        &b" bytes exceeds the bound of "[..],
        &digits(limit),
        &b" bytes the input justifies\n"[..],
    ] {
        let piece = trim(piece);
        let n = piece.len().min(line.len() - at);
        line[at..at + n].copy_from_slice(&piece[..n]);
        at += n;
    }
    let _ = std::io::stderr().write_all(&line[..at]);
    // Where: disarmed first, so the backtrace may allocate (the system allocator is
    // reentrant; nothing here holds a lock of its own).
    LIMIT.store(usize::MAX, Ordering::SeqCst);
    let _ = writeln!(std::io::stderr(), "{}", std::backtrace::Backtrace::force_capture());
    std::process::abort();
}

/// Decimal digits of `n`, right-aligned in a zero-padded buffer (see [`trim`]).
fn digits(mut n: usize) -> [u8; 20] {
    let mut out = [0u8; 20];
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out
}

/// Drops the leading zero padding [`digits`] leaves (text pieces have none).
fn trim(piece: &[u8]) -> &[u8] {
    let start = piece.iter().position(|&b| b != 0).unwrap_or(piece.len());
    &piece[start..]
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// check before it only reads atomics and may abort the process, never unwinds.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from this allocator, which is `System`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Arms the guard with a bound of `bytes` per allocation until dropped.
pub struct Limit {
    previous: usize,
}

impl Limit {
    /// Allows single allocations of at most `bytes` while the returned value lives.
    pub fn new(bytes: usize) -> Self {
        crate::panics::install_hook();
        Limit { previous: LIMIT.swap(bytes, Ordering::SeqCst) }
    }

    /// A bound of `floor + factor * input_bytes` (saturating).
    pub fn proportional(input_bytes: usize, factor: usize, floor: usize) -> Self {
        Self::new(floor.saturating_add(factor.saturating_mul(input_bytes)))
    }
}

impl Drop for Limit {
    fn drop(&mut self) {
        LIMIT.store(self.previous, Ordering::SeqCst);
    }
}

/// Lifts the bound (for the panic hook: printing a panic and its backtrace allocates,
/// and the finding is the panic, not that allocation).
pub fn disarm() {
    LIMIT.store(usize::MAX, Ordering::SeqCst);
}

/// The largest single allocation seen while the guard was armed, since the start.
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}
