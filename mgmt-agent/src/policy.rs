//! Pure policy of the agent: pricing, grant decisions, pool replenishment, IOPS tiers and commitment billing.
//!
//! Design: every function here is a pure function of its arguments (no clock, no database), so the ledger code
//! in [`crate::db`] only gathers inputs, calls these, and writes the outcome in one transaction.
//!
//! Invariants:
//! - All amounts are integers: credits in credit-ns (`proto::CREDIT_NS` per credit), money in micro-dollars.
//!   Products are taken in `u128` and divided last, so nothing overflows or drifts.
//! - A grant decision never exceeds the request, the pool balance, or the pool's per-grant maximum, and the
//!   stages of a grant sum exactly to the granted amount.

use proto::{Instruction, CREDIT_NS};
use serde::{Deserialize, Serialize};

/// Seconds in a billing month (30 days), for prorating IOPS-months.
pub const SECONDS_PER_MONTH: u64 = 30 * 24 * 3600;

/// Volume discount: from `min_credits` purchased at once, `pct` percent off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discount {
    /// Threshold in whole credits.
    pub min_credits: u64,
    /// Percent off (0..=100).
    pub pct: u8,
}

/// Price list of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Pricing {
    /// Price of one credit in micro-dollars.
    pub price_micros: u64,
    /// Volume discounts (the largest applicable one wins).
    #[serde(default)]
    pub discounts: Vec<Discount>,
}

fn clamp_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

impl Pricing {
    /// Cost of buying `amount_ns` credit-ns at once, discount included, rounded down to a micro-dollar.
    #[must_use]
    pub fn cost_micros(&self, amount_ns: u64) -> u64 {
        let pct = self
            .discounts
            .iter()
            .filter(|d| u128::from(d.min_credits) * u128::from(CREDIT_NS) <= u128::from(amount_ns))
            .map(|d| d.pct.min(100))
            .max()
            .unwrap_or(0);
        let gross = u128::from(amount_ns) * u128::from(self.price_micros);
        clamp_u64(gross * u128::from(100 - pct) / (u128::from(CREDIT_NS) * 100))
    }

    /// List-price value of `amount_ns` (used for per-VM cost records of consumed credits).
    #[must_use]
    pub fn list_value_micros(&self, amount_ns: u64) -> u64 {
        clamp_u64(u128::from(amount_ns) * u128::from(self.price_micros) / u128::from(CREDIT_NS))
    }
}

/// How a pool answers a credit request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Strategy {
    /// Grant what was asked (bounded by the pool).
    Full,
    /// Grant `pct` percent of what was asked (10 -> 5 at 50%).
    Partial {
        /// Percent granted (1..=100).
        pct: u8,
    },
    /// Prioritise by the requester's balance: `asked * asked / (asked + balance)`, so a requester with no
    /// credits left gets all it asked and one still holding as much as it asks gets half.
    ByBalance,
    /// Grant in full but in stages: `now_pct` percent at once, the rest spread over `periods` host periods.
    Staged {
        /// Percent applied at once.
        now_pct: u8,
        /// Periods over which the rest is applied.
        periods: u32,
    },
}

/// Inputs of a grant decision.
#[derive(Debug, Clone, Copy)]
pub struct GrantInput {
    /// Asked, credit-ns.
    pub requested_ns: u64,
    /// Requester's balance.
    pub requester_balance_ns: i64,
    /// Pool balance.
    pub pool_balance_ns: u64,
    /// Per-grant maximum of the pool (0 = none).
    pub max_grant_ns: u64,
}

/// Outcome of a grant decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantDecision {
    /// Nothing granted, with the reason sent to the host.
    Deny(String),
    /// Stages to send; their amounts sum to the grant.
    Grant(Vec<(u64, Instruction)>),
}

impl GrantDecision {
    /// Total granted (0 for a denial).
    #[must_use]
    pub fn total_ns(&self) -> u64 {
        match self {
            Self::Deny(_) => 0,
            Self::Grant(st) => st.iter().map(|(a, _)| *a).sum(),
        }
    }
}

/// Decides a grant. Pure; see [`Strategy`].
#[must_use]
pub fn decide_grant(strategy: Strategy, input: GrantInput) -> GrantDecision {
    let asked = u128::from(input.requested_ns);
    if asked == 0 {
        return GrantDecision::Deny("request for zero credits".into());
    }
    let wanted = match strategy {
        Strategy::Full | Strategy::Staged { .. } => asked,
        Strategy::Partial { pct } => asked * u128::from(pct.min(100)) / 100,
        Strategy::ByBalance => {
            let bal = u128::from(u64::try_from(input.requester_balance_ns).unwrap_or(0));
            asked * asked / (asked + bal)
        }
    };
    let mut amount = clamp_u64(wanted).min(input.pool_balance_ns);
    if input.max_grant_ns > 0 {
        amount = amount.min(input.max_grant_ns);
    }
    if amount == 0 {
        return GrantDecision::Deny(if input.pool_balance_ns == 0 {
            "pool is empty".into()
        } else {
            "grant rounds to zero under the pool strategy".into()
        });
    }
    match strategy {
        Strategy::Staged { now_pct, periods } if periods > 0 && now_pct < 100 => {
            let now = clamp_u64(u128::from(amount) * u128::from(now_pct) / 100);
            let rest = amount - now;
            let per = rest.div_ceil(u64::from(periods)).max(1);
            let mut stages = Vec::new();
            if now > 0 {
                stages.push((now, Instruction::Now));
            }
            if rest > 0 {
                stages.push((rest, Instruction::Rate { per_period_ns: per }));
            }
            GrantDecision::Grant(stages)
        }
        _ => GrantDecision::Grant(vec![(amount, Instruction::Now)]),
    }
}

/// Pool replenishment policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Replenish {
    /// Only explicit purchases.
    Manual,
    /// Buy `amount_ns` every `every_s` seconds.
    Periodic {
        /// Credits per refill.
        amount_ns: u64,
        /// Refill period in seconds.
        every_s: u64,
    },
    /// When the balance falls below `threshold_ns`, buy `amount_ns`, as long as the total spent by top-ups stays
    /// within `spending_limit_micros`.
    Auto {
        /// Trigger.
        threshold_ns: u64,
        /// Credits per top-up.
        amount_ns: u64,
        /// Ceiling on money spent by top-ups.
        spending_limit_micros: u64,
    },
}

/// The automatic top-up to perform now, if any: `(amount_ns, cost_micros)`.
#[must_use]
pub fn auto_topup(
    policy: Replenish,
    balance_ns: u64,
    topup_spent_micros: u64,
    pricing: &Pricing,
) -> Option<(u64, u64)> {
    let Replenish::Auto {
        threshold_ns,
        amount_ns,
        spending_limit_micros,
    } = policy
    else {
        return None;
    };
    if balance_ns >= threshold_ns || amount_ns == 0 {
        return None;
    }
    let cost = pricing.cost_micros(amount_ns);
    (topup_spent_micros.saturating_add(cost) <= spending_limit_micros).then_some((amount_ns, cost))
}

/// Automatic IOPS tiers (seed 001): committed rates with a lower and an upper use threshold, each judged over its
/// own number of windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierPolicy {
    /// Committed rates, ascending (e.g. 200, 350, 500).
    pub tiers: Vec<u32>,
    /// Step down when use stays below this percent of the commitment ...
    pub down_pct: u32,
    /// ... for this many consecutive windows.
    pub down_windows: usize,
    /// Step up when use stays at or above this percent ...
    pub up_pct: u32,
    /// ... for this many consecutive windows.
    pub up_windows: usize,
}

impl Default for TierPolicy {
    fn default() -> Self {
        Self {
            tiers: vec![200, 350, 500],
            down_pct: 75,
            down_windows: 6,
            up_pct: 110,
            up_windows: 3,
        }
    }
}

/// Proposes the next commitment from the window history (oldest first), or `None` to keep the current one.
/// Pure: the same history always gives the same answer. Rising is checked first (under-provisioning hurts the
/// customer), and one step is taken at a time.
#[must_use]
pub fn next_tier(policy: &TierPolicy, current: u32, history: &[u32]) -> Option<u32> {
    let mut tiers = policy.tiers.clone();
    tiers.sort_unstable();
    tiers.dedup();
    let tail = |n: usize| (n > 0 && history.len() >= n).then(|| &history[history.len() - n..]);
    let cur = u64::from(current);
    if let Some(w) = tail(policy.up_windows) {
        if w.iter()
            .all(|&i| u64::from(i) * 100 >= cur * u64::from(policy.up_pct))
        {
            if let Some(&up) = tiers.iter().find(|&&t| t > current) {
                return Some(up);
            }
        }
    }
    if let Some(w) = tail(policy.down_windows) {
        if w.iter()
            .all(|&i| u64::from(i) * 100 < cur * u64::from(policy.down_pct))
        {
            if let Some(&down) = tiers.iter().rev().find(|&&t| t < current) {
                return Some(down);
            }
        }
    }
    None
}

/// Cost of holding `committed_iops` for `seconds`, prorated, at `price_micros` per IOPS-month.
#[must_use]
pub fn commitment_cost_micros(committed_iops: u32, seconds: u64, price_micros: u64) -> u64 {
    clamp_u64(
        u128::from(committed_iops) * u128::from(seconds) * u128::from(price_micros)
            / u128::from(SECONDS_PER_MONTH),
    )
}

/// Overage IOPS-seconds of one window: operations above the commitment.
#[must_use]
pub fn overage_iops_seconds(iops: u32, committed_iops: u32, window_s: u64) -> u64 {
    u64::from(iops.saturating_sub(committed_iops)) * window_s
}

/// Parses a decimal credit amount ("1.5") into credit-ns exactly; rejects negatives, junk and sub-ns precision.
///
/// # Errors
/// A message saying what is wrong with the text.
pub fn parse_credits(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if int.is_empty() && frac.is_empty()
        || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
    {
        return Err(format!(
            "'{text}' is not a non-negative decimal number of credits"
        ));
    }
    let int_v: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| format!("'{text}' is too large"))?
    };
    let mut ns = int_v * u128::from(CREDIT_NS);
    if !frac.is_empty() {
        let digits =
            u32::try_from(frac.len()).map_err(|_| format!("'{text}' has too many decimals"))?;
        let scale = 10u128
            .checked_pow(digits)
            .ok_or_else(|| format!("'{text}' has too many decimals"))?;
        let f: u128 = frac
            .parse()
            .map_err(|_| format!("'{text}' is not a number"))?;
        let num = f * u128::from(CREDIT_NS);
        if !num.is_multiple_of(scale) {
            return Err(format!("'{text}' is finer than one credit-nanosecond"));
        }
        ns += num / scale;
    }
    u64::try_from(ns).map_err(|_| format!("'{text}' credits is too large"))
}

/// Formats credit-ns as credits with 3 decimals (display only).
#[must_use]
pub fn fmt_credits(ns: i128) -> String {
    let sign = if ns < 0 { "-" } else { "" };
    let a = ns.unsigned_abs();
    let whole = a / u128::from(CREDIT_NS);
    let milli = (a % u128::from(CREDIT_NS)) * 1000 / u128::from(CREDIT_NS);
    format!("{sign}{whole}.{milli:03}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert, proptest};

    #[test]
    fn partial_grant_halves_as_in_the_seed() {
        let d = decide_grant(
            Strategy::Partial { pct: 50 },
            GrantInput {
                requested_ns: 10,
                requester_balance_ns: 0,
                pool_balance_ns: 100,
                max_grant_ns: 0,
            },
        );
        assert_eq!(d, GrantDecision::Grant(vec![(5, Instruction::Now)]));
    }

    #[test]
    fn staged_grant_20_gives_10_now_10_later() {
        let d = decide_grant(
            Strategy::Staged {
                now_pct: 50,
                periods: 5,
            },
            GrantInput {
                requested_ns: 20,
                requester_balance_ns: 3,
                pool_balance_ns: 100,
                max_grant_ns: 0,
            },
        );
        assert_eq!(
            d,
            GrantDecision::Grant(vec![
                (10, Instruction::Now),
                (10, Instruction::Rate { per_period_ns: 2 })
            ])
        );
    }

    #[test]
    fn by_balance_prefers_poor_requesters() {
        let g = |bal| {
            decide_grant(
                Strategy::ByBalance,
                GrantInput {
                    requested_ns: 100,
                    requester_balance_ns: bal,
                    pool_balance_ns: 1000,
                    max_grant_ns: 0,
                },
            )
            .total_ns()
        };
        assert_eq!(g(0), 100);
        assert_eq!(g(100), 50);
        assert!(g(300) < g(100));
    }

    #[test]
    fn empty_pool_denies() {
        let d = decide_grant(
            Strategy::Full,
            GrantInput {
                requested_ns: 10,
                requester_balance_ns: 0,
                pool_balance_ns: 0,
                max_grant_ns: 0,
            },
        );
        assert!(matches!(d, GrantDecision::Deny(r) if r.contains("empty")));
    }

    #[test]
    fn volume_discount_applies_from_threshold() {
        let p = Pricing {
            price_micros: 50_000,
            discounts: vec![Discount {
                min_credits: 100,
                pct: 10,
            }],
        };
        assert_eq!(p.cost_micros(99 * CREDIT_NS), 99 * 50_000);
        assert_eq!(p.cost_micros(100 * CREDIT_NS), 100 * 45_000);
    }

    #[test]
    fn auto_topup_respects_threshold_and_limit() {
        let p = Pricing {
            price_micros: 1_000,
            discounts: vec![],
        };
        let pol = Replenish::Auto {
            threshold_ns: 10 * CREDIT_NS,
            amount_ns: 5 * CREDIT_NS,
            spending_limit_micros: 12_000,
        };
        assert_eq!(auto_topup(pol, 11 * CREDIT_NS, 0, &p), None);
        assert_eq!(
            auto_topup(pol, 9 * CREDIT_NS, 0, &p),
            Some((5 * CREDIT_NS, 5_000))
        );
        assert_eq!(auto_topup(pol, 9 * CREDIT_NS, 10_000, &p), None);
    }

    /// The seed's example: tiers 500/350/200, down below 75 %, up at or above 110 %.
    #[test]
    fn tier_trajectory_follows_the_seed() {
        let pol = TierPolicy {
            tiers: vec![500, 350, 200],
            down_pct: 75,
            down_windows: 3,
            up_pct: 110,
            up_windows: 2,
        };
        // 500 committed, used 300 (< 375) for three windows -> 350.
        assert_eq!(next_tier(&pol, 500, &[300, 300, 300]), Some(350));
        // Two windows are not enough.
        assert_eq!(next_tier(&pol, 500, &[300, 300]), None);
        // 350 committed, used 250 (< 262.5) -> 200.
        assert_eq!(next_tier(&pol, 350, &[250, 250, 250]), Some(200));
        // 200 committed, used 220 (= 110 %) twice -> 350.
        assert_eq!(next_tier(&pol, 200, &[220, 220]), Some(350));
        // In band: stay.
        assert_eq!(next_tier(&pol, 350, &[300, 330, 340]), None);
        // Top tier cannot rise, bottom cannot fall.
        assert_eq!(next_tier(&pol, 500, &[900, 900]), None);
        assert_eq!(next_tier(&pol, 200, &[10, 10, 10]), None);
    }

    #[test]
    fn proration_of_an_iops_month() {
        // 100 IOPS for half a month at $0.30 = $15.
        assert_eq!(
            commitment_cost_micros(100, SECONDS_PER_MONTH / 2, 300_000),
            15_000_000
        );
        assert_eq!(overage_iops_seconds(150, 100, 10), 500);
        assert_eq!(overage_iops_seconds(50, 100, 10), 0);
    }

    #[test]
    fn credit_parsing_is_exact_and_strict() {
        assert_eq!(parse_credits("1.5"), Ok(90_000_000_000));
        assert_eq!(
            parse_credits("0.000000000016666"),
            Err("'0.000000000016666' is finer than one credit-nanosecond".into())
        );
        assert!(parse_credits("-1").is_err());
        assert!(parse_credits("abc").is_err());
        assert!(parse_credits("").is_err());
        assert_eq!(fmt_credits(i128::from(CREDIT_NS) * 3 / 2), "1.500");
    }

    proptest! {
        #[test]
        fn grants_are_bounded_and_stages_sum(
            req in 0u64..1 << 50, bal in -(1i64 << 40)..1 << 40, pool in 0u64..1 << 50, max in 0u64..1 << 50,
            kind in 0u8..4, pct in 0u8..=100, periods in 0u32..100,
        ) {
            let strategy = match kind {
                0 => Strategy::Full,
                1 => Strategy::Partial { pct },
                2 => Strategy::ByBalance,
                _ => Strategy::Staged { now_pct: pct, periods },
            };
            let d = decide_grant(strategy, GrantInput { requested_ns: req, requester_balance_ns: bal, pool_balance_ns: pool, max_grant_ns: max });
            let t = d.total_ns();
            prop_assert!(t <= req && t <= pool);
            if max > 0 { prop_assert!(t <= max); }
            if let GrantDecision::Grant(st) = &d {
                prop_assert!(t > 0);
                prop_assert!(st.iter().all(|(a, _)| *a > 0));
            }
        }
    }
}
