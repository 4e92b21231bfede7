//! Guest-physical memory for SVM: the shared nested page-table builder (`virt::paging`) with the NPT format, its
//! table frames taken from the kernel frame allocator and reached through the direct map.
//!
//! Design: [`NptMap`] owns one NPT hierarchy and frees its table frames when dropped; the host frames it maps belong
//! to the caller (the VM's memory), which must outlive every vCPU using the map. [`FrameTables`] is the same
//! `TableMemory` as the VMX backend's (frames + direct map, volatile because the CPU walks the tables while a
//! guest runs).

use virt::paging::npt::{ncr3, Npt};
use virt::paging::{Attrs, MapError, NestedPageTable, PageSize, TableMemory, Translation, ENTRIES};

use crate::arch::x86_64::paging;
use crate::mm::frame;

/// Table frames from the frame allocator.
#[derive(Debug, Default)]
pub struct FrameTables;

impl TableMemory for FrameTables {
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
        // SAFETY: `table` is a table frame from `alloc_zeroed`, mapped by the direct map; index < 512.
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
        // SAFETY: as in `read`; writes are serialised by `&mut self` of the owning map.
        unsafe {
            paging::phys_to_virt(table)
                .cast::<u64>()
                .add(index)
                .write_volatile(value)
        };
    }
}

/// One VM's nested page tables.
#[derive(Debug)]
pub struct NptMap {
    table: Option<NestedPageTable<Npt>>,
}

impl NptMap {
    /// An empty map.
    ///
    /// # Errors
    /// No frame for the root table.
    pub fn new() -> Result<Self, MapError> {
        Ok(Self {
            table: Some(NestedPageTable::new(&mut FrameTables)?),
        })
    }

    /// nCR3 for the VMCB.
    pub fn ncr3(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| ncr3(t.root()))
    }

    /// Maps `len` bytes at `gpa` to `hpa`, 2 MiB pages where both are aligned.
    ///
    /// # Errors
    /// As `NestedPageTable::map_range`.
    pub fn map_range(
        &mut self,
        gpa: u64,
        hpa: u64,
        len: u64,
        attrs: Attrs,
    ) -> Result<(), MapError> {
        match self.table.as_mut() {
            Some(t) => t.map_range(&mut FrameTables, gpa, hpa, len, attrs),
            None => Err(MapError::Empty),
        }
    }

    /// Maps with one page size.
    ///
    /// # Errors
    /// As `NestedPageTable::map`.
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: u64,
        len: u64,
        size: PageSize,
        attrs: Attrs,
    ) -> Result<(), MapError> {
        match self.table.as_mut() {
            Some(t) => t.map(&mut FrameTables, gpa, hpa, len, size, attrs),
            None => Err(MapError::Empty),
        }
    }

    /// Looks up a guest-physical address.
    pub fn translate(&self, gpa: u64) -> Option<Translation> {
        self.table.as_ref()?.translate(&FrameTables, gpa)
    }
}

impl Drop for NptMap {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            t.destroy(&mut FrameTables);
        }
    }
}
