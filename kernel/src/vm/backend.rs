//! The backend a VM runs on, chosen once at boot from what `virt::detect` found: SVM (AMD-V with nested paging)
//! or VMX (Intel VT-x with EPT and the preemption timer). Nothing above this file knows which one runs.
//!
//! Design: [`VmBackend`] owns what a VM's vCPUs share (the nested page table and, on SVM, the MSR permission map)
//! and creates vCPUs; [`BackendVcpu`] implements `virt::Vcpu` by delegating to the vendor type. A backend that is
//! present but lacks a feature the runtime needs is reported by [`choose`] with the reason, and the kernel then
//! runs no VM.
//!
//! Reclaim (a stopped VM): each vCPU is handed back with [`VmBackend::settle`] on the CPU it ran on, which drops it
//! there (VMX: VMCLEAR on its own CPU, then its VMCS, bitmaps and MSR areas are freed; SVM: its VMCB). When the
//! last vCPU of the VM has settled, the same call frees the shared part (the nested page table, and on SVM the
//! MSR permission map once no VMCB refers to it) and reports every frame it returned ([`Released`]); the caller
//! then frees the RAM (`GuestRam::reclaim`). After that [`VmBackend::create_vcpu`] refuses.
//!
//! Invariants: the nested page table maps exactly the VM's RAM (guest-physical `[0, size)`), RWX write-back, and
//! lives until every vCPU of the VM has settled. A vCPU is created on the CPU that will run it (a VMCS is current
//! on one CPU only; the first VMX vCPU of a CPU executes VMXON there, the first SVM vCPU sets EFER.SVME), and
//! settled on that CPU. A new vCPU whose EPT root reuses a reclaimed table frame starts with INVEPT/INVVPID on its
//! CPU (`vmx::vcpu`), so no translation of the reclaimed VM survives into it; SVM flushes by ASID assignment.

use alloc::collections::BTreeSet;
use alloc::sync::Arc;

use spin::Mutex;
use virt::entry::EntryState;
use virt::paging::{Attrs, MapError};
use virt::{ControlState, EntryFailure, Gpr, Vcpu, VmExit};

use super::ram::GuestRam;
use crate::mm::frame;
use crate::virt::detect::VirtSupport;
use crate::virt::svm::{self, NptMap, SvmVcpu, SvmVm};
use crate::virt::vmx::{self, ept::GuestPhysMap, vcpu::VmxVcpu};

/// Frames an SVM vCPU holds: its VMCB (`svm::vmcb::Vmcb::new`, one frame, freed by its `Drop`).
const SVM_VCPU_FRAMES: u64 = 1;
/// Frames an SVM VM holds besides its NPT: the MSR permission map (`svm::permission`, two frames, freed by its
/// `Drop` with the last reference to the `SvmVm`). The tests check both figures against the allocator's count.
const SVM_VM_FRAMES: u64 = 2;

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
    /// The VM was stopped and its memory reclaimed.
    Released,
}

impl core::fmt::Display for BackendError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Map(e) => write!(f, "nested page table: {e:?}"),
            Self::Svm(e) => write!(f, "SVM: {e:?}"),
            Self::Vmx(e) => write!(f, "VMX: {e:?}"),
            Self::Released => f.write_str("the VM's memory has been reclaimed"),
        }
    }
}

/// What the vCPUs of one VM share on the backend.
#[derive(Debug)]
enum Shared {
    Svm {
        /// The VMCBs point at it (nCR3).
        npt: NptMap,
        vm: Arc<SvmVm>,
    },
    Vmx {
        /// Each VMCS holds its EPT pointer.
        ept: GuestPhysMap,
    },
}

/// Frames a reclaim returned, besides the RAM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Nested page-table frames.
    pub table_frames: u64,
    /// VMCS/VMCB, bitmaps, MSR areas and permission maps.
    pub control_frames: u64,
    /// The allocator's free count just before the first of these frames was freed.
    pub free_before: u64,
}

/// Reclaim bookkeeping.
#[derive(Debug, Default)]
struct Settle {
    /// vCPU indices handed back for good.
    done: BTreeSet<u32>,
    /// Control frames their drops freed.
    control_frames: u64,
    /// Free frames before the first settle.
    free_before: Option<u64>,
    /// Set once the shared part has been freed.
    released: bool,
}

/// A VM on the backend: what its vCPUs share, and their reclaim.
#[derive(Debug)]
pub struct VmBackend {
    /// `None` once released.
    shared: Mutex<Option<Shared>>,
    settle: Mutex<Settle>,
}

impl VmBackend {
    /// Maps `ram` at guest-physical 0 on backend `kind`.
    ///
    /// # Errors
    /// No frames for the tables or maps.
    pub fn new(kind: Kind, ram: &GuestRam) -> Result<Self, BackendError> {
        let shared = match kind {
            Kind::Svm => {
                let mut npt = NptMap::new().map_err(BackendError::Map)?;
                for (gpa, hpa, len) in ram.ranges() {
                    npt.map_range(gpa, hpa, len, Attrs::RAM)
                        .map_err(BackendError::Map)?;
                }
                // SAFETY: the table maps only this VM's RAM frames and is stored next to the `SvmVm` in this value,
                // which frees it only after every vCPU created from it has been dropped (`settle`).
                let vm = unsafe { SvmVm::new(npt.ncr3(), &svm::backend_msr_allow_list()) }
                    .map_err(BackendError::Svm)?;
                Shared::Svm { npt, vm }
            }
            Kind::Vmx => {
                let mut ept = GuestPhysMap::new().map_err(BackendError::Map)?;
                for (gpa, hpa, len) in ram.ranges() {
                    ept.map_range(gpa, hpa, len, Attrs::RAM)
                        .map_err(BackendError::Map)?;
                }
                Shared::Vmx { ept }
            }
        };
        Ok(Self {
            shared: Mutex::new(Some(shared)),
            settle: Mutex::new(Settle::default()),
        })
    }

    /// A vCPU starting in `entry`, whose guest TSC is the host TSC plus `tsc_offset`. Call it on the CPU that
    /// will run the vCPU.
    ///
    /// # Errors
    /// No frames for the vCPU's structures, (VMX) a missing feature or failed VMCS set-up, or the VM's memory was
    /// already reclaimed.
    pub fn create_vcpu(
        &self,
        entry: &EntryState,
        tsc_offset: u64,
    ) -> Result<BackendVcpu, BackendError> {
        let shared = self.shared.lock();
        match shared.as_ref().ok_or(BackendError::Released)? {
            Shared::Svm { vm, .. } => {
                let mut vcpu = SvmVcpu::new(vm, entry).map_err(BackendError::Svm)?;
                vcpu.set_tsc_offset(tsc_offset);
                Ok(BackendVcpu::Svm(vcpu))
            }
            Shared::Vmx { ept } => {
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

    /// True once vCPU `index` has been handed back with [`Self::settle`].
    pub fn is_settled(&self, index: u32) -> bool {
        let st = self.settle.lock();
        st.released || st.done.contains(&index)
    }

    /// True once the shared part has been freed (every vCPU settled).
    pub fn released(&self) -> bool {
        self.settle.lock().released
    }

    /// Hands vCPU `index` of a stopped VM with `vcpus` vCPUs back for good: drops `vcpu` (its backend value, if it
    /// was ever created) here, which must be the CPU it was created on. Idempotent per index. When this was the
    /// last of the VM's vCPUs, frees the shared part too and returns what was freed; the caller then owns the
    /// rest of the reclaim (the RAM). Returns `None` otherwise, and every later time.
    pub fn settle(&self, index: u32, vcpus: usize, vcpu: Option<BackendVcpu>) -> Option<Released> {
        let mut st = self.settle.lock();
        if st.released || !st.done.insert(index) {
            // Already settled (a repeated stop); a vCPU value given anyway is dropped here all the same.
            drop(vcpu);
            return None;
        }
        if st.free_before.is_none() {
            st.free_before = Some(frame::free_frames());
        }
        st.control_frames += vcpu.map_or(0, BackendVcpu::release);
        if st.done.len() < vcpus {
            return None;
        }
        st.released = true;
        let shared = self.shared.lock().take();
        let (table_frames, vm_frames) = match shared {
            None => (0, 0),
            Some(Shared::Vmx { ept }) => {
                let t = ept.table_frames();
                drop(ept);
                (t, 0)
            }
            Some(Shared::Svm { npt, vm }) => {
                let t = npt.table_frames();
                // The MSR permission map is freed with the last reference; every VMCB holding one is gone.
                let last = Arc::strong_count(&vm) == 1;
                drop(vm);
                drop(npt);
                (t, if last { SVM_VM_FRAMES } else { 0 })
            }
        };
        Some(Released {
            table_frames,
            control_frames: st.control_frames + vm_frames,
            free_before: st.free_before.unwrap_or(0),
        })
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
    /// Drops the vCPU here and returns the frames that freed (VMX: VMCLEAR first, which needs the vCPU's own CPU;
    /// off it the frames are leaked, logged, and not counted).
    fn release(self) -> u64 {
        match self {
            Self::Svm(v) => {
                drop(v);
                SVM_VCPU_FRAMES
            }
            Self::Vmx(v) => v.release(),
        }
    }

    /// The VMX vCPU, for its slice trace ([`VmxVcpu::trace_report`]).
    pub fn as_vmx(&self) -> Option<&VmxVcpu> {
        match self {
            Self::Vmx(v) => Some(v),
            Self::Svm(_) => None,
        }
    }

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
