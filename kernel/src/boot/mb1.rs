//! Multiboot 1 information, parsed by hand (Multiboot Specification 0.6.96, section 3.3).
//!
//! Every read is bounds-checked against the 4 GiB the early page tables identity-map, sizes are checked against
//! sane maxima before they are used, and memory-map entries must lie within `mmap_addr..mmap_addr+mmap_length`.

use super::{BootError, BootInfo, Firmware, Loader, RegionKind, LOADER_LIMIT};

/// `flags` bit: `mem_lower`/`mem_upper` valid.
const FLAG_MEM: u32 = 1 << 0;
/// `flags` bit: `cmdline` valid.
const FLAG_CMDLINE: u32 = 1 << 2;
/// `flags` bit: `mods_*` valid.
const FLAG_MODS: u32 = 1 << 3;
/// `flags` bit: `mmap_*` valid.
const FLAG_MMAP: u32 = 1 << 6;
/// Size of the fixed information structure we read (up to and including `mmap_addr`).
const INFO_SIZE: u64 = 52;
/// Longest string we scan for its terminator.
const MAX_STRING: u64 = 4096;
/// Largest memory map accepted.
const MAX_MMAP_BYTES: u64 = 64 * 1024;
/// Most modules accepted.
const MAX_MODS: u64 = 64;

/// Reads a little-endian u32 at physical `addr` after checking `addr+4` is below 4 GiB.
fn read_u32(addr: u64) -> Result<u32, BootError> {
    if addr.checked_add(4).is_none_or(|end| end > LOADER_LIMIT) {
        return Err(BootError::BadPointer(addr));
    }
    // SAFETY: the early page tables identity-map all of 0..4 GiB, checked just above; unaligned reads are fine.
    Ok(unsafe { core::ptr::read_unaligned(addr as *const u32) })
}

fn read_u64(addr: u64) -> Result<u64, BootError> {
    Ok(u64::from(read_u32(addr)?) | (u64::from(read_u32(addr + 4)?) << 32))
}

/// Reads a NUL-terminated string at `addr`; invalid UTF-8 is cut at the first bad byte.
fn read_cstr(addr: u64) -> Result<&'static str, BootError> {
    if addr == 0 || addr >= LOADER_LIMIT {
        return Err(BootError::BadPointer(addr));
    }
    let max = MAX_STRING.min(LOADER_LIMIT - addr);
    let len = (0..max)
        // SAFETY: addr + i < 4 GiB, identity-mapped by the early page tables.
        .position(|i| unsafe { core::ptr::read((addr + i) as *const u8) } == 0)
        .ok_or(BootError::BadSize("string", max))?;
    // SAFETY: the `len` bytes at addr are identity-mapped, were just read, and are not written while booting.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    Ok(match core::str::from_utf8(bytes) {
        Ok(s) => s,
        // The prefix up to valid_up_to is valid UTF-8 by definition.
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    })
}

/// Parses the Multiboot 1 information structure at physical `info`.
pub fn parse(info: u64) -> Result<BootInfo, BootError> {
    if info == 0 || !info.is_multiple_of(4) || info + INFO_SIZE > LOADER_LIMIT {
        return Err(BootError::BadPointer(info));
    }
    let mut bi = BootInfo::new(Loader::Multiboot1);
    bi.firmware = Firmware::Bios;
    bi.add_reserved(info, info + INFO_SIZE);
    let flags = read_u32(info)?;

    if flags & FLAG_CMDLINE != 0 {
        let addr = u64::from(read_u32(info + 16)?);
        let s = read_cstr(addr)?;
        super::push_truncated(&mut bi.cmdline, s);
    }

    if flags & FLAG_MMAP != 0 {
        let len = u64::from(read_u32(info + 44)?);
        let base = u64::from(read_u32(info + 48)?);
        if len > MAX_MMAP_BYTES || base + len > LOADER_LIMIT {
            return Err(BootError::BadSize("memory map", len));
        }
        bi.add_reserved(base, base + len);
        let end = base + len;
        let mut cur = base;
        // Each entry: size (u32, not counting itself), base (u64), length (u64), type (u32).
        while cur < end {
            let size = u64::from(read_u32(cur)?);
            if size < 20 || cur + 4 + size > end {
                return Err(BootError::BadMemoryMap("entry size out of bounds"));
            }
            let start = read_u64(cur + 4)?;
            let length = read_u64(cur + 12)?;
            let kind = match read_u32(cur + 20)? {
                1 => RegionKind::Usable,
                3 => RegionKind::AcpiReclaimable,
                4 => RegionKind::AcpiNvs,
                5 => RegionKind::Bad,
                _ => RegionKind::Reserved,
            };
            bi.add_region(start, length, kind)?;
            cur += 4 + size;
        }
    } else if flags & FLAG_MEM != 0 {
        // Only the legacy sizes: conventional memory from 0 and extended memory from 1 MiB, in KiB.
        let lower = u64::from(read_u32(info + 4)?);
        let upper = u64::from(read_u32(info + 8)?);
        bi.add_region(0, lower * 1024, RegionKind::Usable)?;
        bi.add_region(1 << 20, upper * 1024, RegionKind::Usable)?;
    } else {
        return Err(BootError::NoMemoryMap);
    }
    bi.finish_regions()?;

    if flags & FLAG_MODS != 0 {
        let count = u64::from(read_u32(info + 20)?);
        let addr = u64::from(read_u32(info + 24)?);
        if count > MAX_MODS || addr + count * 16 > LOADER_LIMIT {
            return Err(BootError::BadSize("module list", count));
        }
        bi.add_reserved(addr, addr + count * 16);
        for i in 0..count {
            let entry = addr + i * 16;
            let start = u64::from(read_u32(entry)?);
            let end = u64::from(read_u32(entry + 4)?);
            let string = u64::from(read_u32(entry + 8)?);
            let cmdline = if string == 0 { "" } else { read_cstr(string)? };
            bi.add_module(start, end, cmdline)?;
        }
    }
    Ok(bi)
}
