//! Guest-physical memory for SVM: the shared nested page-table builder (`virt::paging`) with the NPT format, in
//! kernel table memory ([`KernelNestedMap`], shared with the VMX backend).

use virt::paging::npt::{ncr3, Npt};

use crate::virt::tables::KernelNestedMap;

/// One VM's nested page tables.
pub type NptMap = KernelNestedMap<Npt>;

impl KernelNestedMap<Npt> {
    /// nCR3 for the VMCB.
    pub fn ncr3(&self) -> u64 {
        ncr3(self.root())
    }
}
