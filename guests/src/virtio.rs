//! A small virtio 1.x driver core for the test guests: the virtio-mmio transport (version 2), device
//! initialisation with feature negotiation, and the driver side of one split virtqueue (virtio 1.2, sections 2.7,
//! 3.1 and 4.2). [`crate::virtio_blk`] builds the block driver on it.
//!
//! Design:
//! - Registers are reached through the [`Regs`] trait. In a guest it is [`MmioRegs`]: aligned 32-bit
//!   `read_volatile` / `write_volatile`, which compile to plain `MOV` loads and stores, the instruction forms the
//!   hypervisor decodes (docs/guest-abi.md, "Virtio-mmio devices"). Host tests implement it over the hypervisor's
//!   own device model, so this code is tested against the device it drives.
//! - Memory the device reads or writes ("DMA" memory: rings, request headers, data buffers) comes from a [`Dma`]
//!   arena that knows both the driver's pointer and the guest-physical address the device sees. In a guest on the
//!   identity map the two are equal; in host tests the arena is a host allocation mapped at guest-physical 0.
//! - Memory shared with the device is only ever touched through raw pointers with volatile accesses for ring
//!   fields and status bytes. Ordering: descriptors and the available ring entry are written before the available
//!   index (a release fence between), and the used ring entry and everything the device wrote for it are read only
//!   after the used index was seen to move (an acquire fence between). On x86 these fences cost nothing but stop
//!   the compiler from reordering; the hardware keeps stores in order (TSO) and the notify write traps.
//!
//! Invariants: the driver never publishes a descriptor index outside the queue, never has more chains in flight
//! than the queue holds, and never reads a used element before the used index covers it; a used index that runs
//! ahead of what was published is reported as [`QueueError::UsedOverrun`], never trusted.

use core::ptr;
use core::sync::atomic::{fence, Ordering};

/// Register offsets of the virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2).
pub mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC_LOW: usize = 0x080;
    pub const QUEUE_DESC_HIGH: usize = 0x084;
    pub const QUEUE_DRIVER_LOW: usize = 0x090;
    pub const QUEUE_DRIVER_HIGH: usize = 0x094;
    pub const QUEUE_DEVICE_LOW: usize = 0x0A0;
    pub const QUEUE_DEVICE_HIGH: usize = 0x0A4;
    pub const CONFIG_GENERATION: usize = 0x0FC;
    /// Start of the device-specific configuration space.
    pub const CONFIG: usize = 0x100;
}

/// Device status bits (section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// `MagicValue`: "virt" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"virt");
/// The only transport version this driver speaks (the "modern", non-legacy interface).
pub const TRANSPORT_VERSION: u32 = 2;
/// VIRTIO_F_VERSION_1 (section 6): required.
pub const F_VERSION_1: u64 = 1 << 32;
/// Bytes of a virtio-mmio register window this driver may touch (transport registers and 0x100 of config space).
pub const WINDOW: usize = 0x200;
/// Largest queue this driver sets up (a power of two; the device may offer less).
pub const MAX_QUEUE: u16 = 256;

/// Descriptor flags (section 2.7.5).
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// Used ring flag: the device does not need notifications (section 2.7.10).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Access to one device's registers: aligned 32-bit reads and writes at byte offsets below [`WINDOW`].
pub trait Regs {
    fn read32(&mut self, offset: usize) -> u32;
    fn write32(&mut self, offset: usize, value: u32);
}

/// A virtio-mmio register window reached with volatile 32-bit `MOV`s.
#[derive(Debug)]
pub struct MmioRegs {
    base: usize,
}

impl MmioRegs {
    /// The window at `base`.
    ///
    /// # Safety
    /// `[base, base + WINDOW)` must be a virtio-mmio register window announced by the hypervisor and mapped at that
    /// address for the rest of the guest's life (the ABI's identity map), with no other code accessing it.
    pub unsafe fn new(base: usize) -> Self {
        Self { base }
    }

    fn at(&self, offset: usize) -> *mut u32 {
        // A programming error (offsets are the constants above), never input: stop rather than touch other memory.
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= WINDOW,
            "register offset {offset:#x}"
        );
        (self.base + offset) as *mut u32
    }
}

impl Regs for MmioRegs {
    fn read32(&mut self, offset: usize) -> u32 {
        // SAFETY: `at` keeps the access aligned and inside the window `new`'s caller vouched for; a volatile u32
        // read is one 32-bit MOV, which the hypervisor emulates.
        unsafe { ptr::read_volatile(self.at(offset)) }
    }

    fn write32(&mut self, offset: usize, value: u32) {
        // SAFETY: as in `read32`, for a 32-bit MOV store.
        unsafe { ptr::write_volatile(self.at(offset), value) }
    }
}

/// A region of DMA memory: the driver's pointer and the guest-physical address the device uses.
#[derive(Clone, Copy, Debug)]
pub struct DmaRegion {
    pub ptr: *mut u8,
    pub phys: u64,
    pub len: usize,
}

/// A bump allocator over memory shared with devices; nothing is ever freed (the guests set up once).
#[derive(Debug)]
pub struct Dma {
    virt: *mut u8,
    phys: u64,
    len: usize,
    used: usize,
}

impl Dma {
    /// An arena of `len` bytes at driver address `virt`, seen by devices at guest-physical `phys`. Returns `None`
    /// unless `virt` and `phys` are congruent modulo 4 KiB (so alignment means the same on both sides).
    ///
    /// # Safety
    /// `[virt, virt + len)` must be valid, writable memory used by nothing else for as long as any region allocated
    /// from the arena is in use, and a device access to `phys + i` must reach `virt + i`.
    pub unsafe fn new(virt: *mut u8, phys: u64, len: usize) -> Option<Self> {
        ((virt as u64 ^ phys) & 0xfff == 0).then_some(Self {
            virt,
            phys,
            len,
            used: 0,
        })
    }

    /// Bytes not yet allocated (before alignment padding).
    pub fn remaining(&self) -> usize {
        self.len - self.used
    }

    /// `size` zeroed bytes aligned to `align` (a power of two, at most 4096), or `None` when the arena is short.
    pub fn alloc(&mut self, size: usize, align: usize) -> Option<DmaRegion> {
        if !align.is_power_of_two() || align > 4096 {
            return None;
        }
        let phys_now = self.phys.checked_add(u64::try_from(self.used).ok()?)?;
        let align64 = u64::try_from(align).ok()?;
        let pad = usize::try_from(phys_now.wrapping_neg() & (align64 - 1)).ok()?;
        let start = self.used.checked_add(pad)?;
        let end = start.checked_add(size)?;
        if end > self.len {
            return None;
        }
        self.used = end;
        // SAFETY: `[start, end)` lies inside the arena (`end <= len`), which `new`'s caller gave us exclusively.
        let ptr = unsafe {
            let p = self.virt.add(start);
            ptr::write_bytes(p, 0, size);
            p
        };
        Some(DmaRegion {
            ptr,
            phys: self.phys + u64::try_from(start).ok()?,
            len: size,
        })
    }
}

/// Why a device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// `MagicValue` is not "virt".
    BadMagic(u32),
    /// `Version` is not 2 (1 would be the legacy interface, not supported).
    BadVersion(u32),
    /// `DeviceID` is not the expected one (0 means "no device here").
    WrongDevice { expected: u32, found: u32 },
    /// `Status` did not read 0 after a reset.
    ResetStuck(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1 { offered: u64 },
    /// The device cleared FEATURES_OK: it refused the accepted features.
    FeaturesRefused { accepted: u64 },
    /// Queue 0 is already live, or has `QueueNumMax` 0 or too small for one request.
    QueueUnavailable { num_max: u32 },
    /// `QueueReady` did not stick: the device refused the ring layout.
    QueueRefused,
    /// The DMA arena is too small for the rings and buffers.
    OutOfMemory { wanted: usize, remaining: usize },
    /// DEVICE_NEEDS_RESET is set, or DRIVER_OK did not stick.
    NotLive { status: u32 },
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::BadMagic(v) => write!(f, "magic {v:#x} is not \"virt\" ({MAGIC:#x})"),
            Self::BadVersion(v) => {
                write!(f, "transport version {v} (need 2; legacy is not supported)")
            }
            Self::WrongDevice { expected, found } => {
                write!(f, "device id {found} (expected {expected})")
            }
            Self::ResetStuck(s) => write!(f, "status {s:#x} after reset (expected 0)"),
            Self::NoVersion1 { offered } => write!(f, "features {offered:#x} lack VERSION_1"),
            Self::FeaturesRefused { accepted } => write!(
                f,
                "device refused features {accepted:#x} (FEATURES_OK clear)"
            ),
            Self::QueueUnavailable { num_max } => {
                write!(f, "queue 0 unavailable (QueueNumMax {num_max})")
            }
            Self::QueueRefused => {
                f.write_str("device refused the queue layout (QueueReady stayed 0)")
            }
            Self::OutOfMemory { wanted, remaining } => {
                write!(
                    f,
                    "DMA memory short: {wanted} bytes wanted, {remaining} left"
                )
            }
            Self::NotLive { status } => {
                write!(f, "device not live after DRIVER_OK (status {status:#x})")
            }
        }
    }
}

/// Reads `MagicValue`, `Version` and `DeviceID` and checks them against a virtio-mmio v2 device of `device_id`.
///
/// # Errors
/// The first field that does not match.
pub fn identify(regs: &mut dyn Regs, device_id: u32) -> Result<(), InitError> {
    let magic = regs.read32(reg::MAGIC);
    if magic != MAGIC {
        return Err(InitError::BadMagic(magic));
    }
    let version = regs.read32(reg::VERSION);
    if version != TRANSPORT_VERSION {
        return Err(InitError::BadVersion(version));
    }
    let found = regs.read32(reg::DEVICE_ID);
    if found != device_id {
        return Err(InitError::WrongDevice {
            expected: device_id,
            found,
        });
    }
    Ok(())
}

/// Steps 1-6 of the initialisation (section 3.1.1): reset, ACKNOWLEDGE, DRIVER, feature negotiation (the device's
/// offer intersected with `wanted`, which gets VERSION_1 added) and FEATURES_OK, checked by reading it back.
/// Returns the accepted features. On an error after the reset the device is left with FAILED set.
///
/// # Errors
/// [`InitError::ResetStuck`], [`InitError::NoVersion1`] or [`InitError::FeaturesRefused`].
pub fn negotiate(regs: &mut dyn Regs, wanted: u64) -> Result<u64, InitError> {
    regs.write32(reg::STATUS, 0);
    // A reset may take a moment to finish (section 4.2.2.1): wait for Status to read 0, boundedly.
    let mut st = regs.read32(reg::STATUS);
    for _ in 0..1000 {
        if st == 0 {
            break;
        }
        core::hint::spin_loop();
        st = regs.read32(reg::STATUS);
    }
    if st != 0 {
        return Err(InitError::ResetStuck(st));
    }
    regs.write32(reg::STATUS, status::ACKNOWLEDGE);
    regs.write32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    regs.write32(reg::DEVICE_FEATURES_SEL, 0);
    let low = regs.read32(reg::DEVICE_FEATURES);
    regs.write32(reg::DEVICE_FEATURES_SEL, 1);
    let high = regs.read32(reg::DEVICE_FEATURES);
    let offered = u64::from(high) << 32 | u64::from(low);
    if offered & F_VERSION_1 == 0 {
        fail(regs);
        return Err(InitError::NoVersion1 { offered });
    }
    let accepted = offered & (wanted | F_VERSION_1);
    regs.write32(reg::DRIVER_FEATURES_SEL, 0);
    regs.write32(reg::DRIVER_FEATURES, low32(accepted));
    regs.write32(reg::DRIVER_FEATURES_SEL, 1);
    regs.write32(reg::DRIVER_FEATURES, low32(accepted >> 32));
    let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    regs.write32(reg::STATUS, st);
    if regs.read32(reg::STATUS) & status::FEATURES_OK == 0 {
        fail(regs);
        return Err(InitError::FeaturesRefused { accepted });
    }
    Ok(accepted)
}

/// Sets FAILED (section 3.1.1: the driver gave up on the device). Best effort.
pub fn fail(regs: &mut dyn Regs) {
    let st = regs.read32(reg::STATUS);
    regs.write32(reg::STATUS, st | status::FAILED);
}

/// Sets DRIVER_OK (step 8) and checks that the device is live: DRIVER_OK reads back and DEVICE_NEEDS_RESET is clear.
///
/// # Errors
/// [`InitError::NotLive`], with FAILED set.
pub fn driver_ok(regs: &mut dyn Regs) -> Result<(), InitError> {
    let st = regs.read32(reg::STATUS);
    regs.write32(reg::STATUS, st | status::DRIVER_OK);
    let st = regs.read32(reg::STATUS);
    if st & status::DRIVER_OK == 0 || st & status::DEVICE_NEEDS_RESET != 0 {
        fail(regs);
        return Err(InitError::NotLive { status: st });
    }
    Ok(())
}

/// Reads `len` (at most 8) bytes of configuration space at `offset` as aligned 32-bit halves, retrying while the
/// configuration generation changes under the read (section 4.2.2.2).
pub fn read_config(regs: &mut dyn Regs, offset: usize, len: usize) -> u64 {
    loop {
        let before = regs.read32(reg::CONFIG_GENERATION);
        let low = regs.read32(reg::CONFIG + offset);
        let high = if len > 4 {
            regs.read32(reg::CONFIG + offset + 4)
        } else {
            0
        };
        if regs.read32(reg::CONFIG_GENERATION) == before {
            let value = u64::from(high) << 32 | u64::from(low);
            return if len >= 8 {
                value
            } else {
                value & ((1u64 << (len * 8)) - 1)
            };
        }
    }
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

/// One element of the used ring: the chain head and the bytes the device wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// A device broke the virtqueue protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The used index moved by more than the chains in flight.
    UsedOverrun { used_idx: u16, last_seen: u16 },
}

/// The driver side of a split virtqueue: descriptor table, available ring (driver area) and used ring (device
/// area), each in DMA memory (section 2.7).
#[derive(Debug)]
pub struct Virtqueue {
    size: u16,
    desc: DmaRegion,
    avail: DmaRegion,
    used: DmaRegion,
    /// The available index as published (plus entries pushed and not yet published).
    avail_idx: u16,
    /// Next used index to consume.
    last_used: u16,
    /// Chains published and not yet seen used.
    outstanding: u16,
}

impl Virtqueue {
    /// Allocates the three areas for a queue of `size` entries (a power of two, 1 to [`MAX_QUEUE`]).
    ///
    /// # Errors
    /// [`InitError::OutOfMemory`] when the arena is short; [`InitError::QueueUnavailable`] for a bad size.
    pub fn new(dma: &mut Dma, size: u16) -> Result<Self, InitError> {
        if !size.is_power_of_two() || size > MAX_QUEUE {
            return Err(InitError::QueueUnavailable {
                num_max: u32::from(size),
            });
        }
        let n = usize::from(size);
        // Section 2.7: descriptor table 16 * n (align 16), available ring 6 + 2n (align 2), used ring 6 + 8n
        // (align 4); the trailing event fields are allocated though EVENT_IDX is never negotiated.
        let sizes = [(16 * n, 16), (6 + 2 * n, 2), (6 + 8 * n, 4)];
        let wanted = sizes.iter().map(|(s, a)| s + a).sum();
        let remaining = dma.remaining();
        let oom = InitError::OutOfMemory { wanted, remaining };
        let desc = dma.alloc(sizes[0].0, sizes[0].1).ok_or(oom)?;
        let avail = dma.alloc(sizes[1].0, sizes[1].1).ok_or(oom)?;
        let used = dma.alloc(sizes[2].0, sizes[2].1).ok_or(oom)?;
        Ok(Self {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            outstanding: 0,
        })
    }

    /// Entries in the queue.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Chains published and not yet returned.
    pub fn outstanding(&self) -> u16 {
        self.outstanding
    }

    /// Programs queue `index` of the device with this queue's size and addresses and sets it ready.
    ///
    /// # Errors
    /// [`InitError::QueueRefused`] if `QueueReady` does not read back 1.
    pub fn attach(&self, regs: &mut dyn Regs, index: u32) -> Result<(), InitError> {
        regs.write32(reg::QUEUE_SEL, index);
        regs.write32(reg::QUEUE_NUM, u32::from(self.size));
        for (low, addr) in [
            (reg::QUEUE_DESC_LOW, self.desc.phys),
            (reg::QUEUE_DRIVER_LOW, self.avail.phys),
            (reg::QUEUE_DEVICE_LOW, self.used.phys),
        ] {
            regs.write32(low, low32(addr));
            regs.write32(low + 4, low32(addr >> 32));
        }
        regs.write32(reg::QUEUE_READY, 1);
        if regs.read32(reg::QUEUE_READY) != 1 {
            return Err(InitError::QueueRefused);
        }
        Ok(())
    }

    /// Writes descriptor `index`. Panics on an index outside the queue (a driver bug, never device input).
    pub fn set_desc(&mut self, index: u16, phys: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.size && next < self.size, "descriptor index");
        let at = usize::from(index) * 16;
        // SAFETY: descriptor `index` lies inside the table region (checked above); the device reads descriptors
        // only after they are published, and these are plain stores of their fields.
        unsafe {
            let p = self.desc.ptr.add(at);
            ptr::write_volatile(p.cast::<u64>(), phys);
            ptr::write_volatile(p.add(8).cast::<u32>(), len);
            ptr::write_volatile(p.add(12).cast::<u16>(), flags);
            ptr::write_volatile(p.add(14).cast::<u16>(), next);
        }
    }

    /// Whether another chain may be pushed (the queue never holds more chains than entries).
    pub fn has_room(&self) -> bool {
        self.outstanding < self.size
    }

    /// Puts chain `head` in the next available ring slot; the device sees it after [`Self::publish`]. Returns
    /// false (pushing nothing) when the queue is full.
    pub fn push(&mut self, head: u16) -> bool {
        if !self.has_room() || head >= self.size {
            return false;
        }
        let slot = usize::from(self.avail_idx & (self.size - 1));
        // SAFETY: ring entry `slot` (< size) lies at 4 + 2 * slot inside the available ring region.
        unsafe { ptr::write_volatile(self.avail.ptr.add(4 + 2 * slot).cast::<u16>(), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.outstanding += 1;
        true
    }

    /// Makes every pushed chain visible to the device: the ring entries and descriptors before the index.
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        // SAFETY: `idx` is the u16 at offset 2 of the available ring region.
        unsafe { ptr::write_volatile(self.avail.ptr.add(2).cast::<u16>(), self.avail_idx) };
        // Order the index store before the notify that may follow (an MMIO store that traps).
        fence(Ordering::SeqCst);
    }

    /// Whether the device asked not to be notified (VIRTQ_USED_F_NO_NOTIFY).
    pub fn notify_suppressed(&self) -> bool {
        // SAFETY: `flags` is the u16 at offset 0 of the used ring region.
        let flags = unsafe { ptr::read_volatile(self.used.ptr.cast::<u16>()) };
        flags & USED_F_NO_NOTIFY != 0
    }

    /// The next used element, if the device returned one. Everything the device wrote for that chain is visible
    /// once this returns it.
    ///
    /// # Errors
    /// [`QueueError::UsedOverrun`] if the used index claims more chains than are in flight.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, QueueError> {
        // SAFETY: `idx` is the u16 at offset 2 of the used ring region; the device updates it concurrently, hence
        // the volatile read.
        let used_idx = unsafe { ptr::read_volatile(self.used.ptr.add(2).cast::<u16>()) };
        let ready = used_idx.wrapping_sub(self.last_used);
        if ready == 0 {
            return Ok(None);
        }
        if ready > self.outstanding {
            return Err(QueueError::UsedOverrun {
                used_idx,
                last_seen: self.last_used,
            });
        }
        // The element and the buffers it covers were written before the index: read them after it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used & (self.size - 1));
        // SAFETY: used element `slot` (< size) lies at 4 + 8 * slot inside the used ring region.
        let (id, len) = unsafe {
            let p = self.used.ptr.add(4 + 8 * slot);
            (
                ptr::read_volatile(p.cast::<u32>()),
                ptr::read_volatile(p.add(4).cast::<u32>()),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        self.outstanding -= 1;
        Ok(Some(UsedElem { id, len }))
    }
}
