//! Automatic commitment tiers (seed 001): a pure function proposing the next commitment per window.
//!
//! Design: tiers are a list of committed rates (e.g. 500/350/200 IOPS). Each window the caller feeds
//! the volume's observed IOPS. If use stays below `down_permille` of the current tier (e.g. 75%) for
//! `down_windows` consecutive windows, the policy proposes the next lower tier; if it stays at or
//! above `up_permille` (e.g. 110%) for `up_windows` consecutive windows, the next higher tier. The
//! periods are separate (asymmetric), and a streak is reset by any window that breaks it and by
//! every tier change. The function has no side effects: state in, state and proposal out; the
//! management agent decides whether to apply the proposal (through admission).
//!
//! Invariants: the proposal is always one of the tiers, adjacent to the current one.

use alloc::vec::Vec;

use super::IopsError;

/// Tier policy.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct TierPolicy {
    tiers: Vec<u64>,
    /// Drop one tier when use < this per mille of the current tier...
    pub down_permille: u32,
    /// ...for this many consecutive windows.
    pub down_windows: u32,
    /// Rise one tier when use >= this per mille of the current tier...
    pub up_permille: u32,
    /// ...for this many consecutive windows.
    pub up_windows: u32,
}

/// Per-volume tier state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct TierState {
    /// Current committed rate (one of the tiers).
    pub current: u64,
    /// Consecutive windows below the down threshold.
    pub below: u32,
    /// Consecutive windows at or above the up threshold.
    pub above: u32,
}

impl TierPolicy {
    /// Builds a policy; tiers are sorted and deduplicated; thresholds must straddle 100%.
    pub fn new(
        mut tiers: Vec<u64>,
        down_permille: u32,
        down_windows: u32,
        up_permille: u32,
        up_windows: u32,
    ) -> Result<Self, IopsError> {
        tiers.sort_unstable();
        tiers.dedup();
        if tiers.is_empty() || tiers[0] == 0 {
            return Err(IopsError::InvalidTiers("tiers must be non-empty and > 0"));
        }
        if down_permille == 0 || down_permille >= 1000 || up_permille < 1000 {
            return Err(IopsError::InvalidTiers(
                "need 0 < down < 1000 <= up (per mille)",
            ));
        }
        if down_windows == 0 || up_windows == 0 {
            return Err(IopsError::InvalidTiers("periods must be >= 1 window"));
        }
        Ok(Self {
            tiers,
            down_permille,
            down_windows,
            up_permille,
            up_windows,
        })
    }

    /// Tiers in ascending order.
    #[must_use]
    pub fn tiers(&self) -> &[u64] {
        &self.tiers
    }

    /// Starting state at `tier`, which must be one of the tiers.
    pub fn start(&self, tier: u64) -> Result<TierState, IopsError> {
        if self.tiers.contains(&tier) {
            Ok(TierState {
                current: tier,
                below: 0,
                above: 0,
            })
        } else {
            Err(IopsError::InvalidTiers("starting tier is not in the list"))
        }
    }

    /// Evaluates one window of observed use; returns the new state and the proposed commitment when
    /// it changes.
    #[must_use]
    pub fn evaluate(&self, state: TierState, used_iops: u64) -> (TierState, Option<u64>) {
        let Some(pos) = self.tiers.iter().position(|&t| t == state.current) else {
            // A state from another policy: propose the nearest tier at or above, else the highest.
            let near = self
                .tiers
                .iter()
                .copied()
                .find(|&t| t >= state.current)
                .unwrap_or(self.tiers[self.tiers.len() - 1]);
            return (
                TierState {
                    current: near,
                    below: 0,
                    above: 0,
                },
                Some(near),
            );
        };
        let used = u128::from(used_iops) * 1000;
        let cur = u128::from(state.current);
        let below = used < cur * u128::from(self.down_permille);
        let above = used >= cur * u128::from(self.up_permille);
        let mut next = TierState {
            current: state.current,
            below: if below {
                state.below.saturating_add(1)
            } else {
                0
            },
            above: if above {
                state.above.saturating_add(1)
            } else {
                0
            },
        };
        if next.below >= self.down_windows && pos > 0 {
            next = TierState {
                current: self.tiers[pos - 1],
                below: 0,
                above: 0,
            };
            return (next, Some(next.current));
        }
        if next.above >= self.up_windows && pos + 1 < self.tiers.len() {
            next = TierState {
                current: self.tiers[pos + 1],
                below: 0,
                above: 0,
            };
            return (next, Some(next.current));
        }
        (next, None)
    }
}
