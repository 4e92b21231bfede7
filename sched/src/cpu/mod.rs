//! Hard-real-time rolling-credit vCPU scheduler (issue 3).
//!
//! # Model
//! Every vCPU has a baseline server (budget `Q`, period `T`), a credit ledger (accrual per period, cap, optional
//! lifetime, launch balance), a burst mode, a weight and an optional share cap ([`config`]). Each physical CPU
//! has its own run queues ([`runqueue`]) and runs two tiers:
//! - **real-time tier**: the servers, earliest deadline first. A server's job of period k is released at
//!   `r_k = start + k*T` with budget `Q - debt` (debt = overrun charged past the previous job's budget, at most
//!   O) and deadline `r_k + T`;
//! - **burst tier**: runnable vCPUs whose budget is exhausted and which hold credits (or overdraft room, for
//!   `unlimited`), and are below their cap, share what the real-time tier leaves by weight (stride / virtual
//!   time, [`runqueue`]), paying credits ns for ns ([`ledger`]).
//!
//! The CPU idles only when no vCPU is eligible (work-conserving up to caps and empty balances). `pick`,
//! `charge`, `wake` and `block` are O(log n) in the vCPUs of the CPU (plus one O(log n) roll-over per elapsed
//! period of each vCPU, done lazily at the release instant).
//!
//! # Kernel contract (what the proof assumes)
//! 1. Every slice is enforced by a timer: `ran_ns <= slice_ns + O`, where O = `SchedParams::overrun_bound_ns`
//!    (VMX-preemption-timer latency, VM-exit and decision cost).
//! 2. `charge(vcpu, ran_ns, now)` is called with the whole time since the decision (guest time and exit
//!    handling), so no CPU time is unaccounted. Any time the kernel cannot charge goes in `reserve_ppm`. Work the
//!    hypervisor does for no single vCPU (the I/O service) runs in a server of its own,
//!    [`VcpuConfig::io_server`], picked, charged, woken and blocked like a vCPU, so it is admitted and covered
//!    by the theorem too; the kernel may also do such work in idle time (no decision was running).
//! 3. When [`Scheduler::wake`] returns `preempt: Some(cpu)`, that CPU re-picks within O.
//!
//! # Guarantee
//! **Theorem.** On a CPU whose admitted servers satisfy `sum_i (Q_i + O)/T_i <= 1 - reserve - O/T_min`
//! (checked in ppm with every term rounded against admission, [`admission`]), a vCPU that is runnable throughout
//! a period `[r, r + T_j)` receives at least `Q_j - O` of CPU time in that period, whatever the other vCPUs do.
//! (The first period after a reconfiguration of the vCPU itself is excluded; other vCPUs' reconfigurations are
//! not.)
//!
//! **Proof.** Call a job *pending* when its vCPU is runnable and its remaining budget is positive.
//! (a) *Per-job work.* A job starts with budget `c <= Q_i`. The scheduler charges every ns it runs against
//! that budget; it is picked only while `c > 0` and gets a slice `<= c`, so by contract 1 it runs at most
//! `c + O` in total: only the dispatch that exhausts the budget can overshoot, and the overshoot (<= O) is
//! carried as debt into the next job. So every job does at most `Q_i + O = T_i * u'_i` work, and the budget
//! never falls below `-O`.
//! (b) *Sleepers.* When a vCPU wakes at `t` inside a job with deadline `d`, its budget is clamped to
//! `(d - t) * u'_i - O` (`Scheduler::wake`, also applied on reconfiguration). Hence whatever a job runs after any
//! instant `s` at which it is not pending is at most `(d - s) * u'_i`: either it never becomes pending again, or
//! it wakes at `t >= s` and runs at most the clamped budget plus one overshoot.
//! (c) *Busy window.* Suppose job J of vCPU j (release `r`, deadline `d = r + T_j`) is runnable throughout
//! `[r, d)` yet still has positive budget at `d`. Let `t0` be the last instant before `d` at which no job with
//! deadline `<= d` is pending. J is pending from `r` on, so `t0 <= r` and `d - t0 >= T_j >= T_min`. Throughout
//! `(t0, d)` some job with deadline `<= d` is pending, so EDF runs only such jobs, except that the dispatch
//! running at `t0` (a later-deadline job or burst time) may continue for at most O: its slice ends at the next
//! release on the CPU, and a wake that makes an earlier deadline pending triggers a re-pick within O (contract
//! 3). Nothing else runs: burst slices and idle decisions are also cut at the next release.
//! (d) *Demand.* Fix a server i. If it has a job with release `< t0` and deadline `d_i0` in `(t0, d]`, that job
//! is not pending at `t0` (definition of `t0`), so by (b) it runs at most `(d_i0 - t0) * u'_i` after `t0`; its
//! later jobs with deadline `<= d` are released in `[d_i0, d - T_i]`, at most `(d - d_i0)/T_i` of them, each
//! running at most `T_i * u'_i` by (a). Without such a job, at most `(d - t0)/T_i` jobs are released in
//! `[t0, d - T_i]`. Either way server i runs at most `(d - t0) * u'_i` in `(t0, d)` for deadlines `<= d`, and
//! all servers together at most `(d - t0) * U'` with `U' = sum_i u'_i`.
//! (e) *Contradiction.* The CPU is busy throughout `(t0, d)` (contract 2), so
//! `d - t0 <= O + (d - t0) * U' - e`, where `e > 0` is J's unexecuted budget. With
//! `U' <= 1 - O/T_min - reserve` and `d - t0 >= T_min` this gives `d - t0 <= d - t0 - e`, impossible. So J
//! exhausts its budget by `d`, i.e. runs at least its starting budget `Q_j - debt >= Q_j - O`. ∎
//!
//! The stated overrun bound of the guarantee is therefore O (`SchedParams::overrun_bound_ns`), and the per-CPU
//! reserve is `O/T_min + reserve_ppm`, with the per-server allowance `O/T_i` folded into `u'_i`.
//! Long-run entitlement is exact: overrun is charged ns for ns (as budget debt in the real-time tier, as credits
//! or overdraft in the burst tier). `tests/cpu_guarantee.rs` checks the theorem over 100 000 random admitted
//! configurations with random demand and random overrun in `[0, O]`.
//!
//! # Switching overhead
//! Real-time slices end at a budget exhaustion or a release, so the real-time tier switches at most twice per
//! job release; burst slices are `burst_quantum_ns` unless cut by an empty balance, a cap or a release, and a
//! burst vCPU is never preempted by another burst vCPU's wake. `min_slice_ns` is the floor of the quantum.
//!
//! # Modules
//! [`config`] (plain data), [`admission`], [`ledger`] (credits), [`runqueue`] (EDF and stride sets),
//! [`scheduler`] (the API), [`placement`], [`pool`] (credit-pool agent logic and grants), [`telemetry`],
//! [`harness`] (virtual-clock driver and workloads, shared by tests and the simulator), `sim` (std: CLI,
//! scenarios, reports, plots).

pub mod admission;
pub mod config;
pub mod harness;
pub mod ledger;
pub mod placement;
pub mod pool;
pub mod runqueue;
pub mod scheduler;
#[cfg(feature = "std")]
pub mod sim;
pub mod telemetry;

pub use admission::AdmissionError;
pub use config::{BurstMode, ConfigError, PoolPolicy, SchedParams, VcpuConfig, CREDIT_NS, PPM};
pub use placement::{CpuUtilisation, PlacementError};
pub use pool::{CreditRequest, Grant, GrantError, GrantOutcome, GrantSchedule};
pub use scheduler::{Decision, Removed, Retirement, SchedError, Scheduler, Tier, VcpuStatus, Wake};
pub use telemetry::PeriodRecord;

/// Physical CPU index (0-based, as the kernel numbers them).
pub type CpuId = u32;

/// A vCPU handle issued by [`Scheduler::add_vcpu`]; never reused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "std", derive(serde::Serialize, serde::Deserialize))]
pub struct VcpuId(pub u32);
