//! Per-volume, per-window telemetry.
//!
//! Design: each volume accumulates a [`WindowStats`] for the current window; when a public call
//! observes that `now` has crossed the window end, every volume's stats are closed into a
//! [`WindowReport`] (stamped with the window index) and pushed to a bounded queue the kernel drains
//! ([`super::Partitioner::drain_reports`]). Windows that elapse with no call in between are closed
//! one at a time, so a report exists for every window. When the queue is full the oldest report is
//! dropped and counted, so a stalled consumer costs bounded memory.
//!
//! Queue-wait latency (enqueue to dispatch) and device service time (reported at completion) go
//! into histograms with fixed bucket bounds ([`LATENCY_BOUNDS_NS`]); the last bucket is open-ended.
//!
//! Invariants: `completed <= dispatched + in flight at window start`; per-class counters sum to
//! `dispatched`.

use super::{ServiceClass, VolumeId};

/// Upper bounds (inclusive) of the latency buckets, in ns; a final bucket holds everything above.
pub const LATENCY_BOUNDS_NS: [u64; 12] = [
    10_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];
/// Number of latency buckets.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// Fixed-bucket latency histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct LatencyHistogram {
    /// Counts per bucket (see [`LATENCY_BOUNDS_NS`]).
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i] += 1;
    }

    /// Total samples.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Upper bound of the bucket holding the `permille`-th sample (`u64::MAX` for the open bucket),
    /// or `None` when empty.
    #[must_use]
    pub fn quantile_bound(&self, permille: u32) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = (u128::from(n) * u128::from(permille.min(1000)))
            .div_ceil(1000)
            .max(1);
        let mut seen = 0u128;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += u128::from(c);
            if seen >= rank {
                return Some(LATENCY_BOUNDS_NS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// Counters of one volume over one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct WindowStats {
    /// Requests enqueued.
    pub arrived: u64,
    /// Requests dispatched.
    pub dispatched: u64,
    /// Requests completed.
    pub completed: u64,
    /// Cost units completed.
    pub completed_cost: u64,
    /// Dispatched from the reservation phase.
    pub from_reservation: u64,
    /// Dispatched from the weight-proportional phase (best effort).
    pub from_share: u64,
    /// Dispatched spending burst credits.
    pub from_burst: u64,
    /// Dispatched borrowing unused commitment.
    pub from_borrow: u64,
    /// Dispatched at the boosted overage rate.
    pub from_boost: u64,
    /// Times the volume's head request was held back by its limit.
    pub throttled: u64,
    /// Queue-wait latency (enqueue to dispatch).
    pub wait: LatencyHistogram,
    /// Device service time reported at completion.
    pub service: LatencyHistogram,
}

impl WindowStats {
    /// Counts one dispatch of `class` after `wait_ns` in the queue.
    pub fn record_dispatch(&mut self, class: ServiceClass, wait_ns: u64) {
        self.dispatched += 1;
        match class {
            ServiceClass::Reservation => self.from_reservation += 1,
            ServiceClass::Share => self.from_share += 1,
            ServiceClass::Burst => self.from_burst += 1,
            ServiceClass::Borrow => self.from_borrow += 1,
            ServiceClass::Boost => self.from_boost += 1,
        }
        self.wait.record(wait_ns);
    }
}

/// One closed window of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct WindowReport {
    /// Window index (window `i` covers `[i * window_ns, (i + 1) * window_ns)`).
    pub window: u64,
    /// Volume.
    pub volume: VolumeId,
    /// Commitment in force at the window's end (unit I/Os per second).
    pub committed_iops: u64,
    /// Completed unit I/Os per second over the window (rounded down).
    pub completed_iops: u64,
    /// Counters.
    pub stats: WindowStats,
}
