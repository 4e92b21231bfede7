//! A VM's virtual 16550 UART on COM1 (ports `0x3F8`-`0x3FF`), transmit only.
//!
//! Design: registers per the PC16550D data sheet (THR/RBR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR; DLL/DLM when
//! LCR.DLAB is set). Transmitted bytes are collected into a line ([`crate::sink::Line`]); each `\n` sends the
//! line to the sink, and a line that reaches [`crate::sink::MAX_LINE`] is sent as it is and continued on the
//! next, so a guest that never sends a newline cannot hold unbounded memory. `\r` is dropped.
//!
//! Invariants: LSR always reports the transmitter empty (THRE and TEMT), input is always empty (LSR.DR clear,
//! RBR reads 0), no interrupt is ever pending (IIR reads 0x01). A guest cannot make the device fail.

use crate::sink::{ConsoleSink, Line};

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORTS: u16 = 8;

const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
const LCR_DLAB: u8 = 1 << 7;
/// MSR: CTS, DSR and DCD asserted (a connected terminal).
const MSR_CONNECTED: u8 = 0xb0;

/// The register file and the current output line.
#[derive(Clone, Debug, Default)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    line: Line,
    /// Bytes transmitted in total.
    pub tx_bytes: u64,
}

impl Uart16550 {
    /// A reset UART.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if `port` is one of the UART's registers.
    pub fn claims(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// A guest `IN` of one byte at register `offset` (0..8).
    pub fn read(&self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll,
            0 => 0, // RBR: no input
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => 0x01, // IIR: no interrupt pending, FIFOs reported off
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_THRE | LSR_TEMT,
            6 => MSR_CONNECTED,
            _ => self.scr,
        }
    }

    /// A guest `OUT` of one byte at register `offset` (0..8); transmitted text goes to `sink` line by line.
    pub fn write(&mut self, offset: u16, value: u8, vm: &str, sink: &mut dyn ConsoleSink) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            0 if dlab => self.dll = value,
            0 => self.transmit(value, vm, sink),
            1 if dlab => self.dlm = value,
            1 => self.ier = value & 0x0f,
            2 => {} // FCR: FIFOs are not modelled
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1f,
            5 | 6 => {} // LSR and MSR are read-only
            _ => self.scr = value,
        }
    }

    /// Sends a pending partial line (at VM stop, so its last words are not lost).
    pub fn flush(&mut self, vm: &str, sink: &mut dyn ConsoleSink) {
        if !self.line.is_empty() {
            sink.guest_line(vm, self.line.as_str());
            self.line.clear();
        }
    }

    fn transmit(&mut self, byte: u8, vm: &str, sink: &mut dyn ConsoleSink) {
        self.tx_bytes += 1;
        match byte {
            b'\n' => {
                sink.guest_line(vm, self.line.as_str());
                self.line.clear();
            }
            b'\r' => {}
            _ => {
                if !self.line.push(byte) {
                    sink.guest_line(vm, self.line.as_str());
                    self.line.clear();
                    let _ = self.line.push(byte);
                }
            }
        }
    }
}
