//! Guest-physical memory for VMX: the shared nested page-table builder (`virt::paging`) with the EPT format, in
//! kernel table memory ([`KernelNestedMap`], shared with the SVM backend).

use virt::paging::ept::{eptp, Ept};

use crate::virt::tables::KernelNestedMap;

/// One VM's EPT hierarchy.
pub type GuestPhysMap = KernelNestedMap<Ept>;

impl KernelNestedMap<Ept> {
    /// The EPT pointer (4-level, write-back). EPT accessed/dirty flags stay off: nothing reads them yet, and not
    /// every VMX CPU has them.
    pub fn eptp(&self) -> u64 {
        eptp(self.root(), false)
    }
}
