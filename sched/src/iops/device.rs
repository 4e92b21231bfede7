//! Device model seen by the partitioner: request cost model, configuration and capacity estimate.
//!
//! Design: a request's cost is its size normalised to `unit_bytes` (rounded up, at least one unit),
//! times a per-operation factor in 1/1024ths ([`COST_ONE`] = one unit I/O). Capacity is in unit
//! I/Os per second: it starts at the configured value and is refined from observed completions in
//! windows where the device was saturated (the partitioner had eligible work at every dispatch
//! opportunity), as an exponentially weighted moving average with weight 1/4 for the new sample.
//! An unsaturated window says nothing about capacity and is ignored.
//!
//! Invariants: all arithmetic is integer and overflow-checked; the estimate is never 0.

use super::tags::{mul_div_rem, COST_ONE};
use super::IopsError;

/// Kind of I/O, for the cost model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub enum IoOp {
    /// Read.
    Read,
    /// Write (also used for flushes and other commands, with `bytes = 0`: one unit).
    Write,
}

/// Request cost model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct CostModel {
    /// Size of one normalised I/O in bytes (e.g. 16 KiB).
    pub unit_bytes: u32,
    /// Cost of one unit read, in 1/1024 I/O (1024 = 1.0).
    pub read_cost: u32,
    /// Cost of one unit write, in 1/1024 I/O.
    pub write_cost: u32,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            unit_bytes: 16 * 1024,
            read_cost: 1024,
            write_cost: 1024,
        }
    }
}

impl CostModel {
    /// Cost in cost units ([`COST_ONE`] per unit I/O) of a request of `bytes` bytes.
    #[must_use]
    pub fn cost(&self, op: IoOp, bytes: u32) -> u64 {
        let unit = self.unit_bytes.max(1);
        let units = if unit.is_power_of_two() {
            // The usual case (4 KiB, 16 KiB units): a shift instead of a division.
            (bytes >> unit.trailing_zeros()) + u32::from(bytes & (unit - 1) != 0)
        } else {
            bytes.div_ceil(unit)
        };
        let units = u64::from(units.max(1));
        let factor = match op {
            IoOp::Read => self.read_cost,
            IoOp::Write => self.write_cost,
        };
        units.saturating_mul(u64::from(factor)).max(1)
    }

    fn validate(&self) -> Result<(), IopsError> {
        if self.unit_bytes == 0 || self.read_cost == 0 || self.write_cost == 0 {
            return Err(IopsError::InvalidDevice(
                "cost model: unit size and costs must be > 0",
            ));
        }
        Ok(())
    }
}

/// Device configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct DeviceConfig {
    /// Initial capacity estimate in unit I/Os per second.
    pub capacity_iops: u64,
    /// Share of capacity that may be committed, in per mille (e.g. 800 = 80%).
    pub committable_permille: u32,
    /// Overcommit factor in per mille (1000 = none; 1200 = commit up to 120% of committable).
    pub overcommit_permille: u32,
    /// Request cost model.
    pub cost: CostModel,
    /// Telemetry and capacity-estimation window (e.g. 1 s).
    pub window_ns: u64,
    /// Maximum queued (not yet dispatched) requests per volume.
    pub max_queue: usize,
    /// Refine the capacity estimate from saturated windows.
    pub refine_capacity: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            capacity_iops: 10_000,
            committable_permille: 800,
            overcommit_permille: 1000,
            cost: CostModel::default(),
            window_ns: 1_000_000_000,
            max_queue: 4096,
            refine_capacity: true,
        }
    }
}

impl DeviceConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), IopsError> {
        self.cost.validate()?;
        if self.capacity_iops == 0 {
            return Err(IopsError::InvalidDevice("capacity must be > 0"));
        }
        if self.committable_permille == 0 || self.committable_permille > 1000 {
            return Err(IopsError::InvalidDevice(
                "committable fraction must be in (0, 1000] per mille",
            ));
        }
        if self.overcommit_permille < 1000 || self.overcommit_permille > 10_000 {
            return Err(IopsError::InvalidDevice(
                "overcommit must be in [1000, 10000] per mille",
            ));
        }
        if self.window_ns == 0 || self.max_queue == 0 {
            return Err(IopsError::InvalidDevice(
                "window and queue bound must be > 0",
            ));
        }
        Ok(())
    }
}

/// Capacity estimate refined from saturated windows.
#[derive(Clone, Copy, Debug)]
pub struct CapacityEstimator {
    estimate: u64,
    samples: u64,
}

impl CapacityEstimator {
    /// Starts at `initial` unit I/Os per second.
    #[must_use]
    pub fn new(initial: u64) -> Self {
        Self {
            estimate: initial.max(1),
            samples: 0,
        }
    }

    /// Current estimate in unit I/Os per second.
    #[must_use]
    pub fn estimate(&self) -> u64 {
        self.estimate
    }

    /// Number of saturated windows that refined the estimate.
    #[must_use]
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Feeds one window: `completed_cost` cost units completed in `window_ns`, `saturated` as defined
    /// in the module documentation.
    pub fn observe_window(&mut self, completed_cost: u64, window_ns: u64, saturated: bool) {
        if !saturated || completed_cost == 0 || window_ns == 0 {
            return;
        }
        let (sample, _) = mul_div_rem(
            completed_cost,
            1_000_000_000,
            window_ns.saturating_mul(COST_ONE),
        );
        let sample = sample.max(1);
        self.estimate = if self.samples == 0 {
            sample
        } else {
            let blended = (u128::from(self.estimate) * 3 + u128::from(sample)) / 4;
            u64::try_from(blended).unwrap_or(u64::MAX).max(1)
        };
        self.samples += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_rounds_up_to_units_and_applies_op_factor() {
        let m = CostModel {
            unit_bytes: 4096,
            read_cost: 1024,
            write_cost: 2048,
        };
        assert_eq!(m.cost(IoOp::Read, 0), 1024);
        assert_eq!(m.cost(IoOp::Read, 4096), 1024);
        assert_eq!(m.cost(IoOp::Read, 4097), 2048);
        assert_eq!(m.cost(IoOp::Write, 16384), 8192);
    }

    #[test]
    fn estimator_ignores_unsaturated_and_blends_saturated() {
        let mut e = CapacityEstimator::new(1000);
        e.observe_window(500 * COST_ONE, 1_000_000_000, false);
        assert_eq!(e.estimate(), 1000);
        e.observe_window(800 * COST_ONE, 1_000_000_000, true);
        assert_eq!(e.estimate(), 800);
        e.observe_window(1200 * COST_ONE, 1_000_000_000, true);
        assert_eq!(e.estimate(), 900);
    }
}
