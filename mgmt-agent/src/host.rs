//! One host connection of the agent: framing, request ids, retries, and the handling of everything the host
//! sends (hello, telemetry, credit requests, responses).
//!
//! Design: one task per configured host address. It (re)connects with a capped backoff; each connection is a
//! *session* with its own frame decoder (fresh replay window) and encoder (fresh frame session id). Commands are
//! sent with agent-unique increasing request ids and re-sent with the same id until answered (the host's dedup
//! window makes that safe). On every hello the agent resynchronises: it re-reads the VM list (page by page), re-sends
//! every grant that is debited but not acknowledged, and re-sends commitment changes still pending.
//!
//! Handshake: a session starts with [`Command::Attach`], which the host answers with a [`ToAgent::Hello`] *and* a
//! `Reply::Ack` in two frames. On a lossy link either may be lost alone, so the session is not identified by the
//! Ack: until a Hello has arrived, every Ack to an Attach sends a fresh Attach, and an unanswered Attach is re-sent
//! for as long as the session lasts (it never expires). The same holds for the resynchronisation's list and
//! describe commands: without them the session is connected but useless, so they are retried until answered
//! (only API commands and fire-and-forget commands give up, `command_timeout` after their first send).
//!
//! Compatibility (the rule in the `proto` crate docs): after every Hello the agent announces what it reads with
//! `Command::AgentHello`. A host whose Hello announced `caps::ANSWER_PARTS` knows that command, so it is re-sent
//! until answered, like the handshake (on a noisy link four sends can all be lost, and the host would then answer
//! whole for the whole connection); a host from before it never answers, so there it is given up after a few
//! retry intervals, and nothing waits on it, since such a host answers whole. The host's capability bits are kept in the host status,
//! so the API uses optional commands (balance pages) only with hosts that announced them. A host whose intact
//! frames or Hello carry another protocol version is marked `incompatible`, logged once, and its commands fail at
//! once ([`CallError::Incompatible`]) instead of timing out; its first compatible Hello clears that.
//!
//! Long answers come in parts (`proto::parts`): the parts are kept per request id across retries, and the answer
//! is handled once one answer's parts are all there, so a retry only has to bring the parts still missing.
//!
//! Invariants:
//! - A credit request is answered only from a committed database transaction ([`crate::db::Store`]), so the
//!   pool is debited before the grant leaves the agent; the grant is marked applied only on the host's answer.
//! - No lock is held across an `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{
    Command, CommandError, ErrorCode, FrameDecoder, FrameEncoder, Reply, Request, Response,
    ToAgent, ToHost,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::agent::{now_ms, Shared, TelemetryEntry};
use crate::db::{CommitmentView, CreditOutcome};
use crate::link::{self, Address};

/// Why a command sent to a host did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The host is not connected.
    #[error("host not connected: {0}")]
    NotConnected(String),
    /// No intact answer within the command's time budget (`--command-timeout-ms`), after this many sends.
    #[error("no answer from the host within {waited_ms} ms ({attempts} attempts)")]
    Timeout {
        /// Sends of the command (the first one and the re-sends).
        attempts: u32,
        /// Time since the first send.
        waited_ms: u64,
    },
    /// The host answered with an error.
    #[error("host refused: {0:?}: {1}")]
    Host(ErrorCode, String),
    /// The host speaks another protocol version (the reason names both); nothing was sent.
    #[error("host incompatible: {0}")]
    Incompatible(String),
}

impl From<CommandError> for CallError {
    fn from(e: CommandError) -> Self {
        Self::Host(e.code, e.reason.as_str().into())
    }
}

/// Result of a call.
pub type CallResult = Result<Reply, CallError>;

/// A command from the API for a host.
#[derive(Debug)]
pub struct HostCall {
    /// The command.
    pub command: Command,
    /// Where the answer goes.
    pub reply: oneshot::Sender<CallResult>,
    /// Set for a volume commitment change: the answer is also recorded in the database.
    pub commitment: Option<CommitmentView>,
}

enum Origin {
    Api(oneshot::Sender<CallResult>),
    Grant(u64),
    /// The session's handshake: retried until a `Hello` arrives.
    Attach,
    /// A page of the VM listing number `.0` of this session (see [`Listing`]).
    Resync(u64),
    Describe,
    Commitment(CommitmentView, Option<oneshot::Sender<CallResult>>),
    Fire,
    /// The agent's capabilities after a Hello: re-sent until answered by a host that announced answer parts; a
    /// host from before `AgentHello` never answers, so there it is given up after [`agent_hello_wait`] (the host
    /// then sends whole answers, which the agent reads as well).
    AgentHello,
}

/// How long the agent waits for the answer to its `AgentHello` before taking the host for one from before it:
/// a few re-sends, and never longer than an API command's budget.
fn agent_hello_wait(cfg: &crate::agent::AgentConfig) -> Duration {
    (cfg.retry * 4).min(cfg.command_timeout)
}

struct Pending {
    command: Command,
    origin: Origin,
    /// First send: API and fire-and-forget commands give up `command_timeout` after it.
    first: Instant,
    /// Latest send.
    sent: Instant,
    attempts: u32,
}

/// What this agent understands beyond the first catalogue (`proto::caps`), announced with `AgentHello`.
pub const AGENT_CAPABILITIES: u32 = proto::caps::ANSWER_PARTS;

/// Runs the connection loop of one host address forever.
pub async fn run(
    shared: Arc<Shared>,
    addr: Address,
    mut calls: mpsc::Receiver<HostCall>,
    me: mpsc::Sender<HostCall>,
) {
    let key = addr.to_string();
    let mut backoff = Duration::from_millis(50);
    loop {
        let conn = tokio::select! {
            c = link::connect(&addr) => c,
            Some(call) = calls.recv() => {
                let _ = call.reply.send(Err(CallError::NotConnected(key.clone())));
                continue;
            }
        };
        match conn {
            Ok(stream) => {
                backoff = Duration::from_millis(50);
                shared.set_connected(&key, true);
                tracing::info!(host = %key, "connected");
                session(&shared, &key, stream, &mut calls, &me).await;
                shared.set_connected(&key, false);
                tracing::warn!(host = %key, "disconnected");
            }
            Err(e) => tracing::debug!(host = %key, "connect failed: {e}"),
        }
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                Some(call) = calls.recv() => { let _ = call.reply.send(Err(CallError::NotConnected(key.clone()))); }
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

struct Session<'a> {
    shared: &'a Arc<Shared>,
    key: &'a str,
    out: mpsc::UnboundedSender<ToHost>,
    pending: HashMap<u64, Pending>,
    grants_in_flight: HashSet<u64>,
    commitments_in_flight: HashSet<(u32, u16)>,
    /// VMs of this host boot known destroyed (from `VmDestroyed` or a resync's list): kept out of the live
    /// telemetry even if a last snapshot arrives late (it is still recorded for usage).
    destroyed: HashSet<u32>,
    host: Option<(String, u64)>,
    listing: Listing,
    /// Parts of long answers to pending requests (`proto::parts`), kept across retries.
    parts: proto::Reassembly,
    me: &'a mpsc::Sender<HostCall>,
    /// Set while the host speaks another protocol version: why (both versions). Commands are refused at once.
    incompatible: Option<String>,
    /// The decoder's `bad_version` count already looked at.
    bad_version_seen: u64,
    /// Capability bits of the host's latest Hello (`proto::caps`).
    host_caps: u32,
}

/// Most VMs one listing accepts (a host's table holds [`proto::MAX_HOST_VMS`]; the margin leaves room for larger
/// hosts but bounds what a misbehaving one can make the agent store).
const MAX_LISTED: usize = 64 * proto::MAX_HOST_VMS;

/// The VM listing being read page by page (`ListVmsFrom`). A new listing (a Hello, a VM created or destroyed)
/// abandons the one in progress: pages answering an older generation are ignored, so the database is only ever
/// replaced by one complete listing.
#[derive(Default)]
struct Listing {
    generation: u64,
    vms: Vec<proto::VmSummary>,
}

async fn session(
    shared: &Arc<Shared>,
    key: &str,
    stream: link::BoxStream,
    calls: &mut mpsc::Receiver<HostCall>,
    me: &mpsc::Sender<HostCall>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (out, mut out_rx) = mpsc::unbounded_channel::<ToHost>();
    let frame_session = shared.next_frame_session();
    let metrics = shared.clone();
    let mut writer = tokio::spawn(async move {
        let mut enc = FrameEncoder::new(frame_session, 1);
        while let Some(m) = out_rx.recv().await {
            match enc.encode_vec(&m) {
                Ok(bytes) => {
                    if wr.write_all(&bytes).await.is_err() {
                        return;
                    }
                    metrics
                        .metrics
                        .frames_out
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => tracing::error!("cannot encode {m:?}: {e}"),
            }
        }
    });
    let mut s = Session {
        shared,
        key,
        out,
        pending: HashMap::new(),
        grants_in_flight: HashSet::new(),
        commitments_in_flight: HashSet::new(),
        destroyed: HashSet::new(),
        host: None,
        listing: Listing::default(),
        parts: proto::Reassembly::new(),
        me,
        incompatible: None,
        bad_version_seen: 0,
        host_caps: 0,
    };
    s.send(Command::Attach, Origin::Attach);
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    let mut retry = tokio::time::interval(shared.cfg.retry / 2);
    loop {
        tokio::select! {
            r = rd.read(&mut buf) => {
                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                let mut msgs = Vec::new();
                dec.push_slice::<ToAgent>(&buf[..n], |f| msgs.push(f.msg));
                shared.set_decode_stats(key, dec.stats());
                let bad_version = dec.stats().bad_version;
                if bad_version > s.bad_version_seen {
                    s.bad_version_seen = bad_version;
                    if let Some(v) = dec.foreign_version() {
                        s.incompatible_with(v);
                    }
                }
                for m in msgs {
                    s.handle(m);
                }
            }
            Some(call) = calls.recv() => match (&s.incompatible, call.commitment) {
                (Some(why), _) => {
                    let _ = call.reply.send(Err(CallError::Incompatible(why.clone())));
                }
                (None, Some(c)) => s.send_commitment(c, Some(call.reply)),
                (None, None) => s.send(call.command, Origin::Api(call.reply)),
            },
            _ = retry.tick() => s.retry(),
            _ = &mut writer => break,
        }
    }
    writer.abort();
    if let Some((host, _)) = &s.host {
        shared.links.lock().map(|mut l| l.remove(host)).ok();
    }
    for (_, p) in s.pending.drain() {
        match p.origin {
            Origin::Api(tx) | Origin::Commitment(_, Some(tx)) => {
                let _ = tx.send(Err(CallError::NotConnected(key.into())));
            }
            _ => {}
        }
    }
}

impl Session<'_> {
    fn send(&mut self, command: Command, origin: Origin) {
        let id = self.shared.next_request_id();
        let _ = self.out.send(ToHost::Request(Request {
            id,
            command: command.clone(),
        }));
        self.pending.insert(
            id,
            Pending {
                command,
                origin,
                first: Instant::now(),
                sent: Instant::now(),
                attempts: 1,
            },
        );
    }

    fn retry(&mut self) {
        let retry = self.shared.cfg.retry;
        let max = self.shared.cfg.max_attempts;
        let budget = self.shared.cfg.command_timeout;
        let mut expired = Vec::new();
        for (id, p) in &mut self.pending {
            if p.sent.elapsed() < retry {
                continue;
            }
            // The handshake and the resynchronisation never expire (see the module docs); grants and
            // commitment changes are settled by their own ids and re-sent until answered. API commands are
            // re-sent for a time, not a number of attempts: on a noisy link an attempt may fail many times in a
            // row (a long answer more often than a short one), while the host still answers every one.
            if p.first.elapsed() >= budget && matches!(p.origin, Origin::Api(_) | Origin::Fire) {
                expired.push(*id);
                continue;
            }
            if matches!(p.origin, Origin::AgentHello)
                && self.host_caps & proto::caps::ANSWER_PARTS == 0
                && p.first.elapsed() >= agent_hello_wait(&self.shared.cfg)
            {
                expired.push(*id);
                continue;
            }
            if p.attempts == max
                && matches!(p.origin, Origin::Resync(_))
                && p.command == (Command::ListVmsFrom { first: 0 })
            {
                // A host that predates paging drops `ListVmsFrom` as a malformed frame and never answers: ask
                // for the single-reply list (its first MAX_VMS VMs) instead.
                tracing::warn!(host = %self.key, "no answer to ListVmsFrom after {max} attempts; falling back to ListVms");
                p.command = Command::ListVms;
            }
            p.attempts += 1;
            p.sent = Instant::now();
            self.shared
                .metrics
                .retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = self.out.send(ToHost::Request(Request {
                id: *id,
                command: p.command.clone(),
            }));
        }
        for id in expired {
            self.parts.forget(id);
            match self.pending.remove(&id) {
                Some(Pending {
                    origin: Origin::Api(tx),
                    attempts,
                    first,
                    command,
                    ..
                }) => {
                    let waited_ms = u64::try_from(first.elapsed().as_millis()).unwrap_or(u64::MAX);
                    tracing::warn!(
                        host = %self.key,
                        id,
                        attempts,
                        waited_ms,
                        "API command {} given up: no intact answer",
                        command_name(&command)
                    );
                    let _ = tx.send(Err(CallError::Timeout {
                        attempts,
                        waited_ms,
                    }));
                }
                Some(Pending {
                    origin: Origin::AgentHello,
                    attempts,
                    ..
                }) => {
                    tracing::info!(
                        host = %self.key,
                        attempts,
                        "AgentHello not answered: a host from before it; it sends whole answers, which this agent reads"
                    );
                    self.shared.set_agent_hello_acked(self.key, false);
                }
                Some(Pending {
                    command, attempts, ..
                }) => {
                    tracing::warn!(host = %self.key, "no answer to {command:?} after {attempts} attempts; given up");
                }
                None => {}
            }
        }
    }

    fn handle(&mut self, m: ToAgent) {
        let now = now_ms();
        match m {
            ToAgent::Hello(h) => self.hello(&h, now),
            ToAgent::Telemetry(t) => self.telemetry(t, now),
            ToAgent::CreditRequest(r) => {
                let Some((host, boot)) = self.host.clone() else {
                    return; // not identified yet: the host retries the request
                };
                self.shared
                    .metrics
                    .credit_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let outcome = self
                    .shared
                    .with_store(|st| st.handle_credit_request(&host, boot, &r, now));
                match outcome {
                    Ok(CreditOutcome::Grants(gs)) => {
                        for g in gs {
                            self.send_grant(g);
                        }
                    }
                    Ok(CreditOutcome::Deny(reason)) => {
                        self.shared
                            .metrics
                            .denials
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        self.send(
                            Command::DenyCredit {
                                credit_request_id: r.request_id,
                                reason: proto::truncated(&reason),
                            },
                            Origin::Fire,
                        );
                    }
                    // Nothing was debited (the transaction rolled back); the host will ask again.
                    Err(e) => {
                        tracing::error!(host, "credit request {} not answered: {e}", r.request_id)
                    }
                }
            }
            ToAgent::Response(r) => self.response(r, now),
            ToAgent::LinkStats(l) => self.shared.set_host_link(self.key, l),
            ToAgent::VmDestroyed(d) => self.vm_destroyed(d, now),
            ToAgent::ResponsePart(p) => self.response_part(p, now),
        }
    }

    /// A VM stopped for good: recorded as destroyed, and its last snapshot leaves the live telemetry (so `top`
    /// and `/v1/telemetry` stop showing it; `cvctl vms` shows it as `Destroyed`).
    fn vm_destroyed(&mut self, d: proto::VmDestroyed, now: i64) {
        let Some((host, _)) = self.host.clone() else {
            return;
        };
        tracing::info!(host, vm = d.vm, last_seq = d.last_seq, "VM destroyed");
        if let Err(e) = self
            .shared
            .with_store(|st| st.vm_destroyed(&host, d.vm, now))
        {
            tracing::error!("recording VM {} destroyed: {e}", d.vm);
        }
        self.forget_vm(host, d.vm);
    }

    /// Keeps a destroyed VM out of the live telemetry from now on.
    fn forget_vm(&mut self, host: String, vm: u32) {
        self.destroyed.insert(vm);
        if let Ok(mut map) = self.shared.telemetry.lock() {
            map.remove(&(host, vm));
        }
    }

    fn send_grant(&mut self, g: proto::Grant) {
        if self.grants_in_flight.insert(g.grant_id) {
            self.shared
                .metrics
                .grants_sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = g.grant_id;
            self.send(Command::ApplyGrant(g), Origin::Grant(id));
        }
    }

    /// The host speaks protocol `version`, not this agent's: says so once (log line, host listing), refuses the
    /// API commands waiting for it and every later one at once, and keeps the session open (the `Attach` re-sends
    /// go on), so a host restarted with a compatible build is taken up again by its first Hello.
    fn incompatible_with(&mut self, version: u8) {
        let why = format!(
            "host at {} speaks management protocol version {version}, this agent speaks version {}; upgrade the older side",
            self.key,
            proto::PROTOCOL_VERSION
        );
        if self.incompatible.as_deref() == Some(why.as_str()) {
            return;
        }
        tracing::error!(host = %self.key, "{why}");
        self.shared.set_incompatible(self.key, version, &why);
        if let Some((host, _)) = self.host.take() {
            if let Ok(mut l) = self.shared.links.lock() {
                l.remove(&host);
            }
        }
        let refused: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.origin, Origin::Api(_) | Origin::Commitment(_, Some(_))))
            .map(|(id, _)| *id)
            .collect();
        for id in refused {
            if let Some(p) = self.pending.remove(&id) {
                let tx = match p.origin {
                    Origin::Api(tx) => tx,
                    // Still `pending` in the database: re-sent by the resynchronisation of a compatible Hello.
                    Origin::Commitment(c, Some(tx)) => {
                        self.commitments_in_flight.remove(&(c.vm, c.volume));
                        tx
                    }
                    _ => continue,
                };
                let _ = tx.send(Err(CallError::Incompatible(why.clone())));
            }
        }
        self.incompatible = Some(why);
    }

    fn hello(&mut self, h: &proto::Hello, now: i64) {
        if h.version != proto::PROTOCOL_VERSION {
            self.incompatible_with(h.version);
            return;
        }
        if self.incompatible.take().is_some() {
            tracing::info!(host = %self.key, "host now speaks protocol {}: compatible again", h.version);
        }
        self.shared.set_hello(self.key, h.version, h.capabilities);
        self.host_caps = h.capabilities;
        // Every Hello may come from a restarted host (or follow an Attach), which forgets what this agent reads.
        if self.shared.cfg.announce {
            self.pending
                .retain(|_, p| !matches!(p.origin, Origin::AgentHello));
            self.send(
                Command::AgentHello {
                    capabilities: AGENT_CAPABILITIES,
                },
                Origin::AgentHello,
            );
        }
        let host = h.host_id.as_str().to_string();
        let first = self.host.as_ref() != Some(&(host.clone(), h.boot_id));
        if first {
            tracing::info!(host = %self.key, host_id = %host, boot_id = h.boot_id, "host identified; resynchronising");
        }
        self.host = Some((host.clone(), h.boot_id));
        if let Err(e) = self
            .shared
            .with_store(|st| st.upsert_host(h, self.key, now))
        {
            tracing::error!("recording host {host}: {e}");
        }
        if first {
            // VM ids belong to one boot of the host.
            self.destroyed.clear();
        }
        self.shared.set_host_id(self.key, &host, h.boot_id);
        if let Ok(mut l) = self.shared.links.lock() {
            l.insert(host.clone(), self.me.clone());
        }
        if !first {
            return;
        }
        // Resynchronise: VM list, grants not acknowledged, commitment changes not answered.
        self.list_vms();
        match self.shared.with_store(|st| st.unacked_grants(&host)) {
            Ok(gs) => {
                if !gs.is_empty() {
                    tracing::info!(host, "re-sending {} unacknowledged grants", gs.len());
                }
                for g in gs {
                    self.send_grant(g);
                }
            }
            Err(e) => tracing::error!("reading unacknowledged grants: {e}"),
        }
        if let Ok(cs) = self.shared.with_store(|st| st.commitments()) {
            for c in cs
                .into_iter()
                .filter(|c| c.host_id == host && c.status == "pending")
            {
                self.send_commitment(c, None);
            }
        }
    }

    /// Starts a new VM listing from the first page.
    fn list_vms(&mut self) {
        self.listing.generation += 1;
        self.listing.vms.clear();
        self.send(
            Command::ListVmsFrom { first: 0 },
            Origin::Resync(self.listing.generation),
        );
    }

    /// One answer of listing `generation`: asks for the next page, or records the complete listing.
    fn vm_page(
        &mut self,
        generation: u64,
        asked: &Command,
        result: Result<Reply, CommandError>,
        now: i64,
    ) {
        if generation != self.listing.generation {
            return; // a newer listing is under way
        }
        let first = match asked {
            Command::ListVmsFrom { first } => *first,
            _ => 0,
        };
        match result {
            Ok(Reply::VmPage { vms, next }) => {
                // Every entry must be at or after `first` and the next page must start past this one, so a
                // listing always ends.
                let last = vms.last().map(|v| v.vm);
                let ordered =
                    vms.iter().all(|v| v.vm >= first) && vms.windows(2).all(|w| w[0].vm < w[1].vm);
                let progresses = match (next, last) {
                    (None, _) => true,
                    (Some(n), Some(l)) => n > l,
                    (Some(_), None) => false,
                };
                if !ordered || !progresses || self.listing.vms.len() + vms.len() > MAX_LISTED {
                    tracing::error!(host = %self.key, "VM listing page from {first} is inconsistent (next {next:?}); listing abandoned");
                    return;
                }
                self.listing.vms.extend(vms);
                match next {
                    Some(n) => self.send(
                        Command::ListVmsFrom { first: n },
                        Origin::Resync(generation),
                    ),
                    None => {
                        let vms = core::mem::take(&mut self.listing.vms);
                        self.record_listing(&vms, now);
                    }
                }
            }
            // A host without paging answers the first page only.
            Ok(Reply::VmList(vms)) => {
                if vms.len() == proto::MAX_VMS {
                    tracing::warn!(host = %self.key, "the host lists without paging: VMs past the first {} may be missing", proto::MAX_VMS);
                }
                self.record_listing(&vms, now);
            }
            Ok(other) => {
                tracing::error!(host = %self.key, "unexpected answer to a VM listing: {other:?}");
            }
            Err(e) if e.code == ErrorCode::Unsupported => {
                self.send(Command::ListVms, Origin::Resync(generation));
            }
            Err(e) => {
                tracing::error!(host = %self.key, "VM listing refused: {:?} {}", e.code, e.reason);
            }
        }
    }

    /// A complete VM list: replaces the host's VMs in the database and describes each (commitments).
    fn record_listing(&mut self, vms: &[proto::VmSummary], now: i64) {
        let Some((host, _)) = self.host.clone() else {
            return;
        };
        if let Err(e) = self.shared.with_store(|st| st.replace_vms(&host, vms, now)) {
            tracing::error!("recording VM list: {e}");
        }
        for v in vms.iter().filter(|v| v.state == proto::VmState::Destroyed) {
            self.forget_vm(host.clone(), v.vm);
        }
        for v in vms {
            self.send(Command::DescribeVm { vm: v.vm }, Origin::Describe);
        }
    }

    fn send_commitment(&mut self, c: CommitmentView, reply: Option<oneshot::Sender<CallResult>>) {
        self.commitments_in_flight.insert((c.vm, c.volume));
        let cmd = Command::SetVolumeCommitment {
            vm: c.vm,
            volume: c.volume,
            committed_iops: c.committed_iops,
            limit_iops: c.limit_iops,
        };
        self.send(cmd, Origin::Commitment(c, reply));
    }

    fn telemetry(&mut self, t: proto::VmTelemetry, now: i64) {
        let Some((host, _)) = self.host.clone() else {
            return;
        };
        self.shared
            .metrics
            .telemetry
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.note_telemetry_seq(self.key, t.seq);
        if let Err(e) = self
            .shared
            .with_store(|st| st.record_telemetry(&host, &t, now))
        {
            tracing::error!("recording telemetry: {e}");
        }
        if self.destroyed.contains(&t.vm) {
            return; // a destroyed VM's last window: recorded above, not shown live
        }
        let proposals: Vec<CommitmentView> = t
            .volumes
            .iter()
            .filter(|v| !self.commitments_in_flight.contains(&(t.vm, v.volume)))
            .filter_map(|v| {
                self.shared
                    .with_store(|st| {
                        st.tier_proposal(&host, t.vm, v.volume, &self.shared.cfg.tiers)
                    })
                    .ok()
                    .flatten()
            })
            .collect();
        if let Ok(mut map) = self.shared.telemetry.lock() {
            map.insert(
                (host.clone(), t.vm),
                TelemetryEntry {
                    at_ms: now,
                    snapshot: t,
                },
            );
        }
        for c in proposals {
            tracing::info!(
                host,
                vm = c.vm,
                volume = c.volume,
                "automatic tier -> {} IOPS",
                c.committed_iops
            );
            if self
                .shared
                .with_store(|st| st.commitment_asked(&c, now))
                .is_ok()
            {
                self.send_commitment(c, None);
            }
        }
    }

    /// A part of a long answer: kept until every part of one answer is there (from any of the attempts).
    fn response_part(&mut self, part: proto::ResponsePart, now: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.pending.contains_key(&part.id) {
            return; // answer to a retry already answered (or never asked)
        }
        self.shared.metrics.parts.fetch_add(1, Relaxed);
        let id = part.id;
        match self.parts.push(part) {
            Ok(Some(r)) => self.response(r, now),
            Ok(None) => {}
            Err(e) => {
                self.shared.metrics.parts_refused.fetch_add(1, Relaxed);
                tracing::warn!(host = %self.key, id, "part of an answer refused: {e:?}");
            }
        }
    }

    fn response(&mut self, r: Response, now: i64) {
        self.parts.forget(r.id);
        let Some(p) = self.pending.remove(&r.id) else {
            return; // answer to a retry already answered
        };
        let m = &self.shared.metrics;
        m.answered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.answered_sends
            .fetch_add(u64::from(p.attempts), std::sync::atomic::Ordering::Relaxed);
        if matches!(p.origin, Origin::Api(_)) {
            tracing::info!(
                host = %self.key,
                id = r.id,
                attempts = p.attempts,
                ok = r.result.is_ok(),
                "API command {} answered",
                command_name(&p.command)
            );
        }
        let stale = matches!(&r.result, Err(e) if e.code == ErrorCode::Stale);
        if stale {
            // The host cannot tell whether it ran this id: send the same intent under a fresh id. Only
            // idempotent-by-content commands are re-sent (grants by grant id, commitments by value).
            self.shared
                .metrics
                .stale
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match p.origin {
                Origin::Grant(_)
                | Origin::Attach
                | Origin::Commitment(..)
                | Origin::Resync(_)
                | Origin::Describe
                | Origin::AgentHello
                | Origin::Fire => {
                    self.send(p.command, p.origin);
                    return;
                }
                Origin::Api(tx) => {
                    let _ = tx.send(r.result.map_err(CallError::from));
                    return;
                }
            }
        }
        match p.origin {
            Origin::Api(tx) => {
                let changes_vms = matches!(
                    p.command,
                    Command::CreateVm { .. }
                        | Command::CreateVmConfig { .. }
                        | Command::StartVm { .. }
                        | Command::PauseVm { .. }
                        | Command::ResumeVm { .. }
                        | Command::DestroyVm { .. }
                );
                if r.result.is_err() {
                    self.shared
                        .metrics
                        .command_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if changes_vms && r.result.is_ok() {
                    self.list_vms();
                }
                let _ = tx.send(r.result.map_err(CallError::from));
            }
            Origin::Grant(gid) => {
                self.grants_in_flight.remove(&gid);
                match r.result {
                    Ok(Reply::GrantApplied { grant_id, .. }) if grant_id == gid => {
                        self.shared
                            .metrics
                            .grants_acked
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Err(e) = self.shared.with_store(|st| st.grant_applied(gid, now)) {
                            tracing::error!("recording grant {gid} applied: {e}");
                        }
                    }
                    Ok(other) => tracing::error!("unexpected answer to grant {gid}: {other:?}"),
                    Err(e) => {
                        self.shared
                            .metrics
                            .grants_refunded
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Err(err) = self
                            .shared
                            .with_store(|st| st.grant_refused(gid, e.reason.as_str(), now))
                        {
                            tracing::error!("refunding grant {gid}: {err}");
                        }
                    }
                }
            }
            Origin::Resync(generation) => self.vm_page(generation, &p.command, r.result, now),
            Origin::Describe => {
                if let (Ok(Reply::VmInfo(info)), Some((host, _))) = (&r.result, &self.host) {
                    let vm = info.summary.vm;
                    match self
                        .shared
                        .with_store(|st| st.sync_commitments(host, vm, &info.volumes, now))
                    {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(host, vm, "{n} commitments resynchronised from the host")
                        }
                        Err(e) => tracing::error!("recording commitments of VM {vm}: {e}"),
                    }
                }
            }
            Origin::Commitment(c, reply) => {
                self.commitments_in_flight.remove(&(c.vm, c.volume));
                let (ok, reason) = match &r.result {
                    Ok(_) => (true, String::new()),
                    Err(e) => (false, format!("{:?}: {}", e.code, e.reason)),
                };
                if let Err(e) = self
                    .shared
                    .with_store(|st| st.commitment_answer(&c, ok, &reason, now))
                {
                    tracing::error!("recording commitment answer: {e}");
                }
                if let Some(tx) = reply {
                    let _ = tx.send(r.result.map_err(CallError::from));
                }
            }
            Origin::Attach => {
                if self.host.is_none() {
                    // The Hello sent before this answer was lost (or garbled): without it the session knows no
                    // host, so it would take no telemetry, answer no credit request and never resynchronise.
                    self.shared
                        .metrics
                        .reattaches
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(host = %self.key, "Attach answered but its Hello was lost; attaching again");
                    self.send(Command::Attach, Origin::Attach);
                }
            }
            Origin::AgentHello => {
                self.shared
                    .set_agent_hello_acked(self.key, r.result.is_ok());
            }
            Origin::Fire => {
                if let Err(e) = r.result {
                    tracing::warn!(host = %self.key, "command {:?} refused: {:?} {}", p.command, e.code, e.reason);
                }
            }
        }
    }
}

/// The variant name of a command (for logs; the payload may be long).
fn command_name(c: &Command) -> String {
    let s = format!("{c:?}");
    s.split([' ', '{', '('])
        .next()
        .unwrap_or_default()
        .to_owned()
}
