//! The VM's COM1: a polled 16550 transmitter, and a fixed-size line buffer for formatting without a heap.

use core::fmt;

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to the VM's own virtual UART; it has no memory effects.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as `outb`.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
}

/// Writes one byte, waiting (boundedly) for the transmitter to be empty.
pub fn write_byte(byte: u8) {
    for _ in 0..1000 {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    outb(COM1, byte);
}

/// Writes a string to COM1.
pub fn write_str(s: &str) {
    s.bytes().for_each(write_byte);
}

/// A 256-byte line for `write!` without a heap; text past the end is dropped.
pub struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl LineBuf {
    pub const fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are copied in, truncated at a char boundary, so this is valid UTF-8.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

/// `println!` to COM1, one line at a time.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut line = $crate::console::LineBuf::new();
        let _ = write!(line, $($arg)*);
        $crate::console::write_str(line.as_str());
        $crate::console::write_byte(b'\n');
    }};
}
