//! Multiboot 2 information through the `multiboot2` crate (Multiboot2 Specification 2.0, section 3.6).
//!
//! Before handing the pointer to the crate we check alignment and that `total_size` is plausible and ends below
//! 4 GiB, so the crate never reads past the early identity map. Firmware is UEFI when the loader passed an EFI
//! system-table tag; the RSDP comes from the ACPI new/old tags (the only source on UEFI machines).

use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

use super::{BootError, BootInfo, Firmware, Loader, RegionKind, RsdpInfo, LOADER_LIMIT};

/// Largest information structure accepted.
const MAX_TOTAL_SIZE: u64 = 1 << 20;

/// Parses the Multiboot 2 information structure at physical `info`.
pub fn parse(info: u64) -> Result<BootInfo, BootError> {
    if info == 0 || !info.is_multiple_of(8) || info + 8 > LOADER_LIMIT {
        return Err(BootError::BadPointer(info));
    }
    // SAFETY: info is 8-aligned and info+8 < 4 GiB, which the early page tables identity-map.
    let total = u64::from(unsafe { core::ptr::read(info as *const u32) });
    if !(16..=MAX_TOTAL_SIZE).contains(&total) || info + total > LOADER_LIMIT {
        return Err(BootError::BadSize("multiboot2 total_size", total));
    }
    // SAFETY: the whole structure (info..info+total) is identity-mapped readable memory, checked above, and the
    // loader's structure is not modified while we use it.
    let mbi = unsafe { BootInformation::load(info as *const BootInformationHeader) }
        .map_err(|_| BootError::Multiboot2("bad size or missing end tag"))?;

    let mut bi = BootInfo::new(Loader::Multiboot2);
    bi.add_reserved(info, info + total);
    if mbi.efi_sdt64_tag().is_some() || mbi.efi_sdt32_tag().is_some() {
        bi.firmware = Firmware::Uefi;
    }
    if let Some(cmd) = mbi.command_line_tag() {
        let s = cmd
            .cmdline()
            .map_err(|_| BootError::Multiboot2("command line is not valid UTF-8"))?;
        super::push_truncated(&mut bi.cmdline, s);
    }

    if let Some(map) = mbi.memory_map_tag() {
        for area in map.memory_areas() {
            let kind = match area.typ() {
                MemoryAreaType::Available => RegionKind::Usable,
                MemoryAreaType::AcpiAvailable => RegionKind::AcpiReclaimable,
                MemoryAreaType::ReservedHibernate => RegionKind::AcpiNvs,
                MemoryAreaType::Defective => RegionKind::Bad,
                _ => RegionKind::Reserved,
            };
            bi.add_region(area.start_address(), area.size(), kind)?;
        }
    } else if let Some(basic) = mbi.basic_memory_info_tag() {
        bi.add_region(
            0,
            u64::from(basic.memory_lower()) * 1024,
            RegionKind::Usable,
        )?;
        bi.add_region(
            1 << 20,
            u64::from(basic.memory_upper()) * 1024,
            RegionKind::Usable,
        )?;
    } else {
        return Err(BootError::NoMemoryMap);
    }
    bi.finish_regions()?;

    for m in mbi.module_tags() {
        let cmdline = m.cmdline().unwrap_or("");
        bi.add_module(
            u64::from(m.start_address()),
            u64::from(m.end_address()),
            cmdline,
        )?;
    }

    bi.rsdp = match (mbi.rsdp_v2_tag(), mbi.rsdp_v1_tag()) {
        (Some(v2), _) if v2.checksum_is_valid() && v2.xsdt_address() != 0 => Some(RsdpInfo::Xsdt(
            u64::try_from(v2.xsdt_address()).unwrap_or(0),
        )),
        (_, Some(v1)) if v1.checksum_is_valid() => Some(RsdpInfo::Rsdt(
            u64::try_from(v1.rsdt_address()).unwrap_or(0),
        )),
        _ => None,
    };
    Ok(bi)
}
