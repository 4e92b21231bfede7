//! virtio-mmio / virtio-blk tests with a simulated driver on `VecMemory`, including malicious chains.

// Test-only code: addresses and sizes are small constants, so plain casts are clear.
#![allow(clippy::cast_possible_truncation)]

extern crate std;

use std::vec;
use std::vec::Vec;

use super::blk::*;
use super::mmio::{reg, status, F_VERSION_1, INT_CONFIG, INT_USED, MAGIC};
use super::queue::{ChainError, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY};
use crate::memory::{GuestMemory, VecMemory};

const RAM: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 8;
const SECTORS: u64 = 256;

/// A RAM disk; completes at once (sync) or keeps requests for the test to complete (async).
struct Disk {
    data: Vec<u8>,
    hold: bool,
    held: Vec<BlockRequest>,
    seen: usize,
}

impl Disk {
    fn new() -> Self {
        Self {
            data: vec![0; (SECTORS * SECTOR) as usize],
            hold: false,
            held: Vec::new(),
            seen: 0,
        }
    }

    fn run(&mut self, mem: &mut dyn GuestMemory, req: &BlockRequest) -> BlkStatus {
        let mut at = (req.sector * SECTOR) as usize;
        for s in &req.data {
            let n = s.len as usize;
            let r = match req.op {
                BlkOp::Read => mem.write(s.gpa, &self.data[at..at + n]),
                BlkOp::Write => mem.read(s.gpa, &mut self.data[at..at + n]),
                BlkOp::Flush => Ok(()),
            };
            if r.is_err() {
                return BlkStatus::IoErr;
            }
            at += n;
        }
        BlkStatus::Ok
    }
}

impl BlockBackend for Disk {
    fn submit(&mut self, mem: &mut dyn GuestMemory, req: BlockRequest) -> Submitted {
        self.seen += 1;
        if self.hold {
            self.held.push(req);
            return Submitted::Pending;
        }
        Submitted::Done(self.run(mem, &req))
    }
}

struct Rig {
    mem: VecMemory,
    dev: VirtioBlk,
    disk: Disk,
    avail_idx: u16,
}

fn config(read_only: bool) -> BlkConfig {
    let mut serial = [0u8; 20];
    serial[..6].copy_from_slice(b"vol-07");
    BlkConfig {
        sectors: SECTORS,
        read_only,
        block_size: 512,
        serial,
    }
}

impl Rig {
    fn new(read_only: bool) -> Self {
        Self {
            mem: VecMemory::new(RAM),
            dev: VirtioBlk::new(config(read_only)),
            disk: Disk::new(),
            avail_idx: 0,
        }
    }

    fn w(&mut self, off: u64, v: u32) {
        self.dev
            .mmio_write(&mut self.mem, &mut self.disk, off, 4, v);
    }

    fn r(&self, off: u64) -> u32 {
        self.dev.mmio_read(off, 4)
    }

    /// The driver initialisation sequence of section 3.1.1, accepting `features`.
    fn negotiate(&mut self, features: u64) -> bool {
        self.w(reg::STATUS, status::ACKNOWLEDGE);
        self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, (features & 0xFFFF_FFFF) as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.w(reg::STATUS, s);
        if self.r(reg::STATUS) & status::FEATURES_OK == 0 {
            return false;
        }
        self.setup_queue(QSIZE, DESC, AVAIL, USED);
        self.w(reg::STATUS, s | status::DRIVER_OK);
        true
    }

    fn setup_queue(&mut self, size: u16, desc: u64, avail: u64, used: u64) {
        self.w(reg::QUEUE_SEL, 0);
        self.w(reg::QUEUE_NUM, u32::from(size));
        self.w(reg::QUEUE_DESC_LOW, desc as u32);
        self.w(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.w(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w(reg::QUEUE_DEVICE_LOW, used as u32);
        self.w(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.w(reg::QUEUE_READY, 1);
    }

    fn up() -> Self {
        let mut r = Self::new(false);
        assert!(r.negotiate(F_VERSION_1 | F_FLUSH));
        r
    }

    fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write(DESC + 16 * u64::from(i), &d).unwrap();
    }

    /// Publishes `head` and notifies.
    fn kick(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write(AVAIL + 2, &self.avail_idx.to_le_bytes())
            .unwrap();
        self.w(reg::QUEUE_NOTIFY, 0);
    }

    fn header(&mut self, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(at, &h).unwrap();
    }

    /// A standard three-part request using descriptors base..base+2: header at 0x8000+, data, status.
    fn request(&mut self, base: u16, kind: u32, sector: u64, data: u64, len: u32) -> u64 {
        let hdr = 0x8000 + u64::from(base) * 0x20;
        let st = hdr + 0x10;
        self.header(hdr, kind, sector);
        self.mem.write(st, &[0xFF]).unwrap();
        let data_flags = if kind == req_type::IN || kind == req_type::GET_ID {
            DESC_F_WRITE
        } else {
            0
        };
        self.desc(base, hdr, 16, DESC_F_NEXT, base + 1);
        self.desc(base + 1, data, len, data_flags | DESC_F_NEXT, base + 2);
        self.desc(base + 2, st, 1, DESC_F_WRITE, 0);
        self.kick(base);
        st
    }

    fn status_byte(&self, at: u64) -> u8 {
        let mut b = [0u8];
        self.mem.read(at, &mut b).unwrap();
        b[0]
    }

    fn used(&self) -> (u16, Vec<(u32, u32)>) {
        let mut b = [0u8; 2];
        self.mem.read(USED + 2, &mut b).unwrap();
        let idx = u16::from_le_bytes(b);
        let mut out = Vec::new();
        for i in 0..idx.min(QSIZE) {
            let mut e = [0u8; 8];
            self.mem.read(USED + 4 + 8 * u64::from(i), &mut e).unwrap();
            out.push((
                u32::from_le_bytes(e[..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..].try_into().unwrap()),
            ));
        }
        (idx, out)
    }

    fn broken(&self) -> Option<ChainError> {
        self.dev.transport().broken()
    }
}

#[test]
fn identity_features_and_config_space() {
    let rig = Rig::new(true);
    assert_eq!(rig.r(reg::MAGIC), MAGIC);
    assert_eq!(rig.r(reg::VERSION), 2);
    assert_eq!(rig.r(reg::DEVICE_ID), DEVICE_ID);
    assert_eq!(rig.r(reg::QUEUE_NUM_MAX), 256);
    let lo = u64::from(rig.r(reg::DEVICE_FEATURES));
    assert_eq!(lo, F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_RO);
    // Capacity as 8 byte-wide reads, seg_max and blk_size as 32-bit reads.
    let cap: u64 = (0..8)
        .map(|i| u64::from(rig.dev.mmio_read(reg::CONFIG + i, 1)) << (8 * i))
        .sum();
    assert_eq!(cap, SECTORS);
    assert_eq!(rig.dev.mmio_read(reg::CONFIG + 12, 4), SEG_MAX);
    assert_eq!(rig.dev.mmio_read(reg::CONFIG + 20, 4), 512);
    assert_eq!(
        rig.dev.mmio_read(reg::CONFIG + 22, 4),
        0,
        "beyond config space"
    );
    assert_eq!(
        rig.dev.mmio_read(reg::MAGIC + 1, 4),
        0,
        "unaligned register access"
    );
}

#[test]
fn feature_negotiation_refuses_legacy_and_unknown_features() {
    let mut rig = Rig::new(false);
    assert!(
        !rig.negotiate(F_FLUSH),
        "a driver without VERSION_1 is refused"
    );
    rig.w(reg::STATUS, 0);
    assert!(
        !rig.negotiate(F_VERSION_1 | (1 << 28)),
        "a feature not offered is refused"
    );
    rig.w(reg::STATUS, 0);
    assert!(rig.negotiate(F_VERSION_1));
    assert!(rig.dev.transport().live());
    assert_eq!(rig.dev.transport().accepted_features(), F_VERSION_1);
}

#[test]
fn write_then_read_back_through_the_queue() {
    let mut rig = Rig::up();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    rig.mem.write(0x10000, &pattern).unwrap();
    let st = rig.request(0, req_type::OUT, 10, 0x10000, 1024);
    assert_eq!(rig.status_byte(st), BlkStatus::Ok as u8);
    assert_eq!(&rig.disk.data[10 * 512..12 * 512], &pattern[..]);
    let st = rig.request(3, req_type::IN, 10, 0x20000, 1024);
    assert_eq!(rig.status_byte(st), BlkStatus::Ok as u8);
    let mut back = vec![0u8; 1024];
    rig.mem.read(0x20000, &mut back).unwrap();
    assert_eq!(back, pattern);
    let (idx, used) = rig.used();
    assert_eq!(idx, 2);
    assert_eq!(
        used,
        vec![(0, 1), (3, 1025)],
        "read reports data + status bytes written"
    );
    assert_eq!(rig.dev.transport().interrupt_status() & INT_USED, INT_USED);
    rig.w(reg::INTERRUPT_ACK, INT_USED);
    assert_eq!(rig.dev.transport().interrupt_status(), 0);
    let st = rig.request(0, req_type::FLUSH, 0, 0x20000, 0);
    assert_eq!(rig.status_byte(st), BlkStatus::Ok as u8);
    assert_eq!(rig.dev.stats().completed, 3);
}

#[test]
fn header_and_data_may_share_and_split_descriptors() {
    // Section 2.6.4: no framing assumptions. Header+data in one readable descriptor, data split over two.
    let mut rig = Rig::up();
    rig.header(0x30000, req_type::OUT, 4);
    rig.mem.write(0x30010, &[0xAB; 512]).unwrap();
    rig.mem.write(0x40000, &[0xCD; 512]).unwrap();
    rig.desc(0, 0x30000, 16 + 512, DESC_F_NEXT, 1);
    rig.desc(1, 0x40000, 512, DESC_F_NEXT, 2);
    rig.desc(2, 0x50000, 1, DESC_F_WRITE, 0);
    rig.kick(0);
    assert_eq!(rig.status_byte(0x50000), 0);
    assert!(rig.disk.data[4 * 512..5 * 512].iter().all(|&b| b == 0xAB));
    assert!(rig.disk.data[5 * 512..6 * 512].iter().all(|&b| b == 0xCD));
}

#[test]
fn bad_block_requests_fail_but_the_device_carries_on() {
    let mut rig = Rig::up();
    let st = rig.request(0, req_type::IN, SECTORS - 1, 0x10000, 1024);
    assert_eq!(
        rig.status_byte(st),
        BlkStatus::IoErr as u8,
        "range beyond the volume"
    );
    let st = rig.request(0, req_type::OUT, 0, 0x10000, 100);
    assert_eq!(
        rig.status_byte(st),
        BlkStatus::IoErr as u8,
        "not a multiple of 512"
    );
    let st = rig.request(0, 77, 0, 0x10000, 512);
    assert_eq!(rig.status_byte(st), BlkStatus::Unsupported as u8);
    let st = rig.request(0, req_type::GET_ID, 0, 0x11000, 20);
    assert_eq!(rig.status_byte(st), BlkStatus::Ok as u8);
    let mut id = [0u8; 20];
    rig.mem.read(0x11000, &mut id).unwrap();
    assert_eq!(&id[..6], b"vol-07");
    assert_eq!(rig.disk.seen, 0, "none of these reached the backend");
    assert!(rig.broken().is_none());
    assert_eq!(rig.dev.stats().failed, 3);
    let st = rig.request(0, req_type::IN, 0, 0x10000, 512);
    assert_eq!(rig.status_byte(st), 0);
}

#[test]
fn read_only_volume_refuses_writes() {
    let mut rig = Rig::new(true);
    assert!(rig.negotiate(F_VERSION_1 | F_RO));
    let st = rig.request(0, req_type::OUT, 0, 0x10000, 512);
    assert_eq!(rig.status_byte(st), BlkStatus::IoErr as u8);
    assert_eq!(rig.disk.seen, 0);
}

/// Runs a malicious setup and checks the device broke without touching guest memory outside the rings' used
/// index (nothing is written at all once broken) and without calling the backend.
fn assert_breaks(rig: &mut Rig, expect: ChainError) {
    assert_eq!(rig.broken(), Some(expect));
    assert_ne!(rig.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(rig.dev.transport().interrupt_status() & INT_CONFIG, 0);
    assert!(!rig.dev.transport().live());
    assert_eq!(rig.disk.seen, 0);
    // Further notifications do nothing.
    let before = rig.mem.bytes().to_vec();
    rig.w(reg::QUEUE_NOTIFY, 0);
    assert_eq!(rig.mem.bytes(), &before[..]);
}

#[test]
fn buffer_outside_guest_memory_breaks_the_device() {
    let mut rig = Rig::up();
    rig.request(0, req_type::IN, 0, RAM as u64 - 256, 512);
    assert_breaks(
        &mut rig,
        ChainError::OutOfGuest {
            gpa: RAM as u64 - 256,
            len: 512,
        },
    );
    let (idx, _) = rig.used();
    assert_eq!(idx, 0, "nothing returned to the driver");
}

#[test]
fn wrapping_address_breaks_the_device() {
    let mut rig = Rig::up();
    rig.request(0, req_type::IN, 0, u64::MAX - 100, 512);
    assert_breaks(
        &mut rig,
        ChainError::OutOfGuest {
            gpa: u64::MAX - 100,
            len: 512,
        },
    );
}

#[test]
fn descriptor_loop_is_detected() {
    let mut rig = Rig::up();
    rig.header(0x8000, req_type::IN, 0);
    rig.desc(0, 0x8000, 16, DESC_F_NEXT, 1);
    rig.desc(1, 0x10000, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
    rig.desc(2, 0x10200, 512, DESC_F_WRITE | DESC_F_NEXT, 1);
    rig.kick(0);
    assert_breaks(&mut rig, ChainError::Loop);
}

#[test]
fn index_beyond_queue_is_detected() {
    let mut rig = Rig::up();
    rig.desc(0, 0x8000, 16, DESC_F_NEXT, QSIZE);
    rig.kick(0);
    assert_breaks(&mut rig, ChainError::BadIndex(QSIZE));
    let mut rig = Rig::up();
    rig.kick(200);
    assert_breaks(&mut rig, ChainError::BadIndex(200));
}

#[test]
fn indirect_and_read_after_write_are_refused() {
    let mut rig = Rig::up();
    rig.desc(0, 0x8000, 16, DESC_F_INDIRECT, 0);
    rig.kick(0);
    assert_breaks(&mut rig, ChainError::Indirect);
    let mut rig = Rig::up();
    rig.desc(0, 0x8010, 1, DESC_F_WRITE | DESC_F_NEXT, 1);
    rig.desc(1, 0x8000, 16, 0, 0);
    rig.kick(0);
    assert_breaks(&mut rig, ChainError::ReadAfterWrite);
}

#[test]
fn missing_status_byte_or_short_header_breaks() {
    let mut rig = Rig::up();
    rig.header(0x8000, req_type::OUT, 0);
    rig.desc(0, 0x8000, 16, 0, 0);
    rig.kick(0);
    assert_breaks(&mut rig, ChainError::BadLayout(0));
    let mut rig = Rig::up();
    rig.desc(0, 0x8000, 8, DESC_F_NEXT, 1);
    rig.desc(1, 0x8010, 1, DESC_F_WRITE, 0);
    rig.kick(0);
    assert_breaks(&mut rig, ChainError::BadLayout(0));
}

#[test]
fn available_index_overrun_breaks() {
    let mut rig = Rig::up();
    rig.mem
        .write(AVAIL + 2, &(QSIZE + 1).to_le_bytes())
        .unwrap();
    rig.w(reg::QUEUE_NOTIFY, 0);
    assert_breaks(&mut rig, ChainError::AvailOverrun { pending: QSIZE + 1 });
}

#[test]
fn queue_outside_memory_or_misaligned_breaks_at_ready() {
    let mut rig = Rig::new(false);
    rig.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    rig.w(reg::DRIVER_FEATURES_SEL, 1);
    rig.w(reg::DRIVER_FEATURES, 1);
    rig.w(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    rig.setup_queue(QSIZE, RAM as u64 - 16, AVAIL, USED);
    assert_eq!(
        rig.broken(),
        Some(ChainError::OutOfGuest {
            gpa: RAM as u64 - 16,
            len: 128
        })
    );
    assert_eq!(rig.r(reg::QUEUE_READY), 0);
    let mut rig = Rig::new(false);
    rig.setup_queue(QSIZE, DESC + 8, AVAIL, USED);
    assert_eq!(rig.broken(), Some(ChainError::BadQueueConfig));
    let mut rig = Rig::new(false);
    rig.setup_queue(6, DESC, AVAIL, USED);
    assert_eq!(
        rig.broken(),
        Some(ChainError::BadQueueConfig),
        "size not a power of two"
    );
}

#[test]
fn async_completion_head_reuse_and_reset() {
    let mut rig = Rig::up();
    rig.disk.hold = true;
    let st = rig.request(0, req_type::IN, 1, 0x10000, 512);
    assert_eq!(rig.dev.in_flight(), 1);
    assert_eq!(rig.status_byte(st), 0xFF, "not answered yet");
    let req = rig.disk.held.pop().unwrap();
    let status = rig.disk.run(&mut rig.mem, &req);
    assert!(rig.dev.complete(&mut rig.mem, req.id, status));
    assert_eq!(rig.status_byte(st), 0);
    assert!(
        !rig.dev.complete(&mut rig.mem, req.id, status),
        "double completion ignored"
    );
    // The driver re-publishes a head the device still owns: broken.
    rig.request(0, req_type::IN, 1, 0x10000, 512);
    rig.kick(0);
    assert_eq!(rig.broken(), Some(ChainError::HeadInFlight(0)));
    // A completion arriving after the break, or after the reset, writes nothing.
    let late = rig.disk.held.pop().unwrap();
    let before = rig.mem.bytes().to_vec();
    assert!(!rig.dev.complete(&mut rig.mem, late.id, BlkStatus::Ok));
    rig.w(reg::STATUS, 0);
    assert!(!rig.dev.complete(&mut rig.mem, late.id, BlkStatus::Ok));
    assert_eq!(rig.mem.bytes(), &before[..]);
    assert_eq!(rig.r(reg::STATUS), 0, "reset clears DEVICE_NEEDS_RESET");
    // The driver starts again from scratch.
    rig.mem.zero(AVAIL, 0x3000).unwrap();
    rig.avail_idx = 0;
    rig.disk.hold = false;
    assert!(rig.negotiate(F_VERSION_1));
    let st = rig.request(0, req_type::IN, 1, 0x10000, 512);
    assert_eq!(rig.status_byte(st), 0);
    assert!(rig.dev.stats().stale >= 3);
}

#[test]
fn polling_mode_suppresses_notifications_while_busy_and_catches_late_requests() {
    let mut rig = Rig::up();
    rig.disk.hold = true;
    let used_flags = |rig: &Rig| {
        let mut b = [0u8; 2];
        rig.mem.read(USED, &mut b).unwrap();
        u16::from_le_bytes(b)
    };
    // Idle: polling does nothing and asks nothing of the driver.
    assert!(!rig.dev.polling());
    rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, usize::MAX);
    assert_eq!(used_flags(&rig), 0);
    // One request in flight: the device asks not to be notified.
    rig.request(0, req_type::IN, 1, 0x10000, 512);
    assert!(rig.dev.polling());
    rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, usize::MAX);
    assert_eq!(used_flags(&rig), USED_F_NO_NOTIFY);
    // The driver publishes a second request without notifying: the next poll takes it.
    rig.header(0x8100, req_type::IN, 2);
    rig.mem.write(0x8110, &[0xFF]).unwrap();
    rig.desc(3, 0x8100, 16, DESC_F_NEXT, 4);
    rig.desc(4, 0x11000, 512, DESC_F_WRITE | DESC_F_NEXT, 5);
    rig.desc(5, 0x8110, 1, DESC_F_WRITE, 0);
    let slot = u64::from(rig.avail_idx % QSIZE);
    rig.mem
        .write(AVAIL + 4 + 2 * slot, &3u16.to_le_bytes())
        .unwrap();
    rig.avail_idx += 1;
    rig.mem
        .write(AVAIL + 2, &rig.avail_idx.to_le_bytes())
        .unwrap();
    rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, usize::MAX);
    assert_eq!(rig.disk.held.len(), 2, "taken without a notification");
    // Both complete: the next poll clears the request and still looks at the ring (a third request published
    // while the flag was set, without a notification, is taken).
    for req in core::mem::take(&mut rig.disk.held) {
        let status = rig.disk.run(&mut rig.mem, &req);
        assert!(rig.dev.complete(&mut rig.mem, req.id, status));
    }
    assert_eq!(rig.dev.in_flight(), 0);
    assert!(rig.dev.polling(), "the flag is still set");
    rig.header(0x8200, req_type::IN, 3);
    rig.mem.write(0x8210, &[0xFF]).unwrap();
    rig.desc(0, 0x8200, 16, DESC_F_NEXT, 1);
    rig.desc(1, 0x12000, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
    rig.desc(2, 0x8210, 1, DESC_F_WRITE, 0);
    let slot = u64::from(rig.avail_idx % QSIZE);
    rig.mem
        .write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())
        .unwrap();
    rig.avail_idx += 1;
    rig.mem
        .write(AVAIL + 2, &rig.avail_idx.to_le_bytes())
        .unwrap();
    rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, usize::MAX);
    assert_eq!(rig.disk.held.len(), 1, "the late request was taken");
    assert_eq!(used_flags(&rig), 0, "cleared before the last look");
    // It is in flight, so the next poll sets the flag again; once it completes, a poll clears it for good.
    assert!(rig.dev.polling());
    rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, usize::MAX);
    assert_eq!(used_flags(&rig), USED_F_NO_NOTIFY);
    let req = rig.disk.held.pop().unwrap();
    let status = rig.disk.run(&mut rig.mem, &req);
    assert!(rig.dev.complete(&mut rig.mem, req.id, status));
    rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, usize::MAX);
    assert_eq!(used_flags(&rig), 0);
    assert!(!rig.dev.polling());
    assert_eq!(rig.used().0, 3);
    assert!(rig.broken().is_none());
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        /// Arbitrary descriptor tables and ring contents: the device either serves requests or breaks; it never
        /// panics and never hands the backend a segment outside RAM.
        #[test]
        fn garbage_rings_never_escape(table in proptest::collection::vec(any::<u8>(), 16 * 8),
                                      heads in proptest::collection::vec(0u16..12, 1..6)) {
            let mut rig = Rig::up();
            rig.disk.hold = true;
            // Keep addresses mostly small so some chains are valid.
            let mut t = table;
            for d in 0..8 {
                t[d * 16 + 3..d * 16 + 8].fill(0);
                if d % 3 == 0 { t[d * 16 + 7] = 0xFF; }
            }
            rig.mem.write(DESC, &t).unwrap();
            for h in heads {
                rig.kick(h);
            }
            for req in &rig.disk.held {
                for s in &req.data {
                    prop_assert!(s.gpa + u64::from(s.len) <= RAM as u64);
                }
            }
            let live = rig.dev.transport().live();
            prop_assert!(live || rig.broken().is_some());
            prop_assert_eq!(rig.dev.in_flight(), rig.disk.held.len());
        }
    }
}

/// Publishes a one-sector read of `sector` without notifying: descriptors `base` (the header at `hdr`) and
/// `base + 1` (data and status byte at `data`, one device-writable 513-byte buffer), then the available index.
fn publish_read(rig: &mut Rig, base: u16, hdr: u64, data: u64, sector: u64) {
    rig.header(hdr, req_type::IN, sector);
    rig.mem.write(data + 512, &[0xFF]).unwrap();
    rig.desc(base, hdr, 16, DESC_F_NEXT, base + 1);
    rig.desc(base + 1, data, 513, DESC_F_WRITE, 0);
    let slot = u64::from(rig.avail_idx % QSIZE);
    rig.mem
        .write(AVAIL + 4 + 2 * slot, &base.to_le_bytes())
        .unwrap();
    rig.avail_idx += 1;
    rig.mem
        .write(AVAIL + 2, &rig.avail_idx.to_le_bytes())
        .unwrap();
}

#[test]
fn a_notification_is_served_in_bounded_batches() {
    let mut rig = Rig::up();
    rig.disk.hold = true;
    // Four requests published behind one notification the device did not process at the register write (the
    // kernel only marks the queue pending there). Two descriptors each: the header, then data and status byte in
    // one device-writable buffer (513 bytes), so four chains fill the 8-entry queue.
    for r in 0..4u16 {
        let base = 2 * r;
        publish_read(
            &mut rig,
            base,
            0x8000 + u64::from(base) * 0x20,
            0x10000 + 0x1000 * u64::from(r),
            u64::from(r),
        );
    }
    let first = rig.dev.take_notified(&mut rig.mem, &mut rig.disk, 1);
    assert_eq!(
        first,
        Intake {
            taken: 1,
            more: true
        }
    );
    assert_eq!(
        rig.disk.held.len(),
        1,
        "no more than the budget reached the backend"
    );
    // With requests in flight, a polling look takes the next batch, and a zero budget only tells what is left.
    let none = rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, 0);
    assert_eq!(
        none,
        Intake {
            taken: 0,
            more: true
        }
    );
    assert_eq!(rig.disk.held.len(), 1);
    let second = rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, 2);
    assert_eq!(
        second,
        Intake {
            taken: 2,
            more: true
        }
    );
    let last = rig.dev.take_notified(&mut rig.mem, &mut rig.disk, 2);
    assert_eq!(
        last,
        Intake {
            taken: 1,
            more: false
        }
    );
    let sectors: Vec<u64> = rig.disk.held.iter().map(|r| r.sector).collect();
    assert_eq!(sectors, [0, 1, 2, 3], "in ring order, each once");
    assert_eq!(rig.dev.in_flight(), 4);
    assert!(rig.broken().is_none());
}

#[test]
fn a_device_not_live_takes_nothing_when_notified() {
    let mut rig = Rig::new(false);
    let got = rig.dev.take_notified(&mut rig.mem, &mut rig.disk, 8);
    assert_eq!(got, Intake::default());
    assert_eq!(rig.disk.seen, 0);
}

#[test]
fn requests_left_by_a_spent_budget_keep_the_device_polled() {
    // A request in flight puts the device in polling mode (no notifications). The driver publishes two more
    // without notifying; the in-flight one completes; then a look with a spent budget (0) clears nothing it
    // cannot take: the device stays polled, and the next look with a budget takes both.
    let mut rig = Rig::up();
    rig.disk.hold = true;
    rig.request(0, req_type::IN, 1, 0x10000, 512);
    rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, usize::MAX);
    for r in 0..2u16 {
        publish_read(
            &mut rig,
            3 + 2 * r,
            0x8100 + u64::from(r) * 0x20,
            0x11000 + 0x1000 * u64::from(r),
            2 + u64::from(r),
        );
    }
    for req in core::mem::take(&mut rig.disk.held) {
        let status = rig.disk.run(&mut rig.mem, &req);
        assert!(rig.dev.complete(&mut rig.mem, req.id, status));
    }
    assert_eq!(rig.dev.in_flight(), 0);
    let spent = rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, 0);
    assert_eq!(
        spent,
        Intake {
            taken: 0,
            more: true
        }
    );
    assert!(
        rig.dev.polling(),
        "requests are waiting that the driver will not notify about"
    );
    let next = rig.dev.poll_queue(&mut rig.mem, &mut rig.disk, 4);
    assert_eq!(
        next,
        Intake {
            taken: 2,
            more: false
        }
    );
    assert_eq!(rig.disk.held.len(), 2);
    assert!(rig.broken().is_none());
}
