//! `hostile`: misbehaves on purpose, one behaviour per VM, chosen with `mode=`:
//!
//! - `cli-spin`: disables interrupts and spins forever (must still be preempted on time).
//! - `wild-write` / `wild-read`: touches guest-physical memory that is neither RAM nor a device (the VM must stop).
//! - `ports`: reads and writes ports that no device owns (reads must give all ones; the VM keeps running).
//! - `hypercalls`: bogus hypercall numbers and arguments (each must fail with the documented error).
//! - `msr`: reads an MSR outside the allow list (the guest must get #GP, which its trap handler reports).
//! - `triple-fault`: removes its IDT and faults (the VM must stop; the others keep running).
//! - `fpu-check`: loads a pattern (varied by `seed=`) into the x87/SSE registers once, then checks it with FXSAVE
//!   in a loop: the hypervisor must keep each vCPU's x87/SSE state its own across preemption and other VMs' use of
//!   the same CPU (a change is reported and counted; `rounds=N mismatches=N` lines).
//! - `fxrstor-spin`: FXRSTOR in a tight loop. Not used by the suite: under QEMU multi-threaded TCG, FXRSTOR on any
//!   CPU rewrites CPU 0's `hflags2` without a lock (QEMU's `cpu_clear_ignne`), which can drop CPU 0's
//!   nested-paging or GIF flag during a VMRUN; this mode makes that race frequent (docs/console.md, "Triple-fault
//!   stop dump").
//! - `survivable` (default): `ports`, then `hypercalls`, then `cli-spin`.
//!
//! Every behaviour is announced on the console before it happens, so the log shows what was attempted.
#![no_std]
#![no_main]

use guest::{args, hypercall, println, BootInfo};

/// An address in the ABI's identity-mapped 4 GiB that no VM has RAM or a device at.
const UNBACKED: u64 = 0xc000_0000;

#[no_mangle]
pub fn guest_main(boot: &'static BootInfo) -> ! {
    let mode = args::get(boot.cmdline(), "mode").unwrap_or("survivable");
    println!("hostile: mode={mode}");
    match mode {
        "cli-spin" => cli_spin(),
        "wild-write" => {
            println!("hostile: writing guest-physical {UNBACKED:#x}");
            // SAFETY: deliberately wild: the address is mapped by the guest page tables (ABI) but backs nothing; the
            // hypervisor is expected to stop this VM.
            unsafe { core::ptr::write_volatile(UNBACKED as *mut u64, 0xdead_beef) };
            println!("hostile: wild write returned");
            guest::exit(0x3)
        }
        "wild-read" => {
            println!("hostile: reading guest-physical {UNBACKED:#x}");
            // SAFETY: as for `wild-write`.
            let value = unsafe { core::ptr::read_volatile(UNBACKED as *const u64) };
            println!("hostile: wild read returned {value:#x}");
            guest::exit(0x3)
        }
        "ports" => {
            let bad = ports();
            println!("hostile: ports done unexpected={bad}");
            guest::exit(u64::from(bad != 0))
        }
        "hypercalls" => {
            let bad = hypercalls(boot);
            println!("hostile: hypercalls done unexpected={bad}");
            guest::exit(u64::from(bad != 0))
        }
        "msr" => {
            println!("hostile: rdmsr 0x480 (IA32_VMX_BASIC)");
            let (lo, hi): (u32, u32);
            // SAFETY: deliberately reads an MSR the hypervisor must refuse with #GP (reported by the trap handler).
            unsafe {
                core::arch::asm!("rdmsr", in("ecx") 0x480_u32, out("eax") lo, out("edx") hi, options(nomem, nostack))
            };
            println!("hostile: rdmsr returned {hi:#x}:{lo:#x} (should have faulted)");
            guest::exit(0x4)
        }
        "triple-fault" => {
            println!("hostile: removing the IDT and executing ud2");
            guest::trap::remove();
            // SAFETY: deliberately faults with no IDT: #UD -> #DF -> triple fault, which must stop only this VM.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
            guest::exit(0x5)
        }
        "fpu-check" => fpu_check(args::u64_or(boot.cmdline(), "seed", 0)),
        "fxrstor-spin" => fxrstor_spin(),
        "survivable" => {
            let bad = ports() + hypercalls(boot);
            println!("hostile: survivable probes done unexpected={bad}");
            cli_spin()
        }
        other => {
            println!("hostile: unknown mode {other}");
            guest::exit(0xa49)
        }
    }
}

fn cli_spin() -> ! {
    println!("hostile: cli and spin forever");
    // SAFETY: disabling interrupts in the guest is the behaviour under test; the guest never re-enables them.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    loop {
        core::hint::spin_loop();
    }
}

/// A 16-byte-aligned FXSAVE image.
#[repr(C, align(16))]
struct FxImage([u8; 512]);

/// Bytes of XMM0..XMM7 in the FXSAVE image.
const XMM: core::ops::Range<usize> = 160..288;

/// The image `fpu-check` loads: x87 and SSE exceptions masked, XMM0..7 a pattern varied by `seed`.
fn fx_pattern(seed: u64) -> FxImage {
    let mut image = FxImage([0; 512]);
    image.0[0..2].copy_from_slice(&0x037f_u16.to_le_bytes()); // FCW; FSW stays 0
    image.0[24..28].copy_from_slice(&0x1f80_u32.to_le_bytes()); // MXCSR
    for (i, b) in image.0[XMM].iter_mut().enumerate() {
        *b = u8::try_from((u64::try_from(i).unwrap_or(0) + seed) % 251).unwrap_or(0) ^ 0xa5;
    }
    image
}

fn fxrstor(image: &FxImage) {
    // SAFETY: a valid, 16-byte-aligned FXSAVE image (reserved MXCSR bits clear); the guest ABI sets CR4.OSFXSR.
    unsafe {
        core::arch::asm!("fxrstor64 [{}]", in(reg) image.0.as_ptr(), options(nostack, readonly))
    };
}

fn fxsave(image: &mut FxImage) {
    // SAFETY: stores 512 bytes into a 16-byte-aligned buffer the caller owns.
    unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) image.0.as_mut_ptr(), options(nostack)) };
}

/// `fpu-check`: loads the pattern once, then checks it with FXSAVE over and over; a change is reported, counted
/// and repaired. A `rounds=` line after 2^14 checks times each power of two, so the log grows slowly.
fn fpu_check(seed: u64) -> ! {
    let image = fx_pattern(seed);
    let mut seen = FxImage([0; 512]);
    let (mut rounds, mut mismatches) = (0_u64, 0_u64);
    println!("hostile: fpu check seed={seed}");
    fxrstor(&image);
    loop {
        for _ in 0..(1 << 14) {
            fxsave(&mut seen);
            if seen.0[XMM] != image.0[XMM] {
                mismatches += 1;
                println!("hostile: fpu state changed under the guest (round {rounds}, {mismatches} so far)");
                fxrstor(&image);
            }
        }
        rounds += 1;
        if rounds.is_power_of_two() {
            println!("hostile: fpu rounds={rounds} mismatches={mismatches}");
        }
    }
}

/// `fxrstor-spin`: FXRSTOR in a tight loop (QEMU race amplifier, module doc).
fn fxrstor_spin() -> ! {
    let image = fx_pattern(0);
    println!("hostile: fxrstor loop");
    loop {
        fxrstor(&image);
    }
}

/// Unowned ports: reads must give all ones, writes must be dropped. Returns the number of surprises.
fn ports() -> u64 {
    let mut unexpected = 0;
    for port in [0x60_u16, 0x64, 0x70, 0x71, 0xcf8, 0xcfc, 0x1f0, 0x92] {
        let value: u8;
        // SAFETY: port I/O in the guest; the hypervisor owns the effect.
        unsafe {
            core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
        };
        // SAFETY: as above. Port 0x92 and 0x64 writes would reset a real PC; here they must be dropped.
        unsafe {
            core::arch::asm!("out dx, al", in("dx") port, in("al") 0xfe_u8, options(nomem, nostack))
        };
        if value != 0xff {
            unexpected += 1;
        }
        println!("hostile: port {port:#x} read {value:#x} then wrote 0xfe");
    }
    unexpected
}

/// Bogus hypercalls; each must fail with its documented status. Returns the number of surprises.
fn hypercalls(boot: &BootInfo) -> u64 {
    let beyond_ram = boot.mem_bytes + 0x1000;
    let cases: [(&str, u64, u64, u64, i64); 6] = [
        ("unknown call 999", 999, 0, 0, -1),
        ("unknown call u64::MAX", u64::MAX, 0, 0, -1),
        ("log from beyond RAM", 1, beyond_ram, 16, -3),
        ("log with length 4096", 1, 0x20_0000, 4096, -2),
        ("log wrapping the address space", 1, u64::MAX - 4, 16, -3),
        ("report reserved key 0", 2, 0, 1, -2),
    ];
    let mut unexpected = 0;
    for (what, nr, a0, a1, want) in cases {
        let (status, _) = hypercall::raw(nr, a0, a1, 0);
        if status != want {
            unexpected += 1;
        }
        println!("hostile: {what}: status {status} (expected {want})");
    }
    unexpected
}
