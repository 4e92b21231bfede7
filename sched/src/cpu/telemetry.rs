//! Per-vCPU, per-period telemetry records.
//!
//! Design: the scheduler accumulates counters for the open period of each vCPU and emits one [`PeriodRecord`]
//! when the period closes (at its release time, processed lazily by the next `pick` on that CPU). Records go to a
//! bounded FIFO drained by the caller (the kernel's management endpoint or the simulator); when nobody drains,
//! the oldest records are dropped and counted, so memory stays bounded.
//!
//! Invariants: `baseline_ns + burst_ns` is the CPU time charged in the period (including overrun charged to it);
//! credit fields are exact deltas of the ledger's cumulative counters over the period, so summing records
//! reproduces the ledger.

use super::{CpuId, VcpuId};

/// One closed period of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct PeriodRecord {
    /// The vCPU.
    pub vcpu: VcpuId,
    /// Its physical CPU.
    pub cpu: CpuId,
    /// Period index (1 = first period after creation).
    pub period: u64,
    /// Period start (release time), ns.
    pub start_ns: u64,
    /// Period end (next release), ns.
    pub end_ns: u64,
    /// CPU time charged to the baseline server.
    pub baseline_ns: u64,
    /// CPU time charged to the burst tier (paid with credits).
    pub burst_ns: u64,
    /// Accrual earned at the end of this period (gross).
    pub earned_ns: u64,
    /// Credits spent in this period.
    pub spent_ns: u64,
    /// Accrual discarded at the cap.
    pub discarded_ns: u64,
    /// Credits expired.
    pub expired_ns: u64,
    /// Pool credits applied.
    pub granted_ns: u64,
    /// Balance after the period closed (negative while overdrawn), saturated to i64.
    pub balance_ns: i64,
    /// Time runnable but not running.
    pub waiting_ns: u64,
    /// Part of the waiting time in which the vCPU was ineligible (no credits or cap reached).
    pub throttled_ns: u64,
    /// Number of wake-ups.
    pub wakeups: u32,
    /// Largest wake-to-run latency.
    pub max_wake_latency_ns: u64,
    /// Sum of wake-to-run latencies (divide by `wakeups` for the mean).
    pub total_wake_latency_ns: u64,
}

/// Counters of the open period (internal accumulator).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PeriodAccum {
    pub baseline_ns: u64,
    pub burst_ns: u64,
    pub runnable_ns: u64,
    pub throttled_ns: u64,
    pub credit_throttled_ns: u64,
    pub wakeups: u32,
    pub max_wake_latency_ns: u64,
    pub total_wake_latency_ns: u64,
}

impl PeriodAccum {
    pub(crate) fn note_latency(&mut self, lat: u64) {
        self.max_wake_latency_ns = self.max_wake_latency_ns.max(lat);
        self.total_wake_latency_ns = self.total_wake_latency_ns.saturating_add(lat);
    }
}
