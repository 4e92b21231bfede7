//! Fuzz target for the channel decoder: arbitrary bytes must never panic the decoder, and every frame it
//! delivers must re-encode to a frame that decodes to the same message (nothing half-parsed gets through).
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

fuzz_target!(|data: &[u8]| {
    check::<ToHost>(data);
    check::<ToAgent>(data);
});
