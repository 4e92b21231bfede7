//! `cvctl` library: the Creditvisor management agent (daemon, API, CLI client, live view) and its test
//! support (host simulator, fault-injecting proxy).
//!
//! Module map:
//! - [`policy`]: pure decisions (grants, pricing, replenishment, IOPS tiers, billing arithmetic).
//! - [`db`]: the durable SQLite ledger with migrations.
//! - [`link`]: transports (unix socket, TCP, serial).
//! - [`host`]: one host connection (framing, retries, resync, credit requests).
//! - [`agent`]: the daemon; [`api`]: its HTTP API and `/metrics`.
//! - [`client`], [`top`]: the CLI side.
//! - [`simhost`], [`proxy`]: a simulated host and a fault injector for end-to-end tests and demos.

pub mod agent;
pub mod api;
pub mod client;
pub mod db;
pub mod host;
pub mod link;
pub mod policy;
pub mod proxy;
pub mod simhost;
pub mod top;
