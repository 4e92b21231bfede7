//! `io`: drives one virtio-blk volume at a given queue depth, rate, request size and read/write mix, writes data
//! patterns and verifies them on read-back, and reports each second (docs/guest-abi.md, "Virtio-mmio devices").
//!
//! Arguments (`args`, all optional): `device` (0) index in the `BootInfo` device table; `depth` (8) requests in
//! flight, at most 64; `iops` (0 = as fast as it can) target rate; `bytes` (4096) request size, a multiple of 512 up
//! to 131072; `read_pct` (50) share of reads; `lba_start` (0) and `lba_count` (0 = to the end of the volume) the
//! 512-byte sector range used; `seed` (1); `duration_s` (0 = forever) after which it stops issuing, drains and
//! exits; `verify` (1) check read data; `poll_us` (100) shortest sleep between polls; `stall_s` (10) give up when
//! requests are in flight and none completes for that long; `start_ms` (0) idle time after the device is set up and
//! before the first request (the volume is idle meanwhile: a burst bucket fills, a commitment is lendable);
//! `ro_writes` (0) with 1 on a read-only volume, ignore `VIRTIO_BLK_F_RO` and write anyway (the device must fail
//! every write with IOERR).
//!
//! Design: the workload (`guest::virtio_workload`, host-tested) cuts the range into units of `bytes` and tracks
//! the pass last written to each, so requests never overlap and every read knows which pattern to expect (block
//! number + seed + pass: a misplaced, stale or foreign block is detected); with `verify=1` a read chosen on a unit
//! of unknown content becomes a write. A read-only volume gets reads only, unverified. This file is the loop
//! around it: reap completions, issue up to the depth and the rate (one notify per batch), report each second,
//! and otherwise sleep with `SLEEP_UNTIL` (the ABI has no interrupts): a paced run with a free slot until its
//! next issue time (it reaps then), else, with requests in flight, for an eighth of the last second's mean
//! latency, between `poll_us` and 1 ms — every sleep is an exit, which the VM pays for in CPU time. While requests
//! are in flight it reads the device status every 100 ms to catch DEVICE_NEEDS_RESET. Only vCPU 0 does I/O; other vCPUs idle.
//!
//! Every second of guest TSC it reports `IO_IOPS`, `IO_OK`, `IO_ERR`, `IO_VERIFY_FAIL`, `IO_LAT_AVG_NS`,
//! `PROGRESS` (= `IO_OK`) and last `IO_SECONDS`, and logs one line `io: t=<s> iops=.. ok=.. err=.. verify_fail=..
//! lat_avg_us=.. inflight=..`. The first 8 request errors and verification failures are logged one by one.
//!
//! Exit codes: 0 = duration done without a verification failure, 0x20 = done with verification failures; a device
//! that cannot be used: 0x30 no such device in the table (or its window is smaller than 0x200 bytes), 0x31 bad
//! magic, 0x32 transport version not 2, 0x33 wrong device id, 0x34 reset did not complete, 0x35 no VERSION_1,
//! 0x36 FEATURES_OK refused, 0x37 queue unavailable or refused, 0x38 not enough guest memory for the buffers,
//! 0x39 DEVICE_NEEDS_RESET (or DRIVER_OK refused), 0x3a device protocol violation in the used ring, 0x3b stall,
//! 0x3c bad arguments.
#![no_std]
#![no_main]

use core::fmt::Write as _;

use guest::virtio::{self, Dma, InitError, MmioRegs};
use guest::virtio_blk::{BlkDriver, MAX_SLOTS};
use guest::virtio_workload::{Config, Event, Workload};
use guest::{
    args, console::LineBuf, exit, log, ns_to_ticks, rdtsc, report, sleep_until, BootInfo, Counter,
};

const NO_DEVICE: u64 = 0x30;
const BAD_MAGIC: u64 = 0x31;
const BAD_VERSION: u64 = 0x32;
const WRONG_DEVICE: u64 = 0x33;
const RESET_STUCK: u64 = 0x34;
const NO_VERSION_1: u64 = 0x35;
const FEATURES_REFUSED: u64 = 0x36;
const QUEUE: u64 = 0x37;
const NO_MEMORY: u64 = 0x38;
const NEEDS_RESET: u64 = 0x39;
const PROTOCOL: u64 = 0x3a;
const STALL: u64 = 0x3b;
const BAD_ARGS: u64 = 0x3c;
const VERIFY_FAILED: u64 = 0x20;

const MAX_BYTES: u64 = 128 * 1024;
/// Per-kind log lines before going quiet.
const LOG_FIRST: u64 = 8;
/// Stack the ABI gives each vCPU at the top of RAM.
const STACK_PER_VCPU: u64 = 64 * 1024;

extern "C" {
    /// End of the image (linker.ld).
    static __bss_end: u8;
}

macro_rules! logf {
    ($($arg:tt)*) => {{
        let mut line = LineBuf::new();
        let _ = write!(line, $($arg)*);
        log(line.as_str());
    }};
}

fn die(code: u64, what: &str) -> ! {
    logf!("io: {what}; exiting with code {code:#x}");
    exit(code)
}

struct Args {
    device: usize,
    depth: usize,
    iops: u64,
    bytes: u32,
    read_pct: u64,
    lba_start: u64,
    lba_count: u64,
    seed: u64,
    duration_s: u64,
    verify: bool,
    poll_us: u64,
    stall_s: u64,
    start_ms: u64,
    ro_writes: bool,
}

fn parse_args(cmdline: &str) -> Args {
    let get = |key, default| args::u64_or(cmdline, key, default);
    let bytes = get("bytes", 4096);
    if bytes == 0 || bytes % 512 != 0 || bytes > MAX_BYTES {
        die(
            BAD_ARGS,
            "bytes must be a non-zero multiple of 512, at most 131072",
        );
    }
    let read_pct = get("read_pct", 50);
    if read_pct > 100 {
        die(BAD_ARGS, "read_pct must be 0 to 100");
    }
    let depth = get("depth", 8);
    if depth == 0 || depth > MAX_SLOTS as u64 {
        die(BAD_ARGS, "depth must be 1 to 64");
    }
    Args {
        device: usize::try_from(get("device", 0)).unwrap_or(usize::MAX),
        depth: usize::try_from(depth).unwrap_or(1),
        iops: get("iops", 0),
        bytes: u32::try_from(bytes).unwrap_or(4096),
        read_pct,
        lba_start: get("lba_start", 0),
        lba_count: get("lba_count", 0),
        seed: get("seed", 1),
        duration_s: get("duration_s", 0),
        verify: get("verify", 1) != 0,
        poll_us: get("poll_us", 100).max(1),
        stall_s: get("stall_s", 10).max(1),
        start_ms: get("start_ms", 0),
        ro_writes: get("ro_writes", 0) != 0,
    }
}

fn init_error_code(e: InitError) -> u64 {
    match e {
        InitError::BadMagic(_) => BAD_MAGIC,
        InitError::BadVersion(_) => BAD_VERSION,
        InitError::WrongDevice { .. } => WRONG_DEVICE,
        InitError::ResetStuck(_) => RESET_STUCK,
        InitError::NoVersion1 { .. } => NO_VERSION_1,
        InitError::FeaturesRefused { .. } => FEATURES_REFUSED,
        InitError::QueueUnavailable { .. } | InitError::QueueRefused => QUEUE,
        InitError::OutOfMemory { .. } => NO_MEMORY,
        InitError::NotLive { .. } => NEEDS_RESET,
    }
}

/// Reports the window that ends now; returns its mean latency in ticks (0 without completions).
fn report_second(w: &mut Workload<'_, MmioRegs>, seconds: u64, window_s: u64) -> u64 {
    let (done, lat_ticks) = w.take_window();
    let s = w.stats();
    let iops = done / window_s.max(1);
    let mean = lat_ticks.checked_div(done).unwrap_or(0);
    let lat_ns = guest::ticks_to_ns(mean);
    report(Counter::IoIops, iops);
    report(Counter::IoOk, s.ok);
    report(Counter::IoErr, s.err);
    report(Counter::IoVerifyFail, s.verify_fail);
    report(Counter::IoLatAvgNs, lat_ns);
    report(Counter::Progress, s.ok);
    report(Counter::IoSeconds, seconds);
    logf!(
        "io: t={seconds} iops={iops} ok={} err={} verify_fail={} lat_avg_us={} inflight={}",
        s.ok,
        s.err,
        s.verify_fail,
        lat_ns / 1000,
        w.in_flight()
    );
    mean
}

/// Logs the first few failures of each kind.
fn log_event(e: Event, seed: u64, logged: &mut (u64, u64)) {
    match e {
        Event::Failed(c) => {
            logged.0 += 1;
            if logged.0 <= LOG_FIRST {
                logf!(
                    "io: request failed: status={} op={:?} sector={} bytes={}",
                    c.status,
                    c.op,
                    c.sector,
                    c.bytes
                );
            }
        }
        Event::VerifyFailed {
            found: f,
            expected_pass,
        } => {
            logged.1 += 1;
            if logged.1 <= LOG_FIRST {
                logf!(
                    "io: verify failed: sector={} expected seed={seed} pass={expected_pass}; found sector={} seed={} pass={} at byte {}",
                    f.sector,
                    f.claims_sector,
                    f.claims_seed,
                    f.claims_pass,
                    f.offset
                );
            }
        }
    }
}

/// RAM between the end of the image and the vCPU stacks (page aligned, with a page of guard below the stacks).
fn free_ram(boot: &BootInfo) -> (u64, u64) {
    // Only the address of the linker symbol is taken (no read).
    let end_of_image = core::ptr::addr_of!(__bss_end) as u64;
    let start = (end_of_image + 0xfff) & !0xfff;
    let stacks = boot
        .mem_bytes
        .saturating_sub(u64::from(boot.vcpu_count) * STACK_PER_VCPU);
    let end = stacks.saturating_sub(0x1000) & !0xfff;
    (start, end.max(start))
}

/// Checks string port input (`INS`): a pattern written to COM1's scratch register (0x3ff, PC16550D) with `OUT`
/// must come back eight times through `REP INSB` into memory. The hypervisor emulates it through the guest page
/// walk and stores into guest RAM; the result is logged (`io: ins check ok` or `... failed`), never fatal here.
fn ins_check() -> bool {
    const SCR: u16 = 0x3ff;
    const PATTERN: u8 = 0x5a;
    let mut buf = [0u8; 8];
    // SAFETY: port 0x3ff is the VM's own COM1 scratch register (docs/guest-abi.md); `REP INSB` stores RCX = 8 bytes
    // at RDI, which points at `buf` (8 bytes, on this vCPU's stack), with DF clear (the Rust ABI guarantees it).
    unsafe {
        core::arch::asm!("out dx, al", in("dx") SCR, in("al") PATTERN, options(nomem, nostack));
        core::arch::asm!(
            "rep insb",
            inout("rdi") buf.as_mut_ptr() => _,
            inout("rcx") buf.len() => _,
            in("dx") SCR,
            options(nostack)
        );
    }
    buf == [PATTERN; 8]
}

#[no_mangle]
pub fn guest_main(boot: &'static BootInfo) -> ! {
    if boot.vcpu_id != 0 {
        // One driver per device: the other vCPUs stay out of the way.
        loop {
            sleep_until(u64::MAX);
        }
    }
    let a = parse_args(boot.cmdline());
    if ins_check() {
        log("io: ins check ok");
    } else {
        log("io: ins check failed: REP INSB did not store the scratch register's value");
    }
    let devices = boot.devices();
    let Some(info) = devices.get(a.device).copied() else {
        logf!(
            "io: no device {} in the BootInfo device table (abi_version {}, {} devices)",
            a.device,
            boot.abi_version,
            devices.len()
        );
        exit(NO_DEVICE)
    };
    if (info.size as usize) < virtio::WINDOW || info.base % 0x1000 != 0 {
        logf!(
            "io: device {} window {:#x}+{:#x} is unusable",
            a.device,
            info.base,
            info.size
        );
        exit(NO_DEVICE)
    }
    // SAFETY: the hypervisor announced this window in the device table: mapped (identity) for the VM's life, at
    // least WINDOW bytes (checked), and this vCPU is the only one touching it.
    let regs = unsafe { MmioRegs::new(usize::try_from(info.base).unwrap_or(0)) };
    let (start, end) = free_ram(boot);
    let len = usize::try_from(end - start).unwrap_or(0);
    // SAFETY: `[start, end)` is guest RAM above the image and below the stacks, used by nothing else; the guest
    // runs on the identity map, so the device sees each byte at its own address.
    let Some(mut dma) = (unsafe { Dma::new(start as *mut u8, start, len) }) else {
        die(NO_MEMORY, "free RAM is not page aligned")
    };
    let mut drv = match BlkDriver::init(regs, &mut dma, a.depth, a.bytes) {
        Ok(d) => d,
        Err(e) => {
            let code = init_error_code(e);
            logf!(
                "io: device {} at {:#x}: {e}; exiting with code {code:#x}",
                a.device,
                info.base
            );
            exit(code)
        }
    };
    let capacity = drv.capacity();
    let unit_sectors = u64::from(a.bytes / 512);
    let lba_count = if a.lba_count == 0 {
        capacity.saturating_sub(a.lba_start)
    } else {
        a.lba_count
    };
    if a.lba_start
        .checked_add(lba_count)
        .is_none_or(|e| e > capacity)
        || lba_count < unit_sectors
    {
        logf!(
            "io: sectors [{}, +{lba_count}) do not fit the volume of {capacity} sectors (or hold no {}-byte request)",
            a.lba_start,
            a.bytes
        );
        exit(BAD_ARGS)
    }
    let nunits = usize::try_from(lba_count / unit_sectors).unwrap_or(usize::MAX);
    let Some(table) = dma.alloc(nunits.saturating_mul(4), 8) else {
        logf!(
            "io: {nunits} units need {} bytes of state, {} left",
            nunits.saturating_mul(4),
            dma.remaining()
        );
        exit(NO_MEMORY)
    };
    // SAFETY: the region was just allocated for this table alone (zeroed: every unit UNKNOWN, not busy), 8-byte
    // aligned and `nunits * 4` bytes long; no device is ever given its address.
    let units = unsafe { core::slice::from_raw_parts_mut(table.ptr.cast::<u32>(), nunits) };
    if drv.read_only() && a.ro_writes {
        log("io: the volume is read-only (VIRTIO_BLK_F_RO); ro_writes=1: writing anyway");
        drv.submit_writes_anyway();
    } else if drv.read_only() && (a.verify || a.read_pct != 100) {
        log("io: the volume is read-only: reads only, verification off");
    }
    let (queue, depth) = (drv.queue_size(), drv.depth());
    let cfg = Config {
        bytes: a.bytes,
        read_pct: a.read_pct,
        lba_start: a.lba_start,
        seed: a.seed,
        verify: a.verify,
    };
    let mut w = match Workload::new(drv, units, cfg) {
        Ok(w) => w,
        Err(e) => {
            logf!("io: {e}");
            exit(BAD_ARGS)
        }
    };
    let cfg = w.config();
    logf!(
        "io: start device={} base={:#x} capacity={capacity} sectors queue={queue} depth={depth} bytes={} read_pct={} iops={} lba=[{}, +{lba_count}) seed={} duration_s={} verify={}",
        a.device,
        info.base,
        cfg.bytes,
        cfg.read_pct,
        a.iops,
        cfg.lba_start,
        cfg.seed,
        a.duration_s,
        u8::from(cfg.verify)
    );
    main_loop(&mut w, &a)
}

fn main_loop(w: &mut Workload<'_, MmioRegs>, a: &Args) -> ! {
    let hz = ns_to_ticks(1_000_000_000);
    if a.start_ms > 0 {
        let until = rdtsc().saturating_add(ns_to_ticks(a.start_ms.saturating_mul(1_000_000)));
        while rdtsc() < until {
            sleep_until(until);
        }
        logf!("io: idle phase of {} ms over", a.start_ms);
    }
    let seed = a.seed;
    let start = rdtsc();
    let end = match a.duration_s {
        0 => u64::MAX,
        s => start.saturating_add(s.saturating_mul(hz)),
    };
    // Ticks between issues; 0 = unpaced. A paced run that fell behind catches up by at most 10 ms of requests.
    let interval = hz.checked_div(a.iops).map_or(0, |t| t.max(1));
    let max_lag = hz / 100;
    let poll_min = ns_to_ticks(a.poll_us * 1000).max(1);
    let poll_max = ns_to_ticks(1_000_000).max(poll_min);
    let mut poll = poll_min;
    let stall = a.stall_s.saturating_mul(hz);
    let mut next_issue = start;
    let mut next_report = start + hz;
    let mut last_report = start;
    let mut last_progress = start;
    let mut last_status_check = start;
    let mut logged = (0u64, 0u64);
    loop {
        let mut now = rdtsc();
        let reaped = match w.reap(now, &mut |e| log_event(e, seed, &mut logged)) {
            Ok(n) => n,
            Err(e) => {
                logf!("io: device protocol violation: {e}");
                exit(PROTOCOL)
            }
        };
        if reaped > 0 {
            last_progress = now;
        }
        let mut issued = 0;
        while now < end && (interval == 0 || now >= next_issue) {
            match w.issue(now) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    logf!("io: request refused by the driver: {e}");
                    exit(BAD_ARGS)
                }
            }
            issued += 1;
            if interval != 0 {
                next_issue = next_issue.max(now.saturating_sub(max_lag)) + interval;
            }
        }
        if issued > 0 {
            w.kick();
            if w.in_flight() == issued {
                // The queue was idle: the stall clock starts now.
                last_progress = now;
            }
        }
        now = rdtsc();
        if now >= next_report {
            let seconds = (now - start) / hz;
            let mean = report_second(w, seconds, (now - last_report) / hz);
            // Poll at an eighth of the device's latency (between poll_us and 1 ms): completions are seen within
            // ~12 % of their latency, without an exit every poll_us when the device is slow.
            if mean > 0 {
                poll = (mean / 8).clamp(poll_min, poll_max);
            }
            last_report = start + seconds * hz;
            next_report = last_report + hz;
        }
        let in_flight = w.in_flight();
        if now >= end && in_flight == 0 {
            report_second(w, (now - start) / hz, 1);
            let s = w.stats();
            logf!(
                "io: done ok={} err={} verify_fail={}",
                s.ok,
                s.err,
                s.verify_fail
            );
            exit(if s.verify_fail == 0 { 0 } else { VERIFY_FAILED })
        }
        if reaped > 0 || issued > 0 {
            continue;
        }
        // Nothing to do right now: check on the device now and then, and sleep until the next event.
        if in_flight > 0 {
            if now - last_progress > stall {
                logf!(
                    "io: no completion for {} s with {in_flight} requests in flight",
                    a.stall_s
                );
                exit(STALL)
            }
            if now - last_status_check > hz / 10 {
                last_status_check = now;
                let st = w.driver().device_status();
                if st & virtio::status::DEVICE_NEEDS_RESET != 0 {
                    logf!("io: device status {st:#x}: DEVICE_NEEDS_RESET");
                    exit(NEEDS_RESET)
                }
            }
        }
        // With requests in flight, poll again soon; a paced run also wakes for its next issue time.
        // A paced run with a free slot wakes for its next issue time and reaps then; otherwise requests in
        // flight are polled.
        let wake = if interval != 0 && w.has_free_slot() && next_issue > now {
            next_issue
        } else if in_flight > 0 {
            now + poll
        } else {
            end
        };
        sleep_until(wake.min(next_report));
    }
}
