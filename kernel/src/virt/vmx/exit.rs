//! VMX exit reasons (SDM Vol. 3D Appendix C, Table C-1) and their decoding into `virt::VmExit`.
//!
//! Design: [`ExitInfo`] is everything read from the VMCS after an exit, so [`decode`] is a pure function of it.
//! Operands the hardware gives are decoded here: the I/O qualification (SDM Vol. 3C §28.2.1, Table 28-5), the EPT
//! violation qualification and guest-physical address (Table 28-7), the interruption information of exception exits
//! (§25.9.2). Anything the vendor-neutral layer has no variant for is `Unhandled` with the raw reason and
//! qualification, so a report can name it ([`reason_name`]).

use virt::{AccessSize, IoAccess, IoDirection, MemAccess, VmExit};

use super::fields::intr_info;

/// Basic exit reasons (bits 15:0 of the exit-reason field).
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const VMCALL: u16 = 18;
    pub const CR_ACCESS: u16 = 28;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const INVALID_GUEST_STATE: u16 = 33;
    pub const MSR_LOADING: u16 = 34;
    pub const MACHINE_CHECK_DURING_ENTRY: u16 = 41;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIGURATION: u16 = 49;
    pub const PREEMPTION_TIMER: u16 = 52;
}

/// Bit 31 of the exit-reason field: the VM entry failed (SDM §25.9.1).
pub const ENTRY_FAILURE: u32 = 1 << 31;

/// The SDM's name of a basic exit reason (Appendix C).
pub fn reason_name(basic: u16) -> &'static str {
    match basic {
        0 => "exception or NMI",
        1 => "external interrupt",
        2 => "triple fault",
        3 => "INIT signal",
        4 => "SIPI",
        5 => "I/O SMI",
        6 => "other SMI",
        7 => "interrupt window",
        8 => "NMI window",
        9 => "task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        17 => "RSM",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "control-register access",
        29 => "MOV DR",
        30 => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "VM-entry failure: invalid guest state",
        34 => "VM-entry failure: MSR loading",
        36 => "MWAIT",
        37 => "monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "VM-entry failure: machine-check event",
        43 => "TPR below threshold",
        44 => "APIC access",
        45 => "virtualized EOI",
        46 => "access to GDTR or IDTR",
        47 => "access to LDTR or TR",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "VMX-preemption timer expired",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        56 => "APIC write",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "page-modification log full",
        63 => "XSAVES",
        64 => "XRSTORS",
        _ => "reserved exit reason",
    }
}

/// The VMCS exit-information fields of one exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// Full exit-reason field.
    pub reason: u32,
    pub qualification: u64,
    pub guest_physical: u64,
    pub interruption_info: u32,
    pub interruption_error: u32,
    pub instruction_len: u32,
}

impl ExitInfo {
    /// Bits 15:0.
    pub fn basic(&self) -> u16 {
        u16::try_from(self.reason & 0xFFFF).unwrap_or(u16::MAX)
    }
}

/// What an exception-or-NMI exit carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// A host NMI (NMI exiting): the host must handle it.
    Nmi,
    /// A guest exception.
    Exception { vector: u8, error_code: Option<u32> },
}

/// Decodes the interruption information of an exception-or-NMI exit.
pub fn delivered(info: &ExitInfo) -> Delivered {
    let kind = (info.interruption_info & intr_info::TYPE_MASK) >> intr_info::TYPE_SHIFT;
    let vector = u8::try_from(info.interruption_info & intr_info::VECTOR_MASK).unwrap_or(u8::MAX);
    if kind == intr_info::TYPE_NMI {
        return Delivered::Nmi;
    }
    let error_code = (info.interruption_info & intr_info::ERROR_CODE_VALID != 0)
        .then_some(info.interruption_error);
    Delivered::Exception { vector, error_code }
}

/// Decodes an I/O-instruction exit qualification (SDM Vol. 3C Table 28-5).
pub fn io_access(q: u64) -> Option<IoAccess> {
    // Bits 2:0 hold size - 1 (0, 1 or 3).
    let size = AccessSize::from_bytes(u8::try_from((q & 0b111) + 1).ok()?)?;
    Some(IoAccess {
        port: u16::try_from((q >> 16) & 0xFFFF).ok()?,
        size,
        direction: if q & (1 << 3) != 0 {
            IoDirection::In
        } else {
            IoDirection::Out
        },
        string: q & (1 << 4) != 0,
        rep: q & (1 << 5) != 0,
    })
}

/// Decodes an EPT-violation qualification (SDM Vol. 3C Table 28-7, bits 2:0).
pub fn ept_access(q: u64) -> MemAccess {
    MemAccess {
        read: q & 1 != 0,
        write: q & 2 != 0,
        execute: q & 4 != 0,
    }
}

/// Maps an exit (not an entry failure, and not an NMI, which the caller handles first) to a `VmExit`.
pub fn decode(info: &ExitInfo) -> VmExit {
    let unhandled = VmExit::Unhandled {
        code: u64::from(info.reason),
        info1: info.qualification,
        info2: info.guest_physical,
    };
    match info.basic() {
        reason::CPUID => VmExit::Cpuid,
        reason::RDMSR => VmExit::Rdmsr,
        reason::WRMSR => VmExit::Wrmsr,
        reason::IO_INSTRUCTION => io_access(info.qualification).map_or(unhandled, VmExit::Io),
        reason::EPT_VIOLATION => VmExit::NestedPageFault {
            gpa: info.guest_physical,
            access: ept_access(info.qualification),
        },
        reason::HLT => VmExit::Hlt,
        reason::VMCALL => VmExit::Hypercall,
        reason::PREEMPTION_TIMER => VmExit::SliceExpired,
        reason::EXTERNAL_INTERRUPT => VmExit::ExternalInterrupt,
        reason::TRIPLE_FAULT => VmExit::TripleFault,
        reason::EXCEPTION_OR_NMI => match delivered(info) {
            Delivered::Exception { vector, error_code } => VmExit::Exception { vector, error_code },
            Delivered::Nmi => VmExit::ExternalInterrupt,
        },
        _ => unhandled,
    }
}
