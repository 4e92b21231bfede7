//! The `cvctl agent` daemon: shared state, host tasks, periodic pool refills, and the HTTP API.
//!
//! Design: [`Shared`] is the one piece of state every task sees: the [`Store`] behind a mutex (locked only for
//! the duration of one database call, never across an `.await`), live per-host status, the latest telemetry
//! snapshot per VM (for `top`), counters for `/metrics`, and the request-id allocator. One task per host address
//! ([`crate::host::run`]) owns that host's connection.
//!
//! Invariants: request ids increase across restarts (seeded from the wall clock in microseconds, then
//! incremented), so a host's dedup window never confuses a new command with an old one.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::{DecodeStats, VmTelemetry};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::db::{Store, StoreError};
use crate::host::{self, HostCall};
use crate::link::Address;
use crate::policy::TierPolicy;

/// Unix time in milliseconds.
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Database file.
    pub db: PathBuf,
    /// Hosts to connect to.
    pub hosts: Vec<Address>,
    /// HTTP listen address (loopback by default).
    pub listen: String,
    /// Where to write the bound HTTP address once listening (for scripts and tests).
    pub ready_file: Option<PathBuf>,
    /// Re-send an unanswered command after this long.
    pub retry: Duration,
    /// Unanswered sends of the first page of a VM listing after which the agent asks with `ListVms` instead
    /// (a host that predates paging).
    pub max_attempts: u32,
    /// Give up on an API (or fire-and-forget) command this long after its first send; it is re-sent every
    /// `retry` until then.
    pub command_timeout: Duration,
    /// Automatic tier policy.
    pub tiers: TierPolicy,
    /// Price of one committed IOPS-month, micro-dollars.
    pub iops_month_micros: u64,
    /// Price of one overage IOPS-month, micro-dollars.
    pub overage_iops_month_micros: u64,
    /// Send `Command::AgentHello` after every Hello (so hosts send long answers in parts). Off only to behave as
    /// an agent from before it (compatibility tests).
    pub announce: bool,
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Frames sent.
    pub frames_out: AtomicU64,
    /// Credit requests received.
    pub credit_requests: AtomicU64,
    /// Grants sent (first sends).
    pub grants_sent: AtomicU64,
    /// Grants acknowledged.
    pub grants_acked: AtomicU64,
    /// Grants refunded.
    pub grants_refunded: AtomicU64,
    /// Credit requests denied.
    pub denials: AtomicU64,
    /// Command re-sends.
    pub retries: AtomicU64,
    /// Stale answers.
    pub stale: AtomicU64,
    /// Attaches sent again because the host's answer came without its Hello (a lost frame).
    pub reattaches: AtomicU64,
    /// Telemetry snapshots received.
    pub telemetry: AtomicU64,
    /// API commands the host refused.
    pub command_errors: AtomicU64,
    /// Commands answered (any origin).
    pub answered: AtomicU64,
    /// Sends (first sends and re-sends) of the answered commands: `answered / answered_sends` is the measured
    /// chance that one attempt's round trip arrived intact.
    pub answered_sends: AtomicU64,
    /// Parts of long answers received (`proto::parts`).
    pub parts: AtomicU64,
    /// Parts refused (invalid, inconsistent, or a complete set that failed its digest).
    pub parts_refused: AtomicU64,
}

/// Whether a host can work with this agent (the compatibility rule of the `proto` crate docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compat {
    /// No Hello and no frame of another version yet on this connection.
    #[default]
    Unknown,
    /// The host's Hello has this agent's protocol version.
    Ok,
    /// The host speaks another protocol version: commands for it are refused at once.
    Incompatible,
}

/// Live status of one host address.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostStatus {
    /// Address.
    pub address: String,
    /// Host id once known.
    pub host_id: Option<String>,
    /// Boot id once known.
    pub boot_id: u64,
    /// Connected now.
    pub connected: bool,
    /// Connections made.
    pub connects: u64,
    /// Decoder counters of the current connection.
    pub decode: DecodeStats,
    /// Telemetry sequence numbers missed.
    pub telemetry_gaps: u64,
    /// Last telemetry sequence number.
    pub last_seq: Option<u64>,
    /// The host's own link counters (its decoder, overruns, dedup answers), as last reported.
    pub host_link: Option<proto::LinkStats>,
    /// Compatibility with this agent: `unknown` (no Hello yet), `ok`, or `incompatible` (see `incompatible`).
    pub compat: Compat,
    /// Why the host is incompatible (protocol versions of both sides), while it is.
    pub incompatible: Option<String>,
    /// Protocol version of the host's last Hello (or of its frames, when they were refused for it).
    pub protocol: Option<u8>,
    /// The host's capability bits (`proto::caps`) from its last Hello.
    pub capabilities: u32,
    /// Whether the host acknowledged the agent's `AgentHello` this session (`false`: a host from before it, which
    /// answers whole; `None`: not known yet).
    pub agent_hello_acked: Option<bool>,
}

/// Latest telemetry of a VM.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetryEntry {
    /// When received (unix ms).
    pub at_ms: i64,
    /// The snapshot.
    pub snapshot: VmTelemetry,
}

/// State shared by all tasks of the daemon.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub cfg: AgentConfig,
    store: Mutex<Store>,
    /// Status per host address.
    pub hosts: Mutex<BTreeMap<String, HostStatus>>,
    /// Command channels by host id.
    pub links: Mutex<HashMap<String, mpsc::Sender<HostCall>>>,
    /// Latest telemetry per (host, VM).
    pub telemetry: Mutex<BTreeMap<(String, u32), TelemetryEntry>>,
    /// Counters.
    pub metrics: Metrics,
    next_request: AtomicU64,
    next_session: AtomicU32,
}

impl Shared {
    /// Builds the shared state around an open store.
    #[must_use]
    pub fn new(cfg: AgentConfig, store: Store) -> Self {
        let seed = u64::try_from(now_ms()).unwrap_or(0).saturating_mul(1000);
        let hosts = cfg
            .hosts
            .iter()
            .map(|a| {
                (
                    a.to_string(),
                    HostStatus {
                        address: a.to_string(),
                        ..HostStatus::default()
                    },
                )
            })
            .collect();
        Self {
            cfg,
            store: Mutex::new(store),
            hosts: Mutex::new(hosts),
            links: Mutex::new(HashMap::new()),
            telemetry: Mutex::new(BTreeMap::new()),
            metrics: Metrics::default(),
            next_request: AtomicU64::new(seed.max(1)),
            next_session: AtomicU32::new(u32::try_from(seed % u64::from(u32::MAX)).unwrap_or(1)),
        }
    }

    /// Runs `f` with the store locked.
    ///
    /// # Errors
    /// Whatever `f` returns; a poisoned lock is reported as a conflict.
    pub fn with_store<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut g = self
            .store
            .lock()
            .map_err(|_| StoreError::Conflict("store lock poisoned".into()))?;
        f(&mut g)
    }

    /// Next request id.
    pub fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    /// Next frame session id.
    pub fn next_frame_session(&self) -> u32 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    fn with_host(&self, key: &str, f: impl FnOnce(&mut HostStatus)) {
        if let Ok(mut h) = self.hosts.lock() {
            f(h.entry(key.to_string()).or_default());
        }
    }

    /// Marks a host (dis)connected.
    pub fn set_connected(&self, key: &str, connected: bool) {
        self.with_host(key, |h| {
            h.connected = connected;
            if connected {
                h.connects += 1;
                h.decode = DecodeStats::default();
                h.compat = Compat::Unknown;
                h.incompatible = None;
                h.agent_hello_acked = None;
            }
        });
    }

    /// Records the host id behind an address.
    pub fn set_host_id(&self, key: &str, host: &str, boot_id: u64) {
        self.with_host(key, |h| {
            h.host_id = Some(host.into());
            h.boot_id = boot_id;
        });
    }

    /// Records a compatible Hello: its version and capabilities.
    pub fn set_hello(&self, key: &str, version: u8, capabilities: u32) {
        self.with_host(key, |h| {
            h.compat = Compat::Ok;
            h.incompatible = None;
            h.protocol = Some(version);
            h.capabilities = capabilities;
            h.agent_hello_acked = None;
        });
    }

    /// Records a host speaking another protocol version.
    pub fn set_incompatible(&self, key: &str, version: u8, reason: &str) {
        self.with_host(key, |h| {
            h.compat = Compat::Incompatible;
            h.incompatible = Some(reason.into());
            h.protocol = Some(version);
            h.capabilities = 0;
            h.agent_hello_acked = None;
        });
    }

    /// Records whether the host acknowledged `AgentHello`.
    pub fn set_agent_hello_acked(&self, key: &str, acked: bool) {
        self.with_host(key, |h| h.agent_hello_acked = Some(acked));
    }

    /// The capability bits announced by host `host` (by host id) in its last Hello, if it is connected.
    pub fn host_capabilities(&self, host: &str) -> Option<u32> {
        let hosts = self.hosts.lock().ok()?;
        hosts
            .values()
            .find(|h| h.connected && h.host_id.as_deref() == Some(host) && h.compat == Compat::Ok)
            .map(|h| h.capabilities)
    }

    /// Why host `host` (by host id) cannot be used, when it was identified before and speaks another protocol
    /// version now.
    pub fn host_incompatible(&self, host: &str) -> Option<String> {
        let hosts = self.hosts.lock().ok()?;
        hosts
            .values()
            .find(|h| h.host_id.as_deref() == Some(host) && h.incompatible.is_some())
            .and_then(|h| h.incompatible.clone())
    }

    /// Records decoder counters.
    pub fn set_decode_stats(&self, key: &str, stats: DecodeStats) {
        self.with_host(key, |h| h.decode = stats);
    }

    /// Records the host's report of its end of the link.
    pub fn set_host_link(&self, key: &str, stats: proto::LinkStats) {
        self.with_host(key, |h| h.host_link = Some(stats));
    }

    /// Tracks telemetry sequence gaps.
    pub fn note_telemetry_seq(&self, key: &str, seq: u64) {
        self.with_host(key, |h| {
            if let Some(last) = h.last_seq {
                if seq > last + 1 {
                    h.telemetry_gaps += seq - last - 1;
                }
            }
            h.last_seq = Some(seq);
        });
    }

    /// The command channel of a host id.
    #[must_use]
    pub fn link(&self, host: &str) -> Option<mpsc::Sender<HostCall>> {
        self.links.lock().ok().and_then(|l| l.get(host).cloned())
    }
}

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Socket or file.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the daemon until the process is stopped.
///
/// # Errors
/// If the database cannot be opened or the API address cannot be bound.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let store = Store::open(&cfg.db)?;
    let shared = Arc::new(Shared::new(cfg.clone(), store));
    for addr in &cfg.hosts {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(host::run(shared.clone(), addr.clone(), rx, tx));
    }
    let refills = shared.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_secs(1));
        loop {
            iv.tick().await;
            match refills.with_store(|s| s.periodic_refills(now_ms())) {
                Ok(0) => {}
                Ok(n) => tracing::info!("{n} periodic pool refills"),
                Err(e) => tracing::error!("periodic refills: {e}"),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(&cfg.listen).await?;
    let bound = listener.local_addr()?;
    tracing::info!("API on http://{bound}");
    if let Some(path) = &cfg.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bound.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    axum::serve(listener, crate::api::router(shared)).await?;
    Ok(())
}
