//! The Intel VT-x backend: VMX operation per CPU, a VMCS per vCPU, EPT, and exit decoding into `virt::VmExit`.
//!
//! Layout: [`fields`] (typed VMCS encodings, SDM Appendix B), [`instr`] (VMX instructions with their failure
//! decoding), [`caps`] (capability MSRs, control adjustment), [`cpu`] (VMXON per CPU), [`ept`] (the kernel's table
//! memory for the shared nested-paging builder), [`vcpu`] (the VMCS set-up, the entry stub and `virt::Vcpu`),
//! [`exit`] (exit reasons, Appendix C), [`trace`] (the per-vCPU slice trace), [`dump`] (what a stop dump shows of a
//! vCPU) and [`selftest`] (a tiny guest proving
//! the path end to end).
//!
//! How the runtime uses it, on the CPU that will run the vCPU:
//! 1. guest memory: `ept::GuestPhysMap::new()`, then `map_range(gpa, hpa, len, Attrs::RAM)` per RAM chunk;
//! 2. `vcpu::VmxVcpu::new(&VcpuConfig { eptp: map.eptp(), entry, exception_bitmap: 0, tsc_offset })` with
//!    `entry` a `virt::entry::EntryState` (`EntryState::long_mode(..)`, or `vcpu::real_mode_entry(cs, ip, sp)`);
//!    the first vCPU built on a CPU executes VMXON there (`cpu::enable`, idempotent, may also be called early);
//! 3. loop `run(deadline_tsc)` and handle the `VmExit` through `virt::Vcpu`.
//!
//! Slice timing (issue 5's "Bochs VMX overrun", settled): `vcpu::VmxVcpu::run` arms the preemption timer with
//! `(deadline - rdtsc) >> IA32_VMX_MISC[4:0]`, read just before the VMWRITE, saturated to `u32::MAX` (a longer
//! deadline re-enters when the timer expires early); rounding down makes the exit at most one timer unit early, a
//! remainder below one unit arms 0, which exits before the first guest instruction (SDM Vol. 3C, "VMX-Preemption Timer"), and the
//! entry latency after the TSC read only makes the exit that much later. Bochs 2.7 implements the timer exactly
//! so (`bx_local_apic_c::set_vmx_preemption_timer` fires at `((now >> rate) + value) << rate` in its tick
//! domain, which is also its TSC; rate 0), delivers the exit at the next instruction boundary unless STI/MOV-SS
//! blocking is in force for one instruction (`handleAsyncEvent`), independent of IF, so a `cli; pause` spin is
//! preempted on time. On hardware the timer exit ranks below debug traps and above NMI-window exits and is not
//! blocked by IF (SDM Vol. 3C §25.2, "Other Causes of VM Exits"); Bochs's one-instruction deferral under STI/MOV-SS
//! blocking is harmless here. The one overrun seen (350 us at t=1.137 s, c8c593e) was the host's: Bochs's debug log shows
//! the `cli`-spinning VM's exit at exactly the armed value, then 19,000 host ticks before the next entry, spent
//! in `sched`'s `Scheduler::pick` growing its telemetry `VecDeque` from 2048 to 4096 records (a 136 KiB realloc
//! copy); the real-time vCPU's wake time passed meanwhile, so the next slice was entered with its deadline
//! already behind it (timer value 0) and reported as an overrun. Fixed in `sched` (the FIFO is reserved up front);
//! the same kernel with that fix has 0 overruns. [`trace`] keeps the per-vCPU entry/exit ring that tells these two
//! cases apart ("entered after its deadline" versus "timer late") and prints it at the end of a run.
//!
//! Reclaim: `vcpu::VmxVcpu::release` executes VMCLEAR on the vCPU's own CPU and frees its six frames (VMCS, MSR
//! bitmap, two I/O bitmaps, two MSR areas); the EPT is freed with the VM's `KernelNestedMap` once every vCPU is
//! gone (`vm::backend`). A later vCPU whose EPT root reuses a freed frame starts with INVEPT (and INVVPID).
//!
//! Invariants: a vCPU runs only on the CPU that created it (its VMCS is current there and never migrated); all
//! VMCS accesses happen on that CPU with interrupts in whatever state the caller chose (VMREAD/VMWRITE are not
//! interruptible state changes), and VM entry itself runs with interrupts disabled.

// The backend's API is wider than the self-test uses (reports, TSC offset, timer read-back, field tables kept
// complete per SDM table) until the VM runtime in kernel/src/vm is wired to it.
#![allow(dead_code)]

pub mod caps;
pub mod cpu;
pub mod dump;
pub mod entry;
pub mod ept;
pub mod exit;
pub mod fields;
pub mod instr;
pub mod selftest;
pub mod trace;
pub mod vcpu;

use virt::paging::MapError;

use self::caps::Unsupported;
use self::instr::{VmFail, WriteError};

/// Why VMX could not be enabled or a vCPU could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// CPUID.1:ECX.VMX = 0.
    NotSupported,
    /// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled.
    DisabledByFirmware,
    /// This CPU's logical id is beyond the per-CPU table.
    CpuIndex,
    /// A required feature is missing (EPT with 4-level WB walks, the preemption timer, ...).
    MissingFeature(&'static str),
    /// A required control bit is not allowed by the capability MSRs.
    Control(Unsupported),
    /// No frame for a VMX structure.
    OutOfMemory,
    /// VMXON failed.
    VmxOn(VmFail),
    /// VMCLEAR/VMPTRLD failed.
    Vmcs(VmFail),
    /// A VMWRITE during set-up failed.
    Write(WriteError),
    /// EPT construction failed.
    Ept(MapError),
}

impl From<WriteError> for VmxError {
    fn from(e: WriteError) -> Self {
        Self::Write(e)
    }
}

impl From<Unsupported> for VmxError {
    fn from(e: Unsupported) -> Self {
        Self::Control(e)
    }
}

impl From<MapError> for VmxError {
    fn from(e: MapError) -> Self {
        Self::Ept(e)
    }
}
