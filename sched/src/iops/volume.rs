//! Volume configuration, overage policy and the burst bucket.
//!
//! Design: a volume has a committed rate (its reservation), an optional limit (a hard cap on all its
//! service), a weight (its share of spare capacity), an optional burst bucket and an overage policy
//! that decides how demand above the commitment is treated:
//! - `BestEffort`: spare capacity shared by weight only;
//! - `Boosted`: served ahead of best-effort traffic at a boost rate of `boost_permille` of the
//!   commitment, scaled down linearly by the volume's *lead* over its commitment (how far ahead of
//!   its committed rate it has been served, in time: it grows with both how far over and how long
//!   over), reaching zero at `horizon_ns`;
//! - `Borrow`: treated as committed (ahead of best effort) up to the commitment other volumes are
//!   leaving unused (the commitments of volumes with nothing queued).
//!
//! The burst bucket fills at `fill_iops` for exactly the time the volume runs under its commitment
//! (nothing of it is queued and its reservation clock is not ahead of `now`: part of the committed
//! rate goes unused; the partitioner decides which, [`BurstBucket::fill`] or
//! [`BurstBucket::hold`]), capped at `size_ios`, and is spent one request cost at a time to go above
//! the commitment ahead of best-effort traffic. The fill is integrated lazily at the volume's own
//! events (enqueue, dispatch, reconfigure) with exact integer remainders.
//!
//! Granted I/O credits (a management agent's pool grant, [`super::Partitioner::top_up`]) are held
//! beside the earned tokens, not in them: a grant may take the bucket beyond its configured size
//! (purchased credits are never discarded), they never expire, a reconfiguration (even one that
//! removes the burst configuration) keeps them, and the fill does not count them (a full grant
//! balance does not stop the volume earning). A request going above the commitment spends earned
//! tokens first and grant tokens only for what the earned ones do not cover, so purchased credits
//! last as long as possible; they are lost only when the volume itself is removed.
//!
//! Invariants: `tokens <= capacity`; `tokens == initial + credited - spent` (see
//! [`BurstBucket::credited`], [`BurstBucket::spent`]); `granted == granted_total - granted_spent`
//! (see [`BurstBucket::granted`]).

use super::tags::{mul_div_rem, COST_ONE};
use super::IopsError;

/// What happens to demand above the commitment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub enum OveragePolicy {
    /// Shares spare capacity by weight.
    BestEffort,
    /// Ahead of best-effort traffic, scaled down by how far and how long the volume is over.
    Boosted {
        /// Boost rate at zero lead, in per mille of the commitment.
        boost_permille: u32,
        /// Lead over the commitment (ns) at which the boost reaches zero.
        horizon_ns: u64,
    },
    /// Treated as committed while other volumes leave their commitment unused.
    Borrow,
}

/// Burst bucket parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct BurstConfig {
    /// Fill rate in unit I/Os per second while under the commitment.
    pub fill_iops: u64,
    /// Bucket size in unit I/Os.
    pub size_ios: u64,
}

/// Volume configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct VolumeConfig {
    /// Committed rate in unit I/Os per second (0 = uncommitted).
    pub committed_iops: u64,
    /// Optional cap in unit I/Os per second (must be >= the commitment).
    pub limit_iops: Option<u64>,
    /// Share of spare capacity (1..=65535).
    pub weight: u32,
    /// Optional burst bucket.
    pub burst: Option<BurstConfig>,
    /// Policy for demand above the commitment.
    pub policy: OveragePolicy,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            committed_iops: 0,
            limit_iops: None,
            weight: 100,
            burst: None,
            policy: OveragePolicy::BestEffort,
        }
    }
}

/// Largest rate accepted anywhere (unit I/Os per second): keeps every product in range.
pub const MAX_RATE_IOPS: u64 = 1 << 40;

impl VolumeConfig {
    /// Checks the configuration on its own (admission checks it against the device).
    pub fn validate(&self) -> Result<(), IopsError> {
        if self.weight == 0 || self.weight > 65_535 {
            return Err(IopsError::InvalidVolume("weight must be in 1..=65535"));
        }
        if self.committed_iops > MAX_RATE_IOPS {
            return Err(IopsError::InvalidVolume("commitment too large"));
        }
        if let Some(limit) = self.limit_iops {
            if limit == 0 || limit > MAX_RATE_IOPS {
                return Err(IopsError::InvalidVolume("limit must be in 1..=2^40"));
            }
            if limit < self.committed_iops {
                return Err(IopsError::LimitBelowCommitment {
                    limit,
                    committed: self.committed_iops,
                });
            }
        }
        if let Some(b) = self.burst {
            if b.fill_iops == 0
                || b.size_ios == 0
                || b.fill_iops > MAX_RATE_IOPS
                || b.size_ios > MAX_RATE_IOPS
            {
                return Err(IopsError::InvalidVolume(
                    "burst fill and size must be in 1..=2^40",
                ));
            }
        }
        match self.policy {
            OveragePolicy::Boosted {
                boost_permille,
                horizon_ns,
            } => {
                if boost_permille == 0 || horizon_ns == 0 {
                    return Err(IopsError::InvalidVolume(
                        "boost rate and horizon must be > 0",
                    ));
                }
                if self.committed_iops == 0 {
                    return Err(IopsError::InvalidVolume(
                        "boosted overage needs a commitment",
                    ));
                }
            }
            OveragePolicy::Borrow | OveragePolicy::BestEffort => {}
        }
        Ok(())
    }

    /// Boost rate (unit I/Os per second) for a lead of `lead_ns` over the commitment; 0 when not boosted.
    #[must_use]
    pub fn boost_iops(&self, lead_ns: u64) -> u64 {
        match self.policy {
            OveragePolicy::Boosted {
                boost_permille,
                horizon_ns,
            } if lead_ns < horizon_ns => {
                let base = u128::from(self.committed_iops) * u128::from(boost_permille) / 1000;
                let scaled = base * u128::from(horizon_ns - lead_ns) / u128::from(horizon_ns);
                u64::try_from(scaled).unwrap_or(u64::MAX)
            }
            _ => 0,
        }
    }
}

/// Burst bucket state in cost units (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BurstBucket {
    tokens: u64,
    capacity: u64,
    fill_iops: u64,
    /// Fill remainder in units of 1/1e9 cost unit.
    rem: u64,
    /// Time up to which the fill has been integrated.
    mark: u64,
    credited: u64,
    spent: u64,
    /// Grant tokens held (uncapped), credited in total, and spent.
    granted: u64,
    granted_total: u64,
    granted_spent: u64,
}

impl BurstBucket {
    /// An empty bucket for `config`, integrated from `now`.
    #[must_use]
    pub fn new(config: BurstConfig, now: u64) -> Self {
        Self {
            tokens: 0,
            capacity: config.size_ios.saturating_mul(COST_ONE),
            fill_iops: config.fill_iops,
            rem: 0,
            mark: now,
            credited: 0,
            spent: 0,
            granted: 0,
            granted_total: 0,
            granted_spent: 0,
        }
    }

    /// A bucket that only holds grant tokens (a volume without a burst configuration that was
    /// granted I/O credits): size 0, no fill.
    #[must_use]
    pub fn grants_only(now: u64) -> Self {
        Self {
            mark: now,
            ..Self::default()
        }
    }

    /// Drops the burst configuration but keeps the grant tokens: earned tokens are forfeited
    /// (counted as spent), size and fill become 0.
    pub fn keep_grants_only(&mut self) {
        self.spent += self.tokens;
        self.tokens = 0;
        self.capacity = 0;
        self.fill_iops = 0;
        self.rem = 0;
    }

    /// Adds `cost` grant tokens (uncapped, never expiring); saturates rather than wrapping.
    pub fn grant(&mut self, cost: u64) {
        let add = cost.min(u64::MAX - self.granted_total);
        self.granted += add;
        self.granted_total += add;
    }

    /// Applies a new configuration, keeping the tokens (clamped to the new size).
    pub fn reconfigure(&mut self, config: BurstConfig) {
        self.capacity = config.size_ios.saturating_mul(COST_ONE);
        self.fill_iops = config.fill_iops;
        if self.tokens > self.capacity {
            // Tokens above a reduced size are forfeited (counted as spent so conservation holds).
            self.spent += self.tokens - self.capacity;
            self.tokens = self.capacity;
        }
    }

    /// Integrates the fill up to `now`; the volume was under its commitment from `under_since`
    /// (the commitment meter's next tag) onwards.
    pub fn fill(&mut self, under_since: u64, now: u64) {
        let start = self.mark.max(under_since);
        if now > start && self.tokens < self.capacity {
            let dt = now - start;
            // fill_iops * COST_ONE cost units per second.
            let per_s = self.fill_iops.saturating_mul(COST_ONE);
            let (q, r) = mul_div_rem(per_s, dt, 1_000_000_000);
            let r_total = r + self.rem;
            let q = q.saturating_add(r_total / 1_000_000_000);
            self.rem = r_total % 1_000_000_000;
            let add = q.min(self.capacity - self.tokens);
            if add < q {
                self.rem = 0;
            }
            self.tokens += add;
            self.credited += add;
        }
        self.mark = self.mark.max(now);
    }

    /// Moves the integration mark to `now` without earning: the volume had requests waiting, so it
    /// was not under its commitment, whatever its reservation clock says.
    pub fn hold(&mut self, now: u64) {
        self.mark = self.mark.max(now);
    }

    /// Whether `cost` can be spent (earned and grant tokens together).
    #[must_use]
    pub fn can_spend(&self, cost: u64) -> bool {
        self.tokens.saturating_add(self.granted) >= cost
    }

    /// Spends `cost` tokens, earned ones first, then grant tokens for the rest; returns false
    /// (and spends nothing) when there are not enough.
    pub fn spend(&mut self, cost: u64) -> bool {
        if !self.can_spend(cost) {
            return false;
        }
        let earned = cost.min(self.tokens);
        self.tokens -= earned;
        self.spent += earned;
        let from_grants = cost - earned;
        self.granted -= from_grants;
        self.granted_spent += from_grants;
        true
    }

    /// Earned tokens held, in cost units (grant tokens apart: [`BurstBucket::granted`]).
    #[must_use]
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Grant tokens held, in cost units (may exceed the bucket size).
    #[must_use]
    pub fn granted(&self) -> u64 {
        self.granted
    }

    /// Total grant tokens credited, in cost units.
    #[must_use]
    pub fn granted_total(&self) -> u64 {
        self.granted_total
    }

    /// Total grant tokens spent, in cost units.
    #[must_use]
    pub fn granted_spent(&self) -> u64 {
        self.granted_spent
    }

    /// Bucket size in cost units.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Total tokens credited by the fill.
    #[must_use]
    pub fn credited(&self) -> u64 {
        self.credited
    }

    /// Total earned tokens spent (or forfeited by a size reduction).
    #[must_use]
    pub fn spent(&self) -> u64 {
        self.spent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_fills_only_while_under_and_caps() {
        let mut b = BurstBucket::new(
            BurstConfig {
                fill_iops: 100,
                size_ios: 10,
            },
            0,
        );
        // Under commitment from t=0: 50 ms at 100 IOPS = 5 I/Os.
        b.fill(0, 50_000_000);
        assert_eq!(b.tokens(), 5 * COST_ONE);
        // Over commitment until t=200ms: nothing credited for 50..200 ms.
        b.fill(200_000_000, 200_000_000);
        assert_eq!(b.tokens(), 5 * COST_ONE);
        b.fill(200_000_000, 1_000_000_000);
        assert_eq!(b.tokens(), 10 * COST_ONE);
        assert!(b.spend(3 * COST_ONE));
        assert_eq!(b.credited() - b.spent(), b.tokens());
    }

    #[test]
    fn grants_exceed_the_size_survive_reconfiguration_and_are_spent_last() {
        let cfg = BurstConfig {
            fill_iops: 100,
            size_ios: 10,
        };
        let mut b = BurstBucket::new(cfg, 0);
        b.fill(0, 1_000_000_000);
        assert_eq!(b.tokens(), 10 * COST_ONE);
        b.grant(25 * COST_ONE);
        assert_eq!(b.granted(), 25 * COST_ONE);
        // The fill is not stopped by grant tokens, nor does it add to them.
        assert!(b.spend(4 * COST_ONE));
        assert_eq!((b.tokens(), b.granted()), (6 * COST_ONE, 25 * COST_ONE));
        // A request larger than the earned tokens takes the rest from the grant.
        assert!(b.spend(8 * COST_ONE));
        assert_eq!((b.tokens(), b.granted()), (0, 23 * COST_ONE));
        // A smaller size forfeits earned tokens only.
        b.fill(0, 2_000_000_000);
        b.reconfigure(BurstConfig {
            fill_iops: 100,
            size_ios: 3,
        });
        assert_eq!((b.tokens(), b.granted()), (3 * COST_ONE, 23 * COST_ONE));
        b.keep_grants_only();
        assert_eq!((b.tokens(), b.capacity()), (0, 0));
        assert!(!b.spend(24 * COST_ONE));
        assert!(b.spend(23 * COST_ONE));
        assert_eq!(b.granted_total(), b.granted_spent() + b.granted());
        assert_eq!(b.credited() - b.spent(), b.tokens());
    }

    #[test]
    fn boost_scales_down_with_lead() {
        let c = VolumeConfig {
            committed_iops: 1000,
            policy: OveragePolicy::Boosted {
                boost_permille: 500,
                horizon_ns: 1_000_000,
            },
            ..VolumeConfig::default()
        };
        assert_eq!(c.boost_iops(0), 500);
        assert_eq!(c.boost_iops(500_000), 250);
        assert_eq!(c.boost_iops(1_000_000), 0);
    }
}
