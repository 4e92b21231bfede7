//! The Intel VT-x backend: VMX operation per CPU, a VMCS per vCPU, EPT, and exit decoding into `virt::VmExit`.
//!
//! Layout: [`fields`] (typed VMCS encodings, SDM Appendix B), [`instr`] (VMX instructions with their failure
//! decoding), [`caps`] (capability MSRs, control adjustment), [`cpu`] (VMXON per CPU), [`ept`] (the kernel's table
//! memory for the shared nested-paging builder), [`vcpu`] (the VMCS set-up, the entry stub and `virt::Vcpu`),
//! [`exit`] (exit reasons, Appendix C) and [`selftest`] (a tiny guest proving the path end to end).
//!
//! How the runtime uses it, on the CPU that will run the vCPU:
//! 1. guest memory: `ept::GuestPhysMap::new()`, then `map_range(gpa, hpa, len, Attrs::RAM)` per RAM chunk;
//! 2. `vcpu::VmxVcpu::new(&VcpuConfig { eptp: map.eptp(), entry, exception_bitmap: 0, tsc_offset })` with
//!    `entry` a `virt::entry::EntryState` (`EntryState::long_mode(..)`, or `vcpu::real_mode_entry(cs, ip, sp)`);
//!    the first vCPU built on a CPU executes VMXON there (`cpu::enable`, idempotent, may also be called early);
//! 3. loop `run(deadline_tsc)` and handle the `VmExit` through `virt::Vcpu`.
//!
//! Invariants: a vCPU runs only on the CPU that created it (its VMCS is current there and never migrated); all
//! VMCS accesses happen on that CPU with interrupts in whatever state the caller chose (VMREAD/VMWRITE are not
//! interruptible state changes), and VM entry itself runs with interrupts disabled.

// The backend's API is wider than the self-test uses (reports, TSC offset, timer read-back, field tables kept
// complete per SDM table) until the VM runtime in kernel/src/vm is wired to it.
#![allow(dead_code)]

pub mod caps;
pub mod cpu;
pub mod entry;
pub mod ept;
pub mod exit;
pub mod fields;
pub mod instr;
pub mod selftest;
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
