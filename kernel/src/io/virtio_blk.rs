//! virtio-blk to NVMe: a [`BlockBackend`] that sends a guest device's requests to its volume through the IOPS
//! partitioner ([`super::volumes::Engine`]) and completes them back into the guest.
//!
//! Data moves through bounce buffers: guest segments may start anywhere and have any length, while NVMe PRPs
//! need page-aligned pages after the first, so each request gets contiguous DMA pages; writes are gathered from
//! guest memory (through `virt::GuestMemory`, bounds-checked) before submission, reads are scattered back after
//! completion. The copy costs a memcpy per request; it also means the device never DMAs into guest RAM directly,
//! so a guest cannot race the device on its own buffers.
//!
//! Sector mapping: virtio sectors are 512 bytes; on a namespace with larger blocks a request must be block
//! aligned, else it fails with IOERR. Requests above the controller's transfer limit fail with IOERR too.
//! Every request accepted from the device completes exactly once, with the NVMe outcome mapped to OK or IOERR.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;

use drivers::nvme::{Controller, Dma, IoOp, PAGE_SIZE};
use sched::iops::VolumeId;
use virt::virtio::blk::{
    BlkOp, BlkStatus, BlockBackend, BlockRequest, RequestId, Submitted, VirtioBlk, SECTOR,
};
use virt::virtio::queue::Segment;
use virt::GuestMemory;

use super::nvme::KernelHal;
use super::volumes::{Done, Engine};

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

fn copy_segments(
    mem: &mut dyn GuestMemory,
    hal: &mut KernelHal,
    data: &[Segment],
    bounce: u64,
    to_guest: bool,
) -> bool {
    let mut at = bounce;
    for s in data {
        let mut buf = vec![0u8; usize::try_from(s.len).unwrap_or(0)];
        let ok = if to_guest {
            hal.read(at, &mut buf);
            mem.write(s.gpa, &buf).is_ok()
        } else {
            let ok = mem.read(s.gpa, &mut buf).is_ok();
            hal.write(at, &buf);
            ok
        };
        if !ok {
            return false;
        }
        at += u64::from(s.len);
    }
    true
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
            match self.ctrl.hal_mut().alloc_pages(pages) {
                Some(p) => p,
                None => {
                    self.router.refused += 1;
                    return Submitted::Done(BlkStatus::IoErr);
                }
            }
        };
        if op == IoOp::Write && !copy_segments(mem, self.ctrl.hal_mut(), &req.data, bounce, false) {
            self.ctrl.hal_mut().free_pages(bounce, pages);
            return Submitted::Done(BlkStatus::IoErr);
        }
        let page_list: Vec<u64> = (0..u64::try_from(pages).unwrap_or(0))
            .map(|i| bounce + i * PAGE_SIZE)
            .collect();
        let token = self.router.next_token;
        self.router.next_token += 1;
        match self
            .engine
            .enqueue(self.volume, op, lba, blocks, page_list, token, self.now)
        {
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
                if pages > 0 {
                    self.ctrl.hal_mut().free_pages(bounce, pages);
                }
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
            ok = copy_segments(mem, ctrl.hal_mut(), &p.data, p.bounce, true);
        }
        let status = if ok { BlkStatus::Ok } else { BlkStatus::IoErr };
        // A stale id (device reset or broken meanwhile) is ignored by the device and writes nothing.
        dev.complete(mem, p.id, status);
        if p.pages > 0 {
            ctrl.hal_mut().free_pages(p.bounce, p.pages);
        }
    }

    /// Retires one engine result whose device is gone (its VM stopped): frees the bounce buffer and touches no
    /// guest memory. Returns false if the token was not pending.
    pub fn discard(&mut self, done: Done, ctrl: &mut Controller<KernelHal>) -> bool {
        let Some(p) = self.pending.remove(&done.token) else {
            return false;
        };
        if p.pages > 0 {
            ctrl.hal_mut().free_pages(p.bounce, p.pages);
        }
        true
    }

    /// Requests between a device and its completion.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}
