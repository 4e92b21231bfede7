//! Command lines for the emulators Creditvisor is tested on: QEMU (TCG) and Bochs.
//!
//! Design: a [`Qemu`] or [`Bochs`] value describes one machine (CPU model, CPU count, memory, firmware,
//! how the kernel is booted); `command` turns it into a ready [`Command`] whose serial port goes either
//! to a file (tests, which tail it) or to the terminal (`cargo xtask run`). Bochs is configured through
//! a generated `bochsrc` and a debugger script holding `continue` (PLATFORM.md's headless recipe).
//!
//! Invariants: every command built here is non-interactive apart from the serial console, never
//! reboots on a triple fault (QEMU `-no-reboot`, Bochs `reset_on_triple_fault=0`) and carries the
//! emulator-exit devices the kernel's `exit=emu` uses (QEMU isa-debug-exit at 0xf4; Bochs port 0x8900
//! is always present).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::HarnessError;

/// QEMU's firmware for UEFI boots (Debian package `ovmf`).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// Bochs's system BIOS (Debian package `bochsbios`).
pub const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// Bochs's VGA BIOS (Debian package `vgabios`).
pub const BOCHS_VGABIOS: &str = "/usr/share/vgabios/vgabios.bin";

/// QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// i440FX (`pc`).
    Pc,
    /// Q35 with PCIe.
    Q35,
}

impl Machine {
    fn name(self) -> &'static str {
        match self {
            Self::Pc => "pc",
            Self::Q35 => "q35",
        }
    }
}

/// Firmware QEMU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default).
    Bios,
    /// OVMF (UEFI).
    Uefi,
}

/// How the kernel reaches the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// QEMU `-kernel` with the Multiboot 1 (elf32) copy of the kernel and this command line.
    Kernel {
        /// The `objcopy -O elf32-i386` copy of the kernel.
        elf32: PathBuf,
        /// Kernel command line.
        cmdline: String,
    },
    /// The GRUB ISO as a CD-ROM.
    Cdrom(PathBuf),
    /// The GRUB ISO written to a hard disk (the "GRUB on a disk" path).
    Disk(PathBuf),
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// Into a file (created or truncated by the emulator).
    File(PathBuf),
    /// To the emulator's standard output (QEMU only; Ctrl-C stops QEMU).
    Stdio,
}

/// One QEMU machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    /// Machine type.
    pub machine: Machine,
    /// `-cpu` model, e.g. `EPYC`.
    pub cpu: String,
    /// Number of CPUs.
    pub smp: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Firmware.
    pub firmware: Firmware,
    /// Boot path.
    pub boot: Boot,
    /// Further arguments appended to the command (e.g. `-initrd` modules, `-icount`).
    pub extra_args: Vec<String>,
}

impl Qemu {
    /// A TCG machine with `-cpu EPYC`, 512 MiB, BIOS firmware.
    #[must_use]
    pub fn epyc(machine: Machine, smp: u32, boot: Boot) -> Self {
        Self {
            machine,
            cpu: "EPYC".to_string(),
            smp,
            memory_mib: 512,
            firmware: Firmware::Bios,
            boot,
            extra_args: Vec::new(),
        }
    }

    /// The QEMU command for this machine with the serial console sent to `serial`.
    ///
    /// # Errors
    /// A UEFI machine whose OVMF firmware is not installed.
    pub fn command(&self, serial: &Serial) -> Result<Command, HarnessError> {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-machine", &format!("{},accel=tcg", self.machine.name())])
            .args(["-cpu", &self.cpu])
            .args(["-smp", &self.smp.to_string()])
            .args(["-m", &format!("{}M", self.memory_mib)])
            .args(["-display", "none", "-vga", "none", "-monitor", "none"])
            .args(["-no-reboot"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        match serial {
            Serial::File(path) => c.arg("-serial").arg(format!("file:{}", path.display())),
            Serial::Stdio => c.args(["-serial", "stdio"]),
        };
        if self.firmware == Firmware::Uefi {
            if !Path::new(OVMF).exists() {
                return Err(HarnessError::MissingFile {
                    path: OVMF.into(),
                    hint: "install the Debian package `ovmf`",
                });
            }
            c.args(["-bios", OVMF]);
        }
        match &self.boot {
            Boot::Kernel { elf32, cmdline } => {
                if self.firmware == Firmware::Uefi {
                    return Err(HarnessError::Config(
                        "QEMU -kernel (Multiboot 1) needs BIOS firmware; boot the ISO for UEFI"
                            .into(),
                    ));
                }
                c.arg("-kernel").arg(elf32).args(["-append", cmdline]);
            }
            Boot::Cdrom(iso) => {
                c.arg("-cdrom").arg(iso).args(["-boot", "d"]);
            }
            Boot::Disk(iso) => {
                let drive = format!(
                    "file={},format=raw,if=ide,media=disk,snapshot=on",
                    iso.display()
                );
                c.args(["-drive", &drive]).args(["-boot", "c"]);
            }
        }
        c.args(&self.extra_args);
        Ok(c)
    }
}

/// One Bochs machine booting the GRUB ISO from its CD-ROM drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bochs {
    /// `cpu: model=`, e.g. `corei7_skylake_x` or `ryzen`.
    pub model: String,
    /// `cpu: count=`.
    pub smp: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Emulated instructions per second (Bochs's notion of time).
    pub ips: u64,
    /// The GRUB ISO.
    pub iso: PathBuf,
}

impl Bochs {
    /// A machine of `model` with `smp` CPUs booting `iso`, 256 MiB.
    #[must_use]
    pub fn new(model: &str, smp: u32, iso: PathBuf) -> Self {
        Self {
            model: model.to_string(),
            smp,
            memory_mib: 256,
            ips: 50_000_000,
            iso,
        }
    }

    /// The text of the `bochsrc` for this machine, logging to `log` and sending COM1 to `serial`.
    #[must_use]
    pub fn bochsrc(&self, serial: &Path, log: &Path) -> String {
        let mut rc = String::new();
        // `write!` to a String cannot fail.
        let _ = writeln!(rc, "megs: {}", self.memory_mib);
        let _ = writeln!(
            rc,
            "cpu: model={}, count={}, ips={}, reset_on_triple_fault=0",
            self.model, self.smp, self.ips
        );
        let _ = writeln!(rc, "romimage: file={BOCHS_BIOS}");
        let _ = writeln!(rc, "vgaromimage: file={BOCHS_VGABIOS}");
        let _ = writeln!(
            rc,
            "ata0-master: type=cdrom, path=\"{}\", status=inserted",
            self.iso.display()
        );
        rc.push_str("boot: cdrom\n");
        rc.push_str("display_library: rfb, options=\"timeout=0\"\n");
        rc.push_str("sound: driver=dummy\nspeaker: enabled=0\n");
        rc.push_str("panic: action=fatal\nerror: action=report\n");
        let _ = writeln!(rc, "log: {}", log.display());
        let _ = writeln!(rc, "com1: enabled=1, mode=file, dev={}", serial.display());
        rc.push_str("port_e9_hack: enabled=1\n");
        rc
    }

    /// Writes `bochsrc` and the debugger script into `workdir` and returns the Bochs command.
    /// Bochs's own stdout/stderr are left to the caller.
    ///
    /// # Errors
    /// The work directory cannot be written, or the ISO or BIOS images are missing.
    pub fn command(
        &self,
        workdir: &Path,
        serial: &Path,
        log: &Path,
    ) -> Result<Command, HarnessError> {
        for (path, hint) in [
            (
                Path::new(BOCHS_BIOS),
                "install the Debian package `bochsbios`",
            ),
            (
                Path::new(BOCHS_VGABIOS),
                "install the Debian package `vgabios`",
            ),
            (self.iso.as_path(), "build it with `cargo xtask image`"),
        ] {
            if !path.exists() {
                return Err(HarnessError::MissingFile {
                    path: path.to_path_buf(),
                    hint,
                });
            }
        }
        let rc_path = workdir.join("bochsrc");
        let dbg_path = workdir.join("dbg.rc");
        fs::write(&rc_path, self.bochsrc(serial, log))
            .map_err(|e| HarnessError::io(&rc_path, e))?;
        fs::write(&dbg_path, "continue\n").map_err(|e| HarnessError::io(&dbg_path, e))?;
        let mut c = Command::new("bochs");
        c.arg("-q")
            .arg("-f")
            .arg(&rc_path)
            .arg("-rc")
            .arg(&dbg_path)
            .current_dir(workdir)
            .stdin(Stdio::null());
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn qemu_direct_kernel_command() {
        let q = Qemu::epyc(
            Machine::Q35,
            2,
            Boot::Kernel {
                elf32: "k.elf32".into(),
                cmdline: "selftest=all exit=emu".into(),
            },
        );
        let a = args(&q.command(&Serial::File("s.log".into())).expect("builds"));
        let joined = a.join(" ");
        assert!(joined.contains("-machine q35,accel=tcg"), "{joined}");
        assert!(joined.contains("-cpu EPYC -smp 2"), "{joined}");
        assert!(joined.contains("-serial file:s.log"), "{joined}");
        assert!(joined.contains("isa-debug-exit,iobase=0xf4"), "{joined}");
        assert!(joined.contains("-no-reboot"));
        assert!(a
            .windows(2)
            .any(|w| w[0] == "-append" && w[1] == "selftest=all exit=emu"));
    }

    #[test]
    fn qemu_uefi_refuses_direct_kernel() {
        let mut q = Qemu::epyc(
            Machine::Pc,
            1,
            Boot::Kernel {
                elf32: "k".into(),
                cmdline: String::new(),
            },
        );
        q.firmware = Firmware::Uefi;
        assert!(q.command(&Serial::Stdio).is_err());
    }

    #[test]
    fn qemu_disk_boot_does_not_modify_the_image() {
        let q = Qemu::epyc(Machine::Pc, 1, Boot::Disk("cv.iso".into()));
        let joined = args(&q.command(&Serial::Stdio).expect("builds")).join(" ");
        assert!(
            joined.contains("file=cv.iso,format=raw,if=ide,media=disk,snapshot=on"),
            "{joined}"
        );
    }

    #[test]
    fn bochsrc_has_the_headless_recipe() {
        let b = Bochs::new("ryzen", 2, "cv.iso".into());
        let rc = b.bochsrc(Path::new("serial.log"), Path::new("bochs.log"));
        assert!(rc.contains("cpu: model=ryzen, count=2,"), "{rc}");
        assert!(rc.contains("reset_on_triple_fault=0"));
        assert!(rc.contains("display_library: rfb, options=\"timeout=0\""));
        assert!(rc.contains("com1: enabled=1, mode=file, dev=serial.log"));
        assert!(rc.contains("path=\"cv.iso\""));
    }
}
