//! ACPI through the `acpi` crate: find the root table, parse the MADT into CPUs and I/O APICs.
//!
//! The RSDP comes from the boot information (Multiboot 2 ACPI tags; the only source on UEFI) or, on BIOS machines,
//! from the EBDA / 0xE0000-0xFFFFF scan. Tables are read through the direct map, so mapping is free and nothing is
//! unmapped. Only MADT entries are interpreted today; the tables stay reachable for later users (HPET, MCFG, DMAR).

use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};

use crate::arch::x86_64::paging;
use crate::boot::{BootInfo, Firmware, RsdpInfo};

/// Most CPUs recorded from the MADT.
pub const MAX_MADT_CPUS: usize = 256;
/// Most I/O APICs recorded.
pub const MAX_IOAPICS: usize = 16;

/// Maps ACPI tables through the direct map.
#[derive(Clone, Copy, Debug)]
pub struct DirectMapHandler;

impl AcpiHandler for DirectMapHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let virt =
            paging::phys_to_virt(u64::try_from(physical_address).unwrap_or(u64::MAX)).cast::<T>();
        // The direct map never yields a null pointer (it starts at PHYS_OFFSET).
        let ptr = NonNull::new(virt).unwrap_or(NonNull::dangling());
        // SAFETY: the direct map covers all RAM and the low 4 GiB, where firmware keeps ACPI tables; the caller
        // guarantees a valid T at physical_address.
        unsafe { PhysicalMapping::new(physical_address, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// A processor from the MADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuEntry {
    /// Local APIC id.
    pub apic_id: u32,
    /// ACPI processor UID.
    pub uid: u32,
    /// Usable now (flags bit 0).
    pub enabled: bool,
    /// May be brought online later (flags bit 1).
    pub online_capable: bool,
}

/// An I/O APIC from the MADT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoApicEntry {
    /// IOAPIC id.
    pub id: u8,
    /// Physical register base.
    pub address: u64,
    /// First global system interrupt.
    pub gsi_base: u32,
}

/// What we learnt from ACPI.
#[derive(Debug)]
pub struct AcpiInfo {
    /// ACPI revision of the root table.
    pub revision: u8,
    /// Where the RSDP came from.
    pub rsdp_source: &'static str,
    /// Number of tables listed in the root table.
    pub tables: usize,
    /// Processors, in MADT order.
    pub cpus: heapless::Vec<CpuEntry, MAX_MADT_CPUS>,
    /// I/O APICs.
    pub ioapics: heapless::Vec<IoApicEntry, MAX_IOAPICS>,
    /// The platform also has dual 8259s (MADT flags bit 0).
    pub has_8259: bool,
}

/// Why ACPI could not be used.
#[derive(Debug)]
pub enum AcpiError {
    /// No RSDP: none from the loader and (on UEFI) no BIOS area to scan, or the scan found nothing.
    NoRsdp,
    /// The `acpi` crate rejected a table.
    Tables(acpi::AcpiError),
    /// No MADT.
    NoMadt(acpi::AcpiError),
    /// More entries than we keep.
    TooMany(&'static str),
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoRsdp => f.write_str("no ACPI RSDP found (boot information or BIOS area)"),
            Self::Tables(e) => write!(f, "ACPI root table invalid: {e:?}"),
            Self::NoMadt(e) => write!(f, "ACPI MADT missing or invalid: {e:?}"),
            Self::TooMany(what) => write!(f, "MADT lists more {what} than supported"),
        }
    }
}

/// A physical address as the `acpi` crate wants it.
fn phys(a: u64) -> Result<usize, AcpiError> {
    usize::try_from(a).map_err(|_| AcpiError::NoRsdp)
}

/// Finds the ACPI tables and parses the MADT.
pub fn init(bi: &BootInfo) -> Result<AcpiInfo, AcpiError> {
    let h = DirectMapHandler;
    // SAFETY: addresses come from a checksummed RSDP copy (Multiboot 2 tags) or from the crate's own validated
    // BIOS-area search; the direct map covers them.
    let (tables, source) = unsafe {
        match bi.rsdp {
            Some(RsdpInfo::Xsdt(a)) => (AcpiTables::from_rsdt(h, 2, phys(a)?), "multiboot2-xsdt"),
            Some(RsdpInfo::Rsdt(a)) => (AcpiTables::from_rsdt(h, 0, phys(a)?), "multiboot2-rsdt"),
            None if bi.firmware == Firmware::Bios => {
                (AcpiTables::search_for_rsdp_bios(h), "bios-scan")
            }
            None => return Err(AcpiError::NoRsdp),
        }
    };
    let tables = tables.map_err(|e| match e {
        acpi::AcpiError::NoValidRsdp => AcpiError::NoRsdp,
        e => AcpiError::Tables(e),
    })?;
    let madt = tables.find_table::<Madt>().map_err(AcpiError::NoMadt)?;
    let mut info = AcpiInfo {
        revision: tables.revision(),
        rsdp_source: source,
        tables: tables.headers().count(),
        cpus: heapless::Vec::new(),
        ioapics: heapless::Vec::new(),
        has_8259: madt.get().supports_8259(),
    };
    for entry in madt.get().entries() {
        let cpu = match entry {
            MadtEntry::LocalApic(e) => {
                let flags = e.flags;
                CpuEntry {
                    apic_id: u32::from(e.apic_id),
                    uid: u32::from(e.processor_id),
                    enabled: flags & 1 != 0,
                    online_capable: flags & 2 != 0,
                }
            }
            MadtEntry::LocalX2Apic(e) => {
                let flags = e.flags;
                CpuEntry {
                    apic_id: e.x2apic_id,
                    uid: e.processor_uid,
                    enabled: flags & 1 != 0,
                    online_capable: flags & 2 != 0,
                }
            }
            MadtEntry::IoApic(e) => {
                let io = IoApicEntry {
                    id: e.io_apic_id,
                    address: u64::from(e.io_apic_address),
                    gsi_base: e.global_system_interrupt_base,
                };
                info.ioapics
                    .push(io)
                    .map_err(|_| AcpiError::TooMany("I/O APICs"))?;
                continue;
            }
            _ => continue,
        };
        // Firmware may list a CPU both as xAPIC and x2APIC entry; keep the first.
        if !info.cpus.iter().any(|c| c.apic_id == cpu.apic_id) {
            info.cpus
                .push(cpu)
                .map_err(|_| AcpiError::TooMany("processors"))?;
        }
    }
    Ok(info)
}
