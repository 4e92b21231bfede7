//! `hostile`: misbehaves on purpose, one behaviour per VM, chosen with `mode=`:
//!
//! - `cli-spin`: disables interrupts and spins forever (must still be preempted on time).
//! - `wild-write` / `wild-read`: touches guest-physical memory that is neither RAM nor a device (the VM must stop).
//! - `ports`: reads and writes ports that no device owns (reads must give all ones; the VM keeps running).
//! - `hypercalls`: bogus hypercall numbers and arguments (each must fail with the documented error).
//! - `msr`: reads an MSR outside the allow list (the guest must get #GP, which its trap handler reports).
//! - `triple-fault`: removes its IDT and faults (the VM must stop; the others keep running).
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
