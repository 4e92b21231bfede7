//! Per-physical-CPU run queues.
//!
//! Design: three ordered sets per CPU, each keyed by `(key, VcpuId)` so ties break deterministically by id:
//! - `releases`: the next period release of every vCPU on the CPU (runnable or not), to roll periods over
//!   lazily and to cut slices at the next release, which is where an earlier deadline may appear;
//! - `rt`: runnable vCPUs with positive baseline budget, keyed by absolute deadline (EDF);
//! - `burst`: runnable vCPUs that exhausted their budget and may burst, keyed by virtual time (stride
//!   scheduling: virtual time advances by `ran * stride`, `stride = WEIGHT_SCALE / weight`, so the minimum-vtime vCPU is the one
//!   furthest behind its weighted share).
//!
//! Every operation is O(log n) in the vCPUs of the CPU. Invariant: a vCPU is in at most one of `rt`/`burst`,
//! with exactly the key stored in its own state (`Queue`), and in `releases` exactly once.

use alloc::collections::{BTreeSet, VecDeque};

use super::admission::CpuLoad;
use super::VcpuId;

/// Virtual-time scale: one ns of burst time at weight w advances vtime by `stride = floor(WEIGHT_SCALE / w)`
/// (precomputed per vCPU so the hot path multiplies instead of dividing). The floor makes a vCPU's vtime advance
/// at most `w / 2^40 < 4e-3 ppm` too slowly, far below the 1% share accuracy the tests demand.
pub const WEIGHT_SCALE: u128 = 1 << 40;

/// Stride of weight `w` (w >= 1).
#[must_use]
pub fn stride(weight: u32) -> u128 {
    WEIGHT_SCALE / u128::from(weight.max(1))
}

/// Which queue a vCPU is in, with its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Queue {
    /// Not runnable.
    None,
    /// Real-time tier, keyed by deadline.
    Rt(u64),
    /// Burst tier, keyed by virtual time.
    Burst(u128),
    /// Runnable but ineligible until its next release (no credits, or cap reached); `true` = for credits.
    Throttled(bool),
}

/// The decision currently executing on a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Running {
    pub vcpu: VcpuId,
    pub burst: bool,
}

/// One physical CPU.
#[derive(Clone, Debug, Default)]
pub(crate) struct CpuQueue {
    pub load: CpuLoad,
    pub releases: BTreeSet<(u64, VcpuId)>,
    pub rt: BTreeSet<(u64, VcpuId)>,
    pub burst: BTreeSet<(u128, VcpuId)>,
    /// Virtual time of the last burst pick; joiners start no earlier (no hoarding while away).
    pub vclock: u128,
    pub current: Option<Running>,
    /// True between an idle decision and the next pick (the kernel must be kicked on wake).
    pub idle: bool,
    pub vcpus: usize,
    /// Picks made while a previous decision was never charged (a kernel glue bug, counted not trusted).
    pub uncharged_picks: u64,
}

impl CpuQueue {
    pub(crate) fn leave(&mut self, id: VcpuId, q: Queue) {
        match q {
            Queue::Rt(d) => {
                self.rt.remove(&(d, id));
            }
            Queue::Burst(v) => {
                self.burst.remove(&(v, id));
            }
            Queue::None | Queue::Throttled(_) => {}
        }
    }

    pub(crate) fn enter(&mut self, id: VcpuId, q: Queue) {
        match q {
            Queue::Rt(d) => {
                self.rt.insert((d, id));
            }
            Queue::Burst(v) => {
                self.burst.insert((v, id));
            }
            Queue::None | Queue::Throttled(_) => {}
        }
    }

    pub(crate) fn next_release(&self) -> Option<u64> {
        self.releases.first().map(|&(r, _)| r)
    }
}

/// Bounded FIFO with a drop counter.
///
/// Its storage is reserved up front ([`Bounded::new`]), so [`Bounded::push`] never reallocates: it runs inside
/// `Scheduler::pick` (period rollover), under the scheduler lock, on the path between a real-time vCPU's wake-up
/// and its entry. A growing `VecDeque` doubles and copies its contents there instead: at 2048 telemetry records
/// that is a 136 KiB copy, which in Bochs took 380 us and made a 1 ms real-time vCPU's wake-up 350 us late
/// (issue 5's "Bochs VMX preemption-timer overrun": the timer was on time, the host's pick was not).
#[derive(Clone, Debug)]
pub(crate) struct Bounded<T> {
    pub items: VecDeque<T>,
    pub capacity: usize,
    pub dropped: u64,
}

impl<T> Bounded<T> {
    /// A FIFO keeping the newest `capacity` items, with room for all of them reserved now. If that reservation
    /// fails (an absurd capacity, or no memory) the FIFO still works and grows on demand.
    pub(crate) fn new(capacity: usize) -> Self {
        let mut items = VecDeque::new();
        // Growing on demand is the fallback, not an error: the FIFO stays correct, only slower when it grows.
        let _ = items.try_reserve_exact(capacity);
        Self {
            items,
            capacity,
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, item: T) {
        if self.capacity == 0 {
            self.dropped = self.dropped.saturating_add(1);
            return;
        }
        if self.items.len() >= self.capacity {
            self.items.pop_front();
            self.dropped = self.dropped.saturating_add(1);
        }
        self.items.push_back(item);
    }
}

#[cfg(test)]
mod tests {
    use super::Bounded;
    use alloc::vec::Vec;

    #[test]
    fn bounded_reserves_up_front_and_never_grows() {
        let mut b = Bounded::new(100);
        let reserved = b.items.capacity();
        assert!(reserved >= 100);
        for i in 0..1000u64 {
            b.push(i);
            assert_eq!(b.items.capacity(), reserved, "push {i} reallocated");
        }
        assert_eq!(b.items.len(), 100);
        assert_eq!(b.dropped, 900);
        assert_eq!(b.items.front(), Some(&900));
        // Draining keeps the reservation for the next round.
        let drained: Vec<u64> = b.items.drain(..).collect();
        assert_eq!(drained.len(), 100);
        assert_eq!(b.items.capacity(), reserved);
    }

    #[test]
    fn bounded_with_an_unreservable_capacity_still_works() {
        let mut b = Bounded::new(usize::MAX);
        for i in 0..10u64 {
            b.push(i);
        }
        assert_eq!(b.items.len(), 10);
        assert_eq!(b.dropped, 0);
        let mut z: Bounded<u64> = Bounded::new(0);
        z.push(1);
        assert_eq!((z.items.len(), z.dropped), (0, 1));
    }
}
