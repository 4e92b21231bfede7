//! Placement of new vCPUs on physical CPUs so admission holds, and per-CPU utilisation reports.
//!
//! Design: the default policy is worst fit decreasing ([`worst_fit_decreasing`]), so vCPUs without a pinned CPU
//! spread over the machine instead of filling CPU 0 first. The batch is sorted by admitted utilisation `u'`
//! (largest first, ties by input order); each vCPU goes to the CPU with the least admitted utilisation (ties: the
//! lowest-numbered) among those whose admission check passes against that CPU's load including the batch members
//! already placed there. Spreading can strand a batch that packing would fit (50, 50, 40, 40, 20 % on two CPUs),
//! so when worst fit cannot place the whole batch, first fit decreasing ([`first_fit_decreasing`]: the
//! lowest-numbered CPU that admits) is tried: a batch is refused only when first fit refuses it too, exactly as
//! before this policy existed. Nothing is mutated: the caller adds the vCPUs afterwards (the scheduler re-checks
//! admission on add, so a race cannot over-subscribe a CPU).
//!
//! Invariants: every CPU returned passed the exact admission check ([`CpuLoad::check`]) with the batch members
//! placed before it, so adding the batch in any order keeps every CPU's `sum(u') <= bound`; each CPU's load is
//! only ever compared, never estimated. With one vCPU per call (how the runtime places a VM at a time), worst
//! fit always picks an empty CPU while one exists, and keeps `max - min` of the loads within the largest `u'`
//! placed whenever the least-loaded CPU admits the vCPU (the property tests in `tests/cpu_placement.rs`).

use alloc::vec::Vec;

use super::admission::{server_ppm, AdmissionError, CpuLoad};
use super::config::{SchedParams, VcpuConfig};
use super::CpuId;

/// Admitted utilisation of one physical CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct CpuUtilisation {
    /// The CPU.
    pub cpu: CpuId,
    /// Sum of admitted server utilisations (baseline plus overrun allowance), ppm.
    pub used_ppm: u64,
    /// Admission bound of the CPU, ppm.
    pub bound_ppm: u64,
    /// vCPUs placed there.
    pub vcpus: usize,
}

/// No CPU can take a vCPU of the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacementError {
    /// Index in the batch of the vCPU that did not fit.
    pub index: usize,
    /// The refusal of the least-loaded CPU (the one that came closest), or `None` with no CPUs at all.
    pub closest: Option<AdmissionError>,
}

impl core::fmt::Display for PlacementError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.closest {
            Some(e) => write!(f, "vcpu #{} fits on no cpu; closest: {e}", self.index),
            None => write!(f, "vcpu #{} cannot be placed: no cpus", self.index),
        }
    }
}

/// How a vCPU chooses among the CPUs whose admission check passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fit {
    /// The lowest-numbered CPU.
    First,
    /// The CPU with the least admitted utilisation (ties: the lowest-numbered).
    Worst,
}

/// Worst-fit-decreasing placement of `batch` onto CPUs with loads `loads` (see the module doc), falling back to
/// [`first_fit_decreasing`] when spreading cannot place the whole batch; returns one CPU per batch entry.
///
/// # Errors
/// The first (largest) vCPU that fits nowhere under first fit decreasing.
pub fn worst_fit_decreasing(
    loads: &[CpuLoad],
    batch: &[VcpuConfig],
    params: &SchedParams,
) -> Result<Vec<CpuId>, PlacementError> {
    fit_decreasing(loads, batch, params, Fit::Worst)
        .or_else(|_| fit_decreasing(loads, batch, params, Fit::First))
}

/// First-fit-decreasing placement of `batch` onto CPUs with loads `loads`; returns one CPU per batch entry.
///
/// # Errors
/// The first (largest) vCPU that fits nowhere.
pub fn first_fit_decreasing(
    loads: &[CpuLoad],
    batch: &[VcpuConfig],
    params: &SchedParams,
) -> Result<Vec<CpuId>, PlacementError> {
    fit_decreasing(loads, batch, params, Fit::First)
}

fn fit_decreasing(
    loads: &[CpuLoad],
    batch: &[VcpuConfig],
    params: &SchedParams,
    fit: Fit,
) -> Result<Vec<CpuId>, PlacementError> {
    let mut loads: Vec<CpuLoad> = loads.to_vec();
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| core::cmp::Reverse(server_ppm(&batch[i], params)));
    let mut out = alloc::vec![0; batch.len()];
    for i in order {
        let cfg = &batch[i];
        let mut closest: Option<AdmissionError> = None;
        // (index, admitted utilisation) of the chosen CPU so far.
        let mut chosen: Option<(usize, u64)> = None;
        for (c, load) in loads.iter().enumerate() {
            let cpu = CpuId::try_from(c).unwrap_or(CpuId::MAX);
            match load.check(cpu, cfg, None, params) {
                Ok(()) => {
                    if chosen.is_none_or(|(_, used)| load.used_ppm() < used) {
                        chosen = Some((c, load.used_ppm()));
                    }
                    if fit == Fit::First {
                        break;
                    }
                }
                Err(e) => {
                    if closest.is_none_or(|b| e.current_ppm < b.current_ppm) {
                        closest = Some(e);
                    }
                }
            }
        }
        let Some((c, _)) = chosen else {
            return Err(PlacementError { index: i, closest });
        };
        loads[c].add(cfg, params);
        out[i] = CpuId::try_from(c).unwrap_or(CpuId::MAX);
    }
    Ok(out)
}
