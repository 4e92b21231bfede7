//! The kernel's memory for nested page tables (EPT and NPT alike): table frames from the frame allocator, reached
//! through the direct map. The page-table builder itself is vendor-neutral and unsafe-free (`virt::paging`); this is
//! the one place where its `TableMemory` trait touches physical memory. [`KernelNestedMap`] owns one VM's
//! hierarchy; the backends add only their root-pointer encoding (EPT pointer, nCR3).
//!
//! Invariant: [`KernelNestedMap::table_frames`] is exactly the number of table frames the map holds (every
//! allocation and free of its builder goes through [`KernelTables`], which counts them), so a VM's reclaim can
//! report what it returned and the tests can check it against the frame allocator's free count.

use virt::paging::{
    Attrs, MapError, NestedPageTable, PageSize, PteFormat, TableMemory, Translation, ENTRIES,
};

use crate::arch::x86_64::paging;
use crate::mm::frame;

/// Table frames from the frame allocator, accessed through the direct map with volatile accesses (the CPU walks
/// them concurrently once a guest runs). Counts the frames it hands out and takes back (`frames`).
#[derive(Debug, Default)]
pub struct KernelTables {
    /// Frames allocated minus frames freed through this value.
    frames: u64,
}

impl TableMemory for KernelTables {
    fn alloc_zeroed(&mut self) -> Option<u64> {
        let f = frame::alloc_zeroed_below(u64::MAX)?;
        self.frames += 1;
        Some(f)
    }

    fn free(&mut self, table: u64) {
        // SAFETY: the builder frees only frames it obtained from `alloc_zeroed`, once each, after unlinking them.
        unsafe { frame::free(table) };
        self.frames = self.frames.saturating_sub(1);
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

/// One VM's nested page tables (EPT or NPT, by `F`) in kernel table memory. The host frames it maps belong to the
/// caller (the VM's memory), which must outlive every vCPU using the map; the table frames are freed on drop.
#[derive(Debug)]
pub struct KernelNestedMap<F: PteFormat> {
    /// Always `Some` until `drop`, which takes it to destroy the hierarchy.
    table: Option<NestedPageTable<F>>,
    /// The table memory (and its frame count) every operation on `table` goes through.
    mem: KernelTables,
}

impl<F: PteFormat> KernelNestedMap<F> {
    /// An empty map.
    ///
    /// # Errors
    /// No frame for the root table.
    pub fn new() -> Result<Self, MapError> {
        let mut mem = KernelTables::default();
        let table = NestedPageTable::new(&mut mem)?;
        Ok(Self {
            table: Some(table),
            mem,
        })
    }

    /// Table frames this map holds (all freed on drop).
    pub fn table_frames(&self) -> u64 {
        self.mem.frames
    }

    fn table(&self) -> &NestedPageTable<F> {
        self.table
            .as_ref()
            .unwrap_or_else(|| unreachable!("nested map used after drop"))
    }

    /// Physical address of the root table (for the EPT pointer or nCR3).
    pub fn root(&self) -> u64 {
        self.table().root()
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
        let Some(t) = self.table.as_mut() else {
            unreachable!("nested map used after drop")
        };
        t.map_range(&mut self.mem, gpa, hpa, len, attrs)
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
        let Some(t) = self.table.as_mut() else {
            unreachable!("nested map used after drop")
        };
        t.map(&mut self.mem, gpa, hpa, len, size, attrs)
    }

    /// Looks up a guest-physical address.
    pub fn translate(&self, gpa: u64) -> Option<Translation> {
        self.table().translate(&self.mem, gpa)
    }
}

impl<F: PteFormat> Drop for KernelNestedMap<F> {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            t.destroy(&mut self.mem);
        }
    }
}
