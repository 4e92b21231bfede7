//! Detects VMX (Intel VT-x) or SVM (AMD-V) and the features the backends need.
//!
//! VMX: CPUID.1:ECX[5]; usable unless IA32_FEATURE_CONTROL is locked with "VMX outside SMX" clear (then the
//! firmware disabled it and only a reset can change that). Features come from the capability MSRs (Intel SDM
//! Vol. 3D, Appendix A): the allowed-1 halves of the (TRUE) pin-based, primary and secondary controls, and
//! IA32_VMX_EPT_VPID_CAP for a usable EPT (4-level walk, write-back).
//! SVM: CPUID 0x80000001:ECX[2]; usable unless VM_CR.SVMDIS is set (AMD APM Vol. 2, 15.4). Features from CPUID
//! 0x8000000A: EDX[0] nested paging, EDX[3] next-RIP save, EBX = number of ASIDs.

use crate::arch::x86_64::cpu;

const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
const VM_CR: u32 = 0xC001_0114;

/// VMX features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCaps {
    /// Extended page tables (4-level, write-back).
    pub ept: bool,
    /// Virtual-processor identifiers.
    pub vpid: bool,
    /// Unrestricted guest.
    pub unrestricted: bool,
    /// VMX-preemption timer.
    pub preemption_timer: bool,
    /// IA32_FEATURE_CONTROL was already locked by firmware.
    pub feature_control_locked: bool,
}

/// SVM features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmCaps {
    /// Nested paging.
    pub npt: bool,
    /// Next-RIP saved on #VMEXIT.
    pub nrips: bool,
    /// Number of ASIDs.
    pub asids: u32,
}

/// What this CPU offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtSupport {
    /// Intel VT-x.
    Vmx(VmxCaps),
    /// AMD-V.
    Svm(SvmCaps),
    /// Neither (the reason says why).
    None(&'static str),
}

impl VirtSupport {
    /// Short name for the banner.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Vmx(_) => "vmx",
            Self::Svm(_) => "svm",
            Self::None(_) => "none",
        }
    }
}

/// Allowed-1 settings (high half) of a VMX control capability MSR.
///
/// # Safety
/// VMX is supported (the capability MSRs exist).
unsafe fn allowed1(msr: u32) -> u32 {
    // SAFETY: forwarded to the caller.
    let v = unsafe { cpu::rdmsr(msr) };
    u32::try_from(v >> 32).unwrap_or(0)
}

fn detect_vmx() -> VirtSupport {
    // SAFETY: CPUID.1:ECX.VMX=1 was checked by the caller, so IA32_FEATURE_CONTROL and the VMX capability MSRs
    // exist.
    unsafe {
        let fc = cpu::rdmsr(cpu::IA32_FEATURE_CONTROL);
        let locked = fc & 1 != 0;
        if locked && fc & (1 << 2) == 0 {
            return VirtSupport::None(
                "VMX disabled by firmware (IA32_FEATURE_CONTROL locked without VMX outside SMX)",
            );
        }
        let basic = cpu::rdmsr(IA32_VMX_BASIC);
        let true_ctls = basic & (1 << 55) != 0;
        let (pin_msr, proc_msr) = if true_ctls {
            (IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS)
        } else {
            (IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS)
        };
        let pin = allowed1(pin_msr);
        let primary = allowed1(proc_msr);
        let secondary = if primary & (1 << 31) != 0 {
            allowed1(IA32_VMX_PROCBASED_CTLS2)
        } else {
            0
        };
        let ept_ctl = secondary & (1 << 1) != 0;
        let vpid_ctl = secondary & (1 << 5) != 0;
        let ept_cap = if ept_ctl || vpid_ctl {
            cpu::rdmsr(IA32_VMX_EPT_VPID_CAP)
        } else {
            0
        };
        let ept = ept_ctl && ept_cap & (1 << 6) != 0 && ept_cap & (1 << 14) != 0;
        VirtSupport::Vmx(VmxCaps {
            ept,
            vpid: vpid_ctl,
            // Unrestricted guest requires EPT (SDM 26.2.1.1).
            unrestricted: ept && secondary & (1 << 7) != 0,
            preemption_timer: pin & (1 << 6) != 0,
            feature_control_locked: locked,
        })
    }
}

fn detect_svm() -> VirtSupport {
    // SAFETY: CPUID 0x80000001:ECX.SVM=1 was checked by the caller, so VM_CR exists.
    let vm_cr = unsafe { cpu::rdmsr(VM_CR) };
    if vm_cr & (1 << 4) != 0 {
        return VirtSupport::None("SVM disabled by firmware (VM_CR.SVMDIS=1)");
    }
    if cpu::max_extended_leaf() < 0x8000_000A {
        return VirtSupport::None("SVM reported but CPUID leaf 0x8000000A is missing");
    }
    let r = cpu::cpuid(0x8000_000A, 0);
    VirtSupport::Svm(SvmCaps {
        npt: r.edx & 1 != 0,
        nrips: r.edx & (1 << 3) != 0,
        asids: r.ebx,
    })
}

/// Detects hardware virtualisation on this CPU.
pub fn detect() -> VirtSupport {
    if cpu::cpuid(1, 0).ecx & (1 << 5) != 0 {
        return detect_vmx();
    }
    if cpu::max_extended_leaf() >= 0x8000_0001 && cpu::cpuid(0x8000_0001, 0).ecx & (1 << 2) != 0 {
        return detect_svm();
    }
    VirtSupport::None("CPU reports neither VMX (CPUID.1:ECX[5]) nor SVM (CPUID.80000001h:ECX[2])")
}
