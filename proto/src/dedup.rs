//! Host-side idempotency: a bounded window of recently executed request ids and their cached responses.
//!
//! Design: the agent allocates request ids that increase over its lifetime (across restarts too) and reuses the
//! id when it retries. The host keeps the last `N` executed ids with their responses. For an incoming id:
//! - present in the window -> [`Seen::Duplicate`]: reply with the cached response, do not execute again;
//! - not present and at or below the *floor* (the largest id ever evicted) -> [`Seen::Stale`]: the host can no
//!   longer tell whether it ran it, so it must not run it; the agent re-sends the intent under a fresh id
//!   (grants stay exactly-once through their grant id);
//! - otherwise -> [`Seen::New`]: execute, then [`DedupWindow::record`].
//!
//! Invariant: an id is executed at most once while the window lives (a restart of the host empties it; the host's
//! state is then rebuilt from scratch and resynchronised by the agent). No allocation; O(N) per lookup.

use heapless::Vec;

/// What the window says about an incoming id.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen<'a, R> {
    /// Never seen: execute it.
    New,
    /// Executed before: here is the response it got.
    Duplicate(&'a R),
    /// Too old to know: do not execute.
    Stale,
}

/// Window of the last `N` executed request ids with their responses.
#[derive(Debug, Clone)]
pub struct DedupWindow<R, const N: usize> {
    entries: Vec<(u64, R), N>,
    floor: u64,
}

impl<R, const N: usize> Default for DedupWindow<R, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R, const N: usize> DedupWindow<R, N> {
    /// An empty window.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            entries: Vec::new(),
            floor: 0,
        }
    }

    /// Classifies `id`.
    #[must_use]
    pub fn check(&self, id: u64) -> Seen<'_, R> {
        if let Some((_, r)) = self.entries.iter().find(|(i, _)| *i == id) {
            return Seen::Duplicate(r);
        }
        if id <= self.floor {
            Seen::Stale
        } else {
            Seen::New
        }
    }

    /// Records the response of a newly executed id, evicting the oldest id when full. Recording an id that is
    /// already present replaces its response.
    pub fn record(&mut self, id: u64, response: R) {
        if let Some(slot) = self.entries.iter_mut().find(|(i, _)| *i == id) {
            slot.1 = response;
            return;
        }
        if self.entries.is_full() {
            if let Some((pos, _)) = self.entries.iter().enumerate().min_by_key(|(_, (i, _))| *i) {
                let (evicted, _) = self.entries.swap_remove(pos);
                self.floor = self.floor.max(evicted);
            }
        }
        // Cannot fail: one slot was freed above when full (N == 0 keeps nothing and every old id becomes stale).
        if let Err((id, _)) = self.entries.push((id, response)) {
            self.floor = self.floor.max(id);
        }
    }

    /// Largest evicted id: ids at or below it that are not in the window are stale.
    #[must_use]
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Number of ids held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no id is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_returns_cached_and_old_ids_go_stale() {
        let mut w: DedupWindow<u32, 3> = DedupWindow::new();
        assert_eq!(w.check(5), Seen::New);
        w.record(5, 50);
        assert_eq!(w.check(5), Seen::Duplicate(&50));
        for id in 6..=8 {
            assert_eq!(w.check(id), Seen::New);
            w.record(id, u32::try_from(id).unwrap() * 10);
        }
        // 5 was evicted: stale, never re-executed.
        assert_eq!(w.check(5), Seen::Stale);
        assert_eq!(w.floor(), 5);
        // An id below the floor that was never seen is stale too (cannot be told apart).
        assert_eq!(w.check(3), Seen::Stale);
        assert_eq!(w.check(7), Seen::Duplicate(&70));
        assert_eq!(w.check(9), Seen::New);
    }

    #[test]
    fn out_of_order_ids_inside_window_are_new_once() {
        let mut w: DedupWindow<(), 4> = DedupWindow::new();
        w.record(10, ());
        assert_eq!(w.check(8), Seen::New);
        w.record(8, ());
        assert_eq!(w.check(8), Seen::Duplicate(&()));
        assert_eq!(w.len(), 2);
    }
}
