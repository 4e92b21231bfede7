//! Window registration and the register write rules of a completed read.

use super::*;

#[test]
fn windows_are_aligned_disjoint_and_above_ram() {
    let mut w = MmioWindows::default();
    let ram = 0x100_0000;
    assert_eq!(
        w.add(0xD000_0800, 0x1000, ram),
        Err(MmioWindowError::Unaligned {
            base: 0xD000_0800,
            len: 0x1000
        })
    );
    assert!(matches!(
        w.add(0xD000_0000, 0, ram),
        Err(MmioWindowError::Unaligned { .. })
    ));
    assert!(matches!(
        w.add(0xFFFF_FFFF_FFFF_F000, 0x2000, ram),
        Err(MmioWindowError::Wraps { .. })
    ));
    assert_eq!(
        w.add(0xF0_0000, 0x1000, ram),
        Err(MmioWindowError::OverlapsRam {
            base: 0xF0_0000,
            ram_size: ram
        })
    );
    w.add(0xD000_0000, 0x2000, ram).unwrap();
    assert_eq!(
        w.add(0xD000_1000, 0x1000, ram),
        Err(MmioWindowError::OverlapsWindow {
            base: 0xD000_1000,
            other: 0xD000_0000
        })
    );
    assert!(w.add(0xCFFF_F000, 0x2000, ram).is_err());
    w.add(0xCFFF_F000, 0x1000, ram).unwrap();
    w.add(0xD000_2000, 0x1000, ram).unwrap();
    assert_eq!(w.find(0xD000_1FFF), Some((0xD000_0000, 0x2000)));
    assert_eq!(w.find(0xD000_2000), Some((0xD000_2000, 0x1000)));
    assert_eq!(w.find(0xD000_3000), None);
    assert_eq!(w.find(0), None);
}

fn dest(width: AccessSize, high_byte: bool, extend: Extend) -> Dest {
    Dest {
        reg: Gpr::Rax,
        high_byte,
        width,
        extend,
    }
}

#[test]
fn loads_merge_or_extend_like_the_cpu() {
    let old = 0x1122_3344_5566_7788;
    use AccessSize::{Byte, Dword, Qword, Word};
    // MOV r8 / r16 merge; MOV r32 zero-extends; MOV r64 replaces; only the low `size` bytes of the value count.
    assert_eq!(
        dest(Byte, false, Extend::None).merge(old, Byte, 0xffab),
        0x1122_3344_5566_77ab
    );
    assert_eq!(
        dest(Byte, true, Extend::None).merge(old, Byte, 0xab),
        0x1122_3344_5566_ab88
    );
    assert_eq!(
        dest(Word, false, Extend::None).merge(old, Word, 0x1_abcd),
        0x1122_3344_5566_abcd
    );
    assert_eq!(
        dest(Dword, false, Extend::None).merge(old, Dword, 0xdead_beef),
        0xdead_beef
    );
    assert_eq!(
        dest(Qword, false, Extend::None).merge(old, Qword, u64::MAX - 1),
        u64::MAX - 1
    );
    // MOVZX / MOVSX into 16, 32 and 64-bit destinations.
    assert_eq!(
        dest(Word, false, Extend::Zero).merge(old, Byte, 0x80),
        0x1122_3344_5566_0080
    );
    assert_eq!(
        dest(Word, false, Extend::Sign).merge(old, Byte, 0x80),
        0x1122_3344_5566_ff80
    );
    assert_eq!(
        dest(Dword, false, Extend::Zero).merge(old, Word, 0x8001),
        0x8001
    );
    assert_eq!(
        dest(Dword, false, Extend::Sign).merge(old, Word, 0x8001),
        0xffff_8001
    );
    assert_eq!(
        dest(Qword, false, Extend::Sign).merge(old, Byte, 0x7f),
        0x7f
    );
    assert_eq!(
        dest(Qword, false, Extend::Sign).merge(old, Word, 0x8000),
        0xffff_ffff_ffff_8000
    );
}

#[test]
fn sign_extension_of_each_size() {
    assert_eq!(sign_extend(0x80, AccessSize::Byte), u64::MAX - 0x7f);
    assert_eq!(sign_extend(0x7fff, AccessSize::Word), 0x7fff);
    assert_eq!(
        sign_extend(0x8000_0000, AccessSize::Dword),
        0xffff_ffff_8000_0000
    );
    assert_eq!(sign_extend(5, AccessSize::Qword), 5);
}
