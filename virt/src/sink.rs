//! Where guest output and the hypervisor's notes about guest behaviour go.
//!
//! Design: the layer never logs by itself; the kernel implements [`ConsoleSink`] over its serial log. Guest text
//! arrives here already cut into lines of at most [`MAX_LINE`] bytes and sanitised (printable ASCII, everything
//! else escaped as `\xNN`), so a guest can neither forge a hypervisor log line (the kernel prefixes the VM name)
//! nor flood one line without bound. Events are rate-limited per VM and kind by the caller ([`crate::stats`]).

/// Longest guest line passed to the sink, in bytes after escaping; longer output is cut into several lines.
pub const MAX_LINE: usize = 200;

/// Something a guest did that the hypervisor reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `RDMSR`/`WRMSR` of an MSR outside the allow list; the guest got #GP.
    MsrRefused { index: u32, write: bool, rip: u64 },
    /// An access to a port no device owns (read as all ones, or write dropped).
    UnownedPort { port: u16, write: bool, rip: u64 },
    /// A hypercall that failed with an error status.
    BadHypercall { nr: u64, status: i64, rip: u64 },
    /// `REPORT`: the VM's latest value of a counter.
    Counter { key: u16, value: u64 },
}

/// The kernel's side of guest output.
pub trait ConsoleSink {
    /// One complete guest line (COM1 or `LOG`), to be logged as `<vm>: <line>`.
    fn guest_line(&mut self, vm: &str, line: &str);

    /// A reportable guest action (see [`Event`]).
    fn event(&mut self, vm: &str, event: Event);
}

/// A fixed-capacity line of sanitised guest text.
#[derive(Clone, Debug)]
pub struct Line {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_LINE],
            len: 0,
        }
    }

    /// The text so far (always printable ASCII).
    pub fn as_str(&self) -> &str {
        // Only bytes 0x20..=0x7e are ever stored, so this never fails.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    /// True if nothing has been pushed since the last clear.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the text.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends one guest byte, escaping it if it is not printable ASCII. Returns false (and appends nothing) when
    /// the escaped form does not fit: the caller flushes the line and pushes again.
    pub fn push(&mut self, byte: u8) -> bool {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        if (0x20..=0x7e).contains(&byte) && byte != b'\\' {
            if self.len == MAX_LINE {
                return false;
            }
            self.buf[self.len] = byte;
            self.len += 1;
        } else {
            if self.len + 4 > MAX_LINE {
                return false;
            }
            let escaped = [
                b'\\',
                b'x',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ];
            self.buf[self.len..self.len + 4].copy_from_slice(&escaped);
            self.len += 4;
        }
        true
    }
}

/// Sends `text` (guest bytes, no line structure) to the sink as one or more sanitised lines; a `\n` in the text
/// starts a new line and `\r` is dropped. Used for `LOG`, whose message is one line by definition.
pub fn send_text(sink: &mut dyn ConsoleSink, vm: &str, text: &[u8]) {
    let mut line = Line::new();
    for &byte in text {
        match byte {
            b'\n' => {
                sink.guest_line(vm, line.as_str());
                line.clear();
            }
            b'\r' => {}
            _ => {
                if !line.push(byte) {
                    sink.guest_line(vm, line.as_str());
                    line.clear();
                    let _ = line.push(byte);
                }
            }
        }
    }
    if !line.is_empty() {
        sink.guest_line(vm, line.as_str());
    }
}
