//! Typed NVMe controller registers (NVM Express Base Specification 2.0, section 3.1.3 "Controller Properties";
//! 1.4 section 3.1).
//!
//! Each register is a newtype over its raw value with accessors for the fields the driver uses, so bit positions
//! live in exactly one place. Offsets are from the start of BAR0.

/// Register offsets from BAR0 (spec 2.0 figure 33 / 1.4 figure 78).
pub mod offset {
    /// Controller Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: usize = 0x0C;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1C;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue Base Address (64-bit).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue Base Address (64-bit).
    pub const ACQ: usize = 0x30;
    /// First doorbell (admin SQ tail).
    pub const DOORBELLS: usize = 0x1000;
}

/// Controller Capabilities, CAP (spec 2.0 section 3.1.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum Queue Entries Supported, as an entry count (the field is zero-based).
    pub fn max_queue_entries(self) -> u32 {
        (self.0 & 0xFFFF) as u32 + 1
    }
    /// Contiguous Queues Required.
    pub fn contiguous_required(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// Timeout: worst-case time to become ready after CC.EN changes, in microseconds (field unit is 500 ms).
    pub fn timeout_us(self) -> u64 {
        ((self.0 >> 24) & 0xFF) * 500_000
    }
    /// Doorbell Stride: doorbells are `4 << dstrd` bytes apart.
    pub fn doorbell_stride_bytes(self) -> usize {
        4usize << ((self.0 >> 32) & 0xF)
    }
    /// Command Sets Supported includes the NVM command set (bit 37).
    pub fn supports_nvm(self) -> bool {
        self.0 & (1 << 37) != 0
    }
    /// Memory Page Size Minimum in bytes (2 ^ (12 + MPSMIN)).
    pub fn min_page_size(self) -> u64 {
        1u64 << (12 + ((self.0 >> 48) & 0xF))
    }
    /// Memory Page Size Maximum in bytes.
    pub fn max_page_size(self) -> u64 {
        1u64 << (12 + ((self.0 >> 52) & 0xF))
    }
}

/// Version, VS (spec 2.0 section 3.1.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version(pub u32);

impl Version {
    /// Major version.
    pub fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// Minor version.
    pub fn minor(self) -> u8 {
        ((self.0 >> 8) & 0xFF) as u8
    }
}

/// Controller Configuration, CC (spec 2.0 section 3.1.3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cc(pub u32);

impl Cc {
    /// Enable.
    pub const EN: u32 = 1 << 0;
    /// The configuration this driver uses: NVM command set (CSS=000b), 4 KiB memory pages (MPS=0), round-robin
    /// arbitration (AMS=0), no shutdown notification, 64-byte SQ entries (IOSQES=6), 16-byte CQ entries
    /// (IOCQES=4), enabled.
    pub fn enabled_config() -> Self {
        Self(Self::EN | (6 << 16) | (4 << 20))
    }
    /// Whether EN is set.
    pub fn enabled(self) -> bool {
        self.0 & Self::EN != 0
    }
    /// I/O Submission Queue Entry Size as log2 bytes.
    pub fn iosqes(self) -> u32 {
        (self.0 >> 16) & 0xF
    }
    /// I/O Completion Queue Entry Size as log2 bytes.
    pub fn iocqes(self) -> u32 {
        (self.0 >> 20) & 0xF
    }
    /// Memory Page Size in bytes.
    pub fn page_size(self) -> u64 {
        1u64 << (12 + ((self.0 >> 7) & 0xF))
    }
}

/// Controller Status, CSTS (spec 2.0 section 3.1.3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Csts(pub u32);

impl Csts {
    /// Ready.
    pub const RDY: u32 = 1 << 0;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Whether RDY is set.
    pub fn ready(self) -> bool {
        self.0 & Self::RDY != 0
    }
    /// Whether CFS is set. All-ones reads (device gone from the bus) also count as fatal.
    pub fn fatal(self) -> bool {
        self.0 & Self::CFS != 0
    }
}

/// Admin Queue Attributes, AQA (spec 2.0 section 3.1.3.8): zero-based queue sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aqa(pub u32);

impl Aqa {
    /// Both admin queues with `entries` entries (2..=4096).
    pub fn new(entries: u16) -> Self {
        let z = u32::from(entries.saturating_sub(1)) & 0xFFF;
        Self(z | (z << 16))
    }
    /// Admin Submission Queue Size as an entry count.
    pub fn sq_entries(self) -> u32 {
        (self.0 & 0xFFF) + 1
    }
    /// Admin Completion Queue Size as an entry count.
    pub fn cq_entries(self) -> u32 {
        ((self.0 >> 16) & 0xFFF) + 1
    }
}

/// Offset of queue `qid`'s submission tail doorbell (spec 2.0 section 3.1.3.19, SQyTDBL).
pub fn sq_tail_doorbell(qid: u16, stride: usize) -> usize {
    offset::DOORBELLS + (2 * usize::from(qid)) * stride
}

/// Offset of queue `qid`'s completion head doorbell (spec 2.0 section 3.1.3.20, CQyHDBL).
pub fn cq_head_doorbell(qid: u16, stride: usize) -> usize {
    offset::DOORBELLS + (2 * usize::from(qid) + 1) * stride
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_decode() {
        // QEMU 7.2's CAP: MQES=2047, CQR=1, TO=15, DSTRD=0, CSS=NVM, MPSMIN=0, MPSMAX=4.
        let cap = Cap(0x0040_0020_0F01_07FF);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.contiguous_required());
        assert_eq!(cap.timeout_us(), 7_500_000);
        assert_eq!(cap.doorbell_stride_bytes(), 4);
        assert!(cap.supports_nvm());
        assert_eq!(cap.min_page_size(), 4096);
        assert_eq!(cap.max_page_size(), 65536);
    }

    #[test]
    fn cc_and_aqa_encode() {
        let cc = Cc::enabled_config();
        assert!(cc.enabled());
        assert_eq!((cc.iosqes(), cc.iocqes(), cc.page_size()), (6, 4, 4096));
        let aqa = Aqa::new(32);
        assert_eq!((aqa.sq_entries(), aqa.cq_entries()), (32, 32));
        assert_eq!(aqa.0, 0x001F_001F);
        assert_eq!(sq_tail_doorbell(0, 4), 0x1000);
        assert_eq!(cq_head_doorbell(0, 4), 0x1004);
        assert_eq!(sq_tail_doorbell(3, 16), 0x1000 + 6 * 16);
        assert_eq!(Version(0x0001_0400).major(), 1);
        assert_eq!(Version(0x0001_0400).minor(), 4);
    }
}
