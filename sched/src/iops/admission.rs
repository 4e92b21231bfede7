//! Admission control: commitments may not exceed committable capacity times the overcommit factor.
//!
//! Design: `committable = capacity * committable_permille / 1000 * overcommit_permille / 1000`,
//! computed in u128 and rounded down. A request to add a volume, or to change a volume's commitment,
//! is admitted when `committed_sum - old + new <= committable`. A refusal carries every number so the
//! operator (and the management agent) can see why. Reductions are always admitted, even when a
//! lowered capacity estimate left the device overcommitted.
//!
//! Invariant: the partitioner never holds an admitted set whose sum exceeded the bound at the time
//! of admission (the bound may later fall with the capacity estimate; see [`AdmissionLimits`]).

use super::IopsError;

/// The numbers behind an admission decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct AdmissionLimits {
    /// Capacity estimate (unit I/Os per second).
    pub capacity_iops: u64,
    /// Committable fraction, per mille.
    pub committable_permille: u32,
    /// Overcommit factor, per mille.
    pub overcommit_permille: u32,
    /// Commitments already admitted (excluding the volume being changed).
    pub committed_sum: u64,
    /// Commitment requested.
    pub requested: u64,
}

impl AdmissionLimits {
    /// Largest total commitment the device accepts.
    #[must_use]
    pub fn committable_iops(&self) -> u64 {
        let v = u128::from(self.capacity_iops) * u128::from(self.committable_permille) / 1000
            * u128::from(self.overcommit_permille)
            / 1000;
        u64::try_from(v).unwrap_or(u64::MAX)
    }

    /// Admits or refuses.
    pub fn check(&self) -> Result<(), IopsError> {
        let total = self
            .committed_sum
            .checked_add(self.requested)
            .ok_or(IopsError::Admission(*self))?;
        if total > self.committable_iops() {
            return Err(IopsError::Admission(*self));
        }
        Ok(())
    }
}

impl core::fmt::Display for AdmissionLimits {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "commitment {} IOPS refused: {} already committed, committable {} = capacity {} x {}.{:03} x overcommit {}.{:03}",
            self.requested,
            self.committed_sum,
            self.committable_iops(),
            self.capacity_iops,
            self.committable_permille / 1000,
            self.committable_permille % 1000,
            self.overcommit_permille / 1000,
            self.overcommit_permille % 1000,
        )
    }
}
