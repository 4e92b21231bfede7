//! Parsed Identify data structures (spec 2.0 section 5.17.2; 1.4 section 5.15.2): the controller (CNS 01h,
//! figure 247 in 1.4), a namespace (CNS 00h, NVM Command Set Specification 1.0 section 4.1.5.1 / 1.4 figure 245)
//! and the active namespace list (CNS 02h). Only the fields the driver relies on are kept; each parser checks what
//! it reads, so a garbled page becomes an error, not a wild value.

use super::NvmeError;

/// Size of every Identify data structure.
pub const IDENTIFY_BYTES: usize = 4096;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// ASCII field, space padded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Text<const N: usize>(pub [u8; N]);

impl<const N: usize> Text<N> {
    /// The text with trailing spaces and NULs removed (non-ASCII bytes shown as '?').
    pub fn trimmed(&self) -> &[u8] {
        let end = self
            .0
            .iter()
            .rposition(|&c| c != b' ' && c != 0)
            .map_or(0, |p| p + 1);
        &self.0[..end]
    }
}

impl<const N: usize> core::fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

impl<const N: usize> core::fmt::Display for Text<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for &c in self.trimmed() {
            let c = if c.is_ascii_graphic() || c == b' ' {
                c
            } else {
                b'?'
            };
            core::fmt::Write::write_char(f, char::from(c))?;
        }
        Ok(())
    }
}

/// Identify Controller, the fields used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI Vendor ID (bytes 1:0).
    pub vid: u16,
    /// Serial Number (bytes 23:4).
    pub serial: Text<20>,
    /// Model Number (bytes 63:24).
    pub model: Text<40>,
    /// Firmware Revision (bytes 71:64).
    pub firmware: Text<8>,
    /// Maximum Data Transfer Size as log2 of CAP.MPSMIN pages (byte 77); 0 = no limit.
    pub mdts: u8,
    /// Controller ID (bytes 79:78).
    pub cntlid: u16,
    /// Submission Queue Entry Size: (required, maximum) as log2 bytes (byte 512).
    pub sqes: (u8, u8),
    /// Completion Queue Entry Size: (required, maximum) as log2 bytes (byte 513).
    pub cqes: (u8, u8),
    /// Number of Namespaces: highest valid NSID (bytes 519:516).
    pub nn: u32,
}

impl ControllerInfo {
    /// Parses the 4 KiB structure; refuses entry sizes this driver cannot use (64-byte SQE, 16-byte CQE).
    pub fn parse(b: &[u8]) -> Result<Self, NvmeError> {
        if b.len() < IDENTIFY_BYTES {
            return Err(NvmeError::BadIdentify("short controller structure"));
        }
        let mut serial = [0u8; 20];
        serial.copy_from_slice(&b[4..24]);
        let mut model = [0u8; 40];
        model.copy_from_slice(&b[24..64]);
        let mut firmware = [0u8; 8];
        firmware.copy_from_slice(&b[64..72]);
        let info = Self {
            vid: le16(b, 0),
            serial: Text(serial),
            model: Text(model),
            firmware: Text(firmware),
            mdts: b[77],
            cntlid: le16(b, 78),
            sqes: (b[512] & 0xF, b[512] >> 4),
            cqes: (b[513] & 0xF, b[513] >> 4),
            nn: le32(b, 516),
        };
        // A controller that reports no sizes (pre-1.0 style zeros) is taken to accept the mandatory 64/16.
        let sq_ok = info.sqes == (0, 0) || (info.sqes.0 <= 6 && 6 <= info.sqes.1);
        let cq_ok = info.cqes == (0, 0) || (info.cqes.0 <= 4 && 4 <= info.cqes.1);
        if !sq_ok || !cq_ok {
            return Err(NvmeError::Unsupported(
                "queue entry sizes other than 64/16 bytes",
            ));
        }
        Ok(info)
    }

    /// Largest transfer in bytes given the controller's minimum page size (`None`: unlimited).
    pub fn max_transfer_bytes(&self, min_page: u64) -> Option<u64> {
        (self.mdts != 0).then(|| min_page << self.mdts.min(40))
    }
}

/// A namespace as the driver uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace ID.
    pub nsid: u32,
    /// Namespace Size in logical blocks (NSZE).
    pub blocks: u64,
    /// Logical block size in bytes (from the LBA format FLBAS selects).
    pub lba_size: u32,
    /// Metadata bytes per block in that format (the driver uses only formats with none).
    pub metadata: u16,
}

impl Namespace {
    /// Parses Identify Namespace for `nsid`. `Ok(None)` for an inactive namespace (all-zero structure).
    pub fn parse(nsid: u32, b: &[u8]) -> Result<Option<Self>, NvmeError> {
        if b.len() < IDENTIFY_BYTES {
            return Err(NvmeError::BadIdentify("short namespace structure"));
        }
        let blocks = le64(b, 0);
        if blocks == 0 {
            return Ok(None);
        }
        let nlbaf = usize::from(b[25]) + 1;
        let flbas = b[26];
        // FLBAS bits 3:0 are the low index; bits 6:5 the high bits (2.0, up to 64 formats).
        let index = usize::from(flbas & 0xF) | (usize::from((flbas >> 5) & 0x3) << 4);
        if index >= nlbaf || index >= 64 {
            return Err(NvmeError::BadIdentify(
                "FLBAS selects a format beyond NLBAF",
            ));
        }
        let f = le32(b, 128 + 4 * index);
        let lbads = (f >> 16) & 0xFF;
        if !(9..=16).contains(&lbads) {
            return Err(NvmeError::BadIdentify(
                "LBA data size outside 512 B..64 KiB",
            ));
        }
        Ok(Some(Self {
            nsid,
            blocks,
            lba_size: 1 << lbads,
            metadata: (f & 0xFFFF) as u16,
        }))
    }

    /// Capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.lba_size))
    }
}

/// Parses an Active Namespace ID list: ascending NSIDs, terminated by zero.
pub fn parse_active_list(b: &[u8], out: &mut alloc::vec::Vec<u32>) -> Result<(), NvmeError> {
    let mut last = 0;
    for i in 0..b.len().min(IDENTIFY_BYTES) / 4 {
        let id = le32(b, i * 4);
        if id == 0 {
            break;
        }
        if id <= last || id == u32::MAX {
            return Err(NvmeError::BadIdentify(
                "active namespace list not ascending",
            ));
        }
        out.push(id);
        last = id;
    }
    Ok(())
}
