//! In-kernel test of the boot-information parsers against garbled input (`selftest=bootinfo`).
//!
//! The loader's real structures were parsed at boot; this test builds Multiboot 1 and 2 structures in heap memory
//! (below 4 GiB, so reachable through the identity map exactly like the loader's) and checks that each kind of
//! corruption is rejected with the right [`BootError`] instead of faulting, and that a well-formed structure parses
//! to the values written.

use alloc::vec;
use alloc::vec::Vec;

use super::{mb1, mb2, BootError, RegionKind};
use crate::arch::x86_64::paging;

/// A zeroed, 8-byte aligned scratch area with its physical address.
struct Scratch {
    words: Vec<u64>,
    phys: u64,
}

impl Scratch {
    fn new(bytes: usize) -> Result<Self, &'static str> {
        let words = vec![0u64; bytes.div_ceil(8)];
        let phys = paging::translate(words.as_ptr() as u64).ok_or("scratch buffer not mapped")?;
        // Heap frames are contiguous (one allocation at boot), so the buffer is contiguous physically too.
        if phys + u64::try_from(bytes).unwrap_or(u64::MAX) > super::LOADER_LIMIT {
            return Err("scratch buffer above 4 GiB");
        }
        Ok(Self { words, phys })
    }

    fn bytes(&mut self) -> &mut [u8] {
        let len = self.words.len() * 8;
        // SAFETY: the Vec<u64> owns len bytes; u8 has no alignment or validity requirements.
        unsafe { core::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), len) }
    }

    fn put_u32(&mut self, at: usize, v: u32) {
        self.bytes()[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.bytes()[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn put_str(&mut self, at: usize, s: &str) {
        self.bytes()[at..at + s.len()].copy_from_slice(s.as_bytes());
        self.bytes()[at + s.len()] = 0;
    }

    fn addr(&self, offset: usize) -> u64 {
        self.phys + u64::try_from(offset).unwrap_or(0)
    }

    fn addr32(&self, offset: usize) -> u32 {
        u32::try_from(self.addr(offset)).unwrap_or(u32::MAX)
    }
}

/// Multiboot 1 layout used below: info at 0, memory map at 128, command line at 256, module list at 320.
fn mb1_valid() -> Result<Scratch, &'static str> {
    let mut s = Scratch::new(8192)?;
    s.put_u32(0, (1 << 2) | (1 << 3) | (1 << 6));
    s.put_u32(16, s.addr32(256));
    s.put_u32(20, 1);
    s.put_u32(24, s.addr32(320));
    s.put_u32(44, 24);
    s.put_u32(48, s.addr32(128));
    // One memory-map entry: size 20, base 1 MiB, length 16 MiB, type 1.
    s.put_u32(128, 20);
    s.put_u64(132, 1 << 20);
    s.put_u64(140, 16 << 20);
    s.put_u32(148, 1);
    s.put_str(256, "log=debug");
    // One module: 0x10000..0x20000, string at 400.
    s.put_u32(320, 0x10000);
    s.put_u32(324, 0x20000);
    s.put_u32(328, s.addr32(400));
    s.put_str(400, "guest");
    Ok(s)
}

fn expect_err(
    what: &'static str,
    r: Result<super::BootInfo, BootError>,
    want: fn(&BootError) -> bool,
) -> Result<(), &'static str> {
    match r {
        Err(e) if want(&e) => Ok(()),
        _ => Err(what),
    }
}

/// Multiboot 2: header, command-line tag at 8, memory-map tag after it, end tag last.
fn mb2_build(
    with_mmap: bool,
    with_end: bool,
    total_override: Option<u32>,
) -> Result<Scratch, &'static str> {
    let mut s = Scratch::new(4096)?;
    let mut at = 8;
    // Command line tag (type 1): "x=1\0" -> size 8 + 4, padded to 16.
    s.put_u32(at, 1);
    s.put_u32(at + 4, 12);
    s.put_str(at + 8, "x=1");
    at += 16;
    if with_mmap {
        // Memory map tag (type 6): entry_size 24, version 0, two entries.
        s.put_u32(at, 6);
        s.put_u32(at + 4, 16 + 2 * 24);
        s.put_u32(at + 8, 24);
        s.put_u32(at + 12, 0);
        s.put_u64(at + 16, 0);
        s.put_u64(at + 24, 0x9F000);
        s.put_u32(at + 32, 1);
        s.put_u64(at + 40, 1 << 20);
        s.put_u64(at + 48, 31 << 20);
        s.put_u32(at + 56, 1);
        at += 64;
    }
    if with_end {
        s.put_u32(at, 0);
        s.put_u32(at + 4, 8);
        at += 8;
    } else {
        // Filler tag of an unknown type where the end tag should be.
        s.put_u32(at, 0x7777);
        s.put_u32(at + 4, 8);
        at += 8;
    }
    let total = u32::try_from(at).unwrap_or(u32::MAX);
    s.put_u32(0, total_override.unwrap_or(total));
    Ok(s)
}

/// Runs all cases; returns how many passed or the first failure.
pub fn run() -> Result<usize, &'static str> {
    let mut cases = 0;

    // Well-formed Multiboot 1.
    let s = mb1_valid()?;
    let bi = mb1::parse(s.addr(0)).map_err(|_| "valid multiboot1 rejected")?;
    let region_ok = bi.regions.len() == 1
        && bi.regions[0].start == 1 << 20
        && bi.regions[0].end == 17 << 20
        && bi.regions[0].kind == RegionKind::Usable;
    if !region_ok
        || bi.cmdline.as_str() != "log=debug"
        || bi.modules.len() != 1
        || bi.modules[0].cmdline.as_str() != "guest"
    {
        return Err("valid multiboot1 parsed to wrong values");
    }
    cases += 1;

    let mut s = mb1_valid()?;
    s.put_u32(128, 8);
    expect_err(
        "mb1 short mmap entry accepted",
        mb1::parse(s.addr(0)),
        |e| matches!(e, BootError::BadMemoryMap(_)),
    )?;
    cases += 1;

    let mut s = mb1_valid()?;
    s.put_u32(44, 1 << 20);
    expect_err("mb1 oversized mmap accepted", mb1::parse(s.addr(0)), |e| {
        matches!(e, BootError::BadSize(..))
    })?;
    cases += 1;

    let mut s = mb1_valid()?;
    s.put_u32(0, 0);
    expect_err(
        "mb1 without memory info accepted",
        mb1::parse(s.addr(0)),
        |e| *e == BootError::NoMemoryMap,
    )?;
    cases += 1;

    let mut s = mb1_valid()?;
    for i in 0..5000 {
        s.bytes()[2048 + i] = b'a';
    }
    s.bytes()[7999] = 0;
    s.put_u32(16, s.addr32(2048));
    expect_err(
        "mb1 unterminated cmdline accepted",
        mb1::parse(s.addr(0)),
        |e| matches!(e, BootError::BadSize(..)),
    )?;
    cases += 1;

    let mut s = mb1_valid()?;
    s.put_u32(324, 0x8000);
    expect_err("mb1 reversed module accepted", mb1::parse(s.addr(0)), |e| {
        matches!(e, BootError::BadModule(..))
    })?;
    cases += 1;

    let s = mb1_valid()?;
    expect_err(
        "mb1 misaligned pointer accepted",
        mb1::parse(s.addr(2)),
        |e| matches!(e, BootError::BadPointer(_)),
    )?;
    cases += 1;

    expect_err(
        "unknown magic accepted",
        super::parse(0x1234_5678, s.addr(0)),
        |e| *e == BootError::BadMagic(0x1234_5678),
    )?;
    cases += 1;

    // Well-formed Multiboot 2.
    let s = mb2_build(true, true, None)?;
    let bi = mb2::parse(s.addr(0)).map_err(|_| "valid multiboot2 rejected")?;
    if bi.cmdline.as_str() != "x=1" || bi.regions.len() != 2 || bi.regions[1].end != 32 << 20 {
        return Err("valid multiboot2 parsed to wrong values");
    }
    cases += 1;

    let s = mb2_build(true, true, Some(64 << 20))?;
    expect_err("mb2 huge total_size accepted", mb2::parse(s.addr(0)), |e| {
        matches!(e, BootError::BadSize(..))
    })?;
    cases += 1;

    let s = mb2_build(true, false, None)?;
    expect_err("mb2 without end tag accepted", mb2::parse(s.addr(0)), |e| {
        matches!(e, BootError::Multiboot2(_))
    })?;
    cases += 1;

    let s = mb2_build(false, true, None)?;
    expect_err(
        "mb2 without memory map accepted",
        mb2::parse(s.addr(0)),
        |e| *e == BootError::NoMemoryMap,
    )?;
    cases += 1;

    let s = mb2_build(true, true, Some(4))?;
    expect_err("mb2 tiny total_size accepted", mb2::parse(s.addr(0)), |e| {
        matches!(e, BootError::BadSize(..))
    })?;
    cases += 1;

    Ok(cases)
}
