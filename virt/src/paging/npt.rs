//! The AMD nested-page-table entry format (AMD APM Vol. 2 §15.25: nested paging uses the long-mode page-table
//! format of §5.3.3, Figures 5-18 to 5-23 and 5-25/5-26 for 2 MiB pages).
//!
//! Every nested walk is a user-mode access (§15.25.5), so every present entry at every level sets U/S (bit 2), as
//! well as P (bit 0); non-leaf entries also grant R/W and leave NX clear, so rights are decided at the leaf, like the
//! EPT format. A leaf maps readable memory by being present, writable with R/W (bit 1), non-executable with NX
//! (bit 63; valid because the host runs with EFER.NXE, which the nested walk inherits). 2 MiB leaves set PS (bit 7)
//! and move the PAT bit to bit 12 (bits 20:13 must be zero).
//!
//! Memory types select an entry of the host's PAT with PAT/PCD/PWT (§7.8.2); the kernel leaves IA32_PAT at its reset
//! value (WB, WT, UC-, UC, WB, WT, UC-, UC), so write-back, write-through and uncacheable are expressible and
//! write-combining / write-protected are refused. The guest's own PAT (G_PAT) combines with this type as the APM's
//! Table 15-19 describes.
//!
//! Refused encodings: no read right (a present NPT entry is always readable: write-only and execute-only cannot be
//! expressed, and "no right" is "not present", not a mapping).

use super::{Access, Attrs, Entry, FormatError, MemType, PteFormat};

const PRESENT: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
/// Page size (2 MiB / 1 GiB leaf) in a PD / PDPT entry; the PAT bit in a 4 KiB PTE.
const PS_OR_PAT_4K: u64 = 1 << 7;
/// PAT bit of a 2 MiB / 1 GiB leaf.
const PAT_LARGE: u64 = 1 << 12;
const NX: u64 = 1 << 63;
/// Address bits 51:12.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// PAT/PCD/PWT index bits for a memory type, with the reset PAT.
const fn type_index(t: MemType) -> Option<u64> {
    match t {
        MemType::WriteBack => Some(0),
        MemType::WriteThrough => Some(1),
        // Index 3 = UC (strong); index 2 (UC-) decodes as uncacheable too.
        MemType::Uncacheable => Some(3),
        MemType::WriteCombining | MemType::WriteProtected => None,
    }
}

const fn type_from_index(i: u64) -> MemType {
    match i & 3 {
        0 => MemType::WriteBack,
        1 => MemType::WriteThrough,
        _ => MemType::Uncacheable,
    }
}

/// The NPT entry format.
#[derive(Debug)]
pub enum Npt {}

impl PteFormat for Npt {
    const NAME: &'static str = "npt";

    fn table(table_hpa: u64) -> u64 {
        (table_hpa & ADDR_MASK) | PRESENT | WRITE | USER
    }

    fn leaf(hpa: u64, level: u8, attrs: Attrs) -> Result<u64, FormatError> {
        let a = attrs.access;
        if !a.read {
            return Err(FormatError::UnsupportedAccess(a));
        }
        let index =
            type_index(attrs.mem_type).ok_or(FormatError::UnsupportedMemType(attrs.mem_type))?;
        let (size_bit, pat_bit) = if level >= 2 {
            (PS_OR_PAT_4K, PAT_LARGE)
        } else {
            (0, PS_OR_PAT_4K)
        };
        let pat = if index & 4 != 0 { pat_bit } else { 0 };
        let pcd = if index & 2 != 0 { PCD } else { 0 };
        let pwt = if index & 1 != 0 { PWT } else { 0 };
        Ok((hpa & ADDR_MASK)
            | PRESENT
            | USER
            | if a.write { WRITE } else { 0 }
            | if a.execute { 0 } else { NX }
            | size_bit
            | pat
            | pcd
            | pwt)
    }

    fn decode(entry: u64, level: u8) -> Result<Entry, FormatError> {
        if entry & PRESENT == 0 {
            return Ok(Entry::Empty);
        }
        // Entries this format writes are all user entries; a supervisor entry would fault every nested walk.
        if entry & USER == 0 {
            return Err(FormatError::Malformed(entry));
        }
        let large = level >= 2 && entry & PS_OR_PAT_4K != 0;
        if level == 4 && large {
            return Err(FormatError::Malformed(entry));
        }
        if level > 1 && !large {
            return Ok(Entry::Table(entry & ADDR_MASK));
        }
        let access = Access {
            read: true,
            write: entry & WRITE != 0,
            execute: entry & NX == 0,
        };
        let pat_bit = if large { PAT_LARGE } else { PS_OR_PAT_4K };
        let index = (u64::from(entry & pat_bit != 0) << 2)
            | (u64::from(entry & PCD != 0) << 1)
            | u64::from(entry & PWT != 0);
        let size_mask = (1u64 << (12 + 9 * (u32::from(level) - 1))) - 1;
        // Bits between the PAT bit and the page address must be zero in a large leaf.
        if large && entry & ADDR_MASK & size_mask & !PAT_LARGE != 0 {
            return Err(FormatError::Malformed(entry));
        }
        Ok(Entry::Leaf {
            hpa: entry & ADDR_MASK & !size_mask,
            attrs: Attrs {
                access,
                mem_type: type_from_index(index),
            },
        })
    }
}

/// The nCR3 value for a table rooted at `root` (APM Vol. 2 §15.25.4: the host-physical PML4 address; PWT/PCD
/// clear, so the walk itself is write-back).
pub const fn ncr3(root: u64) -> u64 {
    root & ADDR_MASK
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeMemory;
    use super::super::{
        Access, Attrs, Entry, FormatError, MapError, MemType, NestedPageTable, PageSize, PteFormat,
        SIZE_2M, SIZE_4K,
    };
    use super::{ncr3, Npt, NX, PRESENT, USER, WRITE};

    type Table = NestedPageTable<Npt>;

    /// Every table entry on the walk to `gpa`, from the PML4 down to the leaf.
    fn walk(t: &Table, mem: &FakeMemory, gpa: u64) -> alloc::vec::Vec<u64> {
        let mut out = alloc::vec::Vec::new();
        let mut table = t.root();
        for level in (1..=4u8).rev() {
            let i = usize::try_from((gpa >> (12 + 9 * (u32::from(level) - 1))) & 0x1FF).unwrap();
            let e = super::super::TableMemory::read(mem, table, i);
            out.push(e);
            match Npt::decode(e, level).unwrap() {
                Entry::Table(next) => table = next,
                _ => break,
            }
        }
        out
    }

    #[test]
    fn every_level_is_present_and_user() {
        let mut mem = FakeMemory::new(100);
        let mut t = Table::new(&mut mem).unwrap();
        t.map(
            &mut mem,
            0x20_3000,
            0x7654_3000,
            SIZE_4K,
            PageSize::Size4K,
            Attrs::RAM,
        )
        .unwrap();
        t.map(
            &mut mem,
            4 * SIZE_2M,
            0x4000_0000,
            SIZE_2M,
            PageSize::Size2M,
            Attrs::RAM,
        )
        .unwrap();
        let small = walk(&t, &mem, 0x20_3000);
        assert_eq!(small.len(), 4);
        let large = walk(&t, &mem, 4 * SIZE_2M);
        assert_eq!(large.len(), 3);
        for e in small.iter().chain(&large) {
            assert_eq!(e & (PRESENT | USER), PRESENT | USER, "entry {e:#x}");
        }
        // RAM leaves are writable and executable.
        assert_eq!(small[3] & (WRITE | NX), WRITE);
        assert_eq!(small[3] & 0x000F_FFFF_FFFF_F000, 0x7654_3000);
        assert_eq!(large[2] & (1 << 7), 1 << 7);
        assert_eq!(t.translate(&mem, 0x20_3ABC).unwrap().hpa, 0x7654_3ABC);
        assert_eq!(
            t.translate(&mem, 4 * SIZE_2M + 0x1_2345).unwrap().hpa,
            0x4001_2345
        );
        assert_eq!(ncr3(t.root()), t.root());
    }

    #[test]
    fn rights_and_types_round_trip() {
        let mut mem = FakeMemory::new(100);
        let mut t = Table::new(&mut mem).unwrap();
        let cases = [
            (Access::RWX, MemType::WriteBack),
            (Access::R, MemType::Uncacheable),
            (Access::RX, MemType::WriteThrough),
            (Access::RW, MemType::WriteBack),
        ];
        for (i, (access, mem_type)) in cases.into_iter().enumerate() {
            let attrs = Attrs { access, mem_type };
            let gpa = u64::try_from(i).unwrap() * SIZE_2M;
            t.map(
                &mut mem,
                gpa,
                gpa + 0x4000_0000,
                SIZE_4K,
                PageSize::Size4K,
                attrs,
            )
            .unwrap();
            t.map(
                &mut mem,
                gpa + SIZE_2M * 8,
                gpa + 0x8000_0000,
                SIZE_2M,
                PageSize::Size2M,
                attrs,
            )
            .unwrap();
            assert_eq!(t.translate(&mem, gpa).unwrap().attrs, attrs);
            assert_eq!(t.translate(&mem, gpa + SIZE_2M * 8).unwrap().attrs, attrs);
        }
    }

    #[test]
    fn inexpressible_attributes_are_refused() {
        let mut mem = FakeMemory::new(100);
        let mut t = Table::new(&mut mem).unwrap();
        let write_only = Access {
            read: false,
            write: true,
            execute: false,
        };
        let attrs = Attrs {
            access: write_only,
            mem_type: MemType::WriteBack,
        };
        assert_eq!(
            t.map(&mut mem, 0, 0, SIZE_4K, PageSize::Size4K, attrs),
            Err(MapError::Format(FormatError::UnsupportedAccess(write_only)))
        );
        for mem_type in [MemType::WriteCombining, MemType::WriteProtected] {
            let attrs = Attrs {
                access: Access::RWX,
                mem_type,
            };
            assert_eq!(
                t.map(&mut mem, 0, 0, SIZE_4K, PageSize::Size4K, attrs),
                Err(MapError::Format(FormatError::UnsupportedMemType(mem_type)))
            );
        }
        assert_eq!(t.table_frames(&mem), 1);
    }

    #[test]
    fn decode_rejects_foreign_entries() {
        // Supervisor entry, PS at the PML4, stray bits inside a 2 MiB leaf's address.
        assert!(Npt::decode(PRESENT | 0x1000, 3).is_err());
        assert!(Npt::decode(PRESENT | USER | (1 << 7), 4).is_err());
        assert!(Npt::decode(PRESENT | USER | (1 << 7) | 0x4000_2000, 2).is_err());
        assert_eq!(Npt::decode(0x1234_5000 & !PRESENT, 1), Ok(Entry::Empty));
        // A 2 MiB leaf with the PAT bit set decodes its address without it.
        let e = PRESENT | USER | (1 << 7) | (1 << 12) | 0x4020_0000;
        match Npt::decode(e, 2).unwrap() {
            Entry::Leaf { hpa, .. } => assert_eq!(hpa, 0x4020_0000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn destroy_frees_every_table() {
        let mut mem = FakeMemory::new(100);
        let mut t = Table::new(&mut mem).unwrap();
        t.map_range(
            &mut mem,
            0,
            0x1000_0000,
            3 * SIZE_2M + 5 * SIZE_4K,
            Attrs::RAM,
        )
        .unwrap();
        assert!(mem.live > 1);
        t.destroy(&mut mem);
        assert_eq!(mem.live, 0);
    }
}
