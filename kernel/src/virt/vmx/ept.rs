//! Guest-physical memory for VMX: the shared nested page-table builder (`virt::paging`) with the EPT format, its
//! table frames taken from the kernel frame allocator and reached through the direct map.
//!
//! Design: table frames come from [`KernelTables`] (shared with the SVM backend). [`GuestPhysMap`] owns one EPT
//! hierarchy and frees its table frames when dropped; the host
//! frames it maps belong to the caller (the VM's memory), which must outlive every vCPU using the map.

use virt::paging::ept::{eptp, Ept};
use virt::paging::{Attrs, MapError, NestedPageTable, PageSize, Translation};

use crate::virt::tables::KernelTables;

/// One VM's EPT hierarchy.
#[derive(Debug)]
pub struct GuestPhysMap {
    table: Option<NestedPageTable<Ept>>,
    accessed_dirty: bool,
}

impl GuestPhysMap {
    /// An empty map. `accessed_dirty` enables EPT A/D flags in the EPT pointer (only if the CPU has them).
    ///
    /// # Errors
    /// No frame for the root table.
    pub fn new(accessed_dirty: bool) -> Result<Self, MapError> {
        Ok(Self {
            table: Some(NestedPageTable::new(&mut KernelTables)?),
            accessed_dirty,
        })
    }

    fn table(&self) -> &NestedPageTable<Ept> {
        // Only `drop` takes the table out.
        self.table
            .as_ref()
            .unwrap_or_else(|| unreachable!("GuestPhysMap used after drop"))
    }

    /// Maps `len` bytes at `gpa` to host-physical `hpa`, 2 MiB pages where both are aligned.
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
            Some(t) => t.map_range(&mut KernelTables, gpa, hpa, len, attrs),
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
            Some(t) => t.map(&mut KernelTables, gpa, hpa, len, size, attrs),
            None => Err(MapError::Empty),
        }
    }

    /// Looks up a guest-physical address.
    pub fn translate(&self, gpa: u64) -> Option<Translation> {
        self.table().translate(&KernelTables, gpa)
    }

    /// The EPT pointer (4-level, write-back, A/D as chosen).
    pub fn eptp(&self) -> u64 {
        eptp(self.table().root(), self.accessed_dirty)
    }

    /// Table frames in use.
    pub fn table_frames(&self) -> usize {
        self.table().table_frames(&KernelTables)
    }
}

impl Drop for GuestPhysMap {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            t.destroy(&mut KernelTables);
        }
    }
}
