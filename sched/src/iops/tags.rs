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
//! [`TagIndex`] is an ordered set of `(tag, volume index)` giving O(log n) insert, remove and min.

use alloc::collections::BTreeSet;

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

/// An ordered set of `(tag, volume index)`; ties are broken by the lower volume index.
#[derive(Clone, Debug, Default)]
pub struct TagIndex {
    set: BTreeSet<(u64, u32)>,
}

impl TagIndex {
    /// Inserts `volume` with `tag`.
    pub fn insert(&mut self, tag: u64, volume: u32) {
        self.set.insert((tag, volume));
    }

    /// Removes `volume` with `tag` (no-op when absent).
    pub fn remove(&mut self, tag: u64, volume: u32) {
        self.set.remove(&(tag, volume));
    }

    /// The smallest `(tag, volume)`.
    #[must_use]
    pub fn first(&self) -> Option<(u64, u32)> {
        self.set.first().copied()
    }

    /// Removes and returns the smallest entry if its tag is `<= bound`.
    pub fn pop_due(&mut self, bound: u64) -> Option<(u64, u32)> {
        match self.set.first() {
            Some(&(t, v)) if t <= bound => {
                self.set.pop_first();
                Some((t, v))
            }
            _ => None,
        }
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether the index is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
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
    fn respace_applies_new_rate_to_next_request() {
        let mut c = TagClock::starting_at(0);
        c.charge(0, COST_ONE, Rate::Iops(100));
        assert_eq!(c.next, 10_000_000);
        c.respace(Rate::Iops(1000));
        assert_eq!(c.next, 1_000_000);
    }
}
