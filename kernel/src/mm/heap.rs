//! Kernel heap: `linked_list_allocator` over physically contiguous frames reached through the direct map.
//!
//! Sized at a quarter of free memory, between 1 MiB and 16 MiB: enough for per-CPU structures and boot-time
//! tables; guest memory never comes from the heap but from the frame allocator.

use linked_list_allocator::LockedHeap;

use super::{frame, PAGE_SIZE};
use crate::arch::x86_64::paging;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Smallest heap we boot with.
const MIN_HEAP: u64 = 1 << 20;
/// Largest heap we take.
const MAX_HEAP: u64 = 16 << 20;

/// Why the heap could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapError {
    /// Bytes wanted.
    pub wanted: u64,
}

/// Carves the heap out of the frame allocator; returns its size in bytes.
pub fn init() -> Result<u64, HeapError> {
    let size = (frame::free_frames() * PAGE_SIZE / 4).clamp(MIN_HEAP, MAX_HEAP) & !(PAGE_SIZE - 1);
    let start = frame::alloc_contiguous(size / PAGE_SIZE).ok_or(HeapError { wanted: size })?;
    let len = usize::try_from(size).map_err(|_| HeapError { wanted: size })?;
    // SAFETY: the frames were just allocated for the heap alone and are mapped writable by the direct map.
    unsafe { HEAP.lock().init(paging::phys_to_virt(start), len) };
    Ok(size)
}

/// Bytes currently free in the heap.
pub fn free_bytes() -> usize {
    HEAP.lock().free()
}

/// Bytes currently allocated.
pub fn used_bytes() -> usize {
    HEAP.lock().used()
}
