//! Virtual-clock driver for the scheduler: scripted workloads, overrun noise, run-segment traces.
//!
//! Design: this is the kernel glue in miniature, written against the same public API and contract (pick, run
//! at most `slice + O`, charge the elapsed time, wake/block at the workload's instants, re-pick within O when
//! `wake` asks for a preemption). It is `no_std` so the property tests of `cargo test -p sched` use it without
//! the `std` feature; the `std` simulator adds scenarios, reports and plots on top.
//!
//! Each physical CPU has its own clock; [`Harness::run_until`] always advances the CPU that is furthest behind,
//! so CPUs stay within one decision of each other. Events (wakes, window ends, job releases) are processed at
//! their exact instants. Overrun noise is drawn uniformly from `[0, noise_ns]` whenever a timer ends a slice or
//! a preemption is requested; a vCPU that halts by itself stops exactly.
//!
//! Invariant: for every vCPU, `segments` are disjoint, sorted run intervals and `blocked` are the intervals in
//! which it was not runnable; the scheduler saw exactly these wakes and blocks.

use alloc::vec::Vec;

use super::config::{SchedParams, VcpuConfig};
use super::scheduler::{Decision, SchedError, Scheduler};
use super::telemetry::PeriodRecord;
use super::{CpuId, VcpuId};

/// Small deterministic PRNG (SplitMix64) for workloads and noise.
#[derive(Clone, Copy, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]` (returns `lo` when `hi <= lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = hi - lo;
        if span == u64::MAX {
            return self.next_u64();
        }
        lo + self.next_u64() % (span + 1)
    }
}

/// A scripted demand pattern of one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub enum Workload {
    /// Always runnable.
    Busy,
    /// Never runnable.
    Idle,
    /// Runnable in wall-clock windows `[phase + k(on+off), phase + k(on+off) + on)`.
    OnOff {
        /// Window length.
        on_ns: u64,
        /// Gap length (>= 1).
        off_ns: u64,
        /// Start of the first window.
        phase_ns: u64,
    },
    /// A job of `work_ns` CPU time released every `period_ns` from `offset_ns`; unfinished work accumulates.
    Periodic {
        /// Job period.
        period_ns: u64,
        /// CPU time per job.
        work_ns: u64,
        /// First release.
        offset_ns: u64,
    },
    /// Random wall-clock windows: on in `[1, max_on_ns]`, off in `[1, max_off_ns]`.
    Random {
        /// Seed of this vCPU's pattern.
        seed: u64,
        /// Longest window.
        max_on_ns: u64,
        /// Longest gap.
        max_off_ns: u64,
    },
    /// Not runnable for `sleep_ns`, then always runnable.
    SleepThenBurst {
        /// Initial sleep.
        sleep_ns: u64,
    },
}

#[derive(Clone, Debug)]
struct Agent {
    wl: Workload,
    rng: Rng,
    runnable: bool,
    /// Wall time at which a runnable agent halts (window workloads).
    block_at: Option<u64>,
    /// CPU work left before halting (job workloads).
    work_left: Option<u64>,
    /// Next wake / release instant.
    next_event: Option<u64>,
}

impl Agent {
    fn new(wl: Workload) -> Self {
        let seed = match wl {
            Workload::Random { seed, .. } => seed,
            _ => 0,
        };
        let next_event = match wl {
            Workload::Busy => Some(0),
            Workload::Idle => None,
            Workload::OnOff { phase_ns, .. } => Some(phase_ns),
            Workload::Periodic { offset_ns, .. } => Some(offset_ns),
            Workload::Random { .. } => Some(0),
            Workload::SleepThenBurst { sleep_ns } => Some(sleep_ns),
        };
        Self {
            wl,
            rng: Rng::new(seed),
            runnable: false,
            block_at: None,
            work_left: None,
            next_event,
        }
    }

    /// Fires the event due at `t`; returns true if the agent became runnable.
    fn fire(&mut self, t: u64) -> bool {
        self.next_event = None;
        let was = self.runnable;
        match self.wl {
            Workload::Busy | Workload::SleepThenBurst { .. } => {
                self.runnable = true;
            }
            Workload::Idle => {}
            Workload::OnOff { on_ns, off_ns, .. } => {
                self.runnable = on_ns > 0;
                self.block_at = Some(t.saturating_add(on_ns));
                self.next_event = Some(t.saturating_add(on_ns).saturating_add(off_ns.max(1)));
            }
            Workload::Periodic {
                period_ns, work_ns, ..
            } => {
                let left = self.work_left.unwrap_or(0).saturating_add(work_ns);
                self.work_left = Some(left);
                self.runnable = left > 0;
                self.next_event = Some(t.saturating_add(period_ns.max(1)));
            }
            Workload::Random {
                max_on_ns,
                max_off_ns,
                ..
            } => {
                let on = self.rng.range(1, max_on_ns.max(1));
                let off = self.rng.range(1, max_off_ns.max(1));
                self.runnable = true;
                self.block_at = Some(t.saturating_add(on));
                self.next_event = Some(t.saturating_add(on).saturating_add(off));
            }
        }
        self.runnable && !was
    }

    /// Wall time from `t` until the agent halts by itself if it runs all the time.
    fn until_halt(&self, t: u64) -> u64 {
        let a = self.block_at.map_or(u64::MAX, |b| b.saturating_sub(t));
        let b = self.work_left.unwrap_or(u64::MAX);
        a.min(b)
    }

    fn consume(&mut self, ran: u64) {
        if let Some(w) = self.work_left.as_mut() {
            *w = w.saturating_sub(ran);
        }
    }

    fn halted(&self, t: u64) -> bool {
        self.block_at.is_some_and(|b| b <= t) || self.work_left == Some(0)
    }
}

/// One vCPU of a harness run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuSpec {
    /// Physical CPU.
    pub cpu: CpuId,
    /// Scheduling configuration.
    pub cfg: VcpuConfig,
    /// Demand pattern.
    pub workload: Workload,
}

/// Per-vCPU trace of a run.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Run intervals `[start, end)`, sorted and merged.
    pub segments: Vec<(u64, u64)>,
    /// Not-runnable intervals `[start, end)` (the last may end at `u64::MAX`).
    pub blocked: Vec<(u64, u64)>,
}

impl Trace {
    fn run(&mut self, s: u64, e: u64) {
        if e <= s {
            return;
        }
        match self.segments.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => self.segments.push((s, e)),
        }
    }

    /// CPU time received in `[a, b)`.
    #[must_use]
    pub fn run_in(&self, a: u64, b: u64) -> u64 {
        let start = self.segments.partition_point(|&(_, e)| e <= a);
        let mut sum = 0;
        for &(s, e) in &self.segments[start..] {
            if s >= b {
                break;
            }
            sum += e.min(b) - s.max(a);
        }
        sum
    }

    /// True if the vCPU was runnable throughout `[a, b)`.
    #[must_use]
    pub fn runnable_throughout(&self, a: u64, b: u64) -> bool {
        !self.blocked.iter().any(|&(s, e)| s < b && e > a)
    }
}

/// A scheduler driven by scripted workloads on a virtual clock.
#[derive(Clone, Debug)]
pub struct Harness {
    /// The scheduler under test (callers may apply grants or reconfigure between `run_until` calls).
    pub sched: Scheduler,
    ids: Vec<VcpuId>,
    cpus_of: Vec<CpuId>,
    agents: Vec<Agent>,
    traces: Vec<Trace>,
    clocks: Vec<u64>,
    noise: Rng,
    noise_ns: u64,
    records: Vec<PeriodRecord>,
    decisions: u64,
}

impl Harness {
    /// Builds the scheduler, admits every vCPU at time 0 (in order) and prepares the workloads.
    ///
    /// # Errors
    /// Any configuration or admission error of the specs.
    pub fn new(
        params: SchedParams,
        num_cpus: usize,
        specs: &[VcpuSpec],
        noise_seed: u64,
        noise_ns: u64,
    ) -> Result<Self, SchedError> {
        let mut sched = Scheduler::new(num_cpus, params)?;
        let mut ids = Vec::with_capacity(specs.len());
        for s in specs {
            ids.push(sched.add_vcpu(s.cpu, s.cfg, 0)?);
        }
        Ok(Self {
            sched,
            ids,
            cpus_of: specs.iter().map(|s| s.cpu).collect(),
            agents: specs.iter().map(|s| Agent::new(s.workload)).collect(),
            traces: specs
                .iter()
                .map(|_| Trace {
                    segments: Vec::new(),
                    blocked: alloc::vec![(0, u64::MAX)],
                })
                .collect(),
            clocks: alloc::vec![0; num_cpus],
            noise: Rng::new(noise_seed),
            noise_ns: noise_ns.min(params.overrun_bound_ns),
            records: Vec::new(),
            decisions: 0,
        })
    }

    /// Scheduler id of spec `i`.
    #[must_use]
    pub fn id(&self, i: usize) -> VcpuId {
        self.ids[i]
    }

    /// Trace of spec `i`.
    #[must_use]
    pub fn trace(&self, i: usize) -> &Trace {
        &self.traces[i]
    }

    /// Number of vCPUs.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True without vCPUs.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Telemetry records collected so far (drained from the scheduler after every step).
    #[must_use]
    pub fn records(&self) -> &[PeriodRecord] {
        &self.records
    }

    /// Decisions taken so far.
    #[must_use]
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// Slowest CPU clock.
    #[must_use]
    pub fn now(&self) -> u64 {
        self.clocks.iter().copied().min().unwrap_or(0)
    }

    fn draw_noise(&mut self) -> u64 {
        if self.noise_ns == 0 {
            0
        } else {
            self.noise.range(0, self.noise_ns)
        }
    }

    fn mark_wake(&mut self, i: usize, t: u64) {
        if let Some(last) = self.traces[i].blocked.last_mut() {
            if last.1 == u64::MAX {
                last.1 = t;
            }
        }
    }

    fn mark_block(&mut self, i: usize, t: u64) {
        self.traces[i].blocked.push((t, u64::MAX));
    }

    /// Next event instant on `cpu` other than the running vCPU's halt.
    fn next_event(&self, cpu: CpuId, running: Option<usize>) -> u64 {
        let mut t = u64::MAX;
        for (i, a) in self.agents.iter().enumerate() {
            if self.cpus_of[i] != cpu {
                continue;
            }
            if let Some(e) = a.next_event {
                t = t.min(e);
            }
            if a.runnable && Some(i) != running {
                if let Some(b) = a.block_at {
                    t = t.min(b);
                }
            }
        }
        t
    }

    /// Fires every event due at `t` on `cpu`; returns true if a wake asked for a preemption.
    fn fire_events(
        &mut self,
        cpu: CpuId,
        t: u64,
        running: Option<usize>,
    ) -> Result<bool, SchedError> {
        let mut preempt = false;
        for i in 0..self.agents.len() {
            if self.cpus_of[i] != cpu {
                continue;
            }
            if self.agents[i].runnable && Some(i) != running && self.agents[i].halted(t) {
                self.agents[i].runnable = false;
                self.agents[i].block_at = None;
                self.sched.block(self.ids[i], t)?;
                self.mark_block(i, t);
            }
            if self.agents[i].next_event.is_some_and(|e| e <= t) && self.agents[i].fire(t) {
                let w = self.sched.wake(self.ids[i], t)?;
                self.mark_wake(i, t);
                preempt |= w.preempt.is_some();
            }
        }
        Ok(preempt)
    }

    /// One decision on `cpu`, up to `horizon`.
    fn step(&mut self, cpu: CpuId, horizon: u64) -> Result<(), SchedError> {
        let ci = usize::try_from(cpu).map_err(|_| SchedError::NoSuchCpu(cpu))?;
        let now = self.clocks[ci];
        self.fire_events(cpu, now, None)?;
        let d: Decision = self.sched.pick(cpu, now)?;
        self.decisions += 1;
        let running = d.vcpu.and_then(|id| self.ids.iter().position(|&x| x == id));
        let timer_end = {
            let n = self.draw_noise();
            now.saturating_add(d.slice_ns).saturating_add(n)
        };
        let mut stop = timer_end.min(horizon.max(now + 1));
        let mut cursor = now;
        let end = loop {
            let halt = running.map_or(u64::MAX, |i| {
                cursor.saturating_add(self.agents[i].until_halt(cursor))
            });
            let end = stop.min(halt);
            let te = self.next_event(cpu, running);
            if te >= end || te <= cursor {
                break end.max(cursor);
            }
            if let Some(i) = running {
                self.agents[i].consume(te - cursor);
                self.traces[i].run(cursor, te);
            }
            cursor = te;
            if self.fire_events(cpu, te, running)? {
                let n = self.draw_noise();
                stop = stop.min(te.saturating_add(n));
            }
        };
        if let (Some(i), Some(id)) = (running, d.vcpu) {
            self.agents[i].consume(end - cursor);
            self.traces[i].run(cursor, end);
            self.sched.charge(id, end - now, end)?;
            if self.agents[i].halted(end) {
                self.agents[i].runnable = false;
                self.agents[i].block_at = None;
                self.sched.block(id, end)?;
                self.mark_block(i, end);
            }
        }
        // Progress guarantee: a decision always advances this CPU's clock.
        self.clocks[ci] = end.max(now + 1);
        Ok(())
    }

    /// Runs every CPU until its clock reaches `t`.
    ///
    /// # Errors
    /// A scheduler error (a harness bug or a scheduler contract violation).
    pub fn run_until(&mut self, t: u64) -> Result<(), SchedError> {
        loop {
            let Some((ci, &c)) = self.clocks.iter().enumerate().min_by_key(|&(_, &c)| c) else {
                return Ok(());
            };
            if c >= t {
                break;
            }
            let cpu = CpuId::try_from(ci).map_err(|_| SchedError::NoSuchCpu(CpuId::MAX))?;
            self.step(cpu, t)?;
            self.records.extend(self.sched.drain_telemetry());
        }
        Ok(())
    }
}
