//! Building the runtime at boot: configuration module, guest images, RAM, nested paging, admission, start.
//!
//! Boot modules are named by the last word of their command line with any directory and a trailing `.elf`
//! removed, so GRUB's `module2 /boot/burn.elf burn`, `module2 /boot/burn.elf` and QEMU's
//! `-initrd "/tmp/burn.elf burn"` all name the module `burn`. The configuration module is the one named
//! `vms.conf` (docs/vm-config.md).
//!
//! A VM that cannot be built (missing image, bad ELF, no memory, refused by admission control) is reported with
//! `CV:VMREFUSED name=... reason="..."` and the others still start.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sched::cpu::{BurstMode, SchedParams, Scheduler, VcpuConfig, VcpuId};
use spin::Mutex;
use virt::config::{module_name, Burst, VmConfig};
use virt::cpuid::CpuidPolicy;
use virt::loader::{self, BootParams};
use virt::{VmContext, NO_WAKE};

use super::backend::{self, Kind, VmBackend};
use super::ram::GuestRam;
use super::{
    report, runloop, CpuStats, Runtime, Slot, Vm, VmState, OVERRUN_BOUND_NS, RESERVE_PPM, RUNTIME,
};
use crate::arch::x86_64::{cpu, lapic, paging, percpu, tsc};
use crate::boot::{BootInfo, Module};
use crate::console::Quoted;
use crate::marker;

/// Name of the configuration module.
pub const CONFIG_MODULE: &str = "vms.conf";

fn module_bytes(m: &Module) -> &'static [u8] {
    let len = usize::try_from(m.end.saturating_sub(m.start)).unwrap_or(0);
    // SAFETY: boot modules are reserved from the frame allocator for the kernel's lifetime and mapped by the
    // direct map; nothing writes them.
    unsafe { core::slice::from_raw_parts(paging::phys_to_virt(m.start), len) }
}

fn refuse(name: &str, reason: impl core::fmt::Display) {
    log::error!("vm {name}: not started: {reason}");
    marker!("VMREFUSED name={} reason={}", name, Quoted(reason));
}

/// Starts the VMs of the configuration module, if there is one, and runs them on every online CPU.
///
/// Returns `None` when there is no configuration module (nothing to run). Otherwise runs until `run_ms` has
/// passed (forever without it) and returns whether the runtime worked: every configured VM started and every
/// CPU left its loop in time. A VM stopping (even by its own fault) is not a runtime failure.
pub fn start(
    bi: &BootInfo,
    virt_support: &crate::virt::detect::VirtSupport,
    cpus: usize,
    run_ms: Option<u64>,
) -> Option<bool> {
    let config_module = bi
        .modules
        .iter()
        .find(|m| module_name(&m.cmdline) == CONFIG_MODULE)?;
    let kind = match backend::choose(virt_support) {
        Ok(k) => k,
        Err(reason) => {
            log::error!("vm: no VM will run: {reason}");
            marker!("VMRUNTIME backend=none reason={}", Quoted(reason));
            return Some(false);
        }
    };
    let configs = match virt::config::parse_bytes(module_bytes(config_module)) {
        Ok(c) => c,
        Err(e) => {
            refuse("-", format_args!("{CONFIG_MODULE}: {e}"));
            return Some(false);
        }
    };
    let tsc_hz = tsc::hz();
    let params = SchedParams {
        overrun_bound_ns: OVERRUN_BOUND_NS,
        reserve_ppm: RESERVE_PPM,
        ..SchedParams::default()
    };
    let mut sched = match Scheduler::new(cpus, params) {
        Ok(s) => s,
        Err(e) => {
            log::error!("vm: scheduler parameters refused: {e}");
            return Some(false);
        }
    };
    marker!(
        "VMRUNTIME backend={} cpus={} vms={} overrun_us={}",
        kind.name(),
        cpus,
        configs.len(),
        OVERRUN_BOUND_NS / 1000
    );
    if configs.iter().any(|c| !c.volumes.is_empty()) {
        // Bring NVMe up and calibrate it (a few seconds of reads) before the runtime's clock starts; a failure is
        // reported here and again for each VM with a volume.
        let _ = crate::io::service::init();
    }
    let epoch = tsc::rdtsc();
    let tsc_khz = u32::try_from(tsc_hz / 1000).unwrap_or(u32::MAX);
    let mut vms = Vec::new();
    let mut slots = Vec::new();
    let mut all_started = true;
    for cfg in &configs {
        match build_vm(
            bi,
            kind,
            cfg,
            tsc_hz,
            tsc_khz,
            &mut sched,
            cpus,
            epoch,
            vms.len(),
            &mut slots,
        ) {
            Ok(vm) => {
                log::info!(
                    "vm {}: {} MiB, {} vCPU(s) on cpu{}, baseline {}/{} us, image '{}' entry {:#x}",
                    vm.name,
                    cfg.memory_bytes >> 20,
                    cfg.vcpus,
                    slots.last().map_or(0, |s: &Slot| s.cpu),
                    cfg.sched.budget_ns / 1000,
                    cfg.sched.period_ns / 1000,
                    cfg.image,
                    vm.entry
                );
                vms.push(vm);
            }
            Err(reason) => {
                all_started = false;
                refuse(&cfg.name, reason);
            }
        }
    }
    let start_ns = super::ticks_to_ns(tsc::rdtsc().saturating_sub(epoch), tsc_hz);
    for slot in &slots {
        // Every vCPU starts runnable; the preemption hint is moot before any CPU runs.
        if let Err(e) = sched.wake(slot.id, start_ns) {
            log::error!("vm: wake of {:?} refused: {e}", slot.id);
        }
    }
    let rt = RUNTIME.call_once(|| Runtime {
        kind,
        tsc_hz,
        epoch,
        sched: Mutex::new(sched),
        vms,
        slots,
        cpus,
        cpu_stats: (0..cpus).map(|_| CpuStats::default()).collect(),
        done: AtomicBool::new(false),
        run_ms,
    });
    // Kick the APs out of their halt into `super::ap_main`'s loop.
    for id in 1..cpus {
        if let Some(p) = percpu::get(id) {
            lapic::send_fixed(p.apic_id.load(Ordering::Relaxed), lapic::IPI_VECTOR);
        }
    }
    let reporter_start = tsc::rdtsc();
    runloop::run_cpu(rt, 0);
    // The end of a run: let the other CPUs leave their loops (an idle CPU looks every IDLE_CHECK_NS).
    let finished = tsc::wait_until(2_000_000, || {
        rt.cpu_stats
            .iter()
            .all(|c| c.finished.load(Ordering::Acquire))
    });
    if !finished {
        log::error!("vm: not every CPU left its run loop within 2 s");
    }
    report::vm_lines(rt);
    report::summary(rt, reporter_start);
    crate::io::service::summary();
    Some(all_started && finished)
}

/// Maps a VM's scheduling fields to the scheduler's vCPU configuration.
fn vcpu_config(cfg: &VmConfig) -> VcpuConfig {
    let s = &cfg.sched;
    VcpuConfig {
        budget_ns: s.budget_ns,
        period_ns: s.period_ns,
        accrual_ns: s.accrual_ns,
        balance_cap_ns: s.balance_cap_ns,
        launch_balance_ns: s.launch_balance_ns,
        credit_lifetime_periods: None,
        burst_mode: match s.burst {
            Burst::Standard => BurstMode::Standard,
            Burst::Unlimited { overdraft_ns } => BurstMode::Unlimited {
                overdraft_limit_ns: overdraft_ns,
            },
        },
        weight: s.weight,
        cap_ppm: s.cap_ppm,
        pool: None,
    }
}

/// Builds one VM: image, RAM, boot structures, nested paging, admission. On error nothing of it stays admitted
/// (its RAM frames are returned unless the backend already mapped them).
#[allow(clippy::too_many_arguments)]
fn build_vm(
    bi: &BootInfo,
    kind: Kind,
    cfg: &VmConfig,
    tsc_hz: u64,
    tsc_khz: u32,
    sched: &mut Scheduler,
    cpus: usize,
    epoch: u64,
    vm_index: usize,
    slots: &mut Vec<Slot>,
) -> Result<Vm, String> {
    let image = bi
        .modules
        .iter()
        .find(|m| module_name(&m.cmdline) == cfg.image)
        .ok_or_else(|| {
            format!(
                "no boot module named '{}' (line {} of {CONFIG_MODULE})",
                cfg.image, cfg.line
            )
        })?;
    if let Some(cpu) = cfg.cpu {
        if usize::try_from(cpu).map_or(true, |c| c >= cpus) {
            return Err(format!(
                "cpu = {cpu} (line {}), but only {cpus} CPU(s) are online",
                cfg.line
            ));
        }
    }
    // Admission first: it is cheap and needs no memory.
    let vcfg = vcpu_config(cfg);
    let count = usize::try_from(cfg.vcpus).unwrap_or(0);
    let placement: Vec<u32> = match cfg.cpu {
        Some(c) => alloc::vec![c; count],
        None => sched
            .place(&alloc::vec![vcfg; count])
            .map_err(|e| format!("admission: {e}"))?,
    };
    let now_ns = super::ticks_to_ns(tsc::rdtsc().saturating_sub(epoch), tsc_hz);
    let mut ids: Vec<VcpuId> = Vec::new();
    for &cpu in &placement {
        match sched.add_vcpu(cpu, vcfg, now_ns) {
            Ok(id) => ids.push(id),
            Err(e) => {
                for id in ids {
                    let _ = sched.remove_vcpu(id);
                }
                return Err(format!("admission on cpu{cpu}: {e}"));
            }
        }
    }
    // Volumes next: admission control of their IOPS commitments (a refused volume refuses the VM).
    let devices = match super::devices::build(vm_index, cfg) {
        Ok(d) => d,
        Err(why) => {
            for id in ids {
                let _ = sched.remove_vcpu(id);
            }
            return Err(why);
        }
    };
    let unadmit = |sched: &mut Scheduler, ids: &[VcpuId]| {
        for &id in ids {
            let _ = sched.remove_vcpu(id);
        }
        crate::io::service::remove_vm(vm_index);
    };

    let mut ram = match GuestRam::new(cfg.memory_bytes) {
        Ok(r) => r,
        Err(e) => {
            unadmit(sched, &ids);
            return Err(format!(
                "{} MiB of RAM wanted, {} MiB free",
                e.wanted_pages >> 8,
                e.free_pages >> 8
            ));
        }
    };
    let params = BootParams {
        name: &cfg.name,
        args: &cfg.args,
        vcpu_count: cfg.vcpus,
        tsc_hz,
    };
    let entry = match loader::load_with_devices(module_bytes(image), &mut ram, &params, &devices) {
        Ok(e) => e,
        Err(e) => {
            unadmit(sched, &ids);
            // SAFETY: nothing maps this RAM yet.
            unsafe { ram.release() };
            return Err(format!("image '{}': {e}", cfg.image));
        }
    };
    let backend = match VmBackend::new(kind, &ram) {
        Ok(b) => b,
        Err(e) => {
            unadmit(sched, &ids);
            // The partly built nested table is dropped with the error; keep the frames out of the allocator
            // rather than reason about what it still referenced.
            return Err(format!("{e}"));
        }
    };
    let mut host_cpuid = |leaf: u32, sub: u32| {
        let r = cpu::cpuid(leaf, sub);
        virt::cpuid::CpuidResult {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        }
    };
    let policy = CpuidPolicy::from_host(&mut host_cpuid, tsc_khz);
    let mut ctx = VmContext::new(&cfg.name, cfg.vcpus, policy);
    ctx.set_ram_size(cfg.memory_bytes);
    for d in &devices {
        if let Err(e) = ctx.add_mmio_window(d.base, u64::from(d.size)) {
            unadmit(sched, &ids);
            // The backend's nested table maps this RAM; keep the frames out of the allocator (as above).
            return Err(format!("device window: {e}"));
        }
    }
    super::devices::attach(vm_index, &ram);
    let first = slots.len();
    for (index, (&id, &cpu)) in (0u32..).zip(ids.iter().zip(&placement)) {
        slots.push(Slot {
            vm: vm_index,
            index,
            id,
            cpu,
            vcpu: Mutex::new(None),
            blocked: AtomicBool::new(false),
            wake_at: AtomicU64::new(NO_WAKE),
            slices: AtomicU64::new(0),
        });
    }
    Ok(Vm {
        name: cfg.name.to_string(),
        ctx: Mutex::new(ctx),
        // Guest TSC 0 is the start of the vCPUs' first baseline period (docs/guest-abi.md), so a real-time guest
        // can align its job releases with the periods in which its baseline is guaranteed.
        tsc_offset: 0u64.wrapping_sub(epoch.saturating_add(super::ns_to_ticks(now_ns, tsc_hz))),
        ram,
        backend,
        entry,
        state: Mutex::new(VmState::Running),
        slots: first..first + count,
        image: cfg.image.to_string(),
        paused: AtomicBool::new(false),
    })
}
