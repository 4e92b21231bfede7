//! Building the runtime at boot: configuration module, guest images, RAM, nested paging, admission, start.
//!
//! Boot modules are named by the last word of their command line with any directory and a trailing `.elf`
//! removed, so GRUB's `module2 /boot/burn.elf burn`, `module2 /boot/burn.elf` and QEMU's
//! `-initrd "/tmp/burn.elf burn"` all name the module `burn`. The configuration module is the one named
//! `vms.conf` (docs/vm-config.md).
//!
//! A VM that cannot be built (missing image, bad ELF, no memory, refused by admission control) is reported with
//! `CV:VMREFUSED name=... reason="..."` and the others still start.
//!
//! The I/O server (`io::server`): the host gets one with its first VM with volumes, on that VM's first vCPU's
//! CPU. Building that VM admits the server first (reservation from the configuration's `[host]` section), then
//! the VM's vCPUs; if either does not fit, the VM is refused with the scheduler's numbers and the I/O server's
//! share, and the server is removed again. Once a VM kept it, it stays for the rest of the run.

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
    report, runloop, BootModule, CpuStats, Runtime, Slot, Table, Vm, VmState, MAX_SLOTS, MAX_VMS,
    OVERRUN_BOUND_NS, RESERVE_PPM, RUNTIME,
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
    let (host_cfg, configs) = match virt::config::parse_file_bytes(module_bytes(config_module)) {
        Ok(c) => (c.host, c.vms),
        Err(e) => {
            refuse("-", format_args!("{CONFIG_MODULE}: {e}"));
            return Some(false);
        }
    };
    crate::io::server::set_spec(host_cfg.io_server);
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
        "VMRUNTIME backend={} cpus={} vms={} overrun_us={} io_server_us={}/{}",
        kind.name(),
        cpus,
        configs.len(),
        OVERRUN_BOUND_NS / 1000,
        host_cfg.io_server.budget_ns / 1000,
        host_cfg.io_server.period_ns / 1000
    );
    // With the management channel on, a VM with a volume may be created at run time: calibrating then (inside the
    // create, on CPU 0's run loop) held CPU 0's VMs off for ~7 s in QEMU, so a present controller is calibrated now.
    let volumes_later = crate::config().mgmt
        && !matches!(
            crate::io::nvme::controller(),
            crate::io::nvme::Probe::Absent
        );
    if configs.iter().any(|c| !c.volumes.is_empty()) || volumes_later {
        // Bring NVMe up and calibrate it (a few seconds of reads) before the runtime's clock starts; a failure is
        // reported here and again for each VM with a volume.
        let _ = crate::io::service::init();
    }
    let epoch = tsc::rdtsc();
    let modules: Vec<BootModule> = bi
        .modules
        .iter()
        .map(|m| BootModule {
            name: module_name(&m.cmdline).to_string(),
            bytes: module_bytes(m),
        })
        .collect();
    let mut vms = Vec::new();
    let mut slots = Vec::new();
    let mut all_started = true;
    for cfg in configs.iter().take(MAX_VMS) {
        let host = Host {
            modules: &modules,
            kind,
            tsc_hz,
            cpus,
            epoch,
        };
        match build_vm(&host, cfg, &mut sched, vms.len(), slots.len()) {
            Ok((vm, new_slots)) => {
                if slots.len() + new_slots.len() > MAX_SLOTS {
                    // vms.conf allows 64 VMs of 16 vCPUs, more than the table holds: the VMs past it are refused
                    // (admission would refuse most of them first on a host of a few CPUs). Its admission is undone
                    // with the VM, which is dropped here: it never ran.
                    all_started = false;
                    refuse(
                        &cfg.name,
                        format_args!("more than {MAX_SLOTS} vCPUs in all"),
                    );
                    continue;
                }
                slots.extend(new_slots);
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
    let vm_table = Table::with_capacity(MAX_VMS);
    let slot_table = Table::with_capacity(MAX_SLOTS);
    // Within capacity: the VMs are at most MAX_VMS (taken above) and their slots at most MAX_SLOTS (checked).
    if slot_table.append(slots).is_err() || vm_table.append(vms).is_err() {
        log::error!("vm: the boot VMs do not fit the runtime's tables");
        return Some(false);
    }
    let rt = RUNTIME.call_once(|| Runtime {
        kind,
        tsc_hz,
        epoch,
        sched: Mutex::new(sched),
        vms: vm_table,
        slots: slot_table,
        modules,
        create_lock: Mutex::new(()),
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
    crate::io::server::report(cpus);
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

/// Admits the host's I/O server on the CPU of `placement`'s first vCPU unless the host has one; returns the
/// server added, `(cpu, id)`, which [`build_vm`] publishes (`io::server::publish`) once the VM is built, so a run
/// loop never sees a server that is withdrawn again. On a refusal, explains with the numbers.
fn admit_io_servers(
    sched: &mut Scheduler,
    placement: &[u32],
    now_ns: u64,
) -> Result<Vec<(u32, VcpuId)>, String> {
    let cfg = crate::io::server::config();
    let mut added: Vec<(u32, VcpuId)> = Vec::new();
    if crate::io::server::any() {
        return Ok(added);
    }
    if let Some(&cpu) = placement.first() {
        match sched.add_vcpu(cpu, cfg, now_ns) {
            Ok(id) => added.push((cpu, id)),
            Err(e) => {
                return Err(format!(
                    "cpu{cpu}: the I/O server its volumes need ({}/{} us, {} ppm with the overrun allowance) does not fit: {e}",
                    cfg.budget_ns / 1000,
                    cfg.period_ns / 1000,
                    sched::cpu::admission::server_ppm(&cfg, sched.params())
                ));
            }
        }
    }
    Ok(added)
}

/// Removes I/O servers admitted for a VM that was not built after all (not published yet).
fn withdraw_io_servers(sched: &mut Scheduler, servers: &[(u32, VcpuId)]) {
    for &(_, id) in servers {
        // The id was just issued by add_vcpu; a refusal here only means it is gone already.
        let _ = sched.remove_vcpu(id);
    }
}

/// The part of a refusal on `cpu` that names the I/O server admitted there (published, or just admitted for
/// this VM), if any.
fn io_server_note(cpu: u32, servers: &[(u32, VcpuId)]) -> String {
    if crate::io::server::on_cpu(cpu).is_none() && !servers.iter().any(|&(c, _)| c == cpu) {
        return String::new();
    }
    let s = crate::io::server::spec();
    format!(
        " (the utilisation includes this CPU's I/O server, {}/{} us)",
        s.budget_ns / 1000,
        s.period_ns / 1000
    )
}

/// What building a VM needs from the host (at boot and for a VM created later).
struct Host<'a> {
    modules: &'a [BootModule],
    kind: Kind,
    tsc_hz: u64,
    cpus: usize,
    epoch: u64,
}

/// Access to the scheduler while building a VM: owned at boot, behind the runtime's lock afterwards (taken only
/// for admission and its undoing, never while RAM is zeroed).
trait SchedAccess {
    fn with<R>(&mut self, f: impl FnOnce(&mut Scheduler) -> R) -> R;
}

impl SchedAccess for Scheduler {
    fn with<R>(&mut self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        f(self)
    }
}

impl SchedAccess for &Mutex<Scheduler> {
    fn with<R>(&mut self, f: impl FnOnce(&mut Scheduler) -> R) -> R {
        f(&mut self.lock())
    }
}

/// Why a VM was not built (each carries the message).
#[derive(Debug)]
pub enum BuildError {
    /// No boot module by the image's name.
    NoModule(String),
    /// Admission control (CPU or volume) refused it, or it names a CPU that is not online.
    Admission(String),
    /// Not enough memory.
    NoMemory(String),
    /// The image or the VM's devices could not be set up.
    Failed(String),
}

impl core::fmt::Display for BuildError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoModule(m) | Self::Admission(m) | Self::NoMemory(m) | Self::Failed(m) => {
                f.write_str(m)
            }
        }
    }
}

/// Creates VM `cfg` on the running runtime (the management channel's `CreateVmConfig`) and returns its id. The
/// scheduler lock is held only for admission; RAM is zeroed and the image loaded without it. The VM's slots, then
/// the VM, are published in the runtime's tables; each run loop takes the new vCPUs pinned to its CPU when it
/// sees the VM count change (creates the backend vCPU on its CPU, then wakes it), so the caller should kick the
/// other CPUs out of an idle halt. On error nothing of the VM stays admitted.
pub fn create_vm(rt: &Runtime, cfg: &VmConfig) -> Result<usize, BuildError> {
    let _creating = rt.create_lock.lock();
    if rt.vms.iter().any(|v| v.name == cfg.name) {
        return Err(BuildError::Failed(format!(
            "a VM named '{}' exists already on this host",
            cfg.name
        )));
    }
    let count = usize::try_from(cfg.vcpus).unwrap_or(usize::MAX);
    if rt.vms.len() >= rt.vms.capacity()
        || count > rt.slots.capacity().saturating_sub(rt.slots.len())
    {
        return Err(BuildError::Admission(format!(
            "this host holds at most {} VMs and {} vCPUs ({} and {} in use)",
            rt.vms.capacity(),
            rt.slots.capacity(),
            rt.vms.len(),
            rt.slots.len()
        )));
    }
    let host = Host {
        modules: &rt.modules,
        kind: rt.kind,
        tsc_hz: rt.tsc_hz,
        cpus: rt.cpus,
        epoch: rt.epoch,
    };
    let index = rt.vms.len();
    let (vm, slots) = build_vm(&host, cfg, &mut &rt.sched, index, rt.slots.len())?;
    // Not runnable in the scheduler yet: each vCPU's own CPU creates its backend vCPU, then wakes it (a blocked
    // slot due at time 0).
    for slot in &slots {
        slot.wake_at.store(0, Ordering::Relaxed);
        slot.blocked.store(true, Ordering::Relaxed);
    }
    log::info!(
        "vm {}: created over the management channel as VM {index}: {} MiB, {} vCPU(s), baseline {}/{} us, image '{}'",
        vm.name,
        cfg.memory_bytes >> 20,
        cfg.vcpus,
        cfg.sched.budget_ns / 1000,
        cfg.sched.period_ns / 1000,
        cfg.image
    );
    // Capacity was checked above under the creation lock, the only path that appends.
    if rt.slots.append(slots).is_err() || rt.vms.append(alloc::vec![vm]).is_err() {
        return Err(BuildError::Failed(String::from(
            "the runtime's tables are full",
        )));
    }
    Ok(index)
}

/// Builds one VM: image, RAM, boot structures, nested paging, admission. Returns the VM and its slots (numbered
/// from `first_slot`). On error nothing of it stays admitted (its RAM frames are returned unless the backend
/// already mapped them).
fn build_vm<S: SchedAccess>(
    host: &Host<'_>,
    cfg: &VmConfig,
    sched: &mut S,
    vm_index: usize,
    first_slot: usize,
) -> Result<(Vm, Vec<Slot>), BuildError> {
    let (kind, tsc_hz, cpus, epoch) = (host.kind, host.tsc_hz, host.cpus, host.epoch);
    let tsc_khz = u32::try_from(tsc_hz / 1000).unwrap_or(u32::MAX);
    let image = host
        .modules
        .iter()
        .find(|m| m.name == cfg.image)
        .ok_or_else(|| {
            BuildError::NoModule(format!(
                "no boot module named '{}' (line {})",
                cfg.image, cfg.line
            ))
        })?;
    if let Some(cpu) = cfg.cpu {
        if usize::try_from(cpu).map_or(true, |c| c >= cpus) {
            return Err(BuildError::Admission(format!(
                "cpu = {cpu} (line {}), but only {cpus} CPU(s) are online",
                cfg.line
            )));
        }
    }
    // Admission first: it is cheap and needs no memory.
    let vcfg = vcpu_config(cfg);
    let count = usize::try_from(cfg.vcpus).unwrap_or(0);
    let now_ns = super::ticks_to_ns(tsc::rdtsc().saturating_sub(epoch), tsc_hz);
    let admitted = sched.with(|sched| {
        let placement: Vec<u32> = match cfg.cpu {
            Some(c) => alloc::vec![c; count],
            None => sched
                .place(&alloc::vec![vcfg; count])
                .map_err(|e| format!("{e}"))?,
        };
        // The I/O servers its volumes need, first (they are part of the configuration the check admits).
        let servers = if cfg.volumes.is_empty() {
            Vec::new()
        } else {
            admit_io_servers(sched, &placement, now_ns)?
        };
        let mut ids: Vec<VcpuId> = Vec::new();
        for &cpu in &placement {
            match sched.add_vcpu(cpu, vcfg, now_ns) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        let _ = sched.remove_vcpu(id);
                    }
                    let beside = io_server_note(cpu, &servers);
                    withdraw_io_servers(sched, &servers);
                    return Err(format!("cpu{cpu}: {e}{beside}"));
                }
            }
        }
        Ok((placement, ids, servers))
    });
    let (placement, ids, servers) = admitted.map_err(BuildError::Admission)?;
    // Volumes next: admission control of their IOPS commitments (a refused volume refuses the VM).
    let devices = match super::devices::build(vm_index, cfg) {
        Ok(d) => d,
        Err(why) => {
            sched.with(|sched| {
                for &id in &ids {
                    let _ = sched.remove_vcpu(id);
                }
                withdraw_io_servers(sched, &servers);
            });
            return Err(BuildError::Admission(why));
        }
    };
    let unadmit = |sched: &mut S, ids: &[VcpuId]| {
        sched.with(|sched| {
            for &id in ids {
                let _ = sched.remove_vcpu(id);
            }
            withdraw_io_servers(sched, &servers);
        });
        crate::io::service::remove_vm(vm_index);
    };

    let mut ram = match GuestRam::new(cfg.memory_bytes) {
        Ok(r) => r,
        Err(e) => {
            unadmit(sched, &ids);
            return Err(BuildError::NoMemory(format!(
                "{} MiB of RAM wanted, {} MiB free",
                e.wanted_pages >> 8,
                e.free_pages >> 8
            )));
        }
    };
    let params = BootParams {
        name: &cfg.name,
        args: &cfg.args,
        vcpu_count: cfg.vcpus,
        tsc_hz,
    };
    let entry = match loader::load_with_devices(image.bytes, &mut ram, &params, &devices) {
        Ok(e) => e,
        Err(e) => {
            unadmit(sched, &ids);
            // SAFETY: nothing maps this RAM yet.
            unsafe { ram.release() };
            return Err(BuildError::Failed(format!("image '{}': {e}", cfg.image)));
        }
    };
    let backend = match VmBackend::new(kind, &ram) {
        Ok(b) => b,
        Err(e) => {
            unadmit(sched, &ids);
            // The partly built nested table is dropped with the error; keep the frames out of the allocator
            // rather than reason about what it still referenced.
            return Err(BuildError::NoMemory(format!("{e}")));
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
            return Err(BuildError::Failed(format!("device window: {e}")));
        }
    }
    super::devices::attach(vm_index, &ram);
    let slots = (0u32..)
        .zip(ids.iter().zip(&placement))
        .map(|(index, (&id, &cpu))| Slot {
            vm: vm_index,
            index,
            id,
            cpu,
            vcpu: Mutex::new(None),
            blocked: AtomicBool::new(false),
            wake_at: AtomicU64::new(NO_WAKE),
            slices: AtomicU64::new(0),
        })
        .collect();
    let vm = Vm {
        name: cfg.name.to_string(),
        ctx: Mutex::new(ctx),
        // Guest TSC 0 is the start of the vCPUs' first baseline period (docs/guest-abi.md), so a real-time guest
        // can align its job releases with the periods in which its baseline is guaranteed.
        tsc_offset: 0u64.wrapping_sub(epoch.saturating_add(super::ns_to_ticks(now_ns, tsc_hz))),
        ram,
        backend,
        entry,
        state: Mutex::new(VmState::Running),
        slots: first_slot..first_slot + count,
        image: cfg.image.to_string(),
        paused: AtomicBool::new(false),
    };
    for &(cpu, id) in &servers {
        crate::io::server::publish(cpu, Some(id));
    }
    Ok((vm, slots))
}
