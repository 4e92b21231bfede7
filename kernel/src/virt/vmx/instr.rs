//! The VMX instructions, wrapped with their failure conventions decoded (SDM Vol. 3C §31.2): VMfailInvalid sets
//! CF (there is no current VMCS to hold an error number), VMfailValid sets ZF and leaves the number in the
//! VM-instruction error field, whose meanings are SDM Vol. 3C §31.4, Table 31-1.
//!
//! Every wrapper is `unsafe`: VMX instructions change processor state (VMX operation, the current VMCS, guest
//! memory translations) in ways the compiler cannot see. The typed [`read`]/[`write`] family is safe to call once
//! the caller has established VMX operation and a current VMCS; they report failures as values, never fault.

use core::arch::asm;

use super::fields::{Field, Field16, Field32, Field64, FieldNat, ReadOnly32};

/// How a VMX instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// VMfailInvalid: no current VMCS (or not in VMX operation for VMXON's own checks).
    Invalid,
    /// VMfailValid with the VM-instruction error number.
    Valid(InstructionError),
}

impl core::fmt::Display for VmFail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Invalid => f.write_str("VMfailInvalid (no current VMCS)"),
            Self::Valid(e) => write!(f, "VMfailValid error {} ({})", e.0, e.meaning()),
        }
    }
}

/// A VM-instruction error number (SDM Vol. 3C §31.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstructionError(pub u32);

impl InstructionError {
    /// The SDM's description (Table 31-1).
    pub fn meaning(self) -> &'static str {
        match self.0 {
            1 => "VMCALL executed in VMX root operation",
            2 => "VMCLEAR with invalid physical address",
            3 => "VMCLEAR with VMXON pointer",
            4 => "VMLAUNCH with non-clear VMCS",
            5 => "VMRESUME with non-launched VMCS",
            6 => "VMRESUME after VMXOFF",
            7 => "VM entry with invalid control field(s)",
            8 => "VM entry with invalid host-state field(s)",
            9 => "VMPTRLD with invalid physical address",
            10 => "VMPTRLD with VMXON pointer",
            11 => "VMPTRLD with incorrect VMCS revision identifier",
            12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
            13 => "VMWRITE to read-only VMCS component",
            15 => "VMXON executed in VMX root operation",
            16 => "VM entry with invalid executive-VMCS pointer",
            17 => "VM entry with non-launched executive VMCS",
            18 => "VM entry with executive-VMCS pointer not VMXON pointer",
            19 => "VMCALL with non-clear VMCS",
            20 => "VMCALL with invalid VM-exit control fields",
            22 => "VMCALL with incorrect MSEG revision identifier",
            23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
            24 => "VMCALL with invalid SMM-monitor features",
            25 => "VM entry with invalid VM-execution control fields in executive VMCS",
            26 => "VM entry with events blocked by MOV SS",
            28 => "invalid operand to INVEPT/INVVPID",
            _ => "reserved error number",
        }
    }
}

/// Decodes RFLAGS.CF/ZF after a VMX instruction.
fn status(cf: u8, zf: u8) -> Result<(), VmFail> {
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        // The error field is readable whenever VMfailValid was reported (there is a current VMCS).
        let n = read_raw(ReadOnly32::InstructionError.encoding()).unwrap_or(0);
        Err(VmFail::Valid(InstructionError(
            u32::try_from(n).unwrap_or(u32::MAX),
        )))
    } else {
        Ok(())
    }
}

/// VMREAD of an encoding.
fn read_raw(encoding: u32) -> Result<u64, VmFail> {
    let value: u64;
    let (cf, zf): (u8, u8);
    // SAFETY: VMREAD only reads the current VMCS into a register; outside VMX operation or without a current VMCS it
    // fails with #UD or VMfailInvalid. The kernel only calls the field accessors after VMXON on this CPU (see
    // the module doc), so the #UD case cannot arise; failures are reported through the flags.
    unsafe {
        asm!(
            "vmread {value}, {field}",
            "setc {cf}",
            "setz {zf}",
            field = in(reg) u64::from(encoding),
            value = out(reg) value,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
    }
    if cf != 0 {
        return Err(VmFail::Invalid);
    }
    if zf != 0 {
        return Err(VmFail::Valid(InstructionError(12)));
    }
    Ok(value)
}

/// VMWRITE of an encoding.
fn write_raw(encoding: u32, value: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: VMWRITE changes only the current VMCS, which the kernel treats as hardware-owned memory (nothing
    // aliases it); the VMCS contents take effect at the next VM entry, whose callers validate them. Called only in
    // VMX operation (module doc).
    unsafe {
        asm!(
            "vmwrite {field}, {value}",
            "setc {cf}",
            "setz {zf}",
            field = in(reg) u64::from(encoding),
            value = in(reg) value,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
    }
    status(cf, zf)
}

/// Reads a 16-bit field.
pub fn read16(f: impl Field16) -> Result<u16, VmFail> {
    // The hardware zero-extends a 16-bit field: the truncation is exact.
    read_raw(f.encoding()).map(|v| (v & 0xFFFF) as u16)
}

/// Reads a 32-bit field.
pub fn read32(f: impl Field32) -> Result<u32, VmFail> {
    read_raw(f.encoding()).map(|v| (v & 0xFFFF_FFFF) as u32)
}

/// Reads a 64-bit field.
pub fn read64(f: impl Field64) -> Result<u64, VmFail> {
    read_raw(f.encoding())
}

/// Reads a natural-width field.
pub fn read_nat(f: impl FieldNat) -> Result<u64, VmFail> {
    read_raw(f.encoding())
}

/// Writes a 16-bit field.
pub fn write16(f: impl Field16, v: u16) -> Result<(), VmFail> {
    write_raw(f.encoding(), u64::from(v))
}

/// Writes a 32-bit field.
pub fn write32(f: impl Field32, v: u32) -> Result<(), VmFail> {
    write_raw(f.encoding(), u64::from(v))
}

/// Writes a 64-bit field.
pub fn write64(f: impl Field64, v: u64) -> Result<(), VmFail> {
    write_raw(f.encoding(), v)
}

/// Writes a natural-width field.
pub fn write_nat(f: impl FieldNat, v: u64) -> Result<(), VmFail> {
    write_raw(f.encoding(), v)
}

/// A failed VMWRITE during VMCS setup: which field, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteError {
    pub encoding: u32,
    pub fail: VmFail,
}

/// Writes a field of any width, naming the field on failure (for the setup code's `?`).
pub fn set<F: Field>(f: F, v: u64) -> Result<(), WriteError> {
    write_raw(f.encoding(), v).map_err(|fail| WriteError {
        encoding: f.encoding(),
        fail,
    })
}

/// VMXON with the region at physical `region`.
///
/// # Safety
/// CR4.VMXE is set, CR0/CR4 satisfy the fixed-bit MSRs, IA32_FEATURE_CONTROL allows VMX outside SMX, and `region`
/// is a 4 KiB-aligned frame owned by this CPU for as long as it stays in VMX operation, initialised with the VMCS
/// revision identifier.
pub unsafe fn vmxon(region: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: preconditions forwarded to the caller; the operand is a pointer to a u64 on our stack.
    unsafe {
        asm!(
            "vmxon [{p}]",
            "setc {cf}",
            "setz {zf}",
            p = in(reg) &region,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
    }
    // After VMXON there is no current VMCS, so a ZF failure has no readable error number.
    if cf != 0 || zf != 0 {
        return Err(if cf != 0 {
            VmFail::Invalid
        } else {
            VmFail::Valid(InstructionError(15))
        });
    }
    Ok(())
}

/// VMCLEAR: flushes the VMCS at physical `vmcs` to memory and marks it clear (not current, not launched).
///
/// # Safety
/// In VMX operation; `vmcs` is a VMCS region owned by the caller.
pub unsafe fn vmclear(vmcs: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: preconditions forwarded to the caller.
    unsafe {
        asm!(
            "vmclear [{p}]",
            "setc {cf}",
            "setz {zf}",
            p = in(reg) &vmcs,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
    }
    status(cf, zf)
}

/// VMPTRLD: makes the VMCS at physical `vmcs` current on this CPU.
///
/// # Safety
/// In VMX operation; `vmcs` is a VMCS region owned by the caller, clear or last current on this CPU.
pub unsafe fn vmptrld(vmcs: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: preconditions forwarded to the caller.
    unsafe {
        asm!(
            "vmptrld [{p}]",
            "setc {cf}",
            "setz {zf}",
            p = in(reg) &vmcs,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
    }
    status(cf, zf)
}

/// VMPTRST: the physical address of the current VMCS (all ones when none).
///
/// # Safety
/// In VMX operation.
pub unsafe fn vmptrst() -> u64 {
    let mut p: u64 = 0;
    // SAFETY: preconditions forwarded to the caller; stores 8 bytes into `p`.
    unsafe { asm!("vmptrst [{p}]", p = in(reg) &mut p, options(nostack)) };
    p
}

/// INVEPT single-context (type 1) for the EPT pointer `eptp` (SDM Vol. 3C §31.3, "INVEPT").
///
/// # Safety
/// In VMX operation with INVEPT supported.
pub unsafe fn invept_single(eptp: u64) -> Result<(), VmFail> {
    let desc: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: preconditions forwarded to the caller; the descriptor is 16 bytes on our stack.
    unsafe {
        asm!(
            "invept {t}, [{d}]",
            "setc {cf}",
            "setz {zf}",
            t = in(reg) 1u64,
            d = in(reg) &desc,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
    }
    status(cf, zf)
}

/// INVVPID single-context (type 1) for `vpid` (SDM Vol. 3C §31.3, "INVVPID").
///
/// # Safety
/// In VMX operation with INVVPID supported.
pub unsafe fn invvpid_single(vpid: u16) -> Result<(), VmFail> {
    let desc: [u64; 2] = [u64::from(vpid), 0];
    let (cf, zf): (u8, u8);
    // SAFETY: preconditions forwarded to the caller; the descriptor is 16 bytes on our stack.
    unsafe {
        asm!(
            "invvpid {t}, [{d}]",
            "setc {cf}",
            "setz {zf}",
            t = in(reg) 1u64,
            d = in(reg) &desc,
            cf = out(reg_byte) cf,
            zf = out(reg_byte) zf,
            options(nostack),
        );
    }
    status(cf, zf)
}
