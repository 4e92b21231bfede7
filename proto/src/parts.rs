//! Long replies in parts: a [`Response`] whose body is longer than [`SPLIT_ABOVE`] bytes goes to the agent as
//! [`ResponsePart`] frames of at most [`PART_BYTES`] bytes each, and the agent puts it together from parts that
//! may have arrived in different attempts.
//!
//! Why: on a noisy link every corrupt, dropped or duplicated byte costs the whole frame it is in, so a frame of
//! `n` bytes arrives intact with probability `(1 - e)^n` for a per-byte fault rate `e`. A 120-byte admission
//! refusal through the test proxy (about 2.5 % per byte when the 16550 writes byte by byte and the proxy replays
//! 2 % of its reads) arrived in about one attempt in thirty, so a fixed number of retries lost it. In parts, a
//! corrupt byte costs one part only, and a retry only needs to deliver the parts still missing.
//!
//! Design: the sender encodes the response with postcard once, takes the CRC-32 of those bytes as the reply's
//! `digest`, and cuts them into `count` parts (`index` 0..count). The same request answered again (a retry: the
//! dedup window gives the same cached answer; a query that finds the same state) yields the same digest and the
//! same parts, so parts of different attempts combine. A [`Reassembly`] keys parts by (request id, digest):
//! answers with different contents never mix.
//!
//! Invariants: a reassembled [`Response`] is delivered only if all `count` parts of one digest are there, their
//! concatenation has that CRC-32, it decodes completely, and it names the request id of its parts. Every part
//! frame has its own CRC (the framing's), so a part is either intact or dropped.

use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::frame::{EncodeError, MAX_PAYLOAD};
use crate::msg::Response;

/// Responses whose postcard body is longer than this many bytes are sent in parts.
pub const SPLIT_ABOVE: usize = 48;
/// Bytes of the response carried by one part (the last part may carry fewer). A part frame costs about 37 bytes
/// besides these (framing, id, digest, place); 16 is the best size for a 100-byte reply at 2.5 % per-byte faults
/// (30 attempts lose it with about 1 % probability, against 34 % whole and 2 % in 24-byte parts).
pub const PART_BYTES: usize = 16;
/// Most parts of one response (the largest body, [`MAX_PAYLOAD`], in [`PART_BYTES`] pieces).
pub const MAX_PARTS: usize = MAX_PAYLOAD.div_ceil(PART_BYTES);

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// One piece of a long [`Response`] (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponsePart {
    /// The request id answered (the same as the whole response's).
    pub id: u64,
    /// CRC-32 (ISO-HDLC) of the whole response's postcard bytes: parts combine only with the same digest.
    pub digest: u32,
    /// This part's position, `0..count`.
    pub index: u16,
    /// Number of parts of the response.
    pub count: u16,
    /// The bytes at `index * PART_BYTES ..` of the response's postcard encoding.
    pub bytes: Vec<u8, PART_BYTES>,
}

/// How a response goes out: whole (short) or in parts.
#[derive(Debug)]
pub enum Outgoing<'a> {
    /// Short enough to go in one frame.
    Whole,
    /// In parts; iterate to get them.
    Parts(Parts<'a>),
}

/// Encodes `resp` into `scratch` (at least [`MAX_PAYLOAD`] bytes) and says whether it goes whole or in parts.
///
/// # Errors
/// [`EncodeError::TooLarge`] when the body does not fit `scratch` or [`MAX_PAYLOAD`].
pub fn outgoing<'a>(resp: &Response, scratch: &'a mut [u8]) -> Result<Outgoing<'a>, EncodeError> {
    let room = scratch.len().min(MAX_PAYLOAD);
    let body = postcard::to_slice(resp, &mut scratch[..room]).map_err(|_| EncodeError::TooLarge)?;
    if body.len() <= SPLIT_ABOVE {
        return Ok(Outgoing::Whole);
    }
    let count =
        u16::try_from(body.len().div_ceil(PART_BYTES)).map_err(|_| EncodeError::TooLarge)?;
    Ok(Outgoing::Parts(Parts {
        id: resp.id,
        digest: CRC32.checksum(body),
        count,
        next: 0,
        body,
    }))
}

/// The parts of one response, in order.
#[derive(Debug)]
pub struct Parts<'a> {
    id: u64,
    digest: u32,
    count: u16,
    next: u16,
    body: &'a [u8],
}

impl Parts<'_> {
    /// Number of parts.
    #[must_use]
    pub fn count(&self) -> u16 {
        self.count
    }
}

impl Iterator for Parts<'_> {
    type Item = ResponsePart;

    fn next(&mut self) -> Option<ResponsePart> {
        if self.next >= self.count {
            return None;
        }
        let start = usize::from(self.next) * PART_BYTES;
        let end = (start + PART_BYTES).min(self.body.len());
        let bytes = Vec::from_slice(&self.body[start..end]).ok()?;
        let part = ResponsePart {
            id: self.id,
            digest: self.digest,
            index: self.next,
            count: self.count,
            bytes,
        };
        self.next += 1;
        Some(part)
    }
}

/// Why a part was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartError {
    /// `index >= count`, `count` above [`MAX_PARTS`], or a part of the wrong length for its place.
    Invalid,
    /// The same (id, digest) was announced with another part count.
    Inconsistent,
    /// All parts are there but their CRC-32 is not the digest, or they do not decode as a response for this id.
    Corrupt,
}

/// Collects the parts of the responses to one or more request ids (agent side, `std`).
///
/// Bounded by the caller: it keeps parts only for ids it is told about and forgets an id with
/// [`Reassembly::forget`] once answered; within one id at most [`Reassembly::DIGESTS_PER_ID`] different answers
/// are kept (the oldest is dropped first).
#[cfg(feature = "std")]
#[derive(Debug, Default)]
pub struct Reassembly {
    sets: std::collections::HashMap<u64, std::vec::Vec<PartSet>>,
}

#[cfg(feature = "std")]
#[derive(Debug)]
struct PartSet {
    digest: u32,
    parts: std::vec::Vec<Option<Vec<u8, PART_BYTES>>>,
}

#[cfg(feature = "std")]
impl Reassembly {
    /// Different answers (digests) kept per request id.
    pub const DIGESTS_PER_ID: usize = 4;

    /// An empty reassembly.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one part; returns the response once its last missing part arrived.
    ///
    /// # Errors
    /// [`PartError`] for a part that cannot belong to a valid response (it is dropped; the set stays).
    pub fn push(&mut self, part: ResponsePart) -> Result<Option<Response>, PartError> {
        let count = usize::from(part.count);
        let index = usize::from(part.index);
        if count == 0 || count > MAX_PARTS || index >= count {
            return Err(PartError::Invalid);
        }
        // Every part but the last is full; the last one is not empty.
        let len = part.bytes.len();
        if (index + 1 < count && len != PART_BYTES) || len == 0 {
            return Err(PartError::Invalid);
        }
        let sets = self.sets.entry(part.id).or_default();
        let pos = match sets.iter().position(|s| s.digest == part.digest) {
            Some(p) => p,
            None => {
                if sets.len() >= Self::DIGESTS_PER_ID {
                    sets.remove(0);
                }
                sets.push(PartSet {
                    digest: part.digest,
                    parts: std::vec![None; count],
                });
                sets.len() - 1
            }
        };
        let set = &mut sets[pos];
        if set.parts.len() != count {
            return Err(PartError::Inconsistent);
        }
        set.parts[index] = Some(part.bytes);
        if set.parts.iter().any(Option::is_none) {
            return Ok(None);
        }
        let body: std::vec::Vec<u8> = set.parts.iter().flatten().flatten().copied().collect();
        let digest = set.digest;
        // Complete: whatever happens next, this set is done.
        sets.remove(pos);
        if sets.is_empty() {
            self.sets.remove(&part.id);
        }
        if CRC32.checksum(&body) != digest {
            return Err(PartError::Corrupt);
        }
        match postcard::from_bytes::<Response>(&body) {
            Ok(r) if r.id == part.id => Ok(Some(r)),
            _ => Err(PartError::Corrupt),
        }
    }

    /// Drops every part kept for `id` (it was answered or given up).
    pub fn forget(&mut self, id: u64) {
        self.sets.remove(&id);
    }

    /// Keeps only the ids `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.sets.retain(|id, _| keep(*id));
    }

    /// Request ids with parts held.
    #[must_use]
    pub fn ids(&self) -> usize {
        self.sets.len()
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::msg::{CommandError, ErrorCode, Reply};

    fn refusal(id: u64) -> Response {
        Response {
            id,
            result: Err(CommandError::new(
                ErrorCode::Admission,
                "admission refused: cpu 1: utilisation 0 ppm + requested 1000100 ppm exceeds bound 1000000 ppm",
            )),
        }
    }

    fn parts_of(r: &Response) -> std::vec::Vec<ResponsePart> {
        let mut scratch = [0u8; MAX_PAYLOAD];
        match outgoing(r, &mut scratch).unwrap() {
            Outgoing::Parts(p) => p.collect(),
            Outgoing::Whole => panic!("a long reply goes in parts"),
        }
    }

    #[test]
    fn short_replies_go_whole() {
        let mut scratch = [0u8; MAX_PAYLOAD];
        let ack = Response {
            id: u64::MAX,
            result: Ok(Reply::Ack),
        };
        assert!(matches!(outgoing(&ack, &mut scratch), Ok(Outgoing::Whole)));
    }

    #[test]
    fn parts_from_different_attempts_combine() {
        let r = refusal(1_795_258_209_719_006);
        let first = parts_of(&r);
        let second = parts_of(&r);
        assert!(first.len() >= 5, "{} parts", first.len());
        assert_eq!(first, second, "the same answer gives the same parts");
        let mut re = Reassembly::new();
        // Attempt 1 delivers the even parts, attempt 2 the odd ones, with a duplicate on the way.
        for p in first.iter().step_by(2) {
            assert_eq!(re.push(p.clone()), Ok(None));
        }
        assert_eq!(re.push(first[0].clone()), Ok(None));
        let mut done = None;
        for p in second.iter().skip(1).step_by(2) {
            done = re.push(p.clone()).unwrap();
        }
        assert_eq!(done, Some(r));
        assert_eq!(re.ids(), 0, "a finished set is dropped");
    }

    #[test]
    fn different_answers_never_mix() {
        let a = refusal(7);
        let mut b = refusal(7);
        if let Err(e) = &mut b.result {
            e.reason = crate::msg::truncated("admission refused: cpu 0: utilisation 0 ppm + requested 1000101 ppm exceeds bound 1000000 ppm");
        }
        let (pa, pb) = (parts_of(&a), parts_of(&b));
        assert_eq!(pa.len(), pb.len());
        assert_ne!(pa[0].digest, pb[0].digest);
        let mut re = Reassembly::new();
        // All but the last of a, the last of b: nothing is delivered.
        for p in &pa[..pa.len() - 1] {
            assert_eq!(re.push(p.clone()), Ok(None));
        }
        assert_eq!(re.push(pb[pb.len() - 1].clone()), Ok(None));
        assert_eq!(re.push(pa[pa.len() - 1].clone()), Ok(Some(a)));
    }

    #[test]
    fn forged_or_bad_parts_are_refused() {
        let r = refusal(9);
        let ps = parts_of(&r);
        let mut re = Reassembly::new();
        let mut bad = ps[0].clone();
        bad.index = bad.count;
        assert_eq!(re.push(bad), Err(PartError::Invalid));
        let mut short = ps[0].clone();
        short.bytes.truncate(3);
        assert_eq!(re.push(short), Err(PartError::Invalid));
        let mut recount = ps[1].clone();
        re.push(ps[0].clone()).unwrap();
        recount.count += 1;
        recount.index = recount.count - 1;
        recount.bytes.truncate(1);
        assert_eq!(re.push(recount), Err(PartError::Inconsistent));
        // A digest that does not match the bytes: complete but corrupt, never delivered.
        let mut re = Reassembly::new();
        let n = ps.len();
        for (i, p) in ps.into_iter().enumerate() {
            let mut p = p;
            p.digest ^= 1;
            let got = re.push(p);
            if i + 1 < n {
                assert_eq!(got, Ok(None));
            } else {
                assert_eq!(got, Err(PartError::Corrupt));
            }
        }
        // Parts of another request id do not answer this one.
        let mut re = Reassembly::new();
        let mut last = Ok(None);
        for mut p in parts_of(&refusal(10)) {
            p.id = 11;
            last = re.push(p);
        }
        assert_eq!(last, Err(PartError::Corrupt));
    }

    #[test]
    fn digests_per_id_are_bounded() {
        let mut re = Reassembly::new();
        for k in 0..10u8 {
            let mut r = refusal(3);
            if let Err(e) = &mut r.result {
                let _ = e.reason.push(char::from(b'a' + k));
            }
            re.push(parts_of(&r)[0].clone()).unwrap();
        }
        assert_eq!(re.sets[&3].len(), Reassembly::DIGESTS_PER_ID);
        re.forget(3);
        assert_eq!(re.ids(), 0);
    }
}
