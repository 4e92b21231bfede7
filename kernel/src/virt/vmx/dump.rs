//! What a stop dump shows of a VMX vCPU (`vm::report::stop_dump`, docs/console.md "Triple-fault stop dump"): the
//! VMCS fields and the run path's record of the last entry that tell a guest's own fault from a fault of the
//! hypervisor or of the platform; the VMX counterpart of `svm::dump`.
//!
//! Design: [`VmxVcpu::stop_lines`] hands each line to the caller, which prefixes the VM's name, so a dump stays one
//! console line per item. The VMCS is read on the vCPU's own CPU (the stop path runs there, right after the exit);
//! elsewhere, or if the VMCS cannot be made current, the line says so instead of showing made-up values. What the
//! VMCS does not keep (the guest's CR2, the injected event whose valid bit entry cleared, the host TSCs) comes from
//! [`super::vcpu::LastEntry`]. Runs only on the stop path.

use super::fields::{Guest16, Guest32, GuestNat};
use super::instr::{self, VmFail};
use super::vcpu::VmxVcpu;

/// The guest's descriptor state: (selector, access rights, limit, base) of CS, SS and TR, (limit, base) of GDTR
/// and IDTR.
type Descriptors = [(u64, u64, u64, u64); 5];

impl VmxVcpu {
    /// The dump lines of this vCPU, each passed to `line` (the caller prefixes the VM's name):
    /// 1. `vmx exit_reason= qualification= exit_intr_info= idt_vectoring= injected= interruptibility= activity=
    ///    pending_dbg= cs= ss= tr= gdtr= idtr=`: the exit, the event it interrupted (error code in bits 63:32), the
    ///    event last injected, the guest's blocking and activity state, and its descriptor state;
    /// 2. `vmx cr2= eptp= vpid= entry_tsc= exit_tsc= in_guest_ticks=`: the guest's CR2 (saved by the run path),
    ///    the EPT pointer and VPID, and the host TSC right before the last entry and right after its exit.
    pub fn stop_lines(&self, line: &mut dyn FnMut(core::fmt::Arguments<'_>)) {
        let last = self.last_entry();
        let info = self.last_exit();
        match self.vmcs_state() {
            Some((blocking, activity, pending_dbg, d)) => line(format_args!(
                "vmx exit_reason={:#x} qualification={:#x} exit_intr_info={:#x} idt_vectoring={:#x} injected={:#x} interruptibility={blocking:#x} activity={activity} pending_dbg={pending_dbg:#x} cs={:x?} ss={:x?} tr={:x?} gdtr={:x?} idtr={:x?}",
                info.reason,
                info.qualification,
                info.interruption_info,
                last.idt_vectoring,
                last.injected,
                d[0],
                d[1],
                d[2],
                (d[3].2, d[3].3),
                (d[4].2, d[4].3),
            )),
            None => line(format_args!(
                "vmx exit_reason={:#x} qualification={:#x} idt_vectoring={:#x} injected={:#x} (VMCS not readable: off the vCPU's CPU or a VMREAD failed)",
                info.reason, info.qualification, last.idt_vectoring, last.injected
            )),
        }
        line(format_args!(
            "vmx cr2={:#x} eptp={:#x} vpid={} entry_tsc={} exit_tsc={} in_guest_ticks={}",
            last.cr2,
            self.eptp(),
            self.vpid(),
            last.entry_tsc,
            last.exit_tsc,
            last.exit_tsc.wrapping_sub(last.entry_tsc),
        ));
    }

    /// The guest's IDTR base (for the dump's IDT-gate line); `None` off the vCPU's CPU.
    pub fn idtr_base(&self) -> Option<u64> {
        self.guest_field(GuestNat::IdtrBase)
    }

    /// Interruptibility, activity state, pending debug exceptions and descriptor state from the VMCS; `None` off
    /// the vCPU's CPU or when a VMREAD fails.
    fn vmcs_state(&self) -> Option<(u32, u32, u64, Descriptors)> {
        self.make_current_here()?;
        self.read_vmcs_state().ok()
    }

    fn read_vmcs_state(&self) -> Result<(u32, u32, u64, Descriptors), VmFail> {
        let r32 = |f: Guest32| instr::read32(f).map(u64::from);
        let sel = |f: Guest16| instr::read16(f).map(u64::from);
        let d = [
            (
                sel(Guest16::CsSelector)?,
                r32(Guest32::CsAccessRights)?,
                r32(Guest32::CsLimit)?,
                instr::read_nat(GuestNat::CsBase)?,
            ),
            (
                sel(Guest16::SsSelector)?,
                r32(Guest32::SsAccessRights)?,
                r32(Guest32::SsLimit)?,
                instr::read_nat(GuestNat::SsBase)?,
            ),
            (
                sel(Guest16::TrSelector)?,
                r32(Guest32::TrAccessRights)?,
                r32(Guest32::TrLimit)?,
                instr::read_nat(GuestNat::TrBase)?,
            ),
            (
                0,
                0,
                r32(Guest32::GdtrLimit)?,
                instr::read_nat(GuestNat::GdtrBase)?,
            ),
            (
                0,
                0,
                r32(Guest32::IdtrLimit)?,
                instr::read_nat(GuestNat::IdtrBase)?,
            ),
        ];
        Ok((
            instr::read32(Guest32::InterruptibilityState)?,
            instr::read32(Guest32::ActivityState)?,
            instr::read_nat(GuestNat::PendingDebugExceptions)?,
            d,
        ))
    }
}
