//! 8254 PIT channel 2 as a reference clock for TSC calibration (used when CPUID does not state the TSC rate).
//!
//! Channel 2's gate is software-controlled through port 0x61 and its output readable there, so no interrupt is
//! needed: program mode 0 with a count, and poll OUT2 until the count expires.

use x86_64::instructions::port::Port;

/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// Counts for `ms` milliseconds of PIT time and returns the TSC ticks elapsed, or None if OUT2 never rose
/// (no PIT, e.g. on some modern platforms) within `max_tsc_ticks`.
pub fn measure_tsc_ticks(ms: u64, max_tsc_ticks: u64) -> Option<u64> {
    let count = u16::try_from(PIT_HZ * ms / 1000).ok()?;
    let [lo, hi] = count.to_le_bytes();
    // SAFETY: ports 0x42/0x43/0x61 are the PIT channel 2 and the system control port B; this is the documented
    // one-shot sequence (mode 0, lobyte/hibyte) with the speaker output kept off. No memory is touched.
    unsafe {
        let mut port_b = Port::<u8>::new(0x61);
        let v = port_b.read();
        port_b.write((v & !0x02) | 0x01); // gate on, speaker off
        Port::<u8>::new(0x43).write(0xB0); // channel 2, lobyte/hibyte, mode 0, binary
        let mut ch2 = Port::<u8>::new(0x42);
        ch2.write(lo);
        ch2.write(hi);
        let start = super::tsc::rdtsc();
        loop {
            let now = super::tsc::rdtsc();
            if port_b.read() & 0x20 != 0 {
                return Some(now.wrapping_sub(start));
            }
            if now.wrapping_sub(start) > max_tsc_ticks {
                return None;
            }
        }
    }
}
