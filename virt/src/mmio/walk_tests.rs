//! Page walks over page tables built in a fake guest memory, for every paging mode and page size.
#![allow(clippy::cast_possible_truncation)] // fixtures: small constants on a 64-bit host

use proptest::prelude::*;

use super::*;
use crate::memory::VecMemory;
use crate::vcpu::{CR0_PE, CR4_PAE, EFER_LMA};

const MEM: usize = 16 << 20;
/// Page tables are allocated from here up.
const TABLES: u64 = 0x80_0000;
const KIB4: u32 = 12;
const MIB2: u32 = 21;
const GIB1: u32 = 30;

/// A guest memory with a frame allocator for page tables.
struct Guest {
    mem: VecMemory,
    next: u64,
}

impl Guest {
    fn new() -> Self {
        Self {
            mem: VecMemory::new(MEM),
            next: TABLES,
        }
    }

    fn alloc(&mut self) -> u64 {
        let f = self.next;
        self.next += PAGE;
        f
    }

    fn put64(&mut self, gpa: u64, v: u64) {
        self.mem.write(gpa, &v.to_le_bytes()).unwrap();
    }

    fn get64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.mem.read(gpa, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    /// Maps `linear` to `phys` with a page of `1 << shift` bytes in the `levels`-level IA-32e tables at `root`;
    /// `flags` go on every level (P is added).
    fn map(&mut self, root: u64, levels: u8, linear: u64, phys: u64, shift: u32, flags: u64) {
        let mut table = root;
        let mut level = levels;
        loop {
            let lshift = 12 + 9 * u32::from(level - 1);
            let slot = table + ((linear >> lshift) & 0x1FF) * 8;
            if lshift == shift {
                let ps = if level > 1 { PS } else { 0 };
                self.put64(slot, phys | flags | P | ps);
                return;
            }
            let mut e = self.get64(slot);
            if e & P == 0 {
                e = self.alloc() | P | RW | US;
                self.put64(slot, e);
            }
            // Narrow the rights of the intermediate entries to `flags` where the test asks for less.
            self.put64(slot, (e & !(RW | US | XD)) | (flags & (RW | US | XD)) | P);
            table = e & ADDR_MASK;
            level -= 1;
        }
    }
}

fn long_mode(cr3: u64) -> ControlState {
    ControlState {
        cr0: CR0_PE | CR0_PG | CR0_WP,
        cr3,
        cr4: CR4_PAE,
        efer: EFER_LMA | EFER_NXE | 1 << 8,
        cs_l: true,
        ..ControlState::default()
    }
}

#[test]
fn paging_off_is_identity_within_32_bits() {
    let g = Guest::new();
    let cs = ControlState::default();
    assert_eq!(translate(&g.mem, &cs, 0x1234, Access::READ), Ok(0x1234));
    assert_eq!(
        translate(&g.mem, &cs, 0x1_0000_5678, Access::WRITE),
        Ok(0x5678)
    );
}

#[test]
fn four_level_pages_of_every_size() {
    let mut g = Guest::new();
    let root = g.alloc();
    g.map(root, 4, 0x40_0000, 0x12_3000, KIB4, RW);
    g.map(root, 4, 0xFFFF_8000_0020_0000, 0x60_0000, MIB2, RW);
    g.map(root, 4, 0x80_0000_0000, 0x4000_0000, GIB1, RW);
    let cs = long_mode(root);
    assert_eq!(
        translate(&g.mem, &cs, 0x40_0ABC, Access::READ),
        Ok(0x12_3ABC)
    );
    assert_eq!(
        translate(&g.mem, &cs, 0xFFFF_8000_002F_FFFF, Access::WRITE),
        Ok(0x6F_FFFF)
    );
    assert_eq!(
        translate(&g.mem, &cs, 0x80_1234_5678, Access::READ),
        Ok(0x5234_5678)
    );
    assert_eq!(
        translate(&g.mem, &cs, 0x40_1000, Access::READ),
        Err(WalkError::NotPresent {
            linear: 0x40_1000,
            level: 1
        })
    );
    assert_eq!(
        translate(&g.mem, &cs, 0x4000_0000, Access::READ),
        Err(WalkError::NotPresent {
            linear: 0x4000_0000,
            level: 3
        })
    );
    assert_eq!(
        translate(&g.mem, &cs, 0x0000_8000_0000_0000, Access::READ),
        Err(WalkError::NonCanonical {
            linear: 0x0000_8000_0000_0000
        })
    );
}

#[test]
fn ps_in_the_top_level_is_reserved() {
    let mut g = Guest::new();
    let root = g.alloc();
    g.put64(root, P | RW | PS);
    assert_eq!(
        translate(&g.mem, &long_mode(root), 0x1000, Access::READ),
        Err(WalkError::Reserved {
            linear: 0x1000,
            level: 4
        })
    );
}

#[test]
fn five_level_paging() {
    let mut g = Guest::new();
    let root = g.alloc();
    let linear = 0x00FF_0000_0000_3000;
    g.map(root, 5, linear, 0x7000, KIB4, RW);
    let mut cs = long_mode(root);
    cs.cr4 |= CR4_LA57;
    assert_eq!(translate(&g.mem, &cs, linear + 5, Access::READ), Ok(0x7005));
    // Canonical for 57 bits, not for 48.
    cs.cr4 &= !CR4_LA57;
    assert!(matches!(
        translate(&g.mem, &cs, linear, Access::READ),
        Err(WalkError::NonCanonical { .. })
    ));
}

#[test]
fn permissions_are_checked_over_all_levels() {
    let mut g = Guest::new();
    let root = g.alloc();
    g.map(root, 4, 0x1000, 0x1000, KIB4, 0); // supervisor read-only
    g.map(root, 4, 0x40_0000_0000, 0x2000, KIB4, US | RW | XD); // user, no-execute
    let mut cs = long_mode(root);
    assert_eq!(translate(&g.mem, &cs, 0x1000, Access::READ), Ok(0x1000));
    assert_eq!(
        translate(&g.mem, &cs, 0x1000, Access::WRITE),
        Err(WalkError::Protection { linear: 0x1000 })
    );
    assert_eq!(
        translate(&g.mem, &cs, 0x40_0000_0000, Access::FETCH),
        Err(WalkError::Protection {
            linear: 0x40_0000_0000
        })
    );
    cs.cpl = 3;
    assert!(translate(&g.mem, &cs, 0x1000, Access::READ).is_err());
    assert_eq!(
        translate(&g.mem, &cs, 0x40_0000_0000, Access::WRITE),
        Ok(0x2000)
    );
    // Supervisor writes ignore R/W without CR0.WP; XD counts only with EFER.NXE.
    cs.cpl = 0;
    cs.cr0 &= !CR0_WP;
    cs.efer &= !EFER_NXE;
    assert_eq!(translate(&g.mem, &cs, 0x1000, Access::WRITE), Ok(0x1000));
    assert_eq!(
        translate(&g.mem, &cs, 0x40_0000_0000, Access::FETCH),
        Ok(0x2000)
    );
    cs.cpl = 3;
    assert!(translate(&g.mem, &cs, 0x1000, Access::WRITE).is_err());
}

#[test]
fn pae_paging_with_4k_and_2m_pages() {
    let mut g = Guest::new();
    let pdpt = g.alloc();
    let pd = g.alloc();
    let pt = g.alloc();
    // linear 0xC040_1234: PDPTE 3, PDE 2, PTE 1; linear 0xC060_0000: PDE 3 as a 2 MiB page.
    g.put64(pdpt + 3 * 8, pd | P);
    g.put64(pd + 2 * 8, pt | P | RW);
    g.put64(pt + 8, 0x33_3000 | P | RW);
    g.put64(pd + 3 * 8, 0x20_0000 | P | RW | PS);
    let cs = ControlState {
        cr0: CR0_PE | CR0_PG,
        cr3: pdpt,
        cr4: CR4_PAE,
        cs_db: true,
        ..ControlState::default()
    };
    assert_eq!(
        translate(&g.mem, &cs, 0xC040_1234, Access::WRITE),
        Ok(0x33_3234)
    );
    assert_eq!(
        translate(&g.mem, &cs, 0xC06F_0001, Access::READ),
        Ok(0x2F_0001)
    );
    assert_eq!(
        translate(&g.mem, &cs, 0x0040_1234, Access::READ),
        Err(WalkError::NotPresent {
            linear: 0x40_1234,
            level: 3
        })
    );
}

#[test]
fn paging_32_bit_with_and_without_pse() {
    let mut g = Guest::new();
    let pd = g.alloc();
    let pt = g.alloc();
    let put32 = |g: &mut Guest, gpa: u64, v: u32| g.mem.write(gpa, &v.to_le_bytes()).unwrap();
    // linear 0x0040_5678 -> PDE 1 -> PTE 5; linear 0x0080_0000 -> PDE 2 as a 4 MiB page with PSE-36 bits 0x01.
    put32(&mut g, pd + 4, (pt as u32) | 0x7);
    put32(&mut g, pt + 5 * 4, 0x0055_5000 | 0x3);
    put32(&mut g, pd + 2 * 4, 0x00C0_0000 | (1 << 13) | 0x83);
    let mut cs = ControlState {
        cr0: CR0_PE | CR0_PG,
        cr3: pd,
        cr4: CR4_PSE,
        cs_db: true,
        ..ControlState::default()
    };
    assert_eq!(
        translate(&g.mem, &cs, 0x40_5678, Access::READ),
        Ok(0x55_5678)
    );
    assert_eq!(
        translate(&g.mem, &cs, 0x8A_BCDE, Access::READ),
        Ok(0x1_00CA_BCDE)
    );
    // Without CR4.PSE the PDE is a page-table pointer: frame 0xC00000 is zeroed, so the PTE is not present.
    cs.cr4 = 0;
    assert_eq!(
        translate(&g.mem, &cs, 0x8A_BCDE, Access::READ),
        Err(WalkError::NotPresent {
            linear: 0x8A_BCDE,
            level: 1
        })
    );
}

#[test]
fn tables_outside_ram_are_an_error() {
    let mut g = Guest::new();
    let root = g.alloc();
    g.put64(root, 0x40_0000_0000 | P | RW);
    assert_eq!(
        translate(&g.mem, &long_mode(root), 0x1000, Access::READ),
        Err(WalkError::OutsideRam {
            linear: 0x1000,
            gpa: 0x40_0000_0000
        })
    );
    assert!(matches!(
        translate(&g.mem, &long_mode(0x7FFF_F000), 0x1000, Access::READ),
        Err(WalkError::OutsideRam { .. })
    ));
}

#[test]
fn ranges_cross_discontiguous_pages() {
    let mut g = Guest::new();
    let root = g.alloc();
    g.map(root, 4, 0x10_0000, 0x5000, KIB4, RW);
    g.map(root, 4, 0x10_1000, 0x3000, KIB4, RW);
    let cs = long_mode(root);
    g.mem.write(0x5FFE, &[1, 2]).unwrap();
    g.mem.write(0x3000, &[3, 4]).unwrap();
    let mut buf = [0u8; 4];
    read_linear(&g.mem, &cs, 0x10_0FFE, &mut buf, Access::READ).unwrap();
    assert_eq!(buf, [1, 2, 3, 4]);
    write_linear(&mut g.mem, &cs, 0x10_0FFF, &[9, 9, 9]).unwrap();
    let mut check = [0u8; 2];
    g.mem.read(0x3000, &mut check).unwrap();
    assert_eq!(check, [9, 9]);
    // A write whose second page is missing writes nothing.
    assert_eq!(
        write_linear(&mut g.mem, &cs, 0x10_1FFF, &[7, 7]),
        Err(WalkError::NotPresent {
            linear: 0x10_2000,
            level: 1
        })
    );
    g.mem.read(0x3FFF, &mut check[..1]).unwrap();
    assert_eq!(check[0], 0);
}

#[test]
fn fetch_stops_at_an_unmapped_second_page() {
    let mut g = Guest::new();
    let root = g.alloc();
    g.map(root, 4, 0x20_0000, 0x9000, KIB4, RW);
    let cs = long_mode(root);
    g.mem.write(0x9FFC, &[0x8B, 0x07, 0x90, 0x90]).unwrap();
    let mut buf = [0u8; 15];
    assert_eq!(fetch(&g.mem, &cs, 0x20_0FFC, &mut buf), Ok(4));
    assert_eq!(buf[..4], [0x8B, 0x07, 0x90, 0x90]);
    assert_eq!(fetch(&g.mem, &cs, 0x20_0100, &mut buf), Ok(15));
    g.map(root, 4, 0x20_1000, 0xB000, KIB4, RW);
    assert_eq!(fetch(&g.mem, &cs, 0x20_0FFC, &mut buf), Ok(15));
    assert!(fetch(&g.mem, &cs, 0x30_0000, &mut buf).is_err());
}

fn mode(sel: u8, cr3: u64) -> ControlState {
    let mut cs = long_mode(cr3);
    match sel % 4 {
        0 => {}
        1 => cs.cr4 |= CR4_LA57,
        2 => {
            cs.efer = 0;
            cs.cs_l = false;
        }
        _ => {
            cs.efer = 0;
            cs.cr4 = CR4_PSE;
        }
    }
    cs
}

proptest! {
    /// Whatever the guest puts in its page tables, a walk returns a value and never panics.
    #[test]
    fn arbitrary_tables_never_panic(
        seed in proptest::collection::vec(any::<u64>(), 64),
        cr3 in any::<u64>(),
        linear in any::<u64>(),
        sel in any::<u8>(),
        cpl in 0u8..4,
    ) {
        let mut mem = VecMemory::new(64 * 1024);
        // Fill the first page with entries that point into the small memory (or beyond it).
        for (i, v) in seed.iter().enumerate() {
            let e = v & (0xFFFF | P | RW | US | PS | XD);
            mem.write(i as u64 * 8, &e.to_le_bytes()).unwrap();
        }
        let mut cs = mode(sel, cr3 & 0x1_FFFF);
        cs.cpl = cpl;
        let _ = translate(&mem, &cs, linear, Access::READ);
        let mut buf = [0u8; 15];
        let _ = fetch(&mem, &cs, linear, &mut buf);
        let _ = write_linear(&mut mem, &cs, linear, &[1, 2, 3]);
    }

    /// Pages mapped at random places with random sizes translate to where they were mapped.
    #[test]
    fn random_mappings_translate(
        pages in proptest::collection::vec((0u64..512, 0u32..3, 0u64..4096), 1..8),
        five in any::<bool>(),
    ) {
        let mut g = Guest::new();
        let root = g.alloc();
        let levels = if five { 5 } else { 4 };
        let mut expect = alloc::vec::Vec::new();
        for (i, &(slot, size, offset)) in pages.iter().enumerate() {
            let shift = [KIB4, MIB2, GIB1][size as usize];
            // A distinct top-level slot per page keeps the mappings apart; the slot index varies the path.
            let top_shift = 12 + 9 * (u32::from(levels) - 1);
            let linear = ((i as u64 + 1) << top_shift) | (slot << shift) ;
            let phys = (i as u64 + 1) << shift;
            g.map(root, levels, linear, phys, shift, RW);
            expect.push((linear + offset, phys + offset));
        }
        let mut cs = long_mode(root);
        if five {
            cs.cr4 |= CR4_LA57;
        }
        for (linear, phys) in expect {
            prop_assert_eq!(translate(&g.mem, &cs, linear, Access::WRITE), Ok(phys));
        }
    }
}
