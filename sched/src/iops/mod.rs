//! NVMe IOPS partitioner (issue 4): committed IOPS, limits, weights, burst credits and overage
//! policies, in the mClock family, for the kernel's NVMe submission path.
//!
//! The kernel owns the device and the clock; this module only decides. The calling contract:
//! - [`Partitioner::enqueue`] when a guest request arrives (bounded queue per volume, typed error
//!   when full);
//! - [`Partitioner::dispatch`] whenever the device has a free submission slot: it returns the next
//!   request and the class it is served in, or `None` when nothing may go now;
//! - after `None` with requests still queued (all limit-throttled), arm a timer for
//!   [`Partitioner::next_eligible_time`];
//! - [`Partitioner::complete`] for every completion of a dispatched request, exactly once (feeds
//!   telemetry and the capacity estimate, and tells when a volume is idle: nothing queued, nothing
//!   in flight);
//! - [`Partitioner::add_volume`] / [`Partitioner::reconfigure`] / [`Partitioner::remove_volume`] go
//!   through admission control and return typed errors with the numbers;
//! - [`Partitioner::drain_reports`] once per window for telemetry;
//! - [`Partitioner::top_up`] for an I/O credit grant from a management agent's pool: one I/O
//!   credit is one unit I/O ([`COST_ONE`]) above the commitment, held in the volume's burst bucket
//!   beside its earned tokens (uncapped, never expiring; see [`volume`]), applied once per grant id.
//!
//! Modules: [`tags`] (exact tag clocks and O(log n) indices), [`device`] (cost model, capacity
//! estimate), [`volume`] (configuration, overage policy, burst bucket), [`admission`], [`dispatch`]
//! (the partitioner itself), [`tiers`] (automatic commitment tiers, a pure function),
//! [`telemetry`], and [`sim`] (device model, workloads, three dispatchers compared; its command
//! line and report writers need the `std` feature).
//!
//! Everything here is integer arithmetic (no floats), reads no clock and never panics on bad input.

pub mod admission;
pub mod device;
pub mod dispatch;
pub mod tags;
pub mod telemetry;
pub mod tiers;
pub mod volume;

pub mod sim;

pub use admission::AdmissionLimits;
pub use device::{CapacityEstimator, CostModel, DeviceConfig, IoOp};
pub use dispatch::{Dispatch, Partitioner, TopUp, VolumeTotals};
pub use tags::COST_ONE;
pub use telemetry::{LatencyHistogram, WindowReport, WindowStats};
pub use tiers::{TierPolicy, TierState};
pub use volume::{BurstBucket, BurstConfig, OveragePolicy, VolumeConfig};

/// A volume handle: slot index plus a generation, so a handle to a removed volume never aliases
/// a later volume that reuses the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct VolumeId {
    /// Slot index.
    pub index: u32,
    /// Slot generation.
    pub generation: u32,
}

/// One guest request as the partitioner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct Request {
    /// Caller's identifier (opaque here).
    pub id: u64,
    /// Transfer size in bytes.
    pub bytes: u32,
    /// Operation.
    pub op: IoOp,
}

/// Why a request was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub enum ServiceClass {
    /// Within the volume's commitment (reservation tag due).
    Reservation,
    /// Weight-proportional share of spare capacity (best effort).
    Share,
    /// Above the commitment, spending burst credits.
    Burst,
    /// Above the commitment, borrowing commitment other volumes leave unused.
    Borrow,
    /// Above the commitment, at the boosted overage rate.
    Boost,
}

/// Errors of the partitioner API (small `Copy` values, as the kernel needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IopsError {
    /// The commitment does not fit: all the numbers are inside.
    Admission(AdmissionLimits),
    /// A limit below the commitment can never be honoured.
    LimitBelowCommitment {
        /// Requested limit.
        limit: u64,
        /// Requested commitment.
        committed: u64,
    },
    /// Invalid volume configuration.
    InvalidVolume(&'static str),
    /// Invalid device configuration.
    InvalidDevice(&'static str),
    /// Invalid tier policy.
    InvalidTiers(&'static str),
    /// No such volume (removed, or never added).
    UnknownVolume(VolumeId),
    /// The volume's queue is full.
    QueueFull {
        /// Volume.
        volume: VolumeId,
        /// Its queue bound.
        depth: usize,
    },
    /// No more volume slots (u32 index space exhausted).
    TooManyVolumes,
    /// An I/O credit grant was refused (nothing applied, id not remembered).
    InvalidGrant(&'static str),
    /// An I/O credit grant id older than the remembered window (see [`crate::cpu::pool::GRANT_ID_WINDOW`]).
    GrantIdTooOld {
        /// Offending id.
        grant_id: u64,
        /// Oldest id still accepted.
        oldest_accepted: u64,
    },
}

impl core::fmt::Display for IopsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IopsError::Admission(l) => write!(f, "{l}"),
            IopsError::LimitBelowCommitment { limit, committed } => {
                write!(
                    f,
                    "limit {limit} IOPS is below the commitment {committed} IOPS"
                )
            }
            IopsError::InvalidVolume(m) => write!(f, "invalid volume configuration: {m}"),
            IopsError::InvalidDevice(m) => write!(f, "invalid device configuration: {m}"),
            IopsError::InvalidTiers(m) => write!(f, "invalid tier policy: {m}"),
            IopsError::UnknownVolume(v) => write!(f, "unknown volume {}.{}", v.index, v.generation),
            IopsError::QueueFull { volume, depth } => {
                write!(
                    f,
                    "volume {}.{} queue full ({depth} requests)",
                    volume.index, volume.generation
                )
            }
            IopsError::TooManyVolumes => write!(f, "no free volume slot"),
            IopsError::InvalidGrant(m) => write!(f, "invalid I/O credit grant: {m}"),
            IopsError::GrantIdTooOld {
                grant_id,
                oldest_accepted,
            } => write!(
                f,
                "grant id {grant_id} older than the accepted window (oldest {oldest_accepted})"
            ),
        }
    }
}
