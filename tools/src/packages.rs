//! System packages the build and the emulators need, checked before any command uses them.
//!
//! Design: each Debian package is recognised by a file it installs (a binary on `PATH` or a data file),
//! so the check works without asking dpkg and is cheap. Missing packages are installed with
//! `apt-get` (non-interactive, after `apt-get update`) when running as root; otherwise the exact
//! `apt-get install` line is printed and the command fails.
//!
//! Invariant: a command never starts work that would fail half-way for a missing system tool.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// A Debian package and how to recognise that it is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Package {
    /// Debian package name.
    pub name: &'static str,
    /// A program on `PATH` (no `/`) or an absolute file path the package installs.
    pub probe: &'static str,
}

const fn pkg(name: &'static str, probe: &'static str) -> Package {
    Package { name, probe }
}

/// `objcopy`, for the Multiboot 1 (elf32) copy of the kernel.
pub const BUILD: &[Package] = &[pkg("binutils", "objcopy")];
/// GRUB for BIOS and UEFI, and the tools `grub-mkrescue` uses.
pub const IMAGE: &[Package] = &[
    pkg("grub-common", "grub-mkrescue"),
    pkg("grub-pc-bin", "/usr/lib/grub/i386-pc/multiboot2.mod"),
    pkg(
        "grub-efi-amd64-bin",
        "/usr/lib/grub/x86_64-efi/multiboot2.mod",
    ),
    pkg("xorriso", "xorriso"),
    pkg("mtools", "mformat"),
];
/// QEMU (TCG) and its UEFI firmware.
pub const QEMU: &[Package] = &[
    pkg("qemu-system-x86", "qemu-system-x86_64"),
    pkg("ovmf", qemu_tests::emulator::OVMF),
];
/// Bochs, its BIOS images, and a display package to satisfy the `bochs` package's dependency on
/// `bochs-gui` (the SDL one is small; tests use the built-in rfb display headless).
pub const BOCHS: &[Package] = &[
    pkg("bochs", "bochs"),
    pkg("bochs-sdl", "/usr/share/doc/bochs-sdl"),
    pkg("bochsbios", qemu_tests::emulator::BOCHS_BIOS),
    pkg("vgabios", qemu_tests::emulator::BOCHS_VGABIOS),
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn installed(p: &Package) -> bool {
    if p.probe.starts_with('/') {
        Path::new(p.probe).exists()
    } else {
        on_path(p.probe)
    }
}

fn is_root() -> bool {
    // The effective UID is the third field of the `Uid:` line of /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

fn apt_get(args: &[&str]) -> Result<()> {
    println!("xtask: apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Makes sure every package of `groups` is installed: installs the missing ones as root, or fails
/// with the `apt-get install` line to run.
///
/// # Errors
/// Packages are missing and cannot be installed.
pub fn ensure(groups: &[&[Package]]) -> Result<()> {
    let mut missing: Vec<&'static str> = groups
        .iter()
        .flat_map(|g| g.iter())
        .filter(|p| !installed(p))
        .map(|p| p.name)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root() {
        bail!(
            "missing system packages: {}\ninstall them with:\n  sudo {line}",
            missing.join(" ")
        );
    }
    println!(
        "xtask: installing missing system packages: {}",
        missing.join(" ")
    );
    apt_get(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt_get(&args)?;
    let still: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.iter())
        .filter(|p| !installed(p))
        .map(|p| p.name)
        .collect();
    if !still.is_empty() {
        bail!("packages still missing after apt-get: {}", still.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_programs_or_absolute_paths() {
        for p in BUILD.iter().chain(IMAGE).chain(QEMU).chain(BOCHS) {
            assert!(
                p.probe.starts_with('/') || !p.probe.contains('/'),
                "{}: {}",
                p.name,
                p.probe
            );
        }
    }

    #[test]
    fn a_missing_probe_is_not_installed() {
        assert!(!installed(&pkg(
            "nonexistent",
            "/nonexistent/creditvisor/probe"
        )));
        assert!(!installed(&pkg(
            "nonexistent",
            "creditvisor-no-such-program"
        )));
    }
}
