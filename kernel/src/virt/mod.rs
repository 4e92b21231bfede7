//! Hardware virtualisation: detecting what the CPU offers ([`detect`]), and the two backends of the `virt::Vcpu`
//! trait, [`vmx`] (Intel VT-x with EPT) and [`svm`] (AMD-V with NPT), chosen by that detection at boot, never by
//! build feature. Both build their nested page tables with `virt::paging` over [`tables::KernelTables`]. [`packed`]
//! keeps a decoded exit in four words for the run loop's lock-free exit trail.

pub mod detect;
pub mod packed;
pub mod svm;
pub mod tables;
pub mod vmx;
