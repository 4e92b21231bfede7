//! `burn`: spins forever doing arithmetic, and reports its progress and the CPU share it measured.
//!
//! Arguments: `report_ms` (default 100) between reports, `gap_us` (default 20) the deschedule threshold.
//!
//! At start it measures the VM-exit round trip (256 `VERSION` hypercalls) and reports the median in guest TSC
//! ticks (`EXIT_RTT_TICKS`).
#![no_std]
#![no_main]

use guest::{args, meter::CpuMeter, ns_to_ticks, println, report, BootInfo, Counter};

#[no_mangle]
pub fn guest_main(boot: &'static BootInfo) -> ! {
    let cmdline = boot.cmdline();
    let report_ticks = ns_to_ticks(args::u64_or(cmdline, "report_ms", 100) * 1_000_000);
    let mut meter = CpuMeter::new(args::u64_or(cmdline, "gap_us", 20) * 1000);
    let (rtt_min, rtt_median) = guest::hypercall::exit_round_trip(&mut [0u64; 256]);
    report(Counter::ExitRttTicks, rtt_median);
    println!(
        "burn: start vcpu={} tsc_hz={} exit_rtt_ticks min={rtt_min} median={rtt_median}",
        boot.vcpu_id, boot.tsc_hz
    );
    let mut work: u64 = 0;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = meter.sample().wrapping_add(report_ticks);
    loop {
        for _ in 0..64 {
            state = core::hint::black_box(
                state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1),
            );
        }
        work += 1;
        let now = meter.sample();
        if now >= next {
            next = next.wrapping_add(report_ticks);
            let (received, elapsed) = (meter.received_ns(), meter.elapsed_ns());
            report(Counter::Progress, work);
            report(Counter::ReceivedNs, received);
            report(Counter::ElapsedNs, elapsed);
            println!(
                "burn: elapsed_ms={} received_ms={} share_permille={} work={work}",
                elapsed / 1_000_000,
                received / 1_000_000,
                permille(received, elapsed)
            );
            meter.skip_gap();
        }
    }
}

fn permille(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        0
    } else {
        u64::try_from(u128::from(part) * 1000 / u128::from(whole)).unwrap_or(u64::MAX)
    }
}
