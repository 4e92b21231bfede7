//! `selftest=nvme`: brings up the first NVMe controller, writes patterns and reads them back (one page, two pages
//! and a PRP-list transfer), checks that an out-of-range request is refused, then calibrates the device's capacity
//! with 4 KiB random reads polled at queue depth 1 and 32 on this CPU's queue.
//!
//! Destructive for the first namespace's first 64 KiB, hence not part of `selftest=all`. Reports
//! `ns=<namespaces> lba_size=<bytes> qd1_iops=<n> qd32_iops=<n>` plus the driver's CPU time per request at QD32
//! (submit plus the polls that delivered completions, divided by requests). Without an NVMe device it passes with
//! `skipped: no nvme controller`.

// Details are fixed-size strings returned once per step, as in crate::selftest; boxing them buys nothing.
#![allow(clippy::result_large_err)]

use alloc::vec::Vec;
use core::fmt::Write;

use drivers::nvme::{Completion, Controller, Dma, IoOp, IoRequest, Namespace, NvmeError};

use super::nvme::{controller, KernelHal, Probe};
use crate::arch::x86_64::{percpu, tsc};

type Detail = heapless::String<160>;

macro_rules! detail {
    ($($arg:tt)*) => {{
        let mut d = Detail::new();
        // Overflow only truncates the explanation.
        let _ = write!(d, $($arg)*);
        d
    }};
}

/// Reads at queue depth 1.
const QD1_IOS: u64 = 2_000;
/// Reads at queue depth 32.
const QD32_IOS: u64 = 10_000;
/// Pages of the pattern buffers (the largest verified transfer, via a PRP list).
const PATTERN_PAGES: usize = 16;
/// A single request taking longer than this means the device or driver stalled.
const STALL_US: u64 = 10_000_000;

/// Runs the test.
pub fn run() -> Result<Detail, Detail> {
    let dev = match controller() {
        Probe::Absent => return Ok(detail!("skipped: no nvme controller")),
        Probe::Failed(why) => return Err(detail!("bring-up: {why}")),
        Probe::Up(dev) => dev,
    };
    let mut dev = dev.lock();
    let (bdf, mechanism) = (dev.bdf, dev.mechanism);
    let ctrl = &mut dev.ctrl;
    let ns = *ctrl
        .namespaces()
        .first()
        .ok_or_else(|| detail!("controller has no usable namespace"))?;
    let qid = own_queue(ctrl);
    let mut bufs = Buffers::new(ctrl)?;
    let result = exercise(ctrl, qid, &ns, &mut bufs);
    bufs.free(ctrl);
    let (verified, qd1, qd32, drv_ns) = result?;
    log::info!(
        "nvme: {bdf} ({mechanism}) ns {} ({} blocks of {} B): {verified} pattern transfers verified; 4 KiB random reads QD1 {qd1} IOPS, QD32 {qd32} IOPS, driver {drv_ns} ns/request",
        ns.nsid,
        ns.blocks,
        ns.lba_size
    );
    Ok(detail!(
        "ns={} lba_size={} qd1_iops={qd1} qd32_iops={qd32} verified={verified} drv_ns_per_io={drv_ns} queues={}",
        ctrl.namespaces().len(),
        ns.lba_size,
        ctrl.io_queues()
    ))
}

/// This CPU's queue: CPU n owns queue n + 1 (wrapping when the controller granted fewer).
pub(super) fn own_queue(ctrl: &Controller<KernelHal>) -> u16 {
    let cpu = percpu::current_id();
    let n = u32::from(ctrl.io_queues().max(1));
    u16::try_from(cpu % n + 1).unwrap_or(1)
}

/// DMA buffers of the test.
struct Buffers {
    src: u64,
    dst: u64,
    reads: u64,
}

impl Buffers {
    fn new(ctrl: &mut Controller<KernelHal>) -> Result<Self, Detail> {
        let hal = ctrl.hal_mut();
        let src = hal.alloc_pages(PATTERN_PAGES);
        let dst = hal.alloc_pages(PATTERN_PAGES);
        let reads = hal.alloc_pages(32);
        match (src, dst, reads) {
            (Some(src), Some(dst), Some(reads)) => Ok(Self { src, dst, reads }),
            _ => {
                for (p, n) in [(src, PATTERN_PAGES), (dst, PATTERN_PAGES), (reads, 32)] {
                    if let Some(p) = p {
                        hal.free_pages(p, n);
                    }
                }
                Err(detail!("no memory for DMA buffers"))
            }
        }
    }

    fn free(self, ctrl: &mut Controller<KernelHal>) {
        let hal = ctrl.hal_mut();
        hal.free_pages(self.src, PATTERN_PAGES);
        hal.free_pages(self.dst, PATTERN_PAGES);
        hal.free_pages(self.reads, 32);
    }
}

/// Submits one request and waits for its completion.
fn one(ctrl: &mut Controller<KernelHal>, qid: u16, req: IoRequest) -> Result<Completion, Detail> {
    let tag = req.tag;
    ctrl.submit(qid, req)
        .map_err(|r| detail!("submit refused: {:?}", r.error))?;
    let start = tsc::uptime_us();
    let mut got = None;
    while got.is_none() {
        ctrl.poll(qid, &mut |c| got = Some(c));
        if tsc::uptime_us() - start > STALL_US {
            return Err(detail!("request {tag} never completed"));
        }
    }
    let c = got.ok_or_else(|| detail!("no completion"))?;
    if c.tag != tag {
        return Err(detail!(
            "completion for tag {} while waiting for {tag}",
            c.tag
        ));
    }
    Ok(c)
}

type Figures = (u32, u64, u64, u64);

fn exercise(
    ctrl: &mut Controller<KernelHal>,
    qid: u16,
    ns: &Namespace,
    bufs: &mut Buffers,
) -> Result<Figures, Detail> {
    let lba_size = u64::from(ns.lba_size);
    let io_bytes = lba_size.max(4096);
    let per_io = u32::try_from(io_bytes / lba_size).unwrap_or(1);
    let seed = tsc::rdtsc();
    let mut verified = 0;
    // Every other namespace gets the same pattern check (the calibration below uses the first only).
    let others: Vec<Namespace> = ctrl
        .namespaces()
        .iter()
        .copied()
        .filter(|n| n.nsid != ns.nsid)
        .collect();
    for other in &others {
        verified += verify(ctrl, qid, other, bufs, seed)?;
    }
    verified += verify(ctrl, qid, ns, bufs, seed)?;
    let past_end = IoRequest::contiguous(
        3,
        ns.nsid,
        IoOp::Read,
        ns.blocks,
        per_io,
        bufs.dst,
        io_bytes,
    );
    match ctrl.submit(qid, past_end) {
        Err(r) if matches!(r.error, NvmeError::OutOfRange { .. }) => {}
        other => {
            return Err(detail!(
                "read past the end not refused: {:?}",
                other.map_err(|r| r.error)
            ))
        }
    }
    let (qd1, _) = random_reads(ctrl, qid, ns, bufs.reads, 1, QD1_IOS, per_io, seed)?;
    let (qd32, drv) = random_reads(ctrl, qid, ns, bufs.reads, 32, QD32_IOS, per_io, seed)?;
    Ok((verified, qd1, qd32, drv))
}

/// Write-then-read transfers of 1, 2 and 16 pages (the last needs a PRP list) at distinct LBAs of `ns`;
/// returns how many were verified.
fn verify(
    ctrl: &mut Controller<KernelHal>,
    qid: u16,
    ns: &Namespace,
    bufs: &mut Buffers,
    seed: u64,
) -> Result<u32, Detail> {
    let lba_size = u64::from(ns.lba_size);
    let mut verified = 0;
    for (i, pages) in [1u64, 2, PATTERN_PAGES as u64].into_iter().enumerate() {
        let bytes = pages * 4096;
        if bytes < lba_size || bytes > ctrl.max_transfer_bytes() {
            continue;
        }
        let blocks = u32::try_from(bytes / lba_size).unwrap_or(1);
        let lba = u64::try_from(i).unwrap_or(0) * 2 * u64::from(blocks);
        if lba + u64::from(blocks) > ns.blocks {
            return Err(detail!("namespace too small ({} blocks)", ns.blocks));
        }
        let words = usize::try_from(bytes / 8).unwrap_or(0);
        let pattern: Vec<u8> = (0..words)
            .flat_map(|w| {
                (seed ^ (lba << 20) ^ (u64::try_from(w).unwrap_or(0) * 0x9E37_79B9)).to_le_bytes()
            })
            .collect();
        let len = pattern.len();
        ctrl.hal_mut().write(bufs.src, &pattern);
        ctrl.hal_mut().write(bufs.dst, &alloc::vec![0u8; len]);
        let w = one(
            ctrl,
            qid,
            IoRequest::contiguous(1, ns.nsid, IoOp::Write, lba, blocks, bufs.src, bytes),
        )?;
        if !w.status.is_success() {
            return Err(detail!("write of {bytes} B at LBA {lba}: {}", w.status));
        }
        let r = one(
            ctrl,
            qid,
            IoRequest::contiguous(2, ns.nsid, IoOp::Read, lba, blocks, bufs.dst, bytes),
        )?;
        if !r.status.is_success() {
            return Err(detail!("read of {bytes} B at LBA {lba}: {}", r.status));
        }
        let mut back = alloc::vec![0u8; len];
        ctrl.hal_mut().read(bufs.dst, &mut back);
        if let Some(pos) = back.iter().zip(&pattern).position(|(a, b)| a != b) {
            return Err(detail!(
                "{bytes} B at LBA {lba}: read back differs at byte {pos}"
            ));
        }
        verified += 1;
    }
    Ok(verified)
}

/// `total` random aligned reads of `per_io` blocks kept `depth` deep; returns (IOPS, driver ns per request).
/// Any failed read is an error.
#[allow(clippy::too_many_arguments)] // a measurement loop; bundling its knobs would only rename them
pub(super) fn random_reads(
    ctrl: &mut Controller<KernelHal>,
    qid: u16,
    ns: &Namespace,
    bufs: u64,
    depth: u64,
    total: u64,
    per_io: u32,
    seed: u64,
) -> Result<(u64, u64), Detail> {
    let (iops, drv_ns, failed) =
        random_reads_counting(ctrl, qid, ns, bufs, depth, total, per_io, seed)?;
    if failed > 0 {
        return Err(detail!("QD{depth}: {failed} of {total} reads failed"));
    }
    Ok((iops, drv_ns))
}

/// As [`random_reads`], but reads that complete with an error status count (they took the device's time too)
/// and are returned as the third figure: a media error is not a capacity problem.
#[allow(clippy::too_many_arguments)] // as random_reads
pub(super) fn random_reads_counting(
    ctrl: &mut Controller<KernelHal>,
    qid: u16,
    ns: &Namespace,
    bufs: u64,
    depth: u64,
    total: u64,
    per_io: u32,
    seed: u64,
) -> Result<(u64, u64, u64), Detail> {
    let slots = ns.blocks / u64::from(per_io);
    if slots == 0 {
        return Err(detail!("namespace smaller than one 4 KiB read"));
    }
    let mut rng = seed | 1;
    let (mut issued, mut done, mut failed) = (0u64, 0u64, 0u64);
    let mut driver_ticks = 0u64;
    let start = tsc::rdtsc();
    let mut last_progress = tsc::uptime_us();
    while done < total {
        while issued < total && issued - done < depth {
            // xorshift64: cheap, and spreads reads over the whole namespace.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let lba = (rng % slots) * u64::from(per_io);
            let page = bufs + (issued % 32) * 4096;
            let req = IoRequest::contiguous(issued, ns.nsid, IoOp::Read, lba, per_io, page, 4096);
            let t0 = tsc::rdtsc();
            let r = ctrl.submit(qid, req);
            driver_ticks += tsc::rdtsc() - t0;
            match r {
                Ok(()) => issued += 1,
                Err(r) if r.error == NvmeError::QueueFull => break,
                Err(r) => return Err(detail!("submit at QD{depth} refused: {:?}", r.error)),
            }
        }
        let t0 = tsc::rdtsc();
        let n = ctrl.poll(qid, &mut |c| {
            done += 1;
            if !c.status.is_success() {
                failed += 1;
            }
        });
        if n > 0 {
            driver_ticks += tsc::rdtsc() - t0;
            last_progress = tsc::uptime_us();
        } else if tsc::uptime_us() - last_progress > STALL_US {
            return Err(detail!(
                "QD{depth}: no completion for 10 s ({done}/{total} done)"
            ));
        }
    }
    let elapsed_us = tsc::ticks_to_us(tsc::rdtsc() - start).max(1);
    let iops = total * 1_000_000 / elapsed_us;
    let drv_ns = tsc::ticks_to_us(driver_ticks.saturating_mul(1000)) / total;
    Ok((iops, drv_ns, failed))
}
