//! Framing: postcard payload + header + CRC-32, COBS-encoded, delimited by zero bytes.
//!
//! Wire layout of one frame (before COBS):
//! `[version: u8][session: u32 LE][seq: u64 LE][postcard body][crc32 LE over everything before it]`,
//! then COBS-encoded and sent as `0x00 <cobs bytes> 0x00`. The leading zero lets a receiver that was fed line
//! noise resynchronise before a frame instead of losing it.
//!
//! The [`FrameDecoder`] is a byte-at-a-time state machine with a fixed buffer: it never allocates, resyncs on
//! every zero byte, and sorts every rejected frame into one counter of [`DecodeStats`] (oversized, COBS error,
//! truncated, CRC error, wrong version, malformed body, replay).
//!
//! Invariants:
//! - A frame is delivered only if its CRC-32 matches, its version is [`PROTOCOL_VERSION`], the body decodes
//!   completely (no trailing bytes), and its (session, seq) is new: within one sender session, sequence numbers
//!   must strictly increase, so a duplicated or replayed frame is dropped. A new session id resets the window
//!   (the sender restarted); replay of commands across sessions is stopped one level up by request ids
//!   ([`crate::DedupWindow`]).
//! - CRC-32 (ISO-HDLC) detects every single-bit error, every burst of up to 32 bits, and any odd number of
//!   flipped bits, so a single corrupted bit never turns a frame into a different valid message.

use serde::{de::DeserializeOwned, Serialize};

use crate::msg::PROTOCOL_VERSION;

/// Largest postcard body of any message (checked against the largest message by a test).
pub const MAX_PAYLOAD: usize = 2048;
/// Header: version + session + seq.
pub const HEADER_LEN: usize = 1 + 4 + 8;
/// CRC trailer.
pub const CRC_LEN: usize = 4;
/// Largest raw (pre-COBS) frame.
pub const MAX_RAW: usize = HEADER_LEN + MAX_PAYLOAD + CRC_LEN;
/// Largest COBS-encoded frame, without delimiters.
pub const MAX_ENCODED: usize = MAX_RAW + MAX_RAW / 254 + 1;
/// Largest frame on the wire including both delimiters: size of an encode buffer.
pub const MAX_WIRE: usize = MAX_ENCODED + 2;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The postcard body exceeds [`MAX_PAYLOAD`] (cannot happen for messages of this crate).
    TooLarge,
    /// The output buffer is smaller than [`MAX_WIRE`] needs for this frame.
    BufferTooSmall,
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLarge => write!(f, "message body exceeds {MAX_PAYLOAD} bytes"),
            Self::BufferTooSmall => write!(f, "output buffer too small for the frame"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for EncodeError {}

/// Sender side: stamps the session id and an increasing sequence number on each frame.
#[derive(Debug, Clone)]
pub struct FrameEncoder {
    session: u32,
    next_seq: u64,
    version: u8,
}

impl FrameEncoder {
    /// A sender session. Pick a `session` that differs from the previous run of the same sender (boot id,
    /// start time, random); `first_seq` must be >= 1.
    #[must_use]
    pub fn new(session: u32, first_seq: u64) -> Self {
        Self {
            session,
            next_seq: first_seq.max(1),
            version: PROTOCOL_VERSION,
        }
    }

    /// A sender that stamps `version` instead of [`PROTOCOL_VERSION`] on its frames: it stands in for a peer of
    /// another protocol version (the simulated host of the agent's compatibility tests).
    #[must_use]
    pub fn with_version(session: u32, first_seq: u64, version: u8) -> Self {
        Self {
            version,
            ..Self::new(session, first_seq)
        }
    }

    /// Session id in use.
    #[must_use]
    pub fn session(&self) -> u32 {
        self.session
    }

    /// Encodes `msg` into `out` (`0x00 cobs 0x00`) and returns the number of bytes written.
    ///
    /// # Errors
    /// [`EncodeError`] when the body or the buffer is too small; the sequence number is then not consumed.
    pub fn encode<T: Serialize>(&mut self, msg: &T, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut raw = [0u8; MAX_RAW];
        raw[0] = self.version;
        raw[1..5].copy_from_slice(&self.session.to_le_bytes());
        raw[5..HEADER_LEN].copy_from_slice(&self.next_seq.to_le_bytes());
        let body_len = postcard::to_slice(msg, &mut raw[HEADER_LEN..HEADER_LEN + MAX_PAYLOAD])
            .map_err(|_| EncodeError::TooLarge)?
            .len();
        let crc_at = HEADER_LEN + body_len;
        let crc = CRC32.checksum(&raw[..crc_at]);
        raw[crc_at..crc_at + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
        let raw_len = crc_at + CRC_LEN;
        if out.len() < 2 + cobs::max_encoding_length(raw_len) {
            return Err(EncodeError::BufferTooSmall);
        }
        out[0] = 0;
        let n = cobs::try_encode(&raw[..raw_len], &mut out[1..])
            .map_err(|_| EncodeError::BufferTooSmall)?;
        out[1 + n] = 0;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        Ok(n + 2)
    }

    /// Encodes into a new vector (host side).
    ///
    /// # Errors
    /// As [`FrameEncoder::encode`].
    #[cfg(feature = "std")]
    pub fn encode_vec<T: Serialize>(&mut self, msg: &T) -> Result<std::vec::Vec<u8>, EncodeError> {
        let mut out = std::vec![0u8; MAX_WIRE];
        let n = self.encode(msg, &mut out)?;
        out.truncate(n);
        Ok(out)
    }
}

/// Counters of the decoder: every byte sequence between two zeros lands in exactly one of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecodeStats {
    /// Frames delivered.
    pub ok: u64,
    /// Longer than [`MAX_ENCODED`]: discarded up to the next zero.
    pub oversized: u64,
    /// COBS structure invalid.
    pub cobs_errors: u64,
    /// Shorter than header + CRC.
    pub truncated: u64,
    /// CRC mismatch.
    pub crc_errors: u64,
    /// Wrong protocol version.
    pub bad_version: u64,
    /// CRC good but the body does not decode as the expected message.
    pub malformed: u64,
    /// Sequence number not newer than the last accepted one in this session.
    pub replays: u64,
    /// Sender sessions seen (the first one included).
    pub sessions: u64,
}

impl DecodeStats {
    /// All rejected frames.
    #[must_use]
    pub fn rejected(&self) -> u64 {
        self.oversized
            + self.cobs_errors
            + self.truncated
            + self.crc_errors
            + self.bad_version
            + self.malformed
            + self.replays
    }
}

/// A delivered frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<T> {
    /// Sender session.
    pub session: u32,
    /// Sequence number within the session.
    pub seq: u64,
    /// The message.
    pub msg: T,
}

/// Streaming decoder with a fixed buffer; see the module docs for the acceptance rules.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    buf: [u8; MAX_ENCODED],
    len: usize,
    overflow: bool,
    last: Option<(u32, u64)>,
    stats: DecodeStats,
    foreign_version: Option<u8>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    /// An empty decoder that has seen no session yet.
    #[must_use]
    pub fn new() -> Self {
        Self {
            buf: [0; MAX_ENCODED],
            len: 0,
            overflow: false,
            last: None,
            stats: DecodeStats::default(),
            foreign_version: None,
        }
    }

    /// Counters so far.
    #[must_use]
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// The version byte of the latest intact frame (CRC good) whose version was not [`PROTOCOL_VERSION`]: the
    /// peer speaks another protocol version (counted in `bad_version`; a corrupt byte cannot produce this, the
    /// CRC would not match).
    #[must_use]
    pub fn foreign_version(&self) -> Option<u8> {
        self.foreign_version
    }

    /// Forgets the replay window (call when the transport is reopened to a possibly different peer).
    pub fn reset_replay_window(&mut self) {
        self.last = None;
    }

    /// Feeds one byte; returns a message when this byte completes a valid, new frame.
    pub fn push<T: DeserializeOwned>(&mut self, byte: u8) -> Option<Frame<T>> {
        if byte != 0 {
            if self.overflow {
                return None;
            }
            if self.len == MAX_ENCODED {
                self.overflow = true;
                self.stats.oversized += 1;
                self.len = 0;
                return None;
            }
            self.buf[self.len] = byte;
            self.len += 1;
            return None;
        }
        let len = core::mem::take(&mut self.len);
        if core::mem::take(&mut self.overflow) || len == 0 {
            return None;
        }
        self.finish::<T>(len)
    }

    /// Feeds a slice, calling `sink` for each delivered message.
    pub fn push_slice<T: DeserializeOwned>(
        &mut self,
        bytes: &[u8],
        mut sink: impl FnMut(Frame<T>),
    ) {
        for &b in bytes {
            if let Some(frame) = self.push::<T>(b) {
                sink(frame);
            }
        }
    }

    fn finish<T: DeserializeOwned>(&mut self, len: usize) -> Option<Frame<T>> {
        let Ok(n) = cobs::decode_in_place(&mut self.buf[..len]) else {
            self.stats.cobs_errors += 1;
            return None;
        };
        let raw = &self.buf[..n];
        if n < HEADER_LEN + CRC_LEN {
            self.stats.truncated += 1;
            return None;
        }
        let (data, crc_bytes) = raw.split_at(n - CRC_LEN);
        let crc = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        if CRC32.checksum(data) != crc {
            self.stats.crc_errors += 1;
            return None;
        }
        if data[0] != PROTOCOL_VERSION {
            self.stats.bad_version += 1;
            self.foreign_version = Some(data[0]);
            return None;
        }
        let session = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
        let mut seq_bytes = [0u8; 8];
        seq_bytes.copy_from_slice(&data[5..HEADER_LEN]);
        let seq = u64::from_le_bytes(seq_bytes);
        let msg = match postcard::take_from_bytes::<T>(&data[HEADER_LEN..]) {
            Ok((msg, [])) => msg,
            _ => {
                self.stats.malformed += 1;
                return None;
            }
        };
        match self.last {
            Some((s, last_seq)) if s == session && seq <= last_seq => {
                self.stats.replays += 1;
                return None;
            }
            Some((s, _)) if s == session => {}
            _ => self.stats.sessions += 1,
        }
        self.last = Some((session, seq));
        self.stats.ok += 1;
        Some(Frame { session, seq, msg })
    }
}
