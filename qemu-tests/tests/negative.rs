//! A wrong kernel must fail the harness with the kernel's own message shown: `selftest=panic` and
//! `selftest=pagefault` boots are judged against a healthy-boot expectation, and the verdict must be
//! a failure whose reasons contain the `CV:PANIC` / `CV:EXCEPTION` line (vector 14, #PF).

mod common;

use common::{boot, direct, setup, QEMU_TIMEOUT};
use qemu_tests::emulator::{Machine, Qemu};
use qemu_tests::judge::{End, Expect, Verdict, VirtExpect};
use qemu_tests::run::Emulator;
use qemu_tests::suite::Family;

fn failing_boot(name: &str, cmdline: &str) -> Option<Vec<String>> {
    let a = setup(Family::Qemu)?;
    let q = Qemu::epyc(Machine::Pc, 1, direct(&a, cmdline));
    let expect = Expect::selftest_all(1, VirtExpect::svm_npt());
    let report = boot(&a, name, Emulator::Qemu(q), &expect, QEMU_TIMEOUT);
    assert_eq!(report.end, End::Terminal, "{}", report.details());
    match &report.verdict {
        Verdict::Pass => panic!("{name}: a broken kernel passed\n{}", report.details()),
        Verdict::Fail(reasons) => {
            println!(
                "[cv-test] {name}: failure expected and detected:\n{}",
                report.details()
            );
            Some(reasons.clone())
        }
    }
}

#[test]
fn forced_panic_fails_with_the_panic_message() {
    let Some(reasons) = failing_boot("qemu-negative-panic", "selftest=panic exit=emu") else {
        return;
    };
    let panic_line = reasons.iter().find(|r| r.contains("CV:PANIC "));
    let line = panic_line.unwrap_or_else(|| panic!("no CV:PANIC line among {reasons:?}"));
    assert!(line.contains("message="), "{line}");
}

#[test]
fn forced_page_fault_fails_with_the_exception() {
    let Some(reasons) = failing_boot("qemu-negative-pagefault", "selftest=pagefault exit=emu")
    else {
        return;
    };
    let line = reasons
        .iter()
        .find(|r| r.contains("CV:EXCEPTION "))
        .unwrap_or_else(|| panic!("no CV:EXCEPTION line among {reasons:?}"));
    assert!(line.contains("vector=14"), "{line}");
    assert!(line.contains("cr2="), "{line}");
}
