//! 16550 UART driver (polled transmit and receive).
//!
//! Design: the register file is reached through the [`PortIo`] trait (offset from the UART base), so the kernel
//! supplies real `in`/`out` port access and host tests supply a fake device. The driver never blocks forever:
//! waiting for the transmitter is bounded by [`TX_SPIN_LIMIT`] polls, after which the byte is dropped (a missing or
//! wedged UART must not hang the hypervisor, which logs through it even on its fatal paths).
//!
//! Invariants: after [`Uart16550::init`] the line is 8N1 at the requested baud rate with FIFOs enabled and UART
//! interrupts disabled; `\n` is sent as `\r\n`.

/// Register offsets from the UART base (PC16550D data sheet, table "Register Summary").
pub mod reg {
    /// Receiver buffer (read) / transmitter holding (write); divisor latch low when DLAB=1.
    pub const DATA: u16 = 0;
    /// Interrupt enable; divisor latch high when DLAB=1.
    pub const IER: u16 = 1;
    /// FIFO control (write).
    pub const FCR: u16 = 2;
    /// Line control.
    pub const LCR: u16 = 3;
    /// Modem control.
    pub const MCR: u16 = 4;
    /// Line status.
    pub const LSR: u16 = 5;
    /// Scratch register.
    pub const SCR: u16 = 7;
}

/// Line status bit: received data ready.
pub const LSR_DATA_READY: u8 = 1 << 0;
/// Line status bit: transmitter holding register empty.
pub const LSR_THR_EMPTY: u8 = 1 << 5;
/// Line status bit: transmitter empty (holding register and shift register both drained).
pub const LSR_TX_EMPTY: u8 = 1 << 6;
/// Line control: divisor latch access bit.
const LCR_DLAB: u8 = 1 << 7;
/// Line control: 8 data bits, no parity, one stop bit.
const LCR_8N1: u8 = 0b0000_0011;
/// FIFO control: enable, clear both FIFOs, 14-byte receive trigger.
const FCR_ENABLE_CLEAR: u8 = 0xC7;
/// Modem control: DTR, RTS and OUT2.
const MCR_DTR_RTS_OUT2: u8 = 0x0B;
/// Input clock of the divisor: 1.8432 MHz / 16.
pub const BASE_BAUD: u32 = 115_200;
/// Upper bound on line-status polls per transmitted byte.
pub const TX_SPIN_LIMIT: u32 = 1_000_000;

/// Byte-wide access to the UART's registers at `base + offset`.
pub trait PortIo {
    /// Reads the register at `offset`.
    fn read(&mut self, offset: u16) -> u8;
    /// Writes `value` to the register at `offset`.
    fn write(&mut self, offset: u16, value: u8);
}

/// Errors from configuring the UART.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartError {
    /// The baud rate is zero, above [`BASE_BAUD`], or not an integer divisor of it.
    UnsupportedBaud(u32),
}

/// A polled 16550-compatible UART.
#[derive(Debug)]
pub struct Uart16550<P: PortIo> {
    io: P,
    /// Bytes dropped because the transmitter never became ready.
    dropped: u64,
}

impl<P: PortIo> Uart16550<P> {
    /// Wraps a register file; call [`Self::init`] before use.
    pub const fn new(io: P) -> Self {
        Self { io, dropped: 0 }
    }

    /// Programs 8N1 at `baud`, enables and clears the FIFOs and disables UART interrupts.
    pub fn init(&mut self, baud: u32) -> Result<(), UartError> {
        if baud == 0 || baud > BASE_BAUD || !BASE_BAUD.is_multiple_of(baud) {
            return Err(UartError::UnsupportedBaud(baud));
        }
        let divisor =
            u16::try_from(BASE_BAUD / baud).map_err(|_| UartError::UnsupportedBaud(baud))?;
        let [lo, hi] = divisor.to_le_bytes();
        self.io.write(reg::IER, 0);
        self.io.write(reg::LCR, LCR_DLAB);
        self.io.write(reg::DATA, lo);
        self.io.write(reg::IER, hi);
        self.io.write(reg::LCR, LCR_8N1);
        self.io.write(reg::FCR, FCR_ENABLE_CLEAR);
        self.io.write(reg::MCR, MCR_DTR_RTS_OUT2);
        Ok(())
    }

    /// Whether a UART answers at all: the scratch register keeps what was written to it.
    pub fn is_present(&mut self) -> bool {
        self.io.write(reg::SCR, 0x5A);
        let first = self.io.read(reg::SCR) == 0x5A;
        self.io.write(reg::SCR, 0xA5);
        first && self.io.read(reg::SCR) == 0xA5
    }

    /// Sends one byte, waiting (bounded) for the transmitter; returns false if the byte was dropped.
    pub fn send(&mut self, byte: u8) -> bool {
        for _ in 0..TX_SPIN_LIMIT {
            if self.io.read(reg::LSR) & LSR_THR_EMPTY != 0 {
                self.io.write(reg::DATA, byte);
                return true;
            }
            core::hint::spin_loop();
        }
        self.dropped = self.dropped.saturating_add(1);
        false
    }

    /// Waits (bounded by [`TX_SPIN_LIMIT`] polls) until every byte written has left the shift register; returns
    /// false if the transmitter never drained. Call before anything that ends the machine (an emulator's exit port,
    /// a reset), which would otherwise cut the last characters of the final line.
    pub fn flush(&mut self) -> bool {
        for _ in 0..TX_SPIN_LIMIT {
            if self.io.read(reg::LSR) & LSR_TX_EMPTY != 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// Sends a string, translating `\n` to `\r\n`.
    pub fn send_str(&mut self, s: &str) {
        for b in s.bytes() {
            if b == b'\n' {
                self.send(b'\r');
            }
            self.send(b);
        }
    }

    /// Returns a received byte if one is waiting.
    pub fn try_receive(&mut self) -> Option<u8> {
        if self.io.read(reg::LSR) & LSR_DATA_READY != 0 {
            Some(self.io.read(reg::DATA))
        } else {
            None
        }
    }

    /// Bytes dropped so far because the transmitter stayed busy.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl<P: PortIo> core::fmt::Write for Uart16550<P> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.send_str(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// Fake UART: records writes, reports a configurable line status, keeps the scratch register.
    struct Fake {
        writes: Vec<(u16, u8)>,
        lsr: u8,
        scratch: u8,
        rx: Option<u8>,
    }

    impl PortIo for &mut Fake {
        fn read(&mut self, offset: u16) -> u8 {
            match offset {
                reg::LSR => self.lsr | if self.rx.is_some() { LSR_DATA_READY } else { 0 },
                reg::SCR => self.scratch,
                reg::DATA => self.rx.take().unwrap_or(0),
                _ => 0,
            }
        }
        fn write(&mut self, offset: u16, value: u8) {
            if offset == reg::SCR {
                self.scratch = value;
            }
            self.writes.push((offset, value));
        }
    }

    fn fake() -> Fake {
        Fake {
            writes: Vec::new(),
            lsr: LSR_THR_EMPTY,
            scratch: 0,
            rx: None,
        }
    }

    #[test]
    fn flush_waits_for_the_shift_register_not_just_the_holding_register() {
        let mut f = fake();
        f.lsr = LSR_THR_EMPTY;
        assert!(
            !Uart16550::new(&mut f).flush(),
            "THRE alone must not count as drained"
        );
        f.lsr = LSR_THR_EMPTY | LSR_TX_EMPTY;
        assert!(Uart16550::new(&mut f).flush());
    }

    #[test]
    fn init_programs_divisor_and_8n1() {
        let mut f = fake();
        Uart16550::new(&mut f).init(38_400).unwrap();
        assert_eq!(
            f.writes,
            [
                (reg::IER, 0),
                (reg::LCR, 0x80),
                (reg::DATA, 3),
                (reg::IER, 0),
                (reg::LCR, 3),
                (reg::FCR, 0xC7),
                (reg::MCR, 0x0B)
            ]
        );
    }

    #[test]
    fn init_rejects_bad_baud() {
        let mut f = fake();
        let mut u = Uart16550::new(&mut f);
        assert_eq!(u.init(0), Err(UartError::UnsupportedBaud(0)));
        assert_eq!(u.init(230_400), Err(UartError::UnsupportedBaud(230_400)));
        assert_eq!(u.init(7_000), Err(UartError::UnsupportedBaud(7_000)));
    }

    #[test]
    fn newline_becomes_crlf() {
        let mut f = fake();
        Uart16550::new(&mut f).send_str("a\nb");
        let data: Vec<u8> = f
            .writes
            .iter()
            .filter(|w| w.0 == reg::DATA)
            .map(|w| w.1)
            .collect();
        assert_eq!(data, b"a\r\nb");
    }

    #[test]
    fn busy_transmitter_drops_instead_of_hanging() {
        let mut f = fake();
        f.lsr = 0;
        let mut u = Uart16550::new(&mut f);
        assert!(!u.send(b'x'));
        assert_eq!(u.dropped(), 1);
    }

    #[test]
    fn presence_and_receive() {
        let mut f = fake();
        f.rx = Some(b'q');
        let mut u = Uart16550::new(&mut f);
        assert!(u.is_present());
        assert_eq!(u.try_receive(), Some(b'q'));
        assert_eq!(u.try_receive(), None);
    }
}
