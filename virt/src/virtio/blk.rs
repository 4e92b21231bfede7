//! virtio-blk device model (virtio 1.2 section 5.2) over the virtio-mmio transport, one request queue.
//!
//! Requests (section 5.2.6): a 16-byte device-readable header {type u32, reserved u32, sector u64}, data buffers
//! (device-writable for reads, device-readable for writes), and a final device-writable status byte. The device
//! validates each chain ([`super::queue`]) and its layout, then hands a [`BlockRequest`] naming guest-physical data
//! segments to a [`BlockBackend`]; the kernel's backend maps them to a volume's LBA range and queues them with the
//! IOPS partitioner, and reports back through [`VirtioBlk::complete`].
//!
//! Two kinds of bad input, handled differently:
//! - a request that is well formed as a chain but wrong as a block request (unknown type, sector range beyond the
//!   volume, data not a multiple of 512 bytes, write to a read-only volume) completes with IOERR or UNSUPP and the
//!   device carries on;
//! - a chain that breaks the virtqueue rules (index out of range, loop, indirect, out-of-guest buffer, readable
//!   after writable, no status byte, header short, available index overrun, head re-used while in flight) breaks
//!   the device for this VM (DEVICE_NEEDS_RESET): nothing more is read or written until the driver resets it.
//!
//! Completions are matched by [`RequestId`], which carries the device generation: a completion for a request from
//! before a reset is ignored and never writes guest memory.
//!
//! Offered features: VERSION_1, SEG_MAX, BLK_SIZE, FLUSH, and RO for read-only volumes.

use alloc::vec::Vec;

use super::mmio::{reg, Effect, Transport};
use super::queue::{Chain, ChainError, Segment, MAX_QUEUE_SIZE};
use crate::memory::GuestMemory;

/// Device ID of a block device (section 5).
pub const DEVICE_ID: u32 = 2;
/// VIRTIO_BLK_F_SEG_MAX: `seg_max` is valid.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO: read-only.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE: `blk_size` is valid.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH: flush command.
pub const F_FLUSH: u64 = 1 << 9;
/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Data segments per request the device accepts (reported as `seg_max`).
pub const SEG_MAX: u32 = 128;

/// Request types (section 5.2.6).
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device identifier string.
    pub const GET_ID: u32 = 8;
}

/// Status byte values (section 5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkStatus {
    /// VIRTIO_BLK_S_OK.
    Ok = 0,
    /// VIRTIO_BLK_S_IOERR.
    IoErr = 1,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupported = 2,
}

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// Read sectors into the data segments.
    Read,
    /// Write sectors from the data segments.
    Write,
    /// Flush.
    Flush,
}

/// Identifies a request across the backend round trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestId {
    /// Head descriptor.
    pub head: u16,
    /// Device generation (bumped by every reset).
    pub generation: u32,
}

/// A validated request for the backend. Data segments lie inside guest RAM; their total is a multiple of 512 and
/// the sector range lies inside the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRequest {
    /// For [`VirtioBlk::complete`].
    pub id: RequestId,
    /// Operation.
    pub op: BlkOp,
    /// First 512-byte sector.
    pub sector: u64,
    /// Guest-physical data buffers in order.
    pub data: Vec<Segment>,
}

impl BlockRequest {
    /// Data bytes.
    pub fn bytes(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// What one bounded look at the available ring did ([`VirtioBlk::take_notified`], [`VirtioBlk::poll_queue`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Intake {
    /// Requests taken from the ring (handed to the backend, or answered at once).
    pub taken: usize,
    /// The budget ran out with requests still in the ring: look again.
    pub more: bool,
}

/// Whether the backend finished a request at once or will complete it later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// Queued; [`VirtioBlk::complete`] follows.
    Pending,
    /// Finished with this status.
    Done(BlkStatus),
}

/// Where requests go (the kernel: a volume on NVMe through the IOPS partitioner; tests: memory).
pub trait BlockBackend {
    /// Takes a request. May copy data through `mem` when it finishes at once.
    fn submit(&mut self, mem: &mut dyn GuestMemory, req: BlockRequest) -> Submitted;
}

/// The volume as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Read-only.
    pub read_only: bool,
    /// Logical block size reported (`blk_size`).
    pub block_size: u32,
    /// 20-byte identifier for GET_ID (padded with NULs).
    pub serial: [u8; 20],
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests handed to the backend.
    pub submitted: u64,
    /// Requests completed (any status).
    pub completed: u64,
    /// Requests completed with IOERR or UNSUPP.
    pub failed: u64,
    /// Completions ignored because they belonged to an earlier generation or were not in flight.
    pub stale: u64,
}

/// A request the device still owes an answer.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    status_gpa: u64,
    /// Bytes the device writes on success (read data + status byte).
    written: u32,
}

/// A virtio-blk device on virtio-mmio.
#[derive(Clone, Debug)]
pub struct VirtioBlk {
    transport: Transport,
    cfg: BlkConfig,
    generation: u32,
    in_flight: Vec<Option<InFlight>>,
    /// How many entries of `in_flight` are `Some` (kept so polling need not count them).
    in_flight_count: usize,
    stats: BlkStats,
}

/// Bytes `[from, from + len)` of a segment list, as segments.
fn slice_segments(segs: &[Segment], from: u64, len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let (mut pos, end) = (0u64, from + len);
    for s in segs {
        let (start, stop) = (pos, pos + u64::from(s.len));
        pos = stop;
        let lo = start.max(from);
        let hi = stop.min(end);
        if lo < hi {
            out.push(Segment {
                gpa: s.gpa + (lo - start),
                len: u32::try_from(hi - lo).unwrap_or(u32::MAX),
                write: s.write,
            });
        }
    }
    out
}

/// Reads a segment list's bytes `[0, buf.len())` into `buf`.
fn gather(mem: &dyn GuestMemory, segs: &[Segment], buf: &mut [u8]) -> Result<(), ChainError> {
    let mut at = 0usize;
    for s in segs {
        if at == buf.len() {
            break;
        }
        let n = usize::try_from(s.len)
            .unwrap_or(usize::MAX)
            .min(buf.len() - at);
        mem.read(s.gpa, &mut buf[at..at + n])
            .map_err(|e| ChainError::OutOfGuest {
                gpa: e.gpa,
                len: e.len,
            })?;
        at += n;
    }
    Ok(())
}

/// Parsed request layout or the status to answer at once.
enum Parsed {
    Request(BlockRequest, InFlight),
    Answer(BlkStatus, u64),
}

impl VirtioBlk {
    /// A device for a volume.
    pub fn new(cfg: BlkConfig) -> Self {
        let mut features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if cfg.read_only {
            features |= F_RO;
        }
        Self {
            transport: Transport::new(DEVICE_ID, 1, features),
            cfg,
            generation: 0,
            in_flight: alloc::vec![None; usize::from(MAX_QUEUE_SIZE)],
            in_flight_count: 0,
            stats: BlkStats::default(),
        }
    }

    /// The transport (status, interrupts, negotiated features).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }
    /// Counters.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }
    /// Requests the backend still holds.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    fn config_bytes(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.cfg.sectors.to_le_bytes());
        // size_max (8..12) not offered; seg_max at 12; geometry (16..20) not offered; blk_size at 20.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.cfg.block_size.to_le_bytes());
        c
    }

    /// A guest read of `size` (1, 2 or 4) bytes at `offset` in the register window.
    pub fn mmio_read(&self, offset: u64, size: u8) -> u32 {
        if offset >= reg::CONFIG {
            let c = self.config_bytes();
            let Ok(start) = usize::try_from(offset - reg::CONFIG) else {
                return 0;
            };
            let n = usize::from(size);
            if !matches!(n, 1 | 2 | 4) || start + n > c.len() {
                return 0;
            }
            let mut b = [0u8; 4];
            b[..n].copy_from_slice(&c[start..start + n]);
            return u32::from_le_bytes(b);
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return 0;
        }
        self.transport.read(offset)
    }

    /// A guest write; processes the queue when notified.
    pub fn mmio_write(
        &mut self,
        mem: &mut dyn GuestMemory,
        backend: &mut dyn BlockBackend,
        offset: u64,
        size: u8,
        value: u32,
    ) {
        // Configuration space is read-only for virtio-blk (writeback toggle not offered).
        if offset >= reg::CONFIG || size != 4 || !offset.is_multiple_of(4) {
            return;
        }
        match self.transport.write(mem, offset, value) {
            Effect::None => {}
            Effect::Reset => {
                self.generation = self.generation.wrapping_add(1);
                self.in_flight.iter_mut().for_each(|f| *f = None);
                self.in_flight_count = 0;
            }
            Effect::Notify(_) => {
                self.process(mem, backend, usize::MAX);
            }
        }
    }

    /// Serves a queue notification with bounded work: takes at most `max` requests from the available ring (a
    /// notification handled this way need not be processed at the register write: virtio lets the device look at
    /// the ring after the write completes). `Intake::more` says the ring still holds requests, so the owner must
    /// call again. Does nothing unless the device is live with its queue ready.
    pub fn take_notified(
        &mut self,
        mem: &mut dyn GuestMemory,
        backend: &mut dyn BlockBackend,
        max: usize,
    ) -> Intake {
        if !self.transport.live() || self.transport.queue_mut(0).is_none() {
            return Intake::default();
        }
        self.process(mem, backend, max)
    }

    /// Whether [`VirtioBlk::poll_queue`] has anything to do: requests in flight, or the no-notify request still
    /// set in the used ring.
    pub fn polling(&mut self) -> bool {
        self.in_flight_count > 0 || self.transport.queue_mut(0).is_some_and(|q| q.no_notify)
    }

    /// Polling mode, for an owner that looks at the queue by itself while requests are in flight (it is busy
    /// with the backend then anyway): with requests in flight, asks the driver not to notify
    /// (VIRTQ_USED_F_NO_NOTIFY) and takes whatever the driver made available; with none, clears the request and
    /// looks once more, since a driver that saw the flag set before it was cleared did not notify. A notification
    /// costs the guest a trapped MMIO store; a look costs one read of the available index. Takes at most `max`
    /// requests (`Intake::more`: the ring holds more, look again). Does nothing unless the device is live with its
    /// queue ready.
    pub fn poll_queue(
        &mut self,
        mem: &mut dyn GuestMemory,
        backend: &mut dyn BlockBackend,
        max: usize,
    ) -> Intake {
        if !self.transport.live() {
            return Intake::default();
        }
        let busy = self.in_flight() > 0;
        let Some(q) = self.transport.queue_mut(0) else {
            return Intake::default();
        };
        let was = q.no_notify;
        if let Err(e) = q.set_no_notify(mem, busy) {
            self.transport.break_device(e);
            return Intake::default();
        }
        if busy || was {
            // Clearing the flag must be visible before the available index is read again (store-load order).
            core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
            let got = self.process(mem, backend, max);
            if got.more && !self.polling() {
                // The ring still holds requests the driver published without notifying (the flag was set, or the
                // budget left them), and nothing in flight keeps this device polled: keep asking not to be
                // notified, so the owner's next look takes them. Without this they would wait for a notification
                // the driver never sends (an `io` guest gave up after 10 s without progress).
                if let Some(q) = self.transport.queue_mut(0) {
                    if let Err(e) = q.set_no_notify(mem, true) {
                        self.transport.break_device(e);
                        return Intake {
                            taken: got.taken,
                            more: false,
                        };
                    }
                }
            }
            return got;
        }
        Intake::default()
    }

    /// Takes up to `max` available requests from the queue.
    fn process(
        &mut self,
        mem: &mut dyn GuestMemory,
        backend: &mut dyn BlockBackend,
        max: usize,
    ) -> Intake {
        let mut taken = 0;
        loop {
            if !self.transport.live() {
                return Intake { taken, more: false };
            }
            let Some(q) = self.transport.queue_mut(0) else {
                return Intake { taken, more: false };
            };
            if taken >= max {
                // The budget is spent: only tell whether the ring holds more (one read of its index).
                return match q.pending(mem) {
                    Ok(n) => Intake { taken, more: n > 0 },
                    Err(e) => {
                        self.transport.break_device(e);
                        Intake { taken, more: false }
                    }
                };
            }
            let chain = match q.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => return Intake { taken, more: false },
                Err(e) => {
                    self.transport.break_device(e);
                    return Intake { taken, more: false };
                }
            };
            taken += 1;
            let head = chain.head;
            if self
                .in_flight
                .get(usize::from(head))
                .is_none_or(Option::is_some)
            {
                self.transport.break_device(ChainError::HeadInFlight(head));
                return Intake { taken, more: false };
            }
            match self.parse(mem, chain) {
                Err(e) => {
                    self.transport.break_device(e);
                    return Intake { taken, more: false };
                }
                Ok(Parsed::Answer(status, status_gpa)) => {
                    self.finish(mem, head, status_gpa, status, 1);
                }
                Ok(Parsed::Request(req, fl)) => {
                    self.stats.submitted += 1;
                    self.in_flight[usize::from(head)] = Some(fl);
                    self.in_flight_count += 1;
                    let id = req.id;
                    if let Submitted::Done(status) = backend.submit(mem, req) {
                        self.complete(mem, id, status);
                    }
                }
            }
        }
    }

    fn parse(&self, mem: &mut dyn GuestMemory, chain: Chain) -> Result<Parsed, ChainError> {
        let readable: Vec<Segment> = chain
            .segments
            .iter()
            .copied()
            .filter(|s| !s.write)
            .collect();
        let writable: Vec<Segment> = chain.segments.iter().copied().filter(|s| s.write).collect();
        let (r, w) = (chain.readable_len(), chain.writable_len());
        // Without a header or a status byte the request cannot even be answered: that is a broken driver.
        if r < 16 || w < 1 {
            return Err(ChainError::BadLayout(chain.head));
        }
        let status_seg = slice_segments(&writable, w - 1, 1);
        let status_gpa = status_seg.first().map_or(0, |s| s.gpa);
        let mut h = [0u8; 16];
        gather(mem, &readable, &mut h)?;
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let id = RequestId {
            head: chain.head,
            generation: self.generation,
        };
        let (op, data) = match kind {
            req_type::IN if r == 16 => (BlkOp::Read, slice_segments(&writable, 0, w - 1)),
            req_type::OUT if w == 1 => (BlkOp::Write, slice_segments(&readable, 16, r - 16)),
            req_type::FLUSH if self.transport.accepted_features() & F_FLUSH != 0 => {
                (BlkOp::Flush, Vec::new())
            }
            req_type::GET_ID => {
                let data = slice_segments(&writable, 0, w - 1);
                let mut left = &self.cfg.serial[..];
                for s in &data {
                    let n = usize::try_from(s.len).unwrap_or(usize::MAX).min(left.len());
                    mem.write(s.gpa, &left[..n])
                        .map_err(|e| ChainError::OutOfGuest {
                            gpa: e.gpa,
                            len: e.len,
                        })?;
                    left = &left[n..];
                }
                return Ok(Parsed::Answer(BlkStatus::Ok, status_gpa));
            }
            req_type::IN | req_type::OUT => {
                return Ok(Parsed::Answer(BlkStatus::IoErr, status_gpa))
            }
            _ => return Ok(Parsed::Answer(BlkStatus::Unsupported, status_gpa)),
        };
        let bytes: u64 = data.iter().map(|s| u64::from(s.len)).sum();
        let in_range = sector
            .checked_add(bytes / SECTOR)
            .is_some_and(|end| end <= self.cfg.sectors);
        let bad_len = op != BlkOp::Flush && (bytes == 0 || !bytes.is_multiple_of(SECTOR));
        let too_many = data.len() > usize::try_from(SEG_MAX).unwrap_or(usize::MAX);
        let ro = op == BlkOp::Write && self.cfg.read_only;
        if bad_len || !in_range || too_many || ro {
            return Ok(Parsed::Answer(BlkStatus::IoErr, status_gpa));
        }
        let written = if op == BlkOp::Read {
            u32::try_from(bytes + 1).unwrap_or(u32::MAX)
        } else {
            1
        };
        Ok(Parsed::Request(
            BlockRequest {
                id,
                op,
                sector,
                data,
            },
            InFlight {
                status_gpa,
                written,
            },
        ))
    }

    /// Writes the status byte and returns the chain to the driver.
    fn finish(
        &mut self,
        mem: &mut dyn GuestMemory,
        head: u16,
        status_gpa: u64,
        status: BlkStatus,
        written: u32,
    ) {
        self.stats.completed += 1;
        if status != BlkStatus::Ok {
            self.stats.failed += 1;
        }
        if mem.write(status_gpa, &[status as u8]).is_err() {
            return self.transport.break_device(ChainError::OutOfGuest {
                gpa: status_gpa,
                len: 1,
            });
        }
        let Some(q) = self.transport.queue_mut(0) else {
            return;
        };
        match q.push_used(mem, head, written) {
            Ok(()) => self.transport.raise_used(),
            Err(e) => self.transport.break_device(e),
        }
    }

    /// The backend finished request `id`. Returns false (and touches nothing) if the request is not in flight in
    /// the current generation, e.g. it was issued before a reset or the device broke meanwhile.
    pub fn complete(
        &mut self,
        mem: &mut dyn GuestMemory,
        id: RequestId,
        status: BlkStatus,
    ) -> bool {
        let slot = self.in_flight.get_mut(usize::from(id.head));
        let fl = match slot {
            Some(s) if id.generation == self.generation && s.is_some() => s.take(),
            _ => None,
        };
        let Some(fl) = fl else {
            self.stats.stale += 1;
            return false;
        };
        self.in_flight_count -= 1;
        if !self.transport.live() {
            self.stats.stale += 1;
            return false;
        }
        let written = if status == BlkStatus::Ok {
            fl.written
        } else {
            1
        };
        self.finish(mem, id.head, fl.status_gpa, status, written);
        true
    }
}
