//! `selftest=virtio-blk`: two guests' virtio-blk devices routed through the IOPS partitioner to the NVMe queue.
//!
//! Each "guest" is a 1 MiB `virt::memory::VecMemory` driven by a minimal virtio driver written here (feature
//! negotiation, one split queue, three-descriptor requests with deliberately unaligned, split data buffers). Both
//! devices write 4 KiB patterns to their own volume (disjoint LBA ranges of the first namespace), read them back
//! into other buffers and compare; a request beyond the volume must fail with IOERR; finally a malicious chain on
//! the second device must break only that device while the first keeps working.
//!
//! Overwrites 4 MiB of the first namespace starting at 8 MiB; opt-in, not part of `all`.

// Details are fixed-size strings returned once per step, as in crate::selftest.
#![allow(clippy::result_large_err)]

use alloc::vec::Vec;
use core::fmt::Write;

use sched::iops::{CostModel, DeviceConfig, VolumeConfig, VolumeId};
use virt::memory::VecMemory;
use virt::virtio::blk::{req_type, BlkConfig, VirtioBlk};
use virt::virtio::mmio::{reg, status, F_VERSION_1};
use virt::virtio::queue::{DESC_F_NEXT, DESC_F_WRITE};
use virt::GuestMemory;

use super::nvme::{controller, KernelHal, Probe};
use super::selftest::own_queue;
use super::virtio_blk::{Router, VolumeBackend};
use super::volumes::{Done, Engine, Extent};
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

const RAM: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
/// Volume size in 512-byte sectors (2 MiB).
const VOLUME_SECTORS: u64 = 4096;
/// First byte of the first volume on the namespace.
const VOLUME_BASE: u64 = 8 << 20;
const REQUESTS: u64 = 24;

fn now_ns() -> u64 {
    let hz = u128::from(tsc::hz().max(1));
    u64::try_from(u128::from(tsc::rdtsc()) * 1_000_000_000 / hz).unwrap_or(u64::MAX)
}

/// One simulated guest: its memory, device and driver-side ring position.
struct Guest {
    mem: VecMemory,
    dev: VirtioBlk,
    volume: VolumeId,
    avail_idx: u16,
}

/// The shared path below the devices.
struct Path<'a> {
    engine: Engine,
    router: Router,
    ctrl: &'a mut drivers::nvme::Controller<KernelHal>,
    lba_size: u64,
}

impl Path<'_> {
    /// A register write on guest `g`'s device (may submit requests).
    fn write(&mut self, guests: &mut [Guest], g: usize, off: u64, v: u32) {
        let guest = &mut guests[g];
        let mut backend = VolumeBackend {
            engine: &mut self.engine,
            ctrl: self.ctrl,
            router: &mut self.router,
            device: g,
            volume: guest.volume,
            lba_size: self.lba_size,
            now: now_ns(),
        };
        guest
            .dev
            .mmio_write(&mut guest.mem, &mut backend, off, 4, v);
    }

    /// Runs the engine until nothing is in flight (bounded).
    fn drain(&mut self, guests: &mut [Guest]) -> Result<(), Detail> {
        let start = tsc::uptime_us();
        while self.router.in_flight() > 0 {
            let mut done: Vec<Done> = Vec::new();
            self.engine
                .pump(self.ctrl, &mut now_ns, &mut |d| done.push(d));
            for d in done {
                if let Some(g) = self.router.device_of(d.token) {
                    let guest = &mut guests[g];
                    self.router
                        .finish(d, self.ctrl, &mut guest.dev, &mut guest.mem);
                }
            }
            if tsc::uptime_us() - start > 10_000_000 {
                return Err(detail!("{} requests stuck", self.router.in_flight()));
            }
        }
        Ok(())
    }
}

impl Guest {
    fn mem_write(&mut self, gpa: u64, data: &[u8]) -> Result<(), Detail> {
        self.mem
            .write(gpa, data)
            .map_err(|e| detail!("guest write {:#x}: {e:?}", e.gpa))
    }

    fn desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> Result<(), Detail> {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem_write(DESC + 16 * u64::from(i), &d)
    }

    /// Publishes `head` in the available ring (the caller then notifies).
    fn publish(&mut self, head: u16) -> Result<(), Detail> {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem_write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let idx = self.avail_idx;
        self.mem_write(AVAIL + 2, &idx.to_le_bytes())
    }

    /// Builds a request in descriptor slots `base..base+4`: header, data split 1024/2048/1024 at `data`, status.
    /// Returns the status byte's address.
    fn request(&mut self, base: u16, kind: u32, sector: u64, data: u64) -> Result<u64, Detail> {
        let hdr = 0x8000 + u64::from(base) * 0x20;
        let st = hdr + 0x10;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem_write(hdr, &h)?;
        self.mem_write(st, &[0xFF])?;
        let w = if kind == req_type::IN {
            DESC_F_WRITE
        } else {
            0
        };
        self.desc(base, hdr, 16, DESC_F_NEXT, base + 1)?;
        self.desc(base + 1, data, 1024, w | DESC_F_NEXT, base + 2)?;
        self.desc(base + 2, data + 1024, 2048, w | DESC_F_NEXT, base + 3)?;
        self.desc(base + 3, data + 3072, 1024, w | DESC_F_NEXT, base + 4)?;
        self.desc(base + 4, st, 1, DESC_F_WRITE, 0)?;
        self.publish(base)?;
        Ok(st)
    }

    fn byte(&self, gpa: u64) -> u8 {
        let mut b = [0u8];
        // The test's own addresses lie inside the 1 MiB guest.
        let _ = self.mem.read(gpa, &mut b);
        b[0]
    }
}

/// The low 32 bits of a (small) guest address.
fn low(gpa: u64) -> u32 {
    u32::try_from(gpa & 0xFFFF_FFFF).unwrap_or(0)
}

fn pattern(g: usize, k: u64) -> Vec<u8> {
    let seed = (u64::try_from(g).unwrap_or(0) << 32) ^ (k * 0x9E37_79B9);
    (0..4096u64)
        .map(|i| (seed.wrapping_mul(i + 1) >> 13).to_le_bytes()[0])
        .collect()
}

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
    let lba_size = u64::from(ns.lba_size);
    let qid = own_queue(ctrl);
    let device = DeviceConfig {
        capacity_iops: 10_000,
        cost: CostModel {
            unit_bytes: 4096,
            read_cost: 1024,
            write_cost: 1024,
        },
        ..DeviceConfig::default()
    };
    let mut engine = Engine::new(device, core::slice::from_ref(&ns), qid, 32, now_ns())
        .map_err(|e| detail!("engine: {e:?}"))?;
    let mut guests = Vec::new();
    for g in 0..2u64 {
        let extent = Extent {
            nsid: ns.nsid,
            first_lba: (VOLUME_BASE + g * VOLUME_SECTORS * 512) / lba_size,
            blocks: VOLUME_SECTORS * 512 / lba_size,
        };
        let cfg = VolumeConfig {
            committed_iops: 2000 / (g + 1),
            ..VolumeConfig::default()
        };
        let volume = engine
            .add_volume(extent, cfg, now_ns())
            .map_err(|e| detail!("volume {g}: {e:?}"))?;
        let mut serial = [0u8; 20];
        serial[..4].copy_from_slice(b"vol0");
        guests.push(Guest {
            mem: VecMemory::new(RAM),
            dev: VirtioBlk::new(BlkConfig {
                sectors: VOLUME_SECTORS,
                read_only: false,
                block_size: u32::try_from(lba_size).unwrap_or(512),
                serial,
            }),
            volume,
            avail_idx: 0,
        });
    }
    let mut path = Path {
        engine,
        router: Router::default(),
        ctrl,
        lba_size,
    };
    // Driver initialisation (virtio 1.2 section 3.1.1) on both devices.
    for g in 0..2 {
        let s = status::ACKNOWLEDGE | status::DRIVER;
        path.write(&mut guests, g, reg::STATUS, s);
        path.write(&mut guests, g, reg::DRIVER_FEATURES_SEL, 1);
        path.write(
            &mut guests,
            g,
            reg::DRIVER_FEATURES,
            u32::try_from(F_VERSION_1 >> 32).unwrap_or(1),
        );
        path.write(&mut guests, g, reg::STATUS, s | status::FEATURES_OK);
        for (off, v) in [
            (reg::QUEUE_SEL, 0),
            (reg::QUEUE_NUM, u32::from(QSIZE)),
            (reg::QUEUE_DESC_LOW, low(DESC)),
            (reg::QUEUE_DRIVER_LOW, low(AVAIL)),
            (reg::QUEUE_DEVICE_LOW, low(USED)),
            (reg::QUEUE_READY, 1),
        ] {
            path.write(&mut guests, g, off, v);
        }
        path.write(
            &mut guests,
            g,
            reg::STATUS,
            s | status::FEATURES_OK | status::DRIVER_OK,
        );
        if !guests[g].dev.transport().live() {
            return Err(detail!("device {g} did not go live"));
        }
    }
    // Writes then reads, three requests per device in flight at a time; data buffers start 16 bytes past a
    // page boundary so every segment is unaligned.
    let mut checked = 0u64;
    for phase in [req_type::OUT, req_type::IN] {
        let mut k = 0;
        while k < REQUESTS {
            let mut statuses = Vec::new();
            for slot in 0..3u16 {
                let kk = k + u64::from(slot);
                for (g, guest) in guests.iter_mut().enumerate() {
                    let base = if phase == req_type::OUT {
                        0x10010
                    } else {
                        0x60010
                    };
                    let data = base + kk * 0x1100;
                    if phase == req_type::OUT {
                        guest.mem_write(data, &pattern(g, kk))?;
                    }
                    let st = guest.request(slot * 5, phase, kk * 8, data)?;
                    statuses.push((g, st, data, kk));
                }
            }
            for g in 0..2 {
                path.write(&mut guests, g, reg::QUEUE_NOTIFY, 0);
            }
            path.drain(&mut guests)?;
            for (g, st, data, kk) in statuses {
                let s = guests[g].byte(st);
                if s != 0 {
                    return Err(detail!("device {g} request {kk}: status {s}"));
                }
                if phase == req_type::IN {
                    let mut back = alloc::vec![0u8; 4096];
                    let _ = guests[g].mem.read(data, &mut back);
                    if back != pattern(g, kk) {
                        return Err(detail!("device {g} request {kk}: data differs"));
                    }
                    checked += 1;
                }
            }
            k += 3;
        }
    }
    // A request beyond the volume fails with IOERR without reaching the device.
    let st = guests[0].request(0, req_type::IN, VOLUME_SECTORS - 4, 0x60010)?;
    path.write(&mut guests, 0, reg::QUEUE_NOTIFY, 0);
    path.drain(&mut guests)?;
    if guests[0].byte(st) != 1 {
        return Err(detail!(
            "out-of-volume read answered {}",
            guests[0].byte(st)
        ));
    }
    // A malicious chain (buffer beyond guest RAM) breaks device 1 only.
    let ram = u64::try_from(RAM).unwrap_or(0);
    guests[1].desc(0, ram - 8, 16, DESC_F_NEXT, 1)?;
    guests[1].desc(1, 0x8010, 1, DESC_F_WRITE, 0)?;
    guests[1].publish(0)?;
    path.write(&mut guests, 1, reg::QUEUE_NOTIFY, 0);
    let broken = guests[1].dev.transport().broken();
    if broken.is_none() || guests[1].dev.transport().status() & status::DEVICE_NEEDS_RESET == 0 {
        return Err(detail!("malicious chain did not break device 1"));
    }
    let st = guests[0].request(0, req_type::IN, 0, 0x60010)?;
    path.write(&mut guests, 0, reg::QUEUE_NOTIFY, 0);
    path.drain(&mut guests)?;
    if guests[0].byte(st) != 0 || !guests[0].dev.transport().live() {
        return Err(detail!("device 0 affected by device 1's fault"));
    }
    let served = guests[0].dev.stats().completed + guests[1].dev.stats().completed;
    Ok(detail!(
        "2 devices, {served} requests via sched::iops to NVMe; {checked} 4 KiB patterns intact; IOERR beyond volume; dev1 broken ({:?}), dev0 ok",
        broken.unwrap_or(virt::virtio::queue::ChainError::BadQueueConfig)
    ))
}
