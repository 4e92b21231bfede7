//! Shared helpers of the emulator test binaries: skipping, artefacts, per-command-line ISOs,
//! running a boot with the verdict and timing printed, and booting guests with volumes on an NVMe
//! drive ([`boot_volumes`], files from `qemu_tests::volumes`).
//!
//! Volume boots of one test binary run one at a time (a process-wide lock): their figures are rates,
//! and two emulators competing for the 2-core machine would measure the host instead.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use qemu_tests::emulator::{Boot, Machine, Qemu};
use qemu_tests::judge::Expect;
use qemu_tests::run::{run, Emulator, Report, RunOptions};
use qemu_tests::suite::{skip_reason, Artefacts, Family};
use qemu_tests::volumes::{two_cpu_svm, VolumeBoot};
use qemu_tests::HarnessError;

/// The command line of every positive boot.
pub const SELFTEST_ALL: &str = "selftest=all exit=emu";

/// Hard timeouts. Runs stop at the first terminal marker, so these only bound a hung boot; they
/// are generous because the 2-core test machines are shared.
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
pub const UEFI_TIMEOUT: Duration = Duration::from_secs(240);
pub const BOCHS_TIMEOUT: Duration = Duration::from_secs(300);

/// The artefacts, or `None` (with a message) when this family's tests are skipped.
pub fn setup(family: Family) -> Option<Artefacts> {
    if let Some(why) = skip_reason(family) {
        // Written to the raw stderr handle: libtest captures `println!`/`eprintln!` of passing
        // tests, and a skip must be visible in a plain `cargo test`.
        let name = std::thread::current().name().unwrap_or("test").to_string();
        let _ = writeln!(std::io::stderr(), "{name}: {why}");
        return None;
    }
    match Artefacts::from_env() {
        Ok(a) => Some(a),
        Err(e) => panic!("emulator tests enabled but artefacts are missing: {e}"),
    }
}

/// Direct QEMU `-kernel` boot with `cmdline`.
pub fn direct(a: &Artefacts, cmdline: &str) -> Boot {
    Boot::Kernel {
        elf32: a.kernel32.clone(),
        cmdline: cmdline.to_string(),
    }
}

/// The GRUB ISO booting the kernel with `cmdline`, built once per test binary and command line.
pub fn iso(a: &Artefacts, cmdline: &str) -> PathBuf {
    static ISOS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let map = ISOS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = map.get(cmdline) {
        return p.clone();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .file_stem()
        .map_or_else(|| "tests".to_string(), |s| s.to_string_lossy().into_owned());
    let slug: String = cmdline
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let dir = a.workdir.join("iso").join(bin).join(slug);
    let out = dir.join("creditvisor.iso");
    if let Err(e) = qemu_tests::iso::build_iso(&a.kernel, cmdline, &dir.join("stage"), &out) {
        panic!("cannot build the test ISO: {e}");
    }
    map.insert(cmdline.to_string(), out.clone());
    out
}

/// Boots `emulator`, prints the verdict with its wall time, and returns the report.
pub fn boot(
    a: &Artefacts,
    name: &str,
    emulator: Emulator,
    expect: &Expect,
    timeout: Duration,
) -> Report {
    let opts = RunOptions {
        name: name.to_string(),
        workdir: a.workdir.join(name),
        timeout,
        echo: a.echo,
        stop: None,
    };
    match run(&emulator, expect, &opts) {
        Ok(report) => {
            println!(
                "[cv-test] {name}: verdict {} in {:.1} s",
                if report.verdict.is_pass() {
                    "pass"
                } else {
                    "fail"
                },
                report.elapsed.as_secs_f64()
            );
            report
        }
        Err(e) => panic!("{name}: the harness could not run the emulator: {e}"),
    }
}

/// Fails the test with the full details unless the verdict is a pass.
pub fn assert_pass(report: &Report) {
    assert!(report.verdict.is_pass(), "{}", report.details());
}

/// The value, or the test fails with the harness error's message.
pub fn must<T>(r: Result<T, HarnessError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// Boots `files` (written into the test's work directory) in QEMU `-cpu EPYC` with two CPUs (q35 when there is
/// a disk) and kernel command line `cmdline`, one volume boot of this test binary at a time, whatever the
/// verdict. Returns the report and the disk image's path.
pub fn boot_volumes(
    a: &Artefacts,
    name: &str,
    files: &VolumeBoot,
    cmdline: &str,
    timeout: Duration,
) -> (Report, Option<PathBuf>) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let prepared = must(files.prepare(&a.workdir.join(name)));
    let machine = if files.disk.is_some() {
        Machine::Q35
    } else {
        Machine::Pc
    };
    let mut q = Qemu::epyc(machine, 2, direct(a, cmdline));
    q.extra_args = prepared.args;
    let report = boot(a, name, Emulator::Qemu(q), &two_cpu_svm(), timeout);
    (report, prepared.disk)
}
