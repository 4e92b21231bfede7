//! `cargo xtask test`, `ci` and `sim`.
//!
//! Design: tests run in tiers. The host tier is `cargo test` of the default members (every crate but
//! the kernel and the guests), plus the guests' library tests on the host; there the emulator tests of
//! `qemu-tests` skip themselves. The emulator tier builds the kernel and its elf32 copy, then runs the
//! `qemu-tests` integration binaries with `CV_EMU_TESTS=1` and the artefact paths in the environment,
//! two tests at a time (the machines have 2 cores).
//! Every stage prints its wall time.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use qemu_tests::suite::{ENV_EMU, ENV_ENABLE, ENV_KERNEL, ENV_KERNEL32};

use crate::{cargo, kernel, packages, status, Emu};

/// Emulator tests run concurrently (one per core of the 2-core test machines).
const TEST_THREADS: &str = "2";

/// Integration test binaries of `qemu-tests` per emulator.
const QEMU_TESTS: &[&str] = &[
    "qemu",
    "negative",
    "vms",
    "nvme",
    "blk",
    "blk_policy",
    "rt_io",
];
const BOCHS_TESTS: &[&str] = &["bochs", "vms"];
/// QEMU test binaries that drive the hypervisor together with the management agent (`cvctl`, built first).
const AGENT_TESTS: &[&str] = &["mgmt"];

struct Stage {
    name: &'static str,
    started: Instant,
}

impl Stage {
    fn start(name: &'static str) -> Self {
        println!("xtask: === {name} ===");
        Self {
            name,
            started: Instant::now(),
        }
    }

    fn done(self, ok: bool) -> Result<()> {
        let secs = self.started.elapsed().as_secs_f64();
        println!(
            "xtask: === {} {} in {secs:.1} s ===",
            self.name,
            if ok { "passed" } else { "FAILED" }
        );
        if !ok {
            bail!("{} failed", self.name);
        }
        Ok(())
    }
}

fn host_tests() -> Result<()> {
    let stage = Stage::start("host tests");
    let mut c = cargo();
    c.arg("test").env_remove(ENV_ENABLE);
    let mut ok = status(&mut c)?;
    // The guests crate is not a default member (its binaries are for x86_64-unknown-none), but its library
    // (the virtio driver and the io workload) also builds for the host under cfg(test), where it runs against
    // virt's own device model.
    ok &= status(cargo().args(["test", "-p", "guests", "--lib"]))?;
    stage.done(ok)
}

fn emulator_tests(emu: Option<Emu>) -> Result<()> {
    let mut groups = vec![packages::BUILD, packages::IMAGE];
    if emu != Some(Emu::Bochs) {
        groups.push(packages::QEMU);
    }
    if emu != Some(Emu::Qemu) {
        groups.push(packages::BOCHS);
    }
    packages::ensure(&groups)?;
    let stage = Stage::start("kernel build");
    let artefacts = kernel::build();
    stage.done(artefacts.is_ok())?;
    let artefacts = artefacts?;
    let cvctl = if emu == Some(Emu::Bochs) {
        None
    } else {
        let stage = Stage::start("cvctl build");
        let built = crate::run::build_cvctl();
        stage.done(built.is_ok())?;
        Some(built?)
    };
    let stage = Stage::start("emulator tests");
    let mut c = cargo();
    // --no-fail-fast: every boot runs and reports even when an earlier test binary failed.
    c.args(["test", "-p", "qemu-tests", "--no-fail-fast"]);
    let mut binaries: Vec<&str> = Vec::new();
    if emu != Some(Emu::Bochs) {
        binaries.extend(QEMU_TESTS);
        binaries.extend(AGENT_TESTS);
    }
    if emu != Some(Emu::Qemu) {
        binaries.extend(BOCHS_TESTS);
    }
    binaries.sort_unstable();
    binaries.dedup();
    for b in binaries {
        c.args(["--test", b]);
    }
    c.args(["--", "--test-threads", TEST_THREADS, "--nocapture"])
        .env(ENV_ENABLE, "1")
        .env(
            ENV_EMU,
            emu.map_or("all", |e| match e {
                Emu::Qemu => "qemu",
                Emu::Bochs => "bochs",
            }),
        )
        .env(ENV_KERNEL, &artefacts.kernel)
        .env(ENV_KERNEL32, &artefacts.kernel32)
        .env("CV_GUEST_DIR", &artefacts.guests);
    if let Some(cvctl) = &cvctl {
        c.env("CVCTL", cvctl);
    }
    let ok = status(&mut c)?;
    stage.done(ok)
}

/// `cargo xtask test`.
///
/// # Errors
/// A failing stage.
pub fn test(emu: Option<Emu>, host_only: bool) -> Result<ExitCode> {
    let started = Instant::now();
    host_tests()?;
    if !host_only {
        emulator_tests(emu)?;
    }
    println!(
        "xtask: all tests passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask ci`: format, clippy, host tests, emulator tests.
///
/// # Errors
/// A failing stage.
pub fn ci() -> Result<ExitCode> {
    let started = Instant::now();
    let stage = Stage::start("rustfmt check");
    let ok = status(cargo().args(["fmt", "--all", "--", "--check"]))?;
    stage.done(ok)?;
    // Host crates are the workspace's default members; the others (kernel, guests) are
    // bare-metal and are linted for x86_64-unknown-none.
    let bare_metal = bare_metal_members()?;
    let stage = Stage::start("clippy (host crates)");
    let ok = status(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    stage.done(ok)?;
    let stage = Stage::start("clippy (bare-metal crates)");
    let mut c = cargo();
    c.args(["clippy", "--target", "x86_64-unknown-none"])
        .arg("--target-dir")
        .arg(crate::root().join("target"));
    for p in &bare_metal {
        c.args(["-p", p]);
    }
    let ok = status(c.args(["--", "-D", "warnings"]))?;
    stage.done(ok)?;
    test(None, false)?;
    println!(
        "xtask: ci passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `cargo metadata --no-deps` of the workspace.
fn metadata() -> Result<serde_json::Value> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("cargo metadata printed invalid JSON")
}

/// Names of the workspace members that are not default members (the bare-metal crates).
fn bare_metal_members() -> Result<Vec<String>> {
    let meta = metadata()?;
    let ids = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let defaults = ids("workspace_default_members");
    let names: Vec<String> = ids("workspace_members")
        .into_iter()
        .filter(|id| !defaults.contains(id))
        .filter_map(|id| {
            meta["packages"].as_array().and_then(|ps| {
                ps.iter()
                    .find(|p| p["id"] == id.as_str())
                    .and_then(|p| p["name"].as_str().map(String::from))
            })
        })
        .collect();
    if names.is_empty() {
        bail!("no bare-metal crates found (workspace members that are not default members)");
    }
    Ok(names)
}

/// True if the workspace's `sched` package has a `sim` binary and a `std` feature.
fn sim_available() -> Result<bool> {
    let meta = metadata()?;
    let Some(sched) = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "sched"))
    else {
        return Ok(false);
    };
    let has_bin = sched["targets"].as_array().is_some_and(|ts| {
        ts.iter().any(|t| {
            t["name"] == "sim"
                && t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
    });
    let has_std = sched["features"].get("std").is_some();
    Ok(has_bin && has_std)
}

/// `cargo xtask sim ...`: forwards to the sched crate's simulator.
///
/// # Errors
/// The simulator is not part of this tree yet, or cannot be built.
pub fn sim(args: &[String]) -> Result<ExitCode> {
    if !sim_available()? {
        bail!(
            "the scheduler simulator is not available in this tree yet \
             (expected a `sim` binary and a `std` feature in sched/Cargo.toml)"
        );
    }
    let mut c = cargo();
    c.args([
        "run",
        "--release",
        "-p",
        "sched",
        "--features",
        "std",
        "--bin",
        "sim",
        "--",
    ])
    .args(args);
    crate::show(&c);
    let s = c.status().context("cannot run cargo")?;
    match s.code() {
        Some(0) => Ok(ExitCode::SUCCESS),
        Some(code) => {
            eprintln!("xtask: sim exited with status {code}");
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        None => bail!("sim was killed by a signal"),
    }
}
