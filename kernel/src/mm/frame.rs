//! Physical frame allocator built from the boot memory map.
//!
//! Design: the free memory is a sorted list of page-aligned ranges, each handed out by bumping its start, plus a
//! LIFO list of freed frames linked through their first eight bytes (reached through the direct map). Ranges are
//! the usable memory-map entries minus everything that must never be handed out: the low 1 MiB (real-mode
//! structures, the AP trampoline page), every non-usable memory-map range (firmware, ACPI, MMIO, defective RAM),
//! the kernel image, the loader's structures and the boot modules.
//!
//! Invariants: a frame is either in a range, on the free list, or allocated, never two of these; `free_frames` is
//! exact. Lock order: the allocator lock is a leaf (nothing is locked while holding it).

use spin::Mutex;

use super::PAGE_SIZE;
use crate::arch::x86_64::paging;
use crate::boot::{BootInfo, RegionKind};

/// Free ranges kept (reserved ranges split usable ones, so this exceeds the memory-map capacity).
const MAX_RANGES: usize = 512;
/// Memory below this is never allocated.
pub const LOW_MEMORY_END: u64 = 1 << 20;

/// Why the allocator could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Splitting ranges around reserved areas needed more than [`MAX_RANGES`] entries.
    TooManyRanges,
    /// No usable memory above 1 MiB remains.
    NoMemory,
}

#[derive(Clone, Copy, Debug)]
struct Range {
    next: u64,
    end: u64,
}

/// The allocator state.
#[derive(Debug)]
pub struct FrameAllocator {
    ranges: heapless::Vec<Range, MAX_RANGES>,
    free_head: u64,
    free_len: u64,
    total: u64,
}

static FRAMES: Mutex<Option<FrameAllocator>> = Mutex::new(None);

/// Subtracts `[start, end)` from every range in `ranges`.
fn subtract(
    ranges: &mut heapless::Vec<Range, MAX_RANGES>,
    start: u64,
    end: u64,
) -> Result<(), FrameError> {
    let mut out: heapless::Vec<Range, MAX_RANGES> = heapless::Vec::new();
    for r in ranges.iter() {
        if end <= r.next || start >= r.end {
            out.push(*r).map_err(|_| FrameError::TooManyRanges)?;
            continue;
        }
        if r.next < start {
            out.push(Range {
                next: r.next,
                end: start,
            })
            .map_err(|_| FrameError::TooManyRanges)?;
        }
        if end < r.end {
            out.push(Range {
                next: end,
                end: r.end,
            })
            .map_err(|_| FrameError::TooManyRanges)?;
        }
    }
    *ranges = out;
    Ok(())
}

impl FrameAllocator {
    /// Builds the allocator: usable memory from `bi` minus `reserved` (physical `[start, end)` ranges).
    pub fn new(bi: &BootInfo, reserved: &[(u64, u64)]) -> Result<Self, FrameError> {
        let mut ranges: heapless::Vec<Range, MAX_RANGES> = heapless::Vec::new();
        for r in bi.regions.iter().filter(|r| r.kind == RegionKind::Usable) {
            let start = r.start.max(LOW_MEMORY_END).next_multiple_of(PAGE_SIZE);
            let end = r.end & !(PAGE_SIZE - 1);
            if start < end {
                ranges
                    .push(Range { next: start, end })
                    .map_err(|_| FrameError::TooManyRanges)?;
            }
        }
        // Memory maps may overlap: a non-usable entry always wins.
        for r in bi.regions.iter().filter(|r| r.kind != RegionKind::Usable) {
            subtract(
                &mut ranges,
                r.start & !(PAGE_SIZE - 1),
                r.end.next_multiple_of(PAGE_SIZE),
            )?;
        }
        for &(s, e) in reserved.iter().chain(bi.reserved.iter()) {
            subtract(
                &mut ranges,
                s & !(PAGE_SIZE - 1),
                e.next_multiple_of(PAGE_SIZE),
            )?;
        }
        for m in &bi.modules {
            subtract(
                &mut ranges,
                m.start & !(PAGE_SIZE - 1),
                m.end.next_multiple_of(PAGE_SIZE),
            )?;
        }
        ranges.sort_unstable_by_key(|r| r.next);
        let total = ranges.iter().map(|r| (r.end - r.next) / PAGE_SIZE).sum();
        if total == 0 {
            return Err(FrameError::NoMemory);
        }
        Ok(Self {
            ranges,
            free_head: 0,
            free_len: 0,
            total,
        })
    }

    /// Free frames.
    pub fn free_frames(&self) -> u64 {
        self.free_len
            + self
                .ranges
                .iter()
                .map(|r| (r.end - r.next) / PAGE_SIZE)
                .sum::<u64>()
    }

    /// Frames managed (free or allocated).
    pub fn total_frames(&self) -> u64 {
        self.total
    }

    /// Whether `frame` lies in memory this allocator manages... as far as the remaining ranges tell: used by the
    /// self-test to check a frame is not inside a range still marked free.
    fn in_free_range(&self, frame: u64) -> bool {
        self.ranges.iter().any(|r| (r.next..r.end).contains(&frame))
    }

    fn alloc_below(&mut self, limit: u64) -> Option<u64> {
        if self.free_head != 0 && self.free_head + PAGE_SIZE <= limit {
            let frame = self.free_head;
            // SAFETY: frames on the free list are owned by the allocator and hold the next link in their first
            // eight bytes; the direct map (or, early, the identity map) covers them.
            self.free_head = unsafe { core::ptr::read(paging::phys_to_virt(frame).cast::<u64>()) };
            self.free_len -= 1;
            return Some(frame);
        }
        let r = self
            .ranges
            .iter_mut()
            .find(|r| r.next < r.end && r.next + PAGE_SIZE <= limit)?;
        let frame = r.next;
        r.next += PAGE_SIZE;
        Some(frame)
    }

    fn alloc_contiguous(&mut self, count: u64) -> Option<u64> {
        let bytes = count.checked_mul(PAGE_SIZE)?;
        let r = self.ranges.iter_mut().find(|r| r.end - r.next >= bytes)?;
        let start = r.next;
        r.next += bytes;
        Some(start)
    }

    fn free(&mut self, frame: u64) {
        // SAFETY: the caller gave the frame back, so we own it; it is reachable through the direct map.
        unsafe { core::ptr::write(paging::phys_to_virt(frame).cast::<u64>(), self.free_head) };
        self.free_head = frame;
        self.free_len += 1;
    }
}

/// Installs the allocator.
pub fn init(allocator: FrameAllocator) {
    *FRAMES.lock() = Some(allocator);
}

/// Allocates one frame anywhere.
pub fn alloc() -> Option<u64> {
    alloc_below(u64::MAX)
}

/// Allocates one frame that ends at or below `limit`.
pub fn alloc_below(limit: u64) -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc_below(limit)
}

/// Allocates one zeroed frame that ends at or below `limit`.
pub fn alloc_zeroed_below(limit: u64) -> Option<u64> {
    let frame = alloc_below(limit)?;
    // SAFETY: the frame was just allocated to us and is mapped (direct or identity map).
    unsafe { core::ptr::write_bytes(paging::phys_to_virt(frame), 0, 4096) };
    Some(frame)
}

/// Allocates `count` physically contiguous frames.
pub fn alloc_contiguous(count: u64) -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc_contiguous(count)
}

/// Returns a frame.
///
/// # Safety
/// `frame` came from this allocator, is no longer used, and is not freed twice.
pub unsafe fn free(frame: u64) {
    if let Some(a) = FRAMES.lock().as_mut() {
        a.free(frame);
    }
}

/// Free frames now.
pub fn free_frames() -> u64 {
    FRAMES
        .lock()
        .as_ref()
        .map_or(0, FrameAllocator::free_frames)
}

/// Frames managed in total.
pub fn total_frames() -> u64 {
    FRAMES
        .lock()
        .as_ref()
        .map_or(0, FrameAllocator::total_frames)
}

/// Whether `frame` still lies inside an unallocated range (for the self-test).
pub fn in_free_range(frame: u64) -> bool {
    FRAMES
        .lock()
        .as_ref()
        .is_some_and(|a| a.in_free_range(frame))
}
