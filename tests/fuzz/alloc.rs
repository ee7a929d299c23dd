//! The fuzz binary's allocator: the system one, plus a note on stderr (with a backtrace) when a
//! large allocation fails under the child's address-space limit, so the parent can name the
//! line that asked for it before the process aborts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct NotingAlloc;

thread_local! {
    static NOTING: Cell<bool> = const { Cell::new(false) };
}

/// Smaller failures are not worth a backtrace (and may not leave room for one).
const NOTE_FROM: usize = 1 << 20;

fn note_failure(size: usize) {
    // The backtrace allocates; the flag keeps a failure inside it from recursing.
    if NOTING.with(|n| n.replace(true)) {
        return;
    }
    let bt = std::backtrace::Backtrace::force_capture();
    eprintln!("@fuzz oom: allocation of {size} bytes failed\n{bt}");
    NOTING.with(|n| n.set(false));
}

unsafe impl GlobalAlloc for NotingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() && layout.size() >= NOTE_FROM {
            note_failure(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() && layout.size() >= NOTE_FROM {
            note_failure(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() && new_size >= NOTE_FROM {
            note_failure(new_size);
        }
        p
    }
}
