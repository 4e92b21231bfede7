//! What the emulator tier needs from its environment: whether it is enabled, which emulators it
//! covers, and where the kernel artefacts and work directories are.
//!
//! Design: `cargo xtask test` builds the kernel, its elf32 copy, and exports the variables below before
//! running `cargo test -p qemu-tests`; a developer can set them by hand. Without `CV_EMU_TESTS=1` the
//! emulator tests skip (with a message), so plain `cargo test` stays a fast host-only run.
//!
//! Invariants: nothing here panics; a missing artefact is a [`HarnessError::MissingFile`] that says
//! how to build it.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// Set to `1` to run the emulator tests.
pub const ENV_ENABLE: &str = "CV_EMU_TESTS";
/// `qemu`, `bochs` or `all` (default): which emulators' tests run.
pub const ENV_EMU: &str = "CV_EMU";
/// Path of the ELF64 kernel (default `target/x86_64-unknown-none/release/creditvisor`).
pub const ENV_KERNEL: &str = "CV_KERNEL";
/// Path of its Multiboot 1 elf32 copy (default `build/creditvisor.elf32`).
pub const ENV_KERNEL32: &str = "CV_KERNEL32";
/// Directory for per-test work files (default `target/cv-tests`).
pub const ENV_WORKDIR: &str = "CV_TEST_DIR";
/// Set to `1` to echo every serial console to standard output while tests run.
pub const ENV_ECHO: &str = "CV_ECHO";

/// An emulator family a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// QEMU.
    Qemu,
    /// Bochs.
    Bochs,
}

impl Family {
    /// Lower-case name as used in `CV_EMU` and `--emu`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Bochs => "bochs",
        }
    }
}

/// The workspace root (parent of this crate).
#[must_use]
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Why a test does not run, or `None` if it should run on `family`.
#[must_use]
pub fn skip_reason(family: Family) -> Option<String> {
    if std::env::var(ENV_ENABLE).as_deref() != Ok("1") {
        return Some(format!(
            "skipped: emulator test (set {ENV_ENABLE}=1, or run `cargo xtask test`)"
        ));
    }
    match std::env::var(ENV_EMU).as_deref() {
        Err(_) | Ok("all" | "") => None,
        Ok(x) if x == family.name() => None,
        Ok(x) => Some(format!("skipped: {ENV_EMU}={x} excludes {}", family.name())),
    }
}

/// Where the kernel artefacts are and where tests put their files.
#[derive(Debug, Clone)]
pub struct Artefacts {
    /// ELF64 kernel (for the ISO).
    pub kernel: PathBuf,
    /// elf32 copy (for QEMU `-kernel`).
    pub kernel32: PathBuf,
    /// Root of the per-test work directories.
    pub workdir: PathBuf,
    /// Echo serial consoles.
    pub echo: bool,
}

impl Artefacts {
    /// From the environment, with workspace defaults.
    ///
    /// # Errors
    /// The kernel or its elf32 copy does not exist.
    pub fn from_env() -> Result<Self, HarnessError> {
        let root = workspace_root();
        let path = |var: &str, default: &str| {
            std::env::var_os(var).map_or_else(|| root.join(default), PathBuf::from)
        };
        let a = Self {
            kernel: path(ENV_KERNEL, "target/x86_64-unknown-none/release/creditvisor"),
            kernel32: path(ENV_KERNEL32, "build/creditvisor.elf32"),
            workdir: path(ENV_WORKDIR, "target/cv-tests"),
            echo: std::env::var(ENV_ECHO).as_deref() == Ok("1"),
        };
        for p in [&a.kernel, &a.kernel32] {
            if !p.exists() {
                return Err(HarnessError::MissingFile {
                    path: p.clone(),
                    hint: "run `cargo xtask build` (or use `cargo xtask test`)",
                });
            }
        }
        Ok(a)
    }
}
