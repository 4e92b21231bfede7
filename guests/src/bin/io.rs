//! `io`: drives one virtio-blk volume at a given queue depth, rate, request size and read/write mix, writes data
//! patterns and verifies them on read-back, and reports each second (docs/guest-abi.md, "Virtio-mmio devices").
//!
//! Arguments (`args`, all optional): `device` (0) index in the `BootInfo` device table; `depth` (8) requests in
//! flight, at most 64; `iops` (0 = as fast as it can) target rate; `bytes` (4096) request size, a multiple of 512 up
//! to 131072; `read_pct` (50) share of reads; `lba_start` (0) and `lba_count` (0 = to the end of the volume) the
//! 512-byte sector range used; `seed` (1); `duration_s` (0 = forever) after which it stops issuing, drains and
//! exits; `verify` (1) check read data; `poll_us` (100) sleep between polls while waiting; `stall_s` (10) give up
//! when requests are in flight and none completes for that long.
//!
//! Design: the range is cut into units of `bytes`; each unit remembers the pass of its last completed write (0 =
//! never written, or unknown after a failed write) and whether a request on it is in flight, so no two requests
//! ever overlap and every read knows exactly which pattern to expect (block number + seed + pass: a misplaced,
//! stale or foreign block is detected; `guest::virtio_pattern`). With `verify=1` a read chosen on a unit of
//! unknown content becomes a write, so a fresh volume gets written as the run goes. The loop reaps completions,
//! issues new requests up to the depth and the rate (one notify per batch), and otherwise sleeps `poll_us` with
//! `SLEEP_UNTIL` (the ABI has no interrupts). Only vCPU 0 does I/O; other vCPUs idle.
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
use guest::virtio_blk::{BlkDriver, Completion, Op, MAX_SLOTS, S_OK};
use guest::virtio_pattern::{self as pattern, Rng};
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
/// Unit state: a request on the unit is in flight.
const BUSY: u32 = 1 << 31;
/// Unit state: content unknown (never written, or a write failed); otherwise the pass of the last write.
const UNKNOWN: u32 = 0;
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

/// What a slot's request is about.
#[derive(Clone, Copy)]
struct Pending {
    unit: usize,
    /// For a write: the pass being written; for a read: the pass expected (UNKNOWN: do not verify).
    pass: u32,
    issued: u64,
}

/// Counters since start, and for the current one-second window.
#[derive(Default)]
struct Stats {
    ok: u64,
    err: u64,
    verify_fail: u64,
    window_done: u64,
    window_lat_ticks: u64,
}

struct Run<'a> {
    a: Args,
    drv: BlkDriver<MmioRegs>,
    units: &'a mut [u32],
    unit_sectors: u64,
    slots: [Option<Pending>; MAX_SLOTS],
    free: [usize; MAX_SLOTS],
    nfree: usize,
    rng: Rng,
    stats: Stats,
    hz: u64,
}

impl Run<'_> {
    /// Chooses a unit and an operation, or `None` when every unit probed is busy.
    fn pick(&mut self) -> Option<(usize, Op, u32)> {
        let n = self.units.len() as u64;
        let start = self.rng.below(n);
        let want_read = self.rng.below(100) < self.a.read_pct;
        for probe in 0..n.min(64) {
            let unit = usize::try_from((start + probe) % n).unwrap_or(0);
            let state = self.units[unit];
            if state & BUSY != 0 {
                continue;
            }
            let read = self.drv.read_only() || (want_read && (!self.a.verify || state != UNKNOWN));
            if read {
                let expect = if self.a.verify { state } else { UNKNOWN };
                return Some((unit, Op::Read, expect));
            }
            // Passes stay below BUSY; wrapping back to 1 would take 2^31 writes of one unit.
            let pass = if state + 1 >= BUSY { 1 } else { state + 1 };
            return Some((unit, Op::Write, pass));
        }
        None
    }

    /// Submits one request on a free slot; false if none could be chosen.
    fn issue(&mut self, now: u64) -> bool {
        if self.nfree == 0 {
            return false;
        }
        let Some((unit, op, pass)) = self.pick() else {
            return false;
        };
        let slot = self.free[self.nfree - 1];
        let sector = self.a.lba_start + unit as u64 * self.unit_sectors;
        if op == Op::Write {
            let Some(buf) = self.drv.data_mut(slot) else {
                return false;
            };
            pattern::fill(&mut buf[..self.a.bytes as usize], sector, self.a.seed, pass);
        }
        if let Err(e) = self.drv.submit(slot, op, sector, self.a.bytes) {
            // The range was checked against the capacity, so this is an argument/driver mismatch.
            logf!("io: request refused by the driver: {e}");
            exit(BAD_ARGS)
        }
        self.nfree -= 1;
        self.units[unit] |= BUSY;
        self.slots[slot] = Some(Pending {
            unit,
            pass,
            issued: now,
        });
        true
    }

    fn complete(&mut self, c: Completion, now: u64) {
        let Some(p) = self.slots[c.slot].take() else {
            die(PROTOCOL, "completion for a slot with no request");
        };
        self.free[self.nfree] = c.slot;
        self.nfree += 1;
        self.stats.window_done += 1;
        self.stats.window_lat_ticks += now.saturating_sub(p.issued);
        let state = self.units[p.unit] & !BUSY;
        if c.status != S_OK {
            self.stats.err += 1;
            if self.stats.err <= LOG_FIRST {
                logf!(
                    "io: request failed: status={} op={:?} sector={} bytes={}",
                    c.status,
                    c.op,
                    c.sector,
                    c.bytes
                );
            }
            // A failed write leaves the unit's content unknown; a failed read changes nothing.
            self.units[p.unit] = if c.op == Op::Write { UNKNOWN } else { state };
            return;
        }
        self.stats.ok += 1;
        if c.op == Op::Write {
            self.units[p.unit] = p.pass;
            return;
        }
        self.units[p.unit] = state;
        if p.pass == UNKNOWN {
            return;
        }
        let bytes = c.bytes as usize;
        let Some(buf) = self.drv.data_mut(c.slot) else {
            die(PROTOCOL, "completed slot still busy");
        };
        if let Err(f) = pattern::check(&buf[..bytes], c.sector, self.a.seed, p.pass) {
            self.stats.verify_fail += 1;
            if self.stats.verify_fail <= LOG_FIRST {
                logf!(
                    "io: verify failed: sector={} expected seed={} pass={}; found sector={} seed={} pass={} at byte {}",
                    f.sector,
                    self.a.seed,
                    p.pass,
                    f.claims_sector,
                    f.claims_seed,
                    f.claims_pass,
                    f.offset
                );
            }
        }
    }

    fn report(&mut self, seconds: u64, window_s: u64) {
        let s = &mut self.stats;
        let iops = s.window_done / window_s.max(1);
        let lat_ns = s
            .window_lat_ticks
            .checked_div(s.window_done)
            .map_or(0, guest::ticks_to_ns);
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
            self.drv.in_flight()
        );
        s.window_done = 0;
        s.window_lat_ticks = 0;
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

#[no_mangle]
pub fn guest_main(boot: &'static BootInfo) -> ! {
    if boot.vcpu_id != 0 {
        // One driver per device: the other vCPUs stay out of the way.
        loop {
            sleep_until(u64::MAX);
        }
    }
    let a = parse_args(boot.cmdline());
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
    let drv = match BlkDriver::init(regs, &mut dma, a.depth, a.bytes) {
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
    let mut a = a;
    if drv.read_only() && a.verify {
        log("io: the volume is read-only: reads only, verification off");
        a.verify = false;
    }
    let hz = ns_to_ticks(1_000_000_000);
    logf!(
        "io: start device={} base={:#x} capacity={capacity} sectors queue={} depth={} bytes={} read_pct={} iops={} lba=[{}, +{lba_count}) seed={} duration_s={} verify={}",
        a.device,
        info.base,
        drv.queue_size(),
        drv.depth(),
        a.bytes,
        a.read_pct,
        a.iops,
        a.lba_start,
        a.seed,
        a.duration_s,
        u8::from(a.verify)
    );
    let depth = drv.depth();
    let mut free = [0usize; MAX_SLOTS];
    for (i, f) in free.iter_mut().enumerate().take(depth) {
        *f = depth - 1 - i;
    }
    let rng = Rng::new(a.seed ^ 0x696f);
    let mut run = Run {
        a,
        drv,
        units,
        unit_sectors,
        slots: [None; MAX_SLOTS],
        free,
        nfree: depth,
        rng,
        stats: Stats::default(),
        hz,
    };
    main_loop(&mut run)
}

fn main_loop(run: &mut Run<'_>) -> ! {
    let hz = run.hz;
    let start = rdtsc();
    let end = match run.a.duration_s {
        0 => u64::MAX,
        s => start.saturating_add(s.saturating_mul(hz)),
    };
    // Ticks between issues; 0 = unpaced.
    let interval = hz.checked_div(run.a.iops).map_or(0, |t| t.max(1));
    let max_lag = hz / 100;
    let poll = ns_to_ticks(run.a.poll_us * 1000).max(1);
    let stall = run.a.stall_s.saturating_mul(hz);
    let mut next_issue = start;
    let mut next_report = start + hz;
    let mut last_report = start;
    let mut last_progress = start;
    let mut last_status_check = start;
    loop {
        let mut now = rdtsc();
        let mut progressed = false;
        loop {
            match run.drv.poll() {
                Ok(Some(c)) => {
                    run.complete(c, now);
                    progressed = true;
                }
                Ok(None) => break,
                Err(e) => {
                    logf!("io: device protocol violation: {e}");
                    exit(PROTOCOL)
                }
            }
        }
        if progressed {
            last_progress = now;
        }
        let mut issued = 0;
        while now < end && (interval == 0 || now >= next_issue) && run.issue(now) {
            issued += 1;
            if interval != 0 {
                next_issue = next_issue.max(now.saturating_sub(max_lag)) + interval;
            }
        }
        if issued > 0 {
            run.drv.kick();
            if run.drv.in_flight() == issued {
                // The queue was idle: the stall clock starts now.
                last_progress = now;
            }
        }
        now = rdtsc();
        if now >= next_report {
            let seconds = (now - start) / hz;
            let window = (now - last_report) / hz;
            run.report(seconds, window);
            last_report = start + seconds * hz;
            next_report = last_report + hz;
        }
        let in_flight = run.drv.in_flight();
        if now >= end && in_flight == 0 {
            let seconds = (now - start) / hz;
            run.report(seconds, 1);
            let s = &run.stats;
            logf!(
                "io: done ok={} err={} verify_fail={}",
                s.ok,
                s.err,
                s.verify_fail
            );
            exit(if s.verify_fail == 0 { 0 } else { VERIFY_FAILED })
        }
        if progressed || issued > 0 {
            continue;
        }
        // Nothing to do right now: check on the device now and then, and sleep until the next event.
        if in_flight > 0 {
            if now - last_progress > stall {
                logf!(
                    "io: no completion for {} s with {in_flight} requests in flight",
                    run.a.stall_s
                );
                exit(STALL)
            }
            if now - last_status_check > hz / 10 {
                last_status_check = now;
                let st = run.drv.device_status();
                if st & virtio::status::DEVICE_NEEDS_RESET != 0 {
                    logf!("io: device status {st:#x}: DEVICE_NEEDS_RESET");
                    exit(NEEDS_RESET)
                }
            }
        }
        // With requests in flight, poll again soon; a paced run also wakes for its next issue time.
        let mut wake = if in_flight > 0 { now + poll } else { end };
        if interval != 0 && run.nfree > 0 {
            wake = wake.min(next_issue);
        }
        sleep_until(wake.min(next_report));
    }
}
