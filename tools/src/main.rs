//! `cargo xtask`: the one build entry point of Creditvisor (alias in `.cargo/config.toml`).
//!
//! Commands: `build` (kernel + elf32 copy), `image` (GRUB ISO for BIOS and UEFI), `run` (boot in QEMU or
//! Bochs and stream the serial console), `test` (host tests, then the emulator tier of `qemu-tests`),
//! `ci` (format, clippy, tests) and `sim` (the sched crate's simulator).
//!
//! Design: every command checks the system packages it needs first (see [`packages`]); work that
//! is shared with the tests (ISO layout, emulator command lines, serial judging) lives in the
//! `qemu-tests` library so that `run` boots exactly what the tests boot.

mod kernel;
mod packages;
mod run;
mod test;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

/// The workspace root.
pub fn root() -> PathBuf {
    qemu_tests::suite::workspace_root()
}

/// A `cargo` command run from the workspace root (the cargo that started xtask, if known).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Emulator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emu {
    /// QEMU (TCG).
    Qemu,
    /// Bochs.
    Bochs,
}

/// QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MachineArg {
    /// i440FX.
    Pc,
    /// Q35.
    Q35,
}

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, boot and test Creditvisor"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the kernel (release, x86_64-unknown-none) and its elf32 copy for QEMU -kernel.
    Build,
    /// Build the GRUB rescue ISO (BIOS and UEFI) at build/creditvisor.iso.
    Image {
        /// Kernel command line written into grub.cfg.
        #[arg(long, default_value = "")]
        append: String,
    },
    /// Boot the hypervisor in an emulator and stream its serial console (Ctrl-C stops).
    Run(run::RunArgs),
    /// Host tests, then the emulator tests.
    Test {
        /// Only this emulator's tests (default: QEMU and Bochs).
        #[arg(long, value_enum)]
        emu: Option<Emu>,
        /// Only the host tests.
        #[arg(long)]
        host_only: bool,
    },
    /// Format check, clippy (host crates and kernel), host and emulator tests.
    Ci,
    /// Run the scheduler simulator: `cargo xtask sim <scenario>` or `cargo xtask sim io <scenario>`.
    Sim {
        /// Arguments for the simulator.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Build => kernel::build().map(|a| {
            println!("xtask: kernel {}", a.kernel.display());
            println!("xtask: elf32  {}", a.kernel32.display());
            ExitCode::SUCCESS
        }),
        Cmd::Image { append } => {
            let out = kernel::build_dir().join("creditvisor.iso");
            kernel::image(&append, None, &out).map(|_| {
                println!("xtask: image {} (cmdline {append:?})", out.display());
                ExitCode::SUCCESS
            })
        }
        Cmd::Run(args) => run::run(&args),
        Cmd::Test { emu, host_only } => test::test(emu, host_only),
        Cmd::Ci => test::ci(),
        Cmd::Sim { args } => test::sim(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `c` as a shell-like line.
pub fn show(c: &Command) {
    let shown: Vec<String> = std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("xtask: $ {}", shown.join(" "));
}

/// Runs `c`, returning whether it succeeded; prints the command first.
///
/// # Errors
/// The program cannot be started.
pub fn status(c: &mut Command) -> Result<bool> {
    show(c);
    let s = c
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", c.get_program().to_string_lossy()))?;
    Ok(s.success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_and_test_options_parse() {
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "run",
            "--emu",
            "bochs",
            "--cpu",
            "ryzen",
            "--smp",
            "2",
            "--append",
            "log=debug selftest=all",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Cmd::Run(_)));
        let cli = Cli::try_parse_from(["cargo xtask", "test", "--emu", "qemu", "--host-only"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Cmd::Test {
                emu: Some(Emu::Qemu),
                host_only: true
            }
        ));
        assert!(Cli::try_parse_from(["cargo xtask", "run", "--emu", "kvm"]).is_err());
    }

    #[test]
    fn sim_forwards_every_argument() {
        let cli =
            Cli::try_parse_from(["cargo xtask", "sim", "io", "noisy-neighbour", "--seed", "7"])
                .expect("parses");
        let Cmd::Sim { args } = cli.command else {
            panic!("not sim")
        };
        assert_eq!(args, ["io", "noisy-neighbour", "--seed", "7"]);
    }
}
