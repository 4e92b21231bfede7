//! `bursty`: quiet (a small duty cycle) for `quiet_ms`, then busy for `busy_ms`, for `cycles` rounds (0 = forever).
//! Reports the CPU it received in each busy phase, to show credits earned while quiet being spent in the burst.
//!
//! Arguments: `quiet_ms` (default 2000), `busy_ms` (default 2000), `quiet_duty_permille` (default 20),
//! `cycles` (default 0), `gap_us` (default 20).
#![no_std]
#![no_main]

use guest::{
    args, meter::CpuMeter, ns_to_ticks, println, rdtsc, report, sleep_until, BootInfo, Counter,
};

#[no_mangle]
pub fn guest_main(boot: &'static BootInfo) -> ! {
    let cmdline = boot.cmdline();
    let quiet = ns_to_ticks(args::u64_or(cmdline, "quiet_ms", 2000) * 1_000_000);
    let busy = ns_to_ticks(args::u64_or(cmdline, "busy_ms", 2000) * 1_000_000);
    let duty = args::u64_or(cmdline, "quiet_duty_permille", 20).min(1000);
    let cycles = args::u64_or(cmdline, "cycles", 0);
    let gap = args::u64_or(cmdline, "gap_us", 20) * 1000;
    let tick = ns_to_ticks(10_000_000); // quiet work happens in 10 ms steps
    println!("bursty: start quiet_ticks={quiet} busy_ticks={busy} duty_permille={duty}");
    let mut total = CpuMeter::new(gap);
    let mut round: u64 = 0;
    while cycles == 0 || round < cycles {
        round += 1;
        // Quiet: work `duty` of each 10 ms step, sleep the rest.
        let quiet_end = rdtsc().wrapping_add(quiet);
        while rdtsc() < quiet_end {
            let step_start = rdtsc();
            let work_end = step_start.wrapping_add(tick * duty / 1000);
            while total.sample() < work_end {}
            sleep_until(step_start.wrapping_add(tick));
            total.skip_gap();
        }
        // Busy: spin for the whole phase and measure what we got.
        let mut phase = CpuMeter::new(gap);
        let busy_end = rdtsc().wrapping_add(busy);
        while phase.sample() < busy_end {
            total.sample();
        }
        report(Counter::Progress, round);
        report(Counter::ReceivedNs, total.received_ns());
        report(Counter::ElapsedNs, total.elapsed_ns());
        let (received, elapsed) = (phase.received_ns(), phase.elapsed_ns());
        let permille = if elapsed == 0 {
            0
        } else {
            u128::from(received) * 1000 / u128::from(elapsed)
        };
        println!(
            "bursty: round={round} busy_elapsed_ms={} busy_received_ms={} busy_share_permille={permille}",
            elapsed / 1_000_000,
            received / 1_000_000
        );
    }
    println!("bursty: done rounds={round}");
    guest::exit(0)
}
