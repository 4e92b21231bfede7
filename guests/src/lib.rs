//! Runtime shared by the Creditvisor test guests: entry, hypercalls, console, time and exception reporting.
//!
//! The guests are entered in 64-bit long mode with the state described in `docs/guest-abi.md`; `_start` records
//! the boot information and calls the guest's `guest_main`. It does not zero `.bss`: the ABI guarantees that
//! memory the image does not cover is zero, and every vCPU enters at `_start`, so a later vCPU clearing `.bss`
//! would wipe what the first one had set up (it did: the SVM hypercall flag, so the first vCPU's next hypercall
//! was a VMCALL, #UD, triple fault). Everything a guest reports reaches the
//! hypervisor either as console text (the VM's COM1) or as counters (`REPORT` hypercall), so the end-to-end tests
//! can compare what the guest measured with what the hypervisor accounted.
//!
//! Invariants: the runtime never touches memory outside its own image, its stack and the boot information page,
//! so a guest's behaviour is exactly what its `guest_main` asks for (the `hostile` guest relies on that).
//!
//! The library also builds for the host under `cargo test -p guests --lib`, without the entry point and the panic
//! handler, so that the virtio driver ([`virtio`], [`virtio_blk`]) is tested against the hypervisor's own device
//! model (`virtio_tests`).
#![cfg_attr(not(test), no_std)]
// Host tests build the library without its entry point, which is what uses the trap and hypercall set-up.
#![cfg_attr(test, allow(dead_code))]

pub mod args;
pub mod console;
pub mod hypercall;
pub mod meter;
pub mod trap;
pub mod virtio;
pub mod virtio_blk;
pub mod virtio_pattern;
#[cfg(test)]
mod virtio_tests;
pub mod virtio_workload;

use core::sync::atomic::{AtomicU64, Ordering};

pub use hypercall::{exit, log, report, sleep_until, yield_now, Counter, HypercallError};

/// `BootInfo::magic`: `b"CGUEST01"` read as a little-endian u64.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"CGUEST01");

/// Most entries in the `BootInfo` device table (ABI version 2).
pub const MAX_DEVICES: usize = 8;

/// One entry of the `BootInfo` device table (ABI version 2): a virtio-mmio register window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct MmioDeviceInfo {
    /// Guest-physical base of the window (4 KiB aligned, above RAM, below 4 GiB: on the identity map).
    pub base: u64,
    /// Bytes of the window.
    pub size: u32,
    /// Virtio device ID (2 = block).
    pub device_id: u32,
}

/// The boot information the hypervisor writes at guest-physical `0x8000` (docs/guest-abi.md). The device table
/// fields exist from ABI version 2; under version 1 they read as zero (an empty table).
#[repr(C)]
pub struct BootInfo {
    pub magic: u64,
    pub abi_version: u32,
    pub vcpu_id: u32,
    pub vcpu_count: u32,
    pub reserved: u32,
    pub mem_bytes: u64,
    pub tsc_hz: u64,
    pub name: [u8; 32],
    pub cmdline: [u8; 256],
    pub device_count: u32,
    pub reserved2: u32,
    pub devices: [MmioDeviceInfo; MAX_DEVICES],
}

// The layout is the ABI: fail the build rather than boot a guest that reads the wrong bytes.
const _: () = assert!(core::mem::offset_of!(BootInfo, device_count) == 328);
const _: () = assert!(core::mem::offset_of!(BootInfo, devices) == 336);
const _: () = assert!(core::mem::size_of::<BootInfo>() == 464);

impl BootInfo {
    /// The VM's arguments (`args` in its configuration), up to the first NUL.
    pub fn cmdline(&self) -> &str {
        nul_terminated(&self.cmdline)
    }

    /// The VM's name, up to the first NUL.
    pub fn name(&self) -> &str {
        nul_terminated(&self.name)
    }

    /// The announced MMIO devices: empty under ABI version 1, and never more than [`MAX_DEVICES`] (a larger count
    /// is clamped).
    pub fn devices(&self) -> &[MmioDeviceInfo] {
        if self.abi_version < 2 {
            return &[];
        }
        let count = usize::try_from(self.device_count).map_or(MAX_DEVICES, |n| n.min(MAX_DEVICES));
        &self.devices[..count]
    }
}

fn nul_terminated(bytes: &[u8]) -> &str {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..len]).unwrap_or("")
}

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Guest TSC frequency from the boot information.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Reads the guest TSC.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; the ABI leaves CR4.TSD clear so it is allowed in the guest.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Converts TSC ticks to nanoseconds at the boot-information frequency (saturating; 0 Hz reads as 1 GHz).
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let hz = match tsc_hz() {
        0 => 1_000_000_000,
        hz => hz,
    };
    u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(hz)).unwrap_or(u64::MAX)
}

/// Converts nanoseconds to TSC ticks at the boot-information frequency (saturating).
pub fn ns_to_ticks(ns: u64) -> u64 {
    let hz = match tsc_hz() {
        0 => 1_000_000_000,
        hz => hz,
    };
    u64::try_from(u128::from(ns) * u128::from(hz) / 1_000_000_000).unwrap_or(u64::MAX)
}

#[cfg(not(test))]
extern "Rust" {
    /// Provided by each guest binary with `#[no_mangle]`.
    fn guest_main(boot: &'static BootInfo) -> !;
}

/// Rust entry, called by `_start` with RDI = address of the boot information.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn guest_rust_entry(boot: *const BootInfo) -> ! {
    // SAFETY: the ABI places a `BootInfo` at the address passed in RDI and never changes it while the guest runs;
    // the pointer is checked for null and the magic checked before any other field is trusted.
    let boot: &'static BootInfo = match unsafe { boot.as_ref() } {
        Some(boot) if boot.magic == BOOT_MAGIC => boot,
        _ => {
            console::write_str("guest: no boot information (bad magic), exiting\n");
            exit(0xbad)
        }
    };
    TSC_HZ.store(boot.tsc_hz, Ordering::Relaxed);
    hypercall::init();
    trap::install();
    // SAFETY: every guest binary defines `guest_main` with this signature (the link fails otherwise).
    unsafe { guest_main(boot) }
}

#[cfg(not(test))]
core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    cld
    and rsp, -16
    call guest_rust_entry
    ud2
"#
);

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let mut line = console::LineBuf::new();
    let _ = write!(line, "guest panic: {info}");
    log(line.as_str());
    exit(0xdead)
}
