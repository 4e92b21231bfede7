//! Physical memory: the frame allocator and the kernel heap. Virtual memory (page tables, the direct map) is in
//! `arch::x86_64::paging`.

pub mod frame;
pub mod heap;

/// Page size used throughout.
pub const PAGE_SIZE: u64 = 4096;
