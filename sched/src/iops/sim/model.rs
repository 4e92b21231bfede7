//! Simulated device and workloads: deterministic seeded RNG, service-time distribution with
//! internal parallelism, and the open/closed-loop arrival patterns of the scenarios.
//!
//! Design: the device has `parallelism` internal slots; a request occupies one slot for its service
//! time, which is `mean_service_ns` per unit I/O times a factor drawn uniformly in
//! `1 ± jitter`, and with probability `tail` multiplied by `tail_factor` (a slow-path tail). The
//! simulator keeps at most `parallelism` requests in flight (as the kernel keeps its submission
//! queue depth), so every ordering decision is the dispatcher's, not the device's.
//! Integer arithmetic throughout, so the harness builds without `std` and runs in `cargo test`.

use alloc::vec::Vec;

/// SplitMix64: small, fast, deterministic, good enough for simulation.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is negligible for the small `n` used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Device model.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct DeviceModel {
    /// Internal parallelism (requests served at once).
    pub parallelism: usize,
    /// Mean service time of one unit I/O without the tail (ns).
    pub mean_service_ns: u64,
    /// Uniform jitter around the mean, per mille (e.g. 400 = ±40%).
    pub jitter_permille: u32,
    /// Probability of a slow request, per mille.
    pub tail_permille: u32,
    /// Slow-request multiplier.
    pub tail_factor: u32,
}

impl DeviceModel {
    /// Service time of a request of `cost` cost units.
    pub fn service_ns(&self, cost: u64, rng: &mut Rng) -> u64 {
        let j = u64::from(self.jitter_permille.min(999));
        let mut factor = 1000 - j + rng.below(2 * j + 1);
        if rng.below(1000) < u64::from(self.tail_permille) {
            factor *= u64::from(self.tail_factor);
        }
        let ns = u128::from(self.mean_service_ns) * u128::from(factor) * u128::from(cost)
            / (1000 * u128::from(crate::iops::COST_ONE));
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }

    /// Expected capacity in unit I/Os per second (rounded down).
    #[must_use]
    pub fn capacity_iops(&self) -> u64 {
        let mean_factor =
            1000 + u128::from(self.tail_permille) * u128::from(self.tail_factor.saturating_sub(1));
        let slots = u128::try_from(self.parallelism).unwrap_or(0);
        let c =
            slots * 1_000_000_000 * 1000 / (u128::from(self.mean_service_ns.max(1)) * mean_factor);
        u64::try_from(c).unwrap_or(u64::MAX)
    }
}

/// A volume's request pattern.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub enum Workload {
    /// Evenly spaced arrivals (open loop).
    Constant {
        /// Arrival rate.
        iops: u64,
    },
    /// Closed loop: keeps `depth` requests outstanding.
    ClosedLoop {
        /// Queue depth.
        depth: u32,
    },
    /// Open loop alternating `on_ns` at `iops` and `off_ns` silent, starting on.
    OnOff {
        /// Rate while on.
        iops: u64,
        /// On period.
        on_ns: u64,
        /// Off period.
        off_ns: u64,
    },
    /// Silent for `idle_ns`, then open loop at `iops`.
    IdleThenFlood {
        /// Idle period.
        idle_ns: u64,
        /// Rate afterwards.
        iops: u64,
    },
}

impl Workload {
    /// Whether this is a closed loop, and its depth.
    #[must_use]
    pub fn closed_depth(&self) -> Option<u32> {
        match self {
            Workload::ClosedLoop { depth } => Some(*depth),
            _ => None,
        }
    }

    /// Time of the `k`-th arrival (k >= 0) of an open-loop workload, or `None` for closed loops.
    #[must_use]
    pub fn arrival(&self, k: u64) -> Option<u64> {
        let at = |iops: u64, k: u64| -> u64 {
            u64::try_from(u128::from(k) * 1_000_000_000 / u128::from(iops.max(1)))
                .unwrap_or(u64::MAX)
        };
        match *self {
            Workload::Constant { iops } => Some(at(iops, k)),
            Workload::ClosedLoop { .. } => None,
            Workload::OnOff {
                iops,
                on_ns,
                off_ns,
            } => {
                // Arrivals per on period, then shift by whole cycles.
                let per_on = u64::try_from(u128::from(on_ns) * u128::from(iops) / 1_000_000_000)
                    .unwrap_or(u64::MAX)
                    .max(1);
                let cycle = k / per_on;
                let within = k % per_on;
                Some(
                    cycle
                        .saturating_mul(on_ns + off_ns)
                        .saturating_add(at(iops, within)),
                )
            }
            Workload::IdleThenFlood { idle_ns, iops } => Some(idle_ns.saturating_add(at(iops, k))),
        }
    }

    /// Start times of the "on" phases after the first (when an owner comes back from idle), up to
    /// `until`.
    #[must_use]
    pub fn returns(&self, until: u64) -> Vec<u64> {
        match *self {
            Workload::OnOff { on_ns, off_ns, .. } => {
                let cycle = on_ns + off_ns;
                (1..)
                    .map(|i| i * cycle)
                    .take_while(|&t| t < until)
                    .collect()
            }
            Workload::IdleThenFlood { idle_ns, .. } if idle_ns < until => alloc::vec![idle_ns],
            _ => Vec::new(),
        }
    }
}
