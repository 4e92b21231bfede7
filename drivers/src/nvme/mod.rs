//! NVMe driver (NVM Express Base Specification 1.4 / 2.0, NVM Command Set 1.0): controller reset and enable,
//! admin queue, identify, queue count negotiation, one I/O queue pair per CPU, PRP lists, polled completions,
//! timeouts with abort then controller reset and requeue.
//!
//! # Design
//! Hardware is reached through three small traits so all queue logic runs on the host against a fake controller:
//! [`Mmio`] (BAR0 registers), [`Dma`] (physically contiguous, device-visible pages, read and written by physical
//! address) and [`Clock`] (microseconds, for timeouts). The kernel implements them with uncached MMIO mappings, the
//! frame allocator plus the direct map, and the TSC.
//!
//! [`Controller`] owns the admin queue (used synchronously: one admin command in flight at a time, which is all
//! bring-up, abort and recovery need) and the I/O queue pairs. I/O is asynchronous: [`Controller::submit`] stages
//! a command in a queue's SQ; [`Controller::poll`] (or [`Controller::flush`]) rings the tail doorbell once for
//! everything staged, reaps completions by phase tag (spec 2.0 section 4.2.4, "Phase Tag") and hands each to the
//! caller as a [`Completion`] carrying the caller's tag. Doorbells are batched because each one is an MMIO write
//! (an exit under emulation); the CQ head doorbell is written once a quarter of the ring is consumed, or earlier
//! when the controller's view of free CQ space could fall short of the outstanding commands.
//!
//! # Polling rather than MSI-X
//! Completions are polled. The hypervisor's I/O path already runs from the per-CPU loop that asks the IOPS
//! partitioner what to dispatch next, so it is on the CPU when completions matter; polling the owning queue there
//! costs one cache-line read of DMA memory per check, whereas an MSI-X interrupt costs an interrupt entry and exit
//! (and, in a VM exit storm, interference with the scheduler's timing) per batch. Polling also keeps completions on
//! the CPU that owns the queue without interrupt steering, and makes the driver testable synchronously. The price is
//! latency bounded by the poll interval; the run loop polls on every exit and tick. Interrupts are masked (IEN=0
//! when the completion queues are created), so no vector needs to be set up.
//!
//! # Invariants
//! - Each I/O queue has `entries` slots and at most `entries - 1` commands in flight, so neither its SQ nor its
//!   CQ can overflow (spec 2.0 section 3.3.1.5: a queue is full when tail + 1 == head).
//! - The CID of an I/O command is the index of its slot; a slot is free again only when its completion was
//!   reaped or the request was moved elsewhere by recovery.
//! - Every request accepted by `submit` produces exactly one [`Completion`] (success, device status, or a
//!   driver-synthesised [`Status::TIMED_OUT`] / [`Status::CONTROLLER_FAILED`]); `submit` that refuses a request
//!   gives it back in [`Rejected`]. Nothing is silently dropped.
//! - Timeouts: a command past its deadline is aborted (Abort, spec 2.0 section 5.1); if it is still outstanding
//!   one more timeout later, or the controller reports fatal status (CSTS.CFS), the controller is reset and every
//!   outstanding command is re-issued (up to `max_retries` times each; then it completes with TIMED_OUT). If the
//!   reset fails, all outstanding commands complete with CONTROLLER_FAILED and the controller refuses new ones.

mod command;
mod controller;
mod identify;
mod regs;

pub use command::{admin, cns, feature, io, Cqe, Sqe, Status, StatusType};
pub use controller::{Controller, Stats};
pub use identify::{ControllerInfo, Namespace, Text, IDENTIFY_BYTES};
pub use regs::{cq_head_doorbell, offset, sq_tail_doorbell};
pub use regs::{Aqa, Cap, Cc, Csts, Version};

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use alloc::vec::Vec;

/// The memory page size the driver programs (CC.MPS = 0).
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] as a buffer length.
pub const PAGE_BYTES: usize = 4096;
/// PRP entries per list page; the driver keeps one list page per command slot (no chaining), so a transfer covers
/// at most this many pages plus the one PRP1 names.
pub const PRP_LIST_ENTRIES: usize = 512;

/// 32- and 64-bit access to the controller's BAR0 registers.
pub trait Mmio {
    /// Reads the 32-bit register at byte offset `off`.
    fn read32(&mut self, off: usize) -> u32;
    /// Writes the 32-bit register at byte offset `off`.
    fn write32(&mut self, off: usize, value: u32);
    /// Reads a 64-bit register as two 32-bit reads, low dword first (allowed by spec 2.0 section 3.1.3).
    fn read64(&mut self, off: usize) -> u64 {
        u64::from(self.read32(off)) | (u64::from(self.read32(off + 4)) << 32)
    }
    /// Writes a 64-bit register as two 32-bit writes, low dword first.
    fn write64(&mut self, off: usize, value: u64) {
        self.write32(off, (value & 0xFFFF_FFFF) as u32);
        self.write32(off + 4, (value >> 32) as u32);
    }
}

/// Device-visible memory: physically contiguous, page-aligned, zeroed pages addressed by physical address.
pub trait Dma {
    /// Allocates `count` contiguous zeroed pages; their physical address, or `None` when memory is exhausted.
    fn alloc_pages(&mut self, count: usize) -> Option<u64>;
    /// Returns pages obtained from [`Dma::alloc_pages`] with the same `count`.
    fn free_pages(&mut self, phys: u64, count: usize);
    /// Copies `buf.len()` bytes at physical `phys` into `buf` (the range lies within one allocation).
    fn read(&mut self, phys: u64, buf: &mut [u8]);
    /// Copies `data` to physical `phys` (the range lies within one allocation).
    fn write(&mut self, phys: u64, data: &[u8]);
}

/// Monotonic time in microseconds.
pub trait Clock {
    /// Now.
    fn now_us(&mut self) -> u64;
}

/// Everything the driver needs from the platform.
pub trait Hal: Mmio + Dma + Clock {}
impl<T: Mmio + Dma + Clock> Hal for T {}

/// Driver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Admin queue entries (2..=64: one page).
    pub admin_entries: u16,
    /// Entries per I/O queue (2..=256), further limited by CAP.MQES.
    pub io_entries: u16,
    /// I/O queue pairs wanted (one per CPU); the controller may grant fewer.
    pub io_queue_pairs: u16,
    /// Time an I/O command may be outstanding before it is aborted, and again before the controller is reset.
    pub io_timeout_us: u64,
    /// Time an admin command may take before the controller is considered hung.
    pub admin_timeout_us: u64,
    /// Least time between two health checks of a queue (CSTS read and deadline scan) while commands are
    /// outstanding; bounds how late a timeout or fatal status is noticed.
    pub health_interval_us: u64,
    /// How often an I/O request is re-issued after controller resets before it fails with TIMED_OUT.
    pub max_retries: u8,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            admin_entries: 32,
            io_entries: 64,
            io_queue_pairs: 1,
            io_timeout_us: 2_000_000,
            admin_timeout_us: 2_000_000,
            health_interval_us: 1_000,
            max_retries: 2,
        }
    }
}

/// What an I/O request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Read blocks into the buffer.
    Read,
    /// Write blocks from the buffer.
    Write,
    /// Flush the volatile write cache (no data, no LBA range).
    Flush,
}

/// One I/O request. `pages` are page-aligned physical addresses of the data buffer, in order, exactly
/// `ceil(blocks * lba_size / 4096)` of them (empty for a flush).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoRequest {
    /// Caller's identifier, returned in the completion.
    pub tag: u64,
    /// Namespace.
    pub nsid: u32,
    /// Operation.
    pub op: IoOp,
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks (1..=65536; ignored for flush).
    pub blocks: u32,
    /// Buffer pages.
    pub pages: Vec<u64>,
}

impl IoRequest {
    /// A read or write over a physically contiguous buffer starting at page-aligned `phys`.
    pub fn contiguous(
        tag: u64,
        nsid: u32,
        op: IoOp,
        lba: u64,
        blocks: u32,
        phys: u64,
        bytes: u64,
    ) -> Self {
        let n = bytes.div_ceil(PAGE_SIZE);
        Self {
            tag,
            nsid,
            op,
            lba,
            blocks,
            pages: (0..n).map(|i| phys + i * PAGE_SIZE).collect(),
        }
    }
}

/// The outcome of one accepted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// Device or driver status.
    pub status: Status,
    /// How many times the request was re-issued after controller resets.
    pub retries: u8,
}

/// Errors of bring-up, admin commands and request validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmeError {
    /// The controller lacks something the driver needs.
    Unsupported(&'static str),
    /// CSTS.RDY did not clear within CAP.TO after CC.EN was cleared.
    DisableTimeout,
    /// CSTS.RDY did not set within CAP.TO after CC.EN was set.
    EnableTimeout,
    /// The controller reports fatal status (CSTS.CFS) or reads as all ones.
    Fatal,
    /// An admin command did not complete in time.
    AdminTimeout {
        /// Its opcode.
        opcode: u8,
    },
    /// An admin command failed.
    AdminFailed {
        /// Its opcode.
        opcode: u8,
        /// The status it completed with.
        status: Status,
    },
    /// An Identify structure is malformed.
    BadIdentify(&'static str),
    /// No DMA memory for queues or buffers.
    OutOfDmaMemory,
    /// The controller granted no I/O queues.
    NoIoQueues,
    /// No such I/O queue.
    BadQueue(u16),
    /// The queue has no free slot; poll it and retry.
    QueueFull,
    /// No such active namespace.
    UnknownNamespace(u32),
    /// The block range leaves the namespace, or is empty or over 65536 blocks.
    OutOfRange {
        /// First block.
        lba: u64,
        /// Block count.
        blocks: u32,
        /// Namespace size in blocks.
        size: u64,
    },
    /// The page list does not match the transfer length, or a page is not aligned.
    BadBuffer,
    /// The transfer exceeds MDTS or one PRP list page.
    TooLarge {
        /// Requested bytes.
        bytes: u64,
        /// Largest accepted.
        max: u64,
    },
    /// The controller failed and could not be reset; it accepts no more commands.
    Failed,
}

/// A request `submit` did not accept, given back with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Why.
    pub error: NvmeError,
    /// The request, untouched.
    pub request: IoRequest,
}
