//! Measuring the CPU a guest receives, from inside, by the TSC gap method (docs/guest-abi.md).
//!
//! The guest spins reading the TSC; consecutive readings closer than the threshold mean it ran in between, a larger
//! gap means it was descheduled. Each deschedule costs at most one threshold of error.

use crate::{ns_to_ticks, rdtsc, ticks_to_ns};

/// Accumulates received and elapsed time between `sample` calls.
pub struct CpuMeter {
    threshold_ticks: u64,
    start: u64,
    last: u64,
    received_ticks: u64,
}

impl CpuMeter {
    /// Starts measuring now; gaps longer than `threshold_ns` count as descheduled time.
    pub fn new(threshold_ns: u64) -> Self {
        let now = rdtsc();
        Self {
            threshold_ticks: ns_to_ticks(threshold_ns).max(1),
            start: now,
            last: now,
            received_ticks: 0,
        }
    }

    /// Takes one reading; returns the TSC value read.
    #[inline]
    pub fn sample(&mut self) -> u64 {
        // PAUSE, as any well-behaved spin loop has: on real CPUs it yields to the sibling hyperthread, and under
        // QEMU's single-threaded `-icount` round robin it ends this vCPU's turn, so the other CPU's guests are
        // not stalled (without it a spinning CPU 1 got 0.45 of CPU 0's instructions; see qemu-tests/tests/vms.rs).
        core::hint::spin_loop();
        let now = rdtsc();
        let step = now.wrapping_sub(self.last);
        if step <= self.threshold_ticks {
            self.received_ticks += step;
        }
        self.last = now;
        now
    }

    /// Forgets the time since the last reading (call after a deliberate sleep so it is not counted).
    pub fn skip_gap(&mut self) {
        self.last = rdtsc();
    }

    /// The TSC value read when the meter started.
    pub fn first_sample(&self) -> u64 {
        self.start
    }

    /// CPU time received since the meter started, in ns.
    pub fn received_ns(&self) -> u64 {
        ticks_to_ns(self.received_ticks)
    }

    /// Time since the meter started, in ns.
    pub fn elapsed_ns(&self) -> u64 {
        ticks_to_ns(self.last.wrapping_sub(self.start))
    }
}
