//! A global allocator that counts the live heap bytes of each side of a test: every thread
//! carries a side (set when a runtime starts it), every allocation remembers the side of the
//! thread that made it, and its bytes count against that side until freed, whichever thread
//! frees it. So a proxy and an agent in one process each get their own figure, exact and free
//! of the noise of RSS (allocator arenas, page reuse), which on a shared 2-core machine moved
//! by more than the bound these tests assert.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};

/// Whose allocation it is. `Other` is everything not started by a tagged runtime: the test's
/// own driver, its echo server, the harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Side {
    Other = 0,
    Proxy = 1,
    Agent = 2,
}

const SIDES: usize = 3;

thread_local! {
    /// The side of the current thread; const-initialised, so reading it never allocates.
    static SIDE: Cell<u8> = const { Cell::new(Side::Other as u8) };
}

/// Live bytes per side (what was asked for, headers excluded).
static LIVE: [AtomicI64; SIDES] = [const { AtomicI64::new(0) }; SIDES];

/// Tags the current thread: what it allocates from now on counts against `side`.
pub fn enter(side: Side) {
    SIDE.with(|s| s.set(side as u8));
}

/// Heap bytes allocated by `side`'s threads and not yet freed.
pub fn live_bytes(side: Side) -> i64 {
    LIVE[side as usize].load(Ordering::Relaxed)
}

/// The counting allocator: the system allocator plus a header holding the side.
pub struct Counting;

/// The header in front of each block: room for the side byte, and a multiple of the block's
/// alignment so the caller's pointer stays aligned.
fn header(layout: Layout) -> usize {
    layout.align().max(16)
}

fn current_side() -> u8 {
    SIDE.try_with(Cell::get).unwrap_or(Side::Other as u8)
}

// SAFETY: every block handed out is `header` bytes into a system block of `size + header`
// bytes with the caller's alignment; the side byte lives at the start of that system block and
// is read back, with the same layout arithmetic, when the block is freed or resized.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let head = header(layout);
        let Ok(outer) = Layout::from_size_align(layout.size() + head, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `outer` has a non-zero size (the header).
        let base = unsafe { System.alloc(outer) };
        if base.is_null() {
            return base;
        }
        let side = current_side();
        // SAFETY: `base` points to at least `head` ≥ 16 writable bytes.
        unsafe { base.write(side) };
        LIVE[usize::from(side)].fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: within the block just allocated.
        unsafe { base.add(head) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let head = header(layout);
        // SAFETY: `ptr` came from `alloc` above with this layout, so the header precedes it.
        let base = unsafe { ptr.sub(head) };
        let side = unsafe { base.read() };
        LIVE[usize::from(side)].fetch_sub(layout.size() as i64, Ordering::Relaxed);
        let outer = Layout::from_size_align(layout.size() + head, layout.align())
            .expect("the layout alloc accepted");
        // SAFETY: `base` and `outer` are what `System.alloc` returned and was given.
        unsafe { System.dealloc(base, outer) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let head = header(layout);
        // SAFETY: as in `dealloc`; the block keeps its header (and side) across the resize.
        let base = unsafe { ptr.sub(head) };
        let side = unsafe { base.read() };
        let outer = Layout::from_size_align(layout.size() + head, layout.align())
            .expect("the layout alloc accepted");
        // SAFETY: `base`/`outer` describe the live system block; the new size keeps the header.
        let grown = unsafe { System.realloc(base, outer, new_size + head) };
        if grown.is_null() {
            return grown;
        }
        let delta = new_size as i64 - layout.size() as i64;
        LIVE[usize::from(side)].fetch_add(delta, Ordering::Relaxed);
        // SAFETY: within the resized block.
        unsafe { grown.add(head) }
    }
}

/// A one-thread runtime whose threads count their allocations against `side`.
pub fn runtime(side: Side, name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .on_thread_start(move || enter(side))
        .enable_all()
        .build()
        .expect("runtime")
}
