//! Kernel page tables: identity map of the low 4 GiB, direct map of all RAM, MMIO window, 4 KiB map/unmap.
//!
//! Layout (4-level paging):
//! - `0 .. 4 GiB`: identity, 2 MiB pages, except the first 2 MiB in 4 KiB pages with page 0 absent (null
//!   pointers fault). The kernel image (linked at 2 MiB), the AP trampoline and the loader's structures live here.
//! - [`PHYS_OFFSET`] `+ 0 .. top`: direct map of physical memory, `top` = max(4 GiB, end of the highest RAM
//!   range) rounded up to 1 GiB; 1 GiB pages when the CPU has them, else 2 MiB; never executable. Memory-type:
//!   write-back by PAT, so the firmware's MTRRs decide for MMIO holes; device registers are mapped uncached in
//!   the MMIO window instead.
//! - [`MMIO_BASE`] ..: device registers mapped on demand with 4 KiB uncached pages ([`map_mmio`]).
//!
//! Until [`init`] switches CR3 the early boot tables (identity 0..4 GiB) are live and [`phys_to_virt`] is the
//! identity, so everything built before the switch comes from frames below 4 GiB.
//!
//! Invariants: the kernel PML4 is in .bss (below 4 GiB, as the AP trampoline loads CR3 in 32-bit mode) and is
//! shared by all CPUs; changes go through [`PAGING`] (a leaf lock below nothing but the frame allocator). Unmapping
//! flushes only the local TLB: mappings torn down here are used by one CPU at a time.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use spin::Mutex;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

use super::cpu;
use super::entry::PageAligned;
use crate::boot::BootInfo;
use crate::mm::{frame, PAGE_SIZE};

/// Start of the direct map.
pub const PHYS_OFFSET: u64 = 0xFFFF_8000_0000_0000;
/// Start of the MMIO window.
pub const MMIO_BASE: u64 = 0xFFFF_FF00_0000_0000;
/// Size of the MMIO window.
pub const MMIO_SIZE: u64 = 1 << 30;
/// Identity-mapped extent.
pub const IDENTITY_END: u64 = 4 << 30;

/// Page-table entry flags used here (Intel SDM Vol. 3A, 4.5).
pub mod flags {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// Page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// Page-level cache disable.
    pub const PCD: u64 = 1 << 4;
    /// Large page (in a PDPT or PD entry).
    pub const PS: u64 = 1 << 7;
    /// No-execute (only when EFER.NXE is set).
    pub const NX: u64 = 1 << 63;
}

const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

static mut KERNEL_PML4: PageAligned<4096> = PageAligned([0; 4096]);
static KERNEL_PML4_PHYS: AtomicU64 = AtomicU64::new(0);
static DIRECT_MAP_READY: AtomicBool = AtomicBool::new(false);
static NX_ENABLED: AtomicBool = AtomicBool::new(false);
static MMIO_NEXT: AtomicU64 = AtomicU64::new(MMIO_BASE);
/// Serialises page-table changes after [`init`].
static PAGING: Mutex<()> = Mutex::new(());

/// Why paging could not be set up or changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingError {
    /// No frame for a page table.
    OutOfFrames,
    /// The address is already mapped.
    AlreadyMapped(u64),
    /// A large page covers the address.
    HugePage(u64),
    /// The address or size is not page aligned, or not canonical.
    BadAddress(u64),
    /// The MMIO window is exhausted.
    MmioWindowFull,
}

/// Virtual address at which physical `phys` can be accessed now.
pub fn phys_to_virt(phys: u64) -> *mut u8 {
    if DIRECT_MAP_READY.load(Ordering::Acquire) {
        (PHYS_OFFSET + phys) as *mut u8
    } else {
        // Early tables identity-map 0..4 GiB; callers before init only use frames below it.
        phys as *mut u8
    }
}

/// Physical address of the kernel PML4 (for the AP trampoline).
pub fn kernel_cr3() -> u64 {
    KERNEL_PML4_PHYS.load(Ordering::Acquire)
}

/// Whether NX may be used in entries.
fn nx() -> u64 {
    if NX_ENABLED.load(Ordering::Relaxed) {
        flags::NX
    } else {
        0
    }
}

/// The table an entry points to (allocating a zeroed one when absent).
///
/// # Safety
/// `entry` belongs to a live page table reachable by [`phys_to_virt`].
unsafe fn next_table(entry: *mut u64, va: u64, early: bool) -> Result<*mut u64, PagingError> {
    // SAFETY: forwarded to the caller.
    let e = unsafe { entry.read_volatile() };
    if e & flags::P != 0 {
        if e & flags::PS != 0 {
            return Err(PagingError::HugePage(va));
        }
        return Ok(phys_to_virt(e & ADDR_MASK).cast());
    }
    let limit = if early { IDENTITY_END } else { u64::MAX };
    let table = frame::alloc_zeroed_below(limit).ok_or(PagingError::OutOfFrames)?;
    // SAFETY: as above; the new table is zeroed and owned by the page tables from now on.
    unsafe { entry.write_volatile(table | flags::P | flags::RW) };
    Ok(phys_to_virt(table).cast())
}

fn index(va: u64, level: u32) -> usize {
    // 9 bits per level; the mask makes the cast lossless.
    #[allow(clippy::cast_possible_truncation)]
    let i = ((va >> (12 + 9 * level)) & 0x1FF) as usize;
    i
}

/// Pointer to the PML4 of the kernel tables.
fn pml4_ptr() -> *mut u64 {
    phys_to_virt(kernel_cr3()).cast()
}

/// Builds the kernel tables from the memory map and switches CR3 to them.
pub fn init(bi: &BootInfo) -> Result<(), PagingError> {
    let ext = cpu::cpuid(0x8000_0001, 0);
    let gib_pages = ext.edx & (1 << 26) != 0;
    // SAFETY: IA32_EFER exists on every x86_64 CPU.
    let efer = unsafe { cpu::rdmsr(cpu::IA32_EFER) };
    NX_ENABLED.store(efer & (1 << 11) != 0, Ordering::Relaxed);

    // The kernel is identity-linked, so the PML4's address is its physical address.
    let pml4_phys = core::ptr::addr_of!(KERNEL_PML4) as u64;
    KERNEL_PML4_PHYS.store(pml4_phys, Ordering::Release);
    let pml4 = pml4_ptr();

    // Identity 0..4 GiB.
    // SAFETY: pml4 is the zeroed, page-aligned kernel PML4 (identity-mapped by the early tables); every table
    // reached below is freshly allocated below 4 GiB and zeroed.
    unsafe {
        let pdpt = next_table(pml4, 0, true)?;
        for gib in 0..4u64 {
            let pd = next_table(pdpt.add(index(gib << 30, 2)), gib << 30, true)?;
            for i in 0..512u64 {
                let pa = (gib << 30) | (i << 21);
                if pa == 0 {
                    let pt = next_table(pd, 0, true)?;
                    for j in 1..512u64 {
                        pt.add(index(j << 12, 0))
                            .write_volatile((j << 12) | flags::P | flags::RW);
                    }
                } else {
                    pd.add(index(pa, 1))
                        .write_volatile(pa | flags::P | flags::RW | flags::PS);
                }
            }
        }
    }

    // Direct map.
    let ram_top = bi
        .regions
        .iter()
        .filter(|r| r.kind.is_ram())
        .map(|r| r.end)
        .max()
        .unwrap_or(0);
    let top = ram_top.max(IDENTITY_END).next_multiple_of(1 << 30);
    let leaf = flags::P | flags::RW | flags::PS | nx();
    let mut pa = 0;
    while pa < top {
        let va = PHYS_OFFSET + pa;
        // SAFETY: as above; the direct-map half of the PML4 is empty before this loop.
        unsafe {
            let pdpt = next_table(pml4.add(index(va, 3)), va, true)?;
            if gib_pages {
                pdpt.add(index(va, 2)).write_volatile(pa | leaf);
            } else {
                let pd = next_table(pdpt.add(index(va, 2)), va, true)?;
                for i in 0..512u64 {
                    let p = pa | (i << 21);
                    pd.add(index(PHYS_OFFSET + p, 1)).write_volatile(p | leaf);
                }
            }
        }
        pa += 1 << 30;
    }

    let frame = PhysFrame::from_start_address(PhysAddr::new(pml4_phys))
        .map_err(|_| PagingError::BadAddress(pml4_phys))?;
    // SAFETY: the new tables map the kernel image, its stacks and the loader's structures at the same (identity)
    // addresses as the early tables, so execution continues unchanged after the switch.
    unsafe { Cr3::write(frame, Cr3Flags::empty()) };
    DIRECT_MAP_READY.store(true, Ordering::Release);
    log::info!(
        "direct map of {} GiB at {:#x} with {} pages, NX {}",
        top >> 30,
        PHYS_OFFSET,
        if gib_pages { "1 GiB" } else { "2 MiB" },
        if nx() != 0 { "on" } else { "off" }
    );
    Ok(())
}

/// Maps the 4 KiB page at `va` to `pa` with `extra` flags (present is implied).
pub fn map_4k(va: u64, pa: u64, extra: u64) -> Result<(), PagingError> {
    if !va.is_multiple_of(PAGE_SIZE)
        || !pa.is_multiple_of(PAGE_SIZE)
        || VirtAddr::try_new(va).is_err()
    {
        return Err(PagingError::BadAddress(va));
    }
    let _guard = PAGING.lock();
    // SAFETY: the kernel tables are live and reachable through the direct map; PAGING serialises changes.
    unsafe {
        let mut table = pml4_ptr();
        for level in [3, 2, 1] {
            table = next_table(table.add(index(va, level)), va, false)?;
        }
        let pte = table.add(index(va, 0));
        if pte.read_volatile() & flags::P != 0 {
            return Err(PagingError::AlreadyMapped(va));
        }
        pte.write_volatile(pa | flags::P | extra);
    }
    Ok(())
}

/// Physical address `va` translates to in the kernel tables.
pub fn translate(va: u64) -> Option<u64> {
    VirtAddr::try_new(va).ok()?;
    // SAFETY: read-only walk of the live kernel tables through the direct map.
    unsafe {
        let mut table = pml4_ptr();
        for level in [3u32, 2, 1, 0] {
            let e = table.add(index(va, level)).read_volatile();
            if e & flags::P == 0 {
                return None;
            }
            let span = 1u64 << (12 + 9 * level);
            if level == 0 || e & flags::PS != 0 {
                return Some((e & ADDR_MASK & !(span - 1)) | (va & (span - 1)));
            }
            table = phys_to_virt(e & ADDR_MASK).cast();
        }
    }
    None
}

/// Unmaps the 4 KiB page at `va`; returns the physical address it mapped.
pub fn unmap_4k(va: u64) -> Option<u64> {
    VirtAddr::try_new(va).ok()?;
    let _guard = PAGING.lock();
    // SAFETY: as in map_4k.
    unsafe {
        let mut table = pml4_ptr();
        for level in [3u32, 2, 1] {
            let e = table.add(index(va, level)).read_volatile();
            if e & flags::P == 0 || e & flags::PS != 0 {
                return None;
            }
            table = phys_to_virt(e & ADDR_MASK).cast();
        }
        let pte = table.add(index(va, 0));
        let e = pte.read_volatile();
        if e & flags::P == 0 {
            return None;
        }
        pte.write_volatile(0);
        x86_64::instructions::tlb::flush(VirtAddr::new(va));
        Some(e & ADDR_MASK)
    }
}

/// Maps `size` bytes of device registers at physical `pa` uncached; returns the virtual address of `pa`.
pub fn map_mmio(pa: u64, size: u64) -> Result<u64, PagingError> {
    let first = pa & !(PAGE_SIZE - 1);
    let last = (pa + size.max(1)).next_multiple_of(PAGE_SIZE);
    let pages = (last - first) / PAGE_SIZE;
    let base = MMIO_NEXT.fetch_add(pages * PAGE_SIZE, Ordering::AcqRel);
    if base + pages * PAGE_SIZE > MMIO_BASE + MMIO_SIZE {
        return Err(PagingError::MmioWindowFull);
    }
    for i in 0..pages {
        map_4k(
            base + i * PAGE_SIZE,
            first + i * PAGE_SIZE,
            flags::RW | flags::PCD | flags::PWT | nx(),
        )?;
    }
    Ok(base + (pa - first))
}
