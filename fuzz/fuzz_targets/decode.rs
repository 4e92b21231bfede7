//! Fuzz target for the channel decoder: arbitrary bytes must never panic the decoder, and every frame it
//! delivers must re-encode to a frame that decodes to the same message (nothing half-parsed gets through).
//!
//! Random bytes almost never pass the CRC, so each input is also wrapped as the *body* of a well-formed frame
//! (right version, header and CRC): that drives the postcard decoding of hostile bodies, the surface behind
//! the CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::{FrameDecoder, FrameEncoder, ToAgent, ToHost, MAX_WIRE};

fn check<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + core::fmt::Debug>(data: &[u8]) {
    let mut dec = FrameDecoder::new();
    let mut got = Vec::new();
    dec.push_slice::<T>(data, |f| got.push(f));
    let stats = dec.stats();
    assert_eq!(stats.ok, got.len() as u64);
    for f in got {
        let mut enc = FrameEncoder::new(f.session, f.seq);
        let mut buf = [0u8; MAX_WIRE];
        let n = enc.encode(&f.msg, &mut buf).expect("a decoded message re-encodes");
        let mut again = FrameDecoder::new();
        let mut back = Vec::new();
        again.push_slice::<T>(&buf[..n], |g| back.push(g.msg));
        assert_eq!(back, vec![f.msg]);
    }
}

/// `0 cobs(version | session | seq | body | crc32) 0` around an arbitrary body.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut raw = vec![proto::PROTOCOL_VERSION];
    raw.extend_from_slice(&1u32.to_le_bytes());
    raw.extend_from_slice(&1u64.to_le_bytes());
    raw.extend_from_slice(body);
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    let mut out = vec![0u8; cobs::max_encoding_length(raw.len()) + 2];
    let n = cobs::encode(&raw, &mut out[1..]);
    out.truncate(n + 2);
    out[n + 1] = 0;
    out
}

fuzz_target!(|data: &[u8]| {
    check::<ToHost>(data);
    check::<ToAgent>(data);
    let wrapped = framed(data);
    check::<ToHost>(&wrapped);
    check::<ToAgent>(&wrapped);
});
