//! The receive window of one stream direction: how much credit the peer may hold, and how it
//! adapts.
//!
//! Credit is permission to send, not a preallocated buffer: a window costs memory only for the
//! bytes that actually wait in the receiver's queue, which is why an idle stream costs the same
//! whatever its window. A window bounds what a stalled reader makes the receiver buffer.
//!
//! One stream is limited by its window whenever the window is smaller than what the path holds
//! in flight (the sender's SSH buffers, three sockets, the grant's way back). So the window
//! starts at `base` and doubles, up to `cap`, each time the stream has moved one whole window to
//! a local reader that kept up (every local write took all it was offered). When the local side
//! backs up (a write takes less than offered: its socket buffer is full), the window shrinks back
//! to `base` by withholding grants as the queued bytes drain. A stalled reader therefore buffers
//! at most the window it had when it stalled: `base` for a stream that never moved much, at most
//! `cap` for one that was moving fast.
//!
//! Growth above `base` is drawn from a [`WindowBudget`] that all streams of one tunnel share, so
//! what a tunnel may have in flight is bounded as a whole: `streams × base + budget`, however
//! many of its streams are fast at once. One fast stream still reaches `cap`; eight share the
//! budget.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Credit the streams of one tunnel may grant above their base windows, together.
#[derive(Debug)]
pub struct WindowBudget {
    /// Bytes of growth not yet taken by any stream.
    left: AtomicU64,
}

impl WindowBudget {
    /// A budget of `bytes` for one tunnel's streams.
    pub fn new(bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicU64::new(bytes),
        })
    }

    /// Growth not taken by any stream now.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::Acquire)
    }

    /// Takes up to `want` bytes of growth; returns what it got (0 when the budget is spent).
    fn take(&self, want: u64) -> u64 {
        let taken = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                Some(left - left.min(want))
            });
        // fetch_update with a closure that always returns Some cannot fail.
        let before = taken.unwrap_or_else(|left| left);
        before.min(want)
    }

    /// Gives back growth a stream no longer holds.
    fn give(&self, bytes: u64) {
        self.left.fetch_add(bytes, Ordering::AcqRel);
    }
}

/// One direction's receive window (kept by the receiving side).
#[derive(Debug)]
pub(crate) struct Window {
    base: u64,
    cap: u64,
    /// The credit the peer may hold: bytes in flight plus bytes queued here.
    size: u64,
    /// Bytes written to the local side since the window last changed size or the reader backed
    /// up.
    moved: u64,
    /// The local side backed up: withhold grants until the window is back at `base`.
    shrinking: bool,
    /// Where growth above `base` comes from, and goes back to.
    budget: Arc<WindowBudget>,
}

impl Window {
    pub(crate) fn new(base: u32, cap: u32, budget: Arc<WindowBudget>) -> Self {
        let base = u64::from(base.max(1));
        Self {
            base,
            cap: u64::from(cap).max(base),
            size: base,
            moved: 0,
            shrinking: false,
            budget,
        }
    }

    /// The current window: the most this side buffers for its local reader.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// `written` bytes of `offered` went to the local side; returns the credit to grant back.
    pub(crate) fn written(&mut self, written: u64, offered: u64) -> u64 {
        if written < offered {
            // The local socket's buffer is full: the reader is not keeping up.
            self.shrinking = self.size > self.base;
            self.moved = 0;
        }
        if self.shrinking {
            let withheld = written.min(self.size - self.base);
            self.size -= withheld;
            self.budget.give(withheld);
            self.shrinking = self.size > self.base;
            return written - withheld;
        }
        self.moved += written;
        if self.moved >= self.size && self.size < self.cap {
            let want = (self.size * 2).min(self.cap) - self.size;
            let extra = self.budget.take(want);
            // With the tunnel's budget spent the window stays; it tries again after another
            // whole window, by when another stream may have given some back.
            self.size += extra;
            self.moved = 0;
            return written + extra;
        }
        written
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.budget.give(self.size - self.base);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Window, WindowBudget};

    const K: u64 = 1024;

    /// A budget no test below reaches.
    fn ample() -> Arc<WindowBudget> {
        WindowBudget::new(1 << 40)
    }

    /// Feeds `w` full writes of 64 KiB until it stops growing; returns the credit granted back.
    fn run_fast(w: &mut Window) -> u64 {
        let mut granted = 0;
        for _ in 0..200 {
            granted += w.written(64 * K, 64 * K);
        }
        granted
    }

    #[test]
    fn grows_by_doubling_while_the_reader_keeps_up_and_stops_at_the_cap() {
        let mut w = Window::new(512 * 1024, 4 * 1024 * 1024, ample());
        let mut granted = w.size();
        let mut sizes = vec![w.size() / K];
        for _ in 0..200 {
            granted += w.written(64 * K, 64 * K);
            if sizes.last() != Some(&(w.size() / K)) {
                sizes.push(w.size() / K);
            }
        }
        assert_eq!(sizes, [512, 1024, 2048, 4096]);
        // Everything consumed was granted back, plus the growth.
        assert_eq!(granted, 200 * 64 * K + w.size());
    }

    #[test]
    fn a_reader_that_backs_up_stops_growth_and_shrinks_the_window_to_base() {
        let mut w = Window::new(512 * 1024, 4 * 1024 * 1024, ample());
        let mut granted = w.size();
        let mut consumed = 0;
        while w.size() < 4 * 1024 * K {
            granted += w.written(64 * K, 64 * K);
            consumed += 64 * K;
        }
        // A partial write: the local socket is full.
        granted += w.written(10 * K, 64 * K);
        consumed += 10 * K;
        for _ in 0..100 {
            granted += w.written(64 * K, 64 * K);
            consumed += 64 * K;
            if w.size() == 512 * K {
                break;
            }
        }
        assert_eq!(w.size(), 512 * K, "shrunk back to base");
        // What the peer holds (granted − consumed) is the window again.
        assert_eq!(granted - consumed, w.size());
        // And it only grows again after a whole window moved with the reader keeping up.
        granted += w.written(64 * K, 64 * K);
        consumed += 64 * K;
        assert_eq!(w.size(), 512 * K);
        assert_eq!(granted - consumed, w.size());
    }

    #[test]
    fn a_stalled_stream_never_grows() {
        let mut w = Window::new(512 * 1024, 4 * 1024 * 1024, ample());
        for _ in 0..1000 {
            assert_eq!(w.written(4 * K, 64 * K), 4 * K);
        }
        assert_eq!(w.size(), 512 * K);
    }

    #[test]
    fn a_cap_below_base_means_a_fixed_window() {
        let mut w = Window::new(512 * 1024, 0, ample());
        for _ in 0..100 {
            assert_eq!(w.written(64 * K, 64 * K), 64 * K);
        }
        assert_eq!(w.size(), 512 * K);
    }

    #[test]
    fn streams_of_one_tunnel_share_the_growth_budget() {
        // 3 MiB of growth for the tunnel; each window may grow from 512 KiB to 2 MiB.
        let budget = WindowBudget::new(3 * 1024 * K);
        let mut first = Window::new(512 * 1024, 2 * 1024 * 1024, budget.clone());
        let mut second = Window::new(512 * 1024, 2 * 1024 * 1024, budget.clone());
        let mut third = Window::new(512 * 1024, 2 * 1024 * 1024, budget.clone());
        run_fast(&mut first);
        assert_eq!(first.size(), 2048 * K, "one fast stream reaches the cap");
        assert_eq!(budget.left(), 1536 * K);
        run_fast(&mut second);
        assert_eq!(second.size(), 2048 * K);
        assert_eq!(budget.left(), 0);
        // The budget is spent: a third fast stream keeps its base window, and what it is
        // granted back is exactly what it consumed (no growth, no credit lost).
        let granted = run_fast(&mut third);
        assert_eq!(third.size(), 512 * K);
        assert_eq!(granted, 200 * 64 * K);
        // A stream that ends gives its growth back; the third grows with it.
        drop(first);
        assert_eq!(budget.left(), 1536 * K);
        run_fast(&mut third);
        assert_eq!(third.size(), 2048 * K);
        assert_eq!(budget.left(), 0);
    }

    #[test]
    fn a_window_that_shrinks_gives_its_growth_back() {
        let budget = WindowBudget::new(4 * 1024 * K);
        let mut w = Window::new(512 * 1024, 2 * 1024 * 1024, budget.clone());
        run_fast(&mut w);
        assert_eq!(budget.left(), 2560 * K);
        // The reader backs up, then drains the queue: the window returns to base.
        w.written(10 * K, 64 * K);
        while w.size() > 512 * K {
            w.written(64 * K, 64 * K);
        }
        assert_eq!(budget.left(), 4 * 1024 * K);
        drop(w);
        assert_eq!(budget.left(), 4 * 1024 * K, "nothing given back twice");
    }
}
