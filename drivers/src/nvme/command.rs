//! Typed NVMe submission and completion queue entries, opcodes and status codes.
//!
//! Layouts: common command format, spec 2.0 section 4.2 (1.4 section 4.2, figure 104); completion queue entry,
//! spec 2.0 section 4.2.3 / 1.4 section 4.6 (figure 121); status field and code tables, 2.0 section 4.2.3.2
//! (1.4 section 4.6.1.2, figures 125-129). An [`Sqe`] is sixteen dwords; a [`Cqe`] four. Both are converted to and
//! from little-endian bytes only at the DMA boundary.

use core::fmt;

/// Admin command opcodes (spec 2.0 section 5, figure 28 in 1.4 section 5).
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
}

/// NVM command set I/O opcodes (NVM Command Set Specification 1.0 section 3 / base 1.4 section 6).
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
}

/// Identify CNS values (spec 2.0 section 5.17.1, figure 273).
pub mod cns {
    /// Identify Namespace data structure for NSID.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u32 = 0x01;
    /// Active Namespace ID list (NSIDs greater than NSID).
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
}

/// Feature identifiers (spec 2.0 section 5.27.1).
pub mod feature {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u32 = 0x07;
}

/// A 64-byte submission queue entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe(pub [u32; 16]);

impl Sqe {
    /// A command with `opcode` and command identifier `cid` (CDW0: OPC bits 7:0, FUSE=0, PSDT=0 (PRPs), CID
    /// bits 31:16).
    pub fn new(opcode: u8, cid: u16) -> Self {
        let mut s = Self::default();
        s.0[0] = u32::from(opcode) | (u32::from(cid) << 16);
        s
    }
    /// Opcode.
    pub fn opcode(&self) -> u8 {
        (self.0[0] & 0xFF) as u8
    }
    /// Command identifier.
    pub fn cid(&self) -> u16 {
        (self.0[0] >> 16) as u16
    }
    /// Replaces the command identifier.
    pub fn set_cid(&mut self, cid: u16) {
        self.0[0] = (self.0[0] & 0xFFFF) | (u32::from(cid) << 16);
    }
    /// Namespace identifier (DW1).
    pub fn nsid(&self) -> u32 {
        self.0[1]
    }
    /// Sets the namespace identifier.
    pub fn with_nsid(mut self, nsid: u32) -> Self {
        self.0[1] = nsid;
        self
    }
    /// PRP entry 1 (DW6-7).
    pub fn prp1(&self) -> u64 {
        u64::from(self.0[6]) | (u64::from(self.0[7]) << 32)
    }
    /// PRP entry 2 (DW8-9).
    pub fn prp2(&self) -> u64 {
        u64::from(self.0[8]) | (u64::from(self.0[9]) << 32)
    }
    /// Sets both PRP entries.
    pub fn with_prps(mut self, prp1: u64, prp2: u64) -> Self {
        self.0[6] = (prp1 & 0xFFFF_FFFF) as u32;
        self.0[7] = (prp1 >> 32) as u32;
        self.0[8] = (prp2 & 0xFFFF_FFFF) as u32;
        self.0[9] = (prp2 >> 32) as u32;
        self
    }
    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        self.0[n]
    }
    /// Sets command dword `n` (10..=15).
    pub fn with_cdw(mut self, n: usize, v: u32) -> Self {
        self.0[n] = v;
        self
    }
    /// Little-endian bytes as they sit in the queue.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        for (i, d) in self.0.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
    /// Parses the queue bytes (used by fakes).
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        let mut s = Self::default();
        for (i, d) in s.0.iter_mut().enumerate() {
            *d = u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
        s
    }
}

/// A 16-byte completion queue entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe(pub [u32; 4]);

impl Cqe {
    /// Builds an entry (used by fakes): command-specific DW0, SQ head, SQ id, CID, status (without phase), phase.
    pub fn new(dw0: u32, sq_head: u16, sqid: u16, cid: u16, status: Status, phase: bool) -> Self {
        let sf = (status.raw() << 1) | u16::from(phase);
        Self([
            dw0,
            0,
            u32::from(sq_head) | (u32::from(sqid) << 16),
            u32::from(cid) | (u32::from(sf) << 16),
        ])
    }
    /// Command-specific result (DW0).
    pub fn dw0(&self) -> u32 {
        self.0[0]
    }
    /// SQ head pointer at completion time.
    pub fn sq_head(&self) -> u16 {
        (self.0[2] & 0xFFFF) as u16
    }
    /// Submission queue the command came from.
    pub fn sqid(&self) -> u16 {
        (self.0[2] >> 16) as u16
    }
    /// Command identifier.
    pub fn cid(&self) -> u16 {
        (self.0[3] & 0xFFFF) as u16
    }
    /// Phase tag (bit 16 of DW3).
    pub fn phase(&self) -> bool {
        self.0[3] & (1 << 16) != 0
    }
    /// Status field without the phase tag.
    pub fn status(&self) -> Status {
        Status::from_raw((self.0[3] >> 17) as u16)
    }
    /// Little-endian bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, d) in self.0.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&d.to_le_bytes());
        }
        b
    }
    /// Parses queue bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let mut s = Self::default();
        for (i, d) in s.0.iter_mut().enumerate() {
            *d = u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
        s
    }
}

/// Status Code Type (spec 2.0 section 4.2.3.2, figure 95).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusType {
    /// Generic command status.
    Generic,
    /// Command specific status.
    CommandSpecific,
    /// Media and data integrity errors.
    Media,
    /// Path related status.
    Path,
    /// Vendor specific.
    Vendor,
    /// Reserved type value.
    Reserved(u8),
}

/// A completion status: SCT, SC, More and Do Not Retry (15 bits, phase excluded), as the device reported it or as
/// the driver synthesised it ([`Status::TIMED_OUT`], [`Status::CONTROLLER_FAILED`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Status(u16);

impl Status {
    /// Successful completion.
    pub const SUCCESS: Self = Self(0);
    /// Generic: Invalid Command Opcode.
    pub const INVALID_OPCODE: Self = Self(0x01);
    /// Generic: Invalid Field in Command.
    pub const INVALID_FIELD: Self = Self(0x02);
    /// Generic: Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: Self = Self(0x04);
    /// Generic: Internal Error.
    pub const INTERNAL_ERROR: Self = Self(0x06);
    /// Generic: Command Abort Requested. The driver also reports it, with DNR set, for a request that timed out
    /// and was aborted or lost in a controller reset more often than the retry budget allows.
    pub const ABORT_REQUESTED: Self = Self(0x07);
    /// Generic: Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETED: Self = Self(0x08);
    /// Generic: Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: Self = Self(0x0B);
    /// Generic (NVM): LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: Self = Self(0x80);
    /// Media: Unrecovered Read Error.
    pub const UNRECOVERED_READ: Self = Self((2 << 8) | 0x81);
    /// Media: Write Fault.
    pub const WRITE_FAULT: Self = Self((2 << 8) | 0x80);
    /// Do Not Retry bit.
    pub const DNR: u16 = 1 << 14;
    /// Driver-synthesised: the command timed out and was aborted (Command Abort Requested, DNR).
    pub const TIMED_OUT: Self = Self(0x07 | Self::DNR);
    /// Driver-synthesised: the controller failed (CSTS.CFS or reset failure) and the command could not be
    /// re-issued (Internal Error, DNR).
    pub const CONTROLLER_FAILED: Self = Self(0x06 | Self::DNR);

    /// From the 15-bit field (CQE DW3 bits 31:17).
    pub fn from_raw(raw: u16) -> Self {
        Self(raw & 0x7FFF)
    }
    /// The 15-bit field.
    pub fn raw(self) -> u16 {
        self.0
    }
    /// Whether the command succeeded.
    pub fn is_success(self) -> bool {
        self.code() == 0 && self.kind() == StatusType::Generic
    }
    /// Status Code (SC).
    pub fn code(self) -> u8 {
        (self.0 & 0xFF) as u8
    }
    /// Status Code Type.
    pub fn kind(self) -> StatusType {
        match (self.0 >> 8) & 0x7 {
            0 => StatusType::Generic,
            1 => StatusType::CommandSpecific,
            2 => StatusType::Media,
            3 => StatusType::Path,
            7 => StatusType::Vendor,
            t => StatusType::Reserved(u8::try_from(t).unwrap_or(u8::MAX)),
        }
    }
    /// Do Not Retry.
    pub fn do_not_retry(self) -> bool {
        self.0 & Self::DNR != 0
    }
    /// A short name for the status (spec tables); `None` for codes this driver does not name.
    pub fn name(self) -> Option<&'static str> {
        Some(match (self.kind(), self.code()) {
            (StatusType::Generic, 0x00) => "success",
            (StatusType::Generic, 0x01) => "invalid command opcode",
            (StatusType::Generic, 0x02) => "invalid field in command",
            (StatusType::Generic, 0x03) => "command id conflict",
            (StatusType::Generic, 0x04) => "data transfer error",
            (StatusType::Generic, 0x05) => "aborted: power loss",
            (StatusType::Generic, 0x06) => "internal error",
            (StatusType::Generic, 0x07) => "command abort requested",
            (StatusType::Generic, 0x08) => "aborted: SQ deleted",
            (StatusType::Generic, 0x0B) => "invalid namespace or format",
            (StatusType::Generic, 0x13) => "invalid PRP offset",
            (StatusType::Generic, 0x80) => "LBA out of range",
            (StatusType::Generic, 0x81) => "capacity exceeded",
            (StatusType::Generic, 0x82) => "namespace not ready",
            (StatusType::CommandSpecific, 0x00) => "completion queue invalid",
            (StatusType::CommandSpecific, 0x01) => "invalid queue identifier",
            (StatusType::CommandSpecific, 0x02) => "invalid queue size",
            (StatusType::CommandSpecific, 0x80) => "conflicting attributes",
            (StatusType::Media, 0x80) => "write fault",
            (StatusType::Media, 0x81) => "unrecovered read error",
            (StatusType::Media, 0x82) => "end-to-end guard check error",
            (StatusType::Media, 0x86) => "access denied",
            _ => return None,
        })
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dnr = if self.do_not_retry() { ", dnr" } else { "" };
        match self.name() {
            Some(n) => write!(f, "{n} ({:?}/{:#04x}{dnr})", self.kind(), self.code()),
            None => write!(f, "status {:?}/{:#04x}{dnr}", self.kind(), self.code()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_roundtrip_and_fields() {
        let s = Sqe::new(io::READ, 0x1234)
            .with_nsid(7)
            .with_prps(0x1_2345_6000, 0xABCD_E000)
            .with_cdw(10, 99)
            .with_cdw(12, 7);
        assert_eq!((s.opcode(), s.cid(), s.nsid()), (io::READ, 0x1234, 7));
        assert_eq!((s.prp1(), s.prp2()), (0x1_2345_6000, 0xABCD_E000));
        let b = s.to_bytes();
        assert_eq!(&b[0..4], &[0x02, 0, 0x34, 0x12]);
        assert_eq!(Sqe::from_bytes(&b), s);
        let mut t = s;
        t.set_cid(5);
        assert_eq!((t.cid(), t.opcode()), (5, io::READ));
    }

    #[test]
    fn cqe_phase_and_status_decode() {
        let c = Cqe::new(3, 9, 1, 42, Status::UNRECOVERED_READ, true);
        assert!(c.phase());
        assert_eq!((c.dw0(), c.sq_head(), c.sqid(), c.cid()), (3, 9, 1, 42));
        assert_eq!(c.status(), Status::UNRECOVERED_READ);
        assert_eq!(c.status().kind(), StatusType::Media);
        assert_eq!(c.status().name(), Some("unrecovered read error"));
        assert!(!c.status().is_success());
        assert_eq!(Cqe::from_bytes(&c.to_bytes()), c);
        let ok = Cqe::new(0, 0, 0, 1, Status::SUCCESS, false);
        assert!(!ok.phase() && ok.status().is_success());
        // DNR and More bits survive; phase is excluded from the status.
        let raw = Status::from_raw(0x4000 | (1 << 8) | 0x02);
        assert!(raw.do_not_retry());
        assert_eq!(raw.kind(), StatusType::CommandSpecific);
        assert_eq!(raw.name(), Some("invalid queue size"));
        assert!(Status::TIMED_OUT.do_not_retry());
        let s = alloc::format!("{}", Status::from_raw(0x0133));
        assert!(s.contains("0x33"), "{s}");
    }
}
