//! Boot information: what the Multiboot 1 or 2 loader tells us, copied into one loader-neutral [`BootInfo`].
//!
//! Design: parsing runs once on the BSP while the early identity map covers the first 4 GiB (every Multiboot
//! structure is below 4 GiB). Everything later code needs (command line, memory map, modules, RSDP location) is
//! copied into fixed-capacity storage, so nothing keeps pointing into the loader's structures; their physical
//! ranges are still recorded in [`BootInfo::reserved`] so the frame allocator leaves them alone.
//!
//! Invariants: every range is `start < end`; a structure that points outside 4 GiB, overruns its declared size or
//! is missing a mandatory part yields a [`BootError`], which the caller turns into `CV:FATAL` and a clean stop.

pub mod mb1;
pub mod mb2;
pub mod selftest;

use core::fmt;

/// Memory-map entries kept (adjacent entries of the same kind are merged first).
pub const MAX_REGIONS: usize = 256;
/// Boot modules kept.
pub const MAX_MODULES: usize = 32;
/// Loader structures recorded as reserved.
pub const MAX_RESERVED: usize = 8;
/// Longest command line kept, in bytes.
pub const MAX_CMDLINE: usize = 1024;
/// Longest module command line kept, in bytes.
pub const MAX_MODULE_CMDLINE: usize = 128;
/// Everything the loader hands over lies below this (32-bit physical addresses).
pub const LOADER_LIMIT: u64 = 1 << 32;

/// Which Multiboot protocol booted us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    /// Multiboot 1 (QEMU `-kernel`, GRUB `multiboot`).
    Multiboot1,
    /// Multiboot 2 (GRUB `multiboot2`).
    Multiboot2,
}

/// Firmware below the loader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS.
    Bios,
    /// UEFI (the loader passed an EFI system table).
    Uefi,
}

/// Kind of a memory-map range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Free RAM.
    Usable,
    /// ACPI tables (reclaimable once parsed; we keep them).
    AcpiReclaimable,
    /// ACPI non-volatile storage.
    AcpiNvs,
    /// Defective RAM.
    Bad,
    /// Anything else: firmware, MMIO, unknown types.
    Reserved,
}

impl RegionKind {
    /// RAM of any kind (is part of the direct map's minimum extent).
    pub fn is_ram(self) -> bool {
        !matches!(self, Self::Reserved)
    }
}

/// One physical range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// What it is.
    pub kind: RegionKind,
}

/// A boot module (guest image, VM configuration).
#[derive(Clone, Debug)]
pub struct Module {
    /// First byte (physical).
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The module's command line (truncated to [`MAX_MODULE_CMDLINE`]).
    pub cmdline: heapless::String<MAX_MODULE_CMDLINE>,
}

/// Where the ACPI root table is, as the loader reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsdpInfo {
    /// ACPI 1.0 RSDP copy: physical address of the RSDT.
    Rsdt(u64),
    /// ACPI 2.0+ RSDP copy: physical address of the XSDT.
    Xsdt(u64),
}

/// Why the boot information is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// `eax` held neither Multiboot magic.
    BadMagic(u32),
    /// The information pointer is null, misaligned or too high.
    BadPointer(u64),
    /// A structure's size field is implausible or runs past 4 GiB.
    BadSize(&'static str, u64),
    /// The loader passed no memory information at all.
    NoMemoryMap,
    /// A memory-map entry is malformed.
    BadMemoryMap(&'static str),
    /// More memory-map entries than [`MAX_REGIONS`] after merging.
    TooManyRegions,
    /// More modules than [`MAX_MODULES`].
    TooManyModules,
    /// A module's range is empty, reversed or beyond 4 GiB.
    BadModule(u64, u64),
    /// The `multiboot2` crate rejected the structure.
    Multiboot2(&'static str),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic(m) => {
                write!(f, "unknown boot loader magic {m:#x} (not Multiboot 1 or 2)")
            }
            Self::BadPointer(p) => write!(
                f,
                "boot information pointer {p:#x} is null, misaligned or above 4 GiB"
            ),
            Self::BadSize(what, n) => {
                write!(f, "boot information {what} has implausible size {n:#x}")
            }
            Self::NoMemoryMap => f.write_str("boot information has no memory map"),
            Self::BadMemoryMap(why) => write!(f, "malformed memory map: {why}"),
            Self::TooManyRegions => {
                write!(f, "memory map has more than {MAX_REGIONS} distinct regions")
            }
            Self::TooManyModules => write!(f, "more than {MAX_MODULES} boot modules"),
            Self::BadModule(s, e) => write!(f, "boot module range {s:#x}..{e:#x} is invalid"),
            Self::Multiboot2(why) => write!(f, "multiboot2 information rejected: {why}"),
        }
    }
}

/// Loader-neutral boot information.
#[derive(Debug)]
pub struct BootInfo {
    /// Protocol used.
    pub loader: Loader,
    /// Firmware type.
    pub firmware: Firmware,
    /// Kernel command line (truncated to [`MAX_CMDLINE`] bytes at a character boundary).
    pub cmdline: heapless::String<MAX_CMDLINE>,
    /// Memory map, sorted by start address.
    pub regions: heapless::Vec<Region, MAX_REGIONS>,
    /// Boot modules.
    pub modules: heapless::Vec<Module, MAX_MODULES>,
    /// ACPI root table location, when the loader passed an RSDP copy.
    pub rsdp: Option<RsdpInfo>,
    /// Physical ranges of the loader's own structures.
    pub reserved: heapless::Vec<(u64, u64), MAX_RESERVED>,
}

impl BootInfo {
    fn new(loader: Loader) -> Self {
        Self {
            loader,
            firmware: Firmware::Bios,
            cmdline: heapless::String::new(),
            regions: heapless::Vec::new(),
            modules: heapless::Vec::new(),
            rsdp: None,
            reserved: heapless::Vec::new(),
        }
    }

    /// Adds a memory-map entry, merging it with an adjacent one of the same kind; empty entries are skipped.
    fn add_region(&mut self, start: u64, len: u64, kind: RegionKind) -> Result<(), BootError> {
        if len == 0 {
            return Ok(());
        }
        let end = start
            .checked_add(len)
            .ok_or(BootError::BadMemoryMap("entry wraps around 2^64"))?;
        if let Some(last) = self.regions.last_mut() {
            if last.kind == kind && last.end == start {
                last.end = end;
                return Ok(());
            }
        }
        self.regions
            .push(Region { start, end, kind })
            .map_err(|_| BootError::TooManyRegions)
    }

    /// Sorts the map by address once all entries are in (loaders do not promise order).
    fn finish_regions(&mut self) -> Result<(), BootError> {
        self.regions.sort_unstable_by_key(|r| r.start);
        if !self.regions.iter().any(|r| r.kind == RegionKind::Usable) {
            return Err(BootError::NoMemoryMap);
        }
        Ok(())
    }

    fn add_module(&mut self, start: u64, end: u64, cmdline: &str) -> Result<(), BootError> {
        if start > end || end > LOADER_LIMIT {
            return Err(BootError::BadModule(start, end));
        }
        let mut m = Module {
            start,
            end,
            cmdline: heapless::String::new(),
        };
        push_truncated(&mut m.cmdline, cmdline);
        self.modules.push(m).map_err(|_| BootError::TooManyModules)
    }

    fn add_reserved(&mut self, start: u64, end: u64) {
        if start < end {
            // MAX_RESERVED exceeds what either parser records.
            let _ = self.reserved.push((start, end));
        }
    }

    /// Total usable RAM in bytes.
    pub fn usable_bytes(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.kind == RegionKind::Usable)
            .map(|r| r.end - r.start)
            .sum()
    }
}

/// Appends as much of `s` as fits, cutting at a character boundary.
fn push_truncated<const N: usize>(out: &mut heapless::String<N>, s: &str) {
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
}

/// Parses the boot information for the loader identified by `magic`.
pub fn parse(magic: u32, info: u64) -> Result<BootInfo, BootError> {
    use crate::arch::x86_64::entry;
    match magic {
        entry::MB1_BOOT_MAGIC => mb1::parse(info),
        entry::MB2_BOOT_MAGIC => mb2::parse(info),
        other => Err(BootError::BadMagic(other)),
    }
}
