//! The per-CPU run loop: pick, enter, charge, handle, repeat; halt when nothing may run.
//!
//! Each iteration on CPU `c`:
//! 1. wake this CPU's blocked vCPUs whose wake time has passed (`Scheduler::wake`);
//! 2. `Scheduler::pick(c, now)`;
//! 3. idle decision: serve I/O freely (`io::service::serve`) until the idle decision ends, then arm the LAPIC
//!    timer for the earliest of the next release, the next wake-up of a sleeping vCPU on this CPU (and, on the
//!    BSP, the next report) and halt;
//! 4. vCPU decision: enter it with a deadline of `now + slice`, cut short by the next wake-up of another vCPU on
//!    this CPU (so a waking real-time vCPU is re-picked within the overrun bound), handle each exit through
//!    `VmContext::handle_exit` and act on the `ExitAction`, then charge the time
//!    from entry to the end of the last exit's handling (guest time, world switches and exit handling) and
//!    block the vCPU if it halted;
//! 5. I/O server decision (`io::server`): serve I/O until the slice's deadline (cut the same way), charge the
//!    time from the decision to the end to the server, and block it when nothing is left for the CPU to do.
//!
//! This CPU's I/O server is woken (step 1, through `Scheduler::wake`) when the I/O service has work and its
//! poll interval has passed, or at once after a queue notification. I/O is served nowhere else: not between
//! slices, not inside exits. What stays between slices, uncharged and kept within `RESERVE_PPM` (2 % of each
//! CPU): the decision itself, the wake-ups, at most `CONSOLE_PUMP_BYTES` of console output and one recorded
//! guest event formatted, at most `RECLAIM_STEP_NS` of freeing a stopped VM's RAM, and on the BSP the report
//! tick and the management channel's poll (each bounded per iteration).
//!
//! Reclaim ([`stop_and_reclaim`], and every [`stop_vm`]): a stop bumps `STOPS`; each run loop that sees it change
//! hands its vCPUs of stopped VMs back at the top of its next iteration (`settle_stopped`: the backend vCPU is
//! dropped on its own CPU, VMCLEAR first on VMX); the CPU that settles a VM's last vCPU frees its nested page
//! table and takes its RAM, which the run loops then free in steps of at most `RECLAIM_STEP_NS` (or an idle
//! decision's whole idle time), one VM at a time, and log `vm <name>: reclaimed ...`. Before that, settling retires
//! the vCPU in the scheduler (`Scheduler::retire`, log `vm <name>: released <ppm> ppm on cpuN`): its CPU admission
//! is given back for every kind of stop, while its ledger and figures stay for reports and describe. Lock order: `RECLAIM`, then
//! a slot's vCPU lock, then (inside the backend) its settle lock, its shared-part lock and the frame allocator.
//!
//! Created VMs ([`super::setup::create_vm`]): when the published VM count changes, each loop re-takes the slots
//! pinned to its CPU (`adopt_new`), creates the new backend vCPUs there and wakes them through `wake_due` (they are
//! published blocked, due at once), then settles once more in case such a VM was destroyed meanwhile.
//!
//! Host turn (QEMU `-icount`, the 1.02 ms late wake-up of `qemu_epyc_smp2_hard_real_time`): QEMU 7.2 runs all
//! CPUs on one host thread and lets a CPU run until the next timer deadline of any CPU, unless it executes HLT or
//! PAUSE. The run loop used to disarm the LAPIC timer after each exit and idle halt, so between two entries a CPU had
//! no deadline of its own; when it then yielded (a PAUSE: in a contended lock's spin, e.g. the scheduler lock both
//! loops take several times per slice; replacing only the PAUSE of the backend's interrupt window did not remove
//! the miss), the other CPU entered a guest that spins without PAUSE
//! (`hostile cli-spin`) and ran to the end of its own slice, and this CPU did not execute for that long while its
//! TSC ran on. Its real-time vCPU's wake-up, due meanwhile, was handled ~1 ms late; no slice overran (this CPU
//! was between slices, the other ended its slice on time), so the kernel reported nothing. Proof, with the same
//! `-icount` run (deterministic): the 5th job misses (first sample 1.022 ms late) with the timer disarmed after
//! each exit, and with a timer armed 25 us ahead but its LVT masked (same instructions, no QEMU deadline); it does
//! not miss with that timer unmasked. So the SVM backend leaves the timer armed `HOST_TURN_US` (25 us) ahead after
//! every exit (kernel/src/virt/svm/vcpu.rs); the next entry or idle halt re-arms it. (Not after an idle halt: the
//! VMX backend never opens an interrupt window, so a host timer left pending there would make every VM entry
//! exit at once; VMX runs on Bochs, which has no such round robin.)
//!
//! Invariant: a vCPU is only ever entered on `slot.cpu`; only that CPU changes `slot.blocked`/`slot.wake_at`,
//! except [`stop_vm`], which parks every vCPU of a stopped VM for good (`NO_WAKE`) from whichever CPU stops it.
//! A VM paused by the management channel (`Vm::paused`) is never entered: its vCPUs are blocked in the scheduler at
//! their next decision and are not woken until the resume (the BSP also polls the channel, `crate::mgmt`).

use core::sync::atomic::{AtomicU64, Ordering};

use virt::{ExitAction, StopReport, Vcpu, NO_WAKE};

use super::report;
use super::sink::LogSink;
use super::{Runtime, VmState, IDLE_CHECK_NS, OVERRUN_BOUND_NS};
use crate::arch::x86_64::{lapic, tsc};
use crate::console;
use crate::io::service as io;

/// Most console bytes moved per loop iteration (bounds the time the run loop spends on output).
const CONSOLE_PUMP_BYTES: usize = 256;
/// Longest idle halt while console output is waiting (a 16-byte FIFO load takes ~1.4 ms at 115200 baud).
const CONSOLE_IDLE_NS: u64 = 1_000_000;

/// Runs CPU `cpu`'s loop until the runtime is done.
pub fn run_cpu(rt: &Runtime, cpu: u32) {
    let Some(stats) = usize::try_from(cpu).ok().and_then(|c| rt.cpu_stats.get(c)) else {
        return;
    };
    let mut mine = rt.slots_on(cpu);
    let mut vms_seen = rt.vms.len();
    let mut reporter = (cpu == 0).then(|| report::Reporter::new(rt));
    // The management channel lives on the BSP's loop, beside the reports (`mgmt=com2`).
    let mut mgmt = if cpu == 0 {
        crate::mgmt::Endpoint::start(rt)
    } else {
        None
    };
    log::info!(
        "vm: cpu{cpu} runs {} vCPU(s); TSC {} (epoch {})",
        mine.len(),
        tsc::rdtsc(),
        rt.epoch
    );
    x86_64::instructions::interrupts::disable();
    // Build this CPU's vCPUs before the first decision, so their set-up is not charged to a slice.
    for &s in &mine {
        create_vcpu(rt, s);
    }
    let mut stops_seen = 0;
    let mut io_server = IoServer::default();
    while !rt.done.load(Ordering::Acquire) {
        // A VM was created since the last look: take its vCPUs pinned here.
        let vms_now = rt.vms.len();
        if vms_now != vms_seen {
            vms_seen = vms_now;
            adopt_new(rt, cpu, &mut mine);
            // Such a VM may have been destroyed already (a stop this loop counted before it saw the VM): settle
            // again (STOPS never reaches u64::MAX).
            stops_seen = u64::MAX;
        }
        // A VM stopped since the last look: hand this CPU's vCPUs of stopped VMs back (reclaim).
        let stops = STOPS.load(Ordering::Acquire);
        if stops != stops_seen && settle_stopped(rt, &mine) {
            stops_seen = stops;
        }
        reclaim_step(rt, rt.after(tsc::rdtsc(), RECLAIM_STEP_NS));
        // Guest events recorded in exit handling are formatted here, one per iteration (sink module doc); guest
        // output and reports leave through the console ring, a FIFO load at a time, never waiting.
        let events_pending = super::sink::format_pending(1);
        let console_pending = console::pump(CONSOLE_PUMP_BYTES) || events_pending;
        // I/O is served only in the I/O server's slices and in idle time (io::server); here it is only noted
        // that the loop went round (stall tracking) and the server woken when there is work.
        io::note_loop();
        let now = tsc::rdtsc();
        wake_due(rt, &mine, now);
        io_server.wake_if_due(rt, cpu, now);
        if let Some(r) = reporter.as_mut() {
            r.tick(rt, now);
            if rt.done.load(Ordering::Acquire) {
                break;
            }
        }
        if let Some(m) = mgmt.as_mut() {
            m.poll(rt, now);
        }
        let decision = match rt.sched.lock().pick(cpu, rt.ns(now)) {
            Ok(d) => d,
            Err(e) => {
                log::error!(
                    "vm: scheduler refused pick on cpu{cpu}: {e}; stopping this CPU's run loop"
                );
                break;
            }
        };
        match decision.vcpu {
            None => {
                let mut until = rt.after(now, decision.slice_ns.min(IDLE_CHECK_NS));
                until = until.min(next_wake(rt, &mine, None));
                if let Some(r) = reporter.as_ref() {
                    until = until.min(r.next_due());
                }
                if let Some(m) = mgmt.as_ref() {
                    until = until.min(m.next_due(rt, now));
                }
                if console_pending {
                    until = until.min(rt.after(now, CONSOLE_IDLE_NS));
                }
                if io::outstanding() > 0 {
                    until = until.min(rt.after(now, io::IDLE_POLL_NS));
                    // Idle time: serve freely until the idle decision ends (takes time from no server).
                    let t = tsc::rdtsc();
                    let served = io::serve(until);
                    crate::io::server::note_idle(
                        cpu,
                        super::ticks_to_ns(tsc::rdtsc().saturating_sub(t), rt.tsc_hz),
                        served,
                    );
                }
                // Nothing to run: recorded guest events are formatted and a reclaim's RAM is freed in this idle
                // time first.
                while events_pending && tsc::rdtsc() < until && super::sink::format_pending(1) {}
                reclaim_step(rt, until);
                idle_until(until);
                stats
                    .idle_ticks
                    .fetch_add(tsc::rdtsc().saturating_sub(now), Ordering::Relaxed);
            }
            Some(id) if io_server.id == Some(id) => {
                io_server.run_slice(rt, cpu, &mine, tsc::rdtsc(), decision.slice_ns);
            }
            Some(id) => {
                let Some(s) = mine.iter().copied().find(|&s| rt.slots[s].id == id) else {
                    log::error!("vm: scheduler picked {id:?}, which is not pinned to cpu{cpu}; stopping this loop");
                    break;
                };
                // The slice starts after the decision: the scheduler's own cost is overhead, not the vCPU's time.
                run_slice(rt, s, &mine, tsc::rdtsc(), decision.slice_ns, stats);
            }
        }
    }
    if let Some(m) = mgmt.as_mut() {
        m.finish(rt);
    }
    super::sink::format_pending(usize::MAX);
    trace_report(rt, &mine);
    lapic::disarm();
    stats.finished.store(true, Ordering::Release);
    x86_64::instructions::interrupts::enable();
}

/// This CPU's I/O server as its run loop sees it (`io::server`): the loop alone wakes, runs and blocks it.
#[derive(Debug, Default)]
struct IoServer {
    /// Its handle (`None`: this CPU has no I/O server).
    id: Option<sched::cpu::VcpuId>,
    /// Not runnable in the scheduler (a server starts blocked when admitted).
    blocked: bool,
    /// Earliest TSC at which a blocked server with work is woken (0: as soon as there is work).
    wake_at: u64,
}

impl IoServer {
    /// Takes up a server admitted since the last look (a VM with volumes built for this CPU), and wakes a
    /// blocked one when the I/O service has work and its poll interval has passed, or at once after a queue
    /// notification (the sleeper clamp of `Scheduler::wake` applies).
    fn wake_if_due(&mut self, rt: &Runtime, cpu: u32, now: u64) {
        let id = crate::io::server::on_cpu(cpu);
        if id != self.id {
            *self = Self {
                id,
                blocked: true,
                wake_at: 0,
            };
        }
        let Some(id) = self.id else { return };
        if !self.blocked || io::outstanding() == 0 || (now < self.wake_at && !io::notify_pending())
        {
            return;
        }
        self.blocked = false;
        match rt.sched.lock().wake(id, rt.ns(now)) {
            Ok(_) => crate::io::server::note_wake(cpu),
            Err(e) => log::error!("vm: wake of the I/O server {id:?} refused: {e}"),
        }
    }

    /// Runs the server for one decision of `slice_ns` taken at TSC `t0`: serves I/O until the deadline (the
    /// slice, cut by the next wake-up of a vCPU on this CPU, as a vCPU's slice is), charges the time from the
    /// decision to the end (overrun included: debt) and blocks the server when the service has nothing left for
    /// the CPU (due again after `POLL_INTERVAL_NS` while requests are on the device) or another CPU is serving.
    fn run_slice(&mut self, rt: &Runtime, cpu: u32, mine: &[usize], t0: u64, slice_ns: u64) {
        let Some(id) = self.id else { return };
        let deadline = rt.after(t0, slice_ns).min(next_wake(rt, mine, None));
        let served = io::serve(deadline);
        let t1 = tsc::rdtsc();
        let ran_ns = super::ticks_to_ns(t1.saturating_sub(t0), rt.tsc_hz);
        let overrun = super::ticks_to_ns(t1.saturating_sub(deadline), rt.tsc_hz);
        crate::io::server::note_slice(cpu, ran_ns, overrun, served);
        // Blocked when nothing is left for the CPU or when another CPU serves.
        let block = served.contended || served.drained || io::outstanding() == 0;
        if block {
            self.blocked = true;
            self.wake_at = if served.contended || io::outstanding() > 0 {
                rt.after(t1, io::POLL_INTERVAL_NS)
            } else {
                0
            };
        }
        let mut sched = rt.sched.lock();
        if let Err(e) = sched.charge(id, ran_ns, rt.ns(t1)) {
            log::error!("vm: charge of the I/O server {id:?} refused: {e}");
        }
        if block {
            if let Err(e) = sched.block(id, rt.ns(t1)) {
                log::error!("vm: block of the I/O server {id:?} refused: {e}");
            }
        }
    }
}

/// Takes the vCPUs of VMs created since `mine` was computed that are pinned to `cpu`: creates each one's backend
/// vCPU here, on its CPU; they were published blocked and due at once, so [`wake_due`] makes them runnable in the
/// scheduler right after (a vCPU is never runnable before its CPU has it).
fn adopt_new(rt: &Runtime, cpu: u32, mine: &mut alloc::vec::Vec<usize>) {
    let all = rt.slots_on(cpu);
    for &s in &all {
        if !mine.contains(&s) {
            create_vcpu(rt, s);
            let slot = &rt.slots[s];
            // Deferred: a run loop never waits for the UART (console module doc).
            console::log_deferred(
                log::Level::Info,
                "vm",
                format_args!(
                    "vm {}: cpu{cpu} takes vCPU {}",
                    rt.vms[slot.vm].name, slot.index
                ),
            );
        }
    }
    *mine = all;
}

/// Wakes this CPU's blocked vCPUs whose time has come.
fn wake_due(rt: &Runtime, mine: &[usize], now: u64) {
    for &s in mine {
        let slot = &rt.slots[s];
        if slot.blocked.load(Ordering::Relaxed)
            && slot.wake_at.load(Ordering::Relaxed) <= now
            && !rt.vms[slot.vm].paused()
        {
            slot.blocked.store(false, Ordering::Relaxed);
            if rt.vms[slot.vm].stopped() {
                continue;
            }
            // The preemption hint names this CPU, which is about to pick anyway.
            if let Err(e) = rt.sched.lock().wake(slot.id, rt.ns(now)) {
                log::error!("vm: wake of {:?} refused: {e}", slot.id);
            }
        }
    }
}

/// Earliest timed wake-up among this CPU's blocked vCPUs other than `except` (`NO_WAKE` if none); a paused
/// VM's vCPUs wake only after its resume, so they do not count.
fn next_wake(rt: &Runtime, mine: &[usize], except: Option<usize>) -> u64 {
    mine.iter()
        .filter(|&&s| {
            Some(s) != except
                && rt.slots[s].blocked.load(Ordering::Relaxed)
                && !rt.vms[rt.slots[s].vm].paused()
        })
        .map(|&s| rt.slots[s].wake_at.load(Ordering::Relaxed))
        .min()
        .unwrap_or(NO_WAKE)
}

/// Halts until the TSC reaches `until` (or any interrupt). Interrupts are off on entry and on return; the LAPIC
/// timer is disarmed on return.
fn idle_until(until: u64) {
    let now = tsc::rdtsc();
    if until <= now {
        return;
    }
    // A host-turn interrupt of the SVM backend already pending would end the halt at once: take it first.
    x86_64::instructions::interrupts::enable();
    x86_64::instructions::nop();
    x86_64::instructions::interrupts::disable();
    if !lapic::arm_deadline(until) {
        lapic::arm_oneshot_us(tsc::ticks_to_us(until - now) + 1);
    }
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
    lapic::disarm();
}

/// Runs slot `s` for one decision of `slice_ns` taken at TSC `t0`.
fn run_slice(
    rt: &Runtime,
    s: usize,
    mine: &[usize],
    t0: u64,
    slice_ns: u64,
    stats: &super::CpuStats,
) {
    let slot = &rt.slots[s];
    let vm = &rt.vms[slot.vm];
    let wake = next_wake(rt, mine, Some(s));
    if wake <= tsc::rdtsc() {
        // Another vCPU's wake time passed during the decision (the pick and the BSP's report tick take tens of us
        // on an emulated CPU): entering now would run this vCPU past a deadline already gone, by a whole entry
        // and exit (Bochs VMX: 50 us past a 10 us slice). Nothing ran, nothing is charged; the loop wakes that
        // vCPU and picks again (the scheduler's contract 3).
        return;
    }
    let deadline = rt.after(t0, slice_ns).min(wake);
    let mut blocked = false;
    let mut stop: Option<StopReport> = None;
    let mut guest_ticks = 0u64;
    let mut exits = 0u64;
    let mut last: Option<virt::VmExit> = None;
    if !vm.stopped() && !vm.paused() {
        let mut guard = slot.vcpu.lock();
        if guard.is_none() {
            stop = Some(StopReport {
                cause: virt::StopCause::HostFailure {
                    detail: "the vCPU could not be created (see the log)",
                },
                rip: vm.entry,
                addr: None,
            });
        }
        if let Some(vcpu) = guard.as_mut() {
            // When the last exit arrived: its handling lasts until the next entry (or the end of the slice).
            let mut exit_at: Option<u64> = None;
            loop {
                let before = tsc::rdtsc();
                if let Some(at) = exit_at.take() {
                    report::note_handling(rt, slot.cpu, before.saturating_sub(at));
                }
                let exit = vcpu.run(deadline);
                last = exit.ok();
                let now = tsc::rdtsc();
                guest_ticks += now.saturating_sub(before);
                exits += 1;
                exit_at = Some(now);
                report::note_exit(slot.cpu, s, vcpu, last, now);
                let mut sink = LogSink;
                let action = {
                    let mut ctx = vm.ctx.lock();
                    match exit {
                        // Writable RAM: a string port input (`INS`) stores into guest memory.
                        Ok(e) => ctx.handle_exit_rw(
                            e,
                            vcpu,
                            slot.index,
                            &mut super::ram::RamWriter(&vm.ram),
                            &mut sink,
                            now,
                        ),
                        Err(f) => {
                            let rip = vcpu.rip();
                            ctx.entry_failed(f, rip, &mut sink)
                        }
                    }
                };
                match action {
                    ExitAction::Continue => {
                        if tsc::rdtsc() >= deadline
                            || rt.done.load(Ordering::Relaxed)
                            || vm.stopped()
                            || vm.paused()
                        {
                            break;
                        }
                    }
                    ExitAction::Yield => break,
                    ExitAction::Block { until_tsc } => {
                        slot.wake_at.store(until_tsc, Ordering::Relaxed);
                        slot.blocked.store(true, Ordering::Relaxed);
                        blocked = true;
                        break;
                    }
                    ExitAction::Stop(r) => {
                        if matches!(r.cause, virt::StopCause::TripleFault { .. }) {
                            report::stop_dump(rt, slot.cpu, s, vcpu);
                        }
                        stop = Some(r);
                        break;
                    }
                    // A device register: the VM's virtio-blk device answers (I/O service lock, taken with no
                    // other lock held), then the instruction completes under the context lock.
                    ExitAction::Mmio(access) => {
                        let Some(value) = super::devices::dispatch(slot.vm, &access) else {
                            stop = Some(StopReport {
                                cause: virt::StopCause::NoDeviceModel,
                                rip: vcpu.rip(),
                                addr: Some(access.gpa),
                            });
                            break;
                        };
                        vm.ctx.lock().complete_mmio(vcpu, &access, value);
                        if tsc::rdtsc() >= deadline
                            || rt.done.load(Ordering::Relaxed)
                            || vm.stopped()
                            || vm.paused()
                        {
                            break;
                        }
                    }
                }
            }
            if let Some(at) = exit_at {
                report::note_handling(rt, slot.cpu, tsc::rdtsc().saturating_sub(at));
            }
        }
    } else {
        // Stopped: parked for good. Paused: blocked until the resume (wake time 0 = at once after it).
        blocked = true;
        let wake = if vm.stopped() { NO_WAKE } else { 0 };
        slot.wake_at.store(wake, Ordering::Relaxed);
        slot.blocked.store(true, Ordering::Relaxed);
    }
    let t1 = tsc::rdtsc();
    let ran_ns = super::ticks_to_ns(t1.saturating_sub(t0), rt.tsc_hz);
    stats.guest_ticks.fetch_add(guest_ticks, Ordering::Relaxed);
    stats.exits.fetch_add(exits, Ordering::Relaxed);
    stats.slices.fetch_add(1, Ordering::Relaxed);
    slot.slices.fetch_add(1, Ordering::Relaxed);
    // Past the deadline actually armed (the slice, or earlier for another vCPU's wake-up).
    let overrun = super::ticks_to_ns(t1.saturating_sub(deadline), rt.tsc_hz);
    let new_max = overrun > stats.max_overrun_ns.fetch_max(overrun, Ordering::Relaxed);
    if overrun > OVERRUN_BOUND_NS {
        stats.overruns.fetch_add(1, Ordering::Relaxed);
    }
    // Report every new worst case, and the first few overruns beyond the bound.
    if overrun > OVERRUN_BOUND_NS && (new_max || stats.overruns.load(Ordering::Relaxed) <= 8) {
        let what = format_args!(
            "vm {}: vCPU {} ran {} us past its {} us slice ({exits} exits, last exit {last:?})",
            vm.name,
            slot.index,
            overrun / 1000,
            slice_ns / 1000
        );
        console::log_deferred(log::Level::Warn, "vm", what);
    }
    {
        let mut sched = rt.sched.lock();
        if let Err(e) = sched.charge(slot.id, ran_ns, rt.ns(t1)) {
            log::error!("vm: charge of {:?} refused: {e}", slot.id);
        }
        if blocked {
            if let Err(e) = sched.block(slot.id, rt.ns(t1)) {
                log::error!("vm: block of {:?} refused: {e}", slot.id);
            }
        }
    }
    if let Some(report) = stop {
        // This CPU hands back its vCPUs of the VM at once; the others at their next iteration.
        stop_and_reclaim(rt, slot.vm, report, t1);
    }
}

/// Creates slot `s`'s backend vCPU on this CPU (its CPU); a failure is logged and leaves it absent, which
/// stops the VM at its first decision.
fn create_vcpu(rt: &Runtime, s: usize) {
    let slot = &rt.slots[s];
    let vm = &rt.vms[slot.vm];
    let entry =
        virt::entry::EntryState::long_mode(vm.entry, slot.index, virt::GuestMemory::size(&vm.ram));
    match vm.backend.create_vcpu(&entry, vm.tsc_offset) {
        Ok(v) => *slot.vcpu.lock() = Some(v),
        Err(e) => log::error!("vm {}: cannot create vCPU {}: {e}", vm.name, slot.index),
    }
}

/// Stops VM `vm` (once): records and prints the report, blocks all its vCPUs.
pub fn stop_vm(rt: &Runtime, vm: usize, report: StopReport, now: u64) {
    let v = &rt.vms[vm];
    {
        let mut state = v.state.lock();
        if *state != VmState::Running {
            return;
        }
        *state = VmState::Stopped(report);
    }
    // Its devices let go of its memory first: from here on no completion touches the VM's RAM, whatever
    // reclaims it later (before STOPS moves: another CPU may settle the VM's last vCPU and take its RAM at once).
    crate::io::service::detach_vm(vm);
    // Every run loop settles its vCPUs of this VM at its next iteration (reclaim).
    STOPS.fetch_add(1, Ordering::AcqRel);
    crate::console::write_line_deferred(format_args!("CV:VMSTOP {}", report.line(&v.name)));
    let mut sched = rt.sched.lock();
    for s in v.slots.clone() {
        let slot = &rt.slots[s];
        slot.wake_at.store(NO_WAKE, Ordering::Relaxed);
        slot.blocked.store(true, Ordering::Relaxed);
        if let Err(e) = sched.block(slot.id, rt.ns(now)) {
            log::error!("vm {}: block of vCPU {} refused: {e}", v.name, slot.index);
        }
    }
}

/// Stops counted so far: a run loop that sees it change settles its vCPUs of stopped VMs.
static STOPS: AtomicU64 = AtomicU64::new(0);
/// The reclaim in progress (one VM at a time, so the free-frame counts it reports are its own).
static RECLAIM: spin::Mutex<Option<InProgress>> = spin::Mutex::new(None);
/// Longest a run loop iteration spends freeing a reclaimed VM's RAM while vCPUs wait (an idle CPU frees until
/// its next wake-up instead). Host time no vCPU is charged for: kept well inside the overrun bound.
const RECLAIM_STEP_NS: u64 = 10_000;
/// Frames freed between two looks at the clock.
const RECLAIM_BATCH: usize = 16;

/// A VM whose vCPUs and tables are gone and whose RAM is being freed.
#[derive(Debug)]
struct InProgress {
    vm: usize,
    released: super::backend::Released,
    ram: super::ram::ReclaimedFrames,
    ram_frames: u64,
}

/// What became of a VM's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reclaim {
    /// The VM runs (or is paused): it keeps its memory.
    Running,
    /// Stopped; its vCPUs are being handed back (each run loop does it at its next iteration) or its RAM freed.
    Pending,
    /// Stopped, and its RAM, nested page tables and control pages are back in the frame allocator.
    Done,
}

/// Where VM `vm`'s reclaim stands (`None`: no such VM).
pub fn reclaim_status(rt: &Runtime, vm: usize) -> Option<Reclaim> {
    let v = rt.vms.get(vm)?;
    Some(if !v.stopped() {
        Reclaim::Running
    } else if v.backend.released() && RECLAIM.lock().as_ref().is_none_or(|p| p.vm != vm) {
        Reclaim::Done
    } else {
        Reclaim::Pending
    })
}

/// Stops VM `vm` with `report` (unless it already stopped) and reclaims its memory: this CPU hands back its own
/// vCPUs of the VM now; every other CPU does at its run loop's next iteration (a busy CPU within one slice, an
/// idle one at its next wake-up: send it an IPI to make that immediate); the RAM is then freed in bounded steps by
/// the run loops. Idempotent. For the management channel's destroy. Returns where the reclaim stands afterwards
/// (`None`: no such VM).
pub fn stop_and_reclaim(rt: &Runtime, vm: usize, report: StopReport, now: u64) -> Option<Reclaim> {
    rt.vms.get(vm)?;
    stop_vm(rt, vm, report, now);
    let me = crate::arch::x86_64::percpu::current_id();
    let mine: alloc::vec::Vec<usize> = rt.vms[vm]
        .slots
        .clone()
        .filter(|&s| rt.slots[s].cpu == me)
        .collect();
    settle_stopped(rt, &mine);
    reclaim_status(rt, vm)
}

/// Hands back every vCPU among `mine` (slots of this CPU) whose VM has stopped: its backend vCPU is dropped here,
/// on its own CPU (VMX: VMCLEAR, then its frames). The CPU that settles a VM's last vCPU frees the VM's nested
/// page tables and takes its RAM for [`reclaim_step`]. Returns false if something is left for a later call (while
/// another VM's RAM is still being freed, no new reclaim starts).
fn settle_stopped(rt: &Runtime, mine: &[usize]) -> bool {
    let mut all = true;
    for &s in mine {
        let slot = &rt.slots[s];
        let vm = &rt.vms[slot.vm];
        if !vm.stopped() || vm.backend.is_settled(slot.index) {
            continue;
        }
        // Its CPU admission first: that needs no frames and must not wait for another VM's reclaim.
        retire(rt, s);
        let mut current = RECLAIM.lock();
        if current.is_some() {
            all = false;
            continue;
        }
        let vcpu = slot.vcpu.lock().take();
        if let Some(v) = vcpu.as_ref().and_then(super::backend::BackendVcpu::as_vmx) {
            if v.late_exits() > 0 {
                v.trace_report(&alloc::format!("vm {} vCPU {}", vm.name, slot.index));
            }
        }
        let Some(released) = vm.backend.settle(slot.index, vm.slots.len(), vcpu) else {
            continue;
        };
        // SAFETY: every vCPU of the VM is gone (settled above, each on its own CPU), the nested page table that
        // mapped the RAM was freed by `settle`, and `stop_vm` detached the VM's devices (io::service::detach_vm)
        // before any of this could run.
        let ram = unsafe { vm.ram.take_frames() };
        *current = Some(InProgress {
            vm: slot.vm,
            released,
            ram_frames: ram.remaining(),
            ram,
        });
        RECLAIMING.store(true, Ordering::Release);
    }
    all
}

/// Retires slot `s`'s vCPU in the scheduler (its VM stopped): it is never picked or woken again and its baseline
/// utilisation goes back to its CPU's admission (at once, or at the end of the period its job ran in), while its
/// ledger and figures stay for reports and the management channel. Called on the vCPU's own CPU, between
/// decisions, so no uncharged decision of it is lost. Logs `vm <name>: released <ppm> ppm on cpuN` once per vCPU
/// (retiring again is a no-op and logs nothing).
fn retire(rt: &Runtime, s: usize) {
    let slot = &rt.slots[s];
    let now = rt.ns(tsc::rdtsc());
    let retired = rt.sched.lock().retire(slot.id, now);
    let name = &rt.vms[slot.vm].name;
    match retired {
        Ok(Some(r)) => {
            let wait_us = r.admissible_at_ns.saturating_sub(now) / 1000;
            console::log_deferred(
                log::Level::Info,
                "vm",
                format_args!(
                    "vm {name}: released {} ppm on cpu{} (vCPU {}; admissible in {wait_us} us; final balance {} ns)",
                    r.released_ppm, r.cpu, slot.index, r.balance_ns
                ),
            );
        }
        Ok(None) => {}
        Err(e) => log::error!("vm {name}: retiring vCPU {} refused: {e}", slot.index),
    }
}

/// A reclaim's RAM is waiting to be freed (checked without the lock on every iteration).
static RECLAIMING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Frees the in-progress reclaim's RAM until TSC `until` (at least one batch); when it is all back, logs
/// `vm <name>: reclaimed <N> KiB (<r> KiB RAM, <t> KiB tables, <c> KiB control pages); free frames <before> ->
/// <after>` (before: the allocator's count just before the VM's first frame was freed). Another CPU already
/// freeing is left alone.
fn reclaim_step(rt: &Runtime, until: u64) {
    if !RECLAIMING.load(Ordering::Acquire) {
        return;
    }
    let Some(mut current) = RECLAIM.try_lock() else {
        return;
    };
    let Some(p) = current.as_mut() else {
        return;
    };
    while p.ram.free_batch(RECLAIM_BATCH) > 0 && tsc::rdtsc() < until {}
    if p.ram.remaining() > 0 {
        return;
    }
    let after = crate::mm::frame::free_frames();
    let kib = |frames: u64| frames * 4;
    let r = p.released;
    let total = p.ram_frames + r.table_frames + r.control_frames;
    console::log_deferred(
        log::Level::Info,
        "vm",
        format_args!(
            "vm {}: reclaimed {} KiB ({} KiB RAM, {} KiB tables, {} KiB control pages); free frames {} -> {}",
            rt.vms[p.vm].name,
            kib(total),
            kib(p.ram_frames),
            kib(r.table_frames),
            kib(r.control_frames),
            r.free_before,
            after
        ),
    );
    *current = None;
    RECLAIMING.store(false, Ordering::Release);
    // VMs whose settling waited for this one go next.
    STOPS.fetch_add(1, Ordering::AcqRel);
}

/// End of the run: the slice trace of every VMX vCPU of this CPU that had a late exit.
fn trace_report(rt: &Runtime, mine: &[usize]) {
    for &s in mine {
        let slot = &rt.slots[s];
        let guard = slot.vcpu.lock();
        if let Some(v) = guard.as_ref().and_then(super::backend::BackendVcpu::as_vmx) {
            if v.late_exits() > 0 {
                v.trace_report(&alloc::format!(
                    "vm {} vCPU {}",
                    rt.vms[slot.vm].name,
                    slot.index
                ));
            }
        }
    }
}
