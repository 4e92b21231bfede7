//! COM1 console: leveled log lines and the `CV:` machine-readable markers of docs/console.md.
//!
//! Design: one UART behind a spin lock; every line (log record or marker) is written while holding the lock with
//! interrupts off on this CPU, so lines from different CPUs never interleave and an interrupt handler can never
//! deadlock against its own CPU. Interrupt handlers do not log. The fatal paths (panic, exception) use
//! [`write_line_fatal`], which waits a bounded time for the lock and then takes it anyway: a CPU that died while
//! printing must not silence the report of its own death.
//!
//! Line format: `[   12.345678] INFO  cpu0 module: message` (seconds since boot once the TSC is calibrated, 0
//! before); markers are `CV:WORD key=value ...` whole lines. Values that may hold spaces go through [`Quoted`].

use core::fmt::{self, Write};

use drivers::uart16550::{PortIo, Uart16550};
use spin::Mutex;
use x86_64::instructions::port::Port;

use crate::arch::x86_64::{percpu, tsc};

/// I/O base of COM1.
const COM1_BASE: u16 = 0x3F8;
/// Console speed (docs/console.md: 115200 8N1).
const BAUD: u32 = 115_200;
/// Lock attempts on the fatal path before the lock is taken by force.
const FATAL_LOCK_ATTEMPTS: u32 = 10_000_000;

/// Port I/O on COM1's register file.
#[derive(Debug)]
pub struct Com1Ports;

impl PortIo for Com1Ports {
    fn read(&mut self, offset: u16) -> u8 {
        // SAFETY: reading a 16550 register at COM1 has no memory side effects.
        unsafe { Port::<u8>::new(COM1_BASE + offset).read() }
    }

    fn write(&mut self, offset: u16, value: u8) {
        // SAFETY: COM1's register file belongs to this console; writing it has no memory side effects.
        unsafe { Port::<u8>::new(COM1_BASE + offset).write(value) }
    }
}

static UART: Mutex<Uart16550<Com1Ports>> = Mutex::new(Uart16550::new(Com1Ports));

/// Programs COM1 (115200 8N1). Safe to call more than once.
pub fn init() {
    // BAUD divides BASE_BAUD, so init cannot fail; if a later edit breaks that, log lines still go out at the
    // firmware's setting rather than stopping the boot.
    let _ = UART.lock().init(BAUD);
}

/// Writes one whole line (a newline is appended).
pub fn write_line(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let mut uart = UART.lock();
        // Uart16550::write_str never fails.
        let _ = uart.write_fmt(args);
        uart.send_str("\n");
    });
}

/// Writes one line on a fatal path: bounded wait for the lock, then takes it regardless.
pub fn write_line_fatal(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::disable();
    for _ in 0..FATAL_LOCK_ATTEMPTS {
        if let Some(mut uart) = UART.try_lock() {
            let _ = uart.write_fmt(args);
            uart.send_str("\n");
            return;
        }
        core::hint::spin_loop();
    }
    // SAFETY: the holder has not released the lock in ~10^7 attempts: it is stuck (or is this CPU, interrupted
    // while printing). We are stopping the machine; a torn line is better than no report.
    unsafe { UART.force_unlock() };
    let mut uart = UART.lock();
    let _ = uart.write_fmt(args);
    uart.send_str("\n");
}

/// Prints a `CV:` marker line: `marker!("BOOT loader={} ...", ...)`.
#[macro_export]
macro_rules! marker {
    ($($arg:tt)*) => {
        $crate::console::write_line(format_args!("CV:{}", format_args!($($arg)*)))
    };
}

/// Displays a value as a double-quoted marker value: `"` becomes `'`, control characters become spaces.
pub struct Quoted<T>(pub T);

/// Adaptor that escapes everything written through it.
struct Escaper<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl Write for Escaper<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let c = match c {
                '"' => '\'',
                c if c.is_control() => ' ',
                c => c,
            };
            self.0.write_char(c)?;
        }
        Ok(())
    }
}

impl<T: fmt::Display> fmt::Display for Quoted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        write!(Escaper(f), "{}", self.0)?;
        f.write_char('"')
    }
}

/// The `log` backend: filters by level, prefixes time, level, CPU and module.
struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let micros = tsc::uptime_us();
        let module = match record.target().rsplit("::").next() {
            Some("creditvisor") | None => "kernel",
            Some(m) => m,
        };
        write_line(format_args!(
            "[{:5}.{:06}] {:<5} cpu{} {}: {}",
            micros / 1_000_000,
            micros % 1_000_000,
            record.level(),
            percpu::current_id(),
            module,
            record.args()
        ));
    }

    fn flush(&self) {}
}

/// Installs the logger at `level`; later calls only change the level.
pub fn init_logger(level: log::LevelFilter) {
    // set_logger fails only if a logger is already installed, which is ours.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
