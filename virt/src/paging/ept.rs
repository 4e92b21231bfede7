//! The Intel EPT entry format (SDM Vol. 3C §29.3.2, Tables 29-1 to 29-6) and the EPT pointer (§25.6.11).
//!
//! An entry is present when any of bits 2:0 (read, write, execute) is set. Non-leaf entries grant RWX, leaving the
//! decision to the leaf, and keep bits 7:3 zero (reserved at PML4, "points to a table" at PDPT/PD). Leaves carry
//! the memory type in bits 5:3 with "ignore PAT" (bit 6) set, so the guest's own PAT cannot weaken the type the
//! hypervisor chose; 2 MiB leaves set bit 7. Bits 8/9 (accessed/dirty) are set by hardware when the EPT pointer
//! enables them and are ignored when decoding.
//!
//! Refused encodings (they would be EPT misconfigurations, §29.3.3.1): write without read; no right at all (that is
//! "not present", not a mapping); execute-only (legal only with the execute-only capability of
//! IA32_VMX_EPT_VPID_CAP bit 0, which this builder does not assume).

use super::{Access, Attrs, Entry, FormatError, MemType, PteFormat};

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const EXEC: u64 = 1 << 2;
const RIGHTS: u64 = READ | WRITE | EXEC;
const MEM_TYPE_SHIFT: u32 = 3;
const MEM_TYPE_MASK: u64 = 0b111 << MEM_TYPE_SHIFT;
const IGNORE_PAT: u64 = 1 << 6;
const LARGE: u64 = 1 << 7;
/// Address bits 51:12.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// EPT memory-type encodings (SDM Vol. 3C §29.3.7; the same values as in the EPT pointer, §25.6.11).
const fn mem_type_bits(t: MemType) -> u64 {
    match t {
        MemType::Uncacheable => 0,
        MemType::WriteCombining => 1,
        MemType::WriteThrough => 4,
        MemType::WriteProtected => 5,
        MemType::WriteBack => 6,
    }
}

const fn mem_type_from_bits(bits: u64) -> Option<MemType> {
    match bits {
        0 => Some(MemType::Uncacheable),
        1 => Some(MemType::WriteCombining),
        4 => Some(MemType::WriteThrough),
        5 => Some(MemType::WriteProtected),
        6 => Some(MemType::WriteBack),
        _ => None,
    }
}

/// The EPT entry format.
#[derive(Debug)]
pub enum Ept {}

impl PteFormat for Ept {
    const NAME: &'static str = "ept";

    fn table(table_hpa: u64) -> u64 {
        (table_hpa & ADDR_MASK) | RIGHTS
    }

    fn leaf(hpa: u64, level: u8, attrs: Attrs) -> Result<u64, FormatError> {
        let a = attrs.access;
        // Write without read, execute-only and no access at all are all "no read".
        if !a.read {
            return Err(FormatError::UnsupportedAccess(a));
        }
        let rights = (u64::from(a.read) * READ)
            | (u64::from(a.write) * WRITE)
            | (u64::from(a.execute) * EXEC);
        let large = if level >= 2 { LARGE } else { 0 };
        Ok((hpa & ADDR_MASK)
            | rights
            | (mem_type_bits(attrs.mem_type) << MEM_TYPE_SHIFT)
            | IGNORE_PAT
            | large)
    }

    fn decode(entry: u64, level: u8) -> Result<Entry, FormatError> {
        if entry & RIGHTS == 0 {
            return Ok(Entry::Empty);
        }
        let leaf = level == 1 || (level <= 3 && entry & LARGE != 0);
        if level == 4 && entry & LARGE != 0 {
            return Err(FormatError::Malformed(entry));
        }
        if !leaf {
            if entry & MEM_TYPE_MASK != 0 {
                return Err(FormatError::Malformed(entry));
            }
            return Ok(Entry::Table(entry & ADDR_MASK));
        }
        let mem_type = mem_type_from_bits((entry & MEM_TYPE_MASK) >> MEM_TYPE_SHIFT)
            .ok_or(FormatError::Malformed(entry))?;
        let access = Access {
            read: entry & READ != 0,
            write: entry & WRITE != 0,
            execute: entry & EXEC != 0,
        };
        if access.write && !access.read {
            return Err(FormatError::Malformed(entry));
        }
        let size_mask = if level == 1 {
            0
        } else {
            (1u64 << (12 + 9 * (u32::from(level) - 1))) - 1
        };
        Ok(Entry::Leaf {
            hpa: entry & ADDR_MASK & !size_mask,
            attrs: Attrs { access, mem_type },
        })
    }
}

/// The EPT pointer for a 4-level, write-back table rooted at `root` (SDM Vol. 3C §25.6.11, Table 25-9):
/// bits 2:0 memory type of the paging structures (6 = WB), bits 5:3 walk length minus one (3), bit 6 enables the
/// accessed/dirty flags.
pub const fn eptp(root: u64, accessed_dirty: bool) -> u64 {
    (root & ADDR_MASK) | (3 << 3) | 6 | if accessed_dirty { 1 << 6 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::super::fake::FakeMemory;
    use super::super::{
        Access, Attrs, Entry, FormatError, MapError, MemType, NestedPageTable, PageSize, PteFormat,
        Translation, GPA_LIMIT, SIZE_2M, SIZE_4K,
    };
    use super::{eptp, Ept};

    type Table = NestedPageTable<Ept>;

    fn setup() -> (FakeMemory, Table) {
        let mut mem = FakeMemory::new(1000);
        let t = Table::new(&mut mem).unwrap();
        (mem, t)
    }

    /// Every mapped 4 KiB page (by GPA) found by probing each page of the first `span` bytes.
    fn mapped_pages(t: &Table, mem: &FakeMemory, span: u64) -> alloc::vec::Vec<u64> {
        (0..span / SIZE_4K)
            .map(|p| p * SIZE_4K)
            .filter(|&g| t.translate(mem, g).is_some())
            .collect()
    }

    #[test]
    fn maps_4k_round_trip() {
        let (mut mem, mut t) = setup();
        t.map(
            &mut mem,
            0x5000,
            0x8000_0000,
            3 * SIZE_4K,
            PageSize::Size4K,
            Attrs::RAM,
        )
        .unwrap();
        for i in 0..3 {
            let tr = t.translate(&mem, 0x5000 + i * SIZE_4K + 0x123).unwrap();
            assert_eq!(
                tr,
                Translation {
                    hpa: 0x8000_0000 + i * SIZE_4K + 0x123,
                    size: PageSize::Size4K,
                    attrs: Attrs::RAM
                }
            );
        }
        // Nothing else: exactly the three pages in the first 4 MiB.
        assert_eq!(mapped_pages(&t, &mem, 4 << 20), [0x5000, 0x6000, 0x7000]);
        assert_eq!(t.translate(&mem, 0x4FFF), None);
        assert_eq!(t.translate(&mem, 0x8000), None);
        // Root + PDPT + PD + PT.
        assert_eq!(t.table_frames(&mem), 4);
    }

    #[test]
    fn maps_2m_round_trip_and_reports_size() {
        let (mut mem, mut t) = setup();
        t.map(
            &mut mem,
            2 * SIZE_2M,
            0x4000_0000,
            2 * SIZE_2M,
            PageSize::Size2M,
            Attrs::RAM,
        )
        .unwrap();
        let tr = t.translate(&mem, 3 * SIZE_2M + 0x1234).unwrap();
        assert_eq!(tr.hpa, 0x4000_0000 + SIZE_2M + 0x1234);
        assert_eq!(tr.size, PageSize::Size2M);
        assert_eq!(t.translate(&mem, 2 * SIZE_2M - 1), None);
        assert_eq!(t.translate(&mem, 4 * SIZE_2M), None);
        assert_eq!(mapped_pages(&t, &mem, 16 << 20).len(), 1024);
        // Root + PDPT + PD, no PT.
        assert_eq!(t.table_frames(&mem), 3);
    }

    #[test]
    fn map_range_mixes_2m_and_4k() {
        let (mut mem, mut t) = setup();
        // 4 KiB head up to the 2 MiB boundary, two 2 MiB pages, a 4 KiB tail.
        let (gpa, hpa, len) = (
            SIZE_2M - 2 * SIZE_4K,
            0x1000_0000 - 2 * SIZE_4K,
            2 * SIZE_4K + 2 * SIZE_2M + SIZE_4K,
        );
        t.map_range(&mut mem, gpa, hpa, len, Attrs::RAM).unwrap();
        assert_eq!(t.translate(&mem, gpa).unwrap().size, PageSize::Size4K);
        assert_eq!(t.translate(&mem, SIZE_2M).unwrap().size, PageSize::Size2M);
        assert_eq!(
            t.translate(&mem, 2 * SIZE_2M).unwrap().size,
            PageSize::Size2M
        );
        assert_eq!(
            t.translate(&mem, 3 * SIZE_2M).unwrap().size,
            PageSize::Size4K
        );
        for off in (0..len).step_by(4096) {
            assert_eq!(
                t.translate(&mem, gpa + off).unwrap().hpa,
                hpa + off,
                "offset {off:#x}"
            );
        }
        assert_eq!(
            mapped_pages(&t, &mem, 16 << 20).len(),
            usize::try_from(len / SIZE_4K).unwrap()
        );
        // Differently aligned host memory forces 4 KiB everywhere.
        let (mut mem2, mut t2) = setup();
        t2.map_range(&mut mem2, 0, 0x1000, SIZE_2M, Attrs::RAM)
            .unwrap();
        assert_eq!(t2.translate(&mem2, 0).unwrap().size, PageSize::Size4K);
        assert_eq!(
            t2.translate(&mem2, SIZE_2M - 1).unwrap().hpa,
            0x1000 + SIZE_2M - 1
        );
    }

    #[test]
    fn attributes_round_trip() {
        let (mut mem, mut t) = setup();
        let cases = [
            (Access::RWX, MemType::WriteBack),
            (Access::R, MemType::Uncacheable),
            (Access::RX, MemType::WriteThrough),
            (Access::RW, MemType::WriteCombining),
            (Access::RW, MemType::WriteProtected),
        ];
        for (i, (access, mem_type)) in cases.into_iter().enumerate() {
            let gpa = u64::try_from(i).unwrap() * SIZE_4K;
            let attrs = Attrs { access, mem_type };
            t.map(
                &mut mem,
                gpa,
                gpa + 0x10_0000,
                SIZE_4K,
                PageSize::Size4K,
                attrs,
            )
            .unwrap();
            assert_eq!(t.translate(&mem, gpa).unwrap().attrs, attrs);
        }
    }

    #[test]
    fn misaligned_requests_are_refused() {
        let (mut mem, mut t) = setup();
        let r = Attrs::RAM;
        assert!(matches!(
            t.map(&mut mem, 0x1001, 0, SIZE_4K, PageSize::Size4K, r),
            Err(MapError::Misaligned { .. })
        ));
        assert!(matches!(
            t.map(&mut mem, 0, 0x800, SIZE_4K, PageSize::Size4K, r),
            Err(MapError::Misaligned { .. })
        ));
        assert!(matches!(
            t.map(&mut mem, 0, 0, 100, PageSize::Size4K, r),
            Err(MapError::Misaligned { .. })
        ));
        assert!(matches!(
            t.map(&mut mem, SIZE_4K, 0, SIZE_2M, PageSize::Size2M, r),
            Err(MapError::Misaligned { .. })
        ));
        assert!(matches!(
            t.map(&mut mem, 0, SIZE_2M, SIZE_4K, PageSize::Size2M, r),
            Err(MapError::Misaligned { .. })
        ));
        assert!(matches!(
            t.map_range(&mut mem, 0x10, 0, SIZE_4K, r),
            Err(MapError::Misaligned { .. })
        ));
        assert_eq!(
            t.map(&mut mem, 0, 0, 0, PageSize::Size4K, r),
            Err(MapError::Empty)
        );
        assert_eq!(t.map_range(&mut mem, 0, 0, 0, r), Err(MapError::Empty));
        assert!(matches!(
            t.map(
                &mut mem,
                GPA_LIMIT - SIZE_4K,
                0,
                2 * SIZE_4K,
                PageSize::Size4K,
                r
            ),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.map(&mut mem, 0, u64::MAX - 0xFFF, SIZE_4K, PageSize::Size4K, r),
            Err(MapError::OutOfRange { .. })
        ));
        // Nothing was written: only the root exists.
        assert_eq!(t.table_frames(&mem), 1);
        assert!(mapped_pages(&t, &mem, 4 << 20).is_empty());
    }

    #[test]
    fn overlapping_requests_are_refused_without_side_effects() {
        let (mut mem, mut t) = setup();
        let r = Attrs::RAM;
        t.map(&mut mem, SIZE_2M, 0x4000_0000, SIZE_2M, PageSize::Size2M, r)
            .unwrap();
        t.map(&mut mem, 0x3000, 0x9000, SIZE_4K, PageSize::Size4K, r)
            .unwrap();
        // Exact duplicate, a 4 KiB page inside the 2 MiB one, a 2 MiB page over a 4 KiB table.
        assert_eq!(
            t.map(&mut mem, 0x3000, 0xA000, SIZE_4K, PageSize::Size4K, r),
            Err(MapError::Overlap { gpa: 0x3000 })
        );
        assert_eq!(
            t.map(&mut mem, SIZE_2M + 0x5000, 0, SIZE_4K, PageSize::Size4K, r),
            Err(MapError::Overlap {
                gpa: SIZE_2M + 0x5000
            })
        );
        assert_eq!(
            t.map(&mut mem, 0, 0, SIZE_2M, PageSize::Size2M, r),
            Err(MapError::Overlap { gpa: 0 })
        );
        // A range whose tail overlaps: refused before its free head is mapped.
        let frames = t.table_frames(&mem);
        assert_eq!(
            t.map_range(&mut mem, 0x1000, 0x1000, 3 * SIZE_4K, r),
            Err(MapError::Overlap { gpa: 0x3000 })
        );
        assert_eq!(t.translate(&mem, 0x1000), None);
        assert_eq!(t.table_frames(&mem), frames);
        // The originals are intact.
        assert_eq!(t.translate(&mem, 0x3000).unwrap().hpa, 0x9000);
        assert_eq!(t.translate(&mem, SIZE_2M).unwrap().hpa, 0x4000_0000);
    }

    #[test]
    fn unsupported_rights_are_refused() {
        let (mut mem, mut t) = setup();
        for access in [
            Access {
                read: false,
                write: true,
                execute: false,
            },
            Access {
                read: false,
                write: false,
                execute: true,
            },
            Access::default(),
        ] {
            let attrs = Attrs {
                access,
                mem_type: MemType::WriteBack,
            };
            assert_eq!(
                t.map(&mut mem, 0, 0, SIZE_4K, PageSize::Size4K, attrs),
                Err(MapError::Format(FormatError::UnsupportedAccess(access)))
            );
        }
        assert_eq!(t.table_frames(&mem), 1);
    }

    #[test]
    fn out_of_memory_is_reported_and_destroy_frees_everything() {
        // Root + PDPT + PD only: the first 4 KiB page needs a PT.
        let mut mem = FakeMemory::new(3);
        let mut t = Table::new(&mut mem).unwrap();
        t.map(&mut mem, 0, 0, SIZE_2M, PageSize::Size2M, Attrs::RAM)
            .unwrap();
        assert_eq!(
            t.map(&mut mem, SIZE_2M, 0, SIZE_4K, PageSize::Size4K, Attrs::RAM),
            Err(MapError::OutOfMemory {
                mapped_until: SIZE_2M
            })
        );
        assert_eq!(mem.live, 3);
        t.destroy(&mut mem);
        assert_eq!(mem.live, 0);

        let mut mem = FakeMemory::new(100);
        let mut t = Table::new(&mut mem).unwrap();
        // Spread over two PML4 slots and several PDs.
        t.map_range(&mut mem, 0, 0, 5 * SIZE_2M + SIZE_4K, Attrs::RAM)
            .unwrap();
        t.map(&mut mem, 1 << 39, 0, SIZE_4K, PageSize::Size4K, Attrs::RAM)
            .unwrap();
        assert_eq!(mem.live, t.table_frames(&mem));
        t.destroy(&mut mem);
        assert_eq!(mem.live, 0);
    }

    #[test]
    fn entry_encoding_matches_the_sdm() {
        // 4 KiB leaf: RWX, WB (6 << 3), ignore PAT (bit 6).
        assert_eq!(
            Ept::leaf(0x1234_5000, 1, Attrs::RAM).unwrap(),
            0x1234_5000 | 0b111 | (6 << 3) | (1 << 6)
        );
        // 2 MiB leaf adds bit 7.
        assert_eq!(
            Ept::leaf(0x4000_0000, 2, Attrs::RAM).unwrap() & (1 << 7),
            1 << 7
        );
        assert_eq!(Ept::table(0x7000), 0x7007);
        assert_eq!(Ept::decode(0, 3), Ok(Entry::Empty));
        assert_eq!(Ept::decode(0x7007, 4), Ok(Entry::Table(0x7000)));
        // Reserved memory type 2, a large bit at PML4, write-only: malformed.
        assert!(Ept::decode(0x1000 | 0b111 | (2 << 3), 1).is_err());
        assert!(Ept::decode(0x1000 | 0b111 | (1 << 7), 4).is_err());
        assert!(Ept::decode(0x1000 | 0b010 | (6 << 3), 1).is_err());
        // Accessed/dirty bits set by hardware do not disturb decoding.
        let leaf = Ept::leaf(0x9000, 1, Attrs::RAM).unwrap() | (1 << 8) | (1 << 9);
        assert_eq!(
            Ept::decode(leaf, 1),
            Ok(Entry::Leaf {
                hpa: 0x9000,
                attrs: Attrs::RAM
            })
        );
        // EPTP: WB, 4-level, with and without A/D.
        assert_eq!(eptp(0x5000, false), 0x501E);
        assert_eq!(eptp(0x5000, true), 0x505E);
    }
}
