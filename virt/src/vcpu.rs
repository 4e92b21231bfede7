//! What a backend provides for one virtual CPU.
//!
//! The exit handlers are written against this trait; the kernel's VMX and SVM backends implement it, and the host
//! tests implement it with a fake. RIP, RSP and RAX live in the VMCS/VMCB on some vendors and in the saved register
//! block on others; the trait hides that. [`ControlState`] is the part of the system state the instruction
//! emulator (MMIO, string port I/O) needs to walk the guest's page tables and know its operand sizes.

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

impl Gpr {
    /// Every register in encoding order (ModRM/REX register number 0..=15).
    pub const ALL: [Self; 16] = [
        Self::Rax,
        Self::Rcx,
        Self::Rdx,
        Self::Rbx,
        Self::Rsp,
        Self::Rbp,
        Self::Rsi,
        Self::Rdi,
        Self::R8,
        Self::R9,
        Self::R10,
        Self::R11,
        Self::R12,
        Self::R13,
        Self::R14,
        Self::R15,
    ];
}

/// CR0.PE.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PSE: 4 MiB pages in 32-bit paging.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// EFER.LMA: IA-32e mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE: the XD bit of page-table entries is honoured.
pub const EFER_NXE: u64 = 1 << 11;
/// RFLAGS.DF: string instructions count down.
pub const RFLAGS_DF: u64 = 1 << 10;

/// The guest's paging and mode state, as the hardware holds it at the exit (VMCS guest-state area, SDM Vol. 3C
/// §25.4; VMCB state-save area, APM Vol. 2 Table B-2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub rflags: u64,
    /// CS.L: a 64-bit code segment (meaningful with EFER.LMA).
    pub cs_l: bool,
    /// CS.D/B: default operand and address size 32 (else 16) outside 64-bit mode.
    pub cs_db: bool,
    /// Current privilege level (SS.DPL on VMX, the VMCB's CPL on SVM).
    pub cpl: u8,
    /// Segment bases used to form linear addresses outside 64-bit mode (and for CS in real mode).
    pub cs_base: u64,
    pub ds_base: u64,
    pub es_base: u64,
}

impl ControlState {
    /// 64-bit mode: IA-32e mode with a 64-bit code segment.
    pub const fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0 && self.cs_l
    }
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

    /// Sets guest RIP after the layer above emulated an instruction (MMIO, string I/O); like
    /// [`Vcpu::skip_instruction`] it ends any STI / MOV SS interrupt shadow.
    fn set_rip(&mut self, rip: u64);

    /// The paging and mode state (CR0, CR3, CR4, EFER, RFLAGS, CS.L/D, CPL, segment bases); `None` if the
    /// backend cannot read it here (VMX: not on the vCPU's CPU).
    fn control_state(&self) -> Option<ControlState>;

    /// Moves RIP past the instruction that caused the last exit (VMX exit-instruction length, SVM next-RIP when
    /// NRIPS is present, else EXITINFO2 for I/O or the known length of the intercepted instruction).
    fn skip_instruction(&mut self);

    /// Injects an exception at the next entry (e.g. #GP for a refused MSR, #UD).
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);

    /// The guest's TSC value for a host TSC value (host TSC plus the vCPU's TSC offset).
    fn guest_tsc(&self, host_tsc: u64) -> u64;
}
