//! Credit-pool agent logic on the host: when to ask the management agent for credits, how many, and how to
//! apply the grants it sends back, exactly once.
//!
//! Design (seed 000, "credit pool agent"): a vCPU participates if it is `unlimited` or has a [`PoolPolicy`].
//! At each period close the scheduler records its demand above baseline for that period: burst time actually
//! run plus time it was runnable but throttled for lack of credits. With `D` the mean of the last
//! `window_periods` such values (rounded up) and `H = horizon_periods`, the credits needed to run the pending
//! demand at full speed for the horizon are `need = D * H`. The vCPU asks when `D > 0` and
//! `balance + outstanding < need / 2` (hysteresis: about one request per half horizon), for
//! `max(need - balance - outstanding, min_request_ns)` credit-ns, with at
//! most one request outstanding (repeated after `retry_periods` without an answer).
//!
//! Grants carry a schedule: apply now, apply at a rate per period (at each of that vCPU's period closes), or hold
//! until an event (e.g. migration finished) is signalled. Grant ids are remembered in [`GrantMemory`]: the
//! newest id seen and every seen id within [`GRANT_ID_WINDOW`] below it. A repeated id inside the window is a
//! no-op; an id older than the window is refused (never applied), so no id applies twice and memory is bounded.
//! The management agent must therefore issue increasing ids and retry within the window (it retries within
//! seconds; 4096 grants is far more than one host receives in that time).

use alloc::collections::{BTreeSet, VecDeque};

use super::config::PoolPolicy;
use super::VcpuId;

/// Ids within this distance below the newest seen id are remembered; older ids are refused.
pub const GRANT_ID_WINDOW: u64 = 4096;

/// A request for credits, to be sent to the management agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct CreditRequest {
    /// Request id (unique per scheduler, increasing).
    pub request_id: u64,
    /// Requesting vCPU.
    pub vcpu: VcpuId,
    /// Credits asked for, credit-ns.
    pub credits_ns: u64,
    /// Balance when asking (used by the pool to prioritise), credit-ns; negative while overdrawn.
    pub balance_ns: i64,
    /// Mean demand above baseline per period that motivated the request, ns.
    pub demand_per_period_ns: u64,
}

/// When a grant's credits reach the balance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub enum GrantSchedule {
    /// Immediately.
    Now,
    /// `per_period_ns` at each period close of the vCPU until the grant is exhausted.
    PerPeriod {
        /// Credits per period, credit-ns (> 0).
        per_period_ns: u64,
    },
    /// All at once when `event` is signalled with [`crate::cpu::Scheduler::signal_event`].
    AfterEvent {
        /// Event id agreed with the management agent (e.g. a migration id).
        event: u64,
    },
}

/// A credit grant from the management agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct Grant {
    /// Grant id (applied at most once).
    pub grant_id: u64,
    /// Receiving vCPU.
    pub vcpu: VcpuId,
    /// Credits, credit-ns.
    pub credits_ns: u64,
    /// When they apply.
    pub schedule: GrantSchedule,
    /// The request this answers, if any (clears the outstanding request).
    pub request_id: Option<u64>,
}

/// What happened to a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantOutcome {
    /// Credited now.
    Applied,
    /// Held for a rate or an event.
    Staged,
    /// Id already applied or staged: nothing done.
    Duplicate,
}

/// Why a grant was refused (nothing applied, id not remembered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantError {
    /// The vCPU does not exist.
    NoSuchVcpu(VcpuId),
    /// The id is older than the remembered window.
    IdTooOld {
        /// Offending id.
        grant_id: u64,
        /// Oldest id still accepted.
        oldest_accepted: u64,
    },
    /// A per-period schedule with rate zero would never finish.
    ZeroRate,
}

impl core::fmt::Display for GrantError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::NoSuchVcpu(v) => write!(f, "grant for unknown vcpu {}", v.0),
            Self::IdTooOld {
                grant_id,
                oldest_accepted,
            } => {
                write!(
                    f,
                    "grant id {grant_id} older than the accepted window (oldest {oldest_accepted})"
                )
            }
            Self::ZeroRate => write!(f, "per-period grant rate must be positive"),
        }
    }
}

/// Bounded memory of seen grant ids.
#[derive(Clone, Debug, Default)]
pub struct GrantMemory {
    seen: BTreeSet<u64>,
    newest: Option<u64>,
}

impl GrantMemory {
    /// Oldest id still accepted.
    #[must_use]
    pub fn oldest_accepted(&self) -> u64 {
        self.newest
            .map_or(0, |n| n.saturating_sub(GRANT_ID_WINDOW - 1))
    }

    /// `Ok(true)` if `id` is new (and now remembered), `Ok(false)` if already seen.
    ///
    /// # Errors
    /// [`GrantError::IdTooOld`] for ids below the window.
    pub fn check(&self, id: u64) -> Result<bool, GrantError> {
        if self.newest.is_some() && id < self.oldest_accepted() {
            return Err(GrantError::IdTooOld {
                grant_id: id,
                oldest_accepted: self.oldest_accepted(),
            });
        }
        Ok(!self.seen.contains(&id))
    }

    /// Remembers `id` (after [`GrantMemory::check`] returned `Ok(true)`), pruning below the window.
    pub fn remember(&mut self, id: u64) {
        self.seen.insert(id);
        if self.newest.is_none_or(|n| id > n) {
            self.newest = Some(id);
            let oldest = self.oldest_accepted();
            while let Some(&first) = self.seen.first() {
                if first >= oldest {
                    break;
                }
                self.seen.pop_first();
            }
        }
    }

    /// Number of remembered ids (at most [`GRANT_ID_WINDOW`]).
    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no id was seen.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A grant waiting for its rate or event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Staged {
    pub remaining_ns: u64,
    pub schedule: GrantSchedule,
}

/// An unanswered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Outstanding {
    pub request_id: u64,
    pub credits_ns: u64,
    pub asked_period: u64,
}

/// Per-vCPU pool state.
#[derive(Clone, Debug, Default)]
pub(crate) struct PoolState {
    pub history: VecDeque<u64>,
    pub outstanding: Option<Outstanding>,
    pub staged: alloc::vec::Vec<Staged>,
}

impl PoolState {
    /// Records the demand above baseline of a closed period and decides whether to ask, returning
    /// `(credits, mean demand)` when a request is due.
    pub(crate) fn on_period_close(
        &mut self,
        policy: &PoolPolicy,
        demand_ns: u64,
        balance: i128,
        period: u64,
    ) -> Option<(u64, u64)> {
        self.history.push_back(demand_ns);
        let window = usize::try_from(policy.window_periods).unwrap_or(usize::MAX);
        while self.history.len() > window {
            self.history.pop_front();
        }
        if let Some(o) = self.outstanding {
            if period.saturating_sub(o.asked_period) < u64::from(policy.retry_periods) {
                return None;
            }
            self.outstanding = None;
        }
        let n = u128::try_from(self.history.len())
            .unwrap_or(u128::MAX)
            .max(1);
        let sum: u128 = self.history.iter().map(|&d| u128::from(d)).sum();
        let mean = sum.div_ceil(n);
        if mean == 0 {
            return None;
        }
        let need = mean * u128::from(policy.horizon_periods);
        let need = i128::try_from(need).unwrap_or(i128::MAX);
        let have = balance + i128::from(self.outstanding.map_or(0, |o| o.credits_ns));
        // Hysteresis: ask only below half the need (then for all of it), so a vCPU that keeps bursting asks
        // about once per half horizon instead of every period.
        if have >= need / 2 {
            return None;
        }
        let short = u64::try_from(need - have).unwrap_or(u64::MAX);
        Some((
            short.max(policy.min_request_ns),
            u64::try_from(mean).unwrap_or(u64::MAX),
        ))
    }

    /// Credits not yet applied (staged), e.g. to refund when the vCPU is removed.
    pub(crate) fn undelivered(&self) -> u64 {
        self.staged
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.remaining_ns))
    }
}
