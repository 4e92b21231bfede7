//! Exact integer credit ledger of one vCPU: lots tagged with the period that earned them, spent oldest first.
//!
//! Design: credits are credit-nanoseconds in `u64`. A lot is `(period, amount)`; accrual for period k is added
//! when period k closes, tagged k, so a credit spent in period k' was earned in a period k < k'. Spending takes
//! from the oldest lot first. Accrual beyond the balance cap is discarded and counted; lots older than the
//! configured lifetime expire and are counted separately. Unlimited vCPUs (and overrun beyond a standard vCPU's
//! last credit) may overdraw: the overdraft is a negative balance repaid first by the next accrual or grant.
//!
//! Memory is bounded: at most [`MAX_LOTS`] lots are kept. When a new lot would exceed that, the older half of
//! the lots is merged pairwise, each pair under its *newer* tag (the newest half keeps exact tags). Merging never
//! lets a credit expire early; it may let a coalesced credit live longer by at most the merged span. With no
//! lifetime, merging changes nothing observable (spending order is preserved).
//!
//! Invariants (checked by the conservation tests): `total == sum(lots.amount)`, and for the cumulative counters
//! `launch + earned + granted - spent - discarded - expired == total - overdraft` at every instant. Counters
//! saturate at `u64::MAX` credit-ns (584 years of one CPU), which no real vCPU reaches.

use alloc::collections::VecDeque;

/// Most lots kept per vCPU (older ones are coalesced, see module docs).
pub const MAX_LOTS: usize = 64;

/// Credits earned in one period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct Lot {
    /// Period index that earned the lot (0 = launch balance).
    pub period: u64,
    /// Remaining credit-ns.
    pub amount: u64,
}

/// How a spend was paid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Spend {
    /// Taken from lots.
    pub from_lots: u64,
    /// Added to the overdraft.
    pub overdrawn: u64,
    /// Tag of the newest lot touched (to check "earned in an earlier period").
    pub newest_tag: Option<u64>,
}

/// Cumulative counters of a ledger, credit-ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct LedgerCounters {
    /// Launch balance credited at creation.
    pub launch: u64,
    /// Accrual earned (gross, before the cap discards its excess).
    pub earned: u64,
    /// Accrual discarded because of the balance cap.
    pub discarded: u64,
    /// Credits that reached their lifetime unspent.
    pub expired: u64,
    /// Credits received from the pool.
    pub granted: u64,
    /// Credits spent on burst time (including overdraft).
    pub spent: u64,
}

/// The ledger of one vCPU.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    lots: VecDeque<Lot>,
    total: u64,
    overdraft: u64,
    counters: LedgerCounters,
}

impl Ledger {
    /// A ledger holding `launch` credit-ns tagged with period 0.
    #[must_use]
    pub fn new(launch: u64) -> Self {
        let mut l = Self::default();
        if launch > 0 {
            l.lots.push_back(Lot {
                period: 0,
                amount: launch,
            });
            l.total = launch;
            l.counters.launch = launch;
        }
        l
    }

    /// Balance in credit-ns (negative while overdrawn).
    #[must_use]
    pub fn balance(&self) -> i128 {
        i128::from(self.total) - i128::from(self.overdraft)
    }

    /// Sum of lots.
    #[must_use]
    pub fn lots_total(&self) -> u64 {
        self.total
    }

    /// Current overdraft.
    #[must_use]
    pub fn overdraft(&self) -> u64 {
        self.overdraft
    }

    /// Lots, oldest first.
    pub fn lots(&self) -> impl Iterator<Item = &Lot> {
        self.lots.iter()
    }

    /// Cumulative counters.
    #[must_use]
    pub fn counters(&self) -> LedgerCounters {
        self.counters
    }

    /// Repays the overdraft from `amount`, returns what is left.
    fn repay(&mut self, amount: u64) -> u64 {
        let r = amount.min(self.overdraft);
        self.overdraft -= r;
        amount - r
    }

    fn push_lot(&mut self, period: u64, amount: u64) {
        if amount == 0 {
            return;
        }
        match self.lots.back_mut() {
            Some(last) if last.period == period => last.amount = last.amount.saturating_add(amount),
            _ => {
                if self.lots.len() >= MAX_LOTS {
                    self.coalesce();
                }
                self.lots.push_back(Lot { period, amount });
            }
        }
        self.total = self.total.saturating_add(amount);
    }

    /// Halves the older half of the lots by merging adjacent pairs under the newer tag of each pair. The
    /// newest half keeps exact tags; repeated halvings give older credits exponentially coarser tags (like a
    /// log-structured histogram). Amortised cost: O(MAX_LOTS) per MAX_LOTS/4 pushes.
    fn coalesce(&mut self) {
        let older = self.lots.len() / 2;
        let mut merged: VecDeque<Lot> = VecDeque::with_capacity(MAX_LOTS);
        let mut i = 0;
        while i < older {
            let a = self.lots[i];
            if i + 1 < older {
                let b = self.lots[i + 1];
                merged.push_back(Lot {
                    period: b.period,
                    amount: a.amount.saturating_add(b.amount),
                });
                i += 2;
            } else {
                merged.push_back(a);
                i += 1;
            }
        }
        merged.extend(self.lots.iter().skip(older).copied());
        self.lots = merged;
    }

    /// Credits the accrual of closed period `period`: repays the overdraft first, then adds a lot up to `cap`.
    /// Returns `(credited, discarded)`.
    pub fn accrue(&mut self, period: u64, amount: u64, cap: u64) -> (u64, u64) {
        let after_repay = self.repay(amount);
        let room = cap.saturating_sub(self.total);
        let kept = after_repay.min(room);
        let discarded = after_repay - kept;
        self.push_lot(period, kept);
        let credited = amount - discarded;
        self.counters.earned = self.counters.earned.saturating_add(amount);
        self.counters.discarded = self.counters.discarded.saturating_add(discarded);
        (credited, discarded)
    }

    /// Credits a pool grant (not subject to the cap: it was paid for), tagged `period`.
    pub fn grant(&mut self, period: u64, amount: u64) {
        let rest = self.repay(amount);
        self.push_lot(period, rest);
        self.counters.granted = self.counters.granted.saturating_add(amount);
    }

    /// Expires lots earned in periods `< oldest_valid`. Returns the amount expired.
    pub fn expire_before(&mut self, oldest_valid: u64) -> u64 {
        let mut gone = 0u64;
        while let Some(front) = self.lots.front() {
            if front.period >= oldest_valid {
                break;
            }
            gone = gone.saturating_add(front.amount);
            self.lots.pop_front();
        }
        self.total -= gone.min(self.total);
        self.counters.expired = self.counters.expired.saturating_add(gone);
        gone
    }

    /// Spends `amount`, oldest lots first; whatever the lots cannot cover is overdrawn (the caller decides
    /// whether the vCPU may run into overdraft; charging itself is always exact).
    pub fn spend(&mut self, amount: u64) -> Spend {
        let mut left = amount;
        let mut out = Spend::default();
        while left > 0 {
            let Some(front) = self.lots.front_mut() else {
                break;
            };
            let take = front.amount.min(left);
            front.amount -= take;
            left -= take;
            out.from_lots += take;
            out.newest_tag = Some(
                out.newest_tag
                    .map_or(front.period, |t: u64| t.max(front.period)),
            );
            if front.amount == 0 {
                self.lots.pop_front();
            }
        }
        self.total -= out.from_lots;
        self.overdraft = self.overdraft.saturating_add(left);
        out.overdrawn = left;
        self.counters.spent = self.counters.spent.saturating_add(amount);
        out
    }

    /// `launch + earned + granted - spent - discarded - expired - balance`: zero for a consistent
    /// ledger (exposed for the conservation tests).
    #[must_use]
    pub fn conservation_error(&self) -> i128 {
        let c = self.counters;
        i128::from(c.launch) + i128::from(c.earned) + i128::from(c.granted)
            - i128::from(c.spent)
            - i128::from(c.discarded)
            - i128::from(c.expired)
            - self.balance()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spends_oldest_first_and_overdraws_the_rest() {
        let mut l = Ledger::new(5);
        l.accrue(1, 10, 100);
        l.accrue(2, 10, 100);
        let s = l.spend(12);
        assert_eq!((s.from_lots, s.overdrawn, s.newest_tag), (12, 0, Some(1)));
        assert_eq!(
            l.lots().copied().collect::<alloc::vec::Vec<_>>(),
            [
                Lot {
                    period: 1,
                    amount: 3
                },
                Lot {
                    period: 2,
                    amount: 10
                }
            ]
        );
        let s = l.spend(20);
        assert_eq!((s.from_lots, s.overdrawn), (13, 7));
        assert_eq!(l.balance(), -7);
        // Accrual repays the overdraft before it forms a lot.
        assert_eq!(l.accrue(3, 10, 100), (10, 0));
        assert_eq!((l.balance(), l.lots_total()), (3, 3));
        assert_eq!(l.conservation_error(), 0);
    }

    #[test]
    fn coalescing_bounds_lots_and_never_expires_early() {
        let mut l = Ledger::new(0);
        for p in 1..=1_000u64 {
            l.accrue(p, 1, u64::MAX);
            assert!(l.lots().count() <= MAX_LOTS);
        }
        assert_eq!(l.lots_total(), 1_000);
        // Newest lots keep exact tags.
        let tags: alloc::vec::Vec<u64> = l.lots().map(|x| x.period).collect();
        assert_eq!(tags.last(), Some(&1_000));
        assert!(tags.windows(2).all(|w| w[0] < w[1]));
        // Expiring everything earned before period 900 removes at most those 899 credits (late, never early).
        let gone = l.expire_before(900);
        assert!(gone <= 899);
        assert!(l.lots_total() >= 101);
        assert_eq!(l.conservation_error(), 0);
    }

    #[test]
    fn cap_discards_and_grants_bypass_it() {
        let mut l = Ledger::new(0);
        assert_eq!(l.accrue(1, 10, 4), (4, 6));
        l.grant(1, 10);
        assert_eq!(l.balance(), 14);
        assert_eq!(l.accrue(2, 10, 4), (0, 10));
        let c = l.counters();
        assert_eq!((c.earned, c.discarded, c.granted), (20, 16, 10));
        assert_eq!(l.conservation_error(), 0);
    }
}
