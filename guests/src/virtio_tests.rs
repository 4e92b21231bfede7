//! Host tests of the guest virtio-blk driver against the hypervisor's own device model (`virt::virtio::blk`).
//!
//! Design: the driver's DMA arena is a 4 KiB-aligned host allocation that the device model sees as guest RAM at
//! guest-physical 0 (`ArenaMem`), and its registers are `VirtioBlk::mmio_read` / `mmio_write` (`DevRegs`), so the
//! bytes the driver publishes are exactly what the device parses. A RAM disk backend completes requests at once or
//! holds them so a test can complete them later in any order; a set of bad sectors fails with IOERR. Devices the
//! model cannot impersonate (wrong magic, legacy version, refused features) are register fakes (`FakeRegs`).
#![allow(clippy::cast_possible_truncation)] // fixtures: small values on a 64-bit host

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::cell::RefCell;
use std::rc::Rc;
use std::vec::Vec;

use virt::memory::{check_range, GuestMemory, OutOfRange};
use virt::virtio::blk::{
    BlkConfig, BlkOp, BlkStatus, BlockBackend, BlockRequest, Submitted, VirtioBlk,
};

use crate::virtio::{self, status, Dma, InitError, QueueError, Regs, F_VERSION_1};
use crate::virtio_blk::{BlkDriver, BlkError, Op, F_FLUSH, S_IOERR, S_OK};
use crate::virtio_pattern::{self as pattern, Rng};
use crate::virtio_workload::{Config, Event, Workload, BUSY, UNKNOWN};

const ARENA: usize = 4 << 20;
/// Where the driver's DMA arena starts in guest-physical space (page 0 is left unused).
const DMA_BASE: u64 = 0x1000;
const SECTORS: u64 = 4096;

/// A zeroed, page-aligned host allocation, freed on drop.
struct Arena {
    ptr: *mut u8,
    layout: Layout,
}

impl Arena {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }

    /// The driver's DMA arena: everything from `DMA_BASE` on.
    fn dma(&self) -> Dma {
        let offset = usize::try_from(DMA_BASE).unwrap();
        // SAFETY: the allocation outlives every test's driver (the Arena is dropped last), nothing else uses
        // `[DMA_BASE, len)`, and `ArenaMem` maps guest-physical `p` to `ptr + p`.
        unsafe { Dma::new(self.ptr.add(offset), DMA_BASE, self.layout.size() - offset) }.unwrap()
    }

    fn mem(&self) -> ArenaMem {
        ArenaMem {
            ptr: self.ptr,
            len: self.layout.size(),
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// The arena as guest RAM `[0, len)`.
#[derive(Debug)]
struct ArenaMem {
    ptr: *mut u8,
    len: usize,
}

impl GuestMemory for ArenaMem {
    fn size(&self) -> u64 {
        self.len as u64
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        check_range(gpa, buf.len() as u64, self.size())?;
        // SAFETY: `[gpa, gpa + len)` lies inside the allocation (checked); the driver holds no reference into it
        // while the device model runs (single-threaded tests, raw-pointer driver accesses).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(usize::try_from(gpa).unwrap()),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRange> {
        check_range(gpa, data.len() as u64, self.size())?;
        // SAFETY: as in `read`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.add(usize::try_from(gpa).unwrap()),
                data.len(),
            );
        }
        Ok(())
    }
}

/// A RAM disk: completes at once, or holds requests for `complete_pending`. Faults: `bad_sectors` fail with
/// IOERR; a write starting at a sector in `lost_writes` reports OK but is dropped (the block stays stale); a write
/// starting at `misdirect.0` lands at `misdirect.1`.
#[derive(Debug, Default)]
struct RamDisk {
    bytes: Vec<u8>,
    deferred: bool,
    pending: Vec<BlockRequest>,
    bad_sectors: Vec<u64>,
    lost_writes: Vec<u64>,
    misdirect: Option<(u64, u64)>,
    reads: u64,
    writes: u64,
}

impl RamDisk {
    fn run(&mut self, mem: &mut dyn GuestMemory, req: &BlockRequest) -> BlkStatus {
        let sectors = req.bytes() / 512;
        if self
            .bad_sectors
            .iter()
            .any(|&s| (req.sector..req.sector + sectors).contains(&s))
        {
            return BlkStatus::IoErr;
        }
        match req.op {
            BlkOp::Read => self.reads += 1,
            BlkOp::Write => self.writes += 1,
            BlkOp::Flush => {}
        }
        if req.op == BlkOp::Write && self.lost_writes.contains(&req.sector) {
            return BlkStatus::Ok;
        }
        let mut sector = req.sector;
        if let Some((from, to)) = self.misdirect {
            if req.op == BlkOp::Write && sector == from {
                sector = to;
            }
        }
        let mut at = usize::try_from(sector * 512).unwrap();
        for seg in &req.data {
            let len = usize::try_from(seg.len).unwrap();
            let disk = &mut self.bytes[at..at + len];
            match req.op {
                BlkOp::Read => mem.write(seg.gpa, disk).unwrap(),
                BlkOp::Write => mem.read(seg.gpa, disk).unwrap(),
                BlkOp::Flush => {}
            }
            at += len;
        }
        BlkStatus::Ok
    }
}

impl BlockBackend for RamDisk {
    fn submit(&mut self, mem: &mut dyn GuestMemory, req: BlockRequest) -> Submitted {
        if self.deferred {
            self.pending.push(req);
            Submitted::Pending
        } else {
            Submitted::Done(self.run(mem, &req))
        }
    }
}

#[derive(Debug)]
struct Rig {
    dev: VirtioBlk,
    mem: ArenaMem,
    disk: RamDisk,
}

type Shared = Rc<RefCell<Rig>>;

impl Rig {
    fn new(arena: &Arena, deferred: bool, read_only: bool) -> Shared {
        let cfg = BlkConfig {
            sectors: SECTORS,
            read_only,
            block_size: 512,
            serial: [0; 20],
        };
        Rc::new(RefCell::new(Self {
            dev: VirtioBlk::new(cfg),
            mem: arena.mem(),
            disk: RamDisk {
                bytes: vec![0; usize::try_from(SECTORS * 512).unwrap()],
                deferred,
                ..RamDisk::default()
            },
        }))
    }
}

/// Completes every held request, in the order `pick` chooses (it gets the number pending, returns an index).
fn complete_pending(rig: &Shared, mut pick: impl FnMut(usize) -> usize) -> usize {
    let r = &mut *rig.borrow_mut();
    let mut done = 0;
    while !r.disk.pending.is_empty() {
        let req = r.disk.pending.swap_remove(pick(r.disk.pending.len()));
        let status = r.disk.run(&mut r.mem, &req);
        assert!(r.dev.complete(&mut r.mem, req.id, status));
        done += 1;
    }
    done
}

/// The device model's registers.
#[derive(Debug)]
struct DevRegs(Shared);

impl Regs for DevRegs {
    fn read32(&mut self, offset: usize) -> u32 {
        self.0.borrow().dev.mmio_read(offset as u64, 4)
    }

    fn write32(&mut self, offset: usize, value: u32) {
        let r = &mut *self.0.borrow_mut();
        r.dev
            .mmio_write(&mut r.mem, &mut r.disk, offset as u64, 4, value);
    }
}

fn driver(rig: &Shared, arena: &Arena, depth: usize, bytes: u32) -> BlkDriver<DevRegs> {
    BlkDriver::init(DevRegs(rig.clone()), &mut arena.dma(), depth, bytes).unwrap()
}

/// Polls until `n` completions arrived (the device completed them already); panics on a protocol error.
fn drain(drv: &mut BlkDriver<DevRegs>, n: usize) -> Vec<crate::virtio_blk::Completion> {
    let mut out = Vec::new();
    while let Some(c) = drv.poll().unwrap() {
        out.push(c);
    }
    assert_eq!(out.len(), n);
    out
}

#[test]
fn brings_the_device_up_with_version_1() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, false, false);
    let drv = driver(&rig, &arena, 8, 4096);
    let t = rig.borrow().dev.transport().clone();
    assert_eq!(
        t.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    assert!(t.live());
    assert_eq!(t.accepted_features(), F_VERSION_1 | F_FLUSH | (1 << 6));
    assert_eq!(drv.features(), t.accepted_features());
    assert_eq!(drv.capacity(), SECTORS);
    assert_eq!((drv.depth(), drv.queue_size()), (8, 256));
    assert!(!drv.read_only());
    // Depth is bounded by a third of the queue and by MAX_SLOTS.
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, false, false);
    assert_eq!(driver(&rig, &arena, 1000, 512).depth(), 64);
}

#[test]
fn writes_then_reads_back_patterns() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, false, false);
    let mut drv = driver(&rig, &arena, 8, 8192);
    for slot in 0..8 {
        let sector = 100 + 16 * slot as u64;
        pattern::fill(drv.data_mut(slot).unwrap(), sector, 7, 1);
        drv.submit(slot, Op::Write, sector, 8192).unwrap();
    }
    assert_eq!(drv.in_flight(), 8);
    assert!(
        drv.data_mut(0).is_none(),
        "no buffer access while in flight"
    );
    drv.kick();
    let done = drain(&mut drv, 8);
    assert!(done
        .iter()
        .all(|c| c.status == S_OK && c.op == Op::Write && c.written == 1));
    // The disk holds the patterns, sector by sector.
    {
        let r = rig.borrow();
        for slot in 0..8u64 {
            let at = usize::try_from((100 + 16 * slot) * 512).unwrap();
            pattern::check(&r.disk.bytes[at..at + 8192], 100 + 16 * slot, 7, 1).unwrap();
        }
    }
    for slot in 0..8 {
        drv.data_mut(slot).unwrap().fill(0);
        drv.submit(slot, Op::Read, 100 + 16 * slot as u64, 8192)
            .unwrap();
    }
    drv.kick();
    for c in drain(&mut drv, 8) {
        assert_eq!(
            (c.status, c.op, c.bytes, c.written),
            (S_OK, Op::Read, 8192, 8193)
        );
        pattern::check(drv.data_mut(c.slot).unwrap(), c.sector, 7, 1).unwrap();
        // The same bytes under another pass or another sector are detected.
        let stale = pattern::check(drv.data_mut(c.slot).unwrap(), c.sector, 7, 2).unwrap_err();
        assert_eq!((stale.sector, stale.claims_pass), (c.sector, 1));
    }
    drv.submit(3, Op::Flush, 0, 0).unwrap();
    drv.kick();
    assert_eq!(drain(&mut drv, 1)[0].status, S_OK);
    assert_eq!(rig.borrow().dev.stats().failed, 0);
}

/// Many requests completed out of order, through more than 65536 ring entries (the u16 indices wrap).
#[test]
fn out_of_order_completions_through_index_wraparound() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, true, false);
    let depth = 24;
    let mut drv = driver(&rig, &arena, depth, 1024);
    let mut rng = Rng::new(5);
    // Slot i owns sectors [2i, 2i + 2): it alternates write pass p, read-back of pass p.
    let mut pass = [0u32; 24];
    let mut completed = 0usize;
    let mut batches = 0usize;
    while completed < 70_000 {
        for (slot, p) in pass.iter_mut().enumerate() {
            let sector = 2 * slot as u64;
            if *p % 2 == 0 {
                pattern::fill(drv.data_mut(slot).unwrap(), sector, 9, *p / 2);
                drv.submit(slot, Op::Write, sector, 1024).unwrap();
            } else {
                drv.data_mut(slot).unwrap().fill(0xaa);
                drv.submit(slot, Op::Read, sector, 1024).unwrap();
            }
            // Every other round publishes in two batches, so the device also takes partial rounds.
            if !batches.is_multiple_of(2) && slot == depth / 2 {
                drv.kick();
            }
        }
        drv.kick();
        batches += 1;
        assert_eq!(
            drv.poll().unwrap(),
            None,
            "nothing completes before the backend does"
        );
        assert_eq!(
            complete_pending(&rig, |n| rng.below(n as u64) as usize),
            depth
        );
        let mut seen = [false; 24];
        for c in drain(&mut drv, depth) {
            assert_eq!(c.status, S_OK);
            assert!(!seen[c.slot]);
            seen[c.slot] = true;
            let p = &mut pass[c.slot];
            if c.op == Op::Read {
                pattern::check(drv.data_mut(c.slot).unwrap(), c.sector, 9, *p / 2).unwrap();
            }
            *p += 1;
        }
        completed += depth;
    }
    let stats = rig.borrow().dev.stats();
    assert_eq!(stats.completed as usize, completed);
    assert_eq!((stats.failed, stats.stale), (0, 0));
}

#[test]
fn io_errors_fail_only_the_affected_requests() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, false, false);
    rig.borrow_mut().disk.bad_sectors.push(100);
    let mut drv = driver(&rig, &arena, 4, 4096);
    for (slot, sector) in [(0, 96u64), (1, 104), (2, 88), (3, 100)] {
        drv.submit(slot, Op::Write, sector, 4096).unwrap();
    }
    drv.kick();
    let mut statuses: Vec<_> = drain(&mut drv, 4)
        .iter()
        .map(|c| (c.sector, c.status))
        .collect();
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [(88, S_OK), (96, S_IOERR), (100, S_IOERR), (104, S_OK)]
    );
    // The device carries on.
    drv.submit(0, Op::Read, 104, 4096).unwrap();
    drv.kick();
    assert_eq!(drain(&mut drv, 1)[0].status, S_OK);
}

#[test]
fn bad_requests_are_refused_before_anything_is_queued() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, true, false);
    let mut drv = driver(&rig, &arena, 2, 4096);
    assert_eq!(drv.submit(0, Op::Read, 0, 0), Err(BlkError::BadLength(0)));
    assert_eq!(
        drv.submit(0, Op::Read, 0, 1000),
        Err(BlkError::BadLength(1000))
    );
    assert_eq!(
        drv.submit(0, Op::Read, 0, 8192),
        Err(BlkError::BadLength(8192))
    );
    assert_eq!(
        drv.submit(0, Op::Write, SECTORS - 7, 4096),
        Err(BlkError::OutOfRange {
            sector: SECTORS - 7,
            sectors: 8
        })
    );
    assert_eq!(drv.submit(2, Op::Read, 0, 512), Err(BlkError::SlotBusy(2)));
    drv.submit(0, Op::Read, SECTORS - 8, 4096).unwrap();
    assert_eq!(drv.submit(0, Op::Read, 0, 512), Err(BlkError::SlotBusy(0)));
    assert_eq!(drv.in_flight(), 1);
    drv.kick();
    assert_eq!(
        rig.borrow().disk.pending.len(),
        1,
        "only the valid request reached the device"
    );

    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, false, true);
    let mut drv = driver(&rig, &arena, 2, 4096);
    assert!(drv.read_only());
    assert_eq!(drv.submit(0, Op::Write, 0, 512), Err(BlkError::ReadOnly));
    drv.submit(0, Op::Read, 0, 512).unwrap();
    drv.kick();
    assert_eq!(drain(&mut drv, 1)[0].status, S_OK);
}

/// A device that breaks the queue rules is seen as DEVICE_NEEDS_RESET; a used ring that runs ahead is refused.
#[test]
fn protocol_breaks_are_detected() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, true, false);
    let mut drv = driver(&rig, &arena, 4, 512);
    // The arena's first allocations are the rings: descriptors at DMA_BASE (16 * 256 bytes), then the available
    // ring, then the used ring (4-byte aligned after the 6 + 2 * 256 bytes of the available ring).
    let avail = DMA_BASE + 16 * 256;
    let used = (avail + 6 + 2 * 256 + 3) & !3;
    // A used index running ahead of the chains in flight.
    rig.borrow_mut()
        .mem
        .write(used + 2, &1u16.to_le_bytes())
        .unwrap();
    assert_eq!(
        drv.poll(),
        Err(BlkError::Queue(QueueError::UsedOverrun {
            used_idx: 1,
            last_seen: 0
        }))
    );
    rig.borrow_mut()
        .mem
        .write(used + 2, &0u16.to_le_bytes())
        .unwrap();
    // An available index far ahead of the ring: the device breaks itself.
    rig.borrow_mut()
        .mem
        .write(avail + 2, &300u16.to_le_bytes())
        .unwrap();
    DevRegs(rig.clone()).write32(virtio::reg::QUEUE_NOTIFY, 0);
    assert_ne!(drv.device_status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(rig.borrow().dev.transport().broken().is_some());
}

/// A register fake for devices the model cannot impersonate.
#[derive(Debug, Default)]
struct FakeRegs {
    magic: u32,
    version: u32,
    id: u32,
    features: u64,
    refuse_features: bool,
    num_max: u32,
    status: u32,
    sel: u32,
}

impl FakeRegs {
    fn good() -> Self {
        Self {
            magic: virtio::MAGIC,
            version: 2,
            id: 2,
            features: F_VERSION_1,
            num_max: 256,
            ..Self::default()
        }
    }
}

impl Regs for FakeRegs {
    fn read32(&mut self, offset: usize) -> u32 {
        match offset {
            virtio::reg::MAGIC => self.magic,
            virtio::reg::VERSION => self.version,
            virtio::reg::DEVICE_ID => self.id,
            virtio::reg::DEVICE_FEATURES => (self.features >> (32 * self.sel)) as u32,
            virtio::reg::QUEUE_NUM_MAX => self.num_max,
            virtio::reg::STATUS => self.status,
            _ => 0,
        }
    }

    fn write32(&mut self, offset: usize, value: u32) {
        match offset {
            virtio::reg::DEVICE_FEATURES_SEL => self.sel = value & 1,
            virtio::reg::STATUS if self.refuse_features => {
                self.status = value & !status::FEATURES_OK
            }
            virtio::reg::STATUS => self.status = value,
            _ => {}
        }
    }
}

fn init_fake(regs: FakeRegs) -> Result<BlkDriver<FakeRegs>, InitError> {
    let arena = Arena::new(1 << 20);
    BlkDriver::init(regs, &mut arena.dma(), 4, 512)
}

#[test]
fn bad_devices_are_named() {
    let err = |f: fn(&mut FakeRegs)| {
        let mut regs = FakeRegs::good();
        f(&mut regs);
        init_fake(regs).unwrap_err()
    };
    assert_eq!(err(|r| r.magic = 0x1234), InitError::BadMagic(0x1234));
    assert_eq!(err(|r| r.version = 1), InitError::BadVersion(1));
    assert_eq!(
        err(|r| r.id = 0),
        InitError::WrongDevice {
            expected: 2,
            found: 0
        }
    );
    assert_eq!(
        err(|r| r.features = 1 << 9),
        InitError::NoVersion1 { offered: 1 << 9 }
    );
    assert_eq!(
        err(|r| r.refuse_features = true),
        InitError::FeaturesRefused {
            accepted: F_VERSION_1
        }
    );
    assert_eq!(
        err(|r| r.num_max = 2),
        InitError::QueueUnavailable { num_max: 2 }
    );
    // QueueReady never reads 1 on the fake: the layout counts as refused.
    assert_eq!(err(|_| {}), InitError::QueueRefused);
    // The refusals that come after the reset leave FAILED set.
    let mut regs = FakeRegs::good();
    regs.refuse_features = true;
    assert!(virtio::negotiate(&mut regs, 0).is_err());
    assert_ne!(regs.status & status::FAILED, 0);
    // Too little DMA memory for the buffers is an error, not a panic, and the device is left FAILED.
    let arena = Arena::new(64 << 10);
    let rig = Rig::new(&arena, false, false);
    assert!(matches!(
        BlkDriver::init(DevRegs(rig.clone()), &mut arena.dma(), 8, 16384),
        Err(InitError::OutOfMemory { .. })
    ));
    assert_ne!(rig.borrow().dev.transport().status() & status::FAILED, 0);
    let mut dma = arena.dma();
    assert!(
        dma.alloc(16, 3).is_none(),
        "alignment must be a power of two"
    );
    assert!(
        dma.alloc(16, 8192).is_none(),
        "alignment above a page is refused"
    );
    let a = dma.alloc(3, 1).unwrap();
    let b = dma.alloc(16, 16).unwrap();
    assert_eq!((a.phys, b.phys), (DMA_BASE, DMA_BASE + 16));
}

#[test]
fn patterns_name_what_they_found() {
    let mut buf = vec![0u8; 4096];
    pattern::fill(&mut buf, 40, 3, 5);
    assert_eq!(pattern::check(&buf, 40, 3, 5), Ok(()));
    let moved = pattern::check(&buf, 41, 3, 5).unwrap_err();
    assert_eq!(
        (moved.sector, moved.claims_sector, moved.offset),
        (41, 40, 0)
    );
    let other_run = pattern::check(&buf, 40, 4, 5).unwrap_err();
    assert_eq!((other_run.claims_seed, other_run.offset), (3, 8));
    buf[3 * 512 + 300] ^= 1;
    let corrupt = pattern::check(&buf, 40, 3, 5).unwrap_err();
    assert_eq!(
        (corrupt.sector, corrupt.claims_pass, corrupt.offset),
        (43, 5, 300)
    );
    let zero = pattern::check(&[0u8; 512], 0, 0, 0).unwrap_err();
    assert_eq!(zero.offset, 0, "a zeroed sector never matches");
    let mut rng = Rng::new(0);
    assert!((0..1000).all(|_| rng.below(7) < 7));
    assert_eq!(rng.below(0), 0);
}

/// Runs `w` until `n` requests completed, the device completing them in a random order between polls.
fn run_workload(w: &mut Workload<'_, DevRegs>, rig: &Shared, n: u64, events: &mut Vec<Event>) {
    let mut rng = Rng::new(11);
    let mut now = 0u64;
    let mut done = 0u64;
    while done < n {
        while w.issue(now).unwrap() {}
        w.kick();
        // Complete a random part of what is pending, in a random order: the queue stays partly full.
        {
            let r = &mut *rig.borrow_mut();
            let k = 1 + rng.below(r.disk.pending.len() as u64) as usize;
            for _ in 0..k {
                let i = rng.below(r.disk.pending.len() as u64) as usize;
                let req = r.disk.pending.swap_remove(i);
                let status = r.disk.run(&mut r.mem, &req);
                assert!(r.dev.complete(&mut r.mem, req.id, status));
            }
        }
        now += 10;
        done += w.reap(now, &mut |e| events.push(e)).unwrap() as u64;
    }
}

fn workload_cfg(read_pct: u64) -> Config {
    Config {
        bytes: 2048,
        read_pct,
        lba_start: 64,
        seed: 77,
        verify: true,
    }
}

#[test]
fn workload_verifies_everything_it_writes() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, true, false);
    let drv = driver(&rig, &arena, 16, 2048);
    let mut units = vec![0xdead_beef_u32; 48];
    let mut w = Workload::new(drv, &mut units, workload_cfg(50)).unwrap();
    let mut events = Vec::new();
    run_workload(&mut w, &rig, 6000, &mut events);
    let s = w.stats();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!((s.err, s.verify_fail), (0, 0));
    assert!(s.ok >= 6000);
    assert_eq!(s.window_done, s.ok, "one window so far");
    assert!(s.window_lat_ticks > 0);
    let (reads, writes) = (rig.borrow().disk.reads, rig.borrow().disk.writes);
    assert!(
        reads > 2000 && writes > 2000,
        "reads {reads}, writes {writes}"
    );
    // Drain, then every unit's content on the disk is the pattern of the pass the workload remembers.
    while w.in_flight() > 0 {
        complete_pending(&rig, |_| 0);
        w.reap(0, &mut |e| events.push(e)).unwrap();
    }
    drop(w);
    let r = rig.borrow();
    for (unit, &pass) in units.iter().enumerate() {
        assert_eq!(pass & BUSY, 0);
        let sector = 64 + 4 * unit as u64;
        let at = usize::try_from(sector * 512).unwrap();
        if pass != UNKNOWN {
            pattern::check(&r.disk.bytes[at..at + 2048], sector, 77, pass).unwrap();
        }
    }
    assert!(
        units.iter().all(|&p| p != UNKNOWN),
        "6000 requests write all 48 units"
    );
    // Nothing outside the range was touched.
    assert!(r.disk.bytes[..64 * 512].iter().all(|&b| b == 0));
    assert!(r.disk.bytes[(64 + 48 * 4) * 512..].iter().all(|&b| b == 0));
}

#[test]
fn lost_and_misdirected_writes_are_verification_failures() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, true, false);
    // Unit 5 (sector 84) loses its writes after the first; unit 9's writes (sector 100) land on unit 10 (104).
    rig.borrow_mut().disk.misdirect = Some((100, 104));
    let drv = driver(&rig, &arena, 8, 2048);
    let mut units = vec![0u32; 16];
    let mut w = Workload::new(drv, &mut units, workload_cfg(50)).unwrap();
    let mut events = Vec::new();
    run_workload(&mut w, &rig, 300, &mut events);
    rig.borrow_mut().disk.lost_writes.push(84);
    run_workload(&mut w, &rig, 3000, &mut events);
    assert_eq!(w.stats().err, 0);
    assert_eq!(w.stats().verify_fail, events.len() as u64);
    let stale = events.iter().any(|e| {
        matches!(e, Event::VerifyFailed { found, expected_pass }
            if found.sector == 84 && found.claims_sector == 84 && found.claims_pass < u64::from(*expected_pass))
    });
    let misplaced = events.iter().any(|e| {
        matches!(e, Event::VerifyFailed { found, .. } if found.sector == 104 && found.claims_sector == 100)
    });
    let missing = events
        .iter()
        .any(|e| matches!(e, Event::VerifyFailed { found, .. } if found.sector == 100));
    assert!(stale && misplaced && missing, "{events:?}");
}

#[test]
fn io_errors_are_counted_and_a_failed_write_is_not_trusted() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, true, false);
    rig.borrow_mut().disk.bad_sectors.push(66); // in unit 0 (sectors 64..68)
    let drv = driver(&rig, &arena, 8, 2048);
    let mut units = vec![0u32; 16];
    let mut w = Workload::new(drv, &mut units, workload_cfg(70)).unwrap();
    let mut events = Vec::new();
    run_workload(&mut w, &rig, 2000, &mut events);
    let s = w.stats();
    assert!(s.err > 0 && s.ok > 1500);
    assert_eq!(s.verify_fail, 0);
    assert_eq!(events.len() as u64, s.err);
    assert!(events
        .iter()
        .all(|e| matches!(e, Event::Failed(c) if c.sector == 64 && c.status == S_IOERR)));
    drop(w);
    assert_eq!(
        units[0] & !BUSY,
        UNKNOWN,
        "unit 0 was never written successfully"
    );
}

#[test]
fn read_only_volumes_get_unverified_reads_and_bad_ranges_are_refused() {
    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, true, true);
    let drv = driver(&rig, &arena, 8, 2048);
    let mut units = vec![0u32; 16];
    let mut w = Workload::new(drv, &mut units, workload_cfg(0)).unwrap();
    assert!(!w.config().verify);
    assert_eq!(w.config().read_pct, 100);
    let mut events = Vec::new();
    run_workload(&mut w, &rig, 500, &mut events);
    assert_eq!(rig.borrow().disk.writes, 0);
    assert!(w.stats().ok >= 500 && events.is_empty());

    let arena = Arena::new(ARENA);
    let rig = Rig::new(&arena, true, false);
    let mut units = vec![0u32; 2048]; // 2048 units of 4 sectors from sector 64: beyond 4096 sectors
    let err =
        Workload::new(driver(&rig, &arena, 8, 2048), &mut units, workload_cfg(50)).unwrap_err();
    assert!(matches!(err, BlkError::OutOfRange { sector: 64, .. }));
    let mut none: [u32; 0] = [];
    assert!(Workload::new(driver(&rig, &arena, 8, 2048), &mut none, workload_cfg(50)).is_err());
    let big = Config {
        bytes: 4096,
        ..workload_cfg(50)
    };
    let err = Workload::new(driver(&rig, &arena, 8, 2048), &mut units[..4], big).unwrap_err();
    assert_eq!(err, BlkError::BadLength(4096));
}
