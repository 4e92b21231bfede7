//! `sleeper`: mostly halted — wakes every `period_ms` (default 10), works `work_us` (default 50), sleeps again.
//! Reports the wake-up lateness it saw (how long after its deadline it ran), the cost of a mostly idle VM.
#![no_std]
#![no_main]

use guest::{
    args, ns_to_ticks, println, rdtsc, report, sleep_until, ticks_to_ns, BootInfo, Counter,
};

#[no_mangle]
pub fn guest_main(boot: &'static BootInfo) -> ! {
    let cmdline = boot.cmdline();
    let period = ns_to_ticks(args::u64_or(cmdline, "period_ms", 10) * 1_000_000);
    let work = ns_to_ticks(args::u64_or(cmdline, "work_us", 50) * 1000);
    println!(
        "sleeper: start vcpu={} period_ticks={period} work_ticks={work}",
        boot.vcpu_id
    );
    let mut wakes: u64 = 0;
    let mut max_late: u64 = 0;
    let mut deadline = rdtsc().wrapping_add(period);
    loop {
        sleep_until(deadline);
        let woke = rdtsc();
        max_late = max_late.max(woke.saturating_sub(deadline));
        while rdtsc().wrapping_sub(woke) < work {
            core::hint::spin_loop();
        }
        wakes += 1;
        report(Counter::Progress, wakes);
        if wakes.is_multiple_of(100) {
            println!(
                "sleeper: wakes={wakes} max_late_us={}",
                ticks_to_ns(max_late) / 1000
            );
        }
        deadline = deadline.wrapping_add(period);
    }
}
