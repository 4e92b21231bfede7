//! Per-VM accounting lines (`CV:VM`, every second and at the end) and the end-of-run summary (`CV:VMSUM`).
//!
//! Figures come from the scheduler (CPU time charged per tier, credit balance), from the VM's exit-handling
//! context (exits, misbehaviour counts, the counters its guest `REPORT`ed) and from the run loops' per-CPU
//! statistics (time in guests, idle time, overrun), so the tests can set the hypervisor's accounting beside what
//! the guests measured themselves. Formats are in docs/console.md.
//!
//! Stop dumps ([`stop_dump`], module [`dump`]): when a guest triple-faults, the registers, the stack words at RSP,
//! the guest page-table walk of RIP and RSP, the backend's VMCB/VMCS fields and the CPUs' last exits are logged,
//! so an intermittent guest crash can be diagnosed from one serial log. The last exits come from the exit trail
//! (module [`trail`]): [`note_exit`] adds every exit to its CPU's ring with a few plain stores, no lock; a
//! sequence word per entry lets the dump skip an entry another CPU is rewriting.
//!
//! Per-exit cost: [`note_exit`] and [`note_handling`] run on every exit and only store to this CPU's own words.
//! Measured with the guests' `exit_rtt_ticks` on Bochs (deterministic), with the same kernel and each one disabled
//! in turn: the former trail under a spin lock cost 85 ticks of a 726-tick round trip on Bochs ryzen (70 of 926 on
//! Bochs VMX), the accounting 17 (11). On Bochs an instruction is a tick whatever it is, so what counted there was
//! the instruction count (an out-of-line packing call and three `Vcpu` calls through `BackendVcpu` with their
//! spills), not the lock; both are inlined now.

use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use virt::{Gpr, StopCause, Vcpu, NO_WAKE};

use super::backend::BackendVcpu;
use crate::virt::svm::vmcb::Ctl64;

use super::{ticks_to_ns, Runtime, VmState, REPORT_INTERVAL_NS};
use crate::arch::x86_64::tsc;
use crate::marker;

mod dump;
mod trail;

pub use dump::stop_dump;
use trail::TRAIL_CPUS;

/// The BSP's report clock.
#[derive(Debug)]
pub struct Reporter {
    next: u64,
    end: u64,
}

impl Reporter {
    /// Starts the clock now.
    pub fn new(rt: &Runtime) -> Self {
        let start = tsc::rdtsc();
        Self {
            next: rt.after(start, REPORT_INTERVAL_NS),
            end: rt
                .run_ms
                .map_or(u64::MAX, |ms| rt.after(start, ms.saturating_mul(1_000_000))),
        }
    }

    /// The next TSC at which [`Reporter::tick`] has something to do.
    pub fn next_due(&self) -> u64 {
        self.next.min(self.end)
    }

    /// Prints the VM lines when a report is due; marks the runtime done at the end of a `run_ms` run.
    pub fn tick(&mut self, rt: &Runtime, now: u64) {
        if now >= self.end {
            rt.done.store(true, Ordering::Release);
            return;
        }
        if now >= self.next {
            vm_lines(rt);
            while self.next <= now {
                self.next = rt.after(self.next, REPORT_INTERVAL_NS);
            }
        }
    }
}

/// A bounded line buffer for one marker (values are numbers and VM names, so 512 bytes always suffice).
struct Line(heapless::String<512>);

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        // A full line is cut rather than lost.
        let _ = self.0.push_str(s);
        Ok(())
    }
}

/// One `CV:VM` line per VM.
pub fn vm_lines(rt: &Runtime) {
    for vm in rt.vms.iter() {
        let (mut baseline, mut burst, mut balance) = (0u64, 0u64, 0i64);
        let slices: u64 = vm
            .slots
            .clone()
            .map(|s| rt.slots[s].slices.load(Ordering::Relaxed))
            .sum();
        {
            let sched = rt.sched.lock();
            for s in vm.slots.clone() {
                if let Ok(st) = sched.status(rt.slots[s].id) {
                    baseline += st.total_baseline_ns;
                    burst += st.total_burst_ns;
                    balance = balance.saturating_add(st.balance_ns);
                }
            }
        }
        let mut line = Line(heapless::String::new());
        let _ = write!(
            line,
            "name={} t_ms={} cpu_ms={} baseline_ms={} burst_ms={} balance={}",
            vm.name,
            rt.ns(tsc::rdtsc()) / 1_000_000,
            (baseline + burst) / 1_000_000,
            baseline / 1_000_000,
            burst / 1_000_000,
            balance / 1_000_000
        );
        let state = *vm.state.lock();
        let _ = match state {
            VmState::Running => {
                let halted = vm.slots.clone().all(|s| {
                    let slot = &rt.slots[s];
                    slot.blocked.load(Ordering::Relaxed)
                        && slot.wake_at.load(Ordering::Relaxed) == NO_WAKE
                });
                let state = if vm.paused() {
                    "paused"
                } else if halted {
                    "halted"
                } else {
                    "running"
                };
                write!(line, " state={state}")
            }
            VmState::Stopped(r) => match r.cause {
                StopCause::GuestExit { code } => write!(line, " state=exited exit_code={code}"),
                cause => write!(line, " state=stopped cause={}", cause.name()),
            },
        };
        {
            let ctx = vm.ctx.lock();
            let st = &ctx.stats;
            let _ = write!(
                line,
                " slices={slices} exits={} unowned_ports={} msr_refused={} bad_hypercalls={}",
                st.total_exits(),
                st.unowned_port_reads + st.unowned_port_writes,
                st.msr_refused,
                st.bad_hypercalls
            );
            for (key, value) in ctx.counters().iter() {
                let _ = match key {
                    1 => write!(line, " progress={value}"),
                    2 => write!(line, " received_ms={}", value / 1_000_000),
                    3 => write!(line, " elapsed_ms={}", value / 1_000_000),
                    4 => write!(line, " rt_periods={value}"),
                    5 => write!(line, " rt_misses={value}"),
                    6 => write!(line, " rt_min_received_us={}", value / 1000),
                    7 => write!(line, " exit_rtt_ticks={value}"),
                    k => write!(line, " c{k}={value}"),
                };
            }
        }
        crate::console::write_line_deferred(format_args!("CV:VM {}", line.0));
    }
}

/// The end-of-run summary over all CPUs since `start` (TSC).
pub fn summary(rt: &Runtime, start: u64) {
    let now = tsc::rdtsc();
    let elapsed = ticks_to_ns(now.saturating_sub(start), rt.tsc_hz);
    let (mut guest, mut idle, mut exits, mut slices, mut overrun) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut overruns = 0u64;
    for c in &rt.cpu_stats {
        guest += ticks_to_ns(c.guest_ticks.load(Ordering::Relaxed), rt.tsc_hz);
        idle += ticks_to_ns(c.idle_ticks.load(Ordering::Relaxed), rt.tsc_hz);
        exits += c.exits.load(Ordering::Relaxed);
        slices += c.slices.load(Ordering::Relaxed);
        overrun = overrun.max(c.max_overrun_ns.load(Ordering::Relaxed));
        overruns += c.overruns.load(Ordering::Relaxed);
    }
    let total = elapsed.saturating_mul(rt.cpus as u64).max(1);
    let overhead = total.saturating_sub(guest).saturating_sub(idle);
    let stopped = rt.vms.iter().filter(|v| v.stopped()).count();
    marker!(
        "VMSUM backend={} cpus={} vms={} stopped={} run_ms={} exits={} slices={} guest_ms={} idle_ms={} \
         overhead_ppm={} overhead_per_exit_ns={} max_overrun_us={} overruns={}",
        rt.kind.name(),
        rt.cpus,
        rt.vms.len(),
        stopped,
        elapsed / 1_000_000,
        exits,
        slices,
        guest / 1_000_000,
        idle / 1_000_000,
        u128::from(overhead) * 1_000_000 / u128::from(total),
        overhead / exits.max(1),
        overrun / 1000,
        overruns
    );
    // x87/SSE restores at VMRUN (SVM: only when the registers do not hold the guest's image already).
    let (fpu_restores, fpu_skips) = match rt.kind {
        super::backend::Kind::Svm => crate::virt::svm::host::fpu_restores(),
        super::backend::Kind::Vmx => (0, 0),
    };
    // The hypervisor's own share of those overruns: exits whose handling took longer than the bound.
    let (mut worst, mut over) = (0u64, 0u64);
    for c in 0..rt.cpus.min(TRAIL_CPUS) {
        worst = worst.max(HANDLING_MAX[c].load(Ordering::Relaxed));
        over += HANDLING_OVER[c].load(Ordering::Relaxed);
    }
    marker!(
        "EXITSUM max_handling_us={} handling_over_bound={} bound_us={} fpu_restores={} fpu_skips={}",
        ticks_to_ns(worst, rt.tsc_hz) / 1000,
        over,
        super::OVERRUN_BOUND_NS / 1000,
        fpu_restores,
        fpu_skips
    );
}

/// Exit handling per CPU: the longest time from an exit to the hypervisor being done with it (the next entry,
/// or the end of the slice), in TSC ticks, and how many exits took longer than the overrun bound. This is the part
/// of a slice overrun the hypervisor causes itself (work done inside an exit: MMIO device emulation, hypercalls),
/// as opposed to an exit that arrived late (a timer the platform delivered late, an emulator the host did not run).
static HANDLING_MAX: [AtomicU64; TRAIL_CPUS] = [const { AtomicU64::new(0) }; TRAIL_CPUS];
static HANDLING_OVER: [AtomicU64; TRAIL_CPUS] = [const { AtomicU64::new(0) }; TRAIL_CPUS];

/// The overrun bound in TSC ticks, computed at the first exit (0: not yet). One runtime per boot, whose TSC rate
/// never changes, so it is computed once.
static HANDLING_BOUND_TICKS: AtomicU64 = AtomicU64::new(0);

/// Records that CPU `cpu` took `ticks` to handle one exit (see `HANDLING_MAX`).
#[inline]
pub fn note_handling(rt: &Runtime, cpu: u32, ticks: u64) {
    let Some(c) = usize::try_from(cpu).ok().filter(|&c| c < TRAIL_CPUS) else {
        return;
    };
    // Only this CPU writes its counters: plain loads and stores, no locked instructions; the bound is a compare
    // against a tick count computed once (no multiplication or division per exit).
    if ticks > HANDLING_MAX[c].load(Ordering::Relaxed) {
        HANDLING_MAX[c].store(ticks, Ordering::Relaxed);
    }
    let mut bound = HANDLING_BOUND_TICKS.load(Ordering::Relaxed);
    if bound == 0 {
        // floor(bound_ns x Hz / 10^9): `ticks > floor(x)` is `ticks > x` for whole ticks.
        bound = u64::try_from(
            u128::from(super::OVERRUN_BOUND_NS) * u128::from(rt.tsc_hz) / 1_000_000_000,
        )
        .unwrap_or(u64::MAX)
        .max(1);
        HANDLING_BOUND_TICKS.store(bound, Ordering::Relaxed);
    }
    if ticks > bound {
        HANDLING_OVER[c].store(
            HANDLING_OVER[c].load(Ordering::Relaxed) + 1,
            Ordering::Relaxed,
        );
    }
}

/// Remembers an exit of slot `slot`'s vCPU on CPU `cpu` for [`stop_dump`]: a few plain stores into this CPU's
/// exit trail ([`trail`]: no lock, no locked instruction). Called by the run loop of CPU `cpu` only. The vendor
/// vCPU is read directly (its fields, or the VMCB), not through `BackendVcpu`'s `Vcpu` calls.
#[inline]
pub fn note_exit(cpu: u32, slot: usize, vcpu: &BackendVcpu, exit: Option<virt::VmExit>, tsc: u64) {
    let Ok(c) = usize::try_from(cpu) else {
        return;
    };
    let (rip, rsp, rax, int_info) = match vcpu {
        BackendVcpu::Svm(v) => (
            v.rip(),
            v.gpr(Gpr::Rsp),
            v.gpr(Gpr::Rax),
            v.vmcb().ctl64(Ctl64::ExitIntInfo),
        ),
        BackendVcpu::Vmx(v) => (
            v.rip(),
            v.gpr(Gpr::Rsp),
            v.gpr(Gpr::Rax),
            v.last_entry().idt_vectoring,
        ),
    };
    trail::record(
        c,
        &trail::Entry {
            tsc,
            slot,
            rip,
            rsp,
            rax,
            int_info,
        },
        exit,
    );
}
