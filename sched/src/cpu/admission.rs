//! Admission control for the real-time tier: per-CPU utilisation bookkeeping in fixed point (ppm).
//!
//! Design: each vCPU's baseline is a server (Q, T). Admission charges it `u' = ceil((Q + O) * 1e6 / T)` ppm,
//! where O is the stated overrun bound: its job may run up to O past an exhausted budget. A CPU admits a set of
//! servers iff `sum(u') <= bound`, with `bound = 1e6 - reserve_ppm - ceil(O * 1e6 / T_min)` and `T_min` the
//! shortest period on that CPU (the second term pays for one non-preemptible overrun by another server, see the
//! proof in [`crate::cpu`]). Rounding every term up (and the bound down) means the exact rational condition
//! `sum((Q+O)/T) <= 1 - reserve - O/T_min` holds whenever the integer check passes.
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
        let mut rest = self.clone();
        if let Some(o) = old {
            rest.remove(o, params);
        }
        let requested = server_ppm(cfg, params);
        let bound = rest.bound_ppm(params, Some(cfg.period_ns));
        let total = rest.sum_ppm.checked_add(requested);
        match total {
            Some(t) if t <= bound => Ok(()),
            _ => Err(AdmissionError {
                cpu,
                current_ppm: rest.sum_ppm,
                requested_ppm: requested,
                bound_ppm: bound,
            }),
        }
    }

    /// Records an admitted server (call only after [`CpuLoad::check`] passed).
    pub fn add(&mut self, cfg: &VcpuConfig, params: &SchedParams) {
        self.sum_ppm = self.sum_ppm.saturating_add(server_ppm(cfg, params));
        *self.periods.entry(cfg.period_ns).or_insert(0) += 1;
    }

    /// Forgets an admitted server.
    pub fn remove(&mut self, cfg: &VcpuConfig, params: &SchedParams) {
        self.sum_ppm = self.sum_ppm.saturating_sub(server_ppm(cfg, params));
        if let Some(n) = self.periods.get_mut(&cfg.period_ns) {
            *n -= 1;
            if *n == 0 {
                self.periods.remove(&cfg.period_ns);
            }
        }
    }
}
