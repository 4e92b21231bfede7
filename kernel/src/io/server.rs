//! The I/O server: the I/O service's CPU time as a real-time server of its own, admitted by the CPU scheduler.
//!
//! Why: the I/O service ([`super::service`]) does its work (virtqueue intake, NVMe submission, completions into
//! the guests) on the run loops' CPUs. Done between slices as hypervisor time, it was charged to no one and,
//! at 35-100 us per request under QEMU TCG, exceeded the scheduler's reserve, breaking contract 2 of the
//! scheduler's theorem (`sched::cpu`: no CPU time unaccounted): a real-time VM beside an I/O flood missed most of
//! its periods. Now that time belongs to a server `(Q_io, T_io)` (`sched::cpu::VcpuConfig::io_server`; default
//! and `[host] io_server =` in docs/vm-config.md), so the theorem covers it like any vCPU.
//!
//! Design:
//! - *Where.* One I/O server per host, on the CPU of the first VM with volumes (its first vCPU's CPU), admitted
//!   before that VM's vCPUs by the same admission check (`vm::setup`: a VM that does not fit beside it is
//!   refused, naming the I/O server's share). It stays admitted for the rest of the run; a host without volumes
//!   has none. One, not one per CPU: the service is one lock, so two servers runnable at once only contend
//!   (measured: tens of thousands of contended slices per second with one per CPU); the other CPUs serve in their
//!   idle time, and a notification from a vCPU on another CPU is seen by the server's run loop at its next
//!   iteration (it checks for work at each one; an idle CPU with I/O outstanding every `IDLE_POLL_NS`).
//! - *When runnable.* While the service has work ([`super::service::outstanding`]: a notified queue, requests on
//!   the engine, completions to deliver, a ring holding requests). The run loop of its CPU wakes it through
//!   `Scheduler::wake` at its next iteration after a queue notification (so the sleeper clamp of the theorem's
//!   step (b) applies) and blocks it when a slice finds nothing to do. The device raises no interrupt: while only
//!   the device has work, the blocked server is due again [`super::service::POLL_INTERVAL_NS`] later, which is
//!   how a completion wakes it. A server that finds another CPU serving sleeps the same interval.
//! - *A slice.* When the scheduler picks it, the run loop calls [`super::service::serve`] until the slice's
//!   deadline (cut by the next wake-up of a vCPU on the CPU, like any slice), then charges the measured time from
//!   the decision to the end, overrun included (debt), as for a vCPU. No item is started after the deadline
//!   except the first pump's one-item floors; the overrun past the deadline is measured here
//!   (`max_overrun_us`).
//! - *Idle time.* When the scheduler picks nothing, the run loop serves freely until the idle decision ends: that
//!   keeps the service work-conserving without taking time from any server.
//! - Nothing else serves I/O: no pumping between slices.
//!
//! State: the handle of each CPU's server is published here ([`on_cpu`]; written under the runtime's creation
//! lock or at boot, read lock-free by the run loops); whether it is blocked and until when is the run loop's own
//! (only its CPU wakes, blocks and runs it). Figures per CPU are counters written by that CPU only, printed at the
//! end as `CV:IOSERVER` (docs/console.md).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use sched::cpu::{VcpuConfig, VcpuId};
use virt::config::IoServerSpec;

use crate::arch::x86_64::percpu::MAX_CPUS;
use crate::marker;

/// Each CPU's I/O server handle plus one (0: none).
static IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// The host's reservation, budget and period in ns (set once at boot from the configuration's `[host]` section).
static BUDGET_NS: AtomicU64 = AtomicU64::new(virt::config::DEFAULT_IO_SERVER_BUDGET_NS);
static PERIOD_NS: AtomicU64 = AtomicU64::new(virt::config::DEFAULT_IO_SERVER_PERIOD_NS);

/// One CPU's figures (written by that CPU's run loop only).
struct Figures {
    /// Slices of the I/O server, the time charged for them, the longest run past a slice's deadline.
    slices: AtomicU64,
    charged_ns: AtomicU64,
    max_overrun_ns: AtomicU64,
    /// Slices that ran past their deadline by more than the overrun bound O.
    overruns: AtomicU64,
    /// Slices that found nothing to do (the server then blocks), or found another CPU serving.
    empty: AtomicU64,
    contended: AtomicU64,
    /// Items served in the server's slices, and in idle time with the time spent there.
    items: AtomicU64,
    idle_items: AtomicU64,
    idle_ns: AtomicU64,
    /// Wake-ups of the server.
    wakes: AtomicU64,
}

static FIGURES: [Figures; MAX_CPUS] = [const {
    Figures {
        slices: AtomicU64::new(0),
        charged_ns: AtomicU64::new(0),
        max_overrun_ns: AtomicU64::new(0),
        overruns: AtomicU64::new(0),
        empty: AtomicU64::new(0),
        contended: AtomicU64::new(0),
        items: AtomicU64::new(0),
        idle_items: AtomicU64::new(0),
        idle_ns: AtomicU64::new(0),
        wakes: AtomicU64::new(0),
    }
}; MAX_CPUS];

fn index(cpu: u32) -> Option<usize> {
    usize::try_from(cpu).ok().filter(|&c| c < MAX_CPUS)
}

/// Sets the host's reservation (boot, before any server is admitted).
pub fn set_spec(spec: IoServerSpec) {
    BUDGET_NS.store(spec.budget_ns, Ordering::Relaxed);
    PERIOD_NS.store(spec.period_ns, Ordering::Relaxed);
}

/// The host's reservation.
pub fn spec() -> IoServerSpec {
    IoServerSpec {
        budget_ns: BUDGET_NS.load(Ordering::Relaxed),
        period_ns: PERIOD_NS.load(Ordering::Relaxed),
    }
}

/// The scheduler configuration of an I/O server with the host's reservation.
pub fn config() -> VcpuConfig {
    let s = spec();
    VcpuConfig::io_server(s.budget_ns, s.period_ns)
}

/// Whether the host has an I/O server (on any CPU).
pub fn any() -> bool {
    IDS.iter().any(|id| id.load(Ordering::Acquire) != 0)
}

/// CPU `cpu`'s I/O server, if it has one.
pub fn on_cpu(cpu: u32) -> Option<VcpuId> {
    let id = IDS.get(index(cpu)?)?.load(Ordering::Acquire);
    id.checked_sub(1).map(VcpuId)
}

/// Publishes `id` as CPU `cpu`'s I/O server (`None`: it has none). The caller serialises changes (boot, or the
/// runtime's creation lock).
pub fn publish(cpu: u32, id: Option<VcpuId>) {
    if let Some(slot) = index(cpu).and_then(|c| IDS.get(c)) {
        slot.store(id.map_or(0, |v| v.0.saturating_add(1)), Ordering::Release);
    }
}

/// Records one slice of CPU `cpu`'s server: time charged, overrun past the deadline, what [`super::service::serve`]
/// did.
pub fn note_slice(cpu: u32, charged_ns: u64, overrun_ns: u64, served: super::service::Served) {
    let Some(f) = index(cpu).and_then(|c| FIGURES.get(c)) else {
        return;
    };
    f.slices.fetch_add(1, Ordering::Relaxed);
    f.charged_ns.fetch_add(charged_ns, Ordering::Relaxed);
    f.max_overrun_ns.fetch_max(overrun_ns, Ordering::Relaxed);
    f.overruns.fetch_add(
        u64::from(overrun_ns > crate::vm::OVERRUN_BOUND_NS),
        Ordering::Relaxed,
    );
    f.items.fetch_add(as_u64(served.items), Ordering::Relaxed);
    f.empty
        .fetch_add(u64::from(served.items == 0), Ordering::Relaxed);
    f.contended
        .fetch_add(u64::from(served.contended), Ordering::Relaxed);
}

/// Records serving in CPU `cpu`'s idle time.
pub fn note_idle(cpu: u32, ns: u64, served: super::service::Served) {
    let Some(f) = index(cpu).and_then(|c| FIGURES.get(c)) else {
        return;
    };
    f.idle_ns.fetch_add(ns, Ordering::Relaxed);
    f.idle_items
        .fetch_add(as_u64(served.items), Ordering::Relaxed);
}

/// Records a wake-up of CPU `cpu`'s server.
pub fn note_wake(cpu: u32) {
    if let Some(f) = index(cpu).and_then(|c| FIGURES.get(c)) {
        f.wakes.fetch_add(1, Ordering::Relaxed);
    }
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Prints `CV:IOSERVER` for each of the first `cpus` CPUs that has an I/O server or served in idle time.
pub fn report(cpus: usize) {
    let s = spec();
    for (cpu, f) in FIGURES.iter().enumerate().take(cpus.min(MAX_CPUS)) {
        let has = IDS[cpu].load(Ordering::Acquire) != 0;
        let idle_items = f.idle_items.load(Ordering::Relaxed);
        if !has && idle_items == 0 {
            continue;
        }
        marker!(
            "IOSERVER cpu={cpu} server={} budget_us={} period_us={} slices={} charged_us={} max_overrun_us={} overruns={} empty={} contended={} wakes={} items={} idle_items={idle_items} idle_us={}",
            u8::from(has),
            s.budget_ns / 1000,
            s.period_ns / 1000,
            f.slices.load(Ordering::Relaxed),
            f.charged_ns.load(Ordering::Relaxed) / 1000,
            f.max_overrun_ns.load(Ordering::Relaxed) / 1000,
            f.overruns.load(Ordering::Relaxed),
            f.empty.load(Ordering::Relaxed),
            f.contended.load(Ordering::Relaxed),
            f.wakes.load(Ordering::Relaxed),
            f.items.load(Ordering::Relaxed),
            f.idle_ns.load(Ordering::Relaxed) / 1000
        );
    }
}
