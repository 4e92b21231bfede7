//! Time-stamp counter: calibration and time conversion.
//!
//! Calibration: CPUID leaf 0x15 (TSC/crystal ratio and crystal frequency, when both are reported), else leaf 0x16
//! (processor base frequency, which equals the TSC rate on CPUs with an invariant TSC), cross-checked against PIT
//! channel 2 (50 ms, best of three) when a PIT exists: if they disagree by more than 10% the measurement wins.
//! Without CPUID data the PIT alone decides. The rate is set once on the BSP before the APs start and only read
//! afterwards.

use core::sync::atomic::{AtomicU64, Ordering};

use super::{cpu, pit};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);

/// PIT calibration window.
const PIT_WINDOW_MS: u64 = 50;
/// A plausible TSC runs between 1 MHz (slow emulators) and 100 GHz.
const MIN_HZ: u64 = 1_000_000;
const MAX_HZ: u64 = 100_000_000_000;

/// Where the TSC rate came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// CPUID leaf 0x15.
    Cpuid15,
    /// CPUID leaf 0x16.
    Cpuid16,
    /// Measured against PIT channel 2.
    Pit,
}

/// Reads the TSC.
pub fn rdtsc() -> u64 {
    #[allow(unused_unsafe)]
    // SAFETY: RDTSC is unprivileged here (CR4.TSD is clear) and has no side effects.
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
}

/// Records the boot instant (seconds in log lines count from here).
pub fn mark_boot() {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
}

/// Calibrated TSC frequency in Hz (0 before calibration).
pub fn hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

fn from_cpuid() -> Option<(u64, Source)> {
    let max = cpu::max_basic_leaf();
    if max >= 0x15 {
        let r = cpu::cpuid(0x15, 0);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            let hz = u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax);
            if (MIN_HZ..=MAX_HZ).contains(&hz) {
                return Some((hz, Source::Cpuid15));
            }
        }
    }
    if max >= 0x16 {
        let mhz = u64::from(cpu::cpuid(0x16, 0).eax & 0xFFFF);
        let hz = mhz * 1_000_000;
        if (MIN_HZ..=MAX_HZ).contains(&hz) {
            return Some((hz, Source::Cpuid16));
        }
    }
    None
}

fn from_pit() -> Option<u64> {
    // Bound each window by what a 100 GHz TSC would count in it, so a missing PIT cannot hang us.
    let max_ticks = MAX_HZ / 1000 * PIT_WINDOW_MS * 2;
    let best = (0..3)
        .filter_map(|_| pit::measure_tsc_ticks(PIT_WINDOW_MS, max_ticks))
        .min()?;
    let hz = best * 1000 / PIT_WINDOW_MS;
    (MIN_HZ..=MAX_HZ).contains(&hz).then_some(hz)
}

/// Calibration result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calibration {
    /// TSC rate in Hz.
    pub hz: u64,
    /// Where it came from.
    pub source: Source,
    /// A CPUID-stated rate that was rejected because the PIT measured something else (e.g. Bochs, whose TSC
    /// counts instructions whatever CPUID 0x16 says).
    pub rejected_cpuid_hz: Option<u64>,
}

/// Largest disagreement (percent) between CPUID and the PIT before the CPUID rate is distrusted.
const MAX_DISAGREEMENT_PCT: u64 = 10;

/// Calibrates the TSC: the CPUID rate when the PIT (if present) agrees with it within 10%, else the PIT rate.
/// None when no source gives a plausible rate.
pub fn calibrate() -> Option<Calibration> {
    let cpuid = from_cpuid();
    let pit = from_pit();
    let cal = match (cpuid, pit) {
        (Some((c, source)), Some(p)) if c.abs_diff(p) * 100 > p * MAX_DISAGREEMENT_PCT => {
            Calibration {
                hz: p,
                source: Source::Pit,
                rejected_cpuid_hz: Some(c).filter(|_| source != Source::Pit),
            }
        }
        (Some((c, source)), _) => Calibration {
            hz: c,
            source,
            rejected_cpuid_hz: None,
        },
        (None, Some(p)) => Calibration {
            hz: p,
            source: Source::Pit,
            rejected_cpuid_hz: None,
        },
        (None, None) => return None,
    };
    TSC_HZ.store(cal.hz, Ordering::Relaxed);
    Some(cal)
}

/// Microseconds since [`mark_boot`] (0 before calibration).
pub fn uptime_us() -> u64 {
    ticks_to_us(rdtsc().wrapping_sub(BOOT_TSC.load(Ordering::Relaxed)))
}

/// Converts TSC ticks to microseconds (0 before calibration).
pub fn ticks_to_us(ticks: u64) -> u64 {
    let hz = hz();
    if hz == 0 {
        return 0;
    }
    u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(hz)).unwrap_or(u64::MAX)
}

/// Converts microseconds to TSC ticks (saturating).
pub fn us_to_ticks(us: u64) -> u64 {
    u64::try_from(u128::from(us) * u128::from(hz()) / 1_000_000).unwrap_or(u64::MAX)
}

/// Busy-waits `us` microseconds (requires calibration).
pub fn delay_us(us: u64) {
    let end = rdtsc().saturating_add(us_to_ticks(us));
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// Spins until `cond` holds or `timeout_us` passes; returns whether `cond` held.
pub fn wait_until(timeout_us: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = rdtsc().saturating_add(us_to_ticks(timeout_us));
    loop {
        if cond() {
            return true;
        }
        if rdtsc() >= end {
            return cond();
        }
        core::hint::spin_loop();
    }
}
