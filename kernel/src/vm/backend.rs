//! The backend a VM runs on, chosen once at boot from what `virt::detect` found: SVM (AMD-V with nested paging)
//! or VMX (Intel VT-x with EPT and the preemption timer). Nothing above this file knows which one runs.
//!
//! Design: [`VmBackend`] owns what a VM's vCPUs share (the nested page table and, on SVM, the MSR permission map)
//! and creates vCPUs; [`BackendVcpu`] implements `virt::Vcpu` by delegating to the vendor type. A backend that is
//! present but lacks a feature the runtime needs is reported by [`choose`] with the reason, and the kernel then
//! runs no VM.
//!
//! Invariants: the nested page table maps exactly the VM's RAM (guest-physical `[0, size)`), RWX write-back, and
//! lives as long as the backend value, which the runtime keeps for as long as any vCPU of the VM exists. A vCPU is
//! created on the CPU that will run it (a VMCS is current on one CPU only; the first VMX vCPU of a CPU executes
//! VMXON there, the first SVM vCPU sets EFER.SVME).

use alloc::sync::Arc;

use virt::entry::EntryState;
use virt::paging::{Attrs, MapError};
use virt::{ControlState, EntryFailure, Gpr, Vcpu, VmExit};

use super::ram::GuestRam;
use crate::virt::detect::VirtSupport;
use crate::virt::svm::{self, NptMap, SvmVcpu, SvmVm};
use crate::virt::vmx::{self, ept::GuestPhysMap, vcpu::VmxVcpu};

/// Which hardware backend runs guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Svm,
    Vmx,
}

impl Kind {
    /// Name for logs and markers.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Svm => "svm",
            Self::Vmx => "vmx",
        }
    }
}

/// The backend for this machine, or why no VM can run.
///
/// # Errors
/// A sentence naming what is missing.
pub fn choose(virt: &VirtSupport) -> Result<Kind, &'static str> {
    match virt {
        VirtSupport::Svm(c) if c.npt => Ok(Kind::Svm),
        VirtSupport::Svm(_) => Err("SVM without nested paging (NPT) cannot run guests"),
        VirtSupport::Vmx(c) if c.ept && c.preemption_timer => Ok(Kind::Vmx),
        VirtSupport::Vmx(_) => Err("VMX without EPT or the VMX-preemption timer cannot run guests"),
        VirtSupport::None(reason) => Err(reason),
    }
}

/// Why a VM or vCPU could not be set up on the backend.
#[derive(Clone, Copy, Debug)]
pub enum BackendError {
    /// Building the nested page table failed.
    Map(MapError),
    /// The SVM backend refused.
    Svm(svm::SvmError),
    /// The VMX backend refused.
    Vmx(vmx::VmxError),
}

impl core::fmt::Display for BackendError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Map(e) => write!(f, "nested page table: {e:?}"),
            Self::Svm(e) => write!(f, "SVM: {e:?}"),
            Self::Vmx(e) => write!(f, "VMX: {e:?}"),
        }
    }
}

/// What the vCPUs of one VM share on the backend.
#[derive(Debug)]
pub enum VmBackend {
    Svm {
        /// Kept alive for the VM's lifetime: the VMCBs point at it (never read after set-up, hence `_`).
        _npt: NptMap,
        vm: Arc<SvmVm>,
    },
    Vmx {
        /// Kept alive for the VM's lifetime: each VMCS holds its EPT pointer.
        ept: GuestPhysMap,
    },
}

impl VmBackend {
    /// Maps `ram` at guest-physical 0 on backend `kind`.
    ///
    /// # Errors
    /// No frames for the tables or maps.
    pub fn new(kind: Kind, ram: &GuestRam) -> Result<Self, BackendError> {
        match kind {
            Kind::Svm => {
                let mut npt = NptMap::new().map_err(BackendError::Map)?;
                for (gpa, hpa, len) in ram.ranges() {
                    npt.map_range(gpa, hpa, len, Attrs::RAM)
                        .map_err(BackendError::Map)?;
                }
                // SAFETY: the table maps only this VM's RAM frames and is stored next to the `SvmVm` in this value,
                // which outlives every vCPU created from it (the runtime keeps the `VmBackend` for as long as any
                // vCPU exists).
                let vm = unsafe { SvmVm::new(npt.ncr3(), &svm::backend_msr_allow_list()) }
                    .map_err(BackendError::Svm)?;
                Ok(Self::Svm { _npt: npt, vm })
            }
            Kind::Vmx => {
                let mut ept = GuestPhysMap::new().map_err(BackendError::Map)?;
                for (gpa, hpa, len) in ram.ranges() {
                    ept.map_range(gpa, hpa, len, Attrs::RAM)
                        .map_err(BackendError::Map)?;
                }
                Ok(Self::Vmx { ept })
            }
        }
    }

    /// A vCPU starting in `entry`, whose guest TSC is the host TSC plus `tsc_offset`. Call it on the CPU that
    /// will run the vCPU.
    ///
    /// # Errors
    /// No frames for the vCPU's structures, or (VMX) a missing feature or failed VMCS set-up.
    pub fn create_vcpu(
        &self,
        entry: &EntryState,
        tsc_offset: u64,
    ) -> Result<BackendVcpu, BackendError> {
        match self {
            Self::Svm { vm, .. } => {
                let mut vcpu = SvmVcpu::new(vm, entry).map_err(BackendError::Svm)?;
                vcpu.set_tsc_offset(tsc_offset);
                Ok(BackendVcpu::Svm(vcpu))
            }
            Self::Vmx { ept } => {
                let config = vmx::vcpu::VcpuConfig {
                    eptp: ept.eptp(),
                    entry: *entry,
                    exception_bitmap: 0,
                    tsc_offset,
                };
                VmxVcpu::new(&config)
                    .map(BackendVcpu::Vmx)
                    .map_err(BackendError::Vmx)
            }
        }
    }
}

/// One vCPU on whichever backend runs.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per vCPU, stored in place; boxing would only add an indirection
pub enum BackendVcpu {
    Svm(SvmVcpu),
    Vmx(VmxVcpu),
}

impl BackendVcpu {
    fn inner(&self) -> &dyn Vcpu {
        match self {
            Self::Svm(v) => v,
            Self::Vmx(v) => v,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Vcpu {
        match self {
            Self::Svm(v) => v,
            Self::Vmx(v) => v,
        }
    }
}

impl Vcpu for BackendVcpu {
    fn run(&mut self, deadline_tsc: u64) -> Result<VmExit, EntryFailure> {
        self.inner_mut().run(deadline_tsc)
    }

    fn gpr(&self, reg: Gpr) -> u64 {
        self.inner().gpr(reg)
    }

    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.inner_mut().set_gpr(reg, value);
    }

    fn rip(&self) -> u64 {
        self.inner().rip()
    }

    fn set_rip(&mut self, rip: u64) {
        self.inner_mut().set_rip(rip);
    }

    fn control_state(&self) -> Option<ControlState> {
        self.inner().control_state()
    }

    fn skip_instruction(&mut self) {
        self.inner_mut().skip_instruction();
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.inner_mut().inject_exception(vector, error_code);
    }

    fn guest_tsc(&self, host_tsc: u64) -> u64 {
        self.inner().guest_tsc(host_tsc)
    }
}
