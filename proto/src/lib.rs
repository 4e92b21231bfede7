//! Creditvisor management channel: the messages exchanged between the hypervisor and `cvctl`, and their
//! framing (postcard in COBS frames with CRC-32). Shared by the kernel endpoint and the agent.
#![no_std]
#![forbid(unsafe_code)]
