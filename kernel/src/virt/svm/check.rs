//! Explains a `VMEXIT_INVALID`: which consistency check of AMD APM Vol. 2 §15.5.1 ("Basic Operation: VMRUN",
//! the list of illegal guest states) the VMCB violates.
//!
//! The processor only says "invalid" (exit code -1); this module re-checks the state against the documented rules,
//! in the APM's order, and names the first one that fails. The state-save fields and EVENTINJ are taken from a
//! [`Snapshot`] made just before VMRUN: a failed VMRUN may write the processor's own state back into the VMCB
//! (Bochs does), so the VMCB after the exit no longer shows what was rejected. Checks that depend on the CPU (MAXPHYADDR, the reserved
//! CR4/EFER bits) use CPUID. When no documented rule fails, the report says so: the state the processor rejected is
//! then outside the VMCB fields checked here (or an emulator enforces an extra rule).

use super::vmcb::{attrib, event, misc2, Ctl32, Ctl64, Save64, Seg, Vmcb, NP_ENABLE};
use crate::arch::x86_64::cpu;

const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_SVME: u64 = 1 << 12;
/// EFER bits that are defined on AMD64 (SCE, LME, LMA, NXE, SVME, LMSLE, FFXSR, TCE, MCOMMIT, INTWB, UAIEN,
/// AIBRSE); every other bit must be zero (APM Vol. 2 §3.1.7).
const EFER_DEFINED: u64 = (1 << 0)
    | (1 << 8)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 17)
    | (1 << 18)
    | (1 << 20)
    | (1 << 21);
/// CR4 bits that are reserved on AMD64 (bit 13 is VMXE, reserved on AMD; bits 15, 19 and 63:32 are reserved;
/// APM Vol. 2 §3.1.3).
const CR4_RESERVED: u64 = (1 << 13) | (1 << 15) | (1 << 19) | 0xFFFF_FFFF_0000_0000;
/// Memory-type encodings valid in a PAT entry (UC, WC, WT, WP, WB, UC-).
const PAT_VALID_TYPES: [u8; 6] = [0, 1, 4, 5, 6, 7];

/// Physical-address width (CPUID 0x80000008 EAX[7:0]; 36 when the leaf is absent).
fn max_phys_bits() -> u32 {
    if cpu::max_extended_leaf() >= 0x8000_0008 {
        cpu::cpuid(0x8000_0008, 0).eax & 0xFF
    } else {
        36
    }
}

/// Whether an EVENTINJ value is illegal (APM Vol. 2 §15.20): a reserved type, or an exception type with vector 2
/// (NMI) or above 31.
fn bad_event(ev: u64) -> bool {
    if ev & event::V == 0 {
        return false;
    }
    let ty = (ev & event::TYPE_MASK) >> 8;
    let vector = ev & event::VECTOR_MASK;
    match ty {
        0 | 2 | 4 => false,
        3 => vector == 2 || vector > 31,
        _ => true,
    }
}

/// The VMCB fields a failed VMRUN may overwrite, as they were handed to VMRUN.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    efer: u64,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    dr6: u64,
    dr7: u64,
    cs_attrib: u16,
    gpat: u64,
    event_inj: u64,
}

impl Snapshot {
    /// Reads the fields from `vmcb` (call right before VMRUN).
    pub fn capture(vmcb: &Vmcb) -> Self {
        Self {
            efer: vmcb.save64(Save64::Efer),
            cr0: vmcb.save64(Save64::Cr0),
            cr3: vmcb.save64(Save64::Cr3),
            cr4: vmcb.save64(Save64::Cr4),
            dr6: vmcb.save64(Save64::Dr6),
            dr7: vmcb.save64(Save64::Dr7),
            cs_attrib: vmcb.segment(Seg::Cs).attrib,
            gpat: vmcb.save64(Save64::GPat),
            event_inj: vmcb.ctl64(Ctl64::EventInj),
        }
    }
}

/// The first violated consistency rule, as a sentence naming the field: guest state from `before`, controls from
/// `vmcb`.
pub fn diagnose(before: &Snapshot, vmcb: &Vmcb) -> &'static str {
    let Snapshot {
        efer,
        cr0,
        cr3,
        cr4,
        dr6,
        dr7,
        cs_attrib,
        gpat,
        event_inj,
    } = *before;
    let pa_limit = 1u64 << max_phys_bits().min(63);
    let long_paging = efer & EFER_LME != 0 && cr0 & CR0_PG != 0;
    if efer & EFER_SVME == 0 {
        return "guest EFER.SVME is 0 (APM 15.5.1)";
    }
    if cr0 & CR0_CD == 0 && cr0 & CR0_NW != 0 {
        return "guest CR0.CD is 0 while CR0.NW is 1 (APM 15.5.1)";
    }
    if cr0 >> 32 != 0 {
        return "guest CR0[63:32] is not zero (APM 15.5.1)";
    }
    if long_paging && cr3 >= pa_limit {
        return "guest CR3 sets must-be-zero bits above MAXPHYADDR (APM 15.5.1)";
    }
    if cr4 & CR4_RESERVED != 0 {
        return "guest CR4 sets a must-be-zero bit (APM 15.5.1)";
    }
    if dr6 >> 32 != 0 {
        return "guest DR6[63:32] is not zero (APM 15.5.1)";
    }
    if dr7 >> 32 != 0 {
        return "guest DR7[63:32] is not zero (APM 15.5.1)";
    }
    if efer & !EFER_DEFINED != 0 {
        return "guest EFER sets a must-be-zero bit (APM 15.5.1)";
    }
    if long_paging && cr4 & CR4_PAE == 0 {
        return "guest EFER.LME and CR0.PG are 1 but CR4.PAE is 0 (APM 15.5.1)";
    }
    if long_paging && cr0 & CR0_PE == 0 {
        return "guest EFER.LME and CR0.PG are 1 but CR0.PE is 0 (APM 15.5.1)";
    }
    if long_paging
        && cr4 & CR4_PAE != 0
        && cs_attrib & attrib::L != 0
        && cs_attrib & attrib::DB != 0
    {
        return "guest EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D are all 1 (APM 15.5.1)";
    }
    if vmcb.ctl32(Ctl32::InterceptMisc2) & misc2::VMRUN == 0 {
        return "the VMRUN intercept bit is clear (APM 15.5.1)";
    }
    if vmcb.ctl64(Ctl64::MsrpmBasePa).saturating_add(2 * 4096) > pa_limit {
        return "the MSR permission map extends beyond MAXPHYADDR (APM 15.5.1)";
    }
    if vmcb.ctl64(Ctl64::IopmBasePa).saturating_add(3 * 4096) > pa_limit {
        return "the I/O permission map extends beyond MAXPHYADDR (APM 15.5.1)";
    }
    if bad_event(event_inj) {
        return "EVENTINJ holds an illegal event (APM 15.20)";
    }
    if vmcb.ctl32(Ctl32::GuestAsid) == 0 {
        return "the guest ASID is 0 (APM 15.5.1)";
    }
    if vmcb.ctl64(Ctl64::NestedCtl) & NP_ENABLE != 0 {
        if vmcb.ctl64(Ctl64::NCr3) >= pa_limit {
            return "nCR3 sets bits above MAXPHYADDR (APM 15.25.4)";
        }
        if gpat
            .to_le_bytes()
            .iter()
            .any(|t| !PAT_VALID_TYPES.contains(t))
        {
            return "G_PAT holds an invalid memory type (APM 15.25.8)";
        }
    }
    "no documented VMRUN consistency rule (APM 15.5.1) is violated by the VMCB fields checked"
}
