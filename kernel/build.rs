//! Build script for the kernel: links with `linker.ld` at a fixed physical address (not PIE: the 32-bit boot stub
//! and the AP trampoline use absolute addresses), and generates the 256 interrupt entry stubs, each 16 bytes apart
//! so the IDT can be filled from one base address.

use std::fmt::Write as _;
use std::path::PathBuf;

/// Vectors for which the CPU pushes an error code (Intel SDM Vol. 3A, Table 6-1).
const ERROR_CODE_VECTORS: [u32; 9] = [8, 10, 11, 12, 13, 14, 17, 21, 29];

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let script = manifest.join("linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!(
        "cargo:rustc-link-arg-bin=creditvisor=-T{}",
        script.display()
    );
    println!("cargo:rustc-link-arg-bin=creditvisor=--no-pie");
    println!("cargo:rustc-link-arg-bin=creditvisor=-zmax-page-size=0x1000");

    let mut asm = String::new();
    asm.push_str(".section .text.isr_stubs, \"ax\"\n.code64\n.balign 16\n.global isr_stub_table\nisr_stub_table:\n");
    for vector in 0u32..256 {
        asm.push_str(".balign 16\n");
        if !ERROR_CODE_VECTORS.contains(&vector) {
            asm.push_str("    push 0\n");
        }
        // `push imm32` keeps every stub within 16 bytes (2 + 5 + 5).
        writeln!(asm, "    push {vector}\n    jmp isr_common")
            .expect("writing to a String cannot fail");
    }
    std::fs::write(out.join("isr_stubs.s"), asm).expect("OUT_DIR is writable");
}
