//! COM1 console: leveled log lines and the `CV:` machine-readable markers of docs/console.md.
//!
//! Design: one UART behind a spin lock; every line (log record or marker) is written while holding the lock with
//! interrupts off on this CPU, so lines from different CPUs never interleave and an interrupt handler can never
//! deadlock against its own CPU. Interrupt handlers do not log. The fatal paths (panic, exception) use
//! [`write_line_fatal`], which waits a bounded time for the lock and then takes it anyway: a CPU that died while
//! printing must not silence the report of its own death.
//!
//! Deferred output ([`write_line_deferred`], [`pump`]): hot paths that must not wait for the UART (the VM run
//! loop: a 200-character line takes 17 ms at 115200 baud on real hardware and in Bochs) queue whole lines in a
//! bounded ring; [`pump`] moves queued bytes to the UART only while its transmitter is empty (one FIFO load at a
//! time, never waiting), and every blocking writer first drains what was queued when it started, so lines keep
//! their order. A full ring drops whole lines and says how many.
//!
//! Locking: UART, then the ring (`QUEUE`). Only a holder of the UART lock takes bytes out of the ring, so bytes
//! leave in order; anyone may append a line. Invariant: `QUEUE` is never held while waiting for the UART or while
//! writing to it: bytes are taken out under `QUEUE` at most one FIFO load ([`CHUNK`]) at a time, and sent after
//! it is released. So a run loop appending a line ([`write_line_deferred`]) waits at most for one copy of a line
//! or of a chunk, never for another CPU's blocking writer to push the ring through a 115200-baud UART (which held
//! `QUEUE` for the whole drain before: up to 32 KiB, about 2.8 s on real hardware).
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

/// Writes one whole line (a newline is appended), after everything queued by [`write_line_deferred`].
pub fn write_line(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let mut uart = UART.lock();
        drain_queue(&mut uart);
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

/// Sends everything queued and waits (bounded) until the UART has transmitted the last bit, so a following
/// emulator exit or reset does not cut the final line. For the stop path: takes the lock regardless after a bounded
/// wait, like [`write_line_fatal`].
pub fn flush() {
    for _ in 0..FATAL_LOCK_ATTEMPTS {
        if let Some(mut uart) = UART.try_lock() {
            drain_queue(&mut uart);
            uart.flush();
            return;
        }
        core::hint::spin_loop();
    }
}

/// Prints a `CV:` marker line: `marker!("BOOT loader={} ...", ...)`.
#[macro_export]
macro_rules! marker {
    ($($arg:tt)*) => {
        $crate::console::write_line(format_args!("CV:{}", format_args!($($arg)*)))
    };
}

/// Bytes of the deferred-output ring.
const QUEUE_BYTES: usize = 32 * 1024;
/// Transmit FIFO depth of a 16550: bytes that may be written each time LSR.THRE reads 1.
const TX_FIFO: usize = 16;

/// The deferred-output ring: whole lines (with `\r\n`) waiting for the UART.
struct Queue {
    buf: [u8; QUEUE_BYTES],
    head: usize,
    len: usize,
    dropped_lines: u64,
}

impl Queue {
    /// Appends `bytes` (the caller checked that they fit).
    fn push(&mut self, bytes: &[u8]) {
        let tail = (self.head + self.len) % QUEUE_BYTES;
        let first = bytes.len().min(QUEUE_BYTES - tail);
        self.buf[tail..tail + first].copy_from_slice(&bytes[..first]);
        self.buf[..bytes.len() - first].copy_from_slice(&bytes[first..]);
        self.len += bytes.len();
    }

    /// Moves up to `out.len()` bytes from the front into `out`; returns how many.
    fn pop_into(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len);
        let first = n.min(QUEUE_BYTES - self.head);
        out[..first].copy_from_slice(&self.buf[self.head..self.head + first]);
        out[first..n].copy_from_slice(&self.buf[..n - first]);
        self.head = (self.head + n) % QUEUE_BYTES;
        self.len -= n;
        n
    }
}

/// Bytes taken out of the ring per hold of `QUEUE`: one transmit FIFO load.
const CHUNK: usize = TX_FIFO;

/// Takes up to `max` (at most [`CHUNK`]) bytes from the front of the ring, holding `QUEUE` only for the copy.
/// Caller holds the UART lock (the only consumer). Returns the chunk and whether bytes remain queued after it.
fn take_chunk(max: usize) -> ([u8; CHUNK], usize, bool) {
    let mut chunk = [0u8; CHUNK];
    let mut q = QUEUE.lock();
    let n = q.pop_into(&mut chunk[..max.min(CHUNK)]);
    (chunk, n, q.len > 0)
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    buf: [0; QUEUE_BYTES],
    head: 0,
    len: 0,
    dropped_lines: 0,
});

/// One formatted line for the ring (longer text is cut).
struct LineText(heapless::String<512>);

impl Write for LineText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.0.push(c).is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// Queues one whole line for [`pump`] (or the next blocking writer); never waits for the UART.
pub fn write_line_deferred(args: fmt::Arguments<'_>) {
    let mut line = LineText(heapless::String::new());
    let _ = line.write_fmt(args);
    x86_64::instructions::interrupts::without_interrupts(|| {
        let mut q = QUEUE.lock();
        let bytes = line.0.as_bytes();
        if q.dropped_lines > 0 && q.len + 64 + bytes.len() + 2 <= QUEUE_BYTES {
            let mut note = LineText(heapless::String::new());
            let _ = write!(note, "[console: {} lines dropped]\r\n", q.dropped_lines);
            q.push(note.0.as_bytes());
            q.dropped_lines = 0;
        }
        if q.len + bytes.len() + 2 > QUEUE_BYTES {
            q.dropped_lines += 1;
            return;
        }
        q.push(bytes);
        q.push(b"\r\n");
    });
}

/// Moves queued bytes to the UART while its transmitter is empty, at most `max` bytes, without waiting.
/// Returns true if bytes remain queued.
///
/// `QUEUE` is held only while a chunk is copied out (module doc), not while the UART is written.
pub fn pump(max: usize) -> bool {
    x86_64::instructions::interrupts::without_interrupts(|| {
        let Some(_uart) = UART.try_lock() else {
            return true;
        };
        let mut ports = Com1Ports;
        let mut budget = max;
        let mut remaining = QUEUE.lock().len > 0;
        // One FIFO load per empty transmitter: THRE set means the 16-byte FIFO accepts a whole load.
        while remaining && budget > 0 && ports.read(LSR) & LSR_THRE != 0 {
            let (chunk, n, more) = take_chunk(budget);
            for &b in &chunk[..n] {
                ports.write(0, b);
            }
            budget -= n;
            remaining = more;
        }
        remaining
    })
}

/// Writes what was queued when it was called, waiting for the UART as needed (caller holds the UART lock). Lines
/// appended meanwhile stay queued for the next writer or [`pump`]: a writer never drains a ring that other CPUs
/// keep filling, and `QUEUE` is free while it waits (module doc).
fn drain_queue(uart: &mut Uart16550<Com1Ports>) {
    let mut left = QUEUE.lock().len;
    while left > 0 {
        let (chunk, n, _) = take_chunk(left);
        if n == 0 {
            break;
        }
        for &b in &chunk[..n] {
            uart.send(b);
        }
        left -= n;
    }
}

/// Offset of the line status register, and its "transmitter holding register empty" bit.
const LSR: u16 = 5;
const LSR_THRE: u8 = 1 << 5;

/// A log-format line (`[time] LEVEL cpuN module: message`) through the deferred path.
pub fn log_deferred(level: log::Level, module: &str, args: fmt::Arguments<'_>) {
    if level > log::max_level() {
        return;
    }
    log_deferred_at(level, tsc::uptime_us(), percpu::current_id(), module, args);
}

/// [`log_deferred`] for something that happened earlier, at `micros` since boot on CPU `cpu` (events recorded
/// on a hot path and formatted later, `crate::vm::sink`).
pub fn log_deferred_at(
    level: log::Level,
    micros: u64,
    cpu: u32,
    module: &str,
    args: fmt::Arguments<'_>,
) {
    if level > log::max_level() {
        return;
    }
    write_line_deferred(format_args!(
        "[{:5}.{:06}] {:<5} cpu{} {}: {}",
        micros / 1_000_000,
        micros % 1_000_000,
        level,
        cpu,
        module,
        args
    ));
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
