//! Guest page walk: linear to guest-physical address translation through the guest's own page tables, read
//! through [`GuestMemory`] only.
//!
//! Modes (Intel SDM Vol. 3A Chapter 4; AMD APM Vol. 2 Chapter 5): paging off (linear = physical, 32 bits), 32-bit
//! paging (4 KiB pages, 4 MiB pages with CR4.PSE, PSE-36 high bits), PAE paging (4 KiB / 2 MiB pages) and 4- or
//! 5-level paging in IA-32e mode (4 KiB / 2 MiB / 1 GiB pages).
//!
//! Checks: present bits, PS in a level that cannot map a page (reserved), canonical addresses in IA-32e mode, and
//! the permissions of the access (user pages for CPL 3, R/W for user writes and for supervisor writes under
//! CR0.WP, XD for fetches under EFER.NXE), accumulated over every level as the hardware does.
//!
//! Not modelled: accessed/dirty bit updates (the walk only reads guest memory; the instruction fetch that caused
//! the exit already set the accessed bits), SMEP/SMAP, protection keys, and the PAE PDPTE registers (the PDPTEs
//! are read from memory at CR3, which differs from the hardware only if the guest changed them without reloading
//! CR3). MAXPHYADDR is taken as 52.
//!
//! Invariant: a walk never panics and never reads outside guest RAM; any failure is a [`WalkError`] value.

use crate::memory::GuestMemory;
use crate::vcpu::{ControlState, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, EFER_NXE};

/// 4 KiB.
pub const PAGE: u64 = 4096;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;
/// Physical-address bits 51:12 of a 64-bit entry.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// The kind of access a translation is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    pub fetch: bool,
}

impl Access {
    /// A data read.
    pub const READ: Self = Self {
        write: false,
        fetch: false,
    };
    /// A data write.
    pub const WRITE: Self = Self {
        write: true,
        fetch: false,
    };
    /// An instruction fetch.
    pub const FETCH: Self = Self {
        write: false,
        fetch: true,
    };
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// A paging-structure entry at `level` (1 = page table) is not present.
    NotPresent { linear: u64, level: u8 },
    /// An entry at `level` has a reserved bit set (PS where no page can be mapped).
    Reserved { linear: u64, level: u8 },
    /// The page is mapped but the access is not allowed (user, write or execute).
    Protection { linear: u64 },
    /// The address is not canonical in IA-32e mode.
    NonCanonical { linear: u64 },
    /// A paging-structure entry or the data lies outside guest RAM (guest-physical `gpa`).
    OutsideRam { linear: u64, gpa: u64 },
}

impl WalkError {
    /// The linear address that failed.
    pub const fn linear(&self) -> u64 {
        match *self {
            Self::NotPresent { linear, .. }
            | Self::Reserved { linear, .. }
            | Self::Protection { linear }
            | Self::NonCanonical { linear }
            | Self::OutsideRam { linear, .. } => linear,
        }
    }
}

/// Rights accumulated over the levels of a walk.
#[derive(Clone, Copy)]
struct Rights {
    write: bool,
    user: bool,
    exec: bool,
}

impl Rights {
    const ALL: Self = Self {
        write: true,
        user: true,
        exec: true,
    };

    fn and(self, entry: u64, nxe: bool) -> Self {
        Self {
            write: self.write && entry & RW != 0,
            user: self.user && entry & US != 0,
            exec: self.exec && !(nxe && entry & XD != 0),
        }
    }
}

/// Translates `linear` for `access` in the guest's current paging mode.
///
/// # Errors
/// [`WalkError`] for a missing or reserved entry, a refused access, a non-canonical address, or a table outside
/// RAM.
pub fn translate(
    mem: &dyn GuestMemory,
    cs: &ControlState,
    linear: u64,
    access: Access,
) -> Result<u64, WalkError> {
    if cs.cr0 & CR0_PG == 0 {
        return Ok(linear & 0xFFFF_FFFF);
    }
    let (gpa, rights) = if cs.efer & crate::vcpu::EFER_LMA != 0 {
        walk_ia32e(mem, cs, linear)?
    } else if cs.cr4 & CR4_PAE != 0 {
        walk_pae(mem, cs, linear & 0xFFFF_FFFF)?
    } else {
        walk_32(mem, cs, linear & 0xFFFF_FFFF)?
    };
    let user = cs.cpl == 3;
    let allowed = (!user || rights.user)
        && (!access.write || rights.write || (!user && cs.cr0 & CR0_WP == 0))
        && (!access.fetch || rights.exec);
    if allowed {
        Ok(gpa)
    } else {
        Err(WalkError::Protection { linear })
    }
}

fn read_u64(mem: &dyn GuestMemory, gpa: u64, linear: u64) -> Result<u64, WalkError> {
    let mut b = [0u8; 8];
    mem.read(gpa, &mut b)
        .map_err(|_| WalkError::OutsideRam { linear, gpa })?;
    Ok(u64::from_le_bytes(b))
}

fn read_u32(mem: &dyn GuestMemory, gpa: u64, linear: u64) -> Result<u32, WalkError> {
    let mut b = [0u8; 4];
    mem.read(gpa, &mut b)
        .map_err(|_| WalkError::OutsideRam { linear, gpa })?;
    Ok(u32::from_le_bytes(b))
}

/// Walks 64-bit entries from `table` down to level 1, starting at `top`; levels 2 and 3 may map large pages
/// (level 3 only when `gib_pages`).
fn walk_64(
    mem: &dyn GuestMemory,
    mut table: u64,
    top: u8,
    linear: u64,
    nxe: bool,
    mut rights: Rights,
    gib_pages: bool,
) -> Result<(u64, Rights), WalkError> {
    let mut level = top;
    loop {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (linear >> shift) & 0x1FF;
        let entry = read_u64(mem, table + index * 8, linear)?;
        if entry & P == 0 {
            return Err(WalkError::NotPresent { linear, level });
        }
        rights = rights.and(entry, nxe);
        if level == 1 {
            return Ok(((entry & ADDR_MASK) | (linear & (PAGE - 1)), rights));
        }
        if entry & PS != 0 {
            if level == 2 || (level == 3 && gib_pages) {
                let page_mask = (1u64 << shift) - 1;
                return Ok((
                    (entry & ADDR_MASK & !page_mask) | (linear & page_mask),
                    rights,
                ));
            }
            return Err(WalkError::Reserved { linear, level });
        }
        table = entry & ADDR_MASK;
        level -= 1;
    }
}

fn walk_ia32e(
    mem: &dyn GuestMemory,
    cs: &ControlState,
    linear: u64,
) -> Result<(u64, Rights), WalkError> {
    let levels: u8 = if cs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    // Canonical: bits 63..(width-1) all equal (width 48 or 57).
    let width = 12 + 9 * u32::from(levels);
    let high = linear.cast_signed() >> (width - 1);
    if high != 0 && high != -1 {
        return Err(WalkError::NonCanonical { linear });
    }
    walk_64(
        mem,
        cs.cr3 & ADDR_MASK,
        levels,
        linear,
        cs.efer & EFER_NXE != 0,
        Rights::ALL,
        true,
    )
}

fn walk_pae(
    mem: &dyn GuestMemory,
    cs: &ControlState,
    linear: u64,
) -> Result<(u64, Rights), WalkError> {
    // PDPT: 32-byte aligned at CR3[31:5]; its entries carry no R/W, U/S or XD (SDM §4.4.1).
    let pdpte_gpa = (cs.cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8;
    let pdpte = read_u64(mem, pdpte_gpa, linear)?;
    if pdpte & P == 0 {
        return Err(WalkError::NotPresent { linear, level: 3 });
    }
    walk_64(
        mem,
        pdpte & ADDR_MASK,
        2,
        linear,
        cs.efer & EFER_NXE != 0,
        Rights::ALL,
        false,
    )
}

fn walk_32(
    mem: &dyn GuestMemory,
    cs: &ControlState,
    linear: u64,
) -> Result<(u64, Rights), WalkError> {
    let pde = u64::from(read_u32(
        mem,
        (cs.cr3 & 0xFFFF_F000) + ((linear >> 22) & 0x3FF) * 4,
        linear,
    )?);
    if pde & P == 0 {
        return Err(WalkError::NotPresent { linear, level: 2 });
    }
    let rights = Rights::ALL.and(pde, false);
    if pde & PS != 0 && cs.cr4 & CR4_PSE != 0 {
        // 4 MiB page: bits 31:22 from the PDE, PSE-36 bits 39:32 from PDE bits 20:13 (SDM Table 4-4).
        let base = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32);
        return Ok((base | (linear & 0x3F_FFFF), rights));
    }
    let pte = u64::from(read_u32(
        mem,
        (pde & 0xFFFF_F000) + ((linear >> 12) & 0x3FF) * 4,
        linear,
    )?);
    if pte & P == 0 {
        return Err(WalkError::NotPresent { linear, level: 1 });
    }
    Ok((
        (pte & 0xFFFF_F000) | (linear & 0xFFF),
        rights.and(pte, false),
    ))
}

/// Copies `buf.len()` bytes from linear `linear`, translating each page separately (a range may cross pages that
/// are not physically contiguous).
///
/// # Errors
/// The first failed translation or out-of-RAM page; `buf` may then be partly written.
pub fn read_linear(
    mem: &dyn GuestMemory,
    cs: &ControlState,
    linear: u64,
    buf: &mut [u8],
    access: Access,
) -> Result<(), WalkError> {
    for_each_page(linear, buf.len(), |at, off, len| {
        let gpa = translate(mem, cs, at, access)?;
        mem.read(gpa, &mut buf[off..off + len])
            .map_err(|_| WalkError::OutsideRam { linear: at, gpa })
    })
}

/// Copies `data` to linear `linear`. Every page of the range is translated and checked first, so nothing is
/// written when any of them faults.
///
/// # Errors
/// As [`read_linear`]; nothing is written then.
pub fn write_linear(
    mem: &mut dyn GuestMemory,
    cs: &ControlState,
    linear: u64,
    data: &[u8],
) -> Result<(), WalkError> {
    for_each_page(linear, data.len(), |at, _, len| {
        let gpa = translate(mem, cs, at, Access::WRITE)?;
        crate::memory::check_range(gpa, len as u64, mem.size())
            .map_err(|_| WalkError::OutsideRam { linear: at, gpa })
    })?;
    for_each_page(linear, data.len(), |at, off, len| {
        let gpa = translate(mem, cs, at, Access::WRITE)?;
        mem.write(gpa, &data[off..off + len])
            .map_err(|_| WalkError::OutsideRam { linear: at, gpa })
    })
}

/// Calls `f(linear, offset, len)` for each page-bounded piece of `[linear, linear + total)`.
fn for_each_page(
    linear: u64,
    total: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let mut done = 0usize;
    while done < total {
        let at = linear.wrapping_add(done as u64);
        let chunk = chunk_len(at, total - done);
        f(at, done, chunk)?;
        done += chunk;
    }
    Ok(())
}

/// Bytes from `at` to the end of its page, at most `left`.
fn chunk_len(at: u64, left: usize) -> usize {
    let to_page_end = PAGE - (at & (PAGE - 1));
    usize::try_from(to_page_end).map_or(left, |p| p.min(left))
}

/// Fetches up to 15 instruction bytes at linear `linear` into `buf`; returns how many were fetched. The bytes up
/// to the end of the first page must be readable; the following page is fetched only if it translates (an
/// instruction that ends before it does not need it, and the decoder reports a truncated one).
///
/// # Errors
/// The first page does not translate for a fetch or lies outside RAM.
pub fn fetch(
    mem: &dyn GuestMemory,
    cs: &ControlState,
    linear: u64,
    buf: &mut [u8; 15],
) -> Result<usize, WalkError> {
    let first = chunk_len(linear, buf.len());
    read_linear(mem, cs, linear, &mut buf[..first], Access::FETCH)?;
    if first < buf.len() {
        let next = linear.wrapping_add(first as u64);
        if read_linear(mem, cs, next, &mut buf[first..], Access::FETCH).is_ok() {
            return Ok(buf.len());
        }
    }
    Ok(first)
}

#[cfg(test)]
#[path = "walk_tests.rs"]
mod tests;
