//! `periodic`: a hard-real-time job. Every `period_us` (default 1000) it is released and must receive `budget_us`
//! (default 200) of CPU before the next release; it measures what it received with the TSC gap method and counts a
//! miss for any period in which it got less. After `periods` periods (default 0 = forever) it prints a summary and
//! exits with code 0 (no miss) or 1.
//!
//! A release found already past its deadline (the vCPU woke too late) is a miss too, and so is every period skipped.
//!
//! While it runs it prints nothing (console output costs a VM exit per byte, which would eat its own budget):
//! progress goes out through `REPORT` hypercalls every 1000 periods, and the first misses are kept and printed
//! with the summary. Each printed miss names its period, what it received, how late its first sample came and
//! when it was released (`release_us`, guest time since the guest started), so a test can line it up with the
//! hypervisor's log: the guest then announces `exit_at_us`, sleeps until that time and exits, which the kernel logs
//! with its own timestamp (`vm <name>: released ...`).
#![no_std]
#![no_main]

use guest::{
    args, meter::CpuMeter, ns_to_ticks, println, rdtsc, report, sleep_until, ticks_to_ns, BootInfo,
    Counter,
};

#[no_mangle]
pub fn guest_main(boot: &'static BootInfo) -> ! {
    let cmdline = boot.cmdline();
    let period_ns = args::u64_or(cmdline, "period_us", 1000) * 1000;
    let budget_ns = args::u64_or(cmdline, "budget_us", 200) * 1000;
    let periods = args::u64_or(cmdline, "periods", 0);
    let gap_ns = args::u64_or(cmdline, "gap_us", 20) * 1000;
    let period = ns_to_ticks(period_ns);
    println!("periodic: start period_ns={period_ns} budget_ns={budget_ns} periods={periods}");

    let mut done: u64 = 0;
    let mut misses: u64 = 0;
    let mut min_received = u64::MAX;
    let start = rdtsc();
    // (period number, received ns, lateness of the first sample in ns, release in ns since `start`) of the first
    // misses.
    let mut first_misses = [(0u64, 0u64, 0u64, 0u64); 4];
    // Releases at multiples of the period in guest TSC: the hypervisor starts the guest TSC at the beginning of
    // the vCPU's first baseline period (docs/guest-abi.md), so each job lines up with one guaranteed period.
    let mut release = (rdtsc() / period.max(1) + 1) * period;
    while periods == 0 || done < periods {
        sleep_until(release);
        let deadline = release.wrapping_add(period);
        let mut meter = CpuMeter::new(gap_ns);
        while meter.received_ns() < budget_ns && meter.sample() < deadline {}
        let received = meter.received_ns().min(budget_ns);
        min_received = min_received.min(received);
        if received < budget_ns {
            if let Some(slot) = first_misses.get_mut(usize::try_from(misses).unwrap_or(usize::MAX))
            {
                *slot = (
                    done + 1,
                    received,
                    ticks_to_ns(meter.first_sample().wrapping_sub(release)),
                    ticks_to_ns(release.wrapping_sub(start)),
                );
            }
            misses += 1;
        }
        done += 1;
        release = deadline;
        // Woke or finished after later releases passed: those periods got nothing.
        let now = rdtsc();
        while now >= release.wrapping_add(period) {
            release = release.wrapping_add(period);
            misses += 1;
            done += 1;
            min_received = 0;
        }
        if done.is_multiple_of(1000) {
            report_figures(done, misses, min_received);
        }
    }
    report_figures(done, misses, min_received);
    for &(period, received, late, released) in first_misses
        .iter()
        .take(usize::try_from(misses).unwrap_or(usize::MAX))
    {
        println!(
            "periodic: miss period={period} received_ns={received} first_sample_late_ns={late} release_us={}",
            released / 1000
        );
    }
    println!(
        "periodic: done periods={done} misses={misses} min_received_ns={min_received} budget_ns={budget_ns} \
         elapsed_ms={}",
        ticks_to_ns(rdtsc()) / 1_000_000
    );
    // The anchor that places `release_us` on the hypervisor's clock: announce a guest time, sleep until it and
    // exit at once, so the kernel's `vm <name>: released ...` line (logged as the exit is handled) carries its host
    // time. The margin covers printing this line (a VM exit per byte: up to ~2 ms on Bochs).
    let exit_at = rdtsc().wrapping_add(ns_to_ticks(EXIT_MARGIN_NS));
    println!(
        "periodic: exit_at_us={}",
        ticks_to_ns(exit_at.wrapping_sub(start)) / 1000
    );
    sleep_until(exit_at);
    guest::exit(u64::from(misses != 0))
}

/// Time between announcing the exit time and exiting (see the end of [`guest_main`]).
const EXIT_MARGIN_NS: u64 = 10_000_000;

fn report_figures(done: u64, misses: u64, min_received: u64) {
    report(Counter::RtPeriods, done);
    report(Counter::RtMisses, misses);
    report(Counter::RtMinReceivedNs, min_received);
}
