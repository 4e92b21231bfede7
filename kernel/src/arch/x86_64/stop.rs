//! Clean stop: the one way the kernel ends, on success or failure.
//!
//! With `exit=emu` the emulator is told to exit (QEMU isa-debug-exit at port 0xf4: 0x10 pass, 0x11 fail; then the
//! Bochs "Shutdown" string at port 0x8900); on real hardware both writes go to unused ports. Then every other CPU
//! is stopped with an NMI (their NMI handler sees [`stopping`] and halts) and this CPU halts with interrupts off.
//! A stop never returns and never resets the machine, so the last console lines stay readable.

use core::sync::atomic::{AtomicBool, Ordering};

use x86_64::instructions::port::Port;

use super::{cpu, lapic};
use crate::cmdline::ExitMode;

/// QEMU isa-debug-exit port (docs/console.md).
const QEMU_EXIT_PORT: u16 = 0xF4;
/// Bochs shutdown port.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Outcome reported to the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Boot and self-tests passed.
    Pass,
    /// Something failed.
    Fail,
}

static STOPPING: AtomicBool = AtomicBool::new(false);

/// True once some CPU has begun stopping the machine.
pub fn stopping() -> bool {
    STOPPING.load(Ordering::Acquire)
}

/// Stops the machine with `status`.
pub fn stop(status: Status) -> ! {
    STOPPING.store(true, Ordering::Release);
    x86_64::instructions::interrupts::disable();
    if crate::config().exit == ExitMode::Emu {
        // Bochs drops characters still in the UART when it shuts down; the verdict line must arrive whole.
        crate::console::flush();
        let code: u32 = match status {
            Status::Pass => 0x10,
            Status::Fail => 0x11,
        };
        // SAFETY: port 0xf4 is QEMU's isa-debug-exit when configured and unused otherwise; port 0x8900 is
        // Bochs' shutdown port and unused elsewhere. Neither write touches memory.
        unsafe {
            Port::<u32>::new(QEMU_EXIT_PORT).write(code);
            let mut bochs = Port::<u8>::new(BOCHS_SHUTDOWN_PORT);
            for b in b"Shutdown" {
                bochs.write(*b);
            }
        }
    }
    if lapic::is_initialised() {
        lapic::send_nmi_all_but_self();
    }
    cpu::halt_forever()
}
