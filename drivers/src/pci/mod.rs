//! PCI configuration space: addressing (ECAM and the legacy 0xCF8/0xCFC mechanism), bus enumeration, BAR decoding
//! and sizing, and the command register.
//!
//! Design: all config-space traffic goes through [`ConfigSpace`] (32-bit reads and writes of one function's
//! register at a dword-aligned offset). The kernel implements it twice: over the ECAM window that ACPI's MCFG
//! describes (PCI Firmware Specification 3.2 section 4.1.2; PCIe Base Specification section 7.2.2, offset
//! `bus << 20 | dev << 15 | fn << 12 | reg`), and, without an MCFG, over port I/O (PCI Local Bus Specification 3.0
//! section 3.2.2.3.2, configuration mechanism #1; [`cf8_address`]). Enumeration, BAR sizing and decoding are
//! written once here and tested against a fake bus.
//!
//! Invariants: BAR sizing writes all-ones to a BAR only while memory and I/O decoding are disabled in the command
//! register, and restores both the BAR and the command register afterwards (PCI 3.0 section 6.2.5.1). A 64-bit
//! memory BAR consumes two BAR slots; the upper slot is never reported on its own.

#[cfg(test)]
mod tests;

use alloc::vec::Vec;

/// Bus/device/function address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus 0..=255.
    pub bus: u8,
    /// Device 0..=31.
    pub device: u8,
    /// Function 0..=7.
    pub function: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Dword access to a function's configuration space.
pub trait ConfigSpace {
    /// Reads the dword at `offset` (dword aligned, < 4096; < 256 for port I/O). Absent functions read all-ones.
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32;
    /// Writes the dword at `offset`.
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32);
}

/// The 0xCF8 CONFIG_ADDRESS value for `bdf` and register `offset` (mechanism #1: enable bit 31, bus 23:16,
/// device 15:11, function 10:8, register 7:2). `None` for offsets beyond the 256-byte legacy space.
pub fn cf8_address(bdf: Bdf, offset: u16) -> Option<u32> {
    if offset >= 256 || bdf.device >= 32 || bdf.function >= 8 {
        return None;
    }
    Some(
        (1 << 31)
            | (u32::from(bdf.bus) << 16)
            | (u32::from(bdf.device) << 11)
            | (u32::from(bdf.function) << 8)
            | u32::from(offset & 0xFC),
    )
}

/// Byte offset of `bdf`'s register `offset` inside an ECAM window whose first bus is `start_bus`. `None` when the
/// bus is below the window or the offset is beyond 4 KiB.
pub fn ecam_offset(start_bus: u8, bdf: Bdf, offset: u16) -> Option<u64> {
    if offset >= 4096 || bdf.device >= 32 || bdf.function >= 8 || bdf.bus < start_bus {
        return None;
    }
    Some(
        (u64::from(bdf.bus - start_bus) << 20)
            | (u64::from(bdf.device) << 15)
            | (u64::from(bdf.function) << 12)
            | u64::from(offset & !3),
    )
}

/// Configuration header registers (type 0 header, PCI 3.0 section 6.1).
pub mod reg {
    /// Vendor ID (15:0), Device ID (31:16).
    pub const ID: u16 = 0x00;
    /// Command (15:0), Status (31:16).
    pub const COMMAND: u16 = 0x04;
    /// Revision (7:0), Prog IF (15:8), Subclass (23:16), Class (31:24).
    pub const CLASS: u16 = 0x08;
    /// Header type in bits 23:16 (bit 23: multi-function).
    pub const HEADER: u16 = 0x0C;
    /// First BAR.
    pub const BAR0: u16 = 0x10;
    /// Type 1 header: primary (7:0), secondary (15:8) and subordinate (23:16) bus numbers.
    pub const BUS_NUMBERS: u16 = 0x18;
}

/// Command register bits (PCI 3.0 section 6.2.2).
pub mod command {
    /// I/O Space enable.
    pub const IO: u16 = 1 << 0;
    /// Memory Space enable.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus Master enable.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Interrupt Disable (legacy INTx).
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// A function found on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Where.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code.
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Header type without the multi-function bit.
    pub header_type: u8,
}

impl Function {
    /// NVM Express controller (class 01h, subclass 08h, interface 02h).
    pub fn is_nvme(&self) -> bool {
        (self.class, self.subclass, self.prog_if) == (0x01, 0x08, 0x02)
    }
}

/// Scans buses `buses` (inclusive range) by brute force: every device, function 0, and functions 1-7 when
/// function 0 is multi-function. Returns functions in address order.
pub fn enumerate(cfg: &mut impl ConfigSpace, first_bus: u8, last_bus: u8) -> Vec<Function> {
    let mut found = Vec::new();
    for bus in first_bus..=last_bus {
        for device in 0..32u8 {
            let f0 = Bdf {
                bus,
                device,
                function: 0,
            };
            let Some(func) = probe(cfg, f0) else { continue };
            let multi = cfg.read32(f0, reg::HEADER) & (1 << 23) != 0;
            found.push(func);
            if multi {
                for function in 1..8u8 {
                    if let Some(f) = probe(
                        cfg,
                        Bdf {
                            bus,
                            device,
                            function,
                        },
                    ) {
                        found.push(f);
                    }
                }
            }
        }
    }
    found
}

/// Scans from bus `first_bus` down through PCI-to-PCI bridges (type 1 headers: secondary bus number at 0x19,
/// PCI-to-PCI Bridge Architecture Specification 1.2 section 3.2.5.4), visiting each bus at most once and only
/// buses within `first_bus..=last_bus`. This finds what firmware configured without probing 8192 empty slots.
pub fn enumerate_tree(cfg: &mut impl ConfigSpace, first_bus: u8, last_bus: u8) -> Vec<Function> {
    let mut found = Vec::new();
    let mut visited = [false; 256];
    let mut pending = alloc::vec![first_bus];
    while let Some(bus) = pending.pop() {
        if core::mem::replace(&mut visited[usize::from(bus)], true) {
            continue;
        }
        let on_bus = enumerate(cfg, bus, bus);
        for f in &on_bus {
            if f.header_type == 1 {
                let secondary = cfg.read32(f.bdf, reg::BUS_NUMBERS).to_le_bytes()[1];
                if secondary > bus && secondary <= last_bus && !visited[usize::from(secondary)] {
                    pending.push(secondary);
                }
            }
        }
        found.extend(on_bus);
    }
    found.sort_by_key(|f| f.bdf);
    found
}

/// Reads a function's identity; `None` when nothing answers (vendor ID FFFFh).
pub fn probe(cfg: &mut impl ConfigSpace, bdf: Bdf) -> Option<Function> {
    let id = cfg.read32(bdf, reg::ID);
    let vendor = (id & 0xFFFF) as u16;
    if vendor == 0xFFFF || vendor == 0 {
        return None;
    }
    let [_revision, prog_if, subclass, class] = cfg.read32(bdf, reg::CLASS).to_le_bytes();
    let header = cfg.read32(bdf, reg::HEADER).to_le_bytes()[2];
    Some(Function {
        bdf,
        vendor,
        device: (id >> 16) as u16,
        class,
        subclass,
        prog_if,
        header_type: header & 0x7F,
    })
}

/// A decoded, sized base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// Memory space.
    Memory {
        /// Physical base.
        base: u64,
        /// Size in bytes (a power of two).
        size: u64,
        /// 64-bit BAR (occupies this slot and the next).
        wide: bool,
        /// Prefetchable.
        prefetchable: bool,
    },
    /// I/O space.
    Io {
        /// Port base.
        port: u32,
        /// Size in ports.
        size: u32,
    },
}

/// Why a BAR could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarError {
    /// Index beyond the header's BARs (6 for type 0).
    NoSuchBar(u8),
    /// The BAR is not implemented (sizes to zero).
    Unimplemented(u8),
    /// A 64-bit BAR in the last slot, or the reserved memory type 01b.
    Malformed(u8),
    /// The slot is the upper half of a 64-bit BAR.
    UpperHalf(u8),
}

/// Decodes and sizes BAR `index` of a type-0 function (PCI 3.0 section 6.2.5.1), with decoding disabled while
/// the BAR holds all-ones, and everything restored afterwards.
pub fn read_bar(cfg: &mut impl ConfigSpace, bdf: Bdf, index: u8) -> Result<Bar, BarError> {
    if index >= 6 {
        return Err(BarError::NoSuchBar(index));
    }
    if index > 0 {
        let prev = cfg.read32(bdf, reg::BAR0 + 4 * u16::from(index - 1));
        if prev & 1 == 0 && (prev >> 1) & 3 == 2 {
            return Err(BarError::UpperHalf(index));
        }
    }
    let off = reg::BAR0 + 4 * u16::from(index);
    let orig = cfg.read32(bdf, off);
    let cmd = cfg.read32(bdf, reg::COMMAND);
    let decode = u32::from(command::IO | command::MEMORY);
    cfg.write32(bdf, reg::COMMAND, cmd & !decode);
    let result = size_bar(cfg, bdf, index, off, orig);
    cfg.write32(bdf, reg::COMMAND, cmd);
    result
}

fn size_bar(
    cfg: &mut impl ConfigSpace,
    bdf: Bdf,
    index: u8,
    off: u16,
    orig: u32,
) -> Result<Bar, BarError> {
    cfg.write32(bdf, off, u32::MAX);
    let mask = cfg.read32(bdf, off);
    cfg.write32(bdf, off, orig);
    if orig & 1 == 1 {
        let m = mask & !0x3;
        if m == 0 {
            return Err(BarError::Unimplemented(index));
        }
        // I/O BARs decode at most 16 (x86: 16) address bits in practice; the upper half may read as zero.
        let m = m | 0xFFFF_0000;
        return Ok(Bar::Io {
            port: orig & !0x3,
            size: (!m).wrapping_add(1),
        });
    }
    let prefetchable = orig & 0x8 != 0;
    match (orig >> 1) & 3 {
        0 => {
            let m = mask & !0xF;
            if m == 0 {
                return Err(BarError::Unimplemented(index));
            }
            Ok(Bar::Memory {
                base: u64::from(orig & !0xF),
                size: u64::from((!m).wrapping_add(1)),
                wide: false,
                prefetchable,
            })
        }
        2 => {
            if index == 5 {
                return Err(BarError::Malformed(index));
            }
            let hi_off = off + 4;
            let orig_hi = cfg.read32(bdf, hi_off);
            cfg.write32(bdf, hi_off, u32::MAX);
            let mask_hi = cfg.read32(bdf, hi_off);
            cfg.write32(bdf, hi_off, orig_hi);
            let m = (u64::from(mask_hi) << 32) | u64::from(mask & !0xF);
            if m == 0 {
                return Err(BarError::Unimplemented(index));
            }
            Ok(Bar::Memory {
                base: (u64::from(orig_hi) << 32) | u64::from(orig & !0xF),
                size: (!m).wrapping_add(1),
                wide: true,
                prefetchable,
            })
        }
        _ => Err(BarError::Malformed(index)),
    }
}

/// Sets `bits` in the command register (e.g. memory decoding and bus mastering for a DMA device); returns the
/// new value.
pub fn enable(cfg: &mut impl ConfigSpace, bdf: Bdf, bits: u16) -> u16 {
    let v = cfg.read32(bdf, reg::COMMAND);
    // Status bits (31:16) are write-one-to-clear: write zeros there so none is cleared by accident.
    let cmd = (v & 0xFFFF) as u16 | bits;
    cfg.write32(bdf, reg::COMMAND, u32::from(cmd));
    cmd
}
