//! What a stop dump shows of an SVM vCPU (`vm::report::stop_dump`, docs/console.md "Triple-fault stop dump"):
//! the VMCB fields that tell a guest's own fault from a fault of the hypervisor or of the platform.
//!
//! Design: [`SvmVcpu::stop_lines`] hands each line to the caller, which prefixes the VM's name, so a dump stays one
//! console line per item. Everything is read from the VMCB as the last #VMEXIT left it, plus what the run path
//! remembered of the last VMRUN ([`super::vcpu::LastEntry`]): TLB_CONTROL is cleared after each exit, so only that
//! record still shows the value the faulting VMRUN used. Runs only on the stop path.

use super::vmcb::{Ctl32, Ctl64, Save64, Seg};
use super::SvmVcpu;

/// INT_CTL bits 7:0: the guest's virtual TPR (APM Vol. 2 §15.21.1).
const V_TPR_MASK: u64 = 0xff;
/// INT_CTL bit 8: a virtual interrupt is pending (§15.21.4).
const V_IRQ: u64 = 1 << 8;

impl SvmVcpu {
    /// The dump lines of this vCPU, each passed to `line` (the caller prefixes the VM's name):
    /// 1. `svm exit_int_info= event_inj= int_ctl= shadow= info1= info2= cs= ss= tr= gdtr= idtr=`: the exit and the
    ///    guest's descriptor state;
    /// 2. `svm cr2= exit_code= ncr3= asid= tlb_control= clean= v_tpr= v_irq= vmrun_tsc= exit_tsc= in_guest_ticks=`:
    ///    the guest's CR2, the nested-paging root and ASID the VMRUN used, TLB_CONTROL as the run path last wrote
    ///    it (before that VMRUN), the VMCB clean bits, the virtual-interrupt state, and the host TSC right before
    ///    the last VMRUN and right after its #VMEXIT (0 before the first entry).
    pub fn stop_lines(&self, line: &mut dyn FnMut(core::fmt::Arguments<'_>)) {
        let b = self.vmcb();
        let seg = |g: Seg| {
            let x = b.segment(g);
            (x.selector, x.attrib, x.limit, x.base)
        };
        line(format_args!(
            "svm exit_int_info={:#x} event_inj={:#x} int_ctl={:#x} shadow={:#x} info1={:#x} info2={:#x} cs={:x?} ss={:x?} tr={:x?} gdtr={:x?} idtr={:x?}",
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
        let last = self.last_entry();
        let int_ctl = b.ctl64(Ctl64::IntCtl);
        line(format_args!(
            "svm cr2={:#x} exit_code={:#x} ncr3={:#x} asid={} tlb_control={} clean={:#x} v_tpr={:#x} v_irq={} vmrun_tsc={} exit_tsc={} in_guest_ticks={}",
            b.save64(Save64::Cr2),
            b.ctl64(Ctl64::ExitCode),
            b.ctl64(Ctl64::NCr3),
            b.ctl32(Ctl32::GuestAsid),
            last.tlb_control,
            b.ctl32(Ctl32::CleanBits),
            int_ctl & V_TPR_MASK,
            u8::from(int_ctl & V_IRQ != 0),
            last.vmrun_tsc,
            last.exit_tsc,
            last.exit_tsc.wrapping_sub(last.vmrun_tsc),
        ));
    }

    /// The guest's IDTR base (for the dump's IDT-gate line).
    pub fn idtr_base(&self) -> u64 {
        self.vmcb().segment(Seg::Idtr).base
    }
}
