//! Creditvisor management channel: the messages exchanged between the hypervisor and `cvctl`, and their
//! framing (postcard in COBS frames with CRC-32). Shared by the kernel endpoint and the agent.
//!
//! Design: the core is `no_std` and allocation-free (bounded `heapless` strings and vectors, fixed decode
//! buffer), so the kernel can use it as is; the `std` feature adds conveniences for the agent.
//!
//! - [`msg`]: the versioned message catalogue ([`ToAgent`], [`ToHost`]).
//! - [`frame`]: [`FrameEncoder`] / [`FrameDecoder`] (COBS + CRC-32, resync on zero, counters, replay window).
//! - [`dedup`]: [`DedupWindow`], the host-side request-id window that makes commands idempotent.
//!
//! Invariant: a byte stream that was corrupted, truncated or replayed never yields a message that the sender did
//! not send in that order; rejected frames are counted in [`DecodeStats`].
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "std")]
extern crate std;

pub mod dedup;
pub mod frame;
pub mod msg;

pub use dedup::{DedupWindow, Seen};
pub use frame::{
    DecodeStats, EncodeError, Frame, FrameDecoder, FrameEncoder, MAX_ENCODED, MAX_PAYLOAD, MAX_WIRE,
};
pub use msg::*;
