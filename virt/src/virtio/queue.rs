//! Split virtqueues (virtio 1.2 section 2.7): ring layout, validated descriptor-chain walking, used-ring updates.
//!
//! Everything here reads guest-controlled memory, so every access goes through [`GuestMemory`] (bounds-checked) and
//! every value read is distrusted: a head or `next` index beyond the queue, a chain longer than the queue (which is
//! how a loop shows), an indirect descriptor (not negotiated), a device-readable descriptor after a device-writable
//! one (section 2.7.4.2), a buffer outside guest RAM, or an available index that runs ahead by more than the queue
//! size are all [`ChainError`]s. The caller treats any of them as a broken device; none of them panics or touches
//! memory outside the guest.

use alloc::vec::Vec;

use crate::memory::{check_range, GuestMemory};

/// Descriptor flag: the buffer continues via `next` (section 2.7.5).
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds an indirect table (section 2.7.5.3; not offered by this device).
pub const DESC_F_INDIRECT: u16 = 4;
/// Used-ring flag: the device asks the driver not to notify (section 2.7.10).
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Largest queue this implementation offers (QueueNumMax).
pub const MAX_QUEUE_SIZE: u16 = 256;

/// Why a queue or chain cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// Queue size zero, above the maximum or not a power of two, or a misaligned ring address (section 2.7).
    BadQueueConfig,
    /// A ring area or buffer lies (partly) outside guest RAM.
    OutOfGuest { gpa: u64, len: u64 },
    /// A head or `next` index is not below the queue size.
    BadIndex(u16),
    /// The chain has more descriptors than the queue: a loop.
    Loop,
    /// INDIRECT flag without the feature.
    Indirect,
    /// A device-readable descriptor follows a device-writable one.
    ReadAfterWrite,
    /// The driver published more new entries than the queue holds.
    AvailOverrun { pending: u16 },
    /// The same head was made available again while the device still owns it.
    HeadInFlight(u16),
    /// The chain lacks what its device type requires (virtio-blk: a 16-byte header and a status byte).
    BadLayout(u16),
}

/// One buffer of a chain: guest-physical range and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address (checked inside RAM).
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (the device fills it); otherwise device-readable.
    pub write: bool,
}

/// A validated descriptor chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index (the id returned in the used ring).
    pub head: u16,
    /// Buffers in order: all readable ones, then all writable ones.
    pub segments: Vec<Segment>,
}

impl Chain {
    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| !s.write)
            .map(|s| u64::from(s.len))
            .sum()
    }
    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.segments
            .iter()
            .filter(|s| s.write)
            .map(|s| u64::from(s.len))
            .sum()
    }
}

/// A configured split virtqueue and the device's position in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitQueue {
    /// Entries (power of two).
    pub size: u16,
    /// Descriptor table (16-byte aligned).
    pub desc: u64,
    /// Available ring, "driver area" (2-byte aligned).
    pub avail: u64,
    /// Used ring, "device area" (4-byte aligned).
    pub used: u64,
    /// Next available-ring slot the device will read.
    pub last_avail: u16,
    /// Next used-ring index the device will write.
    pub used_idx: u16,
    /// The device last wrote VIRTQ_USED_F_NO_NOTIFY into the used ring's flags ([`SplitQueue::set_no_notify`]).
    pub no_notify: bool,
}

fn read_u16(mem: &dyn GuestMemory, gpa: u64) -> Result<u16, ChainError> {
    let mut b = [0u8; 2];
    mem.read(gpa, &mut b).map_err(|e| ChainError::OutOfGuest {
        gpa: e.gpa,
        len: e.len,
    })?;
    Ok(u16::from_le_bytes(b))
}

impl SplitQueue {
    /// Checks the layout the driver programmed (section 2.7: alignment 16/2/4; all three areas inside RAM).
    pub fn new(
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        mem: &dyn GuestMemory,
    ) -> Result<Self, ChainError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(ChainError::BadQueueConfig);
        }
        if !desc.is_multiple_of(16) || !avail.is_multiple_of(2) || !used.is_multiple_of(4) {
            return Err(ChainError::BadQueueConfig);
        }
        let n = u64::from(size);
        for (gpa, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
            check_range(gpa, len, mem.size()).map_err(|_| ChainError::OutOfGuest { gpa, len })?;
        }
        Ok(Self {
            size,
            desc,
            avail,
            used,
            last_avail: 0,
            used_idx: 0,
            no_notify: false,
        })
    }

    /// New heads the driver has made available, without consuming them.
    pub fn pending(&self, mem: &dyn GuestMemory) -> Result<u16, ChainError> {
        let idx = read_u16(mem, self.avail + 2)?;
        let pending = idx.wrapping_sub(self.last_avail);
        if pending > self.size {
            return Err(ChainError::AvailOverrun { pending });
        }
        Ok(pending)
    }

    /// Takes the next available chain, validated; `Ok(None)` when none is pending.
    pub fn pop(&mut self, mem: &dyn GuestMemory) -> Result<Option<Chain>, ChainError> {
        if self.pending(mem)? == 0 {
            return Ok(None);
        }
        let slot = u64::from(self.last_avail % self.size);
        let head = read_u16(mem, self.avail + 4 + 2 * slot)?;
        let chain = self.walk(head, mem)?;
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    fn walk(&self, head: u16, mem: &dyn GuestMemory) -> Result<Chain, ChainError> {
        let mut segments = Vec::new();
        let mut index = head;
        let mut seen_write = false;
        loop {
            if index >= self.size {
                return Err(ChainError::BadIndex(index));
            }
            if segments.len() >= usize::from(self.size) {
                return Err(ChainError::Loop);
            }
            let mut d = [0u8; 16];
            let at = self.desc + 16 * u64::from(index);
            mem.read(at, &mut d).map_err(|e| ChainError::OutOfGuest {
                gpa: e.gpa,
                len: e.len,
            })?;
            let gpa = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
            let len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
            let flags = u16::from_le_bytes([d[12], d[13]]);
            let next = u16::from_le_bytes([d[14], d[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect);
            }
            let write = flags & DESC_F_WRITE != 0;
            if !write && seen_write {
                return Err(ChainError::ReadAfterWrite);
            }
            seen_write |= write;
            check_range(gpa, u64::from(len), mem.size()).map_err(|_| ChainError::OutOfGuest {
                gpa,
                len: u64::from(len),
            })?;
            segments.push(Segment { gpa, len, write });
            if flags & DESC_F_NEXT == 0 {
                return Ok(Chain { head, segments });
            }
            index = next;
        }
    }

    /// Sets (`on`) or clears VIRTQ_USED_F_NO_NOTIFY in the used ring's flags (section 2.7.10): while it is set the
    /// driver need not notify after making buffers available, so the device must look at the available ring by
    /// itself. The flags are written only when the wanted state changes. A device clearing the flag must look at
    /// the available ring once more afterwards (with a full fence between, [`core::sync::atomic::fence`]): a
    /// driver that read the flag set before it was cleared did not notify.
    pub fn set_no_notify(&mut self, mem: &mut dyn GuestMemory, on: bool) -> Result<(), ChainError> {
        if self.no_notify == on {
            return Ok(());
        }
        let flags: u16 = if on { USED_F_NO_NOTIFY } else { 0 };
        mem.write(self.used, &flags.to_le_bytes())
            .map_err(|x| ChainError::OutOfGuest {
                gpa: x.gpa,
                len: x.len,
            })?;
        self.no_notify = on;
        Ok(())
    }

    /// Returns chain `head` to the driver with `written` bytes written (section 2.7.8), then publishes the new used
    /// index.
    pub fn push_used(
        &mut self,
        mem: &mut dyn GuestMemory,
        head: u16,
        written: u32,
    ) -> Result<(), ChainError> {
        let slot = u64::from(self.used_idx % self.size);
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        e[4..].copy_from_slice(&written.to_le_bytes());
        let at = self.used + 4 + 8 * slot;
        mem.write(at, &e).map_err(|x| ChainError::OutOfGuest {
            gpa: x.gpa,
            len: x.len,
        })?;
        self.used_idx = self.used_idx.wrapping_add(1);
        mem.write(self.used + 2, &self.used_idx.to_le_bytes())
            .map_err(|x| ChainError::OutOfGuest {
                gpa: x.gpa,
                len: x.len,
            })
    }
}
