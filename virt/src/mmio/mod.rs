//! MMIO emulation: turning a nested-paging fault on a device window into a decoded guest access, and completing
//! it (register write-back, RIP advance).
//!
//! Why: guests reach virtio-mmio devices with ordinary `MOV` instructions to guest-physical pages that the nested
//! page tables leave unmapped. The EPT violation / NPF gives the guest-physical address but neither the data nor
//! the register (QEMU's SVM has no decode assists), so the hypervisor fetches the faulting instruction through the
//! guest's own page tables and decodes it itself, as KVM's emulator or ACRN's `instr_emul` do.
//!
//! Design:
//! - [`MmioWindows`]: the VM's device windows (page aligned, disjoint, above RAM).
//! - [`MmioAccess`]: one decoded access. Its public part (`gpa`, `size`, `kind`) is what a device model needs; the
//!   private part (destination register and extension, instruction length) is what [`crate::VmContext::complete_mmio`]
//!   needs to finish the instruction with x86 semantics. The device model never touches registers.
//!
//! Limits (each is the guest hurting only itself, never the hypervisor): the instruction is fetched after the exit,
//! so another vCPU rewriting it in between is decoded as it then is (a store/load disagreeing with the fault stops
//! the VM as `mmio-mismatch`); a fault on a guest paging-structure access that lands in a window (guest page tables
//! pointed at a device) is not told apart from a data access, since [`crate::MemAccess`] does not carry the
//! hardware's "final translation" bit, and is emulated as the instruction's access.
//!
//! Invariants: an [`MmioAccess`] is only built by the decoder from a complete instruction, so its length is the
//! real instruction length (1..=15) and a read always names its destination; `gpa..gpa + size` lies inside one
//! window.

pub mod decode;
pub mod string_io;
pub mod walk;

use alloc::vec::Vec;

use crate::exit::AccessSize;
use crate::vcpu::{ControlState, Gpr, CR0_PE};
pub use decode::CpuMode;

/// Page size MMIO windows are aligned to.
pub const PAGE_SIZE: u64 = 4096;

/// What the guest does at the device register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioKind {
    /// A load: the device model supplies the value, passed to [`crate::VmContext::complete_mmio`].
    Read,
    /// A store of this value (the low `size` bytes; the rest is zero).
    Write(u64),
}

/// How a read value is widened before it reaches the destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Extend {
    /// `MOV`: the destination has the access size.
    None,
    /// `MOVZX`.
    Zero,
    /// `MOVSX`.
    Sign,
}

/// The register a read lands in, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dest {
    pub(crate) reg: Gpr,
    /// AH, CH, DH or BH (bits 15:8 of RAX..RBX; only without a REX prefix).
    pub(crate) high_byte: bool,
    /// Width of the destination operand (8/16 merge into the register, 32 zero-extends to 64, 64 replaces).
    pub(crate) width: AccessSize,
    pub(crate) extend: Extend,
}

impl Dest {
    /// The register's new value after loading `raw` (only its low `size` bytes count) into it: 8/16-bit
    /// destinations merge, a 32-bit destination zero-extends into the 64-bit register (SDM Vol. 1 §3.4.1.1).
    pub(crate) fn merge(&self, old: u64, size: AccessSize, raw: u64) -> u64 {
        let value = raw & size.mask();
        let value = match self.extend {
            Extend::Sign => sign_extend(value, size),
            Extend::None | Extend::Zero => value,
        } & self.width.mask();
        match self.width {
            AccessSize::Byte if self.high_byte => (old & !0xff00) | (value << 8),
            AccessSize::Byte | AccessSize::Word => (old & !self.width.mask()) | value,
            AccessSize::Dword | AccessSize::Qword => value,
        }
    }
}

/// The code segment's mode and the linear address of the instruction at `rip`: in 64-bit mode RIP itself (the CS
/// base is ignored); otherwise CS.base + EIP, wrapped to 32 bits. CS.D/B picks 32 or 16 bits outside 64-bit mode
/// (0 in real mode).
pub fn code_mode(cs: &ControlState, rip: u64) -> (CpuMode, u64) {
    if cs.long_mode() {
        (CpuMode::Bits64, rip)
    } else {
        let mode = if cs.cs_db && cs.cr0 & CR0_PE != 0 {
            CpuMode::Bits32
        } else {
            CpuMode::Bits16
        };
        (
            mode,
            cs.cs_base.wrapping_add(rip & ip_mask(mode)) & 0xFFFF_FFFF,
        )
    }
}

/// The instruction-pointer mask of a code mode.
pub(crate) const fn ip_mask(mode: CpuMode) -> u64 {
    match mode {
        CpuMode::Bits16 => 0xFFFF,
        CpuMode::Bits32 => 0xFFFF_FFFF,
        CpuMode::Bits64 => u64::MAX,
    }
}

/// `value` (of `size` bytes) sign-extended to 64 bits.
pub(crate) fn sign_extend(value: u64, size: AccessSize) -> u64 {
    let shift = 64 - 8 * u32::from(size.bytes());
    (((value << shift).cast_signed()) >> shift).cast_unsigned()
}

/// One decoded guest access to a device window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// Guest-physical address of the access (inside a registered window).
    pub gpa: u64,
    /// Bytes accessed at `gpa`.
    pub size: AccessSize,
    /// Load, or store with its value.
    pub kind: MmioKind,
    /// Where a load's value goes (`None` for stores).
    pub(crate) dest: Option<Dest>,
    /// Length of the instruction, 1..=15.
    pub(crate) len: u8,
    /// Width of the instruction pointer: IP/EIP wrap at 16/32 bits outside 64-bit mode.
    pub(crate) ip_mask: u64,
}

impl MmioAccess {
    /// Length of the guest instruction in bytes (RIP advances by this on completion).
    pub const fn instruction_len(&self) -> u8 {
        self.len
    }
}

/// Why a window could not be registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioWindowError {
    /// `base` or `len` is not a multiple of 4 KiB, or `len` is 0.
    Unaligned { base: u64, len: u64 },
    /// `base + len` wraps the address space.
    Wraps { base: u64, len: u64 },
    /// The window overlaps guest RAM `[0, ram_size)`.
    OverlapsRam { base: u64, ram_size: u64 },
    /// The window overlaps the window at `other`.
    OverlapsWindow { base: u64, other: u64 },
    /// The VM's RAM size was not given ([`crate::VmContext::set_ram_size`]), so the RAM overlap cannot be checked.
    RamSizeUnknown,
}

impl core::fmt::Display for MmioWindowError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::Unaligned { base, len } => write!(
                f,
                "MMIO window {base:#x}+{len:#x} is not 4 KiB aligned or is empty"
            ),
            Self::Wraps { base, len } => {
                write!(f, "MMIO window {base:#x}+{len:#x} wraps the address space")
            }
            Self::OverlapsRam { base, ram_size } => write!(
                f,
                "MMIO window at {base:#x} overlaps guest RAM (size {ram_size:#x})"
            ),
            Self::OverlapsWindow { base, other } => write!(
                f,
                "MMIO window at {base:#x} overlaps the window at {other:#x}"
            ),
            Self::RamSizeUnknown => f.write_str("MMIO window registered before the RAM size"),
        }
    }
}

/// A VM's device windows: disjoint, page-aligned guest-physical ranges `[base, base + len)`.
#[derive(Clone, Debug, Default)]
pub struct MmioWindows {
    windows: Vec<(u64, u64)>,
}

impl MmioWindows {
    /// Registers `[base, base + len)`, checked against RAM `[0, ram_size)` and the other windows.
    ///
    /// # Errors
    /// [`MmioWindowError`] naming the violated rule; nothing is registered then.
    pub fn add(&mut self, base: u64, len: u64, ram_size: u64) -> Result<(), MmioWindowError> {
        if len == 0 || !base.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MmioWindowError::Unaligned { base, len });
        }
        let end = base
            .checked_add(len)
            .ok_or(MmioWindowError::Wraps { base, len })?;
        if base < ram_size {
            return Err(MmioWindowError::OverlapsRam { base, ram_size });
        }
        if let Some(&(other, _)) = self
            .windows
            .iter()
            .find(|&&(b, l)| base < b.saturating_add(l) && b < end)
        {
            return Err(MmioWindowError::OverlapsWindow { base, other });
        }
        self.windows.push((base, len));
        Ok(())
    }

    /// The window containing `gpa`, as `(base, len)`.
    pub fn find(&self, gpa: u64) -> Option<(u64, u64)> {
        self.windows
            .iter()
            .copied()
            .find(|&(b, l)| gpa >= b && gpa - b < l)
    }

    /// Whether no window is registered.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod bench_tests;
#[cfg(test)]
mod exit_tests;
#[cfg(test)]
mod tests;
