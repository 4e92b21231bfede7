//! String port I/O: `INS`/`OUTS`, with and without `REP`, between guest memory and the VM's virtual ports.
//!
//! Why: the exit tells the port, the element size and whether a REP prefix is present, but not where the data is;
//! that is seg:rSI (`OUTS`) or ES:rDI (`INS`) as linear addresses in the guest's own paging. The instruction is
//! fetched and its prefixes decoded (`decode::decode_string_io`) for the address size and segment
//! override, and memory is reached through the same page walk as MMIO ([`super::walk`]).
//!
//! Design:
//! - elements move one at a time, in order, honouring RFLAGS.DF (rSI/rDI count down), with rSI/rDI/rCX updated at
//!   the instruction's address size (16-bit: only the low word changes; 32-bit: zero-extends; 64-bit: whole);
//! - at most [`MAX_BYTES_PER_EXIT`] bytes move per exit. A `REP` with elements left does not advance RIP, so the
//!   guest re-executes the instruction and exits again; a huge rCX therefore never holds the hypervisor CPU for
//!   longer than one bounded batch, and the scheduler sees the vCPU between batches;
//! - `REP` with rCX = 0 does nothing and completes; without `REP` one element moves;
//! - segment bases: 0 in 64-bit mode for DS/ES/CS/SS; outside it DS, ES and CS from [`ControlState`]. FS/GS
//!   overrides (and SS outside 64-bit mode) are refused with a report, since their bases are not read here.
//!
//! Invariants: a fault on the element being moved stops the VM (reported with the linear address) after rSI/rDI/rCX
//! were updated for the elements already moved, as the CPU leaves them at a fault; nothing touches memory outside
//! guest RAM.

use crate::exit::{AccessSize, IoAccess, IoDirection};
use crate::memory::GuestMemory;
use crate::mmio::decode::{self, DecodeError};
use crate::mmio::walk::{self, Access};
use crate::mmio::{code_mode, CpuMode};
use crate::vcpu::{ControlState, Gpr, Vcpu, RFLAGS_DF};

/// Bytes moved per exit at most (then the instruction is re-executed for the rest).
pub const MAX_BYTES_PER_EXIT: u64 = 4096;

/// The VM's ports, as string I/O reaches them.
pub(crate) trait Ports {
    /// Reads `size` bytes from `port`.
    fn input(&mut self, port: u16, size: AccessSize) -> u64;
    /// Writes the low `size` bytes of `value` to `port`.
    fn output(&mut self, port: u16, size: AccessSize, value: u64);
}

/// Guest RAM as the exit handler was given it.
pub(crate) enum Ram<'a> {
    /// Read-only: `OUTS` works, `INS` is refused.
    ReadOnly(&'a dyn GuestMemory),
    /// Writable: both directions work.
    Writable(&'a mut dyn GuestMemory),
}

impl Ram<'_> {
    pub(crate) fn get(&self) -> &dyn GuestMemory {
        match self {
            Self::ReadOnly(m) => *m,
            Self::Writable(m) => &**m,
        }
    }
}

/// How a string I/O exit ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The instruction completed: skip it.
    Done,
    /// A `REP` batch moved; elements remain: re-enter at the same RIP.
    Again,
    /// The VM stops: the form is not emulated (`detail`), or memory at `linear` faulted.
    Refused(&'static str),
    Fault {
        linear: u64,
    },
}

/// `new` written into a register `old` at address size `addr` (SDM Vol. 1 §3.4.1.1: 32-bit writes zero-extend,
/// 16-bit writes keep the upper bits).
fn at_size(old: u64, new: u64, addr: AccessSize) -> u64 {
    match addr {
        AccessSize::Word | AccessSize::Byte => (old & !0xFFFF) | (new & 0xFFFF),
        AccessSize::Dword => new & 0xFFFF_FFFF,
        AccessSize::Qword => new,
    }
}

/// The segment base for the data operand, or why it is refused.
fn segment_base(cs: &ControlState, input: bool, seg: Option<u8>) -> Result<u64, &'static str> {
    // INS always writes ES:rDI; OUTS reads DS:rSI unless overridden.
    let seg = if input { 0x26 } else { seg.unwrap_or(0x3E) };
    let long = cs.long_mode();
    match seg {
        0x64 | 0x65 => Err("FS/GS segment override on OUTS is not emulated"),
        _ if long => Ok(0),
        0x26 => Ok(cs.es_base),
        0x3E => Ok(cs.ds_base),
        0x2E => Ok(cs.cs_base),
        _ => Err("SS segment override on OUTS outside 64-bit mode is not emulated"),
    }
}

/// Emulates the `INS`/`OUTS` that caused `access` (already known to be a string access).
pub(crate) fn emulate<V: Vcpu + ?Sized>(
    vcpu: &mut V,
    ram: &mut Ram<'_>,
    access: IoAccess,
    ports: &mut dyn Ports,
) -> Outcome {
    let Some(cs) = vcpu.control_state() else {
        return Outcome::Refused("the vCPU's paging state could not be read");
    };
    let (mode, linear_rip) = code_mode(&cs, vcpu.rip());
    let mut bytes = [0u8; decode::MAX_LEN];
    let fetched = match walk::fetch(ram.get(), &cs, linear_rip, &mut bytes) {
        Ok(n) => n,
        Err(e) => return Outcome::Fault { linear: e.linear() },
    };
    let insn = match decode::decode_string_io(&bytes[..fetched], mode) {
        Ok(i) => i,
        Err(DecodeError::Truncated) => {
            return Outcome::Fault {
                linear: linear_rip.wrapping_add(fetched as u64),
            }
        }
        Err(_) => return Outcome::Refused("the instruction at RIP is not INS/OUTS"),
    };
    let input = access.direction == IoDirection::In;
    if insn.input != input || insn.size != access.size || insn.rep != access.rep {
        return Outcome::Refused("the instruction at RIP does not match the exit");
    }
    let base = match segment_base(&cs, input, insn.seg) {
        Ok(b) => b,
        Err(why) => return Outcome::Refused(why),
    };
    if input && matches!(ram, Ram::ReadOnly(_)) {
        return Outcome::Refused("INS needs writable guest memory (VmContext::handle_exit_rw)");
    }
    let index_reg = if input { Gpr::Rdi } else { Gpr::Rsi };
    let mask = insn.addr.mask();
    let rcx = vcpu.gpr(Gpr::Rcx);
    let count = if insn.rep { rcx & mask } else { 1 };
    if count == 0 {
        return Outcome::Done;
    }
    let size = u64::from(insn.size.bytes());
    let batch = count.min(MAX_BYTES_PER_EXIT / size);
    let down = cs.rflags & RFLAGS_DF != 0;
    let mut index = vcpu.gpr(index_reg);
    let mut moved = 0u64;
    let mut fault = None;
    while moved < batch {
        let mut linear = base.wrapping_add(index & mask);
        if mode != CpuMode::Bits64 {
            linear &= 0xFFFF_FFFF;
        }
        let mut buf = [0u8; 4];
        let elem = &mut buf[..usize::from(insn.size.bytes())];
        let result = match ram {
            Ram::Writable(mem) if input => {
                let value = ports.input(access.port, insn.size);
                elem.copy_from_slice(&value.to_le_bytes()[..elem.len()]);
                walk::write_linear(&mut **mem, &cs, linear, elem)
            }
            _ => walk::read_linear(ram.get(), &cs, linear, elem, Access::READ).map(|()| {
                let mut v = [0u8; 8];
                v[..elem.len()].copy_from_slice(elem);
                ports.output(access.port, insn.size, u64::from_le_bytes(v));
            }),
        };
        if let Err(e) = result {
            fault = Some(e.linear());
            break;
        }
        let next = if down {
            index.wrapping_sub(size)
        } else {
            index.wrapping_add(size)
        };
        index = at_size(index, next, insn.addr);
        moved += 1;
    }
    vcpu.set_gpr(index_reg, index);
    if insn.rep {
        vcpu.set_gpr(Gpr::Rcx, at_size(rcx, count - moved, insn.addr));
    }
    match fault {
        Some(linear) => Outcome::Fault { linear },
        None if moved < count => Outcome::Again,
        None => Outcome::Done,
    }
}
