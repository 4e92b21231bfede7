//! Bochs boots from the GRUB ISO: `corei7_skylake_x` must report VMX with EPT, VPID, unrestricted
//! guest and the preemption timer; `ryzen` must report SVM with NPT. Both run with two CPUs
//! (`cpu: count=2`) to exercise SMP start-up on Bochs's APIC model.

mod common;

use common::{assert_pass, boot, iso, setup, BOCHS_TIMEOUT, SELFTEST_ALL};
use qemu_tests::emulator::Bochs;
use qemu_tests::judge::{Expect, VirtExpect};
use qemu_tests::run::Emulator;
use qemu_tests::suite::Family;

/// CPUs given to every Bochs machine.
const BOCHS_SMP: u32 = 2;

#[test]
fn skylake_vmx() {
    let Some(a) = setup(Family::Bochs) else {
        return;
    };
    let b = Bochs::new("corei7_skylake_x", BOCHS_SMP, iso(&a, SELFTEST_ALL));
    let expect = Expect::selftest_all(u64::from(BOCHS_SMP), VirtExpect::vmx_full());
    assert_pass(&boot(
        &a,
        "bochs-skylake-vmx",
        Emulator::Bochs(b),
        &expect,
        BOCHS_TIMEOUT,
    ));
}

#[test]
fn ryzen_svm() {
    let Some(a) = setup(Family::Bochs) else {
        return;
    };
    let b = Bochs::new("ryzen", BOCHS_SMP, iso(&a, SELFTEST_ALL));
    let expect = Expect::selftest_all(u64::from(BOCHS_SMP), VirtExpect::svm_npt());
    assert_pass(&boot(
        &a,
        "bochs-ryzen-svm",
        Emulator::Bochs(b),
        &expect,
        BOCHS_TIMEOUT,
    ));
}
