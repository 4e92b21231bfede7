//! The kernel's memory for nested page tables (EPT and NPT alike): table frames from the frame allocator, reached
//! through the direct map. The page-table builder itself is vendor-neutral and unsafe-free (`virt::paging`); this is
//! the one place where its `TableMemory` trait touches physical memory.

use virt::paging::{TableMemory, ENTRIES};

use crate::arch::x86_64::paging;
use crate::mm::frame;

/// Table frames from the frame allocator, accessed through the direct map with volatile accesses (the CPU walks
/// them concurrently once a guest runs).
#[derive(Debug, Default)]
pub struct KernelTables;

impl TableMemory for KernelTables {
    fn alloc_zeroed(&mut self) -> Option<u64> {
        frame::alloc_zeroed_below(u64::MAX)
    }

    fn free(&mut self, table: u64) {
        // SAFETY: the builder frees only frames it obtained from `alloc_zeroed`, once each, after unlinking them.
        unsafe { frame::free(table) };
    }

    fn read(&self, table: u64, index: usize) -> u64 {
        if index >= ENTRIES {
            return 0;
        }
        // SAFETY: `table` is a table frame allocated above and mapped by the direct map; index < 512 keeps the
        // access inside it.
        unsafe {
            paging::phys_to_virt(table)
                .cast::<u64>()
                .add(index)
                .read_volatile()
        }
    }

    fn write(&mut self, table: u64, index: usize, value: u64) {
        if index >= ENTRIES {
            return;
        }
        // SAFETY: as in `read`; the frame is owned by the page-table builder, which serialises writes through
        // `&mut self`.
        unsafe {
            paging::phys_to_virt(table)
                .cast::<u64>()
                .add(index)
                .write_volatile(value)
        };
    }
}
