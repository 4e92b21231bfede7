//! The NVMe controller: bring-up (spec 2.0 section 3.5.1 "Memory-based Controller Initialization"), synchronous
//! admin commands, asynchronous I/O queue pairs with polled completion, and recovery.
//!
//! Recovery order: abort a timed-out command (Abort, section 5.1); one more timeout later, or on CSTS.CFS
//! (section 9.5, "Controller Fatal Status Condition"), reset the controller (CC.EN 1 -> 0, wait CSTS.RDY = 0,
//! re-initialise) and re-issue every command that was outstanding, oldest first, on the same queue. The ring
//! memory is reused; the queues are re-created with the same identifiers.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use super::command::{admin, cns, feature, io, Cqe, Sqe, Status};
use super::identify::{parse_active_list, ControllerInfo, Namespace, IDENTIFY_BYTES};
use super::regs::{cq_head_doorbell, offset, sq_tail_doorbell, Aqa, Cap, Cc, Csts, Version};
use super::{
    Completion, Config, Hal, IoOp, IoRequest, NvmeError, Rejected, PAGE_SIZE, PRP_LIST_ENTRIES,
};

const SQE_BYTES: u64 = 64;
const CQE_BYTES: u64 = 16;
/// Largest I/O queue this driver creates (its SQ spans 4 pages).
const MAX_IO_ENTRIES: u16 = 256;
/// Most active namespaces the driver takes from one Active Namespace ID list.
const MAX_NAMESPACES: usize = 1024;

/// Counters for telemetry and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands submitted (I/O), including re-issues.
    pub submitted: u64,
    /// Completions delivered (I/O).
    pub completed: u64,
    /// Aborts sent for timed-out commands.
    pub aborts: u64,
    /// Controller resets after bring-up.
    pub resets: u64,
    /// Commands re-issued after a reset.
    pub requeued: u64,
    /// Times CSTS.CFS was seen.
    pub fatal_events: u64,
    /// Completion entries whose CID matched no outstanding command (ignored).
    pub spurious: u64,
}

/// A submission/completion ring pair.
struct Ring {
    qid: u16,
    entries: u16,
    sq: u64,
    cq: u64,
    tail: u16,
    head: u16,
    phase: bool,
    /// The tail doorbell holds `tail` (no staged entries).
    rung: bool,
    /// Completion entries consumed since the head doorbell was last written.
    unacked: u16,
    sq_db: usize,
    cq_db: usize,
}

impl Ring {
    fn new(qid: u16, entries: u16, sq: u64, cq: u64, stride: usize) -> Self {
        Self {
            qid,
            entries,
            sq,
            cq,
            tail: 0,
            head: 0,
            phase: true,
            rung: true,
            unacked: 0,
            sq_db: sq_tail_doorbell(qid, stride),
            cq_db: cq_head_doorbell(qid, stride),
        }
    }

    fn sq_pages(&self) -> usize {
        pages_for(u64::from(self.entries) * SQE_BYTES)
    }

    fn cq_pages(&self) -> usize {
        pages_for(u64::from(self.entries) * CQE_BYTES)
    }

    /// Zeroes both rings and returns to the power-on pointers (phase 1 expected first).
    fn clear<H: Hal>(&mut self, hal: &mut H) {
        zero(hal, self.sq, self.sq_pages());
        zero(hal, self.cq, self.cq_pages());
        self.tail = 0;
        self.head = 0;
        self.phase = true;
        self.rung = true;
        self.unacked = 0;
    }

    /// Writes `sqe` at the tail without telling the controller (see [`Ring::ring`]).
    fn stage<H: Hal>(&mut self, hal: &mut H, sqe: &Sqe) {
        hal.write(self.sq + u64::from(self.tail) * SQE_BYTES, &sqe.to_bytes());
        self.tail = (self.tail + 1) % self.entries;
        self.rung = false;
    }

    /// Publishes staged entries: one tail doorbell write for any number of them.
    fn ring<H: Hal>(&mut self, hal: &mut H) {
        if !self.rung {
            hal.write32(self.sq_db, u32::from(self.tail));
            self.rung = true;
        }
    }

    /// Writes `sqe` at the tail and rings the doorbell.
    fn push<H: Hal>(&mut self, hal: &mut H, sqe: &Sqe) {
        self.stage(hal, sqe);
        self.ring(hal);
    }

    /// Takes the next completion if its phase tag says the controller has posted it.
    fn pop<H: Hal>(&mut self, hal: &mut H) -> Option<Cqe> {
        let mut b = [0u8; 16];
        hal.read(self.cq + u64::from(self.head) * CQE_BYTES, &mut b);
        let cqe = Cqe::from_bytes(&b);
        if cqe.phase() != self.phase {
            return None;
        }
        self.head += 1;
        self.unacked += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        Some(cqe)
    }

    /// Tells the controller which completion entries are consumed.
    fn ack<H: Hal>(&mut self, hal: &mut H) {
        hal.write32(self.cq_db, u32::from(self.head));
        self.unacked = 0;
    }
}

/// Zeroes `pages` pages at `phys` through a small buffer (kernel stacks are small; no 4 KiB arrays on them).
fn zero<H: Hal>(hal: &mut H, phys: u64, pages: usize) {
    const CHUNK: usize = 256;
    let zeros = [0u8; CHUNK];
    let bytes = u64::try_from(pages).unwrap_or(0) * PAGE_SIZE;
    let mut at = 0;
    while at < bytes {
        hal.write(phys + at, &zeros);
        at += CHUNK as u64;
    }
}

fn pages_for(bytes: u64) -> usize {
    usize::try_from(bytes.div_ceil(PAGE_SIZE)).unwrap_or(usize::MAX)
}

/// An outstanding I/O command.
struct Inflight {
    req: IoRequest,
    deadline: u64,
    abort_sent: bool,
    seq: u64,
    retries: u8,
}

/// An I/O queue pair with its command slots.
struct IoQueue {
    ring: Ring,
    /// Slot `cid` holds the command with that CID.
    slots: Vec<Option<Inflight>>,
    /// Free CIDs (LIFO keeps hot slots hot).
    free: Vec<u16>,
    /// One PRP list page per slot.
    prp_lists: u64,
    /// Completions synthesised by recovery, delivered by the next poll of this queue.
    ready: VecDeque<Completion>,
    /// Clock value at which the next health check (CSTS, deadlines) is due.
    next_check: u64,
}

impl IoQueue {
    fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// A running NVMe controller.
pub struct Controller<H: Hal> {
    pub(super) hal: H,
    cfg: Config,
    cap: Cap,
    version: Version,
    stride: usize,
    admin: Ring,
    admin_cid: u16,
    identify_page: u64,
    info: ControllerInfo,
    namespaces: Vec<Namespace>,
    queues: Vec<IoQueue>,
    max_transfer: u64,
    failed: bool,
    seq: u64,
    stats: Stats,
}

impl<H: Hal> Controller<H> {
    /// Resets the controller and brings it up: admin queue, identify, namespaces, I/O queue pairs.
    /// On error the DMA memory taken so far is returned to `hal` and the controller is left disabled or untouched.
    pub fn new(mut hal: H, cfg: Config) -> Result<Self, (NvmeError, H)> {
        let cap = Cap(hal.read64(offset::CAP));
        let version = Version(hal.read32(offset::VS));
        if cap.0 == u64::MAX {
            return Err((NvmeError::Fatal, hal));
        }
        if !cap.supports_nvm() {
            return Err((NvmeError::Unsupported("NVM command set"), hal));
        }
        if cap.min_page_size() > PAGE_SIZE || cap.max_page_size() < PAGE_SIZE {
            return Err((NvmeError::Unsupported("4 KiB memory pages"), hal));
        }
        let mqes = cap.max_queue_entries().min(4096) as u16;
        let admin_entries = cfg.admin_entries.clamp(2, 64).min(mqes);
        let Some(asq) = hal.alloc_pages(1) else {
            return Err((NvmeError::OutOfDmaMemory, hal));
        };
        let Some(acq) = hal.alloc_pages(1) else {
            hal.free_pages(asq, 1);
            return Err((NvmeError::OutOfDmaMemory, hal));
        };
        let Some(identify_page) = hal.alloc_pages(1) else {
            hal.free_pages(asq, 1);
            hal.free_pages(acq, 1);
            return Err((NvmeError::OutOfDmaMemory, hal));
        };
        let stride = cap.doorbell_stride_bytes();
        let mut c = Self {
            hal,
            cfg,
            cap,
            version,
            stride,
            admin: Ring::new(0, admin_entries, asq, acq, stride),
            admin_cid: 0,
            identify_page,
            info: blank_info(),
            namespaces: Vec::new(),
            queues: Vec::new(),
            max_transfer: 0,
            failed: false,
            seq: 0,
            stats: Stats::default(),
        };
        match c.bring_up() {
            Ok(()) => Ok(c),
            Err(e) => {
                // Leave the controller disabled (best effort) and give the memory back.
                let cc = Cc(c.hal.read32(offset::CC));
                c.hal.write32(offset::CC, cc.0 & !Cc::EN);
                c.release_memory();
                Err((e, c.hal))
            }
        }
    }

    fn release_memory(&mut self) {
        for q in core::mem::take(&mut self.queues) {
            let (sq, sqp, cq, cqp) = (q.ring.sq, q.ring.sq_pages(), q.ring.cq, q.ring.cq_pages());
            self.hal.free_pages(sq, sqp);
            self.hal.free_pages(cq, cqp);
            self.hal.free_pages(q.prp_lists, q.slots.len());
        }
        self.hal.free_pages(self.admin.sq, 1);
        self.hal.free_pages(self.admin.cq, 1);
        self.hal.free_pages(self.identify_page, 1);
    }

    fn bring_up(&mut self) -> Result<(), NvmeError> {
        self.reset_and_enable()?;
        let b = self.identify(cns::CONTROLLER, 0)?;
        self.info = ControllerInfo::parse(&b)?;
        let limit = (PRP_LIST_ENTRIES as u64 + 1) * PAGE_SIZE;
        self.max_transfer = self
            .info
            .max_transfer_bytes(self.cap.min_page_size())
            .map_or(limit, |m| m.min(limit));
        self.scan_namespaces()?;
        let granted = self.set_queue_count(self.cfg.io_queue_pairs.max(1))?;
        let mqes = u16::try_from(self.cap.max_queue_entries()).unwrap_or(MAX_IO_ENTRIES);
        let entries = self.cfg.io_entries.clamp(2, MAX_IO_ENTRIES).min(mqes);
        for i in 0..granted {
            let q = self.alloc_queue(i + 1, entries)?;
            self.queues.push(q);
            self.create_queue(usize::from(i))?;
        }
        Ok(())
    }

    fn alloc_queue(&mut self, qid: u16, entries: u16) -> Result<IoQueue, NvmeError> {
        let sq_pages = pages_for(u64::from(entries) * SQE_BYTES);
        let cq_pages = pages_for(u64::from(entries) * CQE_BYTES);
        let slots = usize::from(entries - 1);
        let cids = entries - 1;
        let sq = self
            .hal
            .alloc_pages(sq_pages)
            .ok_or(NvmeError::OutOfDmaMemory)?;
        let Some(cq) = self.hal.alloc_pages(cq_pages) else {
            self.hal.free_pages(sq, sq_pages);
            return Err(NvmeError::OutOfDmaMemory);
        };
        let Some(prp_lists) = self.hal.alloc_pages(slots) else {
            self.hal.free_pages(sq, sq_pages);
            self.hal.free_pages(cq, cq_pages);
            return Err(NvmeError::OutOfDmaMemory);
        };
        Ok(IoQueue {
            ring: Ring::new(qid, entries, sq, cq, self.stride),
            slots: (0..slots).map(|_| None).collect(),
            free: (0..cids).rev().collect(),
            prp_lists,
            ready: VecDeque::new(),
            next_check: 0,
        })
    }

    /// Creates queue `index`'s CQ then SQ (spec 2.0 sections 5.4 and 5.5), polled (IEN=0), contiguous (PC=1).
    fn create_queue(&mut self, index: usize) -> Result<(), NvmeError> {
        let q = &mut self.queues[index].ring;
        q.clear(&mut self.hal);
        let (qid, size, sq, cq) = (q.qid, u32::from(q.entries - 1), q.sq, q.cq);
        let dw10 = (size << 16) | u32::from(qid);
        self.admin_command(
            Sqe::new(admin::CREATE_IO_CQ, 0)
                .with_prps(cq, 0)
                .with_cdw(10, dw10)
                .with_cdw(11, 1),
        )?;
        self.admin_command(
            Sqe::new(admin::CREATE_IO_SQ, 0)
                .with_prps(sq, 0)
                .with_cdw(10, dw10)
                .with_cdw(11, (u32::from(qid) << 16) | 1),
        )?;
        Ok(())
    }

    /// Waits up to `timeout_us` for `cond` on CSTS; `Err(Fatal)` if CFS appears first.
    fn wait_csts(
        &mut self,
        timeout_us: u64,
        cond: impl Fn(Csts) -> bool,
    ) -> Result<bool, NvmeError> {
        let start = self.hal.now_us();
        loop {
            let csts = Csts(self.hal.read32(offset::CSTS));
            if csts.0 == u32::MAX {
                return Err(NvmeError::Fatal);
            }
            if cond(csts) {
                return Ok(true);
            }
            if self.hal.now_us().saturating_sub(start) > timeout_us {
                return Ok(false);
            }
            core::hint::spin_loop();
        }
    }

    /// Disables the controller (CC.EN = 0, wait CSTS.RDY = 0 within CAP.TO: firmware such as SeaBIOS may leave it
    /// enabled), programs the admin queue (AQA/ASQ/ACQ) and enables it with [`Cc::enabled_config`]
    /// (spec 2.0 section 3.5.1 steps 1-7).
    fn reset_and_enable(&mut self) -> Result<(), NvmeError> {
        // CAP.TO of zero would make every wait fail at once; allow at least 500 ms.
        let timeout = self.cap.timeout_us().max(500_000);
        let cc = Cc(self.hal.read32(offset::CC));
        if cc.enabled() {
            self.hal.write32(offset::CC, cc.0 & !Cc::EN);
        }
        // While disabling, CFS may stay set until the reset completes: only RDY matters here.
        if !self.wait_csts(timeout, |s| !s.ready())? {
            return Err(NvmeError::DisableTimeout);
        }
        self.admin.clear(&mut self.hal);
        self.admin_cid = 0;
        self.hal.write32(offset::INTMS, u32::MAX);
        self.hal
            .write32(offset::AQA, Aqa::new(self.admin.entries).0);
        self.hal.write64(offset::ASQ, self.admin.sq);
        self.hal.write64(offset::ACQ, self.admin.cq);
        self.hal.write32(offset::CC, Cc::enabled_config().0);
        if !self.wait_csts(timeout, |s| s.ready() || s.fatal())? {
            return Err(NvmeError::EnableTimeout);
        }
        if Csts(self.hal.read32(offset::CSTS)).fatal() {
            return Err(NvmeError::Fatal);
        }
        Ok(())
    }

    /// Submits one admin command and waits for its completion (admin commands are serialised).
    fn admin_command(&mut self, mut sqe: Sqe) -> Result<Cqe, NvmeError> {
        let opcode = sqe.opcode();
        self.admin_cid = self.admin_cid.wrapping_add(1);
        let cid = self.admin_cid;
        sqe.set_cid(cid);
        self.admin.push(&mut self.hal, &sqe);
        let start = self.hal.now_us();
        loop {
            if let Some(cqe) = self.admin.pop(&mut self.hal) {
                self.admin.ack(&mut self.hal);
                if cqe.cid() != cid {
                    // A late completion of an earlier admin command that timed out: skip it.
                    self.stats.spurious += 1;
                    continue;
                }
                let status = cqe.status();
                if !status.is_success() {
                    return Err(NvmeError::AdminFailed { opcode, status });
                }
                return Ok(cqe);
            }
            if self.hal.now_us().saturating_sub(start) > self.cfg.admin_timeout_us {
                if Csts(self.hal.read32(offset::CSTS)).fatal() {
                    return Err(NvmeError::Fatal);
                }
                return Err(NvmeError::AdminTimeout { opcode });
            }
            core::hint::spin_loop();
        }
    }

    fn identify(&mut self, cns: u32, nsid: u32) -> Result<Vec<u8>, NvmeError> {
        zero(&mut self.hal, self.identify_page, 1);
        self.admin_command(
            Sqe::new(admin::IDENTIFY, 0)
                .with_nsid(nsid)
                .with_prps(self.identify_page, 0)
                .with_cdw(10, cns),
        )?;
        let mut b = vec![0u8; IDENTIFY_BYTES];
        self.hal.read(self.identify_page, &mut b);
        Ok(b)
    }

    fn scan_namespaces(&mut self) -> Result<(), NvmeError> {
        let list = self.identify(cns::ACTIVE_NAMESPACES, 0)?;
        let mut ids = Vec::new();
        parse_active_list(&list, &mut ids)?;
        ids.truncate(MAX_NAMESPACES);
        self.namespaces.clear();
        for nsid in ids {
            let b = self.identify(cns::NAMESPACE, nsid)?;
            if let Some(ns) = Namespace::parse(nsid, &b)? {
                // Formats with metadata need a metadata pointer this driver does not provide.
                if ns.metadata == 0 {
                    self.namespaces.push(ns);
                }
            }
        }
        Ok(())
    }

    /// Set Features / Number of Queues (spec 2.0 section 5.27.1.5); returns the pairs granted (<= wanted).
    fn set_queue_count(&mut self, wanted: u16) -> Result<u16, NvmeError> {
        let z = u32::from(wanted - 1);
        let cqe = self.admin_command(
            Sqe::new(admin::SET_FEATURES, 0)
                .with_cdw(10, feature::NUMBER_OF_QUEUES)
                .with_cdw(11, (z << 16) | z),
        )?;
        let nsqa = (cqe.dw0() & 0xFFFF) + 1;
        let ncqa = (cqe.dw0() >> 16) + 1;
        let granted = u16::try_from(nsqa.min(ncqa))
            .unwrap_or(u16::MAX)
            .min(wanted);
        if granted == 0 {
            return Err(NvmeError::NoIoQueues);
        }
        Ok(granted)
    }

    /// Identify Controller data.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }
    /// Controller capabilities.
    pub fn capabilities(&self) -> Cap {
        self.cap
    }
    /// NVMe version the controller reports.
    pub fn version(&self) -> Version {
        self.version
    }
    /// Active namespaces without metadata, ascending by NSID.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }
    /// Number of I/O queue pairs (queue ids 1..=n).
    pub fn io_queues(&self) -> u16 {
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }
    /// Commands a queue holds at once.
    pub fn queue_capacity(&self) -> usize {
        self.queues.first().map_or(0, |q| q.slots.len())
    }
    /// Largest transfer accepted, in bytes.
    pub fn max_transfer_bytes(&self) -> u64 {
        self.max_transfer
    }
    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// Whether the controller failed for good.
    pub fn is_failed(&self) -> bool {
        self.failed
    }
    /// Commands outstanding on queue `qid`.
    pub fn outstanding(&self, qid: u16) -> usize {
        self.queue_index(qid).map_or(0, |i| {
            self.queues[i].outstanding() + self.queues[i].ready.len()
        })
    }
    /// The platform access, for the owner's use between commands (e.g. the fake in tests).
    pub fn hal_mut(&mut self) -> &mut H {
        &mut self.hal
    }

    fn queue_index(&self, qid: u16) -> Option<usize> {
        let i = usize::from(qid).checked_sub(1)?;
        (i < self.queues.len()).then_some(i)
    }

    fn validate(&self, req: &IoRequest) -> Result<(), NvmeError> {
        let ns = self
            .namespaces
            .iter()
            .find(|n| n.nsid == req.nsid)
            .ok_or(NvmeError::UnknownNamespace(req.nsid))?;
        if req.op == IoOp::Flush {
            return if req.pages.is_empty() {
                Ok(())
            } else {
                Err(NvmeError::BadBuffer)
            };
        }
        let in_range = req
            .lba
            .checked_add(u64::from(req.blocks))
            .is_some_and(|end| end <= ns.blocks);
        if req.blocks == 0 || req.blocks > 65536 || !in_range {
            return Err(NvmeError::OutOfRange {
                lba: req.lba,
                blocks: req.blocks,
                size: ns.blocks,
            });
        }
        let bytes = u64::from(req.blocks) * u64::from(ns.lba_size);
        if bytes > self.max_transfer {
            return Err(NvmeError::TooLarge {
                bytes,
                max: self.max_transfer,
            });
        }
        let pages_needed = usize::try_from(bytes.div_ceil(PAGE_SIZE)).unwrap_or(usize::MAX);
        if req.pages.len() != pages_needed || req.pages.iter().any(|p| p % PAGE_SIZE != 0) {
            return Err(NvmeError::BadBuffer);
        }
        Ok(())
    }

    /// Queues `req` on I/O queue `qid` (1-based). On success exactly one [`Completion`] with `req.tag` will be
    /// delivered by [`Controller::poll`] on the same queue.
    ///
    /// The entry is staged in the SQ; the controller learns of it at the next [`Controller::flush`] or `poll`, so a
    /// batch costs one doorbell write. (Under QEMU each doorbell write is an exit and re-arms the device model's
    /// SQ timer, so per-request doorbells cut QD32 throughput several-fold.)
    pub fn submit(&mut self, qid: u16, req: IoRequest) -> Result<(), Rejected> {
        let reject = |error, request| Err(Rejected { error, request });
        if self.failed {
            return reject(NvmeError::Failed, req);
        }
        let Some(qi) = self.queue_index(qid) else {
            return reject(NvmeError::BadQueue(qid), req);
        };
        if let Err(e) = self.validate(&req) {
            return reject(e, req);
        }
        if self.queues[qi].free.is_empty() {
            return reject(NvmeError::QueueFull, req);
        }
        self.issue(qi, req, 0);
        Ok(())
    }

    /// Places a validated request in a free slot of queue `qi` (the caller checked one is free).
    fn issue(&mut self, qi: usize, req: IoRequest, retries: u8) {
        let now = self.hal.now_us();
        let q = &mut self.queues[qi];
        let Some(cid) = q.free.pop() else {
            // Unreachable by the callers' checks; fail the request rather than lose it.
            q.ready.push_back(Completion {
                tag: req.tag,
                status: Status::CONTROLLER_FAILED,
                retries,
            });
            return;
        };
        // CQ space as the controller sees it: entries - 1 minus completions it posted that we have not acknowledged.
        // Every outstanding command, this one included, must find a slot (spec 2.0 section 4.1, queue full).
        if q.outstanding() + usize::from(q.ring.unacked) + 1 > usize::from(q.ring.entries - 1) {
            q.ring.ack(&mut self.hal);
        }
        let list_page = q.prp_lists + u64::from(cid) * PAGE_SIZE;
        let opcode = match req.op {
            IoOp::Read => io::READ,
            IoOp::Write => io::WRITE,
            IoOp::Flush => io::FLUSH,
        };
        let mut sqe = Sqe::new(opcode, cid).with_nsid(req.nsid);
        if req.op != IoOp::Flush {
            let (prp1, prp2) = match req.pages.as_slice() {
                [] => (0, 0),
                [a] => (*a, 0),
                [a, b] => (*a, *b),
                [a, rest @ ..] => {
                    // PRP list (spec 2.0 section 4.1.1): entries 2..n, all page aligned, in one list page.
                    // Written eight entries at a time: no page-sized buffer on the (small) kernel stack.
                    let mut at = list_page;
                    for group in rest.chunks(8) {
                        let mut chunk = [0u8; 64];
                        for (i, p) in group.iter().enumerate() {
                            chunk[i * 8..i * 8 + 8].copy_from_slice(&p.to_le_bytes());
                        }
                        self.hal.write(at, &chunk[..group.len() * 8]);
                        at += 64;
                    }
                    (*a, list_page)
                }
            };
            sqe = sqe
                .with_prps(prp1, prp2)
                .with_cdw(10, (req.lba & 0xFFFF_FFFF) as u32)
                .with_cdw(11, (req.lba >> 32) as u32)
                .with_cdw(12, req.blocks - 1);
        }
        self.seq += 1;
        let q = &mut self.queues[qi];
        q.slots[usize::from(cid)] = Some(Inflight {
            req,
            deadline: now.saturating_add(self.cfg.io_timeout_us),
            abort_sent: false,
            seq: self.seq,
            retries,
        });
        q.ring.stage(&mut self.hal, &sqe);
        self.stats.submitted += 1;
    }

    /// Rings queue `qid`'s submission doorbell if requests were staged since the last ring. [`Controller::poll`]
    /// does this first, so a caller that submits a batch and then polls needs no explicit flush.
    pub fn flush(&mut self, qid: u16) {
        if let Some(qi) = self.queue_index(qid) {
            self.queues[qi].ring.ring(&mut self.hal);
        }
    }

    /// Reaps queue `qid`'s completions, calling `out` for each, then handles timeouts and fatal status.
    /// Returns the number of completions delivered.
    pub fn poll(&mut self, qid: u16, out: &mut dyn FnMut(Completion)) -> usize {
        let Some(qi) = self.queue_index(qid) else {
            return 0;
        };
        self.queues[qi].ring.ring(&mut self.hal);
        let mut n = 0;
        while let Some(c) = self.queues[qi].ready.pop_front() {
            self.stats.completed += 1;
            out(c);
            n += 1;
        }
        let reaped = self.reap(qi, out);
        n += reaped;
        // The cheap path stays cheap: CSTS (an MMIO read, which under emulation also contends with the device
        // model) and the deadlines are checked at most once per `health_interval_us`.
        if self.queues[qi].outstanding() > 0 && self.hal.now_us() >= self.queues[qi].next_check {
            let now = self.hal.now_us();
            self.queues[qi].next_check = now.saturating_add(self.cfg.health_interval_us);
            self.check_health(qi);
            while let Some(c) = self.queues[qi].ready.pop_front() {
                self.stats.completed += 1;
                out(c);
                n += 1;
            }
        }
        n
    }

    fn reap(&mut self, qi: usize, out: &mut dyn FnMut(Completion)) -> usize {
        let mut n = 0;
        while let Some(cqe) = self.queues[qi].ring.pop(&mut self.hal) {
            let q = &mut self.queues[qi];
            let cid = cqe.cid();
            let Some(done) = q.slots.get_mut(usize::from(cid)).and_then(Option::take) else {
                self.stats.spurious += 1;
                continue;
            };
            q.free.push(cid);
            let mut status = cqe.status();
            if done.abort_sent && status == Status::ABORT_REQUESTED {
                status = Status::TIMED_OUT;
            }
            self.stats.completed += 1;
            n += 1;
            out(Completion {
                tag: done.req.tag,
                status,
                retries: done.retries,
            });
        }
        // The head doorbell is written in batches (each write is an exit under emulation): once a quarter of the
        // ring is consumed. `issue` writes it early whenever the controller's view of free CQ space could fall
        // below what the outstanding commands need.
        let ring = &mut self.queues[qi].ring;
        if ring.unacked > 0 && ring.unacked >= (ring.entries / 4).max(1) {
            ring.ack(&mut self.hal);
        }
        n
    }

    fn check_health(&mut self, qi: usize) {
        let csts = Csts(self.hal.read32(offset::CSTS));
        if csts.fatal() || csts.0 == u32::MAX {
            self.stats.fatal_events += 1;
            self.recover();
            return;
        }
        let now = self.hal.now_us();
        let qid = self.queues[qi].ring.qid;
        let mut expired: Vec<(u16, bool)> = Vec::new();
        for (cid, slot) in (0u16..).zip(self.queues[qi].slots.iter()) {
            if let Some(f) = slot {
                if now > f.deadline {
                    expired.push((cid, f.abort_sent));
                }
            }
        }
        if expired.iter().any(|&(_, aborted)| aborted) {
            // Aborted once and still not back: the controller is wedged.
            self.recover();
            return;
        }
        for (cid, _) in expired {
            self.stats.aborts += 1;
            let abort =
                Sqe::new(admin::ABORT, 0).with_cdw(10, u32::from(qid) | (u32::from(cid) << 16));
            match self.admin_command(abort) {
                Ok(_) | Err(NvmeError::AdminFailed { .. }) => {
                    // Whether or not the controller aborted it (DW0 bit 0), give it one more timeout.
                    if let Some(f) = self.queues[qi].slots[usize::from(cid)].as_mut() {
                        f.abort_sent = true;
                        f.deadline = now.saturating_add(self.cfg.io_timeout_us);
                    }
                }
                Err(_) => {
                    self.recover();
                    return;
                }
            }
        }
        // The abort may have made completions available.
        let mut late = Vec::new();
        self.reap(qi, &mut |c| late.push(c));
        // Already counted by reap; deliver through the ready list.
        self.stats.completed -= late.len() as u64;
        self.queues[qi].ready.extend(late);
    }

    /// Resets the controller and re-issues every outstanding command; on failure fails them all.
    fn recover(&mut self) {
        self.stats.resets += 1;
        let mut pending: Vec<(usize, Inflight)> = Vec::new();
        for (qi, q) in self.queues.iter_mut().enumerate() {
            for (cid, slot) in (0u16..).zip(q.slots.iter_mut()) {
                if let Some(f) = slot.take() {
                    q.free.push(cid);
                    pending.push((qi, f));
                }
            }
        }
        pending.sort_by_key(|(_, f)| f.seq);
        let restored = self.reset_and_enable().and_then(|()| {
            let want = self.io_queues();
            let granted = self.set_queue_count(want)?;
            if granted < want {
                return Err(NvmeError::NoIoQueues);
            }
            (0..self.queues.len()).try_for_each(|i| self.create_queue(i))
        });
        if restored.is_err() {
            self.failed = true;
        }
        for (qi, f) in pending {
            let retries = f.retries.saturating_add(1);
            if self.failed {
                self.queues[qi].ready.push_back(Completion {
                    tag: f.req.tag,
                    status: Status::CONTROLLER_FAILED,
                    retries: f.retries,
                });
            } else if f.retries >= self.cfg.max_retries {
                self.queues[qi].ready.push_back(Completion {
                    tag: f.req.tag,
                    status: Status::TIMED_OUT,
                    retries: f.retries,
                });
            } else {
                self.stats.requeued += 1;
                self.issue(qi, f.req, retries);
            }
        }
        if !self.failed {
            for q in &mut self.queues {
                q.ring.ring(&mut self.hal);
            }
        }
    }
}

/// Placeholder until Identify Controller has been read during bring-up.
fn blank_info() -> ControllerInfo {
    ControllerInfo {
        vid: 0,
        serial: super::Text([b' '; 20]),
        model: super::Text([b' '; 40]),
        firmware: super::Text([b' '; 8]),
        mdts: 0,
        cntlid: 0,
        sqes: (0, 0),
        cqes: (0, 0),
        nn: 0,
    }
}
