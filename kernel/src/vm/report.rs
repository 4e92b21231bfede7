//! Per-VM accounting lines (`CV:VM`, every second and at the end) and the end-of-run summary (`CV:VMSUM`).
//!
//! Figures come from the scheduler (CPU time charged per tier, credit balance), from the VM's exit-handling
//! context (exits, misbehaviour counts, the counters its guest `REPORT`ed) and from the run loops' per-CPU
//! statistics (time in guests, idle time, overrun), so the tests can set the hypervisor's accounting beside what
//! the guests measured themselves. Formats are in docs/console.md.
//!
//! Stop dumps ([`stop_dump`]): when a guest triple-faults, the registers, the stack words at RSP, the guest
//! page-table walk of RIP and RSP and the CPU's last exits (a per-CPU ring filled by [`note_exit`] on every exit,
//! one uncontended lock and a small copy) are logged, so an intermittent guest crash can be diagnosed from one
//! serial log.

use core::fmt::Write as _;
use core::sync::atomic::{AtomicU64, Ordering};

use virt::{Gpr, GuestMemory, StopCause, Vcpu, NO_WAKE};

use super::backend::BackendVcpu;
use crate::virt::svm::vmcb::{Ctl64, Seg};

use super::{ticks_to_ns, Runtime, VmState, REPORT_INTERVAL_NS};
use crate::arch::x86_64::tsc;
use crate::marker;

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
    // The hypervisor's own share of those overruns: exits whose handling took longer than the bound.
    let (mut worst, mut over) = (0u64, 0u64);
    for c in 0..rt.cpus.min(TRAIL_CPUS) {
        worst = worst.max(HANDLING_MAX[c].load(Ordering::Relaxed));
        over += HANDLING_OVER[c].load(Ordering::Relaxed);
    }
    marker!(
        "EXITSUM max_handling_us={} handling_over_bound={} bound_us={}",
        ticks_to_ns(worst, rt.tsc_hz) / 1000,
        over,
        super::OVERRUN_BOUND_NS / 1000
    );
}

/// Exit handling per CPU: the longest time from an exit to the hypervisor being done with it (the next entry,
/// or the end of the slice), in TSC ticks, and how many exits took longer than the overrun bound. This is the part
/// of a slice overrun the hypervisor causes itself (work done inside an exit: MMIO device emulation, hypercalls),
/// as opposed to an exit that arrived late (a timer the platform delivered late, an emulator the host did not run).
static HANDLING_MAX: [AtomicU64; TRAIL_CPUS] = [const { AtomicU64::new(0) }; TRAIL_CPUS];
static HANDLING_OVER: [AtomicU64; TRAIL_CPUS] = [const { AtomicU64::new(0) }; TRAIL_CPUS];

/// Records that CPU `cpu` took `ticks` to handle one exit (see `HANDLING_MAX`).
pub fn note_handling(rt: &Runtime, cpu: u32, ticks: u64) {
    let Some(c) = usize::try_from(cpu).ok().filter(|&c| c < TRAIL_CPUS) else {
        return;
    };
    // Only this CPU writes its counters: plain loads and stores, no locked instructions. The bound is compared in
    // ticks x 10^9 against ns x Hz (no 128-bit division on the exit path; ticks saturate after ~18 s at 1 GHz,
    // which still compares as "over").
    if ticks > HANDLING_MAX[c].load(Ordering::Relaxed) {
        HANDLING_MAX[c].store(ticks, Ordering::Relaxed);
    }
    if ticks.saturating_mul(1_000_000_000) > super::OVERRUN_BOUND_NS.saturating_mul(rt.tsc_hz) {
        HANDLING_OVER[c].store(
            HANDLING_OVER[c].load(Ordering::Relaxed) + 1,
            Ordering::Relaxed,
        );
    }
}

/// Exits remembered per CPU for a stop report: the last [`TRAIL_LEN`] exits of any vCPU run there.
const TRAIL_LEN: usize = 16;
/// CPUs with an exit trail (later CPUs keep none).
const TRAIL_CPUS: usize = 16;

/// One remembered exit: the state the guest left in, before the handler changed anything.
#[derive(Clone, Copy, Debug)]
struct TrailEntry {
    tsc: u64,
    slot: usize,
    rip: u64,
    rsp: u64,
    rax: u64,
    /// SVM: EXITINTINFO of the exit (an event whose delivery the exit interrupted); 0 on VMX.
    int_info: u64,
    exit: Option<virt::VmExit>,
}

/// A ring of the last exits of one CPU (only that CPU writes it; a stop report reads it).
struct Trail {
    next: usize,
    entries: [Option<TrailEntry>; TRAIL_LEN],
}

static TRAILS: [spin::Mutex<Trail>; TRAIL_CPUS] = [const {
    spin::Mutex::new(Trail {
        next: 0,
        entries: [None; TRAIL_LEN],
    })
}; TRAIL_CPUS];

/// Remembers an exit of slot `slot`'s vCPU on CPU `cpu` for [`stop_dump`] (an uncontended lock and a 56-byte copy).
pub fn note_exit(cpu: u32, slot: usize, vcpu: &BackendVcpu, exit: Option<virt::VmExit>, tsc: u64) {
    let Some(trail) = usize::try_from(cpu).ok().and_then(|c| TRAILS.get(c)) else {
        return;
    };
    let mut t = trail.lock();
    let at = t.next % TRAIL_LEN;
    t.entries[at] = Some(TrailEntry {
        tsc,
        slot,
        rip: vcpu.rip(),
        rsp: vcpu.gpr(Gpr::Rsp),
        rax: vcpu.gpr(Gpr::Rax),
        int_info: svm_of(vcpu).map_or(0, |v| v.vmcb().ctl64(Ctl64::ExitIntInfo)),
        exit,
    });
    t.next = t.next.wrapping_add(1);
}

/// The SVM vCPU behind `vcpu`, for its VMCB fields.
fn svm_of(vcpu: &BackendVcpu) -> Option<&crate::virt::svm::SvmVcpu> {
    match vcpu {
        BackendVcpu::Svm(v) => Some(v),
        BackendVcpu::Vmx(_) => None,
    }
}

/// A guest fault its own handlers could not take (triple fault): logs what the next engineer needs to tell a bad
/// stack pointer from corrupted guest memory: the registers, the stack words at RSP, the guest page-table entries
/// that map RIP and RSP (read through CR3 from guest RAM, 4-level paging), and the last exits of this CPU (`cpu`)
/// and then of every other CPU.
/// Lines start `vm <name>: stop dump:`. Runs only on the stop path.
pub fn stop_dump(rt: &Runtime, cpu: u32, slot: usize, vcpu: &BackendVcpu) {
    let s = &rt.slots[slot];
    let vm = &rt.vms[s.vm];
    let name = &vm.name;
    let mem: &dyn GuestMemory = &vm.ram;
    let read = |gpa: u64| {
        let mut b = [0u8; 8];
        mem.read(gpa, &mut b).ok().map(|()| u64::from_le_bytes(b))
    };
    let (rip, rsp) = (vcpu.rip(), vcpu.gpr(Gpr::Rsp));
    let cs = vcpu.control_state();
    let cr3 = cs.map_or(0, |c| c.cr3);
    let mut line = Line(heapless::String::new());
    let _ = write!(
        line,
        "vm {name}: stop dump: vCPU {} rip={rip:#x} rsp={rsp:#x} rax={:#x} rbp={:#x} cr0={:#x} cr3={cr3:#x} cr4={:#x} efer={:#x} rflags={:#x}",
        s.index,
        vcpu.gpr(Gpr::Rax),
        vcpu.gpr(Gpr::Rbp),
        cs.map_or(0, |c| c.cr0),
        cs.map_or(0, |c| c.cr4),
        cs.map_or(0, |c| c.efer),
        cs.map_or(0, |c| c.rflags),
    );
    crate::console::write_line_deferred(format_args!("{}", line.0));
    let mut line = Line(heapless::String::new());
    let _ = write!(line, "vm {name}: stop dump: stack at rsp-16:");
    for i in 0..6u64 {
        let at = rsp.wrapping_sub(16).wrapping_add(8 * i);
        let _ = match read(at) {
            Some(v) => write!(line, " {v:#x}"),
            None => write!(line, " (unreadable {at:#x})"),
        };
    }
    crate::console::write_line_deferred(format_args!("{}", line.0));
    for (what, va) in [("rip", rip), ("rsp", rsp)] {
        let mut line = Line(heapless::String::new());
        let _ = write!(line, "vm {name}: stop dump: walk of {what} {va:#x}:");
        let mut table = cr3 & 0x000f_ffff_ffff_f000;
        for (level, shift) in [(4u32, 39u32), (3, 30), (2, 21), (1, 12)] {
            let at = table + 8 * ((va >> shift) & 0x1ff);
            let Some(e) = read(at) else {
                let _ = write!(line, " L{level}@{at:#x}=(outside RAM)");
                break;
            };
            let _ = write!(line, " L{level}@{at:#x}={e:#x}");
            // Not present, or a large page (PS at levels 3 and 2): the walk ends here.
            if e & 1 == 0 || (level != 4 && level != 1 && e & 0x80 != 0) {
                break;
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        crate::console::write_line_deferred(format_args!("{}", line.0));
    }
    if let Some(v) = svm_of(vcpu) {
        let b = v.vmcb();
        let seg = |g: Seg| {
            let x = b.segment(g);
            (x.selector, x.attrib, x.limit, x.base)
        };
        crate::console::write_line_deferred(format_args!(
            "vm {name}: stop dump: svm exit_int_info={:#x} event_inj={:#x} int_ctl={:#x} shadow={:#x} info1={:#x} info2={:#x} cs={:x?} ss={:x?} tr={:x?} gdtr={:x?} idtr={:x?}",
            b.ctl64(Ctl64::ExitIntInfo),
            b.ctl64(Ctl64::EventInj),
            b.ctl64(Ctl64::IntCtl),
            b.ctl64(Ctl64::InterruptShadow),
            b.ctl64(Ctl64::ExitInfo1),
            b.ctl64(Ctl64::ExitInfo2),
            seg(Seg::Cs),
            seg(Seg::Ss),
            seg(Seg::Tr),
            seg(Seg::Gdtr),
            seg(Seg::Idtr),
        ));
        // The guest's gates for #DF, #GP and #PF (16 bytes each): a fault it could not take shows here.
        let idt = b.segment(Seg::Idtr).base;
        let mut line = Line(heapless::String::new());
        let _ = write!(line, "vm {name}: stop dump: idt gates");
        for vector in [8u64, 13, 14] {
            let lo = read(idt + 16 * vector).unwrap_or(u64::MAX);
            let hi = read(idt + 16 * vector + 8).unwrap_or(u64::MAX);
            let _ = write!(line, " {vector}={hi:#x}:{lo:#x}");
        }
        crate::console::write_line_deferred(format_args!("{}", line.0));
    }
    // This CPU's last exits, then every other CPU's (what the rest of the machine was doing at the time).
    let others = (0..rt.cpus.min(TRAIL_CPUS)).filter_map(|c| u32::try_from(c).ok());
    for c in core::iter::once(cpu).chain(others.filter(|&c| c != cpu)) {
        let Some(trail) = usize::try_from(c).ok().and_then(|i| TRAILS.get(i)) else {
            continue;
        };
        let t = trail.lock();
        for k in 0..TRAIL_LEN {
            let Some(e) = t.entries[(t.next.wrapping_add(k)) % TRAIL_LEN] else {
                continue;
            };
            let who = &rt.slots[e.slot];
            crate::console::write_line_deferred(format_args!(
                "vm {name}: stop dump: cpu{c} exit tsc={} vm={} vcpu={} rip={:#x} rsp={:#x} rax={:#x} int_info={:#x} {:?}",
                e.tsc,
                rt.vms[who.vm].name,
                who.index,
                e.rip,
                e.rsp,
                e.rax,
                e.int_info,
                e.exit
            ));
        }
    }
}
