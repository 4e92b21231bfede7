//! `selftest=nvme-faults`: media errors injected below the device (QEMU `blkdebug`) reach the requester as an
//! error status, other requests are unaffected, and the controller keeps running without a reset.
//!
//! Expects QEMU to fail every read touching 512-byte sector [`FAULT_SECTOR`] with EIO, e.g. a blkdebug config
//! `[inject-error] event = "read_aio" errno = "5" sector = "4096"` and
//! `-drive file=blkdebug:faults.conf:disk.img,if=none,id=nv0,format=raw`. Reads 64 consecutive 4 KiB blocks around
//! that sector at queue depth 16: exactly the block that holds it must fail, with a decoded NVMe status.
//! Without the injection the test fails ("no fault observed"), so it is opt-in and not part of `all`.

// Details are fixed-size strings returned once per step, as in crate::selftest.
#![allow(clippy::result_large_err)]

use core::fmt::Write;

use drivers::nvme::{Dma, IoOp, IoRequest, Status, PAGE_SIZE};

use super::nvme::{controller, Probe};
use super::selftest::own_queue;
use crate::arch::x86_64::tsc;

type Detail = heapless::String<160>;

macro_rules! detail {
    ($($arg:tt)*) => {{
        let mut d = Detail::new();
        // Overflow only truncates the explanation.
        let _ = write!(d, $($arg)*);
        d
    }};
}

/// The 512-byte sector the emulator is told to fail.
pub const FAULT_SECTOR: u64 = 4096;
const BLOCKS: u64 = 64;
const DEPTH: u64 = 16;

/// Runs the test.
pub fn run() -> Result<Detail, Detail> {
    let dev = match controller() {
        Probe::Absent => return Ok(detail!("skipped: no nvme controller")),
        Probe::Failed(why) => return Err(detail!("bring-up: {why}")),
        Probe::Up(dev) => dev,
    };
    let mut dev = dev.lock();
    let ctrl = &mut dev.ctrl;
    let ns = *ctrl
        .namespaces()
        .first()
        .ok_or_else(|| detail!("no usable namespace"))?;
    let qid = own_queue(ctrl);
    let lba_size = u64::from(ns.lba_size);
    let per_io = (4096 / lba_size).max(1);
    let fault_lba = FAULT_SECTOR * 512 / lba_size;
    // 4 KiB blocks, the faulty one in the middle.
    let first = (fault_lba / per_io).saturating_sub(BLOCKS / 2) * per_io;
    if first + BLOCKS * per_io > ns.blocks {
        return Err(detail!("namespace too small ({} blocks)", ns.blocks));
    }
    let bufs = ctrl
        .hal_mut()
        .alloc_pages(16)
        .ok_or_else(|| detail!("no DMA memory"))?;
    let resets_before = ctrl.stats().resets;
    let blocks = u32::try_from(per_io).unwrap_or(1);
    let (mut issued, mut done, mut failed_block, mut failures) = (0u64, 0u64, None, 0u64);
    let mut status_seen = Status::SUCCESS;
    let start = tsc::uptime_us();
    let mut outcome = Ok(());
    while done < BLOCKS {
        while issued < BLOCKS && issued - done < DEPTH {
            let page = bufs + (issued % 16) * PAGE_SIZE;
            let req = IoRequest::contiguous(
                issued,
                ns.nsid,
                IoOp::Read,
                first + issued * per_io,
                blocks,
                page,
                4096,
            );
            if let Err(r) = ctrl.submit(qid, req) {
                outcome = Err(detail!("submit refused: {:?}", r.error));
                break;
            }
            issued += 1;
        }
        if outcome.is_err() {
            break;
        }
        ctrl.poll(qid, &mut |c| {
            done += 1;
            if !c.status.is_success() {
                failures += 1;
                failed_block = Some(c.tag);
                status_seen = c.status;
            }
        });
        if tsc::uptime_us() - start > 30_000_000 {
            outcome = Err(detail!("only {done} of {BLOCKS} reads completed in 30 s"));
            break;
        }
    }
    // The controller must still serve I/O after the error.
    let after = if outcome.is_ok() {
        let req = IoRequest::contiguous(99, ns.nsid, IoOp::Read, 0, blocks, bufs, 4096);
        let mut ok = None;
        match ctrl.submit(qid, req) {
            Ok(()) => {
                let t = tsc::uptime_us();
                while ok.is_none() && tsc::uptime_us() - t < 5_000_000 {
                    ctrl.poll(qid, &mut |c| ok = Some(c.status.is_success()));
                }
            }
            Err(r) => {
                outcome = Err(detail!(
                    "controller refuses I/O after the fault: {:?}",
                    r.error
                ))
            }
        }
        ok
    } else {
        None
    };
    ctrl.hal_mut().free_pages(bufs, 16);
    outcome?;
    let expected = (fault_lba - first) / per_io;
    let resets = ctrl.stats().resets - resets_before;
    log::info!(
        "nvme-faults: {failures} of {BLOCKS} reads failed (block {failed_block:?}, expected {expected}) with {status_seen}; {resets} controller resets"
    );
    if failures == 0 {
        return Err(detail!(
            "no fault observed: run with a blkdebug drive failing sector {FAULT_SECTOR}"
        ));
    }
    if failures != 1 || failed_block != Some(expected) {
        return Err(detail!(
            "{failures} failures, block {failed_block:?}, expected only block {expected}"
        ));
    }
    if after != Some(true) || resets != 0 {
        return Err(detail!(
            "controller unhealthy after the fault (read ok: {after:?}, resets {resets})"
        ));
    }
    Ok(detail!(
        "sector {FAULT_SECTOR}: 1 of {BLOCKS} reads failed with {status_seen}; others ok, no reset"
    ))
}
