//! Hardware virtualisation. Today: detecting what the CPU offers ([`detect`]). The VMX and SVM backends (one
//! trait, chosen by this detection at boot, never by build feature) arrive in later issues as `virt/vmx` and
//! `virt/svm`.

pub mod detect;
pub mod svm;
pub mod vmx;
