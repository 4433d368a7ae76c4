//! Panics while fuzzing: libFuzzer's panic hook aborts on every panic, before any
//! `catch_unwind` can see it. The hook installed here runs first: it disarms the
//! allocation guard (printing a panic allocates; the finding is the panic), and inside
//! [`catch`] it records the panic and lets it unwind instead of aborting, so a target can
//! tell a known, already reported panic from a new one.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the hook (once; later calls do nothing).
pub fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) {
                let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                CAUGHT.with(|c| *c.borrow_mut() = Some(format!("{location}: {payload}")));
                return;
            }
            crate::alloc_guard::disarm();
            previous(info);
        }));
    });
}

/// Runs `f`; a panic inside it (on this thread) comes back as `Err("file:line: message")`
/// instead of aborting the process. A panic that `f` catches itself stays invisible.
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    install_hook();
    CATCHING.with(|c| c.set(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(false));
    let caught = CAUGHT.with(|c| c.borrow_mut().take());
    result.map_err(|_| caught.unwrap_or_else(|| "panic without a message".into()))
}
