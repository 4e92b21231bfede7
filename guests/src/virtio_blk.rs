//! A virtio-blk driver (virtio 1.2 section 5.2) on [`crate::virtio`]: one request queue, a fixed set of request
//! slots, non-blocking submit and poll.
//!
//! Design: slot `i` owns descriptors `3i` (16-byte header, device-readable), `3i + 1` (its data buffer) and `3i + 2`
//! (the status byte, device-writable); a chain's head is therefore `3i`, and a used element maps back to its slot
//! without any search. Header and status share one 32-byte DMA block per slot; the data buffer is one contiguous
//! block of the largest request size, so every request is a three-descriptor chain (two for FLUSH). The caller
//! fills or reads a slot's buffer only while the slot is idle ([`BlkDriver::data_mut`]), submits with
//! [`BlkDriver::submit`] (any number), makes them visible with one [`BlkDriver::kick`] (one MMIO write, so one
//! exit, per batch), and collects completions with [`BlkDriver::poll`], which never blocks: the guest decides how
//! to wait (the ABI has no interrupts; docs/guest-abi.md says to sleep briefly or yield between polls).
//!
//! Invariants: a slot is in flight from `submit` until `poll` returns it, and only idle slots can be submitted or
//! have their buffer borrowed; the status byte is set to [`STATUS_UNSET`] before each submission, so a completion
//! whose status the device did not write is detected; a used element that names no in-flight slot is a
//! [`BlkError::BadUsedId`], never trusted.

use crate::virtio::{
    self, DmaRegion, InitError, QueueError, Regs, Virtqueue, DESC_F_NEXT, DESC_F_WRITE,
};
use core::ptr;

/// Device ID of a block device.
pub const DEVICE_ID: u32 = 2;
/// Sector size of the protocol.
pub const SECTOR: u32 = 512;
/// Most request slots (three descriptors each must fit the largest queue).
pub const MAX_SLOTS: usize = 64;
/// What the status byte holds until the device writes it.
pub const STATUS_UNSET: u8 = 0xff;

/// VIRTIO_BLK_F_RO: the volume is read-only.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE: `blk_size` is valid.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH: FLUSH is supported.
pub const F_FLUSH: u64 = 1 << 9;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// Status byte values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// A request's operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub slot: usize,
    pub op: Op,
    pub sector: u64,
    pub bytes: u32,
    /// [`S_OK`], [`S_IOERR`], [`S_UNSUPP`] (or another value a device wrote).
    pub status: u8,
    /// Bytes the device reports having written (data read plus the status byte).
    pub written: u32,
}

/// A request the driver refuses, or a device that broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The slot does not exist or is in flight.
    SlotBusy(usize),
    /// The length is 0, not a multiple of 512, or larger than the slot buffer.
    BadLength(u32),
    /// The sector range lies (partly) beyond the capacity.
    OutOfRange { sector: u64, sectors: u64 },
    /// A write to a read-only volume.
    ReadOnly,
    /// The device does not offer FLUSH.
    NoFlush,
    /// The used ring named a chain that is not in flight.
    BadUsedId(u32),
    /// The device left a chain's status byte unwritten.
    StatusUnset { slot: usize },
    /// The used index moved beyond what was published.
    Queue(QueueError),
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::SlotBusy(s) => write!(f, "slot {s} is busy or does not exist"),
            Self::BadLength(n) => write!(
                f,
                "length {n} is not a non-zero multiple of 512 within the slot"
            ),
            Self::OutOfRange { sector, sectors } => {
                write!(f, "sectors [{sector}, +{sectors}) beyond the capacity")
            }
            Self::ReadOnly => f.write_str("write to a read-only volume"),
            Self::NoFlush => f.write_str("the device does not offer FLUSH"),
            Self::BadUsedId(id) => write!(f, "device returned chain {id}, which is not in flight"),
            Self::StatusUnset { slot } => {
                write!(f, "device completed slot {slot} without writing its status")
            }
            Self::Queue(QueueError::UsedOverrun {
                used_idx,
                last_seen,
            }) => write!(
                f,
                "used index {used_idx} ran ahead of the chains in flight (last seen {last_seen})"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Header at offset 0 (16 bytes), status byte at offset 16.
    meta: DmaRegion,
    data: DmaRegion,
    busy: bool,
    op: Op,
    sector: u64,
    bytes: u32,
}

/// A live virtio-blk device.
#[derive(Debug)]
pub struct BlkDriver<R: Regs> {
    regs: R,
    queue: Virtqueue,
    slots: [Option<Slot>; MAX_SLOTS],
    depth: usize,
    slot_bytes: u32,
    capacity: u64,
    features: u64,
    in_flight: usize,
}

impl<R: Regs> BlkDriver<R> {
    /// Identifies and initialises the device behind `regs`, with up to `depth` request slots of `slot_bytes` each
    /// (a multiple of 512) allocated from `dma`. The depth actually granted ([`Self::depth`]) is also bounded by
    /// [`MAX_SLOTS`] and by a third of the queue size the device allows.
    ///
    /// # Errors
    /// Any [`InitError`]; the device is left with FAILED set when it got that far.
    pub fn init(
        mut regs: R,
        dma: &mut virtio::Dma,
        depth: usize,
        slot_bytes: u32,
    ) -> Result<Self, InitError> {
        virtio::identify(&mut regs, DEVICE_ID)?;
        let features = virtio::negotiate(&mut regs, F_RO | F_BLK_SIZE | F_FLUSH)?;
        let capacity = virtio::read_config(&mut regs, 0, 8);
        regs.write32(virtio::reg::QUEUE_SEL, 0);
        let num_max = regs.read32(virtio::reg::QUEUE_NUM_MAX);
        let busy = regs.read32(virtio::reg::QUEUE_READY) != 0;
        let limit = u16::try_from(num_max)
            .unwrap_or(u16::MAX)
            .min(virtio::MAX_QUEUE);
        if busy || limit < 4 {
            virtio::fail(&mut regs);
            return Err(InitError::QueueUnavailable { num_max });
        }
        // The largest power of two the device allows.
        let size = 1u16 << (15 - limit.leading_zeros());
        let depth = depth.clamp(1, MAX_SLOTS).min(usize::from(size) / 3);
        let result = Self::setup(&mut regs, dma, size, depth, slot_bytes);
        let (queue, slots) = match result {
            Ok(v) => v,
            Err(e) => {
                virtio::fail(&mut regs);
                return Err(e);
            }
        };
        virtio::driver_ok(&mut regs)?;
        Ok(Self {
            regs,
            queue,
            slots,
            depth,
            slot_bytes,
            capacity,
            features,
            in_flight: 0,
        })
    }

    #[allow(clippy::type_complexity)] // one-use tuple of the two allocations
    fn setup(
        regs: &mut R,
        dma: &mut virtio::Dma,
        size: u16,
        depth: usize,
        slot_bytes: u32,
    ) -> Result<(Virtqueue, [Option<Slot>; MAX_SLOTS]), InitError> {
        let queue = Virtqueue::new(dma, size)?;
        let data_len = usize::try_from(slot_bytes).unwrap_or(usize::MAX);
        let mut slots = [None; MAX_SLOTS];
        for slot in slots.iter_mut().take(depth) {
            let remaining = dma.remaining();
            let oom = InitError::OutOfMemory {
                wanted: 32 + data_len,
                remaining,
            };
            let meta = dma.alloc(32, 16).ok_or(oom)?;
            let data = dma.alloc(data_len, 4096).ok_or(oom)?;
            *slot = Some(Slot {
                meta,
                data,
                busy: false,
                op: Op::Read,
                sector: 0,
                bytes: 0,
            });
        }
        queue.attach(regs, 0)?;
        Ok((queue, slots))
    }

    /// Request slots available (`0..depth`).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Largest request in bytes.
    pub fn slot_bytes(&self) -> u32 {
        self.slot_bytes
    }

    /// Volume size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Features negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether the volume is read-only.
    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    /// Forgets that the device announced `VIRTIO_BLK_F_RO`, so writes are submitted anyway: a misbehaving guest,
    /// for tests of the device's side (it must fail every write to a read-only volume with IOERR).
    pub fn submit_writes_anyway(&mut self) {
        self.features &= !F_RO;
    }

    /// Requests submitted and not yet returned by [`Self::poll`].
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queue entries negotiated.
    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    /// Whether slot `slot` exists and is idle.
    pub fn is_idle(&self, slot: usize) -> bool {
        self.slot(slot).is_some_and(|s| !s.busy)
    }

    fn slot(&self, slot: usize) -> Option<&Slot> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    /// The data buffer of an idle slot (`slot_bytes` long); `None` for a slot in flight or beyond the depth.
    pub fn data_mut(&mut self, slot: usize) -> Option<&mut [u8]> {
        let s = self.slot(slot).filter(|s| !s.busy)?;
        // SAFETY: the region was allocated for this slot alone and the device touches it only while the slot is
        // in flight; `&mut self` keeps the slot idle for as long as the slice lives.
        Some(unsafe { core::slice::from_raw_parts_mut(s.data.ptr, s.data.len) })
    }

    /// The device's `Status` register (one MMIO read): check DEVICE_NEEDS_RESET with it now and then.
    pub fn device_status(&mut self) -> u32 {
        self.regs.read32(virtio::reg::STATUS)
    }

    /// Queues a request on idle slot `slot`: read `bytes` at `sector` into its buffer, write `bytes` of its buffer
    /// there, or flush. Nothing reaches the device until [`Self::kick`].
    ///
    /// # Errors
    /// A [`BlkError`] describing why the request is refused; nothing is queued then.
    pub fn submit(&mut self, slot: usize, op: Op, sector: u64, bytes: u32) -> Result<(), BlkError> {
        let features = self.features;
        let (capacity, slot_bytes) = (self.capacity, self.slot_bytes);
        let s = match self.slots.get_mut(slot) {
            Some(Some(s)) if !s.busy => s,
            _ => return Err(BlkError::SlotBusy(slot)),
        };
        match op {
            Op::Flush if features & F_FLUSH == 0 => return Err(BlkError::NoFlush),
            Op::Flush => {}
            _ => {
                if bytes == 0 || !bytes.is_multiple_of(SECTOR) || bytes > slot_bytes {
                    return Err(BlkError::BadLength(bytes));
                }
                let sectors = u64::from(bytes / SECTOR);
                if sector.checked_add(sectors).is_none_or(|end| end > capacity) {
                    return Err(BlkError::OutOfRange { sector, sectors });
                }
                if op == Op::Write && features & F_RO != 0 {
                    return Err(BlkError::ReadOnly);
                }
            }
        }
        let kind = match op {
            Op::Read => T_IN,
            Op::Write => T_OUT,
            Op::Flush => T_FLUSH,
        };
        // SAFETY: the 32-byte meta block belongs to this idle slot; the device reads it only once published.
        unsafe {
            let p = s.meta.ptr;
            ptr::write_volatile(p.cast::<u32>(), kind);
            ptr::write_volatile(p.add(4).cast::<u32>(), 0);
            ptr::write_volatile(
                p.add(8).cast::<u64>(),
                if op == Op::Flush { 0 } else { sector },
            );
            ptr::write_volatile(p.add(16), STATUS_UNSET);
        }
        let (meta, data) = (s.meta.phys, s.data.phys);
        s.busy = true;
        s.op = op;
        s.sector = sector;
        s.bytes = if op == Op::Flush { 0 } else { bytes };
        // Slot indices are below MAX_SLOTS (64), so 3 * slot + 2 fits the queue (depth <= size / 3).
        let head = u16::try_from(3 * slot).unwrap_or(u16::MAX);
        if op == Op::Flush {
            self.queue.set_desc(head, meta, 16, DESC_F_NEXT, head + 2);
        } else {
            self.queue.set_desc(head, meta, 16, DESC_F_NEXT, head + 1);
            let flags = DESC_F_NEXT | if op == Op::Read { DESC_F_WRITE } else { 0 };
            self.queue.set_desc(head + 1, data, bytes, flags, head + 2);
        }
        self.queue.set_desc(head + 2, meta + 16, 1, DESC_F_WRITE, 0);
        // Room is guaranteed: at most `depth` chains are ever in flight and depth <= size / 3.
        let pushed = self.queue.push(head);
        debug_assert!(pushed, "queue full with an idle slot");
        self.in_flight += 1;
        Ok(())
    }

    /// Publishes every submitted request and notifies the device (unless it asked not to be).
    pub fn kick(&mut self) {
        self.queue.publish();
        if !self.queue.notify_suppressed() {
            self.regs.write32(virtio::reg::QUEUE_NOTIFY, 0);
        }
    }

    /// The next finished request, if any; its slot is idle again and, for a successful read, its buffer holds the
    /// data.
    ///
    /// # Errors
    /// A device that broke the protocol: [`BlkError::Queue`], [`BlkError::BadUsedId`] or
    /// [`BlkError::StatusUnset`]. The driver cannot recover the queue from these; reset the device.
    pub fn poll(&mut self) -> Result<Option<Completion>, BlkError> {
        let Some(used) = self.queue.pop_used().map_err(BlkError::Queue)? else {
            return Ok(None);
        };
        let index = usize::try_from(used.id / 3).unwrap_or(usize::MAX);
        let s = match self.slots.get_mut(index) {
            Some(Some(s)) if used.id % 3 == 0 && s.busy => s,
            _ => return Err(BlkError::BadUsedId(used.id)),
        };
        s.busy = false;
        self.in_flight -= 1;
        // SAFETY: the status byte lies at offset 16 of this slot's meta block; the device wrote it before the used
        // element, which `pop_used` has read after an acquire fence.
        let status = unsafe { ptr::read_volatile(s.meta.ptr.add(16)) };
        if status == STATUS_UNSET {
            return Err(BlkError::StatusUnset { slot: index });
        }
        Ok(Some(Completion {
            slot: index,
            op: s.op,
            sector: s.sector,
            bytes: s.bytes,
            status,
            written: used.len,
        }))
    }
}
