//! Guest-physical memory for SVM: the shared nested page-table builder (`virt::paging`) with the NPT format, its
//! table frames taken from the kernel frame allocator and reached through the direct map.
//!
//! Design: [`NptMap`] owns one NPT hierarchy and frees its table frames when dropped; the host frames it maps belong
//! to the caller (the VM's memory), which must outlive every vCPU using the map. Table frames come from
//! [`KernelTables`], shared with the VMX backend.

use virt::paging::npt::{ncr3, Npt};
use virt::paging::{Attrs, MapError, NestedPageTable, PageSize, Translation};

use crate::virt::tables::KernelTables;

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
            table: Some(NestedPageTable::new(&mut KernelTables)?),
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
        self.table.as_ref()?.translate(&KernelTables, gpa)
    }
}

impl Drop for NptMap {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            t.destroy(&mut KernelTables);
        }
    }
}
