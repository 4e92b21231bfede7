//! A fake NVMe controller for host tests: a register file, DMA memory, and namespaces backed by byte vectors.
//! Commands run synchronously inside the submission doorbell write, following the spec's data structures (SQEs
//! and CQEs in DMA memory, phase tags, PRP entries and lists), so the driver's queue logic is exercised end to end.
//! Knobs inject the faults the driver must survive: slow ready transitions, media errors, hung commands, an
//! ignored Abort, controller fatal status, refused enables.

// Test-only code: values are small and known (fake addresses, page counts, tags), so plain casts are clear.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
extern crate std;

use std::boxed::Box;
use std::collections::{BTreeMap, VecDeque};
use std::vec;
use std::vec::Vec;

use super::command::{admin, cns, feature, io, Cqe, Sqe, Status};
use super::regs::{offset, Aqa, Cc, Csts};
use super::{Clock, Dma, Mmio, PAGE_SIZE};

pub struct FakeNs {
    pub nsid: u32,
    pub lba_shift: u32,
    pub data: Vec<u8>,
}

struct Sq {
    base: u64,
    entries: u16,
    head: u16,
    cqid: u16,
}

struct Cq {
    base: u64,
    entries: u16,
    tail: u16,
    phase: bool,
    /// Host's head as last written to the doorbell.
    head: u16,
}

pub struct FakeNvme {
    pages: BTreeMap<u64, Box<[u8; 4096]>>,
    next_page: u64,
    pub live_pages: usize,
    pub now: u64,
    pub cap: u64,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: BTreeMap<u16, Sq>,
    cqs: BTreeMap<u16, Cq>,
    pub namespaces: Vec<FakeNs>,
    pub mdts: u8,
    pub max_queues: u16,
    /// CSTS reads before RDY follows a CC.EN change.
    pub ready_delay: u32,
    pending_ready: Option<(bool, u32)>,
    /// Controller never becomes ready after enable.
    pub refuse_enable: bool,
    /// Reads of this LBA fail with Unrecovered Read Error.
    pub bad_lba: Option<u64>,
    /// I/O commands are held without completion.
    pub hang_io: bool,
    /// Abort actually aborts a held command.
    pub abort_works: bool,
    held: VecDeque<(u16, Sqe)>,
    /// Admin opcodes seen, in order.
    pub admin_log: Vec<u8>,
    /// I/O commands executed (opcode, lba, prp list used).
    pub io_log: Vec<(u8, u64, bool)>,
    pub resets: u32,
    /// Post a CQE with an unknown CID before the next I/O completion.
    pub inject_spurious: bool,
    /// Admin commands are swallowed (a wedged controller).
    pub hang_admin: bool,
}

impl FakeNvme {
    /// QEMU-like: MQES 2047, CQR, TO 1 (500 ms), DSTRD 0, NVM, MPS 4K..64K; SeaBIOS left it enabled.
    pub fn new(namespaces: Vec<FakeNs>) -> Self {
        Self {
            pages: BTreeMap::new(),
            next_page: 0x10_0000,
            live_pages: 0,
            now: 0,
            cap: 0x0040_0020_0101_07FF,
            cc: Cc::enabled_config().0,
            csts: Csts::RDY,
            aqa: 0,
            asq: 0,
            acq: 0,
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            namespaces,
            mdts: 7,
            max_queues: 64,
            ready_delay: 3,
            pending_ready: None,
            refuse_enable: false,
            bad_lba: None,
            hang_io: false,
            abort_works: true,
            held: VecDeque::new(),
            admin_log: Vec::new(),
            io_log: Vec::new(),
            resets: 0,
            inject_spurious: false,
            hang_admin: false,
        }
    }

    pub fn ns(nsid: u32, lba_shift: u32, blocks: usize) -> FakeNs {
        FakeNs {
            nsid,
            lba_shift,
            data: vec![0u8; blocks << lba_shift],
        }
    }

    pub fn enabled(&self) -> bool {
        Cc(self.cc).enabled()
    }

    pub fn set_fatal(&mut self) {
        self.csts |= Csts::CFS;
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn page(&mut self, phys: u64) -> &mut [u8; 4096] {
        let base = phys & !(PAGE_SIZE - 1);
        self.pages
            .get_mut(&base)
            .unwrap_or_else(|| panic!("device access to unallocated memory {phys:#x}"))
    }

    fn mem_read(&mut self, phys: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = phys + i as u64;
            *b = self.page(a)[(a % PAGE_SIZE) as usize];
        }
    }

    fn mem_write(&mut self, phys: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let a = phys + i as u64;
            self.page(a)[(a % PAGE_SIZE) as usize] = *b;
        }
    }

    fn read_u64(&mut self, phys: u64) -> u64 {
        let mut b = [0u8; 8];
        self.mem_read(phys, &mut b);
        u64::from_le_bytes(b)
    }

    /// Physical segments of a `len`-byte transfer described by PRP1/PRP2 (spec 2.0 section 4.1.1).
    fn prp_segments(&mut self, prp1: u64, prp2: u64, len: usize) -> (Vec<(u64, usize)>, bool) {
        let mut segs = Vec::new();
        let first = (PAGE_SIZE - prp1 % PAGE_SIZE) as usize;
        let first = first.min(len);
        segs.push((prp1, first));
        let mut left = len - first;
        if left == 0 {
            return (segs, false);
        }
        if left <= PAGE_SIZE as usize {
            assert_eq!(
                prp2 % PAGE_SIZE,
                0,
                "PRP2 data pointer must be page aligned"
            );
            segs.push((prp2, left));
            return (segs, false);
        }
        assert_eq!(prp2 % 8, 0, "PRP list pointer must be qword aligned");
        let mut entry = prp2;
        while left > 0 {
            let last_in_page = entry % PAGE_SIZE == PAGE_SIZE - 8;
            let v = self.read_u64(entry);
            if last_in_page && left > PAGE_SIZE as usize {
                entry = v;
                continue;
            }
            assert_eq!(v % PAGE_SIZE, 0, "PRP list entry must be page aligned");
            let n = left.min(PAGE_SIZE as usize);
            segs.push((v, n));
            left -= n;
            entry += 8;
        }
        (segs, true)
    }

    fn post(&mut self, cqid: u16, sqid: u16, cid: u16, status: Status, dw0: u32) {
        let sq_head = self.sqs.get(&sqid).map_or(0, |s| s.head);
        let Some(cq) = self.cqs.get_mut(&cqid) else {
            return;
        };
        assert_ne!(
            (cq.tail + 1) % cq.entries,
            cq.head,
            "completion queue {cqid} overflow: host head not advanced"
        );
        let addr = cq.base + u64::from(cq.tail) * 16;
        let cqe = Cqe::new(dw0, sq_head, sqid, cid, status, cq.phase);
        cq.tail += 1;
        if cq.tail == cq.entries {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        self.mem_write(addr, &cqe.to_bytes());
    }

    fn ring(&mut self, sqid: u16, tail: u16) {
        loop {
            let Some(sq) = self.sqs.get_mut(&sqid) else {
                return;
            };
            if sq.head == tail {
                return;
            }
            let addr = sq.base + u64::from(sq.head) * 64;
            sq.head = (sq.head + 1) % sq.entries;
            let cqid = sq.cqid;
            let mut b = [0u8; 64];
            self.mem_read(addr, &mut b);
            let sqe = Sqe::from_bytes(&b);
            if sqid == 0 && self.hang_admin {
                self.admin_log.push(sqe.opcode());
            } else if sqid == 0 {
                let (status, dw0) = self.admin(&sqe);
                self.post(0, 0, sqe.cid(), status, dw0);
            } else if self.hang_io {
                self.held.push_back((sqid, sqe));
            } else {
                let status = self.io(&sqe);
                if self.inject_spurious {
                    self.inject_spurious = false;
                    self.post(cqid, sqid, 0xFFF0, Status::SUCCESS, 0);
                }
                self.post(cqid, sqid, sqe.cid(), status, 0);
            }
        }
    }

    fn admin(&mut self, s: &Sqe) -> (Status, u32) {
        self.admin_log.push(s.opcode());
        match s.opcode() {
            admin::IDENTIFY => {
                let mut page = [0u8; 4096];
                match s.cdw(10) & 0xFF {
                    cns::CONTROLLER => {
                        page[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        page[4..24].copy_from_slice(b"cv0                 ");
                        page[24..64].copy_from_slice(b"QEMU NVMe Ctrl                          ");
                        page[64..72].copy_from_slice(b"7.2.0   ");
                        page[77] = self.mdts;
                        page[512] = 0x66;
                        page[513] = 0x44;
                        let nn = self.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0);
                        page[516..520].copy_from_slice(&nn.to_le_bytes());
                    }
                    cns::ACTIVE_NAMESPACES => {
                        let mut ids: Vec<u32> = self
                            .namespaces
                            .iter()
                            .map(|n| n.nsid)
                            .filter(|&n| n > s.nsid())
                            .collect();
                        ids.sort_unstable();
                        for (i, id) in ids.iter().enumerate() {
                            page[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                        }
                    }
                    cns::NAMESPACE => {
                        let Some(ns) = self.namespaces.iter().find(|n| n.nsid == s.nsid()) else {
                            return (Status::INVALID_NAMESPACE, 0);
                        };
                        let blocks = (ns.data.len() >> ns.lba_shift) as u64;
                        page[0..8].copy_from_slice(&blocks.to_le_bytes());
                        page[8..16].copy_from_slice(&blocks.to_le_bytes());
                        page[25] = 1; // two formats
                        page[26] = 1; // using format 1
                        page[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
                        page[132..136].copy_from_slice(&(ns.lba_shift << 16).to_le_bytes());
                    }
                    _ => return (Status::INVALID_FIELD, 0),
                }
                self.mem_write(s.prp1(), &page);
                (Status::SUCCESS, 0)
            }
            admin::SET_FEATURES if s.cdw(10) & 0xFF == feature::NUMBER_OF_QUEUES => {
                let want = (s.cdw(11) & 0xFFFF) as u16 + 1;
                let n = u32::from(want.min(self.max_queues) - 1);
                (Status::SUCCESS, n | (n << 16))
            }
            admin::CREATE_IO_CQ => {
                let qid = (s.cdw(10) & 0xFFFF) as u16;
                let entries = (s.cdw(10) >> 16) as u16 + 1;
                if qid == 0 || qid > self.max_queues || self.cqs.contains_key(&qid) {
                    return (Status::from_raw(0x101), 0);
                }
                assert_eq!(
                    s.cdw(11) & 1,
                    1,
                    "queues must be physically contiguous (CAP.CQR)"
                );
                self.cqs.insert(
                    qid,
                    Cq {
                        base: s.prp1(),
                        entries,
                        tail: 0,
                        phase: true,
                        head: 0,
                    },
                );
                (Status::SUCCESS, 0)
            }
            admin::CREATE_IO_SQ => {
                let qid = (s.cdw(10) & 0xFFFF) as u16;
                let entries = (s.cdw(10) >> 16) as u16 + 1;
                let cqid = (s.cdw(11) >> 16) as u16;
                if !self.cqs.contains_key(&cqid) {
                    return (Status::from_raw(0x100), 0);
                }
                if qid == 0 || self.sqs.contains_key(&qid) {
                    return (Status::from_raw(0x101), 0);
                }
                self.sqs.insert(
                    qid,
                    Sq {
                        base: s.prp1(),
                        entries,
                        head: 0,
                        cqid,
                    },
                );
                (Status::SUCCESS, 0)
            }
            admin::ABORT => {
                let sqid = (s.cdw(10) & 0xFFFF) as u16;
                let cid = (s.cdw(10) >> 16) as u16;
                let pos = self
                    .held
                    .iter()
                    .position(|(q, c)| *q == sqid && c.cid() == cid);
                match pos {
                    Some(p) if self.abort_works => {
                        let (q, c) = self.held.remove(p).unwrap_or_default();
                        let cqid = self.sqs.get(&q).map_or(0, |s| s.cqid);
                        self.post(cqid, q, c.cid(), Status::ABORT_REQUESTED, 0);
                        (Status::SUCCESS, 0)
                    }
                    _ => (Status::SUCCESS, 1),
                }
            }
            _ => (Status::INVALID_OPCODE, 0),
        }
    }

    fn io(&mut self, s: &Sqe) -> Status {
        let Some(ni) = self.namespaces.iter().position(|n| n.nsid == s.nsid()) else {
            return Status::INVALID_NAMESPACE;
        };
        if s.opcode() == io::FLUSH {
            self.io_log.push((io::FLUSH, 0, false));
            return Status::SUCCESS;
        }
        let lba = u64::from(s.cdw(10)) | (u64::from(s.cdw(11)) << 32);
        let blocks = u64::from(s.cdw(12) & 0xFFFF) + 1;
        let shift = self.namespaces[ni].lba_shift;
        let size = (self.namespaces[ni].data.len() >> shift) as u64;
        if lba + blocks > size {
            return Status::LBA_OUT_OF_RANGE;
        }
        let len = (blocks << shift) as usize;
        let (segs, list) = self.prp_segments(s.prp1(), s.prp2(), len);
        self.io_log.push((s.opcode(), lba, list));
        let mut at = (lba << shift) as usize;
        match s.opcode() {
            io::READ => {
                if self
                    .bad_lba
                    .is_some_and(|b| (lba..lba + blocks).contains(&b))
                {
                    return Status::UNRECOVERED_READ;
                }
                for (p, n) in segs {
                    let chunk = self.namespaces[ni].data[at..at + n].to_vec();
                    self.mem_write(p, &chunk);
                    at += n;
                }
            }
            io::WRITE => {
                for (p, n) in segs {
                    let mut chunk = vec![0u8; n];
                    self.mem_read(p, &mut chunk);
                    self.namespaces[ni].data[at..at + n].copy_from_slice(&chunk);
                    at += n;
                }
            }
            _ => return Status::INVALID_OPCODE,
        }
        Status::SUCCESS
    }

    fn write_cc(&mut self, v: u32) {
        let was = Cc(self.cc).enabled();
        self.cc = v;
        let now = Cc(v).enabled();
        if was && !now {
            // Controller reset: all I/O queues deleted, outstanding commands lost.
            self.resets += 1;
            self.sqs.clear();
            self.cqs.clear();
            self.held.clear();
            self.csts &= !Csts::CFS;
            self.pending_ready = Some((false, self.ready_delay));
        } else if !was && now {
            assert_eq!(Cc(v).iosqes(), 6, "CC.IOSQES must be 6");
            assert_eq!(Cc(v).iocqes(), 4, "CC.IOCQES must be 4");
            assert!(self.csts & Csts::RDY == 0, "enabled before RDY cleared");
            let aqa = Aqa(self.aqa);
            self.sqs.insert(
                0,
                Sq {
                    base: self.asq,
                    entries: aqa.sq_entries() as u16,
                    head: 0,
                    cqid: 0,
                },
            );
            self.cqs.insert(
                0,
                Cq {
                    base: self.acq,
                    entries: aqa.cq_entries() as u16,
                    tail: 0,
                    phase: true,
                    head: 0,
                },
            );
            if !self.refuse_enable {
                self.pending_ready = Some((true, self.ready_delay));
            }
        }
    }

    fn read_csts(&mut self) -> u32 {
        if let Some((target, left)) = self.pending_ready {
            if left == 0 {
                if target {
                    self.csts |= Csts::RDY;
                } else {
                    self.csts &= !Csts::RDY;
                }
                self.pending_ready = None;
            } else {
                self.pending_ready = Some((target, left - 1));
            }
        }
        self.csts
    }
}

impl Mmio for FakeNvme {
    fn read32(&mut self, off: usize) -> u32 {
        match off {
            offset::CAP => self.cap as u32,
            o if o == offset::CAP + 4 => (self.cap >> 32) as u32,
            offset::VS => 0x0001_0400,
            offset::CC => self.cc,
            offset::CSTS => self.read_csts(),
            offset::AQA => self.aqa,
            _ => 0,
        }
    }

    fn write32(&mut self, off: usize, v: u32) {
        match off {
            offset::CC => self.write_cc(v),
            offset::AQA => self.aqa = v,
            offset::ASQ => self.asq = (self.asq & !0xFFFF_FFFF) | u64::from(v),
            o if o == offset::ASQ + 4 => self.asq = (self.asq & 0xFFFF_FFFF) | (u64::from(v) << 32),
            offset::ACQ => self.acq = (self.acq & !0xFFFF_FFFF) | u64::from(v),
            o if o == offset::ACQ + 4 => self.acq = (self.acq & 0xFFFF_FFFF) | (u64::from(v) << 32),
            o if o >= offset::DOORBELLS => {
                let idx = (o - offset::DOORBELLS) / 4;
                let qid = (idx / 2) as u16;
                if idx.is_multiple_of(2) && Cc(self.cc).enabled() && self.csts & Csts::RDY != 0 {
                    self.ring(qid, v as u16);
                } else if let Some(cq) = self.cqs.get_mut(&qid) {
                    cq.head = v as u16;
                }
            }
            _ => {}
        }
    }
}

impl Dma for FakeNvme {
    fn alloc_pages(&mut self, count: usize) -> Option<u64> {
        let base = self.next_page;
        for i in 0..count as u64 {
            self.pages
                .insert(base + i * PAGE_SIZE, Box::new([0u8; 4096]));
        }
        // Leave a hole after each allocation so overruns hit unallocated memory.
        self.next_page += (count as u64 + 1) * PAGE_SIZE;
        self.live_pages += count;
        Some(base)
    }

    fn free_pages(&mut self, phys: u64, count: usize) {
        for i in 0..count as u64 {
            assert!(
                self.pages.remove(&(phys + i * PAGE_SIZE)).is_some(),
                "double free {phys:#x}"
            );
        }
        self.live_pages -= count;
    }

    fn read(&mut self, phys: u64, buf: &mut [u8]) {
        self.mem_read(phys, buf);
    }

    fn write(&mut self, phys: u64, data: &[u8]) {
        self.mem_write(phys, data);
    }
}

impl Clock for FakeNvme {
    fn now_us(&mut self) -> u64 {
        self.now += 10;
        self.now
    }
}
