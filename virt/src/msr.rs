//! The MSRs a guest may touch: an allow list, #GP for everything else.
//!
//! Design: two disjoint sets.
//! - [`BACKEND_MSRS`]: architectural state the backend keeps in the VMCS/VMCB or its own save area (EFER, the
//!   SYSCALL/SYSENTER MSRs, FS/GS bases, PAT). Backends pass them through their MSR bitmap or save/restore them on
//!   every switch; they never reach this layer. If one does, it is treated like any unknown MSR (a visible #GP
//!   with a report), since answering from here would disagree with what the hardware uses.
//! - [`emulate`]: MSRs answered here with fixed, harmless values (SDM Vol. 4, Table 2-2): the TSC (as the guest
//!   sees it), platform id, feature control (locked, VMX off), microcode signature, misc-enable (fast strings).
//!
//! Everything else — including every VMX capability MSR — gets #GP(0), as on a CPU that lacks it, and is reported
//! ([`crate::sink::Event::MsrRefused`]).

/// MSRs the backend owns (passes through or saves and restores).
pub const BACKEND_MSRS: &[u32] = &[
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0080, // IA32_EFER
    0xc000_0081, // IA32_STAR
    0xc000_0082, // IA32_LSTAR
    0xc000_0083, // IA32_CSTAR
    0xc000_0084, // IA32_FMASK
    0xc000_0100, // IA32_FS_BASE
    0xc000_0101, // IA32_GS_BASE
    0xc000_0102, // IA32_KERNEL_GS_BASE
];

/// IA32_TIME_STAMP_COUNTER.
pub const IA32_TSC: u32 = 0x10;
/// IA32_PLATFORM_ID.
pub const IA32_PLATFORM_ID: u32 = 0x17;
/// IA32_FEATURE_CONTROL.
pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
/// IA32_BIOS_SIGN_ID (microcode revision).
pub const IA32_BIOS_SIGN_ID: u32 = 0x8b;
/// IA32_MISC_ENABLE.
pub const IA32_MISC_ENABLE: u32 = 0x1a0;

/// Every MSR [`emulate`] answers.
pub const EMULATED_MSRS: &[u32] = &[
    IA32_TSC,
    IA32_PLATFORM_ID,
    IA32_FEATURE_CONTROL,
    IA32_BIOS_SIGN_ID,
    IA32_MISC_ENABLE,
];

/// An MSR access by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAccess {
    Read,
    Write(u64),
}

/// The answer to an MSR access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrOutcome {
    /// RDMSR: this value goes to EDX:EAX.
    Value(u64),
    /// WRMSR accepted (and ignored: the value has no effect on the virtual CPU).
    Written,
    /// Refused: inject #GP(0).
    Refused,
}

/// Answers `access` to MSR `index`; `guest_tsc` is the guest's TSC now.
pub fn emulate(index: u32, access: MsrAccess, guest_tsc: u64) -> MsrOutcome {
    match (index, access) {
        (IA32_TSC, MsrAccess::Read) => MsrOutcome::Value(guest_tsc),
        (IA32_PLATFORM_ID, MsrAccess::Read) => MsrOutcome::Value(0),
        // Bit 0 (lock) set, VMX enable bits clear: what firmware leaves on a CPU whose VMX is off.
        (IA32_FEATURE_CONTROL, MsrAccess::Read) => MsrOutcome::Value(1),
        (IA32_BIOS_SIGN_ID, MsrAccess::Read) => MsrOutcome::Value(0),
        // Writing 0 here is how a guest asks for the microcode revision (SDM Vol. 3A §10.11.7); ignored.
        (IA32_BIOS_SIGN_ID, MsrAccess::Write(_)) => MsrOutcome::Written,
        // Bit 0: fast strings enabled.
        (IA32_MISC_ENABLE, MsrAccess::Read) => MsrOutcome::Value(1),
        _ => MsrOutcome::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_answers_and_refuses() {
        assert_eq!(
            emulate(IA32_TSC, MsrAccess::Read, 1234),
            MsrOutcome::Value(1234)
        );
        assert_eq!(
            emulate(IA32_TSC, MsrAccess::Write(0), 1234),
            MsrOutcome::Refused
        );
        assert_eq!(
            emulate(IA32_FEATURE_CONTROL, MsrAccess::Read, 0),
            MsrOutcome::Value(1)
        );
        assert_eq!(
            emulate(IA32_FEATURE_CONTROL, MsrAccess::Write(5), 0),
            MsrOutcome::Refused
        );
        assert_eq!(
            emulate(IA32_BIOS_SIGN_ID, MsrAccess::Write(0), 0),
            MsrOutcome::Written
        );
        // IA32_VMX_BASIC and friends, and an index no CPU has.
        for index in [0x480, 0x48b, 0x491, 0xc001_0114, 0xdead_beef] {
            assert_eq!(
                emulate(index, MsrAccess::Read, 0),
                MsrOutcome::Refused,
                "{index:#x}"
            );
            assert_eq!(
                emulate(index, MsrAccess::Write(0), 0),
                MsrOutcome::Refused,
                "{index:#x}"
            );
        }
    }

    #[test]
    fn backend_and_emulated_sets_are_disjoint() {
        for index in BACKEND_MSRS {
            assert!(!EMULATED_MSRS.contains(index), "{index:#x}");
            assert_eq!(
                emulate(*index, MsrAccess::Read, 0),
                MsrOutcome::Refused,
                "{index:#x}"
            );
        }
        for index in EMULATED_MSRS {
            assert_ne!(
                emulate(*index, MsrAccess::Read, 0),
                MsrOutcome::Refused,
                "{index:#x}"
            );
        }
    }
}
