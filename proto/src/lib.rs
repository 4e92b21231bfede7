//! Creditvisor management channel: the messages exchanged between the hypervisor and `cvctl`, and their
//! framing (postcard in COBS frames with CRC-32). Shared by the kernel endpoint and the agent.
//!
//! Design: the core is `no_std` and allocation-free (bounded `heapless` strings and vectors, fixed decode
//! buffer), so the kernel can use it as is; the `std` feature adds conveniences for the agent.
//!
//! - [`msg`]: the versioned message catalogue ([`ToAgent`], [`ToHost`]).
//! - [`frame`]: [`FrameEncoder`] / [`FrameDecoder`] (COBS + CRC-32, resync on zero, counters, replay window).
//! - [`dedup`]: [`DedupWindow`], the host-side request-id window that makes commands idempotent.
//! - [`parts`]: long [`Response`]s in [`ResponsePart`]s, put together on the agent from parts of any attempt.
//!
//! Invariant: a byte stream that was corrupted, truncated or replayed never yields a message that the sender did
//! not send in that order; rejected frames are counted in [`DecodeStats`].
//!
//! # Kernel endpoint contract (what the hypervisor side must do; `cvctl simhost` does the same)
//! - On link-up and in answer to [`Command::Attach`], send [`ToAgent::Hello`] with a `boot_id` that changes on
//!   every boot; use a [`FrameEncoder`] whose session id differs per boot (e.g. the low bits of `boot_id`).
//! - Keep one [`FrameDecoder`] per link; execute each [`Request`] whose command
//!   [`is_state_changing`](Command::is_state_changing) only when a [`DedupWindow`] says [`Seen::New`]; answer
//!   `Duplicate` with the cached [`Response`] and `Stale` with [`ErrorCode::Stale`] (never execute it).
//! - Apply a [`Grant`] at most once per `grant_id` (the sched grant logic), answering [`Reply::GrantApplied`]
//!   with `duplicate: true` for a known id; refuse grants for unknown VMs/vCPUs with [`ErrorCode::NotFound`] (the
//!   agent refunds the pool).
//! - Send [`CreditRequest`]s with ids unique per boot; re-send the same id until a grant naming it
//!   (`credit_request_id`) or a [`Command::DenyCredit`] arrives.
//! - Number [`VmTelemetry`] snapshots with `seq` +1 per snapshot across the host; answer admission failures
//!   with [`ErrorCode::Admission`] and the numbers in the reason.
//! - Send a [`Response`] whose postcard body is longer than [`SPLIT_ABOVE`] bytes as [`ResponsePart`]s
//!   ([`outgoing`]), so one corrupt byte costs one part, not the whole answer.
//! - Send [`ToAgent::LinkStats`] (the host decoder's counters, overruns, dedup answers) with every telemetry
//!   round, so rejected frames are visible on the agent for both directions.
//! - Send one [`ToAgent::VmDestroyed`] after the last snapshot of a VM that stopped for good, and no telemetry for
//!   it afterwards.
//! - Announce [`caps::ANSWER_PARTS`] and [`caps::BALANCE_PAGES`] in the `Hello`; forget the agent's capabilities
//!   on every [`Command::Attach`] and take them from [`Command::AgentHello`] (a query: run it every time).
//! - Buffers: one [`MAX_WIRE`]-byte encode buffer; the encoder also uses [`MAX_RAW`] bytes of stack and the decoder
//!   holds [`MAX_ENCODED`] bytes.
//!
//! # Compatibility (agent and hosts of different builds)
//! Operators upgrade the agent and the hosts at different times, so every pair one change apart must work, and a
//! pair that cannot must say so at once instead of timing out.
//! - [`PROTOCOL_VERSION`] is the version byte of every frame and of [`Hello::version`]. It changes only when a
//!   field or a variant changes meaning; peers of different versions do not talk. The decoder drops their frames
//!   (`bad_version`) and names the peer's version ([`FrameDecoder::foreign_version`], from intact frames only);
//!   the agent then reports the host as `incompatible` (with both versions) in its host listing and refuses
//!   commands for it at once.
//! - Within one version, messages only grow at the end: new variants of [`Command`], [`Reply`] and [`ToAgent`]
//!   are appended, never inserted, and existing fields keep their encoding. A peer that meets a variant it does
//!   not know drops the frame as malformed (counted), so nothing new may be sent before the other side said it
//!   understands it:
//!   - host -> agent: the host lists what it answers and sends in [`Hello::capabilities`] ([`caps`]). The agent
//!     uses [`Command::ReadBalancesFrom`] only with [`caps::BALANCE_PAGES`] (otherwise [`Command::ReadBalances`]
//!     VM by VM), and so on for every later optional command;
//!   - agent -> host: after every `Hello` the agent sends [`Command::AgentHello`] with its own bits; the host
//!     sends [`ToAgent::ResponsePart`]s only to an agent that announced [`caps::ANSWER_PARTS`], and whole answers
//!     until then (and after every [`Command::Attach`], which may come from an older agent). A host that does
//!     not know `AgentHello` never answers it; the agent stops waiting after a short bounded time and carries on.
//! - A new optional message gets a new [`caps`] bit in the same change; a bit is never reused.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "std")]
extern crate std;

pub mod dedup;
pub mod frame;
pub mod msg;
pub mod parts;

pub use dedup::{DedupWindow, Seen};
pub use frame::{
    DecodeStats, EncodeError, Frame, FrameDecoder, FrameEncoder, MAX_ENCODED, MAX_PAYLOAD, MAX_RAW,
    MAX_WIRE,
};
pub use msg::*;
#[cfg(feature = "std")]
pub use parts::Reassembly;
pub use parts::{outgoing, Outgoing, PartError, Parts, ResponsePart, PART_BYTES, SPLIT_ABOVE};
