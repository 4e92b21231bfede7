//! What a backend provides for one virtual CPU.
//!
//! The exit handlers are written against this trait; the kernel's VMX and SVM backends implement it, and the host
//! tests implement it with a fake. RIP, RSP and RAX live in the VMCS/VMCB on some vendors and in the saved register
//! block on others; the trait hides that.

use crate::exit::{EntryFailure, VmExit};

/// General-purpose registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gpr {
    Rax,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

/// One virtual CPU as the vendor-neutral layer sees it.
pub trait Vcpu {
    /// Enters the guest and runs it until an exit, or until the host TSC reaches `deadline_tsc` (then the exit is
    /// [`VmExit::SliceExpired`]; the backend arms the VMX-preemption timer or the LAPIC timer for it). A guest with
    /// interrupts disabled is still stopped at the deadline.
    fn run(&mut self, deadline_tsc: u64) -> Result<VmExit, EntryFailure>;

    /// Reads a general-purpose register.
    fn gpr(&self, reg: Gpr) -> u64;

    /// Writes a general-purpose register.
    fn set_gpr(&mut self, reg: Gpr, value: u64);

    /// Guest RIP.
    fn rip(&self) -> u64;

    /// Moves RIP past the instruction that caused the last exit (VMX exit-instruction length, SVM next-RIP when
    /// NRIPS is present, else EXITINFO2 for I/O or the known length of the intercepted instruction).
    fn skip_instruction(&mut self);

    /// Injects an exception at the next entry (e.g. #GP for a refused MSR, #UD).
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);

    /// The guest's TSC value for a host TSC value (host TSC plus the vCPU's TSC offset).
    fn guest_tsc(&self, host_tsc: u64) -> u64;
}
