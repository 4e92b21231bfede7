//! The vendor-neutral VM exit: what a backend reports after each guest run.
//!
//! Backends map their exit codes here: VMX basic exit reasons (Intel SDM Vol. 3C, Appendix C) and SVM exit codes
//! (AMD APM Vol. 2, Appendix C). Where the hardware gives operands (I/O port, MSR write value, faulting
//! guest-physical address) the backend decodes them, so handlers never read vendor state.

/// Operand size of a port or MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessSize {
    Byte = 1,
    Word = 2,
    Dword = 4,
    Qword = 8,
}

impl AccessSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u8 {
        self as u8
    }

    /// The size for a byte count of 1, 2, 4 or 8.
    pub const fn from_bytes(bytes: u8) -> Option<Self> {
        match bytes {
            1 => Some(Self::Byte),
            2 => Some(Self::Word),
            4 => Some(Self::Dword),
            8 => Some(Self::Qword),
            _ => None,
        }
    }

    /// Mask of the low `bytes()` bytes.
    pub const fn mask(self) -> u64 {
        match self {
            Self::Qword => u64::MAX,
            other => (1u64 << (other.bytes() * 8)) - 1,
        }
    }
}

/// Direction of a port access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDirection {
    /// `IN`: the guest reads; the handler writes the result into RAX (low `size` bytes).
    In,
    /// `OUT`: the guest writes the low `size` bytes of RAX.
    Out,
}

/// A decoded port I/O exit (VMX exit qualification, SDM Vol. 3C Table 28-5; SVM EXITINFO1, APM Vol. 2 §15.10.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoAccess {
    pub port: u16,
    pub size: AccessSize,
    pub direction: IoDirection,
    /// `INS`/`OUTS`: the data is in guest memory at RDI/RSI, not in RAX.
    pub string: bool,
    /// `REP` prefix: RCX holds the count.
    pub rep: bool,
}

/// What kind of access caused a nested-paging fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemAccess {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
}

/// Why the guest stopped running. Register operands (CPUID leaf, MSR index, hypercall arguments) are read from the
/// [`crate::Vcpu`] by the handler, as the architecture defines them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// `CPUID` (leaf in EAX, sub-leaf in ECX).
    Cpuid,
    /// `RDMSR` (index in ECX; the result goes to EDX:EAX).
    Rdmsr,
    /// `WRMSR` (index in ECX, value in EDX:EAX).
    Wrmsr,
    /// Port I/O.
    Io(IoAccess),
    /// An access to guest-physical memory that nested paging does not map (EPT violation / NPF).
    NestedPageFault { gpa: u64, access: MemAccess },
    /// `HLT`.
    Hlt,
    /// `VMCALL` (Intel) or `VMMCALL` (AMD): the hypercall ABI of docs/guest-abi.md.
    Hypercall,
    /// The slice the scheduler granted has ended (VMX-preemption timer, or the LAPIC timer on SVM).
    SliceExpired,
    /// A host interrupt arrived while the guest ran (it has been acknowledged or is pending on the host).
    ExternalInterrupt,
    /// The guest triple-faulted (VMX exit reason 2, SVM `SHUTDOWN`).
    TripleFault,
    /// An intercepted guest exception.
    Exception { vector: u8, error_code: Option<u32> },
    /// An exit the backend decodes but the layer above does not handle; carries the raw vendor code and info for
    /// the report (the VM is stopped).
    Unhandled { code: u64, info1: u64, info2: u64 },
}

/// VM entry failed: the guest state or controls were rejected. The VM is stopped with this report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryFailure {
    /// VMX: `VMLAUNCH`/`VMRESUME` failed with an instruction error number (SDM Vol. 3C §31.4).
    VmxInstructionError(u32),
    /// VMX: entry failed on guest-state checks (exit reason 33/34 with the qualification, SDM Vol. 3C §27.8).
    VmxInvalidGuestState { reason: u32, qualification: u64 },
    /// SVM: `VMEXIT_INVALID` (APM Vol. 2 §15.5.1); `detail` names the consistency check the layer found violated,
    /// when it can tell.
    SvmInvalidState { detail: &'static str },
}
