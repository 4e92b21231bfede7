//! VMX capability MSRs (SDM Vol. 3D Appendix A) and the control adjustment rule (SDM Vol. 3C §A.3-A.5 / §26.2.1):
//! a control bit whose allowed-0 setting is 1 must be 1, a bit whose allowed-1 setting is 0 must be 0.
//!
//! Design: [`Caps::read`] snapshots every MSR once per CPU; [`Caps::adjust`] turns "required" and "wanted" bit sets
//! into the value to program, refusing (rather than silently dropping) a required bit the CPU cannot set. When
//! IA32_VMX_BASIC[55] is set the TRUE_ MSRs are used, which may allow clearing default-1 bits (e.g. CR3-load
//! exiting), as the SDM recommends.

use crate::arch::x86_64::cpu;

const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
const IA32_VMX_EXIT_CTLS: u32 = 0x483;
const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
const IA32_VMX_MISC: u32 = 0x485;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;
const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

/// Which control field an adjustment was for (for error reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlKind {
    Pin,
    Primary,
    Secondary,
    Exit,
    Entry,
}

/// A required control bit the CPU does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsupported {
    pub kind: ControlKind,
    /// The required bits whose allowed-1 setting is 0.
    pub missing: u32,
}

/// Allowed-0 (low half: bits that must be 1) and allowed-1 (high half: bits that may be 1) of a control MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    pub must_be_1: u32,
    pub may_be_1: u32,
}

impl Allowed {
    fn from_msr(v: u64) -> Self {
        Self {
            must_be_1: lo32(v),
            may_be_1: hi32(v),
        }
    }
}

fn lo32(v: u64) -> u32 {
    u32::try_from(v & 0xFFFF_FFFF).unwrap_or(0)
}

fn hi32(v: u64) -> u32 {
    u32::try_from(v >> 32).unwrap_or(0)
}

/// A snapshot of the VMX capability MSRs.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// VMCS revision identifier (IA32_VMX_BASIC[30:0]).
    pub revision: u32,
    pub pin: Allowed,
    pub primary: Allowed,
    /// All zero when the CPU has no secondary controls.
    pub secondary: Allowed,
    pub exit: Allowed,
    pub entry: Allowed,
    /// The preemption timer counts down once per 2^rate TSC ticks (IA32_VMX_MISC[4:0]).
    pub preemption_timer_rate: u32,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    /// IA32_VMX_EPT_VPID_CAP (0 without secondary controls).
    pub ept_vpid: u64,
}

impl Caps {
    /// Reads the capability MSRs of this CPU.
    ///
    /// # Safety
    /// CPUID.1:ECX.VMX = 1 (the MSRs exist).
    pub unsafe fn read() -> Self {
        // SAFETY: every MSR read here exists when VMX is supported (SDM Vol. 3D Appendix A); the secondary and
        // EPT/VPID MSRs are read only when the primary controls allow activating secondary controls, and the TRUE
        // MSRs only when IA32_VMX_BASIC[55] says they exist.
        unsafe {
            let basic = cpu::rdmsr(IA32_VMX_BASIC);
            let true_ctls = basic & (1 << 55) != 0;
            let pick = |plain: u32, tru: u32| if true_ctls { tru } else { plain };
            let primary = Allowed::from_msr(cpu::rdmsr(pick(
                IA32_VMX_PROCBASED_CTLS,
                IA32_VMX_TRUE_PROCBASED_CTLS,
            )));
            let has_secondary = primary.may_be_1 & (1 << 31) != 0;
            let secondary = if has_secondary {
                Allowed::from_msr(cpu::rdmsr(IA32_VMX_PROCBASED_CTLS2))
            } else {
                Allowed {
                    must_be_1: 0,
                    may_be_1: 0,
                }
            };
            Self {
                revision: lo32(basic) & 0x7FFF_FFFF,
                pin: Allowed::from_msr(cpu::rdmsr(pick(
                    IA32_VMX_PINBASED_CTLS,
                    IA32_VMX_TRUE_PINBASED_CTLS,
                ))),
                primary,
                secondary,
                exit: Allowed::from_msr(cpu::rdmsr(pick(
                    IA32_VMX_EXIT_CTLS,
                    IA32_VMX_TRUE_EXIT_CTLS,
                ))),
                entry: Allowed::from_msr(cpu::rdmsr(pick(
                    IA32_VMX_ENTRY_CTLS,
                    IA32_VMX_TRUE_ENTRY_CTLS,
                ))),
                preemption_timer_rate: lo32(cpu::rdmsr(IA32_VMX_MISC)) & 0x1F,
                cr0_fixed0: cpu::rdmsr(IA32_VMX_CR0_FIXED0),
                cr0_fixed1: cpu::rdmsr(IA32_VMX_CR0_FIXED1),
                cr4_fixed0: cpu::rdmsr(IA32_VMX_CR4_FIXED0),
                cr4_fixed1: cpu::rdmsr(IA32_VMX_CR4_FIXED1),
                ept_vpid: if has_secondary {
                    cpu::rdmsr(IA32_VMX_EPT_VPID_CAP)
                } else {
                    0
                },
            }
        }
    }

    /// The value to program: `required | wanted` limited to what may be 1, plus what must be 1.
    ///
    /// # Errors
    /// A `required` bit the CPU does not allow.
    pub fn adjust(
        &self,
        kind: ControlKind,
        required: u32,
        wanted: u32,
    ) -> Result<u32, Unsupported> {
        let a = match kind {
            ControlKind::Pin => self.pin,
            ControlKind::Primary => self.primary,
            ControlKind::Secondary => self.secondary,
            ControlKind::Exit => self.exit,
            ControlKind::Entry => self.entry,
        };
        let missing = required & !a.may_be_1;
        if missing != 0 {
            return Err(Unsupported { kind, missing });
        }
        Ok(((required | wanted) & a.may_be_1) | a.must_be_1)
    }

    /// Whether a control bit may be set.
    pub fn allows(&self, kind: ControlKind, bit: u32) -> bool {
        self.adjust(kind, bit, 0).is_ok()
    }

    /// INVEPT with the single-context type (EPT_VPID_CAP bits 20 and 25).
    pub fn invept_single(&self) -> bool {
        self.ept_vpid & (1 << 20) != 0 && self.ept_vpid & (1 << 25) != 0
    }

    /// INVVPID with the single-context type (EPT_VPID_CAP bits 32 and 41).
    pub fn invvpid_single(&self) -> bool {
        self.ept_vpid & (1 << 32) != 0 && self.ept_vpid & (1 << 41) != 0
    }

    /// EPT accessed/dirty flags (EPT_VPID_CAP bit 21).
    pub fn ept_accessed_dirty(&self) -> bool {
        self.ept_vpid & (1 << 21) != 0
    }

    /// A 4-level walk and write-back paging structures (EPT_VPID_CAP bits 6 and 14).
    pub fn ept_4level_wb(&self) -> bool {
        self.ept_vpid & (1 << 6) != 0 && self.ept_vpid & (1 << 14) != 0
    }

    /// CR0 as the hardware requires it for `desired` (`unrestricted`: PE and PG may be 0, SDM §26.3.1.1), and the
    /// guest/host mask of the bits the hardware forces (the guest reads those from the shadow).
    pub fn cr0_for(&self, desired: u64, unrestricted: bool) -> (u64, u64) {
        const PE: u64 = 1;
        const PG: u64 = 1 << 31;
        let fixed0 = if unrestricted {
            self.cr0_fixed0 & !(PE | PG)
        } else {
            self.cr0_fixed0
        };
        (
            (desired | fixed0) & self.cr0_fixed1,
            fixed0 | !self.cr0_fixed1,
        )
    }

    /// CR4 as the hardware requires it for `desired` (VMXE is fixed to 1), and the mask of forced bits.
    pub fn cr4_for(&self, desired: u64) -> (u64, u64) {
        (
            (desired | self.cr4_fixed0) & self.cr4_fixed1,
            self.cr4_fixed0 | !self.cr4_fixed1,
        )
    }
}
