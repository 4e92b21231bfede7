//! The partitioner: per-volume queues, tag clocks and the mClock-family dispatch decision.
//!
//! Design. Each volume with queued requests is in exactly one of two states:
//! - *throttled*: its head request's limit tag `L` is in the future; it sits only in the
//!   `throttled` index keyed by `L` and is promoted when `now` reaches `L`;
//! - *eligible*: it sits in `share` keyed by its proportional tag `P`, in `res` keyed by its
//!   reservation tag `R` when it has a commitment, and, as its configuration and state allow, in
//!   `burst` (bucket holds the head's cost), `borrow` (policy `Borrow`) and `boost` (policy
//!   `Boosted`, keyed by its boost tag `B`, while its boost rate is > 0).
//!
//! `dispatch(now)` promotes due throttled volumes, then picks, in order: the smallest due `R`
//! (reservation phase: commitments first while any are due); a burst-credit holder by `P`; a
//! borrower by `P` while other volumes leave commitment unused (a device-wide borrow clock `G`
//! spaced at the idle volumes' total commitment bounds borrowing to exactly that; like `R` it is
//! anchored at the borrower's head arrival, no earlier than one window ago nor than the moment
//! lending began, so a backlogged borrower gets exactly that rate); the smallest due `B`; else the smallest `P` among all eligible volumes (weight phase). Every eligible volume is in
//! `share`, so whenever any queued request is allowed by its limit something is dispatched: the
//! dispatcher is work-conserving up to limits. Each step is a constant number of heap operations
//! ([`TagIndex`]), and only index entries whose key changed are touched: O(log n) per request in
//! the number of active volumes.
//!
//! Tags (see [`super::tags`]): `B` is a wall-clock tag anchored at the head request's arrival
//! (`tag = max(clock.next, arrival)`); `L` is anchored at the dispatch time and a head is eligible
//! only once `now >= L.ready_at()`, so two consecutive dispatches of a volume are at least exactly
//! `cost / limit` apart (limits never allow catch-up bursts); `P` is virtual time anchored at the
//! current virtual time `V` (the `P` of the last weight-ordered dispatch, start-time fair
//! queueing). Only reservation-phase service advances `R`; service above the commitment advances
//! `P` — the mClock rule that spare capacity is shared independently of reservations. Every
//! dispatch advances `L` (limits are hard caps for all classes) and, for boosted volumes, the
//! commitment meter `U` (charged at the committed rate; its lead over `now`, capped at the boost
//! horizon, scales the boost down). The burst bucket fills while `R.next <= now`, nothing of the
//! volume is queued and none of its requests on the device was dispatched above its commitment, i.e.
//! exactly while its demand leaves part of its reservation unused. A volume with requests waiting
//! earns nothing: its waiting requests keep their reservation tags and are served as the device
//! allows (a wait for a device slot is made up at once, an overload's debt up to one window), so
//! counting that wait would pay a volume served at exactly its commitment (measured before this
//! rule: 63 tokens/s at a fill of 1000/s on a device at 3900 IOPS). Nor does a volume earn from
//! its first burst, borrowed, boosted or best-effort dispatch until it has no outstanding work
//! again: `R` is not charged for those, so `R.next <= now` says nothing then, and a shallow queue
//! drained by its own burst earned again at once (depth 8: 726 burst I/Os a second above the
//! commitment, for ever).
//!
//! `R` is anchored at `min(arrival, F)`, where the *reservation frontier* `F` is the smallest `R`
//! still waiting in the reservation index, or `now` when that is smaller (or nothing waits):
//! `tag = max(R.next, min(arrival, F))`. This matters when the device delivers less than the sum
//! of the commitments (the capacity it was admitted at is a statement, not a guarantee). Then
//! every backlogged volume's `R` falls behind real time, and the reservation phase serves the
//! smallest `R` first: each request moves its volume's `R` by `cost / committed`, so the `R`s of
//! all backlogged volumes advance together and each gets the same fraction of its commitment
//! (proportional degradation). Textbook mClock anchors at the arrival alone; under overload that
//! hands every request that finds its volume's queue empty — a volume whose requests are all on
//! the device, or one back from idle — a tag of `now`, far behind the lagging tags of the
//! backlogged volumes, and it starves. Anchored at `min(arrival, F)` it restarts level with the
//! volumes still waiting, never behind them; a backlogged volume re-filed after its own dispatch
//! still has its old `R` in the index (`F <= old R < R.next`), so it just continues its stream.
//! Without overload a due `R` waits at most for a free device slot, so `F` is `now` or just below
//! it, and a volume back from idle restarts at (about) its arrival: no credit for idle time (no
//! flood of old tags) and no debt (no starvation).
//!
//! The debt an overload leaves is bounded: at each window boundary every waiting `R` more than one
//! window old is raised to `now - window` (all to the same value, so proportions hold while the
//! overload lasts), and no anchor is older than `now - 2 x window` (which never binds a volume
//! that was waiting at the last boundary, and bounds throttled or idle ones the same way). When
//! capacity returns, the lagging volumes are served ahead of best-effort traffic, in commitment
//! proportion, until their `R` catches up with `now`: at most about one window of each commitment
//! is made up, which lets a volume recover a short overload within the next window. The
//! dispatched `R` is the one the volume was filed under (the frontier or the debt bound may have
//! moved it since the volume was last charged).
//!
//! A volume is *idle* only when it has no outstanding work: nothing queued and nothing in flight
//! (dispatched, not yet completed). Only idle volumes lend their commitment (`lendable`, the
//! borrow clock `G`); a volume whose requests are all on the device is using its commitment.
//!
//! Reconfiguration rebases tags without touching the queue: the volume is taken out of the
//! indices, every clock is *respaced* (`next = last + last_cost / new_rate`, i.e. the next request
//! is spaced at the new rate from the last one served), and the head is re-indexed. Queued requests
//! keep their FIFO order within the volume, none is dropped, and the new rate governs the very next
//! decision. Removing a volume hands its queued requests back to the caller to fail.
//!
//! Invariants: a volume is indexed iff its queue is non-empty; `queued_total` is the sum of queue
//! lengths; `committed_sum` is the sum of commitments; `lendable` is the sum of commitments of
//! idle volumes (empty queue and no request in flight: the caller must report every dispatched
//! request to [`Partitioner::complete`], or its volume never lends again).

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::admission::AdmissionLimits;
use super::device::{CapacityEstimator, DeviceConfig};
use super::tags::{mul_div_rem, Rate, TagClock, TagIndex, COST_ONE};
use super::telemetry::{WindowReport, WindowStats};
use super::volume::{BurstBucket, OveragePolicy, VolumeConfig, MAX_RATE_IOPS};
use super::{IopsError, Request, ServiceClass, VolumeId};
use crate::cpu::pool::{GrantError, GrantMemory};

/// The decision returned by [`Partitioner::dispatch`].
#[must_use = "a dispatched request must be submitted to the device"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// Volume the request belongs to.
    pub volume: VolumeId,
    /// The request.
    pub request: Request,
    /// Why it was chosen.
    pub class: ServiceClass,
    /// Its cost in cost units ([`COST_ONE`] per unit I/O).
    pub cost: u64,
    /// Time it waited in the partitioner's queue (ns).
    pub wait_ns: u64,
}

/// What [`Partitioner::top_up`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopUp {
    /// The tokens were added to the volume's burst bucket.
    Applied {
        /// Grant tokens the volume now holds, in unit I/Os (rounded down).
        held_ios: u64,
    },
    /// The grant id was applied before: nothing done.
    Duplicate,
}

/// Lifetime counters of one volume (cost units), for accounting and conservation checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct VolumeTotals {
    /// Cost dispatched in the reservation phase.
    pub reservation_cost: u64,
    /// Cost dispatched in the weight phase.
    pub share_cost: u64,
    /// Cost dispatched spending burst credits.
    pub burst_cost: u64,
    /// Cost dispatched borrowing unused commitment.
    pub borrow_cost: u64,
    /// Cost dispatched at the boost rate.
    pub boost_cost: u64,
    /// Requests dispatched.
    pub dispatched: u64,
}

#[derive(Clone, Copy, Debug)]
struct Queued {
    request: Request,
    arrival: u64,
    cost: u64,
}

/// Index keys a volume is currently filed under (so it can be removed in O(log n)).
#[derive(Clone, Copy, Debug, Default)]
struct Keys {
    throttled: Option<u64>,
    res: Option<u64>,
    share: Option<u64>,
    burst: bool,
    borrow: bool,
    /// Boost tag and the boost rate it was computed with.
    boost: Option<(u64, u64)>,
}

#[derive(Debug)]
struct Volume {
    id: VolumeId,
    config: VolumeConfig,
    queue: VecDeque<Queued>,
    r: TagClock,
    l: TagClock,
    p: TagClock,
    b: TagClock,
    u: TagClock,
    bucket: Option<BurstBucket>,
    keys: Keys,
    /// Requests dispatched and not yet completed (on the device).
    in_flight: u64,
    /// Some request was dispatched above the commitment (any class but the reservation) since the
    /// volume last had no outstanding work: until it has none again it is not under its commitment
    /// (its burst bucket holds), even when its queue is momentarily empty.
    above: bool,
    stats: WindowStats,
    totals: VolumeTotals,
}

impl Volume {
    /// No outstanding work at all: nothing queued here and nothing on the device.
    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight == 0
    }
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    volume: Option<Volume>,
}

#[derive(Debug, Default)]
struct Indices {
    throttled: TagIndex,
    res: TagIndex,
    share: TagIndex,
    burst: TagIndex,
    borrow: TagIndex,
    boost: TagIndex,
}

/// The IOPS partitioner of one device (see the module documentation).
#[derive(Debug)]
pub struct Partitioner {
    config: DeviceConfig,
    capacity: CapacityEstimator,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    ix: Indices,
    committed_sum: u64,
    lendable: u64,
    borrow_clock: TagClock,
    vtime: u64,
    queued_total: usize,
    last_now: u64,
    window_index: u64,
    window_end: u64,
    window_cost: u64,
    window_dispatches: u64,
    window_saturated: bool,
    reports: VecDeque<WindowReport>,
    reports_dropped: u64,
    /// Grant ids applied by [`Partitioner::top_up`] (bounded window, as the CPU scheduler keeps them).
    grants: GrantMemory,
}

impl Partitioner {
    /// A partitioner for a device, starting at time `now`.
    pub fn new(config: DeviceConfig, now: u64) -> Result<Self, IopsError> {
        config.validate()?;
        let window_index = now / config.window_ns;
        Ok(Self {
            capacity: CapacityEstimator::new(config.capacity_iops),
            config,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            ix: Indices::default(),
            committed_sum: 0,
            lendable: 0,
            borrow_clock: TagClock::starting_at(now),
            vtime: 0,
            queued_total: 0,
            last_now: now,
            window_index,
            window_end: window_index
                .saturating_add(1)
                .saturating_mul(config.window_ns),
            window_cost: 0,
            window_dispatches: 0,
            window_saturated: true,
            reports: VecDeque::new(),
            reports_dropped: 0,
            grants: GrantMemory::default(),
        })
    }

    /// Device configuration.
    #[must_use]
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// Current capacity estimate (unit I/Os per second).
    #[must_use]
    pub fn capacity_iops(&self) -> u64 {
        self.capacity.estimate()
    }

    /// Replaces the capacity estimate (e.g. after the kernel's own calibration run).
    pub fn set_capacity(&mut self, capacity_iops: u64) -> Result<(), IopsError> {
        if capacity_iops == 0 {
            return Err(IopsError::InvalidDevice("capacity must be > 0"));
        }
        self.capacity = CapacityEstimator::new(capacity_iops);
        Ok(())
    }

    /// Sum of admitted commitments.
    #[must_use]
    pub fn committed_sum(&self) -> u64 {
        self.committed_sum
    }

    /// Admission numbers for a commitment of `requested` on top of the current ones.
    #[must_use]
    pub fn admission_limits(&self, requested: u64) -> AdmissionLimits {
        AdmissionLimits {
            capacity_iops: self.capacity.estimate(),
            committable_permille: self.config.committable_permille,
            overcommit_permille: self.config.overcommit_permille,
            committed_sum: self.committed_sum,
            requested,
        }
    }

    /// Requests queued (not yet dispatched) over all volumes.
    #[must_use]
    pub fn queued_total(&self) -> usize {
        self.queued_total
    }

    /// Requests queued for one volume.
    pub fn queued(&self, id: VolumeId) -> Result<usize, IopsError> {
        Ok(self.volume(id)?.queue.len())
    }

    /// A volume's configuration.
    pub fn volume_config(&self, id: VolumeId) -> Result<VolumeConfig, IopsError> {
        Ok(self.volume(id)?.config)
    }

    /// A volume's burst bucket (if configured).
    pub fn burst_bucket(&self, id: VolumeId) -> Result<Option<BurstBucket>, IopsError> {
        Ok(self.volume(id)?.bucket)
    }

    /// A volume's lifetime counters.
    pub fn totals(&self, id: VolumeId) -> Result<VolumeTotals, IopsError> {
        Ok(self.volume(id)?.totals)
    }

    /// A volume's counters for the current (open) window.
    pub fn current_window(&self, id: VolumeId) -> Result<WindowStats, IopsError> {
        Ok(self.volume(id)?.stats)
    }

    /// Handles of all live volumes.
    pub fn volume_ids(&self) -> impl Iterator<Item = VolumeId> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.volume.as_ref().map(|v| v.id))
    }

    /// Takes the closed window reports gathered so far (oldest first).
    pub fn drain_reports(&mut self) -> impl Iterator<Item = WindowReport> + '_ {
        self.reports.drain(..)
    }

    /// Reports dropped because nobody drained them in time.
    #[must_use]
    pub fn reports_dropped(&self) -> u64 {
        self.reports_dropped
    }

    /// Adds a volume after admission control.
    pub fn add_volume(&mut self, config: VolumeConfig, now: u64) -> Result<VolumeId, IopsError> {
        let now = self.advance(now);
        config.validate()?;
        self.admission_limits(config.committed_iops).check()?;
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| IopsError::TooManyVolumes)?;
                self.slots.push(Slot {
                    generation: 0,
                    volume: None,
                });
                i
            }
        };
        let slot = &mut self.slots[index as usize];
        let id = VolumeId {
            index,
            generation: slot.generation,
        };
        slot.volume = Some(Volume {
            id,
            config,
            queue: VecDeque::new(),
            r: TagClock::starting_at(now),
            l: TagClock::starting_at(now),
            p: TagClock::starting_at(self.vtime),
            b: TagClock::starting_at(now),
            u: TagClock::starting_at(now),
            bucket: config.burst.map(|b| BurstBucket::new(b, now)),
            keys: Keys::default(),
            in_flight: 0,
            above: false,
            stats: WindowStats::default(),
            totals: VolumeTotals::default(),
        });
        self.live += 1;
        self.committed_sum += config.committed_iops;
        self.set_lendable(self.lendable + config.committed_iops, now);
        Ok(id)
    }

    /// Changes a volume's configuration at once (admission applies to the commitment); queued
    /// requests are kept in order and the tags are rebased as the module documentation describes.
    pub fn reconfigure(
        &mut self,
        id: VolumeId,
        config: VolumeConfig,
        now: u64,
    ) -> Result<(), IopsError> {
        let now = self.advance(now);
        config.validate()?;
        let old = self.volume(id)?.config;
        if config.committed_iops > old.committed_iops {
            let mut limits = self.admission_limits(config.committed_iops);
            limits.committed_sum -= old.committed_iops;
            limits.check()?;
        }
        let vtime = self.vtime;
        let window = self.config.window_ns;
        let Self { slots, ix, .. } = self;
        let vol = slots[id.index as usize]
            .volume
            .as_mut()
            .ok_or(IopsError::UnknownVolume(id))?;
        unindex(ix, vol);
        integrate_bucket(vol, now);
        vol.config = config;
        if config.committed_iops > 0 {
            vol.r.respace(Rate::Iops(config.committed_iops));
            vol.u.respace(Rate::Iops(config.committed_iops));
        }
        if let Some(limit) = config.limit_iops {
            vol.l.respace(Rate::Iops(limit));
        }
        vol.p.respace(Rate::Weight(config.weight));
        vol.bucket = match (config.burst, vol.bucket) {
            (Some(c), Some(mut b)) => {
                b.reconfigure(c);
                Some(b)
            }
            (Some(c), None) => Some(BurstBucket::new(c, now)),
            // Grant tokens were paid for: they outlive the burst configuration.
            (None, Some(mut b)) if b.granted() > 0 => {
                b.keep_grants_only();
                Some(b)
            }
            (None, _) => None,
        };
        let idle = vol.is_idle();
        if !vol.queue.is_empty() {
            file_volume(ix, vol, now, vtime, window);
        }
        self.committed_sum = self.committed_sum - old.committed_iops + config.committed_iops;
        if idle {
            self.set_lendable(
                self.lendable - old.committed_iops + config.committed_iops,
                now,
            );
        }
        Ok(())
    }

    /// Applies an I/O credit grant: adds `ios` unit I/Os of grant tokens to the volume's burst
    /// bucket (creating a grants-only bucket when it has no burst configuration), exactly once per
    /// `grant_id` across the device. Grant tokens may exceed the bucket size, never expire and are
    /// spent, after the earned tokens, only by requests above the commitment (class
    /// [`ServiceClass::Burst`]). A queued volume is re-filed at once, so the grant takes effect at
    /// the next dispatch.
    ///
    /// # Errors
    /// [`IopsError::UnknownVolume`]; [`IopsError::InvalidGrant`] for 0 or more than 2^40 I/Os;
    /// [`IopsError::GrantIdTooOld`] for an id below the remembered window. A refused grant changes
    /// nothing and its id is not remembered.
    pub fn top_up(
        &mut self,
        id: VolumeId,
        grant_id: u64,
        ios: u64,
        now: u64,
    ) -> Result<TopUp, IopsError> {
        self.volume(id)?;
        let fresh = self.grants.check(grant_id).map_err(|e| match e {
            GrantError::IdTooOld {
                grant_id,
                oldest_accepted,
            } => IopsError::GrantIdTooOld {
                grant_id,
                oldest_accepted,
            },
            GrantError::NoSuchVcpu(_) | GrantError::ZeroRate => {
                IopsError::InvalidGrant("grant id refused")
            }
        })?;
        if !fresh {
            return Ok(TopUp::Duplicate);
        }
        if ios == 0 || ios > MAX_RATE_IOPS {
            return Err(IopsError::InvalidGrant("I/O credits must be in 1..=2^40"));
        }
        let now = self.advance(now);
        let vtime = self.vtime;
        let window = self.config.window_ns;
        let Self { slots, ix, .. } = self;
        let vol = slot_volume(slots, id)?;
        integrate_bucket(vol, now);
        let bucket = vol
            .bucket
            .get_or_insert_with(|| BurstBucket::grants_only(now));
        bucket.grant(ios * COST_ONE);
        let held_ios = bucket.granted() / COST_ONE;
        if !vol.queue.is_empty() {
            file_volume(ix, vol, now, vtime, window);
        }
        self.grants.remember(grant_id);
        Ok(TopUp::Applied { held_ios })
    }

    /// Removes a volume; its queued (never dispatched) requests are returned for the caller to fail.
    /// Completions of its in-flight requests are still accepted by [`Partitioner::complete`].
    pub fn remove_volume(&mut self, id: VolumeId, now: u64) -> Result<Vec<Request>, IopsError> {
        let now = self.advance(now);
        self.volume(id)?;
        let slot = &mut self.slots[id.index as usize];
        let Some(mut vol) = slot.volume.take() else {
            return Err(IopsError::UnknownVolume(id));
        };
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        unindex(&mut self.ix, &mut vol);
        self.committed_sum -= vol.config.committed_iops;
        if vol.is_idle() {
            self.set_lendable(self.lendable - vol.config.committed_iops, now);
        }
        self.queued_total -= vol.queue.len();
        Ok(vol.queue.into_iter().map(|q| q.request).collect())
    }

    /// Queues a request of volume `id` that arrived at `now`.
    pub fn enqueue(&mut self, id: VolumeId, request: Request, now: u64) -> Result<(), IopsError> {
        let now = self.advance(now);
        let cost = self.config.cost.cost(request.op, request.bytes);
        let max_queue = self.config.max_queue;
        let vtime = self.vtime;
        let window = self.config.window_ns;
        let Self { slots, ix, .. } = self;
        let vol = slot_volume(slots, id)?;
        if vol.queue.len() >= max_queue {
            return Err(IopsError::QueueFull {
                volume: id,
                depth: max_queue,
            });
        }
        vol.stats.arrived += 1;
        if vol.queue.is_empty() {
            integrate_bucket(vol, now);
        }
        vol.queue.push_back(Queued {
            request,
            arrival: now,
            cost,
        });
        // Filed when its queue becomes non-empty; it stops lending its commitment only when it
        // had no outstanding work at all (a volume whose requests are all on the device is busy).
        let was_empty = vol.queue.len() == 1;
        let was_idle = was_empty && vol.in_flight == 0;
        let commit = vol.config.committed_iops;
        if was_empty {
            file_volume(ix, vol, now, vtime, window);
        }
        self.queued_total += 1;
        if was_idle {
            self.set_lendable(self.lendable - commit, now);
        }
        Ok(())
    }

    /// Chooses the next request to send to the device at `now`, or `None` when nothing may go
    /// (nothing queued, or every queued volume is held by its limit: see
    /// [`Partitioner::next_eligible_time`]).
    #[must_use = "a dispatched request must be submitted to the device"]
    pub fn dispatch(&mut self, now: u64) -> Option<Dispatch> {
        let now = self.advance(now);
        self.promote(now);
        let ix = &self.ix;
        let choice = if let Some((_, v)) = ix.res.first().filter(|&(r, _)| r <= now) {
            Some((v, ServiceClass::Reservation))
        } else if let Some((_, v)) = ix.burst.first() {
            Some((v, ServiceClass::Burst))
        } else if let Some((_, v)) = ix
            .borrow
            .first()
            .filter(|_| self.lendable > 0 && self.borrow_clock.next <= now)
        {
            Some((v, ServiceClass::Borrow))
        } else if let Some((_, v)) = ix.boost.first().filter(|&(b, _)| b <= now) {
            Some((v, ServiceClass::Boost))
        } else {
            ix.share.first().map(|(_, v)| (v, ServiceClass::Share))
        };
        let Some((index, class)) = choice else {
            self.window_saturated = false;
            return None;
        };
        let d = self.take(index, class, now);
        if d.is_none() {
            self.window_saturated = false;
        }
        d
    }

    /// Earliest time at which [`Partitioner::dispatch`] may return a request: `now` when one may go
    /// now, the earliest limit tag when every queued volume is throttled, `None` when nothing is
    /// queued. The kernel arms its timer for this after a `None` dispatch.
    #[must_use]
    pub fn next_eligible_time(&self, now: u64) -> Option<u64> {
        if !self.ix.share.is_empty() {
            return Some(now);
        }
        self.ix.throttled.first().map(|(t, _)| t.max(now))
    }

    /// Records the completion of a request of volume `id` (queue wait is already known; `service_ns`
    /// is the device time). Call it exactly once per dispatched request: a volume with requests in
    /// flight is busy, not idle, and does not lend its commitment. The device-wide accounting
    /// (capacity estimate) counts it even when the volume was removed meanwhile, which is then
    /// reported as `UnknownVolume`.
    pub fn complete(
        &mut self,
        id: VolumeId,
        request: &Request,
        service_ns: u64,
        now: u64,
    ) -> Result<(), IopsError> {
        let now = self.advance(now);
        let cost = self.config.cost.cost(request.op, request.bytes);
        self.window_cost = self.window_cost.saturating_add(cost);
        let vol = slot_volume(&mut self.slots, id)?;
        vol.stats.completed += 1;
        vol.stats.service.record(service_ns);
        vol.stats.completed_cost = vol.stats.completed_cost.saturating_add(cost);
        if vol.in_flight == 1 && vol.queue.is_empty() {
            // Its last request comes back: the bucket's interval so far ends here, and from now on
            // the volume has no outstanding work.
            integrate_bucket(vol, now);
            vol.above = false;
        }
        // Saturating: a completion the caller reports twice (or for a request it never got from
        // `dispatch`) must not make a busy volume look idle later.
        vol.in_flight = vol.in_flight.saturating_sub(1);
        if vol.is_idle() {
            let commit = vol.config.committed_iops;
            self.set_lendable(self.lendable + commit, now);
        }
        Ok(())
    }

    fn volume(&self, id: VolumeId) -> Result<&Volume, IopsError> {
        self.slots
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.volume.as_ref())
            .ok_or(IopsError::UnknownVolume(id))
    }

    /// Sets the commitment idle volumes leave unused at `now`. When lending starts (from nothing), the
    /// borrow clock restarts no earlier than `now`: borrowing is bounded by what was lendable since.
    fn set_lendable(&mut self, lendable: u64, now: u64) {
        if self.lendable == 0 && lendable > 0 && self.borrow_clock.next < now {
            self.borrow_clock = TagClock::starting_at(now);
        }
        self.lendable = lendable;
        if lendable > 0 {
            self.borrow_clock.respace(Rate::Iops(lendable));
        }
    }

    /// Makes time monotonic and closes elapsed windows.
    fn advance(&mut self, now: u64) -> u64 {
        let now = now.max(self.last_now);
        self.last_now = now;
        if now >= self.window_end {
            self.close_window(now);
        }
        now
    }

    fn close_window(&mut self, now: u64) {
        let w = self.config.window_ns;
        if self.config.refine_capacity && self.window_dispatches > 0 {
            self.capacity.observe_window(
                self.window_cost,
                w,
                self.window_saturated && self.queued_total > 0,
            );
        }
        let cap = 8 * self.live.max(8);
        for vol in self.slots.iter_mut().filter_map(|s| s.volume.as_mut()) {
            let (completed_iops, _) = mul_div_rem(
                vol.stats.completed_cost,
                1_000_000_000,
                w.saturating_mul(COST_ONE),
            );
            if self.reports.len() >= cap {
                self.reports.pop_front();
                self.reports_dropped += 1;
            }
            self.reports.push_back(WindowReport {
                window: self.window_index,
                volume: vol.id,
                committed_iops: vol.config.committed_iops,
                completed_iops,
                stats: vol.stats,
            });
            vol.stats = WindowStats::default();
        }
        self.bound_reservation_debt(now);
        // Windows with no call at all in them carry zero counters and are skipped.
        let skip = (now - self.window_end) / w;
        self.window_index = self.window_index.saturating_add(1 + skip);
        self.window_end = self.window_end.saturating_add((1 + skip).saturating_mul(w));
        self.window_cost = 0;
        self.window_dispatches = 0;
        self.window_saturated = true;
    }

    /// Raises every waiting reservation tag older than one window to `now - window`, so the debt a
    /// volume carries out of an overload is at most one window of its commitment (see the module
    /// documentation). Only tags more than a window overdue move, and all to the same value, so
    /// under a sustained overload the volumes keep degrading in proportion to their commitments.
    fn bound_reservation_debt(&mut self, now: u64) {
        let floor = now.saturating_sub(self.config.window_ns);
        let Self { slots, ix, .. } = self;
        while let Some((tag, index)) = ix.res.first() {
            if tag >= floor {
                break;
            }
            ix.res.insert(floor, index);
            if let Some(vol) = slots
                .get_mut(index as usize)
                .and_then(|s| s.volume.as_mut())
            {
                vol.keys.res = Some(floor);
            }
        }
    }

    /// Moves throttled volumes whose limit tag is due into the eligible indices.
    fn promote(&mut self, now: u64) {
        let vtime = self.vtime;
        let window = self.config.window_ns;
        let Self { slots, ix, .. } = self;
        while let Some((_, index)) = ix.throttled.pop_due(now) {
            if let Some(vol) = slots
                .get_mut(index as usize)
                .and_then(|s| s.volume.as_mut())
            {
                // `pop_due` already took the throttled entry out of its index.
                vol.keys.throttled = None;
                file_volume(ix, vol, now, vtime, window);
            }
        }
    }

    fn take(&mut self, index: u32, class: ServiceClass, now: u64) -> Option<Dispatch> {
        let vtime = self.vtime;
        let window = self.config.window_ns;
        let lendable = self.lendable;
        let Self { slots, ix, .. } = self;
        let vol = slots.get_mut(index as usize)?.volume.as_mut()?;
        let keys = vol.keys;
        let q = vol.queue.pop_front()?;
        let cfg = vol.config;
        if let Some(bucket) = vol.bucket.as_mut() {
            // The request just taken was waiting since the bucket's last event: nothing was earned meanwhile.
            bucket.hold(now);
        }
        if let Some(limit) = cfg.limit_iops {
            // Anchored at the dispatch time: the next request may go no earlier than exactly
            // `cost / limit` after this one, whatever happened before (no catch-up above the cap).
            let l = vol.l.tag_for(now);
            vol.l.charge(l, q.cost, Rate::Iops(limit));
        }
        if let OveragePolicy::Boosted { horizon_ns, .. } = cfg.policy {
            // The meter's lead is capped at the horizon, so a volume back at its commitment
            // regains its boost within one horizon however long it was over before. Anchored where
            // `R` is (the reservation tag the request was filed under, or its arrival; no earlier
            // than a window ago), not at `now`: a backlogged volume whose reservations fell behind
            // (a device pause) repays them as reservations, and a meter that skipped ahead counted
            // that repayment as lead (a 100 ms pause cost a booster 40 of its 400 I/Os of boost in
            // the host model).
            let anchor = keys.res.map_or(q.arrival, |r| r.min(q.arrival));
            let u = vol.u.tag_for(anchor.max(now.saturating_sub(window)));
            vol.u.charge(u, q.cost, Rate::Iops(cfg.committed_iops));
            vol.u.next = vol.u.next.min(now.saturating_add(horizon_ns));
        }
        let mut new_vtime = vtime;
        let mut borrow_charge = false;
        match class {
            ServiceClass::Reservation => {
                // The tag the volume was filed under (its floor depended on the index then).
                let r = keys.res.unwrap_or_else(|| vol.r.tag_for(q.arrival));
                vol.r.charge(r, q.cost, Rate::Iops(cfg.committed_iops));
                vol.totals.reservation_cost += q.cost;
            }
            ServiceClass::Share
            | ServiceClass::Burst
            | ServiceClass::Borrow
            | ServiceClass::Boost => {
                let p = keys.share.unwrap_or_else(|| vol.p.tag_for(vtime));
                vol.p.charge(p, q.cost, Rate::Weight(cfg.weight));
                // Virtual time follows weight-ordered dispatches only. Burst, borrow and boost service is
                // taken out of `P` order (ahead of best effort), so its `P` can be far ahead of the best-effort
                // frontier; moving `V` there would re-anchor every best-effort volume at the same tag and
                // share spare capacity equally instead of by weight.
                if class == ServiceClass::Share {
                    new_vtime = vtime.max(p);
                }
                match class {
                    ServiceClass::Burst => {
                        if let Some(b) = vol.bucket.as_mut() {
                            b.spend(q.cost);
                        }
                        vol.totals.burst_cost += q.cost;
                    }
                    ServiceClass::Borrow => {
                        borrow_charge = true;
                        vol.totals.borrow_cost += q.cost;
                    }
                    ServiceClass::Boost => {
                        if let Some((b, rate)) = keys.boost {
                            vol.b.charge(b, q.cost, Rate::Iops(rate.max(1)));
                        }
                        vol.totals.boost_cost += q.cost;
                    }
                    _ => vol.totals.share_cost += q.cost,
                }
            }
        }
        vol.totals.dispatched += 1;
        vol.in_flight += 1;
        vol.above |= class != ServiceClass::Reservation;
        let wait_ns = now.saturating_sub(q.arrival);
        vol.stats.record_dispatch(class, wait_ns);
        let id = vol.id;
        // Only the index entries whose key changed are touched (usually one or two).
        file_volume(ix, vol, now, new_vtime, window);
        self.vtime = new_vtime;
        if borrow_charge && lendable > 0 {
            // Anchored like a reservation: at the head's arrival, so a backlogged borrower's stream keeps its
            // spacing and a dispatch that waited for a device slot is not lost (anchoring at `now` forfeited
            // every such wait: 363 of 400 lent IOPS on a device at 3777 IOPS), but no earlier than one window
            // ago, so service missed in an overload is made up by at most a window of the lent rate.
            let g = self
                .borrow_clock
                .tag_for(q.arrival.max(now.saturating_sub(window)));
            self.borrow_clock.charge(g, q.cost, Rate::Iops(lendable));
        }
        self.queued_total -= 1;
        self.window_dispatches += 1;
        if self.queued_total == 0 {
            // The device may now starve: this window cannot measure capacity.
            self.window_saturated = false;
        }
        Some(Dispatch {
            volume: id,
            request: q.request,
            class,
            cost: q.cost,
            wait_ns,
        })
    }
}

fn slot_volume(slots: &mut [Slot], id: VolumeId) -> Result<&mut Volume, IopsError> {
    slots
        .get_mut(id.index as usize)
        .filter(|s| s.generation == id.generation)
        .and_then(|s| s.volume.as_mut())
        .ok_or(IopsError::UnknownVolume(id))
}

/// Integrates `vol`'s burst bucket up to `now` before its queue, its requests in flight or its configuration
/// change (so the state seen here held since the bucket's last event): the bucket fills only while the volume
/// has nothing queued and nothing above its commitment on the device (see the module documentation).
fn integrate_bucket(vol: &mut Volume, now: u64) {
    let busy = !vol.queue.is_empty() || (vol.above && vol.in_flight > 0);
    if let Some(bucket) = vol.bucket.as_mut() {
        if busy {
            bucket.hold(now);
        } else {
            bucket.fill(vol.r.next, now);
        }
    }
}

/// Files a volume under its head's tags (or nowhere when its queue is empty), touching only the
/// index entries whose key changed.
fn file_volume(ix: &mut Indices, vol: &mut Volume, now: u64, vtime: u64, window: u64) {
    // The reservation frontier: no request is given a reservation tag later than the smallest one
    // still waiting (nor later than `now`). When `vol` is re-filed after its own dispatch, its old
    // key is still in the index and is <= its next tag, so it never lifts a backlogged stream.
    let frontier = ix.res.first().map_or(now, |(t, _)| t.min(now));
    // Nor earlier than two windows ago: the window-boundary debt bound keeps every waiting tag
    // above that, and this keeps volumes that were not waiting then (throttled by a limit, or
    // idle) within the same bound.
    let anchor_floor = now.saturating_sub(window.saturating_mul(2));
    let new = desired_keys(vol, now, vtime, (frontier, anchor_floor));
    if new.throttled.is_some() && new.throttled != vol.keys.throttled {
        vol.stats.throttled += 1;
    }
    apply_keys(ix, vol.id.index, vol.keys, new);
    vol.keys = new;
}

/// The index keys a volume should be filed under now.
fn desired_keys(vol: &Volume, now: u64, vtime: u64, (frontier, floor): (u64, u64)) -> Keys {
    let mut k = Keys::default();
    let Some(head) = vol.queue.front() else {
        return k;
    };
    let cfg = &vol.config;
    if cfg.limit_iops.is_some() {
        let l = vol.l.ready_at();
        if l > now {
            k.throttled = Some(l);
            return k;
        }
    }
    if cfg.committed_iops > 0 {
        // Re-anchored at the head's arrival only as far as the frontier: a stream that fell behind
        // restarts level with the streams still waiting, never behind them (see the module doc).
        k.res = Some(vol.r.tag_for(head.arrival.min(frontier).max(floor)));
    }
    k.share = Some(vol.p.tag_for(vtime));
    k.burst = vol.bucket.is_some_and(|b| b.can_spend(head.cost));
    match cfg.policy {
        OveragePolicy::Borrow => k.borrow = true,
        OveragePolicy::Boosted { .. } => {
            let lead = vol.u.next.saturating_sub(now);
            let rate = cfg.boost_iops(lead);
            if rate > 0 {
                k.boost = Some((vol.b.tag_for(head.arrival), rate));
            }
        }
        OveragePolicy::BestEffort => {}
    }
    k
}

/// Moves volume `v` in the indices from `old` keys to `new` keys.
fn apply_keys(ix: &mut Indices, v: u32, old: Keys, new: Keys) {
    fn update(index: &mut TagIndex, v: u32, old: Option<u64>, new: Option<u64>) {
        match (old, new) {
            (Some(a), Some(b)) if a == b => {}
            // Insert re-keys an existing entry in place.
            (_, Some(b)) => index.insert(b, v),
            (Some(a), None) => index.remove(a, v),
            (None, None) => {}
        }
    }
    update(&mut ix.throttled, v, old.throttled, new.throttled);
    update(&mut ix.res, v, old.res, new.res);
    update(&mut ix.share, v, old.share, new.share);
    update(
        &mut ix.burst,
        v,
        old.share.filter(|_| old.burst),
        new.share.filter(|_| new.burst),
    );
    update(
        &mut ix.borrow,
        v,
        old.share.filter(|_| old.borrow),
        new.share.filter(|_| new.borrow),
    );
    update(
        &mut ix.boost,
        v,
        old.boost.map(|b| b.0),
        new.boost.map(|b| b.0),
    );
}

/// Removes a volume from every index it is filed under.
fn unindex(ix: &mut Indices, vol: &mut Volume) {
    let old = core::mem::take(&mut vol.keys);
    apply_keys(ix, vol.id.index, old, Keys::default());
}
