//! Admission control for the real-time tier: per-CPU utilisation bookkeeping in fixed point (ppm).
//!
//! Design: each vCPU's baseline is a server (Q, T). Admission charges it `u' = ceil((Q + O) * 1e6 / T)` ppm,
//! where O is the stated overrun bound: its job may run up to O past an exhausted budget. A CPU admits a set of
//! servers iff `sum(u') <= bound`, with `bound = 1e6 - reserve_ppm - ceil(O * 1e6 / T_min)` and `T_min` the
//! shortest period on that CPU (the second term pays for one non-preemptible overrun by another server, see the
//! proof in [`crate::cpu`]). Rounding every term up (and the bound down) means the exact rational condition
//! `sum((Q+O)/T) <= 1 - reserve - O/T_min` holds whenever the integer check passes.
//!
//! A reconfigured vCPU is accounted, until the end of the period it started under its old server, as the
//! [`Server::cover`] of old and new (larger utilisation, shorter period), so bandwidth it gives up becomes
//! admissible only once its current job is over (see `Scheduler::reconfigure`).
//!
//! Invariants: `sum_ppm` equals the sum of the admitted servers' `u'`; `periods` is the multiset of their
//! periods. Nothing here mutates on a failed check.

use alloc::collections::BTreeMap;

use super::config::{ceil_ppm, SchedParams, VcpuConfig, PPM};
use super::CpuId;

/// Why a configuration was refused, with the numbers (all in ppm of one physical CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionError {
    /// Physical CPU that would be over-subscribed.
    pub cpu: CpuId,
    /// Utilisation already admitted on that CPU (excluding the vCPU being reconfigured), ppm.
    pub current_ppm: u64,
    /// Utilisation the new or changed server needs (baseline plus overrun allowance), ppm.
    pub requested_ppm: u64,
    /// Largest admissible total on that CPU after the change, ppm.
    pub bound_ppm: u64,
}

impl core::fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "cpu {}: utilisation {} ppm + requested {} ppm exceeds bound {} ppm",
            self.cpu, self.current_ppm, self.requested_ppm, self.bound_ppm
        )
    }
}

/// Server utilisation charged by admission: `ceil((Q + O) * 1e6 / T)` ppm.
#[must_use]
pub fn server_ppm(cfg: &VcpuConfig, params: &SchedParams) -> u64 {
    ceil_ppm(
        cfg.budget_ns.saturating_add(params.overrun_bound_ns),
        cfg.period_ns,
    )
}

/// Admitted real-time load of one physical CPU.
#[derive(Clone, Debug, Default)]
pub struct CpuLoad {
    sum_ppm: u64,
    periods: BTreeMap<u64, u32>,
}

impl CpuLoad {
    /// Sum of admitted server utilisations, ppm.
    #[must_use]
    pub fn used_ppm(&self) -> u64 {
        self.sum_ppm
    }

    /// Shortest admitted period, if any.
    #[must_use]
    pub fn min_period_ns(&self) -> Option<u64> {
        self.periods.keys().next().copied()
    }

    /// Admission bound with an optional extra period taken into account (the one being admitted).
    #[must_use]
    pub fn bound_ppm(&self, params: &SchedParams, extra_period: Option<u64>) -> u64 {
        let tmin = match (self.min_period_ns(), extra_period) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return PPM.saturating_sub(params.reserve_ppm),
        };
        PPM.saturating_sub(params.reserve_ppm)
            .saturating_sub(ceil_ppm(params.overrun_bound_ns, tmin))
    }

    /// Checks whether `cfg` fits, optionally replacing the admitted `old` configuration.
    ///
    /// # Errors
    /// [`AdmissionError`] naming the CPU and the utilisation numbers.
    pub fn check(
        &self,
        cpu: CpuId,
        cfg: &VcpuConfig,
        old: Option<&VcpuConfig>,
        params: &SchedParams,
    ) -> Result<(), AdmissionError> {
        let old = old.map(|o| Server::of(o, params));
        self.check_server(cpu, Server::of(cfg, params), old, params)
    }

    /// Checks whether server `new` fits, optionally replacing the admitted server `old`.
    ///
    /// # Errors
    /// [`AdmissionError`] naming the CPU and the utilisation numbers.
    pub fn check_server(
        &self,
        cpu: CpuId,
        new: Server,
        old: Option<Server>,
        params: &SchedParams,
    ) -> Result<(), AdmissionError> {
        let mut rest = self.clone();
        if let Some(o) = old {
            rest.remove_server(o);
        }
        let bound = rest.bound_ppm(params, Some(new.period_ns));
        match rest.sum_ppm.checked_add(new.ppm) {
            Some(t) if t <= bound => Ok(()),
            _ => Err(AdmissionError {
                cpu,
                current_ppm: rest.sum_ppm,
                requested_ppm: new.ppm,
                bound_ppm: bound,
            }),
        }
    }

    /// Records an admitted server (call only after [`CpuLoad::check`] passed).
    pub fn add(&mut self, cfg: &VcpuConfig, params: &SchedParams) {
        self.add_server(Server::of(cfg, params));
    }

    /// Forgets an admitted server.
    pub fn remove(&mut self, cfg: &VcpuConfig, params: &SchedParams) {
        self.remove_server(Server::of(cfg, params));
    }

    /// Records an admitted server entry.
    pub fn add_server(&mut self, s: Server) {
        self.sum_ppm = self.sum_ppm.saturating_add(s.ppm);
        *self.periods.entry(s.period_ns).or_insert(0) += 1;
    }

    /// Forgets an admitted server entry.
    pub fn remove_server(&mut self, s: Server) {
        self.sum_ppm = self.sum_ppm.saturating_sub(s.ppm);
        if let Some(n) = self.periods.get_mut(&s.period_ns) {
            *n -= 1;
            if *n == 0 {
                self.periods.remove(&s.period_ns);
            }
        }
    }
}

/// What admission accounts for one server: its utilisation `u'` (ppm) and its period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Server {
    /// `ceil((Q + O) * 1e6 / T)`.
    pub ppm: u64,
    /// `T`.
    pub period_ns: u64,
}

impl Server {
    /// The server of a configuration.
    #[must_use]
    pub fn of(cfg: &VcpuConfig, params: &SchedParams) -> Self {
        Self {
            ppm: server_ppm(cfg, params),
            period_ns: cfg.period_ns,
        }
    }

    /// The entry that covers both `self` and `other`: the larger utilisation and the shorter period (used while
    /// a reconfigured vCPU finishes the period it started under its old server).
    #[must_use]
    pub fn cover(self, other: Self) -> Self {
        Self {
            ppm: self.ppm.max(other.ppm),
            period_ns: self.period_ns.min(other.period_ns),
        }
    }
}
