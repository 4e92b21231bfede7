//! End-to-end test harness for Creditvisor: boots the kernel in QEMU or Bochs with a hard timeout,
//! captures the serial console to a file, streams it, and decides the run from the `CV:` markers of
//! docs/console.md.
//!
//! Layout: [`marker`] parses marker lines, [`judge`] turns markers into a verdict, [`emulator`] builds
//! QEMU and Bochs command lines, [`iso`] makes the GRUB ISO, [`run`] supervises one boot, and
//! [`volumes`] holds what the guest-volume tests share (boot files, NVMe disk, I/O markers). `cargo xtask`
//! uses the same modules for `image` and `run`, so tests and users boot the kernel the same way.
//!
//! The integration tests in `tests/` boot real emulators. They are slow, so plain `cargo test` skips
//! them with a message unless `CV_EMU_TESTS=1`; `cargo xtask test` builds the artefacts and sets it.

pub mod emulator;
pub mod iso;
pub mod judge;
pub mod marker;
pub mod run;
pub mod suite;
pub mod volumes;

use std::path::{Path, PathBuf};

/// Errors of the harness itself (as opposed to a failed boot, which is a verdict).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A program could not be started.
    #[error("cannot start {program}: {source} (is it installed?)")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("{program} failed:\n{output}")]
    Tool {
        /// The program.
        program: String,
        /// Its error output.
        output: String,
    },
    /// A required file is missing.
    #[error("{path} is missing: {hint}")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// An impossible or unsupported configuration.
    #[error("{0}")]
    Config(String),
}

impl HarnessError {
    /// An I/O error on `path`.
    #[must_use]
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
