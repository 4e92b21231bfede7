//! `cargo xtask run`: boots the hypervisor in QEMU or Bochs and streams its serial console.
//!
//! Design: QEMU gets the terminal directly (`-serial stdio`), so Ctrl-C reaches it and stops it. Bochs
//! writes COM1 to a file that the `qemu-tests` runner tails to the terminal; Bochs runs in its own
//! process group and a Ctrl-C handler here stops it, so its built-in debugger never sees the signal.
//! The default boot is the fastest one (QEMU `-kernel`); `--iso` or `--uefi` boot the GRUB ISO,
//! which is rebuilt with the `--append` command line at `build/run/creditvisor.iso`. With `--agent` (QEMU), the
//! kernel's management channel (`mgmt=com2`) goes to the unix socket `build/run/com2.sock` and `cvctl agent` is
//! started on it in the background (fresh state and log in `build/run/agent/`), stopped when QEMU ends. Without
//! `--vms`, `--agent` boots tools/agent-demo.conf (bursting, standard and I/O VMs) with an NVMe drive and gives the
//! agent a credit pool for the bursting VM, so `cvctl top` has baselines, bursts, balances and IOPS to show.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use qemu_tests::emulator::{Bochs, Boot, Firmware, Machine, Qemu, Serial};
use qemu_tests::judge::{End, Expect, VirtExpect};
use qemu_tests::run::{run as run_emulator, Emulator, RunOptions};

use crate::{kernel, packages, Emu, MachineArg};

/// Options of `cargo xtask run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Emulator.
    #[arg(long, value_enum, default_value = "qemu")]
    emu: Emu,
    /// CPU model (default: EPYC for QEMU, corei7_skylake_x for Bochs; Bochs also knows ryzen).
    #[arg(long)]
    cpu: Option<String>,
    /// Number of CPUs.
    #[arg(long, default_value_t = 2)]
    smp: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// QEMU machine type.
    #[arg(long, value_enum, default_value = "q35")]
    machine: MachineArg,
    /// Boot the GRUB ISO under UEFI (QEMU with OVMF).
    #[arg(long)]
    uefi: bool,
    /// Boot the GRUB ISO instead of QEMU -kernel (always so for Bochs).
    #[arg(long)]
    iso: bool,
    /// Kernel command line, e.g. "log=debug selftest=all exit=emu".
    #[arg(long, default_value = "")]
    append: String,
    /// VM configuration to boot with the test guests (docs/vm-config.md); default: guests/demo.conf.
    #[arg(long)]
    vms: Option<std::path::PathBuf>,
    /// Boot without VMs (no boot modules).
    #[arg(long)]
    no_vms: bool,
    /// Attach the management agent (QEMU only): the kernel's channel on COM2 (`mgmt=com2`) behind a unix socket
    /// and `cvctl agent` connected to it, with a fresh state in build/run/agent/; then use `cvctl top`.
    #[arg(long)]
    agent: bool,
    /// HTTP API address of the attached agent.
    #[arg(long, default_value = DEFAULT_API)]
    api: String,
}

/// The VMs `--agent` boots without `--vms`: bursting, standard and I/O VMs for `cvctl top`.
fn agent_demo_config() -> std::path::PathBuf {
    crate::root().join("tools/agent-demo.conf")
}

/// QEMU's throttle on the agent demo's NVMe drive (a stable capacity for the IOPS partitioner).
const DEMO_NVME_IOPS: u32 = 4000;

/// Sets up the agent demo's credit pool once the agent answers: `burst`, 1 credit, VM 0 (`burster`) its member.
fn setup_demo_pool(cvctl: std::path::PathBuf, api: String, ready: std::path::PathBuf) {
    std::thread::spawn(move || {
        let up = (0..300).any(|_| {
            let ok = ready.exists();
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        });
        if !up {
            println!("xtask: the agent did not come up within 30 s; no demo pool (see its log)");
            return;
        }
        let steps: [&[&str]; 3] = [
            &[
                "pool",
                "create",
                "burst",
                "--resource",
                "cpu",
                "--strategy",
                "full",
            ],
            &["pool", "purchase", "burst", "1"],
            &["pool", "authorize", "burst", "cv0", "0"],
        ];
        for step in steps {
            let out = std::process::Command::new(&cvctl)
                .args(["--api", &api])
                .args(step)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    println!(
                        "xtask: `cvctl {}` failed: {}",
                        step.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                    return;
                }
                Err(e) => {
                    println!("xtask: cannot run {}: {e}", cvctl.display());
                    return;
                }
            }
        }
        println!(
            "xtask: agent demo: credit pool `burst` (1 credit) with VM 0 `burster` as its member"
        );
    });
}

/// `cvctl`'s default API address.
const DEFAULT_API: &str = "127.0.0.1:7878";

/// The attached management agent; stopped when dropped.
struct AgentChild(std::process::Child);

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds `cvctl` (the management agent and CLI) and returns its path.
///
/// # Errors
/// A failing build.
pub fn build_cvctl() -> Result<std::path::PathBuf> {
    let status = crate::cargo()
        .args(["build", "-p", "mgmt-agent", "--bin", "cvctl"])
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cvctl build failed ({status})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::root().join("target"), std::path::PathBuf::from);
    let target = if target.is_absolute() {
        target
    } else {
        crate::root().join(target)
    };
    let bin = target.join("debug/cvctl");
    if !bin.exists() {
        bail!("cvctl built but not found at {}", bin.display());
    }
    Ok(bin)
}

/// Starts `cvctl agent` on the COM2 socket `sock` with its state and log in `dir` (both fresh).
fn start_agent(
    cvctl: &std::path::Path,
    dir: &std::path::Path,
    sock: &std::path::Path,
    api: &str,
) -> Result<AgentChild> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let log = dir.join("agent.log");
    let out =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone().context("agent log")?;
    // The agent retries its connection until QEMU has created the socket.
    let child = std::process::Command::new(cvctl)
        .arg("agent")
        .arg("--db")
        .arg(dir.join("cvctl.db"))
        .arg("--host")
        .arg(format!("unix:{}", sock.display()))
        .args(["--listen", api])
        .arg("--ready-file")
        .arg(dir.join("ready"))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {}", cvctl.display()))?;
    let api_env = if api == DEFAULT_API {
        String::new()
    } else {
        format!("CVCTL_API={api} ")
    };
    let c = cvctl.display();
    println!(
        "xtask: management agent attached (log {}), API http://{api}",
        log.display()
    );
    println!("xtask: in another terminal:");
    println!("    {api_env}{c} top                          live view: baselines, bursts, balances, IOPS (q quits)");
    println!("    {api_env}{c} hosts | vms | pools | usage   (add --json for JSON)");
    println!("    {api_env}{c} pool purchase burst 1            more credits for the pool");
    println!("    {api_env}{c} commit cv0 4 0 500               change vol-b's commitment (admission decides)");
    Ok(AgentChild(child))
}

/// Runs `cargo xtask run`.
///
/// # Errors
/// Missing packages, a failing build, or an emulator that cannot start.
pub fn run(args: &RunArgs) -> Result<ExitCode> {
    if args.smp == 0 {
        bail!("--smp must be at least 1");
    }
    if args.agent && args.emu == Emu::Bochs {
        bail!("--agent needs QEMU (its COM2 goes to a unix socket the agent connects to)");
    }
    let append = if args.agent {
        format!("{} mgmt=com2", args.append).trim().to_string()
    } else {
        args.append.clone()
    };
    let uses_iso = args.iso || args.uefi || args.emu == Emu::Bochs;
    let emu_packages = match args.emu {
        Emu::Qemu => packages::QEMU,
        Emu::Bochs => packages::BOCHS,
    };
    packages::ensure(&[packages::BUILD, packages::IMAGE, emu_packages])?;
    let run_dir = kernel::build_dir().join("run");
    let iso = run_dir.join("creditvisor.iso");
    // The agent demo (bursting, standard and I/O VMs on an NVMe drive) needs the `io` guest as a module, which
    // only the direct boot passes here.
    let agent_demo = args.agent && args.vms.is_none() && !args.no_vms && !uses_iso;
    let vms = (!args.no_vms).then(|| {
        args.vms.clone().unwrap_or_else(if agent_demo {
            agent_demo_config
        } else {
            kernel::demo_config
        })
    });
    if let Some(conf) = &vms {
        println!("xtask: VMs from {} (--no-vms boots none)", conf.display());
    }
    let artefacts = if uses_iso {
        kernel::image(&append, vms.as_deref(), &iso)?
    } else {
        kernel::build()?
    };
    match args.emu {
        Emu::Qemu => {
            if args.uefi && args.machine == MachineArg::Pc {
                println!("xtask: note: UEFI on the pc machine; q35 is the usual UEFI machine");
            }
            let boot = if uses_iso {
                Boot::Cdrom(iso)
            } else {
                Boot::Kernel {
                    elf32: artefacts.kernel32.clone(),
                    cmdline: append.clone(),
                }
            };
            let mut extra_args: Vec<String> = Vec::new();
            let mut agent = None;
            if args.agent {
                let cvctl = build_cvctl()?;
                let dir = run_dir.join("agent");
                let sock = run_dir.join("com2.sock");
                let _ = std::fs::remove_file(&sock);
                agent = Some(start_agent(&cvctl, &dir, &sock, &args.api)?);
                extra_args.extend([
                    "-chardev".to_string(),
                    format!("socket,id=mgmt,path={},server=on,wait=off", sock.display()),
                    "-serial".to_string(),
                    "chardev:mgmt".to_string(),
                ]);
                if agent_demo {
                    let disk = dir.join("nvme.img");
                    std::fs::File::create(&disk)
                        .and_then(|f| f.set_len(64 << 20))
                        .with_context(|| format!("cannot create {}", disk.display()))?;
                    extra_args.extend([
                        "-drive".to_string(),
                        format!(
                            "file={},if=none,id=nv0,format=raw,throttling.iops-total={DEMO_NVME_IOPS}",
                            disk.display()
                        ),
                        "-device".to_string(),
                        "nvme,serial=cv0,drive=nv0".to_string(),
                    ]);
                    setup_demo_pool(cvctl.clone(), args.api.clone(), dir.join("ready"));
                }
            }
            let mut q = Qemu {
                extra_args: match (&vms, uses_iso) {
                    (Some(conf), false) => {
                        let mut modules = kernel::modules(&artefacts, conf);
                        let io = artefacts.guests.join("io");
                        if agent_demo && !modules.iter().any(|(_, n)| n == "io") {
                            modules.push((io, "io".to_string()));
                        }
                        let initrd: Vec<String> = modules
                            .iter()
                            .map(|(f, n)| format!("{} {n}", f.display()))
                            .collect();
                        vec!["-initrd".into(), initrd.join(",")]
                    }
                    _ => Vec::new(),
                },
                machine: match args.machine {
                    MachineArg::Pc => Machine::Pc,
                    MachineArg::Q35 => Machine::Q35,
                },
                cpu: args.cpu.clone().unwrap_or_else(|| "EPYC".into()),
                smp: args.smp,
                memory_mib: args.memory,
                firmware: if args.uefi {
                    Firmware::Uefi
                } else {
                    Firmware::Bios
                },
                boot,
            };
            q.extra_args.extend(extra_args);
            let code = run_qemu(&q);
            drop(agent);
            code
        }
        Emu::Bochs => {
            if args.uefi {
                bail!("--uefi needs QEMU (Bochs has no UEFI firmware here)");
            }
            let mut b = Bochs::new(
                args.cpu.as_deref().unwrap_or("corei7_skylake_x"),
                args.smp,
                iso,
            );
            b.memory_mib = args.memory;
            run_bochs(b, &run_dir.join("bochs"))
        }
    }
}

fn run_qemu(q: &Qemu) -> Result<ExitCode> {
    // Ctrl-C goes to QEMU (its stdio chardev turns it into SIGINT) and stops it; xtask just waits.
    ctrlc::set_handler(|| {}).context("cannot install the Ctrl-C handler")?;
    let mut c = q.command(&Serial::Stdio)?;
    println!("xtask: booting in QEMU; Ctrl-C stops");
    crate::show(&c);
    let status = c.status().context("cannot run qemu-system-x86_64")?;
    // isa-debug-exit: the kernel writes 0x10 (success) or 0x11 (failure); QEMU exits (v << 1) | 1.
    match status.code() {
        Some(33) => {
            println!("\nxtask: kernel reported success");
            Ok(ExitCode::SUCCESS)
        }
        Some(35) => {
            println!("\nxtask: kernel reported failure");
            Ok(ExitCode::FAILURE)
        }
        Some(0) | None => {
            println!("\nxtask: QEMU stopped");
            Ok(ExitCode::SUCCESS)
        }
        Some(code) => {
            println!("\nxtask: QEMU exited with status {code}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run_bochs(b: Bochs, workdir: &std::path::Path) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
        .context("cannot install the Ctrl-C handler")?;
    let expect = Expect::selftest_all(u64::from(b.smp), VirtExpect::vmx_full());
    let opts = RunOptions {
        name: format!("bochs-{}", b.model),
        workdir: workdir.to_path_buf(),
        // Interactive: only Ctrl-C, the emulator's exit or a terminal marker end the run.
        timeout: Duration::from_secs(24 * 3600),
        echo: true,
        stop: Some(&stop),
    };
    println!(
        "xtask: booting in Bochs ({}, {} CPUs); Ctrl-C stops",
        b.model, b.smp
    );
    let report = run_emulator(&Emulator::Bochs(b), &expect, &opts)?;
    println!();
    println!("xtask: serial log {}", report.serial_log.display());
    if let Some(log) = &report.bochs_log {
        println!("xtask: bochs log  {}", log.display());
    }
    let last_terminal = report
        .markers
        .iter()
        .rev()
        .find(|m| qemu_tests::judge::TERMINAL_MARKERS.contains(&m.kind.as_str()));
    match (&report.end, last_terminal) {
        (End::Terminal, Some(m)) if m.kind == "DONE" && m.get("status") == Some("pass") => {
            println!("xtask: kernel reported success");
            Ok(ExitCode::SUCCESS)
        }
        (End::Terminal, Some(m)) => {
            println!("xtask: kernel reported failure: {m}");
            Ok(ExitCode::FAILURE)
        }
        (End::Stopped, _) => {
            println!("xtask: stopped");
            Ok(ExitCode::SUCCESS)
        }
        (end, _) => {
            println!("xtask: Bochs ended: {end:?}");
            Ok(ExitCode::FAILURE)
        }
    }
}
