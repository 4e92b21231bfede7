//! VMCS field encodings, one enum per table of Intel SDM Vol. 3D Appendix B ("Field Encoding in VMCS"; Vol. 3C
//! Appendix B in editions before 2023), plus the control, exit-information and segment-access bit layouts this
//! backend uses (SDM Vol. 3C Chapter 25, "Virtual-Machine Control Structures").
//!
//! Design: a field's width is part of its type. [`Field16`], [`Field32`], [`Field64`] and [`FieldNat`] group the
//! per-table enums, so `vmcs::write32(Guest32::CsLimit, ..)` compiles and `vmcs::write32(Guest64::Efer, ..)` does
//! not. Only the fields this backend reads or writes are listed; the encodings are the SDM's, bit for bit.
//! 64-bit fields are accessed whole (the "full" encoding) in 64-bit mode, so the "high" encodings are omitted.

/// A VMCS field: its 32-bit encoding (the VMREAD/VMWRITE operand).
pub trait Field: Copy {
    /// The encoding.
    fn encoding(self) -> u32;
}

macro_rules! fields {
    ($(#[$meta:meta])* $name:ident: $width:ident { $($(#[$fmeta:meta])* $var:ident = $enc:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        #[allow(clippy::enum_variant_names)] // the SDM's names: every 16-bit guest field is a selector
        pub enum $name {
            $($(#[$fmeta])* $var = $enc,)*
        }
        impl Field for $name {
            fn encoding(self) -> u32 {
                self as u32
            }
        }
        impl $width for $name {}
    };
}

/// A 16-bit field.
pub trait Field16: Field {}
/// A 32-bit field.
pub trait Field32: Field {}
/// A 64-bit field.
pub trait Field64: Field {}
/// A natural-width field (64 bits on this host).
pub trait FieldNat: Field {}

fields! {
    /// 16-bit control fields (SDM Appendix B.1.1, Table B-1).
    Control16: Field16 {
        /// Virtual-processor identifier (§25.6.12).
        Vpid = 0x0000,
    }
}

fields! {
    /// 16-bit guest-state fields (SDM Appendix B.1.2, Table B-2).
    Guest16: Field16 {
        EsSelector = 0x0800,
        CsSelector = 0x0802,
        SsSelector = 0x0804,
        DsSelector = 0x0806,
        FsSelector = 0x0808,
        GsSelector = 0x080A,
        LdtrSelector = 0x080C,
        TrSelector = 0x080E,
    }
}

fields! {
    /// 16-bit host-state fields (SDM Appendix B.1.3, Table B-3).
    Host16: Field16 {
        EsSelector = 0x0C00,
        CsSelector = 0x0C02,
        SsSelector = 0x0C04,
        DsSelector = 0x0C06,
        FsSelector = 0x0C08,
        GsSelector = 0x0C0A,
        TrSelector = 0x0C0C,
    }
}

fields! {
    /// 64-bit control fields (SDM Appendix B.2.1, Table B-4).
    Control64: Field64 {
        /// I/O bitmap A, ports 0x0000-0x7FFF (§25.6.4).
        IoBitmapA = 0x2000,
        /// I/O bitmap B, ports 0x8000-0xFFFF.
        IoBitmapB = 0x2002,
        /// MSR bitmaps (§25.6.9).
        MsrBitmap = 0x2004,
        /// VM-exit MSR-store area (§25.7.2).
        ExitMsrStoreAddr = 0x2006,
        /// VM-exit MSR-load area.
        ExitMsrLoadAddr = 0x2008,
        /// VM-entry MSR-load area (§25.8.2).
        EntryMsrLoadAddr = 0x200A,
        /// TSC offset (§25.6.5).
        TscOffset = 0x2010,
        /// EPT pointer (§25.6.11).
        EptPointer = 0x201A,
    }
}

fields! {
    /// 64-bit read-only data fields (SDM Appendix B.2.2, Table B-5).
    ReadOnly64: Field64 {
        /// Guest-physical address of an EPT violation or misconfiguration (§25.9.1).
        GuestPhysicalAddress = 0x2400,
    }
}

fields! {
    /// 64-bit guest-state fields (SDM Appendix B.2.3, Table B-6).
    Guest64: Field64 {
        /// VMCS link pointer; all ones when unused (§25.4.2).
        VmcsLinkPointer = 0x2800,
        Debugctl = 0x2802,
        Pat = 0x2804,
        Efer = 0x2806,
    }
}

fields! {
    /// 64-bit host-state fields (SDM Appendix B.2.4, Table B-7).
    Host64: Field64 {
        Pat = 0x2C00,
        Efer = 0x2C02,
    }
}

fields! {
    /// 32-bit control fields (SDM Appendix B.3.1, Table B-8).
    Control32: Field32 {
        /// Pin-based VM-execution controls (§25.6.1, [`pin`]).
        PinBased = 0x4000,
        /// Primary processor-based VM-execution controls (§25.6.2, [`primary`]).
        PrimaryProcBased = 0x4002,
        /// Exception bitmap (§25.6.3).
        ExceptionBitmap = 0x4004,
        /// CR3-target count.
        Cr3TargetCount = 0x400A,
        /// VM-exit controls (§25.7.1, [`exit_ctl`]).
        ExitControls = 0x400C,
        ExitMsrStoreCount = 0x400E,
        ExitMsrLoadCount = 0x4010,
        /// VM-entry controls (§25.8.1, [`entry_ctl`]).
        EntryControls = 0x4012,
        EntryMsrLoadCount = 0x4014,
        /// VM-entry interruption-information field (§25.8.3).
        EntryInterruptionInfo = 0x4016,
        EntryExceptionErrorCode = 0x4018,
        EntryInstructionLength = 0x401A,
        /// Secondary processor-based VM-execution controls (§25.6.2, [`secondary`]).
        SecondaryProcBased = 0x401E,
    }
}

fields! {
    /// 32-bit read-only data fields (SDM Appendix B.3.2, Table B-9).
    ReadOnly32: Field32 {
        /// VM-instruction error (§31.4, decoded by `instr::InstructionError`).
        InstructionError = 0x4400,
        /// Exit reason (§25.9.1; basic reasons in Appendix C).
        ExitReason = 0x4402,
        /// VM-exit interruption information (§25.9.2).
        ExitInterruptionInfo = 0x4404,
        ExitInterruptionErrorCode = 0x4406,
        /// IDT-vectoring information (§25.9.3).
        IdtVectoringInfo = 0x4408,
        IdtVectoringErrorCode = 0x440A,
        /// VM-exit instruction length (§25.9.4).
        ExitInstructionLength = 0x440C,
        ExitInstructionInfo = 0x440E,
    }
}

fields! {
    /// 32-bit guest-state fields (SDM Appendix B.3.3, Table B-10).
    Guest32: Field32 {
        EsLimit = 0x4800,
        CsLimit = 0x4802,
        SsLimit = 0x4804,
        DsLimit = 0x4806,
        FsLimit = 0x4808,
        GsLimit = 0x480A,
        LdtrLimit = 0x480C,
        TrLimit = 0x480E,
        GdtrLimit = 0x4810,
        IdtrLimit = 0x4812,
        EsAccessRights = 0x4814,
        CsAccessRights = 0x4816,
        SsAccessRights = 0x4818,
        DsAccessRights = 0x481A,
        FsAccessRights = 0x481C,
        GsAccessRights = 0x481E,
        LdtrAccessRights = 0x4820,
        TrAccessRights = 0x4822,
        /// Interruptibility state (§25.4.2, Table 25-3).
        InterruptibilityState = 0x4824,
        /// Activity state (0 = active).
        ActivityState = 0x4826,
        SysenterCs = 0x482A,
        /// VMX-preemption timer value (§25.4.2, §26.5.1).
        PreemptionTimerValue = 0x482E,
    }
}

fields! {
    /// 32-bit host-state field (SDM Appendix B.3.4, Table B-11).
    Host32: Field32 {
        SysenterCs = 0x4C00,
    }
}

fields! {
    /// Natural-width control fields (SDM Appendix B.4.1, Table B-12).
    ControlNat: FieldNat {
        /// CR0 guest/host mask: bits set here are owned by the host (§25.6.6).
        Cr0GuestHostMask = 0x6000,
        Cr4GuestHostMask = 0x6002,
        /// What the guest reads for host-owned CR0 bits.
        Cr0ReadShadow = 0x6004,
        Cr4ReadShadow = 0x6006,
    }
}

fields! {
    /// Natural-width read-only data fields (SDM Appendix B.4.2, Table B-13).
    ReadOnlyNat: FieldNat {
        /// Exit qualification (§28.2.1).
        ExitQualification = 0x6400,
        /// Guest-linear address (§25.9.1).
        GuestLinearAddress = 0x640A,
    }
}

fields! {
    /// Natural-width guest-state fields (SDM Appendix B.4.3, Table B-14).
    GuestNat: FieldNat {
        Cr0 = 0x6800,
        Cr3 = 0x6802,
        Cr4 = 0x6804,
        EsBase = 0x6806,
        CsBase = 0x6808,
        SsBase = 0x680A,
        DsBase = 0x680C,
        FsBase = 0x680E,
        GsBase = 0x6810,
        LdtrBase = 0x6812,
        TrBase = 0x6814,
        GdtrBase = 0x6816,
        IdtrBase = 0x6818,
        Dr7 = 0x681A,
        Rsp = 0x681C,
        Rip = 0x681E,
        Rflags = 0x6820,
        PendingDebugExceptions = 0x6822,
        SysenterEsp = 0x6824,
        SysenterEip = 0x6826,
    }
}

fields! {
    /// Natural-width host-state fields (SDM Appendix B.4.4, Table B-15).
    HostNat: FieldNat {
        Cr0 = 0x6C00,
        Cr3 = 0x6C02,
        Cr4 = 0x6C04,
        FsBase = 0x6C06,
        GsBase = 0x6C08,
        TrBase = 0x6C0A,
        GdtrBase = 0x6C0C,
        IdtrBase = 0x6C0E,
        SysenterEsp = 0x6C10,
        SysenterEip = 0x6C12,
        Rsp = 0x6C14,
        Rip = 0x6C16,
    }
}

/// Pin-based VM-execution controls (SDM Vol. 3C §25.6.1, Table 25-5).
pub mod pin {
    /// External interrupts cause VM exits.
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    /// NMIs cause VM exits.
    pub const NMI_EXITING: u32 = 1 << 3;
    /// The VMX-preemption timer counts down in non-root operation.
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
}

/// Primary processor-based VM-execution controls (SDM Vol. 3C §25.6.2, Table 25-6).
pub mod primary {
    /// RDTSC/RDTSCP/RDMSR(TSC) add the TSC offset.
    pub const USE_TSC_OFFSETTING: u32 = 1 << 3;
    pub const HLT_EXITING: u32 = 1 << 7;
    /// I/O instructions consult the I/O bitmaps.
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    /// RDMSR/WRMSR consult the MSR bitmap.
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const ACTIVATE_SECONDARY: u32 = 1 << 31;
}

/// Secondary processor-based VM-execution controls (SDM Vol. 3C §25.6.2, Table 25-7).
pub mod secondary {
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const ENABLE_VPID: u32 = 1 << 5;
    /// Real mode and unpaged protected mode run natively (requires EPT).
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    pub const ENABLE_XSAVES: u32 = 1 << 20;
}

/// VM-exit controls (SDM Vol. 3C §25.7.1, Table 25-13).
pub mod exit_ctl {
    pub const SAVE_DEBUG_CONTROLS: u32 = 1 << 2;
    /// The host runs in 64-bit mode after the exit.
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_EFER: u32 = 1 << 21;
    /// The preemption-timer value is saved on exit.
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
}

/// VM-entry controls (SDM Vol. 3C §25.8.1, Table 25-15).
pub mod entry_ctl {
    pub const LOAD_DEBUG_CONTROLS: u32 = 1 << 2;
    /// The guest runs in IA-32e mode after entry.
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const LOAD_PAT: u32 = 1 << 14;
    pub const LOAD_EFER: u32 = 1 << 15;
}

/// Interruption-information format shared by VM-entry injection, VM-exit interruption information and
/// IDT-vectoring information (SDM Vol. 3C §25.8.3, Table 25-17; §25.9.2, Table 25-19).
pub mod intr_info {
    pub const VECTOR_MASK: u32 = 0xFF;
    pub const TYPE_SHIFT: u32 = 8;
    pub const TYPE_MASK: u32 = 0b111 << TYPE_SHIFT;
    pub const TYPE_EXTERNAL: u32 = 0;
    pub const TYPE_NMI: u32 = 2;
    pub const TYPE_HARDWARE_EXCEPTION: u32 = 3;
    pub const TYPE_SOFTWARE_INTERRUPT: u32 = 4;
    pub const TYPE_PRIVILEGED_SOFTWARE_EXCEPTION: u32 = 5;
    pub const TYPE_SOFTWARE_EXCEPTION: u32 = 6;
    pub const ERROR_CODE_VALID: u32 = 1 << 11;
    pub const VALID: u32 = 1 << 31;
}

/// Segment access rights as the VMCS holds them (SDM Vol. 3C §25.4.1, Table 25-2).
pub mod access {
    /// Code, execute/read, accessed.
    pub const CODE_ER_ACCESSED: u32 = 0xB;
    /// Data, read/write, accessed.
    pub const DATA_RW_ACCESSED: u32 = 0x3;
    /// System: busy 64-bit (or 32-bit) TSS.
    pub const TSS_BUSY: u32 = 0xB;
    /// S: code or data (not system).
    pub const S: u32 = 1 << 4;
    /// P: present.
    pub const P: u32 = 1 << 7;
    /// L: 64-bit code.
    pub const L: u32 = 1 << 13;
    /// D/B: 32-bit default size.
    pub const DB: u32 = 1 << 14;
    /// G: limit in 4 KiB units.
    pub const G: u32 = 1 << 15;
    /// The segment is unusable.
    pub const UNUSABLE: u32 = 1 << 16;
}
