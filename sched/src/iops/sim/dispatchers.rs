//! The three dispatchers compared by the simulator, behind one trait.
//!
//! - [`PartitionerDispatcher`]: this crate's [`Partitioner`].
//! - [`TokenBucketDispatcher`]: per-volume token buckets in the style of Linux blk-throttle or
//!   QEMU's I/O throttling. To guarantee commitments with caps alone, each volume is capped at its
//!   commitment plus its weight's share of the uncommitted capacity (the caps sum to the
//!   capacity), with a bucket depth of 50 ms at that rate. Among volumes whose head fits their
//!   bucket, the oldest request goes first. Not work-conserving by construction.
//! - [`FifoDispatcher`]: one global first-come first-served queue (no isolation at all).
//! - [`ArrivalMclockDispatcher`]: textbook mClock's reservation rule, the one this partitioner
//!   used before its overload fix: a volume's reservation tag is `max(R.next, arrival)`, anchored
//!   at the request's own arrival, with the same two phases (due reservations by `R`, then weights
//!   by start-time fair queueing) and limits, but no burst, borrow or boost. Shown beside the
//!   partitioner so `sim io overload` compares the rule before and after the fix on one trace.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::iops::tags::{Rate, TagClock};
use crate::iops::{
    DeviceConfig, IopsError, Partitioner, Request, ServiceClass, VolumeConfig, VolumeId, COST_ONE,
};

/// A dispatcher under simulation; volumes are numbered 0..n in scenario order.
pub trait SimDispatcher {
    /// Short name for tables.
    fn name(&self) -> &'static str;
    /// Queues a request.
    fn enqueue(&mut self, vol: usize, req: Request, cost: u64, now: u64) -> Result<(), String>;
    /// Next request to start, with its volume and (for the partitioner) class.
    fn dispatch(&mut self, now: u64) -> Option<(usize, Request, Option<ServiceClass>)>;
    /// A request finished.
    fn complete(&mut self, vol: usize, req: &Request, service_ns: u64, now: u64);
    /// Earliest time a queued request may start, if any is queued.
    fn next_time(&self, now: u64) -> Option<u64>;
    /// Applies a new volume configuration.
    fn reconfigure(&mut self, vol: usize, config: VolumeConfig, now: u64) -> Result<(), String>;
}

/// This crate's partitioner.
pub struct PartitionerDispatcher {
    inner: Partitioner,
    ids: Vec<VolumeId>,
}

impl PartitionerDispatcher {
    /// Builds it with `volumes` admitted in order.
    pub fn new(device: DeviceConfig, volumes: &[VolumeConfig]) -> Result<Self, IopsError> {
        let mut inner = Partitioner::new(device, 0)?;
        let ids = volumes
            .iter()
            .map(|c| inner.add_volume(*c, 0))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { inner, ids })
    }

    /// The partitioner inside.
    #[must_use]
    pub fn inner(&self) -> &Partitioner {
        &self.inner
    }

    /// Volume handles in scenario order.
    #[must_use]
    pub fn ids(&self) -> &[VolumeId] {
        &self.ids
    }
}

impl SimDispatcher for PartitionerDispatcher {
    fn name(&self) -> &'static str {
        "partitioner"
    }
    fn enqueue(&mut self, vol: usize, req: Request, _cost: u64, now: u64) -> Result<(), String> {
        self.inner
            .enqueue(self.ids[vol], req, now)
            .map_err(|e| e.to_string())
    }
    fn dispatch(&mut self, now: u64) -> Option<(usize, Request, Option<ServiceClass>)> {
        let d = self.inner.dispatch(now)?;
        let vol = self.ids.iter().position(|&i| i == d.volume)?;
        Some((vol, d.request, Some(d.class)))
    }
    fn complete(&mut self, vol: usize, req: &Request, service_ns: u64, now: u64) {
        // A completion for a live volume cannot fail; removed volumes do not occur in scenarios.
        let _ = self.inner.complete(self.ids[vol], req, service_ns, now);
    }
    fn next_time(&self, now: u64) -> Option<u64> {
        self.inner.next_eligible_time(now)
    }
    fn reconfigure(&mut self, vol: usize, config: VolumeConfig, now: u64) -> Result<(), String> {
        self.inner
            .reconfigure(self.ids[vol], config, now)
            .map_err(|e| e.to_string())
    }
}

/// Token bucket in scaled units: one cost unit = 1e9 scaled tokens, so a refill of
/// `rate` (cost units per second) over `dt` ns adds exactly `rate * dt` scaled tokens.
struct Bucket {
    rate: u128,
    depth: u128,
    tokens: u128,
    at: u64,
    queue: VecDeque<(u64, u64, Request, u64)>,
}

const SCALE: u128 = 1_000_000_000;

impl Bucket {
    fn refill(&mut self, now: u64) {
        if now > self.at {
            self.tokens = (self.tokens + self.rate * u128::from(now - self.at)).min(self.depth);
            self.at = now;
        }
    }

    /// Scaled tokens the head needs (a request larger than the bucket needs a full bucket).
    fn need(&self, cost: u64) -> u128 {
        (u128::from(cost) * SCALE).min(self.depth)
    }
}

/// Per-volume token buckets (blk-throttle style).
pub struct TokenBucketDispatcher {
    capacity: u64,
    configs: Vec<VolumeConfig>,
    buckets: Vec<Bucket>,
    seq: u64,
}

impl TokenBucketDispatcher {
    /// Caps derived from `capacity` (unit I/Os per second) and the volumes' commitments and weights.
    #[must_use]
    pub fn new(capacity: u64, volumes: &[VolumeConfig]) -> Self {
        let mut d = Self {
            capacity,
            configs: volumes.to_vec(),
            buckets: Vec::new(),
            seq: 0,
        };
        d.buckets = (0..volumes.len())
            .map(|_| Bucket {
                rate: 0,
                depth: 0,
                tokens: 0,
                at: 0,
                queue: VecDeque::new(),
            })
            .collect();
        d.recompute(0);
        d
    }

    /// Cap of each bucket in unit I/Os per second.
    #[must_use]
    pub fn rates(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| u64::try_from(b.rate / u128::from(COST_ONE)).unwrap_or(u64::MAX))
            .collect()
    }

    fn recompute(&mut self, now: u64) {
        let committed: u64 = self.configs.iter().map(|c| c.committed_iops).sum();
        let spare = u128::from(self.capacity.saturating_sub(committed));
        let weights: u128 = self
            .configs
            .iter()
            .map(|c| u128::from(c.weight))
            .sum::<u128>()
            .max(1);
        for (b, c) in self.buckets.iter_mut().zip(&self.configs) {
            b.refill(now);
            let mut iops = u128::from(c.committed_iops) + spare * u128::from(c.weight) / weights;
            if let Some(limit) = c.limit_iops {
                iops = iops.min(u128::from(limit));
            }
            b.rate = iops * u128::from(COST_ONE);
            // 50 ms of tokens, at least one unit I/O.
            b.depth = (b.rate * 50_000_000).max(u128::from(COST_ONE) * SCALE);
            b.tokens = b.tokens.min(b.depth);
        }
    }
}

impl SimDispatcher for TokenBucketDispatcher {
    fn name(&self) -> &'static str {
        "token-bucket"
    }
    fn enqueue(&mut self, vol: usize, req: Request, cost: u64, now: u64) -> Result<(), String> {
        self.seq += 1;
        self.buckets[vol]
            .queue
            .push_back((now, self.seq, req, cost));
        Ok(())
    }
    fn dispatch(&mut self, now: u64) -> Option<(usize, Request, Option<ServiceClass>)> {
        let mut best: Option<(u64, u64, usize)> = None;
        for (i, b) in self.buckets.iter_mut().enumerate() {
            b.refill(now);
            if let Some(&(arr, seq, _, cost)) = b.queue.front() {
                if b.tokens >= b.need(cost) && best.is_none_or(|(a, s, _)| (arr, seq) < (a, s)) {
                    best = Some((arr, seq, i));
                }
            }
        }
        let (_, _, i) = best?;
        let b = &mut self.buckets[i];
        let (_, _, req, cost) = b.queue.pop_front()?;
        b.tokens -= b.need(cost);
        Some((i, req, None))
    }
    fn complete(&mut self, _vol: usize, _req: &Request, _service_ns: u64, _now: u64) {}
    fn next_time(&self, now: u64) -> Option<u64> {
        self.buckets
            .iter()
            .filter_map(|b| {
                let &(_, _, _, cost) = b.queue.front()?;
                let need = b.need(cost).saturating_sub(b.tokens);
                if need == 0 || b.rate == 0 {
                    return Some(now);
                }
                let wait = u64::try_from(need.div_ceil(b.rate)).unwrap_or(u64::MAX);
                Some(b.at.max(now).saturating_add(wait.max(1)))
            })
            .min()
    }
    fn reconfigure(&mut self, vol: usize, config: VolumeConfig, now: u64) -> Result<(), String> {
        self.configs[vol] = config;
        self.recompute(now);
        Ok(())
    }
}

/// One global FIFO.
#[derive(Default)]
pub struct FifoDispatcher {
    queue: VecDeque<(usize, Request)>,
}

impl SimDispatcher for FifoDispatcher {
    fn name(&self) -> &'static str {
        "fifo"
    }
    fn enqueue(&mut self, vol: usize, req: Request, _cost: u64, _now: u64) -> Result<(), String> {
        self.queue.push_back((vol, req));
        Ok(())
    }
    fn dispatch(&mut self, _now: u64) -> Option<(usize, Request, Option<ServiceClass>)> {
        self.queue.pop_front().map(|(v, r)| (v, r, None))
    }
    fn complete(&mut self, _vol: usize, _req: &Request, _service_ns: u64, _now: u64) {}
    fn next_time(&self, now: u64) -> Option<u64> {
        (!self.queue.is_empty()).then_some(now)
    }
    fn reconfigure(&mut self, _vol: usize, _config: VolumeConfig, _now: u64) -> Result<(), String> {
        Ok(())
    }
}

struct MclockVolume {
    config: VolumeConfig,
    /// (arrival, request, cost)
    queue: VecDeque<(u64, Request, u64)>,
    r: TagClock,
    l: TagClock,
    p: TagClock,
}

impl MclockVolume {
    fn eligible(&self, now: u64) -> bool {
        !self.queue.is_empty() && (self.config.limit_iops.is_none() || self.l.ready_at() <= now)
    }
}

/// Textbook mClock reservation tags anchored at each request's arrival (see the module doc).
/// A linear scan over the volumes per decision: a reference, not a fast path.
pub struct ArrivalMclockDispatcher {
    vols: Vec<MclockVolume>,
    vtime: u64,
}

impl ArrivalMclockDispatcher {
    /// One volume per configuration, in order.
    #[must_use]
    pub fn new(volumes: &[VolumeConfig]) -> Self {
        Self {
            vols: volumes
                .iter()
                .map(|&config| MclockVolume {
                    config,
                    queue: VecDeque::new(),
                    r: TagClock::starting_at(0),
                    l: TagClock::starting_at(0),
                    p: TagClock::starting_at(0),
                })
                .collect(),
            vtime: 0,
        }
    }
}

impl SimDispatcher for ArrivalMclockDispatcher {
    fn name(&self) -> &'static str {
        "mclock-arrival"
    }
    fn enqueue(&mut self, vol: usize, req: Request, cost: u64, now: u64) -> Result<(), String> {
        let v = self
            .vols
            .get_mut(vol)
            .ok_or_else(|| format!("no volume {vol}"))?;
        v.queue.push_back((now, req, cost));
        Ok(())
    }
    fn dispatch(&mut self, now: u64) -> Option<(usize, Request, Option<ServiceClass>)> {
        let vtime = self.vtime;
        // Smallest due reservation tag (ties: lower index), else smallest proportional tag.
        let mut res: Option<(u64, usize)> = None;
        let mut share: Option<(u64, usize)> = None;
        for (i, v) in self.vols.iter().enumerate() {
            if !v.eligible(now) {
                continue;
            }
            let &(arrival, _, _) = v.queue.front()?;
            if v.config.committed_iops > 0 {
                let r = v.r.tag_for(arrival);
                if r <= now && res.is_none_or(|(best, _)| r < best) {
                    res = Some((r, i));
                }
            }
            let p = v.p.tag_for(vtime);
            if share.is_none_or(|(best, _)| p < best) {
                share = Some((p, i));
            }
        }
        let (tag, i, class) = match (res, share) {
            (Some((r, i)), _) => (r, i, ServiceClass::Reservation),
            (None, Some((p, i))) => (p, i, ServiceClass::Share),
            (None, None) => return None,
        };
        let v = &mut self.vols[i];
        let (_, req, cost) = v.queue.pop_front()?;
        if class == ServiceClass::Reservation {
            v.r.charge(tag, cost, Rate::Iops(v.config.committed_iops));
        } else {
            v.p.charge(tag, cost, Rate::Weight(v.config.weight));
            self.vtime = self.vtime.max(tag);
        }
        if let Some(limit) = v.config.limit_iops {
            let l = v.l.tag_for(now);
            v.l.charge(l, cost, Rate::Iops(limit));
        }
        Some((i, req, Some(class)))
    }
    fn complete(&mut self, _vol: usize, _req: &Request, _service_ns: u64, _now: u64) {}
    fn next_time(&self, now: u64) -> Option<u64> {
        self.vols
            .iter()
            .filter(|v| !v.queue.is_empty())
            .map(|v| if v.eligible(now) { now } else { v.l.ready_at() })
            .min()
    }
    fn reconfigure(&mut self, vol: usize, config: VolumeConfig, _now: u64) -> Result<(), String> {
        let v = self
            .vols
            .get_mut(vol)
            .ok_or_else(|| format!("no volume {vol}"))?;
        v.config = config;
        if config.committed_iops > 0 {
            v.r.respace(Rate::Iops(config.committed_iops));
        }
        if let Some(limit) = config.limit_iops {
            v.l.respace(Rate::Iops(limit));
        }
        v.p.respace(Rate::Weight(config.weight));
        Ok(())
    }
}
