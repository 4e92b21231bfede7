//! x86 instruction decoder for the MOV family that device drivers use on MMIO registers.
//!
//! Scope: what Linux `readb..readq`/`writeb..writeq`, Rust `read_volatile`/`write_volatile` and our own guests
//! emit (Intel SDM Vol. 2, "MOV", "MOVZX", "MOVSX"; Vol. 2 §2.1-2.2 for the encoding):
//!
//! | opcode        | form                         | access                    |
//! |---------------|------------------------------|---------------------------|
//! | 88 /r, 89 /r  | MOV r/m, r                   | store of a register       |
//! | 8A /r, 8B /r  | MOV r, r/m                   | load into a register      |
//! | C6 /0 ib      | MOV r/m8, imm8               | store of an immediate     |
//! | C7 /0 iw/id   | MOV r/m, imm (REX.W: imm32 sign-extended) | store        |
//! | A0-A3         | MOV AL/rAX <-> moffs         | load / store of rAX       |
//! | 0F B6/B7 /r   | MOVZX r, r/m8 / r/m16        | load, zero-extended       |
//! | 0F BE/BF /r   | MOVSX r, r/m8 / r/m16        | load, sign-extended       |
//!
//! with legacy prefixes 66 (operand size), 67 (address size), segment overrides (26 2E 36 3E 64 65: accepted and
//! ignored, since the hardware already reported the guest-physical address), REX (W/R/X/B, 64-bit mode only, and
//! only when it immediately precedes the opcode, as on the CPU), ModRM + SIB + disp8/16/32 and RIP-relative
//! addressing. F0 (LOCK: #UD on MOV) and F2/F3 are rejected.
//!
//! Design: the decoder never computes the effective address (the exit gives the guest-physical address); it
//! computes the instruction's exact length from the encoding (never guessed), the access size, and the register or
//! immediate involved. Default sizes follow the code segment: 64-bit mode (operand 32, REX.W 64, 66 16; address
//! 64, 67 32), 32-bit and 16-bit mode (66 and 67 toggle 32 <-> 16; 16-bit addressing has its own ModRM table).
//!
//! Invariants: pure function of the bytes and the mode; never panics, never reads past `bytes`; more than 15
//! bytes is an error, as the CPU raises #GP.

use crate::exit::AccessSize;
use crate::mmio::{Dest, Extend};
use crate::vcpu::Gpr;

/// Longest legal x86 instruction.
pub const MAX_LEN: usize = 15;

/// The code segment's default size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode, or a 16-bit protected-mode code segment.
    Bits16,
    /// A 32-bit code segment (protected or compatibility mode).
    Bits32,
    /// 64-bit mode.
    Bits64,
}

/// Where a store's value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A register; `high_byte` names AH/CH/DH/BH.
    Reg { reg: Gpr, high_byte: bool },
    /// An immediate, already sign-extended to the operand size.
    Imm(u64),
}

/// What the instruction does with memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Load(Dest),
    Store(Source),
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decoded {
    /// Instruction length in bytes.
    pub(crate) len: u8,
    /// Memory access size.
    pub(crate) size: AccessSize,
    pub(crate) op: Op,
}

/// Why the bytes were not decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The instruction continues past the bytes given (the fetch stopped at an unmapped page).
    Truncated,
    /// Not in the supported MOV family, or a prefix the family does not allow (F0, F2, F3).
    Unsupported,
    /// The ModRM names a register, not memory: this instruction cannot have made the access.
    NotMemory,
    /// Longer than 15 bytes.
    TooLong,
}

/// A cursor over the instruction bytes that fails with `Truncated` at the end and `TooLong` past 15 bytes.
struct Bytes<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Bytes<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.at >= MAX_LEN {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        for _ in 0..n {
            self.next()?;
        }
        Ok(())
    }

    /// A little-endian immediate of `n` bytes (1, 2, 4 or 8).
    fn imm(&mut self, n: usize) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.next()?) << (8 * i);
        }
        Ok(v)
    }
}

/// Register number `n` (0..=15) as a [`Gpr`].
fn gpr(n: u8) -> Gpr {
    Gpr::ALL[usize::from(n & 15)]
}

/// The register for ModRM.reg (extended by REX.R) at operand size `size`.
fn reg_operand(reg: u8, rex: Option<u8>, size: AccessSize) -> (Gpr, bool) {
    let r = reg
        | if rex.is_some_and(|x| x & 0x4 != 0) {
            8
        } else {
            0
        };
    // Without any REX prefix, byte registers 4-7 are AH, CH, DH, BH (SDM Vol. 2 §2.2.1.2).
    if size == AccessSize::Byte && rex.is_none() && (4..8).contains(&r) {
        (gpr(r - 4), true)
    } else {
        (gpr(r), false)
    }
}

/// Skips the ModRM memory operand after the ModRM byte; returns ModRM.reg.
fn modrm_memory(b: &mut Bytes<'_>, addr16: bool) -> Result<u8, DecodeError> {
    let modrm = b.next()?;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if md == 3 {
        return Err(DecodeError::NotMemory);
    }
    let disp = if addr16 {
        // 16-bit addressing (SDM Vol. 2 Table 2-1): no SIB; mod 00 rm 110 is disp16.
        match (md, rm) {
            (0, 6) | (2, _) => 2,
            (1, _) => 1,
            _ => 0,
        }
    } else {
        // 32/64-bit addressing (Table 2-2, 2-3): rm 100 brings a SIB; SIB base 101 with mod 00 is disp32; mod 00
        // rm 101 is disp32 (RIP-relative in 64-bit mode).
        let sib_base = if rm == 4 { b.next()? & 7 } else { 0 };
        match (md, rm) {
            (0, 5) | (2, _) => 4,
            (0, 4) if sib_base == 5 => 4,
            (1, _) => 1,
            _ => 0,
        }
    };
    b.skip(disp)?;
    Ok(reg)
}

/// The legacy and REX prefixes of an instruction.
#[derive(Clone, Copy, Debug, Default)]
struct Prefixes {
    opsize: bool,
    addrsize: bool,
    /// The last segment-override prefix byte.
    seg: Option<u8>,
    /// F2 or F3.
    rep: bool,
    lock: bool,
    /// A REX prefix directly before the opcode (64-bit mode only).
    rex: Option<u8>,
}

/// Reads the prefixes and returns them with the first opcode byte.
fn prefixes(b: &mut Bytes<'_>, mode: CpuMode) -> Result<(Prefixes, u8), DecodeError> {
    let mut p = Prefixes::default();
    loop {
        let byte = b.next()?;
        match byte {
            0x66 => p.opsize = true,
            0x67 => p.addrsize = true,
            0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 => p.seg = Some(byte),
            0xF0 => p.lock = true,
            0xF2 | 0xF3 => p.rep = true,
            0x40..=0x4F if mode == CpuMode::Bits64 => {
                p.rex = Some(byte);
                // A REX prefix counts only if the opcode follows it directly (SDM Vol. 2 §2.2.1).
                continue;
            }
            _ => return Ok((p, byte)),
        }
        p.rex = None;
    }
}

/// The address size of an instruction with the given 67 prefix state.
fn address_size(mode: CpuMode, addrsize_prefix: bool) -> AccessSize {
    match (mode, addrsize_prefix) {
        (CpuMode::Bits64, false) => AccessSize::Qword,
        (CpuMode::Bits64, true) | (CpuMode::Bits32, false) | (CpuMode::Bits16, true) => {
            AccessSize::Dword
        }
        (CpuMode::Bits32, true) | (CpuMode::Bits16, false) => AccessSize::Word,
    }
}

/// A decoded `INS`/`OUTS` (opcodes 6C-6F, SDM Vol. 2 "INS", "OUTS").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StringIo {
    pub(crate) len: u8,
    /// `INS` (port to ES:rDI) rather than `OUTS` (seg:rSI to port).
    pub(crate) input: bool,
    /// Element size: 1, 2 or 4 bytes.
    pub(crate) size: AccessSize,
    /// Width of rSI/rDI/rCX as the instruction uses them.
    pub(crate) addr: AccessSize,
    /// Segment-override prefix byte (meaningful for `OUTS` only).
    pub(crate) seg: Option<u8>,
    /// REP (F3, or F2 which acts the same on these opcodes).
    pub(crate) rep: bool,
}

/// Decodes the `INS`/`OUTS` at the start of `bytes`.
///
/// # Errors
/// [`DecodeError::Unsupported`] for any other opcode or a LOCK prefix; truncation or length as in [`decode`].
pub(crate) fn decode_string_io(bytes: &[u8], mode: CpuMode) -> Result<StringIo, DecodeError> {
    let mut b = Bytes { bytes, at: 0 };
    let (p, op) = prefixes(&mut b, mode)?;
    if p.lock || !(0x6C..=0x6F).contains(&op) {
        return Err(DecodeError::Unsupported);
    }
    // Word or doubleword forms: 16 bits with 66 in 32/64-bit mode (REX.W does not widen them to 64), or without
    // it in 16-bit mode.
    let wide = if (mode == CpuMode::Bits16) == p.opsize {
        AccessSize::Dword
    } else {
        AccessSize::Word
    };
    Ok(StringIo {
        len: u8::try_from(b.at).map_err(|_| DecodeError::TooLong)?,
        input: op < 0x6E,
        size: if op & 1 == 0 { AccessSize::Byte } else { wide },
        addr: address_size(mode, p.addrsize),
        seg: p.seg,
        rep: p.rep,
    })
}

/// Decodes the instruction at the start of `bytes` in `mode`.
///
/// # Errors
/// [`DecodeError`]: truncated, unsupported, a register operand, or longer than 15 bytes.
pub(crate) fn decode(bytes: &[u8], mode: CpuMode) -> Result<Decoded, DecodeError> {
    let mut b = Bytes { bytes, at: 0 };
    let (p, op) = prefixes(&mut b, mode)?;
    if p.lock || p.rep {
        return Err(DecodeError::Unsupported);
    }
    let (opsize_prefix, addrsize_prefix, rex) = (p.opsize, p.addrsize, p.rex);
    let rex_w = rex.is_some_and(|x| x & 0x8 != 0);
    let opsize = match mode {
        CpuMode::Bits64 if rex_w => AccessSize::Qword,
        CpuMode::Bits64 | CpuMode::Bits32 if opsize_prefix => AccessSize::Word,
        CpuMode::Bits64 | CpuMode::Bits32 => AccessSize::Dword,
        CpuMode::Bits16 if opsize_prefix => AccessSize::Dword,
        CpuMode::Bits16 => AccessSize::Word,
    };
    let addr16 = matches!(
        (mode, addrsize_prefix),
        (CpuMode::Bits16, false) | (CpuMode::Bits32, true)
    );
    let moffs_len = usize::from(address_size(mode, addrsize_prefix).bytes());
    let load = |reg: u8, width: AccessSize, extend: Extend| {
        let (reg, high_byte) = reg_operand(reg, rex, width);
        Op::Load(Dest {
            reg,
            high_byte,
            width,
            extend,
        })
    };
    let store = |reg: u8, size: AccessSize| {
        let (reg, high_byte) = reg_operand(reg, rex, size);
        Op::Store(Source::Reg { reg, high_byte })
    };
    let (size, op) = match op {
        0x88 | 0x89 => {
            let size = if op == 0x88 { AccessSize::Byte } else { opsize };
            let reg = modrm_memory(&mut b, addr16)?;
            (size, store(reg, size))
        }
        0x8A | 0x8B => {
            let size = if op == 0x8A { AccessSize::Byte } else { opsize };
            let reg = modrm_memory(&mut b, addr16)?;
            (size, load(reg, size, Extend::None))
        }
        0xC6 | 0xC7 => {
            let size = if op == 0xC6 { AccessSize::Byte } else { opsize };
            if modrm_memory(&mut b, addr16)? != 0 {
                return Err(DecodeError::Unsupported);
            }
            let imm = match size {
                AccessSize::Byte => b.imm(1)?,
                AccessSize::Word => b.imm(2)?,
                AccessSize::Dword => b.imm(4)?,
                // REX.W C7: imm32 sign-extended to 64 bits.
                AccessSize::Qword => super::sign_extend(b.imm(4)?, AccessSize::Dword),
            };
            (size, Op::Store(Source::Imm(imm)))
        }
        0xA0..=0xA3 => {
            let size = if op & 1 == 0 {
                AccessSize::Byte
            } else {
                opsize
            };
            b.skip(moffs_len)?;
            if op < 0xA2 {
                let dest = Dest {
                    reg: Gpr::Rax,
                    high_byte: false,
                    width: size,
                    extend: Extend::None,
                };
                (size, Op::Load(dest))
            } else {
                let src = Source::Reg {
                    reg: Gpr::Rax,
                    high_byte: false,
                };
                (size, Op::Store(src))
            }
        }
        0x0F => {
            let op2 = b.next()?;
            let (size, extend) = match op2 {
                0xB6 => (AccessSize::Byte, Extend::Zero),
                0xB7 => (AccessSize::Word, Extend::Zero),
                0xBE => (AccessSize::Byte, Extend::Sign),
                0xBF => (AccessSize::Word, Extend::Sign),
                _ => return Err(DecodeError::Unsupported),
            };
            let reg = modrm_memory(&mut b, addr16)?;
            (size, load(reg, opsize, extend))
        }
        _ => return Err(DecodeError::Unsupported),
    };
    // `b.at` <= 15 by construction.
    let len = u8::try_from(b.at).map_err(|_| DecodeError::TooLong)?;
    Ok(Decoded { len, size, op })
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
