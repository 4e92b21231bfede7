//! virtio-blk to NVMe: a [`BlockBackend`] that sends a guest device's requests to its volume through the IOPS
//! partitioner ([`super::volumes::Engine`]) and completes them back into the guest.
//!
//! Data moves through bounce buffers: guest segments may start anywhere and have any length, while NVMe PRPs
//! need page-aligned pages after the first, so each request gets contiguous DMA pages (single pages come from a
//! small pool, so the common 4 KiB request costs no allocation); writes are gathered from guest memory (through
//! `virt::GuestMemory`, bounds-checked) straight into the bounce buffer before submission, reads are scattered back
//! after completion. The copy costs one memcpy per segment; it also means the device never DMAs into guest RAM
//! directly, so a guest cannot race the device on its own buffers.
//!
//! Sector mapping: virtio sectors are 512 bytes; on a namespace with larger blocks a request must be block
//! aligned, else it fails with IOERR. Requests above the controller's transfer limit fail with IOERR too.
//! Every request accepted from the device completes exactly once, with the NVMe outcome mapped to OK or IOERR.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{compiler_fence, Ordering};

use drivers::nvme::{Controller, Dma, IoOp, PAGE_SIZE};
use sched::iops::VolumeId;
use virt::virtio::blk::{
    BlkOp, BlkStatus, BlockBackend, BlockRequest, RequestId, Submitted, VirtioBlk, SECTOR,
};
use virt::virtio::queue::Segment;
use virt::GuestMemory;

use super::nvme::KernelHal;
use super::volumes::{Done, Engine};
use crate::arch::x86_64::{paging, tsc};

/// A request on its way through the partitioner and the device.
struct Pending {
    device: usize,
    id: RequestId,
    op: BlkOp,
    data: Vec<Segment>,
    bounce: u64,
    pages: usize,
}

/// Requests of all virtio-blk devices that share one engine, keyed by engine token.
#[derive(Default)]
pub struct Router {
    pending: BTreeMap<u64, Pending>,
    next_token: u64,
    /// Requests refused before reaching the partitioner (alignment, size, memory, queue full).
    pub refused: u64,
    /// Bounce copies (writes in, reads out) and the TSC ticks they took, for `CV:IOPROF`.
    pub copies: u64,
    pub copy_ticks: u64,
    /// TSC ticks in `Engine::enqueue` (range check, partitioner enqueue), for `CV:IOPROF`.
    pub enqueue_ticks: u64,
    /// Free single bounce pages.
    pool: Vec<u64>,
}

/// The backend one device uses for one submission (borrows the shared engine and controller).
pub struct VolumeBackend<'a> {
    /// Shared engine.
    pub engine: &'a mut Engine,
    /// Controller (DMA memory for bounce buffers).
    pub ctrl: &'a mut Controller<KernelHal>,
    /// Shared request table.
    pub router: &'a mut Router,
    /// The device's index (for completions).
    pub device: usize,
    /// Its volume.
    pub volume: VolumeId,
    /// Logical block size of the volume's namespace.
    pub lba_size: u64,
    /// Now, in nanoseconds.
    pub now: u64,
}

/// Copies a request's data between guest memory and its bounce buffer, directly (one memcpy per segment).
/// The caller guarantees the bounce buffer holds at least the segments' total and that the device is not
/// using it (before submission, or after the completion was reaped).
fn copy_segments(mem: &mut dyn GuestMemory, data: &[Segment], bounce: u64, to_guest: bool) -> bool {
    let mut at = bounce;
    compiler_fence(Ordering::SeqCst);
    for s in data {
        let len = usize::try_from(s.len).unwrap_or(0);
        // SAFETY: `at..at + len` lies inside this request's bounce allocation (pages * 4 KiB >= the segments'
        // total, see `submit`), which only this request owns, reached through the direct map; the device does
        // not access it now (contract above), so no other reference to these bytes exists.
        let dma = unsafe { core::slice::from_raw_parts_mut(paging::phys_to_virt(at), len) };
        let ok = if to_guest {
            mem.write(s.gpa, dma).is_ok()
        } else {
            mem.read(s.gpa, dma).is_ok()
        };
        if !ok {
            return false;
        }
        at += u64::from(s.len);
    }
    compiler_fence(Ordering::SeqCst);
    true
}

/// Single bounce pages kept for reuse (most requests are one page): at most this many.
const POOL_PAGES: usize = 256;

impl Router {
    /// [`copy_segments`], counted and timed.
    fn timed_copy(
        &mut self,
        mem: &mut dyn GuestMemory,
        data: &[Segment],
        bounce: u64,
        to_guest: bool,
    ) -> bool {
        let t0 = tsc::rdtsc();
        let ok = copy_segments(mem, data, bounce, to_guest);
        self.copies += 1;
        self.copy_ticks += tsc::rdtsc().saturating_sub(t0);
        ok
    }

    /// `pages` contiguous DMA pages for a bounce buffer: a pooled page for one, else from the allocator. Pooled
    /// pages are not zeroed: a request's bytes are always fully written (by the guest's data before a write, by
    /// the device before a read's data is copied back) and nothing else of the page reaches a guest.
    fn alloc_bounce(&mut self, ctrl: &mut Controller<KernelHal>, pages: usize) -> Option<u64> {
        if pages == 1 {
            if let Some(p) = self.pool.pop() {
                return Some(p);
            }
        }
        ctrl.hal_mut().alloc_pages(pages)
    }

    fn free_bounce(&mut self, ctrl: &mut Controller<KernelHal>, phys: u64, pages: usize) {
        if pages == 1 && self.pool.len() < POOL_PAGES {
            self.pool.push(phys);
        } else if pages > 0 {
            ctrl.hal_mut().free_pages(phys, pages);
        }
    }
}

impl BlockBackend for VolumeBackend<'_> {
    fn submit(&mut self, mem: &mut dyn GuestMemory, req: BlockRequest) -> Submitted {
        let bytes = req.bytes();
        let op = match req.op {
            BlkOp::Read => IoOp::Read,
            BlkOp::Write => IoOp::Write,
            BlkOp::Flush => IoOp::Flush,
        };
        let (lba, blocks) = if op == IoOp::Flush {
            (0, 0)
        } else {
            let start = req.sector * SECTOR;
            if !start.is_multiple_of(self.lba_size)
                || !bytes.is_multiple_of(self.lba_size)
                || bytes > self.ctrl.max_transfer_bytes()
            {
                self.router.refused += 1;
                return Submitted::Done(BlkStatus::IoErr);
            }
            (
                start / self.lba_size,
                u32::try_from(bytes / self.lba_size).unwrap_or(u32::MAX),
            )
        };
        let pages = usize::try_from(bytes.div_ceil(PAGE_SIZE)).unwrap_or(usize::MAX);
        let bounce = if pages == 0 {
            0
        } else {
            match self.router.alloc_bounce(self.ctrl, pages) {
                Some(p) => p,
                None => {
                    self.router.refused += 1;
                    return Submitted::Done(BlkStatus::IoErr);
                }
            }
        };
        if op == IoOp::Write && !self.router.timed_copy(mem, &req.data, bounce, false) {
            self.router.free_bounce(self.ctrl, bounce, pages);
            return Submitted::Done(BlkStatus::IoErr);
        }
        let page_list: Vec<u64> = (0..u64::try_from(pages).unwrap_or(0))
            .map(|i| bounce + i * PAGE_SIZE)
            .collect();
        let token = self.router.next_token;
        self.router.next_token += 1;
        let t0 = tsc::rdtsc();
        let queued = self
            .engine
            .enqueue(self.volume, op, lba, blocks, page_list, token, self.now);
        self.router.enqueue_ticks += tsc::rdtsc().saturating_sub(t0);
        match queued {
            Ok(()) => {
                self.router.pending.insert(
                    token,
                    Pending {
                        device: self.device,
                        id: req.id,
                        op: req.op,
                        data: req.data,
                        bounce,
                        pages,
                    },
                );
                Submitted::Pending
            }
            Err(_) => {
                self.router.free_bounce(self.ctrl, bounce, pages);
                self.router.refused += 1;
                Submitted::Done(BlkStatus::IoErr)
            }
        }
    }
}

impl Router {
    /// The device index a token belongs to (so the caller can hand [`Router::finish`] that device and memory).
    pub fn device_of(&self, token: u64) -> Option<usize> {
        self.pending.get(&token).map(|p| p.device)
    }

    /// Completes one engine result into its device (`dev`, with its guest's memory `mem`): scatters read data,
    /// frees the bounce buffer, answers the guest.
    pub fn finish(
        &mut self,
        done: Done,
        ctrl: &mut Controller<KernelHal>,
        dev: &mut VirtioBlk,
        mem: &mut dyn GuestMemory,
    ) {
        let Some(p) = self.pending.remove(&done.token) else {
            return;
        };
        let mut ok = done.status.is_success();
        if ok && p.op == BlkOp::Read {
            ok = self.timed_copy(mem, &p.data, p.bounce, true);
        }
        let status = if ok { BlkStatus::Ok } else { BlkStatus::IoErr };
        // A stale id (device reset or broken meanwhile) is ignored by the device and writes nothing.
        dev.complete(mem, p.id, status);
        self.free_bounce(ctrl, p.bounce, p.pages);
    }

    /// Retires one engine result whose device is gone (its VM stopped): frees the bounce buffer and touches no
    /// guest memory. Returns false if the token was not pending.
    pub fn discard(&mut self, done: Done, ctrl: &mut Controller<KernelHal>) -> bool {
        let Some(p) = self.pending.remove(&done.token) else {
            return false;
        };
        self.free_bounce(ctrl, p.bounce, p.pages);
        true
    }

    /// Requests between a device and its completion.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}
