//! Tag clocks and tag indices: the arithmetic core of the mClock-family dispatcher.
//!
//! Design: every per-volume tag stream (reservation `R`, limit `L`, proportional `P`, boost `B`, the
//! commitment meter `U`) and the device-wide borrow clock `G` is a [`TagClock`]. A clock remembers the
//! tag of the last request it charged (`last`), that request's cost, and the earliest tag the next
//! request may carry (`next = last + cost / rate`). The division is exact over time: its remainder is
//! carried into the next advance (Bresenham style), so a long run of requests is spaced by exactly
//! `sum(cost) / rate`, never drifting by rounding. Only re-anchoring (an idle volume coming back, or a
//! rate change) discards the sub-nanosecond remainder.
//!
//! Units: wall-clock tags are nanoseconds; rates are in I/Os per second where one I/O is
//! [`COST_ONE`] cost units. Proportional tags are virtual time: a request of cost `c` on a volume of
//! weight `w` advances it by `c * P_SCALE / w`.
//!
//! Invariants: `next >= last` always; arithmetic saturates rather than wrapping (a u64 of
//! nanoseconds lasts 584 years; virtual time lasts >= 2^48 unit I/Os at weight 1).
//!
//! [`TagIndex`] is an indexed binary min-heap of `(tag, volume index)`, one entry per volume,
//! giving O(log n) insert, re-key, remove and pop, and O(1) min.

use alloc::vec::Vec;

/// Cost units per normalised I/O (fixed point: 1024 = one I/O of `unit_bytes` at cost factor 1.0).
pub const COST_ONE: u64 = 1024;
/// Virtual-time units per cost unit at weight 1.
pub const P_SCALE: u64 = 64;
const NS_PER_S: u64 = 1_000_000_000;

/// `a * b / d` and `a * b % d` without overflow (u64 fast path, u128 fallback). `d` must be > 0.
#[must_use]
pub(crate) fn mul_div_rem(a: u64, b: u64, d: u64) -> (u64, u64) {
    debug_assert!(d > 0);
    if let Some(p) = a.checked_mul(b) {
        (p / d, p % d)
    } else {
        let p = u128::from(a) * u128::from(b);
        let d = u128::from(d);
        // The quotient saturates; the remainder is < d <= u64::MAX by construction.
        let q = u64::try_from(p / d).unwrap_or(u64::MAX);
        let r = u64::try_from(p % d).unwrap_or(0);
        (q, r)
    }
}

/// How a clock converts a cost into a tag increment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// Wall-clock spacing at this many I/Os per second (must be > 0).
    Iops(u64),
    /// Virtual-time spacing for this weight (must be > 0).
    Weight(u32),
}

impl Rate {
    /// Numerator multiplier and denominator of the tag increment per cost unit.
    fn factors(self) -> (u64, u64) {
        match self {
            // cost / (iops * COST_ONE) seconds = cost * 1e9 / (iops * COST_ONE) ns.
            Rate::Iops(iops) => (NS_PER_S, iops.saturating_mul(COST_ONE).max(1)),
            Rate::Weight(w) => (P_SCALE, u64::from(w).max(1)),
        }
    }
}

/// One tag stream (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagClock {
    /// Tag of the last charged request.
    pub last: u64,
    /// Earliest tag of the next request.
    pub next: u64,
    /// Remainder of the last division, in units of 1/denominator.
    rem: u64,
    /// Cost of the last charged request (to respace `next` on a rate change).
    last_cost: u64,
}

impl TagClock {
    /// A clock whose first request may carry any tag >= `start`.
    #[must_use]
    pub fn starting_at(start: u64) -> Self {
        Self {
            last: start,
            next: start,
            rem: 0,
            last_cost: 0,
        }
    }

    /// The tag the next request gets: `max(next, anchor)`. The anchor is the request's arrival time (or
    /// the current virtual time for proportional tags): a stream that fell behind its anchor (idle)
    /// restarts at the anchor, so it neither floods with stale tags nor starves.
    #[must_use]
    pub fn tag_for(&self, anchor: u64) -> u64 {
        self.next.max(anchor)
    }

    /// Earliest integer time not before the exact next tag (`next` rounded up by the carried
    /// remainder): a limit is honoured exactly when requests become eligible only at `ready_at`.
    #[must_use]
    pub fn ready_at(&self) -> u64 {
        self.next.saturating_add(u64::from(self.rem > 0))
    }

    /// Charges a request of `cost` that was given `tag` (normally `tag_for(anchor)`).
    pub fn charge(&mut self, tag: u64, cost: u64, rate: Rate) {
        let (mul, den) = rate.factors();
        // A remainder from another rate (boost and borrow rates move) is clamped into range.
        let carried = if tag > self.next {
            0
        } else {
            self.rem.min(den - 1)
        };
        let (q, r) = mul_div_rem(cost, mul, den);
        // q*den + r + carried: fold the carried remainder in without overflow (both < den).
        let (extra, rem) = if r >= den - carried {
            (1, r - (den - carried))
        } else {
            (0, r + carried)
        };
        self.last = tag;
        self.last_cost = cost;
        self.next = tag.saturating_add(q).saturating_add(extra);
        self.rem = rem;
    }

    /// Respaces `next` from the last charged request at a new rate (commitment, limit or weight
    /// change): the change takes effect for the very next request.
    pub fn respace(&mut self, rate: Rate) {
        let (mul, den) = rate.factors();
        let (q, _) = mul_div_rem(self.last_cost, mul, den);
        self.next = self.last.saturating_add(q);
        self.rem = 0;
    }

    /// Shifts the clock down by `delta` (virtual-time rebasing), saturating at zero.
    pub fn shift_down(&mut self, delta: u64) {
        self.last = self.last.saturating_sub(delta);
        self.next = self.next.saturating_sub(delta);
    }
}

/// A min-heap of `(tag, volume index)` with at most one entry per volume and a position map, so
/// insert, remove, re-key and pop are O(log n) sifts over one contiguous array (no allocation in
/// steady state, cache friendly). Ties are broken by the lower volume index, so the order is
/// total and deterministic.
#[derive(Clone, Debug, Default)]
pub struct TagIndex {
    heap: Vec<(u64, u32)>,
    /// `pos[v]` = position of volume `v` in `heap`, or `ABSENT`.
    pos: Vec<u32>,
}

const ABSENT: u32 = u32::MAX;

impl TagIndex {
    /// Files `volume` under `tag`, replacing any entry it had.
    pub fn insert(&mut self, tag: u64, volume: u32) {
        let v = volume as usize;
        if self.pos.len() <= v {
            self.pos.resize(v + 1, ABSENT);
        }
        match self.pos[v] {
            ABSENT => {
                let i = self.heap.len();
                self.heap.push((tag, volume));
                self.set_pos(i);
                self.sift_up(i);
            }
            p => {
                let i = p as usize;
                let old = self.heap[i].0;
                self.heap[i].0 = tag;
                if tag < old {
                    self.sift_up(i);
                } else {
                    self.sift_down(i);
                }
            }
        }
    }

    /// Removes `volume`'s entry (the tag is not needed: one entry per volume).
    pub fn remove(&mut self, _tag: u64, volume: u32) {
        let Some(&p) = self.pos.get(volume as usize) else {
            return;
        };
        if p == ABSENT {
            return;
        }
        self.remove_at(p as usize);
    }

    /// The smallest `(tag, volume)`.
    #[must_use]
    pub fn first(&self) -> Option<(u64, u32)> {
        self.heap.first().copied()
    }

    /// Removes and returns the smallest entry if its tag is `<= bound`.
    pub fn pop_due(&mut self, bound: u64) -> Option<(u64, u32)> {
        match self.heap.first() {
            Some(&(t, v)) if t <= bound => {
                self.remove_at(0);
                Some((t, v))
            }
            _ => None,
        }
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether the index is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    fn remove_at(&mut self, i: usize) {
        let (_, v) = self.heap[i];
        self.pos[v as usize] = ABSENT;
        let last = self.heap.len() - 1;
        if i != last {
            self.heap.swap(i, last);
            self.heap.pop();
            self.set_pos(i);
            // The moved entry may need to go either way.
            self.sift_down(i);
            self.sift_up(i);
        } else {
            self.heap.pop();
        }
    }

    fn set_pos(&mut self, i: usize) {
        let v = self.heap[i].1 as usize;
        // Heap positions are < number of volume slots <= u32::MAX.
        self.pos[v] = u32::try_from(i).unwrap_or(ABSENT);
    }

    // Sifts move a "hole": the entry is held aside, parents/children slide into the hole, and
    // the entry is written once at its final place (half the writes of pairwise swaps).
    fn sift_up(&mut self, mut i: usize) {
        let e = self.heap[i];
        while i > 0 {
            let parent = (i - 1) / 2;
            if e < self.heap[parent] {
                self.heap[i] = self.heap[parent];
                self.set_pos(i);
                i = parent;
            } else {
                break;
            }
        }
        self.heap[i] = e;
        self.set_pos(i);
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        let e = self.heap[i];
        loop {
            let l = 2 * i + 1;
            if l >= n {
                break;
            }
            let r = l + 1;
            let c = if r < n && self.heap[r] < self.heap[l] {
                r
            } else {
                l
            };
            if self.heap[c] < e {
                self.heap[i] = self.heap[c];
                self.set_pos(i);
                i = c;
            } else {
                break;
            }
        }
        self.heap[i] = e;
        self.set_pos(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_is_exact_over_many_requests() {
        // 3 IOPS: 1/3 s per I/O, not representable in ns; 3000 I/Os must take exactly 1000 s.
        let mut c = TagClock::starting_at(0);
        for _ in 0..3000 {
            let t = c.tag_for(0);
            c.charge(t, COST_ONE, Rate::Iops(3));
        }
        assert_eq!(c.next, 1000 * NS_PER_S);
    }

    #[test]
    fn idle_stream_reanchors_to_arrival() {
        let mut c = TagClock::starting_at(0);
        c.charge(0, COST_ONE, Rate::Iops(1000));
        assert_eq!(c.next, 1_000_000);
        assert_eq!(c.tag_for(5_000_000), 5_000_000);
        assert_eq!(c.tag_for(10), 1_000_000);
    }

    #[test]
    fn tag_index_orders_rekeys_and_removes() {
        let mut ix = TagIndex::default();
        for (t, v) in [(50, 0), (10, 1), (30, 2), (10, 3), (70, 4)] {
            ix.insert(t, v);
        }
        assert_eq!(ix.first(), Some((10, 1)));
        ix.insert(5, 4); // re-key down
        assert_eq!(ix.first(), Some((5, 4)));
        ix.insert(100, 4); // re-key up
        ix.remove(0, 1);
        assert_eq!(ix.pop_due(9), None);
        let mut order = Vec::new();
        while let Some(e) = ix.pop_due(u64::MAX) {
            order.push(e);
        }
        assert_eq!(order, [(10, 3), (30, 2), (50, 0), (100, 4)]);
        assert!(ix.is_empty());
    }

    #[test]
    fn respace_applies_new_rate_to_next_request() {
        let mut c = TagClock::starting_at(0);
        c.charge(0, COST_ONE, Rate::Iops(100));
        assert_eq!(c.next, 10_000_000);
        c.respace(Rate::Iops(1000));
        assert_eq!(c.next, 1_000_000);
    }
}
