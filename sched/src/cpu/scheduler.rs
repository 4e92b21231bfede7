//! The scheduler proper: vCPU lifecycle, `pick` / `charge` / `wake` / `block`, period roll-over, credits,
//! burst tier, pool requests and grants. See [`crate::cpu`] for the model and the guarantee proof.
//!
//! Design: a slab of vCPUs indexed by [`VcpuId`] (ids are never reused, so a stale id from the management
//! channel cannot hit a new vCPU) and one `CpuQueue` per physical CPU. Period releases are processed lazily by
//! `pick` on the vCPU's CPU (at the release instant, not at `now`), so no timer other than the one the kernel
//! arms for the returned slice is needed. The kernel contract is: `pick`, run the vCPU for at most
//! `slice_ns + overrun_bound_ns`, `charge` the time since the decision (exactly, overrun included), repeat; call
//! `wake` / `block` when the vCPU becomes runnable / halts, and re-pick within the overrun bound when `wake`
//! asks for a preemption.
//!
//! Retirement ([`Scheduler::retire`]): a vCPU whose VM stopped for good leaves the run queues and its pending
//! credit request at once and never runs again, but keeps its slab entry (ledger, status, configuration,
//! cumulative totals), so reports, describe and the management channel's last snapshot still read it. Its
//! admitted server is given back to admission at once if its open job ran no baseline time, else at that job's
//! deadline (its next release, processed lazily like any release): the same rule as a reconfiguration's cover,
//! because a job that already ran part of its budget counts in the busy-window demand of the guarantee proof
//! ([`crate::cpu`], step (d)) until its deadline.
//!
//! Invariants: `budget <= Q` at all times and `budget >= -O` after any charge of a conforming kernel; a vCPU in
//! the `rt` set has `budget > 0`, one in the `burst` set has `budget <= 0`, credits or overdraft room, and cap
//! room; `ledger.conservation_error() == 0` always. A CPU's admitted load is the sum of `load_entry` over its
//! vCPUs with `load_held`; a retired vCPU is in no run queue, has no outstanding request, and is in `releases`
//! only while it still holds its load.

use alloc::vec::Vec;

use super::admission::{server_ppm, AdmissionError, Server};
use super::config::{BurstMode, ConfigError, SchedParams, VcpuConfig, PPM};
use super::ledger::{Ledger, LedgerCounters};
use super::placement::{worst_fit_decreasing, CpuUtilisation, PlacementError};
use super::pool::{
    CreditRequest, Grant, GrantError, GrantMemory, GrantOutcome, GrantSchedule, Outstanding,
    PoolState, Staged,
};
use super::runqueue::{stride, Bounded, CpuQueue, Queue, Running};
use super::telemetry::{PeriodAccum, PeriodRecord};
use super::{CpuId, VcpuId};

/// The tier a decision comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub enum Tier {
    /// Nothing may run.
    Idle,
    /// Real-time baseline (EDF server).
    Baseline,
    /// Weighted burst tier, paid with credits.
    Burst,
}

/// What to run on a physical CPU and for how long.
#[must_use = "the kernel must run the decision and charge it, or the vCPU's time is lost"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The vCPU to run; `None` = idle.
    pub vcpu: Option<VcpuId>,
    /// Arm the preemption timer for this long. For idle decisions, the time until the next release on this CPU
    /// (`u64::MAX` when the CPU has no vCPU at all: sleep until a wake).
    pub slice_ns: u64,
    /// Tier of the decision.
    pub tier: Tier,
}

/// Result of [`Scheduler::wake`].
#[must_use = "a requested preemption must reach the CPU within the overrun bound"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wake {
    /// Re-pick on this CPU (kick it) within the overrun bound.
    pub preempt: Option<CpuId>,
}

/// Errors of scheduler operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedError {
    /// The configuration is invalid.
    Config(ConfigError),
    /// Admission control refused it.
    Admission(AdmissionError),
    /// No placement satisfies admission.
    Placement(PlacementError),
    /// Unknown physical CPU.
    NoSuchCpu(CpuId),
    /// Unknown or removed vCPU; also a retired one for operations that would run or re-admit it.
    NoSuchVcpu(VcpuId),
    /// `charge` for a vCPU that is not the current decision of its CPU.
    NotRunning(VcpuId),
    /// Too many vCPUs for the id space.
    TooManyVcpus,
}

/// What [`Scheduler::retire`] gave back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retirement {
    /// Physical CPU the vCPU was admitted on.
    pub cpu: CpuId,
    /// Admitted utilisation returned to that CPU (its server entry, overrun allowance included), ppm.
    pub released_ppm: u64,
    /// When admission has it back: the retirement instant if the open job ran no baseline time, else that job's
    /// deadline (the vCPU's next release; the CPU's next `pick` at or after it settles it).
    pub admissible_at_ns: u64,
    /// Final credit balance.
    pub balance_ns: i64,
    /// Staged grant credits never applied (to refund to the pool).
    pub undelivered_grant_ns: u64,
}

impl core::fmt::Display for SchedError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Config(e) => write!(f, "invalid configuration: {e}"),
            Self::Admission(e) => write!(f, "admission refused: {e}"),
            Self::Placement(e) => write!(f, "placement failed: {e}"),
            Self::NoSuchCpu(c) => write!(f, "no physical cpu {c}"),
            Self::NoSuchVcpu(v) => write!(f, "no vcpu {}", v.0),
            Self::NotRunning(v) => write!(f, "vcpu {} was not picked", v.0),
            Self::TooManyVcpus => write!(f, "vcpu id space exhausted"),
        }
    }
}

impl From<ConfigError> for SchedError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl From<AdmissionError> for SchedError {
    fn from(e: AdmissionError) -> Self {
        Self::Admission(e)
    }
}

/// Snapshot of one vCPU for the management channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize))]
pub struct VcpuStatus {
    /// Physical CPU.
    pub cpu: CpuId,
    /// Current period index.
    pub period: u64,
    /// Remaining baseline budget in this period (negative = overrun debt repaid next period).
    pub budget_ns: i64,
    /// Credit balance (negative while overdrawn).
    pub balance_ns: i64,
    /// Cumulative ledger counters.
    pub counters: LedgerCounters,
    /// Runnable.
    pub runnable: bool,
    /// Cumulative baseline and burst time.
    pub total_baseline_ns: u64,
    /// Cumulative burst time.
    pub total_burst_ns: u64,
    /// Credits staged in grants not yet applied.
    pub staged_grant_ns: u64,
    /// Retired ([`Scheduler::retire`]): the figures are final.
    pub retired: bool,
}

/// What remains of a removed vCPU (for the management agent's books).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removed {
    /// Final balance.
    pub balance_ns: i64,
    /// Staged grant credits never applied (to refund to the pool).
    pub undelivered_grant_ns: u64,
}

#[derive(Clone, Debug)]
struct Vcpu {
    cfg: VcpuConfig,
    cpu: CpuId,
    u_ppm: u64,
    /// The server entry admission currently accounts for this vCPU (see `reconfigure`).
    load_entry: Server,
    period: u64,
    period_start: u64,
    next_release: u64,
    /// Period length in force for the open period (a reconfigured period applies from the next release).
    cur_period_ns: u64,
    budget: i64,
    runnable: bool,
    queue: Queue,
    vtime: u128,
    /// `WEIGHT_SCALE / weight`, precomputed.
    stride: u128,
    /// Share cap of the open period in ns (`u64::MAX` without a cap), precomputed at each release.
    cap_ns: u64,
    ledger: Ledger,
    counters_at_start: LedgerCounters,
    acc: PeriodAccum,
    runnable_since: Option<u64>,
    throttled_since: Option<(u64, bool)>,
    woke_at: Option<u64>,
    pool: PoolState,
    total_baseline_ns: u64,
    total_burst_ns: u64,
    /// Retired for good: never queued, picked or woken again.
    retired: bool,
    /// `load_entry` is counted in its CPU's admitted load (false once a retirement gave it back).
    load_held: bool,
}

fn sat_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Vcpu {
    fn cap_room(&self) -> u64 {
        self.cap_ns
            .saturating_sub(self.acc.baseline_ns.saturating_add(self.acc.burst_ns))
    }

    /// Recomputes the derived per-configuration values.
    fn derive(&mut self) {
        self.stride = stride(self.cfg.weight);
        self.derive_cap();
    }

    /// Recomputes the cap of the open period.
    fn derive_cap(&mut self) {
        self.cap_ns = match self.cfg.cap_ppm {
            None => u64::MAX,
            Some(c) => {
                let limit = u128::from(c) * u128::from(self.cur_period_ns) / u128::from(PPM);
                u64::try_from(limit).unwrap_or(u64::MAX)
            }
        };
    }

    fn spend_room(&self) -> u64 {
        let lots = self.ledger.lots_total();
        match self.cfg.burst_mode {
            BurstMode::Standard => lots,
            BurstMode::Unlimited { overdraft_limit_ns } => {
                lots.saturating_add(overdraft_limit_ns.saturating_sub(self.ledger.overdraft()))
            }
        }
    }

    /// Where the vCPU belongs now.
    fn target_queue(&self, vclock: u128) -> Queue {
        if !self.runnable {
            Queue::None
        } else if self.budget > 0 {
            Queue::Rt(self.next_release)
        } else if self.cap_room() == 0 {
            Queue::Throttled(false)
        } else if self.spend_room() == 0 {
            Queue::Throttled(true)
        } else {
            Queue::Burst(self.vtime.max(vclock))
        }
    }

    fn close_throttle(&mut self, at: u64) {
        if let Some((since, credit)) = self.throttled_since.take() {
            let d = at.saturating_sub(since);
            self.acc.throttled_ns = self.acc.throttled_ns.saturating_add(d);
            if credit {
                self.acc.credit_throttled_ns = self.acc.credit_throttled_ns.saturating_add(d);
            }
        }
    }

    fn close_runnable(&mut self, at: u64) {
        if let Some(since) = self.runnable_since {
            self.acc.runnable_ns = self
                .acc
                .runnable_ns
                .saturating_add(at.saturating_sub(since));
            self.runnable_since = Some(at.max(since));
        }
    }
}

/// The CPU scheduler of one host.
#[derive(Clone, Debug)]
pub struct Scheduler {
    params: SchedParams,
    cpus: Vec<CpuQueue>,
    vcpus: Vec<Option<Vcpu>>,
    grants: GrantMemory,
    next_request_id: u64,
    requests: Bounded<CreditRequest>,
    telemetry: Bounded<PeriodRecord>,
}

impl Scheduler {
    /// A scheduler for `num_cpus` physical CPUs.
    ///
    /// # Errors
    /// [`ConfigError::BadParams`] when `params` are inconsistent.
    pub fn new(num_cpus: usize, params: SchedParams) -> Result<Self, ConfigError> {
        params.validate()?;
        Ok(Self {
            params,
            cpus: (0..num_cpus).map(|_| CpuQueue::default()).collect(),
            vcpus: Vec::new(),
            grants: GrantMemory::default(),
            next_request_id: 1,
            requests: Bounded::new(4096),
            telemetry: Bounded::new(params.telemetry_capacity),
        })
    }

    /// Host parameters.
    #[must_use]
    pub fn params(&self) -> &SchedParams {
        &self.params
    }

    /// Number of physical CPUs.
    #[must_use]
    pub fn num_cpus(&self) -> usize {
        self.cpus.len()
    }

    fn cpu_index(&self, cpu: CpuId) -> Result<usize, SchedError> {
        usize::try_from(cpu)
            .ok()
            .filter(|&i| i < self.cpus.len())
            .ok_or(SchedError::NoSuchCpu(cpu))
    }

    fn slot(id: VcpuId) -> usize {
        usize::try_from(id.0).unwrap_or(usize::MAX)
    }

    fn vcpu(&self, id: VcpuId) -> Result<&Vcpu, SchedError> {
        self.vcpus
            .get(Self::slot(id))
            .and_then(Option::as_ref)
            .ok_or(SchedError::NoSuchVcpu(id))
    }

    fn vcpu_mut(&mut self, id: VcpuId) -> Result<&mut Vcpu, SchedError> {
        self.vcpus
            .get_mut(Self::slot(id))
            .and_then(Option::as_mut)
            .ok_or(SchedError::NoSuchVcpu(id))
    }

    /// Admits a new vCPU on `cpu`; its first period starts at `now`. It starts blocked: call [`Self::wake`].
    ///
    /// # Errors
    /// Invalid configuration, unknown CPU, or admission refusal with the numbers.
    pub fn add_vcpu(
        &mut self,
        cpu: CpuId,
        cfg: VcpuConfig,
        now: u64,
    ) -> Result<VcpuId, SchedError> {
        cfg.validate()?;
        let ci = self.cpu_index(cpu)?;
        self.cpus[ci].load.check(cpu, &cfg, None, &self.params)?;
        let id = VcpuId(u32::try_from(self.vcpus.len()).map_err(|_| SchedError::TooManyVcpus)?);
        self.cpus[ci].load.add(&cfg, &self.params);
        let ledger = Ledger::new(cfg.launch_balance_ns);
        let v = Vcpu {
            cfg,
            cpu,
            u_ppm: server_ppm(&cfg, &self.params),
            load_entry: Server::of(&cfg, &self.params),
            period: 1,
            period_start: now,
            next_release: now.saturating_add(cfg.period_ns),
            cur_period_ns: cfg.period_ns,
            budget: to_i64(cfg.budget_ns),
            runnable: false,
            queue: Queue::None,
            vtime: self.cpus[ci].vclock,
            stride: stride(cfg.weight),
            cap_ns: u64::MAX,
            counters_at_start: ledger.counters(),
            ledger,
            acc: PeriodAccum::default(),
            runnable_since: None,
            throttled_since: None,
            woke_at: None,
            pool: PoolState::default(),
            total_baseline_ns: 0,
            total_burst_ns: 0,
            retired: false,
            load_held: true,
        };
        let mut v = v;
        v.derive();
        self.cpus[ci].releases.insert((v.next_release, id));
        self.cpus[ci].vcpus += 1;
        self.vcpus.push(Some(v));
        Ok(id)
    }

    /// Places a new vCPU on the least-loaded CPU where admission holds ([`Self::place`]), then adds it.
    ///
    /// # Errors
    /// As [`Self::add_vcpu`], or [`SchedError::Placement`] when no CPU fits.
    pub fn add_vcpu_placed(&mut self, cfg: VcpuConfig, now: u64) -> Result<VcpuId, SchedError> {
        let placed = self.place(&[cfg])?;
        let cpu = placed.first().copied().ok_or(SchedError::TooManyVcpus)?;
        self.add_vcpu(cpu, cfg, now)
    }

    /// Worst-fit-decreasing placement of a batch of new vCPUs (e.g. one VM), without adding them: each goes to the
    /// CPU with the least admitted utilisation that admits it, with first fit decreasing as the fallback when
    /// spreading cannot place the whole batch ([`super::placement`]).
    ///
    /// # Errors
    /// An invalid configuration, or the first vCPU (in decreasing order) that fits nowhere.
    pub fn place(&self, cfgs: &[VcpuConfig]) -> Result<Vec<CpuId>, SchedError> {
        for c in cfgs {
            c.validate()?;
        }
        let loads: Vec<_> = self.cpus.iter().map(|c| c.load.clone()).collect();
        worst_fit_decreasing(&loads, cfgs, &self.params).map_err(SchedError::Placement)
    }

    /// Per-CPU admitted utilisation.
    #[must_use]
    pub fn utilisation(&self) -> Vec<CpuUtilisation> {
        self.cpus
            .iter()
            .enumerate()
            .map(|(i, c)| CpuUtilisation {
                cpu: CpuId::try_from(i).unwrap_or(CpuId::MAX),
                used_ppm: c.load.used_ppm(),
                bound_ppm: c.load.bound_ppm(&self.params, None),
                vcpus: c.vcpus,
            })
            .collect()
    }

    /// Removes a vCPU (its queued state, admitted load, staged grants and all its records). A retired vCPU may
    /// be removed too (what it still holds is given back at once).
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`].
    pub fn remove_vcpu(&mut self, id: VcpuId) -> Result<Removed, SchedError> {
        let v = self
            .vcpus
            .get_mut(Self::slot(id))
            .and_then(Option::take)
            .ok_or(SchedError::NoSuchVcpu(id))?;
        let ci = self.cpu_index(v.cpu)?;
        let q = &mut self.cpus[ci];
        q.leave(id, v.queue);
        q.releases.remove(&(v.next_release, id));
        if v.load_held {
            q.load.remove_server(v.load_entry);
        }
        if !v.retired {
            q.vcpus -= 1;
        }
        if q.current.is_some_and(|r| r.vcpu == id) {
            q.current = None;
        }
        Ok(Removed {
            balance_ns: sat_i64(v.ledger.balance()),
            undelivered_grant_ns: v.pool.undelivered(),
        })
    }

    /// Retires a vCPU for good at `now` (its VM stopped): it leaves the run queues (a decision for it that was
    /// not charged yet is dropped), its pending credit request is withdrawn (the outstanding one and any not yet
    /// taken by [`Self::take_credit_requests`]), and its admitted server goes back to admission, at once if its
    /// open job ran no baseline time, else at that job's deadline (see the module docs). Its ledger, status,
    /// configuration and cumulative totals stay readable; staged grants stay undelivered (reported for a
    /// refund). Afterwards [`Self::wake`] and [`Self::reconfigure`] fail with [`SchedError::NoSuchVcpu`],
    /// [`Self::charge`] with [`SchedError::NotRunning`], grants with [`GrantError::NoSuchVcpu`]; `pick` never
    /// returns it and `block` is a no-op. Returns `None` when it was retired already (a no-op).
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`] for an unknown or removed vCPU.
    pub fn retire(&mut self, id: VcpuId, now: u64) -> Result<Option<Retirement>, SchedError> {
        let ci = self.cpu_index(self.vcpu(id)?.cpu)?;
        let v = self.vcpu_mut(id)?;
        if v.retired {
            return Ok(None);
        }
        v.close_runnable(now);
        v.close_throttle(now);
        v.runnable = false;
        v.runnable_since = None;
        v.woke_at = None;
        v.retired = true;
        v.pool.outstanding = None;
        let (queue, entry, next_release) = (v.queue, v.load_entry, v.next_release);
        v.queue = Queue::None;
        // A job that ran baseline time counts in the guarantee's demand until its deadline.
        let now_free = v.acc.baseline_ns == 0 || next_release <= now;
        let retirement = Retirement {
            cpu: v.cpu,
            released_ppm: entry.ppm,
            admissible_at_ns: if now_free { now } else { next_release },
            balance_ns: sat_i64(v.ledger.balance()),
            undelivered_grant_ns: v.pool.undelivered(),
        };
        if now_free {
            v.load_held = false;
        }
        self.requests.items.retain(|r| r.vcpu != id);
        let q = &mut self.cpus[ci];
        q.leave(id, queue);
        q.vcpus -= 1;
        if q.current.is_some_and(|r| r.vcpu == id) {
            q.current = None;
        }
        if now_free {
            q.releases.remove(&(next_release, id));
            q.load.remove_server(entry);
        }
        Ok(Some(retirement))
    }

    /// Whether the vCPU was retired ([`Self::retire`]).
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`].
    pub fn is_retired(&self, id: VcpuId) -> Result<bool, SchedError> {
        Ok(self.vcpu(id)?.retired)
    }

    /// A retired vCPU's deferred release came: its server leaves its CPU's admitted load.
    fn settle_retired(&mut self, id: VcpuId) -> Result<(), SchedError> {
        let v = self.vcpu_mut(id)?;
        if !v.load_held {
            return Ok(());
        }
        v.load_held = false;
        let (cpu, entry) = (v.cpu, v.load_entry);
        let ci = self.cpu_index(cpu)?;
        self.cpus[ci].load.remove_server(entry);
        Ok(())
    }

    /// Changes a vCPU's configuration through admission. Credits, weight, cap and pool settings apply at once; a
    /// new period length applies from the next release; the open period's remaining budget is clamped to what
    /// the new server may use before its deadline (`(d - now) * u'_new - O`). Until that release admission
    /// accounts the vCPU as the cover of its old and new servers (larger utilisation, shorter period), so neither
    /// an increase nor a decrease can hurt another vCPU's guarantee: freed bandwidth is admissible from the next
    /// release on. The launch balance of an existing vCPU is ignored.
    ///
    /// # Errors
    /// Invalid configuration, unknown or retired vCPU ([`SchedError::NoSuchVcpu`]), or admission refusal (for
    /// the new server, or for the cover while the current period ends).
    pub fn reconfigure(&mut self, id: VcpuId, cfg: VcpuConfig, now: u64) -> Result<(), SchedError> {
        cfg.validate()?;
        if self.vcpu(id)?.retired {
            return Err(SchedError::NoSuchVcpu(id));
        }
        let params = self.params;
        let (cpu, entry, job) = {
            let v = self.vcpu(id)?;
            (
                v.cpu,
                v.load_entry,
                Server {
                    ppm: v.u_ppm,
                    period_ns: v.cur_period_ns,
                },
            )
        };
        let new = Server::of(&cfg, &params);
        // The open job still runs under its old server (or the cover from an earlier change this period).
        let cover = new.cover(job).cover(entry);
        let ci = self.cpu_index(cpu)?;
        self.cpus[ci]
            .load
            .check_server(cpu, new, Some(entry), &params)?;
        self.cpus[ci]
            .load
            .check_server(cpu, cover, Some(entry), &params)?;
        self.cpus[ci].load.remove_server(entry);
        self.cpus[ci].load.add_server(cover);
        let v = self.vcpu_mut(id)?;
        v.cfg = cfg;
        v.derive();
        v.load_entry = cover;
        v.u_ppm = new.ppm;
        v.budget = v.budget.min(Self::fluid_limit(v, now, &params));
        self.reposition(id, now)
    }

    /// Largest budget a server may hold at `now` so that its remaining demand plus one overrun fits its admitted
    /// bandwidth before its deadline: `floor((d - now) * u' / 1e6) - O`.
    fn fluid_limit(v: &Vcpu, now: u64, params: &SchedParams) -> i64 {
        let left = u128::from(v.next_release.saturating_sub(now));
        let fluid = left * u128::from(v.u_ppm) / u128::from(PPM);
        let fluid = i64::try_from(fluid).unwrap_or(i64::MAX);
        let cap = to_i64(v.cfg.budget_ns);
        fluid
            .saturating_sub(to_i64(params.overrun_bound_ns))
            .clamp(0, cap)
    }

    /// Moves the vCPU to the queue its state calls for.
    fn reposition(&mut self, id: VcpuId, at: u64) -> Result<(), SchedError> {
        let slot = Self::slot(id);
        let v = self
            .vcpus
            .get_mut(slot)
            .and_then(Option::as_mut)
            .ok_or(SchedError::NoSuchVcpu(id))?;
        let ci = usize::try_from(v.cpu).map_err(|_| SchedError::NoSuchCpu(v.cpu))?;
        let q = self.cpus.get_mut(ci).ok_or(SchedError::NoSuchCpu(v.cpu))?;
        let target = v.target_queue(q.vclock);
        if let Queue::Burst(vt) = target {
            v.vtime = vt;
        }
        if target != v.queue {
            q.leave(id, v.queue);
            q.enter(id, target);
            v.queue = target;
        }
        match target {
            Queue::Throttled(credit) => match v.throttled_since {
                Some((_, c)) if c == credit => {}
                _ => {
                    v.close_throttle(at);
                    v.throttled_since = Some((at, credit));
                }
            },
            _ => v.close_throttle(at),
        }
        Ok(())
    }

    /// The vCPU became runnable at `now`. If its remaining budget exceeds what it may use at its admitted
    /// bandwidth before the deadline, it is clamped (this is what keeps a sleeper's deferred budget from
    /// hurting others; a vCPU runnable from its release loses nothing).
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`] for an unknown, removed or retired vCPU.
    pub fn wake(&mut self, id: VcpuId, now: u64) -> Result<Wake, SchedError> {
        let params = self.params;
        if self.vcpu(id)?.retired {
            return Err(SchedError::NoSuchVcpu(id));
        }
        if self.vcpu(id)?.runnable {
            return Ok(Wake { preempt: None });
        }
        // Close the vCPU's periods that ended by `now`, so the wake counts in (and its budget is clamped
        // against) the period it happens in.
        loop {
            let v = self.vcpu(id)?;
            let (r, ci) = (v.next_release, self.cpu_index(v.cpu)?);
            if r > now {
                break;
            }
            self.cpus[ci].releases.remove(&(r, id));
            self.rollover(id, r)?;
        }
        let v = self.vcpu_mut(id)?;
        v.runnable = true;
        v.runnable_since = Some(now);
        v.woke_at = Some(now);
        v.acc.wakeups = v.acc.wakeups.saturating_add(1);
        if v.budget > 0 {
            v.budget = v.budget.min(Self::fluid_limit(v, now, &params));
        }
        let cpu = v.cpu;
        self.reposition(id, now)?;
        let v = self.vcpu(id)?;
        let q = &self.cpus[self.cpu_index(cpu)?];
        let preempt = match (v.queue, q.current) {
            (Queue::Rt(_) | Queue::Burst(_), None) => q.idle,
            (Queue::Rt(d), Some(cur)) => match self.vcpu(cur.vcpu).map(|c| c.queue) {
                Ok(Queue::Rt(cd)) => (d, id) < (cd, cur.vcpu),
                _ => true,
            },
            _ => false,
        };
        Ok(Wake {
            preempt: preempt.then_some(cpu),
        })
    }

    /// The vCPU halted at `now` (charge its last run first).
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`].
    pub fn block(&mut self, id: VcpuId, now: u64) -> Result<(), SchedError> {
        let v = self.vcpu_mut(id)?;
        if !v.runnable {
            return Ok(());
        }
        v.close_runnable(now);
        v.runnable_since = None;
        v.runnable = false;
        v.woke_at = None;
        self.reposition(id, now)
    }

    /// Rolls the vCPU's period over at its release instant `r`.
    fn rollover(&mut self, id: VcpuId, r: u64) -> Result<(), SchedError> {
        if self.vcpu(id)?.retired {
            // The retired vCPU's last job is over: no new period opens, its load goes.
            return self.settle_retired(id);
        }
        let v = self.vcpu_mut(id)?;
        v.close_runnable(r);
        v.close_throttle(r);
        let closed = v.period;
        // Accrual of the closed period, then expiry relative to the new one.
        let (_, _) = v
            .ledger
            .accrue(closed, v.cfg.accrual_ns, v.cfg.balance_cap_ns);
        if let Some(life) = v.cfg.credit_lifetime_periods {
            // A lot tagged p is usable in periods p+1 ..= p+life.
            let oldest_valid = (closed + 1).saturating_sub(u64::from(life));
            v.ledger.expire_before(oldest_valid);
        }
        // Rate-staged grants release one instalment per period close.
        let mut granted = 0u64;
        for s in &mut v.pool.staged {
            if let GrantSchedule::PerPeriod { per_period_ns } = s.schedule {
                let take = per_period_ns.min(s.remaining_ns);
                s.remaining_ns -= take;
                granted = granted.saturating_add(take);
            }
        }
        v.pool.staged.retain(|s| s.remaining_ns > 0);
        if granted > 0 {
            v.ledger.grant(closed, granted);
        }
        let c = v.ledger.counters();
        let s = v.counters_at_start;
        let runnable = v.acc.runnable_ns;
        let used = v.acc.baseline_ns.saturating_add(v.acc.burst_ns);
        let rec = PeriodRecord {
            vcpu: id,
            cpu: v.cpu,
            period: closed,
            start_ns: v.period_start,
            end_ns: r,
            baseline_ns: v.acc.baseline_ns,
            burst_ns: v.acc.burst_ns,
            earned_ns: c.earned - s.earned,
            spent_ns: c.spent - s.spent,
            discarded_ns: c.discarded - s.discarded,
            expired_ns: c.expired - s.expired,
            granted_ns: c.granted - s.granted,
            balance_ns: sat_i64(v.ledger.balance()),
            waiting_ns: runnable.saturating_sub(used),
            throttled_ns: v.acc.throttled_ns,
            wakeups: v.acc.wakeups,
            max_wake_latency_ns: v.acc.max_wake_latency_ns,
            total_wake_latency_ns: v.acc.total_wake_latency_ns,
        };
        let demand = v.acc.burst_ns.saturating_add(v.acc.credit_throttled_ns);
        let request = match v.cfg.pool_policy() {
            Some(policy) => v
                .pool
                .on_period_close(&policy, demand, v.ledger.balance(), closed),
            None => None,
        };
        // Open the next period.
        v.period = closed + 1;
        v.period_start = r;
        v.cur_period_ns = v.cfg.period_ns;
        v.next_release = r.saturating_add(v.cfg.period_ns);
        v.derive_cap();
        v.budget = to_i64(v.cfg.budget_ns).saturating_add(v.budget.min(0));
        v.acc = PeriodAccum::default();
        v.counters_at_start = v.ledger.counters();
        let settled = Server {
            ppm: v.u_ppm,
            period_ns: v.cfg.period_ns,
        };
        let unsettled = (v.load_entry != settled).then_some(v.load_entry);
        v.load_entry = settled;
        let (cpu, next, balance) = (v.cpu, v.next_release, v.ledger.balance());
        if let Some(old) = unsettled {
            // The job started under the old server is over: account the new server alone.
            if let Ok(ci) = self.cpu_index(cpu) {
                self.cpus[ci].load.remove_server(old);
                self.cpus[ci].load.add_server(settled);
            }
        }
        if let Some((credits, mean)) = request {
            let request_id = self.next_request_id;
            self.next_request_id += 1;
            if let Ok(v) = self.vcpu_mut(id) {
                v.pool.outstanding = Some(Outstanding {
                    request_id,
                    credits_ns: credits,
                    asked_period: closed,
                });
            }
            self.requests.push(CreditRequest {
                request_id,
                vcpu: id,
                credits_ns: credits,
                balance_ns: sat_i64(balance),
                demand_per_period_ns: mean,
            });
        }
        self.telemetry.push(rec);
        let ci = self.cpu_index(cpu)?;
        self.cpus[ci].releases.insert((next, id));
        self.reposition(id, r)
    }

    /// Processes every release on `ci` due at or before `now`.
    fn advance(&mut self, ci: usize, now: u64) {
        while let Some(&(r, id)) = self.cpus[ci].releases.first() {
            if r > now {
                break;
            }
            self.cpus[ci].releases.pop_first();
            if self.rollover(id, r).is_err() {
                // A vCPU missing from the slab cannot be in the release set (remove_vcpu erases both);
                // dropping the stale entry keeps the queue consistent either way.
                continue;
            }
        }
    }

    /// Chooses what runs on `cpu` from `now`. The kernel must run it for at most `slice_ns` plus the overrun
    /// bound and then call [`Self::charge`] with the time elapsed since this decision.
    ///
    /// # Errors
    /// [`SchedError::NoSuchCpu`].
    pub fn pick(&mut self, cpu: CpuId, now: u64) -> Result<Decision, SchedError> {
        let ci = self.cpu_index(cpu)?;
        if self.cpus[ci].current.take().is_some() {
            self.cpus[ci].uncharged_picks = self.cpus[ci].uncharged_picks.saturating_add(1);
        }
        self.advance(ci, now);
        let q = &self.cpus[ci];
        let until_release = q
            .next_release()
            .map_or(u64::MAX, |r| r.saturating_sub(now).max(1));
        let (id, burst) = if let Some(&(_, id)) = q.rt.first() {
            (id, false)
        } else if let Some(&(vt, id)) = q.burst.first() {
            self.cpus[ci].vclock = self.cpus[ci].vclock.max(vt);
            (id, true)
        } else {
            self.cpus[ci].idle = true;
            return Ok(Decision {
                vcpu: None,
                slice_ns: until_release,
                tier: Tier::Idle,
            });
        };
        let min_slice = self.params.min_slice_ns;
        let quantum = self.params.burst_quantum_ns;
        let v = self.vcpu_mut(id)?;
        let slice = if burst {
            let room = v.spend_room().min(v.cap_room());
            quantum.max(min_slice).min(room).min(until_release)
        } else {
            u64::try_from(v.budget).unwrap_or(1).min(until_release)
        }
        .max(1);
        if let Some(w) = v.woke_at.take() {
            v.acc.note_latency(now.saturating_sub(w));
        }
        let q = &mut self.cpus[ci];
        q.idle = false;
        q.current = Some(Running { vcpu: id, burst });
        Ok(Decision {
            vcpu: Some(id),
            slice_ns: slice,
            tier: if burst { Tier::Burst } else { Tier::Baseline },
        })
    }

    /// Charges `ran_ns` (time since the decision, overrun included) to the vCPU picked last on its CPU.
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`], or [`SchedError::NotRunning`] if it is not the CPU's current decision.
    pub fn charge(&mut self, id: VcpuId, ran_ns: u64, now: u64) -> Result<(), SchedError> {
        let cpu = self.vcpu(id)?.cpu;
        let ci = self.cpu_index(cpu)?;
        let running = match self.cpus[ci].current {
            Some(r) if r.vcpu == id => r,
            _ => return Err(SchedError::NotRunning(id)),
        };
        self.cpus[ci].current = None;
        let v = self.vcpu_mut(id)?;
        if v.retired {
            // `retire` clears the CPU's decision, so this cannot happen; refuse rather than run a retired vCPU.
            return Err(SchedError::NotRunning(id));
        }
        if running.burst {
            // Burst time is paid with credits ns for ns (overdraft covers an overrun past the last credit).
            let _spend = v.ledger.spend(ran_ns);
            v.acc.burst_ns = v.acc.burst_ns.saturating_add(ran_ns);
            v.total_burst_ns = v.total_burst_ns.saturating_add(ran_ns);
            v.vtime = v.vtime.saturating_add(u128::from(ran_ns) * v.stride);
        } else {
            v.budget = v.budget.saturating_sub(to_i64(ran_ns));
            v.acc.baseline_ns = v.acc.baseline_ns.saturating_add(ran_ns);
            v.total_baseline_ns = v.total_baseline_ns.saturating_add(ran_ns);
        }
        self.reposition(id, now)
    }

    /// Applies a credit grant (exactly once per id, see [`super::pool`]).
    ///
    /// # Errors
    /// Unknown or retired vCPU, an id older than the remembered window, or a zero rate.
    pub fn apply_grant(&mut self, grant: Grant, now: u64) -> Result<GrantOutcome, GrantError> {
        if self.vcpu(grant.vcpu).map_or(true, |v| v.retired) {
            return Err(GrantError::NoSuchVcpu(grant.vcpu));
        }
        if !self.grants.check(grant.grant_id)? {
            return Ok(GrantOutcome::Duplicate);
        }
        if matches!(
            grant.schedule,
            GrantSchedule::PerPeriod { per_period_ns: 0 }
        ) {
            return Err(GrantError::ZeroRate);
        }
        self.grants.remember(grant.grant_id);
        let v = self
            .vcpu_mut(grant.vcpu)
            .map_err(|_| GrantError::NoSuchVcpu(grant.vcpu))?;
        if let (Some(req), Some(o)) = (grant.request_id, v.pool.outstanding) {
            if o.request_id == req {
                v.pool.outstanding = None;
            }
        }
        let outcome = match grant.schedule {
            GrantSchedule::Now => {
                // Tagged with the previous period so it is spendable at once.
                v.ledger.grant(v.period - 1, grant.credits_ns);
                GrantOutcome::Applied
            }
            GrantSchedule::PerPeriod { .. } | GrantSchedule::AfterEvent { .. } => {
                v.pool.staged.push(Staged {
                    remaining_ns: grant.credits_ns,
                    schedule: grant.schedule,
                });
                GrantOutcome::Staged
            }
        };
        let _ = self.reposition(grant.vcpu, now);
        Ok(outcome)
    }

    /// The pool answered request `request_id` with nothing: stop counting it as incoming (the vCPU waits
    /// `retry_periods` before asking again).
    pub fn request_declined(&mut self, vcpu: VcpuId, request_id: u64) {
        if let Ok(v) = self.vcpu_mut(vcpu) {
            if let Some(o) = v.pool.outstanding.as_mut() {
                if o.request_id == request_id {
                    o.credits_ns = 0;
                }
            }
        }
    }

    /// Signals an event: every grant staged on it applies now. Returns the credits applied.
    pub fn signal_event(&mut self, event: u64, now: u64) -> u64 {
        let mut total = 0u64;
        let mut touched = Vec::new();
        for (i, slot) in self.vcpus.iter_mut().enumerate() {
            let Some(v) = slot.as_mut().filter(|v| !v.retired) else {
                continue;
            };
            let mut got = 0u64;
            v.pool.staged.retain(|s| {
                if s.schedule == (GrantSchedule::AfterEvent { event }) {
                    got = got.saturating_add(s.remaining_ns);
                    false
                } else {
                    true
                }
            });
            if got > 0 {
                v.ledger.grant(v.period - 1, got);
                total = total.saturating_add(got);
                if let Ok(n) = u32::try_from(i) {
                    touched.push(VcpuId(n));
                }
            }
        }
        for id in touched {
            let _ = self.reposition(id, now);
        }
        total
    }

    /// Takes the pending credit requests (oldest first).
    pub fn take_credit_requests(&mut self) -> Vec<CreditRequest> {
        self.requests.items.drain(..).collect()
    }

    /// Takes the closed-period telemetry records (oldest first).
    pub fn drain_telemetry(&mut self) -> Vec<PeriodRecord> {
        self.telemetry.items.drain(..).collect()
    }

    /// Telemetry records dropped because nobody drained them.
    #[must_use]
    pub fn telemetry_dropped(&self) -> u64 {
        self.telemetry.dropped
    }

    /// Picks made on `cpu` without charging the previous decision (glue bug counter).
    #[must_use]
    pub fn uncharged_picks(&self, cpu: CpuId) -> u64 {
        self.cpu_index(cpu)
            .map_or(0, |i| self.cpus[i].uncharged_picks)
    }

    /// Snapshot of a vCPU.
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`].
    pub fn status(&self, id: VcpuId) -> Result<VcpuStatus, SchedError> {
        let v = self.vcpu(id)?;
        Ok(VcpuStatus {
            cpu: v.cpu,
            period: v.period,
            budget_ns: v.budget,
            balance_ns: sat_i64(v.ledger.balance()),
            counters: v.ledger.counters(),
            runnable: v.runnable,
            total_baseline_ns: v.total_baseline_ns,
            total_burst_ns: v.total_burst_ns,
            staged_grant_ns: v.pool.undelivered(),
            retired: v.retired,
        })
    }

    /// The vCPU's ledger (read-only, for audits and tests).
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`].
    pub fn ledger(&self, id: VcpuId) -> Result<&Ledger, SchedError> {
        Ok(&self.vcpu(id)?.ledger)
    }

    /// The vCPU's configuration.
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`].
    pub fn config(&self, id: VcpuId) -> Result<VcpuConfig, SchedError> {
        Ok(self.vcpu(id)?.cfg)
    }

    /// Start of the vCPU's open period and its next release.
    ///
    /// # Errors
    /// [`SchedError::NoSuchVcpu`].
    pub fn period_window(&self, id: VcpuId) -> Result<(u64, u64), SchedError> {
        let v = self.vcpu(id)?;
        Ok((v.period_start, v.next_release))
    }
}
