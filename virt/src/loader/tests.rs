//! Loader tests: a synthetic image through every check, the boot structures byte for byte, and fuzzing.
#![allow(clippy::cast_possible_truncation)] // fixtures: small constants on a 64-bit host

use alloc::vec;
use alloc::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::memory::VecMemory;

const MEM: u64 = 8 << 20;

struct Seg {
    kind: u32,
    flags: u32,
    vaddr: u64,
    paddr: u64,
    data: Vec<u8>,
    mem_size: u64,
}

fn code(paddr: u64, data: &[u8], mem_size: u64) -> Seg {
    Seg {
        kind: PT_LOAD,
        flags: 5,
        vaddr: paddr,
        paddr,
        data: data.to_vec(),
        mem_size,
    }
}

fn build(entry: u64, segs: &[Seg]) -> Vec<u8> {
    let phnum = segs.len();
    let mut out = vec![0u8; EHDR_SIZE + phnum * PHDR_SIZE];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2;
    out[5] = 1;
    out[6] = 1;
    out[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
    out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    out[20..24].copy_from_slice(&1u32.to_le_bytes());
    out[24..32].copy_from_slice(&entry.to_le_bytes());
    out[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
    out[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    out[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out[56..58].copy_from_slice(&u16::try_from(phnum).unwrap().to_le_bytes());
    for (i, seg) in segs.iter().enumerate() {
        let offset = out.len() as u64;
        out.extend_from_slice(&seg.data);
        let ph = EHDR_SIZE + i * PHDR_SIZE;
        out[ph..ph + 4].copy_from_slice(&seg.kind.to_le_bytes());
        out[ph + 4..ph + 8].copy_from_slice(&seg.flags.to_le_bytes());
        out[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
        out[ph + 16..ph + 24].copy_from_slice(&seg.vaddr.to_le_bytes());
        out[ph + 24..ph + 32].copy_from_slice(&seg.paddr.to_le_bytes());
        out[ph + 32..ph + 40].copy_from_slice(&(seg.data.len() as u64).to_le_bytes());
        out[ph + 40..ph + 48].copy_from_slice(&seg.mem_size.to_le_bytes());
    }
    out
}

fn params() -> BootParams<'static> {
    BootParams {
        name: "burn-a",
        args: "report_ms=100",
        vcpu_count: 2,
        tsc_hz: 2_000_000_000,
    }
}

fn read_u64(mem: &VecMemory, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read(gpa, &mut b).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn loads_segments_and_zero_fills_their_tails() {
    let text = [0x90u8; 100];
    let elf = build(
        0x20_0010,
        &[
            code(0x20_0000, &text, 100),
            Seg {
                flags: 6,
                ..code(0x20_1000, &[7; 10], 0x3000)
            },
        ],
    );
    let mut mem = VecMemory::new(MEM as usize);
    // Dirty the bss area: the loader must zero it even if RAM was not.
    mem.write(0x20_1000 + 10, &[0xee; 64]).unwrap();
    let entry = load(&elf, &mut mem, &params()).unwrap();
    assert_eq!(entry, 0x20_0010);
    assert_eq!(&mem.bytes()[0x20_0000..0x20_0064], &text);
    assert_eq!(&mem.bytes()[0x20_1000..0x20_100a], &[7; 10]);
    assert!(mem.bytes()[0x20_100a..0x20_4000].iter().all(|&b| b == 0));
}

#[test]
fn boot_structures_follow_the_abi() {
    let mut mem = VecMemory::new(MEM as usize);
    write_boot_structures(&mut mem, &params(), &[]).unwrap();
    assert_eq!(read_u64(&mem, GDT_GPA), 0);
    assert_eq!(read_u64(&mem, GDT_GPA + 8), CODE_DESCRIPTOR);
    assert_eq!(read_u64(&mem, GDT_GPA + 16), DATA_DESCRIPTOR);
    assert_eq!(read_u64(&mem, PML4_GPA), PDPT_GPA | 3);
    assert_eq!(read_u64(&mem, PML4_GPA + 8), 0);
    for i in 0..4 {
        assert_eq!(read_u64(&mem, PDPT_GPA + 8 * i), (PD_GPA + 0x1000 * i) | 3);
    }
    assert_eq!(read_u64(&mem, PDPT_GPA + 32), 0);
    // Walk a few addresses through the tables: identity, 2 MiB pages, up to 4 GiB - 1.
    for gpa in [0u64, 0x20_0000, 0xc000_0000, 0xffff_ffff] {
        let pdpte = read_u64(&mem, PDPT_GPA + 8 * (gpa >> 30));
        let pde = read_u64(&mem, (pdpte & !0xfff) + 8 * ((gpa >> 21) & 511));
        assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB");
        assert_eq!((pde & !0x1f_ffff) | (gpa & 0x1f_ffff), gpa);
    }
    for vcpu in 0..2u64 {
        let at = BOOT_INFO_GPA + vcpu * BOOT_INFO_STRIDE;
        assert_eq!(read_u64(&mem, at), u64::from_le_bytes(*b"CGUEST01"));
        assert_eq!(
            read_u64(&mem, at + 8),
            2 | (vcpu << 32),
            "abi_version, vcpu_id"
        );
        assert_eq!(read_u64(&mem, at + 16), 2, "vcpu_count, reserved");
        assert_eq!(read_u64(&mem, at + 24), MEM);
        assert_eq!(read_u64(&mem, at + 32), 2_000_000_000);
        let at = usize::try_from(at).unwrap();
        assert_eq!(&mem.bytes()[at + 40..at + 47], b"burn-a\0");
        assert_eq!(&mem.bytes()[at + 72..at + 86], b"report_ms=100\0");
        assert!(
            mem.bytes()[at + 328..at + 464].iter().all(|&b| b == 0),
            "no devices: count 0, empty table"
        );
    }
    assert_eq!(BOOT_INFO_SIZE, 464);
    assert!(BOOT_INFO_SIZE as u64 <= BOOT_INFO_STRIDE);
    assert!(BOOT_INFO_GPA + u64::from(MAX_VCPUS) * BOOT_INFO_STRIDE <= 0xa000);
}

fn blk(i: u64) -> MmioDeviceInfo {
    MmioDeviceInfo {
        base: DEFAULT_MMIO_BASE + i * 0x1000,
        size: 0x200,
        device_id: 2,
    }
}

#[test]
fn abi_version_is_the_same_everywhere() {
    assert_eq!(u64::from(GUEST_ABI_VERSION), crate::hypercall::ABI_VERSION);
    assert_eq!(GUEST_ABI_VERSION, 2);
}

#[test]
fn device_table_follows_the_abi_byte_for_byte() {
    let devices = [
        blk(0),
        MmioDeviceInfo {
            base: 0xfeb0_0000,
            size: 0x1000,
            device_id: 0x1234_5678,
        },
    ];
    let mut mem = VecMemory::new(MEM as usize);
    let elf = build(0x20_0000, &[code(0x20_0000, &[0x90; 16], 16)]);
    assert_eq!(
        load_with_devices(&elf, &mut mem, &params(), &devices),
        Ok(0x20_0000)
    );
    assert_eq!((DEVICE_COUNT_OFFSET, DEVICES_OFFSET), (328, 336));
    let mut expected = [0u8; 464 - 328];
    expected[0] = 2; // device_count = 2, reserved2 = 0
    expected[8..16].copy_from_slice(&0xd000_0000u64.to_le_bytes());
    expected[16..20].copy_from_slice(&0x200u32.to_le_bytes());
    expected[20..24].copy_from_slice(&2u32.to_le_bytes());
    expected[24..32].copy_from_slice(&0xfeb0_0000u64.to_le_bytes());
    expected[32..36].copy_from_slice(&0x1000u32.to_le_bytes());
    expected[36..40].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    for vcpu in 0..2 {
        let at = usize::try_from(BOOT_INFO_GPA + vcpu * BOOT_INFO_STRIDE).unwrap();
        assert_eq!(&mem.bytes()[at + 328..at + 464], &expected[..]);
        // The v1 fields are unchanged by the table, and nothing is written past the table.
        assert_eq!(read_u64(&mem, at as u64 + 24), MEM);
        assert_eq!(&mem.bytes()[at + 72..at + 86], b"report_ms=100\0");
        assert!(mem.bytes()[at + 464..at + 0x200].iter().all(|&b| b == 0));
    }
    // Eight devices fill the table exactly: the last entry ends at offset 464.
    let eight: Vec<_> = (0..8).map(blk).collect();
    let mut mem = VecMemory::new(MEM as usize);
    write_boot_structures(&mut mem, &params(), &eight).unwrap();
    let at = usize::try_from(BOOT_INFO_GPA).unwrap();
    assert_eq!(mem.bytes()[at + 328], 8);
    assert_eq!(
        &mem.bytes()[at + 448..at + 464],
        &blk(7).to_bytes(),
        "device 7 at offset 448"
    );
    assert_eq!(read_u64(&mem, at as u64 + 448), 0xd000_7000);
}

#[test]
fn bad_device_tables_are_refused_before_anything_is_written() {
    let elf = build(0x20_0000, &[code(0x20_0000, &[0x90; 16], 16)]);
    let nine: Vec<_> = (0..9).map(blk).collect();
    let cases: [(&[MmioDeviceInfo], LoadError); 6] = [
        (&nine, LoadError::TooManyDevices { count: 9 }),
        (
            &[MmioDeviceInfo {
                base: DEFAULT_MMIO_BASE + 0x200,
                ..blk(0)
            }],
            LoadError::BadDeviceWindow {
                index: 0,
                base: DEFAULT_MMIO_BASE + 0x200,
                size: 0x200,
            },
        ),
        (
            &[blk(0), MmioDeviceInfo { size: 0, ..blk(1) }],
            LoadError::BadDeviceWindow {
                index: 1,
                base: DEFAULT_MMIO_BASE + 0x1000,
                size: 0,
            },
        ),
        (
            &[MmioDeviceInfo {
                base: MEM - 0x1000,
                ..blk(0)
            }],
            LoadError::DeviceOutsideMmioSpace {
                index: 0,
                base: MEM - 0x1000,
                size: 0x200,
                mem: MEM,
            },
        ),
        (
            &[MmioDeviceInfo {
                base: 0xffff_f000,
                size: 0x2000,
                device_id: 2,
            }],
            LoadError::DeviceOutsideMmioSpace {
                index: 0,
                base: 0xffff_f000,
                size: 0x2000,
                mem: MEM,
            },
        ),
        (
            &[
                blk(0),
                blk(3),
                MmioDeviceInfo {
                    size: 0x4000,
                    ..blk(1)
                },
            ],
            LoadError::DevicesOverlap { a: 1, b: 2 },
        ),
    ];
    for (devices, want) in cases {
        let mut mem = VecMemory::new(MEM as usize);
        assert_eq!(
            load_with_devices(&elf, &mut mem, &params(), devices),
            Err(want)
        );
        assert!(
            mem.bytes().iter().all(|&b| b == 0),
            "a refused device table writes nothing ({want})"
        );
        assert_eq!(
            write_boot_structures(&mut mem, &params(), devices),
            Err(want)
        );
        assert_eq!(check_devices(devices, MEM), Err(want));
    }
    // Adjacent windows and a window ending exactly at 4 GiB are fine.
    let edge = [
        MmioDeviceInfo {
            size: 0x1000,
            ..blk(0)
        },
        blk(1),
        MmioDeviceInfo {
            base: 0xffff_f000,
            size: 0x1000,
            device_id: 2,
        },
    ];
    assert_eq!(check_devices(&edge, MEM), Ok(()));
}

#[test]
fn every_check_has_its_error() {
    let ok = build(0x20_0000, &[code(0x20_0000, &[0x90; 16], 16)]);
    assert!(parse(&ok, MEM, 1).is_ok());
    assert_eq!(
        parse(&ok[..10], MEM, 1),
        Err(LoadError::TooShort { len: 10 })
    );
    let mut bad = ok.clone();
    bad[0] = 0;
    assert_eq!(parse(&bad, MEM, 1), Err(LoadError::BadMagic));
    let mut bad = ok.clone();
    bad[4] = 1;
    assert_eq!(parse(&bad, MEM, 1), Err(LoadError::NotElf64LittleEndian));
    let mut bad = ok.clone();
    bad[16] = 3;
    assert_eq!(
        parse(&bad, MEM, 1),
        Err(LoadError::NotExecutable { e_type: 3 })
    );
    let mut bad = ok.clone();
    bad[18] = 3;
    assert_eq!(
        parse(&bad, MEM, 1),
        Err(LoadError::WrongMachine { machine: 3 })
    );
    let mut bad = ok.clone();
    bad[54] = 32;
    assert_eq!(
        parse(&bad, MEM, 1),
        Err(LoadError::BadProgramHeaderSize { size: 32 })
    );
    let mut bad = ok.clone();
    bad[56] = 200;
    assert_eq!(
        parse(&bad, MEM, 1),
        Err(LoadError::TooManyProgramHeaders { count: 200 })
    );
    let mut bad = ok.clone();
    bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        parse(&bad, MEM, 1),
        Err(LoadError::ProgramHeadersOutsideFile)
    );
    let note = build(
        0x20_0000,
        &[Seg {
            kind: 4,
            ..code(0x20_0000, &[0; 4], 4)
        }],
    );
    assert_eq!(parse(&note, MEM, 1), Err(LoadError::NoLoadableSegment));
    let mut bad = ok.clone();
    bad[EHDR_SIZE + 32..EHDR_SIZE + 40].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        parse(&bad, MEM, 1),
        Err(LoadError::SegmentOutsideFile { index: 0 })
    );
    let bss_short = build(0x20_0000, &[code(0x20_0000, &[0x90; 16], 8)]);
    assert_eq!(
        parse(&bss_short, MEM, 1),
        Err(LoadError::FileSizeAboveMemSize { index: 0 })
    );
    let moved = build(
        0x20_0000,
        &[Seg {
            vaddr: 0xffff_8000_0000_0000,
            ..code(0x20_0000, &[0x90; 16], 16)
        }],
    );
    assert!(matches!(
        parse(&moved, MEM, 1),
        Err(LoadError::NotIdentityLinked { index: 0, .. })
    ));
    let low = build(0x1000, &[code(0x1000, &[0x90; 16], 16)]);
    assert!(matches!(
        parse(&low, MEM, 1),
        Err(LoadError::SegmentOutsideMemory { index: 0, .. })
    ));
    // The top 64 KiB per vCPU are stacks.
    let high = build(MEM - 0x1_0000, &[code(MEM - 0x1_0000, &[0x90; 16], 16)]);
    assert!(parse(&high, MEM, 0).is_err());
    assert!(matches!(
        parse(&high, MEM, 1),
        Err(LoadError::SegmentOutsideMemory { .. })
    ));
    assert!(parse(
        &build(
            MEM - 0x2_0000,
            &[code(MEM - 0x2_0000, &[0x90; 16], 0x1_0000)]
        ),
        MEM,
        1
    )
    .is_ok());
    let wrapping = build(0x20_0000, &[code(0x20_0000, &[0x90; 16], u64::MAX)]);
    assert!(matches!(
        parse(&wrapping, MEM, 1),
        Err(LoadError::SegmentOutsideMemory { .. })
    ));
    let overlap = build(
        0x20_0000,
        &[
            code(0x20_0000, &[0x90; 16], 0x2000),
            code(0x20_1000, &[0x90; 16], 16),
        ],
    );
    assert_eq!(
        parse(&overlap, MEM, 1),
        Err(LoadError::SegmentsOverlap { a: 0, b: 1 })
    );
    let entry_outside = build(0x30_0000, &[code(0x20_0000, &[0x90; 16], 16)]);
    assert_eq!(
        parse(&entry_outside, MEM, 1),
        Err(LoadError::EntryNotExecutable { entry: 0x30_0000 })
    );
    let data_only = build(
        0x20_0000,
        &[Seg {
            flags: 6,
            ..code(0x20_0000, &[0x90; 16], 16)
        }],
    );
    assert_eq!(
        parse(&data_only, MEM, 1),
        Err(LoadError::EntryNotExecutable { entry: 0x20_0000 })
    );
    assert_eq!(
        parse(&ok, MEM, 17),
        Err(LoadError::BadVcpuCount { count: 17 })
    );
    assert_eq!(
        parse(&ok, 5 << 30, 1),
        Err(LoadError::BadMemorySize { bytes: 5 << 30 })
    );

    let mut mem = VecMemory::new(MEM as usize);
    let long_name = BootParams {
        name: "a-name-that-is-far-too-long-for-32",
        ..params()
    };
    assert!(matches!(
        load(&ok, &mut mem, &long_name),
        Err(LoadError::NameTooLong { .. })
    ));
    let long_args = "x".repeat(256);
    let long_args = BootParams {
        args: &long_args,
        ..params()
    };
    assert!(matches!(
        load(&ok, &mut mem, &long_args),
        Err(LoadError::ArgsTooLong { len: 256 })
    ));
    assert!(
        mem.bytes().iter().all(|&b| b == 0),
        "a refused image writes nothing"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes are refused or loaded, never a panic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut mem = VecMemory::new(2 << 20);
        let _ = load(&bytes, &mut mem, &params());
    }

    /// A valid image with random bytes overwritten in its headers is refused or loaded, never a panic; a loaded
    /// image's segments always lie inside the image area.
    #[test]
    fn mutated_headers_never_panic(edits in proptest::collection::vec((0usize..EHDR_SIZE + 2 * PHDR_SIZE, any::<u8>()), 1..8)) {
        let mut elf = build(0x20_0000, &[code(0x20_0000, &[0x90; 64], 0x100), Seg { flags: 6, ..code(0x20_2000, &[1; 32], 0x1000) }]);
        for (at, value) in edits {
            elf[at] = value;
        }
        if let Ok(image) = parse(&elf, MEM, 2) {
            for seg in image.segments() {
                prop_assert!(seg.paddr >= IMAGE_MIN);
                prop_assert!(seg.paddr + seg.mem_size <= MEM - 2 * STACK_PER_VCPU);
            }
        }
        let mut mem = VecMemory::new(MEM as usize);
        let _ = load(&elf, &mut mem, &params());
    }
}
