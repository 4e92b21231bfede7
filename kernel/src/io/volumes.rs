//! Volumes on an NVMe namespace, scheduled by the IOPS partitioner (`sched::iops`).
//!
//! A volume is an LBA range of a namespace with a commitment, limit, weight, burst bucket and overage policy
//! (`sched::iops::VolumeConfig`); adding one goes through the partitioner's admission control. Requests arrive
//! with [`Engine::enqueue`] (range-checked against the volume, translated to namespace LBAs) and wait in the
//! partitioner; [`Engine::pump`] reaps NVMe completions (charging them back to the partitioner with their device
//! time) and then submits whatever the partitioner dispatches while the device queue has room. The engine never
//! decides order itself: that is the partitioner's job (DESIGN.md, "IOPS partitioning model").
//!
//! Invariants: every request accepted by `enqueue` produces exactly one [`Done`] (success, device or driver
//! error status); a request the driver refuses after dispatch completes with an error status, it is not lost.
//! Time is nanoseconds from the caller's clock, passed in.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use drivers::nvme::{Completion, Controller, Hal, IoOp, IoRequest, Namespace, NvmeError, Status};
use sched::iops::{
    self, AdmissionLimits, DeviceConfig, IopsError, Partitioner, Request, VolumeConfig, VolumeId,
    WindowReport,
};

use crate::arch::x86_64::tsc;

/// Where a volume lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Namespace.
    pub nsid: u32,
    /// First namespace LBA of the volume.
    pub first_lba: u64,
    /// Length in logical blocks.
    pub blocks: u64,
}

/// Why the engine refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineError {
    /// The partitioner refused (admission numbers, queue full, unknown volume...).
    Iops(IopsError),
    /// The extent does not fit its namespace, or the namespace does not exist.
    BadExtent(Extent),
    /// The request leaves the volume.
    OutOfVolume {
        /// First block (volume-relative).
        lba: u64,
        /// Blocks.
        blocks: u32,
        /// Volume size.
        size: u64,
    },
    /// No such volume.
    UnknownVolume(VolumeId),
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// Caller's token from `enqueue`.
    pub token: u64,
    /// Volume.
    pub volume: VolumeId,
    /// Outcome.
    pub status: Status,
}

/// Where [`Engine::pump`]'s time goes, in TSC ticks (the service prints it per request in `CV:IOSUM`): reaping
/// (the driver's poll: CQ reads, head doorbell, health check), charging completions to the partitioner, asking it
/// for the next request, staging submissions, and the tail doorbell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PumpProfile {
    /// Engine pumps, and those whose poll reaped nothing.
    pub pumps: u64,
    pub empty_polls: u64,
    /// Completions reaped and requests submitted.
    pub reaped: u64,
    pub submitted: u64,
    /// Partitioner `dispatch` calls (one more than the dispatched requests when the queue drains).
    pub dispatch_calls: u64,
    pub poll_ticks: u64,
    pub complete_ticks: u64,
    pub dispatch_ticks: u64,
    pub submit_ticks: u64,
    pub flush_ticks: u64,
}

struct Waiting {
    volume: VolumeId,
    token: u64,
    io: IoRequest,
    request: Request,
}

struct Issued {
    volume: VolumeId,
    token: u64,
    request: Request,
    submitted_ns: u64,
}

/// The partitioned I/O path of one controller queue.
pub struct Engine {
    part: Partitioner,
    extents: BTreeMap<VolumeId, Extent>,
    namespaces: Vec<Namespace>,
    waiting: BTreeMap<u64, Waiting>,
    issued: BTreeMap<u64, Issued>,
    /// Dispatched by the partitioner but refused by a full device queue: first in line next time.
    overflow: VecDeque<u64>,
    next_id: u64,
    qid: u16,
    max_inflight: usize,
    /// Submissions are batched: while the device holds more than `max_inflight - submit_batch` commands the
    /// engine does not refill it, so one tail doorbell carries up to `submit_batch` commands (see [`Engine::pump`]).
    submit_batch: usize,
    /// Requests of removed volumes, answered at the next pump.
    orphans: Vec<Done>,
    prof: PumpProfile,
}

fn to_sched_op(op: IoOp) -> iops::IoOp {
    match op {
        IoOp::Read => iops::IoOp::Read,
        IoOp::Write | IoOp::Flush => iops::IoOp::Write,
    }
}

impl Engine {
    /// An engine on queue `qid` of a controller whose namespaces are `namespaces`, keeping at most `max_inflight`
    /// commands on the device; `device` carries the calibrated capacity.
    pub fn new(
        device: DeviceConfig,
        namespaces: &[Namespace],
        qid: u16,
        max_inflight: usize,
        now: u64,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            part: Partitioner::new(device, now).map_err(EngineError::Iops)?,
            extents: BTreeMap::new(),
            namespaces: namespaces.to_vec(),
            waiting: BTreeMap::new(),
            issued: BTreeMap::new(),
            overflow: VecDeque::new(),
            next_id: 1,
            qid,
            max_inflight: max_inflight.max(1),
            submit_batch: (max_inflight / 4).max(1),
            orphans: Vec::new(),
            prof: PumpProfile::default(),
        })
    }

    /// Adds a volume after checking its extent and the partitioner's admission control.
    pub fn add_volume(
        &mut self,
        extent: Extent,
        cfg: VolumeConfig,
        now: u64,
    ) -> Result<VolumeId, EngineError> {
        let fits = self.namespaces.iter().any(|n| {
            n.nsid == extent.nsid
                && extent.blocks > 0
                && extent
                    .first_lba
                    .checked_add(extent.blocks)
                    .is_some_and(|e| e <= n.blocks)
        });
        if !fits {
            return Err(EngineError::BadExtent(extent));
        }
        let id = self.part.add_volume(cfg, now).map_err(EngineError::Iops)?;
        self.extents.insert(id, extent);
        Ok(id)
    }

    /// Changes a volume's commitment, limit, weight or policy at run time (admission checked; takes effect at
    /// once in the partitioner).
    pub fn reconfigure(
        &mut self,
        id: VolumeId,
        cfg: VolumeConfig,
        now: u64,
    ) -> Result<(), EngineError> {
        self.part
            .reconfigure(id, cfg, now)
            .map_err(EngineError::Iops)
    }

    /// Removes a volume (its owner is gone). Requests still queued in the partitioner complete at the next
    /// [`Engine::pump`] with [`Status::INVALID_FIELD`]; requests already on the device complete normally. Either way every accepted request still produces its one [`Done`].
    pub fn remove_volume(&mut self, id: VolumeId, now: u64) -> Result<(), EngineError> {
        let dropped = self
            .part
            .remove_volume(id, now)
            .map_err(EngineError::Iops)?;
        self.extents.remove(&id);
        for r in dropped {
            if let Some(w) = self.waiting.remove(&r.id) {
                self.orphans.push(Done {
                    token: w.token,
                    volume: w.volume,
                    status: Status::INVALID_FIELD,
                });
            }
        }
        Ok(())
    }

    /// Applies an I/O credit grant to a volume's burst bucket, once per grant id (see
    /// `sched::iops::Partitioner::top_up`).
    pub fn top_up(
        &mut self,
        id: VolumeId,
        grant_id: u64,
        ios: u64,
        now: u64,
    ) -> Result<iops::TopUp, EngineError> {
        self.part
            .top_up(id, grant_id, ios, now)
            .map_err(EngineError::Iops)
    }

    /// A volume's burst bucket (earned and grant tokens), if it has one.
    pub fn burst_bucket(&self, id: VolumeId) -> Result<Option<iops::BurstBucket>, EngineError> {
        self.part.burst_bucket(id).map_err(EngineError::Iops)
    }

    /// A volume's configuration.
    pub fn volume_config(&self, id: VolumeId) -> Result<VolumeConfig, EngineError> {
        self.part.volume_config(id).map_err(EngineError::Iops)
    }

    /// The admission numbers for a further commitment of `requested` IOPS (capacity, committable, committed).
    pub fn admission_limits(&self, requested: u64) -> AdmissionLimits {
        self.part.admission_limits(requested)
    }

    /// Hands every closed telemetry window (per volume) to `f`, oldest first.
    pub fn drain_reports(&mut self, f: &mut dyn FnMut(WindowReport)) {
        for r in self.part.drain_reports() {
            f(r);
        }
    }

    /// Where the pumps' time went so far.
    pub fn profile(&self) -> PumpProfile {
        self.prof
    }

    /// Requests waiting in the partitioner or on the device.
    pub fn outstanding(&self) -> usize {
        self.waiting.len() + self.issued.len() + self.orphans.len()
    }

    /// Queues a read or write of `blocks` blocks at volume-relative `lba` into/from `pages` (page-aligned host
    /// physical buffer pages, as `drivers::nvme::IoRequest` wants them).
    #[allow(clippy::too_many_arguments)] // one request's fields; a struct would only rename them
    pub fn enqueue(
        &mut self,
        volume: VolumeId,
        op: IoOp,
        lba: u64,
        blocks: u32,
        pages: Vec<u64>,
        token: u64,
        now: u64,
    ) -> Result<(), EngineError> {
        let ext = *self
            .extents
            .get(&volume)
            .ok_or(EngineError::UnknownVolume(volume))?;
        let inside = lba
            .checked_add(u64::from(blocks))
            .is_some_and(|e| e <= ext.blocks);
        if op != IoOp::Flush && (blocks == 0 || !inside) {
            return Err(EngineError::OutOfVolume {
                lba,
                blocks,
                size: ext.blocks,
            });
        }
        let lba_size = self
            .namespaces
            .iter()
            .find(|n| n.nsid == ext.nsid)
            .map_or(512, |n| u64::from(n.lba_size));
        let bytes = u32::try_from(u64::from(blocks) * lba_size).unwrap_or(u32::MAX);
        let id = self.next_id;
        self.next_id += 1;
        let request = Request {
            id,
            bytes,
            op: to_sched_op(op),
        };
        self.part
            .enqueue(volume, request, now)
            .map_err(EngineError::Iops)?;
        let io = IoRequest {
            tag: id,
            nsid: ext.nsid,
            op,
            lba: ext.first_lba + lba,
            blocks,
            pages,
        };
        self.waiting.insert(
            id,
            Waiting {
                volume,
                token,
                io,
                request,
            },
        );
        Ok(())
    }

    /// Reaps completions, then feeds the device from the partitioner. `now` is read before each step by the
    /// caller's clock function so that waits and service times are charged accurately.
    ///
    /// Refills are batched: with more than `max_inflight - max_inflight / 4` commands on the device it is busy for
    /// a while yet, so the engine waits until a quarter of its slots are free and then submits them together
    /// behind one tail doorbell. Under QEMU every doorbell write is an exit to the device model (~15 us measured,
    /// `CV:IOPROF`); refilling one slot per completion cost one doorbell per request on a saturated device. Below
    /// the mark the device is fed at once, so a lightly loaded device sees no added latency.
    pub fn pump<H: Hal>(
        &mut self,
        ctrl: &mut Controller<H>,
        clock: &mut dyn FnMut() -> u64,
        out: &mut dyn FnMut(Done),
    ) {
        self.pump_until(ctrl, clock, out, u64::MAX);
    }

    /// [`Self::pump`], but no refill starts once the TSC has reached `until` (the end of the I/O server's slice)
    /// while the device still has commands: completions are all reaped, and a refill, once started, completes (a
    /// batch behind one doorbell: cutting it would cost a doorbell per few commands, measured 0.21 -> 0.47 register
    /// writes per request). An idle device is always fed. The partitioner's order is kept.
    pub fn pump_until<H: Hal>(
        &mut self,
        ctrl: &mut Controller<H>,
        clock: &mut dyn FnMut() -> u64,
        out: &mut dyn FnMut(Done),
        until: u64,
    ) {
        for d in self.orphans.drain(..) {
            out(d);
        }
        let t0 = tsc::rdtsc();
        let mut reaped: Vec<Completion> = Vec::new();
        ctrl.poll(self.qid, &mut |c| reaped.push(c));
        let t1 = tsc::rdtsc();
        self.prof.pumps += 1;
        self.prof.poll_ticks += t1.saturating_sub(t0);
        self.prof.reaped += u64::try_from(reaped.len()).unwrap_or(u64::MAX);
        if reaped.is_empty() {
            self.prof.empty_polls += 1;
        }
        let now = clock();
        for c in reaped {
            let Some(done) = self.issued.remove(&c.tag) else {
                continue;
            };
            let service = now.saturating_sub(done.submitted_ns);
            // The volume may have been removed meanwhile; the device-wide accounting still counts it.
            let _ = self.part.complete(done.volume, &done.request, service, now);
            out(Done {
                token: done.token,
                volume: done.volume,
                status: c.status,
            });
        }
        self.prof.complete_ticks += tsc::rdtsc().saturating_sub(t1);
        let refill = self.issued.len() + self.submit_batch <= self.max_inflight
            && (self.issued.is_empty() || tsc::rdtsc() < until);
        while refill && self.issued.len() < self.max_inflight {
            let id = match self.overflow.pop_front() {
                Some(id) => id,
                None => {
                    let d0 = tsc::rdtsc();
                    let next = self.part.dispatch(clock());
                    self.prof.dispatch_calls += 1;
                    self.prof.dispatch_ticks += tsc::rdtsc().saturating_sub(d0);
                    match next {
                        Some(d) => d.request.id,
                        None => break,
                    }
                }
            };
            let Some(w) = self.waiting.remove(&id) else {
                continue;
            };
            let submitted_ns = clock();
            let s0 = tsc::rdtsc();
            let submitted = ctrl.submit(self.qid, w.io);
            self.prof.submit_ticks += tsc::rdtsc().saturating_sub(s0);
            match submitted {
                Ok(()) => {
                    self.prof.submitted += 1;
                    self.issued.insert(
                        id,
                        Issued {
                            volume: w.volume,
                            token: w.token,
                            request: w.request,
                            submitted_ns,
                        },
                    );
                }
                Err(r) if r.error == NvmeError::QueueFull => {
                    self.waiting.insert(id, Waiting { io: r.request, ..w });
                    self.overflow.push_front(id);
                    break;
                }
                Err(r) => {
                    // The partitioner dispatched it, so it must hear that it finished (else the volume counts it
                    // in flight for ever and never lends its commitment again); it took no device time.
                    let _ = self.part.complete(w.volume, &w.request, 0, clock());
                    let status = if r.error == NvmeError::Failed {
                        Status::CONTROLLER_FAILED
                    } else {
                        Status::INVALID_FIELD
                    };
                    out(Done {
                        token: w.token,
                        volume: w.volume,
                        status,
                    });
                }
            }
        }
        let f0 = tsc::rdtsc();
        ctrl.flush(self.qid);
        self.prof.flush_ticks += tsc::rdtsc().saturating_sub(f0);
    }
}
