//! Placement of new vCPUs on physical CPUs so admission holds, and per-CPU utilisation reports.
//!
//! Design: first fit decreasing. The batch is sorted by admitted utilisation `u'` (largest first, ties by
//! input order); each vCPU goes to the lowest-numbered CPU whose admission check passes against that CPU's load
//! including the batch members already placed there. Nothing is mutated: the caller adds the vCPUs afterwards
//! (the scheduler re-checks admission on add, so a race cannot over-subscribe a CPU).

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

/// First-fit-decreasing placement of `batch` onto CPUs with loads `loads`; returns one CPU per batch entry.
///
/// # Errors
/// The first (largest) vCPU that fits nowhere.
pub fn first_fit_decreasing(
    loads: &[CpuLoad],
    batch: &[VcpuConfig],
    params: &SchedParams,
) -> Result<Vec<CpuId>, PlacementError> {
    let mut loads: Vec<CpuLoad> = loads.to_vec();
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| core::cmp::Reverse(server_ppm(&batch[i], params)));
    let mut out = alloc::vec![0; batch.len()];
    for i in order {
        let cfg = &batch[i];
        let mut closest: Option<AdmissionError> = None;
        let mut placed = false;
        for (c, load) in loads.iter_mut().enumerate() {
            let cpu = CpuId::try_from(c).unwrap_or(CpuId::MAX);
            match load.check(cpu, cfg, None, params) {
                Ok(()) => {
                    load.add(cfg, params);
                    out[i] = cpu;
                    placed = true;
                    break;
                }
                Err(e) => {
                    if closest.is_none_or(|b| e.current_ppm < b.current_ppm) {
                        closest = Some(e);
                    }
                }
            }
        }
        if !placed {
            return Err(PlacementError { index: i, closest });
        }
    }
    Ok(out)
}
