//! The `io` guest's block workload, independent of time and logging so it runs in host tests: it chooses
//! requests, fills write buffers with patterns, and counts and verifies completions.
//!
//! Design: the LBA range is cut into units of one request; each unit's state word remembers the pass of its last
//! completed write ([`UNKNOWN`] = never written in this run, or a write failed so its content is unknown) and a
//! [`BUSY`] bit while a request on it is in flight. So no two requests ever overlap, a read knows exactly which
//! pattern to expect (`crate::virtio_pattern`: sector + seed + pass, so a misplaced, stale or foreign block is a
//! verification failure), and with verification on, a read chosen on a unit of unknown content becomes a write:
//! a fresh volume gets written as the run goes.
//!
//! Invariants: a unit is BUSY exactly while one slot's request on it is in flight; a slot is in the free list
//! exactly while it is idle in the driver; a failed write makes its unit UNKNOWN, a failed read leaves it as it was.

use crate::virtio::Regs;
use crate::virtio_blk::{BlkDriver, BlkError, Completion, Op, MAX_SLOTS, S_OK};
use crate::virtio_pattern::{self as pattern, Found, Rng};

/// Unit state bit: a request on the unit is in flight.
pub const BUSY: u32 = 1 << 31;
/// Unit state: content unknown; any other value (below [`BUSY`]) is the pass of the last completed write.
pub const UNKNOWN: u32 = 0;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Request size in bytes (a multiple of 512, at most the driver's slot size).
    pub bytes: u32,
    /// Percentage of requests that are reads (0-100).
    pub read_pct: u64,
    /// First sector of the range; the range holds `units.len()` requests of `bytes`.
    pub lba_start: u64,
    /// Pattern seed.
    pub seed: u64,
    /// Check read data against the expected pattern.
    pub verify: bool,
}

/// Counters since the start, and for the current window (reset by [`Workload::take_window`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub ok: u64,
    pub err: u64,
    pub verify_fail: u64,
    pub window_done: u64,
    pub window_lat_ticks: u64,
}

/// Something worth a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A request completed with a status other than OK.
    Failed(Completion),
    /// A read completed OK but held other data than the pass last written there.
    VerifyFailed { found: Found, expected_pass: u32 },
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    unit: usize,
    /// For a write: the pass being written; for a read: the pass expected (UNKNOWN: do not verify).
    pass: u32,
    issued: u64,
}

/// A running workload on one device.
#[derive(Debug)]
pub struct Workload<'a, R: Regs> {
    cfg: Config,
    drv: BlkDriver<R>,
    units: &'a mut [u32],
    unit_sectors: u64,
    slots: [Option<Pending>; MAX_SLOTS],
    free: [usize; MAX_SLOTS],
    nfree: usize,
    rng: Rng,
    stats: Stats,
}

impl<'a, R: Regs> Workload<'a, R> {
    /// A workload over `units` (one state word per request-sized unit, all [`UNKNOWN`] at the start). With a
    /// read-only volume every request is a read and verification is off.
    ///
    /// # Errors
    /// [`BlkError::BadLength`] if `bytes` is not a non-zero multiple of 512 within the slots;
    /// [`BlkError::OutOfRange`] if the units do not fit the volume (or there are none).
    pub fn new(drv: BlkDriver<R>, units: &'a mut [u32], mut cfg: Config) -> Result<Self, BlkError> {
        if cfg.bytes == 0 || !cfg.bytes.is_multiple_of(512) || cfg.bytes > drv.slot_bytes() {
            return Err(BlkError::BadLength(cfg.bytes));
        }
        let unit_sectors = u64::from(cfg.bytes / 512);
        let sectors = (units.len() as u64).saturating_mul(unit_sectors);
        if units.is_empty()
            || cfg
                .lba_start
                .checked_add(sectors)
                .is_none_or(|end| end > drv.capacity())
        {
            return Err(BlkError::OutOfRange {
                sector: cfg.lba_start,
                sectors,
            });
        }
        if drv.read_only() {
            cfg.verify = false;
            cfg.read_pct = 100;
        }
        let depth = drv.depth();
        let mut free = [0usize; MAX_SLOTS];
        for (i, f) in free.iter_mut().enumerate().take(depth) {
            *f = depth - 1 - i;
        }
        units.fill(UNKNOWN);
        Ok(Self {
            rng: Rng::new(cfg.seed ^ 0x696f),
            cfg,
            drv,
            units,
            unit_sectors,
            slots: [None; MAX_SLOTS],
            free,
            nfree: depth,
            stats: Stats::default(),
        })
    }

    /// The configuration in force (read-only volumes turn verification off).
    pub fn config(&self) -> Config {
        self.cfg
    }

    /// The driver (status checks, queue facts).
    pub fn driver(&mut self) -> &mut BlkDriver<R> {
        &mut self.drv
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.drv.in_flight()
    }

    /// Whether a slot is free for [`Self::issue`].
    pub fn has_free_slot(&self) -> bool {
        self.nfree > 0
    }

    /// Returns the window counters and starts a new window.
    pub fn take_window(&mut self) -> (u64, u64) {
        let w = (self.stats.window_done, self.stats.window_lat_ticks);
        self.stats.window_done = 0;
        self.stats.window_lat_ticks = 0;
        w
    }

    /// Chooses a unit and an operation, or `None` when every unit probed is busy.
    fn pick(&mut self) -> Option<(usize, Op, u32)> {
        let n = self.units.len() as u64;
        let start = self.rng.below(n);
        let want_read = self.rng.below(100) < self.cfg.read_pct;
        for probe in 0..n.min(64) {
            let unit = usize::try_from((start + probe) % n).unwrap_or(0);
            let state = self.units[unit];
            if state & BUSY != 0 {
                continue;
            }
            let read =
                self.drv.read_only() || (want_read && (!self.cfg.verify || state != UNKNOWN));
            if read {
                let expect = if self.cfg.verify { state } else { UNKNOWN };
                return Some((unit, Op::Read, expect));
            }
            // Passes stay below BUSY; wrapping back to 1 would take 2^31 writes of one unit.
            let pass = if state + 1 >= BUSY { 1 } else { state + 1 };
            return Some((unit, Op::Write, pass));
        }
        None
    }

    /// Submits one request on a free slot (visible to the device after [`Self::kick`]); `Ok(false)` when no slot
    /// is free or every unit probed is busy.
    ///
    /// # Errors
    /// The driver refused the request (cannot happen for a range `new` accepted; reported, not trusted).
    pub fn issue(&mut self, now: u64) -> Result<bool, BlkError> {
        if self.nfree == 0 {
            return Ok(false);
        }
        let Some((unit, op, pass)) = self.pick() else {
            return Ok(false);
        };
        let slot = self.free[self.nfree - 1];
        let sector = self.cfg.lba_start + unit as u64 * self.unit_sectors;
        if op == Op::Write {
            let buf = self.drv.data_mut(slot).ok_or(BlkError::SlotBusy(slot))?;
            let len = usize::try_from(self.cfg.bytes)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            pattern::fill(&mut buf[..len], sector, self.cfg.seed, pass);
        }
        self.drv.submit(slot, op, sector, self.cfg.bytes)?;
        self.nfree -= 1;
        self.units[unit] |= BUSY;
        self.slots[slot] = Some(Pending {
            unit,
            pass,
            issued: now,
        });
        Ok(true)
    }

    /// Makes the issued requests visible to the device (one notify).
    pub fn kick(&mut self) {
        self.drv.kick();
    }

    /// Takes every completion the device has returned; calls `on_event` for failures. Returns how many.
    ///
    /// # Errors
    /// A device protocol violation ([`BlkDriver::poll`]); the workload cannot go on with that device.
    pub fn reap(&mut self, now: u64, on_event: &mut dyn FnMut(Event)) -> Result<usize, BlkError> {
        let mut n = 0;
        while let Some(c) = self.drv.poll()? {
            self.complete(c, now, on_event)?;
            n += 1;
        }
        Ok(n)
    }

    fn complete(
        &mut self,
        c: Completion,
        now: u64,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), BlkError> {
        let slot_index = u32::try_from(c.slot).unwrap_or(u32::MAX);
        let p = self
            .slots
            .get_mut(c.slot)
            .and_then(Option::take)
            .ok_or(BlkError::BadUsedId(slot_index))?;
        self.free[self.nfree] = c.slot;
        self.nfree += 1;
        self.stats.window_done += 1;
        self.stats.window_lat_ticks += now.saturating_sub(p.issued);
        let state = self.units[p.unit] & !BUSY;
        if c.status != S_OK {
            self.stats.err += 1;
            on_event(Event::Failed(c));
            self.units[p.unit] = if c.op == Op::Write { UNKNOWN } else { state };
            return Ok(());
        }
        self.stats.ok += 1;
        if c.op == Op::Write {
            self.units[p.unit] = p.pass;
            return Ok(());
        }
        self.units[p.unit] = state;
        if p.pass == UNKNOWN {
            return Ok(());
        }
        let seed = self.cfg.seed;
        let buf = self
            .drv
            .data_mut(c.slot)
            .ok_or(BlkError::SlotBusy(c.slot))?;
        let len = usize::try_from(c.bytes)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if let Err(found) = pattern::check(&buf[..len], c.sector, seed, p.pass) {
            self.stats.verify_fail += 1;
            on_event(Event::VerifyFailed {
                found,
                expected_pass: p.pass,
            });
        }
        Ok(())
    }
}
