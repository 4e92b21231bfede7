//! Guest loading: a static ELF64 image into guest RAM, then the guest ABI's boot structures (docs/guest-abi.md).
//!
//! Design: [`load`] validates the whole image before it writes one byte, then copies each `PT_LOAD` segment to
//! its physical address and zero-fills its tail, writes the GDT, the identity page tables of the first 4 GiB and
//! one `BootInfo` per vCPU, all through [`GuestMemory`]. The ELF parsing is a few fixed-offset little-endian reads
//! of the file header and program headers (System V gABI, "ELF Header" and "Program Header"); every offset and
//! size is checked with overflow-safe arithmetic against the file, so any byte string gives a [`LoadError`],
//! never a panic. (The `elf` crate would parse the same fields but leave every one of these checks to us.)
//!
//! Guest-physical layout (ABI v2): GDT at `0x1000`, PML4 at `0x2000`, PDPT at `0x3000`, four page directories at
//! `0x4000`-`0x7fff` (2 MiB pages), `BootInfo` of vCPU i at `0x8000 + i * 0x200`, the image at or above 1 MiB,
//! and the stack of vCPU i ending at `mem - i * 64 KiB`, so the top `vcpus * 64 KiB` are not for the image.
//!
//! ABI v2 adds the MMIO device table to every `BootInfo` (offset 328: count, offset 336: up to
//! [`MAX_DEVICES`] [`MmioDeviceInfo`] entries of 16 bytes, ending at 464). The loader only announces the windows
//! it is given ([`load_with_devices`]); registering them with the VM and emulating them is the caller's job.
//!
//! Invariants: segments lie in `[IMAGE_MIN, mem - vcpus * STACK_PER_VCPU)`, do not overlap, have `p_vaddr ==
//! p_paddr` (the guest runs on the identity map), and the entry point lies in an executable segment. Announced
//! device windows are 4 KiB aligned, non-empty, above guest RAM, below 4 GiB (inside the identity map) and
//! pairwise disjoint; at most [`MAX_DEVICES`] of them.

use core::fmt;

use crate::cpuid::GUEST_ABI_VERSION;
use crate::entry::{CODE_DESCRIPTOR, DATA_DESCRIPTOR};
use crate::memory::{GuestMemory, OutOfRange};

/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x1000;
/// GDTR limit: three 8-byte descriptors.
pub const GDT_LIMIT: u16 = 3 * 8 - 1;
/// Guest-physical address of the PML4 (CR3).
pub const PML4_GPA: u64 = 0x2000;
/// Guest-physical address of the PDPT.
pub const PDPT_GPA: u64 = 0x3000;
/// Guest-physical address of the first of the four page directories.
pub const PD_GPA: u64 = 0x4000;
/// Guest-physical address of vCPU 0's `BootInfo`.
pub const BOOT_INFO_GPA: u64 = 0x8000;
/// Distance between the `BootInfo`s of consecutive vCPUs.
pub const BOOT_INFO_STRIDE: u64 = 0x200;
/// Most vCPUs a VM may have in ABI v1 (their `BootInfo`s fill `0x8000`-`0x9fff`).
pub const MAX_VCPUS: u32 = 16;
/// Lowest guest-physical address an image segment may use.
pub const IMAGE_MIN: u64 = 0x10_0000;
/// Stack reserved at the top of RAM per vCPU.
pub const STACK_PER_VCPU: u64 = 64 * 1024;
/// Largest guest RAM in ABI v1.
pub const MAX_MEM: u64 = 4 << 30;
/// `BootInfo::magic`: `b"CGUEST01"` read little-endian.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"CGUEST01");
/// Bytes of `BootInfo::name`.
pub const NAME_BYTES: usize = 32;
/// Bytes of `BootInfo::cmdline` (NUL terminated, so at most 255 characters).
pub const CMDLINE_BYTES: usize = 256;
/// Most program headers accepted.
pub const MAX_PHDRS: u16 = 64;
/// Most MMIO devices in the `BootInfo` device table (ABI v2).
pub const MAX_DEVICES: usize = 8;
/// Offset of `BootInfo::device_count` (right after `cmdline`).
pub const DEVICE_COUNT_OFFSET: usize = 40 + NAME_BYTES + CMDLINE_BYTES;
/// Offset of `BootInfo::devices` (after `device_count` and `reserved2`).
pub const DEVICES_OFFSET: usize = DEVICE_COUNT_OFFSET + 8;
/// Bytes of one [`MmioDeviceInfo`] in guest memory.
pub const DEVICE_INFO_BYTES: usize = 16;
/// Alignment (and granularity of the nested page tables) of an MMIO window's base.
pub const DEVICE_ALIGN: u64 = 0x1000;
/// Where the kernel places device i's window when the configuration gives no base: `DEFAULT_MMIO_BASE + i *
/// DEVICE_ALIGN` (mmio-contract.md; a VM whose RAM reaches this address must place its windows explicitly).
pub const DEFAULT_MMIO_BASE: u64 = 0xD000_0000;
/// Identity-mapped guest-physical space: every device window must end at or below this.
pub const IDENTITY_MAP_END: u64 = 4 << 30;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;

/// Why an image or the boot structures could not be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Shorter than an ELF header.
    TooShort { len: usize },
    /// Not `\x7fELF`.
    BadMagic,
    /// Not ELFCLASS64 / ELFDATA2LSB / version 1.
    NotElf64LittleEndian,
    /// `e_type` is not `ET_EXEC` (a static executable).
    NotExecutable { e_type: u16 },
    /// `e_machine` is not x86-64.
    WrongMachine { machine: u16 },
    /// `e_phentsize` is not 56.
    BadProgramHeaderSize { size: u16 },
    /// More program headers than [`MAX_PHDRS`].
    TooManyProgramHeaders { count: u16 },
    /// The program header table lies (partly) outside the file.
    ProgramHeadersOutsideFile,
    /// No `PT_LOAD` segment.
    NoLoadableSegment,
    /// Segment `index`'s file bytes lie outside the file.
    SegmentOutsideFile { index: u16 },
    /// Segment `index` has `p_filesz > p_memsz`.
    FileSizeAboveMemSize { index: u16 },
    /// Segment `index` is linked at a virtual address other than its physical one.
    NotIdentityLinked { index: u16, vaddr: u64, paddr: u64 },
    /// Segment `index` does not fit in `[IMAGE_MIN, limit)` (RAM minus the vCPU stacks).
    SegmentOutsideMemory {
        index: u16,
        start: u64,
        end: u64,
        limit: u64,
    },
    /// Segments `a` and `b` overlap.
    SegmentsOverlap { a: u16, b: u16 },
    /// The entry point is not inside an executable segment.
    EntryNotExecutable { entry: u64 },
    /// RAM smaller than the boot structures and one stack, or larger than [`MAX_MEM`].
    BadMemorySize { bytes: u64 },
    /// Zero vCPUs or more than [`MAX_VCPUS`].
    BadVcpuCount { count: u32 },
    /// The VM name does not fit `BootInfo::name`.
    NameTooLong { len: usize },
    /// The arguments do not fit `BootInfo::cmdline`.
    ArgsTooLong { len: usize },
    /// More MMIO devices than the `BootInfo` table holds ([`MAX_DEVICES`]).
    TooManyDevices { count: usize },
    /// Device `index`'s window base is not [`DEVICE_ALIGN`] aligned, or its size is 0.
    BadDeviceWindow { index: usize, base: u64, size: u32 },
    /// Device `index`'s window overlaps guest RAM `[0, mem)` or reaches past the 4 GiB identity map.
    DeviceOutsideMmioSpace {
        index: usize,
        base: u64,
        size: u32,
        mem: u64,
    },
    /// The windows of devices `a` and `b` overlap.
    DevicesOverlap { a: usize, b: usize },
    /// A write fell outside guest RAM (cannot happen after validation; reported rather than trusted).
    Memory(OutOfRange),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TooShort { len } => write!(f, "image is {len} bytes, shorter than an ELF header"),
            Self::BadMagic => f.write_str("image is not an ELF file"),
            Self::NotElf64LittleEndian => f.write_str("image is not a little-endian ELF64 version 1 file"),
            Self::NotExecutable { e_type } => write!(f, "ELF type {e_type} is not a static executable (ET_EXEC)"),
            Self::WrongMachine { machine } => write!(f, "ELF machine {machine} is not x86-64"),
            Self::BadProgramHeaderSize { size } => write!(f, "program header size {size} is not 56"),
            Self::TooManyProgramHeaders { count } => write!(f, "{count} program headers (at most {MAX_PHDRS})"),
            Self::ProgramHeadersOutsideFile => f.write_str("program header table lies outside the file"),
            Self::NoLoadableSegment => f.write_str("no PT_LOAD segment"),
            Self::SegmentOutsideFile { index } => write!(f, "segment {index} lies outside the file"),
            Self::FileSizeAboveMemSize { index } => write!(f, "segment {index} has p_filesz > p_memsz"),
            Self::NotIdentityLinked { index, vaddr, paddr } => {
                write!(f, "segment {index} is linked at {vaddr:#x} but loads at {paddr:#x} (must be equal)")
            }
            Self::SegmentOutsideMemory { index, start, end, limit } => write!(
                f,
                "segment {index} [{start:#x}, {end:#x}) is outside the image area [{IMAGE_MIN:#x}, {limit:#x})"
            ),
            Self::SegmentsOverlap { a, b } => write!(f, "segments {a} and {b} overlap"),
            Self::EntryNotExecutable { entry } => write!(f, "entry point {entry:#x} is not in an executable segment"),
            Self::BadMemorySize { bytes } => write!(f, "guest memory of {bytes} bytes is unusable"),
            Self::BadVcpuCount { count } => write!(f, "{count} vCPUs (1 to {MAX_VCPUS})"),
            Self::NameTooLong { len } => write!(f, "VM name of {len} bytes (at most {})", NAME_BYTES - 1),
            Self::ArgsTooLong { len } => write!(f, "arguments of {len} bytes (at most {})", CMDLINE_BYTES - 1),
            Self::TooManyDevices { count } => write!(f, "{count} MMIO devices (at most {MAX_DEVICES})"),
            Self::BadDeviceWindow { index, base, size } => write!(
                f,
                "device {index}: window of {size} bytes at {base:#x} (base must be {DEVICE_ALIGN:#x} aligned, size > 0)"
            ),
            Self::DeviceOutsideMmioSpace { index, base, size, mem } => write!(
                f,
                "device {index}: window of {size} bytes at {base:#x} is not in [{mem:#x}, {IDENTITY_MAP_END:#x}) \
                 (above RAM, inside the identity map)"
            ),
            Self::DevicesOverlap { a, b } => write!(f, "the windows of devices {a} and {b} overlap"),
            Self::Memory(OutOfRange { gpa, len }) => write!(f, "write of {len} bytes at {gpa:#x} outside RAM"),
        }
    }
}

impl From<OutOfRange> for LoadError {
    fn from(e: OutOfRange) -> Self {
        Self::Memory(e)
    }
}

/// What the boot structures say about the VM.
#[derive(Clone, Copy, Debug)]
pub struct BootParams<'a> {
    pub name: &'a str,
    pub args: &'a str,
    pub vcpu_count: u32,
    /// Guest TSC frequency.
    pub tsc_hz: u64,
}

/// One entry of the `BootInfo` device table (ABI v2, docs/guest-abi.md): a virtio-mmio register window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MmioDeviceInfo {
    /// Guest-physical base of the window, [`DEVICE_ALIGN`] aligned, above guest RAM and below 4 GiB.
    pub base: u64,
    /// Bytes of the window.
    pub size: u32,
    /// Virtio device ID (2 = block).
    pub device_id: u32,
}

impl MmioDeviceInfo {
    /// The entry's 16 bytes as the guest sees them (little-endian, `repr(C)` layout).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; DEVICE_INFO_BYTES] {
        let mut b = [0u8; DEVICE_INFO_BYTES];
        b[0..8].copy_from_slice(&self.base.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b[12..16].copy_from_slice(&self.device_id.to_le_bytes());
        b
    }
}

/// Checks a device table against a VM with `mem_bytes` of RAM: at most [`MAX_DEVICES`] entries, each window
/// aligned, non-empty, in `[mem_bytes, 4 GiB)`, and no two overlapping.
///
/// # Errors
/// The first problem found.
pub fn check_devices(devices: &[MmioDeviceInfo], mem_bytes: u64) -> Result<(), LoadError> {
    if devices.len() > MAX_DEVICES {
        return Err(LoadError::TooManyDevices {
            count: devices.len(),
        });
    }
    for (index, dev) in devices.iter().enumerate() {
        let (base, size) = (dev.base, dev.size);
        if base % DEVICE_ALIGN != 0 || size == 0 {
            return Err(LoadError::BadDeviceWindow { index, base, size });
        }
        let end = base.saturating_add(u64::from(size));
        if base < mem_bytes || end > IDENTITY_MAP_END {
            return Err(LoadError::DeviceOutsideMmioSpace {
                index,
                base,
                size,
                mem: mem_bytes,
            });
        }
        for (a, other) in devices[..index].iter().enumerate() {
            if base < other.base.saturating_add(u64::from(other.size)) && other.base < end {
                return Err(LoadError::DevicesOverlap { a, b: index });
            }
        }
    }
    Ok(())
}

/// A validated `PT_LOAD` segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    pub paddr: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub mem_size: u64,
    pub executable: bool,
}

/// A validated image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    pub entry: u64,
    segments: [Option<LoadSegment>; MAX_PHDRS as usize],
}

impl Image {
    /// The loadable segments.
    pub fn segments(&self) -> impl Iterator<Item = &LoadSegment> {
        self.segments.iter().flatten()
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(bytes)
}

/// Validates `elf` as an image for a VM with `mem_bytes` of RAM and `vcpu_count` vCPUs, without writing anything.
///
/// # Errors
/// The first problem found.
pub fn parse(elf: &[u8], mem_bytes: u64, vcpu_count: u32) -> Result<Image, LoadError> {
    check_vm_shape(mem_bytes, vcpu_count)?;
    if elf.len() < EHDR_SIZE {
        return Err(LoadError::TooShort { len: elf.len() });
    }
    if elf[..4] != *b"\x7fELF" {
        return Err(LoadError::BadMagic);
    }
    // EI_CLASS = ELFCLASS64, EI_DATA = ELFDATA2LSB, EI_VERSION = EV_CURRENT; e_version = 1.
    if elf[4] != 2 || elf[5] != 1 || elf[6] != 1 || u32_at(elf, 20) != 1 {
        return Err(LoadError::NotElf64LittleEndian);
    }
    let e_type = u16_at(elf, 16);
    if e_type != ET_EXEC {
        return Err(LoadError::NotExecutable { e_type });
    }
    let machine = u16_at(elf, 18);
    if machine != EM_X86_64 {
        return Err(LoadError::WrongMachine { machine });
    }
    let entry = u64_at(elf, 24);
    let phoff = u64_at(elf, 32);
    let phentsize = u16_at(elf, 54);
    let phnum = u16_at(elf, 56);
    if usize::from(phentsize) != PHDR_SIZE {
        return Err(LoadError::BadProgramHeaderSize { size: phentsize });
    }
    if phnum > MAX_PHDRS {
        return Err(LoadError::TooManyProgramHeaders { count: phnum });
    }
    let file_len = elf.len() as u64;
    let table_end = phoff.checked_add(u64::from(phnum) * PHDR_SIZE as u64);
    let phoff = match (usize::try_from(phoff), table_end) {
        (Ok(off), Some(end)) if end <= file_len => off,
        _ => return Err(LoadError::ProgramHeadersOutsideFile),
    };

    let limit = mem_bytes - u64::from(vcpu_count) * STACK_PER_VCPU;
    let mut image = Image {
        entry,
        segments: [None; MAX_PHDRS as usize],
    };
    let mut any = false;
    let mut entry_ok = false;
    for index in 0..phnum {
        let ph = &elf[phoff + usize::from(index) * PHDR_SIZE..][..PHDR_SIZE];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let flags = u32_at(ph, 4);
        let (offset, vaddr, paddr) = (u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 24));
        let (file_size, mem_size) = (u64_at(ph, 32), u64_at(ph, 40));
        if offset
            .checked_add(file_size)
            .is_none_or(|end| end > file_len)
        {
            return Err(LoadError::SegmentOutsideFile { index });
        }
        if file_size > mem_size {
            return Err(LoadError::FileSizeAboveMemSize { index });
        }
        if vaddr != paddr {
            return Err(LoadError::NotIdentityLinked {
                index,
                vaddr,
                paddr,
            });
        }
        let end = paddr.saturating_add(mem_size);
        if paddr < IMAGE_MIN || end > limit {
            return Err(LoadError::SegmentOutsideMemory {
                index,
                start: paddr,
                end,
                limit,
            });
        }
        let segment = LoadSegment {
            paddr,
            file_offset: offset,
            file_size,
            mem_size,
            executable: flags & PF_X != 0,
        };
        for (other, seg) in image.segments.iter().enumerate() {
            if let Some(seg) = seg {
                if paddr < seg.paddr + seg.mem_size && seg.paddr < end {
                    let a = u16::try_from(other).unwrap_or(u16::MAX);
                    return Err(LoadError::SegmentsOverlap { a, b: index });
                }
            }
        }
        if segment.executable && (paddr..end).contains(&entry) {
            entry_ok = true;
        }
        image.segments[usize::from(index)] = Some(segment);
        any = true;
    }
    if !any {
        return Err(LoadError::NoLoadableSegment);
    }
    if !entry_ok {
        return Err(LoadError::EntryNotExecutable { entry });
    }
    Ok(image)
}

fn check_vm_shape(mem_bytes: u64, vcpu_count: u32) -> Result<(), LoadError> {
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(LoadError::BadVcpuCount { count: vcpu_count });
    }
    if mem_bytes > MAX_MEM || mem_bytes < IMAGE_MIN + u64::from(vcpu_count) * STACK_PER_VCPU {
        return Err(LoadError::BadMemorySize { bytes: mem_bytes });
    }
    Ok(())
}

/// Loads `elf` into `mem` (which must be zeroed) and writes the boot structures with an empty device table;
/// returns the entry point. Same as [`load_with_devices`] with no devices.
///
/// # Errors
/// Any [`LoadError`]; the image is validated completely before guest memory is written.
pub fn load(
    elf: &[u8],
    mem: &mut dyn GuestMemory,
    params: &BootParams<'_>,
) -> Result<u64, LoadError> {
    load_with_devices(elf, mem, params, &[])
}

/// Loads `elf` into `mem` (which must be zeroed) and writes the boot structures, announcing `devices` (in this
/// order) in every vCPU's `BootInfo` device table; returns the entry point.
///
/// # Errors
/// Any [`LoadError`]; the image, the parameters and the device table are validated completely before guest
/// memory is written.
pub fn load_with_devices(
    elf: &[u8],
    mem: &mut dyn GuestMemory,
    params: &BootParams<'_>,
    devices: &[MmioDeviceInfo],
) -> Result<u64, LoadError> {
    let image = parse(elf, mem.size(), params.vcpu_count)?;
    check_params(params)?;
    check_devices(devices, mem.size())?;
    for seg in image.segments() {
        // Validated: the file range is inside `elf`, so these conversions and slices are in bounds.
        let start = usize::try_from(seg.file_offset)
            .map_err(|_| LoadError::SegmentOutsideFile { index: 0 })?;
        let len = usize::try_from(seg.file_size)
            .map_err(|_| LoadError::SegmentOutsideFile { index: 0 })?;
        mem.write(seg.paddr, &elf[start..start + len])?;
        mem.zero(seg.paddr + seg.file_size, seg.mem_size - seg.file_size)?;
    }
    write_boot_structures(mem, params, devices)?;
    Ok(image.entry)
}

fn check_params(params: &BootParams<'_>) -> Result<(), LoadError> {
    if params.name.len() >= NAME_BYTES {
        return Err(LoadError::NameTooLong {
            len: params.name.len(),
        });
    }
    if params.args.len() >= CMDLINE_BYTES {
        return Err(LoadError::ArgsTooLong {
            len: params.args.len(),
        });
    }
    Ok(())
}

/// Writes the GDT, the identity page tables and the per-vCPU `BootInfo`s (with `devices` as the device table).
///
/// # Errors
/// A bad VM shape, parameter or device table, or a write outside RAM.
pub fn write_boot_structures(
    mem: &mut dyn GuestMemory,
    params: &BootParams<'_>,
    devices: &[MmioDeviceInfo],
) -> Result<(), LoadError> {
    check_vm_shape(mem.size(), params.vcpu_count)?;
    check_params(params)?;
    check_devices(devices, mem.size())?;
    let mut gdt = [0u8; 24];
    gdt[8..16].copy_from_slice(&CODE_DESCRIPTOR.to_le_bytes());
    gdt[16..24].copy_from_slice(&DATA_DESCRIPTOR.to_le_bytes());
    mem.write(GDT_GPA, &gdt)?;

    const PRESENT_WRITABLE: u64 = 0b11;
    const PAGE_SIZE_2M: u64 = 1 << 7;
    let mut table = [0u8; 4096];
    table[..8].copy_from_slice(&(PDPT_GPA | PRESENT_WRITABLE).to_le_bytes());
    mem.write(PML4_GPA, &table)?;
    table.fill(0);
    for i in 0..4u64 {
        let at = usize::try_from(i * 8).unwrap_or(0);
        table[at..at + 8]
            .copy_from_slice(&((PD_GPA + i * 0x1000) | PRESENT_WRITABLE).to_le_bytes());
    }
    mem.write(PDPT_GPA, &table)?;
    for dir in 0..4u64 {
        for (entry, chunk) in (0u64..).zip(table.chunks_exact_mut(8)) {
            let frame = (dir * 512 + entry) << 21;
            chunk.copy_from_slice(&(frame | PRESENT_WRITABLE | PAGE_SIZE_2M).to_le_bytes());
        }
        mem.write(PD_GPA + dir * 0x1000, &table)?;
    }

    for vcpu in 0..params.vcpu_count {
        let info = boot_info(params, devices, vcpu, mem.size());
        mem.write(BOOT_INFO_GPA + u64::from(vcpu) * BOOT_INFO_STRIDE, &info)?;
    }
    Ok(())
}

/// Size of `BootInfo` in ABI v2 (docs/guest-abi.md): the v1 fields, then the device table.
pub const BOOT_INFO_SIZE: usize = DEVICES_OFFSET + MAX_DEVICES * DEVICE_INFO_BYTES;

/// The `BootInfo` of `vcpu_id`; `params` and `devices` must have passed [`check_params`] and [`check_devices`].
fn boot_info(
    params: &BootParams<'_>,
    devices: &[MmioDeviceInfo],
    vcpu_id: u32,
    mem_bytes: u64,
) -> [u8; BOOT_INFO_SIZE] {
    let mut b = [0u8; BOOT_INFO_SIZE];
    b[0..8].copy_from_slice(&BOOT_MAGIC.to_le_bytes());
    b[8..12].copy_from_slice(&GUEST_ABI_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&vcpu_id.to_le_bytes());
    b[16..20].copy_from_slice(&params.vcpu_count.to_le_bytes());
    // 20..24: reserved, 0.
    b[24..32].copy_from_slice(&mem_bytes.to_le_bytes());
    b[32..40].copy_from_slice(&params.tsc_hz.to_le_bytes());
    b[40..40 + params.name.len()].copy_from_slice(params.name.as_bytes());
    let cmd = 40 + NAME_BYTES;
    b[cmd..cmd + params.args.len()].copy_from_slice(params.args.as_bytes());
    // Checked: at most MAX_DEVICES entries, so the count fits and every entry lies inside `b`.
    let count = u32::try_from(devices.len()).unwrap_or(0);
    b[DEVICE_COUNT_OFFSET..DEVICE_COUNT_OFFSET + 4].copy_from_slice(&count.to_le_bytes());
    // DEVICE_COUNT_OFFSET + 4..DEVICES_OFFSET: reserved2, 0.
    for (chunk, dev) in b[DEVICES_OFFSET..]
        .chunks_exact_mut(DEVICE_INFO_BYTES)
        .zip(devices)
    {
        chunk.copy_from_slice(&dev.to_bytes());
    }
    b
}

#[cfg(test)]
mod tests;
