//! The GRUB rescue ISO: one image that boots under legacy BIOS and UEFI, from a CD-ROM or a disk.
//!
//! Design: a staging tree `boot/creditvisor` + `boot/grub/grub.cfg` is handed to `grub-mkrescue`, which
//! puts GRUB's BIOS (`i386-pc`, from grub-pc-bin) and EFI (`x86_64-efi`, from grub-efi-amd64-bin) images
//! side by side in a hybrid ISO (El Torito for CD-ROMs, an MBR for disks, an EFI system partition
//! image for UEFI). GRUB uses the serial port as its terminal, boots at once (`timeout=0`) and loads
//! the kernel with `multiboot2`.
//!
//! Invariants: the command line is written verbatim after the kernel path, so it must not contain a
//! newline or characters GRUB would interpret (quotes, `;`, `$`); [`grub_cfg`] rejects those.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::HarnessError;

/// GRUB modules put into the image (both platforms): loaders, the ISO file system, partition maps, the
/// serial terminal. `biosdisk` exists only for i386-pc, where grub-mkrescue adds it to the core image.
pub const GRUB_MODULES: &str =
    "multiboot multiboot2 normal iso9660 part_msdos part_gpt configfile serial terminal";

/// The `grub.cfg` booting `/boot/creditvisor` with `cmdline`.
///
/// # Errors
/// `cmdline` contains characters that GRUB would interpret.
pub fn grub_cfg(cmdline: &str) -> Result<String, HarnessError> {
    grub_cfg_with_modules(cmdline, &[])
}

/// The `grub.cfg` booting `/boot/creditvisor` with `cmdline` and loading `/boot/modules/<name>` as the boot
/// module named `<name>` for each of `modules` (docs/console.md, "Boot modules").
///
/// # Errors
/// `cmdline` or a module name contains characters that GRUB would interpret.
pub fn grub_cfg_with_modules(cmdline: &str, modules: &[String]) -> Result<String, HarnessError> {
    for text in core::iter::once(cmdline).chain(modules.iter().map(String::as_str)) {
        if let Some(bad) = text
            .chars()
            .find(|c| c.is_control() || matches!(c, '"' | '\'' | ';' | '$' | '\\' | '{' | '}'))
        {
            return Err(HarnessError::Config(format!(
                "{text:?} contains {bad:?}, which GRUB would interpret"
            )));
        }
    }
    if let Some(bad) = modules
        .iter()
        .find(|m| m.is_empty() || m.contains(char::is_whitespace))
    {
        return Err(HarnessError::Config(format!(
            "module name {bad:?} must be one word"
        )));
    }
    let module_lines: String = modules
        .iter()
        .map(|m| format!("    module2 /boot/modules/{m} {m}\n"))
        .collect();
    Ok(format!(
        "serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         set timeout=0\n\
         set default=0\n\
         menuentry \"Creditvisor\" {{\n\
         \x20   multiboot2 /boot/creditvisor {cmdline}\n\
         {module_lines}\
         \x20   boot\n\
         }}\n"
    ))
}

/// Builds `out` from the ELF64 `kernel` with `cmdline`, staging files under `stage` (recreated).
///
/// # Errors
/// Missing kernel, unwritable directories, or `grub-mkrescue` failing (its output is included).
pub fn build_iso(
    kernel: &Path,
    cmdline: &str,
    stage: &Path,
    out: &Path,
) -> Result<(), HarnessError> {
    build_iso_with_modules(kernel, cmdline, &[], stage, out)
}

/// As [`build_iso`], with boot modules: each `(file, name)` is copied to `/boot/modules/<name>` and loaded
/// as the module named `name`.
///
/// # Errors
/// As [`build_iso`], or a missing module file.
pub fn build_iso_with_modules(
    kernel: &Path,
    cmdline: &str,
    modules: &[(std::path::PathBuf, String)],
    stage: &Path,
    out: &Path,
) -> Result<(), HarnessError> {
    if !kernel.exists() {
        return Err(HarnessError::MissingFile {
            path: kernel.to_path_buf(),
            hint: "build the kernel with `cargo xtask build`",
        });
    }
    let names: Vec<String> = modules.iter().map(|(_, n)| n.clone()).collect();
    let cfg = grub_cfg_with_modules(cmdline, &names)?;
    if stage.exists() {
        fs::remove_dir_all(stage).map_err(|e| HarnessError::io(stage, e))?;
    }
    let grub_dir = stage.join("boot/grub");
    fs::create_dir_all(&grub_dir).map_err(|e| HarnessError::io(&grub_dir, e))?;
    let staged_kernel = stage.join("boot/creditvisor");
    fs::copy(kernel, &staged_kernel).map_err(|e| HarnessError::io(&staged_kernel, e))?;
    let module_dir = stage.join("boot/modules");
    fs::create_dir_all(&module_dir).map_err(|e| HarnessError::io(&module_dir, e))?;
    for (file, name) in modules {
        if !file.exists() {
            return Err(HarnessError::MissingFile {
                path: file.clone(),
                hint: "build the guests with `cargo xtask build`",
            });
        }
        let to = module_dir.join(name);
        fs::copy(file, &to).map_err(|e| HarnessError::io(&to, e))?;
    }
    let cfg_path = grub_dir.join("grub.cfg");
    fs::write(&cfg_path, cfg).map_err(|e| HarnessError::io(&cfg_path, e))?;
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).map_err(|e| HarnessError::io(parent, e))?;
    }
    let mut c = Command::new("grub-mkrescue");
    c.arg("-o")
        .arg(out)
        .arg(format!("--install-modules={GRUB_MODULES}"))
        .args(["--fonts=", "--locales=", "--themes="])
        .arg(stage);
    let output = c.output().map_err(|e| HarnessError::Spawn {
        program: "grub-mkrescue".into(),
        source: e,
    })?;
    if !output.status.success() {
        return Err(HarnessError::Tool {
            program: "grub-mkrescue".into(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_become_module2_lines() {
        let cfg = grub_cfg_with_modules("run_ms=100", &["burn".into(), "vms.conf".into()]).unwrap();
        assert!(cfg.contains("    multiboot2 /boot/creditvisor run_ms=100\n    module2 /boot/modules/burn burn\n    module2 /boot/modules/vms.conf vms.conf\n    boot\n"), "{cfg}");
        assert!(grub_cfg_with_modules("", &["two words".into()]).is_err());
        assert!(grub_cfg_with_modules("", &["a;b".into()]).is_err());
    }

    #[test]
    fn cfg_boots_multiboot2_at_once_on_serial() {
        let cfg = grub_cfg("selftest=all exit=emu").expect("valid");
        assert!(
            cfg.contains("multiboot2 /boot/creditvisor selftest=all exit=emu\n"),
            "{cfg}"
        );
        assert!(cfg.contains("set timeout=0"));
        assert!(cfg.contains("terminal_output serial"));
    }

    #[test]
    fn cfg_rejects_grub_syntax_in_cmdline() {
        for bad in ["a\nb", "x;reboot", "$root", "\"q\""] {
            assert!(grub_cfg(bad).is_err(), "{bad:?}");
        }
    }
}
