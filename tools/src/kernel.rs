//! Building the kernel artefacts: the ELF64 kernel, its Multiboot 1 (elf32) copy for QEMU `-kernel`,
//! and the GRUB ISO.
//!
//! Design: the kernel is always built into the workspace's own `target/` (whatever `CARGO_TARGET_DIR`
//! says for host crates), so users, tests and CI find it at the path docs/console.md names. The ISO
//! is built by the same code the test harness uses (`qemu_tests::iso`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, packages, root};

/// Where the build puts things.
#[derive(Debug, Clone)]
pub struct Artefacts {
    /// ELF64 kernel (`target/x86_64-unknown-none/release/creditvisor`).
    pub kernel: PathBuf,
    /// Multiboot 1 elf32 copy (`build/creditvisor.elf32`).
    pub kernel32: PathBuf,
    /// Directory of the test guests (`target/x86_64-unknown-none/release`, one ELF per guest name).
    pub guests: PathBuf,
}

/// The test guests, by binary (and boot module) name.
pub const GUESTS: [&str; 5] = ["burn", "sleeper", "bursty", "periodic", "hostile"];

/// The demo VM configuration `cargo xtask run` boots.
pub fn demo_config() -> PathBuf {
    root().join("guests/demo.conf")
}

/// Boot modules for a run: every test guest, then `config` as `vms.conf` (docs/console.md).
pub fn modules(a: &Artefacts, config: &Path) -> Vec<(PathBuf, String)> {
    let mut m: Vec<(PathBuf, String)> = GUESTS
        .iter()
        .map(|g| (a.guests.join(g), (*g).to_string()))
        .collect();
    m.push((config.to_path_buf(), "vms.conf".to_string()));
    m
}

/// The `build/` directory.
pub fn build_dir() -> PathBuf {
    root().join("build")
}

/// Builds the kernel (release, x86_64-unknown-none) and its elf32 copy.
///
/// # Errors
/// Missing binutils, a failing kernel build or objcopy.
pub fn build() -> Result<Artefacts> {
    packages::ensure(&[packages::BUILD])?;
    let target_dir = root().join("target");
    let status = cargo()
        .args([
            "build",
            "-p",
            "kernel",
            "-p",
            "guests",
            "--release",
            "--target",
            "x86_64-unknown-none",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("kernel build failed ({status})");
    }
    let kernel = target_dir.join("x86_64-unknown-none/release/creditvisor");
    if !kernel.exists() {
        bail!(
            "the kernel build succeeded but {} is missing",
            kernel.display()
        );
    }
    let kernel32 = build_dir().join("creditvisor.elf32");
    std::fs::create_dir_all(build_dir()).context("cannot create build/")?;
    objcopy_elf32(&kernel, &kernel32)?;
    let guests = target_dir.join("x86_64-unknown-none/release");
    Ok(Artefacts {
        kernel,
        kernel32,
        guests,
    })
}

fn objcopy_elf32(input: &Path, output: &Path) -> Result<()> {
    let out = Command::new("objcopy")
        .args(["-I", "elf64-x86-64", "-O", "elf32-i386"])
        .arg(input)
        .arg(output)
        .output()
        .context("cannot run objcopy")?;
    if !out.status.success() {
        bail!(
            "objcopy to elf32 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Builds the kernel and the GRUB ISO `out` booting it with `cmdline` (and, with `vms`, the test guests and
/// that VM configuration as boot modules).
///
/// # Errors
/// Missing GRUB packages, or a failing build.
pub fn image(cmdline: &str, vms: Option<&Path>, out: &Path) -> Result<Artefacts> {
    packages::ensure(&[packages::BUILD, packages::IMAGE])?;
    let a = build()?;
    let stage = out.with_extension("stage");
    let mods = vms.map(|c| modules(&a, c)).unwrap_or_default();
    qemu_tests::iso::build_iso_with_modules(&a.kernel, cmdline, &mods, &stage, out)?;
    std::fs::remove_dir_all(&stage)
        .with_context(|| format!("cannot remove {}", stage.display()))?;
    Ok(a)
}
