//! Legacy 8259 PIC pair: remapped away from the exception vectors and fully masked.
//!
//! Firmware (SeaBIOS in particular) leaves the PICs unmasked with IRQ 0-7 on vectors 8-15, which collide with
//! exceptions. We remap them to [`PIC_VECTOR_BASE`]..+16 (whose handlers ignore them: only spurious IRQ 7/15 can
//! still arrive) and mask every line; interrupts come through the LAPIC and IOAPIC.

use x86_64::instructions::port::Port;

/// First vector the PICs use after remapping.
pub const PIC_VECTOR_BASE: u8 = 0x20;

/// Remaps and masks both PICs.
pub fn disable() {
    // SAFETY: ports 0x20/0x21/0xA0/0xA1 are the 8259 pair on every PC; the ICW sequence below is the documented
    // initialisation (8259A data sheet) and ends with all lines masked. No memory is touched.
    unsafe {
        let mut cmd1 = Port::<u8>::new(0x20);
        let mut data1 = Port::<u8>::new(0x21);
        let mut cmd2 = Port::<u8>::new(0xA0);
        let mut data2 = Port::<u8>::new(0xA1);
        cmd1.write(0x11); // ICW1: edge, cascade, ICW4 follows
        cmd2.write(0x11);
        data1.write(PIC_VECTOR_BASE); // ICW2: vector base
        data2.write(PIC_VECTOR_BASE + 8);
        data1.write(4); // ICW3: slave on IRQ2
        data2.write(2);
        data1.write(1); // ICW4: 8086 mode
        data2.write(1);
        data1.write(0xFF); // OCW1: mask all
        data2.write(0xFF);
    }
}
