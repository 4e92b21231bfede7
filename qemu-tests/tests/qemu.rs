//! QEMU TCG boots with `-cpu EPYC` (AMD SVM with nested paging): direct `-kernel` and GRUB ISO (CD-ROM
//! and hard disk), machines `pc` and `q35`, one and two CPUs, BIOS and UEFI (OVMF). Each boot runs
//! `selftest=all` and must report every CPU, SVM with NPT, the banner, passing self-tests and
//! `CV:DONE status=pass`.

mod common;

use common::{assert_pass, boot, direct, iso, setup, QEMU_TIMEOUT, SELFTEST_ALL, UEFI_TIMEOUT};
use qemu_tests::emulator::{Boot, Firmware, Machine, Qemu};
use qemu_tests::judge::{Expect, VirtExpect};
use qemu_tests::run::Emulator;
use qemu_tests::suite::Family;

fn direct_boot(name: &str, machine: Machine, smp: u32) {
    let Some(a) = setup(Family::Qemu) else { return };
    let q = Qemu::epyc(machine, smp, direct(&a, SELFTEST_ALL));
    let expect = Expect::selftest_all(u64::from(smp), VirtExpect::svm_npt());
    assert_pass(&boot(&a, name, Emulator::Qemu(q), &expect, QEMU_TIMEOUT));
}

#[test]
fn pc_smp1_direct_kernel() {
    direct_boot("qemu-pc-smp1-kernel", Machine::Pc, 1);
}

#[test]
fn pc_smp2_direct_kernel() {
    direct_boot("qemu-pc-smp2-kernel", Machine::Pc, 2);
}

#[test]
fn q35_smp1_direct_kernel() {
    direct_boot("qemu-q35-smp1-kernel", Machine::Q35, 1);
}

#[test]
fn q35_smp2_direct_kernel() {
    direct_boot("qemu-q35-smp2-kernel", Machine::Q35, 2);
}

#[test]
fn pc_smp2_grub_cdrom() {
    let Some(a) = setup(Family::Qemu) else { return };
    let q = Qemu::epyc(Machine::Pc, 2, Boot::Cdrom(iso(&a, SELFTEST_ALL)));
    let expect = Expect::selftest_all(2, VirtExpect::svm_npt());
    assert_pass(&boot(
        &a,
        "qemu-pc-smp2-iso",
        Emulator::Qemu(q),
        &expect,
        QEMU_TIMEOUT,
    ));
}

#[test]
fn q35_smp1_grub_cdrom() {
    let Some(a) = setup(Family::Qemu) else { return };
    let q = Qemu::epyc(Machine::Q35, 1, Boot::Cdrom(iso(&a, SELFTEST_ALL)));
    let expect = Expect::selftest_all(1, VirtExpect::svm_npt());
    assert_pass(&boot(
        &a,
        "qemu-q35-smp1-iso",
        Emulator::Qemu(q),
        &expect,
        QEMU_TIMEOUT,
    ));
}

/// The ISO written to a hard disk: the path of GRUB installed on a server's disk.
#[test]
fn pc_smp2_grub_hard_disk() {
    let Some(a) = setup(Family::Qemu) else { return };
    let q = Qemu::epyc(Machine::Pc, 2, Boot::Disk(iso(&a, SELFTEST_ALL)));
    let expect = Expect::selftest_all(2, VirtExpect::svm_npt());
    assert_pass(&boot(
        &a,
        "qemu-pc-smp2-disk",
        Emulator::Qemu(q),
        &expect,
        QEMU_TIMEOUT,
    ));
}

/// UEFI firmware (OVMF) booting GRUB's EFI image from the same ISO.
#[test]
fn q35_smp2_uefi_grub_cdrom() {
    let Some(a) = setup(Family::Qemu) else { return };
    let mut q = Qemu::epyc(Machine::Q35, 2, Boot::Cdrom(iso(&a, SELFTEST_ALL)));
    q.firmware = Firmware::Uefi;
    let expect = Expect::selftest_all(2, VirtExpect::svm_npt());
    let report = boot(
        &a,
        "qemu-q35-smp2-uefi",
        Emulator::Qemu(q),
        &expect,
        UEFI_TIMEOUT,
    );
    assert_pass(&report);
    let boot_marker = report.markers.iter().find(|m| m.kind == "BOOT");
    assert_eq!(
        boot_marker.and_then(|m| m.get("firmware")),
        Some("uefi"),
        "the kernel must see UEFI firmware: {boot_marker:?}"
    );
}
